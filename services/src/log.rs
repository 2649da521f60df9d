//! [`CallLog`]: an in-memory, bounded record of every request a service
//! received and what verification decided. Read in-process by tests; never
//! served over HTTP and never written to the tracing log (it holds raw
//! tokens).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};

use bulkhead_verify::{CallClaims, VerifyError};

/// Entries a [`CallLog`] keeps by default.
pub const DEFAULT_LOG_CAPACITY: usize = 1024;

/// Longest header value (and token) recorded, in bytes; longer ones are cut
/// at a character boundary. Tokens that long are refused anyway
/// ([`bulkhead_verify::MAX_TOKEN_BYTES`]).
pub const MAX_RECORDED_VALUE_BYTES: usize = 8 * 1024;

/// What verification decided for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The token verified; these are its claims.
    Verified(CallClaims),
    /// A bearer token was presented and refused.
    Rejected(VerifyError),
    /// No `Authorization` header, or not exactly one with the `Bearer`
    /// scheme.
    NoCredentials,
}

impl Verdict {
    /// The claims, if the token verified.
    pub fn claims(&self) -> Option<&CallClaims> {
        match self {
            Self::Verified(claims) => Some(claims),
            _ => None,
        }
    }

    /// `ok`, `no_credentials`, or the refusal's [`VerifyError::code`].
    pub fn code(&self) -> &'static str {
        match self {
            Self::Verified(_) => "ok",
            Self::Rejected(error) => error.code(),
            Self::NoCredentials => "no_credentials",
        }
    }
}

/// One received request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The request method, e.g. `GET`.
    pub method: String,
    /// The request path, without the query.
    pub path: String,
    /// The query string, if any.
    pub query: Option<String>,
    /// Every request header as received, in order, `Authorization` included
    /// (values lossily decoded, cut at [`MAX_RECORDED_VALUE_BYTES`]).
    pub headers: Vec<(String, String)>,
    /// The raw bearer token, if the request carried exactly one
    /// `Authorization: Bearer` header.
    pub token: Option<String>,
    /// What verification decided.
    pub verdict: Verdict,
}

/// A bounded, shared log of received requests: the last `capacity` are kept.
/// Clones share the same log.
#[derive(Debug, Clone)]
pub struct CallLog {
    entries: Arc<Mutex<VecDeque<Received>>>,
    capacity: usize,
}

impl CallLog {
    /// An empty log keeping the last `capacity` requests (at least one).
    pub fn new(capacity: usize) -> Self {
        let capacity = capacity.max(1);
        Self {
            entries: Arc::new(Mutex::new(VecDeque::with_capacity(capacity.min(64)))),
            capacity,
        }
    }

    /// A copy of the kept entries, oldest first.
    pub fn snapshot(&self) -> Vec<Received> {
        self.lock().iter().cloned().collect()
    }

    /// How many entries are kept. Entries are only ever dropped to make
    /// room, so zero means nothing was ever received.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing was ever received.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The claims of every verified request kept, oldest first.
    pub fn verified(&self) -> Vec<CallClaims> {
        self.lock()
            .iter()
            .filter_map(|received| received.verdict.claims().cloned())
            .collect()
    }

    pub(crate) fn record(&self, received: Received) {
        let mut entries = self.lock();
        if entries.len() == self.capacity {
            entries.pop_front();
        }
        entries.push_back(received);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Received>> {
        // Nothing panics while the lock is held; a poisoned log is still a
        // consistent log.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// `value` cut to at most [`MAX_RECORDED_VALUE_BYTES`] at a character
/// boundary.
pub(crate) fn bounded(value: &str) -> String {
    if value.len() <= MAX_RECORDED_VALUE_BYTES {
        return value.to_owned();
    }
    let mut end = MAX_RECORDED_VALUE_BYTES;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    value[..end].to_owned()
}
