//! The audit stream: where it is kept (bounded in age and size), how processes record events on
//! it without letting a misbehaving guest flood it, and how a control request says who sent it.

use std::sync::Mutex;
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use base64::Engine as _;
use trellis_schemas::Lattice;
use trellis_schemas::audit::{
    self, AuditEvent, AuditType, CALLER_HEADER, CALLER_SIGNATURE_HEADER, caller_signed_bytes,
};

use crate::streams::StreamError;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// How long and how much the audit stream keeps. Both are always bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditRetention {
    /// The oldest event kept. Default 30 days.
    pub max_age: Duration,
    /// The most bytes kept; the oldest events go first. Default 1 GiB.
    pub max_bytes: u64,
}

impl Default for AuditRetention {
    fn default() -> Self {
        Self {
            max_age: Duration::from_secs(30 * 24 * 3600),
            max_bytes: 1 << 30,
        }
    }
}

impl AuditRetention {
    /// Checks that both bounds are set.
    ///
    /// # Errors
    ///
    /// Names the bound that is zero.
    pub fn check(&self) -> Result<(), String> {
        if self.max_age.is_zero() {
            return Err("the audit stream's maximum age must be above zero".into());
        }
        if self.max_bytes == 0 {
            return Err("the audit stream's maximum size must be above zero".into());
        }
        Ok(())
    }
}

/// Creates the lattice's audit stream, or brings it to `retention`. The controller calls it.
///
/// # Errors
///
/// When the retention is unbounded or JetStream refuses.
pub async fn ensure_audit_stream(
    js: &jetstream::Context,
    lattice: &Lattice,
    retention: AuditRetention,
) -> Result<(), StreamError> {
    let name = audit::stream(lattice);
    let error = |message: String| StreamError {
        stream: name.clone(),
        message,
    };
    retention.check().map_err(error)?;
    let replicas = crate::replicas(js, None).await;
    let mut config = stream::Config {
        name: name.clone(),
        description: Some(format!("Trellis audit events of lattice {lattice}")),
        subjects: vec![audit::subject_all(lattice)],
        max_age: retention.max_age,
        max_bytes: i64::try_from(retention.max_bytes).unwrap_or(i64::MAX),
        storage: stream::StorageType::File,
        num_replicas: replicas.count,
        discard: stream::DiscardPolicy::Old,
        duplicate_window: Duration::from_secs(120).min(retention.max_age),
        ..Default::default()
    };
    if let Ok(existing) = js.get_stream(&name).await {
        let info = existing.cached_info();
        config.num_replicas = replicas.for_existing(info.config.num_replicas);
    }
    js.create_or_update_stream(config)
        .await
        .map_err(|e| error(e.to_string()))?;
    Ok(())
}

/// Refusals ([`AuditType::Denied`]) per second one process records at most (a burst of one
/// second's worth); beyond, they are dropped and counted, so that a guest calling a capability it
/// lacks in a loop cannot flood the stream. Control requests, grants and revokes are never
/// dropped: each is bounded by what the controller serves.
pub const MAX_EVENTS_PER_SECOND: u32 = 100;

/// Records audit events of one lattice from one process.
#[derive(Debug)]
pub struct AuditLog {
    client: async_nats::Client,
    lattice: Lattice,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    refilled: Instant,
    dropped: u64,
}

impl AuditLog {
    /// A log publishing on `client`.
    pub fn new(client: async_nats::Client, lattice: Lattice) -> Self {
        Self {
            client,
            lattice,
            bucket: Mutex::new(Bucket {
                tokens: f64::from(MAX_EVENTS_PER_SECOND),
                refilled: Instant::now(),
                dropped: 0,
            }),
        }
    }

    /// Events dropped by the rate limit so far.
    pub fn dropped(&self) -> u64 {
        self.bucket
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .dropped
    }

    fn admit(&self) -> bool {
        let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let rate = f64::from(MAX_EVENTS_PER_SECOND);
        let elapsed = now.duration_since(bucket.refilled).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(rate);
        bucket.refilled = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            bucket.dropped += 1;
            if bucket.dropped.is_power_of_two() {
                tracing::warn!(
                    dropped = bucket.dropped,
                    "audit events beyond {MAX_EVENTS_PER_SECOND}/s dropped"
                );
            }
            false
        }
    }

    /// Records `event` (unless the rate limit drops it). Never fails: an audit event that cannot
    /// be sent is logged.
    pub async fn record(&self, event: &AuditEvent) {
        self.send(event, None).await;
    }

    /// Records `event` once however many processes record it with the same `id` within the
    /// stream's duplicate window (every controller replica sees every grant).
    pub async fn record_once(&self, event: &AuditEvent, id: &str) {
        self.send(event, Some(id)).await;
    }

    async fn send(&self, event: &AuditEvent, id: Option<&str>) {
        if event.kind == AuditType::Denied && !self.admit() {
            return;
        }
        let body = match serde_json::to_vec(event) {
            Ok(body) => body,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode an audit event");
                return;
            }
        };
        let subject = audit::subject(&self.lattice, event.kind);
        let sent = match id {
            Some(id) => {
                let mut headers = HeaderMap::new();
                headers.insert("Nats-Msg-Id", id);
                self.client
                    .publish_with_headers(subject, headers, body.into())
                    .await
            }
            None => self.client.publish(subject, body.into()).await,
        };
        if let Err(e) = sent {
            tracing::warn!(error = %e, "cannot record an audit event");
        }
    }
}

