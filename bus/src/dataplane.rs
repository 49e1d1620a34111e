//! The data-plane codec: how every caller and server of the data plane reads and writes its
//! NATS messages (headers of [`trellis_schemas::dataplane`], typed errors, typed capability
//! calls).
//!
//! Callers (the CLI's `call`, the host's capability bridge, the `http-server` and `messaging`
//! providers, tests) send with [`request`] and read replies with [`read_reply`] or the typed
//! readers ([`read_capability_reply`], [`read_http_reply`]). Servers (instances, providers)
//! answer with [`reply_ok`] / [`reply_error`] or the header builders ([`ok_headers`],
//! [`error_headers`]).
//!
//! # Edges
//!
//! - A header value cannot hold line breaks and should stay small: error messages go in the
//!   body, codes and reasons in headers through [`header_safe`].
//! - A missing or unknown status reads as an error, so a reply from something that does not
//!   speak the protocol is never taken for a success.

use std::time::Duration;

use async_nats::client::RequestErrorKind;
use async_nats::header::HeaderName;
use async_nats::{HeaderMap, HeaderValue, Message, Subject};
use bytes::Bytes;
use trellis_schemas::capability::rpc::{
    CapabilityRequest, CapabilityResponse, HttpMessage, HttpRequestHead, HttpResponseHead,
};
use trellis_schemas::dataplane::{CrashReason, DataError, ErrorCode, Status, headers};
use trellis_schemas::{Capability, InstanceId};

/// The data plane's header names, parsed once.
#[derive(Debug)]
pub struct Names {
    /// [`headers::EXPORT`].
    pub export: HeaderName,
    /// [`headers::STATUS`].
    pub status: HeaderName,
    /// [`headers::ERROR_CODE`].
    pub error_code: HeaderName,
    /// [`headers::REASON`].
    pub reason: HeaderName,
    /// [`headers::INSTANCE`].
    pub instance: HeaderName,
    /// [`headers::IDENTITY`].
    pub identity: HeaderName,
    /// [`headers::COMPONENT`].
    pub component: HeaderName,
    /// [`headers::ASSIGNMENT`].
    pub assignment: HeaderName,
    /// [`headers::MIN_SEQ`].
    pub min_seq: HeaderName,
    /// [`headers::HTTP_HEAD`].
    pub http_head: HeaderName,
    /// [`headers::TRACEPARENT`].
    pub traceparent: HeaderName,
    /// [`headers::DIRECT`].
    pub direct: HeaderName,
}

/// The header names.
pub static NAMES: Names = Names {
    export: HeaderName::from_static(headers::EXPORT),
    status: HeaderName::from_static(headers::STATUS),
    error_code: HeaderName::from_static(headers::ERROR_CODE),
    reason: HeaderName::from_static(headers::REASON),
    instance: HeaderName::from_static(headers::INSTANCE),
    identity: HeaderName::from_static(headers::IDENTITY),
    component: HeaderName::from_static(headers::COMPONENT),
    assignment: HeaderName::from_static(headers::ASSIGNMENT),
    min_seq: HeaderName::from_static(headers::MIN_SEQ),
    http_head: HeaderName::from_static(headers::HTTP_HEAD),
    traceparent: HeaderName::from_static(headers::TRACEPARENT),
    direct: HeaderName::from_static(headers::DIRECT),
};

/// A value safe to put in a header: no CR or LF, at most 1 KiB (cut on a character boundary).
pub fn header_safe(value: &str) -> String {
    const MAX: usize = 1024;
    let mut end = value.len().min(MAX);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value[..end].replace(['\r', '\n'], " ")
}

/// A header of `headers` as text, `None` when absent or empty.
pub fn header<'a>(headers: Option<&'a HeaderMap>, name: &HeaderName) -> Option<&'a str> {
    headers
        .and_then(|h| h.get(name.clone()))
        .map(HeaderValue::as_str)
        .filter(|v| !v.is_empty())
}

