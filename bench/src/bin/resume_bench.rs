//! `resume-bench`: how long a resume takes to replay what a client missed, over real sockets
//! against a running Plexus (`plexus serve` with the demo manifests: the `echo` plugin's
//! `echo.broadcast` route).
//!
//! Each round: client A joins a room with client B and processes everything up to its last
//! `seq`; A's TCP connection is dropped; B broadcasts `--missed` messages (64-byte payloads) to
//! the room and waits for their acks (A's session keeps them); then a new connection sends
//! `sys.resume` for A's session. Reported: the time from sending `sys.resume` to reading its ack,
//! every missed message read before it (checked: each once, in order).
//!
//! ```text
//! resume-bench --url ws://127.0.0.1:8080/ws --missed 1000 --rounds 20
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[derive(Parser, Debug)]
#[command(
    name = "resume-bench",
    about = "Time to replay missed messages on resume"
)]
struct Cli {
    /// The host's WebSocket URL.
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// Messages broadcast while the client is gone (at most the host's --resume-frames).
    #[arg(long, default_value_t = 1000)]
    missed: u64,
    /// Rounds; the first is a warm-up and not counted.
    #[arg(long, default_value_t = 20)]
    rounds: u32,
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const TIMEOUT: Duration = Duration::from_secs(30);

struct Client {
    ws: Ws,
    last_seq: u64,
    next_id: u64,
}

impl Client {
    async fn connect(url: &str) -> anyhow::Result<(Client, Value)> {
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        let mut client = Client {
            ws,
            last_seq: 0,
            next_id: 0,
        };
        let welcome = client.recv().await?;
        ensure!(
            welcome["type"] == "sys.welcome",
            "expected the welcome: {welcome}"
        );
        Ok((client, welcome))
    }

    async fn recv(&mut self) -> anyhow::Result<Value> {
        loop {
            let msg = tokio::time::timeout(TIMEOUT, self.ws.next())
                .await
                .context("timed out waiting for a frame")?;
            match msg {
                Some(Ok(Message::Text(text))) => {
                    let frame: Value = serde_json::from_str(&text)?;
                    if let Some(seq) = frame["seq"].as_u64() {
                        self.last_seq = seq;
                    }
                    return Ok(frame);
                }
                Some(Ok(_)) => continue,
                other => bail!("the connection ended: {other:?}"),
            }
        }
    }

    fn id(&mut self) -> String {
        self.next_id += 1;
        format!("r-{}", self.next_id)
    }

    /// Sends `frame` with a fresh messageId; reads up to its answer, returning what came before.
    async fn request(&mut self, mut frame: Value) -> anyhow::Result<(Vec<Value>, Value)> {
        let id = self.id();
        frame["messageId"] = json!(id);
        self.ws.send(Message::text(frame.to_string())).await?;
        let mut before = Vec::new();
        loop {
            let f = self.recv().await?;
            if (f["type"] == "sys.ack" || f["type"] == "sys.error") && f["payload"]["ref"] == id {
                return Ok((before, f));
            }
            before.push(f);
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let pad = "x".repeat(48);
    let mut times = Vec::new();
    for round in 0..cli.rounds {
        let room = format!("resume-{round}-{}", std::process::id());
        let (mut a, welcome) = Client::connect(&cli.url).await?;
        let session = welcome["payload"]["sessionId"].clone();
        let token = welcome["payload"]["resumeToken"].clone();
        a.request(json!({"type": "sys.join", "room": room})).await?;
        let (mut b, _) = Client::connect(&cli.url).await?;
        b.request(json!({"type": "sys.join", "room": room})).await?;
        // A has processed everything up to its ping's answer.
        a.request(json!({"type": "sys.ping"})).await?;
        let last_seq = a.last_seq;
        drop(a);
        for n in 0..cli.missed {
            let frame = json!({"type": "echo.broadcast", "room": room, "messageId": format!("m-{n}"), "payload": {"n": n, "pad": pad}});
            b.ws.feed(Message::text(frame.to_string())).await?;
        }
        b.ws.flush().await?;
        let last = format!("m-{}", cli.missed - 1);
        loop {
            let f = b.recv().await?;
            if f["payload"]["ref"] == last.as_str() {
                break;
            }
        }

        let (mut c, _) = Client::connect(&cli.url).await?;
        let started = Instant::now();
        let (before, ack) = c
            .request(json!({"type": "sys.resume", "payload": {"sessionId": session, "resumeToken": token, "lastSeq": last_seq}}))
            .await?;
        let took = started.elapsed();
        ensure!(ack["type"] == "sys.ack", "the resume failed: {ack}");
        let ns: Vec<u64> = before
            .iter()
            .filter(|f| f["type"] == "echo.broadcast")
            .filter_map(|f| f["payload"]["n"].as_u64())
            .collect();
        ensure!(
            ns == (0..cli.missed).collect::<Vec<_>>(),
            "the replay was not every missed message once, in order ({} of {})",
            ns.len(),
            cli.missed
        );
        if round > 0 {
            times.push(took);
        }
        let _ = c.ws.close(None).await;
        let _ = b.ws.close(None).await;
    }
    times.sort();
    let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "replay of {} missed messages over {} rounds: median {:.2} ms, p90 {:.2} ms, min {:.2} ms, max {:.2} ms ({:.2} us per message at the median)",
        cli.missed,
        times.len(),
        ms(pick(0.5)),
        ms(pick(0.9)),
        ms(times[0]),
        ms(times[times.len() - 1]),
        ms(pick(0.5)) * 1e3 / cli.missed as f64
    );
    Ok(())
}
