//! Tests of the chat plugin against the SDK's in-memory `MockHost`: commands, nicks, topics and events.

use plexus_plugin_sdk::RawMessage;
use plexus_plugin_sdk::testing::{Effect, MockHost};
use serde_json::{Value, json};

use super::plexus_dispatch;

fn say(
    host: &MockHost,
    conn: &str,
    room: Option<&str>,
    text: &str,
) -> Result<Vec<Effect>, plexus_plugin_sdk::PluginError> {
    let mut msg = RawMessage::json("chat.send", &json!({"text": text}))
        .from_connection(conn, format!("guest-{conn}"));
    if let Some(room) = room {
        msg = msg.with_room(room);
    }
    host.call(plexus_dispatch, "send", msg)
        .map(|(ack, effects)| {
            assert_eq!(ack, None);
            effects
        })
}

fn broadcast(room: &str, ty: &str, payload: Value) -> Effect {
    Effect::Broadcast {
        room: room.into(),
        ty: ty.into(),
        payload,
        include_sender: true,
    }
}

fn reply(ty: &str, payload: Value) -> Effect {
    Effect::Reply {
        ty: ty.into(),
        payload,
    }
}

fn code(result: Result<Vec<Effect>, plexus_plugin_sdk::PluginError>) -> String {
    result.unwrap_err().code
}

#[test]
fn message_goes_to_the_whole_room() {
    let host = MockHost::new();
    assert_eq!(
        say(&host, "c1", Some("lobby"), "hi there").unwrap(),
        vec![broadcast(
            "lobby",
            "chat.message",
            json!({"text": "hi there", "nick": "guest-c1", "room": "lobby", "identity": "guest-c1"})
        )]
    );
}

#[test]
fn payload_errors() {
    let host = MockHost::new();
    assert_eq!(code(say(&host, "c1", None, "hi")), "room_required");
    assert_eq!(code(say(&host, "c1", Some("r"), "")), "bad_payload");
    assert_eq!(code(say(&host, "c1", Some("r"), "  \n")), "bad_payload");
    let no_text = RawMessage::json("chat.send", &json!({"txt": "x"})).with_room("r");
    assert_eq!(
        host.call(plexus_dispatch, "send", no_text)
            .unwrap_err()
            .code,
        "bad_payload"
    );
    let null = RawMessage::new("chat.send", "null").with_room("r");
    assert_eq!(
        host.call(plexus_dispatch, "send", null).unwrap_err().code,
        "bad_payload"
    );
}

#[test]
fn max_text_length() {
    let host = MockHost::new();
    assert!(say(&host, "c1", Some("r"), &"é".repeat(2000)).is_ok());
    assert_eq!(
        code(say(&host, "c1", Some("r"), &"a".repeat(2001))),
        "too_long"
    );

    let host = MockHost::new().with_config("max_text_length", "5");
    assert!(say(&host, "c1", Some("r"), "12345").is_ok());
    let err = say(&host, "c1", Some("r"), "123456").unwrap_err();
    assert_eq!(err.code, "too_long");
    assert!(err.message.contains('5'), "{}", err.message);

    let host = MockHost::new().with_config("max_text_length", "lots");
    assert_eq!(code(say(&host, "c1", Some("r"), "x")), "bad_config");
}

