//! Instances on a real host: commands on the host's subjects, artifacts from the object store,
//! calls on the data plane, crashes, restart policies, stop and drain. The host is driven
//! directly (no controller), with real guest components.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream::{self, object_store};
use async_nats::{HeaderMap, Message};
use nix::sys::signal::Signal;
use sha2::Digest as _;
use trellis_schemas::dataplane::{self, HostVerb, Op, headers};
use trellis_schemas::instance::{
    CommandAccepted, ComponentSource, ManifestDoc, RestartPolicy, StartInstanceCommand,
    StopInstanceCommand,
};
use trellis_schemas::{
    ComponentName, ErrorBody, ErrorCode, Fact, FactData, FactKind, Heartbeat, InstanceId, Lattice,
    Reply, subject,
};
use trellis_tests::{Nats, Proc, bin, components, lattice, wait_for};

const T: Duration = Duration::from_secs(15);

/// A host started with ceilings and a pool sized for tests, and a compiled-artifact cache shared
/// by every test run.
fn host(nats: &Nats, l: &Lattice, id: &str, extra: &[&str]) -> Proc {
    let cache = components::build().target_dir().join("host-cache");
    let mut args: Vec<String> = [
        "--nats",
        &nats.url(),
        "--lattice",
        l.as_str(),
        "--host-id",
        id,
        "--heartbeat-interval",
        "200ms",
        "--max-memory",
        "64MiB",
        "--max-fuel",
        "1000000000000",
        "--pooling-instances",
        "64",
        "--cache-dir",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    args.push(cache.display().to_string());
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    Proc::spawn(
        &format!("host-{id}"),
        &bin("trellis-host"),
        &args,
        nats.logs(),
    )
}

/// A manifest for guest `name` with limits generous for well-behaved calls: the `loop` guest,
/// which is meant to time out, gets 300 ms, every other one 10 s, so that a loaded machine never
/// turns a call that should succeed (or crash otherwise) into a timeout.
fn manifest(name: &str) -> ManifestDoc {
    ManifestDoc {
        name: ComponentName::new(name.replace('_', "-")).unwrap(),
        version: "0.1.0".into(),
        max_memory_bytes: 16 * 1024 * 1024,
        fuel: 100_000_000_000,
        timeout_ms: if name == "loop" { 300 } else { 10_000 },
        max_concurrency: 64,
        imports: Vec::new(),
        requires: vec![],
        required_links: vec![],
        isolation: Default::default(),
    }
}

fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// Stores `bytes` in the lattice's artifact bucket under `name`.
async fn put_object(nats: &Nats, l: &Lattice, name: &str, bytes: &[u8]) {
    let js = jetstream::new(nats.client().await);
    let bucket = subject::artifact_bucket(l);
    let store = match js.get_object_store(&bucket).await {
        Ok(store) => store,
        Err(_) => js
            .create_object_store(object_store::Config {
                bucket,
                ..Default::default()
            })
            .await
            .unwrap(),
    };
    store.put(name, &mut &bytes[..]).await.unwrap();
}

/// Stores guest `name` under its digest and returns the artifact source.
async fn artifact(nats: &Nats, l: &Lattice, name: &str) -> ComponentSource {
    let bytes = components::build().bytes(name);
    let digest = digest_of(&bytes);
    put_object(nats, l, digest.trim_start_matches("sha256:"), &bytes).await;
    ComponentSource::Artifact {
        digest,
        manifest: manifest(name),
        signature: None,
    }
}

async fn command(
    client: &async_nats::Client,
    l: &Lattice,
    host: &str,
    verb: &str,
    body: Vec<u8>,
) -> Result<CommandAccepted, ErrorBody> {
    let host = trellis_schemas::HostId::new(host).unwrap();
    // Built from a known verb's subject, so that unknown verbs can be sent too.
    let known = dataplane::host_command(l, &host, HostVerb::InstanceStart);
    let subject = known.replace(HostVerb::InstanceStart.as_str(), verb);
    let reply = wait_for("the host to answer a command", T, || {
        let (subject, body) = (subject.clone(), body.clone());
        async move { client.request(subject, body.into()).await.ok() }
    })
    .await;
    serde_json::from_slice::<Reply<CommandAccepted>>(&reply.payload)
        .unwrap()
        .into_result()
}

async fn start(
    client: &async_nats::Client,
    l: &Lattice,
    host: &str,
    id: &str,
    component: ComponentSource,
    restart: RestartPolicy,
) -> Result<CommandAccepted, ErrorBody> {
    let cmd = StartInstanceCommand {
        operation_id: format!("op-start-{id}"),
        instance_id: InstanceId::new(id).unwrap(),
        component,
        restart,
        assignments: vec![],
        isolation: None,
    };
    command(
        client,
        l,
        host,
        "instance.start",
        serde_json::to_vec(&cmd).unwrap(),
    )
    .await
}

async fn stop(
    client: &async_nats::Client,
    l: &Lattice,
    host: &str,
    id: &str,
) -> Result<CommandAccepted, ErrorBody> {
    let cmd = StopInstanceCommand {
        operation_id: format!("op-stop-{id}"),
        instance_id: InstanceId::new(id).unwrap(),
        reason: None,
    };
    command(
        client,
        l,
        host,
        "instance.stop",
        serde_json::to_vec(&cmd).unwrap(),
    )
    .await
}

/// The facts about instance `id`, in stream order.
async fn facts_of(nats: &Nats, l: &Lattice, id: &str) -> Vec<Fact> {
    nats.facts(l)
        .await
        .into_iter()
        .filter(|f| f.event.kind().noun() == "instance" && f.event.data.entity_id() == id)
        .collect()
}

/// Waits until instance `id` has `n` facts of `kind`; returns all its facts.
async fn wait_facts(nats: &Nats, l: &Lattice, id: &str, kind: FactKind, n: usize) -> Vec<Fact> {
    wait_for(&format!("{n} × {kind:?} of {id}"), T, || async {
        let facts = facts_of(nats, l, id).await;
        (facts.iter().filter(|f| f.event.kind() == kind).count() >= n).then_some(facts)
    })
    .await
}

fn kinds(facts: &[Fact]) -> Vec<FactKind> {
    facts.iter().map(|f| f.event.kind()).collect()
}

/// A call's reply: status, error code, reason, instance, body.
#[derive(Debug)]
struct Answer {
    status: String,
    code: Option<String>,
    reason: Option<String>,
    instance: Option<String>,
    body: String,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        assert_eq!(self.status, "ok", "call failed: {self:?}");
        serde_json::from_str(&self.body).unwrap()
    }
}

