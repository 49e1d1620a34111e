//! The [`Runtime`]: one wasmtime engine, its epoch ticker, the WASI linker and the artifact cache.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use wasmtime::component::{Component, Linker};
use wasmtime::{
    Config, Enabled, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig,
    Strategy,
};

use super::cache::ArtifactCache;
use super::component::LoadedComponent;
use super::config::RuntimeConfig;
use super::digest::Digest;
use super::error::{LoadError, RuntimeError};
use super::store::StoreState;
use super::ticker::EpochTicker;
use trellis_schemas::manifest::{
    CAPABILITY_PACKAGES as CAPABILITIES, Manifest, WASI_BASICS, format_bytes, strip_version,
};

/// How the engine allocates instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum AllocationStrategy {
    /// Pre-reserved slots (fast instantiation).
    Pooling,
    /// Memory is mapped for each instance (the fallback when the pool cannot be reserved).
    OnDemand,
}

/// How a component was obtained by [`Runtime::load`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOutcome {
    /// The compiled artifact came from the on-disk cache: nothing was compiled.
    pub cache_hit: bool,
    /// Digest of the component's bytes.
    pub digest: Digest,
}

/// The WebAssembly runtime of a host: one engine shared by every component it loads.
///
/// Cloning is cheap and shares the engine. The epoch ticker thread stops when the last clone
/// (and the last component loaded from it) is dropped.
///
/// See the [crate docs](crate) for an example.
#[derive(Debug, Clone)]
pub struct Runtime {
    inner: Arc<RuntimeInner>,
}

pub(crate) struct RuntimeInner {
    pub(crate) engine: Engine,
    pub(crate) linker: Linker<StoreState>,
    pub(crate) config: RuntimeConfig,
    cache: Option<ArtifactCache>,
    allocation: AllocationStrategy,
    compilations: AtomicU64,
    /// Stores alive now: invocations running, spare instances, stores waiting to be dropped.
    pub(crate) live_stores: Arc<AtomicUsize>,
    /// Ticks while guest code may run (see [`EpochTicker::busy`]).
    pub(crate) ticker: EpochTicker,
}

impl std::fmt::Debug for RuntimeInner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeInner")
            .field("config", &self.config)
            .field("allocation", &self.allocation)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

