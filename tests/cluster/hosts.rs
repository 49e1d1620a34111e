//! Hosts that die or freeze: `host.lost` exactly once, their instances reported lost, those
//! whose restart policy asks for it relocated to live hosts, and a host that comes back stops
//! what it ran before announcing itself again, so that no instance runs twice.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use trellis_schemas::control::InstanceListRequest;
use trellis_schemas::{Fact, FactData, FactKind, Heartbeat, InstanceStatus, subject};
use trellis_tests::cluster::Cluster;
use trellis_tests::wait_for;

use crate::common::{
    HOST_TIMEOUT_D, T, assert_each_fact_once, call, of, placements, push, start, three_hosts,
};

/// A relocation as its fact tells it: (old instance, from host, new instance, to host).
fn relocations(facts: &[Fact]) -> Vec<(String, String, String, String, String)> {
    facts
        .iter()
        .filter_map(|f| match &f.event.data {
            FactData::InstanceRelocated(d) => Some((
                d.instance_id.to_string(),
                d.from_host.to_string(),
                d.replacement.to_string(),
                d.to_host.to_string(),
                f.event.id.to_string(),
            )),
            _ => None,
        })
        .collect()
}

/// Starts `always`, `backoff` and `never` instances, one of each policy on every host; returns
/// them by policy as (instance, host).
fn start_one_per_host_and_policy(
    cluster: &Cluster,
) -> BTreeMap<&'static str, Vec<(String, String)>> {
    push(cluster, "counter", "counter", "2s");
    push(cluster, "typed", "typed", "2s");
    push(cluster, "trap", "trapper", "2s");
    let mut by_policy = BTreeMap::new();
    for (policy, component, restart) in [
        ("always", "counter", "always"),
        ("backoff", "typed", "backoff:100ms,1s"),
        ("never", "trapper", "never"),
    ] {
        let started = start(cluster, &[component, "--count", "3", "--restart", restart]);
        let placed = placements(&started);
        let hosts: BTreeSet<&str> = placed.iter().map(|(_, h)| h.as_str()).collect();
        assert_eq!(hosts.len(), 3, "one per host: {started}");
        by_policy.insert(policy, placed);
    }
    by_policy
}

