//! One WebSocket connection: reads client frames into the router, and writes the session's
//! outbox to the socket, batching queued frames into one flush.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::error::CloseReason;
use crate::outbox::Next;
use crate::protocol::Frame;
use crate::router::{self, ConnState, Hub};
use crate::session::Identity;

/// Most client frames handled in a row before what they queued is written.
const READ_BURST: u32 = 16;
/// How long the last frames and the close handshake may take.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves one upgraded connection until it closes or the host shuts down.
pub async fn serve<S>(hub: Arc<Hub>, mut ws: WebSocketStream<S>, shutdown: watch::Receiver<bool>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (session, mut rx) = hub
        .sessions
        .open(Identity::guest(), hub.limits.outbox_capacity);
    let mut conn = ConnState::new(session);
    router::welcome(&conn);
    // Shutdown reaches a connection as a close request in its outbox (see
    // `Sessions::close_all`), after the frames already queued. A session registered after the
    // host began shutting down closes itself here.
    if *shutdown.borrow() {
        conn.session.outbox.close(CloseReason::Shutdown);
    }
    let mut batch = VecDeque::new();
    // Client frames handled since the last write.
    let mut burst = 0;
    let close: Option<CloseReason> = loop {
        // Client frames that have already arrived are handled first, up to a burst, so that
        // their answers go out in one write; then the queued frames; then sleep on both.
        let event = poll_fn(|cx| {
            if burst < READ_BURST
                && let Poll::Ready(incoming) = ws.poll_next_unpin(cx)
            {
                burst += 1;
                return Poll::Ready(Event::Client(incoming));
            }
            match rx.poll_next(cx, &mut batch) {
                Poll::Ready(next) => {
                    burst = 0;
                    Poll::Ready(Event::Outbox(next))
                }
                Poll::Pending if burst >= READ_BURST => {
                    // Nothing to write after all: read on.
                    burst = 1;
                    ws.poll_next_unpin(cx).map(Event::Client)
                }
                Poll::Pending => Poll::Pending,
            }
        })
        .await;
        // Awake now: what this task queues while it handles a frame is written on the next
        // turn of the loop, without waking itself.
        rx.disarm();
        match event {
            Event::Outbox(Next::Frames) => {
                if write_batch(&mut ws, &mut batch).await.is_err() {
                    break None;
                }
            }
            Event::Outbox(Next::Close(reason)) => break Some(reason),
            Event::Client(incoming) => match incoming {
                Some(Ok(Message::Text(text))) => {
                    // Boxed: the handling future is large and lives only while a message is
                    // handled, so an idle connection's task stays small.
                    Box::pin(router::handle_text(&hub, &mut conn, &text)).await;
                }
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
    Box::pin(router::leave_all(&hub, &mut conn)).await;
    hub.sessions.close(&conn.session.connection_id);
    // A client that stopped reading must not hold up shutdown: the goodbye has a deadline.
    let goodbye = async {
        match close {
            Some(reason) => {
                // Deliver what is already queued (the last acks) before closing, unless the
                // client is the reason the outbox overflowed.
                if reason != CloseReason::SlowConsumer
                    && let Some(Next::Frames) = rx.try_next(&mut batch)
                    && write_batch(&mut ws, &mut batch).await.is_err()
                {
                    return;
                }
                let (code, text) = reason.close_code();
                let frame = CloseFrame {
                    code,
                    reason: text.into(),
                };
                let _ = ws.close(Some(frame)).await;
            }
            None => {
                let _ = ws.close(None).await;
            }
        }
    };
    let _ = tokio::time::timeout(CLOSE_GRACE, Box::pin(goodbye)).await;
}

/// What wakes a connection's task.
enum Event {
    Outbox(Next),
    Client(Option<Result<Message, WsError>>),
}

/// Writes every frame of `batch`, then flushes once.
async fn write_batch<S>(
    ws: &mut WebSocketStream<S>,
    batch: &mut VecDeque<Frame>,
) -> Result<(), WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for frame in batch.drain(..) {
        ws.feed(Message::Text(frame)).await?;
    }
    ws.flush().await
}

fn close_reason_of(err: &WsError) -> Option<CloseReason> {
    match err {
        WsError::Capacity(_) => Some(CloseReason::FrameTooLarge),
        WsError::Protocol(_) => Some(CloseReason::Protocol),
        WsError::Utf8(_) => Some(CloseReason::InvalidData),
        _ => None,
    }
}
