//! Rollouts end to end: two versions of one component side by side on two hosts behind the
//! `http-server` provider, under constant HTTP load. Every rollout strategy, an abort and an undo
//! complete with every response counted and none failed, the responses move from the old version
//! to the new, and a 10 % canary step gets its share of 10,000 requests within ±2 points.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;
use trellis_tests::components::{self, example};
use trellis_tests::{Nats, Proc, free_port, lattice, wait_for};

const T: Duration = Duration::from_secs(60);
/// What version 1 (`http-hello`) answers.
const V1: &str = "Hello";
/// What version 2 (`http_faults` on `/`) answers.
const V2: &str = "ok";

struct Lattice {
    nats: Nats,
    l: trellis_schemas::Lattice,
    /// Controller replicas by id.
    controllers: Vec<(String, Proc)>,
    _procs: Vec<Proc>,
}

impl Lattice {
    /// A controller, hosts `hosts` and an http-server provider, each its own process.
    async fn up(name: &str, hosts: &[&str]) -> Self {
        Self::up_with(name, &["c1"], hosts).await
    }

    /// Controller replicas `controllers`, hosts `hosts` and an http-server provider.
    async fn up_with(name: &str, controllers: &[&str], hosts: &[&str]) -> Self {
        let nats = Nats::start().await;
        let l = lattice(name);
        let controllers = controllers
            .iter()
            .map(|c| ((*c).to_owned(), nats.controller(&l, c, "30s")))
            .collect();
        let mut procs: Vec<Proc> = hosts.iter().map(|h| nats.host(&l, h, &[])).collect();
        procs.push(nats.provider(&l, "http-server", &[]));
        let lat = Lattice {
            nats,
            l,
            controllers,
            _procs: procs,
        };
        wait_for("the hosts and the provider", T, || async {
            let (code, listed, _) = lat.try_cli(&["host", "ls", "-o", "json"]);
            let (pcode, providers, _) = lat.try_cli(&["provider", "ls", "-o", "json"]);
            let listed: Value = serde_json::from_str(&listed).ok()?;
            let providers: Value = serde_json::from_str(&providers).ok()?;
            (code == 0
                && pcode == 0
                && listed["hosts"].as_array()?.len() == hosts.len()
                && !providers["providers"].as_array()?.is_empty())
            .then_some(())
        })
        .await;
        lat
    }

    /// Pushes `web` 1.0.0 (`http-hello`) and 2.0.0 (`http_faults`).
    fn push_versions(&self, dir: &std::path::Path) {
        let (hello, _) = example("http_hello");
        let faults = components::build().path("http_faults");
        for (wasm, version) in [(hello, "1.0.0"), (faults, "2.0.0")] {
            self.cli(&[
                "component",
                "push",
                wasm.to_str().unwrap(),
                "--manifest",
                manifest(dir, version).to_str().unwrap(),
            ]);
        }
    }

    /// Grants `web` an HTTP listener on a fresh port, starts `count` instances of 1.0.0 and
    /// waits until the listener answers. Returns the port.
    async fn serve_v1(&self, count: u32) -> u16 {
        let port = free_port();
        self.cli(&[
            "assignment",
            "grant",
            "web",
            "wasi:http/incoming-handler",
            "http-server",
            "--config",
            &format!("address=127.0.0.1:{port}"),
        ]);
        self.cli(&[
            "instance",
            "start",
            "web@1.0.0",
            "--count",
            &count.to_string(),
            "--restart",
            "always",
            "--wait",
        ]);
        wait_for("the listener", T, || async {
            let url = format!("http://127.0.0.1:{port}/");
            let reply = trellis_tests::http_request("GET", &url, "").await.ok()?;
            (reply.status == 200).then_some(())
        })
        .await;
        port
    }

    fn try_cli(&self, args: &[&str]) -> (i32, String, String) {
        let mut all = vec!["--lattice", self.l.as_str()];
        all.extend_from_slice(args);
        self.nats.cli(&all)
    }

    fn cli(&self, args: &[&str]) -> String {
        let (code, out, err) = self.try_cli(args);
        assert_eq!(code, 0, "trellis {}: {out}{err}", args.join(" "));
        out
    }

    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.cli(&all)).expect("json")
    }

    /// `trellis … -o json` that must fail: its error code.
    fn error_code(&self, args: &[&str]) -> String {
        let mut all = args.to_vec();
        all.extend_from_slice(&["-o", "json"]);
        let (code, out, err) = self.try_cli(&all);
        assert_ne!(code, 0, "trellis {} succeeded: {out}", args.join(" "));
        let text = format!("{out}{err}");
        for code in [
            "not_found",
            "conflict",
            "invalid_state",
            "invalid_request",
            "unavailable",
        ] {
            if text.contains(code) {
                return code.to_owned();
            }
        }
        panic!("trellis {}: no error code in {text}", args.join(" "));
    }
}

