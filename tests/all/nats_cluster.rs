//! A three-server JetStream cluster on loopback: the loss of the server that leads the fact
//! stream loses no fact, stores none twice and stops control requests only for the seconds the
//! cluster takes to elect a new leader; a rolling restart of every server fails no HTTP request.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use trellis_ctl::CtlClient;
use trellis_schemas::control::{
    AssignmentGrantRequest, HostListRequest, ProjectionReply, ProjectionRequest,
};
use trellis_schemas::{
    AssignmentTarget, Capability, ComponentName, ErrorCode, FactData, FactKind, HostStatus,
    Lattice, Projection, apply, subject,
};
use trellis_tests::rollout::{Load, RolloutLattice, V1};
use trellis_tests::{Nats, lattice, try_facts_at, wait_for};

const T: Duration = Duration::from_secs(60);

/// A control client that knows every server of the cluster.
async fn ctl_of(urls: &[String], l: &Lattice) -> CtlClient {
    let client = async_nats::ConnectOptions::new()
        .max_reconnects(None)
        .connect(urls.to_vec())
        .await
        .unwrap();
    CtlClient::new(client, l.clone(), Duration::from_secs(5))
}

/// Waits until `count` hosts are up.
async fn hosts_up(ctl: &CtlClient, count: usize, what: &str) {
    wait_for(what, T, || async {
        let reply = ctl.request(&HostListRequest::default()).await.ok()?;
        let up = reply.hosts.iter().filter(|h| h.status == HostStatus::Up);
        (up.count() == count).then_some(())
    })
    .await;
}

fn grant(i: usize) -> AssignmentGrantRequest {
    AssignmentGrantRequest {
        target: AssignmentTarget::Component(ComponentName::new(format!("c{i}")).unwrap()),
        capability: Capability::KeyValue,
        provider: None,
        config: BTreeMap::from([("bucket".to_owned(), format!("b{i}"))]),
    }
}

