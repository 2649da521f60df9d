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
//!
//! **Minimum write rate**: a client that reads at a trickle makes progress
//! often enough to escape the write timeout. Once a write has been pending
//! (the client's window is full), the time the connection then spends
//! blocked on the client is summed, and the client must take at least
//! `min_write_rate` bytes per second of it after the grace period, or the
//! write fails and the connection ends. Time the server spends producing a
//! response is not counted: only time blocked on the client. The window
//! closes when the response is done and flushed.
//!
//! **hyper's own answers**: when a request head cannot be parsed (too
//! large, too many headers, a bad request line or header byte), hyper
//! writes a bodiless 400, 414 or 431 itself and closes the connection.
//! The issue's error contract says every error has the one JSON shape, so
//! [`IdleIo`] rewrites that answer: hyper writes it only when no request is
//! in flight and everything before it has been flushed, and a response from
//! the service always follows a request reaching the service (which bumps
//! the slot's request count), so a write made while the slot is idle and no
//! request has reached the service since the last complete flush can only
//! be hyper's own answer. Its status is kept, its body becomes
//! `{"error":{"code","message"}}`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::budget::Slot;

/// The minimum rate a client must take a response at, once a write has
/// been pending, and after how much blocked time it is first checked.
#[derive(Clone, Copy, Debug)]
pub struct MinRate {
    /// Bytes per second; 0 turns the check off.
    pub bytes_per_sec: u64,
    /// Blocked time allowed before the rate is checked.
    pub grace: Duration,
}

impl MinRate {
    /// How long a transfer of `bytes` may have taken and still be at the
    /// rate (the grace period at least).
    pub fn allowance(&self, bytes: u64) -> Duration {
        let at_rate = if self.bytes_per_sec == 0 {
            Duration::MAX
        } else {
            Duration::try_from_secs_f64(bytes as f64 / self.bytes_per_sec as f64)
                .unwrap_or(Duration::MAX)
        };
        self.grace.max(at_rate)
    }

    /// `start` plus `after`, or a day from now if that is later than any
    /// clock can tell (the check is re-armed on the next poll anyway).
    pub fn deadline(start: Instant, after: Duration) -> Instant {
        start
            .checked_add(after)
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400))
    }
}

/// What a response has been taken at since one of its writes was pending.
#[derive(Debug, Default)]
struct WriteWindow {
    bytes: u64,
    blocked: Duration,
    blocked_since: Option<Instant>,
}

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
/// whose writes fail after `write_timeout` without progress or below the
/// minimum write rate, and which rewrites hyper's own error answers.
#[derive(Debug)]
pub struct IdleIo<T> {
    inner: T,
    idle: Arc<Idle>,
    slot: Arc<Slot>,
    timeout: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    write_timeout: Duration,
    write_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    min_rate: MinRate,
    window: Option<WriteWindow>,
    rate_timer: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The slot's request count at the last flush that completed with no
    /// request in flight (a new connection: 0).
    clean_at: Option<u64>,
    /// A rewritten answer still to be written, and how much of it is.
    replacement: Option<(Vec<u8>, usize)>,
}

impl<T> IdleIo<T> {
    /// Wraps `inner`.
    pub fn new(
        inner: T,
        idle: Arc<Idle>,
        slot: Arc<Slot>,
        timeout: Duration,
        write_timeout: Duration,
        min_rate: MinRate,
    ) -> Self {
        Self {
            inner,
            idle,
            slot,
            timeout,
            timer: None,
            write_timeout,
            write_timer: None,
            min_rate,
            window: None,
            rate_timer: None,
            clean_at: Some(0),
            replacement: None,
        }
    }

    /// Passes a write's outcome through, failing it once it has been
    /// pending without progress for the write timeout, or once the client
    /// takes the response below the minimum rate.
    fn stalled<R>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<io::Result<R>>,
        written: impl FnOnce(&R) -> u64,
    ) -> Poll<io::Result<R>> {
        match polled {
            Poll::Ready(r) => {
                self.write_timer = None;
                self.rate_timer = None;
                if let (Some(w), Ok(r)) = (self.window.as_mut(), r.as_ref()) {
                    w.bytes += written(r);
                    if let Some(since) = w.blocked_since.take() {
                        w.blocked += since.elapsed();
                    }
                }
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
                if self.min_rate.bytes_per_sec > 0 {
                    let now = Instant::now();
                    let w = self.window.get_or_insert_with(WriteWindow::default);
                    let since = *w.blocked_since.get_or_insert(now);
                    let allowance = self.min_rate.allowance(w.bytes);
                    let deadline = MinRate::deadline(since, allowance.saturating_sub(w.blocked));
                    let timer = self
                        .rate_timer
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
                    if timer.deadline() != deadline {
                        timer.as_mut().reset(deadline);
                    }
                    if timer.as_mut().poll(cx).is_ready() {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the client reads below the minimum rate",
                        )));
                    }
                }
                Poll::Pending
            }
        }
    }

    /// Whether a write now can only be hyper's own answer to a request
    /// head it could not parse (see the module documentation).
    fn writes_hypers_own(&self) -> bool {
        !self.slot.is_busy() && self.clean_at == Some(self.slot.requests())
    }
}

