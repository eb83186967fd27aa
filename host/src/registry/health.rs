//! The health of plugin versions: calls, failures and calls in flight per version, the probation
//! window after a swap, and the rule that rolls a failing new version back to the previous one;
//! the circuit breaker that takes a version that keeps failing out of service for a cool-down;
//! and the slow lane that keeps a version whose calls run long off the runtime's threads.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::timers::capped;

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

/// When a version is taken out of service, and how its calls are kept from the runtime's
/// threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BreakerPolicy {
    /// Failed calls in a row (traps, timeouts, invalid effects) that open the circuit (0: never).
    pub failures: u32,
    /// How long an open circuit refuses calls (`plugin_unavailable`) before one call is let
    /// through to try the version again.
    pub cool_down: Duration,
    /// Calls that run at least this long, `SLOW_STREAK` in a row, put their version in the slow
    /// lane (in a row: one call made slow by the machine, its thread preempted, does not).
    pub slow_call: Duration,
    /// How long a version stays in the slow lane after its last slow call.
    pub slow_for: Duration,
    /// Calls of one version that may run in the slow lane at once.
    pub slow_lane: usize,
}

impl Default for BreakerPolicy {
    fn default() -> Self {
        BreakerPolicy {
            failures: 5,
            cool_down: Duration::from_secs(10),
            slow_call: Duration::from_millis(10),
            slow_for: Duration::from_secs(10),
            slow_lane: 1,
        }
    }
}

/// Slow calls in a row that put a version in the slow lane.
pub const SLOW_STREAK: u32 = 3;

/// The state of a version's circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Circuit {
    /// Calls go through.
    Closed,
    /// Calls are refused until the cool-down ends.
    Open,
    /// The cool-down is over: one call is trying the version.
    Trying,
}

impl Circuit {
    pub fn as_str(self) -> &'static str {
        match self {
            Circuit::Closed => "closed",
            Circuit::Open => "open",
            Circuit::Trying => "trying",
        }
    }
}

/// A call refused because the version's circuit is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable {
    /// How long until the version is tried again.
    pub retry_in: Duration,
}

#[derive(Debug, Default)]
struct Breaker {
    /// Until when the circuit is open; `None`: closed.
    open_until: Option<Instant>,
    /// A call is trying the version after the cool-down.
    trying: bool,
}

/// What a finished call did to its version's circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    None,
    /// The circuit opened (the version keeps failing).
    Opened,
    /// The circuit closed again (a call succeeded after the cool-down).
    Closed,
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
    /// Failed calls in a row.
    consecutive_failures: AtomicU32,
    /// Whether the circuit is not closed (read on every call without the lock).
    breaker_engaged: AtomicBool,
    breaker: Mutex<Breaker>,
    /// How many times the circuit opened.
    trips: AtomicU64,
    /// Until when the version's calls go through the slow lane (nanoseconds after `EPOCH`; 0:
    /// not slow).
    slow_until: AtomicU64,
    /// Slow calls in a row.
    slow_streak: AtomicU32,
    /// The slow lane's permits, created on the first slow call.
    lane: std::sync::OnceLock<tokio::sync::Semaphore>,
}

