//! Traces: OpenTelemetry spans exported with OTLP, and W3C trace context carried on every hop.
//!
//! [`init`] turns export on when the standard environment asks for it:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, and neither
//! `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`. Spans go out over OTLP/HTTP with
//! protobuf, batched on a thread of their own; `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT` and the `OTEL_BSP_*` settings are
//! read as the specification says, and so are `OTEL_TRACES_SAMPLER` and
//! `OTEL_TRACES_SAMPLER_ARG` (the six standard samplers; `parentbased_always_on` by default).
//!
//! Each hop starts a [`Span`] whose parent is the `traceparent` that came with the request and
//! passes [`Span::traceparent`] on with what it sends. With export off, no span is made: a
//! hop passes on the `traceparent` it received unchanged, so trace ids still label log lines and
//! cost nothing else.

use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::SystemTime;

use opentelemetry::trace::{
    SamplingDecision, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::trace::{
    BatchSpanProcessor, IdGenerator as _, RandomIdGenerator, Sampler, ShouldSample as _, SpanData,
    SpanEvents, SpanLinks, SpanProcessor as _,
};
use trellis_schemas::dataplane::TraceParent;

mod otlp;

/// A span's name: a static string, an owned one, or one shared by many spans (`Arc<str>`,
/// not copied per span).
pub use opentelemetry::StringValue;

tokio::task_local! {
    /// The trace context of the control request a task serves.
    static CURRENT: Option<String>;
}

/// Runs `f` with `traceparent` as its task's current trace context ([`current`]): the control
/// requests and host commands it sends and the facts it publishes carry it.
pub async fn in_trace<F: Future>(traceparent: Option<String>, f: F) -> F::Output {
    CURRENT.scope(traceparent, f).await
}

/// The current task's trace context, set by [`in_trace`].
pub fn current() -> Option<String> {
    CURRENT.try_with(Clone::clone).ok().flatten()
}

/// Whether spans are exported.
static ENABLED: AtomicBool = AtomicBool::new(false);
/// Where finished spans go, and how spans are sampled, once export is on.
static EXPORT: OnceLock<Export> = OnceLock::new();

/// What export needs on every span.
#[derive(Debug)]
struct Export {
    /// Where ended spans go.
    sink: Sink,
    sampling: Sampling,
    ids: RandomIdGenerator,
    scope: InstrumentationScope,
}

/// Where ended spans go.
#[derive(Debug)]
enum Sink {
    /// Written out at once and posted as OTLP/HTTP protobuf (the default protocol).
    Protobuf(otlp::Batcher),
    /// The SDK's batch processor and `opentelemetry-otlp`'s exporter, for the other protocols.
    Generic(BatchSpanProcessor),
}

/// The sampler the standard environment names (`OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`).
#[derive(Debug)]
struct Sampling {
    /// Whether a span with a parent follows its parent's decision (the `parentbased_*` samplers).
    parent_based: bool,
    /// The decision for a span without a parent (for every span when not parent-based).
    root: Sampler,
}

impl Sampling {
    /// The sampler of the environment; the specification's default, `parentbased_always_on`,
    /// when it names none or one this process does not know.
    fn from_env() -> Self {
        let name = std::env::var("OTEL_TRACES_SAMPLER").unwrap_or_default();
        let ratio = || {
            std::env::var("OTEL_TRACES_SAMPLER_ARG")
                .ok()
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|r| (0.0..=1.0).contains(r))
                .unwrap_or(1.0)
        };
        let (parent_based, root) = match name.trim() {
            "" | "parentbased_always_on" => (true, Sampler::AlwaysOn),
            "always_on" => (false, Sampler::AlwaysOn),
            "always_off" => (false, Sampler::AlwaysOff),
            "traceidratio" => (false, Sampler::TraceIdRatioBased(ratio())),
            "parentbased_always_off" => (true, Sampler::AlwaysOff),
            "parentbased_traceidratio" => (true, Sampler::TraceIdRatioBased(ratio())),
            other => {
                tracing::warn!(
                    sampler = other,
                    "OTEL_TRACES_SAMPLER names a sampler this process does not have; \
                     sampling with parentbased_always_on"
                );
                (true, Sampler::AlwaysOn)
            }
        };
        Self { parent_based, root }
    }

    /// Whether a span of `trace_id`, whose parent (if any) was `parent_sampled`, is recorded.
    fn sampled(&self, trace_id: TraceId, parent_sampled: Option<bool>) -> bool {
        match parent_sampled {
            Some(sampled) if self.parent_based => sampled,
            // The two constant samplers, decided here: the SDK's sampler builds a whole result
            // (attributes, trace state) for every span it is asked about.
            _ if matches!(self.root, Sampler::AlwaysOn) => true,
            _ if matches!(self.root, Sampler::AlwaysOff) => false,
            _ => {
                self.root
                    .should_sample(None, trace_id, "", &SpanKind::Internal, &[], &[])
                    .decision
                    == SamplingDecision::RecordAndSample
            }
        }
    }
}

