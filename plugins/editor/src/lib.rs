//! The `editor` plugin: collaborative plain-text editing with operational transformation,
//! server-revision model (`docs/editor.md` is the protocol).
//!
//! | route | handler | does |
//! | --- | --- | --- |
//! | `doc.open` `{"doc"}` | `open` | joins the room `doc:<doc>`; the ack carries `doc`, `text`, `revision` and the members' `cursors` |
//! | `doc.op` `{"doc", "revision", "op"}` | `op` | transforms `op` against the operations applied since `revision`, applies and stores it; the ack carries the new `revision`; the room's other members get `doc.applied` `{"doc", "revision", "op", "author", "connectionId"}` |
//! | `doc.cursor` `{"doc", "anchor", "head", "revision"?}` | `cursor` | moves the sender's cursor (transformed to the current revision); the others get `doc.cursor` |
//!
//! Every message names the document's room, `doc:<doc>`, in its envelope: the manifest routes
//! these types with `serialize = "room"`, so the calls for one document run one at a time and
//! each reads the store as the previous one left it.
//!
//! Positions and lengths count Unicode scalar values (`plexus_ot`).
//!
//! State, in the plugin's key-value store, per document `<doc>`:
//! `meta:<doc>` (`{"revision", "len", "snapshot", "oldest"}`), `snap:<doc>` (`{"revision",
//! "text"}`: the text at revision `snapshot`), `op:<n>:<doc>` (the operation that made revision
//! `n`, for `oldest < n <= revision`), `cursors:<doc>` (the members' cursors). The current text
//! is the snapshot with the operations since applied; every `snapshot_every` operations the
//! current text becomes the snapshot, and operations older than the last `history` are deleted.

use std::collections::BTreeMap;

use plexus_ot::{OpError, Operation};
use plexus_plugin_sdk::{Ctx, HandlerResult, Message, PluginError, plugin};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

#[cfg(test)]
mod tests;

/// Error codes of this plugin (besides the SDK's `bad_payload`, `room_required`).
pub mod codes {
    /// The operation is malformed or does not span the document at its revision.
    pub const BAD_OP: &str = "bad_op";
    /// The revision is in the future.
    pub const BAD_REVISION: &str = "bad_revision";
    /// The revision is older than the kept history: open the document again.
    pub const RESYNC_REQUIRED: &str = "resync_required";
    /// The envelope's room is not the document's room `doc:<doc>`.
    pub const BAD_ROOM: &str = "bad_room";
    /// The operation inserts more than `max_op_chars` characters.
    pub const OP_TOO_LARGE: &str = "op_too_large";
    /// The document would exceed `max_doc_chars` characters.
    pub const DOC_TOO_LARGE: &str = "doc_too_large";
    /// A cursor position beyond the document.
    pub const BAD_CURSOR: &str = "bad_cursor";
}

/// The limits of the manifest's `[config]`, with their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `max_doc_chars`: the longest document.
    pub max_doc_chars: usize,
    /// `max_op_chars`: the most characters one operation inserts.
    pub max_op_chars: usize,
    /// `history`: operations kept for transforming late operations and cursors.
    pub history: u64,
    /// `snapshot_every`: operations between two snapshots.
    pub snapshot_every: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_doc_chars: 1_000_000,
            max_op_chars: 65_536,
            history: 1000,
            snapshot_every: 100,
        }
    }
}

impl Limits {
    fn read(ctx: &Ctx) -> Result<Limits, PluginError> {
        let d = Limits::default();
        let limits = Limits {
            max_doc_chars: ctx
                .config_parse("max_doc_chars")?
                .unwrap_or(d.max_doc_chars),
            max_op_chars: ctx.config_parse("max_op_chars")?.unwrap_or(d.max_op_chars),
            history: ctx.config_parse("history")?.unwrap_or(d.history),
            snapshot_every: ctx
                .config_parse("snapshot_every")?
                .unwrap_or(d.snapshot_every),
        };
        if limits.snapshot_every == 0 || limits.history < limits.snapshot_every {
            return Err(PluginError::new(
                plexus_plugin_sdk::codes::BAD_CONFIG,
                "config needs 1 <= snapshot_every <= history",
            ));
        }
        Ok(limits)
    }
}

