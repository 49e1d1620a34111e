//! `trellis-provider-http-server`: HTTP in front of components' `wasi:http/incoming-handler`.
//!
//! For every assignment of this provider (`address=<ip>:<port>`) the provider listens on that
//! address (HTTP/1.1, keep-alive) and sends each request to the assignment's target over NATS:
//! `trellis.rpc.v1.<lattice>.component.<name>.http` (any instance of the component, on any
//! host, through its queue group) or `trellis.rpc.v1.<lattice>.instance.<id>.http` (one
//! instance). The request head travels as JSON in the `Trellis-Http` header and the body as
//! payload; the reply carries the response head the same way (see
//! [`trellis_bus::dataplane`]).
//!
//! Embedded in a host ([`HttpServerProvider::embedded`]), the provider hands a request to an
//! instance of that host's own process when one serves the target ([`LocalTargets`]), without
//! NATS, and falls back to the lattice otherwise.
//!
//! Failures answer with the HTTP status of their data-plane error code
//! ([`ErrorCode::http_status`]):
//!
//! | outcome | HTTP status |
//! |---|---|
//! | the component answered | its status, headers and body |
//! | `timeout` (the invocation ran out of time, or no reply within 30 s) | 504 |
//! | `busy`, `not_running` | 503 |
//! | `no_instance` (nothing serves the target), `unknown_component` (never pushed) | 503, the body says which |
//! | `crashed` (trap, fuel, memory, stack, panic) | 500 |
//! | request body over 1 MiB (`payload_too_large`) | 413 |
//! | any other code | its status (see [`ErrorCode`]) |
//!
//! A revocation closes the listener (open connections finish their current request). A second
//! assignment on an address already served is refused with an error in the log and does not
//! disturb the first.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_nats::Subject;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};
use trellis_bus::RouteTable;
use trellis_bus::dataplane::{self as codec, SendError};
use trellis_bus::telemetry::{Attributes, Kind, Span};
use trellis_provider_sdk::{Call, Context, DataError, ErrorCode, Outcome, Provider, ProviderInfo};
use trellis_schemas::capability::rpc::{HttpMessage, HttpRequestHead, HttpResponseHead};
use trellis_schemas::dataplane::{self, MAX_BODY_BYTES, Op};
use trellis_schemas::{
    AssignmentId, AssignmentRecord, AssignmentTarget, Capability, ComponentName, FactData,
    FactKind, subject,
};

/// What this provider is.
pub const INFO: ProviderInfo = ProviderInfo {
    name: "http-server",
    version: env!("CARGO_PKG_VERSION"),
    capabilities: &[Capability::HttpIncoming],
    rpc: &[],
    // It parses HTTP from many connections: a thread per core.
    workers: 0,
};

/// How long a request waits for the component.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Beyond a component's own invocation timeout, how long a request may go unanswered before
/// it is taken as lost and sent again.
const LOST_MARGIN: Duration = Duration::from_secs(1);

/// How often listeners that could not bind are tried again.
const RETRY_BIND: Duration = Duration::from_secs(5);

/// A boxed future of an in-process HTTP request.
pub type LocalFuture<'a> =
    Pin<Box<dyn Future<Output = Result<HttpMessage<HttpResponseHead>, DataError>> + Send + 'a>>;

/// Instances of the process this provider is embedded in, which it can hand requests to
/// without NATS.
pub trait LocalTargets: Send + Sync + fmt::Debug + 'static {
    /// Serves `request` on an instance of this process that serves `target` (and runs version
    /// `digest`, when a rollout's weights chose one), or gives the request back (`Err`) when none
    /// does, so that it goes over NATS.
    #[allow(
        clippy::result_large_err,
        reason = "the request is given back whole so that it can go over NATS without a copy"
    )]
    fn serve(
        &self,
        target: &AssignmentTarget,
        digest: Option<&str>,
        request: HttpMessage<HttpRequestHead>,
    ) -> Result<LocalFuture<'_>, HttpMessage<HttpRequestHead>>;

    /// The rollout routes this process already follows, if any, so that the provider does not
    /// follow the same facts a second time.
    fn routes(&self) -> Option<RouteTable> {
        None
    }
}