#[tokio::test]
async fn losing_the_fact_streams_leader_loses_no_fact_and_stores_none_twice() {
    let mut servers = Nats::cluster(3).await;
    let urls: Vec<String> = servers.iter().map(Nats::url).collect();
    let l = lattice("leader");
    // Controllers and hosts start on different servers (each is given its own first).
    let _c1 = servers[0].controller(&l, "c1", "60s");
    let _c2 = servers[1].controller(&l, "c2", "60s");
    let _h1 = servers[1].host(&l, "h1", &[]);
    let _h2 = servers[2].host(&l, "h2", &[]);
    let ctl = ctl_of(&urls, &l).await;
    hosts_up(&ctl, 2, "two hosts up").await;
    let js = async_nats::jetstream::new(ctl.nats().clone());
    let events = subject::events_stream(&l);
    let info = js
        .get_stream(&events)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.config.num_replicas, 3, "the fact stream is replicated");
    let leader = info
        .cluster
        .and_then(|c| c.leader)
        .expect("the fact stream has a leader");
    let victim: usize = leader.trim_start_matches('n').parse().unwrap();

    // A burst of grants, each retried until a controller answers it; the leader is killed in
    // the middle of it, and the burst goes on until ten more grants were answered after that.
    let killed_at: Arc<std::sync::OnceLock<Instant>> = Arc::default();
    let burst = {
        let ctl = ctl.clone();
        let killed_at = killed_at.clone();
        tokio::spawn(async move {
            let deadline = Instant::now() + T;
            let mut answered = Vec::new();
            let mut failures = 0usize;
            let mut errors: BTreeMap<String, (usize, Duration, Duration)> = BTreeMap::new();
            let start = Instant::now();
            let mut i = 0;
            loop {
                let after = killed_at
                    .get()
                    .map_or(0, |k| answered.iter().filter(|(_, _, t)| t > k).count());
                if after >= 10 || Instant::now() > deadline {
                    break;
                }
                match ctl.request(&grant(i)).await {
                    Ok(reply) => {
                        answered.push((i, Some(reply.assignment.assignment_id), Instant::now()));
                        i += 1;
                    }
                    // An earlier attempt whose reply was lost (the request timed out) was
                    // stored: the retry finds the grant it made. It counts as answered, late.
                    Err(e) if e.code() == Some(ErrorCode::Conflict) => {
                        answered.push((i, None, Instant::now()));
                        i += 1;
                    }
                    Err(e) => {
                        let at = start.elapsed();
                        let e = errors.entry(e.to_string()).or_insert((0, at, at));
                        e.0 += 1;
                        e.2 = at;
                        failures += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            eprintln!("errors (count, first, last since start): {errors:#?}");
            (answered, failures)
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    servers[victim].kill();
    let killed_at = *killed_at.get_or_init(Instant::now);
    let (answered, failures) = tokio::time::timeout(T * 2, burst).await.unwrap().unwrap();

    // Control requests went on after at most a few seconds.
    let gap = answered
        .windows(2)
        .map(|w| w[1].2.duration_since(w[0].2))
        .max()
        .unwrap();
    let first_after = answered
        .iter()
        .find(|a| a.2 > killed_at)
        .map(|a| a.2.duration_since(killed_at));
    eprintln!(
        "killed {leader}; {} grants answered, {failures} attempts failed, longest gap {gap:?}, \
         first answer {first_after:?} after the kill",
        answered.len()
    );
    assert!(
        first_after.is_some_and(|d| d < Duration::from_secs(20)),
        "no control request was answered within 20 s of losing the leader"
    );

    // Every answered grant is in the stream exactly once, and no fact is stored twice.
    let alive: Vec<String> = servers
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != victim)
        .map(|(_, s)| s.url())
        .collect();
    // Read through a surviving server, retried while the cluster settles.
    let facts = wait_for("the fact stream readable", T, || async {
        try_facts_at(&alive[0], &l).await.ok()
    })
    .await;
    let mut ids = BTreeSet::new();
    for f in &facts {
        assert!(ids.insert(f.event.id), "fact {} stored twice", f.event.id);
    }
    let granted: Vec<_> = facts
        .iter()
        .filter_map(|f| match &f.event.data {
            FactData::AssignmentGranted(g) => Some(g),
            _ => None,
        })
        .collect();
    for (i, id, _) in &answered {
        let target = AssignmentTarget::Component(ComponentName::new(format!("c{i}")).unwrap());
        let stored: Vec<_> = granted.iter().filter(|g| g.target == target).collect();
        assert_eq!(
            stored.len(),
            1,
            "grant {i} answered but stored {} times ({} facts, {} grants)",
            stored.len(),
            facts.len(),
            granted.len()
        );
        if let Some(id) = id {
            assert_eq!(
                &stored[0].assignment_id, id,
                "grant {i} stored under another id"
            );
        }
    }
    for i in 0..answered.len() {
        assert!(
            answered.iter().any(|a| a.0 == i),
            "grant {i} never answered"
        );
    }

    // Both replicas hold what an independent replay of the stream holds; no host was lost.
    assert!(
        !facts.iter().any(|f| f.event.kind() == FactKind::HostLost),
        "a host was declared lost"
    );
    let tip = facts.last().unwrap().seq;
    let mut expected = Projection::new();
    for f in &facts {
        apply(&mut expected, f);
    }
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
            "replica {replica} differs from an independent replay"
        );
    }
    // Hosts on the lost server reconnected to another by themselves: both still beat.
    hosts_up(&ctl, 2, "both hosts still up").await;
}

/// Waits until every replica of `stream` is current again and `server` (restarted) is among
/// them, heard from within the last second.
async fn replicas_current(js: &async_nats::jetstream::Context, stream: &str, server: &str) {
    wait_for(&format!("{server} current on {stream}"), T, || async {
        let info = js.get_stream(stream).await.ok()?.info().await.ok()?.clone();
        let cluster = info.cluster?;
        let leader = cluster.leader.as_deref()?;
        let all_current =
            cluster.replicas.len() == 2 && cluster.replicas.iter().all(|r| r.current && !r.offline);
        let back = leader == server
            || cluster
                .replicas
                .iter()
                .any(|r| r.name == server && r.active < Duration::from_secs(1));
        (all_current && back).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_every_nats_server_fails_no_http_request() {
    let mut lat = RolloutLattice::up_on_cluster("rolling", &["h1", "h2"]).await;
    let dir = tempfile::tempdir().unwrap();
    lat.push_versions(dir.path());
    let port = lat.serve_v1(2).await;
    let (load, tasks) = Load::start(port, "/", 8);
    load.settles_on(V1, "version 1 serving").await;
    let js = async_nats::jetstream::new(lat.nats.client().await);
    let events = subject::events_stream(&lat.l);

    // One server after the other, as an upgrade does: stop it gracefully, start it again, wait
    // until it has caught up, then the next.
    for i in 0..3 {
        let before = load.counts().0;
        let server = if i == 0 {
            &mut lat.nats
        } else {
            &mut lat.others[i - 1]
        };
        let started = Instant::now();
        server.graceful_restart().await;
        replicas_current(&js, &events, &format!("n{i}")).await;
        let served = load.counts().0 - before;
        eprintln!(
            "server {i} restarted and caught up in {:?}; {served} requests served meanwhile",
            started.elapsed()
        );
        assert!(served > 0, "nothing was served while server {i} restarted");
        load.assert_no_failure(&format!("the restart of server {i}"));
    }
    load.settles_on(V1, "version 1 after the rolling restart")
        .await;
    load.stop(tasks).await;
    load.assert_no_failure("a rolling restart of the NATS cluster");
    // The control plane answers again, and still knows both hosts.
    let hosts = lat.json(&["host", "ls"]);
    assert_eq!(hosts["hosts"].as_array().unwrap().len(), 2, "{hosts}");
}
