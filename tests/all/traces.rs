//! Traces at a real OTLP/HTTP receiver: one HTTP request through `http-server` → `kv-counter`
//! on a host → the `kv` provider is one trace with spans from the three processes, each span's
//! parent the span of the hop before; and one `trellis instance start` is one trace from the CLI
//! through the controller to the host's command, whose `instance.started` fact carries it.

use std::time::Duration;

use trellis_schemas::dataplane::span_attributes;
use trellis_tests::otlp::{OtlpReceiver, Received};
use trellis_tests::{Nats, Proc, bin, components, free_port, lattice, wait_for};

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

#[tokio::test]
async fn an_http_request_and_an_instance_start_are_each_one_trace_across_processes() {
    let receiver = OtlpReceiver::start().await;
    let endpoint = receiver.endpoint();
    let otel = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let nats = Nats::start().await;
    let l = lattice("traces");
    let common = |extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = vec![
            "--nats".into(),
            nats.connect_url(),
            "--lattice".into(),
            l.to_string(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        args
    };
    let _controller = Proc::spawn_env(
        "controller-c1",
        &bin("trellis"),
        &common(&["controller", "--replica-id", "c1"]),
        nats.logs(),
        &otel,
    );
    let _host = Proc::spawn_env(
        "host-h1",
        &bin("trellis-host"),
        &common(&["--host-id", "h1", "--heartbeat-interval", "200ms"]),
        nats.logs(),
        &otel,
    );
    let _kv = Proc::spawn_env(
        "provider-kv-traces",
        &bin("trellis-provider-kv"),
        &common(&[]),
        nats.logs(),
        &otel,
    );
    let _http = Proc::spawn_env(
        "provider-http-server-traces",
        &bin("trellis-provider-http-server"),
        &common(&[]),
        nats.logs(),
        &otel,
    );
    nats.wait_for_a_host(&l).await;
    let (wasm, manifest) = components::example("kv_counter");
    nats.push(&l, &wasm, &manifest);
    let port = free_port();
    let listen = format!("wasi:http/incoming-handler address=127.0.0.1:{port}");
    // The CLI exports too, with the same environment.
    let started = std::process::Command::new(bin("trellis"))
        .args(common(&[
            "instance",
            "start",
            "kv-counter",
            "--grant",
            "wasi:keyvalue bucket=traced",
            "--grant",
            &listen,
            "--wait",
            "-o",
            "json",
        ]))
        .envs(otel)
        .output()
        .unwrap();
    assert!(started.status.success(), "{started:?}");
    let reply: serde_json::Value = serde_json::from_slice(&started.stdout).unwrap();
    let instance = reply["instances"][0]["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();

    // A client that is part of a trace already: its span is the root's parent.
    let url = format!("http://127.0.0.1:{port}/traced");
    let traceparent = format!("00-{TRACE}-{CLIENT_SPAN}-01");
    wait_for(
        "kv-counter to answer over HTTP",
        Duration::from_secs(30),
        || async {
            let request = http::Request::get(&url)
                .header("traceparent", &traceparent)
                .body(String::new())
                .unwrap();
            let reply = trellis_tests::http_send(request, Duration::from_secs(5))
                .await
                .ok()?;
            (reply.status == 200).then_some(())
        },
    )
    .await;

    let of_trace = |spans: Vec<Received>| -> Vec<Received> {
        spans
            .into_iter()
            .filter(|r| hex::encode(&r.span.trace_id) == TRACE)
            .collect()
    };
    let services = [
        "trellis-provider-http-server",
        "trellis-host",
        "trellis-provider-kv",
    ];
    let spans = wait_for(
        "spans from three processes",
        Duration::from_secs(30),
        || async {
            let spans = of_trace(receiver.spans());
            services
                .iter()
                .all(|s| spans.iter().any(|r| r.service == *s))
                .then_some(spans)
        },
    )
    .await;
    let by = |service: &str| -> Vec<&Received> {
        spans.iter().filter(|r| r.service == service).collect()
    };
    let id = |bytes: &[u8]| hex::encode(bytes);

    // The request that answered 200 (the first ones may have raced the listener: take the last
    // server span of http-server whose child the host served).
    let host_spans = by("trellis-host");
    let invoke = host_spans
        .iter()
        .rev()
        .find(|r| r.span.name == "invoke kv-counter wasi:http/incoming-handler#handle")
        .unwrap_or_else(|| panic!("no invocation span: {host_spans:#?}"));
    let http_span = by("trellis-provider-http-server")
        .into_iter()
        .find(|r| r.span.span_id == invoke.span.parent_span_id)
        .unwrap_or_else(|| panic!("the invocation's parent is no http-server span: {spans:#?}"));
    assert_eq!(http_span.span.name, "GET");
    assert_eq!(
        id(&http_span.span.parent_span_id),
        CLIENT_SPAN,
        "the http-server span continues the client's trace"
    );
    let kv: Vec<&Received> = by("trellis-provider-kv")
        .into_iter()
        .filter(|r| r.span.parent_span_id == invoke.span.span_id)
        .collect();
    assert!(
        !kv.is_empty(),
        "kv provider spans are children of the invocation: {spans:#?}"
    );
    assert!(
        kv.iter().all(|r| r.span.name == "kv wasi:keyvalue"),
        "{kv:#?}"
    );
    // Server spans, each with its own id.
    for r in [http_span, *invoke].into_iter().chain(kv.iter().copied()) {
        assert_eq!(r.span.kind, 2, "SPAN_KIND_SERVER: {r:#?}");
        assert_eq!(r.span.span_id.len(), 8);
    }
    // What each says of itself: the attributes its process gives every span of the instance or
    // listener, and those of the request.
    // (`--grant` at the start assigns the listener to the instance.)
    let target = format!("instance:{instance}");
    for (r, key, want) in [
        (*invoke, span_attributes::COMPONENT, "kv-counter"),
        (*invoke, span_attributes::INSTANCE, instance.as_str()),
        (*invoke, "http.response.status_code", "200"),
        (http_span, span_attributes::TARGET, target.as_str()),
        (http_span, "http.request.method", "GET"),
        (http_span, "url.path", "/traced"),
        (http_span, "http.response.status_code", "200"),
    ] {
        assert_eq!(attribute(r, key).as_deref(), Some(want), "{key}: {r:#?}");
    }

    // The start: CLI → controller → host command, and the fact it caused.
    let facts = nats.facts(&l).await;
    let fact = facts
        .iter()
        .find(|f| {
            matches!(&f.event.data, trellis_schemas::FactData::InstanceStarted(d) if d.instance_id.as_str() == instance)
        })
        .expect("instance.started");
    let traceparent = fact
        .event
        .traceparent
        .clone()
        .expect("the fact carries the start's trace context");
    let mut parts = traceparent.split('-');
    let (trace, parent) = (
        parts.nth(1).unwrap().to_owned(),
        parts.next().unwrap().to_owned(),
    );
    let spans = wait_for("the start's spans", Duration::from_secs(30), || async {
        let spans: Vec<Received> = receiver
            .spans()
            .into_iter()
            .filter(|r| id(&r.span.trace_id) == trace)
            .collect();
        (["trellis", "trellis-controller", "trellis-host"]
            .iter()
            .all(|s| spans.iter().any(|r| r.service == *s)))
        .then_some(spans)
    })
    .await;
    let one = |service: &str, name: &str| -> &Received {
        spans
            .iter()
            .find(|r| r.service == service && r.span.name == name)
            .unwrap_or_else(|| panic!("no {service} span {name}: {spans:#?}"))
    };
    let root = one("trellis", "trellis instance");
    let controller = one("trellis-controller", "instance.start");
    let command = one("trellis-host", "instance.start");
    assert!(
        root.span.parent_span_id.is_empty(),
        "the CLI command is the root"
    );
    assert_eq!(controller.span.parent_span_id, root.span.span_id);
    assert_eq!(command.span.parent_span_id, controller.span.span_id);
    assert_eq!(
        id(&command.span.span_id),
        parent,
        "the fact is a child of the host's command"
    );
}

/// A span's attribute `key`, its value written out (strings as they are, integers in decimal).
fn attribute(r: &Received, key: &str) -> Option<String> {
    use opentelemetry_proto::tonic::common::v1::any_value::Value;
    let value = r.span.attributes.iter().find(|kv| kv.key == key)?;
    match value.value.as_ref()?.value.as_ref()? {
        Value::StringValue(s) => Some(s.clone()),
        Value::IntValue(i) => Some(i.to_string()),
        other => Some(format!("{other:?}")),
    }
}
