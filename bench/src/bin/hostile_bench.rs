//! `hostile-bench`: a well-behaved client's echo latency while other clients flood a hostile
//! plugin, over real sockets against a running Plexus serving `bench/manifests/hostile`.
//!
//! `--flooders` clients call `--route` (`faulty.spin`: an endless loop the 50 ms time limit
//! stops; `faulty.hog`: memory until the instance limit; `faulty.trap`: a panic) one call in
//! flight each, as fast as the answers come, reconnecting when the host closes them (a flood past
//! the rate limit is closed with 1008). Meanwhile one more client sends `echo` every
//! `--every-ms` and records each round trip. `--route none` measures the echo alone. Printed:
//! one JSON line with the echo latency percentiles (µs) and the flooders' answers by code.
//!
//! ```text
//! hostile-bench --url ws://127.0.0.1:8080/ws --route faulty.spin --flooders 10 --seconds 10
//! ```

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

#[derive(Parser, Debug)]
#[command(
    name = "hostile-bench",
    about = "Echo latency beside a flooded hostile plugin"
)]
struct Cli {
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    url: String,
    /// The flooded route, or `none`.
    #[arg(long, default_value = "faulty.spin")]
    route: String,
    #[arg(long, default_value_t = 10)]
    flooders: usize,
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Milliseconds between the well-behaved client's echoes.
    #[arg(long, default_value_t = 20)]
    every_ms: u64,
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

async fn connect(url: &str) -> anyhow::Result<Ws> {
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    // The welcome.
    next_json(&mut ws).await?;
    Ok(ws)
}

async fn next_json(ws: &mut Ws) -> anyhow::Result<Value> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text)?),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            Some(Ok(Message::Close(_))) | None => bail!("closed"),
            Some(Ok(other)) => bail!("unexpected {other:?}"),
            Some(Err(e)) => return Err(e.into()),
        }
    }
}

/// Calls `route` one call in flight until `until`, reconnecting when closed.
async fn flood(
    url: String,
    route: String,
    until: Instant,
    codes: Arc<Mutex<BTreeMap<String, u64>>>,
) {
    let mut n = 0u64;
    while Instant::now() < until {
        let Ok(mut ws) = connect(&url).await else {
            continue;
        };
        while Instant::now() < until {
            n += 1;
            let id = format!("f-{n}");
            let frame = json!({"type": &route, "messageId": id});
            if ws.send(Message::text(frame.to_string())).await.is_err() {
                break;
            }
            let answer = loop {
                match next_json(&mut ws).await {
                    Ok(frame) if frame["payload"]["ref"] == id.as_str() => break Some(frame),
                    Ok(_) => {}
                    Err(_) => break None,
                }
            };
            let Some(answer) = answer else {
                *codes.lock().unwrap().entry("closed".into()).or_default() += 1;
                break;
            };
            let code = answer["payload"]["code"]
                .as_str()
                .unwrap_or("ack")
                .to_owned();
            *codes.lock().unwrap().entry(code).or_default() += 1;
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let mut calm = connect(&cli.url).await?;
    let codes = Arc::new(Mutex::new(BTreeMap::new()));
    let until = Instant::now() + Duration::from_secs(cli.seconds);
    let floods: Vec<_> = if cli.route == "none" {
        Vec::new()
    } else {
        (0..cli.flooders)
            .map(|_| {
                tokio::spawn(flood(
                    cli.url.clone(),
                    cli.route.clone(),
                    until,
                    codes.clone(),
                ))
            })
            .collect()
    };
    let mut latencies = Histogram::<u64>::new(3)?;
    let mut pace = tokio::time::interval(Duration::from_millis(cli.every_ms));
    let mut n = 0u64;
    while Instant::now() < until {
        pace.tick().await;
        n += 1;
        let id = format!("e-{n}");
        let started = Instant::now();
        calm.send(Message::text(
            json!({"type": "echo", "messageId": id, "payload": {"n": n}}).to_string(),
        ))
        .await?;
        loop {
            let frame = next_json(&mut calm).await?;
            if frame["payload"]["ref"] == id.as_str() {
                break;
            }
        }
        latencies.record(started.elapsed().as_micros() as u64)?;
    }
    for f in floods {
        let _ = f.await;
    }
    let codes = codes.lock().unwrap().clone();
    println!(
        "{}",
        json!({
            "route": cli.route,
            "echoes": latencies.len(),
            "p50us": latencies.value_at_quantile(0.5),
            "p99us": latencies.value_at_quantile(0.99),
            "maxUs": latencies.max(),
            "flooderAnswers": codes,
        })
    );
    Ok(())
}
