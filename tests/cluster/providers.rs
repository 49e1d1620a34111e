//! Providers on nodes that run no host: the `kv` and `http-server` providers, each on a node of
//! its own, serve instances on the three hosts across the network with the same assignment checks
//! as on one machine, and HTTP traffic through the provider recovers when the host of the instance
//! behind it is killed (the instance is relocated).

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use trellis_schemas::{FactData, FactKind};
use trellis_tests::cluster::Cluster;
use trellis_tests::{components, http_send, wait_for};

use crate::common::{HOST_TIMEOUT_D, T, of, placements, push_with_manifest, start, three_hosts};

/// The port the http-server provider listens on inside its container.
const LISTEN: u16 = 8080;

const KV_PROBE: &str = r#"
[component]
name = "kv-probe"
version = "1.0.0"

[limits]
max_memory = "16MiB"
fuel = 1_000_000_000
timeout = "5s"
max_concurrency = 8

[capabilities]
imports = ["wasi:keyvalue/store", "wasi:keyvalue/atomics", "wasi:keyvalue/batch", "wasi:logging/logging"]
"#;

/// Calls `export` of instance `id` with JSON `args`; returns the JSON result (`{"ok": …}` or
/// `{"err": …}`).
async fn call(cluster: &Cluster, id: &str, export: &str, args: Value) -> Value {
    let client = cluster.client().await;
    let args: Vec<String> = args
        .as_array()
        .unwrap()
        .iter()
        .map(Value::to_string)
        .collect();
    let text = trellis_ctl::workload::call_export(
        &client,
        &cluster.lattice,
        id,
        export,
        &args,
        Duration::from_secs(20),
    )
    .await
    .unwrap_or_else(|f| panic!("call {id} {export}: {}", f.message));
    serde_json::from_str(&text).unwrap()
}

/// `GET path` on 127.0.0.1:`port` over a fresh connection; returns (status, body).
async fn get(port: u16, path: &str) -> Option<(u16, String)> {
    let request = http::Request::get(format!("http://127.0.0.1:{port}{path}"))
        .body(String::new())
        .ok()?;
    let reply = http_send(request, Duration::from_secs(10)).await.ok()?;
    Some((reply.status, reply.body))
}

/// The count kv-counter answered, when it answered 200.
async fn count(port: u16) -> Option<u64> {
    match get(port, "/").await? {
        (200, body) => body.trim().strip_prefix("count: ")?.parse().ok(),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_on_other_nodes_serve_instances_across_the_network_and_traffic_survives_a_host_kill()
 {
    let mut cluster = three_hosts("providers").await;
    cluster
        .provider("p-kv", "kv", &["--provider-id", "kv-remote"])
        .await;
    cluster
        .provider_with_ports(
            "p-http",
            "http-server",
            &["--provider-id", "http-remote"],
            &[LISTEN],
        )
        .await;
    wait_for("both providers started", T, || async {
        let facts = cluster.facts().await;
        let started = facts
            .iter()
            .filter(|f| f.event.kind() == FactKind::ProviderStarted)
            .count();
        (started == 2).then_some(())
    })
    .await;

    // The same assignment checks across the network: without a grant the guest is denied; with
    // one it reaches its own bucket only.
    push_with_manifest(&cluster, "kv_probe", "kv-probe", KV_PROBE);
    let granted = placements(&start(
        &cluster,
        &["kv-probe", "--grant", "wasi:keyvalue bucket=remote-a"],
    ))[0]
        .0
        .clone();
    let denied = placements(&start(&cluster, &["kv-probe"]))[0].0.clone();
    assert_eq!(
        call(&cluster, &denied, "set", json!(["", "k", "v"])).await,
        json!({"err": "access-denied"})
    );
    assert_eq!(
        call(&cluster, &granted, "set", json!(["", "k", "v"])).await,
        json!({"ok": null})
    );
    assert_eq!(
        call(&cluster, &granted, "get", json!(["remote-a", "k"])).await,
        json!({"ok": "v"})
    );
    assert_eq!(
        call(&cluster, &granted, "get", json!(["remote-b", "k"])).await,
        json!({"err": "access-denied"}),
        "a bucket that was not granted"
    );

    // kv-counter behind the remote http-server, counting in the remote kv provider's bucket.
    let (wasm, manifest) = components::example("kv_counter");
    let (code, out, err) = cluster.cli(&[
        "component",
        "push",
        wasm.to_str().unwrap(),
        "--manifest",
        manifest.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}{err}");
    for (capability, config) in [
        ("wasi:keyvalue", "bucket=counts".to_owned()),
        (
            "wasi:http/incoming-handler",
            format!("address=0.0.0.0:{LISTEN}"),
        ),
    ] {
        let (code, out, err) = cluster.cli(&[
            "assignment",
            "grant",
            "component:kv-counter",
            capability,
            "--config",
            &config,
        ]);
        assert_eq!(code, 0, "grant {capability}: {out}{err}");
    }
    let started = start(&cluster, &["kv-counter", "--restart", "always"]);
    let (instance, host) = placements(&started)[0].clone();
    let port = cluster.host_port("p-http", LISTEN).await;
    let first = wait_for("kv-counter to answer over HTTP", T, || count(port)).await;
    let second = count(port).await.expect("a second request");
    assert_eq!(second, first + 1, "each request counts once");

    // Kill the instance's host: traffic stops, the instance is relocated, traffic comes back and
    // the count goes on from where it was (the state lives in the provider's bucket).
    let killed = Instant::now();
    cluster.kill(&host);
    let (after, to_serving) = wait_for("HTTP traffic to recover", T, || async {
        let n = count(port).await?;
        // A request served before the host died does not count as recovery.
        let facts = cluster.facts().await;
        (!of(&facts, FactKind::HostLost, &host).is_empty()).then(|| (n, killed.elapsed()))
    })
    .await;
    assert!(after > second, "the count went on: {second} then {after}");
    let facts = cluster.facts().await;
    let relocated = facts
        .iter()
        .find_map(|f| match &f.event.data {
            FactData::InstanceRelocated(d) if d.instance_id.as_str() == instance => Some(d),
            _ => None,
        })
        .expect("instance.relocated for the kv-counter instance");
    assert_eq!(relocated.from_host.as_str(), host);
    assert_ne!(relocated.to_host.as_str(), host);
    println!(
        "figure: host SIGKILL → HTTP through the remote http-server served again {} ms \
         (liveness timeout {} ms)",
        to_serving.as_millis(),
        HOST_TIMEOUT_D.as_millis()
    );
}
