//! Placement: which live hosts take new instances.
//!
//! A host is eligible when it is up, matches the requested host id and every requested label, runs
//! micro-VMs when the instances are to run in them (isolation `microvm`: the host's latest
//! capacity, by heartbeat or else by `host.started`, has `microvm` set), and has room: fewer
//! active instances than its `max_instances`, and (when the component's memory limit is known)
//! enough memory left for one more instance at that limit. Instances are spread: each goes to the
//! eligible host with the fewest active plus already-placed instances (ties by host id, so
//! placement is deterministic). When the request cannot be met in full, nothing is placed and the
//! error says, host by host, why; when no live host runs micro-VMs for a `microvm` request, it
//! says that first, and how to start one that does.
//!
//! What each host runs is counted in one pass over the instances ([`Loads::of`]), not once per
//! host: with 1,000 hosts and 100,000 instances a scan per host made one placement take
//! hundreds of milliseconds, and a relocation (one placement per lost instance) hours.
//!
//! Two things the projection does not show yet weigh too ([`super::state::State::loads`]):
//! instances placed a moment ago whose `instance.started` has not been applied (they take room,
//! so that concurrent placements and relocations do not all pick the same emptiest hosts), and
//! hosts that have gone quiet, silent for longer than three of their heartbeat intervals (and
//! half the liveness timeout) but not yet declared lost. Those get nothing new: when many hosts
//! die at once, the ones declared lost first would otherwise have their instances relocated onto
//! the others, and each start command would wait out its timeout.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use trellis_schemas::control::InstanceStartRequest;
use trellis_schemas::isolation::{Acceleration, Isolation};
use trellis_schemas::{
    ErrorBody, ErrorCode, Fact, FactData, HostId, HostRecord, HostStatus, InstanceId, Projection,
};

/// What one host runs by the projection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Load {
    /// Active (running or restarting) instances.
    active: usize,
    /// The memory limits of those instances whose code is known, summed.
    memory: u64,
}

/// What each host runs, kept as facts are applied (one instance's fact moves one instance's
/// weight) so that a placement does not count 100,000 instances again.
#[derive(Debug)]
pub(crate) struct LoadIndex {
    by_host: HashMap<HostId, Load>,
    /// Set when a fact changed many instances at once (`host.lost`) or the memory an instance
    /// weighs (`artifact.stored`): the next placement counts everything again.
    stale: bool,
}

impl Default for LoadIndex {
    fn default() -> Self {
        Self {
            by_host: HashMap::new(),
            stale: true,
        }
    }
}

/// The instance a fact is about, for the facts that change one instance.
fn instance_of(data: &FactData) -> Option<&InstanceId> {
    match data {
        FactData::InstanceStarted(d) => Some(&d.instance_id),
        FactData::InstanceStartFailed(d) => Some(&d.instance_id),
        FactData::InstanceStopped(d) => Some(&d.instance_id),
        FactData::InstanceCrashed(d) => Some(&d.instance_id),
        FactData::InstanceRestarting(d) => Some(&d.instance_id),
        FactData::InstanceGaveUp(d) => Some(&d.instance_id),
        FactData::InstanceRelocated(d) => Some(&d.instance_id),
        _ => None,
    }
}

/// The host and memory limit of instance `id` if it is active in `projection`.
fn weight_of(projection: &Projection, id: &InstanceId) -> Option<(HostId, u64)> {
    let instance = projection.instances.get(id)?;
    instance.status.is_active().then(|| {
        let memory = instance
            .digest
            .as_deref()
            .and_then(|d| projection.artifacts.get(d))
            .map_or(0, |a| a.manifest.max_memory_bytes);
        (instance.host_id.clone(), memory)
    })
}

impl LoadIndex {
    /// Applies `fact` to `projection` (see [`trellis_schemas::apply`]) and follows what it
    /// changed; returns whether it changed anything.
    pub(crate) fn apply(&mut self, projection: &mut Projection, fact: &Fact) -> bool {
        if self.stale {
            // Counted afresh before it is read (always so during the replay).
            return trellis_schemas::apply(projection, fact);
        }
        let instance = instance_of(&fact.event.data);
        let before = instance.and_then(|id| weight_of(projection, id));
        if !trellis_schemas::apply(projection, fact) {
            return false;
        }
        match (&fact.event.data, instance) {
            (_, Some(id)) => self.moved(before, weight_of(projection, id)),
            // Many instances at once, or what they weigh.
            (FactData::HostLost(_) | FactData::HostStopped(_) | FactData::ArtifactStored(_), _) => {
                self.invalidate()
            }
            // An instance fact this index does not know: count again rather than drift.
            (data, None) if data.kind().short_name().starts_with("instance.") => self.invalidate(),
            _ => {}
        }
        true
    }

