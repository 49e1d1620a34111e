//! Direct replies: a provider in front of a backend that already speaks NATS (JetStream KV) makes
//! its checks, then sends the backend's own request with the caller's reply subject, so that the
//! backend answers the caller itself.
//!
//! A capability call through a provider process then crosses NATS three times instead of four:
//! caller → provider, provider → JetStream, JetStream → caller. The provider's checks are the same
//! as for a call it answers; only the answer comes from the backend, in the backend's format,
//! which [`read_reply`] turns into the typed reply the caller asked for.
//!
//! Only a caller that says it reads such replies gets them ([`accept_direct`]): a request
//! without the header is answered by the provider in the data-plane envelope, as always. An
//! error of the provider's own (a refused bucket, an unknown assignment) is always answered in
//! the envelope, so a caller reads a reply with a `Trellis-Status` header as the envelope and
//! any other as the backend's.

use async_nats::jetstream::kv::Store;
use async_nats::{HeaderMap, HeaderValue, Message, StatusCode, Subject};
use bytes::Bytes;
use trellis_schemas::capability::rpc::{CapabilityRequest, CapabilityResponse, KvReply, KvRequest};
use trellis_schemas::dataplane::{DataError, ErrorCode};

use crate::dataplane::{NAMES, SendError, header};

/// The header JetStream KV marks deletions and purges with.
const KV_OPERATION: &str = "KV-Operation";

/// A backend request sent for a caller ([`send`]): its reply goes to the caller.
#[derive(Debug, Clone)]
pub struct Direct {
    /// Where the request goes.
    pub subject: String,
    /// Its headers.
    pub headers: Option<HeaderMap>,
    /// Its body.
    pub payload: Bytes,
}

/// Marks a capability request as sent by a caller that reads direct replies to it, when
/// [`read_reply`] can read them (key-value requests); returns whether it did.
pub fn accept_direct(request: &CapabilityRequest, headers: &mut HeaderMap) -> bool {
    let readable = matches!(request, CapabilityRequest::KeyValue(_));
    if readable {
        headers.insert(NAMES.direct.clone(), "1");
    }
    readable
}

/// Reads the reply to `request`, sent with [`accept_direct`]: the provider's own answer in the
/// data-plane envelope, or the backend's direct reply.
///
/// # Errors
///
/// The provider or the backend answered with an error, or the reply is malformed.
pub fn read_reply(
    request: &CapabilityRequest,
    message: &Message,
) -> Result<CapabilityResponse, DataError> {
    match request {
        CapabilityRequest::KeyValue(kv) if !is_envelope(message) => {
            read_kv_reply(kv, message).map(CapabilityResponse::KeyValue)
        }
        _ => crate::dataplane::read_capability_reply(request.capability(), message),
    }
}

/// Whether the caller of `message` reads direct replies ([`accept_direct`]).
pub fn accepts_direct(message: &Message) -> bool {
    header(message.headers.as_ref(), &NAMES.direct) == Some("1")
}

/// Sends `direct` with `reply` as its reply subject: the backend answers the caller.
///
/// # Errors
///
/// The client is closed or its send buffer is full.
pub async fn send(
    client: &async_nats::Client,
    direct: Direct,
    reply: Subject,
) -> Result<(), SendError> {
    let subject = Subject::from(direct.subject);
    let sent = match direct.headers {
        Some(headers) => {
            client
                .publish_with_reply_and_headers(subject, reply, headers, direct.payload)
                .await
        }
        None => {
            client
                .publish_with_reply(subject, reply, direct.payload)
                .await
        }
    };
    sent.map_err(|e| SendError::Failed(e.to_string()))
}

