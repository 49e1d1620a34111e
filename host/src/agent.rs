//! The Node Agent: membership, heartbeats and graceful drain.
//!
//! # Sections
//!
//! - **Joining.** On start the agent makes sure the lattice's streams exist and publishes
//!   `host.started` with its id, labels, capacity and version.
//! - **Heartbeats.** Every interval it publishes a [`Heartbeat`] with its full inventory on
//!   `trellis.hb.v1.<lattice>.<host_id>`; the heartbeat stream keeps the latest per host.
//! - **Being declared lost.** If a controller publishes `host.lost` for this host (it was paused or
//!   cut off), its instances were reported lost and may have been started elsewhere: the agent
//!   stops every instance it runs (`instance.stopped`, reason [`DECLARED_LOST`]), so that no
//!   instance runs twice, then announces itself again with `host.started` (`rejoined: true`).
//! - **Disconnection.** The NATS client reconnects by itself; facts wait in the publisher's queue and
//!   are flushed in order once NATS is back. Heartbeats are not queued: a stale heartbeat is useless.
//! - **Instances.** The agent owns one [`Runtime`] and an [`InstanceManager`], and serves the
//!   host's command subjects (see [`crate::InstanceManager`] for starting, serving, crashes and
//!   restarts).
//! - **Registry (optional).** With [`HostConfig::registry`] the host also records its existence in
//!   etcd (see [`trellis_bus::registry`]), on a lease that expires three heartbeats after it dies.
//! - **Shutdown.** When the shutdown future completes the agent stops taking commands, stops every
//!   instance (`instance.stopped`, reason `host draining`), stops heartbeats, publishes
//!   `host.stopped` with the reason and waits (bounded) until its facts are stored.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::Utc;
use trellis_bus::registry::{EtcdRegistry, Registration};
use trellis_bus::{FactPublisher, FactStream, StartAt, StreamSettings, connect, ensure_streams};
use trellis_schemas::{
    Capacity, Event, FactData, FactKind, Heartbeat, HostId, HostStarted, HostStopped, Lattice,
    fact::source, subject,
};

use crate::instances::{InstanceManager, InstancesConfig, LogConfig, serve_commands};
use crate::providers::{EmbeddedProviders, Providers, ProvidersConfig};
use crate::runtime::{Runtime, RuntimeConfig, RuntimeError};

/// How a host is configured.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// NATS server URL(s), comma separated.
    pub nats_url: String,
    /// The lattice to join.
    pub lattice: Lattice,
    /// This host's id.
    pub host_id: HostId,
    /// Placement labels.
    pub labels: BTreeMap<String, String>,
    /// What the host offers.
    pub capacity: Capacity,
    /// How often to send a heartbeat. Default 2 s.
    pub heartbeat_interval: Duration,
    /// How long to wait for facts to be stored when shutting down. Default 5 s.
    pub drain_timeout: Duration,
    /// Stream configuration, used if this host is the first process of the lattice.
    pub streams: StreamSettings,
    /// The runtime's ceilings and pool. Without a cache directory, the host uses
    /// [`default_cache_dir`] for its id.
    pub runtime: RuntimeConfig,
    /// The largest artifact the host fetches, in bytes. Default 256 MiB.
    pub max_artifact_bytes: u64,
    /// An etcd registry (`etcd://host:port`) in which the host records its existence under
    /// `/trellis/<lattice>/nodes/<host_id>`, leased for three heartbeats. None by default: a
    /// lattice needs nothing but NATS.
    pub registry: Option<String>,
    /// Where to find `trellis-provider-<name>` executables (then `PATH`). Default: the
    /// directory of the running executable.
    pub provider_dirs: Vec<PathBuf>,
    /// A directory written by `trellis creds` holding each provider's credentials, which the
    /// providers this host starts (or embeds) then connect with. None by default: they connect
    /// as the host does.
    pub provider_creds: Option<PathBuf>,
    /// Where to serve Prometheus metrics (`GET /metrics`). None by default.
    pub metrics: Option<std::net::SocketAddr>,
    /// How instances' log lines are streamed and kept.
    pub logs: LogConfig,
    /// Issuers whose signed components this host runs (see [`InstancesConfig::trust`]).
    pub trust: Vec<String>,
    /// How this host runs `microvm` instances; None: it does not (the default).
    pub microvm: Option<std::sync::Arc<crate::MicrovmConfig>>,
}

impl HostConfig {
    /// A configuration with defaults: a generated id, no labels, the machine's capacity.
    pub fn new(nats_url: impl Into<String>, lattice: Lattice) -> Self {
        Self {
            nats_url: nats_url.into(),
            lattice,
            host_id: HostId::generate(),
            labels: BTreeMap::new(),
            capacity: machine_capacity(100),
            heartbeat_interval: Duration::from_secs(2),
            drain_timeout: Duration::from_secs(5),
            streams: StreamSettings::default(),
            runtime: RuntimeConfig::new(),
            max_artifact_bytes: InstancesConfig::default().max_artifact_bytes,
            registry: None,
            provider_dirs: ProvidersConfig::new("").dirs,
            provider_creds: None,
            metrics: None,
            logs: LogConfig::default(),
            trust: Vec::new(),
            microvm: None,
        }
    }
}