/// The provider.
#[derive(Debug)]
pub struct HttpServerProvider {
    local: Option<Arc<dyn LocalTargets>>,
}

impl HttpServerProvider {
    /// A provider in its own process; its listeners follow the assignments once it runs.
    pub async fn new(_ctx: Context) -> anyhow::Result<Self> {
        Ok(Self { local: None })
    }

    /// A provider embedded in a host: requests go to `local`'s instances when they serve the
    /// target, over NATS otherwise.
    pub fn embedded(local: Arc<dyn LocalTargets>) -> Self {
        Self { local: Some(local) }
    }
}

impl Provider for HttpServerProvider {
    async fn handle(&self, call: Call) -> Outcome {
        Err(DataError::invalid(format!(
            "{} is served by listening, not by RPC",
            call.capability()
        )))
    }

    async fn run(self: Arc<Self>, ctx: Context) {
        let known = Arc::new(KnownComponents::default());
        let follower =
            tokio::spawn(Arc::clone(&known).follow(ctx.client.clone(), ctx.lattice.clone()));
        // Embedded, the host's table serves; otherwise this process follows the facts itself.
        let (routes, routes_follower) = match self.local.as_ref().and_then(|l| l.routes()) {
            Some(routes) => (routes, None),
            None => {
                let (routes, task) = RouteTable::follow(&ctx.client, &ctx.lattice);
                (routes, Some(task))
            }
        };
        let mut changes = ctx.assignments.changes();
        let mut listeners: HashMap<AssignmentId, Listener> = HashMap::new();
        let mut reported: HashSet<AssignmentId> = HashSet::new();
        let mut retry = tokio::time::interval(RETRY_BIND);
        loop {
            reconcile(&ctx, &self, &known, &routes, &mut listeners, &mut reported).await;
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = retry.tick() => {}
                () = ctx.shutdown() => break,
            }
        }
        follower.abort();
        if let Some(task) = routes_follower {
            task.abort();
        }
        let tasks: Vec<JoinHandle<()>> = listeners
            .into_values()
            .map(|l| {
                let _ = l.stop.send(true);
                l.task
            })
            .collect();
        futures::future::join_all(tasks).await;
    }
}

/// The components pushed to the lattice, by name (from the `artifact.stored` facts), so that a
/// request nobody serves can say whether the component is unknown or merely not running.
#[derive(Debug, Default)]
struct KnownComponents {
    /// Every component pushed, with the longest invocation timeout of its versions.
    names: RwLock<HashMap<ComponentName, Duration>>,
    next_seq: std::sync::atomic::AtomicU64,
}

impl KnownComponents {
    fn knows(&self, name: &ComponentName) -> bool {
        self.names
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(name)
    }

    /// How long a request to `name` may go unanswered before it is taken as lost: its longest
    /// invocation timeout (an instance answers `timeout` itself by then) and a margin.
    fn patience(&self, name: &ComponentName) -> Duration {
        self.names
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
            .map_or(REQUEST_TIMEOUT, |t| (*t + LOST_MARGIN).min(REQUEST_TIMEOUT))
    }

    async fn follow(
        self: Arc<Self>,
        client: async_nats::Client,
        lattice: trellis_schemas::Lattice,
    ) {
        use std::sync::atomic::Ordering;
        trellis_bus::follow(
            &client,
            &subject::events_stream(&lattice),
            &[subject::events_of_kind(&lattice, FactKind::ArtifactStored)],
            || self.next_seq.load(Ordering::SeqCst).max(1),
            |followed| {
                self.next_seq.store(followed.seq + 1, Ordering::SeqCst);
                if let Ok(event) = followed.event
                    && let FactData::ArtifactStored(stored) = event.data
                {
                    let timeout = Duration::from_millis(stored.manifest.timeout_ms);
                    let mut names = self.names.write().unwrap_or_else(PoisonError::into_inner);
                    let known = names.entry(stored.manifest.name).or_default();
                    *known = (*known).max(timeout);
                }
            },
        )
        .await;
    }
}

