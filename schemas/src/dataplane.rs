//! The data plane: subjects, headers, reply status, error codes and crash reasons of calls to
//! components and providers, and the command subjects of hosts and provider processes.
//!
//! Every data-plane subject is built and parsed here; no other crate formats or splits one.
//!
//! | subject | who serves it |
//! |---|---|
//! | `trellis.rpc.v1.<lattice>.component.<name>.<op>` | any instance of the component, queue group [`component_queue`] |
//! | `trellis.rpc.v1.<lattice>.instance.<id>.<op>` | one instance |
//! | `trellis.rpc.v1.<lattice>.version.<name>.<digest hex>.<op>` | any instance of one version, queue group [`version_queue`] |
//! | `trellis.rpc.v1.<lattice>.provider.<name>.<capability>` | a provider's processes, queue group [`provider_queue`] |
//! | `trellis.prov.v1.<lattice>.<provider_id>.<verb>` | one provider process ([`ProviderVerb`]) |
//! | `trellis.host.v1.<lattice>.<host_id>.<noun>.<verb>` | one host ([`HostVerb`]) |
//!
//! `<op>` is an [`Op`]: `call` (an export, JSON arguments in the body) or `http` (a
//! `wasi:http` request, head in [`headers::HTTP_HEAD`], body as payload).
//!
//! # Replies
//!
//! Every reply carries [`headers::STATUS`] ([`Status`]). An error reply carries
//! [`headers::ERROR_CODE`] (an [`ErrorCode`], which also says what HTTP status it becomes),
//! for a crash [`headers::REASON`] (a [`CrashReason`]), and a message for people as its body.
//! A reply from an instance names it in [`headers::INSTANCE`].

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::capability::{AssignmentTarget, Capability};
use crate::names::{ComponentName, HostId, InstanceId, Lattice, ProviderId, ProviderName};

/// Header names of the data plane. Values are text; bodies are raw bytes.
pub mod headers {
    /// Call request: the export to call (`add`, `pkg:name/iface#func`).
    pub const EXPORT: &str = "Trellis-Export";
    /// Every reply: a [`Status`](super::Status).
    pub const STATUS: &str = "Trellis-Status";
    /// Error replies: an [`ErrorCode`](super::ErrorCode).
    pub const ERROR_CODE: &str = "Trellis-Error-Code";
    /// Crash replies: a [`CrashReason`](super::CrashReason).
    pub const REASON: &str = "Trellis-Reason";
    /// Replies of an instance: its id. Capability requests from hosts before [`IDENTITY`]: the
    /// calling instance.
    pub const INSTANCE: &str = "Trellis-Instance";
    /// Capability requests: who calls, in one header of four fields separated by spaces:
    /// the calling instance, its component, the assignment the host resolved for the call, and
    /// the stream sequence of that assignment's fact (a provider whose projection is older
    /// waits, briefly, to catch up before deciding); `-` for an assignment or sequence the host
    /// does not give. One header, not four: a provider parses every header of every call.
    pub const IDENTITY: &str = "Trellis-Identity";
    /// Capability requests from hosts before [`IDENTITY`], still read: the calling instance's
    /// component (with the instance in [`INSTANCE`]).
    pub const COMPONENT: &str = "Trellis-Component";
    /// Capability requests from hosts before [`IDENTITY`], still read: the assignment.
    pub const ASSIGNMENT: &str = "Trellis-Assignment";
    /// Capability requests from hosts before [`IDENTITY`], still read: the assignment's fact
    /// sequence.
    pub const MIN_SEQ: &str = "Trellis-Min-Seq";
    /// HTTP requests and replies: the request or response head as JSON
    /// ([`HttpRequestHead`](crate::capability::rpc::HttpRequestHead),
    /// [`HttpResponseHead`](crate::capability::rpc::HttpResponseHead)).
    pub const HTTP_HEAD: &str = "Trellis-Http";
    /// Calls and HTTP requests: W3C trace context; its trace id labels the invocation's log
    /// lines.
    pub const TRACEPARENT: &str = "traceparent";
    /// Capability requests: `1` when the caller reads a backend's own reply, which a provider
    /// in front of a NATS-native backend may then have the backend send straight to the caller
    /// (`trellis_bus::direct`).
    pub const DIRECT: &str = "Trellis-Direct";
}

