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

use crate::{Answer, LogLevel, Member, PluginError, RawMessage, RequestOutcome};

/// Most timers, and most requests, a plugin may have pending (as in the host).
const MAX_PENDING: usize = 10_000;
/// How many times `MockHost::call` runs a handler whose key-value reads keep conflicting (the
/// host's figure).
const MAX_ATTEMPTS: u32 = 8;
/// The longest timer delay, in milliseconds (as in the host).
const MAX_DELAY_MS: u64 = 24 * 60 * 60 * 1000;
/// The longest request timeout, in milliseconds (as in the host).
const MAX_TIMEOUT_MS: u64 = 5 * 60 * 1000;

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
    /// `Ctx::schedule`.
    Schedule {
        /// The timer's id.
        id: u64,
        /// The handler it calls.
        handler: String,
        /// Its delay, in milliseconds.
        delay_ms: u64,
        /// The payload of its call, parsed.
        payload: Value,
    },
    /// `Ctx::cancel_timer` of a pending timer.
    CancelTimer {
        /// The timer's id.
        id: u64,
    },
    /// `Ctx::request`.
    Request {
        /// The request's id.
        id: u64,
        /// The connection asked.
        connection_id: String,
        /// The message type.
        ty: String,
        /// The payload, parsed.
        payload: Value,
        /// The timeout, in milliseconds.
        timeout_ms: u64,
        /// The handler the outcome goes to.
        handler: String,
    },
    /// `Ctx::request_room`.
    RequestRoom {
        /// The request's id.
        id: u64,
        /// The room asked.
        room: String,
        /// The message type.
        ty: String,
        /// The payload, parsed.
        payload: Value,
        /// The timeout, in milliseconds.
        timeout_ms: u64,
        /// The handler the outcome goes to.
        handler: String,
    },
}

/// A timer pending in the mock host (see [`MockHost::pending_timers`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MockTimer {
    /// Its id.
    pub id: u64,
    /// The handler it calls.
    pub handler: String,
    /// When it is due, on the mock's clock ([`MockHost::now_ms`]).
    pub due_ms: u64,
    /// The payload of its call.
    pub payload: Value,
}

/// A request pending in the mock host (see [`MockHost::pending_requests`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MockRequest {
    /// Its id.
    pub id: u64,
    /// The handler its outcome goes to.
    pub handler: String,
    /// The room of a room request.
    pub room: Option<String>,
    /// The targets that have not answered yet.
    pub waiting: Vec<Member>,
    /// The answers so far.
    pub answers: Vec<Answer>,
    /// When it times out, on the mock's clock.
    pub due_ms: u64,
}

impl MockRequest {
    fn outcome(self) -> RequestOutcome {
        RequestOutcome {
            request_id: self.id,
            room: self.room,
            answers: self.answers,
            missing: self.waiting,
        }
    }
}

/// A call the mock host made by itself: a timer that came due, or a request's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Fired {
    /// The handler called.
    pub handler: String,
    /// The message type: `timer` or `request.outcome`.
    pub ty: String,
    /// The payload it was called with.
    pub payload: Value,
    /// What the call returned: its effects, or its error.
    pub result: Result<Vec<Effect>, PluginError>,
}

#[derive(Default)]
struct State {
    kv: BTreeMap<String, String>,
    /// The running call's key-value writes (`None`: deleted), applied when it succeeds.
    kv_pending: BTreeMap<String, Option<String>>,
    /// The keys the running call read from the store.
    kv_read: BTreeSet<String>,
    /// Writes of "another call" that land while the next call reading their key runs
    /// (`MockHost::conflict`), by key.
    kv_interleaved: BTreeMap<String, Option<String>>,
    /// How many times the last `call` ran its handler.
    attempts: u32,
    config: BTreeMap<String, String>,
    /// Verified claims by connection id, as JSON object text.
    claims: BTreeMap<String, String>,
    rooms: BTreeMap<String, Vec<Member>>,
    forbidden: BTreeSet<String>,
    effects: Vec<Effect>,
    logs: Vec<(LogLevel, String)>,
    /// The plugin's handler names, when the test gave them: timers and requests must name one.
    handlers: Option<Vec<String>>,
    /// The mock's clock, in milliseconds.
    now_ms: u64,
    /// The last timer or request id handed out.
    last_id: u64,
    timers: BTreeMap<u64, MockTimer>,
    requests: BTreeMap<u64, MockRequest>,
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

