//! The wire protocol v1: decoding client envelopes and encoding host frames. The only module
//! that reads or writes the wire format (see `docs/protocol.md`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::error::ErrorCode;

/// The protocol version this host speaks.
pub const PROTOCOL_VERSION: &str = "1.1";
/// The major part of [`PROTOCOL_VERSION`].
pub const PROTOCOL_MAJOR: u32 = 1;

/// A host frame, serialized once; cloning shares the bytes.
pub type Frame = Utf8Bytes;

/// A decoded client envelope. Strings borrow from the frame when they need no unescaping.
#[derive(Debug)]
pub struct Inbound<'a> {
    pub ty: std::borrow::Cow<'a, str>,
    pub message_id: Option<String>,
    pub room: Option<std::borrow::Cow<'a, str>>,
    /// The payload as JSON text; `null` when absent.
    pub payload: &'a RawValue,
    /// The metadata object as JSON text.
    pub metadata: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct Wire<'a> {
    #[serde(rename = "type", borrow)]
    ty: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "messageId", borrow, default)]
    message_id: Option<&'a RawValue>,
    #[serde(borrow, default)]
    room: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    payload: Option<&'a RawValue>,
    #[serde(borrow, default)]
    version: Option<std::borrow::Cow<'a, str>>,
    #[serde(borrow, default)]
    metadata: Option<&'a RawValue>,
}

/// Why a client frame could not be decoded. Carries the `messageId` when one could be read.
#[derive(Debug, PartialEq, Eq)]
pub struct DecodeError {
    pub code: ErrorCode,
    pub message: String,
    pub message_id: Option<String>,
}

const NULL_JSON: &str = "null";

fn null_raw() -> &'static RawValue {
    // A `&'static RawValue` for `null`, built once.
    static NULL: std::sync::OnceLock<Box<RawValue>> = std::sync::OnceLock::new();
    NULL.get_or_init(|| RawValue::from_string(NULL_JSON.to_owned()).expect("null is JSON"))
}

/// The shape a client frame's JSON may have, checked before it is parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JsonLimits {
    /// Deepest nesting of objects and arrays (at most [`MAX_JSON_DEPTH_CEILING`]).
    pub max_depth: usize,
    /// Most elements of one array.
    pub max_array: usize,
}

impl Default for JsonLimits {
    fn default() -> Self {
        JsonLimits {
            max_depth: 64,
            max_array: 10_000,
        }
    }
}

/// The highest nesting limit that can be configured.
pub const MAX_JSON_DEPTH_CEILING: usize = 128;

