//! Scale benchmark: a lattice of simulated hosts against a real nats-server and a real
//! `trellis controller` process.
//!
//! `TRELLIS_SIM_HOSTS` hosts (default 1,000) are light tokio tasks in this process, sharing one
//! NATS connection per `TRELLIS_SIM_HOSTS_PER_CONN` (50). Each speaks the host protocol with the
//! `trellis-schemas` types and subjects, as `trellis-host` does: it announces itself with
//! `host.started` (through its own `trellis-bus` fact publisher), heartbeats every 2 s (the
//! host's default, `TRELLIS_SIM_HEARTBEAT_MS`) with its full inventory, answers its command
//! subject (start → accepted, then `instance.started`; stop → `instance.stopped`; refusals as a
//! host refuses them: a duplicate id, or a full host) and, declared lost while alive, stops its
//! instances and announces itself again. Nothing runs: a simulated instance is an inventory entry.
//!
//! Measured, in order (figures are printed; nothing is asserted):
//!
//! 1. **Setup**: the hosts up, then `TRELLIS_SIM_INSTANCES` (100,000) instances started through
//!    the controller with `instance.start` requests of up to 100 (the most one request takes),
//!    in `TRELLIS_SIM_LANES` (4) concurrent sequences over disjoint host groups (a label each);
//!    each request waits (`min_seq`) until the controller has applied the facts of the previous
//!    one of its lane, as the controller does not count starts in flight when it places.
//! 2. **Replay**: the setup controller is killed and a fresh one started; the time from spawn to
//!    its first answer to `lattice.status` whose `as_of` is the stream's tip (status carries no
//!    instance count, so the instances are then counted with `instance.list`), its own
//!    `replay_ms`, its VmRSS and VmHWM, and the fact stream's size.
//! 3. **Heartbeat ingest**: the controller's CPU (utime + stime from `/proc`, as a fraction of
//!    one core) over `TRELLIS_SIM_IDLE_SECS` (10) s while only heartbeats flow; nats-server's and
//!    this process's for context.
//! 4. **Placement**: `TRELLIS_SIM_PLACEMENTS` (1,000) sequential `instance.start` requests of
//!    count 1: p50/p99 of the reply (placement plus the host's acceptance: the controller replies
//!    once the host accepted) and of `--wait` as the CLI does it (until `instance.started` with
//!    the operation id arrives); then the same instances stopped one by one.
//! 5. **Relocation**: `TRELLIS_SIM_KILL` (a tenth of the hosts) stop at once, with no last word;
//!    the time until every one is declared `host.lost` (the controller's `--host-timeout`,
//!    `TRELLIS_SIM_HOST_TIMEOUT`, default 10s as the controller's own default), until
//!    `instance.relocated` was recorded and the new host acknowledged a start for every
//!    lost instance and stored its `instance.started`, and until `instance.list` shows them all
//!    running elsewhere.
//! 6. **Ramps**: `host.get` and `lattice.status` requests at rising rates, then facts
//!    (`instance.started` again for running instances) at rising rates under a probe of 200
//!    `host.get`/s; p99 per step of `TRELLIS_SIM_STEP_SECS` (5) s, until it exceeds 50 ms.
//!
//! Each figure is compared with its goal at the end. Every process of the bench shares the
//! machine, this one (which plays 1,000 hosts) included; on two cores the absolute figures are
//! those of a crowded machine.
//!
//! Run: `cargo build --release --bins && cargo bench --bench sim`; a small run for
//! development: `TRELLIS_SIM_HOSTS=50 TRELLIS_SIM_INSTANCES=2000 cargo bench --bench sim`.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark")]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, message::PublishMessage};
use chrono::Utc;
use futures::StreamExt as _;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use trellis_bus::{FactPublisher, StreamSettings};
use trellis_ctl::CtlClient;
use trellis_schemas::control::{
    ComponentRegisterRequest, HostGetRequest, HostListRequest, InstanceListRequest,
    InstanceStartRequest, InstanceStopRequest, StatusRequest, decode_request,
};
use trellis_schemas::dataplane::{self, HostVerb};
use trellis_schemas::fact::{HostStarted, InstanceStarted, InstanceStopped};
use trellis_schemas::instance::{
    CommandAccepted, InstanceStatsCommand, InstanceStatsReply, StartInstanceCommand,
    StopInstanceCommand,
};
use trellis_schemas::{
    Capacity, ComponentSource, ErrorBody, ErrorCode, Event, FactData, FactKind, Heartbeat, HostId,
    HostStatus, InstanceId, InstanceStatus, InventoryInstance, Lattice, Reply, RestartPolicy,
    subject,
};
use trellis_tests::bench::{clock_ticks_per_sec, cpu_ticks, env_usize, quantile, status_kib};
use trellis_tests::{Nats, lattice};

const COMPONENT: &str = "sim-app";
const MANIFEST: &str = r#"[component]
name = "sim-app"
version = "1.0.0"

[limits]
max_memory = "8MiB"
fuel = 10_000_000
timeout = "500ms"
max_concurrency = 64
"#;
/// What a host says when it stops its instances because it was declared lost (as
/// `trellis-host` does).
const DECLARED_LOST: &str =
    "host was declared lost; its instances were reported lost and may run elsewhere";

// ---------------------------------------------------------------------------------------------
// Simulated hosts

/// Counters shared by every simulated host.
#[derive(Debug, Default)]
struct SimStats {
    starts: AtomicU64,
    refused: AtomicU64,
    stops: AtomicU64,
    facts_stored: AtomicU64,
    started_stored: AtomicU64,
    fact_errors: AtomicU64,
    max_seq: AtomicU64,
    heartbeats: AtomicU64,
    rejoins: AtomicU64,
    /// `instance.started` facts stored, by operation id.
    ops: Mutex<HashMap<String, u32>>,
}

#[derive(Debug)]
struct SimHost {
    id: HostId,
    source: String,
    labels: BTreeMap<String, String>,
    capacity: Capacity,
    started: Instant,
    client: async_nats::Client,
    facts: mpsc::UnboundedSender<Event>,
    instances: Mutex<BTreeMap<InstanceId, InventoryInstance>>,
    alive: AtomicBool,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    stats: Arc<SimStats>,
}