impl Runtime {
    /// Creates the engine (pooling allocator, falling back to on-demand allocation with a
    /// warning when the pool cannot be reserved), starts its epoch ticker thread, links WASI and
    /// opens the artifact cache.
    ///
    /// # Errors
    ///
    /// [`RuntimeError`] when a setting is out of range, the engine rejects the configuration,
    /// the cache directory cannot be created or the ticker thread cannot start.
    pub fn new(config: &RuntimeConfig) -> Result<Self, RuntimeError> {
        validate(config)?;
        let (engine, allocation) = if config.pooling {
            match Engine::new(&engine_config(config, true)) {
                Ok(engine) => {
                    tracing::debug!(
                        reset_in_place = pagemap_scan(),
                        "pooling allocator; memory slots reset in place when PAGEMAP_SCAN works"
                    );
                    (engine, AllocationStrategy::Pooling)
                }
                Err(err) => {
                    tracing::warn!(
                        error = %err,
                        "cannot create the pooling allocator; falling back to on-demand allocation"
                    );
                    let engine =
                        Engine::new(&engine_config(config, false)).map_err(RuntimeError::Engine)?;
                    (engine, AllocationStrategy::OnDemand)
                }
            }
        } else {
            let engine =
                Engine::new(&engine_config(config, false)).map_err(RuntimeError::Engine)?;
            (engine, AllocationStrategy::OnDemand)
        };
        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker).map_err(RuntimeError::Engine)?;
        wasmtime_wasi_http::p2::add_only_http_to_linker_async(&mut linker)
            .map_err(RuntimeError::Engine)?;
        super::bindings::add_to_linker(&mut linker).map_err(RuntimeError::Engine)?;
        let cache =
            match &config.cache_dir {
                Some(dir) => Some(ArtifactCache::open(dir, &engine).map_err(|source| {
                    RuntimeError::Cache {
                        dir: dir.clone(),
                        source,
                    }
                })?),
                None => None,
            };
        let ticker =
            EpochTicker::start(&engine, config.epoch_tick).map_err(RuntimeError::Ticker)?;
        Ok(Self {
            inner: Arc::new(RuntimeInner {
                engine,
                linker,
                config: config.clone(),
                cache,
                allocation,
                compilations: AtomicU64::new(0),
                live_stores: Arc::default(),
                ticker,
            }),
        })
    }

    /// The engine, for embedders that need it (e.g. to precompile).
    pub fn engine(&self) -> &Engine {
        &self.inner.engine
    }

    /// The allocation strategy actually in use.
    pub fn allocation_strategy(&self) -> AllocationStrategy {
        self.inner.allocation
    }

    /// How many components this runtime has compiled (cache hits do not count).
    pub fn compilations(&self) -> u64 {
        self.inner.compilations.load(Ordering::Relaxed)
    }

    /// The settings this runtime was created with.
    pub fn config(&self) -> &RuntimeConfig {
        &self.inner.config
    }

    /// Loads a component: checks the manifest against the host's ceilings, compiles the bytes
    /// (or maps the compiled artifact from the cache), checks its imports against the manifest,
    /// links WASI and pre-instantiates it.
    ///
    /// Compiling is CPU-bound (tens of milliseconds for a small component): in an async context,
    /// call this from `tokio::task::spawn_blocking`.
    ///
    /// # Errors
    ///
    /// [`LoadError`]: limits above the host's ceilings, invalid wasm, an undeclared import, or a
    /// link failure.
    pub fn load(&self, bytes: &[u8], manifest: Manifest) -> Result<LoadedComponent, LoadError> {
        self.load_inner(bytes, manifest, None)
    }

    /// Like [`load`](Self::load), and first checks that the bytes have the `expected` digest.
    ///
    /// # Errors
    ///
    /// [`LoadError::DigestMismatch`] when they do not, and everything [`load`](Self::load) returns.
    pub fn load_verified(
        &self,
        bytes: &[u8],
        manifest: Manifest,
        expected: &Digest,
    ) -> Result<LoadedComponent, LoadError> {
        self.load_inner(bytes, manifest, Some(expected))
    }

    fn load_inner(
        &self,
        bytes: &[u8],
        manifest: Manifest,
        expected: Option<&Digest>,
    ) -> Result<LoadedComponent, LoadError> {
        self.check_ceilings(&manifest)?;
        let digest = Digest::of(bytes);
        if let Some(expected) = expected
            && *expected != digest
        {
            return Err(LoadError::DigestMismatch {
                expected: *expected,
                actual: digest,
            });
        }
        let (component, cache_hit) = self.compile(bytes, &digest)?;
        self.link(component, manifest, cache_hit, digest)
    }

    /// Loads a component compiled by another runtime of this same build and configuration (a
    /// micro-VM's host compiled it), compiling `bytes` only when the artifact does not fit this
    /// engine (another CPU, another build). Returns whether the artifact was used.
    ///
    /// # Errors
    ///
    /// As [`load`](Self::load).
    pub(crate) fn load_precompiled(
        &self,
        compiled: &[u8],
        bytes: &[u8],
        manifest: Manifest,
    ) -> Result<(LoadedComponent, Result<(), String>), LoadError> {
        self.check_ceilings(&manifest)?;
        let digest = Digest::of(bytes);
        match deserialize_trusted(&self.inner.engine, compiled) {
            Ok(component) => Ok((self.link(component, manifest, true, digest)?, Ok(()))),
            Err(why) => {
                let (component, cache_hit) = self.compile(bytes, &digest)?;
                let why = Err(error_chain(&why));
                Ok((self.link(component, manifest, cache_hit, digest)?, why))
            }
        }
    }

    /// Compiles `bytes` for another machine of this build's target that has at least the
    /// x86-64-v2 instruction set (a micro-VM's emulated CPU lacks some of this host's
    /// features), ready for [`load_precompiled`](Self::load_precompiled) there.
    ///
    /// # Errors
    ///
    /// For invalid wasm, or a target this build cannot compile for.
    /// The last [`PORTABLE_KEPT`] artifacts are kept in memory by digest: a component started
    /// again (a restart, another instance, a rollout) is not compiled again. With a cache
    /// directory they are also kept on disk beside the host's own, in the directory of the
    /// portable engine's key, so that a restarted host does not compile them again either.
    pub(crate) fn precompile_portable(&self, bytes: &[u8]) -> Result<bytes::Bytes, String> {
        use std::collections::VecDeque;
        use std::sync::{Mutex, OnceLock, PoisonError};
        static PORTABLE: OnceLock<Result<Portable, String>> = OnceLock::new();
        static KEPT: Mutex<VecDeque<(Digest, bytes::Bytes)>> = Mutex::new(VecDeque::new());
        let digest = Digest::of(bytes);
        let kept = |kept: &VecDeque<(Digest, bytes::Bytes)>| {
            kept.iter()
                .find(|(d, _)| *d == digest)
                .map(|(_, a)| a.clone())
        };
        if let Some(artifact) = kept(&KEPT.lock().unwrap_or_else(PoisonError::into_inner)) {
            return Ok(artifact);
        }
        let portable = PORTABLE
            .get_or_init(|| Portable::new(&self.inner.config))
            .as_ref()
            .map_err(Clone::clone)?;
        let artifact = match portable.cache.as_ref().and_then(|c| c.get_bytes(&digest)) {
            Some(artifact) => bytes::Bytes::from(artifact),
            None => {
                let artifact = bytes::Bytes::from(
                    portable
                        .engine
                        .precompile_component(bytes)
                        .map_err(|e| error_chain(&e))?,
                );
                if let Some(cache) = &portable.cache
                    && let Err(error) = cache.put_bytes(&digest, &artifact)
                {
                    tracing::warn!(
                        dir = %cache.dir().display(),
                        %error,
                        "cannot write the micro-VM artifact to the cache"
                    );
                }
                artifact
            }
        };
        let mut kept = KEPT.lock().unwrap_or_else(PoisonError::into_inner);
        if kept.len() >= PORTABLE_KEPT {
            kept.pop_front();
        }
        kept.push_back((digest, artifact.clone()));
        Ok(artifact)
    }

    /// Links a compiled component's imports and pre-instantiates it.
    fn link(
        &self,
        component: Component,
        manifest: Manifest,
        cache_hit: bool,
        digest: Digest,
    ) -> Result<LoadedComponent, LoadError> {
        crate::metrics::HOST
            .loads
            .get_or_create(&[("cache", if cache_hit { "hit" } else { "miss" })])
            .inc();

        let engine = &self.inner.engine;
        let mut linker: Option<Linker<StoreState>> = None;
        for (import, item) in component.component_type().imports(engine) {
            if WASI_BASICS.iter().any(|prefix| import.starts_with(prefix)) {
                continue;
            }
            if !manifest.capabilities.declares(import) {
                return Err(LoadError::UndeclaredImport {
                    import: strip_version(import).to_string(),
                });
            }
            if CAPABILITIES.iter().any(|prefix| import.starts_with(prefix)) {
                // Linked by the runtime; calls go through the capability bridge.
                continue;
            }
            // An interface of the component's own: each of its functions is a linked call,
            // which the bridge routes to the component a link names (or refuses).
            let own = linker.get_or_insert_with(|| self.inner.linker.clone());
            super::links::define(own, engine, import, &item.ty).map_err(|err| LoadError::Link {
                message: error_chain(&err),
            })?;
        }
        let linker = linker.as_ref().unwrap_or(&self.inner.linker);
        let pre = linker
            .instantiate_pre(&component)
            .map_err(|err| LoadError::Link {
                message: error_chain(&err),
            })?;
        Ok(LoadedComponent::new(
            Arc::clone(&self.inner),
            manifest,
            &component,
            pre,
            LoadOutcome { cache_hit, digest },
        ))
    }

    fn compile(&self, bytes: &[u8], digest: &Digest) -> Result<(Component, bool), LoadError> {
        let engine = &self.inner.engine;
        if let Some(cache) = &self.inner.cache
            && let Some(component) = cache.get(engine, digest)
        {
            return Ok((component, true));
        }
        self.inner.compilations.fetch_add(1, Ordering::Relaxed);
        let component =
            Component::from_binary(engine, bytes).map_err(|err| LoadError::InvalidComponent {
                digest: *digest,
                message: error_chain(&err),
            })?;
        if let Some(cache) = &self.inner.cache
            && let Err(err) = cache.put(digest, &component)
        {
            tracing::warn!(
                dir = %cache.dir().display(),
                %digest,
                error = %err,
                "cannot write the compiled artifact to the cache"
            );
        }
        Ok((component, false))
    }

    fn check_ceilings(&self, manifest: &Manifest) -> Result<(), LoadError> {
        let config = &self.inner.config;
        let limits = &manifest.limits;
        if limits.max_memory > config.max_memory {
            return Err(LoadError::ExceedsHostLimit {
                field: "limits.max_memory",
                requested: format_bytes(limits.max_memory),
                ceiling: format_bytes(config.max_memory),
            });
        }
        if limits.fuel > config.max_fuel {
            return Err(LoadError::ExceedsHostLimit {
                field: "limits.fuel",
                requested: limits.fuel.to_string(),
                ceiling: config.max_fuel.to_string(),
            });
        }
        if limits.timeout > config.max_timeout {
            return Err(LoadError::ExceedsHostLimit {
                field: "limits.timeout",
                requested: format!("{:?}", limits.timeout),
                ceiling: format!("{:?}", config.max_timeout),
            });
        }
        if limits.max_concurrency > config.max_concurrency {
            return Err(LoadError::ExceedsHostLimit {
                field: "limits.max_concurrency",
                requested: limits.max_concurrency.to_string(),
                ceiling: config.max_concurrency.to_string(),
            });
        }
        Ok(())
    }
}