/// The headers of a successful reply, naming the instance that served it when there is one.
pub fn ok_headers(instance: Option<&HeaderValue>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(NAMES.status.clone(), Status::Ok.as_str());
    if let Some(instance) = instance {
        headers.insert(NAMES.instance.clone(), instance.clone());
    }
    headers
}

/// The headers of an error reply (its body is [`DataError::message`]).
pub fn error_headers(error: &DataError, instance: Option<&HeaderValue>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(NAMES.status.clone(), Status::Error.as_str());
    headers.insert(NAMES.error_code.clone(), error.code.as_str());
    if let Some(reason) = &error.reason {
        headers.insert(NAMES.reason.clone(), header_safe(&reason.to_string()));
    }
    if let Some(instance) = instance {
        headers.insert(NAMES.instance.clone(), instance.clone());
    }
    headers
}

/// Publishes a successful reply (nothing when the request wanted none).
pub async fn reply_ok(
    client: &async_nats::Client,
    reply: Option<Subject>,
    headers: HeaderMap,
    body: Bytes,
) {
    let Some(reply) = reply else { return };
    if let Err(e) = client.publish_with_headers(reply, headers, body).await {
        tracing::debug!(error = %e, "cannot send a data-plane reply");
    }
}

/// Publishes an error reply (nothing when the request wanted none).
pub async fn reply_error(
    client: &async_nats::Client,
    reply: Option<Subject>,
    error: &DataError,
    instance: Option<&HeaderValue>,
) {
    let Some(reply) = reply else { return };
    let headers = error_headers(error, instance);
    let body = Bytes::from(error.message.clone());
    if let Err(e) = client.publish_with_headers(reply, headers, body).await {
        tracing::debug!(error = %e, "cannot send a data-plane reply");
    }
}

/// Why a data-plane request got no reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// Nobody serves the subject.
    #[error("no responders")]
    NoResponders,
    /// Nobody answered within the timeout.
    #[error("no reply within {0:?}")]
    TimedOut(Duration),
    /// The request could not be sent.
    #[error("{0}")]
    Failed(String),
}

/// Sends one data-plane request and waits (at most `timeout`) for the reply.
///
/// # Errors
///
/// Nobody serves the subject, nobody answered in time, or NATS refused the request.
pub async fn request(
    client: &async_nats::Client,
    subject: impl Into<Subject>,
    headers: HeaderMap,
    body: Bytes,
    timeout: Duration,
) -> Result<Message, SendError> {
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(body)
        .timeout(Some(timeout));
    client
        .send_request(subject.into(), request)
        .await
        .map_err(|e| match e.kind() {
            RequestErrorKind::NoResponders => SendError::NoResponders,
            RequestErrorKind::TimedOut => SendError::TimedOut(timeout),
            _ => SendError::Failed(e.to_string()),
        })
}

/// The headers of a call to `export`.
pub fn call_headers(export: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(NAMES.export.clone(), export);
    headers
}

/// Reads a reply: `Ok(())` when its status is `ok`, the typed error otherwise (the message is
/// the body).
///
/// # Errors
///
/// The reply is an error reply, or does not carry a status.
pub fn read_reply(message: &Message) -> Result<(), DataError> {
    let h = message.headers.as_ref();
    match header(h, &NAMES.status).and_then(Status::parse) {
        Some(Status::Ok) => Ok(()),
        Some(Status::Error) => {
            let code = header(h, &NAMES.error_code).map_or(ErrorCode::Internal, ErrorCode::parse);
            let reason = header(h, &NAMES.reason).and_then(|r| r.parse::<CrashReason>().ok());
            Err(DataError {
                code,
                reason,
                message: String::from_utf8_lossy(&message.payload).into_owned(),
            })
        }
        None => Err(DataError::new(
            ErrorCode::Internal,
            format!(
                "the reply has no valid {} header; it does not come from a Trellis data-plane server",
                headers::STATUS
            ),
        )),
    }
}

/// The instance a reply names.
pub fn reply_instance(message: &Message) -> Option<&str> {
    header(message.headers.as_ref(), &NAMES.instance)
}

