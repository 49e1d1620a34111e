//! Loops forever without calling the host: only fuel or the epoch deadline can stop it.
wit_bindgen::generate!({ world: "guest", path: "../wit" });

struct Loop;

impl Guest for Loop {
    fn run(input: String) -> String {
        let mut acc = input.len() as u64;
        loop {
            acc = acc
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            // Keep the loop observable so it is not optimised into a trap or away.
            if acc == 42 {
                return acc.to_string();
            }
        }
    }
}

export!(Loop);
