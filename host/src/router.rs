//! The router: takes one decoded client frame of a session, handles host types (`sys.*`) itself,
//! routes every other type to a plugin by the current route table, applies the effects the call
//! recorded, and answers with exactly one `sys.ack` or `sys.error` where the protocol asks.

use std::collections::HashSet;
use std::sync::Arc;

use serde_json::json;

use crate::effects::{self, Effect, LogLevel};
use crate::error::{ErrorCode, HandleError};
use crate::manifest::HostEvent;
use crate::plugin::{CallInput, CallOutput};
use crate::protocol::{self, Inbound, Outbound};
use crate::registry::{LoadedPlugin, Registry, Verdict};
use crate::rooms::Rooms;
use crate::serial::{RoomLocks, Turn};
use crate::session::{Session, Sessions};

/// Host-wide limits on connections.
#[derive(Debug, Clone, Copy)]
pub struct HostLimits {
    /// Largest text frame a client may send; larger ones get `too_large`.
    pub max_message_bytes: usize,
    /// Frames a session's outbox holds before the client is closed as a slow consumer.
    pub outbox_capacity: usize,
    /// Longest room name.
    pub max_room_name: usize,
}

impl Default for HostLimits {
    fn default() -> Self {
        HostLimits {
            max_message_bytes: 1 << 20,
            outbox_capacity: 4096,
            max_room_name: 256,
        }
    }
}

/// The state every connection of a host shares.
#[derive(Debug)]
pub struct Hub {
    pub sessions: Sessions,
    pub rooms: Arc<Rooms>,
    pub registry: Registry,
    pub limits: HostLimits,
    /// Turns of room-serialized routes (`serialize = "room"`).
    pub room_locks: RoomLocks,
}

/// What one connection's task owns: its session and the rooms it joined.
#[derive(Debug)]
pub struct ConnState {
    pub session: Arc<Session>,
    pub rooms: HashSet<Arc<str>>,
}

impl ConnState {
    pub fn new(session: Arc<Session>) -> ConnState {
        ConnState {
            session,
            rooms: HashSet::new(),
        }
    }

    fn push(&self, frame: protocol::Frame) {
        self.session.outbox.push(frame);
    }
}

/// How deep plugin-triggered host events may nest (an event handler's joins fire no events).
const MAX_EVENT_DEPTH: u8 = 1;

/// Handles one client text frame: decode, dispatch, answer.
pub async fn handle_text(hub: &Hub, conn: &mut ConnState, text: &str) {
    if text.len() > hub.limits.max_message_bytes {
        let message = format!(
            "frame of {} bytes exceeds the limit of {} bytes",
            text.len(),
            hub.limits.max_message_bytes
        );
        let id = protocol::salvage_message_id(text);
        conn.push(protocol::error(
            id.as_deref(),
            ErrorCode::TooLarge.as_str(),
            &message,
        ));
        return;
    }
    let msg = match protocol::decode(text) {
        Ok(msg) => msg,
        Err(e) => {
            conn.push(protocol::error(
                e.message_id.as_deref(),
                e.code.as_str(),
                &e.message,
            ));
            return;
        }
    };
    // A room-serialized call keeps its turn until its answer is queued too, so that the next
    // call's frames cannot overtake it.
    let mut turn = None;
    let result = dispatch(hub, conn, &msg, &mut turn).await;
    match (result, msg.message_id.as_deref()) {
        (Ok(extra), Some(id)) => conn.push(protocol::ack(id, extra.as_deref())),
        (Ok(_), None) => {}
        (Err(e), id) => {
            let (code, message) = e.wire();
            conn.push(protocol::error(id, code, message));
        }
    }
    drop(turn);
}

/// Answers a frame that is not text.
pub fn handle_binary(conn: &ConnState) {
    conn.push(protocol::error(
        None,
        ErrorCode::BadFrame.as_str(),
        "binary frames are not supported; send JSON text frames",
    ));
}

