//! When a worker last spoke, as far as the gateway can tell: when what it
//! said came, not when the gateway read it.
//!
//! A worker's writes land in the gateway's end of the channel at once; the
//! gateway may read them much later (its threads held by other work). So
//! the supervisor looks at each channel every round and notes how many
//! bytes the worker had sent by then ([`Hearing::look`]): a frame read
//! later is dated by the last look at which it had not all come
//! ([`Hearing::frame`]), and a look that finds more come than any look
//! before dates the worker at the look before, whole frame or not. A
//! worker that hung writes nothing, so neither rule hears it again however
//! late its last words are read.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How long looks are kept: a frame that came before them all is older
/// than any worker is excused for, and is not heard.
pub const KEEP_LOOKS: Duration = Duration::from_secs(75);

/// One worker's looks and when it was last heard.
#[derive(Debug)]
pub struct Hearing {
    /// When it was last heard.
    last: Instant,
    /// The supervisor's looks, the last [`KEEP_LOOKS`]: when, and how many
    /// bytes it had sent by then (taken by the gateway, or waiting in its
    /// end).
    looks: VecDeque<(Instant, u64)>,
}

impl Hearing {
    /// A worker heard at `now` (it has just said hello).
    pub fn new(now: Instant) -> Self {
        Self {
            last: now,
            looks: VecDeque::new(),
        }
    }

    /// When it was last heard.
    pub fn last(&self) -> Instant {
        self.last
    }

    /// The supervisor's look at `now`: the gateway had taken `before`
    /// bytes of the channel, `waiting` more were in its end, then it had
    /// taken `after` (a read between the two counts counts its bytes
    /// twice, so a frame is never found to have come later than it did).
    /// More come than at any look before, with no read across this one:
    /// the worker wrote since the last look, so it was there after it.
    pub fn look(&mut self, now: Instant, before: u64, waiting: u64, after: u64) {
        let sent = waiting.saturating_add(after);
        let most = self.looks.iter().map(|&(_, sent)| sent).max();
        if let (Some(most), Some(&(last, _))) = (most, self.looks.back())
            && before == after
            && sent > most
        {
            self.hear(last);
        }
        self.looks.push_back((now, sent));
        while self
            .looks
            .front()
            .is_some_and(|&(at, _)| now.saturating_duration_since(at) > KEEP_LOOKS)
        {
            self.looks.pop_front();
        }
    }

    /// A frame ending at byte `end` of the channel was read at `now`: the
    /// worker is heard as of the last look at which it had not all come,
    /// not as of its reading (found by an attacker: a worker hung while the
    /// gateway's threads were held, and the answer it gave before, read
    /// once they were let go, bought it 15 s more). Before the first look, as of `now`; a frame that had all come by
    /// every look kept is not heard.
    pub fn frame(&mut self, end: u64, now: Instant) {
        let at = if self.looks.is_empty() {
            Some(now)
        } else {
            self.looks
                .iter()
                .rev()
                .find(|&&(_, sent)| sent < end)
                .map(|&(at, _)| at)
        };
        if let Some(at) = at {
            self.hear(at);
        }
    }

    fn hear(&mut self, at: Instant) {
        if at > self.last {
            self.last = at;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(start: Instant, s: u64) -> Instant {
        start + Duration::from_secs(s)
    }

    #[test]
    fn a_frame_read_late_is_heard_as_of_the_last_look_it_had_not_all_come_by() {
        let t0 = Instant::now();
        let mut h = Hearing::new(t0);
        // The worker sent 100 bytes by 1 s, then 150 by 2 s; nothing more.
        h.look(secs(t0, 1), 0, 100, 0);
        h.look(secs(t0, 2), 0, 150, 0);
        for s in 3..20 {
            h.look(secs(t0, s), 0, 150, 0);
        }
        // Read at 20 s: the frame ending at 150 had not all come at 1 s.
        h.frame(150, secs(t0, 20));
        assert_eq!(h.last(), secs(t0, 1));
        // One ending at 100 had all come by every look: not heard again.
        let mut h2 = Hearing::new(t0);
        h2.look(secs(t0, 1), 0, 100, 0);
        h2.look(secs(t0, 2), 0, 100, 0);
        h2.frame(100, secs(t0, 20));
        assert_eq!(h2.last(), t0);
    }

    #[test]
    fn more_come_than_at_any_look_before_hears_the_worker_at_the_look_before() {
        let t0 = Instant::now();
        let mut h = Hearing::new(t0);
        h.look(secs(t0, 1), 0, 10, 0);
        h.look(secs(t0, 2), 0, 10, 0);
        // Part of a large frame has come since (none of it read yet).
        h.look(secs(t0, 3), 0, 4096, 0);
        assert_eq!(h.last(), secs(t0, 2));
        // The gateway read it all: taken went up, nothing waits. No more
        // than the most at any look: not heard again.
        h.look(secs(t0, 4), 4096, 0, 4096);
        assert_eq!(h.last(), secs(t0, 2));
    }

    #[test]
    fn a_look_with_a_read_across_it_hears_nothing() {
        let t0 = Instant::now();
        let mut h = Hearing::new(t0);
        h.look(secs(t0, 1), 0, 10, 0);
        // A read took 10 between the counts: they add up to more than
        // was ever sent.
        h.look(secs(t0, 2), 0, 10, 10);
        assert_eq!(h.last(), t0);
    }

    #[test]
    fn a_worker_that_sends_nothing_more_is_not_heard_by_the_looks() {
        let t0 = Instant::now();
        let mut h = Hearing::new(t0);
        h.look(secs(t0, 1), 0, 500, 0);
        // Read bit by bit: what was sent stays 500.
        h.look(secs(t0, 2), 100, 400, 100);
        h.look(secs(t0, 3), 300, 200, 300);
        h.look(secs(t0, 4), 500, 0, 500);
        assert_eq!(h.last(), t0);
    }

    #[test]
    fn a_frame_that_came_before_every_look_kept_is_not_heard() {
        let t0 = Instant::now();
        let looked = |last: Instant| {
            let mut h = Hearing::new(t0);
            h.look(secs(t0, 1), 0, 0, 0);
            // The frame came and was read across the next look's counts.
            h.look(secs(t0, 2), 0, 0, 64);
            h.look(last, 64, 0, 64);
            h.frame(64, last);
            h.last()
        };
        // The look at 1 s, before the frame came, is kept: heard then.
        assert_eq!(looked(secs(t0, 1) + KEEP_LOOKS), secs(t0, 1));
        // Gone: the frame is older than every look kept.
        assert_eq!(looked(secs(t0, 2) + KEEP_LOOKS), t0);
    }
}