/// Whether the environment asks for traces to be exported.
fn wanted() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none");
    !disabled && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

/// Starts exporting spans as `service` (unless `OTEL_SERVICE_NAME` says otherwise) when the
/// environment asks for it (see the [module docs](self)); does nothing otherwise. Returns a
/// guard that flushes what is left when dropped; [`shutdown`] does the same for a process that
/// exits without unwinding.
pub fn init(service: &str) -> Telemetry {
    if !wanted() || EXPORT.get().is_some() {
        return Telemetry(());
    }
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    let resource = resource
        .with_attribute(KeyValue::new("service.version", trellis_schemas::VERSION))
        .build();
    let scope = InstrumentationScope::builder("trellis")
        .with_version(trellis_schemas::VERSION)
        .build();
    // Protobuf over HTTP, the default, is written by Trellis's own encoder; anything else the
    // environment asks for is left to the generic exporter.
    let sink = match otlp::Settings::from_env() {
        Some(settings) => {
            match otlp::Batcher::start(settings, otlp::Limits::from_env(), &resource, &scope) {
                Ok(batcher) => Sink::Protobuf(batcher),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot export traces");
                    return Telemetry(());
                }
            }
        }
        None => match opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
        {
            Ok(exporter) => {
                let mut processor = BatchSpanProcessor::builder(exporter).build();
                processor.set_resource(&resource);
                Sink::Generic(processor)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot export traces");
                return Telemetry(());
            }
        },
    };
    let export = Export {
        sink,
        sampling: Sampling::from_env(),
        ids: RandomIdGenerator::default(),
        scope,
    };
    if EXPORT.set(export).is_ok() {
        ENABLED.store(true, Ordering::Relaxed);
        tracing::info!(service, "exporting traces with OTLP");
    }
    Telemetry(())
}

/// Flushes the spans not exported yet and stops exporting.
pub fn shutdown() {
    if let Some(export) = EXPORT.get()
        && ENABLED.swap(false, Ordering::Relaxed)
    {
        match &export.sink {
            Sink::Protobuf(batcher) => batcher.shutdown(),
            Sink::Generic(processor) => {
                if let Err(e) = processor.shutdown() {
                    tracing::debug!(error = %e, "flushing traces failed");
                }
            }
        }
    }
}

/// Flushes and stops the export when dropped (see [`init`]).
#[derive(Debug)]
#[must_use = "dropping it flushes and stops the export of traces"]
pub struct Telemetry(());

impl Drop for Telemetry {
    fn drop(&mut self) {
        shutdown();
    }
}

/// Whether spans are being exported.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// What a span stands for, as OpenTelemetry's span kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Serving a request that came in.
    Server,
    /// A request sent out, waiting for its answer.
    Client,
}

