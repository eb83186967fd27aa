//! `hotswap`: echo traffic through a Plexus route while the plugin behind it is replaced every
//! few seconds. Every request carries a `messageId` (`e<seq>`), so each one is accounted for:
//! answered (echo, then `sys.ack`), failed (`sys.error` naming it), duplicated, or lost (neither
//! by the end of the drain). Latency is compared between windows around the swaps and the rest.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::args::{Dialect, HotswapArgs};
use crate::conn::{ErrorCounts, Fleet, Target, Ws, count_error, feed_text, send_text};
use crate::proc_stats::CpuMark;
use crate::proto::{self, Kind};
use crate::recorder::{Shared, new_histogram};
use crate::report::{Latency, Report};
use crate::scenarios::{LEAD, record_setup, require_connections, server_memory};
use crate::timeline::{Timeline, now_ns};

const ECHO: u8 = 1;
const ACK: u8 = 2;
const ERR: u8 = 4;
const TIMEOUT: u8 = 8;

#[derive(Debug, Default)]
struct ConnStats {
    sent: u64,
    completed_in_window: u64,
    echoes: u64,
    acks: u64,
    failed: u64,
    lost: u64,
    echoed_unacked: u64,
    ack_without_echo: u64,
    dup_echo: u64,
    dup_ack: u64,
    unattributed_errors: u64,
    timeouts: u64,
    late: u64,
    closed: Option<String>,
    codes: ErrorCounts,
    /// (receive time, latency) of echoes received in the measured window, in ns.
    samples: Vec<(u64, u64)>,
}

#[derive(Debug, Clone)]
struct SwapEvent {
    start: u64,
    end: u64,
    ok: bool,
    detail: String,
}

pub async fn run(a: &HotswapArgs, threads: usize) -> anyhow::Result<Report> {
    let c = &a.common;
    if c.dialect != Dialect::Plexus {
        anyhow::bail!("hotswap drives a Plexus route: use --dialect plexus");
    }
    if a.swap_cmd.is_none() && a.swap_files.is_empty() {
        anyhow::bail!("give --swap-cmd or --swap-files with --swap-target");
    }
    let mut target = Target::new(c, false, a.connections)?;
    target.echo_type = a.echo_type.clone();
    let target = Arc::new(target);
    let mut report = Report::new("hotswap", c, target.url(), "message");
    report.param("connections", a.connections);
    report.param("in_flight", a.in_flight);
    report.param("size", a.size);
    report.param("swap_every_ms", a.swap_every_ms);
    report.param("swap_window_ms", a.swap_window_ms);
    if let Some(cmd) = &a.swap_cmd {
        report.param("swap_cmd", cmd.as_str());
    } else {
        let files: Vec<String> = a
            .swap_files
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        report.param("swap_files", files);
    }

    // Read the plugin files now, so that a missing one fails before any traffic.
    let swap = Arc::new(Swapper::new(a)?);

    let hist = Arc::new(Shared::default());
    let (k, size, echo_type) = (
        a.in_flight.max(1),
        a.size,
        Arc::<str>::from(a.echo_type.as_str()),
    );
    let timeout = a.answer_timeout_ms.max(1) * 1_000_000;
    let h = hist.clone();
    let mut fleet = Fleet::spawn(
        target.clone(),
        a.connections,
        c.connect_concurrency,
        None,
        None,
        move |_, ws, tl| hotswap_conn(ws, tl, k, size, timeout, echo_type.clone(), h.clone()),
    );
    let setup = fleet.wait_ready().await;
    record_setup(&mut report, &setup);
    require_connections(&setup)?;

    report.server_memory_before = server_memory(c.server_pid);
    let tl = Timeline::new(LEAD, c.warmup(), c.duration(), c.drain());
    fleet.start(tl);
    let swaps_task = {
        let swap = swap.clone();
        let (every, window) = (a.swap_every_ms * 1_000_000, a.swap_window_ms * 1_000_000);
        tokio::spawn(async move { swap.run(tl, every.max(1), window).await })
    };
    tokio::time::sleep_until(Timeline::at(tl.measure_start)).await;
    let m0 = CpuMark::take(c.server_pid);
    tokio::time::sleep_until(Timeline::at(tl.measure_end)).await;
    let m1 = CpuMark::take(c.server_pid);
    report.server_memory_after = server_memory(c.server_pid);
    let swaps = swaps_task.await.unwrap_or_default();

    let mut t = ConnStats::default();
    let mut disconnects = 0;
    let mut samples = Vec::new();
    report.count("closed_before_run", fleet.early_closes());
    for r in fleet.join().await {
        let Ok(s) = r else { continue };
        t.sent += s.sent;
        t.completed_in_window += s.completed_in_window;
        t.echoes += s.echoes;
        t.acks += s.acks;
        t.failed += s.failed;
        t.lost += s.lost;
        t.echoed_unacked += s.echoed_unacked;
        t.ack_without_echo += s.ack_without_echo;
        t.dup_echo += s.dup_echo;
        t.dup_ack += s.dup_ack;
        t.unattributed_errors += s.unattributed_errors;
        t.timeouts += s.timeouts;
        t.late += s.late;
        if let Some(e) = s.closed {
            disconnects += 1;
            count_error(&mut report.errors, e);
        }
        for (e, n) in s.codes {
            *report.errors.entry(format!("sys.error {e}")).or_default() += n;
        }
        samples.extend(s.samples);
    }
    report.window(t.completed_in_window, &m0, &m1, threads);
    report.measured_secs = tl.measured_secs();
    report.throughput_per_sec = t.completed_in_window as f64 / tl.measured_secs();
    report.latency = Latency::from_ns(&hist.snapshot());
    report.count("sent", t.sent);
    report.count("echoes", t.echoes);
    report.count("acks", t.acks);
    report.count("failed", t.failed);
    report.count("lost", t.lost);
    report.count("duplicated", t.dup_echo + t.dup_ack);
    report.count("duplicated_echoes", t.dup_echo);
    report.count("duplicated_acks", t.dup_ack);
    report.count("echoed_unacked", t.echoed_unacked);
    report.count("ack_without_echo", t.ack_without_echo);
    report.count("unattributed_errors", t.unattributed_errors);
    report.count("timed_out", t.timeouts);
    report.count("late_answers", t.late);
    report.count("disconnects", disconnects);
    report.count("swaps", swaps.len() as u64);
    report.count(
        "swaps_failed",
        swaps.iter().filter(|s| !s.ok).count() as u64,
    );
    if swaps.is_empty() {
        count_error(
            &mut report.errors,
            "no swap happened: make --duration longer than --swap-every-ms + --swap-window-ms",
        );
    }
    analyse(
        &mut report,
        &tl,
        &swaps,
        samples,
        a.swap_window_ms * 1_000_000,
    );
    Ok(report)
}

