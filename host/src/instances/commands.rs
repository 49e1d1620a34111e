//! Serving the host's command subjects, `trellis.host.v1.<lattice>.<host_id>.<verb>`.
//!
//! Every command gets a reply in the control envelope: `{"ok":true,"data":{}}` when accepted (the
//! outcome follows as a fact) or `{"ok":false,"error":{…}}` when refused.

use futures::StreamExt as _;
use serde::Serialize;
use tokio::task::JoinHandle;
use trellis_bus::dataplane as codec;
use trellis_bus::telemetry::{self, Kind, Span};
use trellis_schemas::control::decode_request;
use trellis_schemas::dataplane::{self, HostVerb};
use trellis_schemas::instance::{
    CommandAccepted, InstanceStatsCommand, StartInstanceCommand, StartProviderCommand,
    StopInstanceCommand, StopProviderCommand,
};
use trellis_schemas::logs::InstanceLogsCommand;
use trellis_schemas::{ErrorBody, ErrorCode, HostId, Lattice, Reply};

use super::manager::InstanceManager;
use crate::providers::Providers;

/// The reply body of a command that was accepted.
fn accepted((): ()) -> Vec<u8> {
    encode(&Reply::ok(CommandAccepted {}))
}

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
        .subscribe(dataplane::host_commands(lattice, host_id))
        .await?;
    let (lattice, host_id) = (lattice.clone(), host_id.clone());
    Ok(tokio::spawn(async move {
        while let Some(message) = commands.next().await {
            let subject = message.subject.as_str();
            let verb = dataplane::parse_host_command(&lattice, &host_id, subject);
            // The command's span; what the command starts carries its context on.
            let span = Span::start(
                Kind::Server,
                codec::header(message.headers.as_ref(), &codec::NAMES.traceparent),
                || match verb {
                    Ok(verb) => verb.as_str().to_owned(),
                    Err(_) => "unknown".to_owned(),
                },
            );
            let outcome = telemetry::in_trace(span.traceparent().map(str::to_owned), async {
                handle(&manager, &providers, verb, &message.payload)
            })
            .await;
            drop(span);
            let Some(reply) = message.reply else { continue };
            let body = match outcome {
                Ok(body) => body,
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

/// Answers one command.
fn handle(
    manager: &InstanceManager,
    providers: &Providers,
    verb: Result<HostVerb, &str>,
    payload: &[u8],
) -> Result<Vec<u8>, ErrorBody> {
    match verb {
        Ok(HostVerb::InstanceStart) => decode_request::<StartInstanceCommand>(payload)
            .and_then(|command| manager.start(command))
            .map(accepted),
        Ok(HostVerb::InstanceStop) => decode_request::<StopInstanceCommand>(payload)
            .and_then(|command| manager.stop(command))
            .map(accepted),
        Ok(HostVerb::InstanceStats) => decode_request::<InstanceStatsCommand>(payload)
            .map(|command| encode(&Reply::ok(manager.stats(&command.instance_ids)))),
        Ok(HostVerb::InstanceLogs) => decode_request::<InstanceLogsCommand>(payload)
            .map(|command| encode(&Reply::ok(manager.logs(&command)))),
        Ok(HostVerb::ProviderStart) => decode_request::<StartProviderCommand>(payload)
            .and_then(|command| providers.start(command))
            .map(accepted),
        Ok(HostVerb::ProviderStop) => decode_request::<StopProviderCommand>(payload)
            .and_then(|command| providers.stop(&command))
            .map(accepted),
        Err(verb) => Err(ErrorBody::new(
            ErrorCode::UnknownVerb,
            format!(
                "unknown host command {verb:?}; known: {}",
                HostVerb::known()
            ),
        )),
    }
}

fn encode<T: Serialize>(reply: &Reply<T>) -> Vec<u8> {
    serde_json::to_vec(reply).unwrap_or_else(|e| {
        format!(r#"{{"ok":false,"error":{{"code":"internal","message":"cannot encode the reply: {e}"}}}}"#)
            .into_bytes()
    })
}
