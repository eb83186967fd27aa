//! The editor plugin against a real host over real sockets: concurrent typers converge with the
//! server and a late joiner gets the text, a hot swap in the middle of concurrent editing loses
//! no edit, malformed operations are refused and change nothing, and `serialize = "room"`
//! applies concurrent operations on one document one at a time.
//!
//! The host serves `manifests/editor.toml` itself (its component path pointed at the build).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use plexus::ReloadEvent;
use plexus_ot::{Client as OtClient, Operation, Outgoing};
use serde_json::{Value, json};
use support::{
    Client, Host, TempDir, assert_error, editor_manifest, plugins_dir, repo_root, wasm, within,
};
use tokio::sync::mpsc;

/// The editor built with its `marked` feature (every ack carries `"variant": "marked"`), in a
/// target directory of its own, once per test process.
fn marked_editor() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        let plugins = plugins_dir(); // the ordinary build first: one cargo at a time
        let target = repo_root().join("plugins/target/marked");
        let output = Command::new("cargo")
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip2",
                "-p",
                "editor",
            ])
            .args(["--features", "marked", "--target-dir"])
            .arg(&target)
            .current_dir(repo_root().join("plugins"))
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .output()
            .expect("running cargo");
        assert!(
            output.status.success(),
            "building the marked editor failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let path = target.join("wasm32-wasip2/release/editor.wasm");
        assert!(path.is_file() && plugins.is_dir());
        path
    })
}

async fn editor_host() -> Host {
    Host::start(&[("editor.toml", editor_manifest(&wasm("editor")))]).await
}

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d))
    }

    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

const ALPHABET: [&str; 8] = ["a", "é", "中", "🙂", "e\u{301}", " ", "\n", "ß"];

/// One editing client: a WebSocket client and the OT state machine of its copy.
struct Editor {
    ws: Client,
    doc: String,
    ot: OtClient,
    /// The `messageId` of the operation in flight.
    inflight: Option<String>,
    acks: usize,
    marked_acks: usize,
    /// Acks are reported here, for a test that waits for progress.
    progress: Option<mpsc::UnboundedSender<()>>,
}

impl Editor {
    async fn open(host: &Host, doc: &str) -> Editor {
        let mut ws = host.client().await;
        let ack = ws
            .ack(json!({"type": "doc.open", "room": format!("doc:{doc}"), "payload": {"doc": doc}}))
            .await;
        let p = &ack["payload"];
        let ot = OtClient::new(p["text"].as_str().unwrap(), p["revision"].as_u64().unwrap());
        Editor {
            ws,
            doc: doc.to_owned(),
            ot,
            inflight: None,
            acks: 0,
            marked_acks: 0,
            progress: None,
        }
    }

    async fn send(&mut self, out: Outgoing) {
        let id = self.ws.next_id();
        self.ws
            .send(json!({
                "type": "doc.op",
                "messageId": id,
                "room": format!("doc:{}", self.doc),
                "payload": {"doc": self.doc, "revision": out.revision, "op": out.op},
            }))
            .await;
        self.inflight = Some(id);
    }

    async fn edit(&mut self, op: Operation) {
        if let Some(out) = self.ot.apply_local(op).unwrap() {
            self.send(out).await;
        }
    }

    /// Reads and handles one frame.
    async fn step(&mut self) {
        let frame = self.ws.recv().await;
        let p = &frame["payload"];
        match frame["type"].as_str().unwrap() {
            "sys.ack" => {
                assert_eq!(p["ref"].as_str(), self.inflight.as_deref(), "{frame}");
                self.inflight = None;
                self.acks += 1;
                if p["variant"] == "marked" {
                    self.marked_acks += 1;
                }
                if let Some(progress) = &self.progress {
                    let _ = progress.send(());
                }
                if let Some(out) = self.ot.server_ack(p["revision"].as_u64().unwrap()).unwrap() {
                    self.send(out).await;
                }
            }
            "doc.applied" => {
                assert_eq!(p["doc"], self.doc.as_str());
                let op: Operation = serde_json::from_value(p["op"].clone()).unwrap();
                self.ot
                    .apply_server(p["revision"].as_u64().unwrap(), &op)
                    .unwrap();
            }
            "doc.cursor" | "room.joined" | "room.left" | "presence.changed" => {}
            _ => panic!("unexpected frame {frame}"),
        }
    }

