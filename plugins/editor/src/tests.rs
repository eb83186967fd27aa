//! Tests of the editor plugin against the SDK's in-memory `MockHost`: the protocol's answers
//! and errors, compaction, cursors, and a simulated session of several clients with random
//! delays that must converge to the server's text.

use std::collections::VecDeque;

use plexus_ot::{Client, Operation};
use plexus_plugin_sdk::testing::{Effect, MockHost};
use plexus_plugin_sdk::{PluginError, RawMessage};
use serde_json::{Value, json};

use super::plexus_dispatch;

fn call(
    host: &MockHost,
    conn: &str,
    handler: &str,
    room: &str,
    payload: Value,
) -> Result<(Option<Value>, Vec<Effect>), PluginError> {
    let ty = format!("doc.{handler}");
    let msg = RawMessage::json(ty, &payload)
        .with_room(room)
        .from_connection(conn, format!("guest-{conn}"));
    host.call(plexus_dispatch, handler, msg)
}

fn open(host: &MockHost, conn: &str, doc: &str) -> Value {
    let (ack, _) = call(
        host,
        conn,
        "open",
        &format!("doc:{doc}"),
        json!({"doc": doc}),
    )
    .unwrap();
    ack.unwrap()
}

fn send_op(
    host: &MockHost,
    conn: &str,
    doc: &str,
    revision: u64,
    op: Value,
) -> Result<(Value, Vec<Effect>), PluginError> {
    let payload = json!({"doc": doc, "revision": revision, "op": op});
    call(host, conn, "op", &format!("doc:{doc}"), payload).map(|(ack, fx)| (ack.unwrap(), fx))
}

fn code<T: std::fmt::Debug>(result: Result<T, PluginError>) -> String {
    result.unwrap_err().code
}

/// Every stored key of `doc`, to check that a refused message changed nothing.
fn state(host: &MockHost, doc: &str) -> Vec<Option<String>> {
    let mut keys = vec![
        format!("meta:{doc}"),
        format!("snap:{doc}"),
        format!("cursors:{doc}"),
    ];
    keys.extend((0..40).map(|n| format!("op:{n}:{doc}")));
    keys.iter().map(|k| host.kv_get(k)).collect()
}

#[test]
fn open_joins_and_answers_a_snapshot() {
    let host = MockHost::new();
    let (ack, effects) = call(&host, "c1", "open", "doc:a", json!({"doc": "a"})).unwrap();
    let ack = ack.unwrap();
    assert_eq!(ack["text"], "");
    assert_eq!(ack["revision"], 0);
    assert_eq!(ack["cursors"], json!([]));
    assert_eq!(ack.get("variant"), None);
    assert_eq!(
        effects,
        vec![Effect::Join {
            room: "doc:a".into()
        }]
    );
}

#[test]
fn ops_apply_in_revision_order_and_are_broadcast_transformed() {
    let host = MockHost::new();
    open(&host, "c1", "a");
    open(&host, "c2", "a");
    let (ack, effects) = send_op(&host, "c1", "a", 0, json!(["héllo"])).unwrap();
    assert_eq!(ack, json!({"revision": 1}));
    assert_eq!(
        effects,
        vec![Effect::Broadcast {
            room: "doc:a".into(),
            ty: "doc.applied".into(),
            payload: json!({"doc": "a", "revision": 1, "op": ["héllo"], "author": "guest-c1", "connectionId": "c1"}),
            include_sender: false,
        }]
    );
    // c2 still at revision 0 inserts concurrently: transformed past "héllo".
    let (ack, effects) = send_op(&host, "c2", "a", 0, json!(["🙂 "])).unwrap();
    assert_eq!(ack["revision"], 2);
    let Effect::Broadcast { payload, .. } = &effects[0] else {
        panic!("{effects:?}")
    };
    assert_eq!(payload["op"], json!(["🙂 ", 5]));
    assert_eq!(open(&host, "c3", "a")["text"], "🙂 héllo");
    assert_eq!(open(&host, "c3", "a")["revision"], 2);
}

