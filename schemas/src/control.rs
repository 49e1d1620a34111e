//! Control requests, their replies and the reply envelope.
//!
//! Every control subject `trellis.ctl.v1.<lattice>.<noun>.<verb>` takes a JSON object (an empty
//! body means `{}`) and answers with one envelope:
//!
//! ```json
//! {"ok": true, "data": {…}}
//! {"ok": false, "error": {"code": "not_found", "message": "…", "details": {…}}}
//! ```
//!
//! Requests reject unknown fields. Query replies carry `as_of`, the stream sequence of the last
//! fact they reflect; a query may ask for `min_seq` to wait (briefly) until the controller has
//! applied that fact, which lets a client read its own writes.

use std::collections::BTreeMap;
use std::fmt;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::capability::{Assignment, AssignmentTarget, Capability};
use crate::fact::{ArtifactStored, Capacity};
use crate::instance::RestartPolicy;
use crate::names::{
    AssignmentId, ComponentName, HostId, InstanceId, Lattice, ProviderId, ProviderName, RolloutId,
};
use crate::projection::{
    ArtifactRecord, AssignmentRecord, HostStatus, InstanceRecord, InstanceStatus, ProviderRecord,
    ProviderStatus,
};
use crate::rollout::{Revision, RolloutPlan, RolloutRecord, RolloutStatus, Strategy};

/// The largest control request body the controller accepts, in bytes.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// The control operations, one line per operation: extra doc if any, its [`CtlOp`] variant,
/// its subject's `<noun>.<verb>`, its request and reply types, and `, min_seq` when the request
/// has a `min_seq` field to wait for.
///
/// `ctl_ops!` generates from this list every table that lists each operation: [`CtlOp`], its
/// names, [`CtlOp::ALL`], [`CtlOp::from_parts`], the [`CtlRequest`] impls and the request and
/// reply JSON Schemas, in the manner of wasmtime's `for_each_builtin_function!`. Adding an
/// operation is one line here plus its request and reply types; the compiler then asks the
/// controller for its handler.
macro_rules! for_each_ctl_op {
    ($mac:ident) => {
        $mac! {
            HostList = host.list: HostListRequest => HostListReply, min_seq;
            HostGet = host.get: HostGetRequest => HostGetReply, min_seq;
            LatticeStatus = lattice.status: StatusRequest => StatusReply, min_seq;
            /// The controller's whole projection, for diagnosis and for comparing replicas.
            LatticeProjection = lattice.projection: ProjectionRequest => ProjectionReply, min_seq;
            /// Records a component already put in the artifact store, after checking its digest
            /// and manifest.
            ComponentRegister = component.register: ComponentRegisterRequest
                => ComponentRegisterReply;
            ComponentList = component.list: ComponentListRequest => ComponentListReply, min_seq;
            InstanceStart = instance.start: InstanceStartRequest => InstanceStartReply, min_seq;
            InstanceStop = instance.stop: InstanceStopRequest => InstanceStopReply;
            InstanceList = instance.list: InstanceListRequest => InstanceListReply, min_seq;
            InstanceGet = instance.get: InstanceGetRequest => InstanceGetReply, min_seq;
            /// The recent log lines of an instance, or of every instance of a component,
            /// gathered from their hosts.
            InstanceLogs = instance.logs: InstanceLogsRequest => InstanceLogsGathered, min_seq;
            AssignmentGrant = assignment.grant: AssignmentGrantRequest => AssignmentGrantReply;
            AssignmentRevoke = assignment.revoke: AssignmentRevokeRequest
                => AssignmentRevokeReply;
            AssignmentList = assignment.list: AssignmentListRequest => AssignmentListReply,
                min_seq;
            /// Serves a component's import with another component.
            LinkAdd = link.add: LinkAddRequest => LinkAddReply;
            LinkRemove = link.remove: LinkRemoveRequest => LinkRemoveReply;
            LinkList = link.list: LinkListRequest => LinkListReply, min_seq;
            ProviderStart = provider.start: ProviderStartRequest => ProviderStartReply;
            ProviderStop = provider.stop: ProviderStopRequest => ProviderStopReply;
            ProviderList = provider.list: ProviderListRequest => ProviderListReply, min_seq;
            /// Starts replacing a component's running version with another.
            RolloutStart = rollout.start: RolloutStartRequest => RolloutStartReply;
            RolloutGet = rollout.get: RolloutGetRequest => RolloutGetReply, min_seq;
            RolloutList = rollout.list: RolloutListRequest => RolloutListReply, min_seq;
            /// Releases a paused step (blue-green switch, next canary step).
            RolloutPromote = rollout.promote: RolloutPromoteRequest => RolloutActionReply;
            /// Stops a rollout in progress; the old version serves again.
            RolloutAbort = rollout.abort: RolloutAbortRequest => RolloutActionReply;
            /// Goes back to a component's previous version: rolls back the rollout in progress,
            /// or starts a rollout to the version the last completed one replaced.
            RolloutUndo = rollout.undo: RolloutUndoRequest => RolloutStartReply;
        }
    };
}

