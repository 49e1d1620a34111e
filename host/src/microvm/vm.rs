//! One micro-VM on the host's side: the QEMU process, the channel to its agent, and the calls
//! in flight over it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::AsyncWriteExt as _;
use tokio::net::UnixListener;
use tokio::sync::{mpsc, oneshot, watch};
use trellis_schemas::Capability;
use trellis_schemas::capability::rpc::{
    CapabilityRequest, HttpMessage, HttpRequestHead, HttpResponseHead,
};
use trellis_schemas::dataplane::{CrashReason, ErrorCode};
use trellis_schemas::instance::ManifestDoc;

use super::MicrovmConfig;
use super::protocol::{Failure, Frame, Message, RemoteError};
use crate::runtime::{
    Budget, CapabilityBridge, CapabilityCall, CapabilityError, InvokeError, LineSource, LinkCall,
    LinkError, LoadedComponent, LogSink, json_to_val, val_to_json,
};

/// How long a guest may take to boot and say it is ready, and then to compile its component.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
const LOAD_TIMEOUT: Duration = Duration::from_secs(300);

/// One invocation's context on its way into a VM.
pub(crate) struct VmCall<'a> {
    /// The W3C trace context of the call.
    pub traceparent: Option<&'a str>,
    /// The component's timeout: the host waits that plus the VM's margin.
    pub timeout: Duration,
    /// Where the invocation's output lines go, if anywhere.
    pub log: Option<Arc<dyn LogSink>>,
}

/// Routes the output lines of one invocation in flight to its sink until dropped.
struct Output<'a> {
    vm: &'a Vm,
    id: u64,
    sink: Arc<dyn LogSink>,
}

impl<'a> Output<'a> {
    fn new(vm: &'a Vm, id: u64, sink: Arc<dyn LogSink>) -> Self {
        vm.sinks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, Arc::clone(&sink));
        Self { vm, id, sink }
    }
}

impl Drop for Output<'_> {
    fn drop(&mut self) {
        self.vm
            .sinks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.id);
        self.sink.finish();
    }
}

/// What a VM is sent to run: the `.wasm` and, when the host has it, its compiled artifact.
#[derive(Debug, Clone)]
pub(crate) struct Code {
    /// The component.
    pub wasm: Bytes,
    /// The host's compiled artifact of it (empty when there is none).
    pub compiled: Bytes,
}

/// Why a VM ended.
#[derive(Debug, Clone)]
pub(crate) struct VmEnd {
    /// `vm_exit` or `vm_timeout`.
    pub crash: CrashReason,
    /// What happened, with the tail of the guest's console when there is one.
    pub message: String,
}

impl VmEnd {
    /// The error the calls it ended fail with.
    pub fn error(&self) -> InvokeError {
        InvokeError::Microvm {
            reason: self.crash.to_string(),
            code: self.crash.error_code(),
            crash: Some(self.crash.clone()),
            message: self.message.clone(),
        }
    }
}

/// A running micro-VM with its component loaded.
#[derive(Debug)]
pub(crate) struct Vm {
    out: mpsc::UnboundedSender<Vec<u8>>,
    pending: Mutex<HashMap<u64, oneshot::Sender<Frame>>>,
    /// Where the output of each invocation in flight goes, by its id.
    sinks: Mutex<HashMap<u64, Arc<dyn LogSink>>>,
    next_id: AtomicU64,
    ended: watch::Sender<Option<VmEnd>>,
    kill: Mutex<Option<oneshot::Sender<VmEnd>>>,
    bridge: Arc<dyn CapabilityBridge>,
    /// The component as the host loaded it: the types of its linked imports.
    component: LoadedComponent,
    /// Added to an invocation's timeout before the host gives up on the VM.
    margin: Duration,
    /// How long the boot took, until the agent was ready.
    pub booted_in: Duration,
    /// How long loading the component took inside the VM.
    pub compile_ms: u64,
    /// Whether the VM mapped the host's compiled code (else it compiled the `.wasm`).
    pub precompiled: bool,
    /// Whether the guest resets an instance's memory in place between calls (its kernel has
    /// PAGEMAP_SCAN) rather than faulting it in afresh.
    pub reset_in_place: bool,
    dir: PathBuf,
}