fn answer(message: Message) -> Answer {
    let header = |name: &str| {
        message
            .headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str().to_owned())
    };
    Answer {
        status: header(headers::STATUS).unwrap_or_default(),
        code: header(headers::ERROR_CODE),
        reason: header(headers::REASON),
        instance: header(headers::INSTANCE),
        body: String::from_utf8_lossy(&message.payload).into_owned(),
    }
}

async fn try_call(
    client: &async_nats::Client,
    subject: &str,
    export: &str,
    body: &str,
) -> Result<Answer, async_nats::RequestError> {
    let mut headers = HeaderMap::new();
    headers.insert(headers::EXPORT, export);
    client
        .request_with_headers(subject.to_owned(), headers, body.to_owned().into())
        .await
        .map(answer)
}

async fn call(client: &async_nats::Client, subject: &str, export: &str, body: &str) -> Answer {
    try_call(client, subject, export, body).await.unwrap()
}

fn by_component(l: &Lattice, name: &str) -> String {
    dataplane::component(
        l,
        &ComponentName::new(name.replace('_', "-")).unwrap(),
        Op::Call,
    )
}

fn by_instance(l: &Lattice, id: &str) -> String {
    dataplane::instance(l, &InstanceId::new(id).unwrap(), Op::Call)
}

fn is_no_responders(result: &Result<Answer, async_nats::RequestError>) -> bool {
    matches!(result, Err(e) if e.kind() == async_nats::client::RequestErrorKind::NoResponders)
}

