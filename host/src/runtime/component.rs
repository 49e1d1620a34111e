//! A loaded component and its invocations.
//!
//! # Isolation
//!
//! Every invocation runs in a fresh `Store` instantiated from the pre-instantiated
//! `InstancePre` for it alone, runs one export and is dropped: no memory, global or table
//! survives from one call to the next, and two invocations (of the same component or not) never
//! share state. The instance may have been made ahead of the invocation (the component's
//! spare, in which no export ran) and the store is dropped after the answer, both in the
//! background (see [`RuntimeConfig::spare_instances`](super::RuntimeConfig::spare_instances)).
//!
//! # Limits
//!
//! Each invocation gets the manifest's fuel, a memory limiter capped at `max_memory` that traps
//! on a failed grow, and a wall-clock deadline checked at every epoch tick (the guest yields to
//! the async executor on each tick, so a looping guest never blocks the executor's thread). A
//! host-side wait (a guest sleeping through WASI) is cut by the same deadline. Exceeding a limit
//! ends that invocation only, with a precise [`InvokeError::reason`].
//!
//! # Concurrency
//!
//! At most `max_concurrency` invocations of one component run at once. One more is refused at
//! once with [`InvokeError::Busy`], before anything runs: queueing or retrying is the caller's
//! choice, so a slow component cannot pile up unbounded waiting work inside the runtime.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Semaphore;
use wasmtime::component::types::{ComponentItem, Type};
use wasmtime::component::{Component, ComponentExportIndex, Instance, InstancePre, Val};
use wasmtime::{Store, UpdateDeadline};

use super::capabilities::{CapabilityBridge, DenyAll};
use super::convert::{Budget, FromValError, describe_type, json_to_val, val_matches, val_to_json};
use super::error::InvokeError;
use super::output::{GuestOutput, LogSink};
use super::runtime::{LoadOutcome, RuntimeInner};
use super::spare::{Ready, Spare};
use super::store::{LiveStore, OutputHandle, StoreState};
use bytes::Bytes;
use http_body_util::{BodyExt, Limited};
use trellis_schemas::capability::rpc::{HttpRequestHead, HttpResponseHead};
use trellis_schemas::dataplane::MAX_BODY_BYTES;
use trellis_schemas::manifest::{Limits, Manifest, strip_version};
use wasmtime::component::Resource;
use wasmtime_wasi_http::WasiHttpView;
use wasmtime_wasi_http::p2::bindings::http::types::Scheme;
use wasmtime_wasi_http::p2::types::{HostIncomingRequest, HostResponseOutparam};

/// Extra wall-clock time, beyond the timeout, before the executor-side timer cancels an
/// invocation that the epoch deadline did not stop (a guest blocked in a host call).
const CANCEL_GRACE: Duration = Duration::from_millis(50);

/// A component loaded by [`Runtime::load`](super::Runtime::load), ready to be invoked.
///
/// Cloning is cheap; clones share the concurrency limit.
#[derive(Debug, Clone)]
pub struct LoadedComponent {
    inner: Arc<ComponentInner>,
    /// Where capability calls go; [`DenyAll`] unless the embedder gave one.
    bridge: Arc<dyn CapabilityBridge>,
    /// What each invocation carries: where its output lines go, its trace context.
    call: CallContext,
    /// Whether the caller drops ended invocations' stores with [`tidy`](Self::tidy).
    tidied: bool,
}

/// What an invocation carries besides its arguments (see [`LoadedComponent::with_call`]).
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    /// Where its output goes line by line as the guest writes it (the captured
    /// [`GuestOutput`] is kept as well).
    pub log: Option<Arc<dyn LogSink>>,
    /// Its W3C trace context: capability calls carry it on.
    pub traceparent: Option<Arc<str>>,
}

