//! What hosts, providers and the CLI read from a data-plane message's headers and subject:
//! status, error code and reason, caller identity, HTTP heads, capability requests and replies
//! (JetStream's direct replies among them), subjects.
//! Any headers and payload give a value or a precise error, never a panic.
#![no_main]

use async_nats::{HeaderMap, Message};
use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use trellis_bus::dataplane as codec;
use trellis_schemas::capability::rpc::{CapabilityRequest, KvRequest};
use trellis_schemas::dataplane::{self, ProviderVerb};
use trellis_schemas::{Capability, HostId, Lattice, ProviderId, ProviderName};

/// Headers from `name=value` lines up to a blank line; the rest is the payload.
fn message(data: &[u8]) -> Option<Message> {
    let text = std::str::from_utf8(data).ok()?;
    let (head, payload) = text.split_once("\n\n").unwrap_or((text, ""));
    let mut headers = HeaderMap::new();
    for line in head.lines() {
        if let Some((name, value)) = line.split_once('=') {
            let name: async_nats::header::HeaderName = name.parse().ok()?;
            let value: async_nats::HeaderValue = value.parse().ok()?;
            headers.insert(name, value);
        }
    }
    Some(Message {
        subject: head.lines().next().unwrap_or("x").into(),
        reply: None,
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        headers: Some(headers),
        status: None,
        description: None,
        length: data.len(),
    })
}

fuzz_target!(|data: &[u8]| {
    let Some(message) = message(data) else {
        return;
    };
    let _ = codec::read_reply(&message);
    let _ = codec::reply_instance(&message);
    let _ = codec::Identity::read(message.headers.as_ref());
    for capability in Capability::ALL {
        let _ = codec::read_capability_request(*capability, &message);
        let _ = codec::read_capability_reply(*capability, &message);
    }
    // Whatever a provider or JetStream sends back to a key-value request, with any status.
    let key = || "k".to_owned();
    let requests = [
        KvRequest::Get {
            bucket: String::new(),
            key: key(),
        },
        KvRequest::Exists {
            bucket: String::new(),
            key: key(),
        },
        KvRequest::Set {
            bucket: String::new(),
            key: key(),
            value: Bytes::new(),
        },
        KvRequest::Delete {
            bucket: String::new(),
            key: key(),
        },
        KvRequest::ListKeys {
            bucket: String::new(),
            cursor: None,
        },
    ];
    for status in [None, Some(404), Some(408), Some(503)] {
        let reply = Message {
            status: status.and_then(|s| async_nats::StatusCode::from_u16(s).ok()),
            ..message.clone()
        };
        for request in &requests {
            let request = CapabilityRequest::KeyValue(request.clone());
            let _ = trellis_bus::direct::read_reply(&request, &reply);
        }
    }
    let _ = codec::read_http_request(&message);
    let _ = codec::read_http_reply(message.clone());
    let subject = message.subject.as_str();
    let lattice = Lattice::new("default").expect("a valid name");
    let _ = dataplane::parse_op(&lattice, subject);
    let host = HostId::new("h1").expect("a valid id");
    let _ = dataplane::parse_host_command(&lattice, &host, subject);
    let name = ProviderName::new("kv").expect("a valid name");
    let id = ProviderId::new("p1").expect("a valid id");
    let _ = dataplane::parse_provider_control(&lattice, &name, &id, subject);
    let _ = ProviderVerb::parse(subject);
    let _ = dataplane::ErrorCode::parse(subject);
    let _ = dataplane::trace_id(subject);
});
