//! Outbound requests over the worker channel.
//!
//! In a worker, a job's [`Egress`] is a [`WorkerCalls`] half: it streams
//! each request of the guest up the channel as [`CallUp`] frames and
//! builds the response from the [`CallDown`] frames coming back. In the
//! gateway, a [`GatewayCalls`] half per worker connection hands each
//! request to the job's real egress (the relay's `CallGrant`, which alone
//! checks, strips, signs and sends) and streams its answer down.
//!
//! The worker is assumed compromised. The gateway half checks every frame
//! and answers a breach with a [`Violation`] (the worker is then killed):
//! unknown or unstarted jobs (a job the gateway just cancelled is not
//! unknown: its requests on their way are refused), unknown or reused
//! call ids, frames after a call's end, too many calls in flight,
//! oversized heads, and request body bytes beyond the credit it granted. Its
//! [`GatewayCalls::deliver`] never waits: each call may have at most
//! [`CallLimits::window`] request bytes buffered in the gateway, granted
//! back ([`CallDown::Credit`]) as the egress consumes them, so the request
//! bytes a worker can make the gateway buffer are bounded by the window
//! times the calls in flight. Responses flow under the same kind of
//! window, granted by the worker as its guest reads, so a large response
//! does not pile up in the worker either; while it waits for credit, the
//! gateway holds what the relay read last (at most its 64 KiB read
//! buffer) and its scan's state. Each body frame is charged
//! [`FRAME_COST`] of its window beside its bytes.
//!
//! Both halves are transport-agnostic: they take a sender for the frames
//! they emit and are handed the frames that arrive; the channel code
//! carries them (as postcard frames) in order.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, mpsc, oneshot};
use tokio::task::AbortHandle;

use crate::job::egress::{CallsReport, Egress, EgressBody, EgressError, EgressFuture};

/// Most header or trailer fields a worker's call frame is read with: far
/// above any [`CallLimits::max_fields`] a worker is held to (a longer list
/// is refused unread, see [`crate::sandbox::intake::at_most`]).
pub const MAX_WIRE_FIELDS: usize = 4096;

/// One header or trailer field as it crosses the channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// Field name (lowercase, as `http` keeps it).
    pub name: String,
    /// Field value, as bytes.
    #[serde(with = "wire_bytes")]
    pub value: Bytes,
}

/// A response's head as it crosses the channel.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Head {
    /// Status code.
    pub status: u16,
    /// Header fields.
    pub headers: Vec<Header>,
}

/// A frame of outbound calls from a worker to the gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallUp {
    /// The job's clock started: the gateway starts its egress's, with the
    /// job's wall time it knows itself.
    Started {
        /// The job.
        job: u64,
    },
    /// A new request of `job`; `call` is greater than every earlier call
    /// id of the worker.
    Request {
        /// The job.
        job: u64,
        /// The call's id.
        call: u64,
        /// Method.
        method: String,
        /// The URI as the guest wrote it.
        uri: String,
        /// Header fields.
        #[serde(deserialize_with = "crate::sandbox::intake::at_most::<_, _, MAX_WIRE_FIELDS>")]
        headers: Vec<Header>,
    },
    /// A piece of the request body (non-empty, at most
    /// [`CallLimits::max_chunk`] bytes, within the granted credit).
    Body {
        /// The call.
        call: u64,
        /// The bytes.
        #[serde(with = "wire_bytes")]
        chunk: Bytes,
    },
    /// The request body ended, with its trailers if any.
    End {
        /// The call.
        call: u64,
        /// Trailer fields.
        #[serde(
            deserialize_with = "crate::sandbox::intake::at_most_if_any::<_, _, MAX_WIRE_FIELDS>"
        )]
        trailers: Option<Vec<Header>>,
    },
    /// The worker gave up on the call: its guest dropped the request or
    /// the response, or its request body failed (`error`).
    Abort {
        /// The call.
        call: u64,
        /// Why the request body failed, if it did.
        error: Option<EgressError>,
    },
    /// The worker's guest read more of the response body: `bytes` of
    /// window, each frame's bytes and its [`FRAME_COST`].
    Credit {
        /// The call.
        call: u64,
        /// Window granted back.
        bytes: u64,
    },
}

/// A frame of outbound calls from the gateway to a worker.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallDown {
    /// The response's head, or why there is none (the call is then over).
    Head {
        /// The call.
        call: u64,
        /// The head or the egress's error.
        result: Result<Head, EgressError>,
    },
    /// A piece of the response body.
    Body {
        /// The call.
        call: u64,
        /// The bytes.
        #[serde(with = "wire_bytes")]
        chunk: Bytes,
    },
    /// The response body ended, with its trailers if any.
    End {
        /// The call.
        call: u64,
        /// Trailer fields.
        trailers: Option<Vec<Header>>,
    },
    /// The response body failed (or the job ended under the call).
    Fail {
        /// The call.
        call: u64,
        /// Why.
        error: EgressError,
    },
    /// The egress consumed more of the request body: `bytes` of window,
    /// each frame's bytes and its [`FRAME_COST`].
    Credit {
        /// The call.
        call: u64,
        /// Window granted back.
        bytes: u64,
    },
}

/// The bounds of the crossing. Both halves must use the same: the worker
/// half keeps within them, the gateway half treats a breach as a
/// [`Violation`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallLimits {
    /// What a sender may have unacknowledged per call (each way): body
    /// bytes, each frame charged [`FRAME_COST`] more.
    pub window: u32,
    /// Largest body chunk in one frame (at most `window`).
    pub max_chunk: u32,
    /// Calls in flight per job (in the worker: calls whose response its
    /// guest still holds, ended or not).
    pub per_job: usize,
    /// Calls in flight per worker (likewise).
    pub per_worker: usize,
    /// Header (or trailer) fields in one list.
    pub max_fields: usize,
    /// Bytes of names and values in one list.
    pub max_field_bytes: usize,
    /// Bytes of a method.
    pub max_method: usize,
    /// Bytes of a URI.
    pub max_uri: usize,
}

impl Default for CallLimits {
    fn default() -> Self {
        Self {
            window: 256 << 10,
            max_chunk: 64 << 10,
            per_job: 32,
            per_worker: 128,
            max_fields: 128,
            max_field_bytes: 64 << 10,
            max_method: 32,
            max_uri: 8 << 10,
        }
    }
}

/// What each body frame takes of its call's window beside its bytes: what
/// it takes to hold one waiting to be read (a frame of one byte took
/// about 130 bytes of heap in the worker's queue), and more. A window is
/// then a bound on the memory a call's unread frames hold, and on their
/// number, whatever their sizes: counted in bytes alone, a service
/// streaming one-byte frames to a guest that read none had each call
/// hold 262,144 frames, 34 MB of its worker's heap for 256 KiB.
pub const FRAME_COST: u64 = 1024;

/// What a body frame of `len` bytes takes of its call's window.
fn charge(len: usize) -> u64 {
    len as u64 + FRAME_COST
}

impl CallLimits {
    /// The bounds for a worker running `places` jobs at once: every one of
    /// them may have its [`CallLimits::per_job`] calls, so that no job's
    /// calls (its responses held unread, say) leave another job on the same
    /// worker none (found by an attacker: four jobs of one tenant, each
    /// holding 32 answers, left every other tenant's job on their worker
    /// unable to call).
    pub fn for_places(places: u32) -> Self {
        let limits = Self::default();
        Self {
            per_worker: limits.per_job.saturating_mul(places.max(1) as usize),
            ..limits
        }
    }

    /// A window of at least one frame, chunks whose charge fits it (a
    /// sender waits for a whole chunk's credit).
    fn normalized(mut self) -> Self {
        let least = u32::try_from(FRAME_COST + 1).unwrap_or(u32::MAX);
        self.window = self.window.max(least);
        self.max_chunk = self
            .max_chunk
            .clamp(1, self.window - u32::try_from(FRAME_COST).unwrap_or(0));
        self
    }

    fn check_request(&self, method: &str, uri: &str, headers: &[Header]) -> Result<(), Violation> {
        bound("method", method.len(), self.max_method)?;
        bound("uri", uri.len(), self.max_uri)?;
        self.check_fields(headers)
    }

    fn check_fields(&self, fields: &[Header]) -> Result<(), Violation> {
        bound("header list", fields.len(), self.max_fields)?;
        let bytes = fields.iter().map(|h| h.name.len() + h.value.len()).sum();
        bound("header bytes", bytes, self.max_field_bytes)
    }
}

/// Longest text an `Abort`'s error carries: the worker cuts it there, and
/// the gateway refuses a longer one (found by an attacker: a worker
/// repeating 16 MiB aborts of a finished call, which the protocol lets
/// cross, made the gateway read 340 MB a second).
pub const MAX_ERROR_TEXT: usize = 1024;

/// The text `error` carries of its own (a guest's body error, a host
/// failure's detail).
fn error_text(error: &EgressError) -> Option<&String> {
    match error {
        EgressError::Body(text) | EgressError::Internal(Some(text)) => Some(text),
        _ => None,
    }
}

/// `error`, its own text cut to [`MAX_ERROR_TEXT`].
fn cut_error(mut error: EgressError) -> EgressError {
    if let EgressError::Body(text) | EgressError::Internal(Some(text)) = &mut error {
        text.truncate(text.floor_char_boundary(MAX_ERROR_TEXT));
    }
    error
}

fn bound(what: &'static str, len: usize, limit: usize) -> Result<(), Violation> {
    if len > limit {
        return Err(Violation::Oversized { what, len, limit });
    }
    Ok(())
}

