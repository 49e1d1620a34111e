//! A three-server NATS cluster in containers with controllers and hosts spread over it. One
//! server cut off the network and healed: the clients that were on it reconnect to the others by
//! themselves, control requests keep being answered by the majority, and nothing written is lost
//! or stored twice. The server leading the fact stream SIGKILLed during a burst of control
//! requests: they resume after an election, and again nothing is lost or stored twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use trellis_ctl::CtlClient;
use trellis_schemas::control::{AssignmentGrantRequest, HostListRequest};
use trellis_schemas::{
    AssignmentTarget, Capability, ComponentName, ErrorCode, FactData, FactKind, HostStatus,
    Projection, apply, subject,
};
use trellis_tests::cluster::Cluster;
use trellis_tests::rollout::{self, Load, V1};
use trellis_tests::{assert_replicas_match_replay, components, try_facts_at, wait_for};

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
    grants_until(ctl, from, |answered| answered.len() >= count).await
}

/// Like [`grants`], until `done` says so of the times of the answers so far.
async fn grants_until(
    ctl: &CtlClient,
    from: usize,
    done: impl Fn(&[Instant]) -> bool,
) -> Vec<Instant> {
    let deadline = Instant::now() + T * 2;
    let mut answered = Vec::new();
    let mut failures = 0;
    while !done(&answered) {
        assert!(
            Instant::now() < deadline,
            "only {} grants answered ({failures} attempts failed)",
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

/// The port an embedded http-server listens on inside `h1`'s container.
const LISTEN: u16 = 8080;

/// A lattice on a three-server NATS cluster: controllers `c1`, `c2` and hosts `h1`–`h3` given
/// every server, three instances of `counter` running, and a control client of the test process
/// connected to `servers` (mapped URLs) only.
struct Lattice3 {
    cluster: Cluster,
    ctl: CtlClient,
    js: async_nats::jetstream::Context,
    urls: Vec<String>,
}

impl Lattice3 {
    async fn start(test: &str, servers: impl Fn(&[String]) -> Vec<String>) -> Self {
        let mut cluster = Cluster::start_clustered(test, 3).await;
        // A host timeout well above the time a client takes to notice a dead connection and move
        // (4–6 s of unanswered pings, then a redial), so that hosts on a lost server are not
        // declared lost meanwhile on a loaded machine.
        cluster.controller("c1", "60s").await;
        cluster.controller("c2", "60s").await;
        // h1 can listen for HTTP with an embedded http-server.
        cluster
            .host_with_ports("h1", &["zone=a"], &[], &[LISTEN])
            .await;
        cluster.host("h2", &["zone=b"], &[]).await;
        cluster.host("h3", &["zone=c"], &[]).await;
        let urls = servers(&trellis_tests::servers(&cluster.url()));
        let client = async_nats::ConnectOptions::new()
            .max_reconnects(None)
            .connect(urls.clone())
            .await
            .unwrap();
        let ctl = CtlClient::new(
            client.clone(),
            cluster.lattice.clone(),
            Duration::from_secs(5),
        );
        let lattice = Self {
            cluster,
            ctl,
            js: async_nats::jetstream::new(client),
            urls,
        };
        wait_for("three hosts up", T, || {
            lattice.heard_within(Duration::from_secs(2))
        })
        .await;
        push(&lattice.cluster, "counter", "counter", "2s");
        let started = start(
            &lattice.cluster,
            &["counter", "--count", "3", "--restart", "always"],
        );
        assert_eq!(placements(&started).len(), 3);
        let info = lattice.events_info().await.expect("the fact stream");
        assert_eq!(info.config.num_replicas, 3, "the fact stream is replicated");
        lattice
    }

    /// `Some` when the answering replica heard all three hosts within `max`.
    async fn heard_within(&self, max: Duration) -> Option<()> {
        let reply = self.ctl.request(&HostListRequest::default()).await.ok()?;
        let up = reply.hosts.iter().filter(|h| {
            h.status == HostStatus::Up
                && h.heartbeat_age_ms
                    .is_some_and(|a| a < max.as_millis() as u64)
        });
        (up.count() == 3).then_some(())
    }

    async fn events_info(&self) -> Option<async_nats::jetstream::stream::Info> {
        let events = subject::events_stream(&self.cluster.lattice);
        Some(
            self.js
                .get_stream(&events)
                .await
                .ok()?
                .info()
                .await
                .ok()?
                .clone(),
        )
    }

    /// Waits until `server` is a current replica of the fact stream again.
    async fn current_again(&self, server: &str) {
        wait_for(
            &format!("{server} a current replica again"),
            T * 2,
            || async {
                let info = self.events_info().await?;
                let cluster = info.cluster?;
                let replicas = cluster.replicas;
                let back = cluster.leader.as_deref() == Some(server)
                    || replicas.iter().any(|r| {
                        r.name == server
                            && r.current
                            && !r.offline
                            && r.active < Duration::from_secs(2)
                    });
                (replicas.len() == 2 && replicas.iter().all(|r| r.current) && back).then_some(())
            },
        )
        .await;
    }

    /// Checks the whole history: no fact stored twice, grants `p0..p{granted}` each stored once,
    /// no host declared lost, `active` instances still running, and both controller replicas
    /// equal to a replay of the stream.
    async fn check(&self, granted: usize, active: usize) {
        let facts = wait_for("the fact stream readable", T, || async {
            try_facts_at(&self.urls.join(","), &self.cluster.lattice)
                .await
                .ok()
        })
        .await;
        let mut ids = BTreeSet::new();
        for f in &facts {
            assert!(ids.insert(f.event.id), "fact {} stored twice", f.event.id);
        }
        for i in 0..granted {
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
        let mut expected = Projection::new();
        for f in &facts {
            apply(&mut expected, f);
        }
        let running = expected.instances.values().filter(|i| i.status.is_active());
        assert_eq!(running.count(), active);
        assert_replicas_match_replay(&self.ctl, &facts, T).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partitioned_nats_server_loses_nothing_and_its_clients_move_to_the_others() {
    // The test process speaks only to the servers that stay in the majority.
    let l = Lattice3::start("partition", |all| all[..2].to_vec()).await;
    assert_eq!(grants(&l.ctl, 0, 5).await.len(), 5);

    // Cut one server off. Whatever it led, the other two elect a new leader; whoever was
    // connected to it notices the silence and moves.
    let cut = Instant::now();
    l.cluster.partition("nats-2");
    let during = grants(&l.ctl, 5, 20).await;
    println!(
        "figure: first control request answered {:?} after the partition",
        during[0].duration_since(cut)
    );
    wait_for(
        "every host heard again while nats-2 is cut off",
        T * 3,
        || l.heard_within(Duration::from_secs(2)),
    )
    .await;
    println!(
        "figure: every host heartbeating through the majority {:?} after the partition",
        cut.elapsed()
    );

    // Heal it: it catches up as a replica, and nothing is lost or doubled.
    let healed = Instant::now();
    l.cluster.heal("nats-2");
    assert_eq!(grants(&l.ctl, 25, 5).await.len(), 5);
    l.current_again("nats-2").await;
    println!(
        "figure: nats-2 current on the fact stream {:?} after healing",
        healed.elapsed()
    );
    l.check(30, 3).await;
    // The healed server serves clients again.
    let healed_url = l.cluster.server_url("nats-2");
    wait_for("a call through the healed server", T, || async {
        let (code, _, _) = trellis_tests::cli_at(&healed_url, &["call", "counter", "increment"]);
        (code == 0).then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_fact_streams_leader_loses_no_fact_and_control_resumes_within_seconds() {
    let l = Lattice3::start("leader", <[String]>::to_vec).await;
    let leader = l
        .events_info()
        .await
        .and_then(|i| i.cluster?.leader)
        .expect("the fact stream has a leader");

    // Grants one after another, each retried until answered, until ten were answered after the
    // leader was SIGKILLed in the middle of them. A grant is answered once its fact is stored.
    let killed_at: Arc<OnceLock<Instant>> = Arc::default();
    let burst = {
        let (ctl, killed_at) = (l.ctl.clone(), killed_at.clone());
        tokio::spawn(async move {
            grants_until(&ctl, 0, |answered| {
                killed_at
                    .get()
                    .is_some_and(|k| answered.iter().filter(|t| *t > k).count() >= 10)
            })
            .await
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let killed = Instant::now();
    l.cluster.kill(&leader);
    killed_at.set(killed).unwrap();
    let answered = tokio::time::timeout(T * 2, burst).await.unwrap().unwrap();
    // Control stalls for the election: the answer that ended the longest wait after the kill.
    let (gap, resumed) = answered
        .windows(2)
        .filter(|w| w[1] > killed)
        .map(|w| (w[1].duration_since(w[0]), w[1].duration_since(killed)))
        .max()
        .unwrap();
    println!(
        "figure: killed {leader} after {} grants; control answered again {resumed:?} after the \
         kill (a grant is answered once its fact is stored), after a pause of {gap:?}",
        answered.iter().filter(|t| **t <= killed).count()
    );
    assert!(
        resumed < Duration::from_secs(20),
        "no control request was answered within 20 s of losing the leader"
    );
    // Hosts on the lost server reconnected to another by themselves, and nothing was lost.
    wait_for("every host heard again", T * 2, || {
        l.heard_within(Duration::from_secs(2))
    })
    .await;
    l.check(answered.len(), 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_every_nats_server_fails_no_http_request() {
    let l = Lattice3::start("rolling", <[String]>::to_vec).await;
    let c = &l.cluster;
    // http-hello behind the http-server embedded in h1, one instance on every host.
    let (code, out, err) = c.cli(&[
        "provider",
        "start",
        "http-server",
        "--embedded",
        "--host",
        "h1",
        "--wait",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let dir = tempfile::tempdir().unwrap();
    let (hello, _) = components::example("http_hello");
    let manifest = rollout::manifest(dir.path(), "1.0.0");
    for args in [
        vec![
            "component",
            "push",
            hello.to_str().unwrap(),
            "--manifest",
            manifest.to_str().unwrap(),
        ],
        vec![
            "assignment",
            "grant",
            "web",
            "wasi:http/incoming-handler",
            "http-server",
            "--config",
            &format!("address=0.0.0.0:{LISTEN}"),
        ],
    ] {
        let (code, out, err) = c.cli(&args);
        assert_eq!(code, 0, "{args:?}: {out}{err}");
    }
    start(c, &["web@1.0.0", "--count", "3", "--restart", "always"]);
    let port = c.host_port("h1", LISTEN).await;
    wait_for("the listener", T, || async {
        let reply = trellis_tests::http_request("GET", &format!("http://127.0.0.1:{port}/"), "")
            .await
            .ok()?;
        (reply.status == 200).then_some(())
    })
    .await;
    let (load, tasks) = Load::start(port, "/", 8);
    load.settles_on(V1, "version 1 serving").await;

    // One server after the other, as an upgrade does: stop it (SIGTERM: it hands its
    // leaderships over), start it again, wait until it is a current replica, then the next.
    for server in ["nats", "nats-1", "nats-2"] {
        let before = load.counts().0;
        let started = Instant::now();
        c.stop_server(server);
        c.start_server(server).await;
        l.current_again(server).await;
        let served = load.counts().0 - before;
        println!(
            "figure: {server} restarted and caught up in {:?}; {served} HTTP requests served meanwhile",
            started.elapsed()
        );
        assert!(served > 0, "nothing was served while {server} restarted");
        load.assert_no_failure(&format!("the restart of {server}"));
    }
    load.stop(tasks).await;
    load.assert_no_failure("a rolling restart of the NATS cluster");
    // The control plane answers, every host is heard, and nothing was lost or doubled.
    wait_for("every host heard again", T * 2, || {
        l.heard_within(Duration::from_secs(2))
    })
    .await;
    l.check(0, 6).await;
}
