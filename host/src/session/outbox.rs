//! A session's stream of host-to-client frames: every frame a session receives passes through
//! it, in order. A non-volatile frame gets the session's next `seq` and is kept (bounded by frames
//! and bytes) for a resume; the live queue holds what the attached connection has yet to write,
//! bounded by frames and bytes: a client that does not read fast enough is closed as a slow
//! consumer, and what it missed stays kept. Volatile frames get no `seq`, are not kept, and are
//! the first dropped. The connection task takes everything queued at once, writes it, and flushes
//! once.
//!
//! The stream outlives its connection: a receiver is attached per connection ([`Outbox::attach`])
//! and detached when dropped; meanwhile frames are kept only.
//!
//! The receiver is woken through an [`AtomicWaker`] that it arms only when it is about to sleep:
//! frames a connection queues for itself while it handles a message are written right after,
//! without waking its own task.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;

use super::journal::{Journal, Source};
use super::replay::Replay;
use crate::error::CloseReason;
use crate::protocol::Frame;

/// How much a stream holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Frames queued for the connection and not yet written; one more closes it (1013).
    pub live_frames: usize,
    /// Bytes queued for the connection and not yet written; more close it (1013). A frame larger
    /// than this alone is still queued when nothing else is.
    pub live_bytes: usize,
    /// Non-volatile frames kept for a resume (the oldest go first).
    pub kept_frames: usize,
    /// Bytes of non-volatile frames kept for a resume (the oldest go first).
    pub kept_bytes: usize,
}

impl Default for Bounds {
    fn default() -> Self {
        Bounds {
            live_frames: 4096,
            live_bytes: 4 << 20,
            kept_frames: 1000,
            kept_bytes: 1 << 20,
        }
    }
}

/// A frame and its place in the session's stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The frame's `seq`; 0 for a volatile frame, which has none.
    pub seq: u64,
    /// The frame without its `seq` (shared by every recipient of a broadcast).
    pub frame: Frame,
}

#[derive(Debug)]
struct Queue {
    /// What the attached connection has yet to write.
    live: VecDeque<Entry>,
    live_bytes: usize,
    /// A replay's frames and bytes, queued on top of the live bounds until the connection
    /// takes them.
    replay: (usize, usize),
    /// The non-volatile frames kept for a resume, and the `seq` counter.
    kept: Replay,
    /// The generation of the attached receiver, if any.
    attached: Option<u64>,
    generations: u64,
    /// A close request to the attached receiver.
    close: Option<CloseReason>,
    /// The session is over: nothing is queued any more.
    ended: bool,
    /// While a session moves here from another node, the frames pushed meanwhile (with the
    /// room offset they came at), queued after what the move brings along.
    held: Option<Vec<Placed>>,
}

/// A frame and, for a room's frame, the room and the offset it came at.
pub type Placed = (Frame, Option<(Arc<str>, u64)>);

/// The journal a session's frames are saved to, and the session's id there.
#[derive(Debug)]
struct Hook {
    journal: Arc<dyn Journal>,
    session: Arc<str>,
}

#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    bounds: Bounds,
    /// The receiver's task while it sleeps: woken by a frame or a close request, and by the
    /// holders of a [`ReceiverWaker`] (the connection's socket), so that it arms one waker for
    /// everything it waits on.
    ready: AtomicWaker,
    /// Whether the live queue holds frames or a close request: lets the receiver look without
    /// the lock. Written under the lock.
    signalled: AtomicBool,
    /// Where the session's frames are saved, in a cluster.
    hook: Option<Hook>,
    /// The last `seq` the journal saved: while it holds frames back, the connection writes
    /// no frame after it.
    saved: AtomicU64,
}