#[test]
fn nick() {
    let host = MockHost::new();
    assert_eq!(
        say(&host, "c1", Some("lobby"), "/nick ada").unwrap(),
        vec![
            reply("chat.nick", json!({"nick": "ada"})),
            broadcast(
                "lobby",
                "chat.notice",
                json!({"text": "guest-c1 is now ada", "room": "lobby"})
            ),
        ]
    );
    assert_eq!(host.kv_get("nick:c1").as_deref(), Some("ada"));
    assert_eq!(
        say(&host, "c1", Some("lobby"), "/NICK  grace ").unwrap()[1],
        broadcast(
            "lobby",
            "chat.notice",
            json!({"text": "ada is now grace", "room": "lobby"})
        )
    );
    // Same nick again: no notice.
    assert_eq!(
        say(&host, "c1", Some("lobby"), "/nick grace").unwrap(),
        vec![reply("chat.nick", json!({"nick": "grace"}))]
    );
    assert_eq!(
        say(&host, "c1", Some("lobby"), "hello").unwrap(),
        vec![broadcast(
            "lobby",
            "chat.message",
            json!({"text": "hello", "nick": "grace", "room": "lobby", "identity": "guest-c1"})
        )]
    );
    assert_eq!(
        code(say(&host, "c1", Some("lobby"), "/nick")),
        "bad_payload"
    );
    assert_eq!(
        code(say(&host, "c1", Some("lobby"), "/nick two words")),
        "bad_payload"
    );
    assert_eq!(
        code(say(
            &host,
            "c1",
            Some("lobby"),
            &format!("/nick {}", "n".repeat(33))
        )),
        "bad_payload"
    );
    assert_eq!(host.kv_get("nick:c1").as_deref(), Some("grace"));
}

#[test]
fn me() {
    let host = MockHost::new();
    assert_eq!(
        say(&host, "c1", Some("r"), "/me waves").unwrap(),
        vec![broadcast(
            "r",
            "chat.message",
            json!({"text": "waves", "nick": "guest-c1", "room": "r", "identity": "guest-c1", "action": true})
        )]
    );
    assert_eq!(code(say(&host, "c1", Some("r"), "/me ")), "bad_payload");
}

#[test]
fn topic() {
    let host = MockHost::new();
    assert_eq!(
        say(&host, "c1", Some("r"), "/topic").unwrap(),
        vec![reply(
            "chat.topic",
            json!({"room": "r", "topic": null, "by": null})
        )]
    );
    say(&host, "c1", Some("r"), "/nick ada").unwrap();
    assert_eq!(
        say(&host, "c1", Some("r"), "/topic Rust  and WASM").unwrap(),
        vec![broadcast(
            "r",
            "chat.topic",
            json!({"room": "r", "topic": "Rust  and WASM", "by": "ada"})
        )]
    );
    assert_eq!(
        say(&host, "c2", Some("r"), "/topic").unwrap(),
        vec![reply(
            "chat.topic",
            json!({"room": "r", "topic": "Rust  and WASM", "by": "ada"})
        )]
    );
    // Topics are per room.
    assert_eq!(
        say(&host, "c2", Some("other"), "/topic").unwrap(),
        vec![reply(
            "chat.topic",
            json!({"room": "other", "topic": null, "by": null})
        )]
    );
}

#[test]
fn who() {
    let host = MockHost::new();
    host.add_member("r", "c1", "guest-c1");
    host.add_member("r", "c2", "guest-c2");
    say(&host, "c2", Some("r"), "/nick bob").unwrap();
    assert_eq!(
        say(&host, "c1", Some("r"), "/who").unwrap(),
        vec![reply(
            "chat.who",
            json!({"room": "r", "members": [
                {"connectionId": "c1", "identity": "guest-c1", "nick": "guest-c1"},
                {"connectionId": "c2", "identity": "guest-c2", "nick": "bob"},
            ]})
        )]
    );
}

#[test]
fn unknown_command_and_escape() {
    let host = MockHost::new();
    let err = say(&host, "c1", Some("r"), "/dance now").unwrap_err();
    assert_eq!(err.code, "unknown_command");
    assert!(err.message.contains("/dance"), "{}", err.message);
    assert_eq!(code(say(&host, "c1", Some("r"), "/")), "unknown_command");
    assert_eq!(
        say(&host, "c1", Some("r"), "//dance").unwrap(),
        vec![broadcast(
            "r",
            "chat.message",
            json!({"text": "/dance", "nick": "guest-c1", "room": "r", "identity": "guest-c1"})
        )]
    );
}

#[test]
fn forbidden_room() {
    let host = MockHost::new();
    host.forbid_room("vip");
    assert_eq!(code(say(&host, "c1", Some("vip"), "hi")), "forbidden");
    assert_eq!(code(say(&host, "c1", Some("vip"), "/who")), "forbidden");
}

