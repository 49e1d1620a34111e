//! Serving capability calls: the caller's identity, the assignment check, size limits and
//! replies, through the data-plane codec ([`trellis_bus::dataplane`]).

use std::fmt;
use std::sync::Arc;

use async_nats::Message;
use trellis_bus::dataplane::{self as codec, Identity};
use trellis_bus::direct::{self, Direct};
use trellis_bus::telemetry::{Kind, Span};
use trellis_schemas::capability::rpc::{CapabilityRequest, CapabilityResponse};
use trellis_schemas::dataplane::{DataError, ErrorCode, MAX_BODY_BYTES, span_attributes};
use trellis_schemas::{Assignment, Capability, InstanceId};

use crate::Context;

/// Who makes a call: the instance and its component, as the host names them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The calling instance.
    pub instance: InstanceId,
    /// Its component.
    pub component: String,
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "instance {} of {}", self.instance, self.component)
    }
}

/// One capability call, checked: the caller holds `assignment`, served by this provider.
#[derive(Debug, Clone)]
pub struct Call {
    /// The assignment that grants it, as this provider's projection has it.
    pub assignment: Assignment,
    /// Who calls.
    pub caller: Caller,
    /// What is asked (carrying at most [`MAX_BODY_BYTES`] of data).
    pub request: CapabilityRequest,
}

impl Call {
    /// The capability called.
    pub fn capability(&self) -> Capability {
        self.request.capability()
    }

    /// A setting of the assignment's configuration.
    pub fn config(&self, key: &str) -> Option<&str> {
        self.assignment.config.get(key).map(String::as_str)
    }
}

/// The answer to a call: a typed response, or a typed error.
pub type Outcome = Result<CapabilityResponse, DataError>;

/// What a provider does with the calls it serves, and in the background.
pub trait Provider: Send + Sync + 'static {
    /// Answers one call; the SDK has checked the caller's assignment and the body's size.
    fn handle(&self, call: Call) -> impl Future<Output = Outcome> + Send;

    /// For a call over NATS whose caller reads a backend's own replies
    /// ([`trellis_bus::direct`]), after the same checks as [`handle`](Self::handle): a request
    /// to send to the backend with the caller's reply subject, so that the backend answers the
    /// caller itself and the call crosses NATS once less. `Ok(None)` (the default) to answer
    /// with [`handle`](Self::handle); an error is answered as from `handle`.
    fn direct(
        &self,
        call: &Call,
    ) -> impl Future<Output = Result<Option<Direct>, DataError>> + Send {
        let _ = call;
        async { Ok(None) }
    }

    /// Background work (listeners, subscriptions), started once the provider serves. It should
    /// return soon after [`Context::shutdown`] completes; the SDK waits for it (bounded).
    fn run(self: Arc<Self>, ctx: Context) -> impl Future<Output = ()> + Send {
        let _ = ctx;
        async {}
    }
}

/// Checks and answers one call message.
pub(crate) async fn serve_call<P: Provider>(
    provider: &P,
    ctx: &Context,
    capability: Capability,
    message: Message,
) {
    let Some(reply_to) = message.reply.clone() else {
        tracing::debug!(subject = %message.subject, "call without a reply subject; ignored");
        return;
    };
    let answer = match codec::read_capability_request(capability, &message) {
        Ok((identity, request)) => {
            let request = Request { identity, request };
            let direct = direct::accepts_direct(&message);
            check_and_answer(provider, ctx, request, direct).await
        }
        Err(e) => Err(e),
    };
    let outcome = match answer {
        Ok(Answer::Direct(request)) => {
            if let Err(e) = direct::send(&ctx.client, request, reply_to.clone()).await {
                // The backend's request did not leave: the caller gets the provider's error.
                let error = DataError::unavailable(format!("cannot reach the backend: {e}"));
                codec::reply_error(&ctx.client, Some(reply_to), &error, None).await;
            }
            return;
        }
        Ok(Answer::Response(response)) => Ok(response),
        Err(e) => Err(e),
    };
    let encoded = outcome.and_then(|response| {
        let (headers, body) = codec::capability_reply(&response)?;
        // A reply NATS would refuse is turned into an error the caller can act on.
        // Only a large reply can exceed the server's limit: the server's information is a
        // copy of several strings, not read for every reply.
        if body.len() > MAX_BODY_BYTES / 2 {
            let max = ctx.client.server_info().max_payload;
            let size = body.len() + 1024;
            if size > max {
                return Err(DataError::too_large(format!(
                    "the reply is {size} bytes; this NATS server carries at most {max}"
                )));
            }
        }
        Ok((headers, body))
    });
    match encoded {
        Ok((headers, body)) => codec::reply_ok(&ctx.client, Some(reply_to), headers, body).await,
        Err(error) => codec::reply_error(&ctx.client, Some(reply_to), &error, None).await,
    }
}

/// One call as it reaches a provider, before its checks: read from NATS (the identity headers
/// and the decoded body) or handed over by the process the provider is embedded in.
#[derive(Debug, Clone)]
pub struct Request {
    /// Who calls, as its host names it, with the assignment and fact sequence the host
    /// resolved.
    pub identity: Identity,
    /// What is asked.
    pub request: CapabilityRequest,
}

