//! Components, instances and restart policies: the types shared by facts, control requests and
//! host commands.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::capability::Capability;
use crate::dataplane::HostVerb;
use crate::manifest::{Limits, Manifest, ManifestError};
use crate::names::{ComponentName, InstanceId, ProviderId, ProviderName};
use crate::projection::AssignmentRecord;

/// What a host does when an instance crashes.
///
/// Written on the command line as `never`, `always` or `backoff:<initial>,<max>[,<attempts>]`
/// (durations such as `100ms`, `2s`). With `backoff` each restart waits twice as long as the one
/// before, starting at `initial` and capped at `max`; after `attempts` restarts (if given) the host
/// gives up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "policy", rename_all = "snake_case", deny_unknown_fields)]
pub enum RestartPolicy {
    /// A crash ends the instance.
    #[default]
    Never,
    /// Restart at once after every crash.
    Always,
    /// Restart after a growing, capped delay, optionally a bounded number of times.
    Backoff {
        /// The first delay, in milliseconds.
        initial_ms: u64,
        /// The longest delay, in milliseconds.
        max_ms: u64,
        /// Give up after this many restarts.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        max_attempts: Option<u32>,
    },
}

impl RestartPolicy {
    /// The delay before restart number `attempt` (1-based), or `None` when the policy says not
    /// to restart (never, or attempts exhausted).
    pub fn delay(&self, attempt: u32) -> Option<Duration> {
        match *self {
            RestartPolicy::Never => None,
            RestartPolicy::Always => Some(Duration::ZERO),
            RestartPolicy::Backoff {
                initial_ms,
                max_ms,
                max_attempts,
            } => {
                if max_attempts.is_some_and(|max| attempt > max) || attempt == 0 {
                    return None;
                }
                let factor = 1u64.checked_shl(attempt - 1).unwrap_or(u64::MAX);
                Some(Duration::from_millis(
                    initial_ms.saturating_mul(factor).min(max_ms),
                ))
            }
        }
    }

    /// Checks the values: delays up to one hour, `initial <= max`, at least one attempt.
    pub fn validate(&self) -> Result<(), String> {
        if let RestartPolicy::Backoff {
            initial_ms,
            max_ms,
            max_attempts,
        } = *self
        {
            if initial_ms == 0 || initial_ms > max_ms {
                return Err(format!(
                    "backoff initial delay must be at least 1ms and not above the maximum (got {initial_ms}ms, max {max_ms}ms)"
                ));
            }
            if max_ms > 3_600_000 {
                return Err(format!(
                    "backoff maximum delay must be at most 1h (got {max_ms}ms)"
                ));
            }
            if max_attempts == Some(0) {
                return Err("backoff attempts must be at least 1".to_owned());
            }
        }
        Ok(())
    }
}

impl fmt::Display for RestartPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RestartPolicy::Never => f.write_str("never"),
            RestartPolicy::Always => f.write_str("always"),
            RestartPolicy::Backoff {
                initial_ms,
                max_ms,
                max_attempts,
            } => {
                write!(f, "backoff:{initial_ms}ms,{max_ms}ms")?;
                if let Some(n) = max_attempts {
                    write!(f, ",{n}")?;
                }
                Ok(())
            }
        }
    }
}

impl FromStr for RestartPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let usage = "expected never, always or backoff:<initial>,<max>[,<attempts>] (e.g. backoff:100ms,5s,10)";
        let policy = match s {
            "never" => RestartPolicy::Never,
            "always" => RestartPolicy::Always,
            _ => {
                let spec = s
                    .strip_prefix("backoff:")
                    .ok_or_else(|| format!("{s:?}: {usage}"))?;
                let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
                if !(2..=3).contains(&parts.len()) {
                    return Err(format!("{s:?}: {usage}"));
                }
                let ms = |p: &str| {
                    humantime::parse_duration(p)
                        .map(|d| d.as_millis() as u64)
                        .map_err(|e| format!("{p:?} is not a duration ({e}); {usage}"))
                };
                let max_attempts = match parts.get(2) {
                    Some(n) => Some(
                        n.parse::<u32>()
                            .map_err(|_| format!("{n:?} is not a number of attempts; {usage}"))?,
                    ),
                    None => None,
                };
                RestartPolicy::Backoff {
                    initial_ms: ms(parts[0])?,
                    max_ms: ms(parts[1])?,
                    max_attempts,
                }
            }
        };
        policy.validate()?;
        Ok(policy)
    }
}

