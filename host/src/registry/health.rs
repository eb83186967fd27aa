//! The health of plugin versions: calls, failures and calls in flight per version, the probation
//! window after a swap, and the rule that rolls a failing new version back to the previous one.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How the host treats a version it has just swapped in.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SwapPolicy {
    /// How long the previous version of a plugin stays loaded (its instances warm) after a
    /// swap, ready for a rollback. Zero keeps none, and turns automatic rollback off.
    pub keep_previous: Duration,
    /// How long after a swap the new version is on probation: a version failing too many of
    /// its calls in this window is rolled back automatically.
    pub probation: Duration,
    /// The share of failed calls (traps, timeouts, invalid effects: `plugin_failed`, not a
    /// handler's own errors) above which a version on probation is rolled back.
    pub max_failure_share: f64,
    /// The least number of calls in the probation window before the share is judged.
    pub min_calls: u64,
}

impl Default for SwapPolicy {
    fn default() -> Self {
        SwapPolicy {
            keep_previous: Duration::from_secs(60),
            probation: Duration::from_secs(30),
            max_failure_share: 0.5,
            min_calls: 10,
        }
    }
}

impl SwapPolicy {
    /// Whether `failures` out of `calls` trip the rollback.
    pub fn trips(&self, calls: u64, failures: u64) -> bool {
        calls >= self.min_calls.max(1) && failures as f64 > self.max_failure_share * calls as f64
    }
}

/// Call counters of one plugin version.
#[derive(Debug, Default)]
pub struct Health {
    calls: AtomicU64,
    failures: AtomicU64,
    in_flight: AtomicU64,
    /// Counted in the probation window only.
    probation_calls: AtomicU64,
    probation_failures: AtomicU64,
    /// When the probation ends; set when the version is swapped in over a previous one.
    probation_until: std::sync::OnceLock<Instant>,
    /// Set once, by the call that trips the rollback.
    tripped: AtomicBool,
}

/// What a call's outcome means for its version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Healthy,
    /// This call tripped the rollback rule: roll the version back (reported once).
    RollBack {
        calls: u64,
        failures: u64,
    },
}

/// Counts a call in flight until dropped.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Health);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A snapshot of a version's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HealthCounts {
    pub calls: u64,
    pub failures: u64,
    pub in_flight: u64,
}

impl Health {
    /// Starts the probation window of a version that replaced another.
    pub fn start_probation(&self, policy: &SwapPolicy) {
        if !policy.probation.is_zero() && !policy.keep_previous.is_zero() {
            let _ = self.probation_until.set(Instant::now() + policy.probation);
        }
    }

    /// A call begins; it counts as in flight until the guard drops.
    pub fn begin(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self)
    }

    /// Records a finished call; says whether it tripped the rollback rule.
    pub fn record(&self, failed: bool, policy: &SwapPolicy) -> Verdict {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.failures.fetch_add(1, Ordering::Relaxed);
        }
        let Some(until) = self.probation_until.get() else {
            return Verdict::Healthy;
        };
        if Instant::now() > *until {
            return Verdict::Healthy;
        }
        let calls = self.probation_calls.fetch_add(1, Ordering::Relaxed) + 1;
        let failures = if failed {
            self.probation_failures.fetch_add(1, Ordering::Relaxed) + 1
        } else {
            self.probation_failures.load(Ordering::Relaxed)
        };
        if failed && policy.trips(calls, failures) && !self.tripped.swap(true, Ordering::Relaxed) {
            return Verdict::RollBack { calls, failures };
        }
        Verdict::Healthy
    }

    pub fn counts(&self) -> HealthCounts {
        HealthCounts {
            calls: self.calls.load(Ordering::Relaxed),
            failures: self.failures.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
        }
    }

    /// Whether the version is still on probation.
    pub fn on_probation(&self) -> bool {
        self.probation_until
            .get()
            .is_some_and(|until| Instant::now() <= *until)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> SwapPolicy {
        SwapPolicy {
            keep_previous: Duration::from_secs(60),
            probation: Duration::from_secs(60),
            max_failure_share: 0.5,
            min_calls: 4,
        }
    }

    #[test]
    fn a_version_without_probation_never_trips() {
        let h = Health::default();
        for _ in 0..100 {
            assert_eq!(h.record(true, &policy()), Verdict::Healthy);
        }
        assert_eq!(h.counts().failures, 100);
    }

    #[test]
    fn trips_once_past_the_share_after_the_minimum_calls() {
        let h = Health::default();
        h.start_probation(&policy());
        assert_eq!(h.record(false, &policy()), Verdict::Healthy);
        assert_eq!(h.record(true, &policy()), Verdict::Healthy);
        assert_eq!(h.record(true, &policy()), Verdict::Healthy);
        // 3 failures of 4 calls: more than half, and the minimum reached.
        assert_eq!(
            h.record(true, &policy()),
            Verdict::RollBack {
                calls: 4,
                failures: 3
            }
        );
        assert_eq!(h.record(true, &policy()), Verdict::Healthy, "reported once");
    }

    #[test]
    fn half_failing_is_not_more_than_half() {
        let h = Health::default();
        h.start_probation(&policy());
        for i in 0..40 {
            assert_eq!(h.record(i % 2 == 1, &policy()), Verdict::Healthy);
        }
    }

    #[test]
    fn no_probation_when_no_previous_version_is_kept() {
        let mut p = policy();
        p.keep_previous = Duration::ZERO;
        let h = Health::default();
        h.start_probation(&p);
        assert!(!h.on_probation());
    }

    #[test]
    fn in_flight_counts_until_the_guard_drops() {
        let h = Health::default();
        let a = h.begin();
        let b = h.begin();
        assert_eq!(h.counts().in_flight, 2);
        drop(a);
        drop(b);
        assert_eq!(h.counts().in_flight, 0);
    }
}