/// Checks the nesting depth and the array lengths of JSON text in one pass over its bytes
/// (strings skipped, nothing allocated), so that a hostile frame is refused before a parser
/// builds anything from it. Malformed JSON passes; the parser reports it.
fn check_shape(text: &str, limits: JsonLimits) -> Result<(), String> {
    thread_local! {
        /// The commas seen in each open level, reused from frame to frame (a fresh array per
        /// frame would be cleared each time: a kilobyte of stores per message).
        static COMMAS: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    let max_depth = limits.max_depth.min(MAX_JSON_DEPTH_CEILING);
    COMMAS.with_borrow_mut(|commas| {
        commas.clear();
        // Whether each open level is an array (a bit per level).
        let mut arrays: u128 = 0;
        let (mut in_string, mut escaped) = (false, false);
        for &b in text.as_bytes() {
            if in_string {
                if escaped {
                    escaped = false;
                } else if b == b'\\' {
                    escaped = true;
                } else if b == b'"' {
                    in_string = false;
                }
                continue;
            }
            match b {
                b'"' => in_string = true,
                b'{' | b'[' => {
                    let depth = commas.len();
                    if depth >= max_depth {
                        return Err(format!(
                            "JSON nested deeper than the limit of {max_depth} levels"
                        ));
                    }
                    if b == b'[' {
                        arrays |= 1 << depth;
                    } else {
                        arrays &= !(1 << depth);
                    }
                    commas.push(0);
                }
                b'}' | b']' => {
                    commas.pop();
                }
                b',' => {
                    let depth = commas.len();
                    if let Some(count) = commas.last_mut()
                        && arrays & (1 << (depth - 1)) != 0
                    {
                        *count += 1;
                        if *count >= limits.max_array {
                            return Err(format!(
                                "a JSON array longer than the limit of {} elements",
                                limits.max_array
                            ));
                        }
                    }
                }
                _ => {}
            }
        }
        Ok(())
    })
}

/// Decodes one client text frame whose JSON stays within `limits`.
pub fn decode(text: &str, limits: JsonLimits) -> Result<Inbound<'_>, DecodeError> {
    if let Err(message) = check_shape(text, limits) {
        return Err(DecodeError {
            code: ErrorCode::BadFrame,
            message,
            message_id: salvage_message_id(text),
        });
    }
    // serde would also read a struct from a JSON array; an envelope is an object.
    if !text.trim_start().starts_with('{') {
        let message = match serde_json::from_str::<serde::de::IgnoredAny>(text) {
            Ok(_) => "frame must be a JSON object".to_owned(),
            Err(err) => format!("frame is not valid JSON: {err}"),
        };
        return Err(DecodeError {
            code: ErrorCode::BadFrame,
            message,
            message_id: None,
        });
    }
    let wire: Wire<'_> = match serde_json::from_str(text) {
        Ok(wire) => wire,
        Err(err) => {
            return Err(DecodeError {
                code: ErrorCode::BadFrame,
                message: describe_json_error(text, &err),
                message_id: salvage_message_id(text),
            });
        }
    };
    let message_id = match wire.message_id.map(message_id_text).transpose() {
        Ok(id) => id,
        Err(message) => {
            return Err(DecodeError {
                code: ErrorCode::BadFrame,
                message,
                message_id: None,
            });
        }
    };
    let bad = |message: String| DecodeError {
        code: ErrorCode::BadFrame,
        message,
        message_id: message_id.clone(),
    };
    let ty = match wire.ty {
        Some(ty) if !ty.is_empty() => ty,
        Some(_) => return Err(bad("`type` must not be empty".into())),
        None => return Err(bad("missing field `type`".into())),
    };
    if let Some(version) = wire.version.as_deref() {
        check_version(version).map_err(|message| DecodeError {
            code: ErrorCode::UnsupportedVersion,
            message,
            message_id: message_id.clone(),
        })?;
    }
    if let Some(meta) = wire.metadata
        && !meta.get().trim_start().starts_with('{')
        && meta.get().trim() != NULL_JSON
    {
        return Err(bad("`metadata` must be an object".into()));
    }
    let metadata = wire.metadata.filter(|m| m.get().trim() != NULL_JSON);
    Ok(Inbound {
        ty,
        message_id,
        room: wire.room,
        payload: wire.payload.unwrap_or_else(|| null_raw()),
        metadata,
    })
}

fn message_id_text(raw: &RawValue) -> Result<String, String> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'"') => serde_json::from_str::<String>(text).map_err(|e| e.to_string()),
        Some(b'-' | b'0'..=b'9') => Ok(text.to_owned()),
        _ => Err("`messageId` must be a string or a number".into()),
    }
}

/// Reads `messageId` from a frame that failed strict decoding (or is too large to handle), so
/// the error can refer to it. Skips every other field without building values.
pub fn salvage_message_id(text: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct IdOnly<'a> {
        #[serde(rename = "messageId", borrow, default)]
        message_id: Option<&'a RawValue>,
    }
    if !text.trim_start().starts_with('{') {
        return None;
    }
    let id = serde_json::from_str::<IdOnly<'_>>(text).ok()?.message_id?;
    message_id_text(id).ok()
}

fn describe_json_error(text: &str, err: &serde_json::Error) -> String {
    use serde_json::error::Category;
    match err.classify() {
        Category::Syntax | Category::Eof => format!("frame is not valid JSON: {err}"),
        Category::Data if !text.trim_start().starts_with('{') => {
            "frame must be a JSON object".to_owned()
        }
        _ => format!("malformed envelope: {err}"),
    }
}

fn check_version(version: &str) -> Result<(), String> {
    let major = version
        .split_once('.')
        .map_or(version, |(major, _)| major)
        .parse::<u32>()
        .map_err(|_| format!("`version` must look like MAJOR.MINOR, got `{version}`"))?;
    if major > PROTOCOL_MAJOR {
        return Err(format!(
            "protocol version {version} is newer than this host's {PROTOCOL_VERSION}"
        ));
    }
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    unix_ms(SystemTime::now())
}

/// `t` in milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The next host `messageId` number. Each process starts at a random point between 2^32 and
/// 2^52 (an integer JavaScript holds exactly), so that the nodes of a cluster do not hand out
/// the same ids: two nodes that each hand out a billion share one with a probability of about
/// 1 in 2 million.
static NEXT_ID: std::sync::LazyLock<AtomicU64> = std::sync::LazyLock::new(|| {
    AtomicU64::new((1 << 32) + rand::random::<u64>() % ((1 << 52) - (1 << 33)))
});

