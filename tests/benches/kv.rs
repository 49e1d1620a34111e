//! Key-value benchmark: set-then-get round trips from a component (guest → host → NATS → `kv`
//! provider → JetStream KV) against a raw async-nats KV client doing the same operations on the
//! same bucket, in one run.
//!
//! The guest is the `kv_probe` test component; its `round-trips` export does `n` set+get pairs in
//! one invocation (keys `bench<caller>-0` … `-15`: each caller its own), so the figure is the capability path, not the
//! call path; requests sent straight to the provider with the instance's identity show what the
//! provider hop alone costs. Runs `TRELLIS_BENCH_ROUND_TRIPS` pairs (default 5,000) sequentially, then the same
//! from `TRELLIS_BENCH_CALLERS` concurrent callers (default 8), on each side. Reports round trips
//! per second and Trellis's figure as a ratio to the raw client's.
//!
//! Then the same with the provider embedded in the host (`trellis provider start kv --embedded`),
//! which the host prefers: guest → host → JetStream KV, no second process and no extra hop.
//!
//! Run: `cargo build --release --bins && cargo bench --bench kv`.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark")]

use std::time::{Duration, Instant};

use async_nats::jetstream;
use trellis_schemas::capability::rpc::{CapabilityRequest, KvRequest};
use trellis_tests::bench::{BenchLattice, clock_ticks_per_sec, cpu_ticks, env_usize};
use trellis_tests::components;

const BUCKET: &str = "bench";

/// Round trips per second of `callers` concurrent runs of `per_caller` round trips each.
async fn from_component(
    client: &async_nats::Client,
    lat: &BenchLattice,
    instance: &str,
    callers: usize,
    per_caller: usize,
) -> f64 {
    let began = Instant::now();
    let mut runs = Vec::new();
    for caller in 0..callers {
        let client = client.clone();
        let l = lat.l.clone();
        let instance = instance.to_owned();
        runs.push(tokio::spawn(async move {
            let text = trellis_ctl::workload::call_export(
                &client,
                &l,
                &instance,
                "round-trips",
                &[
                    "\"\"".into(),
                    format!("\"bench{caller}\""),
                    per_caller.to_string(),
                ],
                Duration::from_secs(90),
            )
            .await
            .unwrap_or_else(|f| panic!("round-trips: {}", f.message));
            assert_eq!(
                text,
                format!("{{\"ok\":{per_caller}}}"),
                "the guest's round trips failed"
            );
        }));
    }
    for run in runs {
        run.await.unwrap();
    }
    (callers * per_caller) as f64 / began.elapsed().as_secs_f64()
}

/// The same workload as the guest's `round-trips`, as requests straight to the `kv` provider with
/// the instance's identity (what the host sends, without the host and the guest): the cost of the
/// provider hop alone.
async fn through_provider(
    client: &async_nats::Client,
    lat: &BenchLattice,
    instance: &str,
    callers: usize,
    per_caller: usize,
) -> f64 {
    let began = Instant::now();
    let mut runs = Vec::new();
    for caller in 0..callers {
        let client = client.clone();
        let lattice = lat.l.clone();
        let identity = trellis_tests::caller(instance, "kv-probe");
        runs.push(tokio::spawn(async move {
            let call = |request: KvRequest| {
                let client = client.clone();
                let lattice = lattice.clone();
                let identity = identity.clone();
                async move {
                    let request = CapabilityRequest::KeyValue(request);
                    trellis_tests::provider_call(&client, &lattice, "kv", &identity, &request)
                        .await
                        .unwrap()
                }
            };
            for i in 0..per_caller {
                let key = format!("bench{caller}-{}", i % 16);
                let value = u32::try_from(i).unwrap().to_le_bytes().to_vec();
                call(KvRequest::Set {
                    bucket: String::new(),
                    key: key.clone(),
                    value: value.into(),
                })
                .await;
                call(KvRequest::Get {
                    bucket: String::new(),
                    key,
                })
                .await;
            }
        }));
    }
    for run in runs {
        run.await.unwrap();
    }
    (callers * per_caller) as f64 / began.elapsed().as_secs_f64()
}

/// The same workload as the guest's `round-trips`, from a raw async-nats KV client.
async fn raw(store: &jetstream::kv::Store, callers: usize, per_caller: usize) -> f64 {
    let began = Instant::now();
    let mut runs = Vec::new();
    for caller in 0..callers {
        let store = store.clone();
        runs.push(tokio::spawn(async move {
            for i in 0..per_caller {
                let key = format!("bench{caller}-{}", i % 16);
                let value = u32::try_from(i).unwrap().to_le_bytes();
                store
                    .put(key.as_str(), value.to_vec().into())
                    .await
                    .unwrap();
                let read = store.get(key.as_str()).await.unwrap();
                assert_eq!(read.as_deref(), Some(&value[..]));
            }
        }));
    }
    for run in runs {
        run.await.unwrap();
    }
    (callers * per_caller) as f64 / began.elapsed().as_secs_f64()
}