/// One hop of a trace. Ends when dropped. Without export it is empty and hands on the
/// `traceparent` it was started with.
///
/// A recorded span holds what its OTLP message needs and nothing else, inline (no tracer,
/// context or lock is involved, as a span is only ever touched by the task that serves its
/// hop); when dropped it is written out for export on the spot. Its own `traceparent` is
/// written in place too: a span costs one allocation (its attributes) beyond its name.
#[derive(Debug)]
pub struct Span {
    record: Option<Record>,
    traceparent: Carried,
}

/// What a recorded span's OTLP message needs. The SDK's `SpanData` (events, links, a trace
/// state and a copy of the instrumentation scope, boxed) cost several allocations and about
/// as many instructions again per span, for fields no span of Trellis uses; the other export
/// protocols get one made at the span's end.
#[derive(Debug)]
struct Record {
    trace_id: TraceId,
    span_id: SpanId,
    /// [`SpanId::INVALID`] for the root of a trace; any other parent came with a request, from
    /// another process (remote).
    parent_span_id: SpanId,
    flags: TraceFlags,
    kind: Kind,
    /// Shared names (an `Arc<str>`) and static ones are not copied.
    name: StringValue,
    start: SystemTime,
    /// What its source gives every span, written out once.
    shared: Option<Attributes>,
    /// Its own.
    attributes: Vec<KeyValue>,
    /// Why the span failed, when it did.
    error: Option<String>,
}

impl Record {
    /// The SDK's form of the span, ended at `end`, for the generic exporter.
    fn into_span_data(self, end: SystemTime, scope: &InstrumentationScope) -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                self.trace_id,
                self.span_id,
                self.flags,
                false,
                TraceState::NONE,
            ),
            parent_span_id: self.parent_span_id,
            parent_span_is_remote: self.parent_span_id != SpanId::INVALID,
            span_kind: match self.kind {
                Kind::Server => SpanKind::Server,
                Kind::Client => SpanKind::Client,
            },
            name: Cow::Owned(self.name.as_str().to_owned()),
            start_time: self.start,
            end_time: end,
            attributes: match self.shared {
                Some(shared) => shared
                    .0
                    .list
                    .iter()
                    .cloned()
                    .chain(self.attributes)
                    .collect(),
                None => self.attributes,
            },
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: self.error.map_or(Status::Unset, Status::error),
            instrumentation_scope: scope.clone(),
        }
    }
}

/// Attributes every span of one source carries (a component's name and an instance's id on
/// each of its invocations), written out once: a span copies their bytes into its message whole
/// instead of writing each again. Cloning shares them.
#[derive(Debug, Clone)]
pub struct Attributes(Arc<Prepared>);

#[derive(Debug)]
struct Prepared {
    /// For the generic exporter.
    list: Vec<KeyValue>,
    /// The attributes fields of an OTLP `Span` message.
    encoded: Vec<u8>,
}

impl Attributes {
    /// Attributes of string values (shared strings are not copied).
    pub fn new(pairs: impl IntoIterator<Item = (&'static str, Arc<str>)>) -> Self {
        let list: Vec<KeyValue> = pairs
            .into_iter()
            .map(|(key, value)| KeyValue::new(key, StringValue::from(value)))
            .collect();
        let encoded = otlp::span_attributes(&list);
        Self(Arc::new(Prepared { list, encoded }))
    }
}

/// The `traceparent` a span hands on.
#[derive(Debug)]
enum Carried {
    None,
    /// A version-00 `traceparent` (the span's own, or the one it was started with), in place.
    Inline([u8; TRACEPARENT_LEN]),
    /// One of another length (a later version's), passed on as it came.
    Other(Box<str>),
}

/// The length of a version-00 `traceparent`.
const TRACEPARENT_LEN: usize = 55;

impl Carried {
    fn of(traceparent: Option<&str>) -> Self {
        match traceparent {
            None => Self::None,
            Some(t) => match <[u8; TRACEPARENT_LEN]>::try_from(t.as_bytes()) {
                Ok(bytes) => Self::Inline(bytes),
                Err(_) => Self::Other(t.into()),
            },
        }
    }

