//! Trellis host: the WebAssembly runtime and the Node Agent.
//!
//! The Node Agent ([`agent`]) joins a lattice over NATS, announces the host, sends heartbeats with
//! its inventory and runs instances; it is what the `trellis-host` binary runs.
//!
//! The runtime is a plain library: build a [`Runtime`], load a component with the limits of its
//! `Component.toml`, call an export with JSON arguments.
//!
//! ```
//! use trellis_host::{Manifest, Runtime, RuntimeConfig};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! // A tiny component, written in the component text format for the example.
//! let wasm = wat::parse_str(r#"
//!     (component
//!       (core module $m
//!         (func (export "add") (param i32 i32) (result i32)
//!           local.get 0 local.get 1 i32.add))
//!       (core instance $i (instantiate $m))
//!       (func (export "add") (param "a" s32) (param "b" s32) (result s32)
//!         (canon lift (core func $i "add"))))
//! "#)?;
//!
//! let manifest: Manifest = r#"
//!     [component]
//!     name = "adder"
//!     version = "1.0.0"
//!
//!     [limits]
//!     max_memory = "16MiB"
//!     fuel = 1_000_000
//!     timeout = "500ms"
//!     max_concurrency = 4
//! "#.parse()?;
//!
//! let runtime = Runtime::new(&RuntimeConfig::new())?;
//! let adder = runtime.load(&wasm, manifest)?;
//!
//! let tokio = tokio::runtime::Runtime::new()?;
//! let sum = tokio.block_on(adder.invoke("add", serde_json::json!([40, 2])))?;
//! assert_eq!(sum, 42);
//!
//! // Crashes and refusals carry a machine-readable reason.
//! let err = tokio.block_on(adder.invoke("add", serde_json::json!([1, "two"]))).unwrap_err();
//! assert_eq!(err.reason(), "invalid_arguments");
//! # Ok(())
//! # }
//! ```
//!
//! # Core concepts
//!
//! - [`Runtime`]: one wasmtime engine (Component Model, Cranelift, fuel, epoch interruption with
//!   one ticker thread, pooling allocator) plus the WASI linker and an optional on-disk cache of
//!   compiled artifacts keyed by the component's digest and the engine's compatibility hash.
//! - [`Manifest`]: the parsed `Component.toml`; every limit is required.
//! - [`LoadedComponent`]: a compiled, linked, pre-instantiated component. Each
//!   [`invoke`](LoadedComponent::invoke) runs in a fresh store, so nothing survives between calls.
//! - [`InstanceManager`]: what the Node Agent runs on top of the runtime: instances started and
//!   stopped by host commands ([`serve_commands`]), serving calls over NATS, crashes reported as
//!   facts and restarts under each instance's restart policy.
//! - [`InvokeError`]: why an invocation failed, with a stable [`reason`](InvokeError::reason)
//!   such as `fuel_exhausted`, `timeout`, `memory_limit`, `stack_overflow`, `panic` or
//!   `trap: unreachable`.
//!
//! # JSON values
//!
//! [`LoadedComponent::invoke`] takes the arguments as a JSON array, one element per parameter,
//! converts each by the parameter's WIT type and returns the result the same way (`null` for a
//! function without result):
//!
//! | WIT type | JSON |
//! |---|---|
//! | `bool` | `true` / `false` |
//! | `s8`…`u64` | an integer number, range-checked |
//! | `f32`, `f64` | a number; `"NaN"`, `"inf"`, `"-inf"` for non-finite values |
//! | `char` | a string of exactly one character |
//! | `string` | a string |
//! | `list<T>`, `tuple<…>` | an array (a tuple's length must match) |
//! | `record` | an object keyed by field name; an `option` field may be left out |
//! | `option<T>` | `null` or the value (so `option<option<T>>` cannot say `some(none)`) |
//! | `result<T, E>` | `{"ok": value}` or `{"err": value}` (`null` value when there is no payload) |
//! | `enum` | the case name as a string |
//! | `variant` | `{"case": payload}`; a case without payload may also be just `"case"` (and is returned that way) |
//! | `flags` | an array of the names that are set |
//!
//! Resources, futures and streams cannot cross JSON and are refused. A value that does not fit
//! is refused with [`InvokeError::ArgumentType`], naming the parameter, the path inside it, what
//! was expected and what was found.
//!
//! # Deny by default
//!
//! WASI is linked so that standard guests instantiate, but it grants nothing: no preopened
//! directories, environment, arguments, stdin or network. Clocks and random work; stdout and
//! stderr are captured per invocation into bounded buffers. Any other import must be declared in
//! the manifest's `capabilities.imports`; a declared capability the embedder has not bound yet
//! traps when called, and an undeclared one refuses the load.
//!
//! # Compiled-artifact cache
//!
//! With [`RuntimeConfig::cache_dir`], compiled components are kept on disk as
//! `<dir>/<engine key>/<sha256 of the wasm>.cwasm`, where the engine key hashes wasmtime's
//! compatibility data (version, target, compiler settings). A restarted host maps the artifact
//! instead of compiling ([`LoadOutcome::cache_hit`]). Artifacts are written to a temporary file
//! and renamed into place; one that fails to load is deleted and recompiled. Loading an artifact
//! maps native code: the directory must be writable by the host only.
#![deny(missing_docs)]

pub mod agent;
mod instances;
mod metrics;
pub mod microvm;
pub mod providers;
mod runtime;

pub use agent::{HostConfig, HostError, run};
pub use instances::{InstanceManager, InstancesConfig, LogConfig, StartError, serve_commands};
pub use microvm::MicrovmConfig;
pub use runtime::*;
