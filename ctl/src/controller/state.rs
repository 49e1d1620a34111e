//! What a replica holds in memory: the projection, the stream position it reflects and the
//! liveness of hosts as heartbeats tell it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, watch};
use trellis_bus::{FactPublisher, RawFact};
use trellis_schemas::control::HostView;
use trellis_schemas::{
    ErrorBody, ErrorCode, Event, Fact, FactData, Heartbeat, HostId, HostRecord, InstanceId,
    Projection,
};

use super::ControllerConfig;
use super::schedule::{LoadIndex, Loads};

/// How the replay at start went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReplayStats {
    /// Milliseconds from start of replay to reaching the tip.
    pub millis: u64,
    /// Facts applied.
    pub facts: u64,
}

/// What the replica knows of one host beyond the facts.
#[derive(Debug, Clone)]
pub(crate) struct Live {
    /// When the replica last heard of the host (a heartbeat, or the fact announcing it), or a
    /// later time the replica granted after being cut off itself: the start of the host's timeout.
    pub last_seen: Instant,
    /// When the latest heartbeat arrived (monotonic), for its age.
    pub heard_at: Option<Instant>,
    /// The latest heartbeat, if one arrived.
    pub heartbeat: Option<Heartbeat>,
    /// When that heartbeat arrived (this replica's clock).
    pub received_at: Option<DateTime<Utc>>,
}

pub(crate) struct State {
    pub config: ControllerConfig,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    /// Publishes the facts the controller itself observes (`artifact.stored`, and
    /// `instance.start_failed` when a host cannot be reached).
    pub publisher: FactPublisher,
    /// The `source` of those facts.
    pub source: String,
    /// Records control requests, grants and revokes on the audit stream.
    pub audit: trellis_bus::audit::AuditLog,
    pub started_at: DateTime<Utc>,
    pub started: Instant,
    projection: RwLock<Projection>,
    as_of: watch::Sender<u64>,
    applied: AtomicU64,
    live: Mutex<HashMap<HostId, Live>>,
    /// Instances placed by this replica whose `instance.started` it has not applied yet: host,
    /// memory limit, when placed. They take room in the next placements ([`State::loads`]).
    inflight: Mutex<HashMap<InstanceId, (HostId, u64, Instant)>>,
    /// What each host runs, kept as facts are applied (taken after the projection's lock).
    load_index: Mutex<LoadIndex>,
    /// Held from counting loads to recording what was placed, so that two placements at once do
    /// not both see the same room.
    pub placing: Mutex<()>,
    replay: OnceLock<ReplayStats>,
    /// Rollouts this replica should drive: the task started in `run` takes them.
    drive: mpsc::UnboundedSender<trellis_schemas::RolloutId>,
    drive_rx: Mutex<Option<mpsc::UnboundedReceiver<trellis_schemas::RolloutId>>>,
    /// Rollouts this replica drives now.
    driving: Mutex<std::collections::HashSet<trellis_schemas::RolloutId>>,
    /// Signalled when a wait for a fact has lasted [`READER_STALL`]: the fact reader may have
    /// lost its consumer (its NATS server died) and reopens if it has been quiet that long.
    pub reader_stalled: tokio::sync::Notify,
    /// The highest stream sequence the fact reader has seen exist: a delivered fact's sequence
    /// plus the facts the server said were pending after it.
    observed_tip: AtomicU64,
    /// The fact stream's state as last read from JetStream, and when (see [`State::stream_state`]).
    stream_state: tokio::sync::Mutex<Option<StreamRead>>,
    /// The last `lattice.status` answer's counts, with the projection's `last_seq` they were made
    /// at and when (see [`State::memo_status`]).
    status_memo: Mutex<Option<(u64, Instant, Arc<trellis_schemas::control::StatusReply>)>>,
}

/// How long a `lattice.status` answer's counts serve while no fact changes the projection: the
/// failures of the last hour move with the clock too.
const STATUS_MEMO_FOR: Duration = Duration::from_secs(1);

/// A read of the fact stream's state, and when it was made.
type StreamRead = (
    Instant,
    Result<jetstream::stream::State, trellis_bus::StreamError>,
);

/// How long a read of the fact stream's state serves `lattice.status` requests: each read is a
/// round trip through JetStream, which dashboards polling status should not pay every time.
const STREAM_STATE_FOR: Duration = Duration::from_millis(500);

