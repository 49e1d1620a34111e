//! Linked imports: a component's own interfaces (`example:pipeline/transform`), served by
//! another component.
//!
//! Any WIT interface is linked dynamically, with no code generated for it: every function of an
//! imported interface the runtime does not implement itself becomes a host function that hands
//! its arguments, as values, to the invocation's [`CapabilityBridge::link`]. The bridge decides
//! whether a link serves it and where the call goes (another component's instance in the same
//! process, or over the data plane); without one the call never leaves the runtime.
//!
//! Values of every WIT type cross, resources excepted: a function taking or returning a
//! resource handle fails its call. A failed call reaches the guest as its function's own error
//! when the function can express one (see [`LinkError`]); otherwise the invocation ends with
//! the link's error, which is not counted as a crash.

use std::sync::Arc;
use std::time::Instant;

use wasmtime::component::types::{ComponentFunc, ComponentItem, Type};
use wasmtime::component::{Linker, ResourceType, Val};
use wasmtime::{Engine, StoreContextMut};

use super::capabilities::{LinkCall, LinkError};
use super::convert::{Budget, val_to_json};
use super::error::LinkFailed;
use super::store::StoreState;

/// Defines every function of the imported interface `import` as a linked call. A resource type
/// of the interface is defined as a type of the host's that nothing creates: the component
/// instantiates, and a function that passes a handle of it fails its call (resources do not
/// cross links).
pub(crate) fn define(
    linker: &mut Linker<StoreState>,
    engine: &Engine,
    import: &str,
    item: &ComponentItem,
) -> wasmtime::Result<()> {
    let ComponentItem::ComponentInstance(instance) = item else {
        return Ok(());
    };
    let mut linked = linker.instance(import)?;
    for (function, item) in instance.exports(engine) {
        if matches!(item.ty, ComponentItem::Resource(_)) {
            linked.resource(function, ResourceType::host::<Unlinkable>(), |_, _| Ok(()))?;
        } else if matches!(item.ty, ComponentItem::ComponentFunc(_)) {
            let interface: Arc<str> = Arc::from(import);
            let name: Arc<str> = Arc::from(function);
            linked.func_new_async(function, move |store, ty, params, results| {
                let call = prepare(&store, &interface, &name, &ty, params);
                Box::new(async move { finish(store, call, &ty, results).await })
            })?;
        }
    }
    Ok(())
}

/// The arguments of a linked call as they leave the caller's runtime (over the data plane, or
/// out of a micro-VM): a JSON array, each value converted by its own type (the target converts
/// it back against its export's types), at most the data plane's
/// [`MAX_BODY_BYTES`](trellis_schemas::dataplane::MAX_BODY_BYTES).
///
/// # Errors
///
/// `invalid_arguments` for a value JSON cannot carry (a resource) or arguments over the limit.
pub(crate) fn encode_args(call: &LinkCall) -> Result<bytes::Bytes, LinkError> {
    use trellis_schemas::dataplane::{ErrorCode, MAX_BODY_BYTES};
    let failed = |code: ErrorCode, message: String| LinkError::Failed { code, message };
    let mut budget = Budget::new(MAX_BODY_BYTES);
    let args = call
        .params
        .iter()
        .map(|v| val_to_json(v, &mut budget))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| {
            failed(
                ErrorCode::InvalidArguments,
                format!("the arguments cannot leave this runtime: {e:?}"),
            )
        })?;
    serde_json::to_vec(&args)
        .map(bytes::Bytes::from)
        .map_err(|e| {
            failed(
                ErrorCode::Internal,
                format!("cannot encode the arguments: {e}"),
            )
        })
}

/// The host-side type of a linked interface's resources: never instantiated.
struct Unlinkable;

fn prepare(
    store: &StoreContextMut<'_, StoreState>,
    interface: &Arc<str>,
    function: &Arc<str>,
    ty: &ComponentFunc,
    params: &[Val],
) -> LinkCall {
    let state = store.data();
    LinkCall {
        interface: Arc::clone(interface),
        function: Arc::clone(function),
        params: params.to_vec(),
        results: ty.results().collect(),
        timeout: state.deadline.saturating_duration_since(Instant::now()),
        traceparent: state.traceparent.clone(),
    }
}

async fn finish(
    store: StoreContextMut<'_, StoreState>,
    call: LinkCall,
    ty: &ComponentFunc,
    results: &mut [Val],
) -> wasmtime::Result<()> {
    let bridge = Arc::clone(&store.data().bridge);
    let (interface, function) = (Arc::clone(&call.interface), Arc::clone(&call.function));
    match bridge.link(call).await {
        Ok(values) if values.len() == results.len() => {
            for (slot, value) in results.iter_mut().zip(values) {
                *slot = value;
            }
            Ok(())
        }
        Ok(values) => Err(wasmtime::Error::new(LinkFailed {
            code: trellis_schemas::dataplane::ErrorCode::Internal,
            message: format!(
                "{interface}#{function} answered {} results where {} were expected",
                values.len(),
                results.len()
            ),
        })),
        Err(error) => match as_guest_error(ty, &error) {
            Some(value) => {
                results[0] = value;
                Ok(())
            }
            None => Err(wasmtime::Error::new(LinkFailed {
                code: error.code(),
                message: format!("{interface}#{function}: {error}"),
            })),
        },
    }
}

/// The error value the function's own result type can carry for `error`: `result<_, string>`
/// gets the message; `result<_, E>` with an enum or variant `E` gets its case named after the
/// failure (`access-denied`, `unavailable`, `failed`; else `error` or `other`), with the message
/// when that case carries a string.
fn as_guest_error(ty: &ComponentFunc, error: &LinkError) -> Option<Val> {
    let mut results = ty.results();
    let (Some(Type::Result(result)), None) = (results.next(), results.next()) else {
        return None;
    };
    let message = error.to_string();
    let preferred: &[&str] = match error {
        LinkError::Denied(_) => &["access-denied", "denied", "forbidden"],
        LinkError::Unavailable(_) => &["unavailable", "no-instance"],
        LinkError::Failed { .. } => &["failed", "failure"],
    };
    let fallback = ["error", "other", "failed"];
    let payload = match result.err()? {
        Type::String => Val::String(message),
        Type::Enum(e) => {
            let names: Vec<&str> = e.names().collect();
            let case = preferred
                .iter()
                .chain(fallback.iter())
                .find(|c| names.contains(c))?;
            Val::Enum((*case).to_owned())
        }
        Type::Variant(v) => {
            let cases: Vec<_> = v.cases().collect();
            let case = preferred.iter().chain(fallback.iter()).find_map(|name| {
                cases
                    .iter()
                    .find(|c| c.name == *name && matches!(c.ty, None | Some(Type::String)))
            })?;
            let value = case.ty.as_ref().map(|_| Box::new(Val::String(message)));
            Val::Variant(case.name.to_owned(), value)
        }
        _ => return None,
    };
    Some(Val::Result(Err(Some(Box::new(payload)))))
}
