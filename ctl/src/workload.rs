//! CLI commands for components, instances and calls.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use futures::StreamExt;
use trellis_bus::dataplane::{self as codec, SendError};
use trellis_schemas::control::{
    ComponentListRequest, ComponentRegisterReply, ComponentRegisterRequest, InstanceGetRequest,
    InstanceListRequest, InstanceStartRequest, InstanceStopRequest,
};
use trellis_schemas::dataplane::{self, Op};
use trellis_schemas::isolation::Isolation;
use trellis_schemas::{
    ComponentName, Event, FactData, HostId, InstanceId, InstanceRecord, Lattice, Manifest,
    RestartPolicy, subject,
};

use crate::cli::{Failure, Global, Output, ago, failure, print_json};
use crate::client::CtlClient;
use crate::output::{PROGRESS_TICK, Progress, Table};

/// `trellis component …`
#[derive(Debug, Subcommand)]
pub enum ComponentCommand {
    /// Store a component in the lattice's artifact store and record it.
    Push {
        /// The `.wasm` file.
        wasm: PathBuf,
        /// Its `Component.toml` [default: `Component.toml` next to the `.wasm`, else in the current directory].
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Sign the digest and the manifest with this issuer key (a seed file from
        /// `trellis key new`); hosts started with `--trust <issuer>` run only what it signed.
        /// Pushing a stored component again signed (or signed by another key) re-signs it.
        #[arg(long, value_name = "KEY_FILE")]
        sign: Option<PathBuf>,
    },
    /// List stored components.
    Ls,
    /// Write a `Component.toml` for a `.wasm` from what it imports and exports: its imports
    /// declared, the capabilities it needs required, limits to adjust.
    #[command(disable_version_flag = true)]
    Init {
        /// The `.wasm` file.
        wasm: PathBuf,
        /// The component's name [default: the file's name].
        #[arg(long)]
        name: Option<String>,
        /// Its version.
        #[arg(long, default_value = "0.1.0")]
        version: String,
        /// Where to write it [default: `Component.toml` next to the `.wasm`]; `-` prints it.
        #[arg(long, value_name = "PATH")]
        out: Option<PathBuf>,
        /// Replace an existing file.
        #[arg(long)]
        force: bool,
    },
}

/// `trellis component init`: writes (or prints) a manifest for a `.wasm`. Needs no lattice.
pub(crate) fn init(cmd: ComponentCommand) -> Result<(), Failure> {
    let ComponentCommand::Init {
        wasm,
        name,
        version,
        out,
        force,
    } = cmd
    else {
        return Err(failure(2, "not `component init`"));
    };
    let bytes = std::fs::read(&wasm)
        .map_err(|e| failure(2, format!("cannot read {}: {e}", wasm.display())))?;
    let surface = crate::wasm::Surface::of(&bytes).ok_or_else(|| {
        failure(
            2,
            format!(
                "{} is not a WebAssembly component (a core module must be made a component first, e.g. with `wasm-tools component new`)",
                wasm.display()
            ),
        )
    })?;
    let name = match name {
        Some(name) => name,
        None => wasm
            .file_stem()
            .and_then(|s| s.to_str())
            .map(|s| {
                s.chars()
                    .map(|c| {
                        if c.is_ascii_alphanumeric() || c == '-' {
                            c
                        } else {
                            '-'
                        }
                    })
                    .collect::<String>()
            })
            .filter(|s| s.starts_with(|c: char| c.is_ascii_alphanumeric()))
            .unwrap_or_else(|| "app".to_owned()),
    };
    semver::Version::parse(&version).map_err(|e| {
        failure(
            2,
            format!("--version {version:?} is not a semantic version: {e}"),
        )
    })?;
    let text = crate::wasm::manifest_for(&surface, &name, &version, bytes.len());
    let path = match out {
        Some(path) if path.as_os_str() == "-" => {
            print!("{text}");
            return Ok(());
        }
        Some(path) => path,
        None => wasm.with_file_name("Component.toml"),
    };
    if path.exists() && !force {
        return Err(failure(
            1,
            format!(
                "{} exists; pass --force to replace it, or --out - to print the manifest",
                path.display()
            ),
        ));
    }
    std::fs::write(&path, &text)
        .map_err(|e| failure(1, format!("cannot write {}: {e}", path.display())))?;
    println!("wrote {}", path.display());
    println!(
        "next: adjust its limits, then `trellis component push {}`",
        wasm.display()
    );
    Ok(())
}

/// `trellis instance …`
#[derive(Debug, Subcommand)]
pub enum InstanceCommand {
    /// Start instances of a component (`name`, `name@version`, `sha256:…` or `file:///path.wasm`).
    Start(StartArgs),
    /// Stop an instance.
    Stop {
        /// The instance id.
        instance_id: InstanceId,
        /// Wait until the host reports it stopped.
        #[arg(long)]
        wait: bool,
    },
    /// List instances.
    Ls {
        /// Only instances of this component.
        #[arg(long)]
        component: Option<String>,
        /// Only instances on this host.
        #[arg(long)]
        host: Option<HostId>,
    },
    /// Show one instance and its fact history.
    Get {
        /// The instance id.
        instance_id: InstanceId,
    },
}

impl InstanceCommand {
    /// What can be refused before connecting: a label given twice with two values.
    pub(crate) fn check(&self) -> Result<(), Failure> {
        if let Self::Start(args) = self {
            trellis_schemas::manifest::key_values("the label", args.labels.iter().cloned())
                .map_err(|e| failure(2, e))?;
        }
        Ok(())
    }
}

/// Options of `trellis instance start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// The component.
    component: String,
    /// How many instances.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Only on this host.
    #[arg(long, conflicts_with = "labels")]
    host: Option<HostId>,
    /// Only on hosts with this label, `key=value`; repeat for more.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// `never`, `always` or `backoff:<initial>,<max>[,<attempts>]`.
    #[arg(long, default_value = "never")]
    restart: RestartPolicy,
    /// Isolation: `process` (in the host's process) or `microvm` (each instance in a micro-VM of
    /// its own, on hosts that run them) [default: the manifest's `[isolation] mode`, which this
    /// may strengthen but not weaken].
    #[arg(long, value_name = "MODE", value_parser = str::parse::<Isolation>)]
    isolation: Option<Isolation>,
    /// Grant a capability to each new instance: `'<capability> [provider=<name>] [key=value …]'`,
    /// e.g. `--grant 'wasi:keyvalue bucket=counts'`; repeat for more.
    #[arg(long = "grant", value_parser = crate::capabilities::parse_grant)]
    grants: Vec<trellis_schemas::control::Grant>,
    /// Wait until every instance has started (or failed to).
    #[arg(long)]
    wait: bool,
}

