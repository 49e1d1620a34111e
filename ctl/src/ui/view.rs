//! What the dashboard shows, built from the controller's projection, its status reply and the
//! hosts' heartbeats. Pure: the server feeds it, the page renders it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::Serialize;
use trellis_schemas::control::{RolloutBrief, StatusReply};
use trellis_schemas::heartbeat::Heartbeat;
use trellis_schemas::projection::Projection;
use trellis_schemas::{Event, HostId, InstanceStatus, ProviderStatus};

/// How long an instance that ended badly (crashed, gave up, failed to start, lost with its host)
/// stays on the page after it ended.
pub(crate) const ENDED_SHOWN_FOR: chrono::TimeDelta = chrono::TimeDelta::hours(1);

/// The lattice at one stream sequence, as `/api/snapshot` and the `snapshot` event carry it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Snapshot {
    /// The lattice.
    pub lattice: String,
    /// The stream sequence the controller's answer reflects.
    pub as_of: u64,
    /// When the dashboard asked.
    pub taken_at: DateTime<Utc>,
    /// The controller replica that answered.
    pub served_by: String,
    /// Hosts, by id.
    pub hosts: Vec<HostRow>,
    /// Components with their live (and recently failed) instances, by name.
    pub components: Vec<ComponentRow>,
    /// Providers, by name then id.
    pub providers: Vec<ProviderRow>,
    /// Capability assignments.
    pub assignments: Vec<AssignmentRow>,
    /// Rollouts in progress.
    pub rollouts: Vec<RolloutBrief>,
    /// Crashes and failed starts in the last hour.
    pub failures_last_hour: u32,
    /// Facts the controller has yet to apply.
    pub lag: u64,
}

/// A host and its load.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct HostRow {
    pub host_id: String,
    /// `up`, `stopped` or `lost`.
    pub status: &'static str,
    pub version: String,
    pub labels: BTreeMap<String, String>,
    pub max_instances: u32,
    pub cpus: u32,
    pub memory_bytes: u64,
    /// Instances running there, by the facts.
    pub instances: u32,
    /// Invocations running at its last heartbeat.
    pub in_flight: u64,
    /// Milliseconds since its last heartbeat reached the dashboard; `None` before the first.
    pub heartbeat_age_ms: Option<u64>,
}

/// A component: the versions it runs and its instances.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ComponentRow {
    pub name: String,
    /// Versions in the artifact store.
    pub versions: Vec<String>,
    pub instances: Vec<InstanceRow>,
}

/// One instance.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct InstanceRow {
    pub instance_id: String,
    pub host_id: String,
    pub version: Option<String>,
    pub status: &'static str,
    /// Restarts so far (the attempt number of its current serving period).
    pub restarts: u32,
    pub last_reason: Option<String>,
    pub status_since: DateTime<Utc>,
    /// From its host's last heartbeat: invocations answered, failed, crashes, running now
    /// (`None` when the host no longer reports the instance, as once it ended).
    pub calls: Option<u64>,
    pub errors: Option<u64>,
    pub crashes: Option<u64>,
    pub in_flight: Option<u64>,
}

/// A capability provider.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct ProviderRow {
    pub provider_id: String,
    pub name: String,
    pub capabilities: Vec<String>,
    /// Where it runs: its host, or its node for a standalone provider.
    pub place: Option<String>,
    pub embedded: bool,
    pub status: &'static str,
    pub restarts: u32,
    pub last_reason: Option<String>,
}

/// A capability assignment, with its configuration as the facts and `assignment ls` show it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct AssignmentRow {
    pub assignment_id: String,
    pub target: String,
    pub capability: String,
    pub provider: String,
    pub config: BTreeMap<String, String>,
}

/// One fact of the live feed.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct FactRow {
    pub seq: u64,
    pub time: String,
    /// Its short type, `instance.crashed`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The entity it is about.
    pub subject: String,
    pub summary: String,
}

impl FactRow {
    /// The row of a raw fact; `None` when it does not decode.
    pub(crate) fn of(seq: u64, payload: &[u8]) -> Option<Self> {
        let event = Event::decode(payload).ok()?;
        Some(Self {
            seq,
            time: event.time_rfc3339(),
            kind: event.kind().short_name(),
            subject: event.data.entity_id().to_owned(),
            summary: event.summary(),
        })
    }
}

