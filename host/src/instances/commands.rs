//! Serving the host's command subjects, `trellis.host.v1.<lattice>.<host_id>.<verb>`.
//!
//! Every command gets a reply in the control envelope: `{"ok":true,"data":{}}` when accepted (the
//! outcome follows as a fact) or `{"ok":false,"error":{…}}` when refused.

use futures::StreamExt as _;
use serde::Serialize;
use tokio::task::JoinHandle;
use trellis_schemas::control::decode_request;
use trellis_schemas::instance::{
    CommandAccepted, StartInstanceCommand, StartProviderCommand, StopInstanceCommand,
    StopProviderCommand,
};
use trellis_schemas::{ErrorBody, ErrorCode, HostId, Lattice, Reply, subject};

use super::manager::InstanceManager;
use crate::providers::Providers;

/// Subscribes to the host's command subjects and serves them until the task is aborted.
///
/// # Errors
///
/// The subscription failed (the client is closed).
pub async fn serve_commands(
    client: async_nats::Client,
    lattice: &Lattice,
    host_id: &HostId,
    manager: InstanceManager,
    providers: Providers,
) -> Result<JoinHandle<()>, async_nats::SubscribeError> {
    let mut commands = client
        .subscribe(subject::host_commands(lattice, host_id))
        .await?;
    let start = subject::host_command(lattice, host_id, "instance.start");
    let stop = subject::host_command(lattice, host_id, "instance.stop");
    let provider_start = subject::host_command(lattice, host_id, "provider.start");
    let provider_stop = subject::host_command(lattice, host_id, "provider.stop");
    let prefix = subject::host_command(lattice, host_id, "");
    Ok(tokio::spawn(async move {
        while let Some(message) = commands.next().await {
            let subject = message.subject.as_str();
            let outcome = if subject == start {
                decode_request::<StartInstanceCommand>(&message.payload)
                    .and_then(|command| manager.start(command))
            } else if subject == stop {
                decode_request::<StopInstanceCommand>(&message.payload)
                    .and_then(|command| manager.stop(command))
            } else if subject == provider_start {
                decode_request::<StartProviderCommand>(&message.payload)
                    .and_then(|command| providers.start(command))
            } else if subject == provider_stop {
                decode_request::<StopProviderCommand>(&message.payload)
                    .and_then(|command| providers.stop(&command))
            } else {
                let verb = subject.strip_prefix(prefix.as_str()).unwrap_or(subject);
                Err(ErrorBody::new(
                    ErrorCode::UnknownVerb,
                    format!(
                        "unknown host command {verb:?}; known: instance.start, instance.stop, provider.start, provider.stop"
                    ),
                ))
            };
            let Some(reply) = message.reply else { continue };
            let body = match outcome {
                Ok(()) => encode(&Reply::ok(CommandAccepted {})),
                Err(error) => {
                    tracing::info!(%subject, %error, "command refused");
                    encode(&Reply::<CommandAccepted>::err(error))
                }
            };
            if let Err(e) = client.publish(reply, body.into()).await {
                tracing::warn!(error = %e, "cannot reply to a command");
            }
        }
    }))
}

fn encode<T: Serialize>(reply: &Reply<T>) -> Vec<u8> {
    serde_json::to_vec(reply).unwrap_or_else(|e| {
        format!(r#"{{"ok":false,"error":{{"code":"internal","message":"cannot encode the reply: {e}"}}}}"#)
            .into_bytes()
    })
}
