//! `Component.toml`: a component's identity, its required limits and the capabilities it imports.
//!
//! ```toml
//! [component]
//! name = "counter"
//! version = "1.2.0"
//!
//! [limits]
//! max_memory = "64MiB"      # bytes: an integer, or a string with a KiB/MiB/GiB (or KB/MB/GB) unit
//! fuel = 50_000_000         # fuel per invocation
//! timeout = "500ms"         # wall clock per invocation: "ms", "s" or "m" suffix, or milliseconds
//! max_concurrency = 8       # invocations running at once
//!
//! [capabilities]
//! imports = ["wasi:keyvalue/store", "wasi:keyvalue/atomics"]  # imports beyond the WASI basics
//! requires = ["wasi:keyvalue"]  # must be assigned before an instance starts
//! ```
//!
//! Every limit is required: a manifest without one is rejected with a [`ManifestError`] naming the
//! field and its accepted range. Unknown keys are rejected too, so a typo never silently drops a limit.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::RangeInclusive;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Accepted range of `limits.max_memory`, in bytes (one wasm page up to the whole 32-bit space).
pub const MAX_MEMORY_RANGE: RangeInclusive<u64> = 64 * KIB..=4 * GIB;
/// Accepted range of `limits.fuel`.
pub const FUEL_RANGE: RangeInclusive<u64> = 1_000..=1_000_000_000_000;
/// Accepted range of `limits.timeout`.
pub const TIMEOUT_RANGE: RangeInclusive<Duration> =
    Duration::from_millis(1)..=Duration::from_secs(3600);
/// Accepted range of `limits.max_concurrency`.
pub const MAX_CONCURRENCY_RANGE: RangeInclusive<u32> = 1..=10_000;
/// Maximum length of `component.name`.
pub const MAX_NAME_LEN: usize = 64;

/// A parsed and validated `Component.toml`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The component's name: 1 to 64 characters among `a-z A-Z 0-9 - _ .`.
    pub name: String,
    /// The component's semantic version.
    pub version: semver::Version,
    /// Limits applied to every invocation.
    pub limits: Limits,
    /// WIT interfaces the component may import besides the WASI basics the host always links.
    pub capabilities: Capabilities,
    /// How its instances are isolated unless a start request asks for stronger
    /// (`[isolation] mode`; default `process`).
    pub isolation: crate::isolation::Isolation,
}

/// Resource limits applied to each invocation of a component. All are required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Maximum linear memory of one instance, in bytes (all memories of the instance count).
    pub max_memory: u64,
    /// Fuel available to one invocation (roughly one unit per wasm instruction).
    pub fuel: u64,
    /// Wall-clock time one invocation may take, instantiation included.
    pub timeout: Duration,
    /// Invocations of this component that may run at the same time.
    pub max_concurrency: u32,
}

/// The capabilities section of a manifest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// WIT interfaces (`namespace:package/interface`, version optional) the component may import.
    pub imports: Vec<String>,
    /// Capabilities that must be assigned before an instance may start
    /// (`wasi:keyvalue`, `wasi:http/incoming-handler`, …).
    pub requires: Vec<crate::capability::Capability>,
    /// Imported interfaces that must be linked to another component before an instance starts
    /// (entries of `requires` that name a declared import rather than a capability).
    pub links: Vec<crate::link::Interface>,
}

impl Capabilities {
    /// Whether `import` (as named by the component, possibly with `@version`) is declared.
    /// A declaration without a version matches every version of the interface.
    pub fn declares(&self, import: &str) -> bool {
        let unversioned = strip_version(import);
        self.imports
            .iter()
            .any(|declared| declared == import || declared == unversioned)
    }
}

/// WASI packages a host always links (granting nothing beyond clocks, random and captured
/// stdio): a component imports them without declaring them. Any other import must be declared in
/// `capabilities.imports`.
pub const WASI_BASICS: &[&str] = &[
    "wasi:cli/",
    "wasi:io/",
    "wasi:clocks/",
    "wasi:random/",
    "wasi:filesystem/",
    "wasi:sockets/",
];

/// Capability packages a host links for every component and serves through providers; a
/// component must still declare what it imports of them, and be assigned the capability.
pub const CAPABILITY_PACKAGES: &[&str] = &[
    "wasi:http/",
    "wasi:keyvalue/",
    "fermyon:spin/key-value",
    "wasi:logging/",
    "wasmcloud:messaging/",
    "wasmcloud:bus/",
];

