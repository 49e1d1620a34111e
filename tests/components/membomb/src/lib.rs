//! Allocates and touches 1 MiB blocks until the host's memory limit stops it.
wit_bindgen::generate!({ world: "guest", path: "../wit" });

struct MemBomb;

impl Guest for MemBomb {
    fn run(input: String) -> String {
        // `input` may cap the number of MiB to allocate, so the same guest can also succeed.
        let cap: usize = input.parse().unwrap_or(usize::MAX);
        let mut blocks: Vec<Vec<u8>> = Vec::new();
        while blocks.len() < cap {
            blocks.push(vec![blocks.len() as u8 | 1; 1 << 20]);
        }
        let total: usize = blocks.iter().map(|b| b.len()).sum();
        format!("allocated {total} bytes")
    }
}

export!(MemBomb);
