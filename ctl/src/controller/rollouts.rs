//! `rollout.start|get|list|promote|abort|undo`, and the drivers that take a rollout's steps.
//!
//! A rollout is an operation: the replica that accepts `rollout.start` records `rollout.started`
//! with the plan and drives it in a task of its own, recording every step as a fact. Nothing is
//! kept but the facts: `promote`, `abort` and `undo` may reach any replica, which passes them to
//! the driver on its signal subject ([`subject::rollout_driver`]); when no driver answers (its
//! replica is gone), the replica that took the request adopts the rollout from the facts and
//! drives it from the step they record.
//!
//! Traffic: rolling rollouts set no weights (old and new instances share the component subject
//! while old ones drain gracefully). Blue-green and canary rollouts set the new version's weight
//! in their facts; routers follow them. A rollout only ends (`completed`, `aborted`,
//! `rolled_back`) once the set that no longer receives traffic has drained, so the route is
//! never dropped while the wrong set still runs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use tokio::sync::mpsc;
use trellis_schemas::control::{
    Grant, RolloutAbortRequest, RolloutActionReply, RolloutGetReply, RolloutGetRequest,
    RolloutListReply, RolloutListRequest, RolloutPromoteRequest, RolloutStartReply,
    RolloutStartRequest, RolloutUndoRequest,
};
use trellis_schemas::fact::InstanceStartFailed;
use trellis_schemas::instance::{
    InstanceStats, InstanceStatsCommand, InstanceStatsReply, StartInstanceCommand,
    StopInstanceCommand,
};
use trellis_schemas::rollout::{
    Condition, Revision, RolloutAborted, RolloutAdopted, RolloutCompleted, RolloutPaused,
    RolloutPlan, RolloutPromoted, RolloutRecord, RolloutRolledBack, RolloutStarted, RolloutStatus,
    RolloutStepReached, Strategy, parse_analysis,
};
use trellis_schemas::{
    AssignmentRecord, AssignmentTarget, ComponentName, ComponentSource, ErrorBody, ErrorCode,
    Event, FactData, InstanceId, InstanceRecord, InstanceStatus, RolloutId, subject,
};

use super::assignments::{record as record_assignment, validate as validate_grant};
use super::instances::{ask, command};
use super::state::State;

/// How long new instances may take to serve before the rollout gives up on them.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long retiring instances may take to drain.
const STOP_TIMEOUT: Duration = Duration::from_secs(45);
/// How long a replica waits for a driver to answer a signal.
const SIGNAL_TIMEOUT: Duration = Duration::from_secs(2);

/// What an operator asks of a rollout in progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Promote,
    Abort,
    Undo,
}

impl Signal {
    fn as_str(self) -> &'static str {
        match self {
            Signal::Promote => "promote",
            Signal::Abort => "abort",
            Signal::Undo => "undo",
        }
    }

    fn parse(s: &[u8]) -> Option<Self> {
        match s {
            b"promote" => Some(Signal::Promote),
            b"abort" => Some(Signal::Abort),
            b"undo" => Some(Signal::Undo),
            _ => None,
        }
    }
}

fn not_found(id: &RolloutId) -> ErrorBody {
    ErrorBody::new(
        ErrorCode::NotFound,
        format!("no rollout {id}; `trellis rollout ls` lists them"),
    )
    .with_details(serde_json::json!({ "rollout_id": id }))
}

/// The instances of `component` that serve now.
fn running_of<'a>(
    projection: &'a trellis_schemas::Projection,
    component: &'a ComponentName,
) -> impl Iterator<Item = &'a InstanceRecord> + 'a {
    projection
        .instances
        .values()
        .filter(move |i| i.component == component.as_str() && i.status.is_active())
}

