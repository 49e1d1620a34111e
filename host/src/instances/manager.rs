//! The instances of one host: accepting start and stop commands, the inventory, the drain.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use trellis_bus::{FactPublisher, RouteTable};
use trellis_schemas::fact::{AssignmentRevoked, InstanceStartFailed, InstanceStopped};
use trellis_schemas::instance::{
    ComponentSource, InstanceStatsReply, StartInstanceCommand, StopInstanceCommand,
};
use trellis_schemas::logs::{InstanceLogsCommand, InstanceLogsReply};
use trellis_schemas::{
    ComponentName, ErrorBody, ErrorCode, Event, FactData, HostId, InstanceId, InventoryInstance,
    Lattice,
};

use super::artifact::{Artifacts, Loaded, load_file};
use super::bridge::{Assignments, NatsBridge};
use super::error::StartError;
use super::instance::{Spec, State, StateCell, Stop, supervise};
use super::local::LocalInstances;
use super::logs::{InstanceLog, LogConfig, LogHub};
use super::stats::Stats;
use crate::microvm::MicroVm;
use crate::providers::EmbeddedProviders;
use crate::runtime::{Digest, Runtime};
use trellis_schemas::isolation::Isolation;

/// What every instance of a host shares: the NATS client, the fact publisher and its identity.
#[derive(Debug)]
pub(crate) struct Context {
    pub client: async_nats::Client,
    pub publisher: FactPublisher,
    pub lattice: Lattice,
    pub host_id: HostId,
    pub source: String,
    /// The serving periods of this host's instances, for in-process HTTP.
    pub local: LocalInstances,
    /// The traffic routes of the rollouts in progress: a request that reaches an instance on
    /// its component subject but belongs to another version by the weights goes there.
    pub routes: RouteTable,
    /// Records refused capability calls on the audit stream.
    pub audit: Arc<trellis_bus::audit::AuditLog>,
}

impl Context {
    /// Queues a fact; the publisher stores facts in the order they were queued.
    pub fn publish(&self, event: Event) {
        if let Err(e) = self.publisher.enqueue(&event) {
            tracing::error!(error = %e, kind = ?event.kind(), "cannot queue fact");
        }
    }
}

/// Settings of an [`InstanceManager`].
#[derive(Debug, Clone)]
pub struct InstancesConfig {
    /// The most instances the host runs at once (starting, running or restarting).
    pub max_instances: u32,
    /// The largest artifact the host fetches, in bytes. Default 256 MiB.
    pub max_artifact_bytes: u64,
    /// How instances' log lines are streamed and kept.
    pub logs: LogConfig,
    /// Issuers (public keys, `O…`) whose signed components the host runs; empty: it runs
    /// components signed or not. With issuers, an unsigned component, a component signed by
    /// another key and a `file` source fail to start with `untrusted_component`.
    pub trust: Vec<String>,
    /// How `microvm` instances run; None: this host refuses them.
    pub microvm: Option<Arc<crate::MicrovmConfig>>,
}

impl Default for InstancesConfig {
    fn default() -> Self {
        Self {
            max_instances: 100,
            max_artifact_bytes: 256 * 1024 * 1024,
            logs: LogConfig::default(),
            trust: Vec::new(),
            microvm: None,
        }
    }
}

/// Runs the instances of one host.
///
/// [`start`](Self::start) and [`stop`](Self::stop) only check and accept a command; the outcome
/// is published as a fact (`instance.started`, `instance.start_failed`, `instance.stopped`) whose
/// `causationid` is the command's operation id. Cloning is cheap and shares the instances.
#[derive(Debug, Clone)]
pub struct InstanceManager {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    ctx: Arc<Context>,
    runtime: Runtime,
    artifacts: Artifacts,
    assignments: Arc<Assignments>,
    embedded: EmbeddedProviders,
    max_instances: u32,
    instances: Mutex<HashMap<InstanceId, Entry>>,
    next_key: AtomicU64,
    logs: LogHub,
    trust: Vec<String>,
    microvm: Option<Arc<crate::MicrovmConfig>>,
}

#[derive(Debug)]
struct Entry {
    /// Tells this entry from a later instance that reuses the id.
    key: u64,
    component: String,
    state: Arc<StateCell>,
    /// Its counters, for `instance.stats`.
    stats: Arc<Stats>,
    /// Its recent log lines, for `instance.logs`.
    log: Arc<InstanceLog>,
    stop: mpsc::Sender<Stop>,
    task: Option<JoinHandle<()>>,
}

