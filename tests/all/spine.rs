//! The lattice spine: hosts join and leave, liveness, replay, reconnection.

use std::time::Duration;

use nix::sys::signal::Signal;
use trellis_bus::{FactPublisher, StreamSettings, ensure_streams};
use trellis_schemas::control::{
    HostGetRequest, HostListRequest, ProjectionReply, ProjectionRequest,
};
use trellis_schemas::{
    Capacity, ErrorCode, Event, FactData, FactKind, HostId, HostStarted, HostStatus, Projection,
    apply,
};
use trellis_tests::{Nats, lattice, wait_for};

const T: Duration = Duration::from_secs(20);

async fn host_status(ctl: &trellis_ctl::CtlClient, id: &str) -> Option<HostStatus> {
    let reply = ctl.request(&HostListRequest::default()).await.ok()?;
    reply
        .hosts
        .iter()
        .find(|h| h.host_id.as_str() == id)
        .map(|h| h.status)
}

fn count(facts: &[trellis_schemas::Fact], kind: FactKind, id: &str) -> usize {
    facts
        .iter()
        .filter(|f| f.event.kind() == kind && f.event.data.entity_id() == id)
        .count()
}

#[tokio::test]
async fn host_joins_heartbeats_and_drains_on_sigterm() {
    let nats = Nats::start().await;
    let l = lattice("join");
    let _controller = nats.controller(&l, "c1", "5s");
    let mut host = nats.host(&l, "h1", &["zone=eu-1", "gpu=false"]);
    let ctl = nats.ctl(&l).await;

    let view = wait_for("h1 up with a heartbeat", T, || async {
        let reply = ctl
            .request(&HostGetRequest {
                host_id: HostId::new("h1").unwrap(),
                min_seq: None,
            })
            .await
            .ok()?;
        (reply.host.status == HostStatus::Up && reply.host.heartbeat_age_ms.is_some())
            .then_some(reply.host)
    })
    .await;
    assert_eq!(view.labels.get("zone").map(String::as_str), Some("eu-1"));
    assert_eq!(view.version, trellis_schemas::VERSION);
    assert!(view.capacity.cpus >= 1 && view.capacity.max_instances == 100);

    host.signal(Signal::SIGTERM);
    assert_eq!(
        host.wait_exit(T).await,
        Some(0),
        "host log:\n{}",
        host.log()
    );
    wait_for("h1 stopped", T, || async {
        (host_status(&ctl, "h1").await == Some(HostStatus::Stopped)).then_some(())
    })
    .await;
    let facts = nats.facts(&l).await;
    let kinds: Vec<FactKind> = facts.iter().map(|f| f.event.kind()).collect();
    assert_eq!(kinds, vec![FactKind::HostStarted, FactKind::HostStopped]);
    match &facts[1].event.data {
        FactData::HostStopped(d) => assert_eq!(d.reason, "signal: SIGTERM"),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(facts[0].event.source, "/trellis/join/host/h1");
}

#[tokio::test]
async fn silent_host_is_declared_lost_exactly_once_by_two_replicas() {
    let nats = Nats::start().await;
    let l = lattice("liveness");
    let _a = nats.controller(&l, "a", "2s");
    let _b = nats.controller(&l, "b", "2s");
    let mut h1 = nats.host(&l, "h1", &[]);
    let _h2 = nats.host(&l, "h2", &[]);
    let ctl = nats.ctl(&l).await;
    for id in ["h1", "h2"] {
        wait_for("hosts up", T, || async {
            (host_status(&ctl, id).await == Some(HostStatus::Up)).then_some(())
        })
        .await;
    }
    h1.kill();
    wait_for("h1 lost", T, || async {
        (host_status(&ctl, "h1").await == Some(HostStatus::Lost)).then_some(())
    })
    .await;
    // Both replicas have had several liveness periods to (wrongly) declare it again.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let facts = nats.facts(&l).await;
    assert_eq!(count(&facts, FactKind::HostLost, "h1"), 1, "{facts:#?}");
    assert_eq!(count(&facts, FactKind::HostLost, "h2"), 0);
    assert_eq!(host_status(&ctl, "h2").await, Some(HostStatus::Up));
    let lost = facts
        .iter()
        .find(|f| f.event.kind() == FactKind::HostLost)
        .unwrap();
    match &lost.event.data {
        FactData::HostLost(d) => {
            assert!(["a", "b"].contains(&d.detected_by.as_str()));
            assert_eq!(d.timeout_ms, 2000);
            assert!(d.silent_for_ms >= 2000);
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[tokio::test]
async fn paused_host_is_lost_then_rejoins_when_resumed() {
    let nats = Nats::start().await;
    let l = lattice("pause");
    let _a = nats.controller(&l, "a", "2s");
    let _b = nats.controller(&l, "b", "2s");
    let h1 = nats.host(&l, "h1", &[]);
    let ctl = nats.ctl(&l).await;
    wait_for("h1 up", T, || async {
        (host_status(&ctl, "h1").await == Some(HostStatus::Up)).then_some(())
    })
    .await;
    h1.signal(Signal::SIGSTOP);
    wait_for("h1 lost", T, || async {
        (host_status(&ctl, "h1").await == Some(HostStatus::Lost)).then_some(())
    })
    .await;
    h1.signal(Signal::SIGCONT);
    wait_for("h1 up again", T, || async {
        (host_status(&ctl, "h1").await == Some(HostStatus::Up)).then_some(())
    })
    .await;
    let facts = nats.facts(&l).await;
    let story: Vec<(FactKind, bool)> = facts
        .iter()
        .map(|f| {
            let rejoined = matches!(&f.event.data, FactData::HostStarted(d) if d.rejoined);
            (f.event.kind(), rejoined)
        })
        .collect();
    assert_eq!(
        story,
        vec![
            (FactKind::HostStarted, false),
            (FactKind::HostLost, false),
            (FactKind::HostStarted, true)
        ],
        "the facts tell what happened: up, lost, back"
    );
    // The rejoin names the loss it answers.
    assert_eq!(
        facts[2].event.causation_id,
        Some(facts[1].event.id.to_string())
    );
}

async fn projections_from_replicas(
    ctl: &trellis_ctl::CtlClient,
    min_seq: u64,
    replicas: &[&str],
) -> Vec<ProjectionReply> {
    // Requests go through the queue group; ask until every replica has answered at least once.
    let deadline = std::time::Instant::now() + T;
    let mut seen: Vec<ProjectionReply> = Vec::new();
    while !replicas
        .iter()
        .all(|r| seen.iter().any(|p| p.served_by == *r))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "not every replica of {replicas:?} answered"
        );
        if let Ok(reply) = ctl
            .request(&ProjectionRequest {
                min_seq: Some(min_seq),
            })
            .await
        {
            seen.push(reply);
        }
    }
    seen
}

fn fold(facts: &[trellis_schemas::Fact]) -> Projection {
    let mut p = Projection::new();
    for f in facts {
        apply(&mut p, f);
    }
    p
}

#[tokio::test]
async fn sigkilled_controller_is_replaced_by_one_with_the_same_projection() {
    let nats = Nats::start().await;
    let l = lattice("restart");
    let mut a = nats.controller(&l, "a", "30s");
    let _b = nats.controller(&l, "b", "30s");
    let ctl = nats.ctl(&l).await;

    // Facts flow while hosts come and go; one replica is killed in the middle of it.
    let mut running = Vec::new();
    for round in 0..12 {
        running.push(nats.host(&l, &format!("h{round}"), &[&format!("round={round}")]));
        if round % 3 == 2 {
            let mut h = running.remove(0);
            // Even a host still starting drains on SIGTERM and says it stopped.
            h.signal(Signal::SIGTERM);
            assert_eq!(h.wait_exit(T).await, Some(0), "host log:\n{}", h.log());
        }
        if round == 6 {
            a.kill();
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let _c = nats.controller(&l, "c", "30s");
    // Every host announced itself and every stopped one said so.
    let facts = wait_for("all facts stored", T, || async {
        let facts = nats.facts(&l).await;
        (facts.len() == 12 + 4).then_some(facts)
    })
    .await;
    let tip = facts.last().unwrap().seq;
    let expected = fold(&facts);
    assert_eq!(expected.hosts.len(), 12);

    let replies = projections_from_replicas(&ctl, tip, &["b", "c"]).await;
    let want = serde_json::to_string(&expected).unwrap();
    for reply in &replies {
        assert_eq!(reply.as_of, tip);
        assert_eq!(
            serde_json::to_string(&reply.projection).unwrap(),
            want,
            "replica {} differs from an independent replay",
            reply.served_by
        );
    }
    drop(running);
}

#[tokio::test]
async fn two_controllers_started_at_once_agree() {
    let nats = Nats::start().await;
    let l = lattice("agree");
    let _hosts: Vec<_> = (0..4)
        .map(|i| nats.host(&l, &format!("h{i}"), &[]))
        .collect();
    let facts = wait_for("hosts announced", T, || async {
        let facts = nats.facts(&l).await;
        (facts.len() == 4).then_some(facts)
    })
    .await;
    let _x = nats.controller(&l, "x", "30s");
    let _y = nats.controller(&l, "y", "30s");
    let ctl = nats.ctl(&l).await;
    let tip = facts.last().unwrap().seq;
    let replies = projections_from_replicas(&ctl, tip, &["x", "y"]).await;
    let first = serde_json::to_string(&replies[0].projection).unwrap();
    assert_eq!(first, serde_json::to_string(&fold(&facts)).unwrap());
    for r in &replies {
        assert_eq!(serde_json::to_string(&r.projection).unwrap(), first);
    }
}

#[tokio::test]
async fn host_and_controller_reconnect_after_nats_restarts() {
    let mut nats = Nats::start().await;
    let l = lattice("reconnect");
    let _controller = nats.controller(&l, "c", "3s");
    let mut host = nats.host(&l, "h1", &[]);
    let ctl = nats.ctl(&l).await;
    wait_for("h1 up", T, || async {
        (host_status(&ctl, "h1").await == Some(HostStatus::Up)).then_some(())
    })
    .await;

    nats.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    nats.restart().await;

    let ctl = nats.ctl(&l).await;
    wait_for("fresh heartbeats after the restart", T, || async {
        let reply = ctl
            .request(&HostGetRequest {
                host_id: HostId::new("h1").unwrap(),
                min_seq: None,
            })
            .await
            .ok()?;
        (reply.host.status == HostStatus::Up && reply.host.heartbeat_age_ms? < 500).then_some(())
    })
    .await;
    host.signal(Signal::SIGTERM);
    assert_eq!(host.wait_exit(T).await, Some(0));
    wait_for("h1 stopped after the restart", T, || async {
        (host_status(&ctl, "h1").await == Some(HostStatus::Stopped)).then_some(())
    })
    .await;
    let facts = nats.facts(&l).await;
    assert_eq!(
        count(&facts, FactKind::HostLost, "h1"),
        0,
        "an outage of NATS is not a lost host"
    );
    assert_eq!(count(&facts, FactKind::HostStarted, "h1"), 1);
    assert_eq!(count(&facts, FactKind::HostStopped, "h1"), 1);
}

fn started(id: &str) -> Event {
    Event::new(
        "/trellis/test/test/t",
        FactData::HostStarted(HostStarted {
            host_id: HostId::new(id).unwrap(),
            labels: Default::default(),
            capacity: Capacity {
                max_instances: 1,
                memory_bytes: 1,
                cpus: 1,
                microvm: None,
            },
            version: "test".into(),
            rejoined: false,
        }),
    )
}

#[tokio::test]
async fn streams_setup_is_idempotent_and_retried_facts_are_stored_once() {
    let nats = Nats::start().await;
    let l = lattice("streams");
    let client = nats.client().await;
    let js = async_nats::jetstream::new(client.clone());
    let settings = StreamSettings {
        facts_per_subject: 2,
        ..Default::default()
    };
    // Several processes starting at once all set the streams up.
    let setups = (0..6).map(|_| {
        let (js, l, settings) = (js.clone(), l.clone(), settings.clone());
        tokio::spawn(async move { ensure_streams(&js, &l, &settings).await })
    });
    for setup in setups {
        setup.await.unwrap().unwrap();
    }
    ensure_streams(&js, &l, &settings).await.unwrap();

    let (publisher, task) = FactPublisher::spawn(js.clone(), l.clone(), settings.clone(), 16);
    let event = started("h1");
    let first = publisher.publish(&event).await.unwrap();
    let again = publisher.publish(&event).await.unwrap();
    assert_eq!(
        first, again,
        "a re-published fact is de-duplicated by its id"
    );
    // History per subject is bounded: only the last 2 host.started of h1 are kept.
    for _ in 0..5 {
        publisher.publish(&started("h1")).await.unwrap();
    }
    let last = publisher.publish(&started("h2")).await.unwrap();
    drop(publisher);
    assert!(task.drain(Duration::from_secs(5)).await);
    let facts = nats.facts(&l).await;
    assert_eq!(count(&facts, FactKind::HostStarted, "h1"), 2);
    assert_eq!(facts.last().unwrap().seq, last);
    assert_eq!(last, 7);
}

#[tokio::test]
async fn min_seq_reads_your_own_writes_or_says_not_ready() {
    let nats = Nats::start().await;
    let l = lattice("minseq");
    let _controller = nats.controller(&l, "c", "30s");
    let ctl = nats.ctl(&l).await;
    wait_for("controller serving", T, || async {
        ctl.request(&HostListRequest::default()).await.ok()
    })
    .await;
    let js = async_nats::jetstream::new(nats.client().await);
    let (publisher, _task) = FactPublisher::spawn(js, l.clone(), StreamSettings::default(), 16);
    let seq = publisher.publish(&started("writer")).await.unwrap();
    let reply = ctl
        .request(&HostGetRequest {
            host_id: HostId::new("writer").unwrap(),
            min_seq: Some(seq),
        })
        .await
        .expect("the controller waits for the fact, then answers");
    assert!(reply.as_of >= seq);
    let err = ctl
        .request(&HostListRequest {
            min_seq: Some(seq + 1_000),
            ..Default::default()
        })
        .await
        .expect_err("a sequence that never comes");
    assert_eq!(err.code(), Some(ErrorCode::NotReady));
}

#[tokio::test]
async fn the_suite_runs_a_current_nats_server() {
    // scripts/prereqs.sh installs the pinned upstream build (2.12 or newer); only where PyPI
    // could not be reached does it fall back to Debian's 2.9 and say so in TRELLIS_NATS_FALLBACK.
    let minimum = if std::env::var_os("TRELLIS_NATS_FALLBACK").is_some() {
        (2, 9)
    } else {
        (2, 12)
    };
    let nats = Nats::start().await;
    let version = nats.client().await.server_info().version;
    let mut parts = version.split('.').map(|p| p.parse::<u32>());
    let found = match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor),
        _ => panic!("nats-server reported an unreadable version {version:?}"),
    };
    assert!(
        found >= minimum,
        "nats-server {version} is older than {}.{}: run the suite with scripts/test, which \
         installs the pinned one, or point TRELLIS_NATS_SERVER at it",
        minimum.0,
        minimum.1
    );
}
