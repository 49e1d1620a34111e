//! How an instance is isolated from its host: in the host's process (the wasm sandbox alone) or
//! inside a micro-VM of its own (the wasm sandbox inside a QEMU `microvm` guest), and how a host
//! runs micro-VMs.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Where an instance's guest code runs. Ordered by strength: a start request may ask for a
/// stronger isolation than the component's manifest, never a weaker one.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Isolation {
    /// In the host's process: the WebAssembly sandbox with the component's limits.
    #[default]
    Process,
    /// In a micro-VM of its own (a QEMU `microvm` guest that runs the same runtime), with the
    /// same limits inside and the VM's bounds around them: a wasmtime or Cranelift bug no longer
    /// reaches the host process.
    Microvm,
}

impl Isolation {
    /// Every mode, weakest first.
    pub const ALL: &[Isolation] = &[Isolation::Process, Isolation::Microvm];

    /// Its name in requests, manifests and facts.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Process => "process",
            Isolation::Microvm => "microvm",
        }
    }

    /// Whether it is the default, `process` (for `skip_serializing_if`).
    pub fn is_process(&self) -> bool {
        *self == Isolation::Process
    }

    /// The isolation an instance gets: what the manifest sets, strengthened by what the start
    /// asked for.
    ///
    /// # Errors
    ///
    /// A message for people when the request asks for weaker isolation than the manifest sets.
    pub fn resolve(manifest: Isolation, requested: Option<Isolation>) -> Result<Isolation, String> {
        match requested {
            None => Ok(manifest),
            Some(requested) if requested >= manifest => Ok(requested),
            Some(requested) => Err(format!(
                "isolation {requested} is weaker than the component's manifest sets ({manifest}); a start may only strengthen it"
            )),
        }
    }
}

impl fmt::Display for Isolation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Isolation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Isolation::ALL
            .iter()
            .copied()
            .find(|i| i.as_str() == s)
            .ok_or_else(|| format!("unknown isolation {s:?}: use process or microvm"))
    }
}

/// How a host runs micro-VMs: with hardware virtualisation (`kvm`) or QEMU's software emulation
/// (`tcg`, much slower, but it works where KVM does not, e.g. inside another VM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Acceleration {
    /// `/dev/kvm` with hardware virtualisation.
    Kvm,
    /// QEMU's tiny code generator: emulation, no hardware support needed.
    Tcg,
}

impl Acceleration {
    /// Its name, as QEMU's `-accel` takes it.
    pub fn as_str(self) -> &'static str {
        match self {
            Acceleration::Kvm => "kvm",
            Acceleration::Tcg => "tcg",
        }
    }
}

impl fmt::Display for Acceleration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_may_only_strengthen_isolation() {
        use Isolation::{Microvm, Process};
        assert_eq!(Isolation::resolve(Process, None), Ok(Process));
        assert_eq!(Isolation::resolve(Microvm, None), Ok(Microvm));
        assert_eq!(Isolation::resolve(Process, Some(Microvm)), Ok(Microvm));
        assert_eq!(Isolation::resolve(Microvm, Some(Microvm)), Ok(Microvm));
        let err = Isolation::resolve(Microvm, Some(Process)).expect_err("weaker");
        assert!(err.contains("weaker"), "{err}");
    }

    #[test]
    fn names_round_trip() {
        for i in Isolation::ALL {
            assert_eq!(i.as_str().parse::<Isolation>(), Ok(*i));
            assert_eq!(
                serde_json::to_value(i).expect("json"),
                serde_json::json!(i.as_str())
            );
        }
        assert!("vm".parse::<Isolation>().is_err());
    }
}
