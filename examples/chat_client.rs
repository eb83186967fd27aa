//! A terminal chat client for the demo `chat` plugin: joins a room, sends each line you type as
//! `chat.send` (commands like `/nick ada`, `/topic Rust`, `/who`, `/me waves`, `/msg IDENTITY
//! hi` included), and prints every frame the host sends (the room's history when it joins,
//! direct messages, and others' typing indicators, which it does not send itself).
//!
//! Run (with `plexus serve` running): `cargo run --example chat_client -- lobby`
//! Options: `--url ws://127.0.0.1:8080/ws`.

use anyhow::Context as _;
use futures_util::{SinkExt, StreamExt};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_tungstenite::tungstenite::Message;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let mut url = "ws://127.0.0.1:8080/ws".to_owned();
    let mut room = "lobby".to_owned();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--url" => url = args.next().context("--url needs a value")?,
            other => room = other.to_owned(),
        }
    }
    let (ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    let (mut tx, mut rx) = ws.split();
    tx.send(Message::text(
        json!({"type": "sys.join", "room": room, "messageId": "join"}).to_string(),
    ))
    .await?;
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut n = 0u64;
    loop {
        tokio::select! {
            frame = rx.next() => match frame {
                Some(Ok(Message::Text(text))) => println!("{}", render(&text)),
                Some(Ok(Message::Close(close))) => {
                    println!("closed by host: {close:?}");
                    return Ok(());
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(e.into()),
                None => return Ok(()),
            },
            line = lines.next_line() => match line? {
                Some(line) if !line.trim().is_empty() => {
                    n += 1;
                    let frame = json!({"type": "chat.send", "room": room, "messageId": n.to_string(), "payload": {"text": line}});
                    tx.send(Message::text(frame.to_string())).await?;
                }
                Some(_) => {}
                None => {
                    tx.send(Message::Close(None)).await?;
                    return Ok(());
                }
            },
        }
    }
}

/// A one-line rendering of a host frame.
fn render(text: &str) -> String {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(text) else {
        return text.to_owned();
    };
    let p = &v["payload"];
    match v["type"].as_str().unwrap_or("") {
        "chat.message" if p["action"].as_bool() == Some(true) => format!(
            "* {} {}",
            p["nick"].as_str().unwrap_or("?"),
            p["text"].as_str().unwrap_or("")
        ),
        "chat.message" => format!(
            "<{}> {}",
            p["nick"].as_str().unwrap_or("?"),
            p["text"].as_str().unwrap_or("")
        ),
        "chat.topic" => format!(
            "-- topic of {}: {}",
            p["room"].as_str().unwrap_or("?"),
            p["topic"].as_str().unwrap_or("")
        ),
        "chat.history" => p["messages"]
            .as_array()
            .map(|messages| {
                messages
                    .iter()
                    .map(|m| {
                        format!(
                            "   <{}> {}",
                            m["nick"].as_str().unwrap_or("?"),
                            m["text"].as_str().unwrap_or("")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_default(),
        "chat.direct" => format!(
            "*{}* {}",
            p["nick"].as_str().unwrap_or("?"),
            p["text"].as_str().unwrap_or("")
        ),
        "chat.typing" => format!("-- {} is typing", p["nick"].as_str().unwrap_or("?")),
        "room.joined" => format!("-- {} joined", p["identity"].as_str().unwrap_or("?")),
        "room.left" => format!(
            "-- {} left ({})",
            p["identity"].as_str().unwrap_or("?"),
            p["reason"].as_str().unwrap_or("")
        ),
        "sys.ack" => format!("   ok {}", p["ref"]),
        "sys.error" => format!(
            "!! {}: {}",
            p["code"].as_str().unwrap_or("?"),
            p["message"].as_str().unwrap_or("")
        ),
        _ => text.to_owned(),
    }
}
