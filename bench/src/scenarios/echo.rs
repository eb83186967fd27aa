//! `echo`: N connections, each keeping K messages in flight; messages/s and round-trip latency.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::args::{Dialect, EchoArgs};
use crate::conn::{ErrorCounts, Fleet, Target, Ws, count_error, feed_text, send_text};
use crate::proc_stats::CpuMark;
use crate::proto::{self, Kind};
use crate::recorder::Shared;
use crate::report::{Latency, Report};
use crate::scenarios::{LEAD, record_setup, require_connections, server_memory};
use crate::timeline::{Timeline, now_ns};

#[derive(Debug, Default)]
struct ConnStats {
    sent: u64,
    /// Answers received inside the measured window.
    completed: u64,
    /// Answers received at any time.
    answered: u64,
    errors: u64,
    unanswered: u64,
    timeouts: u64,
    closed: Option<String>,
    codes: ErrorCounts,
}

pub async fn run(a: &EchoArgs, threads: usize) -> anyhow::Result<Report> {
    let c = &a.common;
    let target = Arc::new(Target::new(c, false, a.connections)?);
    let mut report = Report::new("echo", c, target.url(), "message");
    report.param("connections", a.connections);
    report.param("in_flight", a.in_flight);
    report.param("size", a.size);
    report.param("rate", a.rate);

    let hist = Arc::new(Shared::default());
    let (dialect, k, size) = (c.dialect, a.in_flight.max(1), a.size);
    let timeout = a.answer_timeout_ms.max(1) * 1_000_000;
    // With a rate: each connection's time between sends, and its first slot's offset.
    let n = a.connections.max(1) as u64;
    let interval = (a.rate > 0.0).then(|| (n as f64 * 1e9 / a.rate) as u64);
    let h = hist.clone();
    let mut fleet = Fleet::spawn(
        target.clone(),
        a.connections,
        c.connect_concurrency,
        None,
        None,
        move |idx, ws, tl| {
            let pace = interval.map(|every| Pace {
                every,
                next: tl.start + every * idx as u64 / n,
            });
            echo_conn(ws, tl, dialect, k, size, timeout, pace, h.clone())
        },
    );
    let setup = fleet.wait_ready().await;
    record_setup(&mut report, &setup);
    require_connections(&setup)?;

    report.server_memory_before = server_memory(c.server_pid);
    let tl = Timeline::new(LEAD, c.warmup(), c.duration(), c.drain());
    fleet.start(tl);
    tokio::time::sleep_until(Timeline::at(tl.measure_start)).await;
    let m0 = CpuMark::take(c.server_pid);
    tokio::time::sleep_until(Timeline::at(tl.measure_end)).await;
    let m1 = CpuMark::take(c.server_pid);
    report.server_memory_after = server_memory(c.server_pid);

    let mut total = ConnStats::default();
    let mut disconnects = 0;
    report.count("closed_before_run", fleet.early_closes());
    for r in fleet.join().await {
        let Ok(s) = r else { continue };
        total.sent += s.sent;
        total.completed += s.completed;
        total.answered += s.answered;
        total.errors += s.errors;
        total.unanswered += s.unanswered;
        total.timeouts += s.timeouts;
        if let Some(e) = s.closed {
            disconnects += 1;
            count_error(&mut report.errors, e);
        }
        for (e, n) in s.codes {
            *report.errors.entry(format!("sys.error {e}")).or_default() += n;
        }
    }
    report.window(total.completed, &m0, &m1, threads);
    report.measured_secs = tl.measured_secs();
    report.throughput_per_sec = total.completed as f64 / tl.measured_secs();
    report.latency = Latency::from_ns(&hist.snapshot());
    report.count("sent", total.sent);
    report.count("answered", total.answered);
    report.count("errors", total.errors);
    report.count("unanswered", total.unanswered);
    report.count("timed_out", total.timeouts);
    report.count("disconnects", disconnects);
    Ok(report)
}

/// When a paced connection sends: every `every` ns, the next slot at `next`.
#[derive(Debug, Clone, Copy)]
struct Pace {
    every: u64,
    next: u64,
}