/// Attributes of the spans Trellis processes export (besides OpenTelemetry's semantic
/// conventions such as `http.request.method`).
pub mod span_attributes {
    /// The component an invocation or a capability call belongs to.
    pub const COMPONENT: &str = "trellis.component";
    /// The instance that runs the invocation, or that made the capability call.
    pub const INSTANCE: &str = "trellis.instance";
    /// What an `http-server` listener sends its requests to (`component:NAME`, `instance:ID`).
    pub const TARGET: &str = "trellis.target";
}

/// The parts of a W3C `traceparent` value (`00-<32 hex>-<16 hex>-<2 hex>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent<'a> {
    /// The trace id: 32 hex digits, not all zero.
    pub trace_id: &'a str,
    /// The parent span's id: 16 hex digits, not all zero.
    pub span_id: &'a str,
    /// The bytes the trace id spells.
    pub trace_id_bytes: [u8; 16],
    /// The bytes the parent span's id spells.
    pub span_id_bytes: [u8; 8],
    /// The trace flags (bit 0: sampled).
    pub flags: u8,
}

impl<'a> TraceParent<'a> {
    /// The parts of `value`, when it is a valid `traceparent`: `version-trace_id-span_id-flags`
    /// in fixed positions (further `-` fields are left to later versions). Read by position and
    /// decoded in the same pass, as every hop of a traced request reads one.
    pub fn parse(value: &'a str) -> Option<Self> {
        // Header values are trimmed of ASCII whitespace (HTTP's optional whitespace) only.
        let value = value.trim_ascii();
        let b = value.as_bytes();
        let shaped = b.len() >= 55
            && b[2] == b'-'
            && b[35] == b'-'
            && b[52] == b'-'
            && (b.len() == 55 || b[55] == b'-');
        if !shaped {
            return None;
        }
        let [version] = hex_bytes::<1>(&b[..2])?;
        let trace_id_bytes = hex_bytes::<16>(&b[3..35])?;
        let span_id_bytes = hex_bytes::<8>(&b[36..52])?;
        let [flags] = hex_bytes::<1>(&b[53..55])?;
        let valid = version != 0xff && trace_id_bytes != [0; 16] && span_id_bytes != [0; 8];
        // Every position sliced at is next to an ASCII '-' or the end: all char boundaries.
        valid.then(|| Self {
            trace_id: &value[3..35],
            span_id: &value[36..52],
            trace_id_bytes,
            span_id_bytes,
            flags,
        })
    }
}

/// The value of each byte as a hex digit (either case), or `0xff` for one that is not.
const HEX_DIGITS: [u8; 256] = {
    let mut table = [0xff; 256];
    let mut i = 0;
    while i < 16 {
        let digit = b"0123456789abcdef"[i];
        table[digit as usize] = i as u8;
        table[digit.to_ascii_uppercase() as usize] = i as u8;
        i += 1;
    }
    table
};

/// The `N` bytes that exactly `2 * N` hex digits spell, or `None`.
fn hex_bytes<const N: usize>(hex: &[u8]) -> Option<[u8; N]> {
    if hex.len() != 2 * N {
        return None;
    }
    let mut out = [0; N];
    // Digits are below 16; a byte that is not one has its high bits set, remembered here.
    let mut invalid = 0;
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let (high, low) = (
            HEX_DIGITS[usize::from(pair[0])],
            HEX_DIGITS[usize::from(pair[1])],
        );
        invalid |= high | low;
        *byte = high << 4 | (low & 0xf);
    }
    (invalid < 16).then_some(out)
}

/// The trace id of a W3C `traceparent` value, when it is one.
pub fn trace_id(traceparent: &str) -> Option<&str> {
    TraceParent::parse(traceparent).map(|t| t.trace_id)
}

