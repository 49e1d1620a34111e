//! An optional registry in etcd: which nodes exist and which providers they offer.
//!
//! Trellis needs nothing but NATS. A deployment that already runs etcd may ask hosts (and,
//! through the same API, providers) to record themselves there with `--registry etcd://host:port`,
//! so that tools which know etcd can see the lattice's members. The registry holds **node
//! existence and provider metadata and nothing else**: no instance state, no logs, no desired
//! state (facts stay in the JetStream stream).
//!
//! # Keys
//!
//! - `/trellis/<lattice>/nodes/<node_id>`: a JSON document describing a live node, attached to a
//!   lease (a TTL of about three heartbeats, kept alive), so that the key disappears on its own
//!   when the node dies.
//! - `/trellis/<lattice>/providers/<provider_id>`: a JSON document describing a provider, leased
//!   the same way.
//!
//! # Protocol
//!
//! etcd's v3 API through its JSON gateway (`POST /v3/lease/grant`, `/v3/kv/put`,
//! `/v3/lease/keepalive`, `/v3/kv/range`, `/v3/lease/revoke`; keys and values base64-encoded),
//! spoken with hyper's HTTP/1.1 client over pooled connections. No gRPC stack and no protobuf
//! compiler at build time: the JSON gateway is part of every etcd v3 server.
//!
//! [`Registration`] keeps one key alive in the background: it grants a lease, puts the key,
//! refreshes the lease every third of its TTL, puts the key again if the lease expired (etcd was
//! away, or the process was paused), and revokes the lease when dropped, so a node that drains
//! disappears at once. etcd being unreachable is logged and retried, never fatal.

use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};
use tokio::task::JoinHandle;
use trellis_schemas::Lattice;

/// The largest reply read from etcd.
const MAX_REPLY: usize = 16 << 20;
/// How long one request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// A registry request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// The URL is not `etcd://host:port` (or `http://host:port`).
    #[error("registry URL {0:?} is not etcd://host:port")]
    Url(String),
    /// etcd could not be reached or the connection failed.
    #[error("etcd at {addr}: {message}")]
    Io {
        /// `host:port`.
        addr: String,
        /// What went wrong.
        message: String,
    },
    /// etcd answered with an error.
    #[error("etcd {path} answered {status}: {body}")]
    Status {
        /// The request path.
        path: String,
        /// The HTTP status.
        status: u16,
        /// The reply body.
        body: String,
    },
    /// The reply could not be understood.
    #[error("etcd {path}: malformed reply: {message}")]
    Malformed {
        /// The request path.
        path: String,
        /// What was wrong.
        message: String,
    },
}

/// One key and its value, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The key.
    pub key: String,
    /// The value.
    pub value: Vec<u8>,
    /// The lease the key is attached to (0: none).
    pub lease: i64,
}

