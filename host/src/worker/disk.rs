//! A zone's disk: the bytes its workers' directories hold at once, all of
//! them together, never more than the zone's `disk`.
//!
//! A job is given its room before it is sent to a worker: the most its
//! files can take in the worker's directory ([`need`]: its inputs, its
//! output limit, a page for each file it may make). The worker's
//! directory, a tmpfs of its own ([`super::scratch`]), is grown by that
//! much first and shrunk once the job's files are gone, so the kernel
//! holds each worker to what its jobs were given, and the zone's workers
//! together to the zone's `disk`. A job that does not fit waits for room
//! (another job's files released), in turn: a later job takes room only
//! while what is left still holds every earlier waiting job's, so a large
//! job is not passed for ever by smaller ones ([`Turn`]) — except the
//! waiting jobs of a tenant holding more of the zone's disk than the later
//! job's tenant does: a tenant's jobs waiting for room hold back only
//! tenants that hold as much or more, so one tenant's large jobs do not
//! hold back everyone else's small ones while it holds room itself, and
//! once it holds none, its waiting job holds back every later one. A
//! module whose limits could never fit is refused at its load ([`most`]).
//!
//! A worker's directory keeps what its released jobs' rooms grew it by, as
//! its spare, for as long as it is given room again within [`SPARE_IDLE`]
//! and no job of the zone was refused room: the next job whose room fits in
//! it is given that room without a reconfigure of the tmpfs (a grow and a
//! shrink cost the gateway about as much as the rest of a trivial job's
//! handling). The spare stays counted in the zone's disk, so the zone's
//! directories together still never exceed it; a job refused room has
//! every spare in the zone given back before it waits ([`WorkerDisk::reclaim`]);
//! and a job is given room in a spare only while the directory's files
//! take no more than its jobs' rooms ([`WorkerDisk::overfilled`]).
//!
//! So one tenant's jobs, each within its own quota, cannot take the room
//! another tenant's job was given, nor cut a job short of the quota its
//! policy promises; and a worker whose native code writes past its jobs'
//! room finds the end of its own file system, which is as large as its
//! jobs' rooms together and its spare, and no larger, and is stopped once
//! its files take more than its rooms ([`WorkerDisk::settle`]).
//!
//! Where the gateway cannot mount a tmpfs (not root), the rooms are kept
//! all the same, and honest jobs are held to them by their quotas alone.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::scratch::Scratch;
use super::turns::Turns;
use crate::policy::Policy;
use crate::sandbox::{JobSpec, MAX_INPUTS};

/// The page a tmpfs stores a file's bytes in: a file of one byte takes a
/// page, and so does a long symbolic link.
pub const PAGE: u64 = 4096;

/// A worker's directory's size before any job is given room in it.
pub const FLOOR: u64 = 64 * PAGE;

/// The room of a load's hand-over, beside the rooms of jobs (whose keys are
/// the pool's ids, far below it): `LOAD_ROOM | module`.
pub const LOAD_ROOM: u64 = 1 << 63;

/// The most a compiled module handed over may take (the zone's cache takes
/// no larger one).
const HAND_OVER_MAX: u64 = 1 << 30;

/// Room for a worker to hand over what it compiles from `wasm_len` bytes:
/// eight times as much (compiled code runs to about three), at least
/// 16 MiB, at most [`HAND_OVER_MAX`]. An artifact larger still is not
/// handed over (its write fails), and the module is compiled by each
/// worker that loads it.
pub fn hand_over_room(wasm_len: u64) -> u64 {
    pages(wasm_len.saturating_mul(8).clamp(16 << 20, HAND_OVER_MAX))
}

fn pages(bytes: u64) -> u64 {
    bytes.div_ceil(PAGE).saturating_mul(PAGE)
}

/// The most one job of `policy` with `inputs` (their sizes, stdin among
/// them) can take in its worker's directory: each input in whole pages (a
/// page at least), a page for its inputs' directory, its output limit,
/// and a page for each entry it may make in `/out` (a file's last page, a
/// long link), and one more. So a room holds a page for every entry the
/// job can make, which is what each inode of a worker's directory is
/// counted as ([`super::scratch::inodes`]).
pub fn need_for(policy: &Policy, inputs: impl IntoIterator<Item = u64>) -> u64 {
    let limits = &policy.limits;
    inputs
        .into_iter()
        .map(|len| pages(len).max(PAGE))
        .fold(PAGE, u64::saturating_add)
        .saturating_add(pages(limits.output.as_u64()))
        .saturating_add((u64::from(limits.output_files) + 1).saturating_mul(PAGE))
}

/// [`need_for`] a job.
pub fn need(policy: &Policy, spec: &JobSpec) -> u64 {
    need_for(
        policy,
        spec.inputs
            .iter()
            .map(|i| i.data.len() as u64)
            .chain([spec.stdin.len() as u64]),
    )
}

/// The most any job of `policy` can need: its whole input limit, and two
/// pages more for each input it may be given (its last page, and a page
/// at least).
pub fn most(policy: &Policy) -> u64 {
    need_for(policy, [policy.limits.input.as_u64()])
        .saturating_add((2 * (MAX_INPUTS as u64 + 1)).saturating_mul(PAGE))
}

