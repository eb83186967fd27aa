//! Delivery across reconnects (docs/protocol.md, "Sessions, seq and resume"): every frame that
//! is not volatile carries the session's next `seq`; a client that lost its connection resumes
//! its session on a new one and gets every frame after its last `seq` exactly once, in order, or
//! is told exactly why not. Retries of a handled `messageId` are answered, not handled, again.
//! Real host, real sockets, the real echo plugin.

mod support;

use std::time::Duration;

use plexus::Config;
use serde_json::{Value, json};
use support::{Client, Host, assert_error, echo_manifest, within};

async fn host(tweak: impl FnOnce(&mut Config)) -> Host {
    Host::start_with(&[("echo.toml", echo_manifest())], |config| {
        // Presence offline frames would be kept for the cut sessions too; none here.
        config.session.presence_grace = Duration::from_secs(600);
        tweak(config);
    })
    .await
}

/// Joins `room`, asserting the ack.
async fn join(c: &mut Client, room: &str) {
    let ack = c.ack(json!({ "type": "sys.join", "room": room })).await;
    assert_eq!(ack["payload"]["room"], room);
}

/// Reads what a member is told when another identity joins: `room.joined`, then
/// `presence.changed`.
async fn saw_join(c: &mut Client) {
    assert_eq!(c.recv().await["type"], "room.joined");
    assert_eq!(c.recv().await["type"], "presence.changed");
}

/// Broadcasts `echo.broadcast` frames `{"n": n}` for `ns` to `room` from `sender`, pipelined,
/// and waits for their acks.
async fn broadcast(sender: &mut Client, room: &str, ns: std::ops::Range<u64>) {
    let mut last = String::new();
    for n in ns {
        last = sender.next_id();
        sender
            .feed(json!({ "type": "echo.broadcast", "room": room, "messageId": last, "payload": { "n": n } }))
            .await;
    }
    sender.flush().await;
    loop {
        let (_, answer) = sender.recv_until_type("sys.ack").await;
        if answer["payload"]["ref"] == last.as_str() {
            break;
        }
    }
}

/// Reads `count` `echo.broadcast` frames and returns their `n`s.
async fn read_ns(c: &mut Client, count: usize) -> Vec<u64> {
    let mut ns = Vec::new();
    while ns.len() < count {
        let frame = c.recv().await;
        assert_eq!(frame["type"], "echo.broadcast", "{frame}");
        ns.push(frame["payload"]["n"].as_u64().expect("n"));
    }
    ns
}

fn ns_of(frames: &[Value]) -> Vec<u64> {
    frames
        .iter()
        .filter(|f| f["type"] == "echo.broadcast")
        .map(|f| f["payload"]["n"].as_u64().expect("n"))
        .collect()
}

#[tokio::test]
async fn a_cut_connection_resumes_with_every_missed_frame_once_in_order_then_live() {
    let host = host(|_| {}).await;
    let mut a = host.client().await;
    let mut b = host.client().await;
    join(&mut a, "r").await;
    join(&mut b, "r").await;
    saw_join(&mut a).await;
    // Half the stream, of which `a` processes 20; then its TCP connection is cut (no close
    // handshake), with frames in flight, and the other half is sent while it is gone.
    broadcast(&mut b, "r", 0..50).await;
    assert_eq!(read_ns(&mut a, 20).await, (0..20).collect::<Vec<_>>());
    let (session, token, last_seq) = (a.session_id.clone(), a.resume_token.clone(), a.last_seq);
    a.drop_connection();
    broadcast(&mut b, "r", 50..100).await;

    let (mut a, replayed, ack) = Client::resume(host.addr(), &session, &token, last_seq).await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    assert_eq!(ns_of(&replayed), (20..100).collect::<Vec<_>>());
    assert_eq!(
        replayed.len(),
        80,
        "only the missed broadcasts: {replayed:?}"
    );
    assert_eq!(ack["payload"]["replayed"], 80);
    assert_eq!(ack["payload"]["resumed"], true);
    assert_eq!(a.session_id, session);
    // The same session: same connection id and identity, same rooms, then live frames.
    broadcast(&mut b, "r", 100..101).await;
    assert_eq!(read_ns(&mut a, 1).await, [100]);
    a.sync().await;
}

