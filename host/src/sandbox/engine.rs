//! The one wasmtime `Engine` of a process, its pooling allocator, and the
//! epoch ticker thread that drives CPU-time limits.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use wasmtime::{Config, Engine, InstanceAllocationStrategy, OptLevel, PoolingAllocationConfig};

use super::SandboxConfig;

/// Core instances one component may create (pool slot sizing).
const CORE_INSTANCES_PER_COMPONENT: u32 = 16;
/// Memories one component may define.
const MEMORIES_PER_COMPONENT: u32 = 4;
/// Tables one component may define.
const TABLES_PER_COMPONENT: u32 = 16;
/// Bytes of each linear memory reset in place (not decommitted) after a
/// job: they stay the worker's between jobs ([`kept_resident_per_place`]).
const KEEP_RESIDENT: usize = 4 * 1024 * 1024;
/// Bytes of each table reset in place after a job.
const TABLE_KEEP_RESIDENT: usize = 64 * 1024;
/// Elements one table may hold; policies may not ask for more.
pub const MAX_TABLE_ELEMENTS: usize = 100_000;

/// Builds the engine: pooling allocator sized for `config.max_concurrent_jobs`
/// jobs, epoch interruption for CPU limits, a bounded wasm stack, SIMD on.
///
/// # Errors
/// If wasmtime rejects the configuration (for example when the host cannot
/// reserve the pool's virtual memory).
pub fn build(config: &SandboxConfig) -> wasmtime::Result<Engine> {
    let jobs = config.max_concurrent_jobs.max(1);
    let mut pool = PoolingAllocationConfig::new();
    pool.total_component_instances(jobs)
        .total_core_instances(jobs * CORE_INSTANCES_PER_COMPONENT)
        .max_core_instances_per_component(CORE_INSTANCES_PER_COMPONENT)
        .total_memories(jobs * MEMORIES_PER_COMPONENT)
        .max_memories_per_component(MEMORIES_PER_COMPONENT)
        .max_memories_per_module(1)
        .total_tables(jobs * TABLES_PER_COMPONENT)
        .max_tables_per_component(TABLES_PER_COMPONENT)
        .max_tables_per_module(2)
        .table_elements(MAX_TABLE_ELEMENTS)
        .total_stacks(jobs)
        .max_memory_size(config.max_memory.as_usize())
        // Reset a finished job's memory in place instead of with `madvise`:
        // with `PAGEMAP_SCAN` (Linux 6.7+, used when present) only the pages
        // the job dirtied are restored, up to this many bytes, so a typical
        // job's slot is reused without an `madvise`, the TLB shootdown it
        // forces on every other core, and the page faults after it. The
        // slot's contents are restored either way: no job sees another's.
        .linear_memory_keep_resident(KEEP_RESIDENT)
        .table_keep_resident(TABLE_KEEP_RESIDENT)
        .pagemap_scan(wasmtime::Enabled::Auto)
        // The rest is given back as the job ends, not batched with later
        // jobs': a worker's jobs are placed by what they can take of its
        // memory (`worker::memory`), so what an ended job held must be
        // gone by then (found by its test: a batched 190 MiB, still
        // resident, and the next job's took a worker past its ceiling).
        .decommit_batch_size(1);

    let mut c = Config::new();
    c.wasm_component_model(true)
        .wasm_simd(true)
        .epoch_interruption(true)
        .max_wasm_stack(config.max_wasm_stack)
        .async_stack_size(config.max_wasm_stack + 1024 * 1024)
        .cranelift_opt_level(OptLevel::Speed)
        // A module's data is copied into each job's memory as it starts,
        // where the job's weight counts it, rather than kept in a
        // copy-on-write image: wasmtime makes that image (a memfd, a second
        // copy of every data segment, the artifact holding the first) the
        // first time a module runs in a process, and keeps it as long as
        // the module, outside any job (found by an attacker: 16 modules of
        // a 48 MiB data segment each left 768 MiB of images in a worker,
        // hidden behind a large job's weight, which then took the worker
        // past its ceiling and another tenant's job with it).
        .memory_init_cow(false)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    Engine::new(&c)
}

/// What one place of the pool keeps resident between its jobs, at most:
/// its memories' and tables' pages reset in place, and its guest stack
/// (`max_wasm_stack` and the host's part above it, as configured by
/// [`build`] with the default stack).
pub fn kept_resident_per_place() -> u64 {
    let stack = super::SandboxConfig::new(".").max_wasm_stack + 1024 * 1024;
    (MEMORIES_PER_COMPONENT as usize * KEEP_RESIDENT
        + TABLES_PER_COMPONENT as usize * TABLE_KEEP_RESIDENT
        + stack) as u64
}

/// Opens this process's page map for the pooling allocator, once: with it
/// a finished job's memory is restored page by page (`PAGEMAP_SCAN`)
/// rather than by clearing every resident byte. A worker calls this while
/// hardening, before Landlock closes `/proc` to it.
pub fn open_page_map() {
    let _ = PoolingAllocationConfig::is_pagemap_scan_available();
}

/// Increments the engine's epoch every `tick` on a dedicated thread until
/// dropped. One per engine.
#[derive(Debug)]
pub struct EpochTicker {
    stop: Arc<AtomicBool>,
}

