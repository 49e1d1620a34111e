//! Answering control requests.

use std::collections::BTreeMap;
use std::ops::Bound;
use std::time::{Duration, Instant};

use async_nats::{Client, Message};
use serde::Serialize;
use trellis_schemas::control::{
    ControllerInfo, HostCounts, HostGetReply, HostGetRequest, HostListReply, HostListRequest,
    ProjectionReply, ProjectionRequest, RECENT_FAILURES_LISTED, RECENT_FAILURES_SECS,
    RecentFailure, RolloutBrief, StatusReply, StatusRequest, StreamSummary, decode_request,
    page_size,
};
use trellis_schemas::{
    CtlOp, CtlRequest, ErrorBody, ErrorCode, HostStatus, InstanceStatus, Lattice, Projection,
    ProviderStatus, Reply, subject,
};

use super::state::State;
use super::{assignments, components, instances, links, providers, rollouts};
use trellis_bus::telemetry::{self, Kind, Span};
use trellis_schemas::audit::{AuditCaller, AuditEvent, AuditType};

/// Answers one request; every request with a reply subject gets exactly one reply.
pub(crate) async fn handle(state: &State, client: &Client, message: Message) {
    let Some(reply_to) = message.reply.clone() else {
        tracing::debug!(subject = %message.subject, "ignoring control message without reply subject");
        return;
    };
    // Traced when the request carries trace context (or export is on): the span's context goes
    // with the host commands the request sends and the facts it records.
    let incoming = trellis_bus::dataplane::header(
        message.headers.as_ref(),
        &trellis_bus::dataplane::NAMES.traceparent,
    );
    let span = Span::start(Kind::Server, incoming, || {
        subject::parse_ctl(&state.config.lattice, message.subject.as_str()).map_or_else(
            || "unknown".to_owned(),
            |(noun, verb)| format!("{noun}.{verb}"),
        )
    });
    let traceparent = span.traceparent().map(str::to_owned);
    let (body, op, outcome) = telemetry::in_trace(
        traceparent.clone(),
        answer(state, message.subject.as_str(), &message.payload),
    )
    .await;
    drop(span);
    if let Err(e) = client.publish(reply_to, body.into()).await {
        tracing::warn!(error = %e, "cannot send reply");
    }
    let mut event = AuditEvent::new(
        AuditType::Control,
        format!("controller/{}", state.config.replica_id),
        outcome,
    );
    event.operation = Some(op);
    event.caller = caller(state, &message);
    event.trace_id = traceparent
        .as_deref()
        .and_then(trellis_schemas::dataplane::trace_id)
        .map(str::to_owned);
    state.audit.record(&event).await;
}

/// Who sent a control request, as its identity headers say and the lattice's users name them.
fn caller(state: &State, message: &Message) -> Option<AuditCaller> {
    let (key, verified) = trellis_bus::audit::request_identity(
        message.headers.as_ref(),
        message.subject.as_str(),
        &message.payload,
    )?;
    let known = state.config.users.get(&key);
    Some(AuditCaller {
        user: known.map_or_else(|| key.clone(), |u| u.name.clone()),
        role: known.map_or_else(|| "unknown".to_owned(), |u| u.role.clone()),
        verified,
    })
}

/// The encoded reply, the operation's name and the outcome (`ok` or the error code).
async fn answer(state: &State, subject_name: &str, body: &[u8]) -> (Vec<u8>, String, String) {
    let lattice = &state.config.lattice;
    let op = subject::parse_ctl(lattice, subject_name)
        .and_then(|(noun, verb)| CtlOp::from_parts(noun, verb));
    let Some(op) = op else {
        let unknown = subject::parse_ctl(lattice, subject_name)
            .map_or_else(|| "unknown".to_owned(), |(n, v)| format!("{n}.{v}"));
        super::metrics::REQUESTS.answered(
            "unknown",
            ErrorCode::UnknownVerb.as_str(),
            Duration::ZERO,
        );
        let known: Vec<String> = CtlOp::ALL.iter().map(|op| op.name()).collect();
        let reply = encode(&Reply::<()>::err(
            ErrorBody::new(
                ErrorCode::UnknownVerb,
                format!(
                    "{subject_name:?} is not a control operation; use trellis.ctl.v1.{lattice}.<noun>.<verb> with one of: {}",
                    known.join(", ")
                ),
            )
            .with_details(serde_json::json!({ "known": known })),
        ));
        return (reply, unknown, ErrorCode::UnknownVerb.as_str().to_owned());
    };
    let (reply, outcome) = match op {
        CtlOp::HostList => respond(state, body, async |s, r| host_list(s, r)).await,
        CtlOp::HostGet => respond(state, body, async |s, r| host_get(s, r)).await,
        CtlOp::LatticeStatus => {
            respond(state, body, async |s, _: StatusRequest| status(s).await).await
        }
        CtlOp::LatticeProjection => respond(state, body, async |s, r| projection(s, r)).await,
        CtlOp::ComponentRegister => respond(state, body, components::register).await,
        CtlOp::ComponentList => respond(state, body, async |s, r| components::list(s, r)).await,
        CtlOp::InstanceStart => respond(state, body, instances::start).await,
        CtlOp::InstanceStop => respond(state, body, instances::stop).await,
        CtlOp::InstanceList => respond(state, body, async |s, r| instances::list(s, r)).await,
        CtlOp::InstanceGet => respond(state, body, instances::get).await,
        CtlOp::InstanceLogs => respond(state, body, super::logs::logs).await,
        CtlOp::AssignmentGrant => respond(state, body, assignments::grant).await,
        CtlOp::AssignmentRevoke => respond(state, body, assignments::revoke).await,
        CtlOp::AssignmentList => respond(state, body, async |s, r| assignments::list(s, r)).await,
        CtlOp::LinkAdd => respond(state, body, links::add).await,
        CtlOp::LinkRemove => respond(state, body, links::remove).await,
        CtlOp::LinkList => respond(state, body, async |s, r| links::list(s, r)).await,
        CtlOp::ProviderStart => respond(state, body, providers::start).await,
        CtlOp::ProviderStop => respond(state, body, providers::stop).await,
        CtlOp::ProviderList => respond(state, body, async |s, r| providers::list(s, r)).await,
        CtlOp::RolloutStart => respond(state, body, rollouts::start).await,
        CtlOp::RolloutGet => respond(state, body, async |s, r| rollouts::get(s, r)).await,
        CtlOp::RolloutList => respond(state, body, async |s, r| rollouts::list(s, r)).await,
        CtlOp::RolloutPromote => respond(state, body, rollouts::promote).await,
        CtlOp::RolloutAbort => respond(state, body, rollouts::abort).await,
        CtlOp::RolloutUndo => respond(state, body, rollouts::undo).await,
    };
    (reply, op.name(), outcome.to_owned())
}

