//! Component logs: `trellis logs` shows what instances write (stdout, stderr, `wasi:logging`)
//! with instance, invocation and trace ids, follows new lines live, keeps the lines of an
//! instance that ended, and a guest that prints in a loop is held to the host's rate.

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use async_nats::HeaderMap;
use serde_json::Value;
use trellis_schemas::ComponentName;
use trellis_schemas::dataplane::{self, Op, headers};
use trellis_tests::{Nats, bin, components, free_port, lattice};

/// `kv_probe` as a component that only logs: its key-value imports are allowed, none required.
const CHATTY: &str = r#"
[component]
name = "chatty"
version = "0.1.0"

[limits]
max_memory = "16MiB"
fuel = 1_000_000_000
timeout = "10s"
max_concurrency = 4

[capabilities]
imports = ["wasi:keyvalue/store", "wasi:keyvalue/atomics", "wasi:keyvalue/batch", "wasi:logging/logging"]
"#;

/// `huge_output`: prints as many 1 KiB lines as asked, to stdout and to stderr.
const NOISY: &str = r#"
[component]
name = "noisy"
version = "0.2.0"

[limits]
max_memory = "64MiB"
fuel = 10_000_000_000
timeout = "20s"
max_concurrency = 4
"#;

/// A `trellis logs … -f -o json` process whose lines arrive on a channel.
struct Follower {
    child: std::process::Child,
    lines: mpsc::Receiver<Value>,
}

impl Follower {
    fn start(nats: &Nats, lattice: &str, target: &str) -> Self {
        let mut child = Command::new(bin("trellis"))
            .args([
                "--nats",
                &nats.connect_url(),
                "--lattice",
                lattice,
                "logs",
                target,
                "--follow",
                "-o",
                "json",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("trellis logs starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("not a JSON record: {line:?}: {e}"));
                if tx.send(value).is_err() {
                    return;
                }
            }
        });
        Self { child, lines }
    }

