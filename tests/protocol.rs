//! The wire protocol as a client sees it (docs/protocol.md): the welcome frame, one answer per
//! `messageId` after the handler's frames, the fields the host sets, `sys.ping`, versions and
//! unknown fields, `/healthz`, the upgrade endpoint, and graceful shutdown (in-process and of
//! the real binary on SIGTERM).

mod support;

use std::collections::HashSet;
use std::process::Stdio;

use serde_json::{Value, json};
use support::{Client, Host, assert_host_frame, echo_manifest, http_get, str_at, within};
use tokio::io::{AsyncReadExt, BufReader};

async fn echo_host() -> Host {
    Host::start(&[("echo.toml", echo_manifest())]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn welcome_frame_describes_the_connection() {
    let host = echo_host().await;
    let a = host.client().await;
    let b = host.client().await;
    for client in [&a, &b] {
        let w = &client.welcome;
        assert_eq!(w["type"], "sys.welcome");
        assert_host_frame(w);
        assert!(
            w.get("sender").is_none(),
            "host-originated frames have no sender: {w}"
        );
        assert!(str_at(w, "/payload/connectionId").starts_with("c-"), "{w}");
        assert!(str_at(w, "/payload/sessionId").starts_with("s-"), "{w}");
        assert!(!str_at(w, "/payload/identity").is_empty(), "{w}");
        assert_eq!(w["payload"]["protocolVersion"], "1.1");
        // Protocol 1.1: the session's first frame, and how to resume it.
        assert_eq!(w["seq"], 1, "{w}");
        assert_eq!(str_at(w, "/payload/resumeToken").len(), 64, "{w}");
        assert_eq!(w["payload"]["resumed"], false, "{w}");
        assert_eq!(w["payload"]["hostVersion"], env!("CARGO_PKG_VERSION"));
    }
    assert_ne!(a.connection_id, b.connection_id);
    assert_ne!(
        a.welcome["payload"]["sessionId"],
        b.welcome["payload"]["sessionId"]
    );
    assert_ne!(a.identity, b.identity);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_message_id_gets_one_answer_after_the_handler_frames() {
    let host = echo_host().await;
    let mut c = host.client().await;

    // The echo comes first, then exactly one ack naming the request.
    let (before, ack) = c
        .request(json!({"type": "echo", "messageId": "c-1", "payload": {"text": "hi"}}))
        .await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["type"], "echo");
    assert_eq!(before[0]["payload"], json!({"text": "hi"}));
    assert_eq!(ack["type"], "sys.ack");
    assert_eq!(ack["payload"]["ref"], "c-1");
    c.sync().await; // no second answer

    // Numeric ids are accepted and answered as text.
    let (before, ack) = c.request(json!({"type": "echo", "messageId": 42})).await;
    assert_eq!(before.len(), 1);
    assert_eq!(
        before[0]["payload"],
        Value::Null,
        "an absent payload is null"
    );
    assert_eq!(ack["payload"]["ref"], "42");
    c.sync().await;

    // Errors answer too, once.
    let (before, err) = c.request(json!({"type": "nope", "messageId": "c-2"})).await;
    assert!(before.is_empty());
    support::assert_error(&err, "unknown_type", Some("c-2"));
    c.sync().await;

    // Pipelined requests are answered in order, each after its own echo.
    for i in 0..20 {
        c.feed(json!({"type": "echo", "messageId": format!("p-{i}"), "payload": i}))
            .await;
    }
    c.flush().await;
    for i in 0..20 {
        let echo = c.recv_type("echo").await;
        assert_eq!(echo["payload"], i);
        let ack = c.recv_type("sys.ack").await;
        assert_eq!(ack["payload"]["ref"], format!("p-{i}"));
    }
    c.sync().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_without_message_id_gets_no_ack() {
    let host = echo_host().await;
    let mut c = host.client().await;
    c.send(json!({"type": "echo", "payload": "quiet"})).await;
    let echo = c.recv_type("echo").await;
    assert_eq!(echo["payload"], "quiet");
    c.sync().await; // the next frames are the pong and its ack: no ack for the echo
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_frames_carry_id_timestamp_and_the_real_sender() {
    let host = echo_host().await;
    let mut c = host.client().await;
    let mut ids = HashSet::new();
    ids.insert(str_at(&c.welcome, "/messageId").to_owned());

    // A client-sent `sender` is ignored: the host stamps the identity it assigned.
    let (before, ack) = c
        .request(json!({
            "type": "echo", "messageId": "s-1", "sender": "mallory", "payload": {"a": 1}
        }))
        .await;
    let echo = &before[0];
    assert_host_frame(echo);
    assert_eq!(echo["sender"], c.identity.as_str(), "{echo}");
    assert_ne!(echo["sender"], "mallory");
    assert_host_frame(&ack);
    assert!(
        ack.get("sender").is_none(),
        "host-originated frames have no sender: {ack}"
    );
    for f in [echo, &ack] {
        assert!(
            ids.insert(str_at(f, "/messageId").to_owned()),
            "host ids are unique: {f}"
        );
    }

    for i in 0..10 {
        let (before, ack) = c
            .request(json!({"type": "echo", "messageId": format!("u-{i}")}))
            .await;
        for f in before.iter().chain([&ack]) {
            assert_host_frame(f);
            assert!(
                ids.insert(str_at(f, "/messageId").to_owned()),
                "host ids are unique: {f}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_is_answered_with_the_same_payload() {
    let host = echo_host().await;
    let mut c = host.client().await;
    for (i, payload) in [
        json!({"t": [1, 2, {"x": null}]}),
        json!("text"),
        json!(7),
        json!(null),
    ]
    .into_iter()
    .enumerate()
    {
        let (before, ack) = c
            .request(json!({"type": "sys.ping", "messageId": format!("p-{i}"), "payload": payload}))
            .await;
        assert_eq!(before.len(), 1, "{before:?}");
        assert_eq!(before[0]["type"], "sys.pong");
        assert_eq!(before[0]["payload"], payload);
        assert_host_frame(&before[0]);
        assert!(before[0].get("sender").is_none());
        assert_eq!(ack["type"], "sys.ack");
    }
    // Without a messageId: just the pong.
    c.send(json!({"type": "sys.ping"})).await;
    let pong = c.recv_type("sys.pong").await;
    assert_eq!(pong["payload"], Value::Null);
    c.sync().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_ignored_and_minor_versions_accepted() {
    let host = echo_host().await;
    let mut c = host.client().await;
    for version in ["1.0", "1.7"] {
        let (before, ack) = c
            .request(json!({
                "type": "echo", "messageId": format!("v-{version}"), "version": version,
                "payload": {"v": version},
                "futureField": {"nested": true}, "priority": 3,
                "metadata": {"trace": "abc"}
            }))
            .await;
        assert_eq!(ack["type"], "sys.ack", "version {version}: {ack}");
        assert_eq!(before.len(), 1);
        assert_eq!(before[0]["payload"], json!({"v": version}));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_reports_status_and_plugin_versions() {
    let host = echo_host().await;
    let _client = host.client().await;
    let resp = http_get(host.addr(), "/healthz").await;
    assert_eq!(resp.status, 200, "{resp:?}");
    assert!(
        resp.header("content-type")
            .is_some_and(|t| t.starts_with("application/json")),
        "{resp:?}"
    );
    let body: Value = serde_json::from_str(&resp.body).expect("a JSON body");
    assert_eq!(body["status"], "ok", "{body}");
    assert_eq!(body["protocolVersion"], "1.1", "{body}");
    let version = body["plugins"]["echo"]["version"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(
        version.len(),
        12,
        "the echo plugin's version is listed: {body}"
    );
    assert!(version.bytes().all(|b| b.is_ascii_hexdigit()), "{body}");
    assert_eq!(body["plugins"]["echo"]["interface"], "0.3.4", "{body}");
    assert_eq!(body["refused"], serde_json::json!([]), "{body}");
    assert_eq!(body["connections"], 1, "{body}");

    let resp = http_get(host.addr(), "/nowhere").await;
    assert_eq!(resp.status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_get_of_ws_gets_426() {
    let host = echo_host().await;
    let resp = http_get(host.addr(), "/ws").await;
    assert_eq!(resp.status, 426, "{resp:?}");
    // The host keeps serving WebSocket clients.
    let mut c = host.client().await;
    c.echo_round_trip().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_closes_connections_with_1001() {
    let host = echo_host().await;
    let mut a = host.client().await;
    let mut b = host.client().await;
    a.echo_round_trip().await;
    let Host { server, dir } = host;
    let shutdown = tokio::spawn(server.shutdown());
    for c in [&mut a, &mut b] {
        let (before, close) = c.closed().await;
        assert!(before.is_empty(), "{before:?}");
        let close = close.expect("a close frame");
        assert_eq!(u16::from(close.code), 1001, "{close:?}");
    }
    within("the shutdown to finish", shutdown)
        .await
        .expect("shutdown does not panic");
    drop(dir);
}

/// Kills the spawned binary (by its own handle) if the test ends before it exits.
struct ChildGuard(tokio::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        // A no-op once the process was reaped; otherwise SIGKILL to this child's pid only.
        let _ = self.0.start_kill();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_the_binary_down_gracefully() {
    let dir = support::TempDir::new();
    dir.write("echo.toml", echo_manifest());
    let child = tokio::process::Command::new(support::plexus_bin())
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--no-build",
            "--manifests",
        ])
        .arg(dir.path())
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawning plexus serve");
    let mut guard = ChildGuard(child);
    let pid = guard.0.id().expect("a running child");
    let mut stderr = guard.0.stderr.take().expect("piped stderr");
    let stderr_text = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });
    let mut stdout = BufReader::new(guard.0.stdout.take().expect("piped stdout"));
    let addr = support::listening_addr(&mut stdout).await;
    let Ok(addr) = addr else {
        let line = addr.unwrap_err();
        let _ = guard.0.start_kill();
        let stderr = within("stderr", stderr_text).await.unwrap_or_default();
        panic!("unexpected first line {line:?}; stderr:\n{stderr}");
    };

    let mut c = Client::connect(addr).await;
    c.echo_round_trip().await;

    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(status.success());

    let (before, close) = c.closed().await;
    assert!(before.is_empty(), "{before:?}");
    let close = close.expect("a close frame");
    assert_eq!(u16::from(close.code), 1001, "{close:?}");

    let exit = within("the binary to exit", guard.0.wait())
        .await
        .expect("waiting for the child");
    let stderr = within("stderr", stderr_text).await.unwrap_or_default();
    assert!(
        exit.success(),
        "plexus exited with {exit}; stderr:\n{stderr}"
    );
}
