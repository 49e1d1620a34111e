//! NATS credentials: with a server that admits only a known nkey user, the controller, a host, a
//! provider it starts and the CLI all connect with `--creds <seed file>`; without it the CLI
//! cannot connect, and a file that holds no credentials is a usage error.

use trellis_tests::{Nats, cli_at, lattice};

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
    let _lattice = trellis_tests::controller_and_host_h1(nats.logs(), common);
    let cli = |args: &[&str]| {
        let mut all = vec!["--lattice", l.as_str(), "--creds", seed_arg];
        all.extend_from_slice(args);
        cli_at(&url, &all)
    };
    // The whole path works, and a provider the host starts logs in with the host's credentials.
    trellis_tests::exercise_lattice(cli, "h1").await;

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
