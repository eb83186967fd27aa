//! Plugins' key-value state under concurrent calls: increments and compare-and-set from many
//! clients at once, on one node (in process) and across a cluster of real `plexus serve`
//! processes joined through a real `redis-server`, each started by the test on a free port.
//! The plugin is the `relay` fixture under the id `counter` (its `incr`, `cas` and `get`
//! handlers).

mod support;

use std::collections::BTreeSet;

use serde_json::json;
use support::processes::{Node, Redis};
use support::{Client, Host, TempDir, toml_str, wasm, within};

/// Clients per node, and increments each of them sends.
const CLIENTS_PER_NODE: usize = 2;
const INCREMENTS: usize = 100;

/// The `relay` fixture as plugin `counter`, with its key-value routes.
fn counter_manifest() -> String {
    format!(
        r#"manifest_version = 1

[plugin]
id = "counter"

[source]
wasm = {wasm}

[[route]]
type = "kv.incr"
handler = "incr"

[[route]]
type = "kv.cas"
handler = "cas"

[[route]]
type = "kv.get"
handler = "get"

[capabilities]
host = ["messaging", "rooms", "kv", "config", "timers"]
rooms = ["*"]

[limits]
timeout_ms = 2000
"#,
        wasm = toml_str(&wasm("relay").display().to_string())
    )
}

/// Sends `n` increments of `key` at once (pipelined) and returns the values their acks carry.
async fn increments(mut c: Client, key: &str, n: usize) -> Vec<i64> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        let id = c.next_id();
        c.feed(json!({"type": "kv.incr", "messageId": id, "payload": {"key": key}}))
            .await;
        ids.push(id);
    }
    c.flush().await;
    let mut values = Vec::with_capacity(n);
    for id in ids {
        let (before, ack) = c.answer_to(&id).await;
        assert!(before.is_empty(), "{before:?}");
        assert_eq!(ack["type"], "sys.ack", "{ack}");
        values.push(ack["payload"]["value"].as_i64().expect("a value"));
    }
    values
}

/// Every client increments `key` at once; the values returned must be 1..=total, once each.
async fn count_together(clients: Vec<Client>, key: &str) {
    let total = clients.len() * INCREMENTS;
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| {
            let key = key.to_owned();
            tokio::spawn(async move { increments(c, &key, INCREMENTS).await })
        })
        .collect();
    let mut all = Vec::with_capacity(total);
    for task in tasks {
        let values = task.await.expect("a client task");
        // One client's increments happen in the order it sent them.
        assert!(values.windows(2).all(|w| w[0] < w[1]), "{values:?}");
        all.extend(values);
    }
    let seen: BTreeSet<i64> = all.iter().copied().collect();
    assert_eq!(seen.len(), total, "a value was returned twice");
    assert_eq!(seen, (1..=total as i64).collect(), "every value once");
}

async fn cas(c: &mut Client, key: &str, expected: Option<&str>, value: Option<&str>) -> bool {
    let ack = c
        .ack(json!({"type": "kv.cas", "payload": {"key": key, "expected": expected, "value": value}}))
        .await;
    ack["payload"]["set"].as_bool().expect("set")
}

/// Whether the node's store (its replica, in a cluster) holds `value` under `key`: a call that
/// only reads, so that it commits nothing and never reaches Redis.
async fn holds(c: &mut Client, key: &str, value: &str) -> bool {
    let ack = c
        .ack(json!({"type": "kv.get", "payload": {"key": key}}))
        .await;
    ack["payload"]["value"] == value
}