    /// Handles frames until every local edit is acknowledged.
    async fn settle(&mut self) {
        while !self.ot.is_synchronized() {
            self.step().await;
        }
    }

    /// Handles frames until the copy is at `revision`.
    async fn catch_up(&mut self, revision: u64) {
        while self.ot.revision() < revision {
            self.step().await;
        }
    }

    /// A random edit of the local text: insert up to 3 characters, delete up to 2.
    fn random_edit(&self, rng: &mut Rng) -> Operation {
        let len = self.ot.text().chars().count();
        let at = rng.below(len + 1);
        let del = rng.below(3).min(len - at);
        let ins: String = (0..1 + rng.below(3))
            .map(|_| ALPHABET[rng.below(8)])
            .collect();
        let mut op = Operation::new();
        op.retain(at)
            .insert(&ins)
            .delete(del)
            .retain(len - at - del);
        op
    }
}

/// The text and revision a fresh client gets from `doc.open`.
async fn snapshot(host: &Host, doc: &str) -> (String, u64) {
    let e = Editor::open(host, doc).await;
    (e.ot.text().to_owned(), e.ot.revision())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_typers_converge_and_a_late_joiner_gets_the_text() {
    let host = editor_host().await;
    let mut tasks = Vec::new();
    for who in 0..3u64 {
        let mut editor = Editor::open(&host, "notes").await;
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(who + 1);
            for _ in 0..60 {
                let op = editor.random_edit(&mut rng);
                editor.edit(op).await;
                // Type on while the operation is in flight; read one frame between keystrokes.
                if editor.inflight.is_some() {
                    editor.step().await;
                }
            }
            editor.settle().await;
            editor
        }));
    }
    let mut editors = Vec::new();
    for task in tasks {
        editors.push(within("a typer", task).await.unwrap());
    }
    // Every edit is acknowledged: the server has them all. A late joiner gets its text.
    let (text, revision) = snapshot(&host, "notes").await;
    assert!(revision >= 3, "revision {revision}");
    assert!(!text.is_empty());
    for (i, editor) in editors.iter_mut().enumerate() {
        editor.catch_up(revision).await;
        assert_eq!(editor.ot.text(), text, "typer {i} diverged from the server");
        assert!(editor.acks > 1);
    }
    assert!(host.server.hub().room_locks.is_empty());
}

