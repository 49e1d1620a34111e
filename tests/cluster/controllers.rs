//! Controller replicas: one is killed during a burst of commands, the other keeps answering;
//! once it is back, both hold the same projection, equal to an independent replay.

use std::time::{Duration, Instant};

use trellis_ctl::CtlClient;
use trellis_schemas::control::{InstanceListRequest, InstanceStartRequest, StatusRequest};
use trellis_schemas::{FactKind, InstanceId};
use trellis_tests::wait_for;

use crate::common::{T, assert_each_fact_once, of, projections_of_both, push, three_hosts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_killed_during_a_burst_leaves_the_other_answering_and_both_agree_after() {
    let cluster = three_hosts("ctl").await;
    push(&cluster, "counter", "counter", "2s");
    let ctl = CtlClient::new(
        cluster.client().await,
        cluster.lattice.clone(),
        Duration::from_secs(3),
    );

    // A burst of commands, one after the other: starts and queries. c1 is killed after the 15th.
    let mut results: Vec<(Instant, Result<Vec<InstanceId>, String>)> = Vec::new();
    let mut killed_at = None;
    for i in 0..60 {
        if i == 15 {
            cluster.kill("c1");
            killed_at = Some(Instant::now());
        }
        let sent = Instant::now();
        let result = if i % 3 == 0 {
            let request: InstanceStartRequest = serde_json::from_value(serde_json::json!({
                "component": "counter",
                "restart": {"policy": "always"}
            }))
            .unwrap();
            ctl.request(&request)
                .await
                .map(|r| r.instances.into_iter().map(|p| p.instance_id).collect())
                .map_err(|e| e.to_string())
        } else {
            ctl.request(&InstanceListRequest::default())
                .await
                .map(|_| Vec::new())
                .map_err(|e| e.to_string())
        };
        results.push((sent, result));
    }
    let killed_at = killed_at.unwrap();
    let failed: Vec<&(Instant, Result<_, String>)> =
        results.iter().filter(|(_, r)| r.is_err()).collect();
    // Only requests in flight to c1 when it died may go unanswered.
    assert!(
        failed.len() <= 2,
        "{} requests failed: {failed:?}",
        failed.len()
    );
    for (sent, result) in &results {
        if *sent > killed_at + Duration::from_secs(1) {
            assert!(
                result.is_ok(),
                "the surviving replica must answer: {result:?}"
            );
        }
    }
    let answered_after = results
        .iter()
        .filter(|(sent, r)| *sent > killed_at && r.is_ok())
        .count();
    assert!(
        answered_after >= 40,
        "{answered_after} answered after the kill"
    );

    // Every start that was accepted was carried out.
    let accepted: Vec<InstanceId> = results
        .iter()
        .filter_map(|(_, r)| r.as_ref().ok())
        .flatten()
        .cloned()
        .collect();
    let facts = wait_for("every accepted start to be reported", T, || async {
        let facts = cluster.facts().await;
        accepted
            .iter()
            .all(|id| !of(&facts, FactKind::InstanceStarted, id.as_str()).is_empty())
            .then_some(facts)
    })
    .await;
    assert_each_fact_once(&facts);

    // c1 comes back, replays, and agrees with c2 and with an independent replay.
    let restarted = Instant::now();
    cluster.start_again("c1").await;
    let tip = facts.last().unwrap().seq;
    let [p1, p2] = projections_of_both(&cluster, tip).await;
    println!(
        "figure: killed controller restarted and answering {} ms after `docker start`",
        restarted.elapsed().as_millis()
    );
    let (independent, _) =
        trellis_ctl::controller::replay_once(&cluster.client().await, &cluster.lattice)
            .await
            .unwrap();
    assert_eq!(
        p1.projection, p2.projection,
        "both replicas hold the same projection"
    );
    assert_eq!(p1.projection, independent, "and it is what the facts say");
    assert_eq!(
        p1.projection.instances.len(),
        accepted.len(),
        "one record per accepted instance"
    );
    let status = ctl.request(&StatusRequest::default()).await.unwrap();
    assert_eq!(status.hosts.up, 3);
}
