//! The fact catalogue and its CloudEvent 1.0 envelope.
//!
//! A fact records something that happened in the lattice. On the wire it is a CloudEvent in
//! structured JSON mode:
//!
//! ```json
//! {"specversion":"1.0","id":"01J…","source":"/trellis/default/host/h1",
//!  "type":"dev.trellis.host.started.v1","subject":"h1","time":"2026-11-22T08:00:00Z",
//!  "datacontenttype":"application/json","data":{…},"causationid":"01J…"}
//! ```
//!
//! [`FactData`] is the typed payload; its variant decides `type` and the NATS subject. [`Event`] is
//! the envelope with a typed payload, and [`Fact`] is an event together with its position in the
//! lattice's stream, which is what the fold consumes.

use std::borrow::Cow;
use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use ulid::Ulid;

use crate::capability::{Assignment, Capability};
use crate::instance::{ManifestDoc, RestartPolicy};
pub use crate::link::{Link, LinkRemoved};
use crate::names::{
    AssignmentId, ComponentName, HostId, InstanceId, Lattice, ProviderId, ProviderName,
};
pub use crate::rollout::{
    RolloutAborted, RolloutAdopted, RolloutCompleted, RolloutPaused, RolloutPromoted,
    RolloutRolledBack, RolloutStarted, RolloutStepReached,
};

/// The fact catalogue, one line per fact in catalogue order: its doc, its [`FactKind`] and
/// [`FactData`] variant with the payload type, its `<noun>.<verb>`, and where the payload keeps
/// the entity id (`id: field` for a name field, `id: method()` for a method returning `&str`).
///
/// Every table that lists each fact is generated from this list by `fact_catalogue!`, as
/// wasmtime generates its builtin tables with `for_each_builtin_function!`: the kinds, their
/// names and CloudEvent types, the payload enum, entity ids, payload (de)serialisation and the
/// payload JSON Schemas. Adding a fact is one line here plus its payload type; the compiler then
/// asks for what only a person can write (its summary, its effect on the projection).
///
/// Nouns and verbs are Rust identifiers, spelled on the wire as written; a keyword (`r#move`)
/// would keep its `r#`, so pick another word.
macro_rules! for_each_fact {
    ($mac:ident) => {
        $mac! {
            /// A host joined the lattice.
            HostStarted(HostStarted) = host.started, id: host_id;
            /// A host left the lattice after draining.
            HostStopped(HostStopped) = host.stopped, id: host_id;
            /// A host's heartbeats stopped and a controller declared it lost.
            HostLost(HostLost) = host.lost, id: host_id;
            /// A component was stored in the artifact store.
            ArtifactStored(ArtifactStored) = artifact.stored, id: hex();
            /// An instance started serving, first or after a restart.
            InstanceStarted(InstanceStarted) = instance.started, id: instance_id;
            /// An instance could not start.
            InstanceStartFailed(InstanceStartFailed) = instance.start_failed, id: instance_id;
            /// An instance was stopped on request or by a draining host.
            InstanceStopped(InstanceStopped) = instance.stopped, id: instance_id;
            /// An invocation crashed the instance.
            InstanceCrashed(InstanceCrashed) = instance.crashed, id: instance_id;
            /// The host will restart a crashed instance after a delay.
            InstanceRestarting(InstanceRestarting) = instance.restarting, id: instance_id;
            /// The restart policy's attempts are exhausted.
            InstanceGaveUp(InstanceGaveUp) = instance.gave_up, id: instance_id;
            /// A lost instance was replaced on another host.
            InstanceRelocated(InstanceRelocated) = instance.relocated, id: instance_id;
            /// A capability was granted.
            AssignmentGranted(Assignment) = assignment.granted, id: assignment_id;
            /// A capability grant was withdrawn.
            AssignmentRevoked(AssignmentRevoked) = assignment.revoked, id: assignment_id;
            /// A component's import is served by another component from now on.
            LinkAdded(Link) = link.added, id: link_id;
            /// A link was withdrawn.
            LinkRemoved(LinkRemoved) = link.removed, id: link_id;
            /// A provider process serves its capabilities.
            ProviderStarted(ProviderStarted) = provider.started, id: provider_id;
            /// A host could not start a provider.
            ProviderStartFailed(ProviderStartFailed) = provider.start_failed, id: provider_id;
            /// A provider drained and exited.
            ProviderStopped(ProviderStopped) = provider.stopped, id: provider_id;
            /// A provider process died.
            ProviderCrashed(ProviderCrashed) = provider.crashed, id: provider_id;
            /// A rollout began, with its plan.
            RolloutStarted(RolloutStarted) = rollout.started, id: rollout_id;
            /// A rollout finished a step.
            RolloutStepReached(RolloutStepReached) = rollout.step_reached, id: rollout_id;
            /// A rollout holds its step until promoted.
            RolloutPaused(RolloutPaused) = rollout.paused, id: rollout_id;
            /// A held step was released.
            RolloutPromoted(RolloutPromoted) = rollout.promoted, id: rollout_id;
            /// A rollout finished: the new version serves everything.
            RolloutCompleted(RolloutCompleted) = rollout.completed, id: rollout_id;
            /// A rollout stopped; the old version serves.
            RolloutAborted(RolloutAborted) = rollout.aborted, id: rollout_id;
            /// A rollout went back to the old version.
            RolloutRolledBack(RolloutRolledBack) = rollout.rolled_back, id: rollout_id;
            /// A controller replica took over a rollout whose driver was gone.
            RolloutAdopted(RolloutAdopted) = rollout.adopted, id: rollout_id;
        }
    };
}

