//! Serving capability calls: identity headers, the assignment check, size limits and replies.

use std::fmt;
use std::sync::Arc;

use async_nats::header::HeaderName;
use async_nats::{HeaderMap, HeaderValue, Message};
use bytes::Bytes;
use trellis_schemas::capability::rpc::{self, HttpResponseHead, RpcErrorCode};
use trellis_schemas::{Assignment, Capability, InstanceId};

use crate::Context;

/// Who makes a call: the instance and its component, as the host names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The calling instance.
    pub instance: InstanceId,
    /// Its component.
    pub component: String,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "instance {} of {}", self.instance, self.component)
    }
}

/// One capability call, checked: the caller holds `assignment`, served by this provider.
#[derive(Debug, Clone)]
pub struct Call {
    /// The capability called.
    pub capability: Capability,
    /// The assignment that grants it, as this provider's projection has it.
    pub assignment: Assignment,
    /// Who calls.
    pub caller: Caller,
    /// The request's headers (e.g. [`rpc::HTTP_HEAD`]).
    pub headers: HeaderMap,
    /// The request body (at most [`rpc::MAX_BODY_BYTES`]).
    pub body: Bytes,
}

impl Call {
    /// A request header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(HeaderValue::as_str)
    }

    /// A setting of the assignment's configuration.
    pub fn config(&self, key: &str) -> Option<&str> {
        self.assignment.config.get(key).map(String::as_str)
    }
}

/// A successful answer.
#[derive(Debug, Clone, Default)]
pub struct Reply {
    /// The body.
    pub body: Bytes,
    /// An HTTP response head as JSON, sent in [`rpc::HTTP_HEAD`].
    pub http_head: Option<String>,
}

impl Reply {
    /// A reply with `body` and no head.
    pub fn new(body: impl Into<Bytes>) -> Self {
        Self {
            body: body.into(),
            http_head: None,
        }
    }

    /// A reply whose body is `value` as JSON.
    pub fn json<T: serde::Serialize>(value: &T) -> Result<Self, RpcError> {
        serde_json::to_vec(value)
            .map(Self::new)
            .map_err(|e| RpcError::internal(format!("cannot encode the reply: {e}")))
    }

    /// An HTTP response: its head and body.
    pub fn http(head: &HttpResponseHead, body: impl Into<Bytes>) -> Result<Self, RpcError> {
        let head = serde_json::to_string(head)
            .map_err(|e| RpcError::internal(format!("cannot encode the response head: {e}")))?;
        Ok(Self {
            body: body.into(),
            http_head: Some(head),
        })
    }
}

/// A failed call: a stable code and a message for people.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RpcError {
    /// The code.
    pub code: RpcErrorCode,
    /// What went wrong.
    pub message: String,
}

impl RpcError {
    /// An error with `code`.
    pub fn new(code: RpcErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// `access_denied`.
    pub fn denied(message: impl Into<String>) -> Self {
        Self::new(RpcErrorCode::AccessDenied, message)
    }

    /// `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(RpcErrorCode::InvalidRequest, message)
    }

    /// `too_large`.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(RpcErrorCode::TooLarge, message)
    }

    /// `unavailable`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(RpcErrorCode::Unavailable, message)
    }

    /// `upstream`.
    pub fn upstream(message: impl Into<String>) -> Self {
        Self::new(RpcErrorCode::Upstream, message)
    }

    /// `internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(RpcErrorCode::Internal, message)
    }
}

impl fmt::Display for RpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for RpcError {}

/// A value safe to put in a header: no CR or LF, at most 1 KiB (cut on a character boundary).
pub fn header_safe(value: &str) -> String {
    const MAX: usize = 1024;
    let mut end = value.len().min(MAX);
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value[..end].replace(['\r', '\n'], " ")
}

/// The header names of the protocol, parsed once.
#[derive(Debug)]
pub(crate) struct Names {
    pub instance: HeaderName,
    pub component: HeaderName,
    pub assignment: HeaderName,
    pub min_seq: HeaderName,
    pub status: HeaderName,
    pub error_code: HeaderName,
    pub error: HeaderName,
    pub http_head: HeaderName,
}

pub(crate) static NAMES: Names = Names {
    instance: HeaderName::from_static(rpc::INSTANCE),
    component: HeaderName::from_static(rpc::COMPONENT),
    assignment: HeaderName::from_static(rpc::ASSIGNMENT),
    min_seq: HeaderName::from_static(rpc::MIN_SEQ),
    status: HeaderName::from_static(rpc::STATUS),
    error_code: HeaderName::from_static(rpc::ERROR_CODE),
    error: HeaderName::from_static(rpc::ERROR),
    http_head: HeaderName::from_static(rpc::HTTP_HEAD),
};

/// What a provider does with the calls it serves, and in the background.
pub trait Provider: Send + Sync + 'static {
    /// Answers one call; the SDK has checked the caller's assignment and the body's size.
    fn handle(&self, call: Call) -> impl Future<Output = Result<Reply, RpcError>> + Send;

    /// Background work (listeners, subscriptions), started once the provider serves. It should
    /// return soon after [`Context::shutdown`] completes; the SDK waits for it (bounded).
    fn run(self: Arc<Self>, ctx: Context) -> impl Future<Output = ()> + Send {
        let _ = ctx;
        async {}
    }
}

