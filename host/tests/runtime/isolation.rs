//! Every invocation runs in a fresh store: nothing survives between calls or crosses components.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::json;
use trellis_host::{CallContext, Limits, LineSource, LogSink, Runtime};

use crate::{config, limits, load, runtime, timed};

#[tokio::test]
async fn every_call_sees_a_fresh_store() {
    let runtime = runtime();
    let counter = load(&runtime, "counter", limits());
    for _ in 0..5 {
        assert_eq!(counter.invoke("increment", json!([])).await.unwrap(), 1);
    }
    assert_eq!(counter.invoke("peek", json!(null)).await.unwrap(), 0);
}

/// Memory slots are reset in place up to a bound and returned to the kernel beyond it: either
/// way the next store of the slot sees the guest's pristine memory, whether the last one wrote
/// inside its data (a 3 MiB zeroed static) or in heap it grew.
#[tokio::test]
async fn memory_written_by_a_call_is_pristine_for_the_next() {
    let runtime = runtime();
    let counter = load(&runtime, "counter", limits());
    for kib in [0, 64, 4096, 64, 0] {
        assert_eq!(
            counter.invoke("scribble", json!([kib])).await.unwrap(),
            0,
            "a call after one that dirtied {kib} KiB of heap saw dirty memory"
        );
    }
}

