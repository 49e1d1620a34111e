//! The typed capability calls between hosts and providers, and their encoding over NATS.
//!
//! A host hands a provider a [`CapabilityRequest`] and gets a [`CapabilityResponse`] back.
//! In one process (an embedded provider) they are passed as they are. Over NATS a host sends
//! the request to [`dataplane::provider_rpc`](crate::dataplane::provider_rpc) with the caller's
//! identity in one header ([`IDENTITY`](crate::dataplane::headers::IDENTITY)) and the body
//! [`encode`d](CapabilityRequest::encode):
//!
//! - key-value and messaging: the compact binary layout of [`crate::wire`] (values and message
//!   bodies as raw bytes);
//! - HTTP: the raw body, with the head as JSON in
//!   [`HTTP_HEAD`](crate::dataplane::headers::HTTP_HEAD).
//!
//! The reply is a data-plane reply (see [`crate::dataplane`]): on success its body is the
//! encoded [`CapabilityResponse`].
//!
//! The `http-server` provider sends each incoming request to a component's or instance's
//! `http` subject, head and body the same way; the `messaging` provider delivers a subscribed
//! message by calling the component's `wasmcloud:messaging/handler#handle-message` export over
//! the ordinary call subject.

use bytes::Bytes;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::capability::Capability;
use crate::wire::{Reader, WireError, Writer};

/// A `wasi:keyvalue` operation, sent by a host to the `kv` provider. `bucket` is the
/// identifier the component passed to `store.open` (empty for "the assigned bucket").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KvRequest {
    /// `store.open`: checks the identifier against the assignment.
    Open {
        /// The identifier.
        bucket: String,
    },
    /// `bucket.get`.
    Get {
        /// The identifier.
        bucket: String,
        /// The key.
        key: String,
    },
    /// `bucket.set`.
    Set {
        /// The identifier.
        bucket: String,
        /// The key.
        key: String,
        /// The value.
        value: Bytes,
    },
    /// `bucket.delete`.
    Delete {
        /// The identifier.
        bucket: String,
        /// The key.
        key: String,
    },
    /// `bucket.exists`.
    Exists {
        /// The identifier.
        bucket: String,
        /// The key.
        key: String,
    },
    /// `bucket.list-keys`, one page.
    ListKeys {
        /// The identifier.
        bucket: String,
        /// Where the previous page ended.
        cursor: Option<u64>,
    },
    /// `atomics.increment`.
    Increment {
        /// The identifier.
        bucket: String,
        /// The key.
        key: String,
        /// The amount.
        delta: u64,
    },
    /// `batch.get-many`.
    GetMany {
        /// The identifier.
        bucket: String,
        /// The keys.
        keys: Vec<String>,
    },
    /// `batch.set-many`.
    SetMany {
        /// The identifier.
        bucket: String,
        /// Keys and values.
        pairs: Vec<(String, Bytes)>,
    },
    /// `batch.delete-many`.
    DeleteMany {
        /// The identifier.
        bucket: String,
        /// The keys.
        keys: Vec<String>,
    },
}

impl KvRequest {
    /// The identifier the operation names.
    pub fn bucket(&self) -> &str {
        match self {
            KvRequest::Open { bucket }
            | KvRequest::Get { bucket, .. }
            | KvRequest::Set { bucket, .. }
            | KvRequest::Delete { bucket, .. }
            | KvRequest::Exists { bucket, .. }
            | KvRequest::ListKeys { bucket, .. }
            | KvRequest::Increment { bucket, .. }
            | KvRequest::GetMany { bucket, .. }
            | KvRequest::SetMany { bucket, .. }
            | KvRequest::DeleteMany { bucket, .. } => bucket,
        }
    }

    /// How many bytes of keys and values it carries (what the size limit applies to).
    pub fn size(&self) -> usize {
        let keys = |keys: &[String]| keys.iter().map(String::len).sum::<usize>();
        self.bucket().len()
            + match self {
                KvRequest::Open { .. } | KvRequest::ListKeys { .. } => 0,
                KvRequest::Get { key, .. }
                | KvRequest::Delete { key, .. }
                | KvRequest::Exists { key, .. }
                | KvRequest::Increment { key, .. } => key.len(),
                KvRequest::Set { key, value, .. } => key.len() + value.len(),
                KvRequest::GetMany { keys: k, .. } | KvRequest::DeleteMany { keys: k, .. } => {
                    keys(k)
                }
                KvRequest::SetMany { pairs, .. } => {
                    pairs.iter().map(|(k, v)| k.len() + v.len()).sum()
                }
            }
    }

