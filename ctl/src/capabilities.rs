//! CLI commands for capability assignments and providers.

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Subcommand;
use futures::StreamExt;
use trellis_schemas::control::{
    AssignmentGrantRequest, AssignmentListRequest, AssignmentRevokeRequest, Grant,
    ProviderListRequest, ProviderStartRequest, ProviderStopRequest,
};
use trellis_schemas::{
    AssignmentId, AssignmentRecord, AssignmentTarget, Capability, ComponentName, Event, FactData,
    HostId, InstanceId, ProviderId, ProviderName, ProviderRecord, subject,
};

use trellis_schemas::manifest::{insert_once, key_values};

use crate::cli::{Failure, Global, Output, ago, failure, print_json};
use crate::client::CtlClient;
use crate::output::Table;

/// `trellis assignment …`
#[derive(Debug, Subcommand)]
pub enum AssignmentCommand {
    /// Grant a capability to an instance or to every instance of a component.
    Grant {
        /// `instance:<id>`, `component:<name>`, or a bare instance id (a ULID) or component name.
        #[arg(value_parser = parse_target)]
        target: AssignmentTarget,
        /// `wasi:keyvalue`, `wasi:http/incoming-handler`, `wasi:http/outgoing-handler` or
        /// `wasmcloud:messaging`; or, as `--grant` takes it, with its provider and
        /// configuration in one argument: `'wasi:keyvalue bucket=counts'`.
        #[arg(value_parser = parse_grant)]
        capability: Grant,
        /// The provider that serves it (`kv`, or `provider=kv`) [default: the capability's
        /// usual provider], and its configuration for this target, `key=value` (`bucket=…`,
        /// `address=…`, `allowed_hosts=…`, `subscribe=…`, `publish=…`).
        #[arg(value_parser = parse_grant_word, value_name = "PROVIDER|KEY=VALUE")]
        words: Vec<GrantWord>,
        /// The provider's configuration for this target, `key=value`; repeat for more.
        #[arg(long = "config", value_parser = parse_kv)]
        config: Vec<(String, String)>,
    },
    /// Revoke an assignment.
    Revoke {
        /// The assignment id.
        assignment_id: AssignmentId,
    },
    /// List assignments in force.
    Ls {
        /// Only those that apply to this instance (its own and its component's).
        #[arg(long)]
        instance: Option<InstanceId>,
        /// Only those that target this component.
        #[arg(long)]
        component: Option<ComponentName>,
    },
}

impl AssignmentCommand {
    /// What can be refused before connecting: a grant whose words conflict.
    pub(crate) fn check(&self) -> Result<(), Failure> {
        if let Self::Grant {
            capability,
            words,
            config,
            ..
        } = self
        {
            complete_grant(capability.clone(), words.clone(), config.clone())
                .map_err(|e| failure(2, e))?;
        }
        Ok(())
    }
}

/// `trellis provider …`
#[derive(Debug, Subcommand)]
pub enum ProviderCommand {
    /// Have a host run and supervise a provider (`trellis-provider-<name>`).
    Start {
        /// `kv`, `http-server`, `http-client` or `messaging`.
        name: ProviderName,
        /// The host that runs it [default: the live host with the fewest providers].
        #[arg(long)]
        host: Option<HostId>,
        /// Provider settings, `key=value`; repeat for more.
        #[arg(long = "config", value_parser = parse_kv)]
        config: Vec<(String, String)>,
        /// Run it inside the host's process (hosts embed `kv` and `http-server`): the host's
        /// instances call an embedded `kv`, and an embedded `http-server` hands requests to
        /// them, without a NATS round trip to another process; it lives and dies with the host.
        #[arg(long)]
        embedded: bool,
        /// Wait until it has started (or failed to).
        #[arg(long)]
        wait: bool,
    },
    /// Stop a provider process (its host does not restart it).
    Stop {
        /// The provider id.
        provider_id: ProviderId,
        /// Wait until it has stopped.
        #[arg(long)]
        wait: bool,
    },
    /// Replace a provider process by a new one (the binary now installed on its host), without
    /// stopping any instance: the new process starts serving before the old one drains.
    Update {
        /// The provider id.
        provider_id: ProviderId,
    },
    /// List provider processes.
    Ls {
        /// Include stopped, crashed and failed ones.
        #[arg(long, short = 'a')]
        all: bool,
    },
}