#[tokio::test]
async fn components_never_share_globals() {
    let runtime = runtime();
    let a = load(&runtime, "counter", limits());
    let b = load(&runtime, "counter", limits());
    for _ in 0..3 {
        assert_eq!(a.invoke("increment", json!([])).await.unwrap(), 1);
        assert_eq!(b.invoke("increment", json!([])).await.unwrap(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_are_isolated() {
    let runtime = runtime();
    let counter = load(&runtime, "counter", limits());
    let calls: Vec<_> = (0..12)
        .map(|_| {
            let counter = counter.clone();
            tokio::spawn(async move { counter.invoke("increment", json!([])).await })
        })
        .collect();
    for call in calls {
        // Up to max_concurrency (16) at once, so none is refused as busy.
        assert_eq!(call.await.unwrap().unwrap(), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_concurrency_limit_is_busy() {
    let runtime = runtime();
    let limits = Limits {
        max_concurrency: 1,
        ..timed(Duration::from_secs(2))
    };
    let looping = load(&runtime, "loop", limits);
    let first = tokio::spawn({
        let looping = looping.clone();
        async move { looping.invoke("run", json!(["x"])).await }
    });
    while looping.in_flight() == 0 {
        tokio::task::yield_now().await;
    }
    let err = looping.invoke("run", json!(["y"])).await.unwrap_err();
    assert_eq!(err.reason(), "busy", "{err}");
    assert!(!err.is_crash());
    assert_eq!(first.await.unwrap().unwrap_err().reason(), "timeout");
    assert_eq!(looping.in_flight(), 0);
}

/// When every slot of the host's pool is taken, an invocation is refused as `pool_full` with
/// the code `busy` (so the data plane tries another instance), not as an internal error; and
/// the slot comes back when the invocation holding it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_pool_answers_busy_and_gives_the_slot_back() {
    let mut one_slot = config(1);
    one_slot.max_fuel(1_000_000_000_000);
    let runtime = Runtime::new(&one_slot).unwrap();
    let looping_limits = Limits {
        max_concurrency: 2,
        ..timed(Duration::from_secs(2))
    };
    let looping = load(&runtime, "loop", looping_limits);
    let calls = (0..2).map(|i| {
        let looping = looping.clone();
        async move { looping.invoke("run", json!([i.to_string()])).await }
    });
    let mut reasons: Vec<_> = futures::future::join_all(calls)
        .await
        .into_iter()
        .map(|result| {
            let err = result.unwrap_err();
            if err.reason() == "pool_full" {
                assert_eq!(err.code(), trellis_schemas::dataplane::ErrorCode::Busy);
                assert!(!err.is_crash(), "{err}");
                assert!(err.to_string().contains("the host is full"), "{err}");
            }
            err.reason()
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons, ["pool_full", "timeout"]);
    let counter = load(&runtime, "counter", limits());
    assert_eq!(counter.invoke("increment", json!([])).await.unwrap(), 1);
}

#[tokio::test]
async fn wasi_grants_nothing_but_clocks_random_and_output() {
    let runtime = runtime();
    let probe = load(&runtime, "probe", limits());
    let report = probe.invoke("run", json!([""])).await.unwrap();
    let report = report.as_str().unwrap();
    for line in [
        "env=0",
        "args=0",
        "read_root=denied",
        "read_file=denied",
        "write_file=denied",
        "cwd_list=denied",
        "tcp_connect=denied",
        "udp_bind=denied",
        "stdin_bytes=0",
        "clock_ok=true",
    ] {
        assert!(
            report.lines().any(|l| l == line),
            "{line} missing in:\n{report}"
        );
    }
    assert!(!std::path::Path::new("/tmp/trellis-probe").exists());
}

/// The spare instance made ahead of an invocation is as fresh as one made for it, and serves
/// one invocation only: the next one made ahead starts over.
#[tokio::test]
async fn an_instance_made_ahead_is_fresh_and_serves_once() {
    let runtime = runtime();
    let counter = load(&runtime, "counter", limits());
    for kib in [4096, 0] {
        assert!(counter.warm().await, "no spare instance was made");
        assert_eq!(
            counter.invoke("scribble", json!([kib])).await.unwrap(),
            0,
            "an instance made ahead saw memory another call dirtied"
        );
    }
    for _ in 0..3 {
        assert!(counter.warm().await);
        assert_eq!(counter.invoke("increment", json!([])).await.unwrap(), 1);
        assert!(!counter.has_spare(), "the call did not take the spare");
    }
}

/// A caller that tidies after each answer finds the spare ready at its next call; without
/// spares nothing is made ahead; with a short idle time, an unused spare is given back.
#[tokio::test]
async fn tidying_makes_the_next_spare_which_an_idle_component_gives_back() {
    let mut config = config(8);
    config.spare_instances(false);
    let off = Runtime::new(&config).unwrap();
    let counter = load(&off, "counter", limits()).tidied_by_caller();
    assert!(!counter.warm().await);
    counter.invoke("increment", json!([])).await.unwrap();
    counter.tidy().await;
    assert!(!counter.has_spare());

    config
        .spare_instances(true)
        .spare_idle(Duration::from_millis(300));
    let idle = Runtime::new(&config).unwrap();
    let counter = load(&idle, "counter", limits()).tidied_by_caller();
    let mut asked = tokio::time::Instant::now();
    for _ in 0..3 {
        // The idle time counts from the last invocation that asked for a spare.
        asked = tokio::time::Instant::now();
        assert_eq!(counter.invoke("increment", json!([])).await.unwrap(), 1);
        assert!(!counter.has_spare());
        counter.tidy().await;
        assert!(counter.has_spare(), "tidying made no spare");
    }
    while counter.has_spare() {
        assert!(
            asked.elapsed() < Duration::from_secs(10),
            "an idle spare was kept"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        asked.elapsed() >= Duration::from_millis(300),
        "the spare was given back before the idle time"
    );
    assert_eq!(counter.invoke("increment", json!([])).await.unwrap(), 1);
}

/// A caller that tidies on another thread (as the micro-VM agent does on a guest's second
/// vCPU) races its next invocation against the spare being made: the invocation either waits
/// for that spare or makes its own, and in every case runs in a fresh instance, and one spare
/// at most is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invocation_racing_a_tidy_on_another_thread_runs_fresh() {
    let runtime = Runtime::new(&config(8)).unwrap();
    let counter = load(&runtime, "counter", limits()).tidied_by_caller();
    let (tidy, mut tidied) = tokio::sync::mpsc::unbounded_channel::<()>();
    let tidier = {
        let counter = counter.clone();
        let (send, mut asked) = tokio::sync::mpsc::unbounded_channel::<()>();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                while asked.recv().await.is_some() {
                    counter.tidy().await;
                    let _ = tidy.send(());
                }
            });
        });
        send
    };
    for round in 0..50 {
        let count = tokio::time::timeout(
            Duration::from_secs(10),
            counter.invoke("increment", json!([])),
        )
        .await
        .unwrap_or_else(|_| panic!("round {round}: the invocation hung"))
        .unwrap();
        assert_eq!(count, 1, "round {round}: an instance ran twice");
        tidier.send(()).unwrap();
        if round % 3 == 0 {
            // Sometimes the tidy ends first, and the next invocation takes its spare.
            tidied.recv().await.unwrap();
        }
    }
    drop(tidier);
    while tidied.recv().await.is_some() {}
    assert_eq!(counter.invoke("increment", json!([])).await.unwrap(), 1);
}

/// Invocations on several threads at once, never more of them than half the pool, all get a
/// slot: a slot given back is free for the next invocation on any thread, even while another
/// thread is returning slots to the kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slots_given_back_on_one_thread_serve_invocations_on_another() {
    let runtime = Runtime::new(&config(8)).unwrap();
    let limits = Limits {
        max_concurrency: 4,
        ..limits()
    };
    let counter = load(&runtime, "counter", limits);
    let callers = (0..4).map(|_| {
        let counter = counter.clone();
        tokio::spawn(async move {
            for round in 0..500 {
                let count = counter.invoke("increment", json!([])).await;
                assert_eq!(count.unwrap_or_else(|e| panic!("round {round}: {e}")), 1);
            }
        })
    });
    for caller in futures::future::join_all(callers).await {
        caller.unwrap();
    }
}

/// Spares and stores kept for tidying never take a slot an invocation needs: with a pool of
/// four slots, four invocations in flight at once all run, round after round, whether their
/// caller tidies after each or never does.
#[tokio::test]
async fn spares_leave_the_pool_to_invocations() {
    let runtime = Runtime::new(&config(4)).unwrap();
    let limits = Limits {
        max_concurrency: 4,
        ..limits()
    };
    let typed = load(&runtime, "typed", limits).tidied_by_caller();
    for round in 0..20 {
        let calls = (0..4).map(|i| {
            let typed = &typed;
            async move {
                let sum = typed.invoke("add", json!([round, i])).await;
                if round % 2 == 0 {
                    typed.tidy().await;
                }
                sum
            }
        });
        for (i, result) in futures::future::join_all(calls)
            .await
            .into_iter()
            .enumerate()
        {
            assert_eq!(result.unwrap(), json!(round + i), "round {round}, call {i}");
        }
    }
}

/// The wall-clock limit of an instance made ahead runs from its invocation, not from when it
/// was made, and still ends a guest that loops.
#[tokio::test]
async fn an_instance_made_ahead_is_timed_from_its_invocation() {
    let runtime = runtime();
    // Short enough to end the loop soon, long enough that a loaded machine runs the echo in it.
    let short = timed(Duration::from_secs(1));
    let typed = load(&runtime, "typed", short);
    assert!(typed.warm().await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(typed.invoke("echo", json!(["late"])).await.unwrap(), "late");
    let looping = load(&runtime, "loop", short);
    assert!(looping.warm().await);
    let err = looping.invoke("run", json!(["spin"])).await.unwrap_err();
    assert_eq!(err.reason(), "timeout", "{err}");
}

/// Lines a guest prints in an instance made ahead go to the log sink of the invocation that
/// takes it.
#[tokio::test]
async fn an_instance_made_ahead_logs_to_its_invocation() {
    #[derive(Default)]
    struct Lines(Mutex<Vec<String>>);
    impl LogSink for Lines {
        fn line(&self, _: LineSource<'_>, text: &str) {
            self.0.lock().unwrap().push(text.to_owned());
        }
    }
    let runtime = runtime();
    let printer = load(&runtime, "huge_output", limits());
    assert!(printer.warm().await);
    let lines = Arc::new(Lines::default());
    let call = printer.with_call(CallContext {
        log: Some(Arc::clone(&lines) as Arc<dyn LogSink>),
        traceparent: None,
    });
    call.invoke("run", json!(["1"])).await.unwrap();
    let lines = lines.0.lock().unwrap();
    assert_eq!(lines.len(), 2, "{lines:?}");
    assert!(lines.iter().all(|l| l == &"x".repeat(1023)));
}
