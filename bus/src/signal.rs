/// Listens for SIGTERM and SIGINT from now on, and returns a future that completes when the
/// process receives either, with the reason to record (`"signal: SIGTERM"`). Every Trellis
/// process drains on either.
///
/// The handlers are installed by this call, not when the future is first polled: a process
/// calls it first thing, so that a signal that arrives while it is still starting (connecting,
/// compiling, announcing itself) is kept for the drain instead of killing it outright. Call it
/// within a Tokio runtime with signals enabled (it panics otherwise, as `tokio::signal` does).
pub fn shutdown_signal() -> impl Future<Output = String> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = signal(SignalKind::terminate())
        .and_then(|term| Ok((term, signal(SignalKind::interrupt())?)));
    async move {
        let Ok((mut term, mut int)) = handlers else {
            // Without signal handlers the process can only be killed; run until then.
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => "signal: SIGTERM".to_owned(),
            _ = int.recv() => "signal: SIGINT".to_owned(),
        }
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

#[cfg(test)]
mod tests {
    use nix::sys::signal::{Signal, raise};

    /// A signal that arrives after the call but before the future is polled is kept: a process
    /// stopped while it starts drains once it is up.
    #[tokio::test]
    async fn a_signal_before_the_first_poll_is_kept() {
        let shutdown = super::shutdown_signal();
        raise(Signal::SIGINT).unwrap();
        let reason = tokio::time::timeout(std::time::Duration::from_secs(10), shutdown)
            .await
            .expect("the signal was kept");
        assert_eq!(reason, "signal: SIGINT");
    }
}
