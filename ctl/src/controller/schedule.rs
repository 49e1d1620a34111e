//! Placement: which live hosts take new instances.
//!
//! A host is eligible when it is up, matches the requested host id and every requested label, and
//! has room: fewer active instances than its `max_instances`, and (when the component's memory
//! limit is known) enough memory left for one more instance at that limit. Instances are spread:
//! each goes to the eligible host with the fewest active plus already-placed instances (ties by
//! host id, so placement is deterministic). When the request cannot be met in full, nothing is
//! placed and the error says, host by host, why.

use std::collections::BTreeMap;

use trellis_schemas::control::InstanceStartRequest;
use trellis_schemas::{ErrorBody, ErrorCode, HostId, HostRecord, HostStatus, Projection};

struct Room<'a> {
    host: &'a HostRecord,
    active: usize,
    slots: usize,
}

fn room<'a>(
    projection: &'a Projection,
    host: &'a HostRecord,
    request: &InstanceStartRequest,
    memory_per_instance: Option<u64>,
    pending: usize,
) -> Result<Room<'a>, String> {
    if host.status != HostStatus::Up {
        return Err(format!("host is {}", host.status.as_str()));
    }
    for (key, want) in &request.labels {
        match host.labels.get(key) {
            Some(have) if have == want => {}
            Some(have) => return Err(format!("label {key}={want} wanted, host has {key}={have}")),
            None => {
                return Err(format!(
                    "label {key}={want} wanted, host has no label {key}"
                ));
            }
        }
    }
    let active: Vec<_> = projection.active_instances_on(&host.host_id).collect();
    let by_count = (host.capacity.max_instances as usize).saturating_sub(active.len() + pending);
    if by_count == 0 {
        return Err(format!(
            "host runs {} instances, its maximum",
            host.capacity.max_instances
        ));
    }
    let slots = match memory_per_instance {
        Some(per) if per > 0 => {
            let used: u64 = active
                .iter()
                .filter_map(|i| i.digest.as_ref())
                .filter_map(|d| projection.artifacts.get(d))
                .map(|a| a.manifest.max_memory_bytes)
                .sum();
            let free = host
                .capacity
                .memory_bytes
                .saturating_sub(used)
                .saturating_sub(per.saturating_mul(pending as u64));
            let by_memory = (free / per) as usize;
            if by_memory == 0 {
                return Err(format!(
                    "host has {free} bytes of memory left, an instance may use {per}"
                ));
            }
            by_count.min(by_memory)
        }
        _ => by_count,
    };
    Ok(Room {
        host,
        active: active.len() + pending,
        slots,
    })
}

/// Chooses a host for each of `request.count` instances.
pub(crate) fn place(
    projection: &Projection,
    request: &InstanceStartRequest,
    memory_per_instance: Option<u64>,
) -> Result<Vec<HostId>, ErrorBody> {
    place_with(projection, request, memory_per_instance, &BTreeMap::new())
}