/// A stream's `(messages, first sequence, last sequence)` as read, brought up to `tip`, the
/// highest sequence seen exist since the read: the messages after the read add to the count (none
/// is removed that fast), and a stream that was empty starts after the last sequence it had.
fn brought_up_to((messages, first, last): (u64, u64, u64), tip: u64) -> (u64, u64, u64) {
    if tip <= last {
        return (messages, first, last);
    }
    let first = if messages == 0 { last + 1 } else { first };
    (messages + (tip - last), first, tip)
}

/// How long a placement counts as room taken while its `instance.started` has not arrived.
const INFLIGHT_FOR: Duration = Duration::from_secs(30);
/// The heartbeat interval assumed for a host whose heartbeat has not been heard yet.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(2);

/// How long a wait for a fact goes before the reader is asked to check that it is still fed. An
/// ordered consumer that lost its server notices only after two missed idle heartbeats (10 s).
pub(crate) const READER_STALL: Duration = Duration::from_secs(1);

impl State {
    pub fn new(config: ControllerConfig, client: async_nats::Client) -> Self {
        let js = trellis_bus::jetstream(client.clone());
        let (publisher, _task) = FactPublisher::spawn(
            js.clone(),
            config.lattice.clone(),
            config.streams.clone(),
            1_000,
        );
        let (drive, drive_rx) = mpsc::unbounded_channel();
        trellis_bus::audit::record_nats_refusals(
            client.clone(),
            config.lattice.clone(),
            format!("controller/{}", config.replica_id),
        );
        Self {
            source: trellis_schemas::fact::source(
                &config.lattice,
                "controller",
                &config.replica_id,
            ),
            publisher,
            audit: trellis_bus::audit::AuditLog::new(client.clone(), config.lattice.clone()),
            config,
            js,
            client,
            started_at: Utc::now(),
            started: Instant::now(),
            projection: RwLock::new(Projection::new()),
            as_of: watch::channel(0).0,
            applied: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            load_index: Mutex::new(LoadIndex::default()),
            placing: Mutex::new(()),
            replay: OnceLock::new(),
            drive,
            drive_rx: Mutex::new(Some(drive_rx)),
            driving: Mutex::default(),
            reader_stalled: tokio::sync::Notify::new(),
            observed_tip: AtomicU64::new(0),
            stream_state: tokio::sync::Mutex::new(None),
            status_memo: Mutex::new(None),
        }
    }

    /// The status counts `make` computes from the projection, made again only when a fact
    /// changed the projection or [`STATUS_MEMO_FOR`] has passed. Counting walks every instance,
    /// which at 100,000 instances takes milliseconds; dashboards and scripts polling status on a
    /// quiet lattice share one count. Also returns the stream sequence the counts reflect.
    pub fn memo_status(
        &self,
        make: impl FnOnce(&Projection) -> trellis_schemas::control::StatusReply,
    ) -> (Arc<trellis_schemas::control::StatusReply>, u64) {
        let projection = self.projection();
        let seq = projection.last_seq;
        // Read under the projection's lock, so no fact is applied in between.
        let as_of = seq.max(self.as_of());
        let mut memo = self
            .status_memo
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some((at_seq, made, reply)) = &*memo
            && *at_seq == seq
            && made.elapsed() < STATUS_MEMO_FOR
        {
            return (Arc::clone(reply), as_of);
        }
        let reply = Arc::new(make(&projection));
        *memo = Some((seq, Instant::now(), Arc::clone(&reply)));
        (reply, as_of)
    }

    /// The fact stream's state, read from JetStream at most [`STREAM_STATE_FOR`] ago, with its
    /// last sequence raised to the highest this replica has seen exist (so that a replica that
    /// falls behind shows its lag at once). Requests that arrive while a read is on its way wait
    /// for that read rather than sending their own, and a failed read answers them all with its
    /// error, so that an outage does not queue one JetStream timeout per request.
    pub async fn stream_state(&self) -> Result<jetstream::stream::State, trellis_bus::StreamError> {
        let mut cached = self.stream_state.lock().await;
        let read = match &*cached {
            Some((read_at, read)) if read_at.elapsed() < STREAM_STATE_FOR => read.clone(),
            _ => {
                let read = trellis_bus::events_stream_state(&self.js, &self.config.lattice).await;
                *cached = Some((Instant::now(), read.clone()));
                read
            }
        };
        drop(cached);
        let mut current = read?;
        (
            current.messages,
            current.first_sequence,
            current.last_sequence,
        ) = brought_up_to(
            (
                current.messages,
                current.first_sequence,
                current.last_sequence,
            ),
            self.observed_tip.load(Ordering::Relaxed),
        );
        Ok(current)
    }

