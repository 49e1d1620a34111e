//! The OTLP/HTTP exporter for spans: each batch is written straight into the protobuf bytes
//! of one `ExportTraceServiceRequest` and posted to the receiver.
//!
//! The generic exporter of `opentelemetry-otlp` first copies every span into the generated
//! protobuf types (a string allocated per attribute) and encodes those; on a host that serves
//! tens of thousands of invocations a second, that copy was most of what exporting cost. This one
//! reads the SDK's [`SpanData`] and writes the wire format directly into one buffer reused from
//! batch to batch. It speaks what the default settings ask for, protobuf over HTTP;
//! [`Settings::from_env`] says when another protocol or compression is asked for, and the
//! caller then uses the generic exporter instead.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{SpanKind, Status};
use opentelemetry::{Array, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{SpanData, SpanExporter};

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

/// Posts batches of spans as OTLP/HTTP protobuf.
#[derive(Debug)]
pub(super) struct Exporter {
    settings: Settings,
    /// The resource, encoded once as the `Resource` message's fields, and its schema URL.
    resource: (Vec<u8>, String),
    /// The HTTP client, made on the export thread at its first batch: reqwest's blocking client
    /// must be neither made nor dropped on an async runtime's thread, which `init` may run on.
    client: Mutex<Option<reqwest::blocking::Client>>,
    /// The size of the last request, to allocate the next one at once.
    last_size: AtomicUsize,
    shut: AtomicBool,
}

impl Exporter {
    /// An exporter posting to what `settings` say.
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            resource: (Vec::new(), String::new()),
            client: Mutex::new(None),
            last_size: AtomicUsize::new(0),
            shut: AtomicBool::new(false),
        }
    }

    /// Posts one encoded request.
    fn post(&self, body: Vec<u8>) -> OTelSdkResult {
        let mut client = self
            .client
            .lock()
            .map_err(|_| OTelSdkError::InternalFailure("exporter lock poisoned".into()))?;
        let client = match &mut *client {
            Some(client) => client,
            none => none.insert(
                reqwest::blocking::Client::builder()
                    .timeout(self.settings.timeout)
                    .build()
                    .map_err(|e| OTelSdkError::InternalFailure(e.to_string()))?,
            ),
        };
        let mut request = client
            .post(&self.settings.endpoint)
            .header("content-type", "application/x-protobuf");
        for (name, value) in &self.settings.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        let response = request
            .body(body)
            .send()
            .map_err(|e| OTelSdkError::InternalFailure(format!("posting spans: {e}")))?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let text = response.text().unwrap_or_default();
        Err(OTelSdkError::InternalFailure(format!(
            "the OTLP receiver answered {status}: {}",
            text.chars().take(200).collect::<String>()
        )))
    }
}

