//! Micro-VM instances against in-process ones, on the same component in the same run.
//!
//! Starts a nats-server, a controller and one `trellis-host` that runs micro-VMs (under TCG on
//! machines without hardware virtualisation: the figures are labelled with the acceleration),
//! pushes the `hello` example and measures:
//!
//! 1. the start of a micro-VM instance as `trellis instance start --wait` sees it: cold (boot,
//!    then loading the component the host compiled for the guest) on a host without a pool, and
//!    warm on a host that keeps one guest booted (`--microvm-pool 1`; the bench waits for it to
//!    refill between starts), `TRELLIS_BENCH_STARTS` times each (default 3); and of an
//!    in-process instance;
//! 2. per-call latency (p50, p99) of `TRELLIS_BENCH_CALLS` sequential calls (default 2,000) on
//!    each instance's own subject;
//! 3. calls/s from `TRELLIS_BENCH_CALLERS` concurrent callers (default 16) for
//!    `TRELLIS_BENCH_SECS` seconds (default 5) on each;
//! 4. the round trip of as many sequential calls of an export the component lacks, which the
//!    runtime refuses before it takes or makes an instance: what a call costs besides the
//!    guest's instantiation and code (for a micro-VM, the channel and the agent's dispatch);
//! 5. the resident memory of one idle micro-VM and the CPU it uses (its QEMU process).
//!
//! Run: `cargo build --release --bins && cargo bench --bench microvm`.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark")]

use std::time::{Duration, Instant};

use trellis_bus::dataplane as codec;
use trellis_schemas::dataplane::{self, ErrorCode, Op};
use trellis_schemas::{InstanceId, Lattice};
use trellis_tests::bench::{
    call_load, clock_ticks_per_sec, cpu_ticks, env_usize, quantile, status_kib,
};
use trellis_tests::{Nats, components, microvm};

/// Sequential calls of `export` on `instance`: p50 and p99. `greet` must answer; an export the
/// component lacks must be refused as such.
async fn latency(
    client: &async_nats::Client,
    l: &Lattice,
    instance: &str,
    export: &str,
    n: usize,
) -> (Duration, Duration) {
    let subject = dataplane::instance(l, &InstanceId::new(instance).unwrap(), Op::Call);
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let sent = Instant::now();
        let reply = codec::request(
            client,
            subject.clone(),
            codec::call_headers(export),
            "[\"bench\"]".into(),
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        match codec::read_reply(&reply) {
            Err(e) if export != "greet" => assert_eq!(e.code, ErrorCode::UnknownExport, "{e:?}"),
            answer => answer.unwrap(),
        }
        times.push(sent.elapsed());
    }
    (quantile(&mut times, 0.5), quantile(&mut times, 0.99))
}

/// Calls/s on `instance` from `callers` concurrent callers for `secs` seconds.
async fn throughput(
    client: &async_nats::Client,
    l: &Lattice,
    instance: &str,
    callers: usize,
    secs: usize,
) -> (f64, usize) {
    let subject = dataplane::instance(l, &InstanceId::new(instance).unwrap(), Op::Call);
    let load = ("greet", "[\"bench\"]");
    let (done, failed) = call_load(
        client,
        &subject,
        load,
        callers,
        secs,
        Duration::from_secs(30),
    )
    .await;
    (done as f64 / secs as f64, failed)
}

