//! NATS restarts on its volume: hosts and controllers reconnect, the facts hosts buffered while it
//! was away are flushed in order, and the projection has every fact exactly once.

use std::time::{Duration, Instant};

use chrono::Utc;
use trellis_schemas::control::HostListRequest;
use trellis_schemas::dataplane::{self, Op};
use trellis_schemas::{FactData, FactKind, HostStatus, InstanceId};
use trellis_tests::wait_for;

use crate::common::{
    T, assert_each_fact_once, of, placements, projections_of_both, push, start, three_hosts,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarts_on_its_volume_and_buffered_facts_arrive_in_order_exactly_once() {
    let mut cluster = three_hosts("nats").await;
    // A guest that loops until its 2 s timeout: a call made just before NATS goes away crashes
    // the instance while NATS is away, and the host restarts it, all of which it must report.
    push(&cluster, "loop", "looper", "2s");
    let started = start(
        &cluster,
        &["looper", "--count", "3", "--restart", "backoff:100ms,1s"],
    );
    let instances = placements(&started);
    let before = cluster.facts().await;

    let client = cluster.client().await;
    let mut beats = client
        .subscribe(trellis_schemas::subject::heartbeats_all(&cluster.lattice))
        .await
        .unwrap();
    for (id, _) in &instances {
        let headers = trellis_bus::dataplane::call_headers("run");
        let subject = dataplane::instance(
            &cluster.lattice,
            &InstanceId::new(id.as_str()).unwrap(),
            Op::Call,
        );
        // The reply will never come (NATS goes away); only the invocation matters.
        let inbox = client.new_inbox();
        client
            .publish_with_reply_and_headers(subject, inbox, headers, "[\"x\"]".into())
            .await
            .unwrap();
    }
    client.flush().await.unwrap();
    // NATS goes away once every call runs: the hosts (beating every 250 ms) say so.
    let mut running = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while running.len() < instances.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Some(beat)) = tokio::time::timeout(left, futures::StreamExt::next(&mut beats)).await
        else {
            panic!("calls running on {running:?} only, 2 s after they were sent");
        };
        let beat: trellis_schemas::Heartbeat = serde_json::from_slice(&beat.payload).unwrap();
        running.extend(
            beat.instances
                .into_iter()
                .filter(|i| i.in_flight > 0)
                .map(|i| i.instance_id),
        );
    }
    drop(beats);
    drop(client);

    let down_at = Utc::now();
    let down = Instant::now();
    cluster.stop_nats().await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let up_at = Utc::now();
    cluster.start_nats_again().await;
    println!(
        "figure: NATS away for {} ms (stop, 5 s, start on the same volume)",
        down.elapsed().as_millis()
    );

    // Everything stored before is still there (JetStream on the volume).
    let after = cluster.facts().await;
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(old.event.id, new.event.id, "stream kept across the restart");
    }

    // Each instance crashed, was restarted, and the host reported all of it once NATS was back:
    // in order, stamped while NATS was away.
    let facts = wait_for("the buffered facts of every instance", T, || async {
        let facts = cluster.facts().await;
        instances
            .iter()
            .all(|(id, _)| {
                !of(&facts, FactKind::InstanceStarted, id).iter().all(
                    |f| matches!(&f.event.data, FactData::InstanceStarted(d) if d.attempt == 0),
                )
            })
            .then_some(facts)
    })
    .await;
    assert_each_fact_once(&facts);
    for (id, host) in &instances {
        let story: Vec<(u64, String)> = facts
            .iter()
            .filter(|f| f.event.data.entity_id() == id)
            .map(|f| (f.seq, f.event.kind().short_name()))
            .collect();
        let kinds: Vec<&str> = story.iter().map(|(_, k)| k.as_str()).collect();
        assert_eq!(
            kinds[..4],
            [
                "instance.started",
                "instance.crashed",
                "instance.restarting",
                "instance.started"
            ],
            "instance {id} on {host}: {story:?}"
        );
        let crashed = of(&facts, FactKind::InstanceCrashed, id)[0];
        let FactData::InstanceCrashed(d) = &crashed.event.data else {
            unreachable!()
        };
        assert_eq!(d.reason, "timeout");
        assert!(
            crashed.event.time > down_at && crashed.event.time < up_at,
            "the crash of {id} happened while NATS was away ({} not in {down_at}..{up_at}): \
             it was buffered by the host",
            crashed.event.time
        );
    }

    // Hosts and controllers reconnected: all hosts up, none declared lost, both replicas agree
    // with an independent replay, which has every fact exactly once.
    let ctl = cluster.ctl().await;
    wait_for("three hosts heartbeating again", T, || async {
        let reply = ctl.request(&HostListRequest::default()).await.ok()?;
        reply
            .hosts
            .iter()
            .all(|h| h.status == HostStatus::Up && h.heartbeat_age_ms.is_some_and(|a| a < 2_000))
            .then_some(())
    })
    .await;
    let tip = facts.last().unwrap().seq;
    let [p1, p2] = projections_of_both(&cluster, tip).await;
    let (independent, applied) =
        trellis_ctl::controller::replay_once(&cluster.client().await, &cluster.lattice)
            .await
            .unwrap();
    let facts = cluster.facts().await;
    assert_each_fact_once(&facts);
    assert!(
        facts.iter().all(|f| f.event.kind() != FactKind::HostLost),
        "no host was declared lost"
    );
    assert_eq!(applied as usize, facts.len(), "every fact applied once");
    assert_eq!(p1.projection, p2.projection);
    assert_eq!(p1.projection, independent);
    for (id, _) in &instances {
        let record = &independent.instances[&InstanceId::new(id.as_str()).unwrap()];
        assert_eq!(record.attempt, 1, "{record:?}");
    }
}