    fn as_str(&self) -> Option<&str> {
        match self {
            Self::None => None,
            // Made from a `str` or written as ASCII: the check cannot fail.
            Self::Inline(bytes) => std::str::from_utf8(bytes).ok(),
            Self::Other(t) => Some(t),
        }
    }
}

impl Span {
    /// Starts a span, child of `parent` (a W3C `traceparent`; a new trace when there is none or
    /// it is invalid), named by `name`, which is called only when spans are exported.
    pub fn start<N>(kind: Kind, parent: Option<&str>, name: impl FnOnce() -> N) -> Self
    where
        N: Into<StringValue>,
    {
        Self::begin(kind, parent, name, None)
    }

    /// Like [`start`](Self::start), with the attributes its source gives every span.
    pub fn start_with<N>(
        kind: Kind,
        parent: Option<&str>,
        name: impl FnOnce() -> N,
        shared: &Attributes,
    ) -> Self
    where
        N: Into<StringValue>,
    {
        Self::begin(kind, parent, name, Some(shared))
    }

    fn begin<N>(
        kind: Kind,
        parent: Option<&str>,
        name: impl FnOnce() -> N,
        shared: Option<&Attributes>,
    ) -> Self
    where
        N: Into<StringValue>,
    {
        let export = match EXPORT.get() {
            Some(export) if enabled() => export,
            _ => {
                return Self {
                    record: None,
                    traceparent: Carried::of(parent),
                };
            }
        };
        let parent = parent.and_then(remote);
        let trace_id = parent
            .as_ref()
            .map_or_else(|| export.ids.new_trace_id(), |p| p.trace_id());
        let span_id = export.ids.new_span_id();
        let sampled = export
            .sampling
            .sampled(trace_id, parent.as_ref().map(|p| p.is_sampled()));
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let traceparent = Carried::Inline(traceparent_of(trace_id, span_id, flags));
        if !sampled {
            return Self {
                record: None,
                traceparent,
            };
        }
        Self {
            record: Some(Record {
                trace_id,
                span_id,
                parent_span_id: parent.as_ref().map_or(SpanId::INVALID, |p| p.span_id()),
                flags,
                kind,
                name: name().into(),
                start: SystemTime::now(),
                shared: shared.cloned(),
                attributes: Vec::new(),
                error: None,
            }),
            traceparent,
        }
    }

    /// The `traceparent` to send with what this hop sends on.
    pub fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_str()
    }

    /// Whether the span is exported (sampled): attributes are worth making only then.
    pub fn recording(&self) -> bool {
        self.record.is_some()
    }

    /// Records an attribute.
    pub fn set(&mut self, key: &'static str, value: impl Into<opentelemetry::Value>) {
        if let Some(record) = &mut self.record {
            if record.attributes.capacity() == 0 {
                // Room for the most a span of Trellis sets, in one allocation.
                record.attributes.reserve_exact(4);
            }
            record.attributes.push(KeyValue::new(key, value.into()));
        }
    }

    /// Marks the span failed, with a description.
    pub fn fail(&mut self, description: impl Into<String>) {
        if let Some(record) = &mut self.record {
            record.error = Some(description.into());
        }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(record) = self.record.take()
            && let Some(export) = EXPORT.get()
            && enabled()
        {
            let end = SystemTime::now();
            match &export.sink {
                Sink::Protobuf(batcher) => batcher.push(&record, end),
                Sink::Generic(processor) => {
                    processor.on_end(record.into_span_data(end, &export.scope));
                }
            }
        }
    }
}

