//! The head of a pipeline: calls `example:pipeline/transform` (served through a link) and
//! renders what every stage contributed, or the error the link or a stage gave.
wit_bindgen::generate!({ world: "pipe-front", path: "../wit", generate_all });

use example::pipeline0_1_0::transform::{self, Stage};

struct Front;

impl Guest for Front {
    fn run(input: String) -> String {
        let mine = Stage {
            name: "front".to_owned(),
            note: format!("got {} bytes", input.len()),
        };
        match transform::run(&input, &[mine]) {
            Ok(trail) => trail
                .iter()
                .map(|s| format!("{}: {}", s.name, s.note))
                .collect::<Vec<_>>()
                .join(" | "),
            Err(message) => format!("error: {message}"),
        }
    }

    fn bench(n: u32) -> (u64, u64, u64) {
        let mut times = Vec::with_capacity(n as usize);
        let started = std::time::Instant::now();
        for _ in 0..n {
            let call = std::time::Instant::now();
            let _ = transform::run("x", &[]);
            times.push(call.elapsed().as_nanos() as u64);
        }
        let total = started.elapsed().as_nanos() as u64;
        times.sort_unstable();
        let at = |q: f64| {
            times
                .get(((times.len() as f64 * q) as usize).min(times.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0)
        };
        (at(0.5), at(0.99), total)
    }
}

export!(Front);
