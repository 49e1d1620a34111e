//! The artifact store: components' `.wasm` files in a JetStream object store bucket, named by the
//! hex SHA-256 of their bytes (content addressing).

use std::collections::BTreeSet;
use std::sync::{Mutex, PoisonError};

use async_nats::jetstream::{self, object_store};
use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncReadExt as _;
use trellis_schemas::{Lattice, subject};

/// An artifact operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ArtifactError {
    /// The digest is not `sha256:<64 lowercase hex>`.
    #[error("{0:?} is not a digest; expected sha256:<64 lowercase hex digits>")]
    BadDigest(String),
    /// No object with that digest is stored.
    #[error("no artifact {0} in the artifact store")]
    NotFound(String),
    /// The stored bytes do not hash to the digest.
    #[error("artifact {expected} is corrupt: its bytes hash to {actual}")]
    DigestMismatch {
        /// The digest asked for.
        expected: String,
        /// What the stored bytes hash to.
        actual: String,
    },
    /// The artifact is larger than allowed.
    #[error("artifact is {size} bytes; the limit is {limit}")]
    TooLarge {
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// JetStream failed.
    #[error("artifact store: {0}")]
    Store(String),
}

/// `sha256:<hex>` of `bytes`.
pub fn digest_of(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// The hex part of a well-formed digest.
pub fn digest_hex(digest: &str) -> Result<&str, ArtifactError> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| ArtifactError::BadDigest(digest.to_owned()))?;
    let valid = hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if valid {
        Ok(hex)
    } else {
        Err(ArtifactError::BadDigest(digest.to_owned()))
    }
}

/// The lattice's artifact bucket, created if missing with [`crate::replicas`] replicas; an
/// existing one is brought to that count the first time a process opens it.
pub async fn artifact_store(
    js: &jetstream::Context,
    lattice: &Lattice,
) -> Result<object_store::ObjectStore, ArtifactError> {
    static CHECKED: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());
    let bucket = subject::artifact_bucket(lattice);
    let replicas = crate::replicas(js, None).await;
    match js.get_object_store(&bucket).await {
        Ok(store) => {
            let first = CHECKED
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(format!("{bucket}/{}", replicas.count));
            if first
                && let Err(e) = crate::ensure_replicas(js, &format!("OBJ_{bucket}"), replicas).await
            {
                tracing::warn!(%bucket, error = %e, "cannot change the artifact bucket's replicas");
            }
            Ok(store)
        }
        Err(_) => {
            let config = object_store::Config {
                bucket: bucket.clone(),
                description: Some(format!("Trellis components of lattice {lattice}")),
                num_replicas: replicas.count,
                ..Default::default()
            };
            match js.create_object_store(config).await {
                Ok(store) => Ok(store),
                // Another process may have created it at the same moment.
                Err(e) => js
                    .get_object_store(&bucket)
                    .await
                    .map_err(|_| ArtifactError::Store(e.to_string())),
            }
        }
    }
}

/// Stores `bytes` under their digest (idempotent: the same bytes give the same object). Returns
/// the digest.
pub async fn put_artifact(
    js: &jetstream::Context,
    lattice: &Lattice,
    bytes: &[u8],
) -> Result<String, ArtifactError> {
    put_artifact_reporting(js, lattice, bytes, |_| {}).await
}

/// Like [`put_artifact`], and calls `uploaded` with the bytes handed to the store so far as
/// the upload goes (not at all when the artifact was already stored).
///
/// # Errors
///
/// As [`put_artifact`].
pub async fn put_artifact_reporting(
    js: &jetstream::Context,
    lattice: &Lattice,
    bytes: &[u8],
    uploaded: impl FnMut(usize) + Send + Unpin,
) -> Result<String, ArtifactError> {
    let digest = digest_of(bytes);
    let store = artifact_store(js, lattice).await?;
    let name = digest_hex(&digest)?.to_owned();
    if let Ok(info) = store.info(&name).await
        && !info.deleted
        && info.size == bytes.len()
    {
        return Ok(digest);
    }
    let mut reader = Counting {
        rest: bytes,
        read: 0,
        uploaded,
    };
    store
        .put(name.as_str(), &mut reader)
        .await
        .map_err(|e| ArtifactError::Store(e.to_string()))?;
    Ok(digest)
}