/// Largest body a call, a capability request or an HTTP message may carry, in bytes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What a message to a component or an instance asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Call an export: JSON arguments in, JSON result out.
    Call,
    /// Serve an HTTP request with `wasi:http/incoming-handler`.
    Http,
}

impl Op {
    /// Every operation.
    pub const ALL: &'static [Op] = &[Op::Call, Op::Http];

    /// The last token of the subject.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Call => "call",
            Op::Http => "http",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The subject that reaches `target` (any instance of a component, or one instance) for `op`.
pub fn target_subject(lattice: &Lattice, target: &AssignmentTarget, op: Op) -> String {
    match target {
        AssignmentTarget::Component(name) => component(lattice, name, op),
        AssignmentTarget::Instance(id) => instance(lattice, id, op),
    }
}

/// The subject that reaches any instance of `component` (queue group [`component_queue`]).
pub fn component(lattice: &Lattice, component: &ComponentName, op: Op) -> String {
    format!("trellis.rpc.v1.{lattice}.component.{component}.{op}")
}

/// The subject that reaches one instance.
pub fn instance(lattice: &Lattice, instance: &InstanceId, op: Op) -> String {
    format!("trellis.rpc.v1.{lattice}.instance.{instance}.{op}")
}

/// Every data-plane subject of a component: what its instances subscribe to, in queue group
/// [`component_queue`].
pub fn component_all(lattice: &Lattice, component: &ComponentName) -> String {
    format!("trellis.rpc.v1.{lattice}.component.{component}.*")
}

/// Every data-plane subject of one instance.
pub fn instance_all(lattice: &Lattice, instance: &InstanceId) -> String {
    format!("trellis.rpc.v1.{lattice}.instance.{instance}.*")
}

/// The subject token of a digest: its hex part (`sha256:` dropped). Digests are validated when
/// stored; anything but lowercase hex is dropped here too, so the token is always subject-safe.
fn digest_token(digest: &str) -> String {
    digest
        .strip_prefix("sha256:")
        .unwrap_or(digest)
        .chars()
        .filter(|c| c.is_ascii_hexdigit())
        .collect()
}

/// The subject that reaches any instance of one version (by digest) of `component`, in queue
/// group [`version_queue`]: where routers send a request a rollout's weights assigned to it.
pub fn version(lattice: &Lattice, component: &ComponentName, digest: &str, op: Op) -> String {
    format!(
        "trellis.rpc.v1.{lattice}.version.{component}.{}.{op}",
        digest_token(digest)
    )
}

/// Every data-plane subject of one version of a component.
pub fn version_all(lattice: &Lattice, component: &ComponentName, digest: &str) -> String {
    format!(
        "trellis.rpc.v1.{lattice}.version.{component}.{}.*",
        digest_token(digest)
    )
}

/// The queue group the instances of one version of a component serve in.
pub fn version_queue(component: &ComponentName, digest: &str) -> String {
    format!("trellis-version-{component}-{}", digest_token(digest))
}

/// The queue group the instances of a component serve in.
pub fn component_queue(component: &ComponentName) -> String {
    format!("trellis-component-{component}")
}

/// The operation a component or instance subject asks for: its last token, when that is an
/// [`Op`] and the subject is a component or instance subject of `lattice`. `Err` carries the
/// unknown last token.
pub fn parse_op<'a>(lattice: &Lattice, subject: &'a str) -> Result<Op, &'a str> {
    let rest = after(subject, "trellis.rpc.v1", &[lattice.as_str(), "component"])
        .or_else(|| after(subject, "trellis.rpc.v1", &[lattice.as_str(), "instance"]))
        .or_else(|| after(subject, "trellis.rpc.v1", &[lattice.as_str(), "version"]));
    let Some(rest) = rest else {
        return Err(subject);
    };
    let Some((_, op)) = rest.rsplit_once('.') else {
        return Err(subject);
    };
    Op::ALL.iter().copied().find(|o| o.as_str() == op).ok_or(op)
}

