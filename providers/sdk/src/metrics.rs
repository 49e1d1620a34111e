//! Provider metrics, in the registry of the process that runs the provider: its own
//! (`trellis-provider-<name> --metrics ADDR`) or the host that embeds it.

use std::sync::LazyLock;
use std::time::Duration;

use trellis_bus::metrics::prometheus_client::metrics::counter::Counter;
use trellis_bus::metrics::prometheus_client::metrics::family::Family;
use trellis_bus::metrics::prometheus_client::metrics::histogram::Histogram;
use trellis_bus::metrics::{latency_histogram, register};

type CallLabels = [(&'static str, String); 3];
type CapabilityLabels = [(&'static str, String); 2];

/// Capability calls served, counted as they are answered.
#[derive(Debug)]
pub(crate) struct Calls {
    answered: Family<CallLabels, Counter>,
    latency: Family<CapabilityLabels, Histogram, fn() -> Histogram>,
}

pub(crate) static CALLS: LazyLock<Calls> = LazyLock::new(|| Calls {
    answered: register(
        "provider_calls",
        "Capability calls a provider answered, by provider, capability and outcome (ok or the error code).",
        Family::default(),
    ),
    latency: register(
        "provider_call_duration_seconds",
        "Time a provider took to answer a capability call, checks included.",
        Family::new_with_constructor(latency_histogram as fn() -> Histogram),
    ),
});

impl Calls {
    /// Counts one call of `capability` to `provider` answered with `outcome` after `elapsed`.
    pub(crate) fn answered(
        &self,
        provider: &str,
        capability: &str,
        outcome: &str,
        elapsed: Duration,
    ) {
        self.answered
            .get_or_create(&[
                ("provider", provider.to_owned()),
                ("capability", capability.to_owned()),
                ("outcome", outcome.to_owned()),
            ])
            .inc();
        self.latency
            .get_or_create(&[
                ("provider", provider.to_owned()),
                ("capability", capability.to_owned()),
            ])
            .observe(elapsed.as_secs_f64());
    }
}
