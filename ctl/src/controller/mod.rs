//! The stateless controller.
//!
//! A controller replica keeps no state of its own: on start it replays the lattice's fact stream
//! to its tip with an ordered consumer, reads the last heartbeat of every host, and only then
//! answers requests. From there it follows the stream live. Any number of replicas may run; they
//! share the control subjects through the queue group `trellis-controller`.
//!
//! # Sections
//!
//! - **Queries** answer from memory and carry `as_of`, the stream sequence they reflect. A request
//!   with `min_seq` waits (up to [`ControllerConfig::min_seq_wait`]) until the replica has applied
//!   that sequence, then answers, or fails with `not_ready`.
//! - **Liveness.** A host that is up according to the facts and whose heartbeats stop for
//!   [`ControllerConfig::host_timeout`] is declared lost with one `host.lost` fact. Replicas publish
//!   it expecting the subject's last sequence they know, so only one declaration is stored.
//! - **Relocation.** The replica whose `host.lost` was stored starts a replacement, with a new
//!   instance id, on a live host for each instance the loss made lost whose restart policy is
//!   `always` or `backoff`, and records it as `instance.relocated`; `never` stays lost.
//! - **Bad input.** Every request is decoded and validated before anything happens; failures get
//!   the error envelope with a precise code, and the replica keeps serving.

mod advisories;
mod assignments;
mod components;
mod instances;
mod links;
mod liveness;
mod logs;
mod metrics;
mod providers;
mod relocate;
mod rollouts;
mod schedule;
mod serve;
mod state;

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use tokio::sync::mpsc;
use trellis_bus::{FactStream, RawFact, StartAt, StreamSettings, connect, ensure_streams};
use trellis_schemas::{Lattice, subject};

pub use state::ReplayStats;
use state::State;

/// How a controller replica is configured.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// NATS server URL(s), comma separated.
    pub nats_url: String,
    /// The lattice to control.
    pub lattice: Lattice,
    /// This replica's id (default: a fresh ULID).
    pub replica_id: String,
    /// A host that is up and silent for this long is declared lost. Default 10 s.
    pub host_timeout: Duration,
    /// How long a request with `min_seq` may wait for the replica to catch up. Default 5 s.
    pub min_seq_wait: Duration,
    /// Stream configuration, used if this replica is the first process of the lattice.
    pub streams: StreamSettings,
    /// Where to serve Prometheus metrics (`GET /metrics`). None by default.
    pub metrics: Option<std::net::SocketAddr>,
    /// How long and how much the audit stream keeps.
    pub audit: trellis_bus::audit::AuditRetention,
    /// The users of a secured lattice by public key (`users.json` of `trellis creds`), to name
    /// the caller of each control request in the audit stream. Empty: callers are named by key.
    pub users: BTreeMap<String, KnownUser>,
    /// Credentials of a user of the NATS server's system account (`system.nk` of `trellis
    /// creds`): with them, the server's advisories of failed logins are audit events.
    pub system_creds: Option<std::path::PathBuf>,
}

/// A user of a secured lattice, as `trellis creds` lists it in `users.json`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KnownUser {
    /// `operator`, `host-h1`, ….
    pub name: String,
    /// Its role.
    pub role: String,
}

impl ControllerConfig {
    /// A configuration with defaults.
    pub fn new(nats_url: impl Into<String>, lattice: Lattice) -> Self {
        Self {
            nats_url: nats_url.into(),
            lattice,
            replica_id: ulid::Ulid::generate().to_string(),
            host_timeout: Duration::from_secs(10),
            min_seq_wait: Duration::from_secs(5),
            streams: StreamSettings::default(),
            metrics: None,
            audit: trellis_bus::audit::AuditRetention::default(),
            users: BTreeMap::new(),
            system_creds: None,
        }
    }
}

