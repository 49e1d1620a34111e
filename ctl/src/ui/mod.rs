//! `trellis ui` (or `trellis controller --ui`): a read-only web dashboard of one lattice.
//!
//! The page (plain HTML, CSS and JavaScript embedded in the binary) opens one server-sent events
//! stream, `/api/events`, which carries:
//!
//! - `snapshot`: the lattice as [`view::Snapshot`] — hosts and their load, components with their
//!   instances, providers, assignments, rollouts — taken from the controller's projection after
//!   every new fact (at most one request in flight) and every `--refresh` period;
//! - `fact`: each new fact of the events stream ([`view::FactRow`]); a page that connects first
//!   gets the last [`FACTS_KEPT`];
//! - `metrics`: invocations and errors per second per component ([`view::MetricsPoint`]),
//!   derived from the counters in the hosts' heartbeats; a page that connects gets the last
//!   [`POINTS_KEPT`] points for its chart;
//! - `problem`: why the last snapshot could not be taken (no controller answering, say).
//!
//! `/api/snapshot` answers the latest snapshot as JSON. The dashboard only reads: it sends the
//! controller queries and subscribes to facts and heartbeats, never a command. It listens on
//! loopback unless told otherwise, and then only answers requests whose `Host` is a loopback
//! name (a page on another site cannot reach it through DNS rebinding).

mod view;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::Utc;
use clap::Args;
use futures::StreamExt as _;
use http_body_util::{BodyExt as _, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use tokio::sync::{Notify, broadcast};
use trellis_bus::{FactStream, StartAt};
use trellis_schemas::control::{ProjectionRequest, StatusRequest};
use trellis_schemas::{Heartbeat, Lattice, subject};

use crate::cli::{Failure, Global, failure};
use crate::client::CtlClient;

/// Facts a newly connected page is shown.
pub(crate) const FACTS_KEPT: usize = 100;
/// Chart points a newly connected page is given (at one a heartbeat interval, about 3 minutes).
pub(crate) const POINTS_KEPT: usize = 90;
/// The most pages connected at once; more are answered 503.
const MAX_STREAMS: usize = 64;
/// A comment sent on an idle event stream, so proxies and browsers keep it open.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// How often the chart gets a point.
const METRICS_EVERY: Duration = Duration::from_secs(2);
/// The least time between two snapshots.
const SNAPSHOT_GAP: Duration = Duration::from_millis(250);
/// A host whose heartbeats stopped this long ago no longer counts towards rates.
const HEARTBEAT_STALE: Duration = Duration::from_secs(10);

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `trellis ui`.
#[derive(Debug, Args)]
pub struct UiArgs {
    /// Where to serve the dashboard. Port 0 picks a free one (the address is printed).
    #[arg(long, default_value = "127.0.0.1:7700")]
    listen: SocketAddr,
    /// Ask the controller for the lattice at least this often (and after every new fact).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    refresh: Duration,
}

/// Serves the dashboard until interrupted (Ctrl-C or SIGTERM).
pub(crate) async fn run(g: &Global, args: UiArgs) -> Result<(), Failure> {
    let serve = serve(g, args.listen, args.refresh, "trellis ui").await?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(|e| failure(1, format!("cannot handle SIGTERM: {e}")))?;
    tokio::select! {
        () = serve => Ok(()),
        _ = tokio::signal::ctrl_c() => Ok(()),
        _ = terminate.recv() => Ok(()),
    }
}

/// Connects, binds `listen` and returns the dashboard's server, which runs until dropped (a
/// controller started with `--ui` runs it beside itself).
pub(crate) async fn serve(
    g: &Global,
    listen: SocketAddr,
    refresh_every: Duration,
    name: &str,
) -> Result<impl Future<Output = ()> + use<>, Failure> {
    let nats = trellis_bus::connect(&g.url(), name, false).await?;
    let client = CtlClient::new(nats.clone(), g.lattice.clone(), g.timeout);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| failure(1, format!("cannot listen on {listen}: {e}")))?;
    let bound = listener
        .local_addr()
        .map_err(|e| failure(1, e.to_string()))?;
    let hub = Arc::new(Hub::new(bound));
    let changed = Arc::new(Changed::default());

    tokio::spawn(follow_facts(
        nats.clone(),
        g.lattice.clone(),
        hub.clone(),
        changed.clone(),
    ));
    tokio::spawn(follow_heartbeats(
        nats.clone(),
        g.lattice.clone(),
        hub.clone(),
    ));
    tokio::spawn(refresh(client, hub.clone(), changed, refresh_every));
    tokio::spawn(chart(hub.clone()));

    println!("dashboard of lattice {} on http://{bound}/", g.lattice);
    println!("(read-only; Ctrl-C stops it)");
    Ok(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "ui: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let hub = hub.clone();
            tokio::spawn(async move {
                let service = service_fn(move |request| {
                    let hub = hub.clone();
                    async move { Ok::<_, Infallible>(answer(&hub, request)) }
                });
                if let Err(e) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %e, "ui: connection ended with an error");
                }
            });
        }
    })
}

