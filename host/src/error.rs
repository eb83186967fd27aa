//! Error types of the hot path, and the one place that maps each to a wire error code or a
//! WebSocket close code.

use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// The stable error codes of `sys.error` frames (see `docs/protocol.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    BadFrame,
    UnknownType,
    UnsupportedVersion,
    NotInRoom,
    RoomRequired,
    PluginFailed,
    TooLarge,
    Forbidden,
    Unavailable,
    /// A `sys.resume` that could not be honoured; the frame says why in `reason`.
    ResumeFailed,
    /// A `sys.refresh` token that does not verify; the message starts with its reason.
    BadToken,
    /// The connection is in as many rooms as it may be.
    RoomLimit,
    /// The room has as many members as it may have.
    RoomFull,
    /// The client sends faster than its message rate limit.
    RateLimited,
    /// A `sys.reply` whose `ref` names no request awaiting this connection's answer.
    UnknownRef,
    /// The plugin version kept failing and is out of service for a cool-down.
    PluginUnavailable,
    /// A plugin call's key-value writes kept conflicting with other calls' (every attempt read
    /// a key that another call changed before it could commit).
    KvConflict,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::UnsupportedVersion => "unsupported_version",
            ErrorCode::NotInRoom => "not_in_room",
            ErrorCode::RoomRequired => "room_required",
            ErrorCode::PluginFailed => "plugin_failed",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::ResumeFailed => "resume_failed",
            ErrorCode::BadToken => "bad_token",
            ErrorCode::RoomLimit => "room_limit",
            ErrorCode::RoomFull => "room_full",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::UnknownRef => "unknown_ref",
            ErrorCode::PluginUnavailable => "plugin_unavailable",
            ErrorCode::KvConflict => "kv_conflict",
        }
    }
}

/// A failure while handling one client message. Becomes one `sys.error` frame.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    #[error("{message}")]
    Host { code: ErrorCode, message: String },
    /// A plugin's own error, with its own code, passed through.
    #[error("{message}")]
    Plugin { code: String, message: String },
    /// A `sys.resume` that could not be honoured, and why (`unknown_session`, `expired`,
    /// `bad_token`, `gap`).
    #[error("{message}")]
    ResumeFailed {
        reason: &'static str,
        message: String,
    },
}

impl HandleError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        HandleError::Host {
            code,
            message: message.into(),
        }
    }

    /// The wire code and message of this error.
    pub fn wire(&self) -> (&str, &str) {
        match self {
            HandleError::Host { code, message } => (code.as_str(), message),
            HandleError::Plugin { code, message } => (code, message),
            HandleError::ResumeFailed { message, .. } => {
                (ErrorCode::ResumeFailed.as_str(), message)
            }
        }
    }
}

/// Why a plugin call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("plugin `{plugin}` ran out of time ({timeout_ms} ms)")]
    Timeout { plugin: String, timeout_ms: u64 },
    #[error("plugin `{plugin}` trapped: {reason}")]
    Trap { plugin: String, reason: String },
    #[error("plugin `{plugin}` could not be instantiated: {reason}")]
    Instantiate { plugin: String, reason: String },
    #[error("plugin `{plugin}` produced an invalid effect: {reason}")]
    BadEffect { plugin: String, reason: String },
    /// The handler returned an error of its own.
    #[error("{message}")]
    Refused { code: String, message: String },
}

impl From<CallError> for HandleError {
    fn from(err: CallError) -> Self {
        match err {
            CallError::Refused { code, message } => HandleError::Plugin { code, message },
            other => HandleError::new(ErrorCode::PluginFailed, other.to_string()),
        }
    }
}

/// A join a room rule refused: `forbidden`, naming the rule.
impl From<crate::auth::Denied> for HandleError {
    fn from(denied: crate::auth::Denied) -> Self {
        HandleError::new(ErrorCode::Forbidden, denied.to_string())
    }
}

impl From<crate::requests::ReplyError> for HandleError {
    fn from(err: crate::requests::ReplyError) -> Self {
        use crate::requests::ReplyError;
        let code = match err {
            ReplyError::UnknownRef(_) => ErrorCode::UnknownRef,
            ReplyError::AnswerTooLarge(_) | ReplyError::AnswersFull => ErrorCode::TooLarge,
        };
        HandleError::new(code, err.to_string())
    }
}

/// A plugin asked for more timers or requests than it may have, or a delay or timeout out of
/// bounds: its call's effects are refused.
impl From<crate::timers::TimerError> for HandleError {
    fn from(err: crate::timers::TimerError) -> Self {
        HandleError::new(ErrorCode::PluginFailed, err.to_string())
    }
}