/// What follows `prefix.<token>.<token>…` and a dot in `subject`, when it starts so.
fn after<'a>(subject: &'a str, prefix: &str, tokens: &[&str]) -> Option<&'a str> {
    let mut rest = subject.strip_prefix(prefix)?;
    for token in tokens {
        rest = rest.strip_prefix('.')?.strip_prefix(token)?;
    }
    rest.strip_prefix('.')
}

/// The subject a provider serves one capability on (queue group [`provider_queue`]).
pub fn provider_rpc(lattice: &Lattice, provider: &ProviderName, cap: Capability) -> String {
    format!(
        "trellis.rpc.v1.{lattice}.provider.{provider}.{}",
        cap.token()
    )
}

/// The queue group all processes of a provider serve in.
pub fn provider_queue(provider: &ProviderName) -> String {
    format!("trellis-provider-{provider}")
}

macro_rules! verbs {
    (
        $(#[$meta:meta])*
        $name:ident { $( $(#[$vmeta:meta])* $variant:ident => $wire:literal, )+ }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $( $(#[$vmeta])* $variant, )+
        }

        impl $name {
            /// Every verb.
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            /// The verb as in the subject.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $wire,)+
                }
            }

            /// The verb named `s`.
            pub fn parse(s: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str() == s)
            }

            /// The known verbs, for error messages (`a, b, c`).
            pub fn known() -> String {
                Self::ALL.iter().map(|v| v.as_str()).collect::<Vec<_>>().join(", ")
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

verbs! {
    /// A command to one host, from the controller. The body is JSON; the reply is the control
    /// envelope.
    HostVerb {
        /// Start an instance (`StartInstanceCommand`).
        InstanceStart => "instance.start",
        /// Stop an instance (`StopInstanceCommand`).
        InstanceStop => "instance.stop",
        /// The counters of instances (`InstanceStatsCommand`).
        InstanceStats => "instance.stats",
        /// The recent log lines of instances (`InstanceLogsCommand`).
        InstanceLogs => "instance.logs",
        /// Start a provider under this host (`StartProviderCommand`).
        ProviderStart => "provider.start",
        /// Stop a provider this host supervises (`StopProviderCommand`).
        ProviderStop => "provider.stop",
    }
}

verbs! {
    /// A control request to one provider process. The reply is the control envelope.
    ProviderVerb {
        /// Drain and stop.
        Stop => "stop",
        /// The provider's settings.
        Config => "config",
        /// Its health: assignments, projection sequence, calls in flight.
        Health => "health",
    }
}

/// The answer to [`ProviderVerb::Health`] (in the control envelope's `data`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ProviderHealth {
    /// The provider's name.
    pub name: ProviderName,
    /// The process.
    pub provider_id: ProviderId,
    /// The host supervising it, if any.
    pub host_id: Option<HostId>,
    /// How many assignments it serves.
    pub assignments: usize,
    /// The last fact sequence its projection applied.
    pub last_seq: u64,
    /// Calls being answered.
    pub in_flight: usize,
    /// `serving` or `draining`.
    pub status: String,
}

/// The subject of a command to one host.
pub fn host_command(lattice: &Lattice, host: &HostId, verb: HostVerb) -> String {
    format!("trellis.host.v1.{lattice}.{host}.{verb}")
}

/// Every command subject of one host (what it subscribes to).
pub fn host_commands(lattice: &Lattice, host: &HostId) -> String {
    format!("trellis.host.v1.{lattice}.{host}.>")
}

/// The verb of a command subject of `host`; `Err` carries what follows the host's prefix when
/// it is no [`HostVerb`] (or the whole subject when it is not the host's).
pub fn parse_host_command<'a>(
    lattice: &Lattice,
    host: &HostId,
    subject: &'a str,
) -> Result<HostVerb, &'a str> {
    let rest = after(
        subject,
        "trellis.host.v1",
        &[lattice.as_str(), host.as_str()],
    )
    .ok_or(subject)?;
    HostVerb::parse(rest).ok_or(rest)
}

/// The subject of a control request to one provider process (`name` is the provider's, which
/// puts every process of a provider under one prefix its credentials can be limited to).
pub fn provider_control(
    lattice: &Lattice,
    name: &ProviderName,
    provider: &ProviderId,
    verb: ProviderVerb,
) -> String {
    format!("trellis.prov.v1.{lattice}.{name}.{provider}.{verb}")
}

/// Every control subject of one provider process (what it subscribes to).
pub fn provider_controls(lattice: &Lattice, name: &ProviderName, provider: &ProviderId) -> String {
    format!("trellis.prov.v1.{lattice}.{name}.{provider}.*")
}

/// Every control subject of every process of the provider `name`.
pub fn provider_controls_of(lattice: &Lattice, name: &ProviderName) -> String {
    format!("trellis.prov.v1.{lattice}.{name}.>")
}

/// Every provider control subject of the lattice.
pub fn provider_controls_all(lattice: &Lattice) -> String {
    format!("trellis.prov.v1.{lattice}.>")
}

/// The verb of a control subject of `provider`; `Err` carries the unknown last token.
pub fn parse_provider_control<'a>(
    lattice: &Lattice,
    name: &ProviderName,
    provider: &ProviderId,
    subject: &'a str,
) -> Result<ProviderVerb, &'a str> {
    let rest = after(
        subject,
        "trellis.prov.v1",
        &[lattice.as_str(), name.as_str(), provider.as_str()],
    )
    .ok_or(subject)?;
    ProviderVerb::parse(rest).ok_or(rest)
}

