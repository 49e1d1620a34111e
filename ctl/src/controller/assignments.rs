//! `assignment.grant|revoke|list`: capability grants as facts.
//!
//! The controller validates a grant (known capability, well-formed provider configuration, an
//! existing instance, no second grant for the same target and capability) and records it as an
//! `assignment.granted` fact. Hosts and providers follow those facts and check every call
//! against them; the controller keeps nothing beyond its projection.

use trellis_schemas::control::{
    AssignmentGrantReply, AssignmentGrantRequest, AssignmentListReply, AssignmentListRequest,
    AssignmentRevokeReply, AssignmentRevokeRequest, Grant,
};
use trellis_schemas::fact::AssignmentRevoked;
use trellis_schemas::{
    Assignment, AssignmentId, AssignmentTarget, ErrorBody, ErrorCode, Event, FactData, Projection,
    ProviderName,
};

use super::state::State;

/// Checks a grant for `target` and turns it into an assignment with a fresh id.
pub(crate) fn validate(
    projection: &Projection,
    target: &AssignmentTarget,
    grant: &Grant,
    check_target_exists: bool,
) -> Result<Assignment, ErrorBody> {
    let capability = grant.capability;
    capability.validate_config(&grant.config).map_err(|e| {
        ErrorBody::new(ErrorCode::InvalidRequest, e)
            .with_details(serde_json::json!({ "capability": capability }))
    })?;
    let provider = match &grant.provider {
        Some(p) => p.clone(),
        None => ProviderName::new(capability.default_provider())
            .map_err(|e| ErrorBody::new(ErrorCode::Internal, e.to_string()))?,
    };
    if check_target_exists {
        check_target(projection, target, "grant")?;
    }
    if let Some(existing) = projection.assignment_of(target, capability) {
        return Err(ErrorBody::new(
            ErrorCode::Conflict,
            format!(
                "{} already holds {capability} through assignment {}; revoke it first (`trellis assignment revoke {}`)",
                target.describe(),
                existing.assignment.assignment_id,
                existing.assignment.assignment_id
            ),
        )
        .with_details(serde_json::json!({ "assignment_id": existing.assignment.assignment_id })));
    }
    Ok(Assignment {
        assignment_id: AssignmentId::generate(),
        target: target.clone(),
        capability,
        provider,
        config: grant.config.clone(),
    })
}

/// Checks that an instance `target` exists and has not ended (a component target may name
/// future instances); `verb` is what the caller does with it, for the hint.
pub(crate) fn check_target(
    projection: &Projection,
    target: &AssignmentTarget,
    verb: &str,
) -> Result<(), ErrorBody> {
    let AssignmentTarget::Instance(id) = target else {
        return Ok(());
    };
    match projection.instances.get(id) {
        Some(i) if i.status.is_active() => Ok(()),
        Some(i) => Err(ErrorBody::new(
            ErrorCode::InvalidRequest,
            format!(
                "instance {id} has ended ({}); {verb} to its component instead to cover future instances",
                i.status.as_str()
            ),
        )),
        None => Err(ErrorBody::new(
            ErrorCode::NotFound,
            format!("no instance {id}; `trellis instance ls` lists the instances"),
        )
        .with_details(serde_json::json!({ "instance_id": id }))),
    }
}

/// Records an assignment and returns the stream sequence of its fact.
pub(crate) async fn record(
    state: &State,
    assignment: &Assignment,
    causation: Option<&str>,
) -> Result<u64, ErrorBody> {
    let mut event = Event::new(
        state.source.clone(),
        FactData::AssignmentGranted(assignment.clone()),
    );
    if let Some(op) = causation {
        event = event.caused_by(op);
    }
    state.publish(&event).await
}

/// How many times a change is validated again because another fact was stored between the
/// replica's read of the stream and its change.
const AT_TIP_ATTEMPTS: usize = 20;

/// Grants at most one assignment per target and capability, even when two replicas are asked at
/// once or a client retries a grant whose reply it lost (see [`publish_validated_at_tip`]).
pub(crate) async fn grant(
    state: &State,
    request: AssignmentGrantRequest,
) -> Result<AssignmentGrantReply, ErrorBody> {
    let (assignment, seq) = publish_validated_at_tip(state, "grant", |projection| {
        let assignment = validate(projection, &request.target, &request.grant(), true)?;
        Ok((assignment.clone(), FactData::AssignmentGranted(assignment)))
    })
    .await?;
    Ok(AssignmentGrantReply { assignment, seq })
}