#[test]
fn malformed_ops_are_refused_and_change_nothing() {
    let host = MockHost::new();
    open(&host, "c1", "a");
    send_op(&host, "c1", "a", 0, json!(["abc"])).unwrap();
    let before = state(&host, "a");
    for (revision, op, expected) in [
        (1, json!([2]), "bad_op"),           // does not span the document
        (1, json!([4]), "bad_op"),           // spans more than it
        (1, json!([3, 0]), "bad_op"),        // zero component
        (1, json!([3, ""]), "bad_op"),       // empty insert
        (1, json!([1.5, "x"]), "bad_op"),    // not an integer
        (1, json!({"retain": 3}), "bad_op"), // not an array
        (1, json!([3, null]), "bad_op"),
        (2, json!([3, "x"]), "bad_revision"), // in the future
        (0, json!([3, "x"]), "bad_op"),       // revision 0 had 0 characters
    ] {
        assert_eq!(
            code(send_op(&host, "c1", "a", revision, op.clone())),
            expected,
            "{op}"
        );
    }
    let wrong_room = call(
        &host,
        "c1",
        "op",
        "doc:b",
        json!({"doc": "a", "revision": 1, "op": [3, "x"]}),
    );
    assert_eq!(code(wrong_room), "bad_room");
    let no_revision = call(&host, "c1", "op", "doc:a", json!({"doc": "a", "op": [3]}));
    assert_eq!(code(no_revision), "bad_payload");
    assert_eq!(state(&host, "a"), before);
    assert_eq!(open(&host, "c1", "a")["text"], "abc");
}

#[test]
fn limits_come_from_the_config() {
    let host = MockHost::new()
        .with_config("max_op_chars", "3")
        .with_config("max_doc_chars", "5");
    open(&host, "c1", "a");
    assert_eq!(
        code(send_op(&host, "c1", "a", 0, json!(["abcd"]))),
        "op_too_large"
    );
    send_op(&host, "c1", "a", 0, json!(["abc"])).unwrap();
    assert_eq!(
        code(send_op(&host, "c1", "a", 1, json!([3, "def"]))),
        "doc_too_large"
    );
    send_op(&host, "c1", "a", 1, json!([3, "de"])).unwrap();
    let bad = MockHost::new()
        .with_config("history", "2")
        .with_config("snapshot_every", "3");
    assert_eq!(
        code(call(
            &bad,
            "c1",
            "op",
            "doc:a",
            json!({"doc": "a", "revision": 0, "op": ["x"]})
        )),
        "bad_config"
    );
}

#[test]
fn compaction_keeps_a_bounded_history_and_old_revisions_need_a_resync() {
    let host = MockHost::new()
        .with_config("snapshot_every", "4")
        .with_config("history", "6");
    open(&host, "c1", "a");
    for n in 0..20u64 {
        let mut op = Operation::new();
        op.retain(n as usize).insert("x");
        send_op(&host, "c1", "a", n, json!(op)).unwrap();
    }
    let meta: Value = serde_json::from_str(&host.kv_get("meta:a").unwrap()).unwrap();
    assert_eq!(
        meta,
        json!({"revision": 20, "len": 20, "snapshot": 20, "oldest": 14})
    );
    let snap: Value = serde_json::from_str(&host.kv_get("snap:a").unwrap()).unwrap();
    assert_eq!(snap["text"], "x".repeat(20));
    assert!(host.kv_get("op:14:a").is_none());
    assert!(host.kv_get("op:15:a").is_some());
    // Revision 14 is still transformable; 13 is not.
    send_op(&host, "c1", "a", 14, json!([14, "y"])).unwrap();
    assert_eq!(
        code(send_op(&host, "c1", "a", 13, json!([13, "y"]))),
        "resync_required"
    );
    let text = open(&host, "c2", "a")["text"].as_str().unwrap().to_owned();
    assert_eq!(text, format!("{}y{}", "x".repeat(14), "x".repeat(6)));
}