/// The remote parent a `traceparent` names, when it is a valid W3C `traceparent`.
fn remote(traceparent: &str) -> Option<SpanContext> {
    let t = TraceParent::parse(traceparent)?;
    Some(SpanContext::new(
        TraceId::from_bytes(t.trace_id_bytes),
        SpanId::from_bytes(t.span_id_bytes),
        TraceFlags::new(t.flags) & TraceFlags::SAMPLED,
        true,
        TraceState::NONE,
    ))
}

/// The W3C `traceparent` of a span (written out by hand: one made per hop, and the formatting
/// machinery costs several times as much).
fn traceparent_of(trace_id: TraceId, span_id: SpanId, flags: TraceFlags) -> [u8; TRACEPARENT_LEN] {
    /// Each byte's two lowercase hex digits.
    const PAIRS: [[u8; 2]; 256] = {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut pairs = [[0; 2]; 256];
        let mut i = 0;
        while i < 256 {
            pairs[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
            i += 1;
        }
        pairs
    };
    fn put(out: &mut [u8], bytes: &[u8]) {
        for (pair, byte) in out.chunks_exact_mut(2).zip(bytes) {
            pair.copy_from_slice(&PAIRS[usize::from(*byte)]);
        }
    }
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-00";
    put(&mut out[3..35], &trace_id.to_bytes());
    put(&mut out[36..52], &span_id.to_bytes());
    put(&mut out[53..55], &[flags.to_u8()]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_and_print_back() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = remote(tp).expect("valid");
        assert!(cx.is_sampled() && cx.is_remote());
        assert_eq!(
            &traceparent_of(cx.trace_id(), cx.span_id(), cx.trace_flags()),
            tp.as_bytes()
        );
        // Fields after the fourth are left for later versions to define.
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more";
        assert!(remote(later).is_some_and(|cx| !cx.is_sampled()));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01x",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            assert!(remote(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn ids_decode_as_the_sdk_decodes_them() {
        for tp in [
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-01",
            "00-0000000000000000000000000000000a-ffffffffffffffff-00",
        ] {
            let t = TraceParent::parse(tp).expect("valid");
            let cx = remote(tp).expect("valid");
            assert_eq!(Ok(cx.trace_id()), TraceId::from_hex(t.trace_id));
            assert_eq!(Ok(cx.span_id()), SpanId::from_hex(t.span_id));
            assert_eq!(
                &traceparent_of(cx.trace_id(), cx.span_id(), cx.trace_flags()),
                tp.to_ascii_lowercase().as_bytes()
            );
        }
    }

    #[test]
    fn samplers_follow_the_parent_or_the_trace_id() {
        let id = |low: u64| TraceId::from(u128::from(low));
        let parent_based = Sampling {
            parent_based: true,
            root: Sampler::AlwaysOn,
        };
        assert!(parent_based.sampled(id(1), None));
        assert!(parent_based.sampled(id(1), Some(true)));
        assert!(!parent_based.sampled(id(1), Some(false)));
        let off = Sampling {
            parent_based: false,
            root: Sampler::AlwaysOff,
        };
        assert!(!off.sampled(id(1), Some(true)));
        // One trace in two: the decision comes from the trace id alone, so every process
        // decides alike.
        let half = Sampling {
            parent_based: false,
            root: Sampler::TraceIdRatioBased(0.5),
        };
        assert!(half.sampled(id(1), Some(false)));
        assert!(!half.sampled(id(u64::MAX), Some(true)));
    }

    #[test]
    fn without_export_a_span_hands_on_its_parent() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let span = Span::start(Kind::Server, Some(tp), || -> String {
            unreachable!("no export, no name")
        });
        assert_eq!(span.traceparent(), Some(tp));
        assert_eq!(
            Span::start(Kind::Server, None, String::new).traceparent(),
            None
        );
        // A later version's, longer, and anything else goes on as it came.
        for other in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-more",
            "not a traceparent",
        ] {
            let span = Span::start(Kind::Client, Some(other), || "unused");
            assert_eq!(span.traceparent(), Some(other));
        }
    }
}
