//! The `trellis` command line.
//!
//! Exit codes: 0 success; 1 the request failed (the error says why); 2 bad usage; 3 not found;
//! 4 the lattice cannot be reached (no NATS, or no controller answering).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::{Args, Parser, Subcommand, ValueEnum};
use trellis_bus::{FactStream, StartAt};
use trellis_schemas::control::{
    HostGetRequest, HostListRequest, HostView, StatusReply, StatusRequest,
};
use trellis_schemas::{ErrorCode, Event, FactKind, HostId, HostStatus, Lattice, subject};

use crate::client::{ClientError, CtlClient};
use crate::controller::ControllerConfig;
use crate::output::Table;

/// Trellis: a NATS-native, event-sourced WebAssembly lattice.
#[derive(Debug, Parser)]
#[command(name = "trellis", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Args)]
pub(crate) struct Global {
    /// NATS server URL(s), comma separated [default: nats://127.0.0.1:4222; `trellis up` starts
    /// its own server when none is given].
    #[arg(long, global = true, env = "TRELLIS_NATS_URL")]
    pub(crate) nats: Option<String>,
    /// The lattice.
    #[arg(
        long,
        global = true,
        env = "TRELLIS_LATTICE",
        default_value = "default"
    )]
    pub(crate) lattice: Lattice,
    /// Output format.
    #[arg(long, short = 'o', global = true, value_enum, default_value_t = Output::Table)]
    pub(crate) output: Output,
    /// How long to wait for a reply.
    #[arg(long, global = true, default_value = "5s", value_parser = humantime::parse_duration)]
    pub(crate) timeout: Duration,
    /// The JetStream domain of the lattice's streams, when connecting through a NATS leaf node
    /// without JetStream of its own.
    #[arg(long, global = true, env = trellis_bus::ENV_JS_DOMAIN, value_parser = trellis_bus::parse_jetstream_domain)]
    pub(crate) js_domain: Option<String>,
    #[command(flatten)]
    pub(crate) connect: trellis_bus::ConnectArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum Output {
    /// Aligned tables for people.
    Table,
    /// JSON for scripts.
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a controller replica.
    Controller(ControllerArgs),
    /// Hosts of the lattice.
    #[command(subcommand)]
    Host(HostCommand),
    /// The lattice's health on one screen: hosts, instances and providers by status, rollouts
    /// in progress, failures in the last hour, and how far the controller is behind the facts.
    Status,
    /// Print facts from the lattice's stream.
    Events(EventsArgs),
    /// Components in the artifact store.
    #[command(subcommand)]
    Component(crate::workload::ComponentCommand),
    /// Instances of components.
    #[command(subcommand)]
    Instance(crate::workload::InstanceCommand),
    /// Rollouts: replace a component's running version while it serves (rolling, blue-green,
    /// canary), promote, abort, undo.
    #[command(subcommand)]
    Rollout(crate::rollout::RolloutCommand),
    /// Call an export of a component (any instance) or of one instance.
    Call(crate::workload::CallArgs),
    /// Show what a component's instances write (stdout, stderr, `wasi:logging`); `-f` follows.
    Logs(crate::logs::LogsArgs),
    /// Capability assignments: what each instance or component may do, and through which provider.
    #[command(subcommand)]
    Assignment(crate::capabilities::AssignmentCommand),
    /// Links: a component's own import served by another component.
    #[command(subcommand)]
    Link(crate::links::LinkCommand),
    /// Capability provider processes.
    #[command(subcommand)]
    Provider(crate::capabilities::ProviderCommand),
    /// Start a whole lattice on this machine: NATS (unless --nats is given), a controller and a host.
    Up(crate::up::UpArgs),
    /// Serve a read-only web dashboard of the lattice: hosts, instances, providers,
    /// assignments, rollouts, a live feed of facts and a chart of invocations.
    Ui(crate::ui::UiArgs),
    /// Issuer keys that sign components.
    #[command(subcommand)]
    Key(KeyCommand),
    /// Print audit events: control requests with their caller and outcome, grants, revokes
    /// and refused calls.
    Audit(crate::audit::AuditArgs),
    /// Make the credentials of a secured lattice: a user key per role (controller, each host,
    /// each provider, operator, viewer, app, admin), a system-account user for the controller's
    /// `--system-creds`, and the nats-server configuration that gives each role only its own
    /// subjects (and its own reply inbox; with `--js-domain`, in that JetStream domain).
    Creds(crate::creds::CredsArgs),
}

