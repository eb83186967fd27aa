//! Presence (docs/protocol.md, "Presence"): an identity is online in a room from its first
//! connection there until its last one leaves; a dropped connection starts a grace period, and a
//! return inside it causes no offline/online flap. Real host, real sockets; two connections share
//! an identity through the development identity setting.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Client, Host, echo_manifest};

async fn host(grace: Duration) -> Host {
    Host::start_with(&[("echo.toml", echo_manifest())], |config| {
        config.session.dev_identity = true;
        config.session.presence_grace = grace;
    })
    .await
}

/// Joins `room`; returns the ack's presence list as `(identity, connections)`.
async fn join(c: &mut Client, room: &str) -> Vec<(String, u64)> {
    let ack = c.ack(json!({ "type": "sys.join", "room": room })).await;
    listed(&ack)
}

/// Leaves `room` (whatever the room told this client before).
async fn leave(c: &mut Client, room: &str) {
    acked(c, json!({ "type": "sys.leave", "room": room })).await;
}

/// Sends `frame` with a fresh id and asserts its ack, whatever came before it.
async fn acked(c: &mut Client, mut frame: Value) {
    let id = c.next_id();
    frame["messageId"] = json!(id);
    let (_, ack) = c.request(frame).await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
}

fn listed(ack: &Value) -> Vec<(String, u64)> {
    ack["payload"]["presence"]
        .as_array()
        .unwrap_or_else(|| panic!("a presence list: {ack}"))
        .iter()
        .map(|p| {
            (
                p["identity"].as_str().unwrap().to_owned(),
                p["connections"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// The next `presence.changed` for `room`, skipping room events; returns (identity, state).
async fn next_change(c: &mut Client) -> (String, String, Value) {
    loop {
        let frame = c.recv().await;
        match frame["type"].as_str() {
            Some("room.joined" | "room.left") => continue,
            Some("presence.changed") => {
                let p = &frame["payload"];
                return (
                    p["identity"].as_str().unwrap().to_owned(),
                    p["state"].as_str().unwrap().to_owned(),
                    p["status"].clone(),
                );
            }
            _ => panic!("unexpected {frame}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_stays_online_until_its_last_connection_leaves_and_a_quick_return_does_not_flap()
 {
    let grace = Duration::from_millis(400);
    let host = host(grace).await;
    let mut watcher = Client::connect_as(host.addr(), "watcher").await;
    assert_eq!(join(&mut watcher, "p").await, [("watcher".to_owned(), 1)]);

    // Two tabs of one identity: online once.
    let mut tab1 = Client::connect_as(host.addr(), "ada").await;
    let mut tab2 = Client::connect_as(host.addr(), "ada").await;
    join(&mut tab1, "p").await;
    assert_eq!(next_change(&mut watcher).await.0, "ada");
    let list = join(&mut tab2, "p").await;
    assert!(list.contains(&("ada".to_owned(), 2)), "{list:?}");

    // One tab leaves: still online.
    leave(&mut tab1, "p").await;
    // The other drops without a close; a new connection of the identity comes back inside the
    // grace period: no change.
    tab2.drop_connection();
    let mut tab3 = Client::connect_as(host.addr(), "ada").await;
    let list = join(&mut tab3, "p").await;
    // Online: tab3, and tab2 until the host has seen its socket go (either may come first).
    assert!(
        list.iter()
            .any(|(who, n)| who == "ada" && (1..=2).contains(n)),
        "{list:?}"
    );
    // A second identity drops for good: its offline comes after the grace period, so any flap
    // of ada's (whose grace period began earlier) would have come before it.
    let mut bob = Client::connect_as(host.addr(), "bob").await;
    join(&mut bob, "p").await;
    assert_eq!(
        next_change(&mut watcher).await,
        ("bob".to_owned(), "online".to_owned(), Value::Null)
    );
    bob.drop_connection();
    assert_eq!(
        next_change(&mut watcher).await,
        ("bob".to_owned(), "offline".to_owned(), Value::Null)
    );

    // A status, told to the room and listed.
    acked(
        &mut tab3,
        json!({ "type": "sys.status", "payload": { "status": "in a meeting" } }),
    )
    .await;
    let (who, state, status) = next_change(&mut watcher).await;
    assert_eq!((who.as_str(), state.as_str()), ("ada", "online"));
    assert_eq!(status, "in a meeting");
    let ack = watcher
        .ack(json!({ "type": "sys.presence", "room": "p" }))
        .await;
    let ada = ack["payload"]["presence"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["identity"] == "ada")
        .cloned()
        .expect("ada is listed");
    assert_eq!(ada["status"], "in a meeting", "{ack}");

    // The last connection leaves: offline at once (a leave is no disconnect).
    leave(&mut tab3, "p").await;
    let (who, state, _) = next_change(&mut watcher).await;
    assert_eq!((who.as_str(), state.as_str()), ("ada", "offline"));
    watcher.sync().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_requests_are_checked() {
    let host = host(Duration::from_secs(5)).await;
    let mut c = host.client().await;
    c.expect_error(
        json!({ "type": "sys.presence", "room": "p" }),
        "not_in_room",
    )
    .await;
    c.expect_error(json!({ "type": "sys.presence" }), "room_required")
        .await;
    let long = "x".repeat(65);
    c.expect_error(
        json!({ "type": "sys.status", "payload": { "status": long } }),
        "bad_frame",
    )
    .await;
    c.expect_error(json!({ "type": "sys.status", "payload": 3 }), "bad_frame")
        .await;
    // Development identities are refused unless the setting is on, and checked when it is.
    let off = Host::start(&[("echo.toml", echo_manifest())]).await;
    let guest = Client::connect_to(off.addr(), "/ws?devIdentity=ada").await;
    assert!(guest.identity.starts_with("guest-"), "{}", guest.identity);
    let url = format!("ws://{}/ws?devIdentity=a%20b", host.addr());
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 400, "{resp:?}");
        }
        other => panic!("expected a 400, got {other:?}"),
    }
}