/// `self.min_seq` for a request with that field, `None` for one without.
macro_rules! ctl_min_seq {
    ($request:ident) => {
        None
    };
    ($request:ident, $field:ident) => {
        $request.$field
    };
}

/// Generates [`CtlOp`], its tables and the [`CtlRequest`] impls from `for_each_ctl_op!`'s list.
macro_rules! ctl_ops {
    ($(
        $(#[$doc:meta])*
        $op:ident = $noun:ident . $verb:ident: $request:ty => $reply:ty $(, $min_seq:ident)?;
    )*) => {
        /// Every control operation: one subject each.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum CtlOp {
            $(
                #[doc = concat!(
                    "`", stringify!($noun), ".", stringify!($verb), "` — [`",
                    stringify!($request), "`] → [`", stringify!($reply), "`]."
                )]
                $(#[$doc])*
                $op,
            )*
        }

        impl CtlOp {
            /// Every operation.
            pub const ALL: &'static [CtlOp] = &[$(CtlOp::$op),*];

            /// The noun of the subject.
            pub fn noun(self) -> &'static str {
                match self {
                    $(CtlOp::$op => stringify!($noun),)*
                }
            }

            /// The verb of the subject.
            pub fn verb(self) -> &'static str {
                match self {
                    $(CtlOp::$op => stringify!($verb),)*
                }
            }

            /// The operation for a subject's noun and verb.
            pub fn from_parts(noun: &str, verb: &str) -> Option<Self> {
                match (noun, verb) {
                    $((stringify!($noun), stringify!($verb)) => Some(CtlOp::$op),)*
                    _ => None,
                }
            }

            /// The JSON Schema of the operation's request.
            pub(crate) fn request_schema(self) -> serde_json::Value {
                match self {
                    $(CtlOp::$op => crate::json_schema::schema_of::<$request>(),)*
                }
            }

            /// The JSON Schema of the operation's reply envelope.
            pub(crate) fn reply_schema(self) -> serde_json::Value {
                match self {
                    $(CtlOp::$op => crate::json_schema::schema_of::<Reply<$reply>>(),)*
                }
            }
        }

        $(
            impl CtlRequest for $request {
                const OP: CtlOp = CtlOp::$op;
                type Reply = $reply;
                fn min_seq(&self) -> Option<u64> {
                    ctl_min_seq!(self $(, $min_seq)?)
                }
            }
        )*
    };
}

for_each_ctl_op!(ctl_ops);

impl CtlOp {
    /// `<noun>.<verb>`, also the stem of the schema file names.
    pub fn name(self) -> String {
        format!("{}.{}", self.noun(), self.verb())
    }
}

/// Ties a request type to its operation and reply type.
pub trait CtlRequest: Serialize + DeserializeOwned {
    /// The operation.
    const OP: CtlOp;
    /// What the controller answers with on success.
    type Reply: Serialize + DeserializeOwned;
    /// The `min_seq` the request asks for.
    fn min_seq(&self) -> Option<u64>;
}

/// `host.list`: every host the lattice knows, with its liveness.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostListRequest {
    /// Wait until the controller has applied this stream sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_seq: Option<u64>,
    /// Only hosts with this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<HostStatus>,
    /// Page: only hosts whose id sorts after this one (the previous reply's `next_after`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<HostId>,
    /// Page size, 1 to [`MAX_PAGE`]. Default [`DEFAULT_PAGE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
}

/// The default number of entries in one page of a list reply.
pub const DEFAULT_PAGE: u32 = 500;
/// The largest page a list request may ask for; replies stay well below NATS's payload limit.
pub const MAX_PAGE: u32 = 1000;

/// `host.get`: one host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostGetRequest {
    /// The host.
    pub host_id: HostId,
    /// Wait until the controller has applied this stream sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_seq: Option<u64>,
}

/// `lattice.status`: a summary of the lattice.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusRequest {
    /// Wait until the controller has applied this stream sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_seq: Option<u64>,
}

/// `lattice.projection`: the controller's projection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectionRequest {
    /// Wait until the controller has applied this stream sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_seq: Option<u64>,
}

