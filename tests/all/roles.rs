//! Per-role credentials, enforced by a real nats-server with the configuration `trellis creds`
//! writes: a lattice whose every process logs in as its own role works end to end with no
//! permission violation at all, and each forbidden action (a host forging a grant or commanding
//! another host, a provider serving another provider's subject, an operator publishing a fact,
//! a viewer starting an instance, anyone but the controller deleting the fact stream) is
//! refused by NATS while the lattice goes on unaffected.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream;
use trellis_schemas::dataplane::{self, HostVerb};
use trellis_schemas::{Capability, FactData, FactKind, HostId, ProviderName, subject};
use trellis_tests::{Nats, Proc, bin, cli_at, facts_with, lattice, wait_for};

/// A connection as one user, and the permission violations the server reported to it.
struct As {
    client: async_nats::Client,
    violations: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl As {
    async fn connect(url: &str, creds: &Path) -> Self {
        let seed = std::fs::read_to_string(creds).unwrap();
        let (tx, violations) = tokio::sync::mpsc::unbounded_channel();
        let client = async_nats::ConnectOptions::with_nkey(seed.trim().to_owned())
            .event_callback(move |event| {
                let tx = tx.clone();
                async move {
                    let text = event.to_string();
                    if text.to_lowercase().contains("permissions violation") {
                        let _ = tx.send(text);
                    }
                }
            })
            .connect(url)
            .await
            .unwrap();
        Self { client, violations }
    }

    /// Waits for the server to report a violation naming `subject`.
    async fn refused(&mut self, what: &str, subject: &str) {
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(v) = self.violations.recv().await {
                if v.contains(subject) {
                    return v;
                }
            }
            panic!("connection closed");
        })
        .await
        .unwrap_or_else(|_| panic!("{what}: no permissions violation for {subject}"));
        eprintln!("{what}: refused ({seen})");
    }
}

fn key(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.nk"))
}

