//! The gateway–worker channel: typed, versioned, length-delimited frames
//! over the inherited socketpair.
//!
//! Each frame is a 4-byte big-endian length and a [postcard] encoding of
//! one [`Down`] (gateway → worker) or [`Up`] (worker → gateway) message.
//! The first frame each way is `Hello` with [`VERSION`]; a peer speaking
//! another version is refused before anything else is read. Frames are
//! bounded (the bound); the gateway treats any frame it cannot decode,
//! any message out of place and any frame over its bound as a fault of the
//! worker, which it kills (the worker is assumed compromised once it has
//! read a guest byte). Reports and policies travel as JSON inside the
//! frame: their serde shapes skip empty fields, which a non-self-describing
//! format cannot.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

use super::calls::{CallDown, CallUp};
use super::harden::Applied;
use crate::job::JobSpec;

/// This build's protocol version.
///
/// 2: `Load` carries the gateway's record of the module's artifact, and
/// `Loaded`'s info the artifact the worker wrote.
/// 3: no `Release` for a job without inputs whose empty `/out` the worker
/// removed before reporting.
/// 4: `Running` only for a guest still running 100 ms after it started.
/// 5: `Report` names the files the job created in `/out`.
/// 6: `Load` says whether to hand over what the worker compiles.
/// 7: `Released` once a released job's directories are removed.
/// 8: a file's identity carries its file handle's hash (`FileId::handle`).
/// 9: `LoadError` has `ExceedsWorkerMemory` (the variants after it move).
/// 10: a call's window charges each body frame `calls::FRAME_COST` beside
/// its bytes, and credits grant both back.
/// 11: a report's created files are packed ([`CreatedFiles`]).
pub const VERSION: u32 = 11;

/// Largest frame a worker accepts: a module at the host's largest
/// accepted size plus its policy, or a job's inputs, with room to spare.
pub const MAX_DOWN_FRAME: usize = 160 << 20;

/// Largest frame the gateway accepts from a worker: a report with its
/// captured output, or a chunk of a call's body.
pub const MAX_UP_FRAME: usize = 16 << 20;

/// Gateway → worker.
#[derive(Debug, Serialize, Deserialize)]
pub enum Down {
    /// The gateway's version; first frame.
    Hello { version: u32 },
    /// A module this worker may be asked to run: its policy (JSON, already
    /// validated by the gateway), bytes (whose digest the worker checks
    /// again before compiling) and the compiled artifact the gateway
    /// recorded for it in this zone, if any: the only one the worker may
    /// load from the zone's cache instead of compiling. The worker answers
    /// [`Up::Loaded`].
    Load {
        module: u64,
        policy_json: String,
        policy_sha256: Option<String>,
        wasm: Blob,
        artifact: Option<crate::sandbox::Artifact>,
        /// Hand over what it compiles in its directory, where the gateway
        /// gave it room for that: only a worker that has run no job, whose
        /// artifact the gateway may take into the zone's cache.
        hand_over: bool,
    },
    /// Runs a job of a loaded module; answered by [`Up::Report`].
    Run {
        job: u64,
        module: u64,
        spec: JobSpec,
    },
    /// Stops a running job (its report is not wanted).
    Cancel { job: u64 },
    /// The gateway has copied the job's outputs: its directory can go.
    /// Not sent for a job whose `/out` was gone when its report came (the
    /// worker removes an empty one before reporting).
    Release { job: u64 },
    /// Outbound-call traffic for a running job.
    Call(CallDown),
    /// Are you there? Answered by [`Up::Pong`].
    Ping { seq: u64 },
}

