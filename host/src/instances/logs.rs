//! Component logs: each line an instance writes (stdout, stderr, `wasi:logging`) becomes a
//! [`LogRecord`], published on core NATS (`trellis.log.v1.<lattice>.instance.<id>`) and kept in
//! a small per-instance ring that `instance.logs` reads.
//!
//! A guest that prints in a loop must not flood NATS or the host: each instance has a token
//! bucket of `rate` lines per second (a burst of one second's worth). Lines beyond it are
//! dropped and counted; the next record published says how many with a
//! [`LogSource::Dropped`] record, and so does the end of the invocation. Publishing goes
//! through one bounded queue per host, drained by one task: a record that finds it full is
//! lost (its `seq` leaves a gap) rather than blocking the guest.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use chrono::Utc;
use tokio::sync::mpsc;
use trellis_schemas::logs::{
    InstanceLogsCommand, InstanceLogsReply, LogRecord, LogSource, MAX_LINE_BYTES, instance_logs,
    keep_newest,
};
use trellis_schemas::{HostId, InstanceId, Lattice};

use super::stats::Stats;
use crate::runtime::{LineSource, LogSink, cut};

/// How a host treats its instances' log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogConfig {
    /// Lines per second each instance may publish (a burst of one second's worth); 0 turns
    /// streaming off (lines are still captured for crash reports).
    pub rate: u32,
    /// Lines kept per instance for `instance.logs` (also bounded by [`KEEP_BYTES`]).
    pub keep: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            rate: 200,
            keep: 1000,
        }
    }
}

/// The most bytes of messages kept per instance.
pub const KEEP_BYTES: usize = 256 * 1024;
/// Records waiting to be published, over all instances of a host.
const QUEUE: usize = 4096;
/// Ended instances whose lines are still kept, so that `trellis logs` can show why one crashed.
const ENDED_KEPT: usize = 32;

/// The host's side of logs: the publishing queue and the lines of instances that ended.
#[derive(Debug, Clone)]
pub(crate) struct LogHub {
    config: LogConfig,
    lattice: Lattice,
    host_id: HostId,
    queue: mpsc::Sender<(String, Bytes)>,
    ended: Arc<Mutex<VecDeque<Arc<InstanceLog>>>>,
}

impl LogHub {
    /// A hub whose publishing task runs on the current Tokio runtime until `client` closes.
    pub fn new(
        client: async_nats::Client,
        lattice: Lattice,
        host_id: HostId,
        config: LogConfig,
    ) -> Self {
        let (hub, mut rx) = Self::detached(lattice, host_id, config);
        tokio::spawn(async move {
            while let Some((subject, payload)) = rx.recv().await {
                if let Err(e) = client.publish(subject, payload).await {
                    tracing::debug!(error = %e, "cannot publish a log line");
                }
            }
        });
        hub
    }

    /// A hub and the receiving end of its publishing queue.
    fn detached(
        lattice: Lattice,
        host_id: HostId,
        config: LogConfig,
    ) -> (Self, mpsc::Receiver<(String, Bytes)>) {
        let (queue, rx) = mpsc::channel::<(String, Bytes)>(QUEUE);
        let hub = Self {
            config,
            lattice,
            host_id,
            queue,
            ended: Arc::default(),
        };
        (hub, rx)
    }

    /// The log of a new instance, counting into `stats`.
    pub fn instance(&self, id: &InstanceId, stats: Arc<Stats>) -> Arc<InstanceLog> {
        Arc::new(InstanceLog {
            hub: self.clone(),
            subject: instance_logs(&self.lattice, id),
            instance_id: id.clone(),
            meta: OnceLock::new(),
            invocations: AtomicU64::new(0),
            state: Mutex::new(LogState {
                tokens: f64::from(self.config.rate),
                refilled: Instant::now(),
                seq: 0,
                dropped: 0,
                kept: VecDeque::new(),
                kept_bytes: 0,
            }),
            stats,
        })
    }

