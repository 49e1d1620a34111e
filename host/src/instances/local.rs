//! The instances serving in this process, for the `http-server` provider when it is embedded
//! here: it hands them requests directly, with no NATS round trip.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use trellis_bus::RouteTable;
use trellis_provider_http_server::{LocalFuture, LocalTargets};
use trellis_schemas::capability::rpc::{HttpMessage, HttpRequestHead};
use trellis_schemas::link::Link;
use trellis_schemas::{AssignmentTarget, ComponentName, InstanceId};

use super::call::Serving;

/// The serving periods of this host's instances, by component. Cloning shares them.
#[derive(Debug, Clone)]
pub(crate) struct LocalInstances {
    inner: Arc<Inner>,
}

/// The serving periods of one component's local instances, with the digest each runs.
type Servings = Vec<(InstanceId, String, Arc<Serving>)>;

#[derive(Debug)]
struct Inner {
    by_component: RwLock<HashMap<ComponentName, Servings>>,
    /// Spreads a component's requests over its local instances.
    next: AtomicUsize,
    /// The host's rollout routes, shared with an embedded http-server.
    routes: RouteTable,
}

impl LocalInstances {
    /// No instances yet; `routes` is the host's table of rollout routes.
    pub(crate) fn new(routes: RouteTable) -> Self {
        Self {
            inner: Arc::new(Inner {
                by_component: RwLock::default(),
                next: AtomicUsize::new(0),
                routes,
            }),
        }
    }

    /// Registers a serving period of `instance` (replacing an earlier one).
    pub(crate) fn add(
        &self,
        component: &ComponentName,
        digest: &str,
        instance: &InstanceId,
        serving: &Arc<Serving>,
    ) {
        let mut map = self
            .inner
            .by_component
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let list = map.entry(component.clone()).or_default();
        list.retain(|(id, _, _)| id != instance);
        list.push((instance.clone(), digest.to_owned(), Arc::clone(serving)));
    }

    /// Forgets `instance`'s serving period.
    pub(crate) fn remove(&self, component: &ComponentName, instance: &InstanceId) {
        let mut map = self
            .inner
            .by_component
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(list) = map.get_mut(component) {
            list.retain(|(id, _, _)| id != instance);
            if list.is_empty() {
                map.remove(component);
            }
        }
    }

    /// A serving period of this process that serves `target` (of version `digest`, when
    /// given), if any.
    fn pick(&self, target: &AssignmentTarget, digest: Option<&str>) -> Option<Arc<Serving>> {
        let map = self
            .inner
            .by_component
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        match target {
            AssignmentTarget::Component(name) => {
                self.next_serving(map.get(name)?, digest, |_| true)
            }
            AssignmentTarget::Instance(id) => map
                .values()
                .flatten()
                .find(|(i, _, s)| i == id && s.serving())
                .map(|(_, _, s)| Arc::clone(s)),
        }
    }
}

impl LocalInstances {
    /// A serving period of this process for a call through `link`: an instance of its target
    /// of a version the link accepts (and of version `digest`, when a rollout picked one).
    pub(crate) fn pick_linked(&self, link: &Link, digest: Option<&str>) -> Option<Arc<Serving>> {
        let map = self
            .inner
            .by_component
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        self.next_serving(map.get(&link.target)?, digest, |s| {
            link.accepts(&s.component.manifest().version)
        })
    }

    /// Round robin over one component's serving periods: the next that still serves, is of
    /// version `digest` when given, and that `accept` takes.
    fn next_serving(
        &self,
        list: &Servings,
        digest: Option<&str>,
        accept: impl Fn(&Serving) -> bool,
    ) -> Option<Arc<Serving>> {
        let start = self.inner.next.fetch_add(1, Ordering::Relaxed);
        (0..list.len())
            .map(|i| &list[(start + i) % list.len()])
            .find(|(_, d, s)| digest.is_none_or(|want| want == d) && s.serving() && accept(s))
            .map(|(_, _, s)| Arc::clone(s))
    }

    /// The host's table of rollout routes.
    pub(crate) fn route_table(&self) -> &RouteTable {
        &self.inner.routes
    }
}

impl LocalTargets for LocalInstances {
    fn serve(
        &self,
        target: &AssignmentTarget,
        digest: Option<&str>,
        request: HttpMessage<HttpRequestHead>,
    ) -> Result<LocalFuture<'_>, HttpMessage<HttpRequestHead>> {
        match self.pick(target, digest) {
            Some(serving) => Ok(Box::pin(async move { serving.serve_http(request).await })),
            None => Err(request),
        }
    }

    fn routes(&self) -> Option<RouteTable> {
        Some(self.inner.routes.clone())
    }
}