impl ProviderCommand {
    /// What can be refused before connecting: a setting given twice with two values.
    pub(crate) fn check(&self) -> Result<(), Failure> {
        if let Self::Start { config, .. } = self {
            key_values("the setting", config.iter().cloned()).map_err(|e| failure(2, e))?;
        }
        Ok(())
    }
}

/// Parses `key=value`.
pub(crate) fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

/// Parses an assignment target.
pub(crate) fn parse_target(s: &str) -> Result<AssignmentTarget, String> {
    if let Some(id) = s.strip_prefix("instance:") {
        return InstanceId::new(id)
            .map(AssignmentTarget::Instance)
            .map_err(|e| e.to_string());
    }
    if let Some(name) = s.strip_prefix("component:") {
        return ComponentName::new(name)
            .map(AssignmentTarget::Component)
            .map_err(|e| e.to_string());
    }
    if s.parse::<ulid::Ulid>().is_ok() && s.len() == 26 {
        return InstanceId::new(s)
            .map(AssignmentTarget::Instance)
            .map_err(|e| e.to_string());
    }
    ComponentName::new(s)
        .map(AssignmentTarget::Component)
        .map_err(|e| e.to_string())
}

/// Parses `--grant '<capability> [provider=<name>] [key=value …]'`.
pub(crate) fn parse_grant(s: &str) -> Result<Grant, String> {
    let mut words = s.split_whitespace();
    let capability: Capability = words
        .next()
        .ok_or_else(|| "empty grant; write '<capability> key=value …'".to_owned())?
        .parse()?;
    let mut grant = Grant {
        capability,
        provider: None,
        config: BTreeMap::new(),
    };
    for word in words {
        if !word.contains('=') {
            return Err(format!("{word:?} is not key=value"));
        }
        add_word(&mut grant, parse_grant_word(word)?)?;
    }
    Ok(grant)
}

/// A word of a grant after its capability: its provider, or a setting of its configuration.
#[derive(Debug, Clone)]
pub enum GrantWord {
    /// `<name>` or `provider=<name>`.
    Provider(ProviderName),
    /// `key=value`.
    Config(String, String),
}

/// Parses a [`GrantWord`].
pub(crate) fn parse_grant_word(s: &str) -> Result<GrantWord, String> {
    let provider = |name: &str| {
        ProviderName::new(name)
            .map(GrantWord::Provider)
            .map_err(|e| e.to_string())
    };
    match s.split_once('=') {
        None => provider(s),
        Some(("provider", name)) => provider(name),
        Some(_) => parse_kv(s).map(|(k, v)| GrantWord::Config(k, v)),
    }
}

/// `grant` (the capability argument) completed with the words after it, then the `--config`
/// settings, as `trellis assignment grant` reads them.
fn complete_grant(
    mut grant: Grant,
    words: Vec<GrantWord>,
    config: Vec<(String, String)>,
) -> Result<Grant, String> {
    let config = config.into_iter().map(|(k, v)| GrantWord::Config(k, v));
    for word in words.into_iter().chain(config) {
        add_word(&mut grant, word)?;
    }
    Ok(grant)
}

/// Adds `word` to `grant`, which names one provider at most.
fn add_word(grant: &mut Grant, word: GrantWord) -> Result<(), String> {
    match word {
        GrantWord::Provider(name) => match &grant.provider {
            Some(named) if *named != name => {
                return Err(format!(
                    "a grant has one provider, and both `{named}` and `{name}` were named"
                ));
            }
            _ => grant.provider = Some(name),
        },
        GrantWord::Config(k, v) => insert_once("the setting", &mut grant.config, k, v)?,
    }
    Ok(())
}

fn config_text(config: &BTreeMap<String, String>) -> String {
    if config.is_empty() {
        return "-".to_owned();
    }
    let parts: Vec<String> = config.iter().map(|(k, v)| format!("{k}={v}")).collect();
    parts.join(" ")
}

