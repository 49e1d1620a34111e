//! The conversion between JSON and component-model values (the host's `runtime/convert.rs`, the
//! code every `trellis call` argument and every data-plane call goes through), driven by the types
//! of a component's functions: any JSON either converts to a value of the type or is refused
//! with an error, never a panic; a value converted back to JSON converts again to the same
//! value; and the JSON of a value never exceeds a budget without saying so.
//!
//! The first byte of an input picks a parameter type (from scalars to a record holding every
//! kind of WIT type), the second a result budget, the rest is the JSON.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use wasmtime::component::types::{ComponentItem, Type};
use wasmtime::component::{Component, Val};
use wasmtime::{Config, Engine};

#[path = "../../host/src/runtime/convert.rs"]
#[allow(dead_code, unreachable_pub)]
mod convert;

use convert::{Budget, FromValError, json_to_val, val_matches, val_to_json};

/// A component that only imports functions, one per type under test: its type information is
/// all the conversion needs, and it needs no core code. Records, variants, enums and flags are
/// named by type imports, as the component model asks of types in an import's signature.
const TYPES: &str = r#"
(component
  (type $point' (record (field "x" s32) (field "y" s32)))
  (import "point" (type $point (eq $point')))
  (type $color' (enum "red" "green" "blue"))
  (import "color" (type $color (eq $color')))
  (type $perm' (flags "read" "write" "exec"))
  (import "perm" (type $perm (eq $perm')))
  (type $shape' (variant (case "circle" f64) (case "rect" $point) (case "nothing")))
  (import "shape" (type $shape (eq $shape')))
  (type $doc' (record
    (field "id" u64)
    (field "name" string)
    (field "tags" (list string))
    (field "score" (option f64))
    (field "color" $color)
    (field "perms" $perm)
    (field "shapes" (list $shape))
    (field "pair" (tuple u8 char))
    (field "outcome" (result s64 (error string)))
    (field "nested" (option (option bool)))
    (field "ratio" f32)
    (field "small" s8)
    (field "medium" u16)
    (field "wide" s16)
    (field "count" u32)
    (field "delta" s32)
    (field "bytes" (list u8))
    (field "done" (result))))
  (import "doc" (type $doc (eq $doc')))
  (import "f-bool" (func (param "x" bool)))
  (import "f-s8" (func (param "x" s8)))
  (import "f-u8" (func (param "x" u8)))
  (import "f-s16" (func (param "x" s16)))
  (import "f-u16" (func (param "x" u16)))
  (import "f-s32" (func (param "x" s32)))
  (import "f-u32" (func (param "x" u32)))
  (import "f-s64" (func (param "x" s64)))
  (import "f-u64" (func (param "x" u64)))
  (import "f-f32" (func (param "x" f32)))
  (import "f-f64" (func (param "x" f64)))
  (import "f-char" (func (param "x" char)))
  (import "f-string" (func (param "x" string)))
  (import "f-bytes" (func (param "x" (list u8))))
  (import "f-maybe" (func (param "x" (option string))))
  (import "f-outcome" (func (param "x" (result (error string)))))
  (import "f-pair" (func (param "x" (tuple u32 string))))
  (import "f-point" (func (param "x" $point)))
  (import "f-color" (func (param "x" $color)))
  (import "f-perm" (func (param "x" $perm)))
  (import "f-shape" (func (param "x" $shape)))
  (import "f-doc" (func (param "x" $doc)))
  (import "f-docs" (func (param "x" (list $doc))))
  (import "f-deep" (func (param "x" (list (list (option (result $shape (error $color))))))))
)
"#;

fn types() -> &'static [Type] {
    static TYPES_OF: OnceLock<Vec<Type>> = OnceLock::new();
    TYPES_OF.get_or_init(|| {
        let engine = Engine::new(&Config::new()).expect("an engine");
        let component = Component::new(&engine, TYPES).expect("the type component");
        component
            .component_type()
            .imports(&engine)
            .filter_map(|(_, item)| match item.ty {
                ComponentItem::ComponentFunc(f) => f.params().next().map(|(_, ty)| ty),
                _ => None,
            })
            .collect()
    })
}

/// The JSON of `val`, with no limit.
fn json(val: &Val) -> serde_json::Value {
    val_to_json(val, &mut Budget::new(usize::MAX)).expect("every value of these types is JSON")
}

fuzz_target!(|data: &[u8]| {
    let [pick, budget, text @ ..] = data else {
        return;
    };
    let types = types();
    let ty = &types[usize::from(*pick) % types.len()];
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(text) else {
        return;
    };
    let Ok(val) = json_to_val(ty, &value) else {
        return;
    };
    assert!(val_matches(&val, ty), "a converted value is not of its type");
    let back = json(&val);
    let again = json_to_val(ty, &back).expect("the JSON of a value converts again");
    assert!(val_matches(&again, ty));
    assert_eq!(json(&again), back, "the round trip changed the value");
    // A budget either holds the whole encoding or says it was exceeded, past the budget.
    let limit = usize::from(*budget) * 4;
    match val_to_json(&val, &mut Budget::new(limit)) {
        Ok(within) => assert_eq!(within, back),
        Err(FromValError::TooLarge { at_least }) => assert!(at_least > limit),
        Err(FromValError::Unsupported(what)) => panic!("unsupported {what} in a plain value"),
    }
});
