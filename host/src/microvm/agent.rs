//! The agent inside a micro-VM: PID 1 of the guest, the same runtime as the host's.
//!
//! The guest's initramfs holds this binary as `/init`, the kernel modules of the channel and
//! nothing else. At boot the agent mounts `/dev`, loads the modules, opens the virtio-serial
//! port and says [`Message::Ready`]. Then it serves its host: it compiles the component it is
//! sent, runs each invocation in a fresh store with the manifest's limits, and sends every
//! capability call back over the port into the host's bridge, which checks it exactly as it
//! checks an in-process instance's. The guest has no network device and no disk; the component
//! sees no files, sockets or environment, as on the host.
//!
//! Everything the agent does per call runs on one thread, an async runtime over the port opened
//! without blocking: under emulation every switch between threads costs tens of microseconds of
//! guest kernel time. Invocations interleave at their awaits (a capability call, an epoch tick),
//! as they do in a host's runtime. What follows an answer (dropping the invocation's store and
//! instantiating the next spare, most of a call's cost under emulation) runs on a second thread
//! when the guest has a second vCPU, so that the next call finds its spare ready instead of
//! waiting behind it; with one vCPU it runs on the agent's thread after the answer.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read as _, Write as _};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, BufReader, ReadBuf};
use tokio::sync::{mpsc, oneshot};
use trellis_schemas::Capability;
use trellis_schemas::capability::rpc::{CapabilityResponse, HttpResponseHead};
use trellis_schemas::dataplane::{DataError, ErrorCode};

use super::protocol::{Failure, Frame, MAX_FRAME, MAX_GUEST_FRAME, Message, RemoteError};
use crate::runtime::{
    BridgeFuture, CallContext, CapabilityBridge, CapabilityCall, CapabilityError, GuestOutput,
    InvokeError, LineSource, LinkCall, LinkError, LinkFuture, LoadedComponent, LogSink,
    MAX_LINE_BYTES, Runtime, RuntimeConfig, cut, json_to_val,
};

/// The guest's channel device: the first port of the virtio-serial device the host adds.
const PORT: &str = "/dev/vport0p1";

/// The kernel modules of the channel, in dependency order, as the image script puts them; a
/// driver the guest kernel has built in has no file, and is skipped.
const MODULES: &[&str] = &[
    "/lib/modules/virtio_ring.ko",
    "/lib/modules/virtio.ko",
    "/lib/modules/virtio_mmio.ko",
    "/lib/modules/virtio_console.ko",
];

/// Runs as the guest's PID 1: boots the channel, serves the host, and powers the VM off when
/// the host goes away or anything fails (the host sees the VM exit).
pub fn run_as_init() -> ! {
    let result = open_channel().and_then(|port| {
        let tokio = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        tokio.block_on(async {
            let reader = Port::new(port.try_clone()?)?;
            let writer = Port::new(port)?;
            serve(BufReader::with_capacity(1 << 16, reader), writer).await
        })
    });
    if let Err(e) = result {
        eprintln!("trellis micro-VM agent: {e}");
    }
    let _ = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    // Power-off returns only on failure; PID 1 must not exit.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Mounts `/dev` and `/proc`, loads the channel's modules and opens the port.
fn open_channel() -> io::Result<File> {
    use nix::mount::{MsFlags, mount};
    use std::os::unix::fs::OpenOptionsExt as _;
    let _ = std::fs::create_dir_all("/dev");
    mount(
        Some("devtmpfs"),
        "/dev",
        Some("devtmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| io::Error::other(format!("mounting /dev: {e}")))?;
    // The pooling allocator resets memory in place only where it finds the PAGEMAP_SCAN ioctl
    // of /proc/self/pagemap; nothing else reads /proc (guests have no filesystem access).
    let _ = std::fs::create_dir_all("/proc");
    if let Err(e) = mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    ) {
        eprintln!("trellis micro-VM agent: mounting /proc: {e} (memory is reset by faults)");
    }
    for module in MODULES {
        let file = match File::open(module) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io::Error::other(format!("opening {module}: {e}"))),
        };
        nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty())
            .map_err(|e| io::Error::other(format!("loading {module}: {e}")))?;
    }
    // The port appears once the driver has probed the device.
    for _ in 0..5000 {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(PORT)
        {
            Ok(port) => return Ok(port),
            // Not there yet, or there but not yet set up by the driver.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound
                    || e.raw_os_error() == Some(libc_enxio()) =>
            {
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(format!("{PORT} did not appear")))
}

/// `ENXIO`: the port's node exists but its device is not ready.
fn libc_enxio() -> i32 {
    nix::errno::Errno::ENXIO as i32
}

/// One descriptor of the channel's port, opened without blocking, read and written when the
/// runtime's reactor says it is ready.
///
/// Not a pipe, although it reads like one: each read returns at most one of the buffers the
/// host filled, so a read shorter than asked does not mean the port is drained (the buffers
/// after it raised their interrupt already). Readiness is cleared only when a read would
/// block, where a pipe's reader (tokio's included) also clears it after a short read and would
/// wait for an interrupt that never comes.
struct Port(AsyncFd<File>);

impl Port {
    fn new(file: File) -> io::Result<Self> {
        #[allow(unsafe_code, reason = "registering a descriptor with the reactor")]
        // SAFETY: the `AsyncFd` owns the `File`, so its descriptor stays open and is not
        // replaced while it is registered; it is deregistered before the file is closed.
        let registered = unsafe { AsyncFd::register(file) };
        registered.map(Self).map_err(io::Error::from)
    }
}

impl AsyncRead for Port {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut ready = ready!(self.0.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            if let Ok(read) = ready.try_io(|port| port.get_ref().read(unfilled)) {
                return Poll::Ready(read.map(|n| buf.advance(n)));
            }
        }
    }
}