/// Where a host keeps compiled components when not told otherwise:
/// `$XDG_CACHE_HOME/trellis/host-<host_id>`, else `~/.cache/trellis/host-<host_id>`, else a
/// directory under the system's temporary directory.
pub fn default_cache_dir(host_id: &HostId) -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("trellis").join(format!("host-{host_id}"))
}

/// The capacity of this machine: its cores and memory, and `max_instances`.
pub fn machine_capacity(max_instances: u32) -> Capacity {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let memory_bytes = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib * 1024)
        .unwrap_or(0);
    Capacity {
        max_instances,
        memory_bytes,
        cpus,
        microvm: None,
    }
}

/// Why a host could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum HostError {
    /// NATS could not be reached.
    #[error(transparent)]
    Connect(#[from] trellis_bus::ConnectError),
    /// The lattice's streams could not be set up (is JetStream enabled?).
    #[error(transparent)]
    Streams(#[from] trellis_bus::StreamError),
    /// The fact stream could not be read.
    #[error(transparent)]
    Read(#[from] trellis_bus::ReadError),
    /// The WebAssembly runtime could not be created.
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The host's command subjects could not be subscribed to.
    #[error("subscribing to the host's commands: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    /// The registry URL is invalid.
    #[error(transparent)]
    Registry(#[from] trellis_bus::registry::RegistryError),
    /// The metrics address could not be bound.
    #[error("cannot serve metrics on {0}: {1}")]
    Metrics(std::net::SocketAddr, std::io::Error),
}

/// Runs the host until `shutdown` completes with a reason (`"signal: SIGTERM"`), then drains.
pub async fn run(
    mut config: HostConfig,
    shutdown: impl Future<Output = String>,
) -> Result<(), HostError> {
    let started = Instant::now();
    // What the host says it offers follows what it was configured with.
    config.capacity.microvm = config.microvm.as_ref().map(|m| m.acceleration);
    let registry = config
        .registry
        .as_deref()
        .map(|url| EtcdRegistry::new(url, &config.lattice))
        .transpose()?;
    let mut runtime_config = config.runtime.clone();
    if runtime_config.cache_dir.is_none() {
        runtime_config.cache_dir(default_cache_dir(&config.host_id));
    }
    let runtime = Runtime::new(&runtime_config)?;
    let client = connect(
        &config.nats_url,
        &format!("trellis-host {}", config.host_id),
        true,
    )
    .await?;
    let js = trellis_bus::jetstream(client.clone());
    ensure_streams(&js, &config.lattice, &config.streams).await?;
    let (publisher, publisher_task) = FactPublisher::spawn(
        js.clone(),
        config.lattice.clone(),
        config.streams.clone(),
        10_000,
    );
    let source = source(&config.lattice, "host", config.host_id.as_str());

    if let Err(e) = publisher.enqueue(&host_started(&config, &source, false)) {
        tracing::error!(error = %e, "cannot queue host.started");
    }
    tracing::info!(host_id = %config.host_id, lattice = %config.lattice, "host started");

    // Being declared lost while alive means this host was paused or cut off: say so and rejoin.
    // The declaration is read from the stream (not a plain subscription) so that one made while
    // this host was disconnected is still seen once it is back.
    let tip = trellis_bus::events_stream_state(&js, &config.lattice)
        .await?
        .last_sequence;
    let lost_subject = subject::event(&config.lattice, FactKind::HostLost, config.host_id.as_str());
    let mut lost = FactStream::open(
        &client,
        &js,
        &subject::events_stream(&config.lattice),
        Some(lost_subject),
        StartAt::Sequence(tip + 1),
    )
    .await?;
    let embedded = EmbeddedProviders::default();
    let instances = InstanceManager::new(
        client.clone(),
        publisher.clone(),
        config.lattice.clone(),
        config.host_id.clone(),
        runtime,
        &InstancesConfig {
            max_instances: config.capacity.max_instances,
            max_artifact_bytes: config.max_artifact_bytes,
            logs: config.logs,
            trust: config.trust.clone(),
            microvm: config.microvm.clone(),
        },
        embedded.clone(),
    );
    if let Some(addr) = config.metrics {
        instances.register_metrics();
        trellis_bus::metrics::serve(addr)
            .await
            .map_err(|e| HostError::Metrics(addr, e))?;
    }
    let rejoin = {
        let publisher = publisher.clone();
        let instances = instances.clone();
        let (config, source) = (config.clone(), source.clone());
        tokio::spawn(async move {
            while let Some(message) = lost.next().await {
                let Ok(message) = message else { continue };
                if let Ok(event) = Event::decode(&message.payload) {
                    // Its instances were reported lost and may have been started elsewhere:
                    // stop them before coming back, so that none runs twice.
                    tracing::warn!(
                        by = %event.source,
                        "a controller declared this host lost; stopping its instances and announcing it again"
                    );
                    instances
                        .stop_all(DECLARED_LOST, config.drain_timeout)
                        .await;
                    let again =
                        host_started(&config, &source, true).caused_by(event.id.to_string());
                    if let Err(e) = publisher.enqueue(&again) {
                        tracing::error!(error = %e, "cannot queue host.started");
                    }
                }
            }
        })
    };

    let providers = Providers::new(
        ProvidersConfig {
            nats_url: config.nats_url.clone(),
            dirs: config.provider_dirs.clone(),
            creds_dir: config.provider_creds.clone(),
        },
        publisher.clone(),
        config.lattice.clone(),
        config.host_id.clone(),
        embedded,
        instances.local_http(),
    );
    let commands = serve_commands(
        client.clone(),
        &config.lattice,
        &config.host_id,
        instances.clone(),
        providers.clone(),
    )
    .await?;

    // The registry records that this node exists, nothing else; it is optional and never blocks
    // the host (etcd being away is logged and retried).
    let registration = registry.map(|registry| {
        let key = registry.node_key(config.host_id.as_str());
        let value = serde_json::json!({
            "node_id": config.host_id,
            "role": "host",
            "lattice": config.lattice,
            "labels": config.labels,
            "capacity": config.capacity,
            "version": trellis_schemas::VERSION,
            "started_at": Utc::now(),
        });
        Registration::spawn(
            registry,
            key,
            value.to_string().into_bytes(),
            config.heartbeat_interval * 3,
        )
    });

    let heartbeats = tokio::spawn(heartbeat_loop(
        client.clone(),
        config.clone(),
        started,
        instances.clone(),
    ));

    let reason = shutdown.await;
    tracing::info!(%reason, "draining");
    commands.abort();
    instances
        .stop_all("host draining", config.drain_timeout)
        .await;
    providers.stop_all(config.drain_timeout).await;
    heartbeats.abort();
    rejoin.abort();
    let stopped = Event::new(
        source.clone(),
        FactData::HostStopped(HostStopped {
            host_id: config.host_id.clone(),
            reason,
        }),
    );
    match tokio::time::timeout(config.drain_timeout, publisher.publish(&stopped)).await {
        Ok(Ok(seq)) => tracing::info!(seq, "host.stopped stored"),
        Ok(Err(e)) => tracing::error!(error = %e, "host.stopped not stored"),
        Err(_) => {
            tracing::error!(timeout = ?config.drain_timeout, "host.stopped not stored in time")
        }
    }
    drop(publisher);
    if let Some(registration) = registration {
        registration.end().await;
    }
    if !publisher_task.drain(config.drain_timeout).await {
        tracing::warn!("facts still queued at shutdown");
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    Ok(())
}

/// The reason of the `instance.stopped` facts a host publishes when it learns it was declared lost.
pub const DECLARED_LOST: &str =
    "host was declared lost; its instances were reported lost and may run elsewhere";

fn host_started(config: &HostConfig, source: &str, rejoined: bool) -> Event {
    Event::new(
        source,
        FactData::HostStarted(HostStarted {
            host_id: config.host_id.clone(),
            labels: config.labels.clone(),
            capacity: config.capacity.clone(),
            version: trellis_schemas::VERSION.to_owned(),
            rejoined,
        }),
    )
}

async fn heartbeat_loop(
    client: async_nats::Client,
    config: HostConfig,
    started: Instant,
    instances: InstanceManager,
) {
    let subject = subject::heartbeat(&config.lattice, &config.host_id);
    let mut ticker = tokio::time::interval(config.heartbeat_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        ticker.tick().await;
        seq += 1;
        let heartbeat = Heartbeat {
            host_id: config.host_id.clone(),
            seq,
            sent_at: Utc::now(),
            uptime_ms: started.elapsed().as_millis() as u64,
            interval_ms: config.heartbeat_interval.as_millis() as u64,
            version: trellis_schemas::VERSION.to_owned(),
            labels: config.labels.clone(),
            capacity: config.capacity.clone(),
            instances: instances.inventory(),
        };
        let payload = match serde_json::to_vec(&heartbeat) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "cannot encode heartbeat");
                continue;
            }
        };
        // While NATS is away the client's buffer fills; a heartbeat that cannot be sent within an
        // interval is stale, so drop it instead of blocking.
        let send = client.publish(subject.clone(), payload.into());
        match tokio::time::timeout(config.heartbeat_interval, send).await {
            Ok(Ok(())) => {
                crate::metrics::HOST.heartbeats.inc();
            }
            Ok(Err(e)) => tracing::debug!(error = %e, "heartbeat not sent"),
            Err(_) => tracing::debug!("heartbeat dropped while NATS is unreachable"),
        }
    }
}
