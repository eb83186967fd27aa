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
        let mut server_text = doc.clone();
        let mut history: Vec<Operation> = Vec::new();
        let mut clients = [Client::new(doc.clone(), 0), Client::new(doc, 0)];
        // What each client sent (revision, op), and what the server sent each client, in order.
        let mut to_server: [Vec<(u64, Operation)>; 2] = [Vec::new(), Vec::new()];
        // Frames to each client: Ok(revision) is its ack, Err((revision, op)) another's op.
        type Frame = Result<u64, (u64, Operation)>;
        let mut to_client: [Vec<Frame>; 2] = [Vec::new(), Vec::new()];
        let mut deliveries = deliveries.into_iter();
        let mut edits = edits.into_iter();
        loop {
            let step = deliveries.next();
            match step.map(|s| s % 5) {
                // A local edit.
                Some(0) | None if edits.len() > 0 => {
                    let (who, at, s, del) = edits.next().unwrap();
                    let c = &mut clients[usize::from(who)];
                    let len = c.text().chars().count();
                    let at = at.index(len + 1);
                    let del = del.min(len - at);
                    let mut op = Operation::new();
                    op.retain(at).insert(&s).delete(del).retain(len - at - del);
                    if let Some(out) = c.apply_local(op).unwrap() {
                        to_server[usize::from(who)].push((out.revision, out.op));
                    }
                }
                // The server takes the oldest op of client k.
                Some(k @ (1 | 2)) | Some(k @ (3 | 4)) if !to_server[usize::from(k % 2 == 0)].is_empty() => {
                    let who = usize::from(k % 2 == 0);
                    let (rev, mut op) = to_server[who].remove(0);
                    for past in &history[rev as usize..] {
                        op = Operation::transform(&op, past).unwrap().0;
                    }
                    server_text = op.apply(&server_text).unwrap();
                    history.push(op.clone());
                    let revision = history.len() as u64;
                    to_client[who].push(Ok(revision));
                    to_client[1 - who].push(Err((revision, op)));
                }
                // A client reads its next frame.
                Some(k) if !to_client[usize::from(k % 2 == 0)].is_empty() => {
                    let who = usize::from(k % 2 == 0);
                    match to_client[who].remove(0) {
                        Ok(revision) => {
                            if let Some(out) = clients[who].server_ack(revision).unwrap() {
                                to_server[who].push((out.revision, out.op));
                            }
                        }
                        Err((revision, op)) => {
                            clients[who].apply_server(revision, &op).unwrap();
                        }
                    }
                }
                Some(_) => {}
                None => {
                    // Drain everything: server first, then clients, until quiet.
                    let busy = to_server.iter().any(|q| !q.is_empty()) || to_client.iter().any(|q| !q.is_empty());
                    if !busy {
                        break;
                    }
                    for who in 0..2 {
                        if let Some((rev, mut op)) = (!to_server[who].is_empty()).then(|| to_server[who].remove(0)) {
                            for past in &history[rev as usize..] {
                                op = Operation::transform(&op, past).unwrap().0;
                            }
                            server_text = op.apply(&server_text).unwrap();
                            history.push(op.clone());
                            let revision = history.len() as u64;
                            to_client[who].push(Ok(revision));
                            to_client[1 - who].push(Err((revision, op)));
                        }
                        while !to_client[who].is_empty() {
                            match to_client[who].remove(0) {
                                Ok(revision) => {
                                    if let Some(out) = clients[who].server_ack(revision).unwrap() {
                                        to_server[who].push((out.revision, out.op));
                                    }
                                }
                                Err((revision, op)) => {
                                    clients[who].apply_server(revision, &op).unwrap();
                                }
                            }
                        }
                    }
                }
            }
        }
        prop_assert!(clients.iter().all(Client::is_synchronized));
        prop_assert_eq!(clients[0].text(), server_text.as_str());
        prop_assert_eq!(clients[1].text(), server_text.as_str());
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