impl AsyncWrite for Port {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut ready = ready!(self.0.poll_write_ready(cx))?;
            if let Ok(written) = ready.try_io(|port| port.get_ref().write(data)) {
                return Poll::Ready(written);
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Serves one host over a byte channel until it closes, on the calling task's runtime (a
/// current-thread one in the guest): invocations are tasks of that runtime.
///
/// # Errors
///
/// A channel that fails or carries a malformed frame.
pub async fn serve(
    mut reader: impl AsyncRead + Unpin,
    writer: impl AsyncWrite + Unpin + Send + 'static,
) -> io::Result<()> {
    // The runtime the component runs in. One with the host's default ceilings is made while
    // the guest waits for its component (in a warm pool that is idle time; under emulation
    // making it costs about as much as mapping the component): most components fit it.
    let mut runtime: Option<Runtime> = None;
    let mut ready_made = Some(std::thread::spawn(|| {
        Runtime::new(&ready_made_config()).ok()
    }));

    let (out, frames) = mpsc::unbounded_channel::<Frame>();
    tokio::spawn(write_frames(writer, frames));
    let pending: Pending = Arc::default();
    let next_id = Arc::new(AtomicU64::new(1));
    let send = |frame: Frame| {
        out.send(frame)
            .map_err(|_| io::Error::other("writer ended"))
    };
    send(Frame::new(
        0,
        Message::Ready {
            version: env!("CARGO_PKG_VERSION").to_owned(),
        },
        Bytes::new(),
    ))?;

    let tidier = Tidier::start();
    let mut component: Option<LoadedComponent> = None;
    // The component for one invocation: what the host granted at the call, and its trace.
    let for_call = |component: &LoadedComponent,
                    id: u64,
                    traceparent: Option<String>,
                    allowed: Vec<Capability>,
                    log: bool| {
        let sink: Option<Arc<dyn LogSink>> = log.then(|| {
            Arc::new(ChannelLog {
                out: out.clone(),
                id,
                lines: AtomicU64::new(0),
            }) as Arc<dyn LogSink>
        });
        component
            .with_call(CallContext {
                log: sink,
                traceparent: traceparent.map(Arc::from),
            })
            .with_bridge(bridge(&out, &pending, &next_id, allowed))
    };
    while let Some(frame) = Frame::read_async_within(&mut reader, MAX_FRAME).await? {
        let Frame { id, message, body } = frame;
        match message {
            Message::Load { manifest, compiled } => {
                let started = std::time::Instant::now();
                let split = usize::try_from(compiled)
                    .unwrap_or(usize::MAX)
                    .min(body.len());
                let (artifact, wasm) = body.split_at(split);
                let loaded = manifest
                    .to_manifest()
                    .map_err(|e| e.to_string())
                    .and_then(|m| {
                        let runtime = runtime.insert(runtime_for(&m, ready_made.take())?);
                        runtime
                            .load_precompiled(artifact, wasm, m)
                            .map_err(|e| e.to_string())
                    });
                let (error, note) = match loaded {
                    Ok((c, used)) => {
                        // The first invocation finds an instance ready, as every later one.
                        let (c, tidier) = (c.tidied_by_caller(), tidier.clone());
                        component = Some(c.clone());
                        tokio::spawn(async move { tidier.tidy(c).await });
                        (None, used.err())
                    }
                    Err(e) => (Some(e), None),
                };
                let precompiled = error.is_none() && note.is_none();
                let compile_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                send(Frame::new(
                    id,
                    Message::Loaded {
                        error,
                        compile_ms,
                        precompiled,
                        note,
                        reset_in_place: crate::runtime::pagemap_scan(),
                    },
                    Bytes::new(),
                ))?;
            }
            Message::Invoke {
                export,
                traceparent,
                allowed,
                log,
            } => {
                let Some(base) = &component else {
                    send(not_loaded(id))?;
                    continue;
                };
                let c = for_call(base, id, traceparent, allowed, log);
                answer(&out, &tidier, id, base, async move {
                    invoke(&c, &export, &body).await.map(|json| (None, json))
                });
            }
            Message::Http {
                head,
                traceparent,
                allowed,
                log,
            } => {
                let Some(base) = &component else {
                    send(not_loaded(id))?;
                    continue;
                };
                let c = for_call(base, id, traceparent, allowed, log);
                answer(&out, &tidier, id, base, async move {
                    c.handle_http(&head, body)
                        .await
                        .map(|(head, body)| (Some(head), body))
                        .map_err(|e| failure(&e))
                });
            }
            Message::CapabilityReply { .. } | Message::LinkReply { .. } => {
                let waiter = pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(Frame { id, message, body });
                }
            }
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("the host sent a guest's message: {other:?}"),
                ));
            }
        }
    }
    // The host is gone: whatever is still in flight has nobody to answer.
    Ok(())
}

