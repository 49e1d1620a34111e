//! HTTP benchmark: `examples/http-hello` served through the `http-server` provider → NATS →
//! `trellis-host` → a fresh instance per request, then through `http-server` embedded in the
//! host (no NATS hop), against `wasmtime serve` running the same `.wasm`, in one run with the
//! same load.
//!
//! The load is `wrk --latency` with `TRELLIS_BENCH_CONNECTIONS` connections (default 32) on 2
//! threads for `TRELLIS_BENCH_SECS` seconds (default 10) after a 2 s warm-up, on each side.
//! Reports requests/s, p50 and p99 latency, and Trellis's requests/s as a ratio to wasmtime's.
//!
//! Run (needs `wrk` and wasmtime-cli 48.0.8, see `tests/benches/README.md`):
//! `cargo build --release --bins && cargo bench --bench http`.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark")]

use std::time::Duration;

use trellis_tests::bench::{BenchLattice, HttpFigures, env_usize, wasmtime, wrk};
use trellis_tests::{Proc, components, free_port, http_request, wait_for};

const WARM_UP: Duration = Duration::from_secs(2);

/// Waits until `GET url` answers 200 with the greeting.
async fn wait_serving(url: &str) {
    wait_for(
        &format!("{url} to answer"),
        Duration::from_secs(30),
        || async move {
            let reply = http_request("GET", url, "").await.ok()?;
            (reply.status == 200 && reply.body.contains("Hello from Trellis")).then_some(())
        },
    )
    .await;
}

fn measure(name: &str, url: &str, connections: usize, secs: u64) -> HttpFigures {
    let _ = wrk(url, connections, 2, WARM_UP);
    let figures = wrk(url, connections, 2, Duration::from_secs(secs));
    println!(
        "{name:<28} {:>10.0} req/s   p50 {:>8.2} ms   p99 {:>8.2} ms   ({} requests, {} errors)",
        figures.requests_per_sec,
        figures.p50.as_secs_f64() * 1e3,
        figures.p99.as_secs_f64() * 1e3,
        figures.requests,
        figures.errors,
    );
    assert_eq!(figures.errors, 0, "{name}: requests failed under load");
    figures
}

#[tokio::main]
async fn main() {
    let connections = env_usize("TRELLIS_BENCH_CONNECTIONS", 32);
    let secs = env_usize("TRELLIS_BENCH_SECS", 10) as u64;
    let instances = env_usize("TRELLIS_BENCH_INSTANCES", 1);
    let wasmtime = wasmtime();
    let (wasm, manifest) = components::example("http_hello");
    println!(
        "http-hello, {connections} connections, {secs} s per side, {instances} instance(s) on one host"
    );

    let trellis = trellis_side(&wasm, &manifest, instances, false, connections, secs).await;
    let embedded = trellis_side(&wasm, &manifest, instances, true, connections, secs).await;

    let reference = {
        let address = format!("127.0.0.1:{}", free_port());
        let logs = tempfile::tempdir().unwrap();
        let args: Vec<String> = vec![
            "serve".into(),
            "--addr".into(),
            address.clone(),
            "-S".into(),
            "cli".into(),
            wasm.display().to_string(),
        ];
        let _serve = Proc::spawn("wasmtime-serve", &wasmtime, &args, logs.path());
        let url = format!("http://{address}/");
        wait_serving(&url).await;
        measure("wasmtime serve", &url, connections, secs)
    };

    for (name, side) in [("http-server process", trellis), ("embedded", embedded)] {
        println!(
            "ratio trellis ({name})/wasmtime: {:.2} req/s, p50 {:.2}x, p99 {:.2}x",
            side.requests_per_sec / reference.requests_per_sec,
            side.p50.as_secs_f64() / reference.p50.as_secs_f64(),
            side.p99.as_secs_f64() / reference.p99.as_secs_f64(),
        );
    }
}

/// A lattice serving http-hello through `http-server`, as a process of its own (requests cross
/// NATS to the host) or embedded in the host (requests are handed to the instances in process).
async fn trellis_side(
    wasm: &std::path::Path,
    manifest: &std::path::Path,
    instances: usize,
    embedded: bool,
    connections: usize,
    secs: u64,
) -> HttpFigures {
    let (name, providers): (&str, &[&str]) = if embedded {
        ("bench-http-embedded", &[])
    } else {
        ("bench-http", &["http-server"])
    };
    let lat = BenchLattice::up(name, providers).await;
    if embedded {
        lat.cli(&["provider", "start", "http-server", "--embedded", "--wait"]);
    }
    lat.push(wasm, manifest);
    let address = format!("127.0.0.1:{}", free_port());
    lat.cli(&[
        "assignment",
        "grant",
        "component:http-hello",
        "wasi:http/incoming-handler",
        "http-server",
        "--config",
        &format!("address={address}"),
    ]);
    for _ in 0..instances {
        lat.cli(&["instance", "start", "http-hello", "--wait"]);
    }
    let url = format!("http://{address}/");
    wait_serving(&url).await;
    let label = if embedded {
        "trellis (embedded http-server)"
    } else {
        "trellis (http-server→NATS)"
    };
    measure(label, &url, connections, secs)
}
