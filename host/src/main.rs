//! `trellis-host`: joins a lattice and runs instances on this machine.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use trellis_host::{HostConfig, agent::machine_capacity};
use trellis_schemas::{HostId, Lattice};

/// Trellis host: the Node Agent of one machine.
#[derive(Debug, Parser)]
#[command(name = "trellis-host", version)]
struct Args {
    /// NATS server URL(s), comma separated.
    #[arg(
        long,
        env = "TRELLIS_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    nats: String,
    /// The lattice to join.
    #[arg(long, env = "TRELLIS_LATTICE", default_value = "default")]
    lattice: Lattice,
    /// This host's id (default: a fresh ULID).
    #[arg(long, env = "TRELLIS_HOST_ID")]
    host_id: Option<HostId>,
    /// A placement label, `key=value`; repeat for more.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// How often to send a heartbeat (`500ms`, `2s`).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    heartbeat_interval: Duration,
    /// The most instances this host runs at once.
    #[arg(long, default_value_t = 100)]
    max_instances: u32,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("label {s:?} is not key=value"))?;
    if k.is_empty() {
        return Err(format!("label {s:?} has an empty key"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,async_nats=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    let mut config = HostConfig::new(args.nats, args.lattice);
    if let Some(id) = args.host_id {
        config.host_id = id;
    }
    config.labels = args.labels.into_iter().collect::<BTreeMap<_, _>>();
    config.capacity = machine_capacity(args.max_instances);
    config.heartbeat_interval = args.heartbeat_interval;
    trellis_host::run(config, shutdown_signal())
        .await
        .context("trellis-host failed")
}

async fn shutdown_signal() -> String {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the host can only be killed; run until then.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "signal: SIGTERM".to_owned(),
        _ = int.recv() => "signal: SIGINT".to_owned(),
    }
}
