//! Plugins in a sandbox (docs/operations.md, "Plugins out of service"): a hostile plugin (an
//! endless loop, a memory hog, a panic), flooded by ten clients, does not slow down another
//! client's echo; a version that keeps failing is taken out of service (`plugin_unavailable`)
//! and tried again after a cool-down. Real host, real sockets, the real fixture plugins.

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use plexus::registry::BreakerPolicy;
use serde_json::{Value, json};
use support::{Client, Host, echo_manifest, faulty_manifest, within};
use tokio_tungstenite::tungstenite::Message;

async fn host(breaker: BreakerPolicy) -> Host {
    Host::start_with(
        &[
            ("echo.toml", echo_manifest()),
            ("faulty.toml", faulty_manifest()),
        ],
        |config| config.limits.breaker = breaker,
    )
    .await
}

/// Sends `count` frames of type `ty` as fast as the socket takes them and reads every answer;
/// returns the error codes by count.
async fn flood(addr: std::net::SocketAddr, ty: &'static str, count: usize) -> Vec<String> {
    let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ws"))
        .await
        .expect("connect");
    let (mut sink, mut stream) = ws.split();
    let writer = tokio::spawn(async move {
        for n in 0..count {
            let frame = json!({"type": ty, "messageId": format!("f-{n}")});
            sink.send(Message::text(frame.to_string()))
                .await
                .expect("send");
        }
        sink
    });
    let mut codes = Vec::new();
    while codes.len() < count {
        match stream.next().await {
            Some(Ok(Message::Text(text))) => {
                let frame: Value = serde_json::from_str(&text).unwrap();
                if frame["type"] == "sys.error" {
                    codes.push(frame["payload"]["code"].as_str().unwrap().to_owned());
                }
            }
            Some(Ok(_)) => {}
            other => panic!("the flood's connection ended: {other:?}"),
        }
    }
    drop(writer.await);
    codes
}

/// Ten clients flood `ty` while another client echoes every 20 ms (a load shape, not a wait);
/// returns the echo latencies and the flood's error codes.
async fn echo_during_flood(host: &Host, ty: &'static str) -> (Vec<Duration>, Vec<String>) {
    let mut calm = host.client().await;
    let floods: Vec<_> = (0..10)
        .map(|_| tokio::spawn(flood(host.addr(), ty, 100)))
        .collect();
    let mut latencies = Vec::new();
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    while latencies.len() < 20 || floods.iter().any(|f| !f.is_finished()) {
        pace.tick().await;
        let started = Instant::now();
        calm.echo_round_trip().await;
        latencies.push(started.elapsed());
        assert!(latencies.len() < 5_000, "the flood never ended");
    }
    let mut codes = Vec::new();
    for f in floods {
        codes.extend(within("a flood", f).await.unwrap());
    }
    latencies.sort();
    (latencies, codes)
}

fn p99(sorted: &[Duration]) -> Duration {
    sorted[(sorted.len() - 1) * 99 / 100]
}

