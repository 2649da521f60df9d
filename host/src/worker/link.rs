//! One way of a channel: frames written by the thread that sends them.
//!
//! Handing each frame to a task that writes the socket would wake that
//! task's thread for every frame, a context switch per job on top of the
//! job's own. Instead [`Link::send`] writes the frame itself when nothing
//! sent earlier is still waiting; what the socket does not take at once is
//! kept, in order, for [`Link::drain`], and everything sent after it joins
//! it there. Frames therefore leave in the order their `send`s took the
//! lock: a job's call frames are never overtaken by its report, and no
//! frame of the gateway's overtakes an earlier one.
//!
//! Both ends use one. Going up, a job's report is written from the guest
//! thread that ran it, without waking the worker's channel thread. Going
//! down, a job's `Run` is written by the gateway thread that placed it, and
//! the supervisor's pings by the supervisor's own thread, whatever holds
//! the gateway's other threads; the gateway's link is bounded
//! ([`Link::bounded`]): a worker that stops reading is found out
//! ([`Link::overflowed`]).

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::{Buf, BytesMut};
use serde::Serialize;
use tokio::sync::Notify;

use super::proto;

/// What the queue of unwritten frames keeps of its allocation once it is
/// empty.
const KEEP: usize = 64 << 10;

/// What is left of a large queue once it moves to an allocation of its
/// own ([`Unwritten::advance`]), and the most one write takes of it.
const MOVE: usize = 1 << 20;

/// Frames going one way over a channel. Dropping the last of it shuts
/// the socket's writing side: the other end reads its end.
#[derive(Debug)]
pub struct Link {
    write: proto::WriteHalf,
    unwritten: Mutex<Unwritten>,
    /// Set when `unwritten` gained bytes while it was empty, and when the
    /// link goes (its drain then ends).
    wake: Arc<Notify>,
    /// Largest payload a frame may carry.
    max: usize,
    /// Frames that may wait unwritten; past it a frame is dropped and the
    /// link marked overflowed.
    bound: usize,
    overflowed: AtomicBool,
    /// Bytes written to the socket so far, by any thread.
    written: AtomicU64,
}

/// What the socket has not taken yet.
#[derive(Debug, Default)]
struct Unwritten {
    /// Bytes of whole frames, oldest first (the first may be partly
    /// written already: only its rest is here).
    bytes: BytesMut,
    /// Each waiting frame's bytes in `bytes`, in order.
    frames: VecDeque<usize>,
    /// The allocation under `bytes`, as large as it has grown: what is
    /// written is advanced past, not given back, so `bytes.capacity()`
    /// tells only what is left after its end.
    held: usize,
}

impl Unwritten {
    /// Once every frame is written, what frames queued together grew it
    /// to goes back, whoever wrote them (the drain, or [`Link::push`]):
    /// the gateway counts a job's memory free once its report is in
    /// (found by an attacker: an idle worker kept 64 MiB here for its
    /// life).
    fn give_back(&mut self) {
        if self.frames.is_empty() && self.held > KEEP {
            self.bytes = BytesMut::new();
            self.held = 0;
        }
    }

    fn push(&mut self, head: &[u8], payload: &[u8]) {
        self.bytes.extend_from_slice(head);
        self.bytes.extend_from_slice(payload);
        self.frames.push_back(head.len() + payload.len());
        self.held = self.held.max(self.bytes.capacity());
    }

    /// What the next write takes from: at most [`MOVE`] bytes, so that
    /// no one write takes the last of a large queue (a socket whose other
    /// end reads as it is written takes more than its buffer in one).
    fn next(&self) -> &[u8] {
        &self.bytes[..self.bytes.len().min(MOVE)]
    }

    /// `n` bytes were written. When what is left is small beside what it
    /// is held in, it moves to an allocation of its own and the large one
    /// goes back before the last bytes of it are written: the other end
    /// may act on a frame as soon as it has read it whole (the gateway
    /// counts a job's memory free once its report is in).
    fn advance(&mut self, mut n: usize) {
        self.bytes.advance(n);
        if self.bytes.len() <= MOVE && self.held > 2 * MOVE {
            self.bytes = BytesMut::from(&self.bytes[..]);
            self.held = self.bytes.capacity();
        }
        while n > 0 {
            let Some(first) = self.frames.front_mut() else {
                break;
            };
            if *first > n {
                *first -= n;
                break;
            }
            n -= *first;
            self.frames.pop_front();
        }
    }
}

impl Link {
    /// Writes frames of at most `max` payload bytes to `write`.
    pub fn new(write: proto::WriteHalf, max: usize) -> Self {
        Self::bounded(write, max, usize::MAX)
    }

    /// As [`Link::new`], with at most `frames` frames waiting unwritten.
    pub fn bounded(write: proto::WriteHalf, max: usize, frames: usize) -> Self {
        Self {
            write,
            unwritten: Mutex::default(),
            wake: Arc::new(Notify::new()),
            max,
            bound: frames,
            overflowed: AtomicBool::new(false),
            written: AtomicU64::new(0),
        }
    }