/// A fresh number for a host `messageId` (`h-<n>`), for a frame encoded later with
/// [`Outbound::encode_with_id`] (a request's id is its frame's, known before it is sent).
pub fn next_message_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// A host frame under construction. `payload` must be valid JSON text.
#[derive(Debug, Clone, Copy)]
pub struct Outbound<'a> {
    pub ty: &'a str,
    pub room: Option<&'a str>,
    pub payload: &'a str,
    pub sender: Option<&'a str>,
}

impl Outbound<'_> {
    /// Serializes the frame, assigning it a fresh host `messageId` and a timestamp.
    pub fn encode(&self) -> Frame {
        self.encode_with_id(next_message_id())
    }

    /// Serializes the frame with the host `messageId` `h-<id>` (from [`next_message_id`]).
    pub fn encode_with_id(&self, id: u64) -> Frame {
        /// The envelope around the fields: keys, quotes, an id and a timestamp of 20 digits
        /// each at most. Sized so that the buffer is allocated once.
        const ENVELOPE: usize = 128;
        let mut numbers = itoa::Buffer::new();
        let mut out = String::with_capacity(
            ENVELOPE
                + self.ty.len()
                + self.payload.len()
                + self.room.map_or(0, str::len)
                + self.sender.map_or(0, str::len),
        );
        out.push_str("{\"type\":");
        push_json_str(&mut out, self.ty);
        out.push_str(",\"messageId\":\"h-");
        out.push_str(numbers.format(id));
        out.push('"');
        if let Some(room) = self.room {
            out.push_str(",\"room\":");
            push_json_str(&mut out, room);
        }
        out.push_str(",\"payload\":");
        out.push_str(self.payload);
        if let Some(sender) = self.sender {
            out.push_str(",\"sender\":");
            push_json_str(&mut out, sender);
        }
        out.push_str(",\"timestamp\":");
        out.push_str(numbers.format(now_ms()));
        out.push('}');
        // A buffer whose length is its capacity becomes `Bytes` without a second allocation
        // for the shared header (and the allocator shrinks a block in place).
        out.shrink_to_fit();
        Utf8Bytes::from(out)
    }
}

fn push_json_str(out: &mut String, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push('"');
        out.push_str(s);
        out.push('"');
    } else {
        // serde_json's string escaping cannot fail for a `str`.
        out.push_str(&serde_json::to_string(s).unwrap_or_else(|_| "\"\"".into()));
    }
}

/// A host-originated frame (no sender) with a payload built from a JSON value.
pub fn host_frame(ty: &str, room: Option<&str>, payload: &serde_json::Value) -> Frame {
    Outbound {
        ty,
        room,
        payload: &payload.to_string(),
        sender: None,
    }
    .encode()
}

/// `sys.ack` for `message_id`, with `extra` (a JSON object's text, if any) merged in.
///
/// `extra` is the compact JSON text of a non-empty object without `ref` (the router makes it
/// so); its fields follow `ref`.
pub fn ack(message_id: &str, extra: Option<&str>) -> Frame {
    let mut payload = String::with_capacity(16 + message_id.len());
    payload.push_str("{\"ref\":");
    push_json_str(&mut payload, message_id);
    if let Some(extra) = extra.map(str::trim)
        && extra.len() > 2
        && extra.starts_with('{')
    {
        payload.push(',');
        payload.push_str(&extra[1..]);
    } else {
        payload.push('}');
    }
    Outbound {
        ty: "sys.ack",
        room: None,
        payload: &payload,
        sender: None,
    }
    .encode()
}

/// `sys.error` with a stable code, a message, and the `messageId` it refers to.
pub fn error(message_id: Option<&str>, code: &str, message: &str) -> Frame {
    let mut payload = String::with_capacity(48 + message.len());
    payload.push('{');
    if let Some(id) = message_id {
        payload.push_str("\"ref\":");
        push_json_str(&mut payload, id);
        payload.push(',');
    }
    payload.push_str("\"code\":");
    push_json_str(&mut payload, code);
    payload.push_str(",\"message\":");
    push_json_str(&mut payload, message);
    payload.push('}');
    Outbound {
        ty: "sys.error",
        room: None,
        payload: &payload,
        sender: None,
    }
    .encode()
}

