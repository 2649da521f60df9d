//! The worker's half of the channel going up: frames written by the
//! thread that sends them.
//!
//! A job's report is sent from the guest thread that ran it. Handing it to
//! the channel's thread to write would wake that thread for every frame
//! (its runtime parked in `epoll_wait`, woken through an eventfd), a
//! context switch per job on top of the job's own. Instead [`Uplink::send`]
//! writes the frame itself when nothing sent earlier is still waiting; what
//! the socket does not take at once is kept, in order, for
//! [`Uplink::drain`] on the channel's thread, and everything sent after it
//! joins it there. Frames therefore leave in the order their `send`s took
//! the lock: a job's call frames are never overtaken by its report.

use std::io::{self, IoSlice};
use std::sync::Mutex;

use bytes::{Buf, BytesMut};
use serde::Serialize;
use tokio::net::unix::OwnedWriteHalf;
use tokio::sync::Notify;

use super::proto;

/// What the queue of unwritten frames keeps of its allocation once it is
/// empty.
const KEEP: usize = 64 << 10;

/// Frames going up one channel.
#[derive(Debug)]
pub struct Uplink {
    write: OwnedWriteHalf,
    /// Bytes of whole frames not written yet, oldest first (the first may
    /// be partly written already: only its rest is here).
    unwritten: Mutex<BytesMut>,
    /// Set when `unwritten` gained bytes while it was empty.
    wake: Notify,
    /// Largest payload a frame may carry.
    max: usize,
}

impl Uplink {
    /// Writes frames of at most `max` payload bytes to `write`.
    pub fn new(write: OwnedWriteHalf, max: usize) -> Self {
        Self {
            write,
            unwritten: Mutex::default(),
            wake: Notify::new(),
            max,
        }
    }

    /// Sends `message`, or the stand-in `shrink` gives for it when its
    /// frame would be over the bound (see [`proto::fit`]); nothing when
    /// neither fits. Never waits: written now if the socket takes it and
    /// nothing is waiting before it, else kept for [`Uplink::drain`].
    ///
    /// # Errors
    /// The socket's error (the gateway is gone).
    pub fn send<T: Serialize>(
        &self,
        message: T,
        shrink: impl Fn(T) -> Option<T>,
    ) -> io::Result<()> {
        let Some(payload) = proto::fit(message, self.max, shrink) else {
            return Ok(());
        };
        let head = u32::try_from(payload.len())
            .map_err(io::Error::other)?
            .to_be_bytes();
        let mut unwritten = lock(&self.unwritten);
        if !unwritten.is_empty() {
            unwritten.extend_from_slice(&head);
            unwritten.extend_from_slice(&payload);
            return Ok(());
        }
        let written = match self
            .write
            .try_write_vectored(&[IoSlice::new(&head), IoSlice::new(&payload)])
        {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        if written == head.len() + payload.len() {
            return Ok(());
        }
        if written < head.len() {
            unwritten.extend_from_slice(&head[written..]);
            unwritten.extend_from_slice(&payload);
        } else {
            unwritten.extend_from_slice(&payload[written - head.len()..]);
        }
        drop(unwritten);
        self.wake.notify_one();
        Ok(())
    }

    /// Writes what [`Uplink::send`] could not, as the socket takes it;
    /// runs until the socket fails.
    ///
    /// # Errors
    /// The socket's error (the gateway is gone).
    pub async fn drain(&self) -> io::Result<()> {
        loop {
            self.wake.notified().await;
            loop {
                {
                    let mut unwritten = lock(&self.unwritten);
                    if unwritten.is_empty() {
                        // What reports queued together grew it to goes
                        // back once they are written: the gateway counts
                        // a job's memory free once its report is in
                        // (found by an attacker: an idle worker kept
                        // 64 MiB here for its life).
                        if unwritten.capacity() > KEEP {
                            *unwritten = BytesMut::new();
                        }
                        break;
                    }
                    match self.write.try_write(&unwritten) {
                        Ok(n) => {
                            unwritten.advance(n);
                            continue;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e),
                    }
                }
                self.write.writable().await?;
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use futures_util::StreamExt;

    use super::*;

    fn pair() -> (proto::Reader, Arc<Uplink>) {
        let (a, b) = tokio::net::UnixStream::pair().unwrap();
        let (reader, _) = proto::split(a, 1 << 20, 1 << 20);
        let (_, write) = b.into_split();
        (reader, Arc::new(Uplink::new(write, 1 << 20)))
    }

    /// Far more than a socket buffer holds, sent from two threads while
    /// the other end reads: the socket fills and empties over and over,
    /// and every frame arrives whole, each thread's in the order it sent
    /// them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_past_a_full_socket_arrive_whole_and_in_order() {
        let (mut reader, up) = pair();
        let drain = tokio::spawn({
            let up = Arc::clone(&up);
            async move { up.drain().await }
        });
        let senders: Vec<_> = (0..2u8)
            .map(|t| {
                let up = Arc::clone(&up);
                std::thread::spawn(move || {
                    for i in 0..2_000u32 {
                        // Sizes that straddle the frame header too.
                        let body = vec![t; (i as usize * 37) % 3_000 + 1];
                        up.send((t, i, body), |_| None).unwrap();
                    }
                })
            })
            .collect();
        let mut next = [0u32; 2];
        for _ in 0..4_000 {
            let frame = reader.next().await.unwrap().unwrap();
            let (t, i, body): (u8, u32, Vec<u8>) = proto::decode(&frame).unwrap();
            assert_eq!(i, next[t as usize], "thread {t}'s frames out of order");
            assert_eq!(body.len(), (i as usize * 37) % 3_000 + 1);
            assert!(body.iter().all(|&b| b == t));
            next[t as usize] += 1;
        }
        for s in senders {
            s.join().unwrap();
        }
        drain.abort();
    }

    #[tokio::test]
    async fn a_frame_over_the_bound_goes_as_its_stand_in_or_not_at_all() {
        let (mut reader, up) = pair();
        let big = vec![7u8; 2 << 20];
        up.send((1u8, big.clone()), |(n, _)| Some((n, vec![])))
            .unwrap();
        up.send((2u8, big), |_| None).unwrap();
        up.send((3u8, vec![1u8]), |_| None).unwrap();
        let first: (u8, Vec<u8>) = proto::decode(&reader.next().await.unwrap().unwrap()).unwrap();
        let second: (u8, Vec<u8>) = proto::decode(&reader.next().await.unwrap().unwrap()).unwrap();
        assert_eq!(first, (1, vec![]));
        assert_eq!(second, (3, vec![1]));
    }
}
