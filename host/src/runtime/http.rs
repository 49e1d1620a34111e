//! `wasi:http` for components: outgoing requests go through the capability bridge (never
//! straight to the network), incoming requests arrive as bytes and leave as bytes.

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use trellis_schemas::Capability;
use trellis_schemas::capability::rpc::{
    CapabilityRequest, CapabilityResponse, HttpMessage, HttpRequestHead, HttpResponseHead,
};
use trellis_schemas::dataplane::{ErrorCode, MAX_BODY_BYTES};
use wasmtime_wasi_http::{Error, RequestOptions, WasiBody, WasiHttpHooks};

use super::capabilities::{CapabilityBridge, CapabilityCall, CapabilityError};
use super::store::call_budget;

/// The `wasi:http` hooks of one invocation.
pub(crate) struct HttpHooks {
    pub(crate) bridge: Arc<dyn CapabilityBridge>,
    pub(crate) deadline: Instant,
    pub(crate) traceparent: Option<Arc<str>>,
}

type SendFuture = Box<
    dyn Future<
            Output = Result<
                (
                    http::Response<WasiBody>,
                    Box<dyn Future<Output = Result<(), Error>> + Send>,
                ),
                Error,
            >,
        > + Send,
>;

/// The `wasi:http` error a failed outgoing call becomes.
fn outgoing_error(e: CapabilityError) -> Error {
    match e {
        CapabilityError::Denied(_) => Error::HttpRequestDenied,
        CapabilityError::Remote {
            code: ErrorCode::PayloadTooLarge,
            ..
        } => Error::HttpRequestBodySize(None),
        CapabilityError::Remote {
            code: ErrorCode::Upstream,
            message,
        } => {
            // The provider names the failure in the message's first word.
            match message.split_whitespace().next().unwrap_or_default() {
                "connection_refused" => Error::ConnectionRefused,
                "destination_not_found" => Error::DestinationNotFound,
                "connection_timeout" => Error::ConnectionTimeout,
                "response_timeout" => Error::HttpResponseTimeout,
                "connection_terminated" => Error::ConnectionTerminated,
                _ => Error::InternalError(Some(message)),
            }
        }
        other => Error::InternalError(Some(other.to_string())),
    }
}

fn head_of(parts: &http::request::Parts, timeout_ms: Option<u64>) -> HttpRequestHead {
    HttpRequestHead {
        method: parts.method.as_str().to_owned(),
        uri: parts.uri.to_string(),
        authority: None,
        headers: parts
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
        timeout_ms,
    }
}

impl WasiHttpHooks for HttpHooks {
    fn send_request(
        &mut self,
        request: http::Request<WasiBody>,
        options: Option<RequestOptions>,
        _fut: Box<dyn Future<Output = Result<(), Error>> + Send>,
    ) -> SendFuture {
        let bridge = Arc::clone(&self.bridge);
        let deadline = self.deadline;
        let traceparent = self.traceparent.clone();
        Box::new(async move {
            if !bridge.allows(Capability::HttpOutgoing) {
                return Err(Error::HttpRequestDenied);
            }
            let (parts, body) = request.into_parts();
            let body = Limited::new(body, MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|_| Error::HttpRequestBodySize(None))?
                .to_bytes();
            let remaining = call_budget(deadline);
            let wanted = options
                .as_ref()
                .and_then(|o| o.first_byte_timeout.or(o.connect_timeout))
                .map_or(remaining, |t| t.min(remaining));
            let head = head_of(
                &parts,
                Some(u64::try_from(wanted.as_millis()).unwrap_or(u64::MAX)),
            );
            let reply = bridge
                .call(CapabilityCall {
                    request: CapabilityRequest::Http(HttpMessage { head, body }),
                    timeout: remaining,
                    traceparent,
                })
                .await
                .map_err(outgoing_error)?;
            let CapabilityResponse::Http(HttpMessage { head, body }) = reply else {
                return Err(Error::InternalError(Some(
                    "the http-client answered another capability's reply".to_owned(),
                )));
            };
            let mut response = http::Response::builder().status(head.status);
            for (name, value) in &head.headers {
                response = response.header(name, value);
            }
            let body = Full::new(body)
                .map_err(|never| match never {})
                .boxed_unsync();
            let response = response
                .body(body)
                .map_err(|e| Error::InternalError(Some(e.to_string())))?;
            Ok((
                response,
                Box::new(async { Ok(()) }) as Box<dyn Future<Output = Result<(), Error>> + Send>,
            ))
        })
    }
}

/// An incoming request as hyper wants it: `http://<authority><path>` with the head's headers.
pub(crate) fn incoming_request(
    head: &HttpRequestHead,
    body: Bytes,
) -> Result<http::Request<WasiBody>, String> {
    let authority = head
        .authority
        .clone()
        .or_else(|| {
            head.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case("host"))
                .map(|(_, v)| v.clone())
        })
        .unwrap_or_else(|| "localhost".to_owned());
    let path = if head.uri.starts_with('/') {
        head.uri.clone()
    } else {
        format!("/{}", head.uri)
    };
    let uri: http::Uri = format!("http://{authority}{path}")
        .parse()
        .map_err(|e| format!("invalid request target {path:?}: {e}"))?;
    let method = http::Method::from_bytes(head.method.as_bytes())
        .map_err(|_| format!("invalid method {:?}", head.method))?;
    let mut request = http::Request::builder().method(method).uri(uri);
    for (name, value) in &head.headers {
        request = request.header(name, value);
    }
    request
        .body(
            Full::new(body)
                .map_err(|never| match never {})
                .boxed_unsync(),
        )
        .map_err(|e| format!("invalid request: {e}"))
}

/// The head of a response, keeping the headers whose values are text.
pub(crate) fn response_head(parts: &http::response::Parts) -> HttpResponseHead {
    HttpResponseHead {
        status: parts.status.as_u16(),
        headers: parts
            .headers
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
            .collect(),
    }
}
