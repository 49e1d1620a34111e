//! What every Trellis capability provider shares.
//!
//! A provider is a process that performs side effects on behalf of components: it serves its
//! capabilities' RPC subjects, checks every call against the assignments it follows itself, and
//! announces its life as facts. This crate does all of that; a provider only says what it serves
//! ([`ProviderInfo`]) and implements [`Provider::handle`] (and, for listeners or subscriptions,
//! [`Provider::run`]).
//!
//! ```no_run
//! use std::process::ExitCode;
//! use trellis_provider_sdk::{
//!     Call, CapabilityRequest, CapabilityResponse, Context, DataError, Outcome, Provider,
//!     ProviderInfo,
//! };
//! use trellis_schemas::Capability;
//! use trellis_schemas::capability::rpc::KvReply;
//!
//! /// Answers every `get` with the key itself.
//! struct Echo;
//!
//! impl Provider for Echo {
//!     async fn handle(&self, call: Call) -> Outcome {
//!         match call.request {
//!             CapabilityRequest::KeyValue(trellis_schemas::capability::rpc::KvRequest::Get {
//!                 key, ..
//!             }) => Ok(CapabilityResponse::KeyValue(KvReply {
//!                 value: Some(key.into_bytes().into()),
//!                 ..KvReply::default()
//!             })),
//!             _ => Err(DataError::invalid("only get")),
//!         }
//!     }
//! }
//!
//! fn main() -> ExitCode {
//!     const INFO: ProviderInfo = ProviderInfo {
//!         name: "echo",
//!         version: env!("CARGO_PKG_VERSION"),
//!         capabilities: &[Capability::KeyValue],
//!         rpc: &[Capability::KeyValue],
//!         workers: 1,
//!     };
//!     trellis_provider_sdk::main(INFO, |_ctx: Context| async { Ok(Echo) })
//! }
//! ```
//!
//! # Life of a provider process
//!
//! 1. Parse [`ProviderArgs`], connect to NATS (waiting for it), make sure the lattice's streams
//!    exist.
//! 2. Follow the `assignment.*` facts from the beginning of the stream until caught up
//!    ([`Assignments`]).
//! 3. Subscribe to `trellis.rpc.v1.<lattice>.provider.<name>.<capability>` in queue group
//!    `trellis-provider-<name>` for every RPC capability (replicas share the calls) and to its
//!    control subjects `trellis.prov.v1.<lattice>.<id>.{stop,config,health}`; start
//!    [`Provider::run`].
//! 4. Publish `provider.started`.
//! 5. Serve: each call on the subscription loop's task until it first waits, then in a task of
//!    its own (a call that never waits costs no task). A call's `Trellis-Identity` header names
//!    the caller; the provider looks the assignment up in its own projection (waiting up to 2 s
//!    for the fact sequence the host gives) and refuses with `access_denied` when none grants
//!    the capability through this provider. A call whose caller reads a backend's own replies (a host, for
//!    key-value) may then be answered by the backend itself: [`Provider::direct`] names the
//!    backend's request, which the SDK sends with the caller's reply subject.
//! 6. On SIGTERM/SIGINT or a `stop` request: stop taking calls, finish those in flight (bounded),
//!    stop the background work, publish `provider.stopped`, flush, exit 0.
#![deny(missing_docs)]

mod args;
mod assignments;
mod local;
mod metrics;
mod rpc;

use std::collections::BTreeMap;
use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context as _;
use async_nats::{Message, jetstream};
use clap::Parser as _;
use futures::StreamExt as _;
use futures::stream::SelectAll;
use tokio::sync::{Notify, watch};
use trellis_bus::{FactPublisher, StreamSettings};
use trellis_schemas::control::{ErrorBody, ErrorCode as CtlErrorCode, Reply};
use trellis_schemas::dataplane::ProviderHealth;
use trellis_schemas::dataplane::{self as proto, ProviderVerb};
use trellis_schemas::fact::{ProviderStarted, ProviderStopped};
use trellis_schemas::{Capability, Event, FactData, HostId, Lattice, ProviderId, ProviderName};