/// Sends `direct` with a reply subject of this client's own and waits (at most `timeout`) for
/// the backend's answer: what a provider does when it answers a call itself, to read the answer
/// with the same functions as a caller answered directly ([`read_stored`], [`read_ack`]).
///
/// # Errors
///
/// The request could not be sent, nothing answered it, or it timed out.
pub async fn request(
    client: &async_nats::Client,
    direct: Direct,
    timeout: std::time::Duration,
) -> Result<Message, async_nats::RequestError> {
    let mut request = async_nats::Request::new()
        .payload(direct.payload)
        .timeout(Some(timeout));
    if let Some(headers) = direct.headers {
        request = request.headers(headers);
    }
    client.send_request(direct.subject, request).await
}

/// The subject a KV write of `stored_key` in `store` is published on, as the client's own
/// `put` makes it (`$KV.<bucket>.<key>`, behind the JetStream API prefix when the bucket asks).
fn kv_write_subject(store: &Store, stored_key: &str) -> String {
    let prefix = store.put_prefix.as_deref().unwrap_or(&store.prefix);
    if store.use_jetstream_prefix {
        format!("{}.{prefix}{stored_key}", js_api())
    } else {
        format!("{prefix}{stored_key}")
    }
}

/// The JetStream API prefix of this process: `$JS.API`, or `$JS.<domain>.API` in a domain
/// ([`set_jetstream_domain`](crate::set_jetstream_domain)), made once.
fn js_api() -> &'static str {
    static API: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    API.get_or_init(|| trellis_schemas::roles::js_api(crate::jetstream_domain()))
}

/// The direct request of a KV `get` or `exists` of `stored_key` (the key as stored); `None` for a
/// bucket without direct gets.
pub fn kv_get(store: &Store, stored_key: &str) -> Option<Direct> {
    if !store.stream.cached_info().config.allow_direct {
        return None;
    }
    Some(Direct {
        subject: format!(
            "{}.DIRECT.GET.{}.{}{stored_key}",
            js_api(),
            store.stream_name,
            store.prefix
        ),
        headers: None,
        payload: Bytes::new(),
    })
}

/// The direct request of a KV `set` of `stored_key` (the key as stored) to `value`.
pub fn kv_put(store: &Store, stored_key: &str, value: Bytes) -> Direct {
    Direct {
        subject: kv_write_subject(store, stored_key),
        headers: None,
        payload: value,
    }
}

/// The direct request of a KV `delete` of `stored_key` (the key as stored): a deletion marker,
/// as the client's own `delete` writes it.
pub fn kv_delete(store: &Store, stored_key: &str) -> Direct {
    let mut headers = HeaderMap::new();
    headers.insert(KV_OPERATION, HeaderValue::from("DEL"));
    Direct {
        subject: kv_write_subject(store, stored_key),
        headers: Some(headers),
        payload: Bytes::new(),
    }
}

/// Whether `message` is in the data-plane envelope (a provider's own answer) rather than a
/// backend's direct reply.
fn is_envelope(message: &Message) -> bool {
    header(message.headers.as_ref(), &NAMES.status).is_some()
}

/// Reads JetStream's direct reply to the KV `request` sent for this caller: a stored message
/// (or `404`) for `get` and `exists`, a publish acknowledgement for `set` and `delete`.
///
/// # Errors
///
/// JetStream answered with an error (`unavailable` when it is away or overloaded, `internal`
/// otherwise), or `request` is not one that is sent directly (`internal`).
fn read_kv_reply(request: &KvRequest, message: &Message) -> Result<KvReply, DataError> {
    let mut reply = KvReply::default();
    match request {
        KvRequest::Get { key, .. } => reply.value = read_stored(key, message)?,
        KvRequest::Exists { key, .. } => reply.exists = Some(read_stored(key, message)?.is_some()),
        KvRequest::Set { key, .. } => read_ack("set", key, message)?,
        KvRequest::Delete { key, .. } => read_ack("delete", key, message)?,
        _ => {
            return Err(DataError::new(
                ErrorCode::Internal,
                "a direct reply came for a key-value request that is never sent directly",
            ));
        }
    }
    Ok(reply)
}

