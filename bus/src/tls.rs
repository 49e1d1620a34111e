//! TLS for every NATS connection of a process: the CA that signs the servers' certificates, and
//! optionally a client certificate for servers that verify clients (`tls { verify: true }`).
//!
//! Every Trellis binary takes the same options (flatten [`TlsArgs`] into its arguments), sets
//! them once with [`set_tls`], and [`crate::connect`] applies them; processes it starts get
//! them as environment variables ([`tls_env`]).

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;

/// Environment variable of [`TlsArgs::ca`].
pub const ENV_CA: &str = "TRELLIS_TLS_CA";
/// Environment variable of [`TlsArgs::cert`].
pub const ENV_CERT: &str = "TRELLIS_TLS_CERT";
/// Environment variable of [`TlsArgs::key`].
pub const ENV_KEY: &str = "TRELLIS_TLS_KEY";

/// The TLS options every Trellis binary takes.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args)]
pub struct TlsArgs {
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
}

impl TlsArgs {
    /// Whether any TLS option is set.
    pub fn is_set(&self) -> bool {
        self.ca.is_some() || self.cert.is_some()
    }

    /// Checks that every file named can be read.
    ///
    /// # Errors
    ///
    /// Names the option and the file that cannot be read.
    pub fn check(&self) -> Result<(), String> {
        for (option, path) in [
            ("--tls-ca", &self.ca),
            ("--tls-cert", &self.cert),
            ("--tls-key", &self.key),
        ] {
            if let Some(path) = path {
                std::fs::metadata(path).map_err(|e| format!("{option} {}: {e}", path.display()))?;
            }
        }
        Ok(())
    }
}

static TLS: OnceLock<TlsArgs> = OnceLock::new();

/// Sets, once per process, the TLS options of every connection it makes. Returns false, changing
/// nothing, when they were set (or read) before.
pub fn set_tls(tls: TlsArgs) -> bool {
    TLS.set(tls).is_ok()
}

/// The TLS options of this process.
pub fn tls() -> &'static TlsArgs {
    TLS.get_or_init(TlsArgs::default)
}

/// The environment that gives a process this one starts the same TLS options.
pub fn tls_env() -> Vec<(&'static str, OsString)> {
    let tls = tls();
    [
        (ENV_CA, &tls.ca),
        (ENV_CERT, &tls.cert),
        (ENV_KEY, &tls.key),
    ]
    .into_iter()
    .filter_map(|(name, path)| path.as_ref().map(|p| (name, p.clone().into_os_string())))
    .collect()
}

/// Applies this process's TLS options to `options`.
pub(crate) fn apply(mut options: async_nats::ConnectOptions) -> async_nats::ConnectOptions {
    let tls = tls();
    if let Some(ca) = &tls.ca {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&tls.cert, &tls.key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if tls.is_set() {
        // A CA was given for a reason: never fall back to a plain connection.
        options = options.require_tls(true);
    }
    options
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        tls: TlsArgs,
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_files_must_exist() {
        assert!(Cli::try_parse_from(["t", "--tls-cert", "c.pem"]).is_err());
        let cli = Cli::try_parse_from(["t", "--tls-ca", "/nonexistent/ca.pem"]).unwrap();
        assert!(cli.tls.is_set());
        let err = cli.tls.check().unwrap_err();
        assert!(err.starts_with("--tls-ca /nonexistent/ca.pem"), "{err}");
        assert!(!TlsArgs::default().is_set());
    }
}