fn manifest(dir: &std::path::Path, version: &str) -> std::path::PathBuf {
    let path = dir.join(format!("web-{version}.toml"));
    std::fs::write(
        &path,
        format!(
            r#"
[component]
name = "web"
version = "{version}"

[limits]
max_memory = "16MiB"
fuel = 100_000_000
timeout = "5s"
max_concurrency = 64

[capabilities]
imports = ["wasi:http/types"]
requires = ["wasi:http/incoming-handler"]
"#
        ),
    )
    .unwrap();
    path
}

/// Counts every response of a constant load of `connections` keep-alive connections.
#[derive(Default)]
struct Load {
    v1: AtomicU64,
    v2: AtomicU64,
    failed: AtomicU64,
    /// The last failure, for the assertion message.
    last_failure: std::sync::Mutex<Option<String>>,
    stop: AtomicBool,
}

impl Load {
    fn start(
        port: u16,
        path: &'static str,
        connections: usize,
    ) -> (Arc<Self>, Vec<tokio::task::JoinHandle<()>>) {
        let load = Arc::new(Self::default());
        let tasks = (0..connections)
            .map(|_| {
                let load = Arc::clone(&load);
                tokio::spawn(async move { load.run(port, path).await })
            })
            .collect();
        (load, tasks)
    }

    async fn stop(&self, tasks: Vec<tokio::task::JoinHandle<()>>) {
        self.stop.store(true, Ordering::Relaxed);
        for task in tasks {
            let _ = task.await;
        }
    }

    async fn run(&self, port: u16, path: &str) {
        use http_body_util::BodyExt as _;
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_max_idle_per_host(1)
                .build_http::<http_body_util::Empty<bytes::Bytes>>();
        let uri: http::Uri = format!("http://127.0.0.1:{port}{path}").parse().unwrap();
        while !self.stop.load(Ordering::Relaxed) {
            let answer = async {
                let response = client.get(uri.clone()).await.map_err(|e| e.to_string())?;
                let status = response.status().as_u16();
                let body = response
                    .into_body()
                    .collect()
                    .await
                    .map_err(|e| e.to_string())?
                    .to_bytes();
                Ok::<_, String>((status, String::from_utf8_lossy(&body).into_owned()))
            };
            match tokio::time::timeout(Duration::from_secs(20), answer).await {
                Ok(Ok((200, body))) if body.starts_with(V1) => {
                    self.v1.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Ok((status, body))) if body == V2 || (status == 500 && path != "/") => {
                    self.v2.fetch_add(1, Ordering::Relaxed);
                }
                other => {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    *self
                        .last_failure
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) =
                        Some(format!("{other:?}"));
                }
            }
        }
    }

    fn counts(&self) -> (u64, u64, u64) {
        (
            self.v1.load(Ordering::Relaxed),
            self.v2.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    fn reset(&self) {
        self.v1.store(0, Ordering::Relaxed);
        self.v2.store(0, Ordering::Relaxed);
    }

    fn assert_no_failure(&self, during: &str) {
        let (v1, v2, failed) = self.counts();
        assert_eq!(
            failed,
            0,
            "{failed} failed requests during {during} (v1 {v1}, v2 {v2}); last: {:?}",
            self.last_failure
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        );
    }

    /// Waits until `n` responses in a row come from the version answering `want`.
    async fn settles_on(&self, want: &str, what: &str) {
        wait_for(what, T, || async {
            self.reset();
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (v1, v2, _) = self.counts();
            let ok = if want == V1 {
                v1 > 50 && v2 == 0
            } else {
                v2 > 50 && v1 == 0
            };
            ok.then_some(())
        })
        .await;
    }
}

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
    tokio::time::sleep(Duration::from_millis(300)).await;
    load.reset();
    wait_for("10,000 requests at the 10 % step", T, || async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (v1, v2, _) = load.counts();
        (v1 + v2 >= 10_000).then_some(())
    })
    .await;
    let (v1, v2, _) = load.counts();
    let share = v2 as f64 * 100.0 / (v1 + v2) as f64;
    assert!(
        (8.0..=12.0).contains(&share),
        "the canary got {share:.2} % ({v2} of {}), not 10 ± 2",
        v1 + v2
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
