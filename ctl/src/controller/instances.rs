//! `instance.start|stop|list|get`.
//!
//! The controller validates, resolves the component, places the instances and sends each host a
//! command; the host answers at once and reports the outcome as facts carrying the operation id.
//! If a host cannot be reached, the controller records `instance.start_failed` itself.

use std::time::Duration;

use futures::future::join_all;
use trellis_bus::{FactStream, StartAt};
use trellis_schemas::control::{
    HistoryEntry, InstanceGetReply, InstanceGetRequest, InstanceListReply, InstanceListRequest,
    InstanceStartReply, InstanceStartRequest, InstanceStopReply, InstanceStopRequest, Placement,
    page_size,
};
use trellis_schemas::dataplane;
use trellis_schemas::fact::InstanceStartFailed;
use trellis_schemas::instance::{
    CommandAccepted, HostCommand, StartInstanceCommand, StopInstanceCommand,
};
use trellis_schemas::isolation::Isolation;
use trellis_schemas::{
    AssignmentRecord, AssignmentTarget, ComponentSource, ErrorBody, ErrorCode, Event, FactData,
    HostId, InstanceId, InstanceStatus, Projection, Reply, subject,
};

use super::assignments::{record as record_assignment, validate as validate_grant};
use super::components::manifest_error;
use super::schedule::place_with;
use super::serve::page;
use super::state::State;

/// How long a host may take to accept a command.
const HOST_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// The most instances one request may start.
const MAX_COUNT: u32 = 100;

/// What `component` in a start request refers to: the source to send hosts, and the memory limit
/// when known (for placement).
fn resolve(
    projection: &Projection,
    component: &str,
) -> Result<(ComponentSource, Option<u64>), ErrorBody> {
    if let Some(path) = component.strip_prefix("file://") {
        if path.is_empty() {
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                "file:// needs a path",
            ));
        }
        return Ok((
            ComponentSource::File {
                path: path.to_owned(),
                manifest_path: None,
            },
            None,
        ));
    }
    let artifact = if component.starts_with("sha256:") {
        projection.artifacts.get(component)
    } else {
        let (name, version) = match component.split_once('@') {
            Some((n, v)) => (n, Some(v)),
            None => (component, None),
        };
        projection.find_artifact(name, version)
    };
    let Some(artifact) = artifact else {
        let known: Vec<String> = projection
            .artifacts
            .values()
            .map(|a| format!("{}@{}", a.manifest.name, a.manifest.version))
            .collect();
        return Err(ErrorBody::new(
            ErrorCode::NotFound,
            format!(
                "no component {component:?} in the artifact store; push it with `trellis component push`"
            ),
        )
        .with_details(serde_json::json!({ "known": known })));
    };
    // The stored manifest was validated when registered; check again, it costs nothing.
    artifact
        .manifest
        .to_manifest()
        .map_err(|e| manifest_error(&e))?;
    Ok((artifact.source(), Some(artifact.manifest.max_memory_bytes)))
}

/// The isolation instances of `source` get when a start asks for `requested`: for a stored
/// component, the manifest's strengthened by the request (`invalid_request` when the request
/// would weaken it); for a file, the request's (the host reads the file's manifest and applies
/// it too).
fn isolation(
    source: &ComponentSource,
    requested: Option<Isolation>,
) -> Result<Option<Isolation>, ErrorBody> {
    match source {
        ComponentSource::Artifact { manifest, .. } => {
            Isolation::resolve(manifest.isolation, requested)
                .map(Some)
                .map_err(|e| {
                    ErrorBody::new(ErrorCode::InvalidRequest, e).with_details(serde_json::json!({
                        "field": "isolation",
                        "requested": requested,
                        "manifest": manifest.isolation,
                    }))
                })
        }
        ComponentSource::File { .. } => Ok(requested),
    }
}

/// Sends `command` to `host` on its verb's subject and waits for its acceptance.
pub(crate) async fn command<T: HostCommand>(
    state: &State,
    host: &HostId,
    command: &T,
) -> Result<(), ErrorBody> {
    ask::<T, CommandAccepted>(state, host, command)
        .await
        .map(|_| ())
}

