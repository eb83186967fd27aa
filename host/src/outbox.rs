//! The per-session outbox: every host-to-client frame of a connection passes through it, in
//! order. It is bounded; a client that does not read fast enough is closed as a slow consumer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use tokio::sync::mpsc;

use crate::error::CloseReason;
use crate::protocol::Frame;

/// What the connection task takes out of its outbox.
#[derive(Debug)]
pub enum Out {
    Frame(Frame),
    Close(CloseReason),
}

#[derive(Debug, Default)]
struct Shared {
    depth: AtomicUsize,
    closed: AtomicBool,
}

/// The sending side of an outbox; cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    tx: mpsc::UnboundedSender<Out>,
    shared: Arc<Shared>,
    capacity: usize,
}

/// The receiving side, owned by the connection task.
#[derive(Debug)]
pub struct OutboxRx {
    rx: mpsc::UnboundedReceiver<Out>,
    shared: Arc<Shared>,
}

/// Creates an outbox holding at most `capacity` undelivered frames.
pub fn outbox(capacity: usize) -> (Outbox, OutboxRx) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared::default());
    (
        Outbox {
            tx,
            shared: shared.clone(),
            capacity,
        },
        OutboxRx { rx, shared },
    )
}

impl Outbox {
    /// Queues a frame. Returns false when the frame was not queued: the connection is closing,
    /// or its outbox overflowed (then the connection is told to close as a slow consumer).
    pub fn push(&self, frame: Frame) -> bool {
        if self.shared.closed.load(Ordering::Relaxed) {
            return false;
        }
        if self.shared.depth.fetch_add(1, Ordering::Relaxed) >= self.capacity {
            self.shared.depth.fetch_sub(1, Ordering::Relaxed);
            self.close(CloseReason::SlowConsumer);
            return false;
        }
        if self.tx.send(Out::Frame(frame)).is_err() {
            self.shared.depth.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// Tells the connection to close (once; later calls do nothing).
    pub fn close(&self, reason: CloseReason) {
        if !self.shared.closed.swap(true, Ordering::Relaxed) {
            let _ = self.tx.send(Out::Close(reason));
        }
    }

    /// Whether the connection is closing.
    pub fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Relaxed) || self.tx.is_closed()
    }
}

impl OutboxRx {
    /// Waits for the next item.
    pub async fn recv(&mut self) -> Option<Out> {
        let out = self.rx.recv().await;
        self.account(&out);
        out
    }

    /// Takes the next item if one is queued.
    pub fn try_recv(&mut self) -> Option<Out> {
        let out = self.rx.try_recv().ok();
        self.account(&out);
        out
    }

    fn account(&self, out: &Option<Out>) {
        if let Some(Out::Frame(_)) = out {
            self.shared.depth.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overflow_closes_once_as_slow_consumer() {
        let (tx, mut rx) = outbox(2);
        assert!(tx.push("a".into()));
        assert!(tx.push("b".into()));
        assert!(!tx.push("c".into()));
        assert!(!tx.push("d".into()));
        assert!(matches!(rx.recv().await, Some(Out::Frame(f)) if f == "a"));
        assert!(matches!(rx.recv().await, Some(Out::Frame(f)) if f == "b"));
        assert!(matches!(
            rx.recv().await,
            Some(Out::Close(CloseReason::SlowConsumer))
        ));
        assert!(rx.try_recv().is_none());
        assert!(tx.is_closed());
    }

    #[tokio::test]
    async fn draining_makes_room() {
        let (tx, mut rx) = outbox(1);
        assert!(tx.push("a".into()));
        assert!(rx.try_recv().is_some());
        assert!(tx.push("b".into()));
    }
}