/// All messages of an error's chain, joined.
pub(crate) fn error_chain(err: &wasmtime::Error) -> String {
    let messages: Vec<String> = err.chain().map(ToString::to_string).collect();
    messages.join(": ")
}

fn validate(config: &RuntimeConfig) -> Result<(), RuntimeError> {
    let tick = config.epoch_tick;
    if !(Duration::from_millis(1)..=Duration::from_secs(1)).contains(&tick) {
        return Err(RuntimeError::Config {
            field: "epoch_tick",
            problem: format!("{tick:?} is outside 1ms..=1s"),
        });
    }
    if !(64 * 1024..=4 * 1024 * 1024 * 1024).contains(&config.max_memory) {
        return Err(RuntimeError::Config {
            field: "max_memory",
            problem: format!("{} is outside 64KiB..=4GiB", config.max_memory),
        });
    }
    if config.pooling && config.pooling_instances == 0 {
        return Err(RuntimeError::Config {
            field: "pooling_instances",
            problem: "must be at least 1".to_string(),
        });
    }
    if config.max_wasm_stack < 64 * 1024 {
        return Err(RuntimeError::Config {
            field: "max_wasm_stack",
            problem: format!("{} is below 64KiB", config.max_wasm_stack),
        });
    }
    Ok(())
}

