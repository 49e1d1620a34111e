//! Rollout benchmark: how long traffic takes to move, under load, with no request failed.
//!
//! Three instances of `web` 1.0.0 on two hosts behind the `http-server` provider, 16 keep-alive
//! connections asking as fast as they are answered. Each run measures, from the moment the
//! control request is sent to the last response of the version being left:
//!
//! - a rolling update of the 3 instances to 2.0.0 (artifact already on the hosts, no pauses):
//!   start → 100 % served by the new version;
//! - `rollout undo` of that update (itself a rolling rollout): undo → 100 % by the old version;
//! - a blue-green rollout to 2.0.0, promoted at once and keeping the old set, then `rollout
//!   undo`: undo → 100 % by the old version (an instant switch of the weights).
//!
//! Every response is counted; the failures are reported (the goal is 0). `TRELLIS_BENCH_RUNS`
//! (default 3) repeats the whole sequence.
//!
//! Run: `cargo build --release --bins && cargo bench --bench rollout`.
#![allow(clippy::unwrap_used, clippy::expect_used, reason = "benchmark")]

use std::time::{Duration, Instant};

use trellis_schemas::control::{RolloutStartRequest, RolloutUndoRequest};
use trellis_schemas::rollout::Strategy;
use trellis_schemas::{ComponentName, RolloutId};
use trellis_tests::bench::env_usize;
use trellis_tests::rollout::{Load, RolloutLattice, T, V1, V2};
use trellis_tests::wait_for;

fn request(to: &str, strategy: Strategy) -> RolloutStartRequest {
    RolloutStartRequest {
        component: ComponentName::new("web").unwrap(),
        to: to.to_owned(),
        strategy,
        max_surge: None,
        max_unavailable: None,
        steps: Vec::new(),
        pause_ms: None,
        auto_promote_after_ms: Some(0),
        keep_previous_ms: Some(60_000),
        analysis: None,
    }
}

/// Waits until rollout `id` has status `status`.
async fn reaches(lat: &RolloutLattice, id: &RolloutId, status: &str) {
    wait_for(&format!("rollout {id} {status}"), T, || async {
        let r = lat.json(&["rollout", "status", id.as_str()]);
        (r["status"] == status).then_some(())
    })
    .await;
}

#[tokio::main]
async fn main() {
    let runs = env_usize("TRELLIS_BENCH_RUNS", 3);
    let lat = RolloutLattice::up("bench-rollout", &["h1", "h2"]).await;
    let dir = tempfile::tempdir().unwrap();
    lat.push_versions(dir.path());
    let port = lat.serve_v1(3).await;
    let ctl = lat.nats.ctl(&lat.l).await;
    let (load, tasks) = Load::start(port, "/", 16);
    load.settles_on(V1, "version 1 serving").await;
    let component = ComponentName::new("web").unwrap();

    println!("run  rolling start→new  rolling undo→old  blue-green undo→old  failed");
    for run in 1..=runs {
        let before = load.counts().2;

        let t0 = Instant::now();
        let reply = ctl
            .request(&request("2.0.0", Strategy::Rolling))
            .await
            .unwrap();
        reaches(&lat, &reply.rollout_id, "completed").await;
        load.settles_on(V2, "version 2").await;
        let rolling = load.last_of_after(V1, t0);

        let t0 = Instant::now();
        let reply = ctl
            .request(&RolloutUndoRequest {
                component: component.clone(),
            })
            .await
            .unwrap();
        reaches(&lat, &reply.rollout_id, "completed").await;
        load.settles_on(V1, "version 1").await;
        let rolling_undo = load.last_of_after(V2, t0);

        let reply = ctl
            .request(&request("2.0.0", Strategy::BlueGreen))
            .await
            .unwrap();
        reaches(&lat, &reply.rollout_id, "promoted").await;
        load.settles_on(V2, "version 2").await;
        let t0 = Instant::now();
        ctl.request(&RolloutUndoRequest {
            component: component.clone(),
        })
        .await
        .unwrap();
        reaches(&lat, &reply.rollout_id, "rolled_back").await;
        load.settles_on(V1, "version 1").await;
        let blue_green_undo = load.last_of_after(V2, t0);

        let failed = load.counts().2 - before;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        println!(
            "{run:>3}  {:>15.1} ms  {:>13.1} ms  {:>16.1} ms  {failed:>6}",
            ms(rolling),
            ms(rolling_undo),
            ms(blue_green_undo)
        );
    }
    load.stop(tasks).await;
    let (v1, v2, failed) = load.counts();
    println!("responses counted in the last window: v1 {v1}, v2 {v2}; failed in all: {failed}");
}
