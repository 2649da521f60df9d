//! Sending a guest's request: the per-job [`CallGrant`], the job's
//! [`Egress`], which admits, rewrites, signs, sends and meters each call
//! the sandbox hands it.
//!
//! Order for one call: resolve the authority to a declared, granted service
//! ([`gate::resolve`]), check method and path ([`gate::check_route`]), take
//! one of the job's calls for that service, check the declared body size,
//! forward only the allowed headers ([`headers`]) and no trailers, mint a
//! token for this call, ask for `Accept-Encoding: identity`, send it to the
//! service's real address with a deadline, withhold an answer in any other
//! encoding, refuse a redirect that leaves the service's allowed paths, and
//! hand the guest a fresh response: the status, the allowed headers (none
//! carrying a form of a token, [`leak`]), and a body that is bounded,
//! scanned as one stream for every form of the job's tokens, and stripped of
//! trailers.
//! Every refusal is recorded in the job's [`CallsReport`]; the service turns
//! those into audit entries.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{
    ACCEPT_ENCODING, AUTHORIZATION, CONTENT_ENCODING, HOST, HeaderValue, LOCATION,
    TRANSFER_ENCODING,
};
use http::request::Parts;
use http::uri::Scheme;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::gate::{self, Directory, Refusal};
use super::headers;
use super::leak::{Needles, Scanner, TokenNeedles, Withheld};
use super::{Relay, ServiceDecl};
use crate::job::egress::{CallRecord, CallsReport, Egress, EgressError, EgressFuture, MAX_RECORDS};
use crate::policy::ServiceName;

/// Body type of guest requests and of the responses they get.
type GuestBody = UnsyncBoxBody<Bytes, EgressError>;

/// The host's HTTP client for service calls (HTTP/1.1, pooled).
pub type Client = hyper_util::client::legacy::Client<HttpConnector, Metered>;

/// Builds the shared client. Connections are pooled per service address.
pub fn client() -> Client {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.enforce_http(true);
    connector.set_connect_timeout(Some(Duration::from_secs(5)));
    hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(32)
        // Each call holds its connection's read buffer, and the piece of
        // its body it last read (a slice of that buffer), while its guest
        // has not read what came before: hyper's default grows to about
        // 400 KB, and with the scan's views a call a guest left unread
        // held about 2.8 MB of the gateway (found by an attacker: a
        // tenant's 384 such calls took the gateway to 1.08 GB).
        .http1_max_buf_size(MAX_READ_BUFFER)
        .build(connector)
}

/// The most a service call's connection buffers of what it reads, and so
/// the largest head a service may send and the largest piece of body one
/// read yields.
pub const MAX_READ_BUFFER: usize = 64 << 10;

/// Who submitted the job: the identity minted tokens carry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    /// Tenant.
    pub tenant: String,
    /// Subject within the tenant.
    pub subject: String,
    /// Scopes of the submitting token.
    pub scopes: Vec<String>,
}

/// Called with each refused request as it is refused (the service writes
/// an audit entry), for the first [`MAX_RECORDS`] of a job: a guest looping
/// over refused requests must not flood the audit log or the host's log.
#[derive(Clone)]
pub struct RefusalSink(pub Arc<dyn Fn(&CallRecord) + Send + Sync>);

impl std::fmt::Debug for RefusalSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RefusalSink")
    }
}

impl Relay {
    /// The way out of one job of a module under `policy`: a [`CallGrant`]
    /// narrowing this relay's declarations to the policy's services,
    /// carrying `caller` (the submitting identity, or why there is none:
    /// every call is then refused and reported) and telling `sink` of each
    /// refusal. `None` when the policy names no services.
    pub fn grant(
        self: &Arc<Self>,
        policy: &crate::policy::Policy,
        job: &str,
        caller: Result<Caller, String>,
        sink: Option<RefusalSink>,
    ) -> Option<Arc<dyn Egress>> {
        if policy.network.services.is_empty() {
            return None;
        }
        Some(Arc::new(
            CallGrant::new(
                Arc::clone(self),
                policy.network.services.clone(),
                caller,
                job,
                policy.module.name.as_str(),
            )
            .with_sink(sink),
        ))
    }
}

/// One job's right to call services: the grant narrows the relay's
/// declarations to the policy's names and carries the caller's identity.
pub struct CallGrant {
    relay: Arc<Relay>,
    granted: Vec<ServiceName>,
    caller: Result<Caller, String>,
    job: String,
    module: String,
    deadline: OnceLock<Instant>,
    sent: AtomicU64,
    received: AtomicU64,
    state: Mutex<GrantState>,
    sink: Option<RefusalSink>,
}

