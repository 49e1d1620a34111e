//! The OTLP/HTTP export of spans: each span is written into its protobuf bytes when it ends,
//! and the export thread posts them in batches as `ExportTraceServiceRequest`s.
//!
//! The generic path (the SDK's batch processor and `opentelemetry-otlp`'s exporter) moves every
//! span through a channel to another thread, copies it into the generated protobuf types (a
//! string allocated per attribute), encodes those and drops both there; on a host that serves
//! tens of thousands of invocations a second, that was most of what a span cost. [`Batcher`]
//! writes the wire format from the span's own record on the thread that ends it, into a
//! buffer the export thread takes whole. It speaks what the default settings ask for, protobuf
//! over HTTP; [`Settings::from_env`] says when another protocol or compression is asked for,
//! and the caller then uses the generic path instead.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::SpanId;
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::Resource;

use super::{Kind, Record};

use crate::connect::percent_decode;

/// The path of the traces endpoint under `OTEL_EXPORTER_OTLP_ENDPOINT`.
const TRACES_PATH: &str = "v1/traces";
/// The specification's default for `OTEL_EXPORTER_OTLP_TIMEOUT`.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to post spans, from the standard environment.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Settings {
    /// The full URL of the traces endpoint.
    pub endpoint: String,
    /// Extra request headers (`OTEL_EXPORTER_OTLP_HEADERS`), percent-decoded.
    pub headers: Vec<(String, String)>,
    /// How long one export may take.
    pub timeout: Duration,
}

impl Settings {
    /// The settings the environment gives; `None` when it asks for what this exporter does not
    /// speak (a protocol other than `http/protobuf`, or compression).
    pub fn from_env() -> Option<Self> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`from_env`](Self::from_env) with `var` in place of the environment. The signal's own
    /// variable (`OTEL_EXPORTER_OTLP_TRACES_*`) wins over the general one.
    fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Option<Self> {
        let get = |name: &str| {
            var(&format!("OTEL_EXPORTER_OTLP_TRACES_{name}"))
                .or_else(|| var(&format!("OTEL_EXPORTER_OTLP_{name}")))
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if get("PROTOCOL").is_some_and(|p| p != "http/protobuf")
            || get("COMPRESSION").is_some_and(|c| c != "none")
        {
            return None;
        }
        let endpoint = match var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
        {
            Some(endpoint) => endpoint,
            None => {
                let base = var("OTEL_EXPORTER_OTLP_ENDPOINT")
                    .map(|v| v.trim().to_owned())
                    .filter(|v| !v.is_empty())
                    .unwrap_or_else(|| "http://localhost:4318".to_owned());
                format!("{}/{TRACES_PATH}", base.trim_end_matches('/'))
            }
        };
        let headers = get("HEADERS")
            .map(|list| {
                list.split(',')
                    .filter_map(|pair| {
                        let (name, value) = pair.split_once('=')?;
                        Some((percent_decode(name.trim()), percent_decode(value.trim())))
                    })
                    .filter(|(name, _)| !name.is_empty())
                    .collect()
            })
            .unwrap_or_default();
        let timeout = get("TIMEOUT")
            .and_then(|ms| ms.parse::<u64>().ok())
            .map_or(DEFAULT_TIMEOUT, Duration::from_millis);
        Some(Self {
            endpoint,
            headers,
            timeout,
        })
    }
}

/// Batching limits, from the standard `OTEL_BSP_*` variables with the specification's defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Limits {
    /// Spans waiting at most (`OTEL_BSP_MAX_QUEUE_SIZE`, 2048); more are dropped.
    pub max_queue: usize,
    /// Spans per request at most (`OTEL_BSP_MAX_EXPORT_BATCH_SIZE`, 512, at most the queue).
    pub max_batch: usize,
    /// How long a span waits at most before it is posted (`OTEL_BSP_SCHEDULE_DELAY`, 5 s).
    pub delay: Duration,
    /// How long one post may take (`OTEL_BSP_EXPORT_TIMEOUT`, 30 s; the exporter's own
    /// timeout, when shorter, wins).
    pub export_timeout: Duration,
}