/// One bound listener.
#[derive(Debug)]
struct Listener {
    address: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
    /// Completes when the task has closed the listening socket (before its open connections
    /// finish), so the address can be bound again.
    released: oneshot::Receiver<()>,
}

/// How long binding an address waits for a revoked listener on it to close its socket.
const RELEASE_WAIT: Duration = Duration::from_secs(2);

/// Brings the listeners in line with the assignments in force.
async fn reconcile(
    ctx: &Context,
    provider: &HttpServerProvider,
    known: &Arc<KnownComponents>,
    routes: &RouteTable,
    listeners: &mut HashMap<AssignmentId, Listener>,
    reported: &mut HashSet<AssignmentId>,
) {
    let mine: Vec<AssignmentRecord> = ctx.assignments.mine(Capability::HttpIncoming);
    let ids: HashSet<&AssignmentId> = mine.iter().map(|r| &r.assignment.assignment_id).collect();
    // Listeners being closed, by address: a grant that replaces a revoked one on the same
    // address (an instance replaced by another) binds once the old socket is closed, rather
    // than fail to bind and wait for the next retry.
    let mut closing: Vec<(SocketAddr, oneshot::Receiver<()>)> = Vec::new();
    for (id, listener) in listeners.extract_if(|id, _| !ids.contains(id)) {
        tracing::info!(assignment = %id, address = %listener.address, "assignment revoked; closing the listener");
        let _ = listener.stop.send(true);
        closing.push((listener.address, listener.released));
    }
    reported.retain(|id| ids.contains(id));
    // Oldest grant first, so that of two assignments on one address the first keeps it.
    let mut pending: Vec<&AssignmentRecord> = mine
        .iter()
        .filter(|r| !listeners.contains_key(&r.assignment.assignment_id))
        .collect();
    pending.sort_by_key(|r| r.granted_seq);
    for record in pending {
        let assignment = &record.assignment;
        let id = &assignment.assignment_id;
        let raw = assignment
            .config
            .get("address")
            .map(String::as_str)
            .unwrap_or_default();
        let Ok(address) = raw.parse::<SocketAddr>() else {
            if reported.insert(id.clone()) {
                tracing::error!(assignment = %id, address = %raw, "not an address to listen on");
            }
            continue;
        };
        if let Some((other, _)) = listeners.iter().find(|(_, l)| l.address == address) {
            if reported.insert(id.clone()) {
                tracing::error!(assignment = %id, %address, served_for = %other, "address already served for another assignment; refusing this one");
            }
            continue;
        }
        if let Some(at) = closing.iter().position(|(closed, _)| *closed == address) {
            let (_, released) = closing.swap_remove(at);
            let _ = tokio::time::timeout(RELEASE_WAIT, released).await;
        }
        let listener = match TcpListener::bind(address).await {
            Ok(listener) => listener,
            Err(e) => {
                if reported.insert(id.clone()) {
                    tracing::error!(assignment = %id, %address, error = %e, "cannot listen; retrying every {RETRY_BIND:?}");
                }
                continue;
            }
        };
        reported.remove(id);
        tracing::info!(assignment = %id, %address, target = %assignment.target.describe(), "listening");
        let target = Arc::new(Target {
            client: ctx.client.clone(),
            subject: Subject::from(dataplane::target_subject(
                &ctx.lattice,
                &assignment.target,
                Op::Http,
            )),
            attributes: Attributes::new([(
                dataplane::span_attributes::TARGET,
                Arc::from(assignment.target.describe()),
            )]),
            target: assignment.target.clone(),
            lattice: ctx.lattice.clone(),
            known: Arc::clone(known),
            routes: routes.clone(),
            local: provider.local.clone(),
        });
        let (stop, stopped) = watch::channel(false);
        let (release, released) = oneshot::channel();
        let task = tokio::spawn(serve(listener, target, stopped, release));
        listeners.insert(
            id.clone(),
            Listener {
                address,
                stop,
                task,
                released,
            },
        );
    }
}

