//! A middle stage of a pipeline: serves `example:pipeline/transform` by adding its note and
//! handing the trail on to the next stage, through its own link.
wit_bindgen::generate!({ world: "pipe-middle", path: "../wit", generate_all });

use example::pipeline0_1_0::transform as next;
use exports::example::pipeline0_1_0::transform::{Guest, Stage};

struct Middle;

impl Guest for Middle {
    fn run(input: String, mut trail: Vec<Stage>) -> Result<Vec<Stage>, String> {
        trail.push(Stage {
            name: "middle".to_owned(),
            note: format!("{} chars", input.chars().count()),
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

export!(Middle);