    /// The next record, within `timeout`.
    fn next(&self, timeout: Duration) -> Option<Value> {
        self.lines.recv_timeout(timeout).ok()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn logs_show_follow_and_keep_instance_output_within_a_rate() {
    let nats = Nats::start().await;
    let l = lattice("logs");
    let metrics = format!("127.0.0.1:{}", free_port());
    let _controller = nats.controller(&l, "c1", "10s");
    let _host = nats.host_with(&l, "h1", &[], &["--log-rate", "50", "--metrics", &metrics]);
    nats.wait_for_a_host(&l).await;
    let cli = |args: &[&str]| nats.cli_ok(&l, args);
    let dir = tempfile::tempdir().unwrap();
    let mut started = Vec::new();
    for (guest, name, manifest) in [
        ("kv_probe", "chatty", CHATTY),
        ("huge_output", "noisy", NOISY),
    ] {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, manifest).unwrap();
        let wasm = components::build().path(guest);
        nats.push(&l, &wasm, &path);
        let out = cli(&["instance", "start", name, "--wait", "-o", "json"]);
        let reply: Value = serde_json::from_str(&out).unwrap();
        started.push(
            reply["instances"][0]["instance_id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let chatty_id = started[0].clone();

    // A follower started before any line: the first line reaches it exactly once, whether it
    // came with the recent lines or live.
    let follower = Follower::start(&nats, l.as_str(), "chatty");
    cli(&["call", "chatty", "log", "\"warn\"", "\"first line\""]);
    let first = follower
        .next(Duration::from_secs(20))
        .expect("the follower shows the first line");
    assert_eq!(first["message"], "first line");
    assert_eq!(first["source"], "log");
    assert_eq!(first["level"], "warn");
    assert_eq!(first["context"], "kv-probe");
    assert_eq!(first["component"], "chatty");
    assert_eq!(first["version"], "0.1.0");
    assert_eq!(first["instance_id"], chatty_id.as_str());
    assert_eq!(first["host_id"], "h1");
    assert_eq!(first["invocation"], 1);

    // A call that carries W3C trace context: its lines carry the trace id, and come live.
    let client = nats.client().await;
    let mut headers = HeaderMap::new();
    headers.insert(headers::EXPORT, "log");
    headers.insert(
        headers::TRACEPARENT,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    );
    let subject = dataplane::component(&l, &ComponentName::new("chatty").unwrap(), Op::Call);
    client
        .request_with_headers(subject, headers, r#"["info", "traced"]"#.into())
        .await
        .unwrap();
    let traced = follower
        .next(Duration::from_secs(10))
        .expect("the follower shows a new line live");
    assert_eq!(traced["message"], "traced");
    assert_eq!(traced["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(traced["invocation"], 2);
    assert_eq!(traced["seq"], 2);
    assert!(
        follower.next(Duration::from_millis(500)).is_none(),
        "no line is shown twice"
    );

    // A guest printing 2 × 400 lines of 1 KiB in one invocation, on a host allowing 50 lines a
    // second per instance: about 50 are published (the burst, and what refills while it runs),
    // the rest dropped, counted and reported.
    let calling = std::time::Instant::now();
    cli(&["call", "noisy", "run", "\"400\""]);
    let refilled = (50.0 * calling.elapsed().as_secs_f64()).ceil() as usize;
    let out = cli(&["logs", "noisy", "--tail", "1000", "-o", "json"]);
    let records: Vec<Value> = out
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    let printed = records
        .iter()
        .filter(|r| r["source"] == "stdout" || r["source"] == "stderr")
        .count();
    assert!(
        (50..=50 + refilled + 1).contains(&printed),
        "{printed} lines published of 800 at 50 lines per second ({refilled} refilled)"
    );
    assert!(records.iter().any(|r| r["source"] == "stderr"));
    let x = "x".repeat(1023);
    assert!(
        records
            .iter()
            .filter(|r| r["source"] == "stdout")
            .all(|r| r["message"] == x.as_str())
    );
    let dropped: Vec<&Value> = records
        .iter()
        .filter(|r| r["source"] == "dropped")
        .collect();
    let dropped_total: u64 = dropped.iter().map(|r| r["dropped"].as_u64().unwrap()).sum();
    assert_eq!(
        dropped_total as usize + printed,
        800,
        "every line published or counted"
    );
    let text = http_get(&format!("http://{metrics}/metrics")).await;
    let metric = |outcome: &str| {
        text.lines()
            .find(|line| {
                line.starts_with("trellis_log_lines_total{")
                    && line.contains("component=\"noisy\"")
                    && line.contains(&format!("outcome=\"{outcome}\""))
            })
            .and_then(|line| line.rsplit(' ').next()?.parse::<u64>().ok())
    };
    assert_eq!(metric("dropped"), Some(dropped_total), "{text}");
    assert_eq!(metric("published"), Some(printed as u64), "{text}");

    // The flood ended only its own lines: the other instance still logs, and is followed.
    cli(&["call", "chatty", "log", "\"error\"", "\"after the flood\""]);
    let after = follower
        .next(Duration::from_secs(10))
        .expect("still followed");
    assert_eq!(after["message"], "after the flood");
    drop(follower);

    // The table for people, with --since.
    let table = cli(&["logs", "chatty", "--since", "5m"]);
    assert!(table.contains("warn     kv-probe: first line"), "{table}");
    assert!(table.contains("[trace 4bf92f35]"), "{table}");

    // An instance that ended: its lines are still there.
    cli(&["instance", "stop", &chatty_id, "--wait"]);
    let out = cli(&["logs", &chatty_id, "-o", "json"]);
    let messages: Vec<String> = out
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["message"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(messages, ["first line", "traced", "after the flood"]);

    // Unknown targets and bad limits are refused with clear errors.
    let (code, _, err) = nats.cli(&["--lattice", l.as_str(), "logs", "nobody"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("no instance or component \"nobody\""), "{err}");
    let (code, _, err) = nats.cli(&["--lattice", l.as_str(), "logs", "noisy", "--tail", "20000"]);
    assert_ne!(code, 0);
    assert!(err.contains("limit must be 1 to 10000"), "{err}");
}

/// The body of a GET, with a plain HTTP client.
async fn http_get(url: &str) -> String {
    let reply = trellis_tests::http_request("GET", url, "")
        .await
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    reply.body
}