/// The CloudEvent `type` of a fact: `dev.trellis.<noun>.<verb>.v1`, as a literal (usable in
/// patterns and docs).
macro_rules! fact_type {
    ($noun:ident . $verb:ident) => {
        concat!(
            "dev.trellis.",
            stringify!($noun),
            ".",
            stringify!($verb),
            ".v1"
        )
    };
}

/// The entity id of payload `$d`: a name field, or a method that returns it.
macro_rules! fact_entity {
    ($d:ident, $field:ident) => {
        $d.$field.as_str()
    };
    ($d:ident, $method:ident()) => {
        $d.$method()
    };
}

/// Generates [`FactKind`], [`FactData`] and their per-fact tables from `for_each_fact!`'s list.
macro_rules! fact_catalogue {
    ($(
        $(#[$doc:meta])*
        $kind:ident($payload:ty) = $noun:ident . $verb:ident, id: $id:ident $(($($args:tt)*))?;
    )*) => {
        /// The kinds of fact, one per CloudEvent `type`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum FactKind {
            $(
                $(#[$doc])*
                #[doc = concat!("(`", fact_type!($noun.$verb), "`)")]
                $kind,
            )*
        }

        impl FactKind {
            /// Every kind, in catalogue order.
            pub const ALL: &'static [FactKind] = &[$(FactKind::$kind),*];

            /// The entity noun (`host`, `instance`, …): the first part of the type and subject.
            pub fn noun(self) -> &'static str {
                match self {
                    $(FactKind::$kind => stringify!($noun),)*
                }
            }

            /// The verb (`started`, `lost`, …).
            pub fn verb(self) -> &'static str {
                match self {
                    $(FactKind::$kind => stringify!($verb),)*
                }
            }

            /// The CloudEvent `type`: `dev.trellis.<noun>.<verb>.v1`.
            pub fn type_name(self) -> &'static str {
                match self {
                    $(FactKind::$kind => fact_type!($noun.$verb),)*
                }
            }

            /// Looks a kind up by its CloudEvent type.
            pub fn from_type_name(ty: &str) -> Option<Self> {
                match ty {
                    $(fact_type!($noun.$verb) => Some(FactKind::$kind),)*
                    _ => None,
                }
            }

            /// The JSON Schema of this kind's payload.
            pub(crate) fn payload_schema(self) -> serde_json::Value {
                match self {
                    $(FactKind::$kind => crate::json_schema::schema_of::<$payload>(),)*
                }
            }
        }

        /// The typed payload of a fact. The variant decides the CloudEvent `type`.
        #[derive(Debug, Clone, PartialEq, Eq)]
        #[non_exhaustive]
        pub enum FactData {
            $(
                #[doc = concat!(
                    "`", stringify!($noun), ".", stringify!($verb), "`: see [`",
                    stringify!($payload), "`]."
                )]
                $kind($payload),
            )*
        }

        impl FactData {
            /// The kind of this fact.
            pub fn kind(&self) -> FactKind {
                match self {
                    $(FactData::$kind(_) => FactKind::$kind,)*
                }
            }

            /// The id of the entity the fact is about: the CloudEvent `subject` and a subject
            /// token.
            pub fn entity_id(&self) -> &str {
                match self {
                    $(FactData::$kind(d) => fact_entity!(d, $id $(($($args)*))?),)*
                }
            }

            fn to_raw(&self) -> Result<Box<RawValue>, serde_json::Error> {
                match self {
                    $(FactData::$kind(d) => serde_json::value::to_raw_value(d),)*
                }
            }

            fn from_raw(kind: FactKind, raw: &RawValue) -> Result<Self, serde_json::Error> {
                let json = raw.get();
                Ok(match kind {
                    $(FactKind::$kind => FactData::$kind(serde_json::from_str(json)?),)*
                })
            }
        }
    };
}

