//! The data plane of one instance: answering calls and HTTP requests.
//!
//! A call is a NATS request on the instance's (or its component's) `call` subject whose
//! `Trellis-Export` header names the export and whose body is the JSON array of arguments (an
//! empty body is `[]`); an HTTP request comes on the `http` subject (see
//! [`trellis_schemas::dataplane`]). Replies are written by the data-plane codec
//! ([`trellis_bus::dataplane`]): status, a typed error code, a crash reason for crashes, the
//! serving instance, and the result (or a message for people) as body.
//!
//! The same serving period also answers HTTP requests handed over in process
//! ([`Serving::serve_http`]), with the same checks and the same crash handling.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use async_nats::{HeaderMap, HeaderValue, Message};
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{Notify, oneshot};
use trellis_bus::dataplane::{self as codec, NAMES};
use trellis_schemas::Lattice;
use trellis_schemas::capability::rpc::{HttpMessage, HttpRequestHead, HttpResponseHead};
use trellis_schemas::dataplane::{self, DataError, ErrorCode, Op, span_attributes};

use super::logs::InstanceLog;
use super::stats::{Outcome, Stats};
use crate::microvm::vm::{Vm, VmCall, VmEnd};
use crate::runtime::{CallContext, InvokeError, LoadedComponent};
use trellis_bus::telemetry::{Attributes, Kind, Span, StringValue};
use wasmtime::component::Val;

/// The export name under which HTTP requests are served.
const HTTP_EXPORT: &str = "wasi:http/incoming-handler#handle";

/// What a crashing invocation tells its instance's supervisor.
#[derive(Debug)]
pub(crate) struct Crash {
    /// Stable reason (`CrashReason`, as text).
    pub reason: String,
    /// What the runtime said, with the guest's panic message when there is one.
    pub detail: String,
    /// The export that crashed.
    pub export: String,
}

/// One serving period of an instance: from a start (or restart) to the crash or stop that ends
/// it. Calls hold it while they run.
#[derive(Debug)]
pub(crate) struct Serving {
    pub client: async_nats::Client,
    pub component: LoadedComponent,
    /// The same, for the calls this period answers over NATS, which it tidies after.
    tidied: LoadedComponent,
    /// For a micro-VM instance, the VM that runs its invocations (or why there is none): its
    /// guest code never runs in this process.
    microvm: Option<Result<Arc<Vm>, VmEnd>>,
    lattice: Lattice,
    instance: HeaderValue,
    /// The headers of every successful call reply.
    ok: HeaderMap,
    /// Set by the first crash (or the stop): later calls of this period are refused.
    ended: AtomicBool,
    crash: Mutex<Option<oneshot::Sender<Crash>>>,
    in_flight: AtomicUsize,
    idle: Notify,
    /// The instance's counters.
    stats: Arc<Stats>,
    /// The instance's log lines.
    log: Arc<InstanceLog>,
    /// The component's name, for span names.
    name: Arc<str>,
    /// The component's name and the instance's id, as the attributes of every span.
    attributes: Attributes,
    /// The name of the span of each HTTP request, made once.
    http_span: Arc<str>,
}

/// The name of the span of an invocation of `component`'s `export`.
fn span_name(component: &str, export: &str) -> String {
    format!("invoke {component} {export}")
}

/// Counts one call in flight until dropped.
#[derive(Debug)]
pub(crate) struct InFlight<'a>(&'a Serving);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Serving {
    pub fn new(
        client: async_nats::Client,
        component: LoadedComponent,
        microvm: Option<Result<Arc<Vm>, VmEnd>>,
        lattice: Lattice,
        instance_id: &str,
        stats: Arc<Stats>,
        log: Arc<InstanceLog>,
    ) -> (Self, oneshot::Receiver<Crash>) {
        let (tx, rx) = oneshot::channel();
        let instance = HeaderValue::from(instance_id);
        let ok = codec::ok_headers(Some(&instance));
        let name: Arc<str> = Arc::from(component.manifest().name.as_str());
        let attributes = Attributes::new([
            (span_attributes::COMPONENT, Arc::clone(&name)),
            (span_attributes::INSTANCE, Arc::from(instance_id)),
        ]);
        let http_span = Arc::from(span_name(&name, HTTP_EXPORT));
        let serving = Self {
            client,
            tidied: component.tidied_by_caller(),
            component,
            microvm,
            lattice,
            instance,
            ok,
            ended: AtomicBool::new(false),
            crash: Mutex::new(Some(tx)),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
            stats,
            log,
            name,
            attributes,
            http_span,
        };
        (serving, rx)
    }

