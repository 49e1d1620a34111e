//! `trellis-provider-messaging`: serves `wasmcloud:messaging` on NATS.

/// mimalloc rather than the C library's allocator, as the host: requests and replies are made on
/// one thread and freed on another, which glibc's arenas make dear.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    trellis_provider_sdk::main(
        trellis_provider_messaging::INFO,
        trellis_provider_messaging::MessagingProvider::new,
    )
}
