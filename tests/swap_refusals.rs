//! What the watcher does with what an operator drops into a serving host: it reloads once per
//! change (never because the host read a file), refuses every kind of bad version with one log
//! line naming the file and the reason while the serving version keeps answering, never loads a
//! half-written component, and runs plugins built against an earlier interface version.
//!
//! The fixtures `swap-a` and `swap-b` (plugins/) answer `answer` with
//! `{"n", "version": "a" | "b"}`; `tests/fixtures/swap-a-0.3.0.wasm` is `swap-a` built against
//! `plexus:plugin@0.3.0` (tests/fixtures/README.md says how it was built).

mod support;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use plexus::{ReloadEvent, WatchMode};
use serde_json::Value;
use support::{Client, Host, swap_host, swap_manifest, wait_reload, wasm, within};
use tokio::sync::{broadcast, watch};
use tokio::task::JoinHandle;

/// How long the tests watch a host to see that it does nothing (the watcher's settle time is
/// 150 ms: a host reloading by itself reloads several times in this window).
const QUIET: Duration = Duration::from_millis(1500);

fn answer_manifest() -> String {
    swap_manifest(&[("answer", "answer")], &[], &["messaging", "kv"], 1000)
}

async fn watching_host(fixture: &str) -> Host {
    swap_host(fixture, &answer_manifest(), |c| {
        c.watch = WatchMode::Artifacts
    })
    .await
}

/// Sends one `answer` numbered `n`; returns the version that answered.
async fn answer_version(c: &mut Client, n: u64) -> String {
    support::answer_version(c, "answer", n).await
}

/// A client that sends `answer` messages one after another until told to stop, checking
/// that each is answered (no error) by one of `versions`, in an order that never goes back.
/// Returns how many it sent.
fn stream(
    mut c: Client,
    versions: &'static [&'static str],
) -> (watch::Sender<bool>, JoinHandle<u64>) {
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut n = 0;
        let mut at = 0;
        while !*stopped.borrow_and_update() {
            n += 1;
            let version = answer_version(&mut c, n).await;
            let i = versions
                .iter()
                .position(|v| *v == version)
                .unwrap_or_else(|| panic!("message {n} answered by unexpected version {version}"));
            assert!(
                i >= at,
                "message {n} answered by {version} after {}",
                versions[at]
            );
            at = i;
        }
        n
    });
    (stop, task)
}

async fn stop_stream(stop: watch::Sender<bool>, task: JoinHandle<u64>) -> u64 {
    let _ = stop.send(true);
    within("the streaming client", task)
        .await
        .expect("the streaming client saw every message answered")
}

/// Waits for the refusal of a candidate whose reason names the file `name` (a refusal is
/// reported for the plugin's manifest, and names the component when that is the problem); any
/// swap or rollback meanwhile fails.
async fn wait_refused(rx: &mut broadcast::Receiver<ReloadEvent>, name: &str) -> String {
    wait_reload(rx, &format!("the refusal of {name}"), |e| match e {
        ReloadEvent::Rejected { reason, .. } if reason.contains(name) => Some(reason.clone()),
        ReloadEvent::Rejected { .. } => None,
        other => panic!("expected {name} to be refused, got {other:?}"),
    })
    .await
}

