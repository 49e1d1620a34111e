//! Builds the guest components in `tests/components` and finds their `.wasm` files.
//!
//! # How it works
//!
//! The guests are a cargo workspace of their own (`tests/components/Cargo.toml`, excluded from the
//! main workspace), one `cdylib` crate per component, built for `wasm32-wasip2` with wit-bindgen.
//! The capability guests (`kv_probe`, `http_fetch`, `messenger`) build against the repository's
//! `wit/` plus `tests/components/wit-capabilities/`; `http_upstream` uses only the upstream `wasi`
//! crate, to prove portability.
//! [`build`] runs, once per process,
//!
//! ```text
//! cargo build --release --target wasm32-wasip2 --manifest-path tests/components/Cargo.toml
//! ```
//!
//! with `CARGO_TARGET_DIR=<outer target dir>/wasm-components`: a target directory of its own, so
//! the nested cargo never waits on the lock of the cargo that runs the tests. Cargo's incremental
//! build makes this a no-op (well under a second) when no guest changed. The outer target dir is
//! found from the test executable's path (`<target>/<profile>/deps/<exe>`);
//! `TRELLIS_WASM_TARGET_DIR` overrides the guests' target dir.
//!
//! Prerequisite: `rustup target add wasm32-wasip2`.

#![allow(
    clippy::expect_used,
    reason = "shared by tests, benches and examples; a failed build must stop them"
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// A `Component.toml` for the `kv_probe` guest (built as `kv-probe`): key-value and logging
/// imports, `wasi:keyvalue` required, limits generous enough for thousands of round trips in
/// one invocation.
pub const KV_PROBE_MANIFEST: &str = r#"
[component]
name = "kv-probe"
version = "0.1.0"

[limits]
max_memory = "16MiB"
fuel = 10_000_000_000
timeout = "60s"
max_concurrency = 64

[capabilities]
imports = ["wasi:keyvalue/store", "wasi:keyvalue/atomics", "wasi:keyvalue/batch", "wasi:logging/logging"]
requires = ["wasi:keyvalue"]
"#;

/// The names of the guest components (`tests/components/<name>`).
pub const NAMES: &[&str] = &[
    "counter",
    "http_faults",
    "http_fetch",
    "http_upstream",
    "huge_output",
    "kv_probe",
    "loop",
    "membomb",
    "messenger",
    "panic",
    "pipe_front",
    "pipe_middle",
    "pipe_odd",
    "pipe_stage",
    "probe",
    "recursion",
    "spin_counter",
    "trap",
    "typed",
    "wasmcloud_counter",
];

/// Where the built guests are.
#[derive(Debug)]
pub struct Components {
    dir: PathBuf,
    target_dir: PathBuf,
}

impl Components {
    /// The path of the component `name` (one of [`NAMES`]).
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("trellis_test_{name}.wasm"))
    }

    /// The bytes of the component `name`.
    pub fn bytes(&self, name: &str) -> Vec<u8> {
        let path = self.path(name);
        std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
    }

    /// The guests' own target directory (handy for caches that should survive test runs).
    pub fn target_dir(&self) -> &Path {
        &self.target_dir
    }
}

/// Builds the guests (once per process) and returns where they are. Panics with cargo's output
/// when the build fails.
pub fn build() -> &'static Components {
    static BUILT: OnceLock<Components> = OnceLock::new();
    BUILT.get_or_init(|| {
        let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
        let workspace = manifest_dir.join("components");
        let target_dir = match std::env::var_os("TRELLIS_WASM_TARGET_DIR") {
            Some(dir) => PathBuf::from(dir),
            None => outer_target_dir().join("wasm-components"),
        };
        build_wasm(&workspace, &target_dir, "the guest components");
        let components = Components {
            dir: target_dir.join("wasm32-wasip2/release"),
            target_dir,
        };
        for name in NAMES {
            assert!(
                components.path(name).is_file(),
                "missing {}",
                components.path(name).display()
            );
        }
        components
    })
}

/// Builds the example components (`examples/`, once per process) and returns the path of the
/// `.wasm` of example `crate_name` (e.g. `kv_counter`) and its `Component.toml`.
pub fn example(crate_name: &str) -> (PathBuf, PathBuf) {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples");
    let dir = BUILT.get_or_init(|| {
        let target_dir = outer_target_dir().join("wasm-examples");
        build_wasm(&examples, &target_dir, "the examples");
        target_dir.join("wasm32-wasip2/release")
    });
    let wasm = dir.join(format!("{crate_name}.wasm"));
    assert!(wasm.is_file(), "missing {}", wasm.display());
    let manifest = examples
        .join(crate_name.replace('_', "-"))
        .join("Component.toml");
    (wasm, manifest)
}

