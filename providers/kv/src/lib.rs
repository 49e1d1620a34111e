//! `trellis-provider-kv`: `wasi:keyvalue` on JetStream KV.
//!
//! Each assignment names a bucket (`bucket=<name>`); the provider creates it on first use (one
//! revision of history). A component opens a store by identifier: `""` or the assigned bucket's
//! name both mean the assigned bucket, anything else is refused with `access_denied`. So two
//! instances share data only when they were granted the same bucket.
//!
//! JetStream KV keys are restricted to `[-/_=.a-zA-Z0-9]` and cannot start or end with `.`;
//! component keys are arbitrary strings, so they are stored under an injective encoding
//! ([`encode_key`]): a key that is already valid and does not start with `=` is stored as it
//! is, any other becomes `=` followed by the lowercase hex of its UTF-8.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};

use async_nats::RequestErrorKind;
use async_nats::jetstream::kv::{self, Operation, Store};
use async_nats::jetstream::stream;
use bytes::Bytes;
use futures::TryStreamExt as _;
use trellis_bus::direct;
use trellis_provider_sdk::{
    Call, Caller, CapabilityRequest, CapabilityResponse, Context, DataError, Direct, Outcome,
    Provider, ProviderInfo,
};
use trellis_schemas::capability::rpc::{KvReply, KvRequest};
use trellis_schemas::{Assignment, Capability};

/// What this provider is.
pub const INFO: ProviderInfo = ProviderInfo {
    name: "kv",
    version: env!("CARGO_PKG_VERSION"),
    capabilities: &[Capability::KeyValue],
    rpc: &[Capability::KeyValue],
    workers: 1,
};

/// Keys per `list_keys` page.
pub const PAGE: usize = 1000;

/// How long the provider waits for JetStream's answer to a request of its own: the JetStream
/// client's default.
const BACKEND_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// How many times an increment retries after losing a race with another writer.
const CAS_ATTEMPTS: usize = 1000;

/// The provider: JetStream and the buckets opened so far.
#[derive(Debug)]
pub struct KvProvider {
    ctx: Context,
    /// Shared, not cloned per call: a `Store` holds its stream's whole configuration.
    stores: RwLock<HashMap<String, Arc<Store>>>,
}

impl KvProvider {
    /// A provider on the context's JetStream.
    pub async fn new(ctx: Context) -> anyhow::Result<Self> {
        Ok(Self {
            ctx,
            stores: RwLock::new(HashMap::new()),
        })
    }

    /// The store of `bucket`, created on first use.
    async fn store(&self, bucket: &str) -> Result<Arc<Store>, DataError> {
        if let Some(store) = self
            .stores
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(bucket)
        {
            return Ok(Arc::clone(store));
        }
        // Boxed: a call's future would otherwise be as large as the bucket's setup, and be
        // copied whole on every call.
        Box::pin(self.open(bucket)).await
    }

    /// Opens (or creates) the store of `bucket` and keeps it for the next calls.
    async fn open(&self, bucket: &str) -> Result<Arc<Store>, DataError> {
        let replicas = trellis_bus::replicas(&self.ctx.js, None).await;
        let store = match self.ctx.js.get_key_value(bucket).await {
            Ok(store) => {
                // A bucket created with another replica count (before the cluster grew, say)
                // is brought to the one this lattice uses, once per process.
                if let Err(e) =
                    trellis_bus::ensure_replicas(&self.ctx.js, &format!("KV_{bucket}"), replicas)
                        .await
                {
                    tracing::warn!(%bucket, error = %e, "cannot change the bucket's replicas");
                }
                store
            }
            Err(_) => {
                // The bucket's stream is created directly: the client's own bucket creation
                // first asks for account information, which older servers answer in a shape it
                // cannot read.
                let created = self
                    .ctx
                    .js
                    .create_stream(bucket_stream(bucket, replicas))
                    .await;
                match created {
                    Ok(_) => {
                        tracing::info!(%bucket, "bucket created");
                        self.ctx.js.get_key_value(bucket).await.map_err(|e| {
                            self.backend(format!("cannot open bucket {bucket}: {e}"))
                        })?
                    }
                    // Another replica may have created it meanwhile.
                    Err(create) => self.ctx.js.get_key_value(bucket).await.map_err(|_| {
                        self.backend(format!("cannot open bucket {bucket}: {create}"))
                    })?,
                }
            }
        };
        let store = Arc::new(store);
        self.stores
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(bucket.to_owned(), Arc::clone(&store));
        Ok(store)
    }