pub(crate) async fn start(
    state: &State,
    request: RolloutStartRequest,
) -> Result<RolloutStartReply, ErrorBody> {
    let plan = request.plan();
    plan.validate()
        .map_err(|e| ErrorBody::new(ErrorCode::InvalidRequest, e))?;
    let (to, from, replaces) = {
        let projection = state.projection();
        let name = &request.component;
        let artifact = if request.to.starts_with("sha256:") {
            projection
                .artifacts
                .get(&request.to)
                .filter(|a| a.manifest.name == *name)
        } else {
            projection.find_artifact(name.as_str(), Some(&request.to))
        };
        let Some(artifact) = artifact else {
            let known: Vec<String> = projection
                .artifacts
                .values()
                .filter(|a| a.manifest.name == *name)
                .map(|a| format!("{} {}", a.manifest.version, a.digest))
                .collect();
            return Err(ErrorBody::new(
                ErrorCode::NotFound,
                format!(
                    "component {name} has no version {:?} in the artifact store; push it with `trellis component push`",
                    request.to
                ),
            )
            .with_details(serde_json::json!({ "known": known })));
        };
        if let Some(busy) = projection
            .rollouts
            .values()
            .find(|r| r.component == *name && !r.status.is_finished())
        {
            return Err(ErrorBody::new(
                ErrorCode::Conflict,
                format!(
                    "component {name} already has rollout {} in progress ({}); promote, abort or wait for it first",
                    busy.rollout_id,
                    busy.status.as_str()
                ),
            )
            .with_details(serde_json::json!({ "rollout_id": busy.rollout_id })));
        }
        let to = Revision {
            version: artifact.manifest.version.clone(),
            digest: artifact.digest.clone(),
        };
        let old: Vec<&InstanceRecord> = running_of(&projection, name)
            .filter(|i| i.digest.as_deref() != Some(to.digest.as_str()))
            .collect();
        if old.is_empty() {
            let message = if running_of(&projection, name).next().is_some() {
                format!("every running instance of {name} already runs {to}")
            } else {
                format!(
                    "no instance of {name} is running; start one with `trellis instance start {name}`"
                )
            };
            return Err(ErrorBody::new(ErrorCode::InvalidState, message));
        }
        // Replacements start on the hosts of the instances they replace: each must run
        // micro-VMs if the new version asks for them.
        if artifact.manifest.isolation == trellis_schemas::isolation::Isolation::Microvm {
            let loads = state.loads(&projection);
            let mut lacking: Vec<String> = old
                .iter()
                .filter(|i| {
                    projection
                        .hosts
                        .get(&i.host_id)
                        .is_none_or(|host| loads.microvm_of(host).is_none())
                })
                .map(|i| i.host_id.to_string())
                .collect();
            lacking.sort();
            lacking.dedup();
            if !lacking.is_empty() {
                return Err(ErrorBody::new(
                    ErrorCode::InvalidRequest,
                    format!(
                        "{name} {} asks for isolation microvm, and a rollout replaces instances on their own hosts, but {} run(s) no micro-VMs: start them with --microvm-kernel and --microvm-initrd, or stop the instances there first",
                        to.version,
                        lacking.join(", ")
                    ),
                )
                .with_details(serde_json::json!({ "hosts": lacking })));
            }
        }
        let (from, replaces) = old_set(&old);
        (to, from, replaces)
    };
    begin(state, request.component, from, to, plan, replaces, None).await
}

/// The versions the instances `old` run, and their ids: what a rollout replaces.
fn old_set(old: &[&InstanceRecord]) -> (Vec<Revision>, Vec<InstanceId>) {
    let mut from: Vec<Revision> = old
        .iter()
        .filter_map(|i| {
            Some(Revision {
                version: i.version.clone()?,
                digest: i.digest.clone()?,
            })
        })
        .collect();
    from.sort();
    from.dedup();
    (from, old.iter().map(|i| i.instance_id.clone()).collect())
}

/// Records `rollout.started` and hands the rollout to this replica's drivers.
async fn begin(
    state: &State,
    component: ComponentName,
    from: Vec<Revision>,
    to: Revision,
    plan: RolloutPlan,
    replaces: Vec<InstanceId>,
    undo_of: Option<RolloutId>,
) -> Result<RolloutStartReply, ErrorBody> {
    let rollout_id = RolloutId::generate();
    let weight = match plan.strategy {
        Strategy::Rolling => None,
        Strategy::BlueGreen | Strategy::Canary => Some(0),
    };
    let event = Event::new(
        state.source.clone(),
        FactData::RolloutStarted(RolloutStarted {
            rollout_id: rollout_id.clone(),
            component,
            from: from.clone(),
            to: to.clone(),
            plan: plan.clone(),
            replaces,
            weight,
            undo_of,
        }),
    )
    .caused_by(rollout_id.to_string());
    state.publish_and_apply(&event).await?;
    state.drive(rollout_id.clone());
    Ok(RolloutStartReply {
        rollout_id,
        from,
        to,
        plan,
    })
}

pub(crate) fn get(state: &State, request: RolloutGetRequest) -> Result<RolloutGetReply, ErrorBody> {
    let projection = state.projection();
    let rollout = projection
        .rollouts
        .get(&request.rollout_id)
        .cloned()
        .ok_or_else(|| not_found(&request.rollout_id))?;
    Ok(RolloutGetReply {
        as_of: projection.last_seq.max(state.as_of()),
        rollout,
    })
}

pub(crate) fn list(
    state: &State,
    request: RolloutListRequest,
) -> Result<RolloutListReply, ErrorBody> {
    let projection = state.projection();
    // Rollout ids are ULIDs: newest first is reverse id order.
    let rollouts = projection
        .rollouts
        .values()
        .rev()
        .filter(|r| request.component.as_ref().is_none_or(|c| &r.component == c))
        .take(trellis_schemas::control::MAX_PAGE as usize)
        .cloned()
        .collect();
    Ok(RolloutListReply {
        as_of: projection.last_seq.max(state.as_of()),
        rollouts,
    })
}

pub(crate) async fn promote(
    state: &State,
    request: RolloutPromoteRequest,
) -> Result<RolloutActionReply, ErrorBody> {
    let status = current(state, &request.rollout_id)?;
    if status != RolloutStatus::Paused {
        return Err(ErrorBody::new(
            ErrorCode::InvalidState,
            format!(
                "rollout {} is {}; only a paused rollout can be promoted",
                request.rollout_id,
                status.as_str()
            ),
        ));
    }
    signal(state, &request.rollout_id, Signal::Promote).await?;
    Ok(RolloutActionReply {
        rollout_id: request.rollout_id,
        status,
    })
}

pub(crate) async fn abort(
    state: &State,
    request: RolloutAbortRequest,
) -> Result<RolloutActionReply, ErrorBody> {
    let status = current(state, &request.rollout_id)?;
    signal(state, &request.rollout_id, Signal::Abort).await?;
    Ok(RolloutActionReply {
        rollout_id: request.rollout_id,
        status,
    })
}

