//! Capability calls over NATS, checked against the assignments the host follows.
//!
//! The host keeps a projection of the lattice's `assignment.*` facts ([`Assignments`]), fed by
//! a reader of the fact stream and by the assignments a start command carries. Every capability
//! call of an instance is checked there first: without an assignment the guest gets an
//! access-denied error and nothing leaves the host. With one, the call goes to the assigned
//! provider's subject (`trellis.rpc.v1.<lattice>.provider.<name>.<capability>`) with the
//! caller's identity in headers, and the provider checks the assignment again. When a provider
//! of the assigned name is embedded in this host's process, the call goes to it directly, with
//! the same identity, and it checks the assignment again just the same.

use std::collections::HashSet;
use std::sync::{Arc, PoisonError, RwLock};

use trellis_bus::dataplane::{self as codec, Identity, SendError};
use trellis_provider_sdk::{LocalProvider, Request};
use trellis_schemas::dataplane;
use trellis_schemas::{
    AssignmentId, AssignmentRecord, AssignmentTarget, Capability, Fact, FactData, InstanceId,
    Lattice, Projection, apply, subject,
};

use crate::providers::EmbeddedProviders;
use crate::runtime::{
    BridgeFuture, CapabilityBridge, CapabilityCall, CapabilityError, CapabilityResponse,
};

/// The assignments in force, as this host knows them.
#[derive(Debug, Default)]
pub(crate) struct Assignments {
    inner: RwLock<Known>,
}

#[derive(Debug, Default)]
struct Known {
    projection: Projection,
    /// Assignments revoked by a fact already applied: a start command carrying one of them
    /// (sent before the revocation) must not bring it back.
    revoked: HashSet<AssignmentId>,
}

impl Assignments {
    /// Applies one fact (only assignment facts matter).
    pub(crate) fn apply(&self, fact: &Fact) {
        let mut known = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        if let FactData::AssignmentRevoked(d) = &fact.event.data {
            known.revoked.insert(d.assignment_id.clone());
        }
        apply(&mut known.projection, fact);
    }

    /// Adds assignments a start command carries, unless they were revoked since.
    pub(crate) fn merge(&self, records: &[AssignmentRecord]) {
        let mut known = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        for record in records {
            let id = &record.assignment.assignment_id;
            if !known.revoked.contains(id) {
                known
                    .projection
                    .assignments
                    .entry(id.clone())
                    .or_insert_with(|| record.clone());
            }
        }
    }

    /// The assignments made for `instance` itself (not its component's).
    pub(crate) fn of_instance(&self, instance: &InstanceId) -> Vec<AssignmentId> {
        let known = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        known
            .projection
            .assignments
            .values()
            .filter(|r| matches!(&r.assignment.target, AssignmentTarget::Instance(id) if id == instance))
            .map(|r| r.assignment.assignment_id.clone())
            .collect()
    }

    /// The assignment granting `capability` to `instance` of `component`.
    pub(crate) fn lookup(
        &self,
        instance: &InstanceId,
        component: &str,
        capability: Capability,
    ) -> Option<AssignmentRecord> {
        let known = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        known
            .projection
            .assignment_for(instance, component, capability)
            .cloned()
    }

    /// Follows the lattice's assignment facts from the beginning of the stream, forever (the
    /// reader resumes by itself after NATS outages).
    pub(crate) async fn follow(self: Arc<Self>, client: async_nats::Client, lattice: Lattice) {
        trellis_bus::follow(
            &client,
            &subject::events_stream(&lattice),
            &subject::assignment_events(&lattice),
            || self.next_seq(),
            |followed| match followed.event {
                Ok(event) => self.apply(&Fact {
                    seq: followed.seq,
                    event,
                }),
                Err(e) => {
                    tracing::warn!(seq = followed.seq, error = %e, "skipping an undecodable fact");
                }
            },
        )
        .await;
    }

    fn next_seq(&self) -> u64 {
        let known = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        known.projection.last_seq + 1
    }
}