for_each_fact!(fact_catalogue);

impl FactKind {
    /// The short name used by the CLI and in schema file names: `<noun>.<verb>`.
    pub fn short_name(self) -> String {
        format!("{}.{}", self.noun(), self.verb())
    }

    /// Looks a kind up by `<noun>.<verb>` or by its full CloudEvent type.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL
            .iter()
            .copied()
            .find(|k| k.type_name() == name || k.short_name() == name)
    }
}

/// What a host can offer to instances; the scheduler compares requests against it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(deny_unknown_fields)]
pub struct Capacity {
    /// The most instances the host runs at once.
    pub max_instances: u32,
    /// Memory the host offers to instances, in bytes.
    pub memory_bytes: u64,
    /// CPU cores available to the host.
    pub cpus: u32,
    /// Whether the host runs `microvm` instances, and with which acceleration; absent when it
    /// cannot (no QEMU, no guest image, or not configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub microvm: Option<crate::isolation::Acceleration>,
}

/// `host.started`: a host joined (or re-joined) the lattice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostStarted {
    /// The host.
    pub host_id: HostId,
    /// Labels used for placement (`zone=eu-1`, `gpu=true`).
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// What the host offers.
    pub capacity: Capacity,
    /// The `trellis-host` version.
    pub version: String,
    /// True when the host announces itself again after having been declared lost.
    #[serde(default)]
    pub rejoined: bool,
}

/// `host.stopped`: a host drained and left.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostStopped {
    /// The host.
    pub host_id: HostId,
    /// Why it stopped (`signal: SIGTERM`, `shutdown requested`).
    pub reason: String,
}

/// `host.lost`: no heartbeat arrived from the host within the liveness timeout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HostLost {
    /// The host.
    pub host_id: HostId,
    /// How long the controller waited without a heartbeat, in milliseconds.
    pub silent_for_ms: u64,
    /// The liveness timeout in force, in milliseconds.
    pub timeout_ms: u64,
    /// The controller replica that declared the loss.
    pub detected_by: String,
}

/// `artifact.stored`: a component's code and manifest are in the artifact store. The entity id
/// is the hex SHA-256 of the `.wasm`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ArtifactStored {
    /// `sha256:<hex>` of the `.wasm`.
    pub digest: String,
    /// Size of the `.wasm` in bytes.
    pub size: u64,
    /// The validated manifest.
    pub manifest: ManifestDoc,
    /// Its signature, when it was pushed signed (`trellis component push --sign`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<crate::instance::ComponentSignature>,
    /// The interfaces (`namespace:package/interface@version`) and functions the component
    /// exports, as the controller read them from the `.wasm`; absent when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exports: Option<Vec<String>>,
}

impl ArtifactStored {
    /// The hex part of the digest: the entity id.
    pub fn hex(&self) -> &str {
        self.digest.strip_prefix("sha256:").unwrap_or(&self.digest)
    }
}

