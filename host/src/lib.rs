//! Trellis host: the WebAssembly runtime (this module tree) and the Node Agent.
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
//! - [`InvokeError`]: why an invocation failed, with a stable [`reason`](InvokeError::reason)
//!   such as `fuel_exhausted`, `timeout`, `memory_limit`, `stack_overflow`, `panic` or
//!   `trap: unreachable`.
//!
//! # Deny by default
//!
//! WASI is linked so that standard guests instantiate, but it grants nothing: no preopened
//! directories, environment, arguments, stdin or network. Clocks and random work; stdout and
//! stderr are captured per invocation into bounded buffers. Any other import must be declared in
//! the manifest's `capabilities.imports`.
#![deny(missing_docs)]

mod runtime;

pub use runtime::*;