async fn a_hostile_plugin_does_not_slow_down_another_clients_echo(ty: &'static str) {
    let host = host(BreakerPolicy::default()).await;
    let (latencies, codes) = echo_during_flood(&host, ty).await;
    eprintln!(
        "{ty}: {} echoes during the flood, p99 {:?}, max {:?}; flood answers: {} plugin_failed, {} plugin_unavailable",
        latencies.len(),
        p99(&latencies),
        latencies.last().unwrap(),
        codes.iter().filter(|c| *c == "plugin_failed").count(),
        codes.iter().filter(|c| *c == "plugin_unavailable").count(),
    );
    // Every flooding frame was answered with an error, and the version was taken out of
    // service rather than called a thousand times.
    assert_eq!(codes.len(), 1000);
    assert!(
        codes
            .iter()
            .all(|c| c == "plugin_failed" || c == "plugin_unavailable")
    );
    assert!(
        codes.iter().filter(|c| *c == "plugin_unavailable").count() > 900,
        "the circuit opened"
    );
    // A generous bound for a shared test machine; the figures are in docs/benchmarks.md.
    assert!(
        *latencies.last().unwrap() < Duration::from_millis(250),
        "another client's echo took {:?}",
        latencies.last().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_loop_flooded_by_ten_clients_leaves_another_clients_echo_fast() {
    a_hostile_plugin_does_not_slow_down_another_clients_echo("faulty.spin").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_hog_flooded_by_ten_clients_leaves_another_clients_echo_fast() {
    a_hostile_plugin_does_not_slow_down_another_clients_echo("faulty.hog").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_plugin_flooded_by_ten_clients_leaves_another_clients_echo_fast() {
    a_hostile_plugin_does_not_slow_down_another_clients_echo("faulty.trap").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_version_is_taken_out_of_service_and_tried_again_after_its_cool_down() {
    let host = host(BreakerPolicy {
        failures: 3,
        cool_down: Duration::from_millis(300),
        ..BreakerPolicy::default()
    })
    .await;
    let mut c = host.client().await;
    for _ in 0..3 {
        c.expect_error(json!({"type": "faulty.trap"}), "plugin_failed")
            .await;
    }
    // Open: even a call that would succeed is refused, without running.
    let refused = c
        .expect_error(
            json!({"type": "faulty.ok", "payload": 1}),
            "plugin_unavailable",
        )
        .await;
    assert!(
        support::str_at(&refused, "/payload/message").contains("out of service"),
        "{refused}"
    );
    let health = host.healthz().await;
    assert_eq!(health["plugins"]["faulty"]["circuit"], "open", "{health}");
    assert_eq!(health["plugins"]["faulty"]["circuitTrips"], 1, "{health}");
    // Other plugins are untouched.
    c.echo_round_trip().await;
    // After the cool-down, one call tries the version; it succeeds and the circuit closes.
    let mut pace = tokio::time::interval(Duration::from_millis(50));
    loop {
        pace.tick().await;
        let id = c.next_id();
        let (_, answer) = c
            .request(json!({"type": "faulty.ok", "messageId": id, "payload": 2}))
            .await;
        if answer["type"] == "sys.ack" {
            break;
        }
        assert_eq!(answer["payload"]["code"], "plugin_unavailable", "{answer}");
    }
    let health = host.healthz().await;
    assert_eq!(health["plugins"]["faulty"]["circuit"], "closed", "{health}");
    // Failing again after the cool-down opens it again at once.
    for _ in 0..3 {
        c.expect_error(json!({"type": "faulty.trap"}), "plugin_failed")
            .await;
    }
    c.expect_error(json!({"type": "faulty.trap"}), "plugin_unavailable")
        .await;
    assert_eq!(host.healthz().await["plugins"]["faulty"]["circuitTrips"], 2);
    let _ = Client::connect(host.addr()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_circuit_breaker_off_the_slow_lane_keeps_an_endless_loop_off_the_runtime() {
    let host = host(BreakerPolicy {
        failures: 0,
        ..BreakerPolicy::default()
    })
    .await;
    let mut calm = host.client().await;
    let floods: Vec<_> = (0..10)
        .map(|_| tokio::spawn(flood(host.addr(), "faulty.spin", 10)))
        .collect();
    let mut latencies = Vec::new();
    let mut pace = tokio::time::interval(Duration::from_millis(20));
    while floods.iter().any(|f| !f.is_finished()) {
        pace.tick().await;
        let started = Instant::now();
        calm.echo_round_trip().await;
        latencies.push(started.elapsed());
    }
    for f in floods {
        let codes = within("a flood", f).await.unwrap();
        assert!(codes.iter().all(|c| c == "plugin_failed"), "{codes:?}");
    }
    latencies.sort();
    eprintln!(
        "slow lane: {} echoes during 100 calls of 50 ms, p99 {:?}, max {:?}",
        latencies.len(),
        p99(&latencies),
        latencies.last().unwrap()
    );
    assert!(host.healthz().await["plugins"]["faulty"]["slowLane"] == true);
    assert!(
        p99(&latencies) < Duration::from_millis(100),
        "another client's echo p99 was {:?}",
        p99(&latencies)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_effect_outside_the_grant_fails_the_whole_call() {
    let logs = support::logs();
    let granted = faulty_manifest().replace(r#"rooms = ["*"]"#, r#"rooms = ["public:*"]"#);
    assert_ne!(granted, faulty_manifest(), "the fixture's grant moved");
    let host = Host::start(&[("faulty.toml", granted)]).await;
    let mut insider = host.client().await;
    insider
        .ack(json!({"type": "sys.join", "room": "secret"}))
        .await;
    let mut c = host.client().await;
    let refused = c
        .expect_error(json!({"type": "faulty.outside"}), "plugin_failed")
        .await;
    assert!(
        support::str_at(&refused, "/payload/message").contains("room `secret` is not granted"),
        "{refused}"
    );
    // Neither reply of the call reached its sender, nor the broadcast the room.
    c.sync().await;
    insider.sync().await;
    assert!(
        !logs
            .lines_with("effect outside the plugin's grant refused")
            .is_empty()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_frames_of_a_connection_that_went_away_are_dropped_not_handled() {
    // The breaker off, so that every handled frame costs a whole 50 ms call.
    let host = host(BreakerPolicy {
        failures: 0,
        ..BreakerPolicy::default()
    })
    .await;
    let mut gone = host.client().await;
    const SENT: u64 = 300;
    for n in 0..SENT {
        gone.feed(json!({"type": "faulty.spin", "messageId": format!("spin-{n}")}))
            .await;
    }
    gone.flush().await;
    gone.drop_connection();
    within("the host to notice the connection went away", async {
        while host.healthz().await["connections"] != 0 {
            tokio::task::yield_now().await;
        }
    })
    .await;
    let calls = host.healthz().await["plugins"]["faulty"]["calls"]
        .as_u64()
        .unwrap();
    eprintln!("{calls} of {SENT} frames handled after the client went away");
    assert!(calls < SENT / 4, "{calls} of {SENT} frames were handled");
}
