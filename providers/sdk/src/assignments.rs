//! The assignments a provider serves, followed from the lattice's facts.
//!
//! A provider never trusts the host's word for an assignment: it reads the `assignment.*` facts
//! itself (from the beginning of the stream, then live), folds them with the lattice's own fold
//! ([`trellis_schemas::apply`]) and checks every call against that projection.

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_nats::jetstream;
use futures::TryStreamExt as _;
use tokio::sync::{oneshot, watch};
use trellis_schemas::{
    AssignmentRecord, Capability, Fact, InstanceId, Lattice, Projection, ProviderName, apply,
    subject,
};

/// How long a lookup waits for the follower to reach the fact sequence the caller gives.
pub const MIN_SEQ_WAIT: Duration = Duration::from_secs(2);

/// The assignments of the lattice as this provider knows them. Cloning shares them.
#[derive(Debug, Clone)]
pub struct Assignments {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    name: ProviderName,
    projection: RwLock<Projection>,
    /// The stream sequence of the last fact applied; changes on every applied fact.
    seq: watch::Sender<u64>,
}

impl Assignments {
    /// An empty view for provider `name` (nothing followed yet).
    pub fn new(name: ProviderName) -> Self {
        let (seq, _) = watch::channel(0);
        Self {
            inner: Arc::new(Shared {
                name,
                projection: RwLock::new(Projection::new()),
                seq,
            }),
        }
    }

    /// The provider whose assignments count.
    pub fn provider(&self) -> &ProviderName {
        &self.inner.name
    }

    /// Applies one fact; returns whether it changed anything.
    pub fn apply(&self, fact: &Fact) -> bool {
        let changed = {
            let mut projection = self
                .inner
                .projection
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            apply(&mut projection, fact)
        };
        if changed {
            self.inner.seq.send_replace(fact.seq);
        }
        changed
    }

    /// The stream sequence of the last assignment fact applied (0: none).
    pub fn last_seq(&self) -> u64 {
        *self.inner.seq.borrow()
    }

    /// Notifications: the receiver sees a new value after every applied fact (a grant or a
    /// revocation, of any provider). Compare [`Assignments::mine`] before and after.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.inner.seq.subscribe()
    }

    /// The assignment granting `capability` to `instance` of `component`, if it is served by
    /// this provider. An assignment made for the instance itself wins over its component's, as
    /// on the host: when the winner names another provider, this one grants nothing.
    pub fn lookup(
        &self,
        instance: &InstanceId,
        component: &str,
        capability: Capability,
    ) -> Option<AssignmentRecord> {
        let projection = self
            .inner
            .projection
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        projection
            .assignment_for(instance, component, capability)
            .filter(|r| r.assignment.provider == self.inner.name)
            .cloned()
    }

    /// Like [`lookup`](Self::lookup), after waiting (at most [`MIN_SEQ_WAIT`]) until the fact at
    /// `min_seq` has been applied, so that a grant the caller already knows of is never
    /// refused for being too recent.
    pub async fn lookup_at(
        &self,
        instance: &InstanceId,
        component: &str,
        capability: Capability,
        min_seq: Option<u64>,
    ) -> Option<AssignmentRecord> {
        if let Some(min_seq) = min_seq
            && self.last_seq() < min_seq
        {
            // Boxed: rarely taken, and it would size every call's future.
            Box::pin(self.wait_for(min_seq, MIN_SEQ_WAIT)).await;
        }
        self.lookup(instance, component, capability)
    }

    /// Waits until the fact at `seq` has been applied, up to `timeout`; returns whether it was.
    pub async fn wait_for(&self, seq: u64, timeout: Duration) -> bool {
        if self.last_seq() >= seq {
            return true;
        }
        let mut rx = self.changes();
        matches!(
            tokio::time::timeout(timeout, rx.wait_for(|s| *s >= seq)).await,
            Ok(Ok(_))
        )
    }

    /// Every assignment in force that names this provider, for `capability`.
    pub fn mine(&self, capability: Capability) -> Vec<AssignmentRecord> {
        let projection = self
            .inner
            .projection
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        projection
            .assignments()
            .values()
            .filter(|r| {
                r.assignment.provider == self.inner.name && r.assignment.capability == capability
            })
            .cloned()
            .collect()
    }

    /// How many assignments in force name this provider.
    pub fn count_mine(&self) -> usize {
        let projection = self
            .inner
            .projection
            .read()
            .unwrap_or_else(PoisonError::into_inner);
        projection
            .assignments()
            .values()
            .filter(|r| r.assignment.provider == self.inner.name)
            .count()
    }

    /// Follows the lattice's assignment facts from the beginning of the stream, in a background
    /// task that reopens its reader after failures. Returns once the view has caught up with the
    /// stream as it was when following began.
    pub async fn follow(&self, client: async_nats::Client, lattice: Lattice) {
        let (caught_up, wait) = oneshot::channel();
        let this = self.clone();
        tokio::spawn(async move { this.run(client, lattice, caught_up).await });
        let _ = wait.await;
    }

    async fn run(
        self,
        client: async_nats::Client,
        lattice: Lattice,
        caught_up: oneshot::Sender<()>,
    ) {
        let js = trellis_bus::jetstream(client.clone());
        let stream = subject::events_stream(&lattice);
        let filter = subject::assignment_events(&lattice);
        let mut caught_up = Some(caught_up);
        if !has_backlog(&js, &stream, &filter).await {
            tracing::debug!("no assignment facts yet");
            if let Some(tx) = caught_up.take() {
                let _ = tx.send(());
            }
        }
        trellis_bus::follow(
            &client,
            &stream,
            std::slice::from_ref(&filter),
            || self.last_seq() + 1,
            |followed| {
                match followed.event {
                    Ok(event) => {
                        let fact = Fact {
                            seq: followed.seq,
                            event,
                        };
                        if self.apply(&fact) {
                            tracing::debug!(seq = fact.seq, kind = %fact.event.kind().short_name(), "assignment fact");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(seq = followed.seq, error = %e, "skipping an undecodable fact");
                        // Still count it as read, so that waiters are not held up.
                        self.inner.seq.send_if_modified(|s| {
                            let newer = followed.seq > *s;
                            *s = (*s).max(followed.seq);
                            newer
                        });
                    }
                }
                if followed.pending == 0
                    && let Some(tx) = caught_up.take()
                {
                    let _ = tx.send(());
                }
            },
        )
        .await;
    }
}

