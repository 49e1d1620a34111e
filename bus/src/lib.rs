//! How Trellis processes use NATS.
//!
//! Hosts, the controller, providers and the CLI all talk to NATS through this crate, so that they
//! agree on connection behaviour, stream configuration and the way facts are published and read:
//!
//! - [`connect`]: a client that retries the first connection and reconnects forever;
//!   [`jetstream`]: a JetStream context in the process's domain (for hosts behind a leaf node).
//! - [`ensure_streams`]: creates or updates the lattice's fact and heartbeat streams
//!   idempotently; whichever process starts first does it.
//! - [`FactPublisher`]: publishes facts in order, each with `Nats-Msg-Id` = event id, retrying
//!   until JetStream acknowledges; facts queue (bounded) while NATS is away.
//! - [`publish_exclusive`]: publishes a fact only if the subject's last sequence is what the
//!   caller expects, so that of several replicas deciding the same thing only one fact is stored;
//!   [`publish_at_tip`] only if nothing at all was stored since the caller's read.
//! - [`FactStream`]: reads facts in stream order with an ordered consumer, from the start or live.
//! - [`put_artifact`], [`fetch_artifact`]: components in the content-addressed artifact store.
//! - [`dataplane`]: the data-plane codec every caller and server of calls, HTTP and capability
//!   requests uses; [`direct`]: capability replies a backend sends straight to the caller.
//! - [`shutdown_signal`], [`spawn_tied`]: stopping on `SIGTERM` or `SIGINT`, and child processes
//!   that get `SIGTERM` when their parent dies.
//! - [`registry`]: the optional etcd registry of nodes and providers (`--registry etcd://…`).
//!
//! # Disconnection
//!
//! The client reconnects by itself. While it is away, [`FactPublisher`] keeps its queue and retries
//! the head of it; once NATS is back the queue is flushed in order. A retried publish that had in
//! fact been stored is de-duplicated by JetStream through its message id.
#![deny(missing_docs)]

mod artifacts;
pub mod audit;
mod auth;
mod child;
mod connect;
pub mod dataplane;
pub mod direct;
pub mod metrics;
mod publisher;
mod reader;
pub mod registry;
mod routes;
mod signal;
pub mod signing;
mod streams;
pub mod telemetry;

pub use artifacts::{
    ArtifactError, artifact_store, digest_hex, digest_of, fetch_artifact, put_artifact,
    put_artifact_reporting, stat_artifact,
};
pub use auth::{
    ConnectArgs, ENV_APP_CREDS, ENV_CREDS, connect_args, connect_env, set_connect_args,
};
pub use child::spawn_tied;
pub use connect::{
    ConnectError, ENV_JS_DOMAIN, connect, connect_with, jetstream, jetstream_domain,
    parse_jetstream_domain, permission_violations, refused, set_jetstream_domain,
};
pub use publisher::{
    FactPublisher, PublishError, publish_at_tip, publish_exclusive, publish_exclusive_among,
};
pub use reader::{FactStream, Followed, RawFact, ReadError, StartAt, count_messages, follow};
pub use routes::RouteTable;
pub use signal::{init_logging, shutdown_signal};
pub use streams::{
    REPLICAS_ENV, Replicas, StreamError, StreamSettings, ensure_replicas, ensure_streams,
    events_stream_state, replicas,
};

pub use async_nats;

/// An error with its causes (`client error (Connect): tcp connect error: Connection refused`).
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}