pub(crate) async fn undo(
    state: &State,
    request: RolloutUndoRequest,
) -> Result<RolloutStartReply, ErrorBody> {
    let name = &request.component;
    let (in_progress, last_completed) = {
        let projection = state.projection();
        let in_progress = projection
            .rollouts
            .values()
            .find(|r| r.component == *name && !r.status.is_finished())
            .cloned();
        let last_completed = projection
            .rollouts
            .values()
            .rev()
            .find(|r| r.component == *name && r.status == RolloutStatus::Completed)
            .cloned();
        (in_progress, last_completed)
    };
    // A rollout in progress (a blue-green keeping its old set, a canary) goes back at once.
    if let Some(rollout) = in_progress {
        signal(state, &rollout.rollout_id, Signal::Undo).await?;
        return Ok(RolloutStartReply {
            rollout_id: rollout.rollout_id,
            from: rollout.from,
            to: rollout.to,
            plan: rollout.plan,
        });
    }
    let Some(last) = last_completed else {
        return Err(ErrorBody::new(
            ErrorCode::NotFound,
            format!("component {name} has no completed rollout to undo"),
        ));
    };
    let Some(previous) = last.from.first().cloned() else {
        return Err(ErrorBody::new(
            ErrorCode::InvalidState,
            format!("rollout {} recorded no previous version", last.rollout_id),
        ));
    };
    start_undo(state, &last, previous).await
}

/// Starts a rollout back to `previous`, with the plan of the rollout it undoes.
async fn start_undo(
    state: &State,
    last: &RolloutRecord,
    previous: Revision,
) -> Result<RolloutStartReply, ErrorBody> {
    let (from, replaces) = {
        let projection = state.projection();
        let old: Vec<&InstanceRecord> = running_of(&projection, &last.component)
            .filter(|i| i.digest.as_deref() != Some(previous.digest.as_str()))
            .collect();
        if old.is_empty() {
            return Err(ErrorBody::new(
                ErrorCode::InvalidState,
                format!(
                    "no running instance of {} runs anything but {previous}",
                    last.component
                ),
            ));
        }
        old_set(&old)
    };
    // Going back does not wait for anyone: the same strategy, without its holds.
    let mut plan = last.plan.clone();
    match plan.strategy {
        Strategy::Rolling => {}
        Strategy::BlueGreen => plan.auto_promote_after_ms = Some(0),
        Strategy::Canary => plan.steps = vec![100],
    }
    begin(
        state,
        last.component.clone(),
        from,
        previous,
        plan,
        replaces,
        Some(last.rollout_id.clone()),
    )
    .await
}

/// The status of a rollout that has not finished (`invalid_state` for one that has).
fn current(state: &State, id: &RolloutId) -> Result<RolloutStatus, ErrorBody> {
    let projection = state.projection();
    let rollout = projection.rollouts.get(id).ok_or_else(|| not_found(id))?;
    if rollout.status.is_finished() {
        return Err(ErrorBody::new(
            ErrorCode::InvalidState,
            format!(
                "rollout {id} has finished ({}); `trellis rollout undo {}` goes back",
                rollout.status.as_str(),
                rollout.component
            ),
        ));
    }
    Ok(rollout.status)
}

/// Passes `signal` to the rollout's driver, adopting the rollout when no replica drives it.
async fn signal(state: &State, id: &RolloutId, signal: Signal) -> Result<(), ErrorBody> {
    let subject = subject::rollout_driver(&state.config.lattice, id);
    for attempt in 0..2 {
        let sent = tokio::time::timeout(
            SIGNAL_TIMEOUT,
            state
                .client
                .request(subject.clone(), signal.as_str().as_bytes().to_vec().into()),
        )
        .await;
        match sent {
            Ok(Ok(_)) => return Ok(()),
            Ok(Err(e))
                if attempt == 0
                    && e.kind() == async_nats::client::RequestErrorKind::NoResponders =>
            {
                tracing::warn!(rollout = %id, "no replica drives the rollout; adopting it");
                adopt(state, id).await;
                // Give the new driver a moment to subscribe.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok(Err(e)) => {
                return Err(ErrorBody::new(
                    ErrorCode::Unavailable,
                    format!("cannot reach the driver of rollout {id}: {e}"),
                ));
            }
            Err(_) => {
                return Err(ErrorBody::new(
                    ErrorCode::Unavailable,
                    format!("the driver of rollout {id} did not answer within {SIGNAL_TIMEOUT:?}"),
                ));
            }
        }
    }
    Err(ErrorBody::new(
        ErrorCode::Unavailable,
        format!("no replica could take over rollout {id}"),
    ))
}

/// Claims rollout `id` for this replica with `rollout.adopted`, published expecting the
/// rollout's previous adoption, and drives it. Returns whether this replica won the claim.
async fn adopt(state: &State, id: &RolloutId) -> bool {
    let claim = {
        let projection = state.projection();
        projection
            .rollouts
            .get(id)
            .filter(|r| !r.status.is_finished())
            .map(|r| (r.component.clone(), r.step, r.adopted_seq))
    };
    let Some((component, step, expected)) = claim else {
        return false;
    };
    let event = Event::new(
        state.source.clone(),
        FactData::RolloutAdopted(RolloutAdopted {
            rollout_id: id.clone(),
            component,
            replica: state.config.replica_id.clone(),
            step,
        }),
    )
    .caused_by(id.to_string());
    match trellis_bus::publish_exclusive(&state.js, &state.config.lattice, &event, expected).await {
        Ok(Some(seq)) => {
            tracing::warn!(rollout = %id, step, "took over the rollout");
            state.wait_until_applied(seq).await;
            state.drive(id.clone());
            true
        }
        Ok(None) => false,
        Err(e) => {
            tracing::warn!(rollout = %id, error = %e, "cannot record the adoption");
            false
        }
    }
}