/// `instance.started`: an instance serves calls, first or after restart `attempt`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceStarted {
    /// The instance.
    pub instance_id: InstanceId,
    /// The host running it.
    pub host_id: HostId,
    /// The component's name.
    pub component: ComponentName,
    /// The component's version.
    pub version: String,
    /// `sha256:<hex>` of the code it runs.
    pub digest: String,
    /// Its restart policy.
    pub restart: RestartPolicy,
    /// 0 for the first start, n for the n-th restart.
    pub attempt: u32,
    /// How it is isolated (absent: `process`).
    #[serde(
        default,
        skip_serializing_if = "crate::isolation::Isolation::is_process"
    )]
    pub isolation: crate::isolation::Isolation,
    /// For a `microvm` instance, how its VM is accelerated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acceleration: Option<crate::isolation::Acceleration>,
}

/// `instance.start_failed`: the instance never served.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceStartFailed {
    /// The instance.
    pub instance_id: InstanceId,
    /// The host that tried.
    pub host_id: HostId,
    /// The component reference it was asked to run.
    pub component: String,
    /// Why (`artifact not found`, `limits.fuel: required …`, `invalid component: …`).
    pub reason: String,
}

/// `instance.stopped`: the instance stopped serving on request or because its host drained.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceStopped {
    /// The instance.
    pub instance_id: InstanceId,
    /// Its host.
    pub host_id: HostId,
    /// Why (`requested`, `host draining`).
    pub reason: String,
}

/// `instance.crashed`: an invocation ended in a crash; the restart policy decides what follows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceCrashed {
    /// The instance.
    pub instance_id: InstanceId,
    /// Its host.
    pub host_id: HostId,
    /// Stable reason: `fuel_exhausted`, `timeout`, `memory_limit`, `stack_overflow`, `panic`,
    /// `trap: <code>`, `output_too_large`.
    pub reason: String,
    /// What the runtime said, with the guest's panic message when there is one.
    pub detail: String,
    /// The export whose invocation crashed.
    pub export: String,
    /// Whether the restart policy will restart it.
    pub will_restart: bool,
}

/// `instance.restarting`: the host will restart the instance after `delay_ms`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceRestarting {
    /// The instance.
    pub instance_id: InstanceId,
    /// Its host.
    pub host_id: HostId,
    /// Which restart this is (1-based).
    pub attempt: u32,
    /// The delay before it, milliseconds.
    pub delay_ms: u64,
}

/// `instance.gave_up`: the restart policy's attempts are exhausted; the instance has ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceGaveUp {
    /// The instance.
    pub instance_id: InstanceId,
    /// Its host.
    pub host_id: HostId,
    /// Restarts made.
    pub attempts: u32,
    /// The reason of the last crash.
    pub last_reason: String,
}

/// `instance.relocated`: the instance was lost with its host, and a controller started a
/// replacement (a new instance id) on a live host, because its restart policy asks for restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceRelocated {
    /// The lost instance.
    pub instance_id: InstanceId,
    /// Its component.
    pub component: ComponentName,
    /// The host that was lost.
    pub from_host: HostId,
    /// The replacement instance.
    pub replacement: InstanceId,
    /// The host asked to run the replacement.
    pub to_host: HostId,
}

/// `assignment.revoked`: a grant was withdrawn; calls under it are refused from now on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AssignmentRevoked {
    /// The assignment.
    pub assignment_id: AssignmentId,
    /// Why (`requested`).
    pub reason: String,
}

/// `provider.started`: a provider process serves its capabilities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderStarted {
    /// The process.
    pub provider_id: ProviderId,
    /// The provider's name (its queue group).
    pub name: ProviderName,
    /// The provider's version.
    pub version: String,
    /// The capabilities it serves.
    pub capabilities: Vec<Capability>,
    /// The host supervising it, if a host started it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<HostId>,
    /// The machine it runs on (its hostname).
    pub node: String,
    /// Whether it runs inside its host's process (`trellis provider start --embedded`) rather
    /// than as a process of its own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub embedded: bool,
}

/// `provider.start_failed`: a host could not start a provider.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderStartFailed {
    /// The process that was to be.
    pub provider_id: ProviderId,
    /// The provider's name.
    pub name: ProviderName,
    /// The host that tried.
    pub host_id: HostId,
    /// Why.
    pub reason: String,
}

/// `provider.stopped`: a provider drained and exited (on request, or its host drained).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderStopped {
    /// The process.
    pub provider_id: ProviderId,
    /// Why (`requested`, `signal: SIGTERM`).
    pub reason: String,
}

