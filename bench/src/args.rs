//! Command-line arguments shared by every scenario.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// How the generator speaks to the server under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dialect {
    /// Plexus envelopes at `/ws` (`sys.welcome`, `sys.join`, `echo`, `echo.broadcast`).
    Plexus,
    /// Bare text frames at `/echo` (echoed) and `/room` (broadcast to every other member).
    Raw,
    /// Engine.IO v4 / Socket.IO over WebSocket only, events `echo`, `join`, `publish`, `message`.
    Socketio,
}

impl Dialect {
    pub fn name(self) -> &'static str {
        match self {
            Dialect::Plexus => "plexus",
            Dialect::Raw => "raw",
            Dialect::Socketio => "socketio",
        }
    }
}

#[derive(Parser, Debug)]
#[command(
    name = "loadgen",
    version,
    about = "Plexus load generator: echo, fanout, connect-storm, idle-memory and hotswap scenarios",
    long_about = "Drives one scenario against one WebSocket server for a bounded time and prints a \
                  report (text, and JSON with --json). Benchmarks, not tests: nothing here asserts on \
                  timings. Give --server-pid to get the server's CPU time per message, the fair \
                  figure on a small machine where the generator competes with the server."
)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Subcommand, Debug)]
pub enum Scenario {
    /// N connections, each keeping K messages in flight; messages/s and round-trip latency.
    Echo(EchoArgs),
    /// One room of M members and a publisher at a fixed rate; deliveries/s and
    /// publish-to-receive latency.
    Fanout(FanoutArgs),
    /// Open connections as fast as possible (bounded concurrency) up to a target.
    ConnectStorm(StormArgs),
    /// Open N idle connections and report the server's resident memory per connection.
    IdleMemory(IdleArgs),
    /// Traffic through a Plexus route while the plugin behind it is swapped between builds that
    /// answer differently; per swap: answers by each version, lost, duplicated, swap latency.
    Hotswap(HotswapArgs),
}

impl Scenario {
    pub fn common(&self) -> &Common {
        match self {
            Scenario::Echo(a) => &a.common,
            Scenario::Fanout(a) => &a.common,
            Scenario::ConnectStorm(a) => &a.common,
            Scenario::IdleMemory(a) => &a.common,
            Scenario::Hotswap(a) => &a.common,
        }
    }
}

#[derive(Args, Debug, Clone)]
pub struct Common {
    /// Server address (HOST:PORT).
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub addr: String,

    /// Protocol dialect of the server.
    #[arg(long, value_enum, default_value_t = Dialect::Plexus)]
    pub dialect: Dialect,

    /// Override the URL path (defaults: plexus `/ws`, raw `/echo` or `/room`,
    /// socketio `/socket.io/?EIO=4&transport=websocket`).
    #[arg(long)]
    pub path: Option<String>,

    /// A name for the server under test, copied into the report (e.g. floor, ws, socketio).
    #[arg(long, default_value = "")]
    pub label: String,

    /// Length of the measured window, in seconds.
    #[arg(long, default_value_t = 5.0)]
    pub duration: f64,

    /// Traffic before the measured window starts (not recorded), in seconds.
    #[arg(long, default_value_t = 1.0)]
    pub warmup: f64,

    /// Time allowed after the window for answers still in flight, in seconds.
    #[arg(long, default_value_t = 2.0)]
    pub drain: f64,

    /// PID of the server: adds its CPU time (utime+stime) and resident memory to the report.
    #[arg(long)]
    pub server_pid: Option<u32>,

    /// Write the report as JSON to this file as well.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// Number of local source addresses (127.0.0.1, 127.0.0.2, ...) to spread connections over
    /// (0 = automatic: one per 25,000 connections, and no explicit bind for one).
    #[arg(long, default_value_t = 0)]
    pub source_ips: u32,

    /// First local source address when binding explicitly.
    #[arg(long, default_value = "127.0.0.1")]
    pub source_base: Ipv4Addr,

    /// Connections being opened at the same time during set-up.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,

    /// Give up on one connection's TCP + WebSocket + protocol handshake after this many ms.
    #[arg(long, default_value_t = 10_000)]
    pub connect_timeout_ms: u64,

    /// Worker threads of the generator (default: CPUs in this process's affinity mask).
    #[arg(long)]
    pub threads: Option<usize>,

    /// Print only the JSON report on stdout (no text report).
    #[arg(long)]
    pub quiet: bool,
}

impl Common {
    pub fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup.max(0.0))
    }
    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration.max(0.001))
    }
    pub fn drain(&self) -> Duration {
        Duration::from_secs_f64(self.drain.max(0.0))
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms.max(1))
    }
}

