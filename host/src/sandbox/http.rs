//! The guest-facing half of outbound calls: the `wasi:http` hooks of one
//! job ([`JobHooks`]). They decide what wasmtime-wasi-http asks of an
//! embedder (schemes, the `Host` header), hold one of the job's host
//! descriptors per call in flight, charge each call's host work to the
//! job's CPU meter, and hand the request to the job's [`Egress`], which
//! alone checks, signs and sends it. Errors cross the seam as
//! [`EgressError`] and are turned into `wasi:http` error codes here.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use http::uri::Scheme;
use http_body_util::BodyExt;
use http_body_util::combinators::UnsyncBoxBody;
use wasmtime_wasi_http::{Error as HttpError, RequestOptions, WasiHttpHooks};

use super::cpu::{Charged, CpuMeter};
use super::limits::Refusals;
use super::quota::{CallSlot, OutputQuota};
use crate::job::egress::{Egress, EgressError};

/// Body type of guest requests and of the responses they get.
type GuestBody = UnsyncBoxBody<Bytes, HttpError>;

/// The job's `wasi:http` hooks: each request goes to the job's egress on
/// a task of its own (minting the call's token, checking the request,
/// connecting), charged to the job's CPU meter.
pub(crate) struct JobHooks {
    /// `None`: the job may call nothing. Every request is refused with
    /// `HttpRequestDenied` and none is recorded, so its report has no
    /// `calls` section: so it is for `bulkhead run`, which attaches no
    /// egress (its refused calls are not reported), and for a host that
    /// declares no services.
    pub(crate) egress: Option<Arc<dyn Egress>>,
    pub(crate) cpu: Arc<CpuMeter>,
    /// Each call in flight holds one of the job's host descriptors (its
    /// connection) until both its bodies are gone: the request body the
    /// connection may still be sending, and the response body the guest
    /// reads.
    pub(crate) quota: Arc<OutputQuota>,
    pub(crate) refusals: Refusals,
}

type Done = Box<dyn Future<Output = Result<(), HttpError>> + Send>;

type Sent = Box<dyn Future<Output = Result<(http::Response<GuestBody>, Done), HttpError>> + Send>;

impl WasiHttpHooks for JobHooks {
    fn is_supported_scheme(&mut self, _scheme: &Scheme) -> bool {
        // The egress decides, so the refusal is recorded.
        true
    }

    fn set_host_header(&mut self) -> bool {
        // The egress sets `Host` to the service's real authority itself.
        false
    }

    fn default_scheme(&mut self) -> Option<Scheme> {
        Some(Scheme::HTTP)
    }

    fn p2_outgoing_body_buffer_chunks(&mut self) -> usize {
        1
    }

    fn p2_outgoing_body_chunk_size(&mut self) -> usize {
        // What a body holds unsent is host memory its job's handles count
        // at this size (`wasi::HELD_PER_HANDLE`).
        super::wasi::OUTGOING_CHUNK
    }

    fn send_request(
        &mut self,
        request: http::Request<GuestBody>,
        _options: Option<RequestOptions>,
        _fut: Done,
    ) -> Sent {
        let Some(slot) = self.quota.hold_call().map(Arc::new) else {
            // At the job's descriptor bound: the call would open a socket.
            self.refusals.note();
            return Box::new(async { Err(HttpError::HttpRequestDenied) });
        };
        let egress = self.egress.clone();
        Box::new(Charged::new(
            async move {
                let Some(egress) = egress else {
                    return Err(HttpError::HttpRequestDenied);
                };
                // The connection lives as long as either body: a guest that
                // drops the response but keeps writing the request keeps
                // its socket open.
                let request = request.map(|body| {
                    SlotBody {
                        body: body.map_err(from_guest),
                        _slot: Arc::clone(&slot),
                    }
                    .boxed_unsync()
                });
                let response = egress.send(request).await.map_err(to_guest)?;
                let done: Done = Box::new(async { Ok(()) });
                Ok((
                    response.map(|body| {
                        SlotBody {
                            body: body.map_err(to_guest),
                            _slot: slot,
                        }
                        .boxed_unsync()
                    }),
                    done,
                ))
            },
            Arc::clone(&self.cpu),
        ))
    }
}