/// Runs one invocation as a task of the agent's runtime (in the component's spare instance
/// when there is one), sends its end to the host, and then has the component tidied (its
/// store dropped, the next spare made).
fn answer<Fut>(
    out: &mpsc::UnboundedSender<Frame>,
    tidier: &Tidier,
    id: u64,
    component: &LoadedComponent,
    call: Fut,
) where
    Fut: Future<Output = Result<(Option<HttpResponseHead>, Bytes), Failure>> + Send + 'static,
{
    let (out, tidier, component) = (out.clone(), tidier.clone(), component.clone());
    tokio::spawn(async move {
        let done = call.await;
        let _ = out.send(done_frame(id, done));
        tidier.tidy(component).await;
    });
}

/// Where a component is tidied after an answer (see the module docs).
#[derive(Clone)]
enum Tidier {
    /// On the agent's thread, once the writer has sent the answer: the guest has one vCPU.
    Inline,
    /// On a thread of its own, which runs on the guest's other vCPU.
    Thread(mpsc::UnboundedSender<LoadedComponent>),
}

impl Tidier {
    /// A tidying thread when the guest has more than one vCPU, else tidying inline.
    fn start() -> Self {
        let vcpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        if vcpus < 2 {
            return Self::Inline;
        }
        let (send, mut components) = mpsc::unbounded_channel::<LoadedComponent>();
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(_) => return Self::Inline,
        };
        let spawned = std::thread::Builder::new()
            .name("tidier".into())
            .spawn(move || {
                runtime.block_on(async move {
                    while let Some(component) = components.recv().await {
                        component.tidy().await;
                    }
                });
            });
        match spawned {
            Ok(_) => Self::Thread(send),
            Err(_) => Self::Inline,
        }
    }

    /// Drops the component's ended stores and makes its next spare: here, after letting the
    /// writer's task send what is queued, or on the thread (then it returns at once).
    async fn tidy(&self, component: LoadedComponent) {
        let component = match self {
            Self::Inline => component,
            // A thread that is gone (it panicked) leaves the tidying here.
            Self::Thread(thread) => match thread.send(component) {
                Ok(()) => return,
                Err(mpsc::error::SendError(component)) => component,
            },
        };
        tokio::task::yield_now().await;
        component.tidy().await;
    }
}

