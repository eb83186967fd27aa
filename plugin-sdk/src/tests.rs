//! Native unit tests: payload decoding, error mapping, dispatch, and the mock host.

use serde_json::{Value, json};

use crate::testing::{Effect, MockHost};
use crate::{
    Ctx, HandlerResult, HostError, LogLevel, Member, Message, PluginError, RawMessage, RawPayload,
    codes,
};

#[derive(Debug, serde::Deserialize)]
struct Greet {
    name: String,
}

fn greet(ctx: &Ctx, msg: Message<Greet>) -> HandlerResult {
    ctx.reply(
        "greeting",
        &json!({"text": format!("hello {}", msg.payload.name)}),
    )?;
    Ok(None)
}

fn raw(ctx: &Ctx, msg: Message<RawPayload>) -> HandlerResult {
    ctx.reply_raw("raw", msg.payload.as_str());
    Ok(Some(json!({"len": msg.payload.as_str().len()})))
}

fn shout(ctx: &Ctx, msg: Message) -> HandlerResult {
    let room = msg.require_room()?;
    ctx.broadcast_others(room, "shout", &msg.payload)?;
    ctx.broadcast(room, "shout.all", &msg.payload)?;
    Ok(Some(Value::Null))
}

fn bad_result(_: &Ctx, _: Message<RawPayload>) -> HandlerResult {
    Ok(Some(json!([1, 2])))
}

fn failing(ctx: &Ctx, _: Message<RawPayload>) -> HandlerResult {
    ctx.reply("lost", &1)?;
    ctx.kv_set("written", "yes");
    // A call reads its own writes, even one that fails afterwards.
    assert_eq!(ctx.kv_get("written").as_deref(), Some("yes"));
    Err(PluginError::new("nope", "refused"))
}

fn rooms(ctx: &Ctx, msg: Message<RawPayload>) -> HandlerResult {
    let room = msg.require_room()?;
    ctx.join(room)?;
    let members = ctx.members(room)?;
    crate::ack(&json!({"members": members}))
}

fn store(ctx: &Ctx, msg: Message<Value>) -> HandlerResult {
    let count: u32 = ctx.kv_get_json("count")?.unwrap_or(0) + 1;
    ctx.kv_set_json("count", &count)?;
    let limit: u32 = ctx.config_parse("limit")?.unwrap_or(10);
    ctx.log_info(format!("count {count}"));
    ctx.send(
        "c-other",
        "count",
        &json!({"count": count, "limit": limit, "meta": msg.metadata()}),
    )?;
    Ok(None)
}

plugin! {
    "greet" => greet,
    "raw" => raw,
    "shout" => shout,
    "bad_result" => bad_result,
    "failing" => failing,
    "rooms" => rooms,
    "store" => store,
    "closure" => |ctx: &Ctx, msg: Message<u8>| { ctx.reply("n", &msg.payload)?; Ok(None) },
}