fn print_assignments(records: &[AssignmentRecord]) {
    let mut table = Table::new(&["ASSIGNMENT", "TARGET", "CAPABILITY", "PROVIDER", "CONFIG"]);
    for r in records {
        let a = &r.assignment;
        table.row(vec![
            a.assignment_id.to_string(),
            a.target.describe(),
            a.capability.to_string(),
            a.provider.to_string(),
            config_text(&a.config),
        ]);
    }
    print!("{}", table.render());
}

pub(crate) async fn assignment(
    g: &Global,
    client: &CtlClient,
    cmd: AssignmentCommand,
) -> Result<(), Failure> {
    match cmd {
        AssignmentCommand::Grant {
            target,
            capability,
            words,
            config,
        } => {
            let grant = complete_grant(capability, words, config).map_err(|e| failure(2, e))?;
            let reply = client
                .request(&AssignmentGrantRequest {
                    target,
                    capability: grant.capability,
                    provider: grant.provider,
                    config: grant.config,
                })
                .await?;
            if g.output == Output::Json {
                return print_json(&reply);
            }
            println!(
                "granted {} to {} ({} by {}, seq {})",
                reply.assignment.capability,
                reply.assignment.target.describe(),
                reply.assignment.assignment_id,
                reply.assignment.provider,
                reply.seq
            );
            Ok(())
        }
        AssignmentCommand::Revoke { assignment_id } => {
            let reply = client
                .request(&AssignmentRevokeRequest { assignment_id })
                .await?;
            if g.output == Output::Json {
                return print_json(&reply);
            }
            println!(
                "revoked {} ({} from {})",
                reply.assignment.assignment_id,
                reply.assignment.capability,
                reply.assignment.target.describe()
            );
            Ok(())
        }
        AssignmentCommand::Ls {
            instance,
            component,
        } => {
            let reply = client
                .request(&AssignmentListRequest {
                    instance_id: instance,
                    component,
                    min_seq: None,
                })
                .await?;
            if g.output == Output::Json {
                return print_json(&reply);
            }
            print_assignments(&reply.assignments);
            Ok(())
        }
    }
}

fn print_providers(records: &[ProviderRecord]) {
    let mut table = Table::new(&[
        "PROVIDER", "NAME", "STATUS", "HOST", "NODE", "VERSION", "RESTARTS", "SINCE",
    ]);
    for p in records {
        table.row(vec![
            p.provider_id.to_string(),
            p.name.to_string(),
            p.status.as_str().to_owned(),
            match (&p.host_id, p.embedded) {
                (Some(host), true) => format!("{host} (embedded)"),
                (Some(host), false) => host.to_string(),
                (None, _) => "standalone".to_owned(),
            },
            p.node.clone().unwrap_or_else(|| "-".to_owned()),
            p.version.clone().unwrap_or_else(|| "-".to_owned()),
            p.restarts.to_string(),
            ago(p.status_since),
        ]);
    }
    print!("{}", table.render());
}

/// Waits for the fact about `provider` that `done` accepts (or a failure fact), up to `timeout`.
async fn wait_provider(
    facts: &mut async_nats::Subscriber,
    provider: &ProviderId,
    timeout: Duration,
    done: impl Fn(&FactData) -> bool,
) -> Result<Event, Failure> {
    let wait = async {
        while let Some(message) = facts.next().await {
            let Ok(event) = Event::decode(&message.payload) else {
                continue;
            };
            if event.data.entity_id() != provider.as_str() {
                continue;
            }
            if done(&event.data) || matches!(event.data, FactData::ProviderStartFailed(_)) {
                return Some(event);
            }
        }
        None
    };
    match tokio::time::timeout(timeout, wait).await {
        Ok(Some(event)) => Ok(event),
        Ok(None) => Err(failure(4, "the connection to NATS closed")),
        Err(_) => Err(failure(
            1,
            format!(
                "provider {provider}: no outcome within {timeout:?}; see `trellis provider ls`"
            ),
        )),
    }
}

/// Starts a provider like `old` and waits until it serves; returns its id.
async fn start_and_wait(
    client: &CtlClient,
    request: ProviderStartRequest,
    facts: &mut async_nats::Subscriber,
) -> Result<ProviderId, Failure> {
    let reply = client.request(&request).await?;
    let event = wait_provider(facts, &reply.provider_id, Duration::from_secs(60), |d| {
        matches!(d, FactData::ProviderStarted(_))
    })
    .await?;
    if let FactData::ProviderStartFailed(d) = &event.data {
        return Err(failure(
            1,
            format!("provider {} failed to start: {}", d.provider_id, d.reason),
        ));
    }
    Ok(reply.provider_id)
}

