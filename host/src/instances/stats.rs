//! Per-instance counters: invocations, failures, crashes and latency, over all of an instance's
//! serving periods. Hosts answer `instance.stats` with them; rollout analysis judges a new
//! version by them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use trellis_schemas::instance::{InstanceStats, LATENCY_BOUNDS_US};

/// The counters of one instance. Lock-free: every invocation adds to them.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    calls: AtomicU64,
    errors: AtomicU64,
    crashes: AtomicU64,
    latency: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
}

impl Stats {
    /// Counts one answered invocation that took `elapsed`, failed or not.
    pub fn record(&self, elapsed: Duration, failed: bool) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if failed {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BOUNDS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a crash.
    pub fn crashed(&self) {
        self.crashes.fetch_add(1, Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn snapshot(&self) -> InstanceStats {
        InstanceStats {
            calls: self.calls.load(Ordering::Relaxed),
            errors: self.errors.load(Ordering::Relaxed),
            crashes: self.crashes.load(Ordering::Relaxed),
            latency: self
                .latency
                .iter()
                .map(|n| n.load(Ordering::Relaxed))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invocations_land_in_their_latency_bucket() {
        let stats = Stats::default();
        stats.record(Duration::from_micros(100), false);
        stats.record(Duration::from_millis(300), true);
        stats.record(Duration::from_secs(60), true);
        stats.crashed();
        let s = stats.snapshot();
        assert_eq!((s.calls, s.errors, s.crashes), (3, 2, 1));
        assert_eq!(s.latency[0], 1);
        assert_eq!(s.latency[10], 1, "300 ms is within the 500 ms bucket");
        assert_eq!(s.latency[LATENCY_BOUNDS_US.len()], 1);
        assert_eq!(s.quantile_us(0.5), Some(500_000));
    }
}
