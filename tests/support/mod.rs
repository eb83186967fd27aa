//! Shared helpers of the integration tests: building the fixture plugins once per test
//! process, temporary manifest directories, in-process hosts on an ephemeral port, and a
//! WebSocket client that speaks the Plexus protocol.
//!
//! Nothing here sleeps to synchronize: every wait is for a frame, an event or a process exit,
//! under [`TIMEOUT`], a safety net that fails the test.

#![allow(dead_code)]

pub mod processes;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use plexus::{Config, ReloadEvent, Server, WatchMode};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::broadcast;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The safety net on every await of a test. Reaching it fails the test; it never paces it.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Awaits `fut`, failing the test with `what` if it does not finish within [`TIMEOUT`].
pub async fn within<F: Future>(what: &str, fut: F) -> F::Output {
    match tokio::time::timeout(TIMEOUT, fut).await {
        Ok(out) => out,
        Err(_) => panic!("timed out after {TIMEOUT:?} waiting for {what}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Paths and plugins
// ---------------------------------------------------------------------------------------------

/// Reads a spawned `plexus serve`'s first line of output, `plexus listening on ws://ADDR/ws`:
/// the address, or the line it printed instead.
pub async fn listening_addr(
    stdout: &mut tokio::io::BufReader<tokio::process::ChildStdout>,
) -> Result<SocketAddr, String> {
    use tokio::io::AsyncBufReadExt;
    let mut line = String::new();
    within("the listening line", stdout.read_line(&mut line))
        .await
        .expect("reading stdout");
    line.trim()
        .strip_prefix("plexus listening on ws://")
        .and_then(|rest| rest.strip_suffix("/ws"))
        .and_then(|addr| addr.parse().ok())
        .ok_or(line)
}

/// The repository root (the parent of `host/`).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host/ has a parent")
}

/// The `plexus` binary of this package.
pub fn plexus_bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_plexus"))
}

/// Builds the plugins workspace (`plugins/`) for `wasm32-wasip2` once per test process and
/// returns the directory holding the components.
pub fn plugins_dir() -> &'static Path {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let built = BUILT.get_or_init(|| {
        let plugins = repo_root().join("plugins");
        // Best effort: the target is usually installed already (rust-toolchain.toml lists it),
        // and an offline machine cannot add it anyway; the build below says what is missing.
        let _ = Command::new("rustup")
            .args(["target", "add", "wasm32-wasip2"])
            .current_dir(&plugins)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let output = Command::new("cargo")
            .args(["build", "--release", "--target", "wasm32-wasip2"])
            .current_dir(&plugins)
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .output()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "building the plugins failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(plugins.join("target/wasm32-wasip2/release"))
    });
    match built {
        Ok(dir) => dir,
        Err(e) => panic!("{e}"),
    }
}

/// The component of the plugin crate `crate_name` (`swap-a` → `swap_a.wasm`), built.
pub fn wasm(crate_name: &str) -> PathBuf {
    let path = plugins_dir().join(format!("{}.wasm", crate_name.replace('-', "_")));
    assert!(path.is_file(), "{} was not built", path.display());
    path
}

/// `s` as a TOML basic string.
pub fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A manifest serving the `echo` component: `echo` → `echo`, `echo.broadcast` → `broadcast`.
pub fn echo_manifest() -> String {
    format!(
        r#"manifest_version = 1

[plugin]
id = "echo"

[source]
wasm = {wasm}

[[route]]
type = "echo"
handler = "echo"

[[route]]
type = "echo.broadcast"
handler = "broadcast"

[capabilities]
host = ["messaging", "rooms", "kv", "logging", "config"]
rooms = ["*"]
"#,
        wasm = toml_str(&wasm("echo").display().to_string())
    )
}

