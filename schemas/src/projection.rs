//! The lattice's state as a pure fold over its facts.
//!
//! [`apply`] is the only way a [`Projection`] changes. It is deterministic and idempotent: a fact
//! whose stream sequence is not newer than the last one applied changes nothing, so re-deliveries
//! and duplicates are harmless. The fold is designed for bounded history: replaying only the
//! last facts of each subject (what the stream retains) yields the same projection as replaying
//! everything.

use std::collections::{BTreeMap, HashMap};
use std::sync::OnceLock;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::capability::{Assignment, AssignmentTarget, Capability};
use crate::fact::{Capacity, Fact, FactData};
use crate::instance::{ManifestDoc, RestartPolicy};
use crate::link::{Interface, LinkRecord};
use crate::names::{AssignmentId, HostId, InstanceId, LinkId, ProviderId, ProviderName, RolloutId};
use crate::rollout::{RolloutRecord, apply_rollout};

/// Where a host is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum HostStatus {
    /// Joined and (as far as the facts say) alive.
    Up,
    /// Drained and left.
    Stopped,
    /// Declared lost after its heartbeats stopped.
    Lost,
}

impl HostStatus {
    /// The status as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            HostStatus::Up => "up",
            HostStatus::Stopped => "stopped",
            HostStatus::Lost => "lost",
        }
    }
}

/// What the facts say about one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostRecord {
    /// The host.
    pub host_id: HostId,
    /// Its status.
    pub status: HostStatus,
    /// Placement labels from its last `host.started`.
    pub labels: BTreeMap<String, String>,
    /// Capacity from its last `host.started`.
    pub capacity: Capacity,
    /// Version from its last `host.started`.
    pub version: String,
    /// Time of its last `host.started`.
    pub started_at: DateTime<Utc>,
    /// Time of the fact that set the current status.
    pub status_since: DateTime<Utc>,
    /// Stream sequence of the fact that set the current status.
    pub status_seq: u64,
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    /// Serving calls.
    Running,
    /// Crashed; its host restarts it after a delay.
    Restarting,
    /// Crashed and not restarted (policy `never`).
    Crashed,
    /// Crashed after its restart attempts were exhausted.
    GaveUp,
    /// Stopped on request or by its draining host.
    Stopped,
    /// Never started.
    Failed,
    /// Its host was declared lost while it ran.
    Lost,
}

impl InstanceStatus {
    /// Every status, in declaration order: `status as usize` is its index here.
    pub const ALL: [InstanceStatus; 7] = [
        InstanceStatus::Running,
        InstanceStatus::Restarting,
        InstanceStatus::Crashed,
        InstanceStatus::GaveUp,
        InstanceStatus::Stopped,
        InstanceStatus::Failed,
        InstanceStatus::Lost,
    ];

    /// Whether the status is a failure: the instance stopped serving without being asked to.
    pub fn is_failure(self) -> bool {
        matches!(
            self,
            InstanceStatus::Failed
                | InstanceStatus::Crashed
                | InstanceStatus::GaveUp
                | InstanceStatus::Lost
        )
    }

    /// The status as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Running => "running",
            InstanceStatus::Restarting => "restarting",
            InstanceStatus::Crashed => "crashed",
            InstanceStatus::GaveUp => "gave_up",
            InstanceStatus::Stopped => "stopped",
            InstanceStatus::Failed => "failed",
            InstanceStatus::Lost => "lost",
        }
    }

    /// Whether the instance occupies its host (running or about to run again).
    pub fn is_active(self) -> bool {
        matches!(self, InstanceStatus::Running | InstanceStatus::Restarting)
    }
}

/// A component in the artifact store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ArtifactRecord {
    /// `sha256:<hex>`.
    pub digest: String,
    /// Size in bytes.
    pub size: u64,
    /// Its manifest.
    pub manifest: ManifestDoc,
    /// When it was stored.
    pub stored_at: DateTime<Utc>,
    /// Its signature, as the last `artifact.stored` for it gave it (pushing the same component
    /// again signed, or signed by another key, replaces it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<crate::instance::ComponentSignature>,
    /// What it exports (interfaces with their version, and functions), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exports: Option<Vec<String>>,
}

impl ArtifactRecord {
    /// Where a host gets this component from: the artifact store, with the manifest and the
    /// signature recorded.
    pub fn source(&self) -> crate::instance::ComponentSource {
        crate::instance::ComponentSource::Artifact {
            digest: self.digest.clone(),
            manifest: self.manifest.clone(),
            signature: self.signature.clone(),
        }
    }
}