/// `provider.crashed`: a supervised provider process died; the host restarts it with backoff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProviderCrashed {
    /// The process.
    pub provider_id: ProviderId,
    /// The supervising host.
    pub host_id: HostId,
    /// How it ended (`exit status 1`, `signal 9`).
    pub reason: String,
    /// Whether the host restarts it.
    pub will_restart: bool,
    /// Restarts so far.
    pub restarts: u32,
}

/// A fact as a CloudEvent 1.0 with a typed payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Unique id (ULID); also the `Nats-Msg-Id`, so a retried publish is stored once.
    pub id: Ulid,
    /// Who observed the fact: `/trellis/<lattice>/<role>/<id>`.
    pub source: String,
    /// When it happened.
    pub time: DateTime<Utc>,
    /// The operation that caused this fact, if any (CloudEvent extension `causationid`).
    pub causation_id: Option<String>,
    /// W3C trace context (CloudEvent extension `traceparent`).
    pub traceparent: Option<String>,
    /// The payload.
    pub data: FactData,
}

/// Why a fact could not be decoded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The bytes are not a CloudEvent envelope.
    #[error("not a CloudEvent: {0}")]
    Envelope(#[source] serde_json::Error),
    /// The envelope is not CloudEvents 1.0.
    #[error("unsupported specversion {0:?} (expected \"1.0\")")]
    SpecVersion(String),
    /// The `type` is not in the catalogue (it may come from a newer Trellis).
    #[error("unknown fact type {0:?}")]
    UnknownType(String),
    /// The `id` is not a ULID.
    #[error("event id {0:?} is not a ULID")]
    Id(String),
    /// The payload does not match the type's schema.
    #[error("payload of {ty} does not match its schema: {source}")]
    Data {
        /// The CloudEvent type.
        ty: &'static str,
        /// What serde said.
        #[source]
        source: serde_json::Error,
    },
    /// The envelope `subject` disagrees with the payload's entity id.
    #[error("event subject {subject:?} does not match the payload's entity {entity:?}")]
    SubjectMismatch {
        /// The envelope subject.
        subject: String,
        /// The payload's entity id.
        entity: String,
    },
}

/// The wire form of the envelope. Borrowing keeps decoding cheap during replay.
#[derive(Serialize, Deserialize)]
struct WireEvent<'a> {
    #[serde(borrow)]
    specversion: Cow<'a, str>,
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    source: Cow<'a, str>,
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    #[serde(borrow)]
    subject: Cow<'a, str>,
    time: DateTime<Utc>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    datacontenttype: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: &'a RawValue,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    causationid: Option<Cow<'a, str>>,
    #[serde(borrow, default, skip_serializing_if = "Option::is_none")]
    traceparent: Option<Cow<'a, str>>,
}

impl Event {
    /// A new event observed now by `source`.
    pub fn new(source: impl Into<String>, data: FactData) -> Self {
        Self {
            id: Ulid::generate(),
            source: source.into(),
            time: Utc::now(),
            causation_id: None,
            traceparent: None,
            data,
        }
    }

    /// Sets the `causationid` extension.
    pub fn caused_by(mut self, operation: impl Into<String>) -> Self {
        self.causation_id = Some(operation.into());
        self
    }

    /// Sets the `traceparent` extension (W3C trace context of the request that caused it).
    pub fn traced(mut self, traceparent: Option<String>) -> Self {
        self.traceparent = traceparent;
        self
    }

    /// The kind of the fact.
    pub fn kind(&self) -> FactKind {
        self.data.kind()
    }

    /// The NATS subject this event is published on.
    pub fn nats_subject(&self, lattice: &Lattice) -> String {
        crate::subject::event(lattice, self.kind(), self.data.entity_id())
    }

    /// Encodes the event as structured-mode CloudEvent JSON.
    pub fn encode(&self) -> Result<Vec<u8>, serde_json::Error> {
        let data = self.data.to_raw()?;
        let id = self.id.to_string();
        let wire = WireEvent {
            specversion: Cow::Borrowed("1.0"),
            id: Cow::Owned(id),
            source: Cow::Borrowed(&self.source),
            ty: Cow::Borrowed(self.kind().type_name()),
            subject: Cow::Borrowed(self.data.entity_id()),
            time: self.time,
            datacontenttype: Some(Cow::Borrowed("application/json")),
            data: &data,
            causationid: self.causation_id.as_deref().map(Cow::Borrowed),
            traceparent: self.traceparent.as_deref().map(Cow::Borrowed),
        };
        serde_json::to_vec(&wire)
    }

