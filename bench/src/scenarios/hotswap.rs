//! `hotswap`: numbered requests through a Plexus route while the plugin behind it is swapped
//! between builds that answer observably differently (every answer names its version).
//!
//! Each swap writes the next build over the served artifact (a temporary file renamed over it),
//! then reads from the host that the swap was taken: `/healthz` lists a new version for the
//! plugin, and an answer by the new build comes back. A swap neither reported nor answered with
//! within `--swap-deadline-ms` is not taken, and swapping stops there. Per swap the report gives
//! the messages answered by the old and by the new version, lost, duplicated and failed ones, the
//! swap's latency (written to reported, written to first answer by the new version), and the p99
//! of the answers around it against the steady state. Every count covers the messages sent in
//! the measured window, none of the warm-up.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Map, Value, json};
use tokio_tungstenite::tungstenite::Message;

use crate::args::{Dialect, HotswapArgs};
use crate::conn::{ErrorCounts, Fleet, Target, Ws, count_error, feed_text};
use crate::healthz::Healthz;
use crate::proc_stats::CpuMark;
use crate::proto::{self, Kind};
use crate::recorder::new_histogram;
use crate::report::{Latency, Report, Table};
use crate::scenarios::{LEAD, record_setup, require_connections, server_memory};
use crate::timeline::{Timeline, now_ns};

// What came back for one request.
const ANSWER: u8 = 1;
const ACK: u8 = 2;
const ERR: u8 = 4;
/// No terminal answer within `--answer-timeout-ms`: replaced by a new request.
const TIMEOUT: u8 = 8;
/// A second answer, or a second terminal answer (ack or error).
const DUP: u8 = 16;
/// A terminal answer after the request had timed out.
const LATE: u8 = 32;

/// The versions answers name, as small ids (0: none yet), and what the swapper watches for.
#[derive(Debug, Default)]
struct Board {
    names: Mutex<Vec<String>>,
    /// The version of the latest answer, on any connection.
    last: AtomicU8,
    /// The version serving before a pending swap; 0 when no swap is pending.
    armed: AtomicU8,
    /// `(receive time << 8) | version` of the first answer by another version while armed.
    first_new: AtomicU64,
}

impl Board {
    fn intern(&self, name: &str) -> u8 {
        let mut names = self.names.lock().expect("version names");
        if let Some(i) = names.iter().position(|n| n == name) {
            return (i + 1) as u8;
        }
        if names.len() >= 254 {
            return 255;
        }
        names.push(name.to_string());
        names.len() as u8
    }

    fn name(&self, id: u8) -> Option<String> {
        if id == 0 {
            return None;
        }
        let names = self.names.lock().expect("version names");
        Some(
            names
                .get(id as usize - 1)
                .cloned()
                .unwrap_or_else(|| "(another)".into()),
        )
    }