/// A host as the controller sees it: what the facts say plus its latest heartbeat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostView {
    /// The host.
    pub host_id: HostId,
    /// `up`, `stopped` or `lost`.
    pub status: HostStatus,
    /// Placement labels.
    pub labels: BTreeMap<String, String>,
    /// What the host offers.
    pub capacity: Capacity,
    /// The `trellis-host` version.
    pub version: String,
    /// When the host (last) joined.
    pub started_at: DateTime<Utc>,
    /// When the status last changed.
    pub status_since: DateTime<Utc>,
    /// When this controller last received a heartbeat, if it has received one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_heartbeat: Option<DateTime<Utc>>,
    /// Milliseconds since that heartbeat.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub heartbeat_age_ms: Option<u64>,
    /// Instances the host reported in its last heartbeat.
    pub instances: u32,
}

/// Reply to `host.list`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostListReply {
    /// The stream sequence this answer reflects.
    pub as_of: u64,
    /// The hosts, ordered by id.
    pub hosts: Vec<HostView>,
    /// When there are more: pass this as `after` to get the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<HostId>,
}

/// Reply to `host.get`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostGetReply {
    /// The stream sequence this answer reflects.
    pub as_of: u64,
    /// The host.
    pub host: HostView,
}

/// Host counts by status.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostCounts {
    /// Hosts that are up.
    pub up: u32,
    /// Hosts that drained and left.
    pub stopped: u32,
    /// Hosts declared lost.
    pub lost: u32,
}

/// The controller replica that answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ControllerInfo {
    /// The replica's id.
    pub id: String,
    /// The `trellis` version.
    pub version: String,
    /// When the replica started.
    pub started_at: DateTime<Utc>,
    /// How long its replay took, in milliseconds.
    pub replay_ms: u64,
    /// How many facts the replay applied.
    pub replayed_facts: u64,
}

/// The lattice's fact stream, as the answering replica last read its state from JetStream (at
/// most half a second before the answer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StreamSummary {
    /// The JetStream stream name.
    pub name: String,
    /// Messages it holds.
    pub messages: u64,
    /// Its first sequence.
    pub first_seq: u64,
    /// Its last sequence: the highest of the one read, the highest the replica has seen exist
    /// while reading facts, and `as_of`.
    pub last_seq: u64,
    /// Facts the answering replica has not applied yet.
    #[serde(default)]
    pub lag: u64,
}

/// An instance that failed lately: never started, crashed for good, gave up or was lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecentFailure {
    /// The instance.
    pub instance_id: InstanceId,
    /// Its component (or, for a start that failed, the reference asked for).
    pub component: String,
    /// `failed`, `crashed`, `gave_up` or `lost`.
    pub status: InstanceStatus,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When.
    pub since: DateTime<Utc>,
}

/// A rollout in progress, in brief.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutBrief {
    /// The rollout.
    pub rollout_id: RolloutId,
    /// The component.
    pub component: ComponentName,
    /// The version it rolls out.
    pub to: String,
    /// How.
    pub strategy: Strategy,
    /// `progressing`, `paused` or `promoted`.
    pub status: RolloutStatus,
    /// The new version's share of traffic, when traffic is split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
}

/// How far back [`StatusReply::failures`] looks.
pub const RECENT_FAILURES_SECS: i64 = 3600;
/// The most failures [`StatusReply::failures`] lists.
pub const RECENT_FAILURES_LISTED: usize = 10;

/// Reply to `lattice.status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StatusReply {
    /// The stream sequence this answer reflects.
    pub as_of: u64,
    /// The lattice.
    pub lattice: Lattice,
    /// Hosts by status.
    pub hosts: HostCounts,
    /// The replica that answered.
    pub controller: ControllerInfo,
    /// The fact stream, as the replica last read its state.
    pub stream: StreamSummary,
    /// Instances by status (statuses with none left out).
    #[serde(default)]
    pub instances: BTreeMap<String, u32>,
    /// Providers by status (statuses with none left out).
    #[serde(default)]
    pub providers: BTreeMap<String, u32>,
    /// Components (name and version) in the artifact store.
    #[serde(default)]
    pub components: u32,
    /// Rollouts in progress.
    #[serde(default)]
    pub rollouts: Vec<RolloutBrief>,
    /// Instances that failed in the last hour ([`RECENT_FAILURES_SECS`]).
    #[serde(default)]
    pub failures_last_hour: u32,
    /// The newest of them, newest first (at most [`RECENT_FAILURES_LISTED`]).
    #[serde(default)]
    pub failures: Vec<RecentFailure>,
}

/// Reply to `lattice.projection`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProjectionReply {
    /// The stream sequence this answer reflects.
    pub as_of: u64,
    /// The id of the controller replica that answered.
    pub served_by: String,
    /// The projection, exactly as the fold built it.
    pub projection: crate::projection::Projection,
}

