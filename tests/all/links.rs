//! Links end to end: a component's own import (`example:pipeline/transform`) served by another
//! component through `trellis link add`, in process on one host and over NATS across two, with
//! the controller's checks (unknown target, missing export, cycles, required links) and removal
//! taking effect at once.

use std::time::Duration;

use serde_json::Value;
use trellis_schemas::{FactKind, Lattice};
use trellis_tests::{Nats, push_test_component, wait_for};

const T: Duration = Duration::from_secs(30);

const FRONT: &str = r#"
[component]
name = "front"
version = "0.1.0"
[limits]
max_memory = "16MiB"
fuel = 1_000_000_000
timeout = "5s"
max_concurrency = 16
[capabilities]
imports = ["example:pipeline/transform"]
requires = ["example:pipeline/transform"]
"#;

const STAGE: &str = r#"
[component]
name = "stage"
version = "1.2.0"
[limits]
max_memory = "16MiB"
fuel = 50_000_000
timeout = "2s"
max_concurrency = 16
"#;

/// Version 2 of `stage`: another component under the same name (the middle stage, which would
/// answer with its own note and a denied call of its own), outside the link's `^1`.
const STAGE_V2: &str = r#"
[component]
name = "stage"
version = "2.0.0"
[limits]
max_memory = "16MiB"
fuel = 50_000_000
timeout = "2s"
max_concurrency = 16
[capabilities]
imports = ["example:pipeline/transform", "wasi:keyvalue/store", "wasi:keyvalue/atomics"]
"#;

const ODD: &str = r#"
[component]
name = "odd"
version = "0.1.0"
[limits]
max_memory = "16MiB"
fuel = 1_000_000_000
timeout = "5s"
max_concurrency = 16
[capabilities]
imports = ["example:pipeline/transform"]
"#;

const TRANSFORM: &str = "example:pipeline/transform";

/// `trellis call <component> run <input>`: its answer (a JSON string) as text.
fn call_run(nats: &Nats, l: &Lattice, component: &str, input: &str) -> String {
    let arg = serde_json::to_string(input).unwrap();
    let out = nats.cli_ok(l, &["call", component, "run", &arg]);
    serde_json::from_str::<Value>(out.trim())
        .unwrap_or_else(|e| panic!("{component} answered {out:?}: {e}"))
        .as_str()
        .unwrap()
        .to_owned()
}

/// `trellis call front run <input>`: the front's answer as text.
fn call_front(nats: &Nats, l: &Lattice, input: &str) -> String {
    call_run(nats, l, "front", input)
}

