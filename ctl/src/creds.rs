//! `trellis creds`: the credentials of a secured lattice and the NATS server configuration that
//! enforces them.
//!
//! One directory holds an nkey user seed per role (`controller.nk`, `host-<id>.nk`,
//! `provider-<name>.nk`, `operator.nk`, `viewer.nk`, `app.nk`, `admin.nk`), each readable by
//! its owner only, and `nats.conf`: one account for the lattice whose users are those keys,
//! each with the permissions [`trellis_schemas::roles::permissions`] gives its role, and the
//! server's system account with one user (`system.nk`), whose key lets a controller read the
//! server's advisories of failed logins. Running it
//! again keeps every key it finds and adds the missing ones, so hosts can be added later.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use clap::Args;
use trellis_schemas::roles::{Grant, Permissions, Rules, Scope, permissions};
use trellis_schemas::{HostId, Lattice, ProviderName};

/// The providers credentials are made for when none is named.
pub const DEFAULT_PROVIDERS: &[&str] = &["kv", "http-server", "http-client", "messaging"];

/// `trellis creds DIR`.
#[derive(Debug, Args)]
pub struct CredsArgs {
    /// The directory to write (created if missing; existing keys in it are kept).
    pub dir: PathBuf,
    /// A host to make credentials for (`host-<id>.nk`; start it with `--host-id <id>`);
    /// repeat for more.
    #[arg(long = "host", value_name = "ID")]
    pub hosts: Vec<HostId>,
    /// A provider to make credentials for (`provider-<name>.nk`); repeat for more. Default:
    /// kv, http-server, http-client and messaging.
    #[arg(long = "provider", value_name = "NAME")]
    pub providers: Vec<ProviderName>,
}

/// What [`write`] wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Written {
    /// The server configuration.
    pub config: PathBuf,
    /// Who is who by public key, for `trellis controller --users`.
    pub users_file: PathBuf,
    /// The NATS account of the lattice.
    pub account: String,
    /// Each role's credentials.
    pub users: Vec<User>,
}

/// One user of the lattice's account.
#[derive(Debug, Clone, serde::Serialize)]
pub struct User {
    /// `controller`, `host-h1`, `provider-kv`, ….
    pub name: String,
    /// Its role.
    pub role: &'static str,
    /// The seed file to pass as `--creds`.
    pub creds: PathBuf,
    /// The nkey public key the server knows it by.
    pub public_key: String,
}

/// The server's system account in the written configuration.
pub const SYSTEM_ACCOUNT: &str = "SYS";
/// The user of the system account (`system.nk`), for `trellis controller --system-creds`.
pub const SYSTEM_USER: &str = "system";

/// The NATS account a lattice runs in.
pub fn account(lattice: &Lattice) -> String {
    format!("TRELLIS_{}", lattice.as_str().to_ascii_uppercase())
}

/// Every grant of a lattice with these hosts and providers.
pub fn grants(hosts: &[HostId], providers: &[ProviderName]) -> Vec<Grant> {
    let mut grants = vec![
        Grant::Controller,
        Grant::Operator,
        Grant::Viewer,
        Grant::App,
    ];
    grants.extend(hosts.iter().cloned().map(Grant::Host));
    grants.extend(providers.iter().cloned().map(Grant::Provider));
    grants.push(Grant::Admin);
    grants
}

/// Writes (or completes) the credentials directory `dir` of `lattice`, whose processes name the
/// JetStream domain `js_domain` (`--js-domain`), if any.
///
/// # Errors
///
/// Says which file could not be read or written, or which existing file is not a user seed.
pub fn write(
    dir: &Path,
    lattice: &Lattice,
    hosts: &[HostId],
    providers: &[ProviderName],
    js_domain: Option<&str>,
) -> Result<Written, String> {
    create_private_dir(dir)?;
    let mut users = Vec::new();
    let mut config = String::new();
    let account = account(lattice);
    let _ = writeln!(
        config,
        "# Trellis lattice `{lattice}`: one account, one user per role. Written by `trellis creds`;\n\
         # run `nats-server -js -c {}` (add `port`, `store_dir`, TLS as needed).",
        dir.join("nats.conf").display()
    );
    if let Some(domain) = js_domain {
        let _ = writeln!(
            config,
            "# The lattice's processes use JetStream domain `{domain}` ($JS.{domain}.API): the server\n\
             # that holds its streams needs `jetstream {{ domain: {domain} }}`."
        );
    }
    let _ = writeln!(
        config,
        "accounts {{\n  {account}: {{\n    jetstream: enabled\n    users: ["
    );
    for grant in grants(hosts, providers) {
        let name = grant.file_stem();
        let creds = dir.join(format!("{name}.nk"));
        let key = user_key(&creds)?;
        let public_key = key.public_key();
        let _ = writeln!(config, "      # {name}");
        let _ = writeln!(
            config,
            "      {{ nkey: {public_key}, permissions: {} }}",
            permissions_block(&permissions(
                &Scope {
                    lattice,
                    public_key: &public_key,
                    js_domain,
                },
                &grant
            ))
        );
        users.push(User {
            name,
            role: grant.role(),
            creds,
            public_key,
        });
    }
    // The server's system account, with one user: a controller given its key
    // (`--system-creds`) records the server's failed-login advisories in the audit stream.
    let system = dir.join(format!("{SYSTEM_USER}.nk"));
    let system_key = user_key(&system)?.public_key();
    let _ = writeln!(
        config,
        "    ]\n  }}\n  {SYSTEM_ACCOUNT}: {{\n    users: [\n      # {SYSTEM_USER}\n      {{ nkey: {system_key} }}\n    ]\n  }}\n}}\nsystem_account: {SYSTEM_ACCOUNT}"
    );
    users.push(User {
        name: SYSTEM_USER.to_owned(),
        role: SYSTEM_USER,
        creds: system,
        public_key: system_key,
    });
    let path = dir.join("nats.conf");
    std::fs::write(&path, config).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    // Who is who, for the controller's audit events (`trellis controller --users`).
    let known: std::collections::BTreeMap<&str, crate::controller::KnownUser> = users
        .iter()
        .map(|u| {
            (
                u.public_key.as_str(),
                crate::controller::KnownUser {
                    name: u.name.clone(),
                    role: u.role.to_owned(),
                },
            )
        })
        .collect();
    let users_file = dir.join("users.json");
    let text = serde_json::to_string_pretty(&known).map_err(|e| e.to_string())?;
    std::fs::write(&users_file, text)
        .map_err(|e| format!("cannot write {}: {e}", users_file.display()))?;
    Ok(Written {
        config: path,
        users_file,
        account,
        users,
    })
}

