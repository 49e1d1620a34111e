//! An OTLP/HTTP trace receiver for tests: accepts `POST /v1/traces` with the protobuf
//! `ExportTraceServiceRequest` the OpenTelemetry exporters send, decodes it, and keeps every
//! span with the `service.name` of the process that sent it; or, for benchmarks, only counts
//! what it is sent ([`OtlpReceiver::start_counting`]), so that its own work on the machine's
//! cores stays small beside the senders'.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message as _;

/// A span as received, with the service that exported it.
#[derive(Debug, Clone)]
pub struct Received {
    /// `service.name` of the exporting process.
    pub service: String,
    /// The span.
    pub span: Span,
}

/// A running receiver; stops when dropped.
#[derive(Debug)]
pub struct OtlpReceiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Received>>>,
    counts: Arc<Counts>,
    task: tokio::task::JoinHandle<()>,
}

/// What a receiver was sent.
#[derive(Debug, Default)]
struct Counts {
    posts: AtomicU64,
    bytes: AtomicU64,
}

impl OtlpReceiver {
    /// Listens on a free loopback port, and decodes and keeps every span.
    pub async fn start() -> Self {
        Self::listen(true).await
    }

    /// Listens on a free loopback port, and only counts the requests and bytes posted to
    /// `/v1/traces` (see [`posts`](Self::posts)); keeps no span.
    pub async fn start_counting() -> Self {
        Self::listen(false).await
    }

    async fn listen(decode: bool) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
        let counts: Arc<Counts> = Arc::default();
        let kept = Arc::clone(&spans);
        let counted = Arc::clone(&counts);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let kept = Arc::clone(&kept);
                let counted = Arc::clone(&counted);
                tokio::spawn(async move {
                    let service =
                        service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                            let kept = Arc::clone(&kept);
                            let counted = Arc::clone(&counted);
                            async move {
                                let path = request.uri().path().to_owned();
                                let body = request.into_body().collect().await?.to_bytes();
                                let status = if path != "/v1/traces" {
                                    404
                                } else if !decode {
                                    counted.posts.fetch_add(1, Ordering::Relaxed);
                                    counted
                                        .bytes
                                        .fetch_add(body.len() as u64, Ordering::Relaxed);
                                    200
                                } else {
                                    match ExportTraceServiceRequest::decode(body) {
                                        Ok(export) => {
                                            keep(&kept, export);
                                            200
                                        }
                                        Err(_) => 400,
                                    }
                                };
                                let reply = ExportTraceServiceResponse::default().encode_to_vec();
                                let mut response =
                                    hyper::Response::new(Full::new(Bytes::from(reply)));
                                *response.status_mut() =
                                    hyper::StatusCode::from_u16(status).unwrap();
                                response.headers_mut().insert(
                                    hyper::header::CONTENT_TYPE,
                                    hyper::header::HeaderValue::from_static(
                                        "application/x-protobuf",
                                    ),
                                );
                                Ok::<_, hyper::Error>(response)
                            }
                        });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            spans,
            counts,
            task,
        }
    }

    /// Requests and bytes posted to a counting receiver so far.
    pub fn posts(&self) -> (u64, u64) {
        (
            self.counts.posts.load(Ordering::Relaxed),
            self.counts.bytes.load(Ordering::Relaxed),
        )
    }

    /// The endpoint to give exporters (`OTEL_EXPORTER_OTLP_ENDPOINT`).
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Received> {
        self.spans
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn keep(kept: &Mutex<Vec<Received>>, export: ExportTraceServiceRequest) {
    let mut kept = kept.lock().unwrap_or_else(PoisonError::into_inner);
    for resource_spans in export.resource_spans {
        let service = resource_spans
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(s) => Some(s.clone()),
                _ => None,
            })
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                kept.push(Received {
                    service: service.clone(),
                    span,
                });
            }
        }
    }
}