#[tokio::test]
async fn a_link_serves_an_import_in_process_and_across_hosts_until_removed() {
    let nats = Nats::start().await;
    let l = Lattice::new("links").unwrap();
    let _controller = nats.controller(&l, "c", "10s");
    let _h1 = nats.host(&l, "h1", &[]);
    let _h2 = nats.host(&l, "h2", &[]);
    nats.wait_for_hosts(&l, 2).await;
    let cli = |args: &[&str]| {
        let mut all = vec!["--lattice", l.as_str()];
        all.extend_from_slice(args);
        nats.cli(&all)
    };
    push_test_component(&cli, "pipe_front", FRONT);
    push_test_component(&cli, "pipe_stage", STAGE);
    push_test_component(&cli, "pipe_odd", ODD);

    // A component that requires a link does not start without it.
    let (code, out, err) = cli(&["instance", "start", "front", "--wait"]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("link required: example:pipeline/transform"),
        "{out}{err}"
    );

    // Bad links are refused, naming what is missing.
    let (code, _, err) = cli(&["link", "add", "component:front", TRANSFORM, "nosuch"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("invalid_request") && err.contains("no component named nosuch"),
        "{err}"
    );
    let (code, _, err) = cli(&[
        "link",
        "add",
        "component:front",
        "example:pipeline/other",
        "stage",
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("does not export example:pipeline/other")
            && err.contains("example:pipeline/transform@0.1.0"),
        "{err}"
    );
    let (code, _, err) = cli(&[
        "link",
        "add",
        "component:front",
        TRANSFORM,
        "stage",
        "--version",
        "^2",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("no version of stage matches ^2"), "{err}");
    let (code, _, err) = cli(&[
        "link",
        "add",
        "component:front",
        "not an interface",
        "stage",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("invalid interface"), "{err}");

    let out = nats.cli_ok(
        &l,
        &[
            "link",
            "add",
            "component:front",
            TRANSFORM,
            "stage",
            "--version",
            "^1",
            "-o",
            "json",
        ],
    );
    let added: Value = serde_json::from_str(&out).unwrap();
    let link_id = added["link"]["link_id"].as_str().unwrap().to_owned();
    // One link per source and interface; and links form no cycle (a stage linked to itself).
    let (code, _, err) = cli(&["link", "add", "component:front", TRANSFORM, "stage"]);
    assert_ne!(code, 0);
    assert!(err.contains("conflict") && err.contains(&link_id), "{err}");
    let (code, _, err) = cli(&["link", "add", "component:stage", TRANSFORM, "stage"]);
    assert_ne!(code, 0);
    assert!(err.contains("cycle (stage → stage)"), "{err}");
    let listed = nats.cli_ok(&l, &["link", "ls"]);
    assert!(
        listed.contains(&link_id) && listed.contains("component:front") && listed.contains("^1"),
        "{listed}"
    );

    // Both on h1: the call is handed over in process.
    let stage_h1 = nats.start_instance(&l, "stage", &["--host", "h1"]);
    let front = nats.start_instance(&l, "front", &["--host", "h1"]);
    assert_eq!(
        call_front(&nats, &l, "hello"),
        "front: got 5 bytes | rust: HELLO"
    );
    // A stage's own error reaches the caller as its function's error.
    assert_eq!(call_front(&nats, &l, ""), "error: empty input");

    // A caller built against another version of the interface (numbers where the stage takes
    // strings): its arguments do not type-check, the caller gets the error, the stage runs on.
    nats.cli_ok(&l, &["link", "add", "odd", TRANSFORM, "stage"]);
    let odd = nats.start_instance(&l, "odd", &["--host", "h1"]);
    let answer = call_run(&nats, &l, "odd", "abc");
    assert!(
        answer.starts_with("error: invalid_arguments") && answer.contains("input"),
        "{answer}"
    );
    assert_eq!(
        call_front(&nats, &l, "still"),
        "front: got 5 bytes | rust: STILL"
    );
    nats.cli_ok(&l, &["instance", "stop", &odd, "--wait"]);

    // A stage that traps crashes itself, not its caller: the caller gets an error it handles.
    let answer = call_front(&nats, &l, "trap");
    assert!(
        answer.starts_with("error: crashed") && answer.contains("asked to trap"),
        "{answer}"
    );
    wait_for("the stage's crash as a fact", T, || async {
        let facts = nats.facts(&l).await;
        facts
            .iter()
            .any(|f| {
                f.event.data.kind() == FactKind::InstanceCrashed
                    && f.event.data.entity_id() == stage_h1
            })
            .then_some(())
    })
    .await;
    let facts = nats.facts(&l).await;
    assert!(
        !facts
            .iter()
            .any(|f| f.event.data.kind() == FactKind::InstanceCrashed
                && f.event.data.entity_id() == front),
        "the caller did not crash"
    );

    // The stage now runs only on h2: the same call goes over NATS, same answer.
    nats.start_instance(&l, "stage", &["--host", "h2"]);
    assert_eq!(
        call_front(&nats, &l, "across"),
        "front: got 6 bytes | rust: ACROSS"
    );
    // A stage 2.0.0 beside it on h2: the link asks for ^1, so calls over NATS go to the 1.x
    // version's subject only, never to 2.0.0 (which would answer with the middle's note).
    push_test_component(&cli, "pipe_middle", STAGE_V2);
    let v2 = nats.cli_ok(
        &l,
        &["instance", "start", "stage@2.0.0", "--host", "h2", "--wait"],
    );
    assert!(v2.contains("started"), "{v2}");
    for _ in 0..8 {
        assert_eq!(
            call_front(&nats, &l, "across"),
            "front: got 6 bytes | rust: ACROSS"
        );
    }

    // Removing the link denies the next call at once, inside the guest.
    nats.cli_ok(&l, &["link", "rm", &link_id]);
    wait_for("calls denied after the link is removed", T, || async {
        let answer = call_front(&nats, &l, "again");
        answer.starts_with("error: access denied").then_some(answer)
    })
    .await;
    let listed = nats.cli_ok(&l, &["link", "ls"]);
    assert!(!listed.contains(&link_id), "{listed}");

    // The audit stream has the link, its removal and the refused call.
    let audit = |kind: &str| -> Vec<Value> {
        nats.cli_ok(&l, &["audit", "--type", kind, "-o", "json"])
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).unwrap()["event"].clone())
            .collect()
    };
    let denied = wait_for("the refused linked call in the audit", T, || async {
        audit("denied")
            .into_iter()
            .find(|e| e["capability"] == TRANSFORM)
    })
    .await;
    assert_eq!(denied["outcome"], "access_denied", "{denied}");
    assert_eq!(denied["target"], format!("instance:{front}"), "{denied}");
    assert!(
        audit("grant")
            .iter()
            .any(|e| e["capability"] == TRANSFORM && e["target"] == "component:front"),
        "the link is audited as a grant"
    );
    assert!(
        audit("revoke")
            .iter()
            .any(|e| e["target"] == format!("link:{link_id}")),
        "its removal as a revoke"
    );
}

#[tokio::test]
async fn a_pipeline_composed_at_build_time_runs_as_one_component_without_links() {
    let built = trellis_tests::components::build();
    let composed = trellis_tests::components::compose(
        "front-with-stage",
        &built.path("pipe_front"),
        &[&built.path("pipe_stage")],
    );
    let nats = Nats::start().await;
    let l = Lattice::new("composed").unwrap();
    let _controller = nats.controller(&l, "c", "10s");
    let _h1 = nats.host(&l, "h1", &[]);
    nats.wait_for_a_host(&l).await;
    let dir = tempfile::tempdir().unwrap();
    // The stage is inside: the composed component imports nothing of its own, so its manifest
    // declares nothing and no link is needed.
    let manifest = dir.path().join("Component.toml");
    std::fs::write(&manifest, FRONT.replace(
        "[capabilities]\nimports = [\"example:pipeline/transform\"]\nrequires = [\"example:pipeline/transform\"]\n",
        "",
    ))
    .unwrap();
    nats.push(&l, &composed, &manifest);
    nats.start_instance(&l, "front", &["--host", "h1"]);
    assert_eq!(call_front(&nats, &l, "hi"), "front: got 2 bytes | rust: HI");
    let listed: Value =
        serde_json::from_str(&nats.cli_ok(&l, &["link", "ls", "-o", "json"])).unwrap();
    assert_eq!(listed["links"], serde_json::json!([]), "no link is needed");
}