    fn write(&self, w: &mut Writer) {
        let str_list = |w: &mut Writer, keys: &[String]| {
            w.list(keys.iter(), |w, k| {
                w.str(k);
            });
        };
        match self {
            KvRequest::Open { bucket } => {
                w.u8(0).str(bucket);
            }
            KvRequest::Get { bucket, key } => {
                w.u8(1).str(bucket).str(key);
            }
            KvRequest::Set { bucket, key, value } => {
                w.u8(2).str(bucket).str(key).bytes(value);
            }
            KvRequest::Delete { bucket, key } => {
                w.u8(3).str(bucket).str(key);
            }
            KvRequest::Exists { bucket, key } => {
                w.u8(4).str(bucket).str(key);
            }
            KvRequest::ListKeys { bucket, cursor } => {
                w.u8(5).str(bucket).opt(*cursor, |w, c| {
                    w.u64(c);
                });
            }
            KvRequest::Increment { bucket, key, delta } => {
                w.u8(6).str(bucket).str(key).u64(*delta);
            }
            KvRequest::GetMany { bucket, keys } => {
                w.u8(7).str(bucket);
                str_list(w, keys);
            }
            KvRequest::SetMany { bucket, pairs } => {
                w.u8(8).str(bucket).list(pairs.iter(), |w, (k, v)| {
                    w.str(k).bytes(v);
                });
            }
            KvRequest::DeleteMany { bucket, keys } => {
                w.u8(9).str(bucket);
                str_list(w, keys);
            }
        }
    }

    fn read(r: &mut Reader) -> Result<Self, WireError> {
        let tag = r.u8()?;
        let bucket = r.string()?;
        Ok(match tag {
            0 => KvRequest::Open { bucket },
            1 => KvRequest::Get {
                bucket,
                key: r.string()?,
            },
            2 => KvRequest::Set {
                bucket,
                key: r.string()?,
                value: r.bytes()?,
            },
            3 => KvRequest::Delete {
                bucket,
                key: r.string()?,
            },
            4 => KvRequest::Exists {
                bucket,
                key: r.string()?,
            },
            5 => KvRequest::ListKeys {
                bucket,
                cursor: r.opt(Reader::u64)?,
            },
            6 => KvRequest::Increment {
                bucket,
                key: r.string()?,
                delta: r.u64()?,
            },
            7 => KvRequest::GetMany {
                bucket,
                keys: r.list(Reader::string)?,
            },
            8 => KvRequest::SetMany {
                bucket,
                pairs: r.list(|r| Ok((r.string()?, r.bytes()?)))?,
            },
            9 => KvRequest::DeleteMany {
                bucket,
                keys: r.list(Reader::string)?,
            },
            other => return Err(r.unknown("key-value operation", other)),
        })
    }
}

/// The `kv` provider's successful answer; which fields are set depends on the operation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KvReply {
    /// `get`: the value, if the key exists.
    pub value: Option<Bytes>,
    /// `exists`: whether the key exists.
    pub exists: Option<bool>,
    /// `increment`: the new value.
    pub number: Option<u64>,
    /// `list_keys`: the keys of this page.
    pub keys: Vec<String>,
    /// `list_keys`: where the next page starts, if any.
    pub cursor: Option<u64>,
    /// `get_many`: values in the order of the keys asked.
    pub values: Vec<Option<Bytes>>,
}

impl KvReply {
    fn write(&self, w: &mut Writer) {
        w.opt(self.value.as_ref(), |w, v| {
            w.bytes(v);
        })
        .opt(self.exists, |w, e| {
            w.bool(e);
        })
        .opt(self.number, |w, n| {
            w.u64(n);
        })
        .list(self.keys.iter(), |w, k| {
            w.str(k);
        })
        .opt(self.cursor, |w, c| {
            w.u64(c);
        })
        .list(self.values.iter(), |w, v| {
            w.opt(v.as_ref(), |w, v| {
                w.bytes(v);
            });
        });
    }

