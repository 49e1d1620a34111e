//! `trellis rollout …`: start, follow, promote, abort and undo rollouts.

use std::time::Duration;

use clap::{Args, Subcommand};
use futures::StreamExt as _;
use trellis_schemas::control::{
    RolloutAbortRequest, RolloutGetRequest, RolloutListRequest, RolloutPromoteRequest,
    RolloutStartReply, RolloutStartRequest, RolloutUndoRequest,
};
use trellis_schemas::rollout::{RolloutRecord, RolloutStatus, Strategy};
use trellis_schemas::{ComponentName, Event, FactData, RolloutId, subject};

use crate::cli::{Failure, Global, Output, ago, failure, print_json};
use crate::client::CtlClient;
use crate::output::Table;

/// `trellis rollout …`
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Replace a component's running instances with another version.
    Start(StartArgs),
    /// Show one rollout.
    Status {
        /// The rollout id.
        rollout_id: RolloutId,
        /// Follow it until it ends, a line per step.
        #[arg(long)]
        wait: bool,
    },
    /// List rollouts, newest first.
    Ls {
        /// Only rollouts of this component.
        #[arg(long)]
        component: Option<ComponentName>,
    },
    /// Release the step a rollout holds (blue-green switch, next canary step).
    Promote {
        /// The rollout id.
        rollout_id: RolloutId,
        /// Follow it until it ends or pauses again.
        #[arg(long)]
        wait: bool,
    },
    /// Stop a rollout; its new instances drain and the old version serves.
    Abort {
        /// The rollout id.
        rollout_id: RolloutId,
        /// Follow it until it ends.
        #[arg(long)]
        wait: bool,
    },
    /// Go back to a component's previous version (rolls back the rollout in progress, or rolls
    /// out the version the last completed rollout replaced).
    Undo {
        /// The component.
        component: ComponentName,
        /// Follow it until it ends.
        #[arg(long)]
        wait: bool,
    },
}

/// Options of `trellis rollout start`.
#[derive(Debug, Args)]
pub struct StartArgs {
    /// The component.
    component: ComponentName,
    /// The version to roll out: a version of the component, or `sha256:…`.
    #[arg(long)]
    to: String,
    /// `rolling`, `blue-green` or `canary`.
    #[arg(long, default_value = "rolling")]
    strategy: Strategy,
    /// Rolling: new instances above the old count at any time.
    #[arg(long)]
    max_surge: Option<u32>,
    /// Rolling: instances missing below the old count at any time.
    #[arg(long)]
    max_unavailable: Option<u32>,
    /// Canary: traffic weights in percent, e.g. `10,50,100`.
    #[arg(long, value_delimiter = ',')]
    steps: Vec<u8>,
    /// Canary: hold each step this long (default: until `rollout promote`).
    #[arg(long, value_parser = humantime::parse_duration)]
    pause: Option<Duration>,
    /// Blue-green: switch by itself this long after the new set serves.
    #[arg(long, value_parser = humantime::parse_duration)]
    auto_promote_after: Option<Duration>,
    /// Blue-green: keep the old set this long after the switch.
    #[arg(long, value_parser = humantime::parse_duration)]
    keep_previous: Option<Duration>,
    /// Conditions the new version must keep while it takes traffic, e.g.
    /// `error_rate<1%,p99<200ms,crashes=0`; a breach rolls back at once.
    #[arg(long)]
    analysis: Option<String>,
    /// Follow the rollout until it ends (or pauses for a promotion), a line per step.
    #[arg(long)]
    wait: bool,
}