/// Builds the snapshot of `projection` and `status` with the load `heartbeats` report.
pub(crate) fn snapshot(
    projection: &Projection,
    served_by: &str,
    status: &StatusReply,
    heartbeats: &Heartbeats,
    now: DateTime<Utc>,
    at: Instant,
) -> Snapshot {
    let mut running_on: HashMap<&HostId, u32> = HashMap::new();
    for record in projection.instances.values() {
        if record.status == InstanceStatus::Running {
            *running_on.entry(&record.host_id).or_default() += 1;
        }
    }
    let hosts = projection
        .hosts
        .values()
        .map(|h| {
            let live = heartbeats.hosts.get(&h.host_id);
            HostRow {
                host_id: h.host_id.to_string(),
                status: h.status.as_str(),
                version: h.version.clone(),
                labels: h.labels.clone(),
                max_instances: h.capacity.max_instances,
                cpus: h.capacity.cpus,
                memory_bytes: h.capacity.memory_bytes,
                instances: running_on.get(&h.host_id).copied().unwrap_or(0),
                in_flight: live.map_or(0, |l| {
                    l.heartbeat.instances.iter().map(|i| i.in_flight).sum()
                }),
                heartbeat_age_ms: live
                    .map(|l| at.saturating_duration_since(l.received).as_millis() as u64),
            }
        })
        .collect();

    let mut components: BTreeMap<String, ComponentRow> = BTreeMap::new();
    fn row<'a>(
        components: &'a mut BTreeMap<String, ComponentRow>,
        name: &str,
    ) -> &'a mut ComponentRow {
        components
            .entry(name.to_owned())
            .or_insert_with(|| ComponentRow {
                name: name.to_owned(),
                versions: Vec::new(),
                instances: Vec::new(),
            })
    }
    for artifact in projection.artifacts.values() {
        let versions = &mut row(&mut components, artifact.manifest.name.as_str()).versions;
        if !versions.contains(&artifact.manifest.version) {
            versions.push(artifact.manifest.version.clone());
        }
    }
    for record in projection.instances.values() {
        let shown = match record.status {
            InstanceStatus::Running | InstanceStatus::Restarting => true,
            InstanceStatus::Stopped => false,
            InstanceStatus::Crashed
            | InstanceStatus::GaveUp
            | InstanceStatus::Failed
            | InstanceStatus::Lost => now - record.status_since <= ENDED_SHOWN_FOR,
        };
        if !shown {
            continue;
        }
        let live = heartbeats.instance(&record.host_id, record.instance_id.as_str());
        row(&mut components, &record.component)
            .instances
            .push(InstanceRow {
                instance_id: record.instance_id.to_string(),
                host_id: record.host_id.to_string(),
                version: record.version.clone(),
                status: record.status.as_str(),
                restarts: record.attempt,
                last_reason: record.last_reason.clone(),
                status_since: record.status_since,
                calls: live.map(|i| i.calls),
                errors: live.map(|i| i.errors),
                crashes: live.map(|i| i.crashes),
                in_flight: live.map(|i| i.in_flight),
            });
    }
    let mut components: Vec<ComponentRow> = components.into_values().collect();
    for c in &mut components {
        c.versions.sort_by(|a, b| compare_versions(a, b));
        // Live ones first, then by how long they have been in their state.
        c.instances.sort_by(|a, b| {
            (a.status != "running", a.status_since, &a.instance_id).cmp(&(
                b.status != "running",
                b.status_since,
                &b.instance_id,
            ))
        });
    }

    let mut providers: Vec<ProviderRow> = projection
        .providers
        .values()
        .filter(|p| p.status != ProviderStatus::Stopped)
        .map(|p| ProviderRow {
            provider_id: p.provider_id.to_string(),
            name: p.name.to_string(),
            capabilities: p.capabilities.iter().map(ToString::to_string).collect(),
            place: p
                .host_id
                .as_ref()
                .map(ToString::to_string)
                .or_else(|| p.node.clone()),
            embedded: p.embedded,
            status: p.status.as_str(),
            restarts: p.restarts,
            last_reason: p.last_reason.clone(),
        })
        .collect();
    providers.sort_by(|a, b| (&a.name, &a.provider_id).cmp(&(&b.name, &b.provider_id)));

    let assignments = projection
        .assignments()
        .values()
        .map(|a| AssignmentRow {
            assignment_id: a.assignment.assignment_id.to_string(),
            target: a.assignment.target.describe(),
            capability: a.assignment.capability.to_string(),
            provider: a.assignment.provider.to_string(),
            config: a.assignment.config.clone(),
        })
        .collect();

    Snapshot {
        lattice: status.lattice.to_string(),
        as_of: projection.last_seq.max(status.as_of),
        taken_at: now,
        served_by: served_by.to_owned(),
        hosts,
        components,
        providers,
        assignments,
        rollouts: status.rollouts.clone(),
        failures_last_hour: status.failures_last_hour,
        lag: status.stream.lag,
    }
}

