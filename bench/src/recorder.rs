//! Latency histograms shared by many connection tasks.
//!
//! Each task keeps a small buffer and merges it into the shared histogram under a lock every few
//! hundred samples, so that thousands of connections do not each hold a full histogram.

use std::sync::Mutex;

use hdrhistogram::Histogram;

/// Highest latency recorded: 100 s in nanoseconds (larger values are clamped).
pub const MAX_NS: u64 = 100_000_000_000;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid histogram bounds")
}

#[derive(Debug)]
pub struct Shared {
    hist: Mutex<Histogram<u64>>,
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            hist: Mutex::new(new_histogram()),
        }
    }
}

impl Shared {
    pub fn local(&self) -> Local<'_> {
        Local {
            shared: self,
            buf: Vec::with_capacity(BATCH),
        }
    }

    pub fn snapshot(&self) -> Histogram<u64> {
        self.hist.lock().expect("histogram lock").clone()
    }

    pub fn add(&self, other: &Histogram<u64>) {
        let mut h = self.hist.lock().expect("histogram lock");
        let _ = h.add(other);
    }
}

const BATCH: usize = 256;

/// A task's buffer in front of a [`Shared`] histogram; flushed when full and when dropped.
#[derive(Debug)]
pub struct Local<'a> {
    shared: &'a Shared,
    buf: Vec<u64>,
}

impl Local<'_> {
    #[inline]
    pub fn record(&mut self, ns: u64) {
        self.buf.push(ns.clamp(1, MAX_NS));
        if self.buf.len() >= BATCH {
            self.flush();
        }
    }

    pub fn flush(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        let mut h = self.shared.hist.lock().expect("histogram lock");
        for &v in &self.buf {
            h.saturating_record(v);
        }
        self.buf.clear();
    }
}

impl Drop for Local<'_> {
    fn drop(&mut self) {
        self.flush();
    }
}