pub(super) struct ComponentInner {
    pub(super) runtime: Arc<RuntimeInner>,
    manifest: Manifest,
    pre: InstancePre<StoreState>,
    exports: BTreeMap<String, ExportFunc>,
    /// `wasi:http/incoming-handler#handle`, when the component exports it.
    http_handler: Option<ComponentExportIndex>,
    outcome: LoadOutcome,
    permits: Arc<Semaphore>,
    usage: Usage,
    /// The instance made ahead of the next invocation, and stores to drop.
    pub(super) spare: Spare,
}

/// Fuel and memory used by the invocations of one loaded component, as the runtime measured
/// them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResourceUsage {
    /// Fuel consumed by every invocation so far.
    pub fuel_consumed: u64,
    /// The most linear memory one invocation grew to, in bytes.
    pub memory_high_water_bytes: u64,
}

#[derive(Debug, Default)]
struct Usage {
    fuel: AtomicU64,
    memory: AtomicU64,
}

impl Usage {
    /// Adds what the store's invocation used (`limit` is the fuel it was given); call before
    /// dropping it. Returns the fuel consumed.
    fn record(&self, store: &Store<StoreState>, limit: u64) -> u64 {
        let consumed = limit.saturating_sub(store.get_fuel().unwrap_or(0));
        self.fuel.fetch_add(consumed, Ordering::Relaxed);
        self.memory
            .fetch_max(store.data().limiter.used(), Ordering::Relaxed);
        consumed
    }
}

impl std::fmt::Debug for ComponentInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedComponent")
            .field("name", &self.manifest.name)
            .field("version", &self.manifest.version.to_string())
            .field("digest", &self.outcome.digest)
            .field("exports", &self.exports.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

struct ExportFunc {
    index: ComponentExportIndex,
    params: Vec<(String, Type)>,
    results: Vec<Type>,
}

/// A function the component exports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    /// The name to pass to [`LoadedComponent::invoke`]: `func` for a function of the world,
    /// `namespace:package/interface#func` for a function of an exported interface.
    pub name: String,
    /// The parameters' names, in order.
    pub params: Vec<String>,
    /// How many results it returns (0 or 1).
    pub results: usize,
}

/// The outcome of a successful invocation.
#[derive(Debug, Clone, PartialEq)]
pub struct Invocation {
    /// The result as JSON: `null` for a function without result.
    pub value: Value,
    /// What the guest wrote to stdout and stderr.
    pub output: GuestOutput,
    /// Fuel the invocation consumed (instantiation included).
    pub fuel_consumed: u64,
}

impl LoadedComponent {
    pub(crate) fn new(
        runtime: Arc<RuntimeInner>,
        manifest: Manifest,
        component: &Component,
        pre: InstancePre<StoreState>,
        outcome: LoadOutcome,
    ) -> Self {
        let exports = collect_exports(&runtime, component);
        let http_handler = exports
            .iter()
            .find(|(name, _)| {
                name.starts_with("wasi:http/incoming-handler@") && name.ends_with("#handle")
            })
            .map(|(_, f)| f.index);
        let permits = Arc::new(Semaphore::new(
            usize::try_from(manifest.limits.max_concurrency).unwrap_or(usize::MAX),
        ));
        Self {
            inner: Arc::new(ComponentInner {
                runtime,
                manifest,
                pre,
                exports,
                http_handler,
                outcome,
                permits,
                usage: Usage::default(),
                spare: Spare::default(),
            }),
            bridge: Arc::new(DenyAll),
            call: CallContext::default(),
            tidied: false,
        }
    }

    /// The same component, whose capability calls go to `bridge` (each instance of a host
    /// gets one that knows its identity and assignments).
    pub fn with_bridge(&self, bridge: Arc<dyn CapabilityBridge>) -> Self {
        Self {
            bridge,
            ..self.clone()
        }
    }

    /// The same component, whose invocations carry `call` (made per invocation by a host:
    /// its log sink and trace context).
    pub fn with_call(&self, call: CallContext) -> Self {
        Self {
            call,
            ..self.clone()
        }
    }

