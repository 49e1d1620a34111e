//! Traces: OpenTelemetry spans exported with OTLP, and W3C trace context carried on every hop.
//!
//! [`init`] turns export on when the standard environment asks for it:
//! `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) set, and neither
//! `OTEL_SDK_DISABLED=true` nor `OTEL_TRACES_EXPORTER=none`. Spans go out over OTLP/HTTP with
//! protobuf, batched on a thread of their own; `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`,
//! `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_EXPORTER_OTLP_TIMEOUT` and the `OTEL_BSP_*` settings are
//! read by the SDK as the specification says.
//!
//! Each hop starts a [`Span`] whose parent is the `traceparent` that came with the request and
//! passes [`Span::traceparent`] on with what it sends. With export off, no span is made: a
//! hop passes on the `traceparent` it received unchanged, so trace ids still label log lines and
//! cost nothing else.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceContextExt as _, TraceFlags, TraceId, TraceState,
    Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue, StringValue, global};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use trellis_schemas::dataplane::TraceParent;

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
/// The provider, for the flush at exit.
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();
/// Trellis's tracer, made once.
static TRACER: OnceLock<SdkTracer> = OnceLock::new();

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
    if !wanted() || PROVIDER.get().is_some() {
        return Telemetry(());
    }
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
    {
        Ok(exporter) => exporter,
        Err(e) => {
            tracing::warn!(error = %e, "cannot export traces");
            return Telemetry(());
        }
    };
    let mut resource = opentelemetry_sdk::Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service.to_owned());
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            resource
                .with_attribute(KeyValue::new("service.version", trellis_schemas::VERSION))
                .build(),
        )
        .build();
    global::set_text_map_propagator(TraceContextPropagator::new());
    global::set_tracer_provider(provider.clone());
    let _ = TRACER.set(provider.tracer("trellis"));
    let _ = PROVIDER.set(provider);
    ENABLED.store(true, Ordering::Relaxed);
    tracing::info!(service, "exporting traces with OTLP");
    Telemetry(())
}

/// Flushes the spans not exported yet and stops exporting.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get()
        && ENABLED.swap(false, Ordering::Relaxed)
        && let Err(e) = provider.shutdown()
    {
        tracing::debug!(error = %e, "flushing traces failed");
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
#[derive(Debug)]
pub struct Span {
    span: Option<Context>,
    traceparent: Option<String>,
}

impl Span {
    /// Starts a span, child of `parent` (a W3C `traceparent`; a new trace when there is none or
    /// it is invalid), named by `name`, which is called only when spans are exported.
    pub fn start(kind: Kind, parent: Option<&str>, name: impl FnOnce() -> String) -> Self {
        Self::start_with(kind, parent, name, Vec::new)
    }

    /// Like [`start`](Self::start), with the span's first attributes, made by `attributes` only
    /// when spans are exported (shared strings are not copied; nothing is locked to set them).
    pub fn start_with(
        kind: Kind,
        parent: Option<&str>,
        name: impl FnOnce() -> String,
        attributes: impl FnOnce() -> Vec<(&'static str, Arc<str>)>,
    ) -> Self {
        if !enabled() {
            return Self {
                span: None,
                traceparent: parent.map(str::to_owned),
            };
        }
        let Some(tracer) = TRACER.get() else {
            return Self {
                span: None,
                traceparent: parent.map(str::to_owned),
            };
        };
        let parent_cx = parent.map_or_else(Context::new, extract);
        let span = tracer
            .span_builder(name())
            .with_kind(match kind {
                Kind::Server => SpanKind::Server,
                Kind::Client => SpanKind::Client,
            })
            .with_attributes(
                attributes()
                    .into_iter()
                    .map(|(key, value)| KeyValue::new(key, StringValue::from(value))),
            )
            .start_with_context(tracer, &parent_cx);
        let cx = parent_cx.with_span(span);
        let traceparent = Some(traceparent_of(cx.span().span_context()));
        Self {
            span: Some(cx),
            traceparent,
        }
    }

    /// The `traceparent` to send with what this hop sends on.
    pub fn traceparent(&self) -> Option<&str> {
        self.traceparent.as_deref()
    }

    /// Whether the span is exported (sampled): attributes are worth making only then.
    pub fn recording(&self) -> bool {
        self.span
            .as_ref()
            .is_some_and(|cx| cx.span().is_recording())
    }

    /// Records an attribute.
    pub fn set(&self, key: &'static str, value: impl Into<opentelemetry::Value>) {
        if let Some(cx) = &self.span {
            cx.span().set_attribute(KeyValue::new(key, value.into()));
        }
    }

    /// Marks the span failed, with a description.
    pub fn fail(&self, description: impl Into<String>) {
        if let Some(cx) = &self.span {
            cx.span().set_status(Status::error(description.into()));
        }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(cx) = &self.span {
            cx.span().end();
        }
    }
}

/// The context a `traceparent` names: a remote parent, or none when it is not a valid W3C
/// `traceparent` (then the span starts a new trace).
fn extract(traceparent: &str) -> Context {
    let parsed = TraceParent::parse(traceparent).and_then(|t| {
        Some(SpanContext::new(
            TraceId::from_hex(t.trace_id).ok()?,
            SpanId::from_hex(t.span_id).ok()?,
            TraceFlags::new(t.flags) & TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        ))
    });
    parsed.map_or_else(Context::new, |context| {
        Context::new().with_remote_span_context(context)
    })
}

/// The W3C `traceparent` of a span (written out by hand: one made per hop, and the formatting
/// machinery costs several times as much).
fn traceparent_of(context: &SpanContext) -> String {
    fn push_hex(out: &mut String, bytes: &[u8]) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        for byte in bytes {
            out.push(char::from(DIGITS[usize::from(byte >> 4)]));
            out.push(char::from(DIGITS[usize::from(byte & 0xf)]));
        }
    }
    let mut out = String::with_capacity(55);
    out.push_str("00-");
    push_hex(&mut out, &context.trace_id().to_bytes());
    out.push('-');
    push_hex(&mut out, &context.span_id().to_bytes());
    out.push('-');
    push_hex(&mut out, &[context.trace_flags().to_u8()]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparents_parse_and_print_back() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let cx = extract(tp);
        assert_eq!(traceparent_of(cx.span().span_context()), tp);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
        ] {
            assert!(!extract(bad).span().span_context().is_valid(), "{bad:?}");
        }
    }

    #[test]
    fn without_export_a_span_hands_on_its_parent() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let span = Span::start(Kind::Server, Some(tp), || {
            unreachable!("no export, no name")
        });
        assert_eq!(span.traceparent(), Some(tp));
        assert_eq!(
            Span::start(Kind::Server, None, String::new).traceparent(),
            None
        );
    }
}
