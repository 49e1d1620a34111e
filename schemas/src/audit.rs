//! Audit events: who asked the lattice for what and what came of it, every grant and revoke,
//! and every refusal. They are security records, not execution logs: an event never carries a
//! request's payload or any application data, only names, ids, codes and reasons.
//!
//! Published on `trellis.audit.v1.<lattice>.<type>` ([`subject`]) and kept by the stream
//! [`stream`], whose age and size are always bounded.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::names::Lattice;

/// What an audit event records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuditType {
    /// A control request and its outcome.
    Control,
    /// A capability was granted.
    Grant,
    /// A grant was withdrawn.
    Revoke,
    /// A call was refused: a capability not assigned, a provider refusing a call.
    Denied,
}

impl AuditType {
    /// Every type.
    pub const ALL: &'static [AuditType] = &[
        AuditType::Control,
        AuditType::Grant,
        AuditType::Revoke,
        AuditType::Denied,
    ];

    /// The subject token and the name the CLI takes.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditType::Control => "control",
            AuditType::Grant => "grant",
            AuditType::Revoke => "revoke",
            AuditType::Denied => "denied",
        }
    }

    /// The type named `s`.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.iter().copied().find(|t| t.as_str() == s)
    }
}

/// Who sent a control request, as its signed identity headers say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AuditCaller {
    /// The user's name (`operator`, `host-h1`) when the controller knows its key, else the key.
    pub user: String,
    /// Its role (`operator`, `viewer`, …), or `unknown`.
    pub role: String,
    /// Whether the request carried a valid signature by that key (otherwise the identity is
    /// only what the caller claimed).
    pub verified: bool,
}

/// One audit event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AuditEvent {
    /// When it happened.
    pub time: DateTime<Utc>,
    /// What it records.
    #[serde(rename = "type")]
    pub kind: AuditType,
    /// The process that recorded it: `controller/<replica>`, `host/<id>`, `provider/<name>/<id>`.
    pub source: String,
    /// The control operation (`instance.start`), for [`AuditType::Control`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub operation: Option<String>,
    /// `ok`, or the error code of the refusal or failure.
    pub outcome: String,
    /// Who asked, when known: a control request's caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub caller: Option<AuditCaller>,
    /// What was acted on or what asked: `instance:<id>`, `component:<name>`, an assignment id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The capability concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capability: Option<String>,
    /// The provider concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Why, for a refusal or a failure (a message, never a payload).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The trace the request belonged to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl AuditEvent {
    /// An event of `kind` from `source` with `outcome`, now, and nothing else yet.
    pub fn new(kind: AuditType, source: impl Into<String>, outcome: impl Into<String>) -> Self {
        Self {
            time: Utc::now(),
            kind,
            source: source.into(),
            operation: None,
            outcome: outcome.into(),
            caller: None,
            target: None,
            capability: None,
            provider: None,
            reason: None,
            trace_id: None,
        }
    }
}

/// The longest `reason` kept in an event, in bytes: a reason names what was refused, it does
/// not carry data.
pub const MAX_REASON_BYTES: usize = 512;

/// Cuts `reason` to [`MAX_REASON_BYTES`] at a character boundary.
pub fn short_reason(reason: &str) -> String {
    if reason.len() <= MAX_REASON_BYTES {
        return reason.to_owned();
    }
    let mut end = MAX_REASON_BYTES;
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &reason[..end])
}

/// The subject an audit event of `kind` is published on.
pub fn subject(lattice: &Lattice, kind: AuditType) -> String {
    format!("trellis.audit.v1.{lattice}.{}", kind.as_str())
}

/// Every audit subject of the lattice.
pub fn subject_all(lattice: &Lattice) -> String {
    format!("trellis.audit.v1.{lattice}.*")
}

/// The stream that keeps the lattice's audit events.
pub fn stream(lattice: &Lattice) -> String {
    format!("TRELLIS_AUDIT_{}", lattice.as_str().to_ascii_uppercase())
}

/// The header that names the public key of a control request's sender.
pub const CALLER_HEADER: &str = "Trellis-Caller";
/// The header with the sender's signature (base64url, no padding) over
/// [`caller_signed_bytes`].
pub const CALLER_SIGNATURE_HEADER: &str = "Trellis-Caller-Signature";

/// What a sender signs: the subject and the request body, so a signature cannot be moved to
/// another request.
pub fn caller_signed_bytes(subject: &str, body: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(subject.len() + 1 + body.len());
    bytes.extend_from_slice(subject.as_bytes());
    bytes.push(b'\n');
    bytes.extend_from_slice(body);
    bytes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_round_trip_and_events_carry_no_empty_fields() {
        for t in AuditType::ALL {
            assert_eq!(AuditType::parse(t.as_str()), Some(*t));
        }
        let l = Lattice::new("prod").unwrap();
        assert_eq!(
            subject(&l, AuditType::Denied),
            "trellis.audit.v1.prod.denied"
        );
        assert_eq!(stream(&l), "TRELLIS_AUDIT_PROD");
        let event = AuditEvent::new(AuditType::Control, "controller/1", "ok");
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(json["type"], "control");
        assert!(json.get("caller").is_none() && json.get("reason").is_none());
        let long = "é".repeat(400);
        let short = short_reason(&long);
        assert!(short.len() <= MAX_REASON_BYTES + '…'.len_utf8());
    }
}
