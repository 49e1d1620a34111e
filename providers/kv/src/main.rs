//! `trellis-provider-kv`: serves `wasi:keyvalue` on JetStream KV.

fn main() -> std::process::ExitCode {
    trellis_provider_sdk::main(
        trellis_provider_kv::INFO,
        trellis_provider_kv::KvProvider::new,
    )
}