    /// The same component, whose caller tidies after it answered: an invocation through it
    /// keeps its store instead of dropping it, and the caller's [`tidy`](Self::tidy), called
    /// once the invocation's answer is on its way, drops it and makes the component's next
    /// spare instance (see [`RuntimeConfig::spare_instances`](super::RuntimeConfig::spare_instances)).
    /// A caller that does not tidy leaves those stores until the next invocation that makes a
    /// store of its own, which drops them first.
    pub fn tidied_by_caller(&self) -> Self {
        Self {
            tidied: true,
            ..self.clone()
        }
    }

    /// Drops the stores of ended invocations made through
    /// [`tidied_by_caller`](Self::tidied_by_caller), then makes the component's spare instance
    /// unless it has one, one is being made, spares are off or the runtime's pool is half used.
    /// Runs on the caller's task: call it after the answer has gone (and after a
    /// `tokio::task::yield_now`, so that the task sending it runs first).
    pub async fn tidy(&self) {
        Spare::tidy(&self.inner).await;
    }

    /// Drops the store of an invocation that ended now, or keeps it for the caller's
    /// [`tidy`](Self::tidy).
    fn retire(&self, store: Store<StoreState>) {
        if self.tidied && self.inner.runtime.config.spare_instances {
            self.inner.spare.retire(store);
        } else {
            drop(store);
        }
    }

    /// Whether the component exports `wasi:http/incoming-handler`.
    pub fn handles_http(&self) -> bool {
        self.inner.http_handler.is_some()
    }

    /// Fuel and memory its invocations have used so far (clones share them).
    pub fn usage(&self) -> ResourceUsage {
        let usage = &self.inner.usage;
        ResourceUsage {
            fuel_consumed: usage.fuel.load(Ordering::Relaxed),
            memory_high_water_bytes: usage.memory.load(Ordering::Relaxed),
        }
    }

    /// The manifest the component was loaded with.
    pub fn manifest(&self) -> &Manifest {
        &self.inner.manifest
    }

    /// How the component was loaded: digest, and whether the compiled artifact came from cache.
    pub fn load_outcome(&self) -> LoadOutcome {
        self.inner.outcome
    }

    /// The functions it exports, sorted by name.
    pub fn exports(&self) -> Vec<ExportInfo> {
        self.inner
            .exports
            .iter()
            .map(|(name, f)| ExportInfo {
                name: name.clone(),
                params: f.params.iter().map(|(n, _)| n.clone()).collect(),
                results: f.results.len(),
            })
            .collect()
    }

    /// Invocations running right now.
    pub fn in_flight(&self) -> usize {
        let max = usize::try_from(self.inner.manifest.limits.max_concurrency).unwrap_or(0);
        max.saturating_sub(self.inner.permits.available_permits())
    }

    /// Calls `export` with `args` (a JSON array, one element per parameter) in a fresh instance
    /// and returns its result as JSON (see the [crate docs](crate#json-values) for the mapping).
    ///
    /// `export` is a function of the component's world (`"add"`) or of an exported interface
    /// (`"trellis:test/shapes#scale"`, or with a `/` before the function name).
    ///
    /// Must be called within a Tokio runtime (the timeout uses Tokio's timer).
    ///
    /// # Errors
    ///
    /// [`InvokeError`]: refused calls (unknown export, invalid arguments, busy) and crashes with
    /// their reason (fuel, timeout, memory, stack, trap, panic, output size).
    pub async fn invoke(&self, export: &str, args: Value) -> Result<Value, InvokeError> {
        self.invoke_captured(export, args).await.map(|i| i.value)
    }

    /// Makes the component's spare instance now, unless it has one (see
    /// [`RuntimeConfig::spare_instances`](super::RuntimeConfig::spare_instances)), so that even
    /// the next invocation finds one; returns whether one is ready. Instantiation is held to
    /// the component's limits as in an invocation; a component that cannot be instantiated has
    /// no spare, and its next invocation reports why.
    pub async fn warm(&self) -> bool {
        Spare::fill(&self.inner).await
    }

    /// Whether the component's spare instance is ready now.
    pub fn has_spare(&self) -> bool {
        self.inner.spare.is_ready()
    }

