//! Rollback: a new version that fails most of its first calls is rolled back to the previous
//! version (kept warm since the swap) by itself, with a log line and a `/healthz` entry, and
//! stays refused until its files change; `plexus rollback PLUGIN` does the same by hand.
//!
//! Fixtures: `swap-a` and `swap-b` answer `answer` with `{"n", "version"}`; `swap-broken`
//! traps on every `answer`.

mod support;

use std::time::Duration;

use plexus::registry::SwapPolicy;
use plexus::{ReloadEvent, WatchMode};
use support::{Client, Host, swap_host, swap_manifest, wait_reload, wasm};

fn policy() -> SwapPolicy {
    SwapPolicy {
        keep_previous: Duration::from_secs(120),
        probation: Duration::from_secs(120),
        max_failure_share: 0.5,
        min_calls: 6,
    }
}

async fn host() -> Host {
    let manifest = swap_manifest(&[("answer", "answer")], &[], &["messaging", "kv"], 1000);
    swap_host("swap-a", &manifest, |c| {
        c.watch = WatchMode::Artifacts;
        c.swap = policy();
    })
    .await
}

/// Sends `answer` number `n`: the version that answered, or the error code.
async fn answer(c: &mut Client, n: u64) -> Result<String, String> {
    support::answer_or_error(c, "answer", n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_new_version_is_rolled_back_by_itself_and_stays_refused() {
    let logs = support::logs();
    let host = host().await;
    let mut reloads = host.reloads();
    let version_a = host.version_of("answer").await;
    let mut c = host.client().await;
    assert_eq!(answer(&mut c, 0).await, Ok("a".into()));

    let path = host
        .dir
        .replace("answer.wasm", std::fs::read(wasm("swap-broken")).unwrap());
    let broken = wait_reload(&mut reloads, "the broken version to swap in", |e| match e {
        ReloadEvent::Swapped { version, .. } => Some(version.clone()),
        other => panic!("unexpected {other:?}"),
    })
    .await;
    let health = host.healthz().await;
    assert_eq!(
        health["plugins"]["answer"]["previous"]["version"], version_a,
        "{health}"
    );
    assert_eq!(health["plugins"]["answer"]["probation"], true, "{health}");

    // Every message is answered, by an error while the broken version serves (its failures,
    // then `plugin_unavailable` once its circuit opened), by `a` again once it is rolled back;
    // no message goes unanswered.
    let mut failed = 0;
    let mut n = 1;
    loop {
        match answer(&mut c, n).await {
            Err(code) if code == "plugin_unavailable" => {}
            Err(code) => {
                assert_eq!(code, "plugin_failed");
                failed += 1;
            }
            Ok(version) => {
                assert_eq!(version, "a", "message {n}");
                break;
            }
        }
        n += 1;
        assert!(n < 1000, "never rolled back");
    }
    // 6 calls, 4 failures of them trip it: the rollback lands within a few more messages.
    assert!(failed >= 4, "{failed} failed before the rollback");
    let (from, to) = wait_reload(&mut reloads, "the rollback event", |e| match e {
        ReloadEvent::RolledBack { from, to, .. } => Some((from.clone(), to.clone())),
        _ => None,
    })
    .await;
    assert_eq!(
        (from.as_str(), to.as_str()),
        (broken.as_str(), version_a.as_str())
    );
    let health = host.healthz().await;
    let answer_health = &health["plugins"]["answer"];
    assert_eq!(answer_health["version"], version_a, "{health}");
    assert_eq!(answer_health["lastRollback"]["from"], broken, "{health}");
    assert_eq!(answer_health["lastRollback"]["automatic"], true, "{health}");
    let refused = &health["refused"][0];
    assert_eq!(refused["plugin"], "answer", "{health}");
    assert_eq!(refused["candidate"], broken, "{health}");
    assert!(
        refused["reason"]
            .as_str()
            .is_some_and(|r| r.contains("rolled back") && r.contains(&path.display().to_string())),
        "{health}"
    );
    assert!(
        logs.lines_with("rolled back")
            .iter()
            .any(|l| l.contains(&broken) && l.contains("WARN")),
        "a log line names the version rolled back"
    );

    // The broken file is still in place: no reload loads it again.
    assert_eq!(host.server.reload().await, vec![]);
    for m in n + 1..n + 20 {
        assert_eq!(answer(&mut c, m).await, Ok("a".into()));
    }
    // A fixed version is taken as usual.
    host.dir
        .replace("answer.wasm", std::fs::read(wasm("swap-b")).unwrap());
    wait_reload(&mut reloads, "the fixed version", |e| match e {
        ReloadEvent::Swapped { .. } => Some(()),
        other => panic!("unexpected {other:?}"),
    })
    .await;
    assert_eq!(answer(&mut c, 10_000).await, Ok("b".into()));
    assert!(
        host.healthz().await["refused"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    c.sync().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plexus_rollback_returns_to_the_previous_version() {
    let host = host().await;
    let mut reloads = host.reloads();
    let mut c = host.client().await;
    let version_a = host.version_of("answer").await;

    // Nothing to roll back to yet.
    let out = rollback_command(&host).await;
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("409") && stderr.contains("no previous version"),
        "{stderr}"
    );

    host.dir
        .replace("answer.wasm", std::fs::read(wasm("swap-b")).unwrap());
    wait_reload(&mut reloads, "the swap to b", |e| match e {
        ReloadEvent::Swapped { .. } => Some(()),
        other => panic!("unexpected {other:?}"),
    })
    .await;
    assert_eq!(answer(&mut c, 1).await, Ok("b".into()));

    let out = rollback_command(&host).await;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains(&version_a), "{stdout}");
    assert_eq!(answer(&mut c, 2).await, Ok("a".into()));
    let health = host.healthz().await;
    assert_eq!(health["plugins"]["answer"]["version"], version_a);
    assert_eq!(
        health["plugins"]["answer"]["lastRollback"]["automatic"],
        false
    );
    c.sync().await;
}

/// Runs `plexus rollback answer --host ADDR` against the host.
async fn rollback_command(host: &Host) -> std::process::Output {
    let out = tokio::process::Command::new(support::plexus_bin())
        .args(["rollback", "answer", "--host", &host.addr().to_string()])
        .output();
    support::within("plexus rollback", out)
        .await
        .expect("running plexus rollback")
}