    /// Decodes structured-mode CloudEvent JSON.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let wire: WireEvent<'_> = serde_json::from_slice(bytes).map_err(DecodeError::Envelope)?;
        if wire.specversion != "1.0" {
            return Err(DecodeError::SpecVersion(wire.specversion.into_owned()));
        }
        let kind = FactKind::from_type_name(&wire.ty)
            .ok_or_else(|| DecodeError::UnknownType(wire.ty.clone().into_owned()))?;
        let id: Ulid = wire
            .id
            .parse()
            .map_err(|_| DecodeError::Id(wire.id.clone().into_owned()))?;
        let data = FactData::from_raw(kind, wire.data).map_err(|source| DecodeError::Data {
            ty: kind.type_name(),
            source,
        })?;
        if data.entity_id() != wire.subject {
            return Err(DecodeError::SubjectMismatch {
                subject: wire.subject.into_owned(),
                entity: data.entity_id().to_owned(),
            });
        }
        Ok(Self {
            id,
            source: wire.source.into_owned(),
            time: wire.time,
            causation_id: wire.causationid.map(Cow::into_owned),
            traceparent: wire.traceparent.map(Cow::into_owned),
            data,
        })
    }

    /// A one-line summary for people: the payload's interesting fields.
    pub fn summary(&self) -> String {
        match &self.data {
            FactData::HostStarted(d) => {
                let labels: Vec<String> =
                    d.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!(
                    "version={} labels=[{}]{}",
                    d.version,
                    labels.join(","),
                    if d.rejoined { " rejoined" } else { "" }
                )
            }
            FactData::HostStopped(d) => format!("reason={}", d.reason),
            FactData::HostLost(d) => format!(
                "silent_for={}ms timeout={}ms by={}",
                d.silent_for_ms, d.timeout_ms, d.detected_by
            ),
            FactData::ArtifactStored(d) => format!(
                "{}@{} size={} digest={}",
                d.manifest.name, d.manifest.version, d.size, d.digest
            ),
            FactData::InstanceStarted(d) => format!(
                "{}@{} on {} attempt={} restart={}",
                d.component, d.version, d.host_id, d.attempt, d.restart
            ),
            FactData::InstanceStartFailed(d) => {
                format!("{} on {}: {}", d.component, d.host_id, d.reason)
            }
            FactData::InstanceStopped(d) => format!("on {} reason={}", d.host_id, d.reason),
            FactData::InstanceCrashed(d) => format!(
                "reason={} export={} restart={} ({})",
                d.reason, d.export, d.will_restart, d.detail
            ),
            FactData::InstanceRestarting(d) => {
                format!("attempt={} delay={}ms", d.attempt, d.delay_ms)
            }
            FactData::InstanceGaveUp(d) => {
                format!(
                    "after {} restarts, last reason={}",
                    d.attempts, d.last_reason
                )
            }
            FactData::InstanceRelocated(d) => format!(
                "{} from {} to {} as {}",
                d.component, d.from_host, d.to_host, d.replacement
            ),
            FactData::AssignmentGranted(d) => {
                let config: Vec<String> =
                    d.config.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!(
                    "{} to {} by {} [{}]",
                    d.capability,
                    d.target.describe(),
                    d.provider,
                    config.join(",")
                )
            }
            FactData::AssignmentRevoked(d) => format!("reason={}", d.reason),
            FactData::LinkAdded(d) => format!(
                "{} {} → {}{}",
                d.source.describe(),
                d.interface,
                d.target,
                d.version
                    .as_ref()
                    .map(|v| format!(" {v}"))
                    .unwrap_or_default()
            ),
            FactData::LinkRemoved(d) => format!("reason={}", d.reason),
            FactData::ProviderStarted(d) => format!(
                "{}@{} on {}{}",
                d.name,
                d.version,
                d.node,
                d.host_id
                    .as_ref()
                    .map(|h| format!(" (host {h})"))
                    .unwrap_or_default()
            ),
            FactData::ProviderStartFailed(d) => {
                format!("{} on {}: {}", d.name, d.host_id, d.reason)
            }
            FactData::ProviderStopped(d) => format!("reason={}", d.reason),
            FactData::ProviderCrashed(d) => format!(
                "on {}: {} restart={} restarts={}",
                d.host_id, d.reason, d.will_restart, d.restarts
            ),
            FactData::RolloutStarted(d) => format!(
                "{} to {} ({}){}",
                d.component,
                d.to,
                d.plan.strategy,
                weight(d.weight)
            ),
            FactData::RolloutStepReached(d) => format!(
                "step {} new={} old={}{} at {}ms",
                d.step,
                d.new_running,
                d.old_running,
                weight(d.weight),
                d.elapsed_ms
            ),
            FactData::RolloutPaused(d) => format!(
                "step {}{} until {}",
                d.step,
                weight(d.weight),
                d.until
                    .map_or_else(|| "promoted".to_owned(), |t| t.to_rfc3339())
            ),
            FactData::RolloutPromoted(d) => format!(
                "step {}{}{}",
                d.step,
                weight(d.weight),
                if d.auto { " (timer)" } else { "" }
            ),
            FactData::RolloutCompleted(d) => {
                format!("{} serves {} after {}ms", d.component, d.to, d.elapsed_ms)
            }
            FactData::RolloutAborted(d) => {
                format!("reason={} after {}ms", d.reason, d.elapsed_ms)
            }
            FactData::RolloutRolledBack(d) => format!(
                "condition={} measured={} after {}ms",
                d.condition, d.measured, d.elapsed_ms
            ),
            FactData::RolloutAdopted(d) => {
                format!("driven by {} from step {}", d.replica, d.step)
            }
        }
    }

    /// The `time` attribute formatted as RFC 3339 with millisecond precision.
    pub fn time_rfc3339(&self) -> String {
        self.time.to_rfc3339_opts(SecondsFormat::Millis, true)
    }
}