/// Splits the samples into "around a swap" and baseline, and describes each swap.
fn analyse(
    report: &mut Report,
    tl: &Timeline,
    swaps: &[SwapEvent],
    mut samples: Vec<(u64, u64)>,
    window: u64,
) {
    samples.sort_unstable();
    let in_window = |t: u64| {
        swaps
            .iter()
            .position(|s| t >= s.start && t <= s.end + window)
    };
    let mut baseline = new_histogram();
    let mut around = new_histogram();
    let mut per_swap: Vec<Histogram<u64>> = swaps.iter().map(|_| new_histogram()).collect();
    // Longest time without any answer, inside swap windows and outside.
    let mut gap_base = 0u64;
    let mut gap_swap: Vec<u64> = vec![0; swaps.len()];
    let mut prev: Option<u64> = None;
    for &(t, lat) in &samples {
        let w = in_window(t);
        match w {
            Some(i) => {
                around.saturating_record(lat.max(1));
                per_swap[i].saturating_record(lat.max(1));
            }
            None => baseline.saturating_record(lat.max(1)),
        }
        if let Some(p) = prev {
            let gap = t - p;
            match w.or_else(|| in_window(p)) {
                Some(i) => gap_swap[i] = gap_swap[i].max(gap),
                None => gap_base = gap_base.max(gap),
            }
        }
        prev = Some(t);
    }
    let ms = |ns: u64| (ns as f64 / 1e4).round() / 100.0;
    let list: Vec<_> = swaps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let h = &per_swap[i];
            json!({
                "at_secs": ((s.start.saturating_sub(tl.measure_start)) as f64 / 1e6).round() / 1000.0,
                "action_ms": ms(s.end - s.start),
                "ok": s.ok,
                "detail": s.detail,
                "answers": h.len(),
                "p99_us": if h.is_empty() { 0.0 } else { h.value_at_percentile(99.0) as f64 / 1000.0 },
                "p999_us": if h.is_empty() { 0.0 } else { h.value_at_percentile(99.9) as f64 / 1000.0 },
                "max_us": h.max() as f64 / 1000.0,
                "longest_gap_ms": ms(gap_swap[i]),
            })
        })
        .collect();
    report.extra.insert("swaps".into(), json!(list));
    report
        .extra
        .insert("baseline".into(), json!(Latency::from_ns(&baseline)));
    report
        .extra
        .insert("around_swaps".into(), json!(Latency::from_ns(&around)));
    report
        .extra
        .insert("longest_gap_baseline_ms".into(), json!(ms(gap_base)));
    report.extra.insert(
        "longest_gap_around_swaps_ms".into(),
        json!(ms(gap_swap.iter().copied().max().unwrap_or(0))),
    );
    if let (Some(b), Some(s)) = (Latency::from_ns(&baseline), Latency::from_ns(&around)) {
        report.extra.insert(
            "spike".into(),
            json!(format!(
                "around swaps p99.9 {:.0} µs, max {:.0} µs; baseline p99.9 {:.0} µs, max {:.0} µs",
                s.p999_us, s.max_us, b.p999_us, b.max_us
            )),
        );
    }
}

