//! JSON arguments and results, converted by the export's types.

use serde_json::json;
use trellis_host::{InvokeError, LoadedComponent};

use crate::{limits, load, runtime};

fn typed() -> LoadedComponent {
    load(&runtime(), "typed", limits())
}

#[tokio::test]
async fn lists_exports_with_their_parameters() {
    let typed = typed();
    let names: Vec<String> = typed.exports().into_iter().map(|e| e.name).collect();
    assert_eq!(
        names,
        [
            "add",
            "echo",
            "noop",
            "trellis:test/shapes#check",
            "trellis:test/shapes#describe",
            "trellis:test/shapes#invert",
            "trellis:test/shapes#scale",
            "trellis:test/shapes#swap",
        ]
    );
    let add = typed
        .exports()
        .into_iter()
        .find(|e| e.name == "add")
        .unwrap();
    assert_eq!(add.params, ["a", "b"]);
    assert_eq!(add.results, 1);
}

#[tokio::test]
async fn converts_scalars_and_strings() {
    let typed = typed();
    assert_eq!(typed.invoke("add", json!([-7, 3])).await.unwrap(), -4);
    assert_eq!(
        typed.invoke("add", json!([i32::MAX, 1])).await.unwrap(),
        i32::MIN
    );
    assert_eq!(
        typed.invoke("echo", json!(["héllo ✓"])).await.unwrap(),
        "héllo ✓"
    );
    assert_eq!(typed.invoke("noop", json!([])).await.unwrap(), json!(null));
}

#[tokio::test]
async fn converts_records_lists_and_options() {
    let typed = typed();
    let scaled = typed
        .invoke(
            "trellis:test/shapes#scale",
            json!([[{"x": 1, "y": -2, "label": "a"}, {"x": 3, "y": 4}], 10]),
        )
        .await
        .unwrap();
    assert_eq!(
        scaled,
        json!([{"x": 10, "y": -20, "label": "a"}, {"x": 30, "y": 40, "label": null}])
    );
    // The interface may also be separated from the function by a slash.
    let empty = typed
        .invoke("trellis:test/shapes/scale", json!([[], 2]))
        .await
        .unwrap();
    assert_eq!(empty, json!([]));
}

#[tokio::test]
async fn converts_enums_flags_variants_results_and_tuples() {
    let typed = typed();
    let shapes = "trellis:test/shapes#";
    let describe = format!("{shapes}describe");
    assert_eq!(
        typed
            .invoke(
                &describe,
                json!(["green", ["read", "exec"], {"circle": 1.5}])
            )
            .await
            .unwrap(),
        "Color::Green [read,exec] circle r=1.5"
    );
    assert_eq!(
        typed
            .invoke(&describe, json!(["red", [], {"rect": [2.0, 3.5]}]))
            .await
            .unwrap(),
        "Color::Red [] rect 2x3.5"
    );
    assert_eq!(
        typed
            .invoke(&describe, json!(["blue", ["write"], "empty"]))
            .await
            .unwrap(),
        "Color::Blue [write] empty"
    );
    let check = format!("{shapes}check");
    assert_eq!(
        typed.invoke(&check, json!([2, "A"])).await.unwrap(),
        json!({"ok": 130})
    );
    assert_eq!(
        typed.invoke(&check, json!([0, "é"])).await.unwrap(),
        json!({"err": "n must not be zero (c = é)"})
    );
    assert_eq!(
        typed
            .invoke(
                &format!("{shapes}swap"),
                json!([[true, -9_000_000_000_i64]])
            )
            .await
            .unwrap(),
        json!([-9_000_000_000_i64, true])
    );
    assert_eq!(
        typed
            .invoke(&format!("{shapes}invert"), json!([["read"], "blue"]))
            .await
            .unwrap(),
        json!([["write", "exec"], "red"])
    );
}

#[tokio::test]
async fn unknown_export_lists_the_available_ones() {
    let typed = typed();
    let err = typed.invoke("subtract", json!([1, 2])).await.unwrap_err();
    assert_eq!(err.reason(), "unknown_export");
    let message = err.to_string();
    assert!(message.contains("\"subtract\""), "{message}");
    assert!(message.contains("add, echo, noop"), "{message}");
    assert!(message.contains("trellis:test/shapes#scale"), "{message}");
}

#[tokio::test]
async fn wrong_argument_count_or_shape_is_refused() {
    let typed = typed();
    let err = typed.invoke("add", json!([1])).await.unwrap_err();
    assert_eq!(err.reason(), "invalid_arguments");
    assert!(matches!(
        err,
        InvokeError::ArgumentCount {
            expected: 2,
            got: 1,
            ..
        }
    ));
    assert!(err.to_string().contains("(a, b)"), "{err}");
    let err = typed
        .invoke("add", json!({"a": 1, "b": 2}))
        .await
        .unwrap_err();
    assert!(
        matches!(err, InvokeError::ArgumentsNotArray { expected: 2, .. }),
        "{err}"
    );
}

#[tokio::test]
async fn wrong_types_name_the_parameter_and_the_expectation() {
    let typed = typed();
    let cases = [
        (
            "add",
            json!([1, "two"]),
            "argument 1 (b): expected an integer in -2147483648..=2147483647 (s32), found string \"two\"",
        ),
        (
            "add",
            json!([1, 2.5]),
            "argument 1 (b): expected an integer",
        ),
        (
            "add",
            json!([3_000_000_000_u64, 1]),
            "argument 0 (a): expected an integer in -2147483648..=2147483647 (s32), found number 3000000000",
        ),
        (
            "trellis:test/shapes#check",
            json!([256, "a"]),
            "argument 0 (n): expected an integer in 0..=255 (u8)",
        ),
        (
            "trellis:test/shapes#check",
            json!([1, "ab"]),
            "argument 1 (c): expected a string of one character",
        ),
        (
            "trellis:test/shapes#describe",
            json!(["purple", [], "empty"]),
            "argument 0 (c): expected one of [\"red\", \"green\", \"blue\"], found string \"purple\"",
        ),
        (
            "trellis:test/shapes#describe",
            json!(["red", ["read", "fly"], "empty"]),
            "argument 1 (p): at [1]: expected an array of flag names",
        ),
        (
            "trellis:test/shapes#describe",
            json!(["red", [], {"square": 1}]),
            "argument 2 (s): expected {\"case\": payload} with a case among [\"circle\", \"rect\", \"empty\"]",
        ),
        (
            "trellis:test/shapes#describe",
            json!(["red", [], {"rect": [1.0]}]),
            "argument 2 (s): at .rect: expected an array of 2 elements (tuple)",
        ),
        (
            "trellis:test/shapes#scale",
            json!([[{"x": 1}], 2]),
            "argument 0 (points): at [0].y: expected an integer",
        ),
        (
            "trellis:test/shapes#scale",
            json!([[{"x": 1, "y": 2, "z": 3}], 2]),
            "unknown field \"z\"",
        ),
        (
            "trellis:test/shapes#scale",
            json!([[{"x": 1, "y": 2, "label": 7}], 2]),
            "at [0].label: expected a string, found number 7",
        ),
        (
            "trellis:test/shapes#swap",
            json!([[1, 2]]),
            "argument 0 (pair): at [0]: expected a boolean, found number 1",
        ),
    ];
    for (export, args, expected) in cases {
        let err = typed.invoke(export, args.clone()).await.unwrap_err();
        assert_eq!(err.reason(), "invalid_arguments", "{export} {args}");
        let message = err.to_string();
        assert!(
            message.contains(expected),
            "{export} {args}:\n  got      {message}\n  expected {expected}"
        );
    }
}
