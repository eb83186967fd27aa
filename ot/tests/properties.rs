//! Property tests of the OT core on random documents and random concurrent operations,
//! multi-byte text included (emoji, combining marks, CJK): transform satisfies TP1, compose
//! agrees with sequential application, invert undoes, the wire form round-trips, and the
//! client state machine converges with a server.

use plexus_ot::{Client, Operation};
use proptest::prelude::*;

/// Characters drawn from ASCII, two-byte Latin, combining marks, CJK, and emoji outside the
/// Basic Multilingual Plane (two UTF-16 units each).
fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec![
            'a', 'b', ' ', '\n', 'é', 'ß', '\u{301}', '\u{308}', '中', '文', '字', '🙂', '👍', '🇫',
            '\u{200d}',
        ]),
        0..24,
    )
    .prop_map(|chars| chars.into_iter().collect())
}

/// A random operation over a document of `len` characters.
fn op_over(len: usize) -> impl Strategy<Value = Operation> {
    prop::collection::vec((0u8..3, 1usize..6, text()), 0..8).prop_map(move |steps| {
        let mut op = Operation::new();
        let mut left = len;
        for (kind, n, s) in steps {
            match kind {
                0 => {
                    let n = n.min(left);
                    op.retain(n);
                    left -= n;
                }
                1 => {
                    op.insert(&s);
                }
                _ => {
                    let n = n.min(left);
                    op.delete(n);
                    left -= n;
                }
            }
        }
        op.retain(left);
        op
    })
}

fn doc_and_op() -> impl Strategy<Value = (String, Operation)> {
    text().prop_flat_map(|doc| {
        let len = doc.chars().count();
        (Just(doc), op_over(len))
    })
}

fn doc_and_two_ops() -> impl Strategy<Value = (String, Operation, Operation)> {
    text().prop_flat_map(|doc| {
        let len = doc.chars().count();
        (Just(doc), op_over(len), op_over(len))
    })
}

