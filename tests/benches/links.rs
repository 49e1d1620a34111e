//! Linked calls: one component calling another through a link.
//!
//! Starts a nats-server, a controller and two `trellis-host` processes, pushes the `pipe_front`,
//! `pipe_middle` and `pipe_stage` test components and measures:
//!
//! 1. a linked call with small arguments, caller and target on the same host (handed over in
//!    process), as the caller's guest times it: p50, p99 and the mean of `TRELLIS_BENCH_LINKED`
//!    calls (default 20,000);
//! 2. the same with the target only on the other host (over NATS), beside the floor under it:
//!    a bare async-nats request and reply on loopback between this process and a responder
//!    process (each with a two-thread runtime, as each host has), with the same small arguments
//!    and headers, alternated with it;
//! 3. calls/s through a three-stage pipeline on one host (front → middle → stage, two linked
//!    calls per request), from `TRELLIS_BENCH_CALLERS` concurrent NATS callers (default 32)
//!    for `TRELLIS_BENCH_SECS` seconds (default 10).
//!
//! Run: `cargo build --release --bins && cargo bench --bench links`.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark")]

use std::time::{Duration, Instant};

use serde_json::Value;
use trellis_schemas::dataplane::{self, Op};
use trellis_schemas::{ComponentName, Lattice};
use trellis_tests::bench::{BareResponder, call_load, env_usize, quantile, serve_bare_if_asked};
use trellis_tests::{Nats, push_test_component};

const TRANSFORM: &str = "example:pipeline/transform";

fn manifest(name: &str, imports: bool) -> String {
    format!(
        r#"
[component]
name = "{name}"
version = "0.1.0"
[limits]
max_memory = "32MiB"
fuel = 10_000_000_000
timeout = "60s"
max_concurrency = 256
[capabilities]
imports = [{}]
"#,
        if imports {
            "\"example:pipeline/transform\", \"wasi:keyvalue/store\", \"wasi:keyvalue/atomics\""
        } else {
            ""
        }
    )
}

fn ok(nats: &Nats, l: &Lattice, args: &[&str]) -> String {
    nats.cli_ok(l, args)
}

fn link(nats: &Nats, l: &Lattice, source: &str, target: &str) -> String {
    let out = ok(
        nats,
        l,
        &["link", "add", source, TRANSFORM, target, "-o", "json"],
    );
    let reply: Value = serde_json::from_str(&out).unwrap();
    reply["link"]["link_id"].as_str().unwrap().to_owned()
}

/// Has the front time `n` linked calls; prints and returns (p50, p99, mean) in µs.
fn guest_bench(nats: &Nats, l: &Lattice, label: &str, n: usize) {
    let out = ok(
        nats,
        l,
        &["call", "front", "bench", &n.to_string(), "--timeout", "90s"],
    );
    let v: Value = serde_json::from_str(out.trim()).unwrap();
    let us = |i: usize| v[i].as_u64().unwrap() as f64 / 1000.0;
    println!(
        "{label}: {n} linked calls, p50 {:.1} µs, p99 {:.1} µs, mean {:.1} µs",
        us(0),
        us(1),
        us(2) / n as f64
    );
}

/// The subject of the bare responder.
const BARE: &str = "bench.bare.echo";