impl SimHost {
    fn publish(&self, event: Event) {
        let _ = self.facts.send(event);
    }

    fn announce(&self, rejoined: bool, cause: Option<String>) {
        let mut event = Event::new(
            self.source.clone(),
            FactData::HostStarted(HostStarted {
                host_id: self.id.clone(),
                labels: self.labels.clone(),
                capacity: self.capacity.clone(),
                version: trellis_schemas::VERSION.to_owned(),
                rejoined,
            }),
        );
        if let Some(cause) = cause {
            event = event.caused_by(cause);
        }
        self.publish(event);
    }

    fn inventory(&self) -> Vec<InventoryInstance> {
        self.instances.lock().unwrap().values().cloned().collect()
    }

    /// Accepts a start as `trellis-host` does (the checks it makes before answering), then
    /// reports the instance started.
    fn start(&self, command: StartInstanceCommand) -> Result<(), ErrorBody> {
        command
            .restart
            .validate()
            .map_err(|e| ErrorBody::new(ErrorCode::InvalidRequest, format!("restart: {e}")))?;
        let ComponentSource::Artifact {
            digest, manifest, ..
        } = &command.component
        else {
            return Err(ErrorBody::new(
                ErrorCode::InvalidRequest,
                "a simulated host runs components from the artifact store only",
            ));
        };
        {
            let mut instances = self.instances.lock().unwrap();
            if instances.contains_key(&command.instance_id) {
                return Err(ErrorBody::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "instance {} already exists on host {}",
                        command.instance_id, self.id
                    ),
                ));
            }
            if instances.len() >= self.capacity.max_instances as usize {
                self.stats.refused.fetch_add(1, Ordering::Relaxed);
                return Err(ErrorBody::new(
                    ErrorCode::NoHostAvailable,
                    format!(
                        "host {} already runs its maximum of {} instances",
                        self.id, self.capacity.max_instances
                    ),
                ));
            }
            instances.insert(
                command.instance_id.clone(),
                InventoryInstance {
                    instance_id: command.instance_id.to_string(),
                    component: manifest.name.to_string(),
                    state: "running".to_owned(),
                    ..InventoryInstance::default()
                },
            );
        }
        self.stats.starts.fetch_add(1, Ordering::Relaxed);
        self.publish(
            Event::new(
                self.source.clone(),
                FactData::InstanceStarted(InstanceStarted {
                    instance_id: command.instance_id.clone(),
                    host_id: self.id.clone(),
                    component: manifest.name.clone(),
                    version: manifest.version.clone(),
                    digest: digest.clone(),
                    restart: command.restart,
                    attempt: 0,
                    isolation: Default::default(),
                    acceleration: None,
                }),
            )
            .caused_by(command.operation_id),
        );
        Ok(())
    }

    fn stop(&self, command: StopInstanceCommand) -> Result<(), ErrorBody> {
        if self
            .instances
            .lock()
            .unwrap()
            .remove(&command.instance_id)
            .is_none()
        {
            return Err(ErrorBody::new(
                ErrorCode::NotFound,
                format!(
                    "instance {} does not run on host {}",
                    command.instance_id, self.id
                ),
            ));
        }
        self.stats.stops.fetch_add(1, Ordering::Relaxed);
        self.publish(
            Event::new(
                self.source.clone(),
                FactData::InstanceStopped(InstanceStopped {
                    instance_id: command.instance_id,
                    host_id: self.id.clone(),
                    reason: command.reason.unwrap_or_else(|| "requested".to_owned()),
                }),
            )
            .caused_by(command.operation_id),
        );
        Ok(())
    }

    /// Declared lost while alive: stop everything, then announce again.
    fn rejoin(&self, lost: &Event) {
        let stopped = std::mem::take(&mut *self.instances.lock().unwrap());
        for id in stopped.into_keys() {
            self.publish(Event::new(
                self.source.clone(),
                FactData::InstanceStopped(InstanceStopped {
                    instance_id: id,
                    host_id: self.id.clone(),
                    reason: DECLARED_LOST.to_owned(),
                }),
            ));
        }
        self.stats.rejoins.fetch_add(1, Ordering::Relaxed);
        self.announce(true, Some(lost.id.to_string()));
    }

    /// Stops heartbeating and answering, with no last word.
    fn kill(&self) {
        self.alive.store(false, Ordering::Relaxed);
        for task in self.tasks.lock().unwrap().drain(..) {
            task.abort();
        }
    }
}

fn encode<T: Serialize>(reply: &Reply<T>) -> Vec<u8> {
    serde_json::to_vec(reply).unwrap()
}

/// Serves one host's command subject, as `trellis-host`'s `serve_commands` does.
async fn serve_commands(
    host: Arc<SimHost>,
    lattice: Lattice,
    mut commands: async_nats::Subscriber,
) {
    while let Some(message) = commands.next().await {
        let outcome =
            match dataplane::parse_host_command(&lattice, &host.id, message.subject.as_str()) {
                Ok(HostVerb::InstanceStart) => {
                    decode_request::<StartInstanceCommand>(&message.payload)
                        .and_then(|c| host.start(c))
                        .map(|()| encode(&Reply::ok(CommandAccepted {})))
                }
                Ok(HostVerb::InstanceStop) => {
                    decode_request::<StopInstanceCommand>(&message.payload)
                        .and_then(|c| host.stop(c))
                        .map(|()| encode(&Reply::ok(CommandAccepted {})))
                }
                Ok(HostVerb::InstanceStats) => {
                    decode_request::<InstanceStatsCommand>(&message.payload).map(|_| {
                        encode(&Reply::ok(InstanceStatsReply {
                            stats: BTreeMap::new(),
                        }))
                    })
                }
                Ok(HostVerb::InstanceLogs) => {
                    decode_request::<trellis_schemas::logs::InstanceLogsCommand>(&message.payload)
                        .map(|_| {
                            encode(&Reply::ok(
                                trellis_schemas::logs::InstanceLogsReply::default(),
                            ))
                        })
                }
                Ok(HostVerb::ProviderStart | HostVerb::ProviderStop) => Err(ErrorBody::new(
                    ErrorCode::InvalidRequest,
                    "a simulated host runs no providers",
                )),
                Err(verb) => Err(ErrorBody::new(
                    ErrorCode::UnknownVerb,
                    format!("unknown host command {verb:?}"),
                )),
            };
        let Some(reply) = message.reply else { continue };
        let body = outcome.unwrap_or_else(|e| encode(&Reply::<CommandAccepted>::err(e)));
        let _ = host.client.publish(reply, body.into()).await;
    }
}