/// How long a released room's files may take to go: past it, a worker's
/// directory that still holds them keeps what no job was given.
pub const RELEASE_GRACE: Duration = Duration::from_secs(10);

/// How long a worker's directory keeps its spare (room beyond its jobs')
/// after room was last given in it: a worker busy with jobs keeps it, an
/// idle one gives it back to the zone.
pub const SPARE_IDLE: Duration = Duration::from_secs(1);

/// One zone's disk: what it may hold, and what its workers' directories
/// have been given of it.
#[derive(Debug)]
pub struct ZoneDisk {
    /// The zone's `disk`.
    pub size: u64,
    /// The most one worker's directory is given, above [`FLOOR`]: no more
    /// than its memory ceiling leaves its jobs, where it has one (a
    /// tmpfs's pages are charged to the memory of the process that writes
    /// them, and its jobs' rooms are counted in their memory:
    /// [`super::memory`]; found by an attacker: two jobs each writing
    /// 280 MiB, within their rooms, pushed a worker past its 512 MiB
    /// ceiling, and it was killed with a co-tenant's job).
    pub per_worker: u64,
    given: Mutex<u64>,
    /// The rooms jobs wait for, by their turn, and the rooms each
    /// tenant's jobs hold, until released.
    turns: Turns,
    /// Turns refused room at least once and still waiting: while there is
    /// one, no worker keeps a spare.
    refused: AtomicU64,
    /// Room came free, or a waiting job gave up its turn.
    pub freed: Notify,
}

/// A job's place among those waiting for room in its zone: held until it
/// is given room (or gives up), it keeps later jobs from taking what it
/// needs.
#[derive(Debug)]
pub struct Turn<'a> {
    zone: &'a ZoneDisk,
    turn: u64,
    tenant: Arc<str>,
    /// Refused room at least once (counted in the zone's `refused`).
    refused: std::sync::atomic::AtomicBool,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.zone.turns.leave(self.turn);
        if *self.refused.get_mut() {
            self.zone.refused.fetch_sub(1, Ordering::AcqRel);
        }
        self.zone.freed.notify_waiters();
    }
}

impl ZoneDisk {
    pub fn new(size: u64) -> Self {
        Self {
            size,
            per_worker: size,
            given: Mutex::new(0),
            turns: Turns::default(),
            refused: AtomicU64::new(0),
            freed: Notify::new(),
        }
    }

    /// Bytes given to workers' directories now.
    pub fn given(&self) -> u64 {
        *lock(&self.given)
    }

    /// A turn for a job of `tenant` that needs `need` bytes, after every
    /// job already waiting.
    pub fn turn(&self, need: u64, tenant: &str) -> Turn<'_> {
        let (turn, tenant) = self.turns.enter(need, tenant);
        Turn {
            zone: self,
            turn,
            tenant,
            refused: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether a job waits that was refused room: then every spare is to
    /// be given back.
    pub fn wanted(&self) -> bool {
        self.refused.load(Ordering::Acquire) > 0
    }

    /// Takes `bytes` for the job of `turn` (none: not a job's, a load's)
    /// if they fit with the rooms of the jobs waiting before it that hold
    /// it back: its own tenant's, and those of tenants holding no more of
    /// the zone's disk than its tenant does.
    fn take(&self, bytes: u64, turn: Option<&Turn<'_>>) -> bool {
        let mut given = lock(&self.given);
        let ahead = turn.map_or(0, |t| {
            self.turns.ahead(t.turn, &t.tenant, u64::saturating_add)
        });
        if given.saturating_add(bytes).saturating_add(ahead) > self.size {
            if let Some(t) = turn
                && !t.refused.swap(true, Ordering::AcqRel)
            {
                self.refused.fetch_add(1, Ordering::AcqRel);
            }
            return false;
        }
        *given += bytes;
        true
    }

    /// `tenant`'s jobs hold `bytes` more (`more`) or fewer.
    fn hold(&self, tenant: &Arc<str>, bytes: u64, more: bool) {
        self.turns.hold(tenant, bytes, more);
        if !more {
            // Waiting jobs it held back may go now.
            self.freed.notify_waiters();
        }
    }

    fn give_back(&self, bytes: u64) {
        if bytes > 0 {
            let mut given = lock(&self.given);
            *given = given.saturating_sub(bytes);
            drop(given);
            self.freed.notify_waiters();
        }
    }
}

/// A worker's directory's part of its zone's disk.
#[derive(Debug)]
pub struct WorkerDisk {
    zone: Arc<ZoneDisk>,
    /// Its tmpfs, resized to what it holds; none where it is a plain
    /// directory.
    scratch: Option<Scratch>,
    /// The directory its jobs' directories are in, looked in for those of
    /// a released job ([`job_files_gone`]); none: never looked in.
    dir: Option<std::os::fd::OwnedFd>,
    held: Mutex<Held>,
}

#[derive(Debug, Default)]
struct Held {
    /// Bytes of the zone's disk it holds, above [`FLOOR`]: its tmpfs's
    /// size, less the floor. Beyond [`Held::kept`], its spare.
    bytes: u64,
    /// When room was last given in it (its spare is kept [`SPARE_IDLE`]
    /// from then).
    last_given: Option<Instant>,
    /// Each job's room, and its tenant (none: a load's), until the job's
    /// files are released.
    rooms: HashMap<u64, (u64, Option<Arc<str>>)>,
    /// Each released job's room, kept until its directories are gone from
    /// the worker's directory: when it was released, and how large.
    leaving: HashMap<u64, (Instant, u64)>,
    /// Rooms released within [`RELEASE_GRACE`] whose job's directories
    /// are gone: when, and how large.
    released: Vec<(Instant, u64)>,
    /// Released jobs of `leaving` whose release (the frame that told the
    /// worker) had not left the gateway when they were released: where it
    /// ends in what is written to the worker. Their clock starts once it
    /// has left ([`WorkerDisk::settle`]).
    unsent: HashMap<u64, u64>,
}

impl Held {
    /// What the directory is to hold for jobs: their rooms, and those of
    /// released jobs whose directories are still there.
    fn kept(&self) -> u64 {
        self.rooms
            .values()
            .map(|(room, _)| room)
            .chain(self.leaving.values().map(|(_, room)| room))
            .fold(0, |a, b| a.saturating_add(*b))
    }
}

/// A worker keeps what no job was given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overheld {
    /// Its files take this many bytes beyond its jobs' rooms, those of
    /// released jobs whose directories are still there, and those released
    /// within [`RELEASE_GRACE`] together.
    Files(u64),
    /// Its entries take this many inodes beyond those rooms' (a page's
    /// worth of room each).
    Entries(u64),
    /// A job's directories are still there [`RELEASE_GRACE`] after its
    /// files were released: its room would never be given back.
    Directory(u64),
}