impl Limits {
    /// The limits the environment gives.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    fn from_lookup(var: impl Fn(&str) -> Option<String>) -> Self {
        let number = |name: &str, default: u64| {
            var(name)
                .and_then(|v| v.trim().parse::<u64>().ok())
                .filter(|&n| n > 0)
                .unwrap_or(default)
        };
        let size =
            |name: &str, default: u64| usize::try_from(number(name, default)).unwrap_or(usize::MAX);
        let max_queue = size("OTEL_BSP_MAX_QUEUE_SIZE", 2048);
        Self {
            max_queue,
            max_batch: size("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512).min(max_queue),
            delay: Duration::from_millis(number("OTEL_BSP_SCHEDULE_DELAY", 5000)),
            export_timeout: Duration::from_millis(number("OTEL_BSP_EXPORT_TIMEOUT", 30_000)),
        }
    }
}

/// Spans written out as they end, waiting for the export thread.
#[derive(Debug, Default)]
struct Queue {
    /// `Span` messages, each with its field key and length, back to back.
    bytes: Vec<u8>,
    /// Where each span's message ends in `bytes`.
    ends: Vec<usize>,
    /// Whether the process is stopping: post what is left and end.
    shut: bool,
}

/// What the export thread and the threads that end spans share.
#[derive(Debug)]
struct Shared {
    queue: Mutex<Queue>,
    /// Signalled when a batch is full or the process stops.
    ready: Condvar,
    limits: Limits,
    /// Spans dropped because the queue was full.
    dropped: AtomicU64,
}

