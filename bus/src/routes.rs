//! The traffic routes of the rollouts in progress, followed from their facts: what every router
//! of component requests consults before it picks a subject.

use std::sync::{Arc, PoisonError, RwLock};

use tokio::task::JoinHandle;
use trellis_schemas::dataplane::{self, Op};
use trellis_schemas::rollout::Routes;
use trellis_schemas::{ComponentName, Lattice, subject};

/// The routes of the lattice's rollouts, kept current by a task that follows the rollout facts.
/// Cloning shares the table. An empty table (no rollout, or the facts not read yet) routes every
/// request to the component subject, which every version serves.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Arc<RwLock<Routes>>,
}

impl RouteTable {
    /// A table that follows the rollout facts of `lattice` until the returned task is aborted.
    pub fn follow(client: &async_nats::Client, lattice: &Lattice) -> (Self, JoinHandle<()>) {
        let table = Self::default();
        let routes = Arc::clone(&table.routes);
        let client = client.clone();
        let lattice = lattice.clone();
        let task = tokio::spawn(async move {
            let next = {
                let routes = Arc::clone(&routes);
                move || {
                    routes
                        .read()
                        .unwrap_or_else(PoisonError::into_inner)
                        .last_seq()
                        + 1
                }
            };
            crate::follow(
                &client,
                &subject::events_stream(&lattice),
                &[subject::rollout_events(&lattice)],
                next,
                |followed| {
                    let mut routes = routes.write().unwrap_or_else(PoisonError::into_inner);
                    match followed.event {
                        Ok(event) => {
                            routes.apply(followed.seq, event.time, &event.data);
                        }
                        Err(e) => {
                            // Move past it, so that it is not read again.
                            tracing::warn!(seq = followed.seq, error = %e, "undecodable rollout fact");
                            routes.skip(followed.seq);
                        }
                    }
                },
            )
            .await;
        });
        (table, task)
    }

    /// The digest a request to `component` goes to, chosen by the weights of the rollout in
    /// progress; `None` when no rollout splits its traffic (any version may serve it).
    pub fn pick(&self, component: &ComponentName) -> Option<String> {
        let routes = self.routes.read().unwrap_or_else(PoisonError::into_inner);
        let route = routes.get(component)?;
        Some(route.pick(fastrand::u32(0..10_000)).to_owned())
    }

    /// The version a request `op` to `component` goes to while a rollout splits its traffic:
    /// its digest and that version's subject. `None`: the component subject, any version.
    pub fn version(
        &self,
        lattice: &Lattice,
        component: &ComponentName,
        op: Op,
    ) -> Option<(String, String)> {
        let digest = self.pick(component)?;
        let subject = dataplane::version(lattice, component, &digest, op);
        Some((digest, subject))
    }
}
