//! A `wasi:http` component: answers every request with `Hello from Trellis` as `text/plain`. Built
//! with the upstream `wasi` crate alone, so nothing in it is specific to Trellis; the
//! `http-server` provider routes requests to it.

use wasi::exports::http::incoming_handler::Guest;
use wasi::http::types::{
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

const GREETING: &[u8] = b"Hello from Trellis\n";

struct HttpHello;

wasi::http::proxy::export!(HttpHello);

impl Guest for HttpHello {
    fn handle(_request: IncomingRequest, response_out: ResponseOutparam) {
        let headers = Fields::new();
        // Neither header is forbidden, so appending cannot fail.
        let _ = headers.append("content-type", b"text/plain");
        let _ = headers.append("content-length", GREETING.len().to_string().as_bytes());
        let response = OutgoingResponse::new(headers);
        let Ok(body) = response.body() else {
            return;
        };
        ResponseOutparam::set(response_out, Ok(response));
        if let Ok(stream) = body.write()
            && stream.blocking_write_and_flush(GREETING).is_err()
        {
            return;
        }
        let _ = OutgoingBody::finish(body, None);
    }
}
