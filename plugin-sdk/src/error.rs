//! The error a handler returns.

use std::fmt;

/// Stable error codes the SDK itself produces. Plugins may return any other code too.
pub mod codes {
    /// The payload (or metadata) did not decode into the handler's payload type.
    pub const BAD_PAYLOAD: &str = "bad_payload";
    /// The host refused a call: the room is outside the plugin's capabilities, or similar.
    pub const FORBIDDEN: &str = "forbidden";
    /// The manifest routed a message to a handler name the plugin does not export.
    pub const UNKNOWN_HANDLER: &str = "unknown_handler";
    /// The message needs a `room` and has none.
    pub const ROOM_REQUIRED: &str = "room_required";
    /// A handler returned a result that is not a JSON object (or `null`).
    pub const BAD_RESULT: &str = "bad_result";
    /// A `[config]` value did not parse.
    pub const BAD_CONFIG: &str = "bad_config";
    /// A connection's verified claims did not decode into the type a handler asked for
    /// (`Ctx::claims`).
    pub const BAD_CLAIMS: &str = "bad_claims";
    /// A key-value value was not what the operation needs (`Ctx::kv_incr` of a value that is
    /// not a decimal `i64`, or a sum that overflows).
    pub const BAD_VALUE: &str = "bad_value";
    /// Anything else that went wrong inside the plugin (e.g. a payload failed to serialize).
    pub const INTERNAL: &str = "internal";
}

/// The error a handler returns. The host turns it into a `sys.error` frame to the origin
/// connection, with `code` and `message` passed through, and discards the effects (messages,
/// joins, leaves) the handler recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    /// A stable, machine-readable code, e.g. `unknown_command`.
    pub code: String,
    /// A human-readable message.
    pub message: String,
}

impl PluginError {
    /// An error with any code.
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            code: code.into(),
            message: message.into(),
        }
    }

    /// A `bad_payload` error.
    pub fn bad_payload(message: impl Into<String>) -> Self {
        Self::new(codes::BAD_PAYLOAD, message)
    }

    /// A `forbidden` error.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(codes::FORBIDDEN, message)
    }

    /// The `room_required` error: the message names no room.
    pub fn room_required() -> Self {
        Self::new(codes::ROOM_REQUIRED, "this message needs a `room`")
    }

    /// An `internal` error.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(codes::INTERNAL, message)
    }

    /// The `unknown_handler` error for `handler`.
    pub fn unknown_handler(handler: &str) -> Self {
        Self::new(
            codes::UNKNOWN_HANDLER,
            format!("the plugin has no handler `{handler}`"),
        )
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for PluginError {}

/// The error string a host call (`broadcast`, `join`, `leave`, `members`) failed with.
///
/// [`Ctx`](crate::Ctx) already converts it, so `?` on any `Ctx` method yields a
/// [`PluginError`] with code `forbidden` and the host's text as its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostError(pub String);

impl From<HostError> for PluginError {
    fn from(err: HostError) -> Self {
        PluginError::forbidden(err.0)
    }
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for HostError {}
