//! Integration tests of the runtime, against real guest components built for wasm32-wasip2
//! (see `trellis_tests::components` for how they are built and found).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "tests fail loudly on unexpected errors"
)]

use trellis_tests::components;

mod cache;
mod conversion;
mod crashes;
mod isolation;
mod loading;

use std::time::Duration;

use trellis_host::{Limits, LoadedComponent, Manifest, Runtime, RuntimeConfig};

/// Limits generous enough for every well-behaved guest.
pub fn limits() -> Limits {
    Limits {
        max_memory: 32 * 1024 * 1024,
        fuel: 100_000_000,
        timeout: Duration::from_secs(10),
        max_concurrency: 16,
    }
}

/// [`limits`] with fuel enough that only the wall clock, after `timeout`, stops a looping guest.
pub fn timed(timeout: Duration) -> Limits {
    Limits {
        fuel: 1_000_000_000_000,
        timeout,
        ..limits()
    }
}

/// A runtime with a small pool (tests run in parallel, each with its own runtime), a fuel ceiling
/// high enough for the timeout tests, and a compiled artifact cache shared across test runs.
pub fn runtime() -> Runtime {
    let mut config = config(32);
    config.max_fuel(1_000_000_000_000);
    Runtime::new(&config).unwrap()
}

/// A configuration with a pool of `slots` and the compiled artifact cache shared across test
/// runs, for a test to adjust.
pub fn config(slots: u32) -> RuntimeConfig {
    let guests = components::build();
    let mut config = RuntimeConfig::new();
    config
        .pooling_instances(slots)
        .cache_dir(guests.target_dir().join("artifact-cache"));
    config
}

/// Loads the guest `name` with `limits`.
pub fn load(runtime: &Runtime, name: &str, limits: Limits) -> LoadedComponent {
    let bytes = components::build().bytes(name);
    let manifest = Manifest::new(name.replace('_', "-"), "0.1.0", limits).unwrap();
    runtime.load(&bytes, manifest).unwrap()
}

/// Proves the runtime still serves: the typed component adds.
pub async fn assert_still_serving(runtime: &Runtime) {
    let typed = load(runtime, "typed", limits());
    let sum = typed
        .invoke("add", serde_json::json!([2, 3]))
        .await
        .unwrap();
    assert_eq!(sum, 5);
}
