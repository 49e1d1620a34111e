//! The channel between a host and the agent in one of its micro-VMs.
//!
//! One virtio-serial port carries every message both ways. A frame is
//! `[len: u32 LE][kind: u8][id: u64 LE][head_len: u32 LE][head: JSON][body: bytes]`, where `len`
//! counts everything after itself. The head is small and typed ([`Message`]); bulk data (the
//! component's code, arguments and results, HTTP bodies, capability payloads in their NATS
//! encoding) travels raw in the body, never base64'd or re-encoded.
//!
//! Requests of the host (load, invoke, HTTP) and of the guest (capability calls) carry ids the
//! sender picks; the answer carries the same id. Both sides check every frame: a frame larger
//! than its reader takes ([`MAX_FRAME`] in the guest, [`MAX_GUEST_FRAME`] in the host) or a head
//! that does not parse ends the channel, and the host treats that
//! as the VM failing.

use std::io::{self, Read, Write};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use trellis_schemas::Capability;
use trellis_schemas::capability::rpc::{HttpRequestHead, HttpResponseHead};
use trellis_schemas::dataplane::ErrorCode;
use trellis_schemas::instance::ManifestDoc;

/// The largest frame the guest accepts: a component's code plus headroom.
pub const MAX_FRAME: usize = 160 * 1024 * 1024;

/// The largest frame the host accepts from a guest. Nothing a guest sends needs more: results,
/// HTTP bodies and capability requests are bounded by the data plane's
/// [`MAX_BODY_BYTES`](trellis_schemas::dataplane::MAX_BODY_BYTES) and by the runtime's result
/// budget (1 MiB each), so an agent that misbehaves cannot make its host allocate more than this
/// per frame.
pub const MAX_GUEST_FRAME: usize = 4 * 1024 * 1024;

/// What a frame says; the body it carries is described on each variant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "m", rename_all = "snake_case")]
pub enum Message {
    /// Guest → host, once, when the agent is up. Body: empty.
    Ready {
        /// The agent's `trellis-host` version.
        version: String,
    },
    /// Host → guest: keep this component. Body: the host's compiled artifact (its first
    /// `compiled` bytes, possibly none), then the `.wasm`, compiled in the guest when the
    /// artifact does not fit its engine.
    Load {
        /// Its manifest (limits, declared imports).
        manifest: ManifestDoc,
        /// How many bytes of the body are the compiled artifact.
        compiled: u64,
    },
    /// Guest → host: the answer to [`Message::Load`]. Body: empty.
    Loaded {
        /// Why it could not be loaded, if it could not.
        error: Option<String>,
        /// How long loading took inside the VM, in milliseconds.
        compile_ms: u64,
        /// Whether the host's artifact was used (else the guest compiled the `.wasm`).
        precompiled: bool,
        /// Why the artifact was not used, when it was not.
        note: Option<String>,
        /// Whether the guest's kernel lets the pooling allocator reset an instance's memory in
        /// place (PAGEMAP_SCAN, Linux 6.7+) rather than fault it in again on every call.
        #[serde(default)]
        reset_in_place: bool,
    },
    /// Host → guest: call an export. Body: the JSON array of arguments.
    Invoke {
        /// The export.
        export: String,
        /// The W3C trace context of the call.
        traceparent: Option<String>,
        /// The capabilities granted at the moment of the call.
        allowed: Vec<Capability>,
        /// Whether the host wants the invocation's output lines ([`Message::Log`]).
        log: bool,
    },
    /// Host → guest: serve an HTTP request. Body: the request body.
    Http {
        /// The request head.
        head: HttpRequestHead,
        /// The W3C trace context of the request.
        traceparent: Option<String>,
        /// The capabilities granted at the moment of the call.
        allowed: Vec<Capability>,
        /// Whether the host wants the invocation's output lines ([`Message::Log`]).
        log: bool,
    },
    /// Guest → host: one line of output of a running invocation (its id is the invocation's).
    /// Body: empty.
    Log {
        /// `stdout`, `stderr`, or a `wasi:logging` level (`trace` … `critical`).
        source: String,
        /// For `wasi:logging`, the context the guest gave.
        context: Option<String>,
        /// The line.
        text: String,
    },
    /// Guest → host: the end of an [`Message::Invoke`] (body: the JSON result) or of an
    /// [`Message::Http`] (body: the response body).
    Done {
        /// The HTTP response head, for an HTTP request that was answered.
        http: Option<HttpResponseHead>,
        /// The failure, when the invocation failed.
        error: Option<Failure>,
    },
    /// Guest → host: a capability call of a running invocation. Body: the request in its NATS
    /// encoding.
    Capability {
        /// The capability.
        capability: Capability,
        /// The HTTP head of an outgoing HTTP request (JSON), as over NATS.
        http_head: Option<String>,
        /// How long the guest waits, in milliseconds.
        timeout_ms: u64,
        /// The invocation's trace context.
        traceparent: Option<String>,
    },
    /// Guest → host: a linked call of a running invocation (an import another component
    /// serves). Body: the JSON array of arguments.
    Link {
        /// The interface as the component imports it.
        interface: String,
        /// The function.
        function: String,
        /// How long the guest waits, in milliseconds.
        timeout_ms: u64,
        /// The invocation's trace context.
        traceparent: Option<String>,
    },
    /// Host → guest: the answer to [`Message::Link`]. Body: the JSON array of results.
    LinkReply {
        /// The refusal or failure, when there is one.
        error: Option<RemoteError>,
    },
    /// Host → guest: the answer to [`Message::Capability`]. Body: the reply in its NATS
    /// encoding.
    CapabilityReply {
        /// The HTTP head of an outgoing HTTP response (JSON).
        http_head: Option<String>,
        /// The refusal or failure, when there is one.
        error: Option<RemoteError>,
    },
}

