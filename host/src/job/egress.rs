//! The egress seam: the interface a running job's outbound requests leave
//! through ([`Egress`]), its error ([`EgressError`]), and what the calls
//! are recorded as ([`CallsReport`], in the job's report).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// Most call records kept in one report; later ones are only counted.
pub const MAX_RECORDS: usize = 64;

/// What the job's outbound calls did, in its report.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CallsReport {
    /// Calls sent to a service.
    pub made: u32,
    /// Requests refused by the gate (or whose answer was withheld).
    pub refused: u32,
    /// Request body bytes sent.
    pub bytes_sent: u64,
    /// Response body bytes received.
    pub bytes_received: u64,
    /// Each call, in order, up to [`MAX_RECORDS`].
    pub records: Vec<CallRecord>,
    /// Calls beyond [`MAX_RECORDS`], counted but not listed.
    pub records_dropped: u32,
}

/// One outbound request and what became of it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CallRecord {
    /// Method.
    pub method: String,
    /// The URL as the guest wrote it (bounded).
    pub target: String,
    /// The declared service it resolved to, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// The service's status code, if it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Why the gate refused it (or withheld the answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refused: Option<String>,
    /// Refusal class (`raw_ip`, `not_granted`, `redirect`, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub class: Option<String>,
    /// Why the call failed after it was admitted (timeout, connection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Headers (and `trailer:`-prefixed trailer fields) the guest set that
    /// were not forwarded: everything outside the allow-list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stripped_headers: Vec<String>,
}

/// The body of a request or response crossing the seam.
pub type EgressBody = http_body_util::combinators::UnsyncBoxBody<Bytes, EgressError>;

/// A response on its way back through the seam.
pub type EgressFuture =
    Pin<Box<dyn Future<Output = Result<http::Response<EgressBody>, EgressError>> + Send>>;

/// One job's way out: the sandbox's guest-facing `wasi:http` half hands
/// each outbound request of the job to it, and gets back the response the
/// guest may see (or why not). The gateway's side (the relay's
/// `CallGrant`) checks the route, strips the guest's credentials, mints
/// the call's token, sends, bounds and scans; nothing of that, and no key,
/// is on the sandbox's side of this trait. Built per job by whoever
/// submits it, and handed to the sandbox beside the [`JobSpec`](super::JobSpec).
///
/// Everything crossing it is plain `http` types, bytes and
/// [`EgressError`], so a channel to another process can implement it.
pub trait Egress: Send + Sync + std::fmt::Debug {
    /// Starts the job's clock: no call outlives `deadline`, and no token
    /// is valid past it.
    fn start(&self, deadline: Instant);

    /// Sends one request of the guest; the response's body is bounded and
    /// checked as it streams.
    fn send(self: Arc<Self>, request: http::Request<EgressBody>) -> EgressFuture;

    /// What the job's calls did so far, for its report.
    fn report(&self) -> CallsReport;
}

/// Why an outbound request got no response, or its body failed, as the
/// guest is told. The sandbox maps each to the `wasi:http` error code of
/// the same name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum EgressError {
    /// The gate refused the request or withheld its answer (the job's
    /// report says why).
    #[error("the request was refused")]
    Denied,
    /// The host could not complete it (for example, sign it).
    #[error("the host failed on the request{}", .0.as_deref().map(|m| format!(": {m}")).unwrap_or_default())]
    Internal(Option<String>),
    /// The request's URL could not be rewritten to the service's.
    #[error("the request's uri is invalid")]
    UriInvalid,
    /// No response within the call's timeout.
    #[error("connection timeout")]
    ConnectionTimeout,
    /// The service could not be reached.
    #[error("connection refused")]
    ConnectionRefused,
    /// The response body stalled past the call's timeout.
    #[error("connection read timeout")]
    ConnectionReadTimeout,
    /// The exchange with the service failed.
    #[error("http protocol error")]
    Protocol,
    /// The request body is larger than the service accepts (bytes seen).
    #[error("request body size exceeds the limit{}", .0.map(|n| format!(": {n} bytes")).unwrap_or_default())]
    RequestBodySize(Option<u64>),
    /// The response body is larger than the service may send (bytes seen).
    #[error("response body size exceeds the limit{}", .0.map(|n| format!(": {n} bytes")).unwrap_or_default())]
    ResponseBodySize(Option<u64>),
    /// The response's headers the guest would be given are larger than a
    /// headers resource holds (their bytes).
    #[error("response header section size exceeds the limit{}", .0.map(|n| format!(": {n} bytes")).unwrap_or_default())]
    ResponseHeaderSize(Option<u32>),
    /// The guest's own request body failed, as the guest's runtime said.
    #[error("{0}")]
    Body(String),
}
