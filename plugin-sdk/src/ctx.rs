//! What a handler can do: the host calls, typed.

use std::time::Duration;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::{HostError, PluginError, host};

/// A member of a room.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Member {
    /// The member's connection.
    pub connection_id: String,
    /// The identity the host assigned to that connection.
    pub identity: String,
}

impl Member {
    /// A member.
    pub fn new(connection_id: impl Into<String>, identity: impl Into<String>) -> Self {
        Self {
            connection_id: connection_id.into(),
            identity: identity.into(),
        }
    }
}

/// The outcome of a request made with [`Ctx::request`] or [`Ctx::request_room`]: the payload
/// of the call of the handler the request named (take it as `Message<RequestOutcome>`). The
/// call has no origin connection.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestOutcome {
    /// The id the request call returned.
    pub request_id: u64,
    /// The room of a room request; `None` for a request to one connection.
    pub room: Option<String>,
    /// The answers, in the order they arrived.
    pub answers: Vec<Answer>,
    /// The targets that did not answer within the timeout (or were gone).
    pub missing: Vec<Member>,
}

impl RequestOutcome {
    /// Whether some target did not answer in time.
    pub fn timed_out(&self) -> bool {
        !self.missing.is_empty()
    }

    /// The answer of connection `connection_id`, if it answered.
    pub fn answer_of(&self, connection_id: &str) -> Option<&serde_json::Value> {
        self.answers
            .iter()
            .find(|a| a.connection_id == connection_id)
            .map(|a| &a.payload)
    }
}

/// One client's answer to a request (its `sys.reply` payload).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Answer {
    /// The connection that answered.
    pub connection_id: String,
    /// Its identity.
    pub identity: String,
    /// What it answered.
    pub payload: serde_json::Value,
}

/// A timer's id, returned by [`Ctx::schedule`], for [`Ctx::cancel_timer`].
pub type TimerId = u64;

/// A request's id, returned by [`Ctx::request`] and [`Ctx::request_room`]; the outcome's
/// `request_id`.
pub type RequestId = u64;

/// Milliseconds of a duration, for the host (saturating).
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The level of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LogLevel {
    /// Very detailed tracing.
    Trace,
    /// Debugging detail.
    Debug,
    /// Normal operation.
    Info,
    /// Something unexpected, handled.
    Warn,
    /// Something failed.
    Error,
}

/// The handle a handler gets to the host.
///
/// Messages sent, joins and leaves are *effects*: the host applies them, in order, after the
/// handler returns `Ok`, and discards them when it returns `Err` (or traps). Reads (`members`,
/// `kv_get`, `config`) happen immediately; a `kv_get` sees the `kv_set`s the same call made
/// before it.
///
/// A call's key-value work is serializable: when a key it read changed before its writes
/// committed, the host discards everything the call recorded and runs the handler again. Keep
/// state in the key-value store, never in statics: a handler may run more than once per message.
///
/// Every method returning `Result` fails with a [`PluginError`], so `?` works in a handler:
/// host refusals (a room outside the plugin's capabilities) have code `forbidden`, a payload
/// that does not serialize has code `internal`.
#[derive(Debug)]
pub struct Ctx {
    _private: (),
}

fn to_json<P: Serialize + ?Sized>(payload: &P) -> Result<String, PluginError> {
    serde_json::to_string(payload)
        .map_err(|e| PluginError::internal(format!("payload does not serialize: {e}")))
}

fn host_result<T>(result: Result<T, String>) -> Result<T, PluginError> {
    result.map_err(|e| PluginError::from(HostError(e)))
}

impl Ctx {
    pub(crate) fn new() -> Self {
        Self { _private: () }
    }

    // ---- messaging ----

    /// Sends a message of type `ty` to the origin connection.
    pub fn reply<P: Serialize + ?Sized>(&self, ty: &str, payload: &P) -> Result<(), PluginError> {
        self.reply_raw(ty, &to_json(payload)?);
        Ok(())
    }

    /// Sends a message to the origin connection with `payload_json` as its payload, verbatim.
    /// `payload_json` must be valid JSON text.
    pub fn reply_raw(&self, ty: &str, payload_json: &str) {
        host::reply(ty, payload_json);
    }

    /// Sends a message of type `ty` to the connection `connection_id`.
    pub fn send<P: Serialize + ?Sized>(
        &self,
        connection_id: &str,
        ty: &str,
        payload: &P,
    ) -> Result<(), PluginError> {
        self.send_raw(connection_id, ty, &to_json(payload)?);
        Ok(())
    }

    /// Sends `payload_json` (valid JSON text, verbatim) to the connection `connection_id`.
    pub fn send_raw(&self, connection_id: &str, ty: &str, payload_json: &str) {
        host::send(connection_id, ty, payload_json);
    }

    /// Sends a message of type `ty` to every member of `room`, the origin connection included.
    pub fn broadcast<P: Serialize + ?Sized>(
        &self,
        room: &str,
        ty: &str,
        payload: &P,
    ) -> Result<(), PluginError> {
        self.broadcast_raw(room, ty, &to_json(payload)?)
    }

