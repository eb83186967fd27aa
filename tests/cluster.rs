//! The cluster: real `plexus serve` processes joined through a real `redis-server`, each
//! started by the test on a free port, with real WebSocket clients spread across the nodes.

mod support;

use std::collections::BTreeSet;
use std::process::Stdio;

use serde_json::{Value, json};
use support::processes::{Node, Redis};
use support::{Client, TempDir, chat_manifest, echo_manifest, relay_manifest, wasm, within};
use tokio::process::Command;

fn manifests() -> TempDir {
    let dir = TempDir::new();
    dir.write("echo.toml", echo_manifest());
    dir.write("relay.toml", relay_manifest(&wasm("relay"), "a", &[]));
    dir
}

async fn cluster(redis: &Redis, manifests: &TempDir, n: usize) -> Vec<Node> {
    let mut nodes = Vec::new();
    for _ in 0..n {
        nodes.push(Node::start(redis, manifests, &["--cluster-node-ttl-secs", "2"]).await);
    }
    nodes
}

async fn join(c: &mut Client, room: &str) -> Value {
    let id = c.next_id();
    let (_, ack) = c
        .request(json!({"type": "sys.join", "messageId": id, "room": room}))
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    ack
}

/// The `echo.broadcast` payloads `c` reads until it has `n` of them, skipping the room's
/// membership and presence notices (which come from other nodes at their own pace).
async fn broadcasts(c: &mut Client, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        let frame = c.recv().await;
        match frame["type"].as_str() {
            Some("echo.broadcast") => got.push(frame["payload"].clone()),
            Some("room.joined" | "room.left" | "presence.changed") => {}
            _ => panic!("unexpected frame {frame}"),
        }
    }
    got
}

