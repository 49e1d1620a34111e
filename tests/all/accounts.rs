//! A lattice is a NATS account: two lattices with the same name on one server, in two accounts,
//! each run by its own controller and host, see nothing of each other — not their hosts, not
//! their components, not their facts in JetStream, not their traffic; the one way across is an
//! explicit export (here A's `counter`, imported by B under a subject of its own).

use std::time::Duration;

use futures::StreamExt as _;
use trellis_schemas::dataplane::{self, Op};
use trellis_schemas::{ComponentName, CtlOp, FactData, FactKind, subject};
use trellis_tests::{Nats, Proc, bin, cli_at, components, facts_at, lattice, wait_for};

const T: Duration = Duration::from_secs(30);

const COUNTER: &str = "[component]\nname = \"counter\"\nversion = \"1.0.0\"\n[limits]\nmax_memory = \"16MiB\"\nfuel = 50000000\ntimeout = \"2s\"\nmax_concurrency = 4\n";

#[tokio::test]
async fn two_lattices_in_two_accounts_see_nothing_of_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("accounts.conf");
    // The same lattice name in both accounts: only the account separates them.
    let l = lattice("default");
    let shared = dataplane::component(&l, &ComponentName::new("counter").unwrap(), Op::Call);
    std::fs::write(
        &conf,
        format!(
            r#"
accounts {{
  LATTICE_A: {{
    jetstream: enabled, users: [ {{ user: a, password: a-secret }} ]
    # The one thing A shares: calls to its component `counter`.
    exports: [ {{ service: "{shared}" }} ]
  }}
  LATTICE_B: {{
    jetstream: enabled, users: [ {{ user: b, password: b-secret }} ]
    imports: [ {{ service: {{ account: LATTICE_A, subject: "{shared}" }}, to: "partner.counter.call" }} ]
  }}
}}
"#
        ),
    )
    .unwrap();
    let nats = Nats::start_with_args(&["-c", conf.to_str().unwrap()]).await;
    let url = |user: &str| format!("nats://{user}:{user}-secret@127.0.0.1:{}", nats.port);
    let (a, b) = (url("a"), url("b"));
    let start = |url: &str, host: &str| {
        let common = |rest: &[&str]| -> Vec<String> {
            ["--nats", url, "--lattice", l.as_str()]
                .iter()
                .chain(rest)
                .map(|s| (*s).to_owned())
                .collect()
        };
        (
            Proc::spawn(
                &format!("controller-{host}"),
                &bin("trellis"),
                &common(&["controller", "--host-timeout", "10s"]),
                nats.logs(),
            ),
            Proc::spawn(
                &format!("host-{host}"),
                &bin("trellis-host"),
                &common(&["--host-id", host, "--heartbeat-interval", "200ms"]),
                nats.logs(),
            ),
        )
    };
    let _a = start(&a, "ha");
    let _b = start(&b, "hb");
    let hosts = |url: String| async move {
        let (code, out, _) = cli_at(&url, &["host", "ls", "-o", "json"]);
        let reply: serde_json::Value = serde_json::from_str(&out).ok()?;
        let ids: Vec<String> = reply["hosts"]
            .as_array()?
            .iter()
            .filter_map(|h| h["host_id"].as_str().map(str::to_owned))
            .collect();
        (code == 0 && !ids.is_empty()).then_some(ids)
    };
    assert_eq!(wait_for("A's host", T, || hosts(a.clone())).await, ["ha"]);
    assert_eq!(wait_for("B's host", T, || hosts(b.clone())).await, ["hb"]);

    // Account B listens to everything it can while A is used.
    let b_client = trellis_bus::connect(&b, "account-b-listener", false)
        .await
        .unwrap();
    let mut everything_in_b = b_client.subscribe(">").await.unwrap();
    let manifest = dir.path().join("counter.toml");
    std::fs::write(&manifest, COUNTER).unwrap();
    let wasm = components::build().path("counter");
    let ok = |url: &str, args: &[&str]| {
        let mut all = vec!["--lattice", l.as_str()];
        all.extend_from_slice(args);
        let (code, out, err) = cli_at(url, &all);
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        out
    };
    ok(
        &a,
        &[
            "component",
            "push",
            wasm.to_str().unwrap(),
            "--manifest",
            manifest.to_str().unwrap(),
        ],
    );
    ok(&a, &["instance", "start", "counter", "--wait"]);
    assert_eq!(ok(&a, &["call", "counter", "increment"]).trim(), "1");

    // B has no such component, and cannot call A's.
    let listed: serde_json::Value =
        serde_json::from_str(&ok(&b, &["component", "ls", "-o", "json"])).unwrap();
    assert_eq!(listed["components"].as_array().unwrap().len(), 0);
    let (code, _, _) = cli_at(
        &b,
        &["--lattice", l.as_str(), "call", "counter", "increment"],
    );
    assert_ne!(code, 0, "B reaches no instance of A's component");

    // Nothing of A's traffic reached B's subscriber: only B's own heartbeats and requests.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    let mut own = 0;
    while let Ok(Some(message)) = tokio::time::timeout_at(deadline, everything_in_b.next()).await {
        let text = String::from_utf8_lossy(&message.payload);
        own += usize::from(text.contains("\"hb\""));
        assert!(
            !text.contains("\"ha\"") && !text.contains("counter"),
            "account B saw A's traffic on {}: {text}",
            message.subject
        );
    }
    assert!(own > 0, "the subscriber in B hears B's own host");

    // Each account's JetStream holds its own lattice's facts only.
    let facts_a = facts_at(&a, &l).await;
    let facts_b = facts_at(&b, &l).await;
    let hosts_started = |facts: &[trellis_schemas::Fact]| -> Vec<String> {
        facts
            .iter()
            .filter_map(|f| match &f.event.data {
                FactData::HostStarted(d) => Some(d.host_id.to_string()),
                _ => None,
            })
            .collect()
    };
    assert_eq!(hosts_started(&facts_a), ["ha"]);
    assert_eq!(hosts_started(&facts_b), ["hb"]);
    assert!(
        facts_a
            .iter()
            .any(|f| f.event.kind() == FactKind::InstanceStarted)
    );
    assert!(
        !facts_b
            .iter()
            .any(|f| f.event.kind() == FactKind::ArtifactStored
                || f.event.kind() == FactKind::InstanceStarted)
    );

    // Across accounts only through the explicit export: B reaches A's counter on the subject
    // it imported it as, and nothing else of A's (its control subjects, its other components).
    drop(everything_in_b);
    let call = |subject: &'static str| {
        let client = b_client.clone();
        async move {
            let request = trellis_bus::dataplane::request(
                &client,
                subject.to_owned(),
                trellis_bus::dataplane::call_headers("increment"),
                b"[]".to_vec().into(),
                Duration::from_secs(5),
            );
            request.await
        }
    };
    let reply = call("partner.counter.call")
        .await
        .expect("the imported service answers");
    trellis_bus::dataplane::read_reply(&reply).expect("a successful call");
    assert_eq!(String::from_utf8_lossy(&reply.payload).trim(), "1");
    for not_exported in ["partner.counter.http", "partner.other.call"] {
        let got = call(not_exported).await;
        assert!(
            matches!(
                got,
                Err(trellis_bus::dataplane::SendError::NoResponders
                    | trellis_bus::dataplane::SendError::TimedOut(_))
            ),
            "{not_exported} reaches nothing: {:?}",
            got.map(|m| m.payload)
        );
    }
    let status = b_client
        .request(subject::ctl(&l, CtlOp::LatticeStatus), "{}".into())
        .await
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.payload).unwrap();
    assert_eq!(
        status["data"]["hosts"]["up"], 1,
        "B's control subject is B's own controller: {status}"
    );
}
