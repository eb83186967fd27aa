//! `cluster-bench`: latency and throughput of room broadcasts between the nodes of a Plexus
//! cluster, over real sockets (the demo manifests' `echo.broadcast` route).
//!
//! One sender joins a room on `--from`; `--receivers` clients join it on the `--to` nodes (in
//! turn). Once every receiver has seen a warm-up broadcast, the sender broadcasts `--rate`
//! messages per second for `--seconds`, each stamped with the time it was sent; every receiver
//! records each message's latency (send to receipt, one clock: the same process) and checks that
//! it gets every message once, in order. Printed: one JSON line with the deliveries, the rate
//! reached, and latency percentiles in microseconds.
//!
//! ```text
//! cluster-bench --from ws://127.0.0.1:8081/ws --to ws://127.0.0.1:8082/ws --receivers 10 --rate 1000 --seconds 10
//! ```

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::Barrier;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[derive(Parser, Debug)]
#[command(
    name = "cluster-bench",
    about = "Room broadcasts between cluster nodes"
)]
struct Cli {
    /// The sender's node.
    #[arg(long)]
    from: String,
    /// The receivers' nodes (repeat; receivers are spread over them in turn).
    #[arg(long, required = true)]
    to: Vec<String>,
    /// Receiving clients.
    #[arg(long, default_value_t = 10)]
    receivers: usize,
    /// Broadcasts per second.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// How long to broadcast.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// The room (a fresh name per run keeps runs apart).
    #[arg(long, default_value = "bench")]
    room: String,
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(url: &str, room: &str) -> anyhow::Result<Ws> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let join = json!({"type": "sys.join", "messageId": "join", "room": room});
    ws.send(Message::text(join.to_string())).await?;
    loop {
        let frame = next_json(&mut ws).await?;
        if frame["type"] == "sys.ack" && frame["payload"]["ref"] == "join" {
            return Ok(ws);
        }
        if frame["type"] == "sys.error" {
            bail!("joining {room}: {frame}");
        }
    }
}

async fn next_json(ws: &mut Ws) -> anyhow::Result<Value> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text)?),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(other)) => bail!("unexpected {other:?}"),
            Some(Err(e)) => return Err(e.into()),
            None => bail!("the connection closed"),
        }
    }
}

struct Received {
    latencies: Histogram<u64>,
    count: u64,
    out_of_order: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let total = cli.rate * cli.seconds;
    let origin = Instant::now();
    let mut receivers = Vec::new();
    for i in 0..cli.receivers {
        receivers.push(connect(&cli.to[i % cli.to.len()], &cli.room).await?);
    }
    let mut sender = connect(&cli.from, &cli.room).await?;
    let ready = Arc::new(Barrier::new(cli.receivers + 1));
    let mut tasks = Vec::new();
    for mut ws in receivers {
        let ready = ready.clone();
        tasks.push(tokio::spawn(async move {
            // The warm-up: once one arrives, this receiver's node has the room's traffic.
            loop {
                let frame = next_json(&mut ws).await?;
                if frame["type"] == "echo.broadcast" && frame["payload"]["warm"] == true {
                    break;
                }
            }
            ready.wait().await;
            let mut got = Received {
                latencies: Histogram::new(3)?,
                count: 0,
                out_of_order: 0,
            };
            let mut next = 0u64;
            while got.count < total {
                let frame =
                    match tokio::time::timeout(Duration::from_secs(10), next_json(&mut ws)).await {
                        Ok(frame) => frame?,
                        Err(_) => break,
                    };
                if frame["type"] != "echo.broadcast" {
                    continue;
                }
                let Some(n) = frame["payload"]["n"].as_u64() else {
                    continue;
                };
                let sent = frame["payload"]["t"].as_u64().unwrap_or(0);
                let now = origin.elapsed().as_micros() as u64;
                got.latencies.record(now.saturating_sub(sent).max(1))?;
                if n != next {
                    got.out_of_order += 1;
                }
                next = n + 1;
                got.count += 1;
            }
            anyhow::Ok(got)
        }));
    }
    // Warm up until every receiver has seen a broadcast (its node subscribed).
    let warm =
        json!({"type": "echo.broadcast", "room": &cli.room, "payload": {"warm": true}}).to_string();
    let barrier = ready.wait();
    tokio::pin!(barrier);
    loop {
        sender.send(Message::text(warm.clone())).await?;
        tokio::select! {
            _ = &mut barrier => break,
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    let (mut sink, mut stream) = sender.split();
    // Acks and errors are read, not waited for.
    let reader = tokio::spawn(async move {
        let mut errors = 0u64;
        while let Some(Ok(message)) = stream.next().await {
            if let Message::Text(text) = message
                && text.contains("\"sys.error\"")
            {
                errors += 1;
            }
        }
        errors
    });
    let start = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_nanos(1_000_000_000 / cli.rate.max(1)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    for n in 0..total {
        tick.tick().await;
        let t = origin.elapsed().as_micros() as u64;
        let frame =
            json!({"type": "echo.broadcast", "room": &cli.room, "payload": {"n": n, "t": t}});
        sink.send(Message::text(frame.to_string())).await?;
    }
    let sent_in = start.elapsed();
    let mut latencies = Histogram::<u64>::new(3)?;
    let (mut delivered, mut out_of_order, mut short) = (0u64, 0u64, 0u64);
    for task in tasks {
        let got = task.await??;
        latencies.add(&got.latencies)?;
        delivered += got.count;
        out_of_order += got.out_of_order;
        short += total - got.count;
    }
    let elapsed = start.elapsed();
    let _ = sink.close().await;
    reader.abort();
    println!(
        "{}",
        json!({
            "messages": total,
            "receivers": cli.receivers,
            "delivered": delivered,
            "missing": short,
            "outOfOrder": out_of_order,
            "sendSeconds": sent_in.as_secs_f64(),
            "deliveriesPerSecond": delivered as f64 / elapsed.as_secs_f64(),
            "p50us": latencies.value_at_quantile(0.50),
            "p99us": latencies.value_at_quantile(0.99),
            "p999us": latencies.value_at_quantile(0.999),
            "maxUs": latencies.max(),
        })
    );
    Ok(())
}
