//! Makes outgoing HTTP requests through `wasi:http/outgoing-handler`. A response comes back as
//! `<status>\n<body>`; a failure as the WIT name of the `error-code` case, so tests can tell a
//! denial (`HTTP-request-denied`) from a network failure (`connection-refused`, ...).

wit_bindgen::generate!({
    world: "trellis:test-capabilities/http-fetch",
    path: ["../../../wit", "../wit-capabilities"],
    // The interfaces come from the vendored packages in `wit/deps`.
    generate_all,
});

use wasi::http::outgoing_handler;
use wasi::http::types::{
    ErrorCode, Fields, IncomingBody, IncomingResponse, Method, OutgoingBody, OutgoingRequest,
    Scheme,
};
use wasi::io::streams::StreamError;

struct HttpFetch;

/// The largest write `blocking-write-and-flush` accepts.
const WRITE_CHUNK: usize = 4096;

impl Guest for HttpFetch {
    fn fetch(method: String, url: String, body: String) -> Result<String, String> {
        let request = build_request(&method, &url, body.len())?;
        let outgoing_body = request
            .body()
            .map_err(|()| "invalid-request: body already taken".to_owned())?;
        let response = outgoing_handler::handle(request, None).map_err(code_name)?;

        let written = write_body(outgoing_body, body.as_bytes());

        response.subscribe().block();
        let response = match response.get() {
            Some(Ok(Ok(response))) => response,
            Some(Ok(Err(code))) => return Err(code_name(code)),
            Some(Err(())) => return Err("internal-error: response taken twice".to_owned()),
            None => return Err("internal-error: response not ready".to_owned()),
        };
        written?;
        let status = response.status();
        let body = read_body(response)?;
        Ok(format!("{status}\n{}", String::from_utf8_lossy(&body)))
    }
}

fn build_request(method: &str, url: &str, body_len: usize) -> Result<OutgoingRequest, String> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| format!("invalid-request: no scheme in {url:?}"))?;
    let scheme = match scheme.to_ascii_lowercase().as_str() {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => Scheme::Other(other.to_owned()),
    };
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if authority.is_empty() {
        return Err(format!("invalid-request: no host in {url:?}"));
    }
    let path = match path {
        "" => "/".to_owned(),
        p if p.starts_with('?') => format!("/{p}"),
        p => p.to_owned(),
    };
    let method = match method.to_ascii_uppercase().as_str() {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "CONNECT" => Method::Connect,
        "OPTIONS" => Method::Options,
        "TRACE" => Method::Trace,
        "PATCH" => Method::Patch,
        _ => Method::Other(method.to_owned()),
    };

    let headers = Fields::new();
    if body_len > 0 {
        headers
            .append("content-length", body_len.to_string().as_bytes())
            .map_err(|e| format!("invalid-request: content-length: {e:?}"))?;
    }
    let request = OutgoingRequest::new(headers);
    request
        .set_method(&method)
        .map_err(|()| format!("invalid-request: method {method:?}"))?;
    request
        .set_scheme(Some(&scheme))
        .map_err(|()| format!("invalid-request: scheme {scheme:?}"))?;
    request
        .set_authority(Some(authority))
        .map_err(|()| format!("invalid-request: authority {authority:?}"))?;
    request
        .set_path_with_query(Some(&path))
        .map_err(|()| format!("invalid-request: path {path:?}"))?;
    Ok(request)
}

/// Writes `bytes` (nothing when empty) and finishes the body.
fn write_body(body: OutgoingBody, bytes: &[u8]) -> Result<(), String> {
    if !bytes.is_empty() {
        let stream = body
            .write()
            .map_err(|()| "internal-error: request body stream taken twice".to_owned())?;
        for chunk in bytes.chunks(WRITE_CHUNK) {
            stream
                .blocking_write_and_flush(chunk)
                .map_err(|e| stream_error("request body", e))?;
        }
    }
    OutgoingBody::finish(body, None).map_err(code_name)
}

fn read_body(response: IncomingResponse) -> Result<Vec<u8>, String> {
    let body = response
        .consume()
        .map_err(|()| "internal-error: response body taken twice".to_owned())?;
    let stream = body
        .stream()
        .map_err(|()| "internal-error: response body stream taken twice".to_owned())?;
    let mut bytes = Vec::new();
    loop {
        match stream.blocking_read(64 * 1024) {
            Ok(chunk) => bytes.extend_from_slice(&chunk),
            Err(StreamError::Closed) => break,
            Err(e) => return Err(stream_error("response body", e)),
        }
    }
    drop(stream);
    drop(IncomingBody::finish(body));
    Ok(bytes)
}