    /// Gives connection `connection_id` verified token claims (a JSON object), as the host
    /// does for a connection admitted with a token; `Ctx::claims` reads them. Connections
    /// without are guests (`None`).
    ///
    /// # Panics
    /// If `claims` is not a JSON object.
    #[must_use]
    pub fn with_claims(self, connection_id: &str, claims: &Value) -> Self {
        assert!(claims.is_object(), "claims are a JSON object, not {claims}");
        with(|state| {
            state
                .claims
                .insert(connection_id.to_owned(), claims.to_string())
        });
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

    /// Makes "another call" write `value` under `key` (`None`: delete it) while the next call
    /// that reads `key` runs, before that call commits, as a call on another connection or node
    /// may: as the host does, the call's effects are discarded and it runs again, seeing the
    /// new value. See [`MockHost::attempts`].
    pub fn conflict(&self, key: &str, value: Option<&str>) {
        with(|state| {
            state
                .kv_interleaved
                .insert(key.to_owned(), value.map(str::to_owned))
        });
    }

    /// How many times the last `call` ran its handler (more than once after a [`conflict`]).
    ///
    /// [`conflict`]: MockHost::conflict
    pub fn attempts(&self) -> u32 {
        with(|state| state.attempts)
    }

    /// The log lines written so far.
    pub fn logs(&self) -> Vec<(LogLevel, String)> {
        with(|state| state.logs.clone())
    }

    /// Gives the plugin's handler names (its `PLEXUS_HANDLERS`): then, as in the host, a timer
    /// or a request naming another handler fails the call.
    #[must_use]
    pub fn with_handlers(self, handlers: &[&str]) -> Self {
        with(|state| state.handlers = Some(handlers.iter().map(|h| (*h).to_owned()).collect()));
        self
    }

    /// The mock's clock, in milliseconds since the mock was created. Only
    /// [`MockHost::advance`] moves it.
    pub fn now_ms(&self) -> u64 {
        with(|state| state.now_ms)
    }

    /// The pending timers, soonest first.
    pub fn pending_timers(&self) -> Vec<MockTimer> {
        let mut timers: Vec<MockTimer> = with(|state| state.timers.values().cloned().collect());
        timers.sort_by_key(|t| (t.due_ms, t.id));
        timers
    }

    /// The pending requests, by id.
    pub fn pending_requests(&self) -> Vec<MockRequest> {
        with(|state| state.requests.values().cloned().collect())
    }

    /// Moves the clock `by` forward, firing what comes due on the way, in due order: timers
    /// (their handler called with their payload) and requests that time out (their handler
    /// called with the [`RequestOutcome`], the targets that did not answer in `missing`).
    /// What those calls schedule and that comes due before the end fires too. Returns the
    /// calls made.
    pub fn advance(&self, dispatch: Dispatch, by: std::time::Duration) -> Vec<Fired> {
        let end = self.now_ms() + u64::try_from(by.as_millis()).unwrap_or(u64::MAX);
        let mut fired = Vec::new();
        loop {
            let next = with(|state| {
                let timer = state
                    .timers
                    .values()
                    .map(|t| (t.due_ms, 0, t.id))
                    .filter(|(due, ..)| *due <= end)
                    .min();
                let request = state
                    .requests
                    .values()
                    // With nobody to wait for (an empty room), it completes at once.
                    .map(|r| {
                        let due = if r.waiting.is_empty() {
                            state.now_ms
                        } else {
                            r.due_ms
                        };
                        (due, 1, r.id)
                    })
                    .filter(|(due, ..)| *due <= end)
                    .min();
                let next = match (timer, request) {
                    (Some(t), Some(r)) => Some(t.min(r)),
                    (t, r) => t.or(r),
                }?;
                state.now_ms = state.now_ms.max(next.0);
                Some(next)
            });
            match next {
                Some((_, 0, id)) => {
                    let timer = with(|state| state.timers.remove(&id)).expect("a pending timer");
                    fired.push(self.fire(dispatch, "timer", &timer.handler, timer.payload));
                }
                Some((_, _, id)) => {
                    let request =
                        with(|state| state.requests.remove(&id)).expect("a pending request");
                    fired.push(self.complete(dispatch, request));
                }
                None => break,
            }
        }
        with(|state| state.now_ms = end);
        fired
    }

    /// Connection `connection_id` answers request `id` with `payload` (its `sys.reply`). When
    /// it was the last target, the request completes: its handler is called with the outcome,
    /// and that call is returned.
    ///
    /// # Panics
    /// If request `id` is not pending or does not await an answer from `connection_id` (the
    /// host answers such a `sys.reply` with `unknown_ref`).
    pub fn answer(
        &self,
        dispatch: Dispatch,
        id: u64,
        connection_id: &str,
        payload: Value,
    ) -> Option<Fired> {
        let done = with(|state| {
            let request = state
                .requests
                .get_mut(&id)
                .unwrap_or_else(|| panic!("request {id} is not pending (unknown_ref)"));
            let at = request
                .waiting
                .iter()
                .position(|m| m.connection_id == connection_id)
                .unwrap_or_else(|| {
                    panic!("request {id} awaits no answer from `{connection_id}` (unknown_ref)")
                });
            let who = request.waiting.remove(at);
            request.answers.push(Answer {
                connection_id: who.connection_id,
                identity: who.identity,
                payload,
            });
            if request.waiting.is_empty() {
                state.requests.remove(&id)
            } else {
                None
            }
        });
        done.map(|request| self.complete(dispatch, request))
    }

    /// Times request `id` out now, whatever its timeout: its handler is called with the
    /// answers so far and the targets that did not answer in `missing`.
    ///
    /// # Panics
    /// If request `id` is not pending.
    pub fn time_out(&self, dispatch: Dispatch, id: u64) -> Fired {
        let request = with(|state| state.requests.remove(&id))
            .unwrap_or_else(|| panic!("request {id} is not pending"));
        self.complete(dispatch, request)
    }

    fn complete(&self, dispatch: Dispatch, request: MockRequest) -> Fired {
        let handler = request.handler.clone();
        let outcome = serde_json::to_value(request.outcome()).expect("an outcome serializes");
        self.fire(dispatch, "request.outcome", &handler, outcome)
    }

    /// Calls `handler` with `payload` and no origin connection, as the host calls timers and
    /// request outcomes.
    fn fire(&self, dispatch: Dispatch, ty: &str, handler: &str, payload: Value) -> Fired {
        let msg = RawMessage::json(ty, &payload).without_origin();
        let result = self
            .call(dispatch, handler, msg)
            .map(|(_, effects)| effects);
        Fired {
            handler: handler.to_owned(),
            ty: ty.to_owned(),
            payload,
            result,
        }
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
        let connection_id = msg.connection_id().to_owned();
        let identity = msg.sender().to_owned();
        let mut attempts = 0;
        let (result, effects, writes) = loop {
            attempts += 1;
            with(|state| {
                state.effects.clear();
                state.kv_pending.clear();
                state.kv_read.clear();
                state.attempts = attempts;
            });
            let result = dispatch(handler, msg.clone());
            let (effects, writes, conflicted) = with(|state| {
                // Another call's write to a key this call read lands before this one commits.
                let conflicted: Vec<String> = state
                    .kv_interleaved
                    .keys()
                    .filter(|k| state.kv_read.contains(*k))
                    .cloned()
                    .collect();
                for key in &conflicted {
                    match state.kv_interleaved.remove(key).flatten() {
                        Some(value) => state.kv.insert(key.clone(), value),
                        None => state.kv.remove(key),
                    };
                }
                (
                    std::mem::take(&mut state.effects),
                    std::mem::take(&mut state.kv_pending),
                    !conflicted.is_empty(),
                )
            });
            // As the host does: a successful call whose reads changed runs again, its effects
            // discarded.
            if result.is_ok() && conflicted && attempts < MAX_ATTEMPTS {
                continue;
            }
            if result.is_ok() && conflicted {
                return Err(PluginError::new(
                    "kv_conflict",
                    "the call's key-value writes kept conflicting",
                ));
            }
            break (result, effects, writes);
        };
        let ack = result?.map(|text| parse(&text, "ack"));
        if connection_id.is_empty()
            && let Some(effect) = effects.iter().find(|e| {
                matches!(
                    e,
                    Effect::Reply { .. } | Effect::Join { .. } | Effect::Leave { .. }
                )
            })
        {
            // As the host refuses it: there is no origin to reply to, or to join or leave.
            return Err(PluginError::new(
                "plugin_failed",
                format!("a call with no origin connection recorded {effect:?}"),
            ));
        }
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
                Effect::Schedule {
                    id,
                    handler,
                    delay_ms,
                    payload,
                } => with(|state| {
                    let timer = MockTimer {
                        id: *id,
                        handler: handler.clone(),
                        due_ms: state.now_ms.saturating_add(*delay_ms),
                        payload: payload.clone(),
                    };
                    state.timers.insert(*id, timer);
                }),
                Effect::CancelTimer { id } => with(|state| {
                    state.timers.remove(id);
                }),
                Effect::Request {
                    id,
                    connection_id: to,
                    timeout_ms,
                    handler,
                    ..
                } => with(|state| {
                    // The identity of a connection the mock knows from its rooms, else empty.
                    let who = state
                        .rooms
                        .values()
                        .flatten()
                        .find(|m| &m.connection_id == to)
                        .cloned()
                        .unwrap_or_else(|| Member::new(to.as_str(), ""));
                    open_request(state, *id, handler, None, vec![who], *timeout_ms);
                }),
                Effect::RequestRoom {
                    id,
                    room,
                    timeout_ms,
                    handler,
                    ..
                } => with(|state| {
                    let members = state.rooms.get(room).cloned().unwrap_or_default();
                    open_request(state, *id, handler, Some(room), members, *timeout_ms);
                }),
                _ => {}
            }
        }
        Ok((ack, effects))
    }
}

