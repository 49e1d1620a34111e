//! The provider RPC codec (hosts' capability requests, providers' replies): any body and HTTP
//! head, for any capability, decode to a value or an error; a value that decodes encodes
//! again to a value that decodes the same.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use trellis_schemas::Capability;
use trellis_schemas::capability::rpc::{CapabilityRequest, CapabilityResponse};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let capability = Capability::ALL[usize::from(which) % Capability::ALL.len()];
    // An HTTP head, when there is one, comes first, up to a NUL.
    let (head, body) = match rest.iter().position(|b| *b == 0) {
        Some(at) if which & 0x80 != 0 => (std::str::from_utf8(&rest[..at]).ok(), &rest[at + 1..]),
        _ => (None, rest),
    };
    let body = Bytes::copy_from_slice(body);
    if let Ok(request) = CapabilityRequest::decode(capability, head, body.clone()) {
        let encoded = request.encode().expect("a decoded request encodes");
        let again =
            CapabilityRequest::decode(capability, encoded.http_head.as_deref(), encoded.body)
                .expect("an encoded request decodes");
        assert_eq!(again, request);
    }
    if let Ok(response) = CapabilityResponse::decode(capability, head, body) {
        let encoded = response.encode().expect("a decoded reply encodes");
        let again =
            CapabilityResponse::decode(capability, encoded.http_head.as_deref(), encoded.body)
                .expect("an encoded reply decodes");
        assert_eq!(again, response);
    }
});
