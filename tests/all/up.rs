//! `trellis up` stops everything it started, however it is stopped: in order on SIGTERM (as on
//! Ctrl-C), and through the parent-death signal when it is SIGKILLed. A provider it started and
//! that is stopped on request leaves the rest running.
//!
//! The processes it started are read from /proc before the signal (its children and their
//! children, such as the providers its host supervises); afterwards each must be gone. A zombie
//! counts as gone: it has exited, and only waits for whoever inherited it to reap it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use trellis_tests::{bin, cli_at, wait_for};

/// One process as /proc shows it: enough to tell it from a later process given the same pid.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Seen {
    pid: i32,
    ppid: i32,
    /// Start time after boot, in clock ticks: with the pid, it names one process.
    start: u64,
    /// The basename of argv[0].
    name: String,
}

/// Reads `/proc/<pid>/stat`: (parent, state, start time).
fn stat(pid: i32) -> Option<(i32, char, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may contain anything: split after the last one.
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); ppid is field 4, starttime field 22.
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(1)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((ppid, state, start))
}

fn name(pid: i32) -> String {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let argv0 = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    let argv0 = String::from_utf8_lossy(argv0);
    argv0.rsplit('/').next().unwrap_or_default().to_owned()
}

/// Every live descendant of `root`.
fn descendants(root: i32) -> Vec<Seen> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Some((ppid, state, start)) = stat(pid)
            && state != 'Z'
            && state != 'X'
        {
            all.push(Seen {
                pid,
                ppid,
                start,
                name: name(pid),
            });
        }
    }
    let mut found: Vec<Seen> = Vec::new();
    let mut parents = vec![root];
    while let Some(parent) = parents.pop() {
        for p in all.iter().filter(|p| p.ppid == parent) {
            parents.push(p.pid);
            found.push(p.clone());
        }
    }
    found.sort_by_key(|p| p.pid);
    found
}

/// Whether this very process still runs (not exited, not a zombie, pid not reused).
fn alive(p: &Seen) -> bool {
    stat(p.pid).is_some_and(|(_, state, start)| start == p.start && state != 'Z' && state != 'X')
}

/// A running `trellis up`, its stdout lines, its NATS URL, and what it started.
struct Up {
    child: Child,
    lines: Receiver<String>,
    url: String,
    started: Vec<Seen>,
}

/// Starts `trellis up` (`--secure` when `secure`) with one provider of its own, waits until it is
/// up, has its host start and supervise a second provider, and records every process under it.
async fn start_up(secure: bool) -> Up {
    let mut child = Command::new(bin("trellis"))
        .args(["up", "--host-id", "up-host", "--providers", "kv", "--ui"])
        .arg(format!("127.0.0.1:{}", trellis_tests::free_port()))
        .args(secure.then_some("--secure"))
        .env_remove("TRELLIS_NATS_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut url = None;
    let mut creds = None;
    let mut nats_log = None;
    while url.is_none() || (secure && creds.is_none()) {
        let line = lines
            .recv_timeout(Duration::from_secs(90))
            .expect("trellis up prints its URL (and credentials) once the lattice is up");
        if let Some(u) = line.strip_prefix("TRELLIS_NATS_URL=") {
            url = Some(u.to_owned());
        }
        if let Some(c) = line.strip_prefix("TRELLIS_CREDS=") {
            creds = Some(c.to_owned());
        }
        if line.trim_start().starts_with("nats ")
            && let Some((_, log)) = line.rsplit_once(" log ")
        {
            nats_log = Some(log.trim().to_owned());
        }
    }
    let url = url.unwrap();
    let mut start = vec!["provider", "start", "messaging", "--wait"];
    if let Some(creds) = &creds {
        // Secured: the operator's key works, no key at all does not.
        let (code, _, err) = cli_at(&url, &["host", "ls"]);
        assert_eq!(code, 4, "no credentials, no lattice: {err}");
        start.extend(["--creds", creds.as_str()]);
    }
    let (code, _, err) = cli_at(&url, &start);
    assert_eq!(code, 0, "the host starts a provider: {err}");
    if secure {
        // Every process, the dashboard included, had every permission it used.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let log = std::fs::read_to_string(nats_log.expect("the nats log is printed")).unwrap();
        let violations: Vec<&str> = log.lines().filter(|l| l.contains("Violation")).collect();
        assert!(violations.is_empty(), "{}", violations.join("\n"));
    }

    let up_pid = child.id() as i32;
    let started = descendants(up_pid);
    let names: Vec<&str> = started.iter().map(|p| p.name.as_str()).collect();
    for expected in [
        "nats-server",
        "trellis",
        "trellis-host",
        "trellis-provider-kv",
        "trellis-provider-messaging",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} runs under trellis up: {started:?}"
        );
    }
    let host = started
        .iter()
        .find(|p| p.name == "trellis-host")
        .map(|p| p.pid);
    assert!(
        started
            .iter()
            .any(|p| p.name == "trellis-provider-messaging" && Some(p.ppid) == host),
        "the messaging provider is the host's child: {started:?}"
    );
    Up {
        child,
        lines,
        url,
        started,
    }
}