/// Options of `trellis call`.
#[derive(Debug, Args)]
pub struct CallArgs {
    /// A component name (any of its instances answers) or an instance id.
    target: String,
    /// The export: `name`, or `pkg:name/interface#name`.
    export: String,
    /// Arguments, one per parameter, each JSON (`42`, `'"text"'`, `'[1,2]'`); a word that is not
    /// JSON is taken as a string.
    args: Vec<String>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("label {s:?} is not key=value")),
    }
}

fn manifest_path(wasm: &Path, given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| {
        let beside = wasm.with_file_name("Component.toml");
        if beside.exists() {
            beside
        } else {
            PathBuf::from("Component.toml")
        }
    })
}

/// Components from this size up show their upload's progress.
const SHOW_UPLOAD_FROM: usize = 1 << 20;

/// Uploads `wasm` to the artifact store and registers it with its manifest (by default the
/// `Component.toml` next to it), showing the upload's progress for a large one.
pub async fn push_component(
    client: &CtlClient,
    wasm: &Path,
    manifest: Option<PathBuf>,
    sign: Option<&Path>,
) -> Result<ComponentRegisterReply, Failure> {
    if wasm.is_dir() {
        return Err(failure(
            2,
            format!(
                "{} is a directory: `trellis component push` takes the component's .wasm file \
                 (its manifest beside it, or with --manifest)",
                wasm.display()
            ),
        ));
    }
    let given = manifest.is_some();
    let manifest_path = manifest_path(wasm, manifest);
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound if !given => failure(
            1,
            format!(
                "no Component.toml beside {} or in this directory: pass --manifest PATH, or \
                 write one with `trellis component init {}`",
                wasm.display(),
                wasm.display()
            ),
        ),
        _ => failure(1, format!("cannot read {}: {e}", manifest_path.display())),
    })?;
    // Same checks as the controller's, before uploading anything.
    let parsed = Manifest::from_toml(&text)
        .map_err(|e| failure(1, format!("{}: {e}", manifest_path.display())))?;
    let seed = sign
        .map(|path| {
            let seed = std::fs::read_to_string(path)
                .map_err(|e| failure(1, format!("cannot read {}: {e}", path.display())))?;
            trellis_bus::signing::public_key(&seed)
                .map_err(|e| failure(1, format!("{}: {e}", path.display())))?;
            Ok::<_, Failure>(seed)
        })
        .transpose()?;
    let bytes = std::fs::read(wasm)
        .map_err(|e| failure(1, format!("cannot read {}: {e}", wasm.display())))?;
    let js = trellis_bus::jetstream(client.nats().clone());
    let digest = if bytes.len() < SHOW_UPLOAD_FROM {
        trellis_bus::put_artifact(&js, client.lattice(), &bytes).await
    } else {
        let mib = |n: usize| n as f64 / f64::from(1 << 20);
        let total = bytes.len();
        let name = wasm.file_name().unwrap_or_default().to_string_lossy();
        let mut progress = Progress::new(format!("uploading {name}"));
        progress.event(&format!("uploading {name} ({:.1} MiB)", mib(total)));
        let mut drawn = Instant::now();
        let put = trellis_bus::put_artifact_reporting(&js, client.lattice(), &bytes, |done| {
            if drawn.elapsed() >= PROGRESS_TICK / 2 || done == total {
                progress.state(format!("{:.1} of {:.1} MiB", mib(done), mib(total)));
                drawn = Instant::now();
            }
        })
        .await;
        progress.finish();
        put
    }
    .map_err(|e| failure(1, e.to_string()))?;
    let signature = seed
        .map(|seed| {
            let doc = trellis_schemas::ManifestDoc::from_manifest(&parsed)
                .map_err(|e| failure(1, format!("{}: {e}", manifest_path.display())))?;
            trellis_bus::signing::sign(&seed, &digest, &doc).map_err(|e| failure(1, e))
        })
        .transpose()?;
    Ok(client
        .request(&ComponentRegisterRequest {
            digest,
            manifest: text,
            signature,
        })
        .await?)
}