    /// Keeps the lines of an instance that ended for a while (the last [`ENDED_KEPT`]).
    pub fn ended(&self, log: Arc<InstanceLog>) {
        let mut ended = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
        ended.retain(|l| l.instance_id != log.instance_id);
        if ended.len() == ENDED_KEPT {
            ended.pop_front();
        }
        ended.push_back(log);
    }

    /// Answers `instance.logs` from the lines of `running` instances and of those that ended.
    pub fn read(
        &self,
        running: &[Arc<InstanceLog>],
        command: &InstanceLogsCommand,
    ) -> InstanceLogsReply {
        let ended = self.ended.lock().unwrap_or_else(PoisonError::into_inner);
        let wanted = |log: &&Arc<InstanceLog>| command.instance_ids.contains(&log.instance_id);
        let mut records: Vec<LogRecord> = running
            .iter()
            .filter(wanted)
            .chain(
                ended
                    .iter()
                    .filter(wanted)
                    .filter(|e| !running.iter().any(|r| r.instance_id == e.instance_id)),
            )
            .flat_map(|log| log.kept(command.since))
            .collect();
        drop(ended);
        records
            .sort_by(|a, b| (a.time, &a.instance_id, a.seq).cmp(&(b.time, &b.instance_id, b.seq)));
        let truncated = keep_newest(&mut records, command.limit);
        InstanceLogsReply { records, truncated }
    }
}

/// The component and version an instance's records name, known once it has loaded.
#[derive(Debug)]
struct Meta {
    component: String,
    version: String,
}

#[derive(Debug)]
struct LogState {
    /// The token bucket: lines that may go out now.
    tokens: f64,
    refilled: Instant,
    /// The last record's number.
    seq: u64,
    /// Lines dropped since the last record.
    dropped: u64,
    kept: VecDeque<LogRecord>,
    kept_bytes: usize,
}

/// The log of one instance, over all its serving periods.
#[derive(Debug)]
pub(crate) struct InstanceLog {
    hub: LogHub,
    subject: String,
    instance_id: InstanceId,
    meta: OnceLock<Meta>,
    invocations: AtomicU64,
    state: Mutex<LogState>,
    stats: Arc<Stats>,
}

/// What is known of the invocation a line comes from.
#[derive(Debug, Clone, Copy)]
struct Origin<'a> {
    invocation: u64,
    trace_id: Option<&'a str>,
}

impl InstanceLog {
    /// Names the component and version in the records from now on (the first binding stays).
    pub fn bind(&self, component: &str, version: &str) {
        let _ = self.meta.set(Meta {
            component: component.to_owned(),
            version: version.to_owned(),
        });
    }

    /// Whether lines are streamed at all.
    pub fn enabled(&self) -> bool {
        self.hub.config.rate > 0
    }

    /// The sink of one new invocation, whose request carried `traceparent` (if any).
    pub fn invocation(self: &Arc<Self>, traceparent: Option<Arc<str>>) -> Arc<dyn LogSink> {
        Arc::new(InvocationLog {
            log: Arc::clone(self),
            invocation: self.invocations.fetch_add(1, Ordering::Relaxed) + 1,
            traceparent,
        })
    }

