//! The minimum body rate: a request body must arrive at an average of at
//! least `min_body_rate` bytes per second, counted from when the handler
//! first asks for it and checked once the grace period has passed. The body
//! read timeout bounds the wait between two frames; this bounds a body
//! trickled a byte at a time just inside it, which would otherwise hold a
//! connection (and a handler) for as long as the client likes.
//!
//! Below the rate, the body fails with [`TooSlow`]: the handler sees an
//! error, so nothing is stored, and the connection is marked to be closed
//! after the answer.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::idle::MinRate;

/// The error of a body that arrived below the minimum rate.
#[derive(Debug, thiserror::Error)]
#[error("request body arrived below the minimum rate of {0} bytes per second")]
pub struct TooSlow(pub u64);

/// A request body failing once it arrives below the minimum rate; raises
/// `violated` when it does.
#[derive(Debug)]
pub struct MinRateBody<B> {
    inner: B,
    rate: MinRate,
    start: Option<Instant>,
    bytes: u64,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    violated: Arc<AtomicBool>,
}

impl<B> MinRateBody<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, rate: MinRate, violated: Arc<AtomicBool>) -> Self {
        Self {
            inner,
            rate,
            start: None,
            bytes: 0,
            timer: None,
            violated,
        }
    }
}

impl<B> Body for MinRateBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let start = *this.start.get_or_insert_with(Instant::now);
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.bytes += data.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => {
                if this.rate.bytes_per_sec == 0 {
                    return Poll::Pending;
                }
                // The moment the average falls below the rate if nothing
                // more arrives.
                let deadline = MinRate::deadline(start, this.rate.allowance(this.bytes));
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                if timer.deadline() != deadline {
                    timer.as_mut().reset(deadline);
                }
                if timer.as_mut().poll(cx).is_ready() {
                    this.violated.store(true, Ordering::SeqCst);
                    return Poll::Ready(Some(Err(Box::new(TooSlow(this.rate.bytes_per_sec)))));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