    /// Like [`invoke`](Self::invoke), and also returns the guest's captured output and the fuel
    /// it consumed.
    ///
    /// # Errors
    ///
    /// As [`invoke`](Self::invoke).
    pub async fn invoke_captured(
        &self,
        export: &str,
        args: Value,
    ) -> Result<Invocation, InvokeError> {
        let inner = &*self.inner;
        let config = &inner.runtime.config;
        let (name, func) = self.lookup(export)?;
        let params = convert_args(name, func, &args)?;
        let (outcome, output, fuel_consumed) = self.run_values(func, &params).await?;
        match outcome {
            Err(error) => Err(error),
            Ok(results) => {
                let mut budget = Budget::new(config.max_result_bytes);
                let value = match results.as_slice() {
                    [] => Ok(Value::Null),
                    [one] => val_to_json(one, &mut budget),
                    many => many
                        .iter()
                        .map(|v| val_to_json(v, &mut budget))
                        .collect::<Result<Vec<_>, _>>()
                        .map(Value::Array),
                };
                let value = value.map_err(|err| match err {
                    FromValError::TooLarge { at_least } => InvokeError::OutputTooLarge {
                        size: at_least,
                        limit: config.max_result_bytes,
                        output: output.collect(),
                    },
                    FromValError::Unsupported(what) => InvokeError::UnsupportedResult {
                        export: name.to_string(),
                        what,
                    },
                })?;
                Ok(Invocation {
                    value,
                    output: output.collect(),
                    fuel_consumed,
                })
            }
        }
    }

    /// Calls `export` with `params`, values as another component's store lowered them (a
    /// linked call in process: nothing is encoded), in a fresh instance, and returns its
    /// results as values. The arguments are checked against the export's types first: a
    /// mismatch is [`InvokeError::ArgumentType`] and nothing runs. `export` is named as for
    /// [`invoke`](Self::invoke); an interface's version may differ from the exported one.
    ///
    /// # Errors
    ///
    /// As [`invoke`](Self::invoke).
    pub async fn invoke_vals(&self, export: &str, params: &[Val]) -> Result<Vec<Val>, InvokeError> {
        let (_, func) = self.check_vals(export, params)?;
        let (outcome, _output, _fuel) = self.run_values(func, params).await?;
        outcome
    }

    /// The parameter and result types of `function` of the imported interface `interface`,
    /// for a linked call made elsewhere (in a micro-VM) on this component's behalf.
    pub(crate) fn import_types(
        &self,
        interface: &str,
        function: &str,
    ) -> Option<(Vec<Type>, Vec<Type>)> {
        let engine = &self.inner.runtime.engine;
        let component = self.inner.pre.component();
        let ty = component.component_type();
        let item = ty
            .imports(engine)
            .find_map(|(name, item)| (name == interface).then_some(item))?;
        let ComponentItem::ComponentInstance(instance) = item.ty else {
            return None;
        };
        let func = instance
            .exports(engine)
            .find_map(|(name, item)| (name == function).then_some(item))?;
        let ComponentItem::ComponentFunc(func) = func.ty else {
            return None;
        };
        Some((
            func.params().map(|(_, ty)| ty).collect(),
            func.results().collect(),
        ))
    }