#[test]
fn cursors_are_transformed_and_listed_for_members() {
    let host = MockHost::new();
    open(&host, "c1", "a");
    open(&host, "c2", "a");
    send_op(&host, "c1", "a", 0, json!(["hello world"])).unwrap();
    // c2 places its cursor at revision 1 on "world", then c1 prepends at revision 2.
    let (_, effects) = call(
        &host,
        "c2",
        "cursor",
        "doc:a",
        json!({"doc": "a", "revision": 1, "anchor": 6, "head": 11}),
    )
    .unwrap();
    assert_eq!(
        effects,
        vec![Effect::BroadcastVolatile {
            room: "doc:a".into(),
            ty: "doc.cursor".into(),
            payload: json!({"doc": "a", "revision": 1, "connectionId": "c2", "identity": "guest-c2", "anchor": 6, "head": 11}),
            include_sender: false,
        }]
    );
    send_op(&host, "c1", "a", 1, json!(["¡", 11])).unwrap();
    // A cursor sent against revision 1 arrives after revision 2: the server moves it.
    let (_, effects) = call(
        &host,
        "c1",
        "cursor",
        "doc:a",
        json!({"doc": "a", "revision": 1, "anchor": 0, "head": 5}),
    )
    .unwrap();
    let Effect::BroadcastVolatile { payload, .. } = &effects[0] else {
        panic!("{effects:?}")
    };
    assert_eq!(
        (&payload["anchor"], &payload["head"]),
        (&json!(1), &json!(6))
    );
    assert_eq!(payload["revision"], 2);
    let ack = open(&host, "c3", "a");
    let cursors = ack["cursors"].as_array().unwrap();
    assert_eq!(cursors.len(), 2);
    assert_eq!(
        cursors[1],
        json!({"connectionId": "c2", "identity": "guest-c2", "anchor": 7, "head": 12})
    );
    assert_eq!(
        code(call(
            &host,
            "c1",
            "cursor",
            "doc:a",
            json!({"doc": "a", "anchor": 0, "head": 13})
        )),
        "bad_cursor"
    );
}

/// A small deterministic generator (xorshift), so a failing seed can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const ALPHABET: [&str; 8] = ["a", "é", "中", "🙂", "e\u{301}", " ", "\n", "ß"];

/// What travels from the server to one client, in order.
enum Down {
    Ack(u64),
    Applied(u64, Operation),
}

/// Several clients edit one document through the plugin; every message between a client and
/// the server is delayed at random (each direction of each connection stays in order, as a
/// WebSocket does). When everything has been delivered, every client has the server's text.
#[test]
fn simulated_clients_with_random_delays_converge() {
    for seed in 1..=25u64 {
        let host = MockHost::new()
            .with_config("snapshot_every", "7")
            .with_config("history", "400");
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d));
        let n = 2 + (seed as usize % 3);
        let conns: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
        let mut clients: Vec<Client> = conns
            .iter()
            .map(|c| {
                let ack = open(&host, c, "sim");
                Client::new(
                    ack["text"].as_str().unwrap(),
                    ack["revision"].as_u64().unwrap(),
                )
            })
            .collect();
        let mut up: Vec<VecDeque<(u64, Operation)>> = vec![VecDeque::new(); n];
        let mut down: Vec<VecDeque<Down>> = (0..n).map(|_| VecDeque::new()).collect();
        let mut edits = 0;
        loop {
            let quiet = up.iter().all(VecDeque::is_empty) && down.iter().all(VecDeque::is_empty);
            if edits >= 60 && quiet {
                break;
            }
            let who = rng.below(n);
            match rng.below(3) {
                0 if edits < 60 => {
                    edits += 1;
                    let c = &mut clients[who];
                    let len = c.text().chars().count();
                    let at = rng.below(len + 1);
                    let del = rng.below(3).min(len - at);
                    let ins: String = (0..rng.below(3)).map(|_| ALPHABET[rng.below(8)]).collect();
                    let mut op = Operation::new();
                    op.retain(at)
                        .insert(&ins)
                        .delete(del)
                        .retain(len - at - del);
                    if let Some(out) = c.apply_local(op).unwrap() {
                        up[who].push_back((out.revision, out.op));
                    }
                }
                1 => {
                    let Some((revision, op)) = up[who].pop_front() else {
                        continue;
                    };
                    let (ack, effects) =
                        send_op(&host, &conns[who], "sim", revision, json!(op)).unwrap();
                    let applied = ack["revision"].as_u64().unwrap();
                    for effect in effects {
                        let Effect::Broadcast { payload, .. } = effect else {
                            panic!("unexpected {effect:?}")
                        };
                        let op: Operation = serde_json::from_value(payload["op"].clone()).unwrap();
                        for (i, q) in down.iter_mut().enumerate() {
                            if i != who {
                                q.push_back(Down::Applied(applied, op.clone()));
                            }
                        }
                    }
                    down[who].push_back(Down::Ack(applied));
                }
                _ => match down[who].pop_front() {
                    Some(Down::Ack(revision)) => {
                        if let Some(out) = clients[who].server_ack(revision).unwrap() {
                            up[who].push_back((out.revision, out.op));
                        }
                    }
                    Some(Down::Applied(revision, op)) => {
                        clients[who].apply_server(revision, &op).unwrap();
                    }
                    None => {}
                },
            }
        }
        let server = open(&host, "observer", "sim");
        for (i, c) in clients.iter().enumerate() {
            assert!(
                c.is_synchronized(),
                "seed {seed}: client {i} has pending edits"
            );
            assert_eq!(
                c.text(),
                server["text"].as_str().unwrap(),
                "seed {seed}: client {i} diverged"
            );
            assert_eq!(c.revision(), server["revision"].as_u64().unwrap());
        }
    }
}

