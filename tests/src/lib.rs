//! Test support for Trellis end-to-end suites: a real `nats-server` with JetStream on a free port,
//! and the project's binaries started as real processes.
//!
//! The binaries are found next to the test executable's target directory (`target/<profile>/`);
//! build them first with `cargo build --workspace --bins` (the test script does). `TRELLIS_BIN_DIR`
//! overrides the directory and `TRELLIS_NATS_SERVER` the nats-server binary. [`prometheus`] runs a
//! real Prometheus server (`TRELLIS_PROMETHEUS` names its binary).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test support: failing loudly is the point"
)]

pub mod bench;
pub mod browser;
pub mod cluster;
pub mod components;
pub mod microvm;
pub mod otlp;
pub mod prometheus;
pub mod rollout;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use trellis_bus::{FactStream, StartAt};
use trellis_ctl::CtlClient;
use trellis_schemas::{Event, Fact, Lattice, subject};

/// The directory holding `trellis`, `trellis-host` and the `trellis-provider-*` binaries.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("TRELLIS_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // target/<profile>/deps/all-<hash> → target/<profile>
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// The path of a project binary; panics with instructions when it has not been built.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} does not exist: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    path
}

/// A free TCP port on loopback that this process has not handed out before.
///
/// Asking the kernel for port 0 can hand two parallel tests the same port (the first has not bound
/// it yet), and a port from the ephemeral range can be taken by any outgoing connection before the
/// test binds it. So ports come from below Linux's ephemeral range (32768–60999), each at most once
/// per process, starting at an offset derived from the process id so that test binaries run one
/// after another do not reuse each other's ports either.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = std::process::id().wrapping_mul(7_919) % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = u16::try_from(LOW + (offset + n) % SPAN).expect("below 32000");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port left in {LOW}..{}", LOW + SPAN);
}

/// Returns once the server has taken everything `client` sent before, its subscriptions
/// included: a message to a fresh inbox of the client's own makes the round trip. `flush` only
/// writes the socket, so a subscription just made may still be unknown to the server when
/// another connection publishes (the request then finds no responders).
pub async fn settled(client: &async_nats::Client) {
    use futures::StreamExt as _;
    let inbox = client.new_inbox();
    let mut probe = client.subscribe(inbox.clone()).await.unwrap();
    client.publish(inbox, bytes::Bytes::new()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), probe.next())
        .await
        .expect("the server echoed the probe within 10 s")
        .expect("the probe's subscription is open");
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The lines a reader thread still has to deliver from a process that exited: every line up to
/// the end of its output (the thread drops its sender there), waiting at most `within` for it,
/// so that the last lines the process wrote are never missed for having not been read yet.
pub fn remaining_lines(lines: &std::sync::mpsc::Receiver<String>, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    let mut rest = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) => rest.push(line),
            Err(_) => break,
        }
    }
    rest
}

/// A temporary directory for a test's servers, data and logs, removed on drop unless
/// `TRELLIS_KEEP_LOGS=1` asks to keep it (its path is then printed).
pub fn scratch_dir(prefix: &str) -> tempfile::TempDir {
    let mut dir = tempfile::Builder::new().prefix(prefix).tempdir().unwrap();
    if std::env::var_os("TRELLIS_KEEP_LOGS").is_some() {
        dir.disable_cleanup(true);
        eprintln!("kept: {}", dir.path().display());
    }
    dir
}

/// A child process killed on drop.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    /// Starts `program` with `args`, output to a log file in `logs`.
    pub fn spawn(name: &str, program: &Path, args: &[String], logs: &Path) -> Self {
        Self::spawn_env(name, program, args, logs, &[])
    }

    /// Like [`Proc::spawn`], with more environment variables.
    pub fn spawn_env(
        name: &str,
        program: &Path,
        args: &[String],
        logs: &Path,
        env: &[(&str, &str)],
    ) -> Self {
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .env("RUST_LOG", "info,async_nats=warn")
            // Panics keep their backtraces, but errors do not capture one: with
            // RUST_BACKTRACE=1 inherited, every wasmtime store drop would (see TOOLCHAIN.md).
            .env("RUST_LIB_BACKTRACE", "0")
            .envs(env.iter().copied())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({}): {e}", program.display()));
        Self {
            name: name.to_owned(),
            child: Some(child),
            log,
        }
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.as_ref().map(|c| c.id() as i32).unwrap_or(0)
    }

    /// Sends a signal.
    pub fn signal(&self, signal: Signal) {
        let _ = kill(Pid::from_raw(self.pid()), signal);
    }

    /// Waits for the process to exit, up to `timeout`; returns its exit code (None: killed by a
    /// signal) or panics.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().expect("still owned");
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {timeout:?}; log: {}",
                self.name,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A nats-server with JetStream on a free loopback port and a temporary store.
