//! An HTTP counter as a Spin developer writes it: Spin's SDK, its `#[http_component]` and its
//! default key-value store. Nothing here knows of Trellis; the host serves Spin's
//! `fermyon:spin/key-value` interface from the bucket the component is assigned.

use spin_sdk::http::{IntoResponse, Request, Response};
use spin_sdk::http_component;
use spin_sdk::key_value::Store;

/// `GET /<label>`: counts in the store `label` (`default` when the path is `/`), answering
/// `spin count N`, or the store's error as a 500.
#[http_component]
fn handle(request: Request) -> anyhow::Result<impl IntoResponse> {
    let label = request.path().trim_start_matches('/');
    let store = match Store::open(if label.is_empty() { "default" } else { label }) {
        Ok(store) => store,
        Err(e) => return Ok(Response::new(500, format!("open: {e:?}\n"))),
    };
    let count = match store.get("count")? {
        Some(value) => String::from_utf8_lossy(&value).parse::<u64>()? + 1,
        None => 1,
    };
    store.set("count", count.to_string().as_bytes())?;
    let keys = store.get_keys()?.len();
    Ok(Response::new(200, format!("spin count {count} keys {keys}\n")))
}