/// Worker → gateway.
#[derive(Debug, Serialize, Deserialize)]
pub enum Up {
    /// The worker's version and the hardening it applied; first frame,
    /// sent before the worker reads any guest byte.
    Hello {
        version: u32,
        pid: u32,
        applied: Applied,
    },
    /// Hardening or the sandbox failed; the worker exits after sending
    /// this.
    StartFailed { error: String },
    /// A [`Down::Load`]'s outcome: compiled (with what the load found:
    /// from the cache, adapted, the imports' verdicts, the artifact now in
    /// the zone's cache) or why not. The gateway records that artifact
    /// only from a worker it has sent no job yet.
    Loaded {
        module: u64,
        result: Result<crate::sandbox::LoadInfo, crate::sandbox::LoadError>,
    },
    /// A job's guest has been running for 100 ms (a job that ends sooner
    /// sends none): the gateway's watchdog runs from here.
    Running { job: u64 },
    /// A job's report (JSON of [`JobReport`](crate::job::JobReport)), or
    /// why it could not start.
    Report {
        job: u64,
        result: Result<String, String>,
        /// The regular files its guest created in `/out` (the only ones
        /// the gateway collects).
        created: CreatedFiles,
    },
    /// Outbound-call traffic of a running job.
    Call(CallUp),
    /// Answer to [`Down::Ping`].
    Pong { seq: u64 },
    /// A job's directories, released (or cancelled, or failed), are
    /// removed: a cue for the gateway to give their room back, which it
    /// does only once it finds them gone.
    Released { job: u64 },
}

/// The files a job's guest created, as its worker reports them: records
/// of [`CreatedFiles::RECORD`] bytes in one byte string, so that the
/// gateway counts them against the job's `output_files` before it reads
/// any (found by a tester: a report naming 2.3 million made-up files, in
/// one frame, took the gateway 0.75 s of CPU to read, for every job).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedFiles(Blob);

impl CreatedFiles {
    /// Bytes of one file's record: its device, inode, birth time
    /// (seconds and nanoseconds) and handle's hash, little-endian.
    pub const RECORD: usize = 8 + 8 + 8 + 4 + 8;

    /// `files`, packed.
    pub fn pack(files: impl IntoIterator<Item = crate::sandbox::outputs::FileId>) -> Self {
        let mut bytes = Vec::new();
        for f in files {
            bytes.extend_from_slice(&f.dev.to_le_bytes());
            bytes.extend_from_slice(&f.ino.to_le_bytes());
            bytes.extend_from_slice(&f.born.0.to_le_bytes());
            bytes.extend_from_slice(&f.born.1.to_le_bytes());
            bytes.extend_from_slice(&f.handle.to_le_bytes());
        }
        Self(Blob(Bytes::from(bytes)))
    }

    /// How many files it names; `None` when it is not whole records.
    pub fn count(&self) -> Option<usize> {
        let len = self.0.0.len();
        len.is_multiple_of(Self::RECORD)
            .then_some(len / Self::RECORD)
    }

    /// The files it names (a partial record at its end is left out).
    pub fn unpack(&self) -> crate::sandbox::outputs::Created {
        let word = |r: &[u8], at: usize| {
            u64::from_le_bytes(r[at..at + 8].try_into().expect("eight bytes"))
        };
        self.0
            .0
            .chunks_exact(Self::RECORD)
            .map(|r| crate::sandbox::outputs::FileId {
                dev: word(r, 0),
                ino: word(r, 8),
                born: (
                    i64::from_le_bytes(r[16..24].try_into().expect("eight bytes")),
                    u32::from_le_bytes(r[24..28].try_into().expect("four bytes")),
                ),
                handle: word(r, 28),
            })
            .collect()
    }
}

/// Bytes sent as one byte string (not a sequence of numbers).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Blob(pub Bytes);

impl Serialize for Blob {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(&self.0)
    }
}

impl<'de> Deserialize<'de> for Blob {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Blob;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a byte string")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Blob, E> {
                Ok(Blob(Bytes::copy_from_slice(v)))
            }
            fn visit_byte_buf<E: serde::de::Error>(self, v: Vec<u8>) -> Result<Blob, E> {
                Ok(Blob(Bytes::from(v)))
            }
        }
        d.deserialize_bytes(Visit)
    }
}

/// Why the channel broke.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// Reading or writing failed (the peer is gone, or a frame was over
    /// the bound).
    #[error("channel i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A frame did not decode as a message.
    #[error("undecodable frame: {0}")]
    Decode(postcard::Error),
    /// A message could not be encoded.
    #[error("unencodable message: {0}")]
    Encode(postcard::Error),
    /// The first frame was not a `Hello` of this version.
    #[error("the peer speaks {0}, not protocol version {VERSION}")]
    Version(String),
    /// The peer closed the channel.
    #[error("the peer closed the channel")]
    Closed,
}

