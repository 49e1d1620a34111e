//! Relocation: the reaction to a `host.lost` fact.
//!
//! The replica whose `host.lost` was stored (exactly one, see [`super::liveness`]) replaces every
//! instance that fact made lost and whose restart policy is `always` or `backoff`: it places a
//! replacement with a **new** instance id on a live host, publishes `instance.relocated` on the
//! lost instance's subject (caused by the `host.lost`), then asks the host to start the
//! replacement with that fact's id as operation id, so the replacement's facts carry it as
//! `causationid`. Instances with policy `never` stay lost. This is a reaction to one fact, not a
//! reconciliation: nothing is retried later, and an instance that cannot be placed stays lost
//! with a warning saying why.
//!
//! The replacement gets the capabilities the lost instance had: its component's assignments
//! apply to it as to any new instance, and each assignment granted to the lost instance itself is
//! granted again to the replacement (`assignment.granted`, caused by the relocation).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use trellis_schemas::control::InstanceStartRequest;
use trellis_schemas::fact::{InstanceRelocated, InstanceStartFailed};
use trellis_schemas::instance::StartInstanceCommand;
use trellis_schemas::{
    Assignment, AssignmentId, AssignmentRecord, AssignmentTarget, ComponentName, ComponentSource,
    Event, FactData, HostId, InstanceId, InstanceRecord, InstanceStatus, RestartPolicy,
};

use super::assignments::record as record_assignment;
use super::instances::command;
use super::schedule::place_with;
use super::state::State;

/// How long to wait for this replica's projection to include the `host.lost` it published.
const APPLY_WAIT: Duration = Duration::from_secs(10);

/// One replacement decided: what to start where.
struct Move {
    lost: InstanceRecord,
    component: ComponentName,
    source: ComponentSource,
    /// The component's assignments, which apply to the replacement as they are.
    inherited: Vec<AssignmentRecord>,
    /// The lost instance's own assignments, to grant again to the replacement.
    own: Vec<Assignment>,
    restart: RestartPolicy,
    to_host: HostId,
    /// The replacement's id, chosen when it was placed.
    replacement: InstanceId,
}

/// Replaces the instances that the `host.lost` fact `lost_id`, stored at `lost_seq`, made lost.
pub(crate) async fn relocate(state: Arc<State>, host: HostId, lost_seq: u64, lost_id: String) {
    if !state.wait_until_applied_for(lost_seq, APPLY_WAIT).await {
        tracing::error!(%host, lost_seq, "the host.lost fact was not applied in time; its instances are not relocated");
        return;
    }
    let moves = plan(&state, &host, lost_seq);
    for mv in moves {
        let replacement = mv.replacement.clone();
        let relocated = Event::new(
            state.source.clone(),
            FactData::InstanceRelocated(InstanceRelocated {
                instance_id: mv.lost.instance_id.clone(),
                component: mv.component.clone(),
                from_host: host.clone(),
                replacement: replacement.clone(),
                to_host: mv.to_host.clone(),
            }),
        )
        .caused_by(lost_id.clone());
        let operation_id = relocated.id.to_string();
        if let Err(e) = state.publisher.publish(&relocated).await {
            tracing::error!(instance = %mv.lost.instance_id, error = %e, "cannot record instance.relocated; not relocating it");
            continue;
        }
        tracing::info!(
            instance = %mv.lost.instance_id, %replacement, from = %host, to = %mv.to_host,
            "relocating a lost instance"
        );
        let mut assignments = mv.inherited;
        for own in mv.own {
            let assignment = Assignment {
                assignment_id: AssignmentId::generate(),
                target: AssignmentTarget::Instance(replacement.clone()),
                ..own
            };
            match record_assignment(&state, &assignment, Some(&operation_id)).await {
                Ok(seq) => assignments.push(AssignmentRecord {
                    assignment,
                    granted_at: chrono::Utc::now(),
                    granted_seq: seq,
                }),
                Err(e) => {
                    tracing::error!(%replacement, error = %e, "cannot grant the lost instance's assignment to its replacement")
                }
            }
        }
        let start = StartInstanceCommand {
            operation_id: operation_id.clone(),
            instance_id: replacement.clone(),
            component: mv.source,
            restart: mv.restart,
            assignments,
        };
        if let Err(e) = command(&state, &mv.to_host, &start).await {
            tracing::warn!(%replacement, host = %mv.to_host, error = %e, "start command for a replacement failed");
            let failed = Event::new(
                state.source.clone(),
                FactData::InstanceStartFailed(InstanceStartFailed {
                    instance_id: replacement,
                    host_id: mv.to_host,
                    component: mv.lost.component.clone(),
                    reason: e.message,
                }),
            )
            .caused_by(operation_id);
            if let Err(e) = state.publisher.publish(&failed).await {
                tracing::error!(error = %e, "cannot record instance.start_failed");
            }
        }
    }
}

/// Decides, from the projection, which lost instances move where.
fn plan(state: &State, host: &HostId, lost_seq: u64) -> Vec<Move> {
    let projection = state.projection();
    // Counted once for the whole plan, each placement added as it is made, then recorded as
    // placed for the plans and placements that follow.
    let placing = state
        .placing
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut loads = state.loads(&projection);
    let mut placed = Vec::new();
    let mut moves = Vec::new();
    let lost = projection.instances.values().filter(|i| {
        &i.host_id == host && i.status == InstanceStatus::Lost && i.status_seq == lost_seq
    });
    for instance in lost {
        let restart = instance.restart.unwrap_or_default();
        if restart == RestartPolicy::Never {
            tracing::info!(instance = %instance.instance_id, "lost with restart policy never: stays lost");
            continue;
        }
        let artifact = instance
            .digest
            .as_ref()
            .and_then(|d| projection.artifacts.get(d));
        let Some(artifact) = artifact else {
            tracing::warn!(
                instance = %instance.instance_id,
                "lost instance's code is not in the artifact store (started from a file?): it cannot be relocated"
            );
            continue;
        };
        let request = InstanceStartRequest {
            component: artifact.digest.clone(),
            count: 1,
            host_id: None,
            labels: BTreeMap::new(),
            restart,
            grants: Vec::new(),
            min_seq: None,
        };
        let component = artifact.manifest.name.clone();
        let inherited = projection
            .assignments
            .values()
            .filter(|r| matches!(&r.assignment.target, AssignmentTarget::Component(c) if c == &component))
            .cloned()
            .collect();
        let own = projection
            .assignments
            .values()
            .filter(|r| matches!(&r.assignment.target, AssignmentTarget::Instance(i) if i == &instance.instance_id))
            .map(|r| r.assignment.clone())
            .collect();
        let memory = artifact.manifest.max_memory_bytes;
        match place_with(&projection, &loads, &request, Some(memory)) {
            Ok(hosts) => {
                let Some(to_host) = hosts.into_iter().next() else {
                    continue;
                };
                let replacement = InstanceId::generate();
                loads.add(&to_host, memory);
                placed.push((replacement.clone(), to_host.clone(), memory));
                moves.push(Move {
                    lost: instance.clone(),
                    component,
                    inherited,
                    own,
                    source: artifact.source(),
                    restart,
                    to_host,
                    replacement,
                });
            }
            Err(e) => tracing::warn!(
                instance = %instance.instance_id,
                reason = %e.message,
                "no live host can take a lost instance: it stays lost"
            ),
        }
    }
    state.placed(placed);
    drop(placing);
    moves
}