impl Message {
    fn kind(&self) -> u8 {
        match self {
            Message::Ready { .. } => 1,
            Message::Load { .. } => 2,
            Message::Loaded { .. } => 3,
            Message::Invoke { .. } => 4,
            Message::Http { .. } => 5,
            Message::Done { .. } => 6,
            Message::Capability { .. } => 7,
            Message::CapabilityReply { .. } => 8,
            Message::Link { .. } => 9,
            Message::LinkReply { .. } => 10,
            Message::Log { .. } => 11,
        }
    }
}

/// How an invocation inside the VM failed, as the runtime there reported it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Failure {
    /// The runtime's stable reason (`fuel_exhausted`, `trap: unreachable`, `busy`, …).
    pub reason: String,
    /// The data-plane code the call answers with.
    pub code: ErrorCode,
    /// For a crash, how (a `CrashReason` as text).
    pub crash: Option<String>,
    /// What happened, with the tail of the guest's stderr for a crash.
    pub message: String,
}

/// A capability call's error, as the bridge on the host gave it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RemoteError {
    /// The data-plane code.
    pub code: ErrorCode,
    /// What happened.
    pub message: String,
}

/// One frame: a message, the id that pairs a request with its answer, and the body.
#[derive(Debug, Clone, PartialEq)]
pub struct Frame {
    /// Pairs a request with its answer.
    pub id: u64,
    /// What it says.
    pub message: Message,
    /// The bulk data it carries.
    pub body: Bytes,
}

impl Frame {
    /// A frame.
    pub fn new(id: u64, message: Message, body: impl Into<Bytes>) -> Self {
        Self {
            id,
            message,
            body: body.into(),
        }
    }

    /// The frame's bytes.
    ///
    /// # Errors
    ///
    /// When the frame would be larger than [`MAX_FRAME`].
    pub fn encode(&self) -> io::Result<Vec<u8>> {
        self.encode_within(MAX_FRAME)
    }

