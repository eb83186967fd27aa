//! Test fixture for timers and requests (emit with ack). Every frame it sends names the
//! `version` of its manifest's `[config]`, so that a test sees which version made a call.
//!
//! | route / handler | does |
//! | --- | --- |
//! | `relay.later` `{"delayMs", "n", "every"?, "reply"?}` → `later` | schedules `fire` after `delayMs` with `{"to": <origin>, "n", "every", "reply"}`; acks `{"timer"}` |
//! | `relay.cancel` `{"timer"}` → `cancel` | cancels the timer; acks `{"cancelled"}` |
//! | `fire` (a timer) | sends `fired` `{"n", "version"}` to `to`; with `every`, schedules itself again after `every` ms with `n + 1`; with `reply`, also replies, which a call with no origin may not (the call fails) |
//! | `relay.join` `{"room"}` → `join` | makes the origin join `room` |
//! | `seen` (any event) | broadcasts `seen` `{"event", "room", "connectionId", "payload"}` to room `events` |
//! | `rejoin` (an event) | makes the origin join room `limbo` |
//! | `tally` (`connect`) | adds the origin to the list `conns:<identity>` in the store, slowly (a read, a busy wait, a write: calls that overlap would lose an entry) |
//! | `relay.conns` `{"identity"}` → `conns` | acks `{"count"}`: the length of that list |
//! | `relay.ask` `{"to"?, "timeoutMs", "q"}` → `ask` | asks connection `to` (default: the origin), or the envelope's room, a `question` `{"q"}`; remembers the asker; acks `{"request"}` |
//! | `answered` (an outcome) | sends the asker `outcome` `{"outcome", "version"}` |
//! | `relay.send` `{"to", "body"}` → `send` | sends connection `to` (on any node of a cluster) `relayed` `{"body", "from"}` |
//! | `relay.incr` `{"key", "by"?}` → `incr` | adds `by` (default 1) to the counter `key` in the store; acks `{"value"}`, the new value |
//! | `relay.cas` `{"key", "expected", "value"}` → `cas` | compare-and-set of `key` (`null`: absent); acks `{"set"}` |
//! | `relay.get` `{"key"}` → `get` | acks `{"value"}`, the value of `key` in the store (`null`: absent); writes nothing |

use std::time::Duration;

use plexus_plugin_sdk::{Ctx, HandlerResult, Message, RequestOutcome, ack, plugin};
use serde_json::{Value, json};

fn version(ctx: &Ctx) -> String {
    ctx.config("version").unwrap_or_default()
}

fn later(ctx: &Ctx, msg: Message) -> HandlerResult {
    let delay = msg.payload["delayMs"].as_u64().unwrap_or(0);
    let payload = json!({"to": msg.connection_id(), "n": msg.payload["n"], "every": msg.payload["every"], "reply": msg.payload["reply"]});
    let timer = ctx.schedule("fire", Duration::from_millis(delay), &payload)?;
    ack(&json!({"timer": timer}))
}

fn cancel(ctx: &Ctx, msg: Message) -> HandlerResult {
    let timer = msg.payload["timer"].as_u64().unwrap_or(0);
    ack(&json!({"cancelled": ctx.cancel_timer(timer)}))
}

fn fire(ctx: &Ctx, msg: Message) -> HandlerResult {
    let to = msg.payload["to"].as_str().unwrap_or_default();
    let n = msg.payload.get("n").cloned().unwrap_or(Value::Null);
    ctx.send(to, "fired", &json!({"n": n, "version": version(ctx)}))?;
    if msg.payload["reply"] == true {
        ctx.reply("nobody", &n)?;
    }
    if let Some(every) = msg.payload["every"].as_u64() {
        let next = json!({"to": to, "n": n.as_u64().unwrap_or(0) + 1, "every": every});
        ctx.schedule("fire", Duration::from_millis(every), &next)?;
    }
    Ok(None)
}

fn send(ctx: &Ctx, msg: Message) -> HandlerResult {
    let to = msg.payload["to"].as_str().unwrap_or_default();
    let body = json!({"body": msg.payload["body"], "from": msg.connection_id()});
    ctx.send(to, "relayed", &body)?;
    Ok(None)
}

fn join(ctx: &Ctx, msg: Message) -> HandlerResult {
    let room = msg.payload["room"].as_str().unwrap_or_default();
    ctx.join(room)?;
    Ok(None)
}

fn seen(ctx: &Ctx, msg: Message) -> HandlerResult {
    let body = json!({
        "event": msg.ty(),
        "room": msg.room(),
        "connectionId": msg.connection_id(),
        "payload": msg.payload,
    });
    ctx.broadcast("events", "seen", &body)?;
    Ok(None)
}

fn tally(ctx: &Ctx, msg: Message) -> HandlerResult {
    let key = format!("conns:{}", msg.sender());
    let mut conns: Vec<String> = ctx.kv_get_json(&key)?.unwrap_or_default();
    // Long enough that two overlapping calls would both read the list before either writes.
    let mut spin = 0u64;
    for i in 0..20_000_000u64 {
        spin = std::hint::black_box(spin.wrapping_add(i));
    }
    conns.push(msg.connection_id().to_owned());
    ctx.kv_set_json(&key, &conns)?;
    Ok(None)
}

fn conns(ctx: &Ctx, msg: Message) -> HandlerResult {
    let identity = msg.payload["identity"].as_str().unwrap_or_default();
    let conns: Vec<String> = ctx
        .kv_get_json(&format!("conns:{identity}"))?
        .unwrap_or_default();
    ack(&json!({"count": conns.len()}))
}

fn rejoin(ctx: &Ctx, _: Message) -> HandlerResult {
    ctx.join("limbo")?;
    Ok(None)
}

