//! Data-plane benchmark: calls per second through NATS to one instance on a real host, against
//! the floor under them in the same run.
//!
//! Starts a nats-server and a `trellis-host` process, stores the `typed` test component in the
//! artifact store, starts one instance of it and sends `TRELLIS_BENCH_CALLS` calls (default
//! 200,000) of its `add` export from `TRELLIS_BENCH_CALLERS` concurrent callers (default 64, the
//! goal's setting) spread over 4 NATS connections. The same load then goes to a bare responder
//! (this binary started again as a process of its own with a two-thread runtime, as a host is,
//! answering `42` at once with none of Trellis's code): what any request and reply between two
//! processes through this nats-server costs on this machine, so the host's figure is also given
//! as a ratio to it. `TRELLIS_BENCH_ROUNDS` rounds (default 3) alternate which side runs first.
//!
//! Each line gives calls/s, the p50/p99/max latency of a call and the CPU time each process
//! spent per call (nats-server, the serving process, the callers) with the serving process's
//! context switches per call; the summary gives the medians.
//!
//! Run: `cargo build --release --bins && cargo bench --bench calls`.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark")]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, object_store};
use sha2::Digest as _;
use trellis_bus::dataplane as codec;
use trellis_schemas::dataplane::{self, HostVerb, Op};
use trellis_schemas::instance::{
    ComponentSource, ManifestDoc, RestartPolicy, StartInstanceCommand,
};
use trellis_schemas::{ComponentName, FactKind, HostId, InstanceId, subject};
use trellis_tests::bench::{
    BareResponder, clock_ticks_per_sec, context_switches, cpu_ticks, env_usize, median, quantile,
    serve_bare_if_asked,
};
use trellis_tests::{Nats, Proc, bin, components, lattice, wait_for};

fn main() {
    serve_bare_if_asked();
    bench();
}

