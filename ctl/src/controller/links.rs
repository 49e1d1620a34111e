//! `link.add|remove|list`: a component's import served by another component, as facts.
//!
//! The controller checks a link (an existing source instance, a registered target that exports
//! the interface, at most one link per source and interface, no cycle among components) and
//! records it as a `link.added` fact. Hosts follow link facts and route each call of a linked
//! import; the controller keeps nothing beyond its projection.
//!
//! Links form no cycles: a call that came back to a component already waiting on it would hold
//! a slot of every stage's concurrency until the first timeout, and a cycle across hosts would
//! multiply that. A link that would close one is refused with `conflict`, naming the cycle.

use std::collections::{BTreeMap, BTreeSet};

use trellis_schemas::control::{
    LinkAddReply, LinkAddRequest, LinkListReply, LinkListRequest, LinkRemoveReply,
    LinkRemoveRequest,
};
use trellis_schemas::link::{Interface, Link, LinkRemoved};
use trellis_schemas::{
    AssignmentTarget, ComponentName, ErrorBody, ErrorCode, Event, FactData, LinkId, Projection,
};

use super::assignments::{check_target, publish_validated_at_tip};
use super::state::State;

/// Checks `request` against `projection` and turns it into a link with a fresh id.
pub(crate) fn validate(
    projection: &Projection,
    request: &LinkAddRequest,
) -> Result<Link, ErrorBody> {
    let invalid = |message: String| ErrorBody::new(ErrorCode::InvalidRequest, message);
    if let Some(req) = &request.version {
        semver::VersionReq::parse(req).map_err(|e| {
            invalid(format!(
                "--version {req:?} is not a semver requirement ({e}); e.g. ^1.2 or =0.3.1"
            ))
        })?;
    }
    check_target(projection, &request.source, "link")?;
    let link = Link {
        link_id: LinkId::generate(),
        source: request.source.clone(),
        interface: request.interface.clone(),
        target: request.target.clone(),
        version: request.version.clone(),
    };
    let versions: Vec<_> = projection
        .artifacts
        .values()
        .filter(|a| a.manifest.name == request.target)
        .collect();
    if versions.is_empty() {
        return Err(invalid(format!(
            "no component named {} is registered; push it first (`trellis component push`), `trellis component ls` lists them",
            request.target
        ))
        .with_details(serde_json::json!({ "missing": "target", "target": request.target })));
    }
    let serving: Vec<_> = versions
        .iter()
        .filter(|a| link.accepts_version(&a.manifest.version))
        .collect();
    if serving.is_empty() {
        let known: Vec<&str> = versions
            .iter()
            .map(|a| a.manifest.version.as_str())
            .collect();
        return Err(invalid(format!(
            "no version of {} matches {}; registered: {}",
            request.target,
            request.version.as_deref().unwrap_or("*"),
            known.join(", ")
        ))
        .with_details(serde_json::json!({ "missing": "version", "registered": known })));
    }
    // Components registered before the controller read exports have none recorded: they are
    // given the benefit of the doubt (a call that does not type-check fails at the caller).
    let exported = serving.iter().any(|a| {
        a.exports
            .as_ref()
            .is_none_or(|exports| exports.iter().any(|e| request.interface.names(e)))
    });
    if !exported {
        let exports: BTreeSet<&str> = serving
            .iter()
            .filter_map(|a| a.exports.as_ref())
            .flatten()
            .filter(|e| e.contains(':'))
            .map(String::as_str)
            .collect();
        return Err(invalid(format!(
            "component {} does not export {}; it exports: {}",
            request.target,
            request.interface,
            if exports.is_empty() {
                "no interface".to_owned()
            } else {
                exports.into_iter().collect::<Vec<_>>().join(", ")
            }
        ))
        .with_details(serde_json::json!({ "missing": "export", "interface": request.interface })));
    }
    if let Some(existing) = projection.link_of(&request.source, &request.interface) {
        return Err(ErrorBody::new(
            ErrorCode::Conflict,
            format!(
                "{} already has {} linked to {} through link {}; remove it first (`trellis link rm {}`)",
                request.source.describe(),
                request.interface,
                existing.link.target,
                existing.link.link_id,
                existing.link.link_id
            ),
        )
        .with_details(serde_json::json!({ "link_id": existing.link.link_id })));
    }
    let source = source_component(projection, &request.source);
    if let Some(source) = source
        && let Some(path) = path_between(projection, &request.target, &source)
    {
        let mut cycle: Vec<String> = vec![source.to_string()];
        cycle.extend(path.iter().map(ToString::to_string));
        return Err(ErrorBody::new(
            ErrorCode::Conflict,
            format!(
                "this link would close a cycle ({}); links between components form no cycles",
                cycle.join(" → ")
            ),
        )
        .with_details(serde_json::json!({ "cycle": cycle })));
    }
    Ok(link)
}