/// Batches spans and posts them as OTLP/HTTP protobuf, in place of the SDK's batch processor
/// and exporter.
///
/// A span is written into its protobuf bytes on the thread that ends it, straight from its
/// record, and appended to a shared buffer under a lock held for one copy; the export
/// thread takes the buffer when a batch is full or the schedule delay has passed, puts the
/// request's few enclosing fields in front and posts it. Nothing is allocated per span besides
/// the span itself, and no span crosses a channel: the SDK's processor moved each span through
/// one and the exporter then read and dropped it on another thread, which cost more than making
/// it.
#[derive(Debug)]
pub(super) struct Batcher {
    shared: Arc<Shared>,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Batcher {
    /// Starts the export thread, posting what `settings` say as spans of `resource` and `scope`.
    ///
    /// # Errors
    ///
    /// An endpoint or header that is not valid, or a thread that cannot be started.
    pub fn start(
        settings: Settings,
        limits: Limits,
        resource: &Resource,
        scope: &InstrumentationScope,
    ) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            ready: Condvar::new(),
            limits,
            dropped: AtomicU64::new(0),
        });
        let envelope = Envelope::new(resource, scope);
        let poster = Poster::new(&settings, settings.timeout.min(limits.export_timeout))
            .map_err(std::io::Error::other)?;
        let thread = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("trellis-otlp".into())
                .spawn(move || export_loop(&shared, &envelope, poster))?
        };
        Ok(Self {
            shared,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues a span that ended (dropped when the queue is full).
    pub fn push(&self, span: &Record, end: SystemTime) {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        SCRATCH.with_borrow_mut(|scratch| {
            scratch.clear();
            span_fields(scratch, span, end);
            let limits = &self.shared.limits;
            let mut queue = self.shared.lock();
            if queue.ends.len() >= limits.max_queue || queue.shut {
                drop(queue);
                if self.shared.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                    tracing::warn!(
                        max_queue = limits.max_queue,
                        "spans are ended faster than they are exported: dropping spans \
                         (OTEL_BSP_MAX_QUEUE_SIZE)"
                    );
                }
                return;
            }
            key(&mut queue.bytes, 2, LEN);
            varint(&mut queue.bytes, scratch.len() as u64);
            queue.bytes.extend_from_slice(scratch);
            let end = queue.bytes.len();
            queue.ends.push(end);
            let full = queue.ends.len() == limits.max_batch;
            drop(queue);
            if full {
                self.shared.ready.notify_one();
            }
        });
    }

    /// Posts what is queued and stops the export thread; waits for it.
    pub fn shutdown(&self) {
        self.shared.lock().shut = true;
        self.shared.ready.notify_one();
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The export thread: waits for a full batch, the schedule delay or the end, then posts what
/// is queued, a batch per request. Waking for a full batch, it posts whole batches only and
/// keeps the rest for the next request, so that a span or two ended during the last post does
/// not make a request of its own.
fn export_loop(shared: &Shared, envelope: &Envelope, mut poster: Poster) {
    let limits = shared.limits;
    // Spans taken from the queue and not posted yet: their bytes and where each ends.
    let mut bytes = Vec::new();
    let mut ends: Vec<usize> = Vec::new();
    // The buffer of the next request: the last one's, once the client is done with it, as a
    // new buffer of that size would be fresh pages from the allocator every time.
    let mut body: Vec<u8> = Vec::new();
    loop {
        let (shut, due) = {
            let mut queue = shared.lock();
            let deadline = std::time::Instant::now() + limits.delay;
            let mut due = false;
            while ends.len() + queue.ends.len() < limits.max_batch && !queue.shut {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    due = true;
                    break;
                }
                queue = shared
                    .ready
                    .wait_timeout(queue, left)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            if bytes.is_empty() {
                // The common case: the buffers change hands, nothing is copied.
                std::mem::swap(&mut queue.bytes, &mut bytes);
                std::mem::swap(&mut queue.ends, &mut ends);
            } else {
                let base = bytes.len();
                bytes.extend_from_slice(&queue.bytes);
                ends.extend(queue.ends.iter().map(|end| base + end));
                queue.bytes.clear();
                queue.ends.clear();
            }
            (queue.shut, due)
        };
        let whole = if shut || due {
            ends.len()
        } else {
            ends.len() - ends.len() % limits.max_batch
        };
        let mut start = 0;
        for batch in ends[..whole].chunks(limits.max_batch) {
            let Some(&end) = batch.last() else { continue };
            body.clear();
            envelope.request(&mut body, &bytes[start..end]);
            let sent = bytes::Bytes::from(std::mem::take(&mut body));
            poster.post(sent.clone());
            if let Ok(buffer) = sent.try_into_mut() {
                body = Vec::from(buffer);
            }
            start = end;
        }
        // What is left moves to the front, for the next request.
        bytes.drain(..start);
        ends.drain(..whole);
        ends.iter_mut().for_each(|end| *end -= start);
        if shut {
            return;
        }
    }
}

/// Posts requests to the receiver, with reqwest's client on a runtime of the export thread's
/// own (the blocking client would hand each request to a thread of its own and back).
struct Poster {
    runtime: tokio::runtime::Runtime,
    /// Sends the content type and `OTEL_EXPORTER_OTLP_HEADERS` with every request.
    client: reqwest::Client,
    url: reqwest::Url,
    /// Whether the last post failed (a failure is logged when posting starts to fail).
    failing: bool,
}

impl Poster {
    /// A poster for `settings`, with a timeout of `timeout` per request.
    fn new(settings: &Settings, timeout: Duration) -> Result<Self, String> {
        let url = reqwest::Url::parse(&settings.endpoint)
            .map_err(|e| format!("the OTLP endpoint {:?}: {e}", settings.endpoint))?;
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::CONTENT_TYPE,
            reqwest::header::HeaderValue::from_static("application/x-protobuf"),
        );
        for (name, value) in &settings.headers {
            let name = reqwest::header::HeaderName::from_bytes(name.as_bytes())
                .map_err(|e| format!("the OTLP header {name:?}: {e}"))?;
            let value = reqwest::header::HeaderValue::from_str(value)
                .map_err(|e| format!("the value of the OTLP header {name}: {e}"))?;
            headers.append(name, value);
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .default_headers(headers)
            .build()
            .map_err(|e| e.to_string())?;
        Ok(Self {
            runtime,
            client,
            url,
            failing: false,
        })
    }

    fn post(&mut self, body: bytes::Bytes) {
        let request = self.client.post(self.url.clone()).body(body);
        match self.runtime.block_on(Self::send(request)) {
            Ok(()) => self.failing = false,
            Err(e) => {
                if !std::mem::replace(&mut self.failing, true) {
                    tracing::warn!(endpoint = %self.url, error = %e, "cannot export spans");
                }
            }
        }
    }

    async fn send(request: reqwest::RequestBuilder) -> Result<(), String> {
        let response = request
            .send()
            .await
            .map_err(|e| format!("posting spans: {e}"))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().await.unwrap_or_default();
        Err(format!(
            "the OTLP receiver answered {status}: {}",
            text.chars().take(200).collect::<String>()
        ))
    }
}

/// The fields of a request around its spans, encoded once: the resource and the
/// instrumentation scope every span of this process shares.
#[derive(Debug)]
struct Envelope {
    /// `ResourceSpans.resource`, with its key and length.
    resource: Vec<u8>,
    /// `ResourceSpans.schema_url`, with its key (empty when there is none).
    resource_schema: Vec<u8>,
    /// `ScopeSpans.scope`, with its key and length.
    scope: Vec<u8>,
    /// `ScopeSpans.schema_url`, with its key (empty when there is none).
    scope_schema: Vec<u8>,
}

impl Envelope {
    fn new(resource: &Resource, scope: &InstrumentationScope) -> Self {
        let mut fields = Self {
            resource: Vec::new(),
            resource_schema: Vec::new(),
            scope: Vec::new(),
            scope_schema: Vec::new(),
        };
        message(&mut fields.resource, 1, |out| {
            for (key, value) in resource.iter() {
                message(out, 1, |out| key_value(out, key.as_str(), value));
            }
        });
        string(
            &mut fields.resource_schema,
            3,
            resource.schema_url().unwrap_or_default(),
        );
        message(&mut fields.scope, 1, |out| {
            string(out, 1, scope.name());
            string(out, 2, scope.version().unwrap_or_default());
            attributes(out, 3, scope.attributes());
        });
        string(
            &mut fields.scope_schema,
            3,
            scope.schema_url().unwrap_or_default(),
        );
        fields
    }

    /// An `ExportTraceServiceRequest` of `spans` (`Span` messages with their keys, as
    /// [`Batcher::push`] writes them), written into `out`.
    fn request(&self, out: &mut Vec<u8>, spans: &[u8]) {
        let scope_spans = self.scope.len() + spans.len() + self.scope_schema.len();
        let resource_spans = self.resource.len()
            + 1
            + varint_len(scope_spans as u64)
            + scope_spans
            + self.resource_schema.len();
        out.reserve(1 + varint_len(resource_spans as u64) + resource_spans);
        key(out, 1, LEN);
        varint(out, resource_spans as u64);
        out.extend_from_slice(&self.resource);
        key(out, 2, LEN);
        varint(out, scope_spans as u64);
        out.extend_from_slice(&self.scope);
        out.extend_from_slice(spans);
        out.extend_from_slice(&self.scope_schema);
        out.extend_from_slice(&self.resource_schema);
    }
}

// The wire format: a field's key is its number and wire type; a nested message or a string is
// its length, then its bytes.

/// Wire type of varints.
const VARINT: u32 = 0;
/// Wire type of 64-bit fixed-width values.
const FIXED64: u32 = 1;
/// Wire type of length-delimited values.
const LEN: u32 = 2;
/// Wire type of 32-bit fixed-width values.
const FIXED32: u32 = 5;

/// The bytes of `v` as a varint, and how many there are.
fn varint_bytes(mut v: u64) -> ([u8; 10], usize) {
    let mut bytes = [0; 10];
    let mut n = 0;
    while v >= 0x80 {
        bytes[n] = (v as u8) | 0x80;
        v >>= 7;
        n += 1;
    }
    bytes[n] = v as u8;
    (bytes, n + 1)
}

/// Most varints of a span (keys, lengths, small values) are one byte: pushed as such.
#[inline]
fn varint(out: &mut Vec<u8>, v: u64) {
    if v < 0x80 {
        out.push(v as u8);
    } else {
        let (bytes, n) = varint_bytes(v);
        out.extend_from_slice(&bytes[..n]);
    }
}

/// How many bytes [`varint`] writes for `v`.
fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

#[inline]
fn key(out: &mut Vec<u8>, field: u32, wire: u32) {
    varint(out, u64::from(field << 3 | wire));
}

fn bytes_field(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    key(out, field, LEN);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// A string field, left out when empty (proto3's default).
fn string(out: &mut Vec<u8>, field: u32, s: &str) {
    if !s.is_empty() {
        bytes_field(out, field, s.as_bytes());
    }
}

/// A varint field, left out when zero.
fn uint(out: &mut Vec<u8>, field: u32, v: u64) {
    if v != 0 {
        key(out, field, VARINT);
        varint(out, v);
    }
}

fn fixed64(out: &mut Vec<u8>, field: u32, v: u64) {
    key(out, field, FIXED64);
    out.extend_from_slice(&v.to_le_bytes());
}

fn fixed32(out: &mut Vec<u8>, field: u32, v: u32) {
    key(out, field, FIXED32);
    out.extend_from_slice(&v.to_le_bytes());
}

/// A nested message, written by `body` in place; its length goes in front once known (moving
/// the body along when the length takes more than one byte).
fn message(out: &mut Vec<u8>, field: u32, body: impl FnOnce(&mut Vec<u8>)) {
    key(out, field, LEN);
    let at = out.len();
    out.push(0);
    body(out);
    let len = out.len() - at - 1;
    if len < 0x80 {
        out[at] = len as u8;
    } else {
        let (prefix, n) = varint_bytes(len as u64);
        out.splice(at..=at, prefix[..n].iter().copied());
    }
}

/// Nanoseconds since the Unix epoch.
fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// A `KeyValue` message's fields.
fn key_value(out: &mut Vec<u8>, key: &str, value: &Value) {
    string(out, 1, key);
    message(out, 2, |out| any_value(out, value));
}

/// An `AnyValue` message's field.
fn any_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::String(s) => bytes_field(out, 1, s.as_str().as_bytes()),
        Value::Bool(b) => {
            key(out, 2, VARINT);
            varint(out, u64::from(*b));
        }
        Value::I64(i) => {
            key(out, 3, VARINT);
            varint(out, *i as u64);
        }
        Value::F64(f) => fixed64(out, 4, f.to_bits()),
        Value::Array(array) => message(out, 5, |out| match array {
            Array::Bool(v) => v
                .iter()
                .for_each(|b| message(out, 1, |out| any_value(out, &Value::Bool(*b)))),
            Array::I64(v) => v
                .iter()
                .for_each(|i| message(out, 1, |out| any_value(out, &Value::I64(*i)))),
            Array::F64(v) => v
                .iter()
                .for_each(|f| message(out, 1, |out| any_value(out, &Value::F64(*f)))),
            Array::String(v) => v.iter().for_each(|s| {
                message(out, 1, |out| bytes_field(out, 1, s.as_str().as_bytes()));
            }),
            other => message(out, 1, |out| {
                bytes_field(out, 1, other.to_string().as_bytes())
            }),
        }),
        other => bytes_field(out, 1, other.to_string().as_bytes()),
    }
}

fn attributes<'a>(
    out: &mut Vec<u8>,
    field: u32,
    attributes: impl IntoIterator<Item = &'a KeyValue>,
) {
    for kv in attributes {
        message(out, field, |out| key_value(out, kv.key.as_str(), &kv.value));
    }
}