/// CPU time so far of each of the lattice's processes and of this one (the callers), in ticks.
fn cpu_now(lat: &BenchLattice) -> Vec<(String, u64)> {
    let mut all = lat.cpu_ticks_by_process();
    let me = i32::try_from(std::process::id()).unwrap();
    all.push(("callers".to_owned(), cpu_ticks(me)));
    all
}

/// The CPU each process spent per round trip since `before`, for the processes that spent any.
fn cpu_per_round_trip(lat: &BenchLattice, before: &[(String, u64)], round_trips: usize) -> String {
    let tick = 1e6 / clock_ticks_per_sec();
    let mut total = 0.0;
    let mut parts = Vec::new();
    for ((name, was), (_, now)) in before.iter().zip(cpu_now(lat)) {
        let us = now.saturating_sub(*was) as f64 * tick / round_trips as f64;
        total += us;
        if us > 0.0 {
            parts.push(format!("{name} {us:.1}"));
        }
    }
    format!("{total:.1} µs CPU/round trip ({})", parts.join(", "))
}

#[tokio::main]
async fn main() {
    let total = env_usize("TRELLIS_BENCH_ROUND_TRIPS", 5_000);
    let callers = env_usize("TRELLIS_BENCH_CALLERS", 8);
    let lat = BenchLattice::up("bench-kv", &["kv"]).await;
    let wasm = components::build().path("kv_probe");
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("kv-probe.toml");
    std::fs::write(&manifest, components::KV_PROBE_MANIFEST).unwrap();
    lat.push(&wasm, &manifest);
    let out = lat.cli(&[
        "instance",
        "start",
        "kv-probe",
        "--grant",
        &format!("wasi:keyvalue bucket={BUCKET}"),
        "--wait",
        "-o",
        "json",
    ]);
    let started: serde_json::Value = serde_json::from_str(&out).unwrap();
    let instance = started["instances"][0]["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let client = lat.nats.client().await;
    // Warm-up: creates the bucket and the instance's code paths.
    from_component(&client, &lat, &instance, 1, 200).await;
    let store = jetstream::new(client.clone())
        .get_key_value(BUCKET)
        .await
        .unwrap();
    raw(&store, 1, 200).await;

    println!("set+get round trips ({total} per run, bucket `{BUCKET}`, one host)");
    println!("kv provider in its own process:");
    for (label, n) in [("sequential", 1), ("concurrent", callers)] {
        let per_caller = (total / n).max(1);
        let trips = n * per_caller;
        let before = cpu_now(&lat);
        let component = from_component(&client, &lat, &instance, n, per_caller).await;
        let component_cpu = cpu_per_round_trip(&lat, &before, trips);
        let before = cpu_now(&lat);
        let provider = through_provider(&client, &lat, &instance, n, per_caller).await;
        let provider_cpu = cpu_per_round_trip(&lat, &before, trips);
        let before = cpu_now(&lat);
        let direct = raw(&store, n, per_caller).await;
        let direct_cpu = cpu_per_round_trip(&lat, &before, trips);
        let ratio = component / direct;
        println!(
            "  {label:<11} ({n:>2} caller(s))  component {component:>7.0}/s   provider RPC alone {provider:>7.0}/s   raw client {direct:>7.0}/s   ratio component/raw {ratio:.2}"
        );
        println!("      component: {component_cpu}");
        println!("      provider RPC alone: {provider_cpu}");
        println!("      raw client: {direct_cpu}");
    }

    // The same provider embedded in the host: the host prefers it to the standalone process.
    lat.cli(&["provider", "start", "kv", "--embedded", "--wait"]);
    from_component(&client, &lat, &instance, 1, 200).await;
    println!("kv provider embedded in the host (`trellis provider start kv --embedded`):");
    for (label, n) in [("sequential", 1), ("concurrent", callers)] {
        let per_caller = (total / n).max(1);
        let trips = n * per_caller;
        let before = cpu_now(&lat);
        let component = from_component(&client, &lat, &instance, n, per_caller).await;
        let component_cpu = cpu_per_round_trip(&lat, &before, trips);
        let before = cpu_now(&lat);
        let direct = raw(&store, n, per_caller).await;
        let direct_cpu = cpu_per_round_trip(&lat, &before, trips);
        let ratio = component / direct;
        println!(
            "  {label:<11} ({n:>2} caller(s))  component {component:>7.0}/s   raw client {direct:>7.0}/s   ratio component/raw {ratio:.2}"
        );
        println!("      component: {component_cpu}");
        println!("      raw client: {direct_cpu}");
    }
}
