//! `plexus dev`: a plugin whose sources change is rebuilt with its manifest's build command and
//! swapped in while a client stays connected; sources that fail to build are refused and the
//! running version keeps serving.

mod support;

use std::time::Duration;

use plexus::{Config, ReloadEvent, Server, WatchMode};
use serde_json::json;
use support::{Client, TempDir, repo_root, toml_str};

/// Builds can take a while on a loaded machine; this only fails a stuck test.
const BUILD_TIMEOUT: Duration = Duration::from_secs(300);

const SOURCE: &str = r#"
use plexus_plugin_sdk::{Ctx, HandlerResult, Message, plugin};
use serde_json::{Value, json};

fn answer(ctx: &Ctx, msg: Message) -> HandlerResult {
    let n = msg.payload.get("n").cloned().unwrap_or(Value::Null);
    ctx.reply("answer", &json!({"n": n, "version": "VERSION"}))?;
    Ok(None)
}

plugin! { "answer" => answer }
"#;

async fn answer(client: &mut Client, n: u64) -> String {
    let (before, ack) = client
        .request(json!({"type": "answer", "messageId": format!("a{n}"), "payload": {"n": n}}))
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    assert_eq!(before.len(), 1, "{before:?}");
    before[0]["payload"]["version"]
        .as_str()
        .expect("a version")
        .to_owned()
}

async fn within_build<F: std::future::Future>(what: &str, fut: F) -> F::Output {
    tokio::time::timeout(BUILD_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_rebuilds_and_swaps_changed_sources() {
    support::plugins_dir(); // the SDK and its dependencies are compiled once, shared below
    let root = repo_root();
    let work = TempDir::new();
    // A plugin crate outside the repository, built into the plugins' target directory so that
    // its dependencies are the ones already compiled there.
    let crate_dir = work.path().join("devprobe");
    std::fs::create_dir_all(crate_dir.join("src")).unwrap();
    std::fs::write(
        crate_dir.join("Cargo.toml"),
        format!(
            r#"[package]
name = "devprobe"
version = "0.1.0"
edition = "2024"

[lib]
crate-type = ["cdylib"]

[dependencies]
plexus-plugin-sdk = {{ path = {sdk} }}
serde_json = "1"

[workspace]

[profile.release]
opt-level = "s"
lto = true
strip = true
panic = "abort"
codegen-units = 1
"#,
            sdk = toml_str(&root.join("plugin-sdk").display().to_string())
        ),
    )
    .unwrap();
    std::fs::copy(
        root.join("plugins/Cargo.lock"),
        crate_dir.join("Cargo.lock"),
    )
    .unwrap();
    let write_source = |version: &str| {
        let tmp = crate_dir.join("src/.lib.rs.tmp");
        std::fs::write(&tmp, SOURCE.replace("VERSION", version)).unwrap();
        std::fs::rename(&tmp, crate_dir.join("src/lib.rs")).unwrap();
    };
    write_source("one");
    let target = root.join("plugins/target");
    let manifests = work.path().join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("devprobe.toml"),
        format!(
            r#"manifest_version = 1

[plugin]
id = "devprobe"

[source]
wasm = {wasm}

[source.build]
command = "CARGO_TARGET_DIR={target} cargo build --offline --release --target wasm32-wasip2"
dir = {dir}
watch = [{src}]

[[route]]
type = "answer"
handler = "answer"
allow_outside_room = true

[capabilities]
host = ["messaging"]
"#,
            wasm = toml_str(
                &target
                    .join("wasm32-wasip2/release/devprobe.wasm")
                    .display()
                    .to_string()
            ),
            target = target.display(),
            dir = toml_str(&crate_dir.display().to_string()),
            src = toml_str(&crate_dir.join("src").display().to_string()),
        ),
    )
    .unwrap();
    // A stale artifact from an earlier run must not be taken for this run's version.
    let _ = std::fs::remove_file(target.join("wasm32-wasip2/release/devprobe.wasm"));

    let mut config = Config::new(&manifests);
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.build = true;
    config.watch = WatchMode::Sources;
    let server = within_build("the first build", Server::start(config))
        .await
        .unwrap_or_else(|e| panic!("the host did not start: {e}"));
    let mut reloads = server.subscribe_reloads();
    let mut client = Client::connect(server.local_addr()).await;
    assert_eq!(answer(&mut client, 1).await, "one");

    // Change the source: the host rebuilds and swaps; the same connection gets the new code.
    write_source("two");
    within_build("the rebuilt version", async {
        loop {
            match reloads.recv().await.expect("reload events") {
                ReloadEvent::Swapped { plugin, .. } if plugin == "devprobe" => break,
                ReloadEvent::Rejected { reason, .. } => panic!("rejected: {reason}"),
                _ => {}
            }
        }
    })
    .await;
    assert_eq!(answer(&mut client, 2).await, "two");

    // Sources that do not compile: the build error is reported and "two" keeps serving.
    let tmp = crate_dir.join("src/.lib.rs.tmp");
    std::fs::write(&tmp, "this is not rust").unwrap();
    std::fs::rename(&tmp, crate_dir.join("src/lib.rs")).unwrap();
    let reason = within_build("the refused build", async {
        loop {
            if let ReloadEvent::Rejected { reason, .. } =
                reloads.recv().await.expect("reload events")
            {
                break reason;
            }
        }
    })
    .await;
    assert!(reason.contains("build command"), "{reason}");
    assert_eq!(answer(&mut client, 3).await, "two");
    client.close().await;
    server.shutdown().await;
    let _ = std::fs::remove_file(target.join("wasm32-wasip2/release/devprobe.wasm"));
}
