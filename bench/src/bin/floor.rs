//! `floor`: the smallest reasonable tokio-tungstenite server, the floor of Plexus's own stack.
//!
//! * `GET /echo`: every text (or binary) frame is sent back on the same connection.
//! * `GET /room`: every connection is a member of one room; each frame a member sends is
//!   broadcast to every OTHER member.
//!
//! Each connection has a writer task fed by an unbounded queue: it feeds every frame already
//! queued and flushes once per batch. Reads use a 4 KiB buffer instead of tungstenite's 128 KiB.
//!
//! ```text
//! floor --listen 127.0.0.1:9101      # or PORT=9101 floor; port 0 picks a free port
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;

#[derive(Parser, Debug)]
#[command(
    name = "floor",
    version,
    about = "Minimal tokio-tungstenite peer: /echo and /room"
)]
struct Args {
    /// Address to listen on (default: $FLOOR_LISTEN, else 127.0.0.1:$PORT, else 127.0.0.1:9101).
    #[arg(long)]
    listen: Option<String>,
    /// Worker threads (default: CPUs in this process's affinity mask).
    #[arg(long)]
    threads: Option<usize>,
}

type Outbox = mpsc::UnboundedSender<Message>;

#[derive(Default)]
struct Room {
    members: RwLock<HashMap<u64, Outbox>>,
}

impl Room {
    fn broadcast(&self, from: u64, msg: &Message) {
        let members = self.members.read().expect("room lock");
        for (id, outbox) in members.iter() {
            if *id != from {
                let _ = outbox.send(msg.clone());
            }
        }
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listen = args
        .listen
        .or_else(|| std::env::var("FLOOR_LISTEN").ok())
        .or_else(|| std::env::var("PORT").ok().map(|p| format!("127.0.0.1:{p}")))
        .unwrap_or_else(|| "127.0.0.1:9101".to_string());
    plexus_bench::limits::raise_nofile(200_000);
    let threads = args.threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?
        .block_on(serve(listen))
}

async fn serve(listen: String) -> anyhow::Result<()> {
    let addr = tokio::net::lookup_host(&listen)
        .await?
        .next()
        .ok_or_else(|| anyhow::anyhow!("no address for {listen}"))?;
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    // The same backlog as the Node peers (tokio's default is 1,024).
    let listener: TcpListener = socket.listen(4096)?;
    println!("floor listening on {}", listener.local_addr()?);
    let room = Arc::new(Room::default());
    let ids = AtomicU64::new(0);
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of descriptors and the like: keep serving the connections we have.
                eprintln!("floor: accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let id = ids.fetch_add(1, Ordering::Relaxed);
        tokio::spawn(connection(stream, id, room.clone()));
    }
}

// The handshake callback's error type is tungstenite's (an HTTP response).
#[allow(clippy::result_large_err)]
async fn connection(stream: TcpStream, id: u64, room: Arc<Room>) {
    let mut path = String::new();
    let check = |req: &Request, resp: Response| -> Result<Response, ErrorResponse> {
        path = req.uri().path().to_string();
        if path == "/echo" || path == "/room" {
            Ok(resp)
        } else {
            let mut err = ErrorResponse::new(Some("use /echo or /room".to_string()));
            *err.status_mut() = StatusCode::NOT_FOUND;
            Err(err)
        }
    };
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let Ok(ws) = tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config)).await
    else {
        return;
    };
    let in_room = path == "/room";
    let (mut sink, mut stream) = ws.split();
    let (tx, mut rx) = mpsc::unbounded_channel::<Message>();
    let writer = tokio::spawn(async move {
        while let Some(m) = rx.recv().await {
            if sink.feed(m).await.is_err() {
                return;
            }
            while let Ok(m) = rx.try_recv() {
                if sink.feed(m).await.is_err() {
                    return;
                }
            }
            if sink.flush().await.is_err() {
                return;
            }
        }
        let _ = sink.close().await;
    });
    if in_room {
        room.members
            .write()
            .expect("room lock")
            .insert(id, tx.clone());
    }
    while let Some(msg) = stream.next().await {
        match msg {
            Ok(m @ (Message::Text(_) | Message::Binary(_))) => {
                if in_room {
                    room.broadcast(id, &m);
                } else if tx.send(m).is_err() {
                    break;
                }
            }
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    if in_room {
        room.members.write().expect("room lock").remove(&id);
    }
    drop(tx);
    let _ = writer.await;
}