/// Semantic versions in order where both parse, else as text.
fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    match (semver::Version::parse(a), semver::Version::parse(b)) {
        (Ok(a), Ok(b)) => a.cmp(&b),
        _ => a.cmp(b),
    }
}

/// How far back invocation rates look: the growth of each instance's counters over about this
/// long. Wider than one chart period, so that a point neither misses the calls made between two
/// fast heartbeats nor swings with each one.
pub(crate) const RATE_WINDOW: Duration = Duration::from_secs(6);

/// The latest heartbeat of each host and the invocation rates derived from its recent ones.
#[derive(Debug, Default)]
pub(crate) struct Heartbeats {
    hosts: HashMap<HostId, HostSample>,
}

#[derive(Debug)]
struct HostSample {
    heartbeat: Heartbeat,
    received: Instant,
    /// The counters of earlier heartbeats, oldest first: one at or before the start of the
    /// window (the baseline) and those since.
    history: VecDeque<Counters>,
    /// Per component: invocations and errors per second over the window.
    rates: BTreeMap<String, Rate>,
}

/// What one heartbeat said of each instance's counters.
#[derive(Debug)]
struct Counters {
    sent_at: DateTime<Utc>,
    /// Instance id → (calls, errors).
    instances: HashMap<String, (u64, u64)>,
}

impl Counters {
    fn of(heartbeat: &Heartbeat) -> Self {
        Counters {
            sent_at: heartbeat.sent_at,
            instances: heartbeat
                .instances
                .iter()
                .map(|i| (i.instance_id.clone(), (i.calls, i.errors)))
                .collect(),
        }
    }
}

/// Invocations and failed invocations per second.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub(crate) struct Rate {
    pub calls: f64,
    pub errors: f64,
}

impl Heartbeats {
    /// Records a heartbeat received at `at`; the rates of its host are the counters' growth
    /// since the host's last heartbeat sent at least [`RATE_WINDOW`] before this one, or its
    /// oldest if none is that old (an instance new since then counts from zero).
    pub(crate) fn record(&mut self, heartbeat: Heartbeat, at: Instant) {
        let window = chrono::Duration::from_std(RATE_WINDOW).unwrap_or_default();
        let mut history = match self.hosts.remove(&heartbeat.host_id) {
            // A heartbeat no newer than the last (a clock set back) starts a new history.
            Some(previous) if previous.heartbeat.sent_at < heartbeat.sent_at => {
                let mut history = previous.history;
                history.push_back(Counters::of(&previous.heartbeat));
                history
            }
            _ => VecDeque::new(),
        };
        while history
            .get(1)
            .is_some_and(|second| heartbeat.sent_at - second.sent_at >= window)
        {
            history.pop_front();
        }
        let mut rates = BTreeMap::new();
        if let Some(baseline) = history.front() {
            let seconds = (heartbeat.sent_at - baseline.sent_at).as_seconds_f64();
            if seconds > 0.0 {
                for instance in &heartbeat.instances {
                    let (calls, errors) = baseline
                        .instances
                        .get(&instance.instance_id)
                        .copied()
                        .unwrap_or((0, 0));
                    let rate: &mut Rate = rates.entry(instance.component.clone()).or_default();
                    rate.calls += instance.calls.saturating_sub(calls) as f64 / seconds;
                    rate.errors += instance.errors.saturating_sub(errors) as f64 / seconds;
                }
            }
        }
        self.hosts.insert(
            heartbeat.host_id.clone(),
            HostSample {
                heartbeat,
                received: at,
                history,
                rates,
            },
        );
    }

    /// Forgets hosts not heard from for `stale_after`.
    pub(crate) fn forget_older_than(&mut self, stale_after: Duration, at: Instant) {
        self.hosts
            .retain(|_, s| at.saturating_duration_since(s.received) <= stale_after);
    }

    /// The lattice's rate per component: the sum over hosts of their latest rates.
    pub(crate) fn rates(&self) -> BTreeMap<String, Rate> {
        let mut out: BTreeMap<String, Rate> = BTreeMap::new();
        for sample in self.hosts.values() {
            for (component, rate) in &sample.rates {
                let total = out.entry(component.clone()).or_default();
                total.calls += rate.calls;
                total.errors += rate.errors;
            }
        }
        out
    }