/// Inserts a token at a random token boundary of the local text (tokens are `⟨who:n⟩`, so an
/// insert never splits another).
fn token_insert(text: &str, token: &str, rng: &mut Rng) -> Operation {
    let boundaries: Vec<usize> = std::iter::once(0)
        .chain(
            text.chars()
                .enumerate()
                .filter(|(_, c)| *c == '⟩')
                .map(|(i, _)| i + 1),
        )
        .collect();
    let at = boundaries[rng.below(boundaries.len())];
    let len = text.chars().count();
    let mut op = Operation::new();
    op.retain(at).insert(token).retain(len - at);
    op
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hot_swap_in_the_middle_of_concurrent_editing_loses_no_edit() {
    let marked = marked_editor();
    let dir = TempDir::new();
    std::fs::copy(wasm("editor"), dir.path().join("editor.wasm")).unwrap();
    // The typers keep typing until the new version answered them; on a loaded machine the swap
    // takes long, and a typer reading one frame per keystroke can fall more than the default
    // 1,000 kept operations behind (`resync_required`), which is not what this test is about.
    let manifest = editor_manifest(Path::new("editor.wasm"));
    assert!(
        manifest.contains("history = \"1000\""),
        "the editor's history setting moved"
    );
    dir.write(
        "editor.toml",
        manifest.replace("history = \"1000\"", "history = \"1000000\""),
    );
    let host = Host::start_in(dir, |_| {}).await;

    let (progress, mut acks) = mpsc::unbounded_channel();
    let mut tasks = Vec::new();
    for who in 0..3u64 {
        let mut editor = Editor::open(&host, "swap").await;
        editor.progress = Some(progress.clone());
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(who + 10);
            let mut typed = Vec::new();
            // Type until well past the swap: at least 40 tokens and two acks from the new version.
            while typed.len() < 40 || editor.marked_acks < 2 {
                assert!(typed.len() < 5_000, "the new version never answered");
                let token = format!("⟨{who}:{}⟩", typed.len());
                let op = token_insert(editor.ot.text(), &token, &mut rng);
                editor.edit(op).await;
                typed.push(token);
                if editor.inflight.is_some() {
                    editor.step().await;
                }
            }
            editor.settle().await;
            (editor, typed)
        }));
    }
    drop(progress);
    // Swap once the three typers have 30 acks between them, while they keep typing.
    for _ in 0..30 {
        within("acks before the swap", acks.recv()).await.unwrap();
    }
    host.dir
        .replace("editor.wasm", std::fs::read(marked).unwrap());
    let events = host.server.reload().await;
    assert!(
        matches!(&events[..], [ReloadEvent::Swapped { plugin, .. }] if plugin == "editor"),
        "{events:?}"
    );

    let mut results = Vec::new();
    for task in tasks {
        results.push(within("a typer", task).await.unwrap());
    }
    let (text, revision) = snapshot(&host, "swap").await;
    for (who, (editor, typed)) in results.iter_mut().enumerate() {
        editor.catch_up(revision).await;
        assert_eq!(
            editor.ot.text(),
            text,
            "typer {who} diverged from the server"
        );
        // The old version answered first, the new one last.
        assert!(editor.marked_acks >= 2 && editor.marked_acks < editor.acks);
        for token in typed.iter() {
            assert_eq!(
                text.matches(token.as_str()).count(),
                1,
                "{token} lost or doubled"
            );
        }
    }
    let tokens: usize = results.iter().map(|(_, typed)| typed.len()).sum();
    assert_eq!(text.matches('⟨').count(), tokens);
}

