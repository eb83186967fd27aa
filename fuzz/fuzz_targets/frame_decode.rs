//! The client frame decoder, as the router runs it on a text frame (`router::handle_text`):
//! the `messageId` salvage of the too-large and rate-limited paths, then `protocol::decode`
//! (the JSON depth and array pre-check, then the envelope), then the frames the host answers
//! with. Properties:
//!
//! - decoding never panics, and fails only with `bad_frame` or `unsupported_version`;
//! - a frame within the JSON limits is never refused by the pre-check, and a frame that
//!   decodes is within them;
//! - a decoded envelope says what the JSON says (`type`, `messageId`, `room`, `payload`,
//!   `metadata`), and carries the `messageId` the salvage reads;
//! - every frame the host would answer with (`sys.error`, `sys.ack`, `sys.pong`, an echo, the
//!   same with `seq`) is one valid JSON object whose fields are what was put in.

#![no_main]

use libfuzzer_sys::fuzz_target;
use plexus::error::ErrorCode;
use plexus::protocol::{self, Frame, JsonLimits, Outbound};
use serde::Deserialize;
use serde_json::Value;
use serde_json::value::RawValue;

fuzz_target!(|data: &[u8]| {
    // The router only sees text frames, and a text frame is UTF-8 (tungstenite closes with
    // 1007 otherwise).
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The too-large and rate-limited paths read the id from the raw frame, before any check.
    let salvaged = protocol::salvage_message_id(text);
    check_error(
        &protocol::error(salvaged.as_deref(), "too_large", "frame too large"),
        salvaged.as_deref(),
        "too_large",
        "frame too large",
    );
    // The JSON as a tree and its shape, when serde_json's own nesting limit (127) allows.
    let tree = serde_json::from_str::<Value>(text).ok();
    let shape = serde_json::from_str::<Shape>(text).ok();
    let n = text.len();
    for limits in [
        JsonLimits::default(),
        // Small limits, varied by the input, so that both limits are reached often.
        JsonLimits {
            max_depth: 1 + n % 7,
            max_array: 1 + (n / 7) % 5,
        },
        // The highest depth a configuration can set, with arrays of one element.
        JsonLimits {
            max_depth: protocol::MAX_JSON_DEPTH_CEILING,
            max_array: 1,
        },
    ] {
        check_decode(text, limits, tree.as_ref(), shape, salvaged.as_deref());
    }
});

fn check_decode(
    text: &str,
    limits: JsonLimits,
    tree: Option<&Value>,
    shape: Option<Shape>,
    salvaged: Option<&str>,
) {
    let within = shape.map(|s| s.depth <= limits.max_depth && s.array <= limits.max_array);
    match protocol::decode(text, limits) {
        Err(e) => {
            assert!(
                matches!(e.code, ErrorCode::BadFrame | ErrorCode::UnsupportedVersion),
                "{e:?}"
            );
            assert!(!e.message.is_empty());
            let shape_refusal = e.message.starts_with("JSON nested deeper")
                || e.message.starts_with("a JSON array longer");
            if within == Some(true) {
                assert!(
                    !shape_refusal,
                    "refused by the pre-check within {limits:?}: {}",
                    e.message
                );
            }
            if e.code == ErrorCode::UnsupportedVersion
                && let Some(tree) = tree
            {
                assert!(tree["version"].is_string(), "{e:?}");
            }
            if let Some(id) = &e.message_id {
                assert_eq!(Some(id.as_str()), salvaged, "{e:?}");
            }
            check_error(
                &protocol::error(e.message_id.as_deref(), e.code.as_str(), &e.message),
                e.message_id.as_deref(),
                e.code.as_str(),
                &e.message,
            );
        }
        Ok(msg) => {
            assert!(
                serde_json::from_str::<&RawValue>(text).is_ok(),
                "decoded a frame that is not JSON"
            );
            assert_ne!(within, Some(false), "decoded a frame beyond {limits:?}");
            assert!(!msg.ty.is_empty());
            assert_eq!(msg.message_id.as_deref(), salvaged);
            if let Some(meta) = msg.metadata {
                assert!(meta.get().starts_with('{'), "metadata {}", meta.get());
            }
            if let Some(Value::Object(fields)) = tree {
                let field = |name: &str| fields.get(name).filter(|v| !v.is_null());
                assert_eq!(field("type"), Some(&Value::String(msg.ty.to_string())));
                match (&msg.message_id, field("messageId")) {
                    (None, None) => {}
                    (Some(id), Some(Value::String(s))) => assert_eq!(id, s),
                    (Some(id), Some(number @ Value::Number(_))) => {
                        assert_eq!(&serde_json::from_str::<Value>(id).unwrap(), number)
                    }
                    (id, json) => panic!("messageId {id:?} from {json:?}"),
                }
                assert_eq!(
                    msg.room.as_deref(),
                    field("room").map(|r| r.as_str().expect("room is a string"))
                );
                if let Ok(payload) = serde_json::from_str::<Value>(msg.payload.get()) {
                    assert_eq!(Some(&payload), fields.get("payload").or(Some(&Value::Null)));
                }
                match (msg.metadata, field("metadata")) {
                    (None, None) => {}
                    (Some(meta), Some(json)) => {
                        assert!(json.is_object());
                        if let Ok(meta) = serde_json::from_str::<Value>(meta.get()) {
                            assert_eq!(&meta, json);
                        }
                    }
                    (meta, json) => panic!("metadata {meta:?} from {json:?}"),
                }
            } else if let Some(tree) = tree {
                panic!("decoded a frame that is not an object: {tree}");
            }
            answers(&msg);
        }
    }
}

