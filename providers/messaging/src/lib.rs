//! `trellis-provider-messaging`: NATS messaging for `wasmcloud:messaging`.
//!
//! - `consumer.publish` and `consumer.request` (RPC from a host) are allowed only to subjects
//!   matching the assignment's `publish` patterns; a request waits for one reply (at most 60 s).
//! - For every assignment with a `subscribe` list, the provider subscribes to each subject in a
//!   queue group of that assignment (replicas of the provider share the messages) and delivers
//!   each message by calling the target's `wasmcloud:messaging/handler@0.2.0#handle-message`
//!   over the ordinary data plane. A revocation unsubscribes.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Message;
use async_nats::client::RequestErrorKind;
use bytes::Bytes;
use futures::StreamExt as _;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;
use trellis_bus::dataplane as codec;
use trellis_provider_sdk::{
    Call, CapabilityRequest, CapabilityResponse, Context, DataError, Outcome, Provider,
    ProviderInfo,
};
use trellis_schemas::capability::rpc::{BrokerMessage, MessagingReply, MessagingRequest};
use trellis_schemas::capability::{split_list, subject_matches, valid_subject_pattern};
use trellis_schemas::dataplane::{self, Op};
use trellis_schemas::{AssignmentId, AssignmentRecord, Capability, subject};

/// What this provider is.
pub const INFO: ProviderInfo = ProviderInfo {
    name: "messaging",
    version: env!("CARGO_PKG_VERSION"),
    capabilities: &[Capability::Messaging],
    rpc: &[Capability::Messaging],
    workers: 1,
};

/// The export a subscribed message is delivered to.
pub const HANDLER_EXPORT: &str = "wasmcloud:messaging/handler@0.2.0#handle-message";

/// The longest a `consumer.request` may wait.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a delivery waits for the component.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Deliveries in flight per subscription.
const DELIVERIES_IN_FLIGHT: usize = 64;

/// The provider.
#[derive(Debug)]
pub struct MessagingProvider {
    /// The connection for the application subjects components publish and subscribe to: the
    /// context's own, or one with the credentials in [`trellis_bus::ENV_APP_CREDS`].
    app: async_nats::Client,
    /// Reply subjects a component may answer once.
    replies: Arc<Replies>,
}

impl MessagingProvider {
    /// A provider on the context's client, or, with [`trellis_bus::ENV_APP_CREDS`] set, with
    /// the application traffic on a second connection that logs in with those credentials: in
    /// a secured lattice the provider's own user may touch only its Trellis subjects, the
    /// application user only subjects outside Trellis.
    pub async fn new(ctx: Context) -> anyhow::Result<Self> {
        let app = match std::env::var_os(trellis_bus::ENV_APP_CREDS) {
            Some(creds) => {
                let mut args = trellis_bus::connect_args().clone();
                args.creds = Some(creds.into());
                args.inbox_prefix = Some(trellis_schemas::roles::APP_INBOX_PREFIX.to_owned());
                args.check().map_err(anyhow::Error::msg)?;
                trellis_bus::connect_with(
                    &ctx.nats_url,
                    &format!("trellis-provider-{}-{}-app", ctx.name, ctx.id),
                    true,
                    &args,
                )
                .await?
            }
            None => ctx.client.clone(),
        };
        Ok(Self {
            app,
            replies: Arc::new(Replies::default()),
        })
    }
}

/// The reply subjects of the messages delivered lately: a component may publish to each once,
/// whatever its assignment's `publish` patterns say (answering a request it was delivered), and
/// to no other `_INBOX.…` subject.
#[derive(Debug, Default)]
struct Replies {
    pending: std::sync::Mutex<HashMap<String, std::time::Instant>>,
}

/// The most reply subjects remembered; the oldest are forgotten beyond.
const REPLIES_KEPT: usize = 10_000;

impl Replies {
    fn remember(&self, subject: &str) {
        let mut pending = self
            .pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if pending.len() >= REPLIES_KEPT {
            let now = std::time::Instant::now();
            pending.retain(|_, at| now.duration_since(*at) < DELIVERY_TIMEOUT);
            if pending.len() >= REPLIES_KEPT {
                pending.clear();
            }
        }
        pending.insert(subject.to_owned(), std::time::Instant::now());
    }

    /// Whether `subject` is the reply subject of a message delivered within the delivery
    /// timeout; it is forgotten either way.
    fn take(&self, subject: &str) -> bool {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(subject)
            .is_some_and(|at| at.elapsed() < DELIVERY_TIMEOUT)
    }
}

/// Whether a message on `subject` is the lattice's own or a reply to someone's request: never
/// delivered to a component, whatever its `subscribe` patterns match.
fn not_for_components(subject: &str) -> bool {
    subject::is_reserved(subject) || subject.starts_with('$') || subject.starts_with("_INBOX")
}