/// Accepts connections until stopped, then closes the listening socket (and says so on
/// `released`) and waits for the open connections to finish.
async fn serve(
    listener: TcpListener,
    target: Arc<Target>,
    mut stop: watch::Receiver<bool>,
    released: oneshot::Sender<()>,
) {
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    connections.spawn(connection(stream, Arc::clone(&target), stop.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            changed = stop.changed() => if changed.is_err() || *stop.borrow() { break },
        }
    }
    drop(listener);
    let _ = released.send(());
    while connections.join_next().await.is_some() {}
}

/// Serves one connection; on stop, finishes the request in progress and closes.
async fn connection(stream: TcpStream, target: Arc<Target>, mut stop: watch::Receiver<bool>) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request| {
        let target = Arc::clone(&target);
        async move { Ok::<_, Infallible>(target.dispatch(request).await) }
    });
    let conn = http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    tokio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            return;
        }
        () = stopped => {}
    }
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

/// Where one listener sends its requests.
#[derive(Debug)]
struct Target {
    client: async_nats::Client,
    /// The subject of the target: any instance of the component, or the one instance.
    subject: Subject,
    target: AssignmentTarget,
    /// What the target is, as an attribute of the span of each of its requests.
    attributes: Attributes,
    lattice: trellis_schemas::Lattice,
    known: Arc<KnownComponents>,
    /// The weights of rollouts in progress, which pick a version per request.
    routes: RouteTable,
    local: Option<Arc<dyn LocalTargets>>,
}

