//! The head of a pipeline: calls `example:pipeline/transform` (served through a link) and
//! renders what every stage contributed, or the error the link or a stage gave.
wit_bindgen::generate!({ world: "pipe-front", path: "../wit", generate_all });

use example::pipeline::transform::{self, Stage};

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
}

export!(Front);