    /// The kept records received at or after `since`.
    fn kept(&self, since: Option<chrono::DateTime<Utc>>) -> Vec<LogRecord> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state
            .kept
            .iter()
            .filter(|r| since.is_none_or(|t| r.time >= t))
            .cloned()
            .collect()
    }

    /// Publishes a line if the rate allows, else counts it dropped.
    fn line(&self, origin: Origin<'_>, source: LineSource<'_>, text: &str) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let rate = f64::from(self.hub.config.rate);
        let now = Instant::now();
        state.tokens =
            (state.tokens + now.duration_since(state.refilled).as_secs_f64() * rate).min(rate);
        state.refilled = now;
        if state.tokens < 1.0 {
            state.dropped += 1;
            self.stats.log_dropped(1);
            return;
        }
        state.tokens -= 1.0;
        self.report_dropped(&mut state, origin);
        let (source, level, context) = match source {
            LineSource::Stdout => (LogSource::Stdout, None, None),
            LineSource::Stderr => (LogSource::Stderr, None, None),
            LineSource::Log { level, context } => (
                LogSource::Log,
                Some(level.to_owned()),
                (!context.is_empty()).then(|| context.to_owned()),
            ),
        };
        let message = cut(text, MAX_LINE_BYTES);
        self.publish(
            &mut state,
            origin,
            source,
            level,
            context,
            None,
            message.to_owned(),
        );
        self.stats.log_published(1);
    }

    /// Publishes a [`LogSource::Dropped`] record when lines were dropped since the last one.
    fn report_dropped(&self, state: &mut LogState, origin: Origin<'_>) {
        let dropped = std::mem::take(&mut state.dropped);
        if dropped == 0 {
            return;
        }
        let message = format!(
            "{dropped} lines dropped: over this host's rate of {} lines per second per instance",
            self.hub.config.rate
        );
        self.publish(
            state,
            origin,
            LogSource::Dropped,
            None,
            None,
            Some(dropped),
            message,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn publish(
        &self,
        state: &mut LogState,
        origin: Origin<'_>,
        source: LogSource,
        level: Option<String>,
        context: Option<String>,
        dropped: Option<u64>,
        message: String,
    ) {
        let Some(meta) = self.meta.get() else { return };
        state.seq += 1;
        let record = LogRecord {
            time: Utc::now(),
            seq: state.seq,
            instance_id: self.instance_id.clone(),
            component: meta.component.clone(),
            version: meta.version.clone(),
            host_id: self.hub.host_id.clone(),
            invocation: Some(origin.invocation),
            trace_id: origin.trace_id.map(str::to_ascii_lowercase),
            source,
            level,
            context,
            dropped,
            message,
        };
        if let Ok(payload) = serde_json::to_vec(&record)
            && self
                .hub
                .queue
                .try_send((self.subject.clone(), Bytes::from(payload)))
                .is_err()
        {
            self.stats.log_lost(1);
        }
        state.kept_bytes += record.message.len();
        state.kept.push_back(record);
        while state.kept.len() > self.hub.config.keep || state.kept_bytes > KEEP_BYTES {
            match state.kept.pop_front() {
                Some(old) => state.kept_bytes -= old.message.len(),
                None => break,
            }
        }
    }
}

/// The sink of one invocation.
struct InvocationLog {
    log: Arc<InstanceLog>,
    invocation: u64,
    /// The call's W3C trace context; its trace id is read off it only when a line is written,
    /// as most invocations write none.
    traceparent: Option<Arc<str>>,
}

impl InvocationLog {
    fn origin(&self) -> Origin<'_> {
        Origin {
            invocation: self.invocation,
            trace_id: self
                .traceparent
                .as_deref()
                .and_then(trellis_schemas::dataplane::trace_id),
        }
    }
}

impl LogSink for InvocationLog {
    fn line(&self, source: LineSource<'_>, text: &str) {
        self.log.line(self.origin(), source, text);
    }

