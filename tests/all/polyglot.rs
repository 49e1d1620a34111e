//! Components written in Python (componentize-py) and C (clang, wasi-libc, wit-bindgen), built
//! from source in `examples/` and `tests/components/`, running unchanged beside Rust ones: HTTP
//! with key-value, under the same limits and crash isolation.

use std::time::Duration;

use serde_json::Value;
use trellis_tests::bench::BenchLattice;
use trellis_tests::{components, free_port, http_request, wait_for};

const T: Duration = Duration::from_secs(120);

/// GET `path` on `port` until it answers (the listener comes up with the instance).
async fn get(port: u16, path: &str) -> (u16, String) {
    wait_for(&format!("GET {path}"), T, || async {
        let reply = http_request("GET", &format!("http://127.0.0.1:{port}{path}"), "")
            .await
            .ok()?;
        Some((reply.status, reply.body))
    })
    .await
}

#[tokio::test]
async fn python_and_c_http_components_count_in_key_value_like_rust_ones() {
    let python = components::python(
        "examples/python-counter",
        "trellis:lattice/http-component",
        "wit",
    );
    let c = components::c(
        "examples/c-counter",
        "wit",
        "trellis:lattice/http-component",
    );
    let lat = BenchLattice::up("polyglot", &["kv", "http-server"]).await;
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    lat.push(
        &python,
        &repo.join("examples/python-counter/Component.toml"),
    );
    lat.push(&c, &repo.join("examples/c-counter/Component.toml"));

    for (component, bucket, says) in [
        ("python-counter", "py-counts", "python count"),
        ("c-counter", "c-counts", "c count"),
    ] {
        let port = free_port();
        let http = format!("wasi:http/incoming-handler address=127.0.0.1:{port}");
        let kv = format!("wasi:keyvalue bucket={bucket}");
        lat.nats
            .start_instance(&lat.l, component, &["--grant", &kv, "--grant", &http]);
        assert_eq!(get(port, "/visits").await, (200, format!("{says}: 1\n")));
        assert_eq!(get(port, "/visits").await, (200, format!("{says}: 2\n")));
        assert_eq!(get(port, "/other").await, (200, format!("{says}: 1\n")));
    }
}

#[tokio::test]
async fn a_python_component_that_loops_or_exhausts_memory_ends_only_that_invocation() {
    let wasm = components::python(
        "tests/components/python/adversarial",
        "trellis:lattice/http-component",
        "wit",
    );
    let lat = BenchLattice::up("polyglot-limits", &["http-server"]).await;
    let dir = tempfile::tempdir().unwrap();
    let manifest = dir.path().join("Component.toml");
    std::fs::write(
        &manifest,
        r#"
[component]
name = "py-adversarial"
version = "0.1.0"
[limits]
max_memory = "48MiB"
fuel = 200_000_000
timeout = "2s"
max_concurrency = 4
[capabilities]
imports = ["wasi:http/types", "wasi:http/outgoing-handler", "wasi:keyvalue/store", "wasi:keyvalue/atomics", "wasi:keyvalue/batch", "wasi:logging/logging"]
requires = ["wasi:http/incoming-handler"]
"#,
    )
    .unwrap();
    lat.push(&wasm, &manifest);
    let port = free_port();
    let http = format!("wasi:http/incoming-handler address=127.0.0.1:{port}");
    // Restarted after every crash, as a service would be.
    let id = lat.nats.start_instance(
        &lat.l,
        "py-adversarial",
        &["--grant", &http, "--restart", "always"],
    );
    assert_eq!(get(port, "/ok").await, (200, "python ok\n".to_owned()));
    // The loop ends by fuel or by the timeout, whichever comes first on this machine.
    for (path, reasons) in [
        ("/loop", &["fuel_exhausted", "timeout"][..]),
        ("/bomb", &["memory_limit"][..]),
    ] {
        let (status, body) = get(port, path).await;
        assert_eq!(status, 500, "{path}: {body}");
        // The next requests are served again once the instance has restarted.
        wait_for("/ok after the crash", T, || async {
            let reply = http_request("GET", &format!("http://127.0.0.1:{port}/ok"), "")
                .await
                .ok()?;
            (reply.status == 200 && reply.body == "python ok\n").then_some(())
        })
        .await;
        let got = lat.cli(&["instance", "get", &id]);
        assert!(
            reasons.iter().any(|r| got.contains(r)),
            "{path}: none of {reasons:?} in\n{got}"
        );
    }
}

const PY_FRONT: &str = r#"
[component]
name = "py-front"
version = "0.1.0"
[limits]
max_memory = "48MiB"
fuel = 50_000_000
timeout = "5s"
max_concurrency = 8
[capabilities]
imports = ["wasi:http/types", "wasi:http/outgoing-handler", "wasi:keyvalue/store", "wasi:keyvalue/atomics", "wasi:keyvalue/batch", "wasi:logging/logging", "example:pipeline/transform"]
requires = ["wasi:http/incoming-handler", "wasi:keyvalue", "example:pipeline/transform"]
"#;

