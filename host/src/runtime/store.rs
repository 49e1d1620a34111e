//! The per-invocation store state: WASI context, resource table and memory limiter.

use wasmtime::ResourceLimiter;
use wasmtime::component::ResourceTable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use wasmtime_wasi_http::{WasiHttpCtx, WasiHttpCtxView, WasiHttpView};

use super::capabilities::CapabilityBridge;
use super::http::HttpHooks;
use super::output::{Capture, GuestOutput, LineSource, LogSink};

/// Instances, memories and tables one component instance may create. A wasip2 Rust component
/// uses a handful of each (the program, the WASI adapter and their shims).
const MAX_INSTANCES: usize = 100;
const MAX_MEMORIES: usize = 20;
const MAX_TABLES: usize = 100;
const MAX_TABLE_ELEMENTS: usize = 100_000;

/// The error a memory grow beyond the component's limit raises. It travels inside the
/// `wasmtime::Error` of the failed call and is matched by type to report `memory_limit`.
#[derive(Debug, thiserror::Error)]
#[error("memory limit exceeded: growing linear memory to {desired} bytes, limit is {limit} bytes")]
pub(crate) struct MemoryLimitExceeded {
    pub(crate) desired: usize,
    pub(crate) limit: u64,
}

/// Enforces the component's `max_memory` over all its linear memories, and caps the number of
/// instances, memories and tables. Growing past a limit traps (rather than letting `memory.grow`
/// return -1), so the failure is reported precisely instead of as the guest's own abort.
#[derive(Debug)]
pub(crate) struct Limiter {
    max_memory: u64,
    /// Bytes of linear memory the instance holds, summed over its memories.
    used: u64,
}

impl Limiter {
    /// Bytes of linear memory the store has grown to, over all its memories: its high-water
    /// mark, since memories never shrink.
    pub(crate) fn used(&self) -> u64 {
        self.used
    }
}

impl ResourceLimiter for Limiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let growth = u64::try_from(desired.saturating_sub(current)).unwrap_or(u64::MAX);
        let total = self.used.saturating_add(growth);
        if total > self.max_memory {
            return Err(MemoryLimitExceeded {
                desired,
                limit: self.max_memory,
            }
            .into());
        }
        self.used = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= MAX_TABLE_ELEMENTS)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }
}

/// Counts a store among its runtime's live ones (running, made ahead or waiting to be
/// dropped) until the store is dropped.
#[derive(Debug)]
pub(crate) struct LiveStore(Arc<AtomicUsize>);

impl LiveStore {
    pub(crate) fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(count))
    }
}

impl Drop for LiveStore {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Data of one invocation's `Store`. Nothing in it outlives the invocation.
pub(crate) struct StoreState {
    wasi: WasiCtx,
    pub(crate) table: ResourceTable,
    pub(crate) limiter: Limiter,
    stdout: Capture,
    stderr: Capture,
    /// Where lines go as they are written, when the invocation's output is streamed.
    log: Option<Arc<dyn LogSink>>,
    /// The invocation's trace context, carried on by capability calls.
    pub(crate) traceparent: Option<Arc<str>>,
    http: WasiHttpCtx,
    hooks: HttpHooks,
    /// Where the invocation's capability calls go.
    pub(crate) bridge: Arc<dyn CapabilityBridge>,
    /// When the invocation's wall-clock limit ends.
    pub(crate) deadline: Instant,
    _live: LiveStore,
}

impl std::fmt::Debug for StoreState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreState")
            .field("limiter", &self.limiter)
            .finish_non_exhaustive()
    }
}

