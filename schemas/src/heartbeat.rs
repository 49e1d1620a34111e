//! Host heartbeats: liveness plus the host's full inventory.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::fact::Capacity;
use crate::names::HostId;

/// One instance as its host reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InventoryInstance {
    /// The instance id.
    pub instance_id: String,
    /// The component reference it runs.
    pub component: String,
    /// Its state on the host.
    pub state: String,
    /// Invocations answered, over all its serving periods (what dashboards derive rates from).
    #[serde(default)]
    pub calls: u64,
    /// Of those, the ones that failed on the server's side (crashes included).
    #[serde(default)]
    pub errors: u64,
    /// Crashes.
    #[serde(default)]
    pub crashes: u64,
    /// Restarts by its restart policy.
    #[serde(default)]
    pub restarts: u64,
    /// Invocations running when the heartbeat was sent.
    #[serde(default)]
    pub in_flight: u64,
}

/// A heartbeat, published by every host every interval on `trellis.hb.v1.<lattice>.<host_id>`.
/// The heartbeat stream keeps the latest one per host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    /// The host.
    pub host_id: HostId,
    /// Counts up from 1 for each heartbeat of one host process.
    pub seq: u64,
    /// When the host sent it (the host's clock).
    pub sent_at: DateTime<Utc>,
    /// How long the host process has run, in milliseconds.
    pub uptime_ms: u64,
    /// The interval the host sends heartbeats at, in milliseconds.
    pub interval_ms: u64,
    /// The `trellis-host` version.
    pub version: String,
    /// Placement labels.
    pub labels: BTreeMap<String, String>,
    /// What the host offers.
    pub capacity: Capacity,
    /// Every instance the host runs.
    pub instances: Vec<InventoryInstance>,
}
