//! A mock host for testing plugins natively with `cargo test` (not available on `wasm32`).
//!
//! [`plugin!`](crate::plugin) defines `plexus_dispatch` next to it; [`MockHost::call`] runs
//! it the way the host would, against in-memory rooms, key-value store and config, and hands
//! back the effects the handler recorded.
//!
//! ```
//! use plexus_plugin_sdk::testing::{Effect, MockHost};
//! use plexus_plugin_sdk::{plugin, Ctx, HandlerResult, Message, RawMessage};
//! use serde_json::{json, Value};
//!
//! fn shout(ctx: &Ctx, msg: Message<String>) -> HandlerResult {
//!     ctx.reply("shouted", &msg.payload.to_uppercase())?;
//!     Ok(None)
//! }
//! plugin! { "shout" => shout }
//!
//! let host = MockHost::new();
//! let (ack, effects) = host.call(plexus_dispatch, "shout", RawMessage::json("x", &"hi")).unwrap();
//! assert_eq!(ack, None);
//! assert_eq!(effects, vec![Effect::Reply { ty: "shouted".into(), payload: json!("HI") }]);
//! ```
//!
//! The state is thread-local (each `#[test]` runs on its own thread); [`MockHost::new`]
//! resets it. As in the host, effects are discarded when the handler fails, and joins and
//! leaves are applied to the mock's rooms when it succeeds; key-value writes too are applied
//! only when it succeeds (a handler reads its own writes meanwhile).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::marker::PhantomData;

use serde_json::Value;

use crate::{LogLevel, Member, PluginError, RawMessage};

/// One effect a handler recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// `Ctx::reply`: a message to the origin connection.
    Reply {
        /// The message type.
        ty: String,
        /// The payload, parsed.
        payload: Value,
    },
    /// `Ctx::send`: a message to one connection.
    Send {
        /// The target connection.
        connection_id: String,
        /// The message type.
        ty: String,
        /// The payload, parsed.
        payload: Value,
    },
    /// `Ctx::broadcast` (`include_sender`) or `Ctx::broadcast_others`.
    Broadcast {
        /// The room.
        room: String,
        /// The message type.
        ty: String,
        /// The payload, parsed.
        payload: Value,
        /// Whether the origin connection receives it too.
        include_sender: bool,
    },
    /// `Ctx::broadcast_volatile`.
    BroadcastVolatile {
        /// The room.
        room: String,
        /// The message type.
        ty: String,
        /// The payload, parsed.
        payload: Value,
        /// Whether the origin connection receives it too.
        include_sender: bool,
    },
    /// `Ctx::join`.
    Join {
        /// The room.
        room: String,
    },
    /// `Ctx::leave`.
    Leave {
        /// The room.
        room: String,
    },
}

#[derive(Default)]
struct State {
    kv: BTreeMap<String, String>,
    /// The running call's key-value writes (`None`: deleted), applied when it succeeds.
    kv_pending: BTreeMap<String, Option<String>>,
    config: BTreeMap<String, String>,
    rooms: BTreeMap<String, Vec<Member>>,
    forbidden: BTreeSet<String>,
    effects: Vec<Effect>,
    logs: Vec<(LogLevel, String)>,
}

thread_local! {
    static STATE: RefCell<State> = RefCell::new(State::default());
}

fn with<R>(f: impl FnOnce(&mut State) -> R) -> R {
    STATE.with(|state| f(&mut state.borrow_mut()))
}

/// The signature of the `plexus_dispatch` function [`plugin!`](crate::plugin) defines.
pub type Dispatch = fn(&str, RawMessage) -> Result<Option<String>, PluginError>;

/// A handle on this thread's mock host. See the [module docs](self).
#[derive(Debug)]
pub struct MockHost {
    // The state is per thread: keep the handle on its thread.
    _not_send: PhantomData<*const ()>,
}

impl Default for MockHost {
    fn default() -> Self {
        Self::new()
    }
}

impl MockHost {
    /// Resets this thread's mock host: no rooms, empty store and config, no effects.
    pub fn new() -> Self {
        with(|state| *state = State::default());
        Self {
            _not_send: PhantomData,
        }
    }

    /// Sets a `[config]` value.
    #[must_use]
    pub fn with_config(self, key: &str, value: &str) -> Self {
        with(|state| state.config.insert(key.to_owned(), value.to_owned()));
        self
    }

    /// Adds a member to `room`, creating the room.
    pub fn add_member(&self, room: &str, connection_id: &str, identity: &str) {
        with(|state| {
            let members = state.rooms.entry(room.to_owned()).or_default();
            if !members.iter().any(|m| m.connection_id == connection_id) {
                members.push(Member::new(connection_id, identity));
            }
        });
    }

    /// The members of `room`.
    pub fn members(&self, room: &str) -> Vec<Member> {
        with(|state| state.rooms.get(room).cloned().unwrap_or_default())
    }

    /// Makes every host call about `room` (broadcast, join, leave, members) fail, as for a
    /// room outside the plugin's capabilities.
    pub fn forbid_room(&self, room: &str) {
        with(|state| state.forbidden.insert(room.to_owned()));
    }

    /// The stored value of `key` (what successful calls wrote).
    pub fn kv_get(&self, key: &str) -> Option<String> {
        with(|state| state.kv.get(key).cloned())
    }

    /// Stores `value` under `key`.
    pub fn kv_set(&self, key: &str, value: &str) {
        with(|state| state.kv.insert(key.to_owned(), value.to_owned()));
    }