pub(crate) async fn provider(
    g: &Global,
    client: &CtlClient,
    cmd: ProviderCommand,
) -> Result<(), Failure> {
    let facts_subject = subject::provider_events(client.lattice());
    match cmd {
        ProviderCommand::Start {
            name,
            host,
            config,
            embedded,
            wait,
        } => {
            let request = ProviderStartRequest {
                name,
                host_id: host,
                config: key_values("the setting", config).map_err(|e| failure(2, e))?,
                embedded,
            };
            if wait {
                let mut facts = client
                    .nats()
                    .subscribe(facts_subject)
                    .await
                    .map_err(|e| failure(4, e.to_string()))?;
                let id = start_and_wait(client, request, &mut facts).await?;
                if g.output == Output::Json {
                    return print_json(&serde_json::json!({ "provider_id": id }));
                }
                println!("provider {id} started");
                return Ok(());
            }
            let reply = client.request(&request).await?;
            if g.output == Output::Json {
                return print_json(&reply);
            }
            println!(
                "provider {} starting on host {} (operation {})",
                reply.provider_id, reply.host_id, reply.operation_id
            );
            Ok(())
        }
        ProviderCommand::Stop { provider_id, wait } => {
            let mut facts = client
                .nats()
                .subscribe(facts_subject)
                .await
                .map_err(|e| failure(4, e.to_string()))?;
            client
                .request(&ProviderStopRequest {
                    provider_id: provider_id.clone(),
                })
                .await?;
            if wait {
                wait_provider(&mut facts, &provider_id, Duration::from_secs(30), |d| {
                    matches!(d, FactData::ProviderStopped(_))
                })
                .await?;
            }
            println!("provider {provider_id} stopping");
            Ok(())
        }
        ProviderCommand::Update { provider_id } => {
            let list = client.request(&ProviderListRequest::default()).await?;
            let old = list
                .providers
                .iter()
                .find(|p| p.provider_id == provider_id)
                .ok_or_else(|| failure(3, format!("no provider {provider_id}")))?;
            let Some(host) = old.host_id.clone() else {
                return Err(failure(
                    1,
                    format!(
                        "provider {provider_id} runs standalone: start the new version next to it, then `trellis provider stop {provider_id}`"
                    ),
                ));
            };
            let mut facts = client
                .nats()
                .subscribe(facts_subject)
                .await
                .map_err(|e| failure(4, e.to_string()))?;
            // The host remembers each provider's settings; start the new process with the same
            // name on the same host, then retire the old one.
            let config = old_config(client, &old.name, &provider_id).await;
            let new = start_and_wait(
                client,
                ProviderStartRequest {
                    name: old.name.clone(),
                    host_id: Some(host),
                    config,
                    embedded: old.embedded,
                },
                &mut facts,
            )
            .await?;
            client
                .request(&ProviderStopRequest {
                    provider_id: provider_id.clone(),
                })
                .await?;
            wait_provider(&mut facts, &provider_id, Duration::from_secs(30), |d| {
                matches!(d, FactData::ProviderStopped(_))
            })
            .await?;
            if g.output == Output::Json {
                return print_json(&serde_json::json!({ "old": provider_id, "new": new }));
            }
            println!("provider {provider_id} replaced by {new}");
            Ok(())
        }
        ProviderCommand::Ls { all } => {
            let mut reply = client.request(&ProviderListRequest::default()).await?;
            if !all {
                reply.providers.retain(|p| {
                    matches!(
                        p.status,
                        trellis_schemas::ProviderStatus::Running
                            | trellis_schemas::ProviderStatus::Restarting
                    )
                });
            }
            if g.output == Output::Json {
                return print_json(&reply);
            }
            print_providers(&reply.providers);
            Ok(())
        }
    }
}