fn open_request(
    state: &mut State,
    id: u64,
    handler: &str,
    room: Option<&str>,
    waiting: Vec<Member>,
    timeout_ms: u64,
) {
    let request = MockRequest {
        id,
        handler: handler.to_owned(),
        room: room.map(str::to_owned),
        waiting,
        answers: Vec::new(),
        due_ms: state.now_ms.saturating_add(timeout_ms),
    };
    // A room request to an empty room completes at the next `advance`, with nobody missing
    // (the host completes it at once).
    state.requests.insert(id, request);
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
    use super::{
        Effect, MAX_DELAY_MS, MAX_PENDING, MAX_TIMEOUT_MS, State, check_room, parse, with,
    };
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

    fn check_handler(s: &State, handler: &str) -> Result<(), String> {
        match &s.handlers {
            Some(names) if !names.iter().any(|h| h == handler) => Err(format!(
                "the plugin has no handler `{handler}` (it has: {})",
                names.join(", ")
            )),
            _ => Ok(()),
        }
    }

    fn next_id(s: &mut State) -> u64 {
        s.last_id += 1;
        s.last_id
    }

    fn check_request(s: &State, ty: &str, timeout_ms: u64, handler: &str) -> Result<(), String> {
        check_handler(s, handler)?;
        if timeout_ms == 0 || timeout_ms > MAX_TIMEOUT_MS {
            return Err(format!(
                "a request timeout must be between 1 and {MAX_TIMEOUT_MS} ms, not {timeout_ms}"
            ));
        }
        if ty.is_empty() || ty.starts_with("sys.") {
            return Err(format!("message type `{ty}` is not allowed"));
        }
        let recorded = s
            .effects
            .iter()
            .filter(|e| matches!(e, Effect::Request { .. } | Effect::RequestRoom { .. }))
            .count();
        if s.requests.len() + recorded >= MAX_PENDING {
            return Err(format!(
                "the plugin has {MAX_PENDING} requests pending, the limit"
            ));
        }
        Ok(())
    }

    pub(crate) fn request(
        connection_id: &str,
        ty: &str,
        payload: &str,
        timeout_ms: u64,
        handler: &str,
    ) -> Result<u64, String> {
        let payload = parse(payload, "payload");
        with(|s| {
            check_request(s, ty, timeout_ms, handler)?;
            let id = next_id(s);
            push(
                s,
                Effect::Request {
                    id,
                    connection_id: connection_id.to_owned(),
                    ty: ty.to_owned(),
                    payload,
                    timeout_ms,
                    handler: handler.to_owned(),
                },
            );
            Ok(id)
        })
    }

    pub(crate) fn request_room(
        room: &str,
        ty: &str,
        payload: &str,
        timeout_ms: u64,
        handler: &str,
    ) -> Result<u64, String> {
        let payload = parse(payload, "payload");
        with(|s| {
            check_room(s, room)?;
            check_request(s, ty, timeout_ms, handler)?;
            let id = next_id(s);
            push(
                s,
                Effect::RequestRoom {
                    id,
                    room: room.to_owned(),
                    ty: ty.to_owned(),
                    payload,
                    timeout_ms,
                    handler: handler.to_owned(),
                },
            );
            Ok(id)
        })
    }

    pub(crate) fn schedule(handler: &str, delay_ms: u64, payload: &str) -> Result<u64, String> {
        let payload = parse(payload, "payload");
        with(|s| {
            check_handler(s, handler)?;
            if delay_ms > MAX_DELAY_MS {
                return Err(format!(
                    "a timer delay of {delay_ms} ms is longer than the limit of {MAX_DELAY_MS} ms"
                ));
            }
            let recorded = s
                .effects
                .iter()
                .filter(|e| matches!(e, Effect::Schedule { .. }))
                .count();
            if s.timers.len() + recorded >= MAX_PENDING {
                return Err(format!(
                    "the plugin has {MAX_PENDING} timers pending, the limit"
                ));
            }
            let id = next_id(s);
            push(
                s,
                Effect::Schedule {
                    id,
                    handler: handler.to_owned(),
                    delay_ms,
                    payload,
                },
            );
            Ok(id)
        })
    }

    pub(crate) fn cancel_timer(id: u64) -> bool {
        with(|s| {
            let here = s
                .effects
                .iter()
                .any(|e| matches!(e, Effect::Schedule { id: i, .. } if *i == id));
            let cancelled = s
                .effects
                .iter()
                .any(|e| matches!(e, Effect::CancelTimer { id: i } if *i == id));
            let pending = (here || s.timers.contains_key(&id)) && !cancelled;
            if pending {
                push(s, Effect::CancelTimer { id });
            }
            pending
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
        with(|s| kv_read(s, key))
    }

    pub(crate) fn kv_set(key: &str, value: &str) {
        with(|s| s.kv_pending.insert(key.to_owned(), Some(value.to_owned())));
    }

    pub(crate) fn kv_delete(key: &str) {
        with(|s| s.kv_pending.insert(key.to_owned(), None));
    }

    /// The value the running call sees under `key`; a read of the store is recorded.
    fn kv_read(s: &mut State, key: &str) -> Option<String> {
        if let Some(pending) = s.kv_pending.get(key) {
            return pending.clone();
        }
        s.kv_read.insert(key.to_owned());
        s.kv.get(key).cloned()
    }

    pub(crate) fn kv_incr(key: &str, delta: i64) -> Result<i64, String> {
        with(|s| {
            let current = match kv_read(s, key) {
                None => 0,
                Some(text) => text.parse::<i64>().map_err(|_| {
                    format!("the value under key `{key}` is not a decimal 64-bit integer")
                })?,
            };
            let sum = current.checked_add(delta).ok_or_else(|| {
                format!("{current} + {delta} under key `{key}` overflows a 64-bit integer")
            })?;
            s.kv_pending.insert(key.to_owned(), Some(sum.to_string()));
            Ok(sum)
        })
    }

    pub(crate) fn kv_compare_and_set(
        key: &str,
        expected: Option<&str>,
        value: Option<&str>,
    ) -> bool {
        with(|s| {
            if kv_read(s, key).as_deref() != expected {
                return false;
            }
            s.kv_pending
                .insert(key.to_owned(), value.map(str::to_owned));
            true
        })
    }

    pub(crate) fn config(key: &str) -> Option<String> {
        with(|s| s.config.get(key).cloned())
    }

    pub(crate) fn claims(connection_id: &str) -> Option<String> {
        with(|s| s.claims.get(connection_id).cloned())
    }

    pub(crate) fn log(level: LogLevel, message: &str) {
        with(|s| s.logs.push((level, message.to_owned())));
    }
}
