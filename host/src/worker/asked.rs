//! What a worker may say: every frame it sends up answers something the
//! gateway sent it, and the gateway reads no more than a bounded number of
//! frames a second from it, whatever they are.
//!
//! A compromised worker that floods its channel with small frames the
//! gateway reads and lets pass (pongs, `Released`, `Running` of jobs it
//! never had) would take the gateway's threads, which every tenant's jobs
//! need, for a few bytes each (found by an attacker: one worker sending
//! 6-byte frames took 9.1 s of the gateway's CPU in 10 s, and two held both
//! of the machine's cores and made another zone's jobs four times slower).
//! So the gateway counts what it asked ([`Asked`], as each frame goes
//! down) and what was answered ([`Answered`]): a frame beyond what was
//! asked is a fault of the worker. What the count cannot tell (call
//! frames, whose protocol is checked by `calls`) is bounded by the
//! reader's pace ([`Pace`]): past [`FRAMES_PER_SECOND`] (or
//! [`FRAMES_AT_ONCE`] at once) or [`BYTES_PER_SECOND`], the reader waits,
//! so the worker's frames wait in its channel and only its own jobs slow.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::proto::{Down, Up};

/// At most this many frames a second are read from one worker, on
/// average. A job's own frames are a `Report`, a `Released` and, for one
/// that runs past 100 ms, a `Running`: a worker running 10,000 trivial
/// jobs a second stays within it.
pub const FRAMES_PER_SECOND: u32 = 32_768;

/// ...and at most this many at once, an eighth of a second's (found by an
/// attacker: with a second's worth at once, four workers each sending
/// 16,384 requests of ended calls and their aborts took a fresh gateway
/// from 30 to about 250 MB resident in 1.5 s, the calls' tasks spawned
/// faster than they were dropped).
pub const FRAMES_AT_ONCE: u32 = FRAMES_PER_SECOND / 8;

/// ...and at most this many bytes a second, up to as many at once: four
/// reports at the largest frame at once, or a guest's request bodies
/// streamed up at 64 MiB/s (found by an attacker: a worker repeating
/// 16 MiB frames the calls' protocol let pass made the gateway read
/// 340 MB a second, half a core, at 20 frames a second).
pub const BYTES_PER_SECOND: u64 = 64 << 20;

/// How often a worker may vouch for itself unasked (`Pong { seq: 0 }`,
/// sent when the gateway has left its frames unread for 1 s).
const VOUCH_EVERY: Duration = Duration::from_secs(1);

/// What the gateway has sent one worker that it answers: counted as each
/// frame is queued, before the worker can read it.
#[derive(Debug, Default)]
pub struct Asked {
    runs: AtomicU64,
    loads: AtomicU64,
    pings: AtomicU64,
}

impl Asked {
    /// `frame` is going down.
    pub fn sending(&self, frame: &Down) {
        let count = match frame {
            Down::Run { .. } => &self.runs,
            Down::Load { .. } => &self.loads,
            Down::Ping { .. } => &self.pings,
            _ => return,
        };
        count.fetch_add(1, Ordering::AcqRel);
    }
}

/// What one worker has answered, kept by its reader.
#[derive(Debug)]
pub struct Answered {
    since: Instant,
    running: u64,
    reports: u64,
    released: u64,
    loaded: u64,
    pongs: u64,
}

impl Answered {
    /// A worker that said hello at `since`.
    pub fn new(since: Instant) -> Self {
        Self {
            since,
            running: 0,
            reports: 0,
            released: 0,
            loaded: 0,
            pongs: 0,
        }
    }

    /// Counts `message`, read at `now`; why it is more than `asked` asked
    /// for, if it is: each job sent is answered by at most one `Running`,
    /// one `Report` and one `Released`, each load by one `Loaded`, each
    /// ping by one `Pong`, and one more `Pong` a second may vouch.
    ///
    /// # Errors
    /// What the worker said beyond what it was asked.
    pub fn count(&mut self, message: &Up, asked: &Asked, now: Instant) -> Result<(), String> {
        let get = |c: &AtomicU64| c.load(Ordering::Acquire);
        let (said, allowed, what) = match message {
            Up::Running { .. } => (&mut self.running, get(&asked.runs), "`Running`"),
            Up::Report { .. } => (&mut self.reports, get(&asked.runs), "reports"),
            Up::Released { .. } => (&mut self.released, get(&asked.runs), "`Released`"),
            Up::Loaded { .. } => (&mut self.loaded, get(&asked.loads), "`Loaded`"),
            Up::Pong { .. } => {
                let vouches =
                    now.saturating_duration_since(self.since).as_secs() / VOUCH_EVERY.as_secs() + 1;
                (
                    &mut self.pongs,
                    get(&asked.pings).saturating_add(vouches),
                    "pongs",
                )
            }
            _ => return Ok(()),
        };
        *said += 1;
        if *said > allowed {
            return Err(format!(
                "sent {said} {what}, more than it was asked for ({allowed})"
            ));
        }
        Ok(())
    }
}

/// The reader's pace: buckets of [`FRAMES_AT_ONCE`] frames and
/// [`BYTES_PER_SECOND`] bytes, refilled at [`FRAMES_PER_SECOND`] and
/// [`BYTES_PER_SECOND`].
#[derive(Debug)]
pub struct Pace {
    frames: f64,
    bytes: f64,
    at: Instant,
}

