//! Hot swaps under load: a component replaced on disk mid-stream, a broken component refused,
//! manifests changed, added and removed, all while a client stays connected.
//!
//! The fixtures `swap-a` and `swap-b` (plugins/) answer `answer` with
//! `{"n": <payload.n>, "version": "a" | "b"}`. The host watches its manifests directory (a
//! temp dir), which also holds the component, so every change here is a file operation.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use plexus::{ReloadEvent, WatchMode};
use serde_json::{Value, json};
use support::{Client, Host, answer_version, assert_error, echo_manifest, wait_reload, wasm};
use tokio::sync::broadcast;

/// Messages in flight at a time.
const WINDOW: u64 = 50;
/// The least number of messages streamed.
const STREAM: u64 = 2_000;
/// The component is replaced after this many messages were answered.
const SWAP_AT: u64 = 200;

/// The manifest of plugin `answer`: `answer` and each of `extra_routes` to its `answer` handler.
fn answer_manifest(extra_routes: &[&str]) -> String {
    let routes: Vec<(&str, &str)> = std::iter::once("answer")
        .chain(extra_routes.iter().copied())
        .map(|ty| (ty, "answer"))
        .collect();
    support::swap_manifest(
        &routes,
        &[],
        &["messaging", "rooms", "kv", "logging", "config"],
        100,
    )
}

/// A host on a temp dir holding `answer.toml` and a copy of `swap_a.wasm`.
async fn answer_host(watch: WatchMode) -> Host {
    support::swap_host("swap-a", &answer_manifest(&[]), |config| {
        config.watch = watch
    })
    .await
}

