//! How a process proves who it is to NATS and checks who NATS is: user credentials (a `.creds`
//! file with a user JWT and its seed, or an nkey seed alone), and TLS (the CA that signs the
//! servers' certificates, and optionally a client certificate for servers that verify clients).
//!
//! Every Trellis binary takes the same options (flatten [`ConnectArgs`] into its arguments), sets
//! them once with [`set_connect_args`], and [`crate::connect`] applies them; processes it starts
//! get them as environment variables ([`connect_env`]).

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Environment variable of [`ConnectArgs::creds`].
pub const ENV_CREDS: &str = "TRELLIS_CREDS";
/// Environment variable of the credentials the messaging provider uses for the application
/// subjects components publish and subscribe to, on a connection of their own (the `app` role
/// of `trellis creds`). Without it, that traffic shares the provider's connection.
pub const ENV_APP_CREDS: &str = "TRELLIS_APP_CREDS";
/// Environment variable of [`ConnectArgs::ca`].
pub const ENV_CA: &str = "TRELLIS_TLS_CA";
/// Environment variable of [`ConnectArgs::cert`].
pub const ENV_CERT: &str = "TRELLIS_TLS_CERT";
/// Environment variable of [`ConnectArgs::key`].
pub const ENV_KEY: &str = "TRELLIS_TLS_KEY";

/// The connection options every Trellis binary takes.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct ConnectArgs {
    /// NATS user credentials: a `.creds` file (user JWT and seed, as `nsc` writes them) or a
    /// file holding an nkey user seed (`SU…`).
    #[arg(long, env = ENV_CREDS, global = true, value_name = "FILE")]
    pub creds: Option<PathBuf>,
    /// PEM file of the CA that signed the NATS servers' certificates. With it (or a client
    /// certificate) every connection must be TLS; `tls://` URLs ask for TLS too.
    #[arg(long = "tls-ca", env = ENV_CA, global = true, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// PEM client certificate, for servers that verify clients; needs --tls-key.
    #[arg(long = "tls-cert", env = ENV_CERT, global = true, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long = "tls-key", env = ENV_KEY, global = true, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// The prefix of the connection's reply subjects (not an option: set by a process for a
    /// connection of a role with an inbox of its own). Without it, a connection with
    /// credentials uses `_INBOX.<its public key>`, one without `_INBOX`.
    #[arg(skip)]
    pub inbox_prefix: Option<String>,
}

impl ConnectArgs {
    /// Whether any TLS option is set.
    pub fn tls_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some()
    }

    /// Checks that every file named can be read, and that credentials are credentials.
    ///
    /// # Errors
    ///
    /// Names the option and the file that cannot be read, or what is wrong with the credentials.
    pub fn check(&self) -> Result<(), String> {
        for (option, path) in [
            ("--creds", &self.creds),
            ("--tls-ca", &self.ca),
            ("--tls-cert", &self.cert),
            ("--tls-key", &self.key),
        ] {
            if let Some(path) = path {
                std::fs::metadata(path).map_err(|e| format!("{option} {}: {e}", path.display()))?;
            }
        }
        if let Some(path) = &self.creds {
            credentials(path)?;
        }
        Ok(())
    }
}

/// What a credentials file holds.
enum Credentials {
    /// A `.creds` file: a user JWT and its seed.
    Jwt(PathBuf),
    /// An nkey user seed.
    Nkey(String),
}

impl Credentials {
    /// The user's public key (`U…`), read off its seed.
    fn public_key(&self) -> Option<String> {
        let seed = match self {
            Credentials::Nkey(seed) => seed.clone(),
            // The seed block of a `.creds` file: the one line that is a user seed.
            Credentials::Jwt(path) => std::fs::read_to_string(path)
                .ok()?
                .lines()
                .map(str::trim)
                .find(|line| line.starts_with("SU"))?
                .to_owned(),
        };
        let key = nkeys::KeyPair::from_seed(&seed).ok()?;
        Some(key.public_key())
    }
}

fn credentials(path: &std::path::Path) -> Result<Credentials, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("--creds {}: {e}", path.display()))?;
    if text.contains("BEGIN NATS USER JWT") {
        return Ok(Credentials::Jwt(path.to_owned()));
    }
    let seed = text.trim();
    match nkeys::KeyPair::from_seed(seed) {
        Ok(key) if key.public_key().starts_with('U') => Ok(Credentials::Nkey(seed.to_owned())),
        _ => Err(format!(
            "--creds {}: neither a .creds file nor an nkey user seed (SU…)",
            path.display()
        )),
    }
}

