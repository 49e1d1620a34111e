//! HTTP benchmark: `examples/http-hello` served through the `http-server` provider → NATS →
//! `trellis-host` → a fresh instance per request, then through `http-server` embedded in the
//! host (no NATS hop), against `wasmtime serve` running the same `.wasm`, in one run with the
//! same load.
//!
//! The load is `wrk --latency` with `TRELLIS_BENCH_CONNECTIONS` connections (default 32) on 2
//! threads for `TRELLIS_BENCH_SECS` seconds (default 10) after a 2 s warm-up, on each side.
//! Reports requests/s, p50 and p99 latency, the CPU the whole machine spent per request, and
//! Trellis's requests/s as a ratio to wasmtime's.
//!
//! With `TRELLIS_BENCH_TRACES=1` it measures what exporting traces costs instead (no `wasmtime
//! serve` then): for each Trellis side, two lattices run side by side, one with span export off
//! and one with every span posted to an OTLP/HTTP receiver in the bench's process that only
//! counts what it gets; `TRELLIS_BENCH_ROUNDS` rounds (default 3) load each in turn, in
//! alternating order, and it reports the means and the median change per round.
//!
//! Run (needs `wrk` and a `wasmtime` CLI, see `tests/benches/README.md`):
//! `cargo build --release --bins && cargo bench --bench http`.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark")]

use std::time::Duration;

use trellis_tests::bench::{
    BenchLattice, HttpFigures, clock_ticks_per_sec, env_usize, wasmtime, wrk,
};
use trellis_tests::otlp::OtlpReceiver;
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
    print_figures(name, &figures);
    figures
}

/// Prints one run's figures; fails on any error.
fn print_figures(name: &str, figures: &HttpFigures) {
    println!(
        "{name:<36} {:>8.0} req/s   p50 {:>6.2} ms   p99 {:>6.2} ms   {:>5.1} µs CPU/req   ({} requests, {} errors)",
        figures.requests_per_sec,
        figures.p50.as_secs_f64() * 1e3,
        figures.p99.as_secs_f64() * 1e3,
        figures.cpu_per_request.as_secs_f64() * 1e6,
        figures.requests,
        figures.errors,
    );
    assert_eq!(figures.errors, 0, "{name}: requests failed under load");
}

#[tokio::main]
async fn main() {
    let connections = env_usize("TRELLIS_BENCH_CONNECTIONS", 32);
    let secs = env_usize("TRELLIS_BENCH_SECS", 10) as u64;
    let instances = env_usize("TRELLIS_BENCH_INSTANCES", 1);
    let (wasm, manifest) = components::example("http_hello");
    println!(
        "http-hello, {connections} connections, {secs} s per side, {instances} instance(s) on one host"
    );
    let side = |embedded| Side {
        wasm: &wasm,
        manifest: &manifest,
        instances,
        embedded,
        connections,
        secs,
    };
    if std::env::var("TRELLIS_BENCH_TRACES").is_ok_and(|v| v == "1") {
        let rounds = env_usize("TRELLIS_BENCH_ROUNDS", 3);
        for embedded in [false, true] {
            trace_overhead(&side(embedded), rounds).await;
        }
        return;
    }
    let wasmtime = wasmtime();

    let trellis = trellis_side(&side(false)).await;
    let embedded = trellis_side(&side(true)).await;

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

/// One Trellis side of the benchmark: what it serves, how, and the load it gets.
#[derive(Clone, Copy)]
struct Side<'a> {
    wasm: &'a std::path::Path,
    manifest: &'a std::path::Path,
    instances: usize,
    /// `http-server` embedded in the host, or a process of its own.
    embedded: bool,
    connections: usize,
    secs: u64,
}

