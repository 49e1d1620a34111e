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

/// Whether a server error is a permissions violation (the server refusing a publish or a
/// subscription the user's permissions do not allow).
fn is_permission_violation(message: &str) -> bool {
    message
        .to_ascii_lowercase()
        .contains("permissions violation")
}

fn violations() -> &'static tokio::sync::broadcast::Sender<String> {
    static SENDER: std::sync::OnceLock<tokio::sync::broadcast::Sender<String>> =
        std::sync::OnceLock::new();
    SENDER.get_or_init(|| tokio::sync::broadcast::channel(64).0)
}

/// The permission violations NATS reports from now on to the connections of this process (the
/// server's message, which names the subject). A request whose publish the server refused gets
/// no reply at all; a caller that watches this can say why instead of timing out.
pub fn permission_violations() -> tokio::sync::broadcast::Receiver<String> {
    violations().subscribe()
}

/// Waits until NATS reports a permission violation naming `subject` on `violations`.
pub async fn refused(
    violations: &mut tokio::sync::broadcast::Receiver<String>,
    subject: &str,
) -> String {
    let quoted = format!("\"{subject}\"");
    refused_where(violations, |message| message.contains(&quoted)).await
}

/// Waits until NATS reports a permission violation on `violations` whose message `matches`.
pub(crate) async fn refused_where(
    violations: &mut tokio::sync::broadcast::Receiver<String>,
    matches: impl Fn(&str) -> bool,
) -> String {
    loop {
        match violations.recv().await {
            Ok(message) if matches(&message) => return message,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
            Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                return std::future::pending().await;
            }
        }
    }
}

/// How often a client pings its server. The client gives up on a connection when a third ping
/// is due with two unanswered, so a server that vanished without closing the connection (a
/// network partition, a frozen machine) is noticed within 4–6 s, inside a controller's default
/// 10 s host timeout; at 10 s it took 20–30 s, by which time the hosts of a partitioned server
/// had been declared lost.
const PING_INTERVAL: Duration = Duration::from_secs(2);
/// How long one attempt to connect to one server may take: a dead server in the list costs a
/// reconnection no more than this before the next is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the client waits before its `attempts`-th try to connect (counted from 1, and
/// again from 1 after each connection is lost). The first try goes at once: the client asks
/// for a delay before every try, the very first connection included, so a delay there would
/// be paid by every process start and every CLI command. Then 200 ms, doubling up to 2 s.
fn reconnect_delay(attempts: usize) -> Duration {
    if attempts <= 1 {
        return Duration::ZERO;
    }
    let ms = 100u64.saturating_mul(1 << (attempts - 1).min(5) as u64);
    Duration::from_millis(ms.min(2_000))
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
    connect_with(url, name, wait, crate::auth::connect_args()).await
}

/// Like [`connect`], with other credentials and TLS options than this process's (a provider a
/// host embeds connects as that provider, not as the host).
pub async fn connect_with(
    url: &str,
    name: &str,
    wait: bool,
    args: &crate::ConnectArgs,
) -> Result<Client, ConnectError> {
    let mut options = ConnectOptions::new()
        .name(name)
        .max_reconnects(None)
        .connection_timeout(CONNECT_TIMEOUT)
        .request_timeout(Some(Duration::from_secs(10)))
        .ping_interval(PING_INTERVAL)
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(|event| async move {
            match event {
                Event::ServerError(e) if is_permission_violation(&e.to_string()) => {
                    let message = e.to_string();
                    tracing::info!(error = %message, "NATS refused an operation");
                    let _ = violations().send(message);
                }
                Event::Connected => tracing::info!("connected to NATS"),
                Event::Disconnected => tracing::warn!("disconnected from NATS; reconnecting"),
                Event::ClientError(e) => tracing::warn!(error = %e, "NATS client error"),
                other => tracing::debug!(event = %other, "NATS event"),
            }
        });
    if wait {
        options = options.retry_on_initial_connect();
    }
    options = crate::auth::apply(options, args)
        .await
        .map_err(|message| ConnectError {
            url: url.to_owned(),
            source: async_nats::ConnectError::with_source(
                async_nats::ConnectErrorKind::Authentication,
                message,
            ),
        })?;
    let servers: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    // The client does not log in with a URL's user info by itself: `user:password@` is a user
    // and password, a lone `token@` a token (the first server that has any gives it).
    if let Some((user, password)) = servers.iter().find_map(|s| user_info(s)) {
        options = match password {
            Some(password) => options.user_and_password(user, password),
            None => options.token(user),
        };
    }
    options
        .connect(servers)
        .await
        .map_err(|source| ConnectError {
            url: url.to_owned(),
            source,
        })
}

