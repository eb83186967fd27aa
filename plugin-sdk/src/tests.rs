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

#[derive(Debug, serde::Deserialize)]
struct Roles {
    roles: Vec<String>,
}

fn whoami(ctx: &Ctx, msg: Message) -> HandlerResult {
    let claims: Option<Value> = ctx.claims(msg.connection_id())?;
    let roles = match msg.payload["typed"].as_bool() {
        Some(true) => ctx.claims::<Roles>(msg.connection_id())?.map(|c| c.roles),
        _ => None,
    };
    crate::ack(&json!({"claims": claims, "roles": roles}))
}

/// `{"by"}`: adds to `n` and tells `c-other` the sum; a second `incr` in the same call sees it.
fn counter(ctx: &Ctx, msg: Message<i64>) -> HandlerResult {
    let n = ctx.kv_incr("n", msg.payload)?;
    assert_eq!(ctx.kv_incr("n", 0)?, n, "a call reads its own writes");
    ctx.send("c-other", "sum", &n)?;
    crate::ack(&json!({"n": n}))
}

/// `{"expected", "value"}`: compare-and-set of `owner`.
fn claim(ctx: &Ctx, msg: Message<(Option<String>, Option<String>)>) -> HandlerResult {
    let (expected, value) = &msg.payload;
    let set = ctx.kv_compare_and_set("owner", expected.as_deref(), value.as_deref());
    crate::ack(&json!({"set": set, "now": ctx.kv_get("owner")}))
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
    "whoami" => whoami,
    "counter" => counter,
    "claim" => claim,
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
fn claims_are_the_connections_own_and_none_for_guests() {
    let claims = json!({"sub": "ada", "exp": 99, "roles": ["admin"]});
    let host = MockHost::new().with_claims("c-1", &claims);
    let ask = |conn: &str, typed: bool| {
        let msg = RawMessage::json("whoami", &json!({"typed": typed})).from_connection(conn, "x");
        host.call(plexus_dispatch, "whoami", msg)
    };
    let (ack, effects) = ask("c-1", true).unwrap();
    assert_eq!(ack, Some(json!({"claims": claims, "roles": ["admin"]})));
    assert!(effects.is_empty(), "reading claims records nothing");
    let (ack, _) = ask("c-guest", true).unwrap();
    assert_eq!(ack, Some(json!({"claims": null, "roles": null})));
    // Claims that do not decode into the handler's type.
    let host = MockHost::new().with_claims("c-2", &json!({"sub": "bo", "roles": "admin"}));
    let msg = RawMessage::json("whoami", &json!({"typed": true})).from_connection("c-2", "bo");
    let err = host.call(plexus_dispatch, "whoami", msg).unwrap_err();
    assert_eq!(err.code, codes::BAD_CLAIMS, "{err:?}");
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
            "closure",
            "whoami",
            "counter",
            "claim"
        ]
    );
}

/// Timers and requests against the mock host, with a plugin of their own.
mod deferred {
    use std::time::Duration;

    use serde_json::{Value, json};

    use crate::testing::{Effect, MockHost};
    use crate::{Ctx, HandlerResult, Message, PluginError, RawMessage, RequestOutcome};

    /// Schedules `tick` in `delay` ms for the origin, counting to `until`.
    fn start(ctx: &Ctx, msg: Message) -> HandlerResult {
        let delay = msg.payload["delay"].as_u64().unwrap_or(100);
        let payload = json!({"to": msg.connection_id(), "n": 1, "until": msg.payload["until"]});
        let id = ctx.schedule("tick", Duration::from_millis(delay), &payload)?;
        crate::ack(&json!({"timer": id}))
    }

    /// A timer's call: tells `to`, and schedules the next tick until `until`.
    fn tick(ctx: &Ctx, msg: Message) -> HandlerResult {
        assert!(!msg.has_origin());
        assert_eq!(msg.ty(), "timer");
        let n = msg.payload["n"].as_u64().unwrap_or(0);
        let to = msg.payload["to"].as_str().unwrap_or_default();
        ctx.send(to, "tick", &json!({"n": n}))?;
        if n < msg.payload["until"].as_u64().unwrap_or(0) {
            let next = json!({"to": to, "n": n + 1, "until": msg.payload["until"]});
            ctx.schedule("tick", Duration::from_millis(100), &next)?;
        }
        Ok(None)
    }

