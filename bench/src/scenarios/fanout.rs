//! `fanout`: one room of M members and one publisher at a fixed rate; deliveries/s and
//! publish-to-receive latency (the send time travels in the payload).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Notify, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::args::{Dialect, FanoutArgs};
use crate::conn::{Fleet, Target, Ws, count_error, feed_text, send_text};
use crate::proc_stats::CpuMark;
use crate::proto::{self, Kind};
use crate::recorder::Shared;
use crate::report::{Latency, Report};
use crate::scenarios::{LEAD, record_setup, require_connections, server_memory};
use crate::timeline::{Timeline, now_ns};

#[derive(Debug, Default)]
struct PubStats {
    published: u64,
    published_in_window: u64,
    closed: Option<String>,
}

#[derive(Debug, Default)]
struct MemberStats {
    /// Deliveries received inside the measured window.
    in_window: u64,
    /// Deliveries of messages published inside the window, whenever received.
    of_window: u64,
    received: u64,
    errors: u64,
    closed: Option<String>,
}

/// Members still receiving, so that the publisher leaves the room only after them.
#[derive(Debug, Default)]
struct Active {
    count: AtomicUsize,
    done: Notify,
}

#[derive(Debug)]
enum Out {
    Publisher(PubStats),
    Member(MemberStats),
}

pub async fn run(a: &FanoutArgs, threads: usize) -> anyhow::Result<Report> {
    let c = &a.common;
    if a.rate <= 0.0 {
        anyhow::bail!("--rate must be positive");
    }
    let target = Arc::new(Target::new(c, true, a.members + 1)?);
    let mut report = Report::new("fanout", c, target.url(), "delivery");
    report.param("members", a.members);
    report.param("rate", a.rate);
    report.param("size", a.size);

    let hist = Arc::new(Shared::default());
    let (final_tx, final_rx) = watch::channel(None::<u64>);
    let final_tx = Arc::new(final_tx);
    let active = Arc::new(Active::default());
    let dialect = c.dialect;
    let publication = Arc::new(Publication {
        dialect,
        room: Arc::from(a.room.as_str()),
        rate: a.rate,
        size: a.size,
    });
    let h = hist.clone();
    // Connection 0 publishes; the others are the members.
    let mut fleet = Fleet::spawn(
        target.clone(),
        a.members + 1,
        c.connect_concurrency,
        Some(a.room.clone()),
        None,
        move |idx, ws, tl| {
            let (h, publication, final_tx, final_rx, active) = (
                h.clone(),
                publication.clone(),
                final_tx.clone(),
                final_rx.clone(),
                active.clone(),
            );
            async move {
                if idx == 0 {
                    let st = publisher(ws, tl, &publication, &final_tx, &active);
                    Out::Publisher(st.await)
                } else {
                    active.count.fetch_add(1, Ordering::SeqCst);
                    let st = member(ws, tl, dialect, h, final_rx).await;
                    if active.count.fetch_sub(1, Ordering::SeqCst) == 1 {
                        active.done.notify_waiters();
                    }
                    Out::Member(st)
                }
            }
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

    let mut p = PubStats::default();
    let mut m = MemberStats::default();
    let mut members = 0u64;
    let mut disconnects = 0u64;
    let mut publisher_up = false;
    report.count("closed_before_run", fleet.early_closes());
    for r in fleet.join().await {
        match r {
            Ok(Out::Publisher(s)) => {
                publisher_up = true;
                p = s;
                if let Some(e) = &p.closed {
                    count_error(&mut report.errors, format!("publisher: {e}"));
                }
            }
            Ok(Out::Member(s)) => {
                members += 1;
                m.in_window += s.in_window;
                m.of_window += s.of_window;
                m.received += s.received;
                m.errors += s.errors;
                if let Some(e) = s.closed {
                    disconnects += 1;
                    count_error(&mut report.errors, e);
                }
            }
            Err(_) => {}
        }
    }
    if !publisher_up {
        anyhow::bail!("the publisher's connection failed: {:?}", report.errors);
    }
    report.window(m.in_window, &m0, &m1, threads);
    report.measured_secs = tl.measured_secs();
    report.throughput_per_sec = m.in_window as f64 / tl.measured_secs();
    report.latency = Latency::from_ns(&hist.snapshot());
    let expected = p.published_in_window * members;
    report.count("members_connected", members);
    report.count("published", p.published);
    report.count("published_in_window", p.published_in_window);
    report.count("expected_deliveries", expected);
    report.count("delivered_of_window", m.of_window);
    report.count("received_total", m.received);
    report.count("errors", m.errors);
    report.count("disconnects", disconnects);
    report.extra.insert(
        "publish_rate_actual".into(),
        serde_json::json!(
            (p.published_in_window as f64 / tl.measured_secs() * 10.0).round() / 10.0
        ),
    );
    report.extra.insert(
        "delivered_ratio".into(),
        serde_json::json!(if expected > 0 {
            m.of_window as f64 / expected as f64
        } else {
            0.0
        }),
    );
    Ok(report)
}

/// What the publisher sends.
#[derive(Debug, Clone)]
struct Publication {
    dialect: Dialect,
    room: Arc<str>,
    rate: f64,
    size: usize,
}

async fn publisher(
    mut ws: Ws,
    tl: Timeline,
    p: &Publication,
    final_tx: &watch::Sender<Option<u64>>,
    active: &Active,
) -> PubStats {
    let (dialect, room, rate, size) = (p.dialect, &*p.room, p.rate, p.size);
    let mut st = PubStats::default();
    let interval = (1e9 / rate).max(1.0);
    let mut i = 0u64; // publications scheduled so far
    let due = |i: u64| tl.start + (i as f64 * interval) as u64;
    'outer: loop {
        let next = due(i);
        if next >= tl.measure_end {
            break;
        }
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(Timeline::at(next)) => {
                let now = now_ns();
                // Catch up in one batch when behind schedule (at most 1,000 frames per flush).
                let mut batch = 0;
                while due(i) <= now && due(i) < tl.measure_end && batch < 1000 {
                    let ts = now_ns();
                    if let Err(e) = feed_text(&mut ws, proto::publish_frame(dialect, room, i, ts, size)).await {
                        st.closed = Some(e);
                        break 'outer;
                    }
                    if tl.measuring(ts) {
                        st.published_in_window += 1;
                    }
                    i += 1;
                    batch += 1;
                }
                if let Err(e) = ws.flush().await {
                    st.closed = Some(e.to_string());
                    break;
                }
            }
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if dialect == Dialect::Socketio
                        && t.as_str() == "2"
                        && let Err(e) = send_text(&mut ws, "3".into()).await
                    {
                        st.closed = Some(e);
                        break;
                    }
                }
                Some(Ok(Message::Close(_))) | None => {
                    st.closed = Some("closed by the server".into());
                    break;
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    st.closed = Some(e.to_string());
                    break;
                }
            },
        }
    }
    st.published = i;
    let _ = final_tx.send(Some(i));
    // Stay in the room until the members are done (the drain deadline at the latest), so that
    // the server does not tear the room down under the last deliveries.
    let deadline = tokio::time::sleep_until(Timeline::at(tl.drain_end));
    tokio::pin!(deadline);
    loop {
        let done = active.done.notified();
        if active.count.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::select! {
            _ = done => {}
            _ = &mut deadline => break,
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if dialect == Dialect::Socketio && t.as_str() == "2" {
                        let _ = send_text(&mut ws, "3".into()).await;
                    }
                }
                Some(Ok(_)) => {}
                _ => break,
            },
        }
    }
    let _ = ws.close(None).await;
    st
}