/// Replaces the plugin: a shell command, or a file copied onto the target with a rename.
#[derive(Debug)]
struct Swapper {
    cmd: Option<String>,
    files: Vec<Vec<u8>>,
    target: Option<PathBuf>,
    log: Mutex<Vec<SwapEvent>>,
}

impl Swapper {
    fn new(a: &HotswapArgs) -> anyhow::Result<Self> {
        let mut files = Vec::new();
        for f in &a.swap_files {
            files.push(
                std::fs::read(f).map_err(|e| anyhow::anyhow!("reading {}: {e}", f.display()))?,
            );
        }
        Ok(Swapper {
            cmd: a.swap_cmd.clone(),
            files,
            target: a.swap_target.clone(),
            log: Mutex::new(Vec::new()),
        })
    }

    /// Swaps every `every` ns from the start of the window, while the swap's window still ends
    /// inside the measured window.
    async fn run(&self, tl: Timeline, every: u64, window: u64) -> Vec<SwapEvent> {
        let mut i = 1u64;
        loop {
            let at = tl.measure_start + i * every;
            if at + window > tl.measure_end {
                break;
            }
            tokio::time::sleep_until(Timeline::at(at)).await;
            let start = now_ns();
            let (ok, detail) = match self.swap(i).await {
                Ok(d) => (true, d),
                Err(e) => (false, e),
            };
            let ev = SwapEvent {
                start,
                end: now_ns(),
                ok,
                detail,
            };
            self.log.lock().expect("swap log").push(ev);
            i += 1;
        }
        self.log.lock().expect("swap log").clone()
    }

    async fn swap(&self, i: u64) -> Result<String, String> {
        if let Some(cmd) = &self.cmd {
            let out = tokio::process::Command::new("sh")
                .arg("-c")
                .arg(cmd)
                .env("PLEXUS_SWAP_INDEX", i.to_string())
                .output()
                .await
                .map_err(|e| format!("sh -c: {e}"))?;
            if out.status.success() {
                Ok(format!("`{cmd}` ok"))
            } else {
                let err = String::from_utf8_lossy(&out.stderr);
                let tail: String = err
                    .trim()
                    .chars()
                    .rev()
                    .take(200)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                Err(format!("`{cmd}` {}: {tail}", out.status))
            }
        } else {
            let target = self.target.as_deref().ok_or("no --swap-target")?;
            let (bytes, what) = if self.files.len() == 1 {
                (
                    with_custom_section(&self.files[0], "plexus-bench-swap", &i.to_le_bytes()),
                    format!("variant {i}"),
                )
            } else {
                let n = (i as usize) % self.files.len();
                (self.files[n].clone(), format!("file {n}"))
            };
            let target = target.to_path_buf();
            tokio::task::spawn_blocking(move || atomic_write(&target, &bytes))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| format!("writing the plugin: {e}"))?;
            Ok(what)
        }
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

/// Appends a WebAssembly custom section (id 0): valid at the end of a core module or a
/// component, ignored by the runtime, and enough to make the file's bytes differ.
pub fn with_custom_section(wasm: &[u8], name: &str, data: &[u8]) -> Vec<u8> {
    fn leb(mut v: usize, out: &mut Vec<u8>) {
        loop {
            let byte = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(byte);
                return;
            }
            out.push(byte | 0x80);
        }
    }
    let mut body = Vec::new();
    leb(name.len(), &mut body);
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(data);
    let mut out = wasm.to_vec();
    out.push(0);
    leb(body.len(), &mut out);
    out.extend_from_slice(&body);
    out
}

