//! Rollouts end to end: two versions of one component side by side on two hosts behind the
//! `http-server` provider, under constant HTTP load. Every rollout strategy, an abort and an undo
//! complete with every response counted and none failed, the responses move from the old version
//! to the new, and a 10 % canary step gets its share of 10,000 requests within ±2 points.

use std::time::Duration;

use serde_json::Value;
use trellis_tests::components;
use trellis_tests::rollout::{Load, RolloutLattice as Lattice, T, V1, V2, manifest};
use trellis_tests::wait_for;

fn rollout_id(started: &str) -> String {
    // `rollout <id>: …` is the first line of `rollout start --wait`.
    started
        .split_whitespace()
        .nth(1)
        .map(|s| s.trim_end_matches(':').to_owned())
        .unwrap_or_else(|| panic!("no rollout id in {started:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rollouts_replace_versions_under_load_without_a_failed_request() {
    let lat = Lattice::up("rollouts", &["h1", "h2"]).await;
    let dir = tempfile::tempdir().unwrap();
    lat.push_versions(dir.path());
    // Both versions are listed, with their digests.
    let listed = lat.json(&["component", "ls"]);
    let versions: Vec<&str> = listed["components"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["manifest"]["name"] == "web")
        .map(|c| c["manifest"]["version"].as_str().unwrap())
        .collect();
    assert_eq!(versions.len(), 2, "{listed}");

    // Bad input before anything runs.
    assert_eq!(
        lat.error_code(&["rollout", "start", "web", "--to", "2.0.0"]),
        "invalid_state",
        "nothing runs yet"
    );

    let port = lat.serve_v1(3).await;
    let instances = lat.json(&["instance", "ls", "--component", "web"]);
    let hosts: std::collections::BTreeSet<&str> = instances["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["host_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        hosts.len(),
        2,
        "3 instances spread over both hosts: {instances}"
    );
    assert_eq!(
        lat.error_code(&["rollout", "start", "web", "--to", "9.9.9"]),
        "not_found"
    );
    assert_eq!(
        lat.error_code(&[
            "rollout",
            "start",
            "web",
            "--to",
            "2.0.0",
            "--strategy",
            "canary",
            "--steps",
            "50,10,100"
        ]),
        "invalid_request"
    );
    assert_eq!(
        lat.error_code(&["rollout", "start", "web", "--to", "1.0.0"]),
        "invalid_state",
        "every instance runs it already"
    );
    // The same code under another version is refused: it would take 1.0.0 out of the store.
    let (hello, _) = components::example("http_hello");
    let (code, _, err) = lat.try_cli(&[
        "component",
        "push",
        hello.to_str().unwrap(),
        "--manifest",
        manifest(dir.path(), "1.0.1").to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("conflict") && err.contains("stored already as web@1.0.0"),
        "{err}"
    );

    let (load, tasks) = Load::start(port, "/", 16);
    load.settles_on(V1, "version 1 serving").await;

    // 1. Rolling, 1 surge: new instances serve before old ones drain.
    let out = lat.cli(&["rollout", "start", "web", "--to", "2.0.0", "--wait"]);
    assert!(out.contains("completed"), "{out}");
    load.settles_on(V2, "version 2 after the rolling update")
        .await;
    load.assert_no_failure("the rolling update");
    let ls = lat.json(&["instance", "ls", "--component", "web"]);
    let running: Vec<&Value> = ls["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["status"] == "running")
        .collect();
    assert_eq!(running.len(), 3, "{ls}");
    assert!(running.iter().all(|i| i["version"] == "2.0.0"), "{ls}");
    let stopped_by_rollout = ls["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["status"] == "stopped" && i["last_reason"] == "rollout")
        .count();
    assert_eq!(stopped_by_rollout, 3, "{ls}");

    // 2. Blue-green back to 1.0.0: switched by its timer, the old set kept for a while.
    let out = lat.cli(&[
        "rollout",
        "start",
        "web",
        "--to",
        "1.0.0",
        "--strategy",
        "blue-green",
        "--auto-promote-after",
        "1s",
        "--keep-previous",
        "1s",
        "--wait",
    ]);
    assert!(out.contains("completed"), "{out}");
    load.settles_on(V1, "version 1 after the blue-green switch")
        .await;
    load.assert_no_failure("the blue-green switch");

    // 3. Canary to 2.0.0: held at 10 %, which gets its share of 10,000 requests.
    let out = lat.cli(&[
        "rollout",
        "start",
        "web",
        "--to",
        "2.0.0",
        "--strategy",
        "canary",
        "--steps",
        "10,100",
        "--wait",
    ]);
    assert!(out.contains("paused"), "{out}");
    let id = rollout_id(&out);
    assert_eq!(
        lat.error_code(&["rollout", "start", "web", "--to", "1.0.0"]),
        "conflict",
        "a second rollout of the component"
    );
    let (share, v2, total) = share_of_v2(&load).await;
    assert!(
        (8.0..=12.0).contains(&share),
        "the canary got {share:.2} % ({v2} of {total}), not 10 ± 2"
    );
    // Plain callers of the component subject (`trellis call`, `nats req`) see the same split:
    // the host an instance of the wrong version runs on forwards to the version picked.
    let share = plain_callers_share(&lat).await;
    assert!(
        (8.0..=12.0).contains(&share),
        "over the component subject the canary got {share:.2} %, not 10 ± 2"
    );
    let out = lat.cli(&["rollout", "promote", &id, "--wait"]);
    assert!(out.contains("completed"), "{out}");
    load.settles_on(V2, "version 2 after the canary").await;
    load.assert_no_failure("the canary");
    assert_eq!(
        lat.error_code(&["rollout", "promote", &id]),
        "invalid_state",
        "promoting a finished rollout"
    );

    // 4. A canary back to 1.0.0, aborted at 50 %: version 2 serves everything again.
    let out = lat.cli(&[
        "rollout",
        "start",
        "web",
        "--to",
        "1.0.0",
        "--strategy",
        "canary",
        "--steps",
        "50,100",
        "--wait",
    ]);
    let id = rollout_id(&out);
    let (code, out, err) = lat.try_cli(&["rollout", "abort", &id, "--wait"]);
    assert_eq!(code, 1, "an aborted rollout exits 1: {out}{err}");
    assert!(out.contains("aborted"), "{out}");
    load.settles_on(V2, "version 2 after the abort").await;
    load.assert_no_failure("the abort");

    // 5. Undo: back to the version the last completed rollout replaced (1.0.0).
    let out = lat.cli(&["rollout", "undo", "web", "--wait"]);
    assert!(out.contains("completed"), "{out}");
    load.settles_on(V1, "version 1 after the undo").await;
    load.assert_no_failure("the undo");

    load.stop(tasks).await;
    load.assert_no_failure("the whole run");
    let history = lat.json(&["rollout", "ls", "--component", "web"]);
    let statuses: Vec<&str> = history["rollouts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["status"].as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        [
            "completed",
            "aborted",
            "completed",
            "completed",
            "completed"
        ],
        "{history}"
    );
}

/// The share (percent) of the next 10,000 responses of `load` that version 2 gave, with the
/// counts: (share, version 2, all).
async fn share_of_v2(load: &Load) -> (f64, u64, u64) {
    // The routers follow the step's fact within milliseconds; give them a moment.
    tokio::time::sleep(Duration::from_millis(300)).await;
    load.reset();
    wait_for("10,000 requests at the step", T, || async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (v1, v2, _) = load.counts();
        (v1 + v2 >= 10_000).then_some(())
    })
    .await;
    let (v1, v2, _) = load.counts();
    (v2 as f64 * 100.0 / (v1 + v2) as f64, v2, v1 + v2)
}

/// The share (percent) of 4,000 HTTP requests sent straight to `web`'s component subject, 16 at
/// a time, that version 2 answers.
async fn plain_callers_share(lat: &Lattice) -> f64 {
    use trellis_bus::dataplane as codec;
    use trellis_schemas::capability::rpc::HttpRequestHead;
    use trellis_schemas::dataplane::{self, Op};
    let client = lat.nats.client().await;
    let subject = dataplane::component(
        &lat.l,
        &trellis_schemas::ComponentName::new("web").unwrap(),
        Op::Http,
    );
    let head = HttpRequestHead {
        method: "GET".into(),
        uri: "/".into(),
        authority: None,
        headers: Vec::new(),
        timeout_ms: None,
    };
    let (mut v1, mut v2) = (0u32, 0u32);
    for _ in 0..250 {
        let asks = (0..16).map(|_| {
            let (headers, body) = codec::http_request(&head, bytes::Bytes::new()).unwrap();
            codec::request(&client, subject.clone(), headers, body, T)
        });
        for reply in futures::future::join_all(asks).await {
            let answer = codec::read_http_reply(reply.unwrap()).unwrap();
            match &answer.body[..] {
                b"ok" => v2 += 1,
                body if body.starts_with(V1.as_bytes()) => v1 += 1,
                other => panic!("unexpected answer {:?}", String::from_utf8_lossy(other)),
            }
        }
    }
    f64::from(v2) * 100.0 / f64::from(v1 + v2)
}

/// A canary of `web` 2.0.0 under load on `path`, held at 50 % for a minute with `analysis`: it
/// must be rolled back by the analysis, long before the minute ends. Returns the rollout.
async fn canary_rolled_back(lat: &Lattice, port: u16, path: &'static str, analysis: &str) -> Value {
    let (load, tasks) = Load::start(port, path, 8);
    load.settles_on(V1, "version 1 serving").await;
    let started = std::time::Instant::now();
    let (code, out, err) = lat.try_cli(&[
        "rollout",
        "start",
        "web",
        "--to",
        "2.0.0",
        "--strategy",
        "canary",
        "--steps",
        "50,100",
        "--pause",
        "60s",
        "--analysis",
        analysis,
        "--wait",
    ]);
    let waited = started.elapsed();
    assert_eq!(code, 1, "a rolled-back rollout exits 1: {out}{err}");
    assert!(out.contains("rolled_back"), "{out}");
    assert!(
        waited < Duration::from_secs(50),
        "rolled back by the analysis, not at the end of the pause: {out}"
    );
    load.settles_on(V1, "version 1 after the rollback").await;
    load.stop(tasks).await;
    let listed = lat.json(&["rollout", "ls", "--component", "web"]);
    listed["rollouts"][0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_canary_that_breaks_its_analysis_is_rolled_back_at_once() {
    let lat = Lattice::up("analysis", &["h1"]).await;
    let dir = tempfile::tempdir().unwrap();
    lat.push_versions(dir.path());
    let port = lat.serve_v1(2).await;

    // Version 2 traps on `/trap` (version 1 answers it): crashes and errors.
    let rollout = canary_rolled_back(&lat, port, "/trap", "error_rate<1%,crashes=0").await;
    assert_eq!(rollout["status"], "rolled_back", "{rollout}");
    let reason = rollout["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("error_rate<1%") || reason.starts_with("crashes=0"),
        "the reason names the condition: {reason}"
    );
    assert!(reason.contains('('), "and the figure measured: {reason}");

    // Version 2 takes 300 ms on `/slow` (version 1 answers at once).
    let rollout = canary_rolled_back(&lat, port, "/slow", "p99<200ms").await;
    assert_eq!(rollout["status"], "rolled_back", "{rollout}");
    let reason = rollout["reason"].as_str().unwrap();
    assert!(reason.starts_with("p99<200ms (p99<=500ms)"), "{reason}");

    // A version that cannot start (it requires a capability nobody granted): the rollout
    // aborts with the host's reason, and version 1 serves on.
    let manifest3 = dir.path().join("web-3.0.0.toml");
    std::fs::write(
        &manifest3,
        std::fs::read_to_string(manifest(dir.path(), "3.0.0"))
            .unwrap()
            .replace(
                r#"requires = ["wasi:http/incoming-handler"]"#,
                r#"requires = ["wasi:http/incoming-handler", "wasi:keyvalue"]"#,
            ),
    )
    .unwrap();
    let upstream = components::build().path("http_upstream");
    lat.cli(&[
        "component",
        "push",
        upstream.to_str().unwrap(),
        "--manifest",
        manifest3.to_str().unwrap(),
    ]);
    let (code, out, err) = lat.try_cli(&["rollout", "start", "web", "--to", "3.0.0", "--wait"]);
    assert_eq!(code, 1, "an aborted rollout exits 1: {out}{err}");
    let listed = lat.json(&["rollout", "ls", "--component", "web"]);
    let rollout = &listed["rollouts"][0];
    assert_eq!(rollout["status"], "aborted", "{rollout}");
    let reason = rollout["reason"].as_str().unwrap();
    assert!(
        reason.starts_with("start_failed") && reason.contains("wasi:keyvalue"),
        "{reason}"
    );

    // Every instance left runs version 1.
    let instances = lat.json(&["instance", "ls", "--component", "web"]);
    let running: Vec<&Value> = instances["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["status"] == "running")
        .collect();
    assert_eq!(running.len(), 2, "{instances}");
    assert!(
        running.iter().all(|i| i["version"] == "1.0.0"),
        "{instances}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rollout_survives_the_replica_that_drives_it() {
    let mut lat = Lattice::up_with("takeover", &["c1", "c2"], &["h1", "h2"]).await;
    let dir = tempfile::tempdir().unwrap();
    lat.push_versions(dir.path());
    let port = lat.serve_v1(3).await;
    let (load, tasks) = Load::start(port, "/", 8);
    load.settles_on(V1, "version 1 serving").await;

    let started = lat.json(&[
        "rollout",
        "start",
        "web",
        "--to",
        "2.0.0",
        "--strategy",
        "canary",
        "--steps",
        "10,50,100",
        "--pause",
        "3s",
    ]);
    let id = started["rollout_id"].as_str().unwrap().to_owned();
    wait_for("the 10 % step", T, || async {
        let r = lat.json(&["rollout", "status", &id]);
        (r["weight"] == 10 && r["status"] == "paused").then_some(())
    })
    .await;
    // The replica that recorded `rollout.started` drives it: kill it mid-pause.
    let facts = lat.nats.facts(&lat.l).await;
    let source = facts
        .iter()
        .find(|f| {
            matches!(&f.event.data, trellis_schemas::FactData::RolloutStarted(d) if d.rollout_id.as_str() == id)
        })
        .map(|f| f.event.source.clone())
        .unwrap();
    let driver = lat
        .controllers
        .iter()
        .position(|(name, _)| source.ends_with(&format!("/{name}")))
        .unwrap_or_else(|| panic!("no controller wrote {source}"));
    let (killed, proc) = &mut lat.controllers[driver];
    proc.kill();
    let killed = killed.clone();

    wait_for("the rollout to complete", T, || async {
        let (code, out, _) = lat.try_cli(&["rollout", "status", &id, "-o", "json"]);
        let r: Value = serde_json::from_str(&out).ok()?;
        (code == 0 && r["status"] == "completed").then_some(())
    })
    .await;
    load.settles_on(V2, "version 2 after the takeover").await;
    load.stop(tasks).await;
    load.assert_no_failure("the takeover");

    // One adoption, by the survivor; every step once, in order.
    let facts = lat.nats.facts(&lat.l).await;
    let mine: Vec<&trellis_schemas::FactData> = facts
        .iter()
        .map(|f| &f.event.data)
        .filter(|d| d.entity_id() == id)
        .collect();
    let adoptions: Vec<&String> = mine
        .iter()
        .filter_map(|d| match d {
            trellis_schemas::FactData::RolloutAdopted(a) => Some(&a.replica),
            _ => None,
        })
        .collect();
    assert_eq!(adoptions.len(), 1, "{mine:#?}");
    assert_ne!(adoptions[0], &killed);
    let steps: Vec<u32> = mine
        .iter()
        .filter_map(|d| match d {
            trellis_schemas::FactData::RolloutStepReached(s) => Some(s.step),
            _ => None,
        })
        .collect();
    assert_eq!(
        steps,
        (1..=u32::try_from(steps.len()).unwrap()).collect::<Vec<_>>(),
        "every step once: {mine:#?}"
    );
    let instances = lat.json(&["instance", "ls", "--component", "web"]);
    let running: Vec<&Value> = instances["instances"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["status"] == "running")
        .collect();
    assert_eq!(running.len(), 3, "no instance started twice: {instances}");
    assert!(
        running.iter().all(|i| i["version"] == "2.0.0"),
        "{instances}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_embedded_http_server_follows_the_weights_too() {
    let lat = Lattice::up_embedded("embedded-canary", &["h1"]).await;
    let dir = tempfile::tempdir().unwrap();
    lat.push_versions(dir.path());
    let port = lat.serve_v1(2).await;
    let (load, tasks) = Load::start(port, "/", 16);
    load.settles_on(V1, "version 1 serving").await;
    let out = lat.cli(&[
        "rollout",
        "start",
        "web",
        "--to",
        "2.0.0",
        "--strategy",
        "canary",
        "--steps",
        "10,100",
        "--wait",
    ]);
    assert!(out.contains("paused"), "{out}");
    let id = rollout_id(&out);
    let (share, v2, total) = share_of_v2(&load).await;
    assert!(
        (8.0..=12.0).contains(&share),
        "in process the canary got {share:.2} % ({v2} of {total}), not 10 ± 2"
    );
    let out = lat.cli(&["rollout", "promote", &id, "--wait"]);
    assert!(out.contains("completed"), "{out}");
    load.settles_on(V2, "version 2 after the canary").await;
    load.stop(tasks).await;
    load.assert_no_failure("the canary behind the embedded http-server");
}