/// A JetStream error status as a data-plane error.
fn status_error(what: &str, key: &str, status: u16, description: Option<&str>) -> DataError {
    let message = format!(
        "{what} {key:?}: JetStream answered {status}{}",
        description.map(|d| format!(" ({d})")).unwrap_or_default()
    );
    // 408 (timed out), 503 (no responders, no leader): the backend is away or overloaded.
    if matches!(status, 408 | 503) {
        DataError::unavailable(message)
    } else {
        DataError::internal(message)
    }
}

/// A direct get's reply: the value, or `None` for a key never written, deleted or purged. The
/// provider reads the replies to the requests it sends itself with it too.
///
/// # Errors
///
/// JetStream answered with an error status.
pub fn read_stored(key: &str, message: &Message) -> Result<Option<Bytes>, DataError> {
    match message.status {
        Some(StatusCode::NOT_FOUND) => return Ok(None),
        Some(status) if status != StatusCode::OK => {
            return Err(status_error(
                "get",
                key,
                status.as_u16(),
                message.description.as_deref(),
            ));
        }
        _ => {}
    }
    let operation = message
        .headers
        .as_ref()
        .and_then(|h| h.get(KV_OPERATION))
        .map(HeaderValue::as_str);
    match operation {
        Some("DEL" | "PURGE") => Ok(None),
        _ => Ok(Some(message.payload.clone())),
    }
}