#[tokio::test]
async fn each_resume_failure_is_told_and_the_connection_goes_on_as_its_fresh_session() {
    let host = host(|config| {
        config.session.bounds.kept_frames = 5;
        config.session.resume_ttl = Duration::from_millis(300);
    })
    .await;
    let failed = |answer: &Value, reason: &str| {
        let reference = answer["payload"]["ref"].as_str();
        assert!(
            reference.is_some(),
            "the error names the sys.resume: {answer}"
        );
        assert_error(answer, "resume_failed", reference);
        assert_eq!(answer["payload"]["reason"], reason, "{answer}");
    };

    // unknown_session
    let (mut c, _, answer) = Client::resume(host.addr(), "s-nope", "x", 0).await;
    failed(&answer, "unknown_session");
    c.echo_round_trip().await;

    // bad_token: a real session, the wrong secret.
    let mut a = host.client().await;
    let (session, token) = (a.session_id.clone(), a.resume_token.clone());
    let mut wrong = token.clone();
    wrong.replace_range(0..1, if token.starts_with('0') { "1" } else { "0" });
    let (mut c, _, answer) = Client::resume(host.addr(), &session, &wrong, 1).await;
    failed(&answer, "bad_token");
    c.echo_round_trip().await;
    // The session is untouched: its own connection goes on.
    a.echo_round_trip().await;

    // gap: more frames than are kept went by while it was gone.
    let mut b = host.client().await;
    join(&mut a, "r").await;
    join(&mut b, "r").await;
    saw_join(&mut a).await;
    let (last_seq, a_connection) = (a.last_seq, a.connection_id.clone());
    a.drop_connection();
    broadcast(&mut b, "r", 0..10).await;
    let (mut c, _, answer) = Client::resume(host.addr(), &session, &token, last_seq).await;
    failed(&answer, "gap");
    c.echo_round_trip().await;

    // expired: the session waited longer than the resume TTL; its room says so.
    let left = b.recv_until_type("room.left").await.1;
    assert_eq!(left["payload"]["reason"], "expired", "{left}");
    assert_eq!(left["payload"]["connectionId"], a_connection.as_str());
    let (mut c, _, answer) = Client::resume(host.addr(), &session, &token, last_seq).await;
    failed(&answer, "expired");
    c.echo_round_trip().await;
}

#[tokio::test]
async fn resumes_from_nothing_twice_in_a_row_and_from_the_middle_of_a_replay() {
    let host = host(|_| {}).await;
    let mut a = host.client().await;
    let mut b = host.client().await;
    join(&mut a, "r").await;
    join(&mut b, "r").await;
    let (session, token) = (a.session_id.clone(), a.resume_token.clone());
    a.drop_connection();
    broadcast(&mut b, "r", 0..30).await;

    // lastSeq 0: a client that processed nothing, not even the welcome, gets it all again.
    let (a2, replayed, ack) = Client::resume(host.addr(), &session, &token, 0).await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    assert_eq!(replayed[0]["type"], "sys.welcome");
    assert_eq!(replayed[0]["seq"], 1);
    assert_eq!(ns_of(&replayed), (0..30).collect::<Vec<_>>());
    // A second reconnect right after the first, which read nothing of the session.
    a2.drop_connection();
    let (a3, replayed, ack) = Client::resume(host.addr(), &session, &token, 0).await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    assert_eq!(ns_of(&replayed), (0..30).collect::<Vec<_>>());
    // The first resume's own ack is part of the session too, once.
    let first_acks = replayed.iter().filter(|f| f["type"] == "sys.ack").count();
    assert_eq!(
        first_acks, 2,
        "the join's ack and the first resume's: {replayed:?}"
    );

    // A connection cut in the middle of a replay: it processes 10 of the 30 replayed broadcasts
    // and is gone; the next resume, from where it stopped, gets the other 20 once.
    broadcast(&mut b, "r", 30..60).await;
    let since = a3.last_seq;
    drop(a3);
    let mut a4 = Client::connect(host.addr()).await;
    let id = a4.next_id();
    a4.send(json!({"type": "sys.resume", "messageId": id, "payload": {"sessionId": session, "resumeToken": token, "lastSeq": since}}))
        .await;
    a4.last_seq = since;
    assert_eq!(read_ns(&mut a4, 10).await, (30..40).collect::<Vec<_>>());
    let middle = a4.last_seq;
    a4.drop_connection();
    let (mut a5, replayed, ack) = Client::resume(host.addr(), &session, &token, middle).await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    assert_eq!(ns_of(&replayed), (40..60).collect::<Vec<_>>());
    broadcast(&mut b, "r", 60..61).await;
    assert_eq!(read_ns(&mut a5, 1).await, [60]);
}

