//! `trellis up`: a whole lattice on one machine.
//!
//! Starts `nats-server` with JetStream on a free loopback port and a temporary store (unless a NATS
//! URL is given), a controller, a host and providers, as child processes in their own process
//! group so that a Ctrl-C in the terminal reaches only `trellis up`. On Ctrl-C (SIGINT) or SIGTERM
//! (`kill`, systemd, `docker stop`) it stops them in order: the providers, the host (it drains and
//! publishes `host.stopped`), the controller, then NATS. Each child is tied to `trellis up` by a
//! parent-death signal ([`trellis_bus::spawn_tied`]), so that even when `trellis up` itself is
//! killed (`SIGKILL`), nothing it started outlives it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use clap::Args;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use trellis_schemas::control::{
    HostListRequest, InstanceListRequest, InstanceStartRequest, ProviderListRequest,
};
use trellis_schemas::{
    HostId, InstanceRecord, InstanceStatus, Lattice, ProviderName, ProviderStatus, RestartPolicy,
};

use crate::cli::Failure;
use crate::client::CtlClient;
use crate::output::Table;
use crate::workload::{call_export, push_component};
use trellis_bus::shutdown_signal;

/// Options of `trellis up`.
#[derive(Debug, Args)]
pub struct UpArgs {
    /// The nats-server binary to launch when no --nats URL is given.
    #[arg(long, env = "TRELLIS_NATS_SERVER", default_value = "nats-server")]
    nats_server: PathBuf,
    /// The trellis-host binary [default: next to this binary, else on PATH].
    #[arg(long, env = "TRELLIS_HOST_BIN")]
    host_bin: Option<PathBuf>,
    /// A label for the host, `key=value`; repeat for more.
    #[arg(long = "host-label", value_parser = parse_label)]
    host_labels: Vec<(String, String)>,
    /// The host's id [default: a fresh ULID].
    #[arg(long)]
    host_id: Option<HostId>,
    /// Keep NATS data and logs here instead of in a temporary directory removed on exit.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Declare the host lost after this long without a heartbeat.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    host_timeout: Duration,
    /// Once the lattice is up, push this component and start one instance of it (restart policy
    /// `always`).
    #[arg(long, value_name = "WASM")]
    deploy: Option<PathBuf>,
    /// The deployed component's `Component.toml` [default: next to the `.wasm`].
    #[arg(long, requires = "deploy")]
    deploy_manifest: Option<PathBuf>,
    /// After deploying, call this export with these arguments and show the answer
    /// (`"greet Trellis"`).
    #[arg(long, requires = "deploy", value_name = "EXPORT [ARG]...")]
    call: Option<String>,
    /// Grant the deployed component's instance a capability, as `trellis instance start
    /// --grant` does (`'wasi:keyvalue bucket=counts'`); repeat for more.
    #[arg(long = "grant", requires = "deploy", value_parser = crate::capabilities::parse_grant)]
    grants: Vec<trellis_schemas::control::Grant>,
    /// Providers to run, comma separated [default: every `trellis-provider-*` next to this
    /// binary among kv, http-server, http-client and messaging]; `none` for none.
    #[arg(long, value_delimiter = ',')]
    providers: Option<Vec<String>>,
    /// Serve the web dashboard (`trellis ui`) here; `off` for none. When the address is taken,
    /// the lattice starts without it.
    #[arg(long, env = "TRELLIS_UI_ADDR", default_value = "127.0.0.1:7700", value_parser = parse_ui)]
    // Spelled out so that clap does not treat it as an optional argument: `off` parses to None.
    ui: ::std::option::Option<std::net::SocketAddr>,
    /// Run the lattice secured: credentials for every role (as `trellis creds` makes them, in
    /// `<data dir>/creds`) and a nats-server that enforces them, so that each process may use
    /// only its own subjects. Needs the nats-server `trellis up` starts (no --nats).
    #[arg(long)]
    secure: bool,
}