    fn instance(
        &self,
        host: &HostId,
        instance_id: &str,
    ) -> Option<&trellis_schemas::heartbeat::InventoryInstance> {
        self.hosts
            .get(host)?
            .heartbeat
            .instances
            .iter()
            .find(|i| i.instance_id == instance_id)
    }
}

/// One point of the invocation chart, as the `metrics` event carries it.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct MetricsPoint {
    /// Milliseconds since the Unix epoch.
    pub t: i64,
    /// Per component.
    pub components: BTreeMap<String, Rate>,
}

#[cfg(test)]
mod tests {
    use trellis_schemas::control::{ControllerInfo, HostCounts, StreamSummary};
    use trellis_schemas::heartbeat::InventoryInstance;

    use super::*;

    fn heartbeat(host: &str, at: DateTime<Utc>, instances: &[(&str, &str, u64, u64)]) -> Heartbeat {
        Heartbeat {
            host_id: HostId::new(host).unwrap(),
            seq: 1,
            sent_at: at,
            uptime_ms: 0,
            interval_ms: 2000,
            version: "0".into(),
            labels: BTreeMap::new(),
            capacity: Default::default(),
            instances: instances
                .iter()
                .map(|(id, component, calls, errors)| InventoryInstance {
                    instance_id: (*id).into(),
                    component: (*component).into(),
                    state: "running".into(),
                    calls: *calls,
                    errors: *errors,
                    ..Default::default()
                })
                .collect(),
        }
    }

    #[test]
    fn rates_are_the_growth_between_heartbeats_summed_over_hosts() {
        let t0 = Utc::now();
        let t1 = t0 + chrono::TimeDelta::seconds(2);
        let now = Instant::now();
        let mut hb = Heartbeats::default();
        hb.record(heartbeat("h1", t0, &[("i1", "web", 100, 1)]), now);
        hb.record(heartbeat("h2", t0, &[("i2", "web", 50, 0)]), now);
        // The first heartbeat of a host is only a baseline.
        assert!(hb.rates().is_empty());
        hb.record(
            heartbeat("h1", t1, &[("i1", "web", 120, 5), ("i3", "api", 6, 0)]),
            now,
        );
        hb.record(heartbeat("h2", t1, &[("i2", "web", 70, 0)]), now);
        let rates = hb.rates();
        assert_eq!(
            rates["web"],
            Rate {
                calls: 20.0,
                errors: 2.0
            }
        );
        // An instance new since the last heartbeat counts from zero.
        assert_eq!(
            rates["api"],
            Rate {
                calls: 3.0,
                errors: 0.0
            }
        );
        hb.forget_older_than(Duration::ZERO, now + Duration::from_secs(1));
        assert!(hb.rates().is_empty());
    }

    #[test]
    fn a_burst_between_fast_heartbeats_shows_for_the_whole_window() {
        let t0 = Utc::now();
        let now = Instant::now();
        let at = |ms: i64| t0 + chrono::TimeDelta::milliseconds(ms);
        let mut hb = Heartbeats::default();
        hb.record(heartbeat("h1", at(0), &[("i1", "web", 0, 0)]), now);
        // 12 calls between the first two heartbeats, 200 ms apart, then none.
        hb.record(heartbeat("h1", at(200), &[("i1", "web", 12, 0)]), now);
        for ms in (400..=5_800).step_by(200) {
            hb.record(heartbeat("h1", at(ms), &[("i1", "web", 12, 0)]), now);
        }
        // 5.8 s after the baseline the burst still counts, averaged over the time since.
        assert!((hb.rates()["web"].calls - 12.0 / 5.8).abs() < 1e-9);
        for ms in (6_000..=6_400).step_by(200) {
            hb.record(heartbeat("h1", at(ms), &[("i1", "web", 12, 0)]), now);
        }
        // Once the baseline is after the burst, the rate is zero again.
        assert_eq!(hb.rates()["web"].calls, 0.0);
        // A heartbeat from an earlier time (a clock set back) starts over from a baseline.
        hb.record(heartbeat("h1", at(100), &[("i9", "web", 3, 0)]), now);
        assert!(hb.rates().is_empty());
    }

