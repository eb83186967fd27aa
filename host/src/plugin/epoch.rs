//! The epoch ticker: advances the wasmtime engine's epoch, which bounds the wall-clock time of
//! every plugin call, and sleeps while no call has begun for longer than the longest deadline.
//!
//! A call sets its store's deadline (the current epoch plus the plugin's timeout in ticks), then
//! says so with [`EpochTicker::call_begins`], then enters the guest. While calls keep beginning
//! the ticker advances the epoch every tick. Once no call has begun for more ticks than the
//! longest deadline (plus two for the tick in progress), every call that began before has either
//! returned or reached its deadline, so nothing depends on the epoch moving: the ticker parks
//! and an idle host wakes no thread at all (it woke 200 times a second, about 1% of a core on a
//! virtual machine). The first call afterwards wakes it.
//!
//! The fast path of `call_begins` is one load: only the first call after each tick stores.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::Thread;
use std::time::Duration;

use wasmtime::{Engine, EngineWeak};

/// Advances an engine's epoch while plugin calls may be running. Stops when dropped.
pub struct EpochTicker {
    shared: Arc<Shared>,
    thread: Thread,
}

struct Shared {
    /// A call began since the ticker last looked.
    called: AtomicBool,
    /// The ticker is advancing the epoch (false while it is parked or about to park).
    ticking: AtomicBool,
    stop: AtomicBool,
    /// The longest call deadline, in ticks, of any plugin loaded so far.
    longest: AtomicU64,
    /// How many times the ticker has parked, with a condition variable to wait on.
    parks: Mutex<u64>,
    parked: Condvar,
}

impl EpochTicker {
    /// Starts the ticker thread for `engine`, advancing its epoch every `tick`.
    pub fn start(engine: &Engine, tick: Duration) -> std::io::Result<EpochTicker> {
        let shared = Arc::new(Shared {
            called: AtomicBool::new(false),
            ticking: AtomicBool::new(true),
            stop: AtomicBool::new(false),
            longest: AtomicU64::new(0),
            parks: Mutex::new(0),
            parked: Condvar::new(),
        });
        let engine = engine.weak();
        let thread_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("plexus-epoch".into())
            .spawn(move || run(&thread_shared, &engine, tick))?;
        Ok(EpochTicker {
            shared,
            thread: handle.thread().clone(),
        })
    }

    /// Makes the ticker keep going for `deadline_ticks` after the last call began: the longest
    /// deadline of a plugin, registered when it loads.
    pub fn cover(&self, deadline_ticks: u64) {
        self.shared
            .longest
            .fetch_max(deadline_ticks, Ordering::Relaxed);
    }

    /// Says that a call is about to enter the guest, its deadline already set. Wakes the ticker
    /// if it sleeps.
    #[inline]
    pub fn call_begins(&self) {
        if !self.shared.called.load(Ordering::SeqCst) {
            self.first_call_of_tick();
        }
    }

    #[cold]
    fn first_call_of_tick(&self) {
        self.shared.called.store(true, Ordering::SeqCst);
        // The ticker stores `ticking = false` before it looks at `called` a last time: one of
        // the two sides sees the other's store.
        if !self.shared.ticking.load(Ordering::SeqCst) {
            self.thread.unpark();
        }
    }

    /// Waits until the ticker has parked more than `after` times since it started, for at most
    /// `limit`; returns how many times it has.
    #[cfg(test)]
    fn wait_parked(&self, after: u64, limit: Duration) -> u64 {
        let parks = self.shared.parks.lock().unwrap_or_else(|e| e.into_inner());
        let (parks, _) = self
            .shared
            .parked
            .wait_timeout_while(parks, limit, |n| *n <= after)
            .unwrap_or_else(|e| e.into_inner());
        *parks
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.thread.unpark();
    }
}

