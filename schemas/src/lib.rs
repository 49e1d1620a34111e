//! The Trellis protocol.
//!
//! Everything that crosses NATS between Trellis processes is defined here, and nothing else
//! formats a subject string:
//!
//! - [`subject`]: the subjects and stream names, built from validated names ([`Lattice`],
//!   [`HostId`]).
//! - [`control`]: control requests, replies, the reply envelope and its stable error codes.
//! - [`fact`]: the fact catalogue ([`FactData`]) and its CloudEvent 1.0 envelope ([`Event`]).
//! - [`projection`]: the lattice's state as a pure, idempotent fold over facts ([`apply`]).
//! - [`heartbeat`]: host heartbeats with their inventory.
//! - [`manifest`]: `Component.toml`, whose limits are all required.
//! - [`dataplane`]: subjects, headers, reply status, error codes and crash reasons of calls to
//!   components and providers; host and provider command subjects.
//! - [`capability`]: capabilities, assignments and the typed capability calls of providers
//!   ([`capability::rpc`]), with their binary encoding.
//! - [`instance`]: restart policies, component sources, host commands.
//! - [`link`]: links, a component's import served by another component.
//! - [`logs`]: component log lines, their subjects and the host command that reads them.
//! - [`rollout`]: rollout plans, their records and the traffic routes they set.
//! - [`json_schema`]: JSON Schemas for all of the above, checked in under `schemas/json/`.
//!
//! ```
//! use trellis_schemas::{apply, Capacity, Event, Fact, FactData, HostId, HostStarted, Projection};
//!
//! let data = FactData::HostStarted(HostStarted {
//!     host_id: HostId::new("h1")?,
//!     labels: Default::default(),
//!     capacity: Capacity { max_instances: 8, memory_bytes: 1 << 30, cpus: 2, microvm: None },
//!     version: "0.1.0".into(),
//!     rejoined: false,
//! });
//! let bytes = Event::new("/trellis/default/host/h1", data).encode()?;
//! let event = Event::decode(&bytes)?;
//!
//! let mut projection = Projection::new();
//! assert!(apply(&mut projection, &Fact { seq: 1, event: event.clone() }));
//! assert!(!apply(&mut projection, &Fact { seq: 1, event }), "a re-delivery changes nothing");
//! assert_eq!(projection.hosts_up().count(), 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs)]

pub mod audit;
pub mod capability;
pub mod control;
pub mod dataplane;
pub mod fact;
pub mod heartbeat;
pub mod instance;
pub mod isolation;
pub mod json_schema;
pub mod link;
pub mod logs;
pub mod manifest;
mod names;
pub mod projection;
pub mod roles;
pub mod rollout;
pub mod subject;
mod wire;

pub use capability::{Assignment, AssignmentTarget, Capability};
pub use control::{CtlOp, CtlRequest, ErrorBody, ErrorCode, Reply};
pub use dataplane::{CrashReason, DataError};
pub use fact::{
    Capacity, DecodeError, Event, Fact, FactData, FactKind, HostLost, HostStarted, HostStopped,
};
pub use heartbeat::{Heartbeat, InventoryInstance};
pub use instance::{ComponentSource, ManifestDoc, RestartPolicy};
pub use manifest::{Manifest, ManifestError};
pub use names::{
    AssignmentId, ComponentName, HostId, InstanceId, InvalidName, Lattice, LinkId, ProviderId,
    ProviderName, RolloutId,
};
pub use projection::{
    ArtifactRecord, AssignmentRecord, HostRecord, HostStatus, InstanceRecord, InstanceStatus,
    Projection, ProviderRecord, ProviderStatus, apply,
};
pub use wire::WireError;

/// The version of this crate, reported by every process.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
