//! One WebSocket connection: reads client frames into the router, and writes the session's
//! outbox to the socket, batching queued frames into one flush.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::task::ArcWake;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::error::CloseReason;
use crate::protocol::Frame;
use crate::router::{self, ConnState, Hub};
use crate::session::Identity;
use crate::session::outbox::{Next, ReceiverWaker};

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
    // The socket is polled with its own waker, so that a wake-up by the outbox alone (a frame
    // from a room, say) writes without polling the socket: a poll re-registers read interest,
    // and that costs as much as a tenth of the delivery.
    let socket = Arc::new(SocketWake {
        ready: AtomicBool::new(true),
        task: rx.receiver_waker(),
    });
    let socket_waker = futures_util::task::waker(socket.clone());
    let close: Option<CloseReason> = loop {
        // Within a burst (right after a client frame was handled), the next client frame is
        // taken first if it has already arrived, up to READ_BURST, so that the answers to
        // pipelined frames leave in one write. Otherwise the outbox comes first: a wake-up is
        // most often a frame queued by someone else, and the socket is looked at after it.
        let event = poll_fn(|cx| {
            let mut socket_cx = Context::from_waker(&socket_waker);
            loop {
                let in_burst = (1..READ_BURST).contains(&burst);
                if in_burst && let Some(incoming) = socket.poll(&mut ws, &mut socket_cx) {
                    burst += 1;
                    return Poll::Ready(Event::Client(incoming));
                }
                if let Poll::Ready(next) = rx.poll_next(cx, &mut batch) {
                    burst = 0;
                    return Poll::Ready(Event::Outbox(next));
                }
                if !in_burst && let Some(incoming) = socket.poll(&mut ws, &mut socket_cx) {
                    burst = 1;
                    return Poll::Ready(Event::Client(incoming));
                }
                // Going to sleep, with this task's waker armed by the outbox's `poll_next`
                // above: the socket's waker wakes the task through it. A wake-up of the socket
                // before it was armed left `ready` set: look again.
                if !socket.ready.load(Ordering::Acquire) {
                    return Poll::Pending;
                }
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

/// The waker the socket is polled with: it records that the socket woke the task.
struct SocketWake {
    /// The socket may have something to read: set by its wake-ups, and while frames are being
    /// read; cleared before a poll that may find nothing.
    ready: AtomicBool,
    /// The connection's task, while it sleeps: the waker its outbox armed (one registration per
    /// sleep for both wake-up sources).
    task: ReceiverWaker,
}

impl ArcWake for SocketWake {
    fn wake_by_ref(arc_self: &Arc<Self>) {
        arc_self.ready.store(true, Ordering::Release);
        arc_self.task.wake();
    }
}

impl SocketWake {
    /// Polls the socket for the next client frame if it may have one. `None`: nothing now (a
    /// wake-up of the socket's waker will say when to look again).
    fn poll<S>(
        &self,
        ws: &mut WebSocketStream<S>,
        cx: &mut Context<'_>,
    ) -> Option<Option<Result<Message, WsError>>>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        // Cleared before the poll: a wake-up during or after it sets it again.
        if !self.ready.swap(false, Ordering::AcqRel) {
            return None;
        }
        match ws.poll_next_unpin(cx) {
            Poll::Ready(incoming) => {
                // More frames may be buffered already.
                self.ready.store(true, Ordering::Release);
                Some(incoming)
            }
            Poll::Pending => None,
        }
    }
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
