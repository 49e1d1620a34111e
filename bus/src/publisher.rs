use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use trellis_schemas::{Event, Lattice};

use crate::streams::{StreamSettings, ensure_streams};

/// A fact could not be published.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The event could not be encoded.
    #[error("cannot encode fact: {0}")]
    Encode(#[from] serde_json::Error),
    /// The publisher's buffer is full: NATS has been away for long enough that the bounded queue
    /// filled up.
    #[error("fact buffer is full ({0} facts waiting for NATS)")]
    BufferFull(usize),
    /// The publisher has shut down.
    #[error("fact publisher is closed")]
    Closed,
    /// JetStream refused the fact for a reason that retrying does not fix.
    #[error("JetStream rejected the fact: {0}")]
    Rejected(String),
    /// No acknowledgement arrived in time.
    #[error("no acknowledgement from JetStream within {0:?}")]
    Timeout(Duration),
}

/// How long the fact stream must keep answering "not found" before it is recreated: longer than
/// a JetStream cluster takes to elect a new leader for it.
const MISSING_GRACE: Duration = Duration::from_secs(3);
/// The longest pause between two attempts to store a fact: short, so that a fact waits little
/// longer than the outage (or leader election) it waits out.
const RETRY_CAP: Duration = Duration::from_millis(500);
/// At most one attempt to recreate the stream per this interval, each bounded by it.
const RECREATE_EVERY: Duration = Duration::from_secs(5);

struct Job {
    subject: String,
    id: String,
    payload: Bytes,
    done: Option<oneshot::Sender<Result<u64, PublishError>>>,
}

/// Publishes facts to the lattice's stream, in order, until each is acknowledged.
///
/// Cloning is cheap; all clones feed one queue served by one task, so facts are stored in the order
/// they were handed over. Each fact is published with `Nats-Msg-Id` = its event id: when an
/// acknowledgement is lost and the publish is retried, JetStream stores it once.
///
/// # Disconnection
///
/// While NATS is away the head of the queue is retried with a capped backoff and new facts wait
/// behind it, up to the queue's capacity; beyond that [`FactPublisher::enqueue`] fails with
/// [`PublishError::BufferFull`] rather than growing without bound.
#[derive(Debug, Clone)]
pub struct FactPublisher {
    lattice: Lattice,
    tx: mpsc::Sender<Job>,
    capacity: usize,
}

/// The worker task of a [`FactPublisher`]; awaiting it waits until every queued fact is stored.
#[derive(Debug)]
pub struct PublisherTask(JoinHandle<()>);

impl PublisherTask {
    /// Waits until the queue is drained (all publishers dropped and every fact stored), for at most
    /// `timeout`. Returns whether it drained in time.
    pub async fn drain(self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.0).await.is_ok()
    }
}

impl FactPublisher {
    /// Starts a publisher with a queue of `capacity` facts.
    pub fn spawn(
        js: jetstream::Context,
        lattice: Lattice,
        settings: StreamSettings,
        capacity: usize,
    ) -> (Self, PublisherTask) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let task = tokio::spawn(run(js, lattice.clone(), settings, rx));
        (
            Self {
                lattice,
                tx,
                capacity,
            },
            PublisherTask(task),
        )
    }

    fn job(&self, event: &Event) -> Result<Job, PublishError> {
        // A fact published while serving a traced request carries its trace context.
        let payload = match crate::telemetry::current() {
            Some(traceparent) if event.traceparent.is_none() => {
                let mut traced = event.clone();
                traced.traceparent = Some(traceparent);
                traced.encode()?
            }
            _ => event.encode()?,
        };
        Ok(Job {
            subject: event.nats_subject(&self.lattice),
            id: event.id.to_string(),
            payload: Bytes::from(payload),
            done: None,
        })
    }

    /// Queues a fact without waiting for it to be stored.
    pub fn enqueue(&self, event: &Event) -> Result<(), PublishError> {
        let job = self.job(event)?;
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => PublishError::BufferFull(self.capacity),
            mpsc::error::TrySendError::Closed(_) => PublishError::Closed,
        })
    }

    /// Publishes a fact and waits until JetStream has stored it; returns its stream sequence.
    pub async fn publish(&self, event: &Event) -> Result<u64, PublishError> {
        let (done, wait) = oneshot::channel();
        let mut job = self.job(event)?;
        job.done = Some(done);
        self.tx.send(job).await.map_err(|_| PublishError::Closed)?;
        wait.await.map_err(|_| PublishError::Closed)?
    }
}