#[tokio::test]
async fn a_resume_takes_over_a_session_whose_connection_is_still_open() {
    let host = host(|_| {}).await;
    let mut a = host.client().await;
    let mut b = host.client().await;
    join(&mut a, "r").await;
    join(&mut b, "r").await;
    saw_join(&mut a).await;
    let (session, token, last_seq) = (a.session_id.clone(), a.resume_token.clone(), a.last_seq);
    broadcast(&mut b, "r", 0..5).await;
    // Connection migration: a new connection takes the session along.
    let (mut moved, replayed, ack) = Client::resume(host.addr(), &session, &token, last_seq).await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    assert_eq!(ns_of(&replayed), (0..5).collect::<Vec<_>>());
    // The old connection is closed with 4000, after what it had been sent.
    let (_, close) = a.closed().await;
    let close = close.expect("a close frame");
    assert_eq!(u16::from(close.code), 4000, "{close:?}");
    broadcast(&mut b, "r", 5..6).await;
    assert_eq!(read_ns(&mut moved, 1).await, [5]);
}

#[tokio::test]
async fn a_retried_message_is_handled_once_and_answered_each_time_even_after_a_resume() {
    let host = host(|_| {}).await;
    let mut a = host.client().await;
    let mut b = host.client().await;
    join(&mut a, "r").await;
    join(&mut b, "r").await;
    saw_join(&mut a).await;
    let retry =
        json!({ "type": "echo.broadcast", "room": "r", "messageId": "m-1", "payload": { "n": 1 } });
    let mut acks = Vec::new();
    for _ in 0..3 {
        let (before, ack) = b.request(retry.clone()).await;
        assert!(before.is_empty(), "{before:?}");
        assert_eq!(ack["type"], "sys.ack");
        acks.push(ack);
    }
    // The same answer each time (re-sent with the session's next seq).
    for ack in &acks[1..] {
        assert_eq!(ack["messageId"], acks[0]["messageId"]);
        assert_eq!(ack["payload"], acks[0]["payload"]);
    }
    // One broadcast.
    assert_eq!(read_ns(&mut a, 1).await, [1]);
    a.sync().await;
    // An error is answered the same way.
    let bad = json!({ "type": "no.such", "messageId": "m-2" });
    let (_, first) = b.request(bad.clone()).await;
    let (_, second) = b.request(bad).await;
    assert_error(&first, "unknown_type", Some("m-2"));
    assert_eq!(first["payload"], second["payload"]);

    // The window belongs to the session: a retry after a resume is not handled again.
    let (session, token, last_seq) = (b.session_id.clone(), b.resume_token.clone(), b.last_seq);
    b.drop_connection();
    let (mut b, _, _) = Client::resume(host.addr(), &session, &token, last_seq).await;
    let (before, ack) = b.request(retry).await;
    assert!(before.is_empty(), "{before:?}");
    assert_eq!(ack["payload"], acks[0]["payload"]);
    a.sync().await;
}

