//! Signed components: `trellis key new` makes issuer keys, `component push --sign` signs a
//! component's digest and manifest, and a host started with `--trust` runs only components
//! signed by an issuer it trusts; pushing again signed by a trusted key re-signs a component.

use std::os::unix::fs::PermissionsExt as _;

use trellis_schemas::control::ComponentRegisterRequest;
use trellis_schemas::{ErrorCode, FactData, Manifest, ManifestDoc};
use trellis_tests::{Nats, components, lattice};

const COUNTER: &str = "[component]\nname = \"counter\"\nversion = \"1.0.0\"\n[limits]\nmax_memory = \"16MiB\"\nfuel = 50000000\ntimeout = \"2s\"\nmax_concurrency = 4\n";

#[tokio::test]
async fn a_trusting_host_runs_only_components_its_issuers_signed() {
    let nats = Nats::start().await;
    let l = lattice("signing");
    let dir = tempfile::tempdir().unwrap();
    let key = |name: &str| {
        let path = dir.path().join(name);
        let out = nats.cli_ok(&l, &["key", "new", path.to_str().unwrap(), "-o", "json"]);
        let reply: serde_json::Value = serde_json::from_str(&out).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the seed is readable by its owner only"
        );
        (path, reply["issuer"].as_str().unwrap().to_owned())
    };
    let (trusted_key, trusted) = key("trusted.nk");
    let (other_key, other) = key("other.nk");
    assert!(trusted.starts_with('O') && trusted != other);
    // A key file is never overwritten.
    let (code, _, err) = nats.cli(&[
        "--lattice",
        l.as_str(),
        "key",
        "new",
        trusted_key.to_str().unwrap(),
    ]);
    assert_eq!(code, 1, "{err}");

    let _controller = nats.controller(&l, "c1", "10s");
    let _host = nats.host_with(&l, "h1", &[], &["--trust", &trusted]);
    nats.wait_for_a_host(&l).await;
    let wasm = components::build().path("counter");
    let manifest = dir.path().join("counter.toml");
    std::fs::write(&manifest, COUNTER).unwrap();
    let push = |sign: Option<&std::path::Path>| {
        let mut args = vec![
            "component",
            "push",
            wasm.to_str().unwrap(),
            "--manifest",
            manifest.to_str().unwrap(),
        ];
        if let Some(key) = sign {
            args.extend(["--sign", key.to_str().unwrap()]);
        }
        nats.cli_ok(&l, &args)
    };
    let start_fails_with = |why: &str| {
        let (code, out, err) = nats.cli(&[
            "--lattice",
            l.as_str(),
            "instance",
            "start",
            "counter",
            "--wait",
        ]);
        assert_ne!(code, 0, "{out}{err}");
        let all = format!("{out}{err}");
        assert!(
            all.contains("untrusted_component") && all.contains(why),
            "{all}"
        );
    };

    // Unsigned: refused.
    push(None);
    start_fails_with("is not signed");
    // Signed by a key the host does not trust: refused.
    let out = push(Some(&other_key));
    assert!(out.contains(&format!("signed by {other}")), "{out}");
    start_fails_with(&format!(
        "signed by {other}, which this host does not trust"
    ));
    // A file on the host's machine has no signature: refused.
    let files = tempfile::tempdir().unwrap();
    std::fs::copy(&wasm, files.path().join("counter.wasm")).unwrap();
    std::fs::write(files.path().join("Component.toml"), COUNTER).unwrap();
    let file_url = format!("file://{}", files.path().join("counter.wasm").display());
    let (code, out, err) = nats.cli(&[
        "--lattice",
        l.as_str(),
        "instance",
        "start",
        &file_url,
        "--wait",
    ]);
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        format!("{out}{err}")
            .contains("untrusted_component: this host runs only signed components"),
        "{out}{err}"
    );
    // Re-signed by the trusted key: it runs.
    push(Some(&trusted_key));
    nats.cli_ok(&l, &["instance", "start", "counter", "--wait"]);
    assert_eq!(
        nats.cli_ok(&l, &["call", "counter", "increment"]).trim(),
        "1"
    );
    let listed = nats.cli_ok(&l, &["component", "ls"]);
    assert!(
        listed.contains("SIGNED BY") && listed.contains(&trusted),
        "{listed}"
    );
    let facts = nats.facts(&l).await;
    let refusals = facts
        .iter()
        .filter(|f| matches!(&f.event.data, FactData::InstanceStartFailed(d) if d.reason.starts_with("untrusted_component")))
        .count();
    assert_eq!(refusals, 3);

    // A signature that does not cover what is registered (other limits) is refused at once.
    let ctl = nats.ctl(&l).await;
    let registered: serde_json::Value =
        serde_json::from_str(&nats.cli_ok(&l, &["component", "ls", "-o", "json"])).unwrap();
    let digest = registered["components"][0]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    let seed = std::fs::read_to_string(&trusted_key).unwrap();
    let other_limits = ManifestDoc::from_manifest(
        &Manifest::from_toml(&COUNTER.replace("50000000", "60000000")).unwrap(),
    )
    .unwrap();
    let forged = trellis_bus::signing::sign(&seed, &digest, &other_limits).unwrap();
    let err = ctl
        .request(&ComponentRegisterRequest {
            digest,
            manifest: COUNTER.to_owned(),
            signature: Some(forged),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidRequest), "{err}");
    assert!(err.to_string().contains("does not match"), "{err}");
    // A key file that is not a seed is a clear error before anything is uploaded.
    std::fs::write(dir.path().join("bad.nk"), "not a seed").unwrap();
    let (code, _, err) = nats.cli(&[
        "--lattice",
        l.as_str(),
        "component",
        "push",
        wasm.to_str().unwrap(),
        "--manifest",
        manifest.to_str().unwrap(),
        "--sign",
        dir.path().join("bad.nk").to_str().unwrap(),
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("not an issuer seed"), "{err}");
}