/// The frame as a session's client receives it: `body` with `"seq":seq` first, or `body` itself
/// for a volatile frame (`seq` 0). The body is shared by every recipient of a broadcast; only
/// this small header is per recipient.
pub fn with_seq(seq: u64, body: &Frame) -> Frame {
    if seq == 0 {
        return body.clone();
    }
    let mut numbers = itoa::Buffer::new();
    let seq = numbers.format(seq);
    let mut out = String::with_capacity(body.len() + seq.len() + 8);
    out.push_str("{\"seq\":");
    out.push_str(seq);
    out.push(',');
    out.push_str(&body[1..]);
    Utf8Bytes::from(out)
}

/// `sys.error` with code `resume_failed` and the `reason` (see `docs/protocol.md`).
pub fn resume_failed(message_id: Option<&str>, reason: &str, message: &str) -> Frame {
    let mut payload = serde_json::json!({
        "code": ErrorCode::ResumeFailed.as_str(),
        "reason": reason,
        "message": message,
    });
    if let Some(id) = message_id {
        payload["ref"] = id.into();
    }
    host_frame("sys.error", None, &payload)
}

/// The payload of `sys.resume`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResumeRequest {
    pub session_id: String,
    pub resume_token: String,
    pub last_seq: u64,
}

/// Reads a `sys.resume` payload.
pub fn payload_resume(payload: &RawValue) -> Result<ResumeRequest, String> {
    serde_json::from_str(payload.get()).map_err(|e| {
        format!("`sys.resume` needs {{\"sessionId\", \"resumeToken\", \"lastSeq\"}}: {e}")
    })
}

/// Reads the `seq` of a `sys.received` payload (`{"seq": N}`).
pub fn payload_seq(payload: &RawValue) -> Result<u64, String> {
    #[derive(Deserialize)]
    struct Received {
        seq: u64,
    }
    serde_json::from_str::<Received>(payload.get())
        .map(|r| r.seq)
        .map_err(|e| format!("`sys.received` needs {{\"seq\": N}}: {e}"))
}

/// Reads the `token` of a `sys.refresh` payload (`{"token": "..."}`).
pub fn payload_token(payload: &RawValue) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Refresh {
        token: String,
    }
    serde_json::from_str::<Refresh>(payload.get())
        .map(|r| r.token)
        .map_err(|e| format!("`sys.refresh` needs {{\"token\": \"...\"}}: {e}"))
}

/// Reads the `status` of a `sys.status` payload (`{"status": "..."}`; null clears it).
pub fn payload_status(payload: &RawValue) -> Result<Option<String>, String> {
    #[derive(Deserialize)]
    struct Status {
        status: Option<String>,
    }
    serde_json::from_str::<Status>(payload.get())
        .map(|s| s.status)
        .map_err(|e| format!("`sys.status` needs {{\"status\": \"...\"}}: {e}"))
}

/// Reads a `sys.reply` payload (`{"ref": "h-<n>", "payload": ...}`): the `messageId` of the
/// host frame answered, and the answer (`null` when absent).
pub fn payload_reply(payload: &RawValue) -> Result<(String, &RawValue), String> {
    #[derive(Deserialize)]
    struct Reply<'a> {
        #[serde(rename = "ref")]
        reference: String,
        #[serde(borrow, default)]
        payload: Option<&'a RawValue>,
    }
    serde_json::from_str::<Reply<'_>>(payload.get())
        .map(|r| (r.reference, r.payload.unwrap_or_else(|| null_raw())))
        .map_err(|e| format!("`sys.reply` needs {{\"ref\", \"payload\"}}: {e}"))
}