/// Who makes a capability call, as the host names it and the provider reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The calling instance.
    pub instance: InstanceId,
    /// Its component.
    pub component: String,
    /// The assignment the host resolved (for the provider's log only).
    pub assignment: Option<String>,
    /// The fact sequence of that assignment: the provider waits (bounded) until its own
    /// projection has applied it.
    pub min_seq: Option<u64>,
    /// The W3C trace context of the calling invocation (header `traceparent`).
    pub traceparent: Option<String>,
}

impl Identity {
    /// Reads the caller's identity from a capability request's headers: [`headers::IDENTITY`],
    /// or the separate headers of hosts before it.
    ///
    /// # Errors
    ///
    /// `invalid_request`: a header is missing or malformed.
    pub fn read(headers: Option<&HeaderMap>) -> Result<Self, DataError> {
        let traceparent = header(headers, &NAMES.traceparent).map(str::to_owned);
        let Some(identity) = header(headers, &NAMES.identity) else {
            return Self::read_separate(headers, traceparent);
        };
        let invalid = |m: String| DataError::new(ErrorCode::InvalidRequest, m);
        let malformed = || {
            invalid(format!(
                "header {} is not `<instance> <component> <assignment|-> <sequence|->`: {identity:?}",
                headers::IDENTITY
            ))
        };
        let mut fields = identity.split(' ');
        let (Some(instance), Some(component), Some(assignment), Some(min_seq), None) = (
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
            fields.next(),
        ) else {
            return Err(malformed());
        };
        let instance = InstanceId::new(instance)
            .map_err(|e| invalid(format!("header {}: {e}", headers::IDENTITY)))?;
        if component.is_empty() || assignment.is_empty() {
            return Err(malformed());
        }
        let min_seq = match min_seq {
            "-" => None,
            seq => Some(seq.parse::<u64>().map_err(|_| malformed())?),
        };
        Ok(Self {
            instance,
            component: component.to_owned(),
            assignment: (assignment != "-").then(|| assignment.to_owned()),
            min_seq,
            traceparent,
        })
    }

    /// The identity in the separate headers hosts sent before [`headers::IDENTITY`].
    fn read_separate(
        headers: Option<&HeaderMap>,
        traceparent: Option<String>,
    ) -> Result<Self, DataError> {
        let invalid = |m: String| DataError::new(ErrorCode::InvalidRequest, m);
        let instance = header(headers, &NAMES.instance)
            .ok_or_else(|| invalid(format!("missing header {}", headers::IDENTITY)))?;
        let instance = InstanceId::new(instance)
            .map_err(|e| invalid(format!("header {}: {e}", headers::INSTANCE)))?;
        let component = header(headers, &NAMES.component)
            .ok_or_else(|| invalid(format!("missing header {}", headers::COMPONENT)))?
            .to_owned();
        let min_seq = match header(headers, &NAMES.min_seq) {
            Some(v) => Some(v.parse::<u64>().map_err(|_| {
                invalid(format!(
                    "header {} is not a sequence: {v:?}",
                    headers::MIN_SEQ
                ))
            })?),
            None => None,
        };
        let assignment = header(headers, &NAMES.assignment).map(str::to_owned);
        Ok(Self {
            instance,
            component,
            assignment,
            min_seq,
            traceparent,
        })
    }

    /// The headers that carry this identity: [`headers::IDENTITY`], and `traceparent` when
    /// there is one.
    pub fn headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        self.write(&mut headers);
        headers
    }

    fn write(&self, headers: &mut HeaderMap) {
        use std::fmt::Write as _;
        /// A field as it is, but `-` when empty and `_` for a space or line break (ids and
        /// names are validated and hold none; this keeps the header four fields whatever).
        fn push(out: &mut String, value: &str) {
            if value.is_empty() {
                out.push('-');
            } else {
                out.extend(value.chars().map(|c| match c {
                    ' ' | '\r' | '\n' => '_',
                    c => c,
                }));
            }
        }
        let mut identity = String::with_capacity(96);
        push(&mut identity, self.instance.as_str());
        identity.push(' ');
        push(&mut identity, &self.component);
        identity.push(' ');
        push(
            &mut identity,
            self.assignment.as_deref().unwrap_or_default(),
        );
        match self.min_seq {
            Some(seq) => {
                let _ = write!(identity, " {seq}");
            }
            None => identity.push_str(" -"),
        }
        headers.insert(NAMES.identity.clone(), identity);
        if let Some(traceparent) = &self.traceparent {
            headers.insert(NAMES.traceparent.clone(), header_safe(traceparent));
        }
    }
}

