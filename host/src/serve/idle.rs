//! The idle keep-alive timeout: a connection that has no request in flight
//! and receives nothing for the timeout is closed.
//!
//! hyper's own timer (`header_read_timeout`) starts when a connection begins
//! waiting for a request and ends with the request's last header, so it
//! also ends idle connections, but only after the longer header allowance.
//! [`IdleIo`] wraps the socket and fails a read that has been pending for
//! the idle timeout while the connection is between requests; the serving
//! code marks the connection busy when a request reaches the service, and
//! idle again when its response body is dropped (written or abandoned).
//!
//! It also fails a write (or flush) that has made no progress for the write
//! timeout: hyper stops reading a connection while a response is blocked on
//! a full socket, so a client that pipelines requests and never reads would
//! otherwise hold the connection, and the kernel's send buffer behind it,
//! for ever, with no read pending for the other timers to see.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Whether a connection is between requests; shared by its socket wrapper
/// and its service.
#[derive(Debug)]
pub struct Idle(AtomicBool);

impl Idle {
    /// A new connection: idle until its first byte.
    pub fn new() -> Arc<Self> {
        Arc::new(Self(AtomicBool::new(true)))
    }

    /// A request reached the service.
    pub fn busy(&self) {
        self.0.store(false, Ordering::SeqCst);
    }

    fn set_idle(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    fn is_idle(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// A socket whose reads fail after `timeout` of silence between requests,
/// and whose writes fail after `write_timeout` without progress.
#[derive(Debug)]
pub struct IdleIo<T> {
    inner: T,
    idle: Arc<Idle>,
    timeout: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    write_timeout: Duration,
    write_timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<T> IdleIo<T> {
    /// Wraps `inner`.
    pub fn new(inner: T, idle: Arc<Idle>, timeout: Duration, write_timeout: Duration) -> Self {
        Self {
            inner,
            idle,
            timeout,
            timer: None,
            write_timeout,
            write_timer: None,
        }
    }

    /// Passes a write's outcome through, failing it once it has been
    /// pending without progress for the write timeout.
    fn stalled<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        match polled {
            Poll::Ready(r) => {
                self.write_timer = None;
                Poll::Ready(r)
            }
            Poll::Pending => {
                let timeout = self.write_timeout;
                let timer = self
                    .write_timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the client stopped reading",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    // A request is arriving; hyper's header timer takes over.
                    this.idle.busy();
                }
                this.timer = None;
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if !this.idle.is_idle() {
                    this.timer = None;
                    return Poll::Pending;
                }
                let timeout = this.timeout;
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
                if timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "idle connection timed out",
                    )));
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.stalled(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.stalled(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.stalled(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// A response body that marks its connection idle when dropped.
#[derive(Debug)]
pub struct MarkIdle<B> {
    inner: B,
    idle: Arc<Idle>,
}

impl<B> MarkIdle<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, idle: Arc<Idle>) -> Self {
        Self { inner, idle }
    }
}

impl<B> Drop for MarkIdle<B> {
    fn drop(&mut self) {
        self.idle.set_idle();
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for MarkIdle<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