/// Slots the pooling allocator decommits at once, at most (see `engine_config`).
const DECOMMIT_BATCH: usize = 32;

/// The decommit batch for a pool of `slots`: [`DECOMMIT_BATCH`], but never more than a
/// sixteenth of the pool, and 1 (no batching) for a pool of sixteen slots or fewer.
///
/// A slot waiting in the batch is neither live nor free. wasmtime flushes the batch when an
/// allocation finds the pool full, but it takes the batch out of its lock before it decommits:
/// an allocation on another thread during that flush finds the pool full and the batch empty,
/// and fails although slots are about to come back. With a batch larger than the pool every
/// allocation goes through that path; bounded, the batch holds too few slots to make a pool
/// look full that is not nearly so.
pub(crate) fn decommit_batch(slots: u32) -> usize {
    let sixteenth = usize::try_from(slots / 16).unwrap_or(usize::MAX);
    sixteenth.clamp(1, DECOMMIT_BATCH)
}

/// Bytes of a linear-memory slot reset in place rather than returned to the kernel (see
/// `engine_config`): the resident memory a warm slot may keep.
const KEEP_RESIDENT_MEMORY: usize = 1 << 20;

/// Bytes of a table slot reset in place rather than returned to the kernel.
const KEEP_RESIDENT_TABLE: usize = 64 << 10;

/// Whether this kernel has the PAGEMAP_SCAN ioctl (probed once per process).
pub(crate) fn pagemap_scan() -> bool {
    static AVAILABLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *AVAILABLE.get_or_init(PoolingAllocationConfig::is_pagemap_scan_available)
}

/// How many artifacts compiled for micro-VMs a host keeps in memory.
const PORTABLE_KEPT: usize = 16;

/// The engine that compiles for micro-VMs, and where its artifacts are kept on disk.
struct Portable {
    engine: Engine,
    cache: Option<ArtifactCache>,
}

impl Portable {
    fn new(config: &RuntimeConfig) -> Result<Self, String> {
        let engine = portable_engine(config)?;
        let cache = config
            .cache_dir
            .as_ref()
            .and_then(|dir| match ArtifactCache::open(dir, &engine) {
                Ok(cache) => Some(cache),
                Err(error) => {
                    tracing::warn!(dir = %dir.display(), %error, "micro-VM artifacts are not cached on disk");
                    None
                }
            });
        Ok(Self { engine, cache })
    }
}