/// A failure of the guest's own request body, as it crosses the seam.
fn from_guest(e: HttpError) -> EgressError {
    EgressError::Body(e.to_string())
}

/// The `wasi:http` error the guest is given for `e`.
fn to_guest(e: EgressError) -> HttpError {
    match e {
        EgressError::Denied => HttpError::HttpRequestDenied,
        EgressError::Internal(message) => HttpError::InternalError(message),
        EgressError::UriInvalid => HttpError::HttpRequestUriInvalid,
        EgressError::ConnectionTimeout => HttpError::ConnectionTimeout,
        EgressError::ConnectionRefused => HttpError::ConnectionRefused,
        EgressError::ConnectionReadTimeout => HttpError::ConnectionReadTimeout,
        EgressError::Protocol => HttpError::HttpProtocolError,
        EgressError::RequestBodySize(n) => HttpError::HttpRequestBodySize(n),
        EgressError::ResponseBodySize(n) => HttpError::HttpResponseBodySize(n),
        EgressError::ResponseHeaderSize(n) => HttpError::HttpResponseHeaderSectionSize(n),
        EgressError::Body(message) => HttpError::InternalError(Some(message)),
    }
}

/// A request or response body holding its call's place among the job's
/// descriptors: the place is given back when both are dropped.
struct SlotBody<B> {
    body: B,
    _slot: Arc<CallSlot>,
}

impl<B: http_body::Body + Unpin> http_body::Body for SlotBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        std::pin::Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::Instant;

    use super::*;
    use crate::job::CallsReport;
    use crate::job::egress::{EgressBody, EgressFuture};
    use crate::sandbox::limits::LimitLatch;

    /// An egress that answers at once but keeps the request body, as a
    /// connection still sending it does.
    #[derive(Debug, Default)]
    struct KeepsRequestBody {
        kept: Mutex<Vec<EgressBody>>,
    }

    impl Egress for KeepsRequestBody {
        fn start(&self, _deadline: Instant) {}

        fn send(self: Arc<Self>, request: http::Request<EgressBody>) -> EgressFuture {
            self.kept.lock().unwrap().push(request.into_body());
            Box::pin(async {
                let body = http_body_util::Empty::new()
                    .map_err(|never: std::convert::Infallible| match never {})
                    .boxed_unsync();
                Ok(http::Response::new(body))
            })
        }

        fn report(&self) -> CallsReport {
            CallsReport::default()
        }
    }

    #[tokio::test]
    async fn a_call_holds_its_descriptor_place_while_its_request_body_lives() {
        let egress = Arc::new(KeepsRequestBody::default());
        let quota = OutputQuota::new(1 << 20, 16, 4, LimitLatch::default());
        let mut hooks = JobHooks {
            egress: Some(Arc::clone(&egress) as Arc<dyn Egress>),
            cpu: Arc::new(CpuMeter::new(u64::MAX, LimitLatch::default())),
            quota: Arc::clone(&quota),
            refusals: Refusals::default(),
        };
        let request = http::Request::new(
            http_body_util::Empty::new()
                .map_err(|never: std::convert::Infallible| match never {})
                .boxed_unsync(),
        );
        let sent = hooks.send_request(request, None, Box::new(async { Ok(()) }));
        let (response, _done) = Box::into_pin(sent).await.expect("answered");
        assert_eq!(quota.open_descriptors(), 1);
        drop(response);
        assert_eq!(
            quota.open_descriptors(),
            1,
            "the response is gone, but the connection still sends the request"
        );
        egress.kept.lock().unwrap().clear();
        assert_eq!(quota.open_descriptors(), 0);
    }
}
