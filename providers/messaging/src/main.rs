//! `trellis-provider-messaging`: serves `wasmcloud:messaging` on NATS.

fn main() -> std::process::ExitCode {
    trellis_provider_sdk::main(
        trellis_provider_messaging::INFO,
        trellis_provider_messaging::MessagingProvider::new,
    )
}