/// `component.register`: record a component whose `.wasm` is already in the artifact store under
/// the hex of its digest. The controller checks that the stored object exists and has this
/// digest, validates the manifest, and publishes `artifact.stored`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ComponentRegisterRequest {
    /// `sha256:<64 hex>` of the `.wasm`.
    pub digest: String,
    /// The text of its `Component.toml`.
    pub manifest: String,
    /// A signature over the digest and the manifest as the controller validates it
    /// ([`crate::instance::signed_bytes`]); checked before the component is recorded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<crate::instance::ComponentSignature>,
}

/// Reply to `component.register`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ComponentRegisterReply {
    /// The stream sequence of the `artifact.stored` fact.
    pub seq: u64,
    /// The component as recorded.
    pub component: ArtifactStored,
}

/// `component.list`: every component in the artifact store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ComponentListRequest {
    /// Wait until the controller has applied this stream sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_seq: Option<u64>,
}

/// Reply to `component.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ComponentListReply {
    /// The stream sequence this answer reflects.
    pub as_of: u64,
    /// The components, by name then version.
    pub components: Vec<ArtifactRecord>,
}

/// `instance.start`: start `count` instances of a component.
///
/// The reply only acknowledges: it names the instances and where they were sent. Watch for
/// `instance.started` or `instance.start_failed` facts carrying `operation_id` as `causationid`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceStartRequest {
    /// `name`, `name@version`, `sha256:<hex>`, or `file:///path/app.wasm` (development: the file
    /// is read on the host).
    pub component: String,
    /// How many instances (1 to 100). Default 1.
    #[serde(default = "one")]
    pub count: u32,
    /// Run them on this host only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<HostId>,
    /// Run them only on hosts with all these labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// What to do on a crash. Default `{"policy":"never"}`.
    #[serde(default)]
    pub restart: RestartPolicy,
    /// Wait until the controller has applied this stream sequence (for example the `seq` of a
    /// `component.register` reply) before resolving the component.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_seq: Option<u64>,
    /// Capabilities to grant to each new instance before it starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<Grant>,
    /// Isolation: `process` or `microvm`. Default: the manifest's (`[isolation] mode`), which a
    /// request may strengthen but not weaken. `microvm` instances go only to hosts that run
    /// micro-VMs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<crate::isolation::Isolation>,
}

/// A capability to grant: what, served by which provider, configured how.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// The capability.
    pub capability: Capability,
    /// The provider by name. Default: the capability's usual provider (`kv`, `http-server`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderName>,
    /// The provider's configuration for this target.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

/// `assignment.grant`: grant a capability to an instance or to every instance of a component.
/// A target holds at most one assignment per capability: revoke the old one first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignmentGrantRequest {
    /// Who is granted it.
    pub target: AssignmentTarget,
    /// The capability.
    pub capability: Capability,
    /// The provider by name. Default: the capability's usual provider (`kv`, `http-server`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderName>,
    /// The provider's configuration for this target.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
}

impl AssignmentGrantRequest {
    /// The grant part of the request.
    pub fn grant(&self) -> Grant {
        Grant {
            capability: self.capability,
            provider: self.provider.clone(),
            config: self.config.clone(),
        }
    }
}

/// Reply to `assignment.grant`, sent once the grant is a fact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignmentGrantReply {
    /// The assignment as granted.
    pub assignment: Assignment,
    /// Stream sequence of its `assignment.granted` fact.
    pub seq: u64,
}

/// `assignment.revoke`: withdraw a grant. Calls under it are refused from then on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignmentRevokeRequest {
    /// The assignment.
    pub assignment_id: AssignmentId,
}

/// Reply to `assignment.revoke`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignmentRevokeReply {
    /// The assignment that was revoked.
    pub assignment: Assignment,
    /// Stream sequence of its `assignment.revoked` fact.
    pub seq: u64,
}

/// `assignment.list`: assignments in force, optionally only those that apply to one instance
/// (its own and its component's) or that target one component.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignmentListRequest {
    /// Only assignments that apply to this instance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<InstanceId>,
    /// Only assignments that target this component.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<ComponentName>,
    /// Wait until the controller has applied this stream sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_seq: Option<u64>,
}

/// Reply to `assignment.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignmentListReply {
    /// The assignments, by id.
    pub assignments: Vec<AssignmentRecord>,
    /// Stream sequence the answer reflects.
    pub as_of: u64,
}

/// `link.add`: serve `interface`, as `source` imports it, with component `target`. A source
/// holds at most one link per interface: remove the old one first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkAddRequest {
    /// Who calls: every instance of a component, or one instance.
    pub source: AssignmentTarget,
    /// The interface the source imports (`namespace:package/interface`).
    pub interface: crate::link::Interface,
    /// The component that serves it; it must be registered and export the interface.
    pub target: ComponentName,
    /// Only versions of the target matching this semver requirement (`^1.2`) serve it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// Reply to `link.add`, sent once the link is a fact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkAddReply {
    /// The link as added.
    pub link: crate::link::Link,
    /// Stream sequence of its `link.added` fact.
    pub seq: u64,
}

