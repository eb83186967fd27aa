//! `editor-load`: operations per second through one document of the `editor` plugin, with N
//! concurrent editors over real WebSockets against a running Plexus (`plexus serve`, which
//! serves `manifests/editor.toml`).
//!
//! Each editor runs the client state machine of `plexus-ot` and always has something to type:
//! it sends a random edit (1 to 3 characters inserted, up to 2 deleted, multi-byte text
//! included; once the text passes 2,000 characters, up to 4 deleted, so it grows slowly)
//! and the next one as soon as the ack comes (one operation in flight, as an OT client
//! does), and applies every other editor's `doc.applied` meanwhile. So each operation the
//! server receives was made a few revisions behind and is transformed against the operations
//! applied since. Reported: operations applied by the server per second, the ack latency, and
//! whether all editors ended with the same text.
//!
//! ```text
//! editor-load --url ws://127.0.0.1:8080/ws --editors 10 --seconds 10
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use plexus_ot::{Client, Operation, Outgoing};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[derive(Parser, Debug)]
#[command(
    name = "editor-load",
    about = "Operations per second through one editor document"
)]
struct Cli {
    /// The host's WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// Concurrent editors of the document.
    #[arg(long, default_value_t = 10)]
    editors: usize,
    /// How long they type.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The document (a fresh name per run by default).
    #[arg(long)]
    doc: Option<String>,
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const ALPHABET: [&str; 8] = ["a", "é", "中", "🙂", "e\u{301}", " ", "\n", "ß"];

struct Editor {
    ws: Ws,
    doc: String,
    ot: Client,
    rng: u64,
    next_id: u64,
    sent_at: Option<Instant>,
    latency: Histogram<u64>,
    acked: u64,
    /// Whether an ack is followed by the next edit.
    typing: bool,
}

async fn recv(ws: &mut Ws) -> anyhow::Result<Value> {
    loop {
        match ws
            .next()
            .await
            .context("the host closed the connection")??
        {
            Message::Text(text) => return Ok(serde_json::from_str(&text)?),
            Message::Close(frame) => bail!("the host closed the connection: {frame:?}"),
            _ => {}
        }
    }
}

impl Editor {
    async fn open(url: &str, doc: &str, seed: u64) -> anyhow::Result<Editor> {
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        recv(&mut ws).await?; // sys.welcome
        let open = json!({"type": "doc.open", "messageId": "open", "room": format!("doc:{doc}"), "payload": {"doc": doc}});
        ws.send(Message::text(open.to_string())).await?;
        let ack = loop {
            let frame = recv(&mut ws).await?;
            if frame["type"] == "sys.ack" {
                break frame;
            }
            if frame["type"] == "sys.error" {
                bail!("doc.open failed: {frame}");
            }
        };
        let p = &ack["payload"];
        let ot = Client::new(
            p["text"].as_str().unwrap_or_default(),
            p["revision"].as_u64().unwrap_or_default(),
        );
        Ok(Editor {
            ws,
            doc: doc.to_owned(),
            ot,
            rng: 0x9e37_79b9_7f4a_7c15 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d),
            next_id: 0,
            sent_at: None,
            latency: Histogram::new(3)?,
            acked: 0,
            typing: true,
        })
    }

    fn below(&mut self, n: usize) -> usize {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        (self.rng % n as u64) as usize
    }

    async fn send(&mut self, out: Outgoing) -> anyhow::Result<()> {
        self.next_id += 1;
        let frame = json!({
            "type": "doc.op", "messageId": self.next_id.to_string(), "room": format!("doc:{}", self.doc),
            "payload": {"doc": self.doc, "revision": out.revision, "op": out.op},
        });
        self.ws.send(Message::text(frame.to_string())).await?;
        self.sent_at = Some(Instant::now());
        Ok(())
    }

    async fn type_one(&mut self) -> anyhow::Result<()> {
        let len = self.ot.text().chars().count();
        let at = self.below(len + 1);
        let del = self.below(if len > 2_000 { 5 } else { 3 }).min(len - at);
        let ins: String = (0..1 + self.below(3))
            .map(|_| ALPHABET[self.below(8)])
            .collect();
        let mut op = Operation::new();
        op.retain(at)
            .insert(&ins)
            .delete(del)
            .retain(len - at - del);
        if let Some(out) = self.ot.apply_local(op)? {
            self.send(out).await?;
        }
        Ok(())
    }

    async fn step(&mut self) -> anyhow::Result<()> {
        let frame = recv(&mut self.ws).await?;
        let p = &frame["payload"];
        match frame["type"].as_str().unwrap_or_default() {
            "sys.ack" => {
                if let Some(sent) = self.sent_at.take() {
                    self.latency.record(sent.elapsed().as_micros() as u64).ok();
                }
                self.acked += 1;
                let revision = p["revision"].as_u64().context("an ack without revision")?;
                if let Some(out) = self.ot.server_ack(revision)? {
                    self.send(out).await?;
                }
                if self.typing {
                    self.type_one().await?;
                }
            }
            "doc.applied" => {
                let op: Operation = serde_json::from_value(p["op"].clone())?;
                let revision = p["revision"]
                    .as_u64()
                    .context("doc.applied without revision")?;
                self.ot.apply_server(revision, &op)?;
            }
            "sys.error" => bail!("the host refused an operation: {frame}"),
            _ => {}
        }
        Ok(())
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let doc = cli.doc.clone().unwrap_or_else(|| {
        format!(
            "bench-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis())
        )
    });
    let mut editors = Vec::new();
    for i in 0..cli.editors {
        editors.push(Editor::open(&cli.url, &doc, i as u64 + 1).await?);
    }
    let start = Instant::now();
    let deadline = start + Duration::from_secs(cli.seconds);
    let mut tasks = Vec::new();
    for mut e in editors {
        tasks.push(tokio::spawn(async move {
            e.type_one().await?;
            while Instant::now() < deadline {
                e.step().await?;
            }
            e.typing = false;
            while !e.ot.is_synchronized() {
                e.step().await?;
            }
            anyhow::Ok(e)
        }));
    }
    let mut editors = Vec::new();
    for t in tasks {
        editors.push(t.await??);
    }
    let elapsed = start.elapsed();
    // Everyone catches up to the last revision, then the texts must agree.
    let last = editors.iter().map(|e| e.ot.revision()).max().unwrap_or(0);
    for e in &mut editors {
        while e.ot.revision() < last {
            e.step().await?;
        }
    }
    let converged = editors.windows(2).all(|w| w[0].ot.text() == w[1].ot.text());
    let mut latency = Histogram::<u64>::new(3)?;
    for e in &editors {
        latency.add(&e.latency)?;
    }
    let acked: u64 = editors.iter().map(|e| e.acked).sum();
    let chars = editors[0].ot.text().chars().count();
    println!(
        "editors {}  seconds {:.1}  operations {}  ops/s {:.0}  ack latency p50 {} us p99 {} us  final revision {}  text {} chars  converged {}",
        cli.editors,
        elapsed.as_secs_f64(),
        acked,
        acked as f64 / elapsed.as_secs_f64(),
        latency.value_at_quantile(0.5),
        latency.value_at_quantile(0.99),
        last,
        chars,
        converged,
    );
    if !converged {
        bail!("the editors diverged");
    }
    Ok(())
}
