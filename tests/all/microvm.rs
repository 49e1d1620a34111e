//! Micro-VM instances: the same guests, run inside a QEMU `microvm` of their own (under TCG on
//! these machines: slow to boot, but real), reached by `trellis call` and HTTP exactly as
//! in-process instances, with the same crash reasons, the same capability checks, and the VM's
//! own failures (`vm_exit`) under the restart policy. Kept few: each VM boots a kernel.

use std::time::Duration;

use serde_json::Value;
use trellis_schemas::{FactData, Lattice};
use trellis_tests::{Nats, Proc, components, free_port, http_request, microvm, wait_for};

const T: Duration = Duration::from_secs(180);

fn manifest(name: &str, limits: &str, extra: &str) -> String {
    format!(
        "[component]\nname = \"{name}\"\nversion = \"0.1.0\"\n[limits]\n{limits}\nmax_concurrency = 4\n{extra}"
    )
}

/// Pushes test guest `guest` as component `name` with `limits`.
fn push(nats: &Nats, l: &Lattice, dir: &std::path::Path, guest: &str, name: &str, limits: &str) {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, manifest(name, limits, "")).unwrap();
    nats.push(l, &components::build().path(guest), &path);
}

/// `trellis call <component> run <input>`: exit code and what it printed.
fn call_run(nats: &Nats, l: &Lattice, component: &str, input: &str) -> (i32, String) {
    let arg = serde_json::to_string(input).unwrap();
    let (code, out, err) = nats.cli(&["--lattice", l.as_str(), "call", component, "run", &arg]);
    (code, format!("{out}{err}"))
}

fn instance(nats: &Nats, l: &Lattice, id: &str) -> Value {
    serde_json::from_str(&nats.cli_ok(l, &["instance", "get", id, "-o", "json"])).unwrap()
}

/// A nats-server, a controller and a host `vm-host` that runs micro-VMs (with `extra` options)
/// in lattice `name`. The caller starts what else it needs, then waits for a host.
fn vm_lattice(nats: &Nats, name: &str, extra: &[&str]) -> (Lattice, Vec<Proc>) {
    let l = Lattice::new(name).unwrap();
    let controller = nats.controller(&l, "c", "30s");
    let mut args = microvm::image().host_args();
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let host = nats.host_with(&l, "vm-host", &[], &args);
    (l, vec![controller, host])
}