impl std::fmt::Display for Overheld {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let grace = RELEASE_GRACE.as_secs();
        match self {
            Self::Files(bytes) => write!(
                f,
                "kept {bytes} bytes in its directory beyond its jobs' rooms and what it was told to release in the last {grace}s"
            ),
            Self::Entries(inodes) => write!(
                f,
                "kept {inodes} entries in its directory beyond its jobs' rooms and what it was told to release in the last {grace}s"
            ),
            Self::Directory(job) => write!(
                f,
                "kept job {job}'s directory more than {grace}s after it was told to release it"
            ),
        }
    }
}

/// Whether the directories of job `key` (`j<key>.out`, `j<key>.in`) are
/// gone from `dir`: a load's room ([`LOAD_ROOM`]) has none, its hand-over
/// is removed by the gateway before it is released. Only an entry found
/// there counts as not gone.
fn job_files_gone(dir: Option<&std::os::fd::OwnedFd>, key: u64) -> bool {
    let Some(dir) = dir.filter(|_| key & LOAD_ROOM == 0) else {
        return true;
    };
    ["out", "in"].iter().all(|ext| {
        rustix::fs::statat(
            dir,
            format!("j{key}.{ext}").as_str(),
            rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
        )
        .is_err()
    })
}

impl WorkerDisk {
    /// `scratch` at [`FLOOR`] bytes, or none; `dir`, where its jobs'
    /// directories are.
    pub fn new(
        zone: Arc<ZoneDisk>,
        scratch: Option<Scratch>,
        dir: Option<std::os::fd::OwnedFd>,
    ) -> Self {
        Self {
            zone,
            scratch,
            dir,
            held: Mutex::default(),
        }
    }

    /// What its files may take now: its jobs' rooms, and those of
    /// released jobs whose directories are still there (its spare aside,
    /// which no file fills while it is given room:
    /// [`WorkerDisk::overfilled`]).
    pub fn kept(&self) -> u64 {
        lock(&self.held).kept()
    }

    /// The directory's descriptor, where it is a tmpfs of its own.
    pub fn scratch(&self) -> Option<&Scratch> {
        self.scratch.as_ref()
    }

    /// Gives job `job` `need` bytes of room, growing the directory by what
    /// its held bytes (its spare among them) lack, when the zone has that
    /// much left after the rooms of the jobs waiting before `turn`'s. The
    /// caller has checked that its files take no more than its rooms
    /// ([`WorkerDisk::overfilled`]): a spare they fill is no room.
    ///
    /// # Errors
    /// The tmpfs could not be grown (nothing taken).
    pub fn reserve(&self, job: u64, need: u64, turn: Option<&Turn<'_>>) -> io::Result<bool> {
        let mut held = lock(&self.held);
        if held.rooms.contains_key(&job) {
            return Ok(true);
        }
        let wanted = held.kept().saturating_add(need);
        if wanted > self.zone.per_worker {
            // Not in this worker while its other rooms are given.
            return Ok(false);
        }
        let growth = wanted.saturating_sub(held.bytes);
        if !self.zone.take(growth, turn) {
            return Ok(false);
        }
        if growth > 0 {
            if let Err(e) = self.resize(held.bytes + growth) {
                self.zone.give_back(growth);
                return Err(e);
            }
            held.bytes += growth;
        }
        let tenant = turn.map(|t| Arc::clone(&t.tenant));
        if let Some(tenant) = &tenant {
            self.zone.hold(tenant, need, true);
        }
        held.rooms.insert(job, (need, tenant));
        held.last_given = Some(Instant::now());
        Ok(true)
    }