    /// Whether a frame was dropped for the bound: the other end has
    /// stopped reading.
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }

    /// How many frames wait unwritten (the first perhaps partly written).
    pub fn waiting(&self) -> usize {
        lock(&self.unwritten).frames.len()
    }

    /// Bytes of frames sent so far, written or waiting: where what is
    /// sent next begins.
    pub fn sent(&self) -> u64 {
        let unwritten = lock(&self.unwritten);
        self.written() + unwritten.bytes.len() as u64
    }

    /// Bytes of frames waiting unwritten.
    pub fn queued(&self) -> u64 {
        lock(&self.unwritten).bytes.len() as u64
    }

    /// Bytes written to the socket so far: less what its other end has not
    /// read yet, what that end has read.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// Writes what waits, as far as the socket takes it now, through
    /// `socket` (another descriptor of the same socket, non-blocking),
    /// without the runtime whose threads drain the link: those may be held
    /// while this thread is not. Whether any was written.
    ///
    /// # Errors
    /// The socket's error.
    pub fn push(&self, socket: std::os::fd::BorrowedFd<'_>) -> io::Result<bool> {
        let mut unwritten = lock(&self.unwritten);
        let mut any = false;
        while !unwritten.frames.is_empty() {
            match rustix::io::write(socket, unwritten.next()) {
                Ok(0) => break,
                Ok(n) => {
                    unwritten.advance(n);
                    self.wrote(n);
                    any = true;
                }
                Err(rustix::io::Errno::AGAIN) => break,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        unwritten.give_back();
        Ok(any)
    }

    fn wrote(&self, n: usize) {
        self.written.fetch_add(n as u64, Ordering::AcqRel);
    }

    /// Sends `message`, or the stand-in `shrink` gives for it when its
    /// frame would be over the bound (see [`proto::fit`]); nothing when
    /// neither fits, or once the link has overflowed. Never waits: written
    /// now if the socket takes it and nothing is waiting before it, else
    /// kept for [`Link::drain`].
    ///
    /// # Errors
    /// The socket's error (the gateway is gone).
    pub fn send<T: Serialize>(
        &self,
        message: T,
        shrink: impl Fn(T) -> Option<T>,
    ) -> io::Result<()> {
        self.send_ending(message, shrink).map(drop)
    }

    /// [`Link::send`], telling where in what the link writes the frame
    /// ends: once [`Link::written`] is past it, the frame has left this
    /// side (none when nothing was sent).
    ///
    /// # Errors
    /// The socket's error (the gateway is gone).
    pub fn send_ending<T: Serialize>(
        &self,
        message: T,
        shrink: impl Fn(T) -> Option<T>,
    ) -> io::Result<Option<u64>> {
        if self.overflowed() {
            return Ok(None);
        }
        let Some(payload) = proto::fit(message, self.max, shrink) else {
            return Ok(None);
        };
        let head = u32::try_from(payload.len())
            .map_err(io::Error::other)?
            .to_be_bytes();
        let mut unwritten = lock(&self.unwritten);
        // Every byte is counted written under this lock: what is written
        // and what waits is all that was sent before this frame.
        let end = self.written() + (unwritten.bytes.len() + head.len() + payload.len()) as u64;
        if !unwritten.frames.is_empty() {
            if unwritten.frames.len() >= self.bound {
                self.overflowed.store(true, Ordering::Release);
                return Ok(None);
            }
            unwritten.push(&head, &payload);
            drop(payload);
            return Ok(Some(end));
        }
        let written = match self
            .write
            .try_write_vectored(&[IoSlice::new(&head), IoSlice::new(&payload)])
        {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => return Err(e),
        };
        self.wrote(written);
        if written == head.len() + payload.len() {
            return Ok(Some(end));
        }
        if written < head.len() {
            unwritten.push(&head[written..], &payload);
        } else {
            unwritten.push(&[], &payload[written - head.len()..]);
        }
        // The frame is copied: it goes back before anything can write the
        // rest of it.
        drop(payload);
        drop(unwritten);
        self.wake.notify_one();
        Ok(Some(end))
    }

    /// Writes what [`Link::send`] could not, as the socket takes it;
    /// runs until the socket fails or the link is gone. It holds the link
    /// only while it writes: an idle drain keeps no socket open.
    ///
    /// # Errors
    /// The socket's error (the other end is gone).
    pub async fn drain(link: Weak<Self>) -> io::Result<()> {
        let Some(wake) = link.upgrade().map(|l| Arc::clone(&l.wake)) else {
            return Ok(());
        };
        loop {
            wake.notified().await;
            let Some(link) = link.upgrade() else {
                return Ok(());
            };
            link.write_out().await?;
        }
    }

    /// Writes everything waiting, as the socket takes it.
    async fn write_out(&self) -> io::Result<()> {
        loop {
            {
                let mut unwritten = lock(&self.unwritten);
                if unwritten.frames.is_empty() {
                    unwritten.give_back();
                    return Ok(());
                }
                match self.write.try_write(unwritten.next()) {
                    Ok(n) => {
                        unwritten.advance(n);
                        self.wrote(n);
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

impl Drop for Link {
    /// Its drain ends.
    fn drop(&mut self) {
        self.wake.notify_one();
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

    fn pair() -> (proto::Reader, Arc<Link>) {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (reader, _) = proto::split(a, 1 << 20, 1 << 20).unwrap();
        let (_, write) = proto::halves(b).unwrap();
        (reader, Arc::new(Link::new(write, 1 << 20)))
    }

    /// Far more than a socket buffer holds, sent from two threads while
    /// the other end reads: the socket fills and empties over and over,
    /// and every frame arrives whole, each thread's in the order it sent
    /// them.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn frames_past_a_full_socket_arrive_whole_and_in_order() {
        let (mut reader, up) = pair();
        let drain = tokio::spawn(Link::drain(Arc::downgrade(&up)));
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
        // Every frame that waited was counted out as it was written.
        assert_eq!(up.waiting(), 0);
        drain.abort();
    }

    /// A frame far larger than the socket takes at once waits in the
    /// link's queue; by the time the other end has read it whole, the
    /// queue's allocation has gone back (found in a worker: an emptied
    /// queue kept the allocation of a 16 MiB report for the worker's life,
    /// since what is written is advanced past, not freed).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_large_frame_leaves_nothing_held_once_it_is_read() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let (mut reader, _) = proto::split(a, 16 << 20, 16 << 20).unwrap();
        let (_, write) = proto::halves(b).unwrap();
        let up = Arc::new(Link::new(write, 16 << 20));
        let drain = tokio::spawn(Link::drain(Arc::downgrade(&up)));
        // Sent before anything reads: all but what the socket takes waits.
        up.send(vec![9u8; 8 << 20], |_| None).unwrap();
        assert!(up.waiting() == 1, "the frame did not wait");
        let frame = reader.next().await.unwrap().unwrap();
        let body: Vec<u8> = proto::decode(&frame).unwrap();
        assert_eq!(body.len(), 8 << 20);
        // Whether the queue's buffer could take 2 MiB again without
        // allocating: only while it still holds the frame's allocation.
        let held = lock(&up.unwritten).bytes.try_reclaim(2 << 20);
        assert!(!held, "the queue still holds the frame's allocation");
        drain.abort();
    }

    /// A link let go while its drain waits shuts its socket's writing
    /// side: the other end reads the end of the channel (a worker let go
    /// exits), the drain ends, and nothing it sent before is lost.
    #[tokio::test]
    async fn a_link_let_go_ends_its_channel_though_its_drain_waits() {
        let (mut reader, up) = pair();
        let drain = tokio::spawn(Link::drain(Arc::downgrade(&up)));
        // The drain is waiting by now (this runtime has one thread).
        tokio::task::yield_now().await;
        up.send((1u8, vec![1u8]), |_| None).unwrap();
        drop(up);
        let first: (u8, Vec<u8>) = proto::decode(&reader.next().await.unwrap().unwrap()).unwrap();
        assert_eq!(first, (1, vec![1]));
        // Bounded only so that a channel left open fails rather than hangs.
        let end = tokio::time::timeout(std::time::Duration::from_secs(30), reader.next()).await;
        assert!(matches!(end, Ok(None)), "the channel stayed open");
        drain.await.unwrap().unwrap();
    }

    /// What waits for the drain is written by [`Link::push`] through
    /// another descriptor of the socket, no drain running (as when the
    /// runtime that drains it is held): whole, in order, and counted.
    #[tokio::test]
    async fn what_waits_is_pushed_through_another_descriptor_without_the_drain() {
        use std::os::fd::AsFd;
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        b.set_nonblocking(true).unwrap();
        let second = std::os::fd::OwnedFd::from(b.try_clone().unwrap());
        let (mut reader, _) = proto::split(a, 1 << 20, 1 << 20).unwrap();
        let (_, write) = proto::halves(b).unwrap();
        let link = Link::new(write, 1 << 20);
        let frame = |i: u32| (i, vec![7u8; 4000]);
        let mut sent = 0u32;
        while link.waiting() < 3 {
            link.send(frame(sent), |_| None).unwrap();
            sent += 1;
        }
        let mut next = 0u32;
        let mut rounds = 0;
        while next < sent {
            // Whatever the socket holds now, then more of what waits.
            while let Ok(Some(got)) =
                tokio::time::timeout(std::time::Duration::from_millis(50), reader.next()).await
            {
                let got: (u32, Vec<u8>) = proto::decode(&got.unwrap()).unwrap();
                assert_eq!(got, frame(next));
                next += 1;
            }
            link.push(second.as_fd()).unwrap();
            rounds += 1;
            assert!(rounds < 1_000, "what waited was never written");
        }
        assert_eq!(link.waiting(), 0);
        let bytes: u64 = (0..sent)
            .map(|i| 4 + proto::encode(&frame(i)).unwrap().len() as u64)
            .sum();
        assert_eq!(link.written(), bytes);
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