/// Every provider RPC subject of the provider `name` (what its processes serve).
pub fn provider_rpc_of(lattice: &Lattice, name: &ProviderName) -> String {
    format!("trellis.rpc.v1.{lattice}.provider.{name}.*")
}

/// Every provider RPC subject of the lattice (what hosts send capability calls to).
pub fn provider_rpc_all(lattice: &Lattice) -> String {
    format!("trellis.rpc.v1.{lattice}.provider.>")
}

/// Every subject that reaches component instances: by component, by instance and by version.
pub fn components_all(lattice: &Lattice) -> [String; 3] {
    ["component", "instance", "version"].map(|kind| format!("trellis.rpc.v1.{lattice}.{kind}.>"))
}

/// Every command subject of every host of the lattice.
pub fn host_commands_all(lattice: &Lattice) -> String {
    format!("trellis.host.v1.{lattice}.>")
}

/// The [`headers::STATUS`] of a reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The call succeeded; the body is its result.
    Ok,
    /// The call failed; [`headers::ERROR_CODE`] says why, the body says it for people.
    Error,
}

impl Status {
    /// The value on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Error => "error",
        }
    }

    /// The status of a header value (`None`: not a status).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "ok" => Some(Status::Ok),
            "error" => Some(Status::Error),
            _ => None,
        }
    }
}

