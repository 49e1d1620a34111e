//! Components and instances through the controller: registration, validation, placement errors.

use std::time::Duration;

use trellis_schemas::control::{
    ComponentListRequest, ComponentRegisterRequest, HostListRequest, InstanceStartRequest,
};
use trellis_schemas::{CtlOp, ErrorCode, FactKind, RestartPolicy, subject};
use trellis_tests::{Nats, lattice, wait_for};

const T: Duration = Duration::from_secs(20);

const MANIFEST: &str = r#"
[component]
name = "hello"
version = "1.2.0"

[limits]
max_memory = "16MiB"
fuel = 1_000_000
timeout = "500ms"
max_concurrency = 4
"#;

#[tokio::test]
async fn component_push_stores_content_addressed_and_records_the_fact() {
    let nats = Nats::start().await;
    let l = lattice("default");
    let _controller = nats.controller(&l, "c", "30s");
    let ctl = nats.ctl(&l).await;
    wait_for("controller", T, || async {
        ctl.request(&ComponentListRequest::default()).await.ok()
    })
    .await;

    let dir = tempfile::tempdir().unwrap();
    let wasm = dir.path().join("hello.wasm");
    std::fs::write(&wasm, b"\0asm not really, the controller does not run it").unwrap();
    std::fs::write(dir.path().join("Component.toml"), MANIFEST).unwrap();
    let (code, out, err) = nats.cli(&["component", "push", wasm.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("stored hello@1.2.0"), "{out}");
    // Pushing the same bytes again is harmless.
    let (code, _, err) = nats.cli(&["component", "push", wasm.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");

    let (code, out, _) = nats.cli(&["component", "ls", "-o", "json"]);
    assert_eq!(code, 0);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let c = &json["components"][0];
    assert_eq!(c["manifest"]["name"], "hello");
    assert_eq!(c["manifest"]["max_memory_bytes"], 16 << 20);
    assert_eq!(c["manifest"]["timeout_ms"], 500);
    let digest = trellis_bus::digest_of(&std::fs::read(&wasm).unwrap());
    assert_eq!(c["digest"], digest.as_str());
    let facts = nats.facts(&l).await;
    assert!(
        facts
            .iter()
            .any(|f| f.event.kind() == FactKind::ArtifactStored)
    );

    // A manifest without a required limit is refused before anything is stored, naming the field.
    std::fs::write(
        dir.path().join("Component.toml"),
        MANIFEST.replace("fuel = 1_000_000\n", ""),
    )
    .unwrap();
    let (code, _, err) = nats.cli(&["component", "push", wasm.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("limits.fuel") && err.contains("required"),
        "{err}"
    );
}

#[tokio::test]
async fn component_register_checks_digest_and_limits() {
    let nats = Nats::start().await;
    let l = lattice("register");
    let _controller = nats.controller(&l, "c", "30s");
    let ctl = nats.ctl(&l).await;
    wait_for("controller", T, || async {
        ctl.request(&ComponentListRequest::default()).await.ok()
    })
    .await;
    let js = async_nats::jetstream::new(nats.client().await);
    let digest = trellis_bus::put_artifact(&js, &l, b"some bytes")
        .await
        .unwrap();

    let register = |digest: &str, manifest: &str| ComponentRegisterRequest {
        digest: digest.to_owned(),
        manifest: manifest.to_owned(),
        signature: None,
    };
    let err = ctl
        .request(&register(
            &digest,
            &MANIFEST.replace("timeout = \"500ms\"", "timeout = \"2h\""),
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::LimitsRequired));
    assert!(err.to_string().contains("limits.timeout"), "{err}");
    let err = ctl
        .request(&register("sha256:abc", MANIFEST))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidRequest));
    let missing = trellis_bus::digest_of(b"never uploaded");
    let err = ctl
        .request(&register(&missing, MANIFEST))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    // Bytes stored under another content's name are caught.
    let store = trellis_bus::artifact_store(&js, &l).await.unwrap();
    let forged = trellis_bus::digest_of(b"what the name claims");
    let mut other: &[u8] = b"something else";
    store
        .put(trellis_bus::digest_hex(&forged).unwrap(), &mut other)
        .await
        .unwrap();
    let err = ctl.request(&register(&forged, MANIFEST)).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::DigestMismatch));

    let ok = ctl.request(&register(&digest, MANIFEST)).await.unwrap();
    assert_eq!(ok.component.size, 10);
    assert_eq!(ok.component.manifest.fuel, 1_000_000);
    // Again under its own name and version: a new record of the same code, with its limits.
    let again = MANIFEST.replace("fuel = 1_000_000", "fuel = 2_000_000");
    let ok = ctl.request(&register(&digest, &again)).await.unwrap();
    assert_eq!(ok.component.manifest.fuel, 2_000_000);
    // Under another version or name: refused, or the store would lose hello@1.2.0.
    for other in [
        MANIFEST.replace("1.2.0", "1.3.0"),
        MANIFEST.replace("\"hello\"", "\"hi\""),
    ] {
        let err = ctl.request(&register(&digest, &other)).await.unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::Conflict), "{err}");
        assert!(err.to_string().contains("hello@1.2.0"), "{err}");
    }
    let listed = ctl.request(&ComponentListRequest::default()).await.unwrap();
    let versions: Vec<(&str, &str)> = listed
        .components
        .iter()
        .map(|c| (c.manifest.name.as_str(), c.manifest.version.as_str()))
        .collect();
    assert_eq!(versions, [("hello", "1.2.0")]);
}

