// The body shared by the hot-swap fixtures `swap-a`, `swap-b` and `swap-broken`, which differ
// only in `VERSION` (each crate defines it, then includes this file). Every answer names the
// version that produced it. Handlers:
//
// * `answer`: replies `answer` with `{"n", "version"}`. The `broken` version traps instead.
// * `count`: adds 1 to the counter of the origin connection in the key-value store, counts the
//   call in this instance, prints a line to stdout, and replies `counted` with
//   `{"n", "connection", "version", "count", "instance", "calls"}`: the origin, the stored
//   counter after this call, a random id of the instance and the calls it handled (together
//   they show a call that ran twice).
// * `count-room`: the same, broadcast to the message's room (the sender included).
// * `joined` (for the `room.joined` event): counts joins of the origin connection the same way
//   and replies `joined.seen` with `{"room", "version", "count", "instance", "calls"}`.
// * `slow`: busy until the key `gate:<gate>` is in the key-value store (within the call's time
//   limit), then replies `answer` with `{"n", "version"}`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use plexus_plugin_sdk::{Ctx, HandlerResult, Message, plugin};
use serde_json::{Value, json};

/// Calls this instance handled.
static CALLS: AtomicU64 = AtomicU64::new(0);

/// A random id for this instance.
fn instance() -> u64 {
    static ID: OnceLock<u64> = OnceLock::new();
    *ID.get_or_init(|| {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u8(0);
        // Below 2^53, so that JSON readers keep it exact.
        h.finish() >> 11
    })
}

fn answer(ctx: &Ctx, msg: Message) -> HandlerResult {
    if VERSION == "broken" {
        panic!("the broken fixture traps on every answer");
    }
    let n = msg.payload.get("n").cloned().unwrap_or(Value::Null);
    ctx.reply("answer", &json!({"n": n, "version": VERSION}))?;
    Ok(None)
}

/// Adds one to `key` in the store; returns the new value.
fn bump(ctx: &Ctx, key: &str) -> u64 {
    let count = ctx
        .kv_get(key)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + 1;
    ctx.kv_set(key, &count.to_string());
    count
}

fn counted(ctx: &Ctx, msg: &Message) -> Value {
    let count = bump(ctx, &format!("count:{}", msg.connection_id()));
    let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
    let n = msg.payload.get("n").cloned().unwrap_or(Value::Null);
    println!("count n={n} connection={} count={count}", msg.connection_id());
    json!({
        "n": n,
        "connection": msg.connection_id(),
        "version": VERSION,
        "count": count,
        "instance": instance(),
        "calls": calls,
    })
}

fn count(ctx: &Ctx, msg: Message) -> HandlerResult {
    let body = counted(ctx, &msg);
    ctx.reply("counted", &body)?;
    Ok(None)
}

fn count_room(ctx: &Ctx, msg: Message) -> HandlerResult {
    let room = msg.require_room()?.to_owned();
    let body = counted(ctx, &msg);
    ctx.broadcast(&room, "counted", &body)?;
    Ok(None)
}

fn joined(ctx: &Ctx, msg: Message) -> HandlerResult {
    let count = bump(ctx, &format!("joins:{}", msg.connection_id()));
    let calls = CALLS.fetch_add(1, Ordering::Relaxed) + 1;
    let room = msg.room().unwrap_or_default();
    let body = json!({"room": room, "version": VERSION, "count": count, "instance": instance(), "calls": calls});
    ctx.reply("joined.seen", &body)?;
    Ok(None)
}

fn slow(ctx: &Ctx, msg: Message) -> HandlerResult {
    let gate = msg.payload.get("gate").and_then(Value::as_str).unwrap_or("");
    let key = format!("gate:{gate}");
    while ctx.kv_get(&key).is_none() {
        std::hint::spin_loop();
    }
    let n = msg.payload.get("n").cloned().unwrap_or(Value::Null);
    ctx.reply("answer", &json!({"n": n, "version": VERSION}))?;
    Ok(None)
}

plugin! {
    "answer" => answer,
    "count" => count,
    "count-room" => count_room,
    "joined" => joined,
    "slow" => slow,
}

#[cfg(test)]
mod tests {
    use plexus_plugin_sdk::RawMessage;
    use plexus_plugin_sdk::testing::{Effect, MockHost};
    use serde_json::json;

    #[test]
    fn answers() {
        if super::VERSION == "broken" {
            return;
        }
        let host = MockHost::new();
        let msg = RawMessage::json("answer", &json!({"n": 7}));
        let (_, effects) = host.call(super::plexus_dispatch, "answer", msg).unwrap();
        let payload = json!({"n": 7, "version": super::VERSION});
        assert_eq!(
            effects,
            vec![Effect::Reply {
                ty: "answer".into(),
                payload
            }]
        );
    }

    #[test]
    fn counts_per_connection() {
        let host = MockHost::new();
        for expected in 1..=3 {
            let msg = RawMessage::json("count", &json!({"n": expected}));
            let (_, effects) = host.call(super::plexus_dispatch, "count", msg).unwrap();
            let [Effect::Reply { payload, .. }] = &effects[..] else {
                panic!("{effects:?}")
            };
            assert_eq!(payload["count"], expected);
            assert_eq!(payload["version"], super::VERSION);
        }
    }
}