async fn dispatch<'h>(
    hub: &'h Hub,
    conn: &mut ConnState,
    msg: &Inbound<'_>,
    turn: &mut Option<Turn<'h>>,
) -> Result<Option<String>, HandleError> {
    match msg.ty.as_ref() {
        "sys.join" => {
            let room = room_of(hub, msg)?;
            let members = join_room(hub, conn, &room, 0).await;
            Ok(Some(
                json!({ "room": room, "members": members_json(&members) }).to_string(),
            ))
        }
        "sys.leave" => {
            let room = room_of(hub, msg)?;
            if !leave_room(hub, conn, &room, "leave", 0).await {
                return Err(HandleError::new(
                    ErrorCode::NotInRoom,
                    format!("not a member of room `{room}`"),
                ));
            }
            Ok(Some(json!({ "room": room }).to_string()))
        }
        "sys.ping" => {
            conn.push(
                Outbound {
                    ty: "sys.pong",
                    room: None,
                    payload: msg.payload.get(),
                    sender: None,
                }
                .encode(),
            );
            Ok(None)
        }
        ty if ty.starts_with("sys.") => Err(HandleError::new(
            ErrorCode::UnknownType,
            format!("unknown host message type `{ty}`"),
        )),
        ty => route(hub, conn, ty, msg, turn).await,
    }
}

fn room_of(hub: &Hub, msg: &Inbound<'_>) -> Result<String, HandleError> {
    let room = msg
        .room
        .as_deref()
        .map(str::to_owned)
        .or_else(|| protocol::payload_room(msg.payload))
        .filter(|r| !r.is_empty())
        .ok_or_else(|| {
            HandleError::new(
                ErrorCode::RoomRequired,
                format!("`{}` needs a room", msg.ty),
            )
        })?;
    if room.len() > hub.limits.max_room_name {
        return Err(HandleError::new(
            ErrorCode::BadFrame,
            format!("room names are at most {} bytes", hub.limits.max_room_name),
        ));
    }
    Ok(room)
}

async fn route<'h>(
    hub: &'h Hub,
    conn: &mut ConnState,
    ty: &str,
    msg: &Inbound<'_>,
    turn: &mut Option<Turn<'h>>,
) -> Result<Option<String>, HandleError> {
    let no_route = || {
        HandleError::new(
            ErrorCode::UnknownType,
            format!("no route for message type `{ty}`"),
        )
    };
    let mut table = hub.registry.table_full();
    let mut target = table.route(ty).ok_or_else(no_route)?;
    if target.serialize.is_some()
        && let Some(room) = msg.room.as_deref()
    {
        *turn = Some(hub.room_locks.turn(&target.plugin.manifest.id, room).await);
        // The route table of the moment the turn came: calls in turn order also run on
        // versions in swap order.
        table = hub.registry.table_full();
        target = table.route(ty).ok_or_else(no_route)?;
    }
    if let Some(room) = msg.room.as_deref()
        && !target.allow_outside_room
        && !conn.rooms.contains(room)
    {
        return Err(HandleError::new(
            ErrorCode::NotInRoom,
            format!("join room `{room}` before sending `{ty}` to it"),
        ));
    }
    let session = conn.session.clone();
    let input = CallInput {
        handler: &target.handler,
        ty,
        room: msg.room.as_deref(),
        payload: msg.payload.get(),
        sender: &session.identity.0,
        connection_id: &session.connection_id,
        message_id: msg.message_id.as_deref(),
        metadata: msg.metadata.map(|m| m.get()),
    };
    run_call(hub, conn, &target.plugin, &input, 0).await
}

/// Calls a plugin and applies what it recorded. Effects apply only when the call succeeds and
/// every effect is well-formed.
async fn run_call(
    hub: &Hub,
    conn: &mut ConnState,
    plugin: &Arc<LoadedPlugin>,
    input: &CallInput<'_>,
    depth: u8,
) -> Result<Option<String>, HandleError> {
    let output = {
        let _in_flight = plugin.health.begin();
        plugin.code.call(input)
    };
    emit_logs(plugin, &output.logs);
    let checked = check_output(plugin, input, output);
    let failed = matches!(
        &checked,
        Err(HandleError::Host {
            code: ErrorCode::PluginFailed,
            ..
        })
    );
    if let Verdict::RollBack { calls, failures } =
        plugin.health.record(failed, hub.registry.policy())
    {
        hub.registry.request_rollback(
            &plugin.manifest.id,
            &plugin.version,
            format!("{failures} of its first {calls} calls after the swap failed"),
        );
    }
    let (ack, effects) = checked?;
    apply(hub, conn, plugin, input.room, effects, depth).await;
    Ok(ack)
}

