//! Resource limits of one job: which limit fired ([`LimitLatch`]) and the
//! wasmtime [`ResourceLimiter`] that bounds linear memory and tables.
//!
//! Every enforcement point (limiter, `/out` quota, output pipes, epoch
//! callback, wall-clock timer) records into one latch; the first limit to fire
//! is the one the report names.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};

use wasmtime::ResourceLimiter;

pub use crate::job::LimitKind;

/// How many times `limits.output` a job may write in total, counting every
/// byte it writes, overwrites and rewrites included. Growth is bounded by
/// `output`; this bounds the disk traffic of rewriting the same bytes in
/// place, which on a disk-backed work directory is real I/O.
pub const WRITTEN_PER_OUTPUT: u64 = 4;

/// Requests of a job's guest that the host refused, counted host-side:
/// every filesystem call answered with an error (a path outside the
/// preopens, a write to `/in`, a quota or descriptor bound, a name that
/// does not exist) and every socket or name-lookup call (all are
/// refused). Evidence that a guest tried something and was stopped,
/// whatever it prints.
#[derive(Clone, Debug, Default)]
pub struct Refusals(Arc<AtomicU64>);

impl Refusals {
    /// Counts one refusal.
    pub fn note(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    /// Refusals so far.
    pub fn count(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Records the first limit that fired in a job. Cheap to clone; shared by
/// every enforcement point of one job and never between jobs.
#[derive(Clone, Debug, Default)]
pub struct LimitLatch(Arc<AtomicU8>);

impl LimitLatch {
    /// Records `kind` unless another limit fired first.
    pub fn fire(&self, kind: LimitKind) {
        let code = LimitKind::ALL.iter().position(|k| *k == kind).unwrap_or(0) as u8 + 1;
        let _ = self
            .0
            .compare_exchange(0, code, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// The first limit that fired, if any.
    pub fn fired(&self) -> Option<LimitKind> {
        match self.0.load(Ordering::SeqCst) {
            0 => None,
            n => LimitKind::ALL.get(usize::from(n) - 1).copied(),
        }
    }
}

/// Bounds the memories and tables of one job's store and measures peak
/// memory. Growth beyond a limit traps at once (rather than making
/// `memory.grow` return -1) so that the job ends with the limit named instead
/// of limping on in a guest that may not check allocation failure.
#[derive(Debug)]
pub struct JobLimiter {
    max_memory: usize,
    max_table_elements: usize,
    memory: usize,
    peak_memory: usize,
    table_elements: usize,
    latch: LimitLatch,
}

/// Core instances one job may create. A Rust `wasm32-wasip2` component
/// creates a handful; this leaves room without allowing instance floods.
const MAX_INSTANCES: usize = 32;
const MAX_MEMORIES: usize = 8;
const MAX_TABLES: usize = 16;

impl JobLimiter {
    /// A limiter allowing `max_memory` bytes of linear memory and
    /// `max_table_elements` table elements in total.
    pub fn new(max_memory: usize, max_table_elements: usize, latch: LimitLatch) -> Self {
        Self {
            max_memory,
            max_table_elements,
            memory: 0,
            peak_memory: 0,
            table_elements: 0,
            latch,
        }
    }

    /// The most linear memory the job held at once.
    pub fn peak_memory(&self) -> usize {
        self.peak_memory
    }
}

impl ResourceLimiter for JobLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self.memory.saturating_sub(current).saturating_add(desired);
        if total > self.max_memory {
            self.latch.fire(LimitKind::Memory);
            wasmtime::bail!(
                "memory limit: {total} bytes requested, {} allowed",
                self.max_memory
            );
        }
        self.memory = total;
        self.peak_memory = self.peak_memory.max(total);
        Ok(true)
    }

    fn table_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let total = self
            .table_elements
            .saturating_sub(current)
            .saturating_add(desired);
        if total > self.max_table_elements {
            self.latch.fire(LimitKind::Tables);
            wasmtime::bail!(
                "table limit: {total} elements requested, {} allowed",
                self.max_table_elements
            );
        }
        self.table_elements = total;
        Ok(true)
    }

    fn instances(&self) -> usize {
        MAX_INSTANCES
    }

    fn memories(&self) -> usize {
        MAX_MEMORIES
    }

    fn tables(&self) -> usize {
        MAX_TABLES
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latch_keeps_the_first_limit() {
        let latch = LimitLatch::default();
        assert_eq!(latch.fired(), None);
        latch.fire(LimitKind::Stdout);
        latch.fire(LimitKind::Memory);
        assert_eq!(latch.fired(), Some(LimitKind::Stdout));
        let fresh = LimitLatch::default();
        fresh.fire(LimitKind::Instances);
        assert_eq!(fresh.fired(), Some(LimitKind::Instances));
    }

    #[test]
    fn memory_is_counted_across_memories() {
        let latch = LimitLatch::default();
        let mut l = JobLimiter::new(100, 10, latch.clone());
        assert!(l.memory_growing(0, 60, None).unwrap());
        // A second memory of 60 would make 120 in total.
        assert!(l.memory_growing(0, 60, None).is_err());
        assert_eq!(latch.fired(), Some(LimitKind::Memory));
        assert_eq!(l.peak_memory(), 60);
    }

    #[test]
    fn tables_are_counted_across_tables() {
        let latch = LimitLatch::default();
        let mut l = JobLimiter::new(100, 10, latch.clone());
        assert!(l.table_growing(0, 6, None).unwrap());
        assert!(l.table_growing(0, 6, None).is_err());
        assert_eq!(latch.fired(), Some(LimitKind::Tables));
    }
}