/// How often a replica looks for rollouts nobody drives.
const WATCH_EVERY: Duration = Duration::from_secs(1);
/// How long after it starts a rollout is left to the replica that started it.
const WATCH_GRACE: Duration = Duration::from_secs(3);

/// Finds rollouts in progress that no replica drives (their driver does not answer on its
/// subject, twice in a row a second apart) and adopts them.
pub(crate) async fn watch_drivers(state: Arc<State>) {
    let mut silent: std::collections::HashSet<RolloutId> = std::collections::HashSet::new();
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let grace = chrono::Duration::from_std(WATCH_GRACE).unwrap_or_default();
        let candidates: Vec<RolloutId> = {
            let projection = state.projection();
            projection
                .rollouts
                .values()
                .filter(|r| !r.status.is_finished() && chrono::Utc::now() - r.started_at > grace)
                .map(|r| r.rollout_id.clone())
                .filter(|id| !state.is_driving(id))
                .collect()
        };
        let mut still_silent = std::collections::HashSet::new();
        for id in candidates {
            let subject = subject::rollout_driver(&state.config.lattice, &id);
            let ping =
                tokio::time::timeout(SIGNAL_TIMEOUT, state.client.request(subject, "ping".into()))
                    .await;
            let nobody = matches!(
                &ping,
                Ok(Err(e)) if e.kind() == async_nats::client::RequestErrorKind::NoResponders
            );
            if !nobody {
                continue;
            }
            if silent.contains(&id) {
                adopt(&state, &id).await;
            } else {
                still_silent.insert(id);
            }
        }
        silent = still_silent;
    }
}

/// Starts drivers for the rollouts this replica is asked to drive, one at a time per rollout.
pub(crate) async fn run_drivers(state: Arc<State>) {
    let Some(mut requests) = state.take_drive_requests() else {
        return;
    };
    while let Some(id) = requests.recv().await {
        if !state.start_driving(&id) {
            continue;
        }
        let state = Arc::clone(&state);
        tokio::spawn(async move {
            Driver::run(Arc::clone(&state), id.clone()).await;
            state.stop_driving(&id);
        });
    }
}

/// How a driver's wait ended.
enum Wake {
    Signal(Signal),
    Elapsed,
    /// An analysis condition broke: the condition and the figure measured.
    Failed(String, String),
}

/// Why a driver goes back to the old version.
enum Back {
    /// `rollout.aborted` with this reason.
    Abort(String),
    /// `rollout.rolled_back` with this condition and the figure measured.
    RollBack(String, String),
}

impl Back {
    fn undo() -> Self {
        Back::RollBack("undo".into(), String::new())
    }
}

/// How often a driver checks its analysis while the new version takes traffic.
const ANALYSIS_EVERY: Duration = Duration::from_millis(250);

/// Takes one rollout's steps.
struct Driver {
    state: Arc<State>,
    record: RolloutRecord,
    signals: mpsc::Receiver<Signal>,
    began: Instant,
    /// The plan's analysis conditions (none: no analysis).
    analysis: Vec<Condition>,
}