#[test]
fn joined_sends_the_topic() {
    let host = MockHost::new();
    let joined = || {
        let msg = RawMessage::json(
            "room.joined",
            &json!({"room": "r", "connectionId": "c9", "identity": "guest-c9"}),
        )
        .with_room("r")
        .from_connection("c9", "guest-c9");
        host.call(plexus_dispatch, "joined", msg).unwrap().1
    };
    assert_eq!(joined(), vec![]);
    say(&host, "c1", Some("r"), "/topic hello").unwrap();
    assert_eq!(
        joined(),
        vec![reply(
            "chat.topic",
            json!({"room": "r", "topic": "hello", "by": "guest-c1"})
        )]
    );
}

/// A host event about connection `conn` of `identity` (`connect`, `disconnect`).
fn event(host: &MockHost, handler: &str, conn: &str, identity: &str) -> Vec<Effect> {
    let msg = RawMessage::json(
        handler,
        &json!({"connectionId": conn, "identity": identity}),
    )
    .from_connection(conn, identity);
    host.call(plexus_dispatch, handler, msg).unwrap().1
}

/// `chat.send` of `text` to `room` from `conn` of `identity`: the ack and the effects.
fn send_as(
    host: &MockHost,
    conn: &str,
    identity: &str,
    room: &str,
    text: &str,
) -> Result<(Option<Value>, Vec<Effect>), plexus_plugin_sdk::PluginError> {
    let msg = RawMessage::json("chat.send", &json!({"text": text}))
        .with_room(room)
        .from_connection(conn, identity);
    host.call(plexus_dispatch, "send", msg)
}

#[test]
fn disconnect_forgets_the_nick() {
    let host = MockHost::new();
    event(&host, "connected", "c1", "guest-c1");
    say(&host, "c1", Some("r"), "/nick ada").unwrap();
    assert_eq!(host.kv_get("nick:c1").as_deref(), Some("ada"));
    assert_eq!(event(&host, "disconnected", "c1", "guest-c1"), vec![]);
    assert_eq!(host.kv_get("nick:c1"), None);
    assert_eq!(host.kv_get("conns:guest-c1"), None);
    assert_eq!(host.kv_get("seen:guest-c1"), None, "guests never come back");
}