#[derive(Args, Debug, Clone)]
pub struct EchoArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections (N).
    #[arg(long, short = 'n', default_value_t = 100)]
    pub connections: usize,
    /// Messages in flight per connection (K).
    #[arg(long, short = 'k', default_value_t = 1)]
    pub in_flight: usize,
    /// Size of the JSON payload object, in bytes (padded; at least about 40).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// A connection that has had no answer for this many ms counts its messages in flight as
    /// timed out and sends new ones, so that one lost message does not stall it.
    #[arg(long, default_value_t = 5000)]
    pub answer_timeout_ms: u64,
    /// Messages per second across all connections (0: each connection sends again as soon as
    /// an answer comes). Paced, every connection sends at most `rate / N` per second, the
    /// connections' slots spread evenly: the servers compared all run below saturation, so the
    /// CPU time they spend per message is measured in the same regime (a saturated server
    /// leaves the generator idle more often, and each answer must then wake it).
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
}

#[derive(Args, Debug, Clone)]
pub struct FanoutArgs {
    #[command(flatten)]
    pub common: Common,
    /// Receiving members of the room (M); the publisher joins as well and is not counted.
    #[arg(long, short = 'm', default_value_t = 1000)]
    pub members: usize,
    /// Messages the publisher sends per second.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Size of the JSON payload object, in bytes (padded; at least about 40).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Room name (plexus and socketio dialects).
    #[arg(long, default_value = "bench")]
    pub room: String,
}

#[derive(Args, Debug, Clone)]
pub struct StormArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections to open.
    #[arg(long, default_value_t = 10_000)]
    pub target: usize,
    /// Connections being opened at the same time.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Give up opening connections after this many seconds (the rest count as failed).
    #[arg(long, default_value_t = 60.0)]
    pub time_limit: f64,
    /// Keep the connections open this long after the last one is up, in seconds.
    #[arg(long, default_value_t = 0.5)]
    pub hold: f64,
}

#[derive(Args, Debug, Clone)]
pub struct IdleArgs {
    #[command(flatten)]
    pub common: Common,
    /// Idle connections to open.
    #[arg(long, short = 'n', default_value_t = 10_000)]
    pub connections: usize,
    /// Wait after the last connection is up before reading the server's memory, in seconds.
    #[arg(long, default_value_t = 2.0)]
    pub settle: f64,
}

#[derive(Args, Debug, Clone)]
pub struct HotswapArgs {
    #[command(flatten)]
    pub common: Common,
    /// Connections.
    #[arg(long, short = 'n', default_value_t = 50)]
    pub connections: usize,
    /// Messages in flight per connection.
    #[arg(long, short = 'k', default_value_t = 1)]
    pub in_flight: usize,
    /// Size of the JSON payload object, in bytes.
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Builds of the plugin that answer observably differently (each answer names its
    /// version), at least two; one of them is what --swap-target holds when the run starts.
    /// Swap N writes the build after the one serving, in turn (write a temporary file, then
    /// rename it over --swap-target).
    #[arg(long, value_delimiter = ',', required = true, num_args = 1..)]
    pub swap_files: Vec<PathBuf>,
    /// The path the manifest's `wasm` points at.
    #[arg(long)]
    pub swap_target: PathBuf,
    /// The plugin's id, as `/healthz` lists it under `plugins`.
    #[arg(long, default_value = "answer")]
    pub plugin: String,
    /// Time between swaps, in ms (a swap starts only once the previous one was taken or given
    /// up, and only while a whole period of the measured window is left after it).
    #[arg(long, default_value_t = 3000)]
    pub swap_every_ms: u64,
    /// A swap that the host has neither reported (`/healthz`) nor answered with by this many
    /// ms after the artifact was written is not taken; the run then stops swapping.
    #[arg(long, default_value_t = 5000)]
    pub swap_deadline_ms: u64,
    /// How often `/healthz` is read while a swap is pending, in ms.
    #[arg(long, default_value_t = 2)]
    pub poll_ms: u64,
    /// The latency spike is the p99 of the answers received in this many ms centred on the
    /// first answer by the new version, against the steady state (answers received outside
    /// every swap, from the artifact's write to half this window after that first answer).
    #[arg(long, default_value_t = 100)]
    pub spike_window_ms: u64,
    /// The message type sent, routed to the plugin, and the type of its answer.
    #[arg(long, default_value = "answer")]
    pub answer_type: String,
    /// A request with no terminal answer (ack or error) after this many ms is counted as timed
    /// out and replaced, so that a lost message does not stall its connection. An answer that
    /// comes later is counted as late; one that never comes as lost.
    #[arg(long, default_value_t = 2000)]
    pub answer_timeout_ms: u64,
}
