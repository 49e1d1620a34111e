//! The control subjects driven with a plain NATS client: the README's `nats` commands, bad input.

use std::path::PathBuf;
use std::time::Duration;

use futures::StreamExt;
use trellis_schemas::control::HostListRequest;
use trellis_schemas::{CtlOp, ErrorCode, subject};
use trellis_tests::{Nats, lattice, wait_for};

/// Generous: the machine is small and shared by every test of the suite at once.
const T: Duration = Duration::from_secs(60);

const COUNTER_MANIFEST: &str = "[component]\nname = \"counter\"\nversion = \"1.0.0\"\n[limits]\nmax_memory = \"16MiB\"\nfuel = 1000000\ntimeout = \"1s\"\nmax_concurrency = 16\n";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn checked_in_schema(file: &str) -> jsonschema::Validator {
    let path = repo().join("schemas/json").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    jsonschema::validator_for(&serde_json::from_str(&text).unwrap()).unwrap()
}

fn assert_valid(validator: &jsonschema::Validator, value: &serde_json::Value, what: &str) {
    let errors: Vec<String> = validator
        .iter_errors(value)
        .map(|e| e.to_string())
        .collect();
    assert!(
        errors.is_empty(),
        "{what} does not match its schema: {errors:?}\n{value:#}"
    );
}

/// A `nats req` line of README.md: subject, exact body, and the error code the README says it
/// gets (`# → code` at the end of the line), if any.
struct ReadmeRequest {
    subject: String,
    body: String,
    expect_error: Option<String>,
}

/// `nats req <subject> '<json>' [# → code]` and `nats sub '<subject>'` lines of README.md.
fn readme_commands() -> (Vec<ReadmeRequest>, Vec<String>) {
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let mut requests = Vec::new();
    let mut subs = Vec::new();
    let default = trellis_schemas::Lattice::new("default").unwrap();
    let ctl_prefix = subject::ctl_all(&default).trim_end_matches('>').to_owned();
    for line in readme.lines() {
        let line = line.trim().trim_start_matches("$ ");
        if let Some(rest) = line
            .strip_prefix("nats req ")
            .filter(|r| r.starts_with(&ctl_prefix))
        {
            let (command, expect_error) = match rest.split_once("# →") {
                Some((c, e)) => (c.trim().to_owned(), Some(e.trim().to_owned())),
                None => (rest.trim().to_owned(), None),
            };
            let (subject, body) = command.split_once(' ').unwrap_or((&command, "''"));
            let body = body.trim();
            let body = body
                .strip_prefix('\'')
                .and_then(|b| b.strip_suffix('\''))
                .unwrap_or(body);
            requests.push(ReadmeRequest {
                subject: subject.to_owned(),
                body: body.to_owned(),
                expect_error,
            });
        } else if let Some(rest) = line.strip_prefix("nats sub ") {
            // Fact subscriptions; the log subjects' example is tested with `trellis logs`
            // (tests/all/logs.rs).
            let subject = rest.trim().trim_matches('\'');
            if subject.starts_with(subject::events_all(&default).trim_end_matches('>')) {
                subs.push(subject.to_owned());
            }
        }
    }
    (requests, subs)
}

