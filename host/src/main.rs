//! `trellis-host`: joins a lattice and runs instances on this machine.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use trellis_host::{HostConfig, agent::machine_capacity};
use trellis_schemas::{HostId, Lattice};

/// mimalloc rather than the C library's allocator: spans, replies and stores are made on one
/// thread and freed on another (the exporter's, the connection's, the next call's), which
/// glibc's arenas make dear.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Where compiled components are cached (default: `$XDG_CACHE_HOME/trellis/host-<id>`).
    #[arg(long, env = "TRELLIS_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Largest `limits.max_memory` a component may ask for (`512MiB`, `1GiB`, bytes).
    #[arg(long, default_value = "1GiB", value_parser = parse_bytes)]
    max_memory: u64,
    /// Largest `limits.fuel` a component may ask for.
    #[arg(long, default_value_t = 10_000_000_000)]
    max_fuel: u64,
    /// Largest `limits.timeout` a component may ask for (`60s`).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    max_timeout: Duration,
    /// Largest `limits.max_concurrency` a component may ask for.
    #[arg(long, default_value_t = 1024)]
    max_concurrency: u32,
    /// Invocations in flight across all instances that the pooling allocator holds at once
    /// (each slot reserves virtual memory for `--max-memory`).
    #[arg(long, default_value_t = 1000)]
    pooling_instances: u32,
    /// Also record this node's existence in etcd (`etcd://host:port`), leased for three
    /// heartbeats. Only node existence goes there; the lattice itself needs nothing but NATS.
    #[arg(long, env = "TRELLIS_REGISTRY")]
    registry: Option<String>,
    /// Serve Prometheus metrics on this address (`GET /metrics`), e.g. `127.0.0.1:9464`.
    #[arg(long, env = "TRELLIS_HOST_METRICS")]
    metrics: Option<std::net::SocketAddr>,
    /// Log lines per second each instance may publish (stdout, stderr and `wasi:logging`; a
    /// burst of one second's worth); lines beyond are dropped and counted. 0 turns streaming off.
    #[arg(long, env = "TRELLIS_HOST_LOG_RATE", default_value_t = 200)]
    log_rate: u32,
    /// Log lines kept per instance for `trellis logs` (at most 256 KiB of them).
    #[arg(long, default_value_t = 1000)]
    log_keep: usize,
    /// Run only components signed by one of these issuers (public keys from `trellis key new`,
    /// `O…`); repeat or separate with commas. Unsigned components, components signed by other
    /// keys and `file://` sources then fail to start with `untrusted_component`.
    #[arg(long, env = "TRELLIS_HOST_TRUST", value_delimiter = ',', value_name = "ISSUER", value_parser = parse_issuer)]
    trust: Vec<String>,
    /// Replicas of the lattice's streams (created or updated to this count, as the controller
    /// does; 1..=5). Default: 3 when the NATS server belongs to a cluster of three or more servers, else 1.
    #[arg(long, env = "TRELLIS_REPLICAS", value_parser = clap::value_parser!(u8).range(1..=5))]
    replicas: Option<u8>,
    /// The JetStream domain of the cluster's streams, for a host that connects through a NATS
    /// leaf node without JetStream of its own (the hub's `jetstream { domain }`). Providers this
    /// host starts use it too.
    #[arg(long, env = trellis_bus::ENV_JS_DOMAIN, value_parser = trellis_bus::parse_jetstream_domain)]
    js_domain: Option<String>,
    /// A directory written by `trellis creds`: the providers this host starts or embeds connect
    /// with their own credentials from it (`provider-<name>.nk`, and `app.nk` for the messaging
    /// provider's application traffic) rather than the host's.
    #[arg(long, env = "TRELLIS_PROVIDER_CREDS", value_name = "DIR")]
    provider_creds: Option<PathBuf>,
    /// The guest kernel of micro-VM instances (`ensure_microvm_image` in `scripts/microvm.sh` builds it). With
    /// `--microvm-initrd`, this host runs instances started with `--isolation microvm`.
    #[arg(
        long,
        env = "TRELLIS_MICROVM_KERNEL",
        value_name = "PATH",
        requires = "microvm_initrd"
    )]
    microvm_kernel: Option<PathBuf>,
    /// The guest initramfs of micro-VM instances (`ensure_microvm_image` in `scripts/microvm.sh` builds it).
    #[arg(
        long,
        env = "TRELLIS_MICROVM_INITRD",
        value_name = "PATH",
        requires = "microvm_kernel"
    )]
    microvm_initrd: Option<PathBuf>,
    /// The QEMU binary for micro-VMs.
    #[arg(long, env = "TRELLIS_MICROVM_QEMU", value_name = "PATH")]
    microvm_qemu: Option<PathBuf>,
    /// Memory of each micro-VM at least (`256MiB`); a component's `max_memory` plus 192 MiB
    /// when larger.
    #[arg(long, default_value = "256MiB", value_parser = parse_bytes)]
    microvm_memory: u64,
    /// Micro-VMs to keep booted ahead of need (each holds its memory while it waits): a start
    /// then only loads its component into one.
    #[arg(long, env = "TRELLIS_MICROVM_POOL", default_value_t = 0)]
    microvm_pool: usize,
    /// Virtual CPUs of each micro-VM: with two, a guest instantiates the next call's instance
    /// on one while it serves a call on the other (under TCG, emulation, that is slower).
    #[arg(long, env = "TRELLIS_MICROVM_VCPUS", default_value_t = trellis_host::microvm::DEFAULT_VCPUS,
          value_parser = clap::value_parser!(u32).range(1..=16))]
    microvm_vcpus: u32,
    #[command(flatten)]
    connect: trellis_bus::ConnectArgs,
}