#[derive(Debug, Args)]
struct ControllerArgs {
    /// Declare a host lost after this long without a heartbeat.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    host_timeout: Duration,
    /// This replica's id (default: a fresh ULID).
    #[arg(long, env = "TRELLIS_REPLICA_ID")]
    replica_id: Option<String>,
    /// Replicas of the lattice's streams (created or updated to this count; 1..=5). Default: 3
    /// when the NATS server belongs to a cluster of three or more servers, else 1.
    #[arg(long, env = "TRELLIS_REPLICAS", value_parser = clap::value_parser!(u8).range(1..=5))]
    replicas: Option<u8>,
    /// Serve Prometheus metrics on this address (`GET /metrics`), e.g. `127.0.0.1:9465`.
    #[arg(long, env = "TRELLIS_CONTROLLER_METRICS")]
    metrics: Option<std::net::SocketAddr>,
    /// Serve the web dashboard (as `trellis ui`) on this address too, e.g. `127.0.0.1:7700`.
    #[arg(long, env = "TRELLIS_CONTROLLER_UI")]
    ui: Option<std::net::SocketAddr>,
    /// The oldest audit event the audit stream keeps (`30d`, `12h`); never unbounded.
    #[arg(long, env = "TRELLIS_AUDIT_MAX_AGE", default_value = "30d", value_parser = humantime::parse_duration)]
    audit_max_age: Duration,
    /// The most the audit stream keeps (`1GiB`); the oldest events go first.
    #[arg(long, env = "TRELLIS_AUDIT_MAX_BYTES", default_value = "1GiB", value_parser = trellis_schemas::manifest::parse_size)]
    audit_max_bytes: u64,
    /// The users of a secured lattice (`users.json`, written by `trellis creds`), so that the
    /// audit stream names the caller of each control request by name and role.
    #[arg(long, env = "TRELLIS_USERS", value_name = "FILE")]
    users: Option<std::path::PathBuf>,
    /// Credentials of a user of the NATS server's system account (`system.nk` of `trellis
    /// creds`): the server's advisories of failed logins become audit events.
    #[arg(long, env = "TRELLIS_SYSTEM_CREDS", value_name = "FILE")]
    system_creds: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
enum HostCommand {
    /// List hosts.
    Ls {
        /// Only hosts with this status.
        #[arg(long, value_parser = parse_status)]
        status: Option<HostStatus>,
    },
    /// Show one host.
    Get {
        /// The host id.
        host_id: HostId,
    },
}

#[derive(Debug, Args)]
struct EventsArgs {
    /// Keep printing new facts as they are stored.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Only facts of this type (`host.started` or `dev.trellis.host.started.v1`).
    #[arg(long = "type", value_parser = parse_kind)]
    kind: Option<FactKind>,
    /// Only facts about this host.
    #[arg(long, conflicts_with = "kind")]
    host: Option<HostId>,
    /// Start at this stream sequence instead of the oldest fact kept.
    #[arg(long)]
    from_seq: Option<u64>,
}

fn parse_status(s: &str) -> Result<HostStatus, String> {
    match s {
        "up" => Ok(HostStatus::Up),
        "stopped" => Ok(HostStatus::Stopped),
        "lost" => Ok(HostStatus::Lost),
        _ => Err(format!("{s:?} is not a host status (up, stopped, lost)")),
    }
}

fn parse_kind(s: &str) -> Result<FactKind, String> {
    FactKind::parse(s).ok_or_else(|| {
        let known: Vec<String> = FactKind::ALL.iter().map(|k| k.short_name()).collect();
        format!("unknown fact type {s:?}; known: {}", known.join(", "))
    })
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    /// The process exit code.
    pub code: i32,
    /// What to tell the user.
    pub message: String,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::Remote(body) if body.code == ErrorCode::NotFound => 3,
            ClientError::NoController(_) | ClientError::Timeout(_) => 4,
            ClientError::Denied(_) => 5,
            _ => 1,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

impl From<trellis_bus::ConnectError> for Failure {
    fn from(e: trellis_bus::ConnectError) -> Self {
        Failure {
            code: 4,
            message: e.to_string(),
        }
    }
}

pub(crate) fn failure(code: i32, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

/// Parses the command line, runs it and exits with its code.
pub fn main() -> ! {
    let cli = Cli::parse();
    let verbose_default = match cli.command {
        Command::Controller(_) => "info,async_nats=warn",
        _ => "warn,async_nats=error",
    };
    trellis_bus::init_logging(verbose_default);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let (service, root) = match &cli.command {
        Command::Controller(_) => ("trellis-controller", None),
        command => ("trellis", Some(command_name(command))),
    };
    let telemetry = trellis_bus::telemetry::init(service);
    // A command is the root of its trace: its control requests carry the context on.
    let code = match runtime.block_on(async {
        match root {
            Some(name) => {
                let span = trellis_bus::telemetry::Span::start(
                    trellis_bus::telemetry::Kind::Client,
                    None,
                    || name,
                );
                let traceparent = span.traceparent().map(str::to_owned);
                trellis_bus::telemetry::in_trace(traceparent, run(cli)).await
            }
            None => run(cli).await,
        }
    }) {
        Ok(()) => 0,
        Err(f) => {
            eprintln!("error: {}", f.message);
            f.code
        }
    };
    runtime.shutdown_timeout(Duration::from_millis(200));
    drop(telemetry);
    std::process::exit(code)
}

/// The span name of a command: `trellis <command>`.
fn command_name(command: &Command) -> String {
    let name = match command {
        Command::Controller(_) => "controller",
        Command::Host(_) => "host",
        Command::Status => "status",
        Command::Events(_) => "events",
        Command::Component(_) => "component",
        Command::Instance(_) => "instance",
        Command::Rollout(_) => "rollout",
        Command::Call(_) => "call",
        Command::Logs(_) => "logs",
        Command::Assignment(_) => "assignment",
        Command::Link(_) => "link",
        Command::Provider(_) => "provider",
        Command::Up(_) => "up",
        Command::Ui(_) => "ui",
        Command::Key(_) => "key",
        Command::Creds(_) => "creds",
        Command::Audit(_) => "audit",
    };
    format!("trellis {name}")
}

/// Runs a parsed command line.
pub async fn run(cli: Cli) -> Result<(), Failure> {
    let g = cli.global;
    trellis_bus::set_jetstream_domain(g.js_domain.clone());
    g.connect.check().map_err(|e| failure(2, e))?;
    trellis_bus::set_connect_args(g.connect.clone());
    match cli.command {
        Command::Controller(args) => {
            // First, so that a stop asked for while the controller starts drains it once up.
            let shutdown = trellis_bus::shutdown_signal();
            let mut config = ControllerConfig::new(g.url(), g.lattice.clone());
            config.host_timeout = args.host_timeout;
            config.streams.replicas = args.replicas.map(usize::from);
            config.metrics = args.metrics;
            config.audit = trellis_bus::audit::AuditRetention {
                max_age: args.audit_max_age,
                max_bytes: args.audit_max_bytes,
            };
            config.audit.check().map_err(|e| failure(2, e))?;
            if let Some(path) = &args.users {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| failure(2, format!("--users {}: {e}", path.display())))?;
                config.users = serde_json::from_str(&text).map_err(|e| {
                    failure(
                        2,
                        format!("--users {}: not a users file: {e}", path.display()),
                    )
                })?;
            }
            if let Some(id) = args.replica_id {
                config.replica_id = id;
            }
            if let Some(path) = args.system_creds {
                std::fs::metadata(&path)
                    .map_err(|e| failure(2, format!("--system-creds {}: {e}", path.display())))?;
                config.system_creds = Some(path);
            }
            let controller = async {
                crate::controller::run(config, async {
                    shutdown.await;
                })
                .await
                .map_err(|e| failure(1, e.to_string()))
            };
            match args.ui {
                None => controller.await,
                Some(listen) => {
                    let ui = crate::ui::serve(
                        &g,
                        listen,
                        Duration::from_secs(5),
                        "trellis controller ui",
                    )
                    .await?;
                    tokio::select! {
                        result = controller => result,
                        () = ui => Ok(()),
                    }
                }
            }
        }
        Command::Host(cmd) => {
            let client = ctl_client(&g).await?;
            host(&client, g.output, cmd).await
        }
        Command::Status => {
            let client = ctl_client(&g).await?;
            let status = client.request(&StatusRequest::default()).await?;
            if g.output == Output::Json {
                return print_json(&status);
            }
            print!("{}", status_screen(&status));
            Ok(())
        }
        Command::Events(args) => events(&g, args).await,
        Command::Component(cmd @ crate::workload::ComponentCommand::Init { .. }) => {
            crate::workload::init(cmd)
        }
        Command::Component(cmd) => {
            let client = ctl_client(&g).await?;
            crate::workload::component(&g, &client, cmd).await
        }
        Command::Instance(cmd) => {
            cmd.check()?;
            let client = ctl_client(&g).await?;
            crate::workload::instance(&g, &client, cmd).await
        }
        Command::Rollout(cmd) => {
            let client = ctl_client(&g).await?;
            crate::rollout::rollout(&g, &client, cmd).await
        }
        Command::Call(args) => {
            let nats = trellis_bus::connect(&g.url(), "trellis call", false).await?;
            crate::workload::call(&g, &nats, args).await
        }
        Command::Logs(args) => {
            let client = ctl_client(&g).await?;
            crate::logs::logs(&g, &client, args).await
        }
        Command::Assignment(cmd) => {
            cmd.check()?;
            let client = ctl_client(&g).await?;
            crate::capabilities::assignment(&g, &client, cmd).await
        }
        Command::Link(cmd) => {
            let client = ctl_client(&g).await?;
            crate::links::link(&g, &client, cmd).await
        }
        Command::Provider(cmd) => {
            cmd.check()?;
            let client = ctl_client(&g).await?;
            crate::capabilities::provider(&g, &client, cmd).await
        }
        Command::Up(args) => crate::up::run(&g.lattice, g.nats.clone(), args).await,
        Command::Ui(args) => crate::ui::run(&g, args).await,
        Command::Key(KeyCommand::New { out }) => key_new(&g, &out),
        Command::Creds(args) => creds(&g, args),
        Command::Audit(args) => crate::audit::audit(&g, args).await,
    }
}

fn creds(g: &Global, args: crate::creds::CredsArgs) -> Result<(), Failure> {
    let providers = crate::creds::providers_or_default(args.providers);
    let written = crate::creds::write(
        &args.dir,
        &g.lattice,
        &args.hosts,
        &providers,
        g.js_domain.as_deref(),
    )
    .map_err(|e| failure(1, e))?;
    if g.output == Output::Json {
        return print_json(&written);
    }
    let mut table = Table::new(&["USER", "ROLE", "CREDENTIALS"]);
    for user in &written.users {
        table.row(vec![
            user.name.clone(),
            user.role.to_owned(),
            user.creds.display().to_string(),
        ]);
    }
    print!("{}", table.render());
    println!(
        "server configuration {} (account {}): nats-server -js -c {}",
        written.config.display(),
        written.account,
        written.config.display()
    );
    println!(
        "then run each process with its own key, e.g. `trellis --creds {}/operator.nk status`; hosts also take --provider-creds {}",
        args.dir.display(),
        args.dir.display()
    );
    Ok(())
}

/// Where NATS is when no URL is given.
pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

impl Global {
    pub(crate) fn url(&self) -> String {
        self.nats
            .clone()
            .unwrap_or_else(|| DEFAULT_NATS_URL.to_owned())
    }
}

/// `trellis key …`
#[derive(Debug, Subcommand)]
enum KeyCommand {
    /// Make an issuer key: its seed goes to FILE (created, readable by you only; it must not
    /// exist), its public key is printed, for hosts' `--trust`.
    New {
        /// Where to write the seed.
        out: std::path::PathBuf,
    },
}

fn key_new(g: &Global, out: &std::path::Path) -> Result<(), Failure> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let (seed, issuer) = trellis_bus::signing::new_key().map_err(|e| failure(1, e))?;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(|e| failure(1, format!("cannot create {}: {e}", out.display())))?;
    file.write_all(format!("{seed}\n").as_bytes())
        .map_err(|e| failure(1, format!("cannot write {}: {e}", out.display())))?;
    if g.output == Output::Json {
        return print_json(&serde_json::json!({ "issuer": issuer, "seed_file": out }));
    }
    println!("issuer {issuer}");
    println!(
        "seed written to {} (keep it secret); sign with `trellis component push --sign {}`, trust with `trellis-host --trust {issuer}`",
        out.display(),
        out.display()
    );
    Ok(())
}

async fn ctl_client(g: &Global) -> Result<CtlClient, Failure> {
    let nats = trellis_bus::connect(&g.url(), "trellis cli", false).await?;
    Ok(CtlClient::new(nats, g.lattice.clone(), g.timeout))
}

pub(crate) fn print_json<T: serde::Serialize>(value: &T) -> Result<(), Failure> {
    let text = serde_json::to_string_pretty(value).map_err(|e| failure(1, e.to_string()))?;
    println!("{text}");
    Ok(())
}

/// `trellis status` for people: the lattice's health on one screen.
fn status_screen(s: &StatusReply) -> String {
    use std::fmt::Write as _;
    let counts = |m: &BTreeMap<String, u32>| {
        if m.is_empty() {
            "none".to_owned()
        } else {
            // Running first, then the rest by name.
            let mut parts: Vec<String> = m
                .get("running")
                .map(|n| format!("{n} running"))
                .into_iter()
                .collect();
            parts.extend(
                m.iter()
                    .filter(|(k, _)| *k != "running")
                    .map(|(k, n)| format!("{n} {}", k.replace('_', " "))),
            );
            parts.join(", ")
        }
    };
    let mut out = String::new();
    let _ = writeln!(out, "lattice      {}", s.lattice);
    let _ = writeln!(
        out,
        "hosts        {} up, {} stopped, {} lost",
        s.hosts.up, s.hosts.stopped, s.hosts.lost
    );
    let _ = writeln!(out, "instances    {}", counts(&s.instances));
    let _ = writeln!(out, "providers    {}", counts(&s.providers));
    let _ = writeln!(out, "components   {} stored", s.components);
    if s.rollouts.is_empty() {
        let _ = writeln!(out, "rollouts     none in progress");
    } else {
        let _ = writeln!(out, "rollouts     {} in progress", s.rollouts.len());
        for r in &s.rollouts {
            let weight = r
                .weight
                .map(|w| format!(", {w}% of traffic"))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {}  {} → {} ({}, {}{weight})",
                r.rollout_id,
                r.component,
                r.to,
                r.strategy,
                r.status.as_str()
            );
        }
    }
    if s.failures_last_hour == 0 {
        let _ = writeln!(out, "failures     none in the last hour");
    } else {
        let _ = writeln!(
            out,
            "failures     {} in the last hour",
            s.failures_last_hour
        );
        for f in &s.failures {
            let mut reason = f.reason.clone().unwrap_or_default();
            if reason.chars().count() > 80 {
                reason = reason.chars().take(79).collect::<String>() + "…";
            }
            let _ = writeln!(
                out,
                "  {}  {}  {} {}  {reason}",
                f.instance_id,
                f.component,
                f.status.as_str(),
                ago(f.since),
            );
        }
        if s.failures.len() < s.failures_last_hour as usize {
            let _ = writeln!(out, "  … `trellis instance ls` lists them all");
        }
    }
    let lag = if s.stream.lag == 0 {
        "up to date".to_owned()
    } else {
        format!("{} facts behind", s.stream.lag)
    };
    let _ = writeln!(
        out,
        "facts        {} kept in {} (sequences {}..={}); controller as of {}, {lag}",
        s.stream.messages, s.stream.name, s.stream.first_seq, s.stream.last_seq, s.as_of
    );
    let _ = writeln!(
        out,
        "controller   {} v{} since {} (replayed {} facts in {} ms)",
        s.controller.id,
        s.controller.version,
        ago(s.controller.started_at),
        s.controller.replayed_facts,
        s.controller.replay_ms
    );
    out
}

