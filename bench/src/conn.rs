//! Opening connections in each dialect, and the fleet of connection tasks a scenario drives.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

use crate::args::{Common, Dialect};
use crate::proto::{self, Kind};
use crate::recorder::new_histogram;
use crate::timeline::Timeline;

pub type Ws = WebSocketStream<TcpStream>;

/// Where and how to connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
    pub dialect: Dialect,
    pub path: String,
    /// Local addresses to bind, round robin; empty: let the kernel choose.
    pub sources: Vec<Ipv4Addr>,
    pub timeout: Duration,
    pub ws_config: WebSocketConfig,
    /// The Plexus type the echo route answers with.
    pub echo_type: String,
}

impl Target {
    /// `room` selects the raw dialect's `/room` endpoint; `connections` sizes the source
    /// address pool when `--source-ips` is 0.
    pub fn new(common: &Common, room: bool, connections: usize) -> anyhow::Result<Self> {
        let addr = common
            .addr
            .to_socket_addrs()
            .with_context(|| format!("resolving {}", common.addr))?
            .next()
            .with_context(|| format!("no address for {}", common.addr))?;
        if !addr.ip().is_loopback() {
            bail!("refusing to load {addr}: the generator only targets loopback addresses");
        }
        let path = common
            .path
            .clone()
            .unwrap_or_else(|| proto::default_path(common.dialect, room).to_string());
        let count = if common.source_ips == 0 {
            if connections > 25_000 {
                connections.div_ceil(25_000) as u32
            } else {
                0
            }
        } else {
            common.source_ips
        };
        let base = u32::from(common.source_base);
        let sources = (0..count).map(|i| Ipv4Addr::from(base + i)).collect();
        Ok(Target {
            addr,
            host: common.addr.clone(),
            dialect: common.dialect,
            path,
            sources,
            timeout: common.connect_timeout(),
            // A 4 KiB read buffer instead of tungstenite's 128 KiB: the generator holds 10,000+
            // connections.
            ws_config: WebSocketConfig::default().read_buffer_size(4096),
            echo_type: "echo".to_string(),
        })
    }

    pub fn url(&self) -> String {
        format!("ws://{}{}", self.host, self.path)
    }

    fn source(&self, idx: usize) -> Option<Ipv4Addr> {
        if self.sources.is_empty() {
            None
        } else {
            Some(self.sources[idx % self.sources.len()])
        }
    }

    async fn tcp(&self, idx: usize) -> std::io::Result<TcpStream> {
        let sock = match self.addr {
            SocketAddr::V4(_) => TcpSocket::new_v4()?,
            SocketAddr::V6(_) => TcpSocket::new_v6()?,
        };
        if let Some(ip) = self.source(idx) {
            sock.set_reuseaddr(true)?;
            sock.bind(SocketAddr::new(IpAddr::V4(ip), 0))?;
        }
        let stream = sock.connect(self.addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }

    /// Opens connection `idx`: TCP, the WebSocket handshake and the dialect's own handshake
    /// (`sys.welcome`; Engine.IO open and namespace connect), then joins `room` if given.
    pub async fn open(&self, idx: usize, room: Option<&str>) -> Result<Ws, String> {
        let stream = self
            .tcp(idx)
            .await
            .map_err(|e| format!("tcp connect: {e}"))?;
        let (mut ws, _) =
            tokio_tungstenite::client_async_with_config(self.url(), stream, Some(self.ws_config))
                .await
                .map_err(|e| format!("websocket handshake: {e}"))?;
        match self.dialect {
            Dialect::Raw => {}
            Dialect::Plexus => {
                self.expect(&mut ws, "sys.welcome", |k| matches!(k, Kind::Welcome))
                    .await?;
            }
            Dialect::Socketio => {
                self.expect(&mut ws, "engine.io open", |k| matches!(k, Kind::SioOpen))
                    .await?;
                send_text(&mut ws, "40".to_string())
                    .await
                    .map_err(|e| format!("socket.io connect: {e}"))?;
                self.expect(&mut ws, "socket.io connect", |k| {
                    matches!(k, Kind::SioConnected)
                })
                .await?;
            }
        }
        if let Some(room) = room
            && let Some(frame) = proto::join_frame(self.dialect, room)
        {
            send_text(&mut ws, frame)
                .await
                .map_err(|e| format!("join: {e}"))?;
            let want = if self.dialect == Dialect::Socketio {
                "0"
            } else {
                "j"
            };
            self.expect(
                &mut ws,
                "join ack",
                |k| matches!(k, Kind::Ack(Some(r)) if *r == want),
            )
            .await?;
        }
        Ok(ws)
    }

    /// Reads frames until one matches, answering Engine.IO pings; a `sys.error` or a
    /// Socket.IO disconnect fails.
    async fn expect(
        &self,
        ws: &mut Ws,
        what: &str,
        matches: impl Fn(&Kind<'_>) -> bool,
    ) -> Result<(), String> {
        loop {
            let text = match ws.next().await {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(c))) => {
                    return Err(format!(
                        "closed while waiting for {what}: {}",
                        c.map(|c| c.code.to_string()).unwrap_or_default()
                    ));
                }
                Some(Ok(_)) => continue,
                Some(Err(e)) => return Err(format!("waiting for {what}: {e}")),
                None => return Err(format!("closed while waiting for {what}")),
            };
            let kind = proto::classify(self.dialect, &text, &self.echo_type);
            if matches(&kind) {
                return Ok(());
            }
            match kind {
                Kind::SioPing => send_text(ws, "3".to_string())
                    .await
                    .map_err(|e| format!("waiting for {what}: {e}"))?,
                Kind::Error { code, .. } => {
                    return Err(format!("{what} refused: {}", code.unwrap_or("sys.error")));
                }
                Kind::SioClosed => return Err(format!("{what} refused: {}", short(&text))),
                _ => {}
            }
        }
    }
}