const RUST_MIDDLE: &str = r#"
[component]
name = "middle"
version = "0.1.0"
[limits]
max_memory = "16MiB"
fuel = 50_000_000
timeout = "5s"
max_concurrency = 8
[capabilities]
imports = ["example:pipeline/transform", "wasi:keyvalue/store", "wasi:keyvalue/atomics"]
requires = ["example:pipeline/transform", "wasi:keyvalue"]
"#;

const C_STAGE: &str = r#"
[component]
name = "c-stage"
version = "0.1.0"
[limits]
max_memory = "4MiB"
fuel = 10_000_000
timeout = "3s"
max_concurrency = 8
[capabilities]
imports = ["wasi:keyvalue/store", "wasi:keyvalue/atomics"]
requires = ["wasi:keyvalue"]
"#;

#[tokio::test]
async fn an_http_request_runs_through_python_rust_and_c_on_two_hosts() {
    let front = components::python(
        "tests/components/python/pipe_http",
        "trellis:polyglot/pipe-http",
        "tests/components/python/wit",
    );
    let stage = components::c(
        "tests/components/c/stage",
        "tests/components/c/wit",
        "trellis:test-c/stage",
    );
    let middle = components::build().path("pipe_middle");
    let nats = trellis_tests::Nats::start().await;
    let l = trellis_tests::lattice("polyglot-pipeline");
    let _procs = [
        nats.controller(&l, "c", "3s"),
        nats.host(&l, "h1", &[]),
        nats.provider(&l, "kv", &[]),
        nats.provider(&l, "http-server", &[]),
    ];
    let mut h2 = nats.host(&l, "h2", &[]);
    nats.wait_for_hosts(&l, 2).await;
    let dir = tempfile::tempdir().unwrap();
    for (wasm, name, manifest) in [
        (&front, "py-front", PY_FRONT),
        (&middle, "middle", RUST_MIDDLE),
        (&stage, "c-stage", C_STAGE),
    ] {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, manifest).unwrap();
        nats.push(&l, wasm, &path);
    }
    let cli = |args: &[&str]| nats.cli_ok(&l, args);
    cli(&[
        "link",
        "add",
        "py-front",
        "example:pipeline/transform",
        "middle",
    ]);
    let last = cli(&[
        "link",
        "add",
        "middle",
        "example:pipeline/transform",
        "c-stage",
        "-o",
        "json",
    ]);
    let last: Value = serde_json::from_str(&last).unwrap();
    let last = last["link"]["link_id"].as_str().unwrap().to_owned();

    // Python and Rust on h1, C on h2; each counts in a bucket of its own.
    let port = free_port();
    let http = format!("wasi:http/incoming-handler address=127.0.0.1:{port}");
    // Restarted, and relocated when their host is lost.
    let start = |component: &str, host: &str, grants: &[&str]| {
        let mut args = vec!["--host", host, "--restart", "always"];
        for g in grants {
            args.extend(["--grant", g]);
        }
        nats.start_instance(&l, component, &args);
    };
    start("c-stage", "h2", &["wasi:keyvalue bucket=c-stage"]);
    start("middle", "h1", &["wasi:keyvalue bucket=middle"]);
    start("py-front", "h1", &["wasi:keyvalue bucket=py-front", &http]);

    assert_eq!(
        get(port, "/hello").await,
        (
            200,
            "python: #1\nmiddle: 5 chars #1\nc: olleh #1\n".to_owned()
        )
    );

    // The C stage's host dies: its instance is relocated to h1, and the pipeline answers again,
    // its count carried on by its bucket.
    h2.kill();
    let answer = wait_for("the pipeline after h2 died", T, || async {
        let reply = http_request("GET", &format!("http://127.0.0.1:{port}/again"), "")
            .await
            .ok()?;
        (reply.status == 200).then_some(reply.body)
    })
    .await;
    assert!(
        answer.starts_with("python: #")
            && answer.contains("\nmiddle: 5 chars #")
            && answer.ends_with("\nc: niaga #2\n"),
        "{answer}"
    );
    let listed = cli(&["instance", "ls", "--component", "c-stage", "-o", "json"]);
    assert!(
        listed.contains("\"h1\""),
        "c-stage relocated to h1: {listed}"
    );

    // Removing the middle's link denies its next call at once; the error reaches HTTP.
    cli(&["link", "rm", &last]);
    let (status, body) = get(port, "/denied").await;
    assert_eq!(status, 502, "{body}");
    assert!(body.starts_with("error: access denied"), "{body}");
}
