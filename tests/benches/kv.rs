//! Key-value benchmark: set-then-get round trips from a component (guest → host → NATS → `kv`
//! provider → JetStream KV) against a raw async-nats KV client doing the same operations on the
//! same bucket, in one run.
//!
//! The guest is the `kv_probe` test component; its `round-trips` export does `n` set+get pairs in
//! one invocation (keys `bench<caller>-0` … `-15`: each caller its own), so the figure is the capability path, not the
//! call path; requests sent straight to the provider with the instance's identity, as the host
//! sends them, show what the provider hop alone costs. The provider has JetStream answer `get`
//! and `set` straight to the host (`trellis_bus::direct`), so a call crosses NATS three times, not
//! four; a bare responder with none of Trellis's code shows what a provider in a process of its
//! own costs at the least, both when it answers itself and when it has JetStream answer. It
//! runs in a process of its own, as a provider does (this binary started again, with the `kv`
//! provider's runtime), and the one JetStream answers for takes its turns beside the component
//! and the raw client: the floor under the provider-process figure in the same slices.
//! Runs `TRELLIS_BENCH_ROUND_TRIPS` pairs (default 5,000) sequentially, then the same
//! from `TRELLIS_BENCH_CALLERS` concurrent callers (default 8), on each side. Reports round trips
//! per second and Trellis's figure as a ratio to the raw client's.
//!
//! Then `set-many` and `get-many` batches of 16 keys through the provider process, as the host
//! sends them (`TRELLIS_BENCH_BATCHES` of each per round, default 1,000).
//!
//! Then the same with the provider embedded in the host (`trellis provider start kv --embedded`),
//! which the host prefers: guest → host → JetStream KV, no second process and no extra hop.
//!
//! Each comparison runs `TRELLIS_BENCH_ROUNDS` rounds (default 3). In a round the sides (with
//! the provider process, the floor as a third) take turns in `TRELLIS_BENCH_SLICES` slices
//! (default 10), each going first in turn, so that the machine's drift in speed (on a shared
//! VM, as much as ±20 % within seconds) weighs on all
//! alike; each side's rate is all its round trips over all its time. Every round prints the CPU
//! time and the context switches per round trip of every process (NATS server, host, provider,
//! the callers); the comparison reports the median ratio.
//!
//! Run: `cargo build --release --bins && cargo bench --bench kv`.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark")]

use std::time::{Duration, Instant};

use async_nats::jetstream;
use trellis_schemas::capability::rpc::{CapabilityRequest, KvRequest};
use trellis_tests::bench::{
    BenchLattice, SelfProcess, clock_ticks_per_sec, context_switches, cpu_ticks, env_usize, median,
};
use trellis_tests::components;

const BUCKET: &str = "bench";

/// The key and value of `caller`'s round trip `i`, as the guest's `round-trips` makes them.
fn key_value(caller: usize, i: usize) -> (String, [u8; 4]) {
    (
        format!("bench{caller}-{}", i % 16),
        u32::try_from(i).unwrap().to_le_bytes(),
    )
}

/// Round trips per second of `callers` concurrent tasks, `run(caller)` each, which together make
/// `callers * per_caller` round trips.
async fn concurrently<F, Fut>(callers: usize, per_caller: usize, run: F) -> f64
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let began = Instant::now();
    let runs: Vec<_> = (0..callers)
        .map(|caller| tokio::spawn(run(caller)))
        .collect();
    for run in runs {
        run.await.unwrap();
    }
    (callers * per_caller) as f64 / began.elapsed().as_secs_f64()
}

