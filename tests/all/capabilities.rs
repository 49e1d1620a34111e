//! Capabilities end to end: real guests on a real host, real providers, assignments through the
//! controller. Deny by default, per-bucket isolation, HTTP in and out, messaging, required
//! capabilities, and a provider that dies under load.

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use serde_json::{Value, json};
use trellis_schemas::capability::rpc::{CapabilityRequest, KvRequest};
use trellis_schemas::{FactData, FactKind};
use trellis_tests::bench::BenchLattice;
use trellis_tests::{components, free_port, http_request, wait_for};

const T: Duration = Duration::from_secs(30);

/// Writes a Component.toml for guest `name` into `dir` and returns its path.
fn manifest(dir: &Path, name: &str, imports: &[&str], requires: &[&str]) -> PathBuf {
    let list = |items: &[&str]| {
        items
            .iter()
            .map(|i| format!("{i:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let text = format!(
        r#"
[component]
name = "{name}"
version = "0.1.0"

[limits]
max_memory = "16MiB"
fuel = 1_000_000_000
timeout = "3s"
max_concurrency = 32

[capabilities]
imports = [{}]
requires = [{}]
"#,
        list(imports),
        list(requires)
    );
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    path
}

const KV_IMPORTS: &[&str] = &[
    "wasi:keyvalue/store",
    "wasi:keyvalue/atomics",
    "wasi:keyvalue/batch",
    "wasi:logging/logging",
];

/// A lattice with a controller, a host and the given providers (standalone), and a directory for
/// manifests.
struct Lab {
    lattice: BenchLattice,
    dir: tempfile::TempDir,
}

impl std::ops::Deref for Lab {
    type Target = BenchLattice;
    fn deref(&self) -> &BenchLattice {
        &self.lattice
    }
}

impl Lab {
    async fn up(providers: &[&str]) -> Self {
        Self {
            lattice: BenchLattice::up("default", providers).await,
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn cli(&self, args: &[&str]) -> (i32, String, String) {
        self.lattice.try_cli(args)
    }

    /// Pushes guest `name` with a manifest.
    fn push(&self, name: &str, imports: &[&str], requires: &[&str]) {
        let wasm = components::build().path(name);
        let manifest = manifest(self.dir.path(), &name.replace('_', "-"), imports, requires);
        self.lattice.push(&wasm, &manifest);
    }

    /// Starts one instance and waits for its outcome; returns (instance id, started?, reason).
    fn start(&self, component: &str, grants: &[&str]) -> (String, bool, String) {
        let mut args = vec!["instance", "start", component, "--wait", "-o", "json"];
        for g in grants {
            args.push("--grant");
            args.push(g);
        }
        let (code, out, err) = self.cli(&args);
        let json: Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("start {component}: {e}: {out} {err} (exit {code})"));
        let id = json["instances"][0]["instance_id"]
            .as_str()
            .unwrap()
            .to_owned();
        let fact = &json["facts"][0];
        let started = fact["type"] == "dev.trellis.instance.started.v1";
        let reason = fact["data"]["reason"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        (id, started, reason)
    }

    /// Calls an export of an instance (or component) and returns its JSON result.
    async fn call(&self, target: &str, export: &str, args: Value) -> Value {
        let client = self.nats.client().await;
        let args: Vec<String> = args
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.to_string())
            .collect();
        let text = trellis_ctl::workload::call_export(
            &client,
            &self.l,
            target,
            export,
            &args,
            Duration::from_secs(10),
        )
        .await
        .unwrap_or_else(|f| panic!("call {target} {export}: {}", f.message));
        serde_json::from_str(&text).unwrap()
    }
}

#[tokio::test]
async fn kv_buckets_are_reached_only_through_their_assignment() {
    let lat = Lab::up(&["kv"]).await;
    lat.push("kv_probe", KV_IMPORTS, &["wasi:keyvalue"]);

    // Without a grant, a component that requires wasi:keyvalue does not start.
    let (_, started, reason) = lat.start("kv-probe", &[]);
    assert!(!started, "started without its required capability");
    assert!(reason.contains("wasi:keyvalue"), "{reason}");

    let (a, started, reason) = lat.start("kv-probe", &["wasi:keyvalue bucket=bucket-a"]);
    assert!(started, "{reason}");
    let (b, started, reason) = lat.start("kv-probe", &["wasi:keyvalue bucket=bucket-b"]);
    assert!(started, "{reason}");

    // A counts in its bucket, with every operation.
    assert_eq!(
        lat.call(&a, "increment", json!(["", "n", 2])).await,
        json!({"ok": 2})
    );
    assert_eq!(
        lat.call(&a, "increment", json!(["bucket-a", "n", 3])).await,
        json!({"ok": 5})
    );
    assert_eq!(
        lat.call(&a, "set", json!(["", "greeting", "hello"])).await,
        json!({"ok": null})
    );
    assert_eq!(
        lat.call(&a, "get", json!(["", "greeting"])).await,
        json!({"ok": "hello"})
    );
    assert_eq!(
        lat.call(&a, "exists", json!(["", "greeting"])).await,
        json!({"ok": true})
    );
    assert_eq!(
        lat.call(
            &a,
            "set-many",
            json!(["", [["x", "1"], ["odd key/é", "2"]]])
        )
        .await,
        json!({"ok": null})
    );
    assert_eq!(
        lat.call(&a, "get-many", json!(["", ["x", "missing", "odd key/é"]]))
            .await,
        json!({"ok": ["1", null, "2"]})
    );
    let keys = lat.call(&a, "list-keys", json!([""])).await;
    let mut keys: Vec<String> = serde_json::from_value(keys["ok"].clone()).unwrap();
    keys.sort();
    assert_eq!(keys, ["greeting", "n", "odd key/é", "x"]);
    assert_eq!(
        lat.call(&a, "delete", json!(["", "greeting"])).await,
        json!({"ok": null})
    );
    assert_eq!(
        lat.call(&a, "get", json!(["", "greeting"])).await,
        json!({"ok": null})
    );

    // B sees its own (empty) bucket, and neither can open the other's.
    assert_eq!(
        lat.call(&b, "get", json!(["", "n"])).await,
        json!({"ok": null})
    );
    let denied = lat.call(&a, "get", json!(["bucket-b", "n"])).await;
    assert_eq!(denied, json!({"err": "access-denied"}));
    let denied = lat.call(&b, "increment", json!(["bucket-a", "n", 1])).await;
    assert_eq!(denied, json!({"err": "access-denied"}));

    // Two instances granted the same bucket share it.
    let (c, started, reason) = lat.start("kv-probe", &["wasi:keyvalue bucket=bucket-a"]);
    assert!(started, "{reason}");
    assert_eq!(
        lat.call(&c, "get", json!(["", "n"])).await,
        json!({"ok": "5"})
    );

    // Revoking A's grant denies its next call at once.
    let (code, out, err) = lat.cli(&["assignment", "ls", "--instance", &a, "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    let assignment = listed["assignments"][0]["assignment"]["assignment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, _, err) = lat.cli(&["assignment", "revoke", &assignment]);
    assert_eq!(code, 0, "{err}");
    wait_for("the revocation to reach the host", T, || async {
        (lat.call(&a, "get", json!(["", "n"])).await == json!({"err": "access-denied"}))
            .then_some(())
    })
    .await;
    let facts = lat.nats.facts(&lat.l).await;
    assert!(
        facts
            .iter()
            .any(|f| f.event.kind() == FactKind::AssignmentRevoked)
    );
}

#[tokio::test]
async fn an_unassigned_import_answers_access_denied_and_calls_no_provider() {
    // No kv provider runs at all: a denied call must not need one.
    let lat = Lab::up(&[]).await;
    lat.push("kv_probe", KV_IMPORTS, &[]);
    let (id, started, reason) = lat.start("kv-probe", &[]);
    assert!(started, "{reason}");
    assert_eq!(
        lat.call(&id, "get", json!(["", "k"])).await,
        json!({"err": "access-denied"})
    );
    // wasi:logging needs no assignment; the instance keeps serving.
    assert_eq!(
        lat.call(&id, "log", json!(["info", "still here"])).await,
        Value::Null
    );

    // A grant whose provider is not running fails inside the guest, quickly and clearly.
    let (code, _, err) = lat.cli(&[
        "assignment",
        "grant",
        &format!("instance:{id}"),
        "wasi:keyvalue",
        "kv",
        "--config",
        "bucket=nowhere",
    ]);
    assert_eq!(code, 0, "{err}");
    let began = Instant::now();
    let answer = wait_for("the grant to reach the host", T, || async {
        let a = lat.call(&id, "get", json!(["", "k"])).await;
        (a != json!({"err": "access-denied"})).then_some(a)
    })
    .await;
    let err = answer["err"].as_str().unwrap_or_default().to_owned();
    assert!(err.contains("no `kv` provider"), "{answer}");
    assert!(began.elapsed() < T);
}

/// A one-connection-at-a-time HTTP server answering every request with `body`; returns its port.
fn tiny_http_server(body: &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let response = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes());
        }
    });
    port
}