/// The bridge of one instance: its identity, the host's assignments, the NATS client and the
/// providers embedded in this host.
#[derive(Debug)]
pub(crate) struct NatsBridge {
    pub client: async_nats::Client,
    pub lattice: Lattice,
    pub instance: InstanceId,
    pub component: String,
    pub assignments: Arc<Assignments>,
    pub embedded: EmbeddedProviders,
    pub audit: Arc<trellis_bus::audit::AuditLog>,
    pub host: trellis_schemas::HostId,
}

impl NatsBridge {
    /// Refuses a call of a capability this instance was not granted, and records the refusal.
    async fn denied(&self, capability: Capability, trace: Option<&str>) -> CapabilityError {
        use trellis_schemas::audit::{AuditEvent, AuditType};
        let mut event = AuditEvent::new(
            AuditType::Denied,
            format!("host/{}", self.host),
            dataplane::ErrorCode::AccessDenied.as_str(),
        );
        event.target = Some(format!("instance:{}", self.instance));
        event.capability = Some(capability.as_str().to_owned());
        event.reason = Some(format!(
            "{capability} is not assigned to component {}",
            self.component
        ));
        event.trace_id = trace.and_then(dataplane::trace_id).map(str::to_owned);
        self.audit.record(&event).await;
        CapabilityError::Denied(format!(
            "{capability} is not assigned to instance {} of {}; grant it with `trellis assignment grant component:{} {capability} …`",
            self.instance, self.component, self.component
        ))
    }

    async fn forward(&self, call: CapabilityCall) -> Result<CapabilityResponse, CapabilityError> {
        let capability = call.capability();
        let Some(record) = self
            .assignments
            .lookup(&self.instance, &self.component, capability)
        else {
            return Err(self.denied(capability, call.traceparent.as_deref()).await);
        };
        let assignment = &record.assignment;
        let identity = Identity {
            instance: self.instance.clone(),
            component: self.component.clone(),
            assignment: Some(assignment.assignment_id.to_string()),
            min_seq: Some(record.granted_seq),
            traceparent: call.traceparent.as_deref().map(str::to_owned),
        };
        if let Some(local) = self.embedded.get(&assignment.provider) {
            return call_embedded(&local, identity, call).await;
        }
        let provider = &assignment.provider;
        let subject = dataplane::provider_rpc(&self.lattice, provider, capability);
        let (headers, body) = codec::capability_request(&identity, &call.request)
            .map_err(CapabilityError::from_remote)?;
        let reply = codec::request(&self.client, subject, headers, body, call.timeout)
            .await
            .map_err(|e| match e {
                SendError::NoResponders => CapabilityError::Unavailable(format!(
                    "no `{provider}` provider is running for {capability}"
                )),
                SendError::TimedOut(t) => CapabilityError::Unavailable(format!(
                    "the `{provider}` provider did not answer within {t:?}"
                )),
                SendError::Failed(e) => CapabilityError::Unavailable(format!(
                    "cannot reach the `{provider}` provider: {e}"
                )),
            })?;
        codec::read_capability_reply(capability, &reply).map_err(CapabilityError::from_remote)
    }
}

/// A call to a provider embedded in this process: the typed request is handed over as it is
/// (nothing is encoded), and the provider's own checks run as for a call from NATS.
async fn call_embedded(
    local: &LocalProvider,
    identity: Identity,
    call: CapabilityCall,
) -> Result<CapabilityResponse, CapabilityError> {
    let request = Request {
        identity,
        request: call.request,
    };
    match tokio::time::timeout(call.timeout, local.call(request)).await {
        Ok(result) => result.map_err(CapabilityError::from_remote),
        Err(_) => Err(CapabilityError::Unavailable(format!(
            "the `{}` provider (embedded) did not answer within {:?}",
            local.name(),
            call.timeout
        ))),
    }
}

impl CapabilityBridge for NatsBridge {
    fn allows(&self, capability: Capability) -> bool {
        self.assignments
            .lookup(&self.instance, &self.component, capability)
            .is_some()
    }

    fn call(&self, call: CapabilityCall) -> BridgeFuture<'_> {
        Box::pin(self.forward(call))
    }
}
