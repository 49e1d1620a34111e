//! `trellis-provider-http-server`: serves HTTP and dispatches to components'
//! `wasi:http/incoming-handler`.

fn main() -> std::process::ExitCode {
    trellis_provider_sdk::main(
        trellis_provider_http_server::INFO,
        trellis_provider_http_server::HttpServerProvider::new,
    )
}
