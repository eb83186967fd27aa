//! One WebSocket connection: reads client frames into the router, and writes the session's
//! outbox to the socket, batching queued frames into one flush.

use std::sync::Arc;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::error::CloseReason;
use crate::outbox::{Out, OutboxRx};
use crate::router::{self, ConnState, Hub};
use crate::session::Identity;

/// Most frames written between two flushes.
const MAX_BATCH: usize = 512;

/// Serves one upgraded connection until it closes or the host shuts down.
pub async fn serve<S>(
    hub: Arc<Hub>,
    mut ws: WebSocketStream<S>,
    mut shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (session, mut rx) = hub
        .sessions
        .open(Identity::guest(), hub.limits.outbox_capacity);
    let mut conn = ConnState::new(session);
    router::welcome(&conn);
    let close: Option<CloseReason> = loop {
        tokio::select! {
            biased;
            _ = crate::server::stopped(&mut shutdown) => break Some(CloseReason::Shutdown),
            out = rx.recv() => match out {
                Some(Out::Frame(frame)) => match write_batch(&mut ws, &mut rx, frame).await {
                    Ok(None) => {}
                    Ok(Some(reason)) => break Some(reason),
                    Err(_) => break None,
                },
                Some(Out::Close(reason)) => break Some(reason),
                None => break None,
            },
            incoming = ws.next() => match incoming {
                Some(Ok(Message::Text(text))) => router::handle_text(&hub, &mut conn, &text),
                Some(Ok(Message::Binary(_))) => router::handle_binary(&conn),
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                    // tungstenite queued the pong; send it now.
                    if ws.flush().await.is_err() {
                        break None;
                    }
                }
                Some(Ok(Message::Close(_))) | None => break None,
                Some(Err(e)) => break close_reason_of(&e),
            },
        }
    };
    router::leave_all(&hub, &mut conn);
    hub.sessions.close(&conn.session.connection_id);
    match close {
        Some(reason) => {
            // Deliver what is already queued (the last acks) before closing, unless the client is
            // the reason the outbox overflowed.
            if reason != CloseReason::SlowConsumer {
                while let Some(Out::Frame(frame)) = rx.try_recv() {
                    if ws.feed(Message::Text(frame)).await.is_err() {
                        return;
                    }
                }
            }
            let (code, text) = reason.close_code();
            let _ = ws
                .close(Some(CloseFrame {
                    code,
                    reason: text.into(),
                }))
                .await;
        }
        None => {
            let _ = ws.close(None).await;
        }
    }
}

/// Writes `first` and whatever else is queued, then flushes once. Returns a close request found
/// in the queue.
async fn write_batch<S>(
    ws: &mut WebSocketStream<S>,
    rx: &mut OutboxRx,
    first: crate::protocol::Frame,
) -> Result<Option<CloseReason>, WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    ws.feed(Message::Text(first)).await?;
    let mut close = None;
    for _ in 0..MAX_BATCH {
        match rx.try_recv() {
            Some(Out::Frame(frame)) => ws.feed(Message::Text(frame)).await?,
            Some(Out::Close(reason)) => {
                close = Some(reason);
                break;
            }
            None => break,
        }
    }
    ws.flush().await?;
    Ok(close)
}

fn close_reason_of(err: &WsError) -> Option<CloseReason> {
    match err {
        WsError::Capacity(_) => Some(CloseReason::FrameTooLarge),
        WsError::Protocol(_) => Some(CloseReason::Protocol),
        WsError::Utf8(_) => Some(CloseReason::InvalidData),
        _ => None,
    }
}
