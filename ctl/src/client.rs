//! A typed client of the control subjects.

use std::time::Duration;

use async_nats::{Client, RequestErrorKind};
use trellis_schemas::{CtlRequest, ErrorBody, Lattice, Reply, subject};

/// A control request failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// No controller is subscribed to the lattice's control subjects.
    #[error(
        "no controller is serving lattice {0}; start one with `trellis controller` or `trellis up`"
    )]
    NoController(Lattice),
    /// NATS refused the request: these credentials may not send it.
    #[error("permission denied: {0} (these credentials' role may not do this)")]
    Denied(String),
    /// No reply arrived in time.
    #[error("no reply from the controller within {0:?}")]
    Timeout(Duration),
    /// NATS failed.
    #[error("NATS request failed: {0}")]
    Transport(String),
    /// The reply was not a valid envelope.
    #[error("malformed reply from the controller: {0}")]
    Decode(String),
    /// The controller answered with an error.
    #[error("{0}")]
    Remote(ErrorBody),
}

impl ClientError {
    /// The remote error code, when the controller answered with one.
    pub fn code(&self) -> Option<trellis_schemas::ErrorCode> {
        match self {
            ClientError::Remote(e) => Some(e.code),
            _ => None,
        }
    }
}

/// Sends control requests to the controllers of one lattice.
#[derive(Debug, Clone)]
pub struct CtlClient {
    nats: Client,
    lattice: Lattice,
    timeout: Duration,
}

impl CtlClient {
    /// A client of `lattice` over `nats`, waiting at most `timeout` for each reply.
    pub fn new(nats: Client, lattice: Lattice, timeout: Duration) -> Self {
        Self {
            nats,
            lattice,
            timeout,
        }
    }

    /// The NATS client.
    pub fn nats(&self) -> &Client {
        &self.nats
    }

    /// The lattice this client talks to.
    pub fn lattice(&self) -> &Lattice {
        &self.lattice
    }

    /// Sends `request` and returns the controller's answer.
    pub async fn request<R: CtlRequest>(&self, request: &R) -> Result<R::Reply, ClientError> {
        let body = serde_json::to_vec(request).map_err(|e| ClientError::Decode(e.to_string()))?;
        let raw = self
            .request_raw(&subject::ctl(&self.lattice, R::OP), body)
            .await?;
        let reply: Reply<R::Reply> =
            serde_json::from_slice(&raw).map_err(|e| ClientError::Decode(e.to_string()))?;
        reply.into_result().map_err(ClientError::Remote)
    }

    /// Sends raw bytes to a control subject and returns the raw reply.
    pub async fn request_raw(&self, subject: &str, body: Vec<u8>) -> Result<Vec<u8>, ClientError> {
        let mut headers = async_nats::HeaderMap::new();
        if let Some(traceparent) = trellis_bus::telemetry::current() {
            headers.insert(
                trellis_bus::dataplane::NAMES.traceparent.clone(),
                traceparent.as_str(),
            );
        }
        trellis_bus::audit::sign_request(&mut headers, subject, &body);
        let mut violations = trellis_bus::permission_violations();
        let request = self
            .nats
            .request_with_headers(subject.to_owned(), headers, body.into());
        let request = async {
            tokio::select! {
                reply = request => Ok(reply),
                refused = trellis_bus::refused(&mut violations, subject) => Err(refused),
            }
        };
        match tokio::time::timeout(self.timeout, request).await {
            Ok(Err(refused)) => Err(ClientError::Denied(refused)),
            Err(_) => Err(ClientError::Timeout(self.timeout)),
            Ok(Ok(Ok(message))) => Ok(message.payload.to_vec()),
            Ok(Ok(Err(e))) => Err(match e.kind() {
                RequestErrorKind::NoResponders => ClientError::NoController(self.lattice.clone()),
                RequestErrorKind::TimedOut => ClientError::Timeout(self.timeout),
                _ => ClientError::Transport(e.to_string()),
            }),
        }
    }
}