/// An engine that compiles for any x86-64-v2 CPU rather than for this one.
#[expect(
    unsafe_code,
    reason = "enabling instruction-set flags is unsafe; see the safety comment"
)]
fn portable_engine(config: &RuntimeConfig) -> Result<Engine, String> {
    let mut c = engine_config(config, false);
    // An explicit target turns off the detection of this CPU's features.
    let env = if cfg!(target_env = "musl") {
        "musl"
    } else {
        "gnu"
    };
    let triple = format!(
        "{}-unknown-{}-{env}",
        std::env::consts::ARCH,
        std::env::consts::OS
    );
    c.target(&triple).map_err(|e| error_chain(&e))?;
    if cfg!(target_arch = "x86_64") {
        for flag in [
            "has_sse3",
            "has_ssse3",
            "has_sse41",
            "has_sse42",
            "has_popcnt",
        ] {
            // SAFETY: code compiled here never runs on this engine; the engine that maps it
            // checks that its CPU has every flag enabled here and refuses the artifact if not.
            unsafe {
                c.cranelift_flag_enable(flag);
            }
        }
    }
    Engine::new(&c).map_err(|e| error_chain(&e))
}

/// Maps an artifact another engine of this build serialised.
#[expect(
    unsafe_code,
    reason = "deserialising a compiled artifact is unsafe by nature; see the safety comment"
)]
fn deserialize_trusted(engine: &Engine, compiled: &[u8]) -> wasmtime::Result<Component> {
    // SAFETY: only a micro-VM's agent calls this, with bytes its host produced with
    // `Component::serialize` from the same binary; the host is what the guest trusts (it is the
    // guest that is not trusted). wasmtime still checks the header, the engine's configuration
    // and the CPU's features, and refuses a mismatched artifact (then the agent compiles).
    unsafe { Component::deserialize(engine, compiled) }
}

/// The engine configuration shared by every component. Public to the crate so the benchmarks'
/// bare-wasmtime baseline can use exactly the same settings.
pub(crate) fn engine_config(config: &RuntimeConfig, pooling: bool) -> Config {
    let mut c = Config::new();
    c.strategy(Strategy::Cranelift)
        .cranelift_opt_level(OptLevel::Speed)
        .wasm_component_model(true)
        .consume_fuel(true)
        .epoch_interruption(true)
        .max_wasm_stack(config.max_wasm_stack)
        .parallel_compilation(true);
    if pooling {
        let n = config.pooling_instances;
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(n)
            .total_core_instances(n.saturating_mul(8))
            .total_memories(n)
            .total_tables(n.saturating_mul(4))
            .total_stacks(n)
            .max_memory_size(usize::try_from(config.max_memory).unwrap_or(usize::MAX))
            // Returning a slot's memory to the kernel one instance at a time costs a syscall and
            // a TLB shootdown across threads per invocation; batching them divides that cost.
            .decommit_batch_size(decommit_batch(n));
        // Better still, most invocations return nothing to the kernel: with the PAGEMAP_SCAN
        // ioctl (Linux 6.7+) the allocator finds the pages a guest dirtied and copies them back
        // from the image or zeroes them in place, up to these bounds per slot; they stay
        // resident, so the next invocation in the slot takes no page faults and no madvise
        // shoots down TLBs on the other cores (40 % of the host's CPU per call on the calls
        // benchmark without it). Without the ioctl, keeping memory resident would mean zeroing
        // the lowest megabyte on every call, dearer than the faults: the slots decommit as before.
        if pagemap_scan() {
            pool.pagemap_scan(Enabled::Yes)
                .linear_memory_keep_resident(KEEP_RESIDENT_MEMORY)
                .table_keep_resident(KEEP_RESIDENT_TABLE);
        }
        c.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    c
}

impl Runtime {
    /// A wasmtime [`Config`] identical to the one this runtime's engine uses (for baselines and
    /// tooling that must produce compatible artifacts).
    pub fn wasmtime_config(&self) -> Config {
        engine_config(
            &self.inner.config,
            self.inner.allocation == AllocationStrategy::Pooling,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::{DECOMMIT_BATCH, decommit_batch};

    #[test]
    fn the_decommit_batch_is_a_small_share_of_the_pool() {
        assert_eq!(decommit_batch(0), 1);
        assert_eq!(decommit_batch(8), 1);
        assert_eq!(decommit_batch(31), 1);
        assert_eq!(decommit_batch(64), 4);
        assert_eq!(decommit_batch(1000), DECOMMIT_BATCH);
        assert_eq!(decommit_batch(u32::MAX), DECOMMIT_BATCH);
    }
}