pub use args::{ProviderArgs, parse_setting};
pub use assignments::{Assignments, MIN_SEQ_WAIT};
pub use local::{LocalFuture, LocalProvider};
pub use rpc::{Call, Caller, Outcome, Provider, Request};
pub use trellis_bus::dataplane::Identity;
pub use trellis_bus::direct::Direct;
pub use trellis_schemas::capability::rpc::{CapabilityRequest, CapabilityResponse};
pub use trellis_schemas::dataplane::{DataError, ErrorCode};

/// How long in-flight calls may take to finish once the provider stops taking new ones.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// What a provider is: its default name, version and capabilities.
#[derive(Debug, Clone, Copy)]
pub struct ProviderInfo {
    /// The default name (`kv`): the binary is `trellis-provider-<name>`.
    pub name: &'static str,
    /// The provider's version (its crate's).
    pub version: &'static str,
    /// The capabilities it serves (announced in `provider.started`).
    pub capabilities: &'static [Capability],
    /// The capabilities whose RPC subject it serves (components call them through a host).
    pub rpc: &'static [Capability],
    /// Threads of its async runtime when it runs as a process of its own, unless `--workers`
    /// says otherwise; 0 for one per core. A provider that relays each call to NATS and back
    /// (`kv`, `messaging`) does best on 1: its one NATS connection is its bottleneck, and a
    /// second thread only adds wakeups between threads (in the kv bench with 8 callers, the
    /// provider spent 70–86 µs of CPU per set+get round trip on 1 thread, 82–94 µs on 2).
    pub workers: usize,
}

/// What a provider works with. Cloning is cheap.
#[derive(Debug, Clone)]
pub struct Context {
    /// The NATS client (one per process).
    pub client: async_nats::Client,
    /// The NATS URL(s) it connected to, for a provider that needs a connection of its own.
    pub nats_url: String,
    /// Records the calls it refuses on the audit stream.
    pub audit: Arc<trellis_bus::audit::AuditLog>,
    /// JetStream on that client.
    pub js: jetstream::Context,
    /// The lattice served.
    pub lattice: Lattice,
    /// This provider's name: its queue group, and the `provider` of the assignments it serves.
    pub name: ProviderName,
    /// This process.
    pub id: ProviderId,
    /// The supervising host, if any.
    pub host_id: Option<HostId>,
    /// The `--config` settings.
    pub settings: Arc<BTreeMap<String, String>>,
    /// The assignments in force.
    pub assignments: Assignments,
    shutdown: watch::Receiver<bool>,
    /// Its call counters.
    calls: metrics::ProviderCalls,
}

impl Context {
    /// Completes once the provider drains: background work should wind down.
    pub async fn shutdown(&self) {
        let mut rx = self.shutdown.clone();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Whether the provider is draining.
    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// A `--config` setting.
    pub fn setting(&self, key: &str) -> Option<&str> {
        self.settings.get(key).map(String::as_str)
    }
}

/// Runs a provider binary: sets up logging and a runtime, parses [`ProviderArgs`], then [`run`]s.
/// Exits 0 after a drain, 1 when the provider could not start or failed.
pub fn main<P, F, Fut>(info: ProviderInfo, make: F) -> ExitCode
where
    P: Provider,
    F: FnOnce(Context) -> Fut + Send + 'static,
    Fut: Future<Output = anyhow::Result<P>> + Send + 'static,
{
    trellis_bus::init_logging("info,async_nats=warn");
    let _telemetry = trellis_bus::telemetry::init(&format!("trellis-provider-{}", info.name));
    let args = ProviderArgs::parse();
    trellis_bus::set_jetstream_domain(args.js_domain.clone());
    if let Err(e) = args.connect.check() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    trellis_bus::set_connect_args(args.connect.clone());
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    let workers = args
        .workers
        .map_or(info.workers, std::num::NonZeroUsize::get);
    if workers > 0 {
        runtime.worker_threads(workers);
    }
    let runtime = match runtime.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    // The serve loop runs as a task on the runtime's workers, not on this thread: `block_on`
    // would poll it here, so that every call arriving on a worker's connection would wake this
    // thread to take it, and this thread wake a worker to run it (in the kv bench, 7.1 voluntary
    // context switches per set+get round trip, two calls, against 3.7 with the loop spawned).
    let shutdown = {
        let _in_runtime = runtime.enter();
        trellis_bus::shutdown_signal()
    };
    let serving = runtime.spawn(run(info, args, make, shutdown));
    match runtime.block_on(serving) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            tracing::error!("trellis-provider-{} failed: {e:#}", info.name);
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!("trellis-provider-{} failed: {e}", info.name);
            ExitCode::FAILURE
        }
    }
}