/// A worker's breach of the crossing's rules, seen by the gateway.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// A frame named a job that is not registered.
    #[error("job {0} is not registered")]
    UnknownJob(u64),
    /// A request came before the job's `Started`.
    #[error("job {0} sent a request before its clock started")]
    NotStarted(u64),
    /// `Started` came twice.
    #[error("job {0} started twice")]
    StartedTwice(u64),
    /// A frame named a call never opened.
    #[error("call {0} was never opened")]
    UnknownCall(u64),
    /// A request reused (or went back below) a call id.
    #[error("call id {call} is not above the last one, {last}")]
    CallReused {
        /// The id.
        call: u64,
        /// The highest id seen before.
        last: u64,
    },
    /// A request beyond the calls in flight allowed.
    #[error("call {call}: more than {limit} calls in flight per {scope}")]
    TooManyCalls {
        /// The id.
        call: u64,
        /// `job` or `worker`.
        scope: &'static str,
        /// The bound.
        limit: usize,
    },
    /// Request body bytes beyond the granted credit.
    #[error(
        "call {call}: {buffered} request body bytes unacknowledged, beyond the window of {window}"
    )]
    BeyondWindow {
        /// The call.
        call: u64,
        /// Bytes it would have buffered.
        buffered: u64,
        /// The window.
        window: u32,
    },
    /// Credit for more response bytes than were sent.
    #[error("call {call}: credit for {bytes} bytes, {outstanding} sent")]
    BeyondSent {
        /// The call.
        call: u64,
        /// Credit claimed.
        bytes: u64,
        /// Bytes sent and not yet credited.
        outstanding: u64,
    },
    /// A body or end frame after the request's end.
    #[error("call {0}: a frame after the request's end")]
    AfterEnd(u64),
    /// An empty body chunk.
    #[error("call {0}: an empty body chunk")]
    EmptyChunk(u64),
    /// A field beyond its bound.
    #[error("{what} of {len} exceeds {limit}")]
    Oversized {
        /// What.
        what: &'static str,
        /// Its size.
        len: usize,
        /// The bound.
        limit: usize,
    },
    /// A method, URI or header that does not parse.
    #[error("call {call}: malformed {what}")]
    Malformed {
        /// The call.
        call: u64,
        /// What.
        what: &'static str,
    },
}

fn to_wire(map: &http::HeaderMap) -> Vec<Header> {
    map.iter()
        .map(|(name, value)| Header {
            name: name.as_str().to_owned(),
            value: Bytes::copy_from_slice(value.as_bytes()),
        })
        .collect()
}

fn from_wire(list: Vec<Header>) -> Option<http::HeaderMap> {
    let mut map = http::HeaderMap::with_capacity(list.len());
    for h in list {
        let name = http::HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = http::HeaderValue::from_maybe_shared(h.value).ok()?;
        map.append(name, value);
    }
    Some(map)
}

/// A body frame queued for a reader.
type Queued = Result<Frame<Bytes>, EgressError>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------- worker

/// The worker's half: one per worker process. Each job's [`Egress`]
/// ([`WorkerCalls::egress`]) sends its calls up; the channel's reader
/// hands every [`CallDown`] to [`WorkerCalls::deliver`].
#[derive(Clone, Debug)]
pub struct WorkerCalls {
    inner: Arc<WorkerInner>,
}

#[derive(Debug)]
struct WorkerInner {
    /// Unbounded: every frame sent is bounded by the gateway's windows
    /// (body bytes) or by the calls in flight (heads, ends, credits), and
    /// a guest's task must never wait on the channel's writer while
    /// holding the call table.
    up: CallSink,
    limits: CallLimits,
    state: Mutex<WorkerState>,
}

/// Where the worker's half sends its frames. It must keep them in order
/// with everything else the worker sends: a call's frames go before its
/// job's report.
pub struct CallSink(Box<dyn Fn(CallUp) -> bool + Send + Sync>);

impl CallSink {
    /// Frames handed to `send`, which says whether the channel is open.
    pub fn new(send: impl Fn(CallUp) -> bool + Send + Sync + 'static) -> Self {
        Self(Box::new(send))
    }

    fn send(&self, frame: CallUp) -> Result<(), ChannelClosed> {
        if (self.0)(frame) {
            Ok(())
        } else {
            Err(ChannelClosed)
        }
    }
}

impl std::fmt::Debug for CallSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CallSink")
    }
}

/// The worker's channel is closed.
#[derive(Debug)]
struct ChannelClosed;

#[derive(Debug, Default)]
struct WorkerState {
    next_call: u64,
    calls: HashMap<u64, WorkerCall>,
    /// Each job's calls whose response the guest still holds (a
    /// [`CallGuard`] each), ended or not: what counts against
    /// [`CallLimits::per_job`] and [`CallLimits::per_worker`]. A response
    /// that has ended keeps what came down of it until the guest reads or
    /// drops it (found by an attacker: a job kept 256 ended, unread
    /// responses, 65 MB of its worker, while its calls in flight were
    /// counted only until each ended).
    held: HashMap<u64, usize>,
    closed: bool,
}

/// A call whose response has not ended (removed at its last frame down,
/// or when the worker gives up on it).
#[derive(Debug)]
struct WorkerCall {
    head: Option<oneshot::Sender<Result<Head, EgressError>>>,
    body: mpsc::UnboundedSender<Queued>,
    /// Request body credit granted by the gateway.
    window: Arc<Semaphore>,
    pump: Option<AbortHandle>,
    /// The request's `End` or `Abort` went up.
    up_done: bool,
}

impl WorkerCalls {
    /// The worker's half, sending its frames to `up`, within the default
    /// [`CallLimits`].
    pub fn new(up: mpsc::UnboundedSender<CallUp>) -> Self {
        Self::with_limits(up, CallLimits::default())
    }

    /// The worker's half within `limits` (the gateway's).
    pub fn with_limits(up: mpsc::UnboundedSender<CallUp>, limits: CallLimits) -> Self {
        Self::with_sink(CallSink::new(move |frame| up.send(frame).is_ok()), limits)
    }

    /// The worker's half within `limits`, its frames handed to `up`.
    pub fn with_sink(up: CallSink, limits: CallLimits) -> Self {
        let limits = limits.normalized();
        Self {
            inner: Arc::new(WorkerInner {
                up,
                limits,
                state: Mutex::new(WorkerState::default()),
            }),
        }
    }

    /// Job `job`'s way out.
    pub fn egress(&self, job: u64) -> Arc<dyn Egress> {
        Arc::new(WorkerEgress {
            job,
            inner: Arc::clone(&self.inner),
        })
    }

    /// Takes one frame from the gateway. Frames of calls the worker gave
    /// up on are dropped.
    pub fn deliver(&self, down: CallDown) {
        let inner = &self.inner;
        let mut state = lock(&inner.state);
        match down {
            CallDown::Head { call, result } => {
                let Some(entry) = state.calls.get_mut(&call) else {
                    return;
                };
                let failed = result.is_err();
                if let Some(head) = entry.head.take() {
                    let _ = head.send(result);
                }
                if failed {
                    inner.finish(&mut state, call);
                }
            }
            CallDown::Body { call, chunk } => {
                if let Some(entry) = state.calls.get(&call) {
                    let _ = entry.body.send(Ok(Frame::data(chunk)));
                }
            }
            CallDown::End { call, trailers } => {
                if let Some(entry) = state.calls.get(&call) {
                    if let Some(trailers) = trailers {
                        let frame =
                            from_wire(trailers)
                                .map(Frame::trailers)
                                .ok_or(EgressError::Internal(Some(
                                    "malformed response trailers".into(),
                                )));
                        let _ = entry.body.send(frame);
                    }
                    inner.finish(&mut state, call);
                }
            }
            CallDown::Fail { call, error } => {
                if let Some(entry) = state.calls.get_mut(&call) {
                    match entry.head.take() {
                        Some(head) => {
                            let _ = head.send(Err(error));
                        }
                        None => {
                            let _ = entry.body.send(Err(error));
                        }
                    }
                    inner.finish(&mut state, call);
                }
            }
            CallDown::Credit { call, bytes } => {
                if let Some(entry) = state.calls.get(&call) {
                    // The gateway grants back only what it consumed; the
                    // bound keeps a confused one from overflowing the count.
                    let room = (inner.limits.window as usize)
                        .saturating_sub(entry.window.available_permits());
                    entry
                        .window
                        .add_permits(usize::try_from(bytes).unwrap_or(usize::MAX).min(room));
                }
            }
        }
    }

    /// The channel is gone: every call in flight fails, and no new one
    /// is sent.
    pub fn close(&self) {
        let mut state = lock(&self.inner.state);
        state.closed = true;
        for (_, mut entry) in state.calls.drain() {
            if let Some(pump) = entry.pump.take() {
                pump.abort();
            }
            let error = gone();
            match entry.head.take() {
                Some(head) => {
                    let _ = head.send(Err(error));
                }
                None => {
                    let _ = entry.body.send(Err(error));
                }
            }
        }
    }

    /// Calls in flight.
    pub fn in_flight(&self) -> usize {
        lock(&self.inner.state).calls.len()
    }
}

fn gone() -> EgressError {
    EgressError::Internal(Some("the gateway's channel is closed".into()))
}

impl WorkerInner {
    /// The call's response is over (or failed): forget it, stopping its
    /// request body if it is still going up.
    fn finish(&self, state: &mut WorkerState, call: u64) {
        if let Some(mut entry) = state.calls.remove(&call)
            && !entry.up_done
        {
            if let Some(pump) = entry.pump.take() {
                pump.abort();
            }
            let _ = self.up.send(CallUp::Abort { call, error: None });
        }
    }

    /// Sends a frame of the call's request if it is still going up;
    /// `last` marks the request's end.
    fn send_up(&self, call: u64, frame: CallUp, last: bool) -> bool {
        let mut state = lock(&self.state);
        let Some(entry) = state.calls.get_mut(&call) else {
            return false;
        };
        if entry.up_done {
            return false;
        }
        if last {
            entry.up_done = true;
            entry.pump = None;
        }
        self.up.send(frame).is_ok()
    }