/// `SpanFlags`: the W3C trace flags, and whether the parent is remote.
fn span_flags(trace_flags: u8, parent_is_remote: bool) -> u32 {
    const HAS_IS_REMOTE: u32 = 0x100;
    const IS_REMOTE: u32 = 0x200;
    u32::from(trace_flags) | HAS_IS_REMOTE | if parent_is_remote { IS_REMOTE } else { 0 }
}

/// The fields of `list` as a `Span` message's attributes.
pub(super) fn span_attributes(list: &[KeyValue]) -> Vec<u8> {
    let mut out = Vec::new();
    attributes(&mut out, 9, list);
    out
}

/// A `Span` message's fields, for a span that ended at `end`.
fn span_fields(out: &mut Vec<u8>, span: &Record, end: SystemTime) {
    bytes_field(out, 1, &span.trace_id.to_bytes());
    bytes_field(out, 2, &span.span_id.to_bytes());
    let has_parent = span.parent_span_id != SpanId::INVALID;
    if has_parent {
        bytes_field(out, 4, &span.parent_span_id.to_bytes());
    }
    string(out, 5, span.name.as_str());
    uint(
        out,
        6,
        match span.kind {
            Kind::Server => 2,
            Kind::Client => 3,
        },
    );
    fixed64(out, 7, unix_nanos(span.start));
    fixed64(out, 8, unix_nanos(end));
    attributes(out, 9, &span.attributes);
    if let Some(shared) = &span.shared {
        out.extend_from_slice(&shared.0.encoded);
    }
    if let Some(description) = &span.error {
        message(out, 15, |out| {
            string(out, 2, description);
            uint(out, 3, 2);
        });
    }
    // A span's parent, when it has one, came with a request from another process.
    fixed32(out, 16, span_flags(span.flags.to_u8(), has_parent));
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::trace::{TraceFlags, TraceId};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value;
    use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
    use prost::Message as _;
    use trellis_schemas::dataplane::span_attributes;

    /// The instant every test span ends.
    fn end() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_223_456_789)
    }

    fn record(name: &str, parent: SpanId, error: Option<&str>) -> Record {
        Record {
            trace_id: TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
            span_id: SpanId::from(0x00f0_67aa_0ba9_02b7),
            parent_span_id: parent,
            flags: TraceFlags::SAMPLED,
            kind: Kind::Server,
            name: name.to_owned().into(),
            start: SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
            shared: None,
            attributes: vec![
                KeyValue::new(span_attributes::COMPONENT, "kv-counter"),
                KeyValue::new("http.response.status_code", 200_i64),
                KeyValue::new("ok", true),
                KeyValue::new("ratio", 0.25),
                KeyValue::new("ids", Value::Array(Array::I64(vec![1, -2]))),
                KeyValue::new("long", "x".repeat(300)),
            ],
            error: error.map(str::to_owned),
        }
    }

    fn scope() -> InstrumentationScope {
        InstrumentationScope::builder("trellis")
            .with_version("1.2.3")
            .build()
    }

    #[test]
    fn a_batch_decodes_as_the_protobuf_of_the_specification() {
        let envelope = Envelope::new(
            &Resource::builder_empty()
                .with_service_name("trellis-host")
                .build(),
            &scope(),
        );
        let mut child = record("link other", SpanId::from(7), Some("trap: unreachable"));
        child.shared = Some(super::super::Attributes::new([
            (span_attributes::INSTANCE, "01JINSTANCE".into()),
            ("test.shared", "yes".into()),
        ]));
        let batch = [record("invoke hello greet", SpanId::INVALID, None), child];
        let mut spans = Vec::new();
        for span in &batch {
            message(&mut spans, 2, |out| span_fields(out, span, end()));
        }
        let mut out = Vec::new();
        envelope.request(&mut out, &spans);
        let request = ExportTraceServiceRequest::decode(out.as_slice()).expect("decodes");
        assert_eq!(request.resource_spans.len(), 1);
        let rs = &request.resource_spans[0];
        let resource = rs.resource.as_ref().expect("resource");
        assert!(resource.attributes.iter().any(|kv| kv.key == "service.name"
            && kv.value.as_ref().and_then(|v| v.value.clone())
                == Some(any_value::Value::StringValue("trellis-host".into()))));
        assert_eq!(rs.scope_spans.len(), 1);
        let scope = rs.scope_spans[0].scope.as_ref().expect("scope");
        assert_eq!(
            (scope.name.as_str(), scope.version.as_str()),
            ("trellis", "1.2.3")
        );
        let spans = &rs.scope_spans[0].spans;
        assert_eq!(spans.len(), 2);
        let root = &spans[0];
        assert_eq!(root.name, "invoke hello greet");
        assert_eq!(
            root.trace_id,
            hex("4bf92f3577b34da6a3ce929d0e0e4736"),
            "trace id"
        );
        assert_eq!(root.span_id, hex("00f067aa0ba902b7"));
        assert!(root.parent_span_id.is_empty());
        assert!(root.trace_state.is_empty());
        assert_eq!(root.kind, 2);
        assert_eq!(root.start_time_unix_nano, 1_700_000_000_123_456_789);
        assert_eq!(root.end_time_unix_nano, 1_700_000_000_223_456_789);
        assert_eq!(root.flags, 0x101);
        assert!(root.status.is_none());
        let value = |key: &str| {
            root.attributes
                .iter()
                .find(|kv| kv.key == key)
                .and_then(|kv| kv.value.clone()?.value)
        };
        assert_eq!(
            value(span_attributes::COMPONENT),
            Some(any_value::Value::StringValue("kv-counter".into()))
        );
        assert_eq!(
            value("http.response.status_code"),
            Some(any_value::Value::IntValue(200))
        );
        assert_eq!(value("ok"), Some(any_value::Value::BoolValue(true)));
        assert_eq!(value("ratio"), Some(any_value::Value::DoubleValue(0.25)));
        assert_eq!(
            value("long"),
            Some(any_value::Value::StringValue("x".repeat(300)))
        );
        let Some(any_value::Value::ArrayValue(ids)) = value("ids") else {
            panic!("ids is an array");
        };
        assert_eq!(
            ids.values
                .iter()
                .map(|v| v.value.clone())
                .collect::<Vec<_>>(),
            vec![
                Some(any_value::Value::IntValue(1)),
                Some(any_value::Value::IntValue(-2))
            ]
        );
        let child = &spans[1];
        let keys: Vec<&str> = child.attributes.iter().map(|kv| kv.key.as_str()).collect();
        assert_eq!(keys.len(), 8, "its own and the shared: {keys:?}");
        assert!(
            child
                .attributes
                .iter()
                .any(|kv| kv.key == span_attributes::INSTANCE
                    && kv.value.as_ref().and_then(|v| v.value.clone())
                        == Some(any_value::Value::StringValue("01JINSTANCE".into())))
        );
        assert!(keys.contains(&"test.shared") && keys.contains(&"ok"));
        assert_eq!(child.parent_span_id, 7u64.to_be_bytes());
        assert!(child.trace_state.is_empty());
        assert_eq!(child.flags, 0x301, "sampled, parent known to be remote");
        let status = child.status.as_ref().expect("status");
        assert_eq!(status.code, StatusCode::Error as i32);
        assert_eq!(status.message, "trap: unreachable");
    }

    /// Reads HTTP/1.1 requests on one connection after another and answers each 200; sends
    /// each body on.
    fn receiver() -> (String, std::sync::mpsc::Receiver<Vec<u8>>) {
        use std::io::{BufRead as _, Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds");
        let url = format!("http://{}/v1/traces", listener.local_addr().expect("addr"));
        let (bodies, received) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone"));
                loop {
                    let mut length = 0;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            break;
                        }
                        if line == "\r\n" {
                            break;
                        }
                        if let Some((name, value)) = line.split_once(':')
                            && name.eq_ignore_ascii_case("content-length")
                        {
                            length = value.trim().parse().expect("length");
                        }
                    }
                    if line != "\r\n" {
                        break;
                    }
                    let mut body = vec![0; length];
                    reader.read_exact(&mut body).expect("body");
                    let _ = bodies.send(body);
                    let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                }
            }
        });
        (url, received)
    }

    /// Every span pushed is posted (at most a batch per request) or counted as dropped when the
    /// queue is full; shutting down posts what is left.
    #[test]
    fn the_batcher_posts_every_span_it_queues_a_batch_at_a_time() {
        let (endpoint, bodies) = receiver();
        let limits = Limits {
            max_queue: 4,
            max_batch: 2,
            delay: Duration::from_secs(3600),
            export_timeout: Duration::from_secs(10),
        };
        let settings = Settings {
            endpoint,
            headers: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        };
        let resource = Resource::builder_empty().with_service_name("test").build();
        let batcher = Batcher::start(settings, limits, &resource, &scope()).expect("starts");
        for i in 0..9 {
            batcher.push(&record(&format!("span {i}"), SpanId::INVALID, None), end());
        }
        batcher.shutdown();
        let mut names = Vec::new();
        for body in bodies.try_iter() {
            let request = ExportTraceServiceRequest::decode(body.as_slice()).expect("decodes");
            let spans = &request.resource_spans[0].scope_spans[0].spans;
            assert!(
                (1..=2).contains(&spans.len()),
                "{} spans in one request",
                spans.len()
            );
            names.extend(spans.iter().map(|s| s.name.clone()));
        }
        let dropped = batcher.shared.dropped.load(Ordering::Relaxed);
        assert_eq!(
            names.len() as u64 + dropped,
            9,
            "{names:?}, {dropped} dropped"
        );
        assert!(
            names.len() >= 4,
            "at least a full queue is posted: {names:?}"
        );
        let mut sorted = names.clone();
        sorted.sort_by_key(|n| n[5..].parse::<u32>().expect("number"));
        assert_eq!(names, sorted, "posted in the order they ended");
        // After shutdown a span is dropped, not queued.
        batcher.push(&record("late", SpanId::INVALID, None), end());
        assert_eq!(batcher.shared.dropped.load(Ordering::Relaxed), dropped + 1);
    }

    #[test]
    fn batching_limits_follow_the_standard_variables() {
        let none = Limits::from_lookup(|_| None);
        assert_eq!(
            none,
            Limits {
                max_queue: 2048,
                max_batch: 512,
                delay: Duration::from_secs(5),
                export_timeout: Duration::from_secs(30),
            }
        );
        let set = Limits::from_lookup(|name| {
            Some(
                match name {
                    "OTEL_BSP_MAX_QUEUE_SIZE" => "100",
                    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE" => "500",
                    "OTEL_BSP_SCHEDULE_DELAY" => "250",
                    "OTEL_BSP_EXPORT_TIMEOUT" => "zero",
                    _ => return None,
                }
                .to_owned(),
            )
        });
        assert_eq!(set.max_queue, 100);
        assert_eq!(set.max_batch, 100, "a batch is never larger than the queue");
        assert_eq!(set.delay, Duration::from_millis(250));
        assert_eq!(set.export_timeout, Duration::from_secs(30), "not a number");
    }

    #[test]
    fn varint_lengths_are_what_varint_writes() {
        for v in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            let mut out = Vec::new();
            varint(&mut out, v);
            assert_eq!(varint_len(v), out.len(), "{v}");
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
            .collect()
    }

    #[test]
    fn settings_follow_the_standard_variables() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let s = Settings::from_lookup(env(&[(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            "http://collector:4318/",
        )]))
        .expect("speaks the default protocol");
        assert_eq!(s.endpoint, "http://collector:4318/v1/traces");
        assert_eq!(s.timeout, DEFAULT_TIMEOUT);
        let s = Settings::from_lookup(env(&[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
            (
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://other:9999/traces",
            ),
            (
                "OTEL_EXPORTER_OTLP_HEADERS",
                "api-key=a%20b, x-tenant = t1,bad",
            ),
            ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
        ]))
        .expect("speaks http/protobuf");
        assert_eq!(s.endpoint, "http://other:9999/traces", "used as given");
        assert_eq!(
            s.headers,
            vec![
                ("api-key".to_owned(), "a b".to_owned()),
                ("x-tenant".to_owned(), "t1".to_owned())
            ]
        );
        assert_eq!(s.timeout, Duration::from_millis(2500));
        assert!(
            Settings::from_lookup(env(&[("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")])).is_none()
        );
        assert!(
            Settings::from_lookup(env(&[("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")])).is_none()
        );
    }
}