    fn stop(ctx: &Ctx, msg: Message) -> HandlerResult {
        let id = msg.payload["timer"].as_u64().unwrap_or(0);
        crate::ack(&json!({"cancelled": ctx.cancel_timer(id)}))
    }

    /// Schedules, then fails: the timer must not exist.
    fn schedule_then_fail(ctx: &Ctx, _: Message) -> HandlerResult {
        ctx.schedule("tick", Duration::from_millis(1), &json!({}))?;
        Err(PluginError::new("nope", "refused"))
    }

    fn schedule_unknown(ctx: &Ctx, _: Message) -> HandlerResult {
        ctx.schedule("nope", Duration::from_millis(1), &json!({}))?;
        Ok(None)
    }

    /// Schedules and cancels in one call: nothing is left pending.
    fn schedule_and_cancel(ctx: &Ctx, _: Message) -> HandlerResult {
        let id = ctx.schedule("tick", Duration::from_millis(1), &json!({}))?;
        assert!(ctx.cancel_timer(id));
        assert!(!ctx.cancel_timer(id), "cancelled already");
        Ok(None)
    }

    /// Asks connection `to` (or the whole room) a question, answered to `answered`.
    fn ask(ctx: &Ctx, msg: Message) -> HandlerResult {
        let timeout = Duration::from_millis(500);
        let question = json!({"q": msg.payload["q"]});
        let id = match msg.room() {
            Some(room) => ctx.request_room(room, "question", &question, timeout, "answered")?,
            None => {
                let to = msg.payload["to"].as_str().unwrap_or_default();
                ctx.request(to, "question", &question, timeout, "answered")?
            }
        };
        ctx.kv_set(&format!("asker:{id}"), msg.connection_id());
        crate::ack(&json!({"request": id}))
    }

    /// A request's outcome: sent to the connection that asked.
    fn answered(ctx: &Ctx, msg: Message<RequestOutcome>) -> HandlerResult {
        assert_eq!(msg.ty(), "request.outcome");
        let key = format!("asker:{}", msg.payload.request_id);
        let asker = ctx.kv_get(&key).unwrap_or_default();
        ctx.kv_delete(&key);
        ctx.send(&asker, "outcome", &msg.payload)?;
        Ok(None)
    }

    /// Replies from a call with no origin: the host refuses it.
    fn reply_without_origin(ctx: &Ctx, _: Message) -> HandlerResult {
        ctx.reply("nobody", &1)?;
        Ok(None)
    }

    plugin! {
        "start" => start,
        "tick" => tick,
        "stop" => stop,
        "schedule-then-fail" => schedule_then_fail,
        "schedule-unknown" => schedule_unknown,
        "schedule-and-cancel" => schedule_and_cancel,
        "ask" => ask,
        "answered" => answered,
        "reply-without-origin" => reply_without_origin,
    }

    fn host() -> MockHost {
        MockHost::new().with_handlers(PLEXUS_HANDLERS)
    }

    fn call(host: &MockHost, handler: &str, payload: Value) -> (Option<Value>, Vec<Effect>) {
        let msg = RawMessage::json("x", &payload).from_connection("c-1", "guest-1");
        host.call(plexus_dispatch, handler, msg).unwrap()
    }

