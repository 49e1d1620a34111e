//! Provider metrics, in the registry of the process that runs the provider: its own
//! (`trellis-provider-<name> --metrics ADDR`) or the host that embeds it.

use std::sync::{Arc, LazyLock, OnceLock};
use std::time::Duration;

use trellis_bus::metrics::prometheus_client::metrics::counter::Counter;
use trellis_bus::metrics::prometheus_client::metrics::family::Family;
use trellis_bus::metrics::prometheus_client::metrics::histogram::Histogram;
use trellis_bus::metrics::{latency_histogram, register};
use trellis_schemas::Capability;

/// The provider's name, shared (a call's labels cost no allocation).
type ProviderLabel = [(&'static str, Arc<str>); 1];
type CallLabels = (ProviderLabel, [(&'static str, &'static str); 2]);
type CapabilityLabels = (ProviderLabel, [(&'static str, &'static str); 1]);

/// Capability calls served, by every provider of the process.
#[derive(Debug)]
struct Families {
    answered: Family<CallLabels, Counter>,
    latency: Family<CapabilityLabels, Histogram, fn() -> Histogram>,
}

static FAMILIES: LazyLock<Families> = LazyLock::new(|| Families {
    answered: register(
        "provider_calls",
        "Capability calls a provider answered, by provider, capability and outcome (ok or the error code)",
        Family::default(),
    ),
    latency: register(
        "provider_call_duration_seconds",
        "Time a provider took to answer a capability call, checks included",
        Family::new_with_constructor(latency_histogram as fn() -> Histogram),
    ),
});

/// The series a call is counted in: its count (by outcome) and its latency.
type Series = (Counter, Histogram);

/// The calls of one provider, counted as they are answered.
#[derive(Debug, Clone)]
pub(crate) struct ProviderCalls {
    provider: ProviderLabel,
    /// By capability (the index in [`Capability::ALL`]): the series of calls answered `ok`,
    /// made on the first such call, so that the common outcome neither hashes nor allocates.
    ok: Arc<[OnceLock<Series>; Capability::ALL.len()]>,
}

impl ProviderCalls {
    /// The counters of the provider `name`, registered in the process's registry.
    pub(crate) fn new(name: &str) -> Self {
        LazyLock::force(&FAMILIES);
        Self {
            provider: [("provider", Arc::from(name))],
            ok: Arc::new(std::array::from_fn(|_| OnceLock::new())),
        }
    }

    /// Counts one call of `capability` answered with `outcome` after `elapsed`.
    pub(crate) fn answered(
        &self,
        capability: Capability,
        outcome: &'static str,
        elapsed: Duration,
    ) {
        let cached = (outcome == "ok")
            .then(|| Capability::ALL.iter().position(|c| *c == capability))
            .flatten()
            .and_then(|i| self.ok.get(i));
        let other;
        let (count, latency) = match cached {
            Some(slot) => slot.get_or_init(|| self.series(capability, outcome)),
            None => {
                other = self.series(capability, outcome);
                &other
            }
        };
        count.inc();
        latency.observe(elapsed.as_secs_f64());
    }

    /// The series of calls of `capability` answered with `outcome` (handles on the family's).
    fn series(&self, capability: Capability, outcome: &'static str) -> Series {
        let capability = capability.as_str();
        let count = FAMILIES
            .answered
            .get_or_create(&(
                self.provider.clone(),
                [("capability", capability), ("outcome", outcome)],
            ))
            .clone();
        let latency = FAMILIES
            .latency
            .get_or_create(&(self.provider.clone(), [("capability", capability)]))
            .clone();
        (count, latency)
    }
}