/// A capability request as it travels to a provider: identity headers and the encoded body.
///
/// # Errors
///
/// The request cannot be encoded (an HTTP head that is not serialisable).
pub fn capability_request(
    identity: &Identity,
    request: &CapabilityRequest,
) -> Result<(HeaderMap, Bytes), DataError> {
    let encoded = request
        .encode()
        .map_err(|e| DataError::new(ErrorCode::Internal, e.to_string()))?;
    let mut headers = identity.headers();
    if let Some(head) = encoded.http_head {
        headers.insert(NAMES.http_head.clone(), head);
    }
    Ok((headers, encoded.body))
}

/// Reads a capability request for `capability` received over NATS.
///
/// # Errors
///
/// `invalid_request`: the identity headers or the body are malformed.
pub fn read_capability_request(
    capability: Capability,
    message: &Message,
) -> Result<(Identity, CapabilityRequest), DataError> {
    let identity = Identity::read(message.headers.as_ref())?;
    let head = header(message.headers.as_ref(), &NAMES.http_head);
    let request = CapabilityRequest::decode(capability, head, message.payload.clone())
        .map_err(|e| DataError::new(ErrorCode::InvalidRequest, e.to_string()))?;
    Ok((identity, request))
}

/// The headers and body of a successful capability reply.
///
/// # Errors
///
/// The response cannot be encoded.
pub fn capability_reply(response: &CapabilityResponse) -> Result<(HeaderMap, Bytes), DataError> {
    let encoded = response
        .encode()
        .map_err(|e| DataError::new(ErrorCode::Internal, e.to_string()))?;
    let mut headers = ok_headers(None);
    if let Some(head) = encoded.http_head {
        // JSON escapes line breaks, and a head is never cut: a cut one would not parse.
        headers.insert(NAMES.http_head.clone(), head);
    }
    Ok((headers, encoded.body))
}

/// Reads a provider's reply to a request for `capability`.
///
/// # Errors
///
/// The provider answered with an error, or its reply is malformed (`internal`).
pub fn read_capability_reply(
    capability: Capability,
    message: &Message,
) -> Result<CapabilityResponse, DataError> {
    read_reply(message)?;
    let head = header(message.headers.as_ref(), &NAMES.http_head);
    CapabilityResponse::decode(capability, head, message.payload.clone()).map_err(|e| {
        DataError::new(
            ErrorCode::Internal,
            format!("the provider sent a malformed reply: {e}"),
        )
    })
}

/// The headers and body of an HTTP request to a component or an instance.
///
/// # Errors
///
/// The head cannot be encoded.
pub fn http_request(
    head: &impl serde::Serialize,
    body: Bytes,
) -> Result<(HeaderMap, Bytes), DataError> {
    let head = serde_json::to_string(head).map_err(|e| {
        DataError::new(
            ErrorCode::Internal,
            format!("cannot encode the request head: {e}"),
        )
    })?;
    let mut headers = HeaderMap::new();
    headers.insert(NAMES.http_head.clone(), head);
    Ok((headers, body))
}

/// Reads an HTTP request received by an instance.
///
/// # Errors
///
/// `invalid_request`: the head is missing or malformed; `payload_too_large`: the body is over
/// [`MAX_BODY_BYTES`](trellis_schemas::dataplane::MAX_BODY_BYTES).
pub fn read_http_request(message: &Message) -> Result<HttpMessage<HttpRequestHead>, DataError> {
    let invalid = |m: String| DataError::new(ErrorCode::InvalidRequest, m);
    let head = header(message.headers.as_ref(), &NAMES.http_head)
        .ok_or_else(|| invalid(format!("missing header {}", headers::HTTP_HEAD)))?;
    let head = serde_json::from_str(head).map_err(|e| {
        invalid(format!(
            "header {} is not a request head: {e}",
            headers::HTTP_HEAD
        ))
    })?;
    check_size(message.payload.len())?;
    Ok(HttpMessage {
        head,
        body: message.payload.clone(),
    })
}

