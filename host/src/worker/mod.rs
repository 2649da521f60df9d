//! The second wall: guests run in worker processes that hold nothing worth
//! stealing.
//!
//! WebAssembly is the first wall. This module is the one around it, for
//! when the runtime itself is broken: the gateway (listeners, store, keys,
//! relay) starts workers from its own binary, one pool per trust zone; a
//! worker hardens itself ([`harden`]) before it reads any guest byte, then
//! compiles and runs that zone's modules, and its guests' outbound requests
//! cross the channel ([`calls`]) to the gateway's egress, which alone
//! checks, signs and sends them.
//!
//! - [`harden`]: the layers a worker applies to itself, each checked after
//!   it is applied, and what it reports of them.
//! - [`asked`]: what a worker may send up: answers to what it was sent, at
//!   a bounded pace.
//! - [`calls`]: outbound requests over the channel, worker side and gateway
//!   side.
//! - [`heard`]: when a worker last spoke, dated by when what it said came
//!   rather than when the gateway read it.
//! - [`cgroup`]: a worker's memory ceiling and CPU share, where the host offers cgroups.
//! - [`scratch`]: a worker's directory, a tmpfs of its own mounted nowhere.
//! - [`disk`]: the zone's disk, given out as room to each job before it is
//!   sent, which each worker's directory is sized to.
//! - [`memory`]: what a worker's jobs may take of its memory together,
//!   within its zone's ceiling, counted before each job is sent.
//! - [`process`]: starting a worker, and a worker finding its channel.
//! - [`WorkerArgs`]: what a worker is started with.

pub mod asked;
pub mod calls;
pub mod cgroup;
pub mod child;
pub mod disk;
pub mod harden;
pub mod heard;
pub mod link;
pub mod memory;
pub mod pool;
pub mod process;
pub mod proto;
pub mod scratch;
pub mod turns;

use std::collections::BTreeSet;
use std::os::fd::RawFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Host descriptors a worker may hold: its jobs' share plus the runtime's.
pub const WORKER_MAX_OPEN: u64 = 4096;

/// Threads a worker may run (`RLIMIT_NPROC`): the async runtime's, the
/// compiler's and the epoch ticker, with room.
pub const WORKER_MAX_THREADS: u64 = 256;

/// Threads a worker runs its guests on; its share of the CPU weighs as
/// many of the gateway's threads ([`cgroup::CpuShare`]).
pub const GUEST_THREADS: u32 = 2;

/// The descriptor a worker finds its channel to the gateway on.
pub const CHANNEL_FD: RawFd = 3;

/// The descriptor of a worker's own work directory.
pub const WORK_FD: RawFd = CHANNEL_FD + 1;

/// The descriptor of the zone's cache directory.
pub const CACHE_FD: RawFd = CHANNEL_FD + 2;

/// What a worker process is started with (serialized into its command
/// line by the gateway). Everything the worker may touch on the host is
/// named here; nothing else is reachable once it has hardened itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerArgs {
    /// The trust zone it serves.
    pub zone: String,
    /// Where this worker's job directories are created (its own, inside
    /// the zone's work directory), as the worker reaches it:
    /// `/proc/self/fd/<WORK_FD>`.
    pub work_dir: PathBuf,
    /// The zone's precompiled-module cache, which the zone's workers only
    /// read (the gateway writes it): `/proc/self/fd/<CACHE_FD>`.
    pub cache_dir: PathBuf,
    /// `(uid, gid)` to switch to when started as root.
    pub run_as: Option<(u32, u32)>,
    /// Jobs this worker runs at once.
    pub max_concurrent_jobs: u32,
    /// Host descriptors the worker may hold (`RLIMIT_NOFILE`).
    pub max_open: u64,
    /// Threads the worker may run (`RLIMIT_NPROC`).
    pub max_threads: u64,
    /// Its zone has a memory ceiling: what each job's host allocations
    /// freed is given back to the system before its report goes
    /// ([`memory`]).
    pub give_back: bool,
    /// Layers NOT applied. Set only by tests and by the escape suite's
    /// weakened-worker self-check; no config, policy or request reaches it.
    pub weaken: BTreeSet<harden::Layer>,
}

impl WorkerArgs {
    /// The hardening plan for this worker, keeping `channel` open.
    pub fn plan(&self, channel: RawFd) -> harden::Plan {
        harden::Plan {
            channel: Some(channel),
            keep: vec![WORK_FD, CACHE_FD],
            writable: vec![self.work_dir.clone()],
            // The zone's cache is written by the gateway alone (from what
            // a pristine worker hands it); a worker only reads it.
            readable: vec![self.cache_dir.clone()],
            run_as: self.run_as,
            max_open: self.max_open,
            max_threads: self.max_threads,
            weaken: self.weaken.clone(),
            prepare: Some(crate::sandbox::open_page_map),
        }
    }
}