impl SpanExporter for Exporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        if self.shut.load(Ordering::Relaxed) {
            return Err(OTelSdkError::AlreadyShutdown);
        }
        if batch.is_empty() {
            return Ok(());
        }
        let mut body = Vec::with_capacity(self.last_size.load(Ordering::Relaxed));
        encode_request(&mut body, &self.resource, &batch);
        self.last_size.store(body.len(), Ordering::Relaxed);
        self.post(body)
    }

    fn shutdown_with_timeout(&mut self, _timeout: Duration) -> OTelSdkResult {
        self.shut.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn set_resource(&mut self, resource: &Resource) {
        let mut out = Vec::new();
        for (key, value) in resource.iter() {
            message(&mut out, 1, |out| key_value(out, key.as_str(), value));
        }
        self.resource = (out, resource.schema_url().unwrap_or_default().to_owned());
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

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

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
        let mut prefix = Vec::with_capacity(10);
        varint(&mut prefix, len as u64);
        out.splice(at..=at, prefix);
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

/// A `Span` message's fields.
fn span(out: &mut Vec<u8>, span: &SpanData) {
    let context = &span.span_context;
    bytes_field(out, 1, &context.trace_id().to_bytes());
    bytes_field(out, 2, &context.span_id().to_bytes());
    string(out, 3, &context.trace_state().header());
    if span.parent_span_id != opentelemetry::trace::SpanId::INVALID {
        bytes_field(out, 4, &span.parent_span_id.to_bytes());
    }
    string(out, 5, &span.name);
    uint(
        out,
        6,
        match span.span_kind {
            SpanKind::Internal => 1,
            SpanKind::Server => 2,
            SpanKind::Client => 3,
            SpanKind::Producer => 4,
            SpanKind::Consumer => 5,
        },
    );
    fixed64(out, 7, unix_nanos(span.start_time));
    fixed64(out, 8, unix_nanos(span.end_time));
    attributes(out, 9, &span.attributes);
    uint(out, 10, u64::from(span.dropped_attributes_count));
    for event in span.events.iter() {
        message(out, 11, |out| {
            fixed64(out, 1, unix_nanos(event.timestamp));
            string(out, 2, &event.name);
            attributes(out, 3, &event.attributes);
            uint(out, 4, u64::from(event.dropped_attributes_count));
        });
    }
    uint(out, 12, u64::from(span.events.dropped_count));
    for link in span.links.iter() {
        message(out, 13, |out| {
            let context = &link.span_context;
            bytes_field(out, 1, &context.trace_id().to_bytes());
            bytes_field(out, 2, &context.span_id().to_bytes());
            string(out, 3, &context.trace_state().header());
            attributes(out, 4, &link.attributes);
            uint(out, 5, u64::from(link.dropped_attributes_count));
            fixed32(
                out,
                6,
                span_flags(context.trace_flags().to_u8(), context.is_remote()),
            );
        });
    }
    uint(out, 14, u64::from(span.links.dropped_count));
    match &span.status {
        Status::Unset => {}
        Status::Ok => message(out, 15, |out| uint(out, 3, 1)),
        Status::Error { description } => message(out, 15, |out| {
            string(out, 2, description);
            uint(out, 3, 2);
        }),
    }
    fixed32(
        out,
        16,
        span_flags(context.trace_flags().to_u8(), span.parent_span_is_remote),
    );
}

/// An `ExportTraceServiceRequest` holding `batch`, from `resource` (its encoded fields and its
/// schema URL); one `ScopeSpans` per run of spans from the same instrumentation scope.
fn encode_request(out: &mut Vec<u8>, resource: &(Vec<u8>, String), batch: &[SpanData]) {
    message(out, 1, |out| {
        message(out, 1, |out| out.extend_from_slice(&resource.0));
        for run in batch.chunk_by(|a, b| a.instrumentation_scope == b.instrumentation_scope) {
            let scope = &run[0].instrumentation_scope;
            message(out, 2, |out| {
                message(out, 1, |out| {
                    string(out, 1, scope.name());
                    string(out, 2, scope.version().unwrap_or_default());
                    attributes(out, 3, scope.attributes());
                });
                for s in run {
                    message(out, 2, |out| span(out, s));
                }
                string(out, 3, scope.schema_url().unwrap_or_default());
            });
        }
        string(out, 3, &resource.1);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry::InstrumentationScope;
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value;
    use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
    use prost::Message as _;
    use std::borrow::Cow;
    use trellis_schemas::dataplane::span_attributes;

    fn span_data(name: &str, parent: SpanId, status: Status) -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736),
                SpanId::from(0x00f0_67aa_0ba9_02b7),
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: parent,
            parent_span_is_remote: parent != SpanId::INVALID,
            span_kind: SpanKind::Server,
            name: Cow::Owned(name.to_owned()),
            start_time: SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_123_456_789),
            end_time: SystemTime::UNIX_EPOCH + Duration::from_nanos(1_700_000_000_223_456_789),
            attributes: vec![
                KeyValue::new(span_attributes::COMPONENT, "kv-counter"),
                KeyValue::new("http.response.status_code", 200_i64),
                KeyValue::new("ok", true),
                KeyValue::new("ratio", 0.25),
                KeyValue::new("ids", Value::Array(Array::I64(vec![1, -2]))),
                KeyValue::new("long", "x".repeat(300)),
            ],
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status,
            instrumentation_scope: InstrumentationScope::builder("trellis")
                .with_version("1.2.3")
                .build(),
        }
    }

    #[test]
    fn a_batch_decodes_as_the_protobuf_of_the_specification() {
        let mut exporter = Exporter::new(Settings {
            endpoint: String::new(),
            headers: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
        });
        exporter.set_resource(
            &Resource::builder_empty()
                .with_service_name("trellis-host")
                .build(),
        );
        let batch = vec![
            span_data("invoke hello greet", SpanId::INVALID, Status::Unset),
            span_data(
                "link other",
                SpanId::from(7),
                Status::error("trap: unreachable"),
            ),
        ];
        let mut out = Vec::new();
        encode_request(&mut out, &exporter.resource, &batch);
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
        assert_eq!(child.parent_span_id, 7u64.to_be_bytes());
        assert_eq!(child.flags, 0x301, "sampled, parent known to be remote");
        let status = child.status.as_ref().expect("status");
        assert_eq!(status.code, StatusCode::Error as i32);
        assert_eq!(status.message, "trap: unreachable");
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