type Body = BoxBody<Bytes, Infallible>;

fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed()
}

/// Answers one request.
fn answer(hub: &Hub, request: Request<Incoming>) -> Response<Body> {
    if !hub.host_allowed(request.headers().get(header::HOST)) {
        return plain(
            StatusCode::MISDIRECTED_REQUEST,
            "this dashboard answers only requests addressed to its loopback address\n",
        );
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = plain(
            StatusCode::METHOD_NOT_ALLOWED,
            "the dashboard is read-only\n",
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match request.uri().path() {
        "/" | "/index.html" => asset("text/html; charset=utf-8", INDEX_HTML),
        "/app.js" => asset("text/javascript; charset=utf-8", APP_JS),
        "/style.css" => asset("text/css; charset=utf-8", STYLE_CSS),
        "/api/snapshot" => match hub.latest_snapshot() {
            Some(json) => json_response(json),
            None => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "no snapshot yet: the controller has not answered\n",
            ),
        },
        "/api/events" => match hub.stream() {
            Some(body) => {
                let mut response = Response::new(body);
                let h = response.headers_mut();
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                );
                h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
                response
            }
            None => plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many dashboards are open on this server\n",
            ),
        },
        _ => plain(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn asset(content_type: &'static str, text: &'static str) -> Response<Body> {
    let mut response = Response::new(full(text));
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn json_response(json: Bytes) -> Response<Body> {
    let mut response = Response::new(full(json));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn plain(status: StatusCode, text: &'static str) -> Response<Body> {
    let mut response = Response::new(full(text));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// One server-sent event of `data`.
fn event<T: Serialize>(name: &str, data: &T) -> Bytes {
    frame(name, &to_json(data))
}

/// Single-line JSON (serde_json escapes newlines in strings), or an error object.
fn to_json<T: Serialize>(data: &T) -> Vec<u8> {
    serde_json::to_vec(data).unwrap_or_else(|e| {
        serde_json::json!({ "error": format!("cannot encode: {e}") })
            .to_string()
            .into_bytes()
    })
}

/// The server-sent event `name` carrying `json`.
fn frame(name: &str, json: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(json.len() + name.len() + 16);
    frame.extend_from_slice(b"event: ");
    frame.extend_from_slice(name.as_bytes());
    frame.extend_from_slice(b"\ndata: ");
    frame.extend_from_slice(json);
    frame.extend_from_slice(b"\n\n");
    Bytes::from(frame)
}

/// What every page is sent, and what a page that connects is given first.
#[derive(Debug)]
struct Hub {
    bound: SocketAddr,
    tx: broadcast::Sender<Bytes>,
    kept: Mutex<Kept>,
    streams: Arc<AtomicUsize>,
}

#[derive(Debug, Default)]
struct Kept {
    /// The latest snapshot, as JSON.
    snapshot: Option<Bytes>,
    /// The latest problem, cleared by the next snapshot.
    problem: Option<Bytes>,
    facts: VecDeque<Bytes>,
    points: VecDeque<Bytes>,
    heartbeats: view::Heartbeats,
}

impl Hub {
    fn new(bound: SocketAddr) -> Self {
        Self {
            bound,
            tx: broadcast::channel(1024).0,
            kept: Mutex::new(Kept::default()),
            streams: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn kept(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.kept.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// On a loopback address, only `Host: <loopback name>[:port]` is answered.
    fn host_allowed(&self, host: Option<&HeaderValue>) -> bool {
        if !self.bound.ip().is_loopback() {
            return true;
        }
        let Some(host) = host.and_then(|h| h.to_str().ok()) else {
            return false;
        };
        let name = match host.rsplit_once(':') {
            Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
            _ => host,
        };
        matches!(name, "127.0.0.1" | "localhost" | "[::1]")
    }

    fn latest_snapshot(&self) -> Option<Bytes> {
        self.kept().snapshot.clone()
    }

    /// Sends `frame` to every page, keeping what `keep` keeps for pages to come; both under
    /// one lock, so a page that connects meanwhile sees it once, kept or live.
    fn publish(&self, frame: Bytes, keep: impl FnOnce(&mut Kept, &Bytes)) {
        let mut kept = self.kept();
        keep(&mut kept, &frame);
        let _ = self.tx.send(frame);
    }

    fn snapshot(&self, snapshot: &view::Snapshot) {
        let json = Bytes::from(to_json(snapshot));
        self.publish(frame("snapshot", &json), |kept, _| {
            kept.snapshot = Some(json);
            kept.problem = None;
        });
    }

    fn problem(&self, message: String) {
        let frame = event("problem", &serde_json::json!({ "message": message }));
        self.publish(frame, |kept, frame| kept.problem = Some(frame.clone()));
    }

    fn fact(&self, row: &view::FactRow) {
        self.publish(event("fact", row), |kept, frame| {
            if kept.facts.len() == FACTS_KEPT {
                kept.facts.pop_front();
            }
            kept.facts.push_back(frame.clone());
        });
    }

    fn point(&self, point: &view::MetricsPoint) {
        self.publish(event("metrics", point), |kept, frame| {
            if kept.points.len() == POINTS_KEPT {
                kept.points.pop_front();
            }
            kept.points.push_back(frame.clone());
        });
    }

    /// An event stream for one page: what is kept, then everything published; `None` when
    /// [`MAX_STREAMS`] are open.
    fn stream(&self) -> Option<Body> {
        let guard = StreamGuard::take(&self.streams)?;
        let (first, rx) = {
            let kept = self.kept();
            let mut first: Vec<Bytes> = Vec::new();
            first.extend(kept.snapshot.iter().map(|json| frame("snapshot", json)));
            first.extend(kept.problem.iter().cloned());
            first.extend(kept.facts.iter().cloned());
            first.extend(kept.points.iter().cloned());
            (first, self.tx.subscribe())
        };
        // Tell the browser to retry after two seconds if the stream breaks.
        let retry = futures::stream::once(async { Bytes::from_static(b"retry: 2000\n\n") });
        let live = futures::stream::unfold((rx, guard), |(mut rx, guard)| async move {
            loop {
                match tokio::time::timeout(KEEPALIVE, rx.recv()).await {
                    Ok(Ok(frame)) => return Some((frame, (rx, guard))),
                    // A page too slow to keep up misses events; the next snapshot repairs it.
                    Ok(Err(broadcast::error::RecvError::Lagged(_))) => continue,
                    Ok(Err(broadcast::error::RecvError::Closed)) => return None,
                    Err(_) => return Some((Bytes::from_static(b": keep-alive\n\n"), (rx, guard))),
                }
            }
        });
        let frames = retry
            .chain(futures::stream::iter(first))
            .chain(live)
            .map(|bytes| Ok::<_, Infallible>(Frame::data(bytes)));
        Some(http_body_util::BodyExt::boxed(StreamBody::new(frames)))
    }
}

/// Counts an open event stream until dropped.
#[derive(Debug)]
struct StreamGuard(Arc<AtomicUsize>);

impl StreamGuard {
    fn take(count: &Arc<AtomicUsize>) -> Option<Self> {
        let mut now = count.load(Ordering::Acquire);
        loop {
            if now >= MAX_STREAMS {
                return None;
            }
            match count.compare_exchange(now, now + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(Self(count.clone())),
                Err(actual) => now = actual,
            }
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The newest fact seen, and a wake-up for the refresher.
#[derive(Debug, Default)]
struct Changed {
    seq: AtomicU64,
    notify: Notify,
}

/// Feeds every new fact to the pages (starting with the last [`FACTS_KEPT`]) and wakes the
/// refresher. Reopens the reader where it stopped if it ends.
async fn follow_facts(
    nats: async_nats::Client,
    lattice: Lattice,
    hub: Arc<Hub>,
    changed: Arc<Changed>,
) {
    let js = trellis_bus::jetstream(nats.clone());
    let stream = subject::events_stream(&lattice);
    let mut next: Option<u64> = None;
    loop {
        let start = match next {
            Some(seq) => StartAt::Sequence(seq),
            None => match trellis_bus::events_stream_state(&js, &lattice).await {
                Ok(state) => StartAt::Sequence(
                    state
                        .last_sequence
                        .saturating_sub(FACTS_KEPT as u64 - 1)
                        .max(1),
                ),
                Err(e) => {
                    hub.problem(format!("cannot read the events stream: {e}"));
                    tokio::time::sleep(Duration::from_secs(2)).await;
                    continue;
                }
            },
        };
        let mut reader = match FactStream::open(&nats, &js, &stream, None, start).await {
            Ok(reader) => reader,
            Err(e) => {
                hub.problem(format!("cannot read the events stream: {e}"));
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
        };
        while let Some(message) = reader.next().await {
            let raw = match message {
                Ok(raw) => raw,
                Err(e) => {
                    tracing::warn!(error = %e, "ui: reading facts");
                    continue;
                }
            };
            next = Some(raw.seq + 1);
            if let Some(row) = view::FactRow::of(raw.seq, &raw.payload) {
                hub.fact(&row);
            }
            changed.seq.fetch_max(raw.seq, Ordering::AcqRel);
            changed.notify.notify_one();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Keeps the latest heartbeat of every host.
async fn follow_heartbeats(nats: async_nats::Client, lattice: Lattice, hub: Arc<Hub>) {
    let mut subscription = loop {
        match nats.subscribe(subject::heartbeats_all(&lattice)).await {
            Ok(s) => break s,
            Err(e) => {
                tracing::warn!(error = %e, "ui: cannot subscribe to heartbeats");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    while let Some(message) = subscription.next().await {
        match serde_json::from_slice::<Heartbeat>(&message.payload) {
            Ok(heartbeat) => hub.kept().heartbeats.record(heartbeat, Instant::now()),
            Err(e) => tracing::debug!(error = %e, "ui: ignoring a malformed heartbeat"),
        }
    }
}

/// Takes a snapshot after every new fact (coalescing those that come while one is taken) and
/// at least every `every`.
async fn refresh(client: CtlClient, hub: Arc<Hub>, changed: Arc<Changed>, every: Duration) {
    loop {
        let min_seq = changed.seq.load(Ordering::Acquire);
        let min_seq = (min_seq > 0).then_some(min_seq);
        let projection = client.request(&ProjectionRequest { min_seq }).await;
        let status = client.request(&StatusRequest { min_seq }).await;
        match (projection, status) {
            (Ok(projection), Ok(status)) => {
                let snapshot = {
                    let kept = hub.kept();
                    view::snapshot(
                        &projection.projection,
                        &projection.served_by,
                        &status,
                        &kept.heartbeats,
                        Utc::now(),
                        Instant::now(),
                    )
                };
                hub.snapshot(&snapshot);
            }
            (Err(e), _) | (_, Err(e)) => hub.problem(format!("the controller did not answer: {e}")),
        }
        // Facts that come faster than this are shown in one snapshot.
        tokio::time::sleep(SNAPSHOT_GAP).await;
        let _ = tokio::time::timeout(every, changed.notify.notified()).await;
    }
}

/// Adds a point to the invocation chart every [`METRICS_EVERY`].
async fn chart(hub: Arc<Hub>) {
    let mut ticker = tokio::time::interval(METRICS_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let components = {
            let mut kept = hub.kept();
            kept.heartbeats
                .forget_older_than(HEARTBEAT_STALE, Instant::now());
            kept.heartbeats.rates()
        };
        hub.point(&view::MetricsPoint {
            t: Utc::now().timestamp_millis(),
            components,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loopback_dashboard_answers_only_loopback_host_names() {
        let hub = Hub::new("127.0.0.1:7700".parse().unwrap());
        let ok = |h: &str| hub.host_allowed(Some(&HeaderValue::from_str(h).unwrap()));
        assert!(ok("127.0.0.1:7700"));
        assert!(ok("localhost:7700"));
        assert!(ok("[::1]:7700"));
        assert!(ok("localhost"));
        assert!(!ok("evil.example:7700"));
        assert!(!ok("127.0.0.1.evil.example"));
        assert!(!hub.host_allowed(None));
        let open = Hub::new("0.0.0.0:7700".parse().unwrap());
        assert!(open.host_allowed(Some(&HeaderValue::from_static("anything"))));
    }

    #[test]
    fn events_are_single_line_json() {
        let frame = event("fact", &serde_json::json!({ "summary": "a\nb" }));
        assert_eq!(
            &frame[..],
            b"event: fact\ndata: {\"summary\":\"a\\nb\"}\n\n"
        );
    }

    #[tokio::test]
    async fn a_page_that_connects_gets_what_is_kept_then_what_is_new_once() {
        let hub = Hub::new("127.0.0.1:0".parse().unwrap());
        for seq in 1..=(FACTS_KEPT as u64 + 5) {
            hub.fact(&view::FactRow {
                seq,
                time: String::new(),
                kind: "host.started".into(),
                subject: "h".into(),
                summary: String::new(),
            });
        }
        let body = hub.stream().unwrap();
        hub.problem("gone".into());
        let mut body = std::pin::pin!(body.into_data_stream());
        let mut text = String::new();
        while !text.contains("gone") {
            let frame = body.next().await.unwrap().unwrap();
            text.push_str(std::str::from_utf8(&frame).unwrap());
        }
        assert!(text.starts_with("retry: 2000\n\n"));
        assert_eq!(text.matches("event: fact").count(), FACTS_KEPT);
        assert!(!text.contains("\"seq\":5,") && text.contains("\"seq\":6,"));
        assert_eq!(text.matches("event: problem").count(), 1);
    }

    #[test]
    fn open_streams_are_bounded() {
        let hub = Hub::new("127.0.0.1:0".parse().unwrap());
        let open: Vec<Body> = (0..MAX_STREAMS).map(|_| hub.stream().unwrap()).collect();
        assert!(hub.stream().is_none());
        drop(open);
        assert!(hub.stream().is_some());
    }
}