fn encode<T: Serialize>(reply: &Reply<T>) -> Vec<u8> {
    serde_json::to_vec(reply).unwrap_or_else(|e| {
        format!(
            r#"{{"ok":false,"error":{{"code":"internal","message":"cannot encode reply: {e}"}}}}"#
        )
        .into_bytes()
    })
}

/// Decodes the request and waits for its `min_seq`.
async fn prepare<R: CtlRequest>(state: &State, body: &[u8]) -> Result<R, ErrorBody> {
    let request: R = decode_request(body)?;
    if let Some(min_seq) = request.min_seq()
        && !state
            .wait_until_applied_for(min_seq, state.config.min_seq_wait)
            .await
    {
        return Err(ErrorBody::new(
            ErrorCode::NotReady,
            format!(
                "this controller has applied facts up to sequence {}, not yet {min_seq}; retry later",
                state.as_of()
            ),
        )
        .with_details(serde_json::json!({ "as_of": state.as_of(), "min_seq": min_seq })));
    }
    Ok(request)
}

async fn respond<R: CtlRequest>(
    state: &State,
    body: &[u8],
    f: impl AsyncFnOnce(&State, R) -> Result<R::Reply, ErrorBody>,
) -> (Vec<u8>, &'static str) {
    let started = Instant::now();
    let result = match prepare::<R>(state, body).await {
        Ok(request) => f(state, request).await,
        Err(e) => Err(e),
    };
    let code = result.as_ref().map_or_else(|e| e.code.as_str(), |_| "ok");
    super::metrics::REQUESTS.answered(&R::OP.name(), code, started.elapsed());
    let reply = encode(&match result {
        Ok(data) => Reply::ok(data),
        Err(error) => Reply::err(error),
    });
    (reply, code)
}

fn host_list(state: &State, request: HostListRequest) -> Result<HostListReply, ErrorBody> {
    let limit = page_size(request.limit)?;
    let projection = state.projection();
    let live = state.live();
    let (hosts, next_after) = page(&projection.hosts, request.after.as_ref(), limit, |h| {
        request.status.is_none_or(|s| s == h.status)
    });
    Ok(HostListReply {
        as_of: projection.last_seq.max(state.as_of()),
        hosts: hosts
            .into_iter()
            .map(|h| state.view(h, live.get(&h.host_id)))
            .collect(),
        next_after,
    })
}

/// One page of the entries of `map` after the key `after` that `keep` accepts, and the key to
/// continue after when there are more.
pub(crate) fn page<'a, K: Ord + Clone, V>(
    map: &'a BTreeMap<K, V>,
    after: Option<&K>,
    limit: usize,
    keep: impl Fn(&V) -> bool,
) -> (Vec<&'a V>, Option<K>) {
    let start = after.map_or(Bound::Unbounded, Bound::Excluded);
    let mut entries: Vec<(&K, &V)> = map
        .range((start, Bound::Unbounded))
        .filter(|(_, v)| keep(v))
        .take(limit + 1)
        .collect();
    let next = (entries.len() > limit).then(|| {
        entries.truncate(limit);
        entries.last().map(|(k, _)| (*k).clone())
    });
    (
        entries.into_iter().map(|(_, v)| v).collect(),
        next.flatten(),
    )
}