    /// For a linked call that runs elsewhere (in a micro-VM): checks `params` as
    /// [`invoke_vals`](Self::invoke_vals) does and encodes them as the JSON array
    /// [`invoke`](Self::invoke) takes.
    pub(crate) fn encode_vals(&self, export: &str, params: &[Val]) -> Result<Vec<u8>, InvokeError> {
        let (_, _) = self.check_vals(export, params)?;
        let mut budget = Budget::new(usize::MAX);
        let args = params
            .iter()
            .map(|v| val_to_json(v, &mut budget))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| InvokeError::UnsupportedResult {
                export: export.to_owned(),
                what: match e {
                    FromValError::Unsupported(what) => what,
                    FromValError::TooLarge { .. } => "too much data",
                },
            })?;
        serde_json::to_vec(&Value::Array(args)).map_err(|e| InvokeError::BadRequest {
            message: e.to_string(),
        })
    }

    /// The values of `export`'s results from the JSON [`invoke`](Self::invoke) returned.
    pub(crate) fn decode_results(
        &self,
        export: &str,
        json: &[u8],
    ) -> Result<Vec<Val>, InvokeError> {
        let (name, func) = self.lookup(export)?;
        let unsupported = |what| InvokeError::UnsupportedResult {
            export: name.to_string(),
            what,
        };
        let value: Value =
            serde_json::from_slice(json).map_err(|_| unsupported("a result that is not JSON"))?;
        let values = match (func.results.as_slice(), value) {
            ([], _) => Vec::new(),
            ([_], value) => vec![value],
            (_, Value::Array(values)) if values.len() == func.results.len() => values,
            _ => return Err(unsupported("a result of another shape")),
        };
        func.results
            .iter()
            .zip(&values)
            .map(|(ty, v)| json_to_val(ty, v).map_err(|_| unsupported("a result of another type")))
            .collect()
    }

    /// Checks `params` against the parameter types of `export`.
    fn check_vals(&self, export: &str, params: &[Val]) -> Result<(&str, &ExportFunc), InvokeError> {
        let (name, func) = self.lookup(export)?;
        if params.len() != func.params.len() {
            return Err(InvokeError::ArgumentCount {
                export: name.to_string(),
                expected: func.params.len(),
                got: params.len(),
                params: func.params.iter().map(|(n, _)| n.clone()).collect(),
            });
        }
        for (position, (value, (param, ty))) in params.iter().zip(&func.params).enumerate() {
            if !val_matches(value, ty) {
                return Err(InvokeError::ArgumentType {
                    export: name.to_string(),
                    param: param.clone(),
                    position,
                    error: Box::new(super::convert::ConvertError::mismatch(
                        describe_type(ty),
                        value,
                    )),
                });
            }
        }
        Ok((name, func))
    }

    /// Runs `func` with `params` in a fresh store under the component's limits and
    /// concurrency: the results (or why there are none), what the guest wrote, and the fuel
    /// it used.
    async fn run_values(
        &self,
        func: &ExportFunc,
        params: &[Val],
    ) -> Result<(Result<Vec<Val>, InvokeError>, OutputHandle, u64), InvokeError> {
        let inner = &*self.inner;
        let _permit = self.permit()?;
        let limits = inner.manifest.limits;
        let (mut store, output, instance) = self.store_for().await?;
        let _ticking = inner.runtime.ticker.busy();
        let mut results = vec![Val::Bool(false); func.results.len()];
        let run = run(
            &inner.pre,
            &mut store,
            instance,
            &func.index,
            params,
            &mut results,
        );
        let outcome = tokio::time::timeout(limits.timeout + CANCEL_GRACE, run).await;
        let fuel_consumed = inner.usage.record(&store, limits.fuel);
        self.retire(store);
        output.finish();
        let outcome = match outcome {
            Err(_elapsed) => Err(failed(None, &output, &limits)),
            Ok(Err(failure)) => Err(failed(Some(failure), &output, &limits)),
            Ok(Ok(())) => Ok(results),
        };
        Ok((outcome, output, fuel_consumed))
    }

    /// A slot of the component's concurrency, or [`InvokeError::Busy`] at once.
    fn permit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, InvokeError> {
        let inner = &*self.inner;
        Arc::clone(&inner.permits)
            .try_acquire_owned()
            .map_err(|_| InvokeError::Busy {
                component: inner.manifest.name.clone(),
                max_concurrency: inner.manifest.limits.max_concurrency,
            })
    }

    /// The store an invocation runs in, and its instance when it was made ahead: the spare,
    /// given this invocation's bridge, call context and deadline, when there is one; else a
    /// fresh store, to instantiate in.
    async fn store_for(
        &self,
    ) -> Result<(Store<StoreState>, OutputHandle, Option<Instance>), InvokeError> {
        let inner = &*self.inner;
        match inner.spare.take_or_wait().await {
            Some(Ready {
                mut store,
                instance,
            }) => {
                let deadline = Instant::now() + inner.manifest.limits.timeout;
                let output =
                    store
                        .data_mut()
                        .bind(Arc::clone(&self.bridge), self.call.clone(), deadline);
                store.set_epoch_deadline(1);
                Ok((store, output, Some(instance)))
            }
            None => {
                inner.spare.drain();
                let (store, output) =
                    inner.new_store(Arc::clone(&self.bridge), self.call.clone())?;
                Ok((store, output, None))
            }
        }
    }

    /// Serves one HTTP request with the component's `wasi:http/incoming-handler`, in a fresh
    /// instance (the spare when there is one) with the component's limits, and returns the
    /// response head and body (at most [`MAX_BODY_BYTES`] of it).
    ///
    /// # Errors
    ///
    /// [`InvokeError::UnknownExport`] when the component does not handle HTTP,
    /// [`InvokeError::Busy`] over its concurrency, crashes with their reason, and
    /// [`InvokeError::OutputTooLarge`] for a larger body.
    pub async fn handle_http(
        &self,
        head: &HttpRequestHead,
        body: Bytes,
    ) -> Result<(HttpResponseHead, Bytes), InvokeError> {
        let inner = &*self.inner;
        let handler = inner
            .http_handler
            .ok_or_else(|| InvokeError::UnknownExport {
                component: inner.manifest.name.clone(),
                name: "wasi:http/incoming-handler#handle".to_owned(),
                available: inner.exports.keys().cloned().collect(),
            })?;
        let request = super::http::incoming_request(head, body)
            .map_err(|message| InvokeError::BadRequest { message })?;
        let _permit = self.permit()?;
        let limits = inner.manifest.limits;
        let (mut store, output, instance) = self.store_for().await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        let resources = (|| {
            let mut http = store.data_mut().http();
            let req = http.new_incoming_request(Scheme::Http, request)?;
            let out = http.new_response_outparam(tx)?;
            Ok::<_, wasmtime::Error>((req, out))
        })();
        let (req, out) = resources.map_err(|error| InvokeError::Host {
            error,
            output: GuestOutput::default(),
        })?;
        let call = async {
            let instance = match instance {
                Some(instance) => instance,
                None => inner
                    .pre
                    .instantiate_async(&mut store)
                    .await
                    .map_err(Failure::Instantiate)?,
            };
            let func = instance
                .get_typed_func::<(
                    Resource<HostIncomingRequest>,
                    Resource<HostResponseOutparam>,
                ), ()>(&mut store, handler)
                .map_err(Failure::Instantiate)?;
            func.call_async(&mut store, (req, out))
                .await
                .map_err(Failure::Call)
        };
        let max_body = MAX_BODY_BYTES;
        let response = async {
            let response = match rx.await {
                Ok(Ok(response)) => response,
                Ok(Err(code)) => return Err(HttpFailure::Guest(format!("{code:?}"))),
                Err(_) => return Err(HttpFailure::NoResponse),
            };
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, max_body)
                .collect()
                .await
                .map_err(|e| HttpFailure::Body(e.to_string()))?
                .to_bytes();
            Ok((super::http::response_head(&parts), body))
        };
        let both = async {
            tokio::pin!(call);
            tokio::pin!(response);
            let mut called = false;
            loop {
                tokio::select! {
                    result = &mut call, if !called => {
                        result?;
                        called = true;
                    }
                    result = &mut response => {
                        // Let the guest finish what it does after sending the response.
                        if !called {
                            call.await?;
                        }
                        return Ok(result);
                    }
                }
            }
        };
        let ticking = inner.runtime.ticker.busy();
        let outcome = tokio::time::timeout(limits.timeout + CANCEL_GRACE, both).await;
        drop(ticking);
        inner.usage.record(&store, limits.fuel);
        self.retire(store);
        output.finish();
        match outcome {
            Err(_elapsed) => Err(failed(None, &output, &limits)),
            Ok(Err(failure)) => Err(failed(Some(failure), &output, &limits)),
            Ok(Ok(Ok(answer))) => Ok(answer),
            Ok(Ok(Err(HttpFailure::Body(message)))) if message.contains("length limit") => {
                Err(InvokeError::OutputTooLarge {
                    size: max_body + 1,
                    limit: max_body,
                    output: output.collect(),
                })
            }
            Ok(Ok(Err(failure))) => Err(InvokeError::HttpResponse {
                message: failure.to_string(),
                output: output.collect(),
            }),
        }
    }

    fn lookup(&self, export: &str) -> Result<(&str, &ExportFunc), InvokeError> {
        let exports = &self.inner.exports;
        let found = exports
            .get_key_value(export)
            .or_else(|| {
                if export.contains('#') {
                    return None;
                }
                let (iface, func) = export.rsplit_once('/')?;
                exports.get_key_value(format!("{iface}#{func}").as_str())
            })
            .or_else(|| {
                // `iface@version#func` (or without a version) naming an export of another
                // version: a linked caller may import a version the target does not export.
                let (iface, func) = export.split_once('#')?;
                let iface = strip_version(iface);
                exports.iter().find(|(name, _)| {
                    name.split_once('#')
                        .is_some_and(|(i, f)| f == func && strip_version(i) == iface)
                })
            });
        found
            .map(|(name, func)| (name.as_str(), func))
            .ok_or_else(|| InvokeError::UnknownExport {
                component: self.inner.manifest.name.clone(),
                name: export.to_string(),
                available: exports.keys().cloned().collect(),
            })
    }
}

