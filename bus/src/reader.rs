use async_nats::jetstream::{self, consumer::DeliverPolicy, consumer::push};
use bytes::Bytes;
use futures::StreamExt;

/// Reading a stream failed.
#[derive(Debug, thiserror::Error)]
#[error("reading stream {stream}: {message}")]
pub struct ReadError {
    /// The stream.
    pub stream: String,
    /// What went wrong.
    pub message: String,
}

/// Where a [`FactStream`] starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAt {
    /// The oldest message the stream still holds.
    Beginning,
    /// The first message at or after this sequence.
    Sequence(u64),
    /// Only messages stored from now on.
    New,
    /// The last message of every subject, then everything new.
    LastPerSubject,
}

/// One message read from a stream, undecoded.
#[derive(Debug, Clone)]
pub struct RawFact {
    /// Its stream sequence.
    pub seq: u64,
    /// Messages after this one in the stream (matching the filter) at delivery time; 0 means the
    /// reader has reached the tip.
    pub pending: u64,
    /// The message body.
    pub payload: Bytes,
}

/// Reads a stream in order with an ordered push consumer, which recreates itself after gaps and
/// reconnections, so a reader sees every message once, in sequence order.
pub struct FactStream {
    stream: String,
    messages: push::Ordered,
}

impl std::fmt::Debug for FactStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FactStream")
            .field("stream", &self.stream)
            .finish_non_exhaustive()
    }
}

impl FactStream {
    /// Opens a reader of `stream` (optionally only subjects matching `filter`) starting at `start`.
    pub async fn open(
        client: &async_nats::Client,
        js: &jetstream::Context,
        stream: &str,
        filter: Option<String>,
        start: StartAt,
    ) -> Result<Self, ReadError> {
        Self::open_filtered(client, js, stream, filter.into_iter().collect(), start).await
    }

    /// Opens a reader of the messages of `stream` whose subject matches any of `filters` (all
    /// of them when empty) starting at `start`.
    pub async fn open_filtered(
        client: &async_nats::Client,
        js: &jetstream::Context,
        stream: &str,
        mut filters: Vec<String>,
        start: StartAt,
    ) -> Result<Self, ReadError> {
        let err = |message: String| ReadError {
            stream: stream.to_owned(),
            message,
        };
        let handle = js
            .get_stream(stream)
            .await
            .map_err(|e| err(e.to_string()))?;
        let deliver_policy = match start {
            StartAt::Beginning => DeliverPolicy::All,
            StartAt::Sequence(seq) => DeliverPolicy::ByStartSequence {
                start_sequence: seq.max(1),
            },
            StartAt::New => DeliverPolicy::New,
            StartAt::LastPerSubject => DeliverPolicy::LastPerSubject,
        };
        let consumer = handle
            .create_consumer(push::OrderedConfig {
                deliver_subject: client.new_inbox(),
                // One filter goes as `filter_subject`, which every server version understands.
                filter_subject: if filters.len() == 1 {
                    filters.pop().unwrap_or_default()
                } else {
                    String::new()
                },
                filter_subjects: filters,
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| err(e.to_string()))?;
        let messages = consumer.messages().await.map_err(|e| err(e.to_string()))?;
        Ok(Self {
            stream: stream.to_owned(),
            messages,
        })
    }

    /// The next message; `None` only if the consumer ends for good.
    pub async fn next(&mut self) -> Option<Result<RawFact, ReadError>> {
        let message = self.messages.next().await?;
        Some(match message {
            Ok(message) => match message.info() {
                Ok(info) => Ok(RawFact {
                    seq: info.stream_sequence,
                    pending: info.pending,
                    payload: message.message.payload.clone(),
                }),
                Err(e) => Err(ReadError {
                    stream: self.stream.clone(),
                    message: e.to_string(),
                }),
            },
            Err(e) => Err(ReadError {
                stream: self.stream.clone(),
                message: e.to_string(),
            }),
        })
    }
}

/// One message delivered by [`follow`]: its sequence, how many follow it, and its fact (or why
/// it could not be decoded).
#[derive(Debug)]
pub struct Followed {
    /// Its stream sequence.
    pub seq: u64,
    /// Messages after it (matching the filter) at delivery time; 0 at the tip.
    pub pending: u64,
    /// The fact it carries.
    pub event: Result<trellis_schemas::Event, trellis_schemas::fact::DecodeError>,
}

/// Follows the messages of `stream` matching any of `filters`, forever: opens a reader at the sequence
/// `next_seq` gives and hands each message to `deliver`, in order. After a failure it opens a
/// new reader (a second after a failed open, 200 ms after a reader ends) at `next_seq` again,
/// so `next_seq` should say where the caller is: nothing is skipped and nothing applied twice.
pub async fn follow(
    client: &async_nats::Client,
    stream: &str,
    filters: &[String],
    mut next_seq: impl FnMut() -> u64,
    mut deliver: impl FnMut(Followed),
) {
    let js = crate::jetstream(client.clone());
    loop {
        let opened = FactStream::open_filtered(
            client,
            &js,
            stream,
            filters.to_vec(),
            StartAt::Sequence(next_seq()),
        )
        .await;
        let mut reader = match opened {
            Ok(reader) => reader,
            Err(e) => {
                tracing::warn!(error = %e, filter = ?filters, "cannot open a fact reader; retrying");
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
        };
        while let Some(raw) = reader.next().await {
            match raw {
                Ok(raw) => deliver(Followed {
                    seq: raw.seq,
                    pending: raw.pending,
                    event: trellis_schemas::Event::decode(&raw.payload),
                }),
                Err(e) => {
                    tracing::warn!(error = %e, filter = ?filters, "fact reader failed; reopening");
                    break;
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Reads `stream` from the beginning with an ordered consumer and only counts messages until it has
/// seen sequence `until_seq`. The baseline that replay speed is compared against.
pub async fn count_messages(
    client: &async_nats::Client,
    js: &jetstream::Context,
    stream: &str,
    until_seq: u64,
) -> Result<u64, ReadError> {
    let mut reader = FactStream::open(client, js, stream, None, StartAt::Beginning).await?;
    let mut count = 0u64;
    while let Some(message) = reader.messages.next().await {
        let message = message.map_err(|e| ReadError {
            stream: stream.to_owned(),
            message: e.to_string(),
        })?;
        count += 1;
        // Only the sequence is looked at, as any reader must to know where it is.
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        if seq >= until_seq {
            break;
        }
    }
    Ok(count)
}
