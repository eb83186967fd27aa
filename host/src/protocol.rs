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
    let max_depth = limits.max_depth.min(MAX_JSON_DEPTH_CEILING);
    // Most frames hold too few brackets and commas to break either limit, whatever they mean:
    // counting them (strings included) is a loop the compiler vectorizes (byte counters over
    // chunks short enough not to overflow them), several times cheaper than the walk below,
    // which runs only when the counts leave the answer open.
    let (mut opens, mut commas) = (0usize, 0usize);
    for chunk in text.as_bytes().chunks(128) {
        let (mut chunk_opens, mut chunk_commas) = (0u8, 0u8);
        for &b in chunk {
            // `{` is 0x7B and `[` is 0x5B: the two bytes that are `{` with bit 0x20 set.
            chunk_opens += u8::from(b | 0x20 == b'{');
            chunk_commas += u8::from(b == b',');
        }
        opens += usize::from(chunk_opens);
        commas += usize::from(chunk_commas);
    }
    if opens <= max_depth && commas < limits.max_array {
        return Ok(());
    }
    walk_shape(text, max_depth, limits.max_array)
}

/// The walk behind [`check_shape`]: tracks the nesting and counts each open array's elements.
fn walk_shape(text: &str, max_depth: usize, max_array: usize) -> Result<(), String> {
    thread_local! {
        /// The commas seen in each open level, reused from frame to frame (a fresh array per
        /// frame would be cleared each time: a kilobyte of stores per message).
        static COMMAS: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
    }
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
                        if *count >= max_array {
                            return Err(format!(
                                "a JSON array longer than the limit of {max_array} elements"
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
        self.encode_as(0, id)
    }

    /// Serializes the frame with its `seq` first (none for 0), for the one session it is for
    /// ([`crate::session::outbox::Outbox::push_numbered`]).
    pub fn encode_numbered(&self, seq: u64) -> Frame {
        self.encode_as(seq, next_message_id())
    }

    fn encode_as(&self, seq: u64, id: u64) -> Frame {
        let head = Head {
            seq,
            ty: self.ty,
            id,
            room: self.room,
            sender: self.sender,
        };
        head.encode(self.payload.len(), |out| out.push_str(self.payload))
    }
}

/// The fields of a host frame around its payload.
struct Head<'a> {
    /// Written first when not 0.
    seq: u64,
    ty: &'a str,
    /// The number of its `messageId`, `h-<id>`.
    id: u64,
    room: Option<&'a str>,
    sender: Option<&'a str>,
}

impl Head<'_> {
    /// Serializes the frame with the payload `write_payload` writes (`payload_len` bytes of
    /// JSON text) into a buffer allocated once, at its exact size when no string needs
    /// escaping.
    fn encode(&self, payload_len: usize, write_payload: impl FnOnce(&mut String)) -> Frame {
        let mut seqs = itoa::Buffer::new();
        let seq = (self.seq != 0).then(|| seqs.format(self.seq));
        let mut ids = itoa::Buffer::new();
        let id = ids.format(self.id);
        let mut times = itoa::Buffer::new();
        let timestamp = times.format(now_ms());
        let len = r#"{"type":,"messageId":"h-","payload":,"timestamp":}"#.len()
            + seq.map_or(0, |s| r#""seq":,"#.len() + s.len())
            + json_str_len(self.ty)
            + id.len()
            + self
                .room
                .map_or(0, |r| r#","room":"#.len() + json_str_len(r))
            + payload_len
            + self
                .sender
                .map_or(0, |s| r#","sender":"#.len() + json_str_len(s))
            + timestamp.len();
        let mut out = String::with_capacity(len);
        out.push('{');
        if let Some(seq) = seq {
            out.push_str(SEQ_KEY);
            out.push_str(seq);
            out.push(',');
        }
        out.push_str("\"type\":");
        push_json_str(&mut out, self.ty);
        out.push_str(",\"messageId\":\"h-");
        out.push_str(id);
        out.push('"');
        if let Some(room) = self.room {
            out.push_str(",\"room\":");
            push_json_str(&mut out, room);
        }
        out.push_str(",\"payload\":");
        write_payload(&mut out);
        if let Some(sender) = self.sender {
            out.push_str(",\"sender\":");
            push_json_str(&mut out, sender);
        }
        out.push_str(",\"timestamp\":");
        out.push_str(timestamp);
        out.push('}');
        // A buffer whose length is its capacity becomes `Bytes` without a second allocation
        // for the shared header (and the allocator shrinks a block in place).
        if out.len() != out.capacity() {
            out.shrink_to_fit();
        }
        Utf8Bytes::from(out)
    }
}

/// Whether `s` needs escaping as a JSON string (a control character, a quote or a backslash).
fn needs_escape(s: &str) -> bool {
    // Without an early exit, the loop is vectorized: three times faster on the short
    // strings (types, identities, ids) it sees.
    s.bytes().fold(false, |bad, b| {
        bad | (b < 0x20) | (b == b'"') | (b == b'\\')
    })
}

/// The length of `s` as a JSON string when it needs no escaping (the escaped length is
/// longer: the buffer then grows once).
fn json_str_len(s: &str) -> usize {
    s.len() + 2
}

fn push_json_str(out: &mut String, s: &str) {
    if !needs_escape(s) {
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

/// `sys.ack` for `message_id`, with `extra` (a JSON object's text, if any) merged in, and its
/// `seq` first (none for 0), for [`crate::session::outbox::Outbox::push_numbered`].
///
/// `extra` is the compact JSON text of a non-empty object without `ref` (the router makes it
/// so); its fields follow `ref`.
pub fn ack(seq: u64, message_id: &str, extra: Option<&str>) -> Frame {
    let extra = extra
        .map(str::trim)
        .filter(|extra| extra.len() > 2 && extra.starts_with('{'));
    let len = r#"{"ref":}"#.len() + json_str_len(message_id) + extra.map_or(0, str::len);
    let head = Head {
        seq,
        ty: "sys.ack",
        id: next_message_id(),
        room: None,
        sender: None,
    };
    head.encode(len, |out| {
        out.push_str("{\"ref\":");
        push_json_str(out, message_id);
        match extra {
            Some(extra) => {
                out.push(',');
                out.push_str(&extra[1..]);
            }
            None => out.push('}'),
        }
    })
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

/// How a frame that carries its `seq` begins.
const SEQ_KEY: &str = "\"seq\":";

/// The frame as a session's client receives it: `body` with `"seq":seq` first, or `body` itself
/// for a volatile frame (`seq` 0) and for a frame encoded with its `seq` already
/// ([`Outbound::encode_numbered`]). The body is shared by every recipient of a broadcast; only
/// this small header is per recipient.
pub fn with_seq(seq: u64, body: &Frame) -> Frame {
    if seq == 0 || is_numbered(body) {
        debug_assert!(seq == 0 || seq_of(body) == Some(seq), "{body}");
        return body.clone();
    }
    let mut numbers = itoa::Buffer::new();
    let seq = numbers.format(seq);
    // Exactly its length, so that it becomes `Bytes` without another allocation.
    let mut out = String::with_capacity(body.len() + seq.len() + SEQ_KEY.len() + 1);
    out.push('{');
    out.push_str(SEQ_KEY);
    out.push_str(seq);
    out.push(',');
    out.push_str(&body[1..]);
    Utf8Bytes::from(out)
}

/// Whether a host frame was encoded with its `seq` ([`Outbound::encode_numbered`]).
pub fn is_numbered(frame: &str) -> bool {
    frame.as_bytes().get(1..=SEQ_KEY.len()) == Some(SEQ_KEY.as_bytes())
}

/// The `seq` a host frame was encoded with, if any.
pub fn seq_of(frame: &str) -> Option<u64> {
    split_seq(frame).map(|(seq, _)| seq)
}

/// `frame` without the `seq` it was encoded with (to be numbered anew), or `frame` itself.
pub fn without_seq(frame: Frame) -> Frame {
    let Some((_, rest)) = split_seq(&frame) else {
        return frame;
    };
    let mut out = String::with_capacity(rest.len() + 1);
    out.push('{');
    out.push_str(rest);
    Utf8Bytes::from(out)
}

/// The `seq` of a frame encoded with one, and the rest of the frame after `{"seq":N,`.
fn split_seq(frame: &str) -> Option<(u64, &str)> {
    if !is_numbered(frame) {
        return None;
    }
    let digits = &frame[1 + SEQ_KEY.len()..];
    let mut seq: u64 = 0;
    for (i, b) in digits.bytes().enumerate() {
        match b {
            b'0'..=b'9' => seq = seq.checked_mul(10)?.checked_add(u64::from(b - b'0'))?,
            b',' => return Some((seq, &digits[i + 1..])),
            _ => return None,
        }
    }
    None
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
    fn the_shape_limits_are_exact() {
        let limits = JsonLimits {
            max_depth: 4,
            max_array: 5,
        };
        // Four levels pass, five do not; five elements pass, six do not.
        assert!(check_shape("[[[{}]]]", limits).is_ok());
        assert!(check_shape("[[[[[]]]]]", limits).is_err());
        assert!(check_shape("[1,2,3,4,5]", limits).is_ok());
        assert!(check_shape("[1,2,3,4,5,6]", limits).is_err());
        // Counted, the brackets and commas of strings and objects leave the answer open; the
        // walk settles it.
        assert!(
            check_shape(
                r#"{"a":"[[[[[,,,,,,","b":1,"c":2,"d":3,"e":4,"f":5}"#,
                limits
            )
            .is_ok()
        );
    }

    proptest::proptest! {
        /// The counting shortcut answers as the walk does, on text made mostly of the bytes
        /// both look at.
        #[test]
        fn the_shortcut_agrees_with_the_walk(
            text in proptest::prop_oneof![
                // Nested brackets and commas outside strings, where the limits bite.
                "[\\[\\]{},a]{0,24}",
                // Strings too, whose brackets and commas only the count sees.
                "[\\[\\]{},\"\\\\a]{0,40}",
            ],
            max_depth in 0usize..6,
            max_array in 0usize..6,
        ) {
            let limits = JsonLimits { max_depth, max_array };
            proptest::prop_assert_eq!(
                check_shape(&text, limits).is_ok(),
                walk_shape(&text, max_depth, max_array).is_ok()
            );
        }
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
        let a = ack(0, "m\"1", Some(r#"{"members":[]}"#));
        let v: serde_json::Value = serde_json::from_str(&a).unwrap();
        assert_eq!(
            v["payload"],
            serde_json::json!({"ref": "m\"1", "members": []})
        );
        for blank in [None, Some("{}")] {
            let v: serde_json::Value = serde_json::from_str(&ack(0, "m", blank)).unwrap();
            assert_eq!(v["payload"], serde_json::json!({"ref": "m"}), "{blank:?}");
        }
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
