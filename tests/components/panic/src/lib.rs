//! Panics with a message built from its input (the panic message goes to stderr, then it aborts).
wit_bindgen::generate!({ world: "guest", path: "../wit" });

struct Panic;

impl Guest for Panic {
    fn run(input: String) -> String {
        println!("about to panic");
        if input == "ok" {
            return "no panic".to_string();
        }
        panic!("guest gave up: {input}");
    }
}

export!(Panic);