    /// Encodes the frame if it is at most `max` bytes long ([`MAX_GUEST_FRAME`] for what a guest
    /// sends its host).
    ///
    /// # Errors
    ///
    /// When the frame would be larger than `max`.
    pub fn encode_within(&self, max: usize) -> io::Result<Vec<u8>> {
        let head = serde_json::to_vec(&self.message).map_err(io::Error::other)?;
        let len = 1 + 8 + 4 + head.len() + self.body.len();
        if len > max {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a frame of {len} bytes is larger than the channel takes ({max})"),
            ));
        }
        let mut out = Vec::with_capacity(4 + len);
        out.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_le_bytes());
        out.push(self.message.kind());
        out.extend_from_slice(&self.id.to_le_bytes());
        out.extend_from_slice(&u32::try_from(head.len()).unwrap_or(u32::MAX).to_le_bytes());
        out.extend_from_slice(&head);
        out.extend_from_slice(&self.body);
        Ok(out)
    }

    /// Writes the frame in one `write_all`.
    ///
    /// # Errors
    ///
    /// The writer's, or an oversized frame.
    pub fn write_to(&self, writer: &mut impl Write) -> io::Result<()> {
        writer.write_all(&self.encode()?)?;
        writer.flush()
    }

    /// Reads one frame; `Ok(None)` at a clean end of the stream (before a frame begins).
    ///
    /// # Errors
    ///
    /// The reader's, a truncated frame, an oversized one, or a head that does not parse or does
    /// not match its kind.
    pub fn read_from(reader: &mut impl Read) -> io::Result<Option<Frame>> {
        let mut len = [0u8; 4];
        match reader.read_exact(&mut len) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let mut bytes = vec![0u8; frame_len(len, MAX_FRAME)?];
        reader.read_exact(&mut bytes)?;
        Self::decode(bytes).map(Some)
    }

    /// Reads one frame a guest sent, from an async reader; `Ok(None)` at a clean end of the
    /// stream.
    ///
    /// # Errors
    ///
    /// As [`read_from`](Self::read_from), with frames larger than [`MAX_GUEST_FRAME`] refused.
    pub async fn read_async(
        reader: &mut (impl tokio::io::AsyncRead + Unpin),
    ) -> io::Result<Option<Frame>> {
        Self::read_async_within(reader, MAX_GUEST_FRAME).await
    }

    /// Reads one frame of at most `max` bytes from an async reader ([`MAX_FRAME`] for what a
    /// host sends its guest); `Ok(None)` at a clean end of the stream.
    ///
    /// # Errors
    ///
    /// As [`read_from`](Self::read_from), with frames larger than `max` refused.
    pub async fn read_async_within(
        reader: &mut (impl tokio::io::AsyncRead + Unpin),
        max: usize,
    ) -> io::Result<Option<Frame>> {
        use tokio::io::AsyncReadExt as _;
        let mut len = [0u8; 4];
        match reader.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let mut bytes = vec![0u8; frame_len(len, max)?];
        reader.read_exact(&mut bytes).await?;
        Self::decode(bytes).map(Some)
    }

    /// Decodes a frame's bytes after the length prefix.
    fn decode(bytes: Vec<u8>) -> io::Result<Frame> {
        let kind = bytes[0];
        let id = u64::from_le_bytes(bytes[1..9].try_into().map_err(io::Error::other)?);
        let head_len = u32::from_le_bytes(bytes[9..13].try_into().map_err(io::Error::other)?);
        let head_end = 13usize
            .checked_add(head_len as usize)
            .filter(|end| *end <= bytes.len())
            .ok_or_else(|| invalid(format!("a head of {head_len} bytes overruns its frame")))?;
        let message: Message = serde_json::from_slice(&bytes[13..head_end])
            .map_err(|e| invalid(format!("a head that does not parse: {e}")))?;
        if message.kind() != kind {
            return Err(invalid(format!(
                "kind {kind} with a {} head",
                message.kind()
            )));
        }
        let mut body = Bytes::from(bytes);
        let body = body.split_off(head_end);
        Ok(Frame { id, message, body })
    }
}