/// Every client in `clients` says hello to the room, and reads everyone else's: once done,
/// each node has applied every other node's joins (they precede the hellos in the room's
/// stream).
async fn hellos(clients: &mut [Client], room: &str) {
    for c in clients.iter_mut() {
        let id = c.next_id();
        c.send(json!({"type": "echo.broadcast", "messageId": id, "room": room, "payload": {"hello": c.connection_id}}))
            .await;
    }
    let others = clients.len() - 1;
    for c in clients.iter_mut() {
        let mut seen = 0;
        let mut acked = false;
        while seen < others || !acked {
            let frame = c.recv().await;
            match frame["type"].as_str() {
                Some("echo.broadcast") => seen += 1,
                Some("sys.ack") => acked = true,
                Some("room.joined" | "room.left" | "presence.changed") => {}
                _ => panic!("unexpected frame {frame}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_room_broadcast_reaches_every_node_exactly_once_in_order() {
    let redis = Redis::start().await;
    let dir = manifests();
    let nodes = cluster(&redis, &dir, 3).await;
    let mut sender = nodes[0].client().await;
    let mut local = nodes[0].client().await;
    let mut second = nodes[1].client().await;
    let mut third = nodes[2].client().await;
    for c in [&mut sender, &mut local, &mut second, &mut third] {
        join(c, "lobby").await;
    }

    const N: usize = 1000;
    for n in 0..N {
        let id = sender.next_id();
        sender
            .feed(json!({"type": "echo.broadcast", "messageId": id, "room": "lobby", "payload": {"n": n}}))
            .await;
    }
    sender.flush().await;
    let expected = numbered(0..N);
    for c in [&mut local, &mut second, &mut third] {
        assert_eq!(broadcasts(c, N).await, expected, "on {}", c.connection_id);
    }
    // Nothing more: a last broadcast is the next thing each member reads.
    let id = sender.next_id();
    sender
        .send(json!({"type": "echo.broadcast", "messageId": id, "room": "lobby", "payload": {"last": true}}))
        .await;
    for c in [&mut local, &mut second, &mut third] {
        assert_eq!(broadcasts(c, 1).await, [json!({"last": true})]);
    }
    let mut acks = 0;
    while acks < N + 1 {
        let frame = sender.recv().await;
        match frame["type"].as_str() {
            Some("sys.ack") => acks += 1,
            Some("room.joined" | "presence.changed") => {}
            _ => panic!("unexpected frame {frame}"),
        }
    }
    for node in &nodes[1..] {
        let report = node.healthz().await;
        assert_eq!(report["cluster"]["duplicates"], 0, "{report}");
        assert_eq!(report["cluster"]["lost"], 0, "{report}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_members_in_a_room_receives_none_of_its_traffic() {
    let redis = Redis::start().await;
    let dir = manifests();
    let nodes = cluster(&redis, &dir, 3).await;
    let mut a = nodes[0].client().await;
    let mut b = nodes[1].client().await;
    let mut elsewhere = nodes[2].client().await;
    join(&mut a, "busy").await;
    join(&mut b, "busy").await;
    join(&mut elsewhere, "quiet").await;
    assert_eq!(redis.subscribers("busy").await, 2);
    assert_eq!(redis.subscribers("quiet").await, 1);
    for n in 0..20 {
        let id = a.next_id();
        a.send(
            json!({"type": "echo.broadcast", "messageId": id, "room": "busy", "payload": {"n": n}}),
        )
        .await;
    }
    assert_eq!(broadcasts(&mut b, 20).await.len(), 20);
    let third = nodes[2].healthz().await;
    assert_eq!(third["cluster"]["received"], 0, "{third}");
    assert_eq!(third["cluster"]["rooms"], 1, "{third}");
    // The last member on a node leaves: the node stops listening to the room.
    let id = b.next_id();
    let (_, ack) = b
        .request(json!({"type": "sys.leave", "messageId": id, "room": "busy"}))
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    within("node 2 to unsubscribe", async {
        while redis.subscribers("busy").await != 1 {
            tokio::task::yield_now().await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_lists_agree_on_every_node_and_direct_sends_cross_nodes() {
    let redis = Redis::start().await;
    let dir = manifests();
    let nodes = cluster(&redis, &dir, 3).await;
    let mut clients = Vec::new();
    for node in &nodes {
        let mut c = node.client().await;
        join(&mut c, "team").await;
        clients.push(c);
    }
    hellos(&mut clients, "team").await;
    // A newcomer on each node sees every member, wherever they are (the newcomers before it
    // included, once their hellos went round).
    for node in &nodes {
        let everyone: BTreeSet<String> = clients.iter().map(|c| c.connection_id.clone()).collect();
        let mut probe = node.client().await;
        let ack = join(&mut probe, "team").await;
        let listed: BTreeSet<String> = ack["payload"]["members"]
            .as_array()
            .expect("members in the join ack")
            .iter()
            .map(|m| m["connectionId"].as_str().unwrap().to_owned())
            .filter(|id| *id != probe.connection_id)
            .collect();
        assert_eq!(listed, everyone, "on {}", probe.connection_id);
        clients.push(probe);
        hellos(&mut clients, "team").await;
    }
    // A plugin on node 1 sends to a connection on node 3.
    let to = clients[2].connection_id.clone();
    assert_ne!(
        clients[0].connection_id.split('-').nth(1),
        clients[2].connection_id.split('-').nth(1),
        "the two clients are on different nodes"
    );
    let id = clients[0].next_id();
    let (_, ack) = clients[0]
        .request(
            json!({"type": "relay.send", "messageId": id, "payload": {"to": to, "body": "psst"}}),
        )
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    let (_, relayed) = clients[2].recv_until_type("relayed").await;
    assert_eq!(relayed["payload"]["body"], "psst");
    assert_eq!(
        relayed["payload"]["from"],
        clients[0].connection_id.as_str()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_s_members_leave_every_room_within_the_lease() {
    let redis = Redis::start().await;
    let dir = manifests();
    // The plugins hear of each member that left with its node once, on one node.
    dir.replace(
        "relay.toml",
        relay_manifest(&wasm("relay"), "a", &[("room.left", "seen")]),
    );
    let mut nodes = cluster(&redis, &dir, 3).await;
    let mut clients = Vec::new();
    for node in &nodes {
        let mut c = node.client().await;
        join(&mut c, "watch").await;
        clients.push(c);
    }
    let mut events = nodes[0].client().await;
    join(&mut events, "events").await;
    hellos(&mut clients, "watch").await;
    let victim = clients.pop().unwrap().connection_id.clone();
    nodes[2].kill().await;
    // The survivors learn of it once the dead node's lease (2 s) runs out and a survivor
    // renews its own: the members of the dead node leave, on every node.
    for c in &mut clients {
        let (_, left) = c.recv_until_type("room.left").await;
        assert_eq!(left["payload"]["connectionId"], victim.as_str(), "{left}");
    }
    let (_, seen) = events.recv_until_type("seen").await;
    assert_eq!(seen["payload"]["event"], "room.left", "{seen}");
    assert_eq!(seen["payload"]["payload"]["connectionId"], victim.as_str());
    assert_eq!(seen["payload"]["payload"]["reason"], "node_lost");
    let mut probe = nodes[0].client().await;
    let ack = join(&mut probe, "watch").await;
    let listed: Vec<&str> = ack["payload"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["connectionId"].as_str().unwrap())
        .collect();
    assert!(!listed.contains(&victim.as_str()), "{listed:?}");
}

/// The `echo.broadcast` payloads among `frames`.
fn payloads(frames: &[Value]) -> Vec<Value> {
    frames
        .iter()
        .filter(|f| f["type"] == "echo.broadcast")
        .map(|f| f["payload"].clone())
        .collect()
}

/// The payloads `{"n": n}` for each `n` in `range`, as `send_numbered` sends them.
fn numbered(range: std::ops::Range<usize>) -> Vec<Value> {
    range.map(|n| json!({"n": n})).collect()
}

/// Resumes `client`'s session on `node`; returns the resumed client, the `echo.broadcast`
/// payloads replayed before the answer, and the answer, which must be a `sys.ack`.
async fn resume_on(node: &Node, client: &Client) -> (Client, Vec<Value>, Value) {
    let (moved, before, answer) = Client::resume(
        node.addr,
        &client.session_id,
        &client.resume_token,
        client.last_seq,
    )
    .await;
    assert_eq!(answer["type"], "sys.ack", "{answer}");
    (moved, payloads(&before), answer)
}

/// Reads `echo.broadcast` payloads into `got` until it holds one for each `n` in `range`, and
/// checks that they are exactly those, in order.
async fn expect_numbered(c: &mut Client, mut got: Vec<Value>, range: std::ops::Range<usize>) {
    let expected = numbered(range);
    got.extend(broadcasts(c, expected.len() - got.len()).await);
    assert_eq!(got, expected);
}

/// Sends `echo.broadcast` `{"n": n}` to `room` for each `n` in `range`, pipelined, and reads
/// the acks.
async fn send_numbered(sender: &mut Client, room: &str, range: std::ops::Range<usize>) {
    let count = range.len();
    for n in range {
        let id = sender.next_id();
        sender
            .feed(json!({"type": "echo.broadcast", "messageId": id, "room": room, "payload": {"n": n}}))
            .await;
    }
    sender.flush().await;
    let mut acks = 0;
    while acks < count {
        let frame = sender.recv().await;
        match frame["type"].as_str() {
            Some("sys.ack") => acks += 1,
            Some("room.joined" | "room.left" | "presence.changed") => {}
            _ => panic!("unexpected frame {frame}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumes_on_another_node_after_its_node_was_killed_without_losing_a_frame() {
    let redis = Redis::start().await;
    let dir = manifests();
    let mut nodes = cluster(&redis, &dir, 3).await;
    let mut sender = nodes[0].client().await;
    let mut watcher = Client::connect_as(nodes[1].addr, "wanda").await;
    let mut moving = nodes[2].client().await;
    let mut staying = Client::connect_as(nodes[2].addr, "yuri").await;
    for c in [&mut sender, &mut watcher, &mut moving, &mut staying] {
        join(c, "feed").await;
    }
    let mut all = [sender, watcher, moving, staying];
    hellos(&mut all, "feed").await;
    let [mut sender, mut watcher, mut moving, staying] = all;

    // A message the moving client had answered before its node died.
    let retried = moving.next_id();
    let (before, first_answer) = moving
        .request(json!({"type": "echo", "messageId": retried, "payload": {"once": true}}))
        .await;
    assert_eq!(first_answer["type"], "sys.ack", "{first_answer}");
    assert_eq!(payloads(&before), Vec::<Value>::new());
    // The moving client reads half of the first 100 broadcasts; then its node dies.
    send_numbered(&mut sender, "feed", 0..100).await;
    let read = broadcasts(&mut moving, 50).await;
    assert_eq!(read, numbered(0..50));
    drop(staying);
    nodes[2].kill().await;
    // Published while it is between nodes.
    send_numbered(&mut sender, "feed", 100..200).await;

    // It resumes on another node: every frame after its last seq, in order, once each (the
    // client checks that the seqs go on without a hole).
    let (mut moved, replayed, answer) = resume_on(&nodes[1], &moving).await;
    assert_eq!(
        answer["payload"]["connectionId"],
        moving.connection_id.as_str()
    );
    expect_numbered(&mut moved, replayed, 50..200).await;
    // And what comes next.
    send_numbered(&mut sender, "feed", 200..201).await;
    assert_eq!(broadcasts(&mut moved, 1).await, [json!({"n": 200})]);
    // The retry window moved with it: the message retried gets its first answer again, and is
    // not handled again (no second echo before the answer).
    moved
        .send(json!({"type": "echo", "messageId": retried, "payload": {"once": true}}))
        .await;
    // (The room's notices of the client that did not come back may arrive meanwhile.)
    let again = loop {
        let frame = moved.recv().await;
        match frame["type"].as_str() {
            Some("room.left" | "presence.changed") => continue,
            _ => break frame,
        }
    };
    assert_eq!(again["type"], "sys.ack", "{again}");
    assert_eq!(again["payload"], first_answer["payload"]);

    // The identity that did not come back goes offline, once, within the lease.
    let (_, offline) = watcher.recv_until_type("presence.changed").await;
    let mut offline = offline;
    while offline["payload"]["identity"] != "yuri" {
        offline = watcher.recv_until_type("presence.changed").await.1;
    }
    assert_eq!(offline["payload"]["state"], "offline", "{offline}");
    // A direct send to the moved connection reaches it on its new node.
    let id = sender.next_id();
    sender
        .send(json!({"type": "relay.send", "messageId": id, "payload": {"to": moving.connection_id, "body": "found you"}}))
        .await;
    let (_, direct) = moved.recv_until_type("relayed").await;
    assert_eq!(direct["payload"]["body"], "found you", "{direct}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_moves_from_a_live_node_to_another_without_losing_a_frame() {
    let redis = Redis::start().await;
    let dir = manifests();
    let nodes = cluster(&redis, &dir, 2).await;
    let mut sender = nodes[0].client().await;
    let mut moving = nodes[0].client().await;
    for c in [&mut sender, &mut moving] {
        join(c, "feed").await;
    }
    send_numbered(&mut sender, "feed", 0..100).await;
    let read = broadcasts(&mut moving, 30).await;
    assert_eq!(read, numbered(0..30));
    // A load balancer without sticky sessions sends the reconnection to the other node: the
    // first node lets the session go (its connection closes with 4000) and it moves.
    let (mut moved, replayed, _) = resume_on(&nodes[1], &moving).await;
    let closed = loop {
        match moving.next_message().await {
            Some(tokio_tungstenite::tungstenite::Message::Close(frame)) => break frame,
            Some(_) => continue,
            None => break None,
        }
    };
    assert_eq!(
        closed.map(|f| u16::from(f.code)),
        Some(4000),
        "the old connection closes as taken over"
    );
    send_numbered(&mut sender, "feed", 100..150).await;
    expect_numbered(&mut moved, replayed, 30..150).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_message_to_an_identity_reaches_its_connections_on_other_nodes() {
    let redis = Redis::start().await;
    let dir = manifests();
    dir.write("chat.toml", chat_manifest());
    let nodes = cluster(&redis, &dir, 3).await;
    // ada has a connection on two other nodes; the chat plugin keeps an identity's connections
    // in its key-value store, which every node shares.
    let mut ada = [
        Client::connect_as(nodes[1].addr, "ada").await,
        Client::connect_as(nodes[2].addr, "ada").await,
    ];
    let mut bob = Client::connect_as(nodes[0].addr, "bob").await;
    join(&mut bob, "lobby").await;
    let send =
        |text: String| json!({"type": "chat.send", "room": "lobby", "payload": {"text": text}});
    // The store's commits reach bob's node a moment after ada's connects: ask until both count.
    within("both of ada's connections to count on bob's node", async {
        loop {
            let id = bob.next_id();
            let mut frame = send("/msg ada probe".into());
            frame["messageId"] = json!(id);
            let (_, answer) = bob.request(frame).await;
            if answer["type"] == "sys.ack" && answer["payload"]["delivered"] == 2 {
                return;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    let id = bob.next_id();
    let mut frame = send("/msg ada hello from node 0".into());
    frame["messageId"] = json!(id);
    let (_, answer) = bob.request(frame).await;
    assert_eq!(answer["payload"]["delivered"], 2, "{answer}");
    for c in &mut ada {
        loop {
            let (_, direct) = c.recv_until_type("chat.direct").await;
            if direct["payload"]["text"] == "hello from node 0" {
                assert_eq!(direct["payload"]["from"], "bob", "{direct}");
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_outlive_a_node_shut_down_gracefully() {
    let redis = Redis::start().await;
    let dir = manifests();
    let mut nodes = cluster(&redis, &dir, 2).await;
    let mut sender = nodes[1].client().await;
    let mut moving = nodes[0].client().await;
    for c in [&mut sender, &mut moving] {
        join(c, "feed").await;
    }
    let mut both = [sender, moving];
    hellos(&mut both, "feed").await;
    let [mut sender, mut moving] = both;
    send_numbered(&mut sender, "feed", 0..40).await;
    assert_eq!(broadcasts(&mut moving, 20).await, numbered(0..20));
    // A rolling restart stops the node: its client resumes on the other one.
    nodes[0].terminate().await;
    send_numbered(&mut sender, "feed", 40..60).await;
    let (mut moved, replayed, _) = resume_on(&nodes[1], &moving).await;
    expect_numbered(&mut moved, replayed, 20..60).await;
}

/// `c` answers the `question` it reads next with `answer`; returns the host's answer to its
/// `sys.reply`.
async fn answer_question(c: &mut Client, answer: Value) -> Value {
    let (_, question) = c.recv_until_type("question").await;
    let reference = question["messageId"].as_str().unwrap().to_owned();
    let id = c.next_id();
    let (_, ack) = c
        .request(json!({"type": "sys.reply", "messageId": id,
                        "payload": {"ref": reference, "payload": answer}}))
        .await;
    ack
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_s_request_gets_answers_from_clients_on_other_nodes() {
    let redis = Redis::start().await;
    let dir = manifests();
    let nodes = cluster(&redis, &dir, 2).await;
    let mut asker = nodes[0].client().await;
    let mut far = nodes[1].client().await;
    // One connection of another node.
    let id = asker.next_id();
    let (_, ack) = asker
        .request(json!({"type": "relay.ask", "messageId": id,
                        "payload": {"to": far.connection_id, "timeoutMs": 10000, "q": "ready?"}}))
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    let ack = answer_question(&mut far, json!("yes")).await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    let (_, outcome) = asker.recv_until_type("outcome").await;
    let outcome = &outcome["payload"]["outcome"];
    assert_eq!(
        outcome["answers"][0]["connectionId"],
        far.connection_id.as_str(),
        "{outcome}"
    );
    assert_eq!(outcome["answers"][0]["payload"], "yes", "{outcome}");
    assert_eq!(outcome["missing"], json!([]), "{outcome}");

    // A room with members on both nodes (each node knows the other's once the hellos are read).
    join(&mut asker, "poll").await;
    join(&mut far, "poll").await;
    let mut both = [asker, far];
    hellos(&mut both, "poll").await;
    let [mut asker, mut far] = both;
    let id = asker.next_id();
    let (before, ack) = asker
        .request(json!({"type": "relay.ask", "messageId": id, "room": "poll",
                        "payload": {"timeoutMs": 10000, "q": "ready?"}}))
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    let mine = before
        .iter()
        .find(|f| f["type"] == "question")
        .expect("the asker's own question");
    let reference = mine["messageId"].as_str().unwrap().to_owned();
    let id = asker.next_id();
    asker
        .send(json!({"type": "sys.reply", "messageId": id,
                     "payload": {"ref": reference, "payload": "near"}}))
        .await;
    let ack = answer_question(&mut far, json!("far")).await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    let (_, outcome) = asker.recv_until_type("outcome").await;
    let outcome = &outcome["payload"]["outcome"];
    let mut answers: Vec<&str> = outcome["answers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["payload"].as_str().unwrap())
        .collect();
    answers.sort();
    assert_eq!(answers, ["far", "near"], "{outcome}");
    assert_eq!(outcome["missing"], json!([]), "{outcome}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_recover_by_themselves_when_redis_restarts_and_no_frame_goes_missing_silently() {
    let mut redis = Redis::start().await;
    let port = redis.port;
    let dir = manifests();
    let nodes = cluster(&redis, &dir, 3).await;
    let mut sender = nodes[0].client().await;
    let mut a = nodes[1].client().await;
    let mut b = nodes[2].client().await;
    for c in [&mut sender, &mut a, &mut b] {
        join(c, "storm").await;
    }
    redis.kill().await;
    // While Redis is down, the nodes serve their own clients and say they are degraded.
    for node in &nodes {
        within("the node to report Redis down", async {
            while node.healthz().await["status"] != "degraded" {
                tokio::task::yield_now().await;
            }
        })
        .await;
    }
    // Its own node still answers it (the room notices of the other nodes may come first).
    let id = sender.next_id();
    let (before, ack) = sender
        .request(json!({"type": "echo", "messageId": id, "payload": {"alone": true}}))
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    let echoes: Vec<&Value> = before.iter().filter(|f| f["type"] == "echo").collect();
    assert_eq!(echoes.len(), 1, "{before:?}");
    for n in 0..10 {
        let id = sender.next_id();
        sender
            .send(json!({"type": "echo.broadcast", "messageId": id, "room": "storm", "payload": {"n": n}}))
            .await;
    }
    redis = Redis::start_on(port).await;
    // Every node connects again, subscribes again to the rooms it serves, and what was queued
    // meanwhile arrives once, in order.
    let expected = numbered(0..10);
    for c in [&mut a, &mut b] {
        assert_eq!(broadcasts(c, 10).await, expected);
    }
    for node in &nodes {
        within("the node to report itself healthy", async {
            while node.healthz().await["status"] != "ok" {
                tokio::task::yield_now().await;
            }
        })
        .await;
    }
    assert_eq!(redis.subscribers("storm").await, 3);
    let id = sender.next_id();
    sender
        .send(json!({"type": "echo.broadcast", "messageId": id, "room": "storm", "payload": {"after": true}}))
        .await;
    for c in [&mut a, &mut b] {
        assert_eq!(broadcasts(c, 1).await, [json!({"after": true})]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_dropped_between_redis_and_a_node_is_repaired() {
    let redis = Redis::start().await;
    let dir = manifests();
    let nodes = cluster(&redis, &dir, 2).await;
    let mut sender = nodes[0].client().await;
    let mut receiver = nodes[1].client().await;
    join(&mut sender, "repair").await;
    join(&mut receiver, "repair").await;
    for n in 0..5 {
        let id = sender.next_id();
        sender
            .send(json!({"type": "echo.broadcast", "messageId": id, "room": "repair", "payload": {"n": n}}))
            .await;
    }
    assert_eq!(broadcasts(&mut receiver, 5).await.len(), 5);
    // Cut every subscription connection: publications made before the node subscribes again
    // are relayed to nobody, and must come back from the room's stream.
    let killed: u64 = redis.cmd(&["CLIENT", "KILL", "TYPE", "pubsub"]).await;
    assert!(killed >= 2, "{killed}");
    for n in 5..50 {
        let id = sender.next_id();
        sender
            .send(json!({"type": "echo.broadcast", "messageId": id, "room": "repair", "payload": {"n": n}}))
            .await;
    }
    let expected = numbered(5..50);
    assert_eq!(broadcasts(&mut receiver, 45).await, expected);
    receiver.sync().await;

    // A publication Redis keeps in the stream but relays to nobody while every subscription
    // stays up (what a dropped relay looks like): the next one skips an offset, and the node
    // reads the missing one back before it.
    let body = r#"{"type":"echo.broadcast","room":"repair","payload":{"unrelayed":true}}"#;
    let publication = format!("F\u{1f}feedbeef\u{1f}1\u{1f}\u{1f}{body}");
    let script = "local meta = 'plexus:r:' .. ARGV[1]
        local offset = redis.call('HINCRBY', meta, 'offset', 1)
        redis.call('XADD', meta .. ':s', '0-' .. offset, 'd', ARGV[2])
        return offset";
    let _: u64 = redis
        .cmd(&["EVAL", script, "0", "repair", &publication])
        .await;
    let id = sender.next_id();
    sender
        .send(json!({"type": "echo.broadcast", "messageId": id, "room": "repair", "payload": {"n": 50}}))
        .await;
    assert_eq!(
        broadcasts(&mut receiver, 2).await,
        [json!({"unrelayed": true}), json!({"n": 50})]
    );
    let report = nodes[1].healthz().await;
    assert!(report["cluster"]["repairs"].as_u64() >= Some(1), "{report}");
}

/// The identities `sys.presence` lists for `room` on `c`'s node.
async fn presence_list(c: &mut Client, room: &str) -> BTreeSet<String> {
    let id = c.next_id();
    let (_, ack) = c
        .request(json!({"type": "sys.presence", "messageId": id, "room": room}))
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    ack["payload"]["presence"]
        .as_array()
        .expect("a presence list")
        .iter()
        .map(|o| o["identity"].as_str().unwrap().to_owned())
        .collect()
}

/// Reads `c`'s frames until a `presence.changed` about `identity`; other room notices and
/// hellos are skipped.
async fn presence_of(c: &mut Client, identity: &str) -> Value {
    loop {
        let frame = c.recv().await;
        if frame["type"] == "presence.changed" && frame["payload"]["identity"] == identity {
            return frame["payload"].clone();
        }
        assert!(
            matches!(
                frame["type"].as_str(),
                Some("room.joined" | "room.left" | "presence.changed" | "echo.broadcast")
            ),
            "unexpected frame {frame}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_agrees_on_every_node_and_changes_once_for_the_whole_cluster() {
    let redis = Redis::start().await;
    let dir = manifests();
    let mut nodes = cluster(&redis, &dir, 3).await;
    let mut bob = Client::connect_as(nodes[2].addr, "bob").await;
    join(&mut bob, "hall").await;
    // Ada comes online on node 1, then opens a second connection on node 2.
    let mut ada1 = Client::connect_as(nodes[0].addr, "ada").await;
    join(&mut ada1, "hall").await;
    let online = presence_of(&mut bob, "ada").await;
    assert_eq!(online["state"], "online", "{online}");
    let mut ada2 = Client::connect_as(nodes[1].addr, "ada").await;
    join(&mut ada2, "hall").await;
    // Whatever node 2 told the room about Ada's second connection comes before this marker.
    let id = ada2.next_id();
    ada2.request(json!({"type": "echo.broadcast", "messageId": id, "room": "hall", "payload": {"marker": 1}}))
        .await;
    loop {
        let frame = bob.recv().await;
        assert_ne!(frame["type"], "presence.changed", "told again: {frame}");
        if frame["type"] == "echo.broadcast" && frame["payload"]["marker"] == 1 {
            break;
        }
    }
    let mut clients = vec![bob, ada1, ada2];
    hellos(&mut clients, "hall").await;
    let [bob, ada1, ada2] = &mut clients[..] else {
        unreachable!()
    };
    // Bob heard Ada come online once: the second connection on another node changed nothing.
    bob.sync().await;
    let everyone: BTreeSet<String> = ["ada", "bob"].map(String::from).into();
    for c in [&mut *bob, &mut *ada1, &mut *ada2] {
        assert_eq!(presence_list(c, "hall").await, everyone);
    }
    // Ada's first connection leaves: still online through node 2. Then the second one leaves.
    let id = ada1.next_id();
    ada1.request(json!({"type": "sys.leave", "messageId": id, "room": "hall"}))
        .await;
    let (_, left) = bob.recv_until_type("room.left").await;
    assert_eq!(left["payload"]["connectionId"], ada1.connection_id.as_str());
    bob.sync().await;
    let id = ada2.next_id();
    ada2.request(json!({"type": "sys.leave", "messageId": id, "room": "hall"}))
        .await;
    let offline = presence_of(bob, "ada").await;
    assert_eq!(offline["state"], "offline", "{offline}");
    bob.sync().await;
    assert_eq!(
        presence_list(bob, "hall").await,
        BTreeSet::from(["bob".to_owned()])
    );

    // An identity online only on a node that dies goes offline for the others, once.
    join(ada1, "hall").await;
    let mut carl = Client::connect_as(nodes[2].addr, "carl").await;
    join(&mut carl, "hall").await;
    assert_eq!(presence_of(ada1, "carl").await["state"], "online");
    nodes[2].kill().await;
    let mut gone = BTreeSet::new();
    while gone.len() < 2 {
        let frame = ada1.recv().await;
        match frame["type"].as_str() {
            Some("presence.changed") => {
                assert_eq!(frame["payload"]["state"], "offline", "{frame}");
                let who = frame["payload"]["identity"].as_str().unwrap().to_owned();
                assert!(gone.insert(who), "told twice: {frame}");
            }
            Some("room.left") => {}
            _ => panic!("unexpected frame {frame}"),
        }
    }
    assert_eq!(gone, BTreeSet::from(["bob".to_owned(), "carl".to_owned()]));
    ada1.sync().await;
    assert_eq!(
        presence_list(ada1, "hall").await,
        BTreeSet::from(["ada".to_owned()])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_fires_once_with_three_nodes_running() {
    let redis = Redis::start().await;
    let dir = manifests();
    let nodes = cluster(&redis, &dir, 3).await;
    let mut clients = Vec::new();
    for node in &nodes {
        clients.push(node.client().await);
    }
    let id = clients[1].next_id();
    let (_, ack) = clients[1]
        .request(
            json!({"type": "relay.later", "messageId": id, "payload": {"delayMs": 50, "n": 7}}),
        )
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    let fired = clients[1].recv_type("fired").await;
    assert_eq!(fired["payload"]["n"], 7);
    // Long after it was due: no node fired it again.
    let id = clients[1].next_id();
    let (_, ack) = clients[1]
        .request(
            json!({"type": "relay.later", "messageId": id, "payload": {"delayMs": 200, "n": 8}}),
        )
        .await;
    assert_eq!(ack["type"], "sys.ack", "{ack}");
    let fired = clients[1].recv_type("fired").await;
    assert_eq!(
        fired["payload"]["n"], 8,
        "the first timer fired twice: {fired}"
    );
    for c in &mut clients {
        c.sync().await;
    }
}

/// Waits until `node` reports every one of `count` nodes with the same plugin versions, and
/// returns them (plugin → version).
async fn agreed_versions(node: &Node, count: usize) -> Value {
    within("every node to report the same versions", async {
        loop {
            let report = node.healthz().await;
            let cluster = &report["cluster"];
            let versions = cluster["versions"].as_object().cloned().unwrap_or_default();
            if versions.len() == count
                && cluster["versionsDiffer"]
                    .as_array()
                    .is_some_and(Vec::is_empty)
            {
                return versions.values().next().cloned().unwrap();
            }
            tokio::task::yield_now().await;
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plexus_rollout_reaches_every_node_under_traffic_without_losing_a_message() {
    let redis = Redis::start().await;
    let dir = manifests();
    let nodes = cluster(&redis, &dir, 3).await;
    let before = agreed_versions(&nodes[0], 3).await;
    let mut sender = nodes[1].client().await;
    let mut member = nodes[2].client().await;
    join(&mut sender, "rollout").await;
    join(&mut member, "rollout").await;
    // `plexus rollout` puts a new version of `relay` into the directory every node serves,
    // under traffic, and follows it until every node runs it.
    let staging = TempDir::new();
    let new_manifest = staging.write("relay.toml", relay_manifest(&wasm("relay"), "b", &[]));
    let mut rollout = None;
    const N: usize = 300;
    for n in 0..N {
        if n == N / 3 {
            rollout = Some(
                Command::new(support::plexus_bin())
                    .arg("rollout")
                    .arg("--manifests")
                    .arg(dir.path())
                    .args(["--host", &nodes[0].addr.to_string()])
                    .arg(&new_manifest)
                    .stdin(Stdio::null())
                    .kill_on_drop(true)
                    .output(),
            );
        }
        let id = sender.next_id();
        sender
            .feed(json!({"type": "echo.broadcast", "messageId": id, "room": "rollout", "payload": {"n": n}}))
            .await;
    }
    sender.flush().await;
    let expected = numbered(0..N);
    assert_eq!(broadcasts(&mut member, N).await, expected);
    let output = within("plexus rollout", rollout.unwrap())
        .await
        .expect("running plexus rollout");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("relay: ") && stdout.contains("on 3 node(s)"),
        "{stdout}"
    );
    let after = within("every node to swap", async {
        loop {
            let versions = agreed_versions(&nodes[0], 3).await;
            if versions["relay"] != before["relay"] {
                return versions;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    assert_eq!(after["echo"], before["echo"]);
    // Every node runs the new version.
    for node in &nodes {
        let mut c = node.client().await;
        let id = c.next_id();
        c.request(
            json!({"type": "relay.later", "messageId": id, "payload": {"delayMs": 0, "n": 1}}),
        )
        .await;
        let fired = c.recv_type("fired").await;
        assert_eq!(fired["payload"]["version"], "b", "{fired}");
    }
}

/// The version the `relay` plugin on `node` answers with (a timer's `fired`).
async fn relay_version(node: &Node) -> String {
    let mut c = node.client().await;
    let id = c.next_id();
    c.request(json!({"type": "relay.later", "messageId": id, "payload": {"delayMs": 0, "n": 1}}))
        .await;
    let fired = c.recv_type("fired").await;
    fired["payload"]["version"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plexus_rollout_through_redis_reaches_nodes_that_share_no_directory() {
    let redis = Redis::start().await;
    // Each node serves a directory of its own.
    let dirs = [manifests(), manifests()];
    let mut nodes = Vec::new();
    for dir in &dirs {
        nodes.push(Node::start(&redis, dir, &["--cluster-node-ttl-secs", "2"]).await);
    }
    agreed_versions(&nodes[0], 2).await;
    let staging = TempDir::new();
    let new_manifest = staging.write("relay.toml", relay_manifest(&wasm("relay"), "b", &[]));
    let output = within(
        "plexus rollout",
        Command::new(support::plexus_bin())
            .arg("rollout")
            .args(["--cluster", &redis.url()])
            .args(["--host", &nodes[0].addr.to_string()])
            .arg(&new_manifest)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("running plexus rollout");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("on 2 node(s)"), "{stdout}");
    // The artifact is named by its content hash.
    let sha = plexus::cluster::rollout::content_hash(&std::fs::read(&new_manifest).unwrap());
    let recorded: String = redis.cmd(&["HGET", "plexus:rollout", "relay.toml"]).await;
    assert_eq!(recorded, sha);
    let stored: Vec<u8> = redis.cmd(&["GET", &format!("plexus:artifact:{sha}")]).await;
    assert_eq!(stored, std::fs::read(&new_manifest).unwrap());
    for node in &nodes {
        assert_eq!(relay_version(node).await, "b");
    }
    // A node that joins later, from a directory still holding the old version, catches up.
    let late_dir = manifests();
    nodes.push(Node::start(&redis, &late_dir, &["--cluster-node-ttl-secs", "2"]).await);
    agreed_versions(&nodes[0], 3).await;
    assert_eq!(relay_version(&nodes[2]).await, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plexus_rollout_reports_a_version_the_nodes_refuse() {
    let redis = Redis::start().await;
    let dir = manifests();
    let nodes = cluster(&redis, &dir, 2).await;
    let before = agreed_versions(&nodes[0], 2).await;
    let staging = TempDir::new();
    let broken = staging.write("relay.toml", "manifest_version = 1\n[plugin\n");
    let output = within(
        "plexus rollout",
        Command::new(support::plexus_bin())
            .arg("rollout")
            .arg("--manifests")
            .arg(dir.path())
            .args(["--host", &nodes[0].addr.to_string(), "--timeout-secs", "15"])
            .arg(&broken)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("running plexus rollout");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("refused the new version"), "{stderr}");
    // Every node still serves the version it had.
    assert_eq!(agreed_versions(&nodes[0], 2).await, before);
}