impl StoreState {
    /// A WASI context that grants nothing: no preopened directories, no environment, no
    /// arguments, no network, no stdin. Clocks and random work; stdout and stderr are captured,
    /// and handed line by line to `log` when there is one.
    pub(crate) fn new(
        max_memory: u64,
        max_log_bytes: usize,
        bridge: Arc<dyn CapabilityBridge>,
        deadline: Instant,
        call: super::CallContext,
        live: LiveStore,
    ) -> Self {
        let super::CallContext { log, traceparent } = call;
        let stdout = Capture::with_sink(
            max_log_bytes,
            log.clone().map(|sink| (sink, LineSource::Stdout)),
        );
        let stderr = Capture::with_sink(
            max_log_bytes,
            log.clone().map(|sink| (sink, LineSource::Stderr)),
        );
        let wasi = WasiCtx::builder()
            .stdout(stdout.clone())
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            limiter: Limiter {
                max_memory,
                used: 0,
            },
            stdout,
            stderr,
            log,
            http: WasiHttpCtx::new(),
            hooks: HttpHooks {
                bridge: Arc::clone(&bridge),
                deadline,
                traceparent: traceparent.clone(),
            },
            traceparent,
            bridge,
            deadline,
            _live: live,
        }
    }

    /// Gives a store made ahead of its invocation what the invocation carries: where its
    /// capability calls go, its log sink and trace context, and its deadline. Returns the
    /// handle on its output.
    pub(crate) fn bind(
        &mut self,
        bridge: Arc<dyn CapabilityBridge>,
        call: super::CallContext,
        deadline: Instant,
    ) -> OutputHandle {
        let super::CallContext { log, traceparent } = call;
        self.stdout
            .set_sink(log.clone().map(|sink| (sink, LineSource::Stdout)));
        self.stderr
            .set_sink(log.clone().map(|sink| (sink, LineSource::Stderr)));
        self.log = log;
        self.hooks = HttpHooks {
            bridge: Arc::clone(&bridge),
            deadline,
            traceparent: traceparent.clone(),
        };
        self.traceparent = traceparent;
        self.bridge = bridge;
        self.deadline = deadline;
        self.output_handle()
    }

    /// How long a capability call made now may wait for its provider: see [`call_budget`].
    pub(crate) fn call_budget(&self) -> Duration {
        call_budget(self.deadline)
    }

    /// A `wasi:logging` line: appended to the captured stderr as `[level] context: message`,
    /// and handed whole, with its level, to the sink.
    pub(crate) fn log(&self, level: &'static str, context: &str, message: &str) {
        let line = if context.is_empty() {
            format!("[{level}] {message}\n")
        } else {
            format!("[{level}] {context}: {message}\n")
        };
        self.stderr.push_captured_only(line.as_bytes());
        if let Some(log) = &self.log {
            log.line(LineSource::Log { level, context }, message);
        }
    }

    /// A handle on the captured output that stays readable after the store is gone.
    pub(crate) fn output_handle(&self) -> OutputHandle {
        OutputHandle {
            stdout: self.stdout.clone(),
            stderr: self.stderr.clone(),
            log: self.log.clone(),
        }
    }
}

/// Reads an invocation's captured output, even after its store was dropped (timeout).
#[derive(Debug, Clone)]
pub(crate) struct OutputHandle {
    stdout: Capture,
    stderr: Capture,
    log: Option<Arc<dyn LogSink>>,
}

impl OutputHandle {
    /// The invocation ended: hands unfinished last lines to the sink and tells it.
    pub(crate) fn finish(&self) {
        if let Some(log) = &self.log {
            self.stdout.flush_line();
            self.stderr.flush_line();
            log.finish();
        }
    }

    pub(crate) fn collect(&self) -> GuestOutput {
        GuestOutput {
            stdout: self.stdout.text(),
            stderr: self.stderr.text(),
        }
    }
}

impl WasiHttpView for StoreState {
    fn http(&mut self) -> WasiHttpCtxView<'_> {
        WasiHttpCtxView {
            ctx: &mut self.http,
            table: &mut self.table,
            hooks: &mut self.hooks,
        }
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// The most a capability call may wait for its provider when the invocation must end by
/// `deadline`: the time left less a reserve (a tenth of it, at most [`CALL_RESERVE`]) so that the
/// guest still runs after a provider that never answers and sees the error itself, instead of the
/// invocation being cut by its own deadline at the same instant. At least a millisecond, so a call
/// made at the very end fails by timing out rather than by a zero wait.
pub(crate) fn call_budget(deadline: Instant) -> Duration {
    let left = deadline.saturating_duration_since(Instant::now());
    let reserve = (left / 10).min(CALL_RESERVE);
    (left - reserve).max(Duration::from_millis(1))
}

/// The largest share of an invocation's remaining time kept back from a capability call.
const CALL_RESERVE: Duration = Duration::from_millis(250);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_budget_leaves_the_guest_time_to_see_the_error() {
        let long = call_budget(Instant::now() + Duration::from_secs(3));
        assert!(long <= Duration::from_millis(2_750), "{long:?}");
        assert!(long > Duration::from_millis(2_500), "{long:?}");
        let short = call_budget(Instant::now() + Duration::from_millis(100));
        assert!(short <= Duration::from_millis(90), "{short:?}");
        assert_eq!(call_budget(Instant::now()), Duration::from_millis(1));
    }
}