#[derive(Debug)]
pub struct Nats {
    /// The port.
    pub port: u16,
    dir: tempfile::TempDir,
    proc: Option<Proc>,
    /// Arguments beyond the listen address and JetStream store (a cluster member's).
    extra: Vec<String>,
    /// The URLs of the other members of its cluster, if it is in one.
    peers: Vec<String>,
    /// Environment variables of the controllers, hosts and providers it starts.
    process_env: Vec<(String, String)>,
}

impl Nats {
    /// Starts a server and waits until it accepts connections.
    pub async fn start() -> Self {
        let mut nats = Self::prepare(Vec::new());
        nats.launch().await;
        nats
    }

    /// Starts a server with more command-line arguments (`--tls …`) and waits until it accepts
    /// TCP connections.
    pub async fn start_with_args(extra: &[&str]) -> Self {
        let mut nats = Self::prepare(extra.iter().map(|a| (*a).to_owned()).collect());
        nats.launch().await;
        nats
    }

    /// Starts `size` servers on loopback routed into one JetStream cluster and waits until the
    /// cluster can place a stream with `size` replicas.
    pub async fn cluster(size: usize) -> Vec<Self> {
        let routes: Vec<u16> = (0..size).map(|_| free_port()).collect();
        let route_urls = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut servers = Vec::with_capacity(size);
        for (i, route) in routes.iter().enumerate() {
            let mut nats = Self::prepare(Vec::new());
            nats.extra = vec![
                "-n".into(),
                format!("n{i}"),
                "--cluster_name".into(),
                "trellis-test".into(),
                "--cluster".into(),
                format!("nats://127.0.0.1:{route}"),
                "--routes".into(),
                route_urls.clone(),
            ];
            nats.launch().await;
            servers.push(nats);
        }
        let urls: Vec<String> = servers.iter().map(Self::url).collect();
        for nats in &mut servers {
            let own = nats.url();
            nats.peers = urls.iter().filter(|u| **u != own).cloned().collect();
        }
        let js = async_nats::jetstream::new(servers[0].client().await);
        wait_for_replicated_stream(&js, size, Duration::from_secs(30)).await;
        servers
    }

    fn prepare(extra: Vec<String>) -> Self {
        let dir = scratch_dir("trellis-test-");
        Self {
            port: free_port(),
            dir,
            proc: None,
            extra,
            peers: Vec::new(),
            process_env: Vec::new(),
        }
    }

    /// Gives every controller, host and provider started from now on these environment
    /// variables (besides the test's own).
    pub fn set_process_env(&mut self, env: &[(&str, &str)]) {
        self.process_env = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
    }

    /// Starts one of the lattice's processes with [`set_process_env`](Self::set_process_env)'s
    /// variables.
    fn spawn(&self, name: &str, program: &Path, args: &[String]) -> Proc {
        let env: Vec<(&str, &str)> = self
            .process_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Proc::spawn_env(name, program, args, self.logs(), &env)
    }

