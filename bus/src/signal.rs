/// Completes when the process receives SIGTERM or SIGINT, with the reason to record
/// (`"signal: SIGTERM"`). Every Trellis process drains on either.
pub async fn shutdown_signal() -> String {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process can only be killed; run until then.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "signal: SIGTERM".to_owned(),
        _ = int.recv() => "signal: SIGINT".to_owned(),
    }
}

/// Logs to stderr (coloured on a terminal) at the levels of `RUST_LOG`, or `default_filter`
/// (e.g. `info,async_nats=warn`) when it is unset or invalid. Every Trellis binary calls it once.
pub fn init_logging(default_filter: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