/// The settings a provider process runs with, as it reports them on its control subject
/// (empty when it does not answer).
async fn old_config(
    client: &CtlClient,
    name: &ProviderName,
    provider: &ProviderId,
) -> BTreeMap<String, String> {
    let subject = trellis_schemas::dataplane::provider_control(
        client.lattice(),
        name,
        provider,
        trellis_schemas::dataplane::ProviderVerb::Config,
    );
    let Ok(Ok(reply)) = tokio::time::timeout(
        Duration::from_secs(3),
        client.nats().request(subject, Vec::new().into()),
    )
    .await
    else {
        return BTreeMap::new();
    };
    serde_json::from_slice::<trellis_schemas::Reply<BTreeMap<String, String>>>(&reply.payload)
        .ok()
        .and_then(|r| r.into_result().ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        command: AssignmentCommand,
    }

    /// What `trellis assignment grant <args>` would ask the controller for.
    fn grant(args: &[&str]) -> Result<Grant, String> {
        let cli = Cli::try_parse_from(["trellis", "grant", "component:c"].iter().chain(args))
            .map_err(|e| e.to_string())?;
        let AssignmentCommand::Grant {
            capability,
            words,
            config,
            ..
        } = cli.command
        else {
            panic!("not a grant");
        };
        complete_grant(capability, words, config)
    }

    /// The form `--grant` takes, positional words and `--config` all say the same thing.
    #[test]
    fn a_grant_reads_alike_in_every_form() {
        let expected = Grant {
            capability: Capability::KeyValue,
            provider: Some(ProviderName::new("kv").expect("name")),
            config: BTreeMap::from([("bucket".to_owned(), "counts".to_owned())]),
        };
        for args in [
            &["wasi:keyvalue", "kv", "--config", "bucket=counts"][..],
            &["wasi:keyvalue", "kv", "bucket=counts"],
            &["wasi:keyvalue", "provider=kv", "bucket=counts"],
            &["wasi:keyvalue provider=kv bucket=counts"],
            &["wasi:keyvalue bucket=counts", "kv"],
        ] {
            assert_eq!(grant(args).as_ref(), Ok(&expected), "{args:?}");
        }
        let plain = grant(&["wasi:keyvalue"]).expect("grant");
        assert_eq!((plain.provider, plain.config.len()), (None, 0));
    }

    #[test]
    fn a_grant_names_one_provider_and_a_known_capability() {
        let err = grant(&["wasi:keyvalue", "kv", "other"]).expect_err("two providers");
        assert!(err.contains("both `kv` and `other`"), "{err}");
        let err = grant(&["wasi:keyvalue provider=kv", "provider=other"]).expect_err("two");
        assert!(err.contains("one provider"), "{err}");
        let err = grant(&["wasi:nothing bucket=x"]).expect_err("unknown capability");
        assert!(err.contains("unknown capability"), "{err}");
        let err = grant(&["wasi:keyvalue", "Not A Name"]).expect_err("bad provider name");
        assert!(err.contains("Not A Name"), "{err}");
        let err = parse_grant("wasi:keyvalue kv").expect_err("a bare word in --grant");
        assert!(err.contains("not key=value"), "{err}");
    }

    /// A setting given twice with two values, in any of the forms, is refused, not settled by
    /// the order of the arguments; given twice alike, it is one setting.
    #[test]
    fn a_setting_given_twice_with_two_values_is_refused() {
        for args in [
            &["wasi:keyvalue bucket=x", "--config", "bucket=y"][..],
            &["wasi:keyvalue", "bucket=x", "bucket=y"],
            &[
                "wasi:keyvalue",
                "--config",
                "bucket=x",
                "--config",
                "bucket=y",
            ],
            &["wasi:keyvalue bucket=x bucket=y"],
        ] {
            let err = grant(args).expect_err("two values");
            assert!(
                err.contains("`bucket` is given twice, as `x` and as `y`"),
                "{args:?}: {err}"
            );
        }
        let alike = grant(&["wasi:keyvalue bucket=x", "--config", "bucket=x"]).expect("alike");
        assert_eq!(
            alike.config,
            BTreeMap::from([("bucket".into(), "x".into())])
        );
        let labels = [("zone", "a"), ("tier", "b"), ("zone", "c")]
            .map(|(k, v)| (k.to_owned(), v.to_owned()));
        let err = key_values("the label", labels).expect_err("two zones");
        assert!(err.starts_with("the label `zone` is given twice"), "{err}");
    }
}
