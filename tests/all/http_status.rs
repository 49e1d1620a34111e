//! The HTTP status of every failure, through the `http-server` provider and real components:
//! in its own process (requests over NATS) and embedded in the host (requests handed to the
//! host's instances in process).

use std::io::{Read as _, Write as _};
use std::time::Duration;

use futures::StreamExt as _;
use serde_json::Value;
use trellis_schemas::ComponentName;
use trellis_schemas::dataplane::{self, Op};
use trellis_tests::bench::BenchLattice;
use trellis_tests::{components, free_port, wait_for};

const T: Duration = Duration::from_secs(30);

/// One request over a fresh connection, written by hand: the server may answer (413) before it
/// has read a large body, which an HTTP client reports as an error rather than the answer.
/// Returns (status, body).
fn http(port: u16, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(40)))
        .unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    let _ = stream.write_all(body);
    let mut response = Vec::new();
    let _ = stream.read_to_end(&mut response);
    let response = String::from_utf8_lossy(&response).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, body.to_owned())
}

async fn get(port: u16, path: &str) -> (u16, String) {
    let reply = trellis_tests::http_request("GET", &format!("http://127.0.0.1:{port}{path}"), "")
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e}"));
    (reply.status, reply.body)
}

/// Grants `http-server` on a fresh port to `target` and waits for its listener.
async fn listen(lat: &BenchLattice, target: &str) -> u16 {
    let port = free_port();
    lat.cli(&[
        "assignment",
        "grant",
        target,
        "wasi:http/incoming-handler",
        "http-server",
        "--config",
        &format!("address=127.0.0.1:{port}"),
    ]);
    wait_for("the listener", T, || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    port
}

/// Pushes `http_faults` as `faults`: one invocation at a time, a 1 s timeout, 16 MiB, and fuel
/// that `/spin` burns in a fraction of that second even on a loaded machine (so it ends as
/// `fuel_exhausted`, never as `timeout`).
fn push_faults(lat: &BenchLattice, dir: &std::path::Path) {
    let manifest = dir.join("faults.toml");
    std::fs::write(
        &manifest,
        r#"
[component]
name = "faults"
version = "0.1.0"

[limits]
max_memory = "16MiB"
fuel = 200_000_000
timeout = "1s"
max_concurrency = 1

[capabilities]
imports = ["wasi:http/types"]
requires = ["wasi:http/incoming-handler"]
"#,
    )
    .unwrap();
    lat.push(&components::build().path("http_faults"), &manifest);
}

/// Waits until the instance serves again (after a crash and its restart).
async fn serving(port: u16) {
    let last = std::sync::Mutex::new(None);
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let answer = get(port, "/ok").await;
        if answer == (200, "ok".to_owned()) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the instance does not serve again; last answer {answer:?} (before: {:?})",
            last.lock().unwrap()
        );
        *last.lock().unwrap() = Some(answer);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every failure, through a listener on `port` in front of `faults`.
async fn failures_get_their_status(lat: &BenchLattice, port: u16) {
    // Known but not running: 503, the body says so.
    let (status, body) = get(port, "/ok").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("no_instance:"), "{body}");
    assert!(body.contains("faults"), "{body}");

    let out = lat.cli(&[
        "instance",
        "start",
        "faults",
        "--restart",
        "always",
        "--wait",
        "-o",
        "json",
    ]);
    let started: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        started["facts"][0]["type"], "dev.trellis.instance.started.v1",
        "{out}"
    );
    serving(port).await;

    // Crashes: 500, and the body names the reason but not the guest's details.
    for (path, reason) in [
        ("/trap", "trap: unreachable"),
        ("/panic", "panic"),
        ("/spin", "fuel_exhausted"),
        ("/memory", "memory_limit"),
    ] {
        let (status, body) = get(port, path).await;
        assert_eq!(status, 500, "{path}: {body}");
        assert_eq!(
            body,
            format!("component error: crashed ({reason})\n"),
            "{path}"
        );
        serving(port).await;
    }

    // A timeout is a gateway timeout; meanwhile the one slot is taken, so a second request is
    // refused at once as busy.
    // (A request sent while the slow one holds the slot; tried again should the slow one not
    // have reached the instance first.)
    for attempt in 1.. {
        let slow = tokio::spawn(get(port, "/sleep"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, busy) = get(port, "/ok").await;
        let (slow_status, body) = slow.await.unwrap();
        assert_eq!(slow_status, 504, "{body}");
        assert!(body.starts_with("timeout:"), "{body}");
        serving(port).await;
        if status == 503 {
            assert!(busy.starts_with("busy:"), "{busy}");
            break;
        }
        assert!(
            attempt < 5,
            "never refused as busy; last answer {status} {busy}"
        );
    }

    // Too large: 413, before anything reaches the component.
    let big = vec![b'x'; 2 * 1024 * 1024];
    let (status, _) = tokio::task::spawn_blocking(move || http(port, "POST", "/ok", &big))
        .await
        .unwrap();
    assert_eq!(status, 413);

    // A component nobody ever pushed: 503, and the body says it is unknown.
    let ghost = listen(lat, "component:ghost").await;
    let (status, body) = get(ghost, "/").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.starts_with("unknown_component:"), "{body}");
    assert!(body.contains("ghost"), "{body}");

    // Still serving after all of it.
    assert_eq!(get(port, "/ok").await, (200, "ok".to_owned()));
}

#[tokio::test]
async fn every_failure_gets_its_http_status_through_the_http_server_provider() {
    let lat = BenchLattice::up("status", &["http-server"]).await;
    let dir = tempfile::tempdir().unwrap();
    push_faults(&lat, dir.path());
    let port = listen(&lat, "component:faults").await;
    failures_get_their_status(&lat, port).await;
}

#[tokio::test]
async fn an_embedded_http_server_serves_its_hosts_instances_in_process_with_the_same_statuses() {
    let lat = BenchLattice::up("status-embedded", &[]).await;
    lat.cli(&["provider", "start", "http-server", "--embedded", "--wait"]);
    let dir = tempfile::tempdir().unwrap();
    push_faults(&lat, dir.path());
    let port = listen(&lat, "component:faults").await;

    failures_get_their_status(&lat, port).await;

    // A subscriber on the component's HTTP subject gets a copy of every request that crosses
    // NATS (it is subscribed only now: a subscriber would have turned "nobody serves" above
    // into a wait). While an instance of this host serves, none crosses.
    let client = lat.nats.client().await;
    let subject = dataplane::component(&lat.l, &ComponentName::new("faults").unwrap(), Op::Http);
    let mut observer = client.subscribe(subject).await.unwrap();
    client.flush().await.unwrap();
    for _ in 0..10 {
        assert_eq!(get(port, "/ok").await, (200, "ok".to_owned()));
    }
    let crossed = tokio::time::timeout(Duration::from_millis(300), observer.next()).await;
    assert!(
        crossed.is_err(),
        "a request crossed NATS: {:?}",
        crossed.ok().flatten().map(|m| m.subject)
    );
}