/// The checks every call passes, however it arrived: the data's size, then an assignment in
/// this provider's own projection granting the capability to the caller through this provider.
pub(crate) async fn check_and_handle_request<P: Provider>(
    provider: &P,
    ctx: &Context,
    request: Request,
) -> Outcome {
    check_and_answer(provider, ctx, request, false)
        .await
        .and_then(|answer| match answer {
            Answer::Response(response) => Ok(response),
            Answer::Direct(_) => Err(DataError::internal(
                "the provider answered directly a call that did not ask for it",
            )),
        })
}

/// How a checked call is answered: by the provider, or by the backend ([`Provider::direct`]).
enum Answer {
    Response(CapabilityResponse),
    Direct(Direct),
}

/// [`check_and_handle_request`], answered directly when `direct` (the caller reads direct
/// replies) and the provider offers it.
async fn check_and_answer<P: Provider>(
    provider: &P,
    ctx: &Context,
    request: Request,
    direct: bool,
) -> Result<Answer, DataError> {
    let started = std::time::Instant::now();
    let capability = request.request.capability();
    let mut span = Span::start(
        Kind::Server,
        request.identity.traceparent.as_deref(),
        || format!("{} {capability}", ctx.name),
    );
    let traced = span.recording();
    if traced {
        span.set(
            span_attributes::INSTANCE,
            request.identity.instance.to_string(),
        );
        span.set(
            span_attributes::COMPONENT,
            request.identity.component.clone(),
        );
    }
    let outcome = check_and_handle(provider, ctx, request, direct).await;
    // A call answered directly counts as `ok`: the provider's part of it succeeded.
    let code = outcome.as_ref().map_or_else(|e| e.code.as_str(), |_| "ok");
    if traced && let Err(e) = &outcome {
        span.fail(format!("{code}: {}", e.message));
    }
    ctx.calls.answered(capability, code, started.elapsed());
    outcome
}

async fn check_and_handle<P: Provider>(
    provider: &P,
    ctx: &Context,
    request: Request,
    direct: bool,
) -> Result<Answer, DataError> {
    let Request { identity, request } = request;
    let Identity {
        instance,
        component,
        assignment,
        min_seq,
        traceparent,
    } = identity;
    let capability = request.capability();
    request.check_size()?;
    let caller = Caller {
        instance,
        component,
    };
    let claimed = assignment.as_deref().unwrap_or("-");
    let Some(record) = ctx
        .assignments
        .lookup_at(&caller.instance, &caller.component, capability, min_seq)
        .await
    else {
        tracing::info!(%caller, %capability, assignment = %claimed, "call refused: no assignment");
        let error = DataError::denied(format!(
            "no assignment grants {capability} to {caller} through provider `{}`",
            ctx.name
        ));
        let reason = format!(
            "no assignment of component {} through this provider",
            caller.component
        );
        let trace = traceparent.as_deref();
        Box::pin(record_denial(
            ctx,
            &caller.instance,
            capability,
            trace,
            &error,
            reason,
        ))
        .await;
        return Err(error);
    };
    if claimed != "-" && claimed != record.assignment.assignment_id.as_str() {
        tracing::debug!(%caller, host_says = %claimed, provider_says = %record.assignment.assignment_id, "the host resolved another assignment");
    }
    // Kept for the audit of a refusal past the assignment check (a bucket, subject or host the
    // assignment does not name).
    let instance = caller.instance.clone();
    let call = Call {
        assignment: record.assignment,
        caller,
        request,
    };
    let offered = if direct {
        provider.direct(&call).await
    } else {
        Ok(None)
    };
    let outcome = match offered {
        Ok(Some(request)) => Ok(Answer::Direct(request)),
        // Boxed, as the refusals' audit above and below: a call's future is moved once when it
        // is made, so its size is copied on every call, and these parts would size it.
        Ok(None) => Box::pin(provider.handle(call)).await.map(Answer::Response),
        Err(e) => Err(e),
    };
    if let Err(error) = &outcome
        && error.code == ErrorCode::AccessDenied
    {
        let reason = error.message.clone();
        let trace = traceparent.as_deref();
        Box::pin(record_denial(
            ctx, &instance, capability, trace, error, reason,
        ))
        .await;
    }
    outcome
}

/// Records a refused call on the audit stream: who asked, for what, and why (never a payload).
async fn record_denial(
    ctx: &Context,
    instance: &InstanceId,
    capability: Capability,
    traceparent: Option<&str>,
    error: &DataError,
    reason: String,
) {
    let mut event = trellis_schemas::audit::AuditEvent::new(
        trellis_schemas::audit::AuditType::Denied,
        format!("provider/{}/{}", ctx.name, ctx.id),
        error.code.as_str(),
    );
    event.target = Some(format!("instance:{instance}"));
    event.capability = Some(capability.as_str().to_owned());
    event.provider = Some(ctx.name.to_string());
    event.reason = Some(trellis_schemas::audit::short_reason(&reason));
    event.trace_id = traceparent
        .and_then(trellis_schemas::dataplane::trace_id)
        .map(str::to_owned);
    ctx.audit.record(&event).await;
}