/// A runtime sized for the one component this VM runs: a pool of slots for its concurrency
/// and its spare instance, each as large as its memory limit, so that an invocation reuses a
/// slot rather than mapping and faulting in fresh memory (page faults are dear under emulation).
///
/// The runtime made ahead (`ready_made`) serves instead when the component's limits fit its
/// ceilings and slots: each invocation is still held to the component's own limits by its store.
fn runtime_for(
    manifest: &crate::runtime::Manifest,
    ready_made: Option<std::thread::JoinHandle<Option<Runtime>>>,
) -> Result<Runtime, String> {
    let limits = manifest.limits;
    let ahead = ready_made_config();
    let fits = limits.max_memory <= ahead.max_memory
        && limits.fuel <= ahead.max_fuel
        && limits.timeout <= ahead.max_timeout
        && limits.max_concurrency < ahead.max_concurrency.min(ahead.pooling_instances);
    if fits && let Some(Ok(Some(runtime))) = ready_made.map(std::thread::JoinHandle::join) {
        return Ok(runtime);
    }
    let mut config = RuntimeConfig::new();
    config
        .max_memory(limits.max_memory)
        .max_fuel(limits.fuel)
        .max_timeout(limits.timeout)
        .max_concurrency(limits.max_concurrency)
        .pooling(true)
        // Twice its concurrency and the spare: the runtime makes a spare only while fewer than
        // half of the slots are in use.
        .pooling_instances(
            limits
                .max_concurrency
                .max(1)
                .saturating_add(1)
                .saturating_mul(2),
        )
        .spare_idle(Duration::MAX);
    Runtime::new(&config).map_err(|e| e.to_string())
}

/// Invocations in flight the runtime made ahead has slots for.
const READY_MADE_INSTANCES: u32 = 256;

/// The configuration of the runtime a guest makes before its component comes: the host's
/// default ceilings, and a pool of [`READY_MADE_INSTANCES`] slots.
fn ready_made_config() -> RuntimeConfig {
    let mut config = RuntimeConfig::new();
    config
        .pooling(true)
        .pooling_instances(READY_MADE_INSTANCES)
        // The VM serves this one component: its spare stays.
        .spare_idle(Duration::MAX);
    config
}

/// Writes the guest's frames to the host, as many as are queued before each flush. A frame
/// larger than the host takes ([`MAX_GUEST_FRAME`]) would end the channel: an invocation's end
/// is answered as an output too large instead (an HTTP response with huge headers, say),
/// anything else is dropped.
async fn write_frames(writer: impl AsyncWrite + Unpin, mut frames: mpsc::UnboundedReceiver<Frame>) {
    let mut writer = tokio::io::BufWriter::with_capacity(1 << 16, writer);
    while let Some(first) = frames.recv().await {
        let mut next = Some(first);
        while let Some(frame) = next {
            if let Some(bytes) = encode_for_host(&frame)
                && writer.write_all(&bytes).await.is_err()
            {
                return;
            }
            next = frames.try_recv().ok();
        }
        if writer.flush().await.is_err() {
            return;
        }
    }
}