/// Sends `command` to `host` on its verb's subject and returns the data of its reply.
pub(crate) async fn ask<T: HostCommand, R: serde::de::DeserializeOwned>(
    state: &State,
    host: &HostId,
    command: &T,
) -> Result<R, ErrorBody> {
    let subject = dataplane::host_command(&state.config.lattice, host, T::VERB);
    let body = serde_json::to_vec(command)
        .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?;
    let mut headers = async_nats::HeaderMap::new();
    if let Some(traceparent) = trellis_bus::telemetry::current() {
        headers.insert(
            trellis_bus::dataplane::NAMES.traceparent.clone(),
            traceparent.as_str(),
        );
    }
    let reply = tokio::time::timeout(
        HOST_COMMAND_TIMEOUT,
        state
            .client
            .request_with_headers(subject, headers, body.into()),
    )
    .await
    .map_err(|_| {
        ErrorBody::new(
            ErrorCode::Unavailable,
            format!("host {host} did not answer within {HOST_COMMAND_TIMEOUT:?}"),
        )
    })?
    .map_err(|e| {
        ErrorBody::new(
            ErrorCode::Unavailable,
            format!("host {host} unreachable: {e}"),
        )
    })?;
    let reply: Reply<R> = serde_json::from_slice(&reply.payload).map_err(|e| {
        ErrorBody::new(
            ErrorCode::Internal,
            format!("host {host} sent a malformed reply: {e}"),
        )
    })?;
    reply.into_result()
}

pub(crate) async fn start(
    state: &State,
    mut request: InstanceStartRequest,
) -> Result<InstanceStartReply, ErrorBody> {
    if !(1..=MAX_COUNT).contains(&request.count) {
        return Err(ErrorBody::new(
            ErrorCode::InvalidRequest,
            format!(
                "count {} is out of range; accepted 1..={MAX_COUNT}",
                request.count
            ),
        ));
    }
    request
        .restart
        .validate()
        .map_err(|e| ErrorBody::new(ErrorCode::InvalidRequest, format!("restart: {e}")))?;
    let operation_id = ulid::Ulid::generate().to_string();
    let (source, placements, inherited, grants) = {
        let projection = state.projection();
        let (source, memory) = resolve(&projection, &request.component)?;
        // From here on, the isolation the instances get: placement and hosts go by it.
        request.isolation = isolation(&source, request.isolation)?;
        if let ComponentSource::Artifact { manifest, .. } = &source {
            let missing = super::links::missing_links(&projection, manifest);
            if let Some(first) = missing.first() {
                let names: Vec<&str> = missing.iter().map(|i| i.as_str()).collect();
                return Err(ErrorBody::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "link required: {} (required by Component.toml); link it first, e.g. `trellis link add component:{} {first} <target>`",
                        names.join(", "),
                        manifest.name
                    ),
                )
                .with_details(serde_json::json!({ "missing_links": names })));
            }
        }
        let placing = state
            .placing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let loads = state.loads(&projection);
        let hosts = place_with(&projection, &loads, &request, memory)?;
        let placements: Vec<Placement> = hosts
            .into_iter()
            .map(|host_id| Placement {
                instance_id: InstanceId::generate(),
                host_id,
            })
            .collect();
        // The component's own assignments apply to every new instance.
        let name = component_name(&source);
        let inherited: Vec<AssignmentRecord> = projection
            .assignments()
            .values()
            .filter(|r| {
                matches!(&r.assignment.target, AssignmentTarget::Component(c) if Some(c.as_str()) == name.as_deref())
            })
            .cloned()
            .collect();
        // Validate every grant for every instance before recording any of them.
        let mut grants = Vec::new();
        for p in &placements {
            let target = AssignmentTarget::Instance(p.instance_id.clone());
            let mut own = Vec::new();
            for grant in &request.grants {
                if own
                    .iter()
                    .any(|a: &trellis_schemas::Assignment| a.capability == grant.capability)
                {
                    return Err(ErrorBody::new(
                        ErrorCode::InvalidRequest,
                        format!("{} is granted twice", grant.capability),
                    ));
                }
                own.push(validate_grant(&projection, &target, grant, false)?);
            }
            grants.push(own);
        }
        // Valid: what was placed takes room until its facts arrive.
        state.placed(placements.iter().map(|p| {
            (
                p.instance_id.clone(),
                p.host_id.clone(),
                memory.unwrap_or(0),
            )
        }));
        drop(placing);
        (source, placements, inherited, grants)
    };
    let mut commands = Vec::with_capacity(placements.len());
    for (p, own) in placements.iter().zip(grants) {
        let mut assignments = inherited.clone();
        for assignment in own {
            let seq = record_assignment(state, &assignment, Some(&operation_id)).await?;
            assignments.push(AssignmentRecord {
                assignment,
                granted_at: chrono::Utc::now(),
                granted_seq: seq,
            });
        }
        commands.push((
            p,
            StartInstanceCommand {
                operation_id: operation_id.clone(),
                instance_id: p.instance_id.clone(),
                component: source.clone(),
                restart: request.restart,
                assignments,
                // `process` is what hosts do unless told otherwise: left out, so that a host of
                // an earlier version (which refuses unknown fields) still takes the command.
                isolation: request.isolation.filter(|i| !i.is_process()),
            },
        ));
    }
    let sends = commands
        .iter()
        .map(|(p, cmd)| async move { (*p, command(state, &p.host_id, cmd).await) });
    for (placement, result) in join_all(sends).await {
        if let Err(e) = result {
            tracing::warn!(instance = %placement.instance_id, host = %placement.host_id, error = %e, "start command failed");
            let event = Event::new(
                state.source.clone(),
                FactData::InstanceStartFailed(InstanceStartFailed {
                    instance_id: placement.instance_id.clone(),
                    host_id: placement.host_id.clone(),
                    component: request.component.clone(),
                    reason: e.message.clone(),
                }),
            )
            .caused_by(operation_id.clone());
            if let Err(e) = state.publisher.publish(&event).await {
                tracing::error!(error = %e, "cannot record instance.start_failed");
            }
        }
    }
    Ok(InstanceStartReply {
        operation_id,
        instances: placements,
    })
}

