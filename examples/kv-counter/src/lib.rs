//! A `wasi:http` component that counts requests in `wasi:keyvalue`. Each request increments a key
//! atomically and answers `count: N`. The key is the request path without its leading `/` (any
//! character outside `A-Z a-z 0-9 _ -` becomes `_`), or `count` for `/`. The bucket is opened with
//! the empty identifier: the component's assignment decides which bucket that is. A keyvalue error
//! answers 500 with its text (`access-denied`, `no-such-store` or `other: <message>`). Each request
//! is logged through `wasi:logging` (`trellis logs kv-counter` shows the lines).

wit_bindgen::generate!({
    world: "trellis:lattice/http-component",
    path: "../../wit",
    // The interfaces come from the vendored packages in `wit/deps`.
    generate_all,
});

use exports::wasi::http::incoming_handler::Guest;
use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
use wasi::keyvalue::{atomics, store};
use wasi::logging::logging::{self, Level};

struct KvCounter;

impl Guest for KvCounter {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_else(|| "/".to_owned());
        let key = key_for(&path);
        let (status, body) = match count(&key) {
            Ok(n) => {
                logging::log(Level::Info, "kv-counter", &format!("{path} → {key} = {n}"));
                (200, format!("count: {n}\n"))
            }
            Err(error) => {
                logging::log(Level::Error, "kv-counter", &format!("{path}: {error}"));
                (500, format!("{error}\n"))
            }
        };
        respond(response_out, status, body.as_bytes());
    }
}

/// Increments `key` in the assigned bucket and returns its new value.
fn count(key: &str) -> Result<u64, String> {
    let bucket = store::open("").map_err(describe)?;
    atomics::increment(&bucket, key, 1).map_err(describe)
}

/// The counter's key for a request path.
fn key_for(path_with_query: &str) -> String {
    let path = path_with_query
        .split_once('?')
        .map_or(path_with_query, |(path, _)| path);
    let path = path.strip_prefix('/').unwrap_or(path);
    if path.is_empty() {
        return "count".to_owned();
    }
    path.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn describe(error: store::Error) -> String {
    match error {
        store::Error::AccessDenied => "access-denied".to_owned(),
        store::Error::NoSuchStore => "no-such-store".to_owned(),
        store::Error::Other(message) => format!("other: {message}"),
    }
}

fn respond(response_out: ResponseOutparam, status: u16, body: &[u8]) {
    let headers = Fields::new();
    // Neither header is forbidden, so appending cannot fail.
    let _ = headers.append("content-type", b"text/plain");
    let _ = headers.append("content-length", body.len().to_string().as_bytes());
    let response = OutgoingResponse::new(headers);
    let _ = response.set_status_code(status);
    let Ok(outgoing) = response.body() else {
        return;
    };
    ResponseOutparam::set(response_out, Ok(response));
    if let Ok(stream) = outgoing.write()
        && stream.blocking_write_and_flush(body).is_err()
    {
        return;
    }
    let _ = OutgoingBody::finish(outgoing, None);
}

export!(KvCounter);