/// Sends a heartbeat with the full inventory every `interval`, from `offset` on.
async fn heartbeats(host: Arc<SimHost>, lattice: Lattice, interval: Duration, offset: Duration) {
    tokio::time::sleep(offset).await;
    let subject = subject::heartbeat(&lattice, &host.id);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0;
    loop {
        ticker.tick().await;
        seq += 1;
        let heartbeat = Heartbeat {
            host_id: host.id.clone(),
            seq,
            sent_at: Utc::now(),
            uptime_ms: host.started.elapsed().as_millis() as u64,
            interval_ms: interval.as_millis() as u64,
            version: trellis_schemas::VERSION.to_owned(),
            labels: host.labels.clone(),
            capacity: host.capacity.clone(),
            instances: host.inventory(),
        };
        let payload = serde_json::to_vec(&heartbeat).unwrap();
        if host
            .client
            .publish(subject.clone(), payload.into())
            .await
            .is_ok()
        {
            host.stats.heartbeats.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Stores one host's facts in order through its own fact publisher, counting what is stored.
async fn store_facts(
    publisher: FactPublisher,
    mut facts: mpsc::UnboundedReceiver<Event>,
    stats: Arc<SimStats>,
) {
    while let Some(event) = facts.recv().await {
        match publisher.publish(&event).await {
            Ok(seq) => {
                stats.facts_stored.fetch_add(1, Ordering::Relaxed);
                stats.max_seq.fetch_max(seq, Ordering::Relaxed);
                if matches!(event.data, FactData::InstanceStarted(_)) {
                    stats.started_stored.fetch_add(1, Ordering::Relaxed);
                    if let Some(op) = event.causation_id {
                        *stats.ops.lock().unwrap().entry(op).or_default() += 1;
                    }
                }
            }
            Err(e) => {
                stats.fact_errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("simulated host fact not stored: {e}");
            }
        }
    }
}

/// Watches for `host.lost` of the hosts of one connection that are still alive.
async fn watch_lost(group: HashMap<HostId, Arc<SimHost>>, mut lost: async_nats::Subscriber) {
    while let Some(message) = lost.next().await {
        let Ok(event) = Event::decode(&message.payload) else {
            continue;
        };
        if let FactData::HostLost(d) = &event.data
            && let Some(host) = group.get(&d.host_id)
            && host.alive.load(Ordering::Relaxed)
        {
            eprintln!(
                "live simulated host {} was declared lost; it rejoins",
                d.host_id
            );
            host.rejoin(&event);
        }
    }
}

#[derive(Debug)]
struct Sim {
    hosts: Vec<Arc<SimHost>>,
    stats: Arc<SimStats>,
    watchers: Vec<JoinHandle<()>>,
}

impl Sim {
    async fn start(
        nats: &Nats,
        l: &Lattice,
        count: usize,
        per_conn: usize,
        lanes: usize,
        capacity: Capacity,
        interval: Duration,
    ) -> Self {
        let stats = Arc::new(SimStats::default());
        let mut hosts = Vec::with_capacity(count);
        let mut watchers = Vec::new();
        for first in (0..count).step_by(per_conn) {
            let client = async_nats::ConnectOptions::new()
                .name(format!("sim hosts {first}.."))
                .connect(nats.url())
                .await
                .unwrap();
            let js = jetstream::new(client.clone());
            let mut group = HashMap::new();
            for index in first..(first + per_conn).min(count) {
                let id = HostId::new(format!("sim-{index:05}")).unwrap();
                let (publisher, _task) =
                    FactPublisher::spawn(js.clone(), l.clone(), StreamSettings::default(), 10_000);
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(store_facts(publisher, rx, stats.clone()));
                let host = Arc::new(SimHost {
                    source: trellis_schemas::fact::source(l, "host", id.as_str()),
                    labels: [("lane".to_owned(), format!("l{}", index % lanes))].into(),
                    id: id.clone(),
                    capacity: capacity.clone(),
                    started: Instant::now(),
                    client: client.clone(),
                    facts: tx,
                    instances: Mutex::default(),
                    alive: AtomicBool::new(true),
                    tasks: Mutex::default(),
                    stats: stats.clone(),
                });
                let commands = client
                    .subscribe(dataplane::host_commands(l, &id))
                    .await
                    .unwrap();
                host.announce(false, None);
                let offset = interval.mul_f64(index as f64 / count as f64);
                let tasks = vec![
                    tokio::spawn(serve_commands(host.clone(), l.clone(), commands)),
                    tokio::spawn(heartbeats(host.clone(), l.clone(), interval, offset)),
                ];
                *host.tasks.lock().unwrap() = tasks;
                group.insert(id, host.clone());
                hosts.push(host);
            }
            let lost = client
                .subscribe(subject::events_of_kind(l, FactKind::HostLost))
                .await
                .unwrap();
            watchers.push(tokio::spawn(watch_lost(group, lost)));
        }
        Self {
            hosts,
            stats,
            watchers,
        }
    }

    fn instances(&self) -> usize {
        self.hosts
            .iter()
            .filter(|h| h.alive.load(Ordering::Relaxed))
            .map(|h| h.instances.lock().unwrap().len())
            .sum()
    }

    fn stored_for(&self, operation: &str) -> u32 {
        self.stats
            .ops
            .lock()
            .unwrap()
            .get(operation)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for Sim {
    fn drop(&mut self) {
        for h in &self.hosts {
            h.kill();
        }
        for w in &self.watchers {
            w.abort();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Measuring

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn mib(kib: u64) -> String {
    format!("{:.0} MiB", kib as f64 / 1024.0)
}

/// CPU use of some processes over a window, as fractions of one core.
struct CpuWindow {
    pids: Vec<i32>,
    ticks: Vec<u64>,
    at: Instant,
}

impl CpuWindow {
    fn start(pids: &[i32]) -> Self {
        Self {
            pids: pids.to_vec(),
            ticks: pids.iter().map(|p| cpu_ticks(*p)).collect(),
            at: Instant::now(),
        }
    }

    fn cores(&self) -> Vec<f64> {
        let wall = self.at.elapsed().as_secs_f64();
        let hz = clock_ticks_per_sec();
        self.pids
            .iter()
            .zip(&self.ticks)
            .map(|(p, t)| (cpu_ticks(*p).saturating_sub(*t)) as f64 / hz / wall)
            .collect()
    }
}

/// Counts the facts of one kind seen on a plain subscription.
#[derive(Debug, Default)]
struct FactCounter {
    n: AtomicU64,
}

fn count_facts(client: &async_nats::Client, l: &Lattice, kind: FactKind) -> Arc<FactCounter> {
    let counter = Arc::new(FactCounter::default());
    let (client, subject, c) = (
        client.clone(),
        subject::events_of_kind(l, kind),
        counter.clone(),
    );
    tokio::spawn(async move {
        let mut sub = client.subscribe(subject).await.unwrap();
        while sub.next().await.is_some() {
            c.n.fetch_add(1, Ordering::Relaxed);
        }
    });
    counter
}

impl FactCounter {
    fn get(&self) -> u64 {
        self.n.load(Ordering::Relaxed)
    }
}

/// Counts the instances the controller lists with `status`, and how many of those are on
/// `hosts`.
async fn count_instances(
    ctl: &CtlClient,
    status: InstanceStatus,
    hosts: &HashSet<HostId>,
) -> (usize, usize) {
    let (mut all, mut on) = (0, 0);
    let mut after = None;
    loop {
        let reply = ctl
            .request(&InstanceListRequest {
                component: None,
                host_id: None,
                status: Some(status),
                after,
                limit: Some(1000),
                min_seq: None,
            })
            .await
            .unwrap();
        all += reply.instances.len();
        on += reply
            .instances
            .iter()
            .filter(|i| hosts.contains(&i.host_id))
            .count();
        match reply.next_after {
            Some(next) => after = Some(next),
            None => return (all, on),
        }
    }
}

/// Counts the hosts the controller lists as up.
async fn hosts_up(ctl: &CtlClient) -> usize {
    let mut up = 0;
    let mut after = None;
    loop {
        let Ok(reply) = ctl
            .request(&HostListRequest {
                min_seq: None,
                status: Some(HostStatus::Up),
                after,
                limit: Some(1000),
            })
            .await
        else {
            return 0;
        };
        up += reply.hosts.len();
        match reply.next_after {
            Some(next) => after = Some(next),
            None => return up,
        }
    }
}

/// What one step of a ramp measured.
struct Step {
    offered: f64,
    achieved: f64,
    p50: Duration,
    p99: Duration,
    failed: u64,
}

/// Runs `call` at `rate` per second for `length`, open loop (a call is started when due, whether
/// or not the earlier ones have answered); returns the latencies and the calls that failed.
async fn open_loop<F, Fut>(rate: f64, length: Duration, call: F) -> (Vec<Duration>, u64, f64)
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let start = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_millis(2));
    let mut sent = 0u64;
    let mut calls = Vec::new();
    while start.elapsed() < length {
        ticker.tick().await;
        let due = (start.elapsed().as_secs_f64() * rate) as u64;
        while sent < due {
            let call = call.clone();
            let n = sent;
            calls.push(tokio::spawn(async move {
                let t = Instant::now();
                let ok = call(n).await;
                (t.elapsed(), ok)
            }));
            sent += 1;
        }
    }
    let sending = start.elapsed().as_secs_f64();
    let mut latencies = Vec::with_capacity(calls.len());
    let mut failed = 0;
    for call in calls {
        let (latency, ok) = call.await.unwrap();
        if ok {
            latencies.push(latency);
        } else {
            failed += 1;
        }
    }
    (latencies, failed, sent as f64 / sending)
}

fn step(offered: f64, achieved: f64, mut latencies: Vec<Duration>, failed: u64) -> Step {
    Step {
        offered,
        achieved,
        p50: quantile(&mut latencies, 0.50),
        p99: quantile(&mut latencies, 0.99),
        failed,
    }
}

fn print_step(s: &Step) {
    println!(
        "  offered {:>7.0}/s  achieved {:>7.0}/s  p50 {:>10}  p99 {:>10}  failed {}",
        s.offered,
        s.achieved,
        ms(s.p50),
        ms(s.p99),
        s.failed
    );
}

/// The ramp of one cheap control request; returns the first rate whose p99 exceeded 50 ms.
async fn request_ramp<F, Fut>(name: &str, rates: &[f64], length: Duration, call: F) -> Option<f64>
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    println!(
        "{name} requests at rising rates ({} s a step):",
        length.as_secs()
    );
    for &rate in rates {
        let (latencies, failed, achieved) = open_loop(rate, length, call.clone()).await;
        let s = step(rate, achieved, latencies, failed);
        print_step(&s);
        if s.p99 > Duration::from_millis(50) || s.failed > 0 {
            return Some(s.achieved);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    None
}

/// Awaits a batch of publish acknowledgements; returns the last sequence stored.
async fn last_ack(batch: Vec<jetstream::context::PublishAckFuture>) -> u64 {
    let mut last = 0;
    for ack in batch {
        if let Ok(ack) = ack.await {
            last = ack.sequence;
        }
    }
    last
}

fn goal(name: &str, met: bool, figure: &str, target: &str) {
    println!(
        "  {:<54} {:>14}  goal {:<10} {}",
        name,
        figure,
        target,
        if met { "met" } else { "MISSED" }
    );
}

// ---------------------------------------------------------------------------------------------

#[tokio::main]
async fn main() {
    let run = Instant::now();
    let n_hosts = env_usize("TRELLIS_SIM_HOSTS", 1000).max(2);
    let n_instances = env_usize("TRELLIS_SIM_INSTANCES", 100_000);
    let per_conn = env_usize("TRELLIS_SIM_HOSTS_PER_CONN", 50).max(1);
    let lanes = env_usize("TRELLIS_SIM_LANES", 4).clamp(1, n_hosts);
    let n_kill = env_usize("TRELLIS_SIM_KILL", n_hosts / 10).clamp(1, n_hosts - 1);
    let n_place = env_usize("TRELLIS_SIM_PLACEMENTS", 1000);
    let idle_secs = env_usize("TRELLIS_SIM_IDLE_SECS", 10) as u64;
    let step_secs = env_usize("TRELLIS_SIM_STEP_SECS", 5) as u64;
    let interval = Duration::from_millis(env_usize("TRELLIS_SIM_HEARTBEAT_MS", 2000) as u64);
    let host_timeout =
        std::env::var("TRELLIS_SIM_HOST_TIMEOUT").unwrap_or_else(|_| "10s".to_owned());
    // Room for twice the average load, so that the instances of dead hosts fit elsewhere.
    let per_host = n_instances.div_ceil(n_hosts);
    let max_instances = env_usize("TRELLIS_SIM_MAX_INSTANCES", (2 * per_host).max(10)) as u32;
    let capacity = Capacity {
        max_instances,
        memory_bytes: 64 << 30,
        cpus: 4,
        microvm: None,
    };
    println!(
        "simulated lattice: {n_hosts} hosts ({per_conn} per NATS connection, at most {max_instances} instances each), \
         {n_instances} instances, heartbeat every {interval:?}, controller --host-timeout {host_timeout}"
    );

    let nats = Nats::start().await;
    let l = lattice("sim");
    let client = nats.client().await;
    let js = jetstream::new(client.clone());
    let ctl = CtlClient::new(client.clone(), l.clone(), Duration::from_secs(60));

    let mut controller = nats.controller(&l, "setup", &host_timeout);
    while ctl.request(&StatusRequest::default()).await.is_err() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The component: any bytes do, the simulated hosts run nothing.
    let mut wasm = b"\0asm\x01\0\0\0".to_vec();
    wasm.extend_from_slice(b"trellis sim benchmark component");
    let digest = trellis_bus::put_artifact(&js, &l, &wasm).await.unwrap();
    let registered = ctl
        .request(&ComponentRegisterRequest {
            digest,
            manifest: MANIFEST.to_owned(),
            signature: None,
        })
        .await
        .unwrap();

    // 1. Setup.
    let start_failed = count_facts(&client, &l, FactKind::InstanceStartFailed);
    let t = Instant::now();
    let sim = Sim::start(&nats, &l, n_hosts, per_conn, lanes, capacity, interval).await;
    while hosts_up(&ctl).await < n_hosts {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let hosts_time = t.elapsed();
    println!("{n_hosts} hosts up in {}", secs(hosts_time));

    let t = Instant::now();
    let requests = Arc::new(Mutex::new(Vec::<Duration>::new()));
    let per_lane: Vec<usize> = (0..lanes)
        .map(|k| n_instances / lanes + usize::from(k < n_instances % lanes))
        .collect();
    let progress = Arc::new(AtomicU64::new(0));
    let sim = Arc::new(sim);
    let mut lane_tasks = Vec::new();
    for (k, total) in per_lane.into_iter().enumerate() {
        let (ctl, sim, requests, progress) =
            (ctl.clone(), sim.clone(), requests.clone(), progress.clone());
        let mut min_seq = registered.seq;
        lane_tasks.push(tokio::spawn(async move {
            let mut left = total;
            while left > 0 {
                let count = left.min(100);
                let request = InstanceStartRequest {
                    component: COMPONENT.to_owned(),
                    count: count as u32,
                    host_id: None,
                    labels: [("lane".to_owned(), format!("l{k}"))].into(),
                    restart: RestartPolicy::Always,
                    min_seq: Some(min_seq),
                    grants: Vec::new(),
                    isolation: None,
                };
                let sent = Instant::now();
                let reply = ctl.request(&request).await.unwrap();
                requests.lock().unwrap().push(sent.elapsed());
                // Until the hosts' facts are stored, so that the next placement sees them.
                let deadline = Instant::now() + Duration::from_secs(60);
                while (sim.stored_for(&reply.operation_id) as usize) < reply.instances.len() {
                    assert!(
                        Instant::now() < deadline,
                        "instance.started facts not stored"
                    );
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                min_seq = sim.stats.max_seq.load(Ordering::Relaxed);
                left -= count;
                progress.fetch_add(count as u64, Ordering::Relaxed);
            }
        }));
    }
    let mut reported = 0;
    let mut last_report = Instant::now();
    while !lane_tasks.iter().all(JoinHandle::is_finished) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let done = progress.load(Ordering::Relaxed);
        if done >= reported + (n_instances as u64 / 10).max(1) {
            let mut recent: Vec<Duration> = {
                let r = requests.lock().unwrap();
                r[r.len().saturating_sub(20)..].to_vec()
            };
            println!(
                "  {done:>7} instances after {}: the last start requests took p50 {}",
                secs(t.elapsed()),
                ms(quantile(&mut recent, 0.5)),
            );
            reported = done;
            last_report = Instant::now();
        }
        if last_report.elapsed() > Duration::from_secs(120) {
            println!("  no progress for 120 s at {done} instances");
            last_report = Instant::now();
        }
    }
    for task in lane_tasks {
        task.await.unwrap();
    }
    let instances_time = t.elapsed();
    let mut request_times = requests.lock().unwrap().clone();
    println!(
        "{n_instances} instances started in {} ({:.0}/s) with {} requests: p50 {}, p99 {}; {} start_failed, {} refused by hosts",
        secs(instances_time),
        n_instances as f64 / instances_time.as_secs_f64(),
        request_times.len(),
        ms(quantile(&mut request_times, 0.5)),
        ms(quantile(&mut request_times, 0.99)),
        start_failed.get(),
        sim.stats.refused.load(Ordering::Relaxed),
    );
    let setup_rss = status_kib(controller.pid(), "VmRSS");
    println!("setup controller: VmRSS {}", mib(setup_rss));

    // 2. Replay.
    let mut events = js.get_stream(subject::events_stream(&l)).await.unwrap();
    let info = events.info().await.unwrap().state.clone();
    let mut hb_stream = js.get_stream(subject::heartbeat_stream(&l)).await.unwrap();
    let hb_info = hb_stream.info().await.unwrap().state.clone();
    println!(
        "fact stream: {} messages, {:.1} MiB ({:.0} bytes each), last sequence {}; heartbeat stream: {} messages, {:.1} MiB",
        info.messages,
        info.bytes as f64 / 1048576.0,
        info.bytes as f64 / info.messages.max(1) as f64,
        info.last_sequence,
        hb_info.messages,
        hb_info.bytes as f64 / 1048576.0,
    );
    controller.kill();
    let t = Instant::now();
    let controller = nats.controller(&l, "replayed", &host_timeout);
    let quick = CtlClient::new(client.clone(), l.clone(), Duration::from_secs(2));
    let status = loop {
        if let Ok(reply) = quick.request(&StatusRequest::default()).await
            && reply.as_of >= info.last_sequence
        {
            break reply;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    let first_answer = t.elapsed();
    let replay_rss = status_kib(controller.pid(), "VmRSS");
    let replay_hwm = status_kib(controller.pid(), "VmHWM");
    let (running, _) = count_instances(&ctl, InstanceStatus::Running, &HashSet::new()).await;
    println!(
        "fresh controller: first status answer at the tip after {} (its replay: {} ms, {} facts), \
         {running} instances running by instance.list; VmRSS {}, VmHWM {}",
        secs(first_answer),
        status.controller.replay_ms,
        status.controller.replayed_facts,
        mib(replay_rss),
        mib(replay_hwm),
    );

    // 3. Heartbeat ingest.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let nats_pid = nats.pid().unwrap();
    let me = std::process::id() as i32;
    let beats = sim.stats.heartbeats.load(Ordering::Relaxed);
    let window = CpuWindow::start(&[controller.pid(), nats_pid, me]);
    tokio::time::sleep(Duration::from_secs(idle_secs)).await;
    let cores = window.cores();
    let beats = sim.stats.heartbeats.load(Ordering::Relaxed) - beats;
    let hb_rate = beats as f64 / window.at.elapsed().as_secs_f64();
    println!(
        "heartbeat ingest over {idle_secs} s ({hb_rate:.0} heartbeats/s of about {} instances each): \
         controller {:.3} core, nats-server {:.3} core, this process (the {n_hosts} hosts) {:.3} core",
        sim.instances() / n_hosts,
        cores[0],
        cores[1],
        cores[2],
    );
    let ingest = cores[0];

    // 4. Placement.
    let mut facts = client
        .subscribe(subject::instance_events(&l))
        .await
        .unwrap();
    let mut reply_times = Vec::with_capacity(n_place);
    let mut wait_times = Vec::with_capacity(n_place);
    let mut placed = Vec::with_capacity(n_place);
    let t = Instant::now();
    for _ in 0..n_place {
        let sent = Instant::now();
        let reply = ctl
            .request(&InstanceStartRequest {
                component: COMPONENT.to_owned(),
                count: 1,
                host_id: None,
                labels: BTreeMap::new(),
                restart: RestartPolicy::Always,
                min_seq: None,
                grants: Vec::new(),
                isolation: None,
            })
            .await
            .unwrap();
        reply_times.push(sent.elapsed());
        loop {
            let message = tokio::time::timeout(Duration::from_secs(30), facts.next())
                .await
                .unwrap()
                .unwrap();
            let Ok(event) = Event::decode(&message.payload) else {
                continue;
            };
            if event.causation_id.as_deref() == Some(reply.operation_id.as_str())
                && matches!(
                    event.data,
                    FactData::InstanceStarted(_) | FactData::InstanceStartFailed(_)
                )
            {
                break;
            }
        }
        wait_times.push(sent.elapsed());
        placed.push(reply.instances[0].instance_id.clone());
    }
    let place_time = t.elapsed();
    let mut stop_times = Vec::with_capacity(n_place);
    for id in placed {
        let sent = Instant::now();
        ctl.request(&InstanceStopRequest { instance_id: id })
            .await
            .unwrap();
        stop_times.push(sent.elapsed());
    }
    drop(facts);
    let place_p50 = quantile(&mut reply_times, 0.5);
    let place_p99 = quantile(&mut reply_times, 0.99);
    let wait_p50 = quantile(&mut wait_times, 0.5);
    let wait_p99 = quantile(&mut wait_times, 0.99);
    println!(
        "{n_place} sequential instance.start (count 1) in {}: reply p50 {} p99 {} max {}; \
         until instance.started (--wait) p50 {} p99 {}",
        secs(place_time),
        ms(place_p50),
        ms(place_p99),
        ms(*reply_times.last().unwrap_or(&Duration::ZERO)),
        ms(wait_p50),
        ms(wait_p99),
    );
    println!(
        "{n_place} sequential instance.stop: reply p50 {} p99 {}",
        ms(quantile(&mut stop_times, 0.5)),
        ms(quantile(&mut stop_times, 0.99)),
    );
    // Let the stops settle before counting what the dead hosts run.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // 5. Relocation.
    let lost = count_facts(&client, &l, FactKind::HostLost);
    let relocated = count_facts(&client, &l, FactKind::InstanceRelocated);
    let failed_before = start_failed.get();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stride = n_hosts / n_kill;
    let dead: Vec<Arc<SimHost>> = (0..n_kill)
        .map(|i| sim.hosts[i * stride + stride / 2].clone())
        .collect();
    let dead_ids: HashSet<HostId> = dead.iter().map(|h| h.id.clone()).collect();
    let starts_before = sim.stats.starts.load(Ordering::Relaxed);
    let stored_before = sim.stats.started_stored.load(Ordering::Relaxed);
    let rejoins_before = sim.stats.rejoins.load(Ordering::Relaxed);
    let total_before = sim.instances();
    let t = Instant::now();
    for h in &dead {
        h.kill();
    }
    let orphans: usize = dead.iter().map(|h| h.instances.lock().unwrap().len()).sum();
    println!(
        "killed {n_kill} hosts running {orphans} instances; waiting for the controller (host timeout {host_timeout})"
    );
    let (mut all_lost, mut all_relocated, mut all_started, mut all_stored) =
        (None, None, None, None);
    let mut all_outcomes = None;
    let mut first_lost = None;
    let mut last_progress = (Instant::now(), 0u64);
    let give_up = Duration::from_secs(300);
    loop {
        let now = t.elapsed();
        let l_n = lost.get();
        let r_n = relocated.get();
        let s_n = sim.stats.starts.load(Ordering::Relaxed) - starts_before;
        let f_n = sim.stats.started_stored.load(Ordering::Relaxed) - stored_before;
        if first_lost.is_none() && l_n > 0 {
            first_lost = Some(now);
        }
        if all_lost.is_none() && l_n >= n_kill as u64 {
            all_lost = Some(now);
        }
        if all_relocated.is_none() && r_n >= orphans as u64 {
            all_relocated = Some(now);
        }
        if all_started.is_none() && s_n >= orphans as u64 {
            all_started = Some(now);
        }
        if all_stored.is_none() && f_n >= orphans as u64 {
            all_stored = Some(now);
        }
        // Every lost instance has an outcome: started elsewhere, or a start that failed.
        let failed = start_failed.get() - failed_before;
        if all_lost.is_some() && all_outcomes.is_none() && f_n + failed >= orphans as u64 {
            all_outcomes = Some(now);
        }
        if all_lost.is_some() && all_outcomes.is_some() {
            break;
        }
        let progress = l_n + r_n + s_n + f_n;
        if progress != last_progress.1 {
            last_progress = (Instant::now(), progress);
        }
        if now > give_up || (l_n > 0 && last_progress.0.elapsed() > Duration::from_secs(60)) {
            println!(
                "  gave up after {}: {l_n} host.lost, {r_n} instance.relocated, {s_n} starts accepted, {f_n} instance.started stored",
                secs(now)
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut shown = None;
    let mut running_after = 0;
    if all_outcomes.is_some() {
        let wait = if all_stored.is_some() { 60 } else { 5 };
        let deadline = Instant::now() + Duration::from_secs(wait);
        loop {
            let (running, on_dead) =
                count_instances(&ctl, InstanceStatus::Running, &dead_ids).await;
            running_after = running;
            if running >= total_before && on_dead == 0 {
                shown = Some(t.elapsed());
                break;
            }
            if Instant::now() > deadline {
                println!(
                    "  instance.list shows {running} running, {on_dead} of them on dead hosts"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let opt = |d: Option<Duration>| d.map_or_else(|| "never".to_owned(), secs);
    let relocation = match (all_lost, all_stored) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a)),
        _ => None,
    };
    println!(
        "after the kill: first host.lost {}, all {n_kill} host.lost {}, {orphans} instance.relocated {}, \
         starts acknowledged by the new hosts {}, their instance.started stored {}, every lost instance \
         started or failed {}, instance.list shows {running_after} running none on dead hosts {}",
        opt(first_lost),
        opt(all_lost),
        opt(all_relocated),
        opt(all_started),
        opt(all_stored),
        opt(all_outcomes),
        opt(shown),
    );
    println!(
        "  relocation after the last host.lost: {}; start_failed during it: {}; live hosts declared lost (rejoined): {}; starts refused by full hosts: {}",
        opt(relocation),
        start_failed.get() - failed_before,
        sim.stats.rejoins.load(Ordering::Relaxed) - rejoins_before,
        sim.stats.refused.load(Ordering::Relaxed),
    );
    let spread: Vec<usize> = sim
        .hosts
        .iter()
        .filter(|h| h.alive.load(Ordering::Relaxed))
        .map(|h| h.instances.lock().unwrap().len())
        .collect();
    println!(
        "  instances per live host now: min {}, max {}",
        spread.iter().min().unwrap_or(&0),
        spread.iter().max().unwrap_or(&0)
    );

    // 6. Ramps.
    let live: Vec<HostId> = sim
        .hosts
        .iter()
        .filter(|h| h.alive.load(Ordering::Relaxed))
        .map(|h| h.id.clone())
        .collect();
    let live = Arc::new(live);
    let mut ctls = Vec::new();
    for _ in 0..4 {
        ctls.push(CtlClient::new(
            nats.client().await,
            l.clone(),
            Duration::from_secs(5),
        ));
    }
    let ctls = Arc::new(ctls);
    let length = Duration::from_secs(step_secs);
    let rates = [250.0, 500.0, 1000.0, 2000.0, 4000.0, 8000.0, 16000.0];
    let host_get = {
        let (ctls, live) = (ctls.clone(), live.clone());
        move |n: u64| {
            let (ctls, live) = (ctls.clone(), live.clone());
            async move {
                let ctl = &ctls[n as usize % ctls.len()];
                let host_id = live[n as usize % live.len()].clone();
                ctl.request(&HostGetRequest {
                    host_id,
                    min_seq: None,
                })
                .await
                .is_ok()
            }
        }
    };
    let get_limit = request_ramp("host.get", &rates, length, host_get.clone()).await;
    let status_call = {
        let ctls = ctls.clone();
        move |n: u64| {
            let ctls = ctls.clone();
            async move {
                ctls[n as usize % ctls.len()]
                    .request(&StatusRequest::default())
                    .await
                    .is_ok()
            }
        }
    };
    let status_limit = request_ramp("lattice.status", &rates, length, status_call).await;

    // Facts: `instance.started` again for running instances, from their hosts.
    let announced: Vec<(Arc<SimHost>, InstanceId)> = sim
        .hosts
        .iter()
        .filter(|h| h.alive.load(Ordering::Relaxed))
        .flat_map(|h| {
            let ids: Vec<InstanceId> = h.instances.lock().unwrap().keys().cloned().collect();
            ids.into_iter().map(move |id| (h.clone(), id))
        })
        .collect();
    let digest = registered.component.digest.clone();
    let version = registered.component.manifest.version.clone();
    let component = registered.component.manifest.name.clone();
    let fact_rates = [1000.0, 2000.0, 4000.0, 8000.0, 16000.0, 32000.0, 64000.0];
    let publisher_client = nats.client().await;
    let fact_js = jetstream::new(publisher_client.clone());
    let mut fact_limit = None;
    println!("facts at rising rates ({step_secs} s a step) under 200 host.get/s; p99 of host.get:");
    let mut next = 0usize;
    for &rate in &fact_rates {
        let probe = tokio::spawn(open_loop(200.0, length, host_get.clone()));
        let start = Instant::now();
        let mut ticker = tokio::time::interval(Duration::from_millis(2));
        let mut sent = 0u64;
        let mut acks = Vec::new();
        while start.elapsed() < length {
            ticker.tick().await;
            let due = (start.elapsed().as_secs_f64() * rate) as u64;
            let mut batch = Vec::new();
            while sent < due {
                // Acks are awaited in batches below the context's window of 5,000 in flight.
                if batch.len() == 1000 {
                    acks.push(tokio::spawn(last_ack(std::mem::take(&mut batch))));
                }
                let (host, id) = &announced[next % announced.len()];
                next += 1;
                let event = Event::new(
                    host.source.clone(),
                    FactData::InstanceStarted(InstanceStarted {
                        instance_id: id.clone(),
                        host_id: host.id.clone(),
                        component: component.clone(),
                        version: version.clone(),
                        digest: digest.clone(),
                        restart: RestartPolicy::Always,
                        attempt: 0,
                        isolation: Default::default(),
                        acceleration: None,
                    }),
                );
                let publish = PublishMessage::build()
                    .payload(event.encode().unwrap().into())
                    .message_id(event.id.to_string());
                batch.push(
                    fact_js
                        .send_publish(event.nats_subject(&l), publish)
                        .await
                        .unwrap(),
                );
                sent += 1;
            }
            acks.push(tokio::spawn(last_ack(batch)));
        }
        let achieved = sent as f64 / start.elapsed().as_secs_f64();
        let mut last_seq = 0;
        for ack in acks {
            last_seq = last_seq.max(ack.await.unwrap());
        }
        let stored_in = start.elapsed();
        let (latencies, failed, _) = probe.await.unwrap();
        // How far behind the controller is: the time until it answers at the last fact stored.
        let t = Instant::now();
        let caught_up = ctl
            .request(&StatusRequest {
                min_seq: Some(last_seq),
            })
            .await
            .is_ok();
        let s = step(rate, achieved, latencies, failed);
        println!(
            "  offered {:>7.0}/s  sent {:>7.0}/s  stored in {}  host.get p50 {:>10}  p99 {:>10}  failed {}  controller at the last fact {} later{}",
            rate,
            achieved,
            secs(stored_in),
            ms(s.p50),
            ms(s.p99),
            s.failed,
            ms(t.elapsed()),
            if caught_up { "" } else { " (not yet)" },
        );
        if s.p99 > Duration::from_millis(50) || s.failed > 0 {
            fact_limit = Some(achieved);
            break;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    // Summary.
    let limit = |l: Option<f64>, top: f64| {
        l.map_or_else(|| format!("above {top:.0}/s"), |r| format!("{r:.0}/s"))
    };
    println!();
    println!(
        "summary ({n_hosts} hosts, {n_instances} instances, run took {}):",
        secs(run.elapsed())
    );
    println!("  hosts up                  {}", secs(hosts_time));
    println!(
        "  instances started         {} ({} start_failed)",
        secs(instances_time),
        start_failed.get()
    );
    println!(
        "  fact stream               {} messages, {:.1} MiB",
        info.messages,
        info.bytes as f64 / 1048576.0
    );
    println!(
        "  replay                    first answer {}, replay_ms {}, VmRSS {}, VmHWM {}",
        secs(first_answer),
        status.controller.replay_ms,
        mib(replay_rss),
        mib(replay_hwm)
    );
    println!(
        "  heartbeat ingest          controller {:.3} core, nats-server {:.3} core ({hb_rate:.0}/s)",
        cores[0], cores[1]
    );
    println!(
        "  placement                 reply p50 {} p99 {}; --wait p50 {} p99 {}",
        ms(place_p50),
        ms(place_p99),
        ms(wait_p50),
        ms(wait_p99)
    );
    println!(
        "  relocation                lost after {}, relocated {} after that, {} after the kill",
        opt(all_lost),
        opt(relocation),
        opt(all_stored)
    );
    println!(
        "  p99 > 50 ms at            host.get {}, lattice.status {}, facts {}",
        limit(get_limit, rates[rates.len() - 1]),
        limit(status_limit, rates[rates.len() - 1]),
        limit(fact_limit, fact_rates[fact_rates.len() - 1]),
    );
    println!("goals:");
    goal(
        &format!("replay of the {n_instances}-instance lattice (first answer)"),
        first_answer < Duration::from_secs(3),
        &secs(first_answer),
        "< 3 s",
    );
    goal(
        &format!("heartbeat ingest at {n_hosts} hosts"),
        ingest < 0.25,
        &format!("{ingest:.3} core"),
        "< 0.25",
    );
    goal(
        "placement p99 (instance.start reply)",
        place_p99 < Duration::from_millis(20),
        &ms(place_p99),
        "< 20 ms",
    );
    goal(
        &format!("relocation of {orphans} instances after host.lost"),
        relocation.is_some_and(|d| d < Duration::from_secs(10)),
        &opt(relocation),
        "< 10 s",
    );
    drop(controller);
}
