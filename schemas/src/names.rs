//! Validated names that appear in subjects: lattices and hosts.
//!
//! Every token that ends up in a NATS subject goes through one of these newtypes, so a subject can
//! never contain a stray `.`, `*`, `>` or whitespace.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Serialize};

/// A name was rejected because it cannot be used as a subject token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {kind} {value:?}: {rule}")]
pub struct InvalidName {
    /// What was being named (`lattice`, `host id`).
    pub kind: &'static str,
    /// The rejected value (truncated to 80 characters).
    pub value: String,
    /// The rule the value breaks.
    pub rule: &'static str,
}

macro_rules! name_type {
    (
        $(#[$meta:meta])*
        $name:ident, kind = $kind:literal, max = $max:literal, lowercase = $lower:literal,
        pattern = $pattern:literal, rule = $rule:literal
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The longest accepted name, in bytes.
            pub const MAX_LEN: usize = $max;

            /// Validates `value` and wraps it.
            pub fn new(value: impl Into<String>) -> Result<Self, InvalidName> {
                let value = value.into();
                if valid_token(&value, $max, $lower) {
                    Ok(Self(value))
                } else {
                    Err(InvalidName {
                        kind: $kind,
                        value: value.chars().take(80).collect(),
                        rule: $rule,
                    })
                }
            }

            /// The name as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = InvalidName;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidName;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> String {
                value.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl JsonSchema for $name {
            fn schema_name() -> Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut SchemaGenerator) -> Schema {
                json_schema!({
                    "type": "string",
                    "description": $rule,
                    "pattern": $pattern,
                    "maxLength": $max,
                })
            }
        }
    };
}

name_type!(
    /// The name of a lattice. Several lattices can share one NATS deployment; each has its own
    /// subjects and streams. Lowercase so that the derived stream names cannot collide.
    Lattice, kind = "lattice", max = 64, lowercase = true,
    pattern = "^[a-z0-9][a-z0-9_-]{0,63}$",
    rule = "1 to 64 characters of a-z, 0-9, '_' or '-', starting with a letter or digit"
);

name_type!(
    /// The identity of a host (one `trellis-host` process). Defaults to a generated ULID.
    HostId, kind = "host id", max = 128, lowercase = false,
    pattern = "^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$",
    rule = "1 to 128 characters of A-Z, a-z, 0-9, '_' or '-', starting with a letter or digit"
);

impl Lattice {
    /// The lattice used when none is named.
    pub fn default_name() -> Self {
        Self("default".to_owned())
    }
}

impl Default for Lattice {
    fn default() -> Self {
        Self::default_name()
    }
}

impl HostId {
    /// A fresh, unique host id.
    pub fn generate() -> Self {
        Self(ulid::Ulid::generate().to_string())
    }
}

fn valid_token(value: &str, max: usize, lowercase: bool) -> bool {
    let bytes = value.as_bytes();
    if bytes.is_empty() || bytes.len() > max || !bytes[0].is_ascii_alphanumeric() {
        return false;
    }
    bytes.iter().all(|&b| {
        let alnum = if lowercase {
            b.is_ascii_lowercase() || b.is_ascii_digit()
        } else {
            b.is_ascii_alphanumeric()
        };
        alnum || b == b'_' || b == b'-'
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lattice_accepts_subject_safe_names_only() {
        assert!(Lattice::new("default").is_ok());
        assert!(Lattice::new("prod-eu_1").is_ok());
        for bad in ["", "Prod", "a.b", "a*", ">", "a b", "-x", "_x", "é"] {
            assert!(Lattice::new(bad).is_err(), "{bad:?} must be rejected");
        }
        assert!(Lattice::new("a".repeat(64)).is_ok());
        assert!(Lattice::new("a".repeat(65)).is_err());
    }

    #[test]
    fn host_id_rejects_subject_syntax() {
        assert!(HostId::new("host-A_1").is_ok());
        assert!(HostId::new(HostId::generate().as_str()).is_ok());
        for bad in ["", "a.b", "a*b", "a>b", "a\tb", "a\nb"] {
            let err = HostId::new(bad).expect_err("rejected");
            assert_eq!(err.kind, "host id");
        }
    }

    #[test]
    fn serde_validates() {
        let ok: HostId = serde_json::from_str("\"h1\"").expect("valid");
        assert_eq!(ok.as_str(), "h1");
        assert!(serde_json::from_str::<HostId>("\"h.1\"").is_err());
    }
}