#[tokio::test]
async fn outgoing_http_reaches_allowed_hosts_only() {
    let lat = Lab::up(&["http-client"]).await;
    let allowed = tiny_http_server("hello from upstream");
    let other = tiny_http_server("must not be reached");
    lat.push(
        "http_fetch",
        &["wasi:http/outgoing-handler", "wasi:http/types"],
        &["wasi:http/outgoing-handler"],
    );
    let grant = format!("wasi:http/outgoing-handler allowed_hosts=127.0.0.1:{allowed}");
    let (id, started, reason) = lat.start("http-fetch", &[&grant]);
    assert!(started, "{reason}");

    let ok = lat
        .call(
            &id,
            "fetch",
            json!(["GET", format!("http://127.0.0.1:{allowed}/x"), ""]),
        )
        .await;
    assert_eq!(ok, json!({"ok": "200\nhello from upstream"}));

    let denied = lat
        .call(
            &id,
            "fetch",
            json!(["GET", format!("http://127.0.0.1:{other}/x"), ""]),
        )
        .await;
    let err = denied["err"].as_str().unwrap_or_default();
    assert!(err.to_lowercase().contains("denied"), "{denied}");
}

/// Sends one HTTP request to 127.0.0.1:`port`; returns (status, body).
async fn try_http(
    port: u16,
    method: &str,
    path: &str,
    body: &str,
) -> Result<(u16, String), String> {
    let reply = http_request(method, &format!("http://127.0.0.1:{port}{path}"), body).await?;
    Ok((reply.status, reply.body))
}