/// ` weight=N%` for a summary, or nothing.
fn weight(weight: Option<u8>) -> String {
    weight.map(|w| format!(" weight={w}%")).unwrap_or_default()
}

/// The `source` attribute of a process: `/trellis/<lattice>/<role>/<id>`.
pub fn source(lattice: &Lattice, role: &str, id: &str) -> String {
    format!("/trellis/{lattice}/{role}/{id}")
}

/// A fact as read from the lattice's stream: the event and its stream sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fact {
    /// The JetStream sequence of the message: its position in the lattice's history.
    pub seq: u64,
    /// The event.
    pub event: Event,
}

/// The CloudEvent envelope as documented in `schemas/json/cloudevent.schema.json`. Used only to
/// generate that schema; [`Event`] is the type that is sent and received.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[schemars(title = "Trellis fact (CloudEvent 1.0, structured JSON)")]
pub struct CloudEventEnvelope {
    /// Always `1.0`.
    #[schemars(regex(pattern = r"^1\.0$"))]
    pub specversion: String,
    /// A ULID, unique per event.
    #[schemars(regex(pattern = r"^[0-9A-HJKMNP-TV-Z]{26}$"))]
    pub id: String,
    /// `/trellis/<lattice>/<role>/<id>`.
    #[schemars(regex(pattern = r"^/trellis/"))]
    pub source: String,
    /// `dev.trellis.<noun>.<verb>.v1`; the payload schema is `fact.<noun>.<verb>.schema.json`.
    #[serde(rename = "type")]
    #[schemars(regex(pattern = r"^dev\.trellis\.[a-z_]+\.[a-z_]+\.v[0-9]+$"))]
    pub ty: String,
    /// The id of the entity the fact is about.
    pub subject: String,
    /// When it happened (RFC 3339).
    pub time: DateTime<Utc>,
    /// Always `application/json`.
    pub datacontenttype: Option<String>,
    /// The typed payload.
    pub data: serde_json::Value,
    /// The operation that caused the fact.
    pub causationid: Option<String>,
    /// W3C trace context.
    pub traceparent: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn started(host: &str) -> FactData {
        FactData::HostStarted(HostStarted {
            host_id: HostId::new(host).expect("valid"),
            labels: BTreeMap::from([("zone".to_owned(), "a".to_owned())]),
            capacity: Capacity {
                max_instances: 10,
                memory_bytes: 1 << 30,
                cpus: 2,
                microvm: None,
            },
            version: "0.1.0".to_owned(),
            rejoined: false,
        })
    }