pub(crate) async fn component(
    g: &Global,
    client: &CtlClient,
    cmd: ComponentCommand,
) -> Result<(), Failure> {
    match cmd {
        ComponentCommand::Push {
            wasm,
            manifest,
            sign,
        } => {
            let reply = push_component(client, &wasm, manifest, sign.as_deref()).await?;
            if g.output == Output::Json {
                return print_json(&reply);
            }
            let c = &reply.component;
            println!(
                "stored {}@{} ({} bytes) as {}",
                c.manifest.name, c.manifest.version, c.size, c.digest
            );
            if let Some(signature) = &c.signature {
                println!("signed by {}", signature.issuer);
            }
            Ok(())
        }
        ComponentCommand::Init { .. } => init(cmd),
        ComponentCommand::Ls => {
            let reply = client.request(&ComponentListRequest::default()).await?;
            if g.output == Output::Json {
                return print_json(&reply);
            }
            let mut table = Table::new(&[
                "NAME",
                "VERSION",
                "SIZE",
                "MEMORY",
                "FUEL",
                "TIMEOUT",
                "SIGNED BY",
                "DIGEST",
            ]);
            for c in &reply.components {
                let m = &c.manifest;
                table.row(vec![
                    m.name.to_string(),
                    m.version.clone(),
                    c.size.to_string(),
                    trellis_schemas::manifest::format_bytes(m.max_memory_bytes),
                    m.fuel.to_string(),
                    format!("{}ms", m.timeout_ms),
                    c.signature
                        .as_ref()
                        .map_or_else(|| "-".to_owned(), |sig| sig.issuer.clone()),
                    c.digest.clone(),
                ]);
            }
            print!("{}", table.render());
            Ok(())
        }
    }
}

fn instance_row(i: &InstanceRecord) -> Vec<String> {
    vec![
        i.instance_id.to_string(),
        format!(
            "{}{}",
            i.component,
            i.version
                .as_ref()
                .map(|v| format!("@{v}"))
                .unwrap_or_default()
        ),
        i.host_id.to_string(),
        i.status.as_str().to_owned(),
        ago(i.status_since),
        i.attempt.to_string(),
        i.restart
            .map(|r| r.to_string())
            .unwrap_or_else(|| "-".into()),
        isolation(i),
        i.last_reason.clone().unwrap_or_else(|| "-".into()),
    ]
}