    fn sends(effects: &[Effect]) -> Vec<(String, Value)> {
        effects
            .iter()
            .filter_map(|e| match e {
                Effect::Send {
                    connection_id,
                    payload,
                    ..
                } => Some((connection_id.clone(), payload.clone())),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_timer_fires_once_when_due_and_can_reschedule() {
        let host = host();
        let (ack, effects) = call(&host, "start", json!({"delay": 100, "until": 3}));
        assert_eq!(ack, Some(json!({"timer": 1})));
        assert_eq!(
            effects,
            vec![Effect::Schedule {
                id: 1,
                handler: "tick".into(),
                delay_ms: 100,
                payload: json!({"to": "c-1", "n": 1, "until": 3}),
            }]
        );
        assert_eq!(host.pending_timers()[0].due_ms, 100);
        assert!(
            host.advance(plexus_dispatch, Duration::from_millis(99))
                .is_empty()
        );
        let fired = host.advance(plexus_dispatch, Duration::from_millis(1));
        assert_eq!(fired.len(), 1);
        assert_eq!(
            (fired[0].handler.as_str(), fired[0].ty.as_str()),
            ("tick", "timer")
        );
        let effects = fired[0].result.as_ref().unwrap();
        assert_eq!(sends(effects), vec![("c-1".to_owned(), json!({"n": 1}))]);
        // The next ticks, scheduled by the fired calls, come due within the same advance.
        let fired = host.advance(plexus_dispatch, Duration::from_secs(10));
        let ns: Vec<Value> = fired
            .iter()
            .flat_map(|f| sends(f.result.as_ref().unwrap()))
            .map(|(_, p)| p["n"].clone())
            .collect();
        assert_eq!(ns, [json!(2), json!(3)]);
        assert!(host.pending_timers().is_empty());
        assert_eq!(host.now_ms(), 10_100);
    }

    #[test]
    fn a_cancelled_timer_does_not_fire() {
        let host = host();
        call(&host, "start", json!({"delay": 100, "until": 1}));
        assert_eq!(
            call(&host, "stop", json!({"timer": 1})).0,
            Some(json!({"cancelled": true}))
        );
        assert_eq!(
            call(&host, "stop", json!({"timer": 1})).0,
            Some(json!({"cancelled": false}))
        );
        assert!(
            host.advance(plexus_dispatch, Duration::from_secs(1))
                .is_empty()
        );
        // Scheduled and cancelled in one call: nothing pending.
        let (_, effects) = call(&host, "schedule-and-cancel", json!(null));
        assert!(matches!(
            effects[..],
            [Effect::Schedule { .. }, Effect::CancelTimer { .. }]
        ));
        assert!(host.pending_timers().is_empty());
    }

    #[test]
    fn a_failed_call_schedules_nothing_and_handlers_are_checked() {
        let host = host();
        let msg = RawMessage::json("x", &json!(null));
        let err = host
            .call(plexus_dispatch, "schedule-then-fail", msg.clone())
            .unwrap_err();
        assert_eq!(err.code, "nope");
        assert!(host.pending_timers().is_empty());
        let err = host
            .call(plexus_dispatch, "schedule-unknown", msg.clone())
            .unwrap_err();
        assert_eq!(err.code, "forbidden");
        assert!(err.message.contains("no handler `nope`"), "{err:?}");
        // No origin: a reply is refused, as the host refuses it.
        let err = host
            .call(
                plexus_dispatch,
                "reply-without-origin",
                msg.without_origin(),
            )
            .unwrap_err();
        assert_eq!(err.code, "plugin_failed");
    }

    #[test]
    fn a_request_is_answered_once() {
        let host = host();
        host.add_member("lobby", "c-2", "guest-2");
        let (ack, effects) = call(&host, "ask", json!({"to": "c-2", "q": "ready?"}));
        assert_eq!(ack, Some(json!({"request": 1})));
        assert_eq!(
            effects,
            vec![Effect::Request {
                id: 1,
                connection_id: "c-2".into(),
                ty: "question".into(),
                payload: json!({"q": "ready?"}),
                timeout_ms: 500,
                handler: "answered".into(),
            }]
        );
        let fired = host
            .answer(plexus_dispatch, 1, "c-2", json!({"yes": true}))
            .expect("the only target answered");
        assert_eq!(fired.ty, "request.outcome");
        let outcome: RequestOutcome = serde_json::from_value(fired.payload.clone()).unwrap();
        assert!(!outcome.timed_out());
        assert_eq!(outcome.answer_of("c-2"), Some(&json!({"yes": true})));
        assert_eq!(outcome.answers[0].identity, "guest-2");
        let effects = fired.result.unwrap();
        assert_eq!(sends(&effects)[0].0, "c-1", "sent to the asker");
        assert!(host.pending_requests().is_empty());
        assert_eq!(host.kv_get("asker:1"), None);
        // It is over: a later timeout fires nothing.
        assert!(
            host.advance(plexus_dispatch, Duration::from_secs(1))
                .is_empty()
        );
    }

    #[test]
    fn a_request_times_out() {
        let host = host();
        call(&host, "ask", json!({"to": "c-9", "q": "there?"}));
        assert!(
            host.advance(plexus_dispatch, Duration::from_millis(499))
                .is_empty()
        );
        let fired = host.advance(plexus_dispatch, Duration::from_millis(1));
        let outcome: RequestOutcome = serde_json::from_value(fired[0].payload.clone()).unwrap();
        assert!(outcome.timed_out());
        assert!(outcome.answers.is_empty());
        assert_eq!(outcome.missing[0].connection_id, "c-9");
    }

    #[test]
    fn a_room_request_gathers_answers() {
        let host = host();
        for n in 1..=3 {
            host.add_member("lobby", &format!("c-{n}"), &format!("guest-{n}"));
        }
        let msg = RawMessage::json("x", &json!({"q": "vote"}))
            .with_room("lobby")
            .from_connection("c-1", "guest-1");
        let (_, effects) = host.call(plexus_dispatch, "ask", msg).unwrap();
        assert!(matches!(&effects[0], Effect::RequestRoom { room, .. } if room == "lobby"));
        assert!(
            host.answer(plexus_dispatch, 1, "c-3", json!("no"))
                .is_none()
        );
        assert!(
            host.answer(plexus_dispatch, 1, "c-1", json!("yes"))
                .is_none()
        );
        assert_eq!(host.pending_requests()[0].waiting.len(), 1);
        let fired = host.time_out(plexus_dispatch, 1);
        let outcome: RequestOutcome = serde_json::from_value(fired.payload).unwrap();
        assert_eq!(outcome.room.as_deref(), Some("lobby"));
        assert_eq!(outcome.answer_of("c-3"), Some(&json!("no")));
        assert_eq!(outcome.answer_of("c-1"), Some(&json!("yes")));
        assert_eq!(outcome.missing.len(), 1);
        assert_eq!(outcome.missing[0].connection_id, "c-2");
    }

    #[test]
    #[should_panic(expected = "unknown_ref")]
    fn answering_a_request_that_is_not_pending_panics() {
        let host = host();
        host.answer(plexus_dispatch, 7, "c-1", json!(1));
    }
}

#[test]
fn incr_adds_and_refuses_what_is_not_an_integer() {
    let host = MockHost::new();
    let call = |by: i64| {
        host.call(
            plexus_dispatch,
            "counter",
            RawMessage::new("c", by.to_string()),
        )
    };
    assert_eq!(call(2).unwrap().0, Some(json!({"n": 2})));
    assert_eq!(call(-5).unwrap().0, Some(json!({"n": -3})));
    assert_eq!(host.kv_get("n").as_deref(), Some("-3"));
    host.kv_set("n", &i64::MAX.to_string());
    let err = call(1).unwrap_err();
    assert_eq!(err.code, codes::BAD_VALUE);
    assert!(err.message.contains("overflows"), "{}", err.message);
    host.kv_set("n", "one");
    let err = call(1).unwrap_err();
    assert_eq!(err.code, codes::BAD_VALUE);
    assert_eq!(host.kv_get("n").as_deref(), Some("one"), "nothing changed");
}

#[test]
fn compare_and_set_sets_only_over_the_expected_value() {
    let host = MockHost::new();
    let call = |payload: Value| {
        host.call(plexus_dispatch, "claim", RawMessage::json("c", &payload))
            .unwrap()
            .0
            .unwrap()
    };
    assert_eq!(
        call(json!([null, "ada"])),
        json!({"set": true, "now": "ada"})
    );
    assert_eq!(
        call(json!([null, "bob"])),
        json!({"set": false, "now": "ada"})
    );
    assert_eq!(
        call(json!(["bob", null])),
        json!({"set": false, "now": "ada"})
    );
    assert_eq!(
        call(json!(["ada", null])),
        json!({"set": true, "now": null})
    );
    assert_eq!(host.kv_get("owner"), None);
}

#[test]
fn a_call_whose_reads_changed_runs_again_with_its_effects_discarded() {
    let host = MockHost::new();
    host.kv_set("n", "1");
    // Another call makes `n` 10 while this one runs.
    host.conflict("n", Some("10"));
    let (ack, effects) = host
        .call(plexus_dispatch, "counter", RawMessage::new("c", "1"))
        .unwrap();
    assert_eq!(host.attempts(), 2);
    assert_eq!(ack, Some(json!({"n": 11})));
    // Only the last attempt's effects.
    assert_eq!(
        effects,
        vec![Effect::Send {
            connection_id: "c-other".into(),
            ty: "sum".into(),
            payload: json!(11),
        }]
    );
    // A call that does not read the key is not disturbed by it.
    host.conflict("elsewhere", None);
    host.call(plexus_dispatch, "counter", RawMessage::new("c", "1"))
        .unwrap();
    assert_eq!(host.attempts(), 1);
    assert_eq!(host.kv_get("n").as_deref(), Some("12"));
}