#[tokio::test]
async fn readme_nats_commands_get_replies_that_match_the_schemas() {
    let (requests, subs) = readme_commands();
    let ops: std::collections::BTreeSet<String> = requests
        .iter()
        .filter_map(|r| {
            let (noun, verb) = subject::parse_ctl(&lattice("default"), &r.subject)?;
            CtlOp::from_parts(noun, verb).map(|op| op.name())
        })
        .collect();
    let all: std::collections::BTreeSet<String> = CtlOp::ALL.iter().map(|op| op.name()).collect();
    assert_eq!(
        ops, all,
        "README.md shows a `nats req` for every control operation"
    );
    assert!(!subs.is_empty(), "README.md shows `nats sub` for facts");

    let nats = Nats::start().await;
    let l = lattice("default");
    let _controller = nats.controller(&l, "c", "30s");
    let _host = nats.host(&l, "edge-1", &["zone=eu-1"]);
    let ctl = nats.ctl(&l).await;
    wait_for("edge-1 listed", T, || async {
        let reply = ctl.request(&HostListRequest::default()).await.ok()?;
        (!reply.hosts.is_empty()).then_some(())
    })
    .await;

    // The README starts instances of `counter`: store one.
    let js = async_nats::jetstream::new(nats.client().await);
    let wasm = trellis_tests::components::build().path("counter");
    let digest = trellis_bus::put_artifact(&js, &l, &std::fs::read(wasm).unwrap())
        .await
        .unwrap();
    ctl.request(&trellis_schemas::control::ComponentRegisterRequest {
        digest,
        manifest: COUNTER_MANIFEST.to_owned(),
        signature: None,
    })
    .await
    .unwrap();

    let client = nats.client().await;
    let mut subscriptions = Vec::new();
    for s in &subs {
        subscriptions.push(client.subscribe(s.clone()).await.unwrap());
    }
    trellis_tests::settled(&client).await;

    for ReadmeRequest {
        subject: subj,
        body,
        expect_error,
    } in &requests
    {
        let (noun, verb) =
            subject::parse_ctl(&l, subj).expect("README subject is a control subject");
        let op = CtlOp::from_parts(noun, verb).unwrap();
        let reply = client
            .request(subj.clone(), body.clone().into_bytes().into())
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
        assert_valid(
            &checked_in_schema(&trellis_schemas::json_schema::reply_file(op)),
            &json,
            &format!("reply to `nats req {subj} '{body}'`"),
        );
        let request: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_valid(
            &checked_in_schema(&trellis_schemas::json_schema::request_file(op)),
            &request,
            "README request",
        );
        match expect_error {
            Some(code) => assert_eq!(json["error"]["code"], code.as_str(), "{subj}: {json}"),
            None => assert_eq!(
                json["ok"], true,
                "`nats req {subj} '{body}'` failed: {json}"
            ),
        }
    }

    // The README's data-plane call reaches one of the counter instances it started.
    let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
    let default = trellis_schemas::Lattice::new("default").unwrap();
    let call = readme
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nats req "))
        .find(|r| {
            let subject = r.split(' ').next().unwrap_or_default();
            trellis_schemas::dataplane::parse_op(&default, subject).is_ok()
        })
        .expect("README shows a data-plane call");
    let (subj, rest) = call.split_once(' ').unwrap();
    let subj = subj.to_owned();
    let (body, header) = rest.split_once(" -H ").unwrap();
    let (name, value) = header.trim().trim_matches('\'').split_once(": ").unwrap();
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(name, value);
    let body = body.trim().trim_matches('\'').to_owned();
    let reply = wait_for("a counter instance answers", T, || {
        let (client, subj, headers, body) = (&client, &subj, &headers, &body);
        async move {
            let request = async_nats::Request::new()
                .headers(headers.clone())
                .payload(body.clone().into_bytes().into());
            client.send_request(subj.clone(), request).await.ok()
        }
    })
    .await;
    let status = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Trellis-Status"))
        .map(|v| v.as_str().to_owned());
    assert_eq!(status.as_deref(), Some("ok"), "{:?}", reply);
    assert_eq!(String::from_utf8_lossy(&reply.payload), "1");

    // A new host makes a fact; every README subscription sees it as a valid CloudEvent.
    let mut second = nats.host(&l, "edge-2", &[]);
    for sub in &mut subscriptions {
        let message = tokio::time::timeout(T, sub.next()).await.unwrap().unwrap();
        let json: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
        assert_valid(&checked_in_schema("cloudevent.schema.json"), &json, "fact");
        let ty = json["type"].as_str().unwrap();
        let kind = trellis_schemas::FactKind::from_type_name(ty).unwrap();
        assert_valid(
            &checked_in_schema(&trellis_schemas::json_schema::fact_file(kind)),
            &json["data"],
            "fact payload",
        );
    }
    second.kill();
}