/// Whether a component may name `subject` at all: a concrete subject outside the lattice's own.
fn concrete(subject: &str) -> bool {
    valid_subject_pattern(subject)
        && !subject.split('.').any(|t| t == "*" || t == ">")
        && !not_for_components(subject)
}

/// Checks `subject` against the assignment's `publish` patterns.
fn check_publish(call: &Call, subject: &str) -> Result<(), DataError> {
    if !concrete(subject) {
        return Err(DataError::denied(format!(
            "{subject:?} is not a subject a component may publish to"
        )));
    }
    let patterns = split_list(call.config("publish").unwrap_or_default());
    if patterns.iter().any(|p| subject_matches(p, subject)) {
        Ok(())
    } else {
        Err(DataError::denied(format!(
            "publishing to {subject:?} is not allowed by assignment {} (publish: {})",
            call.assignment.assignment_id,
            if patterns.is_empty() {
                "none".to_owned()
            } else {
                patterns.join(",")
            }
        )))
    }
}

impl Provider for MessagingProvider {
    async fn handle(&self, call: Call) -> Outcome {
        let CapabilityRequest::Messaging(request) = &call.request else {
            return Err(DataError::invalid(format!(
                "the messaging provider does not serve {}",
                call.request.capability()
            )));
        };
        let request = request.clone();
        let client = &self.app;
        match request {
            MessagingRequest::Publish { message } => {
                // The answer to a request it was delivered needs no pattern; nothing else on an
                // inbox is allowed.
                if !self.replies.take(&message.subject) {
                    check_publish(&call, &message.subject)?;
                }
                let body = message.body;
                let sent = match message.reply_to {
                    Some(reply_to) => {
                        if !concrete(&reply_to) && !reply_to.starts_with("_INBOX.") {
                            return Err(DataError::denied(format!(
                                "{reply_to:?} cannot be a reply subject"
                            )));
                        }
                        client
                            .publish_with_reply(message.subject, reply_to, body)
                            .await
                    }
                    None => client.publish(message.subject, body).await,
                };
                sent.map_err(|e| DataError::unavailable(format!("cannot publish: {e}")))?;
                Ok(CapabilityResponse::Messaging(MessagingReply::default()))
            }
            MessagingRequest::Request {
                subject,
                body,
                timeout_ms,
            } => {
                check_publish(&call, &subject)?;
                let timeout =
                    Duration::from_millis(u64::from(timeout_ms).max(1)).min(MAX_REQUEST_TIMEOUT);
                let request = async_nats::Request::new()
                    .payload(body)
                    .timeout(Some(timeout));
                let reply = client
                    .send_request(subject.clone(), request)
                    .await
                    .map_err(|e| match e.kind() {
                        RequestErrorKind::NoResponders => {
                            DataError::upstream(format!("no responders on {subject}"))
                        }
                        RequestErrorKind::TimedOut => DataError::upstream(format!(
                            "no reply on {subject} within {} ms",
                            timeout.as_millis()
                        )),
                        _ => DataError::unavailable(format!("request on {subject} failed: {e}")),
                    })?;
                Ok(CapabilityResponse::Messaging(MessagingReply {
                    message: Some(BrokerMessage {
                        subject: reply.subject.to_string(),
                        body: reply.payload,
                        reply_to: None,
                    }),
                }))
            }
        }
    }

    async fn run(self: Arc<Self>, ctx: Context) {
        let mut changes = ctx.assignments.changes();
        let mut active: HashMap<AssignmentId, Vec<JoinHandle<()>>> = HashMap::new();
        loop {
            let mine: HashMap<AssignmentId, AssignmentRecord> = ctx
                .assignments
                .mine(Capability::Messaging)
                .into_iter()
                .filter(|r| r.assignment.config.contains_key("subscribe"))
                .map(|r| (r.assignment.assignment_id.clone(), r))
                .collect();
            active.retain(|id, tasks| {
                let keep = mine.contains_key(id);
                if !keep {
                    tracing::info!(assignment = %id, "assignment revoked; unsubscribing");
                    tasks.iter().for_each(JoinHandle::abort);
                }
                keep
            });
            for (id, record) in mine {
                if active.contains_key(&id) {
                    continue;
                }
                let tasks = subscribe(&ctx, &self.app, &self.replies, &record).await;
                active.insert(id, tasks);
            }
            tokio::select! {
                changed = changes.changed() => if changed.is_err() { break },
                () = ctx.shutdown() => break,
            }
        }
        for task in active.values().flatten() {
            task.abort();
        }
    }
}