#[tokio::test]
async fn microvm_instances_answer_like_any_other_and_their_crashes_stay_their_own() {
    let nats = Nats::start().await;
    let (l, _procs) = vm_lattice(&nats, "microvm", &[]);
    let _h2 = nats.host(&l, "plain-host", &[]);
    nats.wait_for_hosts(&l, 2).await;
    let dir = tempfile::tempdir().unwrap();
    push(
        &nats,
        &l,
        dir.path(),
        "probe",
        "probe",
        "max_memory = \"16MiB\"\nfuel = 100_000_000\ntimeout = \"5s\"",
    );
    push(
        &nats,
        &l,
        dir.path(),
        "loop",
        "spin",
        "max_memory = \"16MiB\"\nfuel = 5_000_000_000\ntimeout = \"1s\"",
    );
    push(
        &nats,
        &l,
        dir.path(),
        "membomb",
        "bomb",
        "max_memory = \"16MiB\"\nfuel = 5_000_000_000\ntimeout = \"10s\"",
    );

    // Hosts say whether they run micro-VMs; the scheduler places microvm instances only there
    // and says why it cannot elsewhere.
    let hosts: Value =
        serde_json::from_str(&nats.cli_ok(&l, &["host", "ls", "-o", "json"])).unwrap();
    let microvm_of = |id: &str| {
        hosts["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["host_id"] == id)
            .map(|h| h["capacity"]["microvm"].clone())
    };
    assert_eq!(microvm_of("vm-host"), Some(Value::from("tcg")), "{hosts}");
    assert_eq!(microvm_of("plain-host"), Some(Value::Null), "{hosts}");
    let (code, out, err) = nats.cli(&[
        "--lattice",
        l.as_str(),
        "instance",
        "start",
        "probe",
        "--isolation",
        "microvm",
        "--host",
        "plain-host",
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("no_host_available") && err.contains("micro-VM"),
        "{err}"
    );

    // The adversarial guest finds nothing of the VM either: no files, sockets or environment.
    let probe = nats.start_instance(
        &l,
        "probe",
        &["--isolation", "microvm", "--restart", "always"],
    );
    let got = instance(&nats, &l, &probe);
    assert_eq!(got["instance"]["host_id"], "vm-host", "{got}");
    assert_eq!(got["instance"]["isolation"], "microvm", "{got}");
    assert_eq!(got["instance"]["acceleration"], "tcg", "{got}");
    let in_process = nats.start_instance(&l, "probe", &["--host", "plain-host"]);
    let (code, answer) = call_run(&nats, &l, "probe", "");
    assert_eq!(code, 0, "{answer}");
    let answer: String = serde_json::from_str(answer.trim()).unwrap();
    for line in [
        "env=0",
        "args=0",
        "read_root=denied",
        "read_file=denied",
        "write_file=denied",
        "tcp_connect=denied",
        "udp_bind=denied",
    ] {
        assert!(answer.contains(line), "{line} not in {answer}");
    }
    nats.cli_ok(&l, &["instance", "stop", &in_process, "--wait"]);

    // A guest that loops or bombs memory ends only its own invocation, with the same reason as
    // in process; the VM and the other instances serve on.
    let spin = nats.start_instance(
        &l,
        "spin",
        &["--isolation", "microvm", "--restart", "always"],
    );
    let bomb = nats.start_instance(
        &l,
        "bomb",
        &["--isolation", "microvm", "--restart", "always"],
    );
    let (code, out) = call_run(&nats, &l, "spin", "x");
    assert_ne!(code, 0);
    assert!(out.contains("timeout"), "{out}");
    let (code, out) = call_run(&nats, &l, "bomb", "");
    assert_ne!(code, 0);
    assert!(out.contains("memory_limit"), "{out}");
    let (code, out) = call_run(&nats, &l, "bomb", "2");
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("allocated 2097152 bytes"), "{out}");
    for (id, reason) in [(&spin, "timeout"), (&bomb, "memory_limit")] {
        let got = instance(&nats, &l, id);
        assert!(got.to_string().contains(reason), "{got}");
    }

    // A VM that dies is a crash of its instance (`vm_exit`); the restart policy boots another.
    let killed = std::process::Command::new("pkill")
        .args(["-KILL", "-f", &format!("trellis-vm-{probe}")])
        .status()
        .unwrap();
    assert!(killed.success(), "no QEMU process named trellis-vm-{probe}");
    wait_for("instance.crashed with vm_exit", T, || async {
        nats.facts(&l)
            .await
            .iter()
            .any(|f| {
                matches!(&f.event.data, FactData::InstanceCrashed(d)
                    if d.instance_id.as_str() == probe && d.reason == "vm_exit" && d.will_restart)
            })
            .then_some(())
    })
    .await;
    wait_for("the probe to answer again", T, || async {
        let (code, out) = call_run(&nats, &l, "probe", "");
        (code == 0 && out.contains("env=0")).then_some(())
    })
    .await;

    // A VM that hangs (its QEMU stopped) is killed once a call waits past its timeout plus the
    // margin (`vm_timeout`), and replaced.
    let stopped = std::process::Command::new("pkill")
        .args(["-STOP", "-f", &format!("trellis-vm-{bomb}")])
        .status()
        .unwrap();
    assert!(stopped.success(), "no QEMU process named trellis-vm-{bomb}");
    let (code, out, err) = nats.cli(&[
        "--lattice",
        l.as_str(),
        "call",
        "bomb",
        "run",
        "\"1\"",
        "--timeout",
        "60s",
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("vm_timeout") || err.contains("timeout"),
        "{err}"
    );
    wait_for("instance.crashed with vm_timeout", T, || async {
        nats.facts(&l)
            .await
            .iter()
            .any(|f| {
                matches!(&f.event.data, FactData::InstanceCrashed(d)
                    if d.instance_id.as_str() == bomb && d.reason == "vm_timeout")
            })
            .then_some(())
    })
    .await;
    wait_for("the bomb to answer again", T, || async {
        let (code, out) = call_run(&nats, &l, "bomb", "1");
        (code == 0 && out.contains("allocated 1048576 bytes")).then_some(())
    })
    .await;
}

#[tokio::test]
async fn key_value_and_http_reach_a_microvm_instance_through_the_same_bridge() {
    let (wasm, manifest) = components::example("kv_counter");
    let nats = Nats::start().await;
    let (l, _procs) = vm_lattice(&nats, "microvm-kv", &[]);
    let _kv = nats.provider(&l, "kv", &[]);
    let _http = nats.provider(&l, "http-server", &[]);
    nats.wait_for_a_host(&l).await;
    nats.push(&l, &wasm, &manifest);
    let port = free_port();
    let http = format!("wasi:http/incoming-handler address=127.0.0.1:{port}");
    nats.start_instance(
        &l,
        "kv-counter",
        &[
            "--isolation",
            "microvm",
            "--grant",
            "wasi:keyvalue bucket=vm-counts",
            "--grant",
            &http,
        ],
    );
    let get = |path: &'static str| async move {
        wait_for(&format!("GET {path}"), T, || async {
            let reply = http_request("GET", &format!("http://127.0.0.1:{port}{path}"), "")
                .await
                .ok()?;
            (reply.status == 200).then_some(reply.body)
        })
        .await
    };
    assert_eq!(get("/visits").await, "count: 1\n");
    assert_eq!(get("/visits").await, "count: 2\n");
    assert_eq!(get("/other").await, "count: 1\n");
    // Its `wasi:logging` lines leave the VM with its invocations and reach `trellis logs`.
    wait_for("the guest's log lines", T, || async {
        let out = nats.cli_ok(&l, &["logs", "kv-counter"]);
        (out.contains("/visits") && out.contains("/other")).then_some(())
    })
    .await;
}

const FRONT: &str = r#"
[component]
name = "front"
version = "0.1.0"
[limits]
max_memory = "16MiB"
fuel = 1_000_000_000
timeout = "10s"
max_concurrency = 16
[capabilities]
imports = ["example:pipeline/transform"]
requires = ["example:pipeline/transform"]
"#;

const STAGE: &str = r#"
[component]
name = "stage"
version = "1.2.0"
[limits]
max_memory = "16MiB"
fuel = 50_000_000
timeout = "10s"
max_concurrency = 16
"#;

#[tokio::test]
async fn linked_calls_leave_and_enter_micro_vms_through_the_host() {
    let nats = Nats::start().await;
    let (l, _procs) = vm_lattice(&nats, "microvm-links", &[]);
    nats.wait_for_a_host(&l).await;
    let dir = tempfile::tempdir().unwrap();
    for (guest, text) in [("pipe_front", FRONT), ("pipe_stage", STAGE)] {
        let path = dir.path().join(format!("{guest}.toml"));
        std::fs::write(&path, text).unwrap();
        nats.push(&l, &components::build().path(guest), &path);
    }
    nats.cli_ok(
        &l,
        &[
            "link",
            "add",
            "component:front",
            "example:pipeline/transform",
            "stage",
        ],
    );
    // The caller in a micro-VM, the target in the host's process: the call leaves the VM
    // through the channel into the host's link routing.
    let front = nats.start_instance(&l, "front", &["--isolation", "microvm"]);
    let stage = nats.start_instance(&l, "stage", &[]);
    let (code, out) = call_run(&nats, &l, "front", "hello");
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.trim(), "\"front: got 5 bytes | rust: HELLO\"");
    // The target's own error reaches the caller in the VM as its function's error.
    let (code, out) = call_run(&nats, &l, "front", "");
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.trim(), "\"error: empty input\"");

    // The caller in process, the target in a micro-VM: handed over to the VM's instance.
    nats.cli_ok(&l, &["instance", "stop", &front, "--wait"]);
    nats.cli_ok(&l, &["instance", "stop", &stage, "--wait"]);
    nats.start_instance(&l, "stage", &["--isolation", "microvm"]);
    nats.start_instance(&l, "front", &[]);
    let (code, out) = call_run(&nats, &l, "front", "again");
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.trim(), "\"front: got 5 bytes | rust: AGAIN\"");
}

