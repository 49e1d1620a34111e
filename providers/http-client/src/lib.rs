//! `trellis-provider-http-client`: outgoing HTTP for `wasi:http/outgoing-handler`.
//!
//! The host sends the request head (absolute URI, method, headers, `timeout_ms`) in the
//! `Trellis-Http` header and the body as payload. The provider checks the URI's host and port
//! against the assignment's `allowed_hosts`, performs the request over plain HTTP/1.1 with a
//! pooled client, and answers with the response head in `Trellis-Http` and the body as payload.
//!
//! Upstream failures are `upstream` errors whose message starts with the `wasi:http` error the
//! host reports to the component: `connection_refused`, `destination_not_found`,
//! `connection_timeout`, `response_timeout` or `connection_terminated`. HTTPS is not supported
//! yet.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use trellis_provider_sdk::{
    Call, CapabilityRequest, CapabilityResponse, Context, DataError, Outcome, Provider,
    ProviderInfo,
};
use trellis_schemas::Capability;
use trellis_schemas::capability::host_allowed;
use trellis_schemas::capability::rpc::{HttpMessage, HttpResponseHead};
use trellis_schemas::dataplane::MAX_BODY_BYTES;

/// What this provider is.
pub const INFO: ProviderInfo = ProviderInfo {
    name: "http-client",
    version: env!("CARGO_PKG_VERSION"),
    capabilities: &[Capability::HttpOutgoing],
    rpc: &[Capability::HttpOutgoing],
    // TLS handshakes and bodies are work of its own, on every core.
    workers: 0,
};

/// The timeout when neither the request nor the assignment sets one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// The longest a connection may take to establish.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The provider: one pooled HTTP/1.1 client.
#[derive(Debug)]
pub struct HttpClientProvider {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl HttpClientProvider {
    /// A provider with a fresh connection pool.
    pub async fn new(_ctx: Context) -> anyhow::Result<Self> {
        Ok(Self::default())
    }
}

impl Default for HttpClientProvider {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Self { client }
    }
}

/// Headers that describe one hop, not the message: never forwarded.
fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "transfer-encoding"
            | "upgrade"
            | "te"
            | "trailer"
            | "content-length"
    )
}

/// The request's effective timeout: the caller's, capped by the assignment's `timeout_ms`
/// (default [`DEFAULT_TIMEOUT`]).
pub fn effective_timeout(head: Option<u64>, config: Option<&str>) -> Duration {
    let limit = config
        .and_then(|v| v.parse::<u64>().ok())
        .map_or(DEFAULT_TIMEOUT, Duration::from_millis);
    head.map_or(limit, |ms| Duration::from_millis(ms.max(1)).min(limit))
}

/// The `upstream` error for a failed request, its first word the `wasi:http` error.
fn classify(error: &hyper_util::client::legacy::Error) -> DataError {
    let mut detail = error.to_string();
    let mut source = std::error::Error::source(error);
    let mut io_kind = None;
    while let Some(e) = source {
        detail.push_str(": ");
        detail.push_str(&e.to_string());
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            io_kind = Some(io.kind());
        }
        source = e.source();
    }
    let word = if error.is_connect() {
        match io_kind {
            Some(std::io::ErrorKind::ConnectionRefused) => "connection_refused",
            Some(std::io::ErrorKind::TimedOut) => "connection_timeout",
            _ if detail.contains("dns error") => "destination_not_found",
            Some(
                std::io::ErrorKind::HostUnreachable
                | std::io::ErrorKind::NetworkUnreachable
                | std::io::ErrorKind::AddrNotAvailable,
            ) => "destination_not_found",
            _ => "connection_refused",
        }
    } else {
        "connection_terminated"
    };
    DataError::upstream(format!("{word} {detail}"))
}

impl Provider for HttpClientProvider {
    async fn handle(&self, call: Call) -> Outcome {
        let CapabilityRequest::Http(HttpMessage { head, body }) = call.request.clone() else {
            return Err(DataError::invalid(format!(
                "the http-client provider does not serve {}",
                call.request.capability()
            )));
        };
        let uri: http::Uri = head
            .uri
            .parse()
            .map_err(|e| DataError::invalid(format!("invalid URI {:?}: {e}", head.uri)))?;
        let (Some(scheme), Some(host)) = (uri.scheme_str(), uri.host()) else {
            return Err(DataError::invalid(format!(
                "URI {:?} is not absolute (scheme and host needed)",
                head.uri
            )));
        };
        let default_port = match scheme {
            "http" => 80,
            "https" => 443,
            other => {
                return Err(DataError::invalid(format!(
                    "scheme {other:?} is not supported (http only)"
                )));
            }
        };
        let port = uri.port_u16().unwrap_or(default_port);
        let allowed = call.config("allowed_hosts").unwrap_or_default();
        if !host_allowed(allowed, host, Some(port)) {
            return Err(DataError::denied(format!(
                "{host}:{port} is not in the allowed hosts of assignment {} ({allowed})",
                call.assignment.assignment_id
            )));
        }
        if scheme == "https" {
            return Err(DataError::upstream(format!(
                "tls_unsupported: {} cannot be reached: this provider does not support TLS (https) yet",
                head.uri
            )));
        }
        let method = http::Method::from_bytes(head.method.as_bytes())
            .map_err(|_| DataError::invalid(format!("invalid method {:?}", head.method)))?;
        let mut request = http::Request::builder().method(method).uri(uri);
        if let Some(headers) = request.headers_mut() {
            for (name, value) in &head.headers {
                let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) else {
                    return Err(DataError::invalid(format!(
                        "invalid request header {name:?}"
                    )));
                };
                if !hop_by_hop(&name) {
                    headers.append(name, value);
                }
            }
            if !body.is_empty() {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
            }
        }
        let timeout = effective_timeout(head.timeout_ms, call.config("timeout_ms"));
        let request = request
            .body(Full::new(body))
            .map_err(|e| DataError::invalid(format!("invalid request: {e}")))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| classify(&e))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_BODY_BYTES)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        DataError::too_large(format!(
                            "the response body is over {} bytes",
                            MAX_BODY_BYTES
                        ))
                    } else {
                        DataError::upstream(format!("connection_terminated reading the body: {e}"))
                    }
                })?
                .to_bytes();
            Ok::<_, DataError>((parts, body))
        };
        let (parts, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| {
                DataError::upstream(format!(
                    "response_timeout no complete response from {} within {} ms",
                    head.uri,
                    timeout.as_millis()
                ))
            })??;
        let head = HttpResponseHead {
            status: parts.status.as_u16(),
            headers: parts
                .headers
                .iter()
                .filter(|(k, _)| !hop_by_hop(k))
                .filter_map(|(k, v)| Some((k.as_str().to_owned(), v.to_str().ok()?.to_owned())))
                .collect(),
        };
        Ok(CapabilityResponse::Http(HttpMessage { head, body }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smallest_timeout_wins() {
        assert_eq!(effective_timeout(None, None), DEFAULT_TIMEOUT);
        assert_eq!(
            effective_timeout(Some(500), None),
            Duration::from_millis(500)
        );
        assert_eq!(
            effective_timeout(Some(500), Some("200")),
            Duration::from_millis(200)
        );
        assert_eq!(
            effective_timeout(Some(90_000), None),
            DEFAULT_TIMEOUT,
            "the default caps a caller's wish"
        );
        assert_eq!(
            effective_timeout(Some(90_000), Some("60000")),
            Duration::from_secs(60),
            "an assignment may allow more than the default"
        );
    }
}