/// The frames the router answers a decoded envelope with, whatever its type routes to.
fn answers(msg: &protocol::Inbound<'_>) {
    let id = msg.message_id.as_deref();
    let payload = msg.payload.get();
    let room = msg.room.as_deref();
    // `sys.ping`: the payload comes back as it was sent.
    let pong = Outbound {
        ty: "sys.pong",
        room: None,
        payload,
        sender: None,
    }
    .encode();
    check_frame(&pong, None, "sys.pong", None, payload, None);
    // A reply of the echo handler: the type, the room and the payload of the frame.
    let echo = Outbound {
        ty: &msg.ty,
        room,
        payload,
        sender: Some("guest-3f2a9c1e07b64d5e9a2c81f04b6d37aa"),
    }
    .encode();
    let sender = Some("guest-3f2a9c1e07b64d5e9a2c81f04b6d37aa");
    check_frame(&echo, None, &msg.ty, room, payload, sender);
    // The same frame as one session receives it, with its `seq`.
    let numbered = protocol::with_seq(7, &echo);
    check_frame(&numbered, Some(7), &msg.ty, room, payload, sender);
    // A type with no route, or an unknown `sys.*` type.
    let message = format!("no route for message type `{}`", msg.ty);
    check_error(
        &protocol::error(id, "unknown_type", &message),
        id,
        "unknown_type",
        &message,
    );
    // What the host types read from the payload.
    let payload_room = protocol::payload_room(msg.payload);
    let _ = protocol::payload_status(msg.payload);
    let _ = protocol::payload_seq(msg.payload);
    let _ = protocol::payload_token(msg.payload);
    if let Ok((_reference, answer)) = protocol::payload_reply(msg.payload) {
        assert!(serde_json::from_str::<&RawValue>(answer.get()).is_ok());
    }
    if let Ok(request) = protocol::payload_resume(msg.payload) {
        let message = format!("no session `{}` on this host", request.session_id);
        let frame = protocol::resume_failed(id, "unknown_session", &message);
        let v: Value = serde_json::from_str(&frame).expect("resume_failed is JSON");
        assert_eq!(v["payload"]["message"], Value::String(message));
        assert_eq!(v["payload"]["ref"], id.map_or(Value::Null, Value::from));
    }
    if let Some(id) = id {
        // `sys.ack` without and with fields (`sys.join`, `sys.leave`).
        let ack = protocol::ack(id, None);
        let v: Value = serde_json::from_str(&ack).expect("ack is JSON");
        assert_eq!(v["payload"], serde_json::json!({ "ref": id }));
        if let Some(room) = room.map(str::to_owned).or(payload_room) {
            let extra = serde_json::json!({ "room": room, "members": [], "presence": [] });
            let ack = protocol::ack(id, Some(&extra.to_string()));
            let v: Value = serde_json::from_str(&ack).expect("ack with fields is JSON");
            assert_eq!(v["payload"]["ref"], Value::from(id));
            assert_eq!(v["payload"]["room"], Value::from(room));
            let v: Value = serde_json::from_str(&protocol::with_seq(3, &ack)).unwrap();
            assert_eq!(v["seq"], 3);
        }
    }
}

