//! `trellis-provider-http-server`: HTTP in front of components' `wasi:http/incoming-handler`.
//!
//! For every assignment of this provider (`address=<ip>:<port>`) the provider listens on that
//! address (HTTP/1.1, keep-alive) and sends each request to the assignment's target over NATS:
//! `trellis.rpc.v1.<lattice>.component.<name>.http` (any instance of the component, on any
//! host, through its queue group) or `trellis.rpc.v1.<lattice>.instance.<id>.http` (one
//! instance). The request head travels as JSON in the `Trellis-Http` header and the body as
//! payload; the reply carries the response head the same way.
//!
//! | outcome | HTTP status |
//! |---|---|
//! | `Trellis-Status: ok` | the component's status, headers and body |
//! | error `busy`, `not_running`; nobody serves the subject | 503 |
//! | error `crashed` | 500 |
//! | error `timeout`; no reply within 30 s | 504 |
//! | any other error | 502 |
//! | request body over 1 MiB | 413 |
//!
//! A revocation closes the listener (open connections finish their current request). A second
//! assignment on an address already served is refused with an error in the log and does not
//! disturb the first.

use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use trellis_provider_sdk::{Call, Context, Provider, ProviderInfo, Reply, RpcError};
use trellis_schemas::capability::rpc;
use trellis_schemas::instance::dataplane;
use trellis_schemas::{AssignmentId, AssignmentRecord, AssignmentTarget, Capability};

/// What this provider is.
pub const INFO: ProviderInfo = ProviderInfo {
    name: "http-server",
    version: env!("CARGO_PKG_VERSION"),
    capabilities: &[Capability::HttpIncoming],
    rpc: &[],
};

/// How long a request waits for the component.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How often listeners that could not bind are tried again.
const RETRY_BIND: Duration = Duration::from_secs(5);

static HTTP_HEAD: async_nats::header::HeaderName =
    async_nats::header::HeaderName::from_static(rpc::HTTP_HEAD);
static STATUS: async_nats::header::HeaderName =
    async_nats::header::HeaderName::from_static(dataplane::STATUS);
static ERROR_CODE: async_nats::header::HeaderName =
    async_nats::header::HeaderName::from_static(dataplane::ERROR_CODE);

/// The provider.
#[derive(Debug)]
pub struct HttpServerProvider;

impl HttpServerProvider {
    /// A provider; its listeners follow the assignments once it runs.
    pub async fn new(_ctx: Context) -> anyhow::Result<Self> {
        Ok(Self)
    }
}

impl Provider for HttpServerProvider {
    async fn handle(&self, call: Call) -> Result<Reply, RpcError> {
        Err(RpcError::invalid(format!(
            "{} is served by listening, not by RPC",
            call.capability
        )))
    }

