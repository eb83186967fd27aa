//! The per-session outbox: every host-to-client frame of a connection passes through it, in
//! order. It is bounded; a client that does not read fast enough is closed as a slow consumer.
//! The connection task takes everything queued at once, writes it, and flushes once.
//!
//! The receiver is woken through an [`AtomicWaker`] that it arms only when it is about to sleep:
//! frames a connection queues for itself while it handles a message are written right after,
//! without waking its own task.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

use crate::error::CloseReason;
use crate::protocol::Frame;

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Frame>,
    close: Option<CloseReason>,
}

#[derive(Debug, Default)]
struct Shared {
    queue: Mutex<Queue>,
    /// The receiver's task while it sleeps: woken by a frame or a close request, and by the
    /// holders of a [`ReceiverWaker`] (the connection's socket), so that it arms one waker for
    /// everything it waits on.
    ready: AtomicWaker,
    /// Whether the queue holds frames or a close request: lets the receiver look without the
    /// lock. Written under the lock.
    signalled: AtomicBool,
    closed: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue inconsistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sending side of an outbox; cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
    capacity: usize,
}

/// The receiving side, owned by the connection task. Dropping it closes the outbox.
#[derive(Debug)]
pub struct OutboxRx {
    shared: Arc<Shared>,
}

/// Wakes an outbox's receiver for another reason than its outbox (its socket became readable),
/// through the waker the receiver armed in [`OutboxRx::poll_next`]. Once the receiver is awake
/// (disarmed), it is not woken: it looks at everything again before it sleeps.
#[derive(Debug, Clone)]
pub struct ReceiverWaker {
    shared: Arc<Shared>,
}

impl ReceiverWaker {
    pub fn wake(&self) {
        self.shared.ready.wake();
    }
}

/// Creates an outbox holding at most `capacity` undelivered frames.
pub fn outbox(capacity: usize) -> (Outbox, OutboxRx) {
    let shared = Arc::new(Shared::default());
    (
        Outbox {
            shared: shared.clone(),
            capacity,
        },
        OutboxRx { shared },
    )
}

impl Outbox {
    /// Queues a frame. Returns false when the frame was not queued: the connection is closing,
    /// or its outbox overflowed (then the connection is told to close as a slow consumer).
    pub fn push(&self, frame: Frame) -> bool {
        if self.shared.closed.load(Ordering::Relaxed) {
            return false;
        }
        let mut queue = self.shared.lock();
        if queue.close.is_some() {
            return false;
        }
        if queue.frames.len() >= self.capacity {
            queue.close = Some(CloseReason::SlowConsumer);
            queue.frames.clear();
            self.shared.signalled.store(true, Ordering::Release);
            drop(queue);
            self.shared.closed.store(true, Ordering::Relaxed);
            self.shared.ready.wake();
            return false;
        }
        let was_empty = queue.frames.is_empty();
        queue.frames.push_back(frame);
        self.shared.signalled.store(true, Ordering::Release);
        drop(queue);
        if was_empty {
            self.shared.ready.wake();
        }
        true
    }

    /// Queues a volatile frame (a typing indicator, a cursor move): one a late or slow client
    /// can do without. It is dropped, and the connection left open, when the outbox is half
    /// full, so that a slow consumer loses these first. Returns whether it was queued.
    pub fn push_volatile(&self, frame: Frame) -> bool {
        if self.shared.lock().frames.len() >= self.capacity / 2 {
            return false;
        }
        self.push(frame)
    }

    /// Tells the connection to close once the frames already queued are written (the first
    /// reason wins).
    pub fn close(&self, reason: CloseReason) {
        let mut queue = self.shared.lock();
        if queue.close.is_none() {
            queue.close = Some(reason);
            self.shared.signalled.store(true, Ordering::Release);
            drop(queue);
            self.shared.closed.store(true, Ordering::Relaxed);
            self.shared.ready.wake();
        }
    }

    /// Whether the connection is closing.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Relaxed)
    }
}

/// What the connection task takes out of its outbox.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Frames were moved into the caller's batch.
    Frames,
    /// Nothing is left to write; close the connection.
    Close(CloseReason),
}

impl OutboxRx {
    /// Waits until frames are queued and moves all of them into `batch` (which must be empty),
    /// or returns the close request once every frame queued before it was taken.
    /// Cancel-safe: frames stay queued until a call returns them.
    pub async fn next(&mut self, batch: &mut VecDeque<Frame>) -> Next {
        poll_fn(|cx| self.poll_next(cx, batch)).await
    }

    /// Like [`OutboxRx::next`], as a poll: when nothing is queued, arms the wake-up for `cx`
    /// and returns `Pending`.
    pub fn poll_next(&mut self, cx: &mut Context<'_>, batch: &mut VecDeque<Frame>) -> Poll<Next> {
        if let Some(next) = self.try_next(batch) {
            return Poll::Ready(next);
        }
        self.shared.ready.register(cx.waker());
        // A frame pushed between the check and the registration did not see the waker.
        match self.try_next(batch) {
            Some(next) => Poll::Ready(next),
            None => Poll::Pending,
        }
    }