/// What the facts say about one instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceRecord {
    /// The instance.
    pub instance_id: InstanceId,
    /// Its host.
    pub host_id: HostId,
    /// The component name (or, for a start that failed, the reference asked for).
    pub component: String,
    /// The component version, once started.
    pub version: Option<String>,
    /// The code's digest, once started.
    pub digest: Option<String>,
    /// Its restart policy, once started.
    pub restart: Option<RestartPolicy>,
    /// Its status.
    pub status: InstanceStatus,
    /// Restarts so far.
    pub attempt: u32,
    /// Why it last crashed, failed or stopped.
    pub last_reason: Option<String>,
    /// When it first started.
    pub started_at: Option<DateTime<Utc>>,
    /// Time of the fact that set the status.
    pub status_since: DateTime<Utc>,
    /// Stream sequence of that fact.
    pub status_seq: u64,
    /// When the instance was lost and relocated: the instance that replaced it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replaced_by: Option<InstanceId>,
    /// How it is isolated, once started.
    #[serde(
        default,
        skip_serializing_if = "crate::isolation::Isolation::is_process"
    )]
    pub isolation: crate::isolation::Isolation,
    /// For a `microvm` instance, how its VM is accelerated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acceleration: Option<crate::isolation::Acceleration>,
}

/// A capability assignment in force.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignmentRecord {
    /// The grant.
    pub assignment: Assignment,
    /// When it was granted.
    pub granted_at: DateTime<Utc>,
    /// Stream sequence of the `assignment.granted` fact.
    pub granted_seq: u64,
}

/// Where a provider process is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProviderStatus {
    /// Serving.
    Running,
    /// Died; its host restarts it.
    Restarting,
    /// Died and not restarted.
    Crashed,
    /// Drained and exited.
    Stopped,
    /// Never started.
    Failed,
}

impl ProviderStatus {
    /// Every status, in declaration order: `status as usize` is its index here.
    pub const ALL: [ProviderStatus; 5] = [
        ProviderStatus::Running,
        ProviderStatus::Restarting,
        ProviderStatus::Crashed,
        ProviderStatus::Stopped,
        ProviderStatus::Failed,
    ];

    /// The status as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderStatus::Running => "running",
            ProviderStatus::Restarting => "restarting",
            ProviderStatus::Crashed => "crashed",
            ProviderStatus::Stopped => "stopped",
            ProviderStatus::Failed => "failed",
        }
    }
}

/// What the facts say about one provider process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderRecord {
    /// The process.
    pub provider_id: ProviderId,
    /// The provider's name.
    pub name: ProviderName,
    /// Its version, once started.
    pub version: Option<String>,
    /// Capabilities it serves.
    pub capabilities: Vec<Capability>,
    /// The supervising host, if any.
    pub host_id: Option<HostId>,
    /// The machine it runs on, once started.
    pub node: Option<String>,
    /// Whether it runs inside its host's process.
    #[serde(default)]
    pub embedded: bool,
    /// Its status.
    pub status: ProviderStatus,
    /// Restarts by its host so far.
    pub restarts: u32,
    /// Why it last crashed, failed or stopped.
    pub last_reason: Option<String>,
    /// Time of the fact that set the status.
    pub status_since: DateTime<Utc>,
    /// Stream sequence of that fact.
    pub status_seq: u64,
}

/// The state of a lattice, as far as its facts tell.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Projection {
    /// The stream sequence of the last fact applied.
    pub last_seq: u64,
    /// Hosts by id.
    pub hosts: BTreeMap<HostId, HostRecord>,
    /// Components in the artifact store, by digest.
    pub artifacts: BTreeMap<String, ArtifactRecord>,
    /// Instances by id.
    pub instances: BTreeMap<InstanceId, InstanceRecord>,
    /// For every host ever declared lost: the stream sequence of its latest `host.lost` fact.
    /// (Controllers declare a loss expecting the host's `status_seq` as the last fact about the
    /// host, not this; it stays for readers of the projection.)
    pub last_lost_seq: BTreeMap<HostId, u64>,
    /// Capability assignments in force, by id (revoked ones are removed).
    // Private, so that every change goes through `apply` or `add_assignment`, which forget the
    // index below: an index older than the assignments would answer with a stale grant.
    #[serde(default)]
    assignments: BTreeMap<AssignmentId, AssignmentRecord>,
    /// The assignments by target, built on the first lookup after they change.
    #[serde(skip)]
    #[schemars(skip)]
    assignment_index: AssignmentIndex,
    /// Links in force, by id (removed ones are gone).
    #[serde(default)]
    pub links: BTreeMap<LinkId, LinkRecord>,
    /// Provider processes by id.
    #[serde(default)]
    pub providers: BTreeMap<ProviderId, ProviderRecord>,
    /// Rollouts by id, in progress and finished.
    #[serde(default)]
    pub rollouts: BTreeMap<RolloutId, RolloutRecord>,
}

