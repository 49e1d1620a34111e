//! Errors of the runtime: creating it, loading a component, invoking an export.

use std::path::PathBuf;
use std::time::Duration;

use trellis_schemas::dataplane::{CrashReason, ErrorCode};
use wasmtime::Trap;

use super::convert::ConvertError;
use super::digest::Digest;
use super::output::GuestOutput;
use super::store::MemoryLimitExceeded;

/// A linked call that failed where the calling function could not take the error: it ends the
/// invocation with [`InvokeError::Link`].
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub(crate) struct LinkFailed {
    pub code: ErrorCode,
    pub message: String,
}

/// A [`Runtime`](super::Runtime) could not be created.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// A [`RuntimeConfig`](super::RuntimeConfig) value is out of range.
    #[error("runtime config: {field}: {problem}")]
    Config {
        /// The setting at fault.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The engine rejected the configuration.
    #[error("creating the wasm engine: {0:?}")]
    Engine(wasmtime::Error),
    /// The compiled-artifact cache directory cannot be created.
    #[error("opening the compiled-artifact cache in {}: {source}", dir.display())]
    Cache {
        /// The configured directory.
        dir: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The epoch ticker thread could not be started.
    #[error("starting the epoch ticker thread: {0}")]
    Ticker(std::io::Error),
}

/// A component could not be loaded.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The bytes do not have the digest the caller expected.
    #[error("digest mismatch: expected {expected}, the bytes have {actual}")]
    DigestMismatch {
        /// The digest the caller asked for.
        expected: Digest,
        /// The digest of the bytes given.
        actual: Digest,
    },
    /// The bytes are not a valid WebAssembly component (a core module is not a component).
    #[error("invalid component {digest}: {message}")]
    InvalidComponent {
        /// Digest of the bytes.
        digest: Digest,
        /// The validator's or compiler's explanation.
        message: String,
    },
    /// The manifest asks for more than this host allows.
    #[error("{field} = {requested} exceeds this host's ceiling of {ceiling}")]
    ExceedsHostLimit {
        /// The manifest field, e.g. `limits.max_memory`.
        field: &'static str,
        /// What the manifest asks for.
        requested: String,
        /// What the host allows.
        ceiling: String,
    },
    /// The component imports an interface that is neither basic WASI nor declared in the
    /// manifest's `capabilities.imports`.
    #[error(
        "the component imports {import}, which its manifest does not declare; add it to [capabilities] in Component.toml: imports = [\"{import}\", …] (`trellis component init app.wasm` writes a manifest from the component's imports)"
    )]
    UndeclaredImport {
        /// The imported interface, as the component names it.
        import: String,
    },
    /// The component cannot be linked or pre-instantiated with the host's imports.
    #[error("linking the component: {message}")]
    Link {
        /// The linker's explanation.
        message: String,
    },
}