/// Why a controller could not run.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControllerError {
    /// NATS could not be reached.
    #[error(transparent)]
    Connect(#[from] trellis_bus::ConnectError),
    /// The lattice's streams could not be set up (is JetStream enabled?).
    #[error(transparent)]
    Streams(#[from] trellis_bus::StreamError),
    /// A stream could not be read.
    #[error(transparent)]
    Read(#[from] trellis_bus::ReadError),
    /// The control subjects could not be subscribed to.
    #[error("cannot subscribe to control subjects: {0}")]
    Subscribe(String),
    /// The metrics address could not be bound.
    #[error("cannot serve metrics on {0}: {1}")]
    Metrics(std::net::SocketAddr, std::io::Error),
}

/// Runs a controller replica until `shutdown` completes.
pub async fn run(
    config: ControllerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ControllerError> {
    let client = connect(
        &config.nats_url,
        &format!("trellis controller {}", config.replica_id),
        true,
    )
    .await?;
    let js = trellis_bus::jetstream(client.clone());
    ensure_streams(&js, &config.lattice, &config.streams).await?;
    // The artifact store too, so that operators can push components without the right to
    // create buckets (which only the controller has in a secured lattice).
    if let Err(e) = trellis_bus::artifact_store(&js, &config.lattice).await {
        tracing::warn!(error = %e, "cannot set up the artifact store");
    }
    // The audit stream is set up beside serving: on a cluster still electing its leaders it
    // may take a while, and control requests need not wait for it.
    let audit_setup = {
        let (js, lattice, retention) = (js.clone(), config.lattice.clone(), config.audit);
        tokio::spawn(async move {
            let mut attempt = 0u32;
            loop {
                match trellis_bus::audit::ensure_audit_stream(&js, &lattice, retention).await {
                    Ok(()) => break,
                    Err(e) => {
                        attempt += 1;
                        if attempt % 5 == 1 {
                            tracing::warn!(error = %e, "cannot set up the audit stream yet; retrying");
                        }
                        tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt.min(10))))
                            .await;
                    }
                }
            }
        })
    };

    let replay_started = Instant::now();
    let state = Arc::new(State::new(config.clone(), client.clone()));
    if let Some(creds) = &config.system_creds {
        advisories::spawn(&config, creds, client.clone()).await?;
    }
    if let Some(addr) = config.metrics {
        // Served from the start, so that a long replay shows as lag.
        let tip = Arc::new(std::sync::atomic::AtomicU64::new(0));
        metrics::register_state(&state, Arc::clone(&tip));
        tokio::spawn(metrics::follow_tip(Arc::downgrade(&state), tip));
        trellis_bus::metrics::serve(addr)
            .await
            .map_err(|e| ControllerError::Metrics(addr, e))?;
    }
    let tip = trellis_bus::events_stream_state(&js, &config.lattice).await?;
    let tip_seq = if tip.messages == 0 {
        0
    } else {
        tip.last_sequence
    };
    tracing::info!(tip = tip_seq, messages = tip.messages, "replaying facts");

    // Replay: one task reads, another decodes and folds, so both cores work.
    let facts = FactStream::open(
        &client,
        &js,
        &subject::events_stream(&config.lattice),
        None,
        StartAt::Beginning,
    )
    .await?;
    let (tx, rx) = mpsc::channel::<RawFact>(8192);
    let reopen = Reopen {
        client: client.clone(),
        js: js.clone(),
        stream: subject::events_stream(&config.lattice),
        state: state.clone(),
    };
    let reader = tokio::spawn(read_facts(facts, tx, Some(reopen)));
    let folder = tokio::spawn(state::fold_facts(state.clone(), rx));
    state.wait_until_applied(tip_seq).await;
    let stats = ReplayStats {
        millis: replay_started.elapsed().as_millis() as u64,
        facts: state.applied_count(),
    };
    tracing::info!(
        facts = stats.facts,
        ms = stats.millis,
        as_of = state.as_of(),
        "replay complete"
    );
    state.set_replay_stats(stats);

    // Live heartbeats come through a plain subscription, which resumes at once after a
    // reconnection. It is made before the last retained heartbeat of every host is read, so that
    // nothing falls in between.
    let mut live_heartbeats = client
        .subscribe(subject::heartbeats_all(&config.lattice))
        .await
        .map_err(|e| ControllerError::Subscribe(e.to_string()))?;
    let hb_state = state.clone();
    let hb_task = tokio::spawn(async move {
        while let Some(message) = live_heartbeats.next().await {
            hb_state.record_heartbeat(&message.payload, false);
        }
    });
    read_retained_heartbeats(&client, &js, &state).await?;

    let requests = client
        .queue_subscribe(
            subject::ctl_all(&config.lattice),
            subject::CONTROLLER_QUEUE.to_owned(),
        )
        .await
        .map_err(|e| ControllerError::Subscribe(e.to_string()))?;
    tracing::info!(
        replica = %config.replica_id,
        lattice = %config.lattice,
        "controller serving"
    );
    let audit_grants = tokio::spawn(audit_grants(state.clone(), state.as_of() + 1));
    let liveness = tokio::spawn(liveness::run(state.clone()));
    let drivers = tokio::spawn(rollouts::run_drivers(state.clone()));
    let watchdog = tokio::spawn(rollouts::watch_drivers(state.clone()));

    // A task of its own, on the runtime's workers: polled from the thread that awaits `run`
    // (the main thread, under `block_on`), every request would wake that thread and then a
    // worker to run the task it spawned, as the provider SDK's loop did.
    let (drain, drain_asked) = tokio::sync::oneshot::channel::<()>();
    let mut serve = tokio::spawn({
        let (state, client) = (state.clone(), client.clone());
        serve_requests(requests, drain_asked, move |message| {
            let (state, client) = (state.clone(), client.clone());
            async move { serve::handle(&state, &client, message).await }
        })
    });
    tokio::select! {
        _ = &mut serve => tracing::warn!("control subscription ended"),
        _ = shutdown => tracing::info!("controller shutting down"),
    }
    // Leave the queue group first, so that the other replicas take the requests this one has
    // not received, and answer those it has; then stop the rest.
    if !serve.is_finished() {
        let _ = drain.send(());
        if tokio::time::timeout(DRAIN_TIMEOUT, &mut serve)
            .await
            .is_err()
        {
            tracing::warn!("control requests still being answered at the end of the drain");
        }
    }
    serve.abort();
    liveness.abort();
    audit_grants.abort();
    audit_setup.abort();
    drivers.abort();
    watchdog.abort();
    hb_task.abort();
    reader.abort();
    folder.abort();
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    Ok(())
}