    /// Asks this replica to drive `rollout` (a task of its own, started by `run`).
    pub fn drive(&self, rollout: trellis_schemas::RolloutId) {
        let _ = self.drive.send(rollout);
    }

    /// The rollouts to drive, for the one task that starts their drivers.
    pub fn take_drive_requests(
        &self,
    ) -> Option<mpsc::UnboundedReceiver<trellis_schemas::RolloutId>> {
        self.drive_rx
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
    }

    /// Records that this replica drives `rollout`; false when it already does.
    pub fn start_driving(&self, rollout: &trellis_schemas::RolloutId) -> bool {
        self.driving
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .insert(rollout.clone())
    }

    /// Records that this replica's driver of `rollout` has ended.
    pub fn stop_driving(&self, rollout: &trellis_schemas::RolloutId) {
        self.driving
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .remove(rollout);
    }

    /// Whether this replica drives `rollout`.
    pub fn is_driving(&self, rollout: &trellis_schemas::RolloutId) -> bool {
        self.driving
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(rollout)
    }

    /// Changes whenever the projection applies facts.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.as_of.subscribe()
    }

    /// The stream sequence the projection reflects.
    pub fn as_of(&self) -> u64 {
        *self.as_of.borrow()
    }

    pub fn applied_count(&self) -> u64 {
        self.applied.load(Ordering::Relaxed)
    }

    pub fn set_replay_stats(&self, stats: ReplayStats) {
        let _ = self.replay.set(stats);
    }

    pub fn replay_stats(&self) -> ReplayStats {
        self.replay.get().copied().unwrap_or(ReplayStats {
            millis: 0,
            facts: 0,
        })
    }

    /// Read access to the projection. Never held across an await.
    pub fn projection(&self) -> RwLockReadGuard<'_, Projection> {
        self.projection
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What each host of `projection` runs, plus what this replica placed there that the
    /// projection does not show yet, and which hosts are quiet (see [`super::schedule`]). Hold
    /// [`State::placing`] from here until the placements are recorded with [`State::placed`].
    pub(crate) fn loads(&self, projection: &Projection) -> Loads {
        let mut inflight = self
            .inflight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Started (or failed, or stopped): the projection counts it now. Never reported: a
        // start that was lost is not room taken for ever.
        inflight.retain(|id, (_, _, at)| {
            !projection.instances.contains_key(id) && at.elapsed() < INFLIGHT_FOR
        });
        self.load_index()
            .loads(projection)
            .with_inflight(inflight.values().map(|(h, m, _)| (h, *m)))
            .with_quiet(self.quiet_hosts(projection))
            .with_microvm(self.microvm_by_heartbeat(projection))
    }

    /// Whether each host up runs micro-VMs by its latest heartbeat, for the hosts heard from
    /// since their `host.started` (placement takes the others' word from that fact).
    fn microvm_by_heartbeat(
        &self,
        projection: &Projection,
    ) -> HashMap<HostId, Option<trellis_schemas::isolation::Acceleration>> {
        let live = self.live();
        projection
            .hosts_up()
            .filter_map(|h| {
                let heartbeat = current_heartbeat(h, live.get(&h.host_id))?;
                Some((h.host_id.clone(), heartbeat.capacity.microvm))
            })
            .collect()
    }

    fn load_index(&self) -> std::sync::MutexGuard<'_, LoadIndex> {
        self.load_index
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records instances just placed: `(instance, host, memory limit)`.
    pub(crate) fn placed(&self, placed: impl IntoIterator<Item = (InstanceId, HostId, u64)>) {
        let now = Instant::now();
        let mut inflight = self
            .inflight
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        for (id, host, memory) in placed {
            inflight.insert(id, (host, memory, now));
        }
    }

    /// Hosts up by the projection that this replica has not heard from for three of their
    /// heartbeat intervals and at least half the liveness timeout, with how long. Nothing is
    /// quiet while this replica is disconnected: it hears no one then.
    fn quiet_hosts(&self, projection: &Projection) -> HashMap<HostId, Duration> {
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return HashMap::new();
        }
        let live = self.live();
        let floor = self.config.host_timeout / 2;
        projection
            .hosts_up()
            .filter_map(|h| {
                let l = live.get(&h.host_id)?;
                let interval = l.heartbeat.as_ref().map_or(DEFAULT_HEARTBEAT, |hb| {
                    Duration::from_millis(hb.interval_ms)
                });
                let silent = l.last_seen.elapsed();
                (silent > (interval * 3).max(floor)).then(|| (h.host_id.clone(), silent))
            })
            .collect()
    }

    pub fn live(&self) -> std::sync::MutexGuard<'_, HashMap<HostId, Live>> {
        self.live
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records `event` in the fact stream; returns its sequence (`unavailable` when it could
    /// not be stored).
    pub async fn publish(&self, event: &Event) -> Result<u64, ErrorBody> {
        self.publisher
            .publish(event)
            .await
            .map_err(|e| ErrorBody::new(ErrorCode::Unavailable, e.to_string()))
    }

    /// Records `event`, then waits (at most `min_seq_wait`) until this replica has applied it, so
    /// that the caller's next request, if this replica serves it, sees it; other replicas are
    /// read with `min_seq`. Returns its sequence.
    pub async fn publish_and_apply(&self, event: &Event) -> Result<u64, ErrorBody> {
        let seq = self.publish(event).await?;
        self.wait_until_applied_for(seq, self.config.min_seq_wait)
            .await;
        Ok(seq)
    }

    /// Waits until the projection reflects stream sequence `seq`.
    pub async fn wait_until_applied(&self, seq: u64) {
        if seq == 0 {
            return;
        }
        let mut rx = self.as_of.subscribe();
        loop {
            match tokio::time::timeout(READER_STALL, rx.wait_for(|applied| *applied >= seq)).await {
                Ok(_) => return,
                Err(_) => self.reader_stalled.notify_one(),
            }
        }
    }

    /// Like [`State::wait_until_applied`], bounded by `timeout`; returns whether it got there.
    pub async fn wait_until_applied_for(&self, seq: u64, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.wait_until_applied(seq))
            .await
            .is_ok()
    }

    /// Applies a batch of raw facts: decoding happens outside the lock.
    fn apply_batch(&self, batch: &mut Vec<RawFact>) {
        if let Some(tip) = batch
            .iter()
            .map(|raw| raw.seq.saturating_add(raw.pending))
            .max()
        {
            self.observed_tip.fetch_max(tip, Ordering::Relaxed);
        }
        let (decoded, last) = decode_batch(batch);
        let mut announced = Vec::new();
        {
            let mut projection = self
                .projection
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let mut index = self.load_index();
            for fact in &decoded {
                if index.apply(&mut projection, fact) {
                    self.applied.fetch_add(1, Ordering::Relaxed);
                    if let FactData::HostStarted(d) = &fact.event.data {
                        announced.push(d.host_id.clone());
                    }
                }
            }
        }
        if !announced.is_empty() {
            // A host that (re)joined gets a full timeout from now before it can be declared lost.
            let now = Instant::now();
            let mut live = self.live();
            for host in announced {
                live.entry(host)
                    .and_modify(|l| l.last_seen = l.last_seen.max(now))
                    .or_insert(Live {
                        last_seen: now,
                        heard_at: None,
                        heartbeat: None,
                        received_at: None,
                    });
            }
        }
        self.as_of.send_modify(|as_of| *as_of = (*as_of).max(last));
    }

    /// Gives every host a fresh timeout plus `extra`, after this replica could not hear anything
    /// for a while: the hosts were cut off from NATS too and reconnect with their own backoff.
    pub fn grant_grace(&self, extra: Duration) {
        let until = Instant::now() + extra;
        for live in self.live().values_mut() {
            live.last_seen = live.last_seen.max(until);
        }
    }

    /// Records a heartbeat. A `retained` one (read back from the stream at start) never replaces
    /// a live one.
    pub fn record_heartbeat(&self, payload: &[u8], retained: bool) {
        let heartbeat: Heartbeat = match serde_json::from_slice(payload) {
            Ok(hb) => hb,
            Err(e) => {
                tracing::warn!(error = %e, "ignoring malformed heartbeat");
                return;
            }
        };
        let now = Instant::now();
        let mut live = self.live();
        if retained
            && live
                .get(&heartbeat.host_id)
                .is_some_and(|l| l.heartbeat.is_some())
        {
            return;
        }
        live.insert(
            heartbeat.host_id.clone(),
            Live {
                last_seen: now,
                heard_at: Some(now),
                heartbeat: Some(heartbeat),
                received_at: Some(Utc::now()),
            },
        );
    }

    /// A host as the replica sees it.
    pub fn view(&self, record: &HostRecord, live: Option<&Live>) -> HostView {
        let heartbeat = live.and_then(|l| l.heartbeat.as_ref());
        // What the host offers now: by its latest heartbeat, else by its `host.started`.
        let capacity = current_heartbeat(record, live).map_or(&record.capacity, |hb| &hb.capacity);
        HostView {
            host_id: record.host_id.clone(),
            status: record.status,
            labels: record.labels.clone(),
            capacity: capacity.clone(),
            version: record.version.clone(),
            started_at: record.started_at,
            status_since: record.status_since,
            last_heartbeat: live.and_then(|l| l.received_at),
            // The age of what was heard, not of a grace granted after an outage.
            heartbeat_age_ms: live
                .and_then(|l| l.heard_at)
                .map(|at| at.elapsed().as_millis() as u64),
            instances: heartbeat.map(|h| h.instances.len() as u32).unwrap_or(0),
        }
    }
}

