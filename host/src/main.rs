//! The `plexus` command: `serve`, `dev`, `check` and `rollback`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use plexus::registry::SwapPolicy;
use plexus::session::SessionPolicy;
use plexus::session::outbox::Bounds;
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

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
    /// Directory of plugin manifests.
    #[arg(long, default_value = "manifests")]
    manifests: PathBuf,
    /// Do not build plugins whose artifacts are missing or stale.
    #[arg(long)]
    no_build: bool,
    /// Largest client message, in bytes (the WebSocket frame limit is 4x).
    #[arg(long, default_value_t = 64 << 10)]
    max_message_bytes: usize,
    /// Deepest nesting of objects and arrays in a client message (at most 128).
    #[arg(long, default_value_t = 64)]
    max_json_depth: usize,
    /// Most elements of one array in a client message.
    #[arg(long, default_value_t = 10_000)]
    max_json_array: usize,
    /// Rooms one connection may be in at once.
    #[arg(long, default_value_t = 100)]
    max_rooms_per_connection: usize,
    /// Members one room may have.
    #[arg(long, default_value_t = 100_000)]
    max_room_members: usize,
    /// Messages per second a connection, and an identity, may send (0: no limit).
    #[arg(long, default_value_t = 100)]
    max_messages_per_second: u32,
    /// Messages a connection, and an identity, may send at once after a quiet spell.
    #[arg(long, default_value_t = 200)]
    message_burst: u32,
    /// Seconds a connection may keep sending at more than twice its limit before it is closed
    /// (1008).
    #[arg(long, default_value_t = 5)]
    flood_close_secs: u64,
    /// Failed calls in a row that take a plugin version out of service (0: never).
    #[arg(long, default_value_t = 5)]
    breaker_failures: u32,
    /// Seconds a version out of service refuses calls before one call tries it again.
    #[arg(long, default_value_t = 10)]
    breaker_cool_down_secs: u64,
    /// Milliseconds a call may run; three calls in a row longer than this put their version's
    /// calls in the slow lane.
    #[arg(long, default_value_t = 10)]
    slow_call_ms: u64,
    /// Calls of one version that may run in the slow lane at once.
    #[arg(long, default_value_t = 1)]
    slow_lane: usize,
    /// Seconds the previous version of a plugin stays loaded after a swap, ready for a
    /// rollback (0: none, and no automatic rollback).
    #[arg(long, default_value_t = 60)]
    keep_previous_secs: u64,
    /// Seconds after a swap during which a failing new version is rolled back automatically.
    #[arg(long, default_value_t = 30)]
    probation_secs: u64,
    /// Share of failed calls (0 to 1) in the probation window that rolls a version back.
    #[arg(long, default_value_t = 0.5)]
    rollback_failure_share: f64,
    /// Calls a new version must have served before its failure share is judged.
    #[arg(long, default_value_t = 10)]
    rollback_min_calls: u64,
    /// Seconds a client may take to send its HTTP request head after connecting.
    #[arg(long, default_value_t = 10)]
    request_head_timeout_secs: u64,
    /// Seconds a session whose connection dropped waits for a resume.
    #[arg(long, default_value_t = 120)]
    resume_ttl_secs: u64,
    /// Frames kept per session for a resume.
    #[arg(long, default_value_t = 1000)]
    resume_frames: usize,
    /// Bytes kept per session for a resume.
    #[arg(long, default_value_t = 1 << 20)]
    resume_bytes: usize,
    /// Frames queued for a connection and not yet written before it is closed with 1013.
    #[arg(long, default_value_t = 4096)]
    outbox_frames: usize,
    /// Bytes queued for a connection and not yet written before it is closed with 1013.
    #[arg(long, default_value_t = 4 << 20)]
    outbox_bytes: usize,
    /// Seconds one socket write may take before the client is closed with 1013.
    #[arg(long, default_value_t = 10)]
    write_timeout_secs: u64,
    /// Handled messageIds a session remembers to answer retries (0: none).
    #[arg(long, default_value_t = 1024)]
    dedupe_ids: usize,
    /// Seconds a session remembers a handled messageId.
    #[arg(long, default_value_t = 120)]
    dedupe_secs: u64,
    /// Milliseconds an identity stays online in a room after its last connection there dropped.
    #[arg(long, default_value_t = 5000)]
    presence_grace_ms: u64,
    /// Seconds between WebSocket pings.
    #[arg(long, default_value_t = 25)]
    ping_interval_secs: u64,
    /// Seconds a client has to answer a ping before it is closed (4001).
    #[arg(long, default_value_t = 20)]
    pong_timeout_secs: u64,
    /// DEVELOPMENT ONLY, not authentication: let clients choose their identity with
    /// `/ws?devIdentity=NAME` (to try presence with several connections of one identity).
    #[arg(long)]
    dev_insecure_identity: bool,
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
        }
    })
}

async fn serve(args: ServeArgs, watch: WatchMode) -> ExitCode {
    let mut config = Config::new(args.manifests);
    config.listen = args.listen;
    config.build = !args.no_build;
    config.watch = watch;
    config.limits.max_message_bytes = args.max_message_bytes;
    config.limits.json = plexus::protocol::JsonLimits {
        max_depth: args
            .max_json_depth
            .clamp(1, plexus::protocol::MAX_JSON_DEPTH_CEILING),
        max_array: args.max_json_array.max(1),
    };
    config.limits.max_rooms_per_connection = args.max_rooms_per_connection;
    config.limits.max_room_members = args.max_room_members;
    config.limits.breaker = plexus::registry::BreakerPolicy {
        failures: args.breaker_failures,
        cool_down: Duration::from_secs(args.breaker_cool_down_secs),
        slow_call: Duration::from_millis(args.slow_call_ms.max(1)),
        slow_lane: args.slow_lane.max(1),
        ..Default::default()
    };
    config.limits.rate =
        std::num::NonZeroU32::new(args.max_messages_per_second).map(|per_second| {
            plexus::limits::RateLimit {
                per_second,
                burst: std::num::NonZeroU32::new(args.message_burst).unwrap_or(per_second),
                close_after: Duration::from_secs(args.flood_close_secs),
            }
        });
    config.request_head_timeout = Duration::from_secs(args.request_head_timeout_secs.max(1));
    config.swap = SwapPolicy {
        keep_previous: Duration::from_secs(args.keep_previous_secs),
        probation: Duration::from_secs(args.probation_secs),
        max_failure_share: args.rollback_failure_share.clamp(0.0, 1.0),
        min_calls: args.rollback_min_calls,
    };
    config.session = SessionPolicy {
        bounds: Bounds {
            live_frames: args.outbox_frames.max(1),
            live_bytes: args.outbox_bytes.max(1),
            kept_frames: args.resume_frames,
            kept_bytes: args.resume_bytes,
        },
        resume_ttl: Duration::from_secs(args.resume_ttl_secs),
        dedupe_ids: args.dedupe_ids,
        dedupe_ttl: Duration::from_secs(args.dedupe_secs),
        presence_grace: Duration::from_millis(args.presence_grace_ms),
        ping_interval: Duration::from_secs(args.ping_interval_secs.max(1)),
        pong_timeout: Duration::from_secs(args.pong_timeout_secs.max(1)),
        write_timeout: Duration::from_secs(args.write_timeout_secs.max(1)),
        dev_identity: args.dev_insecure_identity,
    };
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
    };
    println!("plexus listening on ws://{}/ws", server.local_addr());
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