impl From<crate::requests::RequestError> for HandleError {
    fn from(err: crate::requests::RequestError) -> Self {
        HandleError::new(ErrorCode::PluginFailed, err.to_string())
    }
}

/// A plugin call's key-value work that did not commit (on its last attempt, for a conflict):
/// `kv_conflict`, or `unavailable` when the cluster's store is out of reach.
impl From<crate::kv::CommitError> for HandleError {
    fn from(err: crate::kv::CommitError) -> Self {
        use crate::kv::CommitError;
        match err {
            CommitError::Conflict | CommitError::Stale | CommitError::Held => HandleError::new(
                ErrorCode::KvConflict,
                format!(
                    "the plugin's key-value writes conflicted with other calls {} times in a row; nothing was applied",
                    crate::router::MAX_CALL_ATTEMPTS
                ),
            ),
            CommitError::Unavailable(reason) => HandleError::new(
                ErrorCode::Unavailable,
                format!("the key-value store is unreachable, nothing was applied: {reason}"),
            ),
        }
    }
}

/// Why the host closes a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// The host is shutting down.
    Shutdown,
    /// The connection's outbox overflowed: the client does not read fast enough.
    SlowConsumer,
    /// A WebSocket-level protocol violation.
    Protocol,
    /// A frame above the WebSocket size limit.
    FrameTooLarge,
    /// A text frame that is not UTF-8.
    InvalidData,
    /// An internal error.
    Internal,
    /// Another connection resumed this connection's session.
    TakenOver,
    /// The client did not answer a WebSocket ping within the pong deadline.
    HeartbeatTimeout,
    /// The connection's token expired (its `exp` plus the leeway) without a `sys.refresh`.
    TokenExpired,
    /// The client kept sending at more than twice its message rate limit.
    RateLimited,
}

impl CloseReason {
    /// The WebSocket close code and reason text for this close.
    pub fn close_code(self) -> (CloseCode, &'static str) {
        match self {
            CloseReason::Shutdown => (CloseCode::Away, "host shutting down"),
            CloseReason::SlowConsumer => (CloseCode::Again, "slow consumer: outbox overflow"),
            CloseReason::Protocol => (CloseCode::Policy, "protocol violation"),
            CloseReason::FrameTooLarge => (CloseCode::Size, "frame too large"),
            CloseReason::InvalidData => (CloseCode::Invalid, "text frame is not UTF-8"),
            CloseReason::Internal => (CloseCode::Error, "internal error"),
            CloseReason::TakenOver => (
                CloseCode::from(4000),
                "session resumed on another connection",
            ),
            CloseReason::HeartbeatTimeout => (CloseCode::from(4001), "no pong within the deadline"),
            CloseReason::TokenExpired => (CloseCode::from(4401), "token expired"),
            CloseReason::RateLimited => (CloseCode::Policy, "message rate limit exceeded"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_are_the_documented_ones() {
        let code = |r: CloseReason| u16::from(r.close_code().0);
        assert_eq!(code(CloseReason::Shutdown), 1001);
        assert_eq!(code(CloseReason::SlowConsumer), 1013);
        assert_eq!(code(CloseReason::Protocol), 1008);
        assert_eq!(code(CloseReason::FrameTooLarge), 1009);
        assert_eq!(code(CloseReason::InvalidData), 1007);
        assert_eq!(code(CloseReason::Internal), 1011);
        assert_eq!(code(CloseReason::TakenOver), 4000);
        assert_eq!(code(CloseReason::HeartbeatTimeout), 4001);
        assert_eq!(code(CloseReason::TokenExpired), 4401);
        assert_eq!(code(CloseReason::RateLimited), 1008);
    }

    #[test]
    fn plugin_errors_keep_their_code() {
        let e: HandleError = CallError::Refused {
            code: "unknown_command".into(),
            message: "no".into(),
        }
        .into();
        assert_eq!(e.wire(), ("unknown_command", "no"));
        let e: HandleError = CallError::Timeout {
            plugin: "p".into(),
            timeout_ms: 5,
        }
        .into();
        assert_eq!(e.wire().0, "plugin_failed");
    }

    #[test]
    fn reply_errors_have_their_codes() {
        use crate::requests::ReplyError;
        let e: HandleError = ReplyError::UnknownRef("h-1".into()).into();
        assert_eq!(e.wire().0, "unknown_ref");
        let e: HandleError = ReplyError::AnswerTooLarge(1 << 20).into();
        assert_eq!(e.wire().0, "too_large");
        let e: HandleError = crate::timers::TimerError::TooLong(1).into();
        assert_eq!(e.wire().0, "plugin_failed");
    }
}