/// Builds a component written in another language with the repository's script for it:
/// `script` (`scripts/python-components.sh`) is sourced and `function` called with `args` and
/// the output path, `<target>/<kind>-components/<name>.wasm`. The scripts install their
/// toolchain on first use and rebuild only when the inputs changed; one build per name and
/// process.
fn build_with_script(
    kind: &str,
    script: &str,
    function: &str,
    name: &str,
    args: &[&str],
) -> PathBuf {
    static BUILT: OnceLock<std::sync::Mutex<std::collections::HashMap<String, PathBuf>>> =
        OnceLock::new();
    let built = BUILT.get_or_init(Default::default);
    let mut built = built
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let key = format!("{kind}/{name}");
    if let Some(path) = built.get(&key) {
        return path.clone();
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = outer_target_dir()
        .join(format!("{kind}-components"))
        .join(format!("{name}.wasm"));
    let output = Command::new("bash")
        .arg("-c")
        .arg(format!(". {script} && {function} \"$@\""))
        .arg("build")
        .args(args)
        .arg(&out)
        .current_dir(&repo)
        .output()
        .unwrap_or_else(|e| panic!("running bash to build the {kind} component {name}: {e}"));
    assert!(
        output.status.success() && out.is_file(),
        "building the {kind} component {name} with {script} failed (scripts/test installs its toolchain):\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    built.insert(key, out.clone());
    out
}

/// Builds the Python component in `dir` (relative to the repository root; it holds `app.py`) for
/// `world` with componentize-py, against the WIT in `wit` (relative too); returns the `.wasm`.
pub fn python(dir: &str, world: &str, wit: &str) -> PathBuf {
    let name = Path::new(dir)
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a directory name");
    build_with_script(
        "python",
        "scripts/python-components.sh",
        "build_python_component",
        name,
        &[dir, world, wit],
    )
}

/// Builds the C component whose sources are in `dir` (relative to the repository root) for
/// `world` of the WIT in `wit` (relative too) with clang, wasi-libc and wit-bindgen; returns the
/// `.wasm`.
pub fn c(dir: &str, wit: &str, world: &str) -> PathBuf {
    let name = Path::new(dir)
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a directory name");
    build_with_script(
        "c",
        "scripts/c-components.sh",
        "build_c_component",
        name,
        &[dir, wit, world],
    )
}

/// Composes `main` with `deps` at build time with `wasm-tools compose` (the wasm-tools of
/// `scripts/c-components.sh`, installed on first use): each import of `main` that a dep exports
/// is satisfied by it inside the result, which is one component. Returns the composed `.wasm`.
pub fn compose(name: &str, main: &Path, deps: &[&Path]) -> PathBuf {
    let dir = tempfile::tempdir().expect("a scratch directory");
    // wasm-tools names each dependency instance after its file: kebab case.
    let copy = |path: &Path| {
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .expect("a file name")
            .replace('_', "-");
        let to = dir.path().join(format!("{stem}.wasm"));
        std::fs::copy(path, &to).expect("copy a component");
        to
    };
    let out = outer_target_dir()
        .join("composed-components")
        .join(format!("{name}.wasm"));
    std::fs::create_dir_all(out.parent().expect("a parent")).expect("the output directory");
    let mut args = vec![copy(main)];
    for dep in deps {
        args.push("-d".into());
        args.push(copy(dep));
    }
    args.push("-o".into());
    args.push(out.clone());
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let output = Command::new("bash")
        .arg("-c")
        .arg(
            ". scripts/c-components.sh && ensure_c_toolchain >&2 && \"$WASM_TOOLS\" compose \"$@\"",
        )
        .arg("compose")
        .args(&args)
        .current_dir(&repo)
        .output()
        .unwrap_or_else(|e| panic!("running wasm-tools compose: {e}"));
    assert!(
        output.status.success() && out.is_file(),
        "composing {name} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    out
}

/// Builds the wasm32-wasip2 workspace in `workspace` (release) into `target_dir`; panics with
/// cargo's output, naming `what`, when the build fails.
fn build_wasm(workspace: &Path, target_dir: &Path, what: &str) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(workspace.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", target_dir)
        // Flags meant for the host build must not leak into the guests' build.
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_BUILD_TARGET")
        .output()
        .unwrap_or_else(|e| panic!("running cargo to build {what}: {e}"));
    assert!(
        output.status.success(),
        "building {what} failed:\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// The target directory of the build running this executable.
fn outer_target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    // Tests and benches run as <target>/<profile>/deps/<exe>, examples as
    // <target>/<profile>/examples/<exe>; anything else falls back to
    // CARGO_TARGET_DIR or the workspace's target/.
    let mut dir = exe.parent();
    while let Some(d) = dir {
        if d.file_name()
            .is_some_and(|n| n == "deps" || n == "examples")
            && let Some(target) = d.parent().and_then(Path::parent)
        {
            return target.to_path_buf();
        }
        dir = d.parent();
    }
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"),
    }
}