/// A JetStream publish acknowledgement: `{"stream":…,"seq":…}`, or `{"error":{…}}`. `what`
/// (`"set"`, `"delete"`) and `key` name the write in an error. The provider reads the replies to
/// the writes it sends itself with it too.
///
/// # Errors
///
/// JetStream refused the write or answered something else.
pub fn read_ack(what: &str, key: &str, message: &Message) -> Result<(), DataError> {
    #[derive(serde::Deserialize)]
    struct Ack {
        #[serde(default)]
        error: Option<AckError>,
        #[serde(default)]
        seq: Option<u64>,
    }
    #[derive(serde::Deserialize)]
    struct AckError {
        #[serde(default)]
        code: u16,
        #[serde(default)]
        description: String,
    }
    if let Some(status) = message.status
        && status != StatusCode::OK
    {
        return Err(status_error(
            what,
            key,
            status.as_u16(),
            message.description.as_deref(),
        ));
    }
    let ack: Ack = serde_json::from_slice(&message.payload).map_err(|e| {
        DataError::internal(format!(
            "{what} {key:?}: JetStream's acknowledgement is unreadable: {e}"
        ))
    })?;
    match (ack.error, ack.seq) {
        (Some(error), _) => Err(status_error(
            what,
            key,
            error.code,
            Some(&error.description),
        )),
        (None, Some(_)) => Ok(()),
        (None, None) => Err(DataError::internal(format!(
            "{what} {key:?}: JetStream's acknowledgement names no sequence"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(status: Option<u16>, headers: &[(&str, &str)], payload: &[u8]) -> Message {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.insert(*name, *value);
        }
        Message {
            subject: Subject::from("_INBOX.x"),
            reply: None,
            payload: Bytes::copy_from_slice(payload),
            headers: (!headers.is_empty()).then_some(map),
            status: status.map(|s| StatusCode::from_u16(s).unwrap()),
            description: None,
            length: 0,
        }
    }

    fn get(key: &str) -> KvRequest {
        KvRequest::Get {
            bucket: String::new(),
            key: key.into(),
        }
    }

    fn set(key: &str) -> KvRequest {
        KvRequest::Set {
            bucket: String::new(),
            key: key.into(),
            value: Bytes::from_static(b"v"),
        }
    }

    #[test]
    fn a_stored_message_is_the_value_and_a_marker_or_404_is_none() {
        let stored = message(None, &[("Nats-Sequence", "7")], b"hello");
        let reply = read_kv_reply(&get("k"), &stored).unwrap();
        assert_eq!(reply.value.as_deref(), Some(&b"hello"[..]));
        let exists = KvRequest::Exists {
            bucket: String::new(),
            key: "k".into(),
        };
        assert_eq!(read_kv_reply(&exists, &stored).unwrap().exists, Some(true));
        for gone in [
            message(None, &[(KV_OPERATION, "DEL")], b""),
            message(None, &[(KV_OPERATION, "PURGE")], b""),
            message(Some(404), &[], b""),
        ] {
            assert_eq!(read_kv_reply(&get("k"), &gone).unwrap().value, None);
            assert_eq!(read_kv_reply(&exists, &gone).unwrap().exists, Some(false));
        }
        // An empty value is a value.
        let empty = message(None, &[("Nats-Sequence", "8")], b"");
        assert_eq!(
            read_kv_reply(&get("k"), &empty).unwrap().value.as_deref(),
            Some(&b""[..])
        );
    }

    #[test]
    fn an_acknowledgement_is_success_and_a_jetstream_error_keeps_its_meaning() {
        let ack = message(None, &[], br#"{"stream":"KV_a","seq":3}"#);
        assert_eq!(read_kv_reply(&set("k"), &ack).unwrap(), KvReply::default());
        let overloaded = message(
            None,
            &[],
            br#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#,
        );
        let error = read_kv_reply(&set("k"), &overloaded).unwrap_err();
        assert_eq!(error.code, ErrorCode::Unavailable);
        assert!(
            error.message.contains("maximum messages exceeded"),
            "{error:?}"
        );
        let refused = message(None, &[], br#"{"error":{"code":400,"description":"bad"}}"#);
        assert_eq!(
            read_kv_reply(&set("k"), &refused).unwrap_err().code,
            ErrorCode::Internal
        );
        let timed_out = message(Some(408), &[], b"");
        assert_eq!(
            read_kv_reply(&get("k"), &timed_out).unwrap_err().code,
            ErrorCode::Unavailable
        );
        for garbled in [&b"not json"[..], b"{}"] {
            let error = read_kv_reply(&set("k"), &message(None, &[], garbled)).unwrap_err();
            assert_eq!(error.code, ErrorCode::Internal, "{error:?}");
        }
    }

    #[test]
    fn key_value_requests_ask_for_direct_replies_and_an_envelope_still_reads_as_one() {
        let mut headers = HeaderMap::new();
        assert!(accept_direct(
            &CapabilityRequest::KeyValue(get("k")),
            &mut headers
        ));
        assert_eq!(header(Some(&headers), &NAMES.direct), Some("1"));
        // Every key-value request is marked (the provider decides which it answers directly)...
        let increment = KvRequest::Increment {
            bucket: String::new(),
            key: "k".into(),
            delta: 1,
        };
        let mut marked = HeaderMap::new();
        assert!(accept_direct(
            &CapabilityRequest::KeyValue(increment.clone()),
            &mut marked
        ));
        // ... but its reply is always the provider's envelope, which reads as before.
        let (ok, body) =
            crate::dataplane::capability_reply(&CapabilityResponse::KeyValue(KvReply {
                number: Some(4),
                ..KvReply::default()
            }))
            .unwrap();
        let enveloped = Message {
            headers: Some(ok),
            payload: body,
            ..message(None, &[], b"")
        };
        let request = CapabilityRequest::KeyValue(increment);
        let CapabilityResponse::KeyValue(reply) = read_reply(&request, &enveloped).unwrap() else {
            panic!("not a key-value reply");
        };
        assert_eq!(reply.number, Some(4));
        // A direct reply to a request that is never sent directly is refused, not misread.
        let error = read_reply(&request, &message(None, &[], b"{}")).unwrap_err();
        assert_eq!(error.code, ErrorCode::Internal);
    }
}
