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

use async_nats::HeaderMap;
use async_nats::client::RequestErrorKind;
use trellis_provider_sdk::{Caller, LocalProvider, Request};
use trellis_schemas::capability::rpc::{self, RpcErrorCode};
use trellis_schemas::{
    AssignmentId, AssignmentRecord, AssignmentTarget, Capability, Fact, FactData, InstanceId,
    Lattice, Projection, apply, subject,
};

use crate::providers::EmbeddedProviders;
use crate::runtime::{
    BridgeFuture, CapabilityBridge, CapabilityCall, CapabilityError, CapabilityReply,
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
}

impl NatsBridge {
    fn denied(&self, capability: Capability) -> CapabilityError {
        CapabilityError::Denied(format!(
            "{capability} is not assigned to instance {} of {}; grant it with `trellis assignment grant component:{} {capability} …`",
            self.instance, self.component, self.component
        ))
    }

    async fn forward(&self, call: CapabilityCall) -> Result<CapabilityReply, CapabilityError> {
        let capability = call.capability;
        let Some(record) = self
            .assignments
            .lookup(&self.instance, &self.component, capability)
        else {
            return Err(self.denied(capability));
        };
        let assignment = &record.assignment;
        if let Some(local) = self.embedded.get(&assignment.provider) {
            return self.call_embedded(&local, &record, call).await;
        }
        let subject = rpc::provider_rpc(&self.lattice, &assignment.provider, capability);
        let mut headers = HeaderMap::new();
        headers.insert(rpc::INSTANCE, self.instance.as_str());
        headers.insert(rpc::COMPONENT, self.component.as_str());
        headers.insert(rpc::ASSIGNMENT, assignment.assignment_id.as_str());
        headers.insert(rpc::MIN_SEQ, record.granted_seq.to_string().as_str());
        if let Some(head) = &call.http_head {
            headers.insert(rpc::HTTP_HEAD, head.as_str());
        }
        let request = async_nats::Request::new()
            .headers(headers)
            .payload(call.body)
            .timeout(Some(call.timeout));
        let provider = &assignment.provider;
        let reply = self
            .client
            .send_request(subject, request)
            .await
            .map_err(|e| match e.kind() {
                RequestErrorKind::NoResponders => CapabilityError::Unavailable(format!(
                    "no `{provider}` provider is running for {capability}"
                )),
                RequestErrorKind::TimedOut => CapabilityError::Unavailable(format!(
                    "the `{provider}` provider did not answer within {:?}",
                    call.timeout
                )),
                _ => CapabilityError::Unavailable(format!(
                    "cannot reach the `{provider}` provider: {e}"
                )),
            })?;
        let header = |name: &str| {
            reply
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        if header(rpc::STATUS).as_deref() == Some("ok") {
            return Ok(CapabilityReply {
                body: reply.payload.clone(),
                http_head: header(rpc::HTTP_HEAD),
            });
        }
        let code =
            header(rpc::ERROR_CODE).map_or(RpcErrorCode::Internal, |c| RpcErrorCode::parse(&c));
        let message = header(rpc::ERROR)
            .unwrap_or_else(|| String::from_utf8_lossy(&reply.payload).into_owned());
        Err(CapabilityError::from_remote(code, message))
    }
}

impl NatsBridge {
    /// A call to a provider embedded in this process: what would travel in headers is handed
    /// over as it is, and the provider's own checks run as for a call from NATS.
    async fn call_embedded(
        &self,
        local: &LocalProvider,
        record: &AssignmentRecord,
        call: CapabilityCall,
    ) -> Result<CapabilityReply, CapabilityError> {
        let mut headers = HeaderMap::new();
        if let Some(head) = &call.http_head {
            headers.insert(rpc::HTTP_HEAD, head.as_str());
        }
        let request = Request {
            capability: call.capability,
            caller: Caller {
                instance: self.instance.clone(),
                component: self.component.clone(),
            },
            min_seq: Some(record.granted_seq),
            claimed: Some(record.assignment.assignment_id.to_string()),
            headers,
            body: call.body,
        };
        match tokio::time::timeout(call.timeout, local.call(request)).await {
            Ok(Ok(reply)) => Ok(CapabilityReply {
                body: reply.body,
                http_head: reply.http_head,
            }),
            Ok(Err(e)) => Err(CapabilityError::from_remote(e.code, e.message)),
            Err(_) => Err(CapabilityError::Unavailable(format!(
                "the `{}` provider (embedded) did not answer within {:?}",
                local.name(),
                call.timeout
            ))),
        }
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