impl Pace {
    /// Full buckets at `now`.
    pub fn new(now: Instant) -> Self {
        Self {
            frames: f64::from(FRAMES_AT_ONCE),
            bytes: BYTES_PER_SECOND as f64,
            at: now,
        }
    }

    /// Takes a frame of `bytes` read at `now`; how long to wait before
    /// reading the next, if a bucket is past empty.
    pub fn take(&mut self, now: Instant, bytes: usize) -> Option<Duration> {
        let (frame_rate, byte_rate) = (f64::from(FRAMES_PER_SECOND), BYTES_PER_SECOND as f64);
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.frames = (self.frames + elapsed * frame_rate).min(f64::from(FRAMES_AT_ONCE)) - 1.0;
        self.bytes = (self.bytes + elapsed * byte_rate).min(byte_rate) - bytes as f64;
        let wait = (-self.frames / frame_rate).max(-self.bytes / byte_rate);
        (wait > 0.0).then(|| Duration::from_secs_f64(wait))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(job: u64) -> Down {
        Down::Run {
            job,
            module: 1,
            spec: crate::job::JobSpec::default(),
        }
    }

    #[test]
    fn each_job_sent_is_answered_once_of_each_kind_and_no_more() {
        let t0 = Instant::now();
        let asked = Asked::default();
        let mut answered = Answered::new(t0);
        asked.sending(&run(1));
        asked.sending(&run(2));
        for message in [
            Up::Running { job: 1 },
            Up::Released { job: 1 },
            Up::Running { job: 2 },
            Up::Released { job: 2 },
        ] {
            answered.count(&message, &asked, t0).unwrap();
        }
        let third = answered.count(&Up::Released { job: 1 }, &asked, t0);
        assert!(
            third.as_ref().is_err_and(|e| e.contains("`Released`")),
            "{third:?}"
        );
        let running = answered.count(&Up::Running { job: 9 }, &asked, t0);
        assert!(running.is_err(), "{running:?}");
        // A job sent since is answered again.
        let mut answered = Answered::new(t0);
        for message in [Up::Running { job: 1 }, Up::Running { job: 2 }] {
            answered.count(&message, &asked, t0).unwrap();
        }
        assert!(answered.count(&Up::Running { job: 3 }, &asked, t0).is_err());
        let mut answered = Answered::new(t0);
        asked.sending(&run(3));
        for job in 1..=3 {
            answered.count(&Up::Running { job }, &asked, t0).unwrap();
        }
    }

    #[test]
    fn pongs_answer_pings_and_vouch_once_a_second() {
        let t0 = Instant::now();
        let asked = Asked::default();
        let mut answered = Answered::new(t0);
        // One vouch at the start.
        answered.count(&Up::Pong { seq: 0 }, &asked, t0).unwrap();
        assert!(answered.count(&Up::Pong { seq: 0 }, &asked, t0).is_err());
        let mut answered = Answered::new(t0);
        asked.sending(&Down::Ping { seq: 1 });
        asked.sending(&Down::Ping { seq: 2 });
        for _ in 0..3 {
            answered.count(&Up::Pong { seq: 0 }, &asked, t0).unwrap();
        }
        assert!(answered.count(&Up::Pong { seq: 0 }, &asked, t0).is_err());
        // A second later, one more may vouch.
        let later = t0 + Duration::from_secs(1);
        let mut answered = Answered::new(t0);
        for _ in 0..4 {
            answered.count(&Up::Pong { seq: 0 }, &asked, later).unwrap();
        }
        assert!(answered.count(&Up::Pong { seq: 0 }, &asked, later).is_err());
    }

    #[test]
    fn the_reader_waits_once_its_frames_a_second_are_taken() {
        let t0 = Instant::now();
        let mut pace = Pace::new(t0);
        for _ in 0..FRAMES_AT_ONCE {
            assert_eq!(pace.take(t0, 6), None);
        }
        let wait = pace.take(t0, 6).expect("a frame past the bucket waits");
        assert!(wait > Duration::ZERO && wait < Duration::from_millis(1));
        // Refilled as time passes, never past what it holds at once.
        let later = t0 + Duration::from_secs(10);
        for _ in 0..FRAMES_AT_ONCE {
            assert_eq!(pace.take(later, 6), None);
        }
        assert!(pace.take(later, 6).is_some());
        // A second takes a second's frames.
        let mut pace = Pace::new(t0);
        let waited: f64 = (0..FRAMES_PER_SECOND + FRAMES_AT_ONCE)
            .filter_map(|_| pace.take(t0, 6))
            .last()
            .unwrap()
            .as_secs_f64();
        assert!((waited - 1.0).abs() < 0.001, "{waited}");
    }

    #[test]
    fn the_reader_waits_once_its_bytes_a_second_are_taken() {
        let t0 = Instant::now();
        let mut pace = Pace::new(t0);
        let frame = 16 << 20;
        for _ in 0..BYTES_PER_SECOND / frame {
            assert_eq!(pace.take(t0, frame as usize), None);
        }
        // A quarter of a second's bytes more: a quarter of a second.
        let wait = pace
            .take(t0, frame as usize)
            .expect("bytes past the bucket wait");
        assert!((wait.as_secs_f64() - 0.25).abs() < 0.001, "{wait:?}");
        // Half a second later the deficit is paid and a quarter more came.
        let later = t0 + Duration::from_millis(500);
        assert_eq!(pace.take(later, frame as usize), None);
        assert!(pace.take(later, 1).is_some());
    }
}
