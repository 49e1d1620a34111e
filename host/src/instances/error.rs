//! Why an instance could not start.

use std::path::PathBuf;

use crate::runtime::{DigestParseError, LoadError, ManifestError};

/// An instance could not start. Its [`Display`](std::fmt::Display) text is the `reason` of the
/// `instance.start_failed` fact, so it says precisely what went wrong and where.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The digest in the command is not `sha256:<64 hex digits>`.
    #[error(transparent)]
    Digest(#[from] DigestParseError),
    /// The artifact store holds no object for the digest.
    #[error("artifact not found: {digest} is not in the artifact store {bucket}")]
    ArtifactMissing {
        /// The digest asked for.
        digest: String,
        /// The object store bucket searched.
        bucket: String,
    },
    /// The artifact is larger than the host accepts.
    #[error("artifact {digest} is {size} bytes; this host accepts at most {limit}")]
    ArtifactTooLarge {
        /// The digest asked for.
        digest: String,
        /// Its size.
        size: u64,
        /// The host's bound.
        limit: u64,
    },
    /// The stored bytes do not match the digest they are stored under.
    #[error("digest mismatch: the artifact stored as {expected} hashes to {actual}")]
    ArtifactCorrupt {
        /// The digest asked for.
        expected: String,
        /// What the stored bytes hash to, as the store records it.
        actual: String,
    },
    /// The artifact store could not be read.
    #[error("artifact store unavailable while fetching {digest}: {message}")]
    ArtifactStore {
        /// The digest asked for.
        digest: String,
        /// What the store said.
        message: String,
    },
    /// A file of a `file` source could not be read.
    #[error("reading {}: {source}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The manifest is invalid; the message names the field.
    #[error("manifest: {0}")]
    Manifest(#[from] ManifestError),
    /// The manifest's name cannot name a component on the data plane.
    #[error("manifest: component.name: {0}")]
    Name(#[from] trellis_schemas::InvalidName),
    /// The runtime refused the component: digest mismatch, invalid wasm, a limit above the host's
    /// ceiling (naming the field), an undeclared import or a link failure.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The host trusts signing issuers and the component is not signed by one of them.
    #[error("untrusted_component: {0}")]
    Untrusted(String),
    /// Subscribing to the instance's call subjects failed.
    #[error("cannot subscribe to the call subjects: {0}")]
    Subscribe(String),
    /// The loading task failed (a bug).
    #[error("loading task failed: {0}")]
    Task(String),
}
