//! The spare instance of a loaded component: one fresh instance made ahead of the next
//! invocation, and the stores of ended invocations, dropped after their answers.
//!
//! An invocation takes the spare when there is one, binds it to itself (bridge, log, trace,
//! deadline) and calls its export at once. A caller that answers someone (the host's data
//! plane, the micro-VM agent) invokes through
//! [`LoadedComponent::tidied_by_caller`](super::LoadedComponent::tidied_by_caller): the store of
//! an ended invocation is kept, and after the answer has gone the caller's
//! [`tidy`](super::LoadedComponent::tidy) drops it and makes the next spare, on the caller's
//! own task (no task is spawned, no thread woken). Neither dropping nor instantiating is then on
//! an invocation's path: natively that is about a fifth of a small call, under emulation most
//! of it; under load each invocation still makes one instance, its own or the next one's.
//!
//! An invocation that finds no spare while one is being made (on another thread: the micro-VM
//! agent tidies on its guest's second vCPU) waits for that one rather than instantiate beside it.
//!
//! A spare has never run an export, so no state passes from one invocation to the next. It is
//! made only while fewer than half of the runtime's pool slots are in use, and given back after
//! [`RuntimeConfig::spare_idle`](super::RuntimeConfig::spare_idle) without an invocation.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Instant;

use wasmtime::Store;
use wasmtime::component::Instance;

use super::component::ComponentInner;
use super::store::StoreState;

/// An instance made ahead, in its store.
pub(super) struct Ready {
    pub(super) store: Store<StoreState>,
    pub(super) instance: Instance,
}

/// The spare of one loaded component (see the module docs).
#[derive(Default)]
pub(super) struct Spare {
    slot: Mutex<Slot>,
    /// Stores of ended invocations, to drop after their answers.
    retired: Mutex<Vec<Store<StoreState>>>,
    /// Whether a [`tidy`](Self::tidy) is making a spare.
    making: AtomicBool,
    /// Woken when a [`tidy`](Self::tidy) has made its spare (or failed to).
    made: tokio::sync::Notify,
    /// Whether an invocation waits for the spare being made.
    claimed: AtomicBool,
}

#[derive(Default)]
struct Slot {
    ready: Option<Ready>,
    /// When an invocation last asked for the spare.
    asked: Option<Instant>,
    /// Whether a task watches the spare to give it back when idle.
    watched: bool,
}

impl std::fmt::Debug for Spare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Spare")
            .field("ready", &self.is_ready())
            .finish_non_exhaustive()
    }
}

impl Spare {
    fn slot(&self) -> std::sync::MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a spare is ready now.
    pub(super) fn is_ready(&self) -> bool {
        self.slot().ready.is_some()
    }

    /// The spare, for an invocation starting now (none when spares are off or none is ready).
    pub(super) fn take(&self) -> Option<Ready> {
        let mut slot = self.slot();
        slot.asked = Some(Instant::now());
        slot.ready.take()
    }

    /// The spare, for an invocation starting now; when none is ready but a
    /// [`tidy`](Self::tidy) is making one, the first invocation to ask waits for it: the rest
    /// of one instantiation is never longer than a whole one of its own, and the two would
    /// compete for the same CPU. Later invocations do not wait (none when there is no spare).
    pub(super) async fn take_or_wait(&self) -> Option<Ready> {
        if let Some(ready) = self.take() {
            return Some(ready);
        }
        if !self.making.load(Ordering::Acquire) || self.claimed.swap(true, Ordering::AcqRel) {
            return None;
        }
        let made = self.made.notified();
        tokio::pin!(made);
        made.as_mut().enable();
        if self.making.load(Ordering::Acquire) {
            made.await;
        }
        let ready = self.slot().ready.take();
        self.claimed.store(false, Ordering::Release);
        ready
    }

    /// Drops the stores handed back and not dropped yet, for an invocation about to make a
    /// store of its own: a burst of invocations never holds more pool slots than it runs.
    pub(super) fn drain(&self) {
        let retired = {
            let mut retired = self.retired.lock().unwrap_or_else(PoisonError::into_inner);
            if retired.is_empty() {
                return;
            }
            std::mem::take(&mut *retired)
        };
        drop(retired);
    }

    /// Keeps the store of an invocation that ended, for the caller's next
    /// [`tidy`](Self::tidy) (after its answer) to drop.
    pub(super) fn retire(&self, store: Store<StoreState>) {
        self.retired
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(store);
    }

    /// Drops the stores kept by [`retire`](Self::retire), then makes the next spare unless one
    /// is ready or being made.
    pub(super) async fn tidy(inner: &Arc<ComponentInner>) {
        let spare = &inner.spare;
        if spare.is_ready() || spare.making.swap(true, Ordering::AcqRel) {
            spare.drain();
            return;
        }
        spare.drain();
        Self::fill(inner).await;
        spare.making.store(false, Ordering::Release);
        spare.made.notify_waiters();
    }

    /// Makes a spare now unless there is one, spares are off or the pool is half used; returns
    /// whether one is ready.
    pub(super) async fn fill(inner: &Arc<ComponentInner>) -> bool {
        let config = &inner.runtime.config;
        let room = usize::try_from(config.pooling_instances / 2).unwrap_or(usize::MAX);
        let spare = &inner.spare;
        if !config.spare_instances {
            return false;
        }
        if spare.is_ready() {
            return true;
        }
        if inner.runtime.live_stores.load(Ordering::Relaxed) >= room {
            return false;
        }
        // A component that cannot be instantiated fails in the invocation that tries, which
        // reports why.
        let Ok(ready) = inner.prepare().await else {
            return false;
        };
        let (extra, watch) = {
            let mut slot = spare.slot();
            let extra = match slot.ready {
                None => {
                    slot.ready = Some(ready);
                    None
                }
                Some(_) => Some(ready),
            };
            let watch = !slot.watched && config.spare_idle != std::time::Duration::MAX;
            slot.watched |= watch;
            (extra, watch)
        };
        drop(extra);
        if watch {
            tokio::spawn(Self::watch(Arc::downgrade(inner)));
        }
        true
    }

    /// Gives the spare back once no invocation asked for one for the idle time; ends when the
    /// slot is empty or the component is gone.
    async fn watch(inner: Weak<ComponentInner>) {
        let Some(idle) = inner.upgrade().map(|c| c.runtime.config.spare_idle) else {
            return;
        };
        loop {
            tokio::time::sleep(idle).await;
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let (stale, done) = {
                let mut slot = inner.spare.slot();
                let idle_now = slot.asked.is_none_or(|at| at.elapsed() >= idle);
                let stale = if idle_now { slot.ready.take() } else { None };
                let done = slot.ready.is_none();
                slot.watched = !done;
                (stale, done)
            };
            drop(stale);
            if done {
                return;
            }
        }
    }
}
