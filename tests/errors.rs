//! Every error code of docs/protocol.md, caused by a real client over a real socket; after
//! each, the connection is still usable (an echo round trip succeeds). Plugin failures use the
//! `faulty` fixture plugin (plugins/faulty).

mod support;

use serde_json::json;
use support::{Client, Host, assert_error, echo_manifest, faulty_manifest, str_at};
use tokio_tungstenite::tungstenite::Message;

async fn host() -> Host {
    Host::start(&[
        ("echo.toml", echo_manifest()),
        ("faulty.toml", faulty_manifest()),
    ])
    .await
}

/// Sends `text` (a frame without `messageId`, or one whose id cannot be read) and expects a
/// `sys.error` with `code` and no `ref`, then an echo round trip.
async fn expect_unreferenced_error(c: &mut Client, text: &str, code: &str) {
    c.send_text(text).await;
    let err = c.recv().await;
    assert_error(&err, code, None);
    c.echo_round_trip().await;
}

/// Sends `text`, which carries `messageId` `id`, and expects a `sys.error` with `code` naming
/// it, then an echo round trip.
async fn expect_referenced_error(c: &mut Client, text: &str, id: &str, code: &str) {
    c.send_text(text).await;
    let (before, err) = c.answer_to(id).await;
    assert!(before.is_empty(), "{before:?}");
    assert_error(&err, code, Some(id));
    c.echo_round_trip().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames() {
    let host = host().await;
    let mut c = host.client().await;
    for text in [
        "not json",
        "{\"type\": \"echo\"",
        "[1, 2]",
        "\"echo\"",
        "42",
        "{}",
        "{\"payload\": {\"text\": \"no type\"}}",
        "{\"type\": 5}",
        "{\"type\": null}",
        "{\"type\": \"\"}",
        "{\"type\": \"echo\", \"messageId\": true}",
        "{\"type\": \"echo\", \"metadata\": 3}",
    ] {
        expect_unreferenced_error(&mut c, text, "bad_frame").await;
    }

    // A binary frame is refused, without closing the connection.
    c.send_message(Message::binary(b"{\"type\":\"echo\"}".to_vec()))
        .await;
    assert_error(&c.recv().await, "bad_frame", None);
    c.echo_round_trip().await;

    // A bad frame whose messageId can be read gets an error naming it.
    for (text, id) in [
        (r#"{"messageId": "b-1", "type": 5}"#, "b-1"),
        (r#"{"messageId": "b-2"}"#, "b-2"),
        (r#"{"messageId": "b-3", "type": ""}"#, "b-3"),
        (r#"{"messageId": "b-4", "type": "echo", "room": 5}"#, "b-4"),
        (
            r#"{"messageId": "b-5", "type": "echo", "metadata": [1]}"#,
            "b-5",
        ),
        (r#"{"messageId": 77, "type": ["echo"]}"#, "77"),
    ] {
        expect_referenced_error(&mut c, text, id, "bad_frame").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_types() {
    let host = host().await;
    let mut c = host.client().await;
    for ty in [
        "nope",
        "chat.send",
        "sys.nope",
        "sys.",
        "sys.welcome",
        "sys.ack",
    ] {
        let err = c.expect_error(json!({"type": ty}), "unknown_type").await;
        assert!(
            err["payload"]["message"].as_str().unwrap().contains(ty),
            "the message names the type: {err}"
        );
        c.echo_round_trip().await;
    }
    expect_unreferenced_error(&mut c, r#"{"type": "nope"}"#, "unknown_type").await;
    expect_unreferenced_error(&mut c, r#"{"type": "sys.nope"}"#, "unknown_type").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_versions() {
    let host = host().await;
    let mut c = host.client().await;
    for version in ["2.0", "10.1", "x.y", ""] {
        c.expect_error(
            json!({"type": "echo", "version": version}),
            "unsupported_version",
        )
        .await;
        c.echo_round_trip().await;
    }
    // Refused before routing: even an unknown type reports the version.
    c.expect_error(
        json!({"type": "nope", "version": "2.0"}),
        "unsupported_version",
    )
    .await;
    expect_unreferenced_error(
        &mut c,
        r#"{"type": "echo", "version": "2.0"}"#,
        "unsupported_version",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_in_room() {
    let host = host().await;
    let mut c = host.client().await;
    // A routed message naming a room the sender has not joined.
    c.expect_error(
        json!({"type": "echo", "room": "lobby", "payload": 1}),
        "not_in_room",
    )
    .await;
    c.echo_round_trip().await;
    expect_unreferenced_error(
        &mut c,
        r#"{"type": "echo", "room": "lobby"}"#,
        "not_in_room",
    )
    .await;

    // Once joined, the same message goes through (the echo names the room).
    c.ack(json!({"type": "sys.join", "room": "lobby"})).await;
    let id = c.next_id();
    let (before, ack) = c
        .request(json!({"type": "echo", "messageId": id, "room": "lobby", "payload": 2}))
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["room"], "lobby");

    // Leaving a room the sender is not in.
    c.expect_error(
        json!({"type": "sys.leave", "room": "elsewhere"}),
        "not_in_room",
    )
    .await;
    c.echo_round_trip().await;
    c.expect_error(
        json!({"type": "sys.leave", "payload": {"room": "elsewhere"}}),
        "not_in_room",
    )
    .await;
    c.ack(json!({"type": "sys.leave", "room": "lobby"})).await;
    c.expect_error(json!({"type": "sys.leave", "room": "lobby"}), "not_in_room")
        .await;
    c.echo_round_trip().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn room_required() {
    let host = host().await;
    let mut c = host.client().await;
    for frame in [
        json!({"type": "sys.join"}),
        json!({"type": "sys.join", "payload": {}}),
        json!({"type": "sys.join", "payload": {"room": ""}}),
        json!({"type": "sys.join", "room": ""}),
        json!({"type": "sys.leave"}),
    ] {
        c.expect_error(frame, "room_required").await;
        c.echo_round_trip().await;
    }
    expect_unreferenced_error(&mut c, r#"{"type": "sys.join"}"#, "room_required").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_failures() {
    let host = host().await;
    let mut c = host.client().await;

    // The fixture works when asked to.
    let id = c.next_id();
    let (before, ack) = c
        .request(json!({"type": "faulty.ok", "messageId": id, "payload": {"k": 1}}))
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["type"], "faulty.ok");
    assert_eq!(before[0]["payload"], json!({"k": 1}));

    for (ty, what) in [
        ("faulty.trap", "trapped"),
        ("faulty.unreachable", "trapped"),
        ("faulty.spin", "ran out of time"),
        ("faulty.bad-json", "not JSON"),
    ] {
        // `expect_error` asserts nothing came before the error: the bad-json reply is dropped.
        let err = c
            .expect_error(json!({"type": ty, "payload": {}}), "plugin_failed")
            .await;
        let message = err["payload"]["message"].as_str().unwrap();
        assert!(message.contains(what), "{ty}: {err}");
        c.echo_round_trip().await;
        // The plugin itself keeps serving (a trapped instance is replaced).
        let id = c.next_id();
        let (before, ack) = c
            .request(json!({"type": "faulty.ok", "messageId": id, "payload": ty}))
            .await;
        assert_eq!(ack["type"], "sys.ack", "after {ty}: {ack}");
        assert_eq!(before.len(), 1, "after {ty}: {before:?}");
        assert_eq!(before[0]["payload"], ty);
    }

    // Without a messageId, the failure still gets an error, without `ref`.
    expect_unreferenced_error(&mut c, r#"{"type": "faulty.trap"}"#, "plugin_failed").await;
    expect_unreferenced_error(&mut c, r#"{"type": "faulty.unreachable"}"#, "plugin_failed").await;
    expect_unreferenced_error(&mut c, r#"{"type": "faulty.spin"}"#, "plugin_failed").await;
    expect_unreferenced_error(&mut c, r#"{"type": "faulty.bad-json"}"#, "plugin_failed").await;
    c.sync().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_frames() {
    const LIMIT: usize = 1024;
    let host = Host::start_with(&[("echo.toml", echo_manifest())], |config| {
        config.limits.max_message_bytes = LIMIT;
        // Read the oversized frame below in one go, so that the host does not close the socket
        // with unread bytes (which would reset it before the close frame is read).
        config.read_buffer_bytes = 256 * 1024;
    })
    .await;
    let mut c = host.client().await;
    let frame_of = |len: usize| {
        let mut frame = json!({"type": "echo", "payload": ""});
        let overhead = frame.to_string().len();
        frame["payload"] = json!("x".repeat(len - overhead));
        let text = frame.to_string();
        assert_eq!(text.len(), len);
        text
    };

    // At the limit: served.
    let at_limit = frame_of(LIMIT);
    c.send_text(at_limit.clone()).await;
    let sent: serde_json::Value = serde_json::from_str(&at_limit).unwrap();
    assert_eq!(c.recv_type("echo").await["payload"], sent["payload"]);
    c.sync().await;

    // Above it (but below the WebSocket limit of 4x): `too_large`, the connection stays.
    for len in [LIMIT + 1, 2 * LIMIT, 4 * LIMIT - 16] {
        expect_unreferenced_error(&mut c, &frame_of(len), "too_large").await;
    }
    // A too-large frame that carries a messageId gets an error naming it.
    let big = json!({"type": "echo", "messageId": "big-1", "payload": "x".repeat(2 * LIMIT)});
    let (before, err) = c.request(big).await;
    assert!(before.is_empty(), "{before:?}");
    assert_eq!(err["type"], "sys.error", "{err}");
    assert_eq!(err["payload"]["code"], "too_large", "{err}");
    assert_eq!(err["payload"]["ref"], "big-1", "{err}");

    // Far above 4x the limit: the host closes the socket with 1009.
    let mut other = host.client().await;
    c.send_text(frame_of(16 * LIMIT)).await;
    let (before, close) = c.closed().await;
    assert!(before.is_empty(), "{before:?}");
    let close = close.expect("a close frame");
    assert_eq!(u16::from(close.code), 1009, "{close:?}");
    // Other clients are not affected.
    other.echo_round_trip().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_clients_bad_input_does_not_disturb_another() {
    let host = host().await;
    let mut bad = host.client().await;
    let mut good = host.client().await;
    good.ack(json!({"type": "sys.join", "room": "lobby"})).await;
    good.echo_round_trip().await;

    let inputs: Vec<Message> = vec![
        Message::text("not json"),
        Message::text("[1]"),
        Message::binary(vec![0u8, 1, 2, 3]),
        Message::text(r#"{"type": "sys.nope"}"#),
        Message::text(r#"{"type": "echo", "version": "2.0"}"#),
        Message::text(r#"{"type": "echo", "room": "lobby"}"#),
        Message::text(r#"{"type": "sys.join"}"#),
        Message::text(r#"{"type": "faulty.trap"}"#),
        Message::text(r#"{"type": "faulty.unreachable"}"#),
        Message::text(r#"{"type": "faulty.spin"}"#),
        Message::text(r#"{"type": "faulty.bad-json"}"#),
    ];
    for input in inputs {
        bad.send_message(input).await;
        let err = bad.recv_type("sys.error").await;
        assert!(err["payload"].get("ref").is_none(), "{err}");
        good.echo_round_trip().await;
    }
    bad.echo_round_trip().await;
    // Nothing of the bad client's reached the good one.
    good.sync().await;

    // Even a bad client that vanishes without a close handshake.
    bad.drop_connection();
    good.echo_round_trip().await;
    good.sync().await;
}

/// A plugin writing to stdout and stderr (through WASI) is served normally, the first time and
/// every time after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plugin_output_does_not_fail_the_call() {
    let host = Host::start(&[
        ("faulty.toml", faulty_manifest()),
        ("echo.toml", echo_manifest()),
    ])
    .await;
    let mut c = Client::connect(host.addr()).await;
    for n in 0..3 {
        let id = format!("p{n}");
        let (before, ack) = c
            .request(json!({"type": "faulty.print", "messageId": id, "payload": {"k": n}}))
            .await;
        assert_eq!(ack["type"], "sys.ack", "{ack}");
        assert_eq!(before.len(), 1, "{before:?}");
        assert_eq!(before[0]["type"], "faulty.printed");
        assert_eq!(before[0]["payload"], json!({"k": n}));
    }
    c.echo_round_trip().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ack_is_the_hosts_a_plugin_cannot_set_its_ref() {
    let host = host().await;
    let mut c = host.client().await;
    c.send(json!({"type": "faulty.forge-ref", "messageId": "mine"}))
        .await;
    let raw = match c.next_message().await {
        Some(Message::Text(text)) => text.to_string(),
        other => panic!("expected the ack, got {other:?}"),
    };
    assert_eq!(raw.matches("\"ref\"").count(), 1, "one `ref`: {raw}");
    let ack: serde_json::Value = serde_json::from_str(&raw).expect("JSON");
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    assert_eq!(ack["payload"], json!({"ref": "mine", "x": 1}), "{ack}");
    // Read raw, around the client's seq check: the ack is the session's second frame.
    assert_eq!(ack["seq"], 2, "{ack}");
    c.last_seq = 2;
    c.echo_round_trip().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_never_sends_its_request_is_disconnected() {
    use tokio::io::AsyncReadExt;
    let host = Host::start_with(&[("echo.toml", echo_manifest())], |c| {
        c.request_head_timeout = std::time::Duration::from_millis(300);
    })
    .await;
    // Connects, sends half a request head, then nothing.
    let mut tcp = tokio::net::TcpStream::connect(host.addr())
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut tcp, b"GET /ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("write");
    let mut buf = Vec::new();
    // The host closes it (the safety net of `within` is far longer than the timeout).
    let read = support::within(
        "the host to close the connection",
        tcp.read_to_end(&mut buf),
    )
    .await;
    assert!(read.is_ok() || buf.is_empty(), "{read:?}");
    // Others are still served.
    let mut c = host.client().await;
    c.echo_round_trip().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_value_writes_past_the_limits_fail_the_call_clearly() {
    let host = host().await;
    let mut c = host.client().await;
    for (what, says) in [
        (
            "value",
            "value of 2097152 bytes under key `huge` (the limit is 1048576)",
        ),
        ("key", "key of 2048 bytes (the limit is 1024)"),
    ] {
        let id = format!("kv-{what}");
        let (before, err) = c
            .request(json!({"type": "faulty.kv-huge", "messageId": id, "payload": what}))
            .await;
        assert!(before.is_empty(), "nothing of the call applies: {before:?}");
        assert_error(&err, "plugin_failed", Some(&id));
        let message = err["payload"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{message}");
    }
    // Nothing was stored.
    assert!(host.server.hub().registry.kv_store("faulty").is_empty());
    c.echo_round_trip().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_json_shapes_are_refused_and_the_connection_stays_usable() {
    let host = host().await;
    let mut c = host.client().await;
    // 20,000 levels deep: refused by the depth limit before any parser recursion.
    let deep = format!(
        r#"{{"type":"echo","messageId":"deep","payload":{}1{}}}"#,
        "[".repeat(20_000),
        "]".repeat(20_000)
    );
    c.send_text(deep).await;
    let err = c.recv().await;
    assert_error(&err, "bad_frame", Some("deep"));
    assert!(
        str_at(&err, "/payload/message").contains("64 levels"),
        "{err}"
    );
    // At the limit: served.
    let nested = format!("{}1{}", "[".repeat(62), "]".repeat(62));
    let payload: serde_json::Value = serde_json::from_str(&nested).unwrap();
    let (before, ack) = c
        .request(json!({"type": "echo", "messageId": "at-limit", "payload": payload}))
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    assert_eq!(before[0]["payload"], payload);
    // An array of 10,001 elements: refused, naming the limit, with its messageId.
    let long = json!({"type": "echo", "messageId": "long", "payload": vec![0; 10_001]});
    let (_, err) = c.request(long).await;
    assert_error(&err, "bad_frame", Some("long"));
    assert!(
        str_at(&err, "/payload/message").contains("10000 elements"),
        "{err}"
    );
    c.echo_round_trip().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_past_the_room_limits_are_refused() {
    let host = Host::start_with(&[("echo.toml", echo_manifest())], |config| {
        config.limits.max_rooms_per_connection = 2;
        config.limits.max_room_members = 2;
    })
    .await;
    let mut a = host.client().await;
    let mut b = host.client().await;
    let mut c = host.client().await;
    for room in ["r1", "r2"] {
        a.ack(json!({"type": "sys.join", "room": room})).await;
    }
    a.expect_error(json!({"type": "sys.join", "room": "r3"}), "room_limit")
        .await;
    // A room it is in already is no new room.
    a.ack(json!({"type": "sys.join", "room": "r1"})).await;
    let id = b.next_id();
    let (_, ack) = b
        .request(json!({"type": "sys.join", "room": "r1", "messageId": id}))
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    c.expect_error(json!({"type": "sys.join", "room": "r1"}), "room_full")
        .await;
    // A leave makes room.
    let id = b.next_id();
    let (_, ack) = b
        .request(json!({"type": "sys.leave", "room": "r1", "messageId": id}))
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    let id = c.next_id();
    let (_, ack) = c
        .request(json!({"type": "sys.join", "room": "r1", "messageId": id}))
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_client_is_rate_limited_then_closed_while_another_stays_fast() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    let host = Host::start_with(&[("echo.toml", echo_manifest())], |config| {
        config.limits.rate = Some(plexus::limits::RateLimit {
            per_second: std::num::NonZeroU32::new(50).unwrap(),
            burst: std::num::NonZeroU32::new(50).unwrap(),
            close_after: std::time::Duration::from_millis(500),
        });
    })
    .await;
    let mut calm = host.client().await;
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", host.addr()))
        .await
        .expect("connect");
    let (mut sink, mut stream) = ws.split();
    // The flood: echo frames as fast as the socket takes them, until the host closes.
    let flood = tokio::spawn(async move {
        let mut n = 0u64;
        loop {
            n += 1;
            let frame = json!({"type": "echo", "messageId": format!("f-{n}"), "payload": n});
            if sink.send(Message::text(frame.to_string())).await.is_err() {
                return n;
            }
        }
    });
    let reader = tokio::spawn(async move {
        let (mut answered, mut limited) = (0u64, 0u64);
        loop {
            match stream.next().await {
                Some(Ok(Message::Text(text))) => {
                    let frame: serde_json::Value = serde_json::from_str(&text).unwrap();
                    match frame["type"].as_str() {
                        Some("sys.error") => {
                            assert_eq!(frame["payload"]["code"], "rate_limited", "{frame}");
                            assert!(frame["payload"]["ref"].is_string(), "{frame}");
                            limited += 1;
                        }
                        Some("sys.ack") => answered += 1,
                        _ => {}
                    }
                }
                Some(Ok(Message::Close(close))) => return (answered, limited, close),
                Some(Ok(_)) => {}
                other => panic!("expected a close, got {other:?}"),
            }
        }
    });
    // Meanwhile another client, within its limit (20 echoes a second: a load shape, not a
    // wait), has its echoes answered at once.
    let mut slowest = std::time::Duration::ZERO;
    let mut pace = tokio::time::interval(std::time::Duration::from_millis(50));
    let deadline = std::time::Instant::now() + support::TIMEOUT;
    while !reader.is_finished() {
        assert!(
            std::time::Instant::now() < deadline,
            "the flooding client was never closed"
        );
        pace.tick().await;
        let started = std::time::Instant::now();
        calm.echo_round_trip().await;
        slowest = slowest.max(started.elapsed());
    }
    let (answered, limited, close) = support::within("the flood's end", reader).await.unwrap();
    let close = close.expect("a close frame");
    assert_eq!(u16::from(close.code), 1008, "{close:?}");
    assert!(answered >= 50, "the burst was served: {answered}");
    assert!(limited > 0, "refused with rate_limited first");
    flood.abort();
    assert!(
        slowest < std::time::Duration::from_millis(500),
        "another client's echo took {slowest:?}"
    );
    calm.echo_round_trip().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cannot_set_the_sender_or_the_seq() {
    let host = host().await;
    let mut c = host.client().await;
    let mut other = host.client().await;
    c.ack(json!({"type": "sys.join", "room": "r"})).await;
    let id = other.next_id();
    other
        .request(json!({"type": "sys.join", "room": "r", "messageId": id}))
        .await;
    c.recv_until_type("presence.changed").await;
    let forged = json!({
        "type": "echo.broadcast", "room": "r", "messageId": "forged",
        "sender": other.identity, "seq": 1, "connectionId": other.connection_id,
        "payload": {"n": 1}
    });
    let (_, ack) = c.request(forged).await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    let heard = other.recv_type("echo.broadcast").await;
    assert_eq!(heard["sender"], c.identity.as_str(), "{heard}");
    assert_ne!(heard["sender"], other.identity.as_str());
    // `seq` is the host's: the broadcast carries `other`'s next one (checked by its client).
    other.sync().await;
}

/// The HTTP status and JSON `reason` of a refused upgrade to `path`.
async fn refused_upgrade(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    match tokio_tungstenite::connect_async(format!("ws://{addr}{path}")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let body: serde_json::Value =
                serde_json::from_slice(resp.body().as_deref().unwrap_or_default()).unwrap();
            (
                resp.status().as_u16(),
                body["reason"].as_str().unwrap_or_default().to_owned(),
            )
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limits_refuse_before_the_upgrade() {
    async fn limited(total: usize, per_ip: usize, per_identity: usize) -> Host {
        Host::start_with(&[("echo.toml", echo_manifest())], move |config| {
            config.session.dev_identity = true;
            config.limits.connections = plexus::limits::ConnectionLimits {
                total,
                per_ip,
                per_identity,
            };
        })
        .await
    }
    // In all: 503.
    let host = limited(1, 100, 100).await;
    let mut first = host.client().await;
    assert_eq!(
        refused_upgrade(host.addr(), "/ws").await,
        (503, "host_full".to_owned())
    );
    first.echo_round_trip().await;
    // Per IP address: 429.
    let host = limited(100, 2, 100).await;
    let (_a, _b) = (host.client().await, host.client().await);
    assert_eq!(
        refused_upgrade(host.addr(), "/ws").await,
        (429, "too_many_from_address".to_owned())
    );
    // Per identity: 429, and another identity is still welcome.
    let host = limited(100, 100, 1).await;
    let _ada = Client::connect_as(host.addr(), "ada").await;
    assert_eq!(
        refused_upgrade(host.addr(), "/ws?devIdentity=ada").await,
        (429, "too_many_for_identity".to_owned())
    );
    let mut bob = Client::connect_as(host.addr(), "bob").await;
    bob.echo_round_trip().await;
}
