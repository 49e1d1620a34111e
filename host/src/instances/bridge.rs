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

use std::sync::{Arc, PoisonError, RwLock};

use trellis_bus::dataplane::{self as codec, Identity, SendError};
use trellis_bus::direct;
use trellis_bus::telemetry::{Kind, Span};
use trellis_provider_sdk::{LocalProvider, Request};
use trellis_schemas::dataplane::{self, ErrorCode, Op};
use trellis_schemas::link::LinkRecord;
use trellis_schemas::{
    AssignmentId, AssignmentRecord, AssignmentTarget, Capability, Fact, InstanceId, Lattice,
    Projection, ProviderName, apply, subject,
};
use wasmtime::component::Val;

use super::local::LocalInstances;
use crate::providers::EmbeddedProviders;
use crate::runtime::{
    BridgeFuture, CapabilityBridge, CapabilityCall, CapabilityError, CapabilityResponse, LinkCall,
    LinkError, LinkFuture, json_to_val,
};

/// The assignments in force, as this host knows them.
#[derive(Debug, Default)]
pub(crate) struct Assignments {
    inner: RwLock<Known>,
}

#[derive(Debug, Default)]
struct Known {
    projection: Projection,
}

impl Assignments {
    /// Applies one fact (only assignment facts matter).
    pub(crate) fn apply(&self, fact: &Fact) {
        let mut known = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        apply(&mut known.projection, fact);
    }

    /// Adds the assignments a start command carries whose grant facts this host has not read
    /// yet.
    ///
    /// The host reads the grant facts in stream order, so a grant at or before the last fact it
    /// applied is one it has read: if the projection no longer holds it, it was revoked since
    /// the command was sent, and must not come back. No list of revocations is kept (it would
    /// grow with every instance that ends).
    pub(crate) fn merge(&self, records: &[AssignmentRecord]) {
        let mut known = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        for record in records {
            if record.granted_seq > known.projection.last_seq {
                known.projection.add_assignment(record.clone());
            }
        }
    }

    /// The assignments made for `instance` itself (not its component's).
    pub(crate) fn of_instance(&self, instance: &InstanceId) -> Vec<AssignmentId> {
        let known = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        known
            .projection
            .assignments()
            .values()
            .filter(|r| matches!(&r.assignment.target, AssignmentTarget::Instance(id) if id == instance))
            .map(|r| r.assignment.assignment_id.clone())
            .collect()
    }

    /// The link serving `interface` (as imported) to `instance` of `component`.
    pub(crate) fn link(
        &self,
        instance: &InstanceId,
        component: &str,
        interface: &str,
    ) -> Option<LinkRecord> {
        let known = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        known
            .projection
            .link_for(instance, component, interface)
            .cloned()
    }