    /// A backend failure: `unavailable` while NATS is away or slow, `internal` otherwise.
    fn backend(&self, message: impl Into<String>) -> DataError {
        let message = message.into();
        let connected = matches!(
            self.ctx.client.connection_state(),
            async_nats::connection::State::Connected
        );
        if !connected || message.contains("timed out") || message.contains("no responders") {
            DataError::unavailable(message)
        } else {
            DataError::internal(message)
        }
    }

    async fn execute(&self, store: &Store, request: KvRequest) -> Result<KvReply, DataError> {
        let mut reply = KvReply::default();
        match request {
            KvRequest::Open { .. } => {}
            KvRequest::Get { key, .. } => reply.value = self.get(store, &key).await?,
            KvRequest::Set { key, value, .. } => self.set_all(store, vec![(key, value)]).await?,
            KvRequest::Delete { key, .. } => self.delete_all(store, vec![key]).await?,
            KvRequest::Exists { key, .. } => {
                reply.exists = Some(self.get(store, &key).await?.is_some());
            }
            KvRequest::ListKeys { cursor, .. } => {
                let (keys, next) = self.list(store, cursor.unwrap_or(0)).await?;
                reply.keys = keys;
                reply.cursor = next;
            }
            KvRequest::Increment { key, delta, .. } => {
                reply.number = Some(self.increment(store, &key, delta).await?);
            }
            // A batch waits for its slowest key, not for the sum of them: the reads go out
            // together, the writes go out in order and are acknowledged together.
            KvRequest::GetMany { keys, .. } => {
                reply.values =
                    futures::future::try_join_all(keys.iter().map(|key| self.get(store, key)))
                        .await?;
            }
            KvRequest::SetMany { pairs, .. } => self.set_all(store, pairs).await?,
            KvRequest::DeleteMany { keys, .. } => self.delete_all(store, keys).await?,
        }
        Ok(reply)
    }

    /// The value of `key`: JetStream's direct get, the same request the provider has JetStream
    /// answer a host with, read by the same code ([`direct::read_stored`]); through the
    /// client's API for a bucket without direct gets.
    async fn get(&self, store: &Store, key: &str) -> Result<Option<Bytes>, DataError> {
        let stored = encode_key(key);
        let Some(request) = direct::kv_get(store, &stored) else {
            return store
                .get(stored)
                .await
                .map_err(|e| self.backend(format!("get {key:?}: {e}")));
        };
        let reply = self.request("get", key, request).await?;
        direct::read_stored(key, &reply)
    }

    /// Sends `request` to JetStream and waits for its answer ([`direct::request`]). The
    /// client's KV API would do the same, and on the way check the key against a regular
    /// expression again, parse the reply's metadata (its time stamp among them) and the
    /// acknowledgement through an untagged enum: embedded, that was about a third of the
    /// provider's share of the host's CPU in `cargo bench --bench kv`.
    async fn request(
        &self,
        what: &str,
        key: &str,
        request: Direct,
    ) -> Result<async_nats::Message, DataError> {
        direct::request(&self.ctx.client, request, BACKEND_TIMEOUT)
            .await
            .map_err(|e| {
                let message = format!("{what} {key:?}: {e}");
                match e.kind() {
                    RequestErrorKind::TimedOut | RequestErrorKind::NoResponders => {
                        DataError::unavailable(message)
                    }
                    _ => self.backend(message),
                }
            })
    }

    /// Sets each key to its value, in order (see [`write`](Self::write)).
    async fn set_all(&self, store: &Store, pairs: Vec<(String, Bytes)>) -> Result<(), DataError> {
        let writes = pairs.into_iter().map(|(key, value)| {
            let write = direct::kv_put(store, &encode_key(&key), value);
            (key, write)
        });
        self.write("set", writes).await
    }

    /// Deletes each key, in order (see [`write`](Self::write)).
    async fn delete_all(&self, store: &Store, keys: Vec<String>) -> Result<(), DataError> {
        let writes = keys.into_iter().map(|key| {
            let write = direct::kv_delete(store, &encode_key(&key));
            (key, write)
        });
        self.write("delete", writes).await
    }

    /// Writes keys: one as a request whose acknowledgement is read as a host reads it
    /// ([`direct::read_ack`]), a batch with [`write_all`](Self::write_all).
    async fn write(
        &self,
        what: &str,
        mut writes: impl ExactSizeIterator<Item = (String, Direct)>,
    ) -> Result<(), DataError> {
        if writes.len() == 1
            && let Some((key, write)) = writes.next()
        {
            let ack = self.request(what, &key, write).await?;
            return direct::read_ack(what, &key, &ack);
        }
        self.write_all(what, writes).await
    }