/// Among `links`, the one that serves `interface` (named as imported, maybe with a version) to
/// `instance` of `component`: one made for the instance itself wins over one made for its
/// component.
pub fn link_for<'a>(
    links: impl IntoIterator<Item = &'a LinkRecord>,
    instance: &InstanceId,
    component: &str,
    interface: &str,
) -> Option<&'a LinkRecord> {
    most_specific(
        links
            .into_iter()
            .filter(|r| r.link.interface.names(interface))
            .map(|r| (&r.link.source, r)),
        instance,
        component,
    )
}

/// Among `(who, record)` pairs that apply to `instance` or to its `component`, the record made
/// for the instance itself, else the one made for its component.
fn most_specific<'a, R>(
    candidates: impl IntoIterator<Item = (&'a AssignmentTarget, &'a R)>,
    instance: &InstanceId,
    component: &str,
) -> Option<&'a R> {
    let mut for_component = None;
    for (who, record) in candidates {
        match who {
            AssignmentTarget::Instance(id) if id == instance => return Some(record),
            AssignmentTarget::Component(name) if name.as_str() == component => {
                for_component = Some(record);
            }
            _ => {}
        }
    }
    for_component
}

/// [`Projection::assignments`] by who they grant to, each target's grants in assignment-id
/// order (the order [`most_specific`] sees them in): a capability call finds its grant without
/// reading every assignment of the lattice.
#[derive(Debug, Clone, Default)]
struct AssignmentIndex(OnceLock<TargetGrants>);

/// For each instance and each component named by a grant: the capabilities granted, with the
/// grant's id, in assignment-id order.
#[derive(Debug, Clone, Default)]
struct TargetGrants {
    instances: HashMap<String, Vec<(Capability, AssignmentId)>>,
    components: HashMap<String, Vec<(Capability, AssignmentId)>>,
}

/// The ids of the grants of `capability` in a target's `list`, in assignment-id order.
fn granted(
    list: Option<&Vec<(Capability, AssignmentId)>>,
    capability: Capability,
) -> impl DoubleEndedIterator<Item = &AssignmentId> {
    list.into_iter()
        .flatten()
        .filter(move |(c, _)| *c == capability)
        .map(|(_, id)| id)
}

impl AssignmentIndex {
    fn get(&self, assignments: &BTreeMap<AssignmentId, AssignmentRecord>) -> &TargetGrants {
        self.0.get_or_init(|| {
            let mut grants = TargetGrants::default();
            for (id, record) in assignments {
                let (map, key) = match &record.assignment.target {
                    AssignmentTarget::Instance(i) => (&mut grants.instances, i.as_str()),
                    AssignmentTarget::Component(c) => (&mut grants.components, c.as_str()),
                };
                map.entry(key.to_owned())
                    .or_default()
                    .push((record.assignment.capability, id.clone()));
            }
            grants
        })
    }

    /// Forgets the index: the assignments changed.
    fn invalidate(&mut self) {
        self.0 = OnceLock::new();
    }
}

/// Derived from the assignments, so two projections with the same assignments are equal
/// whether or not either has built it.
impl PartialEq for AssignmentIndex {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for AssignmentIndex {}

impl Projection {
    /// An empty projection.
    pub fn new() -> Self {
        Self::default()
    }

    /// Hosts that are up.
    pub fn hosts_up(&self) -> impl Iterator<Item = &HostRecord> {
        self.hosts.values().filter(|h| h.status == HostStatus::Up)
    }

    /// Instances running (or restarting) on `host`.
    pub fn active_instances_on<'a>(
        &'a self,
        host: &'a HostId,
    ) -> impl Iterator<Item = &'a InstanceRecord> + 'a {
        self.instances
            .values()
            .filter(move |i| &i.host_id == host && i.status.is_active())
    }

    /// Capability assignments in force, by id (revoked ones are removed).
    pub fn assignments(&self) -> &BTreeMap<AssignmentId, AssignmentRecord> {
        &self.assignments
    }

    /// Adds an assignment learnt other than from its fact (a start command carries the grants
    /// of the instance it starts), unless one with its id is known already. Returns whether it
    /// was added.
    pub fn add_assignment(&mut self, record: AssignmentRecord) -> bool {
        let id = &record.assignment.assignment_id;
        if self.assignments.contains_key(id) {
            return false;
        }
        self.assignment_index.invalidate();
        self.assignments.insert(id.clone(), record);
        true
    }