/// Waits until `/healthz` lists no refused candidate.
async fn wait_no_refusals(host: &Host) {
    within("the refusals to clear", async {
        while !host.healthz().await["refused"]
            .as_array()
            .is_some_and(Vec::is_empty)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

fn read(path: impl AsRef<Path>) -> Vec<u8> {
    std::fs::read(path.as_ref()).expect("reading a fixture")
}

/// `bytes` with every `from` replaced by `to` (of the same length).
fn patched(bytes: &[u8], from: &str, to: &str) -> Vec<u8> {
    assert_eq!(from.len(), to.len());
    let (from, to) = (from.as_bytes(), to.as_bytes());
    let mut out = bytes.to_vec();
    let mut found = 0;
    let mut i = 0;
    while i + from.len() <= out.len() {
        if &out[i..i + from.len()] == from {
            out[i..i + from.len()].copy_from_slice(to);
            found += 1;
            i += from.len();
        } else {
            i += 1;
        }
    }
    assert!(found > 0, "nothing to patch");
    out
}

fn fixture_0_3_0() -> PathBuf {
    support::repo_root().join("tests/fixtures/swap-a-0.3.0.wasm")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_reloads_once_per_change_and_reports_a_refusal_once() {
    let logs = support::logs();
    let host = watching_host("swap-a").await;
    let registry = &host.server.hub().registry;
    let mut reloads = host.reloads();
    let mut c = host.client().await;
    assert_eq!(answer_version(&mut c, 1).await, "a");

    // One swap: the host reads the new component (and every manifest), which must not make
    // it reload again.
    host.dir.replace("answer.wasm", read(wasm("swap-b")));
    wait_reload(&mut reloads, "the swap", |e| match e {
        ReloadEvent::Swapped { .. } => Some(()),
        other => panic!("unexpected {other:?}"),
    })
    .await;
    assert_eq!(answer_version(&mut c, 2).await, "b");
    let after_swap = registry.reloads();
    tokio::time::sleep(QUIET).await;
    assert_eq!(registry.reloads(), after_swap, "reloads after one swap");

    // A bad artifact left in place: refused once, reported once, and no reload after it.
    let wasm_path = host
        .dir
        .replace("answer.wasm", b"\0asm, but not a component".as_slice());
    let reason = wait_refused(&mut reloads, "answer.wasm").await;
    assert!(reason.contains("not a valid component"), "{reason}");
    let after_refusal = registry.reloads();
    tokio::time::sleep(QUIET).await;
    assert_eq!(registry.reloads(), after_refusal, "reloads after a refusal");
    // Another reload (as for a change elsewhere) does not report the same candidate again.
    assert_eq!(host.server.reload().await, vec![]);
    let path = wasm_path.display().to_string();
    let lines: Vec<String> = logs
        .lines_with(&path)
        .into_iter()
        .filter(|l| l.contains("refused"))
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "one log line for one refused candidate: {lines:#?}"
    );
    assert!(lines[0].contains("ERROR"), "{}", lines[0]);
    let refused = host.healthz().await["refused"].clone();
    assert_eq!(refused.as_array().map(Vec::len), Some(1), "{refused}");
    assert!(
        refused[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&path)),
        "{refused}"
    );
    assert_eq!(answer_version(&mut c, 3).await, "b");
    c.sync().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kind_of_refused_version_is_refused_while_the_serving_one_answers() {
    let logs = support::logs();
    let host = watching_host("swap-a").await;
    let mut reloads = host.reloads();
    let version_a = host.version_of("answer").await;
    let (stop, streamer) = stream(host.client().await, &["a"]);

    let a = read(wasm("swap-a"));
    let b = read(wasm("swap-b"));
    let manifest = answer_manifest();
    // Named to sort before `answer.toml`: the refusal must fall on it, the newcomer, even so.
    let claim = support::echo_manifest().replace("type = \"echo\"", "type = \"answer\"");
    // (what, the file it writes, its bytes, what the reason says)
    let kinds: Vec<(&str, &str, Vec<u8>, &str)> = vec![
        (
            "garbage bytes",
            "answer.wasm",
            b"\0asm garbage".to_vec(),
            "not a valid component",
        ),
        (
            "a truncated component",
            "answer.wasm",
            b[..b.len() / 2].to_vec(),
            "not a valid component",
        ),
        (
            "a component without the routed handler",
            "answer.wasm",
            read(wasm("echo")),
            "has no handler `answer`",
        ),
        (
            "a component importing a capability not granted",
            "answer.wasm",
            read(wasm("chat")),
            "which needs capability",
        ),
        (
            "a component built against an incompatible interface",
            "answer.wasm",
            patched(&b, "@0.3.4", "@0.2.1"),
            "plexus:plugin@0.2.1, which this host (plexus:plugin@0.3.4) cannot run",
        ),
        (
            "a component built against a newer interface",
            "answer.wasm",
            patched(&b, "@0.3.4", "@0.3.9"),
            "plexus:plugin@0.3.9, newer than",
        ),
        (
            "a manifest that is not TOML",
            "answer.toml",
            b"manifest_version = 1\n[plugin\nid = ".to_vec(),
            "answer.toml",
        ),
        (
            "a manifest claiming another plugin's route",
            "0-claim.toml",
            claim.into_bytes(),
            "`answer`",
        ),
    ];
    for (what, name, bytes, says) in kinds {
        let path = host.dir.replace(name, &bytes).display().to_string();
        let reason = wait_refused(&mut reloads, name).await;
        assert!(
            reason.contains(says),
            "{what}: the reason says {says:?}: {reason}"
        );
        assert!(
            reason.contains(name),
            "{what}: the reason names the file: {reason}"
        );
        let health = host.healthz().await;
        assert_eq!(
            health["plugins"]["answer"]["version"], version_a,
            "{what}: {health}"
        );
        let refused = &health["refused"][0];
        let reason = refused["reason"].as_str().unwrap_or_default();
        assert!(
            reason.contains(says) && reason.contains(&path),
            "{what}: {health}"
        );
        let lines = logs.lines_with(&path);
        assert!(
            lines
                .iter()
                .any(|l| l.contains("ERROR") && l.contains("refused") && l.contains(says)),
            "{what}: a log line names the file and the reason: {lines:#?}"
        );
        // Put the serving files back; the refusal is forgotten.
        match name {
            "answer.wasm" => drop(host.dir.replace(name, &a)),
            "answer.toml" => drop(host.dir.replace(name, &manifest)),
            _ => host.dir.remove(name),
        }
        wait_no_refusals(&host).await;
    }
    let sent = stop_stream(stop, streamer).await;
    assert!(sent > 0);
    println!("{sent} messages answered by version a while 8 bad versions were refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_component_is_never_loaded() {
    let host = watching_host("swap-a").await;
    let mut reloads = host.reloads();
    let (stop, streamer) = stream(host.client().await, &["a", "b"]);

    // Written in place, in two writes with a pause between them (longer than the watcher's
    // settle time), as a slow `cp` over the file would.
    let b = read(wasm("swap-b"));
    let mut file = std::fs::File::create(host.dir.path().join("answer.wasm")).expect("open");
    file.write_all(&b[..b.len() / 2]).expect("first half");
    file.flush().expect("flush");
    tokio::time::sleep(Duration::from_millis(700)).await;
    file.write_all(&b[b.len() / 2..]).expect("second half");
    drop(file);
    let version = wait_reload(&mut reloads, "the swap to b", |e| match e {
        ReloadEvent::Swapped { version, .. } => Some(version.clone()),
        other => panic!("the half-written component was not waited for: {other:?}"),
    })
    .await;
    assert_eq!(host.version_of("answer").await, version);
    let mut c = host.client().await;
    assert_eq!(answer_version(&mut c, 1).await, "b");
    let sent = stop_stream(stop, streamer).await;
    assert!(sent > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_built_against_the_previous_interface_version_runs_and_swaps() {
    let dir = support::TempDir::new();
    std::fs::copy(fixture_0_3_0(), dir.path().join("answer.wasm")).expect("copy");
    // The 0.3.0 fixture has only `answer`, and imports `messaging` only.
    dir.write(
        "answer.toml",
        swap_manifest(&[("answer", "answer")], &[], &["messaging", "kv"], 1000),
    );
    let host = Host::start_in(dir, |c| c.watch = WatchMode::Artifacts).await;
    let health = host.healthz().await;
    assert_eq!(health["interfaceVersion"], "0.3.4", "{health}");
    assert_eq!(
        health["plugins"]["answer"]["interface"], "0.3.0",
        "{health}"
    );
    let mut c = host.client().await;
    assert_eq!(answer_version(&mut c, 1).await, "a");

    // Swapped for a build against this host's interface, and back, under the same client.
    let mut reloads = host.reloads();
    // `swap-b` with its imports renamed to 0.3.2 (0.3.3) stands for a plugin built against
    // 0.3.2 (0.3.3): it imports only what those versions had, under their names.
    let swap_b = read(wasm("swap-b"));
    for (bytes, version, interface) in [
        (swap_b.clone(), "b", "0.3.4"),
        (read(fixture_0_3_0()), "a", "0.3.0"),
        (patched(&swap_b, "@0.3.4", "@0.3.2"), "b", "0.3.2"),
        (patched(&swap_b, "@0.3.4", "@0.3.3"), "b", "0.3.3"),
    ] {
        host.dir.replace("answer.wasm", bytes);
        wait_reload(&mut reloads, "the swap", |e| match e {
            ReloadEvent::Swapped { .. } => Some(()),
            other => panic!("unexpected {other:?}"),
        })
        .await;
        assert_eq!(answer_version(&mut c, 2).await, version);
        let health: Value = host.healthz().await;
        assert_eq!(health["plugins"]["answer"]["interface"], interface);
    }
    c.sync().await;
}