#[tokio::test]
async fn a_client_that_stops_answering_pings_is_closed_and_its_presence_cleaned() {
    let interval = Duration::from_millis(300);
    let deadline = Duration::from_millis(300);
    let host = host(|config| {
        config.session.ping_interval = interval;
        config.session.pong_timeout = deadline;
        config.session.presence_grace = Duration::ZERO;
    })
    .await;
    let mut a = host.client().await;
    let mut b = host.client().await;
    join(&mut a, "r").await;
    join(&mut b, "r").await;
    let identity = a.identity.clone();
    // `a` goes silent: it reads nothing, so it answers no ping.
    let silent = a.stop_reading();
    let since = std::time::Instant::now();
    // `b` reads (and so answers pings) while it waits: it stays.
    let (_, offline) = b.recv_until_type("presence.changed").await;
    let took = since.elapsed();
    assert_eq!(offline["payload"]["identity"], identity.as_str());
    assert_eq!(offline["payload"]["state"], "offline");
    assert!(
        took < interval + deadline + Duration::from_secs(1),
        "cleaned after {took:?}"
    );
    b.echo_round_trip().await;
    // What the silent client finds when it reads again: the pings, then a close with 4001.
    let mut silent = silent;
    let close = within("the close frame", async {
        use futures_util::StreamExt;
        loop {
            match silent.next().await {
                Some(Ok(tokio_tungstenite::tungstenite::Message::Close(frame))) => return frame,
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        }
    })
    .await
    .expect("a close frame");
    assert_eq!(u16::from(close.code), 4001, "{close:?}");
}

#[tokio::test]
async fn a_pong_timeout_too_long_for_the_clock_never_closes_a_connection() {
    // `--pong-timeout-secs 18446744073709551615`: the pong's deadline, armed at every ping,
    // would overflow the clock and end the connection's task at its first ping.
    let host = host(|config| {
        config.session.ping_interval = Duration::from_millis(100);
        config.session.pong_timeout = Duration::from_secs(u64::MAX);
    })
    .await;
    let mut a = host.client().await;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Reading answers the ping that came meanwhile.
        a.echo_round_trip().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_loses_volatile_frames_first_then_is_closed_with_1013_and_resumes() {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    let host = Host::start_with(
        &[
            ("echo.toml", echo_manifest()),
            (
                "editor.toml",
                support::editor_manifest(&support::wasm("editor")),
            ),
        ],
        |config| {
            config.session.dev_identity = true;
            config.session.presence_grace = Duration::ZERO;
            // A small live queue, and enough kept to replay everything the client missed.
            config.session.bounds.live_frames = 100_000;
            config.session.bounds.live_bytes = 256 << 10;
            config.session.bounds.kept_frames = 100_000;
            config.session.bounds.kept_bytes = 64 << 20;
            // The overflow closes it, not the write deadline.
            config.session.write_timeout = Duration::from_secs(30);
        },
    )
    .await;
    let open = json!({ "type": "doc.open", "room": "doc:x", "payload": { "doc": "x" } });
    let mut fast = Client::connect_as(host.addr(), "fast").await;
    fast.ack(open.clone()).await;
    let mut slow = Client::connect_as(host.addr(), "slow").await;
    slow.ack(open).await;
    let (session, token) = (slow.session_id.clone(), slow.resume_token.clone());
    let mut last_seq = slow.last_seq;
    // The slow client stops reading; its kernel buffers fill, then its outbox.
    let mut silent = slow.stop_reading();

    // Rounds of a volatile cursor then a regular broadcast (4 KiB each), until the host
    // closes the slow client (it tells the room: its identity went offline).
    let pad = "p".repeat(4096);
    let mut rounds = 0u64;
    'flood: loop {
        for _ in 0..100 {
            fast.feed(json!({ "type": "doc.cursor", "room": "doc:x", "payload": { "doc": "x", "anchor": 0, "head": 0 } }))
                .await;
            fast.feed(json!({ "type": "echo.broadcast", "room": "doc:x", "payload": { "n": rounds, "pad": pad } }))
                .await;
            rounds += 1;
        }
        let id = fast.next_id();
        fast.send(json!({ "type": "sys.ping", "messageId": id }))
            .await;
        let (before, _) = fast.answer_to(&id).await;
        for frame in before {
            if frame["type"] == "presence.changed"
                && frame["payload"]["identity"] == "slow"
                && frame["payload"]["state"] == "offline"
            {
                break 'flood;
            }
        }
        assert!(rounds < 20_000, "the slow client was never closed");
    }

    // What reached the slow client: frames, then a close with 1013.
    let mut received: Vec<Value> = Vec::new();
    let close = within("the slow client's close", async {
        loop {
            match silent.next().await {
                Some(Ok(Message::Text(text))) => {
                    received.push(serde_json::from_str(&text).expect("JSON"))
                }
                Some(Ok(Message::Close(frame))) => return frame,
                Some(Ok(_)) => {}
                other => panic!("expected frames then a close, got {other:?}"),
            }
        }
    })
    .await
    .expect("a close frame");
    assert_eq!(u16::from(close.code), 1013, "{close:?}");
    let mut regular = Vec::new();
    let mut dropped_volatile = false;
    let mut cursor_since_last = true;
    for frame in &received {
        match frame["type"].as_str() {
            Some("doc.cursor") => {
                assert!(
                    frame.get("seq").is_none(),
                    "a volatile frame has no seq: {frame}"
                );
                cursor_since_last = true;
            }
            Some("echo.broadcast") => {
                dropped_volatile |= !cursor_since_last;
                cursor_since_last = false;
                regular.push(frame["payload"]["n"].as_u64().unwrap());
            }
            _ => {}
        }
        if let Some(seq) = frame["seq"].as_u64() {
            assert_eq!(seq, last_seq + 1, "{frame}");
            last_seq = seq;
        }
    }
    assert!(
        dropped_volatile,
        "cursors were dropped while broadcasts still went through ({} broadcasts)",
        regular.len()
    );
    assert!(
        (regular.len() as u64) < rounds,
        "the close came before the end"
    );

    // A resume gets every broadcast it missed, once, in order, and no cursor.
    let (_, replayed, ack) = Client::resume(host.addr(), &session, &token, last_seq).await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    assert!(replayed.iter().all(|f| f["type"] != "doc.cursor"));
    regular.extend(ns_of(&replayed));
    assert_eq!(regular, (0..rounds).collect::<Vec<_>>());
}