/// The user and password (or token) in a server URL's user info, percent-decoded.
fn user_info(server: &str) -> Option<(String, Option<String>)> {
    let addr: async_nats::ServerAddr = server.parse().ok()?;
    let user = percent_decode(addr.username()?);
    Some((user, addr.password().map(percent_decode)))
}

/// Decodes `%XX` escapes (a URL's user info may hold them, and so may the OTLP headers
/// variable); anything else is kept as it is.
pub(crate) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

static JS_DOMAIN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();

/// Environment variable of the JetStream domain (`--js-domain` of every binary).
pub const ENV_JS_DOMAIN: &str = "TRELLIS_JS_DOMAIN";

/// Sets, once per process, the JetStream domain every [`jetstream`] context of this process
/// uses: `Some("hub")` when the process connects through a NATS leaf node that has no JetStream
/// of its own and the cluster's JetStream runs in domain `hub`; `None` (the default) to use the
/// JetStream of the server connected to.
///
/// The domain is a property of where a process connects, the same for all its streams, buckets
/// and consumers, which is why it is set once for the process rather than passed to each caller.
/// Returns false, changing nothing, when it was set (or read) before.
pub fn set_jetstream_domain(domain: Option<String>) -> bool {
    JS_DOMAIN
        .set(domain.filter(|d| !d.trim().is_empty()))
        .is_ok()
}

/// The JetStream domain of this process ([`set_jetstream_domain`]), if any.
pub fn jetstream_domain() -> Option<&'static str> {
    JS_DOMAIN.get_or_init(|| None).as_deref()
}

/// A JetStream context on `client`, in this process's domain ([`set_jetstream_domain`]). Every
/// Trellis process makes its contexts here, so that a process behind a leaf node reaches the
/// cluster's streams, buckets and object stores through `$JS.<domain>.API`.
pub fn jetstream(client: Client) -> async_nats::jetstream::Context {
    match jetstream_domain() {
        Some(domain) => async_nats::jetstream::with_domain(client, domain),
        None => async_nats::jetstream::new(client),
    }
}

/// Checks a JetStream domain given on a command line: letters, digits, `-` and `_`, as
/// nats-server accepts in `jetstream { domain }`.
pub fn parse_jetstream_domain(s: &str) -> Result<String, String> {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
    {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "JetStream domain {s:?} must be letters, digits, '-' or '_'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_gives_a_user_and_password_or_a_token() {
        assert_eq!(
            user_info("nats://a:a-secret@127.0.0.1:4222"),
            Some(("a".into(), Some("a-secret".into())))
        );
        assert_eq!(
            user_info("nats://s3cr3t@127.0.0.1:4222"),
            Some(("s3cr3t".into(), None))
        );
        assert_eq!(
            user_info("tls://us%40er:p%3Ass@host:4222"),
            Some(("us@er".into(), Some("p:ss".into())))
        );
        assert_eq!(user_info("nats://127.0.0.1:4222"), None);
    }

    #[test]
    fn the_first_try_to_connect_waits_for_nothing_and_later_ones_back_off() {
        let ms = |n| reconnect_delay(n).as_millis();
        assert_eq!(ms(0), 0);
        assert_eq!(ms(1), 0);
        assert_eq!([ms(2), ms(3), ms(4), ms(5)], [200, 400, 800, 1600]);
        assert_eq!(ms(6), 2_000);
        assert_eq!(ms(1_000), 2_000);
    }
}