/// `n` sequential requests to the [`BareResponder`] on [`BARE`] from this process's runtime through the
/// same nats-server, carrying what a linked call carries (an export header, a traceparent, a
/// small JSON body); prints p50, p99 and the mean.
async fn bare_round_trip(nats: &Nats, n: usize) {
    let client = nats.client().await;
    let mut headers = trellis_bus::dataplane::call_headers(&format!("{TRANSFORM}#apply"));
    headers.insert(
        trellis_bus::dataplane::NAMES.traceparent.clone(),
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    let mut times = Vec::with_capacity(n);
    for i in 0..n + n / 10 {
        let started = Instant::now();
        client
            .request_with_headers(BARE, headers.clone(), "[\"a\",\"b\"]".into())
            .await
            .unwrap();
        if i >= n / 10 {
            times.push(started.elapsed());
        }
    }
    let mean = times.iter().sum::<Duration>() / n as u32;
    let p50 = quantile(&mut times, 0.5);
    let p99 = quantile(&mut times, 0.99);
    println!(
        "  the floor, bare NATS request/reply between two processes: {n} requests, p50 {:.1} µs, p99 {:.1} µs, mean {:.1} µs",
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6,
        mean.as_secs_f64() * 1e6
    );
}

fn main() {
    serve_bare_if_asked();
    bench();
}

#[tokio::main]
async fn bench() {
    let linked = env_usize("TRELLIS_BENCH_LINKED", 20_000);
    let callers = env_usize("TRELLIS_BENCH_CALLERS", 32);
    let secs = env_usize("TRELLIS_BENCH_SECS", 10);
    let nats = Nats::start().await;
    let l = Lattice::new("bench-links").unwrap();
    let _controller = nats.controller(&l, "c", "10s");
    let _h1 = nats.host(&l, "h1", &[]);
    let _h2 = nats.host(&l, "h2", &[]);
    nats.wait_for_hosts(&l, 2).await;
    let cli = |args: &[&str]| {
        let mut all = vec!["--lattice", l.as_str()];
        all.extend_from_slice(args);
        nats.cli(&all)
    };
    push_test_component(&cli, "pipe_front", &manifest("front", true));
    push_test_component(&cli, "pipe_middle", &manifest("middle", true));
    push_test_component(&cli, "pipe_stage", &manifest("stage", false));

    let front_to_stage = link(&nats, &l, "component:front", "stage");
    nats.start_instance(&l, "front", &["--host", "h1"]);
    let stage_h1 = nats.start_instance(&l, "stage", &["--host", "h1"]);
    // Warm up (first instantiation, caches).
    guest_bench(&nats, &l, "warm-up, same host", 1_000);
    guest_bench(&nats, &l, "same host (in process)", linked);

    nats.start_instance(&l, "stage", &["--host", "h2"]);
    ok(&nats, &l, &["instance", "stop", &stage_h1, "--wait"]);
    guest_bench(&nats, &l, "warm-up, across hosts", 200);
    // Alternated with the floor, so that both see the same machine (two shared cores make
    // single runs differ by a tenth or more).
    let _responder = BareResponder::start(&nats.url(), BARE, "\"A-B\"");
    for round in 1..=3 {
        guest_bench(
            &nats,
            &l,
            &format!("across hosts (NATS), round {round}"),
            linked / 12,
        );
        bare_round_trip(&nats, linked / 12).await;
    }

    // Three stages on h1: front → middle → stage.
    ok(&nats, &l, &["link", "rm", &front_to_stage]);
    link(&nats, &l, "component:front", "middle");
    link(&nats, &l, "component:middle", "stage");
    nats.start_instance(&l, "middle", &["--host", "h1"]);
    nats.start_instance(&l, "stage", &["--host", "h1"]);
    let check = ok(&nats, &l, &["call", "front", "run", "\"check\""]);
    assert!(
        check.contains("middle") && check.contains("CHECK"),
        "{check}"
    );
    guest_bench(&nats, &l, "two hops, same host", linked / 4);

    let client = nats.client().await;
    let subject = dataplane::component(&l, &ComponentName::new("front").unwrap(), Op::Call);
    let load = ("run", "[\"bench\"]");
    let (done, failed) = call_load(
        &client,
        &subject,
        load,
        callers,
        secs,
        Duration::from_secs(10),
    )
    .await;
    println!(
        "three-stage pipeline on one host: {:.0} requests/s ({} ok, {} failed, {callers} callers, {secs} s; each request = 1 NATS call + 2 linked calls)",
        done as f64 / secs as f64,
        done,
        failed
    );
}
