//! Prometheus metrics: one registry per process, served as text on `--metrics ADDR`.
//!
//! Every crate of a process registers its metrics here, once (live families for what is
//! counted as it happens, collectors for what is read off state at scrape time), so an
//! embedded provider's metrics are scraped from its host's endpoint with the host's own.
//! Names carry the `trellis_` prefix; the exposition format is OpenMetrics text, which
//! Prometheus scrapes natively.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{LazyLock, Mutex, PoisonError};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode, header};
use hyper_util::rt::TokioIo;
pub use prometheus_client;
use prometheus_client::collector::Collector;
use prometheus_client::registry::{Metric, Registry};

/// Buckets (seconds) of every latency histogram: 100 µs to 10 s.
pub const LATENCY_BUCKETS: [f64; 16] = [
    0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

static REGISTRY: LazyLock<Mutex<Registry>> =
    LazyLock::new(|| Mutex::new(Registry::with_prefix("trellis")));

/// Registers a live metric (a counter, gauge, histogram or a family of them) under
/// `trellis_<name>` and returns it; clones share its values.
pub fn register<M: Metric + Clone>(name: &str, help: &str, metric: M) -> M {
    REGISTRY
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .register(name, help, metric.clone());
    metric
}

/// Registers a collector, asked for its metrics at every scrape.
pub fn register_collector(collector: Box<dyn Collector>) {
    REGISTRY
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .register_collector(collector);
}

/// The process's metrics in the OpenMetrics text format.
pub fn encode() -> String {
    let mut text = String::new();
    let registry = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
    // Writing to a String cannot fail; a collector that fails leaves what it wrote.
    if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &registry) {
        tracing::warn!(error = %e, "a metric could not be encoded");
    }
    text
}

/// A live latency histogram with [`LATENCY_BUCKETS`].
pub fn latency_histogram() -> prometheus_client::metrics::histogram::Histogram {
    prometheus_client::metrics::histogram::Histogram::new(LATENCY_BUCKETS)
}

/// Serves `GET /metrics` on `addr` until the process ends; returns the address bound (so
/// port 0 picks a free one). Every other path answers 404.
///
/// # Errors
///
/// When `addr` cannot be bound.
pub async fn serve(addr: SocketAddr) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "metrics: accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            };
            tokio::spawn(async move {
                let service = service_fn(answer);
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                if let Err(e) = connection.await {
                    tracing::debug!(error = %e, "metrics: connection ended with an error");
                }
            });
        }
    });
    tracing::info!(addr = %bound, "serving metrics on /metrics");
    Ok(bound)
}

async fn answer(request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let response = if request.uri().path() == "/metrics" {
        Response::builder()
            .header(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )
            .body(Full::new(Bytes::from(encode())))
    } else {
        Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(Full::new(Bytes::from_static(b"metrics are on /metrics\n")))
    };
    Ok(response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))))
}

#[cfg(test)]
mod tests {
    use prometheus_client::metrics::counter::Counter;

    use super::*;

    #[test]
    fn registered_metrics_are_encoded_with_the_prefix() {
        let counter = register(
            "unit_probe",
            "A counter of this test",
            Counter::<u64>::default(),
        );
        counter.inc_by(3);
        let text = encode();
        assert!(
            text.contains("trellis_unit_probe_total 3"),
            "not in the exposition:\n{text}"
        );
        assert!(
            text.ends_with("# EOF\n"),
            "OpenMetrics text ends with # EOF"
        );
    }
}
