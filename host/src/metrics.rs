//! The host's Prometheus metrics (served on `trellis-host --metrics ADDR`).
//!
//! Per instance, read off its counters at every scrape (nothing is added to the invocation
//! path, and an instance that is gone leaves the exposition with it): invocations by outcome,
//! their duration, invocations in flight, restarts, fuel consumed and the memory high-water
//! mark, and log lines published, dropped by the rate limit or lost. Per host: instances by state,
//! heartbeats sent, compiled-artifact cache hits and misses, and micro-VMs: guests waiting in the
//! pool, and VMs started from the pool or booted. The providers embedded in the host add their own (see the provider SDK).

use std::fmt;
use std::sync::LazyLock;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use trellis_bus::metrics::{prometheus_client, register, register_collector};
use trellis_schemas::instance::LATENCY_BOUNDS_US;

use crate::instances::Counts;

/// One instance as a scrape sees it.
#[derive(Debug, Clone)]
pub(crate) struct InstanceSample {
    pub component: String,
    pub instance: String,
    pub state: &'static str,
    pub counts: Counts,
}

/// The host-wide metrics counted as things happen.
#[derive(Debug)]
pub(crate) struct HostMetrics {
    /// Heartbeats published.
    pub heartbeats: Counter,
    /// Component loads, by whether the compiled artifact came from the cache.
    pub loads: Family<[(&'static str, &'static str); 1], Counter>,
    /// Micro-VM guests booted ahead of need, waiting in the pool.
    pub microvm_pool_ready: Gauge,
    /// Micro-VMs that began serving an instance, by where the guest came from.
    pub microvm_starts: Family<[(&'static str, &'static str); 1], Counter>,
}

/// The host's metrics, registered on first use.
pub(crate) static HOST: LazyLock<HostMetrics> = LazyLock::new(|| HostMetrics {
    heartbeats: register(
        "host_heartbeats",
        "Heartbeats this host has published",
        Counter::default(),
    ),
    loads: register(
        "host_component_loads",
        "Components loaded, by whether the compiled artifact came from the cache (cache=hit) or was compiled (cache=miss)",
        Family::default(),
    ),
    microvm_pool_ready: register(
        "host_microvm_pool_ready",
        "Micro-VM guests booted ahead of need and waiting in the pool (--microvm-pool)",
        Gauge::default(),
    ),
    microvm_starts: register(
        "host_microvm_starts",
        "Micro-VMs that began serving an instance, by whether the guest came from the pool (from=pool) or was booted for it (from=boot)",
        Family::default(),
    ),
});

/// Registers the collector of per-instance metrics; `sample` lists the instances at a scrape.
pub(crate) fn register_instances(sample: impl Fn() -> Vec<InstanceSample> + Send + Sync + 'static) {
    LazyLock::force(&HOST);
    register_collector(Box::new(Instances(Box::new(sample))));
}

struct Instances(Box<dyn Fn() -> Vec<InstanceSample> + Send + Sync>);

impl fmt::Debug for Instances {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Instances")
    }
}

impl Collector for Instances {
    fn encode(&self, mut encoder: DescriptorEncoder) -> fmt::Result {
        let samples = (self.0)();

        let mut states = std::collections::BTreeMap::from([
            ("starting", 0u64),
            ("running", 0),
            ("restarting", 0),
            ("stopping", 0),
        ]);
        for s in &samples {
            *states.entry(s.state).or_default() += 1;
        }
        let mut metric = encoder.encode_descriptor(
            "host_instances",
            "Instances on this host, by state",
            None,
            MetricType::Gauge,
        )?;
        for (state, n) in states {
            metric
                .encode_family(&[("state", state)])?
                .encode_gauge(&n)?;
        }

        let mut metric = encoder.encode_descriptor(
            "invocations",
            "Invocations answered, by outcome: ok, rejected (the caller's fault, 4xx), failed (5xx, crashes included), crashed",
            None,
            MetricType::Counter,
        )?;
        for s in &samples {
            let c = &s.counts;
            let failed = c.stats.errors;
            let ok = c
                .stats
                .calls
                .saturating_sub(failed)
                .saturating_sub(c.rejected);
            for (outcome, n) in [
                ("ok", ok),
                ("rejected", c.rejected),
                ("failed", failed),
                ("crashed", c.stats.crashes),
            ] {
                metric
                    .encode_family(&labels(s, Some(outcome)))?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }

        let mut metric = encoder.encode_descriptor(
            "log_lines",
            "Lines of guest output, by outcome: published, dropped (over the host's rate per instance), lost (the publishing queue was full)",
            None,
            MetricType::Counter,
        )?;
        for s in &samples {
            let l = &s.counts.log;
            for (outcome, n) in [
                ("published", l.published),
                ("dropped", l.dropped),
                ("lost", l.lost),
            ] {
                metric
                    .encode_family(&labels(s, Some(outcome)))?
                    .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
            }
        }

        let mut metric = encoder.encode_descriptor(
            "invocation_duration_seconds",
            "How long invocations took, from the request's arrival to its answer",
            None,
            MetricType::Histogram,
        )?;
        for s in &samples {
            let c = &s.counts;
            let buckets: Vec<(f64, u64)> = c
                .stats
                .latency
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    let bound = LATENCY_BOUNDS_US
                        .get(i)
                        .map_or(f64::MAX, |us| *us as f64 / 1e6);
                    (bound, *n)
                })
                .collect();
            metric
                .encode_family(&labels(s, None))?
                .encode_histogram::<NoLabelSet>(c.seconds, c.stats.calls, &buckets, None)?;
        }

        for (name, help, kind, value) in [
            (
                "invocations_in_flight",
                "Invocations running now",
                MetricType::Gauge,
                (|c: &Counts| c.in_flight) as fn(&Counts) -> u64,
            ),
            (
                "instance_restarts",
                "Restarts by the instance's restart policy",
                MetricType::Counter,
                |c: &Counts| c.restarts,
            ),
            (
                "fuel_consumed",
                "Fuel consumed by the instance's invocations",
                MetricType::Counter,
                |c: &Counts| c.usage.fuel_consumed,
            ),
            (
                "memory_high_water_bytes",
                "The most linear memory one invocation of the instance grew to",
                MetricType::Gauge,
                |c: &Counts| c.usage.memory_high_water_bytes,
            ),
        ] {
            let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
            for s in &samples {
                let labels = labels(s, None);
                let mut family = metric.encode_family(&labels)?;
                let v = value(&s.counts);
                if matches!(kind, MetricType::Counter) {
                    family.encode_counter::<NoLabelSet, _, u64>(&v, None)?;
                } else {
                    family.encode_gauge(&v)?;
                }
            }
        }
        Ok(())
    }
}

fn labels<'a>(s: &'a InstanceSample, outcome: Option<&'a str>) -> Vec<(&'static str, &'a str)> {
    let mut labels = vec![
        ("component", s.component.as_str()),
        ("instance", s.instance.as_str()),
    ];
    if let Some(outcome) = outcome {
        labels.push(("outcome", outcome));
    }
    labels
}