/// Removes a trailing `@version` from an interface name.
pub fn strip_version(name: &str) -> &str {
    name.split_once('@').map_or(name, |(base, _)| base)
}

/// Why a manifest was rejected.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The text is not valid TOML, has an unknown key or a value of the wrong shape.
    #[error("Component.toml: {0}")]
    Syntax(#[from] toml::de::Error),
    /// A field is missing or holds a value outside its accepted range.
    #[error("{field}: {problem}, accepted range {accepted}")]
    Field {
        /// Dotted path of the field, e.g. `limits.max_memory`.
        field: &'static str,
        /// What is wrong with it: `required`, or the offending value.
        problem: String,
        /// The accepted values, e.g. `64KiB..=4GiB`.
        accepted: String,
    },
}

impl ManifestError {
    /// The dotted path of the field at fault, when the error is about one field.
    pub fn field(&self) -> Option<&'static str> {
        match self {
            Self::Field { field, .. } => Some(field),
            Self::Syntax(_) => None,
        }
    }

    fn required(field: &'static str, accepted: String) -> Self {
        Self::Field {
            field,
            problem: "required".to_string(),
            accepted,
        }
    }

    fn invalid(field: &'static str, problem: impl Into<String>, accepted: String) -> Self {
        Self::Field {
            field,
            problem: problem.into(),
            accepted,
        }
    }
}

impl FromStr for Manifest {
    type Err = ManifestError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::from_toml(text)
    }
}

impl Manifest {
    /// Parses and validates the text of a `Component.toml`.
    ///
    /// # Errors
    ///
    /// [`ManifestError::Syntax`] for malformed TOML or unknown keys, [`ManifestError::Field`] for a
    /// missing or out-of-range field (the error names it and the accepted range).
    pub fn from_toml(text: &str) -> Result<Self, ManifestError> {
        let raw: RawManifest = toml::from_str(text)?;
        raw.validate()
    }

    /// Builds a manifest in code, validating it like a parsed one.
    ///
    /// # Errors
    ///
    /// [`ManifestError::Field`] when the name, version or a limit is invalid.
    pub fn new(
        name: impl Into<String>,
        version: &str,
        limits: Limits,
    ) -> Result<Self, ManifestError> {
        let name = validate_name(name.into())?;
        let version = parse_version(version)?;
        validate_limits(&limits)?;
        Ok(Self {
            name,
            version,
            limits,
            capabilities: Capabilities::default(),
            isolation: crate::isolation::Isolation::default(),
        })
    }

    /// Sets how instances are isolated by default.
    pub fn with_isolation(mut self, isolation: crate::isolation::Isolation) -> Self {
        self.isolation = isolation;
        self
    }

    /// Adds declared capability imports.
    pub fn with_imports<I, S>(mut self, imports: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.capabilities
            .imports
            .extend(imports.into_iter().map(Into::into));
        self
    }

    /// Adds capabilities that must be assigned before an instance starts.
    pub fn with_requires(
        mut self,
        requires: impl IntoIterator<Item = crate::capability::Capability>,
    ) -> Self {
        self.capabilities.requires.extend(requires);
        self
    }

