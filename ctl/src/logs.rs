//! `trellis logs`: the output of a component's instances (stdout, stderr, `wasi:logging`).
//!
//! The recent lines come from the hosts through the controller (`instance.logs`); with
//! `--follow`, new lines come straight from the log subjects the hosts publish on. The
//! subscription starts before the recent lines are asked for, and a line already shown (same
//! instance, same number) is not shown twice.

use std::collections::HashMap;
use std::time::Duration;

use clap::Args;
use futures::StreamExt as _;
use trellis_schemas::InstanceId;
use trellis_schemas::control::InstanceLogsRequest;
use trellis_schemas::logs::{LogRecord, LogSource, all_instance_logs};

use crate::cli::{Failure, Global, Output, failure};
use crate::client::CtlClient;

/// Arguments of `trellis logs`.
#[derive(Debug, Args)]
pub struct LogsArgs {
    /// An instance id, or a component name (the lines of all its instances).
    target: String,
    /// Keep printing new lines as they are written, until interrupted.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Only lines written in this last period (`30s`, `10m`, `2h`).
    #[arg(long, value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// How many recent lines to show first (hosts keep the last 1000 of each instance).
    #[arg(long, default_value_t = 200)]
    tail: u32,
}

/// Runs `trellis logs`.
pub(crate) async fn logs(g: &Global, client: &CtlClient, args: LogsArgs) -> Result<(), Failure> {
    let since = args.since.map(|d| {
        chrono::Utc::now() - chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
    });
    // Subscribe first, so that no line falls between the recent ones and the live ones.
    let mut live = if args.follow {
        Some(
            client
                .nats()
                .subscribe(all_instance_logs(&g.lattice))
                .await
                .map_err(|e| failure(4, format!("cannot subscribe to the log subjects: {e}")))?,
        )
    } else {
        None
    };
    // With --tail 0 the controller still resolves the target; its one line is not shown.
    let reply = request(client, &args.target, since, args.tail.max(1)).await?;
    let recent = if args.tail == 0 {
        &[][..]
    } else {
        &reply.records[..]
    };
    if reply.truncated && args.tail > 0 && !args.follow {
        eprintln!(
            "(older lines left out; --tail {} shows at most that many)",
            args.tail
        );
    }
    for host in &reply.unreachable {
        eprintln!("(host {host} did not answer: its instances' lines are missing)");
    }
    let (component, instances) = (&reply.component, &reply.instances);
    let only: Option<InstanceId> = InstanceId::new(&args.target)
        .ok()
        .filter(|id| instances.as_slice() == std::slice::from_ref(id) && *component != args.target);
    let mut shown: HashMap<InstanceId, u64> = HashMap::new();
    for record in recent {
        print(g.output, record);
        shown.insert(record.instance_id.clone(), record.seq);
    }
    if recent.is_empty() && !args.follow && g.output == Output::Table {
        eprintln!(
            "(no lines kept for {}; hosts keep the last lines of running instances and of the last ones that ended)",
            args.target
        );
    }
    let Some(live) = live.as_mut() else {
        return Ok(());
    };
    let shutdown = trellis_bus::shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let message = tokio::select! {
            _ = &mut shutdown => return Ok(()),
            message = live.next() => message,
        };
        let Some(message) = message else {
            return Err(failure(4, "the connection to NATS closed"));
        };
        let Ok(record) = serde_json::from_slice::<LogRecord>(&message.payload) else {
            continue;
        };
        let wanted = match &only {
            Some(id) => &record.instance_id == id,
            None => record.component == *component,
        };
        if !wanted {
            continue;
        }
        // An instance's lines are numbered by its host from 1, across its restarts.
        let last = shown.entry(record.instance_id.clone()).or_insert(0);
        if record.seq <= *last {
            continue;
        }
        *last = record.seq;
        print(g.output, &record);
    }
}

async fn request(
    client: &CtlClient,
    target: &str,
    since: Option<chrono::DateTime<chrono::Utc>>,
    limit: u32,
) -> Result<trellis_schemas::control::InstanceLogsGathered, Failure> {
    Ok(client
        .request(&InstanceLogsRequest {
            target: target.to_owned(),
            since,
            limit: Some(limit),
            min_seq: None,
        })
        .await?)
}

fn print(output: Output, record: &LogRecord) {
    if output == Output::Json {
        if let Ok(line) = serde_json::to_string(record) {
            println!("{line}");
        }
        return;
    }
    println!("{}", line(record));
}

/// A record as one line for people: time, component, the instance's last characters, the
/// invocation, where the line came from, and the line.
fn line(record: &LogRecord) -> String {
    let id = record.instance_id.as_str();
    let short = &id[id.len().saturating_sub(8)..];
    let source = match (&record.source, &record.level) {
        (LogSource::Log, Some(level)) => format!("{level:<8}"),
        (source, _) => format!("{:<8}", source.as_str()),
    };
    let invocation = record
        .invocation
        .map(|n| format!("#{n}"))
        .unwrap_or_default();
    let context = record
        .context
        .as_deref()
        .map(|c| format!("{c}: "))
        .unwrap_or_default();
    let trace = record
        .trace_id
        .as_deref()
        .map(|t| format!("  [trace {}]", &t[..t.len().min(8)]))
        .unwrap_or_default();
    format!(
        "{} {}/{short} {invocation:<5} {source} {context}{}{trace}",
        record
            .time
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        record.component,
        record.message,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use trellis_schemas::HostId;

    #[test]
    fn a_line_for_people_names_instance_invocation_and_source() {
        let record = LogRecord {
            time: "2026-12-04T20:00:00.123Z".parse().unwrap(),
            seq: 3,
            instance_id: InstanceId::new("01JABCDEFGHJKMNPQRSTVWXYZ0").unwrap(),
            component: "kv-counter".into(),
            version: "0.1.0".into(),
            host_id: HostId::new("h1").unwrap(),
            invocation: Some(17),
            trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736".into()),
            source: LogSource::Log,
            level: Some("warn".into()),
            context: Some("store".into()),
            dropped: None,
            message: "slow".into(),
        };
        assert_eq!(
            line(&record),
            "2026-12-04T20:00:00.123Z kv-counter/STVWXYZ0 #17   warn     store: slow  [trace 4bf92f35]"
        );
    }
}