/// `link.remove`: withdraw a link. Calls through it fail with access denied from then on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkRemoveRequest {
    /// The link.
    pub link_id: crate::names::LinkId,
}

/// Reply to `link.remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkRemoveReply {
    /// The link that was removed.
    pub link: crate::link::Link,
    /// Stream sequence of its `link.removed` fact.
    pub seq: u64,
}

/// `link.list`: links in force, optionally only those whose source or target is a component.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkListRequest {
    /// Only links from or to this component.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<ComponentName>,
    /// Wait until the controller has applied this stream sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_seq: Option<u64>,
}

/// Reply to `link.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkListReply {
    /// The links, by id.
    pub links: Vec<crate::link::LinkRecord>,
    /// Stream sequence the answer reflects.
    pub as_of: u64,
}

/// `provider.start`: have a host spawn and supervise a provider process (restarted with backoff
/// when it dies). The reply acknowledges; `provider.started` or `provider.start_failed` follows,
/// with `operation_id` as `causationid`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderStartRequest {
    /// The provider (`kv`, `http-server`, `http-client`, `messaging`): the host runs
    /// `trellis-provider-<name>`.
    pub name: ProviderName,
    /// The host that runs it. Default: the live host with the fewest providers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<HostId>,
    /// Provider settings, passed as `--config key=value`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub config: BTreeMap<String, String>,
    /// Run the provider inside the host's process rather than as a child process. The host's
    /// own instances then call it without the NATS round trip to another process (other hosts
    /// still reach it over NATS, and it still checks every call against its own assignments);
    /// the price is isolation: it lives and dies with the host. Hosts embed `kv`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub embedded: bool,
}

/// Reply to `provider.start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderStartReply {
    /// Facts caused by this request carry this as `causationid`.
    pub operation_id: String,
    /// The new provider process.
    pub provider_id: ProviderId,
    /// The host that runs it.
    pub host_id: HostId,
}

/// `provider.stop`: ask a provider process to drain and exit (its host does not restart it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderStopRequest {
    /// The process.
    pub provider_id: ProviderId,
}

/// Reply to `provider.stop`: the provider acknowledged; `provider.stopped` follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderStopReply {
    /// The process.
    pub provider_id: ProviderId,
}

/// `provider.list`: provider processes the facts know.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderListRequest {
    /// Only providers of this name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<ProviderName>,
    /// Only providers with this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<ProviderStatus>,
    /// Wait until the controller has applied this stream sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_seq: Option<u64>,
}

/// Reply to `provider.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderListReply {
    /// The providers, by id.
    pub providers: Vec<ProviderRecord>,
    /// Stream sequence the answer reflects.
    pub as_of: u64,
}

fn one() -> u32 {
    1
}

/// One instance placed by `instance.start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// The instance.
    pub instance_id: InstanceId,
    /// The host it was sent to.
    pub host_id: HostId,
}

/// Reply to `instance.start`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceStartReply {
    /// Facts caused by this request carry this as `causationid`.
    pub operation_id: String,
    /// Where each instance goes.
    pub instances: Vec<Placement>,
}

/// `instance.stop`: stop one instance. The reply acknowledges; `instance.stopped` follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceStopRequest {
    /// The instance.
    pub instance_id: InstanceId,
}

/// Reply to `instance.stop`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceStopReply {
    /// Facts caused by this request carry this as `causationid`.
    pub operation_id: String,
    /// The instance and its host.
    pub instance: Placement,
}

/// `instance.list`: instances, optionally filtered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceListRequest {
    /// Only instances of this component.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<String>,
    /// Only instances on this host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<HostId>,
    /// Only instances with this status.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<InstanceStatus>,
    /// Page: only instances whose id sorts after this one (the previous reply's `next_after`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<InstanceId>,
    /// Page size, 1 to [`MAX_PAGE`]. Default [`DEFAULT_PAGE`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Wait until the controller has applied this stream sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_seq: Option<u64>,
}

/// Reply to `instance.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceListReply {
    /// The stream sequence this answer reflects.
    pub as_of: u64,
    /// The instances, by id.
    pub instances: Vec<InstanceRecord>,
    /// When there are more: pass this as `after` to get the next page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_after: Option<InstanceId>,
}

