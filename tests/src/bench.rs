//! Helpers for the scenario benchmarks in `tests/benches`: settings from the environment, quantiles, a
//! lattice with a controller, a host and standalone providers, call load from concurrent callers,
//! and HTTP load from `wrk`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use trellis_schemas::Lattice;

use crate::{Nats, Proc, wait_for};

/// Calls export `export` with the JSON arguments `args` on `subject` from `callers` concurrent
/// callers for `secs` seconds, each call waiting for its reply (at most `timeout`). Returns the
/// calls answered without an error and those that failed.
pub async fn call_load(
    client: &async_nats::Client,
    subject: &str,
    (export, args): (&str, &'static str),
    callers: usize,
    secs: usize,
    timeout: Duration,
) -> (usize, usize) {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use trellis_bus::dataplane as codec;
    let done = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let until = std::time::Instant::now() + Duration::from_secs(secs as u64);
    let mut tasks = Vec::new();
    for _ in 0..callers {
        let (client, subject, export) = (client.clone(), subject.to_owned(), export.to_owned());
        let (done, failed) = (Arc::clone(&done), Arc::clone(&failed));
        tasks.push(tokio::spawn(async move {
            while std::time::Instant::now() < until {
                let reply = codec::request(
                    &client,
                    subject.clone(),
                    codec::call_headers(&export),
                    args.into(),
                    timeout,
                )
                .await;
                match reply.map(|r| codec::read_reply(&r).is_ok()) {
                    Ok(true) => done.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    for t in tasks {
        t.await.expect("a caller panicked");
    }
    (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
}

/// `name` from the environment as a number, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The kernel's clock ticks per second (`USER_HZ`), in which `/proc` counts CPU time.
pub fn clock_ticks_per_sec() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of process `pid`, in clock ticks (0 when it cannot be read).
pub fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name is in parentheses and may hold spaces: count fields after the last ')'.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Fields 14 and 15 of stat(5); the first after ')' is field 3.
    field(11) + field(12)
}

/// Context switches of every thread of process `pid` so far, voluntary (a thread that parked,
/// waiting for a wakeup) and involuntary (a thread the kernel preempted); zeros when they cannot
/// be read. A thread that ended no longer counts.
pub fn context_switches(pid: i32) -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return (0, 0);
    };
    let mut total = (0, 0);
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        total.0 += status_field(&status, "voluntary_ctxt_switches").unwrap_or(0);
        total.1 += status_field(&status, "nonvoluntary_ctxt_switches").unwrap_or(0);
    }
    total
}

/// The number of a `status` file's line `key: <n>[ kB]`.
fn status_field(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// A `/proc/<pid>/status` value in KiB (`VmRSS`, `VmHWM`; 0 when it cannot be read).
pub fn status_kib(pid: i32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status_field(&status, key).unwrap_or(0)
}

/// The median of `v` (the upper middle one of an even count), which it sorts; zero when `v` is
/// empty.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or_default()
}

/// The `q` quantile (nearest rank) of `v`, which it sorts; zero when `v` is empty.
pub fn quantile(v: &mut [Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

/// Set in the environment of a benchmark binary started again as a [`BareResponder`]: the URL
/// of the nats-server, the subject to answer and the body of every reply.
const BARE_ENV: [&str; 3] = [
    "TRELLIS_BENCH_BARE_URL",
    "TRELLIS_BENCH_BARE_SUBJECT",
    "TRELLIS_BENCH_BARE_BODY",
];

/// The floor under any request and reply between two processes through the same nats-server:
/// the benchmark's own binary started again as a process of its own (as a host is), answering
/// every request on one subject at once with a fixed body and the headers of a successful call
/// reply, from a runtime with two worker threads (as a host has), with none of Trellis's code
/// between. Killed when dropped.
///
/// A benchmark that starts one calls [`serve_bare_if_asked`] first thing in `main`.
#[derive(Debug)]
pub struct BareResponder(SelfProcess);

impl BareResponder {
    /// Starts the responder on `subject` of the server at `url`, replying `body`; returns once
    /// it is subscribed.
    ///
    /// # Panics
    ///
    /// When the process cannot start or does not say it is ready.
    pub fn start(url: &str, subject: &str, body: &str) -> Self {
        Self(SelfProcess::start(
            &BARE_ENV
                .into_iter()
                .zip([url, subject, body])
                .collect::<Vec<_>>(),
        ))
    }

    /// The responder's process id.
    pub fn pid(&self) -> i32 {
        self.0.pid()
    }
}

/// The benchmark's own binary started again with `env`, to play a part in a process of its own
/// (a [`BareResponder`], say): it prints `ready` on its first line once it serves. Killed when
/// dropped.
#[derive(Debug)]
pub struct SelfProcess(std::process::Child);

impl SelfProcess {
    /// Starts it and returns once it has printed `ready`.
    ///
    /// # Panics
    ///
    /// When the process cannot start or does not say it is ready.
    pub fn start(env: &[(&str, &str)]) -> Self {
        let mut child = Command::new(std::env::current_exe().expect("the bench's own path"))
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start the benchmark's helper process");
        let mut ready = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.as_mut().expect("piped stdout")),
            &mut ready,
        )
        .expect("read the helper process's first line");
        assert_eq!(ready.trim(), "ready", "the helper process did not start");
        Self(child)
    }

    /// Its process id.
    pub fn pid(&self) -> i32 {
        i32::try_from(self.0.id()).expect("a pid fits an i32")
    }
}

impl Drop for SelfProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// When this process was started as a [`BareResponder`], serves until it is killed and then
/// exits; otherwise returns at once.
///
/// # Panics
///
/// When the responder cannot reach its server.
pub fn serve_bare_if_asked() {
    let Ok(url) = std::env::var(BARE_ENV[0]) else {
        return;
    };
    let subject = std::env::var(BARE_ENV[1]).expect("the bare responder's subject");
    let body = bytes::Bytes::from(std::env::var(BARE_ENV[2]).unwrap_or_default());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    runtime.block_on(async move {
        use futures::StreamExt as _;
        let client = async_nats::connect(url).await.expect("connect");
        let mut requests = client.subscribe(subject).await.expect("subscribe");
        client.flush().await.expect("flush");
        let headers = trellis_bus::dataplane::ok_headers(None);
        println!("ready");
        while let Some(message) = requests.next().await {
            if let Some(reply) = message.reply {
                let _ = client
                    .publish_with_headers(reply, headers.clone(), body.clone())
                    .await;
            }
        }
    });
    std::process::exit(0);
}

/// A lattice for a benchmark or a test: a nats-server, one controller, one host and the given
/// providers, each its own process (from the profile the caller was built with; benchmarks want
/// `cargo build --release --bins` first).
pub struct BenchLattice {
    /// The server.
    pub nats: Nats,
    /// The lattice's name.
    pub l: Lattice,
    /// Its controller, host and providers, stopped when dropped.
    procs: Vec<Proc>,
}

impl std::fmt::Debug for BenchLattice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BenchLattice")
            .field("url", &self.nats.url())
            .field("lattice", &self.l)
            .finish_non_exhaustive()
    }
}

impl BenchLattice {
    /// Starts everything and waits until the host and the providers are up.
    pub async fn up(name: &str, providers: &[&str]) -> Self {
        Self::up_with_env(name, providers, &[]).await
    }

    /// Like [`up`](Self::up), with `env` in the environment of the controller, the host and
    /// the providers (`OTEL_EXPORTER_OTLP_ENDPOINT`, say).
    pub async fn up_with_env(name: &str, providers: &[&str], env: &[(&str, &str)]) -> Self {
        let mut nats = Nats::start().await;
        nats.set_process_env(env);
        let l = crate::lattice(name);
        let mut procs = vec![nats.controller(&l, "c1", "30s"), nats.host(&l, "h1", &[])];
        for p in providers {
            procs.push(nats.provider(&l, p, &[]));
        }
        let this = Self { nats, l, procs };
        let want = providers.len();
        wait_for("host and providers up", Duration::from_secs(30), || async {
            let (code, out, _) = this.try_cli(&["provider", "ls", "-o", "json"]);
            let (hcode, hosts, _) = this.try_cli(&["host", "ls", "-o", "json"]);
            let providers: Value = serde_json::from_str(&out).ok()?;
            let hosts: Value = serde_json::from_str(&hosts).ok()?;
            (code == 0
                && hcode == 0
                && providers["providers"].as_array()?.len() >= want
                && !hosts["hosts"].as_array()?.is_empty())
            .then_some(())
        })
        .await;
        this
    }

    /// The lattice's processes by name and id: `nats-server`, then the controller, the host and
    /// the providers as they were started.
    fn processes(&self) -> impl Iterator<Item = (&str, i32)> {
        self.nats
            .pid()
            .map(|pid| ("nats-server", pid))
            .into_iter()
            .chain(self.procs.iter().map(|p| (p.name.as_str(), p.pid())))
    }

    /// The process ids of the lattice: its NATS server, controller, host and providers.
    pub fn pids(&self) -> Vec<i32> {
        self.processes().map(|(_, pid)| pid).collect()
    }

    /// CPU time the lattice's processes have used so far, in clock ticks (see [`cpu_ticks`]).
    pub fn cpu_ticks(&self) -> u64 {
        self.processes().map(|(_, pid)| cpu_ticks(pid)).sum()
    }

    /// CPU time each of the lattice's processes has used so far, in clock ticks, by name
    /// (`nats-server`, then the controller, the host and the providers as they were started).
    pub fn cpu_ticks_by_process(&self) -> Vec<(String, u64)> {
        self.processes()
            .map(|(name, pid)| (name.to_owned(), cpu_ticks(pid)))
            .collect()
    }

    /// Context switches of each of the lattice's processes so far (see [`context_switches`]),
    /// in the order of [`Self::cpu_ticks_by_process`].
    pub fn context_switches_by_process(&self) -> Vec<(u64, u64)> {
        self.processes()
            .map(|(_, pid)| context_switches(pid))
            .collect()
    }

    /// Runs the `trellis` CLI on this lattice; returns (exit code, stdout, stderr).
    pub fn try_cli(&self, args: &[&str]) -> (i32, String, String) {
        let mut all = vec!["--lattice", self.l.as_str()];
        all.extend_from_slice(args);
        self.nats.cli(&all)
    }

    /// Runs the `trellis` CLI on this lattice and panics, with its error, unless it succeeds;
    /// returns stdout.
    pub fn cli(&self, args: &[&str]) -> String {
        self.nats.cli_ok(&self.l, args)
    }

    /// Pushes the component `wasm` with its `Component.toml`; panics unless it is accepted.
    pub fn push(&self, wasm: &Path, manifest: &Path) {
        self.nats.push(&self.l, wasm, manifest);
    }
}

/// What one `wrk` run measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HttpFigures {
    /// Completed requests per second.
    pub requests_per_sec: f64,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Requests completed.
    pub requests: u64,
    /// Non-2xx/3xx responses plus socket errors (connect, read, write, timeout).
    pub errors: u64,
    /// CPU time the whole machine spent per request while `wrk` ran (see [`machine_busy`]).
    pub cpu_per_request: Duration,
}

/// CPU time the machine has spent busy since boot, on all its cores: user, system and interrupt
/// time from `/proc/stat`, not idle, I/O wait or time the hypervisor gave to others. Over a
/// load run, divided by the requests served, it is what one request costs every process on the
/// machine together, a steadier figure than requests/s on a shared two-core machine.
pub fn machine_busy() -> Duration {
    // The first line: `cpu user nice system idle iowait irq softirq steal ...`, in USER_HZ
    // (1/100 s on Linux, whatever the kernel's tick).
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: u64 = stat
        .lines()
        .next()
        .map(|cpu| {
            cpu.split_whitespace()
                .skip(1)
                .take(7)
                .enumerate()
                .filter(|(i, _)| !matches!(i, 3 | 4))
                .filter_map(|(_, t)| t.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    Duration::from_millis(ticks * 10)
}

/// Runs `wrk --latency` against `url` with `connections` connections on `threads` threads for
/// `duration`, and returns its figures.
///
/// # Panics
///
/// When `wrk` is not installed (`apt-get install wrk`) or prints nothing it can read.
pub fn wrk(url: &str, connections: usize, threads: usize, duration: Duration) -> HttpFigures {
    let busy = machine_busy();
    let out = Command::new("wrk")
        .args([
            "--latency",
            "-t",
            &threads.to_string(),
            "-c",
            &connections.to_string(),
            "-d",
            &format!("{}s", duration.as_secs().max(1)),
            url,
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run wrk ({e}): install it with `apt-get install wrk`"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "wrk failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let busy = machine_busy().saturating_sub(busy);
    let mut figures =
        parse_wrk(&text).unwrap_or_else(|| panic!("cannot read wrk's output:\n{text}"));
    figures.cpu_per_request = busy / u32::try_from(figures.requests.max(1)).unwrap_or(u32::MAX);
    figures
}

/// Reads the figures out of `wrk --latency`'s report.
pub fn parse_wrk(text: &str) -> Option<HttpFigures> {
    let mut requests_per_sec = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut requests = None;
    let mut errors = 0;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["Requests/sec:", n] => requests_per_sec = n.parse().ok(),
            ["50%", d] => p50 = parse_wrk_duration(d),
            ["99%", d] => p99 = parse_wrk_duration(d),
            [n, "requests", "in", ..] => requests = n.parse().ok(),
            ["Non-2xx", "or", "3xx", "responses:", n] => errors += n.parse::<u64>().ok()?,
            ["Socket", "errors:", rest @ ..] => {
                // `connect 0, read 0, write 0, timeout 0`
                for pair in rest.chunks(2) {
                    if let [_, n] = pair {
                        errors += n.trim_end_matches(',').parse::<u64>().ok()?;
                    }
                }
            }
            _ => {}
        }
    }
    Some(HttpFigures {
        requests_per_sec: requests_per_sec?,
        p50: p50?,
        p99: p99?,
        requests: requests?,
        errors,
        cpu_per_request: Duration::ZERO,
    })
}

/// `812.00us`, `1.23ms`, `2.01s`, `1.00m` as wrk prints them.
fn parse_wrk_duration(text: &str) -> Option<Duration> {
    let split = text.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number.parse().ok()?;
    let seconds = match unit {
        "us" => number / 1e6,
        "ms" => number / 1e3,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return None,
    };
    Some(Duration::from_secs_f64(seconds))
}

/// The `wasmtime` command line: `$WASMTIME`, else `~/.cache/wasmtime-cli/bin/wasmtime` (where the
/// benchmarks' instructions install it), else `wasmtime` on the `PATH`.
///
/// # Panics
///
/// When none of them runs, with the command that installs it.
pub fn wasmtime() -> PathBuf {
    let mut candidates = Vec::new();
    if let Some(path) = std::env::var_os("WASMTIME") {
        candidates.push(PathBuf::from(path));
    }
    if let Some(home) = std::env::var_os("HOME") {
        candidates.push(PathBuf::from(home).join(".cache/wasmtime-cli/bin/wasmtime"));
    }
    candidates.push(PathBuf::from("wasmtime"));
    for candidate in candidates {
        if Command::new(&candidate)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return candidate;
        }
    }
    panic!(
        "wasmtime is not installed: `cargo install wasmtime-cli --version 48.0.8 --locked --root ~/.cache/wasmtime-cli` (or set WASMTIME)"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPORT: &str = "Running 10s test @ http://127.0.0.1:8080/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     4.39ms    1.02ms  21.53ms   87.14%
    Req/Sec     3.66k   231.35     4.10k    72.00%
  Latency Distribution
     50%    4.21ms
     75%    4.71ms
     90%    5.41ms
     99%  812.00us
  72983 requests in 10.01s, 8.35MB read
  Socket errors: connect 0, read 2, write 0, timeout 3
  Non-2xx or 3xx responses: 4
Requests/sec:   7291.23
Transfer/sec:    854.44KB
";

    #[test]
    fn a_status_file_is_read() {
        let status = "Name:\tkv\nVmRSS:\t   12345 kB\nvoluntary_ctxt_switches:\t7\nnonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(status_field(status, "VmRSS"), Some(12_345));
        assert_eq!(status_field(status, "voluntary_ctxt_switches"), Some(7));
        assert_eq!(status_field(status, "nonvoluntary_ctxt_switches"), Some(3));
        assert_eq!(status_field(status, "VmHWM"), None);
        // A thread that sleeps leaves its CPU: at least one voluntary switch, counted.
        let me = i32::try_from(std::process::id()).unwrap();
        let (before, _) = context_switches(me);
        std::thread::sleep(Duration::from_millis(20));
        let (after, _) = context_switches(me);
        assert!(
            after > before,
            "a sleep is a voluntary switch: {before} → {after}"
        );
    }

    #[test]
    fn a_wrk_report_is_read() {
        let f = parse_wrk(REPORT).unwrap();
        assert!((f.requests_per_sec - 7291.23).abs() < 1e-6);
        assert_eq!(f.p50, Duration::from_micros(4210));
        assert_eq!(f.p99, Duration::from_micros(812));
        assert_eq!(f.requests, 72983);
        assert_eq!(f.errors, 9);
    }

    #[test]
    fn a_report_without_figures_is_not_read() {
        assert_eq!(parse_wrk("unable to connect to 127.0.0.1:1"), None);
    }

    #[test]
    fn wrk_durations_have_units() {
        assert_eq!(parse_wrk_duration("2.00s"), Some(Duration::from_secs(2)));
        assert_eq!(parse_wrk_duration("1.50m"), Some(Duration::from_secs(90)));
        assert_eq!(parse_wrk_duration("12"), None);
        assert_eq!(parse_wrk_duration("3.0xs"), None);
    }
}