/// The instant slow-lane deadlines are counted from.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn nanos_since_epoch(t: Instant) -> u64 {
    t.saturating_duration_since(epoch()).as_nanos() as u64
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
            let _ = self
                .probation_until
                .set(Instant::now() + capped(policy.probation));
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

    /// Whether a call may run now. When the cool-down of an open circuit is over, the first
    /// caller gets to try the version; the others are refused until its outcome is known.
    pub fn admit(&self) -> Result<(), Unavailable> {
        if !self.breaker_engaged.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut breaker = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        let Some(until) = breaker.open_until else {
            return Ok(());
        };
        let now = Instant::now();
        if now < until {
            return Err(Unavailable {
                retry_in: until - now,
            });
        }
        if breaker.trying {
            return Err(Unavailable {
                retry_in: Duration::ZERO,
            });
        }
        breaker.trying = true;
        Ok(())
    }

    /// Records a finished call in the circuit: `failures` failed calls in a row open it; a
    /// call that tried the version after the cool-down closes it, or opens it again.
    pub fn record_circuit(&self, failed: bool, policy: &BreakerPolicy) -> Change {
        if !failed {
            // Read first: a store on every call would bounce the line between cores.
            if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                self.consecutive_failures.store(0, Ordering::Relaxed);
            }
            if !self.breaker_engaged.load(Ordering::Relaxed) {
                return Change::None;
            }
            let mut breaker = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
            if breaker.open_until.is_some() && breaker.trying {
                *breaker = Breaker::default();
                self.breaker_engaged.store(false, Ordering::Relaxed);
                return Change::Closed;
            }
            return Change::None;
        }
        let in_a_row = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        let mut breaker = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        let retrying = breaker.open_until.is_some() && breaker.trying;
        if (policy.failures > 0 && in_a_row >= policy.failures && breaker.open_until.is_none())
            || retrying
        {
            breaker.open_until = Some(Instant::now() + capped(policy.cool_down));
            breaker.trying = false;
            self.breaker_engaged.store(true, Ordering::Relaxed);
            self.trips.fetch_add(1, Ordering::Relaxed);
            return Change::Opened;
        }
        Change::None
    }

    /// The state of the circuit, and how many times it opened.
    pub fn circuit(&self) -> (Circuit, u64) {
        let breaker = self.breaker.lock().unwrap_or_else(|e| e.into_inner());
        let state = match breaker.open_until {
            None => Circuit::Closed,
            Some(_) if breaker.trying => Circuit::Trying,
            Some(_) => Circuit::Open,
        };
        (state, self.trips.load(Ordering::Relaxed))
    }

    /// The slow lane's permits when the version's calls go through it now.
    pub fn slow_lane(&self, policy: &BreakerPolicy) -> Option<&tokio::sync::Semaphore> {
        let until = self.slow_until.load(Ordering::Relaxed);
        if until == 0 || nanos_since_epoch(Instant::now()) >= until {
            return None;
        }
        Some(
            self.lane
                .get_or_init(|| tokio::sync::Semaphore::new(policy.slow_lane.max(1))),
        )
    }

    /// Records how long a call ran: `SLOW_STREAK` slow ones in a row put the version in the
    /// slow lane, and every slow one keeps it there.
    pub fn record_duration(&self, took: Duration, policy: &BreakerPolicy) {
        if took < policy.slow_call {
            if self.slow_streak.load(Ordering::Relaxed) != 0 {
                self.slow_streak.store(0, Ordering::Relaxed);
            }
            return;
        }
        let streak = self.slow_streak.fetch_add(1, Ordering::Relaxed) + 1;
        if streak >= SLOW_STREAK || self.is_slow() {
            let until = nanos_since_epoch(Instant::now() + capped(policy.slow_for));
            self.slow_until.fetch_max(until, Ordering::Relaxed);
        }
    }

    /// Whether the version's calls go through the slow lane now.
    pub fn is_slow(&self) -> bool {
        let until = self.slow_until.load(Ordering::Relaxed);
        until != 0 && nanos_since_epoch(Instant::now()) < until
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
    fn the_circuit_opens_after_failures_in_a_row_and_one_call_tries_again_after_the_cool_down() {
        let policy = BreakerPolicy {
            failures: 3,
            cool_down: Duration::ZERO,
            ..BreakerPolicy::default()
        };
        let h = Health::default();
        for _ in 0..2 {
            assert_eq!(h.record_circuit(true, &policy), Change::None);
        }
        // A success in between starts the count again.
        assert_eq!(h.record_circuit(false, &policy), Change::None);
        assert_eq!(h.record_circuit(true, &policy), Change::None);
        assert_eq!(h.record_circuit(true, &policy), Change::None);
        assert_eq!(h.record_circuit(true, &policy), Change::Opened);
        assert_eq!(h.circuit(), (Circuit::Open, 1));
        // The cool-down (none here) is over: one call tries, the next waits for its outcome.
        assert!(h.admit().is_ok());
        assert!(h.admit().is_err());
        assert_eq!(h.circuit().0, Circuit::Trying);
        // It fails: open again. The next try succeeds: closed.
        assert_eq!(h.record_circuit(true, &policy), Change::Opened);
        assert!(h.admit().is_ok());
        assert_eq!(h.record_circuit(false, &policy), Change::Closed);
        assert_eq!(h.circuit(), (Circuit::Closed, 2));
        assert!(h.admit().is_ok());
    }

    #[test]
    fn an_open_circuit_refuses_until_its_cool_down_ends() {
        let policy = BreakerPolicy {
            failures: 1,
            cool_down: Duration::from_secs(60),
            ..BreakerPolicy::default()
        };
        let h = Health::default();
        assert_eq!(h.record_circuit(true, &policy), Change::Opened);
        let refused = h.admit().unwrap_err();
        assert!(refused.retry_in > Duration::from_secs(50));
    }

    #[test]
    fn a_cool_down_or_a_probation_too_long_for_the_clock_lasts_for_ever() {
        // What `cool_down_secs` or `probation_secs = 9223372036854775807` give.
        let long = Duration::from_secs(i64::MAX as u64);
        let breaker = BreakerPolicy {
            failures: 1,
            cool_down: long,
            slow_for: long,
            ..BreakerPolicy::default()
        };
        let h = Health::default();
        assert_eq!(h.record_circuit(true, &breaker), Change::Opened);
        assert!(h.admit().unwrap_err().retry_in > Duration::from_secs(86_400 * 365 * 29));
        for _ in 0..SLOW_STREAK {
            h.record_duration(breaker.slow_call, &breaker);
        }
        assert!(h.is_slow());
        let swap = SwapPolicy {
            keep_previous: long,
            probation: long,
            ..policy()
        };
        let h = Health::default();
        h.start_probation(&swap);
        assert!(h.on_probation());
    }

    #[test]
    fn a_slow_call_puts_the_version_in_the_slow_lane_for_a_while() {
        let policy = BreakerPolicy::default();
        let h = Health::default();
        h.record_duration(Duration::from_micros(10), &policy);
        assert!(h.slow_lane(&policy).is_none());
        // One slow call, or two, is the machine's doing; three in a row are the plugin's.
        h.record_duration(policy.slow_call, &policy);
        h.record_duration(policy.slow_call, &policy);
        h.record_duration(Duration::ZERO, &policy);
        h.record_duration(policy.slow_call, &policy);
        h.record_duration(policy.slow_call, &policy);
        assert!(!h.is_slow());
        h.record_duration(policy.slow_call, &policy);
        assert!(h.is_slow());
        assert_eq!(h.slow_lane(&policy).unwrap().available_permits(), 1);
        let short = BreakerPolicy {
            slow_for: Duration::ZERO,
            ..policy
        };
        let h = Health::default();
        for _ in 0..SLOW_STREAK {
            h.record_duration(Duration::from_secs(1), &short);
        }
        assert!(!h.is_slow());
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