    /// Publishes writes of keys (one, or a batch's) in their order, so that a key written twice
    /// keeps the last value, then waits for JetStream's acknowledgements of all of them: the
    /// same writes the provider has JetStream answer directly. The first failure is the error;
    /// writes before it may have been stored, as with one write after another.
    async fn write_all(
        &self,
        what: &str,
        writes: impl Iterator<Item = (String, Direct)>,
    ) -> Result<(), DataError> {
        let js = &self.ctx.js;
        let mut acks = Vec::new();
        for (key, write) in writes {
            let subject = write.subject;
            let sent = match write.headers {
                Some(headers) => {
                    js.publish_with_headers(subject, headers, write.payload)
                        .await
                }
                None => js.publish(subject, write.payload).await,
            };
            let ack = sent.map_err(|e| self.backend(format!("{what} {key:?}: {e}")))?;
            acks.push((key, ack));
        }
        for (key, ack) in acks {
            ack.await
                .map_err(|e| self.backend(format!("{what} {key:?}: {e}")))?;
        }
        Ok(())
    }

    async fn list(
        &self,
        store: &Store,
        cursor: u64,
    ) -> Result<(Vec<String>, Option<u64>), DataError> {
        let keys: Vec<String> = store
            .keys()
            .await
            .map_err(|e| self.backend(format!("list keys: {e}")))?
            .try_collect()
            .await
            .map_err(|e| self.backend(format!("list keys: {e}")))?;
        Ok(page(keys.iter().map(|k| decode_key(k)).collect(), cursor))
    }

    async fn increment(&self, store: &Store, key: &str, delta: u64) -> Result<u64, DataError> {
        let stored = encode_key(key);
        for _ in 0..CAS_ATTEMPTS {
            let entry = store
                .entry(stored.clone())
                .await
                .map_err(|e| self.backend(format!("increment {key:?}: {e}")))?;
            match entry {
                Some(entry) if entry.operation == Operation::Put => {
                    let current = std::str::from_utf8(&entry.value)
                        .ok()
                        .and_then(|s| s.trim().parse::<u64>().ok())
                        .ok_or_else(|| {
                            DataError::invalid(format!(
                                "cannot increment {key:?}: its value is not a decimal number"
                            ))
                        })?;
                    let next = current.checked_add(delta).ok_or_else(|| {
                        DataError::invalid(format!("incrementing {key:?} by {delta} overflows u64"))
                    })?;
                    match store
                        .update(&stored, Bytes::from(next.to_string()), entry.revision)
                        .await
                    {
                        Ok(_) => return Ok(next),
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                        Err(e) => return Err(self.backend(format!("increment {key:?}: {e}"))),
                    }
                }
                _ => match store.create(&stored, Bytes::from(delta.to_string())).await {
                    Ok(_) => return Ok(delta),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(self.backend(format!("increment {key:?}: {e}"))),
                },
            }
        }
        Err(DataError::unavailable(format!(
            "increment {key:?}: too much contention ({CAS_ATTEMPTS} attempts)"
        )))
    }
}

impl Provider for KvProvider {
    async fn handle(&self, call: Call) -> Outcome {
        let Call {
            assignment,
            caller,
            request,
        } = call;
        let CapabilityRequest::KeyValue(request) = request else {
            return Err(DataError::invalid(format!(
                "the kv provider does not serve {}",
                request.capability()
            )));
        };
        let assigned = assigned_bucket(&assignment, &caller, &request)?;
        let store = self.store(assigned).await?;
        let reply = self.execute(&store, request).await?;
        Ok(CapabilityResponse::KeyValue(reply))
    }

    /// `get`, `exists`, `set` and `delete` of one key are answered by JetStream itself, after
    /// the same checks: a direct get of the key's last revision, or the key's write (a deletion
    /// marker for `delete`), published with the caller's reply subject.
    async fn direct(&self, call: &Call) -> Result<Option<Direct>, DataError> {
        let CapabilityRequest::KeyValue(request) = &call.request else {
            return Ok(None);
        };
        let key = match request {
            KvRequest::Get { key, .. }
            | KvRequest::Exists { key, .. }
            | KvRequest::Set { key, .. }
            | KvRequest::Delete { key, .. } => encode_key(key),
            _ => return Ok(None),
        };
        let assigned = assigned_bucket(&call.assignment, &call.caller, request)?;
        let store = self.store(assigned).await?;
        Ok(match request {
            KvRequest::Set { value, .. } => Some(direct::kv_put(&store, &key, value.clone())),
            KvRequest::Delete { .. } => Some(direct::kv_delete(&store, &key)),
            _ => direct::kv_get(&store, &key),
        })
    }
}