/// Subscribes to every subject of an assignment's `subscribe` list.
async fn subscribe(
    ctx: &Context,
    app: &async_nats::Client,
    replies: &Arc<Replies>,
    record: &AssignmentRecord,
) -> Vec<JoinHandle<()>> {
    let assignment = &record.assignment;
    let target = dataplane::target_subject(&ctx.lattice, &assignment.target, Op::Call);
    let queue = format!("trellis-messaging-{}", assignment.assignment_id);
    let subjects = split_list(
        assignment
            .config
            .get("subscribe")
            .map(String::as_str)
            .unwrap_or_default(),
    )
    .into_iter()
    .map(str::to_owned)
    .collect::<Vec<_>>();
    let mut tasks = Vec::new();
    for topic in subjects {
        let subscriber = match app.queue_subscribe(topic.clone(), queue.clone()).await {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(assignment = %assignment.assignment_id, subject = %topic, error = %e, "cannot subscribe");
                continue;
            }
        };
        tracing::info!(assignment = %assignment.assignment_id, subject = %topic, target = %assignment.target.describe(), "subscribed");
        let client = ctx.client.clone();
        let target = target.clone();
        let id = assignment.assignment_id.clone();
        let replies = Arc::clone(replies);
        tasks.push(tokio::spawn(async move {
            let limit = Arc::new(Semaphore::new(DELIVERIES_IN_FLIGHT));
            let mut subscriber = subscriber;
            while let Some(message) = subscriber.next().await {
                if not_for_components(message.subject.as_str()) {
                    continue;
                }
                if let Some(reply) = &message.reply {
                    replies.remember(reply.as_str());
                }
                let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
                    return;
                };
                let client = client.clone();
                let target = target.clone();
                let id = id.clone();
                tokio::spawn(async move {
                    deliver(&client, &target, &id, message).await;
                    drop(permit);
                });
            }
        }));
    }
    tasks
}

/// The arguments of `handle-message` for `message`: a JSON array with one `broker-message`.
pub fn handler_args(message: &Message) -> serde_json::Value {
    json!([{
        "subject": message.subject.as_str(),
        "body": message.payload.as_ref(),
        "reply-to": message.reply.as_ref().map(|r| r.as_str()),
    }])
}

/// Calls the target's handler with one message; logs failures.
async fn deliver(client: &async_nats::Client, target: &str, id: &AssignmentId, message: Message) {
    let body = match serde_json::to_vec(&handler_args(&message)) {
        Ok(body) => body,
        Err(e) => {
            tracing::error!(error = %e, "cannot encode a delivery");
            return;
        }
    };
    let subject = message.subject.as_str();
    let sent = codec::request(
        client,
        target.to_owned(),
        codec::call_headers(HANDLER_EXPORT),
        Bytes::from(body),
        DELIVERY_TIMEOUT,
    )
    .await;
    match sent {
        Err(e) => {
            tracing::warn!(assignment = %id, %subject, %target, error = %e, "delivery failed");
        }
        Ok(reply) => {
            if let Err(e) = codec::read_reply(&reply) {
                tracing::warn!(assignment = %id, %subject, %target, code = %e.code, error = %e.message, "delivery refused");
                return;
            }
            match serde_json::from_slice::<serde_json::Value>(&reply.payload) {
                Ok(value) if value.get("err").is_some() => {
                    tracing::warn!(assignment = %id, %subject, %target, error = %value["err"], "the handler returned an error");
                }
                Ok(_) => tracing::debug!(assignment = %id, %subject, "delivered"),
                Err(e) => {
                    tracing::warn!(assignment = %id, %subject, error = %e, "unexpected handler reply");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivered_reply_subject_may_be_answered_once() {
        let replies = Replies::default();
        assert!(!replies.take("_INBOX.a.1"));
        replies.remember("_INBOX.a.1");
        assert!(replies.take("_INBOX.a.1"));
        assert!(!replies.take("_INBOX.a.1"), "only once");
        assert!(not_for_components("_INBOX.a.1"));
        assert!(not_for_components("$JS.API.INFO"));
        assert!(!not_for_components("orders.new"));
        assert!(!concrete("_INBOX.a.1"));
    }

    #[test]
    fn only_concrete_subjects_outside_the_lattice_may_be_named() {
        assert!(concrete("orders.new"));
        assert!(!concrete("orders.*"));
        assert!(!concrete("orders.>"));
        let ctl = subject::ctl(
            &trellis_schemas::Lattice::new("default").expect("valid"),
            trellis_schemas::CtlOp::HostList,
        );
        assert!(!concrete(&ctl));
        assert!(!concrete("$JS.API.INFO"));
        assert!(!concrete("a..b"));
    }

    #[test]
    fn handler_arguments_follow_the_json_mapping() {
        let message = Message {
            subject: "orders.new".into(),
            reply: Some("_INBOX.x".into()),
            payload: Bytes::from_static(b"hi"),
            headers: None,
            status: None,
            description: None,
            length: 0,
        };
        assert_eq!(
            handler_args(&message),
            json!([{"subject": "orders.new", "body": [104, 105], "reply-to": "_INBOX.x"}])
        );
    }
}