/// The ack and the effects of a successful call whose effects are all well-formed, or the
/// error to answer with.
fn check_output(
    plugin: &LoadedPlugin,
    input: &CallInput<'_>,
    output: CallOutput,
) -> Result<(Option<String>, Vec<Effect>), HandleError> {
    let ack = match output.result {
        Ok(ack) => ack,
        Err(err) => {
            if !matches!(err, crate::error::CallError::Refused { .. }) {
                tracing::warn!(plugin = %plugin.manifest.id, "plugin call failed: {err}");
            }
            return Err(err.into());
        }
    };
    let bad = |reason: String| {
        HandleError::new(
            ErrorCode::PluginFailed,
            format!(
                "plugin `{}` produced an invalid effect: {reason}",
                plugin.manifest.id
            ),
        )
    };
    for effect in &output.effects {
        // A payload byte-identical to the (already parsed) input payload is valid JSON; anything
        // else is checked before it can reach the wire.
        if let Some(payload) = effect.payload()
            && payload != input.payload
        {
            protocol::validate_json(payload)
                .map_err(|e| bad(format!("payload is not JSON: {e}")))?;
        }
        match effect {
            Effect::Reply { ty, .. } | Effect::Send { ty, .. } | Effect::Broadcast { ty, .. }
                if ty.is_empty() || ty.starts_with("sys.") =>
            {
                return Err(bad(format!("message type `{ty}` is not allowed")));
            }
            _ => {}
        }
    }
    let ack = match ack {
        None => None,
        Some(text) => ack_fields(&text).map_err(bad)?,
    };
    Ok((ack, output.effects))
}

/// The fields a handler adds to its `sys.ack`, as compact JSON object text, or `None` when
/// there are none. The host builds the ack: `ref` is always the host's, so a `ref` of the
/// plugin's is dropped.
fn ack_fields(text: &str) -> Result<Option<String>, String> {
    match serde_json::from_str::<serde_json::Value>(text) {
        Ok(serde_json::Value::Object(mut fields)) => {
            fields.remove("ref");
            Ok((!fields.is_empty()).then(|| serde_json::Value::Object(fields).to_string()))
        }
        _ => Err("the handler's return value must be a JSON object".into()),
    }
}

fn emit_logs(plugin: &LoadedPlugin, logs: &[(LogLevel, String)]) {
    let id = &plugin.manifest.id;
    for (level, line) in logs {
        match level {
            LogLevel::Trace => tracing::trace!(plugin = %id, "{line}"),
            LogLevel::Debug => tracing::debug!(plugin = %id, "{line}"),
            LogLevel::Info => tracing::info!(plugin = %id, "{line}"),
            LogLevel::Warn => tracing::warn!(plugin = %id, "{line}"),
            LogLevel::Error => tracing::error!(plugin = %id, "{line}"),
        }
    }
}

/// Applies a call's effects in the order recorded.
async fn apply(
    hub: &Hub,
    conn: &mut ConnState,
    plugin: &LoadedPlugin,
    origin_room: Option<&str>,
    mut effects: Vec<Effect>,
    depth: u8,
) {
    let sender = conn.session.identity.0.clone();
    for effect in effects.drain(..) {
        match effect {
            Effect::Reply { ty, payload } => {
                let frame = Outbound {
                    ty: &ty,
                    room: origin_room,
                    payload: &payload,
                    sender: Some(&sender),
                };
                conn.push(frame.encode());
            }
            Effect::Send { to, ty, payload } => {
                let frame = Outbound {
                    ty: &ty,
                    room: None,
                    payload: &payload,
                    sender: Some(&sender),
                };
                match hub.sessions.get(&to) {
                    Some(session) => {
                        session.outbox.push(frame.encode());
                    }
                    None => {
                        tracing::debug!(plugin = %plugin.manifest.id, %to, "send to a connection that is gone")
                    }
                }
            }
            Effect::Broadcast {
                room,
                ty,
                payload,
                include_sender,
                volatile,
            } => {
                let frame = Outbound {
                    ty: &ty,
                    room: Some(&room),
                    payload: &payload,
                    sender: Some(&sender),
                }
                .encode();
                let except = (!include_sender).then_some(&*conn.session.connection_id);
                if volatile {
                    hub.rooms.broadcast_volatile(&room, &frame, except);
                } else {
                    hub.rooms.broadcast(&room, &frame, except);
                }
            }
            Effect::Join { room } => {
                join_room(hub, conn, &room, depth + 1).await;
            }
            Effect::Leave { room } => {
                leave_room(hub, conn, &room, "leave", depth + 1).await;
            }
            Effect::KvSet { key, value } => {
                plugin.kv.insert(key, value);
            }
            Effect::KvDelete { key } => {
                plugin.kv.remove(&key);
            }
        }
    }
    effects::recycle(effects);
}

