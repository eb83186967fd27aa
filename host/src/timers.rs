//! Plugin timers: calls of a plugin's own handlers after a delay, owned by the plugin id (not a
//! version, so a pending timer fires into whichever version serves when it is due), bounded
//! per plugin, and handed out in due order to the task that makes the calls. Also the longest
//! deadline the host sets ([`capped`]).

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// Most timers one plugin may have pending.
pub const MAX_TIMERS_PER_PLUGIN: usize = 10_000;
/// The longest delay of a timer, in milliseconds (24 hours).
pub const MAX_TIMER_DELAY_MS: u64 = 24 * 60 * 60 * 1000;

/// The furthest ahead the host sets a deadline: about 30 years, which is never for a host.
pub const FOREVER: Duration = Duration::from_secs(86_400 * 365 * 30);

/// `d`, at most [`FOREVER`]: a duration that can be added to the present instant.
///
/// Every configured duration the host adds to `Instant::now()` goes through this: adding one
/// past the clock's range panics (`pong_timeout_secs = 9223372036854775807` would take down
/// every connection at its first ping), while cut to [`FOREVER`] it means what it says.
pub fn capped(d: Duration) -> Duration {
    d.min(FOREVER)
}

/// Why a timer was not scheduled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimerError {
    #[error("a timer delay of {0} ms is longer than the limit of {MAX_TIMER_DELAY_MS} ms")]
    TooLong(u64),
    #[error("plugin `{0}` has {MAX_TIMERS_PER_PLUGIN} timers pending, the limit")]
    TooMany(String),
}

/// A timer that is due: call `handler` of plugin `plugin` with `payload` (JSON text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DueTimer {
    pub id: u64,
    pub plugin: Arc<str>,
    pub handler: String,
    pub payload: String,
}

#[derive(Debug)]
struct Entry {
    plugin: Arc<str>,
    handler: String,
    payload: String,
    due: Instant,
}

#[derive(Debug, Default)]
struct Inner {
    /// Pending timers by id.
    pending: HashMap<u64, Entry>,
    /// (due, id) of every pending timer, soonest first; a cancelled timer's entry stays until it
    /// comes up (or the heap is compacted) and is skipped then.
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    /// Pending timers per plugin id.
    per_plugin: HashMap<Arc<str>, usize>,
}

impl Inner {
    fn forget(&mut self, id: u64) -> Option<Entry> {
        let entry = self.pending.remove(&id)?;
        if let Some(n) = self.per_plugin.get_mut(&entry.plugin) {
            *n -= 1;
            if *n == 0 {
                self.per_plugin.remove(&entry.plugin);
            }
        }
        // Cancelled entries make up most of the heap: rebuild it from the pending ones.
        if self.heap.len() > 1024 && self.heap.len() > 2 * self.pending.len() {
            self.heap = self
                .pending
                .iter()
                .map(|(id, e)| Reverse((e.due, *id)))
                .collect();
        }
        Some(entry)
    }
}

/// Every pending timer of a host.
#[derive(Debug, Default)]
pub struct Timers {
    inner: Mutex<Inner>,
    next_id: AtomicU64,
    /// Woken when a timer is scheduled that may be due before the one the driver waits for.
    changed: Notify,
}

impl Timers {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // No code holding this lock panics midway through an update.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A fresh timer id (ids are handed out when a plugin call records a timer, so that the
    /// call gets it; a call that fails leaves its ids unused).
    pub fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// How many timers plugin `plugin` has pending.
    pub fn pending(&self, plugin: &str) -> usize {
        self.lock().per_plugin.get(plugin).copied().unwrap_or(0)
    }

    /// Whether timer `id` of plugin `plugin` is pending.
    pub fn is_pending(&self, plugin: &str, id: u64) -> bool {
        self.lock()
            .pending
            .get(&id)
            .is_some_and(|e| &*e.plugin == plugin)
    }

    /// Schedules timer `id` (from [`Timers::next_id`]) of plugin `plugin`: a call of `handler`
    /// with `payload` after `delay_ms`.
    pub fn schedule(
        &self,
        id: u64,
        plugin: &str,
        handler: String,
        delay_ms: u64,
        payload: String,
    ) -> Result<(), TimerError> {
        self.schedule_at(id, plugin, handler, delay_ms, payload, Instant::now())
    }