fn list(times: &[Duration]) -> String {
    times
        .iter()
        .map(|d| format!("{d:.2?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The pid of the QEMU process of `instance`'s micro-VM.
fn vm_pid(instance: &str) -> Option<i32> {
    let name = format!("trellis-vm-{instance}");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            String::from_utf8_lossy(&cmdline)
                .contains(&name)
                .then_some(pid)
        })
}

/// The share of one host core process `pid` uses over `window`.
async fn cpu_share(pid: i32, window: Duration) -> f64 {
    let before = cpu_ticks(pid);
    tokio::time::sleep(window).await;
    let used = cpu_ticks(pid).saturating_sub(before);
    used as f64 / clock_ticks_per_sec() / window.as_secs_f64()
}

/// An export `hello` lacks. The runtime refuses a call of it when it looks the export up, before
/// any instance is taken or made: its round trip is the path's own cost (NATS and the host, and
/// for a micro-VM the channel and the agent), without the guest's instantiation and code.
const MISSING: &str = "bench:missing/none#nothing";

#[tokio::main]
async fn main() {
    let starts = env_usize("TRELLIS_BENCH_STARTS", 3);
    let calls = env_usize("TRELLIS_BENCH_CALLS", 2_000);
    let callers = env_usize("TRELLIS_BENCH_CALLERS", 16);
    let secs = env_usize("TRELLIS_BENCH_SECS", 5);
    let image = microvm::image();
    let (wasm, manifest) = components::example("hello");
    let nats = Nats::start().await;
    let l = Lattice::new("bench-microvm").unwrap();
    let _controller = nats.controller(&l, "c", "30s");
    let args = image.host_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let _host = nats.host_with(&l, "h1", &[], &args);
    let mut pooled = args.clone();
    pooled.extend(["--microvm-pool", "1"]);
    let _warm_host = nats.host_with(&l, "h2", &[], &pooled);
    nats.wait_for_hosts(&l, 2).await;
    nats.push(&l, &wasm, &manifest);
    let hosts = nats.cli_ok(&l, &["host", "get", "h1"]);
    let accel = if hosts.contains("kvm") { "kvm" } else { "tcg" };

    let mut warm_starts = Vec::new();
    for _ in 0..starts {
        // Time for the pool to (re)fill: a boot takes a few seconds under TCG.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let started = Instant::now();
        let id = nats.start_instance(&l, "hello", &["--isolation", "microvm", "--host", "h2"]);
        warm_starts.push(started.elapsed());
        nats.cli_ok(&l, &["instance", "stop", &id, "--wait"]);
    }
    let mut vm_starts = Vec::new();
    let mut vm = String::new();
    for i in 0..starts {
        let started = Instant::now();
        let id = nats.start_instance(&l, "hello", &["--isolation", "microvm", "--host", "h1"]);
        vm_starts.push(started.elapsed());
        if i + 1 < starts {
            nats.cli_ok(&l, &["instance", "stop", &id, "--wait"]);
        } else {
            vm = id;
        }
    }
    let started = Instant::now();
    let local = nats.start_instance(&l, "hello", &["--host", "h1"]);
    let local_start = started.elapsed();
    println!(
        "start ({accel}): micro-VM cold {}; from the pool {}; in process {local_start:.2?}",
        list(&vm_starts),
        list(&warm_starts)
    );
    // Past the second after which an idle runtime's epoch ticker sleeps.
    tokio::time::sleep(Duration::from_secs(2)).await;
    if let Some(pid) = vm_pid(&vm) {
        let rss = status_kib(pid, "VmRSS") as f64 / 1024.0;
        let cpu = cpu_share(pid, Duration::from_secs(10)).await;
        println!(
            "idle micro-VM ({accel}): {rss:.0} MiB resident, {:.1} % of a core over 10 s (QEMU process)",
            cpu * 100.0
        );
    }

    let client = nats.client().await;
    for (label, id) in [
        ("in process", &local),
        (&format!("micro-VM ({accel})") as &str, &vm),
    ] {
        latency(&client, &l, id, "greet", 200).await;
        let (p50, p99) = latency(&client, &l, id, "greet", calls).await;
        let (rate, failed) = throughput(&client, &l, id, callers, secs).await;
        let (trip, _) = latency(&client, &l, id, MISSING, calls).await;
        println!(
            "{label}: {calls} sequential calls p50 {p50:.2?}, p99 {p99:.2?}; {rate:.0} calls/s from {callers} callers ({failed} failed); round trip without an instance p50 {trip:.2?}"
        );
    }
}