/// A client of one etcd endpoint, scoped to one lattice's keys. Clones share one connection
/// pool.
#[derive(Debug, Clone)]
pub struct EtcdRegistry {
    host: String,
    port: u16,
    prefix: String,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl EtcdRegistry {
    /// A registry at `url` (`etcd://host:port`, or `http://host:port`; the port defaults to 2379)
    /// for `lattice`. Nothing is contacted yet.
    pub fn new(url: &str, lattice: &Lattice) -> Result<Self, RegistryError> {
        let rest = url
            .strip_prefix("etcd://")
            .or_else(|| url.strip_prefix("http://"))
            .ok_or_else(|| RegistryError::Url(url.to_owned()))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') || authority.contains('@') {
            return Err(RegistryError::Url(url.to_owned()));
        }
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| RegistryError::Url(url.to_owned()))?,
            ),
            None => (authority, 2379),
        };
        if host.is_empty() {
            return Err(RegistryError::Url(url.to_owned()));
        }
        // The URI every request is built from must parse; check it once here.
        format!("http://{host}:{port}/")
            .parse::<hyper::Uri>()
            .map_err(|_| RegistryError::Url(url.to_owned()))?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(REQUEST_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            host: host.to_owned(),
            port,
            prefix: format!("/trellis/{lattice}/"),
            client,
        })
    }

    /// `/trellis/<lattice>/`: every key of the lattice starts with it.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `/trellis/<lattice>/nodes/<node_id>`.
    pub fn node_key(&self, node_id: &str) -> String {
        format!("{}nodes/{node_id}", self.prefix)
    }

    /// `/trellis/<lattice>/providers/<provider_id>`.
    pub fn provider_key(&self, provider_id: &str) -> String {
        format!("{}providers/{provider_id}", self.prefix)
    }

    /// Grants a lease of `ttl` (whole seconds, at least 1); returns its id.
    pub async fn grant(&self, ttl: Duration) -> Result<i64, RegistryError> {
        let path = "/v3/lease/grant";
        let reply = self
            .post(path, &json!({ "TTL": ttl.as_secs().max(1) }))
            .await?;
        int_field(&reply, "ID").ok_or_else(|| malformed(path, "no lease ID"))
    }

    /// Refreshes lease `id`; returns its remaining TTL in seconds, 0 when it has expired.
    pub async fn keep_alive(&self, id: i64) -> Result<i64, RegistryError> {
        let reply = self
            .post("/v3/lease/keepalive", &json!({ "ID": id.to_string() }))
            .await?;
        let result = reply.get("result").unwrap_or(&reply);
        Ok(int_field(result, "TTL").unwrap_or(0))
    }

    /// Revokes lease `id`, deleting every key attached to it.
    pub async fn revoke(&self, id: i64) -> Result<(), RegistryError> {
        self.post("/v3/lease/revoke", &json!({ "ID": id.to_string() }))
            .await
            .map(|_| ())
    }

    /// Puts `key` = `value`, attached to `lease` when given.
    pub async fn put(
        &self,
        key: &str,
        value: &[u8],
        lease: Option<i64>,
    ) -> Result<(), RegistryError> {
        let mut body = json!({ "key": B64.encode(key), "value": B64.encode(value) });
        if let Some(lease) = lease {
            body["lease"] = Value::String(lease.to_string());
        }
        self.post("/v3/kv/put", &body).await.map(|_| ())
    }

    /// Deletes `key`.
    pub async fn delete(&self, key: &str) -> Result<(), RegistryError> {
        self.post("/v3/kv/deleterange", &json!({ "key": B64.encode(key) }))
            .await
            .map(|_| ())
    }

    /// Every key starting with `prefix` (an empty prefix reads the whole keyspace), in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Entry>, RegistryError> {
        let path = "/v3/kv/range";
        let (key, end) = if prefix.is_empty() {
            (vec![0u8], vec![0u8])
        } else {
            (prefix.as_bytes().to_vec(), prefix_end(prefix.as_bytes()))
        };
        let reply = self
            .post(
                path,
                &json!({ "key": B64.encode(key), "range_end": B64.encode(end) }),
            )
            .await?;
        let Some(kvs) = reply.get("kvs").and_then(Value::as_array) else {
            return Ok(Vec::new());
        };
        kvs.iter()
            .map(|kv| {
                let decode = |field: &str| {
                    kv.get(field)
                        .and_then(Value::as_str)
                        .map(|s| B64.decode(s))
                        .transpose()
                        .map_err(|e| malformed(path, &format!("{field}: {e}")))
                        .map(Option::unwrap_or_default)
                };
                let key = String::from_utf8(decode("key")?)
                    .map_err(|_| malformed(path, "key is not UTF-8"))?;
                Ok(Entry {
                    key,
                    value: decode("value")?,
                    lease: int_field(kv, "lease").unwrap_or(0),
                })
            })
            .collect()
    }

    /// Sends one JSON request; returns the JSON reply (the first message of a streaming reply,
    /// such as keepalive's).
    async fn post(&self, path: &str, body: &Value) -> Result<Value, RegistryError> {
        let addr = format!("{}:{}", self.host, self.port);
        let io = |message: String| RegistryError::Io {
            addr: addr.clone(),
            message,
        };
        let request = hyper::Request::post(format!("http://{addr}{path}"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| malformed(path, &format!("cannot build the request: {e}")))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| io(crate::error_chain(&e)))?;
            let status = response.status();
            let reply = first_document(response.into_body(), &addr, path).await?;
            Ok::<_, RegistryError>((status, reply))
        };
        let (status, reply) = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .map_err(|_| io(format!("no reply within {REQUEST_TIMEOUT:?}")))??;
        if status != hyper::StatusCode::OK {
            return Err(RegistryError::Status {
                path: path.to_owned(),
                status: status.as_u16(),
                body: String::from_utf8_lossy(&reply).into_owned(),
            });
        }
        serde_json::from_slice(&reply).map_err(|e| malformed(path, &e.to_string()))
    }
}

/// Reads a reply body up to its first JSON document: the whole body of a unary reply, the first
/// newline-delimited message of a streaming one (the rest is not waited for). At most
/// [`MAX_REPLY`] bytes. A connection that fails while the body arrives is an I/O error.
async fn first_document<B>(mut body: B, addr: &str, path: &str) -> Result<Vec<u8>, RegistryError>
where
    B: hyper::body::Body<Data = Bytes> + Unpin,
    B::Error: std::error::Error,
{
    let mut buf: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| RegistryError::Io {
            addr: addr.to_owned(),
            message: crate::error_chain(&e),
        })?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buf.extend_from_slice(data);
        if buf.len() > MAX_REPLY {
            return Err(malformed(
                path,
                &format!("reply larger than {MAX_REPLY} bytes"),
            ));
        }
        if let Some(line) = complete_line(&buf) {
            return Ok(line.to_vec());
        }
    }
    Ok(buf.trim_ascii().to_vec())
}

/// The first non-blank line of `buf` among those ended by a newline, if any.
fn complete_line(buf: &[u8]) -> Option<&[u8]> {
    let end = buf.iter().rposition(|b| *b == b'\n')?;
    buf[..end]
        .split(|b| *b == b'\n')
        .map(<[u8]>::trim_ascii)
        .find(|line| !line.is_empty())
}

