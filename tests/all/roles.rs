//! Per-role credentials, enforced by a real nats-server with the configuration `trellis creds`
//! writes: a lattice whose every process logs in as its own role works end to end with no
//! permission violation at all, and each forbidden action (a host forging a grant or commanding
//! another host, a provider serving another provider's subject, an operator publishing a fact,
//! a viewer starting an instance, a user reading another's replies, anyone but the controller
//! deleting the fact stream) is refused by NATS while the lattice goes on unaffected; and so in a
//! JetStream domain.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt as _;
use serde_json::{Value, json};
use trellis_schemas::dataplane::{self, HostVerb};
use trellis_schemas::{Capability, FactData, FactKind, HostId, ProviderName, roles, subject};
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
            .custom_inbox_prefix(roles::inbox_prefix(&public_key(creds)))
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

    /// Publishes `{}` on `subject` and waits for the server to refuse it.
    async fn publish_refused(&mut self, what: &str, subject: &str) {
        self.client
            .publish(subject.to_owned(), b"{}".as_slice().into())
            .await
            .unwrap();
        self.refused(what, subject).await;
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

/// The public key of the user whose seed is in `path`.
fn public_key(path: &Path) -> String {
    let seed = std::fs::read_to_string(path).unwrap();
    nkeys::KeyPair::from_seed(seed.trim()).unwrap().public_key()
}

/// The connection options of the admin, whose key is in `creds`.
fn admin(creds: &Path) -> trellis_bus::ConnectArgs {
    trellis_bus::ConnectArgs {
        creds: Some(key(creds, "admin")),
        ..Default::default()
    }
}

/// A NATS client of the server at `url`, logged in as the admin.
async fn admin_client(url: &str, creds: &Path) -> async_nats::Client {
    trellis_bus::connect_with(url, "admin", false, &admin(creds))
        .await
        .unwrap()
}

/// A secured lattice: credentials from `trellis creds`, a nats-server enforcing them, a
/// controller and a host `h1` each logged in with its own key.
struct Secured {
    _dir: tempfile::TempDir,
    creds: PathBuf,
    l: trellis_schemas::Lattice,
    nats: Nats,
    url: String,
    /// The JetStream domain its processes name, if any.
    domain: Option<&'static str>,
    _procs: Vec<Proc>,
}

impl Secured {
    async fn start(name: &str) -> Self {
        Self::start_in(name, None).await
    }

    /// A secured lattice whose processes name the JetStream domain `domain` (`--js-domain`).
    async fn start_in(name: &str, domain: Option<&'static str>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("creds");
        let l = lattice(name);
        let domain_args: Vec<&str> = domain.map(|d| vec!["--js-domain", d]).unwrap_or_default();
        // `trellis creds` needs no server: it writes keys and the server's configuration.
        let mut args = vec!["--lattice", l.as_str()];
        args.extend(&domain_args);
        args.extend([
            "creds",
            creds.to_str().unwrap(),
            "--host",
            "h1",
            "--host",
            "h2",
        ]);
        let (code, out, err) = cli_at("nats://127.0.0.1:1", &args);
        assert_eq!(code, 0, "{out}{err}");
        assert!(
            out.contains("host-h1") && out.contains("provider-kv"),
            "{out}"
        );
        let config = creds.join("nats.conf");
        if let Some(domain) = domain {
            let mut text = std::fs::read_to_string(&config).unwrap();
            text.push_str(&format!("jetstream {{ domain: {domain} }}\n"));
            std::fs::write(&config, text).unwrap();
        }
        let nats = Nats::start_with_args(&["-c", config.to_str().unwrap()]).await;
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
            .chain(&domain_args)
            .map(|s| (*s).to_owned())
            .chain(rest.iter().map(|s| (*s).to_owned()))
            .collect()
        };
        let _controller = Proc::spawn(
            "controller",
            &bin("trellis"),
            &common(
                "controller",
                &[
                    "controller",
                    "--host-timeout",
                    "10s",
                    "--users",
                    creds.join("users.json").to_str().unwrap(),
                    "--system-creds",
                    key(&creds, "system").to_str().unwrap(),
                ],
            ),
            nats.logs(),
        );
        // A host may not create streams: it starts once the controller has (were it first, it
        // would wait for them, after a refusal the server logs).
        let admin_js = jetstream::new(admin_client(&url, &creds).await);
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

        Self {
            _dir: dir,
            creds,
            l,
            nats,
            url,
            domain,
            _procs: vec![_controller, _host],
        }
    }

    /// A NATS client logged in as the admin.
    async fn admin_client(&self) -> async_nats::Client {
        admin_client(&self.url, &self.creds).await
    }

    /// The CLI as `role` (a key file stem: `operator`, `viewer`, …).
    fn cli(&self, role: &str) -> impl Fn(&[&str]) -> (i32, String, String) + use<> {
        let k = key(&self.creds, role);
        let url = self.url.clone();
        let l = self.l.clone();
        let domain = self.domain;
        move |args: &[&str]| {
            let mut all = vec!["--lattice", l.as_str(), "--creds", k.to_str().unwrap()];
            if let Some(domain) = domain {
                all.extend(["--js-domain", domain]);
            }
            all.extend_from_slice(args);
            cli_at(&url, &all)
        }
    }
}

