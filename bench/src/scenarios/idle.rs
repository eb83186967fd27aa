//! `idle-memory`: open N idle connections and report how much the server's resident memory grew
//! per connection; also the server's CPU while they sit idle (pings, timers).

use std::sync::Arc;
use std::time::Duration;

use crate::args::IdleArgs;
use crate::conn::{Fleet, Target, hold_until};
use crate::proc_stats::CpuMark;
use crate::report::{Latency, Report};
use crate::scenarios::{record_setup, require_connections, server_memory};
use crate::timeline::Timeline;

pub async fn run(a: &IdleArgs, threads: usize) -> anyhow::Result<Report> {
    let c = &a.common;
    let target = Arc::new(Target::new(c, false, a.connections)?);
    let mut report = Report::new("idle-memory", c, target.url(), "connection");
    report.param("connections", a.connections);
    report.param("settle_secs", a.settle);
    if c.server_pid.is_none() {
        eprintln!("idle-memory: without --server-pid only the connection count is reported");
    }

    let before = server_memory(c.server_pid);
    report.server_memory_before = before;
    let dialect = c.dialect;
    let mut fleet = Fleet::spawn(
        target.clone(),
        a.connections,
        c.connect_concurrency,
        None,
        None,
        move |_, ws, tl: Timeline| hold_until(ws, dialect, Timeline::at(tl.measure_end)),
    );
    let setup = fleet.wait_ready().await;
    record_setup(&mut report, &setup);
    require_connections(&setup)?;
    tokio::time::sleep(Duration::from_secs_f64(a.settle.max(0.0))).await;
    let after = server_memory(c.server_pid);
    report.server_memory_after = after;

    // The idle window: the connections stay open and answer pings; the server's CPU over it is
    // the cost of keeping them.
    let tl = Timeline::new(Duration::ZERO, Duration::ZERO, c.duration(), Duration::ZERO);
    fleet.start(tl);
    let m0 = CpuMark::take(c.server_pid);
    tokio::time::sleep_until(Timeline::at(tl.measure_end)).await;
    let m1 = CpuMark::take(c.server_pid);
    let after_idle = server_memory(c.server_pid);
    let mut disconnects = 0;
    report.count("closed_before_run", fleet.early_closes());
    for r in fleet.join().await {
        if let Ok(Err(_)) = r {
            disconnects += 1;
        }
    }
    report.window(setup.connected as u64, &m0, &m1, threads);
    report.throughput_per_sec = 0.0;
    report.latency = Latency::from_ns(&setup.connect_latency);
    report.count("disconnects", disconnects);
    if let (Some(b), Some(a)) = (before, after) {
        let n = setup.connected.max(1) as f64;
        let per = |x: u64, y: u64| ((y as f64 - x as f64) / n).round();
        report.extra.insert(
            "bytes_per_connection".into(),
            serde_json::json!(per(b.best(), a.best())),
        );
        report.extra.insert(
            "bytes_per_connection_vmrss".into(),
            serde_json::json!(per(b.vm_rss, a.vm_rss)),
        );
        if let Some(l) = after_idle {
            report.extra.insert(
                "bytes_per_connection_after_idle".into(),
                serde_json::json!(per(b.best(), l.best())),
            );
        }
    }
    Ok(report)
}