    /// The assignment that grants `capability` to `instance` (of `component`): one made for the
    /// instance itself wins over one made for its component.
    pub fn assignment_for(
        &self,
        instance: &InstanceId,
        component: &str,
        capability: Capability,
    ) -> Option<&AssignmentRecord> {
        // As `most_specific` over the assignments of `capability`: the first grant to the
        // instance itself, else the last one to its component.
        let grants = self.assignment_index.get(&self.assignments);
        let id = granted(grants.instances.get(instance.as_str()), capability)
            .next()
            .or_else(|| granted(grants.components.get(component), capability).next_back())?;
        self.assignments.get(id)
    }

    /// The link that serves `interface` to `instance` (of `component`): one made for the
    /// instance itself wins over one made for its component.
    pub fn link_for(
        &self,
        instance: &InstanceId,
        component: &str,
        interface: &str,
    ) -> Option<&LinkRecord> {
        link_for(self.links.values(), instance, component, interface)
    }

    /// The link in force for exactly this source and interface, if any.
    pub fn link_of(&self, source: &AssignmentTarget, interface: &Interface) -> Option<&LinkRecord> {
        self.links
            .values()
            .find(|r| &r.link.source == source && &r.link.interface == interface)
    }

    /// The assignment in force for exactly this target and capability, if any.
    pub fn assignment_of(
        &self,
        target: &AssignmentTarget,
        capability: Capability,
    ) -> Option<&AssignmentRecord> {
        self.assignments
            .values()
            .find(|r| &r.assignment.target == target && r.assignment.capability == capability)
    }

    /// The newest stored artifact named `name`, or of `name` at `version`.
    pub fn find_artifact(&self, name: &str, version: Option<&str>) -> Option<&ArtifactRecord> {
        self.artifacts
            .values()
            .filter(|a| a.manifest.name.as_str() == name)
            .filter(|a| version.is_none_or(|v| a.manifest.version == v))
            .max_by(|a, b| {
                let parse = |r: &ArtifactRecord| semver::Version::parse(&r.manifest.version).ok();
                parse(a).cmp(&parse(b)).then(a.stored_at.cmp(&b.stored_at))
            })
    }
}

fn set_instance_status(
    projection: &mut Projection,
    id: &InstanceId,
    status: InstanceStatus,
    reason: Option<&str>,
    fact: &Fact,
) {
    if let Some(instance) = projection.instances.get_mut(id) {
        instance.status = status;
        instance.status_since = fact.event.time;
        instance.status_seq = fact.seq;
        if let Some(reason) = reason {
            instance.last_reason = Some(reason.to_owned());
        }
    }
}

/// Gives every instance still active on `host` the final `status`, for `reason`.
fn end_instances_on(
    projection: &mut Projection,
    host: &HostId,
    status: InstanceStatus,
    reason: &str,
    fact: &Fact,
) {
    let on_host: Vec<InstanceId> = projection
        .active_instances_on(host)
        .map(|i| i.instance_id.clone())
        .collect();
    for id in on_host {
        set_instance_status(projection, &id, status, Some(reason), fact);
    }
}