    /// Job `job`'s files are released: its room is given back once its
    /// directories are gone from the worker's directory and the directory
    /// can shrink by it ([`WorkerDisk::settle`], [`WorkerDisk::removed`]).
    /// Until then the room stays the directory's: files of the released
    /// job the worker has not removed yet are never taken into another
    /// job's room.
    ///
    /// `told_by`: where the frame that tells the worker ends in what is
    /// written to it, if it has not left the gateway yet; the worker's
    /// [`RELEASE_GRACE`] runs from when it has (found by a tester: a
    /// release queued behind hundreds of megabytes of other jobs' `Run`s
    /// had its grace run out before the worker could read it, and the
    /// worker, honest but reading at 20 MB/s, was faulted with a
    /// co-tenant's job).
    pub fn release(&self, job: u64, told_by: Option<u64>) {
        let mut held = lock(&self.held);
        if let Some((room, tenant)) = held.rooms.remove(&job) {
            if let Some(tenant) = &tenant {
                self.zone.hold(tenant, room, false);
            }
            held.leaving.insert(job, (Instant::now(), room));
            if let Some(end) = told_by {
                held.unsent.insert(job, end);
            }
            self.shrink(&mut held, false);
        }
    }

    /// The worker says it removed a released job's directories: the rooms
    /// of those now gone become its spare, or are given back.
    pub fn removed(&self) {
        self.shrink(&mut lock(&self.held), false);
    }

    /// Gives its spare back to the zone, as far as its files allow (a job
    /// was refused room); how many bytes it gave back.
    pub fn reclaim(&self) -> u64 {
        let mut held = lock(&self.held);
        let before = held.bytes;
        self.shrink(&mut held, true);
        before - held.bytes
    }

    /// Whether its files take more than its jobs' rooms and those of
    /// released jobs whose directories are still there: files beyond them,
    /// not removed yet (or never), which would take a new job's room. A
    /// directory holding no more than those rooms has none; one with a
    /// spare is looked at.
    pub fn overfilled(&self) -> bool {
        let held = lock(&self.held);
        let kept = held.kept();
        if held.bytes <= kept {
            return false;
        }
        match &self.scratch {
            Some(scratch) => used(scratch).is_none_or(|used| used.beyond(kept).is_some()),
            None => true,
        }
    }

    /// Shrinks the directory to what it is to hold where its files allow.
    /// Where they do not, or a released job's directories are still there
    /// [`RELEASE_GRACE`] after its release: what it keeps that no job was
    /// given. An honest worker removes a released job's directories at
    /// once.
    ///
    /// `written`: the bytes written to the worker so far; a release whose
    /// frame they take in has its grace start now.
    pub fn settle(&self, written: u64) -> Option<Overheld> {
        let mut held = lock(&self.held);
        let held = &mut *held;
        self.shrink(held, false);
        held.unsent.retain(|job, end| {
            if *end > written {
                return true;
            }
            if let Some((at, _)) = held.leaving.get_mut(job) {
                *at = Instant::now();
            }
            false
        });
        held.released
            .retain(|(at, _)| at.elapsed() <= RELEASE_GRACE);
        if let Some(job) = held
            .leaving
            .iter()
            .filter(|(job, (at, _))| at.elapsed() > RELEASE_GRACE && !held.unsent.contains_key(job))
            .map(|(job, _)| *job)
            .min()
        {
            return Some(Overheld::Directory(job));
        }
        let kept = held.kept();
        if held.bytes <= kept {
            return None;
        }
        let used = used(self.scratch.as_ref()?)?;
        let excused = held
            .released
            .iter()
            .map(|(_, room)| *room)
            .fold(kept, u64::saturating_add);
        used.beyond(excused)
    }

    /// Makes its released rooms, and the room it last gave, `by` older
    /// (tests: the grace run out, the spare idle).
    #[cfg(test)]
    fn age(&self, by: Duration) {
        let held = &mut *lock(&self.held);
        for (at, _) in held.released.iter_mut().chain(held.leaving.values_mut()) {
            *at = at.checked_sub(by).unwrap();
        }
        if let Some(at) = &mut held.last_given {
            *at = at.checked_sub(by).unwrap();
        }
    }

    /// Gives back the rooms of released jobs whose directories are gone:
    /// shrinks the directory to its jobs' rooms where its files allow —
    /// unless it keeps them as its spare (not `all`; a tmpfs given room
    /// within [`SPARE_IDLE`], and no job of the zone refused room).
    fn shrink(&self, held: &mut Held, all: bool) {
        let gone: Vec<u64> = held
            .leaving
            .keys()
            .copied()
            .filter(|job| job_files_gone(self.dir.as_ref(), *job))
            .collect();
        for job in gone {
            held.unsent.remove(&job);
            if let Some(left) = held.leaving.remove(&job) {
                held.released.push(left);
            }
        }
        let kept = held.kept();
        if held.bytes <= kept {
            return;
        }
        let spare = !all
            && self.scratch.is_some()
            && !self.zone.wanted()
            && held.last_given.is_some_and(|at| at.elapsed() < SPARE_IDLE);
        if spare {
            return;
        }
        // The kernel refuses a size below what the files take: those the
        // worker keeps beyond its rooms (for a while, excused).
        if self.resize(kept).is_ok() {
            self.zone.give_back(held.bytes - kept);
            held.bytes = kept;
        }
    }