fn millis(d: Option<Duration>) -> Option<u64> {
    d.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub(crate) async fn rollout(
    g: &Global,
    client: &CtlClient,
    cmd: RolloutCommand,
) -> Result<(), Failure> {
    match cmd {
        RolloutCommand::Start(args) => {
            let facts = subscribe(client).await?;
            let request = RolloutStartRequest {
                component: args.component,
                to: args.to,
                strategy: args.strategy,
                max_surge: args.max_surge,
                max_unavailable: args.max_unavailable,
                steps: args.steps,
                pause_ms: millis(args.pause),
                auto_promote_after_ms: millis(args.auto_promote_after),
                keep_previous_ms: millis(args.keep_previous),
                analysis: args.analysis,
            };
            let reply = client.request(&request).await?;
            started(g, client, facts, reply, args.wait).await
        }
        RolloutCommand::Undo { component, wait } => {
            let facts = subscribe(client).await?;
            let reply = client.request(&RolloutUndoRequest { component }).await?;
            started(g, client, facts, reply, wait).await
        }
        RolloutCommand::Status { rollout_id, wait } => {
            let facts = subscribe(client).await?;
            let reply = client
                .request(&RolloutGetRequest {
                    rollout_id: rollout_id.clone(),
                    min_seq: None,
                })
                .await?;
            if wait && !reply.rollout.status.is_finished() {
                return follow(g, client, facts, &rollout_id, true).await;
            }
            if g.output == Output::Json {
                return print_json(&reply.rollout);
            }
            describe(&reply.rollout);
            Ok(())
        }
        RolloutCommand::Ls { component } => {
            let reply = client
                .request(&RolloutListRequest {
                    component,
                    min_seq: None,
                })
                .await?;
            if g.output == Output::Json {
                return print_json(&reply);
            }
            let mut table = Table::new(&[
                "ROLLOUT",
                "COMPONENT",
                "STRATEGY",
                "FROM",
                "TO",
                "STATUS",
                "STEP",
                "WEIGHT",
                "SINCE",
            ]);
            for r in &reply.rollouts {
                table.row(vec![
                    r.rollout_id.to_string(),
                    r.component.to_string(),
                    r.plan.strategy.to_string(),
                    r.from
                        .iter()
                        .map(|f| f.version.clone())
                        .collect::<Vec<_>>()
                        .join(","),
                    r.to.version.clone(),
                    r.status.as_str().to_owned(),
                    r.step.to_string(),
                    r.weight
                        .map(|w| format!("{w}%"))
                        .unwrap_or_else(|| "-".into()),
                    ago(r.status_since),
                ]);
            }
            print!("{}", table.render());
            if reply.rollouts.is_empty() {
                println!(
                    "no rollouts; start one with `trellis rollout start <component> --to <version>`"
                );
            }
            Ok(())
        }
        RolloutCommand::Promote { rollout_id, wait } => {
            let facts = subscribe(client).await?;
            let reply = client
                .request(&RolloutPromoteRequest {
                    rollout_id: rollout_id.clone(),
                })
                .await?;
            if wait {
                return follow(g, client, facts, &rollout_id, false).await;
            }
            if g.output == Output::Json {
                return print_json(&reply);
            }
            println!(
                "rollout {rollout_id} promoted; `trellis rollout status {rollout_id} --wait` follows it"
            );
            Ok(())
        }
        RolloutCommand::Abort { rollout_id, wait } => {
            let facts = subscribe(client).await?;
            let reply = client
                .request(&RolloutAbortRequest {
                    rollout_id: rollout_id.clone(),
                })
                .await?;
            if wait {
                return follow(g, client, facts, &rollout_id, true).await;
            }
            if g.output == Output::Json {
                return print_json(&reply);
            }
            println!(
                "rollout {rollout_id} aborting; `trellis rollout status {rollout_id} --wait` follows it"
            );
            Ok(())
        }
    }
}

async fn subscribe(client: &CtlClient) -> Result<async_nats::Subscriber, Failure> {
    client
        .nats()
        .subscribe(subject::rollout_events(client.lattice()))
        .await
        .map_err(|e| failure(4, e.to_string()))
}

async fn started(
    g: &Global,
    client: &CtlClient,
    facts: async_nats::Subscriber,
    reply: RolloutStartReply,
    wait: bool,
) -> Result<(), Failure> {
    if wait {
        if g.output != Output::Json {
            println!(
                "rollout {}: {} {} -> {}",
                reply.rollout_id,
                reply.plan.strategy,
                reply
                    .from
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                reply.to
            );
        }
        return follow(g, client, facts, &reply.rollout_id, false).await;
    }
    if g.output == Output::Json {
        return print_json(&reply);
    }
    println!(
        "rollout {} started: {} to {}; `trellis rollout status {} --wait` follows it",
        reply.rollout_id, reply.plan.strategy, reply.to, reply.rollout_id
    );
    Ok(())
}

/// Prints a line per fact of the rollout until it ends, or (unless `through_pauses`) until it
/// pauses for a promotion. Exit code 1 when it ended otherwise than completed.
async fn follow(
    g: &Global,
    client: &CtlClient,
    mut facts: async_nats::Subscriber,
    id: &RolloutId,
    through_pauses: bool,
) -> Result<(), Failure> {
    loop {
        let Some(message) = facts.next().await else {
            return Err(failure(4, "lost the NATS subscription"));
        };
        let Ok(event) = Event::decode(&message.payload) else {
            continue;
        };
        if event.data.entity_id() != id.as_str() {
            continue;
        }
        if g.output != Output::Json {
            println!("{:<12} {}", event.kind().verb(), event.summary());
        }
        // The fact itself says how the rollout ended: a controller replica asked next may not
        // have applied it yet, so the exit code never depends on its answer.
        let ended = match &event.data {
            FactData::RolloutCompleted(_) => Some(RolloutStatus::Completed),
            FactData::RolloutAborted(_) => Some(RolloutStatus::Aborted),
            FactData::RolloutRolledBack(_) => Some(RolloutStatus::RolledBack),
            FactData::RolloutPaused(p) if !through_pauses && p.until.is_none() => {
                Some(RolloutStatus::Paused)
            }
            _ => None,
        };
        if let Some(status) = ended {
            return finish(g, client, id, status).await;
        }
    }
}

/// Reports a rollout that reached `status`: the record (once the controller answering has
/// applied the fact that said so, within a few seconds) and exit code 1 unless it went forward.
async fn finish(
    g: &Global,
    client: &CtlClient,
    id: &RolloutId,
    status: RolloutStatus,
) -> Result<(), Failure> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let record = loop {
        let reply = client
            .request(&RolloutGetRequest {
                rollout_id: id.clone(),
                min_seq: None,
            })
            .await?;
        if reply.rollout.status == status || tokio::time::Instant::now() >= deadline {
            break reply.rollout;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    if g.output == Output::Json {
        print_json(&record)?;
    } else if status == RolloutStatus::Paused {
        println!(
            "paused at step {}; `trellis rollout promote {id}` goes on, `trellis rollout abort {id}` goes back",
            record.step
        );
    }
    match status {
        RolloutStatus::Aborted | RolloutStatus::RolledBack => Err(failure(
            1,
            format!(
                "rollout {id} {}: {}",
                status.as_str(),
                record.reason.unwrap_or_default()
            ),
        )),
        _ => Ok(()),
    }
}

fn describe(r: &RolloutRecord) {
    println!("rollout   {}", r.rollout_id);
    println!("component {}", r.component);
    println!("strategy  {}", r.plan.strategy);
    println!(
        "from      {}",
        r.from
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!("to        {}", r.to);
    println!("status    {} ({})", r.status.as_str(), ago(r.status_since));
    println!(
        "step      {}{}",
        r.step,
        r.weight
            .map(|w| format!(", {w}% of traffic to the new version"))
            .unwrap_or_default()
    );
    println!(
        "started   {} new, {} old drained",
        r.started.len(),
        r.stopped.len()
    );
    if let Some(reason) = &r.reason {
        println!("reason    {reason}");
    }
    if let Some(until) = r.paused_until {
        println!("until     {until}");
    }
}
