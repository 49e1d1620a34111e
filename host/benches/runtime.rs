//! Runtime benchmarks: cold start, warm start, and the per-call overhead of `Runtime` against bare
//! wasmtime with the same `Config`. Run in release:
//!
//! ```text
//! RUST_LIB_BACKTRACE=0 cargo bench -p trellis-host --bench runtime
//! ```
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs,
    reason = "benchmark harness"
)]

use trellis_tests::components;

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use serde_json::json;
use trellis_host::{Limits, Manifest, Runtime, RuntimeConfig};
use wasmtime::component::{Component, ComponentExportIndex, InstancePre, Linker, ResourceTable};
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

fn limits() -> Limits {
    Limits {
        max_memory: 32 * 1024 * 1024,
        fuel: 10_000_000,
        timeout: Duration::from_secs(5),
        max_concurrency: 64,
    }
}

fn runtime(cache: &std::path::Path) -> Runtime {
    let mut config = RuntimeConfig::new();
    config.cache_dir(cache);
    Runtime::new(&config).unwrap()
}

/// The bare-wasmtime baseline's store data: WASI and a resource table, nothing else.
struct Bare {
    wasi: WasiCtx,
    table: ResourceTable,
}

impl WasiView for Bare {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn benches(c: &mut Criterion) {
    let guests = components::build();
    let bytes = guests.bytes("typed");
    let cache = tempfile::tempdir().unwrap();
    let runtime = runtime(cache.path());
    let manifest = Manifest::new("typed", "0.1.0", limits()).unwrap();
    let tokio = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    let mut group = c.benchmark_group("start");
    group.sample_size(10);
    let engine = runtime.engine().clone();
    group.bench_function("cold: Component::new from bytes", |b| {
        b.iter(|| Component::new(&engine, &bytes).unwrap());
    });
    // Fill the cache, then measure loads that hit it.
    runtime.load(&bytes, manifest.clone()).unwrap();
    group.bench_function("load from cached artifact", |b| {
        b.iter(|| {
            let loaded = runtime.load(&bytes, manifest.clone()).unwrap();
            assert!(loaded.load_outcome().cache_hit);
        });
    });
    group.finish();

    let typed = runtime.load(&bytes, manifest).unwrap();
    let mut group = c.benchmark_group("call");
    group.bench_function(
        "warm: Runtime invoke noop (fresh store + instantiate + call)",
        |b| {
            b.iter(|| tokio.block_on(typed.invoke("noop", json!([]))).unwrap());
        },
    );
    group.bench_function("Runtime invoke add(s32, s32)", |b| {
        b.iter(|| tokio.block_on(typed.invoke("add", json!([1, 2]))).unwrap());
    });

    // Bare wasmtime, same Config, same component, same per-call work (fresh store with WASI, fuel,
    // epoch deadline, instantiate, call), without the runtime's limiter, capture, JSON and
    // concurrency limit.
    let bare_engine = Engine::new(&runtime.wasmtime_config()).unwrap();
    let mut linker: Linker<Bare> = Linker::new(&bare_engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
    let component = Component::new(&bare_engine, &bytes).unwrap();
    let pre: InstancePre<Bare> = linker.instantiate_pre(&component).unwrap();
    let noop: ComponentExportIndex = component.get_export_index(None, "noop").unwrap();
    group.bench_function(
        "bare wasmtime noop (fresh store + instantiate + call)",
        |b| {
            b.iter(|| {
                tokio.block_on(async {
                    let mut store = Store::new(
                        &bare_engine,
                        Bare {
                            wasi: WasiCtx::builder().build(),
                            table: ResourceTable::new(),
                        },
                    );
                    store.set_fuel(10_000_000).unwrap();
                    store.set_epoch_deadline(1);
                    store.epoch_deadline_callback(|_| Ok(UpdateDeadline::Yield(1)));
                    let instance = pre.instantiate_async(&mut store).await.unwrap();
                    let func = instance.get_func(&mut store, noop).unwrap();
                    func.call_async(&mut store, &[], &mut []).await.unwrap();
                });
            });
        },
    );
    group.finish();
}

criterion_group!(runtime_benches, benches);
criterion_main!(runtime_benches);
