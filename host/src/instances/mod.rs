//! Instances: running components on this host and serving their calls over NATS.
//!
//! # Sections
//!
//! - **Commands.** The host serves `trellis.host.v1.<lattice>.<host_id>.instance.start|stop`.
//!   A command is checked and answered at once (accepted, or refused with a stable error code);
//!   its outcome follows as a fact whose `causationid` is the command's `operation_id`.
//! - **Starting.** The code comes from the lattice's artifact store (verified against its digest)
//!   or from a file on this machine; it is loaded with the limits of its manifest, which must fit
//!   under the host's ceilings. Success is `instance.started` (attempt 0); any failure is
//!   `instance.start_failed` with a precise reason.
//! - **Serving.** A running instance answers calls on its component's subject (in the
//!   component's queue group, so the instances of a component share the load) and on its own
//!   instance subject. Each call runs in a fresh store, concurrently with others, up to the
//!   manifest's `max_concurrency`; one more is refused with `busy`.
//! - **Capabilities.** An instance's capability calls go to the provider its assignment names,
//!   over NATS, after the host checked the assignment (from the `assignment.*` facts it follows and
//!   the ones its start command carried). An instance whose manifest `requires` a capability that
//!   is not assigned does not start (`instance.start_failed` naming the capability). HTTP requests
//!   from the `http-server` provider arrive on the component's `.http` subject and are served by
//!   its `wasi:http/incoming-handler`.
//! - **In process.** An `http-server` provider embedded in this host hands HTTP requests to
//!   the instances running here directly ([`InstanceManager::local_http`]), with the same checks,
//!   limits and crash handling as a request over NATS.
//! - **Crashes.** A call that crashes (trap, fuel, timeout, memory, stack, panic, output size) is
//!   answered with the crash; the instance stops serving and reports `instance.crashed`. The
//!   restart policy is applied here, without asking anyone: `instance.restarting`, a delay, then
//!   `instance.started` with the attempt number; or `instance.gave_up` when a backoff's attempts
//!   are exhausted; or nothing more for `never`. Other instances are not affected.
//! - **Logs.** Each line an instance writes goes out on its log subject as it is written, within
//!   a rate per instance, and the last lines are kept for `instance.logs` (see [`logs`]).
//! - **Stopping and drain.** A stopped instance stops taking calls, waits (bounded by its timeout)
//!   for the calls in flight and reports `instance.stopped`. A draining host stops every
//!   instance this way before it reports `host.stopped`.

mod artifact;
mod bridge;
mod call;
mod commands;
mod error;
mod instance;
mod local;
mod logs;
mod manager;
mod stats;

pub use commands::serve_commands;
pub use error::StartError;
pub use logs::LogConfig;
pub use manager::{InstanceManager, InstancesConfig};
pub(crate) use stats::Counts;