#[test]
fn a_joiner_gets_the_last_50_messages_after_the_topic() {
    let host = MockHost::new();
    say(&host, "c1", Some("r"), "/topic hello").unwrap();
    for n in 0..55 {
        say(&host, "c1", Some("r"), &format!("m{n}")).unwrap();
    }
    say(&host, "c1", Some("other"), "elsewhere").unwrap();
    let msg = RawMessage::json(
        "room.joined",
        &json!({"room": "r", "connectionId": "c9", "identity": "guest-c9"}),
    )
    .with_room("r")
    .from_connection("c9", "guest-c9");
    let effects = host.call(plexus_dispatch, "joined", msg).unwrap().1;
    assert_eq!(effects.len(), 2, "{effects:?}");
    assert!(matches!(&effects[0], Effect::Reply { ty, .. } if ty == "chat.topic"));
    let Effect::Reply { ty, payload } = &effects[1] else {
        panic!("{effects:?}")
    };
    assert_eq!(ty, "chat.history");
    assert_eq!(payload["room"], "r");
    let texts: Vec<&str> = payload["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (5..55).map(|n| format!("m{n}")).collect();
    assert_eq!(texts, expected);
    assert_eq!(
        payload["messages"][0],
        json!({"text": "m5", "nick": "guest-c1", "room": "r", "identity": "guest-c1"})
    );
}

#[test]
fn direct_messages_reach_every_connection_of_an_identity() {
    let host = MockHost::new();
    event(&host, "connected", "c1", "ada");
    event(&host, "connected", "c2", "ada");
    let (ack, effects) = send_as(&host, "c3", "bob", "r", "/msg ada hi there").unwrap();
    assert_eq!(
        ack,
        Some(json!({"to": "ada", "delivered": 2, "kept": false}))
    );
    let payload = json!({"from": "bob", "nick": "bob", "to": "ada", "text": "hi there"});
    assert_eq!(
        effects,
        vec![
            Effect::Send {
                connection_id: "c1".into(),
                ty: "chat.direct".into(),
                payload: payload.clone()
            },
            Effect::Send {
                connection_id: "c2".into(),
                ty: "chat.direct".into(),
                payload
            },
        ]
    );
    assert_eq!(code(say(&host, "c3", Some("r"), "/msg ada")), "bad_payload");
    assert_eq!(
        code(say(&host, "c3", Some("r"), "/msg nobody hi")),
        "unknown_identity"
    );
}

#[test]
fn direct_messages_wait_for_the_next_connect_in_order() {
    let host = MockHost::new();
    event(&host, "connected", "c1", "ada");
    event(&host, "disconnected", "c1", "ada");
    for n in 0..3 {
        let (ack, effects) = send_as(&host, "c3", "bob", "r", &format!("/msg ada m{n}")).unwrap();
        assert_eq!(
            ack,
            Some(json!({"to": "ada", "delivered": 0, "kept": true}))
        );
        assert_eq!(effects, vec![]);
    }
    let effects = event(&host, "connected", "c4", "ada");
    let texts: Vec<&str> = effects
        .iter()
        .map(|e| match e {
            Effect::Reply { ty, payload } if ty == "chat.direct" => {
                payload["text"].as_str().unwrap()
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(texts, ["m0", "m1", "m2"]);
    assert_eq!(host.kv_get("inbox:ada"), None, "delivered once");
    assert_eq!(event(&host, "connected", "c5", "ada"), vec![]);
}

#[test]
fn kept_direct_messages_are_bounded() {
    let host = MockHost::new();
    event(&host, "connected", "c1", "ada");
    event(&host, "disconnected", "c1", "ada");
    for n in 0..50 {
        send_as(&host, "c3", "bob", "r", &format!("/msg ada m{n}")).unwrap();
    }
    let err = send_as(&host, "c3", "bob", "r", "/msg ada one too many").unwrap_err();
    assert_eq!(err.code, "inbox_full");
}

#[test]
fn typing_is_a_volatile_frame_to_the_others() {
    let host = MockHost::new();
    let msg = RawMessage::new("chat.typing", "null")
        .with_room("r")
        .from_connection("c1", "guest-c1");
    let (_, effects) = host.call(plexus_dispatch, "typing", msg).unwrap();
    assert_eq!(
        effects,
        vec![Effect::BroadcastVolatile {
            room: "r".into(),
            ty: "chat.typing".into(),
            payload: json!({"room": "r", "identity": "guest-c1", "nick": "guest-c1", "expiresInMs": 5000}),
            include_sender: false,
        }]
    );
    let msg = RawMessage::new("chat.typing", "null").from_connection("c1", "guest-c1");
    assert_eq!(
        host.call(plexus_dispatch, "typing", msg).unwrap_err().code,
        "room_required"
    );
}

#[test]
fn a_join_delivers_what_was_kept_meanwhile() {
    let host = MockHost::new();
    event(&host, "connected", "c1", "ada");
    event(&host, "disconnected", "c1", "ada");
    // Kept while ada had no connection; she connected since (the connect found nothing).
    send_as(&host, "c3", "bob", "r", "/msg ada late").unwrap();
    let msg = RawMessage::json(
        "room.joined",
        &json!({"room": "r", "connectionId": "c4", "identity": "ada"}),
    )
    .with_room("r")
    .from_connection("c4", "ada");
    let effects = host.call(plexus_dispatch, "joined", msg).unwrap().1;
    assert!(
        matches!(&effects[..], [Effect::Reply { ty, payload }] if ty == "chat.direct" && payload["text"] == "late"),
        "{effects:?}"
    );
    assert_eq!(host.kv_get("inbox:ada"), None);
}