impl InstanceManager {
    /// A manager of no instances yet. Capability calls go to the providers embedded in this
    /// process (`embedded`) when one of the assigned name serves here, and over NATS otherwise.
    pub fn new(
        client: async_nats::Client,
        publisher: FactPublisher,
        lattice: Lattice,
        host_id: HostId,
        runtime: Runtime,
        config: &InstancesConfig,
        embedded: EmbeddedProviders,
    ) -> Self {
        let js = trellis_bus::jetstream(client.clone());
        let source = trellis_schemas::fact::source(&lattice, "host", host_id.as_str());
        let artifacts = Artifacts::new(js, lattice.clone(), config.max_artifact_bytes);
        let assignments = Arc::new(Assignments::default());
        tokio::spawn(Arc::clone(&assignments).follow(client.clone(), lattice.clone()));
        let (routes, _following) = RouteTable::follow(&client, &lattice);
        if let Some(microvm) = &config.microvm {
            microvm.warm();
        }
        let logs = LogHub::new(
            client.clone(),
            lattice.clone(),
            host_id.clone(),
            config.logs,
        );
        trellis_bus::audit::record_nats_refusals(
            client.clone(),
            lattice.clone(),
            format!("host/{host_id}"),
        );
        Self {
            inner: Arc::new(Inner {
                ctx: Arc::new(Context {
                    audit: Arc::new(trellis_bus::audit::AuditLog::new(
                        client.clone(),
                        lattice.clone(),
                    )),
                    client,
                    publisher,
                    lattice,
                    host_id,
                    source,
                    local: LocalInstances::new(routes.clone()),
                    routes,
                }),
                runtime,
                artifacts,
                assignments,
                embedded,
                max_instances: config.max_instances,
                instances: Mutex::new(HashMap::new()),
                next_key: AtomicU64::new(1),
                logs,
                trust: config.trust.clone(),
                microvm: config.microvm.clone(),
            }),
        }
    }

    /// The instances serving in this process, for an `http-server` provider embedded here.
    pub fn local_http(&self) -> Arc<dyn trellis_provider_http_server::LocalTargets> {
        Arc::new(self.inner.ctx.local.clone())
    }

