//! Plexus load generator: the measuring half of the benchmark suite.
//!
//! The `loadgen` binary drives one scenario against one server and prints a [`report::Report`];
//! the `floor` binary is the minimal tokio-tungstenite peer every other server is compared with.
//! Nothing here asserts on timings: these are measurements, not tests.

pub mod args;
pub mod conn;
pub mod healthz;
pub mod limits;
pub mod proc_stats;
pub mod proto;
pub mod recorder;
pub mod report;
pub mod scenarios;
pub mod timeline;