fn parse_ui(s: &str) -> Result<Option<std::net::SocketAddr>, String> {
    if s == "off" {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|e| format!("{s:?} is neither an address (127.0.0.1:7700) nor `off`: {e}"))
}

/// The providers `trellis up` runs when it finds them.
const PROVIDERS: &[&str] = &["kv", "http-server", "http-client", "messaging"];

/// The providers to run, with their executables.
fn providers_to_run(args: &UpArgs) -> Result<Vec<(String, PathBuf)>, Failure> {
    let names: Vec<String> = match &args.providers {
        Some(list) if list.iter().any(|n| n == "none") => return Ok(Vec::new()),
        Some(list) => list.clone(),
        None => PROVIDERS.iter().map(|s| (*s).to_owned()).collect(),
    };
    let mut out = Vec::new();
    for name in names {
        let path = sibling_binary(&format!("trellis-provider-{name}"));
        if path.exists() {
            out.push((name, path));
        } else if args.providers.is_some() {
            return Err(fail(format!(
                "no trellis-provider-{name} next to {}; build it with `cargo build -p trellis-provider-{name}`",
                std::env::current_exe()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            )));
        }
    }
    Ok(out)
}

/// The address an HTTP grant listens on, as a URL a browser on this machine can open.
fn http_url(grants: &[trellis_schemas::control::Grant]) -> Option<String> {
    grants
        .iter()
        .find(|g| g.capability == trellis_schemas::Capability::HttpIncoming)
        .and_then(|g| g.config.get("address"))
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .map(|mut a| {
            if a.ip().is_unspecified() {
                a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            format!("http://{a}/")
        })
}

/// What one `GET` answered: the status line and the start of the body, or why it failed.
type HttpProbe = Result<(String, String), String>;

/// One `GET`; returns the status line and the body (first 200 characters).
async fn http_get(url: &str, timeout: Duration) -> HttpProbe {
    use http_body_util::BodyExt as _;
    let uri: hyper::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<http_body_util::Empty<bytes::Bytes>>();
    let get = async {
        let response = client
            .get(uri)
            .await
            .map_err(|e| trellis_bus::error_chain(&e))?;
        let status = format!("{:?} {}", response.version(), response.status());
        // Enough of the body to show; the rest is not read.
        let mut body = response.into_body();
        let mut start = Vec::new();
        while start.len() < 1024 {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        start.extend_from_slice(data);
                    }
                }
                Some(Err(e)) => return Err(trellis_bus::error_chain(&e)),
                None => break,
            }
        }
        let text = String::from_utf8_lossy(&start);
        Ok::<_, String>((status, text.chars().take(200).collect()))
    };
    tokio::time::timeout(timeout, get)
        .await
        .map_err(|_| format!("no answer within {timeout:?}"))?
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("label {s:?} is not key=value")),
    }
}

/// The names under which `trellis up` lists the providers it starts (`provider` for any other).
const PROVIDER_LABELS: [&str; 5] = ["kv", "http-server", "http-client", "messaging", "provider"];

struct Proc {
    name: &'static str,
    child: Child,
    log: PathBuf,
}

