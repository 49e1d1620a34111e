//! The controller's Prometheus metrics (served on `trellis controller --metrics ADDR`):
//! requests by operation and code with their latency, and, read at every scrape, the facts
//! applied, the sequence applied, how far that is behind the stream's tip, and how long the
//! replay at start took.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Weak};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use trellis_bus::metrics::{latency_histogram, prometheus_client, register, register_collector};

use super::state::State;

type OpCode = [(&'static str, String); 2];
type Op = [(&'static str, String); 1];

/// Control requests, counted as they are answered.
#[derive(Debug)]
pub(crate) struct Requests {
    answered: Family<OpCode, Counter>,
    latency: Family<Op, Histogram, fn() -> Histogram>,
}

pub(crate) static REQUESTS: LazyLock<Requests> = LazyLock::new(|| Requests {
    answered: register(
        "controller_requests",
        "Control requests answered, by operation and code (ok or the error code)",
        Family::default(),
    ),
    latency: register(
        "controller_request_duration_seconds",
        "Time to answer a control request, by operation",
        Family::new_with_constructor(latency_histogram as fn() -> Histogram),
    ),
});

impl Requests {
    /// Counts one request of `op` answered with `code` after `elapsed`.
    pub(crate) fn answered(&self, op: &str, code: &str, elapsed: Duration) {
        self.answered
            .get_or_create(&[("op", op.to_owned()), ("code", code.to_owned())])
            .inc();
        self.latency
            .get_or_create(&[("op", op.to_owned())])
            .observe(elapsed.as_secs_f64());
    }
}

/// Registers what is read off the replica's state at a scrape; `tip` is the stream's last
/// sequence as last seen by [`follow_tip`].
pub(crate) fn register_state(state: &Arc<State>, tip: Arc<AtomicU64>) {
    LazyLock::force(&REQUESTS);
    register_collector(Box::new(StateCollector {
        state: Arc::downgrade(state),
        tip,
    }));
}

struct StateCollector {
    state: Weak<State>,
    tip: Arc<AtomicU64>,
}

impl fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StateCollector")
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let Some(state) = self.state.upgrade() else {
            return Ok(());
        };
        let applied = state.applied_count();
        let as_of = state.as_of();
        let tip = self.tip.load(Ordering::Relaxed);
        let replay = state.replay_stats().millis as f64 / 1e3;
        encoder
            .encode_descriptor(
                "controller_facts_applied",
                "Facts this replica has applied to its projection",
                None,
                MetricType::Counter,
            )?
            .encode_counter::<NoLabelSet, _, u64>(&applied, None)?;
        encoder
            .encode_descriptor(
                "controller_applied_seq",
                "The stream sequence this replica has applied up to",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&as_of)?;
        encoder
            .encode_descriptor(
                "controller_stream_lag",
                "Facts in the stream this replica has not applied yet (checked every 2 s)",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&tip.saturating_sub(as_of))?;
        encoder
            .encode_descriptor(
                "controller_replay_seconds",
                "How long the replay of the fact stream took at start",
                None,
                MetricType::Gauge,
            )?
            .encode_gauge(&replay)?;
        Ok(())
    }
}

/// Keeps `tip` at the events stream's last sequence, every 2 s, until the process ends: the
/// replica's shared read of the stream ([`State::stream_state`]), which also counts the facts its
/// reader has seen exist since. Ends when the replica's state is dropped.
pub(crate) async fn follow_tip(state: Weak<State>, tip: Arc<AtomicU64>) {
    let mut ticker = tokio::time::interval(Duration::from_secs(2));
    loop {
        ticker.tick().await;
        let Some(state) = state.upgrade() else {
            return;
        };
        if let Ok(stream) = state.stream_state().await {
            tip.store(stream.last_sequence, Ordering::Relaxed);
        }
    }
}
