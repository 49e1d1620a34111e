//! Per-instance counters: invocations by outcome, crashes, latency, invocations in flight,
//! restarts, and the fuel and memory the runtime measured, over all of an instance's serving
//! periods. Hosts answer `instance.stats` with them, rollout analysis judges a new version by
//! them, and the host's `/metrics` reads them at every scrape.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use trellis_schemas::instance::{InstanceStats, LATENCY_BOUNDS_US};

use crate::runtime::{LoadedComponent, ResourceUsage};

/// How one invocation ended, as counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Answered (an HTTP status under 500 from the component counts as answered).
    Ok,
    /// Refused for the caller's fault before or while running (a 4xx code: bad arguments,
    /// unknown export, payload too large).
    Rejected,
    /// Failed on the server's side (a 5xx code, or a component's own 5xx answer).
    Failed,
}

/// The counters of one instance. Lock-free: every invocation adds to them.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    calls: AtomicU64,
    errors: AtomicU64,
    rejected: AtomicU64,
    crashes: AtomicU64,
    micros: AtomicU64,
    restarts: AtomicU64,
    latency: [AtomicU64; LATENCY_BOUNDS_US.len() + 1],
    log_published: AtomicU64,
    log_dropped: AtomicU64,
    log_lost: AtomicU64,
    /// The loaded component, whose runtime counts fuel, memory and invocations running.
    component: OnceLock<LoadedComponent>,
}

/// What [`Stats`] has counted, read at once (each counter atomically, not all together).
#[derive(Debug, Clone, Default)]
pub(crate) struct Counts {
    pub stats: InstanceStats,
    pub rejected: u64,
    pub seconds: f64,
    pub in_flight: u64,
    pub restarts: u64,
    pub usage: ResourceUsage,
    pub log: LogCounts,
}

/// What happened to an instance's log lines.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct LogCounts {
    /// Handed to NATS.
    pub published: u64,
    /// Over the rate: not published.
    pub dropped: u64,
    /// Found the publishing queue full.
    pub lost: u64,
}

impl Stats {
    /// Counts one answered invocation that took `elapsed`.
    pub fn record(&self, elapsed: Duration, outcome: Outcome) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        match outcome {
            Outcome::Ok => {}
            Outcome::Rejected => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Failed => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
        let us = u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX);
        self.micros.fetch_add(us, Ordering::Relaxed);
        let bucket = LATENCY_BOUNDS_US
            .iter()
            .position(|&bound| us <= bound)
            .unwrap_or(LATENCY_BOUNDS_US.len());
        self.latency[bucket].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a crash (the invocation is also recorded, as failed).
    pub fn crashed(&self) {
        self.crashes.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts log lines published.
    pub fn log_published(&self, n: u64) {
        self.log_published.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts log lines dropped over the rate.
    pub fn log_dropped(&self, n: u64) {
        self.log_dropped.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts log records that found the publishing queue full.
    pub fn log_lost(&self, n: u64) {
        self.log_lost.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts a restart by the instance's policy.
    pub fn restarted(&self) {
        self.restarts.fetch_add(1, Ordering::Relaxed);
    }

    /// Reads fuel, memory and invocations running from `component` from now on (the first
    /// binding stays).
    pub fn bind(&self, component: &LoadedComponent) {
        let _ = self.component.set(component.clone());
    }

    /// The counts so far, as `instance.stats` answers them.
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

    /// Everything counted so far.
    pub fn counts(&self) -> Counts {
        Counts {
            stats: self.snapshot(),
            rejected: self.rejected.load(Ordering::Relaxed),
            seconds: self.micros.load(Ordering::Relaxed) as f64 / 1e6,
            in_flight: self
                .component
                .get()
                .map_or(0, |c| u64::try_from(c.in_flight()).unwrap_or(u64::MAX)),
            restarts: self.restarts.load(Ordering::Relaxed),
            usage: self
                .component
                .get()
                .map(LoadedComponent::usage)
                .unwrap_or_default(),
            log: LogCounts {
                published: self.log_published.load(Ordering::Relaxed),
                dropped: self.log_dropped.load(Ordering::Relaxed),
                lost: self.log_lost.load(Ordering::Relaxed),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invocations_land_in_their_latency_bucket() {
        let stats = Stats::default();
        stats.record(Duration::from_micros(100), Outcome::Ok);
        stats.record(Duration::from_millis(300), Outcome::Failed);
        stats.record(Duration::from_secs(60), Outcome::Failed);
        stats.record(Duration::from_micros(100), Outcome::Rejected);
        stats.crashed();
        let s = stats.snapshot();
        assert_eq!((s.calls, s.errors, s.crashes), (4, 2, 1));
        assert_eq!(s.latency[0], 2);
        assert_eq!(s.latency[10], 1, "300 ms is within the 500 ms bucket");
        assert_eq!(s.latency[LATENCY_BOUNDS_US.len()], 1);
        assert_eq!(s.quantile_us(0.75), Some(500_000));
        let c = stats.counts();
        assert_eq!(c.rejected, 1);
        assert!((c.seconds - 60.3002).abs() < 1e-9, "{}", c.seconds);
    }

    #[test]
    fn restarts_are_counted() {
        let stats = Stats::default();
        stats.restarted();
        stats.restarted();
        assert_eq!(stats.counts().restarts, 2);
    }
}
