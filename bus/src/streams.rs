use std::time::Duration;

use async_nats::jetstream::{self, stream};
use trellis_schemas::{Lattice, subject};

/// A stream could not be created, updated or inspected.
#[derive(Debug, Clone, thiserror::Error)]
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
    /// Stream replicas (JetStream R). `None` (the default) lets [`replicas`] decide: the
    /// environment's `TRELLIS_REPLICAS`, else 3 on a cluster of three or more servers and 1 on
    /// one server.
    pub replicas: Option<usize>,
    /// JetStream de-duplication window for retried publishes. Default 2 minutes.
    pub duplicate_window: Duration,
    /// How long the last heartbeat of a host that went silent is kept. Default 1 day.
    pub heartbeat_max_age: Duration,
}

impl Default for StreamSettings {
    fn default() -> Self {
        Self {
            facts_per_subject: 8,
            replicas: None,
            duplicate_window: Duration::from_secs(120),
            heartbeat_max_age: Duration::from_secs(24 * 3600),
        }
    }
}

/// The environment variable that sets the replica count of everything Trellis stores in
/// JetStream, for every process that has no `--replicas` of its own.
pub const REPLICAS_ENV: &str = "TRELLIS_REPLICAS";

/// How many replicas the streams, buckets and object stores Trellis keeps should have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replicas {
    /// The count, 1..=5 (the range JetStream accepts).
    pub count: usize,
    /// Whether an operator asked for it (`--replicas`, [`REPLICAS_ENV`]) rather than it being
    /// derived from the cluster's size. A derived count never lowers an existing stream's: a
    /// process that connected before the cluster's routes formed must not undo replication.
    pub explicit: bool,
}

impl Replicas {
    /// The count a stream that already has `existing` replicas is brought to.
    pub fn for_existing(self, existing: usize) -> usize {
        if self.explicit {
            self.count
        } else {
            self.count.max(existing)
        }
    }
}

/// The replica count for what Trellis stores in JetStream: `requested`, else [`REPLICAS_ENV`],
/// else 3 when the server the client is connected to belongs to a cluster of three or more
/// servers (as its `connect_urls` say) and 1 otherwise.
///
/// Deriving the count needs the server's INFO, so it waits (up to 30 s) for the client's first
/// connection, which a process started with `retry_on_initial_connect` may not have yet.
pub async fn replicas(js: &jetstream::Context, requested: Option<usize>) -> Replicas {
    let explicit = requested.or_else(|| std::env::var(REPLICAS_ENV).ok()?.trim().parse().ok());
    let count = match explicit {
        Some(count) => count,
        None => {
            let client = js.client();
            // A flush completes once the server has answered a PING: connected, INFO received.
            let _ = tokio::time::timeout(Duration::from_secs(30), client.flush()).await;
            if client.server_info().connect_urls.len() >= 3 {
                3
            } else {
                1
            }
        }
    };
    Replicas {
        count: count.clamp(1, 5),
        explicit: explicit.is_some(),
    }
}

/// Brings the replica count of an existing stream (a bucket's or an object store's) to what
/// `replicas` asks of it. A no-op when it already has that count; JetStream moves the data.
pub async fn ensure_replicas(
    js: &jetstream::Context,
    stream: &str,
    replicas: Replicas,
) -> Result<(), StreamError> {
    let error = |e: &dyn std::fmt::Display| StreamError {
        stream: stream.to_owned(),
        message: e.to_string(),
    };
    let handle = js.get_stream(stream).await.map_err(|e| error(&e))?;
    let mut config = handle.cached_info().config.clone();
    let wanted = replicas.for_existing(config.num_replicas);
    if config.num_replicas == wanted {
        return Ok(());
    }
    tracing::info!(%stream, from = config.num_replicas, to = wanted, "changing stream replicas");
    config.num_replicas = wanted;
    js.update_stream(config).await.map_err(|e| error(&e))?;
    Ok(())
}

