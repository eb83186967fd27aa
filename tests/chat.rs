//! The chat plugin (plugins/chat) through the host, with several real clients: joins and the
//! host's room events, broadcasts, the commands, leaves and disconnects.

mod support;

use serde_json::{Value, json};
use support::{Client, Host, assert_error, chat_manifest};

/// A host with no presence grace period and a short resume wait, so that what a dropped
/// connection causes shows at once.
async fn chat_host() -> Host {
    Host::start_with(&[("chat.toml", chat_manifest())], |config| {
        config.session.presence_grace = std::time::Duration::ZERO;
        config.session.resume_ttl = std::time::Duration::from_millis(200);
    })
    .await
}

/// Joins `room`; returns the frames before the ack and the ack's members, as
/// `(connectionId, identity)` pairs.
async fn join(c: &mut Client, room: &str) -> (Vec<Value>, Vec<(String, String)>) {
    let id = c.next_id();
    let (before, ack) = c
        .request(json!({"type": "sys.join", "messageId": id, "payload": {"room": room}}))
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    let members = ack["payload"]["members"]
        .as_array()
        .unwrap_or_else(|| panic!("the join ack carries members: {ack}"))
        .iter()
        .map(|m| {
            (
                m["connectionId"].as_str().unwrap().to_owned(),
                m["identity"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    (before, members)
}

fn member(c: &Client) -> (String, String) {
    (c.connection_id.clone(), c.identity.clone())
}

/// Sends `chat.send` with `text` to `room`; returns the frames before the ack.
async fn say(c: &mut Client, room: &str, text: &str) -> Vec<Value> {
    let id = c.next_id();
    let (before, ack) = c
        .request(json!({
            "type": "chat.send", "messageId": id, "room": room, "payload": {"text": text}
        }))
        .await;
    assert_eq!(ack["type"], "sys.ack", "`{text}`: {ack}");
    before
}

/// Asserts `frame` is a `chat.message` from `from` with `text` and `nick` in `room`.
fn assert_message(frame: &Value, from: &Client, room: &str, text: &str, nick: &str) {
    assert_eq!(frame["type"], "chat.message", "{frame}");
    assert_eq!(frame["room"], room, "{frame}");
    assert_eq!(frame["sender"], from.identity.as_str(), "{frame}");
    assert_eq!(frame["payload"]["text"], text, "{frame}");
    assert_eq!(frame["payload"]["nick"], nick, "{frame}");
    assert_eq!(frame["payload"]["room"], room, "{frame}");
}

/// Reads what a member is told when `who` (a new identity) joins: `room.joined`, then its
/// identity online.
async fn saw_join(c: &mut Client, room: &str, who: &Client) {
    assert_room_event(&c.recv().await, "room.joined", room, who);
    saw_presence(c, room, &who.identity, "online").await;
}

async fn saw_presence(c: &mut Client, room: &str, identity: &str, state: &str) {
    let frame = c.recv_type("presence.changed").await;
    assert_eq!(frame["room"], room, "{frame}");
    assert_eq!(frame["payload"]["identity"], identity, "{frame}");
    assert_eq!(frame["payload"]["state"], state, "{frame}");
}

fn assert_room_event(frame: &Value, ty: &str, room: &str, who: &Client) {
    assert_eq!(frame["type"], ty, "{frame}");
    assert_eq!(frame["room"], room, "{frame}");
    assert!(
        frame.get("sender").is_none(),
        "room events come from the host: {frame}"
    );
    assert_eq!(frame["payload"]["room"], room, "{frame}");
    assert_eq!(
        frame["payload"]["connectionId"],
        who.connection_id.as_str(),
        "{frame}"
    );
    assert_eq!(
        frame["payload"]["identity"],
        who.identity.as_str(),
        "{frame}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn joins_and_broadcasts() {
    let host = chat_host().await;
    let mut a = host.client().await;
    let mut b = host.client().await;

    let (before, members) = join(&mut a, "lobby").await;
    assert!(before.is_empty(), "no topic yet: {before:?}");
    assert_eq!(members, vec![member(&a)]);

    let (before, mut members) = join(&mut b, "lobby").await;
    assert!(before.is_empty(), "{before:?}");
    members.sort();
    let mut expected = vec![member(&a), member(&b)];
    expected.sort();
    assert_eq!(members, expected);
    saw_join(&mut a, "lobby", &b).await;

    // Broadcast to the whole room, the sender included (before its ack).
    let before = say(&mut a, "lobby", "hello").await;
    assert_eq!(before.len(), 1, "{before:?}");
    let a_nick = a.identity.clone();
    assert_message(&before[0], &a, "lobby", "hello", &a_nick);
    assert_message(&b.recv().await, &a, "lobby", "hello", &a_nick);

    let before = say(&mut b, "lobby", "hi a").await;
    let b_nick = b.identity.clone();
    assert_message(&before[0], &b, "lobby", "hi a", &b_nick);
    assert_message(&a.recv().await, &b, "lobby", "hi a", &b_nick);

    // Sending to a room not joined.
    a.expect_error(
        json!({"type": "chat.send", "room": "elsewhere", "payload": {"text": "x"}}),
        "not_in_room",
    )
    .await;
    // Without a messageId: the error has no ref.
    a.send(json!({"type": "chat.send", "room": "elsewhere", "payload": {"text": "x"}}))
        .await;
    assert_error(&a.recv().await, "not_in_room", None);
    a.sync().await;
    b.sync().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands() {
    let host = chat_host().await;
    let mut a = host.client().await;
    let mut b = host.client().await;
    join(&mut a, "lobby").await;
    join(&mut b, "lobby").await;
    saw_join(&mut a, "lobby", &b).await;

    // /nick: a reply to the sender, a notice to the room, and the new nick from then on.
    let before = say(&mut a, "lobby", "/nick ada").await;
    assert_eq!(before.len(), 2, "{before:?}");
    assert_eq!(before[0]["type"], "chat.nick", "{before:?}");
    assert_eq!(before[0]["payload"]["nick"], "ada");
    let notice = format!("{} is now ada", a.identity);
    assert_eq!(before[1]["type"], "chat.notice", "{before:?}");
    assert_eq!(before[1]["payload"]["text"], notice.as_str());
    let frame = b.recv_type("chat.notice").await;
    assert_eq!(frame["payload"]["text"], notice.as_str());
    assert_eq!(frame["payload"]["room"], "lobby");

    let before = say(&mut a, "lobby", "call me ada").await;
    assert_message(&before[0], &a, "lobby", "call me ada", "ada");
    assert_message(&b.recv().await, &a, "lobby", "call me ada", "ada");

    // /me: an action message.
    let before = say(&mut a, "lobby", "/me waves").await;
    assert_message(&before[0], &a, "lobby", "waves", "ada");
    assert_eq!(before[0]["payload"]["action"], true);
    let frame = b.recv().await;
    assert_message(&frame, &a, "lobby", "waves", "ada");
    assert_eq!(frame["payload"]["action"], true);

    // /topic TEXT: kept and shown to the room.
    let before = say(&mut b, "lobby", "/topic Rust").await;
    let topic = json!({"room": "lobby", "topic": "Rust", "by": b.identity});
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["type"], "chat.topic");
    assert_eq!(before[0]["payload"], topic);
    let frame = a.recv_type("chat.topic").await;
    assert_eq!(frame["payload"], topic);
    // /topic alone: the current topic, to the sender only.
    let before = say(&mut a, "lobby", "/topic").await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["payload"], topic);
    b.sync().await;

    // A client joining later is shown the topic, then the room's history (the plugin's
    // room.joined handler), before its join is acknowledged.
    let mut c = host.client().await;
    let (before, members) = join(&mut c, "lobby").await;
    assert_eq!(before.len(), 2, "{before:?}");
    assert_eq!(before[0]["type"], "chat.topic");
    assert_eq!(before[0]["payload"], topic);
    assert_eq!(before[1]["type"], "chat.history");
    let texts: Vec<&str> = before[1]["payload"]["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("messages: {}", before[1]))
        .iter()
        .map(|m| m["text"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(texts, ["call me ada", "waves"], "{}", before[1]);
    assert_eq!(members.len(), 3);
    saw_join(&mut a, "lobby", &c).await;
    saw_join(&mut b, "lobby", &c).await;

    // /who: every member with its nick, to the sender only.
    let before = say(&mut c, "lobby", "/who").await;
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["type"], "chat.who");
    assert_eq!(before[0]["payload"]["room"], "lobby");
    let mut who: Vec<(String, String, String)> = before[0]["payload"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["connectionId"].as_str().unwrap().to_owned(),
                m["identity"].as_str().unwrap().to_owned(),
                m["nick"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    who.sort();
    let mut expected = vec![
        (
            a.connection_id.clone(),
            a.identity.clone(),
            "ada".to_owned(),
        ),
        (
            b.connection_id.clone(),
            b.identity.clone(),
            b.identity.clone(),
        ),
        (
            c.connection_id.clone(),
            c.identity.clone(),
            c.identity.clone(),
        ),
    ];
    expected.sort();
    assert_eq!(who, expected);

    // An unknown command is the plugin's own error, passed through with its code and ref.
    let err = c
        .expect_error(
            json!({"type": "chat.send", "room": "lobby", "payload": {"text": "/nope"}}),
            "unknown_command",
        )
        .await;
    assert!(
        err["payload"]["message"]
            .as_str()
            .unwrap()
            .contains("/nope"),
        "{err}"
    );

    // Nothing else reached anyone.
    for client in [&mut a, &mut b, &mut c] {
        client.sync().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leaving_and_disconnecting() {
    let host = chat_host().await;
    let mut a = host.client().await;
    let mut b = host.client().await;
    let mut c = host.client().await;
    join(&mut a, "lobby").await;
    join(&mut b, "lobby").await;
    saw_join(&mut a, "lobby", &b).await;
    join(&mut c, "lobby").await;
    saw_join(&mut a, "lobby", &c).await;
    saw_join(&mut b, "lobby", &c).await;

    // A leave: the others are told, with reason `leave`, and that its identity went offline;
    // the leaver gets only its ack.
    b.ack(json!({"type": "sys.leave", "room": "lobby"})).await;
    for other in [&mut a, &mut c] {
        let frame = other.recv().await;
        assert_room_event(&frame, "room.left", "lobby", &b);
        assert_eq!(frame["payload"]["reason"], "leave");
        saw_presence(other, "lobby", &b.identity, "offline").await;
    }
    b.sync().await;

    // b no longer hears the room, and cannot speak in it.
    let before = say(&mut a, "lobby", "after b left").await;
    assert_eq!(before.len(), 1);
    c.recv_type("chat.message").await;
    b.expect_error(
        json!({"type": "chat.send", "room": "lobby", "payload": {"text": "hey"}}),
        "not_in_room",
    )
    .await;
    b.sync().await;

    // A disconnect (a close handshake ends the session): the others are told, with reason
    // `disconnect`, then that its identity went offline.
    let c_conn = c.connection_id.clone();
    let c_identity = c.identity.clone();
    c.close().await;
    let frame = a.recv_type("room.left").await;
    assert_eq!(frame["payload"]["reason"], "disconnect", "{frame}");
    assert_eq!(frame["payload"]["connectionId"], c_conn.as_str());
    assert_eq!(frame["payload"]["identity"], c_identity.as_str());
    saw_presence(&mut a, "lobby", &c_identity, "offline").await;

    // A TCP connection dropped without a close handshake: the session waits for a resume. Its
    // identity goes offline after the grace period (none here), and it leaves its rooms when
    // the resume wait is over, with reason `expired`.
    join(&mut b, "lobby").await;
    saw_join(&mut a, "lobby", &b).await;
    let b_conn = b.connection_id.clone();
    let b_identity = b.identity.clone();
    b.drop_connection();
    saw_presence(&mut a, "lobby", &b_identity, "offline").await;
    let frame = a.recv_type("room.left").await;
    assert_eq!(frame["payload"]["reason"], "expired", "{frame}");
    assert_eq!(frame["payload"]["connectionId"], b_conn.as_str());

    // a is alone now.
    let id = a.next_id();
    let (_, ack) = a
        .request(json!({"type": "sys.join", "messageId": id, "room": "lobby"}))
        .await;
    assert_eq!(
        ack["payload"]["members"].as_array().map(Vec::len),
        Some(1),
        "{ack}"
    );
    a.sync().await;
}

/// Sends `/msg` (or any `chat.send`) from `c` in `room`; returns the frames before the ack and
/// the ack's payload.
async fn send_text(c: &mut Client, room: &str, text: &str) -> (Vec<Value>, Value) {
    let id = c.next_id();
    let (before, ack) = c
        .request(json!({
            "type": "chat.send", "messageId": id, "room": room, "payload": {"text": text}
        }))
        .await;
    assert_eq!(ack["type"], "sys.ack", "`{text}`: {ack}");
    (before, ack["payload"].clone())
}

fn assert_direct(frame: &Value, from: &str, to: &str, text: &str) {
    assert_eq!(frame["type"], "chat.direct", "{frame}");
    assert_eq!(frame["payload"]["from"], from, "{frame}");
    assert_eq!(frame["payload"]["to"], to, "{frame}");
    assert_eq!(frame["payload"]["text"], text, "{frame}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_messages_reach_every_connection_and_wait_for_the_next_connect() {
    let host = Host::start_with(&[("chat.toml", chat_manifest())], |c| {
        c.session.dev_identity = true;
    })
    .await;
    // Two connections of ada: a direct message reaches both.
    let mut ada1 = Client::connect_as(host.addr(), "ada").await;
    let mut ada2 = Client::connect_as(host.addr(), "ada").await;
    let mut bob = Client::connect_as(host.addr(), "bob").await;
    join(&mut bob, "lobby").await;
    let (before, ack) = send_text(&mut bob, "lobby", "/msg ada hello both").await;
    assert!(before.is_empty(), "{before:?}");
    assert_eq!(ack["delivered"], 2, "{ack}");
    assert_eq!(ack["kept"], false, "{ack}");
    for ada in [&mut ada1, &mut ada2] {
        assert_direct(&ada.recv().await, "bob", "ada", "hello both");
    }

    // ada has no connection: the messages are kept, and delivered, in order, on her next
    // connect, once.
    ada1.close().await;
    ada2.close().await;
    for text in ["first", "second", "third"] {
        let (_, ack) = send_text(&mut bob, "lobby", &format!("/msg ada {text}")).await;
        assert_eq!(ack["delivered"], 0, "{ack}");
        assert_eq!(ack["kept"], true, "{ack}");
    }
    let mut ada = Client::connect_as(host.addr(), "ada").await;
    for text in ["first", "second", "third"] {
        assert_direct(&ada.recv().await, "bob", "ada", text);
    }
    ada.sync().await;
    let mut again = Client::connect_as(host.addr(), "ada").await;
    again.sync().await;

    // Connections of one identity opened at the same time: the plugin loses none of them
    // (the host hands it their `connect` events one at a time).
    let eves =
        futures_util::future::join_all((0..8).map(|_| Client::connect_as(host.addr(), "eve")))
            .await;
    let (_, ack) = send_text(&mut bob, "lobby", "/msg eve all of you").await;
    assert_eq!(ack["delivered"], eves.len(), "{ack}");
    for mut eve in eves {
        assert_direct(&eve.recv().await, "bob", "eve", "all of you");
    }

    // An identity that never connected is refused.
    let id = bob.next_id();
    let (_, error) = bob
        .request(
            json!({"type": "chat.send", "messageId": id, "room": "lobby",
                        "payload": {"text": "/msg nobody hi"}}),
        )
        .await;
    assert_error(&error, "unknown_identity", Some(&id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_is_a_volatile_frame_to_the_others() {
    let host = chat_host().await;
    let mut a = host.client().await;
    let mut b = host.client().await;
    join(&mut a, "lobby").await;
    join(&mut b, "lobby").await;
    a.recv_type("room.joined").await;
    let (skipped, _) = a.recv_until_type("presence.changed").await;
    assert!(skipped.is_empty(), "{skipped:?}");
    // The typist gets only its ack; the others a frame without `seq` (not kept for a resume).
    a.ack(json!({"type": "chat.typing", "room": "lobby"})).await;
    let frame = b.recv_type("chat.typing").await;
    assert!(frame.get("seq").is_none(), "volatile: {frame}");
    assert_eq!(
        frame["payload"],
        json!({"room": "lobby", "identity": a.identity, "nick": a.identity, "expiresInMs": 5000})
    );
    b.expect_error(
        json!({"type": "chat.typing", "room": "elsewhere"}),
        "not_in_room",
    )
    .await;
    a.sync().await;
    b.sync().await;
}
