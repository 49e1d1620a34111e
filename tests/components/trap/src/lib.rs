//! Executes a trapping instruction chosen by its input.
wit_bindgen::generate!({ world: "guest", path: "../wit" });

struct Trap;

impl Guest for Trap {
    fn run(input: String) -> String {
        match input.as_str() {
            "out_of_bounds" => {
                // A load far past the end of linear memory: the engine traps before Rust sees it.
                let addr = usize::MAX - 16 - input.len();
                #[allow(unsafe_code)]
                let value = unsafe { core::ptr::read_volatile(addr as *const u64) };
                value.to_string()
            }
            "ok" => "no trap".to_string(),
            _ => core::arch::wasm32::unreachable(),
        }
    }
}

export!(Trap);
