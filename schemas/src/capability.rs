//! Capabilities, their assignments, and the RPC protocol between hosts, providers and components.
//!
//! A component can do nothing but compute until a capability is **assigned** to it: an
//! assignment names a target (one instance, or every instance of a component), a [`Capability`],
//! the provider that serves it and that provider's configuration for this target (the bucket, the
//! listen address, the allowed hosts or subjects). Assignments are facts
//! (`assignment.granted` / `assignment.revoked`); the host checks them before it forwards a call
//! and the provider checks them again against its own projection of the facts.
//!
//! | capability | the component | provider | configuration |
//! |---|---|---|---|
//! | `wasi:keyvalue` | imports `wasi:keyvalue/{store,atomics,batch}` or `fermyon:spin/key-value` | `kv` | `bucket` (required) |
//! | `wasi:http/incoming-handler` | exports it | `http-server` | `address` (required) |
//! | `wasi:http/outgoing-handler` | imports it | `http-client` | `allowed_hosts` (required) |
//! | `wasmcloud:messaging` | imports `consumer`, exports `handler` | `messaging` | `subscribe`, `publish` |
//!
//! `wasi:logging` needs no assignment: like captured stdout, it only reaches the host's own log.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::names::{AssignmentId, ComponentName, InstanceId, ProviderName};

/// A capability a component can be granted.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[non_exhaustive]
pub enum Capability {
    /// Key-value storage (`wasi:keyvalue` 0.2.0-draft: store, atomics, batch).
    #[serde(rename = "wasi:keyvalue")]
    KeyValue,
    /// Inbound HTTP: requests are dispatched to the component's `wasi:http/incoming-handler`.
    #[serde(rename = "wasi:http/incoming-handler")]
    HttpIncoming,
    /// Outbound HTTP through `wasi:http/outgoing-handler`.
    #[serde(rename = "wasi:http/outgoing-handler")]
    HttpOutgoing,
    /// Publish/request through `wasmcloud:messaging/consumer`, delivery to its `handler`.
    #[serde(rename = "wasmcloud:messaging")]
    Messaging,
}

