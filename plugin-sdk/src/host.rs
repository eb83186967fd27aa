//! The host calls behind [`Ctx`](crate::Ctx): the component's imports on `wasm32`, the
//! thread-local mock of [`testing`](crate::testing) everywhere else.

#[cfg(target_arch = "wasm32")]
pub(crate) use wasm::*;

#[cfg(not(target_arch = "wasm32"))]
pub(crate) use crate::testing::host::*;

#[cfg(target_arch = "wasm32")]
mod wasm {
    use crate::bindings::plexus::plugin::types::LogLevel as WitLogLevel;
    use crate::bindings::plexus::plugin::{
        config as wit_config, identity, kv, logging, messaging, rooms, timers,
    };
    use crate::{LogLevel, Member};

    #[inline]
    pub(crate) fn reply(ty: &str, payload: &str) {
        messaging::reply(ty, payload);
    }

    #[inline]
    pub(crate) fn send(connection_id: &str, ty: &str, payload: &str) {
        messaging::send(connection_id, ty, payload);
    }

    #[inline]
    pub(crate) fn broadcast(
        room: &str,
        ty: &str,
        payload: &str,
        include_sender: bool,
    ) -> Result<(), String> {
        messaging::broadcast(room, ty, payload, include_sender)
    }

    #[inline]
    pub(crate) fn broadcast_volatile(
        room: &str,
        ty: &str,
        payload: &str,
        include_sender: bool,
    ) -> Result<(), String> {
        messaging::broadcast_volatile(room, ty, payload, include_sender)
    }

    pub(crate) fn request(
        connection_id: &str,
        ty: &str,
        payload: &str,
        timeout_ms: u64,
        handler: &str,
    ) -> Result<u64, String> {
        messaging::request(connection_id, ty, payload, timeout_ms, handler)
    }

    pub(crate) fn request_room(
        room: &str,
        ty: &str,
        payload: &str,
        timeout_ms: u64,
        handler: &str,
    ) -> Result<u64, String> {
        messaging::request_room(room, ty, payload, timeout_ms, handler)
    }

    pub(crate) fn schedule(handler: &str, delay_ms: u64, payload: &str) -> Result<u64, String> {
        timers::schedule(handler, delay_ms, payload)
    }

    pub(crate) fn cancel_timer(id: u64) -> bool {
        timers::cancel(id)
    }

    pub(crate) fn join(room: &str) -> Result<(), String> {
        rooms::join(room)
    }

    pub(crate) fn leave(room: &str) -> Result<(), String> {
        rooms::leave(room)
    }

    pub(crate) fn members(room: &str) -> Result<Vec<Member>, String> {
        rooms::members(room).map(|members| {
            members
                .into_iter()
                .map(|m| Member {
                    connection_id: m.connection_id,
                    identity: m.identity,
                })
                .collect()
        })
    }

    pub(crate) fn kv_get(key: &str) -> Option<String> {
        kv::get(key)
    }

    pub(crate) fn kv_set(key: &str, value: &str) {
        kv::set(key, value);
    }

    pub(crate) fn kv_delete(key: &str) {
        kv::delete(key);
    }

    pub(crate) fn kv_incr(key: &str, delta: i64) -> Result<i64, String> {
        kv::incr(key, delta)
    }

    pub(crate) fn kv_compare_and_set(
        key: &str,
        expected: Option<&str>,
        value: Option<&str>,
    ) -> bool {
        kv::compare_and_set(key, expected, value)
    }

    pub(crate) fn config(key: &str) -> Option<String> {
        wit_config::get(key)
    }

    pub(crate) fn claims(connection_id: &str) -> Option<String> {
        identity::claims(connection_id)
    }

    pub(crate) fn log(level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Trace => WitLogLevel::Trace,
            LogLevel::Debug => WitLogLevel::Debug,
            LogLevel::Info => WitLogLevel::Info,
            LogLevel::Warn => WitLogLevel::Warn,
            LogLevel::Error => WitLogLevel::Error,
        };
        logging::log(level, message);
    }
}
