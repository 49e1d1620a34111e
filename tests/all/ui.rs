//! The dashboard (`trellis ui`) in headless Chromium: it loads without a console error, shows
//! the hosts and instances of a running lattice, charts invocations, and updates live when an
//! instance starts and when one crashes. The screenshot is kept as a test artifact.

use std::time::Duration;

use trellis_tests::browser::Browser;
use trellis_tests::{
    Nats, Proc, bin, bin_dir, components, free_port, http_request, lattice, wait_for,
};

const T: Duration = Duration::from_secs(30);

fn manifest(name: &str) -> String {
    format!(
        "[component]\nname = \"{name}\"\nversion = \"1.2.0\"\n\n[limits]\nmax_memory = \"16MiB\"\nfuel = 50_000_000\ntimeout = \"2s\"\nmax_concurrency = 8\n"
    )
}

#[tokio::test]
async fn dashboard_shows_the_lattice_and_follows_a_start_and_a_crash_in_a_browser() {
    let nats = Nats::start().await;
    let l = lattice("ui");
    let _controller = nats.controller(&l, "c1", "10s");
    let _host = nats.host(&l, "h1", &["zone=a"]);
    nats.wait_for_a_host(&l).await;
    let dir = tempfile::tempdir().unwrap();
    for (guest, name) in [("counter", "counter"), ("trap", "trapper")] {
        let toml = dir.path().join(format!("{name}.toml"));
        std::fs::write(&toml, manifest(name)).unwrap();
        nats.push(&l, &components::build().path(guest), &toml);
    }
    nats.cli_ok(&l, &["instance", "start", "counter", "--wait"]);

    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let _ui = Proc::spawn(
        "ui",
        &bin("trellis"),
        &[
            "--nats".into(),
            nats.connect_url(),
            "--lattice".into(),
            l.to_string(),
            "ui".into(),
            "--listen".into(),
            format!("127.0.0.1:{port}"),
        ],
        nats.logs(),
    );
    let snapshot = wait_for("the dashboard's first snapshot", T, || async {
        let reply = http_request("GET", &format!("{base}/api/snapshot"), "")
            .await
            .ok()?;
        (reply.status == 200).then_some(reply)
    })
    .await;
    let snapshot: serde_json::Value = serde_json::from_str(&snapshot.body).unwrap();
    assert_eq!(snapshot["lattice"], "ui");
    assert_eq!(snapshot["hosts"][0]["host_id"], "h1");

    // The page is served with a policy that allows only its own scripts; the dashboard is
    // read-only and answers only requests addressed to loopback.
    let page = http_request("GET", &format!("{base}/"), "").await.unwrap();
    assert_eq!(page.status, 200);
    let csp = page.headers["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("script-src 'self'"), "{csp}");
    let post = http_request("POST", &format!("{base}/api/snapshot"), "{}")
        .await
        .unwrap();
    assert_eq!(post.status, 405);
    let rebound = http::Request::builder()
        .uri(format!("{base}/api/snapshot"))
        .header("host", format!("attacker.example:{port}"))
        .body(String::new())
        .unwrap();
    let rebound = trellis_tests::http_send(rebound, T).await.unwrap();
    assert_eq!(rebound.status, 421);

    // A controller replica started with --ui serves the same dashboard.
    let replica_port = free_port();
    let _replica = Proc::spawn(
        "controller-c2",
        &bin("trellis"),
        &[
            "--nats".into(),
            nats.connect_url(),
            "--lattice".into(),
            l.to_string(),
            "controller".into(),
            "--replica-id".into(),
            "c2".into(),
            "--ui".into(),
            format!("127.0.0.1:{replica_port}"),
        ],
        nats.logs(),
    );
    let replica_view = wait_for("the controller's dashboard", T, || async {
        let reply = http_request(
            "GET",
            &format!("http://127.0.0.1:{replica_port}/api/snapshot"),
            "",
        )
        .await
        .ok()?;
        (reply.status == 200).then_some(reply.body)
    })
    .await;
    let replica_view: serde_json::Value = serde_json::from_str(&replica_view).unwrap();
    assert_eq!(replica_view["hosts"][0]["host_id"], "h1");

    let mut browser = Browser::start(1400, 1600).await;
    browser.open(&format!("{base}/")).await;
    browser
        .wait_until(
            "the live stream",
            T,
            "document.querySelector('#conn').dataset.state === 'live'",
        )
        .await;
    browser
        .wait_until(
            "host h1, up",
            T,
            r#"document.querySelector('tr[data-host="h1"][data-status="up"]')"#,
        )
        .await;
    browser
        .wait_until(
            "a running counter instance",
            T,
            r#"document.querySelector('tr[data-component="counter"][data-status="running"]')"#,
        )
        .await;
    let feed = browser
        .eval("document.querySelectorAll('#feed li[data-type=\"instance.started\"]').length")
        .await;
    assert!(feed.as_u64().unwrap() >= 1, "the feed shows past facts");

    // Invocations show in the chart's legend as a rate, from the hosts' heartbeats.
    for _ in 0..20 {
        nats.cli_ok(&l, &["call", "counter", "increment"]);
    }
    browser
        .wait_until(
            "a call rate for counter",
            T,
            r#"(() => { const li = document.querySelector('#legend li[data-component="counter"]');
                        return li && parseFloat(li.dataset.calls) > 0; })()"#,
        )
        .await;

    // A new instance appears as it starts, without reloading the page.
    let started = nats.cli_ok(
        &l,
        &[
            "instance",
            "start",
            "trapper",
            "--restart",
            "never",
            "--wait",
            "-o",
            "json",
        ],
    );
    let started: serde_json::Value = serde_json::from_str(&started).unwrap();
    let trapper = started["instances"][0]["instance_id"]
        .as_str()
        .unwrap()
        .to_owned();
    browser
        .wait_until(
            "the trapper instance, running",
            T,
            &format!(
                r#"document.querySelector('tr[data-instance="{trapper}"][data-status="running"]')"#
            ),
        )
        .await;

    // It crashes: its row says so, with the reason, and the feed shows the fact.
    let (code, _, err) = nats.cli(&["--lattice", l.as_str(), "call", &trapper, "run", "boom"]);
    assert_eq!(code, 1, "{err}");
    browser
        .wait_until(
            "the trapper instance, crashed",
            T,
            &format!(
                r#"document.querySelector('tr[data-instance="{trapper}"][data-status="crashed"]')"#
            ),
        )
        .await;
    let reason = browser
        .eval(&format!(
            r#"document.querySelector('tr[data-instance="{trapper}"] td.reason').textContent"#
        ))
        .await;
    assert!(
        reason.as_str().unwrap().contains("unreachable"),
        "the row gives the crash's reason: {reason}"
    );
    browser
        .wait_until(
            "instance.crashed in the feed",
            T,
            "document.querySelector('#feed li[data-type=\"instance.crashed\"]')",
        )
        .await;
    // The counter instance is untouched.
    assert!(
        !browser
            .eval(r#"document.querySelector('tr[data-component="counter"][data-status="running"]') === null"#)
            .await
            .as_bool()
            .unwrap()
    );

    let shot = bin_dir().join("test-artifacts").join("dashboard.png");
    browser.screenshot(&shot).await;
    eprintln!("dashboard screenshot: {}", shot.display());
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    assert!(
        browser.problems().is_empty(),
        "the page logged errors: {:?}",
        browser.problems()
    );
}
