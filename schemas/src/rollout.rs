//! Rollouts: replacing the running version of a component with another while it serves.
//!
//! A rollout is an operation, not a desired state. `rollout.started` carries its plan; every step
//! taken is a fact (`rollout.step_reached`, `paused`, `promoted`); it ends with `completed`,
//! `aborted` or `rolled_back` and is then history. [`apply_rollout`] folds those facts into
//! [`RolloutRecord`]s; the projection and every router ([`Routes`]) use the same fold.
//!
//! # Traffic
//!
//! While a blue-green or canary rollout is in progress, its facts carry a `weight`: the percentage
//! of the component's requests that go to the new version; the rest go to the versions it
//! replaces. Routers (the http-server provider, hosts receiving on the component subject) pick a
//! version per request with [`Route::pick`] and send it to that version's subject
//! ([`crate::dataplane::version`]). A rolling rollout sets no weight: old and new instances serve
//! side by side on the component subject while the old ones drain.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::fact::FactData;
use crate::names::{ComponentName, InstanceId, RolloutId};

/// How a rollout moves traffic from the old version to the new.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Replace instances a few at a time: new ones start and serve before old ones drain.
    Rolling,
    /// Start the whole new set beside the old, switch all traffic at once on promotion, keep
    /// the old set for a while so that going back is instant.
    BlueGreen,
    /// Start the new set beside the old and move traffic to it by weighted steps.
    Canary,
}

impl Strategy {
    /// The strategy as written on the wire and on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Rolling => "rolling",
            Strategy::BlueGreen => "blue-green",
            Strategy::Canary => "canary",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Strategy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "rolling" => Ok(Strategy::Rolling),
            "blue-green" => Ok(Strategy::BlueGreen),
            "canary" => Ok(Strategy::Canary),
            other => Err(format!(
                "unknown strategy {other:?}; accepted: rolling, blue-green, canary"
            )),
        }
    }
}

/// One version of a component: its version string and the digest of its code.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Revision {
    /// The version from its manifest.
    pub version: String,
    /// `sha256:<hex>` of its code.
    pub digest: String,
}

impl fmt::Display for Revision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = self.digest.strip_prefix("sha256:").unwrap_or(&self.digest);
        write!(f, "{} ({})", self.version, &hex[..hex.len().min(12)])
    }
}

/// How a rollout proceeds. Fields that do not apply to its strategy are left at their defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutPlan {
    /// The strategy.
    pub strategy: Strategy,
    /// Rolling: how many new instances may run above the old count. Default 1.
    #[serde(default = "one")]
    pub max_surge: u32,
    /// Rolling: how many instances may be missing below the old count. Default 0.
    #[serde(default)]
    pub max_unavailable: u32,
    /// Canary: the traffic weights of its steps, in percent, increasing, the last 100.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<u8>,
    /// Canary: how long each step is held before the next; none: until `rollout.promote`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<u64>,
    /// Blue-green: promote by itself this long after the new set serves; none: wait for
    /// `rollout.promote`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_promote_after_ms: Option<u64>,
    /// Blue-green: how long the old set keeps running after the switch, so that undoing is
    /// instant. Default 5 minutes.
    #[serde(default = "five_minutes")]
    pub keep_previous_ms: u64,
    /// Conditions the new version must keep while it takes traffic, checked every 250 ms
    /// against its instances' counters, e.g. `error_rate<1%,p99<200ms,crashes=0` (see
    /// [`parse_analysis`]). A breach rolls the rollout back at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub analysis: Option<String>,
}

fn one() -> u32 {
    1
}

fn five_minutes() -> u64 {
    5 * 60 * 1000
}

impl RolloutPlan {
    /// A plan of `strategy` with every default.
    pub fn new(strategy: Strategy) -> Self {
        Self {
            strategy,
            max_surge: 1,
            max_unavailable: 0,
            steps: if strategy == Strategy::Canary {
                vec![10, 50, 100]
            } else {
                Vec::new()
            },
            pause_ms: None,
            auto_promote_after_ms: None,
            keep_previous_ms: five_minutes(),
            analysis: None,
        }
    }

