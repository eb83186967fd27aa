// The body shared by the hot-swap fixtures `swap-a` and `swap-b`, which differ only in
// `VERSION` (each crate defines it, then includes this file).

use plexus_plugin_sdk::{Ctx, HandlerResult, Message, plugin};
use serde_json::{Value, json};

fn answer(ctx: &Ctx, msg: Message) -> HandlerResult {
    let n = msg.payload.get("n").cloned().unwrap_or(Value::Null);
    ctx.reply("answer", &json!({"n": n, "version": VERSION}))?;
    Ok(None)
}

plugin! { "answer" => answer }

#[cfg(test)]
mod tests {
    use plexus_plugin_sdk::RawMessage;
    use plexus_plugin_sdk::testing::{Effect, MockHost};
    use serde_json::json;

    #[test]
    fn answers() {
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
}
