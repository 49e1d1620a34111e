//! The data plane of one instance: answering calls.
//!
//! A call is a NATS request whose `Trellis-Export` header names the export and whose body is the
//! JSON array of arguments (an empty body is `[]`). The reply carries `Trellis-Status: ok` and the
//! JSON result, or `Trellis-Status: error`, a stable `Trellis-Error-Code`, a `Trellis-Reason` for
//! crashes and a human-readable message as body. Every reply names the instance that served it in
//! `Trellis-Instance`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

use async_nats::header::HeaderName;
use async_nats::{HeaderMap, HeaderValue, Message};
use bytes::Bytes;
use serde_json::Value;
use tokio::sync::{Notify, oneshot};
use trellis_schemas::capability::rpc::{self, HttpRequestHead};
use trellis_schemas::instance::dataplane;

use crate::runtime::{InvokeError, LoadedComponent};

/// What a crashing invocation tells its instance's supervisor.
#[derive(Debug)]
pub(crate) struct Crash {
    /// Stable reason (`InvokeError::reason`).
    pub reason: String,
    /// What the runtime said, with the guest's panic message when there is one.
    pub detail: String,
    /// The export that crashed.
    pub export: String,
}

/// One serving period of an instance: from a start (or restart) to the crash or stop that ends
/// it. Calls hold it while they run.
#[derive(Debug)]
pub(crate) struct Serving {
    pub client: async_nats::Client,
    pub component: LoadedComponent,
    instance: HeaderValue,
    /// The header names, parsed once: a name given as `&str` is copied at every use.
    names: Names,
    /// The headers of every successful reply.
    ok: HeaderMap,
    /// Set by the first crash (or the stop): later calls of this period are refused.
    ended: AtomicBool,
    crash: Mutex<Option<oneshot::Sender<Crash>>>,
    in_flight: AtomicUsize,
    idle: Notify,
}

impl Serving {
    pub fn new(
        client: async_nats::Client,
        component: LoadedComponent,
        instance_id: &str,
    ) -> (Self, oneshot::Receiver<Crash>) {
        let (tx, rx) = oneshot::channel();
        let names = Names::new();
        let instance = HeaderValue::from(instance_id);
        let mut ok = HeaderMap::new();
        ok.insert(names.status.clone(), "ok");
        ok.insert(names.instance.clone(), instance.clone());
        let serving = Self {
            client,
            component,
            instance,
            names,
            ok,
            ended: AtomicBool::new(false),
            crash: Mutex::new(Some(tx)),
            in_flight: AtomicUsize::new(0),
            idle: Notify::new(),
        };
        (serving, rx)
    }

    /// Refuses calls of this period from now on.
    pub fn end(&self) {
        self.ended.store(true, Ordering::SeqCst);
    }

