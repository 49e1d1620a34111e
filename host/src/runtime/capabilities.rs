//! Capabilities: how a component's imports reach the outside world.
//!
//! The runtime links the capability interfaces (`wasi:keyvalue`, `wasi:http/outgoing-handler`,
//! `wasmcloud:messaging/consumer`) for every component, and forwards each call to the
//! [`CapabilityBridge`] the component was given (see
//! [`LoadedComponent::with_bridge`](super::LoadedComponent::with_bridge)). The bridge decides
//! whether the call is allowed and who serves it; a host forwards it over NATS to the assigned
//! provider. Without a bridge every capability call is refused with an access-denied error the
//! guest sees, so an embedder that grants nothing gets a component that can only compute.
//!
//! `wasi:logging` is served by the runtime itself: log records go to the invocation's captured
//! stderr, like anything else the guest prints.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use trellis_schemas::Capability;
pub use trellis_schemas::capability::rpc::{CapabilityRequest, CapabilityResponse};
use trellis_schemas::dataplane::{DataError, ErrorCode};
use wasmtime::component::Val;
use wasmtime::component::types::Type;

/// One capability call on its way to a provider: a typed request, never encoded in process.
#[derive(Debug, Clone)]
pub struct CapabilityCall {
    /// What is asked.
    pub request: CapabilityRequest,
    /// How long the caller waits for an answer.
    pub timeout: Duration,
    /// The W3C trace context of the invocation making the call, if it has one.
    pub traceparent: Option<std::sync::Arc<str>>,
}

impl CapabilityCall {
    /// The capability the call belongs to.
    pub fn capability(&self) -> Capability {
        self.request.capability()
    }
}

/// Why a capability call failed. The guest sees it as its interface's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapabilityError {
    /// No assignment grants the capability, or the provider refused the call under it.
    #[error("access denied: {0}")]
    Denied(String),
    /// The store the component named is not one it was granted.
    #[error("no such store: {0}")]
    NoSuchStore(String),
    /// No provider answered within the timeout, or none is running.
    #[error("capability unavailable: {0}")]
    Unavailable(String),
    /// The provider answered with an error.
    #[error("{code}: {message}")]
    Remote {
        /// The provider's error code.
        code: ErrorCode,
        /// Its message.
        message: String,
    },
}

impl CapabilityError {
    /// Builds the error for a provider's error reply.
    pub fn from_remote(error: DataError) -> Self {
        let DataError { code, message, .. } = error;
        match code {
            ErrorCode::AccessDenied => CapabilityError::Denied(message),
            ErrorCode::NoSuchStore => CapabilityError::NoSuchStore(message),
            ErrorCode::Unavailable => CapabilityError::Unavailable(message),
            code => CapabilityError::Remote { code, message },
        }
    }
}

/// A boxed future returned by [`CapabilityBridge::call`].
pub type BridgeFuture<'a> =
    Pin<Box<dyn Future<Output = Result<CapabilityResponse, CapabilityError>> + Send + 'a>>;

/// One call of a linked import: a function of an interface the component imports and another
/// component serves (see [`CapabilityBridge::link`]).
#[derive(Debug, Clone)]
pub struct LinkCall {
    /// The interface as the component imports it (`example:pipeline/transform@0.1.0`); shared
    /// with the linker's definition, not copied per call.
    pub interface: std::sync::Arc<str>,
    /// The function's name in it.
    pub function: std::sync::Arc<str>,
    /// The arguments, as the caller's store lowered them.
    pub params: Vec<Val>,
    /// The types of the results the caller expects.
    pub results: Vec<Type>,
    /// How long the caller can still wait (what is left of its invocation's timeout).
    pub timeout: Duration,
    /// The W3C trace context of the invocation making the call, if it has one.
    pub traceparent: Option<std::sync::Arc<str>>,
}