/// Round trips per second of `callers` concurrent runs of `per_caller` round trips each.
async fn from_component(
    client: &async_nats::Client,
    lat: &BenchLattice,
    instance: &str,
    callers: usize,
    per_caller: usize,
) -> f64 {
    concurrently(callers, per_caller, |caller| {
        let client = client.clone();
        let l = lat.l.clone();
        let instance = instance.to_owned();
        async move {
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
        }
    })
    .await
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
    concurrently(callers, per_caller, |caller| {
        let client = client.clone();
        let lattice = lat.l.clone();
        let identity = trellis_tests::caller(instance, "kv-probe");
        async move {
            let call = |request: KvRequest| {
                let client = client.clone();
                let lattice = lattice.clone();
                let identity = identity.clone();
                async move {
                    let request = CapabilityRequest::KeyValue(request);
                    trellis_tests::provider_call_as(
                        &client, &lattice, "kv", &identity, &request, true,
                    )
                    .await
                    .unwrap()
                }
            };
            for i in 0..per_caller {
                let (key, value) = key_value(caller, i);
                let value = value.to_vec();
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
        }
    })
    .await
}

/// Subjects of the bare responder in a process of its own ([`serve_bare_process_if_asked`]):
/// answering, and having JetStream answer.
const BARE_PROCESS: [&str; 2] = ["bench.kv.bare-process", "bench.kv.bare-process-direct"];

/// Set in the environment of this benchmark started again as the bare responder in a process
/// of its own: the URL of the nats-server.
const BARE_PROCESS_URL: &str = "TRELLIS_BENCH_KV_BARE_URL";

/// The floor of any provider in a process of its own: a responder with none of Trellis's
/// code (no identity, no assignment check, no codec, no span or metric), on a connection of its
/// own. On `subjects[0]` it does the request's JetStream operation and answers; on
/// `subjects[1]` it sends the JetStream request with the caller's reply subject, so that
/// JetStream answers the caller (as the `kv` provider does for a host, `trellis_bus::direct`).
/// A request is `S` or `G`, the key's length as one byte, the key, then (for `S`) the value; a
/// get answers the value, and an empty request is answered empty.
async fn bare_responder(
    client: async_nats::Client,
    store: jetstream::kv::Store,
    subjects: [&'static str; 2],
) {
    use futures::StreamExt as _;
    let mut answered = client.subscribe(subjects[0]).await.unwrap();
    let mut direct = client.subscribe(subjects[1]).await.unwrap();
    let probe = client.clone();
    let bucket = store.name.clone();
    let stream = store.stream_name.clone();
    let responder = client.clone();
    tokio::spawn(async move {
        while let Some(msg) = answered.next().await {
            let client = responder.clone();
            let store = store.clone();
            tokio::spawn(async move {
                let reply = msg.reply.clone().unwrap();
                let answer = match parse_bare(&msg.payload) {
                    None => bytes::Bytes::new(),
                    Some((true, key, value)) => {
                        store.put(key, value).await.unwrap();
                        bytes::Bytes::new()
                    }
                    Some((false, key, _)) => store.get(key).await.unwrap().unwrap_or_default(),
                };
                client.publish(reply, answer).await.unwrap();
            });
        }
    });
    tokio::spawn(async move {
        while let Some(msg) = direct.next().await {
            let reply = msg.reply.clone().unwrap();
            let (subject, payload) = match parse_bare(&msg.payload) {
                None => {
                    client.publish(reply, bytes::Bytes::new()).await.unwrap();
                    continue;
                }
                Some((true, key, value)) => (format!("$KV.{bucket}.{key}"), value),
                Some((false, key, _)) => (
                    format!("$JS.API.DIRECT.GET.{stream}.$KV.{bucket}.{key}"),
                    bytes::Bytes::new(),
                ),
            };
            client
                .publish_with_reply(subject, reply, payload)
                .await
                .unwrap();
        }
    });
    // Answered on its own connection: the server has the subscriptions for every connection.
    for subject in subjects {
        probe.request(subject, bytes::Bytes::new()).await.unwrap();
    }
}

/// A bare request: whether it sets, the key and the value; `None` when empty.
fn parse_bare(body: &bytes::Bytes) -> Option<(bool, String, bytes::Bytes)> {
    if body.is_empty() {
        return None;
    }
    let len = usize::from(body[1]);
    let key = std::str::from_utf8(&body[2..2 + len]).unwrap().to_owned();
    Some((body[0] == b'S', key, body.slice(2 + len..)))
}

/// The same workload through [`bare_responder`] on `subject`: what a provider process costs at
/// the least.
async fn through_bare(
    client: &async_nats::Client,
    subject: &'static str,
    callers: usize,
    per_caller: usize,
) -> f64 {
    concurrently(callers, per_caller, |caller| {
        let client = client.clone();
        async move {
            for i in 0..per_caller {
                let (key, value) = key_value(caller, i);
                let mut set = vec![b'S', u8::try_from(key.len()).unwrap()];
                set.extend_from_slice(key.as_bytes());
                set.extend_from_slice(&value);
                client.request(subject, set.into()).await.unwrap();
                let mut get = vec![b'G', u8::try_from(key.len()).unwrap()];
                get.extend_from_slice(key.as_bytes());
                let read = client.request(subject, get.into()).await.unwrap();
                assert_eq!(&read.payload[..], &value[..]);
            }
        }
    })
    .await
}

/// Keys per batch in [`batches`].
const BATCH: usize = 16;

/// Batches through the provider process, as the host sends them: `set-many` then `get-many` of
/// [`BATCH`] keys, sequentially, `TRELLIS_BENCH_BATCHES` times (default 1,000) per round; prints
/// batches per second and the time per key.
async fn batches(client: &async_nats::Client, lat: &BenchLattice, instance: &str, rounds: usize) {
    let n = env_usize("TRELLIS_BENCH_BATCHES", 1_000);
    let identity = trellis_tests::caller(instance, "kv-probe");
    let keys: Vec<String> = (0..BATCH).map(|i| format!("batch-{i}")).collect();
    let call = |request: KvRequest| {
        let request = CapabilityRequest::KeyValue(request);
        let identity = &identity;
        async move {
            trellis_tests::provider_call_as(client, &lat.l, "kv", identity, &request, true)
                .await
                .unwrap()
        }
    };
    println!("batches of {BATCH} keys through the provider process ({n} of each per round):");
    for round in 0..rounds {
        let mut rates = Vec::new();
        for get in [false, true] {
            let began = Instant::now();
            for i in 0..n {
                let request = if get {
                    KvRequest::GetMany {
                        bucket: String::new(),
                        keys: keys.clone(),
                    }
                } else {
                    let value =
                        bytes::Bytes::from(u32::try_from(i).unwrap().to_le_bytes().to_vec());
                    KvRequest::SetMany {
                        bucket: String::new(),
                        pairs: keys.iter().map(|k| (k.clone(), value.clone())).collect(),
                    }
                };
                call(request).await;
            }
            let elapsed = began.elapsed();
            rates.push((
                n as f64 / elapsed.as_secs_f64(),
                elapsed.as_secs_f64() * 1e6 / (n * BATCH) as f64,
            ));
        }
        println!(
            "  round {}  set-many {:>6.0}/s ({:.1} µs per key)   get-many {:>6.0}/s ({:.1} µs per key)",
            round + 1,
            rates[0].0,
            rates[0].1,
            rates[1].0,
            rates[1].1
        );
    }
}

/// The same workload as the guest's `round-trips`, from a raw async-nats KV client.
async fn raw(store: &jetstream::kv::Store, callers: usize, per_caller: usize) -> f64 {
    concurrently(callers, per_caller, |caller| {
        let store = store.clone();
        async move {
            for i in 0..per_caller {
                let (key, value) = key_value(caller, i);
                store
                    .put(key.as_str(), value.to_vec().into())
                    .await
                    .unwrap();
                let read = store.get(key.as_str()).await.unwrap();
                assert_eq!(read.as_deref(), Some(&value[..]));
            }
        }
    })
    .await
}

/// What a process has spent so far: CPU ticks, and voluntary and involuntary context switches.
struct Spent {
    name: String,
    ticks: u64,
    switches: (u64, u64),
}

/// The process id of the bare responder in a process of its own, once it runs.
static BARE_PROCESS_PID: std::sync::OnceLock<i32> = std::sync::OnceLock::new();

/// What each of the lattice's processes, the bare responder's process and this one (the
/// callers) have spent so far.
fn cpu_now(lat: &BenchLattice) -> Vec<Spent> {
    let me = i32::try_from(std::process::id()).unwrap();
    let bare = BARE_PROCESS_PID.get().map(|&pid| {
        (
            ("bare-process".to_owned(), cpu_ticks(pid)),
            context_switches(pid),
        )
    });
    lat.cpu_ticks_by_process()
        .into_iter()
        .zip(lat.context_switches_by_process())
        .chain(bare)
        .chain([(("callers".to_owned(), cpu_ticks(me)), context_switches(me))])
        .map(|((name, ticks), switches)| Spent {
            name,
            ticks,
            switches,
        })
        .collect()
}

/// What each process spent between `before` and now.
fn spent_since(lat: &BenchLattice, before: &[Spent]) -> Vec<Spent> {
    before
        .iter()
        .zip(cpu_now(lat))
        .map(|(was, now)| Spent {
            name: now.name,
            ticks: now.ticks.saturating_sub(was.ticks),
            switches: (
                now.switches.0.saturating_sub(was.switches.0),
                now.switches.1.saturating_sub(was.switches.1),
            ),
        })
        .collect()
}

/// `more` added to `total`, process by process (both from [`spent_since`] in one lattice).
fn add_spent(total: &mut Vec<Spent>, more: Vec<Spent>) {
    if total.is_empty() {
        *total = more;
        return;
    }
    for (sum, part) in total.iter_mut().zip(more) {
        sum.ticks += part.ticks;
        sum.switches.0 += part.switches.0;
        sum.switches.1 += part.switches.1;
    }
}

/// The CPU each process spent per round trip (from [`spent_since`]), for the processes that
/// spent any, with its context switches per round trip (voluntary + involuntary): a wakeup
/// between threads costs one.
fn per_round_trip(spent: &[Spent], round_trips: usize) -> String {
    let tick = 1e6 / clock_ticks_per_sec();
    let per_trip = |n: u64| n as f64 / round_trips as f64;
    let mut total = 0.0;
    let mut parts = Vec::new();
    for part in spent {
        let us = per_trip(part.ticks) * tick;
        total += us;
        if us > 0.0 {
            let voluntary = per_trip(part.switches.0);
            let preempted = per_trip(part.switches.1);
            parts.push(format!(
                "{} {us:.1} [{voluntary:.1}+{preempted:.1} sw]",
                part.name
            ));
        }
    }
    format!("{total:.1} µs CPU/round trip ({})", parts.join(", "))
}

/// The CPU each process spent per round trip since `before` ([`per_round_trip`]).
fn cpu_per_round_trip(lat: &BenchLattice, before: &[Spent], round_trips: usize) -> String {
    per_round_trip(&spent_since(lat, before), round_trips)
}

/// What each side of a comparison runs against: the lattice, the instance of `kv_probe`, and a
/// client with the raw side's store.
struct Sides<'a> {
    client: &'a async_nats::Client,
    lat: &'a BenchLattice,
    instance: &'a str,
    store: &'a jetstream::kv::Store,
}

/// The component against the raw client, sequentially and from `callers` callers, in `rounds`
/// rounds of `slices` turns each, alternating which side runs first (the machine's speed
/// drifts); prints each round with the CPU each process spent, then the median ratio. With
/// `floor` (the provider in a process of its own), the bare responder in a process of its own
/// with JetStream answering takes its turns as a third side, the floor of any provider in a
/// process of its own, and each round also sends the guest's requests straight to the provider
/// and to the bare responder answering itself.
async fn compare(
    sides: &Sides<'_>,
    total: usize,
    callers: usize,
    rounds: usize,
    slices: usize,
    floor: bool,
) {
    let Sides {
        client,
        lat,
        instance,
        store,
    } = *sides;
    let count = if floor { 3 } else { 2 };
    for (label, n) in [("sequential", 1), ("concurrent", callers)] {
        let per_caller = (total / n).max(1);
        let trips = n * per_caller;
        let mut ratios = Vec::new();
        let mut floor_ratios = Vec::new();
        for round in 0..rounds {
            // The sides take turns in slices, so that a drift of the machine's speed within the
            // round weighs on all alike; each side's rate is its round trips over its time.
            let slices = slices.clamp(1, per_caller);
            let per_slice = per_caller / slices;
            let mut elapsed = [0.0_f64; 3];
            let mut spent: [Vec<Spent>; 3] = Default::default();
            for slice in 0..slices {
                // Each side goes first in turn.
                for k in 0..count {
                    let side = (round + slice + k) % count;
                    let before = cpu_now(lat);
                    let rate = match side {
                        0 => from_component(client, lat, instance, n, per_slice).await,
                        1 => raw(store, n, per_slice).await,
                        _ => through_bare(client, BARE_PROCESS[1], n, per_slice).await,
                    };
                    elapsed[side] += (n * per_slice) as f64 / rate;
                    add_spent(&mut spent[side], spent_since(lat, &before));
                }
            }
            let sliced = n * per_slice * slices;
            let rate = |side: usize| sliced as f64 / elapsed[side];
            let ratio = rate(0) / rate(1);
            ratios.push(ratio);
            println!(
                "  {label:<11} ({n:>2} caller(s)) round {}  component {:>7.0}/s   raw client {:>7.0}/s   ratio component/raw {ratio:.2}",
                round + 1,
                rate(0),
                rate(1)
            );
            println!("      component: {}", per_round_trip(&spent[0], sliced));
            println!("      raw client: {}", per_round_trip(&spent[1], sliced));
            if floor {
                let floor_ratio = rate(2) / rate(1);
                floor_ratios.push(floor_ratio);
                println!(
                    "      floor, bare responder in a process of its own, JetStream answering (no Trellis code): {:.0}/s, ratio to raw {floor_ratio:.2}, component/floor {:.2}, {}",
                    rate(2),
                    rate(0) / rate(2),
                    per_round_trip(&spent[2], sliced)
                );
                let before = cpu_now(lat);
                let rate = through_provider(client, lat, instance, n, per_caller).await;
                let cpu = cpu_per_round_trip(lat, &before, trips);
                println!("      provider RPC alone: {rate:.0}/s, {cpu}");
                let before = cpu_now(lat);
                let rate = through_bare(client, BARE_PROCESS[0], n, per_caller).await;
                let cpu = cpu_per_round_trip(lat, &before, trips);
                println!(
                    "      bare responder in a process of its own, answering (no Trellis code): {rate:.0}/s, {cpu}"
                );
            }
        }
        let listed = |ratios: &[f64]| {
            ratios
                .iter()
                .map(|r| format!("{r:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "  {label:<11} ({n:>2} caller(s)) median ratio component/raw {:.2} (rounds {})",
            median(&mut ratios.clone()),
            listed(&ratios)
        );
        if floor {
            println!(
                "  {label:<11} ({n:>2} caller(s)) median ratio floor/raw {:.2} (rounds {})",
                median(&mut floor_ratios.clone()),
                listed(&floor_ratios)
            );
        }
    }
}

/// Serves as the bare responder in a process of its own ([`BARE_PROCESS`]) when this process
/// was started as one, until it is killed; otherwise returns at once. Its runtime is the `kv`
/// provider's: one worker thread, the serving loop a task on it.
fn serve_bare_process_if_asked() {
    let Ok(url) = std::env::var(BARE_PROCESS_URL) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let serving = runtime.spawn(async move {
        let client = async_nats::connect(url).await.unwrap();
        let store = jetstream::new(client.clone())
            .get_key_value(BUCKET)
            .await
            .unwrap();
        bare_responder(client, store, BARE_PROCESS).await;
        println!("ready");
        std::future::pending::<()>().await;
    });
    runtime.block_on(serving).unwrap();
    std::process::exit(0);
}

fn main() {
    serve_bare_process_if_asked();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(run());
}

async fn run() {
    let total = env_usize("TRELLIS_BENCH_ROUND_TRIPS", 5_000);
    let callers = env_usize("TRELLIS_BENCH_CALLERS", 8);
    let rounds = env_usize("TRELLIS_BENCH_ROUNDS", 3).max(1);
    let slices = env_usize("TRELLIS_BENCH_SLICES", 10).max(1);
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
    let bare_process = SelfProcess::start(&[(BARE_PROCESS_URL, &lat.nats.url())]);
    BARE_PROCESS_PID.set(bare_process.pid()).unwrap();
    for subject in BARE_PROCESS {
        through_bare(&client, subject, 1, 200).await;
    }

    println!(
        "set+get round trips ({total} per run, {rounds} round(s) of {slices} slices, each side going first in turn, bucket `{BUCKET}`, one host)"
    );
    println!("kv provider in its own process:");
    let sides = Sides {
        client: &client,
        lat: &lat,
        instance: &instance,
        store: &store,
    };
    compare(&sides, total, callers, rounds, slices, true).await;
    batches(&client, &lat, &instance, rounds).await;

    // The same provider embedded in the host: the host prefers it to the standalone process.
    lat.cli(&["provider", "start", "kv", "--embedded", "--wait"]);
    from_component(&client, &lat, &instance, 1, 200).await;
    println!("kv provider embedded in the host (`trellis provider start kv --embedded`):");
    compare(&sides, total, callers, rounds, slices, false).await;
}