    /// Checks the plan: surge and unavailability leave room to progress, steps increase to 100,
    /// the analysis parses.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(analysis) = &self.analysis {
            parse_analysis(analysis).map_err(|e| format!("analysis: {e}"))?;
        }
        match self.strategy {
            Strategy::Rolling => {
                if self.max_surge == 0 && self.max_unavailable == 0 {
                    return Err(
                        "max_surge and max_unavailable are both 0: the rollout could never replace an instance"
                            .into(),
                    );
                }
                if !self.steps.is_empty() {
                    return Err("steps apply to canary rollouts only".into());
                }
            }
            Strategy::BlueGreen => {
                if !self.steps.is_empty() {
                    return Err("steps apply to canary rollouts only".into());
                }
            }
            Strategy::Canary => {
                if self.steps.is_empty() {
                    return Err("a canary rollout needs steps, for example 10,50,100".into());
                }
                let mut last = 0;
                for &step in &self.steps {
                    if step > 100 {
                        return Err(format!("step {step} is above 100"));
                    }
                    if step <= last {
                        return Err(format!("steps must increase: {step} follows {last}"));
                    }
                    last = step;
                }
                if last != 100 {
                    return Err(format!("the last step must be 100, not {last}"));
                }
            }
        }
        Ok(())
    }
}

/// What an analysis condition measures, over the new version's instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Failed invocations, in percent of those answered.
    ErrorRate,
    /// The 99th percentile latency, in milliseconds (bucketed: the bucket's upper bound).
    P99,
    /// The 50th percentile latency, in milliseconds.
    P50,
    /// Crashes.
    Crashes,
}

/// How a measured figure compares with a condition's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// `<`
    Below,
    /// `<=`
    AtMost,
    /// `=`
    Equal,
    /// `>=`
    AtLeast,
    /// `>`
    Above,
}

/// One condition of an analysis: `error_rate<1%`, `p99<200ms`, `crashes=0`.
#[derive(Debug, Clone, PartialEq)]
pub struct Condition {
    /// What is measured.
    pub metric: Metric,
    /// How it must compare.
    pub comparison: Comparison,
    /// With what: percent, milliseconds or a count, by metric.
    pub value: f64,
    /// The condition as written.
    pub text: String,
}

/// Parses `error_rate<1%,p99<200ms,crashes=0`: comma-separated conditions of a metric
/// (`error_rate` in %, `p99` or `p50` in ms or s, `crashes`), a comparison (`<`, `<=`, `=`,
/// `>=`, `>`) and a value.
pub fn parse_analysis(text: &str) -> Result<Vec<Condition>, String> {
    let mut conditions = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let at = part
            .find(['<', '>', '='])
            .ok_or_else(|| format!("{part:?} has no comparison (<, <=, =, >=, >)"))?;
        let (name, rest) = part.split_at(at);
        let (comparison, value) = if let Some(v) = rest.strip_prefix("<=") {
            (Comparison::AtMost, v)
        } else if let Some(v) = rest.strip_prefix(">=") {
            (Comparison::AtLeast, v)
        } else if let Some(v) = rest.strip_prefix('<') {
            (Comparison::Below, v)
        } else if let Some(v) = rest.strip_prefix('>') {
            (Comparison::Above, v)
        } else {
            (
                Comparison::Equal,
                rest.trim_start_matches('=').trim_start_matches('='),
            )
        };
        let value = value.trim();
        let (metric, number) = match name.trim() {
            "error_rate" => (Metric::ErrorRate, value.strip_suffix('%').unwrap_or(value)),
            "crashes" => (Metric::Crashes, value),
            "p99" | "p50" => {
                let metric = if name.trim() == "p99" {
                    Metric::P99
                } else {
                    Metric::P50
                };
                let millis = if let Some(ms) = value.strip_suffix("ms") {
                    ms.to_owned()
                } else if let Some(s) = value.strip_suffix('s') {
                    let secs: f64 = s
                        .trim()
                        .parse()
                        .map_err(|_| format!("{part:?}: {value:?} is not a duration"))?;
                    (secs * 1000.0).to_string()
                } else {
                    return Err(format!(
                        "{part:?}: give the latency with a unit, like 200ms"
                    ));
                };
                conditions.push(Condition {
                    metric,
                    comparison,
                    value: millis
                        .trim()
                        .parse()
                        .map_err(|_| format!("{part:?}: {value:?} is not a duration"))?,
                    text: part.to_owned(),
                });
                continue;
            }
            other => {
                return Err(format!(
                    "unknown metric {other:?}; known: error_rate, p99, p50, crashes"
                ));
            }
        };
        let value: f64 = number
            .trim()
            .parse()
            .map_err(|_| format!("{part:?}: {value:?} is not a number"))?;
        if !value.is_finite() || value < 0.0 {
            return Err(format!("{part:?}: the value must be a non-negative number"));
        }
        conditions.push(Condition {
            metric,
            comparison,
            value,
            text: part.to_owned(),
        });
    }
    if conditions.is_empty() {
        return Err("no condition; for example error_rate<1%,p99<200ms,crashes=0".into());
    }
    Ok(conditions)
}