/// How an instance is isolated, for people: `process`, or `microvm/<acceleration>`.
fn isolation(i: &InstanceRecord) -> String {
    match i.acceleration {
        Some(acceleration) => format!("{}/{acceleration}", i.isolation),
        None => i.isolation.to_string(),
    }
}

const INSTANCE_COLUMNS: &[&str] = &[
    "INSTANCE",
    "COMPONENT",
    "HOST",
    "STATUS",
    "SINCE",
    "RESTARTS",
    "RESTART",
    "ISOLATION",
    "LAST REASON",
];

/// Waits for the outcome facts of `instances` caused by `operation`: `started`/`start_failed`
/// for a start, `stopped` for a stop. Returns the outcome per instance. Shows progress on stderr
/// (see [`Progress`]): each outcome as it comes, and on a terminal a line with the count so far.
async fn wait_for_outcomes(
    facts: &mut async_nats::Subscriber,
    operation: &str,
    instances: &[InstanceId],
    timeout: Duration,
) -> Result<BTreeMap<InstanceId, Event>, Failure> {
    let deadline = Instant::now() + timeout;
    let mut outcomes = BTreeMap::new();
    let total = instances.len();
    let mut progress = Progress::new(format!(
        "waiting for {total} instance{}",
        if total == 1 { "" } else { "s" }
    ));
    progress.state(format!("0 of {total} reported"));
    while outcomes.len() < total {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            progress.finish();
            return Err(failure(
                1,
                format!(
                    "{} of {total} instances reported within {timeout:?}; `trellis events --follow` shows what happens",
                    outcomes.len(),
                ),
            ));
        }
        let message = match tokio::time::timeout(left.min(PROGRESS_TICK), facts.next()).await {
            Ok(Some(m)) => m,
            Ok(None) => {
                progress.finish();
                return Err(failure(4, "lost the NATS subscription"));
            }
            Err(_) => {
                progress.redraw();
                continue;
            }
        };
        let Ok(event) = Event::decode(&message.payload) else {
            continue;
        };
        if event.causation_id.as_deref() != Some(operation) {
            continue;
        }
        let (id, what) = match &event.data {
            FactData::InstanceStarted(d) => {
                (d.instance_id.clone(), format!("started on {}", d.host_id))
            }
            FactData::InstanceStartFailed(d) => (
                d.instance_id.clone(),
                format!(
                    "failed on {}: {}",
                    d.host_id,
                    d.reason.split_whitespace().collect::<Vec<_>>().join(" ")
                ),
            ),
            FactData::InstanceStopped(d) => {
                (d.instance_id.clone(), format!("stopped on {}", d.host_id))
            }
            _ => continue,
        };
        if instances.contains(&id) && !outcomes.contains_key(&id) {
            outcomes.insert(id.clone(), event);
            progress.event(&format!(
                "instance {id} {what} ({} of {total})",
                outcomes.len()
            ));
            progress.state(format!("{} of {total} reported", outcomes.len()));
        }
    }
    progress.finish();
    Ok(outcomes)
}

