//! The on-disk cache of compiled components.
//!
//! # Layout
//!
//! `<root>/<engine key>/<sha256 of the wasm bytes>.cwasm`. The engine key is a SHA-256 of
//! [`Engine::precompile_compatibility_hash`] (wasmtime version, target, compiler flags and
//! tunables), so a host whose engine changes in any way that matters never reads an artifact it
//! cannot run: it compiles again into a directory of its own.
//!
//! # Trust
//!
//! Loading an artifact maps native code into the process. The cache directory must be writable by
//! the host only: anyone who can write to it can run code as the host. Artifacts are written to a
//! temporary file and renamed into place, so a reader never sees a partial file, and an artifact
//! that fails to load (truncated by a crash, written by another engine) is deleted and recompiled.

use std::fs;
use std::hash::{Hash, Hasher};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest as _, Sha256};
use wasmtime::Engine;
use wasmtime::component::Component;

use super::digest::Digest;

/// Version of the cache layout, mixed into the engine key.
const LAYOUT_VERSION: &[u8] = b"trellis-artifact-cache-v1";

#[derive(Debug)]
pub(crate) struct ArtifactCache {
    dir: PathBuf,
}

/// Feeds everything a `Hash` implementation writes into SHA-256, so the key is stable across
/// processes (unlike `DefaultHasher`, which is randomly seeded).
struct Sha256Hasher(Sha256);

impl Hasher for Sha256Hasher {
    fn finish(&self) -> u64 {
        // Only `write` matters: the key is read from the full SHA-256 state, never from here.
        0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }
}

/// A stable key of everything that makes a compiled artifact compatible with `engine`.
pub(crate) fn engine_key(engine: &Engine) -> String {
    let mut hasher = Sha256Hasher(Sha256::new());
    hasher.write(LAYOUT_VERSION);
    engine.precompile_compatibility_hash().hash(&mut hasher);
    hex::encode(&hasher.0.finalize()[..16])
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl ArtifactCache {
    /// Opens (creating it when needed) the cache directory for `engine` under `root`.
    pub(crate) fn open(root: &Path, engine: &Engine) -> io::Result<Self> {
        let dir = root.join(engine_key(engine));
        fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    /// The directory artifacts of this engine live in.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    fn path_for(&self, digest: &Digest) -> PathBuf {
        self.dir.join(format!("{}.cwasm", digest.to_hex()))
    }

    /// Loads the artifact for `digest`, if there is a usable one.
    pub(crate) fn get(&self, engine: &Engine, digest: &Digest) -> Option<Component> {
        let path = self.path_for(digest);
        if !path.is_file() {
            return None;
        }
        match deserialize(engine, &path) {
            Ok(component) => Some(component),
            Err(err) => {
                tracing::warn!(
                    path = %path.display(),
                    error = %err,
                    "discarding a compiled artifact that does not load; compiling again"
                );
                if let Err(err) = fs::remove_file(&path) {
                    tracing::warn!(path = %path.display(), error = %err, "cannot remove artifact");
                }
                None
            }
        }
    }

    /// Stores the compiled `component` under `digest`, atomically (temporary file + rename).
    pub(crate) fn put(&self, digest: &Digest, component: &Component) -> io::Result<()> {
        let bytes = component
            .serialize()
            .map_err(|err| io::Error::other(format!("serialising the component: {err}")))?;
        self.put_bytes(digest, &bytes)
    }

    /// The bytes of the artifact for `digest`, for an engine elsewhere (a micro-VM's) to map:
    /// that engine checks them as [`get`](Self::get) does here.
    pub(crate) fn get_bytes(&self, digest: &Digest) -> Option<Vec<u8>> {
        fs::read(self.path_for(digest)).ok()
    }

    /// Stores an artifact serialised by this cache's engine under `digest`, atomically.
    pub(crate) fn put_bytes(&self, digest: &Digest, bytes: &[u8]) -> io::Result<()> {
        let temp = self.dir.join(format!(
            ".{}.{}.{}.tmp",
            digest.to_hex(),
            std::process::id(),
            TEMP_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let result = (|| {
            let mut file = fs::File::create(&temp)?;
            file.write_all(bytes)?;
            file.sync_all()?;
            fs::rename(&temp, self.path_for(digest))
        })();
        if result.is_err() {
            // Best effort: the temporary file is garbage either way.
            let _ = fs::remove_file(&temp);
        }
        result
    }
}

/// Maps a compiled artifact written by [`ArtifactCache::put`].
#[expect(
    unsafe_code,
    reason = "deserialising a compiled artifact is unsafe by nature; see the safety comment"
)]
fn deserialize(engine: &Engine, path: &Path) -> wasmtime::Result<Component> {
    // SAFETY: the file was produced by `Component::serialize` with an engine of the same
    // compatibility key (it is in the directory named after that key), written atomically, and the
    // cache directory is trusted (see the module doc). wasmtime still checks the artifact's header
    // and engine compatibility and returns an error rather than running a mismatched artifact.
    unsafe { Component::deserialize_file(engine, path) }
}
