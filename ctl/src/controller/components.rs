//! `component.register` and `component.list`.

use trellis_bus::ArtifactError;
use trellis_schemas::control::{
    ComponentListReply, ComponentListRequest, ComponentRegisterReply, ComponentRegisterRequest,
};
use trellis_schemas::fact::ArtifactStored;
use trellis_schemas::{
    ErrorBody, ErrorCode, Event, FactData, Manifest, ManifestDoc, ManifestError,
};

use super::state::State;

/// The error for a manifest that does not validate: `limits_required` for a limit, otherwise
/// `invalid_request`, naming the field and the accepted range either way.
pub(crate) fn manifest_error(e: &ManifestError) -> ErrorBody {
    let field = e.field();
    let code = if field.is_some_and(|f| f.starts_with("limits.")) {
        ErrorCode::LimitsRequired
    } else {
        ErrorCode::InvalidRequest
    };
    ErrorBody::new(code, format!("Component.toml is invalid: {e}"))
        .with_details(serde_json::json!({ "field": field }))
}

pub(crate) fn artifact_error(e: ArtifactError) -> ErrorBody {
    let code = match &e {
        ArtifactError::BadDigest(_) => ErrorCode::InvalidRequest,
        ArtifactError::NotFound(_) => ErrorCode::NotFound,
        ArtifactError::DigestMismatch { .. } => ErrorCode::DigestMismatch,
        ArtifactError::TooLarge { .. } => ErrorCode::PayloadTooLarge,
        _ => ErrorCode::Unavailable,
    };
    let hint = if code == ErrorCode::NotFound {
        "; upload it first (`trellis component push` does both steps)"
    } else {
        ""
    };
    ErrorBody::new(code, format!("{e}{hint}"))
}

pub(crate) async fn register(
    state: &State,
    request: ComponentRegisterRequest,
) -> Result<ComponentRegisterReply, ErrorBody> {
    trellis_bus::digest_hex(&request.digest).map_err(artifact_error)?;
    let manifest = Manifest::from_toml(&request.manifest).map_err(|e| manifest_error(&e))?;
    let doc = ManifestDoc::from_manifest(&manifest).map_err(|e| manifest_error(&e))?;
    if let Some(signature) = &request.signature {
        trellis_bus::signing::verify(signature, &request.digest, &doc).map_err(|e| {
            ErrorBody::new(
                ErrorCode::InvalidRequest,
                format!("{e}; sign the component with `trellis component push --sign KEY`"),
            )
        })?;
    }
    // The store keeps one record per code: registering stored code under another name or
    // version would take that one out of the store while instances still run it.
    if let Some(stored) = state.projection().artifacts.get(&request.digest)
        && (stored.manifest.name != doc.name || stored.manifest.version != doc.version)
    {
        return Err(ErrorBody::new(
            ErrorCode::Conflict,
            format!(
                "this code ({}) is stored already as {}@{}; a stored code has one name and version: use that one, or change the code",
                request.digest, stored.manifest.name, stored.manifest.version
            ),
        )
        .with_details(serde_json::json!({
            "component": stored.manifest.name,
            "version": stored.manifest.version,
        })));
    }
    let size = trellis_bus::stat_artifact(&state.js, &state.config.lattice, &request.digest)
        .await
        .map_err(artifact_error)?;
    // What it exports, so that links can be checked against it; a component too large or
    // unreadable here is still registered (hosts check it when they load it).
    let exports = match trellis_bus::fetch_artifact(
        &state.js,
        &state.config.lattice,
        &request.digest,
        MAX_READ_BYTES,
    )
    .await
    {
        Ok(bytes) => crate::wasm::Surface::of(&bytes).map(|s| s.exports),
        Err(e) => {
            tracing::warn!(digest = %request.digest, error = %e, "cannot read the component's exports");
            None
        }
    };
    let stored = ArtifactStored {
        digest: request.digest,
        size,
        manifest: doc,
        signature: request.signature,
        exports,
    };
    let event = Event::new(
        state.source.clone(),
        FactData::ArtifactStored(stored.clone()),
    );
    // Answer once this replica has applied its own fact.
    let seq = state.publish_and_apply(&event).await?;
    Ok(ComponentRegisterReply {
        seq,
        component: stored,
    })
}

/// The largest component whose exports the controller reads at registration.
const MAX_READ_BYTES: u64 = 64 * 1024 * 1024;

pub(crate) fn list(
    state: &State,
    _: ComponentListRequest,
) -> Result<ComponentListReply, ErrorBody> {
    let projection = state.projection();
    let mut components: Vec<_> = projection.artifacts.values().cloned().collect();
    components.sort_by(|a, b| {
        (
            a.manifest.name.as_str(),
            semver::Version::parse(&a.manifest.version).ok(),
        )
            .cmp(&(
                b.manifest.name.as_str(),
                semver::Version::parse(&b.manifest.version).ok(),
            ))
    });
    Ok(ComponentListReply {
        as_of: projection.last_seq.max(state.as_of()),
        components,
    })
}
