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
use crate::runtime::{CapabilityBridge, CapabilityCall, CapabilityError, InvokeError};

/// How long a guest may take to boot and say it is ready, and then to compile its component.
const BOOT_TIMEOUT: Duration = Duration::from_secs(90);
const LOAD_TIMEOUT: Duration = Duration::from_secs(300);

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
    next_id: AtomicU64,
    ended: watch::Sender<Option<VmEnd>>,
    kill: Mutex<Option<oneshot::Sender<VmEnd>>>,
    bridge: Arc<dyn CapabilityBridge>,
    /// Added to an invocation's timeout before the host gives up on the VM.
    margin: Duration,
    /// How long the boot took, until the agent was ready.
    pub booted_in: Duration,
    /// How long compiling the component took inside the VM.
    pub compile_ms: u64,
    dir: PathBuf,
}

impl Vm {
    /// Boots a VM, loads `wasm` into it and returns it serving.
    pub async fn boot(
        config: &MicrovmConfig,
        wasm: Bytes,
        manifest: &ManifestDoc,
        bridge: Arc<dyn CapabilityBridge>,
    ) -> Result<Arc<Vm>, String> {
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
        let memory_mib = config.memory_for(manifest.max_memory_bytes);
        let started = Instant::now();
        let mut command = tokio::process::Command::new(&config.qemu);
        command
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
        let (mut reader, mut writer) = stream.into_split();
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
        let booted_in = started.elapsed();
        let load = Frame::new(
            0,
            Message::Load {
                manifest: manifest.clone(),
            },
            wasm,
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
        let compile_ms = match loaded {
            Ok(Ok(Some(Frame {
                message:
                    Message::Loaded {
                        error: None,
                        compile_ms,
                    },
                ..
            }))) => compile_ms,
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
            next_id: AtomicU64::new(1),
            ended,
            kill: Mutex::new(Some(kill)),
            bridge,
            margin: config.margin(),
            booted_in,
            compile_ms,
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
        traceparent: Option<&str>,
        timeout: Duration,
    ) -> Result<Bytes, InvokeError> {
        let message = Message::Invoke {
            export: export.to_owned(),
            traceparent: traceparent.map(str::to_owned),
            allowed: self.allowed(),
        };
        let frame = self.request(message, args, timeout).await?;
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
        traceparent: Option<&str>,
        timeout: Duration,
    ) -> Result<(HttpResponseHead, Bytes), InvokeError> {
        let message = Message::Http {
            head: request.head,
            traceparent: traceparent.map(str::to_owned),
            allowed: self.allowed(),
        };
        let frame = self.request(message, request.body, timeout).await?;
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
