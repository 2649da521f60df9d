//! Outbound requests over the worker channel (placeholder until the
//! crossing is written: every request is refused).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::UnboundedSender;

use crate::job::egress::{CallsReport, Egress, EgressError, EgressFuture};

/// Worker → gateway call traffic.
#[derive(Debug, Serialize, Deserialize)]
pub enum CallUp {}

/// Gateway → worker call traffic.
#[derive(Debug, Serialize, Deserialize)]
pub enum CallDown {}

/// A breach of the calls protocol by a worker.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Violation(pub String);

/// The worker's side.
#[derive(Debug)]
pub struct WorkerCalls;

impl WorkerCalls {
    /// Calls go up through `tx`.
    pub fn new(_tx: UnboundedSender<CallUp>) -> Self {
        Self
    }

    /// The job's egress.
    pub fn egress(&self, _job: u64) -> Arc<dyn Egress> {
        Arc::new(Refused)
    }

    /// One frame from the gateway.
    pub fn deliver(&self, down: CallDown) {
        match down {}
    }
}

#[derive(Debug)]
struct Refused;

impl Egress for Refused {
    fn start(&self, _deadline: std::time::Instant) {}
    fn send(
        self: Arc<Self>,
        _request: http::Request<crate::job::egress::EgressBody>,
    ) -> EgressFuture {
        Box::pin(async { Err(EgressError::Denied) })
    }
    fn report(&self) -> CallsReport {
        CallsReport::default()
    }
}

/// The gateway's side.
#[derive(Debug)]
pub struct GatewayCalls;

impl GatewayCalls {
    /// Answers go down through `tx`.
    pub fn new(_tx: UnboundedSender<CallDown>) -> Self {
        Self
    }

    /// A job's egress, from its start.
    pub fn register(&self, _job: u64, _egress: Arc<dyn Egress>, _wall_time: Duration) {}

    /// The job is over.
    pub fn unregister(&self, _job: u64) {}

    /// One frame from the worker.
    ///
    /// # Errors
    /// [`Violation`].
    pub fn deliver(&self, up: CallUp) -> Result<(), Violation> {
        match up {}
    }
}
