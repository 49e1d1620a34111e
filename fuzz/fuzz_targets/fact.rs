//! The CloudEvent fact decoder every reader of the fact stream runs: any bytes give a fact or
//! a decode error; a fact that decodes encodes again and decodes to the same fact.
#![no_main]

use libfuzzer_sys::fuzz_target;
use trellis_schemas::Event;

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = Event::decode(data) {
        let _ = event.summary();
        let again = event.encode().expect("a decoded fact encodes");
        let back = Event::decode(&again).expect("an encoded fact decodes");
        assert_eq!(back.data, event.data);
    }
});