impl Condition {
    /// Checks the condition against `stats`; `Err` is the measured figure that breaks it
    /// (`error_rate=4.20%`). Rates and latencies with no invocation yet pass.
    pub fn check(&self, stats: &crate::instance::InstanceStats) -> Result<(), String> {
        let (measured, shown) = match self.metric {
            Metric::ErrorRate => {
                if stats.calls == 0 {
                    return Ok(());
                }
                let rate = stats.errors as f64 * 100.0 / stats.calls as f64;
                (
                    rate,
                    format!(
                        "error_rate={rate:.2}% ({} of {})",
                        stats.errors, stats.calls
                    ),
                )
            }
            Metric::P99 | Metric::P50 => {
                let q = if self.metric == Metric::P99 {
                    0.99
                } else {
                    0.5
                };
                let Some(us) = stats.quantile_us(q) else {
                    return Ok(());
                };
                let ms = us as f64 / 1000.0;
                let name = if self.metric == Metric::P99 {
                    "p99"
                } else {
                    "p50"
                };
                let shown = if us == u64::MAX {
                    format!("{name}>5s")
                } else {
                    format!("{name}<={ms}ms")
                };
                (ms, shown)
            }
            Metric::Crashes => (stats.crashes as f64, format!("crashes={}", stats.crashes)),
        };
        let holds = match self.comparison {
            Comparison::Below => measured < self.value,
            Comparison::AtMost => measured <= self.value,
            Comparison::Equal => (measured - self.value).abs() < f64::EPSILON,
            Comparison::AtLeast => measured >= self.value,
            Comparison::Above => measured > self.value,
        };
        if holds { Ok(()) } else { Err(shown) }
    }
}

/// Where a rollout is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RolloutStatus {
    /// Taking steps.
    Progressing,
    /// Holding a step until it is promoted (or its pause ends).
    Paused,
    /// Blue-green: traffic switched; the old set is kept until `keep_previous_ms` ends.
    Promoted,
    /// The new version serves everything; the old instances are gone.
    Completed,
    /// Stopped on request or because the new version could not start; the old version serves.
    Aborted,
    /// An analysis condition failed or an undo asked for it; the old version serves again.
    RolledBack,
}

impl RolloutStatus {
    /// The status as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutStatus::Progressing => "progressing",
            RolloutStatus::Paused => "paused",
            RolloutStatus::Promoted => "promoted",
            RolloutStatus::Completed => "completed",
            RolloutStatus::Aborted => "aborted",
            RolloutStatus::RolledBack => "rolled_back",
        }
    }

    /// Whether the rollout has ended.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            RolloutStatus::Completed | RolloutStatus::Aborted | RolloutStatus::RolledBack
        )
    }
}

