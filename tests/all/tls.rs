//! TLS on every connection: a nats-server that requires TLS and verifies client certificates,
//! with a CA made in the test; the controller, a host, a provider the host starts and the CLI all
//! connect with `--tls-ca`, `--tls-cert` and `--tls-key` and the lattice works. Without the CA, or
//! without a client certificate, the CLI cannot connect and says so.

use std::path::{Path, PathBuf};
use std::process::Command;

use trellis_tests::{Nats, cli_at, lattice};

/// A new P-256 key, unencrypted, for `openssl req`.
const NEW_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
];

fn openssl(dir: &Path, args: &[&[&str]]) {
    let args = args.concat();
    // scripts/test names the binary it installed; else the one on the PATH.
    let openssl = std::env::var_os("TRELLIS_OPENSSL").unwrap_or_else(|| "openssl".into());
    let out = Command::new(openssl)
        .args(&args)
        .current_dir(dir)
        .output()
        .expect("openssl runs (Debian package openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate for `name` with `extensions` (an `openssl x509 -extfile`), signed by the CA in
/// `dir`; returns its certificate and key files.
fn issue(dir: &Path, name: &str, extensions: &str) -> (PathBuf, PathBuf) {
    let (ext, key, csr, pem) = (
        format!("{name}.ext"),
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    std::fs::write(dir.join(&ext), extensions).unwrap();
    let subject = format!("/CN=trellis-test-{name}");
    openssl(
        dir,
        &[
            &["req"],
            &NEW_KEY,
            &["-keyout", &key, "-out", &csr, "-subj", &subject],
        ],
    );
    openssl(
        dir,
        &[&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &pem,
            "-extfile",
            &ext,
        ]],
    );
    (dir.join(pem), dir.join(key))
}

#[tokio::test]
async fn every_process_connects_over_tls_with_client_certificates() {
    let pki = tempfile::tempdir().unwrap();
    let dir = pki.path();
    openssl(
        dir,
        &[
            &["req", "-x509"],
            &NEW_KEY,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "1",
                "-subj",
                "/CN=trellis-test-ca",
            ],
        ],
    );
    let (server_cert, server_key) = issue(
        dir,
        "server",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    );
    let (client_cert, client_key) = issue(dir, "client", "extendedKeyUsage=clientAuth\n");
    let ca = dir.join("ca.pem");
    let path = |p: &Path| p.display().to_string();

    let nats = Nats::start_with_args(&[
        "--tls",
        "--tlscert",
        &path(&server_cert),
        "--tlskey",
        &path(&server_key),
        "--tlscacert",
        &path(&ca),
        "--tlsverify",
    ])
    .await;
    let url = format!("tls://127.0.0.1:{}", nats.port);
    let l = lattice("tls");
    let tls: Vec<String> = vec![
        "--tls-ca".into(),
        path(&ca),
        "--tls-cert".into(),
        path(&client_cert),
        "--tls-key".into(),
        path(&client_key),
    ];
    let common = |extra: &[&str]| -> Vec<String> {
        ["--nats", url.as_str(), "--lattice", l.as_str()]
            .iter()
            .map(|s| (*s).to_owned())
            .chain(tls.iter().cloned())
            .chain(extra.iter().map(|s| (*s).to_owned()))
            .collect()
    };
    let _lattice = trellis_tests::controller_and_host_h1(nats.logs(), common);
    let cli = |args: &[&str]| {
        let mut all: Vec<String> = ["--lattice", l.as_str()]
            .iter()
            .map(|s| (*s).to_owned())
            .chain(tls.iter().cloned())
            .collect();
        all.extend(args.iter().map(|s| (*s).to_owned()));
        let all: Vec<&str> = all.iter().map(String::as_str).collect();
        cli_at(&url, &all)
    };
    // The whole path works, and a provider the host starts inherits TLS.
    trellis_tests::exercise_lattice(cli, "h1").await;

    // Without the CA the server's certificate is not trusted; without a client certificate the
    // server refuses the client. Either way: exit code 4, the lattice cannot be reached.
    let (code, _, err) = cli_at(&url, &["--lattice", l.as_str(), "host", "ls"]);
    assert_eq!(code, 4, "no CA: {err}");
    assert!(err.contains("cannot connect"), "{err}");
    let (code, _, err) = cli_at(
        &url,
        &[
            "--lattice",
            l.as_str(),
            "--tls-ca",
            &path(&ca),
            "host",
            "ls",
        ],
    );
    assert_eq!(code, 4, "no client certificate: {err}");
    // A file that does not exist is a usage error, before any connection.
    let (code, _, err) = cli_at(
        &url,
        &[
            "--lattice",
            l.as_str(),
            "--tls-ca",
            "/nonexistent/ca.pem",
            "host",
            "ls",
        ],
    );
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--tls-ca /nonexistent/ca.pem"), "{err}");
}