    fn resize(&self, bytes: u64) -> io::Result<()> {
        match &self.scratch {
            Some(scratch) => scratch.resize(FLOOR + bytes),
            None => Ok(()),
        }
    }
}

impl Drop for WorkerDisk {
    /// Its tmpfs goes with its last descriptor, these among them: what it
    /// held is the zone's again.
    fn drop(&mut self) {
        let held = std::mem::take(&mut *lock(&self.held));
        for (room, tenant) in held.rooms.into_values() {
            if let Some(tenant) = &tenant {
                self.zone.hold(tenant, room, false);
            }
        }
        self.scratch = None;
        self.zone.give_back(held.bytes);
    }
}

/// What the files in a worker's directory take.
#[derive(Debug, Clone, Copy)]
struct Used {
    bytes: u64,
    inodes: u64,
}

impl Used {
    /// What they take beyond `rooms` bytes of rooms (and the directory's
    /// floor): bytes, or else inodes (a page of room each).
    fn beyond(self, rooms: u64) -> Option<Overheld> {
        let bytes = FLOOR.saturating_add(rooms);
        let inodes = super::scratch::inodes(bytes);
        if self.bytes > bytes {
            Some(Overheld::Files(self.bytes - bytes))
        } else if self.inodes > inodes {
            Some(Overheld::Entries(self.inodes - inodes))
        } else {
            None
        }
    }
}