    /// Moves one instance's weight from what it was `before` a fact to what it is `after`.
    fn moved(&mut self, before: Option<(HostId, u64)>, after: Option<(HostId, u64)>) {
        if before == after {
            return;
        }
        if let Some((host, memory)) = before
            && let Some(load) = self.by_host.get_mut(&host)
        {
            load.active = load.active.saturating_sub(1);
            load.memory = load.memory.saturating_sub(memory);
        }
        if let Some((host, memory)) = after {
            let load = self.by_host.entry(host).or_default();
            load.active += 1;
            load.memory += memory;
        }
    }

    /// Makes the next [`LoadIndex::loads`] count everything again.
    fn invalidate(&mut self) {
        self.stale = true;
    }

    /// The loads of `projection`'s hosts: from the index, or counted afresh when it is stale.
    pub(crate) fn loads(&mut self, projection: &Projection) -> Loads {
        if self.stale {
            self.by_host = Loads::of(projection).by_host;
            self.stale = false;
        }
        Loads {
            by_host: self.by_host.clone(),
            quiet: HashMap::new(),
            microvm: HashMap::new(),
        }
    }
}

/// The load of every host that runs anything.
#[derive(Debug, Default)]
pub(crate) struct Loads {
    by_host: HashMap<HostId, Load>,
    /// Hosts that get nothing new, with how long they have been silent.
    quiet: HashMap<HostId, Duration>,
    /// Whether each host runs micro-VMs by its latest heartbeat, for the hosts heard from since
    /// their `host.started` (the others: by that fact).
    microvm: HashMap<HostId, Option<Acceleration>>,
}

impl Loads {
    /// Counts what every host of `projection` runs, in one pass over the instances.
    pub(crate) fn of(projection: &Projection) -> Self {
        let mut by_host: HashMap<HostId, Load> = HashMap::with_capacity(projection.hosts.len());
        // Few components, many instances: look each digest up once.
        let mut memory_of: HashMap<&str, u64> = HashMap::new();
        for instance in projection.instances.values() {
            if !instance.status.is_active() {
                continue;
            }
            let load = match by_host.get_mut(&instance.host_id) {
                Some(load) => load,
                None => by_host.entry(instance.host_id.clone()).or_default(),
            };
            load.active += 1;
            if let Some(digest) = instance.digest.as_deref() {
                load.memory += *memory_of.entry(digest).or_insert_with(|| {
                    projection
                        .artifacts
                        .get(digest)
                        .map_or(0, |a| a.manifest.max_memory_bytes)
                });
            }
        }
        Self {
            by_host,
            quiet: HashMap::new(),
            microvm: HashMap::new(),
        }
    }

    /// Counts instances placed but not in the projection yet: `(host, memory limit)` each.
    pub(crate) fn with_inflight<'h>(
        mut self,
        inflight: impl IntoIterator<Item = (&'h HostId, u64)>,
    ) -> Self {
        for (host, memory) in inflight {
            self.add(host, memory);
        }
        self
    }

    /// Counts one more instance on `host`, with `memory` as its limit: one just placed.
    pub(crate) fn add(&mut self, host: &HostId, memory: u64) {
        let load = match self.by_host.get_mut(host) {
            Some(load) => load,
            None => self.by_host.entry(host.clone()).or_default(),
        };
        load.active += 1;
        load.memory += memory;
    }

    /// Marks hosts as quiet: placement passes them over, saying for how long they were silent.
    pub(crate) fn with_quiet(mut self, quiet: HashMap<HostId, Duration>) -> Self {
        self.quiet = quiet;
        self
    }

    /// Records whether hosts run micro-VMs by their latest heartbeats, which take precedence
    /// over their `host.started` capacity.
    pub(crate) fn with_microvm(mut self, microvm: HashMap<HostId, Option<Acceleration>>) -> Self {
        self.microvm = microvm;
        self
    }

    fn of_host(&self, host: &HostId) -> Load {
        self.by_host.get(host).copied().unwrap_or_default()
    }

    /// Whether `host` runs micro-VMs (and how) by its latest capacity.
    pub(crate) fn microvm_of(&self, host: &HostRecord) -> Option<Acceleration> {
        self.microvm
            .get(&host.host_id)
            .copied()
            .unwrap_or(host.capacity.microvm)
    }
}

struct Room<'a> {
    host: &'a HostRecord,
    active: usize,
    slots: usize,
}

