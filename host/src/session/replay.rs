//! What a session keeps for a resume: its non-volatile frames with contiguous `seq`s ending at
//! the last one sent, bounded by frames and bytes (the oldest go first). The one interface a
//! resume reads through: `record` numbers and keeps, `after` hands out what follows a client's
//! last `seq` or says it has a gap, `trim` forgets what the client processed.

use std::collections::VecDeque;

use super::outbox::{AttachError, Entry};
use crate::protocol::Frame;

/// The kept frames of one session.
#[derive(Debug)]
pub struct Replay {
    kept: VecDeque<Entry>,
    bytes: usize,
    next_seq: u64,
    max_frames: usize,
    max_bytes: usize,
}

impl Replay {
    pub fn new(max_frames: usize, max_bytes: usize) -> Replay {
        Replay {
            kept: VecDeque::new(),
            bytes: 0,
            next_seq: 1,
            max_frames,
            max_bytes,
        }
    }

    /// The frames of a session that moved here from another node: `kept`, with contiguous
    /// `seq`s ending at `next_seq - 1`.
    pub fn resumed(
        max_frames: usize,
        max_bytes: usize,
        next_seq: u64,
        kept: Vec<(u64, Frame)>,
    ) -> Replay {
        let mut replay = Replay {
            next_seq,
            ..Replay::new(max_frames, max_bytes)
        };
        for (seq, frame) in kept {
            replay.bytes += frame.len();
            replay.kept.push_back(Entry { seq, frame });
        }
        replay
    }

    /// The `seq` the next frame recorded gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Gives `frame` the next `seq` and keeps it, dropping the oldest frames beyond the bounds.
    pub fn record(&mut self, frame: &Frame) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        if self.max_frames == 0 {
            return seq;
        }
        self.kept.push_back(Entry {
            seq,
            frame: frame.clone(),
        });
        self.bytes += frame.len();
        while self.kept.len() > self.max_frames
            || (self.bytes > self.max_bytes && !self.kept.is_empty())
        {
            self.pop();
        }
        seq
    }

    fn pop(&mut self) {
        if let Some(old) = self.kept.pop_front() {
            self.bytes -= old.frame.len();
        }
    }

    /// Whether every frame after `last_seq` is kept; returns the first kept `seq`.
    pub fn check(&self, last_seq: u64) -> Result<u64, AttachError> {
        let last_sent = self.next_seq - 1;
        if last_seq > last_sent {
            return Err(AttachError::Ahead {
                last_seq,
                last_sent,
            });
        }
        let first_kept = self.next_seq - self.kept.len() as u64;
        if last_seq + 1 < first_kept {
            return Err(AttachError::Gap {
                first_missing: last_seq + 1,
                first_kept_or_next: first_kept,
            });
        }
        Ok(first_kept)
    }

    /// Every kept frame after `last_seq`, in order, or why they are not all kept.
    pub fn after(&self, last_seq: u64) -> Result<VecDeque<Entry>, AttachError> {
        let first_kept = self.check(last_seq)?;
        let skip = (last_seq + 1 - first_kept) as usize;
        Ok(self.kept.iter().skip(skip).cloned().collect())
    }

    /// Forgets the frames up to `seq` (the client has processed them).
    pub fn trim(&mut self, seq: u64) {
        while self.kept.front().is_some_and(|e| e.seq <= seq) {
            self.pop();
        }
    }

    /// Forgets everything kept (the session has ended).
    pub fn clear(&mut self) {
        self.kept.clear();
        self.bytes = 0;
    }

    /// The `seq` of the last frame recorded (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.next_seq - 1
    }

    /// How many frames and bytes are kept.
    pub fn kept(&self) -> (usize, usize) {
        (self.kept.len(), self.bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_contiguous_seqs_within_its_bounds() {
        let mut r = Replay::new(3, 100);
        for f in ["a", "b", "c", "d"] {
            r.record(&f.into());
        }
        assert_eq!(r.kept(), (3, 3));
        assert_eq!(r.last_seq(), 4);
        let seqs = |v: VecDeque<Entry>| v.iter().map(|e| e.seq).collect::<Vec<_>>();
        assert_eq!(seqs(r.after(1).unwrap()), [2, 3, 4]);
        assert_eq!(seqs(r.after(4).unwrap()), Vec::<u64>::new());
        assert!(matches!(r.after(0), Err(AttachError::Gap { .. })));
        assert!(matches!(r.after(5), Err(AttachError::Ahead { .. })));
        r.trim(3);
        assert_eq!(seqs(r.after(3).unwrap()), [4]);
        // With nothing kept, only a client that has everything can attach.
        let mut none = Replay::new(0, 0);
        none.record(&"a".into());
        assert!(none.after(1).is_ok());
        assert!(none.after(0).is_err());
    }
}