/// The longest document name, in bytes (its room `doc:<doc>` must fit the host's 256).
const MAX_DOC_NAME: usize = 200;

/// The small record read on every call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Meta {
    /// The current revision: the number of operations applied.
    revision: u64,
    /// The current length, in characters.
    len: usize,
    /// The revision of the stored snapshot.
    snapshot: u64,
    /// Operations `oldest + 1 ..= revision` are stored.
    oldest: u64,
}

#[derive(Serialize, Deserialize)]
struct Snapshot {
    revision: u64,
    text: String,
}

/// A member's cursor as stored: positions at `revision`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Cursor {
    identity: String,
    revision: u64,
    anchor: usize,
    head: usize,
}

fn meta_key(doc: &str) -> String {
    format!("meta:{doc}")
}

fn snap_key(doc: &str) -> String {
    format!("snap:{doc}")
}

fn op_key(revision: u64, doc: &str) -> String {
    format!("op:{revision}:{doc}")
}

fn cursors_key(doc: &str) -> String {
    format!("cursors:{doc}")
}

/// The room of a document.
pub fn room_of(doc: &str) -> String {
    format!("doc:{doc}")
}

fn err(code: &str, message: impl Into<String>) -> PluginError {
    PluginError::new(code, message)
}

/// Checks the document name and that the envelope names its room.
fn check_doc<'m, T>(msg: &'m Message<T>, doc: &str) -> Result<&'m str, PluginError> {
    if doc.is_empty() || doc.len() > MAX_DOC_NAME {
        return Err(PluginError::bad_payload(format!(
            "`doc` must be 1 to {MAX_DOC_NAME} bytes"
        )));
    }
    let room = msg.require_room()?;
    if room.strip_prefix("doc:") != Some(doc) {
        return Err(err(
            codes::BAD_ROOM,
            format!("messages about document `{doc}` name the room `doc:{doc}`, not `{room}`"),
        ));
    }
    Ok(room)
}

fn load_meta(ctx: &Ctx, doc: &str) -> Result<Meta, PluginError> {
    Ok(ctx.kv_get_json(&meta_key(doc))?.unwrap_or_default())
}

/// The stored operations `from + 1 ..= to`.
/// The operations applied to `doc` since `revision`, which must exist and still be in the
/// kept history (`bad_revision`, `resync_required`).
fn ops_since(ctx: &Ctx, doc: &str, meta: &Meta, revision: u64) -> Result<Vec<Operation>, PluginError> {
    if revision > meta.revision {
        return Err(err(
            codes::BAD_REVISION,
            format!(
                "revision {revision} of `{doc}` does not exist yet (the current one is {})",
                meta.revision
            ),
        ));
    }
    if revision < meta.oldest {
        return Err(err(
            codes::RESYNC_REQUIRED,
            format!(
                "revision {revision} of `{doc}` is older than the kept history (from {}); open the document again",
                meta.oldest
            ),
        ));
    }
    load_ops(ctx, doc, revision, meta.revision)
}

fn load_ops(ctx: &Ctx, doc: &str, from: u64, to: u64) -> Result<Vec<Operation>, PluginError> {
    (from + 1..=to)
        .map(|n| {
            ctx.kv_get_json(&op_key(n, doc))?.ok_or_else(|| {
                PluginError::internal(format!("operation {n} of `{doc}` is missing"))
            })
        })
        .collect()
}

/// The current text: the snapshot with `since_snapshot` (the operations after it) applied,
/// composed into one operation first so the text is copied once.
fn current_text(
    ctx: &Ctx,
    doc: &str,
    meta: &Meta,
    since_snapshot: &[Operation],
) -> Result<String, PluginError> {
    let corrupt = |e: OpError| PluginError::internal(format!("stored state of `{doc}`: {e}"));
    let text = match ctx.kv_get_json::<Snapshot>(&snap_key(doc))? {
        Some(snap) if snap.revision == meta.snapshot => snap.text,
        None if meta.snapshot == 0 => String::new(),
        _ => {
            return Err(PluginError::internal(format!(
                "snapshot of `{doc}` is missing"
            )));
        }
    };
    let Some((first, rest)) = since_snapshot.split_first() else {
        return Ok(text);
    };
    let mut all = first.clone();
    for op in rest {
        all = all.compose(op).map_err(corrupt)?;
    }
    all.apply(&text).map_err(corrupt)
}

