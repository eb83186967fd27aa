//! The `chat` plugin: rooms chat with IRC-style commands, history, direct messages and typing
//! indicators.
//!
//! | route / event | handler | does |
//! | --- | --- | --- |
//! | `chat.send` `{"text"}` | `send` | broadcasts `chat.message` `{"text", "nick", "room", "identity"}` to the whole room, sender included, and keeps it in the room's history; a text starting with `/` is a command (below); `//text` sends `/text` literally |
//! | `chat.typing` | `typing` | broadcasts the volatile `chat.typing` `{"room", "identity", "nick", "expiresInMs"}` to the room's other members (a client shows it until `expiresInMs` passed or the sender's next message came; a slow client may not get it) |
//! | `room.joined` | `joined` | sends the joiner `chat.topic` `{"room", "topic", "by"}` if the room has a topic, then `chat.history` `{"room", "messages"}` (the room's last 50 `chat.message` payloads, oldest first) if it has any, then any direct messages still kept for its identity |
//! | `connect` | `connected` | records the connection under its identity, and delivers the identity's kept direct messages to it, in the order they were sent |
//! | `disconnect` | `disconnected` | forgets the connection and its nick |
//!
//! Commands: `/nick NAME` (replies `chat.nick` `{"nick"}`, broadcasts `chat.notice`
//! `{"text": "<old> is now <new>", "room"}`), `/me ACTION` (broadcasts `chat.message` with
//! `"action": true`), `/topic TEXT` (broadcasts `chat.topic` `{"room", "topic", "by"}`),
//! `/topic` (replies the current `chat.topic`, `topic` and `by` null when unset), `/who`
//! (replies `chat.who` `{"room", "members": [{"connectionId", "identity", "nick"}]}`),
//! `/msg IDENTITY TEXT` (sends `chat.direct` `{"from", "nick", "to", "text"}` to every
//! connection of that identity; the ack says `{"to", "delivered": <connections>, "kept":
//! false}`. An identity with no connection keeps the message, `"kept": true`, and gets its
//! kept messages, in order, on its next connect; at most 50 are kept per identity, more is
//! refused with `inbox_full`. An identity that never connected is refused with
//! `unknown_identity`; so is a guest identity that is gone, since guests never come back).
//!
//! Errors: `room_required` (no room), `bad_payload` (no or empty `text`, a command without its
//! argument, an invalid nick), `too_long` (more characters than the `max_text_length` config
//! value, default 2000), `unknown_command`, `inbox_full`, `unknown_identity`.
//!
//! State, in the plugin's key-value store: `nick:<connection-id>` (the nick, plain text; the
//! identity is the nick until one is set), `topic:<room>` (`{"topic", "by"}`),
//! `history:<room>` (the last 50 messages), `conns:<identity>` (its connection ids),
//! `seen:<identity>` (it connected once; dropped with a guest's last connection) and
//! `inbox:<identity>` (kept direct messages), as JSON. `chat.send` is serialized per room
//! (`serialize = "room"`), so a room's history is written by one call at a time, and the host
//! hands a plugin the `connect` and `disconnect` events of one identity one at a time, so
//! `conns:<identity>` loses no connection. A `/msg` sent at the very moment its recipient
//! connects may find no connection yet and be kept: it is delivered on the recipient's next
//! join (or connect).

use plexus_plugin_sdk::{Ctx, HandlerResult, Message, PluginError, RawPayload, ack, plugin};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// `max_text_length` when the manifest's `[config]` does not set it.
const DEFAULT_MAX_TEXT_LENGTH: usize = 2000;
/// The longest nick, in characters.
const MAX_NICK_LENGTH: usize = 32;
/// Messages of a room's history sent to a joiner.
const HISTORY_LENGTH: usize = 50;
/// Direct messages kept for an identity with no connection.
const INBOX_LENGTH: usize = 50;
/// How long a client shows a typing indicator without a newer one, in milliseconds.
const TYPING_EXPIRES_MS: u64 = 5000;

#[derive(Deserialize)]
struct SendPayload {
    text: String,
}

#[derive(Serialize, Deserialize)]
struct Topic {
    topic: String,
    by: String,
}

fn nick_key(connection_id: &str) -> String {
    format!("nick:{connection_id}")
}

fn topic_key(room: &str) -> String {
    format!("topic:{room}")
}

fn history_key(room: &str) -> String {
    format!("history:{room}")
}

fn conns_key(identity: &str) -> String {
    format!("conns:{identity}")
}

fn seen_key(identity: &str) -> String {
    format!("seen:{identity}")
}

fn inbox_key(identity: &str) -> String {
    format!("inbox:{identity}")
}

/// Host-assigned guest identities belong to one connection and never come back.
fn is_guest(identity: &str) -> bool {
    identity.starts_with("guest-")
}

/// The nick of a connection: the one it set, or its identity.
fn nick_of(ctx: &Ctx, connection_id: &str, identity: &str) -> String {
    ctx.kv_get(&nick_key(connection_id))
        .unwrap_or_else(|| identity.to_owned())
}