static ARGS: OnceLock<ConnectArgs> = OnceLock::new();

/// Sets, once per process, the credentials and TLS options of every connection it makes.
/// Returns false, changing nothing, when they were set (or read) before.
pub fn set_connect_args(args: ConnectArgs) -> bool {
    ARGS.set(args).is_ok()
}

/// The connection options of this process.
pub fn connect_args() -> &'static ConnectArgs {
    ARGS.get_or_init(ConnectArgs::default)
}

/// The environment that gives a process this one starts the same connection options.
pub fn connect_env() -> Vec<(&'static str, OsString)> {
    let args = connect_args();
    [
        (ENV_CREDS, &args.creds),
        (ENV_CA, &args.ca),
        (ENV_CERT, &args.cert),
        (ENV_KEY, &args.key),
    ]
    .into_iter()
    .filter_map(|(name, path)| path.as_ref().map(|p| (name, p.clone().into_os_string())))
    .collect()
}

/// Applies connection options `args` to `options`.
pub(crate) async fn apply(
    mut options: async_nats::ConnectOptions,
    args: &ConnectArgs,
) -> Result<async_nats::ConnectOptions, String> {
    let mut inbox_prefix = args.inbox_prefix.clone();
    if let Some(path) = &args.creds {
        let credentials = credentials(path)?;
        // Replies to this user's requests come under an inbox of its own, which a secured
        // lattice lets no other user read (`trellis_schemas::roles::inbox_prefix`).
        if inbox_prefix.is_none() {
            inbox_prefix = credentials
                .public_key()
                .map(|key| trellis_schemas::roles::inbox_prefix(&key));
        }
        options = match credentials {
            Credentials::Jwt(path) => options
                .credentials_file(&path)
                .await
                .map_err(|e| format!("--creds {}: {e}", path.display()))?,
            Credentials::Nkey(seed) => options.nkey(seed),
        };
    }
    if let Some(ca) = &args.ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if args.tls_set() {
        // A CA was given for a reason: never fall back to a plain connection.
        options = options.require_tls(true);
    }
    if let Some(prefix) = inbox_prefix {
        options = options.custom_inbox_prefix(prefix);
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        connect: ConnectArgs,
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_files_must_exist() {
        assert!(Cli::try_parse_from(["t", "--tls-cert", "c.pem"]).is_err());
        let cli = Cli::try_parse_from(["t", "--tls-ca", "/nonexistent/ca.pem"]).unwrap();
        assert!(cli.connect.tls_set());
        let err = cli.connect.check().unwrap_err();
        assert!(err.starts_with("--tls-ca /nonexistent/ca.pem"), "{err}");
        assert!(!ConnectArgs::default().tls_set());
    }

    #[test]
    fn credentials_are_a_creds_file_or_a_user_seed() {
        let dir = tempfile::tempdir().unwrap();
        let user = nkeys::KeyPair::new_user();
        let seed = dir.path().join("user.nk");
        std::fs::write(&seed, format!("{}\n", user.seed().unwrap())).unwrap();
        assert!(matches!(credentials(&seed), Ok(Credentials::Nkey(_))));
        let operator = dir.path().join("operator.nk");
        std::fs::write(&operator, nkeys::KeyPair::new_operator().seed().unwrap()).unwrap();
        let err = credentials(&operator).err().unwrap();
        assert!(
            err.contains("neither a .creds file nor an nkey user seed"),
            "{err}"
        );
        let creds = dir.path().join("user.creds");
        std::fs::write(
            &creds,
            "-----BEGIN NATS USER JWT-----\nx\n------END NATS USER JWT------\n",
        )
        .unwrap();
        assert!(matches!(credentials(&creds), Ok(Credentials::Jwt(_))));
    }

    #[test]
    fn the_public_key_comes_from_the_seed_of_either_kind_of_file() {
        let dir = tempfile::tempdir().unwrap();
        let user = nkeys::KeyPair::new_user();
        let seed = user.seed().unwrap();
        let nk = dir.path().join("user.nk");
        std::fs::write(&nk, format!("{seed}\n")).unwrap();
        let creds = dir.path().join("user.creds");
        std::fs::write(
            &creds,
            format!(
                "-----BEGIN NATS USER JWT-----\neyJ0\n------END NATS USER JWT------\n\n\
                 -----BEGIN USER NKEY SEED-----\n{seed}\n------END USER NKEY SEED------\n"
            ),
        )
        .unwrap();
        for path in [&nk, &creds] {
            let key = credentials(path).unwrap().public_key();
            assert_eq!(key.as_deref(), Some(user.public_key().as_str()));
        }
    }
}
