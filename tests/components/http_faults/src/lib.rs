//! A `wasi:http` component that fails on request, for the tests of the HTTP status a failure
//! becomes. The path says how:
//!
//! | path | what the guest does |
//! |---|---|
//! | `/ok` | answers `200 ok` |
//! | `/sleep` | sleeps for a minute (past any timeout) |
//! | `/spin` | loops forever (burns its fuel) |
//! | `/memory` | allocates until it is out of memory |
//! | `/panic` | panics |
//! | `/trap` | executes `unreachable` |
//! | `/slow` | answers `200 ok` after 300 ms |

use wasi::exports::http::incoming_handler::Guest;
use wasi::http::types::{Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam};

struct Faults;

wasi::http::proxy::export!(Faults);

impl Guest for Faults {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        match path.as_str() {
            "/sleep" => std::thread::sleep(std::time::Duration::from_secs(60)),
            "/spin" => {
                let mut n: u64 = 0;
                loop {
                    n = std::hint::black_box(n.wrapping_add(1));
                }
            }
            "/memory" => {
                let mut hoard: Vec<Vec<u8>> = Vec::new();
                loop {
                    hoard.push(vec![1; 1 << 20]);
                    std::hint::black_box(&hoard);
                }
            }
            "/panic" => panic!("asked to panic"),
            "/trap" => core::arch::wasm32::unreachable(),
            "/slow" => std::thread::sleep(std::time::Duration::from_millis(300)),
            _ => {}
        }
        let response = OutgoingResponse::new(Fields::new());
        let Ok(body) = response.body() else {
            return;
        };
        ResponseOutparam::set(response_out, Ok(response));
        if let Ok(stream) = body.write() {
            let _ = stream.blocking_write_and_flush(b"ok");
        }
        let _ = OutgoingBody::finish(body, None);
    }
}