/// A host frame as a client reads it. Unknown fields are refused: the host writes only these.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HostFrame<'a> {
    #[serde(default)]
    seq: Option<u64>,
    #[serde(rename = "type")]
    ty: String,
    #[serde(rename = "messageId")]
    message_id: String,
    #[serde(default)]
    room: Option<String>,
    #[serde(borrow)]
    payload: &'a RawValue,
    #[serde(default)]
    sender: Option<String>,
    #[allow(dead_code)]
    timestamp: u64,
}

fn check_frame(
    frame: &Frame,
    seq: Option<u64>,
    ty: &str,
    room: Option<&str>,
    payload: &str,
    sender: Option<&str>,
) {
    let read: HostFrame<'_> = serde_json::from_str(frame)
        .unwrap_or_else(|e| panic!("host frame is not a valid envelope ({e}): {}", &**frame));
    assert_eq!(read.seq, seq);
    assert_eq!(read.ty, ty);
    assert!(read.message_id.starts_with("h-"));
    assert_eq!(read.room.as_deref(), room);
    assert_eq!(read.payload.get(), payload);
    assert_eq!(read.sender.as_deref(), sender);
}

fn check_error(frame: &Frame, id: Option<&str>, code: &str, message: &str) {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct ErrorPayload {
        #[serde(rename = "ref", default)]
        reference: Option<String>,
        code: String,
        message: String,
    }
    let read: HostFrame<'_> = serde_json::from_str(frame)
        .unwrap_or_else(|e| panic!("sys.error is not a valid envelope ({e}): {}", &**frame));
    assert_eq!(read.ty, "sys.error");
    let payload: ErrorPayload = serde_json::from_str(read.payload.get()).expect("error payload");
    assert_eq!(payload.reference.as_deref(), id);
    assert_eq!(payload.code, code);
    assert_eq!(payload.message, message);
}

/// The deepest nesting of objects and arrays of a JSON text (a scalar is 0) and its longest
/// array, measured over every member, those of a key given twice too (which a `Value` drops).
#[derive(Debug, Clone, Copy, Default)]
struct Shape {
    depth: usize,
    array: usize,
}

impl<'de> Deserialize<'de> for Shape {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Shape, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Shape;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_bool<E>(self, _: bool) -> Result<Shape, E> {
                Ok(Shape::default())
            }
            fn visit_i64<E>(self, _: i64) -> Result<Shape, E> {
                Ok(Shape::default())
            }
            fn visit_u64<E>(self, _: u64) -> Result<Shape, E> {
                Ok(Shape::default())
            }
            fn visit_f64<E>(self, _: f64) -> Result<Shape, E> {
                Ok(Shape::default())
            }
            fn visit_str<E>(self, _: &str) -> Result<Shape, E> {
                Ok(Shape::default())
            }
            fn visit_unit<E>(self) -> Result<Shape, E> {
                Ok(Shape::default())
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Shape, A::Error> {
                let (mut inner, mut len) = (Shape::default(), 0);
                while let Some(item) = seq.next_element::<Shape>()? {
                    len += 1;
                    inner.depth = inner.depth.max(item.depth);
                    inner.array = inner.array.max(item.array);
                }
                Ok(Shape {
                    depth: inner.depth + 1,
                    array: inner.array.max(len),
                })
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Shape, A::Error> {
                let mut inner = Shape::default();
                while let Some((_, item)) = map.next_entry::<serde::de::IgnoredAny, Shape>()? {
                    inner.depth = inner.depth.max(item.depth);
                    inner.array = inner.array.max(item.array);
                }
                Ok(Shape {
                    depth: inner.depth + 1,
                    array: inner.array,
                })
            }
        }
        deserializer.deserialize_any(Visit)
    }
}