impl Capability {
    /// Every capability.
    pub const ALL: &'static [Capability] = &[
        Capability::KeyValue,
        Capability::HttpIncoming,
        Capability::HttpOutgoing,
        Capability::Messaging,
    ];

    /// The name used in assignments and manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::KeyValue => "wasi:keyvalue",
            Capability::HttpIncoming => "wasi:http/incoming-handler",
            Capability::HttpOutgoing => "wasi:http/outgoing-handler",
            Capability::Messaging => "wasmcloud:messaging",
        }
    }

    /// The subject token of the capability's RPC subject (see [`provider_rpc`]).
    pub fn token(self) -> &'static str {
        match self {
            Capability::KeyValue => "keyvalue",
            Capability::HttpIncoming => "http-incoming",
            Capability::HttpOutgoing => "http-outgoing",
            Capability::Messaging => "messaging",
        }
    }

    /// The provider that serves it when the grant names none.
    pub fn default_provider(self) -> &'static str {
        match self {
            Capability::KeyValue => "kv",
            Capability::HttpIncoming => "http-server",
            Capability::HttpOutgoing => "http-client",
            Capability::Messaging => "messaging",
        }
    }

    /// The capability an import (`wasi:keyvalue/store@0.2.0-draft`) belongs to, if it is one that
    /// needs an assignment.
    pub fn of_import(import: &str) -> Option<Self> {
        let base = crate::manifest::strip_version(import);
        match base {
            "wasi:keyvalue/store"
            | "wasi:keyvalue/atomics"
            | "wasi:keyvalue/batch"
            | "fermyon:spin/key-value" => Some(Capability::KeyValue),
            "wasi:http/outgoing-handler" => Some(Capability::HttpOutgoing),
            "wasmcloud:messaging/consumer" => Some(Capability::Messaging),
            _ => None,
        }
    }

    /// Checks an assignment's configuration: required keys present, values well formed, no
    /// unknown keys (a typo must not silently widen or drop a restriction).
    pub fn validate_config(self, config: &BTreeMap<String, String>) -> Result<(), String> {
        let (required, optional): (&[&str], &[&str]) = match self {
            Capability::KeyValue => (&["bucket"], &[]),
            Capability::HttpIncoming => (&["address"], &[]),
            Capability::HttpOutgoing => (&["allowed_hosts"], &["timeout_ms"]),
            Capability::Messaging => (&[], &["subscribe", "publish"]),
        };
        for key in required {
            if !config.contains_key(*key) {
                return Err(format!(
                    "{} needs the configuration key `{key}` (--config {key}=…)",
                    self.as_str()
                ));
            }
        }
        for key in config.keys() {
            if !required.contains(&key.as_str()) && !optional.contains(&key.as_str()) {
                let mut known: Vec<&str> = required.iter().chain(optional).copied().collect();
                known.sort_unstable();
                return Err(format!(
                    "unknown configuration key `{key}` for {} (known: {})",
                    self.as_str(),
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ));
            }
        }
        match self {
            Capability::KeyValue => {
                let bucket = &config["bucket"];
                if !valid_bucket(bucket) {
                    return Err(format!(
                        "bucket {bucket:?} is not a JetStream KV bucket name (1 to 64 of A-Z, a-z, 0-9, '_' or '-')"
                    ));
                }
            }
            Capability::HttpIncoming => {
                let address = &config["address"];
                if address.parse::<std::net::SocketAddr>().is_err() {
                    return Err(format!(
                        "address {address:?} is not an IP address with a port (e.g. 0.0.0.0:8080)"
                    ));
                }
            }
            Capability::HttpOutgoing => {
                let hosts = split_list(&config["allowed_hosts"]);
                if hosts.is_empty() {
                    return Err("allowed_hosts lists no host".to_owned());
                }
                for host in hosts {
                    if host.contains(['/', ' ', '@']) {
                        return Err(format!(
                            "allowed host {host:?} must be a host name, `*.domain`, or host:port"
                        ));
                    }
                }
                if let Some(ms) = config.get("timeout_ms")
                    && !ms
                        .parse::<u64>()
                        .is_ok_and(|ms| (1..=600_000).contains(&ms))
                {
                    return Err(format!(
                        "timeout_ms {ms:?} must be a number of milliseconds in 1..=600000"
                    ));
                }
            }
            Capability::Messaging => {
                for key in ["subscribe", "publish"] {
                    for subject in config.get(key).map(|v| split_list(v)).unwrap_or_default() {
                        if !valid_subject_pattern(subject) {
                            return Err(format!(
                                "{key}: {subject:?} is not a NATS subject (tokens separated by '.', '*' and a final '>' allowed)"
                            ));
                        }
                        if subject.starts_with("trellis.") || subject.starts_with("$") {
                            return Err(format!(
                                "{key}: {subject:?} is reserved for the lattice itself"
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Capability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let base = crate::manifest::strip_version(s);
        Capability::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == base)
            .ok_or_else(|| {
                let known: Vec<&str> = Capability::ALL.iter().map(|c| c.as_str()).collect();
                format!("unknown capability {s:?} (known: {})", known.join(", "))
            })
    }
}

/// A comma-separated configuration list, trimmed, without empty items.
pub fn split_list(value: &str) -> Vec<&str> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

fn valid_bucket(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Whether `subject` is a NATS subject or pattern: non-empty tokens without whitespace, `*`
/// standing alone in a token, `>` only as the last token.
pub fn valid_subject_pattern(subject: &str) -> bool {
    if subject.is_empty() || subject.len() > 256 {
        return false;
    }
    let tokens: Vec<&str> = subject.split('.').collect();
    tokens.iter().enumerate().all(|(i, t)| {
        !t.is_empty()
            && !t.chars().any(|c| c.is_whitespace() || c.is_control())
            && (*t == "*" || *t == ">" || !t.contains(['*', '>']))
            && (*t != ">" || i + 1 == tokens.len())
    })
}

/// Whether the concrete `subject` matches the NATS `pattern` (`*` one token, `>` the rest).
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Whether `host` (optionally `host:port`) is allowed by an `allowed_hosts` list: an entry is a
/// host name (any port), `host:port` (that port only), `*.domain` (subdomains) or `*` (any).
pub fn host_allowed(allowed: &str, host: &str, port: Option<u16>) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    split_list(allowed).into_iter().any(|entry| {
        let entry = entry.to_ascii_lowercase();
        if entry == "*" {
            return true;
        }
        let (name, entry_port) = match entry.rsplit_once(':') {
            Some((name, p)) if !name.contains(':') || name.starts_with('[') => {
                (name.to_owned(), p.parse::<u16>().ok())
            }
            _ => (entry.clone(), None),
        };
        if entry_port.is_some() && entry_port != port {
            return false;
        }
        match name.strip_prefix("*.") {
            Some(domain) => host.ends_with(&format!(".{domain}")),
            None => name.trim_matches(['[', ']']) == host.trim_matches(['[', ']']),
        }
    })
}

/// Who an assignment is for.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum AssignmentTarget {
    /// One instance.
    Instance(InstanceId),
    /// Every instance of a component, present and future.
    Component(ComponentName),
}

impl AssignmentTarget {
    /// `instance:<id>` or `component:<name>`, for people.
    pub fn describe(&self) -> String {
        match self {
            AssignmentTarget::Instance(id) => format!("instance:{id}"),
            AssignmentTarget::Component(name) => format!("component:{name}"),
        }
    }
}

/// A capability granted to a target, served by a provider, with that provider's configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    /// The assignment.
    pub assignment_id: AssignmentId,
    /// Who is granted the capability.
    pub target: AssignmentTarget,
    /// What is granted.
    pub capability: Capability,
    /// The provider (by name) that serves it.
    pub provider: ProviderName,
    /// The provider's configuration for this target (see [`Capability::validate_config`]).
    #[serde(default)]
    pub config: BTreeMap<String, String>,
}

pub mod rpc;

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn capabilities_parse_with_or_without_version() {
        for c in Capability::ALL {
            assert_eq!(c.as_str().parse::<Capability>(), Ok(*c));
            let json = serde_json::to_string(c).expect("json");
            assert_eq!(json, format!("\"{}\"", c.as_str()));
        }
        assert_eq!(
            "wasi:keyvalue@0.2.0-draft".parse::<Capability>(),
            Ok(Capability::KeyValue)
        );
        let err = "wasi:filesystem"
            .parse::<Capability>()
            .expect_err("unknown");
        assert!(err.contains("wasi:keyvalue"), "{err}");
    }

    #[test]
    fn imports_map_to_capabilities() {
        assert_eq!(
            Capability::of_import("wasi:keyvalue/atomics@0.2.0-draft"),
            Some(Capability::KeyValue)
        );
        assert_eq!(
            Capability::of_import("fermyon:spin/key-value@2.0.0"),
            Some(Capability::KeyValue)
        );
        assert_eq!(
            Capability::of_import("wasi:http/outgoing-handler@0.2.6"),
            Some(Capability::HttpOutgoing)
        );
        assert_eq!(
            Capability::of_import("wasmcloud:messaging/consumer@0.2.0"),
            Some(Capability::Messaging)
        );
        assert_eq!(Capability::of_import("wasi:http/types@0.2.6"), None);
        assert_eq!(Capability::of_import("wasi:logging/logging"), None);
    }

    #[test]
    fn configs_are_validated() {
        let kv = Capability::KeyValue;
        assert!(kv.validate_config(&config(&[("bucket", "counts")])).is_ok());
        let err = kv.validate_config(&config(&[])).expect_err("missing");
        assert!(err.contains("bucket"), "{err}");
        assert!(kv.validate_config(&config(&[("bucket", "a.b")])).is_err());
        let err = kv
            .validate_config(&config(&[("bucket", "a"), ("buckett", "b")]))
            .expect_err("unknown key");
        assert!(err.contains("buckett"), "{err}");
        let http = Capability::HttpIncoming;
        assert!(
            http.validate_config(&config(&[("address", "127.0.0.1:8080")]))
                .is_ok()
        );
        assert!(
            http.validate_config(&config(&[("address", "localhost")]))
                .is_err()
        );
        let out = Capability::HttpOutgoing;
        assert!(
            out.validate_config(&config(&[("allowed_hosts", "example.com,*.x.org")]))
                .is_ok()
        );
        assert!(
            out.validate_config(&config(&[("allowed_hosts", " , ")]))
                .is_err()
        );
        let msg = Capability::Messaging;
        assert!(
            msg.validate_config(&config(&[("subscribe", "a.*,b.>"), ("publish", "out.>")]))
                .is_ok()
        );
        assert!(
            msg.validate_config(&config(&[("publish", "a.>.b")]))
                .is_err()
        );
        assert!(
            msg.validate_config(&config(&[("publish", "trellis.ctl.>")]))
                .is_err()
        );
    }

    #[test]
    fn subject_patterns_match_like_nats() {
        assert!(subject_matches("a.*", "a.b"));
        assert!(!subject_matches("a.*", "a.b.c"));
        assert!(subject_matches("a.>", "a.b.c"));
        assert!(!subject_matches("a.>", "a"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.c"));
        assert!(valid_subject_pattern("a.*.>"));
        assert!(!valid_subject_pattern("a..b"));
        assert!(!valid_subject_pattern("a b"));
        assert!(!valid_subject_pattern("a*"));
    }

    #[test]
    fn hosts_are_allowed_by_name_port_or_domain() {
        assert!(host_allowed("example.com", "example.com", Some(443)));
        assert!(host_allowed("Example.com", "example.COM", None));
        assert!(!host_allowed("example.com", "evil.com", Some(443)));
        assert!(host_allowed("127.0.0.1:8080", "127.0.0.1", Some(8080)));
        assert!(!host_allowed("127.0.0.1:8080", "127.0.0.1", Some(8081)));
        assert!(host_allowed("*.example.com", "api.example.com", Some(80)));
        assert!(!host_allowed("*.example.com", "example.com", Some(80)));
        assert!(!host_allowed("*.example.com", "evilexample.com", Some(80)));
        assert!(host_allowed("*", "anything", None));
    }
}
