//! Component logs: what guests write to stdout and stderr and through `wasi:logging`, one
//! [`LogRecord`] per line.
//!
//! A host publishes each line of an instance on core NATS, on
//! `trellis.log.v1.<lattice>.instance.<instance_id>` ([`instance_logs`]); nothing is persisted
//! in a stream. Each host also keeps the most recent lines of each instance it runs, which
//! [`InstanceLogsCommand`] reads (the controller's `instance.logs` gathers them from every host
//! of a component). A host forwards at most a bounded rate of lines per instance; the lines
//! beyond it are dropped, counted, and reported by a [`LogSource::Dropped`] record.

use std::fmt;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::dataplane::HostVerb;
use crate::instance::HostCommand;
use crate::names::{HostId, InstanceId, Lattice};

/// The subject the lines of one instance are published on.
pub fn instance_logs(lattice: &Lattice, instance: &InstanceId) -> String {
    format!("trellis.log.v1.{lattice}.instance.{instance}")
}

/// Every log subject of the lattice (what `trellis logs --follow <component>` subscribes to).
pub fn all_instance_logs(lattice: &Lattice) -> String {
    format!("trellis.log.v1.{lattice}.instance.*")
}

/// Where a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogSource {
    /// The guest's standard output.
    Stdout,
    /// The guest's standard error.
    Stderr,
    /// `wasi:logging` (with [`LogRecord::level`] and [`LogRecord::context`]).
    Log,
    /// Not a line of the guest: the host dropped [`LogRecord::dropped`] lines over the rate.
    Dropped,
}

impl LogSource {
    /// The name as in JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            LogSource::Stdout => "stdout",
            LogSource::Stderr => "stderr",
            LogSource::Log => "log",
            LogSource::Dropped => "dropped",
        }
    }
}

impl fmt::Display for LogSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One line of a component instance's output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LogRecord {
    /// When the host received the line.
    pub time: DateTime<Utc>,
    /// The instance's line number on its host, from 1; it grows by one per record published
    /// (a gap means records were lost in transit, not dropped by the rate limit, which says so).
    pub seq: u64,
    /// The instance.
    pub instance_id: InstanceId,
    /// Its component.
    pub component: String,
    /// The component's version.
    pub version: String,
    /// The host running it.
    pub host_id: HostId,
    /// The invocation that wrote the line: the instance's invocation number, from 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub invocation: Option<u64>,
    /// The W3C trace id of the invocation, when its request carried a `traceparent`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
    /// Where the line came from.
    pub source: LogSource,
    /// `wasi:logging` lines: the level (`trace` … `critical`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<String>,
    /// `wasi:logging` lines: the context the guest gave, when not empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context: Option<String>,
    /// [`LogSource::Dropped`]: how many lines were dropped since the previous record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dropped: Option<u64>,
    /// The line, without its line break (lossy UTF-8; a longer line than
    /// [`MAX_LINE_BYTES`] is split).
    pub message: String,
}

/// The longest line a record carries, in bytes; longer lines are split into several records.
pub const MAX_LINE_BYTES: usize = 4096;

/// Command to a host: the recent lines of some of its instances
/// (`trellis.host.v1.<lattice>.<host>.instance.logs`); the reply is [`InstanceLogsReply`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceLogsCommand {
    /// The instances; those the host does not run are left out of the reply.
    pub instance_ids: Vec<InstanceId>,
    /// Only lines received at or after this time.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<DateTime<Utc>>,
    /// At most this many lines, the most recent ones.
    pub limit: u32,
}

/// A host's answer to [`InstanceLogsCommand`], and the controller's to `instance.logs`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceLogsReply {
    /// The lines, oldest first.
    pub records: Vec<LogRecord>,
    /// Whether older lines that matched were left out (by the limit or the reply's size).
    pub truncated: bool,
}

impl HostCommand for InstanceLogsCommand {
    const VERB: HostVerb = HostVerb::InstanceLogs;
}

/// The most lines one `instance.logs` request may ask for.
pub const MAX_LOG_LIMIT: u32 = 10_000;

/// The most bytes of records a reply carries (well under NATS's default 1 MiB payload).
pub const MAX_LOG_REPLY_BYTES: usize = 512 * 1024;

/// Keeps the newest of `records` (sorted oldest first) that fit both `limit` and
/// [`MAX_LOG_REPLY_BYTES`] of JSON; returns whether any were left out.
pub fn keep_newest(records: &mut Vec<LogRecord>, limit: u32) -> bool {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let mut bytes = 0usize;
    let mut keep = 0usize;
    for record in records.iter().rev() {
        // Measured, not estimated: escaping can make a message's JSON six times its length.
        let size = serde_json::to_vec(record).map_or(usize::MAX, |json| json.len() + 1);
        if keep == limit || bytes.saturating_add(size) > MAX_LOG_REPLY_BYTES {
            break;
        }
        bytes += size;
        keep += 1;
    }
    let cut = records.len() - keep;
    records.drain(..cut);
    cut > 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(seq: u64, message: &str) -> LogRecord {
        LogRecord {
            time: Utc::now(),
            seq,
            instance_id: InstanceId::new("i1").unwrap(),
            component: "c".into(),
            version: "1.0.0".into(),
            host_id: HostId::new("h1").unwrap(),
            invocation: Some(1),
            trace_id: None,
            source: LogSource::Stdout,
            level: None,
            context: None,
            dropped: None,
            message: message.into(),
        }
    }

    fn assert_fits(records: &[LogRecord]) {
        let bytes: usize = records
            .iter()
            .map(|r| serde_json::to_vec(r).unwrap().len())
            .sum();
        assert!(bytes <= MAX_LOG_REPLY_BYTES, "{bytes} bytes");
    }

    #[test]
    fn keeps_the_newest_within_the_limit_and_the_size() {
        let mut records: Vec<_> = (1..=10).map(|i| record(i, "hello")).collect();
        assert!(keep_newest(&mut records, 3));
        assert_eq!(
            records.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![8, 9, 10]
        );
        assert!(!keep_newest(&mut records, 3), "nothing more to cut");

        let big = "x".repeat(MAX_LINE_BYTES);
        let mut records: Vec<_> = (1..=1000).map(|i| record(i, &big)).collect();
        assert!(keep_newest(&mut records, MAX_LOG_LIMIT));
        assert_fits(&records);
        assert_eq!(records.last().unwrap().seq, 1000);

        // Control characters take six bytes each in JSON: the bound still holds.
        let escaped = "\u{1}".repeat(MAX_LINE_BYTES);
        let mut records: Vec<_> = (1..=100).map(|i| record(i, &escaped)).collect();
        assert!(keep_newest(&mut records, MAX_LOG_LIMIT));
        assert_fits(&records);
        assert!(records.len() < 25, "{} records", records.len());
    }

    #[test]
    fn subjects() {
        let lattice = Lattice::new("prod").unwrap();
        let id = InstanceId::new("01J").unwrap();
        assert_eq!(
            instance_logs(&lattice, &id),
            "trellis.log.v1.prod.instance.01J"
        );
        assert_eq!(
            all_instance_logs(&lattice),
            "trellis.log.v1.prod.instance.*"
        );
    }
}