/// A frame's bytes as the host takes them, or `None` for one that is dropped.
fn encode_for_host(frame: &Frame) -> Option<Vec<u8>> {
    match frame.encode_within(MAX_GUEST_FRAME) {
        Ok(bytes) => Some(bytes),
        Err(e) => match &frame.message {
            Message::Done { .. } => {
                let error = InvokeError::OutputTooLarge {
                    size: frame.body.len(),
                    limit: MAX_GUEST_FRAME,
                    output: GuestOutput::default(),
                };
                done_with(frame.id, failure(&error)).encode().ok()
            }
            _ => {
                eprintln!("trellis micro-VM agent: frame dropped: {e}");
                None
            }
        },
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Frame>>>>;

fn bridge(
    out: &mpsc::UnboundedSender<Frame>,
    pending: &Pending,
    next_id: &Arc<AtomicU64>,
    allowed: Vec<Capability>,
) -> Arc<dyn CapabilityBridge> {
    Arc::new(ChannelBridge {
        out: out.clone(),
        pending: Arc::clone(pending),
        next_id: Arc::clone(next_id),
        allowed,
    })
}

async fn invoke(component: &LoadedComponent, export: &str, args: &[u8]) -> Result<Bytes, Failure> {
    let args = if args.iter().all(u8::is_ascii_whitespace) {
        Value::Array(Vec::new())
    } else {
        serde_json::from_slice::<Value>(args).map_err(|e| Failure {
            reason: "invalid_request".into(),
            code: ErrorCode::InvalidRequest,
            crash: None,
            message: format!("the body must be a JSON array of arguments: {e}"),
        })?
    };
    let value = component
        .invoke(export, args)
        .await
        .map_err(|e| failure(&e))?;
    serde_json::to_vec(&value)
        .map(Bytes::from)
        .map_err(|e| Failure {
            reason: "host_error".into(),
            code: ErrorCode::Internal,
            crash: None,
            message: format!("cannot encode the result: {e}"),
        })
}

/// The failure of an invocation as its host reports it: the same reason, code and crash
/// description an in-process instance gives.
fn failure(error: &InvokeError) -> Failure {
    Failure {
        reason: error.reason(),
        code: error.code(),
        crash: error.crash_reason().map(|r| r.to_string()),
        message: error.detail(),
    }
}

/// The end of an invocation: the HTTP head if it was a request, and the body; or the failure.
fn done_frame(id: u64, done: Result<(Option<HttpResponseHead>, Bytes), Failure>) -> Frame {
    match done {
        Ok((http, body)) => Frame::new(id, Message::Done { http, error: None }, body),
        Err(failure) => done_with(id, failure),
    }
}

fn done_with(id: u64, failure: Failure) -> Frame {
    Frame::new(
        id,
        Message::Done {
            http: None,
            error: Some(failure),
        },
        Bytes::new(),
    )
}

fn not_loaded(id: u64) -> Frame {
    done_with(
        id,
        Failure {
            reason: "host_error".into(),
            code: ErrorCode::Internal,
            crash: None,
            message: "no component is loaded in this micro-VM".into(),
        },
    )
}

/// The most output lines one invocation sends its host; the host rate-limits what it keeps,
/// this bounds what crosses the channel.
const MAX_LINES: u64 = 10_000;

/// Sends an invocation's output lines to the host as they come.
struct ChannelLog {
    out: mpsc::UnboundedSender<Frame>,
    /// The invocation's id, as the host sent it.
    id: u64,
    lines: AtomicU64,
}

impl LogSink for ChannelLog {
    fn line(&self, source: LineSource<'_>, text: &str) {
        if self.lines.fetch_add(1, Ordering::Relaxed) >= MAX_LINES {
            return;
        }
        // The host keeps no more of a line than this; a longer one would only swell the frame.
        let (source, context) = match source {
            LineSource::Stdout => ("stdout".to_owned(), None),
            LineSource::Stderr => ("stderr".to_owned(), None),
            LineSource::Log { level, context } => (
                level.to_owned(),
                Some(cut(context, MAX_LINE_BYTES).to_owned()),
            ),
        };
        let message = Message::Log {
            source,
            context,
            text: cut(text, MAX_LINE_BYTES).to_owned(),
        };
        let _ = self.out.send(Frame::new(self.id, message, Bytes::new()));
    }
}

/// The guest side of the capability door: every call goes to the host as a frame and waits
/// for its answer. What is allowed is what the host said when it sent the invocation.
#[derive(Debug)]
struct ChannelBridge {
    out: mpsc::UnboundedSender<Frame>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    allowed: Vec<Capability>,
}

impl ChannelBridge {
    /// Sends a request of the guest and waits for the host's answer, at most `timeout`.
    async fn ask(&self, message: Message, body: Bytes, timeout: Duration) -> Option<Frame> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, tx);
        if self.out.send(Frame::new(id, message, body)).is_err() {
            return None;
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(frame)) => Some(frame),
            _ => {
                self.pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
                None
            }
        }
    }
}

impl CapabilityBridge for ChannelBridge {
    fn allows(&self, capability: Capability) -> bool {
        self.allowed.contains(&capability)
    }