    /// The log lines written so far.
    pub fn logs(&self) -> Vec<(LogLevel, String)> {
        with(|state| state.logs.clone())
    }

    /// Runs `dispatch` (the `plexus_dispatch` function of a plugin) for `handler` on `msg`.
    ///
    /// On success returns the ack object (parsed) and the effects; on failure the error (the
    /// effects and the key-value writes are discarded, as the host does).
    ///
    /// # Panics
    /// If the handler returned, or sent a payload that is, not valid JSON.
    pub fn call(
        &self,
        dispatch: Dispatch,
        handler: &str,
        msg: RawMessage,
    ) -> Result<(Option<Value>, Vec<Effect>), PluginError> {
        with(|state| {
            state.effects.clear();
            state.kv_pending.clear();
        });
        let connection_id = msg.connection_id().to_owned();
        let identity = msg.sender().to_owned();
        let result = dispatch(handler, msg);
        let (effects, writes) = with(|state| {
            (
                std::mem::take(&mut state.effects),
                std::mem::take(&mut state.kv_pending),
            )
        });
        let ack = result?.map(|text| parse(&text, "ack"));
        with(|state| {
            for (key, value) in writes {
                match value {
                    Some(value) => state.kv.insert(key, value),
                    None => state.kv.remove(&key),
                };
            }
        });
        for effect in &effects {
            match effect {
                Effect::Join { room } => self.add_member(room, &connection_id, &identity),
                Effect::Leave { room } => with(|state| {
                    if let Some(members) = state.rooms.get_mut(room) {
                        members.retain(|m| m.connection_id != connection_id);
                    }
                }),
                _ => {}
            }
        }
        Ok((ack, effects))
    }
}

fn parse(text: &str, what: &str) -> Value {
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("the plugin produced an invalid JSON {what} {text:?}: {e}"))
}

fn check_room(state: &State, room: &str) -> Result<(), String> {
    if state.forbidden.contains(room) {
        Err(format!(
            "room `{room}` is outside the plugin's capabilities"
        ))
    } else {
        Ok(())
    }
}

/// The mock's side of the host calls (`crate::host` re-exports these off `wasm32`).
pub(crate) mod host {
    use super::{Effect, State, check_room, parse, with};
    use crate::{LogLevel, Member};

    fn push(state: &mut State, effect: Effect) {
        state.effects.push(effect);
    }

    pub(crate) fn reply(ty: &str, payload: &str) {
        let payload = parse(payload, "payload");
        with(|s| {
            push(
                s,
                Effect::Reply {
                    ty: ty.to_owned(),
                    payload,
                },
            );
        });
    }

    pub(crate) fn send(connection_id: &str, ty: &str, payload: &str) {
        let payload = parse(payload, "payload");
        with(|s| {
            push(
                s,
                Effect::Send {
                    connection_id: connection_id.to_owned(),
                    ty: ty.to_owned(),
                    payload,
                },
            );
        });
    }

    pub(crate) fn broadcast(
        room: &str,
        ty: &str,
        payload: &str,
        include_sender: bool,
    ) -> Result<(), String> {
        record_broadcast(room, payload, |room, payload| Effect::Broadcast {
            room,
            ty: ty.to_owned(),
            payload,
            include_sender,
        })
    }

    pub(crate) fn broadcast_volatile(
        room: &str,
        ty: &str,
        payload: &str,
        include_sender: bool,
    ) -> Result<(), String> {
        record_broadcast(room, payload, |room, payload| Effect::BroadcastVolatile {
            room,
            ty: ty.to_owned(),
            payload,
            include_sender,
        })
    }

    fn record_broadcast(
        room: &str,
        payload: &str,
        effect: impl FnOnce(String, serde_json::Value) -> Effect,
    ) -> Result<(), String> {
        let payload = parse(payload, "payload");
        with(|s| {
            check_room(s, room)?;
            push(s, effect(room.to_owned(), payload));
            Ok(())
        })
    }

    pub(crate) fn join(room: &str) -> Result<(), String> {
        with(|s| {
            check_room(s, room)?;
            push(
                s,
                Effect::Join {
                    room: room.to_owned(),
                },
            );
            Ok(())
        })
    }

    pub(crate) fn leave(room: &str) -> Result<(), String> {
        with(|s| {
            check_room(s, room)?;
            push(
                s,
                Effect::Leave {
                    room: room.to_owned(),
                },
            );
            Ok(())
        })
    }

    pub(crate) fn members(room: &str) -> Result<Vec<Member>, String> {
        with(|s| {
            check_room(s, room)?;
            Ok(s.rooms.get(room).cloned().unwrap_or_default())
        })
    }

    pub(crate) fn kv_get(key: &str) -> Option<String> {
        with(|s| match s.kv_pending.get(key) {
            Some(pending) => pending.clone(),
            None => s.kv.get(key).cloned(),
        })
    }

    pub(crate) fn kv_set(key: &str, value: &str) {
        with(|s| s.kv_pending.insert(key.to_owned(), Some(value.to_owned())));
    }

    pub(crate) fn kv_delete(key: &str) {
        with(|s| s.kv_pending.insert(key.to_owned(), None));
    }

    pub(crate) fn config(key: &str) -> Option<String> {
        with(|s| s.config.get(key).cloned())
    }

    pub(crate) fn log(level: LogLevel, message: &str) {
        with(|s| s.logs.push((level, message.to_owned())));
    }
}