    /// For a micro-VM instance: ends the period as a crash (`vm_exit`, `vm_timeout`) when its
    /// VM dies, even while no call runs; at once when the VM did not boot.
    pub fn watch_vm(self: &Arc<Self>) {
        match &self.microvm {
            None => {}
            Some(Err(end)) => {
                self.fail("", end.error());
            }
            Some(Ok(vm)) => {
                let mut ended = vm.subscribe();
                let serving = Arc::downgrade(self);
                tokio::spawn(async move {
                    // Ends without a crash when the VM is dropped (the instance stopped).
                    let Ok(end) = ended.wait_for(Option::is_some).await.map(|e| e.clone()) else {
                        return;
                    };
                    if let (Some(serving), Some(end)) = (serving.upgrade(), end)
                        && serving.serving()
                    {
                        serving.fail("", end.error());
                    }
                });
            }
        }
    }

    /// Refuses calls of this period from now on.
    pub fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
    }

    /// Whether this period still takes calls.
    pub fn serving(&self) -> bool {
        !self.ended.load(Ordering::SeqCst)
    }

    /// Waits until no call of this period runs.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Counts a call in flight; call before spawning [`handle`](Self::handle), so that a stop
    /// never misses a call that was delivered but has not begun.
    pub fn enter(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    /// Uncounts a call counted by [`enter`](Self::enter) that was answered elsewhere.
    pub fn leave(&self) {
        drop(InFlight(self));
    }

    /// Answers one call message counted by [`enter`](Self::enter).
    pub async fn handle(&self, message: Message) {
        let _counted = InFlight(self);
        self.answer(message).await;
    }

    /// Tells the caller this instance no longer serves.
    pub async fn refuse(&self, message: Message) {
        codec::reply_error(
            &self.client,
            message.reply,
            &not_running(),
            Some(&self.instance),
        )
        .await;
    }

    async fn answer(&self, message: Message) {
        if !self.serving() {
            return self.refuse(message).await;
        }
        let started = Instant::now();
        // Alone in flight: tidy after answering, so that the next call finds its instance
        // made (see `LoadedComponent::tidy`). Under load the next call does not wait for this
        // one anyway, and each invocation drops its own store at once, as it did without spares.
        let tidy = self.microvm.is_none() && self.in_flight.load(Ordering::SeqCst) <= 1;
        let result = match dataplane::parse_op(&self.lattice, &message.subject) {
            Ok(Op::Call) => {
                let result = self
                    .call(message.headers.as_ref(), &message.payload, tidy)
                    .await;
                self.count(started, result.as_ref().err(), None);
                result.map(|body| (self.ok.clone(), body))
            }
            Ok(Op::Http) => match codec::read_http_request(&message) {
                Ok(request) => {
                    let result = self.http(request, tidy).await;
                    self.count(
                        started,
                        result.as_ref().err(),
                        result.as_ref().ok().map(|r| r.head.status),
                    );
                    match result {
                        Ok(response) => codec::http_reply(&response, Some(&self.instance)),
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            },
            Err(op) => Err(DataError::new(
                ErrorCode::InvalidRequest,
                format!("{op:?} is not a data-plane operation; use .call or .http"),
            )),
        };
        match result {
            Ok((headers, body)) => {
                codec::reply_ok(&self.client, message.reply, headers, body).await
            }
            Err(error) => {
                codec::reply_error(&self.client, message.reply, &error, Some(&self.instance)).await;
            }
        }
        // Once the connection's writer has sent the reply: drop the invocation's store and
        // make the next instance, so that neither waits in the next call's path.
        if tidy {
            tokio::task::yield_now().await;
            self.component.tidy().await;
        }
    }

    /// Calls the export the headers name with the JSON arguments of `payload`; `tidied` as for
    /// [`component`](Self::component).
    async fn call(
        &self,
        headers: Option<&HeaderMap>,
        payload: &Bytes,
        tidied: bool,
    ) -> Result<Bytes, DataError> {
        let Some(export) = codec::header(headers, &NAMES.export) else {
            return Err(DataError::new(
                ErrorCode::InvalidRequest,
                format!(
                    "missing header {}: name the export to call",
                    dataplane::headers::EXPORT
                ),
            ));
        };
        codec::check_size(payload.len())?;
        if let Some(vm) = &self.microvm {
            let mut span = self.span(export, codec::header(headers, &NAMES.traceparent));
            let timeout = self.component.manifest().limits.timeout;
            let result = match vm {
                Ok(vm) => {
                    vm.invoke(export, payload.clone(), self.vm_call(&span, timeout))
                        .await
                }
                Err(end) => Err(end.error()),
            };
            return result.map_err(|error| {
                let error = self.fail(export, error);
                span.fail(error.message.clone());
                error
            });
        }
        let args = if payload.iter().all(u8::is_ascii_whitespace) {
            Value::Array(Vec::new())
        } else {
            serde_json::from_slice::<Value>(payload).map_err(|e| {
                DataError::new(
                    ErrorCode::InvalidRequest,
                    format!("the body must be a JSON array of arguments: {e}"),
                )
            })?
        };
        let mut span = self.span(export, codec::header(headers, &NAMES.traceparent));
        let value = self
            .component(&span, tidied)
            .invoke(export, args)
            .await
            .map_err(|error| {
                let error = self.fail(export, error);
                span.fail(error.message.clone());
                error
            })?;
        serde_json::to_vec(&value).map(Bytes::from).map_err(|e| {
            DataError::new(
                ErrorCode::Internal,
                format!("cannot encode the result: {e}"),
            )
        })
    }

    /// The component for one invocation, which `span` traces: its output lines go to the
    /// instance's log, labelled with the invocation's number and trace id, and its capability
    /// calls carry the span's trace context. `tidied` when the caller tidies after answering
    /// (the calls and HTTP requests of the data plane, see [`LoadedComponent::tidy`]).
    fn component(&self, span: &Span, tidied: bool) -> std::borrow::Cow<'_, LoadedComponent> {
        let traceparent: Option<Arc<str>> = span.traceparent().map(Arc::from);
        let log = self
            .log
            .enabled()
            .then(|| self.log.invocation(traceparent.clone()));
        let component = if tidied {
            &self.tidied
        } else {
            &self.component
        };
        if log.is_none() && traceparent.is_none() {
            return std::borrow::Cow::Borrowed(component);
        }
        std::borrow::Cow::Owned(component.with_call(CallContext { log, traceparent }))
    }

    /// The span of one invocation of `export`, child of the request's `traceparent`.
    fn span(&self, export: &str, traceparent: Option<&str>) -> Span {
        Span::start_with(
            Kind::Server,
            traceparent,
            || -> StringValue {
                if export == HTTP_EXPORT {
                    Arc::clone(&self.http_span).into()
                } else {
                    span_name(&self.name, export).into()
                }
            },
            &self.attributes,
        )
    }

    /// Serves an HTTP request with the component's `wasi:http/incoming-handler`.
    async fn http(
        &self,
        request: HttpMessage<HttpRequestHead>,
        tidied: bool,
    ) -> Result<HttpMessage<HttpResponseHead>, DataError> {
        codec::check_size(request.body.len())?;
        let traceparent = request
            .head
            .headers
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(dataplane::headers::TRACEPARENT))
            .map(|(_, value)| value.as_str());
        let mut span = self.span(HTTP_EXPORT, traceparent);
        let result = match &self.microvm {
            None => {
                self.component(&span, tidied)
                    .handle_http(&request.head, request.body)
                    .await
            }
            Some(Ok(vm)) => {
                let timeout = self.component.manifest().limits.timeout;
                vm.http(request, self.vm_call(&span, timeout)).await
            }
            Some(Err(end)) => Err(end.error()),
        };
        let result = result
            .map(|(head, body)| HttpMessage { head, body })
            .map_err(|error| self.fail(HTTP_EXPORT, error));
        match &result {
            Ok(response) => span.set("http.response.status_code", i64::from(response.head.status)),
            Err(error) => span.fail(error.message.clone()),
        }
        result
    }

    /// Serves an HTTP request handed over in process (no NATS), counted in flight like a
    /// message; refused once the period has ended.
    pub async fn serve_http(
        &self,
        request: HttpMessage<HttpRequestHead>,
    ) -> Result<HttpMessage<HttpResponseHead>, DataError> {
        self.enter();
        let _counted = InFlight(self);
        if !self.serving() {
            return Err(not_running());
        }
        let started = Instant::now();
        let result = self.http(request, false).await;
        self.count(
            started,
            result.as_ref().err(),
            result.as_ref().ok().map(|r| r.head.status),
        );
        result
    }

    /// Serves a linked call from another instance of this process: the arguments are the
    /// caller's values, checked against the export's types, and nothing is encoded. Counted
    /// in flight and as an invocation like a message; a crash ends the period as for any call.
    pub async fn call_linked(
        &self,
        export: &str,
        params: &[Val],
        traceparent: Option<&str>,
    ) -> Result<Vec<Val>, DataError> {
        self.enter();
        let _counted = InFlight(self);
        if !self.serving() {
            return Err(not_running());
        }
        let started = Instant::now();
        let mut span = self.span(export, traceparent);
        let result = match &self.microvm {
            None => {
                self.component(&span, false)
                    .invoke_vals(export, params)
                    .await
            }
            Some(vm) => self.call_vm_vals(vm, export, params, &span).await,
        };
        let result = result.map_err(|error| {
            let error = self.fail(export, error);
            span.fail(error.message.clone());
            error
        });
        self.count(started, result.as_ref().err(), None);
        result
    }

    /// The context of one invocation sent into this instance's VM: its trace, and the
    /// instance's log for its output, labelled as an in-process invocation's would be.
    fn vm_call<'a>(&self, span: &'a Span, timeout: std::time::Duration) -> VmCall<'a> {
        let traceparent = span.traceparent();
        VmCall {
            traceparent,
            timeout,
            log: self
                .log
                .enabled()
                .then(|| self.log.invocation(traceparent.map(Arc::from))),
        }
    }

    /// A linked call into this micro-VM instance: the values cross as the JSON a call takes.
    async fn call_vm_vals(
        &self,
        vm: &Result<Arc<Vm>, VmEnd>,
        export: &str,
        params: &[Val],
        span: &Span,
    ) -> Result<Vec<Val>, InvokeError> {
        let vm = vm.as_ref().map_err(VmEnd::error)?;
        let args = self.component.encode_vals(export, params)?;
        let timeout = self.component.manifest().limits.timeout;
        let json = vm
            .invoke(export, Bytes::from(args), self.vm_call(span, timeout))
            .await?;
        self.component.decode_results(export, &json)
    }

    /// Counts an invocation that started at `started`: failed when it ended in an error of the
    /// server's side (HTTP status 500 or more) or the component answered such a status,
    /// rejected for an error of the caller's side.
    fn count(&self, started: Instant, error: Option<&DataError>, status: Option<u16>) {
        let outcome = match (error.map(|e| e.code.http_status()), status) {
            (Some(code), _) if code >= 500 => Outcome::Failed,
            (Some(_), _) => Outcome::Rejected,
            (None, Some(status)) if status >= 500 => Outcome::Failed,
            (None, _) => Outcome::Ok,
        };
        self.stats.record(started.elapsed(), outcome);
    }

    /// The error a failed invocation answers with; a crash ends the serving period and tells
    /// the supervisor.
    pub fn fail(&self, export: &str, error: InvokeError) -> DataError {
        let Some(reason) = error.crash_reason() else {
            return DataError::new(error.code(), error.to_string());
        };
        let detail = error.detail();
        self.stats.crashed();
        // Only the first crash of the period reaches the supervisor.
        self.end();
        let tx = self
            .crash
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(tx) = tx {
            let _ = tx.send(Crash {
                reason: reason.to_string(),
                detail: detail.clone(),
                export: export.to_owned(),
            });
        }
        DataError::crash(reason, detail)
    }
}

fn not_running() -> DataError {
    DataError::new(ErrorCode::NotRunning, "the instance is not running; retry")
}
