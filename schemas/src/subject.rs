//! Every NATS subject and stream name Trellis uses, built from validated names.
//!
//! No other crate formats a subject string: they call these functions. The layout is
//!
//! | subject | use |
//! |---|---|
//! | `trellis.ctl.v1.<lattice>.<noun>.<verb>` | control requests to the controller (queue group [`CONTROLLER_QUEUE`]) |
//! | `trellis.evt.v1.<lattice>.<noun>.<id>.<verb>` | facts, captured by the stream [`events_stream`] |
//! | `trellis.hb.v1.<lattice>.<host_id>` | host heartbeats, captured by the stream [`heartbeat_stream`] |
//! | `trellis.drive.v1.<lattice>.rollout.<id>` | signals to the controller replica driving a rollout |
//!
//! The data plane and the command subjects of hosts and providers are in [`crate::dataplane`].

use crate::control::CtlOp;
use crate::fact::FactKind;
use crate::names::{HostId, InstanceId, Lattice, RolloutId};

/// The queue group every controller replica joins, so each request is served once.
pub const CONTROLLER_QUEUE: &str = "trellis-controller";

/// The subject of one control operation.
pub fn ctl(lattice: &Lattice, op: CtlOp) -> String {
    format!("trellis.ctl.v1.{lattice}.{}.{}", op.noun(), op.verb())
}

/// The wildcard a controller subscribes to: every control subject of the lattice, known or not,
/// so that unknown verbs get an error reply instead of silence.
pub fn ctl_all(lattice: &Lattice) -> String {
    format!("trellis.ctl.v1.{lattice}.>")
}

/// Splits a control subject of `lattice` into `(noun, verb)`; `None` when the subject is not
/// `trellis.ctl.v1.<lattice>.<noun>.<verb>`.
pub fn parse_ctl<'a>(lattice: &Lattice, subject: &'a str) -> Option<(&'a str, &'a str)> {
    let rest = subject.strip_prefix("trellis.ctl.v1.")?;
    let rest = rest.strip_prefix(lattice.as_str())?.strip_prefix('.')?;
    let (noun, verb) = rest.split_once('.')?;
    if noun.is_empty() || verb.is_empty() || verb.contains('.') {
        return None;
    }
    Some((noun, verb))
}

/// Whether a subject belongs to Trellis itself (`trellis.…`): components may not publish or
/// subscribe there through the messaging capability.
pub fn is_reserved(subject: &str) -> bool {
    subject == "trellis" || subject.starts_with("trellis.")
}

/// The subject a fact about entity `id` is published on.
pub fn event(lattice: &Lattice, kind: FactKind, id: &str) -> String {
    format!(
        "trellis.evt.v1.{lattice}.{}.{id}.{}",
        kind.noun(),
        kind.verb()
    )
}

/// Every fact about host `host` (`host.started`, `host.stopped`, `host.lost`).
pub fn host_facts(lattice: &Lattice, host: &HostId) -> String {
    format!("trellis.evt.v1.{lattice}.host.{host}.*")
}

/// Every fact subject of the lattice.
pub fn events_all(lattice: &Lattice) -> String {
    format!("trellis.evt.v1.{lattice}.>")
}

/// Facts of one kind about any entity (a filter subject for consumers).
pub fn events_of_kind(lattice: &Lattice, kind: FactKind) -> String {
    format!("trellis.evt.v1.{lattice}.{}.*.{}", kind.noun(), kind.verb())
}

/// Facts of any kind about one host.
pub fn events_of_host(lattice: &Lattice, host: &HostId) -> String {
    format!("trellis.evt.v1.{lattice}.host.{host}.*")
}

/// The subject a host publishes its heartbeats on.
pub fn heartbeat(lattice: &Lattice, host: &HostId) -> String {
    format!("trellis.hb.v1.{lattice}.{host}")
}

/// Every heartbeat subject of the lattice.
pub fn heartbeats_all(lattice: &Lattice) -> String {
    format!("trellis.hb.v1.{lattice}.*")
}

/// Facts of any kind about one instance.
pub fn events_of_instance(lattice: &Lattice, instance: &InstanceId) -> String {
    format!("trellis.evt.v1.{lattice}.instance.{instance}.*")
}

/// Every instance fact of the lattice.
pub fn instance_events(lattice: &Lattice) -> String {
    format!("trellis.evt.v1.{lattice}.instance.>")
}