/// What its files take in a worker's directory.
fn used(scratch: &Scratch) -> Option<Used> {
    let st = rustix::fs::fstatfs(&scratch.dir).ok()?;
    Some(Used {
        bytes: (st.f_blocks.saturating_sub(st.f_bfree)).saturating_mul(st.f_bsize as u64),
        inodes: st.f_files.saturating_sub(st.f_ffree),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker's directory at [`FLOOR`], or `None` (said) where this
    /// process may not mount one.
    fn scratch_or_skip() -> Option<Scratch> {
        match super::super::scratch::make(FLOOR, None) {
            Ok(s) => Some(s),
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                eprintln!("skipped: mounting a tmpfs needs CAP_SYS_ADMIN ({e})");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    /// Rooms come out of the zone's disk, across workers, until it is
    /// given out; a release gives its room back, and a room too large
    /// for what is left is refused without taking anything.
    #[test]
    fn rooms_are_given_out_of_the_zones_disk_and_back() {
        let zone = Arc::new(ZoneDisk::new(10 * PAGE));
        let (a, b) = (
            WorkerDisk::new(Arc::clone(&zone), None, None),
            WorkerDisk::new(Arc::clone(&zone), None, None),
        );
        assert!(a.reserve(1, 4 * PAGE, None).unwrap());
        assert!(b.reserve(2, 4 * PAGE, None).unwrap());
        assert_eq!(zone.given(), 8 * PAGE);
        assert!(!a.reserve(3, 3 * PAGE, None).unwrap());
        assert_eq!(zone.given(), 8 * PAGE);
        // Given once per key.
        assert!(a.reserve(1, 4 * PAGE, None).unwrap());
        assert_eq!(zone.given(), 8 * PAGE);
        b.release(2, None);
        assert_eq!(zone.given(), 4 * PAGE);
        assert!(a.reserve(3, 3 * PAGE, None).unwrap());
        assert_eq!(zone.given(), 7 * PAGE);
        // Released twice, given back once.
        a.release(1, None);
        a.release(1, None);
        assert_eq!(zone.given(), 3 * PAGE);
        drop(a);
        assert_eq!(zone.given(), 0);
    }

    /// A job's room: its inputs in whole pages, its output limit, a page
    /// per output entry and one more; the most a policy's job can need
    /// adds its whole input limit and a page per input it may be given.
    #[test]
    fn a_jobs_room_counts_whole_pages() {
        let mut policy: Policy = toml::from_str(&format!(
            "version = 1\n[module]\nname = \"m\"\nsha256 = \"{}\"\n[access]\nscopes = [\"m:run\"]\n[limits]\noutput = \"1 MiB\"\noutput_files = 3\ninput = \"10 KiB\"\n",
            "0".repeat(64)
        ))
        .unwrap();
        // A page at least per input, and one for their directory.
        assert_eq!(
            need_for(&policy, [1, 0, PAGE + 1]),
            (1 + 1 + 2 + 1) * PAGE + (1 << 20) + 4 * PAGE
        );
        assert_eq!(
            most(&policy),
            (3 + 1) * PAGE + (1 << 20) + 4 * PAGE + 2 * (MAX_INPUTS as u64 + 1) * PAGE
        );
        policy.limits.output_files = u32::MAX;
        assert!(most(&policy) > 1 << 40);
    }

    /// With a tmpfs: it grows by each room and shrinks back only once the
    /// files in it allow; until then the room stays taken from the zone.
    /// Files beyond its jobs' rooms are excused for as long as a room
    /// released within the grace covers them, and no longer: a later
    /// job's release does not excuse an earlier one's files.
    #[test]
    fn a_worker_directory_shrinks_back_only_once_its_files_are_gone() {
        let Some(scratch) = scratch_or_skip() else {
            return;
        };
        let size = |d: &WorkerDisk| {
            let st = rustix::fs::fstatfs(&d.scratch().unwrap().dir).unwrap();
            st.f_blocks * st.f_bsize as u64
        };
        let zone = Arc::new(ZoneDisk::new(1 << 20));
        let dir = scratch.dir.try_clone().unwrap();
        let disk = WorkerDisk::new(Arc::clone(&zone), Some(scratch), Some(dir));
        assert_eq!(size(&disk), FLOOR);
        assert!(disk.reserve(1, 512 << 10, None).unwrap());
        assert!(disk.reserve(2, 64 << 10, None).unwrap());
        assert_eq!(size(&disk), FLOOR + (576 << 10));
        let file = crate::sandbox::beneath::fd_path(&disk.scratch().unwrap().dir).join("out");
        std::fs::write(&file, vec![1u8; 400 << 10]).unwrap();
        disk.release(1, None);
        assert!(disk.overfilled());
        assert!(
            disk.settle(0).is_none(),
            "job 1's files are excused a while"
        );
        assert_eq!(zone.given(), 576 << 10);
        assert_eq!(size(&disk), FLOOR + (576 << 10));
        disk.age(RELEASE_GRACE - Duration::from_secs(2));
        disk.release(2, None);
        assert!(disk.settle(0).is_none());
        disk.age(Duration::from_secs(3));
        let kept = disk.settle(0).expect("job 1's grace ran out");
        // Job 2's room, released within the grace, still excuses its share.
        assert_eq!(kept, Overheld::Files((400 << 10) - FLOOR - (64 << 10)));
        // Not even a job refused room shrinks it below its files.
        assert_eq!(disk.reclaim(), 0);
        assert_eq!(size(&disk), FLOOR + (576 << 10));
        std::fs::remove_file(&file).unwrap();
        assert!(disk.settle(0).is_none());
        assert!(!disk.overfilled());
        disk.reclaim();
        assert_eq!(zone.given(), 0);
        assert_eq!(size(&disk), FLOOR);
    }

    /// Every entry a job's room allows fits beside those of the other jobs
    /// given room in the directory: two jobs each making the 33,000 empty
    /// files their policy allows (which no byte bound stops) both make
    /// them all (found by an attacker: a fixed 65,536 inodes ran out, and
    /// every later job sent to the worker failed).
    #[test]
    fn every_entry_its_room_allows_fits_beside_the_other_jobs() {
        const FILES: u32 = 33_000;
        let Some(scratch) = scratch_or_skip() else {
            return;
        };
        let root = crate::sandbox::beneath::fd_path(&scratch.dir);
        let policy: Policy = toml::from_str(&format!(
            "version = 1\n[module]\nname = \"m\"\nsha256 = \"{}\"\n[access]\nscopes = [\"m:run\"]\n[limits]\noutput = \"64 KiB\"\noutput_files = {FILES}\n",
            "0".repeat(64)
        ))
        .unwrap();
        let zone = Arc::new(ZoneDisk::new(1 << 30));
        let dir = scratch.dir.try_clone().unwrap();
        let disk = WorkerDisk::new(Arc::clone(&zone), Some(scratch), Some(dir));
        // No inputs; an empty stdin.
        let need = need_for(&policy, [0]);
        for job in 1..=2 {
            assert!(disk.reserve(job, need, None).unwrap());
            let out = root.join(format!("j{job}.out"));
            std::fs::create_dir(&out).unwrap();
            for n in 0..FILES {
                if let Err(e) = std::fs::File::create_new(out.join(n.to_string())) {
                    panic!("job {job}'s entry {n}: {e}");
                }
            }
        }
        assert!(!disk.overfilled());
        assert_eq!(disk.settle(0), None);
    }

    /// A worker's directory is given no more than the zone's bound per
    /// worker (half its memory ceiling): a room that would take it past
    /// that goes to another worker, or waits, whatever the zone has left.
    #[test]
    fn a_workers_rooms_stay_within_its_share() {
        let mut zone = ZoneDisk::new(64 * PAGE);
        zone.per_worker = 10 * PAGE;
        let zone = Arc::new(zone);
        let (a, b) = (
            WorkerDisk::new(Arc::clone(&zone), None, None),
            WorkerDisk::new(Arc::clone(&zone), None, None),
        );
        assert!(!a.reserve(1, 11 * PAGE, None).unwrap());
        assert!(a.reserve(1, 6 * PAGE, None).unwrap());
        assert!(!a.reserve(2, 6 * PAGE, None).unwrap());
        assert!(b.reserve(2, 6 * PAGE, None).unwrap());
        a.release(1, None);
        assert!(a.reserve(3, 6 * PAGE, None).unwrap());
        assert_eq!(zone.given(), 12 * PAGE);
    }

    /// A job waiting for room keeps later jobs from taking what it needs:
    /// they take room only while what is left still holds its; once it
    /// gives up its turn, they may.
    #[test]
    fn a_later_job_does_not_take_the_room_an_earlier_one_waits_for() {
        let zone = Arc::new(ZoneDisk::new(10 * PAGE));
        let worker = WorkerDisk::new(Arc::clone(&zone), None, None);
        assert!(worker.reserve(1, 6 * PAGE, None).unwrap());
        let large = zone.turn(8 * PAGE, "a");
        assert!(!worker.reserve(2, 8 * PAGE, Some(&large)).unwrap());
        let small = zone.turn(3 * PAGE, "a");
        assert!(!worker.reserve(3, 3 * PAGE, Some(&small)).unwrap());
        worker.release(1, None);
        // It would fit, but leave the earlier job too little.
        assert!(!worker.reserve(3, 3 * PAGE, Some(&small)).unwrap());
        assert!(worker.reserve(2, 8 * PAGE, Some(&large)).unwrap());
        drop(large);
        assert!(!worker.reserve(3, 3 * PAGE, Some(&small)).unwrap());
        worker.release(2, None);
        assert!(worker.reserve(3, 3 * PAGE, Some(&small)).unwrap());
        assert_eq!(zone.given(), 3 * PAGE);
    }

    /// A released job's room stays the directory's for as long as the
    /// job's directories are there, even where its files would fit in the
    /// other jobs' rooms: they are never taken into a room another job
    /// was given. Once they are gone it is given back; kept past the
    /// grace, the worker is told of it.
    #[test]
    fn a_released_room_is_kept_until_its_jobs_directories_are_gone() {
        let Some(scratch) = scratch_or_skip() else {
            return;
        };
        let root = crate::sandbox::beneath::fd_path(&scratch.dir);
        let free = |d: &WorkerDisk| {
            let st = rustix::fs::fstatfs(&d.scratch().unwrap().dir).unwrap();
            st.f_bavail * st.f_bsize as u64
        };
        let zone = Arc::new(ZoneDisk::new(4 << 20));
        let dir = scratch.dir.try_clone().unwrap();
        let disk = WorkerDisk::new(Arc::clone(&zone), Some(scratch), Some(dir));
        assert!(disk.reserve(1, 1 << 20, None).unwrap());
        assert!(disk.reserve(2, 1 << 20, None).unwrap());
        std::fs::create_dir(root.join("j1.out")).unwrap();
        std::fs::write(root.join("j1.out/left"), vec![1u8; 512 << 10]).unwrap();
        disk.release(1, None);
        // Job 1's files would fit in job 2's room; job 2 keeps all of it.
        assert!(free(&disk) >= 1 << 20, "{} bytes free", free(&disk));
        assert_eq!(zone.given(), 2 << 20);
        assert!(!disk.overfilled());
        assert_eq!(disk.settle(0), None);
        // A later job's room is its own too.
        assert!(disk.reserve(3, 1 << 20, None).unwrap());
        assert_eq!(zone.given(), 3 << 20);
        assert!(free(&disk) >= 2 << 20, "{} bytes free", free(&disk));
        std::fs::remove_dir_all(root.join("j1.out")).unwrap();
        disk.removed();
        disk.reclaim();
        assert_eq!(zone.given(), 2 << 20);
        // Kept past the grace.
        std::fs::create_dir(root.join("j2.in")).unwrap();
        disk.release(2, None);
        assert_eq!(zone.given(), 2 << 20);
        disk.age(RELEASE_GRACE + Duration::from_secs(1));
        assert_eq!(disk.settle(0), Some(Overheld::Directory(2)));
        std::fs::remove_dir(root.join("j2.in")).unwrap();
        assert_eq!(disk.settle(0), None);
        disk.reclaim();
        assert_eq!(zone.given(), 1 << 20);
    }

    /// A release told by a frame still queued for the worker has its
    /// grace start once the frame has left the gateway: a worker cannot
    /// remove what it has not been told to (found by a tester: a release
    /// behind hundreds of megabytes of `Run`s faulted an honest worker).
    #[test]
    fn a_releases_grace_runs_from_when_the_worker_could_read_it() {
        let Some(scratch) = scratch_or_skip() else {
            return;
        };
        let root = crate::sandbox::beneath::fd_path(&scratch.dir);
        let zone = Arc::new(ZoneDisk::new(4 << 20));
        let dir = scratch.dir.try_clone().unwrap();
        let disk = WorkerDisk::new(Arc::clone(&zone), Some(scratch), Some(dir));
        assert!(disk.reserve(1, 1 << 20, None).unwrap());
        std::fs::create_dir(root.join("j1.out")).unwrap();
        // Told by a frame ending at byte 1,000 of what is written.
        disk.release(1, Some(1_000));
        disk.age(RELEASE_GRACE + Duration::from_secs(1));
        assert_eq!(disk.settle(999), None, "judged before it was told");
        // Written now: its grace starts.
        assert_eq!(disk.settle(1_000), None);
        disk.age(RELEASE_GRACE + Duration::from_secs(1));
        assert_eq!(disk.settle(1_000), Some(Overheld::Directory(1)));
        std::fs::remove_dir(root.join("j1.out")).unwrap();
        assert_eq!(disk.settle(1_000), None);
    }

    /// What a released job's room grew the directory by stays, as its
    /// spare, counted in the zone's disk: the next job's room is given in
    /// it without growing the directory. It is given back once a job of
    /// the zone is refused room (at the release too while that job waits),
    /// and once no room was given in it for [`SPARE_IDLE`]. A spare its
    /// files fill is no room: the directory is overfilled.
    #[test]
    fn a_released_room_is_kept_as_a_spare_until_the_zone_wants_it() {
        let Some(scratch) = scratch_or_skip() else {
            return;
        };
        let size = |d: &WorkerDisk| {
            let st = rustix::fs::fstatfs(&d.scratch().unwrap().dir).unwrap();
            st.f_blocks * st.f_bsize as u64
        };
        let root = crate::sandbox::beneath::fd_path(&scratch.dir);
        let zone = Arc::new(ZoneDisk::new(4 << 20));
        let dir = scratch.dir.try_clone().unwrap();
        let a = WorkerDisk::new(Arc::clone(&zone), Some(scratch), Some(dir));
        let b = WorkerDisk::new(Arc::clone(&zone), None, None);
        assert!(a.reserve(1, 1 << 20, None).unwrap());
        a.release(1, None);
        assert_eq!((zone.given(), size(&a)), (1 << 20, FLOOR + (1 << 20)));
        assert!(!a.overfilled());
        assert!(a.reserve(2, 1 << 20, None).unwrap());
        assert_eq!((zone.given(), size(&a)), (1 << 20, FLOOR + (1 << 20)));
        a.release(2, None);
        // Filled by files no job was given room for, it is no room.
        std::fs::write(root.join("junk"), vec![1u8; 512 << 10]).unwrap();
        assert!(a.overfilled());
        std::fs::remove_file(root.join("junk")).unwrap();
        assert!(!a.overfilled());
        // A job refused room: the spare is given back, and the job fits.
        let large = zone.turn(7 << 19, "b");
        assert!(!b.reserve(3, 7 << 19, Some(&large)).unwrap());
        assert!(zone.wanted());
        assert_eq!(a.reclaim(), 1 << 20);
        assert_eq!((zone.given(), size(&a)), (0, FLOOR));
        assert!(b.reserve(3, 7 << 19, Some(&large)).unwrap());
        // While a job refused room waits, a release keeps no spare.
        let small = zone.turn(1 << 20, "c");
        assert!(!b.reserve(4, 1 << 20, Some(&small)).unwrap());
        assert!(a.reserve(5, 1 << 19, None).unwrap());
        a.release(5, None);
        assert_eq!(size(&a), FLOOR);
        drop(small);
        drop(large);
        assert!(!zone.wanted());
        // Kept while rooms are given in it; given back once idle.
        assert!(a.reserve(6, 1 << 19, None).unwrap());
        a.release(6, None);
        assert_eq!(a.settle(0), None);
        assert_eq!(size(&a), FLOOR + (1 << 19));
        a.age(SPARE_IDLE);
        assert_eq!(a.settle(0), None);
        assert_eq!(size(&a), FLOOR);
        assert_eq!(zone.given(), 7 << 19);
    }

    /// A tenant's waiting job holds back only tenants holding as much of
    /// the zone's disk or more: while its tenant holds room, another
    /// tenant's job that fits passes it, but not its own tenant's; once
    /// its tenant holds none, it holds back every later job.
    #[test]
    fn a_tenants_waiting_job_holds_back_only_tenants_holding_as_much() {
        let zone = Arc::new(ZoneDisk::new(10 * PAGE));
        let worker = WorkerDisk::new(Arc::clone(&zone), None, None);
        let a1 = zone.turn(8 * PAGE, "a");
        assert!(worker.reserve(1, 8 * PAGE, Some(&a1)).unwrap());
        drop(a1);
        let a2 = zone.turn(8 * PAGE, "a");
        assert!(!worker.reserve(2, 8 * PAGE, Some(&a2)).unwrap());
        let b1 = zone.turn(PAGE, "b");
        assert!(worker.reserve(3, PAGE, Some(&b1)).unwrap(), "b holds less");
        drop(b1);
        let a3 = zone.turn(PAGE, "a");
        assert!(!worker.reserve(4, PAGE, Some(&a3)).unwrap(), "a's own");
        drop(a3);
        worker.release(1, None);
        let b2 = zone.turn(2 * PAGE, "b");
        assert!(
            !worker.reserve(5, 2 * PAGE, Some(&b2)).unwrap(),
            "a holds none"
        );
        assert!(worker.reserve(2, 8 * PAGE, Some(&a2)).unwrap());
        drop(a2);
        // What a tenant holds goes with its worker.
        drop(worker);
        assert_eq!(zone.given(), 0);
        assert!(zone.turns.nothing_held());
    }
}