/// The answer to `doc.op` and `doc.open` gets `"variant": "marked"` in the `marked` build.
fn mark(mut ack: Value) -> Value {
    if cfg!(feature = "marked") {
        ack["variant"] = json!("marked");
    }
    ack
}

/// Sends a cursor to the room's other members as a volatile frame: a member too slow to keep
/// up does without it (the next cursor supersedes it).
fn send_cursor(ctx: &Ctx, room: &str, payload: &Value) -> Result<(), PluginError> {
    ctx.broadcast_volatile(room, "doc.cursor", payload, false)
}

#[derive(Deserialize)]
struct OpenPayload {
    doc: String,
}

fn open(ctx: &Ctx, msg: Message<OpenPayload>) -> HandlerResult {
    let doc = msg.payload.doc.as_str();
    let room = check_doc(&msg, doc)?;
    let meta = load_meta(ctx, doc)?;
    let since_snapshot = load_ops(ctx, doc, meta.snapshot, meta.revision)?;
    let text = current_text(ctx, doc, &meta, &since_snapshot)?;
    let cursors = live_cursors(ctx, doc, room, &meta)?;
    ctx.join(room)?;
    let cursors: Vec<Value> = cursors
        .iter()
        .filter(|(id, _)| id.as_str() != msg.connection_id())
        .map(|(id, c)| {
            json!({"connectionId": id, "identity": c.identity, "anchor": c.anchor, "head": c.head})
        })
        .collect();
    Ok(Some(mark(json!({
        "doc": doc,
        "text": text,
        "revision": meta.revision,
        "cursors": cursors,
    }))))
}

/// The stored cursors of the room's current members, moved to the current revision (a cursor
/// older than the history is dropped). Rewrites the store when members left.
fn live_cursors(
    ctx: &Ctx,
    doc: &str,
    room: &str,
    meta: &Meta,
) -> Result<BTreeMap<String, Cursor>, PluginError> {
    let key = cursors_key(doc);
    let stored: BTreeMap<String, Cursor> = ctx.kv_get_json(&key)?.unwrap_or_default();
    if stored.is_empty() {
        return Ok(stored);
    }
    let members = ctx.members(room)?;
    let count = stored.len();
    let live: BTreeMap<String, Cursor> = stored
        .into_iter()
        .filter(|(id, _)| members.iter().any(|m| &m.connection_id == id))
        .collect();
    if live.len() != count {
        ctx.kv_set_json(&key, &live)?;
    }
    let from = live
        .values()
        .map(|c| c.revision)
        .min()
        .unwrap_or(meta.revision)
        .max(meta.oldest);
    let ops = load_ops(ctx, doc, from, meta.revision)?;
    Ok(live
        .into_iter()
        .filter_map(|(id, mut c)| {
            let since = c.revision.checked_sub(from)? as usize;
            for op in ops.get(since..)? {
                c.anchor = op.transform_index(c.anchor);
                c.head = op.transform_index(c.head);
            }
            c.revision = meta.revision;
            Some((id, c))
        })
        .collect())
}

#[derive(Deserialize)]
struct OpPayload {
    doc: String,
    revision: u64,
    op: Value,
}