/// A request method's name, shared for the standard methods rather than copied per request.
fn method_name(method: &hyper::Method) -> std::borrow::Cow<'static, str> {
    const STANDARD: [&str; 9] = [
        "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
    ];
    match STANDARD.iter().find(|name| **name == method.as_str()) {
        Some(name) => std::borrow::Cow::Borrowed(name),
        None => std::borrow::Cow::Owned(method.as_str().to_owned()),
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(body.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// Headers that describe one hop, not the message: never passed on.
fn hop_by_hop(name: &str) -> bool {
    name.eq_ignore_ascii_case("connection")
        || name.eq_ignore_ascii_case("keep-alive")
        || name.eq_ignore_ascii_case("transfer-encoding")
        || name.eq_ignore_ascii_case("upgrade")
        || name.eq_ignore_ascii_case("content-length")
}

/// The response a failed request gets: the code's HTTP status, and a body that names the code
/// (and, for failures of the lattice rather than of the guest, what to do). A crash's details
/// stay in the host's log and facts: they are not for the HTTP client.
pub fn error_response(error: &DataError) -> Response<Full<Bytes>> {
    let status =
        StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = match error.code {
        ErrorCode::NoInstance
        | ErrorCode::UnknownComponent
        | ErrorCode::Busy
        | ErrorCode::NotRunning
        | ErrorCode::Timeout
        | ErrorCode::PayloadTooLarge => format!("{}: {}\n", error.code, error.message),
        _ => match &error.reason {
            Some(reason) => format!("component error: {} ({reason})\n", error.code),
            None => format!("component error: {}\n", error.code),
        },
    };
    text(status, body)
}

/// [`HttpRequestHead`] borrowed from the request, so that encoding it copies nothing first.
#[derive(Debug, Serialize)]
struct RequestHead<'a> {
    method: &'a str,
    uri: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    authority: Option<&'a str>,
    headers: Vec<(&'a str, &'a str)>,
}

impl<'a> RequestHead<'a> {
    fn of(parts: &'a http::request::Parts) -> Self {
        let authority = parts
            .headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .or_else(|| parts.uri.authority().map(|a| a.as_str()));
        Self {
            method: parts.method.as_str(),
            uri: parts.uri.path_and_query().map_or("/", |p| p.as_str()),
            authority,
            headers: parts
                .headers
                .iter()
                .filter_map(|(k, v)| Some((k.as_str(), v.to_str().ok()?)))
                .collect(),
        }
    }

    fn to_owned_head(&self) -> HttpRequestHead {
        HttpRequestHead {
            method: self.method.to_owned(),
            uri: self.uri.to_owned(),
            authority: self.authority.map(str::to_owned),
            headers: self
                .headers
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            timeout_ms: None,
        }
    }
}

impl Target {
    async fn dispatch(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let too_large = || {
            error_response(&DataError::too_large(format!(
                "the request body is over {MAX_BODY_BYTES} bytes"
            )))
        };
        if declared.is_some_and(|n| n > MAX_BODY_BYTES as u64) {
            return too_large();
        }
        let body = match Limited::new(body, MAX_BODY_BYTES).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => return too_large(),
            Err(e) => {
                tracing::debug!(error = %e, "cannot read a request body");
                return text(StatusCode::BAD_REQUEST, "cannot read the request body\n");
            }
        };
        let incoming = parts
            .headers
            .get(dataplane::headers::TRACEPARENT)
            .and_then(|v| v.to_str().ok());
        let method = method_name(&parts.method);
        let mut span =
            Span::start_with(Kind::Server, incoming, || method.clone(), &self.attributes);
        if span.recording() {
            span.set("http.request.method", method);
            span.set("url.path", parts.uri.path().to_owned());
        }
        let mut head = RequestHead::of(&parts);
        // The component's invocation is a child of this request's span.
        if let Some(ours) = span.traceparent()
            && Some(ours) != incoming
        {
            head.headers
                .retain(|(name, _)| !name.eq_ignore_ascii_case(dataplane::headers::TRACEPARENT));
            head.headers.push((dataplane::headers::TRACEPARENT, ours));
        }
        // While a rollout splits the component's traffic, the weights pick a version.
        let version = match &self.target {
            AssignmentTarget::Component(name) => self
                .routes
                .version(&self.lattice, name, Op::Http)
                .map(|(digest, subject)| (digest, Subject::from(subject))),
            AssignmentTarget::Instance(_) => None,
        };
        let digest = version.as_ref().map(|(d, _)| d.as_str());
        let result = match &self.local {
            Some(local) => {
                let request = HttpMessage {
                    head: head.to_owned_head(),
                    body: body.clone(),
                };
                match local.serve(&self.target, digest, request) {
                    Ok(served) => match served.await {
                        // A local instance that cannot take the request now (it never ran
                        // there) leaves it to the others on the lattice.
                        Err(e) if matches!(e.code, ErrorCode::Busy | ErrorCode::NotRunning) => {
                            self.send(version.as_ref(), &head, body).await
                        }
                        other => other,
                    },
                    Err(_) => self.send(version.as_ref(), &head, body).await,
                }
            }
            None => self.send(version.as_ref(), &head, body).await,
        };
        let response = match result {
            Ok(response) => respond(response),
            Err(error) => {
                tracing::debug!(%error, subject = %self.subject, "request failed");
                span.fail(format!("{}: {}", error.code, error.message));
                error_response(&error)
            }
        };
        span.set(
            "http.response.status_code",
            i64::from(response.status().as_u16()),
        );
        response
    }

    /// Sends the request over NATS, to `version`'s subject when the weights chose one, and
    /// reads the reply. An instance that stopped serving between routing and delivery
    /// (`not_running`), or a version that no instance serves any more, is retried once on the
    /// target's own subject, which every serving instance takes.
    async fn send(
        &self,
        version: Option<&(String, Subject)>,
        head: &RequestHead<'_>,
        body: Bytes,
    ) -> Result<HttpMessage<HttpResponseHead>, DataError> {
        let first = version.map_or(&self.subject, |(_, subject)| subject);
        let patience = match &self.target {
            AssignmentTarget::Component(name) => self.known.patience(name),
            AssignmentTarget::Instance(_) => REQUEST_TIMEOUT,
        };
        match self.send_to(first, head, body.clone(), patience).await {
            Err(e)
                if e.code == ErrorCode::NotRunning
                    || (version.is_some() && e.code == ErrorCode::NoInstance) =>
            {
                self.send_to(&self.subject, head, body, REQUEST_TIMEOUT)
                    .await
            }
            // No answer, not even the instance's own `timeout`: the request was lost (an
            // instance unsubscribing while it was on the wire to it). Once more.
            Err(e)
                if e.code == ErrorCode::Timeout
                    && e.reason.is_none()
                    && patience < REQUEST_TIMEOUT =>
            {
                tracing::debug!(subject = %first, "no answer in {patience:?}; sending again");
                self.send_to(&self.subject, head, body, REQUEST_TIMEOUT)
                    .await
            }
            other => other,
        }
    }

    async fn send_to(
        &self,
        subject: &Subject,
        head: &RequestHead<'_>,
        body: Bytes,
        timeout: Duration,
    ) -> Result<HttpMessage<HttpResponseHead>, DataError> {
        let (headers, body) = codec::http_request(head, body)?;
        let reply = codec::request(&self.client, subject.clone(), headers, body, timeout)
            .await
            .map_err(|e| match e {
                SendError::NoResponders => self.nobody_serves(),
                SendError::TimedOut(t) => {
                    tracing::warn!(%subject, "no answer within {t:?}");
                    DataError::new(
                        ErrorCode::Timeout,
                        format!("the component did not answer within {t:?}"),
                    )
                }
                SendError::Failed(e) => {
                    tracing::warn!(error = %e, %subject, "request failed");
                    DataError::new(ErrorCode::Upstream, "cannot reach the component")
                }
            })?;
        codec::read_http_reply(reply)
    }

    /// The error of a request nothing on the lattice serves.
    fn nobody_serves(&self) -> DataError {
        match &self.target {
            AssignmentTarget::Component(name) if !self.known.knows(name) => DataError::new(
                ErrorCode::UnknownComponent,
                format!(
                    "component {name} is not known to the lattice; push it with `trellis component push`"
                ),
            ),
            AssignmentTarget::Component(name) => DataError::new(
                ErrorCode::NoInstance,
                format!(
                    "no instance of component {name} is running; start one with `trellis instance start {name}`"
                ),
            ),
            AssignmentTarget::Instance(id) => DataError::new(
                ErrorCode::NoInstance,
                format!("instance {id} is not running"),
            ),
        }
    }
}