/// Applies one fact. Returns whether it changed anything: facts at or below
/// [`Projection::last_seq`] are duplicates and are ignored.
pub fn apply(projection: &mut Projection, fact: &Fact) -> bool {
    if fact.seq <= projection.last_seq {
        return false;
    }
    projection.last_seq = fact.seq;
    let time = fact.event.time;
    match &fact.event.data {
        FactData::HostStarted(d) => {
            projection.hosts.insert(
                d.host_id.clone(),
                HostRecord {
                    host_id: d.host_id.clone(),
                    status: HostStatus::Up,
                    labels: d.labels.clone(),
                    capacity: d.capacity.clone(),
                    version: d.version.clone(),
                    started_at: time,
                    status_since: time,
                    status_seq: fact.seq,
                },
            );
        }
        FactData::HostStopped(d) => {
            if let Some(host) = projection.hosts.get_mut(&d.host_id) {
                host.status = HostStatus::Stopped;
                host.status_since = time;
                host.status_seq = fact.seq;
            }
            // A host reports each instance's stop before its own; one it could not wait for
            // (a call outlasting the drain) stopped with the process all the same.
            end_instances_on(
                projection,
                &d.host_id,
                InstanceStatus::Stopped,
                "host stopped",
                fact,
            );
        }
        FactData::HostLost(d) => {
            projection.last_lost_seq.insert(d.host_id.clone(), fact.seq);
            // A host that drained before the loss was declared stays stopped. A repeated
            // declaration moves `status_since`, so that replaying only the latest `host.lost`
            // (all the stream may keep) gives the same record as replaying all of them.
            if let Some(host) = projection.hosts.get_mut(&d.host_id)
                && host.status != HostStatus::Stopped
            {
                host.status = HostStatus::Lost;
                host.status_since = time;
                host.status_seq = fact.seq;
            }
            end_instances_on(
                projection,
                &d.host_id,
                InstanceStatus::Lost,
                "host lost",
                fact,
            );
        }
        FactData::ArtifactStored(d) => {
            projection.artifacts.insert(
                d.digest.clone(),
                ArtifactRecord {
                    digest: d.digest.clone(),
                    size: d.size,
                    manifest: d.manifest.clone(),
                    stored_at: time,
                    signature: d.signature.clone(),
                    exports: d.exports.clone(),
                },
            );
        }
        FactData::InstanceStarted(d) => {
            let previous = projection.instances.get(&d.instance_id);
            let started_at = previous.and_then(|p| p.started_at).unwrap_or(time);
            let last_reason = previous.and_then(|p| p.last_reason.clone());
            projection.instances.insert(
                d.instance_id.clone(),
                InstanceRecord {
                    instance_id: d.instance_id.clone(),
                    host_id: d.host_id.clone(),
                    component: d.component.to_string(),
                    version: Some(d.version.clone()),
                    digest: Some(d.digest.clone()),
                    restart: Some(d.restart),
                    status: InstanceStatus::Running,
                    attempt: d.attempt,
                    last_reason,
                    started_at: Some(started_at),
                    status_since: time,
                    status_seq: fact.seq,
                    replaced_by: None,
                    isolation: d.isolation,
                    acceleration: d.acceleration,
                },
            );
        }
        FactData::InstanceStartFailed(d) => {
            projection.instances.insert(
                d.instance_id.clone(),
                InstanceRecord {
                    instance_id: d.instance_id.clone(),
                    host_id: d.host_id.clone(),
                    component: d.component.clone(),
                    version: None,
                    digest: None,
                    restart: None,
                    status: InstanceStatus::Failed,
                    attempt: 0,
                    last_reason: Some(d.reason.clone()),
                    started_at: None,
                    status_since: time,
                    status_seq: fact.seq,
                    replaced_by: None,
                    isolation: Default::default(),
                    acceleration: None,
                },
            );
        }
        FactData::InstanceStopped(d) => {
            set_instance_status(
                projection,
                &d.instance_id,
                InstanceStatus::Stopped,
                Some(&d.reason),
                fact,
            );
        }
        FactData::InstanceCrashed(d) => {
            let status = if d.will_restart {
                InstanceStatus::Restarting
            } else {
                InstanceStatus::Crashed
            };
            set_instance_status(projection, &d.instance_id, status, Some(&d.reason), fact);
        }
        FactData::InstanceRestarting(d) => {
            set_instance_status(
                projection,
                &d.instance_id,
                InstanceStatus::Restarting,
                None,
                fact,
            );
            if let Some(instance) = projection.instances.get_mut(&d.instance_id) {
                instance.attempt = d.attempt;
            }
        }
        FactData::InstanceGaveUp(d) => {
            set_instance_status(
                projection,
                &d.instance_id,
                InstanceStatus::GaveUp,
                Some(&d.last_reason),
                fact,
            );
            if let Some(instance) = projection.instances.get_mut(&d.instance_id) {
                instance.attempt = d.attempts;
            }
        }
        FactData::InstanceRelocated(d) => {
            if let Some(instance) = projection.instances.get_mut(&d.instance_id) {
                instance.replaced_by = Some(d.replacement.clone());
            }
        }
        FactData::AssignmentGranted(d) => {
            projection.assignment_index.invalidate();
            projection.assignments.insert(
                d.assignment_id.clone(),
                AssignmentRecord {
                    assignment: d.clone(),
                    granted_at: time,
                    granted_seq: fact.seq,
                },
            );
        }
        FactData::LinkAdded(d) => {
            projection.links.insert(
                d.link_id.clone(),
                LinkRecord {
                    link: d.clone(),
                    added_at: time,
                    added_seq: fact.seq,
                },
            );
        }
        FactData::LinkRemoved(d) => {
            projection.links.remove(&d.link_id);
        }
        FactData::AssignmentRevoked(d) => {
            projection.assignment_index.invalidate();
            projection.assignments.remove(&d.assignment_id);
        }
        FactData::ProviderStarted(d) => {
            let restarts = projection
                .providers
                .get(&d.provider_id)
                .map_or(0, |p| p.restarts);
            projection.providers.insert(
                d.provider_id.clone(),
                ProviderRecord {
                    provider_id: d.provider_id.clone(),
                    name: d.name.clone(),
                    version: Some(d.version.clone()),
                    capabilities: d.capabilities.clone(),
                    host_id: d.host_id.clone(),
                    node: Some(d.node.clone()),
                    embedded: d.embedded,
                    status: ProviderStatus::Running,
                    restarts,
                    last_reason: None,
                    status_since: time,
                    status_seq: fact.seq,
                },
            );
        }
        FactData::ProviderStartFailed(d) => {
            projection.providers.insert(
                d.provider_id.clone(),
                ProviderRecord {
                    provider_id: d.provider_id.clone(),
                    name: d.name.clone(),
                    version: None,
                    capabilities: Vec::new(),
                    host_id: Some(d.host_id.clone()),
                    node: None,
                    embedded: false,
                    status: ProviderStatus::Failed,
                    restarts: 0,
                    last_reason: Some(d.reason.clone()),
                    status_since: time,
                    status_seq: fact.seq,
                },
            );
        }
        FactData::ProviderStopped(d) => {
            if let Some(p) = projection.providers.get_mut(&d.provider_id) {
                p.status = ProviderStatus::Stopped;
                p.last_reason = Some(d.reason.clone());
                p.status_since = time;
                p.status_seq = fact.seq;
            }
        }
        FactData::ProviderCrashed(d) => {
            if let Some(p) = projection.providers.get_mut(&d.provider_id) {
                p.status = if d.will_restart {
                    ProviderStatus::Restarting
                } else {
                    ProviderStatus::Crashed
                };
                p.restarts = d.restarts;
                p.last_reason = Some(d.reason.clone());
                p.status_since = time;
                p.status_seq = fact.seq;
            }
        }
        FactData::RolloutStarted(_)
        | FactData::RolloutStepReached(_)
        | FactData::RolloutPaused(_)
        | FactData::RolloutPromoted(_)
        | FactData::RolloutCompleted(_)
        | FactData::RolloutAborted(_)
        | FactData::RolloutRolledBack(_)
        | FactData::RolloutAdopted(_) => {
            apply_rollout(&mut projection.rollouts, fact.seq, time, &fact.event.data);
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fact::{Event, HostLost, HostStarted, HostStopped};
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn host(n: u8) -> HostId {
        HostId::new(format!("h{n}")).expect("valid")
    }

    #[test]
    fn every_status_is_listed_at_its_own_index() {
        for (i, status) in InstanceStatus::ALL.into_iter().enumerate() {
            assert_eq!(status as usize, i, "{status:?}");
        }
        for (i, status) in ProviderStatus::ALL.into_iter().enumerate() {
            assert_eq!(status as usize, i, "{status:?}");
        }
        // Distinct wire names, so that no count hides another.
        let names: std::collections::BTreeSet<_> =
            InstanceStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names.len(), InstanceStatus::ALL.len());
        let names: std::collections::BTreeSet<_> =
            ProviderStatus::ALL.iter().map(|s| s.as_str()).collect();
        assert_eq!(names.len(), ProviderStatus::ALL.len());
    }

    fn fact(seq: u64, data: FactData) -> Fact {
        let mut event = Event::new("/trellis/default/test/t", data);
        event.time = Utc
            .timestamp_opt(1_700_000_000 + seq as i64, 0)
            .single()
            .expect("time");
        Fact { seq, event }
    }

    fn started(n: u8, version: &str) -> FactData {
        FactData::HostStarted(HostStarted {
            host_id: host(n),
            labels: BTreeMap::from([("n".to_owned(), n.to_string())]),
            capacity: Capacity {
                max_instances: 4,
                memory_bytes: 1 << 20,
                cpus: 1,
                microvm: None,
            },
            version: version.to_owned(),
            rejoined: false,
        })
    }

    fn stopped(n: u8) -> FactData {
        FactData::HostStopped(HostStopped {
            host_id: host(n),
            reason: "signal".to_owned(),
        })
    }

    fn lost(n: u8) -> FactData {
        FactData::HostLost(HostLost {
            host_id: host(n),
            silent_for_ms: 10,
            timeout_ms: 5,
            detected_by: "c".to_owned(),
        })
    }

    #[test]
    fn host_lifecycle() {
        let mut p = Projection::new();
        assert!(apply(&mut p, &fact(1, started(1, "1"))));
        assert_eq!(p.hosts[&host(1)].status, HostStatus::Up);
        assert!(apply(&mut p, &fact(2, lost(1))));
        assert_eq!(p.hosts[&host(1)].status, HostStatus::Lost);
        assert_eq!(p.last_lost_seq[&host(1)], 2);
        assert!(apply(&mut p, &fact(3, started(1, "2"))));
        let h = &p.hosts[&host(1)];
        assert_eq!(
            (h.status, h.version.as_str(), h.status_seq),
            (HostStatus::Up, "2", 3)
        );
        assert!(apply(&mut p, &fact(4, stopped(1))));
        assert_eq!(p.hosts[&host(1)].status, HostStatus::Stopped);
        // A late loss declaration does not turn a drained host into a lost one.
        assert!(apply(&mut p, &fact(5, lost(1))));
        assert_eq!(p.hosts[&host(1)].status, HostStatus::Stopped);
        assert_eq!(p.last_lost_seq[&host(1)], 5);
        assert_eq!(p.last_seq, 5);
    }

    #[test]
    fn a_stopped_host_leaves_no_instance_running() {
        use crate::fact::{InstanceStarted, InstanceStopped};
        let instance =
            |n: u8| InstanceId::new(format!("01J0000000000000000000000{n}")).expect("valid");
        let run = |n: u8| {
            FactData::InstanceStarted(InstanceStarted {
                instance_id: instance(n),
                host_id: host(1),
                component: crate::ComponentName::new("c").expect("valid"),
                version: "1.0.0".into(),
                digest: "sha256:00".into(),
                restart: RestartPolicy::Always,
                attempt: 0,
                isolation: Default::default(),
                acceleration: None,
            })
        };
        let mut p = Projection::new();
        apply(&mut p, &fact(1, started(1, "1")));
        apply(&mut p, &fact(2, run(1)));
        apply(&mut p, &fact(3, run(2)));
        // The host reported one stop while draining; the other instance outlasted the drain.
        apply(
            &mut p,
            &fact(
                4,
                FactData::InstanceStopped(InstanceStopped {
                    instance_id: instance(1),
                    host_id: host(1),
                    reason: "host draining".into(),
                }),
            ),
        );
        apply(&mut p, &fact(5, stopped(1)));
        let reported = &p.instances[&instance(1)];
        assert_eq!(
            (
                reported.status,
                reported.last_reason.as_deref(),
                reported.status_seq
            ),
            (InstanceStatus::Stopped, Some("host draining"), 4)
        );
        let unreported = &p.instances[&instance(2)];
        assert_eq!(
            (
                unreported.status,
                unreported.last_reason.as_deref(),
                unreported.status_seq
            ),
            (InstanceStatus::Stopped, Some("host stopped"), 5)
        );
        assert_eq!(p.active_instances_on(&host(1)).count(), 0);
    }

    #[test]
    fn duplicates_change_nothing() {
        let mut p = Projection::new();
        apply(&mut p, &fact(1, started(1, "1")));
        apply(&mut p, &fact(2, stopped(1)));
        let before = p.clone();
        assert!(!apply(&mut p, &fact(1, started(1, "1"))));
        assert!(!apply(&mut p, &fact(2, stopped(1))));
        assert_eq!(p, before);
    }

    #[test]
    fn facts_about_unknown_hosts_do_not_invent_them() {
        let mut p = Projection::new();
        apply(&mut p, &fact(1, stopped(9)));
        assert!(p.hosts.is_empty());
        assert_eq!(p.last_seq, 1);
    }

    fn arb_history() -> impl Strategy<Value = Vec<Fact>> {
        prop::collection::vec((0u8..4, 0u8..3, 0u8..3), 0..60).prop_map(|steps| {
            steps
                .into_iter()
                .enumerate()
                .map(|(i, (h, verb, version))| {
                    let data = match verb {
                        0 => started(h, &version.to_string()),
                        1 => stopped(h),
                        _ => lost(h),
                    };
                    fact(i as u64 + 1, data)
                })
                .collect()
        })
    }

    fn fold(facts: &[Fact]) -> Projection {
        let mut p = Projection::new();
        for f in facts {
            apply(&mut p, f);
        }
        p
    }

    /// What the stream keeps with `max_msgs_per_subject = keep`: the last `keep` facts of every
    /// (kind, entity) subject, in sequence order.
    fn retained(facts: &[Fact], keep: usize) -> Vec<Fact> {
        let mut per_subject: BTreeMap<(String, String), Vec<u64>> = BTreeMap::new();
        for f in facts {
            per_subject
                .entry((
                    f.event.kind().short_name(),
                    f.event.data.entity_id().to_owned(),
                ))
                .or_default()
                .push(f.seq);
        }
        let kept: std::collections::BTreeSet<u64> = per_subject
            .values()
            .flat_map(|seqs| seqs.iter().rev().take(keep).copied())
            .collect();
        facts
            .iter()
            .filter(|f| kept.contains(&f.seq))
            .cloned()
            .collect()
    }

    proptest! {
        #[test]
        fn same_facts_same_state(history in arb_history()) {
            prop_assert_eq!(fold(&history), fold(&history));
        }

        #[test]
        fn redeliveries_change_nothing(history in arb_history(), dups in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 0..20)) {
            let clean = fold(&history);
            let mut noisy = history.clone();
            for (what, at) in dups {
                if history.is_empty() { break; }
                let f = history[what.index(history.len())].clone();
                // Re-deliver the fact somewhere after its first delivery.
                let first = noisy.iter().position(|g| g.seq == f.seq).unwrap_or(0);
                let pos = first + 1 + at.index(noisy.len() - first);
                noisy.insert(pos, f);
            }
            prop_assert_eq!(fold(&noisy), clean);
        }

        #[test]
        fn snapshot_then_continue_equals_full_replay(history in arb_history(), cut in any::<prop::sample::Index>()) {
            let cut = if history.is_empty() { 0 } else { cut.index(history.len()) };
            let snap = fold(&history[..cut]);
            let json = serde_json::to_string(&snap).expect("serializes");
            let mut resumed: Projection = serde_json::from_str(&json).expect("deserializes");
            for f in &history[cut..] {
                apply(&mut resumed, f);
            }
            prop_assert_eq!(resumed, fold(&history));
        }

        #[test]
        fn bounded_history_yields_the_same_state(history in arb_history()) {
            let full = fold(&history);
            for keep in [1usize, 2, 4] {
                let mut short = fold(&retained(&history, keep));
                // last_seq is the stream's last sequence in both cases; the retained subset
                // always contains the last fact.
                short.last_seq = full.last_seq;
                prop_assert_eq!(&short, &full, "keep = {}", keep);
            }
        }
    }

    /// One step of [`the_assignment_index_answers_as_a_scan_of_every_assignment`]: grant
    /// assignment `id` of `capability` to instance or component `target` (by its fact, or
    /// `carried` by a start command), or revoke it.
    #[derive(Debug, Clone)]
    enum Change {
        Grant {
            id: u8,
            to_instance: bool,
            target: u8,
            capability: usize,
            carried: bool,
        },
        Revoke(u8),
    }

    fn change() -> impl Strategy<Value = Change> {
        prop_oneof![
            3 => (0u8..8, any::<bool>(), 0u8..3, 0..Capability::ALL.len(), any::<bool>()).prop_map(
                |(id, to_instance, target, capability, carried)| Change::Grant { id, to_instance, target, capability, carried }
            ),
            1 => (0u8..8).prop_map(Change::Revoke),
        ]
    }

    proptest! {
        #[test]
        fn the_assignment_index_answers_as_a_scan_of_every_assignment(
            changes in proptest::collection::vec(change(), 1..40)
        ) {
            use crate::fact::AssignmentRevoked;
            use crate::names::ComponentName;
            let mut projection = Projection::new();
            for (seq, change) in (1u64..).zip(changes) {
                let data = match change {
                    Change::Grant { id, to_instance, target, capability, carried } => {
                        let target = if to_instance {
                            AssignmentTarget::Instance(InstanceId::new(format!("i{target}")).expect("id"))
                        } else {
                            AssignmentTarget::Component(ComponentName::new(format!("c{target}")).expect("name"))
                        };
                        let assignment = Assignment {
                            assignment_id: AssignmentId::new(format!("a{id}")).expect("id"),
                            target,
                            capability: Capability::ALL[capability],
                            provider: ProviderName::new("p").expect("name"),
                            config: BTreeMap::new(),
                        };
                        if carried {
                            let known = projection.assignments().contains_key(&assignment.assignment_id);
                            let added = projection.add_assignment(AssignmentRecord {
                                assignment,
                                granted_at: Utc::now(),
                                granted_seq: seq,
                            });
                            prop_assert_eq!(added, !known);
                            None
                        } else {
                            Some(FactData::AssignmentGranted(assignment))
                        }
                    }
                    Change::Revoke(id) => Some(FactData::AssignmentRevoked(AssignmentRevoked {
                        assignment_id: AssignmentId::new(format!("a{id}")).expect("id"),
                        reason: "requested".to_owned(),
                    })),
                };
                if let Some(data) = data {
                    apply(&mut projection, &fact(seq, data));
                }
                // Read back from JSON too: a projection that never built its index answers alike.
                let copy: Projection = serde_json::from_value(
                    serde_json::to_value(&projection).expect("json"),
                ).expect("projection");
                prop_assert_eq!(&copy, &projection);
                for instance in 0..3 {
                    let instance = InstanceId::new(format!("i{instance}")).expect("id");
                    for component in ["c0", "c1", "c2"] {
                        for &capability in Capability::ALL {
                            let scanned = most_specific(
                                projection
                                    .assignments()
                                    .values()
                                    .filter(|r| r.assignment.capability == capability)
                                    .map(|r| (&r.assignment.target, r)),
                                &instance,
                                component,
                            );
                            prop_assert_eq!(projection.assignment_for(&instance, component, capability), scanned);
                            prop_assert_eq!(copy.assignment_for(&instance, component, capability), scanned);
                        }
                    }
                }
            }
        }
    }
}
