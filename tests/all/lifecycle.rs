//! The whole path an operator takes: push a component, start instances through the controller,
//! call them, watch a crash and its restart policy, stop them — all with the `trellis` CLI.

use std::time::Duration;

use trellis_schemas::control::{HostListRequest, InstanceListRequest};
use trellis_schemas::{FactData, FactKind, InstanceStatus};
use trellis_tests::{Nats, components, lattice, wait_for};

const T: Duration = Duration::from_secs(30);

fn manifest(name: &str, timeout: &str) -> String {
    format!(
        "[component]\nname = \"{name}\"\nversion = \"1.0.0\"\n\n[limits]\nmax_memory = \"16MiB\"\nfuel = 50_000_000\ntimeout = \"{timeout}\"\nmax_concurrency = 8\n"
    )
}

/// Writes the guest `name` and its manifest into `dir` and pushes it with the CLI.
fn push(nats: &Nats, dir: &std::path::Path, guest: &str, name: &str) {
    let wasm = dir.join(format!("{name}.wasm"));
    std::fs::copy(components::build().path(guest), &wasm).unwrap();
    let toml = dir.join(format!("{name}.toml"));
    std::fs::write(&toml, manifest(name, "2s")).unwrap();
    let (code, out, err) = nats.cli(&[
        "component",
        "push",
        wasm.to_str().unwrap(),
        "--manifest",
        toml.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "push {name}: {out}{err}");
}

#[tokio::test]
async fn operator_pushes_starts_calls_and_stops_instances_with_the_cli() {
    let nats = Nats::start().await;
    let l = lattice("default");
    let _controller = nats.controller(&l, "c", "30s");
    let _h1 = nats.host(&l, "h1", &["zone=a"]);
    let _h2 = nats.host(&l, "h2", &["zone=b"]);
    let ctl = nats.ctl(&l).await;
    wait_for("two hosts", T, || async {
        let reply = ctl.request(&HostListRequest::default()).await.ok()?;
        (reply.hosts.len() == 2).then_some(())
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    push(&nats, dir.path(), "counter", "counter");

    // Two instances, spread over both hosts; --wait returns once both report started.
    let (code, out, err) = nats.cli(&[
        "instance",
        "start",
        "counter",
        "--count",
        "2",
        "--restart",
        "always",
        "--wait",
        "-o",
        "json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let started: serde_json::Value = serde_json::from_str(&out).unwrap();
    let hosts: std::collections::BTreeSet<&str> = started["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["host_id"].as_str().unwrap())
        .collect();
    assert_eq!(hosts.len(), 2, "spread over both hosts: {out}");
    for fact in started["facts"].as_array().unwrap() {
        assert_eq!(fact["type"], "dev.trellis.instance.started.v1", "{fact}");
        assert_eq!(fact["causationid"], started["operation_id"]);
    }

    // Any instance answers the component's subject; each call sees a fresh store.
    for _ in 0..4 {
        let (code, out, err) = nats.cli(&["call", "counter", "increment"]);
        assert_eq!((code, out.trim()), (0, "1"), "{err}");
    }
    let first = started["instances"][0]["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, out, _) = nats.cli(&["call", &first, "peek"]);
    assert_eq!((code, out.trim()), (0, "0"));
    let (code, _, err) = nats.cli(&["call", "counter", "nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("unknown_export"), "{err}");

    // Labels steer placement.
    let (code, out, err) = nats.cli(&[
        "instance", "start", "counter", "--label", "zone=b", "--wait", "-o", "json",
    ]);
    assert_eq!(code, 0, "{err}");
    let placed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(placed["instances"][0]["host_id"], "h2");

    let (code, out, _) = nats.cli(&["instance", "ls"]);
    assert_eq!(code, 0);
    assert_eq!(
        out.lines().filter(|l| l.contains("running")).count(),
        3,
        "{out}"
    );

    // Stop one and wait for the host to confirm; its history tells the story.
    let (code, out, err) = nats.cli(&["instance", "stop", &first, "--wait"]);
    assert_eq!(code, 0, "{out}{err}");
    let (code, out, _) = nats.cli(&["instance", "get", &first, "-o", "json"]);
    assert_eq!(code, 0);
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(got["instance"]["status"], "stopped", "{got}");
    let kinds: Vec<&str> = got["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["instance.started", "instance.stopped"]);
    let (code, _, err) = nats.cli(&["instance", "stop", &first]);
    assert_eq!(code, 1, "stopping twice is refused: {err}");
    let (code, _, _) = nats.cli(&["instance", "get", "01JNOSUCHINSTANCE000000000"]);
    assert_eq!(code, 3);
}

#[tokio::test]
async fn a_crash_follows_the_restart_policy_chosen_at_start() {
    let nats = Nats::start().await;
    let l = lattice("default");
    let _controller = nats.controller(&l, "c", "30s");
    let _host = nats.host(&l, "h1", &[]);
    let ctl = nats.ctl(&l).await;
    wait_for("host", T, || async {
        let reply = ctl.request(&HostListRequest::default()).await.ok()?;
        (!reply.hosts.is_empty()).then_some(())
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    push(&nats, dir.path(), "trap", "trapper");
    push(&nats, dir.path(), "typed", "typed");

    let (code, out, err) = nats.cli(&[
        "instance",
        "start",
        "trapper",
        "--restart",
        "backoff:50ms,100ms,2",
        "--wait",
        "-o",
        "json",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    let started: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = started["instances"][0]["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, out, err) = nats.cli(&["instance", "start", "typed", "--wait"]);
    assert_eq!(code, 0, "{out}{err}");

    // Each crash is reported with its reason; after two restarts the host gives up.
    for attempt in 1..=3u32 {
        let (code, _, err) = nats.cli(&["call", &id, "run", "boom"]);
        assert_eq!(code, 1, "{err}");
        assert!(
            err.contains("crashed") && err.contains("trap: unreachable"),
            "{err}"
        );
        // The other component is untouched.
        let (code, out, err) = nats.cli(&["call", "typed", "add", "40", "2"]);
        assert_eq!((code, out.trim()), (0, "42"), "{err}");
        let want = if attempt <= 2 {
            InstanceStatus::Running
        } else {
            InstanceStatus::GaveUp
        };
        wait_for("the policy's outcome", T, || async {
            let reply = ctl.request(&InstanceListRequest::default()).await.ok()?;
            let i = reply
                .instances
                .iter()
                .find(|i| i.instance_id.as_str() == id)?;
            (i.status == want && (want == InstanceStatus::GaveUp || i.attempt == attempt))
                .then_some(())
        })
        .await;
    }
    let facts = nats.facts(&l).await;
    let story: Vec<String> = facts
        .iter()
        .filter(|f| f.event.data.entity_id() == id)
        .map(|f| match &f.event.data {
            FactData::InstanceCrashed(d) => format!("crashed {}", d.reason),
            FactData::InstanceRestarting(d) => format!("restarting {} {}ms", d.attempt, d.delay_ms),
            FactData::InstanceStarted(d) => format!("started {}", d.attempt),
            FactData::InstanceGaveUp(d) => format!("gave_up {}", d.attempts),
            other => other.kind().short_name(),
        })
        .collect();
    assert_eq!(
        story,
        [
            "started 0",
            "crashed trap: unreachable",
            "restarting 1 50ms",
            "started 1",
            "crashed trap: unreachable",
            "restarting 2 100ms",
            "started 2",
            "crashed trap: unreachable",
            "gave_up 2",
        ]
    );
    assert!(facts.iter().all(|f| f.event.kind() != FactKind::HostLost));
}