fn create_private_dir(dir: &Path) -> Result<(), String> {
    use std::os::unix::fs::DirBuilderExt as _;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| format!("cannot create {}: {e}", dir.display()))
}

/// The user key in `path`, made (and written, readable by its owner only) when missing.
fn user_key(path: &Path) -> Result<nkeys::KeyPair, String> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let key = nkeys::KeyPair::from_seed(text.trim()).map_err(|e| {
                format!(
                    "{}: not an nkey seed ({e}); remove it to make a new one",
                    path.display()
                )
            })?;
            if !key.public_key().starts_with('U') {
                return Err(format!("{}: not a user seed (SU…)", path.display()));
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = nkeys::KeyPair::new_user();
            let seed = key
                .seed()
                .map_err(|e| format!("cannot encode a seed: {e}"))?;
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
            file.write_all(format!("{seed}\n").as_bytes())
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            Ok(key)
        }
        Err(e) => Err(format!("cannot read {}: {e}", path.display())),
    }
}

/// `{ publish: { allow: […], deny: […] }, subscribe: { … } }` in the server's syntax.
fn permissions_block(p: &Permissions) -> String {
    format!(
        "{{ publish: {}, subscribe: {} }}",
        rules_block(&p.publish),
        rules_block(&p.subscribe)
    )
}

fn rules_block(r: &Rules) -> String {
    let list = |subjects: &[String]| {
        let quoted: Vec<String> = subjects.iter().map(|s| format!("{s:?}")).collect();
        format!("[{}]", quoted.join(", "))
    };
    if r.deny.is_empty() {
        format!("{{ allow: {} }}", list(&r.allow))
    } else {
        format!("{{ allow: {}, deny: {} }}", list(&r.allow), list(&r.deny))
    }
}

/// The providers named, or the defaults.
pub fn providers_or_default(named: Vec<ProviderName>) -> Vec<ProviderName> {
    if !named.is_empty() {
        return named;
    }
    DEFAULT_PROVIDERS
        .iter()
        .filter_map(|n| ProviderName::new(*n).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_kept_and_the_config_names_every_user() {
        let dir = tempfile::tempdir().unwrap();
        let l = Lattice::new("prod").unwrap();
        let hosts = [HostId::new("h1").unwrap()];
        let providers = providers_or_default(Vec::new());
        let first = write(dir.path(), &l, &hosts, &providers, None).unwrap();
        let again = write(dir.path(), &l, &hosts, &providers, None).unwrap();
        let keys = |w: &Written| {
            w.users
                .iter()
                .map(|u| u.public_key.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(keys(&first), keys(&again));
        let config = std::fs::read_to_string(&first.config).unwrap();
        assert!(config.contains("TRELLIS_PROD: {"), "{config}");
        for user in &first.users {
            assert!(config.contains(&user.public_key), "{}", user.name);
        }
        assert!(
            config.contains(&format!(
                "{:?}",
                trellis_schemas::subject::heartbeat(&l, &hosts[0])
            )),
            "a host's heartbeat subject: {config}"
        );
        let names: Vec<&str> = first.users.iter().map(|u| u.name.as_str()).collect();
        assert!(names.contains(&"host-h1") && names.contains(&"provider-messaging"));
        assert!(names.contains(&SYSTEM_USER));
        assert!(config.contains("system_account: SYS"), "{config}");
        // A second host later: the first keeps its key.
        let more = [HostId::new("h1").unwrap(), HostId::new("h2").unwrap()];
        let grown = write(dir.path(), &l, &more, &providers, None).unwrap();
        let h1 = |w: &Written| {
            w.users
                .iter()
                .find(|u| u.name == "host-h1")
                .unwrap()
                .public_key
                .clone()
        };
        assert_eq!(h1(&first), h1(&grown));
        // Something else where a seed should be: refused, not overwritten.
        std::fs::write(dir.path().join("viewer.nk"), "hello").unwrap();
        let err = write(dir.path(), &l, &hosts, &providers, None).unwrap_err();
        assert!(err.contains("viewer.nk: not an nkey seed"), "{err}");
    }
}