/// The chat manifest, `manifests/chat.toml`, with an absolute component path and no build.
pub fn chat_manifest() -> String {
    let text = std::fs::read_to_string(repo_root().join("manifests/chat.toml"))
        .expect("reading manifests/chat.toml");
    let mut out = String::new();
    let mut in_build = false;
    for line in text.lines() {
        if line.starts_with('[') {
            in_build = line == "[source.build]";
        }
        if in_build {
            continue;
        }
        if line.starts_with("wasm = ") {
            out.push_str(&format!(
                "wasm = {}\n",
                toml_str(&wasm("chat").display().to_string())
            ));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// `manifests/editor.toml` with its component at `wasm`.
pub fn editor_manifest(wasm: &Path) -> String {
    let text = std::fs::read_to_string(repo_root().join("manifests/editor.toml"))
        .expect("reading manifests/editor.toml");
    let line = "wasm = \"../plugins/target/wasm32-wasip2/release/editor.wasm\"";
    assert!(
        text.contains(line),
        "manifests/editor.toml moved its component"
    );
    text.replace(
        line,
        &format!("wasm = {}", toml_str(&wasm.display().to_string())),
    )
}

/// A manifest serving the `faulty` fixture: `faulty.trap`, `faulty.unreachable`,
/// `faulty.spin` (50 ms limit), `faulty.bad-json` and `faulty.ok`.
pub fn faulty_manifest() -> String {
    format!(
        r#"manifest_version = 1

[plugin]
id = "faulty"

[source]
wasm = {wasm}

[[route]]
type = "faulty.trap"
handler = "trap"

[[route]]
type = "faulty.unreachable"
handler = "unreachable"

[[route]]
type = "faulty.spin"
handler = "spin"

[[route]]
type = "faulty.bad-json"
handler = "bad-json"

[[route]]
type = "faulty.ok"
handler = "ok"

[[route]]
type = "faulty.print"
handler = "print"

[[route]]
type = "faulty.forge-ref"
handler = "forge-ref"

[[route]]
type = "faulty.kv-huge"
handler = "kv-huge"

[[route]]
type = "faulty.hog"
handler = "hog"

[[route]]
type = "faulty.outside"
handler = "outside"

[capabilities]
host = ["messaging", "rooms", "kv", "logging", "config"]
rooms = ["*"]

[limits]
timeout_ms = 50
"#,
        wasm = toml_str(&wasm("faulty").display().to_string())
    )
}

/// A manifest of plugin `relay` serving the `relay` fixture (timers, requests, events) from
/// `wasm`, its frames naming `version`: `relay.later` → `later`, `relay.cancel` → `cancel`,
/// `relay.ask` → `ask` (which may name a room its sender is not in), `relay.join` → `join`,
/// `relay.conns` → `conns`, and `events` as (event, handler).
pub fn relay_manifest(wasm: &Path, version: &str, events: &[(&str, &str)]) -> String {
    let mut events_text = String::new();
    for (event, handler) in events {
        events_text.push_str(&format!(
            "\n[[event]]\non = \"{event}\"\nhandler = \"{handler}\"\n"
        ));
    }
    format!(
        r#"manifest_version = 1

[plugin]
id = "relay"

[source]
wasm = {wasm}

[[route]]
type = "relay.later"
handler = "later"

[[route]]
type = "relay.cancel"
handler = "cancel"

[[route]]
type = "relay.ask"
handler = "ask"
allow_outside_room = true

[[route]]
type = "relay.join"
handler = "join"

[[route]]
type = "relay.conns"
handler = "conns"

[[route]]
type = "relay.send"
handler = "send"
{events_text}
[capabilities]
host = ["messaging", "rooms", "kv", "config", "timers"]
rooms = ["*"]

[limits]
# `tally` waits on purpose; a slow machine must not time it out.
timeout_ms = 2000

[config]
version = {version}
"#,
        wasm = toml_str(&wasm.display().to_string()),
        version = toml_str(version),
    )
}

/// A manifest of plugin `answer` serving the hot-swap fixtures (`swap-a`, `swap-b`,
/// `swap-broken`) from `answer.wasm` next to it: `routes` and `events` as (type or event,
/// handler), the host interfaces `caps`, and the call time limit.
pub fn swap_manifest(
    routes: &[(&str, &str)],
    events: &[(&str, &str)],
    caps: &[&str],
    timeout_ms: u64,
) -> String {
    let mut text = String::from(
        "manifest_version = 1\n\n[plugin]\nid = \"answer\"\n\n[source]\nwasm = \"answer.wasm\"\n",
    );
    for (ty, handler) in routes {
        text.push_str(&format!(
            "\n[[route]]\ntype = \"{ty}\"\nhandler = \"{handler}\"\n"
        ));
    }
    for (event, handler) in events {
        text.push_str(&format!(
            "\n[[event]]\non = \"{event}\"\nhandler = \"{handler}\"\n"
        ));
    }
    let caps: Vec<String> = caps.iter().map(|c| format!("\"{c}\"")).collect();
    text.push_str(&format!(
        "\n[capabilities]\nhost = [{}]\nrooms = [\"*\"]\n\n[limits]\ntimeout_ms = {timeout_ms}\n",
        caps.join(", ")
    ));
    text
}

/// Sends one `ty` message numbered `n` to the hot-swap fixtures' `answer` handler: the version
/// that answered (its `answer` frame, then the ack), or the code of the `sys.error` it got.
pub async fn answer_or_error(c: &mut Client, ty: &str, n: u64) -> Result<String, String> {
    let id = c.next_id();
    let (before, last) = c
        .request(json!({"type": ty, "messageId": id, "payload": {"n": n}}))
        .await;
    if last["type"] == "sys.error" {
        assert!(before.is_empty(), "{before:?}");
        return Err(str_at(&last, "/payload/code").to_owned());
    }
    assert_eq!(last["type"], "sys.ack", "{last}");
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["type"], "answer", "{before:?}");
    assert_eq!(before[0]["payload"]["n"], n, "{before:?}");
    Ok(str_at(&before[0], "/payload/version").to_owned())
}

/// [`answer_or_error`], which must be answered: the version that answered.
pub async fn answer_version(c: &mut Client, ty: &str, n: u64) -> String {
    answer_or_error(c, ty, n)
        .await
        .unwrap_or_else(|code| panic!("message {n} failed: {code}"))
}

/// A host on a temp dir holding `answer.toml` (`manifest`) and `answer.wasm`, a copy of the
/// fixture `fixture` (`swap-a`, ...), after `tweak` adjusted the configuration.
pub async fn swap_host(fixture: &str, manifest: &str, tweak: impl FnOnce(&mut Config)) -> Host {
    let dir = TempDir::new();
    std::fs::copy(wasm(fixture), dir.path().join("answer.wasm")).expect("copying the fixture");
    dir.write("answer.toml", manifest);
    Host::start_in(dir, tweak).await
}

// ---------------------------------------------------------------------------------------------
// Tokens
// ---------------------------------------------------------------------------------------------

/// The HS256 secret of the tests' tokens (`KeySource::Hs256Secret(SECRET.to_vec())`).
pub const SECRET: &[u8] = b"a test secret of thirty-two bytes";

/// Now, in Unix seconds.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// The claims of a token for `sub` valid for an hour, with `extra` claims merged in (they may
/// replace `exp`).
pub fn claims(sub: &str, extra: Value) -> Value {
    let mut c = json!({ "sub": sub, "exp": now() + 3600, "iat": now() });
    if let (Some(c), Value::Object(extra)) = (c.as_object_mut(), extra) {
        c.extend(extra);
    }
    c
}

/// `claims` signed with HS256 and [`SECRET`].
pub fn hs256(claims: &Value) -> String {
    hs256_with(SECRET, claims)
}

/// `claims` signed with HS256 and `secret`.
pub fn hs256_with(secret: &[u8], claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .expect("signing")
}

// ---------------------------------------------------------------------------------------------
// Temporary directories
// ---------------------------------------------------------------------------------------------

/// A fresh directory under the system temp dir, removed on drop.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new() -> TempDir {
        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path = std::env::temp_dir().join(format!(
            "plexus-test-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).expect("creating a temp dir");
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `name` in the directory directly (not atomically).
    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let path = self.path.join(name);
        std::fs::write(&path, contents).expect("writing a temp file");
        path
    }

    /// Replaces `name` atomically: writes a temporary name, then renames it over `name`.
    pub fn replace(&self, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
        let tmp = self.path.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, contents).expect("writing a temp file");
        let path = self.path.join(name);
        std::fs::rename(&tmp, &path).expect("renaming over the target");
        path
    }

    pub fn remove(&self, name: &str) {
        std::fs::remove_file(self.path.join(name)).expect("removing a temp file");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

// ---------------------------------------------------------------------------------------------
// In-process hosts
// ---------------------------------------------------------------------------------------------

/// A host started in-process on `127.0.0.1:0` from manifests written into its own temp dir.
#[derive(Debug)]
pub struct Host {
    pub server: Server,
    pub dir: TempDir,
}

impl Host {
    /// Starts a host serving `manifests` (file name, text), without watching.
    pub async fn start(manifests: &[(&str, String)]) -> Host {
        Host::start_with(manifests, |_| {}).await
    }

    /// Starts a host serving `manifests`, after `tweak` adjusted the configuration.
    pub async fn start_with(manifests: &[(&str, String)], tweak: impl FnOnce(&mut Config)) -> Host {
        let dir = TempDir::new();
        for (name, text) in manifests {
            dir.write(name, text);
        }
        Host::start_in(dir, tweak).await
    }

    /// Starts a host on the manifests already in `dir`.
    pub async fn start_in(dir: TempDir, tweak: impl FnOnce(&mut Config)) -> Host {
        let mut config = Config::new(dir.path());
        config.listen = "127.0.0.1:0".parse().expect("an address");
        config.build = false;
        config.watch = WatchMode::Off;
        // Tests drive load as fast as they can; the tests of rate limits set their own.
        config.limits.rate = None;
        tweak(&mut config);
        let server = match within("the host to start", Server::start(config)).await {
            Ok(server) => server,
            Err(e) => panic!("the host did not start: {e}"),
        };
        Host { server, dir }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    pub async fn client(&self) -> Client {
        Client::connect(self.addr()).await
    }

    pub fn reloads(&self) -> broadcast::Receiver<ReloadEvent> {
        self.server.subscribe_reloads()
    }

    /// `GET /healthz`, parsed.
    pub async fn healthz(&self) -> Value {
        let resp = http_get(self.addr(), "/healthz").await;
        assert_eq!(resp.status, 200, "{}", resp.body);
        serde_json::from_str(&resp.body).expect("/healthz is JSON")
    }

    /// The version of plugin `id` that `/healthz` reports serving.
    pub async fn version_of(&self, id: &str) -> String {
        let health = self.healthz().await;
        health["plugins"][id]["version"]
            .as_str()
            .unwrap_or_else(|| panic!("no version of `{id}` in {health}"))
            .to_owned()
    }
}

/// The log lines of this test process, captured (installed once per process, the first time a
/// test asks). Lines of concurrent tests mix: look for what names your own files.
pub fn logs() -> &'static LogCapture {
    static CAPTURE: OnceLock<LogCapture> = OnceLock::new();
    CAPTURE.get_or_init(|| {
        let capture = LogCapture::default();
        let writer = capture.clone();
        tracing_subscriber::fmt()
            .with_env_filter("info,wasmtime=warn,cranelift=warn")
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .try_init()
            .expect("no other log subscriber in this test process");
        capture
    })
}

/// Log output collected in memory.
#[derive(Debug, Clone, Default)]
pub struct LogCapture(
    std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    /// Woken on every write, for [`LogCapture::wait_for`].
    std::sync::Arc<tokio::sync::Notify>,
);

impl LogCapture {
    /// Waits until a line containing every one of `needles` is logged; returns it.
    pub async fn wait_for(&self, needles: &[&str]) -> String {
        within(&format!("a log line with {needles:?}"), async {
            loop {
                let written = self.1.notified();
                tokio::pin!(written);
                written.as_mut().enable();
                let found = self
                    .lines_with(needles[0])
                    .into_iter()
                    .find(|l| needles.iter().all(|n| l.contains(n)));
                if let Some(line) = found {
                    return line;
                }
                written.await;
            }
        })
        .await
    }

    /// The lines logged so far that contain `needle`.
    pub fn lines_with(&self, needle: &str) -> Vec<String> {
        let bytes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        String::from_utf8_lossy(&bytes)
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_owned)
            .collect()
    }
}

impl std::io::Write for LogCapture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        self.1.notify_waiters();
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Waits for the first reload event `pick` accepts, skipping others.
pub async fn wait_reload<T>(
    rx: &mut broadcast::Receiver<ReloadEvent>,
    what: &str,
    mut pick: impl FnMut(&ReloadEvent) -> Option<T>,
) -> T {
    within(what, async {
        loop {
            match rx.recv().await {
                Ok(event) => {
                    if let Some(out) = pick(&event) {
                        return out;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => panic!("the reload channel closed"),
            }
        }
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// The client
// ---------------------------------------------------------------------------------------------

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A Plexus client over a real WebSocket.
///
/// Every frame it reads with a `seq` must carry the next one (1 first, then +1 with no gap):
/// every test checks the session's sequence as a side effect.
#[derive(Debug)]
pub struct Client {
    ws: Ws,
    /// The `sys.welcome` frame.
    pub welcome: Value,
    pub connection_id: String,
    pub identity: String,
    pub session_id: String,
    pub resume_token: String,
    /// The `seq` of the last frame read (0 before the first).
    pub last_seq: u64,
}

impl Client {
    /// Connects to `ws://addr/ws` and reads the welcome frame.
    pub async fn connect(addr: SocketAddr) -> Client {
        Client::connect_to(addr, "/ws").await
    }

    /// Connects as `identity` (a host with development identities on).
    pub async fn connect_as(addr: SocketAddr, identity: &str) -> Client {
        let client = Client::connect_to(addr, &format!("/ws?devIdentity={identity}")).await;
        assert_eq!(client.identity, identity);
        client
    }

    /// Connects to `ws://addr{path}` and reads the welcome frame.
    pub async fn connect_to(addr: SocketAddr, path: &str) -> Client {
        let url = format!("ws://{addr}{path}");
        let (ws, _) = within(
            "the WebSocket handshake",
            tokio_tungstenite::connect_async(url),
        )
        .await
        .expect("the WebSocket handshake");
        let mut client = Client {
            ws,
            welcome: Value::Null,
            connection_id: String::new(),
            identity: String::new(),
            session_id: String::new(),
            resume_token: String::new(),
            last_seq: 0,
        };
        let welcome = client.recv_type("sys.welcome").await;
        assert_eq!(welcome["seq"], 1, "the welcome is a session's first frame");
        client.connection_id = str_at(&welcome, "/payload/connectionId").to_owned();
        client.identity = str_at(&welcome, "/payload/identity").to_owned();
        client.session_id = str_at(&welcome, "/payload/sessionId").to_owned();
        client.resume_token = str_at(&welcome, "/payload/resumeToken").to_owned();
        client.welcome = welcome;
        client
    }

    /// Opens a new connection and resumes the session `of` had, as having processed every
    /// frame up to `last_seq`. Returns the new client (carrying that session), the frames
    /// before the answer, and the answer (`sys.ack`, or `sys.error` `resume_failed`: then the
    /// client is the fresh session it was welcomed with).
    pub async fn resume(
        addr: SocketAddr,
        session_id: &str,
        resume_token: &str,
        last_seq: u64,
    ) -> (Client, Vec<Value>, Value) {
        let mut client = Client::connect(addr).await;
        let fresh_seq = client.last_seq;
        let id = client.next_id();
        client
            .send(json!({
                "type": "sys.resume",
                "messageId": id,
                "payload": {
                    "sessionId": session_id,
                    "resumeToken": resume_token,
                    "lastSeq": last_seq,
                },
            }))
            .await;
        // A success continues the resumed session's sequence; a failure the fresh one's.
        client.last_seq = last_seq;
        let mut before = Vec::new();
        let answer = loop {
            let frame = client.recv_raw().await;
            if frame["type"] == "sys.error" && frame["payload"]["ref"] == id.as_str() {
                assert_eq!(frame["seq"], fresh_seq + 1, "{frame}");
                client.last_seq = fresh_seq + 1;
                break frame;
            }
            client.check_seq(&frame);
            if frame["type"] == "sys.ack" && frame["payload"]["ref"] == id.as_str() {
                client.connection_id = str_at(&frame, "/payload/connectionId").to_owned();
                client.identity = str_at(&frame, "/payload/identity").to_owned();
                client.session_id = session_id.to_owned();
                client.resume_token = resume_token.to_owned();
                break frame;
            }
            before.push(frame);
        };
        (client, before, answer)
    }

    /// A fresh client `messageId`, unique in the test process (a resumed session holds
    /// answers to the ids of the connections before).
    pub fn next_id(&mut self) -> String {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        format!("t-{}", NEXT.fetch_add(1, Ordering::Relaxed))
    }

    pub async fn send(&mut self, frame: Value) {
        self.send_message(Message::text(frame.to_string())).await;
    }

    pub async fn send_text(&mut self, text: impl Into<String>) {
        self.send_message(Message::text(text.into())).await;
    }

    pub async fn send_message(&mut self, message: Message) {
        within("sending a frame", self.ws.send(message))
            .await
            .expect("sending a frame");
    }

    /// Queues a frame without flushing (for pipelining); [`Client::flush`] sends the batch.
    pub async fn feed(&mut self, frame: Value) {
        within(
            "queueing a frame",
            self.ws.feed(Message::text(frame.to_string())),
        )
        .await
        .expect("queueing a frame");
    }

    pub async fn flush(&mut self) {
        within("flushing frames", self.ws.flush())
            .await
            .expect("flushing frames");
    }

    /// The next WebSocket message that is not a ping or pong, or `None` when the stream ended.
    pub async fn next_message(&mut self) -> Option<Message> {
        within("a WebSocket message", async {
            loop {
                match self.ws.next().await {
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Ok(message)) => return Some(message),
                    Some(Err(e)) => panic!("reading from the WebSocket failed: {e}"),
                    None => return None,
                }
            }
        })
        .await
    }

    /// The next frame, parsed, its `seq` checked. Fails the test on anything but a JSON text
    /// frame.
    pub async fn recv(&mut self) -> Value {
        let frame = self.recv_raw().await;
        self.check_seq(&frame);
        frame
    }

    /// Asserts that a frame with a `seq` carries the next one.
    fn check_seq(&mut self, frame: &Value) {
        if let Some(seq) = frame.get("seq") {
            assert_eq!(
                seq.as_u64(),
                Some(self.last_seq + 1),
                "a gap or repeat in the session's seq after {}: {frame}",
                self.last_seq
            );
            self.last_seq += 1;
        }
    }

    /// The next frame, parsed, its `seq` not checked.
    async fn recv_raw(&mut self) -> Value {
        match self.next_message().await {
            Some(Message::Text(text)) => serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("the host sent invalid JSON {text:?}: {e}")),
            other => panic!("expected a text frame, got {other:?}"),
        }
    }

    /// The next frame, which must be of type `ty` (nothing is skipped).
    pub async fn recv_type(&mut self, ty: &str) -> Value {
        let frame = self.recv().await;
        assert_eq!(frame["type"], ty, "expected a `{ty}` frame, got {frame}");
        frame
    }

    /// Reads until a frame of type `ty`; returns the frames skipped and that frame. Only for
    /// places where the order of frames legitimately interleaves.
    pub async fn recv_until_type(&mut self, ty: &str) -> (Vec<Value>, Value) {
        let mut skipped = Vec::new();
        loop {
            let frame = self.recv().await;
            if frame["type"] == ty {
                return (skipped, frame);
            }
            skipped.push(frame);
        }
    }

    /// Sends `frame`, which must carry a `messageId`, and reads up to its answer: returns the
    /// frames that came before it and the `sys.ack` or `sys.error` whose `ref` names it. Any
    /// other ack or error on the way fails the test.
    pub async fn request(&mut self, frame: Value) -> (Vec<Value>, Value) {
        let id = frame
            .get("messageId")
            .map(id_text)
            .expect("request() needs a frame with a messageId");
        self.send(frame).await;
        self.answer_to(&id).await
    }

    /// Reads up to the `sys.ack`/`sys.error` of `id` (see [`Client::request`]).
    pub async fn answer_to(&mut self, id: &str) -> (Vec<Value>, Value) {
        let mut before = Vec::new();
        loop {
            let frame = self.recv().await;
            if frame["type"] == "sys.ack" || frame["type"] == "sys.error" {
                assert_eq!(
                    frame["payload"]["ref"], id,
                    "expected the answer to `{id}`, got {frame} (after {before:?})"
                );
                return (before, frame);
            }
            before.push(frame);
        }
    }

    /// Sends `frame` with a fresh `messageId` and asserts it is acknowledged with nothing else
    /// before the ack. Returns the ack.
    pub async fn ack(&mut self, mut frame: Value) -> Value {
        let id = self.next_id();
        frame["messageId"] = json!(id);
        let (before, answer) = self.request(frame).await;
        assert!(
            before.is_empty(),
            "unexpected frames before the ack: {before:?}"
        );
        assert_eq!(answer["type"], "sys.ack", "{answer}");
        answer
    }

    /// Sends `frame` with a fresh `messageId` and asserts it fails with `code`, with nothing
    /// before the error. Returns the error.
    pub async fn expect_error(&mut self, mut frame: Value, code: &str) -> Value {
        let id = self.next_id();
        frame["messageId"] = json!(id);
        let (before, answer) = self.request(frame).await;
        assert!(
            before.is_empty(),
            "unexpected frames before the error: {before:?}"
        );
        assert_error(&answer, code, Some(&id));
        answer
    }

    /// An `echo` round trip through the echo plugin: the echo comes back, then its ack.
    pub async fn echo_round_trip(&mut self) {
        let id = self.next_id();
        let payload = json!({ "check": id });
        let (before, ack) = self
            .request(json!({ "type": "echo", "messageId": id, "payload": payload }))
            .await;
        assert_eq!(ack["type"], "sys.ack", "{ack}");
        assert_eq!(
            before.len(),
            1,
            "expected exactly the echo before the ack: {before:?}"
        );
        assert_eq!(before[0]["type"], "echo", "{}", before[0]);
        assert_eq!(before[0]["payload"], payload);
        assert_eq!(before[0]["sender"], self.identity.as_str());
    }

    /// A `sys.ping` round trip asserting that the next frames are exactly its pong and ack:
    /// proves nothing else was queued for this client before the ping.
    pub async fn sync(&mut self) {
        let id = self.next_id();
        let payload = json!({ "sync": id });
        self.send(json!({ "type": "sys.ping", "messageId": id, "payload": payload }))
            .await;
        let pong = self.recv().await;
        assert_eq!(
            pong["type"], "sys.pong",
            "expected nothing before the pong, got {pong}"
        );
        assert_eq!(pong["payload"], payload);
        let ack = self.recv().await;
        assert_eq!(ack["type"], "sys.ack", "expected the ping's ack, got {ack}");
        assert_eq!(ack["payload"]["ref"], id.as_str());
    }

    /// Reads until the host closes the connection; returns its close frame. Text frames
    /// before the close are returned too.
    pub async fn closed(&mut self) -> (Vec<Value>, Option<CloseFrame>) {
        let mut before = Vec::new();
        loop {
            match self.next_message().await {
                Some(Message::Close(frame)) => return (before, frame),
                Some(Message::Text(text)) => {
                    let frame: Value = serde_json::from_str(&text).expect("JSON text");
                    self.check_seq(&frame);
                    before.push(frame);
                }
                Some(other) => panic!("expected a close, got {other:?}"),
                None => panic!("the stream ended without a close frame"),
            }
        }
    }

    /// Closes the connection normally and waits for the host's answer.
    pub async fn close(mut self) {
        let _ = within("closing", self.ws.close(None)).await;
        while let Ok(Some(Ok(_))) = tokio::time::timeout(TIMEOUT, self.ws.next()).await {}
    }

    /// Drops the TCP connection without a close handshake.
    pub fn drop_connection(self) {
        drop(self.ws);
    }

    /// Answers nothing any more, pings included, until the returned socket is read again.
    pub fn stop_reading(self) -> Ws {
        self.ws
    }
}

/// The text of a `messageId` (strings as they are, numbers as text).
pub fn id_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The string at JSON pointer `ptr`; fails the test if missing.
pub fn str_at<'a>(v: &'a Value, ptr: &str) -> &'a str {
    v.pointer(ptr)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("no string at {ptr} in {v}"))
}

/// Asserts `frame` is a `sys.error` with `code`, referring to `reference` (or to nothing).
pub fn assert_error(frame: &Value, code: &str, reference: Option<&str>) {
    assert_eq!(
        frame["type"], "sys.error",
        "expected a sys.error, got {frame}"
    );
    assert_eq!(frame["payload"]["code"], code, "{frame}");
    assert!(
        frame["payload"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "an error carries a message: {frame}"
    );
    match reference {
        Some(id) => assert_eq!(frame["payload"]["ref"], id, "{frame}"),
        None => assert!(
            frame["payload"].get("ref").is_none(),
            "an error about a frame without messageId has no ref: {frame}"
        ),
    }
    assert_host_frame(frame);
}

/// Asserts the fields the host sets on every frame: `messageId` `h-…` and a `timestamp`.
pub fn assert_host_frame(frame: &Value) {
    let id = frame["messageId"].as_str().unwrap_or_default();
    assert!(
        id.starts_with("h-") && id.len() > 2,
        "host messageId: {frame}"
    );
    assert!(
        frame["timestamp"]
            .as_u64()
            .is_some_and(|t| t > 1_600_000_000_000),
        "host timestamp in ms: {frame}"
    );
}

// ---------------------------------------------------------------------------------------------
// Raw HTTP
// ---------------------------------------------------------------------------------------------

/// One HTTP/1.1 response: status code, headers (lowercased names) and body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends a GET over a fresh TCP connection (`Connection: close`) and reads the response.
pub async fn http_get(addr: SocketAddr, path: &str) -> HttpResponse {
    within("an HTTP response", async {
        let mut stream = TcpStream::connect(addr).await.expect("connecting");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .expect("sending the request");
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .expect("reading the response");
        let raw = String::from_utf8(raw).expect("a UTF-8 response");
        let (head, body) = raw
            .split_once("\r\n\r\n")
            .expect("a complete response head");
        let mut lines = head.split("\r\n");
        let status_line = lines.next().expect("a status line");
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        HttpResponse {
            status,
            headers,
            body: body.to_owned(),
        }
    })
    .await
}
