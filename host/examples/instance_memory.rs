//! Measures the resident memory of idle component instances, beyond their linear memory.
//!
//! Instantiates the `typed` test component N times with the runtime's engine configuration (the
//! pooling allocator included), keeps every instance alive and idle, and compares the process's
//! resident set (`/proc/self/statm`) before and after, minus the linear memory the instances have
//! actually touched. Run in release:
//!
//! ```text
//! cargo run --release -p trellis-host --example instance_memory -- 500
//! ```
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "a measuring program: any failure should stop it loudly"
)]

use trellis_tests::components;

use trellis_host::{Runtime, RuntimeConfig};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{ResourceLimiter, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    memory: MemorySize,
}

/// Records the linear memory size of the instance (every memory's initial size and growth).
struct MemorySize(u64);

impl ResourceLimiter for MemorySize {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        self.0 += (desired - current) as u64;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        _desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(true)
    }
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

fn main() {
    let n: usize = std::env::args()
        .nth(1)
        .map_or(500, |arg| arg.parse().expect("N must be a number"));
    let bytes = components::build().bytes("typed");
    let mut config = RuntimeConfig::new();
    config.pooling_instances(u32::try_from(n).unwrap() + 10);
    let runtime = Runtime::new(&config).unwrap();
    let engine = runtime.engine().clone();
    let mut linker: Linker<State> = Linker::new(&engine);
    wasmtime_wasi::p2::add_to_linker_sync(&mut linker).unwrap();
    let component = Component::new(&engine, &bytes).unwrap();
    let pre = linker.instantiate_pre(&component).unwrap();

    let new_store = || {
        let mut store = Store::new(
            &engine,
            State {
                wasi: WasiCtx::builder().build(),
                table: ResourceTable::new(),
                memory: MemorySize(0),
            },
        );
        store.limiter(|state| &mut state.memory);
        store.set_fuel(u64::MAX).unwrap();
        store.set_epoch_deadline(u64::MAX / 2);
        store
    };
    // Warm up once so lazily initialised process state is not counted.
    {
        let mut store = new_store();
        pre.instantiate(&mut store).unwrap();
    }

    let before = resident_bytes();
    let mut live = Vec::with_capacity(n);
    for _ in 0..n {
        let mut store = new_store();
        let instance = pre.instantiate(&mut store).unwrap();
        live.push((store, instance));
    }
    let after = resident_bytes();

    // Linear memory the instances hold (its size, not what is resident: untouched pages of it
    // cost nothing, and the initial image is mapped copy-on-write).
    let linear: u64 = live.iter().map(|(store, _)| store.data().memory.0).sum();
    let delta = after.saturating_sub(before);
    let per_instance = delta / n as u64;
    println!("instances: {n}");
    println!(
        "resident before: {} KiB, after: {} KiB",
        before / 1024,
        after / 1024
    );
    println!(
        "resident per idle instance: {:.1} KiB (linear memory size per instance: {:.1} KiB)",
        per_instance as f64 / 1024.0,
        linear as f64 / n as f64 / 1024.0
    );
    drop(live);
}