#[tokio::test]
async fn a_rollout_to_a_microvm_version_is_refused_where_hosts_run_no_micro_vms() {
    // No VM boots: the controller refuses before anything starts.
    let nats = Nats::start().await;
    let l = Lattice::new("vmroll").unwrap();
    let _controller = nats.controller(&l, "c", "30s");
    let _host = nats.host(&l, "plain-host", &[]);
    nats.wait_for_a_host(&l).await;
    let dir = tempfile::tempdir().unwrap();
    let limits = "max_memory = \"16MiB\"\nfuel = 100_000_000\ntimeout = \"5s\"";
    push(&nats, &l, dir.path(), "probe", "probe", limits);
    nats.cli_ok(&l, &["instance", "start", "probe", "--wait"]);
    // Version 0.2.0 (another guest) asks for micro-VMs.
    let path = dir.path().join("probe-2.toml");
    let text =
        manifest("probe", limits, "[isolation]\nmode = \"microvm\"\n").replace("0.1.0", "0.2.0");
    std::fs::write(&path, text).unwrap();
    nats.push(&l, &components::build().path("loop"), &path);
    let (code, out, err) = nats.cli(&[
        "--lattice",
        l.as_str(),
        "rollout",
        "start",
        "probe",
        "--to",
        "0.2.0",
    ]);
    assert_ne!(code, 0, "{out}");
    assert!(err.contains("invalid_request"), "{err}");
    assert!(
        err.contains("plain-host") && err.contains("--microvm-kernel"),
        "{err}"
    );
    // Nothing was started or recorded as a rollout; the instance serves on.
    let rollouts: Value =
        serde_json::from_str(&nats.cli_ok(&l, &["rollout", "ls", "-o", "json"])).unwrap();
    assert_eq!(rollouts["rollouts"], serde_json::json!([]), "{rollouts}");
    let (code, out) = call_run(&nats, &l, "probe", "still here");
    assert_eq!(code, 0, "{out}");
}

