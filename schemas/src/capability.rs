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
//! | `wasi:keyvalue` | imports `wasi:keyvalue/{store,atomics,batch}` | `kv` | `bucket` (required) |
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

use crate::names::{AssignmentId, ComponentName, InstanceId, Lattice, ProviderName};

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
            "wasi:keyvalue/store" | "wasi:keyvalue/atomics" | "wasi:keyvalue/batch" => {
                Some(Capability::KeyValue)
            }
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

/// The RPC protocol between hosts, providers and components (the data plane of capabilities).
///
/// - A host forwards a component's capability call to
///   `trellis.rpc.v1.<lattice>.provider.<provider>.<capability-token>` (queue group
///   [`provider_queue`]) with the caller's identity in headers ([`INSTANCE`], [`COMPONENT`],
///   [`ASSIGNMENT`], [`MIN_SEQ`]). The body is JSON ([`KvRequest`], [`MessagingRequest`]) or, for
///   HTTP, the raw request body with the request head in the [`HTTP_HEAD`] header.
/// - The reply has [`STATUS`] `ok` or `error`; errors carry [`ERROR_CODE`] (an [`RpcErrorCode`])
///   and [`ERROR`] (a message).
/// - The `http-server` provider sends each request to
///   `trellis.rpc.v1.<lattice>.component.<component>.http` (or `…instance.<id>.http`), which every
///   instance of the component serves in its queue group; the reply carries the response head in
///   [`HTTP_HEAD`] and the body as payload.
/// - The `messaging` provider delivers a subscribed message by calling the component's
///   `wasmcloud:messaging/handler#handle-message` export over the ordinary call subject.
pub mod rpc {
    use super::*;

    /// Request header: the calling instance.
    pub const INSTANCE: &str = "Trellis-Instance";
    /// Request header: the calling instance's component.
    pub const COMPONENT: &str = "Trellis-Component";
    /// Request header: the assignment the host resolved for the call.
    pub const ASSIGNMENT: &str = "Trellis-Assignment";
    /// Request header: the stream sequence of that assignment's fact; a provider whose
    /// projection is older waits (briefly) to catch up before deciding.
    pub const MIN_SEQ: &str = "Trellis-Min-Seq";
    /// Reply header: `ok` or `error`.
    pub const STATUS: &str = "Trellis-Status";
    /// Reply header on errors: an [`RpcErrorCode`].
    pub const ERROR_CODE: &str = "Trellis-Error-Code";
    /// Reply header on errors: what went wrong.
    pub const ERROR: &str = "Trellis-Error";
    /// Request/reply header with an [`HttpRequestHead`] or [`HttpResponseHead`] as JSON.
    pub const HTTP_HEAD: &str = "Trellis-Http";
    /// Largest body a capability call or an HTTP message may carry over NATS, in bytes.
    pub const MAX_BODY_BYTES: usize = 1024 * 1024;

    /// The subject a provider serves one capability on.
    pub fn provider_rpc(lattice: &Lattice, provider: &ProviderName, cap: Capability) -> String {
        format!(
            "trellis.rpc.v1.{lattice}.provider.{provider}.{}",
            cap.token()
        )
    }

    /// The queue group all processes of a provider serve in.
    pub fn provider_queue(provider: &ProviderName) -> String {
        format!("trellis-provider-{provider}")
    }

    /// The subject one provider process takes control requests on (`stop`, `health`).
    pub fn provider_control(
        lattice: &Lattice,
        provider: &crate::names::ProviderId,
        verb: &str,
    ) -> String {
        format!("trellis.prov.v1.{lattice}.{provider}.{verb}")
    }

    /// The subject on which any instance of `component` serves HTTP requests.
    pub fn component_http(lattice: &Lattice, component: &ComponentName) -> String {
        format!("trellis.rpc.v1.{lattice}.component.{component}.http")
    }

    /// The subject on which one instance serves HTTP requests.
    pub fn instance_http(lattice: &Lattice, instance: &InstanceId) -> String {
        format!("trellis.rpc.v1.{lattice}.instance.{instance}.http")
    }