macro_rules! error_codes {
    ($( $(#[$meta:meta])* $variant:ident => $wire:literal, $http:literal; )+) => {
        /// Why a data-plane call failed: a stable string on the wire, and the HTTP status the
        /// `http-server` answers with.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
        #[serde(rename_all = "snake_case")]
        #[non_exhaustive]
        pub enum ErrorCode {
            $( $(#[$meta])* $variant, )+
        }

        impl ErrorCode {
            /// Every code.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$variant),+];

            /// The code as on the wire.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(ErrorCode::$variant => $wire,)+
                }
            }

            /// The HTTP status a request that failed with this code gets.
            pub fn http_status(self) -> u16 {
                match self {
                    $(ErrorCode::$variant => $http,)+
                }
            }
        }
    };
}

error_codes! {
    /// The request is malformed (missing or invalid header, body not what the operation takes).
    InvalidRequest => "invalid_request", 400;
    /// The body is over [`MAX_BODY_BYTES`] (or over what NATS carries).
    PayloadTooLarge => "payload_too_large", 413;
    /// The component has no such export (or does not serve HTTP).
    UnknownExport => "unknown_export", 404;
    /// The arguments do not fit the export's parameters.
    InvalidArguments => "invalid_arguments", 400;
    /// `max_concurrency` invocations already run; retry or shed.
    Busy => "busy", 503;
    /// The instance is not serving (stopping, or restarting after a crash); retry.
    NotRunning => "not_running", 503;
    /// No instance of the component (or the instance) runs on the lattice.
    NoInstance => "no_instance", 503;
    /// No component of that name was ever pushed to the lattice.
    UnknownComponent => "unknown_component", 503;
    /// The invocation ran past its wall-clock timeout, or no reply came in time.
    Timeout => "timeout", 504;
    /// The guest crashed: trap, fuel, memory, stack, panic ([`headers::REASON`] says which).
    Crashed => "crashed", 500;
    /// The result cannot be expressed as JSON (a resource, say).
    UnsupportedResult => "unsupported_result", 500;
    /// The component's HTTP handler returned without setting a response.
    NoResponse => "no_response", 502;
    /// No assignment grants the capability to the caller, or it does not cover the resource.
    AccessDenied => "access_denied", 403;
    /// The store named by the component is not the one its assignment grants.
    NoSuchStore => "no_such_store", 404;
    /// No provider answered, or the provider's backend is unreachable.
    Unavailable => "unavailable", 503;
    /// The upstream (HTTP server, NATS responder) failed; the message says how.
    Upstream => "upstream", 502;
    /// A bug or an unexpected failure on the serving side.
    Internal => "internal", 500;
}

impl ErrorCode {
    /// The code of a wire string; unknown codes read as [`ErrorCode::Internal`].
    pub fn parse(code: &str) -> Self {
        Self::ALL
            .iter()
            .copied()
            .find(|c| c.as_str() == code)
            .unwrap_or(ErrorCode::Internal)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why an invocation crashed: it ended that invocation and the instance's serving period (the
/// restart policy decides what follows).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum CrashReason {
    /// It used up its fuel.
    FuelExhausted,
    /// It ran past its wall-clock timeout.
    Timeout,
    /// It tried to grow its memory past `max_memory`.
    MemoryLimit,
    /// It exhausted the wasm stack.
    StackOverflow,
    /// It panicked.
    Panic,
    /// Its result was larger than the host allows.
    OutputTooLarge,
    /// It trapped; the code is snake case (`unreachable`, `memory_out_of_bounds`).
    Trap(String),
    /// The micro-VM running it exited (its QEMU process ended or the guest agent failed).
    VmExit,
    /// The micro-VM running it did not answer within the invocation's deadline plus a margin:
    /// it was killed.
    VmTimeout,
}

impl CrashReason {
    /// The error code a call that crashed this way answers with: [`ErrorCode::Timeout`] for a
    /// timeout (a gateway answers 504), [`ErrorCode::Crashed`] otherwise.
    pub fn error_code(&self) -> ErrorCode {
        match self {
            CrashReason::Timeout | CrashReason::VmTimeout => ErrorCode::Timeout,
            _ => ErrorCode::Crashed,
        }
    }
}

impl fmt::Display for CrashReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CrashReason::FuelExhausted => "fuel_exhausted",
            CrashReason::Timeout => "timeout",
            CrashReason::MemoryLimit => "memory_limit",
            CrashReason::StackOverflow => "stack_overflow",
            CrashReason::Panic => "panic",
            CrashReason::OutputTooLarge => "output_too_large",
            CrashReason::VmExit => "vm_exit",
            CrashReason::VmTimeout => "vm_timeout",
            CrashReason::Trap(code) => return write!(f, "trap: {code}"),
        })
    }
}