/// Whether the stream holds any message matching `filter` (errors count as "maybe": the
/// reader will tell).
async fn has_backlog(js: &jetstream::Context, stream: &str, filter: &str) -> bool {
    let Ok(stream) = js.get_stream(stream).await else {
        return true;
    };
    match stream.info_with_subjects(filter).await {
        Ok(mut subjects) => !matches!(subjects.try_next().await, Ok(None)),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use trellis_schemas::fact::AssignmentRevoked;
    use trellis_schemas::{
        Assignment, AssignmentId, AssignmentTarget, ComponentName, Event, FactData,
    };

    use super::*;

    fn grant(id: &str, target: AssignmentTarget, provider: &str) -> Event {
        Event::new(
            "/test",
            FactData::AssignmentGranted(Assignment {
                assignment_id: AssignmentId::new(id).expect("id"),
                target,
                capability: Capability::KeyValue,
                provider: ProviderName::new(provider).expect("name"),
                config: BTreeMap::from([("bucket".to_owned(), id.to_owned())]),
            }),
        )
    }

    #[tokio::test]
    async fn lookups_honour_provider_target_and_min_seq() {
        let view = Assignments::new(ProviderName::new("kv").expect("name"));
        let instance = InstanceId::new("i1").expect("id");
        let component = AssignmentTarget::Component(ComponentName::new("c").expect("name"));
        view.apply(&Fact {
            seq: 3,
            event: grant("a1", component, "kv"),
        });
        let found = view
            .lookup(&instance, "c", Capability::KeyValue)
            .expect("granted");
        assert_eq!(found.assignment.assignment_id.as_str(), "a1");
        assert!(view.lookup(&instance, "d", Capability::KeyValue).is_none());
        assert!(view.lookup(&instance, "c", Capability::Messaging).is_none());

        // A grant to the instance itself wins; it names another provider, so not ours.
        let later = view.clone();
        let pending = tokio::spawn(async move {
            later
                .lookup_at(
                    &InstanceId::new("i1").expect("id"),
                    "c",
                    Capability::KeyValue,
                    Some(5),
                )
                .await
        });
        tokio::task::yield_now().await;
        view.apply(&Fact {
            seq: 5,
            event: grant("a2", AssignmentTarget::Instance(instance.clone()), "other"),
        });
        assert!(pending.await.expect("joins").is_none());
        assert_eq!(view.count_mine(), 1);

        view.apply(&Fact {
            seq: 6,
            event: Event::new(
                "/test",
                FactData::AssignmentRevoked(AssignmentRevoked {
                    assignment_id: AssignmentId::new("a1").expect("id"),
                    reason: "requested".into(),
                }),
            ),
        });
        assert!(view.mine(Capability::KeyValue).is_empty());
        assert_eq!(view.last_seq(), 6);
        assert!(!view.wait_for(7, Duration::from_millis(20)).await);
    }
}