async fn run(
    js: jetstream::Context,
    lattice: Lattice,
    settings: StreamSettings,
    mut rx: mpsc::Receiver<Job>,
) {
    // When the stream was last found missing and recreated: in a cluster, a stream without a
    // leader (an election after a server died) has no responders, which reads as "not found"
    // too, and trying to recreate it then only blocks on a JetStream API that cannot answer.
    let mut last_recreate: Option<Instant> = None;
    while let Some(job) = rx.recv().await {
        let mut attempt: u32 = 0;
        let mut missing_since: Option<Instant> = None;
        let result = loop {
            let publish = PublishMessage::build()
                .payload(job.payload.clone())
                .message_id(&job.id);
            let error = match js.send_publish(job.subject.clone(), publish).await {
                Ok(ack) => match ack.await {
                    Ok(ack) => break Ok(ack.sequence),
                    Err(e) => e,
                },
                Err(e) => e,
            };
            match error.kind() {
                // Retrying cannot shrink a message, and an error JetStream keeps repeating is
                // not a passing outage.
                PublishErrorKind::MaxPayloadExceeded => {
                    break Err(PublishError::Rejected(error.to_string()));
                }
                PublishErrorKind::Other if attempt > 20 => {
                    break Err(PublishError::Rejected(error.to_string()));
                }
                PublishErrorKind::StreamNotFound => {
                    // The stream was deleted, NATS came back without its JetStream state, or
                    // (the common case in a cluster) the stream is electing a leader. Only a
                    // stream missing for longer than an election takes is recreated.
                    let since = *missing_since.get_or_insert_with(Instant::now);
                    let due = last_recreate.is_none_or(|t| t.elapsed() >= RECREATE_EVERY);
                    if since.elapsed() >= MISSING_GRACE && due {
                        last_recreate = Some(Instant::now());
                        tracing::warn!(
                            missing_for = ?since.elapsed(),
                            "fact stream missing; recreating it"
                        );
                        match tokio::time::timeout(
                            RECREATE_EVERY,
                            ensure_streams(&js, &lattice, &settings),
                        )
                        .await
                        {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => {
                                tracing::warn!(error = %e, "cannot recreate the fact stream")
                            }
                            Err(_) => tracing::warn!("recreating the fact stream timed out"),
                        }
                    }
                }
                _ => missing_since = None,
            }
            attempt = attempt.saturating_add(1);
            let delay = Duration::from_millis(50u64 << attempt.min(4)).min(RETRY_CAP);
            if attempt == 1 || attempt.is_multiple_of(10) {
                tracing::warn!(subject = %job.subject, attempt, error = %error, "fact not stored yet; retrying");
            }
            tokio::time::sleep(delay).await;
        };
        if let Err(e) = &result {
            tracing::error!(subject = %job.subject, error = %e, "fact dropped");
        }
        if let Some(done) = job.done {
            let _ = done.send(result);
        }
    }
}

/// Publishes `event` only if the last fact on its subject has stream sequence
/// `expected_last_subject_seq` (0: no fact on the subject yet).
///
/// Returns `Ok(Some(seq))` when stored (or when this very event had already been stored by an
/// earlier attempt), `Ok(None)` when another fact got there first, so the caller lost the race and
/// must not act on its decision.
pub async fn publish_exclusive(
    js: &jetstream::Context,
    lattice: &Lattice,
    event: &Event,
    expected_last_subject_seq: u64,
) -> Result<Option<u64>, PublishError> {
    publish_expecting(
        js,
        lattice,
        event,
        "Nats-Expected-Last-Subject-Sequence",
        expected_last_subject_seq,
        None,
    )
    .await
}

/// Publishes `event` only if the last fact on any subject matching `filter` (a wildcard subject:
/// every fact about one host, say) has stream sequence `expected_last_seq`: nothing happened to
/// that entity since the caller's view of it, which may lag behind the stream. Returns as
/// [`publish_exclusive`] does.
pub async fn publish_exclusive_among(
    js: &jetstream::Context,
    lattice: &Lattice,
    event: &Event,
    filter: &str,
    expected_last_seq: u64,
) -> Result<Option<u64>, PublishError> {
    publish_expecting(
        js,
        lattice,
        event,
        "Nats-Expected-Last-Subject-Sequence",
        expected_last_seq,
        Some(filter),
    )
    .await
}

/// Publishes `event` only if the stream's last message has sequence `expected_last_seq`: nothing
/// at all was stored since the caller read the stream up to there, so a decision taken on that
/// state still holds. Returns as [`publish_exclusive`] does.
pub async fn publish_at_tip(
    js: &jetstream::Context,
    lattice: &Lattice,
    event: &Event,
    expected_last_seq: u64,
) -> Result<Option<u64>, PublishError> {
    publish_expecting(
        js,
        lattice,
        event,
        "Nats-Expected-Last-Sequence",
        expected_last_seq,
        None,
    )
    .await
}

/// How many times a conditional publish is retried while JetStream is unreachable or electing a
/// leader for the stream (about 3.5 s in all).
const CONDITIONAL_ATTEMPTS: u32 = 10;

async fn publish_expecting(
    js: &jetstream::Context,
    lattice: &Lattice,
    event: &Event,
    header: &'static str,
    expected: u64,
    filter: Option<&str>,
) -> Result<Option<u64>, PublishError> {
    let payload = Bytes::from(event.encode()?);
    let subject = event.nats_subject(lattice);
    let mut attempt: u32 = 0;
    loop {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", event.id.to_string().as_str());
        headers.insert(header, expected.to_string().as_str());
        if let Some(filter) = filter {
            // The subject whose last sequence is checked, in place of the fact's own.
            headers.insert("Nats-Expected-Last-Subject-Sequence-Subject", filter);
        }
        let error = match js
            .publish_with_headers(subject.clone(), headers, payload.clone())
            .await
        {
            Ok(ack) => match ack.await {
                Ok(ack) => return Ok(Some(ack.sequence)),
                Err(e) => e,
            },
            Err(e) => e,
        };
        match error.kind() {
            PublishErrorKind::WrongLastSequence => return Ok(None),
            // The same message id makes a retry of a stored fact a duplicate, which JetStream
            // acknowledges with the first sequence before it looks at the expectation.
            PublishErrorKind::TimedOut
            | PublishErrorKind::BrokenPipe
            | PublishErrorKind::StreamNotFound
                if attempt < CONDITIONAL_ATTEMPTS =>
            {
                attempt += 1;
                let delay = Duration::from_millis(100 * u64::from(attempt)).min(RETRY_CAP);
                tokio::time::sleep(delay).await;
            }
            _ => return Err(PublishError::Rejected(error.to_string())),
        }
    }
}