/// Checks a requested page size.
pub fn page_size(limit: Option<u32>) -> Result<usize, ErrorBody> {
    match limit {
        None => Ok(DEFAULT_PAGE as usize),
        Some(n) if (1..=MAX_PAGE).contains(&n) => Ok(n as usize),
        Some(n) => Err(ErrorBody::new(
            ErrorCode::InvalidRequest,
            format!("limit {n} is out of range; accepted 1..={MAX_PAGE}"),
        )),
    }
}

/// `instance.get`: one instance with its fact history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceGetRequest {
    /// The instance.
    pub instance_id: InstanceId,
    /// Wait until the controller has applied this stream sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_seq: Option<u64>,
}

/// `instance.logs`: the recent log lines of an instance or of a component's instances, as
/// their hosts keep them (hosts keep the last lines of each instance they run; nothing is
/// persisted). New lines are published on
/// [`instance_logs`](crate::logs::instance_logs) as they are written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceLogsRequest {
    /// An instance id, or a component name (every instance of it the lattice knows).
    pub target: String,
    /// Only lines received at or after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// At most this many lines, the most recent ones (default 200, at most
    /// [`MAX_LOG_LIMIT`](crate::logs::MAX_LOG_LIMIT)).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u32>,
    /// Wait until the controller has applied this stream sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_seq: Option<u64>,
}

/// The answer to [`InstanceLogsRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceLogsGathered {
    /// The component whose lines these are.
    pub component: String,
    /// The instances asked (those of the target that run or ran on a host now up).
    pub instances: Vec<InstanceId>,
    /// The lines, oldest first (by time, then instance and line number).
    pub records: Vec<crate::logs::LogRecord>,
    /// Whether older lines that matched were left out (by the limit or the reply's size).
    pub truncated: bool,
    /// Hosts that did not answer: their instances' lines are missing.
    pub unreachable: Vec<HostId>,
}

/// One fact of an instance's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HistoryEntry {
    /// Stream sequence.
    pub seq: u64,
    /// When.
    pub time: DateTime<Utc>,
    /// `<noun>.<verb>`.
    #[serde(rename = "type")]
    pub kind: String,
    /// A one-line summary.
    pub summary: String,
    /// The operation that caused it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<String>,
}

/// Reply to `instance.get`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceGetReply {
    /// The stream sequence this answer reflects.
    pub as_of: u64,
    /// The instance.
    pub instance: InstanceRecord,
    /// Its facts still kept by the stream, oldest first.
    pub history: Vec<HistoryEntry>,
}

/// `rollout.start`: replace the running instances of a component with instances of another
/// version. The reply acknowledges; `rollout.*` facts carrying `rollout_id` as `causationid`
/// report every step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutStartRequest {
    /// The component (its name).
    pub component: ComponentName,
    /// The version to roll out: a version of the component in the artifact store, or
    /// `sha256:<hex>`.
    pub to: String,
    /// How; default `rolling`.
    #[serde(default = "rolling")]
    pub strategy: Strategy,
    /// Rolling: new instances above the old count at any time (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_surge: Option<u32>,
    /// Rolling: instances missing below the old count at any time (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_unavailable: Option<u32>,
    /// Canary: traffic weights in percent, increasing, ending at 100 (default `[10, 50, 100]`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<u8>,
    /// Canary: hold each step this long (milliseconds); none: until `rollout.promote`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
    /// Blue-green: switch by itself this long (milliseconds) after the new set serves; none:
    /// on `rollout.promote`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_promote_after_ms: Option<u64>,
    /// Blue-green: keep the old set this long (milliseconds) after the switch (default 300000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_previous_ms: Option<u64>,
    /// Conditions the new version must keep while it takes traffic (canary and blue-green),
    /// e.g. `error_rate<1%,p99<200ms,crashes=0`; a breach rolls back at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<String>,
}

fn rolling() -> Strategy {
    Strategy::Rolling
}

impl RolloutStartRequest {
    /// The plan this request asks for (not yet validated).
    pub fn plan(&self) -> RolloutPlan {
        let mut plan = RolloutPlan::new(self.strategy);
        if let Some(n) = self.max_surge {
            plan.max_surge = n;
        }
        if let Some(n) = self.max_unavailable {
            plan.max_unavailable = n;
        }
        if !self.steps.is_empty() {
            plan.steps = self.steps.clone();
        }
        plan.pause_ms = self.pause_ms;
        plan.auto_promote_after_ms = self.auto_promote_after_ms;
        if let Some(ms) = self.keep_previous_ms {
            plan.keep_previous_ms = ms;
        }
        plan.analysis.clone_from(&self.analysis);
        plan
    }
}

/// Reply to `rollout.start` and `rollout.undo`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutStartReply {
    /// The rollout; its facts carry it as `causationid` too.
    pub rollout_id: RolloutId,
    /// The versions it replaces.
    pub from: Vec<Revision>,
    /// The version it rolls out.
    pub to: Revision,
    /// The plan.
    pub plan: RolloutPlan,
}