    fn finish(&self) {
        let mut state = self
            .log
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Most invocations have nothing to report: the origin (its trace id parsed out of the
        // traceparent) is made only for what is.
        if state.dropped == 0 {
            return;
        }
        self.log.report_dropped(&mut state, self.origin());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn hub(rate: u32, keep: usize) -> (LogHub, mpsc::Receiver<(String, Bytes)>) {
        LogHub::detached(
            Lattice::new("t").unwrap(),
            HostId::new("h1").unwrap(),
            LogConfig { rate, keep },
        )
    }

    fn published(rx: &mut mpsc::Receiver<(String, Bytes)>) -> Vec<LogRecord> {
        let mut out = Vec::new();
        while let Ok((subject, payload)) = rx.try_recv() {
            let lattice = Lattice::new("t").unwrap();
            assert_eq!(
                subject,
                instance_logs(&lattice, &InstanceId::new("i1").unwrap())
            );
            out.push(serde_json::from_slice(&payload).unwrap());
        }
        out
    }

    #[test]
    fn lines_over_the_rate_are_dropped_counted_and_reported() {
        let (hub, mut rx) = hub(10, 1000);
        let id = InstanceId::new("i1").unwrap();
        let stats = Arc::new(Stats::default());
        let log = hub.instance(&id, Arc::clone(&stats));
        log.bind("noisy", "1.0.0");
        let tp = "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01";
        let sink = log.invocation(Some(tp.into()));
        for i in 0..1000 {
            sink.line(LineSource::Stdout, &format!("line {i}"));
        }
        sink.line(
            LineSource::Log {
                level: "warn",
                context: "ctx",
            },
            "structured",
        );
        sink.finish();
        let records = published(&mut rx);
        // A burst of one second's worth (10), maybe one more refilled meanwhile, then the
        // report of the rest at the invocation's end.
        let lines: Vec<_> = records
            .iter()
            .filter(|r| r.source == LogSource::Stdout)
            .collect();
        assert!(
            (10..=11).contains(&lines.len()),
            "{} lines published",
            lines.len()
        );
        assert_eq!(lines[0].message, "line 0");
        assert_eq!(lines[0].invocation, Some(1));
        assert_eq!(lines[0].component, "noisy");
        assert_eq!(
            lines[0].trace_id.as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736"),
            "the trace id, lower-cased"
        );
        let last = records.last().unwrap();
        assert_eq!(last.source, LogSource::Dropped);
        let dropped = last.dropped.unwrap();
        assert_eq!(
            dropped as usize + lines.len(),
            1001,
            "every line published or counted"
        );
        let counts = stats.counts().log;
        assert_eq!(counts.dropped, dropped);
        assert_eq!(counts.published as usize, lines.len());
        let seqs: Vec<u64> = records.iter().map(|r| r.seq).collect();
        assert_eq!(
            seqs,
            (1..=records.len() as u64).collect::<Vec<_>>(),
            "numbered without gaps"
        );

        // The next invocation, once the bucket refilled, publishes again.
        std::thread::sleep(Duration::from_millis(150));
        let sink = log.invocation(None);
        sink.line(
            LineSource::Log {
                level: "info",
                context: "",
            },
            "back",
        );
        let records = published(&mut rx);
        assert_eq!(records.len(), 1, "{records:?}");
        assert_eq!(records[0].level.as_deref(), Some("info"));
        assert_eq!(records[0].context, None);
        assert_eq!(records[0].invocation, Some(2));
    }

    #[test]
    fn keeps_the_last_lines_for_reading_also_after_the_end() {
        let (hub, _rx) = hub(1000, 5);
        let id = InstanceId::new("i1").unwrap();
        let log = hub.instance(&id, Arc::default());
        log.bind("c", "1.0.0");
        let sink = log.invocation(None);
        for i in 0..8 {
            sink.line(LineSource::Stderr, &format!("{i}"));
        }
        let read = |running: &[Arc<InstanceLog>], limit| {
            hub.read(
                running,
                &InstanceLogsCommand {
                    instance_ids: vec![id.clone()],
                    since: None,
                    limit,
                },
            )
        };
        let reply = read(std::slice::from_ref(&log), 100);
        let messages: Vec<_> = reply.records.iter().map(|r| r.message.as_str()).collect();
        assert_eq!(messages, ["3", "4", "5", "6", "7"]);
        assert!(
            !reply.truncated,
            "what the host no longer keeps is not truncation"
        );
        let reply = read(std::slice::from_ref(&log), 2);
        assert_eq!(reply.records.len(), 2);
        assert!(reply.truncated);
        assert!(
            read(&[], 100).records.is_empty(),
            "not running, not ended: nothing"
        );
        hub.ended(log);
        assert_eq!(read(&[], 100).records.len(), 5, "kept after the end");
    }
}