/// The headers and body of a successful HTTP reply from `instance`.
///
/// # Errors
///
/// The head cannot be encoded.
pub fn http_reply(
    response: &HttpMessage<HttpResponseHead>,
    instance: Option<&HeaderValue>,
) -> Result<(HeaderMap, Bytes), DataError> {
    let head = serde_json::to_string(&response.head).map_err(|e| {
        DataError::new(
            ErrorCode::Internal,
            format!("cannot encode the response head: {e}"),
        )
    })?;
    let mut headers = ok_headers(instance);
    // JSON escapes line breaks, and a head is never cut: a cut one would not parse.
    headers.insert(NAMES.http_head.clone(), head);
    Ok((headers, response.body.clone()))
}

/// Reads an instance's reply to an HTTP request.
///
/// # Errors
///
/// The instance answered with an error, or its reply has no valid head (`internal`).
pub fn read_http_reply(message: Message) -> Result<HttpMessage<HttpResponseHead>, DataError> {
    read_reply(&message)?;
    let head = header(message.headers.as_ref(), &NAMES.http_head)
        .ok_or_else(|| DataError::new(ErrorCode::Internal, "the reply has no response head"))?;
    let head = serde_json::from_str(head).map_err(|e| {
        DataError::new(
            ErrorCode::Internal,
            format!("the reply's response head is malformed: {e}"),
        )
    })?;
    Ok(HttpMessage {
        head,
        body: message.payload,
    })
}