/// The instance of `policy` that ran on `host`.
fn on_host(by_policy: &BTreeMap<&str, Vec<(String, String)>>, policy: &str, host: &str) -> String {
    by_policy[policy]
        .iter()
        .find(|(_, h)| h == host)
        .map(|(i, _)| i.clone())
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_host_is_lost_once_and_its_instances_move_to_live_hosts_by_policy() {
    let cluster = three_hosts("kill").await;
    let by_policy = start_one_per_host_and_policy(&cluster);
    let always = on_host(&by_policy, "always", "h2");
    let backoff = on_host(&by_policy, "backoff", "h2");
    let never = on_host(&by_policy, "never", "h2");
    assert_eq!(call(&cluster, &always, "increment", &[]), (0, "1".into()));

    let killed = Instant::now();
    cluster.kill("h2");
    wait_for("host.lost of h2", T, || async {
        let facts = cluster.facts().await;
        of(&facts, FactKind::HostLost, "h2").first().map(|_| ())
    })
    .await;
    let to_lost = killed.elapsed();

    // Both replacements serve calls on live hosts.
    let (relocated, to_serving) = wait_for("relocated instances to serve", T, || async {
        let facts = cluster.facts().await;
        let moved = relocations(&facts);
        let a = moved.iter().find(|r| r.0 == always)?.clone();
        let b = moved.iter().find(|r| r.0 == backoff)?.clone();
        let (code, out) = call(&cluster, &a.2, "increment", &[]);
        if (code, out.as_str()) != (0, "1") {
            return None;
        }
        let (code, out) = call(&cluster, &b.2, "add", &["40", "2"]);
        ((code, out.as_str()) == (0, "42")).then(|| (vec![a, b], killed.elapsed()))
    })
    .await;
    println!(
        "figure: host SIGKILL → host.lost {} ms (liveness timeout {} ms, heartbeat 250 ms); \
         → relocated instances serving {} ms",
        to_lost.as_millis(),
        HOST_TIMEOUT_D.as_millis(),
        to_serving.as_millis()
    );

    // Give the other replica time to (wrongly) declare the loss a second time, then read the
    // whole story.
    tokio::time::sleep(HOST_TIMEOUT_D * 2).await;
    let facts = cluster.facts().await;
    assert_each_fact_once(&facts);
    assert_eq!(
        of(&facts, FactKind::HostLost, "h2").len(),
        1,
        "exactly one host.lost"
    );
    for host in ["h1", "h3"] {
        assert!(
            of(&facts, FactKind::HostLost, host).is_empty(),
            "{host} lives"
        );
    }
    let lost_fact = of(&facts, FactKind::HostLost, "h2")[0].clone();
    for (old, from, new, to, fact_id) in &relocated {
        assert_eq!(from, "h2");
        assert!(to == "h1" || to == "h3", "relocated to a live host: {to}");
        assert_ne!(old, new, "a replacement has a new instance id");
        assert_eq!(of(&facts, FactKind::InstanceRelocated, old).len(), 1);
        let relocated_fact = of(&facts, FactKind::InstanceRelocated, old)[0];
        assert!(relocated_fact.seq > lost_fact.seq);
        assert_eq!(
            relocated_fact.event.causation_id.as_deref(),
            Some(lost_fact.event.id.to_string().as_str()),
            "the relocation is caused by the loss"
        );
        let started = of(&facts, FactKind::InstanceStarted, new);
        assert_eq!(started.len(), 1, "replacement {new} started once");
        assert_eq!(
            started[0].event.causation_id.as_deref(),
            Some(fact_id.as_str()),
            "the replacement's start is caused by the relocation"
        );
    }
    // Policy never: lost, and it stays lost.
    assert!(of(&facts, FactKind::InstanceRelocated, &never).is_empty());
    let ctl = cluster.ctl().await;
    let list = ctl.request(&InstanceListRequest::default()).await.unwrap();
    let status = |id: &str| {
        list.instances
            .iter()
            .find(|i| i.instance_id.as_str() == id)
            .map(|i| i.status)
    };
    assert_eq!(status(&never), Some(InstanceStatus::Lost));
    for (old, _, new, _, _) in &relocated {
        assert_eq!(status(old), Some(InstanceStatus::Lost), "{old}");
        assert_eq!(status(new), Some(InstanceStatus::Running), "{new}");
        let record = list
            .instances
            .iter()
            .find(|i| i.instance_id.as_str() == old)
            .unwrap();
        assert_eq!(
            record.replaced_by.as_ref().map(|r| r.as_str()),
            Some(new.as_str())
        );
    }
    // Instances on the live hosts were not touched.
    for policy in ["always", "backoff", "never"] {
        for host in ["h1", "h3"] {
            let id = on_host(&by_policy, policy, host);
            assert_eq!(
                status(&id),
                Some(InstanceStatus::Running),
                "{policy} on {host}"
            );
        }
    }
}

/// Records, from heartbeats, on which hosts each instance id was seen and when.
#[derive(Default)]
struct Sightings {
    /// instance id → host → last time seen.
    seen: BTreeMap<String, BTreeMap<String, Instant>>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_host_is_lost_then_back_and_no_instance_runs_twice() {
    let cluster = three_hosts("pause").await;
    let by_policy = start_one_per_host_and_policy(&cluster);
    let always = on_host(&by_policy, "always", "h2");
    let never = on_host(&by_policy, "never", "h2");

    // Watch every heartbeat from now on.
    let sightings = Arc::new(Mutex::new(Sightings::default()));
    let client = cluster.client().await;
    let mut heartbeats = client
        .subscribe(subject::heartbeats_all(&cluster.lattice))
        .await
        .unwrap();
    let watcher = {
        let sightings = sightings.clone();
        tokio::spawn(async move {
            while let Some(message) = heartbeats.next().await {
                let Ok(hb) = serde_json::from_slice::<Heartbeat>(&message.payload) else {
                    continue;
                };
                let now = Instant::now();
                let mut s = sightings.lock().unwrap();
                for i in hb.instances {
                    s.seen
                        .entry(i.instance_id)
                        .or_default()
                        .insert(hb.host_id.to_string(), now);
                }
            }
        })
    };

    cluster.pause("h2").await;
    wait_for("host.lost of h2 and the relocation", T, || async {
        let facts = cluster.facts().await;
        (!of(&facts, FactKind::HostLost, "h2").is_empty()
            && relocations(&facts).iter().any(|r| r.0 == always))
        .then_some(())
    })
    .await;
    cluster.unpause("h2").await;

    // Back: h2 stops what it ran before, then announces itself again.
    let facts = wait_for("h2 to rejoin", T, || async {
        let facts = cluster.facts().await;
        let lost = of(&facts, FactKind::HostLost, "h2").first()?.seq;
        facts
            .iter()
            .any(|f| {
                f.seq > lost
                    && matches!(&f.event.data, FactData::HostStarted(d) if d.host_id.as_str() == "h2" && d.rejoined)
            })
            .then_some(facts)
    })
    .await;
    // h2 published `instance.stopped` for its old instances (after taking them out of its
    // inventory) before it announced itself again: heartbeats from now on must not list them.
    let settled = Instant::now() + Duration::from_millis(250);
    assert_each_fact_once(&facts);
    let lost = of(&facts, FactKind::HostLost, "h2");
    assert_eq!(lost.len(), 1, "exactly one host.lost");
    let rejoined = facts
        .iter()
        .find(|f| {
            f.seq > lost[0].seq
                && matches!(&f.event.data, FactData::HostStarted(d) if d.host_id.as_str() == "h2")
        })
        .unwrap();
    assert_eq!(
        rejoined.event.causation_id.as_deref(),
        Some(lost[0].event.id.to_string().as_str())
    );
    for policy in ["always", "backoff", "never"] {
        let id = on_host(&by_policy, policy, "h2");
        let stopped = of(&facts, FactKind::InstanceStopped, &id);
        assert_eq!(
            stopped.len(),
            1,
            "{policy} instance {id} stopped once by h2"
        );
        assert!(stopped[0].seq > lost[0].seq && stopped[0].seq < rejoined.seq);
        let FactData::InstanceStopped(d) = &stopped[0].event.data else {
            unreachable!()
        };
        assert!(d.reason.contains("declared lost"), "{}", d.reason);
    }
    assert!(of(&facts, FactKind::InstanceRelocated, &never).is_empty());

    // A few heartbeats later: no instance id is seen on two hosts, and h2 runs none of its old
    // instances.
    tokio::time::sleep(Duration::from_secs(2)).await;
    watcher.abort();
    let s = sightings.lock().unwrap();
    for (id, hosts) in &s.seen {
        let recent: Vec<&String> = hosts
            .iter()
            .filter(|(_, at)| **at > settled)
            .map(|(h, _)| h)
            .collect();
        assert!(recent.len() <= 1, "instance {id} runs on {recent:?}");
    }
    for policy in ["always", "backoff", "never"] {
        let id = on_host(&by_policy, policy, "h2");
        let last_on_h2 = s.seen.get(&id).and_then(|h| h.get("h2")).copied();
        assert!(
            last_on_h2.is_none_or(|at| at < settled),
            "h2 still runs its old instance {id}"
        );
    }
    // The replacement of the `always` instance serves; h2 is up again and takes new work.
    let moved = relocations(&facts);
    let replacement = &moved.iter().find(|r| r.0 == always).unwrap().2;
    assert_eq!(
        call(&cluster, replacement, "increment", &[]),
        (0, "1".into())
    );
    let again = start(&cluster, &["counter", "--host", "h2"]);
    assert_eq!(placements(&again)[0].1, "h2");
}
