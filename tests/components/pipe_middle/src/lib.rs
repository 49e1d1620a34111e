//! A middle stage of a pipeline: serves `example:pipeline/transform` by adding its note (with
//! its call count from its own key-value bucket, when it was granted one) and handing the trail
//! on to the next stage, through its own link.
wit_bindgen::generate!({ world: "pipe-middle", path: "../wit", generate_all });

use example::pipeline0_1_0::transform as next;
use exports::example::pipeline0_1_0::transform::{Guest, Stage};

struct Middle;

impl Guest for Middle {
    fn run(input: String, mut trail: Vec<Stage>) -> Result<Vec<Stage>, String> {
        let chars = input.chars().count();
        let note = match calls() {
            Some(n) => format!("{chars} chars #{n}"),
            None => format!("{chars} chars"),
        };
        trail.push(Stage {
            name: "middle".to_owned(),
            note,
        });
        // The generated import and export share the record's shape, not its Rust type.
        let handed: Vec<next::Stage> = trail
            .into_iter()
            .map(|s| next::Stage {
                name: s.name,
                note: s.note,
            })
            .collect();
        let back = next::run(&input, &handed)?;
        Ok(back
            .into_iter()
            .map(|s| Stage {
                name: s.name,
                note: s.note,
            })
            .collect())
    }
}

/// Counts this call in the assigned bucket; `None` without one.
fn calls() -> Option<u64> {
    let bucket = wasi::keyvalue::store::open("").ok()?;
    wasi::keyvalue::atomics::increment(&bucket, "middle-calls", 1).ok()
}

export!(Middle);
