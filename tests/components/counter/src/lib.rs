//! A global counter: if the host reused an instance between calls, `increment` would exceed 1.
use std::sync::atomic::{AtomicU64, Ordering};

wit_bindgen::generate!({ world: "counter", path: "../wit" });

static COUNT: AtomicU64 = AtomicU64::new(0);

/// Zero-initialised and larger than what the host keeps resident per memory slot (1 MiB), so
/// that a reset must both restore pages in place and return others to the kernel.
static mut BUFFER: [u8; 3 << 20] = [0; 3 << 20];

struct Counter;

impl Guest for Counter {
    fn increment() -> u64 {
        COUNT.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn peek() -> u64 {
        COUNT.load(Ordering::SeqCst)
    }

    fn scribble(kib: u32) -> u64 {
        // SAFETY: one invocation runs in a store at a time and nothing else borrows BUFFER.
        let buffer = unsafe { &mut *std::ptr::addr_of_mut!(BUFFER) };
        let dirty = buffer.iter().filter(|b| **b != 0).count() as u64;
        buffer.fill(0xAA);
        let heap = vec![0xAAu8; kib as usize * 1024];
        std::hint::black_box(&heap);
        std::mem::forget(heap);
        dirty
    }
}

export!(Counter);