/// A stream failure: the HTTP error code behind it when there is one.
fn stream_error(what: &str, error: StreamError) -> String {
    match error {
        StreamError::Closed => format!("{what}: closed"),
        StreamError::LastOperationFailed(e) => match wasi::http::types::http_error_code(&e) {
            Some(code) => code_name(code),
            None => format!("{what}: {}", e.to_debug_string()),
        },
    }
}

/// The WIT name of an `error-code` case, followed by `: <payload>` when it has one.
fn code_name(code: ErrorCode) -> String {
    fn with(name: &str, payload: impl std::fmt::Debug) -> String {
        format!("{name}: {payload:?}")
    }
    match code {
        ErrorCode::DnsTimeout => "DNS-timeout".into(),
        ErrorCode::DnsError(p) => with("DNS-error", p),
        ErrorCode::DestinationNotFound => "destination-not-found".into(),
        ErrorCode::DestinationUnavailable => "destination-unavailable".into(),
        ErrorCode::DestinationIpProhibited => "destination-IP-prohibited".into(),
        ErrorCode::DestinationIpUnroutable => "destination-IP-unroutable".into(),
        ErrorCode::ConnectionRefused => "connection-refused".into(),
        ErrorCode::ConnectionTerminated => "connection-terminated".into(),
        ErrorCode::ConnectionTimeout => "connection-timeout".into(),
        ErrorCode::ConnectionReadTimeout => "connection-read-timeout".into(),
        ErrorCode::ConnectionWriteTimeout => "connection-write-timeout".into(),
        ErrorCode::ConnectionLimitReached => "connection-limit-reached".into(),
        ErrorCode::TlsProtocolError => "TLS-protocol-error".into(),
        ErrorCode::TlsCertificateError => "TLS-certificate-error".into(),
        ErrorCode::TlsAlertReceived(p) => with("TLS-alert-received", p),
        ErrorCode::HttpRequestDenied => "HTTP-request-denied".into(),
        ErrorCode::HttpRequestLengthRequired => "HTTP-request-length-required".into(),
        ErrorCode::HttpRequestBodySize(p) => with("HTTP-request-body-size", p),
        ErrorCode::HttpRequestMethodInvalid => "HTTP-request-method-invalid".into(),
        ErrorCode::HttpRequestUriInvalid => "HTTP-request-URI-invalid".into(),
        ErrorCode::HttpRequestUriTooLong => "HTTP-request-URI-too-long".into(),
        ErrorCode::HttpRequestHeaderSectionSize(p) => with("HTTP-request-header-section-size", p),
        ErrorCode::HttpRequestHeaderSize(p) => with("HTTP-request-header-size", p),
        ErrorCode::HttpRequestTrailerSectionSize(p) => with("HTTP-request-trailer-section-size", p),
        ErrorCode::HttpRequestTrailerSize(p) => with("HTTP-request-trailer-size", p),
        ErrorCode::HttpResponseIncomplete => "HTTP-response-incomplete".into(),
        ErrorCode::HttpResponseHeaderSectionSize(p) => with("HTTP-response-header-section-size", p),
        ErrorCode::HttpResponseHeaderSize(p) => with("HTTP-response-header-size", p),
        ErrorCode::HttpResponseBodySize(p) => with("HTTP-response-body-size", p),
        ErrorCode::HttpResponseTrailerSectionSize(p) => {
            with("HTTP-response-trailer-section-size", p)
        }
        ErrorCode::HttpResponseTrailerSize(p) => with("HTTP-response-trailer-size", p),
        ErrorCode::HttpResponseTransferCoding(p) => with("HTTP-response-transfer-coding", p),
        ErrorCode::HttpResponseContentCoding(p) => with("HTTP-response-content-coding", p),
        ErrorCode::HttpResponseTimeout => "HTTP-response-timeout".into(),
        ErrorCode::HttpUpgradeFailed => "HTTP-upgrade-failed".into(),
        ErrorCode::HttpProtocolError => "HTTP-protocol-error".into(),
        ErrorCode::LoopDetected => "loop-detected".into(),
        ErrorCode::ConfigurationError => "configuration-error".into(),
        ErrorCode::InternalError(Some(message)) => format!("internal-error: {message}"),
        ErrorCode::InternalError(None) => "internal-error".into(),
    }
}

export!(HttpFetch);