/// The length a frame's prefix announces, if it is one the reader accepts (at most `max`).
fn frame_len(prefix: [u8; 4], max: usize) -> io::Result<usize> {
    let len = u32::from_le_bytes(prefix) as usize;
    if (13..=max).contains(&len) {
        Ok(len)
    } else {
        Err(invalid(format!("a frame of {len} bytes")))
    }
}

fn invalid(what: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("micro-VM channel: {what}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let frames = [
            Frame::new(
                0,
                Message::Ready {
                    version: "1".into(),
                },
                Bytes::new(),
            ),
            Frame::new(
                7,
                Message::Invoke {
                    export: "add".into(),
                    traceparent: None,
                    allowed: vec![Capability::KeyValue],
                    log: true,
                },
                Bytes::from_static(b"[1,2]"),
            ),
            Frame::new(
                u64::MAX,
                Message::Done {
                    http: None,
                    error: Some(Failure {
                        reason: "fuel_exhausted".into(),
                        code: ErrorCode::Crashed,
                        crash: Some("fuel_exhausted".into()),
                        message: "fuel".into(),
                    }),
                },
                Bytes::from(vec![0u8; 70_000]),
            ),
        ];
        let mut wire = Vec::new();
        for f in &frames {
            f.write_to(&mut wire).expect("writes");
        }
        let mut reader = wire.as_slice();
        for f in &frames {
            assert_eq!(
                Frame::read_from(&mut reader).expect("reads").as_ref(),
                Some(f)
            );
        }
        assert_eq!(Frame::read_from(&mut reader).expect("end"), None);
    }

    #[test]
    fn bad_frames_are_refused() {
        // Oversized length.
        let mut r: &[u8] = &[0xff, 0xff, 0xff, 0xff];
        assert!(Frame::read_from(&mut r).is_err());
        // Too short to hold a header.
        let mut r: &[u8] = &[3, 0, 0, 0, 1, 2, 3];
        assert!(Frame::read_from(&mut r).is_err());
        // A head length past the end.
        let mut bad = vec![20, 0, 0, 0, 1];
        bad.extend_from_slice(&0u64.to_le_bytes());
        bad.extend_from_slice(&1000u32.to_le_bytes());
        bad.extend_from_slice(&[0; 7]);
        assert!(Frame::read_from(&mut bad.as_slice()).is_err());
        // A head of the wrong kind.
        let good = Frame::new(
            1,
            Message::Ready {
                version: "1".into(),
            },
            Bytes::new(),
        )
        .encode()
        .expect("encodes");
        let mut wrong = good.clone();
        wrong[4] = 2;
        assert!(Frame::read_from(&mut wrong.as_slice()).is_err());
        // Truncated.
        assert!(Frame::read_from(&mut &good[..good.len() - 1]).is_err());
    }

    #[tokio::test]
    async fn the_host_takes_smaller_frames_from_a_guest_than_it_sends() {
        let frame = |len: usize| {
            Frame::new(
                7,
                Message::Ready {
                    version: "1".into(),
                },
                Bytes::from(vec![0u8; len]),
            )
            .encode()
            .expect("encodes")
        };
        let within = frame(MAX_GUEST_FRAME - 64);
        let read = Frame::read_async(&mut within.as_slice()).await.unwrap();
        assert_eq!(read.map(|f| f.id), Some(7));
        let over = frame(MAX_GUEST_FRAME + 1);
        // The guest would take it; the host refuses it from its length alone.
        assert!(Frame::read_from(&mut over.as_slice()).is_ok());
        let err = Frame::read_async(&mut &over[..4]).await.unwrap_err();
        assert!(err.to_string().contains("a frame of"), "{err}");
    }
}