async fn hotswap_conn(
    mut ws: Ws,
    tl: Timeline,
    k: usize,
    size: usize,
    timeout: u64,
    echo_type: Arc<str>,
    hist: Arc<Shared>,
) -> ConnStats {
    let mut rec = hist.local();
    let mut st = ConnStats::default();
    // Per request: what came back (ECHO, ACK, ERR, TIMEOUT bits) and when it was sent.
    let mut state: Vec<u8> = Vec::with_capacity(4096);
    let mut sent_at: Vec<u64> = Vec::with_capacity(4096);
    let mut outstanding: Vec<usize> = Vec::with_capacity(k);
    tokio::time::sleep_until(Timeline::at(tl.start)).await;
    for _ in 0..k {
        if let Err(e) = send_next(&mut ws, &echo_type, size, &mut state, &mut sent_at, false).await
        {
            st.closed = Some(e);
            return st;
        }
        outstanding.push(state.len() - 1);
    }
    if let Err(e) = ws.flush().await {
        st.closed = Some(e.to_string());
        return st;
    }
    let deadline = tokio::time::sleep_until(Timeline::at(tl.drain_end));
    tokio::pin!(deadline);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
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
                    if now.saturating_sub(sent_at[seq]) >= timeout {
                        state[seq] |= TIMEOUT;
                        st.timeouts += 1;
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
                        st.closed = Some(format!(
                            "closed by the server ({})",
                            f.map(|f| f.code.to_string()).unwrap_or_default()
                        ));
                        break;
                    }
                    None => {
                        st.closed = Some("connection ended".into());
                        break;
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => {
                        st.closed = Some(e.to_string());
                        break;
                    }
                };
                let mut terminal: Option<usize> = None;
                match proto::classify(Dialect::Plexus, &text, &echo_type) {
                    Kind::Echo => {
                        if let Some((seq, ts)) = proto::seq_ts(&text)
                            && let Some(s) = state.get_mut(seq as usize)
                        {
                            st.echoes += 1;
                            if *s & ECHO != 0 {
                                st.dup_echo += 1;
                            } else {
                                *s |= ECHO;
                                if tl.measuring(now) {
                                    let lat = now.saturating_sub(ts);
                                    rec.record(lat);
                                    st.samples.push((now, lat));
                                }
                            }
                        }
                    }
                    Kind::Ack(Some(r)) => {
                        if let Some(seq) = r.strip_prefix('e').and_then(|n| n.parse::<usize>().ok())
                            && seq < state.len()
                        {
                            st.acks += 1;
                            let s = &mut state[seq];
                            if *s & (ACK | ERR) != 0 {
                                st.dup_ack += 1;
                            } else {
                                if *s & ECHO == 0 {
                                    st.ack_without_echo += 1;
                                }
                                *s |= ACK;
                                terminal = Some(seq);
                            }
                        }
                    }
                    Kind::Error { r#ref, code } => {
                        count_error(&mut st.codes, code.unwrap_or("?"));
                        match r#ref
                            .and_then(|r| r.strip_prefix('e'))
                            .and_then(|n| n.parse::<usize>().ok())
                        {
                            Some(seq) if seq < state.len() => {
                                let s = &mut state[seq];
                                if *s & (ACK | ERR) != 0 {
                                    st.dup_ack += 1;
                                } else {
                                    *s |= ERR;
                                    st.failed += 1;
                                    terminal = Some(seq);
                                }
                            }
                            _ => st.unattributed_errors += 1,
                        }
                    }
                    _ => {}
                }
                if let Some(seq) = terminal {
                    if state[seq] & TIMEOUT != 0 {
                        st.late += 1;
                    } else if let Some(i) = outstanding.iter().position(|&o| o == seq) {
                        outstanding.swap_remove(i);
                        completed += 1;
                        if tl.measuring(now) {
                            st.completed_in_window += 1;
                        }
                    }
                }
            }
        }
        if completed > 0 {
            if tl.sending(now) {
                for _ in 0..completed {
                    if let Err(e) =
                        send_next(&mut ws, &echo_type, size, &mut state, &mut sent_at, false).await
                    {
                        st.closed = Some(e);
                        break;
                    }
                    outstanding.push(state.len() - 1);
                }
                if st.closed.is_some() {
                    break;
                }
                if let Err(e) = ws.flush().await {
                    st.closed = Some(e.to_string());
                    break;
                }
            } else if outstanding.is_empty() {
                break;
            }
        }
    }
    st.sent = state.len() as u64;
    for &s in &state {
        if s & (ACK | ERR) == 0 {
            if s & ECHO == 0 {
                st.lost += 1;
            } else {
                st.echoed_unacked += 1;
            }
        }
    }
    drop(rec);
    let _ = ws.close(None).await;
    st
}

/// Queues the next request (flushing it when `flush`).
async fn send_next(
    ws: &mut Ws,
    echo_type: &str,
    size: usize,
    state: &mut Vec<u8>,
    sent_at: &mut Vec<u64>,
    flush: bool,
) -> Result<(), String> {
    let seq = state.len() as u64;
    let now = now_ns();
    let frame = proto::plexus_echo_with_id(echo_type, seq, now, size);
    if flush {
        send_text(ws, frame).await?;
    } else {
        feed_text(ws, frame).await?;
    }
    state.push(0);
    sent_at.push(now);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_section_is_appended() {
        let module = b"\0asm\x01\0\0\0".to_vec();
        let out = with_custom_section(&module, "x", &[1, 2]);
        assert_eq!(&out[..8], &module[..]);
        assert_eq!(&out[8..], &[0, 4, 1, b'x', 1, 2]);
    }
}