impl ComponentInner {
    /// A fresh store with the component's limits: memory limiter, fuel, and a wall-clock
    /// deadline checked at every epoch tick.
    fn new_store(
        &self,
        bridge: Arc<dyn CapabilityBridge>,
        call: CallContext,
    ) -> Result<(Store<StoreState>, OutputHandle), InvokeError> {
        let limits = self.manifest.limits;
        let config = &self.runtime.config;
        let deadline = Instant::now() + limits.timeout;
        let state = StoreState::new(
            limits.max_memory,
            config.max_log_bytes,
            bridge,
            deadline,
            call,
            LiveStore::new(&self.runtime.live_stores),
        );
        let output = state.output_handle();
        let mut store = Store::new(&self.runtime.engine, state);
        store.limiter(|state| &mut state.limiter);
        if let Err(error) = store.set_fuel(limits.fuel) {
            return Err(InvokeError::Host {
                error,
                output: GuestOutput::default(),
            });
        }
        store.set_epoch_deadline(1);
        // The store's own deadline, which a store made ahead gets anew when an invocation
        // takes it.
        store.epoch_deadline_callback(|store| {
            Ok(if Instant::now() >= store.data().deadline {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Yield(1)
            })
        });
        Ok((store, output))
    }

    /// A fresh instance in a store of its own, made ahead of the invocation that will take it
    /// (the spare): it grants nothing until an invocation binds it. Instantiation is held to the
    /// component's limits as in an invocation.
    pub(super) async fn prepare(&self) -> Result<Ready, InvokeError> {
        let limits = self.manifest.limits;
        let (mut store, output) = self.new_store(Arc::new(DenyAll), CallContext::default())?;
        let _ticking = self.runtime.ticker.busy();
        let instantiated = tokio::time::timeout(
            limits.timeout + CANCEL_GRACE,
            self.pre.instantiate_async(&mut store),
        )
        .await;
        match instantiated {
            Ok(Ok(instance)) => Ok(Ready { store, instance }),
            Ok(Err(error)) => Err(failed(Some(Failure::Instantiate(error)), &output, &limits)),
            Err(_elapsed) => Err(failed(None, &output, &limits)),
        }
    }
}