    /// The request body failed: the call is over, with `error` both ways.
    fn fail_up(&self, call: u64, error: EgressError) {
        let mut state = lock(&self.state);
        let Some(mut entry) = state.calls.remove(&call) else {
            return;
        };
        let _ = self.up.send(CallUp::Abort {
            call,
            error: Some(cut_error(error.clone())),
        });
        match entry.head.take() {
            Some(head) => {
                let _ = head.send(Err(error));
            }
            None => {
                let _ = entry.body.send(Err(error));
            }
        }
    }

    /// The worker's guest let go of the call.
    fn abandon(&self, call: u64) {
        let mut state = lock(&self.state);
        if let Some(mut entry) = state.calls.remove(&call) {
            if let Some(pump) = entry.pump.take() {
                pump.abort();
            }
            let _ = self.up.send(CallUp::Abort { call, error: None });
        }
    }
}

/// One job's egress in a worker.
#[derive(Debug)]
struct WorkerEgress {
    job: u64,
    inner: Arc<WorkerInner>,
}

impl Egress for WorkerEgress {
    fn start(&self, _deadline: Instant) {
        // The gateway knows the job's wall time; it only needs the moment.
        let _ = self.inner.up.send(CallUp::Started { job: self.job });
    }

    fn send(self: Arc<Self>, request: http::Request<EgressBody>) -> EgressFuture {
        Box::pin(async move {
            let (parts, body) = request.into_parts();
            let method = parts.method.as_str().to_owned();
            let uri = parts.uri.to_string();
            let headers = to_wire(&parts.headers);
            let inner = &self.inner;
            inner
                .limits
                .check_request(&method, &uri, &headers)
                .map_err(|v| EgressError::Internal(Some(v.to_string())))?;
            let (head_rx, body_rx, guard) = {
                let mut state = lock(&inner.state);
                if state.closed {
                    return Err(gone());
                }
                let held = state.held.values().sum::<usize>();
                if held >= inner.limits.per_worker
                    || state.held.get(&self.job).copied().unwrap_or(0) >= inner.limits.per_job
                {
                    return Err(EgressError::Internal(Some(
                        "too many outbound requests in flight".into(),
                    )));
                }
                let call = state.next_call;
                state.next_call += 1;
                let (head_tx, head_rx) = oneshot::channel();
                let (body_tx, body_rx) = mpsc::unbounded_channel();
                let window = Arc::new(Semaphore::new(inner.limits.window as usize));
                if inner
                    .up
                    .send(CallUp::Request {
                        job: self.job,
                        call,
                        method,
                        uri,
                        headers,
                    })
                    .is_err()
                {
                    return Err(gone());
                }
                let pump = tokio::spawn(pump(Arc::clone(inner), call, body, Arc::clone(&window)))
                    .abort_handle();
                state.calls.insert(
                    call,
                    WorkerCall {
                        head: Some(head_tx),
                        body: body_tx,
                        window,
                        pump: Some(pump),
                        up_done: false,
                    },
                );
                *state.held.entry(self.job).or_default() += 1;
                let guard = CallGuard {
                    inner: Arc::clone(inner),
                    call,
                    job: self.job,
                };
                (head_rx, body_rx, guard)
            };
            let head = head_rx.await.map_err(|_| gone())??;
            let mut response = http::Response::new(());
            *response.status_mut() = http::StatusCode::from_u16(head.status)
                .map_err(|_| EgressError::Internal(Some("malformed response status".into())))?;
            *response.headers_mut() = from_wire(head.headers).ok_or(EgressError::Internal(
                Some("malformed response headers".into()),
            ))?;
            Ok(response.map(|()| WorkerBody { rx: body_rx, guard }.boxed_unsync()))
        })
    }

    fn report(&self) -> CallsReport {
        // The gateway's egress keeps the job's record.
        CallsReport::default()
    }
}

/// Streams a request body up within the gateway's credit.
async fn pump(inner: Arc<WorkerInner>, call: u64, mut body: EgressBody, window: Arc<Semaphore>) {
    let max = inner.limits.max_chunk as usize;
    loop {
        match body.frame().await {
            None => {
                inner.send_up(
                    call,
                    CallUp::End {
                        call,
                        trailers: None,
                    },
                    true,
                );
                return;
            }
            Some(Err(e)) => return inner.fail_up(call, e),
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    while !data.is_empty() {
                        let n = data.len().min(max);
                        let Ok(permits) = window.acquire_many(charge(n) as u32).await else {
                            return;
                        };
                        permits.forget();
                        let chunk = data.split_to(n);
                        if !inner.send_up(call, CallUp::Body { call, chunk }, false) {
                            return;
                        }
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let trailers = to_wire(&trailers);
                        if let Err(v) = inner.limits.check_fields(&trailers) {
                            return inner.fail_up(call, EgressError::Internal(Some(v.to_string())));
                        }
                        inner.send_up(
                            call,
                            CallUp::End {
                                call,
                                trailers: Some(trailers),
                            },
                            true,
                        );
                        return;
                    }
                }
            },
        }
    }
}

/// Gives up on a call when dropped before its response ended.
#[derive(Debug)]
struct CallGuard {
    inner: Arc<WorkerInner>,
    call: u64,
    job: u64,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        self.inner.abandon(self.call);
        let mut state = lock(&self.inner.state);
        if let Some(n) = state.held.get_mut(&self.job) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                state.held.remove(&self.job);
            }
        }
    }
}

/// A response body in a worker: the frames down, crediting the gateway
/// as the guest reads.
#[derive(Debug)]
struct WorkerBody {
    rx: mpsc::UnboundedReceiver<Queued>,
    guard: CallGuard,
}

impl Body for WorkerBody {
    type Data = Bytes;
    type Error = EgressError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, EgressError>>> {
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            let call = self.guard.call;
            let inner = &self.guard.inner;
            if lock(&inner.state).calls.contains_key(&call) {
                let _ = inner.up.send(CallUp::Credit {
                    call,
                    bytes: charge(data.len()),
                });
            }
        }
        polled
    }
}

// --------------------------------------------------------------- gateway

/// The gateway's half: one per worker connection. The lead registers each
/// job's egress around the job; the channel's reader hands every
/// [`CallUp`] to [`GatewayCalls::deliver`], which checks it and never
/// waits. Must be used inside a tokio runtime (each call runs on a task).
#[derive(Debug)]
pub struct GatewayCalls {
    inner: Arc<GatewayInner>,
}

#[derive(Debug)]
struct GatewayInner {
    /// Unbounded: response bytes are bounded by the worker's credit,
    /// credits by the request window, heads and ends by the calls in
    /// flight.
    down: mpsc::UnboundedSender<CallDown>,
    limits: CallLimits,
    state: Mutex<GatewayState>,
}

#[derive(Debug, Default)]
struct GatewayState {
    jobs: HashMap<u64, GatewayJob>,
    /// Jobs unregistered lately, newest last, at most [`ENDED_KEPT`]: a
    /// job the gateway cancelled may have frames on their way up, which
    /// are refused without blaming the worker.
    ended: std::collections::VecDeque<u64>,
    calls: HashMap<u64, GatewayCall>,
    last_call: Option<u64>,
}

/// Ended jobs remembered per worker: more than a worker runs at once, so
/// every job whose cancel may still be on its way is among them.
const ENDED_KEPT: usize = 1024;

#[derive(Debug)]
struct GatewayJob {
    egress: Arc<dyn Egress>,
    wall_time: Duration,
    started: bool,
}

/// A call until both its request (the worker's `End` or `Abort`) and
/// its response (the gateway's last frame down) are over.
#[derive(Debug)]
struct GatewayCall {
    job: u64,
    /// Feeds the request body the egress reads; `None` once the request
    /// ended, or once the job ended under it.
    body: Option<mpsc::UnboundedSender<Queued>>,
    /// Request body bytes received and not yet consumed by the egress.
    buffered: Arc<AtomicU64>,
    up_done: bool,
    down_done: bool,
    /// Response body credit granted by the worker.
    window: Arc<Semaphore>,
    /// Response body bytes sent and not yet credited back.
    outstanding: u64,
    task: Option<AbortHandle>,
}

impl GatewayCalls {
    /// The gateway's half for one worker, sending its frames to `down`,
    /// within the default [`CallLimits`].
    pub fn new(down: mpsc::UnboundedSender<CallDown>) -> Self {
        Self::with_limits(down, CallLimits::default())
    }

    /// The gateway's half within `limits`.
    pub fn with_limits(down: mpsc::UnboundedSender<CallDown>, limits: CallLimits) -> Self {
        let limits = limits.normalized();
        Self {
            inner: Arc::new(GatewayInner {
                down,
                limits,
                state: Mutex::new(GatewayState::default()),
            }),
        }
    }

    /// Job `job` may call through `egress` once it started; its clock
    /// runs for `wall_time` from its `Started`. Register before the
    /// worker is handed the job.
    pub fn register(&self, job: u64, egress: Arc<dyn Egress>, wall_time: Duration) {
        lock(&self.inner.state).jobs.insert(
            job,
            GatewayJob {
                egress,
                wall_time,
                started: false,
            },
        );
    }

