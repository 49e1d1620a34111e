//! Replay benchmark: how fast a controller rebuilds its projection from the fact stream.
//!
//! Loads `TRELLIS_BENCH_FACTS` facts (default 1,000,000) into a fresh nats-server, then measures
//! 1. a bare ordered-consumer read of the stream that only counts messages (the baseline),
//! 2. the controller's replay (read, decode, fold) over the same stream, and
//! 3. the time from starting a `trellis controller` process to its first answer.
//!
//! Run: `cargo build --release --bins && cargo bench --bench replay`.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark")]

use std::time::{Duration, Instant};

use async_nats::jetstream::message::PublishMessage;
use trellis_bus::{StreamSettings, count_messages, ensure_streams};
use trellis_schemas::control::StatusRequest;
use trellis_schemas::{
    Capacity, Event, FactData, HostId, HostLost, HostStarted, HostStopped, subject,
};
use trellis_tests::bench::median;
use trellis_tests::{Nats, lattice};

fn facts_for(host: usize) -> [FactData; 4] {
    let host_id = HostId::new(format!("host-{host:07}")).unwrap();
    let started = |rejoined| {
        FactData::HostStarted(HostStarted {
            host_id: host_id.clone(),
            labels: [("zone".to_owned(), format!("z{}", host % 7))].into(),
            capacity: Capacity {
                max_instances: 100,
                memory_bytes: 8 << 30,
                cpus: 4,
                microvm: None,
            },
            version: "0.1.0".into(),
            rejoined,
        })
    };
    [
        started(false),
        FactData::HostLost(HostLost {
            host_id: host_id.clone(),
            silent_for_ms: 10_250,
            timeout_ms: 10_000,
            detected_by: "01JBENCHCONTROLLER000000000".into(),
        }),
        started(true),
        FactData::HostStopped(HostStopped {
            host_id: host_id.clone(),
            reason: "signal: SIGTERM".into(),
        }),
    ]
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("TRELLIS_BENCH_FACTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rounds = 3;
    let nats = Nats::start().await;
    let l = lattice("bench");
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    ensure_streams(&js, &l, &StreamSettings::default())
        .await
        .unwrap();

    let load = Instant::now();
    let source = trellis_schemas::fact::source(&l, "bench", "loader");
    let mut pending = Vec::with_capacity(4096);
    let mut bytes = 0usize;
    for i in 0..n {
        let data = facts_for(i / 4)[i % 4].clone();
        let event = Event::new(source.clone(), data);
        let payload = event.encode().unwrap();
        bytes += payload.len();
        let publish = PublishMessage::build()
            .payload(payload.into())
            .message_id(event.id.to_string());
        pending.push(
            js.send_publish(event.nats_subject(&l), publish)
                .await
                .unwrap(),
        );
        if pending.len() == 4000 {
            for ack in pending.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in pending.drain(..) {
        ack.await.unwrap();
    }
    let state = trellis_bus::events_stream_state(&js, &l).await.unwrap();
    assert_eq!(state.messages as usize, n);
    println!(
        "loaded {n} facts ({:.0} bytes each) in {:.1} s",
        bytes as f64 / n as f64,
        load.elapsed().as_secs_f64()
    );

    let stream = subject::events_stream(&l);
    let mut bare = Vec::new();
    let mut fold = Vec::new();
    for round in 0..rounds {
        let t = Instant::now();
        let counted = count_messages(&client, &js, &stream, state.last_sequence)
            .await
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(counted as usize, n);
        bare.push(n as f64 / secs);

        let t = Instant::now();
        let (projection, applied) = trellis_ctl::controller::replay_once(&client, &l)
            .await
            .unwrap();
        let secs = t.elapsed().as_secs_f64();
        assert_eq!(applied as usize, n);
        assert_eq!(projection.hosts.len(), n / 4);
        fold.push(n as f64 / secs);
        println!(
            "round {round}: bare read {:.0} msg/s, controller fold {:.0} facts/s",
            bare[round], fold[round]
        );
    }
    let (bare, fold) = (median(&mut bare), median(&mut fold));
    println!(
        "median: bare read {bare:.0} msg/s, fold {fold:.0} facts/s, ratio {:.2}",
        fold / bare
    );

    let mut first_answer = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let mut controller = nats.controller(&l, &format!("bench-{}", ulid_like()), "1h");
        let ctl = trellis_ctl::CtlClient::new(client.clone(), l.clone(), Duration::from_secs(60));
        loop {
            if let Ok(reply) = ctl.request(&StatusRequest::default()).await {
                assert_eq!(reply.hosts.stopped as usize, n / 4);
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        first_answer.push(t.elapsed().as_secs_f64());
        controller.kill();
    }
    println!(
        "controller start to first answer over {n} facts: median {:.2} s (runs: {:?})",
        median(&mut first_answer.clone()),
        first_answer
            .iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
    );
}

fn ulid_like() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}
