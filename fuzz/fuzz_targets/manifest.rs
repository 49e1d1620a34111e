//! The `Component.toml` parser and validator: any text gives a manifest or an error naming
//! what is wrong, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_schemas::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = Manifest::from_toml(text);
        let _ = trellis_schemas::manifest::parse_size(text);
    }
});