/// A guest booted to its agent's `Ready`, with no component yet (kept warm in a pool, or
/// about to be loaded).
#[derive(Debug)]
pub(crate) struct Booted {
    child: tokio::process::Child,
    reader: tokio::net::unix::OwnedReadHalf,
    writer: tokio::net::unix::OwnedWriteHalf,
    dir: DirGuard,
    /// Its memory, in MiB.
    pub memory_mib: u64,
    /// How long it took to boot.
    pub booted_in: Duration,
}

impl Vm {
    /// Boots a VM, loads the component into it and returns it serving.
    pub async fn boot(
        config: &MicrovmConfig,
        name: &str,
        code: &Code,
        manifest: &ManifestDoc,
        bridge: Arc<dyn CapabilityBridge>,
        component: LoadedComponent,
    ) -> Result<Arc<Vm>, String> {
        let memory_mib = config.memory_for(manifest.max_memory_bytes);
        let booted = Vm::start_guest(config, name, memory_mib).await?;
        Vm::load(config, booted, code, manifest, bridge, component).await
    }

    /// Boots a guest with `memory_mib` of memory, up to its agent's `Ready`.
    pub async fn start_guest(
        config: &MicrovmConfig,
        name: &str,
        memory_mib: u64,
    ) -> Result<Booted, String> {
        let dir = std::env::temp_dir().join(format!(
            "trellis-vm-{}-{}",
            std::process::id(),
            NEXT_VM.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let cleanup = DirGuard(Some(dir.clone()));
        let socket = dir.join("channel.sock");
        let listener = UnixListener::bind(&socket)
            .map_err(|e| format!("binding {}: {e}", socket.display()))?;
        let started = Instant::now();
        let mut command = tokio::process::Command::new(&config.qemu);
        command
            .args(["-name", &format!("trellis-vm-{name}")])
            .args(config.qemu_args(&dir, &socket, memory_mib))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(dir.join("qemu.log"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            )
            .kill_on_drop(true);
        // The VM must not outlive a host that is killed outright (QEMU stops on SIGTERM).
        let mut child = trellis_bus::spawn_tied(command)
            .await
            .map_err(|e| format!("starting {}: {e}", config.qemu.display()))?;

        let accepted = tokio::select! {
            accepted = tokio::time::timeout(BOOT_TIMEOUT, listener.accept()) => accepted,
            status = child.wait() => {
                return Err(format!(
                    "QEMU exited at start ({}): {}",
                    status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                    tail(&dir.join("qemu.log"))
                ));
            }
        };
        let (stream, _) = accepted
            .map_err(|_| "QEMU did not connect the channel".to_owned())?
            .map_err(|e| format!("accepting the channel: {e}"))?;
        let (mut reader, writer) = stream.into_split();
        let dead = |what: &str| format!("{what}; console: {}", tail(&dir.join("console.log")));
        let ready = tokio::select! {
            frame = tokio::time::timeout(BOOT_TIMEOUT, Frame::read_async(&mut reader)) => frame,
            status = child.wait() => {
                return Err(dead(&format!("the VM exited while booting ({})", status.map(|s| s.to_string()).unwrap_or_default())));
            }
        };
        match ready {
            Ok(Ok(Some(Frame {
                message: Message::Ready { .. },
                ..
            }))) => {}
            Ok(Ok(other)) => return Err(dead(&format!("the agent did not say ready: {other:?}"))),
            Ok(Err(e)) => return Err(dead(&format!("the channel failed while booting: {e}"))),
            Err(_) => {
                return Err(dead(&format!(
                    "the VM did not boot within {BOOT_TIMEOUT:?}"
                )));
            }
        }
        Ok(Booted {
            child,
            reader,
            writer,
            dir: cleanup,
            memory_mib,
            booted_in: started.elapsed(),
        })
    }

    /// Loads the component into a booted guest and returns the VM serving.
    pub async fn load(
        config: &MicrovmConfig,
        booted: Booted,
        code: &Code,
        manifest: &ManifestDoc,
        bridge: Arc<dyn CapabilityBridge>,
        component: LoadedComponent,
    ) -> Result<Arc<Vm>, String> {
        let Booted {
            mut child,
            mut reader,
            mut writer,
            dir: cleanup,
            booted_in,
            ..
        } = booted;
        let dir = cleanup.0.clone().unwrap_or_default();
        let dead = |what: &str| format!("{what}; console: {}", tail(&dir.join("console.log")));
        let load = Frame::new(
            0,
            Message::Load {
                manifest: manifest.clone(),
                compiled: code.compiled.len() as u64,
            },
            [&code.compiled[..], &code.wasm[..]].concat(),
        )
        .encode()
        .map_err(|e| e.to_string())?;
        writer
            .write_all(&load)
            .await
            .map_err(|e| dead(&format!("sending the component: {e}")))?;
        let loaded = tokio::select! {
            frame = tokio::time::timeout(LOAD_TIMEOUT, Frame::read_async(&mut reader)) => frame,
            status = child.wait() => {
                return Err(dead(&format!("the VM exited while loading ({})", status.map(|s| s.to_string()).unwrap_or_default())));
            }
        };
        let (compile_ms, precompiled, reset_in_place) = match loaded {
            Ok(Ok(Some(Frame {
                message:
                    Message::Loaded {
                        error: None,
                        compile_ms,
                        precompiled,
                        note,
                        reset_in_place,
                    },
                ..
            }))) => {
                if let Some(note) = note {
                    tracing::info!(%note, "the micro-VM compiled the component itself");
                }
                (compile_ms, precompiled, reset_in_place)
            }
            Ok(Ok(Some(Frame {
                message: Message::Loaded { error: Some(e), .. },
                ..
            }))) => return Err(format!("the micro-VM refused the component: {e}")),
            Ok(Ok(other)) => return Err(dead(&format!("the agent did not load: {other:?}"))),
            Ok(Err(e)) => return Err(dead(&format!("the channel failed while loading: {e}"))),
            Err(_) => return Err(dead(&format!("loading took more than {LOAD_TIMEOUT:?}"))),
        };

        let (out, mut outgoing) = mpsc::unbounded_channel::<Vec<u8>>();
        let (ended, _) = watch::channel(None);
        let (kill, killed) = oneshot::channel::<VmEnd>();
        let vm = Arc::new(Vm {
            out,
            pending: Mutex::default(),
            sinks: Mutex::default(),
            next_id: AtomicU64::new(1),
            ended,
            kill: Mutex::new(Some(kill)),
            bridge,
            component,
            margin: config.margin(),
            booted_in,
            compile_ms,
            precompiled,
            reset_in_place,
            dir: cleanup.keep(),
        });
        tokio::spawn(async move {
            while let Some(bytes) = outgoing.recv().await {
                if writer.write_all(&bytes).await.is_err() {
                    return;
                }
            }
        });
        // The supervisor: the VM ends when QEMU exits, when the host kills it, or when the
        // channel breaks; every call in flight then fails with the reason.
        let weak = Arc::downgrade(&vm);
        let console = vm.dir.join("console.log");
        tokio::spawn(async move {
            let reading = read_frames(weak.clone(), reader);
            let end = tokio::select! {
                status = child.wait() => VmEnd {
                    crash: CrashReason::VmExit,
                    message: format!(
                        "the micro-VM exited ({}); console: {}",
                        status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                        tail(&console)
                    ),
                },
                killed = killed => {
                    let _ = child.kill().await;
                    killed.unwrap_or(VmEnd {
                        crash: CrashReason::VmExit,
                        message: "the micro-VM was stopped".to_owned(),
                    })
                }
                why = reading => {
                    let _ = child.kill().await;
                    VmEnd {
                        crash: CrashReason::VmExit,
                        message: format!("the micro-VM's channel ended ({why}); console: {}", tail(&console)),
                    }
                }
            };
            if let Some(vm) = weak.upgrade() {
                vm.finish(end);
            }
        });
        Ok(vm)
    }

    /// Whether the VM still serves.
    pub fn alive(&self) -> bool {
        self.ended.borrow().is_none()
    }

    /// Tells when the VM ends, and why; closed when the VM is dropped.
    pub fn subscribe(&self) -> watch::Receiver<Option<VmEnd>> {
        self.ended.subscribe()
    }

    /// Records the end and fails every call in flight with it.
    fn finish(&self, end: VmEnd) {
        self.ended.send_if_modified(|e| {
            if e.is_some() {
                return false;
            }
            *e = Some(end);
            true
        });
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Kills the VM: calls in flight fail with `end`.
    pub fn kill(&self, end: VmEnd) {
        let kill = self
            .kill
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match kill {
            Some(kill) => {
                // The supervisor records it once QEMU is gone.
                let _ = kill.send(end.clone());
                self.finish(end);
            }
            None => self.finish(end),
        }
    }

    fn end_error(&self) -> InvokeError {
        self.ended
            .borrow()
            .clone()
            .unwrap_or(VmEnd {
                crash: CrashReason::VmExit,
                message: "the micro-VM ended".into(),
            })
            .error()
    }

    /// What the host's bridge grants right now: the guest checks against it.
    fn allowed(&self) -> Vec<Capability> {
        Capability::ALL
            .iter()
            .copied()
            .filter(|c| self.bridge.allows(*c))
            .collect()
    }

    /// Sends a request and waits for its answer, at most `timeout` plus the VM's margin; past
    /// that the VM is killed (`vm_timeout`).
    async fn request(
        &self,
        message: Message,
        body: Bytes,
        timeout: Duration,
        log: Option<Arc<dyn LogSink>>,
    ) -> Result<Frame, InvokeError> {
        if !self.alive() {
            return Err(self.end_error());
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let bytes = Frame::new(id, message, body)
            .encode()
            .map_err(|e| InvokeError::Microvm {
                reason: "payload_too_large".into(),
                code: ErrorCode::PayloadTooLarge,
                crash: None,
                message: e.to_string(),
            })?;
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, tx);
        let _output = log.map(|sink| Output::new(self, id, sink));
        if self.out.send(bytes).is_err() {
            return Err(self.end_error());
        }
        let deadline = timeout + self.margin;
        match tokio::time::timeout(deadline, rx).await {
            Ok(Ok(frame)) => Ok(frame),
            Ok(Err(_)) => Err(self.end_error()),
            Err(_) => {
                let end = VmEnd {
                    crash: CrashReason::VmTimeout,
                    message: format!(
                        "the micro-VM did not answer within {deadline:?} (the invocation's timeout plus {:?}); it was killed",
                        self.margin
                    ),
                };
                self.kill(end.clone());
                Err(end.error())
            }
        }
    }

    /// Calls `export` with the JSON arguments `args`; returns the JSON result.
    pub async fn invoke(
        &self,
        export: &str,
        args: Bytes,
        call: VmCall<'_>,
    ) -> Result<Bytes, InvokeError> {
        let message = Message::Invoke {
            export: export.to_owned(),
            traceparent: call.traceparent.map(str::to_owned),
            allowed: self.allowed(),
            log: call.log.is_some(),
        };
        let frame = self.request(message, args, call.timeout, call.log).await?;
        match frame.message {
            Message::Done { error: None, .. } => Ok(frame.body),
            Message::Done {
                error: Some(failure),
                ..
            } => Err(failed(failure)),
            other => Err(protocol(&other)),
        }
    }

    /// Serves an HTTP request.
    pub async fn http(
        &self,
        request: HttpMessage<HttpRequestHead>,
        call: VmCall<'_>,
    ) -> Result<(HttpResponseHead, Bytes), InvokeError> {
        let message = Message::Http {
            head: request.head,
            traceparent: call.traceparent.map(str::to_owned),
            allowed: self.allowed(),
            log: call.log.is_some(),
        };
        let frame = self
            .request(message, request.body, call.timeout, call.log)
            .await?;
        match frame.message {
            Message::Done {
                http: Some(head),
                error: None,
            } => Ok((head, frame.body)),
            Message::Done {
                error: Some(failure),
                ..
            } => Err(failed(failure)),
            other => Err(protocol(&other)),
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(kill) = self
            .kill
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = kill.send(VmEnd {
                crash: CrashReason::VmExit,
                message: "the micro-VM was stopped".into(),
            });
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static NEXT_VM: AtomicU64 = AtomicU64::new(0);

/// Removes a VM's directory unless it was kept.
#[derive(Debug)]
struct DirGuard(Option<PathBuf>);

impl DirGuard {
    fn keep(mut self) -> PathBuf {
        self.0.take().unwrap_or_default()
    }
}

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// Reads the guest's frames until the channel ends: answers go to their waiting calls,
/// capability calls to the bridge. Returns why it stopped.
async fn read_frames(
    vm: std::sync::Weak<Vm>,
    mut reader: tokio::net::unix::OwnedReadHalf,
) -> String {
    loop {
        let frame = match Frame::read_async(&mut reader).await {
            Ok(Some(frame)) => frame,
            Ok(None) => return "closed".to_owned(),
            Err(e) => return e.to_string(),
        };
        let Some(vm) = vm.upgrade() else {
            return "the instance is gone".to_owned();
        };
        match frame.message {
            Message::Done { .. } => {
                let waiter = vm
                    .pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&frame.id);
                if let Some(waiter) = waiter {
                    let _ = waiter.send(frame);
                }
            }
            Message::Capability {
                capability,
                http_head,
                timeout_ms,
                traceparent,
            } => {
                let id = frame.id;
                let body = frame.body;
                tokio::spawn(async move {
                    let reply = capability_call(
                        &*vm.bridge,
                        capability,
                        http_head.as_deref(),
                        body,
                        Duration::from_millis(timeout_ms).min(Duration::from_secs(300)),
                        traceparent,
                    )
                    .await;
                    let frame = match reply {
                        Ok((http_head, body)) => Frame::new(
                            id,
                            Message::CapabilityReply {
                                http_head,
                                error: None,
                            },
                            body,
                        ),
                        Err(error) => Frame::new(
                            id,
                            Message::CapabilityReply {
                                http_head: None,
                                error: Some(error),
                            },
                            Bytes::new(),
                        ),
                    };
                    if let Ok(bytes) = frame.encode() {
                        let _ = vm.out.send(bytes);
                    }
                });
            }
            Message::Log {
                source,
                context,
                text,
            } => {
                let sink = vm
                    .sinks
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .get(&frame.id)
                    .cloned();
                if let Some(sink) = sink {
                    let source = match source.as_str() {
                        "stdout" => LineSource::Stdout,
                        "stderr" => LineSource::Stderr,
                        level => LineSource::Log {
                            level: log_level(level),
                            context: context.as_deref().unwrap_or(""),
                        },
                    };
                    sink.line(source, &text);
                }
            }
            Message::Link {
                interface,
                function,
                timeout_ms,
                traceparent,
            } => {
                let (id, body) = (frame.id, frame.body);
                tokio::spawn(async move {
                    let timeout = Duration::from_millis(timeout_ms).min(Duration::from_secs(300));
                    let (error, body) =
                        match linked_call(&vm, &interface, &function, &body, timeout, traceparent)
                            .await
                        {
                            Ok(results) => (None, results),
                            Err(error) => (Some(error), Vec::new()),
                        };
                    let frame = Frame::new(id, Message::LinkReply { error }, body);
                    if let Ok(bytes) = frame.encode() {
                        let _ = vm.out.send(bytes);
                    }
                });
            }
            other => return format!("the guest sent a host's message: {other:?}"),
        }
    }
}

/// One capability call of the guest, through the same bridge an in-process instance uses.
async fn capability_call(
    bridge: &dyn CapabilityBridge,
    capability: Capability,
    http_head: Option<&str>,
    body: Bytes,
    timeout: Duration,
    traceparent: Option<String>,
) -> Result<(Option<String>, Bytes), RemoteError> {
    let request =
        CapabilityRequest::decode(capability, http_head, body).map_err(|e| RemoteError {
            code: ErrorCode::InvalidRequest,
            message: format!("a malformed capability call from the micro-VM: {e}"),
        })?;
    let response = bridge
        .call(CapabilityCall {
            request,
            timeout,
            traceparent: traceparent.map(Arc::from),
        })
        .await
        .map_err(|e| {
            let (code, message) = match e {
                CapabilityError::Denied(m) => (ErrorCode::AccessDenied, m),
                CapabilityError::NoSuchStore(m) => (ErrorCode::NoSuchStore, m),
                CapabilityError::Unavailable(m) => (ErrorCode::Unavailable, m),
                CapabilityError::Remote { code, message } => (code, message),
            };
            RemoteError { code, message }
        })?;
    let encoded = response.encode().map_err(|e| RemoteError {
        code: ErrorCode::Internal,
        message: e.to_string(),
    })?;
    Ok((encoded.http_head, encoded.body))
}

/// One linked call of the guest, through the bridge an in-process instance uses: arguments and
/// results cross the channel as JSON, typed by the host's copy of the component.
async fn linked_call(
    vm: &Vm,
    interface: &str,
    function: &str,
    args: &[u8],
    timeout: Duration,
    traceparent: Option<String>,
) -> Result<Vec<u8>, RemoteError> {
    let invalid = |message: String| RemoteError {
        code: ErrorCode::InvalidArguments,
        message,
    };
    let (params, results) = vm
        .component
        .import_types(interface, function)
        .ok_or_else(|| {
            invalid(format!(
                "the component imports no function {interface}#{function}"
            ))
        })?;
    let args: Vec<serde_json::Value> = serde_json::from_slice(args).map_err(|e| {
        invalid(format!(
            "the arguments of a linked call are not a JSON array: {e}"
        ))
    })?;
    if args.len() != params.len() {
        return Err(invalid(format!(
            "{interface}#{function} takes {} arguments, not {}",
            params.len(),
            args.len()
        )));
    }
    let params = params
        .iter()
        .zip(&args)
        .map(|(ty, v)| json_to_val(ty, v).map_err(|e| invalid(e.to_string())))
        .collect::<Result<Vec<_>, _>>()?;
    let values = vm
        .bridge
        .link(LinkCall {
            interface: Arc::from(interface),
            function: Arc::from(function),
            params,
            results,
            timeout,
            traceparent: traceparent.map(Arc::from),
        })
        .await
        .map_err(|e| {
            let code = e.code();
            let message = match e {
                LinkError::Denied(m) | LinkError::Unavailable(m) => m,
                LinkError::Failed { message, .. } => message,
            };
            RemoteError { code, message }
        })?;
    let mut budget = Budget::new(usize::MAX);
    let values = values
        .iter()
        .map(|v| val_to_json(v, &mut budget))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| RemoteError {
            code: ErrorCode::UnsupportedResult,
            message: "a result holds a value that cannot cross a link".into(),
        })?;
    serde_json::to_vec(&values).map_err(|e| RemoteError {
        code: ErrorCode::Internal,
        message: e.to_string(),
    })
}

/// A `wasi:logging` level as the runtime names it (anything else reads as `info`).
fn log_level(level: &str) -> &'static str {
    ["trace", "debug", "info", "warn", "error", "critical"]
        .into_iter()
        .find(|l| *l == level)
        .unwrap_or("info")
}

fn failed(failure: Failure) -> InvokeError {
    InvokeError::Microvm {
        crash: failure.crash.as_deref().and_then(|c| c.parse().ok()),
        reason: failure.reason,
        code: failure.code,
        message: failure.message,
    }
}

fn protocol(message: &Message) -> InvokeError {
    InvokeError::Microvm {
        reason: "host_error".into(),
        code: ErrorCode::Internal,
        crash: None,
        message: format!("the micro-VM answered out of turn: {message:?}"),
    }
}

/// The last 2 KiB of a log file, on one line.
fn tail(path: &Path) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let start = text.len().saturating_sub(2048);
    String::from_utf8_lossy(&text[start..])
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}
