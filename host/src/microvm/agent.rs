//! The agent inside a micro-VM: PID 1 of the guest, the same runtime as the host's.
//!
//! The guest's initramfs holds this binary as `/init`, the kernel modules of the channel and
//! nothing else. At boot the agent mounts `/dev`, loads the modules, opens the virtio-serial
//! port and says [`Message::Ready`]. Then it serves its host: it compiles the component it is
//! sent, runs each invocation in a fresh store with the manifest's limits, and sends every
//! capability call back over the port into the host's bridge, which checks it exactly as it
//! checks an in-process instance's. The guest has no network device and no disk; the component
//! sees no files, sockets or environment, as on the host.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, mpsc};
use std::time::Duration;

use bytes::Bytes;
use serde_json::Value;
use tokio::sync::oneshot;
use trellis_schemas::Capability;
use trellis_schemas::capability::rpc::CapabilityResponse;
use trellis_schemas::dataplane::{DataError, ErrorCode};

use super::protocol::{Failure, Frame, Message, RemoteError};
use crate::runtime::{
    BridgeFuture, CapabilityBridge, CapabilityCall, CapabilityError, InvokeError, LoadedComponent,
    Runtime, RuntimeConfig,
};

/// The guest's channel device: the first port of the virtio-serial device the host adds.
const PORT: &str = "/dev/vport0p1";

/// The kernel modules of the channel, in dependency order, as the image script puts them.
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
        let reader = port.try_clone()?;
        serve(BufReader::with_capacity(1 << 16, reader), port)
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

/// Mounts `/dev`, loads the channel's modules and opens the port.
fn open_channel() -> io::Result<File> {
    use nix::mount::{MsFlags, mount};
    let _ = std::fs::create_dir_all("/dev");
    mount(
        Some("devtmpfs"),
        "/dev",
        Some("devtmpfs"),
        MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| io::Error::other(format!("mounting /dev: {e}")))?;
    for module in MODULES {
        let file = File::open(module)?;
        nix::kmod::finit_module(&file, c"", nix::kmod::ModuleInitFlags::empty())
            .map_err(|e| io::Error::other(format!("loading {module}: {e}")))?;
    }
    // The port appears once the driver has probed the device.
    for _ in 0..5000 {
        match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
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

/// Serves one host over a byte channel until it closes. Also used over a socket in tests.
///
/// # Errors
///
/// A channel that fails or carries a malformed frame, or a runtime that cannot be built.
pub fn serve(mut reader: impl Read, writer: impl Write + Send + 'static) -> io::Result<()> {
    let tokio = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let mut config = RuntimeConfig::new();
    // No pooling inside the VM: its memory is the instance's alone, and reserving slots for a
    // thousand instances would only cost page tables.
    config.pooling(false);
    let runtime = Runtime::new(&config).map_err(io::Error::other)?;

    let (out, frames) = mpsc::channel::<Frame>();
    let writer = std::thread::spawn(move || write_frames(writer, frames));
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

    let mut component: Option<LoadedComponent> = None;
    while let Some(frame) = Frame::read_from(&mut reader)? {
        let Frame { id, message, body } = frame;
        match message {
            Message::Load { manifest } => {
                let started = std::time::Instant::now();
                let loaded = manifest
                    .to_manifest()
                    .map_err(|e| e.to_string())
                    .and_then(|m| runtime.load(&body, m).map_err(|e| e.to_string()));
                let error = match loaded {
                    Ok(c) => {
                        component = Some(c);
                        None
                    }
                    Err(e) => Some(e),
                };
                let compile_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                send(Frame::new(
                    id,
                    Message::Loaded { error, compile_ms },
                    Bytes::new(),
                ))?;
            }
            Message::Invoke {
                export,
                traceparent: _,
                allowed,
            } => {
                let Some(c) = &component else {
                    send(not_loaded(id))?;
                    continue;
                };
                let c = c.with_bridge(bridge(&out, &pending, &next_id, allowed));
                let out = out.clone();
                tokio.spawn(async move {
                    let frame = match invoke(&c, &export, &body).await {
                        Ok(result) => Frame::new(
                            id,
                            Message::Done {
                                http: None,
                                error: None,
                            },
                            result,
                        ),
                        Err(failure) => done_with(id, failure),
                    };
                    let _ = out.send(frame);
                });
            }
            Message::Http {
                head,
                traceparent: _,
                allowed,
            } => {
                let Some(c) = &component else {
                    send(not_loaded(id))?;
                    continue;
                };
                let c = c.with_bridge(bridge(&out, &pending, &next_id, allowed));
                let out = out.clone();
                tokio.spawn(async move {
                    let frame = match c.handle_http(&head, body).await {
                        Ok((head, body)) => Frame::new(
                            id,
                            Message::Done {
                                http: Some(head),
                                error: None,
                            },
                            body,
                        ),
                        Err(error) => done_with(id, failure(&error)),
                    };
                    let _ = out.send(frame);
                });
            }
            Message::CapabilityReply { .. } => {
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
    drop(out);
    let _ = writer.join();
    Ok(())
}

fn write_frames(writer: impl Write, frames: mpsc::Receiver<Frame>) {
    let mut writer = BufWriter::with_capacity(1 << 16, writer);
    while let Ok(frame) = frames.recv() {
        if frame.write_to(&mut writer).is_err() {
            return;
        }
    }
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Frame>>>>;

fn bridge(
    out: &mpsc::Sender<Frame>,
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

/// The guest side of the capability door: every call goes to the host as a frame and waits
/// for its answer. What is allowed is what the host said when it sent the invocation.
#[derive(Debug)]
struct ChannelBridge {
    out: mpsc::Sender<Frame>,
    pending: Pending,
    next_id: Arc<AtomicU64>,
    allowed: Vec<Capability>,
}

impl CapabilityBridge for ChannelBridge {
    fn allows(&self, capability: Capability) -> bool {
        self.allowed.contains(&capability)
    }

    fn call(&self, call: CapabilityCall) -> BridgeFuture<'_> {
        Box::pin(async move {
            let capability = call.capability();
            let encoded = call
                .request
                .encode()
                .map_err(|e| CapabilityError::Unavailable(e.to_string()))?;
            // The guest's own ids: answers to the host's requests travel as other kinds.
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            let (tx, rx) = oneshot::channel();
            self.pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(id, tx);
            let frame = Frame::new(
                id,
                Message::Capability {
                    capability,
                    http_head: encoded.http_head,
                    timeout_ms: u64::try_from(call.timeout.as_millis()).unwrap_or(u64::MAX),
                    traceparent: call.traceparent.as_deref().map(str::to_owned),
                },
                encoded.body,
            );
            let unavailable = || CapabilityError::Unavailable("the host did not answer".into());
            self.out.send(frame).map_err(|_| unavailable())?;
            let answered = tokio::time::timeout(call.timeout, rx).await;
            let Ok(Ok(Frame { message, body, .. })) = answered else {
                self.pending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&id);
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
}