/// The reading half of a framed channel.
pub type Reader<R = ReadHalf> = FramedRead<R, LengthDelimitedCodec>;
/// The writing half of a framed channel.
pub type Writer = FramedWrite<WriteHalf, LengthDelimitedCodec>;

/// A channel's reading half: the socket, registered with the runtime for
/// reading only. Registered for writing too (as `tokio::net::UnixStream`
/// is), each time the other end read what this end wrote would wake a
/// thread parked on the runtime's driver, for nothing: 190 of 1,173 of a
/// worker's `epoll_wait`s in a second, one for each report the gateway
/// read.
#[derive(Debug)]
pub struct ReadHalf {
    fd: AsyncFd<OwnedFd>,
}

/// A channel's writing half: another descriptor of the socket, registered
/// for writing only while a write waits for room ([`WriteHalf::writable`]).
/// Its drop shuts the socket for writing, so the other end reads its end.
#[derive(Debug)]
pub struct WriteHalf {
    fd: OwnedFd,
    /// The registration a write waiting for room polls
    /// ([`AsyncWrite::poll_write`]), let go once it has written.
    waiting: Option<AsyncFd<OwnedFd>>,
}

/// `stream`'s two halves, registered with the runtime entered (the
/// reading half now; the writing half only while it waits for room).
///
/// # Errors
/// When the socket cannot be made non-blocking, duplicated or
/// registered.
pub fn halves(stream: UnixStream) -> io::Result<(ReadHalf, WriteHalf)> {
    stream.set_nonblocking(true)?;
    let fd = OwnedFd::from(stream);
    let write = fd.try_clone()?;
    let read = register(fd, Interest::READABLE)?;
    Ok((
        ReadHalf { fd: read },
        WriteHalf {
            fd: write,
            waiting: None,
        },
    ))
}

/// `fd`, registered with the runtime entered for `interest`.
fn register(fd: OwnedFd, interest: Interest) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is an open descriptor, the same one, until the
    // `AsyncFd` that owns it drops it.
    unsafe { AsyncFd::register_with_interest(fd, interest) }.map_err(|e| e.into_parts().1)
}

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            // Read into the room as it is, never zeroed first: the reader
            // reserves room for the whole frame a header announces (16 MiB
            // in the gateway), and zeroing it before each read let a
            // worker trickling bytes cost the gateway seconds of CPU for a
            // few kilobytes (found by an attacker).
            // SAFETY: the read only writes into it, never de-initialises.
            let unfilled = unsafe { buf.unfilled_mut() };
            let room = unfilled.len();
            match rustix::io::read(guard.get_inner(), unfilled).map(|(read, _)| read.len()) {
                Ok(n) => {
                    // SAFETY: the kernel wrote these `n` bytes.
                    unsafe { buf.assume_init(n) };
                    // Less than there was room for: the socket is read
                    // dry (as tokio's own streams take it), and the next
                    // read waits for more without a read that finds none.
                    if n > 0 && n < room {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(rustix::io::Errno::AGAIN) => guard.clear_ready(),
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Poll::Ready(Err(e.into())),
            }
        }
    }
}

impl WriteHalf {
    /// Writes what the socket takes of `bufs` now.
    ///
    /// # Errors
    /// [`io::ErrorKind::WouldBlock`] when it takes nothing; the socket's
    /// error.
    pub fn try_write_vectored(&self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        loop {
            match rustix::io::writev(&self.fd, bufs) {
                Err(rustix::io::Errno::INTR) => {}
                r => return r.map_err(io::Error::from),
            }
        }
    }

    /// Writes what the socket takes of `buf` now.
    ///
    /// # Errors
    /// As [`WriteHalf::try_write_vectored`].
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        self.try_write_vectored(&[io::IoSlice::new(buf)])
    }

    /// Waits until the socket takes more: registered for writing only
    /// meanwhile.
    ///
    /// # Errors
    /// When the registration fails.
    pub async fn writable(&self) -> io::Result<()> {
        let fd = register(self.fd.try_clone()?, Interest::WRITABLE)?;
        let _ = fd.writable().await?;
        Ok(())
    }
}