#[tokio::test]
async fn malformed_operations_are_refused_and_change_nothing() {
    let host = editor_host().await;
    let mut a = Editor::open(&host, "m").await;
    let mut b = Editor::open(&host, "m").await;
    let _ = a.ws.recv_type("room.joined").await;
    let mut op = Operation::new();
    op.insert("héllo 🙂");
    a.edit(op).await;
    a.settle().await;
    b.catch_up(1).await;

    let op_frame = |revision: Value, op: Value| json!({"type": "doc.op", "room": "doc:m", "payload": {"doc": "m", "revision": revision, "op": op}});
    for (revision, op, code) in [
        (json!(1), json!([6]), "bad_op"),        // short of the 7 characters
        (json!(1), json!([8]), "bad_op"),        // beyond them
        (json!(1), json!([7, ""]), "bad_op"),    // an empty insert
        (json!(1), json!([0, 7]), "bad_op"),     // a zero component
        (json!(1), json!([3.5, "x"]), "bad_op"), // not an integer
        (json!(1), json!("insert x"), "bad_op"), // not an array
        (json!(1), json!([7, {"i": "x"}]), "bad_op"),
        (json!(2), json!([7, "x"]), "bad_revision"), // a future revision
        (json!(0), json!([7, "x"]), "bad_op"),       // revision 0 was empty
        (json!(-1), json!([7, "x"]), "bad_payload"),
        (json!("1"), json!([7, "x"]), "bad_payload"),
    ] {
        let err =
            a.ws.expect_error(op_frame(revision, op.clone()), code)
                .await;
        assert!(
            !err["payload"]["message"].as_str().unwrap().is_empty(),
            "{err}"
        );
    }
    // The room must be the document's, and joined.
    a.ws.expect_error(
        json!({"type": "doc.op", "room": "doc:m", "payload": {"doc": "other", "revision": 1, "op": [7, "x"]}}),
        "bad_room",
    )
    .await;
    a.ws.expect_error(
        json!({"type": "doc.op", "room": "doc:other", "payload": {"doc": "other", "revision": 0, "op": ["x"]}}),
        "not_in_room",
    )
    .await;
    let mut outsider = host.client().await;
    outsider
        .expect_error(op_frame(json!(1), json!([7, "x"])), "not_in_room")
        .await;
    a.ws.expect_error(
        json!({"type": "doc.cursor", "room": "doc:m", "payload": {"doc": "m", "anchor": 8, "head": 0}}),
        "bad_cursor",
    )
    .await;

    // Nothing reached the other member, and the document is as it was.
    b.ws.sync().await;
    assert_eq!(snapshot(&host, "m").await, ("héllo 🙂".to_owned(), 1));
    // A good operation still applies at revision 2 (after the observer's comings and goings).
    let mut good = op_frame(json!(1), json!([7, "!"]));
    good["messageId"] = json!("good");
    let (before, ack) = a.ws.request(good).await;
    assert!(
        before
            .iter()
            .all(|f| ["room.joined", "room.left", "presence.changed"]
                .contains(&f["type"].as_str().unwrap_or_default())),
        "{before:?}"
    );
    assert_eq!(ack["payload"]["revision"], 2, "{ack}");
    let (_, err) = a
        .ws
        .request(json!({"type": "doc.op", "messageId": "no-doc", "room": "doc:m", "payload": [1]}))
        .await;
    assert_error(&err, "bad_payload", Some("no-doc"));
}

/// Many clients send operations against the same old revision at once, pipelined: with the
/// route serialized by room, each is transformed against all the others and gets its own
/// revision; none overwrites another.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_operations_on_one_document_each_get_their_own_revision() {
    const CLIENTS: usize = 6;
    const OPS: usize = 25;
    let host = editor_host().await;
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        clients.push(Editor::open(&host, "race").await.ws);
    }
    let mut tasks = Vec::new();
    for (who, mut ws) in clients.into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            for n in 0..OPS {
                ws.feed(json!({
                    "type": "doc.op", "messageId": format!("{who}-{n}"), "room": "doc:race",
                    "payload": {"doc": "race", "revision": 0, "op": [format!("{}", who % 10)]},
                }))
                .await;
            }
            ws.flush().await;
            // Every revision reaches every member once, in order: as its own ack or as
            // `doc.applied` (an ack queued after the next call's broadcast would break this).
            let mut revisions = Vec::new();
            let mut seen = 0;
            while revisions.len() < OPS {
                let frame = ws.recv().await;
                let revision = frame["payload"]["revision"].as_u64();
                match frame["type"].as_str().unwrap() {
                    "sys.ack" => revisions.push(revision.unwrap()),
                    "doc.applied" => {}
                    "sys.error" => panic!("{frame}"),
                    _ => continue,
                }
                assert_eq!(
                    revision,
                    Some(seen + 1),
                    "client {who} got {frame} after revision {seen}"
                );
                seen += 1;
            }
            revisions
        }));
    }
    let mut revisions = Vec::new();
    for task in tasks {
        revisions.extend(within("the acks", task).await.unwrap());
    }
    revisions.sort_unstable();
    let expected: Vec<u64> = (1..=(CLIENTS * OPS) as u64).collect();
    assert_eq!(revisions, expected, "revisions given twice or skipped");
    let (text, revision) = snapshot(&host, "race").await;
    assert_eq!(revision, (CLIENTS * OPS) as u64);
    assert_eq!(
        text.chars().count(),
        CLIENTS * OPS,
        "operations overwrote each other"
    );
}