/// What a host offers beyond its room, as placement sees it now.
struct Offer {
    /// How long it has been silent, when it is quiet.
    quiet: Option<Duration>,
    /// Whether it runs micro-VMs, and how.
    microvm: Option<Acceleration>,
}

fn room<'a>(
    host: &'a HostRecord,
    offer: Offer,
    load: Load,
    request: &InstanceStartRequest,
    memory_per_instance: Option<u64>,
) -> Result<Room<'a>, String> {
    if host.status != HostStatus::Up {
        return Err(format!("host is {}", host.status.as_str()));
    }
    if let Some(silent) = offer.quiet {
        return Err(format!(
            "host has not been heard from for {:.1} s",
            silent.as_secs_f64()
        ));
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
    if request.isolation == Some(Isolation::Microvm) && offer.microvm.is_none() {
        return Err("host does not run micro-VMs".to_owned());
    }
    let by_count = (host.capacity.max_instances as usize).saturating_sub(load.active);
    if by_count == 0 {
        return Err(format!(
            "host runs {} instances, its maximum",
            host.capacity.max_instances
        ));
    }
    let slots = match memory_per_instance {
        Some(per) if per > 0 => {
            let free = host.capacity.memory_bytes.saturating_sub(load.memory);
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
        active: load.active,
        slots,
    })
}

/// Chooses a host for each of `request.count` instances, from the projection alone.
#[cfg(test)]
pub(crate) fn place(
    projection: &Projection,
    request: &InstanceStartRequest,
    memory_per_instance: Option<u64>,
) -> Result<Vec<HostId>, ErrorBody> {
    place_with(
        projection,
        &Loads::of(projection),
        request,
        memory_per_instance,
    )
}