    /// Waits until no call of this period runs.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            notified.await;
        }
    }

    /// Counts a call in flight; call before spawning [`handle`](Self::handle), so that a stop
    /// never misses a call that was delivered but has not begun.
    pub fn enter(&self) {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
    }

    /// Answers one call message counted by [`enter`](Self::enter).
    pub async fn handle(&self, message: Message) {
        self.answer(message).await;
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.idle.notify_waiters();
        }
    }

    /// Tells the caller this instance no longer serves.
    pub async fn refuse(&self, message: Message) {
        self.reply_error(
            message.reply,
            "not_running",
            None,
            "the instance is not running; retry".to_owned(),
        )
        .await;
    }

    async fn answer(&self, message: Message) {
        if self.ended.load(Ordering::SeqCst) {
            return self.refuse(message).await;
        }
        if message.subject.ends_with(".http") {
            return self.answer_http(message).await;
        }
        if !message.subject.ends_with(".call") {
            let why = format!(
                "{} is not a data-plane operation; use .call or .http",
                message.subject
            );
            return self
                .reply_error(message.reply, "bad_request", None, why)
                .await;
        }
        let reply = message.reply;
        let Some(export) = message
            .headers
            .as_ref()
            .and_then(|h| h.get(self.names.export.clone()))
            .map(HeaderValue::as_str)
            .filter(|e| !e.is_empty())
        else {
            let why = format!(
                "missing header {}: name the export to call",
                dataplane::EXPORT
            );
            return self.reply_error(reply, "bad_request", None, why).await;
        };
        if message.payload.len() > dataplane::MAX_CALL_BYTES {
            let why = format!(
                "call body is {} bytes; the limit is {}",
                message.payload.len(),
                dataplane::MAX_CALL_BYTES
            );
            return self
                .reply_error(reply, "payload_too_large", None, why)
                .await;
        }
        let args = if message.payload.iter().all(u8::is_ascii_whitespace) {
            Value::Array(Vec::new())
        } else {
            match serde_json::from_slice::<Value>(&message.payload) {
                Ok(args) => args,
                Err(e) => {
                    let why = format!("the body must be a JSON array of arguments: {e}");
                    return self.reply_error(reply, "bad_request", None, why).await;
                }
            }
        };
        match self.component.invoke(export, args).await {
            Ok(value) => {
                let Some(reply) = reply else { return };
                let body = match serde_json::to_vec(&value) {
                    Ok(body) => body,
                    Err(e) => {
                        let why = format!("cannot encode the result: {e}");
                        return self.reply_error(Some(reply), "internal", None, why).await;
                    }
                };
                if let Err(e) = self
                    .client
                    .publish_with_headers(reply, self.ok.clone(), Bytes::from(body))
                    .await
                {
                    tracing::debug!(error = %e, "cannot send a call reply");
                }
            }
            Err(error) => self.fail(reply, export, error).await,
        }
    }

    /// Serves an HTTP request (head in the `Trellis-Http` header, body as payload) with the
    /// component's `wasi:http/incoming-handler`.
    async fn answer_http(&self, message: Message) {
        let reply = message.reply;
        let head = message
            .headers
            .as_ref()
            .and_then(|h| h.get(rpc::HTTP_HEAD))
            .map(HeaderValue::as_str)
            .map(serde_json::from_str::<HttpRequestHead>);
        let head = match head {
            Some(Ok(head)) => head,
            Some(Err(e)) => {
                let why = format!("header {} is not a request head: {e}", rpc::HTTP_HEAD);
                return self.reply_error(reply, "bad_request", None, why).await;
            }
            None => {
                let why = format!("missing header {}", rpc::HTTP_HEAD);
                return self.reply_error(reply, "bad_request", None, why).await;
            }
        };
        if message.payload.len() > rpc::MAX_BODY_BYTES {
            let why = format!(
                "request body is {} bytes; the limit is {}",
                message.payload.len(),
                rpc::MAX_BODY_BYTES
            );
            return self
                .reply_error(reply, "payload_too_large", None, why)
                .await;
        }
        match self.component.handle_http(&head, message.payload).await {
            Ok((head, body)) => {
                let Some(reply) = reply else { return };
                let mut headers = self.ok.clone();
                match serde_json::to_string(&head) {
                    Ok(head) => headers.insert(rpc::HTTP_HEAD, header_safe(&head)),
                    Err(e) => {
                        let why = format!("cannot encode the response head: {e}");
                        return self.reply_error(Some(reply), "internal", None, why).await;
                    }
                }
                if let Err(e) = self.client.publish_with_headers(reply, headers, body).await {
                    tracing::debug!(error = %e, "cannot send an HTTP reply");
                }
            }
            Err(error) => {
                self.fail(reply, "wasi:http/incoming-handler#handle", error)
                    .await
            }
        }
    }

    /// Answers a failed invocation; a crash ends the serving period and tells the supervisor.
    async fn fail(&self, reply: Option<async_nats::Subject>, export: &str, error: InvokeError) {
        if error.is_crash() {
            let reason = error.reason();
            let detail = crash_detail(&error);
            self.reply_error(reply, "crashed", Some(&reason), detail.clone())
                .await;
            // Only the first crash of the period reaches the supervisor.
            self.end();
            let tx = self
                .crash
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            if let Some(tx) = tx {
                let _ = tx.send(Crash {
                    reason,
                    detail,
                    export: export.to_owned(),
                });
            }
            return;
        }
        let code = match &error {
            InvokeError::Instantiation(_) | InvokeError::Host { .. } => "internal".to_owned(),
            _ => error.reason(),
        };
        self.reply_error(reply, &code, None, error.to_string())
            .await;
    }

    async fn reply_error(
        &self,
        reply: Option<async_nats::Subject>,
        code: &str,
        reason: Option<&str>,
        message: String,
    ) {
        let Some(reply) = reply else { return };
        let names = &self.names;
        let mut headers = HeaderMap::new();
        headers.insert(names.status.clone(), "error");
        headers.insert(names.error_code.clone(), header_safe(code));
        if let Some(reason) = reason {
            headers.insert(names.reason.clone(), header_safe(reason));
        }
        headers.insert(names.instance.clone(), self.instance.clone());
        if let Err(e) = self
            .client
            .publish_with_headers(reply, headers, Bytes::from(message))
            .await
        {
            tracing::debug!(error = %e, "cannot send a call reply");
        }
    }
}

/// The data plane's header names.
#[derive(Debug)]
struct Names {
    export: HeaderName,
    status: HeaderName,
    error_code: HeaderName,
    reason: HeaderName,
    instance: HeaderName,
}

impl Names {
    fn new() -> Self {
        Self {
            export: HeaderName::from_static(dataplane::EXPORT),
            status: HeaderName::from_static(dataplane::STATUS),
            error_code: HeaderName::from_static(dataplane::ERROR_CODE),
            reason: HeaderName::from_static(dataplane::REASON),
            instance: HeaderName::from_static(dataplane::INSTANCE),
        }
    }
}

/// The crash's description, with the tail of the guest's stderr when it wrote any (a panic's
/// message is in the error itself).
fn crash_detail(error: &InvokeError) -> String {
    let mut detail = error.to_string();
    if !matches!(error, InvokeError::Panic { .. })
        && let Some(output) = error.output()
    {
        let stderr = output.stderr.trim();
        if !stderr.is_empty() {
            let tail: String = stderr
                .chars()
                .rev()
                .take(1024)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            detail.push_str("; stderr: ");
            detail.push_str(&tail);
        }
    }
    detail
}

/// A header value cannot hold line breaks.
fn header_safe(value: &str) -> String {
    value.replace(['\r', '\n'], " ")
}