async fn send(client: &async_nats::Client, subject: &str, body: Vec<u8>) -> serde_json::Value {
    let reply = tokio::time::timeout(T, client.request(subject.to_owned(), body.into()))
        .await
        .expect("a reply in time")
        .expect("a reply");
    serde_json::from_slice(&reply.payload).expect("the reply is JSON")
}

fn code(reply: &serde_json::Value) -> &str {
    assert_eq!(reply["ok"], false, "{reply}");
    assert!(
        reply["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty())
    );
    reply["error"]["code"].as_str().unwrap()
}

#[tokio::test]
async fn bad_requests_get_precise_error_codes_and_the_controller_keeps_serving() {
    let nats = Nats::start().await;
    let l = lattice("bad");
    let mut controller = nats.controller(&l, "c", "30s");
    let ctl = nats.ctl(&l).await;
    wait_for("controller serving", T, || async {
        ctl.request(&HostListRequest::default()).await.ok()
    })
    .await;
    let client = nats.client().await;
    let list = subject::ctl(&l, CtlOp::HostList);
    let get = subject::ctl(&l, CtlOp::HostGet);
    let schema = checked_in_schema(&trellis_schemas::json_schema::reply_file(CtlOp::HostGet));

    let cases: Vec<(&str, String, Vec<u8>)> = vec![
        ("invalid_json", get.clone(), b"{\"host_id\":".to_vec()),
        ("invalid_json", get.clone(), vec![0xff, 0xfe, 0x00]),
        ("invalid_request", get.clone(), br#"{"host_id":5}"#.to_vec()),
        (
            "invalid_request",
            get.clone(),
            br#"{"host_id":"h1","extra":true}"#.to_vec(),
        ),
        (
            "invalid_request",
            get.clone(),
            br#"{"host_id":"has.dots"}"#.to_vec(),
        ),
        ("invalid_request", get.clone(), br#"{}"#.to_vec()),
        (
            "invalid_request",
            list.clone(),
            br#"{"status":"sleeping"}"#.to_vec(),
        ),
        (
            "invalid_request",
            list.clone(),
            br#"{"min_seq":-1}"#.to_vec(),
        ),
        ("invalid_request", list.clone(), br#"[1,2,3]"#.to_vec()),
        (
            "not_found",
            get.clone(),
            br#"{"host_id":"nobody"}"#.to_vec(),
        ),
        ("payload_too_large", list.clone(), vec![b' '; 200 * 1024]),
        (
            "unknown_verb",
            subject::ctl_all(&l).replace('>', "host.explode"),
            b"{}".to_vec(),
        ),
        (
            "unknown_verb",
            subject::ctl_all(&l).replace('>', "spaceship.launch"),
            b"{}".to_vec(),
        ),
    ];
    for (want, subj, body) in &cases {
        let reply = send(&client, subj, body.clone()).await;
        assert_eq!(
            code(&reply),
            *want,
            "request to {subj}: {}",
            String::from_utf8_lossy(body)
        );
        if subj == &get {
            assert_valid(&schema, &reply, "error reply");
        }
    }
    let reply = send(&client, &get, br#"{"host_id":5}"#.to_vec()).await;
    assert!(
        reply["error"]["message"]
            .as_str()
            .unwrap()
            .contains("host_id")
            || reply["error"]["message"]
                .as_str()
                .unwrap()
                .contains("invalid type"),
        "{reply}"
    );
    assert!(
        controller.running(),
        "the controller survived: {}",
        controller.log()
    );
    ctl.request(&HostListRequest::default())
        .await
        .expect("still serving");
}

#[tokio::test]
async fn burst_of_garbage_mixed_with_valid_requests_is_answered_in_full() {
    let nats = Nats::start().await;
    let l = lattice("burst");
    let mut controller = nats.controller(&l, "c", "30s");
    let _host = nats.host(&l, "h1", &[]);
    let ctl = nats.ctl(&l).await;
    wait_for("h1 listed", T, || async {
        let reply = ctl.request(&HostListRequest::default()).await.ok()?;
        (!reply.hosts.is_empty()).then_some(())
    })
    .await;
    let client = nats.client().await;
    let garbage: Vec<Vec<u8>> = vec![
        b"}{".to_vec(),
        vec![0u8; 1000],
        br#"{"host_id":["a"]}"#.to_vec(),
        vec![b'['; 100_000],
        br#"{"min_seq":"soon"}"#.to_vec(),
        "\u{1F4A5}".as_bytes().to_vec(),
    ];
    let mut tasks = Vec::new();
    for i in 0..600usize {
        let client = client.clone();
        let (subject, body, valid) = match i % 4 {
            0 => (subject::ctl(&l, CtlOp::HostList), b"{}".to_vec(), true),
            1 => (
                subject::ctl(&l, CtlOp::HostGet),
                br#"{"host_id":"h1"}"#.to_vec(),
                true,
            ),
            2 => (
                subject::ctl(&l, CtlOp::HostGet),
                garbage[i % garbage.len()].clone(),
                false,
            ),
            _ => (
                subject::ctl_all(&l).replace('>', &format!("x{i}.y")),
                garbage[i % garbage.len()].clone(),
                false,
            ),
        };
        tasks.push(tokio::spawn(async move {
            let reply = send(&client, &subject, body).await;
            (valid, reply)
        }));
    }
    let mut ok = 0;
    let mut rejected = 0;
    for t in tasks {
        let (valid, reply) = t.await.unwrap();
        if valid {
            assert_eq!(reply["ok"], true, "{reply}");
            ok += 1;
        } else {
            let c = code(&reply);
            assert!(
                [
                    ErrorCode::InvalidJson,
                    ErrorCode::InvalidRequest,
                    ErrorCode::UnknownVerb,
                    ErrorCode::PayloadTooLarge
                ]
                .iter()
                .any(|e| e.as_str() == c),
                "{reply}"
            );
            rejected += 1;
        }
    }
    assert_eq!((ok, rejected), (300, 300));
    assert!(controller.running(), "{}", controller.log());
    ctl.request(&HostListRequest::default())
        .await
        .expect("still serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stopped_with_sigterm_answers_what_it_received_and_loses_no_request() {
    use std::collections::BTreeSet;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use trellis_schemas::control::StatusRequest;

    let nats = Nats::start().await;
    let l = lattice("drain");
    let mut c1 = nats.controller(&l, "c1", "30s");
    let _c2 = nats.controller(&l, "c2", "30s");
    let ctl = Arc::new(nats.ctl(&l).await);
    wait_for("both replicas answering", T, || async {
        let mut seen = BTreeSet::new();
        for _ in 0..20 {
            if let Ok(reply) = ctl.request(&StatusRequest::default()).await {
                seen.insert(reply.controller.id);
            }
        }
        (seen.len() == 2).then_some(())
    })
    .await;

    // Callers keep requests in flight on both replicas while one of them is stopped.
    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicUsize::new(0));
    let callers: Vec<_> = (0..16)
        .map(|_| {
            let (ctl, stop, answered) = (ctl.clone(), stop.clone(), answered.clone());
            tokio::spawn(async move {
                let mut failures = Vec::new();
                while !stop.load(Ordering::SeqCst) {
                    match ctl.request(&HostListRequest::default()).await {
                        Ok(_) => {
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => failures.push(e.to_string()),
                    }
                }
                failures
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = answered.load(Ordering::SeqCst);
    c1.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(c1.wait_exit(Duration::from_secs(20)).await, Some(0));
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::SeqCst);
    let mut failures = Vec::new();
    for caller in callers {
        failures.extend(caller.await.unwrap());
    }
    let after = answered.load(Ordering::SeqCst);
    assert!(
        failures.is_empty(),
        "{} of {after} requests failed across the stop: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(after > before, "the other replica went on answering");
    assert!(
        c1.log().contains("controller shutting down"),
        "{}",
        c1.log()
    );
}