    fn server_binary() -> PathBuf {
        std::env::var_os("TRELLIS_NATS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("nats-server"))
    }

    async fn launch(&mut self) {
        let args: Vec<String> = [
            "-a".into(),
            "127.0.0.1".into(),
            "-p".into(),
            self.port.to_string(),
            "-js".into(),
            "-sd".into(),
            self.dir.path().join("js").display().to_string(),
        ]
        .into_iter()
        .chain(self.extra.iter().cloned())
        .collect();
        self.proc = Some(Proc::spawn(
            "nats",
            &Self::server_binary(),
            &args,
            self.dir.path(),
        ));
        let port = self.port;
        wait_for(
            "nats-server to listen",
            Duration::from_secs(10),
            || async move {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
                    .map(|_| ())
            },
        )
        .await;
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The URL the processes this server starts are given: its own, then those of the other
    /// members of its cluster, comma-separated.
    pub fn connect_url(&self) -> String {
        std::iter::once(self.url())
            .chain(self.peers.iter().cloned())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The process id of the server, while it runs.
    pub fn pid(&self) -> Option<i32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// A directory for the logs of processes of this test.
    pub fn logs(&self) -> &Path {
        self.dir.path()
    }

    /// Kills the server (SIGKILL) keeping its store.
    pub fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// Starts the server again on the same port with the same store.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }

    /// A connected client.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url()).await.unwrap()
    }

    /// A control client of `lattice`.
    pub async fn ctl(&self, lattice: &Lattice) -> CtlClient {
        CtlClient::new(
            self.client().await,
            lattice.clone(),
            Duration::from_secs(10),
        )
    }

    /// Starts a controller replica.
    pub fn controller(&self, lattice: &Lattice, replica: &str, host_timeout: &str) -> Proc {
        let args: Vec<String> = vec![
            "--nats".into(),
            self.connect_url(),
            "--lattice".into(),
            lattice.to_string(),
            "controller".into(),
            "--host-timeout".into(),
            host_timeout.into(),
            "--replica-id".into(),
            replica.into(),
        ];
        self.spawn(&format!("controller-{replica}"), &bin("trellis"), &args)
    }

    /// Starts a host with a 200 ms heartbeat.
    pub fn host(&self, lattice: &Lattice, host_id: &str, labels: &[&str]) -> Proc {
        self.host_with(lattice, host_id, labels, &[])
    }

    /// Like [`Nats::host`], with `extra` arguments at the end of the command line.
    pub fn host_with(
        &self,
        lattice: &Lattice,
        host_id: &str,
        labels: &[&str],
        extra: &[&str],
    ) -> Proc {
        let mut args: Vec<String> = vec![
            "--nats".into(),
            self.connect_url(),
            "--lattice".into(),
            lattice.to_string(),
            "--host-id".into(),
            host_id.into(),
            "--heartbeat-interval".into(),
            "200ms".into(),
        ];
        for l in labels {
            args.push("--label".into());
            args.push((*l).into());
        }
        args.extend(extra.iter().map(|a| (*a).to_owned()));
        self.spawn(&format!("host-{host_id}"), &bin("trellis-host"), &args)
    }

    /// Starts provider `trellis-provider-<name>` on `lattice` with extra `args` (`--provider-id`,
    /// `--config k=v`, …), as a host would.
    pub fn provider(&self, lattice: &Lattice, name: &str, args: &[&str]) -> Proc {
        let mut all: Vec<String> = vec![
            "--nats".into(),
            self.connect_url(),
            "--lattice".into(),
            lattice.to_string(),
        ];
        all.extend(args.iter().map(|a| (*a).to_owned()));
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.spawn(
            &format!("provider-{name}-{n}"),
            &bin(&format!("trellis-provider-{name}")),
            &all,
        )
    }

    /// Runs the `trellis` CLI against this server; returns (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (i32, String, String) {
        cli_at(&self.connect_url(), args)
    }

    /// Runs the `trellis` CLI on `lattice`; panics with its output unless it succeeds. Returns
    /// its stdout.
    pub fn cli_ok(&self, lattice: &Lattice, args: &[&str]) -> String {
        let mut all = vec!["--lattice", lattice.as_str()];
        all.extend_from_slice(args);
        let (code, out, err) = self.cli(&all);
        assert_eq!(code, 0, "trellis {}: {out}{err}", args.join(" "));
        out
    }

    /// Pushes the component `wasm` with its `Component.toml` to `lattice`; panics unless it is
    /// accepted.
    pub fn push(&self, lattice: &Lattice, wasm: &Path, manifest: &Path) {
        let (wasm, manifest) = (wasm.to_string_lossy(), manifest.to_string_lossy());
        self.cli_ok(
            lattice,
            &["component", "push", &wasm, "--manifest", &manifest],
        );
    }

    /// Starts one instance of `component` on `lattice` with the extra `args` of `trellis instance
    /// start` (`--host`, `--grant`, `--restart` …), waits for it, and returns its id; panics
    /// unless it started.
    pub fn start_instance(&self, lattice: &Lattice, component: &str, args: &[&str]) -> String {
        let mut all = vec!["instance", "start", component];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--wait", "-o", "json"]);
        let out = self.cli_ok(lattice, &all);
        let reply: serde_json::Value = serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("instance start {component}: {e}: {out}"));
        assert_eq!(
            reply["facts"][0]["type"], "dev.trellis.instance.started.v1",
            "{component} did not start: {out}"
        );
        reply["instances"][0]["instance_id"]
            .as_str()
            .unwrap_or_else(|| panic!("no instance id in {out}"))
            .to_owned()
    }