/// The component name a source refers to, when the controller knows it.
fn component_name(source: &ComponentSource) -> Option<String> {
    match source {
        ComponentSource::Artifact { manifest, .. } => Some(manifest.name.to_string()),
        ComponentSource::File { .. } => None,
    }
}

fn not_found(id: &InstanceId) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::NotFound,
        format!("no instance {id}; `trellis instance ls` lists the instances"),
    )
    .with_details(serde_json::json!({ "instance_id": id }))
}

pub(crate) async fn stop(
    state: &State,
    request: InstanceStopRequest,
) -> Result<InstanceStopReply, ErrorBody> {
    let (host_id, status) = {
        let projection = state.projection();
        let instance = projection
            .instances
            .get(&request.instance_id)
            .ok_or_else(|| not_found(&request.instance_id))?;
        (instance.host_id.clone(), instance.status)
    };
    if matches!(
        status,
        InstanceStatus::Stopped
            | InstanceStatus::Failed
            | InstanceStatus::GaveUp
            | InstanceStatus::Lost
    ) {
        return Err(ErrorBody::new(
            ErrorCode::InvalidRequest,
            format!(
                "instance {} has already ended ({})",
                request.instance_id,
                status.as_str()
            ),
        ));
    }
    let operation_id = ulid::Ulid::generate().to_string();
    let cmd = StopInstanceCommand {
        operation_id: operation_id.clone(),
        instance_id: request.instance_id.clone(),
        reason: None,
    };
    command(state, &host_id, &cmd).await?;
    Ok(InstanceStopReply {
        operation_id,
        instance: Placement {
            instance_id: request.instance_id,
            host_id,
        },
    })
}

