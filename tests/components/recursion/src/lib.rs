//! Recurses without bound on the wasm stack (no shadow-stack frames) until it overflows.
wit_bindgen::generate!({ world: "guest", path: "../wit" });

struct Recursion;

#[inline(never)]
fn descend(n: u64) -> u64 {
    if n == 0 {
        return 1;
    }
    // Not a tail call, and no accumulator the optimiser could turn into a loop.
    let below = descend(n - 1);
    if n % 2 == 0 {
        below ^ n
    } else {
        below.rotate_left(1)
    }
}

impl Guest for Recursion {
    fn run(input: String) -> String {
        let depth: u64 = input.parse().unwrap_or(u64::MAX);
        descend(depth).to_string()
    }
}

export!(Recursion);