fn usage(text: &str) -> PluginError {
    PluginError::bad_payload(format!("usage: {text}"))
}

fn send(ctx: &Ctx, msg: Message<SendPayload>) -> HandlerResult {
    let room = msg.require_room()?;
    let text = msg.payload.text.as_str();
    if text.trim().is_empty() {
        return Err(PluginError::bad_payload("`text` is empty"));
    }
    let max = ctx
        .config_parse::<usize>("max_text_length")?
        .unwrap_or(DEFAULT_MAX_TEXT_LENGTH);
    let length = text.chars().count();
    if length > max {
        return Err(PluginError::new(
            "too_long",
            format!("the text has {length} characters, more than the limit of {max}"),
        ));
    }

    if text.starts_with("//") {
        say(ctx, &msg, room, &text[1..], false)
    } else if let Some(command) = text.strip_prefix('/') {
        let (name, arg) = match command.split_once(char::is_whitespace) {
            Some((name, arg)) => (name, arg.trim()),
            None => (command, ""),
        };
        match name.to_ascii_lowercase().as_str() {
            "nick" => nick(ctx, &msg, room, arg),
            "me" if arg.is_empty() => Err(usage("/me ACTION")),
            "me" => say(ctx, &msg, room, arg, true),
            "topic" => topic(ctx, &msg, room, arg),
            "who" => who(ctx, room),
            "msg" => direct(ctx, &msg, arg),
            _ => Err(PluginError::new(
                "unknown_command",
                format!("unknown command `/{name}`"),
            )),
        }
    } else {
        say(ctx, &msg, room, text, false)
    }
}

/// Broadcasts a `chat.message` to the whole room.
fn say(
    ctx: &Ctx,
    msg: &Message<SendPayload>,
    room: &str,
    text: &str,
    action: bool,
) -> HandlerResult {
    let nick = nick_of(ctx, msg.connection_id(), msg.sender());
    let mut payload = json!({"text": text, "nick": nick, "room": room, "identity": msg.sender()});
    if action {
        payload["action"] = Value::Bool(true);
    }
    ctx.broadcast(room, "chat.message", &payload)?;
    let mut history: Vec<Value> = ctx.kv_get_json(&history_key(room))?.unwrap_or_default();
    if history.len() >= HISTORY_LENGTH {
        history.drain(..=history.len() - HISTORY_LENGTH);
    }
    history.push(payload);
    ctx.kv_set_json(&history_key(room), &history)?;
    Ok(None)
}

/// `/msg IDENTITY TEXT`: to every connection of the identity, or kept for its next connect.
fn direct(ctx: &Ctx, msg: &Message<SendPayload>, arg: &str) -> HandlerResult {
    let Some((to, text)) = arg.split_once(char::is_whitespace) else {
        return Err(usage("/msg IDENTITY TEXT"));
    };
    let text = text.trim();
    if text.is_empty() {
        return Err(usage("/msg IDENTITY TEXT"));
    }
    let nick = nick_of(ctx, msg.connection_id(), msg.sender());
    let payload = json!({"from": msg.sender(), "nick": nick, "to": to, "text": text});
    let conns: Vec<String> = ctx.kv_get_json(&conns_key(to))?.unwrap_or_default();
    if !conns.is_empty() {
        for conn in &conns {
            ctx.send(conn, "chat.direct", &payload)?;
        }
        return ack(&json!({"to": to, "delivered": conns.len(), "kept": false}));
    }
    if ctx.kv_get(&seen_key(to)).is_none() {
        return Err(PluginError::new(
            "unknown_identity",
            format!("`{to}` has no connection and is not expected back"),
        ));
    }
    let mut inbox: Vec<Value> = ctx.kv_get_json(&inbox_key(to))?.unwrap_or_default();
    if inbox.len() >= INBOX_LENGTH {
        return Err(PluginError::new(
            "inbox_full",
            format!("`{to}` already has {INBOX_LENGTH} messages waiting"),
        ));
    }
    inbox.push(payload);
    ctx.kv_set_json(&inbox_key(to), &inbox)?;
    ack(&json!({"to": to, "delivered": 0, "kept": true}))
}

/// `chat.typing`: a volatile frame to the room's other members.
fn typing(ctx: &Ctx, msg: Message<RawPayload>) -> HandlerResult {
    let room = msg.require_room()?;
    let nick = nick_of(ctx, msg.connection_id(), msg.sender());
    let payload = json!({
        "room": room,
        "identity": msg.sender(),
        "nick": nick,
        "expiresInMs": TYPING_EXPIRES_MS,
    });
    ctx.broadcast_volatile(room, "chat.typing", &payload, false)?;
    Ok(None)
}