#[tokio::main]
async fn bench() {
    let total = env_usize("TRELLIS_BENCH_CALLS", 200_000);
    let rounds = env_usize("TRELLIS_BENCH_ROUNDS", 3).max(1);
    let callers = env_usize("TRELLIS_BENCH_CALLERS", 64);
    let nats = Nats::start().await;
    let l = lattice("bench-calls");
    let cache = tempfile::tempdir().unwrap();
    let args: Vec<String> = vec![
        "--nats".into(),
        nats.url(),
        "--lattice".into(),
        l.to_string(),
        "--host-id".into(),
        "bench".into(),
        "--cache-dir".into(),
        cache.path().display().to_string(),
        "--max-memory".into(),
        "64MiB".into(),
    ];
    let host = Proc::spawn("host-bench", &bin("trellis-host"), &args, nats.logs());

    let client = nats.client().await;
    let bytes = components::build().bytes("typed");
    let hex = hex::encode(sha2::Sha256::digest(&bytes));
    let js = jetstream::new(client.clone());
    let store = js
        .create_object_store(object_store::Config {
            bucket: subject::artifact_bucket(&l),
            ..Default::default()
        })
        .await
        .unwrap();
    store.put(hex.as_str(), &mut &bytes[..]).await.unwrap();
    let command = StartInstanceCommand {
        operation_id: "bench".into(),
        instance_id: InstanceId::new("bench-1").unwrap(),
        component: ComponentSource::Artifact {
            digest: format!("sha256:{hex}"),
            manifest: ManifestDoc {
                name: ComponentName::new("typed").unwrap(),
                version: "0.1.0".into(),
                max_memory_bytes: 16 << 20,
                fuel: 10_000_000,
                timeout_ms: 1000,
                max_concurrency: 1024,
                imports: Vec::new(),
                requires: vec![],
                required_links: vec![],
                isolation: Default::default(),
            },
            signature: None,
        },
        restart: RestartPolicy::Never,
        assignments: vec![],
        isolation: None,
    };
    let host_subject =
        dataplane::host_command(&l, &HostId::new("bench").unwrap(), HostVerb::InstanceStart);
    let body = serde_json::to_vec(&command).unwrap();
    wait_for(
        "the host to accept the start",
        Duration::from_secs(30),
        || {
            let (client, subject, body) = (client.clone(), host_subject.clone(), body.clone());
            async move { client.request(subject, body.into()).await.ok() }
        },
    )
    .await;
    wait_for("instance.started", Duration::from_secs(30), || async {
        nats.facts(&l)
            .await
            .iter()
            .any(|f| f.event.kind() == FactKind::InstanceStarted)
            .then_some(())
    })
    .await;

    let call_subject = dataplane::component(&l, &ComponentName::new("typed").unwrap(), Op::Call);
    let bare = BareResponder::start(&nats.url(), BARE, "42");
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(nats.client().await);
    }
    let host_side = Side {
        label: "host",
        subject: call_subject,
        pid: host.pid(),
    };
    let bare_side = Side {
        label: "bare",
        subject: BARE.to_owned(),
        pid: bare.pid(),
    };
    let pids = Pids {
        nats: nats.pid().unwrap_or(0),
        callers: i32::try_from(std::process::id()).unwrap(),
    };
    // Warm up: the first calls fault in the pool's memory and the connections' buffers.
    for side in [&host_side, &bare_side] {
        run(&clients, &side.subject, 2_000.min(total), callers).await;
    }

    println!(
        "calls: {total} `add` calls per run, {callers} concurrent callers over {} connections, 1 instance; \
         bare = a responder process with none of Trellis's code (the floor)",
        clients.len()
    );
    let (mut host_rates, mut bare_rates, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for round in 1..=rounds {
        let order = if round % 2 == 1 {
            [&host_side, &bare_side]
        } else {
            [&bare_side, &host_side]
        };
        let mut rates = [0.0; 2];
        for side in order {
            let rate = measure(&clients, side, &pids, round, total, callers).await;
            rates[usize::from(side.label == "bare")] = rate;
        }
        host_rates.push(rates[0]);
        bare_rates.push(rates[1]);
        ratios.push(rates[0] / rates[1]);
    }
    println!(
        "median: host {:.0} calls/s, bare {:.0} calls/s, ratio {:.2} (rounds {})",
        median(&mut host_rates),
        median(&mut bare_rates),
        median(&mut ratios.clone()),
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
}

/// The subject of the bare responder.
const BARE: &str = "bench.calls.bare";

/// One side of the comparison: where the calls go and the process that answers them.
struct Side {
    label: &'static str,
    subject: String,
    pid: i32,
}

/// The other processes whose CPU a run counts.
struct Pids {
    nats: i32,
    callers: i32,
}

/// One run of `total` calls to `side`; prints its figures and returns its calls/s.
async fn measure(
    clients: &[async_nats::Client],
    side: &Side,
    pids: &Pids,
    round: usize,
    total: usize,
    callers: usize,
) -> f64 {
    let cpu = || [pids.nats, side.pid, pids.callers].map(cpu_ticks);
    let (before, switches) = (cpu(), context_switches(side.pid));
    let started = Instant::now();
    let (mut latencies, errors) = run(clients, &side.subject, total, callers).await;
    let elapsed = started.elapsed();
    let (after, switched) = (cpu(), context_switches(side.pid));
    let per_call =
        |i: usize| (after[i] - before[i]) as f64 * 1e6 / clock_ticks_per_sec() / total as f64;
    let switches_per_call =
        ((switched.0 + switched.1) - (switches.0 + switches.1)) as f64 / total as f64;
    let rate = total as f64 / elapsed.as_secs_f64();
    println!(
        "  round {round}, {:4}: {rate:6.0} calls/s, p50 {:.2?}, p99 {:.2?}, max {:.2?}, {errors} errors; \
         CPU per call: nats-server {:.1} µs, {} {:.1} µs [{switches_per_call:.2} sw], callers {:.1} µs",
        side.label,
        quantile(&mut latencies, 0.50),
        quantile(&mut latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
        per_call(0),
        side.label,
        per_call(1),
        per_call(2),
    );
    rate
}

/// Sends `total` calls from `callers` concurrent tasks; returns every call's latency and the
/// number of failed calls.
async fn run(
    clients: &[async_nats::Client],
    subject: &str,
    total: usize,
    callers: usize,
) -> (Vec<Duration>, usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let errors = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for c in 0..callers {
        let client = clients[c % clients.len()].clone();
        let (next, errors, subject) = (next.clone(), errors.clone(), subject.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let headers = codec::call_headers("add");
                let t = Instant::now();
                let reply = client
                    .request_with_headers(subject.clone(), headers, "[40,2]".into())
                    .await;
                latencies.push(t.elapsed());
                let ok =
                    reply.is_ok_and(|m| codec::read_reply(&m).is_ok() && &m.payload[..] == b"42");
                if !ok {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            latencies
        }));
    }
    let mut all = Vec::with_capacity(total);
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    (all, errors.load(Ordering::Relaxed))
}