// ---------------------------------------------------------------------------------------------
// One node
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_increments_on_one_node_add_up() {
    let host = Host::start(&[("counter.toml", counter_manifest())]).await;
    let mut clients = Vec::new();
    for _ in 0..6 {
        clients.push(host.client().await);
    }
    count_together(clients, "n").await;
    let store = host.server.hub().registry.kv_store("counter");
    assert_eq!(store.get("n").as_deref(), Some("600"));

    // Not an integer, or an overflow: the call fails and nothing changes.
    let mut c = host.client().await;
    store.insert("word".into(), "many".into());
    let err = c
        .expect_error(
            json!({"type": "kv.incr", "payload": {"key": "word"}}),
            "bad_value",
        )
        .await;
    assert!(
        err["payload"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not a decimal")),
        "{err}"
    );
    store.insert("big".into(), i64::MAX.to_string());
    c.expect_error(
        json!({"type": "kv.incr", "payload": {"key": "big"}}),
        "bad_value",
    )
    .await;
    assert_eq!(store.get("big"), Some(i64::MAX.to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compare_and_set_on_one_node_lets_exactly_one_of_many_win() {
    let host = Host::start(&[("counter.toml", counter_manifest())]).await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let mut c = host.client().await;
        tasks.push(tokio::spawn(async move {
            cas(&mut c, "owner", None, Some(&format!("c{i}"))).await
        }));
    }
    let mut wins = 0;
    for task in tasks {
        wins += usize::from(task.await.expect("a client task"));
    }
    assert_eq!(wins, 1);
    let mut c = host.client().await;
    assert!(!cas(&mut c, "owner", None, Some("late")).await);
}

// ---------------------------------------------------------------------------------------------
// A cluster
// ---------------------------------------------------------------------------------------------

/// A free port on loopback (bound, read, released: Redis binds it next).
async fn cluster(redis: &Redis, n: usize) -> (TempDir, Vec<Node>) {
    let dir = TempDir::new();
    dir.write("counter.toml", counter_manifest());
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(Node::start(redis, &dir, &[]).await);
    }
    (dir, nodes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increments_from_clients_on_three_nodes_add_up() {
    let redis = Redis::start().await;
    let (_dir, nodes) = cluster(&redis, 3).await;
    let mut clients = Vec::new();
    for node in &nodes {
        for _ in 0..CLIENTS_PER_NODE {
            clients.push(node.client().await);
        }
    }
    count_together(clients, "n").await;
    let total = (nodes.len() * CLIENTS_PER_NODE * INCREMENTS) as i64;
    // In Redis, and on every node's replica (read by a call that writes nothing).
    let stored: String = redis.cmd(&["HGET", "plexus:kv:counter:v", "n"]).await;
    assert_eq!(stored, total.to_string());
    for node in &nodes {
        let mut c = node.client().await;
        within("the node's replica to catch up", async {
            while !holds(&mut c, "n", &total.to_string()).await {}
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compare_and_set_racing_from_two_nodes_lets_exactly_one_win() {
    let redis = Redis::start().await;
    let (_dir, nodes) = cluster(&redis, 2).await;
    for round in 0..20 {
        let key = format!("lock{round}");
        let mut a = nodes[0].client().await;
        let mut b = nodes[1].client().await;
        let (ka, kb) = (key.clone(), key.clone());
        let ta = tokio::spawn(async move { cas(&mut a, &ka, None, Some("a")).await });
        let tb = tokio::spawn(async move { cas(&mut b, &kb, None, Some("b")).await });
        let (wa, wb) = (ta.await.expect("a"), tb.await.expect("b"));
        assert!(wa ^ wb, "round {round}: exactly one wins ({wa}, {wb})");
        let winner: String = redis.cmd(&["HGET", "plexus:kv:counter:v", &key]).await;
        assert_eq!(winner, if wa { "a" } else { "b" });
    }
    // The loser sees the winner's value: its own compare-and-set over it succeeds.
    let mut b = nodes[1].client().await;
    let value: String = redis.cmd(&["HGET", "plexus:kv:counter:v", "lock0"]).await;
    assert!(cas(&mut b, "lock0", Some(&value), None).await);
    let gone: Option<String> = redis.cmd(&["HGET", "plexus:kv:counter:v", "lock0"]).await;
    assert_eq!(gone, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_out_of_reach_a_write_is_unavailable_and_nothing_of_the_call_applies() {
    let mut redis = Redis::start().await;
    let (_dir, nodes) = cluster(&redis, 1).await;
    let mut c = nodes[0].client().await;
    let ack = c
        .ack(json!({"type": "kv.incr", "payload": {"key": "n"}}))
        .await;
    assert_eq!(ack["payload"]["value"], 1);
    redis.kill().await;
    let err = c
        .expect_error(
            json!({"type": "kv.incr", "payload": {"key": "n"}}),
            "unavailable",
        )
        .await;
    assert!(
        err["payload"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nothing was applied")),
        "{err}"
    );
    // Reads go on from the node's replica, which kept the last value.
    assert!(holds(&mut c, "n", "1").await);
    assert!(!holds(&mut c, "n", "2").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_follows_commits_of_other_nodes_and_loads_what_was_there_before() {
    let redis = Redis::start().await;
    let (dir, nodes) = cluster(&redis, 1).await;
    let mut a = nodes[0].client().await;
    for _ in 0..5 {
        a.ack(json!({"type": "kv.incr", "payload": {"key": "n"}}))
            .await;
    }
    // A node started later loads the store, then follows what the first node commits.
    let late = Node::start(&redis, &dir, &[]).await;
    let mut b = late.client().await;
    within("the late node's replica to load", async {
        while !holds(&mut b, "n", "5").await {}
    })
    .await;
    a.ack(json!({"type": "kv.cas", "payload": {"key": "s", "expected": null, "value": "x"}}))
        .await;
    within("the replica to follow", async {
        while !holds(&mut b, "s", "x").await {}
    })
    .await;
    // And the first node follows the late one's.
    assert!(cas(&mut b, "s", Some("x"), Some("y")).await);
    within("the first replica to follow", async {
        while !holds(&mut a, "s", "y").await {}
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// The cost of an increment (a measurement, not a test: docs/benchmarks.md, "Key-value")
// ---------------------------------------------------------------------------------------------

/// A node's CPU time so far (utime + stime), in µs.
fn cpu_us(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("reading /proc");
    // The fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
    let rest = &stat[stat.rfind(')').expect("a stat line") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // Clock ticks are 1/100 s on Linux.
    ticks * 10_000
}

/// `n` frames of `make(i)` sent one at a time, each after the last one's ack: the mean µs per
/// round trip, and the node's CPU µs per frame.
async fn timed(
    c: &mut Client,
    pid: u32,
    n: usize,
    make: impl Fn(usize) -> serde_json::Value,
) -> (f64, f64) {
    let cpu = cpu_us(pid);
    let started = std::time::Instant::now();
    for i in 0..n {
        c.ack(make(i)).await;
    }
    let wall = started.elapsed().as_micros() as f64 / n as f64;
    (wall, (cpu_us(pid) - cpu) as f64 / n as f64)
}

/// Run with `cargo test --release -p plexus --test cluster_kv -- --ignored --nocapture`.
///
/// One client sends frames one at a time to one node without a cluster and to a node of a
/// cluster of two, alternating in rounds (the machine is shared: the median of the rounds is
/// reported, each against the one-node increment of the same run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, run by hand"]
async fn measure_the_cost_of_an_increment() {
    const N: usize = 10_000;
    const ROUNDS: usize = 5;
    let redis = Redis::start().await;
    let dir = TempDir::new();
    dir.write("counter.toml", counter_manifest());
    let incr = |_| json!({"type": "kv.incr", "payload": {"key": "n"}});
    // A call that only reads: no commit.
    let read = |_| json!({"type": "kv.get", "payload": {"key": "n"}});
    let alone = Node::start_alone(&dir).await;
    let (_dir, nodes) = cluster(&redis, 2).await;
    let mut a = alone.client().await;
    let mut c = nodes[0].client().await;
    let names = [
        "one node: a call that only reads",
        "one node: increment",
        "cluster: a call that only reads",
        "cluster: increment (the committing node's CPU)",
        "cluster: increment (the other node's CPU, following the commits)",
    ];
    let mut samples: Vec<Vec<(f64, f64)>> = vec![Vec::new(); names.len()];
    let mut commands = 0;
    for _ in 0..ROUNDS {
        samples[0].push(timed(&mut a, alone.pid(), N, read).await);
        samples[1].push(timed(&mut a, alone.pid(), N, incr).await);
        samples[2].push(timed(&mut c, nodes[0].pid(), N, read).await);
        let (before, other) = (redis.commands().await, cpu_us(nodes[1].pid()));
        let (wall, cpu) = timed(&mut c, nodes[0].pid(), N, incr).await;
        commands += redis.commands().await - before;
        samples[3].push((wall, cpu));
        samples[4].push((wall, (cpu_us(nodes[1].pid()) - other) as f64 / N as f64));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let rows: Vec<(f64, f64)> = samples
        .into_iter()
        .map(|s| {
            (
                median(s.iter().map(|x| x.0).collect()),
                median(s.iter().map(|x| x.1).collect()),
            )
        })
        .collect();
    let base = rows[1];
    for (what, (wall, cpu)) in names.iter().zip(&rows) {
        println!(
            "{what}: {wall:.1} µs per round trip ({:.2}x), node CPU {cpu:.1} µs per call ({:.2}x)",
            wall / base.0,
            cpu / base.1
        );
    }
    println!(
        "Redis commands per increment (the script's included): {:.2}",
        commands as f64 / (N * ROUNDS) as f64
    );
    // Contended: 3 nodes, 2 clients each, 1,000 increments each, one key.
    let (_dir3, three) = cluster(&redis, 3).await;
    let mut clients = Vec::new();
    for node in &three {
        for _ in 0..2 {
            clients.push(node.client().await);
        }
    }
    let started = std::time::Instant::now();
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|c| tokio::spawn(async move { increments(c, "hot", 1000).await }))
        .collect();
    for task in tasks {
        task.await.expect("a client");
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "contended: 6,000 increments of one key from 6 clients on 3 nodes in {elapsed:.2} s ({:.0} per second)",
        6000.0 / elapsed
    );
}