    /// Adds imported interfaces that must be linked before an instance starts.
    pub fn with_required_links(
        mut self,
        links: impl IntoIterator<Item = crate::link::Interface>,
    ) -> Self {
        self.capabilities.links.extend(links);
        self
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    component: Option<RawComponent>,
    limits: Option<RawLimits>,
    capabilities: Option<RawCapabilities>,
    isolation: Option<RawIsolation>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIsolation {
    mode: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawComponent {
    name: Option<String>,
    version: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_memory: Option<IntOrString>,
    fuel: Option<i64>,
    timeout: Option<IntOrString>,
    max_concurrency: Option<i64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapabilities {
    #[serde(default)]
    imports: Vec<String>,
    #[serde(default)]
    requires: Vec<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum IntOrString {
    Int(i64),
    Str(String),
}

impl fmt::Display for IntOrString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Int(n) => write!(f, "{n}"),
            Self::Str(s) => write!(f, "{s:?}"),
        }
    }
}

impl RawManifest {
    fn validate(self) -> Result<Manifest, ManifestError> {
        let component = self.component.ok_or_else(|| {
            ManifestError::required("component.name", "a [component] table".to_string())
        })?;
        let name = component
            .name
            .ok_or_else(|| ManifestError::required("component.name", name_accepted()))
            .and_then(validate_name)?;
        let version = component
            .version
            .ok_or_else(|| {
                ManifestError::required("component.version", "a semantic version".to_string())
            })
            .and_then(|v| parse_version(&v))?;
        let raw = self.limits.unwrap_or_default();

        let max_memory = required_limit(
            "limits.max_memory",
            raw.max_memory,
            memory_accepted,
            "is not a size",
            parse_bytes,
        )?;
        let fuel = required_limit(
            "limits.fuel",
            raw.fuel,
            fuel_accepted,
            "is out of range",
            |n| u64::try_from(*n).ok(),
        )?;
        let timeout = required_limit(
            "limits.timeout",
            raw.timeout,
            timeout_accepted,
            "is not a duration",
            parse_duration,
        )?;
        let max_concurrency = required_limit(
            "limits.max_concurrency",
            raw.max_concurrency,
            concurrency_accepted,
            "is out of range",
            |n| u32::try_from(*n).ok(),
        )?;
        let limits = Limits {
            max_memory,
            fuel,
            timeout,
            max_concurrency,
        };
        validate_limits(&limits)?;
        let (imports, requires) = self
            .capabilities
            .map(|c| (c.imports, c.requires))
            .unwrap_or_default();
        let mut capabilities = Vec::new();
        let mut links = Vec::new();
        for r in &requires {
            match r.parse::<crate::capability::Capability>() {
                Ok(capability) => capabilities.push(capability),
                Err(problem) => {
                    // An interface the component declares it imports: a link is required.
                    let declared = Capabilities {
                        imports: imports.clone(),
                        ..Capabilities::default()
                    };
                    match crate::link::Interface::new(r.as_str()) {
                        Ok(interface) if declared.declares(r) => links.push(interface),
                        _ => {
                            return Err(ManifestError::invalid(
                                "capabilities.requires",
                                problem,
                                "capability names: wasi:keyvalue, wasi:http/incoming-handler, wasi:http/outgoing-handler, wasmcloud:messaging; or an interface listed in capabilities.imports, to require a link"
                                    .to_string(),
                            ));
                        }
                    }
                }
            }
        }
        let requires = capabilities;
        for import in &imports {
            if !is_interface_name(import) {
                return Err(ManifestError::invalid(
                    "capabilities.imports",
                    format!("{import:?} is not an interface name"),
                    "names like \"wasi:keyvalue/store\" or \"wasi:keyvalue/store@0.2.0\""
                        .to_string(),
                ));
            }
        }
        let isolation = match self.isolation.and_then(|i| i.mode) {
            None => crate::isolation::Isolation::default(),
            Some(mode) => mode.parse().map_err(|problem: String| {
                ManifestError::invalid(
                    "isolation.mode",
                    problem,
                    "\"process\" (the default) or \"microvm\"".to_string(),
                )
            })?,
        };
        Ok(Manifest {
            name,
            version,
            limits,
            capabilities: Capabilities {
                imports,
                requires,
                links,
            },
            isolation,
        })
    }
}

fn validate_limits(limits: &Limits) -> Result<(), ManifestError> {
    if !MAX_MEMORY_RANGE.contains(&limits.max_memory) {
        return Err(ManifestError::invalid(
            "limits.max_memory",
            format!("{} is out of range", format_bytes(limits.max_memory)),
            memory_accepted(),
        ));
    }
    if !FUEL_RANGE.contains(&limits.fuel) {
        return Err(ManifestError::invalid(
            "limits.fuel",
            format!("{} is out of range", limits.fuel),
            fuel_accepted(),
        ));
    }
    if !TIMEOUT_RANGE.contains(&limits.timeout) {
        return Err(ManifestError::invalid(
            "limits.timeout",
            format!("{:?} is out of range", limits.timeout),
            timeout_accepted(),
        ));
    }
    if !MAX_CONCURRENCY_RANGE.contains(&limits.max_concurrency) {
        return Err(ManifestError::invalid(
            "limits.max_concurrency",
            format!("{} is out of range", limits.max_concurrency),
            concurrency_accepted(),
        ));
    }
    Ok(())
}

fn validate_name(name: String) -> Result<String, ManifestError> {
    // The name is a token of data-plane subjects, so it follows the `ComponentName` rules.
    if crate::ComponentName::new(name.as_str()).is_ok() {
        Ok(name)
    } else {
        Err(ManifestError::invalid(
            "component.name",
            format!("{name:?} is not a valid name"),
            name_accepted(),
        ))
    }
}

fn parse_version(version: &str) -> Result<semver::Version, ManifestError> {
    semver::Version::parse(version).map_err(|e| {
        ManifestError::invalid(
            "component.version",
            format!("{version:?} is not a semantic version ({e})"),
            "a semantic version such as \"1.2.0\"".to_string(),
        )
    })
}

fn is_interface_name(name: &str) -> bool {
    let base = strip_version(name);
    match base.split_once(':') {
        Some((namespace, rest)) => {
            !namespace.is_empty()
                && rest
                    .split_once('/')
                    .is_some_and(|(package, iface)| !package.is_empty() && !iface.is_empty())
        }
        None => false,
    }
}

/// Reads a required limit: a missing one is `required`, one that `parse` rejects is `<value>
/// <problem>`, each with what `accepted` says is accepted.
fn required_limit<V: fmt::Display, T>(
    field: &'static str,
    value: Option<V>,
    accepted: fn() -> String,
    problem: &str,
    parse: impl FnOnce(&V) -> Option<T>,
) -> Result<T, ManifestError> {
    let value = value.ok_or_else(|| ManifestError::required(field, accepted()))?;
    parse(&value)
        .ok_or_else(|| ManifestError::invalid(field, format!("{value} {problem}"), accepted()))
}

fn name_accepted() -> String {
    format!("1..={MAX_NAME_LEN} characters among a-z A-Z 0-9 - _, starting with a letter or digit")
}

fn memory_accepted() -> String {
    format!(
        "{}..={}",
        format_bytes(*MAX_MEMORY_RANGE.start()),
        format_bytes(*MAX_MEMORY_RANGE.end())
    )
}

fn fuel_accepted() -> String {
    format!("{}..={}", FUEL_RANGE.start(), FUEL_RANGE.end())
}

fn timeout_accepted() -> String {
    format!(
        "{}ms..={}s",
        TIMEOUT_RANGE.start().as_millis(),
        TIMEOUT_RANGE.end().as_secs()
    )
}

fn concurrency_accepted() -> String {
    format!(
        "{}..={}",
        MAX_CONCURRENCY_RANGE.start(),
        MAX_CONCURRENCY_RANGE.end()
    )
}

/// Formats a byte count with the largest binary unit that divides it exactly.
/// Formats a byte count with the largest binary unit that divides it (`64MiB`).
pub fn format_bytes(bytes: u64) -> String {
    for (unit, size) in [("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
        if bytes >= size && bytes.is_multiple_of(size) {
            return format!("{}{unit}", bytes / size);
        }
    }
    format!("{bytes}B")
}

fn parse_bytes(value: &IntOrString) -> Option<u64> {
    match value {
        IntOrString::Int(n) => u64::try_from(*n).ok(),
        IntOrString::Str(s) => parse_byte_str(s),
    }
}

/// Settings given as `key=value` arguments (labels, a provider's configuration), as a map. A key
/// given twice with two values is refused rather than settled silently by the order of the
/// arguments; given twice with one value, it is one setting. `what` names a setting in the error
/// (`"the label"`).
///
/// # Errors
///
/// Names the key and both of its values.
pub fn key_values(
    what: &str,
    pairs: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>, String> {
    let mut map = BTreeMap::new();
    for (k, v) in pairs {
        insert_once(what, &mut map, k, v)?;
    }
    Ok(map)
}

/// Sets `map[k]` to `v`, as [`key_values`] does: refused when `k` already has another value.
///
/// # Errors
///
/// Names the key and both of its values.
pub fn insert_once(
    what: &str,
    map: &mut BTreeMap<String, String>,
    k: String,
    v: String,
) -> Result<(), String> {
    match map.get(&k) {
        Some(old) if *old != v => Err(format!(
            "{what} `{k}` is given twice, as `{old}` and as `{v}`; give it once"
        )),
        _ => {
            map.insert(k, v);
            Ok(())
        }
    }
}

/// Parses a size for a command line: `"64MiB"`, `"512 KiB"`, `"1GB"`, `"65536"`.
///
/// # Errors
///
/// Says what a size looks like.
pub fn parse_size(text: &str) -> Result<u64, String> {
    parse_byte_str(text).ok_or_else(|| {
        format!("{text:?} is not a size such as 512MiB (units B, KiB, MiB, GiB, KB, MB, GB)")
    })
}

/// Parses `"64MiB"`, `"512 KiB"`, `"1GB"`, `"65536"` or `"65536B"`.
fn parse_byte_str(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '_')
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let number: u64 = digits.replace('_', "").parse().ok()?;
    let multiplier = match unit.trim() {
        "" | "B" => 1,
        "KiB" => KIB,
        "MiB" => MIB,
        "GiB" => GIB,
        "KB" | "kB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    number.checked_mul(multiplier)
}

fn parse_duration(value: &IntOrString) -> Option<Duration> {
    match value {
        IntOrString::Int(n) => u64::try_from(*n).ok().map(Duration::from_millis),
        IntOrString::Str(s) => parse_duration_str(s),
    }
}

/// Parses `"500ms"`, `"2s"`, `"1.5s"`, `"1m"` or a number of milliseconds.
fn parse_duration_str(text: &str) -> Option<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.' && c != '_')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number.replace('_', "").parse().ok()?;
    if !number.is_finite() || number < 0.0 {
        return None;
    }
    let seconds = match unit.trim() {
        "" | "ms" => number / 1_000.0,
        "s" => number,
        "m" | "min" => number * 60.0,
        _ => return None,
    };
    Duration::try_from_secs_f64(seconds).ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    const FULL: &str = r#"
        [component]
        name = "counter"
        version = "1.2.0"

        [limits]
        max_memory = "64MiB"
        fuel = 50_000_000
        timeout = "500ms"
        max_concurrency = 8

        [capabilities]
        imports = ["wasi:keyvalue/store", "wasi:logging/logging@0.1.0-draft"]
    "#;

    fn with_limits(limits: &str) -> String {
        format!("[component]\nname = \"c\"\nversion = \"0.1.0\"\n[limits]\n{limits}\n")
    }

    fn field_error(text: &str) -> (String, String) {
        match Manifest::from_toml(text).unwrap_err() {
            err @ ManifestError::Field { field, .. } => (field.to_string(), err.to_string()),
            other => panic!("expected a field error, got {other}"),
        }
    }

    #[test]
    fn parses_a_full_manifest() {
        let m: Manifest = FULL.parse().unwrap();
        assert_eq!(m.name, "counter");
        assert_eq!(m.version, semver::Version::new(1, 2, 0));
        assert_eq!(m.limits.max_memory, 64 * MIB);
        assert_eq!(m.limits.fuel, 50_000_000);
        assert_eq!(m.limits.timeout, Duration::from_millis(500));
        assert_eq!(m.limits.max_concurrency, 8);
        assert!(m.capabilities.declares("wasi:keyvalue/store@0.2.0-draft"));
        assert!(m.capabilities.declares("wasi:logging/logging@0.1.0-draft"));
        assert!(!m.capabilities.declares("wasi:logging/logging@0.2.0"));
        assert!(!m.capabilities.declares("wasi:http/outgoing-handler"));
    }

    #[test]
    fn accepts_integers_and_units() {
        let m = Manifest::from_toml(&with_limits(
            "max_memory = 1048576\nfuel = 1000\ntimeout = 2000\nmax_concurrency = 1",
        ))
        .unwrap();
        assert_eq!(m.limits.max_memory, MIB);
        assert_eq!(m.limits.timeout, Duration::from_secs(2));
        for (text, bytes) in [
            ("\"64KiB\"", 64 * KIB),
            ("\"4GiB\"", 4 * GIB),
            ("\"100 MB\"", 100_000_000),
            ("\"65536B\"", 65536),
        ] {
            let m = Manifest::from_toml(&with_limits(&format!(
                "max_memory = {text}\nfuel = 1000\ntimeout = \"2s\"\nmax_concurrency = 1"
            )))
            .unwrap();
            assert_eq!(m.limits.max_memory, bytes, "{text}");
        }
        for (text, duration) in [
            ("\"1.5s\"", Duration::from_millis(1500)),
            ("\"1m\"", Duration::from_secs(60)),
            ("\"250ms\"", Duration::from_millis(250)),
        ] {
            let m = Manifest::from_toml(&with_limits(&format!(
                "max_memory = \"1MiB\"\nfuel = 1000\ntimeout = {text}\nmax_concurrency = 1"
            )))
            .unwrap();
            assert_eq!(m.limits.timeout, duration, "{text}");
        }
    }

    #[test]
    fn every_limit_is_required() {
        let all = [
            ("max_memory", "max_memory = \"1MiB\""),
            ("fuel", "fuel = 1000"),
            ("timeout", "timeout = \"1s\""),
            ("max_concurrency", "max_concurrency = 1"),
        ];
        for (missing, _) in all {
            let limits: Vec<&str> = all
                .iter()
                .filter(|(name, _)| *name != missing)
                .map(|(_, line)| *line)
                .collect();
            let (field, message) = field_error(&with_limits(&limits.join("\n")));
            assert_eq!(field, format!("limits.{missing}"));
            assert!(message.contains("required"), "{message}");
            assert!(message.contains("accepted range"), "{message}");
        }
        let (field, message) = field_error("[component]\nname = \"c\"\nversion = \"0.1.0\"\n");
        assert_eq!(field, "limits.max_memory");
        assert_eq!(
            message,
            "limits.max_memory: required, accepted range 64KiB..=4GiB"
        );
    }

    #[test]
    fn out_of_range_limits_name_the_field_and_range() {
        let cases = [
            (
                "max_memory = \"1KiB\"\nfuel = 1000\ntimeout = \"1s\"\nmax_concurrency = 1",
                "limits.max_memory",
                "64KiB..=4GiB",
            ),
            (
                "max_memory = \"5GiB\"\nfuel = 1000\ntimeout = \"1s\"\nmax_concurrency = 1",
                "limits.max_memory",
                "64KiB..=4GiB",
            ),
            (
                "max_memory = \"64 parsecs\"\nfuel = 1000\ntimeout = \"1s\"\nmax_concurrency = 1",
                "limits.max_memory",
                "64KiB..=4GiB",
            ),
            (
                "max_memory = \"1MiB\"\nfuel = 1\ntimeout = \"1s\"\nmax_concurrency = 1",
                "limits.fuel",
                "1000..=",
            ),
            (
                "max_memory = \"1MiB\"\nfuel = -5\ntimeout = \"1s\"\nmax_concurrency = 1",
                "limits.fuel",
                "1000..=",
            ),
            (
                "max_memory = \"1MiB\"\nfuel = 1000\ntimeout = \"2h\"\nmax_concurrency = 1",
                "limits.timeout",
                "1ms..=3600s",
            ),
            (
                "max_memory = \"1MiB\"\nfuel = 1000\ntimeout = \"0s\"\nmax_concurrency = 1",
                "limits.timeout",
                "1ms..=3600s",
            ),
            (
                "max_memory = \"1MiB\"\nfuel = 1000\ntimeout = \"1s\"\nmax_concurrency = 0",
                "limits.max_concurrency",
                "1..=10000",
            ),
        ];
        for (limits, expected_field, range) in cases {
            let (field, message) = field_error(&with_limits(limits));
            assert_eq!(field, expected_field, "{limits}");
            assert!(message.contains(range), "{message}");
        }
    }

    #[test]
    fn rejects_unknown_keys_and_bad_identity() {
        let err = Manifest::from_toml(&format!("{FULL}\n[extra]\nx = 1\n")).unwrap_err();
        assert!(matches!(err, ManifestError::Syntax(_)), "{err}");
        let typo = FULL.replace("max_concurrency", "max_concurency");
        assert!(matches!(
            Manifest::from_toml(&typo).unwrap_err(),
            ManifestError::Syntax(_)
        ));
        let (field, _) = field_error(&FULL.replace("\"1.2.0\"", "\"1.2\""));
        assert_eq!(field, "component.version");
        let (field, _) = field_error(&FULL.replace("\"counter\"", "\"has space\""));
        assert_eq!(field, "component.name");
        let (field, _) = field_error(&FULL.replace("wasi:keyvalue/store", "keyvalue"));
        assert_eq!(field, "capabilities.imports");
    }

    #[test]
    fn builds_in_code_with_the_same_checks() {
        let limits = Limits {
            max_memory: MIB,
            fuel: 10_000,
            timeout: Duration::from_secs(1),
            max_concurrency: 2,
        };
        let m = Manifest::new("echo", "0.1.0", limits)
            .unwrap()
            .with_imports(["wasi:keyvalue/store"]);
        assert!(m.capabilities.declares("wasi:keyvalue/store"));
        let err = Manifest::new("echo", "0.1.0", Limits { fuel: 0, ..limits }).unwrap_err();
        assert_eq!(err.field(), Some("limits.fuel"));
    }
}
