//! The egress seam: what a running job's outbound calls are recorded as
//! ([`CallsReport`], in its report).

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
