//! What a component imports and exports, read from its binary without compiling it.

use trellis_schemas::Capability;
use trellis_schemas::manifest::{WASI_BASICS, strip_version};

/// The names a component imports and exports at its top level (interfaces with their version,
/// and functions).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Surface {
    /// Imported names, sorted.
    pub imports: Vec<String>,
    /// Exported names, sorted.
    pub exports: Vec<String>,
}

impl Surface {
    /// Reads `bytes`; `None` when they are not a component that parses.
    pub fn of(bytes: &[u8]) -> Option<Self> {
        use wasmparser::{Encoding, Parser, Payload};
        let mut surface = Surface::default();
        // Nested modules and components have imports and exports of their own: only depth 0.
        let mut depth = 0usize;
        for payload in Parser::new(0).parse_all(bytes) {
            match payload.ok()? {
                Payload::Version { encoding, .. }
                    if depth == 0 && encoding != Encoding::Component =>
                {
                    return None;
                }
                Payload::ModuleSection { .. } | Payload::ComponentSection { .. } => depth += 1,
                Payload::End(_) => depth = depth.saturating_sub(1),
                Payload::ComponentImportSection(reader) if depth == 0 => {
                    for import in reader {
                        surface.imports.push(import.ok()?.name.name.to_owned());
                    }
                }
                Payload::ComponentExportSection(reader) if depth == 0 => {
                    for export in reader {
                        surface.exports.push(export.ok()?.name.name.to_owned());
                    }
                }
                _ => {}
            }
        }
        for list in [&mut surface.imports, &mut surface.exports] {
            list.sort();
            list.dedup();
        }
        Some(surface)
    }

    /// The imports a manifest must declare (everything but the WASI basics), without versions.
    pub fn declared_imports(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .imports
            .iter()
            .filter(|i| i.contains(':') && !WASI_BASICS.iter().any(|b| i.starts_with(b)))
            .map(|i| strip_version(i).to_owned())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The capabilities the component cannot work without: those it imports, and serving HTTP
    /// when it exports the incoming handler.
    pub fn capabilities(&self) -> Vec<Capability> {
        let mut out = Vec::new();
        let imports = |prefix: &str| self.imports.iter().any(|i| i.starts_with(prefix));
        if self
            .exports
            .iter()
            .any(|e| e.starts_with("wasi:http/incoming-handler"))
        {
            out.push(Capability::HttpIncoming);
        }
        if imports("wasi:http/outgoing-handler") {
            out.push(Capability::HttpOutgoing);
        }
        if imports("wasi:keyvalue/") {
            out.push(Capability::KeyValue);
        }
        if imports("wasmcloud:messaging/")
            || self
                .exports
                .iter()
                .any(|e| e.starts_with("wasmcloud:messaging/handler"))
        {
            out.push(Capability::Messaging);
        }
        out
    }
}

/// A `Component.toml` for a component with `surface`, of `size` bytes, named `name`: its
/// imports declared, the capabilities it needs required, and limits to adjust.
pub fn manifest_for(surface: &Surface, name: &str, version: &str, size: usize) -> String {
    use std::fmt::Write as _;
    let list = |items: &[String]| {
        items
            .iter()
            .map(|i| format!("{i:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let imports = surface.declared_imports();
    let requires: Vec<String> = surface
        .capabilities()
        .iter()
        .map(|c| c.as_str().to_owned())
        .collect();
    let linked: Vec<&String> = imports
        .iter()
        .filter(|i| {
            !trellis_schemas::manifest::CAPABILITY_PACKAGES
                .iter()
                .any(|p| i.starts_with(p))
        })
        .collect();
    // An interpreter in the component (Python, JavaScript) needs room beyond its binary.
    let mib = (size as u64 * 4).div_ceil(1 << 20).max(64);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Written by `trellis component init` from what the component imports and exports."
    );
    let _ = writeln!(out, "[component]\nname = {name:?}\nversion = {version:?}\n");
    let _ = writeln!(
        out,
        "# Every limit is required. These are starting points: measure with `trellis instance get`\n# (fuel used, memory high water) and adjust."
    );
    let _ = writeln!(out, "[limits]");
    let _ = writeln!(
        out,
        "max_memory = \"{mib}MiB\"   # linear memory per instance"
    );
    let _ = writeln!(out, "fuel = 1_000_000_000   # per invocation");
    let _ = writeln!(out, "timeout = \"5s\"         # wall clock per invocation");
    let _ = writeln!(out, "max_concurrency = 32   # invocations at once\n");
    let _ = writeln!(out, "[capabilities]");
    let _ = writeln!(out, "imports = [{}]", list(&imports));
    let _ = writeln!(
        out,
        "# Capabilities to assign before an instance starts (`trellis assignment grant`)."
    );
    let _ = writeln!(out, "requires = [{}]", list(&requires));
    for interface in linked {
        let _ = writeln!(
            out,
            "# {interface} is served by another component through a link:\n#   trellis link add component:{name} {interface} <target>"
        );
    }
    if !surface.exports.is_empty() {
        let _ = writeln!(out, "# Exports: {}", surface.exports.join(", "));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn surface(imports: &[&str], exports: &[&str]) -> Surface {
        Surface {
            imports: imports.iter().map(|s| (*s).to_owned()).collect(),
            exports: exports.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn a_manifest_declares_what_the_component_needs_and_validates() {
        let s = surface(
            &[
                "wasi:cli/environment@0.2.6",
                "wasi:http/types@0.2.6",
                "wasi:keyvalue/atomics@0.2.0-draft",
                "wasi:keyvalue/store@0.2.0-draft",
                "example:pipeline/transform@0.1.0",
            ],
            &["wasi:http/incoming-handler@0.2.6"],
        );
        let text = manifest_for(&s, "app", "0.1.0", 3 << 20);
        let manifest = trellis_schemas::Manifest::from_toml(&text).unwrap();
        assert_eq!(
            manifest.capabilities.imports,
            [
                "example:pipeline/transform",
                "wasi:http/types",
                "wasi:keyvalue/atomics",
                "wasi:keyvalue/store",
            ]
        );
        assert_eq!(
            manifest.capabilities.requires,
            [Capability::HttpIncoming, Capability::KeyValue]
        );
        assert_eq!(manifest.limits.max_memory, 64 << 20);
        assert!(
            text.contains("trellis link add component:app example:pipeline/transform <target>")
        );
        // A large component gets room for what it unpacks.
        let big = manifest_for(&s, "py", "1.0.0", 40 << 20);
        assert!(big.contains("max_memory = \"160MiB\""), "{big}");
    }
}