pub async fn send_text(ws: &mut Ws, text: String) -> Result<(), String> {
    ws.send(Message::text(text))
        .await
        .map_err(|e| e.to_string())
}

/// Queues a frame without flushing it (flush with `ws.flush()`).
pub async fn feed_text(ws: &mut Ws, text: String) -> Result<(), String> {
    ws.feed(Message::text(text))
        .await
        .map_err(|e| e.to_string())
}

fn short(s: &str) -> String {
    s.chars().take(80).collect()
}

/// Error messages with counts, for the report.
pub type ErrorCounts = BTreeMap<String, u64>;

pub fn count_error(map: &mut ErrorCounts, e: impl Into<String>) {
    let e: String = e.into();
    *map.entry(short(&e)).or_default() += 1;
}

/// How the set-up of a fleet went.
#[derive(Debug)]
pub struct SetupStats {
    pub connected: usize,
    pub failed: usize,
    pub errors: ErrorCounts,
    /// Connect latency (TCP + handshakes + join) of the connections that succeeded, in ns.
    pub connect_latency: Histogram<u64>,
    pub elapsed: Duration,
}

/// Many connection tasks: each opens its connection (bounded concurrency), reports ready, waits
/// (still reading, and answering pings) for the [`Timeline`], then runs the scenario's traffic.
pub struct Fleet<R> {
    n: usize,
    ready_rx: mpsc::UnboundedReceiver<Result<Duration, String>>,
    start_tx: watch::Sender<Option<Timeline>>,
    handles: Vec<JoinHandle<Result<R, String>>>,
    started: Instant,
    early_closes: Arc<AtomicU64>,
}

