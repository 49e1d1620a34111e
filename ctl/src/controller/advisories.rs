//! The NATS server's advisories a controller turns into audit events: failed logins.
//!
//! nats-server publishes an advisory on its system account for every client whose login it
//! refuses (`$SYS.SERVER.<id>.CLIENT.AUTH.ERR`), with the client's address, name and claimed
//! user; it publishes none for publish or subscribe permission violations (those reach only the
//! offending connection, and the lattice's own processes record them themselves). A controller
//! given a system-account user (`--system-creds`) records each failed login as a `denied` audit
//! event; replicas record the same advisory once (its id deduplicates it in the stream).

use std::path::Path;

use futures::StreamExt as _;
use serde::Deserialize;
use trellis_bus::audit::AuditLog;
use trellis_schemas::audit::{AuditEvent, AuditType, short_reason};

use super::{ControllerConfig, ControllerError};

/// The subject of the server's failed-login advisories, every server's.
const AUTH_ERRORS: &str = "$SYS.SERVER.*.CLIENT.AUTH.ERR";

/// The audit outcome of a failed login.
pub(crate) const LOGIN_REFUSED: &str = "nats_login_refused";

/// What Trellis reads of an advisory.
#[derive(Debug, Deserialize)]
struct Advisory {
    id: String,
    #[serde(default)]
    client: Client,
    #[serde(default)]
    reason: String,
}

#[derive(Debug, Default, Deserialize)]
struct Client {
    #[serde(default)]
    host: String,
    #[serde(default)]
    user: String,
    #[serde(default)]
    nkey: String,
    #[serde(default)]
    name: String,
}

impl Advisory {
    /// The audit event of a failed login: who claimed to be whom, from where, and the server's
    /// reason.
    fn event(&self, source: &str) -> AuditEvent {
        let who = [&self.client.user, &self.client.nkey]
            .into_iter()
            .find(|s| !s.is_empty())
            .map_or("an unnamed user", String::as_str);
        let mut event = AuditEvent::new(AuditType::Denied, source, LOGIN_REFUSED);
        event.target = Some(format!("nats-client:{}", self.client.host));
        let name = if self.client.name.is_empty() {
            String::new()
        } else {
            format!(" (client {:?})", self.client.name)
        };
        let reason = if self.reason.is_empty() {
            "authentication failed"
        } else {
            self.reason.as_str()
        };
        event.reason = Some(short_reason(&format!(
            "{reason}: {who}{name} from {}",
            self.client.host
        )));
        event
    }
}

/// Connects as the system-account user in `creds` and records every failed login the server
/// reports, on `client` (the controller's connection to the lattice), until the process ends.
///
/// # Errors
///
/// When the system account cannot be reached or subscribed to.
pub(super) async fn spawn(
    config: &ControllerConfig,
    creds: &Path,
    client: async_nats::Client,
) -> Result<(), ControllerError> {
    let args = trellis_bus::ConnectArgs {
        creds: Some(creds.to_owned()),
        inbox_prefix: None,
        ..trellis_bus::connect_args().clone()
    };
    let system = trellis_bus::connect_with(
        &config.nats_url,
        &format!("trellis controller {} (system)", config.replica_id),
        false,
        &args,
    )
    .await?;
    let mut advisories = system
        .subscribe(AUTH_ERRORS)
        .await
        .map_err(|e| ControllerError::Subscribe(format!("{AUTH_ERRORS}: {e}")))?;
    let log = AuditLog::new(client, config.lattice.clone());
    let source = format!("controller/{}", config.replica_id);
    tracing::info!("recording the server's failed-login advisories");
    tokio::spawn(async move {
        // The system connection lives as long as its subscription.
        let _system = system;
        while let Some(message) = advisories.next().await {
            match serde_json::from_slice::<Advisory>(&message.payload) {
                Ok(advisory) => {
                    log.record_once(&advisory.event(&source), &advisory.id)
                        .await;
                }
                Err(e) => tracing::debug!(error = %e, "an advisory Trellis does not read"),
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_login_names_who_claimed_what_from_where() {
        let advisory: Advisory = serde_json::from_str(
            r#"{"type":"io.nats.server.advisory.v1.client_disconnect","id":"n8T",
                "client":{"host":"10.0.0.7","id":8,"acc":"$G","user":"UABC","name":"probe"},
                "reason":"Authentication Failure"}"#,
        )
        .unwrap();
        let event = advisory.event("controller/r1");
        assert_eq!(event.kind, AuditType::Denied);
        assert_eq!(event.outcome, LOGIN_REFUSED);
        assert_eq!(event.target.as_deref(), Some("nats-client:10.0.0.7"));
        assert_eq!(
            event.reason.as_deref(),
            Some("Authentication Failure: UABC (client \"probe\") from 10.0.0.7")
        );
        let bare: Advisory = serde_json::from_str(r#"{"id":"x"}"#).unwrap();
        assert_eq!(
            bare.event("c").reason.as_deref(),
            Some("authentication failed: an unnamed user from ")
        );
    }
}