impl<T: AsyncWrite + Unpin> IdleIo<T> {
    /// Writes what is left of a rewritten answer.
    fn poll_replacement(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some((bytes, done)) = self.replacement.as_mut() {
            if *done == bytes.len() {
                self.replacement = None;
                break;
            }
            let polled = Pin::new(&mut self.inner).poll_write(cx, &bytes[*done..]);
            match self.stalled(cx, polled, |n| *n as u64) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    if let Some((_, done)) = self.replacement.as_mut() {
                        *done += n;
                    }
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Takes a write of hyper's own answer (`bufs`, all of it), and queues
    /// its JSON rewrite instead; `None` if this write is not one.
    fn rewrite(&mut self, bufs: &[io::IoSlice<'_>]) -> Option<usize> {
        if !self.writes_hypers_own() {
            return None;
        }
        let head: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
        let answer = json_answer(&head)?;
        self.replacement = Some((answer, 0));
        Some(head.len())
    }
}

/// The JSON answer replacing a bodiless answer hyper wrote itself (`head`,
/// a whole response head with no body); `None` if `head` is not one.
pub fn json_answer(head: &[u8]) -> Option<Vec<u8>> {
    if !head.ends_with(b"\r\n\r\n") {
        return None;
    }
    let status: u16 = std::str::from_utf8(head.strip_prefix(b"HTTP/1.1 ")?.get(..3)?)
        .ok()?
        .parse()
        .ok()?;
    let (reason, code, message) = match status {
        400 => ("Bad Request", "bad_request", "malformed request"),
        414 => ("URI Too Long", "uri_too_long", "request target too long"),
        431 => (
            "Request Header Fields Too Large",
            "headers_too_large",
            "request line and headers too large, or too many headers",
        ),
        s if (400..500).contains(&s) => ("Bad Request", "bad_request", "request refused"),
        _ => return None,
    };
    let body = format!(r#"{{"error":{{"code":"{code}","message":"{message}"}}}}"#);
    Some(
        format!(
            "HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes(),
    )
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
        let this = &mut *self;
        std::task::ready!(this.poll_replacement(cx))?;
        if let Some(n) = this.rewrite(&[io::IoSlice::new(buf)]) {
            return Poll::Ready(Ok(n));
        }
        this.clean_at = None;
        let polled = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.stalled(cx, polled, |n| *n as u64)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        std::task::ready!(this.poll_replacement(cx))?;
        if let Some(n) = this.rewrite(bufs) {
            return Poll::Ready(Ok(n));
        }
        this.clean_at = None;
        let polled = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.stalled(cx, polled, |n| *n as u64)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.poll_replacement(cx))?;
        let polled = Pin::new(&mut this.inner).poll_flush(cx);
        let polled = this.stalled(cx, polled, |_| 0);
        if matches!(polled, Poll::Ready(Ok(()))) && !this.slot.is_busy() {
            // Everything hyper had is written and no request is in flight:
            // the next write starts a new answer.
            this.clean_at = Some(this.slot.requests());
            this.window = None;
        }
        polled
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        std::task::ready!(this.poll_replacement(cx))?;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

/// A response body that marks its connection idle when dropped.
#[derive(Debug)]
pub struct MarkIdle<B> {
    inner: B,
    idle: Arc<Idle>,
    slot: Arc<Slot>,
}

impl<B> MarkIdle<B> {
    /// Wraps `inner`.
    pub fn new(inner: B, idle: Arc<Idle>, slot: Arc<Slot>) -> Self {
        Self { inner, idle, slot }
    }
}

impl<B> Drop for MarkIdle<B> {
    fn drop(&mut self) {
        self.idle.set_idle();
        self.slot.set_idle();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hypers_own_answers_become_the_json_error_shape_with_their_status() {
        let head = b"HTTP/1.1 431 Request Header Fields Too Large\r\nconnection: close\r\ncontent-length: 0\r\ndate: Tue, 01 Dec 2026 18:00:00 GMT\r\n\r\n";
        let answer = String::from_utf8(json_answer(head).unwrap()).unwrap();
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 431 "), "{head}");
        assert!(head.contains("content-type: application/json"), "{head}");
        assert!(
            head.contains(&format!("content-length: {}", body.len())),
            "{head}"
        );
        let json: serde_json::Value = serde_json::from_str(body).unwrap();
        assert_eq!(json["error"]["code"], "headers_too_large");
        for (status, code) in [(400, "bad_request"), (414, "uri_too_long")] {
            let head = format!("HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n");
            let answer = String::from_utf8(json_answer(head.as_bytes()).unwrap()).unwrap();
            assert!(answer.starts_with(&format!("HTTP/1.1 {status} ")));
            assert!(answer.contains(&format!(r#""code":"{code}""#)), "{answer}");
        }
        // Not a whole head, or not a client error: left alone.
        assert!(json_answer(b"HTTP/1.1 400 Bad Request\r\n").is_none());
        assert!(json_answer(b"HTTP/1.1 503 X\r\n\r\n").is_none());
        assert!(json_answer(b"some body bytes\r\n\r\n").is_none());
    }
}
