//! Frames of the three dialects, built and recognised without a full JSON parse.
//!
//! The generator runs on one core and receives up to hundreds of thousands of frames per second,
//! so it recognises frames by scanning for the few keys it needs. Every dialect carries the same
//! payload object, `{"seq":N,"ts":N,"pad":"..."}`: `seq` counts a connection's messages, `ts` is the
//! send time in nanoseconds of the generator's clock ([`crate::timeline::now_ns`]).

use std::fmt::Write as _;

use crate::args::Dialect;

/// The path of a URL for the dialect, for the echo (`room == false`) or room endpoint.
pub fn default_path(dialect: Dialect, room: bool) -> &'static str {
    match (dialect, room) {
        (Dialect::Plexus, _) => "/ws",
        (Dialect::Raw, false) => "/echo",
        (Dialect::Raw, true) => "/room",
        (Dialect::Socketio, _) => "/socket.io/?EIO=4&transport=websocket",
    }
}

/// Appends the payload object for message `seq` sent at `ts`, padded to `size` bytes when it is
/// shorter.
pub fn push_payload(out: &mut String, seq: u64, ts: u64, size: usize) {
    let start = out.len();
    let _ = write!(out, r#"{{"seq":{seq},"ts":{ts},"pad":""#);
    let used = out.len() - start + 2; // the closing `"}`
    for _ in used..size {
        out.push('x');
    }
    out.push_str("\"}");
}

/// An echo request carrying the payload.
pub fn echo_frame(dialect: Dialect, seq: u64, ts: u64, size: usize) -> String {
    let mut s = String::with_capacity(size + 48);
    match dialect {
        Dialect::Plexus => {
            s.push_str(r#"{"type":"echo","payload":"#);
            push_payload(&mut s, seq, ts, size);
            s.push('}');
        }
        Dialect::Raw => push_payload(&mut s, seq, ts, size),
        Dialect::Socketio => {
            s.push_str(r#"42["echo","#);
            push_payload(&mut s, seq, ts, size);
            s.push(']');
        }
    }
    s
}

/// A Plexus request of type `ty` with a `messageId` (`e<seq>`) and the payload
/// `{"n":<seq>,"pad":"..."}` padded to `size` bytes, answered by the plugin and then by a
/// `sys.ack` naming it.
pub fn plexus_numbered(ty: &str, seq: u64, size: usize) -> String {
    let mut s = String::with_capacity(size + 64);
    let _ = write!(s, r#"{{"type":"{ty}","messageId":"e{seq}","payload":"#);
    let start = s.len();
    let _ = write!(s, r#"{{"n":{seq},"pad":""#);
    let used = s.len() - start + 2;
    for _ in used..size {
        s.push('x');
    }
    s.push_str("\"}}");
    s
}

/// The number and the version an answer names: `{"n":<seq>,"version":"<v>"}` in its payload.
pub fn numbered_answer(text: &str) -> Option<(u64, &str)> {
    Some((scan_u64(text, "\"n\":")?, scan_str(text, "\"version\":")?))
}

/// A publication to the room.
pub fn publish_frame(dialect: Dialect, room: &str, seq: u64, ts: u64, size: usize) -> String {
    let mut s = String::with_capacity(size + 64);
    match dialect {
        Dialect::Plexus => {
            let _ = write!(s, r#"{{"type":"echo.broadcast","room":"{room}","payload":"#);
            push_payload(&mut s, seq, ts, size);
            s.push('}');
        }
        Dialect::Raw => push_payload(&mut s, seq, ts, size),
        Dialect::Socketio => {
            s.push_str(r#"42["publish","#);
            push_payload(&mut s, seq, ts, size);
            s.push(']');
        }
    }
    s
}

/// The request that puts a connection in the room, answered by [`Kind::Ack`] for `ref == "j"`.
/// `None` for the raw dialect, where connecting to `/room` is the join.
pub fn join_frame(dialect: Dialect, room: &str) -> Option<String> {
    match dialect {
        Dialect::Plexus => Some(format!(
            r#"{{"type":"sys.join","room":"{room}","messageId":"j"}}"#
        )),
        Dialect::Raw => None,
        // Ack id 0: the server calls the acknowledgement callback once the socket has joined.
        Dialect::Socketio => Some(format!(r#"420["join","{room}"]"#)),
    }
}

/// What an incoming text frame is.
#[derive(Debug, PartialEq, Eq)]
pub enum Kind<'a> {
    /// A raw-dialect frame: the payload itself (echo or broadcast, depending on the endpoint).
    Raw,
    /// An echo answer.
    Echo,
    /// A room broadcast.
    Broadcast,
    /// `sys.ack` (Plexus, with its `ref`) or a Socket.IO acknowledgement (`43<id>`).
    Ack(Option<&'a str>),
    /// `sys.error` with its `ref` and `code`.
    Error {
        r#ref: Option<&'a str>,
        code: Option<&'a str>,
    },
    /// `sys.welcome`.
    Welcome,
    /// Engine.IO ping (`2`): answer `3`.
    SioPing,
    /// Engine.IO open packet (`0{...}`).
    SioOpen,
    /// Socket.IO namespace connected (`40{...}`).
    SioConnected,
    /// Socket.IO disconnect or connect error, Engine.IO close.
    SioClosed,
    /// Anything else (room.joined, sys.pong, ...).
    Other,
}

impl Kind<'_> {
    pub fn is_echo(&self) -> bool {
        matches!(self, Kind::Echo | Kind::Raw)
    }
    pub fn is_broadcast(&self) -> bool {
        matches!(self, Kind::Broadcast | Kind::Raw)
    }
}

/// Recognises a frame of the dialect. `echo_type` is the Plexus type the echo route answers with.
pub fn classify<'a>(dialect: Dialect, text: &'a str, echo_type: &str) -> Kind<'a> {
    match dialect {
        Dialect::Raw => Kind::Raw,
        Dialect::Plexus => match scan_str(text, "\"type\":") {
            Some(t) if t == echo_type => Kind::Echo,
            Some("echo.broadcast") => Kind::Broadcast,
            Some("sys.ack") => Kind::Ack(scan_str(text, "\"ref\":")),
            Some("sys.error") => Kind::Error {
                r#ref: scan_str(text, "\"ref\":"),
                code: scan_str(text, "\"code\":"),
            },
            Some("sys.welcome") => Kind::Welcome,
            _ => Kind::Other,
        },
        Dialect::Socketio => {
            let b = text.as_bytes();
            match b.first() {
                Some(b'2') if b.len() == 1 => Kind::SioPing,
                Some(b'0') => Kind::SioOpen,
                Some(b'1') => Kind::SioClosed,
                Some(b'4') => match b.get(1) {
                    Some(b'2') => {
                        let body = &text[2..];
                        if body.starts_with("[\"echo\"") {
                            Kind::Echo
                        } else if body.starts_with("[\"message\"") {
                            Kind::Broadcast
                        } else {
                            Kind::Other
                        }
                    }
                    Some(b'3') => {
                        let digits = text[2..]
                            .find(|c: char| !c.is_ascii_digit())
                            .unwrap_or(text.len() - 2);
                        Kind::Ack(Some(&text[2..2 + digits]))
                    }
                    Some(b'0') => Kind::SioConnected,
                    Some(b'1') | Some(b'4') => Kind::SioClosed,
                    _ => Kind::Other,
                },
                _ => Kind::Other,
            }
        }
    }
}

/// The unsigned number after `key` (which includes its quotes and colon, e.g. `"seq":`).
pub fn scan_u64(text: &str, key: &str) -> Option<u64> {
    let at = text.find(key)? + key.len();
    let rest = text[at..].trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// The string after `key` (no escapes are interpreted; a value with escapes is cut at the first
/// quote, which is enough for the ids and codes read here).
pub fn scan_str<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let at = text.find(key)? + key.len();
    let rest = text[at..].trim_start().strip_prefix('"')?;
    let end = rest.find('"')?;
    Some(&rest[..end])
}

/// `seq` and `ts` of the payload in a frame.
#[inline]
pub fn seq_ts(text: &str) -> Option<(u64, u64)> {
    Some((scan_u64(text, "\"seq\":")?, scan_u64(text, "\"ts\":")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_padded_to_size() {
        let mut s = String::new();
        push_payload(&mut s, 7, 123_456_789, 64);
        assert_eq!(s.len(), 64);
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["seq"], 7);
        assert_eq!(v["ts"], 123_456_789);
    }

    #[test]
    fn frames_are_valid_json_and_scan_back() {
        for d in [Dialect::Plexus, Dialect::Raw, Dialect::Socketio] {
            let f = echo_frame(d, 42, 99, 64);
            let json = f.strip_prefix("42").unwrap_or(&f);
            serde_json::from_str::<serde_json::Value>(json).unwrap();
            assert_eq!(seq_ts(&f), Some((42, 99)));
            let p = publish_frame(d, "bench", 3, 4, 64);
            let json = p.strip_prefix("42").unwrap_or(&p);
            serde_json::from_str::<serde_json::Value>(json).unwrap();
        }
        let f = plexus_numbered("answer", 5, 64);
        let v: serde_json::Value = serde_json::from_str(&f).unwrap();
        assert_eq!(v["messageId"], "e5");
        assert_eq!(v["payload"]["n"], 5);
        assert_eq!(v["payload"].to_string().len(), 64);
    }

    #[test]
    fn classifies_plexus_frames() {
        let d = Dialect::Plexus;
        let echo = r#"{"type":"echo","messageId":"h-2","payload":{"seq":1,"ts":2,"pad":""},"sender":"g","timestamp":17}"#;
        assert_eq!(classify(d, echo, "echo"), Kind::Echo);
        assert_eq!(seq_ts(echo), Some((1, 2)));
        let ack = r#"{"type": "sys.ack", "messageId": "h-3", "payload": {"ref": "e9"}}"#;
        assert_eq!(classify(d, ack, "echo"), Kind::Ack(Some("e9")));
        let err =
            r#"{"type":"sys.error","payload":{"ref":"e1","code":"plugin_failed","message":"x"}}"#;
        assert_eq!(
            classify(d, err, "echo"),
            Kind::Error {
                r#ref: Some("e1"),
                code: Some("plugin_failed")
            }
        );
        let answer = r#"{"type":"answer","messageId":"h-4","payload":{"n":12,"version":"b"},"timestamp":17}"#;
        assert_eq!(classify(d, answer, "answer"), Kind::Echo);
        assert_eq!(numbered_answer(answer), Some((12, "b")));
        let b = r#"{"type":"echo.broadcast","room":"bench","payload":{"seq":1,"ts":2}}"#;
        assert_eq!(classify(d, b, "echo"), Kind::Broadcast);
        assert_eq!(
            classify(d, r#"{"type":"sys.welcome","payload":{}}"#, "echo"),
            Kind::Welcome
        );
    }

    #[test]
    fn classifies_socketio_frames() {
        let d = Dialect::Socketio;
        assert_eq!(classify(d, "2", "echo"), Kind::SioPing);
        assert_eq!(classify(d, r#"0{"sid":"x"}"#, "echo"), Kind::SioOpen);
        assert_eq!(classify(d, r#"40{"sid":"y"}"#, "echo"), Kind::SioConnected);
        assert_eq!(classify(d, r#"42["echo",{"seq":1}]"#, "echo"), Kind::Echo);
        assert_eq!(
            classify(d, r#"42["message",{"seq":1}]"#, "echo"),
            Kind::Broadcast
        );
        assert_eq!(classify(d, r#"430["ok"]"#, "echo"), Kind::Ack(Some("0")));
        assert_eq!(classify(d, "41", "echo"), Kind::SioClosed);
    }
}
