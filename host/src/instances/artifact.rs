//! Fetching a component's code: from the lattice's artifact store or from a local file.
//!
//! Artifact bytes are shared: while any instance of a digest lives on this host, a second
//! instance of the same digest reuses the bytes instead of fetching them again, and two instances
//! started at once fetch them once. Each instance still loads its own [`LoadedComponent`] (its own
//! concurrency limit); with the runtime's compiled-artifact cache that load maps the compiled code
//! instead of compiling it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use async_nats::jetstream;
use bytes::Bytes;
use tokio::sync::OnceCell;

use super::error::StartError;
use trellis_schemas::Lattice;

use crate::runtime::{Digest, LoadedComponent, Manifest, Runtime};

/// The bytes of one digest, fetched at most once while someone holds them.
pub(crate) type SharedBytes = Arc<OnceCell<Bytes>>;

/// Where instances get their code.
#[derive(Debug)]
pub(crate) struct Artifacts {
    js: jetstream::Context,
    lattice: Lattice,
    max_bytes: u64,
    fetched: Mutex<HashMap<Digest, Weak<OnceCell<Bytes>>>>,
}

/// Code ready to run, and what keeps its bytes shared.
#[derive(Debug)]
pub(crate) struct Loaded {
    pub component: LoadedComponent,
    /// The `.wasm` itself, for a micro-VM to compile.
    pub wasm: Bytes,
    /// Held for the instance's life so that other instances of the digest reuse the bytes.
    pub _bytes: Option<SharedBytes>,
}

impl Artifacts {
    pub fn new(js: jetstream::Context, lattice: Lattice, max_bytes: u64) -> Self {
        Self {
            js,
            lattice,
            max_bytes,
            fetched: Mutex::new(HashMap::new()),
        }
    }

    /// Fetches (or reuses) the artifact `digest` and loads it with `manifest`.
    pub async fn load_artifact(
        &self,
        runtime: &Runtime,
        digest: Digest,
        manifest: Manifest,
    ) -> Result<Loaded, StartError> {
        let cell = {
            let mut fetched = self.fetched.lock().unwrap_or_else(PoisonError::into_inner);
            fetched.retain(|_, weak| weak.strong_count() > 0);
            match fetched.get(&digest).and_then(Weak::upgrade) {
                Some(cell) => cell,
                None => {
                    let cell = Arc::new(OnceCell::new());
                    fetched.insert(digest, Arc::downgrade(&cell));
                    cell
                }
            }
        };
        let bytes = cell.get_or_try_init(|| self.fetch(&digest)).await?.clone();
        let wasm = bytes.clone();
        let runtime = runtime.clone();
        let component =
            tokio::task::spawn_blocking(move || runtime.load_verified(&bytes, manifest, &digest))
                .await
                .map_err(|e| StartError::Task(e.to_string()))??;
        Ok(Loaded {
            component,
            wasm,
            _bytes: Some(cell),
        })
    }

    async fn fetch(&self, digest: &Digest) -> Result<Bytes, StartError> {
        use trellis_bus::ArtifactError;
        let name = digest.to_string();
        trellis_bus::fetch_artifact(&self.js, &self.lattice, &name, self.max_bytes)
            .await
            .map(Bytes::from)
            .map_err(|e| match e {
                ArtifactError::NotFound(_) => StartError::ArtifactMissing {
                    digest: name.clone(),
                    bucket: trellis_schemas::subject::artifact_bucket(&self.lattice),
                },
                ArtifactError::TooLarge { size, limit } => StartError::ArtifactTooLarge {
                    digest: name.clone(),
                    size,
                    limit,
                },
                ArtifactError::DigestMismatch { expected, actual } => {
                    StartError::ArtifactCorrupt { expected, actual }
                }
                other => StartError::ArtifactStore {
                    digest: name.clone(),
                    message: other.to_string(),
                },
            })
    }
}

/// Loads a component from a `.wasm` file and its `Component.toml` on this machine.
pub(crate) async fn load_file(
    runtime: &Runtime,
    path: &str,
    manifest_path: Option<&str>,
) -> Result<Loaded, StartError> {
    let wasm = PathBuf::from(path);
    let manifest_path = match manifest_path {
        Some(p) => PathBuf::from(p),
        None => wasm
            .parent()
            .unwrap_or_else(|| Path::new("."))
            .join("Component.toml"),
    };
    let read = |path: PathBuf| async move {
        tokio::fs::read(&path)
            .await
            .map_err(|source| StartError::File { path, source })
    };
    let text = read(manifest_path.clone()).await?;
    let text = String::from_utf8(text).map_err(|e| StartError::File {
        path: manifest_path,
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
    })?;
    let manifest = Manifest::from_toml(&text)?;
    let bytes = Bytes::from(read(wasm).await?);
    let wasm = bytes.clone();
    let runtime = runtime.clone();
    let component = tokio::task::spawn_blocking(move || runtime.load(&bytes, manifest))
        .await
        .map_err(|e| StartError::Task(e.to_string()))??;
    Ok(Loaded {
        component,
        wasm,
        _bytes: None,
    })
}
