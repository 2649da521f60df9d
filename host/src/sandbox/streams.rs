//! A job's file streams, read and written on the thread that asks.
//!
//! wasmtime-wasi's file streams start each non-blocking `read`, `skip` and
//! `write` (and a `subscribe` on an idle input stream) as a task on the
//! runtime's blocking pool, whatever `allow_blocking_current_thread` says,
//! and keep up to 64 KiB read ahead per stream. That work runs on no
//! thread of the job: the `cpu_time` meter ([`super::cpu`]), which reads the
//! guest's own thread clock, never sees it (found by an attacker: a guest
//! that asked 64 streams for 64 KiB each and then waited on them used four
//! times its `cpu_time` of host CPU), and thousands of streams each held
//! their read-ahead in host memory. The streams here do each read and write
//! inside the call that asks for it, on the guest's thread, as every other
//! file operation of a job does ([`super::wasi::BLOCKS_CURRENT_THREAD`]): a
//! file is always ready, a read returns what one `pread` gave, a write is
//! done before it returns, and nothing is read ahead.

use std::io;
use std::os::unix::fs::FileExt as _;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use wasmtime_wasi_io::poll::Pollable;
use wasmtime_wasi_io::streams::{InputStream, OutputStream, StreamError, StreamResult};

/// The most one read takes from the file (wasmtime-wasi's own bound), and
/// the room a write stream offers per `check-write`.
pub const CHUNK: usize = 64 * 1024;

/// A file read from `position` on, one `pread` per `read`.
#[derive(Debug)]
pub struct ThreadRead {
    file: Arc<std::fs::File>,
    position: u64,
    closed: bool,
}

impl ThreadRead {
    pub fn new(file: Arc<std::fs::File>, position: u64) -> Self {
        Self {
            file,
            position,
            closed: false,
        }
    }
}

#[async_trait::async_trait]
impl InputStream for ThreadRead {
    fn read(&mut self, size: usize) -> StreamResult<Bytes> {
        if self.closed {
            return Err(StreamError::Closed);
        }
        if size == 0 {
            return Ok(Bytes::new());
        }
        let mut buf = BytesMut::zeroed(size.min(CHUNK));
        loop {
            match self.file.read_at(&mut buf, self.position) {
                Ok(0) => {
                    self.closed = true;
                    return Err(StreamError::Closed);
                }
                Ok(n) => {
                    buf.truncate(n);
                    self.position += n as u64;
                    return Ok(buf.freeze());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.closed = true;
                    return Err(StreamError::LastOperationFailed(e.into()));
                }
            }
        }
    }
}

#[async_trait::async_trait]
impl Pollable for ThreadRead {
    async fn ready(&mut self) {}
}

/// Where a [`ThreadWrite`] writes.
#[derive(Debug, Clone, Copy)]
enum Mode {
    At(u64),
    Append,
}

/// A file written at a position (moving on with each write) or at its end,
/// each `write` done before it returns.
#[derive(Debug)]
pub struct ThreadWrite {
    file: Arc<std::fs::File>,
    mode: Mode,
    closed: bool,
}

impl ThreadWrite {
    /// Writes from `position` on.
    pub fn at(file: Arc<std::fs::File>, position: u64) -> Self {
        Self {
            file,
            mode: Mode::At(position),
            closed: false,
        }
    }

    /// Writes at the file's end, wherever it is at each write.
    pub fn append(file: Arc<std::fs::File>) -> Self {
        Self {
            file,
            mode: Mode::Append,
            closed: false,
        }
    }

    fn write_once(&self, data: &[u8]) -> io::Result<usize> {
        match self.mode {
            Mode::At(position) => self.file.write_at(data, position),
            Mode::Append => rustix::io::pwritev2(
                &*self.file,
                &[io::IoSlice::new(data)],
                0,
                rustix::io::ReadWriteFlags::APPEND,
            )
            .map_err(io::Error::from),
        }
    }
}

#[async_trait::async_trait]
impl OutputStream for ThreadWrite {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        if self.closed {
            return Err(StreamError::Closed);
        }
        let mut rest = &bytes[..];
        while !rest.is_empty() {
            match self.write_once(rest) {
                Ok(0) => {
                    self.closed = true;
                    return Err(StreamError::LastOperationFailed(
                        io::Error::from(io::ErrorKind::WriteZero).into(),
                    ));
                }
                Ok(n) => {
                    rest = &rest[n..];
                    if let Mode::At(position) = &mut self.mode {
                        *position += n as u64;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    self.closed = true;
                    return Err(StreamError::LastOperationFailed(e.into()));
                }
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        if self.closed {
            return Err(StreamError::Closed);
        }
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        if self.closed {
            return Err(StreamError::Closed);
        }
        Ok(CHUNK)
    }
}

#[async_trait::async_trait]
impl Pollable for ThreadWrite {
    async fn ready(&mut self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(bytes: &[u8]) -> (tempfile::TempDir, Arc<std::fs::File>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, bytes).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (dir, Arc::new(file))
    }

    /// Reads give what is there from the position on, in chunks of at most
    /// [`CHUNK`], then `closed` at the end and after it; a skip moves on.
    #[test]
    fn a_read_stream_reads_from_its_position_to_the_end() {
        let data: Vec<u8> = (0..CHUNK as u32 + 100).map(|i| i as u8).collect();
        let (_dir, f) = file(&data);
        let mut s = ThreadRead::new(Arc::clone(&f), 10);
        assert_eq!(s.read(0).unwrap().len(), 0);
        let first = s.read(usize::MAX).unwrap();
        assert_eq!(&first[..], &data[10..10 + CHUNK]);
        assert_eq!(s.skip(50).unwrap(), 50);
        assert_eq!(s.skip(100).unwrap(), 40);
        assert!(matches!(s.read(1), Err(StreamError::Closed)));
        assert!(matches!(s.read(1), Err(StreamError::Closed)));
    }

    /// Writes land before they return, at the position (moving on) or at
    /// the end, whatever was appended meanwhile.
    #[test]
    fn a_write_stream_writes_before_it_returns() {
        let (dir, f) = file(b"0123456789");
        let mut at = ThreadWrite::at(Arc::clone(&f), 2);
        let mut end = ThreadWrite::append(Arc::clone(&f));
        assert_eq!(at.check_write().unwrap(), CHUNK);
        at.write(Bytes::from_static(b"ab")).unwrap();
        end.write(Bytes::from_static(b"XY")).unwrap();
        at.write(Bytes::from_static(b"cd")).unwrap();
        end.write(Bytes::from_static(b"Z")).unwrap();
        at.flush().unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("f")).unwrap(),
            b"01abcd6789XYZ"
        );
    }
}