    /// Accepts a start command: the instance starts in the background.
    ///
    /// # Errors
    ///
    /// `invalid_request` for a bad restart policy or digest, or an instance id already used on
    /// this host; `no_host_available` when the host runs its `max_instances`.
    pub fn start(&self, command: StartInstanceCommand) -> Result<(), ErrorBody> {
        command.restart.validate().map_err(|e| {
            ErrorBody::new(ErrorCode::InvalidRequest, format!("restart: {e}"))
                .with_details(serde_json::json!({"field": "restart"}))
        })?;
        let component = match &command.component {
            ComponentSource::Artifact {
                digest, manifest, ..
            } => {
                digest.parse::<Digest>().map_err(|e| {
                    ErrorBody::new(ErrorCode::InvalidRequest, format!("component.digest: {e}"))
                        .with_details(serde_json::json!({"field": "component.digest"}))
                })?;
                manifest.name.to_string()
            }
            ComponentSource::File { path, .. } => path.clone(),
        };
        self.inner.assignments.merge(&command.assignments);
        let (stop_tx, stop_rx) = mpsc::channel(4);
        let state = Arc::new(StateCell::default());
        // The command's trace context goes with the facts of this start.
        let traceparent = trellis_bus::telemetry::current();
        let stats = Arc::new(Stats::default());
        let log = self
            .inner
            .logs
            .instance(&command.instance_id, Arc::clone(&stats));
        let key = self.inner.next_key.fetch_add(1, Ordering::Relaxed);
        {
            let mut instances = self.lock();
            if instances.contains_key(&command.instance_id) {
                return Err(ErrorBody::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "instance {} already exists on host {}; choose another instance id",
                        command.instance_id, self.inner.ctx.host_id
                    ),
                )
                .with_details(serde_json::json!({"instance_id": command.instance_id})));
            }
            if instances.len() >= usize::try_from(self.inner.max_instances).unwrap_or(usize::MAX) {
                return Err(ErrorBody::new(
                    ErrorCode::NoHostAvailable,
                    format!(
                        "host {} already runs its maximum of {} instances; stop one or use another host",
                        self.inner.ctx.host_id, self.inner.max_instances
                    ),
                )
                .with_details(serde_json::json!({"max_instances": self.inner.max_instances})));
            }
            instances.insert(
                command.instance_id.clone(),
                Entry {
                    key,
                    component: component.clone(),
                    state: Arc::clone(&state),
                    stats: Arc::clone(&stats),
                    log: Arc::clone(&log),
                    stop: stop_tx,
                    task: None,
                },
            );
            let id = command.instance_id.clone();
            let inner = Arc::clone(&self.inner);
            let task_id = id.clone();
            let task = tokio::spawn(async move {
                let slot = Slot {
                    inner: Arc::clone(&inner),
                    id: task_id,
                    key,
                };
                let started = Started {
                    component,
                    state,
                    stats,
                    log,
                    traceparent,
                };
                run(&inner, command, started, stop_rx, slot).await;
            });
            // The task cannot remove the entry before this: it needs the lock held here.
            if let Some(entry) = instances.get_mut(&id) {
                entry.task = Some(task);
            }
        }
        Ok(())
    }

    /// Accepts a stop command: the instance stops serving, finishes its calls in flight and
    /// reports `instance.stopped`.
    ///
    /// # Errors
    ///
    /// `not_found` when no such instance runs on this host.
    pub fn stop(&self, command: StopInstanceCommand) -> Result<(), ErrorBody> {
        let instances = self.lock();
        let not_found = || {
            ErrorBody::new(
                ErrorCode::NotFound,
                format!(
                    "instance {} does not run on host {}",
                    command.instance_id, self.inner.ctx.host_id
                ),
            )
            .with_details(serde_json::json!({"instance_id": command.instance_id}))
        };
        let entry = instances.get(&command.instance_id).ok_or_else(not_found)?;
        match entry.stop.try_send(Stop {
            reason: command
                .reason
                .clone()
                .unwrap_or_else(|| "requested".to_owned()),
            operation_id: Some(command.operation_id.clone()),
        }) {
            // A full queue means stops are already pending: this one is redundant.
            Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(not_found()),
        }
    }

    /// The counters of those of `ids` that run here.
    pub fn stats(&self, ids: &[InstanceId]) -> InstanceStatsReply {
        let instances = self.lock();
        InstanceStatsReply {
            stats: ids
                .iter()
                .filter_map(|id| Some((id.clone(), instances.get(id)?.stats.snapshot())))
                .collect(),
        }
    }

    /// The recent log lines of those of `command.instance_ids` that run here or ended lately.
    pub fn logs(&self, command: &InstanceLogsCommand) -> InstanceLogsReply {
        let running: Vec<Arc<InstanceLog>> = {
            let instances = self.lock();
            command
                .instance_ids
                .iter()
                .filter_map(|id| instances.get(id).map(|e| Arc::clone(&e.log)))
                .collect()
        };
        self.inner.logs.read(&running, command)
    }

    /// Serves this host's per-instance metrics in the process's registry (see
    /// [`crate::metrics`]); the collector holds the manager weakly.
    pub fn register_metrics(&self) {
        let weak = Arc::downgrade(&self.inner);
        crate::metrics::register_instances(move || {
            let Some(inner) = weak.upgrade() else {
                return Vec::new();
            };
            let instances = inner
                .instances
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            instances
                .iter()
                .map(|(id, entry)| crate::metrics::InstanceSample {
                    component: entry.component.clone(),
                    instance: id.to_string(),
                    state: entry.state.get().as_str(),
                    counts: entry.stats.counts(),
                })
                .collect()
        });
    }

    /// Every instance on the host and its state, for heartbeats.
    pub fn inventory(&self) -> Vec<InventoryInstance> {
        let instances = self.lock();
        let mut out: Vec<InventoryInstance> = instances
            .iter()
            .map(|(id, entry)| {
                let counts = entry.stats.counts();
                InventoryInstance {
                    instance_id: id.to_string(),
                    component: entry.component.clone(),
                    state: entry.state.get().as_str().to_owned(),
                    calls: counts.stats.calls,
                    errors: counts.stats.errors,
                    crashes: counts.stats.crashes,
                    restarts: counts.restarts,
                    in_flight: counts.in_flight,
                }
            })
            .collect();
        out.sort_by(|a, b| a.instance_id.cmp(&b.instance_id));
        out
    }

    /// Stops every instance with `reason` and waits, up to `timeout`, until each has finished
    /// its calls in flight and queued its `instance.stopped`.
    pub async fn stop_all(&self, reason: &str, timeout: Duration) {
        let tasks: Vec<JoinHandle<()>> = {
            let mut instances = self.lock();
            instances
                .values_mut()
                .filter_map(|entry| {
                    let _ = entry.stop.try_send(Stop {
                        reason: reason.to_owned(),
                        operation_id: None,
                    });
                    entry.task.take()
                })
                .collect()
        };
        let all = futures::future::join_all(tasks);
        if tokio::time::timeout(timeout, all).await.is_err() {
            tracing::warn!(?timeout, "instances still stopping at the end of the drain");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<InstanceId, Entry>> {
        self.inner
            .instances
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// An instance's place on the host. Dropping it frees the place (the instance leaves the
/// inventory and its id may be used again); an instance drops it before publishing the fact that
/// ends it, so whoever sees that fact finds the place free.
#[derive(Debug)]
pub(crate) struct Slot {
    inner: Arc<Inner>,
    id: InstanceId,
    key: u64,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut instances = self
            .inner
            .instances
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let ended = if instances.get(&self.id).is_some_and(|e| e.key == self.key) {
            instances.remove(&self.id)
        } else {
            None
        };
        drop(instances);
        if let Some(entry) = ended {
            self.inner.logs.ended(entry.log);
        }
        // Grants made for this instance end with it, so that what they hold (a listen address,
        // a subscription) is released and can be granted to its successor.
        let ctx = &self.inner.ctx;
        for assignment_id in self.inner.assignments.of_instance(&self.id) {
            ctx.publish(Event::new(
                ctx.source.clone(),
                FactData::AssignmentRevoked(AssignmentRevoked {
                    assignment_id,
                    reason: format!("instance {} ended", self.id),
                }),
            ));
        }
    }
}

/// What a start made for the instance before its task began.
struct Started {
    /// The component as the command named it.
    component: String,
    state: Arc<StateCell>,
    stats: Arc<Stats>,
    log: Arc<InstanceLog>,
    /// The start command's trace context.
    traceparent: Option<String>,
}

/// Loads the component, then serves it until it ends.
async fn run(
    inner: &Inner,
    command: StartInstanceCommand,
    started: Started,
    mut stop: mpsc::Receiver<Stop>,
    slot: Slot,
) {
    let Started {
        component,
        state,
        stats,
        log,
        traceparent,
    } = started;
    let ctx = &inner.ctx;
    state.set(State::Starting);
    let loading = load(inner, &command.component);
    let loaded = tokio::select! {
        loaded = loading => loaded,
        request = stop.recv() => {
            drop(slot);
            stopped_while_starting(ctx, &command, request);
            return;
        }
    };
    let (loaded, name) = match loaded {
        Ok(ok) => ok,
        Err(error) => {
            drop(slot);
            start_failed(ctx, &command, component, error.to_string(), traceparent);
            return;
        }
    };
    let manifest = loaded.component.manifest();
    let missing: Vec<String> = manifest
        .capabilities
        .requires
        .iter()
        .filter(|cap| {
            inner
                .assignments
                .lookup(&command.instance_id, name.as_str(), **cap)
                .is_none()
        })
        .map(ToString::to_string)
        .collect();
    if !missing.is_empty() {
        let reason = format!(
            "capability not assigned: {} (required by Component.toml); grant it first, e.g. `trellis assignment grant component:{name} {} …`, or start with --grant",
            missing.join(", "),
            missing[0]
        );
        drop(slot);
        start_failed(ctx, &command, component, reason, traceparent);
        return;
    }
    let component_name = name.to_string();
    log.bind(&component_name, &manifest.version.to_string());
    let spec = Spec {
        id: command.instance_id.clone(),
        name,
        version: manifest.version.to_string(),
        digest: loaded.component.load_outcome().digest.to_string(),
        restart: command.restart,
        operation_id: command.operation_id.clone(),
        stats,
        log,
        traceparent,
    };
    let isolation = command
        .isolation
        .map_or(manifest.isolation, |asked| asked.max(manifest.isolation));
    let Loaded {
        component,
        wasm,
        _bytes: bytes,
    } = loaded;
    let bridge: Arc<dyn crate::runtime::CapabilityBridge> = Arc::new(NatsBridge {
        client: ctx.client.clone(),
        lattice: ctx.lattice.clone(),
        instance: command.instance_id.clone(),
        component: component_name,
        assignments: Arc::clone(&inner.assignments),
        embedded: inner.embedded.clone(),
        audit: Arc::clone(&ctx.audit),
        host: ctx.host_id.clone(),
        local: ctx.local.clone(),
    });
    let component = component.with_bridge(Arc::clone(&bridge));
    let microvm = match isolation {
        Isolation::Process => None,
        Isolation::Microvm => {
            let Some(config) = inner.microvm.clone() else {
                drop(slot);
                start_failed(
                    ctx,
                    &command,
                    spec.name.to_string(),
                    "this host does not run micro-VMs (isolation microvm): start it with --microvm-kernel and --microvm-initrd".to_owned(),
                    spec.traceparent.clone(),
                );
                return;
            };
            let booting = MicroVm::start(
                config,
                inner.runtime.clone(),
                command.instance_id.to_string(),
                wasm,
                bridge,
                component.clone(),
            );
            let booted = tokio::select! {
                booted = booting => booted,
                request = stop.recv() => {
                    drop(slot);
                    stopped_while_starting(ctx, &command, request);
                    return;
                }
            };
            match booted {
                Ok(vm) => Some(vm),
                Err(reason) => {
                    drop(slot);
                    start_failed(
                        ctx,
                        &command,
                        spec.name.to_string(),
                        reason,
                        spec.traceparent.clone(),
                    );
                    return;
                }
            }
        }
    };
    supervise(Arc::clone(ctx), spec, component, microvm, state, stop, slot).await;
    drop(bytes);
}

/// On a host that trusts issuers, refuses `source` unless it is a stored component signed by
/// one of them, with a signature over its digest and manifest that verifies.
fn check_trust(trust: &[String], source: &ComponentSource) -> Result<(), StartError> {
    if trust.is_empty() {
        return Ok(());
    }
    let untrusted = |why: String| Err(StartError::Untrusted(why));
    let ComponentSource::Artifact {
        digest,
        manifest,
        signature,
    } = source
    else {
        return untrusted(
            "this host runs only signed components from the artifact store, not files".into(),
        );
    };
    let Some(signature) = signature else {
        return untrusted(format!(
            "{}@{} is not signed; this host trusts {}",
            manifest.name,
            manifest.version,
            trust.join(", ")
        ));
    };
    if !trust.contains(&signature.issuer) {
        return untrusted(format!(
            "{}@{} is signed by {}, which this host does not trust",
            manifest.name, manifest.version, signature.issuer
        ));
    }
    trellis_bus::signing::verify(signature, digest, manifest).map_err(StartError::Untrusted)
}

/// Fetches and loads the code of `source`; returns it with the component's name.
async fn load(
    inner: &Inner,
    source: &ComponentSource,
) -> Result<(Loaded, ComponentName), StartError> {
    check_trust(&inner.trust, source)?;
    let loaded = match source {
        ComponentSource::Artifact {
            digest, manifest, ..
        } => {
            let digest: Digest = digest.parse()?;
            let manifest = manifest.to_manifest()?;
            inner
                .artifacts
                .load_artifact(&inner.runtime, digest, manifest)
                .await?
        }
        ComponentSource::File {
            path,
            manifest_path,
        } => load_file(&inner.runtime, path, manifest_path.as_deref()).await?,
    };
    let name = ComponentName::new(loaded.component.manifest().name.as_str())?;
    Ok((loaded, name))
}

/// Records that the instance of `command` was stopped (by `request`, or the host draining)
/// before it served.
fn stopped_while_starting(ctx: &Context, command: &StartInstanceCommand, request: Option<Stop>) {
    let reason = request
        .as_ref()
        .map_or("host draining", |r| r.reason.as_str())
        .to_owned();
    let operation = request
        .and_then(|r| r.operation_id)
        .unwrap_or_else(|| command.operation_id.clone());
    ctx.publish(
        Event::new(
            ctx.source.clone(),
            FactData::InstanceStopped(InstanceStopped {
                instance_id: command.instance_id.clone(),
                host_id: ctx.host_id.clone(),
                reason,
            }),
        )
        .caused_by(operation),
    );
}

/// Records that the instance of `command` did not start, and why.
fn start_failed(
    ctx: &Context,
    command: &StartInstanceCommand,
    component: String,
    reason: String,
    traceparent: Option<String>,
) {
    tracing::warn!(instance = %command.instance_id, %reason, "instance failed to start");
    ctx.publish(
        Event::new(
            ctx.source.clone(),
            FactData::InstanceStartFailed(InstanceStartFailed {
                instance_id: command.instance_id.clone(),
                host_id: ctx.host_id.clone(),
                component,
                reason,
            }),
        )
        .caused_by(command.operation_id.clone())
        .traced(traceparent),
    );
}