fn op(ctx: &Ctx, msg: Message<OpPayload>) -> HandlerResult {
    let doc = msg.payload.doc.as_str();
    let room = check_doc(&msg, doc)?;
    let limits = Limits::read(ctx)?;
    let incoming: Operation = Operation::deserialize(&msg.payload.op)
        .map_err(|e| err(codes::BAD_OP, format!("`op` is not an operation: {e}")))?;
    let inserted = incoming.inserted_len();
    if inserted > limits.max_op_chars {
        return Err(err(
            codes::OP_TOO_LARGE,
            format!(
                "the operation inserts {inserted} characters, more than the limit of {}",
                limits.max_op_chars
            ),
        ));
    }
    let mut meta = load_meta(ctx, doc)?;
    let revision = msg.payload.revision;
    let concurrent = ops_since(ctx, doc, &meta, revision)?;

    let base_len = concurrent.first().map_or(meta.len, Operation::base_len);
    if incoming.base_len() != base_len {
        return Err(err(
            codes::BAD_OP,
            format!(
                "the operation spans {} characters but `{doc}` has {base_len} at revision {revision}",
                incoming.base_len()
            ),
        ));
    }
    let mut transformed = incoming;
    for past in &concurrent {
        transformed = Operation::transform(&transformed, past)
            .map_err(|e| PluginError::internal(format!("stored history of `{doc}`: {e}")))?
            .0;
    }
    let new_len = transformed.target_len();
    if new_len > limits.max_doc_chars {
        return Err(err(
            codes::DOC_TOO_LARGE,
            format!(
                "the document would have {new_len} characters, more than the limit of {}",
                limits.max_doc_chars
            ),
        ));
    }

    let applied = meta.revision + 1;
    ctx.kv_set_json(&op_key(applied, doc), &transformed)?;
    if applied - meta.snapshot >= limits.snapshot_every {
        // Compaction: the snapshot moves to this revision.
        let since_snapshot = load_ops(ctx, doc, meta.snapshot, meta.revision)?;
        let text = current_text(ctx, doc, &meta, &since_snapshot)?;
        let text = transformed
            .apply(&text)
            .map_err(|e| PluginError::internal(format!("stored state of `{doc}`: {e}")))?;
        ctx.kv_set_json(
            &snap_key(doc),
            &Snapshot {
                revision: applied,
                text,
            },
        )?;
        meta.snapshot = applied;
    }
    // Keep the last `history` operations, and every operation since the snapshot.
    let oldest = meta
        .oldest
        .max(meta.snapshot.min(applied.saturating_sub(limits.history)));
    for n in meta.oldest + 1..=oldest {
        ctx.kv_delete(&op_key(n, doc));
    }
    meta.oldest = oldest;
    meta.revision = applied;
    meta.len = new_len;
    ctx.kv_set_json(&meta_key(doc), &meta)?;

    ctx.broadcast_others(
        room,
        "doc.applied",
        &json!({
            "doc": doc,
            "revision": applied,
            "op": transformed,
            "author": msg.sender(),
            "connectionId": msg.connection_id(),
        }),
    )?;
    Ok(Some(mark(json!({ "revision": applied }))))
}

#[derive(Deserialize)]
struct CursorPayload {
    doc: String,
    revision: Option<u64>,
    anchor: usize,
    head: usize,
}

fn cursor(ctx: &Ctx, msg: Message<CursorPayload>) -> HandlerResult {
    let p = &msg.payload;
    let doc = p.doc.as_str();
    let room = check_doc(&msg, doc)?;
    let meta = load_meta(ctx, doc)?;
    let revision = p.revision.unwrap_or(meta.revision);
    let ops = ops_since(ctx, doc, &meta, revision)?;
    let len = ops.first().map_or(meta.len, Operation::base_len);
    if p.anchor > len || p.head > len {
        return Err(err(
            codes::BAD_CURSOR,
            format!("`{doc}` has {len} characters at revision {revision}"),
        ));
    }
    let (mut anchor, mut head) = (p.anchor, p.head);
    for op in &ops {
        anchor = op.transform_index(anchor);
        head = op.transform_index(head);
    }

    let key = cursors_key(doc);
    let mut cursors: BTreeMap<String, Cursor> = ctx.kv_get_json(&key)?.unwrap_or_default();
    let members = ctx.members(room)?;
    cursors.retain(|id, _| members.iter().any(|m| &m.connection_id == id));
    cursors.insert(
        msg.connection_id().to_owned(),
        Cursor {
            identity: msg.sender().to_owned(),
            revision: meta.revision,
            anchor,
            head,
        },
    );
    ctx.kv_set_json(&key, &cursors)?;
    send_cursor(
        ctx,
        room,
        &json!({
            "doc": doc,
            "revision": meta.revision,
            "connectionId": msg.connection_id(),
            "identity": msg.sender(),
            "anchor": anchor,
            "head": head,
        }),
    )?;
    Ok(None)
}

plugin! {
    "open" => open,
    "op" => op,
    "cursor" => cursor,
}
