//! The controller's request decoder: any bytes, as the body of any control operation, give a
//! request or a precise error, never a panic. The subject parser too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_schemas::control::{
    AssignmentGrantRequest, AssignmentRevokeRequest, ComponentRegisterRequest, HostListRequest,
    InstanceLogsRequest, InstanceStartRequest, InstanceStopRequest, ProviderStartRequest,
    RolloutStartRequest, decode_request,
};
use trellis_schemas::{CtlOp, Lattice, subject};

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    let _ = match which % 9 {
        0 => decode_request::<HostListRequest>(body).map(|_| ()),
        1 => decode_request::<InstanceStartRequest>(body).map(|_| ()),
        2 => decode_request::<InstanceStopRequest>(body).map(|_| ()),
        3 => decode_request::<AssignmentGrantRequest>(body).map(|_| ()),
        4 => decode_request::<AssignmentRevokeRequest>(body).map(|_| ()),
        5 => decode_request::<ComponentRegisterRequest>(body).map(|_| ()),
        6 => decode_request::<RolloutStartRequest>(body).map(|_| ()),
        7 => decode_request::<ProviderStartRequest>(body).map(|_| ()),
        _ => decode_request::<InstanceLogsRequest>(body).map(|_| ()),
    };
    if let Ok(text) = std::str::from_utf8(body) {
        let lattice = Lattice::new("default").expect("a valid name");
        if let Some((noun, verb)) = subject::parse_ctl(&lattice, text) {
            let _ = CtlOp::from_parts(noun, verb);
        }
    }
});