fn members_json(members: &[crate::rooms::MemberInfo]) -> serde_json::Value {
    members
        .iter()
        .map(|m| json!({ "connectionId": &*m.connection_id, "identity": &*m.identity }))
        .collect()
}

/// Makes the connection join a room: tells the other members, then the plugins subscribed to
/// `room.joined`. Returns the member list.
pub async fn join_room(
    hub: &Hub,
    conn: &mut ConnState,
    room: &str,
    depth: u8,
) -> Vec<crate::rooms::MemberInfo> {
    if hub.rooms.join(room, &conn.session) {
        conn.rooms.insert(Arc::from(room));
        let payload = json!({
            "room": room,
            "connectionId": &*conn.session.connection_id,
            "identity": &*conn.session.identity.0,
        });
        let frame = protocol::host_frame("room.joined", Some(room), &payload);
        hub.rooms
            .broadcast(room, &frame, Some(&conn.session.connection_id));
        Box::pin(fire_event(
            hub,
            conn,
            HostEvent::RoomJoined,
            room,
            &payload,
            depth,
        ))
        .await;
    }
    hub.rooms.members(room)
}

/// Makes the connection leave a room. Returns false when it was not a member.
pub async fn leave_room(
    hub: &Hub,
    conn: &mut ConnState,
    room: &str,
    reason: &str,
    depth: u8,
) -> bool {
    if !hub.rooms.leave(room, &conn.session.connection_id) {
        return false;
    }
    conn.rooms.remove(room);
    let payload = json!({
        "room": room,
        "connectionId": &*conn.session.connection_id,
        "identity": &*conn.session.identity.0,
        "reason": reason,
    });
    let frame = protocol::host_frame("room.left", Some(room), &payload);
    hub.rooms.broadcast(room, &frame, None);
    Box::pin(fire_event(
        hub,
        conn,
        HostEvent::RoomLeft,
        room,
        &payload,
        depth,
    ))
    .await;
    true
}

/// Leaves every room, as on disconnect.
pub async fn leave_all(hub: &Hub, conn: &mut ConnState) {
    let rooms: Vec<Arc<str>> = conn.rooms.iter().cloned().collect();
    for room in rooms {
        leave_room(hub, conn, &room, "disconnect", 0).await;
    }
}

async fn fire_event(
    hub: &Hub,
    conn: &mut ConnState,
    event: HostEvent,
    room: &str,
    payload: &serde_json::Value,
    depth: u8,
) {
    if depth >= MAX_EVENT_DEPTH {
        return;
    }
    let table = hub.registry.table_full();
    let subscribers = table.subscribers(event);
    if subscribers.is_empty() {
        return;
    }
    let payload = payload.to_string();
    let session = conn.session.clone();
    for target in subscribers {
        let input = CallInput {
            handler: &target.handler,
            ty: event.name(),
            room: Some(room),
            payload: &payload,
            sender: &session.identity.0,
            connection_id: &session.connection_id,
            message_id: None,
            metadata: None,
        };
        if let Err(e) = run_call(hub, conn, &target.plugin, &input, depth + 1).await {
            tracing::warn!(plugin = %target.plugin.manifest.id, event = event.name(), "event handler failed: {}", e.wire().1);
        }
    }
}

/// Registers a session's outbox to receive the host's frames; used by the connection task.
pub fn welcome(conn: &ConnState) {
    let s = &conn.session;
    let payload = json!({
        "connectionId": &*s.connection_id,
        "sessionId": &*s.session_id,
        "identity": &*s.identity.0,
        "protocolVersion": protocol::PROTOCOL_VERSION,
        "hostVersion": env!("CARGO_PKG_VERSION"),
    });
    conn.push(protocol::host_frame("sys.welcome", None, &payload));
}

#[cfg(test)]
mod tests {
    use super::ack_fields;

    #[test]
    fn ack_fields_are_a_compact_object_without_ref() {
        assert_eq!(ack_fields(" { } "), Ok(None));
        assert_eq!(ack_fields(r#"{"ref": "x"}"#), Ok(None));
        assert_eq!(
            ack_fields(r#"{ "ref": "x", "n" : 1 }"#),
            Ok(Some(r#"{"n":1}"#.to_owned()))
        );
        assert!(ack_fields("[1]").is_err());
        assert!(ack_fields("{").is_err());
    }
}