/// `rollout.started`: a rollout of `component` to `to` began, with its plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutStarted {
    /// The rollout.
    pub rollout_id: RolloutId,
    /// The component.
    pub component: ComponentName,
    /// The versions running when it started.
    pub from: Vec<Revision>,
    /// The version it rolls out.
    pub to: Revision,
    /// How.
    pub plan: RolloutPlan,
    /// The running instances it replaces.
    pub replaces: Vec<InstanceId>,
    /// The share of traffic (percent) the new version gets from now; none: no split (rolling).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
    /// When this rollout undoes an earlier one: that rollout.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo_of: Option<RolloutId>,
}

/// `rollout.step_reached`: a step is done; the figures say what it found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutStepReached {
    /// The rollout.
    pub rollout_id: RolloutId,
    /// The component.
    pub component: ComponentName,
    /// The step, 1-based.
    pub step: u32,
    /// The new version's share of traffic from now; none: no split.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
    /// New instances serving now.
    pub new_running: u32,
    /// Old instances still serving.
    pub old_running: u32,
    /// Instances of the new version started by this step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub started: Vec<InstanceId>,
    /// Old instances drained by this step.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stopped: Vec<InstanceId>,
    /// Milliseconds since the rollout started.
    pub elapsed_ms: u64,
}

/// `rollout.paused`: the rollout holds its step until it is promoted or the pause ends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutPaused {
    /// The rollout.
    pub rollout_id: RolloutId,
    /// The component.
    pub component: ComponentName,
    /// The step held.
    pub step: u32,
    /// The new version's share of traffic meanwhile.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
    /// When the rollout goes on by itself; none: only on `rollout.promote`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<DateTime<Utc>>,
}

/// `rollout.promoted`: a paused step was released, by an operator or by its timer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutPromoted {
    /// The rollout.
    pub rollout_id: RolloutId,
    /// The component.
    pub component: ComponentName,
    /// The step released.
    pub step: u32,
    /// The new version's share of traffic from now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u8>,
    /// Whether a timer promoted it (not a request).
    pub auto: bool,
}

/// `rollout.completed`: the new version serves everything and the old instances are gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutCompleted {
    /// The rollout.
    pub rollout_id: RolloutId,
    /// The component.
    pub component: ComponentName,
    /// The version now serving.
    pub to: Revision,
    /// Milliseconds from start to completion.
    pub elapsed_ms: u64,
}

/// `rollout.aborted`: the rollout stopped; the old version serves and the new instances are gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutAborted {
    /// The rollout.
    pub rollout_id: RolloutId,
    /// The component.
    pub component: ComponentName,
    /// Why: `requested`, or what failed (`start_failed: …`).
    pub reason: String,
    /// Milliseconds from start to the end of the abort.
    pub elapsed_ms: u64,
}

/// `rollout.rolled_back`: traffic went back to the old version because a condition failed or an
/// undo asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutRolledBack {
    /// The rollout.
    pub rollout_id: RolloutId,
    /// The component.
    pub component: ComponentName,
    /// The condition that failed (`error_rate<1%`), or `undo`.
    pub condition: String,
    /// What was measured (`error_rate=4.2%`), empty for an undo.
    pub measured: String,
    /// Milliseconds from start to the end of the rollback.
    pub elapsed_ms: u64,
}

/// `rollout.adopted`: the replica that drove a rollout is gone, and `replica` drives it from
/// the step the facts record. Published expecting the sequence of the previous adoption of the
/// rollout, so exactly one replica takes it over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutAdopted {
    /// The rollout.
    pub rollout_id: RolloutId,
    /// The component.
    pub component: ComponentName,
    /// The controller replica that drives it now.
    pub replica: String,
    /// The last step the facts recorded when it took over.
    pub step: u32,
}