/// A manifest as it travels in facts and commands: canonical units, every field explicit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ManifestDoc {
    /// The component's name.
    pub name: ComponentName,
    /// Its semantic version.
    pub version: String,
    /// Maximum linear memory, bytes.
    pub max_memory_bytes: u64,
    /// Fuel per invocation.
    pub fuel: u64,
    /// Wall-clock limit per invocation, milliseconds.
    pub timeout_ms: u64,
    /// Invocations at once.
    pub max_concurrency: u32,
    /// WIT interfaces the component imports beyond the WASI basics.
    #[serde(default)]
    pub imports: Vec<String>,
    /// Capabilities that must be assigned before an instance starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub requires: Vec<Capability>,
    /// Imported interfaces that must be linked before an instance starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub required_links: Vec<crate::link::Interface>,
    /// How instances are isolated unless a start asks for stronger.
    #[serde(
        default,
        skip_serializing_if = "crate::isolation::Isolation::is_process"
    )]
    pub isolation: crate::isolation::Isolation,
}

impl ManifestDoc {
    /// The wire form of a validated manifest.
    pub fn from_manifest(m: &Manifest) -> Result<Self, ManifestError> {
        Ok(Self {
            name: ComponentName::new(m.name.as_str()).map_err(|e| ManifestError::Field {
                field: "component.name",
                problem: e.to_string(),
                accepted: e.rule.to_owned(),
            })?,
            version: m.version.to_string(),
            max_memory_bytes: m.limits.max_memory,
            fuel: m.limits.fuel,
            timeout_ms: m.limits.timeout.as_millis() as u64,
            max_concurrency: m.limits.max_concurrency,
            imports: m.capabilities.imports.clone(),
            requires: m.capabilities.requires.clone(),
            required_links: m.capabilities.links.clone(),
            isolation: m.isolation,
        })
    }

    /// Validates the wire form back into a manifest (the same checks as `Component.toml`).
    pub fn to_manifest(&self) -> Result<Manifest, ManifestError> {
        Manifest::new(
            self.name.as_str(),
            &self.version,
            Limits {
                max_memory: self.max_memory_bytes,
                fuel: self.fuel,
                timeout: Duration::from_millis(self.timeout_ms),
                max_concurrency: self.max_concurrency,
            },
        )
        .map(|m| {
            m.with_imports(self.imports.iter().cloned())
                .with_requires(self.requires.iter().copied())
                .with_required_links(self.required_links.iter().cloned())
                .with_isolation(self.isolation)
        })
    }
}

/// Where a host gets a component's code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "source", rename_all = "snake_case", deny_unknown_fields)]
pub enum ComponentSource {
    /// From the lattice's artifact store, verified against its digest.
    Artifact {
        /// `sha256:<hex>` of the `.wasm`.
        digest: String,
        /// The manifest stored with it.
        manifest: ManifestDoc,
        /// Its signature, when it was pushed signed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        signature: Option<ComponentSignature>,
    },
    /// From a file on the host's machine, for development: the `.wasm` and a `Component.toml`
    /// next to it (or the manifest path given).
    File {
        /// Path of the `.wasm` on the host.
        path: String,
        /// Path of the manifest; default `Component.toml` in the same directory.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        manifest_path: Option<String>,
    },
}

/// An ed25519 signature over a component's digest and manifest ([`signed_bytes`]) by an
/// issuer key (an nkeys operator key, `O…`; made by `trellis key new`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ComponentSignature {
    /// The issuer's public key (`O…`, 56 characters).
    pub issuer: String,
    /// The signature, base64 (URL-safe alphabet, no padding).
    pub signature: String,
}

/// What a [`ComponentSignature`] signs: a fixed context line, the digest of the `.wasm`, and the
/// validated manifest as JSON, so that neither the code nor its limits and capabilities can be
/// changed under a signature.
pub fn signed_bytes(digest: &str, manifest: &ManifestDoc) -> Vec<u8> {
    let mut bytes = format!("trellis-component-v1\n{digest}\n").into_bytes();
    // A struct of plain fields and vectors: its JSON is the same wherever it is made.
    bytes.extend(serde_json::to_vec(manifest).unwrap_or_default());
    bytes
}