fn parse_issuer(s: &str) -> Result<String, String> {
    let s = s.trim();
    if s.len() == 56 && s.starts_with('O') && s.bytes().all(|b| b.is_ascii_alphanumeric()) {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not an issuer's public key (56 characters starting with O, as `trellis key new` prints)"
        ))
    }
}

fn parse_bytes(s: &str) -> Result<u64, String> {
    trellis_schemas::manifest::parse_size(s)
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

fn main() -> anyhow::Result<()> {
    // Inside a micro-VM this binary is the guest's /init: it serves its host over the channel.
    // Being PID 1 is not enough to tell (it is in a container too): the host's kernel command
    // line sets the variable, which the kernel hands to init as its environment.
    if std::process::id() == 1 && std::env::var_os(trellis_host::microvm::AGENT_ENV).is_some() {
        trellis_host::microvm::agent::run_as_init();
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(host_main())
}

async fn host_main() -> anyhow::Result<()> {
    // First, so that a stop asked for while the host starts drains it once it is up.
    let shutdown = trellis_bus::shutdown_signal();
    trellis_bus::init_logging("info,async_nats=warn");
    let _telemetry = trellis_bus::telemetry::init("trellis-host");
    let args = Args::parse();
    trellis_bus::set_jetstream_domain(args.js_domain.clone());
    if let Err(e) = args.connect.check() {
        eprintln!("error: {e}");
        std::process::exit(2);
    }
    trellis_bus::set_connect_args(args.connect.clone());
    let mut config = HostConfig::new(args.nats, args.lattice);
    if let Some(id) = args.host_id {
        config.host_id = id;
    }
    config.labels = match trellis_schemas::manifest::key_values("the label", args.labels) {
        Ok(labels) => labels,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    config.capacity = machine_capacity(args.max_instances);
    config.heartbeat_interval = args.heartbeat_interval;
    config
        .runtime
        .max_memory(args.max_memory)
        .max_fuel(args.max_fuel)
        .max_timeout(args.max_timeout)
        .max_concurrency(args.max_concurrency)
        .pooling_instances(args.pooling_instances);
    config.registry = args.registry;
    config.metrics = args.metrics;
    config.logs = trellis_host::LogConfig {
        rate: args.log_rate,
        keep: args.log_keep,
    };
    config.streams.replicas = args.replicas.map(usize::from);
    config.trust = args.trust;
    if let Some(dir) = &args.provider_creds
        && !dir.is_dir()
    {
        eprintln!("error: --provider-creds {}: not a directory", dir.display());
        std::process::exit(2);
    }
    config.provider_creds = args.provider_creds;
    if let Some((kernel, initrd)) = args.microvm_kernel.zip(args.microvm_initrd) {
        match trellis_host::MicrovmConfig::probe(
            args.microvm_qemu,
            &kernel,
            &initrd,
            args.microvm_memory / (1024 * 1024),
        ) {
            Ok(mut microvm) => {
                microvm.pool_size = args.microvm_pool;
                microvm.vcpus = args.microvm_vcpus;
                tracing::info!(acceleration = %microvm.acceleration, pool = microvm.pool_size, vcpus = microvm.vcpus, "this host runs micro-VM instances");
                config.microvm = Some(std::sync::Arc::new(microvm));
            }
            Err(e) => {
                eprintln!("error: micro-VMs: {e}");
                std::process::exit(2);
            }
        }
    }
    if let Some(dir) = args.cache_dir {
        config.runtime.cache_dir(dir);
    }
    trellis_host::run(config, shutdown)
        .await
        .context("trellis-host failed")
}