/// Checks and answers one call message.
pub(crate) async fn serve_call<P: Provider>(
    provider: &P,
    ctx: &Context,
    capability: Capability,
    message: Message,
) {
    let Some(reply_to) = message.reply.clone() else {
        tracing::debug!(subject = %message.subject, "call without a reply subject; ignored");
        return;
    };
    let mut result = check_and_handle(provider, ctx, capability, message).await;
    // A reply NATS would refuse is turned into an error the caller can act on.
    if let Ok(reply) = &result
        && reply.body.len() > rpc::MAX_BODY_BYTES / 2
    {
        let max = ctx.client.server_info().max_payload;
        let size = reply.body.len() + reply.http_head.as_ref().map_or(0, String::len) + 256;
        if size > max {
            result = Err(RpcError::too_large(format!(
                "the reply is {size} bytes; this NATS server carries at most {max}"
            )));
        }
    }
    let (headers, body) = match result {
        Ok(reply) => {
            let mut headers = HeaderMap::new();
            headers.insert(NAMES.status.clone(), "ok");
            if let Some(head) = reply.http_head {
                headers.insert(NAMES.http_head.clone(), header_safe(&head));
            }
            (headers, reply.body)
        }
        Err(error) => (error_headers(&error), Bytes::from(error.message)),
    };
    if let Err(e) = ctx
        .client
        .publish_with_headers(reply_to, headers, body)
        .await
    {
        tracing::debug!(error = %e, "cannot send a reply");
    }
}

/// The headers of an error reply.
pub fn error_headers(error: &RpcError) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(NAMES.status.clone(), "error");
    headers.insert(NAMES.error_code.clone(), error.code.as_str());
    headers.insert(NAMES.error.clone(), header_safe(&error.message));
    headers
}

async fn check_and_handle<P: Provider>(
    provider: &P,
    ctx: &Context,
    capability: Capability,
    message: Message,
) -> Result<Reply, RpcError> {
    let headers = message.headers.unwrap_or_default();
    let text = |name: &HeaderName| {
        headers
            .get(name.clone())
            .map(HeaderValue::as_str)
            .filter(|v| !v.is_empty())
    };
    let instance = text(&NAMES.instance)
        .ok_or_else(|| RpcError::invalid(format!("missing header {}", rpc::INSTANCE)))?;
    let instance = InstanceId::new(instance)
        .map_err(|e| RpcError::invalid(format!("header {}: {e}", rpc::INSTANCE)))?;
    let component = text(&NAMES.component)
        .ok_or_else(|| RpcError::invalid(format!("missing header {}", rpc::COMPONENT)))?
        .to_owned();
    let min_seq = match text(&NAMES.min_seq) {
        Some(v) => Some(v.parse::<u64>().map_err(|_| {
            RpcError::invalid(format!("header {} is not a sequence: {v:?}", rpc::MIN_SEQ))
        })?),
        None => None,
    };
    let claimed = text(&NAMES.assignment).map(str::to_owned);
    let request = Request {
        capability,
        caller: Caller {
            instance,
            component,
        },
        min_seq,
        claimed,
        headers,
        body: message.payload,
    };
    check_and_handle_request(provider, ctx, request).await
}

/// One call as it reaches a provider, before its checks: over NATS (from the identity headers)
/// or from the process the provider is embedded in.
#[derive(Debug, Clone)]
pub struct Request {
    /// The capability called.
    pub capability: Capability,
    /// Who calls, as its host names it.
    pub caller: Caller,
    /// The fact sequence of the assignment the host resolved: the provider waits (bounded) until
    /// its own projection has applied it.
    pub min_seq: Option<u64>,
    /// The assignment the host resolved (for the log only: the provider decides by its own).
    pub claimed: Option<String>,
    /// The request's headers (e.g. [`rpc::HTTP_HEAD`]).
    pub headers: HeaderMap,
    /// The request body.
    pub body: Bytes,
}

/// The checks every call passes, however it arrived: the body's size, then an assignment in
/// this provider's own projection granting the capability to the caller through this provider.
pub(crate) async fn check_and_handle_request<P: Provider>(
    provider: &P,
    ctx: &Context,
    request: Request,
) -> Result<Reply, RpcError> {
    let Request {
        capability,
        caller,
        min_seq,
        claimed,
        headers,
        body,
    } = request;
    if body.len() > rpc::MAX_BODY_BYTES {
        return Err(RpcError::too_large(format!(
            "the request body is {} bytes; the limit is {}",
            body.len(),
            rpc::MAX_BODY_BYTES
        )));
    }
    let claimed = claimed.as_deref().unwrap_or("-");
    let Some(record) = ctx
        .assignments
        .lookup_at(&caller.instance, &caller.component, capability, min_seq)
        .await
    else {
        tracing::info!(%caller, %capability, assignment = %claimed, "call refused: no assignment");
        return Err(RpcError::denied(format!(
            "no assignment grants {capability} to {caller} through provider `{}`",
            ctx.name
        )));
    };
    if claimed != "-" && claimed != record.assignment.assignment_id.as_str() {
        tracing::debug!(%caller, host_says = %claimed, provider_says = %record.assignment.assignment_id, "the host resolved another assignment");
    }
    provider
        .handle(Call {
            capability,
            assignment: record.assignment,
            caller,
            headers,
            body,
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_have_no_line_breaks_and_are_bounded() {
        assert_eq!(header_safe("a\r\nb"), "a  b");
        let long = "é".repeat(1000);
        let safe = header_safe(&long);
        assert!(safe.len() <= 1024);
        assert!(safe.chars().all(|c| c == 'é'));
    }

    #[test]
    fn error_replies_carry_code_and_message() {
        let headers = error_headers(&RpcError::denied("no\nway"));
        assert_eq!(
            headers.get(rpc::STATUS).map(HeaderValue::as_str),
            Some("error")
        );
        assert_eq!(
            headers.get(rpc::ERROR_CODE).map(HeaderValue::as_str),
            Some("access_denied")
        );
        assert_eq!(
            headers.get(rpc::ERROR).map(HeaderValue::as_str),
            Some("no way")
        );
    }
}