#[tokio::test]
async fn counter_is_fresh_on_every_call_through_both_subjects() {
    let nats = Nats::start().await;
    let l = lattice("inst-counter");
    let _host = host(&nats, &l, "h1", &[]);
    let client = nats.client().await;
    let source = artifact(&nats, &l, "counter").await;
    let digest = match &source {
        ComponentSource::Artifact { digest, .. } => digest.clone(),
        ComponentSource::File { .. } => unreachable!(),
    };
    start(&client, &l, "h1", "c1", source, RestartPolicy::Never)
        .await
        .unwrap();
    let facts = wait_facts(&nats, &l, "c1", FactKind::InstanceStarted, 1).await;
    assert_eq!(kinds(&facts), vec![FactKind::InstanceStarted]);
    assert_eq!(facts[0].event.causation_id.as_deref(), Some("op-start-c1"));
    match &facts[0].event.data {
        FactData::InstanceStarted(d) => {
            assert_eq!(d.attempt, 0);
            assert_eq!(d.digest, digest);
            assert_eq!(d.component.as_str(), "counter");
            assert_eq!(d.host_id.as_str(), "h1");
        }
        other => panic!("unexpected {other:?}"),
    }

    for subject in [by_component(&l, "counter"), by_instance(&l, "c1")] {
        for _ in 0..3 {
            let a = call(&client, &subject, "increment", "").await;
            assert_eq!(a.json(), 1, "a fresh store for every call");
            assert_eq!(a.instance.as_deref(), Some("c1"));
        }
    }
    assert_eq!(
        call(&client, &by_instance(&l, "c1"), "peek", "[]")
            .await
            .json(),
        0
    );

    // The heartbeat lists the instance.
    let mut heartbeats = client
        .subscribe(subject::heartbeat(&l, &"h1".parse().unwrap()))
        .await
        .unwrap();
    let beat = tokio::time::timeout(T, futures::StreamExt::next(&mut heartbeats))
        .await
        .unwrap()
        .unwrap();
    let beat: Heartbeat = serde_json::from_slice(&beat.payload).unwrap();
    assert_eq!(beat.instances.len(), 1);
    assert_eq!(beat.instances[0].instance_id, "c1");
    assert_eq!(beat.instances[0].component, "counter");
    assert_eq!(beat.instances[0].state, "running");
}