fn malformed(path: &str, message: &str) -> RegistryError {
    RegistryError::Malformed {
        path: path.to_owned(),
        message: message.to_owned(),
    }
}

/// etcd's JSON encodes 64-bit integers as strings.
fn int_field(value: &Value, field: &str) -> Option<i64> {
    match value.get(field)? {
        Value::String(s) => s.parse().ok(),
        Value::Number(n) => n.as_i64(),
        _ => None,
    }
}

/// The smallest key greater than every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// A key kept alive in the registry by a background task; dropping it (or [`Registration::end`])
/// removes the key.
#[derive(Debug)]
pub struct Registration {
    task: Option<JoinHandle<()>>,
    registry: EtcdRegistry,
    lease: tokio::sync::watch::Receiver<Option<i64>>,
}

impl Registration {
    /// Starts keeping `key` = `value` alive with a lease of `ttl` (at least 2 s, since etcd
    /// rounds shorter leases up), refreshed every third of it.
    pub fn spawn(registry: EtcdRegistry, key: String, value: Vec<u8>, ttl: Duration) -> Self {
        let ttl = ttl.max(Duration::from_secs(2));
        let ttl = Duration::from_secs(ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0));
        let (tx, lease) = tokio::sync::watch::channel(None);
        let task = tokio::spawn({
            let registry = registry.clone();
            async move {
                let period = ttl / 3;
                let mut current: Option<i64> = None;
                loop {
                    match current {
                        Some(id) => match registry.keep_alive(id).await {
                            Ok(remaining) if remaining > 0 => {}
                            Ok(_) => {
                                tracing::warn!(%key, "registry lease expired; registering again");
                                current = None;
                                continue;
                            }
                            Err(e) => tracing::warn!(%key, error = %e, "registry keepalive failed"),
                        },
                        None => match register(&registry, &key, &value, ttl).await {
                            Ok(id) => {
                                tracing::info!(%key, lease = id, ttl_s = ttl.as_secs(), "registered in etcd");
                                current = Some(id);
                                let _ = tx.send(current);
                            }
                            Err(e) => tracing::warn!(%key, error = %e, "cannot register in etcd"),
                        },
                    }
                    tokio::time::sleep(period).await;
                }
            }
        });
        Self {
            task: Some(task),
            registry,
            lease,
        }
    }

    /// Waits until the key is registered, up to `timeout`; returns whether it is.
    pub async fn registered(&mut self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.lease.wait_for(Option::is_some))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Stops refreshing and revokes the lease, removing the key at once (bounded to 2 s).
    pub async fn end(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
        let lease = *self.lease.borrow();
        if let Some(id) = lease {
            let revoke = self.registry.revoke(id);
            match tokio::time::timeout(Duration::from_secs(2), revoke).await {
                Ok(Ok(())) => tracing::info!(lease = id, "registry lease revoked"),
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot revoke registry lease"),
                Err(_) => tracing::warn!("revoking the registry lease timed out"),
            }
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

async fn register(
    registry: &EtcdRegistry,
    key: &str,
    value: &[u8],
    ttl: Duration,
) -> Result<i64, RegistryError> {
    let lease = registry.grant(ttl).await?;
    registry.put(key, value, Some(lease)).await?;
    Ok(lease)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lattice() -> Lattice {
        Lattice::new("default").expect("valid")
    }

    #[test]
    fn urls_and_keys() {
        let r = EtcdRegistry::new("etcd://etcd-1:2379", &lattice()).expect("valid");
        assert_eq!((r.host.as_str(), r.port), ("etcd-1", 2379));
        assert_eq!(r.node_key("h1"), "/trellis/default/nodes/h1");
        assert_eq!(r.provider_key("kv-1"), "/trellis/default/providers/kv-1");
        let r = EtcdRegistry::new("http://127.0.0.1", &lattice()).expect("valid");
        assert_eq!(r.port, 2379);
        for bad in [
            "etcd://",
            "nats://x:1",
            "etcd://x:port",
            "etcd://x:1/path",
            "etcd://:1",
        ] {
            assert!(EtcdRegistry::new(bad, &lattice()).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff"), [0]);
    }

    #[test]
    fn first_documents_of_unary_and_streaming_replies() {
        // A unary reply: no newline until the end of the body.
        assert_eq!(complete_line(b"{\"a\":1}"), None);
        // A stream: the first complete, non-blank line; an incomplete one is not enough.
        let stream: &[u8] = b"\n{\"result\":{}}\r\n{\"re";
        assert_eq!(complete_line(stream), Some(&b"{\"result\":{}}"[..]));
        assert_eq!(complete_line(b"\n  \n{\"resu"), None);
    }

    #[test]
    fn integers_as_strings_or_numbers() {
        let v = json!({ "ID": "7587", "TTL": 10 });
        assert_eq!(int_field(&v, "ID"), Some(7587));
        assert_eq!(int_field(&v, "TTL"), Some(10));
        assert_eq!(int_field(&v, "nope"), None);
    }
}
