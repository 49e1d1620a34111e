//! Calls `example:pipeline/transform` as version 0.2.0 declares it (numbers, not strings): linked
//! to a stage of 0.1.0, its arguments do not type-check there and the call must fail cleanly.
wit_bindgen::generate!({ world: "pipe-odd", path: "../wit", generate_all });

use example::pipeline0_2_0::transform;

struct Odd;

impl Guest for Odd {
    fn run(input: String) -> String {
        match transform::run(input.len() as u32, &[1, 2, 3]) {
            Ok(trail) => format!("{trail:?}"),
            Err(message) => format!("error: {message}"),
        }
    }
}

export!(Odd);