pub(crate) async fn instance(
    g: &Global,
    client: &CtlClient,
    cmd: InstanceCommand,
) -> Result<(), Failure> {
    let facts_subject = subject::instance_events(client.lattice());
    match cmd {
        InstanceCommand::Start(args) => {
            let labels = trellis_schemas::manifest::key_values("the label", args.labels)
                .map_err(|e| failure(2, e))?;
            // Subscribe before asking, so no outcome is missed.
            let mut facts = client
                .nats()
                .subscribe(facts_subject)
                .await
                .map_err(|e| failure(4, e.to_string()))?;
            let request = InstanceStartRequest {
                component: args.component,
                count: args.count,
                host_id: args.host,
                labels,
                restart: args.restart,
                min_seq: None,
                grants: args.grants,
                isolation: args.isolation,
            };
            let reply = client.request(&request).await?;
            if !args.wait {
                if g.output == Output::Json {
                    return print_json(&reply);
                }
                println!("operation {}", reply.operation_id);
                let mut table = Table::new(&["INSTANCE", "HOST"]);
                for p in &reply.instances {
                    table.row(vec![p.instance_id.to_string(), p.host_id.to_string()]);
                }
                print!("{}", table.render());
                return Ok(());
            }
            let ids: Vec<InstanceId> = reply
                .instances
                .iter()
                .map(|p| p.instance_id.clone())
                .collect();
            let outcomes = wait_for_outcomes(
                &mut facts,
                &reply.operation_id,
                &ids,
                Duration::from_secs(60),
            )
            .await?;
            let failed = outcomes
                .values()
                .filter(|e| matches!(e.data, FactData::InstanceStartFailed(_)))
                .count();
            if g.output == Output::Json {
                let json: Vec<serde_json::Value> = outcomes
                    .values()
                    .map(|e| {
                        serde_json::from_slice(&e.encode().unwrap_or_default()).unwrap_or_default()
                    })
                    .collect();
                print_json(&serde_json::json!({
                    "operation_id": reply.operation_id,
                    "instances": reply.instances,
                    "facts": json,
                }))?;
            } else {
                let mut table = Table::new(&["INSTANCE", "HOST", "OUTCOME"]);
                for p in &reply.instances {
                    let outcome = outcomes.get(&p.instance_id).map(|e| match &e.data {
                        FactData::InstanceStartFailed(d) => format!("failed: {}", d.reason),
                        _ => "started".to_owned(),
                    });
                    table.row(vec![
                        p.instance_id.to_string(),
                        p.host_id.to_string(),
                        outcome.unwrap_or_default(),
                    ]);
                }
                print!("{}", table.render());
            }
            if failed > 0 {
                return Err(failure(1, format!("{failed} instance(s) failed to start")));
            }
            Ok(())
        }
        InstanceCommand::Stop { instance_id, wait } => {
            let mut facts = client
                .nats()
                .subscribe(facts_subject)
                .await
                .map_err(|e| failure(4, e.to_string()))?;
            let reply = client
                .request(&InstanceStopRequest {
                    instance_id: instance_id.clone(),
                })
                .await?;
            if wait {
                wait_for_outcomes(
                    &mut facts,
                    &reply.operation_id,
                    &[instance_id],
                    Duration::from_secs(60),
                )
                .await?;
            }
            if g.output == Output::Json {
                return print_json(&reply);
            }
            println!(
                "{} {} on {}",
                if wait { "stopped" } else { "stopping" },
                reply.instance.instance_id,
                reply.instance.host_id
            );
            Ok(())
        }
        InstanceCommand::Ls { component, host } => {
            let mut all = Vec::new();
            let mut after = None;
            loop {
                let reply = client
                    .request(&InstanceListRequest {
                        component: component.clone(),
                        host_id: host.clone(),
                        after,
                        ..Default::default()
                    })
                    .await?;
                all.extend(reply.instances);
                after = reply.next_after;
                if after.is_none() {
                    break;
                }
            }
            if g.output == Output::Json {
                return print_json(&serde_json::json!({ "instances": all }));
            }
            let mut table = Table::new(INSTANCE_COLUMNS);
            for i in &all {
                table.row(instance_row(i));
            }
            print!("{}", table.render());
            Ok(())
        }
        InstanceCommand::Get { instance_id } => {
            let reply = client
                .request(&InstanceGetRequest {
                    instance_id,
                    min_seq: None,
                })
                .await?;
            if g.output == Output::Json {
                return print_json(&reply);
            }
            let mut table = Table::new(INSTANCE_COLUMNS);
            table.row(instance_row(&reply.instance));
            print!("{}", table.render());
            let i = &reply.instance;
            println!(
                "isolation {}{}",
                i.isolation,
                i.acceleration
                    .map(|a| format!(", acceleration {a}"))
                    .unwrap_or_default()
            );
            println!();
            let mut history = Table::new(&["SEQ", "TIME", "FACT", "DETAILS"]);
            for h in &reply.history {
                history.row(vec![
                    h.seq.to_string(),
                    h.time.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                    h.kind.clone(),
                    h.summary.clone(),
                ]);
            }
            print!("{}", history.render());
            Ok(())
        }
    }
}

/// The arguments of a call as a JSON array.
fn call_args(args: &[String]) -> serde_json::Value {
    serde_json::Value::Array(
        args.iter()
            .map(|a| {
                serde_json::from_str(a).unwrap_or_else(|_| serde_json::Value::String(a.clone()))
            })
            .collect(),
    )
}