/// Drains the reload events already sent; returns whether `answer` was swapped. Any
/// rejection fails the test.
fn drain_swaps(rx: &mut broadcast::Receiver<ReloadEvent>) -> bool {
    let mut swapped = false;
    loop {
        match rx.try_recv() {
            Ok(ReloadEvent::Swapped { plugin, .. }) if plugin == "answer" => swapped = true,
            Ok(ReloadEvent::Rejected { file, reason }) => {
                panic!("unexpected rejection of {}: {reason}", file.display())
            }
            Ok(_) => {}
            Err(broadcast::error::TryRecvError::Lagged(_)) => {}
            Err(_) => return swapped,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn component_swap_mid_stream_then_a_broken_component_is_refused() {
    let host = answer_host(WatchMode::Artifacts).await;
    let mut reloads = host.reloads();
    let mut c = host.client().await;
    let versions_before = support::http_get(host.addr(), "/healthz").await.body;
    let versions_before: Value = serde_json::from_str(&versions_before).unwrap();
    let version_a = versions_before["plugins"]["answer"]["version"]
        .as_str()
        .unwrap()
        .to_owned();

    // The stream: windows of WINDOW pipelined messages, each answered, then acked, in order.
    // It goes on past STREAM until a whole window was sent after the swap was reported, so
    // that the test does not depend on how long compiling the new version takes.
    let stream = async {
        let mut n: u64 = 0;
        let mut first_b: Option<u64> = None;
        let mut swapped = false;
        loop {
            let swapped_before_window = swapped;
            let start = n;
            for i in start..start + WINDOW {
                c.feed(
                    json!({"type": "answer", "messageId": format!("m-{i}"), "payload": {"n": i}}),
                )
                .await;
            }
            c.flush().await;
            for i in start..start + WINDOW {
                let answer = c.recv().await;
                assert_eq!(answer["type"], "answer", "message {i}: {answer}");
                assert_eq!(answer["payload"]["n"], i, "answers come in order: {answer}");
                match (answer["payload"]["version"].as_str(), first_b) {
                    (Some("a"), None) => {}
                    (Some("a"), Some(b)) => {
                        panic!("message {i} was answered by `a` after {b} was answered by `b`")
                    }
                    (Some("b"), None) => first_b = Some(i),
                    (Some("b"), Some(_)) => {}
                    _ => panic!("unexpected answer {answer}"),
                }
                let ack = c.recv().await;
                assert_eq!(ack["type"], "sys.ack", "message {i}: {ack}");
                assert_eq!(ack["payload"]["ref"], format!("m-{i}"), "{ack}");
            }
            n += WINDOW;
            if n == SWAP_AT {
                // Atomic replacement: write a temporary name, rename it over the component.
                host.dir
                    .replace("answer.wasm", std::fs::read(wasm("swap-b")).unwrap());
            }
            swapped |= drain_swaps(&mut reloads);
            if n >= STREAM && swapped_before_window {
                // This whole window was sent after the new version was reported serving.
                assert!(
                    first_b.is_some_and(|b| b <= start),
                    "first b: {first_b:?}, last window {start}"
                );
                break (n, first_b.unwrap());
            }
        }
    };
    let (total, first_b) = tokio::time::timeout(Duration::from_secs(300), stream)
        .await
        .expect("the stream finished");
    println!("streamed {total} messages; the first answered by `b` was {first_b}");
    assert!(
        first_b >= SWAP_AT,
        "b answered before it was installed: {first_b}"
    );
    assert!(total >= STREAM);

    let versions_after = support::http_get(host.addr(), "/healthz").await.body;
    let versions_after: Value = serde_json::from_str(&versions_after).unwrap();
    let version_b = versions_after["plugins"]["answer"]["version"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(version_a, version_b);

    // Garbage over the component: refused, and `b` keeps serving on the same connection.
    host.dir.replace(
        "answer.wasm",
        b"\0asm this is not a component at all".as_slice(),
    );
    let reason = wait_reload(
        &mut reloads,
        "the broken component to be rejected",
        |e| match e {
            ReloadEvent::Rejected { reason, .. } => Some(reason.clone()),
            ReloadEvent::Swapped { plugin, version } => {
                panic!("the broken component was swapped in: {plugin} {version}")
            }
            other => panic!("unexpected {other:?}"),
        },
    )
    .await;
    assert!(
        reason.contains("answer.wasm"),
        "the reason names the component: {reason}"
    );
    for n in 0..10 {
        assert_eq!(answer_version(&mut c, "answer", n).await, "b");
    }
    c.sync().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifest_changes_swap_without_dropping_connections() {
    let host = answer_host(WatchMode::Artifacts).await;
    let mut reloads = host.reloads();
    let mut c = host.client().await;
    assert_eq!(answer_version(&mut c, "answer", 1).await, "a");
    c.expect_error(json!({"type": "answer.again"}), "unknown_type")
        .await;

    // A route added to the manifest.
    host.dir
        .replace("answer.toml", answer_manifest(&["answer.again"]));
    wait_reload(&mut reloads, "the manifest change", |e| match e {
        ReloadEvent::Swapped { plugin, .. } if plugin == "answer" => Some(()),
        ReloadEvent::Rejected { reason, .. } => panic!("rejected: {reason}"),
        _ => None,
    })
    .await;
    assert_eq!(answer_version(&mut c, "answer.again", 2).await, "a");
    assert_eq!(answer_version(&mut c, "answer", 3).await, "a");

    // A new plugin added to the directory.
    c.expect_error(json!({"type": "echo"}), "unknown_type")
        .await;
    host.dir.replace("echo.toml", echo_manifest());
    wait_reload(&mut reloads, "the new plugin", |e| match e {
        ReloadEvent::Swapped { plugin, .. } if plugin == "echo" => Some(()),
        ReloadEvent::Rejected { reason, .. } => panic!("rejected: {reason}"),
        _ => None,
    })
    .await;
    c.echo_round_trip().await;

    // The manifest removed: its routes are gone, the rest keeps serving.
    host.dir.remove("answer.toml");
    wait_reload(&mut reloads, "the removal", |e| match e {
        ReloadEvent::Removed { plugin } if plugin == "answer" => Some(()),
        ReloadEvent::Rejected { reason, .. } => panic!("rejected: {reason}"),
        _ => None,
    })
    .await;
    for ty in ["answer", "answer.again"] {
        let err = c
            .expect_error(json!({"type": ty, "payload": {"n": 4}}), "unknown_type")
            .await;
        assert_error(&err, "unknown_type", err["payload"]["ref"].as_str());
    }
    c.echo_round_trip().await;
    c.sync().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_reload_refuses_a_route_conflict_and_keeps_the_old_version() {
    let host = answer_host(WatchMode::Off).await;
    let mut c = host.client().await;
    assert_eq!(answer_version(&mut c, "answer", 1).await, "a");

    // Nothing changed: nothing to report.
    assert_eq!(host.server.reload().await, vec![]);

    // A second plugin claiming `answer` is refused; the first keeps the route.
    let conflicting = echo_manifest().replace("type = \"echo\"", "type = \"answer\"");
    host.dir.write("zz-conflict.toml", conflicting);
    let events = host.server.reload().await;
    assert!(
        events.iter().any(
            |e| matches!(e, ReloadEvent::Rejected { reason, .. } if reason.contains("answer"))
        ),
        "{events:?}"
    );
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, ReloadEvent::Swapped { plugin, .. } if plugin == "answer")),
        "{events:?}"
    );
    assert_eq!(answer_version(&mut c, "answer", 2).await, "a");

    // Without the conflict, a new component swaps in on reload.
    host.dir.remove("zz-conflict.toml");
    host.dir
        .replace("answer.wasm", std::fs::read(wasm("swap-b")).unwrap());
    let events = host.server.reload().await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ReloadEvent::Swapped { plugin, .. } if plugin == "answer")),
        "{events:?}"
    );
    assert_eq!(answer_version(&mut c, "answer", 3).await, "b");
    c.sync().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_call_in_flight_during_a_swap_finishes_on_its_version_and_the_next_goes_to_the_new() {
    let manifest = support::swap_manifest(
        &[("answer", "answer"), ("slow", "slow")],
        &[],
        &["messaging", "kv"],
        10_000,
    );
    let host = support::swap_host("swap-a", &manifest, |_| {}).await;
    let registry = &host.server.hub().registry;
    let old = registry.table_full();
    let old = old.plugins().next().expect("the plugin");
    let mut c = host.client().await;

    // `slow` keeps version a busy until its gate opens (within its time limit).
    c.send(json!({"type": "slow", "messageId": "s-1", "payload": {"n": 1, "gate": "g"}}))
        .await;
    // Wait for the call without timers: a runtime thread is busy in it.
    support::within("the slow call to be in flight", async {
        while old.health.counts().in_flight == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    // The swap lands while it runs.
    host.dir
        .replace("answer.wasm", std::fs::read(wasm("swap-b")).unwrap());
    let events = host.server.reload().await;
    assert!(
        matches!(&events[..], [ReloadEvent::Swapped { plugin, .. }] if plugin == "answer"),
        "{events:?}"
    );
    assert_ne!(registry.report()[0].version, old.version);
    assert_eq!(
        old.health.counts().in_flight,
        1,
        "the call is still running in version a after the swap"
    );
    // Open the gate (in the store all versions share); the call answers from the version it
    // started on.
    registry
        .kv_store("answer")
        .insert("gate:g".into(), "open".into());
    let (before, ack) = c.answer_to("s-1").await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["payload"], json!({"n": 1, "version": "a"}));
    // And the next message of the same connection goes to the new version.
    assert_eq!(answer_version(&mut c, "answer", 2).await, "b");
    c.sync().await;
}

/// Connections sending at once in the exactly-once test.
const CLIENTS: usize = 20;
/// Messages each of them sends at least (they go on until the last swap was taken).
const ROUNDS: u64 = 60;
/// Swaps during the test (alternating b and a).
const SWAPS: u64 = 6;

/// What one client of the exactly-once test saw.
#[derive(Debug, Default)]
struct Seen {
    connection: String,
    room: String,
    /// Broadcast `n`s received from each other sender, in arrival order.
    from_others: HashMap<String, Vec<u64>>,
    /// `count-room` messages this client sent (their `n`s).
    broadcasts_sent: Vec<u64>,
    /// (instance, calls) of every call observed.
    calls: Vec<(u64, u64)>,
    versions: HashMap<String, u64>,
}

/// One client: joins its room, waits for all, then sends ROUNDS messages one at a time (a
/// `count`, a `count-room` broadcast, or a join of its own room that the `room.joined`
/// subscriber answers), checking that each is answered exactly once and that the counters
/// in the plugin's store go up by exactly one per message.
async fn exactly_once_client(
    mut c: Client,
    i: usize,
    start: Arc<tokio::sync::Barrier>,
    done: Arc<tokio::sync::Barrier>,
    progress: Arc<AtomicU64>,
    swapped: Arc<AtomicBool>,
) -> Seen {
    let room = format!("r{}", i % 4);
    let mut seen = Seen {
        connection: c.connection_id.clone(),
        room: room.clone(),
        ..Seen::default()
    };
    let mut counts = 0; // the last `count` of this connection
    let mut joins = 0; // the last join count
    // The frames of one message, up to its ack; anything of another sender is noted.
    async fn exchange(c: &mut Client, frame: Value, seen: &mut Seen) -> Vec<Value> {
        let id = frame["messageId"].as_str().unwrap().to_owned();
        c.send(frame).await;
        let mut own = Vec::new();
        loop {
            let f = c.recv().await;
            match f["type"].as_str().unwrap() {
                "sys.ack" => {
                    assert_eq!(f["payload"]["ref"], id, "acks come in order: {f}");
                    return own;
                }
                "sys.error" => panic!("message {id} failed: {f}"),
                "counted" if f["payload"]["connection"] != seen.connection.as_str() => {
                    note_other(seen, &f);
                }
                "room.joined" | "room.left" | "presence.changed" => {}
                _ => own.push(f),
            }
        }
    }
    let joined = exchange(
        &mut c,
        json!({"type": "sys.join", "room": room, "messageId": "join"}),
        &mut seen,
    )
    .await;
    joins += 1;
    check_join(&joined, joins, &mut seen);
    start.wait().await;
    let mut n = 0;
    while n < ROUNDS || !swapped.load(Ordering::Relaxed) {
        n += 1;
        let id = format!("m-{n}");
        match n % 3 {
            0 | 1 => {
                let (ty, room) = if n % 3 == 0 {
                    ("count", None)
                } else {
                    ("count.room", Some(room.as_str()))
                };
                let mut frame = json!({"type": ty, "messageId": id, "payload": {"n": n}});
                if let Some(room) = room {
                    frame["room"] = json!(room);
                    seen.broadcasts_sent.push(n);
                }
                let own = exchange(&mut c, frame, &mut seen).await;
                assert_eq!(own.len(), 1, "message {n}: one answer: {own:?}");
                let p = &own[0]["payload"];
                assert_eq!(own[0]["type"], "counted", "{own:?}");
                assert_eq!(p["n"], n);
                counts += 1;
                assert_eq!(
                    p["count"], counts,
                    "message {n}: the counter went up by one: {p}"
                );
                note_call(&mut seen, p);
            }
            _ => {
                let mine = format!("j{i}");
                let own = exchange(
                    &mut c,
                    json!({"type": "sys.join", "room": mine, "messageId": id}),
                    &mut seen,
                )
                .await;
                joins += 1;
                check_join(&own, joins, &mut seen);
                let left = exchange(
                    &mut c,
                    json!({"type": "sys.leave", "room": mine, "messageId": format!("l-{n}")}),
                    &mut seen,
                )
                .await;
                assert!(left.is_empty(), "{left:?}");
            }
        }
        progress.fetch_add(1, Ordering::Relaxed);
    }
    // Every client has had every message answered: every broadcast is queued by now, so
    // reading up to a pong reads them all.
    done.wait().await;
    c.send(json!({"type": "sys.ping", "payload": "end"})).await;
    loop {
        let f = c.recv().await;
        match f["type"].as_str().unwrap() {
            "sys.pong" => break,
            "counted" => note_other(&mut seen, &f),
            "room.joined" | "room.left" | "presence.changed" => {}
            _ => panic!("unexpected {f}"),
        }
    }
    seen
}

fn check_join(frames: &[Value], expected: u64, seen: &mut Seen) {
    assert_eq!(
        frames.len(),
        1,
        "one `room.joined` call per join: {frames:?}"
    );
    assert_eq!(frames[0]["type"], "joined.seen", "{frames:?}");
    let p = &frames[0]["payload"];
    assert_eq!(p["count"], expected, "the join counter went up by one: {p}");
    note_call(seen, p);
}

fn note_call(seen: &mut Seen, p: &Value) {
    seen.calls.push((
        p["instance"].as_u64().unwrap(),
        p["calls"].as_u64().unwrap(),
    ));
    *seen
        .versions
        .entry(p["version"].as_str().unwrap().to_owned())
        .or_default() += 1;
}

fn note_other(seen: &mut Seen, f: &Value) {
    let p = &f["payload"];
    assert_eq!(f["room"], seen.room.as_str(), "{f}");
    seen.from_others
        .entry(p["connection"].as_str().unwrap().to_owned())
        .or_default()
        .push(p["n"].as_u64().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_message_is_lost_or_handled_twice_across_swaps_with_state() {
    let logs = support::logs();
    let manifest = support::swap_manifest(
        &[("count", "count"), ("count.room", "count-room")],
        &[("room.joined", "joined")],
        &["messaging", "kv"],
        1000,
    );
    let host = support::swap_host("swap-a", &manifest, |c| c.watch = WatchMode::Artifacts).await;
    let mut reloads = host.reloads();
    let start = Arc::new(tokio::sync::Barrier::new(CLIENTS + 1));
    let done = Arc::new(tokio::sync::Barrier::new(CLIENTS));
    let progress = Arc::new(AtomicU64::new(0));
    let swapped = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let c = host.client().await;
        let (start, done) = (start.clone(), done.clone());
        let (progress, swapped) = (progress.clone(), swapped.clone());
        clients.push(tokio::spawn(exactly_once_client(
            c, i, start, done, progress, swapped,
        )));
    }
    start.wait().await;
    // Swap while they send, each time after another 100 messages were answered; they go on
    // until the last swap was taken.
    let swaps = async {
        for s in 1..=SWAPS {
            support::within("the clients to progress", async {
                while progress.load(Ordering::Relaxed) < 100 * s {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
            .await;
            let fixture = if s % 2 == 1 { "swap-b" } else { "swap-a" };
            host.dir
                .replace("answer.wasm", std::fs::read(wasm(fixture)).unwrap());
            wait_reload(&mut reloads, "a swap", |e| match e {
                ReloadEvent::Swapped { .. } => Some(()),
                other => panic!("unexpected {other:?}"),
            })
            .await;
        }
        swapped.store(true, Ordering::Relaxed);
    };
    let (_, seen) = tokio::join!(swaps, async {
        let mut seen = Vec::new();
        for c in clients {
            seen.push(
                support::within("a client", c)
                    .await
                    .expect("every client saw each of its messages answered exactly once"),
            );
        }
        seen
    });

    // Each broadcast reached every other member of its room exactly once, in order.
    for receiver in &seen {
        for sender in seen.iter().filter(|s| s.room == receiver.room) {
            if sender.connection == receiver.connection {
                continue;
            }
            let got = receiver
                .from_others
                .get(&sender.connection)
                .cloned()
                .unwrap_or_default();
            assert_eq!(
                got, sender.broadcasts_sent,
                "{} got these broadcasts of {}",
                receiver.connection, sender.connection
            );
        }
    }
    // Every call each instance made was seen once: no call ran without its output showing.
    let mut per_instance: HashMap<u64, Vec<u64>> = HashMap::new();
    for (instance, calls) in seen.iter().flat_map(|s| s.calls.iter()) {
        per_instance.entry(*instance).or_default().push(*calls);
    }
    for (instance, mut calls) in per_instance {
        calls.sort_unstable();
        let expected: Vec<u64> = (1..=calls.len() as u64).collect();
        assert_eq!(calls, expected, "the calls of instance {instance}");
    }
    let mut versions: HashMap<String, u64> = HashMap::new();
    for (v, n) in seen.iter().flat_map(|s| s.versions.iter()) {
        *versions.entry(v.clone()).or_default() += n;
    }
    println!("calls answered by each version: {versions:?}");
    eprintln!("calls answered by each version: {versions:?}");
    assert!(versions.get("a").is_some_and(|n| *n > 0) && versions.get("b").is_some_and(|n| *n > 0));
    // What the plugin printed reached the host's log.
    let printed = logs.lines_with(&format!("connection={}", seen[0].connection));
    assert!(
        printed
            .iter()
            .any(|l| l.contains("plugin=\"answer\"") || l.contains("plugin=answer")),
        "{printed:?}"
    );
}