/// An invocation failed. [`reason`](Self::reason) gives a stable machine-readable string.
///
/// Variants that come from the guest running ([`FuelExhausted`](Self::FuelExhausted) to
/// [`Trap`](Self::Trap)) end only that invocation: the component and the runtime keep serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum InvokeError {
    /// The component has no function export of that name.
    #[error("component {component} has no export {name:?}; available: {}", available.join(", "))]
    UnknownExport {
        /// The component's name.
        component: String,
        /// The name asked for.
        name: String,
        /// The function exports there are.
        available: Vec<String>,
    },
    /// The arguments were not a JSON array.
    #[error("{export}: arguments must be a JSON array of {expected} values")]
    ArgumentsNotArray {
        /// The export called.
        export: String,
        /// How many parameters it takes.
        expected: usize,
    },
    /// Wrong number of arguments.
    #[error(
        "{export}: expected {expected} argument{} ({}), got {got}",
        if *expected == 1 { "" } else { "s" },
        params.join(", ")
    )]
    ArgumentCount {
        /// The export called.
        export: String,
        /// How many parameters it takes.
        expected: usize,
        /// How many were given.
        got: usize,
        /// Its parameter names.
        params: Vec<String>,
    },
    /// An argument does not fit its parameter's type.
    #[error("{export}: argument {position} ({param}): {error}")]
    ArgumentType {
        /// The export called.
        export: String,
        /// The parameter's name.
        param: String,
        /// The parameter's position (0-based).
        position: usize,
        /// What was expected, where and what was found.
        error: Box<ConvertError>,
    },
    /// `max_concurrency` invocations of the component are already running. Returned at once,
    /// without waiting: the caller decides whether to queue, retry or shed.
    #[error("component {component} is busy: {max_concurrency} invocations already running")]
    Busy {
        /// The component's name.
        component: String,
        /// Its concurrency limit.
        max_concurrency: u32,
    },
    /// The invocation used up its fuel.
    #[error("fuel exhausted ({fuel} units)")]
    FuelExhausted {
        /// The fuel it had.
        fuel: u64,
        /// What it wrote before it stopped.
        output: GuestOutput,
    },
    /// The invocation ran past its wall-clock timeout.
    #[error("timed out after {timeout:?}")]
    Timeout {
        /// The timeout it had.
        timeout: Duration,
        /// What it wrote before it stopped.
        output: GuestOutput,
    },
    /// The guest tried to grow its memory past `max_memory`.
    #[error("memory limit exceeded: growing to {desired} bytes, limit {limit} bytes")]
    MemoryLimit {
        /// The limit in bytes.
        limit: u64,
        /// The size it tried to grow to.
        desired: usize,
        /// What it wrote before it stopped.
        output: GuestOutput,
    },
    /// The guest exhausted the wasm stack.
    #[error("wasm stack overflow")]
    StackOverflow {
        /// What it wrote before it stopped.
        output: GuestOutput,
    },
    /// The guest panicked: it printed a panic message to stderr and aborted.
    #[error("guest panicked: {message}")]
    Panic {
        /// The panic message as the guest printed it.
        message: String,
        /// What it wrote; `stderr` holds the full panic report.
        output: GuestOutput,
    },
    /// The guest trapped for another reason.
    #[error("guest trapped: {trap}")]
    Trap {
        /// The trap.
        trap: Trap,
        /// What it wrote before it stopped.
        output: GuestOutput,
    },
    /// The result is larger than the runtime's `max_result_bytes`.
    #[error("result too large: at least {size} bytes of JSON, limit {limit}")]
    OutputTooLarge {
        /// Bytes counted before giving up.
        size: usize,
        /// The limit.
        limit: usize,
        /// What the guest wrote.
        output: GuestOutput,
    },
    /// The result holds a value JSON cannot carry (resource, future, stream).
    #[error("{export}: the result holds {what}, which cannot be returned as JSON")]
    UnsupportedResult {
        /// The export called.
        export: String,
        /// What was found.
        what: &'static str,
    },
    /// An HTTP request could not be turned into a `wasi:http` request (bad method or target).
    #[error("bad HTTP request: {message}")]
    BadRequest {
        /// What is wrong with it.
        message: String,
    },
    /// The component's HTTP handler ran without crashing but gave no usable response (it
    /// answered with an error code, never set a response, or its body failed).
    #[error("no HTTP response: {message}")]
    HttpResponse {
        /// What happened.
        message: String,
        /// What the guest wrote.
        output: GuestOutput,
    },
    /// Every slot of the host's pooling allocator is taken: the host runs as many instances
    /// as it can hold. Nothing ran; the call may be tried again, here later or on another host.
    #[error("the host is full: {0}")]
    PoolFull(wasmtime::Error),
    /// Instantiation failed for a reason other than a limit or a full pool.
    #[error("instantiating the component: {0:?}")]
    Instantiation(wasmtime::Error),
    /// A linked import failed and the function that called it cannot take the error (it does
    /// not return a `result` with a string or error-enum error).
    #[error("linked call failed: {message}")]
    Link {
        /// The link's error code (`access_denied`, `unavailable`, or the target's).
        code: ErrorCode,
        /// What happened.
        message: String,
        /// What the guest wrote before it stopped.
        output: GuestOutput,
    },
    /// The invocation ran in a micro-VM and failed there (the runtime inside reported how), or
    /// the VM itself failed (`vm_exit`, `vm_timeout`).
    #[error("{message}")]
    Microvm {
        /// The stable reason, as [`reason`](Self::reason) gives it.
        reason: String,
        /// The data-plane code the call answers with.
        code: ErrorCode,
        /// For a crash, how.
        crash: Option<CrashReason>,
        /// What happened, with the tail of the guest's stderr for a crash.
        message: String,
    },
    /// Any other failure raised by the engine or a host function.
    #[error("invocation failed: {error:?}")]
    Host {
        /// The engine's error, kept whole.
        error: wasmtime::Error,
        /// What the guest wrote before it stopped.
        output: GuestOutput,
    },
}