#[derive(Default)]
struct GrantState {
    calls_per_service: std::collections::BTreeMap<String, u32>,
    report: CallsReport,
    /// The needles of the tokens minted for this job that may still be
    /// valid, with when they expire at the latest (the newest
    /// [`super::leak::MAX_TOKENS`]): no response may carry any of them.
    minted: Vec<(Instant, Arc<TokenNeedles>)>,
    /// What searches its calls' long answers: one automaton of them all.
    combined: Arc<super::leak::Combined>,
}

impl GrantState {
    /// Why a call past the job's live tokens is refused.
    fn token_bound() -> Refusal {
        Refusal::Limit(format!(
            "at most {} live call tokens per job",
            super::leak::MAX_TOKENS
        ))
    }

    /// Drops the tokens no verifier accepts any more (at `now`); whether
    /// the job holds [`super::leak::MAX_TOKENS`] live ones still.
    fn full_of_tokens(&mut self, now: Instant) -> bool {
        self.minted.retain(|(expiry, _)| *expiry > now);
        self.minted.len() >= super::leak::MAX_TOKENS
    }
}

impl std::fmt::Debug for CallGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallGrant")
            .field("granted", &self.granted)
            .field("job", &self.job)
            .finish_non_exhaustive()
    }
}

impl Egress for CallGrant {
    fn start(&self, deadline: Instant) {
        let _ = self.deadline.set(deadline);
    }

    fn send(self: Arc<Self>, request: http::Request<GuestBody>) -> EgressFuture {
        Box::pin(self.call(request))
    }

    fn report(&self) -> CallsReport {
        let mut r = self.lock().report.clone();
        r.bytes_sent = self.sent.load(Ordering::Relaxed);
        r.bytes_received = self.received.load(Ordering::Relaxed);
        r
    }
}

impl Directory for CallGrant {
    fn declared(&self, name: &str) -> Option<&ServiceDecl> {
        self.relay.service(name)
    }
    fn granted(&self, name: &ServiceName) -> bool {
        self.granted.contains(name)
    }
}

impl CallGrant {
    /// A grant for one job. `caller` is the submitting identity, or why
    /// there is none (every call is then refused).
    pub fn new(
        relay: Arc<Relay>,
        granted: Vec<ServiceName>,
        caller: Result<Caller, String>,
        job: &str,
        module: &str,
    ) -> Self {
        Self {
            relay,
            granted,
            caller,
            job: job.to_owned(),
            module: module.to_owned(),
            deadline: OnceLock::new(),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            state: Mutex::new(GrantState::default()),
            sink: None,
        }
    }