impl Driver {
    async fn run(state: Arc<State>, id: RolloutId) {
        let Some(record) = state.projection().rollouts.get(&id).cloned() else {
            tracing::warn!(rollout = %id, "asked to drive an unknown rollout");
            return;
        };
        if record.status.is_finished() {
            return;
        }
        if record
            .driver
            .as_ref()
            .is_some_and(|d| *d != state.config.replica_id)
        {
            tracing::info!(rollout = %id, driver = ?record.driver, "another replica drives the rollout");
            return;
        }
        let subscription = match state
            .client
            .subscribe(subject::rollout_driver(&state.config.lattice, &id))
            .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(rollout = %id, error = %e, "cannot listen for rollout signals");
                return;
            }
        };
        let (tx, signals) = mpsc::channel(16);
        let client = state.client.clone();
        let listener = tokio::spawn(async move {
            let mut subscription = subscription;
            while let Some(message) = subscription.next().await {
                let signal = Signal::parse(&message.payload);
                if let Some(signal) = signal {
                    let _ = tx.send(signal).await;
                }
                let accepted = signal.is_some() || &message.payload[..] == b"ping";
                if let Some(reply) = message.reply {
                    let body: &'static [u8] = if accepted { b"ok" } else { b"unknown" };
                    let _ = client.publish(reply, body.into()).await;
                }
            }
        });
        let began = Instant::now()
            - (chrono::Utc::now() - record.started_at)
                .to_std()
                .unwrap_or_default();
        let analysis = record
            .plan
            .analysis
            .as_deref()
            .map(parse_analysis)
            .transpose()
            .unwrap_or_default()
            .unwrap_or_default();
        let mut driver = Driver {
            state,
            record,
            signals,
            began,
            analysis,
        };
        tracing::info!(rollout = %id, strategy = %driver.record.plan.strategy, "driving rollout");
        if let Err(e) = driver.drive().await {
            tracing::error!(rollout = %id, error = %e, "rollout driver failed; the rollout holds where it is");
        }
        listener.abort();
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.began.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn publish(&self, data: FactData) -> Result<u64, ErrorBody> {
        let event = Event::new(self.state.source.clone(), data)
            .caused_by(self.record.rollout_id.to_string());
        self.state.publish_and_apply(&event).await
    }

    /// Refreshes the record from the projection.
    fn refresh(&mut self) {
        if let Some(r) = self
            .state
            .projection()
            .rollouts
            .get(&self.record.rollout_id)
        {
            self.record = r.clone();
        }
    }

    async fn drive(&mut self) -> Result<(), ErrorBody> {
        let outcome = match self.record.plan.strategy {
            Strategy::Rolling => self.rolling().await?,
            Strategy::BlueGreen => self.blue_green().await?,
            Strategy::Canary => self.canary().await?,
        };
        match outcome {
            None => Ok(()),
            Some(back) => self.go_back(back).await,
        }
    }

    /// Old instances still serving, in the order the rollout replaces them.
    fn old_running(&self) -> Vec<InstanceRecord> {
        let projection = self.state.projection();
        self.record
            .replaces
            .iter()
            .filter_map(|id| projection.instances.get(id))
            .filter(|i| i.status.is_active())
            .cloned()
            .collect()
    }

    /// New instances of this rollout that still serve: those its facts record, and any other
    /// instance of the new version that started after the rollout did (one a driver started
    /// before it died, in a step it never recorded).
    fn new_running(&self) -> Vec<InstanceRecord> {
        let projection = self.state.projection();
        running_of(&projection, &self.record.component)
            .filter(|i| {
                self.record.started.contains(&i.instance_id)
                    || (i.digest.as_deref() == Some(self.record.to.digest.as_str())
                        && i.started_at.is_some_and(|t| t >= self.record.started_at)
                        && !self.record.replaces.contains(&i.instance_id))
            })
            .cloned()
            .collect()
    }

    /// Starts the new set beside the old (blue-green, canary): one new instance per old one,
    /// less those already running (a driver that took over does not start them twice).
    async fn start_new_set(&mut self) -> Result<Option<Back>, ErrorBody> {
        let old = self.old_running();
        let need = old.len().saturating_sub(self.new_running().len());
        let started = match self.replace(&old[..need]).await {
            Ok(ids) => ids,
            Err(reason) => return Ok(Some(Back::Abort(reason))),
        };
        // The new set serves nothing yet.
        self.step(Some(0), started, Vec::new()).await?;
        Ok(None)
    }

    /// Holds the current step for `limit` (none: until promoted), checking the analysis. A
    /// driver that took over a paused rollout holds what is left of its pause, without a second
    /// `rollout.paused`.
    async fn hold(&mut self, limit: Option<Duration>) -> Result<Wake, ErrorBody> {
        let limit = if self.record.status == RolloutStatus::Paused {
            self.record
                .paused_until
                .map(|until| (until - chrono::Utc::now()).to_std().unwrap_or_default())
        } else {
            self.pause(limit).await?;
            limit
        };
        Ok(self.wait(limit).await)
    }

    async fn step(
        &mut self,
        weight: Option<u8>,
        started: Vec<InstanceId>,
        stopped: Vec<InstanceId>,
    ) -> Result<(), ErrorBody> {
        let step = self.record.step + 1;
        let data = FactData::RolloutStepReached(RolloutStepReached {
            rollout_id: self.record.rollout_id.clone(),
            component: self.record.component.clone(),
            step,
            weight,
            new_running: u32::try_from(self.new_running().len()).unwrap_or(0),
            old_running: u32::try_from(self.old_running().len()).unwrap_or(0),
            started,
            stopped,
            elapsed_ms: self.elapsed_ms(),
        });
        self.publish(data).await?;
        self.refresh();
        Ok(())
    }

    /// Waits for a signal, or `limit` when given, checking the analysis meanwhile.
    async fn wait(&mut self, limit: Option<Duration>) -> Wake {
        let deadline = limit.map(|l| tokio::time::Instant::now() + l);
        let mut tick = tokio::time::interval(ANALYSIS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let elapsed = async {
                match deadline {
                    Some(d) => tokio::time::sleep_until(d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                signal = self.signals.recv() => {
                    return signal.map_or(Wake::Elapsed, Wake::Signal);
                }
                () = elapsed => return Wake::Elapsed,
                _ = tick.tick(), if !self.analysis.is_empty() => {
                    if let Some((condition, measured)) = self.analyse().await {
                        return Wake::Failed(condition, measured);
                    }
                }
            }
        }
    }

    /// Checks the analysis against the counters of the new instances; the first condition
    /// broken, with the figure measured.
    async fn analyse(&self) -> Option<(String, String)> {
        let mut by_host: std::collections::BTreeMap<trellis_schemas::HostId, Vec<InstanceId>> =
            std::collections::BTreeMap::new();
        for i in self.new_running() {
            by_host.entry(i.host_id).or_default().push(i.instance_id);
        }
        let asks = by_host.into_iter().map(|(host, instance_ids)| {
            let state = Arc::clone(&self.state);
            async move {
                ask::<_, InstanceStatsReply>(&state, &host, &InstanceStatsCommand { instance_ids })
                    .await
            }
        });
        let mut total = InstanceStats::default();
        for reply in futures::future::join_all(asks).await {
            match reply {
                Ok(reply) => reply.stats.values().for_each(|s| total.add(s)),
                Err(e) => {
                    tracing::debug!(rollout = %self.record.rollout_id, error = %e, "no counters from a host");
                }
            }
        }
        self.analysis
            .iter()
            .find_map(|c| c.check(&total).err().map(|m| (c.text.clone(), m)))
    }

    /// A signal already waiting, if any.
    fn pending_signal(&mut self) -> Option<Signal> {
        self.signals.try_recv().ok()
    }

    async fn rolling(&mut self) -> Result<Option<Back>, ErrorBody> {
        let surge = self.record.plan.max_surge as usize;
        let unavailable = self.record.plan.max_unavailable as usize;
        loop {
            if let Some(Signal::Abort | Signal::Undo) = self.pending_signal() {
                return Ok(Some(Back::Abort("requested".into())));
            }
            let old = self.old_running();
            if old.is_empty() {
                break;
            }
            // New instances beyond those that replaced old ones (a batch a driver started and
            // never recorded before it died) replace old ones first.
            let replaced = self.record.replaces.len().saturating_sub(old.len());
            let surplus = self.new_running().len().saturating_sub(replaced);
            if surplus > 0 {
                let stopped = self.retire(&old[..surplus.min(old.len())]).await?;
                self.step(None, Vec::new(), stopped).await?;
                continue;
            }
            let batch = old.len().min((surge + unavailable).max(1));
            let (first, rest) = old[..batch].split_at(unavailable.min(batch));
            // Below the old count by at most `max_unavailable`: those go first.
            let mut stopped = self.retire(first).await?;
            let started = match self.replace(&old[..batch]).await {
                Ok(ids) => ids,
                Err(reason) => return Ok(Some(Back::Abort(reason))),
            };
            stopped.extend(self.retire(rest).await?);
            self.step(None, started, stopped).await?;
        }
        self.complete().await?;
        Ok(None)
    }

    async fn blue_green(&mut self) -> Result<Option<Back>, ErrorBody> {
        if self.record.step == 0
            && let Some(back) = self.start_new_set().await?
        {
            return Ok(Some(back));
        }
        if self.record.status != RolloutStatus::Promoted {
            let auto = self
                .record
                .plan
                .auto_promote_after_ms
                .map(Duration::from_millis);
            match self.hold(auto).await? {
                Wake::Signal(Signal::Abort) => return Ok(Some(Back::Abort("requested".into()))),
                Wake::Signal(Signal::Undo) => return Ok(Some(Back::undo())),
                Wake::Signal(Signal::Promote) => self.promoted(Some(100), false).await?,
                Wake::Elapsed => self.promoted(Some(100), true).await?,
                Wake::Failed(c, m) => return Ok(Some(Back::RollBack(c, m))),
            }
        }
        // The old set stays for `keep_previous_ms`, so that going back is instant.
        let keep = Duration::from_millis(self.record.plan.keep_previous_ms);
        let kept_since = self.record.status_since;
        let left = (kept_since + chrono::Duration::from_std(keep).unwrap_or_default())
            - chrono::Utc::now();
        let left = left.to_std().unwrap_or_default();
        loop {
            match self.wait(Some(left)).await {
                Wake::Signal(Signal::Abort) => return Ok(Some(Back::Abort("requested".into()))),
                Wake::Signal(Signal::Undo) => return Ok(Some(Back::undo())),
                Wake::Signal(Signal::Promote) => continue,
                Wake::Elapsed => break,
                Wake::Failed(c, m) => return Ok(Some(Back::RollBack(c, m))),
            }
        }
        let old = self.old_running();
        let stopped = self.retire(&old).await?;
        self.step(Some(100), Vec::new(), stopped).await?;
        self.complete().await?;
        Ok(None)
    }

    async fn canary(&mut self) -> Result<Option<Back>, ErrorBody> {
        if self.record.step == 0
            && let Some(back) = self.start_new_set().await?
        {
            return Ok(Some(back));
        }
        let steps = self.record.plan.steps.clone();
        let pause = self.record.plan.pause_ms.map(Duration::from_millis);
        // Steps already taken: the weight reached says where to go on from.
        let reached = self.record.weight.unwrap_or(0);
        if self.record.status == RolloutStatus::Paused {
            // Taken over while holding a step: hold what is left of it.
            match self.hold(pause).await? {
                Wake::Signal(Signal::Abort) => return Ok(Some(Back::Abort("requested".into()))),
                Wake::Signal(Signal::Undo) => return Ok(Some(Back::undo())),
                Wake::Signal(Signal::Promote) => self.promoted(Some(reached), false).await?,
                Wake::Elapsed => self.promoted(Some(reached), true).await?,
                Wake::Failed(c, m) => return Ok(Some(Back::RollBack(c, m))),
            }
        }
        for &weight in steps.iter().filter(|&&w| w > reached) {
            if let Some(signal) = self.pending_signal() {
                match signal {
                    Signal::Abort => return Ok(Some(Back::Abort("requested".into()))),
                    Signal::Undo => return Ok(Some(Back::undo())),
                    Signal::Promote => {}
                }
            }
            self.step(Some(weight), Vec::new(), Vec::new()).await?;
            if weight >= 100 {
                break;
            }
            match self.hold(pause).await? {
                Wake::Signal(Signal::Abort) => return Ok(Some(Back::Abort("requested".into()))),
                Wake::Signal(Signal::Undo) => return Ok(Some(Back::undo())),
                Wake::Signal(Signal::Promote) => self.promoted(Some(weight), false).await?,
                Wake::Elapsed => self.promoted(Some(weight), true).await?,
                Wake::Failed(c, m) => return Ok(Some(Back::RollBack(c, m))),
            }
        }
        let old = self.old_running();
        let stopped = self.retire(&old).await?;
        self.step(Some(100), Vec::new(), stopped).await?;
        self.complete().await?;
        Ok(None)
    }

    async fn pause(&mut self, limit: Option<Duration>) -> Result<(), ErrorBody> {
        let until = limit
            .and_then(|d| chrono::Duration::from_std(d).ok())
            .map(|d| chrono::Utc::now() + d);
        let data = FactData::RolloutPaused(RolloutPaused {
            rollout_id: self.record.rollout_id.clone(),
            component: self.record.component.clone(),
            step: self.record.step,
            weight: self.record.weight,
            until,
        });
        self.publish(data).await?;
        self.refresh();
        Ok(())
    }

    async fn promoted(&mut self, weight: Option<u8>, auto: bool) -> Result<(), ErrorBody> {
        let data = FactData::RolloutPromoted(RolloutPromoted {
            rollout_id: self.record.rollout_id.clone(),
            component: self.record.component.clone(),
            step: self.record.step,
            weight,
            auto,
        });
        self.publish(data).await?;
        self.refresh();
        Ok(())
    }

    async fn complete(&mut self) -> Result<(), ErrorBody> {
        let data = FactData::RolloutCompleted(RolloutCompleted {
            rollout_id: self.record.rollout_id.clone(),
            component: self.record.component.clone(),
            to: self.record.to.clone(),
            elapsed_ms: self.elapsed_ms(),
        });
        self.publish(data).await?;
        tracing::info!(rollout = %self.record.rollout_id, ms = self.elapsed_ms(), "rollout completed");
        Ok(())
    }

    /// Sends traffic back to the old version, restores the old instances a rolling rollout
    /// retired, drains the new ones, and records how it ended.
    async fn go_back(&mut self, back: Back) -> Result<(), ErrorBody> {
        self.refresh();
        if self.record.weight.is_some() {
            // Traffic first: the routers send everything to the old set from this fact on.
            self.step(Some(0), Vec::new(), Vec::new()).await?;
        }
        if self.record.plan.strategy == Strategy::Rolling {
            // Old instances that were retired come back first, on their hosts.
            let retired: Vec<InstanceRecord> = {
                let projection = self.state.projection();
                self.record
                    .stopped
                    .iter()
                    .filter_map(|id| projection.instances.get(id))
                    .cloned()
                    .collect()
            };
            if let Err(reason) = self.restore(&retired).await {
                tracing::error!(rollout = %self.record.rollout_id, %reason, "cannot restore the old instances");
            }
        }
        let new = self.new_running();
        self.retire(&new).await?;
        let elapsed_ms = self.elapsed_ms();
        let data = match back {
            Back::Abort(reason) => FactData::RolloutAborted(RolloutAborted {
                rollout_id: self.record.rollout_id.clone(),
                component: self.record.component.clone(),
                reason,
                elapsed_ms,
            }),
            Back::RollBack(condition, measured) => FactData::RolloutRolledBack(RolloutRolledBack {
                rollout_id: self.record.rollout_id.clone(),
                component: self.record.component.clone(),
                condition,
                measured,
                elapsed_ms,
            }),
        };
        self.publish(data).await?;
        tracing::info!(rollout = %self.record.rollout_id, ms = elapsed_ms, "rollout went back");
        Ok(())
    }

    /// Starts one instance of the new version per instance in `like`, on its host, with its
    /// restart policy and its own grants; waits until all serve. `Err` says why one did not.
    async fn replace(&mut self, like: &[InstanceRecord]) -> Result<Vec<InstanceId>, String> {
        let source = {
            let projection = self.state.projection();
            let Some(artifact) = projection.artifacts.get(&self.record.to.digest) else {
                return Err(format!("artifact {} is gone", self.record.to.digest));
            };
            artifact.source()
        };
        self.start_like(like, &source).await
    }

    /// Starts again, with their own code, instances like the old ones in `retired`.
    async fn restore(&mut self, retired: &[InstanceRecord]) -> Result<Vec<InstanceId>, String> {
        let mut started = Vec::new();
        for old in retired {
            let source = {
                let projection = self.state.projection();
                let Some(artifact) = old
                    .digest
                    .as_ref()
                    .and_then(|d| projection.artifacts.get(d))
                else {
                    continue;
                };
                artifact.source()
            };
            started.extend(self.start_like(std::slice::from_ref(old), &source).await?);
        }
        Ok(started)
    }

    async fn start_like(
        &mut self,
        like: &[InstanceRecord],
        source: &ComponentSource,
    ) -> Result<Vec<InstanceId>, String> {
        let operation = self.record.rollout_id.to_string();
        let mut commands = Vec::new();
        for old in like {
            let id = InstanceId::generate();
            let (inherited, own) = {
                let projection = self.state.projection();
                let inherited: Vec<AssignmentRecord> = projection
                    .assignments()
                    .values()
                    .filter(|r| {
                        matches!(&r.assignment.target, AssignmentTarget::Component(c) if *c == self.record.component)
                    })
                    .cloned()
                    .collect();
                let target = AssignmentTarget::Instance(id.clone());
                let mut own = Vec::new();
                for record in projection.assignments().values() {
                    if matches!(&record.assignment.target, AssignmentTarget::Instance(i) if *i == old.instance_id)
                    {
                        let grant = Grant {
                            capability: record.assignment.capability,
                            provider: Some(record.assignment.provider.clone()),
                            config: record.assignment.config.clone(),
                        };
                        own.push(
                            validate_grant(&projection, &target, &grant, false)
                                .map_err(|e| e.message)?,
                        );
                    }
                }
                (inherited, own)
            };
            let mut assignments = inherited;
            for assignment in own {
                let seq = record_assignment(&self.state, &assignment, Some(&operation))
                    .await
                    .map_err(|e| e.message)?;
                assignments.push(AssignmentRecord {
                    assignment,
                    granted_at: chrono::Utc::now(),
                    granted_seq: seq,
                });
            }
            commands.push((
                old.host_id.clone(),
                StartInstanceCommand {
                    operation_id: operation.clone(),
                    instance_id: id,
                    component: source.clone(),
                    restart: old.restart.unwrap_or_default(),
                    assignments,
                    // The isolation it ran with (the host strengthens it to the new manifest's);
                    // left out when `process`, as by `instance.start`.
                    isolation: (!old.isolation.is_process()).then_some(old.isolation),
                },
            ));
        }
        let ids: Vec<InstanceId> = commands
            .iter()
            .map(|(_, c)| c.instance_id.clone())
            .collect();
        let state = Arc::clone(&self.state);
        let state = &state;
        let sends = commands
            .iter()
            .map(|(host, cmd)| async move { (host, cmd, command(state, host, cmd).await) });
        for (host, cmd, result) in futures::future::join_all(sends).await {
            if let Err(e) = result {
                let event = Event::new(
                    self.state.source.clone(),
                    FactData::InstanceStartFailed(InstanceStartFailed {
                        instance_id: cmd.instance_id.clone(),
                        host_id: host.clone(),
                        component: self.record.component.to_string(),
                        reason: e.message.clone(),
                    }),
                )
                .caused_by(operation.clone());
                let _ = self.state.publish(&event).await;
                return Err(format!("start_failed: {}", e.message));
            }
        }
        self.wait_until(&ids, START_TIMEOUT, |i| match i.status {
            InstanceStatus::Running => Some(Ok(())),
            InstanceStatus::Failed
            | InstanceStatus::Crashed
            | InstanceStatus::GaveUp
            | InstanceStatus::Stopped
            | InstanceStatus::Lost => Some(Err(format!(
                "start_failed: instance {} {}{}",
                i.instance_id,
                i.status.as_str(),
                i.last_reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            ))),
            _ => None,
        })
        .await?;
        Ok(ids)
    }

    /// Drains `instances` (gracefully: they answer what they hold, then stop with reason
    /// `rollout`) and waits until they have stopped.
    async fn retire(&mut self, instances: &[InstanceRecord]) -> Result<Vec<InstanceId>, ErrorBody> {
        let operation = self.record.rollout_id.to_string();
        let state = Arc::clone(&self.state);
        let state = &state;
        let sends = instances.iter().map(|i| {
            let cmd = StopInstanceCommand {
                operation_id: operation.clone(),
                instance_id: i.instance_id.clone(),
                reason: Some("rollout".to_owned()),
            };
            let host = i.host_id.clone();
            async move { command(state, &host, &cmd).await }
        });
        for result in futures::future::join_all(sends).await {
            if let Err(e) = result {
                tracing::warn!(rollout = %self.record.rollout_id, error = %e, "stop command failed");
            }
        }
        let ids: Vec<InstanceId> = instances.iter().map(|i| i.instance_id.clone()).collect();
        let waited = self
            .wait_until(&ids, STOP_TIMEOUT, |i| {
                (!i.status.is_active()).then_some(Ok(()))
            })
            .await;
        if let Err(e) = waited {
            tracing::warn!(rollout = %self.record.rollout_id, error = %e, "instances did not stop in time");
        }
        Ok(ids)
    }

    /// Waits until `check` decides for every instance in `ids` (`Some`), up to `limit`; the
    /// first `Err` it gives ends the wait.
    async fn wait_until(
        &self,
        ids: &[InstanceId],
        limit: Duration,
        check: impl Fn(&InstanceRecord) -> Option<Result<(), String>>,
    ) -> Result<(), String> {
        let mut applied = self.state.applied();
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            {
                let projection = self.state.projection();
                let mut done = true;
                for id in ids {
                    match projection.instances.get(id).and_then(&check) {
                        Some(Ok(())) => {}
                        Some(Err(e)) => return Err(e),
                        None => done = false,
                    }
                }
                if done {
                    return Ok(());
                }
            }
            if tokio::time::timeout_at(deadline, applied.changed())
                .await
                .is_err()
            {
                return Err(format!("instances not ready within {limit:?}"));
            }
        }
    }
}
