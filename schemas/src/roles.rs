//! The roles of a lattice and the NATS permissions each one needs: exactly its own subjects.
//!
//! A lattice runs as one NATS account; every process of it logs in as a user of that account
//! whose permissions come from [`permissions`]. The rules are built from the same subject
//! functions the processes use ([`crate::subject`], [`crate::dataplane`], [`crate::logs`]), so a
//! subject that moves moves its permission with it.
//!
//! | role | publishes | serves / subscribes |
//! |---|---|---|
//! | [`Grant::Controller`] | facts, host and provider commands, the JetStream API | control requests, rollout signals |
//! | [`Grant::Host`] | its own heartbeats, the facts a host reports, capability calls | its own commands, component calls |
//! | [`Grant::Provider`] | `provider.started`/`stopped`, component calls | its own RPC and control subjects |
//! | [`Grant::Operator`] | control requests, component calls, artifacts | logs |
//! | [`Grant::Viewer`] | read-only control requests (`list`, `get`, …) | logs |
//! | [`Grant::App`] | the application subjects of the messaging capability: anything outside Trellis and JetStream | the same |
//! | [`Grant::Admin`] | everything | everything |
//!
//! Replies are private: each user subscribes only under its own [`inbox_prefix`], and publishes
//! on any inbox (answering a request). Every role but the admin reads the streams it needs through ephemeral consumers (that is how
//! JetStream is read, and an ordered consumer deletes the one it replaces) and nothing else of the
//! JetStream API: only the controller (and the admin) creates, updates or deletes streams and
//! buckets, or creates durable consumers. The one exception is the
//! key-value provider, which creates the bucket an assignment names on first use (it cannot
//! update or delete a stream).

use crate::audit::{self, AuditType};
use crate::capability::{Capability, subject_matches};
use crate::control::CtlOp;
use crate::dataplane;
use crate::fact::FactKind;
use crate::names::{HostId, Lattice, ProviderName};
use crate::subject;

/// A role, and the identity the permissions are cut to where the role has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// The controller: owns the streams and the lattice's state.
    Controller,
    /// One host: its heartbeats, its commands, the facts hosts report.
    Host(HostId),
    /// Every process of one provider.
    Provider(ProviderName),
    /// A person or script driving the lattice with the CLI.
    Operator,
    /// A person or dashboard that only looks.
    Viewer,
    /// The application side of the messaging capability: what components publish and subscribe
    /// to through it, on a connection of its own.
    App,
    /// Everything, for the `nats` CLI of whoever runs the server.
    Admin,
}

impl Grant {
    /// The role's name: `controller`, `host`, `provider`, `operator`, `viewer`, `app`, `admin`.
    pub fn role(&self) -> &'static str {
        match self {
            Grant::Controller => "controller",
            Grant::Host(_) => "host",
            Grant::Provider(_) => "provider",
            Grant::Operator => "operator",
            Grant::Viewer => "viewer",
            Grant::App => "app",
            Grant::Admin => "admin",
        }
    }

    /// A file-name-safe name of this grant: `controller`, `host-<id>`, `provider-<name>`, ….
    pub fn file_stem(&self) -> String {
        match self {
            Grant::Host(id) => format!("host-{id}"),
            Grant::Provider(name) => format!("provider-{name}"),
            other => other.role().to_owned(),
        }
    }
}

/// Subjects allowed and denied in one direction. A denial wins over any allowance.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    /// Subjects (with wildcards) allowed.
    pub allow: Vec<String>,
    /// Subjects (with wildcards) denied, even where an allowance matches.
    pub deny: Vec<String>,
}

/// A user's NATS permissions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Permissions {
    /// What it may publish.
    pub publish: Rules,
    /// What it may subscribe to.
    pub subscribe: Rules,
}

impl Permissions {
    /// Whether `subject` may be published: an allowance matches and no denial does.
    pub fn may_publish(&self, subject: &str) -> bool {
        permitted(&self.publish, subject)
    }