impl FromStr for CrashReason {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "fuel_exhausted" => CrashReason::FuelExhausted,
            "timeout" => CrashReason::Timeout,
            "memory_limit" => CrashReason::MemoryLimit,
            "stack_overflow" => CrashReason::StackOverflow,
            "panic" => CrashReason::Panic,
            "output_too_large" => CrashReason::OutputTooLarge,
            "vm_exit" => CrashReason::VmExit,
            "vm_timeout" => CrashReason::VmTimeout,
            other => match other.strip_prefix("trap: ") {
                Some(code) if !code.is_empty() => CrashReason::Trap(code.to_owned()),
                _ => return Err(format!("unknown crash reason {other:?}")),
            },
        })
    }
}

/// A failed data-plane call, as every caller and server of the data plane sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataError {
    /// Why.
    pub code: ErrorCode,
    /// For a crash, how.
    pub reason: Option<CrashReason>,
    /// What went wrong, for people.
    pub message: String,
}

impl DataError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            reason: None,
            message: message.into(),
        }
    }

    /// A crash: its code follows from the reason ([`CrashReason::error_code`]).
    pub fn crash(reason: CrashReason, message: impl Into<String>) -> Self {
        Self {
            code: reason.error_code(),
            reason: Some(reason),
            message: message.into(),
        }
    }

    /// `invalid_request`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidRequest, message)
    }

    /// `access_denied`.
    pub fn denied(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::AccessDenied, message)
    }

    /// `payload_too_large`.
    pub fn too_large(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::PayloadTooLarge, message)
    }

    /// `unavailable`.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Unavailable, message)
    }

    /// `upstream`.
    pub fn upstream(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Upstream, message)
    }

    /// `internal`.
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }

    /// The HTTP status this failure becomes.
    pub fn http_status(&self) -> u16 {
        self.code.http_status()
    }
}

impl fmt::Display for DataError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.reason {
            Some(reason) => write!(f, "{} ({reason}): {}", self.code, self.message),
            None => write!(f, "{}: {}", self.code, self.message),
        }
    }
}

impl std::error::Error for DataError {}

#[cfg(test)]
mod tests {
    use super::*;

    fn lattice() -> Lattice {
        Lattice::new("prod").expect("valid")
    }

