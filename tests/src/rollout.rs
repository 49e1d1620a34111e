//! A rollout scenario: two versions of `web` (1.0.0 is `http-hello`, 2.0.0 is `http_faults`)
//! behind the `http-server` provider, and an HTTP load that counts every response by version.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::components::{self, example};
use crate::{Nats, Proc, free_port, lattice, wait_for};

/// How long a step of the scenario may take.
pub const T: Duration = Duration::from_secs(60);
/// What version 1 (`http-hello`) answers.
pub const V1: &str = "Hello";
/// What version 2 (`http_faults` on `/`) answers.
pub const V2: &str = "ok";

/// A lattice for rollouts: controller replicas, hosts and an `http-server` provider, each its
/// own process.
#[derive(Debug)]
pub struct RolloutLattice {
    /// The server.
    pub nats: Nats,
    /// The lattice's name.
    pub l: trellis_schemas::Lattice,
    /// Controller replicas by id.
    pub controllers: Vec<(String, Proc)>,
    /// The other servers of its NATS cluster, if it runs on one.
    pub others: Vec<Nats>,
    _procs: Vec<Proc>,
}

impl RolloutLattice {
    /// A controller, hosts `hosts` and an http-server provider, each its own process.
    pub async fn up(name: &str, hosts: &[&str]) -> Self {
        Self::up_with(name, &["c1"], hosts).await
    }

    /// Controller replicas `controllers`, hosts `hosts` and an http-server provider.
    pub async fn up_with(name: &str, controllers: &[&str], hosts: &[&str]) -> Self {
        Self::start(name, controllers, hosts, false).await
    }

    /// One controller and hosts `hosts`, the first running the `http-server` provider
    /// embedded in its process.
    pub async fn up_embedded(name: &str, hosts: &[&str]) -> Self {
        Self::start(name, &["c1"], hosts, true).await
    }

    async fn start(name: &str, controllers: &[&str], hosts: &[&str], embedded: bool) -> Self {
        Self::start_on(
            vec![Nats::start().await],
            name,
            controllers,
            hosts,
            embedded,
        )
        .await
    }

    async fn start_on(
        mut servers: Vec<Nats>,
        name: &str,
        controllers: &[&str],
        hosts: &[&str],
        embedded: bool,
    ) -> Self {
        let l = lattice(name);
        let at = |i: usize| &servers[i % servers.len()];
        let controllers = controllers
            .iter()
            .enumerate()
            .map(|(i, c)| ((*c).to_owned(), at(i).controller(&l, c, "30s")))
            .collect();
        let mut procs: Vec<Proc> = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| at(i + 1).host(&l, h, &[]))
            .collect();
        if !embedded {
            procs.push(at(0).provider(&l, "http-server", &[]));
        }
        let nats = servers.remove(0);
        let lat = RolloutLattice {
            nats,
            l,
            controllers,
            others: servers,
            _procs: procs,
        };
        if embedded {
            wait_for("the hosts", T, || async {
                let (code, listed, _) = lat.try_cli(&["host", "ls", "-o", "json"]);
                let listed: Value = serde_json::from_str(&listed).ok()?;
                (code == 0 && listed["hosts"].as_array()?.len() == hosts.len()).then_some(())
            })
            .await;
            lat.cli(&[
                "provider",
                "start",
                "http-server",
                "--embedded",
                "--host",
                hosts[0],
                "--wait",
            ]);
        }
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
    pub fn push_versions(&self, dir: &std::path::Path) {
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
    pub async fn serve_v1(&self, count: u32) -> u16 {
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
            let reply = crate::http_request("GET", &url, "").await.ok()?;
            (reply.status == 200).then_some(())
        })
        .await;
        port
    }

    /// Runs the `trellis` CLI on this lattice; returns (exit code, stdout, stderr).
    pub fn try_cli(&self, args: &[&str]) -> (i32, String, String) {
        let mut all = vec!["--lattice", self.l.as_str()];
        all.extend_from_slice(args);
        self.nats.cli(&all)
    }

    /// Runs the `trellis` CLI and panics unless it succeeds; returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        let (code, out, err) = self.try_cli(args);
        assert_eq!(code, 0, "trellis {}: {out}{err}", args.join(" "));
        out
    }

    /// Runs the `trellis` CLI with `-o json` and parses what it prints.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend_from_slice(&["-o", "json"]);
        serde_json::from_str(&self.cli(&all)).expect("json")
    }

    /// `trellis … -o json` that must fail: its error code.
    pub fn error_code(&self, args: &[&str]) -> String {
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

/// Writes the `Component.toml` of `web` at `version` into `dir`; returns its path.
pub fn manifest(dir: &std::path::Path, version: &str) -> std::path::PathBuf {
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
#[derive(Debug)]
pub struct Load {
    v1: AtomicU64,
    v2: AtomicU64,
    failed: AtomicU64,
    /// When the load began: the epoch of the `last_*` times.
    epoch: std::time::Instant,
    /// Microseconds after `epoch` at which the last response of each version arrived.
    last_v1: AtomicU64,
    last_v2: AtomicU64,
    /// The last failure, for the assertion message.
    last_failure: std::sync::Mutex<Option<String>>,
    stop: AtomicBool,
}

impl Load {
    /// Starts `connections` connections asking for `path`, as fast as they are answered.
    pub fn start(
        port: u16,
        path: &'static str,
        connections: usize,
    ) -> (Arc<Self>, Vec<tokio::task::JoinHandle<()>>) {
        let load = Arc::new(Self {
            v1: AtomicU64::new(0),
            v2: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            epoch: std::time::Instant::now(),
            last_v1: AtomicU64::new(0),
            last_v2: AtomicU64::new(0),
            last_failure: std::sync::Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        let tasks = (0..connections)
            .map(|_| {
                let load = Arc::clone(&load);
                tokio::spawn(async move { load.run(port, path).await })
            })
            .collect();
        (load, tasks)
    }

    /// Stops the load and waits for its connections.
    pub async fn stop(&self, tasks: Vec<tokio::task::JoinHandle<()>>) {
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
                    self.last_v1.fetch_max(self.now_us(), Ordering::Relaxed);
                }
                Ok(Ok((status, body))) if body == V2 || (status == 500 && path != "/") => {
                    self.v2.fetch_add(1, Ordering::Relaxed);
                    self.last_v2.fetch_max(self.now_us(), Ordering::Relaxed);
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

    fn now_us(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
    }

    /// How long after `since` the last response of the version answering `version` arrived
    /// (zero when none arrived after it): once traffic has moved away from that version, the
    /// time the move took.
    pub fn last_of_after(&self, version: &str, since: std::time::Instant) -> Duration {
        let last = if version == V1 {
            &self.last_v1
        } else {
            &self.last_v2
        };
        let last = self.epoch + Duration::from_micros(last.load(Ordering::Relaxed));
        last.saturating_duration_since(since)
    }

    /// Responses so far: (version 1, version 2, failed).
    pub fn counts(&self) -> (u64, u64, u64) {
        (
            self.v1.load(Ordering::Relaxed),
            self.v2.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }

    /// Starts counting the versions again (failures keep counting).
    pub fn reset(&self) {
        self.v1.store(0, Ordering::Relaxed);
        self.v2.store(0, Ordering::Relaxed);
    }

    /// Panics, naming `during`, when any request failed.
    pub fn assert_no_failure(&self, during: &str) {
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

    /// Waits until 300 ms of responses (more than 50) all come from the version answering
    /// `want`.
    pub async fn settles_on(&self, want: &str, what: &str) {
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