/// A document, an operation on it and one on its result.
fn doc_and_sequence() -> impl Strategy<Value = (String, Operation, Operation)> {
    doc_and_op().prop_flat_map(|(doc, a)| {
        let len = a.target_len();
        (Just(doc), Just(a), op_over(len))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn apply_respects_the_lengths((doc, a) in doc_and_op()) {
        let out = a.apply(&doc).unwrap();
        prop_assert_eq!(out.chars().count(), a.target_len());
        prop_assert_eq!(doc.chars().count(), a.base_len());
    }

    #[test]
    fn transform_satisfies_tp1((doc, a, b) in doc_and_two_ops()) {
        let (a2, b2) = Operation::transform(&a, &b).unwrap();
        let left = b2.apply(&a.apply(&doc).unwrap()).unwrap();
        let right = a2.apply(&b.apply(&doc).unwrap()).unwrap();
        prop_assert_eq!(left, right);
    }

    #[test]
    fn compose_agrees_with_sequential_application((doc, a, b) in doc_and_sequence()) {
        let ab = a.compose(&b).unwrap();
        prop_assert_eq!(ab.apply(&doc).unwrap(), b.apply(&a.apply(&doc).unwrap()).unwrap());
    }

    #[test]
    fn invert_undoes((doc, a) in doc_and_op()) {
        let inverse = a.invert(&doc).unwrap();
        prop_assert_eq!(inverse.apply(&a.apply(&doc).unwrap()).unwrap(), doc);
    }

    #[test]
    fn the_wire_form_round_trips((_doc, a) in doc_and_op()) {
        let json = serde_json::to_string(&a).unwrap();
        let back: Operation = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(back, a);
    }

    #[test]
    fn an_operation_spanning_another_length_is_refused((doc, a) in doc_and_op(), extra in 1usize..3) {
        let mut other = Operation::new();
        other.retain(doc.chars().count() + extra);
        prop_assert!(other.apply(&doc).is_err());
        prop_assert!(Operation::transform(&a, &other).is_err());
    }

    /// Two clients edit concurrently through a server that transforms incoming operations
    /// against the history since their revision; all three end with the same text.
    #[test]
    fn two_clients_and_a_server_converge(
        doc in text(),
        edits in prop::collection::vec((any::<bool>(), any::<prop::sample::Index>(), text(), 0usize..3), 1..12),
        deliveries in prop::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut sim = Sim::new(doc);
        let mut deliveries = deliveries.into_iter();
        let mut edits = edits.into_iter();
        loop {
            let step = deliveries.next();
            match step.map(|s| s % 5) {
                // A local edit.
                Some(0) | None if edits.len() > 0 => {
                    let (who, at, s, del) = edits.next().unwrap();
                    let who = usize::from(who);
                    let c = &mut sim.clients[who];
                    let len = c.text().chars().count();
                    let at = at.index(len + 1);
                    let del = del.min(len - at);
                    let mut op = Operation::new();
                    op.retain(at).insert(&s).delete(del).retain(len - at - del);
                    if let Some(out) = c.apply_local(op).unwrap() {
                        sim.to_server[who].push((out.revision, out.op));
                    }
                }
                // The server takes the oldest op of client k.
                Some(k @ (1 | 2)) | Some(k @ (3 | 4)) if !sim.to_server[usize::from(k % 2 == 0)].is_empty() => {
                    sim.server_takes(usize::from(k % 2 == 0));
                }
                // A client reads its next frame.
                Some(k) if !sim.to_client[usize::from(k % 2 == 0)].is_empty() => {
                    sim.client_reads(usize::from(k % 2 == 0));
                }
                Some(_) => {}
                None => {
                    // Drain everything: server first, then clients, until quiet.
                    let busy = sim.to_server.iter().any(|q| !q.is_empty()) || sim.to_client.iter().any(|q| !q.is_empty());
                    if !busy {
                        break;
                    }
                    for who in 0..2 {
                        if !sim.to_server[who].is_empty() {
                            sim.server_takes(who);
                        }
                        while !sim.to_client[who].is_empty() {
                            sim.client_reads(who);
                        }
                    }
                }
            }
        }
        let Sim { clients, server_text, .. } = sim;
        prop_assert!(clients.iter().all(Client::is_synchronized));
        prop_assert_eq!(clients[0].text(), server_text.as_str());
        prop_assert_eq!(clients[1].text(), server_text.as_str());
    }
}

/// A frame to a client: `Ok(revision)` is its ack, `Err((revision, op))` another's op.
type Frame = Result<u64, (u64, Operation)>;

/// Two clients and a server that transforms incoming operations against the history since
/// their revision; the queues hold what is in flight each way, in order.
struct Sim {
    server_text: String,
    history: Vec<Operation>,
    clients: [Client; 2],
    /// What each client sent: (revision, op).
    to_server: [Vec<(u64, Operation)>; 2],
    to_client: [Vec<Frame>; 2],
}

impl Sim {
    fn new(doc: String) -> Sim {
        Sim {
            server_text: doc.clone(),
            history: Vec::new(),
            clients: [Client::new(doc.clone(), 0), Client::new(doc, 0)],
            to_server: [Vec::new(), Vec::new()],
            to_client: [Vec::new(), Vec::new()],
        }
    }

    /// The server applies the oldest operation client `who` sent, acks it and sends it on.
    fn server_takes(&mut self, who: usize) {
        let (rev, mut op) = self.to_server[who].remove(0);
        for past in &self.history[rev as usize..] {
            op = Operation::transform(&op, past).unwrap().0;
        }
        self.server_text = op.apply(&self.server_text).unwrap();
        self.history.push(op.clone());
        let revision = self.history.len() as u64;
        self.to_client[who].push(Ok(revision));
        self.to_client[1 - who].push(Err((revision, op)));
    }

    /// Client `who` reads its next frame.
    fn client_reads(&mut self, who: usize) {
        match self.to_client[who].remove(0) {
            Ok(revision) => {
                if let Some(out) = self.clients[who].server_ack(revision).unwrap() {
                    self.to_server[who].push((out.revision, out.op));
                }
            }
            Err((revision, op)) => {
                self.clients[who].apply_server(revision, &op).unwrap();
            }
        }
    }
}

#[test]
fn concurrent_inserts_at_one_place_order_by_priority() {
    let doc = "中文";
    let mut a = Operation::new();
    a.retain(1).insert("🙂").retain(1);
    let mut b = Operation::new();
    b.retain(1).insert("e\u{301}").retain(1);
    let (a2, b2) = Operation::transform(&a, &b).unwrap();
    assert_eq!(b2.apply(&a.apply(doc).unwrap()).unwrap(), "中🙂e\u{301}文");
    assert_eq!(a2.apply(&b.apply(doc).unwrap()).unwrap(), "中🙂e\u{301}文");
}