impl AsyncWrite for WriteHalf {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            match self.try_write(buf) {
                Ok(n) => {
                    self.waiting = None;
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
            if self.waiting.is_none() {
                self.waiting = Some(register(self.fd.try_clone()?, Interest::WRITABLE)?);
            }
            if let Some(waiting) = &self.waiting {
                let mut guard = ready!(waiting.poll_write_ready(cx))?;
                guard.clear_ready();
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(
            rustix::net::shutdown(&self.fd, rustix::net::Shutdown::Write).map_err(io::Error::from),
        )
    }
}

impl Drop for WriteHalf {
    /// The other end reads the end of the channel, though this end's
    /// reading half is still open.
    fn drop(&mut self) {
        let _ = rustix::net::shutdown(self.fd.as_fd(), rustix::net::Shutdown::Write);
    }
}

fn codec(max: usize) -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .length_field_length(4)
        .max_frame_length(max)
        .new_codec()
}

/// Frames `stream` with this protocol's codec, reading frames of at most
/// `max_in` bytes and writing frames of at most `max_out`
/// ([`MAX_DOWN_FRAME`] and [`MAX_UP_FRAME`], one way or the other);
/// registered with the runtime entered ([`halves`]).
///
/// # Errors
/// As [`halves`].
pub fn split(stream: UnixStream, max_in: usize, max_out: usize) -> io::Result<(Reader, Writer)> {
    let (read, write) = halves(stream)?;
    Ok((
        FramedRead::new(read, codec(max_in)),
        FramedWrite::new(write, codec(max_out)),
    ))
}

/// A channel's reading half that counts the bytes taken from it.
#[derive(Debug)]
pub struct Counted {
    inner: ReadHalf,
    taken: Arc<AtomicU64>,
}

impl Counted {
    /// How many bytes have been taken from the channel, frames' headers
    /// and bytes not yet decoded among them.
    pub fn taken(&self) -> &Arc<AtomicU64> {
        &self.taken
    }
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut this.inner).poll_read(cx, buf);
        this.taken
            .fetch_add((buf.filled().len() - before) as u64, Ordering::Relaxed);
        polled
    }
}

/// [`split`], with a reader that counts what it takes ([`Counted`]).
///
/// # Errors
/// As [`halves`].
pub fn split_counted(
    stream: UnixStream,
    max_in: usize,
    max_out: usize,
) -> io::Result<(Reader<Counted>, Writer)> {
    let (read, write) = halves(stream)?;
    let counted = Counted {
        inner: read,
        taken: Arc::default(),
    };
    Ok((
        FramedRead::new(counted, codec(max_in)),
        FramedWrite::new(write, codec(max_out)),
    ))
}

/// How many bytes of the channel `reader` has decoded into frames: the
/// end of the frame it gave last.
pub fn decoded(reader: &Reader<Counted>) -> u64 {
    reader
        .get_ref()
        .taken
        .load(Ordering::Relaxed)
        .saturating_sub(reader.read_buffer().len() as u64)
}

/// Sends one message.
///
/// # Errors
/// [`ChannelError`] when it cannot be encoded or written.
pub async fn send<T: Serialize>(writer: &mut Writer, message: &T) -> Result<(), ChannelError> {
    writer.send(encode(message)?).await?;
    Ok(())
}

/// `message` encoded as a frame's payload of at most `max` bytes: itself,
/// or the stand-in `shrink` gives for it when it is larger (a job's report
/// becomes that job's failure, say); `None` (logged) when neither fits or
/// it cannot be encoded.
pub fn fit<T: Serialize>(message: T, max: usize, shrink: impl Fn(T) -> Option<T>) -> Option<Bytes> {
    let frame = match encode(&message) {
        Ok(frame) => frame,
        Err(e) => {
            tracing::error!(error = %e, "an unencodable message was dropped");
            return None;
        }
    };
    if frame.len() <= max {
        return Some(frame);
    }
    let smaller = shrink(message)
        .and_then(|m| encode(&m).ok())
        .filter(|f| f.len() <= max);
    if smaller.is_none() {
        tracing::error!(
            bytes = frame.len(),
            max,
            "a message over the channel's frame bound was dropped"
        );
    }
    smaller
}