/// Records every permission violation NATS reports to this process's connections from now on
/// as a [`AuditType::Denied`] event from `source` (`host/<id>`, …), until the process ends.
///
/// nats-server tells only the offending connection when it refuses a publish or a subscription
/// and publishes no advisory for it (it does for failed logins), so a secured lattice learns of
/// its own processes' violations this way; those of foreign clients are in the server's log.
/// Bounded like every refusal ([`MAX_EVENTS_PER_SECOND`]).
pub fn record_nats_refusals(client: async_nats::Client, lattice: Lattice, source: String) {
    use tokio::sync::broadcast::error::RecvError;
    let mut refusals = crate::permission_violations();
    // The one subject whose refusal is not recorded: recording it would be refused again.
    let own = audit::subject(&lattice, AuditType::Denied);
    tokio::spawn(async move {
        let log = AuditLog::new(client, lattice);
        loop {
            let message = match refusals.recv().await {
                Ok(message) => message,
                Err(RecvError::Lagged(missed)) => {
                    tracing::warn!(missed, "NATS refusals not audited: too many at once");
                    continue;
                }
                Err(RecvError::Closed) => return,
            };
            if message.contains(&own) {
                continue;
            }
            let mut event = AuditEvent::new(AuditType::Denied, source.clone(), REFUSED_BY_NATS);
            event.reason = Some(audit::short_reason(&message));
            log.record(&event).await;
        }
    });
}

/// The outcome of a denial NATS made: the server refused a publish or a subscription.
pub const REFUSED_BY_NATS: &str = "nats_permission_violation";

/// Adds the identity headers of this process to a control request on `subject` with `body`:
/// the public key of its nkey credentials and a signature over the subject and body. Nothing
/// is added when the process has no nkey seed (no credentials, or a JWT `.creds` file).
pub fn sign_request(headers: &mut HeaderMap, subject: &str, body: &[u8]) {
    let Some(key) = own_key() else { return };
    let Ok(signature) = key.sign(&caller_signed_bytes(subject, body)) else {
        return;
    };
    headers.insert(CALLER_HEADER, key.public_key().as_str());
    headers.insert(CALLER_SIGNATURE_HEADER, B64.encode(signature).as_str());
}

static KEY: std::sync::OnceLock<Option<nkeys::KeyPair>> = std::sync::OnceLock::new();

/// Signs this process's control requests with the nkey seed in `path` rather than its own
/// `--creds` (as `trellis up --secure`, which connects as the operator). Must come before the
/// first request; returns false otherwise, or when the file holds no user seed.
pub fn sign_as(path: &std::path::Path) -> bool {
    let key = read_user_key(path);
    let ok = key.is_some();
    KEY.set(key).is_ok() && ok
}

fn read_user_key(path: &std::path::Path) -> Option<nkeys::KeyPair> {
    let text = std::fs::read_to_string(path).ok()?;
    let key = nkeys::KeyPair::from_seed(text.trim()).ok()?;
    key.public_key().starts_with('U').then_some(key)
}

fn own_key() -> Option<&'static nkeys::KeyPair> {
    KEY.get_or_init(|| {
        let path = crate::connect_args().creds.as_ref()?;
        let text = std::fs::read_to_string(path).ok()?;
        let key = nkeys::KeyPair::from_seed(text.trim()).ok()?;
        key.public_key().starts_with('U').then_some(key)
    })
    .as_ref()
}

/// The identity a control request claims: `(public key, verified)`, where verified means the
/// signature header is a valid signature by that key over `subject` and `body`. `None` when the
/// request names no sender.
pub fn request_identity(
    headers: Option<&HeaderMap>,
    subject: &str,
    body: &[u8],
) -> Option<(String, bool)> {
    let headers = headers?;
    let key = headers.get(CALLER_HEADER)?.as_str().to_owned();
    let verified = headers
        .get(CALLER_SIGNATURE_HEADER)
        .and_then(|sig| B64.decode(sig.as_str()).ok())
        .zip(nkeys::KeyPair::from_public_key(&key).ok())
        .is_some_and(|(sig, public)| {
            public
                .verify(&caller_signed_bytes(subject, body), &sig)
                .is_ok()
        });
    Some((key, verified))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_binds_key_subject_and_body() {
        let key = nkeys::KeyPair::new_user();
        let signed = |subject: &str, body: &[u8]| {
            let mut headers = HeaderMap::new();
            headers.insert(CALLER_HEADER, key.public_key().as_str());
            let sig = key.sign(&caller_signed_bytes(subject, body)).unwrap();
            headers.insert(CALLER_SIGNATURE_HEADER, B64.encode(sig).as_str());
            headers
        };
        let headers = signed("a.b", b"{}");
        assert_eq!(
            request_identity(Some(&headers), "a.b", b"{}"),
            Some((key.public_key(), true))
        );
        assert_eq!(
            request_identity(Some(&headers), "a.c", b"{}").map(|i| i.1),
            Some(false)
        );
        assert_eq!(
            request_identity(Some(&headers), "a.b", b"{\"x\":1}").map(|i| i.1),
            Some(false)
        );
        assert_eq!(request_identity(None, "a.b", b"{}"), None);
    }

    #[test]
    fn retention_is_always_bounded() {
        assert!(AuditRetention::default().check().is_ok());
        let unbounded = AuditRetention {
            max_age: Duration::ZERO,
            ..Default::default()
        };
        assert!(unbounded.check().is_err());
    }
}
