//! Handles messages and publishes through `wasmcloud:messaging`: each handled message is answered
//! with `echo: <body>` on its reply-to subject, else on `<subject>.echo`.

wit_bindgen::generate!({
    world: "trellis:test-capabilities/messenger",
    path: ["../../../wit", "../wit-capabilities"],
    // The interfaces come from the vendored packages in `wit/deps`.
    generate_all,
});

use exports::wasmcloud::messaging::handler;
use wasmcloud::messaging::consumer;
use wasmcloud::messaging::types::BrokerMessage;

struct Messenger;

impl handler::Guest for Messenger {
    fn handle_message(msg: BrokerMessage) -> Result<(), String> {
        let subject = match msg.reply_to {
            Some(reply_to) => reply_to,
            None => format!("{}.echo", msg.subject),
        };
        let mut body = b"echo: ".to_vec();
        body.extend_from_slice(&msg.body);
        consumer::publish(&BrokerMessage {
            subject,
            body,
            reply_to: None,
        })
    }
}

impl Guest for Messenger {
    fn publish(subject: String, body: String) -> Result<(), String> {
        consumer::publish(&BrokerMessage {
            subject,
            body: body.into_bytes(),
            reply_to: None,
        })
    }

    fn request(subject: String, body: String, timeout_ms: u32) -> Result<String, String> {
        let reply = consumer::request(&subject, body.as_bytes(), timeout_ms)?;
        Ok(String::from_utf8_lossy(&reply.body).into_owned())
    }
}

export!(Messenger);
