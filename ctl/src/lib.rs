//! The Trellis controller, its typed client and the `trellis` CLI.
//!
//! - [`controller`]: the stateless controller replica (`trellis controller`).
//! - [`client`]: [`CtlClient`], a typed client of the control subjects.
//! - [`cli`]: the `trellis` command line, including `trellis up`.
//! - [`capabilities`]: the `assignment` and `provider` commands.
//! - [`links`]: the `link` commands.
//! - [`logs`]: `trellis logs`.
//! - [`wasm`]: what a component imports and exports, and `trellis component init`.
#![deny(missing_docs)]

pub mod audit;
pub mod capabilities;
pub mod cli;
pub mod client;
pub mod controller;
pub mod creds;
pub mod links;
pub mod logs;
pub mod output;
pub mod rollout;
pub mod ui;
pub mod up;
pub mod wasm;
pub mod workload;

pub use client::{ClientError, CtlClient};
pub use controller::{ControllerConfig, ControllerError};
