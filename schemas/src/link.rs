//! Links: a component's own import (`example:pipeline/transform`) served by another component.
//!
//! A link is a fact like an assignment: `link.added` names who may call (every instance of a
//! component, or one instance), the interface it imports, and the component that serves it
//! (optionally only its versions matching a semver requirement). Hosts follow link facts and
//! route each call of a linked import to an instance of the target: in process when one runs on
//! the same host, over the data plane otherwise. Without a link the import fails inside the
//! guest, and the call never leaves the host.

use std::fmt;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::capability::AssignmentTarget;
use crate::names::{ComponentName, LinkId};

/// The longest interface name accepted, in bytes.
pub const MAX_INTERFACE_LEN: usize = 256;

/// A WIT interface a link serves: `namespace:package/interface`, without a version (a link
/// serves every version the caller imports; the target's export must type-check against it).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Interface(String);

impl Interface {
    /// Parses `namespace:package/interface[@version]`; the version is dropped.
    pub fn new(value: impl Into<String>) -> Result<Self, String> {
        let value = value.into();
        let base = crate::manifest::strip_version(&value);
        let valid = base.len() <= MAX_INTERFACE_LEN
            && base.split_once(':').is_some_and(|(ns, rest)| {
                rest.split_once('/').is_some_and(|(package, iface)| {
                    [ns, package, iface].iter().all(|part| wit_name(part))
                })
            });
        if valid {
            Ok(Self(base.to_owned()))
        } else {
            Err(format!(
                "invalid interface {:?}: expected namespace:package/interface (WIT names: lowercase words joined by '-'), e.g. example:pipeline/transform",
                value.chars().take(80).collect::<String>()
            ))
        }
    }

    /// The interface name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `import` (a component's import or export name, maybe with `@version`) is this
    /// interface.
    pub fn names(&self, import: &str) -> bool {
        crate::manifest::strip_version(import) == self.0
    }
}

/// A WIT identifier: words of lowercase letters and digits (a word starts with a letter)
/// joined by `-`.
fn wit_name(part: &str) -> bool {
    !part.is_empty()
        && part.split('-').all(|word| {
            word.as_bytes().first().is_some_and(u8::is_ascii_lowercase)
                && word
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

impl fmt::Display for Interface {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Interface {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl TryFrom<String> for Interface {
    type Error = String;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<Interface> for String {
    fn from(value: Interface) -> Self {
        value.0
    }
}

impl JsonSchema for Interface {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Interface".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "maxLength": MAX_INTERFACE_LEN,
            "pattern": "^[a-z][a-z0-9-]*:[a-z][a-z0-9-]*/[a-z][a-z0-9-]*(@.+)?$",
            "description": "A WIT interface, namespace:package/interface (a version is ignored)."
        })
    }
}

/// A link in force: `source`'s import of `interface` is served by `target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Link {
    /// The link.
    pub link_id: LinkId,
    /// Who may call: every instance of a component, or one instance.
    pub source: AssignmentTarget,
    /// The interface the source imports.
    pub interface: Interface,
    /// The component that serves it.
    pub target: ComponentName,
    /// Only the target's versions matching this semver requirement serve it (any when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

impl Link {
    /// Whether the target's version `version` may serve this link.
    pub fn accepts_version(&self, version: &str) -> bool {
        self.version.is_none() || semver::Version::parse(version).is_ok_and(|v| self.accepts(&v))
    }

    /// Whether the target's (parsed) version `version` may serve this link; without a
    /// requirement every version does, and nothing is parsed.
    pub fn accepts(&self, version: &semver::Version) -> bool {
        self.version
            .as_deref()
            .is_none_or(|req| semver::VersionReq::parse(req).is_ok_and(|r| r.matches(version)))
    }
}

/// `link.removed`: a link was withdrawn; calls through it are refused from then on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkRemoved {
    /// The link.
    pub link_id: LinkId,
    /// Why (`requested`).
    pub reason: String,
}

/// A link in force, as the projection keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkRecord {
    /// The link.
    pub link: Link,
    /// When it was added.
    pub added_at: DateTime<Utc>,
    /// Stream sequence of its `link.added` fact.
    pub added_seq: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interfaces_are_wit_names_without_version() {
        let i = Interface::new("example:pipeline/transform@0.1.0").unwrap();
        assert_eq!(i.as_str(), "example:pipeline/transform");
        assert!(i.names("example:pipeline/transform@0.2.0"));
        assert!(i.names("example:pipeline/transform"));
        assert!(!i.names("example:pipeline/transformer"));
        for bad in [
            "",
            "transform",
            "example:pipeline",
            "Example:pipeline/transform",
            "example:pipe line/transform",
            "example:pipeline/transform#run",
            "example:pipeline/-x",
            "trellis.x:y/z",
        ] {
            assert!(Interface::new(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn version_requirements_select_target_versions() {
        let mut link = Link {
            link_id: LinkId::new("l1").unwrap(),
            source: AssignmentTarget::Component(ComponentName::new("a").unwrap()),
            interface: Interface::new("example:pipeline/transform").unwrap(),
            target: ComponentName::new("b").unwrap(),
            version: None,
        };
        assert!(link.accepts_version("0.1.0"));
        link.version = Some("^1.2".into());
        assert!(link.accepts_version("1.4.0"));
        assert!(!link.accepts_version("2.0.0"));
        assert!(!link.accepts_version("not a version"));
    }
}
