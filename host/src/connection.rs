//! One WebSocket connection: reads client frames into the router, writes the session's outbox
//! to the socket (batching queued frames into one flush, each write under a deadline), keeps
//! the heartbeat, and on its end either ends the session or leaves it waiting for a resume.

use std::collections::VecDeque;
use std::future::{Future, poll_fn};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use futures_util::task::ArcWake;
use futures_util::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::auth::Claims;
use crate::error::CloseReason;
use crate::lifecycle;
use crate::protocol;
use crate::router::{self, ConnState, Hub};
use crate::session::Identity;
use crate::session::outbox::{Entry, Next, OutboxRx, ReceiverWaker};
use crate::timers::capped;

/// Most client frames handled in a row before what they queued is written.
const READ_BURST: u32 = 16;
/// How long the last frames and the close handshake may take.
const CLOSE_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Serves one upgraded connection until it closes or the host shuts down.
pub async fn serve<S>(
    hub: Arc<Hub>,
    mut ws: WebSocketStream<S>,
    identity: Identity,
    claims: Option<Arc<Claims>>,
    shutdown: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = ConnState::open(&hub, identity);
    conn.session.set_claims(claims);
    router::welcome(&conn);
    // Plugins subscribed to `connect` learn of the session after its welcome is queued.
    Box::pin(router::session_event(
        &hub,
        &conn.session,
        crate::manifest::HostEvent::Connect,
    ))
    .await;
    // Shutdown reaches a connection as a close request in its outbox (see
    // `Sessions::close_all`), after the frames already queued. A session registered after the
    // host began shutting down closes itself here.
    if *shutdown.borrow() {
        conn.session.outbox.close(CloseReason::Shutdown);
    }
    let policy = hub.policy;
    let mut batch = VecDeque::new();
    // Client frames handled since the last write.
    let mut burst = 0;
    // The socket is polled with its own waker, so that a wake-up by the outbox alone (a frame
    // from a room) writes without polling the socket: a poll re-registers read interest, and
    // that costs as much as a tenth of the delivery.
    let (mut socket, mut socket_waker) = SocketWake::arm(&conn.rx);
    // WebSocket pings: the next one is due when this fires; while a pong is awaited, it is the
    // pong's deadline.
    let heartbeat = tokio::time::sleep(policy.ping_interval);
    tokio::pin!(heartbeat);
    let mut awaiting_pong = false;
    // The token's expiry: the connection closes then (4401) unless `sys.refresh` moved it.
    let mut valid_until = conn.session.valid_until();
    let expiry = tokio::time::sleep_until(expiry_instant(valid_until));
    tokio::pin!(expiry);
    let exit = loop {
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
                if let Poll::Ready(next) = conn.rx.poll_next(cx, &mut batch) {
                    burst = 0;
                    return Poll::Ready(Event::Outbox(next));
                }
                if !in_burst && let Some(incoming) = socket.poll(&mut ws, &mut socket_cx) {
                    burst = 1;
                    return Poll::Ready(Event::Client(incoming));
                }
                // Going to sleep, with this task's waker armed by the outbox's `poll_next`
                // above: the socket's waker wakes the task through it. A wake-up of the socket
                // before it was armed left `ready` set: look again. The heartbeat is looked at
                // only here: a connection busy with its client's frames is alive.
                if !socket.ready.load(Ordering::Acquire) {
                    if heartbeat.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Event::Heartbeat);
                    }
                    if valid_until.is_some() && expiry.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Event::TokenExpired);
                    }
                    return Poll::Pending;
                }
            }
        })
        .await;
        // Awake now: what this task queues while it handles a frame is written on the next
        // turn of the loop, without waking itself.
        conn.rx.disarm();
        match event {
            Event::Outbox(Next::Frames) => {
                // Most writes complete at once (the socket takes the whole batch): no deadline
                // is set for them. A write the client does not take ends at its deadline, or
                // as soon as the outbox overflows behind it.
                let too_slow = {
                    let mut write = std::pin::pin!(write_batch(&mut ws, &mut batch));
                    match write.as_mut().now_or_never() {
                        Some(Ok(())) => false,
                        Some(Err(_)) => break Exit::Dropped,
                        None => {
                            let write = tokio::time::timeout(policy.write_timeout, write);
                            let overflow = poll_fn(|cx| conn.rx.poll_overflow(cx));
                            tokio::select! {
                                biased;
                                written = write => match written {
                                    Ok(Ok(())) => false,
                                    Ok(Err(_)) => break Exit::Dropped,
                                    Err(_) => true,
                                },
                                () = overflow => true,
                            }
                        }
                    }
                };
                if too_slow {
                    batch.clear();
                    break Exit::Close(CloseReason::SlowConsumer);
                }
            }
            Event::Outbox(Next::Close(reason)) => break Exit::Close(reason),
            Event::TokenExpired => break Exit::Close(CloseReason::TokenExpired),
            Event::Heartbeat => {
                if awaiting_pong {
                    break Exit::Close(CloseReason::HeartbeatTimeout);
                }
                awaiting_pong = true;
                heartbeat
                    .as_mut()
                    .reset(tokio::time::Instant::now() + capped(policy.pong_timeout));
                let ping = ws.send(Message::Ping(Default::default()));
                match tokio::time::timeout(policy.write_timeout, ping).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => break Exit::Dropped,
                    Err(_) => break Exit::Close(CloseReason::SlowConsumer),
                }
            }
            Event::Client(incoming) => match incoming {
                Some(Ok(Message::Text(text))) => {
                    // Boxed: the handling future is large and lives only while a message is
                    // handled, so an idle connection's task stays small.
                    Box::pin(router::handle_text(&hub, &mut conn, &text)).await;
                    // A `sys.refresh` or a resume may have changed the token's expiry; a
                    // connection too busy to sleep is closed at expiry all the same.
                    let now_valid_until = conn.session.valid_until();
                    if now_valid_until != valid_until {
                        valid_until = now_valid_until;
                        expiry.as_mut().reset(expiry_instant(valid_until));
                    } else if valid_until.is_some()
                        && tokio::time::Instant::now() >= expiry.deadline()
                    {
                        break Exit::Close(CloseReason::TokenExpired);
                    }
                    if conn.switched {
                        // A resume moved this connection to another session: its wake-ups go
                        // through that session's outbox now.
                        conn.switched = false;
                        (socket, socket_waker) = SocketWake::arm(&conn.rx);
                    }
                }
                Some(Ok(Message::Binary(_))) => router::handle_binary(&conn),
                Some(Ok(Message::Pong(_))) => {
                    if awaiting_pong {
                        awaiting_pong = false;
                        heartbeat
                            .as_mut()
                            .reset(tokio::time::Instant::now() + capped(policy.ping_interval));
                    }
                }
                Some(Ok(Message::Ping(_) | Message::Frame(_))) => {
                    // tungstenite queued the pong; send it now.
                    match tokio::time::timeout(policy.write_timeout, ws.flush()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => break Exit::Dropped,
                        Err(_) => break Exit::Close(CloseReason::SlowConsumer),
                    }
                }
                Some(Ok(Message::Close(_))) => break Exit::ClientClosed,
                None => break Exit::Dropped,
                Some(Err(e)) => break close_reason_of(&e).map_or(Exit::Dropped, Exit::Close),
            },
        }
    };
    let grace = CLOSE_GRACE.min(policy.write_timeout);
    let (session, mut rx, driver) = conn.into_parts();
    // In a cluster, a session outlives its node's shutdown: its client resumes it on another
    // node, from what its journal saved.
    let outlives = hub.cluster.get().is_some();
    match exit {
        Exit::ClientClosed | Exit::Close(CloseReason::Shutdown) => {
            if exit != Exit::ClientClosed {
                // Deliver what is already queued (the last acks) before closing.
                let _ = tokio::time::timeout(grace, async {
                    if let Some(Next::Frames) = rx.try_next(&mut batch) {
                        let _ = write_batch(&mut ws, &mut batch).await;
                    }
                })
                .await;
            }
            drop(rx);
            let end = match exit {
                Exit::ClientClosed => Some(lifecycle::End::Closed),
                _ if outlives => None,
                _ => Some(lifecycle::End::Shutdown),
            };
            if let Some(end) = end {
                Box::pin(lifecycle::end_session(&hub, &session, end)).await;
            }
        }
        // Another connection has taken the session over: nothing is left to do for it here.
        Exit::Close(CloseReason::TakenOver) => drop(rx),
        // Dropped, too slow, or a protocol error: the session waits for a resume. Marked
        // detached before the right to drive it is let go, so that a resume finds it so.
        _ => {
            drop(rx);
            Box::pin(lifecycle::detached(&hub, &session)).await;
        }
    }
    drop(driver);
    // A client that stopped reading must not hold up shutdown: the goodbye has a deadline.
    let goodbye = async {
        match exit {
            Exit::Close(reason) => {
                let (code, text) = reason.close_code();
                let frame = CloseFrame {
                    code,
                    reason: text.into(),
                };
                if ws.close(Some(frame)).await.is_ok() {
                    // The close handshake: read (and drop) what the client still sends until
                    // its close comes back, so that the socket is not closed with unread data,
                    // which would reset the connection and could lose the close frame.
                    while let Some(Ok(_)) = ws.next().await {}
                }
            }
            Exit::ClientClosed | Exit::Dropped => {
                let _ = ws.close(None).await;
            }
        }
    };
    let _ = tokio::time::timeout(grace, Box::pin(goodbye)).await;
}

