//! Two example internal services that accept only Bulkhead call tokens.
//!
//! - `palette` ([`palette_router`]): what the thumbnail module may call.
//!   `GET /v1/palette` answers the caller's per-tenant frame colour.
//! - `payments` ([`payments_router`]): a sensitive service no guest may reach.
//!   `GET /v1/balance`, `POST /v1/charge`.
//!
//! Every request goes through one middleware before routing: it takes the
//! bearer token from `Authorization`, checks it with a
//! [`bulkhead_verify::Verifier`], records the request and the verdict in the
//! service's [`CallLog`], and answers 401 unless the token is valid. Handlers
//! read the caller's identity only from the verified [`CallClaims`]; no
//! response ever carries the token or the `Authorization` header.
//!
//! The host's end-to-end tests start these routers in-process on loopback
//! listeners and read the [`CallLog`] directly (it is not served over HTTP);
//! the `bulkhead-example-service` binary runs one of them for the README
//! walkthrough, with keys fetched from the host's JWKS ([`jwks`]).

use std::sync::Arc;

use bulkhead_verify::Verifier;
pub use bulkhead_verify::{CallClaims, VerifyError};

mod auth;
pub mod jwks;
mod log;
mod routes;

pub use jwks::{JwksError, JwksSource, KeyRefresher, fetch_jwks};
pub use log::{CallLog, DEFAULT_LOG_CAPACITY, MAX_RECORDED_VALUE_BYTES, Received, Verdict};
pub use routes::{frame_colour, palette_router, payments_router};

/// What a service's handlers share: the verifier, the log of received
/// requests, and optionally the key refresher an unknown `kid` may wake.
#[derive(Clone, Debug)]
pub struct ServiceState {
    verifier: Arc<Verifier>,
    log: CallLog,
    refresher: Option<Arc<KeyRefresher>>,
}

impl ServiceState {
    /// A state around `verifier`, with a new [`CallLog`] of
    /// [`DEFAULT_LOG_CAPACITY`] entries and no key refresher.
    pub fn new(verifier: Arc<Verifier>) -> Self {
        Self {
            verifier,
            log: CallLog::new(DEFAULT_LOG_CAPACITY),
            refresher: None,
        }
    }

    /// Uses `log` instead of a fresh one (to share one log between routers).
    pub fn with_log(mut self, log: CallLog) -> Self {
        self.log = log;
        self
    }

    /// On a token whose `kid` is unknown, asks `refresher` for the host's
    /// current keys (at most once per its minimum interval) and verifies the
    /// token again, so a key the host has just rotated in is picked up.
    pub fn with_refresher(mut self, refresher: Arc<KeyRefresher>) -> Self {
        self.refresher = Some(refresher);
        self
    }

    /// The verifier.
    pub fn verifier(&self) -> &Arc<Verifier> {
        &self.verifier
    }

    /// The log of received requests.
    pub fn log(&self) -> &CallLog {
        &self.log
    }
}
