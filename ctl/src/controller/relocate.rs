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
//! The replacement keeps the lost instance's isolation: a `microvm` instance is placed only on a
//! host that runs micro-VMs, and its host is told to run it in one.
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
use trellis_schemas::isolation::Isolation;
use trellis_schemas::{
    ArtifactRecord, Assignment, AssignmentId, AssignmentRecord, AssignmentTarget, ComponentName,
    ComponentSource, Event, FactData, HostId, InstanceId, InstanceRecord, InstanceStatus,
    RestartPolicy,
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
    /// The lost instance's isolation, which the replacement keeps.
    isolation: Isolation,
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
            // Left out when `process`, as by `instance.start`.
            isolation: (!mv.isolation.is_process()).then_some(mv.isolation),
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
        let request = replacement_request(instance, artifact, restart);
        let isolation = request.isolation.unwrap_or_default();
        let component = artifact.manifest.name.clone();
        let inherited = projection
            .assignments()
            .values()
            .filter(|r| matches!(&r.assignment.target, AssignmentTarget::Component(c) if c == &component))
            .cloned()
            .collect();
        let own = projection
            .assignments()
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
                    isolation,
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

/// What placing the replacement of the lost `instance`, whose code is `artifact`, asks for: one
/// instance anywhere, with the isolation the lost one ran with (at least its manifest's, perhaps
/// stronger by its start request) and never less than its manifest sets.
fn replacement_request(
    instance: &InstanceRecord,
    artifact: &ArtifactRecord,
    restart: RestartPolicy,
) -> InstanceStartRequest {
    InstanceStartRequest {
        component: artifact.digest.clone(),
        count: 1,
        host_id: None,
        labels: BTreeMap::new(),
        restart,
        grants: Vec::new(),
        min_seq: None,
        isolation: Some(instance.isolation.max(artifact.manifest.isolation)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_schemas::instance::ManifestDoc;
    use trellis_schemas::{Capacity, HostRecord, HostStatus, Projection};

    use crate::controller::schedule::place;

    fn artifact(isolation: Isolation) -> ArtifactRecord {
        ArtifactRecord {
            digest: "sha256:00".into(),
            size: 1,
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
            stored_at: chrono::Utc::now(),
            signature: None,
            exports: None,
        }
    }

    fn lost(isolation: Isolation) -> InstanceRecord {
        InstanceRecord {
            instance_id: InstanceId::new("01J00000000000000000000001").expect("valid"),
            host_id: HostId::new("gone").expect("valid"),
            component: "c".into(),
            version: Some("1.0.0".into()),
            digest: Some("sha256:00".into()),
            restart: Some(RestartPolicy::Always),
            status: InstanceStatus::Lost,
            attempt: 0,
            last_reason: None,
            started_at: None,
            status_since: chrono::Utc::now(),
            status_seq: 1,
            replaced_by: None,
            isolation,
            acceleration: None,
        }
    }

    #[test]
    fn a_replacement_keeps_its_isolation_and_goes_where_micro_vms_run() {
        use Isolation::{Microvm, Process};
        let isolation_of = |instance: Isolation, manifest: Isolation| {
            replacement_request(&lost(instance), &artifact(manifest), RestartPolicy::Always)
                .isolation
        };
        // Started as a micro-VM on request, or by its manifest: a micro-VM again.
        assert_eq!(isolation_of(Microvm, Process), Some(Microvm));
        assert_eq!(isolation_of(Process, Microvm), Some(Microvm));
        assert_eq!(isolation_of(Process, Process), Some(Process));

        let mut p = Projection::new();
        for (id, microvm) in [
            ("a", None),
            ("b", Some(trellis_schemas::isolation::Acceleration::Kvm)),
        ] {
            let host_id = HostId::new(id).expect("valid");
            p.hosts.insert(
                host_id.clone(),
                HostRecord {
                    host_id,
                    status: HostStatus::Up,
                    labels: BTreeMap::new(),
                    capacity: Capacity {
                        max_instances: 10,
                        memory_bytes: 1 << 30,
                        cpus: 1,
                        microvm,
                    },
                    version: "0".into(),
                    started_at: chrono::Utc::now(),
                    status_since: chrono::Utc::now(),
                    status_seq: 1,
                },
            );
        }
        let request =
            replacement_request(&lost(Microvm), &artifact(Process), RestartPolicy::Always);
        let placed = place(&p, &request, Some(1 << 20)).expect("b runs micro-VMs");
        assert_eq!(placed, [HostId::new("b").expect("valid")]);
    }
}
