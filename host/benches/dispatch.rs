//! Per-message dispatch cost: the same `echo` message through the WASM echo plugin and through
//! the native builtin, both the bare plugin call and the whole router path (decode, route, call,
//! apply effects, encode). Also a fresh store per call against reused instances.
//!
//! Run: `cargo bench -p plexus --bench dispatch`

use std::path::Path;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};
use plexus::manifest;
use plexus::plugin::wasm::{Runtime, WasmPlugin};
use plexus::plugin::{CallInput, PluginEnv};
use plexus::registry::{LoadOptions, Registry, SwapPolicy};
use plexus::rooms::Rooms;
use plexus::router::{ConnState, HostLimits, Hub};
use plexus::session::outbox::Next;
use plexus::session::{Identity, SessionPolicy};

/// The allocator the `plexus` binary uses.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const NATIVE_MANIFEST: &str = r#"
manifest_version = 1
[plugin]
id = "echo-native"
[source]
builtin = "echo"
[[route]]
type = "echo"
handler = "echo"
allow_outside_room = true
[capabilities]
host = ["messaging"]
"#;

fn hub(dir: &Path, rt: &tokio::runtime::Runtime) -> Arc<Hub> {
    rt.block_on(async {
        let rooms = Arc::new(Rooms::default());
        let registry = Registry::load(
            dir,
            Runtime::new().unwrap(),
            rooms.clone(),
            LoadOptions { build: true },
            SwapPolicy::default(),
        )
        .await
        .unwrap_or_else(|e| panic!("loading {}: {e:?}", dir.display()));
        // Work due later goes nowhere: nothing here disconnects. No rate limit: the bench
        // sends the same connection's messages as fast as it can.
        let limits = HostLimits {
            rate: None,
            ..HostLimits::default()
        };
        let (hub, _) = Hub::new(
            registry,
            rooms,
            limits,
            SessionPolicy::default(),
            Default::default(),
        );
        Arc::new(hub)
    })
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests");
    let wasm_hub = hub(&demo, &rt);
    let native_dir = std::env::temp_dir().join(format!("plexus-bench-{}", std::process::id()));
    std::fs::create_dir_all(&native_dir).unwrap();
    std::fs::write(native_dir.join("echo.toml"), NATIVE_MANIFEST).unwrap();
    let native_hub = hub(&native_dir, &rt);

    let frame = r#"{"type":"echo","payload":{"text":"hello, plexus","n":12345678,"pad":"0123456789012345678901234567890123456789012345"}}"#;
    let mut group = c.benchmark_group("dispatch");
    for (name, hub) in [("wasm", &wasm_hub), ("native", &native_hub)] {
        let mut conn = ConnState::open(hub, Identity::guest());
        let mut batch = std::collections::VecDeque::new();
        group.bench_function(name, |b| {
            b.iter(|| {
                rt.block_on(plexus::router::handle_text(hub, &mut conn, frame));
                assert_eq!(conn.rx.try_next(&mut batch), Some(Next::Frames));
                batch.pop_front()
                // A message's answer is one frame; `batch` is left empty for the next turn.
            })
        });
    }
    group.finish();

    // The bare plugin call, with reused instances and with a fresh store per call.
    let wasm_path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../plugins/target/wasm32-wasip2/release/echo.wasm");
    let manifest = manifest::load(&demo.join("echo.toml")).unwrap();
    let runtime = Runtime::new().unwrap();
    let component = runtime
        .compile(&std::fs::read(&wasm_path).unwrap())
        .unwrap();
    let env = || {
        Arc::new(PluginEnv::new(
            &manifest,
            Arc::new(plexus::kv::KvStore::new(&manifest.id)),
            Arc::new(Rooms::default()),
        ))
    };
    let reused = WasmPlugin::new(&runtime, &component, env()).unwrap();
    let mut fresh = WasmPlugin::new(&runtime, &component, env()).unwrap();
    fresh.set_reuse_instances(false);
    let input = CallInput {
        handler: "echo",
        ty: "echo",
        room: None,
        payload: r#"{"text":"hello, plexus","n":12345678,"pad":"0123456789012345678901234567890123456789012345"}"#,
        sender: "guest-0000",
        connection_id: "c-0000",
        message_id: None,
        metadata: None,
    };
    let mut group = c.benchmark_group("plugin_call");
    group.bench_function("wasm_reused_instance", |b| {
        b.iter(|| reused.call(&input).result.unwrap())
    });
    group.bench_function("wasm_fresh_store", |b| {
        b.iter(|| fresh.call(&input).result.unwrap())
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&native_dir);
}

criterion_group!(benches, bench);
criterion_main!(benches);
