//! `trellis-provider-http-client`: serves `wasi:http/outgoing-handler` over plain HTTP.

fn main() -> std::process::ExitCode {
    trellis_provider_sdk::main(
        trellis_provider_http_client::INFO,
        trellis_provider_http_client::HttpClientProvider::new,
    )
}