/// Validates a change against the projection at the stream's tip and stores its fact only if
/// the stream is still at that tip, retrying when another fact came in between: two replicas
/// asked at once, or a client retrying a request whose reply it lost, cannot both pass a check
/// (one grant per capability, one link per interface, no link cycle) that either would fail
/// after the other. Returns what `validate` returned besides the fact, and the fact's sequence.
pub(crate) async fn publish_validated_at_tip<T>(
    state: &State,
    what: &str,
    validate: impl Fn(&Projection) -> Result<(T, FactData), ErrorBody>,
) -> Result<(T, u64), ErrorBody> {
    let unavailable = |e: String| ErrorBody::new(ErrorCode::Unavailable, e);
    for _ in 0..AT_TIP_ATTEMPTS {
        let tip = trellis_bus::events_stream_state(&state.js, &state.config.lattice)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let read_to = if tip.messages == 0 {
            0
        } else {
            tip.last_sequence
        };
        if !state
            .wait_until_applied_for(read_to, state.config.min_seq_wait)
            .await
        {
            return Err(ErrorBody::new(
                ErrorCode::NotReady,
                format!(
                    "this controller has not yet applied facts up to sequence {read_to}; retry later"
                ),
            ));
        }
        let (value, data) = {
            let projection = state.projection();
            validate(&projection)?
        };
        let event = Event::new(state.source.clone(), data);
        let stored = trellis_bus::publish_at_tip(
            &state.js,
            &state.config.lattice,
            &event,
            tip.last_sequence,
        )
        .await
        .map_err(|e| unavailable(e.to_string()))?;
        if let Some(seq) = stored {
            state
                .wait_until_applied_for(seq, state.config.min_seq_wait)
                .await;
            return Ok((value, seq));
        }
    }
    Err(unavailable(format!(
        "the fact stream kept moving while the {what} was checked ({AT_TIP_ATTEMPTS} attempts); retry"
    )))
}

pub(crate) async fn revoke(
    state: &State,
    request: AssignmentRevokeRequest,
) -> Result<AssignmentRevokeReply, ErrorBody> {
    let assignment = {
        let projection = state.projection();
        projection
            .assignments()
            .get(&request.assignment_id)
            .map(|r| r.assignment.clone())
            .ok_or_else(|| {
                ErrorBody::new(
                    ErrorCode::NotFound,
                    format!(
                        "no assignment {} in force; `trellis assignment ls` lists them",
                        request.assignment_id
                    ),
                )
                .with_details(serde_json::json!({ "assignment_id": request.assignment_id }))
            })?
    };
    let event = Event::new(
        state.source.clone(),
        FactData::AssignmentRevoked(AssignmentRevoked {
            assignment_id: request.assignment_id,
            reason: "requested".to_owned(),
        }),
    );
    let seq = state.publish_and_apply(&event).await?;
    Ok(AssignmentRevokeReply { assignment, seq })
}

pub(crate) fn list(
    state: &State,
    request: AssignmentListRequest,
) -> Result<AssignmentListReply, ErrorBody> {
    let projection = state.projection();
    let component_of_instance = request
        .instance_id
        .as_ref()
        .and_then(|id| projection.instances.get(id))
        .map(|i| i.component.clone());
    let assignments = projection
        .assignments()
        .values()
        .filter(|r| match (&request.instance_id, &r.assignment.target) {
            (None, _) => true,
            (Some(id), AssignmentTarget::Instance(target)) => id == target,
            (Some(_), AssignmentTarget::Component(name)) => {
                component_of_instance.as_deref() == Some(name.as_str())
            }
        })
        .filter(|r| match (&request.component, &r.assignment.target) {
            (None, _) => true,
            (Some(c), AssignmentTarget::Component(name)) => c == name,
            (Some(_), AssignmentTarget::Instance(_)) => false,
        })
        .cloned()
        .collect();
    Ok(AssignmentListReply {
        assignments,
        as_of: projection.last_seq.max(state.as_of()),
    })
}
