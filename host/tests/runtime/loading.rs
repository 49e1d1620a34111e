//! Loading: invalid wasm, digests, host ceilings, imports.

use std::time::Duration;

use serde_json::json;
use trellis_host::{Digest, Limits, LoadError, Manifest, Runtime, RuntimeConfig};

use crate::{assert_still_serving, components, limits, runtime};

fn manifest(limits: Limits) -> Manifest {
    Manifest::new("subject", "1.0.0", limits).unwrap()
}

#[test]
fn invalid_wasm_is_an_error_not_a_panic() {
    let runtime = runtime();
    for bytes in [
        b"not wasm at all".to_vec(),
        Vec::new(),
        // A valid core module is still not a component.
        wat::parse_str("(module)").unwrap(),
        // A component truncated mid-way.
        components::build().bytes("typed")[..1000].to_vec(),
    ] {
        let err = runtime.load(&bytes, manifest(limits())).unwrap_err();
        assert!(matches!(err, LoadError::InvalidComponent { .. }), "{err}");
        assert!(
            err.to_string().contains(&Digest::of(&bytes).to_string()),
            "{err}"
        );
    }
}

#[tokio::test]
async fn verifies_the_expected_digest() {
    let runtime = runtime();
    let bytes = components::build().bytes("counter");
    let digest = Digest::of(&bytes);
    let counter = runtime
        .load_verified(&bytes, manifest(limits()), &digest)
        .unwrap();
    assert_eq!(counter.load_outcome().digest, digest);
    assert_eq!(counter.invoke("increment", json!([])).await.unwrap(), 1);

    let other = Digest::of(b"something else");
    let err = runtime
        .load_verified(&bytes, manifest(limits()), &other)
        .unwrap_err();
    assert!(
        matches!(err, LoadError::DigestMismatch { expected, actual } if expected == other && actual == digest),
        "{err}"
    );
}

#[test]
fn limits_above_the_host_ceilings_are_refused() {
    let mut config = RuntimeConfig::new();
    config
        .pooling_instances(4)
        .max_memory(16 * 1024 * 1024)
        .max_fuel(1_000_000)
        .max_timeout(Duration::from_secs(1))
        .max_concurrency(2);
    let runtime = Runtime::new(&config).unwrap();
    let bytes = components::build().bytes("counter");
    let ok = Limits {
        max_memory: 16 * 1024 * 1024,
        fuel: 1_000_000,
        timeout: Duration::from_secs(1),
        max_concurrency: 2,
    };
    runtime.load(&bytes, manifest(ok)).unwrap();
    let cases = [
        (
            Limits {
                max_memory: 32 * 1024 * 1024,
                ..ok
            },
            "limits.max_memory",
            "32MiB exceeds this host's ceiling of 16MiB",
        ),
        (
            Limits {
                fuel: 2_000_000,
                ..ok
            },
            "limits.fuel",
            "2000000 exceeds",
        ),
        (
            Limits {
                timeout: Duration::from_secs(5),
                ..ok
            },
            "limits.timeout",
            "5s exceeds",
        ),
        (
            Limits {
                max_concurrency: 3,
                ..ok
            },
            "limits.max_concurrency",
            "3 exceeds",
        ),
    ];
    for (limits, field, message) in cases {
        let err = runtime.load(&bytes, manifest(limits)).unwrap_err();
        assert!(
            matches!(err, LoadError::ExceedsHostLimit { field: f, .. } if f == field),
            "{err}"
        );
        assert!(err.to_string().contains(message), "{err}");
    }
}

#[test]
fn runtime_config_is_validated() {
    let mut config = RuntimeConfig::new();
    config.epoch_tick(Duration::from_secs(5));
    let err = Runtime::new(&config).unwrap_err();
    assert!(err.to_string().contains("epoch_tick"), "{err}");
}

/// A component importing an interface of its own and exporting a function that calls it.
const CAPABILITY_USER: &str = r#"
    (component
      (import "example:cap/thing" (instance $thing (export "ping" (func (result u32)))))
      (alias export $thing "ping" (func $ping))
      (core func $ping_lowered (canon lower (func $ping)))
      (core module $m
        (import "host" "ping" (func $p (result i32)))
        (func (export "call") (result i32) call $p)
        (func (export "answer") (result i32) i32.const 42))
      (core instance $host (export "ping" (func $ping_lowered)))
      (core instance $i (instantiate $m (with "host" (instance $host))))
      (func (export "call") (result u32) (canon lift (core func $i "call")))
      (func (export "answer") (result u32) (canon lift (core func $i "answer"))))
"#;

#[tokio::test]
async fn undeclared_imports_are_refused_and_unlinked_ones_fail_only_when_called() {
    let runtime = runtime();
    let bytes = wat::parse_str(CAPABILITY_USER).unwrap();
    let err = runtime.load(&bytes, manifest(limits())).unwrap_err();
    assert!(
        matches!(&err, LoadError::UndeclaredImport { import } if import == "example:cap/thing"),
        "{err}"
    );

    let declared = manifest(limits()).with_imports(["example:cap/thing"]);
    let user = runtime.load(&bytes, declared).unwrap();
    assert_eq!(user.invoke("answer", json!([])).await.unwrap(), 42);
    // Without a bridge nothing is linked: the call fails with access denied, not as a crash
    // (the function returns no `result` the guest could take the error in).
    let err = user.invoke("call", json!([])).await.unwrap_err();
    assert!(!err.is_crash(), "{err}");
    assert_eq!(err.reason(), "link_failed", "{err}");
    assert_eq!(
        err.code(),
        trellis_schemas::dataplane::ErrorCode::AccessDenied,
        "{err}"
    );
    assert_still_serving(&runtime).await;
}

#[tokio::test]
async fn uses_the_pool_and_falls_back_when_it_cannot_be_reserved() {
    assert_eq!(
        runtime().allocation_strategy(),
        trellis_host::AllocationStrategy::Pooling
    );
    // 40,000 slots of 4 GiB each need ~160 TiB of address space: more than the 128 TiB a
    // process has, so reserving the pool fails and the runtime allocates on demand instead.
    let mut config = RuntimeConfig::new();
    config
        .max_memory(4 * 1024 * 1024 * 1024)
        .pooling_instances(40_000);
    let runtime = Runtime::new(&config).unwrap();
    assert_eq!(
        runtime.allocation_strategy(),
        trellis_host::AllocationStrategy::OnDemand
    );
    assert_still_serving(&runtime).await;
}
