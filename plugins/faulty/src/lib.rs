//! Test fixture for the host's failure handling (see `tests/errors.rs`).
//!
//! * `trap`: panics, which is a WebAssembly trap.
//! * `spin`: loops forever; the manifest's `timeout_ms` has to stop it.
//! * `bad-json`: replies with a payload that is not JSON text (through the SDK's raw reply,
//!   which passes the text verbatim); the host must refuse the effect.
//! * `ok`: replies `faulty.ok` with the payload it got.

use plexus_plugin_sdk::{Ctx, HandlerResult, Message, RawPayload, plugin};

fn trap(_ctx: &Ctx, _msg: Message<RawPayload>) -> HandlerResult {
    panic!("faulty: trap requested");
}

fn spin(_ctx: &Ctx, _msg: Message<RawPayload>) -> HandlerResult {
    let mut n: u64 = 0;
    loop {
        // `black_box` keeps the optimizer from proving the loop has no effect.
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

fn bad_json(ctx: &Ctx, _msg: Message<RawPayload>) -> HandlerResult {
    ctx.reply_raw("faulty.bad", "{this is not json");
    Ok(None)
}

fn ok(ctx: &Ctx, msg: Message<RawPayload>) -> HandlerResult {
    ctx.reply_raw("faulty.ok", msg.payload.as_str());
    Ok(None)
}

plugin! {
    "trap" => trap,
    "spin" => spin,
    "bad-json" => bad_json,
    "ok" => ok,
}