impl<R: Send + 'static> Fleet<R> {
    /// Spawns `n` connection tasks. `deadline` bounds the whole set-up: a connection not
    /// started by then is counted as failed.
    pub fn spawn<F, Fut>(
        target: Arc<Target>,
        n: usize,
        concurrency: usize,
        room: Option<String>,
        deadline: Option<Instant>,
        run: F,
    ) -> Self
    where
        F: Fn(usize, Ws, Timeline) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
    {
        let sem = Arc::new(Semaphore::new(concurrency.max(1)));
        let (ready_tx, ready_rx) = mpsc::unbounded_channel();
        let (start_tx, start_rx) = watch::channel(None::<Timeline>);
        let run = Arc::new(run);
        let room: Option<Arc<str>> = room.map(Arc::from);
        let started = Instant::now();
        let early_closes = Arc::new(AtomicU64::new(0));
        let mut handles = Vec::with_capacity(n);
        for idx in 0..n {
            let target = target.clone();
            let sem = sem.clone();
            let ready_tx = ready_tx.clone();
            let mut start_rx = start_rx.clone();
            let run = run.clone();
            let room = room.clone();
            let early = early_closes.clone();
            handles.push(tokio::spawn(async move {
                let opened = {
                    let _permit = sem.acquire().await.expect("semaphore open");
                    let t0 = Instant::now();
                    let mut limit = target.timeout;
                    if let Some(d) = deadline {
                        if t0 >= d {
                            let e = "not attempted: set-up time limit reached".to_string();
                            let _ = ready_tx.send(Err(e.clone()));
                            return Err(e);
                        }
                        limit = limit.min(d - t0);
                    }
                    match tokio::time::timeout(limit, target.open(idx, room.as_deref())).await {
                        Ok(Ok(ws)) => {
                            let _ = ready_tx.send(Ok(t0.elapsed()));
                            ws
                        }
                        Ok(Err(e)) => {
                            let _ = ready_tx.send(Err(e.clone()));
                            return Err(e);
                        }
                        Err(_) => {
                            let e = "connect timeout".to_string();
                            let _ = ready_tx.send(Err(e.clone()));
                            return Err(e);
                        }
                    }
                };
                drop(ready_tx);
                let mut ws = opened;
                let tl = loop {
                    tokio::select! {
                        r = async { start_rx.wait_for(|t| t.is_some()).await.map(|t| *t) } => match r {
                            Ok(Some(t)) => break t,
                            _ => return Err("fleet dropped".to_string()),
                        },
                        m = ws.next() => match m {
                            Some(Ok(Message::Text(t))) => {
                                if target.dialect == Dialect::Socketio && &*t == "2" {
                                    send_text(&mut ws, "3".to_string()).await?;
                                }
                            }
                            Some(Ok(Message::Close(_))) | None => {
                                early.fetch_add(1, Ordering::Relaxed);
                                return Err("closed by the server before the run".to_string())
                            }
                            Some(Ok(_)) => {}
                            Some(Err(e)) => {
                                early.fetch_add(1, Ordering::Relaxed);
                                return Err(format!("before the run: {e}"));
                            }
                        },
                    }
                };
                Ok(run(idx, ws, tl).await)
            }));
        }
        Fleet {
            n,
            ready_rx,
            start_tx,
            handles,
            started,
            early_closes,
        }
    }

    /// Waits until every connection is up or has failed.
    pub async fn wait_ready(&mut self) -> SetupStats {
        let mut stats = SetupStats {
            connected: 0,
            failed: 0,
            errors: ErrorCounts::new(),
            connect_latency: new_histogram(),
            elapsed: Duration::ZERO,
        };
        while stats.connected + stats.failed < self.n {
            match self.ready_rx.recv().await {
                Some(Ok(d)) => {
                    stats.connected += 1;
                    stats
                        .connect_latency
                        .saturating_record(d.as_nanos().max(1) as u64);
                }
                Some(Err(e)) => {
                    stats.failed += 1;
                    count_error(&mut stats.errors, e);
                }
                None => break,
            }
        }
        stats.elapsed = self.started.elapsed();
        stats
    }

    /// Starts the traffic of every connection that is up.
    pub fn start(&self, tl: Timeline) {
        let _ = self.start_tx.send(Some(tl));
    }

    /// Connections that were up but ended before their traffic started.
    pub fn early_closes(&self) -> u64 {
        self.early_closes.load(Ordering::Relaxed)
    }

    /// Waits for every task; failed connections come back as `Err`.
    pub async fn join(self) -> Vec<Result<R, String>> {
        let mut out = Vec::with_capacity(self.handles.len());
        for h in self.handles {
            out.push(match h.await {
                Ok(r) => r,
                Err(e) => Err(format!("task failed: {e}")),
            });
        }
        out
    }
}

/// Reads and discards frames (answering Engine.IO pings) until `until`, then closes.
pub async fn hold_until(mut ws: Ws, dialect: Dialect, until: Instant) -> Result<(), String> {
    let sleep = tokio::time::sleep_until(until);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            _ = &mut sleep => break,
            m = ws.next() => match m {
                Some(Ok(Message::Text(t))) => {
                    if dialect == Dialect::Socketio && &*t == "2" {
                        send_text(&mut ws, "3".to_string()).await?;
                    }
                }
                Some(Ok(Message::Close(_))) | None => return Err("closed by the server".to_string()),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.to_string()),
            },
        }
    }
    let _ = ws.close(None).await;
    Ok(())
}