impl InvokeError {
    /// A stable, machine-readable reason: `fuel_exhausted`, `timeout`, `memory_limit`,
    /// `stack_overflow`, `panic`, `trap: <code>` (e.g. `trap: unreachable`), `output_too_large`,
    /// `busy`, `pool_full`, `unknown_export`, `invalid_arguments`, `unsupported_result`,
    /// `instantiation_failed`, `link_failed` or `host_error`.
    pub fn reason(&self) -> String {
        match self {
            Self::UnknownExport { .. } => "unknown_export".to_string(),
            Self::ArgumentsNotArray { .. }
            | Self::ArgumentCount { .. }
            | Self::ArgumentType { .. } => "invalid_arguments".to_string(),
            Self::Busy { .. } => "busy".to_string(),
            Self::FuelExhausted { .. } => "fuel_exhausted".to_string(),
            Self::Timeout { .. } => "timeout".to_string(),
            Self::MemoryLimit { .. } => "memory_limit".to_string(),
            Self::StackOverflow { .. } => "stack_overflow".to_string(),
            Self::Panic { .. } => "panic".to_string(),
            Self::Trap { trap, .. } => format!("trap: {}", trap_code(*trap)),
            Self::OutputTooLarge { .. } => "output_too_large".to_string(),
            Self::UnsupportedResult { .. } => "unsupported_result".to_string(),
            Self::BadRequest { .. } => "bad_request".to_string(),
            Self::HttpResponse { .. } => "no_response".to_string(),
            Self::PoolFull(_) => "pool_full".to_string(),
            Self::Instantiation(_) => "instantiation_failed".to_string(),
            Self::Link { .. } => "link_failed".to_string(),
            Self::Microvm { reason, .. } => reason.clone(),
            Self::Host { .. } => "host_error".to_string(),
        }
    }

    /// Whether the guest itself caused the failure while running (a crash), as opposed to a
    /// refused call (bad arguments, busy) or a host-side failure.
    pub fn is_crash(&self) -> bool {
        matches!(
            self,
            Self::FuelExhausted { .. }
                | Self::Timeout { .. }
                | Self::MemoryLimit { .. }
                | Self::StackOverflow { .. }
                | Self::Panic { .. }
                | Self::Trap { .. }
                | Self::OutputTooLarge { .. }
                | Self::Microvm { crash: Some(_), .. }
        )
    }

    /// How the guest crashed, for a crash ([`is_crash`](Self::is_crash)).
    pub fn crash_reason(&self) -> Option<CrashReason> {
        Some(match self {
            Self::FuelExhausted { .. } => CrashReason::FuelExhausted,
            Self::Timeout { .. } => CrashReason::Timeout,
            Self::MemoryLimit { .. } => CrashReason::MemoryLimit,
            Self::StackOverflow { .. } => CrashReason::StackOverflow,
            Self::Panic { .. } => CrashReason::Panic,
            Self::Trap { trap, .. } => CrashReason::Trap(trap_code(*trap)),
            Self::OutputTooLarge { .. } => CrashReason::OutputTooLarge,
            Self::Microvm {
                crash: Some(crash), ..
            } => crash.clone(),
            _ => return None,
        })
    }

    /// The data-plane error code a call that failed this way answers with.
    pub fn code(&self) -> ErrorCode {
        if let Some(reason) = self.crash_reason() {
            return reason.error_code();
        }
        match self {
            Self::UnknownExport { .. } => ErrorCode::UnknownExport,
            Self::ArgumentsNotArray { .. }
            | Self::ArgumentCount { .. }
            | Self::ArgumentType { .. } => ErrorCode::InvalidArguments,
            Self::Busy { .. } | Self::PoolFull(_) => ErrorCode::Busy,
            Self::UnsupportedResult { .. } => ErrorCode::UnsupportedResult,
            Self::BadRequest { .. } => ErrorCode::InvalidRequest,
            Self::HttpResponse { .. } => ErrorCode::NoResponse,
            Self::Link { code, .. } | Self::Microvm { code, .. } => *code,
            _ => ErrorCode::Internal,
        }
    }

    /// What the guest wrote to stdout and stderr before it failed, when it ran at all.
    pub fn output(&self) -> Option<&GuestOutput> {
        match self {
            Self::FuelExhausted { output, .. }
            | Self::Timeout { output, .. }
            | Self::MemoryLimit { output, .. }
            | Self::StackOverflow { output }
            | Self::Panic { output, .. }
            | Self::Trap { output, .. }
            | Self::OutputTooLarge { output, .. }
            | Self::HttpResponse { output, .. }
            | Self::Link { output, .. }
            | Self::Host { output, .. } => Some(output),
            _ => None,
        }
    }

    /// The description a crash is reported with: the error, and the tail of the guest's stderr
    /// when it wrote any (a panic's message is in the error itself).
    pub fn detail(&self) -> String {
        let mut detail = self.to_string();
        if !matches!(self, Self::Panic { .. })
            && let Some(output) = self.output()
        {
            let stderr = output.stderr.trim();
            if !stderr.is_empty() {
                let tail: String = stderr
                    .chars()
                    .rev()
                    .take(1024)
                    .collect::<Vec<_>>()
                    .into_iter()
                    .rev()
                    .collect();
                detail.push_str("; stderr: ");
                detail.push_str(&tail);
            }
        }
        detail
    }