#[tokio::test]
async fn refused_calls_get_their_code_and_the_instance_keeps_serving() {
    let nats = Nats::start().await;
    let l = lattice("inst-typed");
    let _host = host(&nats, &l, "h1", &[]);
    let client = nats.client().await;
    let source = artifact(&nats, &l, "typed").await;
    start(&client, &l, "h1", "t1", source, RestartPolicy::Never)
        .await
        .unwrap();
    wait_facts(&nats, &l, "t1", FactKind::InstanceStarted, 1).await;
    let s = by_component(&l, "typed");

    assert_eq!(call(&client, &s, "add", "[40, 2]").await.json(), 42);
    assert_eq!(
        call(&client, &s, "trellis:test/shapes#swap", "[[true, 7]]")
            .await
            .json(),
        serde_json::json!([7, true])
    );
    let cases = [
        ("nope", "[]", "unknown_export"),
        ("add", "[1]", "invalid_arguments"),
        ("add", r#"[1, "two"]"#, "invalid_arguments"),
        ("add", r#"{"a": 1}"#, "invalid_arguments"),
        ("add", "[1, 2", "invalid_request"),
        ("", "[1, 2]", "invalid_request"),
    ];
    for (export, body, code) in cases {
        let a = call(&client, &s, export, body).await;
        assert_eq!(a.status, "error", "{export} {body}: {a:?}");
        assert_eq!(a.code.as_deref(), Some(code), "{export} {body}: {a:?}");
        assert!(!a.body.is_empty());
        assert_eq!(a.instance.as_deref(), Some("t1"));
    }
    assert_eq!(call(&client, &s, "add", "[2, 3]").await.json(), 5);
    assert_eq!(
        kinds(&facts_of(&nats, &l, "t1").await),
        vec![FactKind::InstanceStarted],
        "refused calls are not crashes"
    );
}

#[tokio::test]
async fn crashes_are_reported_with_their_precise_reason() {
    let nats = Nats::start().await;
    let l = lattice("inst-crash");
    let _host = host(&nats, &l, "h1", &[]);
    let client = nats.client().await;
    // (guest, input, reason)
    let cases = [
        ("trap", "x", "trap: unreachable"),
        ("panic", "boom", "panic"),
        ("loop", "", "timeout"),
        ("membomb", "", "memory_limit"),
        ("recursion", "", "stack_overflow"),
        ("huge_output", "2048", "output_too_large"),
    ];
    for (guest, _, _) in cases {
        let source = artifact(&nats, &l, guest).await;
        start(&client, &l, "h1", guest, source, RestartPolicy::Never)
            .await
            .unwrap();
    }
    for (guest, input, reason) in cases {
        wait_facts(&nats, &l, guest, FactKind::InstanceStarted, 1).await;
        let body = serde_json::to_string(&[input]).unwrap();
        let a = call(&client, &by_instance(&l, guest), "run", &body).await;
        assert_eq!(a.status, "error", "{guest}: {a:?}");
        // A timed-out invocation answers `timeout` (a gateway's 504); every other crash
        // `crashed`. Both carry the precise reason.
        let code = if reason == "timeout" {
            "timeout"
        } else {
            "crashed"
        };
        assert_eq!(a.code.as_deref(), Some(code), "{guest}: {a:?}");
        assert_eq!(a.reason.as_deref(), Some(reason), "{guest}: {a:?}");

        let facts = wait_facts(&nats, &l, guest, FactKind::InstanceCrashed, 1).await;
        assert_eq!(
            kinds(&facts),
            vec![FactKind::InstanceStarted, FactKind::InstanceCrashed]
        );
        match &facts[1].event.data {
            FactData::InstanceCrashed(d) => {
                assert_eq!(d.reason, reason, "{guest}");
                assert_eq!(d.export, "run");
                assert!(!d.will_restart);
                if guest == "panic" {
                    assert!(d.detail.contains("guest gave up: boom"), "{}", d.detail);
                }
            }
            other => panic!("unexpected {other:?}"),
        }
        let op = format!("op-start-{guest}");
        assert_eq!(facts[1].event.causation_id.as_deref(), Some(op.as_str()));
        // Policy `never`: the instance no longer serves, and nothing follows.
        let again = try_call(&client, &by_instance(&l, guest), "run", &body).await;
        assert!(is_no_responders(&again), "{guest}: {again:?}");
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    for (guest, _, _) in cases {
        assert_eq!(facts_of(&nats, &l, guest).await.len(), 2, "{guest}");
    }
}

#[tokio::test]
async fn backoff_restarts_with_growing_delays_then_gives_up() {
    let nats = Nats::start().await;
    let l = lattice("inst-backoff");
    let _host = host(&nats, &l, "h1", &[]);
    let client = nats.client().await;
    let source = artifact(&nats, &l, "trap").await;
    let policy: RestartPolicy = "backoff:50ms,200ms,3".parse().unwrap();
    start(&client, &l, "h1", "b1", source, policy)
        .await
        .unwrap();
    let s = by_instance(&l, "b1");
    for crash in 1..=4 {
        wait_facts(&nats, &l, "b1", FactKind::InstanceStarted, crash).await;
        assert_eq!(
            call(&client, &s, "run", r#"["ok"]"#).await.json(),
            "no trap"
        );
        let a = call(&client, &s, "run", r#"["x"]"#).await;
        assert_eq!(a.code.as_deref(), Some("crashed"));
        wait_facts(&nats, &l, "b1", FactKind::InstanceCrashed, crash).await;
    }
    let facts = wait_facts(&nats, &l, "b1", FactKind::InstanceGaveUp, 1).await;
    let expected = {
        use FactKind::*;
        vec![
            InstanceStarted,
            InstanceCrashed,
            InstanceRestarting,
            InstanceStarted,
            InstanceCrashed,
            InstanceRestarting,
            InstanceStarted,
            InstanceCrashed,
            InstanceRestarting,
            InstanceStarted,
            InstanceCrashed,
            InstanceGaveUp,
        ]
    };
    assert_eq!(kinds(&facts), expected);
    let mut restarts = Vec::new();
    let mut starts = Vec::new();
    let mut will_restart = Vec::new();
    for f in &facts {
        assert_eq!(f.event.causation_id.as_deref(), Some("op-start-b1"));
        match &f.event.data {
            FactData::InstanceRestarting(d) => restarts.push((d.attempt, d.delay_ms)),
            FactData::InstanceStarted(d) => starts.push(d.attempt),
            FactData::InstanceCrashed(d) => will_restart.push(d.will_restart),
            FactData::InstanceGaveUp(d) => {
                assert_eq!(d.attempts, 3);
                assert_eq!(d.last_reason, "trap: unreachable");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(restarts, vec![(1, 50), (2, 100), (3, 200)]);
    assert_eq!(starts, vec![0, 1, 2, 3]);
    assert_eq!(will_restart, vec![true, true, true, false]);
    assert!(is_no_responders(
        &try_call(&client, &s, "run", r#"["ok"]"#).await
    ));
}

#[tokio::test]
async fn always_restarts_once_per_crash_while_other_instances_keep_serving() {
    let nats = Nats::start().await;
    let l = lattice("inst-always");
    let _host = host(&nats, &l, "h1", &[]);
    let client = nats.client().await;
    let trap = artifact(&nats, &l, "trap").await;
    let looping = artifact(&nats, &l, "loop").await;
    let typed = artifact(&nats, &l, "typed").await;
    start(&client, &l, "h1", "a1", trap, RestartPolicy::Always)
        .await
        .unwrap();
    start(&client, &l, "h1", "l1", looping, RestartPolicy::Always)
        .await
        .unwrap();
    start(&client, &l, "h1", "t1", typed, RestartPolicy::Never)
        .await
        .unwrap();
    for id in ["a1", "l1", "t1"] {
        wait_facts(&nats, &l, id, FactKind::InstanceStarted, 1).await;
    }

    // A crash, a restart, and the instance serves again.
    let a = call(&client, &by_instance(&l, "a1"), "run", r#"["x"]"#).await;
    assert_eq!(a.reason.as_deref(), Some("trap: unreachable"));
    wait_facts(&nats, &l, "a1", FactKind::InstanceStarted, 2).await;
    let ok = call(&client, &by_component(&l, "trap"), "run", r#"["ok"]"#).await;
    assert_eq!(ok.json(), "no trap");

    // Several calls crashing at once lead to one restart; meanwhile the other instance serves.
    let l1 = by_instance(&l, "l1");
    let calls = (0..4).map(|_| call(&client, &l1, "run", r#"[""]"#));
    let serving = async {
        for i in 0..20 {
            let sum = call(&client, &by_instance(&l, "t1"), "add", &format!("[{i}, 1]")).await;
            assert_eq!(sum.json(), i + 1);
        }
    };
    let (answers, ()) = tokio::join!(futures::future::join_all(calls), serving);
    for a in &answers {
        assert_eq!(a.code.as_deref(), Some("timeout"), "{a:?}");
        assert_eq!(a.reason.as_deref(), Some("timeout"), "{a:?}");
    }
    let facts = wait_facts(&nats, &l, "l1", FactKind::InstanceStarted, 2).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let facts_later = facts_of(&nats, &l, "l1").await;
    assert_eq!(facts.len(), facts_later.len(), "{:?}", kinds(&facts_later));
    assert_eq!(
        kinds(&facts_later),
        vec![
            FactKind::InstanceStarted,
            FactKind::InstanceCrashed,
            FactKind::InstanceRestarting,
            FactKind::InstanceStarted
        ]
    );
    match &facts_later[2].event.data {
        FactData::InstanceRestarting(d) => assert_eq!((d.attempt, d.delay_ms), (1, 0)),
        other => panic!("unexpected {other:?}"),
    }
    assert_eq!(
        kinds(&facts_of(&nats, &l, "t1").await),
        vec![FactKind::InstanceStarted]
    );
}

#[tokio::test]
async fn stop_ends_an_instance_and_commands_are_checked() {
    let nats = Nats::start().await;
    let l = lattice("inst-stop");
    let _host = host(&nats, &l, "h1", &["--max-instances", "2"]);
    let client = nats.client().await;
    let source = artifact(&nats, &l, "counter").await;
    start(
        &client,
        &l,
        "h1",
        "s1",
        source.clone(),
        RestartPolicy::Never,
    )
    .await
    .unwrap();
    wait_facts(&nats, &l, "s1", FactKind::InstanceStarted, 1).await;

    let dup = start(
        &client,
        &l,
        "h1",
        "s1",
        source.clone(),
        RestartPolicy::Never,
    )
    .await;
    assert_eq!(dup.unwrap_err().code, ErrorCode::InvalidRequest);
    start(
        &client,
        &l,
        "h1",
        "s2",
        source.clone(),
        RestartPolicy::Never,
    )
    .await
    .unwrap();
    let full = start(
        &client,
        &l,
        "h1",
        "s3",
        source.clone(),
        RestartPolicy::Never,
    )
    .await;
    assert_eq!(full.unwrap_err().code, ErrorCode::NoHostAvailable);
    let malformed = command(
        &client,
        &l,
        "h1",
        "instance.start",
        b"{\"nope\":1}".to_vec(),
    )
    .await;
    assert_eq!(malformed.unwrap_err().code, ErrorCode::InvalidRequest);
    let not_json = command(&client, &l, "h1", "instance.start", b"{".to_vec()).await;
    assert_eq!(not_json.unwrap_err().code, ErrorCode::InvalidJson);
    let unknown = command(&client, &l, "h1", "instance.explode", b"{}".to_vec()).await;
    assert_eq!(unknown.unwrap_err().code, ErrorCode::UnknownVerb);

    stop(&client, &l, "h1", "s1").await.unwrap();
    let facts = wait_facts(&nats, &l, "s1", FactKind::InstanceStopped, 1).await;
    assert_eq!(
        kinds(&facts),
        vec![FactKind::InstanceStarted, FactKind::InstanceStopped]
    );
    assert_eq!(facts[1].event.causation_id.as_deref(), Some("op-stop-s1"));
    match &facts[1].event.data {
        FactData::InstanceStopped(d) => assert_eq!(d.reason, "requested"),
        other => panic!("unexpected {other:?}"),
    }
    assert!(is_no_responders(
        &try_call(&client, &by_instance(&l, "s1"), "increment", "").await
    ));
    // The component subject still reaches the other instance.
    let a = call(&client, &by_component(&l, "counter"), "increment", "").await;
    assert_eq!(a.instance.as_deref(), Some("s2"));
    let again = stop(&client, &l, "h1", "s1").await;
    assert_eq!(again.unwrap_err().code, ErrorCode::NotFound);
    // The freed slot takes a new instance.
    start(&client, &l, "h1", "s3", source, RestartPolicy::Never)
        .await
        .unwrap();
    wait_facts(&nats, &l, "s3", FactKind::InstanceStarted, 1).await;
}

#[tokio::test]
async fn sigterm_stops_every_instance_before_the_host() {
    let nats = Nats::start().await;
    let l = lattice("inst-drain");
    let mut h = host(&nats, &l, "h1", &[]);
    let client = nats.client().await;
    let counter = artifact(&nats, &l, "counter").await;
    let typed = artifact(&nats, &l, "typed").await;
    start(&client, &l, "h1", "d1", counter, RestartPolicy::Never)
        .await
        .unwrap();
    start(&client, &l, "h1", "d2", typed, RestartPolicy::Always)
        .await
        .unwrap();
    wait_facts(&nats, &l, "d1", FactKind::InstanceStarted, 1).await;
    wait_facts(&nats, &l, "d2", FactKind::InstanceStarted, 1).await;

    h.signal(Signal::SIGTERM);
    assert_eq!(h.wait_exit(T).await, Some(0), "host log:\n{}", h.log());
    let facts = nats.facts(&l).await;
    let tail: Vec<(FactKind, String)> = facts
        .iter()
        .skip_while(|f| f.event.kind() != FactKind::InstanceStopped)
        .map(|f| (f.event.kind(), f.event.data.entity_id().to_owned()))
        .collect();
    assert_eq!(tail.len(), 3, "{tail:?}");
    let mut stopped: Vec<&str> = tail[..2]
        .iter()
        .map(|(k, id)| {
            assert_eq!(*k, FactKind::InstanceStopped);
            id.as_str()
        })
        .collect();
    stopped.sort_unstable();
    assert_eq!(stopped, vec!["d1", "d2"]);
    assert_eq!(tail[2].0, FactKind::HostStopped);
    for f in facts
        .iter()
        .filter(|f| f.event.kind() == FactKind::InstanceStopped)
    {
        match &f.event.data {
            FactData::InstanceStopped(d) => assert_eq!(d.reason, "host draining"),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn start_failures_say_why() {
    let nats = Nats::start().await;
    let l = lattice("inst-fail");
    let _host = host(&nats, &l, "h1", &[]);
    let client = nats.client().await;
    let counter = components::build().bytes("counter");
    let typed = components::build().bytes("typed");
    // A digest nobody stored (the bucket exists, holding another artifact).
    artifact(&nats, &l, "typed").await;
    let missing = ComponentSource::Artifact {
        digest: digest_of(b"never stored"),
        manifest: manifest("counter"),
        signature: None,
    };
    // The typed component's digest, but the counter's bytes stored under it.
    let hex_of_typed = digest_of(&typed).trim_start_matches("sha256:").to_owned();
    put_object(&nats, &l, &hex_of_typed, &counter).await;
    let mismatch = ComponentSource::Artifact {
        digest: digest_of(&typed),
        manifest: manifest("typed"),
        signature: None,
    };
    let digest = digest_of(&counter);
    put_object(&nats, &l, digest.trim_start_matches("sha256:"), &counter).await;
    let no_fuel = ComponentSource::Artifact {
        digest: digest.clone(),
        manifest: ManifestDoc {
            fuel: 0,
            ..manifest("counter")
        },
        signature: None,
    };
    let too_big = ComponentSource::Artifact {
        digest: digest.clone(),
        manifest: ManifestDoc {
            max_memory_bytes: 128 * 1024 * 1024,
            ..manifest("counter")
        },
        signature: None,
    };
    let not_wasm_digest = digest_of(b"not wasm");
    put_object(
        &nats,
        &l,
        not_wasm_digest.trim_start_matches("sha256:"),
        b"not wasm",
    )
    .await;
    let not_wasm = ComponentSource::Artifact {
        digest: not_wasm_digest,
        manifest: manifest("counter"),
        signature: None,
    };
    // (id, source, expected text in the reason)
    let cases = [
        ("missing", missing, "artifact not found"),
        ("mismatch", mismatch, "digest mismatch"),
        ("nofuel", no_fuel, "limits.fuel"),
        ("toobig", too_big, "limits.max_memory"),
        ("notwasm", not_wasm, "invalid component"),
    ];
    for (id, source, _) in &cases {
        start(&client, &l, "h1", id, source.clone(), RestartPolicy::Never)
            .await
            .unwrap();
    }
    for (id, _, expected) in &cases {
        let facts = wait_facts(&nats, &l, id, FactKind::InstanceStartFailed, 1).await;
        assert_eq!(kinds(&facts), vec![FactKind::InstanceStartFailed]);
        assert_eq!(
            facts[0].event.causation_id.as_deref(),
            Some(format!("op-start-{id}").as_str())
        );
        match &facts[0].event.data {
            FactData::InstanceStartFailed(d) => {
                assert!(d.reason.contains(expected), "{id}: {}", d.reason);
                assert_eq!(d.host_id.as_str(), "h1");
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // A bad digest is refused outright.
    let bad = ComponentSource::Artifact {
        digest: "sha256:xyz".into(),
        manifest: manifest("counter"),
        signature: None,
    };
    let refused = start(&client, &l, "h1", "bad", bad, RestartPolicy::Never).await;
    assert_eq!(refused.unwrap_err().code, ErrorCode::InvalidRequest);
    // Failed instances leave no trace on the host: their ids can be used again.
    let again = ComponentSource::Artifact {
        digest,
        manifest: manifest("counter"),
        signature: None,
    };
    start(&client, &l, "h1", "missing", again, RestartPolicy::Never)
        .await
        .unwrap();
    wait_facts(&nats, &l, "missing", FactKind::InstanceStarted, 1).await;
}

fn write_file_component(dir: &Path) -> PathBuf {
    let wasm = dir.join("typed.wasm");
    std::fs::copy(components::build().path("typed"), &wasm).unwrap();
    std::fs::write(
        dir.join("Component.toml"),
        "[component]\nname = \"typed-dev\"\nversion = \"0.2.0\"\n\n[limits]\nmax_memory = \"16MiB\"\nfuel = 10_000_000\ntimeout = \"1s\"\nmax_concurrency = 4\n",
    )
    .unwrap();
    wasm
}

#[tokio::test]
async fn file_sources_run_for_development() {
    let nats = Nats::start().await;
    let l = lattice("inst-file");
    let _host = host(&nats, &l, "h1", &[]);
    let client = nats.client().await;
    let dir = tempfile::tempdir().unwrap();
    let wasm = write_file_component(dir.path());
    let source = ComponentSource::File {
        path: wasm.display().to_string(),
        manifest_path: None,
    };
    start(&client, &l, "h1", "f1", source, RestartPolicy::Never)
        .await
        .unwrap();
    let facts = wait_facts(&nats, &l, "f1", FactKind::InstanceStarted, 1).await;
    match &facts[0].event.data {
        FactData::InstanceStarted(d) => {
            assert_eq!(d.component.as_str(), "typed-dev");
            assert_eq!(d.version, "0.2.0");
            assert_eq!(d.digest, digest_of(&std::fs::read(&wasm).unwrap()));
        }
        other => panic!("unexpected {other:?}"),
    }
    let a = call(&client, &by_component(&l, "typed-dev"), "add", "[1, 2]").await;
    assert_eq!(a.json(), 3);

    let missing = ComponentSource::File {
        path: dir.path().join("nope.wasm").display().to_string(),
        manifest_path: None,
    };
    start(&client, &l, "h1", "f2", missing, RestartPolicy::Never)
        .await
        .unwrap();
    let facts = wait_facts(&nats, &l, "f2", FactKind::InstanceStartFailed, 1).await;
    match &facts[0].event.data {
        FactData::InstanceStartFailed(d) => assert!(d.reason.contains("nope.wasm"), "{}", d.reason),
        other => panic!("unexpected {other:?}"),
    }
}