    /// Whether a message on the concrete `subject` may be received.
    pub fn may_subscribe(&self, subject: &str) -> bool {
        permitted(&self.subscribe, subject)
    }
}

fn permitted(rules: &Rules, subject: &str) -> bool {
    rules.allow.iter().any(|p| subject_matches(p, subject))
        && !rules.deny.iter().any(|p| subject_matches(p, subject))
}

/// The inbox prefix of the application connection ([`Grant::App`]): its requests' replies come
/// there, since it may not subscribe to `_INBOX.>`.
pub const APP_INBOX_PREFIX: &str = "_INBOX_app";

/// The prefix of the subjects a user's requests get their replies on: `_INBOX.<public key>`, so
/// that no user can read the replies meant for another. Every Trellis process connecting with an
/// nkey or `.creds` sets it (`trellis_bus`); each role may subscribe only under its own.
pub fn inbox_prefix(public_key: &str) -> String {
    format!("_INBOX.{public_key}")
}

/// The JetStream API prefix of a lattice without a JetStream domain.
const JS_API: &str = "$JS.API";

/// The JetStream API prefix of processes in JetStream domain `domain` (`--js-domain`):
/// `$JS.<domain>.API`, or `$JS.API` without a domain.
pub fn js_api(domain: Option<&str>) -> String {
    match domain {
        Some(domain) => format!("$JS.{domain}.API"),
        None => JS_API.to_owned(),
    }
}

/// What a user's permissions are cut to beyond its role.
#[derive(Debug, Clone, Copy)]
pub struct Scope<'a> {
    /// The lattice.
    pub lattice: &'a Lattice,
    /// The user's nkey public key (`U…`): its replies come under [`inbox_prefix`] of it.
    pub public_key: &'a str,
    /// The JetStream domain the lattice's processes name (`--js-domain`): their JetStream API
    /// is `$JS.<domain>.API` (which the server holding the domain checks as `$JS.API`).
    pub js_domain: Option<&'a str>,
}

impl Scope<'_> {
    /// The JetStream API prefix the lattice's processes use.
    fn js_api(&self) -> String {
        js_api(self.js_domain)
    }
}

/// What a reader of stream `stream` needs: its info, ephemeral consumers on it (created with a
/// name or without), their flow control and message gets.
fn stream_reader(js_api: &str, stream: &str, publish: &mut Vec<String>) {
    publish.extend([
        format!("{js_api}.STREAM.INFO.{stream}"),
        format!("{js_api}.CONSUMER.CREATE.{stream}"),
        format!("{js_api}.CONSUMER.CREATE.{stream}.>"),
        format!("{js_api}.CONSUMER.INFO.{stream}.*"),
        // An ordered consumer deletes the one it replaces (after a reconnection, say).
        format!("{js_api}.CONSUMER.DELETE.{stream}.*"),
        format!("{js_api}.STREAM.MSG.GET.{stream}"),
        format!("{js_api}.DIRECT.GET.{stream}"),
        format!("{js_api}.DIRECT.GET.{stream}.>"),
        format!("$JS.FC.{stream}.>"),
    ]);
}

/// What reading and writing the artifact object store needs, beyond reading it.
fn artifact_writer(lattice: &Lattice, publish: &mut Vec<String>) {
    publish.push(format!("$O.{}.>", subject::artifact_bucket(lattice)));
}

/// The artifact object store's stream.
fn artifact_stream(lattice: &Lattice) -> String {
    format!("OBJ_{}", subject::artifact_bucket(lattice))
}

/// The facts a host reports: about itself, the instances it runs, the providers it supervises
/// (and embeds), and the revocation of grants made for an instance that ended.
pub const HOST_FACTS: &[FactKind] = &[
    FactKind::InstanceStarted,
    FactKind::InstanceStartFailed,
    FactKind::InstanceStopped,
    FactKind::InstanceCrashed,
    FactKind::InstanceRestarting,
    FactKind::InstanceGaveUp,
    FactKind::ProviderStartFailed,
    FactKind::ProviderCrashed,
    FactKind::AssignmentRevoked,
];