pub(crate) async fn call(
    g: &Global,
    nats: &async_nats::Client,
    args: CallArgs,
) -> Result<(), Failure> {
    let text = call_export(
        nats,
        &g.lattice,
        &args.target,
        &args.export,
        &args.args,
        g.timeout,
    )
    .await?;
    if g.output == Output::Json {
        println!("{text}");
    } else {
        match serde_json::from_str::<serde_json::Value>(&text) {
            Ok(v) => println!("{}", serde_json::to_string_pretty(&v).unwrap_or(text)),
            Err(_) => println!("{text}"),
        }
    }
    Ok(())
}

/// Calls `export` of `target` (a component name, or an instance id) over the data plane with
/// `args` (each JSON, or taken as a string); returns the JSON result as text.
pub async fn call_export(
    nats: &async_nats::Client,
    lattice: &Lattice,
    target: &str,
    export: &str,
    args: &[String],
    timeout: Duration,
) -> Result<String, Failure> {
    let subject = if ulid::Ulid::from_string(target).is_ok() {
        let id = InstanceId::new(target).map_err(|e| failure(2, e.to_string()))?;
        dataplane::instance(lattice, &id, Op::Call)
    } else {
        let name = ComponentName::new(target).map_err(|e| failure(2, e.to_string()))?;
        dataplane::component(lattice, &name, Op::Call)
    };
    let body = serde_json::to_vec(&call_args(args)).map_err(|e| failure(1, e.to_string()))?;
    let mut refusals = trellis_bus::permission_violations();
    let request = codec::request(
        nats,
        subject.clone(),
        codec::call_headers(export),
        body.into(),
        timeout,
    );
    let reply = tokio::select! {
        reply = request => reply,
        refused = trellis_bus::refused(&mut refusals, &subject) => {
            return Err(failure(5, format!("permission denied: {refused} (these credentials' role may not call components)")));
        }
    };
    let reply = reply.map_err(|e| match e {
        SendError::NoResponders => failure(
            4,
            format!("no running instance of {target} answers; `trellis instance ls` shows them"),
        ),
        SendError::TimedOut(t) => failure(4, format!("no answer within {t:?}")),
        SendError::Failed(e) => failure(4, e),
    })?;
    let text = String::from_utf8_lossy(&reply.payload).into_owned();
    codec::read_reply(&reply).map_err(|e| failure(1, e.to_string()))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_arguments_are_json_or_strings() {
        let args: Vec<String> = ["1", "\"x\"", "[1,2]", "hello", "{\"a\":1}"]
            .map(String::from)
            .to_vec();
        assert_eq!(
            call_args(&args),
            serde_json::json!([1, "x", [1, 2], "hello", {"a": 1}])
        );
        assert_eq!(call_args(&[]), serde_json::json!([]));
    }

    #[test]
    fn isolation_is_asked_by_name_and_shown_with_its_acceleration() {
        use clap::Parser as _;
        #[derive(Debug, clap::Parser)]
        struct Start {
            #[command(flatten)]
            args: StartArgs,
        }
        let parse = |extra: &[&str]| {
            Start::try_parse_from(["start", "c"].iter().chain(extra)).map(|s| s.args.isolation)
        };
        assert_eq!(parse(&[]).expect("parses"), None);
        assert_eq!(
            parse(&["--isolation", "microvm"]).expect("parses"),
            Some(Isolation::Microvm)
        );
        assert_eq!(
            parse(&["--isolation", "process"]).expect("parses"),
            Some(Isolation::Process)
        );
        let err = parse(&["--isolation", "vm"]).expect_err("unknown");
        assert!(err.to_string().contains("process or microvm"), "{err}");

        let mut record = InstanceRecord {
            instance_id: InstanceId::new("01J00000000000000000000001").expect("valid"),
            host_id: HostId::new("h").expect("valid"),
            component: "c".into(),
            version: None,
            digest: None,
            restart: None,
            status: trellis_schemas::InstanceStatus::Running,
            attempt: 0,
            last_reason: None,
            started_at: None,
            status_since: chrono::Utc::now(),
            status_seq: 1,
            replaced_by: None,
            isolation: Isolation::Process,
            acceleration: None,
        };
        let column = INSTANCE_COLUMNS
            .iter()
            .position(|c| *c == "ISOLATION")
            .expect("a column");
        assert_eq!(instance_row(&record)[column], "process");
        record.isolation = Isolation::Microvm;
        record.acceleration = Some(trellis_schemas::isolation::Acceleration::Tcg);
        assert_eq!(instance_row(&record)[column], "microvm/tcg");
    }
}