    /// The digests of the stored versions of `link`'s target that it accepts, newest first.
    pub(crate) fn versions_for(&self, link: &trellis_schemas::link::Link) -> Vec<String> {
        let known = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        let mut versions: Vec<(semver::Version, String)> = known
            .projection
            .artifacts
            .values()
            .filter(|a| a.manifest.name == link.target)
            .filter_map(|a| {
                let version = semver::Version::parse(&a.manifest.version).ok()?;
                link.accepts(&version).then(|| (version, a.digest.clone()))
            })
            .collect();
        versions.sort_by(|a, b| b.0.cmp(&a.0));
        versions.into_iter().map(|(_, digest)| digest).collect()
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

    /// Whether an assignment grants `capability` to `instance` of `component` (nothing copied).
    pub(crate) fn grants(
        &self,
        instance: &InstanceId,
        component: &str,
        capability: Capability,
    ) -> bool {
        let known = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        known
            .projection
            .assignment_for(instance, component, capability)
            .is_some()
    }

    /// What a capability call of `instance` needs of the assignment granting `capability`:
    /// the provider that serves it, the assignment's id and the sequence of the fact that
    /// granted it (copied out without the rest of the grant, its configuration included).
    pub(crate) fn route(
        &self,
        instance: &InstanceId,
        component: &str,
        capability: Capability,
    ) -> Option<(ProviderName, String, u64)> {
        let known = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        let record = known
            .projection
            .assignment_for(instance, component, capability)?;
        let assignment = &record.assignment;
        Some((
            assignment.provider.clone(),
            assignment.assignment_id.to_string(),
            record.granted_seq,
        ))
    }

    /// Follows the lattice's assignment facts from the beginning of the stream, forever (the
    /// reader resumes by itself after NATS outages).
    pub(crate) async fn follow(self: Arc<Self>, client: async_nats::Client, lattice: Lattice) {
        trellis_bus::follow(
            &client,
            &subject::events_stream(&lattice),
            &[
                subject::assignment_events(&lattice),
                subject::link_events(&lattice),
                // Which digest is which version, for links that ask for versions.
                subject::events_of_kind(&lattice, trellis_schemas::FactKind::ArtifactStored),
            ],
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
    /// This host's instances, for linked calls in process.
    pub local: LocalInstances,
}

impl NatsBridge {
    /// Records the refusal of a call of `what` (a capability, or a linked interface) that
    /// nothing grants this instance.
    async fn record_denial(&self, what: &str, reason: String, trace: Option<&str>) {
        use trellis_schemas::audit::{AuditEvent, AuditType};
        let mut event = AuditEvent::new(
            AuditType::Denied,
            format!("host/{}", self.host),
            ErrorCode::AccessDenied.as_str(),
        );
        event.target = Some(format!("instance:{}", self.instance));
        event.capability = Some(what.to_owned());
        event.reason = Some(reason);
        event.trace_id = trace.and_then(dataplane::trace_id).map(str::to_owned);
        self.audit.record(&event).await;
    }

    /// Refuses a call of a capability this instance was not granted, and records the refusal.
    async fn denied(&self, capability: Capability, trace: Option<&str>) -> CapabilityError {
        self.record_denial(
            capability.as_str(),
            format!(
                "{capability} is not assigned to component {}",
                self.component
            ),
            trace,
        )
        .await;
        CapabilityError::Denied(format!(
            "{capability} is not assigned to instance {} of {}; grant it with `trellis assignment grant component:{} {capability} …`",
            self.instance, self.component, self.component
        ))
    }

    async fn forward(&self, call: CapabilityCall) -> Result<CapabilityResponse, CapabilityError> {
        let capability = call.capability();
        let Some((provider, assignment, granted_seq)) =
            self.assignments
                .route(&self.instance, &self.component, capability)
        else {
            return Err(self.denied(capability, call.traceparent.as_deref()).await);
        };
        let identity = Identity {
            instance: self.instance.clone(),
            component: self.component.clone(),
            assignment: Some(assignment),
            min_seq: Some(granted_seq),
            traceparent: call.traceparent.as_deref().map(str::to_owned),
        };
        if let Some(local) = self.embedded.get(&provider) {
            return call_embedded(&local, identity, call).await;
        }
        let subject = dataplane::provider_rpc(&self.lattice, &provider, capability);
        let (mut headers, body) = codec::capability_request(&identity, &call.request)
            .map_err(CapabilityError::from_remote)?;
        // Key-value replies are read in JetStream's own format too: the provider may have
        // JetStream answer here directly, one crossing of NATS fewer.
        let direct = direct::accept_direct(&call.request, &mut headers);
        let reply = codec::request(&self.client, subject, headers, body, call.timeout)
            .await
            .map_err(|e| match e {
                SendError::NoResponders if direct => CapabilityError::Unavailable(format!(
                    "no `{provider}` provider is running for {capability}, or JetStream has no bucket stream to answer it"
                )),
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
        direct::read_reply(&call.request, &reply).map_err(CapabilityError::from_remote)
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
            .grants(&self.instance, &self.component, capability)
    }

    fn call(&self, call: CapabilityCall) -> BridgeFuture<'_> {
        Box::pin(self.forward(call))
    }

    fn link(&self, call: LinkCall) -> LinkFuture<'_> {
        Box::pin(self.linked(call))
    }
}

impl NatsBridge {
    /// A call of a linked import: refused without a link; otherwise to an instance of the
    /// target in this process when one runs here (values handed over as they are), else over
    /// the data plane to any of its instances (the arguments as JSON, converted back by the
    /// target against its own export's types). A rollout of the target splits linked calls by
    /// its weights, as it does every other call.
    async fn linked(&self, call: LinkCall) -> Result<Vec<Val>, LinkError> {
        let Some(record) = self
            .assignments
            .link(&self.instance, &self.component, &call.interface)
        else {
            let interface = trellis_schemas::manifest::strip_version(&call.interface);
            self.record_denial(
                interface,
                format!("{interface} is not linked for component {}", self.component),
                call.traceparent.as_deref(),
            )
            .await;
            return Err(LinkError::Denied(format!(
                "{interface} is not linked for instance {} of {}; link it with `trellis link add component:{} {interface} <target>`",
                self.instance, self.component, self.component
            )));
        };
        let link = record.link;
        let export = format!("{}#{}", call.interface, call.function);
        let mut span = Span::start(Kind::Client, call.traceparent.as_deref(), || {
            format!("link {} {export}", link.target)
        });
        if span.recording() {
            span.set(
                dataplane::span_attributes::COMPONENT,
                link.target.to_string(),
            );
        }
        let traceparent = span
            .traceparent()
            .map(str::to_owned)
            .or_else(|| call.traceparent.as_deref().map(str::to_owned));
        let version = self
            .local
            .route_table()
            .version(&self.lattice, &link.target, Op::Call);
        let digest = version.as_ref().map(|(digest, _)| digest.as_str());
        let result = if let Some(serving) = self.local.pick_linked(&link, digest) {
            serving
                .call_linked(&export, &call.params, traceparent.as_deref())
                .await
                .map_err(LinkError::from_remote)
        } else {
            self.linked_remote(&link, version, &export, &call, traceparent.as_deref())
                .await
        };
        if let Err(error) = &result {
            span.fail(error.to_string());
        }
        result
    }

    /// A linked call over the data plane: to the version a rollout picked, else (with a version
    /// requirement) the newest accepted version that answers, else any instance of the target.
    /// The arguments are encoded once, whichever subjects are tried.
    async fn linked_remote(
        &self,
        link: &trellis_schemas::link::Link,
        rollout: Option<(String, String)>,
        export: &str,
        call: &LinkCall,
        traceparent: Option<&str>,
    ) -> Result<Vec<Val>, LinkError> {
        let body = crate::runtime::encode_link_args(call)?;
        let send = |subject: String| {
            self.linked_over_nats(link, subject, body.clone(), export, call, traceparent)
        };
        if let Some((_, subject)) = rollout {
            send(subject).await
        } else if let Some(req) = &link.version {
            // Only the versions the link accepts: the newest that has an instance answers.
            let mut outcome = Err(LinkError::Unavailable(format!(
                "no instance of {} {req} runs",
                link.target
            )));
            for digest in self.assignments.versions_for(link) {
                let subject = dataplane::version(&self.lattice, &link.target, &digest, Op::Call);
                match send(subject).await {
                    Err(LinkError::Unavailable(_)) => {}
                    other => {
                        outcome = other;
                        break;
                    }
                }
            }
            outcome
        } else {
            send(dataplane::component(&self.lattice, &link.target, Op::Call)).await
        }
    }

    /// One linked call on `subject` with the encoded arguments `body`.
    async fn linked_over_nats(
        &self,
        link: &trellis_schemas::link::Link,
        subject: String,
        body: bytes::Bytes,
        export: &str,
        call: &LinkCall,
        traceparent: Option<&str>,
    ) -> Result<Vec<Val>, LinkError> {
        let failed = |code: ErrorCode, message: String| LinkError::Failed { code, message };
        let mut headers = codec::call_headers(export);
        if let Some(traceparent) = traceparent {
            headers.insert(codec::NAMES.traceparent.clone(), traceparent);
        }
        let target = &link.target;
        let reply = codec::request(&self.client, subject, headers, body, call.timeout)
            .await
            .map_err(|e| match e {
                SendError::NoResponders => {
                    LinkError::Unavailable(format!("no instance of {target} runs"))
                }
                SendError::TimedOut(t) => failed(
                    ErrorCode::Timeout,
                    format!("{target} did not answer within {t:?}"),
                ),
                SendError::Failed(e) => {
                    LinkError::Unavailable(format!("cannot reach {target}: {e}"))
                }
            })?;
        codec::read_reply(&reply).map_err(LinkError::from_remote)?;
        let value: serde_json::Value = serde_json::from_slice(&reply.payload).map_err(|e| {
            failed(
                ErrorCode::Internal,
                format!("{target} answered with invalid JSON: {e}"),
            )
        })?;
        let values: Vec<serde_json::Value> = match (call.results.len(), value) {
            (0, _) => Vec::new(),
            (1, value) => vec![value],
            (_, serde_json::Value::Array(values)) => values,
            (n, other) => {
                return Err(failed(
                    ErrorCode::Internal,
                    format!("{target} answered {other} where {n} results were expected"),
                ));
            }
        };
        if values.len() != call.results.len() {
            return Err(failed(
                ErrorCode::InvalidArguments,
                format!(
                    "{target} answered {} results where {} were expected",
                    values.len(),
                    call.results.len()
                ),
            ));
        }
        values
            .iter()
            .zip(&call.results)
            .map(|(value, ty)| json_to_val(ty, value))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                failed(
                    ErrorCode::InvalidArguments,
                    format!("the result of {target} does not fit the caller's type: {e}"),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use trellis_schemas::fact::{AssignmentRevoked, Event};
    use trellis_schemas::{Assignment, ComponentName, FactData, ProviderName};

    use super::*;

    fn grant(id: &str, instance: &str) -> Assignment {
        Assignment {
            assignment_id: AssignmentId::new(id).expect("id"),
            target: AssignmentTarget::Instance(InstanceId::new(instance).expect("id")),
            capability: Capability::KeyValue,
            provider: ProviderName::new("kv").expect("name"),
            config: BTreeMap::new(),
        }
    }

    fn fact(seq: u64, data: FactData) -> Fact {
        Fact {
            seq,
            event: Event::new("/trellis/default/test/t", data),
        }
    }

    fn carried(assignment: Assignment, granted_seq: u64) -> AssignmentRecord {
        AssignmentRecord {
            assignment,
            granted_at: chrono::Utc::now(),
            granted_seq,
        }
    }

    fn granted(assignments: &Assignments, instance: &str) -> bool {
        let instance = InstanceId::new(instance).expect("id");
        assignments.grants(&instance, "c", Capability::KeyValue)
    }

    /// A start command may arrive before the facts of the grants it carries: they count at
    /// once, even after an earlier lookup, and reading their facts later changes nothing.
    #[test]
    fn a_start_commands_grants_count_before_their_facts_arrive() {
        let assignments = Assignments::default();
        assignments.apply(&fact(1, FactData::AssignmentGranted(grant("a1", "i1"))));
        assert!(granted(&assignments, "i1"));
        assert!(!granted(&assignments, "i2"));
        assignments.merge(&[carried(grant("a2", "i2"), 2)]);
        assert!(
            granted(&assignments, "i2"),
            "the carried grant counts at once"
        );
        assignments.apply(&fact(2, FactData::AssignmentGranted(grant("a2", "i2"))));
        assert!(granted(&assignments, "i1") && granted(&assignments, "i2"));
    }

    /// A command sent before a revocation that the host has read does not bring the grant
    /// back; a grant to the component is unaffected.
    #[test]
    fn a_revoked_grant_carried_by_a_late_command_stays_revoked() {
        let assignments = Assignments::default();
        let own = grant("a1", "i1");
        let mut for_component = grant("a2", "i1");
        for_component.target = AssignmentTarget::Component(ComponentName::new("c").expect("name"));
        for_component.capability = Capability::Messaging;
        assignments.apply(&fact(1, FactData::AssignmentGranted(own.clone())));
        assignments.apply(&fact(2, FactData::AssignmentGranted(for_component.clone())));
        assignments.apply(&fact(
            3,
            FactData::AssignmentRevoked(AssignmentRevoked {
                assignment_id: own.assignment_id.clone(),
                reason: "requested".to_owned(),
            }),
        ));
        assert!(!granted(&assignments, "i1"));
        assignments.merge(&[carried(own, 1), carried(for_component, 2)]);
        assert!(!granted(&assignments, "i1"), "a revoked grant came back");
        let instance = InstanceId::new("i1").expect("id");
        assert!(assignments.grants(&instance, "c", Capability::Messaging));
    }
}
