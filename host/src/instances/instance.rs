//! One instance's life on this host: start, serve, crash, restart, stop.
//!
//! Each instance has a supervisor task that owns its subscriptions and is the only writer of its
//! facts, so they are published in the order things happened. Calls run in tasks of their own;
//! the first one that crashes tells the supervisor, which ends the serving period (later calls
//! are refused with `not_running`), publishes `instance.crashed` and applies the restart policy.
//! However many calls crash at once, a period ends once and leads to one restart.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use tokio::sync::mpsc;
use trellis_bus::dataplane::{self as codec, SendError};
use trellis_schemas::DataError;
use trellis_schemas::dataplane::{self, ErrorCode};
use trellis_schemas::fact::{
    InstanceCrashed, InstanceGaveUp, InstanceRestarting, InstanceStarted, InstanceStopped,
};
use trellis_schemas::{ComponentName, Event, FactData, InstanceId, RestartPolicy};

use super::call::{Crash, Serving};
use super::manager::{Context, Slot};
use crate::microvm::MicroVm;
use crate::runtime::LoadedComponent;
use trellis_schemas::isolation::Isolation;

/// Where an instance is in its life, as heartbeats report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum State {
    Starting = 0,
    Running = 1,
    Restarting = 2,
    Stopping = 3,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Running => "running",
            State::Restarting => "restarting",
            State::Stopping => "stopping",
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => State::Starting,
            1 => State::Running,
            2 => State::Restarting,
            _ => State::Stopping,
        }
    }
}

/// The state cell shared by the supervisor and the inventory.
#[derive(Debug, Default)]
pub(crate) struct StateCell(AtomicU8);

impl StateCell {
    pub fn get(&self) -> State {
        State::from_u8(self.0.load(Ordering::Relaxed))
    }

    pub fn set(&self, state: State) {
        self.0.store(state as u8, Ordering::Relaxed);
    }
}

/// A request to stop an instance.
#[derive(Debug)]
pub(crate) struct Stop {
    /// `requested`, `host draining`.
    pub reason: String,
    /// The stop command's operation, if any.
    pub operation_id: Option<String>,
}

/// How a serving period ended.
enum Ended {
    Crash(Crash),
    Stop(Stop),
    /// The NATS client closed the subscriptions (the client is shutting down).
    Closed,
}

/// What a running instance is.
pub(crate) struct Spec {
    pub id: InstanceId,
    pub name: ComponentName,
    pub version: String,
    pub digest: String,
    pub restart: RestartPolicy,
    pub operation_id: String,
    /// Its counters, over every serving period.
    pub stats: Arc<super::stats::Stats>,
    /// Its log lines, over every serving period.
    pub log: Arc<super::logs::InstanceLog>,
    /// The start command's trace context, for the fact of its first start.
    pub traceparent: Option<String>,
}