/// Reads a byte slice and reports how much was read.
struct Counting<'a, F> {
    rest: &'a [u8],
    read: usize,
    uploaded: F,
}

impl<F: FnMut(usize) + Unpin> tokio::io::AsyncRead for Counting<'_, F> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let n = this.rest.len().min(buf.remaining());
        let (now, rest) = this.rest.split_at(n);
        buf.put_slice(now);
        this.rest = rest;
        this.read += n;
        if n > 0 {
            (this.uploaded)(this.read);
        }
        std::task::Poll::Ready(Ok(()))
    }
}

/// Checks that the artifact `digest` is stored and its recorded digest matches; returns its size.
pub async fn stat_artifact(
    js: &jetstream::Context,
    lattice: &Lattice,
    digest: &str,
) -> Result<u64, ArtifactError> {
    let hex_digest = digest_hex(digest)?;
    let store = artifact_store(js, lattice).await?;
    let info = store.info(hex_digest).await.map_err(|e| match e.kind() {
        object_store::InfoErrorKind::NotFound => ArtifactError::NotFound(digest.to_owned()),
        _ => ArtifactError::Store(e.to_string()),
    })?;
    if info.deleted {
        return Err(ArtifactError::NotFound(digest.to_owned()));
    }
    let bytes = hex::decode(hex_digest).map_err(|_| ArtifactError::BadDigest(digest.to_owned()))?;
    let expected = format!(
        "SHA-256={}",
        base64::engine::general_purpose::URL_SAFE.encode(bytes)
    );
    match info.digest {
        Some(recorded) if recorded == expected => Ok(info.size as u64),
        Some(recorded) => Err(ArtifactError::DigestMismatch {
            expected: digest.to_owned(),
            actual: recorded,
        }),
        None => Err(ArtifactError::Store(format!(
            "artifact {digest} has no recorded digest"
        ))),
    }
}

/// Reads the artifact `digest` (at most `limit` bytes) and verifies its bytes against the digest.
pub async fn fetch_artifact(
    js: &jetstream::Context,
    lattice: &Lattice,
    digest: &str,
    limit: u64,
) -> Result<Vec<u8>, ArtifactError> {
    let hex_digest = digest_hex(digest)?;
    let size = stat_artifact(js, lattice, digest).await?;
    if size > limit {
        return Err(ArtifactError::TooLarge { size, limit });
    }
    let store = artifact_store(js, lattice).await?;
    let mut object = store
        .get(hex_digest)
        .await
        .map_err(|_| ArtifactError::NotFound(digest.to_owned()))?;
    let mut bytes = Vec::with_capacity(size as usize);
    // `take` bounds the read even if the object is longer than its info says.
    (&mut object)
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| ArtifactError::Store(e.to_string()))?;
    if bytes.len() as u64 > limit {
        return Err(ArtifactError::TooLarge {
            size: bytes.len() as u64,
            limit,
        });
    }
    let actual = digest_of(&bytes);
    if actual != digest {
        return Err(ArtifactError::DigestMismatch {
            expected: digest.to_owned(),
            actual,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_checked() {
        let d = digest_of(b"hello");
        assert_eq!(
            d,
            "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
        assert!(digest_hex(&d).is_ok());
        for bad in [
            "",
            "sha256:",
            "md5:abc",
            "sha256:2CF24DBA5FB0A30E26E83B2AC5B9E29E1B161E5C1FA7425E73043362938B9824",
        ] {
            assert!(digest_hex(bad).is_err(), "{bad}");
        }
    }
}