    fn schedule_at(
        &self,
        id: u64,
        plugin: &str,
        handler: String,
        delay_ms: u64,
        payload: String,
        now: Instant,
    ) -> Result<(), TimerError> {
        if delay_ms > MAX_TIMER_DELAY_MS {
            return Err(TimerError::TooLong(delay_ms));
        }
        let due = now + Duration::from_millis(delay_ms);
        let mut inner = self.lock();
        let count = inner.per_plugin.get(plugin).copied().unwrap_or(0);
        if count >= MAX_TIMERS_PER_PLUGIN {
            return Err(TimerError::TooMany(plugin.to_owned()));
        }
        let soonest = inner.heap.peek().is_none_or(|Reverse((d, _))| due < *d);
        let plugin: Arc<str> = match inner.per_plugin.get_key_value(plugin) {
            Some((key, _)) => key.clone(),
            None => Arc::from(plugin),
        };
        *inner.per_plugin.entry(plugin.clone()).or_default() += 1;
        inner.heap.push(Reverse((due, id)));
        inner.pending.insert(
            id,
            Entry {
                plugin,
                handler,
                payload,
                due,
            },
        );
        drop(inner);
        if soonest {
            self.changed.notify_one();
        }
        Ok(())
    }

    /// Cancels timer `id` of plugin `plugin`. Returns whether it was pending.
    pub fn cancel(&self, plugin: &str, id: u64) -> bool {
        let mut inner = self.lock();
        if inner.pending.get(&id).is_none_or(|e| &*e.plugin != plugin) {
            return false;
        }
        inner.forget(id).is_some()
    }

    /// Takes every timer due at `now`, in due order (then scheduling order).
    fn take_due(&self, now: Instant) -> Vec<DueTimer> {
        let mut inner = self.lock();
        let mut due = Vec::new();
        while let Some(&Reverse((at, id))) = inner.heap.peek() {
            if at > now {
                break;
            }
            inner.heap.pop();
            // A cancelled timer's entry is gone (or, after a compaction, never came back).
            if inner.pending.get(&id).is_some_and(|e| e.due == at)
                && let Some(entry) = inner.forget(id)
            {
                due.push(DueTimer {
                    id,
                    plugin: entry.plugin,
                    handler: entry.handler,
                    payload: entry.payload,
                });
            }
        }
        due
    }