    /// Why a capability call failed. Stable strings on the wire.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "snake_case")]
    #[non_exhaustive]
    pub enum RpcErrorCode {
        /// No assignment grants the capability to the caller, or it does not cover the resource.
        AccessDenied,
        /// The store named by the component is not the one its assignment grants.
        NoSuchStore,
        /// The request is malformed.
        InvalidRequest,
        /// The body is over [`MAX_BODY_BYTES`].
        TooLarge,
        /// No provider answered in time, or the provider's backend is unreachable.
        Unavailable,
        /// The upstream (HTTP server, NATS responder) failed; the message says how.
        Upstream,
        /// A bug or an unexpected backend error.
        Internal,
    }

    impl RpcErrorCode {
        /// The code as on the wire.
        pub fn as_str(self) -> &'static str {
            match self {
                RpcErrorCode::AccessDenied => "access_denied",
                RpcErrorCode::NoSuchStore => "no_such_store",
                RpcErrorCode::InvalidRequest => "invalid_request",
                RpcErrorCode::TooLarge => "too_large",
                RpcErrorCode::Unavailable => "unavailable",
                RpcErrorCode::Upstream => "upstream",
                RpcErrorCode::Internal => "internal",
            }
        }

        /// Parses a wire code; unknown codes read as [`RpcErrorCode::Internal`].
        pub fn parse(code: &str) -> Self {
            [
                RpcErrorCode::AccessDenied,
                RpcErrorCode::NoSuchStore,
                RpcErrorCode::InvalidRequest,
                RpcErrorCode::TooLarge,
                RpcErrorCode::Unavailable,
                RpcErrorCode::Upstream,
            ]
            .into_iter()
            .find(|c| c.as_str() == code)
            .unwrap_or(RpcErrorCode::Internal)
        }
    }

    impl fmt::Display for RpcErrorCode {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(self.as_str())
        }
    }

    /// Bytes carried in JSON as standard base64.
    pub mod b64 {
        use base64::Engine as _;
        use base64::engine::general_purpose::STANDARD;
        use serde::{Deserialize, Deserializer, Serializer};

        /// Serializes bytes as a base64 string.
        pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_str(&STANDARD.encode(bytes))
        }

        /// Deserializes a base64 string into bytes.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
            let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            STANDARD
                .decode(s.as_bytes())
                .map_err(serde::de::Error::custom)
        }
    }

    /// Optional bytes as base64 or `null`.
    pub mod b64_opt {
        use base64::Engine as _;
        use base64::engine::general_purpose::STANDARD;
        use serde::{Deserialize, Deserializer, Serializer};

        /// Serializes optional bytes.
        pub fn serialize<S: Serializer>(bytes: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
            match bytes {
                Some(b) => s.serialize_some(&STANDARD.encode(b)),
                None => s.serialize_none(),
            }
        }

        /// Deserializes optional bytes.
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
            let s = Option::<std::borrow::Cow<'de, str>>::deserialize(d)?;
            s.map(|s| {
                STANDARD
                    .decode(s.as_bytes())
                    .map_err(serde::de::Error::custom)
            })
            .transpose()
        }
    }

    /// Bytes as base64 in JSON, for lists.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(transparent)]
    pub struct Bytes64(
        #[serde(with = "b64")]
        #[schemars(with = "String")]
        pub Vec<u8>,
    );

    /// A `wasi:keyvalue` operation, sent by a host to the `kv` provider. `bucket` is the
    /// identifier the component passed to `store.open` (empty for "the assigned bucket").
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
    pub enum KvRequest {
        /// `store.open`: checks the identifier against the assignment.
        Open {
            /// The identifier.
            bucket: String,
        },
        /// `bucket.get`.
        Get {
            /// The identifier.
            bucket: String,
            /// The key.
            key: String,
        },
        /// `bucket.set`.
        Set {
            /// The identifier.
            bucket: String,
            /// The key.
            key: String,
            /// The value.
            value: Bytes64,
        },
        /// `bucket.delete`.
        Delete {
            /// The identifier.
            bucket: String,
            /// The key.
            key: String,
        },
        /// `bucket.exists`.
        Exists {
            /// The identifier.
            bucket: String,
            /// The key.
            key: String,
        },
        /// `bucket.list-keys`, one page.
        ListKeys {
            /// The identifier.
            bucket: String,
            /// Where the previous page ended.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            cursor: Option<u64>,
        },
        /// `atomics.increment`.
        Increment {
            /// The identifier.
            bucket: String,
            /// The key.
            key: String,
            /// The amount.
            delta: u64,
        },
        /// `batch.get-many`.
        GetMany {
            /// The identifier.
            bucket: String,
            /// The keys.
            keys: Vec<String>,
        },
        /// `batch.set-many`.
        SetMany {
            /// The identifier.
            bucket: String,
            /// Keys and values.
            pairs: Vec<(String, Bytes64)>,
        },
        /// `batch.delete-many`.
        DeleteMany {
            /// The identifier.
            bucket: String,
            /// The keys.
            keys: Vec<String>,
        },
    }

    impl KvRequest {
        /// The identifier the operation names.
        pub fn bucket(&self) -> &str {
            match self {
                KvRequest::Open { bucket }
                | KvRequest::Get { bucket, .. }
                | KvRequest::Set { bucket, .. }
                | KvRequest::Delete { bucket, .. }
                | KvRequest::Exists { bucket, .. }
                | KvRequest::ListKeys { bucket, .. }
                | KvRequest::Increment { bucket, .. }
                | KvRequest::GetMany { bucket, .. }
                | KvRequest::SetMany { bucket, .. }
                | KvRequest::DeleteMany { bucket, .. } => bucket,
            }
        }
    }

    /// The `kv` provider's successful answer; which fields are set depends on the operation.
    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct KvReply {
        /// `get`: the value, if the key exists.
        #[serde(default, with = "b64_opt", skip_serializing_if = "Option::is_none")]
        #[schemars(with = "Option<String>")]
        pub value: Option<Vec<u8>>,
        /// `exists`: whether the key exists.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub exists: Option<bool>,
        /// `increment`: the new value.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub number: Option<u64>,
        /// `list_keys`: the keys of this page.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub keys: Vec<String>,
        /// `list_keys`: where the next page starts, if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub cursor: Option<u64>,
        /// `get_many`: values in the order of the keys asked.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        pub values: Vec<Option<Bytes64>>,
    }

    /// A `wasmcloud:messaging/consumer` operation, sent by a host to the `messaging` provider.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
    pub enum MessagingRequest {
        /// `consumer.publish`.
        Publish {
            /// The message.
            message: BrokerMessage,
        },
        /// `consumer.request`: publish and wait for one reply.
        Request {
            /// The subject.
            subject: String,
            /// The body.
            body: Bytes64,
            /// How long to wait for the reply, in milliseconds.
            timeout_ms: u32,
        },
    }

    /// A message as `wasmcloud:messaging` sees it.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct BrokerMessage {
        /// The subject.
        pub subject: String,
        /// The body.
        pub body: Bytes64,
        /// Where to reply, if anywhere.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub reply_to: Option<String>,
    }

    /// The head of an HTTP request carried over NATS (in the [`HTTP_HEAD`] header; the body is
    /// the payload).
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct HttpRequestHead {
        /// The method (`GET`).
        pub method: String,
        /// For outgoing requests the absolute URL; for incoming ones the path and query.
        pub uri: String,
        /// The `Host` the client asked for (incoming requests).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub authority: Option<String>,
        /// Header names and values, in order (values are UTF-8; others are dropped).
        #[serde(default)]
        pub headers: Vec<(String, String)>,
        /// How long the caller waits for the response, in milliseconds (outgoing requests).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pub timeout_ms: Option<u64>,
    }

    /// The head of an HTTP response carried over NATS.
    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
    #[serde(deny_unknown_fields)]
    pub struct HttpResponseHead {
        /// The status code.
        pub status: u16,
        /// Header names and values, in order.
        #[serde(default)]
        pub headers: Vec<(String, String)>,
    }
}

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

    #[test]
    fn kv_requests_round_trip() {
        let req = rpc::KvRequest::Set {
            bucket: String::new(),
            key: "k".into(),
            value: rpc::Bytes64(vec![0, 1, 255]),
        };
        let json = serde_json::to_string(&req).expect("json");
        assert_eq!(json, r#"{"op":"set","bucket":"","key":"k","value":"AAH/"}"#);
        let back: rpc::KvRequest = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, req);
        let reply = rpc::KvReply {
            value: Some(b"hi".to_vec()),
            ..Default::default()
        };
        let json = serde_json::to_string(&reply).expect("json");
        assert_eq!(json, r#"{"value":"aGk="}"#);
        assert_eq!(
            serde_json::from_str::<rpc::KvReply>(&json).expect("parses"),
            reply
        );
    }
}
