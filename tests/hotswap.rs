//! Hot swaps under load: a component replaced on disk mid-stream, a broken component refused,
//! manifests changed, added and removed, all while a client stays connected.
//!
//! The fixtures `swap-a` and `swap-b` (plugins/) answer `answer` with
//! `{"n": <payload.n>, "version": "a" | "b"}`. The host watches its manifests directory (a
//! temp dir), which also holds the component, so every change here is a file operation.

mod support;

use std::time::Duration;

use plexus::{ReloadEvent, WatchMode};
use serde_json::{Value, json};
use support::{Client, Host, TempDir, assert_error, echo_manifest, wait_reload, wasm};
use tokio::sync::broadcast;

/// Messages in flight at a time.
const WINDOW: u64 = 50;
/// The least number of messages streamed.
const STREAM: u64 = 2_000;
/// The component is replaced after this many messages were answered.
const SWAP_AT: u64 = 200;

fn answer_manifest(extra_routes: &[&str]) -> String {
    let mut text = String::from(
        r#"manifest_version = 1

[plugin]
id = "answer"

[source]
wasm = "answer.wasm"

[[route]]
type = "answer"
handler = "answer"
"#,
    );
    for ty in extra_routes {
        text.push_str(&format!(
            "\n[[route]]\ntype = \"{ty}\"\nhandler = \"answer\"\n"
        ));
    }
    text.push_str(
        "\n[capabilities]\nhost = [\"messaging\", \"rooms\", \"kv\", \"logging\", \"config\"]\n",
    );
    text
}

/// A watching host on a temp dir holding `answer.toml` and a copy of `swap_a.wasm`.
async fn answer_host(watch: WatchMode) -> Host {
    let dir = TempDir::new();
    std::fs::copy(wasm("swap-a"), dir.path().join("answer.wasm")).expect("copying swap_a.wasm");
    dir.write("answer.toml", answer_manifest(&[]));
    Host::start_in(dir, |config| config.watch = watch).await
}

/// Sends one `ty` message numbered `n`; returns the version that answered.
async fn answer_version(c: &mut Client, ty: &str, n: u64) -> String {
    let id = format!("one-{n}");
    let (before, ack) = c
        .request(json!({"type": ty, "messageId": id, "payload": {"n": n}}))
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["type"], "answer");
    assert_eq!(before[0]["payload"]["n"], n);
    before[0]["payload"]["version"].as_str().unwrap().to_owned()
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
    let version_a = versions_before["plugins"]["answer"]
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
    let version_b = versions_after["plugins"]["answer"]
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
            ReloadEvent::Removed { plugin } => panic!("{plugin} was removed"),
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
