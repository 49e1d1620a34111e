//! An HTTP counter as a wasmCloud developer writes it: wasmCloud's component SDK, its HTTP
//! `Server` trait, and `wasi:keyvalue` store and atomics as that SDK binds them. Nothing here
//! knows of Trellis.

use wasmcloud_component::http;
use wasmcloud_component::wasi::keyvalue::{atomics, store};

struct Counter;

http::export!(Counter);

fn internal(e: impl std::fmt::Debug) -> http::ErrorCode {
    http::ErrorCode::InternalError(Some(format!("{e:?}")))
}

impl http::Server for Counter {
    /// Adds one to `counter` in the assigned bucket and answers `wasmcloud count N`.
    fn handle(
        _request: http::IncomingRequest,
    ) -> http::Result<http::Response<impl http::OutgoingBody>> {
        let bucket = store::open("").map_err(internal)?;
        let count = atomics::increment(&bucket, "counter", 1).map_err(internal)?;
        Ok(http::Response::new(format!("wasmcloud count {count}\n")))
    }
}
