//! Plugin timers through a real host, real clients and the real `relay` plugin: a pending timer
//! fires once into the version serving when it comes due (across a hot swap), a cancelled one
//! never fires, and a version without the timer's handler drops it.

mod support;

use plexus::ReloadEvent;
use serde_json::{Value, json};
use support::{Client, Host, TempDir, logs, relay_manifest, str_at, toml_str, wasm};

/// A host serving the relay fixture as version `a`, its component copied into the host's dir.
async fn relay_host() -> Host {
    let dir = TempDir::new();
    std::fs::copy(wasm("relay"), dir.path().join("relay.wasm")).expect("copying the fixture");
    dir.write(
        "relay.toml",
        relay_manifest(&dir.path().join("relay.wasm"), "a", &[]),
    );
    Host::start_in(dir, |_| {}).await
}

/// Swaps plugin `relay` to the manifest `text` and checks the swap happened.
async fn swap(host: &Host, text: String) {
    host.dir.replace("relay.toml", text);
    let events = host.server.reload().await;
    assert!(
        events
            .iter()
            .any(|e| matches!(e, ReloadEvent::Swapped { plugin, .. } if plugin == "relay")),
        "{events:?}"
    );
}

/// The next frame, which must be `fired`: its `n` and the version that sent it.
async fn fired(c: &mut Client) -> (u64, String) {
    let frame = c.recv_type("fired").await;
    let n = frame["payload"]["n"].as_u64().expect("a number n");
    (n, str_at(&frame, "/payload/version").to_owned())
}

/// Sends a `sys.ping` and reads up to its ack: the frames that came before the pong.
async fn frames_before_a_ping(c: &mut Client) -> Vec<Value> {
    let id = c.next_id();
    let (mut before, ack) = c
        .request(json!({"type": "sys.ping", "messageId": id}))
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    let pong = before.pop().expect("the pong");
    assert_eq!(pong["type"], "sys.pong", "{pong}");
    before
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_timer_fires_into_the_version_serving_when_it_is_due() {
    let host = relay_host().await;
    let mut c = host.client().await;
    // A chain of timers: each call of `fire` sends `fired` n and schedules n + 1 in 20 ms.
    let ack = c
        .ack(json!({"type": "relay.later", "payload": {"delayMs": 20, "n": 1, "every": 20}}))
        .await;
    assert!(ack["payload"]["timer"].as_u64().is_some(), "{ack}");
    assert_eq!(fired(&mut c).await, (1, "a".to_owned()));
    swap(
        &host,
        relay_manifest(&host.dir.path().join("relay.wasm"), "b", &[]),
    )
    .await;
    // Every tick arrives once and in order. The first one version b handles was scheduled by
    // version a: it was pending across the swap. Once b answered, a never does again.
    let mut expected = 2;
    let mut by_b = 0;
    while by_b < 3 {
        let (n, version) = fired(&mut c).await;
        assert_eq!(n, expected, "each tick once, in order");
        expected += 1;
        match version.as_str() {
            "b" => by_b += 1,
            "a" => assert_eq!(by_b, 0, "tick {n} on version a after version b"),
            other => panic!("version {other}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_timer_never_fires() {
    let host = relay_host().await;
    let mut c = host.client().await;
    let ack = c
        .ack(json!({"type": "relay.later", "payload": {"delayMs": 50, "n": 1}}))
        .await;
    let timer = ack["payload"]["timer"].clone();
    let ack = c
        .ack(json!({"type": "relay.cancel", "payload": {"timer": timer}}))
        .await;
    assert_eq!(ack["payload"]["cancelled"], true, "{ack}");
    let ack = c
        .ack(json!({"type": "relay.cancel", "payload": {"timer": timer}}))
        .await;
    assert_eq!(ack["payload"]["cancelled"], false, "cancelled once: {ack}");
    // A later timer: had the first one not been cancelled, it would have come first.
    c.ack(json!({"type": "relay.later", "payload": {"delayMs": 100, "n": 2}}))
        .await;
    assert_eq!(fired(&mut c).await, (2, "a".to_owned()));
    assert!(frames_before_a_ping(&mut c).await.is_empty());

    // /healthz counts the pending ones.
    let ack = c
        .ack(json!({"type": "relay.later", "payload": {"delayMs": 3_600_000, "n": 3}}))
        .await;
    assert_eq!(host.healthz().await["plugins"]["relay"]["timers"], 1);
    c.ack(json!({"type": "relay.cancel", "payload": {"timer": ack["payload"]["timer"]}}))
        .await;
    assert_eq!(host.healthz().await["plugins"]["relay"]["timers"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_without_the_handler_drops_the_timer() {
    let logs = logs();
    let host = relay_host().await;
    let mut c = host.client().await;
    c.ack(json!({"type": "relay.later", "payload": {"delayMs": 20, "n": 1, "every": 20}}))
        .await;
    assert_eq!(fired(&mut c).await, (1, "a".to_owned()));
    // Plugin `relay` becomes the echo component, which has no handler `fire`.
    let echo = format!(
        "manifest_version = 1\n\n[plugin]\nid = \"relay\"\n\n[source]\nwasm = {}\n\n\
         [[route]]\ntype = \"relay.echo\"\nhandler = \"echo\"\n\n\
         [capabilities]\nhost = [\"messaging\"]\n",
        toml_str(&wasm("echo").display().to_string())
    );
    swap(&host, echo).await;
    logs.wait_for(&["timer dropped", "relay", "`fire`"]).await;
    // The chain is over: what came before is version a's, in order, and nothing comes after.
    for (expected, frame) in (2..).zip(frames_before_a_ping(&mut c).await) {
        assert_eq!(frame["type"], "fired", "{frame}");
        assert_eq!(frame["payload"]["n"], expected, "{frame}");
        assert_eq!(frame["payload"]["version"], "a", "{frame}");
    }
    assert!(frames_before_a_ping(&mut c).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_call_that_replies_fails_and_applies_nothing() {
    let logs = logs();
    let host = relay_host().await;
    let mut c = host.client().await;
    // `fire` sends `fired`, then replies: a timer's call has no origin to reply to.
    c.ack(json!({"type": "relay.later", "payload": {"delayMs": 0, "n": 7, "reply": true}}))
        .await;
    logs.wait_for(&["timer call failed", "relay", "cannot reply, join or leave"])
        .await;
    assert!(
        frames_before_a_ping(&mut c).await.is_empty(),
        "the failed call's `fired` was not sent"
    );
    // The plugin goes on: the next timer fires.
    c.ack(json!({"type": "relay.later", "payload": {"delayMs": 0, "n": 8}}))
        .await;
    assert_eq!(fired(&mut c).await, (8, "a".to_owned()));
}
