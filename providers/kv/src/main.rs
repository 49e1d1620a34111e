//! `trellis-provider-kv`: serves `wasi:keyvalue` on JetStream KV.

/// mimalloc rather than the C library's allocator, as the host: requests and replies are made on
/// one thread and freed on another, which glibc's arenas make dear.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    trellis_provider_sdk::main(
        trellis_provider_kv::INFO,
        trellis_provider_kv::KvProvider::new,
    )
}