/// The bytes stored for `doc`: meta, snapshot, kept operations, cursors (keys included).
fn stored_bytes(host: &MockHost, doc: &str) -> (usize, u64) {
    let meta: Value = serde_json::from_str(&host.kv_get(&format!("meta:{doc}")).unwrap()).unwrap();
    let (oldest, revision) = (
        meta["oldest"].as_u64().unwrap(),
        meta["revision"].as_u64().unwrap(),
    );
    let mut keys = vec![
        format!("meta:{doc}"),
        format!("snap:{doc}"),
        format!("cursors:{doc}"),
    ];
    keys.extend((oldest + 1..=revision).map(|n| format!("op:{n}:{doc}")));
    let bytes = keys
        .iter()
        .filter_map(|k| host.kv_get(k).map(|v| k.len() + v.len()))
        .sum();
    (bytes, revision - oldest)
}

/// With the default limits, what the store holds stays within the text at the last snapshot
/// plus the last `history` operations, however long the session. Prints the sizes measured
/// (`docs/benchmarks.md`): run with `-- --nocapture`.
#[test]
fn stored_state_is_bounded_by_the_snapshot_and_the_history() {
    let host = MockHost::new();
    open(&host, "c1", "size");
    let mut rng = Rng(0x5eed);
    let mut client = Client::new("", 0);
    let mut rows = Vec::new();
    for n in 1..=5_000u64 {
        // Typing: 1 to 4 characters at a cursor that mostly moves forward, a deletion now and then.
        let len = client.text().chars().count();
        let at = if len == 0 {
            0
        } else {
            len - rng.below(len.min(40) + 1)
        };
        let del = if rng.below(5) == 0 {
            rng.below(4).min(len - at)
        } else {
            0
        };
        let ins: String = (0..1 + rng.below(4))
            .map(|_| ALPHABET[rng.below(8)])
            .collect();
        let mut op = Operation::new();
        op.retain(at)
            .insert(&ins)
            .delete(del)
            .retain(len - at - del);
        let out = client.apply_local(op).unwrap().unwrap();
        let (ack, _) = send_op(&host, "c1", "size", out.revision, json!(out.op)).unwrap();
        client
            .server_ack(ack["revision"].as_u64().unwrap())
            .unwrap();
        if [100, 1_000, 5_000].contains(&n) {
            let (bytes, kept) = stored_bytes(&host, "size");
            rows.push((
                n,
                client.text().len(),
                client.text().chars().count(),
                bytes,
                kept,
            ));
        }
    }
    println!("operations | text bytes | text chars | stored bytes | operations kept");
    for (n, text_bytes, chars, bytes, kept) in &rows {
        println!("{n} | {text_bytes} | {chars} | {bytes} | {kept}");
        // Kept: the last `history` (1000) operations at most; stored: the snapshot (no longer
        // than the text plus what was deleted since), the kept operations (each under 64 bytes
        // here) and small records.
        assert!(*kept <= 1_000);
        assert!(
            *bytes <= 2 * text_bytes + *kept as usize * 64 + 512,
            "{bytes}"
        );
    }
    assert_eq!(open(&host, "c2", "size")["text"], client.text());
}
