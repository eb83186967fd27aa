//! Effects: what a plugin call asked the host to do. Host functions record them during the call;
//! the router applies them afterwards, in order, to rooms, outboxes, the plugin's store, its
//! timers and its requests.

/// One recorded action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// A message to the origin connection.
    Reply {
        ty: String,
        payload: String,
    },
    /// A message to one connection.
    Send {
        to: String,
        ty: String,
        payload: String,
    },
    /// A message to every member of a room. A volatile one (typing indicators, cursors) is
    /// dropped for a member whose outbox is half full instead of counting against it.
    Broadcast {
        room: String,
        ty: String,
        payload: String,
        include_sender: bool,
        volatile: bool,
    },
    /// The origin joins a room.
    Join {
        room: String,
    },
    /// The origin leaves a room.
    Leave {
        room: String,
    },
    KvSet {
        key: String,
        value: String,
    },
    KvDelete {
        key: String,
    },
    /// A timer of the plugin: a call of `handler` with `payload` after `delay_ms`.
    Schedule {
        id: u64,
        handler: String,
        delay_ms: u64,
        payload: String,
    },
    /// Cancels the plugin's pending timer `id`.
    CancelTimer {
        id: u64,
    },
    /// A message asking for the clients' answers (`sys.reply`), sent in a frame whose
    /// `messageId` is `h-<id>`; `handler` gets the outcome.
    Request {
        id: u64,
        to: RequestTo,
        ty: String,
        payload: String,
        timeout_ms: u64,
        handler: String,
    },
}

/// Whom a request asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RequestTo {
    Connection(String),
    /// Every member of the room when the effect is applied.
    Room(String),
}

impl Effect {
    /// The bytes this effect carries.
    pub fn size(&self) -> usize {
        match self {
            Effect::Reply { ty, payload } => ty.len() + payload.len(),
            Effect::Send { to, ty, payload } => to.len() + ty.len() + payload.len(),
            Effect::Broadcast {
                room, ty, payload, ..
            } => room.len() + ty.len() + payload.len(),
            Effect::Join { room } | Effect::Leave { room } => room.len(),
            Effect::KvSet { key, value } => key.len() + value.len(),
            Effect::KvDelete { key } => key.len(),
            Effect::Schedule {
                handler, payload, ..
            } => handler.len() + payload.len(),
            Effect::CancelTimer { .. } => 0,
            Effect::Request {
                to,
                ty,
                payload,
                handler,
                ..
            } => {
                let (RequestTo::Connection(to) | RequestTo::Room(to)) = to;
                to.len() + ty.len() + payload.len() + handler.len()
            }
        }
    }

    /// The JSON payload text this effect carries, if any (checked before it reaches the wire).
    pub fn payload(&self) -> Option<&str> {
        match self {
            Effect::Reply { payload, .. }
            | Effect::Send { payload, .. }
            | Effect::Broadcast { payload, .. }
            | Effect::Schedule { payload, .. }
            | Effect::Request { payload, .. } => Some(payload),
            _ => None,
        }
    }
}

/// Levels of plugin log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Most effects one call may record; a call recording more fails.
pub const MAX_EFFECTS_PER_CALL: usize = 1024;
/// Most bytes the effects of one call may carry (types, rooms, payloads, keys and values); a
/// call recording more fails.
pub const MAX_EFFECT_BYTES_PER_CALL: usize = 4 << 20;
/// The longest key of a plugin's key-value store, in bytes.
pub const MAX_KV_KEY_BYTES: usize = 1024;
/// The largest value of a plugin's key-value store, in bytes.
pub const MAX_KV_VALUE_BYTES: usize = 1 << 20;

/// The capacity above which an emptied effect list is not kept for reuse.
const SPARE_KEEP: usize = 64;

thread_local! {
    /// An emptied effect list, kept for the next call on this thread: recording a call's first
    /// effect then costs no allocation.
    static SPARE: std::cell::Cell<Vec<Effect>> = const { std::cell::Cell::new(Vec::new()) };
}

/// An empty list to record one call's effects in (the last one given back on this thread, if
/// any, with its capacity).
pub fn list() -> Vec<Effect> {
    SPARE.take()
}

/// Gives back a call's list once its effects are applied, for the next call on this thread.
pub fn recycle(mut list: Vec<Effect>) {
    if list.capacity() <= SPARE_KEEP {
        list.clear();
        SPARE.set(list);
    }
}

#[cfg(test)]
mod tests {
    use super::{Effect, list, recycle};

    #[test]
    fn a_recycled_list_comes_back_empty_with_its_capacity() {
        let mut effects = list();
        effects.push(Effect::Join { room: "r".into() });
        let capacity = effects.capacity();
        recycle(effects);
        let again = list();
        assert!(again.is_empty());
        assert_eq!(again.capacity(), capacity);
        // Taken: the next list is a new one.
        assert_eq!(list().capacity(), 0);
    }
}