enum Failure {
    Instantiate(wasmtime::Error),
    Call(wasmtime::Error),
}

/// The error of an invocation that ran out of time (`None`) or failed, with what it printed.
fn failed(failure: Option<Failure>, output: &OutputHandle, limits: &Limits) -> InvokeError {
    match failure {
        None => InvokeError::Timeout {
            timeout: limits.timeout,
            output: output.collect(),
        },
        Some(Failure::Instantiate(error)) if error.is::<wasmtime::PoolConcurrencyLimitError>() => {
            InvokeError::PoolFull(error)
        }
        Some(Failure::Instantiate(error)) => {
            match InvokeError::from_guest(error, output.collect(), limits.fuel, limits.timeout) {
                InvokeError::Host { error, .. } => InvokeError::Instantiation(error),
                classified => classified,
            }
        }
        Some(Failure::Call(error)) => {
            InvokeError::from_guest(error, output.collect(), limits.fuel, limits.timeout)
        }
    }
}

/// Why an HTTP handler produced no usable response.
#[derive(Debug, thiserror::Error)]
enum HttpFailure {
    #[error("the component answered with error {0}")]
    Guest(String),
    #[error("the component returned without setting a response")]
    NoResponse,
    #[error("the response body could not be read: {0}")]
    Body(String),
}

