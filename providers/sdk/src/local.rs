//! A provider embedded in another process (a host), called there without NATS.
//!
//! An embedded provider is the same provider as the standalone binary: it connects to NATS on
//! its own connection, follows the assignments, serves its RPC subjects in its queue group
//! (remote hosts reach it like any replica) and records its facts. In addition the process that
//! embeds it gets a [`LocalProvider`] handle, through which its own instances' calls skip the
//! NATS round trip to a second process. Every call through the handle passes the same checks as
//! one from the network: body size, then an assignment in the provider's own projection.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::FutureExt as _;
use trellis_schemas::{Capability, ProviderId, ProviderName};

use trellis_schemas::dataplane::DataError;

use crate::rpc::{Outcome, Provider, Request, check_and_handle_request};
use crate::{Context, InFlight};

/// A boxed call future.
pub type LocalFuture<'a> = Pin<Box<dyn Future<Output = Outcome> + Send + 'a>>;

/// A handle on a provider running in this process. Cloning shares it.
#[derive(Clone)]
pub struct LocalProvider {
    inner: Arc<dyn Calls>,
}

impl fmt::Debug for LocalProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LocalProvider")
            .field("name", self.inner.name())
            .field("id", self.inner.id())
            .field("serving", &self.inner.serving())
            .finish()
    }
}

impl LocalProvider {
    pub(crate) fn new<P: Provider>(
        provider: Arc<P>,
        ctx: Context,
        in_flight: Arc<InFlight>,
        rpc: &'static [Capability],
    ) -> (Self, ServingFlag) {
        let serving = Arc::new(AtomicBool::new(true));
        let served = Served {
            provider,
            ctx,
            in_flight,
            rpc,
            serving: Arc::clone(&serving),
        };
        (
            Self {
                inner: Arc::new(served),
            },
            ServingFlag(serving),
        )
    }

    /// The provider's name (the `provider` of the assignments it serves).
    pub fn name(&self) -> &ProviderName {
        self.inner.name()
    }

    /// The provider's id.
    pub fn id(&self) -> &ProviderId {
        self.inner.id()
    }

    /// Whether it still takes calls (false from the start of its drain).
    pub fn serving(&self) -> bool {
        self.inner.serving()
    }

    /// Performs one call after the provider's checks, exactly as a call from NATS would be.
    pub fn call(&self, request: Request) -> LocalFuture<'_> {
        self.inner.call(request)
    }
}

/// Ends the handle's service when the provider starts draining.
#[derive(Debug)]
pub(crate) struct ServingFlag(Arc<AtomicBool>);

impl ServingFlag {
    pub(crate) fn stop(&self) {
        self.0.store(false, Ordering::SeqCst);
    }
}

trait Calls: Send + Sync + 'static {
    fn name(&self) -> &ProviderName;
    fn id(&self) -> &ProviderId;
    fn serving(&self) -> bool;
    fn call(&self, request: Request) -> LocalFuture<'_>;
}

struct Served<P> {
    provider: Arc<P>,
    ctx: Context,
    in_flight: Arc<InFlight>,
    rpc: &'static [Capability],
    serving: Arc<AtomicBool>,
}

impl<P: Provider> Calls for Served<P> {
    fn name(&self) -> &ProviderName {
        &self.ctx.name
    }

    fn id(&self) -> &ProviderId {
        &self.ctx.id
    }

    fn serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }

    fn call(&self, request: Request) -> LocalFuture<'_> {
        Box::pin(async move {
            if !self.serving() {
                return Err(DataError::unavailable(format!(
                    "provider `{}` ({}) is stopping",
                    self.ctx.name, self.ctx.id
                )));
            }
            let capability = request.request.capability();
            if !self.rpc.contains(&capability) {
                return Err(DataError::invalid(format!(
                    "provider `{}` does not serve {capability}",
                    self.ctx.name
                )));
            }
            let _guard = self.in_flight.enter();
            // A call from NATS runs in a task of its own, so a panic ends that task only; here
            // the caller's task runs it, and the panic becomes this call's error instead.
            let call = check_and_handle_request(&*self.provider, &self.ctx, request);
            match std::panic::AssertUnwindSafe(call).catch_unwind().await {
                Ok(result) => result,
                Err(_) => {
                    tracing::error!(provider = %self.ctx.name, "the provider panicked in a call");
                    Err(DataError::internal(format!(
                        "provider `{}` failed while handling the call",
                        self.ctx.name
                    )))
                }
            }
        })
    }
}
