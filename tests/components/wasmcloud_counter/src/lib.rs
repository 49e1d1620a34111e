//! An HTTP counter as a wasmCloud developer writes it: wasmCloud's component SDK, its HTTP
//! `Server` trait, `wasi:keyvalue` store and atomics as that SDK binds them, and the link name
//! chosen with `wasmcloud:bus/lattice`. Nothing here knows of Trellis.

use wasmcloud_component::http;
use wasmcloud_component::wasi::keyvalue::{atomics, store};
use wasmcloud_component::wasmcloud::bus::lattice::{CallTargetInterface, set_link_name};

struct Counter;

http::export!(Counter);

fn internal(e: impl std::fmt::Debug) -> http::ErrorCode {
    http::ErrorCode::InternalError(Some(format!("{e:?}")))
}

impl http::Server for Counter {
    /// `GET /<link name>` (`default` for `/`): selects that link for the key-value interfaces,
    /// adds one to `counter` in the bucket and answers `wasmcloud count N`; a link name the host
    /// refuses is answered 500 with its message.
    fn handle(
        request: http::IncomingRequest,
    ) -> http::Result<http::Response<impl http::OutgoingBody>> {
        let name = request.uri().path().trim_start_matches('/');
        let name = if name.is_empty() { "default" } else { name };
        let targets = ["store", "atomics"]
            .map(|i| CallTargetInterface::new("wasi", "keyvalue", i))
            .into_iter()
            .collect::<Vec<_>>();
        if let Err(e) = set_link_name(name, targets) {
            let mut response = http::Response::new(format!("link: {e}\n"));
            *response.status_mut() = http::StatusCode::INTERNAL_SERVER_ERROR;
            return Ok(response);
        }
        let bucket = store::open("").map_err(internal)?;
        let count = atomics::increment(&bucket, "counter", 1).map_err(internal)?;
        Ok(http::Response::new(format!("wasmcloud count {count}\n")))
    }
}