async fn run(
    pre: &InstancePre<StoreState>,
    store: &mut Store<StoreState>,
    instance: Option<Instance>,
    index: &ComponentExportIndex,
    params: &[Val],
    results: &mut [Val],
) -> Result<(), Failure> {
    let instance = match instance {
        Some(instance) => instance,
        None => pre
            .instantiate_async(&mut *store)
            .await
            .map_err(Failure::Instantiate)?,
    };
    let func = instance.get_func(&mut *store, index).ok_or_else(|| {
        Failure::Instantiate(wasmtime::Error::msg(
            "the instance lacks an export its component type declares",
        ))
    })?;
    func.call_async(&mut *store, params, results)
        .await
        .map_err(Failure::Call)
}

fn convert_args(name: &str, func: &ExportFunc, args: &Value) -> Result<Vec<Val>, InvokeError> {
    let args = match args {
        Value::Array(args) => args.as_slice(),
        // A function without parameters may be called with `null` as well as `[]`.
        Value::Null if func.params.is_empty() => &[],
        _ => {
            return Err(InvokeError::ArgumentsNotArray {
                export: name.to_string(),
                expected: func.params.len(),
            });
        }
    };
    if args.len() != func.params.len() {
        return Err(InvokeError::ArgumentCount {
            export: name.to_string(),
            expected: func.params.len(),
            got: args.len(),
            params: func.params.iter().map(|(n, _)| n.clone()).collect(),
        });
    }
    func.params
        .iter()
        .zip(args)
        .enumerate()
        .map(|(position, ((param, ty), arg))| {
            json_to_val(ty, arg).map_err(|error| InvokeError::ArgumentType {
                export: name.to_string(),
                param: param.clone(),
                position,
                error: Box::new(error),
            })
        })
        .collect()
}

fn collect_exports(runtime: &RuntimeInner, component: &Component) -> BTreeMap<String, ExportFunc> {
    let engine = &runtime.engine;
    let mut exports = BTreeMap::new();
    let ty = component.component_type();
    for (name, item) in ty.exports(engine) {
        match item.ty {
            ComponentItem::ComponentFunc(func) => {
                if let Some(index) = component.get_export_index(None, name) {
                    exports.insert(name.to_string(), export_func(index, &func));
                }
            }
            ComponentItem::ComponentInstance(instance) => {
                let Some(instance_index) = component.get_export_index(None, name) else {
                    continue;
                };
                for (func_name, item) in instance.exports(engine) {
                    if let ComponentItem::ComponentFunc(func) = item.ty
                        && let Some(index) =
                            component.get_export_index(Some(&instance_index), func_name)
                    {
                        exports.insert(format!("{name}#{func_name}"), export_func(index, &func));
                    }
                }
            }
            _ => {}
        }
    }
    exports
}

fn export_func(
    index: ComponentExportIndex,
    func: &wasmtime::component::types::ComponentFunc,
) -> ExportFunc {
    ExportFunc {
        index,
        params: func
            .params()
            .map(|(name, ty)| (name.to_string(), ty))
            .collect(),
        results: func.results().collect(),
    }
}