    /// Reports each refusal to `sink` as it happens.
    #[must_use]
    pub fn with_sink(mut self, sink: Option<RefusalSink>) -> Self {
        self.sink = sink;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, GrantState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `rec` to the report; a refusal among the listed records is
    /// logged and handed to the sink.
    fn record(&self, rec: CallRecord) {
        let mut s = self.lock();
        if rec.refused.is_some() {
            s.report.refused += 1;
        }
        if s.report.records.len() >= MAX_RECORDS {
            s.report.records_dropped += 1;
            return;
        }
        s.report.records.push(rec.clone());
        drop(s);
        if let Some(reason) = &rec.refused {
            tracing::warn!(
                job = %self.job,
                module = %self.module,
                target = %rec.target,
                reason = %reason,
                "outbound request refused"
            );
            if let Some(sink) = &self.sink {
                (sink.0)(&rec);
            }
        }
    }

    fn refuse(&self, parts: &Parts, service: Option<&str>, refusal: &Refusal) -> EgressError {
        self.record(CallRecord {
            method: parts.method.to_string(),
            target: target_of(parts),
            service: service.map(str::to_owned),
            refused: Some(refusal.to_string()),
            class: Some(refusal.class().to_owned()),
            ..CallRecord::default()
        });
        EgressError::Denied
    }

    /// Admits, signs, sends and meters one guest request.
    async fn call(
        self: Arc<Self>,
        request: http::Request<GuestBody>,
    ) -> Result<http::Response<GuestBody>, EgressError> {
        let (parts, body) = request.into_parts();
        let decl = match gate::resolve(
            &*self,
            parts.uri.scheme_str(),
            parts.uri.authority().map(http::uri::Authority::as_str),
            &parts.headers,
        ) {
            Ok(decl) => decl.clone(),
            Err(refusal) => return Err(self.refuse(&parts, None, &refusal)),
        };
        let service = decl.name.to_string();
        let path = parts
            .uri
            .path_and_query()
            .map_or("/", http::uri::PathAndQuery::as_str)
            .to_owned();
        if let Err(refusal) = gate::check_route(&decl, &parts.method, &path) {
            return Err(self.refuse(&parts, Some(&service), &refusal));
        }
        let caller = match &self.caller {
            Ok(c) => c.clone(),
            Err(why) => {
                return Err(self.refuse(&parts, Some(&service), &Refusal::Identity(why.clone())));
            }
        };
        let remaining = self.deadline.get().map_or(Duration::ZERO, |d| {
            d.saturating_duration_since(Instant::now())
        });
        if remaining.is_zero() {
            let r = Refusal::Limit("the job's deadline has passed".into());
            return Err(self.refuse(&parts, Some(&service), &r));
        }
        if let Some(len) = declared_length(&parts.headers)
            && len > decl.max_request.as_u64()
        {
            let r = Refusal::Limit(format!(
                "request body of {len} bytes exceeds `{service}`'s max_request of {}",
                decl.max_request
            ));
            return Err(self.refuse(&parts, Some(&service), &r));
        }

        // A body some framework reads parameters from is read here first
        // (bounded) and checked for method overrides: nothing reaches the
        // service when it carries one.
        let dropped_trailers = Arc::new(Mutex::new(Vec::new()));
        let body = if gate::body_is_parsed(&parts.headers) {
            let bound = gate::MAX_CHECKED_BODY.min(decl.max_request.as_u64());
            let wait = decl.timeout.get().min(remaining);
            let bytes = match read_bounded(body, bound, wait, &dropped_trailers).await {
                Ok(bytes) => bytes,
                Err(why) => {
                    return Err(self.refuse(&parts, Some(&service), &Refusal::Limit(why)));
                }
            };
            if let Some(key) = gate::body_override(&bytes) {
                let r = Refusal::BodyOverride {
                    key,
                    service: service.clone(),
                };
                return Err(self.refuse(&parts, Some(&service), &r));
            }
            http_body_util::Full::new(bytes)
                .map_err(|never| match never {})
                .boxed_unsync()
        } else {
            body
        };

        {
            let mut s = self.lock();
            // Every live token of the job is searched for in every answer;
            // past that many, a call waits for one to expire instead of
            // minting a token no scan would look for.
            if s.full_of_tokens(Instant::now()) {
                drop(s);
                return Err(self.refuse(&parts, Some(&service), &GrantState::token_bound()));
            }
            let n = s.calls_per_service.entry(service.clone()).or_default();
            if *n >= decl.max_calls {
                drop(s);
                let r = Refusal::Limit(format!(
                    "call limit reached: at most {} calls to `{service}` per job",
                    decl.max_calls
                ));
                return Err(self.refuse(&parts, Some(&service), &r));
            }
            *n += 1;
            s.report.made += 1;
        }
        let token = self.mint(&decl, &caller, remaining).map_err(|e| {
            tracing::error!(job = %self.job, error = %e, "cannot mint a call token");
            EgressError::Internal(Some("the host could not sign this call".into()))
        })?;
        let own = Arc::new(TokenNeedles::new(&token));
        let needles = {
            let now = Instant::now();
            let mut s = self.lock();
            // Searched for as long as any verifier may accept it: its
            // `exp` (rounded up to a second), plus the most leeway
            // `bulkhead-verify` allows (found by an attacker: dropped 2 s
            // after its `exp`, a token a service still accepted for 3 s
            // more reached the guest through a stashing service).
            let expiry =
                now + self.relay.lifetime + bulkhead_verify::MAX_LEEWAY + Duration::from_secs(2);
            // Calls checked against the bound at once may each have
            // minted: the one past it is refused, its token never sent,
            // and no live token is dropped from the search.
            if s.full_of_tokens(now) {
                drop(s);
                return Err(self.refuse(&parts, Some(&service), &GrantState::token_bound()));
            }
            s.minted.push((expiry, Arc::clone(&own)));
            let tokens: Vec<_> = s.minted.iter().map(|(_, n)| Arc::clone(n)).collect();
            s.combined.minted(tokens);
            // Other jobs' answers are searched for it as well, from before
            // it is sent.
            self.relay.issued.add(&caller.tenant, &token, expiry);
            // Every answer is searched for every token the job has then,
            // its own call's and those minted before or since, and for
            // every other job's.
            Arc::new(
                Needles::shared(vec![own], Arc::clone(&s.combined))
                    .and_issued(Arc::clone(&self.relay.issued)),
            )
        };

        let mut record = CallRecord {
            method: parts.method.to_string(),
            target: target_of(&parts),
            service: Some(service.clone()),
            ..CallRecord::default()
        };
        let mut out = http::Request::builder().method(parts.method.clone()).uri(
            http::Uri::builder()
                .scheme(Scheme::HTTP)
                .authority(decl.url.authority.clone())
                .path_and_query(format!("{}{path}", decl.url.base_path))
                .build()
                .map_err(|_| EgressError::UriInvalid)?,
        );
        for (name, value) in &parts.headers {
            if headers::forwarded(name, &decl.forward_headers) {
                out = out.header(name, value);
            } else {
                note_stripped(&mut record.stripped_headers, name.as_str().to_owned());
            }
        }
        let bearer = HeaderValue::try_from(format!("Bearer {token}"))
            .map_err(|_| EgressError::Internal(None))?;
        out = out
            .header(HOST, decl.url.authority.as_str())
            .header(AUTHORIZATION, bearer)
            .header(ACCEPT_ENCODING, HeaderValue::from_static("identity"));
        let body = Metered {
            inner: body,
            limit: decl.max_request.as_u64(),
            seen: 0,
            total: Arc::clone(&self) as Arc<dyn Meter>,
            dropped_trailers: Arc::clone(&dropped_trailers),
        };
        let out = out
            .body(body)
            .map_err(|e| EgressError::Internal(Some(e.to_string())))?;

        let wait = decl.timeout.get().min(remaining);
        let response = match tokio::time::timeout(wait, self.relay.client.request(out)).await {
            Err(_) => {
                record.error = Some(format!("no response within {} ms", wait.as_millis()));
                self.record(record);
                return Err(EgressError::ConnectionTimeout);
            }
            Ok(Err(e)) => {
                let connect = e.is_connect();
                record.error = Some(if connect {
                    "the service is unreachable".into()
                } else {
                    "the call failed".into()
                });
                tracing::warn!(job = %self.job, service = %service, error = %e, "service call failed");
                self.record(record);
                return Err(if connect {
                    EgressError::ConnectionRefused
                } else {
                    EgressError::Protocol
                });
            }
            Ok(Ok(r)) => r,
        };
        let (head, incoming) = response.into_parts();
        record.status = Some(head.status.as_u16());
        let dropped =
            std::mem::take(&mut *dropped_trailers.lock().unwrap_or_else(|e| e.into_inner()));
        for name in dropped {
            note_stripped(&mut record.stripped_headers, format!("trailer:{name}"));
        }
        let withhold = |mut record: CallRecord, refusal: Refusal| {
            record.refused = Some(refusal.to_string());
            record.class = Some(refusal.class().to_owned());
            self.record(record);
            EgressError::Denied
        };

        // Only identity bytes can be scanned: the gate asked for them, and
        // withholds anything else (a compressed echo of the token would
        // pass any scan of the bytes as sent).
        if let Some(encoding) = not_identity(&head.headers) {
            let r = Refusal::Encoding {
                service: service.clone(),
                encoding: redacted(&needles, &encoding),
            };
            return Err(withhold(record, r));
        }

        let mut location = None;
        if head.status.is_redirection()
            && let Some(value) = head.headers.get(LOCATION)
        {
            let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
            match redirect_target(&decl, &path, &value) {
                Some(rewritten) => {
                    location = Some(
                        HeaderValue::try_from(rewritten)
                            .map_err(|_| EgressError::Internal(None))?,
                    );
                }
                None => {
                    let r = Refusal::Redirect {
                        service: service.clone(),
                        location: redacted(&needles, &value),
                    };
                    return Err(withhold(record, r));
                }
            }
        }
        // A fresh response: the status and the allowed headers, nothing of
        // the service's (no reason phrase, no extensions, no other header).
        let mut fresh = http::Response::new(());
        *fresh.status_mut() = head.status;
        for (name, value) in &head.headers {
            if name != LOCATION && headers::returned(name) {
                fresh.headers_mut().append(name.clone(), value.clone());
            }
        }
        if let Some(location) = location {
            fresh.headers_mut().insert(LOCATION, location);
        }
        // The headers the guest sees are searched as one stream, in order:
        // their values joined (a form split across values) and as they read
        // on the wire; then the body is searched as if it followed the last
        // value (a form split between the headers and the body).
        let mut values = Vec::new();
        let mut wire = Vec::new();
        for (name, value) in fresh.headers() {
            values.extend_from_slice(value.as_bytes());
            wire.extend_from_slice(name.as_str().as_bytes());
            wire.extend_from_slice(b": ");
            wire.extend_from_slice(value.as_bytes());
            wire.extend_from_slice(b"\r\n");
        }
        let scanner = if needles.found(&wire) {
            None
        } else {
            Scanner::after(Arc::clone(&needles), &values).ok()
        };
        let Some(scanner) = scanner else {
            tracing::error!(job = %self.job, service = %service, "a service echoed its call token in a response header; withheld");
            let r = Refusal::Leak {
                service: service.clone(),
                place: "headers",
            };
            return Err(withhold(record, r));
        };
        let size = headers::size(fresh.headers());
        if size > headers::MAX_RETURNED_BYTES {
            record.error = Some(format!(
                "the response's headers a guest may see take {size} bytes, more than {}",
                headers::MAX_RETURNED_BYTES
            ));
            self.record(record);
            return Err(EgressError::ResponseHeaderSize(u32::try_from(size).ok()));
        }
        let withheld = record.clone();
        self.record(record);
        let grant = Arc::clone(&self);
        let idle = decl.timeout.get();
        let body = Guarded {
            inner: incoming,
            idle,
            stall: Box::pin(tokio::time::sleep(idle)),
            limit: decl.max_response.as_u64(),
            seen: 0,
            scanner,
            ended: false,
            on_leak: Some(Box::new(move |why: &Withheld| {
                let refusal = match why {
                    Withheld::Leak => Refusal::Leak {
                        service: service.clone(),
                        place: "body",
                    },
                    Withheld::Opaque(why) => Refusal::Unsearchable {
                        service: service.clone(),
                        why: why.clone(),
                    },
                };
                grant.record(CallRecord {
                    refused: Some(refusal.to_string()),
                    class: Some(refusal.class().to_owned()),
                    ..withheld
                });
            })),
            meter: Arc::clone(&self) as Arc<dyn Meter>,
        };
        let (parts, ()) = fresh.into_parts();
        Ok(http::Response::from_parts(parts, body.boxed_unsync()))
    }

    fn mint(
        &self,
        decl: &ServiceDecl,
        caller: &Caller,
        remaining: Duration,
    ) -> Result<String, super::KeyError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        // Never valid past the job's deadline (rounded up to a second).
        let lifetime = self
            .relay
            .lifetime
            .min(remaining + Duration::from_millis(999))
            .as_secs()
            .max(1);
        let claims = bulkhead_verify::CallClaims {
            iss: self.relay.issuer.clone(),
            aud: decl.audience.clone(),
            sub: caller.subject.clone(),
            tenant: caller.tenant.clone(),
            scopes: caller.scopes.clone(),
            job: self.job.clone(),
            module: self.module.clone(),
            iat: now,
            nbf: now,
            exp: now + lifetime,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        self.relay.keys.mint(&claims)
    }
}

/// Counts body bytes into a job's totals.
trait Meter: Send + Sync {
    fn sent(&self, n: u64);
    fn received(&self, n: u64);
}

impl Meter for CallGrant {
    fn sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }
    fn received(&self, n: u64) {
        self.received.fetch_add(n, Ordering::Relaxed);
    }
}