/// Command to a host: start an instance (`trellis.host.v1.<lattice>.<host>.instance.start`).
/// The host answers at once (accepted or not) and reports the outcome as a fact.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartInstanceCommand {
    /// The operation this belongs to; facts carry it as `causationid`.
    pub operation_id: String,
    /// The new instance's id.
    pub instance_id: InstanceId,
    /// The component.
    pub component: ComponentSource,
    /// What to do on a crash.
    pub restart: RestartPolicy,
    /// The assignments that apply to the instance when it is placed (its own and its
    /// component's), so the host can check required capabilities without waiting for the facts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub assignments: Vec<AssignmentRecord>,
    /// The isolation the start asked for; the host runs the stronger of it and the
    /// manifest's. Absent: the manifest's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub isolation: Option<crate::isolation::Isolation>,
}

/// Command to a host: spawn and supervise a provider process
/// (`trellis.host.v1.<lattice>.<host>.provider.start`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartProviderCommand {
    /// The operation this belongs to; facts carry it as `causationid`.
    pub operation_id: String,
    /// The new process's id.
    pub provider_id: ProviderId,
    /// The provider: the host runs `trellis-provider-<name>`.
    pub name: ProviderName,
    /// Settings passed as `--config key=value`.
    #[serde(default)]
    pub config: std::collections::BTreeMap<String, String>,
    /// Run the provider inside the host's process instead of spawning its binary: the host's
    /// own instances then call it without a NATS round trip (see `ProviderStartRequest`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub embedded: bool,
}

/// Command to a host: stop a provider it supervises, without restarting it
/// (`trellis.host.v1.<lattice>.<host>.provider.stop`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StopProviderCommand {
    /// The operation this belongs to.
    pub operation_id: String,
    /// The process.
    pub provider_id: ProviderId,
}

/// Command to a host: stop an instance (`trellis.host.v1.<lattice>.<host>.instance.stop`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StopInstanceCommand {
    /// The operation this belongs to.
    pub operation_id: String,
    /// The instance.
    pub instance_id: InstanceId,
    /// Why, as `instance.stopped` will say (default `requested`; `rollout` when a rollout
    /// retires it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Command to a host: the counters of some of its instances
/// (`trellis.host.v1.<lattice>.<host>.instance.stats`); the reply is [`InstanceStatsReply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceStatsCommand {
    /// The instances; those the host does not run are left out of the reply.
    pub instance_ids: Vec<InstanceId>,
}

/// The upper bounds, in microseconds, of the latency buckets of [`InstanceStats`]; one more
/// bucket counts what is slower than the last.
pub const LATENCY_BOUNDS_US: [u64; 14] = [
    250, 500, 1_000, 2_000, 5_000, 10_000, 20_000, 50_000, 100_000, 200_000, 500_000, 1_000_000,
    2_000_000, 5_000_000,
];

/// What an instance has served since it started, over all its serving periods: what rollout
/// analysis judges a new version by.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceStats {
    /// Invocations answered (calls and HTTP requests).
    pub calls: u64,
    /// Of those, the ones that failed on the server's side: a crash, an error of HTTP status
    /// 500 or more, or an HTTP response the component gave with such a status.
    pub errors: u64,
    /// Crashes (each ends a serving period).
    pub crashes: u64,
    /// Invocations per latency bucket ([`LATENCY_BOUNDS_US`], then one for slower ones).
    pub latency: Vec<u64>,
}

impl InstanceStats {
    /// Adds `other`'s counts to these.
    pub fn add(&mut self, other: &InstanceStats) {
        self.calls += other.calls;
        self.errors += other.errors;
        self.crashes += other.crashes;
        if self.latency.len() < other.latency.len() {
            self.latency.resize(other.latency.len(), 0);
        }
        for (mine, theirs) in self.latency.iter_mut().zip(&other.latency) {
            *mine += theirs;
        }
    }

