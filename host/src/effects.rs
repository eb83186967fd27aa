//! Effects: what a plugin call asked the host to do. Host functions record them during the call;
//! the router applies them afterwards, in order, to rooms, outboxes and the plugin's store.

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
    /// A message to every member of a room.
    Broadcast {
        room: String,
        ty: String,
        payload: String,
        include_sender: bool,
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
}

impl Effect {
    /// The JSON payload text this effect carries, if any (checked before it reaches the wire).
    pub fn payload(&self) -> Option<&str> {
        match self {
            Effect::Reply { payload, .. }
            | Effect::Send { payload, .. }
            | Effect::Broadcast { payload, .. } => Some(payload),
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