    async fn run(self: Arc<Self>, ctx: Context) {
        let mut changes = ctx.assignments.changes();
        let mut listeners: HashMap<AssignmentId, Listener> = HashMap::new();
        let mut reported: HashSet<AssignmentId> = HashSet::new();
        let mut retry = tokio::time::interval(RETRY_BIND);
        loop {
            reconcile(&ctx, &mut listeners, &mut reported).await;
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                _ = retry.tick() => {}
                () = ctx.shutdown() => break,
            }
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

/// One bound listener.
#[derive(Debug)]
struct Listener {
    address: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// Brings the listeners in line with the assignments in force.
async fn reconcile(
    ctx: &Context,
    listeners: &mut HashMap<AssignmentId, Listener>,
    reported: &mut HashSet<AssignmentId>,
) {
    let mine: Vec<AssignmentRecord> = ctx.assignments.mine(Capability::HttpIncoming);
    let ids: HashSet<&AssignmentId> = mine.iter().map(|r| &r.assignment.assignment_id).collect();
    listeners.retain(|id, listener| {
        let keep = ids.contains(id);
        if !keep {
            tracing::info!(assignment = %id, address = %listener.address, "assignment revoked; closing the listener");
            let _ = listener.stop.send(true);
        }
        keep
    });
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
        let (subject, name) = match &assignment.target {
            AssignmentTarget::Component(c) => (
                rpc::component_http(&ctx.lattice, c),
                format!("component {c}"),
            ),
            AssignmentTarget::Instance(i) => {
                (rpc::instance_http(&ctx.lattice, i), format!("instance {i}"))
            }
        };
        tracing::info!(assignment = %id, %address, target = %assignment.target.describe(), "listening");
        let target = Arc::new(Target {
            client: ctx.client.clone(),
            subject: Subject::from(subject),
            unavailable: Bytes::from(format!("no instance of {name} is running\n")),
        });
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(serve(listener, target, stopped));
        listeners.insert(
            id.clone(),
            Listener {
                address,
                stop,
                task,
            },
        );
    }
}

/// Accepts connections until stopped, then waits for the open ones to finish.
async fn serve(listener: TcpListener, target: Arc<Target>, mut stop: watch::Receiver<bool>) {
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
    subject: Subject,
    unavailable: Bytes,
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

/// The HTTP status an error code of the data plane becomes.
pub fn status_of(code: &str) -> StatusCode {
    match code {
        "busy" | "not_running" => StatusCode::SERVICE_UNAVAILABLE,
        "crashed" => StatusCode::INTERNAL_SERVER_ERROR,
        "timeout" => StatusCode::GATEWAY_TIMEOUT,
        _ => StatusCode::BAD_GATEWAY,
    }
}

/// [`rpc::HttpRequestHead`] borrowed from the request, so that encoding it copies nothing first.
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
}

/// [`rpc::HttpResponseHead`] borrowing from the reply header where it can.
#[derive(Debug, Deserialize)]
struct ResponseHead<'a> {
    status: u16,
    #[serde(borrow, default)]
    headers: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl Target {
    async fn dispatch(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > rpc::MAX_BODY_BYTES as u64) {
            return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
        }
        let body = match Limited::new(body, rpc::MAX_BODY_BYTES).collect().await {
            Ok(body) => body.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
            }
            Err(e) => {
                tracing::debug!(error = %e, "cannot read a request body");
                return text(StatusCode::BAD_REQUEST, "cannot read the request body\n");
            }
        };
        let head = match serde_json::to_string(&RequestHead::of(&parts)) {
            Ok(head) => head,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a request head");
                return text(StatusCode::INTERNAL_SERVER_ERROR, "internal error\n");
            }
        };
        let mut headers = HeaderMap::new();
        headers.insert(HTTP_HEAD.clone(), head);
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(body)
            .timeout(Some(REQUEST_TIMEOUT));
        let reply = match self
            .client
            .send_request(self.subject.clone(), request)
            .await
        {
            Ok(reply) => reply,
            Err(e) => {
                return match e.kind() {
                    RequestErrorKind::NoResponders => {
                        text(StatusCode::SERVICE_UNAVAILABLE, self.unavailable.clone())
                    }
                    RequestErrorKind::TimedOut => text(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the component did not answer in time\n",
                    ),
                    _ => {
                        tracing::warn!(error = %e, subject = %self.subject, "request failed");
                        text(StatusCode::BAD_GATEWAY, "cannot reach the component\n")
                    }
                };
            }
        };
        let reply_headers = reply.headers.as_ref();
        let get = |name: &async_nats::header::HeaderName| {
            reply_headers
                .and_then(|h| h.get(name.clone()))
                .map(async_nats::HeaderValue::as_str)
        };
        if get(&STATUS) != Some("ok") {
            let code = get(&ERROR_CODE).unwrap_or("internal");
            tracing::debug!(%code, message = %String::from_utf8_lossy(&reply.payload), subject = %self.subject, "component error");
            return text(status_of(code), format!("component error: {code}\n"));
        }
        let Some(Ok(head)) = get(&HTTP_HEAD).map(serde_json::from_str::<ResponseHead<'_>>) else {
            tracing::warn!(subject = %self.subject, "reply without a valid response head");
            return text(
                StatusCode::BAD_GATEWAY,
                "component error: no response head\n",
            );
        };
        let mut response = Response::new(Full::new(reply.payload));
        *response.status_mut() =
            StatusCode::from_u16(head.status).unwrap_or(StatusCode::BAD_GATEWAY);
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
}

#[cfg(test)]
mod tests {
    use trellis_schemas::capability::rpc::{HttpRequestHead, HttpResponseHead};

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

        let reply = serde_json::to_string(&HttpResponseHead {
            status: 404,
            headers: vec![("content-type".into(), "text/\"plain\"".into())],
        })
        .expect("json");
        let head: ResponseHead<'_> = serde_json::from_str(&reply).expect("parses");
        assert_eq!(head.status, 404);
        assert_eq!(head.headers[0].1, "text/\"plain\"");
    }

    #[test]
    fn error_codes_map_to_statuses() {
        assert_eq!(status_of("busy"), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status_of("not_running"), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(status_of("crashed"), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(status_of("timeout"), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(status_of("fuel_exhausted"), StatusCode::BAD_GATEWAY);
    }
}