    /// Sends a message of type `ty` to every member of `room` but the origin connection.
    pub fn broadcast_others<P: Serialize + ?Sized>(
        &self,
        room: &str,
        ty: &str,
        payload: &P,
    ) -> Result<(), PluginError> {
        self.broadcast_others_raw(room, ty, &to_json(payload)?)
    }

    /// [`Ctx::broadcast`] with `payload_json` (valid JSON text) sent verbatim.
    pub fn broadcast_raw(
        &self,
        room: &str,
        ty: &str,
        payload_json: &str,
    ) -> Result<(), PluginError> {
        host_result(host::broadcast(room, ty, payload_json, true))
    }

    /// [`Ctx::broadcast_others`] with `payload_json` (valid JSON text) sent verbatim.
    pub fn broadcast_others_raw(
        &self,
        room: &str,
        ty: &str,
        payload_json: &str,
    ) -> Result<(), PluginError> {
        host_result(host::broadcast(room, ty, payload_json, false))
    }

    /// Sends a volatile message of type `ty` to every member of `room` (the origin connection
    /// too when `include_sender`): a typing indicator, a cursor move, a tick, which a member
    /// can do without. A member too slow to keep up does not get it, and is not closed for it.
    pub fn broadcast_volatile<P: Serialize + ?Sized>(
        &self,
        room: &str,
        ty: &str,
        payload: &P,
        include_sender: bool,
    ) -> Result<(), PluginError> {
        host_result(host::broadcast_volatile(
            room,
            ty,
            &to_json(payload)?,
            include_sender,
        ))
    }

    /// Sends a message of type `ty` to the connection `connection_id` and asks for the
    /// client's answer (a `sys.reply` naming the frame's `messageId`). The plugin's handler
    /// `handler` is called once, with no origin connection, with a [`RequestOutcome`]: the
    /// answer, or the connection in `missing` after `timeout` (or as soon as the connection
    /// is gone: its session ended). Returns the request's id. An effect: nothing is sent, and no outcome comes,
    /// when the handler fails.
    ///
    /// Fails (code `forbidden`) when `handler` is not one of the plugin's handlers, `timeout`
    /// is zero or longer than 5 minutes, or the plugin has 10,000 requests pending.
    pub fn request<P: Serialize + ?Sized>(
        &self,
        connection_id: &str,
        ty: &str,
        payload: &P,
        timeout: Duration,
        handler: &str,
    ) -> Result<RequestId, PluginError> {
        host_result(host::request(
            connection_id,
            ty,
            &to_json(payload)?,
            millis(timeout),
            handler,
        ))
    }

    /// Like [`Ctx::request`], to every member of `room` (the origin connection included): the
    /// handler is called once, when every member answered or when `timeout` passed, with the
    /// answers gathered and the members that did not answer.
    pub fn request_room<P: Serialize + ?Sized>(
        &self,
        room: &str,
        ty: &str,
        payload: &P,
        timeout: Duration,
        handler: &str,
    ) -> Result<RequestId, PluginError> {
        host_result(host::request_room(
            room,
            ty,
            &to_json(payload)?,
            millis(timeout),
            handler,
        ))
    }

    // ---- timers ----

    /// Schedules a call of the plugin's handler `handler` after `delay`, with `payload`. The
    /// call has no origin connection (its message's type is `timer`) and runs on whichever
    /// version of the plugin serves when it is due; a version without `handler` drops it.
    /// Returns the timer's id. An effect: the timer exists only once the handler returns `Ok`.
    ///
    /// Fails (code `forbidden`) when `handler` is not one of the plugin's handlers, `delay` is
    /// longer than 24 hours, or the plugin has 10,000 timers pending.
    pub fn schedule<P: Serialize + ?Sized>(
        &self,
        handler: &str,
        delay: Duration,
        payload: &P,
    ) -> Result<TimerId, PluginError> {
        host_result(host::schedule(handler, millis(delay), &to_json(payload)?))
    }

    /// Cancels the plugin's pending timer `id` (applied when the handler returns `Ok`).
    /// Returns whether it was pending.
    pub fn cancel_timer(&self, id: TimerId) -> bool {
        host::cancel_timer(id)
    }

    // ---- rooms ----

    /// Makes the origin connection join `room` (applied after the handler returns `Ok`).
    pub fn join(&self, room: &str) -> Result<(), PluginError> {
        host_result(host::join(room))
    }

    /// Makes the origin connection leave `room` (applied after the handler returns `Ok`).
    pub fn leave(&self, room: &str) -> Result<(), PluginError> {
        host_result(host::leave(room))
    }

    /// The current members of `room`.
    pub fn members(&self, room: &str) -> Result<Vec<Member>, PluginError> {
        host_result(host::members(room))
    }

    // ---- kv ----

