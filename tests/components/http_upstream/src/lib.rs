//! A `wasi:http/proxy` component written only against the upstream `wasi` crate (no wit-bindgen,
//! nothing of Trellis's): proves a component built for any WASI 0.2 HTTP host runs on Trellis.
//!
//! Answers `upstream: <METHOD> <path-with-query>` as `text/plain`, followed for POST by a newline
//! and the request body. A request for `/status/<code>` is answered with that status.

use wasi::exports::http::incoming_handler::Guest;
use wasi::http::types::{
    Fields, IncomingBody, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Upstream;

wasi::http::proxy::export!(Upstream);

impl Guest for Upstream {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let method = method_name(&request.method());
        let path = request.path_with_query().unwrap_or_else(|| "/".to_owned());
        let mut body = format!("upstream: {method} {path}").into_bytes();
        if method == "POST" {
            body.push(b'\n');
            body.extend(read_body(request));
        }
        let status = status_for(&path);

        let headers = Fields::new();
        // `content-type` is not a forbidden header, so this cannot fail.
        let _ = headers.append("content-type", b"text/plain");
        let response = OutgoingResponse::new(headers);
        if response.set_status_code(status).is_err() {
            let _ = response.set_status_code(400);
        }
        let Ok(outgoing) = response.body() else {
            return;
        };
        ResponseOutparam::set(response_out, Ok(response));
        if let Ok(stream) = outgoing.write() {
            for chunk in body.chunks(4096) {
                if stream.blocking_write_and_flush(chunk).is_err() {
                    return;
                }
            }
        }
        let _ = OutgoingBody::finish(outgoing, None);
    }
}

fn method_name(method: &Method) -> String {
    match method {
        Method::Get => "GET".to_owned(),
        Method::Head => "HEAD".to_owned(),
        Method::Post => "POST".to_owned(),
        Method::Put => "PUT".to_owned(),
        Method::Delete => "DELETE".to_owned(),
        Method::Connect => "CONNECT".to_owned(),
        Method::Options => "OPTIONS".to_owned(),
        Method::Trace => "TRACE".to_owned(),
        Method::Patch => "PATCH".to_owned(),
        Method::Other(other) => other.clone(),
    }
}

/// 200, or `<code>` for `/status/<code>` (400 when `<code>` is not a number).
fn status_for(path_with_query: &str) -> u16 {
    let path = path_with_query
        .split_once('?')
        .map_or(path_with_query, |(path, _)| path);
    match path.strip_prefix("/status/") {
        Some(code) => code.parse().unwrap_or(400),
        None => 200,
    }
}

fn read_body(request: IncomingRequest) -> Vec<u8> {
    let mut bytes = Vec::new();
    let Ok(body) = request.consume() else {
        return bytes;
    };
    if let Ok(stream) = body.stream() {
        // Stops at the end of the body, and on a failed read.
        while let Ok(chunk) = stream.blocking_read(64 * 1024) {
            bytes.extend_from_slice(&chunk);
        }
    }
    drop(IncomingBody::finish(body));
    bytes
}