/// Refuses a body over [`MAX_BODY_BYTES`](trellis_schemas::dataplane::MAX_BODY_BYTES).
///
/// # Errors
///
/// `payload_too_large`, saying the size and the limit.
pub fn check_size(len: usize) -> Result<(), DataError> {
    let max = trellis_schemas::dataplane::MAX_BODY_BYTES;
    if len > max {
        return Err(DataError::new(
            ErrorCode::PayloadTooLarge,
            format!("the body is {len} bytes; the limit is {max}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use trellis_schemas::capability::rpc::KvRequest;

    use super::*;

    fn message(headers: HeaderMap, payload: Bytes) -> Message {
        Message {
            subject: Subject::from_static("x"),
            reply: None,
            payload,
            headers: Some(headers),
            status: None,
            description: None,
            length: 0,
        }
    }

    #[test]
    fn error_replies_read_back_with_code_reason_and_message() {
        let error = DataError::crash(CrashReason::Timeout, "timed out\nafter 1s");
        let instance = HeaderValue::from("01JABCDEFGHJKMNPQRSTVWXYZ0");
        let headers = error_headers(&error, Some(&instance));
        let reply = message(headers, Bytes::from(error.message.clone()));
        assert_eq!(read_reply(&reply), Err(error));
        assert_eq!(reply_instance(&reply), Some("01JABCDEFGHJKMNPQRSTVWXYZ0"));
        assert!(read_reply(&message(ok_headers(None), Bytes::new())).is_ok());
        let foreign = message(HeaderMap::new(), Bytes::from_static(b"hi"));
        assert_eq!(
            read_reply(&foreign).map_err(|e| e.code),
            Err(ErrorCode::Internal)
        );
    }

    #[test]
    fn capability_requests_carry_identity_and_a_binary_body() {
        let identity = Identity {
            instance: InstanceId::new("01JABCDEFGHJKMNPQRSTVWXYZ0").expect("valid"),
            component: "c".into(),
            assignment: Some("a".into()),
            min_seq: Some(7),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
        };
        let request = CapabilityRequest::KeyValue(KvRequest::Get {
            bucket: String::new(),
            key: "k".into(),
        });
        let (headers, body) = capability_request(&identity, &request).expect("encodes");
        let (who, back) =
            read_capability_request(Capability::KeyValue, &message(headers, body)).expect("reads");
        assert_eq!(who, identity);
        assert_eq!(back, request);
        let e = read_capability_request(
            Capability::KeyValue,
            &message(HeaderMap::new(), Bytes::new()),
        )
        .expect_err("no identity");
        assert_eq!(e.code, ErrorCode::InvalidRequest);
    }

    #[test]
    fn the_identity_is_one_header_and_the_separate_headers_still_read() {
        let instance = InstanceId::new("01JABCDEFGHJKMNPQRSTVWXYZ0").expect("valid");
        for (assignment, min_seq) in [
            (Some("a1"), Some(7)),
            (None, Some(3)),
            (Some("a1"), None),
            (None, None),
        ] {
            let identity = Identity {
                instance: instance.clone(),
                component: "kv-probe".into(),
                assignment: assignment.map(str::to_owned),
                min_seq,
                traceparent: None,
            };
            let mut headers = HeaderMap::new();
            identity.write(&mut headers);
            assert_eq!(headers.iter().count(), 1, "one header: {headers:?}");
            assert_eq!(Identity::read(Some(&headers)), Ok(identity));
        }
        let one = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(headers::IDENTITY, value);
            Identity::read(Some(&headers)).map_err(|e| (e.code, e.message))
        };
        assert_eq!(
            one("01JABCDEFGHJKMNPQRSTVWXYZ0 c a 12").map(|i| (
                i.component,
                i.assignment,
                i.min_seq
            )),
            Ok(("c".to_owned(), Some("a".to_owned()), Some(12)))
        );
        for bad in [
            "",
            "01JABCDEFGHJKMNPQRSTVWXYZ0 c a",
            "01JABCDEFGHJKMNPQRSTVWXYZ0 c a 12 extra",
            "01JABCDEFGHJKMNPQRSTVWXYZ0 c a twelve",
            "01JABCDEFGHJKMNPQRSTVWXYZ0  a 12",
            "not.an.id c a 12",
        ] {
            let (code, message) = one(bad).expect_err(bad);
            assert_eq!(code, ErrorCode::InvalidRequest, "{bad:?}");
            assert!(message.contains(headers::IDENTITY), "{bad:?}: {message}");
        }
        // A host from before the one header.
        let mut headers = HeaderMap::new();
        headers.insert(headers::INSTANCE, instance.as_str());
        headers.insert(headers::COMPONENT, "c");
        headers.insert(headers::ASSIGNMENT, "a");
        headers.insert(headers::MIN_SEQ, "5");
        let old = Identity::read(Some(&headers)).expect("reads");
        assert_eq!(
            (
                old.instance,
                old.component.as_str(),
                old.assignment.as_deref(),
                old.min_seq
            ),
            (instance, "c", Some("a"), Some(5))
        );
    }

    #[test]
    fn large_http_heads_travel_whole() {
        let head = HttpResponseHead {
            status: 200,
            headers: (0..100)
                .map(|i| (format!("x-header-{i}"), "v\r\n".repeat(20)))
                .collect(),
        };
        let response = HttpMessage {
            head,
            body: Bytes::from_static(b"body"),
        };
        let (headers, body) = http_reply(&response, None).expect("encodes");
        let back = read_http_reply(message(headers, body)).expect("reads");
        assert_eq!(back, response);
        let (headers, body) =
            capability_reply(&CapabilityResponse::Http(response.clone())).expect("encodes");
        let back = read_capability_reply(Capability::HttpOutgoing, &message(headers, body))
            .expect("reads");
        assert_eq!(back, CapabilityResponse::Http(response));
    }

    #[test]
    fn header_values_have_no_line_breaks_and_are_bounded() {
        assert_eq!(header_safe("a\r\nb"), "a  b");
        let long = "é".repeat(1000);
        let safe = header_safe(&long);
        assert!(safe.len() <= 1024);
        assert!(safe.chars().all(|c| c == 'é'));
    }
}
