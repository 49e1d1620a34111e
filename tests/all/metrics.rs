//! Prometheus metrics: a real Prometheus server scrapes the controller, a host and a `kv`
//! provider of a running lattice, and what it stored is checked through its query API.

use std::time::Duration;

use serde_json::Value;
use trellis_tests::prometheus::Prometheus;
use trellis_tests::{Nats, Proc, bin, components, free_port, lattice};

/// What a query must return: a test of its result.
type Check = Box<dyn Fn(&Value) -> bool>;

/// The one value of an instant query's result, as a number; None unless exactly one series.
fn only_value(result: &Value) -> Option<f64> {
    match result.as_array()?.as_slice() {
        [series] => series["value"][1].as_str()?.parse().ok(),
        _ => None,
    }
}

#[tokio::test]
async fn prometheus_scrapes_invocations_provider_calls_and_controller_requests() {
    let nats = Nats::start().await;
    let l = lattice("metrics");
    let addr = |port: u16| format!("127.0.0.1:{port}");
    let (ctl_addr, host_addr, kv_addr) = (addr(free_port()), addr(free_port()), addr(free_port()));
    let controller_args: Vec<String> = [
        "--nats",
        &nats.connect_url(),
        "--lattice",
        l.as_str(),
        "controller",
        "--replica-id",
        "c1",
        "--metrics",
        &ctl_addr,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    let _controller = Proc::spawn(
        "controller-c1",
        &bin("trellis"),
        &controller_args,
        nats.logs(),
    );
    let _host = nats.host_with(&l, "h1", &[], &["--metrics", &host_addr]);
    let _kv = nats.provider(&l, "kv", &["--metrics", &kv_addr]);
    let prometheus = Prometheus::start(&[
        ("controller", ctl_addr.clone()),
        ("host", host_addr.clone()),
        ("kv", kv_addr.clone()),
    ])
    .await;
    prometheus.targets_up(Duration::from_secs(60)).await;

    let cli = |args: &[&str]| nats.cli_ok(&l, args);
    let wasm = components::build().path("kv_probe");
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("kv-probe.toml");
    std::fs::write(&manifest, components::KV_PROBE_MANIFEST).unwrap();
    nats.push(&l, &wasm, &manifest);
    trellis_tests::wait_for("the kv provider", Duration::from_secs(30), || async {
        let out = cli(&["provider", "ls", "-o", "json"]);
        let v: Value = serde_json::from_str(&out).ok()?;
        (!v["providers"].as_array()?.is_empty()).then_some(())
    })
    .await;
    cli(&[
        "instance",
        "start",
        "kv-probe",
        "--grant",
        "wasi:keyvalue bucket=metrics",
        "--wait",
    ]);
    // Three invocations, each opening the store and making 5 set+get pairs (33 provider calls),
    // and one of an export the component does not have (the caller's fault: rejected).
    for _ in 0..3 {
        let out = cli(&["call", "kv-probe", "round-trips", "\"\"", "\"m\"", "5"]);
        let answer: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(answer["ok"], 5, "round-trips answered {out}");
    }
    let (code, _, _) = nats.cli(&["--lattice", l.as_str(), "call", "kv-probe", "nope"]);
    assert_ne!(code, 0, "an unknown export fails");

    let wait = Duration::from_secs(30);
    let equals = |want: f64| move |r: &Value| only_value(r) == Some(want);
    let positive = |r: &Value| only_value(r).is_some_and(|v| v > 0.0);
    let checks: Vec<(&str, &str, Check)> = vec![
        (
            "answered invocations",
            r#"trellis_invocations_total{job="host",component="kv-probe",outcome="ok"}"#,
            Box::new(equals(3.0)),
        ),
        (
            "rejected invocations",
            r#"trellis_invocations_total{component="kv-probe",outcome="rejected"}"#,
            Box::new(equals(1.0)),
        ),
        (
            "no crash",
            r#"trellis_invocations_total{component="kv-probe",outcome="crashed"}"#,
            Box::new(equals(0.0)),
        ),
        (
            "the duration histogram's count",
            r#"trellis_invocation_duration_seconds_count{component="kv-probe"}"#,
            Box::new(equals(4.0)),
        ),
        (
            "every invocation in the histogram, and within 5 s",
            r#"trellis_invocation_duration_seconds_bucket{component="kv-probe",le="5.0"}"#,
            Box::new(equals(4.0)),
        ),
        (
            "fuel consumed",
            r#"trellis_fuel_consumed_total{component="kv-probe"}"#,
            Box::new(positive),
        ),
        (
            "the memory high-water mark",
            r#"trellis_memory_high_water_bytes{component="kv-probe"}"#,
            Box::new(positive),
        ),
        (
            "nothing in flight",
            r#"trellis_invocations_in_flight{component="kv-probe"}"#,
            Box::new(equals(0.0)),
        ),
        (
            "no restart",
            r#"trellis_instance_restarts_total{component="kv-probe"}"#,
            Box::new(equals(0.0)),
        ),
        (
            "one running instance",
            r#"trellis_host_instances{job="host",state="running"}"#,
            Box::new(equals(1.0)),
        ),
        (
            "heartbeats",
            r#"trellis_host_heartbeats_total{job="host"}"#,
            Box::new(positive),
        ),
        (
            "one component load",
            r#"sum(trellis_host_component_loads_total{job="host"})"#,
            Box::new(equals(1.0)),
        ),
        (
            "the kv provider's calls",
            r#"trellis_provider_calls_total{job="kv",provider="kv",capability="wasi:keyvalue",outcome="ok"}"#,
            Box::new(equals(33.0)),
        ),
        (
            "the kv provider's latency histogram",
            r#"trellis_provider_call_duration_seconds_count{job="kv",capability="wasi:keyvalue"}"#,
            Box::new(equals(33.0)),
        ),
        (
            "the controller's instance.start",
            r#"trellis_controller_requests_total{op="instance.start",code="ok"}"#,
            Box::new(equals(1.0)),
        ),
        (
            "the controller's request latency",
            r#"trellis_controller_request_duration_seconds_count{op="instance.start"}"#,
            Box::new(equals(1.0)),
        ),
        (
            "facts applied",
            r#"trellis_controller_facts_applied_total"#,
            Box::new(positive),
        ),
        (
            "no lag behind the stream",
            r#"trellis_controller_stream_lag"#,
            Box::new(equals(0.0)),
        ),
    ];
    for (what, query, ok) in &checks {
        prometheus.wait_for_query(what, query, wait, ok).await;
    }
}