async fn member(
    mut ws: Ws,
    tl: Timeline,
    dialect: Dialect,
    hist: Arc<Shared>,
    mut final_rx: watch::Receiver<Option<u64>>,
) -> MemberStats {
    let mut rec = hist.local();
    let mut st = MemberStats::default();
    let mut total: Option<u64> = None;
    let deadline = tokio::time::sleep_until(Timeline::at(tl.drain_end));
    tokio::pin!(deadline);
    loop {
        if let Some(t) = total
            && st.received >= t
        {
            break;
        }
        let msg = tokio::select! {
            biased;
            m = ws.next() => m,
            r = async { final_rx.wait_for(|v| v.is_some()).await.map(|v| *v) }, if total.is_none() => {
                total = r.ok().flatten();
                if total.is_none() {
                    total = Some(u64::MAX);
                }
                continue;
            }
            _ = &mut deadline => break,
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | None => {
                st.closed = Some("closed by the server".into());
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
        if kind.is_broadcast() {
            if let Some((_, ts)) = proto::seq_ts(&text) {
                st.received += 1;
                if tl.measuring(now) {
                    st.in_window += 1;
                    rec.record(now.saturating_sub(ts));
                }
                if tl.measuring(ts) {
                    st.of_window += 1;
                }
            }
        } else {
            match kind {
                Kind::Error { .. } => st.errors += 1,
                Kind::SioPing => {
                    if let Err(e) = send_text(&mut ws, "3".into()).await {
                        st.closed = Some(e);
                        break;
                    }
                }
                Kind::SioClosed => {
                    st.closed = Some("socket.io disconnect".into());
                    break;
                }
                _ => {}
            }
        }
    }
    drop(rec);
    let _ = ws.close(None).await;
    st
}