/// The facts a provider process reports about itself.
pub const PROVIDER_FACTS: &[FactKind] = &[FactKind::ProviderStarted, FactKind::ProviderStopped];

/// Whether a control operation only reads (what a viewer may send).
pub fn is_query(op: CtlOp) -> bool {
    matches!(
        op,
        CtlOp::HostList
            | CtlOp::HostGet
            | CtlOp::LatticeStatus
            | CtlOp::LatticeProjection
            | CtlOp::ComponentList
            | CtlOp::InstanceList
            | CtlOp::InstanceGet
            | CtlOp::InstanceLogs
            | CtlOp::AssignmentList
            | CtlOp::LinkList
            | CtlOp::ProviderList
            | CtlOp::RolloutGet
            | CtlOp::RolloutList
    )
}

/// The NATS permissions of `grant`, a user of `scope`. Every role may publish on any `_INBOX.…`
/// subject (that is how a request is answered) but subscribe only under its own
/// [`inbox_prefix`].
pub fn permissions(scope: &Scope<'_>, grant: &Grant) -> Permissions {
    let l = scope.lattice;
    let api = scope.js_api();
    let events = subject::events_stream(l);
    let heartbeats = subject::heartbeat_stream(l);
    let mut publish = vec!["_INBOX.>".to_owned()];
    let mut subscribe = vec![format!("{}.>", inbox_prefix(scope.public_key))];
    let mut deny_publish = Vec::new();
    match grant {
        Grant::Admin => {
            return Permissions {
                publish: Rules {
                    allow: vec![">".into()],
                    deny: Vec::new(),
                },
                subscribe: Rules {
                    allow: vec![">".into()],
                    deny: Vec::new(),
                },
            };
        }
        Grant::Controller => {
            publish.extend([
                subject::events_all(l),
                dataplane::host_commands_all(l),
                dataplane::provider_controls_all(l),
                subject::drive_all(l),
                format!("{api}.>"),
                "$JS.FC.>".into(),
                "$JS.ACK.>".into(),
                audit::subject_all(l),
            ]);
            artifact_writer(l, &mut publish);
            subscribe.extend([
                subject::ctl_all(l),
                subject::drive_all(l),
                subject::heartbeats_all(l),
                crate::logs::all_instance_logs(l),
            ]);
        }
        Grant::Host(host) => {
            publish.push(subject::heartbeat(l, host));
            publish.extend(
                [FactKind::HostStarted, FactKind::HostStopped]
                    .map(|kind| subject::event(l, kind, host.as_str())),
            );
            publish.extend(HOST_FACTS.iter().map(|k| subject::events_of_kind(l, *k)));
            publish.push(dataplane::provider_rpc_all(l));
            publish.extend(dataplane::components_all(l));
            publish.push(crate::logs::all_instance_logs(l));
            publish.push(audit::subject(l, AuditType::Denied));
            for stream in [&events, &heartbeats, &artifact_stream(l)] {
                stream_reader(&api, stream, &mut publish);
            }
            publish.push(format!("{api}.INFO"));
            subscribe.push(dataplane::host_commands(l, host));
            subscribe.extend(dataplane::components_all(l));
        }
        Grant::Provider(name) => {
            publish.extend(
                PROVIDER_FACTS
                    .iter()
                    .map(|k| subject::events_of_kind(l, *k)),
            );
            publish.push(audit::subject(l, AuditType::Denied));
            publish.extend(dataplane::components_all(l));
            for stream in [&events, &heartbeats, &artifact_stream(l)] {
                stream_reader(&api, stream, &mut publish);
            }
            publish.push(format!("{api}.INFO"));
            if name.as_str() == Capability::KeyValue.default_provider() {
                // Buckets: created on first use, read and written; never updated or deleted.
                publish.extend([
                    format!("{api}.STREAM.CREATE.*"),
                    format!("{api}.STREAM.INFO.*"),
                    format!("{api}.STREAM.MSG.GET.*"),
                    format!("{api}.DIRECT.GET.>"),
                    format!("{api}.CONSUMER.CREATE.>"),
                    "$KV.>".into(),
                ]);
            }
            subscribe.extend([
                dataplane::provider_rpc_of(l, name),
                dataplane::provider_controls_of(l, name),
            ]);
        }
        Grant::Operator | Grant::Viewer => {
            let operator = matches!(grant, Grant::Operator);
            if operator {
                publish.push(subject::ctl_all(l));
                publish.extend(dataplane::components_all(l));
                publish.push(dataplane::provider_controls_all(l));
                stream_reader(&api, &artifact_stream(l), &mut publish);
                artifact_writer(l, &mut publish);
                // The audit stream is the operator's to read (`trellis audit`), not the viewer's.
                stream_reader(&api, &audit::stream(l), &mut publish);
            } else {
                publish.extend(
                    CtlOp::ALL
                        .iter()
                        .filter(|op| is_query(**op))
                        .map(|op| subject::ctl(l, *op)),
                );
            }
            for stream in [&events, &heartbeats] {
                stream_reader(&api, stream, &mut publish);
            }
            publish.push(format!("{api}.INFO"));
            // Facts as they are published (`--wait`, `events --follow`), heartbeats (the
            // dashboard's load and invocation counts) and logs.
            subscribe.push(subject::events_all(l));
            subscribe.push(subject::heartbeats_all(l));
            subscribe.push(crate::logs::all_instance_logs(l));
        }
        Grant::App => {
            let reserved = [
                "trellis.>".to_owned(),
                "$JS.>".into(),
                "$KV.>".into(),
                "$O.>".into(),
                "$SYS.>".into(),
            ];
            // Replies to the lattice's own requests are not the application's to read: its
            // own requests use the inbox prefix [`APP_INBOX_PREFIX`]. It may publish on
            // `_INBOX.>`, which is how a component answers a request it was delivered.
            let mut no_inboxes = reserved.to_vec();
            no_inboxes.push("_INBOX.>".into());
            return Permissions {
                publish: Rules {
                    allow: vec![">".into()],
                    deny: reserved.to_vec(),
                },
                subscribe: Rules {
                    allow: vec![">".into()],
                    deny: no_inboxes,
                },
            };
        }
    }
    if scope.js_domain.is_some() {
        // A server that holds the domain maps `$JS.<domain>.API` onto `$JS.API` before it checks
        // permissions; a leaf node forwarding it to the hub checks the domain's: allow both.
        let local: Vec<String> = publish
            .iter()
            .filter_map(|s| s.strip_prefix(api.as_str()))
            .map(|rest| format!("{JS_API}{rest}"))
            .collect();
        publish.extend(local);
    }
    if !matches!(grant, Grant::Controller) {
        // Belt and braces: whatever the allowances say, no role but the controller manages
        // streams or consumers by name, or deletes anything.
        deny_publish.extend(
            [
                "STREAM.DELETE.>",
                "STREAM.UPDATE.>",
                "STREAM.PURGE.>",
                "STREAM.MSG.DELETE.>",
                "CONSUMER.DURABLE.CREATE.>",
                "ACCOUNT.PURGE.>",
                "STREAM.RESTORE.>",
                "STREAM.SNAPSHOT.>",
            ]
            .into_iter()
            .flat_map(|rest| {
                // The API without a domain too: the server serves both.
                [format!("{api}.{rest}"), format!("{JS_API}.{rest}")]
            }),
        );
        deny_publish.dedup();
    }
    Permissions {
        publish: Rules {
            allow: publish,
            deny: deny_publish,
        },
        subscribe: Rules {
            allow: subscribe,
            deny: Vec::new(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::{HostVerb, ProviderVerb};
    use crate::names::{ComponentName, InstanceId, ProviderId};

    fn l() -> Lattice {
        Lattice::new("prod").unwrap()
    }

    const KEY: &str = "UAUSERKEY";

    fn scope(l: &Lattice) -> Scope<'_> {
        Scope {
            lattice: l,
            public_key: KEY,
            js_domain: None,
        }
    }

    #[test]
    fn a_host_reports_only_what_hosts_report() {
        let h1 = HostId::new("h1").unwrap();
        let h2 = HostId::new("h2").unwrap();
        let p = permissions(&scope(&l()), &Grant::Host(h1.clone()));
        assert!(p.may_publish(&subject::heartbeat(&l(), &h1)));
        assert!(!p.may_publish(&subject::heartbeat(&l(), &h2)));
        assert!(p.may_publish(&subject::event(&l(), FactKind::HostStarted, "h1")));
        assert!(!p.may_publish(&subject::event(&l(), FactKind::HostStarted, "h2")));
        assert!(p.may_publish(&subject::event(&l(), FactKind::InstanceCrashed, "01J")));
        assert!(!p.may_publish(&subject::event(&l(), FactKind::AssignmentGranted, "a1")));
        assert!(!p.may_publish(&subject::event(&l(), FactKind::HostLost, "h2")));
        assert!(p.may_publish(&audit::subject(&l(), AuditType::Denied)));
        assert!(!p.may_publish(&audit::subject(&l(), AuditType::Control)));
        assert!(p.may_subscribe(&dataplane::host_command(&l(), &h1, HostVerb::InstanceStart)));
        assert!(!p.may_subscribe(&dataplane::host_command(&l(), &h2, HostVerb::InstanceStart)));
        assert!(!p.may_publish(&dataplane::host_command(&l(), &h2, HostVerb::InstanceStart)));
        assert!(!p.may_publish(&subject::ctl(&l(), CtlOp::InstanceStart)));
        assert!(!p.may_publish("$JS.API.STREAM.DELETE.TRELLIS_EVENTS_PROD"));
        assert!(!p.may_publish("$JS.API.STREAM.CREATE.TRELLIS_EVENTS_PROD"));
        assert!(p.may_publish("$JS.API.CONSUMER.CREATE.TRELLIS_EVENTS_PROD.x.y"));
    }

    #[test]
    fn a_provider_serves_only_its_own_subjects() {
        let kv = ProviderName::new("kv").unwrap();
        let messaging = ProviderName::new("messaging").unwrap();
        let id = ProviderId::generate();
        let p = permissions(&scope(&l()), &Grant::Provider(messaging.clone()));
        let rpc = |name| dataplane::provider_rpc(&l(), name, Capability::KeyValue);
        assert!(p.may_subscribe(&rpc(&messaging)));
        assert!(!p.may_subscribe(&rpc(&kv)));
        let stop = |name| dataplane::provider_control(&l(), name, &id, ProviderVerb::Stop);
        assert!(p.may_subscribe(&stop(&messaging)));
        assert!(!p.may_subscribe(&stop(&kv)));
        assert!(p.may_publish(&subject::event(
            &l(),
            FactKind::ProviderStarted,
            id.as_str()
        )));
        assert!(!p.may_publish(&subject::event(&l(), FactKind::InstanceStarted, "01J")));
        let web = ComponentName::new("web").unwrap();
        assert!(p.may_publish(&dataplane::component(&l(), &web, dataplane::Op::Call)));
        assert!(!p.may_publish("$JS.API.STREAM.CREATE.KV_x"));
        let kv = permissions(&scope(&l()), &Grant::Provider(kv));
        assert!(kv.may_publish("$JS.API.STREAM.CREATE.KV_x"));
        assert!(!kv.may_publish("$JS.API.STREAM.DELETE.KV_x"));
        assert!(!kv.may_publish("$JS.API.STREAM.UPDATE.KV_x"));
    }

    #[test]
    fn operators_drive_viewers_look() {
        let op = permissions(&scope(&l()), &Grant::Operator);
        let viewer = permissions(&scope(&l()), &Grant::Viewer);
        let start = subject::ctl(&l(), CtlOp::InstanceStart);
        let list = subject::ctl(&l(), CtlOp::InstanceList);
        assert!(op.may_publish(&start) && op.may_publish(&list));
        assert!(!viewer.may_publish(&start) && viewer.may_publish(&list));
        let fact = subject::event(&l(), FactKind::InstanceStarted, "01J");
        assert!(!op.may_publish(&fact) && !viewer.may_publish(&fact));
        let h1 = HostId::new("h1").unwrap();
        let cmd = dataplane::host_command(&l(), &h1, HostVerb::InstanceStart);
        assert!(!op.may_publish(&cmd) && !viewer.may_publish(&cmd));
        let instance = InstanceId::generate();
        assert!(viewer.may_subscribe(&crate::logs::instance_logs(&l(), &instance)));
        assert!(is_query(CtlOp::RolloutList) && !is_query(CtlOp::RolloutStart));
        let read_audit = format!("$JS.API.CONSUMER.CREATE.{}", audit::stream(&l()));
        assert!(op.may_publish(&read_audit) && !viewer.may_publish(&read_audit));
        let denial = audit::subject(&l(), AuditType::Denied);
        assert!(!op.may_publish(&denial) && !viewer.may_publish(&denial));
    }

    #[test]
    fn only_the_controller_manages_streams() {
        let delete = "$JS.API.STREAM.DELETE.TRELLIS_EVENTS_PROD";
        for grant in [
            Grant::Host(HostId::new("h1").unwrap()),
            Grant::Provider(ProviderName::new("kv").unwrap()),
            Grant::Operator,
            Grant::Viewer,
            Grant::App,
        ] {
            assert!(
                !permissions(&scope(&l()), &grant).may_publish(delete),
                "{grant:?}"
            );
        }
        assert!(permissions(&scope(&l()), &Grant::Controller).may_publish(delete));
        let app = permissions(&scope(&l()), &Grant::App);
        assert!(app.may_publish("orders.new") && app.may_subscribe("orders.>"));
        assert!(!app.may_subscribe("trellis.rpc.v1.prod.provider.kv.kv"));
        assert!(!app.may_subscribe("_INBOX.abc.1") && app.may_publish("_INBOX.abc.1"));
        assert!(app.may_subscribe(&format!("{APP_INBOX_PREFIX}.abc.1")));
    }

    #[test]
    fn each_user_reads_only_its_own_inbox() {
        for grant in [
            Grant::Controller,
            Grant::Host(HostId::new("h1").unwrap()),
            Grant::Provider(ProviderName::new("kv").unwrap()),
            Grant::Operator,
            Grant::Viewer,
        ] {
            let p = permissions(&scope(&l()), &grant);
            let own = format!("{}.abc.1", inbox_prefix(KEY));
            assert!(p.may_subscribe(&own), "{grant:?}");
            assert!(!p.may_subscribe("_INBOX.UOTHER.abc.1"), "{grant:?}");
            assert!(!p.may_subscribe("_INBOX.abc.1"), "{grant:?}");
            // Answering someone else's request is publishing on their inbox.
            assert!(p.may_publish("_INBOX.UOTHER.abc.1"), "{grant:?}");
        }
    }

    #[test]
    fn a_jetstream_domain_is_allowed_under_both_api_prefixes_and_so_are_the_denials() {
        let lattice = l();
        let hub = Scope {
            js_domain: Some("hub"),
            ..scope(&lattice)
        };
        let host = permissions(&hub, &Grant::Host(HostId::new("h1").unwrap()));
        let events = subject::events_stream(&lattice);
        for api in ["$JS.hub.API", "$JS.API"] {
            assert!(host.may_publish(&format!("{api}.CONSUMER.CREATE.{events}")));
            assert!(!host.may_publish(&format!("{api}.STREAM.DELETE.{events}")));
            assert!(!host.may_publish(&format!("{api}.STREAM.CREATE.{events}")));
        }
        let controller = permissions(&hub, &Grant::Controller);
        assert!(controller.may_publish(&format!("$JS.hub.API.STREAM.CREATE.{events}")));
        let kv = permissions(&hub, &Grant::Provider(ProviderName::new("kv").unwrap()));
        assert!(kv.may_publish("$JS.hub.API.STREAM.CREATE.KV_x"));
        assert!(!kv.may_publish("$JS.hub.API.STREAM.DELETE.KV_x"));
    }
}