    fn read(r: &mut Reader) -> Result<Self, WireError> {
        Ok(Self {
            value: r.opt(Reader::bytes)?,
            exists: r.opt(Reader::bool)?,
            number: r.opt(Reader::u64)?,
            keys: r.list(Reader::string)?,
            cursor: r.opt(Reader::u64)?,
            values: r.list(|r| r.opt(Reader::bytes))?,
        })
    }

    fn size(&self) -> usize {
        self.value.as_ref().map_or(0, Bytes::len)
            + self.keys.iter().map(String::len).sum::<usize>()
            + self
                .values
                .iter()
                .map(|v| v.as_ref().map_or(0, Bytes::len))
                .sum::<usize>()
    }
}

/// A `wasmcloud:messaging/consumer` operation, sent by a host to the `messaging` provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessagingRequest {
    /// `consumer.publish`.
    Publish {
        /// The message.
        message: BrokerMessage,
    },
    /// `consumer.request`: publish and wait for one reply.
    Request {
        /// The subject.
        subject: String,
        /// The body.
        body: Bytes,
        /// How long to wait for the reply, in milliseconds.
        timeout_ms: u32,
    },
}

impl MessagingRequest {
    fn write(&self, w: &mut Writer) {
        match self {
            MessagingRequest::Publish { message } => {
                w.u8(0);
                message.write(w);
            }
            MessagingRequest::Request {
                subject,
                body,
                timeout_ms,
            } => {
                w.u8(1).str(subject).bytes(body).u64(u64::from(*timeout_ms));
            }
        }
    }

    fn read(r: &mut Reader) -> Result<Self, WireError> {
        Ok(match r.u8()? {
            0 => MessagingRequest::Publish {
                message: BrokerMessage::read(r)?,
            },
            1 => MessagingRequest::Request {
                subject: r.string()?,
                body: r.bytes()?,
                timeout_ms: r.u32()?,
            },
            other => return Err(r.unknown("messaging operation", other)),
        })
    }

    fn size(&self) -> usize {
        match self {
            MessagingRequest::Publish { message } => message.size(),
            MessagingRequest::Request { subject, body, .. } => subject.len() + body.len(),
        }
    }
}

/// A message as `wasmcloud:messaging` sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerMessage {
    /// The subject.
    pub subject: String,
    /// The body.
    pub body: Bytes,
    /// Where to reply, if anywhere.
    pub reply_to: Option<String>,
}

impl BrokerMessage {
    fn write(&self, w: &mut Writer) {
        w.str(&self.subject)
            .bytes(&self.body)
            .opt(self.reply_to.as_deref(), |w, r| {
                w.str(r);
            });
    }

    fn read(r: &mut Reader) -> Result<Self, WireError> {
        Ok(Self {
            subject: r.string()?,
            body: r.bytes()?,
            reply_to: r.opt(Reader::string)?,
        })
    }

    fn size(&self) -> usize {
        self.subject.len() + self.body.len() + self.reply_to.as_ref().map_or(0, String::len)
    }
}

/// The `messaging` provider's successful answer: the reply of a `request`, nothing for a
/// `publish`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessagingReply {
    /// The reply message (`request` only).
    pub message: Option<BrokerMessage>,
}

/// The head of an HTTP request carried over NATS (in the
/// [`HTTP_HEAD`](crate::dataplane::headers::HTTP_HEAD) header; the body is the payload).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpRequestHead {
    /// The method (`GET`).
    pub method: String,
    /// For outgoing requests the absolute URL; for incoming ones the path and query.
    pub uri: String,
    /// The `Host` the client asked for (incoming requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// Header names and values, in order (values are UTF-8; others are dropped).
    #[serde(default)]
    pub headers: Vec<(String, String)>,
    /// How long the caller waits for the response, in milliseconds (outgoing requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

/// The head of an HTTP response carried over NATS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpResponseHead {
    /// The status code.
    pub status: u16,
    /// Header names and values, in order.
    #[serde(default)]
    pub headers: Vec<(String, String)>,
}

/// An HTTP request or response: its head and its whole body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpMessage<H> {
    /// The head.
    pub head: H,
    /// The body.
    pub body: Bytes,
}

/// One capability call, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapabilityRequest {
    /// `wasi:keyvalue`.
    KeyValue(KvRequest),
    /// `wasmcloud:messaging/consumer`.
    Messaging(MessagingRequest),
    /// `wasi:http/outgoing-handler`.
    Http(HttpMessage<HttpRequestHead>),
}

