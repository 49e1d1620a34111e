//! Each adversarial guest ends only its own invocation, with a precise reason.

use std::time::Duration;

use serde_json::json;
use trellis_host::{InvokeError, Limits};

use crate::{assert_still_serving, limits, load, runtime, timed};

#[tokio::test]
async fn infinite_loop_runs_out_of_fuel() {
    let runtime = runtime();
    let looping = load(
        &runtime,
        "loop",
        Limits {
            fuel: 5_000_000,
            ..limits()
        },
    );
    let err = looping.invoke("run", json!(["spin"])).await.unwrap_err();
    assert_eq!(err.reason(), "fuel_exhausted", "{err}");
    assert!(matches!(
        err,
        InvokeError::FuelExhausted {
            fuel: 5_000_000,
            ..
        }
    ));
    assert!(err.is_crash());
    assert_still_serving(&runtime).await;
}

#[tokio::test]
async fn infinite_loop_times_out() {
    let runtime = runtime();
    let limits = timed(Duration::from_millis(200));
    let looping = load(&runtime, "loop", limits);
    let err = looping.invoke("run", json!(["spin"])).await.unwrap_err();
    assert_eq!(err.reason(), "timeout", "{err}");
    assert_still_serving(&runtime).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_looping_guest_does_not_block_the_executor() {
    let runtime = runtime();
    let limits = timed(Duration::from_millis(300));
    let looping = load(&runtime, "loop", limits);
    let typed = load(&runtime, "typed", crate::limits());
    // Two loops and a normal call at once: the normal call completes while the loops spin.
    let a = tokio::spawn({
        let looping = looping.clone();
        async move { looping.invoke("run", json!(["a"])).await }
    });
    let b = tokio::spawn({
        let looping = looping.clone();
        async move { looping.invoke("run", json!(["b"])).await }
    });
    assert_eq!(typed.invoke("echo", json!(["hi"])).await.unwrap(), "hi");
    assert_eq!(a.await.unwrap().unwrap_err().reason(), "timeout");
    assert_eq!(b.await.unwrap().unwrap_err().reason(), "timeout");
}

#[tokio::test]
async fn memory_bomb_hits_the_memory_limit() {
    let runtime = runtime();
    let limit = 8 * 1024 * 1024;
    let bomb = load(
        &runtime,
        "membomb",
        Limits {
            max_memory: limit,
            ..limits()
        },
    );
    let err = bomb.invoke("run", json!([""])).await.unwrap_err();
    assert_eq!(err.reason(), "memory_limit", "{err}");
    match err {
        InvokeError::MemoryLimit {
            limit: l, desired, ..
        } => {
            assert_eq!(l, limit);
            assert!(desired as u64 > limit);
        }
        other => panic!("unexpected {other}"),
    }
    // The same guest within its limit succeeds: it is the limit that stopped it.
    let ok = bomb.invoke("run", json!(["2"])).await.unwrap();
    assert_eq!(ok, "allocated 2097152 bytes");
    assert_still_serving(&runtime).await;
}

#[tokio::test]
async fn deep_recursion_overflows_the_stack() {
    let runtime = runtime();
    let recursion = load(&runtime, "recursion", limits());
    let err = recursion
        .invoke("run", json!(["100000000"]))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "stack_overflow", "{err}");
    // Shallow recursion is fine.
    assert!(recursion.invoke("run", json!(["100"])).await.is_ok());
    assert_still_serving(&runtime).await;
}

#[tokio::test]
async fn traps_are_reported_with_their_code() {
    let runtime = runtime();
    let trap = load(&runtime, "trap", limits());
    let err = trap
        .invoke("run", json!(["unreachable"]))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "trap: unreachable", "{err}");
    assert!(matches!(
        err,
        InvokeError::Trap {
            trap: wasmtime::Trap::UnreachableCodeReached,
            ..
        }
    ));
    let err = trap
        .invoke("run", json!(["out_of_bounds"]))
        .await
        .unwrap_err();
    assert_eq!(err.reason(), "trap: memory_out_of_bounds", "{err}");
    assert_eq!(trap.invoke("run", json!(["ok"])).await.unwrap(), "no trap");
    assert_still_serving(&runtime).await;
}

#[tokio::test]
async fn a_panic_is_reported_with_its_message() {
    let runtime = runtime();
    let panicking = load(&runtime, "panic", limits());
    let err = panicking.invoke("run", json!(["boom"])).await.unwrap_err();
    assert_eq!(err.reason(), "panic", "{err}");
    match &err {
        InvokeError::Panic { message, output } => {
            assert_eq!(message, "guest gave up: boom");
            assert!(output.stderr.contains("panicked at"), "{}", output.stderr);
            assert!(output.stderr.contains("guest gave up: boom"));
            assert_eq!(output.stdout, "about to panic\n");
        }
        other => panic!("unexpected {other}"),
    }
    assert!(err.to_string().contains("guest gave up: boom"));
    assert_still_serving(&runtime).await;
}

#[tokio::test]
async fn huge_output_is_bounded() {
    let mut config = crate::config(8);
    config.max_result_bytes(64 * 1024).max_log_bytes(4096);
    let runtime = trellis_host::Runtime::new(&config).unwrap();
    let huge = load(&runtime, "huge_output", limits());

    // 1 MiB result: refused, and the captured logs stay bounded.
    let err = huge.invoke("run", json!(["1024"])).await.unwrap_err();
    assert_eq!(err.reason(), "output_too_large", "{err}");
    let output = err.output().unwrap();
    assert!(output.stdout.len() < 4096 + 100, "{}", output.stdout.len());
    assert!(
        output.stdout.ends_with("bytes truncated]"),
        "{}",
        &output.stdout[4000..]
    );
    assert!(output.stderr.ends_with("bytes truncated]"));

    // 8 KiB result: returned, logs truncated with the marker.
    let small = huge.invoke_captured("run", json!(["8"])).await.unwrap();
    assert_eq!(small.value.as_str().unwrap().len(), 8 * 1024);
    assert!(small.output.stdout.starts_with("xxxx"));
    assert!(
        small.output.stdout.ends_with("[... 4096 bytes truncated]"),
        "{}",
        small.output.stdout
    );
    assert_still_serving(&runtime).await;
}