    /// The latency, in microseconds, that a share `q` (0 to 1) of the invocations stayed within:
    /// the upper bound of the bucket where it falls (`u64::MAX` beyond the last). `None` with no
    /// invocations.
    pub fn quantile_us(&self, q: f64) -> Option<u64> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let want = (q.clamp(0.0, 1.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= want {
                return Some(LATENCY_BOUNDS_US.get(i).copied().unwrap_or(u64::MAX));
            }
        }
        Some(u64::MAX)
    }
}

/// A host's answer to [`InstanceStatsCommand`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceStatsReply {
    /// The counters of each instance asked for that the host runs.
    pub stats: std::collections::BTreeMap<InstanceId, InstanceStats>,
}

/// A command to a host: its body type tied to its verb, as [`CtlRequest`](crate::CtlRequest)
/// ties a control request to its operation.
pub trait HostCommand: Serialize + serde::de::DeserializeOwned {
    /// The verb the command is sent on.
    const VERB: HostVerb;
}

impl HostCommand for StartInstanceCommand {
    const VERB: HostVerb = HostVerb::InstanceStart;
}

impl HostCommand for StopInstanceCommand {
    const VERB: HostVerb = HostVerb::InstanceStop;
}

impl HostCommand for InstanceStatsCommand {
    const VERB: HostVerb = HostVerb::InstanceStats;
}

impl HostCommand for StartProviderCommand {
    const VERB: HostVerb = HostVerb::ProviderStart;
}

impl HostCommand for StopProviderCommand {
    const VERB: HostVerb = HostVerb::ProviderStop;
}

/// A host's answer to a command: accepted; the outcome follows as a fact.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CommandAccepted {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_policies_parse_and_print() {
        assert_eq!("never".parse(), Ok(RestartPolicy::Never));
        assert_eq!("always".parse(), Ok(RestartPolicy::Always));
        let p: RestartPolicy = "backoff:100ms,2s,5".parse().expect("valid");
        assert_eq!(
            p,
            RestartPolicy::Backoff {
                initial_ms: 100,
                max_ms: 2000,
                max_attempts: Some(5)
            }
        );
        assert_eq!(p.to_string().parse::<RestartPolicy>(), Ok(p));
        assert!("backoff:1s".parse::<RestartPolicy>().is_err());
        assert!("backoff:5s,1s".parse::<RestartPolicy>().is_err());
        assert!("backoff:1s,2s,0".parse::<RestartPolicy>().is_err());
        assert!("sometimes".parse::<RestartPolicy>().is_err());
    }

    #[test]
    fn backoff_grows_and_caps_and_gives_up() {
        let p = RestartPolicy::Backoff {
            initial_ms: 100,
            max_ms: 1000,
            max_attempts: Some(6),
        };
        let delays: Vec<Option<u64>> = (1..=7)
            .map(|a| p.delay(a).map(|d| d.as_millis() as u64))
            .collect();
        assert_eq!(
            delays,
            vec![
                Some(100),
                Some(200),
                Some(400),
                Some(800),
                Some(1000),
                Some(1000),
                None
            ]
        );
        assert_eq!(RestartPolicy::Never.delay(1), None);
        assert_eq!(RestartPolicy::Always.delay(1000), Some(Duration::ZERO));
        let unbounded = RestartPolicy::Backoff {
            initial_ms: 1,
            max_ms: 10,
            max_attempts: None,
        };
        assert_eq!(unbounded.delay(200), Some(Duration::from_millis(10)));
    }

    #[test]
    fn manifest_doc_round_trips() {
        let m: Manifest = "[component]\nname = \"c\"\nversion = \"1.0.0\"\n[limits]\nmax_memory = \"1MiB\"\nfuel = 10000\ntimeout = \"1s\"\nmax_concurrency = 2\n"
            .parse()
            .expect("valid");
        let doc = ManifestDoc::from_manifest(&m).expect("valid");
        assert_eq!(doc.max_memory_bytes, 1 << 20);
        assert_eq!(doc.to_manifest().expect("valid"), m);
        let bad = ManifestDoc { fuel: 0, ..doc };
        assert_eq!(
            bad.to_manifest().expect_err("fuel 0").field(),
            Some("limits.fuel")
        );
    }
}