#[tokio::test]
async fn every_role_gets_only_its_own_subjects() {
    let lattice = Secured::start("roles").await;
    let Secured {
        creds,
        l,
        nats,
        url,
        ..
    } = &lattice;
    let as_role = |role: &'static str| lattice.cli(role);
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
    let violations = violations_logged(nats);
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
    let mut host = As::connect(url, &key(creds, "host-h1")).await;
    // A host publishing `assignment.granted`.
    let forged = subject::event(l, FactKind::AssignmentGranted, "forged");
    host.publish_refused("a host publishing assignment.granted", &forged)
        .await;
    // A host sending another host's command, or listening on it.
    let theirs = dataplane::host_command(l, &h2, HostVerb::InstanceStart);
    host.publish_refused("a host commanding another host", &theirs)
        .await;
    let _sub = host.client.subscribe(theirs.clone()).await.unwrap();
    host.refused("a host serving another host's commands", &theirs)
        .await;
    // A host impersonating another host's heartbeat.
    let beat = subject::heartbeat(l, &h2);
    host.publish_refused("a host sending another host's heartbeat", &beat)
        .await;

    // A provider answering another provider's RPC subject.
    let mut messaging = As::connect(url, &key(creds, "provider-messaging")).await;
    let kv = ProviderName::new("kv").unwrap();
    let kv_rpc = dataplane::provider_rpc(l, &kv, Capability::KeyValue);
    let _stolen = messaging
        .client
        .queue_subscribe(kv_rpc.clone(), dataplane::provider_queue(&kv))
        .await
        .unwrap();
    messaging
        .refused("a provider serving another provider's calls", &kv_rpc)
        .await;

    // An operator publishing a fact.
    let mut op = As::connect(url, &key(creds, "operator")).await;
    let fact = subject::event(l, FactKind::InstanceStarted, "01JFORGED");
    op.publish_refused("an operator publishing a fact", &fact)
        .await;

    // A user reading replies meant for another: the operator's, or everyone's.
    let mut snoop = As::connect(url, &key(creds, "viewer")).await;
    let theirs = format!(
        "{}.>",
        roles::inbox_prefix(&public_key(&key(creds, "operator")))
    );
    let _sub = snoop.client.subscribe(theirs.clone()).await.unwrap();
    snoop
        .refused("a viewer reading the operator's replies", &theirs)
        .await;
    let _sub = host.client.subscribe("_INBOX.>").await.unwrap();
    host.refused("a host reading every user's replies", "_INBOX.>")
        .await;

    // Anyone but the controller deleting the fact stream.
    let events = subject::events_stream(l);
    let delete = format!("$JS.API.STREAM.DELETE.{events}");
    for role in [
        "host-h1",
        "provider-kv",
        "provider-messaging",
        "operator",
        "viewer",
        "app",
    ] {
        let mut who = As::connect(url, &key(creds, role)).await;
        let js = jetstream::new(who.client.clone());
        let _ = tokio::time::timeout(Duration::from_secs(3), js.delete_stream(&events)).await;
        who.refused(&format!("{role} deleting the fact stream"), &delete)
            .await;
    }

    // The lattice is unaffected: the stream is there, holds none of the forged facts, and
    // serves as before.
    let facts = facts_with(url, l, &admin(creds)).await;
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

/// The lines of the server's log that report a permission violation.
fn violations_logged(nats: &Nats) -> Vec<String> {
    let server_log = std::fs::read_to_string(nats.logs().join("nats.log")).unwrap();
    server_log
        .lines()
        .filter(|l| l.contains("Violation"))
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn a_secured_lattice_runs_in_a_jetstream_domain() {
    // The permissions name the domain's API (`$JS.hub.API`), which every process uses.
    let lattice = Secured::start_in("domain", Some("hub")).await;
    let operator = lattice.cli("operator");
    trellis_tests::exercise_lattice(&operator, "h1").await;
    let (code, out, err) = lattice.cli("viewer")(&["events", "--type", "instance.started"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("instance.started"), "{out}");
    let violations = violations_logged(&lattice.nats);
    assert!(
        violations.is_empty(),
        "permission violations in normal use:\n{}",
        violations.join("\n")
    );
}

/// The audit events of the lattice, as `trellis audit -o json` prints them for `role`.
fn audit_events(cli: &impl Fn(&[&str]) -> (i32, String, String), kind: &str) -> Vec<Value> {
    let (code, out, err) = cli(&["audit", "--type", kind, "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    out.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["event"].clone())
        .collect()
}

#[tokio::test]
async fn the_audit_stream_records_requests_grants_and_denials_without_payloads() {
    let lattice = Secured::start("audited").await;
    let operator = lattice.cli("operator");
    let viewer = lattice.cli("viewer");
    wait_for("host h1 listed", Duration::from_secs(30), || async {
        let (code, out, _) = viewer(&["host", "ls", "-o", "json"]);
        (code == 0 && out.contains("\"h1\"")).then_some(())
    })
    .await;
    trellis_tests::push_test_component(
        &operator,
        "kv_probe",
        "[component]\nname = \"kv-probe\"\nversion = \"0.1.0\"\n[limits]\nmax_memory = \"16MiB\"\nfuel = 1_000_000_000\ntimeout = \"3s\"\nmax_concurrency = 4\n[capabilities]\nimports = [\"wasi:keyvalue/store\", \"wasi:keyvalue/atomics\", \"wasi:keyvalue/batch\", \"wasi:logging/logging\"]\n",
    );
    let ok = |args: &[&str]| {
        let (code, out, err) = operator(args);
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        out
    };
    ok(&["instance", "start", "kv-probe", "--wait"]);
    // A request that fails is recorded with its code.
    let (code, _, _) = operator(&["instance", "stop", "01JNOSUCHINSTANCE0000000000"]);
    assert_ne!(code, 0);
    // An unassigned capability: refused inside the host, recorded as a denial. The key is
    // application data and must not appear in the record.
    let secret_key = "secret-key-7f3a";
    let answer = ok(&["call", "kv-probe", "get", "\"\"", secret_key]);
    assert!(answer.contains("access-denied"), "{answer}");
    // A grant and its revocation.
    let granted = ok(&[
        "assignment",
        "grant",
        "component:kv-probe",
        "wasi:keyvalue",
        "kv",
        "--config",
        "bucket=audited",
        "-o",
        "json",
    ]);
    let granted: Value = serde_json::from_str(&granted).unwrap();
    let assignment = granted["assignment"]["assignment_id"]
        .as_str()
        .unwrap()
        .to_owned();
    ok(&["assignment", "revoke", &assignment]);

    let control = wait_for("the control events", Duration::from_secs(30), || async {
        let events = audit_events(&operator, "control");
        let has = |op: &str, outcome: &str| {
            events
                .iter()
                .any(|e| e["operation"] == op && e["outcome"] == outcome)
        };
        (has("instance.start", "ok")
            && has("instance.stop", "not_found")
            && has("assignment.revoke", "ok"))
        .then_some(events)
    })
    .await;
    let start = control
        .iter()
        .find(|e| e["operation"] == "instance.start")
        .unwrap();
    assert_eq!(
        start["caller"],
        json!({"user": "operator", "role": "operator", "verified": true}),
        "{start}"
    );
    // The viewer's queries are recorded as the viewer's.
    assert!(
        control
            .iter()
            .any(|e| e["operation"] == "host.list" && e["caller"]["role"] == "viewer"),
        "{control:?}"
    );
    let grants = wait_for(
        "the grant and revoke events",
        Duration::from_secs(30),
        || async {
            let grants = audit_events(&operator, "grant");
            let revokes = audit_events(&operator, "revoke");
            let granted = grants
                .iter()
                .any(|e| e["target"] == "component:kv-probe" && e["capability"] == "wasi:keyvalue");
            let revoked = revokes
                .iter()
                .any(|e| e["target"] == format!("assignment:{assignment}"));
            (granted && revoked).then_some(grants)
        },
    )
    .await;
    // Every controller replica sees the grant; the stream keeps one record of it.
    assert_eq!(
        grants
            .iter()
            .filter(|e| e["target"] == "component:kv-probe")
            .count(),
        1,
        "{grants:?}"
    );
    let denied = wait_for("the denial", Duration::from_secs(30), || async {
        let denied = audit_events(&operator, "denied");
        denied
            .into_iter()
            .find(|e| e["capability"] == "wasi:keyvalue")
    })
    .await;
    assert_eq!(denied["outcome"], "access_denied", "{denied}");
    assert_eq!(denied["source"], "host/h1", "{denied}");

    // A refusal past the assignment check (a bucket the assignment does not name), by the
    // provider.
    ok(&[
        "provider",
        "start",
        "kv",
        "--host",
        "h1",
        "--embedded",
        "--wait",
    ]);
    ok(&[
        "assignment",
        "grant",
        "component:kv-probe",
        "wasi:keyvalue",
        "kv",
        "--config",
        "bucket=audited",
    ]);
    // Called until the grant has reached the host and the provider: the provider refuses.
    let by_provider = wait_for("the provider's denial", Duration::from_secs(30), || async {
        let answer = ok(&["call", "kv-probe", "get", "\"elsewhere\"", secret_key]);
        assert!(answer.contains("access-denied"), "{answer}");
        audit_events(&operator, "denied").into_iter().find(|e| {
            e["provider"] == "kv"
                && e["reason"]
                    .as_str()
                    .is_some_and(|r| r.contains("elsewhere"))
        })
    })
    .await;
    assert_eq!(by_provider["outcome"], "access_denied", "{by_provider}");
    assert!(
        by_provider["source"]
            .as_str()
            .unwrap()
            .starts_with("provider/kv/"),
        "{by_provider}"
    );

    // What the server refuses a Trellis process: a host started as `h2` with `h1`'s key may not
    // send `h2`'s heartbeats, and records each refusal it is told of.
    let _impostor = Proc::spawn(
        "host-h2-with-h1-key",
        &bin("trellis-host"),
        &[
            "--nats",
            &lattice.url,
            "--lattice",
            lattice.l.as_str(),
            "--creds",
            key(&lattice.creds, "host-h1").to_str().unwrap(),
            "--host-id",
            "h2",
            "--heartbeat-interval",
            "200ms",
        ]
        .map(str::to_owned),
        lattice.nats.logs(),
    );
    let beat = subject::heartbeat(&lattice.l, &HostId::new("h2").unwrap());
    let by_nats = wait_for("the server's refusal", Duration::from_secs(30), || async {
        audit_events(&operator, "denied").into_iter().find(|e| {
            e["outcome"] == trellis_bus::audit::REFUSED_BY_NATS
                && e["reason"].as_str().is_some_and(|r| r.contains(&beat))
        })
    })
    .await;
    assert_eq!(by_nats["source"], "host/h2", "{by_nats}");

    // A login the server refuses (a key it does not know): its advisory becomes a denial.
    let stranger = nkeys::KeyPair::new_user();
    let refused = async_nats::ConnectOptions::with_nkey(stranger.seed().unwrap())
        .connect(lattice.url.as_str())
        .await;
    assert!(refused.is_err(), "a stranger logged in");
    let login = wait_for("the refused login", Duration::from_secs(30), || async {
        audit_events(&operator, "denied")
            .into_iter()
            .find(|e| e["outcome"] == "nats_login_refused")
    })
    .await;
    assert_eq!(login["target"], "nats-client:127.0.0.1", "{login}");
    let reason = login["reason"].as_str().unwrap();
    assert!(reason.contains(&stranger.public_key()), "{login}");
    // Security records, not logs: no payload anywhere.
    let (_, all, _) = operator(&["audit", "-o", "json"]);
    assert!(
        !all.contains(secret_key),
        "a payload reached the audit stream"
    );
    // The viewer may not read the audit stream.
    let (code, _, err) = viewer(&["audit"]);
    assert_eq!(code, 5, "{err}");
    // The stream is bounded in age and size.
    let client = lattice.admin_client().await;
    let mut stream = jetstream::new(client)
        .get_stream(trellis_schemas::audit::stream(&lattice.l))
        .await
        .unwrap();
    let config = &stream.info().await.unwrap().config;
    assert_eq!(config.max_age, Duration::from_secs(30 * 24 * 3600));
    assert_eq!(config.max_bytes, 1 << 30);
}

/// The invocations of `component`'s instances on host `h1`, as its next heartbeat reports.
async fn invocations(
    client: &async_nats::Client,
    l: &trellis_schemas::Lattice,
    component: &str,
) -> u64 {
    let h1 = HostId::new("h1").unwrap();
    let mut beats = client.subscribe(subject::heartbeat(l, &h1)).await.unwrap();
    let beat = tokio::time::timeout(Duration::from_secs(10), beats.next())
        .await
        .unwrap()
        .unwrap();
    let beat: trellis_schemas::Heartbeat = serde_json::from_slice(&beat.payload).unwrap();
    beat.instances
        .iter()
        .filter(|i| i.component.starts_with(component))
        .map(|i| i.calls)
        .sum()
}

#[tokio::test]
async fn a_messaging_component_cannot_reach_the_lattice_whatever_its_grant_says() {
    let lattice = Secured::start("hostile").await;
    let l = &lattice.l;
    let operator = lattice.cli("operator");
    wait_for("host h1 listed", Duration::from_secs(30), || async {
        let (code, out, _) = operator(&["host", "ls", "-o", "json"]);
        (code == 0 && out.contains("\"h1\"")).then_some(())
    })
    .await;
    let ok = |args: &[&str]| {
        let (code, out, err) = operator(args);
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        out
    };
    ok(&["provider", "start", "messaging", "--host", "h1", "--wait"]);
    trellis_tests::push_test_component(
        &operator,
        "messenger",
        "[component]\nname = \"messenger\"\nversion = \"0.1.0\"\n[limits]\nmax_memory = \"16MiB\"\nfuel = 1_000_000_000\ntimeout = \"3s\"\nmax_concurrency = 32\n[capabilities]\nimports = [\"wasmcloud:messaging/consumer\", \"wasmcloud:messaging/types\"]\nrequires = [\"wasmcloud:messaging\"]\n",
    );
    // The widest grant there is: every subject, both ways.
    ok(&[
        "instance",
        "start",
        "messenger",
        "--grant",
        "wasmcloud:messaging subscribe=> publish=>",
        "--wait",
    ]);
    let client = lattice.admin_client().await;
    // It answers a request it was delivered (the one inbox it may publish to). A request that
    // found a subscriber but no answer in time may still have been delivered: it is counted.
    let delivered = std::sync::atomic::AtomicU64::new(0);
    let answer = wait_for(
        "an answer from the component",
        Duration::from_secs(30),
        || async {
            let request = client.request("demo.question", "hi".into());
            let answer = tokio::time::timeout(Duration::from_secs(2), request).await;
            if !matches!(&answer, Ok(Err(e)) if e.kind() == async_nats::RequestErrorKind::NoResponders)
            {
                delivered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            answer.ok()?.ok().map(|reply| reply.payload)
        },
    )
    .await;
    let delivered = delivered.into_inner();
    assert_eq!(&answer[..], b"echo: hi");

    // It may name no subject of the lattice, of JetStream or of anyone's replies.
    let events = subject::events_stream(l);
    for forbidden in [
        subject::event(l, FactKind::InstanceStarted, "01JFORGED"),
        subject::ctl(l, trellis_schemas::CtlOp::InstanceStop),
        format!("$JS.API.STREAM.DELETE.{events}"),
        "_INBOX.someone.1".to_owned(),
    ] {
        let (code, out, err) = operator(&[
            "call",
            "messenger",
            "publish",
            &format!("{forbidden:?}"),
            "x",
        ]);
        assert!(
            code != 0 || out.contains("denied"),
            "publishing to {forbidden}: {out}{err}"
        );
    }
    // Subscribed to everything, it was delivered nothing of the lattice's own traffic:
    // heartbeats, facts, control requests and replies flowed all along, yet its invocations
    // are the requests it was delivered (one, unless an answer came late) and the four calls
    // above.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, _, _) = operator(&["instance", "ls"]);
    assert_eq!(code, 0);
    let invoked = invocations(&client, l, "messenger").await;
    assert!(
        (1 + 4..=delivered + 4).contains(&invoked),
        "{invoked} invocations for {delivered} requests delivered and 4 calls"
    );
    // And the lattice is intact.
    let admin_js = jetstream::new(client.clone());
    assert!(
        trellis_bus::events_stream_state(&admin_js, l).await.is_ok(),
        "the fact stream is there"
    );
}