/// What the facts say about one rollout.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutRecord {
    /// The rollout.
    pub rollout_id: RolloutId,
    /// The component.
    pub component: ComponentName,
    /// The versions it replaces.
    pub from: Vec<Revision>,
    /// The version it rolls out.
    pub to: Revision,
    /// How.
    pub plan: RolloutPlan,
    /// The old instances it replaces.
    pub replaces: Vec<InstanceId>,
    /// New instances it started.
    #[serde(default)]
    pub started: Vec<InstanceId>,
    /// Old instances it drained.
    #[serde(default)]
    pub stopped: Vec<InstanceId>,
    /// Where it is.
    pub status: RolloutStatus,
    /// The last step reached (0 before the first).
    pub step: u32,
    /// The new version's current share of traffic; none: no split.
    pub weight: Option<u8>,
    /// Why it ended, when it ended otherwise than completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When a pause ends by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused_until: Option<DateTime<Utc>>,
    /// The rollout this one undoes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub undo_of: Option<RolloutId>,
    /// When it started.
    pub started_at: DateTime<Utc>,
    /// Time of the fact that set the status.
    pub status_since: DateTime<Utc>,
    /// Stream sequence of the last fact applied to it.
    pub seq: u64,
    /// The replica driving it since an adoption (none: the one that started it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub driver: Option<String>,
    /// Stream sequence of its last `rollout.adopted` fact (0: never adopted): what the next
    /// adoption expects.
    #[serde(default)]
    pub adopted_seq: u64,
}

impl RolloutRecord {
    /// The traffic route it sets, while it sets one.
    pub fn route(&self) -> Option<Route> {
        if self.status.is_finished() {
            return None;
        }
        let weight = self.weight?;
        let mut from: Vec<String> = self
            .from
            .iter()
            .map(|r| r.digest.clone())
            .filter(|d| *d != self.to.digest)
            .collect();
        from.dedup();
        Some(Route {
            rollout_id: self.rollout_id.clone(),
            to: self.to.digest.clone(),
            from,
            weight: weight.min(100),
        })
    }
}

/// Applies a rollout fact (stream sequence `seq`, time `time`) to `rollouts`. Other facts and
/// facts about unknown rollouts change nothing. Returns whether anything changed.
pub fn apply_rollout(
    rollouts: &mut BTreeMap<RolloutId, RolloutRecord>,
    seq: u64,
    time: DateTime<Utc>,
    data: &FactData,
) -> bool {
    if let FactData::RolloutStarted(d) = data {
        if rollouts.get(&d.rollout_id).is_some_and(|r| r.seq >= seq) {
            return false;
        }
        rollouts.insert(
            d.rollout_id.clone(),
            RolloutRecord {
                rollout_id: d.rollout_id.clone(),
                component: d.component.clone(),
                from: d.from.clone(),
                to: d.to.clone(),
                plan: d.plan.clone(),
                replaces: d.replaces.clone(),
                started: Vec::new(),
                stopped: Vec::new(),
                status: RolloutStatus::Progressing,
                step: 0,
                weight: d.weight,
                reason: None,
                paused_until: None,
                undo_of: d.undo_of.clone(),
                started_at: time,
                status_since: time,
                seq,
                driver: None,
                adopted_seq: 0,
            },
        );
        return true;
    }
    let id = match data {
        FactData::RolloutStepReached(d) => &d.rollout_id,
        FactData::RolloutPaused(d) => &d.rollout_id,
        FactData::RolloutPromoted(d) => &d.rollout_id,
        FactData::RolloutCompleted(d) => &d.rollout_id,
        FactData::RolloutAborted(d) => &d.rollout_id,
        FactData::RolloutRolledBack(d) => &d.rollout_id,
        FactData::RolloutAdopted(d) => &d.rollout_id,
        _ => return false,
    };
    let Some(record) = rollouts.get_mut(id) else {
        return false;
    };
    if record.seq >= seq {
        return false;
    }
    record.seq = seq;
    let status_before = record.status;
    match data {
        FactData::RolloutStepReached(d) => {
            record.status = RolloutStatus::Progressing;
            record.step = d.step;
            record.weight = d.weight;
            record.paused_until = None;
            for i in &d.started {
                if !record.started.contains(i) {
                    record.started.push(i.clone());
                }
            }
            for i in &d.stopped {
                if !record.stopped.contains(i) {
                    record.stopped.push(i.clone());
                }
            }
        }
        FactData::RolloutPaused(d) => {
            record.status = RolloutStatus::Paused;
            record.step = d.step;
            record.weight = d.weight;
            record.paused_until = d.until;
        }
        FactData::RolloutPromoted(d) => {
            record.status = if record.plan.strategy == Strategy::BlueGreen {
                RolloutStatus::Promoted
            } else {
                RolloutStatus::Progressing
            };
            record.step = d.step;
            record.weight = d.weight;
            record.paused_until = None;
        }
        FactData::RolloutCompleted(_) => {
            record.status = RolloutStatus::Completed;
            record.weight = None;
        }
        FactData::RolloutAborted(d) => {
            record.status = RolloutStatus::Aborted;
            record.weight = None;
            record.reason = Some(d.reason.clone());
        }
        FactData::RolloutAdopted(d) => {
            record.driver = Some(d.replica.clone());
            record.adopted_seq = seq;
        }
        FactData::RolloutRolledBack(d) => {
            record.status = RolloutStatus::RolledBack;
            record.weight = None;
            record.reason = Some(if d.measured.is_empty() {
                d.condition.clone()
            } else {
                format!("{} ({})", d.condition, d.measured)
            });
        }
        _ => {}
    }
    if record.status != status_before {
        record.status_since = time;
    }
    true
}

