//! `trellis audit`: reads the lattice's audit stream.

use clap::Args;
use trellis_schemas::audit::{self, AuditEvent, AuditType};

use crate::cli::{Failure, Global, Output, read_stream};

/// `trellis audit [--follow] [--type T] [--from-seq N]`.
#[derive(Debug, Args)]
pub(crate) struct AuditArgs {
    /// Keep printing new events as they are recorded.
    #[arg(long, short = 'f')]
    follow: bool,
    /// Only events of this type: control, grant, revoke or denied.
    #[arg(long = "type", value_parser = parse_type)]
    kind: Option<AuditType>,
    /// Start at this stream sequence instead of the oldest event kept.
    #[arg(long)]
    from_seq: Option<u64>,
}

fn parse_type(s: &str) -> Result<AuditType, String> {
    AuditType::parse(s).ok_or_else(|| {
        let known: Vec<&str> = AuditType::ALL.iter().map(|t| t.as_str()).collect();
        format!("unknown audit type {s:?}; one of {}", known.join(", "))
    })
}

/// Prints the audit events, one per line (`-o json`: `{"seq":…,"event":…}` per line).
pub(crate) async fn audit(g: &Global, args: AuditArgs) -> Result<(), Failure> {
    let filter = args.kind.map(|kind| audit::subject(&g.lattice, kind));
    let mut header = g.output == Output::Table;
    read_stream(
        g,
        &audit::stream(&g.lattice),
        filter,
        args.follow,
        args.from_seq,
        |seq, payload| {
            print_event(g.output, seq, payload, &mut header);
            Ok(())
        },
    )
    .await
}

/// The width of the OUTCOME column: the longest outcome, `nats_permission_violation`.
const OUTCOME_WIDTH: usize = 25;

fn print_event(output: Output, seq: u64, payload: &[u8], header: &mut bool) {
    if output == Output::Json {
        let event: serde_json::Value = serde_json::from_slice(payload)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(payload).into()));
        println!("{}", serde_json::json!({ "seq": seq, "event": event }));
        return;
    }
    if std::mem::take(header) {
        println!(
            "{:<8} {:<24} {:<8} {:<OUTCOME_WIDTH$} {:<24} DETAILS",
            "SEQ", "TIME", "TYPE", "OUTCOME", "WHO"
        );
    }
    match serde_json::from_slice::<AuditEvent>(payload) {
        Ok(event) => println!(
            "{:<8} {:<24} {:<8} {:<OUTCOME_WIDTH$} {:<24} {}",
            seq,
            event
                .time
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            event.kind.as_str(),
            event.outcome,
            who(&event),
            details(&event)
        ),
        Err(e) => println!("{seq:<8} (undecodable audit event: {e})"),
    }
}

/// The caller (`operator (operator)`, with `?` when its signature did not verify), else the
/// process that recorded the event.
fn who(event: &AuditEvent) -> String {
    match &event.caller {
        Some(c) if c.user == c.role => format!("{}{}", c.user, if c.verified { "" } else { "?" }),
        Some(c) => format!(
            "{} ({}){}",
            c.user,
            c.role,
            if c.verified { "" } else { "?" }
        ),
        None => event.source.clone(),
    }
}

fn details(event: &AuditEvent) -> String {
    let parts: Vec<String> = [
        event.operation.clone(),
        event.target.clone(),
        event.capability.clone(),
        event.provider.as_ref().map(|p| format!("via {p}")),
        event.reason.clone(),
    ]
    .into_iter()
    .flatten()
    .collect();
    parts.join(" ")
}
