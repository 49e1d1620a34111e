//! Host-wide settings of a [`Runtime`](super::Runtime).

use std::path::{Path, PathBuf};
use std::time::Duration;

/// Settings of a [`Runtime`](super::Runtime): the host's ceilings on component limits, the epoch
/// tick, output capture sizes, the pooling allocator and the compiled-artifact cache.
///
/// Every setter documents its default. Values are checked by
/// [`Runtime::new`](super::Runtime::new).
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub(crate) max_memory: u64,
    pub(crate) max_fuel: u64,
    pub(crate) max_timeout: Duration,
    pub(crate) max_concurrency: u32,
    pub(crate) epoch_tick: Duration,
    pub(crate) max_result_bytes: usize,
    pub(crate) max_log_bytes: usize,
    pub(crate) max_wasm_stack: usize,
    pub(crate) pooling: bool,
    pub(crate) pooling_instances: u32,
    pub(crate) spare_instances: bool,
    pub(crate) spare_idle: Duration,
    pub(crate) cache_dir: Option<PathBuf>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            max_memory: 1024 * 1024 * 1024,
            max_fuel: 10_000_000_000,
            max_timeout: Duration::from_secs(60),
            max_concurrency: 1024,
            epoch_tick: Duration::from_millis(10),
            max_result_bytes: 1024 * 1024,
            max_log_bytes: 64 * 1024,
            max_wasm_stack: 512 * 1024,
            pooling: true,
            pooling_instances: 1000,
            spare_instances: true,
            spare_idle: Duration::from_secs(30),
            cache_dir: None,
        }
    }
}

impl RuntimeConfig {
    /// A configuration with every default.
    pub fn new() -> Self {
        Self::default()
    }

    /// Largest `limits.max_memory` a component may ask for, in bytes. Components asking for more
    /// are refused at load. Also the size of each linear-memory slot of the pooling allocator.
    ///
    /// Default: 1 GiB.
    pub fn max_memory(&mut self, bytes: u64) -> &mut Self {
        self.max_memory = bytes;
        self
    }

    /// Largest `limits.fuel` a component may ask for.
    ///
    /// Default: 10,000,000,000.
    pub fn max_fuel(&mut self, fuel: u64) -> &mut Self {
        self.max_fuel = fuel;
        self
    }

    /// Largest `limits.timeout` a component may ask for.
    ///
    /// Default: 60 s.
    pub fn max_timeout(&mut self, timeout: Duration) -> &mut Self {
        self.max_timeout = timeout;
        self
    }

    /// Largest `limits.max_concurrency` a component may ask for.
    ///
    /// Default: 1024.
    pub fn max_concurrency(&mut self, n: u32) -> &mut Self {
        self.max_concurrency = n;
        self
    }

    /// Period of the engine's single epoch ticker thread. Timeouts are checked on each tick, so
    /// an invocation overruns its timeout by at most about one tick.
    ///
    /// Default: 10 ms. Accepted: 1 ms to 1 s.
    pub fn epoch_tick(&mut self, tick: Duration) -> &mut Self {
        self.epoch_tick = tick;
        self
    }

    /// Largest result an invocation may return, measured as the size of its JSON encoding; a
    /// larger one fails the invocation with `output_too_large`.
    ///
    /// Default: 1 MiB.
    pub fn max_result_bytes(&mut self, bytes: usize) -> &mut Self {
        self.max_result_bytes = bytes;
        self
    }

    /// Bytes of stdout, and separately of stderr, kept per invocation. Output beyond is dropped
    /// (the guest's writes still succeed) and the capture ends with a truncation marker.
    ///
    /// Default: 64 KiB.
    pub fn max_log_bytes(&mut self, bytes: usize) -> &mut Self {
        self.max_log_bytes = bytes;
        self
    }

    /// Maximum wasm stack of an invocation; deeper recursion fails with `stack_overflow`.
    ///
    /// Default: 512 KiB.
    pub fn max_wasm_stack(&mut self, bytes: usize) -> &mut Self {
        self.max_wasm_stack = bytes;
        self
    }

    /// Whether to use the pooling instance allocator (pre-reserved slots: fast instantiation). If
    /// the pooling engine cannot be created (for instance when virtual memory reservation fails),
    /// the runtime logs a warning and falls back to on-demand allocation.
    ///
    /// Default: `true`.
    pub fn pooling(&mut self, enable: bool) -> &mut Self {
        self.pooling = enable;
        self
    }

    /// Component instances the pooling allocator can hold at once, i.e. invocations in flight
    /// across all components. Each slot reserves (virtual, not resident) memory for
    /// [`max_memory`](Self::max_memory).
    ///
    /// Default: 1000.
    pub fn pooling_instances(&mut self, n: u32) -> &mut Self {
        self.pooling_instances = n;
        self
    }

    /// Whether each loaded component keeps one fresh instance made ahead of its next
    /// invocation (its spare): after an invocation, in the background, its store is dropped and
    /// the next instance is made, so that the next invocation calls its export at once instead
    /// of waiting for instantiation. A spare has never run an export and serves one invocation
    /// only; it is made only while fewer than half of the
    /// [`pooling_instances`](Self::pooling_instances) are in use, so that spares never take a
    /// slot an invocation needs.
    ///
    /// Default: `true`.
    pub fn spare_instances(&mut self, enable: bool) -> &mut Self {
        self.spare_instances = enable;
        self
    }

    /// How long a spare instance is kept while no invocation takes one: an idle component gives
    /// its spare's memory back after this, and makes one again after its next invocation.
    /// `Duration::MAX` keeps it for as long as the component is loaded.
    ///
    /// Default: 30 s.
    pub fn spare_idle(&mut self, idle: Duration) -> &mut Self {
        self.spare_idle = idle;
        self
    }

    /// Directory of the compiled-artifact cache. With a cache, a component whose digest was
    /// compiled before (by this or an earlier process with the same engine) is loaded without
    /// compiling. The directory must be writable by the host only (see the crate docs).
    ///
    /// Default: none (every load compiles).
    pub fn cache_dir(&mut self, dir: impl AsRef<Path>) -> &mut Self {
        self.cache_dir = Some(dir.as_ref().to_path_buf());
        self
    }
}
