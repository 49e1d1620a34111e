//! An edge host behind a NATS leaf node: placed and called like any other host while the leaf's
//! link to the hub is up; while it is cut, the edge host keeps serving callers on its side and
//! keeps its facts; once the link is back, those facts arrive in the hub's stream in order, each
//! once.
//!
//! Containers: the hub runs JetStream in domain `hub`; the leaf node, on a network of its own
//! with the edge host, runs none, so the edge host reaches the lattice's streams, buckets and
//! object store with `--js-domain hub`. The link is cut by disconnecting the leaf from the hub's
//! network.

use std::collections::BTreeSet;

use trellis_schemas::control::{HostListRequest, InstanceGetRequest};
use trellis_schemas::{FactData, HostStatus, InstanceId, InstanceStatus};
use trellis_tests::cluster::Cluster;
use trellis_tests::{cli_at, wait_for};

use crate::common::{T, push};

/// Starts one instance of `component` on the edge host; returns its id.
fn start_on_edge(hub: &str, component: &str) -> String {
    let (code, out, err) = cli_at(
        hub,
        &[
            "instance",
            "start",
            component,
            "--label",
            "site=edge",
            "--restart",
            "always",
            "--wait",
            "-o",
            "json",
        ],
    );
    assert_eq!(code, 0, "start {component}: {out}{err}");
    let started: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(started["instances"][0]["host_id"], "edge", "{out}");
    started["instances"][0]["instance_id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The story of instance `id` in the hub's stream: one line per fact, and each fact's event id.
async fn story(cluster: &Cluster, id: &str) -> (Vec<String>, Vec<String>) {
    let facts = cluster.facts().await;
    let mine: Vec<_> = facts
        .iter()
        .filter(|f| f.event.data.entity_id() == id)
        .collect();
    let lines = mine
        .iter()
        .map(|f| match &f.event.data {
            FactData::InstanceCrashed(d) => format!("crashed {}", d.reason),
            FactData::InstanceRestarting(d) => format!("restarting {}", d.attempt),
            FactData::InstanceStarted(d) => format!("started {}", d.attempt),
            other => other.kind().short_name(),
        })
        .collect();
    let ids = mine.iter().map(|f| f.event.id.to_string()).collect();
    (lines, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edge_host_behind_a_leaf_node_serves_through_a_cut_link_and_its_facts_arrive_once_in_order()
 {
    let mut cluster = Cluster::start_hub("leaf", "hub").await;
    // A host timeout far above the cut, which is what an edge site's link should be given.
    cluster.controller("c", "120s").await;
    cluster.host("core", &["site=core"], &[]).await;
    let leaf = cluster.leaf("leaf").await;
    cluster.host_behind("leaf", "edge", &["site=edge"]).await;
    let hub = cluster.url();
    let ctl = cluster.ctl().await;
    wait_for("the core and edge hosts up", T, || async {
        let reply = ctl.request(&HostListRequest::default()).await.ok()?;
        let up: BTreeSet<&str> = reply
            .hosts
            .iter()
            .filter(|h| h.status == HostStatus::Up)
            .map(|h| h.host_id.as_str())
            .collect();
        (up == BTreeSet::from(["core", "edge"])).then_some(())
    })
    .await;

    // Placed and called like any other host: the edge host fetched the code from the hub's
    // object store through the leaf, and answers callers on either side.
    push(&cluster, "typed", "typed", "2s");
    push(&cluster, "trap", "trapper", "2s");
    start_on_edge(&hub, "typed");
    let trapper = start_on_edge(&hub, "trapper");
    for side in [&hub, &leaf] {
        let (code, out, err) = cli_at(side, &["call", "typed", "add", "40", "2"]);
        assert_eq!((code, out.trim()), (0, "42"), "{err}");
    }
    let (before, _) = story(&cluster, &trapper).await;
    assert_eq!(before, ["started 0"]);

    // Cut the link: the hub's callers get no answer from the edge any more …
    cluster.partition("leaf");
    wait_for("the hub to lose the edge's subjects", T, || async {
        let (code, _, _) = cli_at(&hub, &["--timeout", "1s", "call", "typed", "add", "1", "1"]);
        // No instance answers (no responders once the hub has dropped the leaf's interest).
        (code == 4).then_some(())
    })
    .await;
    // … while callers on the edge's side are served, and a crash there is handled by the edge
    // host alone: reported, restarted by its policy, the facts kept until the link is back.
    for round in 1..=2u32 {
        let (code, out, err) = cli_at(&leaf, &["call", "typed", "add", "40", "2"]);
        assert_eq!((code, out.trim()), (0, "42"), "round {round}: {err}");
        let (code, _, err) = cli_at(&leaf, &["call", &trapper, "run", "boom"]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains("trap: unreachable"), "{err}");
        wait_for("the trapper restarted on the edge", T, || async {
            let (code, out, _) = cli_at(&leaf, &["call", &trapper, "run", "ok"]);
            (code == 0 && out.trim() == "\"no trap\"").then_some(())
        })
        .await;
    }
    let (during, _) = story(&cluster, &trapper).await;
    assert_eq!(during, ["started 0"], "nothing crossed the cut link");

    // Restore it: the edge's facts arrive, in the order they happened, each once.
    cluster.heal("leaf");
    let want = [
        "started 0",
        "crashed trap: unreachable",
        "restarting 1",
        "started 1",
        "crashed trap: unreachable",
        "restarting 2",
        "started 2",
    ];
    let ids = wait_for("the edge's facts in the hub's stream", T, || async {
        let (lines, ids) = story(&cluster, &trapper).await;
        (lines.len() >= want.len()).then_some((lines, ids))
    })
    .await;
    assert_eq!(ids.0, want, "the edge's facts, in order");
    let unique: BTreeSet<&String> = ids.1.iter().collect();
    assert_eq!(
        unique.len(),
        ids.1.len(),
        "each fact stored once: {:?}",
        ids.1
    );

    // The controller's view caught up, and the hub reaches the edge again.
    let id = InstanceId::new(trapper.clone()).unwrap();
    wait_for("the controller to see the restarts", T, || async {
        let reply = ctl
            .request(&InstanceGetRequest {
                instance_id: id.clone(),
                min_seq: None,
            })
            .await
            .ok()?;
        (reply.instance.status == InstanceStatus::Running && reply.instance.attempt == 2)
            .then_some(())
    })
    .await;
    wait_for("the hub to reach the edge again", T, || async {
        let (code, out, _) = cli_at(&hub, &["call", "typed", "add", "40", "2"]);
        (code == 0 && out.trim() == "42").then_some(())
    })
    .await;
    // Nothing the controller did meanwhile declared the edge lost.
    let lost =
        cluster.facts().await.iter().any(
            |f| matches!(&f.event.data, FactData::HostLost(d) if d.host_id.as_str() == "edge"),
        );
    assert!(!lost, "the edge host was declared lost");
}