#[tokio::test]
async fn instance_start_is_validated_and_says_why_no_host_fits() {
    let nats = Nats::start().await;
    let l = lattice("place");
    let _controller = nats.controller(&l, "c", "30s");
    let _host = nats.host(&l, "h1", &["zone=eu"]);
    let ctl = nats.ctl(&l).await;
    wait_for("h1 listed", T, || async {
        let reply = ctl.request(&HostListRequest::default()).await.ok()?;
        (!reply.hosts.is_empty()).then_some(())
    })
    .await;
    let js = async_nats::jetstream::new(nats.client().await);
    let digest = trellis_bus::put_artifact(&js, &l, b"code").await.unwrap();
    ctl.request(&ComponentRegisterRequest {
        digest,
        manifest: MANIFEST.into(),
        signature: None,
    })
    .await
    .unwrap();

    let start = |component: &str| InstanceStartRequest {
        component: component.into(),
        count: 1,
        host_id: None,
        labels: Default::default(),
        restart: RestartPolicy::Never,
        min_seq: None,
        grants: vec![],
        isolation: None,
    };
    let err = ctl.request(&start("nope")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let err = ctl.request(&start("hello@9.9.9")).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));

    let mut r = start("hello");
    r.labels.insert("zone".into(), "us".into());
    let err = ctl.request(&r).await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NoHostAvailable));
    assert!(
        err.to_string()
            .contains("h1: label zone=us wanted, host has zone=eu"),
        "{err}"
    );

    let mut r = start("hello");
    r.count = 0;
    assert_eq!(
        ctl.request(&r).await.unwrap_err().code(),
        Some(ErrorCode::InvalidRequest)
    );
    let mut r = start("hello");
    r.restart = RestartPolicy::Backoff {
        initial_ms: 5_000,
        max_ms: 10,
        max_attempts: None,
    };
    assert_eq!(
        ctl.request(&r).await.unwrap_err().code(),
        Some(ErrorCode::InvalidRequest)
    );

    // Raw JSON from a plain client: the restart policy's shape is part of the schema.
    let client = nats.client().await;
    let reply = client
        .request(
            subject::ctl(&l, CtlOp::InstanceStart),
            r#"{"component":"hello","restart":{"policy":"sometimes"}}"#.into(),
        )
        .await
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    assert_eq!(json["error"]["code"], "invalid_request", "{json}");
}