/// Every provider fact of the lattice.
pub fn provider_events(lattice: &Lattice) -> String {
    format!("trellis.evt.v1.{lattice}.provider.>")
}

/// Every rollout fact of the lattice.
pub fn rollout_events(lattice: &Lattice) -> String {
    format!("trellis.evt.v1.{lattice}.rollout.>")
}

/// The subject the controller replica driving a rollout listens on for its signals
/// (`promote`, `abort`, `undo`, `ping`), request/reply, sent by whichever replica took the
/// control request.
pub fn rollout_driver(lattice: &Lattice, rollout: &RolloutId) -> String {
    format!("trellis.drive.v1.{lattice}.rollout.{rollout}")
}

/// Every rollout signal subject of the lattice.
pub fn drive_all(lattice: &Lattice) -> String {
    format!("trellis.drive.v1.{lattice}.>")
}

/// Every assignment fact of the lattice.
pub fn assignment_events(lattice: &Lattice) -> String {
    format!("trellis.evt.v1.{lattice}.assignment.>")
}

/// Every link fact of the lattice.
pub fn link_events(lattice: &Lattice) -> String {
    format!("trellis.evt.v1.{lattice}.link.>")
}

/// The JetStream object store bucket holding components, keyed by the hex SHA-256 of the `.wasm`.
pub fn artifact_bucket(lattice: &Lattice) -> String {
    format!(
        "TRELLIS_ARTIFACTS_{}",
        lattice.as_str().to_ascii_uppercase()
    )
}

/// The JetStream stream holding the lattice's facts.
pub fn events_stream(lattice: &Lattice) -> String {
    format!("TRELLIS_EVENTS_{}", lattice.as_str().to_ascii_uppercase())
}

/// The JetStream stream holding the last heartbeat of every host.
pub fn heartbeat_stream(lattice: &Lattice) -> String {
    format!(
        "TRELLIS_HEARTBEATS_{}",
        lattice.as_str().to_ascii_uppercase()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lattice() -> Lattice {
        Lattice::new("prod").expect("valid")
    }

    #[test]
    fn control_subjects_round_trip() {
        for op in CtlOp::ALL {
            let s = ctl(&lattice(), *op);
            let (noun, verb) = parse_ctl(&lattice(), &s).expect("parses");
            assert_eq!(CtlOp::from_parts(noun, verb), Some(*op));
        }
    }

    #[test]
    fn parse_ctl_rejects_foreign_subjects() {
        let l = lattice();
        assert_eq!(parse_ctl(&l, "trellis.ctl.v1.other.host.list"), None);
        assert_eq!(parse_ctl(&l, "trellis.ctl.v1.prodx.host.list"), None);
        assert_eq!(parse_ctl(&l, "trellis.ctl.v1.prod.host"), None);
        assert_eq!(parse_ctl(&l, "trellis.ctl.v1.prod.host.list.extra"), None);
        assert_eq!(parse_ctl(&l, "trellis.ctl.v1.prod.a.b"), Some(("a", "b")));
    }

    #[test]
    fn fact_subjects_follow_the_layout() {
        let h = HostId::new("h1").expect("valid");
        assert_eq!(
            event(&lattice(), FactKind::HostStarted, h.as_str()),
            "trellis.evt.v1.prod.host.h1.started"
        );
        assert_eq!(
            events_of_kind(&lattice(), FactKind::HostLost),
            "trellis.evt.v1.prod.host.*.lost"
        );
        assert_eq!(heartbeat(&lattice(), &h), "trellis.hb.v1.prod.h1");
        assert_eq!(events_stream(&lattice()), "TRELLIS_EVENTS_PROD");
        let l2 = Lattice::new("a-b_c").expect("valid");
        assert_eq!(events_stream(&l2), "TRELLIS_EVENTS_A-B_C");
    }

    #[test]
    fn host_facts_cover_every_fact_about_one_host_and_no_other() {
        let l = Lattice::new("prod").unwrap();
        let h1 = HostId::new("h1").unwrap();
        let filter = host_facts(&l, &h1);
        for kind in [
            FactKind::HostStarted,
            FactKind::HostStopped,
            FactKind::HostLost,
        ] {
            assert!(crate::capability::subject_matches(
                &filter,
                &event(&l, kind, "h1")
            ));
            assert!(!crate::capability::subject_matches(
                &filter,
                &event(&l, kind, "h2")
            ));
        }
        assert!(!crate::capability::subject_matches(
            &filter,
            &event(&l, FactKind::InstanceStarted, "h1")
        ));
    }
}