    /// Job `job` is over: its calls still open are cancelled (their
    /// egress futures and bodies dropped, the worker told). A request of
    /// it that was on its way (the gateway may have cancelled the job
    /// under a running guest) is refused with a failure; one long after,
    /// when [`ENDED_KEPT`] later jobs have ended, is a violation.
    pub fn unregister(&self, job: u64) {
        let mut state = lock(&self.inner.state);
        if state.jobs.remove(&job).is_some() {
            if state.ended.len() >= ENDED_KEPT {
                state.ended.pop_front();
            }
            state.ended.push_back(job);
        }
        let open: Vec<u64> = state
            .calls
            .iter()
            .filter(|(_, c)| c.job == job)
            .map(|(id, _)| *id)
            .collect();
        for call in open {
            let Some(entry) = state.calls.get_mut(&call) else {
                continue;
            };
            if let Some(task) = entry.task.take() {
                task.abort();
            }
            entry.body = None;
            if !entry.down_done {
                entry.down_done = true;
                let _ = self.inner.down.send(CallDown::Fail {
                    call,
                    error: EgressError::Internal(Some("the job ended".into())),
                });
            }
            // Kept until the worker ends or aborts its request, so its
            // frames in flight are still checked.
            if entry.up_done {
                state.calls.remove(&call);
            }
        }
    }

    /// Request body bytes held for all calls (bounded by the window times
    /// the calls in flight).
    pub fn buffered(&self) -> u64 {
        lock(&self.inner.state)
            .calls
            .values()
            .map(|c| c.buffered.load(Ordering::Relaxed))
            .sum()
    }

    /// Calls in flight (including cancelled ones the worker has not let
    /// go of yet).
    pub fn in_flight(&self) -> usize {
        lock(&self.inner.state).calls.len()
    }

    /// Takes one frame from the worker; `Err` is a breach (kill it).
    pub fn deliver(&self, up: CallUp) -> Result<(), Violation> {
        let inner = &self.inner;
        let mut state = lock(&inner.state);
        match up {
            // Cancelled under its guest: nothing to start.
            CallUp::Started { job } if state.ended.contains(&job) => Ok(()),
            CallUp::Started { job } => {
                let entry = state.jobs.get_mut(&job).ok_or(Violation::UnknownJob(job))?;
                if entry.started {
                    return Err(Violation::StartedTwice(job));
                }
                entry.started = true;
                let egress = Arc::clone(&entry.egress);
                let deadline = Instant::now() + entry.wall_time;
                drop(state);
                egress.start(deadline);
                Ok(())
            }
            CallUp::Request {
                job,
                call,
                method,
                uri,
                headers,
            } => {
                inner.limits.check_request(&method, &uri, &headers)?;
                if !state.jobs.contains_key(&job) && state.ended.contains(&job) {
                    return refuse_ended(inner, &mut state, job, call);
                }
                let entry = state.jobs.get(&job).ok_or(Violation::UnknownJob(job))?;
                if !entry.started {
                    return Err(Violation::NotStarted(job));
                }
                let egress = Arc::clone(&entry.egress);
                if let Some(last) = state.last_call
                    && call <= last
                {
                    return Err(Violation::CallReused { call, last });
                }
                if state.calls.len() >= inner.limits.per_worker {
                    return Err(Violation::TooManyCalls {
                        call,
                        scope: "worker",
                        limit: inner.limits.per_worker,
                    });
                }
                if state.calls.values().filter(|c| c.job == job).count() >= inner.limits.per_job {
                    return Err(Violation::TooManyCalls {
                        call,
                        scope: "job",
                        limit: inner.limits.per_job,
                    });
                }
                let malformed = |what| Violation::Malformed { call, what };
                let method =
                    http::Method::from_bytes(method.as_bytes()).map_err(|_| malformed("method"))?;
                let uri = http::Uri::try_from(uri).map_err(|_| malformed("uri"))?;
                let headers = from_wire(headers).ok_or_else(|| malformed("headers"))?;
                state.last_call = Some(call);
                let (body_tx, body_rx) = mpsc::unbounded_channel();
                let buffered = Arc::new(AtomicU64::new(0));
                let window = Arc::new(Semaphore::new(inner.limits.window as usize));
                let mut request = http::Request::new(
                    GatewayBody {
                        call,
                        rx: body_rx,
                        buffered: Arc::clone(&buffered),
                        down: inner.down.clone(),
                    }
                    .boxed_unsync(),
                );
                *request.method_mut() = method;
                *request.uri_mut() = uri;
                *request.headers_mut() = headers;
                let task = tokio::spawn(run_call(
                    Arc::clone(inner),
                    call,
                    egress,
                    request,
                    Arc::clone(&window),
                ))
                .abort_handle();
                state.calls.insert(
                    call,
                    GatewayCall {
                        job,
                        body: Some(body_tx),
                        buffered,
                        up_done: false,
                        down_done: false,
                        window,
                        outstanding: 0,
                        task: Some(task),
                    },
                );
                Ok(())
            }
            CallUp::Body { call, chunk } => {
                if chunk.is_empty() {
                    return Err(Violation::EmptyChunk(call));
                }
                bound("body chunk", chunk.len(), inner.limits.max_chunk as usize)?;
                let last = state.last_call;
                let entry = open_call(&mut state, call, last)?;
                let n = charge(chunk.len());
                let before = entry.buffered.fetch_add(n, Ordering::AcqRel);
                if before + n > u64::from(inner.limits.window) {
                    entry.buffered.fetch_sub(n, Ordering::AcqRel);
                    return Err(Violation::BeyondWindow {
                        call,
                        buffered: before + n,
                        window: inner.limits.window,
                    });
                }
                let taken = match &entry.body {
                    Some(body) => body.send(Ok(Frame::data(chunk))).is_ok(),
                    None => false,
                };
                if !taken {
                    // Nobody reads the request any more: the bytes are
                    // dropped and granted back at once.
                    entry.buffered.fetch_sub(n, Ordering::AcqRel);
                    let _ = inner.down.send(CallDown::Credit { call, bytes: n });
                }
                Ok(())
            }
            CallUp::End { call, trailers } => {
                if let Some(trailers) = &trailers {
                    inner.limits.check_fields(trailers)?;
                }
                let last = state.last_call;
                let entry = open_call(&mut state, call, last)?;
                if let Some(trailers) = trailers {
                    let trailers = from_wire(trailers).ok_or(Violation::Malformed {
                        call,
                        what: "trailers",
                    })?;
                    if let Some(body) = &entry.body {
                        let _ = body.send(Ok(Frame::trailers(trailers)));
                    }
                }
                entry.body = None;
                entry.up_done = true;
                if entry.down_done {
                    state.calls.remove(&call);
                }
                Ok(())
            }
            CallUp::Abort { call, error } => {
                if let Some(text) = error.as_ref().and_then(error_text) {
                    bound("abort error", text.len(), MAX_ERROR_TEXT)?;
                }
                if let Some(mut entry) = state.calls.remove(&call) {
                    if let Some(task) = entry.task.take() {
                        task.abort();
                    }
                    tracing::debug!(call, ?error, "outbound request given up by the worker");
                    return Ok(());
                }
                known(call, state.last_call)
            }
            CallUp::Credit { call, bytes } => {
                let Some(entry) = state.calls.get_mut(&call) else {
                    // The response may have ended while the worker read it.
                    return known(call, state.last_call);
                };
                if bytes > entry.outstanding {
                    return Err(Violation::BeyondSent {
                        call,
                        bytes,
                        outstanding: entry.outstanding,
                    });
                }
                entry.outstanding -= bytes;
                // At most the window: `outstanding` never exceeds it.
                entry.window.add_permits(bytes as usize);
                Ok(())
            }
        }
    }
}

impl Drop for GatewayCalls {
    fn drop(&mut self) {
        let mut state = lock(&self.inner.state);
        for (_, mut call) in state.calls.drain() {
            if let Some(task) = call.task.take() {
                task.abort();
            }
        }
    }
}

/// The call `call`, if its request is still open; else the breach.
/// Refuses request `call` of `job`, which ended (cancelled) while the
/// request was on its way: the worker is told the call failed, and its
/// body frames still to come are taken and dropped.
fn refuse_ended(
    inner: &GatewayInner,
    state: &mut GatewayState,
    job: u64,
    call: u64,
) -> Result<(), Violation> {
    if let Some(last) = state.last_call
        && call <= last
    {
        return Err(Violation::CallReused { call, last });
    }
    if state.calls.len() >= inner.limits.per_worker {
        return Err(Violation::TooManyCalls {
            call,
            scope: "worker",
            limit: inner.limits.per_worker,
        });
    }
    state.last_call = Some(call);
    state.calls.insert(
        call,
        GatewayCall {
            job,
            body: None,
            buffered: Arc::new(AtomicU64::new(0)),
            up_done: false,
            down_done: true,
            window: Arc::new(Semaphore::new(0)),
            outstanding: 0,
            task: None,
        },
    );
    let _ = inner.down.send(CallDown::Fail {
        call,
        error: EgressError::Internal(Some("the job ended".into())),
    });
    Ok(())
}

fn open_call(
    state: &mut GatewayState,
    call: u64,
    last: Option<u64>,
) -> Result<&mut GatewayCall, Violation> {
    match state.calls.get_mut(&call) {
        Some(entry) if !entry.up_done => Ok(entry),
        Some(_) => Err(Violation::AfterEnd(call)),
        None => {
            known(call, last)?;
            Err(Violation::AfterEnd(call))
        }
    }
}

/// `Ok` if `call` was opened once.
fn known(call: u64, last: Option<u64>) -> Result<(), Violation> {
    match last {
        Some(last) if call <= last => Ok(()),
        _ => Err(Violation::UnknownCall(call)),
    }
}

impl GatewayInner {
    /// Sends a frame of the call's response if the call is still there.
    fn send_down(&self, call: u64, frame: CallDown, bytes: u64, last: bool) -> bool {
        let mut state = lock(&self.state);
        let Some(entry) = state.calls.get_mut(&call) else {
            return false;
        };
        if entry.down_done {
            return false;
        }
        entry.outstanding += bytes;
        if last {
            entry.down_done = true;
            entry.task = None;
            if entry.up_done {
                state.calls.remove(&call);
            }
        }
        self.down.send(frame).is_ok()
    }
}