/// Measures one Trellis side with span export off and on: both lattices run side by side
/// (one idles while the other is loaded), and each of `rounds` rounds loads one then the other
/// for `secs` each, in alternating order (off-on, on-off, ...), so that the machine's drift
/// over minutes falls on both alike. Every span is posted to a receiver that only counts what
/// it gets.
async fn trace_overhead(side: &Side<'_>, rounds: usize) {
    let receiver = OtlpReceiver::start_counting().await;
    let endpoint = receiver.endpoint();
    let on_env = [("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str())];
    let (off_lattice, off_url) = serving_side(side, &[]).await;
    let (on_lattice, on_url) = serving_side(side, &on_env).await;
    let (off_label, on_label) = labels(side.embedded);
    for url in [&off_url, &on_url] {
        let _ = wrk(url, side.connections, 2, WARM_UP);
    }
    let (mut off_runs, mut on_runs) = (Vec::new(), Vec::new());
    // The CPU time of each lattice's own processes per request, in µs: unlike the machine's, it
    // leaves out `wrk` and the receiver, which stand for clients and a collector.
    let (mut off_cpu, mut on_cpu) = (Vec::new(), Vec::new());
    let tick = 1e6 / clock_ticks_per_sec();
    for round in 0..rounds {
        let mut order = [
            (
                off_label,
                &off_url,
                &off_lattice,
                &mut off_runs,
                &mut off_cpu,
            ),
            (on_label, &on_url, &on_lattice, &mut on_runs, &mut on_cpu),
        ];
        if round % 2 == 1 {
            order.reverse();
        }
        for (label, url, lattice, runs, cpu) in order {
            let before = lattice.cpu_ticks();
            let figures = wrk(url, side.connections, 2, Duration::from_secs(side.secs));
            let used = lattice.cpu_ticks().saturating_sub(before) as f64 * tick;
            let per_request = used / figures.requests.max(1) as f64;
            print_figures(label, &figures);
            println!("    the lattice's processes: {per_request:.1} µs CPU/req");
            runs.push(figures);
            cpu.push(per_request);
        }
    }
    drop((off_lattice, on_lattice));
    let of = |runs: &[HttpFigures], f: fn(&HttpFigures) -> f64| -> Vec<f64> {
        runs.iter().map(f).collect()
    };
    let rps = (
        of(&off_runs, |f| f.requests_per_sec),
        of(&on_runs, |f| f.requests_per_sec),
    );
    let machine = (
        of(&off_runs, |f| f.cpu_per_request.as_secs_f64() * 1e6),
        of(&on_runs, |f| f.cpu_per_request.as_secs_f64() * 1e6),
    );
    let lattice = (off_cpu, on_cpu);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    // Each run with export on is compared with the run of the same round with it off, and the
    // median of those changes is the steadiest figure.
    let median_change = |(off, on): &(Vec<f64>, Vec<f64>)| {
        let mut changes: Vec<f64> = off
            .iter()
            .zip(on)
            .map(|(off, on)| (on / off - 1.0) * 100.0)
            .collect();
        changes.sort_by(f64::total_cmp);
        let mid = changes.len() / 2;
        if changes.len() % 2 == 1 {
            changes[mid]
        } else {
            (changes[mid - 1] + changes[mid]) / 2.0
        }
    };
    let (posts, bytes) = receiver.posts();
    println!(
        "{}, {rounds} rounds (means, off → on): {:.0} → {:.0} req/s; machine {:.1} → {:.1} µs \
         CPU/req; the lattice's processes {:.1} → {:.1} µs CPU/req. Median change per round: \
         {:+.1} % req/s, {:+.1} % machine CPU/req, {:+.1} % lattice CPU/req; the receiver got \
         {posts} posts, {:.1} MB",
        if side.embedded {
            "embedded"
        } else {
            "http-server process"
        },
        mean(&rps.0),
        mean(&rps.1),
        mean(&machine.0),
        mean(&machine.1),
        mean(&lattice.0),
        mean(&lattice.1),
        median_change(&rps),
        median_change(&machine),
        median_change(&lattice),
        bytes as f64 / 1e6,
    );
    assert!(posts > 0, "no span reached the receiver");
}

/// The labels of a side's runs with span export off and on.
fn labels(embedded: bool) -> (&'static str, &'static str) {
    if embedded {
        (
            "trellis (embedded http-server)",
            "trellis (embedded, traced)",
        )
    } else {
        (
            "trellis (http-server→NATS)",
            "trellis (http-server→NATS, traced)",
        )
    }
}

/// Measures a side that serves, with span export off: a warm-up, then the run.
async fn trellis_side(side: &Side<'_>) -> HttpFigures {
    let (_lattice, url) = serving_side(side, &[]).await;
    let (label, _) = labels(side.embedded);
    measure(label, &url, side.connections, side.secs)
}

/// A lattice serving http-hello through `http-server`, as a process of its own (requests cross
/// NATS to the host) or embedded in the host (requests are handed to the instances in process),
/// its processes with `env`.
async fn serving_side(side: &Side<'_>, env: &[(&str, &str)]) -> (BenchLattice, String) {
    let Side {
        wasm,
        manifest,
        instances,
        embedded,
        ..
    } = *side;
    let (name, providers): (&str, &[&str]) = if embedded {
        ("bench-http-embedded", &[])
    } else {
        ("bench-http", &["http-server"])
    };
    let lat = BenchLattice::up_with_env(name, providers, env).await;
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
    (lat, url)
}
