//! `provider.start|stop|list`.
//!
//! Starting picks a live host (the one named, or the one supervising the fewest providers) and
//! sends it a command; the host spawns `trellis-provider-<name>` and supervises it, and the
//! provider announces itself with `provider.started`. Stopping goes to the supervising host, or
//! straight to a standalone provider's control subject.

use std::collections::BTreeMap;

use trellis_schemas::control::{
    ProviderListReply, ProviderListRequest, ProviderStartReply, ProviderStartRequest,
    ProviderStopReply, ProviderStopRequest,
};
use trellis_schemas::dataplane::{self, ProviderVerb};
use trellis_schemas::instance::{CommandAccepted, StartProviderCommand, StopProviderCommand};
use trellis_schemas::{
    ErrorBody, ErrorCode, HostId, HostStatus, ProviderId, ProviderStatus, Reply,
};

use super::instances::command;
use super::state::State;

pub(crate) async fn start(
    state: &State,
    request: ProviderStartRequest,
) -> Result<ProviderStartReply, ErrorBody> {
    for (key, value) in &request.config {
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            || value.contains(['\0', '\n'])
        {
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                format!("config {key:?}: keys are [A-Za-z0-9_-]+ and values one line"),
            ));
        }
    }
    let host_id = {
        let projection = state.projection();
        match &request.host_id {
            Some(host) => match projection.hosts.get(host) {
                Some(h) if h.status == HostStatus::Up => host.clone(),
                Some(h) => {
                    return Err(ErrorBody::new(
                        ErrorCode::NoHostAvailable,
                        format!("host {host} is {}", h.status.as_str()),
                    ));
                }
                None => {
                    return Err(ErrorBody::new(
                        ErrorCode::NotFound,
                        format!("no host {host}; `trellis host ls` lists the hosts"),
                    ));
                }
            },
            None => {
                let mut load: BTreeMap<&HostId, usize> =
                    projection.hosts_up().map(|h| (&h.host_id, 0)).collect();
                for p in projection.providers.values() {
                    if matches!(
                        p.status,
                        ProviderStatus::Running | ProviderStatus::Restarting
                    ) && let Some(count) = p.host_id.as_ref().and_then(|h| load.get_mut(h))
                    {
                        *count += 1;
                    }
                }
                load.into_iter()
                    .min_by_key(|(_, n)| *n)
                    .map(|(h, _)| h.clone())
                    .ok_or_else(|| {
                        ErrorBody::new(
                            ErrorCode::NoHostAvailable,
                            "no host is up to run the provider; start a host, or run the provider standalone (`trellis-provider-<name> --nats …`)",
                        )
                    })?
            }
        }
    };
    let operation_id = ulid::Ulid::generate().to_string();
    let provider_id = ProviderId::generate();
    let cmd = StartProviderCommand {
        operation_id: operation_id.clone(),
        provider_id: provider_id.clone(),
        name: request.name,
        config: request.config,
        embedded: request.embedded,
    };
    command(state, &host_id, &cmd).await?;
    Ok(ProviderStartReply {
        operation_id,
        provider_id,
        host_id,
    })
}

pub(crate) async fn stop(
    state: &State,
    request: ProviderStopRequest,
) -> Result<ProviderStopReply, ErrorBody> {
    let (host, status, name) = {
        let projection = state.projection();
        let record = projection
            .providers
            .get(&request.provider_id)
            .ok_or_else(|| {
                ErrorBody::new(
                    ErrorCode::NotFound,
                    format!(
                        "no provider {}; `trellis provider ls` lists them",
                        request.provider_id
                    ),
                )
            })?;
        (record.host_id.clone(), record.status, record.name.clone())
    };
    if !matches!(status, ProviderStatus::Running | ProviderStatus::Restarting) {
        return Err(ErrorBody::new(
            ErrorCode::InvalidRequest,
            format!(
                "provider {} has already ended ({})",
                request.provider_id,
                status.as_str()
            ),
        ));
    }
    match host {
        Some(host) => {
            let cmd = StopProviderCommand {
                operation_id: ulid::Ulid::generate().to_string(),
                provider_id: request.provider_id.clone(),
            };
            command(state, &host, &cmd).await?;
        }
        None => {
            let subject = dataplane::provider_control(
                &state.config.lattice,
                &name,
                &request.provider_id,
                ProviderVerb::Stop,
            );
            let reply = tokio::time::timeout(
                std::time::Duration::from_secs(5),
                state.client.request(subject, Vec::new().into()),
            )
            .await
            .map_err(|_| {
                ErrorBody::new(
                    ErrorCode::Unavailable,
                    format!("provider {} did not answer", request.provider_id),
                )
            })?
            .map_err(|e| {
                ErrorBody::new(
                    ErrorCode::Unavailable,
                    format!("provider {} unreachable: {e}", request.provider_id),
                )
            })?;
            let reply: Reply<CommandAccepted> = serde_json::from_slice(&reply.payload)
                .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?;
            reply.into_result()?;
        }
    }
    Ok(ProviderStopReply {
        provider_id: request.provider_id,
    })
}

pub(crate) fn list(
    state: &State,
    request: ProviderListRequest,
) -> Result<ProviderListReply, ErrorBody> {
    let projection = state.projection();
    let providers = projection
        .providers
        .values()
        .filter(|p| request.name.as_ref().is_none_or(|n| &p.name == n))
        .filter(|p| request.status.is_none_or(|s| s == p.status))
        .cloned()
        .collect();
    Ok(ProviderListReply {
        providers,
        as_of: projection.last_seq.max(state.as_of()),
    })
}