fn host_get(state: &State, request: HostGetRequest) -> Result<HostGetReply, ErrorBody> {
    let projection = state.projection();
    let Some(record) = projection.hosts.get(&request.host_id) else {
        return Err(ErrorBody::new(
            ErrorCode::NotFound,
            format!(
                "no host {:?} in lattice {}; `trellis host ls` lists the hosts",
                request.host_id.as_str(),
                state.config.lattice
            ),
        )
        .with_details(serde_json::json!({ "host_id": request.host_id })));
    };
    let live = state.live();
    Ok(HostGetReply {
        as_of: projection.last_seq.max(state.as_of()),
        host: state.view(record, live.get(&request.host_id)),
    })
}

fn projection(state: &State, _: ProjectionRequest) -> Result<ProjectionReply, ErrorBody> {
    let projection = state.projection().clone();
    Ok(ProjectionReply {
        as_of: projection.last_seq.max(state.as_of()),
        served_by: state.config.replica_id.clone(),
        projection,
    })
}

/// The counts that are not zero, by the names of what they count.
fn by_name<const N: usize>(names: [&str; N], counts: [u32; N]) -> BTreeMap<String, u32> {
    names
        .into_iter()
        .zip(counts)
        .filter(|&(_, n)| n > 0)
        .map(|(name, n)| (name.to_owned(), n))
        .collect()
}

async fn status(state: &State) -> Result<StatusReply, ErrorBody> {
    let stream = state
        .stream_state()
        .await
        .map_err(|e| ErrorBody::new(ErrorCode::Unavailable, e.to_string()))?;
    let (counts, as_of) = state.memo_status(|projection| counts(projection, &state.config.lattice));
    let mut reply = StatusReply::clone(&counts);
    let replay = state.replay_stats();
    reply.as_of = as_of;
    reply.controller = ControllerInfo {
        id: state.config.replica_id.clone(),
        version: trellis_schemas::VERSION.to_owned(),
        started_at: state.started_at,
        replay_ms: replay.millis,
        replayed_facts: replay.facts,
    };
    reply.stream = StreamSummary {
        name: subject::events_stream(&state.config.lattice),
        messages: stream.messages,
        first_seq: stream.first_sequence,
        last_seq: stream.last_sequence.max(as_of),
        lag: stream.last_sequence.saturating_sub(as_of),
    };
    Ok(reply)
}

/// What a status answer says of the projection: hosts, instances and providers by status,
/// rollouts in progress and recent failures (the controller and the stream are left empty).
fn counts(projection: &Projection, lattice: &Lattice) -> StatusReply {
    let mut hosts = HostCounts::default();
    for h in projection.hosts.values() {
        match h.status {
            HostStatus::Up => hosts.up += 1,
            HostStatus::Stopped => hosts.stopped += 1,
            HostStatus::Lost => hosts.lost += 1,
        }
    }
    // One walk over the instances, with no allocation per instance.
    let since = chrono::Utc::now() - chrono::Duration::seconds(RECENT_FAILURES_SECS);
    let mut instance_counts = [0u32; InstanceStatus::ALL.len()];
    let mut failed = Vec::new();
    for i in projection.instances.values() {
        instance_counts[i.status as usize] += 1;
        if i.status.is_failure() && i.status_since >= since {
            failed.push(i);
        }
    }
    // Only the listed ones are copied: after a host loss, thousands may have failed.
    failed.sort_by_key(|i| std::cmp::Reverse(i.status_since));
    let failures_last_hour = u32::try_from(failed.len()).unwrap_or(u32::MAX);
    let failures = failed
        .into_iter()
        .take(RECENT_FAILURES_LISTED)
        .map(|i| RecentFailure {
            instance_id: i.instance_id.clone(),
            component: i.component.clone(),
            status: i.status,
            reason: i.last_reason.clone(),
            since: i.status_since,
        })
        .collect();
    let mut provider_counts = [0u32; ProviderStatus::ALL.len()];
    for p in projection.providers.values() {
        provider_counts[p.status as usize] += 1;
    }
    let rollouts = projection
        .rollouts
        .values()
        .filter(|r| !r.status.is_finished())
        .map(|r| RolloutBrief {
            rollout_id: r.rollout_id.clone(),
            component: r.component.clone(),
            to: r.to.version.clone(),
            strategy: r.plan.strategy,
            status: r.status,
            weight: r.weight,
        })
        .collect();
    StatusReply {
        as_of: projection.last_seq,
        lattice: lattice.clone(),
        hosts,
        controller: ControllerInfo {
            id: String::new(),
            version: String::new(),
            started_at: chrono::DateTime::<chrono::Utc>::UNIX_EPOCH,
            replay_ms: 0,
            replayed_facts: 0,
        },
        stream: StreamSummary {
            name: String::new(),
            messages: 0,
            first_seq: 0,
            last_seq: 0,
            lag: 0,
        },
        instances: by_name(
            InstanceStatus::ALL.map(InstanceStatus::as_str),
            instance_counts,
        ),
        providers: by_name(
            ProviderStatus::ALL.map(ProviderStatus::as_str),
            provider_counts,
        ),
        components: u32::try_from(projection.artifacts.len()).unwrap_or(u32::MAX),
        rollouts,
        failures_last_hour,
        failures,
    }
}
