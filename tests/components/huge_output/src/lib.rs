//! Prints and returns as much data as its input asks for (in KiB).
wit_bindgen::generate!({ world: "guest", path: "../wit" });

struct HugeOutput;

impl Guest for HugeOutput {
    fn run(input: String) -> String {
        let kib: usize = input.parse().unwrap_or(8 * 1024);
        let line = "x".repeat(1023);
        for _ in 0..kib {
            println!("{line}");
            eprintln!("{line}");
        }
        "y".repeat(kib * 1024)
    }
}

export!(HugeOutput);