fn nick(ctx: &Ctx, msg: &Message<SendPayload>, room: &str, new: &str) -> HandlerResult {
    if new.is_empty() {
        return Err(usage("/nick NAME"));
    }
    if new.chars().count() > MAX_NICK_LENGTH
        || new.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err(PluginError::bad_payload(format!(
            "a nick is one word of at most {MAX_NICK_LENGTH} characters"
        )));
    }
    let old = nick_of(ctx, msg.connection_id(), msg.sender());
    ctx.kv_set(&nick_key(msg.connection_id()), new);
    ctx.reply("chat.nick", &json!({"nick": new}))?;
    if old != new {
        let text = format!("{old} is now {new}");
        ctx.broadcast(room, "chat.notice", &json!({"text": text, "room": room}))?;
    }
    Ok(None)
}

fn topic(ctx: &Ctx, msg: &Message<SendPayload>, room: &str, text: &str) -> HandlerResult {
    if text.is_empty() {
        let current = ctx.kv_get_json::<Topic>(&topic_key(room))?;
        let (topic, by) = match &current {
            Some(t) => (Some(t.topic.as_str()), Some(t.by.as_str())),
            None => (None, None),
        };
        ctx.reply(
            "chat.topic",
            &json!({"room": room, "topic": topic, "by": by}),
        )?;
        return Ok(None);
    }
    let by = nick_of(ctx, msg.connection_id(), msg.sender());
    let topic = Topic {
        topic: text.to_owned(),
        by,
    };
    ctx.kv_set_json(&topic_key(room), &topic)?;
    ctx.broadcast(
        room,
        "chat.topic",
        &json!({"room": room, "topic": topic.topic, "by": topic.by}),
    )?;
    Ok(None)
}

fn who(ctx: &Ctx, room: &str) -> HandlerResult {
    let members: Vec<Value> = ctx
        .members(room)?
        .into_iter()
        .map(|m| {
            let nick = nick_of(ctx, &m.connection_id, &m.identity);
            json!({"connectionId": m.connection_id, "identity": m.identity, "nick": nick})
        })
        .collect();
    ctx.reply("chat.who", &json!({"room": room, "members": members}))?;
    Ok(None)
}

/// `room.joined`: the message's room is the room, its origin the joiner.
fn joined(ctx: &Ctx, msg: Message<RawPayload>) -> HandlerResult {
    let room = msg.require_room()?;
    if let Some(topic) = ctx.kv_get_json::<Topic>(&topic_key(room))? {
        ctx.reply(
            "chat.topic",
            &json!({"room": room, "topic": topic.topic, "by": topic.by}),
        )?;
    }
    let history: Vec<Value> = ctx.kv_get_json(&history_key(room))?.unwrap_or_default();
    if !history.is_empty() {
        ctx.reply("chat.history", &json!({"room": room, "messages": history}))?;
    }
    // A message kept at the very moment its recipient connected (the `/msg` read no
    // connection, the `connect` found no message yet) is delivered here at the latest.
    deliver_kept(ctx, msg.sender())?;
    Ok(None)
}

/// `connect`: the connection is one of its identity's; kept direct messages go to it, in order.
fn connected(ctx: &Ctx, msg: Message) -> HandlerResult {
    let identity = msg.sender();
    let key = conns_key(identity);
    let mut conns: Vec<String> = ctx.kv_get_json(&key)?.unwrap_or_default();
    if !conns.iter().any(|c| c == msg.connection_id()) {
        conns.push(msg.connection_id().to_owned());
    }
    ctx.kv_set_json(&key, &conns)?;
    ctx.kv_set(&seen_key(identity), "1");
    deliver_kept(ctx, identity)?;
    Ok(None)
}

/// Sends the origin the direct messages kept for its identity, in order, and forgets them.
fn deliver_kept(ctx: &Ctx, identity: &str) -> Result<(), PluginError> {
    let inbox: Vec<Value> = ctx.kv_get_json(&inbox_key(identity))?.unwrap_or_default();
    for message in &inbox {
        ctx.reply("chat.direct", message)?;
    }
    if !inbox.is_empty() {
        ctx.kv_delete(&inbox_key(identity));
    }
    Ok(())
}

/// `disconnect`: the connection will never speak again: its nick goes, and its identity no
/// longer reaches it.
fn disconnected(ctx: &Ctx, msg: Message) -> HandlerResult {
    let identity = msg.sender();
    ctx.kv_delete(&nick_key(msg.connection_id()));
    let key = conns_key(identity);
    let mut conns: Vec<String> = ctx.kv_get_json(&key)?.unwrap_or_default();
    conns.retain(|c| c != msg.connection_id());
    if conns.is_empty() {
        ctx.kv_delete(&key);
        if is_guest(identity) {
            ctx.kv_delete(&seen_key(identity));
        }
    } else {
        ctx.kv_set_json(&key, &conns)?;
    }
    Ok(None)
}

plugin! {
    "send" => send,
    "typing" => typing,
    "joined" => joined,
    "connected" => connected,
    "disconnected" => disconnected,
}

#[cfg(test)]
mod tests;
