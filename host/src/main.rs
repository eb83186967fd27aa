//! The `plexus` command: `serve`, `dev` and `check`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
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
    /// Largest client message, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_message_bytes: usize,
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
        }
    })
}

async fn serve(args: ServeArgs, watch: WatchMode) -> ExitCode {
    let mut config = Config::new(args.manifests);
    config.listen = args.listen;
    config.build = !args.no_build;
    config.watch = watch;
    config.limits.max_message_bytes = args.max_message_bytes;
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
