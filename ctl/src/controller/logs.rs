//! `instance.logs`: the recent log lines of an instance or a component, gathered from the hosts
//! that keep them.
//!
//! The controller keeps no lines: it resolves the target in its projection, asks each host that
//! runs (or ran) a matching instance with `instance.logs`, and merges the answers by time.
//! Hosts that do not answer are named in the reply; their lines are missing, not an error.

use std::collections::BTreeMap;

use futures::future::join_all;
use trellis_schemas::control::{InstanceLogsGathered, InstanceLogsRequest};
use trellis_schemas::logs::{InstanceLogsCommand, InstanceLogsReply, MAX_LOG_LIMIT, keep_newest};
use trellis_schemas::{ErrorBody, ErrorCode, HostId, HostStatus, InstanceId};

use super::instances::ask;
use super::state::State;

/// Lines returned when the request does not say.
const DEFAULT_LIMIT: u32 = 200;

pub(crate) async fn logs(
    state: &State,
    request: InstanceLogsRequest,
) -> Result<InstanceLogsGathered, ErrorBody> {
    let limit = request.limit.unwrap_or(DEFAULT_LIMIT);
    if !(1..=MAX_LOG_LIMIT).contains(&limit) {
        return Err(ErrorBody::new(
            ErrorCode::InvalidRequest,
            format!("limit must be 1 to {MAX_LOG_LIMIT}, not {limit}"),
        )
        .with_details(serde_json::json!({"field": "limit"})));
    }
    let (component, by_host) = resolve(state, &request.target)?;
    let instances: Vec<InstanceId> = by_host.values().flatten().cloned().collect();
    let asks = by_host.into_iter().map(|(host, instance_ids)| async move {
        let command = InstanceLogsCommand {
            instance_ids,
            since: request.since,
            limit,
        };
        (
            host.clone(),
            ask::<_, InstanceLogsReply>(state, &host, &command).await,
        )
    });
    let mut records = Vec::new();
    let mut truncated = false;
    let mut unreachable = Vec::new();
    for (host, reply) in join_all(asks).await {
        match reply {
            Ok(reply) => {
                truncated |= reply.truncated;
                records.extend(reply.records);
            }
            Err(e) => {
                tracing::debug!(%host, error = %e, "no log lines from a host");
                unreachable.push(host);
            }
        }
    }
    records.sort_by(|a, b| (a.time, &a.instance_id, a.seq).cmp(&(b.time, &b.instance_id, b.seq)));
    truncated |= keep_newest(&mut records, limit);
    Ok(InstanceLogsGathered {
        component,
        instances,
        records,
        truncated,
        unreachable,
    })
}

/// The component `target` names (an instance id, else a component name, of an instance or in
/// the artifact store) and its instances on hosts that are up, by host.
fn resolve(
    state: &State,
    target: &str,
) -> Result<(String, BTreeMap<HostId, Vec<InstanceId>>), ErrorBody> {
    let projection = state.projection();
    let up = |host: &HostId| {
        projection
            .hosts
            .get(host)
            .is_some_and(|h| h.status == HostStatus::Up)
    };
    let mut by_host: BTreeMap<HostId, Vec<InstanceId>> = BTreeMap::new();
    if let Some(instance) = InstanceId::new(target)
        .ok()
        .and_then(|id| projection.instances.get(&id))
    {
        if up(&instance.host_id) {
            by_host
                .entry(instance.host_id.clone())
                .or_default()
                .push(instance.instance_id.clone());
        }
        return Ok((instance.component.clone(), by_host));
    }
    let mut known = false;
    for instance in projection.instances.values() {
        if instance.component == target {
            known = true;
            if up(&instance.host_id) {
                by_host
                    .entry(instance.host_id.clone())
                    .or_default()
                    .push(instance.instance_id.clone());
            }
        }
    }
    // A component pushed but not running (yet) has no lines: an empty answer, not an error.
    known |= projection.find_artifact(target, None).is_some();
    if !known {
        return Err(ErrorBody::new(
            ErrorCode::NotFound,
            format!(
                "no instance or component {target:?}; `trellis instance ls` lists the instances"
            ),
        )
        .with_details(serde_json::json!({ "target": target })));
    }
    Ok((target.to_owned(), by_host))
}