impl Pace {
    /// Waits for the next slot (at once when it has passed) and books the one after.
    async fn wait(pace: &mut Option<Pace>) {
        let Some(p) = pace else { return };
        let now = now_ns();
        if p.next > now {
            tokio::time::sleep_until(Timeline::at(p.next)).await;
        }
        // A connection that fell behind does not send a burst to catch up.
        p.next = p.next.max(now) + p.every;
    }
}

#[allow(clippy::too_many_arguments)]
async fn echo_conn(
    mut ws: Ws,
    tl: Timeline,
    dialect: Dialect,
    k: usize,
    size: usize,
    timeout: u64,
    mut pace: Option<Pace>,
    hist: Arc<Shared>,
) -> ConnStats {
    let mut rec = hist.local();
    let mut st = ConnStats::default();
    tokio::time::sleep_until(Timeline::at(tl.start)).await;
    Pace::wait(&mut pace).await;
    let mut seq = 0u64;
    for _ in 0..k {
        if let Err(e) = feed_text(&mut ws, proto::echo_frame(dialect, seq, now_ns(), size)).await {
            st.closed = Some(e);
            return st;
        }
        seq += 1;
    }
    if let Err(e) = ws.flush().await {
        st.closed = Some(e.to_string());
        return st;
    }
    let mut outstanding = k as u64;
    let deadline = tokio::time::sleep_until(Timeline::at(tl.drain_end));
    tokio::pin!(deadline);
    let mut last_answer = now_ns();
    let stall = tokio::time::sleep_until(Timeline::at(last_answer + timeout));
    tokio::pin!(stall);
    loop {
        let msg = tokio::select! {
            biased;
            m = ws.next() => m,
            _ = &mut deadline => break,
            _ = &mut stall => {
                // Nothing came back for a while: give up on what is in flight, start afresh.
                let now = now_ns();
                if now >= last_answer + timeout && outstanding > 0 {
                    st.timeouts += outstanding;
                    outstanding = 0;
                    last_answer = now;
                    if tl.sending(now) {
                        for _ in 0..k {
                            let f = proto::echo_frame(dialect, seq, now_ns(), size);
                            if let Err(e) = feed_text(&mut ws, f).await {
                                st.closed = Some(e);
                                break;
                            }
                            seq += 1;
                            outstanding += 1;
                        }
                        if let Err(e) = ws.flush().await {
                            st.closed = Some(e.to_string());
                        }
                        if st.closed.is_some() {
                            break;
                        }
                    } else {
                        break;
                    }
                }
                stall.as_mut().reset(Timeline::at(last_answer + timeout));
                continue;
            }
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(f))) => {
                st.closed = Some(format!(
                    "closed by the server ({})",
                    f.map(|f| f.code.to_string()).unwrap_or_default()
                ));
                break;
            }
            None => {
                st.closed = Some("connection ended".to_string());
                break;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                st.closed = Some(e.to_string());
                break;
            }
        };
        let now = now_ns();
        let kind = proto::classify(dialect, &text, "echo");
        let done = if kind.is_echo() {
            st.answered += 1;
            if tl.measuring(now)
                && let Some((_, ts)) = proto::seq_ts(&text)
            {
                st.completed += 1;
                rec.record(now.saturating_sub(ts));
            }
            true
        } else {
            match kind {
                Kind::Error { code, .. } => {
                    st.errors += 1;
                    count_error(&mut st.codes, code.unwrap_or("?"));
                    true
                }
                Kind::SioPing => {
                    if let Err(e) = send_text(&mut ws, "3".into()).await {
                        st.closed = Some(e);
                        break;
                    }
                    false
                }
                Kind::SioClosed => {
                    st.closed = Some("socket.io disconnect".into());
                    break;
                }
                _ => false,
            }
        };
        if done {
            last_answer = now;
            outstanding = outstanding.saturating_sub(1);
            if tl.sending(now) {
                Pace::wait(&mut pace).await;
                if let Err(e) =
                    send_text(&mut ws, proto::echo_frame(dialect, seq, now_ns(), size)).await
                {
                    st.closed = Some(e);
                    break;
                }
                seq += 1;
                outstanding += 1;
            } else if outstanding == 0 {
                break;
            }
        }
    }
    st.sent = seq;
    st.unanswered = outstanding;
    drop(rec);
    let _ = ws.close(None).await;
    st
}