    fn status() -> StatusReply {
        StatusReply {
            as_of: 0,
            lattice: "default".parse().unwrap(),
            hosts: HostCounts {
                up: 0,
                stopped: 0,
                lost: 0,
            },
            controller: ControllerInfo {
                id: "c".into(),
                version: "0".into(),
                started_at: Utc::now(),
                replay_ms: 0,
                replayed_facts: 0,
            },
            stream: StreamSummary {
                name: "s".into(),
                messages: 0,
                first_seq: 0,
                last_seq: 0,
                lag: 0,
            },
            instances: BTreeMap::new(),
            providers: BTreeMap::new(),
            components: 0,
            rollouts: Vec::new(),
            failures_last_hour: 0,
            failures: Vec::new(),
        }
    }

    fn instance(
        id: &str,
        component: &str,
        status: InstanceStatus,
        since: DateTime<Utc>,
    ) -> trellis_schemas::InstanceRecord {
        trellis_schemas::InstanceRecord {
            instance_id: trellis_schemas::InstanceId::new(id).unwrap(),
            host_id: HostId::new("h1").unwrap(),
            component: component.into(),
            version: Some("1.0.0".into()),
            digest: None,
            restart: None,
            status,
            attempt: 2,
            last_reason: Some("trap: unreachable".into()),
            started_at: Some(since),
            status_since: since,
            status_seq: 1,
            replaced_by: None,
            isolation: Default::default(),
            acceleration: None,
        }
    }

    #[test]
    fn the_snapshot_shows_live_instances_and_recent_failures_with_their_counters() {
        let now = Utc::now();
        let mut projection = Projection::default();
        let h1 = HostId::new("h1").unwrap();
        projection.hosts.insert(
            h1.clone(),
            trellis_schemas::projection::HostRecord {
                host_id: h1.clone(),
                status: trellis_schemas::HostStatus::Up,
                labels: BTreeMap::new(),
                capacity: trellis_schemas::fact::Capacity {
                    max_instances: 10,
                    memory_bytes: 1 << 30,
                    cpus: 2,
                    microvm: None,
                },
                version: "0.1.0".into(),
                started_at: now,
                status_since: now,
                status_seq: 1,
            },
        );
        let two_hours = chrono::TimeDelta::hours(2);
        for record in [
            instance("run1", "web", InstanceStatus::Running, now),
            instance("run2", "web", InstanceStatus::Restarting, now),
            instance("gone", "web", InstanceStatus::Stopped, now),
            instance("boom", "web", InstanceStatus::Crashed, now),
            instance("old", "web", InstanceStatus::GaveUp, now - two_hours),
        ] {
            projection
                .instances
                .insert(record.instance_id.clone(), record);
        }
        let mut hb = Heartbeats::default();
        let mut beat = heartbeat("h1", now, &[("run1", "web", 40, 3)]);
        beat.instances[0].in_flight = 5;
        hb.record(beat, Instant::now());
        let s = snapshot(&projection, "c", &status(), &hb, now, Instant::now());

        assert_eq!(s.hosts.len(), 1);
        let host = &s.hosts[0];
        assert_eq!(
            (host.instances, host.max_instances, host.in_flight),
            (1, 10, 5)
        );
        assert!(host.heartbeat_age_ms.is_some());
        assert_eq!(s.components.len(), 1);
        let web = &s.components[0];
        let shown: Vec<(&str, &str)> = web
            .instances
            .iter()
            .map(|i| (i.instance_id.as_str(), i.status))
            .collect();
        // Stopped ones and failures older than an hour are left out; running ones come first.
        assert_eq!(
            shown,
            [
                ("run1", "running"),
                ("boom", "crashed"),
                ("run2", "restarting")
            ]
        );
        let run1 = &web.instances[0];
        assert_eq!(
            (run1.calls, run1.errors, run1.in_flight),
            (Some(40), Some(3), Some(5))
        );
        assert_eq!(run1.restarts, 2);
        // An instance its host no longer reports has no counters.
        assert_eq!(web.instances[1].calls, None);
        assert_eq!(
            web.instances[1].last_reason.as_deref(),
            Some("trap: unreachable")
        );
    }

    #[test]
    fn an_empty_lattice_has_an_empty_snapshot() {
        let projection = Projection::default();
        let status = status();
        let s = snapshot(
            &projection,
            "c",
            &status,
            &Heartbeats::default(),
            Utc::now(),
            Instant::now(),
        );
        assert!(s.hosts.is_empty() && s.components.is_empty() && s.providers.is_empty());
    }
}