/// Creates the lattice's fact and heartbeat streams, or updates them to `settings`. Idempotent:
/// every process calls it on start, and whichever comes first creates them.
pub async fn ensure_streams(
    js: &jetstream::Context,
    lattice: &Lattice,
    settings: &StreamSettings,
) -> Result<(), StreamError> {
    let replicas = replicas(js, settings.replicas).await;
    tracing::info!(
        replicas = replicas.count,
        explicit = replicas.explicit,
        servers = js.client().server_info().connect_urls.len().max(1),
        "setting up the lattice's streams"
    );
    let events = stream::Config {
        name: subject::events_stream(lattice),
        description: Some(format!("Trellis facts of lattice {lattice}")),
        subjects: vec![subject::events_all(lattice)],
        max_messages_per_subject: settings.facts_per_subject,
        storage: stream::StorageType::File,
        num_replicas: replicas.count,
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
        num_replicas: replicas.count,
        discard: stream::DiscardPolicy::Old,
        ..Default::default()
    };
    for mut config in [events, heartbeats] {
        let name = config.name.clone();
        // Two processes starting together may both find the stream missing; the loser of the
        // create race then updates, which is a no-op with the same configuration. A process
        // whose credentials may not manage streams (every role but the controller's in a
        // secured lattice) waits for the controller to create them.
        let mut attempt = 0;
        loop {
            if let Ok(existing) = js.get_stream(&name).await {
                let info = existing.cached_info();
                config.num_replicas = replicas.for_existing(info.config.num_replicas);
                // Nothing to change: no update is sent.
                if same_settings(&info.config, &config) {
                    break;
                }
            }
            let mut refusals = crate::connect::permission_violations();
            let outcome = tokio::select! {
                done = js.create_or_update_stream(config.clone()) => done.map(|_| ()).map_err(|e| e.to_string()),
                refused = refused_on(&mut refusals, &name) => Err(refused),
            };
            match outcome {
                Ok(()) => break,
                Err(e) if e.contains("only the controller may") => {
                    // Not this process's to create or change: use the stream as it is, or wait
                    // for the controller to create it.
                    if js.get_stream(&name).await.is_ok() {
                        tracing::info!(stream = %name, "using the stream as the controller set it up");
                        break;
                    }
                    if attempt % 10 == 0 {
                        tracing::warn!(stream = %name, "waiting for the controller to create the stream");
                    }
                    attempt += 1;
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) if attempt < 8 => {
                    attempt += 1;
                    tracing::debug!(stream = %name, error = %e, "stream setup failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
                Err(message) => {
                    return Err(StreamError {
                        stream: name,
                        message,
                    });
                }
            }
        }
    }
    Ok(())
}

/// Waits for a permission violation on a JetStream API subject about `stream`.
async fn refused_on(
    refusals: &mut tokio::sync::broadcast::Receiver<String>,
    stream: &str,
) -> String {
    let message = crate::connect::refused_where(refusals, |message| {
        message.contains("$JS.") && message.contains(stream)
    })
    .await;
    format!("{message} (only the controller may create or change streams)")
}

/// Whether an existing stream already has every setting [`ensure_streams`] gives it.
fn same_settings(existing: &stream::Config, wanted: &stream::Config) -> bool {
    existing.subjects == wanted.subjects
        && existing.max_messages_per_subject == wanted.max_messages_per_subject
        && existing.num_replicas == wanted.num_replicas
        // Zero asks for the server's default, which it then reports.
        && (wanted.duplicate_window.is_zero() || existing.duplicate_window == wanted.duplicate_window)
        && existing.max_age == wanted.max_age
        && existing.storage == wanted.storage
        && existing.discard == wanted.discard
        && existing.description == wanted.description
}

/// The fact stream's current state.
pub async fn events_stream_state(
    js: &jetstream::Context,
    lattice: &Lattice,
) -> Result<stream::State, StreamError> {
    let name = subject::events_stream(lattice);
    // One round trip: `get_stream` already asks for the stream's info (`Stream::info` would ask
    // again).
    let stream = js.get_stream(&name).await.map_err(|e| StreamError {
        stream: name.clone(),
        message: e.to_string(),
    })?;
    Ok(stream.cached_info().state.clone())
}
