//! The `cpu_time` meter: real thread CPU time spent running a job, inside
//! host calls as well as in wasm.
//!
//! A job's guest and every host call it makes run inside the polls of one
//! future (wasmtime's fiber runs on the polling thread; file operations run
//! on it too, `allow_blocking_current_thread`). [`Metered`] reads the
//! thread's CPU clock (`CLOCK_THREAD_CPUTIME_ID`) around each poll and
//! charges the difference to the job's [`CpuMeter`], so work the host does
//! for the job — lifting a huge list into a call that then fails at once,
//! path resolution, stat loops — costs what it really costs rather than
//! one epoch tick. The epoch callback asks the same meter
//! ([`CpuMeter::spent_now`], which includes the poll in progress), so a
//! guest spinning in wasm is stopped at the next tick, and a job whose host
//! call overran is stopped as soon as that call returns. This module must
//! not know about wasmtime.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};

use super::limits::{LimitKind, LimitLatch};

/// CPU time the calling thread has used, in nanoseconds.
pub fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable `timespec`; the clock id is a
    // constant every Linux supports.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return 0;
    }
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// One job's CPU account. Shared by the job's store (the epoch callback)
/// and the [`Metered`] future that runs it.
#[derive(Debug)]
pub struct CpuMeter {
    budget_ns: u64,
    /// CPU spent in finished polls.
    spent_ns: AtomicU64,
    /// The thread CPU clock when the current poll began (0: none running).
    poll_started_ns: AtomicU64,
    latch: LimitLatch,
}

impl CpuMeter {
    /// A meter allowing `budget_ns` nanoseconds of CPU.
    pub fn new(budget_ns: u64, latch: LimitLatch) -> Self {
        Self {
            budget_ns,
            spent_ns: AtomicU64::new(0),
            poll_started_ns: AtomicU64::new(0),
            latch,
        }
    }

    /// CPU spent so far, the poll in progress included when called from
    /// the thread running it.
    pub fn spent_now(&self) -> u64 {
        let done = self.spent_ns.load(Ordering::SeqCst);
        match self.poll_started_ns.load(Ordering::SeqCst) {
            0 => done,
            started => done.saturating_add(thread_cpu_ns().saturating_sub(started)),
        }
    }

    /// CPU spent in finished polls.
    pub fn spent(&self) -> u64 {
        self.spent_ns.load(Ordering::SeqCst)
    }

    /// Whether the job has used more than its budget; if so the `cpu_time`
    /// limit fires.
    pub fn over_budget(&self) -> bool {
        let over = self.spent_now() > self.budget_ns;
        if over {
            self.latch.fire(LimitKind::CpuTime);
        }
        over
    }

    fn begin(&self) -> u64 {
        // `max(1)`: 0 means "no poll running".
        let now = thread_cpu_ns().max(1);
        self.poll_started_ns.store(now, Ordering::SeqCst);
        now
    }

    fn end(&self, started: u64) {
        let used = thread_cpu_ns().saturating_sub(started);
        self.poll_started_ns.store(0, Ordering::SeqCst);
        self.spent_ns.fetch_add(used, Ordering::SeqCst);
    }
}

/// Runs a job's future, charging each poll's thread CPU time to its meter;
/// ends with `None` (dropping the future, which ends the guest) once the
/// job is over budget.
pub struct Metered<'a, F> {
    inner: Pin<&'a mut F>,
    meter: &'a CpuMeter,
}

impl<'a, F: Future> Metered<'a, F> {
    /// Meters `inner` with `meter`.
    pub fn new(inner: Pin<&'a mut F>, meter: &'a CpuMeter) -> Self {
        Self { inner, meter }
    }
}

impl<F: Future> Future for Metered<'_, F> {
    type Output = Option<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let started = self.meter.begin();
        let polled = self.inner.as_mut().poll(cx);
        self.meter.end(started);
        match polled {
            Poll::Ready(out) => Poll::Ready(Some(out)),
            Poll::Pending if self.meter.over_budget() => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// A future the host runs for a job off the job's own thread (a service
/// call's send: minting its token, checking and connecting), charging the
/// CPU time of each of its polls to the job's [`CpuMeter`]. The job's own
/// polls see the charge ([`CpuMeter::spent_now`]) and stop it over budget;
/// this future is never stopped itself.
pub struct Charged<F> {
    inner: Pin<Box<F>>,
    meter: std::sync::Arc<CpuMeter>,
}

impl<F: Future> Charged<F> {
    /// `inner`, charging its polls to `meter`.
    pub fn new(inner: F, meter: std::sync::Arc<CpuMeter>) -> Self {
        Self {
            inner: Box::pin(inner),
            meter,
        }
    }
}

impl<F: Future> Future for Charged<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let started = thread_cpu_ns();
        let polled = self.inner.as_mut().poll(cx);
        let used = thread_cpu_ns().saturating_sub(started);
        self.meter.spent_ns.fetch_add(used, Ordering::SeqCst);
        polled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn burn(ns: u64) {
        let start = thread_cpu_ns();
        while thread_cpu_ns() - start < ns {
            std::hint::black_box(0u64);
        }
    }

    #[test]
    fn the_thread_clock_counts_cpu_not_sleep() {
        let start = thread_cpu_ns();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let slept = thread_cpu_ns() - start;
        assert!(slept < 40_000_000, "sleeping used {slept} ns of CPU");
        burn(20_000_000);
        assert!(thread_cpu_ns() - start >= 20_000_000);
    }

    #[tokio::test]
    async fn work_inside_one_poll_is_charged_and_stops_the_job() {
        let latch = LimitLatch::default();
        let meter = CpuMeter::new(10_000_000, latch.clone());
        // One poll that burns 30 ms, as a long host call would, then waits.
        let job = async {
            burn(30_000_000);
            std::future::pending::<()>().await;
        };
        let job = std::pin::pin!(job);
        let out = Metered::new(job, &meter).await;
        assert!(out.is_none(), "stopped over budget");
        assert!(meter.spent() >= 30_000_000, "charged {} ns", meter.spent());
        assert_eq!(latch.fired(), Some(LimitKind::CpuTime));
    }

    #[tokio::test]
    async fn work_done_for_the_job_elsewhere_is_charged_to_it() {
        let latch = LimitLatch::default();
        let meter = std::sync::Arc::new(CpuMeter::new(10_000_000, latch.clone()));
        let done = tokio::spawn(Charged::new(
            async {
                burn(30_000_000);
                7
            },
            std::sync::Arc::clone(&meter),
        ));
        assert_eq!(done.await.unwrap(), 7);
        assert!(meter.spent() >= 30_000_000, "charged {} ns", meter.spent());
        assert!(meter.over_budget());
        assert_eq!(latch.fired(), Some(LimitKind::CpuTime));
    }

    #[tokio::test]
    async fn a_job_within_budget_finishes() {
        let latch = LimitLatch::default();
        let meter = CpuMeter::new(1_000_000_000, latch.clone());
        let job = std::pin::pin!(async { 7 });
        assert_eq!(Metered::new(job, &meter).await, Some(7));
        assert_eq!(latch.fired(), None);
    }
}
