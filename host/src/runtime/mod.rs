//! The WebAssembly runtime: one engine per host, components loaded with their limits, each
//! invocation in a fresh store. Re-exported flat from the crate root.

mod bindings;
mod cache;
mod capabilities;
mod component;
mod config;
mod convert;
mod digest;
mod error;
mod http;
mod links;
mod output;
#[expect(
    clippy::module_inception,
    reason = "the file is named after the type it holds, `Runtime`"
)]
mod runtime;
mod spare;
mod store;
mod ticker;

pub use capabilities::{
    BridgeFuture, CapabilityBridge, CapabilityCall, CapabilityError, CapabilityRequest,
    CapabilityResponse, DenyAll, LinkCall, LinkError, LinkFuture,
};
pub use component::{CallContext, ExportInfo, Invocation, LoadedComponent, ResourceUsage};
pub use config::RuntimeConfig;
pub use convert::ConvertError;
pub(crate) use convert::{Budget, json_to_val, val_to_json};
pub use digest::{Digest, DigestParseError};
pub use error::{InvokeError, LoadError, RuntimeError};
pub(crate) use links::encode_args as encode_link_args;
pub(crate) use output::cut;
pub use output::{GuestOutput, LineSource, LogSink, MAX_LINE_BYTES};
pub(crate) use runtime::pagemap_scan;
pub use runtime::{AllocationStrategy, LoadOutcome, Runtime};
pub use trellis_schemas::manifest::{
    Capabilities, FUEL_RANGE, Limits, MAX_CONCURRENCY_RANGE, MAX_MEMORY_RANGE, Manifest,
    ManifestError, TIMEOUT_RANGE,
};