/// The component of a link source: the named one, or the instance's.
fn source_component(projection: &Projection, source: &AssignmentTarget) -> Option<ComponentName> {
    match source {
        AssignmentTarget::Component(name) => Some(name.clone()),
        AssignmentTarget::Instance(id) => projection
            .instances
            .get(id)
            .and_then(|i| ComponentName::new(i.component.as_str()).ok()),
    }
}

/// The components from `from` to `to` along the links in force (both ends included), if `to`
/// is reachable.
fn path_between(
    projection: &Projection,
    from: &ComponentName,
    to: &ComponentName,
) -> Option<Vec<ComponentName>> {
    let mut edges: BTreeMap<ComponentName, BTreeSet<ComponentName>> = BTreeMap::new();
    for record in projection.links.values() {
        if let Some(source) = source_component(projection, &record.link.source) {
            edges
                .entry(source)
                .or_default()
                .insert(record.link.target.clone());
        }
    }
    // Breadth first, remembering how each component was reached.
    let mut came_from: BTreeMap<ComponentName, ComponentName> = BTreeMap::new();
    let mut queue = std::collections::VecDeque::from([from.clone()]);
    let mut seen = BTreeSet::from([from.clone()]);
    while let Some(at) = queue.pop_front() {
        if &at == to {
            let mut path = vec![at.clone()];
            let mut cursor = at;
            while let Some(previous) = came_from.get(&cursor) {
                path.push(previous.clone());
                cursor = previous.clone();
            }
            path.reverse();
            return Some(path);
        }
        for next in edges.get(&at).into_iter().flatten() {
            if seen.insert(next.clone()) {
                came_from.insert(next.clone(), at.clone());
                queue.push_back(next.clone());
            }
        }
    }
    None
}

/// Adds a link: at most one per source and interface, and never a cycle, even when two
/// replicas are asked at once.
pub(crate) async fn add(state: &State, request: LinkAddRequest) -> Result<LinkAddReply, ErrorBody> {
    let (link, seq) = publish_validated_at_tip(state, "link", |projection| {
        let link = validate(projection, &request)?;
        Ok((link.clone(), FactData::LinkAdded(link)))
    })
    .await?;
    Ok(LinkAddReply { link, seq })
}

pub(crate) async fn remove(
    state: &State,
    request: LinkRemoveRequest,
) -> Result<LinkRemoveReply, ErrorBody> {
    let link = {
        let projection = state.projection();
        projection
            .links
            .get(&request.link_id)
            .map(|r| r.link.clone())
            .ok_or_else(|| {
                ErrorBody::new(
                    ErrorCode::NotFound,
                    format!(
                        "no link {} in force; `trellis link ls` lists them",
                        request.link_id
                    ),
                )
                .with_details(serde_json::json!({ "link_id": request.link_id }))
            })?
    };
    let event = Event::new(
        state.source.clone(),
        FactData::LinkRemoved(LinkRemoved {
            link_id: request.link_id,
            reason: "requested".to_owned(),
        }),
    );
    let seq = state.publish_and_apply(&event).await?;
    Ok(LinkRemoveReply { link, seq })
}

pub(crate) fn list(state: &State, request: LinkListRequest) -> Result<LinkListReply, ErrorBody> {
    let projection = state.projection();
    let links = projection
        .links
        .values()
        .filter(|r| {
            request.component.as_ref().is_none_or(|c| {
                &r.link.target == c
                    || source_component(&projection, &r.link.source).as_ref() == Some(c)
            })
        })
        .cloned()
        .collect();
    Ok(LinkListReply {
        links,
        as_of: projection.last_seq.max(state.as_of()),
    })
}

/// The interfaces `manifest` requires linked (`[capabilities] requires` entries that name an
/// interface) that no link serves to a new instance of it.
pub(crate) fn missing_links(
    projection: &Projection,
    manifest: &trellis_schemas::ManifestDoc,
) -> Vec<Interface> {
    manifest
        .required_links
        .iter()
        .filter(|interface| {
            !projection.links.values().any(|r| {
                matches!(&r.link.source, AssignmentTarget::Component(c) if c == &manifest.name)
                    && &r.link.interface == *interface
            })
        })
        .cloned()
        .collect()
}