/// How long a stopping replica answers the control requests it has received.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Answers each request of `requests` with `handle`, in a task of its own, until the
/// subscription ends. Once `drain` fires it leaves the queue group (NATS then delivers the
/// requests to the other replicas), answers what was delivered already, waits for every answer
/// and returns.
async fn serve_requests<H, F>(
    mut requests: async_nats::Subscriber,
    mut drain: tokio::sync::oneshot::Receiver<()>,
    handle: H,
) where
    H: Fn(async_nats::Message) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let mut answering = tokio::task::JoinSet::new();
    let mut draining = false;
    loop {
        tokio::select! {
            message = requests.next() => match message {
                Some(message) => {
                    answering.spawn(handle(message));
                }
                None => break,
            },
            // Finished answers are collected as they come, so that the set stays small.
            Some(_) = answering.join_next(), if !answering.is_empty() => {}
            _ = &mut drain, if !draining => {
                draining = true;
                if let Err(e) = requests.drain().await {
                    tracing::warn!(error = %e, "cannot leave the control queue group");
                    break;
                }
            }
        }
    }
    while answering.join_next().await.is_some() {}
}

/// Records every grant and revoke from `from_seq` on in the audit stream, once for all replicas
/// (each records it under the fact's id, which the stream de-duplicates).
async fn audit_grants(state: Arc<State>, from_seq: u64) {
    use trellis_schemas::audit::{AuditEvent, AuditType};
    let (tx, mut rx) = mpsc::unbounded_channel();
    let next = Arc::new(std::sync::atomic::AtomicU64::new(from_seq));
    let follow = {
        let state = state.clone();
        let next = Arc::clone(&next);
        async move {
            trellis_bus::follow(
                &state.client,
                &subject::events_stream(&state.config.lattice),
                &[
                    subject::assignment_events(&state.config.lattice),
                    subject::link_events(&state.config.lattice),
                ],
                || next.load(std::sync::atomic::Ordering::SeqCst),
                |followed| {
                    next.store(followed.seq + 1, std::sync::atomic::Ordering::SeqCst);
                    if let Ok(event) = followed.event {
                        let _ = tx.send(event);
                    }
                },
            )
            .await;
        }
    };
    let record = async {
        let source = format!("controller/{}", state.config.replica_id);
        while let Some(event) = rx.recv().await {
            let (kind, audit) = match &event.data {
                trellis_schemas::FactData::AssignmentGranted(a) => {
                    let mut audit = AuditEvent::new(AuditType::Grant, source.clone(), "ok");
                    audit.target = Some(a.target.describe());
                    audit.capability = Some(a.capability.as_str().to_owned());
                    audit.provider = Some(a.provider.to_string());
                    audit.reason = Some(format!("assignment {}", a.assignment_id));
                    ("grant", audit)
                }
                trellis_schemas::FactData::LinkAdded(l) => {
                    let mut audit = AuditEvent::new(AuditType::Grant, source.clone(), "ok");
                    audit.target = Some(l.source.describe());
                    audit.capability = Some(l.interface.to_string());
                    audit.reason = Some(format!("link {} to component {}", l.link_id, l.target));
                    ("grant", audit)
                }
                trellis_schemas::FactData::LinkRemoved(r) => {
                    let mut audit = AuditEvent::new(AuditType::Revoke, source.clone(), "ok");
                    audit.target = Some(format!("link:{}", r.link_id));
                    audit.reason = Some(trellis_schemas::audit::short_reason(&r.reason));
                    ("revoke", audit)
                }
                trellis_schemas::FactData::AssignmentRevoked(r) => {
                    let mut audit = AuditEvent::new(AuditType::Revoke, source.clone(), "ok");
                    audit.target = Some(format!("assignment:{}", r.assignment_id));
                    audit.reason = Some(trellis_schemas::audit::short_reason(&r.reason));
                    ("revoke", audit)
                }
                _ => continue,
            };
            let mut audit = audit;
            audit.time = event.time;
            audit.trace_id = event
                .traceparent
                .as_deref()
                .and_then(trellis_schemas::dataplane::trace_id)
                .map(str::to_owned);
            state
                .audit
                .record_once(&audit, &format!("{kind}-{}", event.id))
                .await;
        }
    };
    tokio::join!(follow, record);
}