/// A guest request body, counted and bounded, without trailers: a trailer
/// field would reach the service past the header allow-list, so trailer
/// frames are dropped (their names go into the call's record).
pub struct Metered {
    inner: GuestBody,
    limit: u64,
    seen: u64,
    total: Arc<dyn Meter>,
    dropped_trailers: Arc<Mutex<Vec<String>>>,
}

impl std::fmt::Debug for Metered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metered")
            .field("limit", &self.limit)
            .field("seen", &self.seen)
            .finish_non_exhaustive()
    }
}

impl Body for Metered {
    type Data = Bytes;
    type Error = EgressError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, EgressError>>> {
        let this = &mut *self;
        loop {
            let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
            if let Some(Ok(f)) = &frame {
                if let Some(data) = f.data_ref() {
                    let n = data.len() as u64;
                    this.seen += n;
                    if this.seen > this.limit {
                        return Poll::Ready(Some(Err(EgressError::RequestBodySize(Some(
                            this.seen,
                        )))));
                    }
                    this.total.sent(n);
                } else {
                    if let Some(trailers) = f.trailers_ref() {
                        let mut names = this
                            .dropped_trailers
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        for name in trailers.keys() {
                            if names.len() < 32 && !names.iter().any(|n| n == name.as_str()) {
                                names.push(name.as_str().to_owned());
                            }
                        }
                    }
                    continue;
                }
            }
            return Poll::Ready(frame);
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Records a withheld response.
type OnWithheld = Box<dyn FnOnce(&Withheld) + Send>;

/// A service's response body on its way to the guest: bounded, counted,
/// scanned as one stream for every form of the job's tokens (withheld at
/// the first), and without trailers (dropped: they are never scanned, and
/// a service reflecting request headers would put them there).
struct Guarded {
    inner: hyper::body::Incoming,
    /// The longest wait for the next frame: the call's timeout again.
    idle: Duration,
    /// When the wait for the next frame ends.
    stall: Pin<Box<tokio::time::Sleep>>,
    limit: u64,
    seen: u64,
    scanner: Scanner,
    /// The service's body has ended (the held-back bytes may remain).
    ended: bool,
    /// Records the withheld response, once.
    on_leak: Option<OnWithheld>,
    meter: Arc<dyn Meter>,
}

impl Body for Guarded {
    type Data = Bytes;
    type Error = EgressError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, EgressError>>> {
        let this = &mut *self;
        loop {
            if this.ended {
                let rest = this.scanner.finish();
                return Poll::Ready((!rest.is_empty()).then(|| Ok(Frame::data(rest))));
            }
            let polled = Pin::new(&mut this.inner).poll_frame(cx);
            if polled.is_pending() {
                // A service that sends its headers and then stalls holds
                // the guest's call (and the job's slot) no longer than a
                // response that never comes would.
                ready!(this.stall.as_mut().poll(cx));
                tracing::warn!("a service's response body stalled; the call is failed");
                return Poll::Ready(Some(Err(EgressError::ConnectionReadTimeout)));
            }
            this.stall
                .as_mut()
                .reset(tokio::time::Instant::now() + this.idle);
            let frame = match ready!(polled) {
                None => {
                    this.ended = true;
                    continue;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = ?e, "a service's response body failed");
                    return Poll::Ready(Some(Err(EgressError::Protocol)));
                }
                Some(Ok(f)) => f,
            };
            let Ok(data) = frame.into_data() else {
                // Trailers: dropped.
                continue;
            };
            let n = data.len() as u64;
            this.seen += n;
            if this.seen > this.limit {
                return Poll::Ready(Some(Err(EgressError::ResponseBodySize(Some(this.seen)))));
            }
            this.meter.received(n);
            match this.scanner.feed(&data) {
                Ok(pass) if pass.is_empty() => {}
                Ok(pass) => return Poll::Ready(Some(Ok(Frame::data(pass)))),
                Err(why) => {
                    tracing::error!(reason = %why, "a service's response body was withheld");
                    if let Some(record) = this.on_leak.take() {
                        record(&why);
                    }
                    this.ended = true;
                    return Poll::Ready(Some(Err(EgressError::Internal(Some(why.to_string())))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.scanner.held() == 0
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let held = self.scanner.held() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower() + held);
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper + held);
        }
        hint
    }
}

/// Reads a guest request body whole, up to `bound` bytes and for at most
/// `wait`; trailer fields are dropped (their names noted in `trailers`).
///
/// # Errors
/// Why it was not read: longer than `bound`, too slow, or broken.
async fn read_bounded(
    mut body: GuestBody,
    bound: u64,
    wait: Duration,
    trailers: &Mutex<Vec<String>>,
) -> Result<Bytes, String> {
    let read = async {
        let mut out = bytes::BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("the request body could not be read: {e}"))?;
            if let Some(data) = frame.data_ref() {
                if (out.len() + data.len()) as u64 > bound {
                    return Err(format!(
                        "a form, multipart or JSON request body (or one without a content type) \
                         over {bound} bytes cannot be checked for method overrides: refused"
                    ));
                }
                out.extend_from_slice(data);
            } else if let Some(t) = frame.trailers_ref() {
                let mut names = trailers.lock().unwrap_or_else(|e| e.into_inner());
                for name in t.keys() {
                    if names.len() < 32 && !names.iter().any(|n| n == name.as_str()) {
                        names.push(name.as_str().to_owned());
                    }
                }
            }
        }
        Ok(out.freeze())
    };
    tokio::time::timeout(wait, read).await.unwrap_or_else(|_| {
        Err(format!(
            "the request body did not arrive within {} ms",
            wait.as_millis()
        ))
    })
}

/// The first `Content-Encoding` or `Transfer-Encoding` of `headers` that
/// is not `identity` (or `chunked`, which hyper has already removed).
fn not_identity(headers: &http::HeaderMap) -> Option<String> {
    for (name, allowed) in [
        (CONTENT_ENCODING, "identity"),
        (TRANSFER_ENCODING, "chunked"),
    ] {
        for value in headers.get_all(&name) {
            let text = String::from_utf8_lossy(value.as_bytes());
            for coding in text.split(',') {
                let coding = coding.trim();
                if !coding.is_empty() && !coding.eq_ignore_ascii_case(allowed) {
                    return Some(format!("{name}: {coding}"));
                }
            }
        }
    }
    None
}

/// `value` from a service's answer, bounded, for a refusal's record: the
/// record reaches the report and the audit log, so a value carrying a
/// form of a call token is not copied.
fn redacted(needles: &Needles, value: &str) -> String {
    if needles.found(value.as_bytes()) {
        "(withheld: it carries a call token)".into()
    } else {
        bounded(value)
    }
}

/// Adds `name` to a record's stripped list (once; at most 64).
fn note_stripped(list: &mut Vec<String>, name: String) {
    if list.len() < 64 && !list.contains(&name) {
        list.push(name);
    }
}

/// A message's declared `Content-Length`, if it has a valid one.
pub(crate) fn declared_length(headers: &http::HeaderMap) -> Option<u64> {
    headers
        .get(http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn bounded(s: &str) -> String {
    const MAX: usize = 512;
    if s.len() <= MAX {
        return s.escape_debug().to_string();
    }
    let end = s.floor_char_boundary(MAX);
    format!("{}…", s[..end].escape_debug())
}

fn target_of(parts: &Parts) -> String {
    bounded(&parts.uri.to_string())
}

/// Where a redirect from `decl` (answering `request_path`) may send the
/// guest, as the guest should see it (`http://<name>/…`); `None` when it
/// leaves the service or its allowed paths.
fn redirect_target(decl: &ServiceDecl, request_path: &str, location: &str) -> Option<String> {
    let path = if let Some(rest) = location.strip_prefix("http://") {
        let (authority, path) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
        if authority == decl.name.as_str() {
            path.to_owned()
        } else if authority == decl.url.authority.as_str() {
            path.strip_prefix(decl.url.base_path.as_str())?.to_owned()
        } else {
            return None;
        }
    } else if location.starts_with("//")
        || location.contains("://")
        || location.contains(':') && !location.starts_with('/')
    {
        return None;
    } else if location.starts_with('/') {
        location
            .strip_prefix(decl.url.base_path.as_str())?
            .to_owned()
    } else {
        let base = request_path
            .split('?')
            .next()
            .and_then(|p| p.rfind('/').map(|i| &p[..=i]))
            .unwrap_or("/");
        format!("{base}{location}")
    };
    let path = if path.is_empty() {
        "/".to_owned()
    } else {
        path
    };
    gate::check_route(decl, &http::Method::GET, &path).ok()?;
    Some(format!("http://{}{path}", decl.name))
}

/// A grant (not started) of job `job`, tenant `acme`, to the service
/// `palette` at `addr`, with an ephemeral key (tests).
#[cfg(test)]
pub(crate) fn test_grant(addr: std::net::SocketAddr) -> Arc<CallGrant> {
    let decl = ServiceDecl::example("palette", &format!("http://{addr}"));
    let relay = Arc::new(
        Relay::new(
            vec![decl.clone()],
            Arc::new(super::KeyRing::ephemeral()),
            &super::TokenConfig::default(),
        )
        .unwrap(),
    );
    Arc::new(CallGrant::new(
        relay,
        vec![decl.name.clone()],
        Ok(Caller {
            tenant: "acme".into(),
            subject: "alice".into(),
            scopes: Vec::new(),
        }),
        "job",
        "module",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderName;

    #[test]
    fn redirects_stay_inside_the_service() {
        let mut d = ServiceDecl::example("palette", "http://127.0.0.1:9101");
        d.paths = vec!["/v1".into()];
        let ok = |loc: &str| redirect_target(&d, "/v1/a/b", loc);
        assert_eq!(ok("/v1/x").as_deref(), Some("http://palette/v1/x"));
        assert_eq!(ok("c").as_deref(), Some("http://palette/v1/a/c"));
        assert_eq!(
            ok("http://palette/v1/y").as_deref(),
            Some("http://palette/v1/y")
        );
        assert_eq!(
            ok("http://127.0.0.1:9101/v1/z").as_deref(),
            Some("http://palette/v1/z")
        );
        for bad in [
            "http://payments/v1/x",
            "http://127.0.0.1:9102/v1/x",
            "//payments/v1/x",
            "https://palette/v1/x",
            "/admin",
            "/v1/../admin",
            "../../admin",
            "javascript:alert(1)",
            "http://palette@payments/v1",
        ] {
            assert_eq!(ok(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_identity_responses_are_accepted() {
        let mut h = http::HeaderMap::new();
        assert_eq!(not_identity(&h), None);
        h.insert(CONTENT_ENCODING, HeaderValue::from_static("identity"));
        h.insert(TRANSFER_ENCODING, HeaderValue::from_static("chunked"));
        assert_eq!(not_identity(&h), None);
        for (name, value) in [
            (CONTENT_ENCODING, "gzip"),
            (CONTENT_ENCODING, "identity, br"),
            (CONTENT_ENCODING, "x-custom"),
            (TRANSFER_ENCODING, "gzip, chunked"),
        ] {
            let mut h = http::HeaderMap::new();
            h.insert(name.clone(), HeaderValue::from_static(value));
            assert!(not_identity(&h).is_some(), "{name}: {value}");
        }
    }

    /// A started grant of job `job` to the service `palette` at `addr`.
    fn grant_to(addr: std::net::SocketAddr) -> Arc<CallGrant> {
        let grant = test_grant(addr);
        grant.start(Instant::now() + Duration::from_secs(30));
        grant
    }

    /// A request without a body.
    fn get(uri: &str) -> http::Request<GuestBody> {
        http::Request::get(uri)
            .body(
                http_body_util::Empty::<Bytes>::new()
                    .map_err(|never| match never {})
                    .boxed_unsync(),
            )
            .unwrap()
    }

    /// A service that answers with trailers whatever the request said (a
    /// hyper server would send them only to a request with `TE: trailers`,
    /// which the gate never forwards), and names a header the guest must
    /// not get: the trailers are dropped, the header too, the body passes.
    #[tokio::test(flavor = "multi_thread")]
    async fn response_trailers_never_reach_the_guest() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = socket.read(&mut buf).await.unwrap();
                request.extend_from_slice(&buf[..n]);
            }
            let text = String::from_utf8_lossy(&request).into_owned();
            let auth = text
                .lines()
                .find_map(|l| l.strip_prefix("authorization: "))
                .unwrap_or("none")
                .to_owned();
            let response = format!(
                "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-echo\r\n\
                 x-secret-echo: {auth}\r\n\r\n5\r\nhello\r\n0\r\nx-echo: {auth}\r\n\r\n"
            );
            socket.write_all(response.as_bytes()).await.unwrap();
            socket.flush().await.unwrap();
        });
        let grant = grant_to(addr);
        let response = Arc::clone(&grant)
            .send(get("http://palette/v1/x"))
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        let names: Vec<&str> = response.headers().keys().map(HeaderName::as_str).collect();
        assert!(!names.contains(&"x-secret-echo"), "{names:?}");
        assert!(!names.contains(&"trailer"), "{names:?}");
        let collected = response.into_body().collect().await.unwrap();
        assert!(collected.trailers().is_none(), "{:?}", collected.trailers());
        assert_eq!(&collected.to_bytes()[..], b"hello");
        assert_eq!(grant.report().made, 1);
    }

    /// A service answering with more returned headers than a headers
    /// resource holds (its `etag` repeated) gets its call failed with the
    /// head's size, and the guest is given none of it: a head a guest
    /// keeps stays in its worker's memory as long as the response does.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_head_larger_than_a_headers_resource_is_refused() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let value = "q".repeat(4000);
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                let value = value.clone();
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                        let n = socket.read(&mut buf).await.unwrap();
                        request.extend_from_slice(&buf[..n]);
                    }
                    let fat = request.starts_with(b"GET /v1/fat");
                    let mut response = String::from("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n");
                    for _ in 0..if fat { 10 } else { 3 } {
                        response.push_str(&format!("etag: W/\"{value}\"\r\n"));
                    }
                    response.push_str("\r\nok");
                    socket.write_all(response.as_bytes()).await.unwrap();
                    socket.flush().await.unwrap();
                });
            }
        });
        let grant = grant_to(addr);
        // Three values (12 KB) fit.
        let response = Arc::clone(&grant)
            .send(get("http://palette/v1/lean"))
            .await
            .unwrap();
        assert_eq!(response.headers().get_all("etag").iter().count(), 3);
        assert!(headers::size(response.headers()) <= headers::MAX_RETURNED_BYTES);
        // Ten (40 KB) do not.
        match Arc::clone(&grant).send(get("http://palette/v1/fat")).await {
            Err(EgressError::ResponseHeaderSize(Some(n))) => {
                assert!(n as usize > headers::MAX_RETURNED_BYTES, "{n}");
            }
            Err(other) => panic!("refused as {other:?}"),
            Ok(response) => panic!(
                "{} bytes of headers given",
                headers::size(response.headers())
            ),
        }
        assert_eq!(grant.report().made, 2);
    }
}