/// Why a connection's loop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Exit {
    /// The client sent a close frame: its session ends.
    ClientClosed,
    /// The socket ended or failed without a close frame: the session waits for a resume.
    Dropped,
    /// The host closes the connection for this reason.
    Close(CloseReason),
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
    /// A socket waker that wakes the task through `rx`'s armed waker, and the waker itself.
    fn arm(rx: &OutboxRx) -> (Arc<SocketWake>, std::task::Waker) {
        let socket = Arc::new(SocketWake {
            // Look at the socket on the next turn: the waker it holds may be an older one.
            ready: AtomicBool::new(true),
            task: rx.receiver_waker(),
        });
        let waker = futures_util::task::waker(socket.clone());
        (socket, waker)
    }

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
    /// A ping is due, or the pong's deadline passed.
    Heartbeat,
    /// The connection's token expired.
    TokenExpired,
}

/// When a connection whose token is valid until `valid_until` (Unix seconds) closes; far off
/// without a token.
fn expiry_instant(valid_until: Option<u64>) -> tokio::time::Instant {
    match valid_until {
        Some(t) => crate::auth::deadline(t),
        // Never, as tokio's timer counts it.
        None => tokio::time::Instant::now() + crate::timers::FOREVER,
    }
}

/// Writes every frame of `batch`, then flushes once.
async fn write_batch<S>(
    ws: &mut WebSocketStream<S>,
    batch: &mut VecDeque<Entry>,
) -> Result<(), WsError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for entry in batch.drain(..) {
        ws.feed(Message::Text(protocol::with_seq(entry.seq, &entry.frame)))
            .await?;
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