/// The ticker thread.
fn run(shared: &Shared, engine: &EngineWeak, tick: Duration) {
    let mut quiet = Quiet::default();
    while !shared.stop.load(Ordering::SeqCst) {
        std::thread::sleep(tick);
        match engine.upgrade() {
            Some(engine) => engine.increment_epoch(),
            None => return,
        }
        let called = shared.called.swap(false, Ordering::SeqCst);
        if !quiet.after_tick(called, shared.longest.load(Ordering::Relaxed)) {
            continue;
        }
        shared.ticking.store(false, Ordering::SeqCst);
        // A call that began after the swap above and saw `ticking` still true did not wake
        // us: look once more before sleeping.
        if !shared.called.load(Ordering::SeqCst) {
            *shared.parks.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            shared.parked.notify_all();
            while !shared.called.load(Ordering::SeqCst) && !shared.stop.load(Ordering::SeqCst) {
                std::thread::park();
            }
        }
        shared.ticking.store(true, Ordering::SeqCst);
        quiet = Quiet::default();
    }
}

/// Ticks since a call last began.
#[derive(Debug, Default)]
struct Quiet {
    ticks: u64,
}

impl Quiet {
    /// Counts one tick; `called` says whether a call began during it. True when the ticker may
    /// sleep: every call that began has reached its deadline (at most `longest` ticks after the
    /// epoch it began in, which is at most the tick that saw it), with a tick to spare.
    fn after_tick(&mut self, called: bool, longest: u64) -> bool {
        if called {
            self.ticks = 0;
            return false;
        }
        self.ticks += 1;
        self.ticks > longest.saturating_add(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_only_after_the_longest_deadline_and_a_spare_tick() {
        let mut quiet = Quiet::default();
        assert!(!quiet.after_tick(true, 3));
        for _ in 0..4 {
            assert!(!quiet.after_tick(false, 3));
        }
        assert!(quiet.after_tick(false, 3));
    }

    #[test]
    fn a_call_starts_the_count_again() {
        let mut quiet = Quiet::default();
        for _ in 0..4 {
            assert!(!quiet.after_tick(false, 3));
        }
        assert!(!quiet.after_tick(true, 3));
        for _ in 0..4 {
            assert!(!quiet.after_tick(false, 3));
        }
        assert!(quiet.after_tick(false, 3));
    }

    /// A core module exporting `spin`, a function that loops forever (hand-assembled: the
    /// host's wasmtime is built without the text format).
    const SPIN: &[u8] = &[
        0x00, 0x61, 0x73, 0x6d, 0x01, 0x00, 0x00, 0x00, // magic, version 1
        0x01, 0x04, 0x01, 0x60, 0x00, 0x00, // types: () -> ()
        0x03, 0x02, 0x01, 0x00, // functions: one of type 0
        0x07, 0x08, 0x01, 0x04, b's', b'p', b'i', b'n', 0x00, 0x00, // export "spin"
        0x0a, 0x09, 0x01, 0x07, 0x00, 0x03, 0x40, 0x0c, 0x00, 0x0b, 0x0b, // loop { br 0 }
    ];
    const WAIT: Duration = Duration::from_secs(60);

    #[test]
    fn a_runaway_call_that_begins_while_the_ticker_sleeps_still_times_out() {
        let engine = Engine::new(wasmtime::Config::new().epoch_interruption(true)).unwrap();
        let module = wasmtime::Module::new(&engine, SPIN).unwrap();
        let ticker = Arc::new(EpochTicker::start(&engine, Duration::from_millis(1)).unwrap());
        ticker.cover(3);
        assert_eq!(ticker.wait_parked(0, WAIT), 1, "an idle ticker parks");

        let (done, result) = std::sync::mpsc::channel();
        let call_ticker = ticker.clone();
        std::thread::spawn(move || {
            let mut store = wasmtime::Store::new(&engine, ());
            store.epoch_deadline_trap();
            store.set_epoch_deadline(3);
            call_ticker.call_begins();
            let instance = wasmtime::Instance::new(&mut store, &module, &[]).unwrap();
            let spin = instance
                .get_typed_func::<(), ()>(&mut store, "spin")
                .unwrap();
            let _ = done.send(spin.call(&mut store, ()));
        });
        let trap = result
            .recv_timeout(WAIT)
            .expect("the call was interrupted")
            .unwrap_err();
        assert_eq!(
            trap.downcast_ref::<wasmtime::Trap>(),
            Some(&wasmtime::Trap::Interrupt)
        );
        // And once its deadline has passed, the ticker sleeps again.
        assert_eq!(ticker.wait_parked(1, WAIT), 2);
    }
}