    /// A waker for the receiver's other wake-ups; see [`ReceiverWaker`].
    pub fn receiver_waker(&self) -> ReceiverWaker {
        ReceiverWaker {
            shared: self.shared.clone(),
        }
    }

    /// Disarms the wake-up armed by a `Pending` [`OutboxRx::poll_next`]: the receiver is awake
    /// and will look at the queue again before it sleeps, so pushes need not wake it.
    pub fn disarm(&self) {
        drop(self.shared.ready.take());
    }

    /// Like [`OutboxRx::next`] without waiting.
    pub fn try_next(&mut self, batch: &mut VecDeque<Frame>) -> Option<Next> {
        debug_assert!(batch.is_empty());
        if !self.shared.signalled.load(Ordering::Acquire) {
            return None;
        }
        let mut queue = self.shared.lock();
        if !queue.frames.is_empty() {
            std::mem::swap(batch, &mut queue.frames);
            if queue.close.is_none() {
                self.shared.signalled.store(false, Ordering::Release);
            }
            return Some(Next::Frames);
        }
        queue.close.map(Next::Close)
    }
}

impl Drop for OutboxRx {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Relaxed);
        self.shared.lock().frames.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overflow_closes_as_slow_consumer_and_drops_the_backlog() {
        let (tx, mut rx) = outbox(2);
        assert!(tx.push("a".into()));
        assert!(tx.push("b".into()));
        assert!(!tx.push("c".into()));
        assert!(!tx.push("d".into()));
        assert!(tx.is_closed());
        let mut batch = VecDeque::new();
        assert_eq!(
            rx.next(&mut batch).await,
            Next::Close(CloseReason::SlowConsumer)
        );
        assert!(batch.is_empty());
    }

    #[tokio::test]
    async fn volatile_frames_are_dropped_from_half_full_without_closing() {
        let (tx, mut rx) = outbox(4);
        assert!(tx.push_volatile("v1".into()));
        assert!(tx.push("a".into()));
        // Half full: a volatile frame is dropped, the connection stays open.
        assert!(!tx.push_volatile("v2".into()));
        assert!(!tx.is_closed());
        assert!(tx.push("b".into()));
        let mut batch = VecDeque::new();
        assert_eq!(rx.next(&mut batch).await, Next::Frames);
        assert_eq!(batch, ["v1", "a", "b"]);
        // Once drained, volatile frames flow again.
        assert!(tx.push_volatile("v3".into()));
    }

    #[tokio::test]
    async fn frames_queued_before_a_close_are_delivered_first() {
        let (tx, mut rx) = outbox(8);
        assert!(tx.push("a".into()));
        assert!(tx.push("b".into()));
        tx.close(CloseReason::Shutdown);
        assert!(!tx.push("c".into()));
        let mut batch = VecDeque::new();
        assert_eq!(rx.next(&mut batch).await, Next::Frames);
        assert_eq!(batch, ["a", "b"]);
        batch.clear();
        assert_eq!(
            rx.next(&mut batch).await,
            Next::Close(CloseReason::Shutdown)
        );
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_on_push() {
        let (tx, mut rx) = outbox(8);
        let waiter = tokio::spawn(async move {
            let mut batch = VecDeque::new();
            rx.next(&mut batch).await;
            batch
        });
        tokio::task::yield_now().await;
        assert!(tx.push("x".into()));
        assert_eq!(waiter.await.unwrap(), ["x"]);
    }

    /// Counts the wake-ups of a task.
    #[derive(Default)]
    struct Wakes(std::sync::atomic::AtomicUsize);

    impl futures_util::task::ArcWake for Wakes {
        fn wake_by_ref(arc_self: &Arc<Self>) {
            arc_self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn only_a_sleeping_receiver_is_woken() {
        let (tx, mut rx) = outbox(8);
        let wakes = Arc::new(Wakes::default());
        let waker = futures_util::task::waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut batch = VecDeque::new();
        // Asleep: a push wakes it, and the next look finds the frame.
        assert!(rx.poll_next(&mut cx, &mut batch).is_pending());
        assert!(tx.push("a".into()));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert_eq!(rx.poll_next(&mut cx, &mut batch), Poll::Ready(Next::Frames));
        assert_eq!(batch, ["a"]);
        batch.clear();
        // Awake (disarmed): a push does not wake it; it finds the frame when it looks again.
        assert!(rx.poll_next(&mut cx, &mut batch).is_pending());
        rx.disarm();
        assert!(tx.push("b".into()));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert_eq!(rx.try_next(&mut batch), Some(Next::Frames));
        assert_eq!(batch, ["b"]);
        batch.clear();
        // A close request wakes a sleeping receiver too.
        assert!(rx.poll_next(&mut cx, &mut batch).is_pending());
        tx.close(CloseReason::Shutdown);
        assert_eq!(wakes.0.load(Ordering::SeqCst), 2);
        assert_eq!(
            rx.poll_next(&mut cx, &mut batch),
            Poll::Ready(Next::Close(CloseReason::Shutdown))
        );
    }

    #[test]
    fn dropping_the_receiver_closes() {
        let (tx, rx) = outbox(8);
        drop(rx);
        assert!(!tx.push("a".into()));
    }
}
