//! The `chat` plugin: rooms chat with IRC-style commands.
//!
//! | route / event | handler | does |
//! | --- | --- | --- |
//! | `chat.send` `{"text"}` | `send` | broadcasts `chat.message` `{"text", "nick", "room", "identity"}` to the whole room, sender included; a text starting with `/` is a command (below); `//text` sends `/text` literally |
//! | `room.joined` | `joined` | sends the joiner `chat.topic` `{"room", "topic", "by"}` if the room has a topic |
//! | `room.left` | `left` | forgets the leaver's nick when it disconnected |
//!
//! Commands: `/nick NAME` (replies `chat.nick` `{"nick"}`, broadcasts `chat.notice`
//! `{"text": "<old> is now <new>", "room"}`), `/me ACTION` (broadcasts `chat.message` with
//! `"action": true`), `/topic TEXT` (broadcasts `chat.topic` `{"room", "topic", "by"}`),
//! `/topic` (replies the current `chat.topic`, `topic` and `by` null when unset), `/who`
//! (replies `chat.who` `{"room", "members": [{"connectionId", "identity", "nick"}]}`).
//!
//! Errors: `room_required` (no room), `bad_payload` (no or empty `text`, a command without its
//! argument, an invalid nick), `too_long` (more characters than the `max_text_length` config
//! value, default 2000), `unknown_command`.
//!
//! State, in the plugin's key-value store: `nick:<connection-id>` (the nick, plain text;
//! the identity is the nick until one is set) and `topic:<room>` (`{"topic", "by"}` as JSON).

use plexus_plugin_sdk::{Ctx, HandlerResult, Message, PluginError, RawPayload, plugin};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// `max_text_length` when the manifest's `[config]` does not set it.
const DEFAULT_MAX_TEXT_LENGTH: usize = 2000;
/// The longest nick, in characters.
const MAX_NICK_LENGTH: usize = 32;

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
    Ok(None)
}

/// `room.left`: a connection that disconnected will never speak again, so its nick goes.
/// (A plain leave keeps it: the connection may still be in other rooms.)
fn left(ctx: &Ctx, msg: Message) -> HandlerResult {
    if msg.payload.get("reason").and_then(Value::as_str) == Some("disconnect") {
        ctx.kv_delete(&nick_key(msg.connection_id()));
    }
    Ok(None)
}

plugin! {
    "send" => send,
    "joined" => joined,
    "left" => left,
}

#[cfg(test)]
mod tests;
