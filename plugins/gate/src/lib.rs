//! Test fixture for who may join a room and what a plugin knows of a connection (see
//! `tests/access.rs`).
//!
//! | handler | does |
//! | --- | --- |
//! | `may-join` (a `room.join` hook) | allows the join when its payload's `key` is the manifest's `[config]` `key`, or when the joiner's verified claims say `"vip": true`; otherwise refuses with `forbidden` "the door is shut: bring the key". Before deciding it replies `gate.hello` and stores `last-join`, which the host must discard |
//! | `trap-join` (a `room.join` hook) | panics: a trap, which must refuse the join |
//! | `gate.claims` `{"of"?}` → `claims` | acks `{"claims", "role"}`: the verified claims of connection `of` (default: the origin) and the `role` claim it read from them (`null` for a guest) |
//! | `gate.last` → `last` | acks `{"lastJoin"}`: what the store holds under `last-join` |

use plexus_plugin_sdk::{Ctx, HandlerResult, Message, PluginError, ack, plugin};
use serde_json::{Value, json};

fn may_join(ctx: &Ctx, msg: Message) -> HandlerResult {
    // Effects of a hook's call are discarded: neither of these may reach anyone.
    ctx.reply("gate.hello", &json!({"room": msg.room()}))?;
    ctx.kv_set("last-join", msg.connection_id());
    let key = ctx.config("key");
    if key.is_some() && msg.payload["key"].as_str() == key.as_deref() {
        return Ok(None);
    }
    let claims: Option<Value> = ctx.claims(msg.connection_id())?;
    if claims.is_some_and(|c| c["vip"] == true) {
        return Ok(None);
    }
    Err(PluginError::forbidden("the door is shut: bring the key"))
}

fn trap_join(_: &Ctx, _: Message) -> HandlerResult {
    panic!("gate: trap requested");
}

fn claims(ctx: &Ctx, msg: Message) -> HandlerResult {
    let of = msg.payload["of"].as_str().unwrap_or(msg.connection_id());
    let claims: Option<Value> = ctx.claims(of)?;
    let role = claims.as_ref().map(|c| c["role"].clone());
    ack(&json!({"claims": claims, "role": role}))
}

fn last(ctx: &Ctx, _: Message) -> HandlerResult {
    ack(&json!({"lastJoin": ctx.kv_get("last-join")}))
}

plugin! {
    "may-join" => may_join,
    "trap-join" => trap_join,
    "claims" => claims,
    "last" => last,
}

#[cfg(test)]
mod tests {
    use plexus_plugin_sdk::RawMessage;
    use plexus_plugin_sdk::testing::MockHost;
    use serde_json::json;

    use super::plexus_dispatch;

    fn join(host: &MockHost, payload: serde_json::Value) -> Result<(), String> {
        let msg = RawMessage::json("room.join", &payload)
            .with_room("vault:1")
            .from_connection("c-1", "ada");
        host.call(plexus_dispatch, "may-join", msg)
            .map(|_| ())
            .map_err(|e| e.code)
    }

    #[test]
    fn the_key_or_a_vip_claim_opens_the_door() {
        let host = MockHost::new().with_config("key", "open sesame");
        assert_eq!(join(&host, json!({"key": "open sesame"})), Ok(()));
        assert_eq!(join(&host, json!({"key": "nope"})), Err("forbidden".into()));
        assert_eq!(join(&host, json!(null)), Err("forbidden".into()));
        let host = MockHost::new().with_claims("c-1", &json!({"sub": "ada", "vip": true}));
        assert_eq!(join(&host, json!(null)), Ok(()));
    }

    #[test]
    fn claims_are_read_for_the_origin_or_another_connection() {
        let host = MockHost::new().with_claims("c-1", &json!({"sub": "ada", "role": "admin"}));
        let call = |payload| {
            let msg = RawMessage::json("gate.claims", &payload).from_connection("c-1", "ada");
            host.call(plexus_dispatch, "claims", msg).unwrap().0
        };
        assert_eq!(
            call(json!({})),
            Some(json!({"claims": {"sub": "ada", "role": "admin"}, "role": "admin"}))
        );
        assert_eq!(
            call(json!({"of": "c-guest"})),
            Some(json!({"claims": null, "role": null}))
        );
    }
}