    /// A connection received an answer by version `id` at `now`.
    #[inline]
    fn answered(&self, id: u8, now: u64) {
        if self.last.load(Ordering::Relaxed) != id {
            self.last.store(id, Ordering::Relaxed);
        }
        let armed = self.armed.load(Ordering::Acquire);
        if armed != 0 && armed != id && self.first_new.load(Ordering::Relaxed) == 0 {
            let _ = self.first_new.compare_exchange(
                0,
                (now << 8) | id as u64,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }
}

/// What one connection sent and received, per request (indexed by its number).
#[derive(Debug, Default)]
struct ConnOut {
    sent_at: Vec<u64>,
    /// Receive time of the request's (first) answer; 0 when none came.
    answered_at: Vec<u64>,
    /// The version that answered ([`Board`] id; 0 when none).
    version: Vec<u8>,
    state: Vec<u8>,
    unattributed_errors: u64,
    closed: Option<String>,
    /// `sys.error` codes for requests sent in the measured window.
    codes: ErrorCounts,
}

/// One swap: what was written, and what the host showed of it.
#[derive(Debug, Clone)]
struct SwapEvent {
    /// Index into `--swap-files` of the build written.
    file: usize,
    /// The write began (temporary file), and the rename returned.
    start: u64,
    written: u64,
    /// The rename returned, in ms since the Unix epoch (to line up with the host's log).
    written_unix_ms: u128,
    /// The version answering before the swap.
    old: u8,
    /// `/healthz`'s version for the plugin before the write, and the new one it reported.
    health_before: Option<String>,
    health_after: Option<String>,
    /// When `/healthz` first reported a new version.
    health_at: Option<u64>,
    /// The first answer by another version: receive time and version.
    first_new: Option<(u64, u8)>,
    /// `plugins.<id>` of `/healthz` once the swap was resolved.
    health_entry: Option<Value>,
    error: Option<String>,
}

impl SwapEvent {
    fn taken(&self) -> bool {
        self.error.is_none() && (self.health_at.is_some() || self.first_new.is_some())
    }

    /// The moment the new version took over: its first answer, else `/healthz`'s report.
    fn switch(&self) -> Option<u64> {
        self.first_new.map(|(t, _)| t).or(self.health_at)
    }
}

/// The swaps made, and why swapping stopped early (if it did).
#[derive(Debug, Default)]
struct SwapLog {
    events: Vec<SwapEvent>,
    stopped: Option<String>,
    health_errors: ErrorCounts,
}

pub async fn run(a: &HotswapArgs, threads: usize) -> anyhow::Result<Report> {
    let c = &a.common;
    if c.dialect != Dialect::Plexus {
        anyhow::bail!("hotswap drives a Plexus route: use --dialect plexus");
    }
    // Read the builds now, so that a missing one fails before any traffic.
    let mut files = Vec::new();
    for f in &a.swap_files {
        files.push(std::fs::read(f).map_err(|e| anyhow::anyhow!("reading {}: {e}", f.display()))?);
    }
    if files.len() < 2 {
        anyhow::bail!("--swap-files needs at least two builds that answer differently");
    }
    for i in 0..files.len() {
        if files[i] == files[(i + 1) % files.len()] {
            anyhow::bail!(
                "{} and the build after it are the same bytes: a swap between them changes nothing",
                a.swap_files[i].display()
            );
        }
    }
    let served = std::fs::read(&a.swap_target)
        .map_err(|e| anyhow::anyhow!("reading {}: {e}", a.swap_target.display()))?;
    let serving = files.iter().position(|f| *f == served).ok_or_else(|| {
        anyhow::anyhow!(
            "{} holds none of the --swap-files builds: copy one there before starting the host",
            a.swap_target.display()
        )
    })?;

    let mut target = Target::new(c, false, a.connections)?;
    target.echo_type = a.answer_type.clone();
    let target = Arc::new(target);
    let mut report = Report::new("hotswap", c, target.url(), "message");
    report.param("connections", a.connections);
    report.param("in_flight", a.in_flight);
    report.param("size", a.size);
    report.param("plugin", a.plugin.as_str());
    report.param("swap_every_ms", a.swap_every_ms);
    report.param("swap_deadline_ms", a.swap_deadline_ms);
    report.param("spike_window_ms", a.spike_window_ms);
    report.param(
        "swap_files",
        a.swap_files
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>(),
    );

    let mut health = Healthz::new(target.addr, &target.host);
    let health_start = health.plugin_version(&a.plugin).await;
    match &health_start {
        Ok(Some(_)) => {}
        Ok(None) => count_error(
            &mut report.errors,
            format!(
                "/healthz lists no plugin {:?}: swaps are seen by answers only",
                a.plugin
            ),
        ),
        Err(e) => count_error(
            &mut report.errors,
            format!("{e}: swaps are seen by answers only"),
        ),
    }
    let watch_health = matches!(health_start, Ok(Some(_)));

    let board = Arc::new(Board::default());
    let (k, size, ty) = (
        a.in_flight.max(1),
        a.size,
        Arc::<str>::from(a.answer_type.as_str()),
    );
    let timeout = a.answer_timeout_ms.max(1) * 1_000_000;
    let b = board.clone();
    let mut fleet = Fleet::spawn(
        target.clone(),
        a.connections,
        c.connect_concurrency,
        None,
        None,
        move |_, ws, tl| conn(ws, tl, k, size, timeout, ty.clone(), b.clone()),
    );
    let setup = fleet.wait_ready().await;
    record_setup(&mut report, &setup);
    require_connections(&setup)?;

    report.server_memory_before = server_memory(c.server_pid);
    let tl = Timeline::new(LEAD, c.warmup(), c.duration(), c.drain());
    fleet.start(tl);
    let swapper = Swapper {
        files,
        target: a.swap_target.clone(),
        plugin: a.plugin.clone(),
        every: a.swap_every_ms.max(1) * 1_000_000,
        deadline: a.swap_deadline_ms.max(1) * 1_000_000,
        poll: Duration::from_millis(a.poll_ms.max(1)),
        watch_health,
    };
    let swaps_task = {
        let board = board.clone();
        tokio::spawn(async move { swapper.run(tl, serving, health, &board).await })
    };
    tokio::time::sleep_until(Timeline::at(tl.measure_start)).await;
    let m0 = CpuMark::take(c.server_pid);
    tokio::time::sleep_until(Timeline::at(tl.measure_end)).await;
    let m1 = CpuMark::take(c.server_pid);
    report.server_memory_after = server_memory(c.server_pid);
    let log = swaps_task.await.unwrap_or_default();

    let mut outs = Vec::new();
    let mut disconnects = 0;
    report.count("closed_before_run", fleet.early_closes());
    for r in fleet.join().await {
        let Ok(mut o) = r else { continue };
        if let Some(e) = o.closed.take() {
            disconnects += 1;
            count_error(&mut report.errors, e);
        }
        for (e, n) in std::mem::take(&mut o.codes) {
            *report.errors.entry(format!("sys.error {e}")).or_default() += n;
        }
        outs.push(o);
    }
    report.count("disconnects", disconnects);
    for (e, n) in &log.health_errors {
        *report.errors.entry(e.clone()).or_default() += n;
    }
    let spike = Spans {
        half: a.spike_window_ms * 1_000_000 / 2,
    };
    let acked = analyse(&mut report, &tl, &log, &board, &outs, spike);
    report.window(acked, &m0, &m1, threads);
    if let Some(s) = &log.stopped {
        report.extra.insert("stopped".into(), json!(s));
    }
    Ok(report)
}

/// Writes the builds in turn and reads from the host when each swap was taken.
#[derive(Debug)]
struct Swapper {
    files: Vec<Vec<u8>>,
    target: PathBuf,
    plugin: String,
    every: u64,
    deadline: u64,
    poll: Duration,
    watch_health: bool,
}

impl Swapper {
    /// Swap N is due `N × every` after the measured window starts, and no sooner than the
    /// previous swap was resolved; a swap starts only while a whole period is left in the window.
    async fn run(
        &self,
        tl: Timeline,
        mut serving: usize,
        mut health: Healthz,
        board: &Board,
    ) -> SwapLog {
        let mut log = SwapLog::default();
        let mut watch_health = self.watch_health;
        let mut not_before = 0;
        for i in 1u64.. {
            let at = (tl.measure_start + i * self.every).max(not_before);
            if at + self.every > tl.measure_end {
                break;
            }
            tokio::time::sleep_until(Timeline::at(at)).await;
            let old = board.last.load(Ordering::Acquire);
            if old == 0 {
                log.stopped = Some(format!("no answer came before swap {i}"));
                break;
            }
            let health_before = if watch_health {
                match health.plugin_version(&self.plugin).await {
                    Ok(v) => v,
                    Err(e) => {
                        count_error(&mut log.health_errors, e);
                        watch_health = false;
                        None
                    }
                }
            } else {
                None
            };
            let watch = watch_health && health_before.is_some();
            board.first_new.store(0, Ordering::Release);
            board.armed.store(old, Ordering::Release);
            let next = (serving + 1) % self.files.len();
            let start = now_ns();
            let (target, bytes) = (self.target.clone(), self.files[next].clone());
            let wrote = tokio::task::spawn_blocking(move || atomic_write(&target, &bytes))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| format!("writing the plugin: {e}")));
            let written = now_ns();
            let written_unix_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            let mut ev = SwapEvent {
                file: next,
                start,
                written,
                written_unix_ms,
                old,
                health_before: health_before.clone(),
                health_after: None,
                health_at: None,
                first_new: None,
                health_entry: None,
                error: wrote.err(),
            };
            if ev.error.is_none() {
                let until = written + self.deadline;
                loop {
                    if ev.first_new.is_none() {
                        let f = board.first_new.load(Ordering::Acquire);
                        if f != 0 {
                            ev.first_new = Some((f >> 8, (f & 0xff) as u8));
                        }
                    }
                    if watch && ev.health_at.is_none() {
                        match health.plugin_version(&self.plugin).await {
                            Ok(Some(v)) if Some(&v) != health_before.as_ref() => {
                                ev.health_at = Some(now_ns());
                                ev.health_after = Some(v);
                            }
                            Ok(_) => {}
                            Err(e) => count_error(&mut log.health_errors, e),
                        }
                    }
                    if ev.first_new.is_some() && (ev.health_at.is_some() || !watch) {
                        break;
                    }
                    if now_ns() >= until {
                        break;
                    }
                    tokio::time::sleep(self.poll).await;
                }
            }
            board.armed.store(0, Ordering::Release);
            if watch_health {
                ev.health_entry = health
                    .get()
                    .await
                    .ok()
                    .and_then(|h| h.get("plugins")?.get(&self.plugin).cloned());
            }
            let taken = ev.taken();
            let error = ev.error.clone();
            log.events.push(ev);
            if let Some(e) = error {
                log.stopped = Some(format!("swap {i}: {e}; later swaps skipped"));
                break;
            }
            if !taken {
                log.stopped = Some(format!(
                    "swap {i} was not taken within {} ms; later swaps skipped",
                    self.deadline / 1_000_000
                ));
                break;
            }
            serving = next;
            not_before = now_ns();
        }
        log
    }
}

