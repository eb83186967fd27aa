//! The retry window of a session: the answers to the client `messageId`s it handled lately, so
//! that a retried frame is answered again instead of handled again.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::time::{Duration, Instant};

use crate::protocol::Frame;

/// The answers (`sys.ack` or `sys.error` frames) to the last `capacity` message ids handled
/// within `ttl`.
///
/// Ids are kept as 64-bit digests (foldhash, seeded per session), so that recording one costs
/// no allocation: two ids of one session's window share a digest with a probability of about
/// `capacity / 2^64` (1 in 10^16 for the default window), and then the second one would get the
/// first one's answer.
#[derive(Debug)]
pub struct Dedupe {
    capacity: usize,
    ttl: Duration,
    digest: foldhash::fast::RandomState,
    /// Looked up once per client frame with a `messageId`.
    answers: foldhash::HashMap<u64, Frame>,
    /// Ids in the order they were handled, with when.
    order: VecDeque<(u64, Instant)>,
}

impl Dedupe {
    pub fn new(capacity: usize, ttl: Duration) -> Dedupe {
        Dedupe {
            capacity,
            ttl,
            digest: foldhash::fast::RandomState::default(),
            answers: foldhash::HashMap::default(),
            order: VecDeque::new(),
        }
    }

    /// The answer given to `message_id`, if it was handled within the window.
    pub fn answer(&mut self, message_id: &str, now: Instant) -> Option<Frame> {
        if self.order.is_empty() {
            return None;
        }
        self.expire(now);
        self.answers.get(&self.digest.hash_one(message_id)).cloned()
    }

    /// Records the answer given to `message_id`.
    pub fn record(&mut self, message_id: &str, answer: Frame, now: Instant) {
        if self.capacity == 0 {
            return;
        }
        self.expire(now);
        while self.order.len() >= self.capacity {
            if let Some((old, _)) = self.order.pop_front() {
                self.answers.remove(&old);
            }
        }
        let id = self.digest.hash_one(message_id);
        if self.answers.insert(id, answer).is_none() {
            self.order.push_back((id, now));
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((id, at)) = self.order.front() {
            if now.saturating_duration_since(*at) < self.ttl {
                break;
            }
            self.answers.remove(id);
            self.order.pop_front();
        }
    }

    /// How many ids the window holds.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_within_the_window_by_count_and_age() {
        let t0 = Instant::now();
        let mut d = Dedupe::new(2, Duration::from_secs(10));
        assert_eq!(d.answer("a", t0), None);
        d.record("a", "A".into(), t0);
        d.record("b", "B".into(), t0);
        assert_eq!(d.answer("a", t0).as_deref(), Some("A"));
        // A third id pushes out the oldest.
        d.record("c", "C".into(), t0);
        assert_eq!(d.answer("a", t0), None);
        assert_eq!(d.answer("b", t0).as_deref(), Some("B"));
        // Past the age, every id is forgotten.
        assert_eq!(d.answer("c", t0 + Duration::from_secs(10)), None);
        assert!(d.is_empty());
    }
}
