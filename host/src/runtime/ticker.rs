//! The engine's single epoch ticker thread, which sleeps while no guest code runs.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use wasmtime::Engine;

/// Increments the engine's epoch every tick, on one thread for the whole engine (not one per
/// invocation), while guest code runs. Invocations check their wall-clock deadline when the
/// epoch moves, so nothing needs a tick while no guest code runs: once no [`Busy`] guard has
/// been held for [`IDLE_TICKS`] ticks, the thread sleeps until the next one is taken, instead
/// of waking a hundred times a second for nothing (which, in a micro-VM guest, kept an emulated
/// vCPU at 4 % of a host core while idle). Under load it never sleeps, so taking a guard costs
/// two atomic operations and never wakes the thread.
///
/// The thread holds only a weak reference to the engine, and stops when this value is dropped
/// (or the engine is gone).
#[derive(Debug)]
pub(crate) struct EpochTicker {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

/// Ticks with no guard held before the ticker sleeps: a second at the default 10 ms tick.
const IDLE_TICKS: u32 = 100;

#[derive(Debug, Default)]
struct Shared {
    /// Guards held now.
    busy: AtomicUsize,
    /// Whether the thread sleeps (or is about to) until a guard is taken.
    parked: AtomicBool,
    /// Whether the ticker must stop.
    stop: Mutex<bool>,
    /// Wakes the thread when a guard is taken while it sleeps, or the ticker stops.
    wake: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, bool> {
        self.stop.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Keeps the ticker ticking while it lives: held across every stretch of guest code
/// (instantiation, a call, an HTTP handler).
#[derive(Debug)]
#[must_use = "the ticker ticks only while the guard lives"]
pub(crate) struct Busy<'a>(&'a Shared);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

impl EpochTicker {
    /// Starts the engine's ticker, asleep until the first [`busy`](Self::busy) guard.
    pub(crate) fn start(engine: &Engine, tick: Duration) -> std::io::Result<Self> {
        let engine = engine.weak();
        Self::start_with(tick, move || match engine.upgrade() {
            Some(engine) => {
                engine.increment_epoch();
                true
            }
            None => false,
        })
    }

    /// Starts a ticker that calls `tick` each period while busy, until it returns `false`.
    fn start_with(
        period: Duration,
        mut tick: impl FnMut() -> bool + Send + 'static,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared::default());
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("trellis-epoch".to_string())
                .spawn(move || {
                    // Asleep until the first guard.
                    let mut idle = IDLE_TICKS;
                    let mut stop = shared.lock();
                    while !*stop {
                        if idle >= IDLE_TICKS {
                            // `parked` is set before `busy` is read, and a guard is counted
                            // before it reads `parked` (both sequentially consistent): either
                            // this reads the guard, or the guard sees `parked` and notifies,
                            // under the lock this holds until the wait starts.
                            shared.parked.store(true, Ordering::SeqCst);
                            if shared.busy.load(Ordering::SeqCst) == 0 {
                                stop = shared
                                    .wake
                                    .wait(stop)
                                    .unwrap_or_else(PoisonError::into_inner);
                            }
                            shared.parked.store(false, Ordering::SeqCst);
                            idle = 0;
                            continue;
                        }
                        stop = shared
                            .wake
                            .wait_timeout(stop, period)
                            .unwrap_or_else(PoisonError::into_inner)
                            .0;
                        if *stop {
                            break;
                        }
                        if shared.busy.load(Ordering::SeqCst) == 0 {
                            idle += 1;
                        } else {
                            idle = 0;
                        }
                        // A tick with no guard held only has no deadline to check.
                        if !tick() {
                            break;
                        }
                    }
                })?
        };
        Ok(Self {
            shared,
            thread: Some(thread),
        })
    }

    /// A guard under which the epoch ticks: guest code runs only while one is held.
    pub(crate) fn busy(&self) -> Busy<'_> {
        self.shared.busy.fetch_add(1, Ordering::SeqCst);
        if self.shared.parked.load(Ordering::SeqCst) {
            let _stop = self.shared.lock();
            self.shared.wake.notify_one();
        }
        Busy(&self.shared)
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        *self.shared.lock() = true;
        self.shared.wake.notify_one();
        if let Some(thread) = self.thread.take() {
            // The thread only waits and ticks: a join error is moot.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;
    use std::time::Instant;

    use super::*;

    fn counting(period: Duration) -> (EpochTicker, Arc<AtomicU64>) {
        let ticks = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&ticks);
        let ticker = EpochTicker::start_with(period, move || {
            counted.fetch_add(1, Ordering::Relaxed);
            true
        })
        .unwrap();
        (ticker, ticks)
    }

    /// Waits until `ticks` reaches `n`, for at most ten seconds.
    fn wait_for(ticks: &AtomicU64, n: u64) -> bool {
        let until = Instant::now() + Duration::from_secs(10);
        while Instant::now() < until {
            if ticks.load(Ordering::Relaxed) >= n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        false
    }

    #[test]
    fn the_ticker_ticks_while_busy_and_sleeps_once_idle() {
        let (ticker, ticks) = counting(Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(ticks.load(Ordering::Relaxed), 0, "ticked while idle");

        let busy = ticker.busy();
        assert!(wait_for(&ticks, 5), "did not tick while busy");
        drop(busy);
        let dropped_at = ticks.load(Ordering::Relaxed);
        // It ticks on for IDLE_TICKS ticks with no guard (one more when a tick was due as the
        // guard went), then sleeps. One of them may fall between the drop and the count above.
        let idle = u64::from(IDLE_TICKS);
        assert!(wait_for(&ticks, dropped_at + idle - 1), "stopped too soon");
        std::thread::sleep(Duration::from_millis(50));
        let after = ticks.load(Ordering::Relaxed);
        assert!(
            after <= dropped_at + idle + 1,
            "{} idle ticks",
            after - dropped_at
        );
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(ticks.load(Ordering::Relaxed), after, "ticked while asleep");

        // A guard wakes it; ticking goes on while any guard remains.
        let (one, two) = (ticker.busy(), ticker.busy());
        drop(one);
        assert!(
            wait_for(&ticks, after + 5),
            "stopped while a guard remained"
        );
        drop(two);
    }

    #[test]
    fn dropping_the_ticker_stops_its_thread_busy_or_not() {
        let (done, dropped) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let (idle, _) = counting(Duration::from_secs(3600));
            drop(idle);
            let (busy, _) = counting(Duration::from_secs(3600));
            std::mem::forget(busy.busy());
            drop(busy);
            done.send(()).unwrap();
        });
        dropped
            .recv_timeout(Duration::from_secs(10))
            .expect("dropping a ticker waited for its period");
    }
}
