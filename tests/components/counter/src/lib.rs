//! A global counter: if the host reused an instance between calls, `increment` would exceed 1.
use std::sync::atomic::{AtomicU64, Ordering};

wit_bindgen::generate!({ world: "counter", path: "../wit" });

static COUNT: AtomicU64 = AtomicU64::new(0);

struct Counter;

impl Guest for Counter {
    fn increment() -> u64 {
        COUNT.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn peek() -> u64 {
        COUNT.load(Ordering::SeqCst)
    }
}

export!(Counter);