/// Where a component's traffic goes while a rollout splits it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// The rollout that sets it.
    pub rollout_id: RolloutId,
    /// The new version's digest.
    pub to: String,
    /// The digests of the versions it replaces.
    pub from: Vec<String>,
    /// The new version's share, in percent.
    pub weight: u8,
}

impl Route {
    /// The digest a request goes to, given a uniform random number `roll` in `0..10_000`.
    pub fn pick(&self, roll: u32) -> &str {
        let roll = roll % 10_000;
        if roll < u32::from(self.weight) * 100 || self.from.is_empty() {
            return &self.to;
        }
        let index = (roll as usize) % self.from.len();
        &self.from[index]
    }
}

/// The routes of every rollout in progress, folded from rollout facts: what routers consult.
#[derive(Debug, Clone, Default)]
pub struct Routes {
    rollouts: BTreeMap<RolloutId, RolloutRecord>,
    by_component: BTreeMap<ComponentName, Route>,
    last_seq: u64,
}

impl Routes {
    /// No rollouts.
    pub fn new() -> Self {
        Self::default()
    }

    /// Applies a fact at stream sequence `seq`. Returns whether the routes changed.
    pub fn apply(&mut self, seq: u64, time: DateTime<Utc>, data: &FactData) -> bool {
        if seq <= self.last_seq {
            return false;
        }
        self.last_seq = seq;
        if !apply_rollout(&mut self.rollouts, seq, time, data) {
            return false;
        }
        // Finished rollouts route nothing and need not be kept.
        self.rollouts.retain(|_, r| !r.status.is_finished());
        let before = std::mem::take(&mut self.by_component);
        for record in self.rollouts.values() {
            if let Some(route) = record.route() {
                self.by_component.insert(record.component.clone(), route);
            }
        }
        before != self.by_component
    }

    /// Moves past stream sequence `seq` without applying anything (a fact that cannot be
    /// decoded).
    pub fn skip(&mut self, seq: u64) {
        self.last_seq = self.last_seq.max(seq);
    }

    /// The route of `component`, while a rollout splits its traffic.
    pub fn get(&self, component: &ComponentName) -> Option<&Route> {
        self.by_component.get(component)
    }