/// `rollout.get`: one rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutGetRequest {
    /// The rollout.
    pub rollout_id: RolloutId,
    /// Wait until the controller has applied this stream sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_seq: Option<u64>,
}

/// Reply to `rollout.get`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutGetReply {
    /// The stream sequence this answer reflects.
    pub as_of: u64,
    /// The rollout.
    pub rollout: RolloutRecord,
}

/// `rollout.list`: rollouts, newest first.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutListRequest {
    /// Only rollouts of this component.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub component: Option<ComponentName>,
    /// Wait until the controller has applied this stream sequence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_seq: Option<u64>,
}

/// Reply to `rollout.list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutListReply {
    /// The stream sequence this answer reflects.
    pub as_of: u64,
    /// The rollouts, newest first.
    pub rollouts: Vec<RolloutRecord>,
}

/// `rollout.promote`: release the step a rollout holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutPromoteRequest {
    /// The rollout.
    pub rollout_id: RolloutId,
}

/// `rollout.abort`: stop a rollout; its new instances drain and the old version serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutAbortRequest {
    /// The rollout.
    pub rollout_id: RolloutId,
}

/// Reply to `rollout.promote` and `rollout.abort`: accepted; the facts follow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutActionReply {
    /// The rollout.
    pub rollout_id: RolloutId,
    /// Its status when the request was taken.
    pub status: RolloutStatus,
}

/// `rollout.undo`: go back to the component's previous version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutUndoRequest {
    /// The component.
    pub component: ComponentName,
}

/// Stable error codes of control replies. Clients branch on these, never on messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The body is not valid JSON.
    InvalidJson,
    /// The body is JSON but not a valid request: wrong types, missing or unknown fields, bad values.
    InvalidRequest,
    /// The body is larger than [`MAX_REQUEST_BYTES`].
    PayloadTooLarge,
    /// The subject names no known operation.
    UnknownVerb,
    /// A referenced entity does not exist.
    NotFound,
    /// No host satisfies the request; the details say why for each host.
    NoHostAvailable,
    /// A component's manifest is missing a limit or has one out of range.
    LimitsRequired,
    /// The stored artifact does not match the digest given.
    DigestMismatch,
    /// The controller has not reached the requested `min_seq` in time; retry.
    NotReady,
    /// The controller could not reach JetStream.
    Unavailable,
    /// The request contradicts the current state (a second assignment for the same target and
    /// capability); the message says what to do first.
    Conflict,
    /// The operation does not apply to the entity in its current state (promoting a rollout
    /// that has finished).
    InvalidState,
    /// A bug; the message says more.
    Internal,
}

impl ErrorCode {
    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidJson => "invalid_json",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UnknownVerb => "unknown_verb",
            ErrorCode::NotFound => "not_found",
            ErrorCode::NoHostAvailable => "no_host_available",
            ErrorCode::LimitsRequired => "limits_required",
            ErrorCode::DigestMismatch => "digest_mismatch",
            ErrorCode::NotReady => "not_ready",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Conflict => "conflict",
            ErrorCode::InvalidState => "invalid_state",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error half of the reply envelope.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, thiserror::Error)]
#[serde(deny_unknown_fields)]
#[error("{code}: {message}")]
pub struct ErrorBody {
    /// Stable code.
    pub code: ErrorCode,
    /// What went wrong and what to do about it.
    pub message: String,
    /// Machine-readable context (the field, the accepted values, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub details: Option<serde_json::Value>,
}

impl ErrorBody {
    /// An error without details.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: None,
        }
    }

    /// Adds details.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }
}

/// The reply envelope: `{"ok":true,"data":…}` or `{"ok":false,"error":…}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Reply<T> {
    /// Whether the request succeeded.
    pub ok: bool,
    /// The result, when `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<T>,
    /// The error, when not `ok`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl<T> Reply<T> {
    /// A success.
    pub fn ok(data: T) -> Self {
        Self {
            ok: true,
            data: Some(data),
            error: None,
        }
    }

    /// A failure.
    pub fn err(error: ErrorBody) -> Self {
        Self {
            ok: false,
            data: None,
            error: Some(error),
        }
    }

    /// The result as a `Result`.
    pub fn into_result(self) -> Result<T, ErrorBody> {
        match (self.ok, self.data, self.error) {
            (true, Some(data), _) => Ok(data),
            (false, _, Some(error)) => Err(error),
            (true, None, _) => Err(ErrorBody::new(
                ErrorCode::Internal,
                "reply says ok but carries no data",
            )),
            (false, _, None) => Err(ErrorBody::new(
                ErrorCode::Internal,
                "reply says not ok but carries no error",
            )),
        }
    }
}