impl EpochTicker {
    /// Starts the ticker thread.
    pub fn start(engine: Engine, tick: Duration) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("bulkhead-epoch".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::sleep(tick);
                    engine.increment_epoch();
                }
            })
            .expect("spawning the epoch thread");
        Self { stop }
    }
}

impl Drop for EpochTicker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Descriptors kept back for the process itself, which no job can take:
/// listeners and their connections, the store, the module cache, the
/// precompiled modules, downloads, and outbound calls.
pub const RESERVED_DESCRIPTORS: u64 = 512;

/// Host descriptors a running job holds besides what its guest opens: its
/// preopens (`/in`, `/out`, and the escape suite's extra one), the one a
/// host call opens and closes within the call (path resolution with
/// `openat2`, a directory listing, syncing a directory), and output
/// collection after the guest ends.
pub const JOB_OVERHEAD_DESCRIPTORS: u64 = 8;

/// Most descriptors any one job may hold, whatever the process limit.
pub const MAX_OPEN_PER_JOB: u64 = 256;

/// Fewest descriptors a job may be given: below this, ordinary programs
/// fail, so the host refuses to start instead.
pub const MIN_OPEN_PER_JOB: u64 = 16;

/// The process's descriptor limit cannot give every slot its minimum.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "the process may open {limit} descriptors: after {RESERVED_DESCRIPTORS} kept for the \
     service, {slots} concurrent jobs cannot have {MIN_OPEN_PER_JOB} each (plus \
     {JOB_OVERHEAD_DESCRIPTORS} of their own); raise `ulimit -n` or run fewer jobs at once"
)]
pub struct DescriptorBudgetError {
    /// The process's descriptor limit.
    pub limit: u64,
    /// Jobs that may run at once.
    pub slots: u32,
}

/// Host descriptors one job's guest may hold, given the process limit
/// `limit` and `slots` jobs at once: what is left after
/// [`RESERVED_DESCRIPTORS`], divided among the slots, less each job's
/// [`JOB_OVERHEAD_DESCRIPTORS`], at most [`MAX_OPEN_PER_JOB`]. So
/// `slots * (per_job + JOB_OVERHEAD_DESCRIPTORS) + RESERVED_DESCRIPTORS <= limit`:
/// all jobs together, each at its bound, leave the reserve untouched.
///
/// # Errors
/// When that leaves a job fewer than [`MIN_OPEN_PER_JOB`].
pub fn descriptor_budget(limit: u64, slots: u32) -> Result<u64, DescriptorBudgetError> {
    let per_slot = limit.saturating_sub(RESERVED_DESCRIPTORS) / u64::from(slots.max(1));
    let per_job = per_slot
        .saturating_sub(JOB_OVERHEAD_DESCRIPTORS)
        .min(MAX_OPEN_PER_JOB);
    if per_job < MIN_OPEN_PER_JOB {
        return Err(DescriptorBudgetError { limit, slots });
    }
    Ok(per_job)
}

/// Raises the process's soft descriptor limit to its hard limit and returns
/// it.
pub fn raise_descriptor_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable `rlimit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    if lim.rlim_cur < lim.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: lim.rlim_max,
            rlim_max: lim.rlim_max,
        };
        // SAFETY: `raised` is a valid `rlimit`; raising the soft limit up to
        // the hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            lim.rlim_cur = lim.rlim_max;
        }
    }
    lim.rlim_cur
}

/// Raises the process's soft descriptor limit to its hard limit, then
/// gives each of `slots` jobs its share ([`descriptor_budget`]).
///
/// # Errors
/// When the limit cannot give every slot its minimum.
pub fn max_open_per_job(slots: u32) -> Result<u64, DescriptorBudgetError> {
    descriptor_budget(raise_descriptor_limit(), slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_at_their_bound_leave_the_reserve_to_the_service() {
        for limit in [600, 1024, 4096, 20_000, 1 << 20] {
            for slots in [1, 2, 4, 16, 32, 64, 256] {
                if let Ok(per_job) = descriptor_budget(limit, slots) {
                    let all_jobs = u64::from(slots) * (per_job + JOB_OVERHEAD_DESCRIPTORS);
                    assert!(
                        all_jobs + RESERVED_DESCRIPTORS <= limit,
                        "limit {limit}, {slots} slots: {per_job} each leaves no reserve"
                    );
                    assert!((MIN_OPEN_PER_JOB..=MAX_OPEN_PER_JOB).contains(&per_job));
                }
            }
        }
        assert_eq!(descriptor_budget(20_000, 16), Ok(MAX_OPEN_PER_JOB));
        assert_eq!(descriptor_budget(1024, 16), Ok(24));
    }

    #[test]
    fn a_limit_too_small_for_the_slots_is_refused() {
        let err = descriptor_budget(1024, 64).unwrap_err();
        assert_eq!(
            err,
            DescriptorBudgetError {
                limit: 1024,
                slots: 64
            }
        );
        assert!(err.to_string().contains("64 concurrent jobs"), "{err}");
        assert!(descriptor_budget(RESERVED_DESCRIPTORS, 1).is_err());
    }
}
