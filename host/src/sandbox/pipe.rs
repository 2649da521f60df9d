//! Bounded in-memory capture of a guest's stdout or stderr.
//!
//! wasmtime-wasi's `MemoryOutputPipe` traps on overflow without saying which
//! stream overflowed; this pipe keeps what fit, records the overflow in the
//! job's [`LimitLatch`] and then traps, so the report can name the limit.
//!
//! The limit is the policy's, and a policy's `stdout` has no ceiling; what
//! the host holds in memory has one: past [`MAX_CAPTURE`] bytes a pipe counts
//! what the guest writes (against the limit) and keeps none of it, so a
//! guest allowed a vast stdout neither grows the host's memory with it nor
//! makes its report slow to build.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi_io::poll::Pollable;
use wasmtime_wasi_io::streams::{OutputStream, StreamError};

use super::limits::{LimitKind, LimitLatch};

/// The most of one stream the host keeps, whatever the policy's limit:
/// what a job's report carries of its stdout (and, apart, its stderr).
pub const MAX_CAPTURE: usize = 4 << 20;

/// A capped capture buffer. Clones share the buffer.
#[derive(Clone, Debug)]
pub struct CappedPipe {
    capacity: usize,
    keep: usize,
    kind: LimitKind,
    latch: LimitLatch,
    buffer: Arc<Mutex<Capture>>,
}

/// What a pipe holds: the first bytes written, and how many were.
#[derive(Debug, Default)]
struct Capture {
    kept: BytesMut,
    written: usize,
}

impl CappedPipe {
    /// A pipe taking at most `capacity` bytes, of which it keeps the first
    /// [`MAX_CAPTURE`]; overflowing fires `kind`.
    pub fn new(capacity: usize, kind: LimitKind, latch: LimitLatch) -> Self {
        Self::keeping(capacity, MAX_CAPTURE, kind, latch)
    }

    fn keeping(capacity: usize, keep: usize, kind: LimitKind, latch: LimitLatch) -> Self {
        Self {
            capacity,
            keep: keep.min(capacity),
            kind,
            latch,
            buffer: Arc::new(Mutex::new(Capture::default())),
        }
    }

    /// What was kept of what the guest wrote, and how many bytes it
    /// wrote (at most the limit; more than kept when past [`MAX_CAPTURE`]).
    #[cfg(test)]
    pub fn contents(&self) -> (Bytes, usize) {
        let capture = self.lock();
        (capture.kept.clone().freeze(), capture.written)
    }

    /// [`CappedPipe::contents`], taken out of the pipe rather than copied
    /// (once the guest is done with it): a report is built without a
    /// second copy of each capture.
    pub fn take(&self) -> (BytesMut, usize) {
        let mut capture = self.lock();
        (std::mem::take(&mut capture.kept), capture.written)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Capture> {
        // A poisoned lock only means another writer panicked mid-append; the
        // bytes are still a valid prefix of the output.
        self.buffer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes what fits; returns whether everything fit.
    fn append(&self, bytes: &[u8]) -> bool {
        let mut capture = self.lock();
        let room = self.capacity.saturating_sub(capture.written);
        let take = bytes.len().min(room);
        let keep = take.min(self.keep.saturating_sub(capture.kept.len()));
        capture.kept.extend_from_slice(&bytes[..keep]);
        capture.written += take;
        if take < bytes.len() {
            self.latch.fire(self.kind);
            false
        } else {
            true
        }
    }
}

#[async_trait::async_trait]
impl OutputStream for CappedPipe {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        if self.append(&bytes) {
            Ok(())
        } else {
            Err(StreamError::Trap(wasmtime::format_err!(
                "{} limit of {} bytes exceeded",
                self.kind,
                self.capacity
            )))
        }
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        // Permit a bounded chunk even when full so the overflowing write is
        // attempted, recorded and trapped rather than the guest spinning on
        // a zero permit until the CPU limit fires.
        Ok(64 * 1024)
    }
}

#[async_trait::async_trait]
impl Pollable for CappedPipe {
    async fn ready(&mut self) {}
}

impl AsyncWrite for CappedPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        if self.append(buf) {
            Poll::Ready(Ok(buf.len()))
        } else {
            Poll::Ready(Err(std::io::Error::other(format!(
                "{} limit exceeded",
                self.kind
            ))))
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl IsTerminal for CappedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for CappedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_what_fits_and_names_the_limit() {
        let latch = LimitLatch::default();
        let mut pipe = CappedPipe::new(4, LimitKind::Stderr, latch.clone());
        pipe.write(Bytes::from_static(b"ab")).unwrap();
        assert!(matches!(
            pipe.write(Bytes::from_static(b"cdef")),
            Err(StreamError::Trap(_))
        ));
        assert_eq!(&pipe.contents().0[..], b"abcd");
        assert_eq!(pipe.contents().1, 4);
        assert_eq!(latch.fired(), Some(LimitKind::Stderr));
    }

    #[test]
    fn past_what_it_keeps_it_counts_against_the_limit() {
        let latch = LimitLatch::default();
        let mut pipe = CappedPipe::keeping(10, 3, LimitKind::Stdout, latch.clone());
        pipe.write(Bytes::from_static(b"ab")).unwrap();
        pipe.write(Bytes::from_static(b"cdef")).unwrap();
        assert_eq!(pipe.contents(), (Bytes::from_static(b"abc"), 6));
        assert_eq!(latch.fired(), None);
        assert!(matches!(
            pipe.write(Bytes::from_static(b"ghijk")),
            Err(StreamError::Trap(_))
        ));
        assert_eq!(pipe.contents(), (Bytes::from_static(b"abc"), 10));
        assert_eq!(latch.fired(), Some(LimitKind::Stdout));
    }
}
