//! One clock for the whole process and the phases of a run.
//!
//! Send timestamps embedded in payloads are nanoseconds since [`base`], so that a message
//! published by one connection and received by another is timed with the same clock.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The instant all nanosecond timestamps of this process count from.
pub fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds since [`base`].
#[inline]
pub fn now_ns() -> u64 {
    base().elapsed().as_nanos() as u64
}

/// Converts a timestamp of [`now_ns`] back to an instant.
pub fn instant_at(ns: u64) -> Instant {
    base() + Duration::from_nanos(ns)
}

/// The phases of a run, fixed once every connection is up: traffic starts at `start`,
/// is recorded between `measure_start` and `measure_end`, and whatever has not been answered
/// by `drain_end` counts as unanswered.
#[derive(Clone, Copy, Debug)]
pub struct Timeline {
    pub start: u64,
    pub measure_start: u64,
    pub measure_end: u64,
    pub drain_end: u64,
}

impl Timeline {
    /// A timeline starting `lead` from now.
    pub fn new(lead: Duration, warmup: Duration, duration: Duration, drain: Duration) -> Self {
        let start = now_ns() + lead.as_nanos() as u64;
        let measure_start = start + warmup.as_nanos() as u64;
        let measure_end = measure_start + duration.as_nanos() as u64;
        Timeline {
            start,
            measure_start,
            measure_end,
            drain_end: measure_end + drain.as_nanos() as u64,
        }
    }

    #[inline]
    pub fn measuring(&self, t: u64) -> bool {
        t >= self.measure_start && t < self.measure_end
    }

    #[inline]
    pub fn sending(&self, t: u64) -> bool {
        t < self.measure_end
    }

    pub fn measured_secs(&self) -> f64 {
        (self.measure_end - self.measure_start) as f64 / 1e9
    }

    pub fn at(ns: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(instant_at(ns))
    }
}
