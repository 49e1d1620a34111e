use std::time::Duration;

use async_nats::jetstream::{self, stream};
use trellis_schemas::{Lattice, subject};

/// A stream could not be created, updated or inspected.
#[derive(Debug, thiserror::Error)]
#[error("JetStream stream {stream}: {message}")]
pub struct StreamError {
    /// The stream.
    pub stream: String,
    /// What went wrong.
    pub message: String,
}

/// How the lattice's streams are configured. The defaults suit production; tests shorten them.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Facts kept per subject (per entity and verb). Default 8: enough history for an operator,
    /// while replay still yields every entity's current state.
    pub facts_per_subject: i64,
    /// Stream replicas (JetStream R). Default 1; use 3 on a three-node NATS cluster.
    pub replicas: usize,
    /// JetStream de-duplication window for retried publishes. Default 2 minutes.
    pub duplicate_window: Duration,
    /// How long the last heartbeat of a host that went silent is kept. Default 1 day.
    pub heartbeat_max_age: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            facts_per_subject: 8,
            replicas: 1,
            duplicate_window: Duration::from_secs(120),
            heartbeat_max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// Creates the lattice's fact and heartbeat streams, or updates them to `settings`. Idempotent:
/// every process calls it on start, and whichever comes first creates them.
pub async fn ensure_streams(
    js: &jetstream::Context,
    lattice: &Lattice,
    settings: &StreamSettings,
) -> Result<(), StreamError> {
    let events = stream::Config {
        name: subject::events_stream(lattice),
        description: Some(format!("Trellis facts of lattice {lattice}")),
        subjects: vec![subject::events_all(lattice)],
        max_messages_per_subject: settings.facts_per_subject,
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        duplicate_window: settings.duplicate_window,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    };
    let heartbeats = stream::Config {
        name: subject::heartbeat_stream(lattice),
        description: Some(format!(
            "Last heartbeat of every Trellis host of lattice {lattice}"
        )),
        subjects: vec![subject::heartbeats_all(lattice)],
        max_messages_per_subject: 1,
        max_age: settings.heartbeat_max_age,
        // File storage, so the stream survives a NATS restart and live heartbeats keep flowing
        // into it without any process having to recreate it.
        storage: stream::StorageType::File,
        num_replicas: settings.replicas,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    };
    for config in [events, heartbeats] {
        let name = config.name.clone();
        // Two processes starting together may both find the stream missing; the loser of the
        // create race then updates, which is a no-op with the same configuration.
        let mut attempt = 0;
        loop {
            match js.create_or_update_stream(config.clone()).await {
                Ok(_) => break,
                Err(e) if attempt < 5 => {
                    attempt += 1;
                    tracing::debug!(stream = %name, error = %e, "stream setup failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(e) => {
                    return Err(StreamError {
                        stream: name,
                        message: e.to_string(),
                    });
                }
            }
        }
    }
    Ok(())
}

/// The fact stream's current state.
pub async fn events_stream_state(
    js: &jetstream::Context,
    lattice: &Lattice,
) -> Result<stream::State, StreamError> {
    let name = subject::events_stream(lattice);
    let mut stream = js.get_stream(&name).await.map_err(|e| StreamError {
        stream: name.clone(),
        message: e.to_string(),
    })?;
    let info = stream.info().await.map_err(|e| StreamError {
        stream: name.clone(),
        message: e.to_string(),
    })?;
    Ok(info.state.clone())
}