/// Why a linked call failed. A function returning `result<_, string>` (or an error enum or
/// variant with an `access-denied`, `unavailable` or `failed` case) gets it as its error; any
/// other ends the caller's invocation with this error, not as a crash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// No link serves the interface to this instance.
    #[error("access denied: {0}")]
    Denied(String),
    /// No instance of the target answers.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The target failed the call (it crashed, refused the arguments, was busy, …).
    #[error("{code}: {message}")]
    Failed {
        /// The data-plane error code.
        code: ErrorCode,
        /// What happened, for people.
        message: String,
    },
}

impl LinkError {
    /// The error for a target's error reply.
    pub fn from_remote(error: DataError) -> Self {
        let DataError { code, message, .. } = error;
        match code {
            ErrorCode::AccessDenied => LinkError::Denied(message),
            ErrorCode::Unavailable | ErrorCode::NotRunning | ErrorCode::NoInstance => {
                LinkError::Unavailable(message)
            }
            code => LinkError::Failed { code, message },
        }
    }

    /// The data-plane code the caller's invocation fails with when it cannot take the error.
    pub fn code(&self) -> ErrorCode {
        match self {
            LinkError::Denied(_) => ErrorCode::AccessDenied,
            LinkError::Unavailable(_) => ErrorCode::Unavailable,
            LinkError::Failed { code, .. } => *code,
        }
    }
}

/// A boxed future returned by [`CapabilityBridge::link`].
pub type LinkFuture<'a> = Pin<Box<dyn Future<Output = Result<Vec<Val>, LinkError>> + Send + 'a>>;

/// Carries a component's capability calls to whoever serves them, after checking that they are
/// allowed. Implemented by the host (over NATS, to the assigned providers) and by embedders.
pub trait CapabilityBridge: Send + Sync + fmt::Debug + 'static {
    /// Whether `capability` is granted right now (checked before work is done on the guest's
    /// behalf, e.g. before an outgoing request body is collected).
    fn allows(&self, capability: Capability) -> bool;

    /// Performs one call.
    fn call(&self, call: CapabilityCall) -> BridgeFuture<'_>;

    /// Performs one call of a linked import. Without a link there is nothing to call: the
    /// default refuses every one.
    fn link(&self, call: LinkCall) -> LinkFuture<'_> {
        Box::pin(async move {
            Err(LinkError::Denied(format!(
                "{} is not linked to any component",
                trellis_schemas::manifest::strip_version(&call.interface)
            )))
        })
    }
}

/// The bridge of a component that was granted nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct DenyAll;

impl CapabilityBridge for DenyAll {
    fn allows(&self, _: Capability) -> bool {
        false
    }

    fn call(&self, call: CapabilityCall) -> BridgeFuture<'_> {
        Box::pin(async move {
            Err(CapabilityError::Denied(format!(
                "{} is not assigned to this component",
                call.capability()
            )))
        })
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use trellis_schemas::capability::rpc::{BrokerMessage, KvRequest, MessagingRequest};

    use super::*;

    #[tokio::test]
    async fn deny_all_denies_everything() {
        let bridge = DenyAll;
        for cap in Capability::ALL {
            assert!(!bridge.allows(*cap));
        }
        let requests = [
            CapabilityRequest::KeyValue(KvRequest::Open {
                bucket: String::new(),
            }),
            CapabilityRequest::Messaging(MessagingRequest::Publish {
                message: BrokerMessage {
                    subject: "a".into(),
                    body: Bytes::new(),
                    reply_to: None,
                },
            }),
        ];
        for request in requests {
            let cap = request.capability();
            let err = bridge
                .call(CapabilityCall {
                    request,
                    timeout: Duration::from_secs(1),
                    traceparent: None,
                })
                .await
                .expect_err("denied");
            assert!(matches!(err, CapabilityError::Denied(m) if m.contains(cap.as_str())));
        }
    }

    #[test]
    fn remote_codes_map_to_errors() {
        assert!(matches!(
            CapabilityError::from_remote(DataError::new(ErrorCode::AccessDenied, "x")),
            CapabilityError::Denied(_)
        ));
        assert!(matches!(
            CapabilityError::from_remote(DataError::new(ErrorCode::Upstream, "x")),
            CapabilityError::Remote {
                code: ErrorCode::Upstream,
                ..
            }
        ));
    }
}
