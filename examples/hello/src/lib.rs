//! The example component `trellis up` deploys: it needs no capability, so it shows the runtime
//! and the data plane alone. `trellis call hello greet Trellis` returns `"Hello, Trellis!"`.

wit_bindgen::generate!({ world: "hello", path: "wit" });

struct Hello;

impl Guest for Hello {
    fn greet(name: String) -> String {
        format!("Hello, {name}!")
    }

    fn length(text: String) -> u32 {
        text.chars().count() as u32
    }
}

export!(Hello);
