//! What the cluster scenarios share: a lattice of three hosts and two controllers, pushing guest
//! components, reading facts and replicas' projections.

use std::collections::BTreeSet;
use std::time::Duration;

use trellis_schemas::control::{HostListRequest, ProjectionReply, ProjectionRequest};
use trellis_schemas::{Fact, FactKind, HostStatus};
use trellis_tests::cluster::Cluster;
use trellis_tests::{components, wait_for};

/// Generous: the machine is small and shared.
pub const T: Duration = Duration::from_secs(60);
/// The controllers' liveness timeout: short, so that losses are detected quickly, but ten
/// heartbeats long (hosts beat every 250 ms), so that a loaded machine does not lose a live host.
pub const HOST_TIMEOUT: &str = "3s";
/// [`HOST_TIMEOUT`] as a duration.
pub const HOST_TIMEOUT_D: Duration = Duration::from_secs(3);

/// Starts NATS, controller replicas `c1` and `c2`, and hosts `h1` (zone=a, disk=ssd),
/// `h2` (zone=b, disk=ssd), `h3` (zone=c, disk=hdd); waits until all three hosts are up and both
/// replicas answer.
pub async fn three_hosts(test: &str) -> Cluster {
    let mut cluster = Cluster::start(test).await;
    cluster.controller("c1", HOST_TIMEOUT).await;
    cluster.controller("c2", HOST_TIMEOUT).await;
    cluster.host("h1", &["zone=a", "disk=ssd"], &[]).await;
    cluster.host("h2", &["zone=b", "disk=ssd"], &[]).await;
    cluster.host("h3", &["zone=c", "disk=hdd"], &[]).await;
    let ctl = cluster.ctl().await;
    wait_for("three hosts up", T, || async {
        let reply = ctl.request(&HostListRequest::default()).await.ok()?;
        (reply
            .hosts
            .iter()
            .filter(|h| h.status == HostStatus::Up)
            .count()
            == 3)
            .then_some(())
    })
    .await;
    projections_of_both(&cluster, 0).await;
    cluster
}

/// Asks `lattice.projection` (with `min_seq`) until both replicas `c1` and `c2` have answered;
/// returns their replies, `c1`'s first.
pub async fn projections_of_both(cluster: &Cluster, min_seq: u64) -> [ProjectionReply; 2] {
    let ctl = cluster.ctl().await;
    let request = ProjectionRequest {
        min_seq: (min_seq > 0).then_some(min_seq),
    };
    let deadline = std::time::Instant::now() + T;
    let (mut c1, mut c2) = (None, None);
    while c1.is_none() || c2.is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "both controller replicas did not answer within {T:?}"
        );
        match ctl.request(&request).await {
            Ok(reply) => match reply.served_by.as_str() {
                "c1" => c1 = Some(reply),
                "c2" => c2 = Some(reply),
                other => panic!("unexpected replica {other}"),
            },
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    [c1.unwrap(), c2.unwrap()]
}

/// The manifest of a test component.
pub fn manifest(name: &str, timeout: &str) -> String {
    format!(
        "[component]\nname = \"{name}\"\nversion = \"1.0.0\"\n\n[limits]\nmax_memory = \"16MiB\"\nfuel = 100_000_000_000\ntimeout = \"{timeout}\"\nmax_concurrency = 8\n"
    )
}

/// Pushes guest `guest` as component `name` with the CLI.
pub fn push(cluster: &Cluster, guest: &str, name: &str, timeout: &str) {
    push_with_manifest(cluster, guest, name, &manifest(name, timeout));
}

/// Pushes guest `guest` as component `name` with the CLI, described by the manifest `toml`.
pub fn push_with_manifest(cluster: &Cluster, guest: &str, name: &str, toml: &str) {
    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join(format!("{name}.wasm"));
    std::fs::copy(components::build().path(guest), &wasm).unwrap();
    let manifest = dir.path().join(format!("{name}.toml"));
    std::fs::write(&manifest, toml).unwrap();
    let (code, out, err) = cluster.cli(&[
        "component",
        "push",
        wasm.to_str().unwrap(),
        "--manifest",
        manifest.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "push {name}: {out}{err}");
}

/// `trellis instance start <args> --wait -o json`; returns the reply as JSON.
pub fn start(cluster: &Cluster, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["instance", "start"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--wait", "-o", "json", "--timeout", "30s"]);
    let (code, out, err) = cluster.cli(&all);
    assert_eq!(code, 0, "instance start {args:?}: {out}{err}");
    serde_json::from_str(&out).unwrap()
}

/// The (instance id, host id) pairs of a start reply.
pub fn placements(started: &serde_json::Value) -> Vec<(String, String)> {
    started["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["instance_id"].as_str().unwrap().to_owned(),
                p["host_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Facts of `kind` whose entity is `id`.
pub fn of<'a>(facts: &'a [Fact], kind: FactKind, id: &str) -> Vec<&'a Fact> {
    facts
        .iter()
        .filter(|f| f.event.kind() == kind && f.event.data.entity_id() == id)
        .collect()
}

/// Asserts that no two facts in the stream have the same event id (each fact stored once).
pub fn assert_each_fact_once(facts: &[Fact]) {
    let mut ids = BTreeSet::new();
    for f in facts {
        assert!(
            ids.insert(f.event.id),
            "fact {} ({:?}) is stored twice",
            f.event.id,
            f.event.kind()
        );
    }
}

/// Calls `export` of `target` (a component name or an instance id) with the CLI; returns the
/// exit code and output.
pub fn call(cluster: &Cluster, target: &str, export: &str, args: &[&str]) -> (i32, String) {
    let mut all = vec!["call", target, export];
    all.extend_from_slice(args);
    let (code, out, err) = cluster.cli(&all);
    (code, format!("{}{}", out.trim(), err.trim()))
}