/// What the live fact reader needs to replace its consumer.
struct Reopen {
    client: async_nats::Client,
    js: jetstream::Context,
    stream: String,
    state: Arc<State>,
}

impl Reopen {
    /// Waits until the replica has waited [`state::READER_STALL`] for a fact.
    async fn stalled(reopen: Option<&Self>) {
        match reopen {
            Some(r) => r.state.reader_stalled.notified().await,
            None => std::future::pending().await,
        }
    }
}

/// Forwards the stream's messages in order, each once. With `reopen`, a reader that has been
/// quiet for [`state::READER_STALL`] while the replica waits for a fact it knows was stored (its
/// consumer lived on a NATS server that died), or that ended, is replaced by a new one starting
/// after the last message forwarded; the ordered consumer would notice the loss only later.
async fn read_facts(mut facts: FactStream, tx: mpsc::Sender<RawFact>, reopen: Option<Reopen>) {
    let mut last_seq = 0u64;
    let mut last_delivery = Instant::now();
    loop {
        let replace = tokio::select! {
            message = facts.next() => match message {
                Some(Ok(raw)) => {
                    last_delivery = Instant::now();
                    if raw.seq <= last_seq {
                        continue;
                    }
                    last_seq = raw.seq;
                    if tx.send(raw).await.is_err() {
                        return;
                    }
                    false
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "fact stream");
                    false
                }
                None => {
                    tracing::warn!("fact stream ended");
                    true
                }
            },
            () = Reopen::stalled(reopen.as_ref()) => last_delivery.elapsed() >= state::READER_STALL,
        };
        if !replace {
            continue;
        }
        let Some(r) = &reopen else { return };
        let from = last_seq + 1;
        match FactStream::open(&r.client, &r.js, &r.stream, None, StartAt::Sequence(from)).await {
            Ok(fresh) => {
                tracing::info!(
                    from,
                    "fact reader went quiet while a fact was awaited; reopened it"
                );
                facts = fresh;
                last_delivery = Instant::now();
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot reopen the fact reader; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Reads the last heartbeat the stream kept of every host (bounded to 2 s).
async fn read_retained_heartbeats(
    client: &async_nats::Client,
    js: &jetstream::Context,
    state: &State,
) -> Result<(), ControllerError> {
    let lattice = &state.config.lattice;
    let backlog = match js.get_stream(subject::heartbeat_stream(lattice)).await {
        Ok(s) => s.cached_info().state.messages,
        Err(_) => 0,
    };
    if backlog == 0 {
        return Ok(());
    }
    let mut retained = FactStream::open(
        client,
        js,
        &subject::heartbeat_stream(lattice),
        Some(subject::heartbeats_all(lattice)),
        StartAt::LastPerSubject,
    )
    .await?;
    let read = async {
        let mut seen = 0;
        while let Some(Ok(raw)) = retained.next().await {
            state.record_heartbeat(&raw.payload, true);
            seen += 1;
            if raw.pending == 0 || seen >= backlog {
                break;
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .is_err()
    {
        tracing::warn!("could not read all retained heartbeats in 2 s; continuing with live ones");
    }
    Ok(())
}

/// Reads and folds the whole fact stream of `lattice` once, without serving: what a replica does
/// before it answers. Returns the projection and how many facts were applied. Used by benchmarks
/// and by tests that compare a replica's projection with an independent replay.
pub async fn replay_once(
    client: &async_nats::Client,
    lattice: &Lattice,
) -> Result<(trellis_schemas::Projection, u64), ControllerError> {
    let js = trellis_bus::jetstream(client.clone());
    let tip = trellis_bus::events_stream_state(&js, lattice).await?;
    let mut projection = trellis_schemas::Projection::new();
    if tip.messages == 0 {
        return Ok((projection, 0));
    }
    let facts = FactStream::open(
        client,
        &js,
        &subject::events_stream(lattice),
        None,
        StartAt::Beginning,
    )
    .await?;
    let (tx, mut rx) = mpsc::channel::<RawFact>(8192);
    let reader = tokio::spawn(read_facts(facts, tx, None));
    let mut applied = 0u64;
    let mut batch = Vec::with_capacity(512);
    while rx.recv_many(&mut batch, 512).await > 0 {
        let (facts, last) = state::decode_batch(&mut batch);
        for fact in &facts {
            if trellis_schemas::apply(&mut projection, fact) {
                applied += 1;
            }
        }
        if last >= tip.last_sequence {
            break;
        }
    }
    reader.abort();
    Ok((projection, applied))
}
