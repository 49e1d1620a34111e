//! The `trellis` CLI: `trellis up`, tables and JSON, exit codes.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use trellis_schemas::control::HostListRequest;
use trellis_tests::{Nats, bin, lattice, wait_for};

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn trellis_up_starts_a_lattice_and_stops_it_cleanly_on_ctrl_c() {
    // Deploy a real component with `trellis up`, as scripts/up does with examples/hello.
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("Component.toml");
    std::fs::write(
        &manifest,
        "[component]\nname = \"counter\"\nversion = \"2.0.0\"\n[limits]\nmax_memory = \"8MiB\"\nfuel = 1000000\ntimeout = \"1s\"\nmax_concurrency = 4\n",
    )
    .unwrap();
    let wasm = trellis_tests::components::build().path("counter");
    let ui = format!("127.0.0.1:{}", trellis_tests::free_port());
    let mut up = Command::new(bin("trellis"))
        .args([
            "up",
            "--host-id",
            "up-host",
            "--host-label",
            "zone=local",
            "--ui",
            &ui,
            "--deploy",
        ])
        .arg(&wasm)
        .arg("--deploy-manifest")
        .arg(&manifest)
        .args(["--call", "increment"])
        .env_remove("TRELLIS_NATS_URL")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = up.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut printed = Vec::new();
    let url = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("trellis up prints its URL");
        printed.push(line.clone());
        if let Some(url) = line.strip_prefix("TRELLIS_NATS_URL=") {
            break url.to_owned();
        }
    };
    let banner = printed.join("\n");
    assert!(
        banner.contains("up-host"),
        "the banner lists the host:\n{banner}"
    );
    assert!(banner.contains("Try:"), "{banner}");
    assert!(banner.contains("component   counter@2.0.0"), "{banner}");
    assert!(
        banner.contains("counter.increment → 1"),
        "the deployed component answered:\n{banner}"
    );

    // The lattice works: the CLI and a plain client see the host.
    let out = Command::new(bin("trellis"))
        .args(["--nats", &url, "host", "ls", "--output", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let hosts: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(hosts["hosts"][0]["host_id"], "up-host");
    assert_eq!(hosts["hosts"][0]["labels"]["zone"], "local");

    // The dashboard it announces shows the host and the deployed component.
    assert!(
        banner.contains(&format!("dashboard   http://{ui}/")),
        "{banner}"
    );
    let snapshot = wait_for("the dashboard's snapshot", T, || async {
        let reply = trellis_tests::http_request("GET", &format!("http://{ui}/api/snapshot"), "")
            .await
            .ok()?;
        let snapshot: serde_json::Value = serde_json::from_str(&reply.body).ok()?;
        (snapshot["components"][0]["instances"][0]["status"] == "running").then_some(snapshot)
    })
    .await;
    assert_eq!(snapshot["hosts"][0]["host_id"], "up-host");
    assert_eq!(snapshot["components"][0]["name"], "counter");

    kill(Pid::from_raw(up.id() as i32), Signal::SIGINT).unwrap();
    let status = wait_for("trellis up to exit", T, || {
        let status = up.try_wait().unwrap();
        async move { status }
    })
    .await;
    assert!(
        status.success(),
        "trellis up exits 0 after Ctrl-C, got {status}"
    );
    let rest = trellis_tests::remaining_lines(&rx, T);
    let rest = rest.join("\n");
    assert!(rest.contains("host") && rest.contains("stopped"), "{rest}");
    // Everything it started is gone, NATS included.
    let port: u16 = url.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn cli_prints_tables_and_json_and_exits_with_meaningful_codes() {
    let nats = Nats::start().await;
    let l = lattice("default");

    // No controller yet: the lattice cannot be reached.
    let (code, _, err) = nats.cli(&["host", "ls"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("no controller"), "{err}");
    // A setting given twice with two values is a usage error, told before the lattice is asked.
    for args in [
        &[
            "assignment",
            "grant",
            "component:c",
            "wasi:keyvalue bucket=x",
            "--config",
            "bucket=y",
        ][..],
        &[
            "provider", "start", "kv", "--config", "a=1", "--config", "a=2",
        ],
        &[
            "instance", "start", "c", "--label", "zone=a", "--label", "zone=b",
        ],
    ] {
        let (code, _, err) = nats.cli(args);
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("is given twice, as `"), "{args:?}: {err}");
    }

    let _controller = nats.controller(&l, "c", "30s");
    let _host = nats.host(&l, "h1", &["zone=a"]);
    let ctl = nats.ctl(&l).await;
    wait_for("h1 listed", T, || async {
        let reply = ctl.request(&HostListRequest::default()).await.ok()?;
        (!reply.hosts.is_empty()).then_some(())
    })
    .await;

    let (code, out, _) = nats.cli(&["host", "ls"]);
    assert_eq!(code, 0);
    let mut lines = out.lines();
    assert!(lines.next().unwrap().starts_with("HOST"), "{out}");
    let row = lines.next().unwrap();
    assert!(
        row.starts_with("h1") && row.contains(" up ") && row.contains("zone=a"),
        "{out}"
    );

    let (code, out, _) = nats.cli(&["host", "get", "h1", "-o", "json"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["host"]["status"], "up");

    let (code, _, err) = nats.cli(&["host", "get", "ghost"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("not_found"), "{err}");

    let (code, _, err) = nats.cli(&["host", "get", "bad.id"]);
    assert_eq!(code, 2, "usage errors exit 2: {err}");

    let (code, out, _) = nats.cli(&["status", "-o", "json"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["hosts"]["up"], 1);
    assert_eq!(json["controller"]["id"], "c");
    assert_eq!(json["instances"], serde_json::json!({}));
    assert_eq!(json["failures_last_hour"], 0);
    let (code, out, _) = nats.cli(&["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("failures     none in the last hour"), "{out}");
    assert!(out.contains("rollouts     none in progress"), "{out}");

    // A start that fails shows on the status screen, with its reason.
    let (code, out, err) = nats.cli(&["instance", "start", "file:///no/such/app.wasm", "--wait"]);
    assert_ne!(code, 0, "{out}{err}");
    // Off a terminal, progress is plain lines on stderr: each outcome as it comes.
    assert!(
        err.lines().any(|l| l.starts_with("instance ")
            && l.contains(" failed on h1: ")
            && l.ends_with("(1 of 1)")),
        "{err}"
    );
    assert!(
        !err.contains('\r'),
        "nothing redrawn off a terminal: {err:?}"
    );
    let (code, out, _) = nats.cli(&["status", "-o", "json"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["instances"]["failed"], 1, "{json}");
    assert_eq!(json["failures_last_hour"], 1, "{json}");
    assert_eq!(json["failures"][0]["status"], "failed", "{json}");
    assert_eq!(json["stream"]["lag"], 0, "{json}");
    let (code, out, _) = nats.cli(&["status"]);
    assert_eq!(code, 0);
    assert!(out.contains("instances    1 failed"), "{out}");
    assert!(out.contains("failures     1 in the last hour"), "{out}");
    assert!(
        out.contains("/no/such/app.wasm"),
        "the failure and its reason: {out}"
    );
    assert!(out.contains("up to date"), "{out}");

    // A large upload says so (the store takes any bytes; hosts check the code when they load it).
    let dir = tempfile::tempdir().unwrap();
    let big = dir.path().join("big.wasm");
    std::fs::write(&big, vec![0u8; 3 << 20]).unwrap();
    std::fs::write(
        dir.path().join("Component.toml"),
        "[component]\nname = \"big\"\nversion = \"1.0.0\"\n[limits]\nmax_memory = \"16MiB\"\nfuel = 1000000\ntimeout = \"1s\"\nmax_concurrency = 1\n",
    )
    .unwrap();
    let (code, out, err) = nats.cli(&["component", "push", &big.to_string_lossy()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("uploading big.wasm (3.0 MiB)"), "{err}");

    let (code, out, _) = nats.cli(&["events", "--type", "host.started", "-o", "json"]);
    assert_eq!(code, 0);
    let events: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.len(), 1, "{out}");
    assert_eq!(events[0]["event"]["type"], "dev.trellis.host.started.v1");
    assert_eq!(events[0]["seq"], 1);

    let (code, out, _) = nats.cli(&["events"]);
    assert_eq!(code, 0);
    assert!(out.contains("host.started") && out.contains("h1"), "{out}");

    let (code, _, err) = nats.cli(&["events", "--type", "host.exploded"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn shipped_nats_configuration_is_valid() {
    let conf = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../nats/nats-server.conf");
    let server = std::env::var_os("TRELLIS_NATS_SERVER").unwrap_or_else(|| "nats-server".into());
    let out = Command::new(server)
        .arg("-c")
        .arg(&conf)
        .arg("-t")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn component_init_writes_a_manifest_the_lattice_accepts() {
    let nats = Nats::start().await;
    let l = lattice("init");
    let _controller = nats.controller(&l, "c", "10s");
    let _host = nats.host(&l, "h1", &[]);
    let dir = tempfile::tempdir().unwrap();
    let (built, _) = trellis_tests::components::example("kv_counter");
    let wasm = dir.path().join("kv_counter.wasm");
    std::fs::copy(&built, &wasm).unwrap();
    let wasm = wasm.to_str().unwrap();

    let out = nats.cli_ok(&l, &["component", "init", wasm]);
    assert!(out.contains("Component.toml"), "{out}");
    let text = std::fs::read_to_string(dir.path().join("Component.toml")).unwrap();
    for needed in [
        "name = \"kv-counter\"",
        "\"wasi:keyvalue/atomics\"",
        "\"wasi:http/types\"",
        "\"wasi:logging/logging\"",
        "requires = [\"wasi:http/incoming-handler\", \"wasi:keyvalue\"]",
    ] {
        assert!(text.contains(needed), "{needed} missing from:\n{text}");
    }
    // It does not overwrite without --force, and the lattice takes what it wrote.
    let (code, _, err) = nats.cli(&["--lattice", l.as_str(), "component", "init", wasm]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("--force"), "{err}");
    // The controller may still be replaying on a loaded machine.
    nats.wait_for_a_host(&l).await;
    nats.cli_ok(&l, &["component", "push", wasm]);
    let listed = nats.cli_ok(&l, &["component", "ls"]);
    assert!(listed.contains("kv-counter"), "{listed}");
    // Starting it says which grant is missing, as for any component that requires one.
    let (code, out, err) = nats.cli(&[
        "--lattice",
        l.as_str(),
        "instance",
        "start",
        "kv-counter",
        "--wait",
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("capability not assigned"), "{out}{err}");
}