/// Like [`place`], counting `pending[host]` more instances on each host than the projection
/// shows yet (placed a moment ago, not started): those take room and weigh on the spread.
pub(crate) fn place_with(
    projection: &Projection,
    request: &InstanceStartRequest,
    memory_per_instance: Option<u64>,
    pending: &BTreeMap<HostId, usize>,
) -> Result<Vec<HostId>, ErrorBody> {
    let mut rooms = Vec::new();
    let mut refusals: BTreeMap<String, String> = BTreeMap::new();
    for host in projection.hosts.values() {
        if request
            .host_id
            .as_ref()
            .is_some_and(|want| want != &host.host_id)
        {
            continue;
        }
        let pending = pending.get(&host.host_id).copied().unwrap_or(0);
        match room(projection, host, request, memory_per_instance, pending) {
            Ok(room) => rooms.push(room),
            Err(why) => {
                refusals.insert(host.host_id.to_string(), why);
            }
        }
    }
    let count = request.count as usize;
    let free: usize = rooms.iter().map(|r| r.slots).sum();
    if free < count {
        let mut message = match (&request.host_id, projection.hosts.is_empty()) {
            (Some(h), _) if !projection.hosts.contains_key(h) => {
                format!("host {h} is not in the lattice")
            }
            (_, true) => "the lattice has no hosts; start one with `trellis-host`".to_owned(),
            _ => format!("{count} instance(s) requested, room for {free}"),
        };
        if !refusals.is_empty() {
            let reasons: Vec<String> = refusals.iter().map(|(h, r)| format!("{h}: {r}")).collect();
            message.push_str(&format!(" ({})", reasons.join("; ")));
        }
        return Err(
            ErrorBody::new(ErrorCode::NoHostAvailable, message).with_details(
                serde_json::json!({ "requested": count, "room": free, "hosts": refusals }),
            ),
        );
    }
    let mut placed = Vec::with_capacity(count);
    let mut assigned = vec![0usize; rooms.len()];
    for _ in 0..count {
        let pick = (0..rooms.len())
            .filter(|&i| assigned[i] < rooms[i].slots)
            .min_by_key(|&i| (rooms[i].active + assigned[i], &rooms[i].host.host_id));
        let Some(i) = pick else { break };
        assigned[i] += 1;
        placed.push(rooms[i].host.host_id.clone());
    }
    Ok(placed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use trellis_schemas::Capacity;

    fn host(id: &str, status: HostStatus, labels: &[(&str, &str)], max: u32) -> HostRecord {
        HostRecord {
            host_id: HostId::new(id).expect("valid"),
            status,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            capacity: Capacity {
                max_instances: max,
                memory_bytes: 1 << 30,
                cpus: 2,
            },
            version: "0".into(),
            started_at: Utc::now(),
            status_since: Utc::now(),
            status_seq: 1,
        }
    }

    fn lattice(hosts: Vec<HostRecord>) -> Projection {
        let mut p = Projection::new();
        for h in hosts {
            p.hosts.insert(h.host_id.clone(), h);
        }
        p
    }

    fn request(count: u32, labels: &[(&str, &str)]) -> InstanceStartRequest {
        InstanceStartRequest {
            component: "c".into(),
            count,
            host_id: None,
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            restart: Default::default(),
            min_seq: None,
            grants: vec![],
        }
    }

    fn ids(v: Vec<HostId>) -> Vec<String> {
        v.into_iter().map(|h| h.to_string()).collect()
    }

    #[test]
    fn spreads_over_hosts_and_honours_labels() {
        let p = lattice(vec![
            host("a", HostStatus::Up, &[("zone", "eu")], 10),
            host("b", HostStatus::Up, &[("zone", "us")], 10),
            host("c", HostStatus::Up, &[("zone", "eu")], 10),
            host("d", HostStatus::Lost, &[("zone", "eu")], 10),
        ]);
        assert_eq!(
            ids(place(&p, &request(3, &[]), None).expect("fits")),
            ["a", "b", "c"]
        );
        assert_eq!(
            ids(place(&p, &request(4, &[("zone", "eu")]), None).expect("fits")),
            ["a", "c", "a", "c"]
        );
    }

    #[test]
    fn says_why_no_host_fits() {
        let p = lattice(vec![
            host("a", HostStatus::Up, &[("zone", "eu")], 1),
            host("b", HostStatus::Lost, &[], 10),
        ]);
        let err = place(&p, &request(1, &[("zone", "us")]), None).expect_err("no host");
        assert_eq!(err.code, ErrorCode::NoHostAvailable);
        assert!(
            err.message
                .contains("a: label zone=us wanted, host has zone=eu"),
            "{}",
            err.message
        );
        assert!(err.message.contains("b: host is lost"), "{}", err.message);
        let err = place(&p, &request(2, &[]), None).expect_err("only one slot");
        assert!(
            err.message.contains("2 instance(s) requested, room for 1"),
            "{}",
            err.message
        );
        let err = place(&p, &request(1, &[]), Some(2 << 30)).expect_err("memory");
        assert!(err.message.contains("memory"), "{}", err.message);
        let err = place(&lattice(vec![]), &request(1, &[]), None).expect_err("empty");
        assert!(err.message.contains("no hosts"), "{}", err.message);
    }

    #[test]
    fn pending_instances_weigh_on_the_spread_and_take_room() {
        let p = lattice(vec![
            host("a", HostStatus::Up, &[], 2),
            host("b", HostStatus::Up, &[], 2),
        ]);
        let pending = BTreeMap::from([(HostId::new("a").expect("valid"), 1)]);
        assert_eq!(
            ids(place_with(&p, &request(1, &[]), None, &pending).expect("fits")),
            ["b"]
        );
        let pending = BTreeMap::from([(HostId::new("a").expect("valid"), 2)]);
        let err = place_with(&p, &request(3, &[]), None, &pending).expect_err("full");
        assert!(
            err.message.contains("a: host runs 2 instances"),
            "{}",
            err.message
        );
    }

    #[test]
    fn a_named_host_is_the_only_candidate() {
        let p = lattice(vec![
            host("a", HostStatus::Up, &[], 5),
            host("b", HostStatus::Up, &[], 5),
        ]);
        let mut r = request(2, &[]);
        r.host_id = Some(HostId::new("b").expect("valid"));
        assert_eq!(ids(place(&p, &r, None).expect("fits")), ["b", "b"]);
        r.host_id = Some(HostId::new("zz").expect("valid"));
        let err = place(&p, &r, None).expect_err("unknown host");
        assert!(
            err.message.contains("host zz is not in the lattice"),
            "{}",
            err.message
        );
    }
}
