//! The `plexus` command: `serve`, `dev`, `check` and `rollback`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use plexus::config_file::{self, Settings};
use plexus::{Config, Server, StartError, WatchMode};

/// mimalloc: every message allocates a few short-lived buffers (the decoded envelope, the
/// effects a plugin records, the encoded frame); with mimalloc the router path costs about 10%
/// less than with glibc malloc, and an idle connection about 10% less memory
/// (docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "plexus",
    version,
    about = "A WebSocket host for hot-swappable WebAssembly plugins"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Settings of `serve` and `dev`. Each overrides the same setting of the configuration file;
/// unset ones take the file's value, else the default (docs/operations.md).
#[derive(clap::Args)]
struct ServeArgs {
    /// The configuration file (default: plexus.toml in the working directory, if present).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Directory of plugin manifests [default: manifests].
    #[arg(long)]
    manifests: Option<PathBuf>,
    /// Do not build plugins whose artifacts are missing or stale.
    #[arg(long)]
    no_build: bool,
    /// Largest client message, in bytes (the WebSocket frame limit is 4x) [default: 65536].
    #[arg(long)]
    max_message_bytes: Option<usize>,
    /// Deepest nesting of objects and arrays in a client message (at most 128) [default: 64].
    #[arg(long)]
    max_json_depth: Option<usize>,
    /// Most elements of one array in a client message [default: 10000].
    #[arg(long)]
    max_json_array: Option<usize>,
    /// Rooms one connection may be in at once [default: 100].
    #[arg(long)]
    max_rooms_per_connection: Option<usize>,
    /// Members one room may have [default: 100000].
    #[arg(long)]
    max_room_members: Option<usize>,
    /// Connections the host takes in all; past it an upgrade gets 503 [default: 100000].
    #[arg(long)]
    max_connections: Option<usize>,
    /// Connections from one IP address; past it an upgrade gets 429 [default: 1000].
    #[arg(long)]
    max_connections_per_ip: Option<usize>,
    /// Connections of one identity; past it an upgrade gets 429 [default: 50].
    #[arg(long)]
    max_connections_per_identity: Option<usize>,
    /// Messages per second a connection, and an identity, may send (0: no limit) [default: 100].
    #[arg(long)]
    max_messages_per_second: Option<u32>,
    /// Messages a connection, and an identity, may send at once after a quiet spell
    /// [default: 200].
    #[arg(long)]
    message_burst: Option<u32>,
    /// Seconds a connection may keep sending at more than twice its limit before it is closed
    /// (1008) [default: 5].
    #[arg(long)]
    flood_close_secs: Option<u64>,
    /// Failed calls in a row that take a plugin version out of service (0: never) [default: 5].
    #[arg(long)]
    breaker_failures: Option<u32>,
    /// Seconds a version out of service refuses calls before one call tries it again
    /// [default: 10].
    #[arg(long)]
    breaker_cool_down_secs: Option<u64>,
    /// Milliseconds a call may run; three calls in a row longer than this put their version's
    /// calls in the slow lane [default: 10].
    #[arg(long)]
    slow_call_ms: Option<u64>,
    /// Calls of one version that may run in the slow lane at once [default: 1].
    #[arg(long)]
    slow_lane: Option<usize>,
    /// Seconds the previous version of a plugin stays loaded after a swap, ready for a
    /// rollback (0: none, and no automatic rollback) [default: 60].
    #[arg(long)]
    keep_previous_secs: Option<u64>,
    /// Seconds after a swap during which a failing new version is rolled back automatically
    /// [default: 30].
    #[arg(long)]
    probation_secs: Option<u64>,
    /// Share of failed calls (0 to 1) in the probation window that rolls a version back
    /// [default: 0.5].
    #[arg(long)]
    rollback_failure_share: Option<f64>,
    /// Calls a new version must have served before its failure share is judged [default: 10].
    #[arg(long)]
    rollback_min_calls: Option<u64>,
    /// Seconds a client may take to send its HTTP request head (and TLS handshake) after
    /// connecting [default: 10].
    #[arg(long)]
    request_head_timeout_secs: Option<u64>,
    /// Seconds a session whose connection dropped waits for a resume [default: 120].
    #[arg(long)]
    resume_ttl_secs: Option<u64>,
    /// Frames kept per session for a resume [default: 1000].
    #[arg(long)]
    resume_frames: Option<usize>,
    /// Bytes kept per session for a resume [default: 1048576].
    #[arg(long)]
    resume_bytes: Option<usize>,
    /// Frames queued for a connection and not yet written before it is closed with 1013
    /// [default: 4096].
    #[arg(long)]
    outbox_frames: Option<usize>,
    /// Bytes queued for a connection and not yet written before it is closed with 1013
    /// [default: 4194304].
    #[arg(long)]
    outbox_bytes: Option<usize>,
    /// Seconds one socket write may take before the client is closed with 1013 [default: 10].
    #[arg(long)]
    write_timeout_secs: Option<u64>,
    /// Handled messageIds a session remembers to answer retries (0: none) [default: 1024].
    #[arg(long)]
    dedupe_ids: Option<usize>,
    /// Seconds a session remembers a handled messageId [default: 120].
    #[arg(long)]
    dedupe_secs: Option<u64>,
    /// Milliseconds an identity stays online in a room after its last connection there dropped
    /// [default: 5000].
    #[arg(long)]
    presence_grace_ms: Option<u64>,
    /// Seconds between WebSocket pings [default: 25].
    #[arg(long)]
    ping_interval_secs: Option<u64>,
    /// Seconds a client has to answer a ping before it is closed (4001) [default: 20].
    #[arg(long)]
    pong_timeout_secs: Option<u64>,
    /// DEVELOPMENT ONLY, not authentication: let clients choose their identity with
    /// `/ws?devIdentity=NAME` (to try presence with several connections of one identity).
    /// Refused while a token key is configured.
    #[arg(long)]
    dev_insecure_identity: bool,
    /// Verify tokens with HS256 and the shared secret in this file.
    #[arg(long, value_name = "FILE")]
    jwt_secret_file: Option<PathBuf>,
    /// Verify tokens with this public key in PEM: RS256 for an RSA key, ES256 for a P-256 key.
    #[arg(long, value_name = "FILE")]
    jwt_public_key: Option<PathBuf>,
    /// Verify tokens with the keys of this JWKS file (RS256, ES256), chosen by the token's kid.
    #[arg(long, value_name = "FILE")]
    jwt_jwks: Option<PathBuf>,
    /// A token's `aud` must contain this.
    #[arg(long)]
    jwt_audience: Option<String>,
    /// A token's `iss` must be this.
    #[arg(long)]
    jwt_issuer: Option<String>,
    /// Seconds of clock skew allowed on `exp` and `nbf` [default: 5].
    #[arg(long)]
    jwt_leeway_secs: Option<u64>,
    /// With a token key configured, still admit clients without a token as guests.
    #[arg(long)]
    allow_guests: bool,
    /// An Origin browser connections may come from (repeat for several; none: any).
    #[arg(long = "allowed-origin", value_name = "ORIGIN")]
    allowed_origins: Vec<String>,
    /// Serve wss:// and https:// with this certificate chain (PEM); needs --tls-key.
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Join a cluster of nodes through this Redis (redis://HOST:PORT) [default: one node].
    #[arg(long, value_name = "URL")]
    cluster: Option<String>,
    /// Seconds a node's lease in the cluster lasts (1 to 15): a node that stops renewing it is
    /// ended, and its members leave their rooms, within this plus a third [default: 10].
    #[arg(long)]
    cluster_node_ttl_secs: Option<u64>,
    /// Publications each room's stream in Redis keeps, to repair missed ones [default: 1000].
    #[arg(long)]
    cluster_stream_length: Option<usize>,
    /// Seconds a broadcast waits for Redis before its sender is told `unavailable` [default: 10].
    #[arg(long)]
    cluster_publish_timeout_secs: Option<u64>,
}

impl ServeArgs {
    /// The settings given as flags (a switch given sets its setting; one not given leaves it to
    /// the file).
    fn settings(&self) -> Settings {
        let on = |flag: bool| flag.then_some(true);
        Settings {
            listen: self.listen,
            manifests: self.manifests.clone(),
            build: self.no_build.then_some(false),
            max_message_bytes: self.max_message_bytes,
            max_json_depth: self.max_json_depth,
            max_json_array: self.max_json_array,
            max_rooms_per_connection: self.max_rooms_per_connection,
            max_room_members: self.max_room_members,
            max_connections: self.max_connections,
            max_connections_per_ip: self.max_connections_per_ip,
            max_connections_per_identity: self.max_connections_per_identity,
            max_messages_per_second: self.max_messages_per_second,
            message_burst: self.message_burst,
            flood_close_secs: self.flood_close_secs,
            breaker_failures: self.breaker_failures,
            breaker_cool_down_secs: self.breaker_cool_down_secs,
            slow_call_ms: self.slow_call_ms,
            slow_lane: self.slow_lane,
            request_head_timeout_secs: self.request_head_timeout_secs,
            keep_previous_secs: self.keep_previous_secs,
            probation_secs: self.probation_secs,
            rollback_failure_share: self.rollback_failure_share,
            rollback_min_calls: self.rollback_min_calls,
            resume_ttl_secs: self.resume_ttl_secs,
            resume_frames: self.resume_frames,
            resume_bytes: self.resume_bytes,
            outbox_frames: self.outbox_frames,
            outbox_bytes: self.outbox_bytes,
            write_timeout_secs: self.write_timeout_secs,
            dedupe_ids: self.dedupe_ids,
            dedupe_secs: self.dedupe_secs,
            presence_grace_ms: self.presence_grace_ms,
            ping_interval_secs: self.ping_interval_secs,
            pong_timeout_secs: self.pong_timeout_secs,
            dev_identity: on(self.dev_insecure_identity),
            jwt_secret_file: self.jwt_secret_file.clone(),
            jwt_public_key: self.jwt_public_key.clone(),
            jwt_jwks: self.jwt_jwks.clone(),
            jwt_audience: self.jwt_audience.clone(),
            jwt_issuer: self.jwt_issuer.clone(),
            jwt_leeway_secs: self.jwt_leeway_secs,
            allow_guests: on(self.allow_guests),
            allowed_origins: (!self.allowed_origins.is_empty())
                .then(|| self.allowed_origins.clone()),
            tls_cert: self.tls_cert.clone(),
            tls_key: self.tls_key.clone(),
            cluster: self.cluster.clone(),
            cluster_node_ttl_secs: self.cluster_node_ttl_secs,
            cluster_stream_length: self.cluster_stream_length,
            cluster_publish_timeout_secs: self.cluster_publish_timeout_secs,
            // Structured rules have no flag: they live in the file ([[rooms.rule]]).
            room_rules: None,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Serve WebSocket clients at /ws; swap plugins when their artifacts or manifests change.
    Serve(ServeArgs),
    /// Like `serve`, and also rebuild and swap a plugin when its sources change.
    Dev(ServeArgs),
    /// Validate manifests and plugins without serving.
    Check {
        /// Directory of plugin manifests.
        #[arg(long, default_value = "manifests")]
        manifests: PathBuf,
        /// Do not build plugins whose artifacts are missing or stale.
        #[arg(long)]
        no_build: bool,
    },
    /// Roll a plugin back to its previous version on a running host (kept for
    /// --keep-previous-secs after a swap). Asks the host's admin endpoint, served on loopback.
    Rollback {
        /// The plugin id.
        plugin: String,
        /// The host's address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        host: SocketAddr,
    },
    /// Roll a new plugin version out to every node: put FILES (manifests, components) into the
    /// manifests directory the nodes share (`--manifests`; each written beside its place, then
    /// renamed into it), or publish them through the cluster's Redis (`--cluster`; stored by
    /// content hash, and each node writes them into its own manifests directory), then follow
    /// one node's /healthz until every node runs the same new version, or say which node does
    /// not (docs/operations.md, "Cluster").
    Rollout {
        /// The manifests and components to roll out.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The manifests directory every node serves.
        #[arg(long, required_unless_present = "cluster", conflicts_with = "cluster")]
        manifests: Option<PathBuf>,
        /// The cluster's Redis, for nodes that share no directory.
        #[arg(long)]
        cluster: Option<String>,
        /// A node's address.
        #[arg(long, default_value = "127.0.0.1:8080")]
        host: SocketAddr,
        /// How long to wait for every node.
        #[arg(long, default_value_t = 60)]
        timeout_secs: u64,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,wasmtime=warn,cranelift=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => serve(args, WatchMode::Artifacts).await,
            Command::Dev(args) => serve(args, WatchMode::Sources).await,
            Command::Check {
                manifests,
                no_build,
            } => check(manifests, !no_build).await,
            Command::Rollback { plugin, host } => rollback(&plugin, host).await,
            Command::Rollout {
                files,
                manifests,
                cluster,
                host,
                timeout_secs,
            } => {
                let via = match (manifests, cluster) {
                    (_, Some(url)) => Via::Redis(url),
                    (Some(dir), None) => Via::Directory(dir),
                    (None, None) => unreachable!("clap requires --manifests or --cluster"),
                };
                rollout(&files, &via, host, Duration::from_secs(timeout_secs)).await
            }
        }
    })
}

async fn serve(args: ServeArgs, watch: WatchMode) -> ExitCode {
    // The file named by --config, else plexus.toml here if there is one.
    let file = match &args.config {
        Some(path) => Some(path.clone()),
        None => Some(PathBuf::from(config_file::DEFAULT_FILE)).filter(|p| p.is_file()),
    };
    let from_file = match &file {
        Some(path) => match config_file::load(path) {
            Ok(settings) => settings,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        },
        None => Settings::default(),
    };
    let mut config = Config::new("manifests");
    config.watch = watch;
    if let Err(e) = args.settings().over(from_file).apply(&mut config) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    if let Some(path) = &file {
        tracing::info!(file = %path.display(), "configuration read");
    }
    let scheme = if config.tls.is_some() { "wss" } else { "ws" };
    let server = match Server::start(config).await {
        Ok(server) => server,
        Err(StartError::Manifests(errors)) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!(
                "plexus: {} problem(s) in the manifests; not serving",
                errors.len()
            );
            return ExitCode::FAILURE;
        }
        Err(StartError::Other(e)) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("plexus listening on {scheme}://{}/ws", server.local_addr());
    wait_for_signal().await;
    tracing::info!("shutting down: finishing in-flight calls, closing connections with 1001");
    server.shutdown().await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

async fn check(manifests: PathBuf, build: bool) -> ExitCode {
    match plexus::registry::check(&manifests, plexus::registry::LoadOptions { build }).await {
        Ok(versions) => {
            for (plugin, version) in versions {
                println!("ok: plugin `{plugin}` version {version}");
            }
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("error: {e}");
            }
            eprintln!("plexus check: {} problem(s)", errors.len());
            ExitCode::FAILURE
        }
    }
}

async fn rollback(plugin: &str, host: SocketAddr) -> ExitCode {
    match post_rollback(plugin, host).await {
        Ok((status, body)) if status.is_success() => {
            println!("{body}");
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!("error: the host answered {status}: {body}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: cannot reach the host at {host}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `POST /admin/rollback?plugin=PLUGIN` to the host; the status and the body.
async fn post_rollback(
    plugin: &str,
    host: SocketAddr,
) -> anyhow::Result<(hyper::StatusCode, String)> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(host).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let query: String = plugin
        .bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            b => format!("%{b:02X}"),
        })
        .collect();
    let req = hyper::Request::post(format!("/admin/rollback?plugin={query}"))
        .header(hyper::header::HOST, host.to_string())
        .body(Empty::<bytes::Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Each node's plugin versions (node → plugin → version) and the queried node's refusals, from
/// its `/healthz`; a host that is not in a cluster is one node, `this`.
fn versions_of(report: &serde_json::Value) -> BTreeMap<String, BTreeMap<String, String>> {
    let as_map = |v: &serde_json::Value| -> BTreeMap<String, String> {
        v.as_object()
            .map(|m| {
                m.iter()
                    .map(|(k, v)| {
                        let version = v.get("version").unwrap_or(v);
                        (k.clone(), version.as_str().unwrap_or_default().to_owned())
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    match report["cluster"]["versions"].as_object() {
        Some(nodes) => nodes.iter().map(|(n, v)| (n.clone(), as_map(v))).collect(),
        None => BTreeMap::from([("this".to_owned(), as_map(&report["plugins"]))]),
    }
}

/// How `plexus rollout` hands the files to the nodes.
enum Via {
    /// A manifests directory every node serves.
    Directory(PathBuf),
    /// The cluster's Redis.
    Redis(String),
}

async fn rollout(files: &[PathBuf], via: &Via, host: SocketAddr, timeout: Duration) -> ExitCode {
    let fail = |message: String| {
        eprintln!("error: {message}");
        ExitCode::FAILURE
    };
    let before = match get_healthz(host).await {
        Ok(report) => report,
        Err(e) => return fail(format!("cannot reach the host at {host}: {e:#}")),
    };
    let before_versions = versions_of(&before);
    let refused_before = before["refused"].as_array().map_or(0, Vec::len);
    match via {
        Via::Directory(manifests) => {
            for file in files {
                let Some(name) = file.file_name() else {
                    return fail(format!("{} names no file", file.display()));
                };
                let target = manifests.join(name);
                let staging = manifests.join(format!(".{}.rollout", name.to_string_lossy()));
                if let Err(e) =
                    std::fs::copy(file, &staging).and_then(|_| std::fs::rename(&staging, &target))
                {
                    return fail(format!(
                        "cannot put {} into {}: {e}",
                        file.display(),
                        manifests.display()
                    ));
                }
                println!("{} -> {}", file.display(), target.display());
            }
        }
        Via::Redis(url) => match plexus::cluster::rollout::publish(url, files).await {
            Ok(published) => {
                for (name, sha) in published {
                    println!("{name} -> sha256:{sha}");
                }
            }
            Err(e) => return fail(format!("cannot publish the rollout: {e}")),
        },
    }
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = before_versions.clone();
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let Ok(report) = get_healthz(host).await else {
            continue;
        };
        if let Some(refused) = report["refused"].as_array()
            && refused.len() > refused_before
        {
            return fail(format!(
                "the node at {host} refused the new version: {}",
                refused[refused.len() - 1]
            ));
        }
        last = versions_of(&report);
        let agree = report["cluster"]["versionsDiffer"]
            .as_array()
            .is_none_or(Vec::is_empty);
        let Some(first) = last.values().next() else {
            continue;
        };
        let changed: Vec<&String> = first
            .iter()
            .filter(|(plugin, version)| {
                before_versions
                    .values()
                    .all(|node| node.get(*plugin) != Some(*version))
            })
            .map(|(plugin, _)| plugin)
            .collect();
        if agree && last.len() >= before_versions.len() && !changed.is_empty() {
            for plugin in changed {
                println!("{plugin}: {} on {} node(s)", first[plugin], last.len());
            }
            return ExitCode::SUCCESS;
        }
    }
    let mut message = format!(
        "not every node runs one new version after {}s:",
        timeout.as_secs()
    );
    for (node, versions) in &last {
        message.push_str(&format!("\n  {node}: {versions:?}"));
    }
    fail(message)
}

/// `GET /healthz` of the host, parsed.
async fn get_healthz(host: SocketAddr) -> anyhow::Result<serde_json::Value> {
    use http_body_util::{BodyExt, Empty};
    let stream = tokio::net::TcpStream::connect(host).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get("/healthz")
        .header(hyper::header::HOST, host.to_string())
        .body(Empty::<bytes::Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    let body = resp.into_body().collect().await?.to_bytes();
    Ok(serde_json::from_slice(&body)?)
}