pub(crate) fn ago(t: DateTime<Utc>) -> String {
    let secs = (Utc::now() - t).num_seconds().max(0);
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

fn labels(labels: &BTreeMap<String, String>) -> String {
    let parts: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    if parts.is_empty() {
        "-".to_owned()
    } else {
        parts.join(",")
    }
}

async fn host(client: &CtlClient, output: Output, cmd: HostCommand) -> Result<(), Failure> {
    match cmd {
        HostCommand::Ls { status } => {
            // Page through the whole list; the JSON output is one reply with every host.
            let mut reply = client
                .request(&HostListRequest {
                    status,
                    ..Default::default()
                })
                .await?;
            while let Some(after) = reply.next_after.take() {
                let next = client
                    .request(&HostListRequest {
                        status,
                        after: Some(after),
                        ..Default::default()
                    })
                    .await?;
                reply.hosts.extend(next.hosts);
                reply.next_after = next.next_after;
            }
            if output == Output::Json {
                return print_json(&reply);
            }
            let mut table = Table::new(&[
                "HOST",
                "STATUS",
                "SINCE",
                "HEARTBEAT",
                "INSTANCES",
                "MICROVM",
                "VERSION",
                "LABELS",
            ]);
            for h in &reply.hosts {
                table.row(host_row(h));
            }
            print!("{}", table.render());
            if reply.hosts.is_empty() {
                println!("(no hosts; start one with `trellis-host --nats <url>`)");
            }
            Ok(())
        }
        HostCommand::Get { host_id } => {
            let reply = client
                .request(&HostGetRequest {
                    host_id,
                    min_seq: None,
                })
                .await?;
            if output == Output::Json {
                return print_json(&reply);
            }
            let h = &reply.host;
            println!("host         {}", h.host_id);
            println!(
                "status       {} since {}",
                h.status.as_str(),
                ago(h.status_since)
            );
            println!("started      {}", ago(h.started_at));
            println!(
                "heartbeat    {}",
                h.heartbeat_age_ms
                    .map(|ms| format!("{ms} ms ago"))
                    .unwrap_or_else(|| "none yet".into())
            );
            println!("version      {}", h.version);
            println!("labels       {}", labels(&h.labels));
            println!(
                "capacity     {} instances, {} MiB, {} cpus",
                h.capacity.max_instances,
                h.capacity.memory_bytes / (1024 * 1024),
                h.capacity.cpus
            );
            println!("microvm      {}", microvm(h));
            println!("instances    {}", h.instances);
            println!("as of        {}", reply.as_of);
            Ok(())
        }
    }
}

fn host_row(h: &HostView) -> Vec<String> {
    vec![
        h.host_id.to_string(),
        h.status.as_str().to_owned(),
        ago(h.status_since),
        h.heartbeat_age_ms
            .map(|ms| format!("{ms}ms ago"))
            .unwrap_or_else(|| "-".into()),
        h.instances.to_string(),
        microvm(h),
        h.version.clone(),
        labels(&h.labels),
    ]
}

/// Whether a host runs micro-VMs, for people: its acceleration (`kvm`, `tcg`) or `no`.
fn microvm(h: &HostView) -> String {
    h.capacity
        .microvm
        .map_or_else(|| "no".to_owned(), |a| a.to_string())
}

async fn events(g: &Global, args: EventsArgs) -> Result<(), Failure> {
    let filter = match (&args.kind, &args.host) {
        (Some(kind), _) => Some(subject::events_of_kind(&g.lattice, *kind)),
        (None, Some(host)) => Some(subject::events_of_host(&g.lattice, host)),
        (None, None) => None,
    };
    let mut table_header = g.output == Output::Table;
    read_stream(
        g,
        &subject::events_stream(&g.lattice),
        filter,
        args.follow,
        args.from_seq,
        |seq, payload| print_fact(g.output, seq, payload, &mut table_header),
    )
    .await
}

/// Prints the messages of one of the lattice's streams (`filter`ed), from `from_seq` or the
/// oldest kept, up to the tip as it is now, or on and on with `follow`.
pub(crate) async fn read_stream(
    g: &Global,
    stream: &str,
    filter: Option<String>,
    follow: bool,
    from_seq: Option<u64>,
    mut print: impl FnMut(u64, &[u8]) -> Result<(), Failure>,
) -> Result<(), Failure> {
    let nats = trellis_bus::connect(&g.url(), "trellis events", false).await?;
    let js = trellis_bus::jetstream(nats.clone());
    let state = stream_state(&js, stream).await.map_err(|e| {
        if e.starts_with("permission denied") {
            failure(5, e)
        } else {
            failure(
                4,
                format!(
                    "{e}; has a Trellis controller run on lattice {}?",
                    g.lattice
                ),
            )
        }
    })?;
    let tip = state.last_sequence;
    let start = from_seq
        .map(StartAt::Sequence)
        .unwrap_or(StartAt::Beginning);
    if !follow && (state.messages == 0 || from_seq.is_some_and(|s| s > tip)) {
        return Ok(());
    }
    let mut reader = FactStream::open(&nats, &js, stream, filter, start)
        .await
        .map_err(|e| failure(1, e.to_string()))?;
    // Without --follow, stop at the tip as it was when we started. A filtered reader may never see
    // the tip's message, so an idle period also ends it.
    loop {
        let next = if follow {
            reader.next().await
        } else {
            match tokio::time::timeout(Duration::from_secs(1), reader.next()).await {
                Ok(next) => next,
                Err(_) => return Ok(()),
            }
        };
        let Some(message) = next else { return Ok(()) };
        let raw = message.map_err(|e| failure(1, e.to_string()))?;
        print(raw.seq, &raw.payload)?;
        if !follow && (raw.seq >= tip || raw.pending == 0) {
            return Ok(());
        }
    }
}

/// The state of stream `name`; a refusal by NATS says so rather than timing out.
async fn stream_state(
    js: &async_nats::jetstream::Context,
    name: &str,
) -> Result<async_nats::jetstream::stream::State, String> {
    let mut refusals = trellis_bus::permission_violations();
    let api = format!("$JS.API.STREAM.INFO.{name}");
    let info = async {
        let stream = js.get_stream(name).await.map_err(|e| e.to_string())?;
        Ok::<_, String>(stream.cached_info().state.clone())
    };
    tokio::select! {
        state = info => state.map_err(|e| format!("JetStream stream {name}: {e}")),
        refused = trellis_bus::refused(&mut refusals, &api) => {
            Err(format!("permission denied: {refused}"))
        }
    }
}

fn print_fact(output: Output, seq: u64, payload: &[u8], header: &mut bool) -> Result<(), Failure> {
    if output == Output::Json {
        let event: serde_json::Value = serde_json::from_slice(payload)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(payload).into()));
        let line = serde_json::json!({ "seq": seq, "event": event });
        println!("{line}");
        return Ok(());
    }
    if std::mem::take(header) {
        println!(
            "{:<8} {:<24} {:<28} {:<28} DETAILS",
            "SEQ", "TIME", "TYPE", "SUBJECT"
        );
    }
    match Event::decode(payload) {
        Ok(event) => println!(
            "{:<8} {:<24} {:<28} {:<28} {}",
            seq,
            event.time_rfc3339(),
            event.kind().short_name(),
            event.data.entity_id(),
            event.summary()
        ),
        Err(e) => println!("{seq:<8} (undecodable fact: {e})"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    /// Clap checks a command's arguments only when it is parsed: check every subcommand here
    /// (a flag named twice, such as a `--version` beside the automatic one, panics at run time).
    #[test]
    fn every_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