/// One call in the gateway: the egress's answer, streamed down within the
/// worker's credit.
async fn run_call(
    inner: Arc<GatewayInner>,
    call: u64,
    egress: Arc<dyn Egress>,
    request: http::Request<EgressBody>,
    window: Arc<Semaphore>,
) {
    let response = match egress.send(request).await {
        Ok(response) => response,
        Err(error) => {
            inner.send_down(
                call,
                CallDown::Head {
                    call,
                    result: Err(error),
                },
                0,
                true,
            );
            return;
        }
    };
    let (parts, mut body) = response.into_parts();
    let head = Head {
        status: parts.status.as_u16(),
        headers: to_wire(&parts.headers),
    };
    if !inner.send_down(
        call,
        CallDown::Head {
            call,
            result: Ok(head),
        },
        0,
        false,
    ) {
        return;
    }
    let max = inner.limits.max_chunk as usize;
    loop {
        match body.frame().await {
            None => {
                inner.send_down(
                    call,
                    CallDown::End {
                        call,
                        trailers: None,
                    },
                    0,
                    true,
                );
                return;
            }
            Some(Err(error)) => {
                inner.send_down(call, CallDown::Fail { call, error }, 0, true);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(mut data) => {
                    while !data.is_empty() {
                        let n = data.len().min(max);
                        let Ok(permits) = window.acquire_many(charge(n) as u32).await else {
                            return;
                        };
                        permits.forget();
                        let chunk = data.split_to(n);
                        if !inner.send_down(call, CallDown::Body { call, chunk }, charge(n), false)
                        {
                            return;
                        }
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        inner.send_down(
                            call,
                            CallDown::End {
                                call,
                                trailers: Some(to_wire(&trailers)),
                            },
                            0,
                            true,
                        );
                        return;
                    }
                }
            },
        }
    }
}

/// A request body in the gateway: the worker's frames, granted back as
/// the egress reads them.
#[derive(Debug)]
struct GatewayBody {
    call: u64,
    rx: mpsc::UnboundedReceiver<Queued>,
    buffered: Arc<AtomicU64>,
    down: mpsc::UnboundedSender<CallDown>,
}

impl GatewayBody {
    fn consumed(&self, n: u64) {
        self.buffered.fetch_sub(n, Ordering::AcqRel);
        let _ = self.down.send(CallDown::Credit {
            call: self.call,
            bytes: n,
        });
    }
}

impl Body for GatewayBody {
    type Data = Bytes;
    type Error = EgressError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, EgressError>>> {
        let polled = self.rx.poll_recv(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.consumed(charge(data.len()));
        }
        polled
    }
}

impl Drop for GatewayBody {
    fn drop(&mut self) {
        // Bytes nobody will read are granted back, so the worker's
        // request can finish (or be given up) without stalling.
        self.rx.close();
        let mut dropped = 0;
        while let Ok(item) = self.rx.try_recv() {
            if let Ok(frame) = item
                && let Some(data) = frame.data_ref()
            {
                dropped += charge(data.len());
            }
        }
        if dropped > 0 {
            self.consumed(dropped);
        }
    }
}

/// `Bytes` as a serde byte string (compact in postcard).
mod wire_bytes {
    use bytes::Bytes;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(b: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(b)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Bytes;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E>(self, v: &[u8]) -> Result<Bytes, E> {
                Ok(Bytes::copy_from_slice(v))
            }
            fn visit_byte_buf<E>(self, v: Vec<u8>) -> Result<Bytes, E> {
                Ok(Bytes::from(v))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Bytes, A::Error> {
                let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
                while let Some(b) = seq.next_element::<u8>()? {
                    v.push(b);
                }
                Ok(Bytes::from(v))
            }
        }
        d.deserialize_bytes(Visitor)
    }
}

#[cfg(test)]
mod tests {

    fn long_text(n: usize) -> String {
        "x".repeat(n)
    }
    use std::sync::atomic::AtomicBool;

    use futures_util::stream;
    use http_body_util::StreamBody;
    use serde::de::DeserializeOwned;

    use super::*;

    /// Through postcard, as the channel carries it.
    fn roundtrip<T: Serialize + DeserializeOwned>(t: T) -> T {
        postcard::from_bytes(&postcard::to_stdvec(&t).unwrap()).unwrap()
    }

    /// Both halves wired by channels, as the channel code wires them.
    struct Wire {
        worker: WorkerCalls,
        gateway: Arc<GatewayCalls>,
        violations: mpsc::UnboundedReceiver<Violation>,
        /// Response body bytes delivered to the worker so far.
        down_bytes: Arc<AtomicU64>,
        /// Response body frames delivered to the worker so far.
        down_frames: Arc<AtomicU64>,
    }

    fn wire() -> Wire {
        wire_with(CallLimits::default())
    }

    impl Wire {
        /// An [`Echo`] registered as job `job`'s egress, and the job's
        /// egress in the worker, started.
        fn echoing(&self, job: u64) -> (Arc<Echo>, Arc<dyn Egress>) {
            let echo = Arc::new(Echo::default());
            self.gateway
                .register(job, Arc::clone(&echo) as _, Duration::from_secs(60));
            let egress = self.worker.egress(job);
            egress.start(Instant::now());
            (echo, egress)
        }
    }

    /// [`wire`], both halves within `limits`.
    fn wire_with(limits: CallLimits) -> Wire {
        let (up_tx, mut up_rx) = mpsc::unbounded_channel();
        let (down_tx, mut down_rx) = mpsc::unbounded_channel();
        let worker = WorkerCalls::with_limits(up_tx, limits);
        let gateway = Arc::new(GatewayCalls::with_limits(down_tx, limits));
        let (v_tx, violations) = mpsc::unbounded_channel();
        let g = Arc::clone(&gateway);
        tokio::spawn(async move {
            while let Some(up) = up_rx.recv().await {
                if let Err(v) = g.deliver(roundtrip(up)) {
                    let _ = v_tx.send(v);
                }
            }
        });
        let w = worker.clone();
        let down_bytes = Arc::new(AtomicU64::new(0));
        let down_frames = Arc::new(AtomicU64::new(0));
        let (counted, framed) = (Arc::clone(&down_bytes), Arc::clone(&down_frames));
        tokio::spawn(async move {
            while let Some(down) = down_rx.recv().await {
                if let CallDown::Body { chunk, .. } = &down {
                    counted.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                    framed.fetch_add(1, Ordering::Relaxed);
                }
                w.deliver(roundtrip(down));
            }
        });
        Wire {
            worker,
            gateway,
            violations,
            down_bytes,
            down_frames,
        }
    }

    /// Waits (boundedly: a minute, a guard against hanging, not a measure
    /// of speed) for `f` to hold.
    async fn eventually(what: &str, f: impl Fn() -> bool) {
        for _ in 0..12_000 {
            if f() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("never: {what}");
    }

    fn pattern(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| (i % 251) as u8 ^ seed)
            .collect::<Vec<u8>>()
    }

    /// A request body of `data` in uneven pieces, then `trailers`.
    fn streamed(data: &[u8], trailers: Option<http::HeaderMap>) -> EgressBody {
        let mut frames: Vec<Result<Frame<Bytes>, EgressError>> = data
            .chunks(100_003)
            .map(|c| Ok(Frame::data(Bytes::copy_from_slice(c))))
            .collect();
        if let Some(t) = trailers {
            frames.push(Ok(Frame::trailers(t)));
        }
        StreamBody::new(stream::iter(frames)).boxed_unsync()
    }

    fn empty() -> EgressBody {
        http_body_util::Empty::new()
            .map_err(|never: std::convert::Infallible| match never {})
            .boxed_unsync()
    }

    /// Answers each request with its own body (streamed as it arrives,
    /// trailers included), and records what it was asked.
    #[derive(Debug, Default)]
    struct Echo {
        started: Mutex<Vec<Instant>>,
        seen: Mutex<Vec<(http::Method, http::Uri, http::HeaderMap)>>,
    }

    impl Egress for Echo {
        fn start(&self, deadline: Instant) {
            self.started.lock().unwrap().push(deadline);
        }

        fn send(self: Arc<Self>, request: http::Request<EgressBody>) -> EgressFuture {
            let (parts, body) = request.into_parts();
            self.seen
                .lock()
                .unwrap()
                .push((parts.method, parts.uri.clone(), parts.headers));
            Box::pin(async move {
                let mut response = http::Response::new(body);
                response
                    .headers_mut()
                    .insert("x-uri", parts.uri.to_string().parse().unwrap());
                Ok(response)
            })
        }

        fn report(&self) -> CallsReport {
            CallsReport {
                made: self.seen.lock().unwrap().len() as u32,
                ..CallsReport::default()
            }
        }
    }