/// A provider's successful answer, typed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CapabilityResponse {
    /// `wasi:keyvalue`.
    KeyValue(KvReply),
    /// `wasmcloud:messaging/consumer`.
    Messaging(MessagingReply),
    /// `wasi:http/outgoing-handler`.
    Http(HttpMessage<HttpResponseHead>),
}

/// A request or reply as it travels over NATS: the body, and for HTTP the head for the
/// [`HTTP_HEAD`](crate::dataplane::headers::HTTP_HEAD) header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// The head as JSON (HTTP only).
    pub http_head: Option<String>,
    /// The body.
    pub body: Bytes,
}

/// Why a capability request or reply could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The binary body is malformed.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The HTTP head is missing or not valid JSON.
    #[error("HTTP head: {0}")]
    HttpHead(String),
    /// The capability is not called by RPC.
    #[error("{0} is not served by RPC")]
    NotRpc(Capability),
}

fn encode_binary(size: usize, f: impl FnOnce(&mut Writer)) -> Bytes {
    let mut w = Writer::new(size + 16);
    f(&mut w);
    w.finish()
}

fn decode_binary<T>(
    body: Bytes,
    f: impl FnOnce(&mut Reader) -> Result<T, WireError>,
) -> Result<T, CodecError> {
    let mut r = Reader::new(body)?;
    let value = f(&mut r)?;
    r.end()?;
    Ok(value)
}

fn http_head<H: serde::de::DeserializeOwned>(head: Option<&str>) -> Result<H, CodecError> {
    let head = head.ok_or_else(|| CodecError::HttpHead("missing".to_owned()))?;
    serde_json::from_str(head).map_err(|e| CodecError::HttpHead(e.to_string()))
}

fn encode_head<H: Serialize>(head: &H) -> Result<String, CodecError> {
    serde_json::to_string(head).map_err(|e| CodecError::HttpHead(e.to_string()))
}

impl CapabilityRequest {
    /// The capability it belongs to.
    pub fn capability(&self) -> Capability {
        match self {
            CapabilityRequest::KeyValue(_) => Capability::KeyValue,
            CapabilityRequest::Messaging(_) => Capability::Messaging,
            CapabilityRequest::Http(_) => Capability::HttpOutgoing,
        }
    }

    /// How many bytes of data it carries: what the body-size limit applies to, on every path.
    pub fn size(&self) -> usize {
        match self {
            CapabilityRequest::KeyValue(r) => r.size(),
            CapabilityRequest::Messaging(r) => r.size(),
            CapabilityRequest::Http(m) => m.body.len(),
        }
    }

    /// Refuses a request carrying more than [`MAX_BODY_BYTES`](crate::dataplane::MAX_BODY_BYTES)
    /// of data, as every provider does before anything else (and a micro-VM before the request
    /// leaves it).
    ///
    /// # Errors
    ///
    /// `payload_too_large`, with the size and the limit.
    pub fn check_size(&self) -> Result<(), crate::dataplane::DataError> {
        let size = self.size();
        let limit = crate::dataplane::MAX_BODY_BYTES;
        if size > limit {
            return Err(crate::dataplane::DataError::too_large(format!(
                "the request carries {size} bytes; the limit is {limit}"
            )));
        }
        Ok(())
    }

    /// The request as it travels over NATS.
    pub fn encode(&self) -> Result<Encoded, CodecError> {
        Ok(match self {
            CapabilityRequest::KeyValue(r) => Encoded {
                http_head: None,
                body: encode_binary(r.size(), |w| r.write(w)),
            },
            CapabilityRequest::Messaging(r) => Encoded {
                http_head: None,
                body: encode_binary(r.size(), |w| r.write(w)),
            },
            CapabilityRequest::Http(m) => Encoded {
                http_head: Some(encode_head(&m.head)?),
                body: m.body.clone(),
            },
        })
    }

    /// Decodes a request for `capability` received over NATS.
    pub fn decode(
        capability: Capability,
        http_head: Option<&str>,
        body: Bytes,
    ) -> Result<Self, CodecError> {
        Ok(match capability {
            Capability::KeyValue => {
                CapabilityRequest::KeyValue(decode_binary(body, KvRequest::read)?)
            }
            Capability::Messaging => {
                CapabilityRequest::Messaging(decode_binary(body, MessagingRequest::read)?)
            }
            Capability::HttpOutgoing => CapabilityRequest::Http(HttpMessage {
                head: self::http_head(http_head)?,
                body,
            }),
            other => return Err(CodecError::NotRpc(other)),
        })
    }
}