/// Serves `component` as instance `spec.id` until it is stopped or ends by its restart policy.
/// Publishes `instance.started` for attempt 0 first.
pub(crate) async fn supervise(
    ctx: Arc<Context>,
    spec: Spec,
    component: LoadedComponent,
    mut microvm: Option<MicroVm>,
    state: Arc<StateCell>,
    mut stop: mpsc::Receiver<Stop>,
    slot: Slot,
) {
    // Taken (freeing the place) just before the fact that ends the instance.
    let mut slot = Some(slot);
    let mut attempt: u32 = 0;
    let timeout = component.manifest().limits.timeout;
    spec.stats.bind(&component);
    let (isolation, acceleration) = match &microvm {
        Some(vm) => (Isolation::Microvm, Some(vm.acceleration())),
        None => (Isolation::Process, None),
    };
    loop {
        // A micro-VM instance serves with its VM, booted again if it died.
        let vm = match &mut microvm {
            Some(microvm) => Some(microvm.ready().await),
            None => None,
        };
        let (serving, crashed) = Serving::new(
            ctx.client.clone(),
            component.clone(),
            vm,
            ctx.lattice.clone(),
            spec.id.as_str(),
            Arc::clone(&spec.stats),
            Arc::clone(&spec.log),
        );
        let serving = Arc::new(serving);
        serving.watch_vm();
        let subscribed = async {
            let by_component = ctx
                .client
                .queue_subscribe(
                    dataplane::component_all(&ctx.lattice, &spec.name),
                    dataplane::component_queue(&spec.name),
                )
                .await?;
            let by_version = ctx
                .client
                .queue_subscribe(
                    dataplane::version_all(&ctx.lattice, &spec.name, &spec.digest),
                    dataplane::version_queue(&spec.name, &spec.digest),
                )
                .await?;
            let by_instance = ctx
                .client
                .subscribe(dataplane::instance_all(&ctx.lattice, &spec.id))
                .await?;
            Ok::<_, async_nats::SubscribeError>([by_component, by_version, by_instance])
        }
        .await;
        let mut subscriptions = match subscribed {
            Ok(subs) => subs,
            Err(e) => {
                // Only a closed client refuses a subscription: the host is going away.
                tracing::error!(instance = %spec.id, error = %e, "cannot subscribe; instance ends");
                return;
            }
        };
        state.set(State::Running);
        ctx.local.add(&spec.name, &spec.digest, &spec.id, &serving);
        ctx.publish(
            Event::new(
                ctx.source.clone(),
                FactData::InstanceStarted(InstanceStarted {
                    instance_id: spec.id.clone(),
                    host_id: ctx.host_id.clone(),
                    component: spec.name.clone(),
                    version: spec.version.clone(),
                    digest: spec.digest.clone(),
                    restart: spec.restart,
                    attempt,
                    isolation,
                    acceleration,
                }),
            )
            .caused_by(spec.operation_id.clone())
            .traced(if attempt == 0 {
                spec.traceparent.clone()
            } else {
                None
            }),
        );
        tracing::info!(instance = %spec.id, component = %spec.name, attempt, "instance serving");

        let mut crashed = crashed;
        let ended = {
            let [by_component, by_version, by_instance] = &mut subscriptions;
            loop {
                tokio::select! {
                    biased;
                    crash = &mut crashed => match crash {
                        Ok(crash) => break Ended::Crash(crash),
                        Err(_) => break Ended::Closed,
                    },
                    request = stop.recv() => break Ended::Stop(request.unwrap_or(Stop {
                        reason: "host draining".to_owned(),
                        operation_id: None,
                    })),
                    message = by_component.next() => match message {
                        Some(message) => route_call(&ctx, &spec, &serving, message),
                        None => break Ended::Closed,
                    },
                    message = by_version.next() => match message {
                        Some(message) => spawn_call(&serving, message),
                        None => break Ended::Closed,
                    },
                    message = by_instance.next() => match message {
                        Some(message) => spawn_call(&serving, message),
                        None => break Ended::Closed,
                    },
                }
            }
        };

        // No new calls of this period. A stop drains gracefully: the subscriptions are
        // drained first while the instance still serves, so that what the server had already
        // routed here is answered, then the period ends. A crash ends the period at once, and
        // what is still delivered is refused (`not_running`, the caller retries elsewhere).
        // Drained, not just unsubscribed, so that nothing delivered is dropped, which would
        // leave its caller waiting for a reply that never comes. Bounded, for a NATS that is
        // away.
        ctx.local.remove(&spec.name, &spec.id);
        let graceful = matches!(ended, Ended::Stop(_));
        if !graceful {
            serving.end();
        }
        for subscription in &mut subscriptions {
            let _ = subscription.drain().await;
        }
        let leftovers = async {
            for subscription in &mut subscriptions {
                while let Some(message) = subscription.next().await {
                    if graceful {
                        spawn_call(&serving, message);
                    } else {
                        refuse(&serving, message);
                    }
                }
            }
        };
        if tokio::time::timeout(DRAIN_BOUND, leftovers).await.is_err() {
            tracing::debug!(instance = %spec.id, "the subscriptions did not drain in time");
        }
        // A graceful stop ends the period only once what it took is answered (`finish_stop`):
        // a call delivered before the drain and not yet begun must not be refused.

        let crash = match ended {
            Ended::Closed => return,
            Ended::Stop(request) => {
                state.set(State::Stopping);
                finish_stop(&ctx, &spec, &serving, timeout, request, slot.take()).await;
                return;
            }
            Ended::Crash(crash) => crash,
        };

        let next = attempt.saturating_add(1);
        let delay = spec.restart.delay(next);
        tracing::warn!(instance = %spec.id, reason = %crash.reason, export = %crash.export, will_restart = delay.is_some(), "instance crashed");
        if delay.is_none() {
            // This crash ends the instance.
            drop(slot.take());
        }
        ctx.publish(
            Event::new(
                ctx.source.clone(),
                FactData::InstanceCrashed(InstanceCrashed {
                    instance_id: spec.id.clone(),
                    host_id: ctx.host_id.clone(),
                    reason: crash.reason.clone(),
                    detail: crash.detail,
                    export: crash.export,
                    will_restart: delay.is_some(),
                }),
            )
            .caused_by(spec.operation_id.clone()),
        );
        let Some(delay) = delay else {
            if matches!(spec.restart, RestartPolicy::Backoff { .. }) {
                ctx.publish(
                    Event::new(
                        ctx.source.clone(),
                        FactData::InstanceGaveUp(InstanceGaveUp {
                            instance_id: spec.id.clone(),
                            host_id: ctx.host_id.clone(),
                            attempts: attempt,
                            last_reason: crash.reason,
                        }),
                    )
                    .caused_by(spec.operation_id.clone()),
                );
            }
            return;
        };
        state.set(State::Restarting);
        ctx.publish(
            Event::new(
                ctx.source.clone(),
                FactData::InstanceRestarting(InstanceRestarting {
                    instance_id: spec.id.clone(),
                    host_id: ctx.host_id.clone(),
                    attempt: next,
                    delay_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                }),
            )
            .caused_by(spec.operation_id.clone()),
        );
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            request = stop.recv() => {
                let request = request.unwrap_or(Stop {
                    reason: "host draining".to_owned(),
                    operation_id: None,
                });
                state.set(State::Stopping);
                finish_stop(&ctx, &spec, &serving, timeout, request, slot.take()).await;
                return;
            }
        }
        attempt = next;
        spec.stats.restarted();
    }
}

