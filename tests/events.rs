//! Host events routed to plugins, through a real host, real clients and the real `relay`
//! plugin: `connect` and `disconnect`, joins and leaves made by a plugin's own effects, and a
//! `room.left` handler that joins the leaving connection, which must leave no ghost behind.

mod support;

use serde_json::{Value, json};
use support::{Client, Host, relay_manifest, wasm};

/// Sends a `sys.ping` and reads up to its answer: the frames that came first, which may only be
/// room news (joins, leaves, presence) and `seen` reports.
async fn news_before_a_ping(c: &mut Client) -> Vec<Value> {
    let id = c.next_id();
    let (mut before, ack) = c
        .request(json!({"type": "sys.ping", "messageId": id}))
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    assert_eq!(
        before.pop().map(|p| p["type"].clone()),
        Some(json!("sys.pong"))
    );
    for frame in &before {
        let ty = frame["type"].as_str().unwrap_or_default();
        assert!(
            ["room.joined", "room.left", "presence.changed", "seen"].contains(&ty),
            "{frame}"
        );
    }
    before
}

/// The `seen` frames the relay broadcasts to room `events` for each event it gets.
async fn seen(c: &mut Client) -> Value {
    let frame = c.recv_type("seen").await;
    frame["payload"].clone()
}

fn watch_events() -> Vec<(&'static str, &'static str)> {
    vec![
        ("connect", "seen"),
        ("disconnect", "seen"),
        ("room.joined", "seen"),
        ("room.left", "seen"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_disconnect_and_a_plugins_own_joins_reach_subscribers() {
    let host = Host::start(&[(
        "relay.toml",
        relay_manifest(&wasm("relay"), "a", &watch_events()),
    )])
    .await;
    let mut w = host.client().await;
    let id = w.next_id();
    let (before, ack) = w
        .request(json!({"type": "sys.join", "room": "events", "messageId": id}))
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["payload"]["event"], "room.joined", "{before:?}");

    let mut x = host.client().await;
    let who = json!({"connectionId": x.connection_id, "identity": x.identity});
    assert_eq!(
        seen(&mut w).await,
        json!({"event": "connect", "room": null, "connectionId": x.connection_id, "payload": who})
    );

    // A join made by a route handler's effect fires `room.joined` like a client's own.
    x.ack(json!({"type": "relay.join", "payload": {"room": "r1"}}))
        .await;
    let event = seen(&mut w).await;
    assert_eq!(event["event"], "room.joined", "{event}");
    assert_eq!(event["room"], "r1", "{event}");
    assert_eq!(event["connectionId"], x.connection_id.as_str(), "{event}");

    // Its rooms are left first, then the session ends.
    x.close().await;
    let event = seen(&mut w).await;
    assert_eq!(event["event"], "room.left", "{event}");
    assert_eq!(event["payload"]["reason"], "disconnect", "{event}");
    assert_eq!(
        seen(&mut w).await,
        json!({"event": "disconnect", "room": null, "connectionId": who["connectionId"], "payload": who})
    );
    w.sync().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closing_connection_joins_no_room() {
    // `relay` joins whoever leaves a room to `limbo`; `watch` (the same component) reports
    // every `room.left` and `room.joined` to room `events`, after `relay` ran (manifests are
    // called in file name order).
    let host = Host::start(&[
        (
            "relay.toml",
            relay_manifest(&wasm("relay"), "a", &[("room.left", "rejoin")]),
        ),
        (
            "watch.toml",
            relay_manifest(
                &wasm("relay"),
                "w",
                &[("room.left", "seen"), ("room.joined", "seen")],
            )
            .replace("id = \"relay\"", "id = \"watch\"")
            .replace("type = \"relay.", "type = \"watch."),
        ),
    ])
    .await;
    let mut w = host.client().await;
    w.ack(json!({"type": "sys.join", "room": "limbo"})).await;
    let id = w.next_id();
    let (before, _) = w
        .request(json!({"type": "sys.join", "room": "events", "messageId": id}))
        .await;
    assert_eq!(before.len(), 1, "its own join of `events`: {before:?}");
    let mut x = host.client().await;
    x.ack(json!({"type": "sys.join", "room": "r"})).await;
    assert_eq!(seen(&mut w).await["room"], "r");

    // A plain leave: `relay` joins x to `limbo` (x is still connected).
    x.ack(json!({"type": "sys.leave", "room": "r"})).await;
    let news = news_before_a_ping(&mut w).await;
    let joined: Vec<&Value> = news.iter().filter(|f| f["type"] == "room.joined").collect();
    assert_eq!(joined.len(), 1, "{news:?}");
    assert_eq!(joined[0]["room"], "limbo");
    assert_eq!(
        joined[0]["payload"]["connectionId"],
        x.connection_id.as_str()
    );

    // A disconnect: `relay` tries again (for `r` and for `limbo`), but a closing connection
    // joins nothing.
    x.ack(json!({"type": "sys.join", "room": "r"})).await;
    x.close().await;
    let mut left = 0;
    while left < 2 {
        let frame = w.recv().await;
        match frame["type"].as_str() {
            Some("seen") if frame["payload"]["event"] == "room.left" => {
                assert_eq!(
                    frame["payload"]["payload"]["reason"], "disconnect",
                    "{frame}"
                );
                left += 1;
            }
            Some("seen" | "room.left" | "presence.changed") => {}
            _ => panic!("unexpected {frame}"),
        }
    }
    let mut z = host.client().await;
    let ack = z.ack(json!({"type": "sys.join", "room": "limbo"})).await;
    let mut members: Vec<&str> = ack["payload"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["connectionId"].as_str().unwrap())
        .collect();
    members.sort();
    let mut expected = vec![w.connection_id.as_str(), z.connection_id.as_str()];
    expected.sort();
    assert_eq!(members, expected, "no ghost of the closed connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_events_of_one_identity_come_one_at_a_time() {
    let host = Host::start_with(
        &[(
            "relay.toml",
            relay_manifest(&wasm("relay"), "a", &[("connect", "tally")]),
        )],
        |c| c.session.dev_identity = true,
    )
    .await;
    // `tally` reads the identity's list, waits, and writes it back: overlapping calls would
    // lose entries.
    let eves =
        futures_util::future::join_all((0..6).map(|_| Client::connect_as(host.addr(), "eve")))
            .await;
    let mut c = host.client().await;
    let ack = c
        .ack(json!({"type": "relay.conns", "payload": {"identity": "eve"}}))
        .await;
    assert_eq!(ack["payload"]["count"], eves.len(), "{ack}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_changes_reach_subscribers_without_an_origin() {
    let host = Host::start(&[(
        "relay.toml",
        relay_manifest(&wasm("relay"), "a", &[("presence.changed", "seen")]),
    )])
    .await;
    let mut w = host.client().await;
    let id = w.next_id();
    let (before, _) = w
        .request(json!({"type": "sys.join", "room": "events", "messageId": id}))
        .await;
    // Its own arrival in `events`.
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["payload"]["event"], "presence.changed");
    let mut x = host.client().await;
    x.ack(json!({"type": "sys.join", "room": "r"})).await;
    let identity = x.identity.clone();
    let presence = |state: &str| {
        json!({"event": "presence.changed", "room": "r", "connectionId": "",
               "payload": {"room": "r", "identity": identity, "state": state, "status": null}})
    };
    assert_eq!(seen(&mut w).await, presence("online"));
    x.ack(json!({"type": "sys.leave", "room": "r"})).await;
    assert_eq!(seen(&mut w).await, presence("offline"));
    w.sync().await;
}
