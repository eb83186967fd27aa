//! `connect-storm`: open connections as fast as possible (bounded concurrency) up to a target;
//! connections/s, connect latency and failures. The connections stay open until the last one is
//! up, so that the server holds the whole target at once.

use std::sync::Arc;
use std::time::Duration;

use crate::args::StormArgs;
use crate::conn::{Fleet, Target, hold_until};
use crate::proc_stats::CpuMark;
use crate::report::{Latency, Report};
use crate::scenarios::{record_setup, server_memory};
use crate::timeline::Timeline;

pub async fn run(a: &StormArgs, threads: usize) -> anyhow::Result<Report> {
    let c = &a.common;
    let target = Arc::new(Target::new(c, false, a.target)?);
    let mut report = Report::new("connect-storm", c, target.url(), "connection");
    report.param("target", a.target);
    report.param("concurrency", a.concurrency);

    report.server_memory_before = server_memory(c.server_pid);
    let dialect = c.dialect;
    let deadline = tokio::time::Instant::now() + Duration::from_secs_f64(a.time_limit.max(0.001));
    let m0 = CpuMark::take(c.server_pid);
    let mut fleet = Fleet::spawn(
        target.clone(),
        a.target,
        a.concurrency,
        None,
        Some(deadline),
        move |_, ws, tl: Timeline| hold_until(ws, dialect, Timeline::at(tl.drain_end)),
    );
    let setup = fleet.wait_ready().await;
    let m1 = CpuMark::take(c.server_pid);
    report.server_memory_after = server_memory(c.server_pid);
    let hold = Duration::from_secs_f64(a.hold.max(0.0));
    fleet.start(Timeline::new(
        Duration::ZERO,
        Duration::ZERO,
        hold,
        Duration::ZERO,
    ));
    let mut disconnects = 0;
    report.count("closed_before_run", fleet.early_closes());
    for r in fleet.join().await {
        if let Ok(Err(_)) = r {
            disconnects += 1;
        }
    }
    record_setup(&mut report, &setup);
    report.window(setup.connected as u64, &m0, &m1, threads);
    report.latency = Latency::from_ns(&setup.connect_latency);
    report.count("failed", setup.failed as u64);
    report.count("disconnects_while_held", disconnects);
    Ok(report)
}
