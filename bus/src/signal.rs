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