/// Calls in flight, so that a drain can wait for them.
#[derive(Debug, Default)]
pub(crate) struct InFlight {
    count: AtomicUsize,
    idle: Notify,
}

impl InFlight {
    pub(crate) fn enter(self: &Arc<Self>) -> Guard {
        self.count.fetch_add(1, Ordering::SeqCst);
        Guard(Arc::clone(self))
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.count.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }
}

pub(crate) struct Guard(Arc<InFlight>);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Runs a provider until `shutdown` completes (its value is the reason recorded, e.g.
/// `signal: SIGTERM`) or a `stop` request arrives; then drains and records `provider.stopped`.
pub async fn run<P, F, Fut>(
    info: ProviderInfo,
    args: ProviderArgs,
    make: F,
    shutdown: impl Future<Output = String>,
) -> anyhow::Result<()>
where
    P: Provider,
    F: FnOnce(Context) -> Fut,
    Fut: Future<Output = anyhow::Result<P>>,
{
    serve(info, args, make, shutdown, None).await
}

/// Runs a provider embedded in this process (a host): everything [`run`] does, the facts
/// saying `embedded`, and once it serves, `serving` gets a [`LocalProvider`] through which this
/// process calls it without NATS. The handle stops taking calls when the provider drains.
pub async fn run_embedded<P, F, Fut>(
    info: ProviderInfo,
    args: ProviderArgs,
    make: F,
    shutdown: impl Future<Output = String>,
    serving: impl FnOnce(LocalProvider) + Send + 'static,
) -> anyhow::Result<()>
where
    P: Provider,
    F: FnOnce(Context) -> Fut,
    Fut: Future<Output = anyhow::Result<P>>,
{
    serve(info, args, make, shutdown, Some(Box::new(serving))).await
}

/// Receives the handle of an embedded provider.
type OnServing = Box<dyn FnOnce(LocalProvider) + Send>;

async fn serve<P, F, Fut>(
    info: ProviderInfo,
    args: ProviderArgs,
    make: F,
    shutdown: impl Future<Output = String>,
    on_serving: Option<OnServing>,
) -> anyhow::Result<()>
where
    P: Provider,
    F: FnOnce(Context) -> Fut,
    Fut: Future<Output = anyhow::Result<P>>,
{
    let embedded = on_serving.is_some();
    let name = match args.name.clone() {
        Some(name) => name,
        None => ProviderName::new(info.name).context("the provider's default name")?,
    };
    let id = args
        .provider_id
        .clone()
        .unwrap_or_else(ProviderId::generate);
    let lattice = args.lattice.clone();
    tracing::info!(%name, %id, %lattice, nats = %args.nats, "provider starting");
    let client = trellis_bus::connect_with(
        &args.nats,
        &format!("trellis-provider-{name}-{id}"),
        true,
        &args.connect,
    )
    .await
    .context("connecting to NATS")?;
    let js = trellis_bus::jetstream(client.clone());
    let settings = StreamSettings::default();
    trellis_bus::ensure_streams(&js, &lattice, &settings)
        .await
        .context("setting up the lattice's streams")?;
    let (publisher, publisher_task) =
        FactPublisher::spawn(js.clone(), lattice.clone(), settings, 256);
    let source = trellis_schemas::fact::source(&lattice, "provider", id.as_str());

    let assignments = Assignments::new(name.clone());
    assignments.follow(client.clone(), lattice.clone()).await;
    tracing::info!(
        seq = assignments.last_seq(),
        mine = assignments.count_mine(),
        "assignments caught up"
    );

    let (stop_tx, stop_rx) = watch::channel(false);
    let ctx = Context {
        nats_url: args.nats.clone(),
        audit: Arc::new(trellis_bus::audit::AuditLog::new(
            client.clone(),
            lattice.clone(),
        )),
        client: client.clone(),
        js,
        lattice: lattice.clone(),
        name: name.clone(),
        id: id.clone(),
        host_id: args.host_id.clone(),
        settings: Arc::new(args.settings()),
        assignments,
        shutdown: stop_rx,
        calls: metrics::ProviderCalls::new(name.as_str()),
    };
    if !embedded {
        // Embedded, its host records what NATS refuses the process.
        trellis_bus::audit::record_nats_refusals(
            client.clone(),
            lattice.clone(),
            format!("provider/{name}/{id}"),
        );
    }
    let provider = Arc::new(make(ctx.clone()).await.context("starting the provider")?);

    let mut calls = SelectAll::new();
    for &capability in info.rpc {
        let subscriber = client
            .queue_subscribe(
                proto::provider_rpc(&lattice, &name, capability),
                proto::provider_queue(&name),
            )
            .await
            .context("subscribing to the RPC subject")?;
        calls.push(subscriber.map(move |m| (capability, m)));
    }
    let mut control = client
        .subscribe(proto::provider_controls(&lattice, &name, &id))
        .await
        .context("subscribing to the control subject")?;
    let background = tokio::spawn(Arc::clone(&provider).run(ctx.clone()));
    // Shared by the calls' tasks: a clone of the context per call would copy its strings.
    let call_ctx = Arc::new(ctx.clone());

    let started = Event::new(
        source.clone(),
        FactData::ProviderStarted(ProviderStarted {
            provider_id: id.clone(),
            name: name.clone(),
            version: info.version.to_owned(),
            capabilities: info.capabilities.to_vec(),
            host_id: args.host_id.clone(),
            node: node(),
            embedded,
        }),
    );
    publisher
        .publish(&started)
        .await
        .context("publishing provider.started")?;
    tracing::info!(capabilities = ?info.capabilities, "provider serving");
    if let Some(addr) = args.metrics {
        trellis_bus::metrics::serve(addr)
            .await
            .with_context(|| format!("serving metrics on {addr}"))?;
    }
    // Optional: provider metadata in etcd, on a lease that ends with the process.
    let registration = match &args.registry {
        Some(url) => {
            let registry = trellis_bus::registry::EtcdRegistry::new(url, &lattice)
                .context("the registry URL")?;
            let key = registry.provider_key(id.as_str());
            let value = serde_json::json!({
                "provider_id": id,
                "name": name,
                "lattice": lattice,
                "capabilities": info.capabilities,
                "version": info.version,
                "host_id": args.host_id,
                "node": node(),
                "embedded": embedded,
            });
            Some(trellis_bus::registry::Registration::spawn(
                registry,
                key,
                value.to_string().into_bytes(),
                Duration::from_secs(6),
            ))
        }
        None => None,
    };

    let in_flight = Arc::new(InFlight::default());
    let local = on_serving.map(|give| {
        let (handle, flag) = LocalProvider::new(
            Arc::clone(&provider),
            ctx.clone(),
            Arc::clone(&in_flight),
            info.rpc,
        );
        give(handle);
        flag
    });
    tokio::pin!(shutdown);
    let reason = loop {
        tokio::select! {
            Some((capability, message)) = calls.next(), if !calls.is_empty() => {
                spawn_call(&provider, &call_ctx, &in_flight, capability, message);
            }
            message = control.next() => {
                let Some(message) = message else {
                    break "control subscription ended".to_owned();
                };
                if control_request(&ctx, &in_flight, message).await {
                    break "requested".to_owned();
                }
            }
            reason = &mut shutdown => break reason,
        }
    };
    tracing::info!(%reason, "provider draining");
    if let Some(local) = &local {
        local.stop();
    }

    // Stop taking calls: the queue group hands new ones to the other replicas. Calls already
    // delivered to this process are still answered.
    // Every step is bounded: with NATS gone (its server stopped, or the host that started this
    // process killed along with it) a flush would wait for a reconnection that never comes.
    let deadline = tokio::time::Instant::now() + DRAIN_TIMEOUT;
    let unsubscribe = async {
        for subscriber in calls.iter_mut() {
            let _ = subscriber.get_mut().drain().await;
        }
        let _ = control.unsubscribe().await;
        let _ = client.flush().await;
    };
    if tokio::time::timeout_at(deadline, unsubscribe)
        .await
        .is_err()
    {
        tracing::warn!("NATS did not confirm the end of the subscriptions in time");
    }
    while !calls.is_empty() {
        match tokio::time::timeout_at(deadline, calls.next()).await {
            Ok(Some((capability, message))) => {
                spawn_call(&provider, &call_ctx, &in_flight, capability, message);
            }
            Ok(None) | Err(_) => break,
        }
    }
    if tokio::time::timeout_at(deadline, in_flight.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!(
            in_flight = in_flight.count.load(Ordering::SeqCst),
            "calls still in flight at the end of the drain"
        );
    }
    let _ = stop_tx.send(true);
    if tokio::time::timeout(DRAIN_TIMEOUT, background)
        .await
        .is_err()
    {
        tracing::warn!("background work did not end in time");
    }

    if let Some(registration) = registration {
        registration.end().await;
    }
    let stopped = Event::new(
        source,
        FactData::ProviderStopped(ProviderStopped {
            provider_id: id.clone(),
            reason: reason.clone(),
        }),
    );
    match tokio::time::timeout(Duration::from_secs(5), publisher.publish(&stopped)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot publish provider.stopped"),
        Err(_) => tracing::warn!("provider.stopped not acknowledged in time"),
    }
    drop(publisher);
    publisher_task.drain(Duration::from_secs(2)).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
    tracing::info!(%reason, "provider stopped");
    Ok(())
}

/// Answers one call, counted in flight until it has replied: on this task as far as it goes
/// without waiting, then in a task of its own from its first wait on. A call that never waits
/// (answered directly by the backend, or refused) thus costs no task and wakes no thread.
fn spawn_call<P: Provider>(
    provider: &Arc<P>,
    ctx: &Arc<Context>,
    in_flight: &Arc<InFlight>,
    capability: Capability,
    message: Message,
) {
    use std::task::{Poll, Waker};
    let guard = in_flight.enter();
    let provider = Arc::clone(provider);
    let ctx = Arc::clone(ctx);
    let mut call = Box::pin(async move {
        rpc::serve_call(&*provider, &ctx, capability, message).await;
        drop(guard);
    });
    // Whatever the first poll waits on, the task polls again at once with its own waker.
    let mut cx = std::task::Context::from_waker(Waker::noop());
    let first =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| call.as_mut().poll(&mut cx)));
    match first {
        Ok(Poll::Ready(())) => {}
        Ok(Poll::Pending) => {
            tokio::spawn(call);
        }
        // As a panic in a task of its own would: the call goes unanswered, the provider serves on.
        Err(_) => tracing::error!(%capability, "a capability call panicked"),
    }
}

