//! Scheduling over three hosts in containers: spread, labels, and the reason when nothing fits.

use std::collections::BTreeMap;

use crate::common::{call, placements, push, start, three_hosts};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduling_spreads_over_hosts_honours_labels_and_says_why_nothing_fits() {
    let cluster = three_hosts("sched").await;
    push(&cluster, "counter", "counter", "2s");

    // Six instances: two on each host.
    let started = start(&cluster, &["counter", "--count", "6"]);
    let mut per_host: BTreeMap<String, usize> = BTreeMap::new();
    for (_, host) in placements(&started) {
        *per_host.entry(host).or_default() += 1;
    }
    assert_eq!(
        per_host,
        BTreeMap::from([("h1".into(), 2), ("h2".into(), 2), ("h3".into(), 2)]),
        "{started}"
    );

    // Labels: disk=ssd is h1 and h2, spread over both; zone=c is h3 only.
    let ssd = start(
        &cluster,
        &["counter", "--label", "disk=ssd", "--count", "2"],
    );
    let mut hosts: Vec<String> = placements(&ssd).into_iter().map(|(_, h)| h).collect();
    hosts.sort();
    assert_eq!(hosts, ["h1", "h2"], "{ssd}");
    let c = start(
        &cluster,
        &["counter", "--label", "zone=c", "--label", "disk=hdd"],
    );
    assert_eq!(placements(&c)[0].1, "h3", "{c}");

    // Nothing fits: the error names every host and why.
    let (code, out, err) = cluster.cli(&["instance", "start", "counter", "--label", "zone=x"]);
    assert_eq!(code, 1, "{out}{err}");
    for why in [
        "h1: label zone=x wanted, host has zone=a",
        "h2: label zone=x wanted, host has zone=b",
        "h3: label zone=x wanted, host has zone=c",
    ] {
        assert!(err.contains(why), "{why:?} not in: {err}");
    }
    let (code, _, err) = cluster.cli(&[
        "instance", "start", "counter", "--label", "disk=ssd", "--label", "zone=c",
    ]);
    assert_eq!(code, 1);
    assert!(
        err.contains("h3: label disk=ssd wanted, host has disk=hdd"),
        "{err}"
    );

    // Every instance serves calls that cross the network: the test process → NATS → a host.
    for _ in 0..6 {
        assert_eq!(
            call(&cluster, "counter", "increment", &[]),
            (0, "1".to_owned())
        );
    }
    for (id, _) in placements(&started) {
        assert_eq!(call(&cluster, &id, "peek", &[]), (0, "0".to_owned()));
    }
    let (code, out, _) = cluster.cli(&["instance", "ls", "-o", "json"]);
    assert_eq!(code, 0);
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    let running = listed["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["status"] == "running")
        .count();
    assert_eq!(running, 9, "{out}");
}