/// The latest heartbeat of `host` if its current process sent it: sent at or after the host's
/// last `host.started` (both by the host's clock). An older one tells of a process gone.
fn current_heartbeat<'a>(host: &HostRecord, live: Option<&'a Live>) -> Option<&'a Heartbeat> {
    live.and_then(|l| l.heartbeat.as_ref())
        .filter(|hb| hb.sent_at >= host.started_at)
}

/// Decodes a batch of raw facts (emptying it); returns the facts and the highest sequence seen,
/// including that of facts that could not be decoded.
pub(crate) fn decode_batch(batch: &mut Vec<RawFact>) -> (Vec<Fact>, u64) {
    let mut last = 0;
    let mut decoded = Vec::with_capacity(batch.len());
    for raw in batch.drain(..) {
        last = last.max(raw.seq);
        match Event::decode(&raw.payload) {
            Ok(event) => decoded.push(Fact {
                seq: raw.seq,
                event,
            }),
            // A fact this version does not understand (a newer Trellis wrote it, or someone
            // published garbage on a fact subject) is skipped, not fatal.
            Err(e) => tracing::warn!(seq = raw.seq, error = %e, "skipping undecodable fact"),
        }
    }
    (decoded, last)
}

/// Decodes and applies facts as the reader hands them over.
pub(crate) async fn fold_facts(state: Arc<State>, mut rx: mpsc::Receiver<RawFact>) {
    let mut batch = Vec::with_capacity(512);
    while rx.recv_many(&mut batch, 512).await > 0 {
        state.apply_batch(&mut batch);
    }
}

#[cfg(test)]
mod tests {
    use super::brought_up_to;

    #[test]
    fn a_stream_read_is_brought_up_to_the_sequences_seen_since() {
        // Nothing newer seen: the read stands.
        assert_eq!(brought_up_to((9, 1, 9), 9), (9, 1, 9));
        assert_eq!(brought_up_to((9, 1, 9), 4), (9, 1, 9));
        // Two facts appended since the read.
        assert_eq!(brought_up_to((9, 1, 9), 11), (11, 1, 11));
        // Retention had removed the first ones; the range moves on from there.
        assert_eq!(brought_up_to((5, 5, 9), 10), (6, 5, 10));
        // A stream that was empty: a new one reads (0, 0, 0), a purged one (0, 10, 9).
        assert_eq!(brought_up_to((0, 0, 0), 3), (3, 1, 3));
        assert_eq!(brought_up_to((0, 10, 9), 12), (3, 10, 12));
    }
}
