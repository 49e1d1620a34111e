//! A three-server NATS cluster in containers, one server cut off the network and healed: the
//! clients that were on it reconnect to the others by themselves, control requests keep being
//! answered by the majority, and nothing written is lost or stored twice.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use trellis_ctl::CtlClient;
use trellis_schemas::control::{
    AssignmentGrantRequest, HostListRequest, ProjectionReply, ProjectionRequest,
};
use trellis_schemas::{
    AssignmentTarget, Capability, ComponentName, ErrorCode, FactData, FactKind, HostStatus,
    Projection, apply, subject,
};
use trellis_tests::cluster::Cluster;
use trellis_tests::{servers, try_facts_at, wait_for};

use crate::common::{T, placements, push, start};

fn grant(i: usize) -> AssignmentGrantRequest {
    AssignmentGrantRequest {
        target: AssignmentTarget::Component(ComponentName::new(format!("p{i}")).unwrap()),
        capability: Capability::KeyValue,
        provider: None,
        config: BTreeMap::from([("bucket".to_owned(), format!("b{i}"))]),
    }
}

/// Sends `grant(from..)` one after another, each retried until a controller answers it, until
/// `count` are answered; returns when each was answered.
async fn grants(ctl: &CtlClient, from: usize, count: usize) -> Vec<Instant> {
    let deadline = Instant::now() + T * 2;
    let mut answered = Vec::new();
    let mut failures = 0;
    while answered.len() < count {
        assert!(
            Instant::now() < deadline,
            "only {} of {count} grants answered ({failures} attempts failed)",
            answered.len()
        );
        match ctl.request(&grant(from + answered.len())).await {
            Ok(_) => answered.push(Instant::now()),
            // An attempt whose reply was lost was stored: the retry finds it.
            Err(e) if e.code() == Some(ErrorCode::Conflict) => answered.push(Instant::now()),
            Err(_) => {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    answered
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_nats_server_loses_nothing_and_its_clients_move_to_the_others() {
    let mut cluster = Cluster::start_clustered("partition", 3).await;
    // A host timeout above the time a client takes to notice a dead connection (two missed
    // pings of 10 s), so that hosts on the cut-off server are not declared lost meanwhile.
    cluster.controller("c1", "60s").await;
    cluster.controller("c2", "60s").await;
    for (host, zone) in [("h1", "zone=a"), ("h2", "zone=b"), ("h3", "zone=c")] {
        cluster.host(host, &[zone], &[]).await;
    }
    // The test process speaks only to the servers that stay in the majority.
    let majority = servers(&cluster.url())[..2].to_vec();
    let client = async_nats::ConnectOptions::new()
        .max_reconnects(None)
        .connect(majority.clone())
        .await
        .unwrap();
    let ctl = CtlClient::new(
        client.clone(),
        cluster.lattice.clone(),
        Duration::from_secs(5),
    );
    let fresh = |max: Duration| {
        let ctl = ctl.clone();
        async move {
            let reply = ctl.request(&HostListRequest::default()).await.ok()?;
            let up = reply.hosts.iter().filter(|h| {
                h.status == HostStatus::Up
                    && h.heartbeat_age_ms
                        .is_some_and(|a| a < max.as_millis() as u64)
            });
            (up.count() == 3).then_some(())
        }
    };
    wait_for("three hosts up", T, || fresh(Duration::from_secs(2))).await;
    push(&cluster, "counter", "counter", "2s");
    let started = start(
        &cluster,
        &["counter", "--count", "3", "--restart", "always"],
    );
    assert_eq!(placements(&started).len(), 3);
    let js = async_nats::jetstream::new(client.clone());
    let events = subject::events_stream(&cluster.lattice);
    let info = js
        .get_stream(&events)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.num_replicas, 3, "the fact stream is replicated");
    let before = grants(&ctl, 0, 5).await;
    assert_eq!(before.len(), 5);

    // Cut one server off. Whatever it led, the other two elect a new leader; whoever was
    // connected to it notices the silence and moves.
    let cut = Instant::now();
    cluster.partition("nats-2");
    let during = grants(&ctl, 5, 20).await;
    println!(
        "figure: first control request answered {:?} after the partition",
        during[0].duration_since(cut)
    );
    wait_for(
        "every host heard again while nats-2 is cut off",
        T * 2,
        || fresh(Duration::from_secs(2)),
    )
    .await;
    println!(
        "figure: every host heartbeating through the majority {:?} after the partition",
        cut.elapsed()
    );

    // Heal it: it catches up as a replica, and nothing is lost or doubled.
    let healed = Instant::now();
    cluster.heal("nats-2");
    let after = grants(&ctl, 25, 5).await;
    wait_for("nats-2 a current replica again", T * 2, || async {
        let info = js
            .get_stream(&events)
            .await
            .ok()?
            .info()
            .await
            .ok()?
            .clone();
        let replicas = info.cluster?.replicas;
        let back = replicas.iter().any(|r| {
            r.name == "nats-2" && r.current && !r.offline && r.active < Duration::from_secs(2)
        });
        (replicas.len() == 2 && replicas.iter().all(|r| r.current) && back).then_some(())
    })
    .await;
    println!(
        "figure: nats-2 current on the fact stream {:?} after healing",
        healed.elapsed()
    );
    assert_eq!(after.len(), 5);

    let facts = wait_for("the fact stream readable", T, || async {
        try_facts_at(&majority.join(","), &cluster.lattice)
            .await
            .ok()
    })
    .await;
    let mut ids = BTreeSet::new();
    for f in &facts {
        assert!(ids.insert(f.event.id), "fact {} stored twice", f.event.id);
    }
    for i in 0..30 {
        let target = AssignmentTarget::Component(ComponentName::new(format!("p{i}")).unwrap());
        let stored = facts
            .iter()
            .filter(
                |f| matches!(&f.event.data, FactData::AssignmentGranted(g) if g.target == target),
            )
            .count();
        assert_eq!(stored, 1, "grant {i} answered, stored {stored} times");
    }
    assert!(
        !facts.iter().any(|f| f.event.kind() == FactKind::HostLost),
        "a host was declared lost"
    );
    // The three instances still run, and both replicas hold what a replay of the stream holds.
    let tip = facts.last().unwrap().seq;
    let mut expected = Projection::new();
    for f in &facts {
        apply(&mut expected, f);
    }
    assert_eq!(
        expected
            .instances
            .values()
            .filter(|i| i.status.is_active())
            .count(),
        3
    );
    let want = serde_json::to_string(&expected).unwrap();
    let mut seen: BTreeMap<String, ProjectionReply> = BTreeMap::new();
    let deadline = Instant::now() + T;
    while seen.len() < 2 {
        assert!(Instant::now() < deadline, "both replicas did not answer");
        if let Ok(reply) = ctl.request(&ProjectionRequest { min_seq: Some(tip) }).await {
            seen.insert(reply.served_by.clone(), reply);
        }
    }
    for (replica, reply) in &seen {
        assert_eq!(
            serde_json::to_string(&reply.projection).unwrap(),
            want,
            "replica {replica} differs from a replay of the stream"
        );
    }
    // The healed server serves clients again.
    let (code, out, err) = trellis_tests::cli_at(
        &cluster.server_url("nats-2"),
        &["call", "counter", "increment"],
    );
    assert_eq!(code, 0, "{out}{err}");
}
