//! The compiled-artifact cache: a restarted runtime does not compile again.

use serde_json::json;
use trellis_host::{Manifest, Runtime, RuntimeConfig};

use crate::{components, limits};

fn runtime_on(dir: &std::path::Path) -> Runtime {
    let mut config = RuntimeConfig::new();
    config.pooling_instances(4).cache_dir(dir);
    Runtime::new(&config).unwrap()
}

#[tokio::test]
async fn a_second_runtime_loads_from_the_cache() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = components::build().bytes("typed");
    let manifest = Manifest::new("typed", "0.1.0", limits()).unwrap();

    let first = runtime_on(dir.path());
    let typed = first.load(&bytes, manifest.clone()).unwrap();
    assert!(!typed.load_outcome().cache_hit);
    assert_eq!(first.compilations(), 1);
    // Loading again in the same runtime is a hit too.
    assert!(
        first
            .load(&bytes, manifest.clone())
            .unwrap()
            .load_outcome()
            .cache_hit
    );
    assert_eq!(first.compilations(), 1);
    drop((typed, first));

    let second = runtime_on(dir.path());
    let typed = second.load(&bytes, manifest).unwrap();
    assert!(typed.load_outcome().cache_hit);
    assert_eq!(second.compilations(), 0);
    assert_eq!(typed.invoke("add", json!([20, 22])).await.unwrap(), 42);
}

#[tokio::test]
async fn a_corrupt_artifact_is_recompiled() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = components::build().bytes("counter");
    let manifest = Manifest::new("counter", "0.1.0", limits()).unwrap();
    runtime_on(dir.path())
        .load(&bytes, manifest.clone())
        .unwrap();

    // Truncate every artifact, as a crash mid-write without the atomic rename would.
    let mut artifacts = 0;
    for engine_dir in std::fs::read_dir(dir.path()).unwrap() {
        for artifact in std::fs::read_dir(engine_dir.unwrap().path()).unwrap() {
            let path = artifact.unwrap().path();
            assert_eq!(path.extension().unwrap(), "cwasm", "{}", path.display());
            std::fs::write(&path, b"garbage").unwrap();
            artifacts += 1;
        }
    }
    assert_eq!(artifacts, 1);

    let runtime = runtime_on(dir.path());
    let counter = runtime.load(&bytes, manifest.clone()).unwrap();
    assert!(!counter.load_outcome().cache_hit);
    assert_eq!(runtime.compilations(), 1);
    assert_eq!(counter.invoke("increment", json!([])).await.unwrap(), 1);
    // And the rewritten artifact is good again.
    assert!(
        runtime_on(dir.path())
            .load(&bytes, manifest)
            .unwrap()
            .load_outcome()
            .cache_hit
    );
}