/// [`try_http`] that must succeed.
async fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    try_http(port, method, path, body)
        .await
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

#[tokio::test]
async fn a_component_written_against_upstream_wasi_serves_http_unchanged() {
    let lat = Lab::up(&["http-server"]).await;
    lat.push(
        "http_upstream",
        &["wasi:http/types"],
        &["wasi:http/incoming-handler"],
    );
    let port = free_port();
    let (code, _, err) = lat.cli(&[
        "assignment",
        "grant",
        "component:http-upstream",
        "wasi:http/incoming-handler",
        "http-server",
        "--config",
        &format!("address=127.0.0.1:{port}"),
    ]);
    assert_eq!(code, 0, "{err}");
    // Nothing runs yet: the provider answers 503 rather than hanging.
    wait_for("the listener", T, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let (status, _) = http(port, "GET", "/nobody", "").await;
    assert_eq!(status, 503);

    let (_, started, reason) = lat.start("http-upstream", &[]);
    assert!(started, "{reason}");
    let (_, started, reason) = lat.start("http-upstream", &[]);
    assert!(started, "{reason}");
    let (status, body) = http(port, "GET", "/hello?x=1", "").await;
    assert_eq!((status, body.as_str()), (200, "upstream: GET /hello?x=1"));
    let (status, body) = http(port, "POST", "/echo", "ping").await;
    assert_eq!(status, 200);
    assert!(
        body.starts_with("upstream: POST /echo") && body.ends_with("ping"),
        "{body}"
    );
    let (status, _) = http(port, "GET", "/status/418", "").await;
    assert_eq!(status, 418);
    // Many requests in a row, over both instances.
    for _ in 0..20 {
        let (status, _) = http(port, "GET", "/again", "").await;
        assert_eq!(status, 200);
    }
}

#[tokio::test]
async fn messaging_delivers_subscribed_messages_and_limits_publishing() {
    let lat = Lab::up(&["messaging"]).await;
    lat.push(
        "messenger",
        &["wasmcloud:messaging/consumer", "wasmcloud:messaging/types"],
        &["wasmcloud:messaging"],
    );
    let (id, started, reason) = lat.start(
        "messenger",
        &["wasmcloud:messaging subscribe=demo.in publish=demo.>"],
    );
    assert!(started, "{reason}");
    let client = lat.nats.client().await;
    let mut echoes = client.subscribe("demo.in.echo").await.unwrap();
    client.flush().await.unwrap();
    // The provider subscribes once it has seen the grant: publish until an echo comes back.
    let deadline = Instant::now() + T;
    let echo = loop {
        client.publish("demo.in", "hi".into()).await.unwrap();
        if let Ok(Some(echo)) =
            tokio::time::timeout(Duration::from_millis(500), echoes.next()).await
        {
            break echo;
        }
        assert!(Instant::now() < deadline, "no echo within {T:?}");
    };
    assert_eq!(&echo.payload[..], b"echo: hi");

    let ok = lat.call(&id, "publish", json!(["demo.out", "x"])).await;
    assert_eq!(ok, json!({"ok": null}));
    let denied = lat.call(&id, "publish", json!(["elsewhere", "x"])).await;
    let err = denied["err"].as_str().unwrap_or_default();
    assert!(err.contains("access denied"), "{denied}");
}

#[tokio::test]
async fn a_provider_killed_under_load_fails_calls_cleanly_and_its_host_restarts_it() {
    let lat = Lab::up(&[]).await;
    lat.push("kv_probe", KV_IMPORTS, &["wasi:keyvalue"]);
    // The host supervises the provider.
    let (code, out, err) = lat.cli(&["provider", "start", "kv", "--wait", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let provider_id = serde_json::from_str::<Value>(&out).unwrap()["provider_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (id, started, reason) = lat.start("kv-probe", &["wasi:keyvalue bucket=load"]);
    assert!(started, "{reason}");
    assert_eq!(
        lat.call(&id, "increment", json!(["", "n", 1])).await,
        json!({"ok": 1})
    );

    // Load from several callers while the provider process is killed.
    let pid = wait_for("the provider's pid", T, || async {
        let out = std::process::Command::new("pgrep")
            .args(["-f", "--", &format!("--provider-id {provider_id}")])
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()?
            .trim()
            .parse::<i32>()
            .ok()
    })
    .await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut callers = Vec::new();
    for _ in 0..4 {
        let client = lat.nats.client().await;
        let l = lat.l.clone();
        let id = id.clone();
        let stop = stop.clone();
        callers.push(tokio::spawn(async move {
            let (mut ok, mut failed, mut slowest) = (0u32, Vec::new(), Duration::ZERO);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let began = Instant::now();
                let text = trellis_ctl::workload::call_export(
                    &client,
                    &l,
                    &id,
                    "increment",
                    &["\"\"".into(), "\"n\"".into(), "1".into()],
                    Duration::from_secs(10),
                )
                .await
                .map_err(|f| f.message);
                slowest = slowest.max(began.elapsed());
                match text.map(|t| serde_json::from_str::<Value>(&t).unwrap()) {
                    Ok(v) if v.get("ok").is_some() => ok += 1,
                    Ok(v) => failed.push(v.to_string()),
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed, slowest)
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    // The host records the crash and starts the provider again.
    wait_for("provider.crashed then provider.started again", T, || async {
        let facts = lat.nats.facts(&lat.l).await;
        let crashed = facts.iter().position(|f| {
            matches!(&f.event.data, FactData::ProviderCrashed(d) if d.provider_id.as_str() == provider_id)
        })?;
        facts[crashed..]
            .iter()
            .any(|f| matches!(&f.event.data, FactData::ProviderStarted(d) if d.provider_id.as_str() == provider_id))
            .then_some(())
    })
    .await;
    // Calls succeed again.
    wait_for("calls to succeed again", T, || async {
        (lat.call(&id, "increment", json!(["", "n", 0]))
            .await
            .get("ok")
            .is_some())
        .then_some(())
    })
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut total_ok = 0;
    let mut all_failed = Vec::new();
    for c in callers {
        let (ok, failed, slowest) = c.await.unwrap();
        total_ok += ok;
        all_failed.extend(failed);
        // Every call ended within the component's timeout (3 s) and the data-plane margin.
        assert!(
            slowest < Duration::from_secs(9),
            "a call hung for {slowest:?}"
        );
    }
    assert!(total_ok > 0);
    // Failures during the outage are errors the guest saw, naming the provider, never crashes.
    for f in &all_failed {
        assert!(
            f.contains("kv") || f.contains("unavailable") || f.contains("provider"),
            "unexpected failure: {f}"
        );
    }
    // The instance never crashed.
    let facts = lat.nats.facts(&lat.l).await;
    assert!(
        !facts
            .iter()
            .any(|f| f.event.kind() == FactKind::InstanceCrashed)
    );
}

#[tokio::test]
async fn kv_counter_keeps_counting_across_instances_because_state_lives_in_the_provider() {
    let lat = Lab::up(&["kv", "http-server"]).await;
    let (wasm, manifest) = components::example("kv_counter");
    lat.lattice.push(&wasm, &manifest);
    let port = free_port();
    let http_grant = format!("wasi:http/incoming-handler address=127.0.0.1:{port}");
    let kv_grant = "wasi:keyvalue bucket=counter";
    let (first, started, reason) = lat.start("kv-counter", &[kv_grant, &http_grant]);
    assert!(started, "{reason}");
    let count = |n: u32| format!("count: {n}\n");
    let (status, body) = wait_for("the first count", T, || async {
        let got = try_http(port, "GET", "/", "").await.ok()?;
        (got.0 == 200).then_some(got)
    })
    .await;
    assert_eq!((status, body), (200, count(1)));
    assert_eq!(http(port, "GET", "/", "").await, (200, count(2)));

    // Stop the instance: its listener goes with its assignment... so grant the next one the
    // same bucket and address, and the count goes on.
    let (code, _, err) = lat.cli(&["instance", "stop", &first, "--wait"]);
    assert_eq!(code, 0, "{err}");
    let (_, started, reason) = lat.start("kv-counter", &[kv_grant, &http_grant]);
    assert!(started, "{reason}");
    // The new grant's listener may not be bound yet: a refused connection is tried again.
    let (status, body) = wait_for("the count after a restart", T, || async {
        let got = try_http(port, "GET", "/", "").await.ok()?;
        (got.0 == 200).then_some(got)
    })
    .await;
    assert_eq!((status, body), (200, count(3)));
}

#[tokio::test]
async fn a_component_built_with_spins_sdk_counts_in_its_assigned_bucket_unchanged() {
    // `spin_counter` is written with spin-sdk 3 from crates.io: it imports Spin's
    // `fermyon:spin/key-value@2.0.0` and `wasi:http` 0.2.4, and exports the 0.2.0 handler.
    let lat = Lab::up(&["kv", "http-server"]).await;
    lat.push(
        "spin_counter",
        &["fermyon:spin/key-value", "wasi:http/types"],
        &["wasi:http/incoming-handler"],
    );
    let port = free_port();
    let http_grant = format!("wasi:http/incoming-handler address=127.0.0.1:{port}");
    // Without a key-value assignment, Spin's `open` answers access-denied inside the guest.
    let (bare, started, reason) = lat.start("spin-counter", &[&http_grant]);
    assert!(started, "{reason}");
    let (status, body) = wait_for("the instance behind the listener", T, || async {
        let got = try_http(port, "GET", "/", "").await.ok()?;
        (got.0 != 503).then_some(got)
    })
    .await;
    assert_eq!(
        (status, body.as_str()),
        (500, "open: Error::AccessDenied\n")
    );
    let (code, _, err) = lat.cli(&["instance", "stop", &bare, "--wait"]);
    assert_eq!(code, 0, "{err}");

    // Assigned a bucket: Spin's `default` store is that bucket, and it counts there.
    let (_, started, reason) = lat.start(
        "spin-counter",
        &["wasi:keyvalue bucket=spin-counts", &http_grant],
    );
    assert!(started, "{reason}");
    let (status, body) = wait_for("the first count", T, || async {
        let got = try_http(port, "GET", "/", "").await.ok()?;
        (got.0 == 200).then_some(got)
    })
    .await;
    assert_eq!((status, body.as_str()), (200, "spin count 1 keys 1\n"));
    assert_eq!(
        http(port, "GET", "/", "").await,
        (200, "spin count 2 keys 1\n".to_owned())
    );
    // The bucket named by its own name is the same store; any other is refused.
    assert_eq!(
        http(port, "GET", "/spin-counts", "").await,
        (200, "spin count 3 keys 1\n".to_owned())
    );
    assert_eq!(
        http(port, "GET", "/elsewhere", "").await,
        (500, "open: Error::AccessDenied\n".to_owned())
    );
}

#[tokio::test]
async fn a_component_built_with_wasmclouds_sdk_counts_with_atomics_and_link_names_unchanged() {
    // `wasmcloud_counter` is written with wasmcloud-component 0.2 from crates.io: it imports
    // `wasi:keyvalue/store` and `atomics` @0.2.0-draft as that SDK binds them, and chooses its
    // link name with `wasmcloud:bus/lattice`.
    let lat = Lab::up(&["kv", "http-server"]).await;
    lat.push(
        "wasmcloud_counter",
        &[
            "wasi:keyvalue/store",
            "wasi:keyvalue/atomics",
            "wasmcloud:bus/lattice",
            "wasi:http/types",
        ],
        &["wasi:http/incoming-handler"],
    );
    let port = free_port();
    let http_grant = format!("wasi:http/incoming-handler address=127.0.0.1:{port}");
    let (_, started, reason) = lat.start(
        "wasmcloud-counter",
        &["wasi:keyvalue bucket=wasmcloud-counts", &http_grant],
    );
    assert!(started, "{reason}");
    let (status, body) = wait_for("the first count", T, || async {
        let got = try_http(port, "GET", "/", "").await.ok()?;
        (got.0 == 200).then_some(got)
    })
    .await;
    assert_eq!((status, body.as_str()), (200, "wasmcloud count 1\n"));
    assert_eq!(
        http(port, "GET", "/", "").await,
        (200, "wasmcloud count 2\n".to_owned())
    );
    // `wasmcloud:bus/lattice`: the link name `default` is the assignment; another is an error
    // the guest handles.
    let (status, body) = http(port, "GET", "/cache", "").await;
    assert_eq!(status, 500, "{body}");
    assert!(
        body.starts_with(
            "link: no link named \"cache\" for wasi:keyvalue/store, wasi:keyvalue/atomics"
        ),
        "{body}"
    );
    assert_eq!(
        http(port, "GET", "/default", "").await,
        (200, "wasmcloud count 3\n".to_owned())
    );
}

#[tokio::test]
async fn an_embedded_kv_provider_serves_its_hosts_instances_without_nats_and_checks_them() {
    let lat = Lab::up(&[]).await;
    lat.push("kv_probe", KV_IMPORTS, &["wasi:keyvalue"]);
    let start_embedded = || {
        let (code, out, err) = lat.cli(&[
            "provider",
            "start",
            "kv",
            "--embedded",
            "--wait",
            "-o",
            "json",
        ]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str::<Value>(&out).unwrap()["provider_id"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let provider_id = start_embedded();
    // It runs inside the host: the provider list says so, and no provider process exists.
    let (code, out, err) = lat.cli(&["provider", "ls", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    let record = listed["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["provider_id"] == provider_id.as_str())
        .unwrap_or_else(|| panic!("{provider_id} not listed: {listed}"));
    assert_eq!(record["embedded"], true, "{record}");
    assert_eq!(record["host_id"], "h1", "{record}");
    let processes = std::process::Command::new("pgrep")
        .args(["-f", "--", &format!("--provider-id {provider_id}")])
        .output()
        .unwrap();
    assert!(
        processes.stdout.is_empty(),
        "an embedded provider has a process: {}",
        String::from_utf8_lossy(&processes.stdout)
    );
    // A host cannot embed a provider it does not link.
    let (code, _, err) = lat.cli(&["provider", "start", "messaging", "--embedded", "--wait"]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot embed"), "{err}");

    let (a, started, reason) = lat.start("kv-probe", &["wasi:keyvalue bucket=embedded-a"]);
    assert!(started, "{reason}");
    let (b, started, reason) = lat.start("kv-probe", &["wasi:keyvalue bucket=embedded-b"]);
    assert!(started, "{reason}");

    // The host's calls reach it without crossing NATS: a plain subscriber on the provider's RPC
    // subject (which would receive a copy of every call sent there) sees none of them.
    let client = lat.nats.client().await;
    let rpc_subject = trellis_schemas::dataplane::provider_rpc(
        &lat.l,
        &trellis_schemas::ProviderName::new("kv").unwrap(),
        trellis_schemas::Capability::KeyValue,
    );
    let mut observer = client.subscribe(rpc_subject.clone()).await.unwrap();
    client.flush().await.unwrap();
    assert_eq!(
        lat.call(&a, "increment", json!(["", "n", 2])).await,
        json!({"ok": 2})
    );
    assert_eq!(
        lat.call(&a, "set", json!(["embedded-a", "greeting", "hello"]))
            .await,
        json!({"ok": null})
    );
    assert_eq!(
        lat.call(&a, "get", json!(["", "greeting"])).await,
        json!({"ok": "hello"})
    );
    // The provider's own checks run in process too: B is refused A's bucket.
    assert_eq!(
        lat.call(&b, "get", json!(["embedded-a", "greeting"])).await,
        json!({"err": "access-denied"})
    );
    assert_eq!(
        lat.call(&b, "get", json!(["", "greeting"])).await,
        json!({"ok": null})
    );
    let crossed = tokio::time::timeout(Duration::from_millis(300), observer.next()).await;
    assert!(
        crossed.is_err(),
        "a call crossed NATS: {:?}",
        crossed.ok().flatten().map(|m| m.subject)
    );

    // The embedded provider still serves the lattice over NATS (for other hosts), with its
    // checks: A's identity is answered, an unknown instance's is refused.
    let ask = |instance: &str| {
        let (client, l) = (client.clone(), lat.l.clone());
        let identity = trellis_tests::caller(instance, "kv-probe");
        async move {
            let request = CapabilityRequest::KeyValue(KvRequest::Get {
                bucket: String::new(),
                key: "greeting".into(),
            });
            match trellis_tests::provider_call(&client, &l, "kv", &identity, &request).await {
                Ok(_) => (Some("ok".to_owned()), None),
                Err(e) => (Some("error".to_owned()), Some(e.code.as_str().to_owned())),
            }
        }
    };
    assert_eq!(ask(&a).await, (Some("ok".to_owned()), None));
    assert_eq!(
        ask("nobody-1").await,
        (Some("error".to_owned()), Some("access_denied".to_owned()))
    );

    // Stopped, it takes no calls: the guest gets an error (no provider of that name runs
    // anywhere), the host and the instance carry on.
    let (code, _, err) = lat.cli(&["provider", "stop", &provider_id, "--wait"]);
    assert_eq!(code, 0, "{err}");
    let failed = lat.call(&a, "get", json!(["", "greeting"])).await;
    let message = failed["err"].as_str().unwrap_or_default();
    assert!(message.contains("kv"), "{failed}");
    // Started again, the data is where it was: it lives in JetStream, not in the provider.
    start_embedded();
    assert_eq!(
        lat.call(&a, "increment", json!(["", "n", 1])).await,
        json!({"ok": 3})
    );
    let facts = lat.nats.facts(&lat.l).await;
    assert!(
        !facts
            .iter()
            .any(|f| f.event.kind() == FactKind::InstanceCrashed)
    );
}