/// Receives one message.
///
/// # Errors
/// [`ChannelError`] when the channel closed, failed, or the frame does not
/// decode.
pub async fn recv<T: for<'de> Deserialize<'de>>(
    reader: &mut Reader<impl tokio::io::AsyncRead + Unpin>,
) -> Result<T, ChannelError> {
    let frame = reader.next().await.ok_or(ChannelError::Closed)??;
    decode(&frame)
}

/// Decodes one frame.
///
/// # Errors
/// [`ChannelError::Decode`].
pub fn decode<T: for<'de> Deserialize<'de>>(frame: &[u8]) -> Result<T, ChannelError> {
    postcard::from_bytes(frame).map_err(ChannelError::Decode)
}

/// Encodes one message as a frame's payload.
///
/// # Errors
/// [`ChannelError::Encode`].
pub fn encode<T: Serialize>(message: &T) -> Result<Bytes, ChannelError> {
    postcard::to_stdvec(message)
        .map(Bytes::from)
        .map_err(ChannelError::Encode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::mem::MaybeUninit;

    /// Found by an attacker: a reader that zeroed its room before each
    /// read cost the gateway the whole room (the frame a header announced,
    /// up to 16 MiB) for every byte a worker trickled.
    #[tokio::test]
    async fn a_read_writes_only_what_came_and_leaves_the_rest_of_the_room_alone() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let (mut read, _write) = halves(ours).unwrap();
        theirs.write_all(b"hello").unwrap();
        let mut room = vec![MaybeUninit::new(0xAAu8); 1 << 20];
        {
            let mut buf = ReadBuf::uninit(&mut room);
            std::future::poll_fn(|cx| Pin::new(&mut read).poll_read(cx, &mut buf))
                .await
                .unwrap();
            assert_eq!(buf.filled(), b"hello");
            assert_eq!(
                buf.initialized().len(),
                5,
                "the reader initialised room nothing was read into"
            );
        }
        // SAFETY: every byte of `room` was initialised to 0xAA above.
        let untouched = room[5..].iter().all(|b| unsafe { b.assume_init() } == 0xAA);
        assert!(
            untouched,
            "the reader wrote into room nothing was read into"
        );
        // What comes later is read on from there, and an end is an end.
        theirs.write_all(b", world").unwrap();
        drop(theirs);
        let mut got = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut read, &mut got)
            .await
            .unwrap();
        assert_eq!(got, b", world");
    }

    /// The writing half is registered only while a write waits for room:
    /// a write the socket cannot take at once waits, and goes on, in
    /// order, as the other end reads, however often that happens.
    #[tokio::test]
    async fn a_write_waits_for_room_and_goes_on_as_the_other_end_reads() {
        let (ours, theirs) = UnixStream::pair().unwrap();
        let (_read, mut write) = halves(ours).unwrap();
        let sent: Vec<u8> = (0..8u32 << 20).map(|i| (i % 251) as u8).collect();
        let reader = std::thread::spawn(move || {
            let mut theirs = theirs;
            let mut got = Vec::new();
            let mut chunk = vec![0; 64 << 10];
            loop {
                // Read a little at a time, so the writer waits many times.
                std::thread::sleep(std::time::Duration::from_millis(1));
                match std::io::Read::read(&mut theirs, &mut chunk) {
                    Ok(0) => return got,
                    Ok(n) => got.extend_from_slice(&chunk[..n]),
                    Err(e) => panic!("{e}"),
                }
            }
        });
        // Bounded only so that a lost wake-up fails rather than hangs.
        let wrote = tokio::time::timeout(
            std::time::Duration::from_secs(120),
            tokio::io::AsyncWriteExt::write_all(&mut write, &sent),
        )
        .await;
        assert!(
            matches!(wrote, Ok(Ok(()))),
            "the write did not go on: {wrote:?}"
        );
        assert!(write.waiting.is_none(), "still registered once written");
        // Dropping it ends the channel, though the reading half is open.
        drop(write);
        let got = reader.join().unwrap();
        assert!(got == sent, "{} bytes came of {}", got.len(), sent.len());
    }
}