pub(crate) fn list(
    state: &State,
    request: InstanceListRequest,
) -> Result<InstanceListReply, ErrorBody> {
    let limit = page_size(request.limit)?;
    let projection = state.projection();
    let (instances, next_after) = page(&projection.instances, request.after.as_ref(), limit, |i| {
        request.component.as_ref().is_none_or(|c| &i.component == c)
            && request.host_id.as_ref().is_none_or(|h| &i.host_id == h)
            && request.status.is_none_or(|s| s == i.status)
    });
    Ok(InstanceListReply {
        as_of: projection.last_seq.max(state.as_of()),
        instances: instances.into_iter().cloned().collect(),
        next_after,
    })
}

pub(crate) async fn get(
    state: &State,
    request: InstanceGetRequest,
) -> Result<InstanceGetReply, ErrorBody> {
    let (instance, as_of) = {
        let projection = state.projection();
        let instance = projection
            .instances
            .get(&request.instance_id)
            .cloned()
            .ok_or_else(|| not_found(&request.instance_id))?;
        (instance, projection.last_seq.max(state.as_of()))
    };
    let history = history(state, &request.instance_id, as_of).await?;
    Ok(InstanceGetReply {
        as_of,
        instance,
        history,
    })
}

/// The instance's facts the stream still keeps, up to `as_of`.
async fn history(
    state: &State,
    id: &InstanceId,
    as_of: u64,
) -> Result<Vec<HistoryEntry>, ErrorBody> {
    let unavailable =
        |e: trellis_bus::ReadError| ErrorBody::new(ErrorCode::Unavailable, e.to_string());
    let mut reader = FactStream::open(
        &state.client,
        &state.js,
        &subject::events_stream(&state.config.lattice),
        Some(subject::events_of_instance(&state.config.lattice, id)),
        StartAt::Beginning,
    )
    .await
    .map_err(unavailable)?;
    let mut history = Vec::new();
    let read = async {
        while let Some(raw) = reader.next().await {
            let raw = raw.map_err(unavailable)?;
            if raw.seq > as_of {
                break;
            }
            if let Ok(event) = Event::decode(&raw.payload) {
                history.push(HistoryEntry {
                    seq: raw.seq,
                    time: event.time,
                    kind: event.kind().short_name(),
                    summary: event.summary(),
                    causation_id: event.causation_id.clone(),
                });
            }
            if raw.pending == 0 {
                break;
            }
        }
        Ok::<(), ErrorBody>(())
    };
    tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .map_err(|_| {
            ErrorBody::new(
                ErrorCode::Unavailable,
                "reading the instance's history timed out",
            )
        })??;
    Ok(history)
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_schemas::ComponentName;
    use trellis_schemas::instance::ManifestDoc;

    fn stored(isolation: Isolation) -> ComponentSource {
        ComponentSource::Artifact {
            digest: "sha256:00".into(),
            manifest: ManifestDoc {
                name: ComponentName::new("c").expect("valid"),
                version: "1.0.0".into(),
                max_memory_bytes: 1 << 20,
                fuel: 1,
                timeout_ms: 1,
                max_concurrency: 1,
                imports: vec![],
                requires: vec![],
                required_links: vec![],
                isolation,
            },
            signature: None,
        }
    }

    #[test]
    fn a_start_gets_the_manifests_isolation_or_stronger_never_weaker() {
        use Isolation::{Microvm, Process};
        assert_eq!(isolation(&stored(Process), None), Ok(Some(Process)));
        assert_eq!(isolation(&stored(Microvm), None), Ok(Some(Microvm)));
        assert_eq!(
            isolation(&stored(Process), Some(Microvm)),
            Ok(Some(Microvm))
        );
        let err = isolation(&stored(Microvm), Some(Process)).expect_err("weaker");
        assert_eq!(err.code, ErrorCode::InvalidRequest);
        assert!(err.message.contains("weaker"), "{}", err.message);
        assert_eq!(err.details.expect("details")["field"], "isolation");
        // A file's manifest is the host's to read: the request goes as it is.
        let file = ComponentSource::File {
            path: "/c.wasm".into(),
            manifest_path: None,
        };
        assert_eq!(isolation(&file, None), Ok(None));
        assert_eq!(isolation(&file, Some(Process)), Ok(Some(Process)));
    }
}
