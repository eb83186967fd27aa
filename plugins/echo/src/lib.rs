//! The `echo` plugin: sends a message back to its sender, or to the rest of its room.
//!
//! The benchmarks run on it, so it never parses or re-serializes a payload: the JSON text
//! the host delivered goes straight back out ([`RawPayload`], [`Ctx::reply_raw`]).
//!
//! | handler | does |
//! | --- | --- |
//! | `echo` | replies type `echo` with the same payload |
//! | `broadcast` | sends the payload as type `echo.broadcast` to the message's room, sender excluded; `room_required` without a room |

use plexus_plugin_sdk::{Ctx, HandlerResult, Message, RawPayload, plugin};

fn echo(ctx: &Ctx, msg: Message<RawPayload>) -> HandlerResult {
    ctx.reply_raw("echo", msg.payload.as_str());
    Ok(None)
}

fn broadcast(ctx: &Ctx, msg: Message<RawPayload>) -> HandlerResult {
    let room = msg.require_room()?;
    ctx.broadcast_others_raw(room, "echo.broadcast", msg.payload.as_str())?;
    Ok(None)
}

plugin! {
    "echo" => echo,
    "broadcast" => broadcast,
}

#[cfg(test)]
mod tests {
    use plexus_plugin_sdk::RawMessage;
    use plexus_plugin_sdk::testing::{Effect, MockHost};
    use serde_json::json;

    use super::plexus_dispatch;

    #[test]
    fn echo_replies_with_the_payload() {
        let host = MockHost::new();
        for payload in [
            json!({"a": [1, "x", null]}),
            json!(null),
            json!("s"),
            json!(1.5),
        ] {
            let (ack, effects) = host
                .call(plexus_dispatch, "echo", RawMessage::json("echo", &payload))
                .unwrap();
            assert_eq!(ack, None);
            assert_eq!(
                effects,
                vec![Effect::Reply {
                    ty: "echo".into(),
                    payload
                }]
            );
        }
    }

    #[test]
    fn broadcast_excludes_the_sender() {
        let host = MockHost::new();
        let msg = RawMessage::json("echo.broadcast", &json!({"n": 1})).with_room("lobby");
        let (_, effects) = host.call(plexus_dispatch, "broadcast", msg).unwrap();
        assert_eq!(
            effects,
            vec![Effect::Broadcast {
                room: "lobby".into(),
                ty: "echo.broadcast".into(),
                payload: json!({"n": 1}),
                include_sender: false,
            }]
        );
    }

    #[test]
    fn broadcast_needs_a_room() {
        let host = MockHost::new();
        let err = host
            .call(
                plexus_dispatch,
                "broadcast",
                RawMessage::new("echo.broadcast", "1"),
            )
            .unwrap_err();
        assert_eq!(err.code, "room_required");
    }

    #[test]
    fn broadcast_to_a_forbidden_room() {
        let host = MockHost::new();
        host.forbid_room("vip");
        let msg = RawMessage::new("echo.broadcast", "1").with_room("vip");
        let err = host.call(plexus_dispatch, "broadcast", msg).unwrap_err();
        assert_eq!(err.code, "forbidden");
    }
}