#[test]
fn typed_payload_decodes() {
    let host = MockHost::new();
    let (ack, effects) = host
        .call(
            plexus_dispatch,
            "greet",
            RawMessage::new("greet", r#"{"name":"ada"}"#),
        )
        .unwrap();
    assert_eq!(ack, None);
    assert_eq!(
        effects,
        vec![Effect::Reply {
            ty: "greeting".into(),
            payload: json!({"text": "hello ada"})
        }]
    );
}

#[test]
fn undecodable_payload_is_bad_payload() {
    let host = MockHost::new();
    for payload in ["null", "{}", r#"{"name": 3}"#, "[1]"] {
        let err = host
            .call(plexus_dispatch, "greet", RawMessage::new("greet", payload))
            .unwrap_err();
        assert_eq!(err.code, codes::BAD_PAYLOAD, "{payload}");
        assert!(
            err.message.starts_with("invalid payload"),
            "{}",
            err.message
        );
    }
    let err = host
        .call(plexus_dispatch, "closure", RawMessage::new("n", "300"))
        .unwrap_err();
    assert_eq!(err.code, "bad_payload");
}

#[test]
fn bad_metadata_is_bad_payload() {
    let err = Message::<Value>::from_raw(RawMessage::new("t", "1").with_metadata("{")).unwrap_err();
    assert_eq!(err.code, codes::BAD_PAYLOAD);
    let msg =
        Message::<Value>::from_raw(RawMessage::new("t", "1").with_metadata(r#"{"a":1}"#)).unwrap();
    assert_eq!(msg.metadata(), Some(&json!({"a": 1})));
}

#[test]
fn message_fields_are_passed_through() {
    let raw = RawMessage::new("chat.send", r#"{"name":"x"}"#)
        .with_room("lobby")
        .from_connection("c-1", "guest-1")
        .with_message_id("m-1");
    let msg = Message::<Greet>::from_raw(raw).unwrap();
    assert_eq!(msg.ty(), "chat.send");
    assert_eq!(msg.room(), Some("lobby"));
    assert_eq!(msg.require_room().unwrap(), "lobby");
    assert_eq!(msg.payload.name, "x");
    assert_eq!(msg.sender(), "guest-1");
    assert_eq!(msg.connection_id(), "c-1");
    assert_eq!(msg.message_id(), Some("m-1"));
    assert_eq!(msg.metadata(), None);
}

#[test]
fn raw_payload_is_not_parsed() {
    let host = MockHost::new();
    let text = r#"{ "b": [1, 2.50], "a": "\u00e9" }"#;
    let msg = Message::<RawPayload>::from_raw(RawMessage::new("t", text)).unwrap();
    assert_eq!(msg.payload.as_str(), text);
    assert_eq!(msg.payload.parse::<Value>().unwrap()["a"], "é");
    assert_eq!(
        msg.payload.parse::<Greet>().unwrap_err().code,
        "bad_payload"
    );
    let (ack, effects) = host
        .call(plexus_dispatch, "raw", RawMessage::new("raw", "[1]"))
        .unwrap();
    assert_eq!(ack, Some(json!({"len": 3})));
    assert_eq!(
        effects,
        vec![Effect::Reply {
            ty: "raw".into(),
            payload: json!([1])
        }]
    );
}

#[test]
fn unknown_handler() {
    let host = MockHost::new();
    let err = host
        .call(plexus_dispatch, "nope", RawMessage::new("x", "null"))
        .unwrap_err();
    assert_eq!(err.code, codes::UNKNOWN_HANDLER);
    assert!(err.message.contains("`nope`"));
    // Dispatch without the mock works too: unknown names never reach a handler.
    assert_eq!(
        plexus_dispatch("", RawMessage::new("x", "null"))
            .unwrap_err()
            .code,
        "unknown_handler"
    );
}

#[test]
fn room_required_and_broadcasts() {
    let host = MockHost::new();
    let err = host
        .call(plexus_dispatch, "shout", RawMessage::new("s", "1"))
        .unwrap_err();
    assert_eq!(err, PluginError::room_required());
    let (ack, effects) = host
        .call(
            plexus_dispatch,
            "shout",
            RawMessage::new("s", "1").with_room("r"),
        )
        .unwrap();
    assert_eq!(ack, None);
    assert_eq!(
        effects,
        vec![
            Effect::Broadcast {
                room: "r".into(),
                ty: "shout".into(),
                payload: json!(1),
                include_sender: false
            },
            Effect::Broadcast {
                room: "r".into(),
                ty: "shout.all".into(),
                payload: json!(1),
                include_sender: true
            },
        ]
    );
}

#[test]
fn host_refusal_is_forbidden() {
    let host = MockHost::new();
    host.forbid_room("secret");
    let err = host
        .call(
            plexus_dispatch,
            "shout",
            RawMessage::new("s", "1").with_room("secret"),
        )
        .unwrap_err();
    assert_eq!(err.code, codes::FORBIDDEN);
    assert!(err.message.contains("secret"));
    let err: PluginError = HostError("no".into()).into();
    assert_eq!(err, PluginError::forbidden("no"));
}

#[test]
fn result_must_be_an_object() {
    let host = MockHost::new();
    let err = host
        .call(plexus_dispatch, "bad_result", RawMessage::new("x", "null"))
        .unwrap_err();
    assert_eq!(err.code, codes::BAD_RESULT);
    assert_eq!(crate::__private::finish(Ok(Some(json!({})))), Ok(None));
    assert_eq!(
        crate::__private::finish(Ok(Some(json!({"a": 1})))),
        Ok(Some(r#"{"a":1}"#.to_owned()))
    );
}

#[test]
fn errors_discard_effects_and_kv_writes_as_the_host_does() {
    let host = MockHost::new();
    let err = host
        .call(plexus_dispatch, "failing", RawMessage::new("x", "null"))
        .unwrap_err();
    assert_eq!(err, PluginError::new("nope", "refused"));
    assert_eq!(err.to_string(), "nope: refused");
    assert_eq!(host.kv_get("written"), None);
    let (_, effects) = host
        .call(
            plexus_dispatch,
            "greet",
            RawMessage::new("g", r#"{"name":"b"}"#),
        )
        .unwrap();
    assert_eq!(effects.len(), 1);
}

#[test]
fn joins_apply_to_the_mock_rooms() {
    let host = MockHost::new();
    host.add_member("r", "c-0", "guest-0");
    let (ack, effects) = host
        .call(
            plexus_dispatch,
            "rooms",
            RawMessage::new("x", "null")
                .with_room("r")
                .from_connection("c-1", "guest-1"),
        )
        .unwrap();
    // Joins apply after the handler returns: the member list it saw is the old one.
    assert_eq!(
        ack,
        Some(json!({"members": [{"connectionId": "c-0", "identity": "guest-0"}]}))
    );
    assert_eq!(effects, vec![Effect::Join { room: "r".into() }]);
    assert_eq!(
        host.members("r"),
        vec![Member::new("c-0", "guest-0"), Member::new("c-1", "guest-1")]
    );
}

#[test]
fn kv_config_logging() {
    let host = MockHost::new().with_config("limit", "5");
    for expected in 1..=2 {
        let (_, effects) = host
            .call(
                plexus_dispatch,
                "store",
                RawMessage::new("x", "null").with_metadata(r#"{"t":1}"#),
            )
            .unwrap();
        assert_eq!(
            effects,
            vec![Effect::Send {
                connection_id: "c-other".into(),
                ty: "count".into(),
                payload: json!({"count": expected, "limit": 5, "meta": {"t": 1}})
            }]
        );
    }
    assert_eq!(host.kv_get("count").as_deref(), Some("2"));
    assert_eq!(
        host.logs(),
        vec![
            (LogLevel::Info, "count 1".into()),
            (LogLevel::Info, "count 2".into())
        ]
    );

    let host = MockHost::new().with_config("limit", "many");
    let err = host
        .call(plexus_dispatch, "store", RawMessage::new("x", "null"))
        .unwrap_err();
    assert_eq!(err.code, codes::BAD_CONFIG);
    host.kv_set("count", "\"x\"");
    let err = host
        .call(plexus_dispatch, "store", RawMessage::new("x", "null"))
        .unwrap_err();
    assert_eq!(err.code, codes::INTERNAL);
}

#[test]
fn wit_conversions() {
    let wit = crate::__private::WitMessage {
        text: "1tscr{}".into(),
        type_len: 1,
        sender_len: 1,
        connection_id_len: 1,
        room_len: Some(1),
        message_id_len: None,
        metadata_len: Some(2),
    };
    let raw = crate::__private::from_wit(wit).unwrap();
    assert_eq!(
        raw,
        RawMessage::new("t", "1")
            .with_room("r")
            .from_connection("c", "s")
            .with_metadata("{}")
    );
    let bad = crate::__private::WitMessage {
        text: "1".into(),
        type_len: 1,
        sender_len: 1,
        connection_id_len: 1,
        room_len: None,
        message_id_len: None,
        metadata_len: None,
    };
    assert_eq!(
        crate::__private::from_wit(bad).unwrap_err().code,
        codes::INTERNAL
    );
    let err = crate::__private::to_wit(PluginError::new("a", "b"));
    assert_eq!((err.code.as_str(), err.message.as_str()), ("a", "b"));
}

#[test]
fn handle_says_true_only_for_an_empty_ok() {
    use crate::__private::{WitMessage, handle, take_result};
    let _host = MockHost::new();
    let wit = || WitMessage {
        text: "[1]tsc".into(),
        type_len: 1,
        sender_len: 1,
        connection_id_len: 1,
        room_len: None,
        message_id_len: None,
        metadata_len: None,
    };
    let index = |name: &str| PLEXUS_HANDLERS.iter().position(|h| *h == name).unwrap() as u32;
    // `closure` replies and returns Ok(None): the fast path.
    let three = WitMessage {
        text: "3tsc".into(),
        ..wit()
    };
    assert!(handle(
        PLEXUS_HANDLERS,
        index("closure"),
        three,
        plexus_dispatch
    ));
    assert_eq!(take_result().ok(), Some(None));
    // `raw` returns ack fields: fetched once.
    assert!(!handle(
        PLEXUS_HANDLERS,
        index("raw"),
        wit(),
        plexus_dispatch
    ));
    assert_eq!(take_result().ok(), Some(Some(r#"{"len":3}"#.to_owned())));
    assert_eq!(take_result().ok(), Some(None));
    // `failing` and an unknown index return errors.
    assert!(!handle(
        PLEXUS_HANDLERS,
        index("failing"),
        wit(),
        plexus_dispatch
    ));
    assert_eq!(take_result().unwrap_err().code, "nope");
    assert!(!handle(PLEXUS_HANDLERS, 99, wit(), plexus_dispatch));
    assert_eq!(take_result().unwrap_err().code, codes::UNKNOWN_HANDLER);
}

#[test]
fn handlers_are_listed_in_the_order_handle_numbers_them() {
    assert_eq!(
        PLEXUS_HANDLERS,
        [
            "greet",
            "raw",
            "shout",
            "bad_result",
            "failing",
            "rooms",
            "store",
            "closure"
        ]
    );
}