/// Writes `bytes` next to `target` and renames it over `target`, so that a watcher never sees
/// half a file.
fn atomic_write(target: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "plugin.wasm".into());
    let tmp = target.with_file_name(format!(".{name}.swap-{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, target)
}

/// The spans the latency analysis uses, in ns.
#[derive(Debug, Clone, Copy)]
struct Spans {
    /// Half the spike window, centred on a swap's switch.
    half: u64,
}

/// One request sent in the measured window.
#[derive(Debug, Clone, Copy)]
struct Sent {
    at: u64,
    answered_at: u64,
    version: u8,
    state: u8,
}

/// What happened around one swap, counted over the requests sent from its write to the next.
#[derive(Debug, Default)]
struct PerSwap {
    sent: u64,
    old: u64,
    new: u64,
    old_after_new: u64,
    lost: u64,
    dup: u64,
    failed: u64,
    /// The latest answer by the old version after the write (any request).
    last_old: Option<u64>,
}

/// Fills the counts, the per-swap table and the latency figures; returns the requests sent in
/// the measured window that were acknowledged.
fn analyse(
    report: &mut Report,
    tl: &Timeline,
    log: &SwapLog,
    board: &Board,
    outs: &[ConnOut],
    spans: Spans,
) -> u64 {
    let mut sent = Vec::new();
    let mut warmup_sent = 0u64;
    let mut unattributed = 0u64;
    for o in outs {
        unattributed += o.unattributed_errors;
        for (i, &at) in o.sent_at.iter().enumerate() {
            if at < tl.measure_start {
                warmup_sent += 1;
            } else if at < tl.measure_end {
                sent.push(Sent {
                    at,
                    answered_at: o.answered_at[i],
                    version: o.version[i],
                    state: o.state[i],
                });
            }
        }
    }
    let swaps = &log.events;
    // Disturbed spans: from a swap's write to half a spike window after its switch; after a
    // swap that was not taken, nothing is steady any more.
    let disturbed: Vec<(u64, u64)> = swaps
        .iter()
        .map(|s| {
            let end = match s.switch() {
                Some(t) => t + spans.half,
                None if s.error.is_some() => s.written + spans.half,
                None => u64::MAX,
            };
            (s.start, end)
        })
        .collect();
    let spike_of: Vec<Option<(u64, u64)>> = swaps
        .iter()
        .map(|s| {
            s.switch()
                .map(|t| (t.saturating_sub(spans.half), t + spans.half))
        })
        .collect();
    let starts: Vec<u64> = swaps.iter().map(|s| s.start).collect();

    let mut all = new_histogram();
    let mut steady = new_histogram();
    let mut around = new_histogram();
    let mut spike: Vec<Histogram<u64>> = swaps.iter().map(|_| new_histogram()).collect();
    let mut during: Vec<Histogram<u64>> = swaps.iter().map(|_| new_histogram()).collect();
    let mut per: Vec<PerSwap> = swaps.iter().map(|_| PerSwap::default()).collect();
    let mut by_version: Vec<u64> = vec![0; 256];
    let (mut answered, mut acked, mut failed, mut lost, mut dup) = (0u64, 0u64, 0u64, 0u64, 0u64);
    let (mut unacked, mut ack_without_answer, mut timed_out, mut late) = (0u64, 0u64, 0u64, 0u64);
    let mut before_first = 0u64;
    for m in &sent {
        let st = m.state;
        let has_answer = st & ANSWER != 0;
        answered += has_answer as u64;
        acked += (st & ACK != 0) as u64;
        failed += (st & ERR != 0) as u64;
        dup += (st & DUP != 0) as u64;
        timed_out += (st & TIMEOUT != 0) as u64;
        late += (st & LATE != 0) as u64;
        let terminal = st & (ACK | ERR) != 0;
        let is_lost = !has_answer && !terminal;
        lost += is_lost as u64;
        unacked += (has_answer && !terminal) as u64;
        ack_without_answer += (!has_answer && st & ACK != 0) as u64;
        by_version[m.version as usize] += has_answer as u64;
        // The swap whose write came last before this request was sent.
        let seg = starts.partition_point(|&s| s <= m.at);
        if seg == 0 {
            before_first += 1;
        } else {
            let (s, p) = (&swaps[seg - 1], &mut per[seg - 1]);
            p.sent += 1;
            p.lost += is_lost as u64;
            p.dup += (st & DUP != 0) as u64;
            p.failed += (st & ERR != 0) as u64;
            if has_answer {
                if m.version == s.old {
                    p.old += 1;
                    if s.first_new.is_some_and(|(t, _)| m.at > t) {
                        p.old_after_new += 1;
                    }
                } else {
                    p.new += 1;
                }
            }
        }
        if !has_answer {
            continue;
        }
        let t = m.answered_at;
        let lat = t.saturating_sub(m.at).max(1);
        all.saturating_record(lat);
        let mut steady_sample = true;
        for (i, &(a, b)) in disturbed.iter().enumerate() {
            if t >= a && t <= b {
                steady_sample = false;
                during[i].saturating_record(lat);
            }
        }
        if steady_sample {
            steady.saturating_record(lat);
        }
        for (i, w) in spike_of.iter().enumerate() {
            if let Some((a, b)) = *w
                && t >= a
                && t <= b
            {
                spike[i].saturating_record(lat);
                around.saturating_record(lat);
            }
        }
        for (i, s) in swaps.iter().enumerate() {
            let next = starts.get(i + 1).copied().unwrap_or(u64::MAX);
            if m.version == s.old && t >= s.start && t < next {
                let l = &mut per[i].last_old;
                *l = Some(l.map_or(t, |x: u64| x.max(t)));
            }
        }
    }

    report.count("sent", sent.len() as u64);
    report.count("warmup_sent", warmup_sent);
    report.count("sent_before_first_swap", before_first);
    report.count("answered", answered);
    report.count("acked", acked);
    report.count("failed", failed);
    report.count("lost", lost);
    report.count("duplicated", dup);
    report.count("answered_unacked", unacked);
    report.count("ack_without_answer", ack_without_answer);
    report.count("timed_out", timed_out);
    report.count("late_answers", late);
    report.count("unattributed_errors", unattributed);
    report.count("swaps", swaps.len() as u64);
    report.count(
        "swaps_taken",
        swaps.iter().filter(|s| s.taken()).count() as u64,
    );
    report.count(
        "swaps_not_taken",
        swaps.iter().filter(|s| !s.taken()).count() as u64,
    );
    report.count(
        "old_after_new",
        per.iter().map(|p| p.old_after_new).sum::<u64>(),
    );
    if swaps.is_empty() && log.stopped.is_none() {
        count_error(
            &mut report.errors,
            "no swap happened: make --duration at least twice --swap-every-ms",
        );
    }
    let mut versions = Map::new();
    for (id, &n) in by_version.iter().enumerate() {
        if n > 0 {
            let name = board.name(id as u8).unwrap_or_else(|| "?".into());
            versions.insert(name, json!(n));
        }
    }
    report
        .extra
        .insert("answers_by_version".into(), Value::Object(versions));

    let ms = |ns: u64| (ns as f64 / 1e4).round() / 100.0;
    let us = |h: &Histogram<u64>, p: f64| {
        (!h.is_empty()).then(|| (h.value_at_percentile(p) as f64 / 100.0).round() / 10.0)
    };
    let mut table = Table::new(&[
        "swap",
        "at_s",
        "from",
        "to",
        "taken",
        "healthz_ms",
        "first_new_ms",
        "last_old_ms",
        "sent",
        "old",
        "new",
        "old_after_new",
        "lost",
        "dup",
        "failed",
        "spike_p99_us",
        "spike_max_us",
        "during_p99_us",
    ]);
    let mut health_entries = Vec::new();
    for (i, s) in swaps.iter().enumerate() {
        let p = &per[i];
        let after = |t: Option<u64>| t.map(|t| ms(t.saturating_sub(s.written)));
        table.row(vec![
            json!(i + 1),
            json!((s.start.saturating_sub(tl.measure_start) as f64 / 1e6).round() / 1000.0),
            json!(board.name(s.old)),
            json!(s.first_new.and_then(|(_, v)| board.name(v))),
            json!(if s.taken() { "yes" } else { "no" }),
            json!(after(s.health_at)),
            json!(after(s.first_new.map(|(t, _)| t))),
            json!(after(p.last_old)),
            json!(p.sent),
            json!(p.old),
            json!(p.new),
            json!(p.old_after_new),
            json!(p.lost),
            json!(p.dup),
            json!(p.failed),
            json!(us(&spike[i], 99.0)),
            json!(us(&spike[i], 100.0)),
            json!(us(&during[i], 99.0)),
        ]);
        health_entries.push(json!({
            "swap": i + 1,
            "file": s.file,
            "write_ms": ms(s.written - s.start),
            "written_unix_ms": s.written_unix_ms,
            "healthz_before": s.health_before,
            "healthz_after": s.health_after,
            "plugin": s.health_entry,
            "error": s.error,
        }));
    }
    report.table("swaps", table);
    report
        .extra
        .insert("swap_detail".into(), Value::Array(health_entries));

    report.latency = Latency::from_ns(&all);
    let steady_p99 = us(&steady, 99.0);
    report
        .extra
        .insert("steady_state".into(), json!(Latency::from_ns(&steady)));
    report
        .extra
        .insert("around_swaps".into(), json!(Latency::from_ns(&around)));
    let mut p99s: Vec<f64> = spike.iter().filter_map(|h| us(h, 99.0)).collect();
    p99s.sort_by(f64::total_cmp);
    if let (Some(base), Some(&worst)) = (steady_p99, p99s.last()) {
        let median = median(&p99s);
        report.extra.insert(
            "spike".into(),
            json!(format!(
                "p99 of the answers in the {} ms around a swap: median {median:.0} µs, worst \
                 {worst:.0} µs over {} swaps, against a steady-state p99 of {base:.0} µs \
                 ({:.1}x, worst {:.1}x)",
                spans.half * 2 / 1_000_000,
                p99s.len(),
                median / base,
                worst / base
            )),
        );
    }
    let lat: Vec<f64> = swaps
        .iter()
        .filter_map(|s| s.first_new.map(|(t, _)| ms(t.saturating_sub(s.written))))
        .collect();
    if !lat.is_empty() {
        let mut sorted = lat;
        sorted.sort_by(f64::total_cmp);
        report.extra.insert(
            "swap_latency".into(),
            json!(format!(
                "artifact written to first answer by the new version: median {:.1} ms, \
                 min {:.1}, max {:.1} over {} swaps",
                median(&sorted),
                sorted[0],
                sorted[sorted.len() - 1],
                sorted.len()
            )),
        );
    }
    acked
}

/// The median of sorted, non-empty values.
fn median(sorted: &[f64]) -> f64 {
    let n = sorted.len();
    if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// One connection: keeps `k` numbered requests in flight and records, per request, when it was
/// sent, when and by which version it was answered, and its ack or error.
async fn conn(
    mut ws: Ws,
    tl: Timeline,
    k: usize,
    size: usize,
    timeout: u64,
    ty: Arc<str>,
    board: Arc<Board>,
) -> ConnOut {
    let mut o = ConnOut::default();
    // The versions this connection has seen, with their ids (a handful at most).
    let mut seen: Vec<(Box<str>, u8)> = Vec::new();
    let mut outstanding: Vec<usize> = Vec::with_capacity(k);
    tokio::time::sleep_until(Timeline::at(tl.start)).await;
    for _ in 0..k {
        if let Err(e) = send_next(&mut ws, &ty, size, &mut o).await {
            o.closed = Some(e);
            return o;
        }
        outstanding.push(o.state.len() - 1);
    }
    if let Err(e) = ws.flush().await {
        o.closed = Some(e.to_string());
        return o;
    }
    let deadline = tokio::time::sleep_until(Timeline::at(tl.drain_end));
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let msg = tokio::select! {
            biased;
            m = ws.next() => Some(m),
            _ = &mut deadline => break,
            _ = tick.tick() => None,
        };
        let now = now_ns();
        // Requests completed by this frame (or timed out at this tick).
        let mut completed = 0usize;
        match msg {
            None => {
                let mut i = 0;
                while i < outstanding.len() {
                    let seq = outstanding[i];
                    if now.saturating_sub(o.sent_at[seq]) >= timeout {
                        o.state[seq] |= TIMEOUT;
                        outstanding.swap_remove(i);
                        completed += 1;
                    } else {
                        i += 1;
                    }
                }
            }
            Some(m) => {
                let text = match m {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(f))) => {
                        o.closed = Some(format!(
                            "closed by the server ({})",
                            f.map(|f| f.code.to_string()).unwrap_or_default()
                        ));
                        break;
                    }
                    None => {
                        o.closed = Some("connection ended".into());
                        break;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        o.closed = Some(e.to_string());
                        break;
                    }
                };
                let mut terminal: Option<usize> = None;
                match proto::classify(Dialect::Plexus, &text, &ty) {
                    Kind::Echo => {
                        if let Some((seq, v)) = proto::numbered_answer(&text)
                            && (seq as usize) < o.state.len()
                        {
                            let seq = seq as usize;
                            let id = match seen.iter().find(|(n, _)| &**n == v) {
                                Some(&(_, id)) => id,
                                None => {
                                    let id = board.intern(v);
                                    seen.push((v.into(), id));
                                    id
                                }
                            };
                            board.answered(id, now);
                            if o.state[seq] & ANSWER != 0 {
                                o.state[seq] |= DUP;
                            } else {
                                o.state[seq] |= ANSWER;
                                o.answered_at[seq] = now;
                                o.version[seq] = id;
                            }
                        }
                    }
                    Kind::Ack(Some(r)) => {
                        if let Some(seq) = r.strip_prefix('e').and_then(|n| n.parse::<usize>().ok())
                            && seq < o.state.len()
                        {
                            let s = &mut o.state[seq];
                            if *s & (ACK | ERR) != 0 {
                                *s |= DUP;
                            } else {
                                *s |= ACK;
                                terminal = Some(seq);
                            }
                        }
                    }
                    Kind::Error { r#ref, code } => {
                        match r#ref
                            .and_then(|r| r.strip_prefix('e'))
                            .and_then(|n| n.parse::<usize>().ok())
                        {
                            Some(seq) if seq < o.state.len() => {
                                if tl.measuring(o.sent_at[seq]) {
                                    count_error(&mut o.codes, code.unwrap_or("?"));
                                }
                                let s = &mut o.state[seq];
                                if *s & (ACK | ERR) != 0 {
                                    *s |= DUP;
                                } else {
                                    *s |= ERR;
                                    terminal = Some(seq);
                                }
                            }
                            _ => {
                                count_error(&mut o.codes, code.unwrap_or("?"));
                                o.unattributed_errors += 1;
                            }
                        }
                    }
                    _ => {}
                }
                if let Some(seq) = terminal {
                    if o.state[seq] & TIMEOUT != 0 {
                        o.state[seq] |= LATE;
                    } else if let Some(i) = outstanding.iter().position(|&x| x == seq) {
                        outstanding.swap_remove(i);
                        completed += 1;
                    }
                }
            }
        }
        if completed > 0 {
            if tl.sending(now) {
                for _ in 0..completed {
                    if let Err(e) = send_next(&mut ws, &ty, size, &mut o).await {
                        o.closed = Some(e);
                        break;
                    }
                    outstanding.push(o.state.len() - 1);
                }
                if o.closed.is_some() {
                    break;
                }
                if let Err(e) = ws.flush().await {
                    o.closed = Some(e.to_string());
                    break;
                }
            } else if outstanding.is_empty() {
                break;
            }
        }
    }
    let _ = ws.close(None).await;
    o
}

