//! Data-plane benchmark: calls per second through NATS to one instance on a real host.
//!
//! Starts a nats-server and a `trellis-host` process, stores the `typed` test component in the
//! artifact store, starts one instance of it and sends `TRELLIS_BENCH_CALLS` calls (default
//! 200,000) of its `add` export from `TRELLIS_BENCH_CALLERS` concurrent callers (default 256)
//! spread over 4 NATS connections. Reports calls/s and the p50/p99/max latency of a call.
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
use trellis_tests::bench::{env_usize, quantile};
use trellis_tests::{Nats, Proc, bin, components, lattice, wait_for};

#[tokio::main]
async fn main() {
    let total = env_usize("TRELLIS_BENCH_CALLS", 200_000);
    let callers = env_usize("TRELLIS_BENCH_CALLERS", 256);
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
    let _host = Proc::spawn("host-bench", &bin("trellis-host"), &args, nats.logs());

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
    let mut clients = Vec::new();
    for _ in 0..4 {
        clients.push(nats.client().await);
    }
    // Warm up: the first calls fault in the pool's memory and the connections' buffers.
    run(&clients, &call_subject, 2_000.min(total), callers).await;

    let started = Instant::now();
    let (mut latencies, errors) = run(&clients, &call_subject, total, callers).await;
    let elapsed = started.elapsed();
    println!(
        "calls: {total} `add` calls, {callers} concurrent callers over {} connections, 1 instance",
        clients.len()
    );
    println!(
        "throughput: {:.0} calls/s ({elapsed:.2?} in total, {errors} errors)",
        total as f64 / elapsed.as_secs_f64()
    );
    println!(
        "latency: p50 {:?}, p99 {:?}, max {:?}",
        quantile(&mut latencies, 0.50),
        quantile(&mut latencies, 0.99),
        latencies.last().copied().unwrap_or_default()
    );
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