    #[test]
    fn trace_ids_come_only_from_valid_traceparents() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        assert_eq!(trace_id(tp), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ] {
            assert_eq!(trace_id(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn traceparents_decode_to_the_bytes_they_spell() {
        let t = TraceParent::parse(" 00-4bf92f3577b34da6a3ce929d0e0e4736-00F067AA0BA902B7-03\t")
            .expect("valid");
        assert_eq!(
            t.trace_id_bytes,
            [
                0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e,
                0x47, 0x36
            ]
        );
        assert_eq!(
            t.span_id_bytes,
            [0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7]
        );
        assert_eq!((t.span_id, t.flags), ("00F067AA0BA902B7", 3));
        for bad in ["f", "", "0g", "g0", "+0", "0 ", "\u{e9}"] {
            assert_eq!(hex_bytes::<1>(bad.as_bytes()), None, "{bad:?}");
        }
        for (hex, byte) in [
            ("00", 0),
            ("09", 9),
            ("aF", 0xaf),
            ("Fa", 0xfa),
            ("ff", 0xff),
        ] {
            assert_eq!(hex_bytes::<1>(hex.as_bytes()), Some([byte]), "{hex}");
        }
    }

    #[test]
    fn component_and_instance_subjects_parse_back() {
        let l = lattice();
        let c = ComponentName::new("web").expect("valid");
        let i = InstanceId::new("01JABCDEFGHJKMNPQRSTVWXYZ0").expect("valid");
        for op in Op::ALL {
            assert_eq!(parse_op(&l, &component(&l, &c, *op)), Ok(*op));
            assert_eq!(parse_op(&l, &instance(&l, &i, *op)), Ok(*op));
            let target = AssignmentTarget::Component(c.clone());
            assert_eq!(target_subject(&l, &target, *op), component(&l, &c, *op));
        }
        assert_eq!(
            component(&l, &c, Op::Http),
            "trellis.rpc.v1.prod.component.web.http"
        );
        assert_eq!(
            parse_op(&l, "trellis.rpc.v1.prod.component.web.explode"),
            Err("explode")
        );
        let other = "trellis.rpc.v1.other.component.web.call";
        assert_eq!(parse_op(&l, other), Err(other));
    }

    #[test]
    fn host_commands_round_trip() {
        let l = lattice();
        let h = HostId::new("h1").expect("valid");
        for verb in HostVerb::ALL {
            assert_eq!(
                parse_host_command(&l, &h, &host_command(&l, &h, *verb)),
                Ok(*verb)
            );
        }
        assert_eq!(
            host_command(&l, &h, HostVerb::InstanceStart),
            "trellis.host.v1.prod.h1.instance.start"
        );
        assert_eq!(
            parse_host_command(&l, &h, "trellis.host.v1.prod.h1.instance.explode"),
            Err("instance.explode")
        );
        let other = "trellis.host.v1.prod.h2.instance.start";
        assert_eq!(parse_host_command(&l, &h, other), Err(other));
    }

    #[test]
    fn provider_controls_round_trip() {
        let l = lattice();
        let p = ProviderId::new("01JABCDEFGHJKMNPQRSTVWXYZ0").expect("valid");
        let n = ProviderName::new("kv").expect("valid");
        for verb in ProviderVerb::ALL {
            assert_eq!(
                parse_provider_control(&l, &n, &p, &provider_control(&l, &n, &p, *verb)),
                Ok(*verb)
            );
        }
        let subject = format!("{}x", provider_control(&l, &n, &p, ProviderVerb::Stop));
        assert_eq!(parse_provider_control(&l, &n, &p, &subject), Err("stopx"));
        assert_eq!(
            provider_control(&l, &n, &p, ProviderVerb::Stop),
            "trellis.prov.v1.prod.kv.01JABCDEFGHJKMNPQRSTVWXYZ0.stop"
        );
        let other = ProviderName::new("messaging").expect("valid");
        let theirs = provider_control(&l, &other, &p, ProviderVerb::Stop);
        assert_eq!(
            parse_provider_control(&l, &n, &p, &theirs),
            Err(theirs.as_str())
        );
        assert_eq!(ProviderVerb::known(), "stop, config, health");
    }

    #[test]
    fn codes_round_trip_and_map_to_http() {
        for code in ErrorCode::ALL {
            assert_eq!(ErrorCode::parse(code.as_str()), *code);
            let json = serde_json::to_string(code).expect("json");
            assert_eq!(json, format!("\"{}\"", code.as_str()));
        }
        assert_eq!(ErrorCode::parse("no-such-code"), ErrorCode::Internal);
        assert_eq!(ErrorCode::Timeout.http_status(), 504);
        assert_eq!(ErrorCode::Busy.http_status(), 503);
        assert_eq!(ErrorCode::NotRunning.http_status(), 503);
        assert_eq!(ErrorCode::Crashed.http_status(), 500);
        assert_eq!(ErrorCode::NoInstance.http_status(), 503);
        assert_eq!(ErrorCode::UnknownComponent.http_status(), 503);
        assert_eq!(ErrorCode::PayloadTooLarge.http_status(), 413);
    }

    #[test]
    fn crash_reasons_round_trip_and_a_timeout_is_a_gateway_timeout() {
        let reasons = [
            CrashReason::FuelExhausted,
            CrashReason::Timeout,
            CrashReason::MemoryLimit,
            CrashReason::StackOverflow,
            CrashReason::Panic,
            CrashReason::OutputTooLarge,
            CrashReason::Trap("unreachable".into()),
        ];
        for reason in reasons {
            assert_eq!(
                reason.to_string().parse::<CrashReason>(),
                Ok(reason.clone())
            );
            let error = DataError::crash(reason.clone(), "x");
            let expected = if reason == CrashReason::Timeout {
                504
            } else {
                500
            };
            assert_eq!(error.http_status(), expected, "{reason}");
        }
        assert!("trap: ".parse::<CrashReason>().is_err());
        assert!("sleepy".parse::<CrashReason>().is_err());
    }
}