impl Shared {
    /// The last `seq` the connection may write now: the last one the journal saved while it
    /// holds frames back, else any.
    fn writable(&self) -> u64 {
        match &self.hook {
            Some(hook) if hook.journal.holding() => self.saved.load(Ordering::Acquire),
            _ => u64::MAX,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue inconsistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sending side of a session's stream; cheap to clone.
#[derive(Debug, Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

/// The receiving side, owned by the connection task attached to the session. Dropping it
/// detaches the connection: frames are then kept only.
#[derive(Debug)]
pub struct OutboxRx {
    shared: Arc<Shared>,
    generation: u64,
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

/// Why a receiver could not be attached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AttachError {
    /// Frames after the client's last `seq` are no longer all kept.
    #[error("frames {first_missing} to {first_kept_or_next} are no longer kept")]
    Gap {
        first_missing: u64,
        first_kept_or_next: u64,
    },
    /// The client claims a `seq` the session never sent.
    #[error("lastSeq {last_seq} is ahead of the session's last seq {last_sent}")]
    Ahead { last_seq: u64, last_sent: u64 },
    /// Another connection is attached.
    #[error("another connection is attached")]
    Attached,
    /// The session is over.
    #[error("the session has ended")]
    Ended,
}

/// Creates a session's stream, detached.
pub fn outbox(bounds: Bounds) -> Outbox {
    build(
        bounds,
        Replay::new(bounds.kept_frames, bounds.kept_bytes),
        None,
    )
}

/// Creates a session's stream whose frames are saved to `journal` under `session`, detached.
pub fn journaled(bounds: Bounds, journal: Arc<dyn Journal>, session: Arc<str>) -> Outbox {
    let kept = Replay::new(bounds.kept_frames, bounds.kept_bytes);
    build(bounds, kept, Some(Hook { journal, session }))
}

/// Creates the stream of a session that moves here from another node, detached and holding
/// back what is pushed until [`Outbox::release`]: `kept` are the frames saved for it (with
/// contiguous `seq`s ending at `next_seq - 1`).
pub fn moved(
    bounds: Bounds,
    journal: Arc<dyn Journal>,
    session: Arc<str>,
    next_seq: u64,
    kept: Vec<(u64, Frame)>,
) -> Outbox {
    let kept = Replay::resumed(bounds.kept_frames, bounds.kept_bytes, next_seq, kept);
    let saved = kept.last_seq();
    let outbox = build(bounds, kept, Some(Hook { journal, session }));
    outbox.shared.saved.store(saved, Ordering::Release);
    outbox.shared.lock().held = Some(Vec::new());
    outbox
}

fn build(bounds: Bounds, kept: Replay, hook: Option<Hook>) -> Outbox {
    Outbox {
        shared: Arc::new(Shared {
            queue: Mutex::new(Queue {
                live: VecDeque::new(),
                live_bytes: 0,
                replay: (0, 0),
                kept,
                attached: None,
                generations: 0,
                close: None,
                ended: false,
                held: None,
            }),
            bounds,
            ready: AtomicWaker::new(),
            signalled: AtomicBool::new(false),
            hook,
            saved: AtomicU64::new(0),
        }),
    }
}

impl Outbox {
    /// Queues a non-volatile frame: it gets the next `seq`, is kept for a resume and, when a
    /// connection is attached, queued for it. An overflow of the live queue closes the
    /// connection as a slow consumer (the frames it missed stay kept). Returns false when the
    /// session is over.
    pub fn push(&self, frame: Frame) -> bool {
        self.push_from(frame, Source::Own)
    }

    /// Like [`Outbox::push`] for a frame of this session alone (an answer, a reply), encoded
    /// with its `seq` (`encode` is given the `seq`, or 0 for a frame that gets one later), so
    /// that writing it copies nothing ([`crate::protocol::with_seq`]). Returns the frame
    /// queued, or `None` when the session is over.
    pub fn push_numbered(&self, encode: impl FnOnce(u64) -> Frame) -> Option<Frame> {
        let queue = self.shared.lock();
        if queue.ended {
            return None;
        }
        let seq = if queue.held.is_some() {
            0
        } else {
            queue.kept.next_seq()
        };
        let frame = encode(seq);
        self.push_locked(queue, frame.clone(), Source::Own);
        Some(frame)
    }

    /// Like [`Outbox::push`], saying where the frame came from (for the journal).
    pub fn push_from(&self, frame: Frame, source: Source<'_>) -> bool {
        let queue = self.shared.lock();
        if queue.ended {
            return false;
        }
        self.push_locked(queue, frame, source);
        true
    }

    fn push_locked(&self, mut queue: MutexGuard<'_, Queue>, frame: Frame, source: Source<'_>) {
        let bounds = &self.shared.bounds;
        if let Some(held) = queue.held.as_mut() {
            let at = match source {
                Source::Room { room, offset } => Some((room.clone(), offset)),
                Source::Own => None,
            };
            // Numbered when released (a frame numbered earlier, anew).
            held.push((frame, at));
            return;
        }
        // A frame numbered already (`push_numbered`) carries the `seq` it gets here; one
        // numbered earlier (an answer given again to a retry) is numbered anew.
        let next = queue.kept.next_seq();
        let frame = if crate::protocol::seq_of(&frame).is_some_and(|seq| seq != next) {
            crate::protocol::without_seq(frame)
        } else {
            frame
        };
        let seq = queue.kept.record(&frame);
        if let Some(hook) = &self.shared.hook {
            hook.journal
                .append(&hook.session, seq, &frame, source, self);
        }
        let len = frame.len();
        let entry = Entry { seq, frame };
        if queue.attached.is_none() || queue.close.is_some() {
            return;
        }
        if !queue.live.is_empty()
            && (queue.live.len() >= bounds.live_frames + queue.replay.0
                || queue.live_bytes + len > bounds.live_bytes + queue.replay.1)
        {
            queue.close = Some(CloseReason::SlowConsumer);
            queue.live.clear();
            queue.live_bytes = 0;
            self.shared.signalled.store(true, Ordering::Release);
            drop(queue);
            self.shared.ready.wake();
            return;
        }
        self.enqueue(queue, entry, len);
    }

    /// Ends the hold of a session that moved here: queues `recovered` (frames of its rooms
    /// published while it was between nodes, with their room offsets), then what was pushed
    /// meanwhile, except the room frames `recovered` already holds (by offset).
    pub fn release(&self, recovered: Vec<Placed>) {
        let held = self.shared.lock().held.take().unwrap_or_default();
        let mut reached: std::collections::HashMap<Arc<str>, u64> = Default::default();
        for (_, at) in &recovered {
            if let Some((room, offset)) = at {
                let top = reached.entry(room.clone()).or_default();
                *top = (*top).max(*offset);
            }
        }
        let already = |at: &Option<(Arc<str>, u64)>| {
            at.as_ref()
                .is_some_and(|(room, offset)| reached.get(room).is_some_and(|top| offset <= top))
        };
        let held = held.into_iter().filter(|(_, at)| !already(at));
        for (frame, at) in recovered.into_iter().chain(held) {
            let source = match &at {
                Some((room, offset)) => Source::Room {
                    room,
                    offset: *offset,
                },
                None => Source::Own,
            };
            self.push_from(frame, source);
        }
    }

    /// The journal saved every frame up to `seq`: the connection may write them.
    pub fn saved(&self, seq: u64) {
        if self.shared.saved.fetch_max(seq, Ordering::AcqRel) < seq {
            self.shared.ready.wake();
        }
    }

    /// Queues a volatile frame (a typing indicator, a cursor move): one a late or slow client
    /// can do without. It has no `seq` and is not kept; it is dropped, and the connection left
    /// open, when no connection is attached or the live queue is half full (by frames or bytes),
    /// so that a slow consumer loses these first. Returns whether it was queued.
    pub fn push_volatile(&self, frame: Frame) -> bool {
        let bounds = &self.shared.bounds;
        let queue = self.shared.lock();
        let len = frame.len();
        if queue.ended
            || queue.attached.is_none()
            || queue.close.is_some()
            || queue.live.len() >= bounds.live_frames / 2
            || queue.live_bytes + len > bounds.live_bytes / 2
        {
            return false;
        }
        self.enqueue(queue, Entry { seq: 0, frame }, len);
        true
    }

    fn enqueue(&self, mut queue: MutexGuard<'_, Queue>, entry: Entry, len: usize) {
        // A frame the journal has yet to save wakes no one: the journal's `saved` will.
        let was_empty = queue.live.is_empty() && entry.seq <= self.shared.writable();
        queue.live.push_back(entry);
        queue.live_bytes += len;
        self.shared.signalled.store(true, Ordering::Release);
        drop(queue);
        if was_empty {
            self.shared.ready.wake();
        }
    }

    /// Tells the attached connection, if any, to close once the frames already queued are
    /// written (the first reason wins).
    pub fn close(&self, reason: CloseReason) {
        let mut queue = self.shared.lock();
        if queue.attached.is_some() && queue.close.is_none() {
            queue.close = Some(reason);
            self.shared.signalled.store(true, Ordering::Release);
            drop(queue);
            self.shared.ready.wake();
        }
    }

    /// Ends the stream: nothing more is queued or kept, and the attached connection, if any, is
    /// told to close with `reason` after what is queued.
    pub fn end(&self, reason: CloseReason) {
        self.close(reason);
        let mut queue = self.shared.lock();
        queue.ended = true;
        queue.kept.clear();
    }

    /// Whether a connection is attached (and not asked to close).
    pub fn is_attached(&self) -> bool {
        let queue = self.shared.lock();
        queue.attached.is_some() && queue.close.is_none()
    }

    /// Attaches a connection that has processed every frame up to `last_seq`: its live queue
    /// starts with the kept frames after `last_seq` (returned: how many). Fails, changing
    /// nothing, when one of them is no longer kept or a connection is attached.
    pub fn attach(&self, last_seq: u64) -> Result<(OutboxRx, usize), AttachError> {
        let mut queue = self.shared.lock();
        if queue.ended {
            return Err(AttachError::Ended);
        }
        if queue.attached.is_some() {
            return Err(AttachError::Attached);
        }
        let replay = queue.kept.after(last_seq)?;
        let replayed = replay.len();
        queue.live_bytes = replay.iter().map(|e| e.frame.len()).sum();
        queue.replay = (replayed, queue.live_bytes);
        queue.live = replay;
        queue.generations += 1;
        let generation = queue.generations;
        queue.attached = Some(generation);
        queue.close = None;
        self.shared
            .signalled
            .store(!queue.live.is_empty(), Ordering::Release);
        drop(queue);
        Ok((
            OutboxRx {
                shared: self.shared.clone(),
                generation,
            },
            replayed,
        ))
    }

    /// Whether a connection that processed every frame up to `last_seq` could attach (every
    /// frame after it is kept), whether or not one is attached now.
    pub fn resumable(&self, last_seq: u64) -> Result<(), AttachError> {
        let queue = self.shared.lock();
        if queue.ended {
            return Err(AttachError::Ended);
        }
        queue.kept.check(last_seq).map(|_| ())
    }

    /// Forgets the kept frames up to `seq` (the client has processed them).
    pub fn trim(&self, seq: u64) {
        self.shared.lock().kept.trim(seq);
    }

    /// The `seq` of the last non-volatile frame queued (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.shared.lock().kept.last_seq()
    }

    /// How many frames and bytes are kept for a resume.
    pub fn kept(&self) -> (usize, usize) {
        self.shared.lock().kept.kept()
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
    pub async fn next(&mut self, batch: &mut VecDeque<Entry>) -> Next {
        poll_fn(|cx| self.poll_next(cx, batch)).await
    }

    /// Like [`OutboxRx::next`], as a poll: when nothing is queued, arms the wake-up for `cx`
    /// and returns `Pending`.
    pub fn poll_next(&mut self, cx: &mut Context<'_>, batch: &mut VecDeque<Entry>) -> Poll<Next> {
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

    /// Resolves when the live queue overflowed (the client is a slow consumer): lets the
    /// connection stop waiting for a write the client is not reading.
    pub fn poll_overflow(&self, cx: &mut Context<'_>) -> Poll<()> {
        let overflowed = || self.shared.lock().close == Some(CloseReason::SlowConsumer);
        if overflowed() {
            return Poll::Ready(());
        }
        self.shared.ready.register(cx.waker());
        if overflowed() {
            Poll::Ready(())
        } else {
            Poll::Pending
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
    pub fn try_next(&mut self, batch: &mut VecDeque<Entry>) -> Option<Next> {
        debug_assert!(batch.is_empty());
        if !self.shared.signalled.load(Ordering::Acquire) {
            return None;
        }
        let mut queue = self.shared.lock();
        if queue.attached != Some(self.generation) {
            // Detached under it (cannot happen while it lives; kept for safety).
            return Some(Next::Close(CloseReason::TakenOver));
        }
        if !queue.live.is_empty() {
            // Only what the journal saved, while it holds frames back: another node can give
            // it again. (A volatile frame, `seq` 0, waits only for the frames before it.)
            let writable = self.shared.writable();
            let ready = if writable == u64::MAX {
                queue.live.len()
            } else {
                queue.live.iter().take_while(|e| e.seq <= writable).count()
            };
            if ready == 0 {
                return None;
            }
            if ready < queue.live.len() {
                batch.extend(queue.live.drain(..ready));
                queue.live_bytes -= batch.iter().map(|e| e.frame.len()).sum::<usize>();
                queue.replay = (0, 0);
                return Some(Next::Frames);
            }
            std::mem::swap(batch, &mut queue.live);
            queue.live_bytes = 0;
            queue.replay = (0, 0);
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
        let mut queue = self.shared.lock();
        if queue.attached == Some(self.generation) {
            queue.attached = None;
            queue.close = None;
            queue.live.clear();
            queue.live_bytes = 0;
            queue.replay = (0, 0);
            self.shared.signalled.store(false, Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(live_frames: usize, kept_frames: usize) -> Bounds {
        Bounds {
            live_frames,
            live_bytes: 1 << 20,
            kept_frames,
            kept_bytes: 1 << 20,
        }
    }

    fn seqs(batch: &VecDeque<Entry>) -> Vec<u64> {
        batch.iter().map(|e| e.seq).collect()
    }

    #[tokio::test]
    async fn overflow_closes_as_slow_consumer_and_keeps_what_was_missed() {
        let tx = outbox(bounds(2, 100));
        let (mut rx, _) = tx.attach(0).unwrap();
        assert!(tx.push("a".into()));
        assert!(tx.push("b".into()));
        assert!(tx.push("c".into()));
        assert!(!tx.is_attached());
        let mut batch = VecDeque::new();
        assert_eq!(
            rx.next(&mut batch).await,
            Next::Close(CloseReason::SlowConsumer)
        );
        assert!(batch.is_empty());
        drop(rx);
        // Still kept for a resume, and pushes go on being kept.
        assert!(tx.push("d".into()));
        let (mut rx, replayed) = tx.attach(0).unwrap();
        assert_eq!(replayed, 4);
        // A replay larger than the live bound does not count against it.
        assert!(tx.push("e".into()));
        assert!(tx.is_attached());
        assert_eq!(rx.next(&mut batch).await, Next::Frames);
        assert_eq!(seqs(&batch), [1, 2, 3, 4, 5]);
    }

    #[tokio::test]
    async fn live_bytes_are_bounded_too() {
        let tx = outbox(Bounds {
            live_frames: 100,
            live_bytes: 10,
            kept_frames: 100,
            kept_bytes: 100,
        });
        let (mut rx, _) = tx.attach(0).unwrap();
        // A frame larger than the bound alone is queued.
        assert!(tx.push("0123456789ab".into()));
        let mut batch = VecDeque::new();
        assert_eq!(rx.next(&mut batch).await, Next::Frames);
        batch.clear();
        assert!(tx.push("01234".into()));
        assert!(tx.push("01234".into()));
        assert!(tx.is_attached());
        assert!(tx.push("0".into()));
        assert!(!tx.is_attached());
    }

    #[tokio::test]
    async fn volatile_frames_have_no_seq_and_are_dropped_from_half_full_without_closing() {
        let tx = outbox(bounds(4, 100));
        // Nobody attached: a volatile frame is dropped, a regular one kept.
        assert!(!tx.push_volatile("v0".into()));
        let (mut rx, _) = tx.attach(0).unwrap();
        assert!(tx.push_volatile("v1".into()));
        assert!(tx.push("a".into()));
        // Half full: a volatile frame is dropped, the connection stays open.
        assert!(!tx.push_volatile("v2".into()));
        assert!(tx.is_attached());
        assert!(tx.push("b".into()));
        let mut batch = VecDeque::new();
        assert_eq!(rx.next(&mut batch).await, Next::Frames);
        let frames: Vec<(u64, &str)> = batch.iter().map(|e| (e.seq, &*e.frame)).collect();
        assert_eq!(frames, [(0, "v1"), (1, "a"), (2, "b")]);
        batch.clear();
        // Once drained, volatile frames flow again; they are never kept.
        assert!(tx.push_volatile("v3".into()));
        assert_eq!(tx.kept(), (2, 2));
    }

    #[tokio::test]
    async fn a_resume_replays_exactly_the_frames_after_last_seq() {
        let tx = outbox(bounds(100, 3));
        for f in ["a", "b", "c", "d", "e"] {
            assert!(tx.push(f.into()));
        }
        // Kept: 3, 4, 5.
        assert_eq!(
            tx.attach(1).unwrap_err(),
            AttachError::Gap {
                first_missing: 2,
                first_kept_or_next: 3
            }
        );
        assert_eq!(
            tx.attach(6).unwrap_err(),
            AttachError::Ahead {
                last_seq: 6,
                last_sent: 5
            }
        );
        let (mut rx, replayed) = tx.attach(3).unwrap();
        assert_eq!(replayed, 2);
        assert_eq!(tx.attach(3).unwrap_err(), AttachError::Attached);
        assert!(tx.push("f".into()));
        let mut batch = VecDeque::new();
        assert_eq!(rx.next(&mut batch).await, Next::Frames);
        assert_eq!(seqs(&batch), [4, 5, 6]);
        batch.clear();
        drop(rx);
        // Everything processed: nothing to replay, nothing missing.
        let (_rx, replayed) = tx.attach(6).unwrap();
        assert_eq!(replayed, 0);
    }

    #[test]
    fn trimming_and_the_byte_bound_forget_the_oldest() {
        let tx = outbox(Bounds {
            live_frames: 100,
            live_bytes: 100,
            kept_frames: 100,
            kept_bytes: 4,
        });
        for f in ["aa", "bb", "cc"] {
            assert!(tx.push(f.into()));
        }
        assert_eq!(tx.kept(), (2, 4));
        tx.trim(2);
        assert_eq!(tx.kept(), (1, 2));
        assert_eq!(tx.last_seq(), 3);
        // A client that has everything can still attach.
        assert!(tx.attach(3).is_ok());
    }

    #[tokio::test]
    async fn frames_queued_before_a_close_are_delivered_first_and_an_end_refuses_more() {
        let tx = outbox(bounds(8, 8));
        let (mut rx, _) = tx.attach(0).unwrap();
        assert!(tx.push("a".into()));
        assert!(tx.push("b".into()));
        tx.end(CloseReason::Shutdown);
        assert!(!tx.push("c".into()));
        let mut batch = VecDeque::new();
        assert_eq!(rx.next(&mut batch).await, Next::Frames);
        assert_eq!(seqs(&batch), [1, 2]);
        batch.clear();
        assert_eq!(
            rx.next(&mut batch).await,
            Next::Close(CloseReason::Shutdown)
        );
        drop(rx);
        assert_eq!(tx.attach(0).unwrap_err(), AttachError::Ended);
    }

    #[tokio::test]
    async fn a_waiting_receiver_wakes_on_push() {
        let tx = outbox(bounds(8, 8));
        let (mut rx, _) = tx.attach(0).unwrap();
        let waiter = tokio::spawn(async move {
            let mut batch = VecDeque::new();
            rx.next(&mut batch).await;
            batch
        });
        tokio::task::yield_now().await;
        assert!(tx.push("x".into()));
        assert_eq!(seqs(&waiter.await.unwrap()), [1]);
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
        let tx = outbox(bounds(8, 8));
        let (mut rx, _) = tx.attach(0).unwrap();
        let wakes = Arc::new(Wakes::default());
        let waker = futures_util::task::waker(wakes.clone());
        let mut cx = Context::from_waker(&waker);
        let mut batch = VecDeque::new();
        // Asleep: a push wakes it, and the next look finds the frame.
        assert!(rx.poll_next(&mut cx, &mut batch).is_pending());
        assert!(tx.push("a".into()));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert_eq!(rx.poll_next(&mut cx, &mut batch), Poll::Ready(Next::Frames));
        assert_eq!(seqs(&batch), [1]);
        batch.clear();
        // Awake (disarmed): a push does not wake it; it finds the frame when it looks again.
        assert!(rx.poll_next(&mut cx, &mut batch).is_pending());
        rx.disarm();
        assert!(tx.push("b".into()));
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert_eq!(rx.try_next(&mut batch), Some(Next::Frames));
        assert_eq!(seqs(&batch), [2]);
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
    fn dropping_the_receiver_detaches_and_frames_are_kept() {
        let tx = outbox(bounds(8, 8));
        let (rx, _) = tx.attach(0).unwrap();
        drop(rx);
        assert!(!tx.is_attached());
        assert!(tx.push("a".into()));
        assert_eq!(tx.kept(), (1, 1));
    }

    /// A journal that records what it is given and holds frames back while `holding`.
    #[derive(Debug, Default)]
    struct Recording {
        holding: AtomicBool,
        appended: Mutex<Vec<(u64, Option<u64>)>>,
    }

    impl Journal for Recording {
        fn append(&self, _: &Arc<str>, seq: u64, _: &Frame, source: Source<'_>, _: &Outbox) {
            let offset = match source {
                Source::Room { offset, .. } => Some(offset),
                Source::Own => None,
            };
            self.appended.lock().unwrap().push((seq, offset));
        }
        fn holding(&self) -> bool {
            self.holding.load(Ordering::Acquire)
        }
        fn opened(&self, _: &super::super::Session) {}
        fn ended(&self, _: &super::super::Session) {}
    }

    #[test]
    fn a_journaled_connection_writes_only_saved_frames() {
        let journal = Arc::new(Recording::default());
        journal.holding.store(true, Ordering::Release);
        let tx = journaled(bounds(100, 100), journal.clone(), "s-1".into());
        let (mut rx, _) = tx.attach(0).unwrap();
        assert!(tx.push("a".into()));
        assert!(tx.push_volatile("typing".into()));
        assert!(tx.push("b".into()));
        let mut batch = VecDeque::new();
        // Nothing is saved yet: nothing is written, not even the volatile frame behind `a`.
        assert_eq!(rx.try_next(&mut batch), None);
        tx.saved(1);
        assert_eq!(rx.try_next(&mut batch), Some(Next::Frames));
        assert_eq!(seqs(&batch), [1, 0]);
        batch.clear();
        assert_eq!(rx.try_next(&mut batch), None);
        // The journal out of reach: the node goes on serving its client.
        journal.holding.store(false, Ordering::Release);
        assert_eq!(rx.try_next(&mut batch), Some(Next::Frames));
        assert_eq!(seqs(&batch), [2]);
        assert_eq!(*journal.appended.lock().unwrap(), [(1, None), (2, None)]);
    }

    #[test]
    fn a_moved_stream_queues_recovered_frames_before_held_ones_without_repeating_them() {
        let journal = Arc::new(Recording::default());
        let room: Arc<str> = "r".into();
        let kept = vec![(4, Frame::from("saved-4")), (5, Frame::from("saved-5"))];
        let tx = moved(bounds(100, 100), journal.clone(), "s-1".into(), 6, kept);
        // Pushed while the move is under way: held, without a seq.
        let at = |offset| Source::Room {
            room: &room,
            offset,
        };
        assert!(tx.push_from("r-11".into(), at(11)));
        assert!(tx.push_from("r-12".into(), at(12)));
        assert!(tx.push("own".into()));
        assert_eq!(tx.last_seq(), 5);
        tx.release(vec![
            ("r-10".into(), Some((room.clone(), 10))),
            ("r-11".into(), Some((room.clone(), 11))),
        ]);
        let (mut rx, replayed) = tx.attach(3).unwrap();
        assert_eq!(replayed, 6);
        let mut batch = VecDeque::new();
        assert_eq!(rx.try_next(&mut batch), Some(Next::Frames));
        let frames: Vec<&str> = batch.iter().map(|e| e.frame.as_str()).collect();
        assert_eq!(
            frames,
            ["saved-4", "saved-5", "r-10", "r-11", "r-12", "own"]
        );
        assert_eq!(seqs(&batch), [4, 5, 6, 7, 8, 9]);
        assert_eq!(
            *journal.appended.lock().unwrap(),
            [(6, Some(10)), (7, Some(11)), (8, Some(12)), (9, None)]
        );
    }

    #[test]
    fn a_numbered_frame_keeps_its_seq_and_a_repeated_one_is_numbered_anew() {
        use crate::protocol::{self, Outbound, seq_of, with_seq};
        let tx = outbox(bounds(100, 100));
        let (mut rx, _) = tx.attach(0).unwrap();
        assert!(tx.push(r#"{"type":"a"}"#.into()));
        let reply = Outbound {
            ty: "b",
            room: None,
            payload: "1",
            sender: None,
        };
        let numbered = tx.push_numbered(|seq| reply.encode_numbered(seq)).unwrap();
        assert_eq!(seq_of(&numbered), Some(2));
        // Given again (an answer to a retry): numbered anew, once.
        assert!(tx.push(numbered.clone()));
        let mut batch = VecDeque::new();
        assert_eq!(rx.try_next(&mut batch), Some(Next::Frames));
        assert_eq!(seqs(&batch), [1, 2, 3]);
        let written: Vec<serde_json::Value> = batch
            .iter()
            .map(|e| serde_json::from_str(&with_seq(e.seq, &e.frame)).unwrap())
            .collect();
        let written_seqs: Vec<u64> = written.iter().map(|v| v["seq"].as_u64().unwrap()).collect();
        assert_eq!(written_seqs, [1, 2, 3]);
        assert_eq!(written[1]["type"], "b");
        assert_eq!(written[2], {
            let mut again = written[1].clone();
            again["seq"] = 3.into();
            again
        });
        // The numbered frame is written as it is, without a copy.
        assert_eq!(with_seq(2, &batch[1].frame), numbered);
        assert_eq!(seq_of(&protocol::without_seq(numbered)), None);
    }

    #[test]
    fn a_numbered_frame_pushed_while_a_session_moves_is_numbered_on_release() {
        let journal = Arc::new(Recording::default());
        let tx = moved(bounds(100, 100), journal, "s-1".into(), 6, Vec::new());
        let ack = tx
            .push_numbered(|seq| crate::protocol::ack(seq, "m", None))
            .unwrap();
        assert_eq!(crate::protocol::seq_of(&ack), None);
        // An answer numbered earlier (given again to a retry) is held without its old `seq`.
        assert!(tx.push(crate::protocol::ack(3, "old", None)));
        tx.release(Vec::new());
        let (mut rx, _) = tx.attach(5).unwrap();
        let mut batch = VecDeque::new();
        assert_eq!(rx.try_next(&mut batch), Some(Next::Frames));
        assert_eq!(seqs(&batch), [6, 7]);
        for (entry, seq) in batch.iter().zip([6, 7]) {
            let written = crate::protocol::with_seq(entry.seq, &entry.frame);
            let v: serde_json::Value = serde_json::from_str(&written).unwrap();
            assert_eq!(
                (v["seq"].as_u64(), v["type"].as_str()),
                (Some(seq), Some("sys.ack"))
            );
        }
    }
}
