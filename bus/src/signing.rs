//! Signed components: issuer keys (nkeys operator keys), signatures over a component's digest
//! and manifest, and their verification.

use base64::Engine as _;
use trellis_schemas::ManifestDoc;
use trellis_schemas::instance::{ComponentSignature, signed_bytes};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// A new issuer key: its seed (secret, `SO…`) and its public key (`O…`).
///
/// # Errors
///
/// When the seed cannot be encoded (it always can).
pub fn new_key() -> Result<(String, String), String> {
    let key = nkeys::KeyPair::new_operator();
    let seed = key.seed().map_err(|e| e.to_string())?;
    Ok((seed, key.public_key()))
}

/// The public key of a seed.
///
/// # Errors
///
/// When `seed` is not an nkeys seed.
pub fn public_key(seed: &str) -> Result<String, String> {
    nkeys::KeyPair::from_seed(seed.trim())
        .map(|k| k.public_key())
        .map_err(|e| format!("not an issuer seed: {e}"))
}

/// Signs the component `digest` with `manifest` with the key whose seed is `seed`.
///
/// # Errors
///
/// When `seed` is not an nkeys seed.
pub fn sign(
    seed: &str,
    digest: &str,
    manifest: &ManifestDoc,
) -> Result<ComponentSignature, String> {
    let key =
        nkeys::KeyPair::from_seed(seed.trim()).map_err(|e| format!("not an issuer seed: {e}"))?;
    let signature = key
        .sign(&signed_bytes(digest, manifest))
        .map_err(|e| format!("cannot sign: {e}"))?;
    Ok(ComponentSignature {
        issuer: key.public_key(),
        signature: B64.encode(signature),
    })
}

/// Checks that `signature` is its issuer's over `digest` and `manifest`.
///
/// # Errors
///
/// Says what is wrong: the issuer is not a public key, the signature is not base64, or it does
/// not verify.
pub fn verify(
    signature: &ComponentSignature,
    digest: &str,
    manifest: &ManifestDoc,
) -> Result<(), String> {
    let key = nkeys::KeyPair::from_public_key(&signature.issuer)
        .map_err(|e| format!("issuer {:?} is not a public key: {e}", signature.issuer))?;
    let bytes = B64
        .decode(&signature.signature)
        .map_err(|e| format!("the signature is not base64: {e}"))?;
    key.verify(&signed_bytes(digest, manifest), &bytes)
        .map_err(|_| {
            format!(
                "the signature by {} does not match this component's digest and manifest",
                signature.issuer
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(fuel: u64) -> ManifestDoc {
        let toml = format!(
            "[component]\nname = \"c\"\nversion = \"1.0.0\"\n[limits]\nmax_memory = \"16MiB\"\nfuel = {fuel}\ntimeout = \"1s\"\nmax_concurrency = 1\n"
        );
        let m = trellis_schemas::Manifest::from_toml(&toml).unwrap();
        ManifestDoc::from_manifest(&m).unwrap()
    }

    #[test]
    fn a_signature_covers_the_digest_and_the_manifest() {
        let (seed, public) = new_key().unwrap();
        assert!(public.starts_with('O') && seed.starts_with("SO"));
        assert_eq!(public_key(&seed).unwrap(), public);
        let digest = format!("sha256:{}", "a".repeat(64));
        let sig = sign(&seed, &digest, &manifest(1000)).unwrap();
        assert_eq!(sig.issuer, public);
        verify(&sig, &digest, &manifest(1000)).unwrap();
        // Other code, or the same code with other limits, does not verify.
        let other = format!("sha256:{}", "b".repeat(64));
        assert!(verify(&sig, &other, &manifest(1000)).is_err());
        assert!(verify(&sig, &digest, &manifest(2000)).is_err());
        // Nor does the signature under another issuer's name.
        let (_, someone) = new_key().unwrap();
        let forged = ComponentSignature {
            issuer: someone,
            signature: sig.signature.clone(),
        };
        assert!(verify(&forged, &digest, &manifest(1000)).is_err());
        assert!(public_key("not a seed").is_err());
    }
}