/// The HTTP response of a component's answer.
fn respond(answer: HttpMessage<HttpResponseHead>) -> Response<Full<Bytes>> {
    let HttpMessage { head, body } = answer;
    let mut response = Response::new(Full::new(body));
    *response.status_mut() = StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
    let headers = response.headers_mut();
    headers.reserve(head.headers.len());
    for (name, value) in head.headers {
        if hop_by_hop(&name) {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            headers.append(name, value);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrowed_heads_match_the_protocol() {
        let request = Request::builder()
            .method("POST")
            .uri("/a/b?c=d")
            .header("host", "example.test:8080")
            .header("x-one", "1")
            .header("x-one", "2")
            .body(())
            .expect("request");
        let (parts, ()) = request.into_parts();
        let json = serde_json::to_string(&RequestHead::of(&parts)).expect("json");
        let head: HttpRequestHead = serde_json::from_str(&json).expect("protocol head");
        assert_eq!(head.method, "POST");
        assert_eq!(head.uri, "/a/b?c=d");
        assert_eq!(head.authority.as_deref(), Some("example.test:8080"));
        assert_eq!(head.headers.len(), 3);
        assert_eq!(head.timeout_ms, None);
        assert_eq!(RequestHead::of(&parts).to_owned_head(), head);
    }

    #[test]
    fn error_codes_map_to_statuses_and_bodies() {
        use trellis_schemas::CrashReason;
        let status = |e: DataError| error_response(&e).status().as_u16();
        assert_eq!(status(DataError::new(ErrorCode::Busy, "")), 503);
        assert_eq!(status(DataError::new(ErrorCode::NotRunning, "")), 503);
        assert_eq!(status(DataError::crash(CrashReason::Panic, "")), 500);
        assert_eq!(status(DataError::crash(CrashReason::Timeout, "")), 504);
        assert_eq!(status(DataError::too_large("")), 413);
        let secret = DataError::crash(CrashReason::FuelExhausted, "stderr: secret");
        let response = error_response(&secret);
        let body = futures::executor::block_on(response.into_body().collect())
            .expect("body")
            .to_bytes();
        assert_eq!(&body[..], b"component error: crashed (fuel_exhausted)\n");
    }
}
