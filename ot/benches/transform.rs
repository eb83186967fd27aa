//! The cost of transforming one incoming operation against 100 concurrent operations (the
//! server's work for a client 100 revisions behind), and of composing and applying them.
//!
//! Run: `cargo bench -p plexus-ot --bench transform`

use criterion::{Criterion, criterion_group, criterion_main};
use plexus_ot::Operation;

/// A 10,000-character document and 100 single-word edits of it, each made at the revision
/// before it, spread over the document, plus one incoming edit made at the first revision.
fn history() -> (String, Vec<Operation>, Operation) {
    let mut doc: String = "lorem ipsum dolor sit amet, 中文字 🙂 ".repeat(300);
    doc.truncate(doc.char_indices().nth(10_000).map_or(doc.len(), |(i, _)| i));
    let base = doc.clone();
    let mut ops = Vec::new();
    let mut state = 0x2545_f491_u64;
    for _ in 0..100 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let len = doc.chars().count();
        let at = (state as usize) % len;
        let del = (state as usize >> 20) % 4;
        let del = del.min(len - at);
        let mut op = Operation::new();
        op.retain(at)
            .insert("word ")
            .delete(del)
            .retain(len - at - del);
        doc = op.apply(&doc).unwrap();
        ops.push(op);
    }
    let len = base.chars().count();
    let mut incoming = Operation::new();
    incoming
        .retain(len / 2)
        .insert("incoming")
        .retain(len - len / 2);
    (base, ops, incoming)
}

fn bench(c: &mut Criterion) {
    let (base, ops, incoming) = history();
    c.bench_function("transform one op against 100 concurrent ops", |b| {
        b.iter(|| {
            let mut op = incoming.clone();
            for past in &ops {
                op = Operation::transform(&op, past).unwrap().0;
            }
            op
        })
    });
    c.bench_function("compose 100 ops", |b| {
        b.iter(|| {
            let mut all = ops[0].clone();
            for op in &ops[1..] {
                all = all.compose(op).unwrap();
            }
            all
        })
    });
    c.bench_function("apply 100 ops one by one to 10,000 chars", |b| {
        b.iter(|| {
            let mut doc = base.clone();
            for op in &ops {
                doc = op.apply(&doc).unwrap();
            }
            doc
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