    #[test]
    fn encode_decode_round_trip() {
        let ev = Event::new("/trellis/default/host/h1", started("h1")).caused_by("op1");
        let bytes = ev.encode().expect("encodes");
        let back = Event::decode(&bytes).expect("decodes");
        assert_eq!(back.id, ev.id);
        assert_eq!(back.data, ev.data);
        assert_eq!(back.causation_id.as_deref(), Some("op1"));
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(json["specversion"], "1.0");
        assert_eq!(json["type"], "dev.trellis.host.started.v1");
        assert_eq!(json["subject"], "h1");
        assert_eq!(json["datacontenttype"], "application/json");
    }

    #[test]
    fn decode_rejects_bad_envelopes() {
        assert!(matches!(Event::decode(b"{"), Err(DecodeError::Envelope(_))));
        let ev = Event::new("/trellis/default/host/h1", started("h1"));
        let mut json: serde_json::Value =
            serde_json::from_slice(&ev.encode().expect("encodes")).expect("json");
        json["type"] = "dev.trellis.nope.v1".into();
        let bytes = serde_json::to_vec(&json).expect("json");
        assert!(matches!(
            Event::decode(&bytes),
            Err(DecodeError::UnknownType(_))
        ));
        json["type"] = "dev.trellis.host.started.v1".into();
        json["subject"] = "h2".into();
        let bytes = serde_json::to_vec(&json).expect("json");
        assert!(matches!(
            Event::decode(&bytes),
            Err(DecodeError::SubjectMismatch { .. })
        ));
        json["subject"] = "h1".into();
        json["data"]["surprise"] = 1.into();
        let bytes = serde_json::to_vec(&json).expect("json");
        assert!(matches!(
            Event::decode(&bytes),
            Err(DecodeError::Data { .. })
        ));
    }

    #[test]
    fn every_kind_is_listed_once_in_catalogue_order() {
        // A new kind fails to compile here until it is given a position, and then fails below
        // until `ALL` lists it there.
        fn position(kind: FactKind) -> usize {
            match kind {
                FactKind::HostStarted => 0,
                FactKind::HostStopped => 1,
                FactKind::HostLost => 2,
                FactKind::ArtifactStored => 3,
                FactKind::InstanceStarted => 4,
                FactKind::InstanceStartFailed => 5,
                FactKind::InstanceStopped => 6,
                FactKind::InstanceCrashed => 7,
                FactKind::InstanceRestarting => 8,
                FactKind::InstanceGaveUp => 9,
                FactKind::InstanceRelocated => 10,
                FactKind::AssignmentGranted => 11,
                FactKind::AssignmentRevoked => 12,
                FactKind::LinkAdded => 13,
                FactKind::LinkRemoved => 14,
                FactKind::ProviderStarted => 15,
                FactKind::ProviderStartFailed => 16,
                FactKind::ProviderStopped => 17,
                FactKind::ProviderCrashed => 18,
                FactKind::RolloutStarted => 19,
                FactKind::RolloutStepReached => 20,
                FactKind::RolloutPaused => 21,
                FactKind::RolloutPromoted => 22,
                FactKind::RolloutCompleted => 23,
                FactKind::RolloutAborted => 24,
                FactKind::RolloutRolledBack => 25,
                FactKind::RolloutAdopted => 26,
            }
        }
        assert_eq!(FactKind::ALL.len(), 27);
        for (i, kind) in FactKind::ALL.iter().enumerate() {
            assert_eq!(position(*kind), i);
            assert_eq!(
                kind.type_name(),
                format!("dev.trellis.{}.{}.v1", kind.noun(), kind.verb())
            );
        }
    }

    #[test]
    fn kinds_parse_by_either_name() {
        for k in FactKind::ALL {
            assert_eq!(FactKind::parse(k.type_name()), Some(*k));
            assert_eq!(FactKind::parse(&k.short_name()), Some(*k));
        }
        assert_eq!(FactKind::parse("host.exploded"), None);
    }
}