impl Proc {
    /// Starts `program`, its output in `logs/<name>.log`, in its own process group (a Ctrl-C in
    /// the terminal reaches only `trellis up`), and tied to `trellis up`: it gets `SIGTERM` when
    /// `trellis up` dies without stopping it, even by `SIGKILL`.
    async fn spawn(
        name: &'static str,
        program: &Path,
        args: &[String],
        logs: &Path,
        env: &[(&str, String)],
    ) -> Result<Self, Failure> {
        let log = logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)
            .map_err(|e| fail(format!("cannot create {}: {e}", log.display())))?;
        let err_file = file
            .try_clone()
            .map_err(|e| fail(format!("cannot open {}: {e}", log.display())))?;
        let mut command = Command::new(program);
        command
            .args(args)
            .envs(trellis_bus::connect_env())
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err_file)
            .process_group(0)
            .kill_on_drop(true);
        let child = trellis_bus::spawn_tied(command)
            .await
            .map_err(|e| fail(format!("cannot start {name} ({}): {e}", program.display())))?;
        Ok(Self { name, child, log })
    }

    fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// SIGTERM (SIGINT for nats-server, which exits 0 on it), then SIGKILL after `grace`.
    async fn stop(mut self, grace: Duration) {
        let signal = if self.name == "nats" {
            Signal::SIGINT
        } else {
            Signal::SIGTERM
        };
        if let Some(pid) = self.child.id() {
            let _ = kill(Pid::from_raw(pid as i32), signal);
        }
        match tokio::time::timeout(grace, self.child.wait()).await {
            Ok(Ok(status)) => println!("  {:<11} stopped ({status})", self.name),
            _ => {
                let _ = self.child.kill().await;
                println!("  {:<11} killed after {grace:?}", self.name);
            }
        }
    }
}

/// The credentials of a secured `trellis up`.
struct Secured {
    /// The directory `trellis creds` wrote.
    dir: PathBuf,
    /// The nats-server configuration in it.
    config: PathBuf,
    /// Who is who, for the controller's audit events.
    users: PathBuf,
}

impl Secured {
    /// The key file of a user (`controller`, `host-<id>`, `operator`, …).
    fn key(&self, user: &str) -> PathBuf {
        self.dir.join(format!("{user}.nk"))
    }
}

/// The inbox prefix of the user whose seed is in `key` (see
/// [`trellis_schemas::roles::inbox_prefix`]), or the default one if it cannot be read.
fn operator_inbox(key: &Path) -> String {
    std::fs::read_to_string(key)
        .ok()
        .and_then(|seed| nkeys::KeyPair::from_seed(seed.trim()).ok())
        .map_or_else(
            || "_INBOX".to_owned(),
            |key| trellis_schemas::roles::inbox_prefix(&key.public_key()),
        )
}

fn fail(message: String) -> Failure {
    Failure { code: 1, message }
}

fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn free_port() -> Result<u16, Failure> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")
        .map_err(|e| fail(format!("cannot find a free port: {e}")))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| fail(format!("cannot find a free port: {e}")))
}

