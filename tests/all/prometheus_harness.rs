//! The Prometheus harness itself: a real Prometheus scrapes a tiny exposition served here, and the
//! sample comes back through its query API.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use trellis_tests::prometheus::Prometheus;

const EXPOSITION: &str =
    "# TYPE trellis_harness_probe counter\ntrellis_harness_probe_total{kind=\"x\"} 3\n";

/// Serves [`EXPOSITION`] on every path of a loopback port, until the test ends; returns the port.
async fn serve_exposition() -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|_request| async {
                    Ok::<_, Infallible>(
                        hyper::Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from_static(EXPOSITION.as_bytes())))
                            .unwrap(),
                    )
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    port
}

#[tokio::test]
async fn prometheus_scrapes_a_target_and_answers_queries() {
    let port = serve_exposition().await;
    let prometheus = Prometheus::start(&[("probe", format!("127.0.0.1:{port}"))]).await;
    prometheus.targets_up(Duration::from_secs(30)).await;
    let result = prometheus
        .wait_for_query(
            "the probe",
            "trellis_harness_probe_total",
            Duration::from_secs(30),
            |r| r[0]["value"][1] == "3",
        )
        .await;
    let series = result.as_array().unwrap();
    assert_eq!(series.len(), 1, "{result}");
    let labels = &series[0]["metric"];
    assert_eq!(labels["kind"], "x", "{result}");
    assert_eq!(labels["job"], "probe", "{result}");
    assert_eq!(
        labels["instance"],
        format!("127.0.0.1:{port}").as_str(),
        "{result}"
    );
}