impl CapabilityResponse {
    /// How many bytes of data it carries.
    pub fn size(&self) -> usize {
        match self {
            CapabilityResponse::KeyValue(r) => r.size(),
            CapabilityResponse::Messaging(r) => r.message.as_ref().map_or(0, BrokerMessage::size),
            CapabilityResponse::Http(m) => m.body.len(),
        }
    }

    /// The reply as it travels over NATS.
    pub fn encode(&self) -> Result<Encoded, CodecError> {
        Ok(match self {
            CapabilityResponse::KeyValue(r) => Encoded {
                http_head: None,
                body: encode_binary(r.size(), |w| r.write(w)),
            },
            CapabilityResponse::Messaging(r) => Encoded {
                http_head: None,
                body: encode_binary(self.size(), |w| {
                    w.opt(r.message.as_ref(), |w, m| m.write(w));
                }),
            },
            CapabilityResponse::Http(m) => Encoded {
                http_head: Some(encode_head(&m.head)?),
                body: m.body.clone(),
            },
        })
    }

    /// Decodes a reply to a request for `capability` received over NATS.
    pub fn decode(
        capability: Capability,
        http_head: Option<&str>,
        body: Bytes,
    ) -> Result<Self, CodecError> {
        Ok(match capability {
            Capability::KeyValue => {
                CapabilityResponse::KeyValue(decode_binary(body, KvReply::read)?)
            }
            Capability::Messaging => CapabilityResponse::Messaging(MessagingReply {
                message: decode_binary(body, |r| r.opt(BrokerMessage::read))?,
            }),
            Capability::HttpOutgoing => CapabilityResponse::Http(HttpMessage {
                head: self::http_head(http_head)?,
                body,
            }),
            other => return Err(CodecError::NotRpc(other)),
        })
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn b(s: &[u8]) -> Bytes {
        Bytes::copy_from_slice(s)
    }

    fn round_trip(request: CapabilityRequest) {
        let encoded = request.encode().expect("encodes");
        let back = CapabilityRequest::decode(
            request.capability(),
            encoded.http_head.as_deref(),
            encoded.body,
        )
        .expect("decodes");
        assert_eq!(back, request);
    }

    #[test]
    fn every_key_value_operation_round_trips() {
        let bucket = "b".to_owned();
        let key = "k\u{e9}y".to_owned();
        for request in [
            KvRequest::Open {
                bucket: bucket.clone(),
            },
            KvRequest::Get {
                bucket: bucket.clone(),
                key: key.clone(),
            },
            KvRequest::Set {
                bucket: bucket.clone(),
                key: key.clone(),
                value: b(&[0, 1, 255]),
            },
            KvRequest::Delete {
                bucket: bucket.clone(),
                key: key.clone(),
            },
            KvRequest::Exists {
                bucket: bucket.clone(),
                key: key.clone(),
            },
            KvRequest::ListKeys {
                bucket: bucket.clone(),
                cursor: Some(1000),
            },
            KvRequest::ListKeys {
                bucket: bucket.clone(),
                cursor: None,
            },
            KvRequest::Increment {
                bucket: bucket.clone(),
                key: key.clone(),
                delta: u64::MAX,
            },
            KvRequest::GetMany {
                bucket: bucket.clone(),
                keys: vec!["a".into(), String::new()],
            },
            KvRequest::SetMany {
                bucket: bucket.clone(),
                pairs: vec![("a".into(), b(b"1")), ("b".into(), Bytes::new())],
            },
            KvRequest::DeleteMany {
                bucket: bucket.clone(),
                keys: vec!["a".into()],
            },
        ] {
            round_trip(CapabilityRequest::KeyValue(request));
        }
    }

    #[test]
    fn a_value_travels_as_raw_bytes() {
        let value = vec![0xAB; 1000];
        let request = CapabilityRequest::KeyValue(KvRequest::Set {
            bucket: String::new(),
            key: "k".into(),
            value: Bytes::from(value.clone()),
        });
        let encoded = request.encode().expect("encodes").body;
        // version, tag, bucket length, key length and key, value length (2 bytes), value.
        assert_eq!(encoded.len(), 1 + 1 + 1 + 2 + 2 + value.len());
        assert!(encoded.ends_with(&value));
    }

    #[test]
    fn messaging_and_http_round_trip() {
        round_trip(CapabilityRequest::Messaging(MessagingRequest::Publish {
            message: BrokerMessage {
                subject: "a.b".into(),
                body: b(b"ping"),
                reply_to: Some("r".into()),
            },
        }));
        round_trip(CapabilityRequest::Messaging(MessagingRequest::Request {
            subject: "a.b".into(),
            body: Bytes::new(),
            timeout_ms: 250,
        }));
        round_trip(CapabilityRequest::Http(HttpMessage {
            head: HttpRequestHead {
                method: "GET".into(),
                uri: "http://x/".into(),
                authority: None,
                headers: vec![("a".into(), "b".into())],
                timeout_ms: Some(5),
            },
            body: b(b"body"),
        }));
        for response in [
            CapabilityResponse::KeyValue(KvReply {
                value: Some(b(b"v")),
                exists: Some(true),
                number: Some(7),
                keys: vec!["k".into()],
                cursor: Some(3),
                values: vec![None, Some(b(b"x"))],
            }),
            CapabilityResponse::KeyValue(KvReply::default()),
            CapabilityResponse::Messaging(MessagingReply::default()),
            CapabilityResponse::Messaging(MessagingReply {
                message: Some(BrokerMessage {
                    subject: "s".into(),
                    body: b(b"pong"),
                    reply_to: None,
                }),
            }),
            CapabilityResponse::Http(HttpMessage {
                head: HttpResponseHead {
                    status: 404,
                    headers: vec![],
                },
                body: Bytes::new(),
            }),
        ] {
            let capability = match &response {
                CapabilityResponse::KeyValue(_) => Capability::KeyValue,
                CapabilityResponse::Messaging(_) => Capability::Messaging,
                CapabilityResponse::Http(_) => Capability::HttpOutgoing,
            };
            let encoded = response.encode().expect("encodes");
            let back =
                CapabilityResponse::decode(capability, encoded.http_head.as_deref(), encoded.body)
                    .expect("decodes");
            assert_eq!(back, response);
        }
    }

    #[test]
    fn malformed_bodies_are_errors() {
        let e = CapabilityRequest::decode(Capability::KeyValue, None, b(b"{\"op\":\"get\"}"))
            .expect_err("JSON is not the binary layout");
        assert!(matches!(e, CodecError::Wire(_)), "{e}");
        let e = CapabilityRequest::decode(Capability::KeyValue, None, b(&[1, 42, 0]))
            .expect_err("unknown tag");
        assert!(
            e.to_string().contains("unknown key-value operation 42"),
            "{e}"
        );
        let e = CapabilityRequest::decode(Capability::KeyValue, None, b(&[1, 0, 0, 9]))
            .expect_err("trailing bytes");
        assert!(e.to_string().contains("left over"), "{e}");
        let e = CapabilityRequest::decode(Capability::HttpOutgoing, None, Bytes::new())
            .expect_err("no head");
        assert!(matches!(e, CodecError::HttpHead(_)));
        let e = CapabilityRequest::decode(Capability::HttpIncoming, None, Bytes::new())
            .expect_err("not rpc");
        assert!(matches!(e, CodecError::NotRpc(_)));
    }

    proptest! {
        #[test]
        fn set_many_round_trips(pairs in proptest::collection::vec((".{0,8}", proptest::collection::vec(any::<u8>(), 0..32)), 0..8)) {
            let request = CapabilityRequest::KeyValue(KvRequest::SetMany {
                bucket: "b".into(),
                pairs: pairs.into_iter().map(|(k, v)| (k, Bytes::from(v))).collect(),
            });
            let encoded = request.encode().expect("encodes");
            let back = CapabilityRequest::decode(Capability::KeyValue, None, encoded.body).expect("decodes");
            prop_assert_eq!(back, request);
        }

        #[test]
        fn decoding_garbage_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = CapabilityRequest::decode(Capability::KeyValue, None, Bytes::from(raw.clone()));
            let _ = CapabilityResponse::decode(Capability::KeyValue, None, Bytes::from(raw.clone()));
            let _ = CapabilityRequest::decode(Capability::Messaging, None, Bytes::from(raw));
        }
    }
}