fn ask(ctx: &Ctx, msg: Message) -> HandlerResult {
    let timeout = Duration::from_millis(msg.payload["timeoutMs"].as_u64().unwrap_or(1000));
    let question = json!({"q": msg.payload["q"]});
    let request = match msg.room() {
        Some(room) => ctx.request_room(room, "question", &question, timeout, "answered")?,
        None => {
            let to = msg.payload["to"].as_str().unwrap_or(msg.connection_id());
            ctx.request(to, "question", &question, timeout, "answered")?
        }
    };
    ctx.kv_set(&format!("asker:{request}"), msg.connection_id());
    ack(&json!({"request": request}))
}

fn answered(ctx: &Ctx, msg: Message<RequestOutcome>) -> HandlerResult {
    let key = format!("asker:{}", msg.payload.request_id);
    let asker = ctx.kv_get(&key).unwrap_or_default();
    ctx.kv_delete(&key);
    let body = json!({"outcome": msg.payload, "version": version(ctx)});
    ctx.send(&asker, "outcome", &body)?;
    Ok(None)
}

fn incr(ctx: &Ctx, msg: Message) -> HandlerResult {
    let key = msg.payload["key"].as_str().unwrap_or("counter");
    let by = msg.payload["by"].as_i64().unwrap_or(1);
    ack(&json!({"value": ctx.kv_incr(key, by)?}))
}

fn cas(ctx: &Ctx, msg: Message) -> HandlerResult {
    let key = msg.payload["key"].as_str().unwrap_or_default();
    let expected = msg.payload["expected"].as_str();
    let value = msg.payload["value"].as_str();
    ack(&json!({"set": ctx.kv_compare_and_set(key, expected, value)}))
}

fn get(ctx: &Ctx, msg: Message) -> HandlerResult {
    let key = msg.payload["key"].as_str().unwrap_or_default();
    ack(&json!({"value": ctx.kv_get(key)}))
}

plugin! {
    "later" => later,
    "cancel" => cancel,
    "fire" => fire,
    "ask" => ask,
    "answered" => answered,
    "join" => join,
    "seen" => seen,
    "rejoin" => rejoin,
    "tally" => tally,
    "conns" => conns,
    "send" => send,
    "incr" => incr,
    "cas" => cas,
    "get" => get,
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use plexus_plugin_sdk::RawMessage;
    use plexus_plugin_sdk::testing::{Effect, MockHost};
    use serde_json::json;

    use super::{PLEXUS_HANDLERS, plexus_dispatch};

    #[test]
    fn a_timer_fires_to_the_connection_that_set_it() {
        let host = MockHost::new()
            .with_handlers(PLEXUS_HANDLERS)
            .with_config("version", "a");
        let msg = RawMessage::json("relay.later", &json!({"delayMs": 50, "n": 7}))
            .from_connection("c-1", "guest-1");
        let (ack, _) = host.call(plexus_dispatch, "later", msg).unwrap();
        assert_eq!(ack, Some(json!({"timer": 1})));
        let fired = host.advance(plexus_dispatch, Duration::from_millis(50));
        assert_eq!(
            fired[0].result.as_ref().unwrap(),
            &vec![Effect::Send {
                connection_id: "c-1".into(),
                ty: "fired".into(),
                payload: json!({"n": 7, "version": "a"}),
            }]
        );
    }

    #[test]
    fn a_counter_counts_and_a_conflicting_call_runs_again() {
        let host = MockHost::new().with_handlers(PLEXUS_HANDLERS);
        let incr = || {
            RawMessage::json("relay.incr", &json!({"key": "n"})).from_connection("c-1", "guest-1")
        };
        let (ack, _) = host.call(plexus_dispatch, "incr", incr()).unwrap();
        assert_eq!(ack, Some(json!({"value": 1})));
        // Another call sets the counter to 10 while this one runs: it runs again and sees it.
        host.conflict("n", Some("10"));
        let (ack, _) = host.call(plexus_dispatch, "incr", incr()).unwrap();
        assert_eq!(ack, Some(json!({"value": 11})));
        assert_eq!(host.attempts(), 2);
        assert_eq!(host.kv_get("n").as_deref(), Some("11"));
    }

    #[test]
    fn compare_and_set_sets_once() {
        let host = MockHost::new().with_handlers(PLEXUS_HANDLERS);
        let cas = || {
            RawMessage::json(
                "relay.cas",
                &json!({"key": "owner", "expected": null, "value": "me"}),
            )
            .from_connection("c-1", "guest-1")
        };
        let (first, _) = host.call(plexus_dispatch, "cas", cas()).unwrap();
        let (second, _) = host.call(plexus_dispatch, "cas", cas()).unwrap();
        assert_eq!(
            (first, second),
            (Some(json!({"set": true})), Some(json!({"set": false})))
        );
    }

    #[test]
    fn the_outcome_goes_to_the_asker() {
        let host = MockHost::new().with_handlers(PLEXUS_HANDLERS);
        host.add_member("r", "c-2", "guest-2");
        let msg = RawMessage::json("relay.ask", &json!({"to": "c-2", "q": "?"}))
            .from_connection("c-1", "guest-1");
        host.call(plexus_dispatch, "ask", msg).unwrap();
        let fired = host
            .answer(plexus_dispatch, 1, "c-2", json!("!"))
            .expect("completed");
        let effects = fired.result.unwrap();
        let [
            Effect::Send {
                connection_id,
                payload,
                ..
            },
        ] = &effects[..]
        else {
            panic!("{effects:?}")
        };
        assert_eq!(connection_id, "c-1");
        assert_eq!(payload["outcome"]["answers"][0]["payload"], "!");
    }
}