/// Serves a message that came on the component subject, or, when a rollout's weights send it
/// to another version, forwards it to that version's subject (serving it here after all when
/// nothing serves that version).
fn route_call(
    ctx: &Arc<Context>,
    spec: &Spec,
    serving: &Arc<Serving>,
    message: async_nats::Message,
) {
    let Ok(op) = dataplane::parse_op(&ctx.lattice, message.subject.as_str()) else {
        return spawn_call(serving, message);
    };
    let Some((digest, subject)) = ctx.routes.version(&ctx.lattice, &spec.name, op) else {
        return spawn_call(serving, message);
    };
    if digest == spec.digest {
        return spawn_call(serving, message);
    }
    serving.enter();
    let serving = Arc::clone(serving);
    let client = ctx.client.clone();
    tokio::spawn(async move {
        let Some(reply) = message.reply.clone() else {
            // Nobody waits for an answer: deliver it there and be done.
            serving.leave();
            let _ = client
                .publish_with_headers(
                    subject,
                    message.headers.clone().unwrap_or_default(),
                    message.payload.clone(),
                )
                .await;
            return;
        };
        let forwarded = codec::request(
            &client,
            subject,
            message.headers.clone().unwrap_or_default(),
            message.payload.clone(),
            FORWARD_TIMEOUT,
        )
        .await;
        match forwarded {
            Ok(answer) => {
                serving.leave();
                let _ = client
                    .publish_with_headers(reply, answer.headers.unwrap_or_default(), answer.payload)
                    .await;
            }
            // That version has no instance (any more): serve it here.
            Err(SendError::NoResponders) => serving.handle(message).await,
            Err(e) => {
                serving.leave();
                tracing::warn!(error = %e, "a request forwarded to another version failed");
                let error = match e {
                    SendError::TimedOut(t) => DataError::new(
                        ErrorCode::Timeout,
                        format!("the version chosen did not answer within {t:?}"),
                    ),
                    other => DataError::unavailable(format!("cannot forward the request: {other}")),
                };
                codec::reply_error(&client, Some(reply), &error, None).await;
            }
        }
    });
}

/// How long a request forwarded to another version may take: longer than any invocation.
const FORWARD_TIMEOUT: Duration = Duration::from_secs(30);

fn spawn_call(serving: &Arc<Serving>, message: async_nats::Message) {
    serving.enter();
    let serving = Arc::clone(serving);
    tokio::spawn(async move { serving.handle(message).await });
}

/// How long the end of a serving period waits for its subscriptions to drain.
const DRAIN_BOUND: Duration = Duration::from_secs(2);

fn refuse(serving: &Arc<Serving>, message: async_nats::Message) {
    let serving = Arc::clone(serving);
    tokio::spawn(async move { serving.refuse(message).await });
}

/// Waits (bounded by the invocation timeout plus a margin) for calls in flight, then publishes
/// `instance.stopped`.
async fn finish_stop(
    ctx: &Context,
    spec: &Spec,
    serving: &Serving,
    timeout: Duration,
    request: Stop,
    slot: Option<Slot>,
) {
    let bound = timeout + Duration::from_millis(500);
    if tokio::time::timeout(bound, serving.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!(instance = %spec.id, ?bound, "calls still running when the instance stopped");
    }
    serving.end();
    drop(slot);
    let mut event = Event::new(
        ctx.source.clone(),
        FactData::InstanceStopped(InstanceStopped {
            instance_id: spec.id.clone(),
            host_id: ctx.host_id.clone(),
            reason: request.reason,
        }),
    );
    event = event.caused_by(
        request
            .operation_id
            .unwrap_or_else(|| spec.operation_id.clone()),
    );
    ctx.publish(event);
    tracing::info!(instance = %spec.id, "instance stopped");
}