/// Checks that `text` is one valid JSON value (for payloads coming from plugins).
pub fn validate_json(text: &str) -> Result<(), String> {
    serde_json::from_str::<&RawValue>(text)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// Reads the `room` of a `sys.join`/`sys.leave` payload (`{"room": "..."}`).
pub fn payload_room(payload: &RawValue) -> Option<String> {
    #[derive(Deserialize)]
    struct RoomPayload {
        room: Option<String>,
    }
    serde_json::from_str::<RoomPayload>(payload.get())
        .ok()?
        .room
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_default(text: &str) -> Result<Inbound<'_>, DecodeError> {
        decode(text, JsonLimits::default())
    }

    #[test]
    fn the_shape_of_json_is_bounded_before_parsing() {
        let limits = JsonLimits {
            max_depth: 3,
            max_array: 3,
        };
        let ok = r#"{"type":"x","payload":[[1,2,3],{"a":"[[[[,,,,"}]}"#;
        assert!(decode(ok, limits).is_ok());
        let deep = r#"{"type":"x","messageId":"m","payload":[[[1]]]}"#;
        let err = decode(deep, limits).unwrap_err();
        assert_eq!(err.code, ErrorCode::BadFrame);
        assert!(err.message.contains("nested deeper"), "{}", err.message);
        assert_eq!(err.message_id.as_deref(), Some("m"));
        let long = r#"{"type":"x","payload":[1,2,3,4]}"#;
        assert!(decode(long, limits).unwrap_err().message.contains("array"));
        // Commas of objects and strings do not count.
        assert!(decode(r#"{"type":"x","a":1,"b":2,"c":3,"d":"a,b,c,d"}"#, limits).is_ok());
        // Far deeper than the parser's own limit: refused by the limit, not by the parser.
        let hostile = format!("{}{}", "[".repeat(20_000), "]".repeat(20_000));
        let err = decode_default(&hostile).unwrap_err();
        assert!(err.message.contains("nested deeper"), "{}", err.message);
    }

    #[test]
    fn decodes_minimal_envelope() {
        let m = decode_default(r#"{"type":"echo"}"#).unwrap();
        assert_eq!(m.ty, "echo");
        assert_eq!(m.payload.get(), "null");
        assert!(m.message_id.is_none());
    }

    #[test]
    fn decodes_full_envelope_and_ignores_unknown_fields() {
        let m = decode_default(
            r#"{"type":"chat.send","messageId":7,"room":"lobby","payload":{"text":"hi"},"version":"1.3","metadata":{"a":1},"future":true}"#,
        )
        .unwrap();
        assert_eq!(m.message_id.as_deref(), Some("7"));
        assert_eq!(m.room.as_deref(), Some("lobby"));
        assert_eq!(m.payload.get(), r#"{"text":"hi"}"#);
        assert_eq!(m.metadata.unwrap().get(), r#"{"a":1}"#);
    }

    #[test]
    fn bad_frames() {
        for (text, code) in [
            ("not json", ErrorCode::BadFrame),
            ("[1,2]", ErrorCode::BadFrame),
            (r#"["echo"]"#, ErrorCode::BadFrame),
            (r#"{"payload":1}"#, ErrorCode::BadFrame),
            (r#"{"type":5}"#, ErrorCode::BadFrame),
            (r#"{"type":""}"#, ErrorCode::BadFrame),
            (
                r#"{"type":"x","version":"2.0"}"#,
                ErrorCode::UnsupportedVersion,
            ),
            (r#"{"type":"x","metadata":3}"#, ErrorCode::BadFrame),
        ] {
            assert_eq!(decode_default(text).unwrap_err().code, code, "{text}");
        }
    }

    #[test]
    fn keeps_message_id_of_bad_frames() {
        let err = decode_default(r#"{"messageId":"m1","type":5}"#).unwrap_err();
        assert_eq!(err.message_id.as_deref(), Some("m1"));
        let err = decode_default(r#"{"messageId":"m2"}"#).unwrap_err();
        assert_eq!(err.message_id.as_deref(), Some("m2"));
        let big = format!(
            r#"{{"type":"echo","messageId":"m3","payload":"{}"}}"#,
            "x".repeat(5000)
        );
        assert_eq!(salvage_message_id(&big).as_deref(), Some("m3"));
    }

    #[test]
    fn encodes_valid_json() {
        let f = Outbound {
            ty: "t\"x",
            room: Some("r\n"),
            payload: "[1]",
            sender: Some("s"),
        }
        .encode();
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v["type"], "t\"x");
        assert_eq!(v["room"], "r\n");
        assert_eq!(v["payload"], serde_json::json!([1]));
        assert!(v["messageId"].as_str().unwrap().starts_with("h-"));
        let a = ack("m\"1", Some(r#"{"members":[]}"#));
        let v: serde_json::Value = serde_json::from_str(&a).unwrap();
        assert_eq!(
            v["payload"],
            serde_json::json!({"ref": "m\"1", "members": []})
        );
        let s = with_seq(42, &a);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["seq"], 42);
        assert_eq!(v["type"], "sys.ack");
        assert_eq!(with_seq(0, &a), a);
        let e = error(None, "bad_frame", "no");
        let v: serde_json::Value = serde_json::from_str(&e).unwrap();
        assert_eq!(
            v["payload"],
            serde_json::json!({"code": "bad_frame", "message": "no"})
        );
    }
}
