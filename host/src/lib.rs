//! The Trellis host: the Node Agent that joins a lattice and runs instances on one machine.
//!
//! [`agent`] connects to NATS, announces the host with a `host.started` fact, sends heartbeats
//! carrying its full inventory, re-announces itself when a controller declares it lost, and on
//! shutdown drains and publishes `host.stopped`.
#![deny(missing_docs)]

pub mod agent;

pub use agent::{HostConfig, HostError, run};