    /// Waits (30 s at most) until a controller of `lattice` answers and lists a host.
    pub async fn wait_for_a_host(&self, lattice: &Lattice) {
        self.wait_for_hosts(lattice, 1).await;
    }

    /// Waits (30 s at most) until a controller of `lattice` answers and lists `n` hosts or more:
    /// hosts started together register in any order, so a test that places work on a given one
    /// waits for all of them.
    pub async fn wait_for_hosts(&self, lattice: &Lattice, n: usize) {
        let ctl = self.ctl(lattice).await;
        wait_for(
            &format!("the controller to list {n} host(s)"),
            Duration::from_secs(30),
            || async {
                let reply = ctl
                    .request(&trellis_schemas::control::HostListRequest::default())
                    .await
                    .ok()?;
                (reply.hosts.len() >= n).then_some(())
            },
        )
        .await;
    }

    /// Every fact the lattice's stream holds, decoded, in order.
    pub async fn facts(&self, lattice: &Lattice) -> Vec<Fact> {
        facts_at(&self.url(), lattice).await
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until a JetStream cluster can place a stream with `replicas` replicas (a probe stream,
/// created and deleted).
pub async fn wait_for_replicated_stream(
    js: &async_nats::jetstream::Context,
    replicas: usize,
    timeout: Duration,
) {
    wait_for(
        "the JetStream cluster to place a replicated stream",
        timeout,
        || async {
            let probe = async_nats::jetstream::stream::Config {
                name: "CLUSTER_PROBE".into(),
                subjects: vec!["cluster-probe".into()],
                num_replicas: replicas,
                storage: async_nats::jetstream::stream::StorageType::Memory,
                ..Default::default()
            };
            js.create_stream(probe).await.ok()?;
            js.delete_stream("CLUSTER_PROBE").await.ok().map(|_| ())
        },
    )
    .await;
}

/// Asserts that both controller replicas of a lattice, asked through `ctl` at the stream's last
/// sequence, hold exactly what an independent replay of `facts` (the whole stream) holds.
pub async fn assert_replicas_match_replay(ctl: &CtlClient, facts: &[Fact], timeout: Duration) {
    let tip = facts.last().map_or(0, |f| f.seq);
    let mut expected = trellis_schemas::Projection::new();
    for f in facts {
        trellis_schemas::apply(&mut expected, f);
    }
    let want = serde_json::to_string(&expected).unwrap();
    let mut seen = std::collections::BTreeMap::new();
    let deadline = Instant::now() + timeout;
    while seen.len() < 2 {
        assert!(Instant::now() < deadline, "both replicas did not answer");
        let request = trellis_schemas::control::ProjectionRequest { min_seq: Some(tip) };
        if let Ok(reply) = ctl.request(&request).await {
            seen.insert(reply.served_by.clone(), reply);
        }
    }
    for (replica, reply) in &seen {
        assert_eq!(
            serde_json::to_string(&reply.projection).unwrap(),
            want,
            "replica {replica} differs from an independent replay of the stream"
        );
    }
}

/// The servers of a comma-separated NATS URL list, as a client takes them.
pub fn servers(url: &str) -> Vec<String> {
    url.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Runs the `trellis` CLI against the NATS server at `url`; returns (exit code, stdout, stderr).
pub fn cli_at(url: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin("trellis"))
        .arg("--nats")
        .arg(url)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every fact the stream of `lattice` on the NATS server at `url` holds, decoded, in order.
pub async fn facts_at(url: &str, lattice: &Lattice) -> Vec<Fact> {
    facts_with(url, lattice, trellis_bus::connect_args()).await
}

/// Like [`facts_at`], logging in with `args` (the admin's credentials of a secured lattice).
pub async fn facts_with(
    url: &str,
    lattice: &Lattice,
    args: &trellis_bus::ConnectArgs,
) -> Vec<Fact> {
    // As the processes connect: a URL's user info logs in.
    let client = trellis_bus::connect_with(url, "trellis-tests", false, args)
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client.clone());
    // No stream yet (no process of the lattice has started) means no facts.
    if trellis_bus::events_stream_state(&js, lattice)
        .await
        .is_err()
    {
        return Vec::new();
    }
    read_facts(&client, &js, lattice).await.unwrap()
}

/// Like [`facts_at`], but the stream must exist, and any failure to read it (a cluster electing
/// a leader) is returned rather than a panic, so the caller can retry.
pub async fn try_facts_at(url: &str, lattice: &Lattice) -> Result<Vec<Fact>, String> {
    let client = async_nats::connect(servers(url))
        .await
        .map_err(|e| e.to_string())?;
    let js = async_nats::jetstream::new(client.clone());
    read_facts(&client, &js, lattice).await
}

async fn read_facts(
    client: &async_nats::Client,
    js: &async_nats::jetstream::Context,
    lattice: &Lattice,
) -> Result<Vec<Fact>, String> {
    let state = trellis_bus::events_stream_state(js, lattice)
        .await
        .map_err(|e| e.to_string())?;
    if state.messages == 0 {
        return Ok(Vec::new());
    }
    let mut reader = FactStream::open(
        client,
        js,
        &subject::events_stream(lattice),
        None,
        StartAt::Beginning,
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut facts = Vec::new();
    while let Some(raw) = reader.next().await {
        let raw = raw.map_err(|e| e.to_string())?;
        facts.push(Fact {
            seq: raw.seq,
            event: Event::decode(&raw.payload).map_err(|e| e.to_string())?,
        });
        if raw.seq >= state.last_sequence {
            break;
        }
    }
    Ok(facts)
}

/// A lattice name unique to one test, so tests sharing nothing still never collide.
pub fn lattice(name: &str) -> Lattice {
    Lattice::new(name).unwrap()
}

/// Sends one capability request straight to a provider's RPC subject with `identity`, through
/// the data-plane codec, from a caller that reads only the provider's own replies (a host reads
/// direct replies too: [`provider_call_as`]), and reads the typed answer.
///
/// # Errors
///
/// The provider's error, or `unavailable` when nothing answered within 10 s.
pub async fn provider_call(
    client: &async_nats::Client,
    lattice: &Lattice,
    provider: &str,
    identity: &trellis_bus::dataplane::Identity,
    request: &trellis_schemas::capability::rpc::CapabilityRequest,
) -> Result<trellis_schemas::capability::rpc::CapabilityResponse, trellis_schemas::DataError> {
    provider_call_as(client, lattice, provider, identity, request, false).await
}

/// [`provider_call`], as a host sends it: when `direct`, the caller reads a backend's own
/// reply ([`trellis_bus::direct`]), which the provider may have the backend send.
///
/// # Errors
///
/// As [`provider_call`].
pub async fn provider_call_as(
    client: &async_nats::Client,
    lattice: &Lattice,
    provider: &str,
    identity: &trellis_bus::dataplane::Identity,
    request: &trellis_schemas::capability::rpc::CapabilityRequest,
    direct: bool,
) -> Result<trellis_schemas::capability::rpc::CapabilityResponse, trellis_schemas::DataError> {
    use trellis_bus::dataplane as codec;
    let capability = request.capability();
    let subject = trellis_schemas::dataplane::provider_rpc(
        lattice,
        &trellis_schemas::ProviderName::new(provider).expect("provider name"),
        capability,
    );
    let (mut headers, body) = codec::capability_request(identity, request)?;
    if direct {
        trellis_bus::direct::accept_direct(request, &mut headers);
    }
    let reply = codec::request(client, subject, headers, body, Duration::from_secs(10))
        .await
        .map_err(|e| trellis_schemas::DataError::unavailable(e.to_string()))?;
    trellis_bus::direct::read_reply(request, &reply)
}

/// The identity of a caller that the host would send: no assignment claim, no sequence.
pub fn caller(instance: &str, component: &str) -> trellis_bus::dataplane::Identity {
    trellis_bus::dataplane::Identity {
        instance: trellis_schemas::InstanceId::new(instance).expect("instance id"),
        component: component.to_owned(),
        assignment: None,
        min_seq: None,
        traceparent: None,
    }
}

/// What an operator does first, run through `cli` (the `trellis` CLI with the connection options
/// a test needs; it returns the exit code, stdout and stderr): waits until `host` is listed,
/// pushes the `counter` test component, starts an instance and calls it (it answers 1), then has
/// `host` start the `messaging` provider and waits until it runs.
pub async fn exercise_lattice(cli: impl Fn(&[&str]) -> (i32, String, String), host: &str) {
    let t = Duration::from_secs(30);
    wait_for(&format!("host {host} listed"), t, || async {
        let (code, out, _) = cli(&["host", "ls", "-o", "json"]);
        (code == 0 && out.contains(&format!("\"{host}\""))).then_some(())
    })
    .await;
    push_test_component(
        &cli,
        "counter",
        "[component]\nname = \"counter\"\nversion = \"1.0.0\"\n[limits]\nmax_memory = \"16MiB\"\nfuel = 50000000\ntimeout = \"2s\"\nmax_concurrency = 4\n",
    );
    let ok = |args: &[&str]| {
        let (code, out, err) = cli(args);
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        out
    };
    ok(&["instance", "start", "counter", "--wait"]);
    assert_eq!(ok(&["call", "counter", "increment"]).trim(), "1");
    ok(&["provider", "start", "messaging", "--host", host, "--wait"]);
    wait_for("the messaging provider running", t, || async {
        let (code, out, _) = cli(&["provider", "ls", "-o", "json"]);
        let reply: serde_json::Value = serde_json::from_str(&out).ok()?;
        (code == 0
            && reply["providers"]
                .as_array()?
                .iter()
                .any(|p| p["name"] == "messaging" && p["status"] == "running"))
        .then_some(())
    })
    .await;
}

/// A controller and a host `h1` (heartbeats every 200 ms), each started with `args(rest)`:
/// the connection options a test needs, then the process's own arguments. Logs go to `logs`.
pub fn controller_and_host_h1(logs: &Path, args: impl Fn(&[&str]) -> Vec<String>) -> [Proc; 2] {
    [
        Proc::spawn(
            "controller",
            &bin("trellis"),
            &args(&["controller", "--host-timeout", "10s"]),
            logs,
        ),
        Proc::spawn(
            "host-h1",
            &bin("trellis-host"),
            &args(&["--host-id", "h1", "--heartbeat-interval", "200ms"]),
            logs,
        ),
    ]
}

/// Builds the test component `crate_name` (from `tests/components`) and pushes it through `cli`
/// with the manifest `manifest` (the text of a `Component.toml`).
pub fn push_test_component(
    cli: &impl Fn(&[&str]) -> (i32, String, String),
    crate_name: &str,
    manifest: &str,
) {
    let dir = scratch_dir("trellis-push-");
    let path = dir.path().join("Component.toml");
    std::fs::write(&path, manifest).unwrap();
    let wasm = components::build().path(crate_name);
    let (code, out, err) = cli(&[
        "component",
        "push",
        wasm.to_str().unwrap(),
        "--manifest",
        path.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "push {crate_name}: {out}{err}");
}

/// What one HTTP request answered.
#[derive(Debug, Clone)]
pub struct HttpReply {
    /// The status code.
    pub status: u16,
    /// The response headers.
    pub headers: http::HeaderMap,
    /// The body, as text.
    pub body: String,
}

/// Sends `request` with hyper's client over a fresh connection and reads the whole answer, within
/// `timeout`; the error says what failed, with its causes.
pub async fn http_send(
    request: http::Request<String>,
    timeout: Duration,
) -> Result<HttpReply, String> {
    use http_body_util::BodyExt as _;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http::<http_body_util::Full<bytes::Bytes>>();
    let request = request.map(|body| http_body_util::Full::new(bytes::Bytes::from(body)));
    let exchange = async {
        let response = client
            .request(request)
            .await
            .map_err(|e| trellis_bus::error_chain(&e))?;
        let (head, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| trellis_bus::error_chain(&e))?
            .to_bytes();
        Ok(HttpReply {
            status: head.status.as_u16(),
            headers: head.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

/// `method url` with `body` (see [`http_send`]), within 20 s.
pub async fn http_request(method: &str, url: &str, body: &str) -> Result<HttpReply, String> {
    let request = http::Request::builder()
        .method(method)
        .uri(url)
        .body(body.to_owned())
        .map_err(|e| e.to_string())?;
    http_send(request, Duration::from_secs(20)).await
}