/// The bucket `assignment` grants, when `request` names it (or `""`, the assigned one).
fn assigned_bucket<'a>(
    assignment: &'a Assignment,
    caller: &Caller,
    request: &KvRequest,
) -> Result<&'a str, DataError> {
    let assigned = assignment.config.get("bucket").map_or("", String::as_str);
    if assigned.is_empty() {
        return Err(DataError::internal(format!(
            "assignment {} names no bucket",
            assignment.assignment_id
        )));
    }
    let asked = request.bucket();
    if !asked.is_empty() && asked != assigned {
        return Err(DataError::denied(format!(
            "store {asked:?} is not assigned to {caller}: its assignment {} grants bucket {assigned:?} (open \"\" or {assigned:?})",
            assignment.assignment_id
        )));
    }
    Ok(assigned)
}

/// The stream behind a bucket, configured as JetStream KV buckets are: one revision per key,
/// rollups allowed, direct gets, `replicas` replicas.
fn bucket_stream(bucket: &str, replicas: trellis_bus::Replicas) -> stream::Config {
    stream::Config {
        name: format!("KV_{bucket}"),
        description: Some("Trellis wasi:keyvalue bucket".to_owned()),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: replicas.count,
        duplicate_window: std::time::Duration::from_secs(120),
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && !key.starts_with('.')
        && !key.ends_with('.')
        && !key.contains("..")
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'/' | b'_' | b'=' | b'.'))
}

/// The JetStream KV key a component's key is stored under: the key itself when it is a valid
/// KV key that does not start with `=`, else `=` and the lowercase hex of its UTF-8.
pub fn encode_key(key: &str) -> String {
    if valid_key(key) && !key.starts_with('=') {
        key.to_owned()
    } else {
        format!("={}", hex::encode(key.as_bytes()))
    }
}

/// The component's key of a stored key (the inverse of [`encode_key`]). A stored key that is
/// not an encoding (written by another client) is returned as it is.
pub fn decode_key(stored: &str) -> String {
    stored
        .strip_prefix('=')
        .and_then(|h| hex::decode(h).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .unwrap_or_else(|| stored.to_owned())
}

/// One page of `keys` (sorted here) from offset `cursor`, and the next cursor if more remain.
pub fn page(mut keys: Vec<String>, cursor: u64) -> (Vec<String>, Option<u64>) {
    keys.sort_unstable();
    keys.dedup();
    let start = usize::try_from(cursor)
        .unwrap_or(usize::MAX)
        .min(keys.len());
    let end = start.saturating_add(PAGE).min(keys.len());
    let next = (end < keys.len()).then_some(end as u64);
    (keys.drain(start..end).collect(), next)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_encode_injectively_and_decode() {
        for key in [
            "plain",
            "a/b_c-d=e.f",
            "",
            ".dot",
            "dot.",
            "a..b",
            "=x",
            "=",
            "with space",
            "ünïcode",
            "*",
            ">",
            "3d",
        ] {
            let stored = encode_key(key);
            assert!(valid_key(&stored), "{key:?} → {stored:?}");
            assert_eq!(decode_key(&stored), key, "{key:?} → {stored:?}");
        }
        assert_eq!(encode_key("plain"), "plain");
        assert_eq!(encode_key("a b"), "=612062");
        // A valid key starting with '=' is encoded, so it never collides with an encoding.
        assert_ne!(encode_key("=612062"), "=612062");
    }

    #[test]
    fn pages_are_sorted_and_resume_at_the_cursor() {
        let keys: Vec<String> = (0..2500).rev().map(|i| format!("k{i:05}")).collect();
        let (first, next) = page(keys.clone(), 0);
        assert_eq!(first.len(), PAGE);
        assert_eq!(first[0], "k00000");
        assert_eq!(next, Some(1000));
        let (third, next) = page(keys.clone(), 2000);
        assert_eq!(third.len(), 500);
        assert_eq!(third[499], "k02499");
        assert_eq!(next, None);
        let (none, next) = page(keys, 9999);
        assert!(none.is_empty());
        assert_eq!(next, None);
    }
}
