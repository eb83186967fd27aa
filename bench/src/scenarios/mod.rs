//! The five scenarios. Each one opens its connections, fixes a [`crate::timeline::Timeline`],
//! reads the server's CPU (and memory) at the edges of the measured window and returns a
//! [`Report`].

pub mod echo;
pub mod fanout;
pub mod hotswap;
pub mod idle;
pub mod storm;

use std::time::Duration;

use crate::conn::SetupStats;
use crate::proc_stats::{Memory, Proc};
use crate::report::Report;

/// Time between all connections being up and the first message.
pub const LEAD: Duration = Duration::from_millis(100);

/// Copies the set-up figures into the report.
pub fn record_setup(report: &mut Report, setup: &SetupStats) {
    report.count("connected", setup.connected as u64);
    report.count("connect_failed", setup.failed as u64);
    report.extra.insert(
        "setup_secs".into(),
        serde_json::json!((setup.elapsed.as_secs_f64() * 1000.0).round() / 1000.0),
    );
    for (e, n) in &setup.errors {
        *report.errors.entry(format!("connect: {e}")).or_default() += n;
    }
}

pub fn server_memory(pid: Option<u32>) -> Option<Memory> {
    pid.and_then(|p| Proc::Pid(p).memory().ok())
}

/// Fails when not a single connection could be opened, with the reasons.
pub fn require_connections(setup: &SetupStats) -> anyhow::Result<()> {
    if setup.connected == 0 {
        anyhow::bail!(
            "no connection could be opened ({} failed): {:?}",
            setup.failed,
            setup.errors
        );
    }
    Ok(())
}
