//! The optional etcd registry against a real etcd in a container: hosts started with
//! `--registry etcd://…` record their existence on a lease that expires when they die, provider
//! metadata goes under its own prefix, and nothing else is ever written there.

use std::time::Instant;

use trellis_bus::registry::EtcdRegistry;
use trellis_schemas::control::HostListRequest;
use trellis_tests::cluster::Cluster;
use trellis_tests::wait_for;

use crate::common::{HOST_TIMEOUT, T, call, placements, push, start};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_registry_holds_node_existence_and_provider_metadata_only() {
    let mut cluster = Cluster::start("etcd").await;
    let etcd = cluster.etcd("etcd").await;
    cluster.controller("c1", HOST_TIMEOUT).await;
    cluster
        .host("h1", &["zone=a"], &["--registry", &etcd])
        .await;
    cluster
        .host("h2", &["zone=b"], &["--registry", &etcd])
        .await;
    let port = cluster.host_port("etcd", 2379).await;
    let registry =
        EtcdRegistry::new(&format!("etcd://127.0.0.1:{port}"), &cluster.lattice).unwrap();

    // Both hosts appear, with what they are.
    let nodes = wait_for("both hosts in etcd", T, || async {
        let nodes = registry
            .list(&format!("{}nodes/", registry.prefix()))
            .await
            .ok()?;
        (nodes.len() == 2).then_some(nodes)
    })
    .await;
    assert_eq!(nodes[0].key, "/trellis/default/nodes/h1");
    assert_eq!(nodes[1].key, "/trellis/default/nodes/h2");
    let h1: serde_json::Value = serde_json::from_slice(&nodes[0].value).unwrap();
    assert_eq!(h1["node_id"], "h1");
    assert_eq!(h1["role"], "host");
    assert_eq!(h1["labels"]["zone"], "a");
    assert!(nodes.iter().all(|n| n.lease != 0), "node keys are leased");

    // A provider on its own node records its metadata too.
    cluster
        .provider("p1", "kv", &["--provider-id", "kv-1", "--registry", &etcd])
        .await;
    let providers = wait_for("the provider in etcd", T, || async {
        let found = registry
            .list(&format!("{}providers/", registry.prefix()))
            .await
            .ok()?;
        (found.len() == 1).then_some(found)
    })
    .await;
    let kv: serde_json::Value = serde_json::from_slice(&providers[0].value).unwrap();
    assert_eq!(kv["provider_id"], "kv-1");
    assert_eq!(kv["name"], "kv");
    assert_eq!(kv["capabilities"][0], "wasi:keyvalue");
    assert!(providers[0].lease != 0, "provider keys are leased");

    // The lattice works as usual; its instances leave no trace in etcd.
    let ctl = cluster.ctl().await;
    wait_for("two hosts up", T, || async {
        let reply = ctl.request(&HostListRequest::default()).await.ok()?;
        (reply.hosts.len() == 2).then_some(())
    })
    .await;
    push(&cluster, "counter", "counter", "2s");
    let started = start(&cluster, &["counter", "--count", "2"]);
    assert_eq!(call(&cluster, "counter", "increment", &[]), (0, "1".into()));
    let everything = registry.list("").await.unwrap();
    let keys: Vec<&str> = everything.iter().map(|e| e.key.as_str()).collect();
    assert_eq!(
        keys,
        [
            "/trellis/default/nodes/h1",
            "/trellis/default/nodes/h2",
            "/trellis/default/providers/kv-1"
        ],
        "node existence and provider metadata, nothing else"
    );
    for (instance, _) in placements(&started) {
        assert!(
            everything
                .iter()
                .all(|e| !String::from_utf8_lossy(&e.value).contains(&instance)),
            "no instance state in etcd"
        );
    }

    // A killed host's key expires with its lease; a drained provider's goes at once.
    let killed = Instant::now();
    cluster.kill("h2");
    wait_for("h2's key to expire", T, || async {
        let nodes = registry
            .list(&format!("{}nodes/", registry.prefix()))
            .await
            .ok()?;
        (nodes.len() == 1 && nodes[0].key.ends_with("/h1")).then_some(())
    })
    .await;
    println!(
        "figure: etcd key of a SIGKILLed host gone after {} ms (lease TTL 2 s)",
        killed.elapsed().as_millis()
    );
    cluster.kill("p1");
    wait_for("the provider's key to expire", T, || async {
        let left = registry.list("").await.ok()?;
        let keys: Vec<&str> = left.iter().map(|e| e.key.as_str()).collect();
        (keys == ["/trellis/default/nodes/h1"]).then_some(())
    })
    .await;
}