    fn post(uri: &str, body: EgressBody) -> http::Request<EgressBody> {
        let mut request = http::Request::new(body);
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = uri.parse().unwrap();
        request
            .headers_mut()
            .insert("x-guest", "value".parse().unwrap());
        request
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_streamed_request_and_its_response_cross_whole_and_in_order() {
        let mut w = wire();
        let (echo, egress) = w.echoing(7);
        let data = pattern(0, 5 << 20);
        let clock = Instant::now();
        let mut trailers = http::HeaderMap::new();
        trailers.insert("x-digest", "abc".parse().unwrap());
        let response = Arc::clone(&egress)
            .send(post(
                "http://svc/v1/x?q=1",
                streamed(&data, Some(trailers.clone())),
            ))
            .await
            .expect("answered");
        assert_eq!(response.status(), 200);
        assert_eq!(response.headers()["x-uri"], "http://svc/v1/x?q=1");
        let collected = response.into_body().collect().await.expect("whole");
        assert_eq!(collected.trailers(), Some(&trailers));
        let elapsed = clock.elapsed();
        assert!(collected.to_bytes() == data, "bytes differ");
        eprintln!(
            "5 MiB up and back through postcard in {elapsed:?} ({:.0} MiB/s each way)",
            5.0 / elapsed.as_secs_f64()
        );
        let seen = echo.seen.lock().unwrap().clone();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0].0, http::Method::POST);
        assert_eq!(seen[0].2["x-guest"], "value");
        // The clock: started once, by the gateway, with the wall time it
        // knows.
        let started = echo.started.lock().unwrap().clone();
        assert_eq!(started.len(), 1);
        assert!(started[0] > Instant::now() + Duration::from_secs(30));
        // The report is the gateway egress's; the worker's is empty.
        assert_eq!(egress.report(), CallsReport::default());
        assert_eq!(echo.report().made, 1);
        eventually("both halves forget the call", || {
            w.worker.in_flight() == 0 && w.gateway.in_flight() == 0
        })
        .await;
        assert_eq!(w.gateway.buffered(), 0);
        assert!(w.violations.try_recv().is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn calls_of_two_jobs_interleave() {
        let mut w = wire();
        let echoes = [Arc::new(Echo::default()), Arc::new(Echo::default())];
        let mut calls = Vec::new();
        for (job, echo) in echoes.iter().enumerate() {
            let job = job as u64;
            w.gateway
                .register(job, Arc::clone(echo) as _, Duration::from_secs(60));
            let egress = w.worker.egress(job);
            egress.start(Instant::now());
            for i in 0..3u8 {
                let egress = Arc::clone(&egress);
                let seed = (job as u8) * 16 + i;
                calls.push(tokio::spawn(async move {
                    let data = pattern(seed, 1 << 20);
                    let uri = format!("http://svc/{job}/{i}");
                    let response = egress
                        .send(post(&uri, streamed(&data, None)))
                        .await
                        .unwrap();
                    assert_eq!(response.headers()["x-uri"], uri.as_str());
                    let got = response.into_body().collect().await.unwrap().to_bytes();
                    assert!(got == data, "call {uri}: bytes differ");
                }));
            }
        }
        for call in calls {
            call.await.unwrap();
        }
        for (job, echo) in echoes.iter().enumerate() {
            let seen = echo.seen.lock().unwrap();
            assert_eq!(seen.len(), 3);
            assert!(
                seen.iter()
                    .all(|s| s.1.path().starts_with(&format!("/{job}/")))
            );
        }
        assert!(w.violations.try_recv().is_err());
    }

    /// Sets its flag when dropped.
    #[derive(Debug)]
    struct Dropped(Arc<AtomicBool>);

    impl Drop for Dropped {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    /// Never answers, or answers with a body that never ends; notes when
    /// the call (future, request body, response body) is dropped.
    #[derive(Debug, Default)]
    struct Stall {
        answer: bool,
        asked: AtomicU64,
        dropped: Arc<AtomicBool>,
    }

    impl Egress for Stall {
        fn start(&self, _deadline: Instant) {}

        fn send(self: Arc<Self>, request: http::Request<EgressBody>) -> EgressFuture {
            self.asked.fetch_add(1, Ordering::SeqCst);
            let flag = Dropped(Arc::clone(&self.dropped));
            let answer = self.answer;
            Box::pin(async move {
                let kept = (flag, request);
                if !answer {
                    std::future::pending::<()>().await;
                }
                let body = StreamBody::new(stream::once(async move {
                    let _kept = kept;
                    std::future::pending::<Result<Frame<Bytes>, EgressError>>().await
                }));
                Ok(http::Response::new(body.boxed_unsync()))
            })
        }

        fn report(&self) -> CallsReport {
            CallsReport::default()
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dropping_the_request_or_the_response_in_the_worker_stops_the_gateway() {
        for answer in [false, true] {
            let mut w = wire();
            let stall = Arc::new(Stall {
                answer,
                ..Stall::default()
            });
            w.gateway
                .register(1, Arc::clone(&stall) as _, Duration::from_secs(60));
            let egress = w.worker.egress(1);
            egress.start(Instant::now());
            let (got_tx, got_rx) = oneshot::channel();
            let sent = tokio::spawn(async move {
                let response = egress.send(post("http://svc/", empty())).await;
                let _ = got_tx.send(response.is_ok());
                // Holds the response (and its body) until aborted.
                std::future::pending::<()>().await;
                drop(response);
            });
            eventually("the gateway's egress is asked", || {
                stall.asked.load(Ordering::SeqCst) == 1
            })
            .await;
            if answer {
                assert!(got_rx.await.unwrap(), "no response");
                assert_eq!(w.worker.in_flight(), 1);
            }
            assert!(!stall.dropped.load(Ordering::SeqCst));
            sent.abort();
            eventually("the gateway's call is dropped", || {
                stall.dropped.load(Ordering::SeqCst)
            })
            .await;
            eventually("both halves forget the call", || {
                w.worker.in_flight() == 0 && w.gateway.in_flight() == 0
            })
            .await;
            assert!(w.violations.try_recv().is_err());
        }
    }

    /// Fails as told.
    #[derive(Debug)]
    struct Fails {
        head: Option<EgressError>,
        body: EgressError,
    }

    impl Egress for Fails {
        fn start(&self, _deadline: Instant) {}

        fn send(self: Arc<Self>, _request: http::Request<EgressBody>) -> EgressFuture {
            Box::pin(async move {
                if let Some(e) = self.head.clone() {
                    return Err(e);
                }
                let frames = vec![
                    Ok(Frame::data(Bytes::from_static(b"partial"))),
                    Err(self.body.clone()),
                ];
                Ok(http::Response::new(
                    StreamBody::new(stream::iter(frames)).boxed_unsync(),
                ))
            })
        }

        fn report(&self) -> CallsReport {
            CallsReport::default()
        }
    }

    #[tokio::test]
    async fn egress_errors_reach_the_worker_as_they_were() {
        let mut w = wire();
        let cases = [
            EgressError::Denied,
            EgressError::ConnectionRefused,
            EgressError::Internal(Some("signing failed".into())),
            EgressError::RequestBodySize(Some(9)),
        ];
        for (job, e) in cases.into_iter().enumerate() {
            let job = job as u64;
            let fails = Fails {
                head: Some(e.clone()),
                body: EgressError::Protocol,
            };
            w.gateway
                .register(job, Arc::new(fails), Duration::from_secs(60));
            let egress = w.worker.egress(job);
            egress.start(Instant::now());
            let got = egress
                .send(post("http://svc/", streamed(&[1; 300_000], None)))
                .await
                .unwrap_err();
            assert_eq!(got, e);
        }
        let fails = Fails {
            head: None,
            body: EgressError::ResponseBodySize(Some(7)),
        };
        w.gateway
            .register(99, Arc::new(fails), Duration::from_secs(60));
        let egress = w.worker.egress(99);
        egress.start(Instant::now());
        let response = egress.send(post("http://svc/", empty())).await.unwrap();
        let got = response.into_body().collect().await.unwrap_err();
        assert_eq!(got, EgressError::ResponseBodySize(Some(7)));
        eventually("both halves forget the calls", || {
            w.worker.in_flight() == 0 && w.gateway.in_flight() == 0
        })
        .await;
        assert!(w.violations.try_recv().is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unregistering_a_job_cancels_its_calls() {
        let mut w = wire();
        let stall = Arc::new(Stall::default());
        w.gateway
            .register(3, Arc::clone(&stall) as _, Duration::from_secs(60));
        let egress = w.worker.egress(3);
        egress.start(Instant::now());
        let sent = tokio::spawn(async move {
            let body = StreamBody::new(stream::pending::<Result<Frame<Bytes>, EgressError>>());
            egress.send(post("http://svc/", body.boxed_unsync())).await
        });
        eventually("the gateway's egress is asked", || {
            stall.asked.load(Ordering::SeqCst) == 1
        })
        .await;
        w.gateway.unregister(3);
        let got = sent.await.unwrap().unwrap_err();
        assert_eq!(got, EgressError::Internal(Some("the job ended".into())));
        eventually("the gateway's call is dropped", || {
            stall.dropped.load(Ordering::SeqCst)
        })
        .await;
        eventually("both halves forget the call", || {
            w.worker.in_flight() == 0 && w.gateway.in_flight() == 0
        })
        .await;
        assert!(w.violations.try_recv().is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failing_request_body_fails_the_call_on_both_sides() {
        let mut w = wire();
        let stall = Arc::new(Stall::default());
        w.gateway
            .register(5, Arc::clone(&stall) as _, Duration::from_secs(60));
        let egress = w.worker.egress(5);
        egress.start(Instant::now());
        let frames = vec![
            Ok(Frame::data(Bytes::from_static(b"some"))),
            Err(EgressError::Body("broken".into())),
        ];
        let body = StreamBody::new(stream::iter(frames)).boxed_unsync();
        let got = egress.send(post("http://svc/", body)).await.unwrap_err();
        assert_eq!(got, EgressError::Body("broken".into()));
        eventually("both halves forget the call", || {
            w.worker.in_flight() == 0 && w.gateway.in_flight() == 0
        })
        .await;
        // The request and its abort can reach the gateway together, and its
        // task be stopped before it ever asks its egress; a call it did make
        // is dropped.
        eventually("the gateway's call, if made, is dropped", || {
            stall.asked.load(Ordering::SeqCst) == 0 || stall.dropped.load(Ordering::SeqCst)
        })
        .await;
        assert!(w.violations.try_recv().is_err());
    }

    /// Without the worker's help: a worker that never gives up its calls
    /// still loses them when the job ends.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn unregistering_cancels_calls_a_worker_holds_on_to() {
        let (down, mut rx) = mpsc::unbounded_channel();
        let g = GatewayCalls::new(down);
        let stall = Arc::new(Stall::default());
        g.register(4, Arc::clone(&stall) as _, Duration::from_secs(60));
        g.deliver(CallUp::Started { job: 4 }).unwrap();
        g.deliver(request(4, 0)).unwrap();
        eventually("the gateway's egress is asked", || {
            stall.asked.load(Ordering::SeqCst) == 1
        })
        .await;
        g.unregister(4);
        eventually("the gateway's call is dropped", || {
            stall.dropped.load(Ordering::SeqCst)
        })
        .await;
        assert!(matches!(
            rx.recv().await,
            Some(CallDown::Fail { call: 0, .. })
        ));
        // Its request frames are still checked until it lets go.
        g.deliver(body(0, 10)).unwrap();
        assert_eq!(g.buffered(), 0, "bytes for a cancelled call are kept");
        g.deliver(CallUp::Abort {
            call: 0,
            error: None,
        })
        .unwrap();
        assert_eq!(g.in_flight(), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_response_the_worker_does_not_read_stops_at_its_window() {
        let w = wire();
        let (_echo, egress) = w.echoing(1);
        let data = pattern(3, 4 << 20);
        let response = egress
            .send(post("http://svc/", streamed(&data, None)))
            .await
            .unwrap();
        let limits = CallLimits::default();
        let window = u64::from(limits.window);
        // Pieces go down whole: the last one that fits may leave a gap.
        let filled = window - u64::from(limits.max_chunk);
        eventually("the window is filled", || {
            w.down_bytes.load(Ordering::SeqCst) > filled
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sent = w.down_bytes.load(Ordering::SeqCst);
        assert!(sent <= window, "{sent} bytes sent down unread");
        // And the request stalls behind it, within its own window.
        assert!(w.gateway.buffered() <= window);
        let got = response.into_body().collect().await.unwrap().to_bytes();
        assert!(got == data);
    }

    /// Keeps every request (body unread) and never answers.
    #[derive(Debug, Default)]
    struct Hold {
        kept: Mutex<Vec<http::Request<EgressBody>>>,
    }

    impl Egress for Hold {
        fn start(&self, _deadline: Instant) {}

        fn send(self: Arc<Self>, request: http::Request<EgressBody>) -> EgressFuture {
            self.kept.lock().unwrap().push(request);
            Box::pin(std::future::pending())
        }

        fn report(&self) -> CallsReport {
            CallsReport::default()
        }
    }

    fn request(job: u64, call: u64) -> CallUp {
        CallUp::Request {
            job,
            call,
            method: "GET".into(),
            uri: "http://svc/".into(),
            headers: Vec::new(),
        }
    }

    fn body(call: u64, n: usize) -> CallUp {
        CallUp::Body {
            call,
            chunk: Bytes::from(vec![0u8; n]),
        }
    }

    /// A gateway half with a held egress for job 1 (started) and 2 (not).
    fn gateway(limits: CallLimits) -> (GatewayCalls, mpsc::UnboundedReceiver<CallDown>) {
        let (down, rx) = mpsc::unbounded_channel();
        let g = GatewayCalls::with_limits(down, limits);
        g.register(1, Arc::new(Hold::default()), Duration::from_secs(60));
        g.register(2, Arc::new(Hold::default()), Duration::from_secs(60));
        g.deliver(CallUp::Started { job: 1 }).unwrap();
        (g, rx)
    }

    #[tokio::test]
    async fn a_worker_breaking_the_rules_is_caught() {
        let limits = CallLimits::default();
        let (g, _down) = gateway(limits);
        use Violation as V;
        assert_eq!(g.deliver(CallUp::Started { job: 9 }), Err(V::UnknownJob(9)));
        assert_eq!(
            g.deliver(CallUp::Started { job: 1 }),
            Err(V::StartedTwice(1))
        );
        assert_eq!(g.deliver(request(9, 0)), Err(V::UnknownJob(9)));
        assert_eq!(g.deliver(request(2, 0)), Err(V::NotStarted(2)));
        assert_eq!(g.deliver(body(0, 1)), Err(V::UnknownCall(0)));
        assert_eq!(
            g.deliver(CallUp::Credit { call: 0, bytes: 1 }),
            Err(V::UnknownCall(0))
        );
        g.deliver(request(1, 5)).unwrap();
        assert_eq!(
            g.deliver(request(1, 5)),
            Err(V::CallReused { call: 5, last: 5 })
        );
        assert_eq!(
            g.deliver(request(1, 4)),
            Err(V::CallReused { call: 4, last: 5 })
        );
        assert_eq!(g.deliver(body(6, 1)), Err(V::UnknownCall(6)));
        assert_eq!(g.deliver(body(5, 0)), Err(V::EmptyChunk(5)));
        assert!(matches!(
            g.deliver(body(5, limits.max_chunk as usize + 1)),
            Err(V::Oversized { .. })
        ));
        assert_eq!(
            g.deliver(CallUp::Credit { call: 5, bytes: 1 }),
            Err(V::BeyondSent {
                call: 5,
                bytes: 1,
                outstanding: 0
            })
        );
        g.deliver(CallUp::End {
            call: 5,
            trailers: None,
        })
        .unwrap();
        assert_eq!(g.deliver(body(5, 1)), Err(V::AfterEnd(5)));
        assert_eq!(
            g.deliver(CallUp::End {
                call: 5,
                trailers: None
            }),
            Err(V::AfterEnd(5))
        );
        // Giving up on an ended call, or crediting one whose response
        // just ended, is not a breach (the frames cross).
        g.deliver(CallUp::Abort {
            call: 5,
            error: None,
        })
        .unwrap();
        g.deliver(CallUp::Credit { call: 5, bytes: 1 }).unwrap();
        assert_eq!(g.deliver(body(5, 1)), Err(V::AfterEnd(5)));
        // ...but not with an error longer than a worker sends.
        for error in [
            EgressError::Body(long_text(MAX_ERROR_TEXT + 1)),
            EgressError::Internal(Some(long_text(16 << 20))),
        ] {
            assert!(matches!(
                g.deliver(CallUp::Abort {
                    call: 5,
                    error: Some(error),
                }),
                Err(V::Oversized { .. })
            ));
        }
        g.deliver(CallUp::Abort {
            call: 5,
            error: Some(cut_error(EgressError::Body("é".repeat(8 << 20)))),
        })
        .unwrap();
        // Oversized or malformed heads.
        let long = |n| "x".repeat(n);
        let head = |method: String, uri: String, headers: Vec<Header>| CallUp::Request {
            job: 1,
            call: 100,
            method,
            uri,
            headers,
        };
        let field = |name: &str, n: usize| Header {
            name: name.into(),
            value: Bytes::from(vec![b'v'; n]),
        };
        for bad in [
            head(long(33), "/".into(), Vec::new()),
            head(
                "GET".into(),
                format!("http://svc/{}", long(8 << 10)),
                Vec::new(),
            ),
            head(
                "GET".into(),
                "/".into(),
                (0..129).map(|_| field("x-a", 1)).collect(),
            ),
            head("GET".into(), "/".into(), vec![field("x-a", 64 << 10)]),
            CallUp::End {
                call: 5,
                trailers: Some(vec![field("x-a", 64 << 10)]),
            },
        ] {
            assert!(
                matches!(g.deliver(bad), Err(V::Oversized { .. })),
                "not caught"
            );
        }
        for (bad, what) in [
            (head("G T".into(), "/".into(), Vec::new()), "method"),
            (head("GET".into(), "http://a b/".into(), Vec::new()), "uri"),
            (
                head("GET".into(), "/".into(), vec![field("x a", 1)]),
                "headers",
            ),
        ] {
            assert_eq!(g.deliver(bad), Err(V::Malformed { call: 100, what }));
        }
        // A job never registered stays unknown after others end.
        g.unregister(1);
        assert_eq!(g.deliver(request(7, 200)), Err(V::UnknownJob(7)));
        assert_eq!(g.deliver(CallUp::Started { job: 7 }), Err(V::UnknownJob(7)));
    }

    /// The gateway may cancel a job under a running guest (its client
    /// went, or it overran): a request or start of it already on its way
    /// is refused without blaming the worker, which would fail every other
    /// job in it; its body is taken and dropped; reused call ids are
    /// still caught, and so is a job that ended long ago.
    #[tokio::test]
    async fn frames_of_a_job_cancelled_under_its_guest_are_refused_not_a_breach() {
        let (g, mut down) = gateway(CallLimits::default());
        use Violation as V;
        g.unregister(1);
        g.unregister(2);
        assert_eq!(g.deliver(CallUp::Started { job: 2 }), Ok(()));
        assert_eq!(g.deliver(request(1, 3)), Ok(()));
        match down.try_recv() {
            Ok(CallDown::Fail { call: 3, .. }) => {}
            other => panic!("expected the call refused, got {other:?}"),
        }
        assert_eq!(g.deliver(body(3, 10)), Ok(()));
        assert_eq!(
            down.try_recv(),
            Ok(CallDown::Credit {
                call: 3,
                bytes: charge(10)
            })
        );
        assert_eq!(
            g.deliver(CallUp::End {
                call: 3,
                trailers: None
            }),
            Ok(())
        );
        assert_eq!(g.in_flight(), 0);
        assert_eq!(g.deliver(body(3, 1)), Err(V::AfterEnd(3)));
        assert_eq!(
            g.deliver(request(2, 3)),
            Err(V::CallReused { call: 3, last: 3 })
        );
        for job in 100..100 + ENDED_KEPT as u64 {
            g.register(job, Arc::new(Hold::default()), Duration::from_secs(60));
            g.unregister(job);
        }
        assert_eq!(g.deliver(request(1, 4)), Err(V::UnknownJob(1)));
        assert_eq!(g.deliver(CallUp::Started { job: 2 }), Err(V::UnknownJob(2)));
    }

    #[tokio::test]
    async fn calls_in_flight_are_bounded_per_job_and_per_worker() {
        let limits = CallLimits {
            per_job: 2,
            per_worker: 3,
            ..CallLimits::default()
        };
        let (g, _down) = gateway(limits);
        g.register(3, Arc::new(Hold::default()), Duration::from_secs(60));
        g.deliver(CallUp::Started { job: 3 }).unwrap();
        g.deliver(request(1, 0)).unwrap();
        g.deliver(request(1, 1)).unwrap();
        assert_eq!(
            g.deliver(request(1, 2)),
            Err(Violation::TooManyCalls {
                call: 2,
                scope: "job",
                limit: 2
            })
        );
        g.deliver(request(3, 3)).unwrap();
        assert_eq!(
            g.deliver(request(3, 4)),
            Err(Violation::TooManyCalls {
                call: 4,
                scope: "worker",
                limit: 3
            })
        );
        // A call given up on frees its place.
        g.deliver(CallUp::Abort {
            call: 0,
            error: None,
        })
        .unwrap();
        g.deliver(request(3, 5)).unwrap();
    }

    /// A window bounds a call's unread frames by their number as well as
    /// their bytes: a response streamed in one-byte frames to a guest that
    /// reads none stops after as many frames as their charges fit. (Counted
    /// in bytes alone, a call had 262,144 such frames sent down, 34 MB of
    /// its worker's heap for 256 KiB.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_response_of_tiny_frames_stops_at_its_window_by_their_number() {
        let w = wire();
        let (_echo, egress) = w.echoing(1);
        let tiny: Vec<Result<Frame<Bytes>, EgressError>> = (0..20_000u32)
            .map(|i| Ok(Frame::data(Bytes::from(vec![i as u8]))))
            .collect();
        let response = egress
            .send(post(
                "http://svc/",
                StreamBody::new(stream::iter(tiny)).boxed_unsync(),
            ))
            .await
            .unwrap();
        // A frame waiting in the worker takes up to a kibibyte of its heap:
        // the window's worth of them, no more.
        let most = u64::from(CallLimits::default().window) / 1024;
        eventually("the window is mostly filled", || {
            w.down_frames.load(Ordering::SeqCst) >= most * 3 / 4
        })
        .await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        let sent = w.down_frames.load(Ordering::SeqCst);
        assert!(
            sent <= most,
            "{sent} frames sent down unread, beyond {most}"
        );
        // And a worker sending its request in one-byte frames is held to
        // as few.
        assert!(w.gateway.buffered() <= u64::from(CallLimits::default().window));
        let got = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got.len(), 20_000);
    }

    /// A response that has ended counts among its job's calls until the
    /// guest reads or drops it: what came down of it stays in the worker
    /// until then (counted only until it ended, a job kept 256 such
    /// responses, 65 MB of its worker).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn responses_ended_but_kept_count_among_the_jobs_calls() {
        let w = wire();
        let (_echo, egress) = w.echoing(1);
        let per_job = CallLimits::default().per_job;
        let mut kept = Vec::new();
        for _ in 0..per_job {
            let response = Arc::clone(&egress)
                .send(post("http://svc/", streamed(b"kept", None)))
                .await
                .unwrap();
            kept.push(response);
        }
        eventually("every response has ended", || w.worker.in_flight() == 0).await;
        let refused = Arc::clone(&egress).send(post("http://svc/", empty())).await;
        assert!(
            refused.is_err(),
            "a call past {per_job} kept responses was made"
        );
        drop(kept.pop());
        let response = Arc::clone(&egress)
            .send(post("http://svc/", streamed(b"again", None)))
            .await
            .unwrap();
        let got = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"again");
    }

    /// A worker's jobs may each have their calls, whatever the others
    /// hold: four jobs holding 32 answers each left a fifth job on their
    /// worker unable to call while the worker's bound was a fixed 128.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_jobs_held_answers_leave_the_other_jobs_of_its_worker_their_calls() {
        let places = 5;
        let w = wire_with(CallLimits::for_places(places));
        let per_job = CallLimits::default().per_job;
        let mut kept = Vec::new();
        for job in 1..=u64::from(places) {
            let (_echo, egress) = w.echoing(job);
            let calls = if job == u64::from(places) { 1 } else { per_job };
            for _ in 0..calls {
                let response = Arc::clone(&egress)
                    .send(post("http://svc/", streamed(b"held", None)))
                    .await
                    .unwrap_or_else(|e| panic!("job {job}: {e}"));
                kept.push(response);
            }
        }
        assert_eq!(kept.len(), (places as usize - 1) * per_job + 1);
    }

    /// A worker sending one-byte frames is stopped after as many as their
    /// charges fit in the window, not as many as its bytes.
    #[tokio::test]
    async fn a_worker_flooding_tiny_frames_is_stopped_at_its_window() {
        let limits = CallLimits::default();
        let (g, _down) = gateway(limits);
        g.deliver(request(1, 0)).unwrap();
        let mut frames = 0u64;
        let caught = loop {
            match g.deliver(body(0, 1)) {
                Ok(()) => frames += 1,
                Err(v) => break v,
            }
            assert!(frames <= u64::from(limits.window), "{frames} frames taken");
        };
        assert!(matches!(caught, Violation::BeyondWindow { .. }), "{caught}");
        // A frame waiting in the gateway takes up to a kibibyte of its
        // heap: the window's worth of them, no more.
        assert!(
            frames <= u64::from(limits.window) / 1024,
            "{frames} frames taken"
        );
        assert_eq!(frames, u64::from(limits.window) / charge(1));
    }

    #[tokio::test]
    async fn a_flooding_worker_is_stopped_at_its_window() {
        let limits = CallLimits {
            per_job: 8,
            per_worker: 8,
            ..CallLimits::default()
        };
        let (g, _down) = gateway(limits);
        let window = u64::from(limits.window);
        for call in 0..8 {
            g.deliver(request(1, call)).unwrap();
            let mut accepted = 0u64;
            let caught = loop {
                match g.deliver(body(call, 60_000)) {
                    Ok(()) => accepted += 60_000,
                    Err(v) => break v,
                }
                assert!(accepted <= window, "{accepted} bytes taken");
            };
            assert!(matches!(caught, Violation::BeyondWindow { .. }), "{caught}");
            assert!(accepted > window - 60_000);
        }
        assert!(g.buffered() <= 8 * window, "{} buffered", g.buffered());
    }

    /// The real gateway egress behind the crossing: the guest's
    /// credentials are stripped and the call's token minted in the
    /// gateway, refusals are recorded there, and the worker's own report
    /// stays empty.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_relay_grant_checks_strips_and_signs_in_the_gateway() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (heard_tx, heard_rx) = oneshot::channel();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = socket.read(&mut buf).await.unwrap();
                request.extend_from_slice(&buf[..n]);
            }
            let _ = heard_tx.send(String::from_utf8_lossy(&request).into_owned());
            socket
                .write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
                )
                .await
                .unwrap();
            socket.flush().await.unwrap();
        });
        let grant = crate::relay::send::test_grant(addr);
        let mut w = wire();
        w.gateway
            .register(1, Arc::clone(&grant) as _, Duration::from_secs(30));
        let egress = w.worker.egress(1);
        egress.start(Instant::now());
        let mut request = http::Request::new(empty());
        *request.uri_mut() = "http://palette/v1/x".parse().unwrap();
        request
            .headers_mut()
            .insert("authorization", "Bearer guest-secret".parse().unwrap());
        request
            .headers_mut()
            .insert("cookie", "guest-cookie".parse().unwrap());
        let response = Arc::clone(&egress).send(request).await.expect("answered");
        assert_eq!(response.status(), 200);
        let got = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"hello");
        let heard = heard_rx.await.unwrap().to_ascii_lowercase();
        assert!(heard.contains("authorization: bearer "), "{heard}");
        assert!(!heard.contains("guest-secret"), "{heard}");
        assert!(!heard.contains("guest-cookie"), "{heard}");
        // Refused in the gateway, as the guest is told.
        let mut refused = http::Request::new(empty());
        *refused.uri_mut() = "http://payments/v1/x".parse().unwrap();
        let e = Arc::clone(&egress).send(refused).await.unwrap_err();
        assert_eq!(e, EgressError::Denied);
        let report = grant.report();
        assert_eq!((report.made, report.refused), (1, 1), "{report:?}");
        assert!(
            report.records[0]
                .stripped_headers
                .iter()
                .any(|h| h == "cookie"),
            "{report:?}"
        );
        assert_eq!(egress.report(), CallsReport::default());
        assert!(w.violations.try_recv().is_err());
    }

    #[test]
    fn frames_survive_postcard() {
        let frames = [
            CallUp::Request {
                job: 1,
                call: 2,
                method: "PUT".into(),
                uri: "http://svc/a?b".into(),
                headers: vec![Header {
                    name: "x-a".into(),
                    value: Bytes::from_static(b"\xff\x00v"),
                }],
            },
            CallUp::Body {
                call: 2,
                chunk: Bytes::from(vec![7u8; 70_000]),
            },
            CallUp::Abort {
                call: 2,
                error: Some(EgressError::Body("broken".into())),
            },
        ];
        for f in frames {
            assert_eq!(roundtrip(f.clone()), f);
        }
        let down = CallDown::Head {
            call: 2,
            result: Err(EgressError::ResponseBodySize(Some(3))),
        };
        assert_eq!(roundtrip(down.clone()), down);
        // A body chunk costs its bytes and a few more.
        let n = postcard::to_stdvec(&CallUp::Body {
            call: 2,
            chunk: Bytes::from(vec![7u8; 70_000]),
        })
        .unwrap()
        .len();
        assert!(n < 70_010, "{n}");
    }
}