/// Like [`place`], with the hosts' `loads` counted already, including what was placed but is not
/// in the projection yet ([`Loads::with_inflight`], [`Loads::add`]): those take room and weigh on
/// the spread.
///
/// `request.isolation` is the isolation the instances will get (the caller resolves the
/// request's against the manifest): `microvm` instances go only to hosts that run micro-VMs.
pub(crate) fn place_with(
    projection: &Projection,
    loads: &Loads,
    request: &InstanceStartRequest,
    memory_per_instance: Option<u64>,
) -> Result<Vec<HostId>, ErrorBody> {
    let mut rooms = Vec::new();
    let mut refusals: BTreeMap<String, String> = BTreeMap::new();
    let microvm = request.isolation == Some(Isolation::Microvm);
    // Hosts looked at, and those of them up that run micro-VMs.
    let (mut considered, mut vm_hosts) = (0usize, 0usize);
    for host in projection.hosts.values() {
        if request
            .host_id
            .as_ref()
            .is_some_and(|want| want != &host.host_id)
        {
            continue;
        }
        considered += 1;
        let load = loads.of_host(&host.host_id);
        let offer = Offer {
            quiet: loads.quiet.get(&host.host_id).copied(),
            microvm: loads.microvm_of(host),
        };
        if host.status == HostStatus::Up && offer.microvm.is_some() {
            vm_hosts += 1;
        }
        match room(host, offer, load, request, memory_per_instance) {
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
            _ if microvm && vm_hosts == 0 => format!(
                "no host runs micro-VMs (isolation microvm): start a host with --microvm-kernel and --microvm-initrd; {considered} host(s) considered"
            ),
            _ => format!("{count} instance(s) requested, room for {free}"),
        };
        if !refusals.is_empty() {
            let reasons: Vec<String> = refusals.iter().map(|(h, r)| format!("{h}: {r}")).collect();
            message.push_str(&format!(" ({})", reasons.join("; ")));
        }
        return Err(
            ErrorBody::new(ErrorCode::NoHostAvailable, message).with_details(serde_json::json!({
                "requested": count,
                "room": free,
                "isolation": request.isolation.unwrap_or_default(),
                "hosts": refusals,
            })),
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
                microvm: None,
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
            isolation: None,
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
    fn placements_in_flight_take_room_and_quiet_hosts_get_nothing() {
        let p = lattice(vec![
            host("a", HostStatus::Up, &[], 2),
            host("b", HostStatus::Up, &[], 2),
            host("c", HostStatus::Up, &[], 2),
        ]);
        let a = HostId::new("a").expect("valid");
        let c = HostId::new("c").expect("valid");
        // Two starts on `a` not yet in the projection: it is full.
        let loads = Loads::of(&p).with_inflight([(&a, 0), (&a, 0)]);
        assert_eq!(
            ids(place_with(&p, &loads, &request(4, &[]), None).expect("fits")),
            ["b", "c", "b", "c"]
        );
        // `c` has been silent: only `b` takes anything.
        let loads = Loads::of(&p)
            .with_inflight([(&a, 0), (&a, 0)])
            .with_quiet([(c, Duration::from_millis(6500))].into());
        assert_eq!(
            ids(place_with(&p, &loads, &request(2, &[]), None).expect("fits")),
            ["b", "b"]
        );
        let err = place_with(&p, &loads, &request(3, &[]), None).expect_err("no room");
        assert!(
            err.message
                .contains("c: host has not been heard from for 6.5 s"),
            "{}",
            err.message
        );
        assert!(
            err.message.contains("a: host runs 2 instances"),
            "{}",
            err.message
        );
    }

    #[test]
    fn the_load_index_follows_facts_as_a_full_count_would() {
        use trellis_schemas::fact::{
            HostLost, HostStarted, HostStopped, InstanceCrashed, InstanceGaveUp, InstanceStarted,
            InstanceStopped,
        };
        use trellis_schemas::{ComponentName, Event, RestartPolicy};
        let h = |s: &str| HostId::new(s).expect("valid");
        let i = |n: u32| InstanceId::new(format!("01J00000000000000000000{n:03}")).expect("valid");
        let started = |n: u32, host: &str| {
            FactData::InstanceStarted(InstanceStarted {
                instance_id: i(n),
                host_id: h(host),
                component: ComponentName::new("c").expect("valid"),
                version: "1.0.0".into(),
                digest: "sha256:00".into(),
                restart: RestartPolicy::Always,
                attempt: 0,
                isolation: Default::default(),
                acceleration: None,
            })
        };
        let crashed = |n: u32, host: &str, will_restart: bool| {
            FactData::InstanceCrashed(InstanceCrashed {
                instance_id: i(n),
                host_id: h(host),
                reason: "trap".into(),
                detail: String::new(),
                export: "run".into(),
                will_restart,
            })
        };
        let host_started = |host: &str| {
            FactData::HostStarted(HostStarted {
                host_id: h(host),
                labels: BTreeMap::new(),
                capacity: Capacity {
                    max_instances: 10,
                    memory_bytes: 1 << 30,
                    cpus: 2,
                    microvm: None,
                },
                version: "0".into(),
                rejoined: false,
            })
        };
        let facts = vec![
            host_started("a"),
            host_started("b"),
            started(1, "a"),
            started(2, "a"),
            started(3, "b"),
            started(4, "b"),
            FactData::InstanceStopped(InstanceStopped {
                instance_id: i(1),
                host_id: h("a"),
                reason: "requested".into(),
            }),
            crashed(2, "a", true),
            started(2, "a"),
            crashed(2, "a", false),
            FactData::InstanceGaveUp(InstanceGaveUp {
                instance_id: i(3),
                host_id: h("b"),
                attempts: 1,
                last_reason: "trap".into(),
            }),
            FactData::HostLost(HostLost {
                host_id: h("b"),
                silent_for_ms: 1,
                timeout_ms: 1,
                detected_by: "c".into(),
            }),
            started(5, "a"),
            started(6, "a"),
            // A drained host: what still ran on it stopped with it.
            FactData::HostStopped(HostStopped {
                host_id: h("a"),
                reason: "signal: SIGTERM".into(),
            }),
        ];
        let mut p = Projection::new();
        let mut index = LoadIndex::default();
        for (seq, data) in facts.into_iter().enumerate() {
            let fact = Fact {
                seq: seq as u64 + 1,
                event: Event::new("test".to_owned(), data),
            };
            assert!(index.apply(&mut p, &fact));
            assert!(!index.apply(&mut p, &fact), "a duplicate changes nothing");
            let mut kept: Vec<_> = index.loads(&p).by_host.into_iter().collect();
            let mut counted: Vec<_> = Loads::of(&p).by_host.into_iter().collect();
            kept.retain(|(_, l)| *l != Load::default());
            kept.sort_by(|x, y| x.0.cmp(&y.0));
            counted.sort_by(|x, y| x.0.cmp(&y.0));
            assert_eq!(kept, counted, "after fact {}", seq + 1);
        }
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
        let a = HostId::new("a").expect("valid");
        let pending = Loads::of(&p).with_inflight([(&a, 0)]);
        assert_eq!(
            ids(place_with(&p, &pending, &request(1, &[]), None).expect("fits")),
            ["b"]
        );
        let pending = Loads::of(&p).with_inflight([(&a, 0), (&a, 0)]);
        let err = place_with(&p, &pending, &request(3, &[]), None).expect_err("full");
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

    /// A host that runs micro-VMs with `acceleration`.
    fn vm_host(id: &str, status: HostStatus, max: u32, acceleration: Acceleration) -> HostRecord {
        let mut h = host(id, status, &[], max);
        h.capacity.microvm = Some(acceleration);
        h
    }

    fn microvm(count: u32) -> InstanceStartRequest {
        InstanceStartRequest {
            isolation: Some(Isolation::Microvm),
            ..request(count, &[])
        }
    }

    #[test]
    fn microvm_instances_go_only_to_hosts_that_run_micro_vms() {
        let p = lattice(vec![
            host("a", HostStatus::Up, &[], 10),
            vm_host("b", HostStatus::Up, 10, Acceleration::Tcg),
            vm_host("c", HostStatus::Lost, 10, Acceleration::Kvm),
            vm_host("d", HostStatus::Up, 10, Acceleration::Kvm),
        ]);
        assert_eq!(
            ids(place(&p, &microvm(3), None).expect("fits")),
            ["b", "d", "b"]
        );
        // `process` (asked or not) goes anywhere up.
        let mut process = request(3, &[]);
        assert_eq!(
            ids(place(&p, &process, None).expect("fits")),
            ["a", "b", "d"]
        );
        process.isolation = Some(Isolation::Process);
        assert_eq!(
            ids(place(&p, &process, None).expect("fits")),
            ["a", "b", "d"]
        );
        // The latest heartbeat wins over `host.started`: `a` runs them now, `d` no longer does.
        let a = HostId::new("a").expect("valid");
        let d = HostId::new("d").expect("valid");
        let loads = Loads::of(&p).with_microvm([(a, Some(Acceleration::Kvm)), (d, None)].into());
        assert_eq!(
            ids(place_with(&p, &loads, &microvm(2), None).expect("fits")),
            ["a", "b"]
        );
        // A named host is refused when its latest heartbeat says it no longer runs them.
        let mut named = microvm(1);
        named.host_id = Some(HostId::new("b").expect("valid"));
        assert_eq!(
            ids(place_with(&p, &loads, &named, None).expect("fits")),
            ["b"]
        );
        let loads = Loads::of(&p).with_microvm([(HostId::new("b").expect("valid"), None)].into());
        let err = place_with(&p, &loads, &named, None).expect_err("b runs none now");
        assert!(
            err.message.contains("no host runs micro-VMs")
                && err.message.contains("1 host(s) considered")
                && err.message.contains("b: host does not run micro-VMs"),
            "{}",
            err.message
        );
    }

    #[test]
    fn says_why_no_host_takes_microvm_instances() {
        // No live host runs micro-VMs (`c` does, but it is lost): say so, and how to start one.
        let p = lattice(vec![
            host("a", HostStatus::Up, &[], 10),
            host("b", HostStatus::Up, &[], 10),
            vm_host("c", HostStatus::Lost, 10, Acceleration::Kvm),
        ]);
        let err = place(&p, &microvm(1), None).expect_err("no micro-VM host");
        assert_eq!(err.code, ErrorCode::NoHostAvailable);
        assert!(
            err.message.starts_with(
                "no host runs micro-VMs (isolation microvm): start a host with --microvm-kernel and --microvm-initrd; 3 host(s) considered"
            ),
            "{}",
            err.message
        );
        assert!(
            err.message.contains("a: host does not run micro-VMs")
                && err.message.contains("b: host does not run micro-VMs")
                && err.message.contains("c: host is lost"),
            "{}",
            err.message
        );
        let details = err.details.expect("details");
        assert_eq!(details["isolation"], "microvm", "{details}");
        assert_eq!(details["room"], 0, "{details}");
        // One runs them but is full: the usual count, host by host.
        let p = lattice(vec![
            host("a", HostStatus::Up, &[], 10),
            vm_host("b", HostStatus::Up, 1, Acceleration::Tcg),
        ]);
        let err = place(&p, &microvm(2), None).expect_err("one slot");
        assert!(
            err.message.contains("2 instance(s) requested, room for 1")
                && err.message.contains("a: host does not run micro-VMs"),
            "{}",
            err.message
        );
        assert!(!err.message.contains("no host runs"), "{}", err.message);
        // An empty lattice is still an empty lattice.
        let err = place(&lattice(vec![]), &microvm(1), None).expect_err("empty");
        assert!(err.message.contains("no hosts"), "{}", err.message);
    }
}