#[tokio::test]
async fn every_role_gets_only_its_own_subjects() {
    let dir = tempfile::tempdir().unwrap();
    let creds = dir.path().join("creds");
    let l = lattice("roles");
    // `trellis creds` needs no server: it writes keys and the server's configuration.
    let (code, out, err) = cli_at(
        "nats://127.0.0.1:1",
        &[
            "--lattice",
            l.as_str(),
            "creds",
            creds.to_str().unwrap(),
            "--host",
            "h1",
            "--host",
            "h2",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("host-h1") && out.contains("provider-kv"),
        "{out}"
    );
    let nats = Nats::start_with_args(&["-c", creds.join("nats.conf").to_str().unwrap()]).await;
    let url = nats.url();
    let common = |name: &str, rest: &[&str]| -> Vec<String> {
        let k = key(&creds, name);
        [
            "--nats",
            url.as_str(),
            "--lattice",
            l.as_str(),
            "--creds",
            k.to_str().unwrap(),
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .chain(rest.iter().map(|s| (*s).to_owned()))
        .collect()
    };
    let _controller = Proc::spawn(
        "controller",
        &bin("trellis"),
        &common("controller", &["controller", "--host-timeout", "10s"]),
        nats.logs(),
    );
    // A host may not create streams: it starts once the controller has (were it first, it
    // would wait for them, after a refusal the server logs).
    let admin = trellis_bus::ConnectArgs {
        creds: Some(key(&creds, "admin")),
        ..Default::default()
    };
    let admin_client = trellis_bus::connect_with(&url, "admin", false, &admin)
        .await
        .unwrap();
    let admin_js = jetstream::new(admin_client);
    wait_for(
        "the controller to create the streams",
        Duration::from_secs(30),
        || async { trellis_bus::events_stream_state(&admin_js, &l).await.ok() },
    )
    .await;
    let _host = Proc::spawn(
        "host-h1",
        &bin("trellis-host"),
        &common(
            "host-h1",
            &[
                "--host-id",
                "h1",
                "--heartbeat-interval",
                "200ms",
                "--provider-creds",
                creds.to_str().unwrap(),
            ],
        ),
        nats.logs(),
    );
    let as_role = |role: &'static str| {
        let k = key(&creds, role);
        let url = url.clone();
        let l = l.clone();
        move |args: &[&str]| {
            let mut all = vec!["--lattice", l.as_str(), "--creds", k.to_str().unwrap()];
            all.extend_from_slice(args);
            cli_at(&url, &all)
        }
    };
    let operator = as_role("operator");
    // The whole path as an operator: push, start, call, a provider (messaging, with its own
    // key and an application key) started by the host.
    trellis_tests::exercise_lattice(&operator, "h1").await;
    // An embedded provider connects with its own key too.
    let (code, out, err) = operator(&[
        "provider",
        "start",
        "kv",
        "--host",
        "h1",
        "--embedded",
        "--wait",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    // A viewer sees the lattice.
    let viewer = as_role("viewer");
    let (code, out, err) = viewer(&["instance", "ls", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("counter"), "{out}");
    let (code, _, err) = viewer(&["events", "--type", "instance.started"]);
    assert_eq!(code, 0, "{err}");
    // None of it needed a permission it lacked.
    let server_log = std::fs::read_to_string(nats.logs().join("nats.log")).unwrap();
    let violations: Vec<&str> = server_log
        .lines()
        .filter(|l| l.contains("Violation"))
        .collect();
    assert!(
        violations.is_empty(),
        "permission violations in normal use:\n{}",
        violations.join("\n")
    );

    // A viewer cannot start an instance: the CLI says the server refused.
    let (code, _, err) = viewer(&["instance", "start", "counter"]);
    assert_ne!(code, 0);
    assert!(err.contains("permission"), "{err}");

    let h2 = HostId::new("h2").unwrap();
    let mut host = As::connect(&url, &key(&creds, "host-h1")).await;
    // A host publishing `assignment.granted`.
    let forged = subject::event(&l, FactKind::AssignmentGranted, "forged");
    host.client
        .publish(forged.clone(), b"{}".as_slice().into())
        .await
        .unwrap();
    host.refused("a host publishing assignment.granted", &forged)
        .await;
    // A host sending another host's command, or listening on it.
    let theirs = dataplane::host_command(&l, &h2, HostVerb::InstanceStart);
    host.client
        .publish(theirs.clone(), b"{}".as_slice().into())
        .await
        .unwrap();
    host.refused("a host commanding another host", &theirs)
        .await;
    let _sub = host.client.subscribe(theirs.clone()).await.unwrap();
    host.refused("a host serving another host's commands", &theirs)
        .await;
    // A host impersonating another host's heartbeat.
    let beat = subject::heartbeat(&l, &h2);
    host.client
        .publish(beat.clone(), b"{}".as_slice().into())
        .await
        .unwrap();
    host.refused("a host sending another host's heartbeat", &beat)
        .await;

    // A provider answering another provider's RPC subject.
    let mut messaging = As::connect(&url, &key(&creds, "provider-messaging")).await;
    let kv = ProviderName::new("kv").unwrap();
    let kv_rpc = dataplane::provider_rpc(&l, &kv, Capability::KeyValue);
    let _stolen = messaging
        .client
        .queue_subscribe(kv_rpc.clone(), dataplane::provider_queue(&kv))
        .await
        .unwrap();
    messaging
        .refused("a provider serving another provider's calls", &kv_rpc)
        .await;

    // An operator publishing a fact.
    let mut op = As::connect(&url, &key(&creds, "operator")).await;
    let fact = subject::event(&l, FactKind::InstanceStarted, "01JFORGED");
    op.client
        .publish(fact.clone(), b"{}".as_slice().into())
        .await
        .unwrap();
    op.refused("an operator publishing a fact", &fact).await;

    // Anyone but the controller deleting the fact stream.
    let events = subject::events_stream(&l);
    let delete = format!("$JS.API.STREAM.DELETE.{events}");
    for role in [
        "host-h1",
        "provider-kv",
        "provider-messaging",
        "operator",
        "viewer",
        "app",
    ] {
        let mut who = As::connect(&url, &key(&creds, role)).await;
        let js = jetstream::new(who.client.clone());
        let _ = tokio::time::timeout(Duration::from_secs(3), js.delete_stream(&events)).await;
        who.refused(&format!("{role} deleting the fact stream"), &delete)
            .await;
    }

    // The lattice is unaffected: the stream is there, holds none of the forged facts, and
    // serves as before.
    let facts = facts_with(&url, &l, &admin).await;
    assert!(!facts.is_empty());
    assert!(
        !facts.iter().any(|f| matches!(
            &f.event.data,
            FactData::AssignmentGranted(a) if a.assignment_id.as_str() == "forged"
        )),
        "a forged grant reached the stream"
    );
    assert!(
        !facts
            .iter()
            .any(|f| f.event.data.entity_id() == "01JFORGED"),
        "a forged fact reached the stream"
    );
    let (code, out, err) = operator(&["call", "counter", "increment"]);
    assert_eq!((code, out.trim()), (0, "1"), "{err}");
    let (code, out, _) = viewer(&["host", "ls", "-o", "json"]);
    assert_eq!(code, 0);
    assert!(out.contains("\"h1\""), "{out}");
}
