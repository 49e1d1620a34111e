use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event};

/// The first connection could not be made in time.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to NATS at {url}: {source}")]
pub struct ConnectError {
    /// The URL that was tried.
    pub url: String,
    /// What the client said.
    #[source]
    pub source: async_nats::ConnectError,
}

/// Connects to NATS as `name` (shown by the server's monitoring). `url` may list several
/// servers of a cluster separated by commas (`nats://a:4222,nats://b:4222`); the client picks one
/// and, after losing it, tries the others and those the cluster told it about.
///
/// The client reconnects forever after a disconnection, with a capped backoff, and logs every
/// connection event. When `wait` is true the first connection is retried too (a process started
/// before its NATS server simply waits for it); otherwise an unreachable server is an error at once,
/// which is what a CLI wants.
pub async fn connect(url: &str, name: &str, wait: bool) -> Result<Client, ConnectError> {
    let mut options = ConnectOptions::new()
        .name(name)
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(10)))
        .ping_interval(Duration::from_secs(10))
        .reconnect_delay_callback(|attempts| {
            let ms = 100u64.saturating_mul(1 << attempts.min(5) as u64);
            Duration::from_millis(ms.min(2_000))
        })
        .event_callback(|event| async move {
            match event {
                Event::Connected => tracing::info!("connected to NATS"),
                Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
                Event::ClientError(e) => tracing::warn!(error = %e, "NATS client error"),
                other => tracing::debug!(event = %other, "NATS event"),
            }
        });
    if wait {
        options = options.retry_on_initial_connect();
    }
    let servers: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    options
        .connect(servers)
        .await
        .map_err(|source| ConnectError {
            url: url.to_owned(),
            source,
        })
}