    /// Classifies an error raised while instantiating or running the guest. The trap is matched
    /// as a value (never by its text); the memory limit is matched by the limiter's own error.
    pub(crate) fn from_guest(
        error: wasmtime::Error,
        output: GuestOutput,
        fuel: u64,
        timeout: Duration,
    ) -> Self {
        if let Some(link) = error
            .chain()
            .find_map(|cause| cause.downcast_ref::<LinkFailed>())
        {
            return Self::Link {
                code: link.code,
                message: link.message.clone(),
                output,
            };
        }
        if let Some(limit) = error
            .chain()
            .find_map(|cause| cause.downcast_ref::<MemoryLimitExceeded>())
        {
            return Self::MemoryLimit {
                limit: limit.limit,
                desired: limit.desired,
                output,
            };
        }
        let trap = error
            .chain()
            .find_map(|cause| cause.downcast_ref::<Trap>())
            .copied();
        match trap {
            Some(Trap::OutOfFuel) => Self::FuelExhausted { fuel, output },
            Some(Trap::Interrupt) => Self::Timeout { timeout, output },
            Some(Trap::StackOverflow) => Self::StackOverflow { output },
            // A Rust guest prints "panicked at" to stderr, then aborts with `unreachable`.
            Some(Trap::UnreachableCodeReached) => match panic_message(&output.stderr) {
                Some(message) => Self::Panic { message, output },
                None => Self::Trap {
                    trap: Trap::UnreachableCodeReached,
                    output,
                },
            },
            Some(trap) => Self::Trap { trap, output },
            None => Self::Host { error, output },
        }
    }
}

/// The panic message from a Rust guest's stderr ("thread '…' panicked at file:line:col:\nmsg").
fn panic_message(stderr: &str) -> Option<String> {
    let start = stderr.find("panicked at")?;
    let report = &stderr[start..];
    // Since Rust 1.73 the message is on the line after the location.
    let mut lines = report.lines();
    let location_line = lines.next()?;
    let message: Vec<&str> = lines
        .take_while(|line| !line.starts_with("note:"))
        .collect();
    let message = message.join("\n");
    if message.trim().is_empty() {
        Some(location_line.to_string())
    } else {
        Some(message.trim_end().to_string())
    }
}

/// The snake_case code of a trap, e.g. `unreachable`, `memory_out_of_bounds`.
pub(crate) fn trap_code(trap: Trap) -> String {
    match trap {
        Trap::UnreachableCodeReached => "unreachable".to_string(),
        Trap::OutOfFuel => "fuel_exhausted".to_string(),
        Trap::Interrupt => "interrupt".to_string(),
        other => {
            // `Trap` is non-exhaustive: derive the code from the variant name.
            let name = format!("{other:?}");
            let mut code = String::with_capacity(name.len() + 4);
            for (i, c) in name.chars().enumerate() {
                if c.is_ascii_uppercase() {
                    if i > 0 {
                        code.push('_');
                    }
                    code.push(c.to_ascii_lowercase());
                } else {
                    code.push(c);
                }
            }
            code
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trap_codes_are_snake_case() {
        assert_eq!(trap_code(Trap::UnreachableCodeReached), "unreachable");
        assert_eq!(trap_code(Trap::MemoryOutOfBounds), "memory_out_of_bounds");
        assert_eq!(
            trap_code(Trap::IntegerDivisionByZero),
            "integer_division_by_zero"
        );
    }

    #[test]
    fn finds_the_panic_message() {
        let stderr = "about to panic\nthread '<unnamed>' panicked at src/lib.rs:12:9:\nguest gave up: now\nnote: run with `RUST_BACKTRACE=1`\n";
        assert_eq!(panic_message(stderr).as_deref(), Some("guest gave up: now"));
        assert_eq!(panic_message("plain abort"), None);
    }

    #[test]
    fn classifies_traps_by_value() {
        let out = GuestOutput::default();
        let t = Duration::from_secs(1);
        let classify = |trap: Trap| {
            InvokeError::from_guest(wasmtime::Error::from(trap), out.clone(), 10, t).reason()
        };
        assert_eq!(classify(Trap::OutOfFuel), "fuel_exhausted");
        assert_eq!(classify(Trap::Interrupt), "timeout");
        assert_eq!(classify(Trap::StackOverflow), "stack_overflow");
        assert_eq!(classify(Trap::UnreachableCodeReached), "trap: unreachable");
        let limit = wasmtime::Error::from(MemoryLimitExceeded {
            desired: 2 << 20,
            limit: 1 << 20,
        })
        .context("while running");
        assert_eq!(
            InvokeError::from_guest(limit, out, 10, t).reason(),
            "memory_limit"
        );
    }
}
