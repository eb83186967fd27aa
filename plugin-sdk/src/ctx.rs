//! What a handler can do: the host calls, typed.

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