/// The value of the sample `name` (with its labels, as the exposition writes them) on the host's
/// metrics endpoint at `addr`.
async fn sample(addr: &str, name: &str) -> Option<f64> {
    let reply = http_request("GET", &format!("http://{addr}/metrics"), "")
        .await
        .ok()?;
    reply.body.lines().find_map(|line| {
        let (key, value) = line.rsplit_once(' ')?;
        (key == name).then(|| value.parse().ok())?
    })
}

#[tokio::test]
async fn a_pooled_guest_serves_the_next_start_and_the_pool_refills() {
    let nats = Nats::start().await;
    let metrics = format!("127.0.0.1:{}", free_port());
    let pool = ["--microvm-pool", "1", "--metrics", metrics.as_str()];
    let (l, _procs) = vm_lattice(&nats, "vmpool", &pool);
    nats.wait_for_a_host(&l).await;
    let dir = tempfile::tempdir().unwrap();
    push(
        &nats,
        &l,
        dir.path(),
        "probe",
        "probe",
        "max_memory = \"16MiB\"\nfuel = 100_000_000\ntimeout = \"5s\"",
    );
    let ready = "trellis_host_microvm_pool_ready";
    wait_for("a guest waiting in the pool", T, || async {
        (sample(&metrics, ready).await == Some(1.0)).then_some(())
    })
    .await;
    let pooled = r#"trellis_host_microvm_starts_total{from="pool"}"#;
    let booted = r#"trellis_host_microvm_starts_total{from="boot"}"#;
    assert_eq!(sample(&metrics, pooled).await, None, "nothing started yet");

    // The start takes the waiting guest (no boot), which serves as any micro-VM.
    let probe = nats.start_instance(&l, "probe", &["--isolation", "microvm"]);
    assert_eq!(sample(&metrics, pooled).await, Some(1.0));
    assert_eq!(sample(&metrics, booted).await, None);
    let (code, answer) = call_run(&nats, &l, "probe", "");
    assert_eq!(code, 0, "{answer}");
    assert!(answer.contains("env=0"), "{answer}");
    assert_eq!(
        instance(&nats, &l, &probe)["instance"]["isolation"],
        "microvm"
    );
    // The host boots a replacement in the background.
    wait_for("the pool refilled", T, || async {
        (sample(&metrics, ready).await == Some(1.0)).then_some(())
    })
    .await;
}