    fn call(&self, call: CapabilityCall) -> BridgeFuture<'_> {
        Box::pin(async move {
            let capability = call.capability();
            // Refused here as the provider would, before the frame could exceed what the host
            // takes from a guest.
            call.request
                .check_size()
                .map_err(CapabilityError::from_remote)?;
            let encoded = call
                .request
                .encode()
                .map_err(|e| CapabilityError::Unavailable(e.to_string()))?;
            let message = Message::Capability {
                capability,
                http_head: encoded.http_head,
                timeout_ms: u64::try_from(call.timeout.as_millis()).unwrap_or(u64::MAX),
                traceparent: call.traceparent.as_deref().map(str::to_owned),
            };
            let unavailable = || CapabilityError::Unavailable("the host did not answer".into());
            let Some(Frame { message, body, .. }) =
                self.ask(message, encoded.body, call.timeout).await
            else {
                return Err(unavailable());
            };
            match message {
                Message::CapabilityReply {
                    error: Some(RemoteError { code, message }),
                    ..
                } => Err(CapabilityError::from_remote(DataError::new(code, message))),
                Message::CapabilityReply {
                    http_head,
                    error: None,
                } => CapabilityResponse::decode(capability, http_head.as_deref(), body)
                    .map_err(|e| CapabilityError::Unavailable(e.to_string())),
                _ => Err(unavailable()),
            }
        })
    }

    fn link(&self, call: LinkCall) -> LinkFuture<'_> {
        Box::pin(async move {
            // Bounded like a call over the data plane, so the frame stays within what the host
            // takes.
            let body = crate::runtime::encode_link_args(&call)?;
            let message = Message::Link {
                interface: call.interface.to_string(),
                function: call.function.to_string(),
                timeout_ms: u64::try_from(call.timeout.as_millis()).unwrap_or(u64::MAX),
                traceparent: call.traceparent.as_deref().map(str::to_owned),
            };
            let Some(Frame { message, body, .. }) = self.ask(message, body, call.timeout).await
            else {
                return Err(LinkError::Unavailable("the host did not answer".into()));
            };
            let bad = |what: &str| LinkError::Failed {
                code: ErrorCode::Internal,
                message: format!("the host answered a linked call with {what}"),
            };
            match message {
                Message::LinkReply {
                    error: Some(RemoteError { code, message }),
                } => Err(LinkError::from_remote(DataError::new(code, message))),
                Message::LinkReply { error: None } => {
                    let values: Vec<Value> =
                        serde_json::from_slice(&body).map_err(|_| bad("no JSON array"))?;
                    if values.len() != call.results.len() {
                        return Err(bad("another number of results"));
                    }
                    call.results
                        .iter()
                        .zip(&values)
                        .map(|(ty, v)| {
                            json_to_val(ty, v).map_err(|_| bad("a value of another type"))
                        })
                        .collect()
                }
                _ => Err(bad("another message")),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_frame_larger_than_the_host_takes_ends_the_invocation_not_the_channel() {
        let (out, frames) = mpsc::unbounded_channel::<Frame>();
        let huge = Bytes::from(vec![0u8; MAX_GUEST_FRAME + 1]);
        out.send(Frame::new(
            3,
            Message::Done {
                http: None,
                error: None,
            },
            huge.clone(),
        ))
        .unwrap();
        let log = Message::Log {
            source: "stdout".into(),
            context: None,
            text: String::new(),
        };
        out.send(Frame::new(4, log, huge)).unwrap();
        out.send(not_loaded(5)).unwrap();
        drop(out);
        let mut written = Vec::new();
        write_frames(&mut written, frames).await;
        let mut reader = written.as_slice();
        let first = Frame::read_from(&mut reader).unwrap().unwrap();
        assert_eq!(first.id, 3);
        let Message::Done {
            error: Some(failure),
            ..
        } = first.message
        else {
            panic!("not a failed end: {:?}", first.message);
        };
        assert_eq!(failure.reason, "output_too_large");
        // The oversized log line is dropped; the next frame goes through.
        let next = Frame::read_from(&mut reader).unwrap().unwrap();
        assert_eq!(next.id, 5);
        assert!(Frame::read_from(&mut reader).unwrap().is_none());
    }
}