/// Answers one control request (in the control envelope); returns whether it asks the
/// provider to stop.
async fn control_request(ctx: &Context, in_flight: &InFlight, message: Message) -> bool {
    let verb = proto::parse_provider_control(&ctx.lattice, &ctx.name, &ctx.id, &message.subject);
    let (body, stop) = match verb {
        Ok(ProviderVerb::Stop) => (encode_reply(&Reply::ok(serde_json::json!({}))), true),
        Ok(ProviderVerb::Config) => (encode_reply(&Reply::ok(&*ctx.settings)), false),
        Ok(ProviderVerb::Health) => (
            encode_reply(&Reply::ok(ProviderHealth {
                name: ctx.name.clone(),
                provider_id: ctx.id.clone(),
                host_id: ctx.host_id.clone(),
                assignments: ctx.assignments.count_mine(),
                last_seq: ctx.assignments.last_seq(),
                in_flight: in_flight.count.load(Ordering::SeqCst),
                status: if ctx.is_shutting_down() {
                    "draining".to_owned()
                } else {
                    "serving".to_owned()
                },
            })),
            false,
        ),
        Err(other) => (
            encode_reply(&Reply::<()>::err(ErrorBody::new(
                CtlErrorCode::UnknownVerb,
                format!(
                    "unknown provider control {other:?}; known: {}",
                    ProviderVerb::known()
                ),
            ))),
            false,
        ),
    };
    if let Some(reply) = message.reply {
        if let Err(e) = ctx.client.publish(reply, body.into()).await {
            tracing::debug!(error = %e, "cannot answer a control request");
        }
        let _ = ctx.client.flush().await;
    }
    stop
}

fn encode_reply<T: serde::Serialize>(reply: &Reply<T>) -> Vec<u8> {
    serde_json::to_vec(reply).unwrap_or_else(|e| {
        format!(r#"{{"ok":false,"error":{{"code":"internal","message":"cannot encode the reply: {e}"}}}}"#)
            .into_bytes()
    })
}

/// This machine's hostname.
fn node() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "unknown".to_owned())
}