    /// When the soonest pending timer is due.
    fn next_due(&self) -> Option<Instant> {
        self.lock().heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Waits for the next due timers and takes them (for the task that makes the calls).
    pub async fn next_due_batch(&self) -> Vec<DueTimer> {
        next_batch(&self.changed, |now| self.take_due(now), || self.next_due()).await
    }

    /// How many timers are pending, all plugins together.
    pub fn len(&self) -> usize {
        self.lock().pending.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Waits until `take` has something: it is asked now, then when `next_due` says something falls
/// due, or when `changed` is notified (new work). Shared by timers and requests.
pub(crate) async fn next_batch<T>(
    changed: &Notify,
    take: impl Fn(Instant) -> Vec<T>,
    next_due: impl Fn() -> Option<Instant>,
) -> Vec<T> {
    loop {
        // Registered before looking, so that work added meanwhile wakes this wait.
        let notified = changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let batch = take(Instant::now());
        if !batch.is_empty() {
            return batch;
        }
        match next_due() {
            Some(at) => {
                tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = notified => {}
                }
            }
            None => notified.await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_deadline_past_the_clock_is_cut_to_forever() {
        assert_eq!(capped(ms(1500)), ms(1500));
        assert_eq!(capped(Duration::MAX), FOREVER);
        // `pong_timeout_secs = 9223372036854775807`, from a configuration file.
        let long = Duration::from_secs(i64::MAX as u64);
        assert!(Instant::now().checked_add(long).is_none());
        assert!(Instant::now() + capped(long) > Instant::now() + FOREVER - ms(1000));
    }

    #[test]
    fn timers_come_due_in_due_order_once() {
        let timers = Timers::default();
        let t0 = Instant::now();
        let (a, b, c) = (timers.next_id(), timers.next_id(), timers.next_id());
        timers
            .schedule_at(a, "p", "late".into(), 30, "1".into(), t0)
            .unwrap();
        timers
            .schedule_at(b, "p", "early".into(), 10, "2".into(), t0)
            .unwrap();
        timers
            .schedule_at(c, "q", "same".into(), 10, "3".into(), t0)
            .unwrap();
        assert_eq!(timers.pending("p"), 2);
        assert!(timers.take_due(t0 + ms(9)).is_empty());
        let due = timers.take_due(t0 + ms(10));
        let handlers: Vec<&str> = due.iter().map(|d| d.handler.as_str()).collect();
        assert_eq!(handlers, ["early", "same"]);
        assert_eq!(&*due[1].plugin, "q");
        assert_eq!(due[1].payload, "3");
        assert!(timers.take_due(t0 + ms(10)).is_empty(), "fired once");
        assert_eq!(timers.take_due(t0 + ms(100))[0].id, a);
        assert!(timers.is_empty());
        assert_eq!(timers.pending("p"), 0);
    }

    #[test]
    fn a_cancelled_timer_does_not_fire_and_only_its_plugin_cancels_it() {
        let timers = Timers::default();
        let t0 = Instant::now();
        let id = timers.next_id();
        timers
            .schedule_at(id, "p", "h".into(), 5, "null".into(), t0)
            .unwrap();
        assert!(!timers.cancel("other", id), "another plugin's timer");
        assert!(timers.is_pending("p", id));
        assert!(timers.cancel("p", id));
        assert!(!timers.cancel("p", id), "already cancelled");
        assert!(timers.take_due(t0 + ms(10)).is_empty());
        assert_eq!(timers.pending("p"), 0);
    }

    #[test]
    fn bounds() {
        let timers = Timers::default();
        let t0 = Instant::now();
        assert_eq!(
            timers.schedule_at(1, "p", "h".into(), MAX_TIMER_DELAY_MS + 1, "0".into(), t0),
            Err(TimerError::TooLong(MAX_TIMER_DELAY_MS + 1))
        );
        for id in 0..MAX_TIMERS_PER_PLUGIN as u64 {
            timers
                .schedule_at(id, "p", "h".into(), 1000, "0".into(), t0)
                .unwrap();
        }
        let over = MAX_TIMERS_PER_PLUGIN as u64;
        assert_eq!(
            timers.schedule_at(over, "p", "h".into(), 1, "0".into(), t0),
            Err(TimerError::TooMany("p".into()))
        );
        // Other plugins are not affected; a cancel makes room again.
        timers
            .schedule_at(over, "q", "h".into(), 1, "0".into(), t0)
            .unwrap();
        assert!(timers.cancel("p", 0));
        timers
            .schedule_at(over + 1, "p", "h".into(), 1, "0".into(), t0)
            .unwrap();
    }

    #[test]
    fn cancelled_entries_do_not_pile_up() {
        let timers = Timers::default();
        let t0 = Instant::now();
        for id in 0..5000 {
            timers
                .schedule_at(id, "p", "h".into(), 60_000, "0".into(), t0)
                .unwrap();
            assert!(timers.cancel("p", id));
        }
        assert!(
            timers.lock().heap.len() <= 1025,
            "{}",
            timers.lock().heap.len()
        );
    }

    #[tokio::test]
    async fn the_driver_wakes_for_a_sooner_timer() {
        let timers = Arc::new(Timers::default());
        let far = timers.next_id();
        timers
            .schedule(far, "p", "far".into(), 60_000, "0".into())
            .unwrap();
        let waiter = {
            let timers = timers.clone();
            tokio::spawn(async move { timers.next_due_batch().await })
        };
        tokio::task::yield_now().await;
        let near = timers.next_id();
        timers
            .schedule(near, "p", "near".into(), 0, "0".into())
            .unwrap();
        let due = tokio::time::timeout(Duration::from_secs(20), waiter)
            .await
            .expect("woken long before the far timer")
            .unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].handler, "near");
        assert!(timers.is_pending("p", far));
    }
}