    /// The stream sequence of the last fact applied.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revision(n: u8) -> Revision {
        Revision {
            version: format!("0.{n}.0"),
            digest: format!("sha256:{}", format!("{n:x}").repeat(64)),
        }
    }

    fn started(weight: Option<u8>) -> FactData {
        FactData::RolloutStarted(RolloutStarted {
            rollout_id: RolloutId::new("r1").expect("id"),
            component: ComponentName::new("hello").expect("name"),
            from: vec![revision(1)],
            to: revision(2),
            plan: RolloutPlan::new(Strategy::Canary),
            replaces: vec![],
            weight,
            undo_of: None,
        })
    }

    #[test]
    fn analyses_parse_and_judge() {
        use crate::instance::InstanceStats;
        let conditions = parse_analysis("error_rate<1%, p99<200ms,crashes=0").expect("parses");
        assert_eq!(conditions.len(), 3);
        let mut stats = InstanceStats {
            calls: 1000,
            errors: 5,
            crashes: 0,
            latency: vec![0; 15],
        };
        stats.latency[4] = 1000; // all within 5 ms
        assert!(conditions.iter().all(|c| c.check(&stats).is_ok()));
        stats.errors = 20;
        assert_eq!(
            conditions[0].check(&stats),
            Err("error_rate=2.00% (20 of 1000)".into())
        );
        stats.latency[4] = 0;
        stats.latency[10] = 1000; // within 500 ms
        assert!(conditions[1].check(&stats).is_err());
        stats.crashes = 1;
        assert_eq!(conditions[2].check(&stats), Err("crashes=1".into()));
        for bad in ["", "latency<1", "p99<200", "error_rate<x%", "crashes"] {
            assert!(parse_analysis(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn canary_steps_must_increase_to_100() {
        let mut plan = RolloutPlan::new(Strategy::Canary);
        assert!(plan.validate().is_ok());
        for (steps, needle) in [
            (vec![50, 10, 100], "increase"),
            (vec![10, 101], "above 100"),
            (vec![10, 50], "last step"),
            (vec![], "needs steps"),
        ] {
            plan.steps = steps;
            let err = plan.validate().expect_err("rejected");
            assert!(err.contains(needle), "{err}");
        }
        let mut rolling = RolloutPlan::new(Strategy::Rolling);
        rolling.max_surge = 0;
        assert!(rolling.validate().is_err());
    }

    #[test]
    fn routes_follow_the_weights_and_vanish_when_the_rollout_ends() {
        let now = Utc::now();
        let name = ComponentName::new("hello").expect("name");
        let mut routes = Routes::new();
        assert!(routes.apply(1, now, &started(Some(0))));
        let route = routes.get(&name).expect("route").clone();
        assert_eq!(route.weight, 0);
        assert!((0..10_000).all(|r| route.pick(r) == revision(1).digest));
        let step = FactData::RolloutStepReached(RolloutStepReached {
            rollout_id: RolloutId::new("r1").expect("id"),
            component: name.clone(),
            step: 1,
            weight: Some(10),
            new_running: 1,
            old_running: 1,
            started: vec![],
            stopped: vec![],
            elapsed_ms: 5,
        });
        assert!(routes.apply(2, now, &step));
        assert!(
            !routes.apply(2, now, &step),
            "a re-delivery changes nothing"
        );
        let route = routes.get(&name).expect("route");
        let to_new = (0..10_000)
            .filter(|&r| route.pick(r) == revision(2).digest)
            .count();
        assert_eq!(to_new, 1000);
        let done = FactData::RolloutCompleted(RolloutCompleted {
            rollout_id: RolloutId::new("r1").expect("id"),
            component: name.clone(),
            to: revision(2),
            elapsed_ms: 9,
        });
        assert!(routes.apply(3, now, &done));
        assert!(routes.get(&name).is_none());
    }

    #[test]
    fn a_rolling_rollout_routes_nothing() {
        let mut routes = Routes::new();
        routes.apply(1, Utc::now(), &started(None));
        assert!(
            routes
                .get(&ComponentName::new("hello").expect("name"))
                .is_none()
        );
    }
}
