//! The last stage of a pipeline: serves `example:pipeline/transform` by appending its note.
//! Input `trap` makes it panic and `loop` makes it spin, so callers can see a stage fail.
wit_bindgen::generate!({ world: "pipe-stage", path: "../wit", generate_all });

use exports::example::pipeline0_1_0::transform::{Guest, Stage};

struct Last;

impl Guest for Last {
    fn run(input: String, mut trail: Vec<Stage>) -> Result<Vec<Stage>, String> {
        match input.as_str() {
            "trap" => panic!("the stage was asked to trap"),
            "loop" => loop {
                std::hint::black_box(&trail);
            },
            "" => return Err("empty input".to_owned()),
            _ => {}
        }
        trail.push(Stage {
            name: "rust".to_owned(),
            note: input.to_uppercase(),
        });
        Ok(trail)
    }
}

export!(Last);
