//! NATS credentials: with a server that admits only a known nkey user, the controller, a host, a
//! provider it starts and the CLI all connect with `--creds <seed file>`; without it the CLI
//! cannot connect, and a file that holds no credentials is a usage error.

use std::time::Duration;

use trellis_tests::{Nats, Proc, bin, cli_at, components, lattice, wait_for};

const T: Duration = Duration::from_secs(30);

#[tokio::test]
async fn every_process_logs_in_with_its_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let user = nkeys::KeyPair::new_user();
    let seed = dir.path().join("user.nk");
    std::fs::write(&seed, format!("{}\n", user.seed().unwrap())).unwrap();
    let conf = dir.path().join("auth.conf");
    std::fs::write(
        &conf,
        format!(
            "authorization {{ users: [ {{ nkey: {} }} ] }}\n",
            user.public_key()
        ),
    )
    .unwrap();
    let nats = Nats::start_with_args(&["-c", conf.to_str().unwrap()]).await;
    let url = nats.url();
    let l = lattice("creds");
    let seed_arg = seed.to_str().unwrap();
    let common = |rest: &[&str]| -> Vec<String> {
        [
            "--nats",
            url.as_str(),
            "--lattice",
            l.as_str(),
            "--creds",
            seed_arg,
        ]
        .iter()
        .chain(rest)
        .map(|s| (*s).to_owned())
        .collect()
    };
    let _controller = Proc::spawn(
        "controller",
        &bin("trellis"),
        &common(&["controller", "--host-timeout", "10s"]),
        nats.logs(),
    );
    let _host = Proc::spawn(
        "host-h1",
        &bin("trellis-host"),
        &common(&["--host-id", "h1", "--heartbeat-interval", "200ms"]),
        nats.logs(),
    );
    let cli = |args: &[&str]| {
        let mut all = vec!["--lattice", l.as_str(), "--creds", seed_arg];
        all.extend_from_slice(args);
        cli_at(&url, &all)
    };
    wait_for("host h1", T, || async {
        let (code, out, _) = cli(&["host", "ls", "-o", "json"]);
        (code == 0 && out.contains("\"h1\"")).then_some(())
    })
    .await;
    let manifest = dir.path().join("counter.toml");
    std::fs::write(
        &manifest,
        "[component]\nname = \"counter\"\nversion = \"1.0.0\"\n[limits]\nmax_memory = \"16MiB\"\nfuel = 50000000\ntimeout = \"2s\"\nmax_concurrency = 4\n",
    )
    .unwrap();
    let wasm = components::build().path("counter");
    let ok = |args: &[&str]| {
        let (code, out, err) = cli(args);
        assert_eq!(code, 0, "{args:?}: {out}{err}");
        out
    };
    ok(&[
        "component",
        "push",
        wasm.to_str().unwrap(),
        "--manifest",
        manifest.to_str().unwrap(),
    ]);
    ok(&["instance", "start", "counter", "--wait"]);
    assert_eq!(ok(&["call", "counter", "increment"]).trim(), "1");
    // A provider the host starts logs in with the host's credentials.
    ok(&["provider", "start", "messaging", "--host", "h1", "--wait"]);
    wait_for("the messaging provider running", T, || async {
        let (code, out, _) = cli(&["provider", "ls", "-o", "json"]);
        let reply: serde_json::Value = serde_json::from_str(&out).ok()?;
        (code == 0
            && reply["providers"]
                .as_array()?
                .iter()
                .any(|p| p["name"] == "messaging" && p["status"] == "running"))
        .then_some(())
    })
    .await;

    // Without credentials: the lattice cannot be reached.
    let (code, _, err) = cli_at(&url, &["--lattice", l.as_str(), "host", "ls"]);
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("authorization violation"), "{err}");
    // With a file that holds no credentials: a usage error naming it.
    let junk = dir.path().join("junk.nk");
    std::fs::write(&junk, "hello").unwrap();
    let (code, _, err) = cli_at(
        &url,
        &[
            "--lattice",
            l.as_str(),
            "--creds",
            junk.to_str().unwrap(),
            "host",
            "ls",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("neither a .creds file nor an nkey user seed"),
        "{err}"
    );
}