    /// The value stored under `key` in the plugin's key-value store.
    pub fn kv_get(&self, key: &str) -> Option<String> {
        host::kv_get(key)
    }

    /// Stores `value` under `key`.
    pub fn kv_set(&self, key: &str, value: &str) {
        host::kv_set(key, value);
    }

    /// Deletes `key`.
    pub fn kv_delete(&self, key: &str) {
        host::kv_delete(key);
    }

    /// Adds `delta` to the integer stored under `key` (decimal text; an absent key counts as 0),
    /// stores the sum and returns it (since 0.3.4). A value that is not a decimal `i64`, or a
    /// sum that overflows, fails with code `bad_value` and changes nothing.
    ///
    /// Like every read, it makes the call's writes depend on `key`: if another call changes
    /// `key` before this call's writes commit, the call runs again with the new value.
    pub fn kv_incr(&self, key: &str, delta: i64) -> Result<i64, PluginError> {
        host::kv_incr(key, delta).map_err(|e| PluginError::new(crate::codes::BAD_VALUE, e))
    }

    /// Stores `value` under `key` (`None`: deletes it) if the value there now is `expected`
    /// (`None`: the key is absent), and returns true; otherwise changes nothing and returns
    /// false (since 0.3.4).
    pub fn kv_compare_and_set(
        &self,
        key: &str,
        expected: Option<&str>,
        value: Option<&str>,
    ) -> bool {
        host::kv_compare_and_set(key, expected, value)
    }

    /// The value stored under `key`, decoded from JSON. A value that does not decode is an
    /// `internal` error.
    pub fn kv_get_json<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, PluginError> {
        match self.kv_get(key) {
            None => Ok(None),
            Some(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
                PluginError::internal(format!("kv value `{key}` does not decode: {e}"))
            }),
        }
    }

    /// Stores `value` as JSON under `key`.
    pub fn kv_set_json<T: Serialize + ?Sized>(
        &self,
        key: &str,
        value: &T,
    ) -> Result<(), PluginError> {
        self.kv_set(key, &to_json(value)?);
        Ok(())
    }

    // ---- config ----

    /// The `[config]` value `key` of the plugin's manifest.
    pub fn config(&self, key: &str) -> Option<String> {
        host::config(key)
    }

    /// The `[config]` value `key`, parsed; a value that does not parse is a `bad_config` error.
    pub fn config_parse<T>(&self, key: &str) -> Result<Option<T>, PluginError>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        match self.config(key) {
            None => Ok(None),
            Some(text) => text.trim().parse().map(Some).map_err(|e| {
                PluginError::new(
                    crate::codes::BAD_CONFIG,
                    format!("config `{key}` = {text:?} does not parse: {e}"),
                )
            }),
        }
    }

    // ---- identity ----

    /// The verified claims of connection `connection_id`'s token, decoded from JSON into `T`
    /// (`serde_json::Value`, a map, or a struct of the claims the plugin needs): `sub`, `exp`
    /// and every other claim as signed. `None` for a guest (no token), a development identity,
    /// or a connection the host does not know. Claims that do not decode into `T` are a
    /// `bad_claims` error. Imports the `identity` interface: grant it in the manifest (since
    /// 0.3.3).
    ///
    /// The claims are the host's, never the client's: use them to decide what a connection
    /// may do (`msg.connection_id()` is the origin's).
    pub fn claims<T: DeserializeOwned>(
        &self,
        connection_id: &str,
    ) -> Result<Option<T>, PluginError> {
        match self.claims_raw(connection_id) {
            None => Ok(None),
            Some(text) => serde_json::from_str(&text).map(Some).map_err(|e| {
                PluginError::new(
                    crate::codes::BAD_CLAIMS,
                    format!("the claims of `{connection_id}` do not decode: {e}"),
                )
            }),
        }
    }

    /// [`Ctx::claims`] as the JSON text of an object, not parsed.
    pub fn claims_raw(&self, connection_id: &str) -> Option<String> {
        host::claims(connection_id)
    }

    // ---- logging ----

    /// Writes `message` to the host's log, tagged with the plugin id.
    pub fn log(&self, level: LogLevel, message: impl AsRef<str>) {
        host::log(level, message.as_ref());
    }

    /// Logs at `trace` level.
    pub fn log_trace(&self, message: impl AsRef<str>) {
        self.log(LogLevel::Trace, message);
    }

    /// Logs at `debug` level.
    pub fn log_debug(&self, message: impl AsRef<str>) {
        self.log(LogLevel::Debug, message);
    }

    /// Logs at `info` level.
    pub fn log_info(&self, message: impl AsRef<str>) {
        self.log(LogLevel::Info, message);
    }

    /// Logs at `warn` level.
    pub fn log_warn(&self, message: impl AsRef<str>) {
        self.log(LogLevel::Warn, message);
    }

    /// Logs at `error` level.
    pub fn log_error(&self, message: impl AsRef<str>) {
        self.log(LogLevel::Error, message);
    }
}
