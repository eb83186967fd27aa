//! Test fixture for the host's failure handling (see `tests/errors.rs`).
//!
//! * `trap`: panics, which is a WebAssembly trap (after the panic message is written to the
//!   plugin's stderr through WASI).
//! * `unreachable`: executes `unreachable` directly: a trap without any WASI call before it.
//! * `spin`: loops forever; the manifest's `timeout_ms` has to stop it.
//! * `bad-json`: replies with a payload that is not JSON text (through the SDK's raw reply,
//!   which passes the text verbatim); the host must refuse the effect.
//! * `ok`: replies `faulty.ok` with the payload it got.
//! * `forge-ref`: succeeds with ack fields that include a `ref` of its own, which the host
//!   must not let through.
//! * `kv-huge`: stores a 2 MiB value (payload `"value"`) or under a 2 KiB key (payload
//!   `"key"`), past the host's key-value limits.
//! * `print`: writes to stdout and stderr through WASI, then replies `faulty.printed`: plugin
//!   output must not fail the call.
//! * `outside`: replies, broadcasts to room `secret` ignoring the host's refusal, replies again
//!   and succeeds: with `secret` outside its grant, the host must fail the whole call.
//! * `hog`: allocates a megabyte after another until the instance's memory limit stops it (a
//!   trap).

use plexus_plugin_sdk::{Ctx, HandlerResult, Message, RawPayload, plugin};

fn trap(_ctx: &Ctx, _msg: Message<RawPayload>) -> HandlerResult {
    panic!("faulty: trap requested");
}

fn unreachable(_ctx: &Ctx, _msg: Message<RawPayload>) -> HandlerResult {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    std::process::abort();
}

fn outside(ctx: &Ctx, _msg: Message<RawPayload>) -> HandlerResult {
    ctx.reply_raw("faulty.before", "1");
    let _ignored = ctx.broadcast("secret", "faulty.leak", &1);
    ctx.reply_raw("faulty.after", "2");
    Ok(None)
}

fn hog(_ctx: &Ctx, _msg: Message<RawPayload>) -> HandlerResult {
    let mut held: Vec<Vec<u8>> = Vec::new();
    loop {
        held.push(std::hint::black_box(vec![1u8; 1 << 20]));
    }
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

fn forge_ref(_ctx: &Ctx, _msg: Message<RawPayload>) -> HandlerResult {
    // The ack's `ref` is the host's: a plugin cannot answer for another message.
    Ok(Some(serde_json::json!({"ref": "forged", "x": 1})))
}

fn kv_huge(ctx: &Ctx, msg: Message<RawPayload>) -> HandlerResult {
    let what = msg.payload.parse::<String>().unwrap_or_default();
    match what.as_str() {
        "key" => ctx.kv_set(&"k".repeat(2048), "v"),
        _ => ctx.kv_set("huge", &"v".repeat(2 << 20)),
    }
    ctx.reply_raw("faulty.stored", "true");
    Ok(None)
}

fn print(ctx: &Ctx, msg: Message<RawPayload>) -> HandlerResult {
    println!("faulty: printing {}", msg.payload.as_str());
    eprintln!("faulty: and to stderr");
    ctx.reply_raw("faulty.printed", msg.payload.as_str());
    Ok(None)
}

plugin! {
    "trap" => trap,
    "unreachable" => unreachable,
    "spin" => spin,
    "bad-json" => bad_json,
    "ok" => ok,
    "print" => print,
    "forge-ref" => forge_ref,
    "kv-huge" => kv_huge,
    "hog" => hog,
    "outside" => outside,
}