/// Decodes a control request body, mapping failures to the precise error code.
///
/// An empty body is read as `{}`. Syntax errors are `invalid_json`; well-formed JSON of the
/// wrong shape is `invalid_request`, with the path and reason in the message.
pub fn decode_request<R: DeserializeOwned>(body: &[u8]) -> Result<R, ErrorBody> {
    if body.len() > MAX_REQUEST_BYTES {
        return Err(ErrorBody::new(
            ErrorCode::PayloadTooLarge,
            format!(
                "request body is {} bytes; the limit is {MAX_REQUEST_BYTES}",
                body.len()
            ),
        )
        .with_details(serde_json::json!({"size": body.len(), "limit": MAX_REQUEST_BYTES})));
    }
    let body: &[u8] = if body.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        body
    };
    // serde accepts a JSON array for a struct (fields by position); requests are objects only.
    if body.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(
            match serde_json::from_slice::<serde::de::IgnoredAny>(body) {
                Ok(_) => ErrorBody::new(
                    ErrorCode::InvalidRequest,
                    "request body must be a JSON object, such as {}",
                ),
                Err(e) => ErrorBody::new(
                    ErrorCode::InvalidJson,
                    format!("request body is not valid JSON: {e}"),
                )
                .with_details(serde_json::json!({"line": e.line(), "column": e.column()})),
            },
        );
    }
    serde_json::from_slice(body).map_err(|e| {
        use serde_json::error::Category;
        let code = match e.classify() {
            Category::Syntax | Category::Eof | Category::Io => ErrorCode::InvalidJson,
            Category::Data => ErrorCode::InvalidRequest,
        };
        let what = if code == ErrorCode::InvalidJson {
            "request body is not valid JSON"
        } else {
            "request does not match its schema"
        };
        ErrorBody::new(code, format!("{what}: {e}")).with_details(serde_json::json!({
            "line": e.line(),
            "column": e.column(),
        }))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_serialize_as_their_names() {
        for code in [
            ErrorCode::InvalidJson,
            ErrorCode::InvalidRequest,
            ErrorCode::PayloadTooLarge,
            ErrorCode::UnknownVerb,
            ErrorCode::NotFound,
            ErrorCode::NoHostAvailable,
            ErrorCode::LimitsRequired,
            ErrorCode::DigestMismatch,
            ErrorCode::NotReady,
            ErrorCode::Unavailable,
            ErrorCode::Internal,
        ] {
            assert_eq!(
                serde_json::to_value(code).expect("serializes"),
                serde_json::Value::String(code.as_str().to_owned())
            );
        }
    }

    #[test]
    fn decode_request_classifies_failures() {
        let ok: HostGetRequest = decode_request(br#"{"host_id":"h1"}"#).expect("valid");
        assert_eq!(ok.host_id.as_str(), "h1");
        let empty: StatusRequest = decode_request(b"").expect("empty is {}");
        assert_eq!(empty, StatusRequest::default());
        let code = |body: &[u8]| {
            decode_request::<HostGetRequest>(body)
                .expect_err("bad")
                .code
        };
        assert_eq!(code(b"{"), ErrorCode::InvalidJson);
        assert_eq!(code(b"not json"), ErrorCode::InvalidJson);
        assert_eq!(code(br#"{"host_id":5}"#), ErrorCode::InvalidRequest);
        assert_eq!(
            code(br#"{"host_id":"h1","x":1}"#),
            ErrorCode::InvalidRequest
        );
        assert_eq!(code(br#"{"host_id":"a.b"}"#), ErrorCode::InvalidRequest);
        assert_eq!(code(br#"{}"#), ErrorCode::InvalidRequest);
        assert_eq!(code(br#"[]"#), ErrorCode::InvalidRequest);
        assert_eq!(code(br#"["h1"]"#), ErrorCode::InvalidRequest);
        assert_eq!(code(br#"[1,"#), ErrorCode::InvalidJson);
        assert_eq!(code(b"42"), ErrorCode::InvalidRequest);
        let big = vec![b' '; MAX_REQUEST_BYTES + 1];
        assert_eq!(code(&big), ErrorCode::PayloadTooLarge);
    }

    #[test]
    fn reply_envelope_shapes() {
        let ok = serde_json::to_value(Reply::ok(StatusRequest::default())).expect("json");
        assert_eq!(ok, serde_json::json!({"ok": true, "data": {}}));
        let err = serde_json::to_value(Reply::<()>::err(ErrorBody::new(ErrorCode::NotFound, "x")))
            .expect("json");
        assert_eq!(
            err,
            serde_json::json!({"ok": false, "error": {"code": "not_found", "message": "x"}})
        );
    }
}