/// Queues the next request (flushed by the caller).
async fn send_next(ws: &mut Ws, ty: &str, size: usize, o: &mut ConnOut) -> Result<(), String> {
    let seq = o.state.len() as u64;
    let now = now_ns();
    feed_text(ws, proto::plexus_numbered(ty, seq, size)).await?;
    o.state.push(0);
    o.sent_at.push(now);
    o.answered_at.push(0);
    o.version.push(0);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_answer_by_another_version_is_caught_once() {
        let b = Board::default();
        let a = b.intern("a");
        let v = b.intern("b");
        assert_eq!((a, v, b.intern("a")), (1, 2, 1));
        b.answered(a, 10);
        assert_eq!(b.first_new.load(Ordering::Relaxed), 0, "nothing armed");
        b.armed.store(a, Ordering::Relaxed);
        b.answered(a, 20);
        assert_eq!(b.first_new.load(Ordering::Relaxed), 0, "the old version");
        b.answered(v, 30);
        b.answered(v, 40);
        assert_eq!(b.first_new.load(Ordering::Relaxed), (30 << 8) | 2);
        assert_eq!(b.last.load(Ordering::Relaxed), v);
        assert_eq!(b.name(v).as_deref(), Some("b"));
    }

    #[test]
    fn atomic_write_replaces_the_target() {
        let dir = std::env::temp_dir().join(format!("plexus-bench-aw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let t = dir.join("p.wasm");
        atomic_write(&t, b"one").unwrap();
        atomic_write(&t, b"two").unwrap();
        assert_eq!(std::fs::read(&t).unwrap(), b"two");
        assert_eq!(
            std::fs::read_dir(&dir).unwrap().count(),
            1,
            "no temporary file left"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