/// Waits until none of `started` runs any more, up to `bound`; returns how long it took.
async fn all_gone(started: &[Seen], bound: Duration) -> Duration {
    let begin = Instant::now();
    let deadline = begin + bound;
    loop {
        let left: Vec<&Seen> = started.iter().filter(|p| alive(p)).collect();
        if left.is_empty() {
            return begin.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "still running {bound:?} after trellis up ended: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Sends `trellis up` SIGTERM and waits (up to 90 s) for it to exit.
async fn stop_with_sigterm(child: &mut Child) -> std::process::ExitStatus {
    kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).unwrap();
    wait_for(
        "trellis up to exit after SIGTERM",
        Duration::from_secs(90),
        || {
            let status = child.try_wait().unwrap();
            async move { status }
        },
    )
    .await
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':').next().unwrap().parse().unwrap()
}

/// Secured (`--secure`), as `scripts/up` runs it: the same processes, each with its own key.
#[tokio::test]
async fn trellis_up_stops_everything_in_order_on_sigterm() {
    let Up {
        mut child,
        lines,
        url,
        started,
    } = start_up(true).await;

    let status = stop_with_sigterm(&mut child).await;
    assert!(status.success(), "a SIGTERM is a clean stop, got {status}");

    // It stopped its children itself, each in turn, before exiting.
    let rest = trellis_tests::remaining_lines(&lines, Duration::from_secs(30));
    let rest = rest.join("\n");
    assert!(rest.contains("signal: SIGTERM"), "{rest}");
    let order: Vec<usize> = ["kv ", "host ", "controller ", "nats "]
        .iter()
        .map(|name| {
            rest.lines()
                .position(|l| l.trim_start().starts_with(name) && l.contains("stopped"))
                .unwrap_or_else(|| panic!("{name} stopped by trellis up:\n{rest}"))
        })
        .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "providers, host, controller, then NATS:\n{rest}"
    );

    // Nothing it started is left, the provider its host ran included.
    all_gone(&started, Duration::from_secs(5)).await;
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port_of(&url)))
            .await
            .is_err(),
        "NATS no longer listens"
    );
}

#[tokio::test]
async fn nothing_trellis_up_started_outlives_a_sigkill() {
    let Up {
        mut child,
        url,
        started,
        ..
    } = start_up(false).await;

    child.kill().unwrap();
    child.wait().unwrap();
    // Every child got SIGTERM from the kernel and stops by itself; with NATS gone at the same
    // moment, the host and providers wait out their drain timeouts, hence the generous bound.
    let took = all_gone(&started, Duration::from_secs(60)).await;
    println!(
        "figure: {} processes under a SIGKILLed trellis up ended within {} ms",
        started.len(),
        took.as_millis()
    );
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port_of(&url)))
            .await
            .is_err(),
        "NATS no longer listens"
    );
}

#[tokio::test]
async fn a_provider_stopped_on_request_leaves_the_rest_running() {
    let Up {
        mut child,
        lines,
        url,
        started,
    } = start_up(false).await;

    let (code, out, err) = cli_at(&url, &["provider", "ls", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    let kv = listed["providers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "kv" && p["host_id"].is_null())
        .unwrap_or_else(|| panic!("the kv provider trellis up started: {out}"))["provider_id"]
        .as_str()
        .unwrap()
        .to_owned();
    let (code, _, err) = cli_at(&url, &["provider", "stop", &kv]);
    assert_eq!(code, 0, "{err}");

    // The first line about a stop (the rest of the banner may come before it).
    let line = std::iter::from_fn(|| lines.recv_timeout(Duration::from_secs(30)).ok())
        .find(|l| l.contains("stopped"))
        .expect("trellis up says the provider stopped");
    assert!(
        line.trim_start().starts_with("kv ") && line.contains("stopped on request"),
        "{line}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "trellis up runs on without the provider"
    );
    let (code, hosts, err) = cli_at(&url, &["host", "ls"]);
    assert_eq!(code, 0, "the lattice still answers: {err}");
    assert!(hosts.contains("up-host"), "{hosts}");

    let status = stop_with_sigterm(&mut child).await;
    assert!(status.success(), "a SIGTERM is a clean stop, got {status}");
    all_gone(&started, Duration::from_secs(5)).await;
}
