//! The command line every provider takes.

use std::collections::BTreeMap;

use clap::Parser;
use trellis_schemas::{HostId, Lattice, ProviderId, ProviderName};

/// The arguments of every provider binary. A host spawns providers as
/// `trellis-provider-<name> --nats URL --lattice L --provider-id ID --host-id H [--config k=v]...`.
#[derive(Debug, Clone, Parser)]
pub struct ProviderArgs {
    /// NATS server URL(s), comma separated.
    #[arg(
        long,
        env = "TRELLIS_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats: String,
    /// The lattice to serve.
    #[arg(long, env = "TRELLIS_LATTICE", default_value = "default")]
    pub lattice: Lattice,
    /// This process's id (default: a fresh ULID).
    #[arg(long)]
    pub provider_id: Option<ProviderId>,
    /// The host supervising this process, when a host started it.
    #[arg(long)]
    pub host_id: Option<HostId>,
    /// The provider's name: its queue group and the `provider` of the assignments it serves
    /// (default: the binary's, e.g. `kv`).
    #[arg(long)]
    pub name: Option<ProviderName>,
    /// A provider setting, `key=value`; repeat for more.
    #[arg(long = "config", value_parser = parse_setting)]
    pub config: Vec<(String, String)>,
    /// An etcd registry (`etcd://host:port`) in which the provider records its metadata (name,
    /// capabilities, node, version) under `/trellis/<lattice>/providers/<id>` while it runs.
    #[arg(long, env = "TRELLIS_REGISTRY")]
    pub registry: Option<String>,
    /// The JetStream domain of the cluster's streams and buckets, for a provider behind a NATS
    /// leaf node without JetStream of its own.
    #[arg(long, env = trellis_bus::ENV_JS_DOMAIN, value_parser = trellis_bus::parse_jetstream_domain)]
    pub js_domain: Option<String>,
    /// Serve Prometheus metrics on this address (`GET /metrics`).
    #[arg(long)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Threads of the provider's async runtime (default: 1 for `kv` and `messaging`, one per
    /// core for the others). Ignored when embedded: a host runs its embedded providers on its
    /// own runtime.
    #[arg(long, env = "TRELLIS_PROVIDER_WORKERS")]
    pub workers: Option<std::num::NonZeroUsize>,
    /// TLS for the NATS connection (`--tls-ca`, `--tls-cert`, `--tls-key`).
    #[command(flatten)]
    pub connect: trellis_bus::ConnectArgs,
}

impl ProviderArgs {
    /// The settings as a map (a repeated key keeps its last value).
    pub fn settings(&self) -> BTreeMap<String, String> {
        self.config.iter().cloned().collect()
    }
}

/// Parses `key=value`.
pub fn parse_setting(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("setting {s:?} is not key=value"))?;
    let k = k.trim();
    if k.is_empty() {
        return Err(format!("setting {s:?} has an empty key"));
    }
    Ok((k.to_owned(), v.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_as_a_host_passes_them() {
        let args = ProviderArgs::try_parse_from([
            "trellis-provider-kv",
            "--nats",
            "nats://n:4222",
            "--lattice",
            "prod",
            "--provider-id",
            "P1",
            "--host-id",
            "h1",
            "--config",
            "a=1",
            "--config",
            "b=x=y",
        ])
        .expect("parses");
        assert_eq!(args.nats, "nats://n:4222");
        assert_eq!(args.lattice.as_str(), "prod");
        assert_eq!(args.provider_id.as_ref().expect("id").as_str(), "P1");
        assert_eq!(args.host_id.as_ref().expect("host").as_str(), "h1");
        let settings = args.settings();
        assert_eq!(settings["a"], "1");
        assert_eq!(settings["b"], "x=y");
        assert_eq!(args.workers, None);
        let two = ProviderArgs::try_parse_from(["p", "--workers", "2"]).expect("parses");
        assert_eq!(two.workers.map(std::num::NonZeroUsize::get), Some(2));
        assert!(ProviderArgs::try_parse_from(["p", "--workers", "0"]).is_err());
        assert!(ProviderArgs::try_parse_from(["p", "--config", "novalue"]).is_err());
        assert!(ProviderArgs::try_parse_from(["p", "--lattice", "Bad.Name"]).is_err());
    }
}