async fn wait_for_port(port: u16, nats: &mut Proc, timeout: Duration) -> Result<(), Failure> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok(());
        }
        if let Ok(Some(status)) = nats.child.try_wait() {
            return Err(fail(format!(
                "nats-server exited ({status}); see {}",
                nats.log.display()
            )));
        }
        if Instant::now() > deadline {
            return Err(fail(format!(
                "nats-server did not listen on port {port} within {timeout:?}; see {}",
                nats.log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// What `--deploy` started.
struct Deployed {
    name: String,
    version: String,
    instance: InstanceRecord,
    /// The `--call` made and its answer.
    answer: Option<(String, String)>,
    /// The URL it serves HTTP on, and what a first `GET` answered.
    http: Option<(String, HttpProbe)>,
}

/// Pushes the component, starts one instance, waits until it runs, and makes the `--call`.
async fn deploy(client: &CtlClient, wasm: &Path, args: &UpArgs) -> Result<Deployed, Failure> {
    let registered = push_component(client, wasm, args.deploy_manifest.clone(), None).await?;
    let manifest = registered.component.manifest;
    let start = InstanceStartRequest {
        component: format!("{}@{}", manifest.name, manifest.version),
        count: 1,
        host_id: None,
        labels: Default::default(),
        restart: RestartPolicy::Always,
        min_seq: Some(registered.seq),
        grants: args.grants.clone(),
        isolation: None,
    };
    let placed = client.request(&start).await?;
    let id = placed
        .instances
        .first()
        .map(|p| p.instance_id.clone())
        .ok_or_else(|| fail("the controller placed no instance".into()))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let instance = loop {
        // The list answers from memory; `instance.get` would also read the fact history.
        let reply = client
            .request(&InstanceListRequest {
                component: Some(manifest.name.to_string()),
                ..Default::default()
            })
            .await;
        let instance = reply
            .ok()
            .and_then(|r| r.instances.into_iter().find(|i| i.instance_id == id));
        match instance {
            Some(i) if i.status == InstanceStatus::Running => break i,
            Some(i) if i.status == InstanceStatus::Failed => {
                return Err(fail(format!(
                    "{} did not start: {}",
                    manifest.name,
                    i.last_reason.unwrap_or_default()
                )));
            }
            _ if Instant::now() > deadline => {
                return Err(fail(format!("{} did not start within 60s", manifest.name)));
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let answer = match &args.call {
        Some(call) => {
            let mut words = call.split_whitespace().map(str::to_owned);
            let export = words
                .next()
                .ok_or_else(|| fail("--call needs an export".into()))?;
            let call_args: Vec<String> = words.collect();
            let result = call_export(
                client.nats(),
                client.lattice(),
                manifest.name.as_str(),
                &export,
                &call_args,
                Duration::from_secs(10),
            )
            .await?;
            Some((call.clone(), result))
        }
        None => None,
    };
    let http = match http_url(&args.grants) {
        Some(url) => {
            // The http-server provider binds once it has seen the grant: retry briefly.
            let deadline = Instant::now() + Duration::from_secs(10);
            let got = loop {
                let got = http_get(&url, Duration::from_secs(5)).await;
                if got.is_ok() || Instant::now() > deadline {
                    break got;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            };
            Some((url, got))
        }
        None => None,
    };
    Ok(Deployed {
        name: manifest.name.to_string(),
        version: manifest.version,
        instance,
        answer,
        http,
    })
}

/// Runs `trellis up` until Ctrl-C or SIGTERM, then stops what it started in reverse order:
/// providers, host, controller, NATS.
pub async fn run(lattice: &Lattice, nats_url: Option<String>, args: UpArgs) -> Result<(), Failure> {
    // Refused before anything starts, rather than by the host once the lattice is half up.
    trellis_schemas::manifest::key_values("the label", args.host_labels.iter().cloned())
        .map_err(|e| crate::cli::failure(2, e))?;
    let temp = match &args.data_dir {
        Some(_) => None,
        None => Some(
            tempfile::Builder::new()
                .prefix("trellis-up-")
                .tempdir()
                .map_err(|e| fail(format!("cannot create a temporary directory: {e}")))?,
        ),
    };
    let dir = match (&args.data_dir, &temp) {
        (Some(dir), _) => dir.clone(),
        (None, Some(t)) => t.path().to_owned(),
        (None, None) => return Err(fail("no data directory".into())),
    };
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)
        .map_err(|e| fail(format!("cannot create {}: {e}", logs.display())))?;

    let mut procs: Vec<Proc> = Vec::new();
    // Listen for SIGTERM and SIGINT from the start, so that a stop asked for while the lattice is
    // still coming up also stops what has been started, in order.
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    let result = tokio::select! {
        biased;
        reason = &mut shutdown => {
            println!("{reason}");
            Ok(())
        }
        result = start_and_wait(lattice, nats_url, &args, &dir, &logs, &mut procs) => result,
    };
    println!("stopping");
    // Last started, first stopped: the providers, then the host (it drains and records
    // host.stopped while NATS is still there), the controller, NATS.
    while let Some(p) = procs.pop() {
        p.stop(Duration::from_secs(10)).await;
    }
    drop(temp);
    result
}

async fn start_and_wait(
    lattice: &Lattice,
    nats_url: Option<String>,
    args: &UpArgs,
    dir: &Path,
    logs: &Path,
    procs: &mut Vec<Proc>,
) -> Result<(), Failure> {
    let host_id = args.host_id.clone().unwrap_or_else(HostId::generate);
    let providers = providers_to_run(args)?;
    let creds = if args.secure {
        if nats_url.is_some() {
            return Err(Failure {
                code: 2,
                message: "--secure configures the nats-server `trellis up` starts; without --nats, or secure your own server with `trellis creds`".into(),
            });
        }
        // Keys for the default providers (a host may be asked to start any of them) and for
        // any other provider named here.
        let names: Vec<ProviderName> = crate::creds::DEFAULT_PROVIDERS
            .iter()
            .copied()
            .chain(providers.iter().map(|(name, _)| name.as_str()))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|n| ProviderName::new(n).map_err(|e| fail(e.to_string())))
            .collect::<Result<_, _>>()?;
        let written = crate::creds::write(
            &dir.join("creds"),
            lattice,
            std::slice::from_ref(&host_id),
            &names,
            // The server `trellis up` starts has no JetStream domain.
            None,
        )
        .map_err(fail)?;
        Some(Secured {
            dir: dir.join("creds"),
            config: written.config,
            users: written.users_file,
        })
    } else {
        None
    };
    // `--creds <file of role>` in secure mode, nothing otherwise.
    let creds_of = |role: &str| -> Vec<String> {
        match &creds {
            Some(c) => vec!["--creds".into(), c.key(role).display().to_string()],
            None => Vec::new(),
        }
    };
    let (url, store) = match nats_url {
        Some(url) => (url, None),
        None => {
            let port = free_port()?;
            let store = dir.join("jetstream");
            let mut nats_args: Vec<String> = vec![
                "-a".into(),
                "127.0.0.1".into(),
                "-p".into(),
                port.to_string(),
                "-js".into(),
                "-sd".into(),
                store.display().to_string(),
            ];
            if let Some(creds) = &creds {
                nats_args.push("-c".into());
                nats_args.push(creds.config.display().to_string());
            }
            let nats = Proc::spawn("nats", &args.nats_server, &nats_args, logs, &[])
                .await
                .map_err(|f| {
                    fail(format!(
                        "{}; run scripts/up, which installs the nats-server Trellis pins, or pass --nats-server PATH or --nats <url>",
                        f.message
                    ))
                })?;
            // Kept from here on, so that a stop while it starts stops it too.
            procs.push(nats);
            if let Some(nats) = procs.last_mut() {
                wait_for_port(port, nats, Duration::from_secs(10)).await?;
            }
            (format!("nats://127.0.0.1:{port}"), Some(store))
        }
    };

    let me = std::env::current_exe().map_err(|e| fail(format!("cannot find own binary: {e}")))?;
    let mut controller_args = creds_of("controller");
    controller_args.extend([
        "--nats".into(),
        url.clone(),
        "--lattice".into(),
        lattice.to_string(),
        "controller".into(),
        "--host-timeout".into(),
        humantime::format_duration(args.host_timeout).to_string(),
    ]);
    if let Some(c) = &creds {
        controller_args.push("--users".into());
        controller_args.push(c.users.display().to_string());
        controller_args.push("--system-creds".into());
        controller_args.push(c.key(crate::creds::SYSTEM_USER).display().to_string());
    }
    procs.push(Proc::spawn("controller", &me, &controller_args, logs, &[]).await?);
    if let Some(c) = &creds {
        // Its own control requests are signed as the operator's, as it connects.
        trellis_bus::audit::sign_as(&c.key("operator"));
    }
    let client_creds = creds.as_ref().map(|c| trellis_bus::ConnectArgs {
        creds: Some(c.key("operator")),
        ..trellis_bus::connect_args().clone()
    });
    let connect = |name: &'static str| {
        let url = url.clone();
        let args = client_creds
            .clone()
            .unwrap_or_else(|| trellis_bus::connect_args().clone());
        async move { trellis_bus::connect_with(&url, name, true, &args).await }
    };
    if creds.is_some() {
        // Only the controller may create the lattice's streams: the others start once it has.
        let nats = connect("trellis up").await?;
        let js = trellis_bus::jetstream(nats);
        let deadline = Instant::now() + Duration::from_secs(30);
        while trellis_bus::events_stream_state(&js, lattice)
            .await
            .is_err()
        {
            if Instant::now() > deadline {
                return Err(fail(format!(
                    "the controller did not set up the lattice's streams within 30s; logs are in {}",
                    logs.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    let mut host_args = creds_of(&format!("host-{host_id}"));
    host_args.extend([
        "--nats".into(),
        url.clone(),
        "--lattice".into(),
        lattice.to_string(),
        "--host-id".into(),
        host_id.to_string(),
    ]);
    if let Some(c) = &creds {
        host_args.push("--provider-creds".into());
        host_args.push(c.dir.display().to_string());
    }
    for (k, v) in &args.host_labels {
        host_args.push("--label".into());
        host_args.push(format!("{k}={v}"));
    }
    let host_bin = args
        .host_bin
        .clone()
        .unwrap_or_else(|| sibling_binary("trellis-host"));
    procs.push(Proc::spawn("host", &host_bin, &host_args, logs, &[]).await?);
    for (name, path) in &providers {
        let mut provider_args = creds_of(&format!("provider-{name}"));
        provider_args.extend([
            "--nats".into(),
            url.clone(),
            "--lattice".into(),
            lattice.to_string(),
        ]);
        let app = creds
            .as_ref()
            .filter(|_| name == "messaging")
            .map(|c| c.key("app").display().to_string());
        let env: Vec<(&str, String)> = app
            .into_iter()
            .map(|a| (trellis_bus::ENV_APP_CREDS, a))
            .collect();
        let label = PROVIDER_LABELS
            .iter()
            .copied()
            .find(|l| *l == name.as_str())
            .unwrap_or("provider");
        procs.push(Proc::spawn(label, path, &provider_args, logs, &env).await?);
    }
    let mut dashboard = None;
    if let Some(addr) = args.ui {
        // Bind once here so that a taken port is a warning, not a child that dies at once.
        match std::net::TcpListener::bind(addr) {
            Ok(probe) => {
                drop(probe);
                let mut ui_args = creds_of("viewer");
                ui_args.extend([
                    "--nats".into(),
                    url.clone(),
                    "--lattice".into(),
                    lattice.to_string(),
                    "ui".into(),
                    "--listen".into(),
                    addr.to_string(),
                ]);
                procs.push(Proc::spawn("ui", &me, &ui_args, logs, &[]).await?);
                dashboard = Some(format!("http://{addr}/"));
            }
            Err(e) => eprintln!(
                "warning: no dashboard: cannot listen on {addr}: {e} (--ui ADDR picks another address)"
            ),
        }
    }

    // Wait until the controller answers and lists the host.
    let nats = connect("trellis up").await?;
    let client = CtlClient::new(nats, lattice.clone(), Duration::from_secs(2));
    let deadline = Instant::now() + Duration::from_secs(60);
    let hosts = loop {
        for p in procs.iter_mut() {
            if let Ok(Some(status)) = p.child.try_wait() {
                return Err(fail(format!(
                    "{} exited ({status}); see {}",
                    p.name,
                    p.log.display()
                )));
            }
        }
        let providers_up = client
            .request(&ProviderListRequest::default())
            .await
            .map(|r| {
                r.providers
                    .iter()
                    .filter(|p| p.status == ProviderStatus::Running)
                    .count()
            })
            .unwrap_or(0);
        if let Ok(reply) = client.request(&HostListRequest::default()).await
            && reply.hosts.iter().any(|h| h.host_id == host_id)
            && providers_up >= providers.len()
        {
            break reply.hosts;
        }
        if Instant::now() > deadline {
            return Err(fail(format!(
                "the lattice did not come up within 60s; logs are in {}",
                logs.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let deployed = match &args.deploy {
        Some(wasm) => Some(deploy(&client, wasm, args).await?),
        None => None,
    };

    println!("Trellis lattice \"{lattice}\" is up.");
    println!();
    match &store {
        Some(store) => println!("  nats        {url}  (JetStream store {})", store.display()),
        None => println!("  nats        {url}"),
    }
    for p in procs.iter() {
        println!(
            "  {:<11} pid {:<8} log {}",
            p.name,
            p.pid(),
            p.log.display()
        );
    }
    println!();
    let mut table = Table::new(&["HOST", "STATUS", "VERSION"]);
    for h in &hosts {
        table.row(vec![
            h.host_id.to_string(),
            h.status.as_str().to_owned(),
            h.version.clone(),
        ]);
    }
    print!("{}", table.render());
    if let Some(d) = &deployed {
        println!();
        println!(
            "  component   {}@{} instance {} on {}",
            d.name, d.version, d.instance.instance_id, d.instance.host_id
        );
        if let Some((call, answer)) = &d.answer {
            println!("  call        {}.{call} → {answer}", d.name);
        }
        if let Some((url, got)) = &d.http {
            println!("  url         {url}");
            match got {
                Ok((status, body)) => {
                    println!("  GET {url} → {status}: {}", body.trim_end())
                }
                Err(e) => println!("  GET {url} failed: {e}"),
            }
        }
    }
    if let Some(dashboard) = &dashboard {
        println!("  dashboard   {dashboard}");
    }
    println!();
    if let Some(c) = &creds {
        println!(
            "  secured     every process has its own credentials in {} (nats-server config {})",
            c.dir.display(),
            c.config.display()
        );
        println!();
    }
    // The CLI hints log in as the operator in a secured lattice.
    let url = match &creds {
        Some(c) => format!("{url} --creds {}", c.key("operator").display()),
        None => url,
    };
    let plain_url = url.split(' ').next().unwrap_or_default().to_owned();
    println!("Try:");
    println!("  trellis --nats {url} host ls");
    if let Some(d) = &deployed {
        println!("  trellis --nats {url} instance ls");
        if let Some((call, _)) = &d.answer {
            println!("  trellis --nats {url} call {} {call}", d.name);
        }
    }
    if let Some((http, _)) = deployed.as_ref().and_then(|d| d.http.as_ref()) {
        println!("  curl {http}");
    }
    println!("  trellis --nats {url} provider ls");
    println!("  trellis --nats {url} assignment ls");
    println!("  trellis --nats {url} events --follow");
    println!("  trellis --nats {url} audit --follow");
    if let Some(d) = &deployed {
        println!("  trellis --nats {url} logs {} --follow", d.name);
    }
    match &creds {
        // A user may read replies only under its own inbox prefix (`_INBOX.<public key>`).
        Some(c) => println!(
            "  nats --server {plain_url} --nkey {} --inbox-prefix {} req trellis.ctl.v1.{lattice}.lattice.status '{{}}'",
            c.key("operator").display(),
            operator_inbox(&c.key("operator"))
        ),
        None => println!(
            "  nats --server {plain_url} req trellis.ctl.v1.{lattice}.lattice.status '{{}}'"
        ),
    }
    println!();
    println!("TRELLIS_NATS_URL={plain_url}");
    if let Some(c) = &creds {
        println!("TRELLIS_CREDS={}", c.key("operator").display());
    }
    println!("Press Ctrl-C to stop.");

    // Run until asked to stop, or until a child dies unexpectedly. A provider stopped on
    // request (`trellis provider stop`) drains and exits 0: the rest runs on without it.
    let watch = async {
        let mut gone = vec![false; procs.len()];
        loop {
            for (p, gone) in procs.iter_mut().zip(gone.iter_mut()) {
                if *gone {
                    continue;
                }
                if let Ok(Some(status)) = p.child.try_wait() {
                    if status.success() && PROVIDER_LABELS.contains(&p.name) {
                        println!(
                            "  {:<11} stopped on request ({status}); the rest keeps running",
                            p.name
                        );
                        *gone = true;
                        continue;
                    }
                    return fail(format!(
                        "{} exited ({status}); see {}",
                        p.name,
                        p.log.display()
                    ));
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    Err(watch.await)
}
