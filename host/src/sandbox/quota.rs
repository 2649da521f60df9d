//! The `/out` quota: a byte budget and an entry budget enforced inside the
//! `wasi:filesystem/types` host implementation.
//!
//! wasmtime-wasi has no quota knob, so the sandbox links this wrapper in
//! place of wasmtime-wasi's own `wasi:filesystem/types`. Every call is
//! delegated to wasmtime-wasi unchanged, except that each way a guest can make
//! a file bigger or create an entry is charged to the job's [`OutputQuota`]
//! *before* it happens:
//!
//! - `write(buf, offset)` and `set-size(size)`: charged the growth of the
//!   file's apparent size (`max(0, end - current size)`), so a write or
//!   truncate far past the end — a sparse file — pays for its hole;
//! - `write-via-stream` / `append-via-stream`: the returned stream is wrapped
//!   in a [`QuotaStream`] that charges each chunk the same way (this also
//!   covers `write-zeroes` and `splice`, which go through the stream's
//!   `write`);
//! - `open-at` with `create` on a path where nothing is (a `create`
//!   through a dangling symlink is refused, below), `create-directory-at`
//!   and `symlink-at`: one entry each;
//! - `link-at`: refused outright; hard links could alias files across
//!   preopens and nothing a processor does needs them.
//!
//! `open-at` also keeps the record of what the job created. A `create`
//! where nothing at all is at the name is made exclusive, and the new
//! regular file is recorded ([`OutputQuota::created`]); only recorded files
//! are collected as outputs. A `create` through a dangling link is refused
//! with `access` before anything is made: the link's target, made by a
//! plain create, could not be told from a file someone else put there
//! meanwhile. An open for writing of any other existing file
//! (one a `create` found at its name, or one opened by name to write) is
//! refused with `access` before a byte is written or truncated: whatever is
//! at a name in `/out` that the job did not create was put there by someone
//! else, and may be another job's own file, which would carry this job's
//! bytes back to that job's outputs. An existing entry is opened by this
//! module itself, without blocking, and refused unless the descriptor it
//! got is a regular file or a directory (`QuotaFs::open_existing`): what
//! someone else puts at the name — a FIFO, at any moment — never holds
//! the guest's thread in `open`.
//!
//! Charges are never refunded (deleting a file does not return its bytes), so
//! the charged total is an upper bound on what `/out` can hold at any moment:
//! the quota is on bytes *written*, as the policy documents.
//!
//! Every byte written, overwrites included, is also charged to a second
//! meter bounded by [`WRITTEN_PER_OUTPUT`] times the byte budget: growth
//! alone does not bound the disk traffic of rewriting the same bytes in
//! place (with `sync` after each pass), which is real I/O when the work
//! directory is on disk. Exceeding it fires the `written` limit. Writes
//! are not all the disk traffic a guest causes: each `sync`/`sync-data` is
//! charged [`SYNC_COST`] (a page of data and the journal commit it forces,
//! even for one byte) and each metadata change (rename, unlink, directory
//! create or remove, symlink, times) [`METADATA_COST`], so an fsync loop of
//! one-byte writes, or rename and `set-times` churn, is bounded too. The
//! meter never allows less than [`WRITTEN_FLOOR`], so a small output budget
//! still leaves room for a processor's few metadata changes.
//!
//! Every path argument is refused over [`MAX_PATH_BYTES`] (`name-too-long`)
//! before any host work, so a guest cannot make the host resolve huge paths
//! on threads the job's CPU meter does not see.
//!
//! Host descriptors are bounded here too, on the objects that own them.
//! Every host descriptor a guest can obtain is opened by `open-at` (a file
//! or a directory, shared through an `Arc` by the descriptor and any
//! stream read from or written to it);
//! `get-directories` hands out clones of the preopens, which own no new
//! descriptor, and `read-directory` reads a listing eagerly and closes its
//! descriptor before returning. So [`OutputQuota`] keeps a weak reference to
//! each file `open-at` returns and counts those still alive: a descriptor is
//! released when the last holder drops it and the host really closes it,
//! whatever resource held it and in whatever order they were dropped. At
//! the bound an open is refused with `insufficient-memory` (WASI has no
//! `EMFILE`); a guest that keeps asking after [`DESCRIPTOR_REFUSALS`]
//! refusals is stopped with the `descriptors` limit. Only this module knows
//! about these meters; the rest of the sandbox reads [`OutputQuota`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use bytes::Bytes;
use wasmtime::component::{HasData, Resource};
use wasmtime_wasi::OpenMode;
use wasmtime_wasi::filesystem::WasiFilesystemCtxView;
use wasmtime_wasi::p2::bindings::filesystem::types::{
    self, ErrorCode, HostDescriptor, HostDirectoryEntryStream,
};
use wasmtime_wasi::p2::{FsError, FsResult};
use wasmtime_wasi_io::poll::Pollable;
use wasmtime_wasi_io::streams::{DynInputStream, DynOutputStream, OutputStream, StreamError};

use super::limits::{LimitKind, LimitLatch, Refusals, WRITTEN_PER_OUTPUT};
use super::streams::{ThreadRead, ThreadWrite};
use super::wasi::BLOCKS_CURRENT_THREAD;

/// How many levels below `/out` a directory may be: deeper than outputs
/// are collected ([`super::outputs::MAX_DEPTH`]) and no more. A guest's
/// tree costs the host a walk and a removal of each entry after the job,
/// each at the cost of its depth where the worker's Landlock domain checks
/// every path it opens or removes up to its root: a chain of 15,000
/// directories, made with short paths and renames in 0.3 s of a guest's
/// CPU, took its worker more than 10 s to remove (found by an attacker;
/// the gateway judged the honest worker as keeping a released job's
/// files, and its other tenants' jobs failed with it).
pub const MAX_DIR_DEPTH: usize = super::outputs::MAX_DEPTH;

/// Host memory a job's directory listings may hold at once: each is read
/// in full when the guest asks for it and held until the guest drops it,
/// an entry costing its name and [`LISTED_ENTRY`] bytes more.
pub const MAX_LISTED: u64 = 16 << 20;

/// What an entry of a listing costs beyond its name.
pub const LISTED_ENTRY: u64 = 64;

/// Refused opens after which a guest still asking for descriptors is
/// stopped with the `descriptors` limit: a guest that handles the error and
/// closes something goes on, one that loops on it does not.
pub const DESCRIPTOR_REFUSALS: u64 = 64;

/// The `/out` budget of one job, shared by the filesystem wrapper and the
/// streams it hands out.
#[derive(Debug)]
pub struct OutputQuota {
    max_bytes: u64,
    max_entries: u64,
    bytes: AtomicU64,
    entries: AtomicU64,
    /// Every byte written, overwrites included, and the most allowed.
    written: AtomicU64,
    max_written: u64,
    /// The host files the guest opened, as weak references: one still
    /// alive is a host descriptor still open, whoever holds it.
    open: Mutex<Vec<Weak<std::fs::File>>>,
    max_open: u64,
    /// Opens refused at the bound so far.
    refused_opens: AtomicU64,
    /// The regular files the job created (see [`super::outputs::Created`]).
    created: Mutex<super::outputs::Created>,
    /// The directories and symlinks the job created, and its `/out`: the
    /// only ones whose times it may set.
    own_entries: Mutex<super::outputs::Created>,
    /// The job's input files, when the guest's reads are held to them and
    /// to the files it created ([`OutputQuota::restrict_reads`]).
    inputs: Mutex<Option<super::outputs::Created>>,
    /// Service calls in flight: each holds a connection (a host socket)
    /// from its send until the guest drops the response body.
    calls: AtomicU64,
    /// What each live listing costs ([`MAX_LISTED`]), by its resource.
    listings: Mutex<std::collections::HashMap<u32, u64>>,
    /// The job's `/out` (`st_dev`, `st_ino`): where [`MAX_DIR_DEPTH`] is
    /// counted from.
    out: std::sync::OnceLock<(u64, u64)>,
    latch: LimitLatch,
}

impl OutputQuota {
    /// A budget of `max_bytes` bytes and `max_entries` created entries
    /// (and [`WRITTEN_PER_OUTPUT`] times `max_bytes` written in all).
    /// `max_open` bounds the host descriptors the job may hold at once.
    pub fn new(max_bytes: u64, max_entries: u64, max_open: u64, latch: LimitLatch) -> Arc<Self> {
        Arc::new(Self {
            max_bytes,
            max_entries,
            bytes: AtomicU64::new(0),
            entries: AtomicU64::new(0),
            written: AtomicU64::new(0),
            max_written: max_bytes
                .saturating_mul(WRITTEN_PER_OUTPUT)
                .max(WRITTEN_FLOOR),
            open: Mutex::new(Vec::new()),
            max_open,
            refused_opens: AtomicU64::new(0),
            created: Mutex::default(),
            own_entries: Mutex::default(),
            inputs: Mutex::default(),
            calls: AtomicU64::new(0),
            listings: Mutex::default(),
            out: std::sync::OnceLock::new(),
            latch,
        })
    }

    /// Takes `out` as the job's `/out`, the root its directories' depth
    /// is counted from ([`MAX_DIR_DEPTH`]), and one of its own entries.
    pub fn out_is(&self, out: impl std::os::fd::AsFd) {
        if let Ok(st) = rustix::fs::fstat(out.as_fd()) {
            let _ = self.out.set((st.st_dev, st.st_ino));
        }
        self.own_entry(out);
    }

    /// How many levels below `/out` the directory `dir` is, found by
    /// walking up its `..` (what it is, not the names a guest used to reach
    /// it): `None` wherever that is not shown within `levels` (`/out` not
    /// met, a step of the walk failing, a directory elsewhere), which
    /// callers refuse (found by an attacker: a check that let through what
    /// it failed to look at, and took "not met" for "elsewhere", was passed
    /// once with a path whose lookup a storm of renames made fail, and
    /// never looked again below the directory it had let too deep). `0`
    /// where no `/out` was given, which nothing is counted from.
    fn depth_below_out(&self, dir: std::os::fd::BorrowedFd<'_>, levels: usize) -> Option<usize> {
        use rustix::fs::{Mode, OFlags};
        let Some(&out) = self.out.get() else {
            return Some(0);
        };
        let up = OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC;
        let mut here = rustix::fs::openat(dir, ".", up, Mode::empty()).ok()?;
        for depth in 0..=levels {
            let st = rustix::fs::fstat(&here).ok()?;
            if (st.st_dev, st.st_ino) == out {
                return Some(depth);
            }
            here = rustix::fs::openat(&here, "..", up, Mode::empty()).ok()?;
        }
        None
    }

    /// Takes `cost` bytes of [`MAX_LISTED`] for a listing about to be read;
    /// `insufficient-memory` past it (the guest may drop others and ask
    /// again).
    fn charge_listing(&self, cost: u64) -> Result<(), ErrorCode> {
        let mut listings = self.listings.lock().unwrap_or_else(|e| e.into_inner());
        let held: u64 = listings.values().sum();
        if held.saturating_add(cost) > MAX_LISTED {
            return Err(ErrorCode::InsufficientMemory);
        }
        // Held under no resource until it has one.
        *listings.entry(u32::MAX).or_default() += cost;
        Ok(())
    }

    /// The listing charged `cost` is the resource `rep` (`None`: it was not
    /// read after all).
    fn listing_is(&self, cost: u64, rep: Option<u32>) {
        let mut listings = self.listings.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(pending) = listings.get_mut(&u32::MAX) {
            *pending = pending.saturating_sub(cost);
        }
        if let Some(rep) = rep {
            listings.insert(rep, cost);
        }
    }

    /// The listing `rep` is dropped: what it cost is free again.
    fn listing_dropped(&self, rep: u32) {
        self.listings
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&rep);
    }

    fn held(&self) -> std::sync::MutexGuard<'_, Vec<Weak<std::fs::File>>> {
        // The list stays consistent whatever panicked while holding it.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Host descriptors the guest's opens and service calls still hold
    /// (forgetting files whose last holder is gone).
    pub fn open_descriptors(&self) -> u64 {
        let mut held = self.held();
        held.retain(|f| f.strong_count() > 0);
        held.len() as u64 + self.calls.load(Ordering::SeqCst)
    }

    /// Counts a service call's connection against the job's descriptors
    /// until the returned slot is dropped; `None` (the call is refused) at
    /// the bound.
    pub fn hold_call(self: &Arc<Self>) -> Option<CallSlot> {
        // Under the list's lock, so that two admissions cannot both take
        // the last place.
        let held = self.held();
        let files = held.iter().filter(|f| f.strong_count() > 0).count() as u64;
        if files + self.calls.load(Ordering::SeqCst) >= self.max_open {
            return None;
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        drop(held);
        Some(CallSlot(Arc::clone(self)))
    }

    /// Admits one more open if the guest holds fewer than its bound. At
    /// the bound the open gets `insufficient-memory`; after
    /// [`DESCRIPTOR_REFUSALS`] refusals the `descriptors` limit fires and
    /// the job is stopped (a trap).
    fn admit_open(&self) -> FsResult<()> {
        if self.open_descriptors() < self.max_open {
            return Ok(());
        }
        let refused = self.refused_opens.fetch_add(1, Ordering::SeqCst) + 1;
        if refused >= DESCRIPTOR_REFUSALS {
            self.latch.fire(LimitKind::Descriptors);
            return Err(FsError::trap(wasmtime::format_err!(
                "descriptors limit: {refused} opens refused at the bound of {} host descriptors",
                self.max_open
            )));
        }
        Err(ErrorCode::InsufficientMemory.into())
    }

    /// Counts `file` as held until its last holder drops it.
    fn hold(&self, file: &Arc<std::fs::File>) {
        self.held().push(Arc::downgrade(file));
    }

    /// Counts `file`, a regular file just made by an exclusive create (a new
    /// inode: never one someone else put at its name, which fails the
    /// open), among the files the job created.
    fn record_created(&self, file: &std::fs::File) {
        if file.metadata().is_ok_and(|m| m.is_file())
            && let Ok(id) = super::outputs::FileId::of(file)
        {
            self.created
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id);
        }
    }

    /// Whether the guest may write to `file`, an existing file it opened
    /// for writing: only if the job created it. Anything else at a name in
    /// `/out` was put there by someone else — moved or linked in while the
    /// job ran, perhaps a file another job created and will collect as its
    /// own — and writing the job's bytes into it would hand them over.
    /// Refused with `access`, before anything is written or truncated.
    /// Counts the directory or symlink `entry` (the job's `/out`, or one
    /// its guest just made) among the job's own: the only ones whose times
    /// the guest may set.
    pub fn own_entry(&self, entry: impl std::os::fd::AsFd) {
        if let Ok(id) = super::outputs::FileId::of(entry) {
            self.own_entries
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id);
        }
    }

    /// Whether the directory or symlink `entry` is one of the job's own
    /// ([`OutputQuota::own_entry`]); refused with `access` otherwise.
    fn owned(&self, entry: impl std::os::fd::AsFd) -> Result<(), ErrorCode> {
        among(&self.own_entries, entry)
    }

    /// Holds the guest's opens of existing files to `inputs` and the files
    /// it created: whatever else is put in its `/in` or `/out` (moved or
    /// linked in by someone who can write there) it cannot read.
    pub fn restrict_reads(&self, inputs: super::outputs::Created) {
        *self.inputs.lock().unwrap_or_else(|e| e.into_inner()) = Some(inputs);
    }

    /// Whether the guest may read `file`, an existing regular file it
    /// opened: one of its inputs or a file it created, where its reads are
    /// restricted.
    fn readable(&self, file: &std::fs::File) -> Result<(), ErrorCode> {
        let inputs = self.inputs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(inputs) = inputs.as_ref() else {
            return Ok(());
        };
        let id = super::outputs::FileId::of(file).map_err(|_| ErrorCode::Access)?;
        if inputs.contains(&id)
            || self
                .created
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .contains(&id)
        {
            Ok(())
        } else {
            Err(ErrorCode::Access)
        }
    }

    fn writable(&self, file: impl std::os::fd::AsFd) -> Result<(), ErrorCode> {
        among(&self.created, file)
    }

    /// The regular files the job created so far.
    pub fn created(&self) -> super::outputs::Created {
        self.created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Bytes written so far, overwrites included.
    pub fn bytes_written(&self) -> u64 {
        self.written.load(Ordering::SeqCst)
    }

    /// Charges `len` bytes written; on refusal fires the `written` limit.
    fn charge_written(&self, len: u64) -> Result<(), ErrorCode> {
        if len == 0 || Self::charge(&self.written, self.max_written, len) {
            Ok(())
        } else {
            self.latch.fire(LimitKind::Written);
            Err(FULL)
        }
    }

    /// Charges a `sync` or `sync-data` ([`SYNC_COST`]).
    fn charge_sync(&self) -> Result<(), ErrorCode> {
        self.charge_written(SYNC_COST)
    }

    /// Charges a metadata change ([`METADATA_COST`]).
    fn charge_metadata(&self) -> Result<(), ErrorCode> {
        self.charge_written(METADATA_COST)
    }

    /// Charges a write of `len` bytes at `offset` into a file of `size`
    /// bytes: its growth to `output`, all of it to `written`.
    fn charge_write(&self, size: u64, offset: u64, len: u64) -> Result<(), ErrorCode> {
        self.charge_bytes(growth(size, offset, len)?)?;
        self.charge_written(len)
    }

    /// Bytes charged so far.
    pub fn bytes_charged(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }

    /// Entries charged so far.
    pub fn entries_charged(&self) -> u64 {
        self.entries.load(Ordering::SeqCst)
    }

    fn charge(counter: &AtomicU64, max: u64, amount: u64) -> bool {
        counter
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |used| {
                used.checked_add(amount).filter(|total| *total <= max)
            })
            .is_ok()
    }

    /// Charges `growth` bytes; on refusal fires the `output` limit.
    fn charge_bytes(&self, growth: u64) -> Result<(), ErrorCode> {
        if growth == 0 || Self::charge(&self.bytes, self.max_bytes, growth) {
            Ok(())
        } else {
            self.latch.fire(LimitKind::Output);
            Err(FULL)
        }
    }

    /// Charges one created entry; on refusal fires the `output_files` limit.
    fn charge_entry(&self) -> Result<(), ErrorCode> {
        if Self::charge(&self.entries, self.max_entries, 1) {
            Ok(())
        } else {
            self.latch.fire(LimitKind::OutputFiles);
            Err(FULL)
        }
    }
}

/// The one error a full `/out` gives, whichever budget ran out (bytes,
/// entries, bytes written) and whichever way the guest wrote:
/// `insufficient-space`, which wasi-libc and the preview1 adapter turn
/// into `ENOSPC`. Streams fail with an `ENOSPC` I/O error, which
/// `filesystem-error-code` reads as the same code. (`quota`, WASI's
/// `EDQUOT`, was answered by descriptor calls before, so a guest saw a
/// different error for a full `/out` depending on how it wrote.)
pub const FULL: ErrorCode = ErrorCode::InsufficientSpace;

/// Charged to the `written` meter for each `sync` or `sync-data`: one page
/// of data and the journal blocks of the commit it forces.
pub const SYNC_COST: u64 = 16 * 1024;
/// Charged to the `written` meter for each metadata change.
pub const METADATA_COST: u64 = 4 * 1024;
/// The least the `written` meter allows, whatever the output budget.
pub const WRITTEN_FLOOR: u64 = 1024 * 1024;
/// The longest path a filesystem call accepts (Linux's `PATH_MAX`).
pub const MAX_PATH_BYTES: usize = 4096;

/// Refuses a path over [`MAX_PATH_BYTES`] before any host work.
fn path_ok(path: &str) -> FsResult<()> {
    if path.len() > MAX_PATH_BYTES {
        Err(ErrorCode::NameTooLong.into())
    } else {
        Ok(())
    }
}

/// Growth of a file of `size` bytes when bytes up to `end` are written.
fn growth(size: u64, offset: u64, len: u64) -> Result<u64, ErrorCode> {
    let end = offset.checked_add(len).ok_or(FULL)?;
    Ok(end.saturating_sub(size))
}

/// An OS error as the guest is told it; a path that led out from beneath
/// its directory (`EXDEV` from `openat2`) is `not-permitted`, as
/// wasmtime-wasi's own resolution says.
fn io_error(e: rustix::io::Errno) -> ErrorCode {
    if e == rustix::io::Errno::XDEV {
        return ErrorCode::NotPermitted;
    }
    ErrorCode::from(std::io::Error::from(e))
}

/// Whether what `fd` holds is among `set` (by identity); refused with
/// `access` otherwise, or where it has none.
fn among(
    set: &Mutex<super::outputs::Created>,
    fd: impl std::os::fd::AsFd,
) -> Result<(), ErrorCode> {
    let id = super::outputs::FileId::of(fd).map_err(|_| ErrorCode::Access)?;
    if set.lock().unwrap_or_else(|e| e.into_inner()).contains(&id) {
        Ok(())
    } else {
        Err(ErrorCode::Access)
    }
}

/// Opens `path` beneath `dir` with `how`, as wasmtime-wasi resolves: never
/// out from beneath `dir` (`RESOLVE_BENEATH`), never through a magic link.
/// `EAGAIN` (a rename elsewhere raced the resolution) is retried.
fn openat2_retrying(
    dir: &std::fs::File,
    path: &str,
    how: rustix::fs::OFlags,
) -> Result<std::os::fd::OwnedFd, ErrorCode> {
    use rustix::fs::{Mode, ResolveFlags};
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(dir, path, how, Mode::empty(), resolve) {
            Err(rustix::io::Errno::AGAIN) if tries < 8 => tries += 1,
            other => break other.map_err(io_error),
        }
    }
}

/// Whether every directory beneath the directory `dir` is at most
/// `levels` levels below it (entries of other kinds do not count). Walked
/// without following a link, down to `levels + 1` at most.
fn dirs_within(dir: &std::os::fd::OwnedFd, levels: usize) -> Result<bool, ErrorCode> {
    use rustix::fs::{AtFlags, FileType, Mode, OFlags};
    let entries = rustix::fs::Dir::read_from(dir).map_err(io_error)?;
    for entry in entries {
        let entry = entry.map_err(io_error)?;
        let name = entry.file_name();
        if name == c"." || name == c".." {
            continue;
        }
        let is_dir = match entry.file_type() {
            FileType::Directory => true,
            FileType::Unknown => {
                let st =
                    rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW).map_err(io_error)?;
                FileType::from_raw_mode(st.st_mode) == FileType::Directory
            }
            _ => false,
        };
        if !is_dir {
            continue;
        }
        if levels == 0 {
            return Ok(false);
        }
        let sub = rustix::fs::openat(
            dir,
            name,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_error)?;
        if !dirs_within(&sub, levels - 1)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// `path` without its last component (`""` for a name alone), and that
/// component; trailing slashes are not components.
fn split_last(path: &str) -> (&str, &str) {
    let path = path.trim_end_matches('/');
    match path.rfind('/') {
        Some(at) => (&path[..at], &path[at + 1..]),
        None => ("", path),
    }
}

/// A new timestamp as `utimensat` takes it.
fn timespec(t: types::NewTimestamp) -> Result<rustix::fs::Timespec, ErrorCode> {
    Ok(match t {
        types::NewTimestamp::NoChange => rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        types::NewTimestamp::Now => rustix::fs::Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
        // Nanoseconds past a second carry into the seconds, as
        // wasmtime-wasi's own takes them.
        types::NewTimestamp::Timestamp(t) => rustix::fs::Timespec {
            tv_sec: t
                .seconds
                .checked_add(u64::from(t.nanoseconds / 1_000_000_000))
                .and_then(|s| i64::try_from(s).ok())
                .ok_or(ErrorCode::Overflow)?,
            tv_nsec: (t.nanoseconds % 1_000_000_000).into(),
        },
    })
}

/// `HasData` marker for linking [`QuotaFs`] as `wasi:filesystem/types`.
#[derive(Debug)]
pub struct QuotaFsData;

impl HasData for QuotaFsData {
    type Data<'a> = QuotaFs<'a>;
}

/// wasmtime-wasi's filesystem view plus the job's quota.
pub struct QuotaFs<'a> {
    /// wasmtime-wasi's own implementation, which every call reaches.
    pub inner: WasiFilesystemCtxView<'a>,
    /// The job's budget.
    pub quota: &'a Arc<OutputQuota>,
    /// Where every error answered to the guest is counted.
    pub refusals: &'a Refusals,
}

impl QuotaFs<'_> {
    /// The current apparent size of `fd` if it is a regular file opened
    /// for writing (one `fstat`, cheap enough to do before every write).
    /// Writes through any other descriptor fail in wasmtime-wasi without
    /// touching the disk, so they are not charged.
    fn file_size(&self, fd: &Resource<types::Descriptor>) -> Option<u64> {
        let borrowed: Resource<types::Descriptor> = Resource::new_borrow(fd.rep());
        match self.inner.table.get(&borrowed) {
            Ok(types::Descriptor::File(f))
                if f.open_mode.contains(OpenMode::WRITE) && !f.perms.write_not_permitted() =>
            {
                f.file.metadata().ok().map(|m| m.len())
            }
            _ => None,
        }
    }

    /// Counts the host file behind the descriptor `open-at` just returned.
    fn hold(&mut self, fd: &Resource<types::Descriptor>) {
        let borrowed: Resource<types::Descriptor> = Resource::new_borrow(fd.rep());
        match self.inner.table.get(&borrowed) {
            Ok(types::Descriptor::File(f)) => self.quota.hold(&f.file),
            Ok(types::Descriptor::Dir(d)) => self.quota.hold(&d.dir),
            Err(_) => {}
        }
    }

    /// Whether `path` resolves to an existing entry under `fd`, resolving a
    /// final symlink exactly as the open will (`path_flags`): a dangling link
    /// opened with `create` creates its target, which must be charged.
    async fn exists_at(
        &mut self,
        fd: &Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: &str,
    ) -> bool {
        let borrowed = Resource::new_borrow(fd.rep());
        HostDescriptor::stat_at(&mut self.inner, borrowed, path_flags, path.to_owned())
            .await
            .is_ok()
    }

    /// Opens what is already at `path` as wasmtime-wasi's `open-at` would,
    /// but never blocks: the open is non-blocking (`O_NONBLOCK`), and what
    /// it opened is refused with `access` unless the descriptor itself is a
    /// regular file or a directory. An open of a FIFO waits for its other
    /// end past any clock of the job's, and a look at the name before the
    /// open is a race: someone else can rename a FIFO over the name between
    /// the two, and then no one can ever open its other end (found by an
    /// attacker). Resolution stays beneath `fd` as wasmtime-wasi's does
    /// (`openat2`, `RESOLVE_BENEATH`, no magic links).
    fn open_existing(
        &mut self,
        fd: &Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: &str,
        oflags: types::OpenFlags,
        flags: types::DescriptorFlags,
    ) -> FsResult<Resource<types::Descriptor>> {
        use rustix::fs::OFlags;
        use wasmtime_wasi::filesystem::{Descriptor, Dir, File};

        let parent = self.dir_of(fd)?;
        if flags.intersects(
            types::DescriptorFlags::FILE_INTEGRITY_SYNC
                | types::DescriptorFlags::DATA_INTEGRITY_SYNC
                | types::DescriptorFlags::REQUESTED_WRITE_SYNC,
        ) {
            return Err(ErrorCode::Unsupported.into());
        }
        if oflags.contains(types::OpenFlags::CREATE | types::OpenFlags::EXCLUSIVE) {
            return Err(ErrorCode::Exist.into());
        }
        // The open modes wasmtime-wasi gives: `create` and `truncate` write;
        // a descriptor not opened to write is opened to read.
        let mut mode = OpenMode::empty();
        if flags.contains(types::DescriptorFlags::READ) {
            mode |= OpenMode::READ;
        }
        if flags.contains(types::DescriptorFlags::WRITE)
            || oflags.intersects(types::OpenFlags::CREATE | types::OpenFlags::TRUNCATE)
        {
            mode |= OpenMode::WRITE;
        } else {
            mode |= OpenMode::READ;
        }
        if mode.contains(OpenMode::WRITE) && parent.perms.write_not_permitted() {
            return Err(ErrorCode::NotPermitted.into());
        }
        let mut how = OFlags::CLOEXEC | OFlags::NONBLOCK | OFlags::NOCTTY;
        how |= match (
            mode.contains(OpenMode::READ),
            mode.contains(OpenMode::WRITE),
        ) {
            (true, true) => OFlags::RDWR,
            (false, true) => OFlags::WRONLY,
            _ => OFlags::RDONLY,
        };
        if oflags.contains(types::OpenFlags::TRUNCATE) {
            how |= OFlags::TRUNC;
        }
        if !path_flags.contains(types::PathFlags::SYMLINK_FOLLOW) {
            how |= OFlags::NOFOLLOW;
        }
        let opened = openat2_retrying(&parent.dir, path, how)?;
        let stat = rustix::fs::fstat(&opened).map_err(io_error)?;
        let kind = rustix::fs::FileType::from_raw_mode(stat.st_mode);
        let dir = match kind {
            rustix::fs::FileType::Directory => true,
            rustix::fs::FileType::RegularFile => false,
            _ => return Err(ErrorCode::Access.into()),
        };
        if oflags.contains(types::OpenFlags::DIRECTORY) && !dir {
            return Err(ErrorCode::NotDirectory.into());
        }
        let status = rustix::fs::fcntl_getfl(&opened).map_err(io_error)?;
        rustix::fs::fcntl_setfl(&opened, status.difference(OFlags::NONBLOCK)).map_err(io_error)?;
        let file = std::fs::File::from(opened);
        let descriptor = if dir {
            Descriptor::Dir(Dir::new(file, parent.perms, mode, BLOCKS_CURRENT_THREAD))
        } else {
            Descriptor::File(File::new(file, parent.perms, mode, BLOCKS_CURRENT_THREAD))
        };
        Ok(self.inner.table.push(descriptor)?)
    }

    /// Counts the directory or symlink the guest just made at `path` under
    /// `fd` among the job's own ([`OutputQuota::own_entry`]), resolved as
    /// every call of the guest's is. Something renamed over the name in
    /// between is counted instead, which lets the guest set its times and
    /// nothing more.
    /// Whether the directory just made at `path` beneath `fd` is not shown
    /// to be within [`MAX_DIR_DEPTH`] below `/out`: deeper, or not found
    /// again (its path's lookup failed), which is refused alike.
    /// Refuses to make a directory at `path` beneath `fd` whose parent is
    /// not shown to be less than [`MAX_DIR_DEPTH`] below `/out`, before
    /// anything is made: a lookup of the parent that fails refuses with its
    /// own error, a depth not shown with `not-permitted`. The parent looked
    /// at, held, and the new directory's name.
    fn mkdir_within_depth<'p>(
        &self,
        fd: &Resource<types::Descriptor>,
        path: &'p str,
    ) -> FsResult<(std::os::fd::OwnedFd, &'p str)> {
        use rustix::fs::OFlags;
        let dir = self.dir_of(fd)?;
        let (parent, name) = split_last(path);
        let parent = if parent.is_empty() { "." } else { parent };
        let parent = openat2_retrying(
            &dir.dir,
            parent,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        )?;
        if self
            .quota
            .depth_below_out(std::os::fd::AsFd::as_fd(&parent), MAX_DIR_DEPTH - 1)
            .is_none()
        {
            return Err(ErrorCode::NotPermitted.into());
        }
        Ok((parent, name))
    }

    fn made_too_deep(&self, fd: &Resource<types::Descriptor>, path: &str) -> bool {
        use rustix::fs::OFlags;
        let Ok(parent) = self.dir_of(fd) else {
            return true;
        };
        let Ok(made) = openat2_retrying(
            &parent.dir,
            path,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::DIRECTORY | OFlags::CLOEXEC,
        ) else {
            return true;
        };
        self.quota
            .depth_below_out(std::os::fd::AsFd::as_fd(&made), MAX_DIR_DEPTH)
            .is_none()
    }

    /// Refuses (`not-permitted`) to move a directory where it, or a
    /// directory beneath it, would not be shown to be within
    /// [`MAX_DIR_DEPTH`] below `/out`. Paths are resolved as the rename
    /// resolves them: beneath their descriptors, the last component of the
    /// one moved not followed. A lookup that fails refuses the rename with
    /// its own error (what the rename would say of a name that is not
    /// there), never lets it through unlooked at.
    fn rename_within_depth(
        &self,
        fd: &Resource<types::Descriptor>,
        old_path: &str,
        new_fd: &Resource<types::Descriptor>,
        new_path: &str,
    ) -> FsResult<()> {
        use rustix::fs::{FileType, Mode, OFlags};
        let (from, to) = (self.dir_of(fd)?, self.dir_of(new_fd)?);
        let moved = openat2_retrying(
            &from.dir,
            old_path,
            OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        )?;
        let st = rustix::fs::fstat(&moved).map_err(io_error)?;
        // Only a directory deepens a tree.
        if FileType::from_raw_mode(st.st_mode) != FileType::Directory {
            return Ok(());
        }
        let moved = rustix::fs::openat(
            &moved,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(io_error)?;
        let (parent, _) = split_last(new_path);
        let parent = if parent.is_empty() { "." } else { parent };
        let parent = openat2_retrying(
            &to.dir,
            parent,
            OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        )?;
        // The moved directory lands one level below its new parent, and
        // the directories beneath it below that.
        let Some(depth) = self
            .quota
            .depth_below_out(std::os::fd::AsFd::as_fd(&parent), MAX_DIR_DEPTH - 1)
        else {
            return Err(ErrorCode::NotPermitted.into());
        };
        if dirs_within(&moved, MAX_DIR_DEPTH - depth - 1)? {
            Ok(())
        } else {
            Err(ErrorCode::NotPermitted.into())
        }
    }

    /// The directory the guest's descriptor `fd` holds; `not-directory`
    /// for a file.
    fn dir_of(&self, fd: &Resource<types::Descriptor>) -> FsResult<wasmtime_wasi::filesystem::Dir> {
        let borrowed: Resource<types::Descriptor> = Resource::new_borrow(fd.rep());
        match self.inner.table.get(&borrowed)? {
            wasmtime_wasi::filesystem::Descriptor::Dir(d) => Ok(d.clone()),
            wasmtime_wasi::filesystem::Descriptor::File(_) => Err(ErrorCode::NotDirectory.into()),
        }
    }

    fn own_made(&self, fd: &Resource<types::Descriptor>, path: &str) {
        use rustix::fs::OFlags;
        let borrowed: Resource<types::Descriptor> = Resource::new_borrow(fd.rep());
        if let Ok(wasmtime_wasi::filesystem::Descriptor::Dir(parent)) =
            self.inner.table.get(&borrowed)
            && let Ok(entry) = openat2_retrying(
                &parent.dir,
                path,
                OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            )
        {
            self.quota.own_entry(&entry);
        }
    }

    /// Sets the times of what is at `path` as wasmtime-wasi's `set-times-at`
    /// would, but never opens it to read or write: the entry is resolved to
    /// an `O_PATH` descriptor (which no FIFO holds up) beneath `fd`
    /// (`openat2`, `RESOLVE_BENEATH`, no magic links), refused with
    /// `access` unless it is a regular file, a directory or a symlink (not
    /// followed) the job created, or its `/out`, and its times are set on that very
    /// descriptor (`utimensat` with `AT_EMPTY_PATH`). wasmtime-wasi's own
    /// opens the entry for writing, then reading, and blocks forever on a
    /// FIFO someone renamed over the name (found by an attacker).
    fn set_times_beneath(
        &mut self,
        fd: &Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: &str,
        atim: types::NewTimestamp,
        mtim: types::NewTimestamp,
    ) -> FsResult<()> {
        use rustix::fs::{AtFlags, FileType, OFlags, Timestamps};

        let parent = self.dir_of(fd)?;
        if parent.perms.write_not_permitted() {
            return Err(ErrorCode::NotPermitted.into());
        }
        let times = Timestamps {
            last_access: timespec(atim)?,
            last_modification: timespec(mtim)?,
        };
        let follow = path_flags.contains(types::PathFlags::SYMLINK_FOLLOW);
        let mut how = OFlags::PATH | OFlags::CLOEXEC;
        if !follow {
            how |= OFlags::NOFOLLOW;
        }
        let entry = openat2_retrying(&parent.dir, path, how)?;
        let stat = rustix::fs::fstat(&entry).map_err(io_error)?;
        match FileType::from_raw_mode(stat.st_mode) {
            FileType::Directory => self.quota.owned(&entry)?,
            FileType::Symlink if !follow => self.quota.owned(&entry)?,
            FileType::RegularFile => self.quota.writable(&entry)?,
            _ => return Err(ErrorCode::Access.into()),
        }
        let mut at = AtFlags::EMPTY_PATH;
        if !follow {
            at |= AtFlags::SYMLINK_NOFOLLOW;
        }
        rustix::fs::utimensat(&entry, "", &times, at).map_err(io_error)?;
        Ok(())
    }

    /// Replaces the stream at `stream` with a [`QuotaStream`] around it.
    /// The file behind `fd`, which a stream may write: not a directory
    /// (bad-descriptor) nor under a read-only preopen (not-permitted), as
    /// wasmtime-wasi answers.
    fn writable_file(&self, fd: &Resource<types::Descriptor>) -> FsResult<Arc<std::fs::File>> {
        let borrowed: Resource<types::Descriptor> = Resource::new_borrow(fd.rep());
        match self.inner.table.get(&borrowed)? {
            types::Descriptor::File(f) if f.perms.write_not_permitted() => {
                Err(ErrorCode::NotPermitted.into())
            }
            types::Descriptor::File(f) => Ok(Arc::clone(&f.file)),
            types::Descriptor::Dir(_) => Err(ErrorCode::BadDescriptor.into()),
        }
    }

    fn quota_stream(
        &mut self,
        inner: DynOutputStream,
        position: u64,
        size: u64,
    ) -> FsResult<Resource<DynOutputStream>> {
        let wrapped: DynOutputStream = Box::new(QuotaStream {
            inner,
            position,
            known_size: size,
            quota: Arc::clone(self.quota),
        });
        Ok(self.inner.table.push(wrapped)?)
    }
}

/// A service call's place among the job's host descriptors
/// ([`OutputQuota::hold_call`]), given back when dropped.
#[derive(Debug)]
pub struct CallSlot(Arc<OutputQuota>);

impl Drop for CallSlot {
    fn drop(&mut self) {
        self.0.calls.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What the listing of `dir` will hold in host memory: its entries' names
/// and [`LISTED_ENTRY`] each, read now (one pass more of the directory).
fn listing_cost(dir: &std::fs::File) -> Result<u64, ErrorCode> {
    use rustix::fs::{Mode, OFlags};
    let io = |e: rustix::io::Errno| ErrorCode::from(std::io::Error::from(e));
    // Opened anew for reading (a preopen's descriptor is a path-only one,
    // and the listing's own read must start from the beginning).
    let opened = rustix::fs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(io)?;
    let mut entries = rustix::fs::Dir::new(opened).map_err(io)?;
    let mut cost = 0u64;
    while let Some(entry) = entries.read() {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." {
            cost = cost.saturating_add(name.len() as u64 + LISTED_ENTRY);
        }
    }
    Ok(cost)
}

/// Whether `code` is the host saying no to something the guest may not do
/// (leave its preopens, write `/in`, follow a symlink out or round in a
/// loop, link across preopens, pass a bound), as opposed to an ordinary
/// answer about its own files (`no-entry` for a file that is not there,
/// `exist`, `not-empty`…), which any well-behaved program meets.
fn is_denial(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Access
            | ErrorCode::NotPermitted
            | ErrorCode::ReadOnly
            | ErrorCode::Quota
            | ErrorCode::InsufficientSpace
            | ErrorCode::InsufficientMemory
            | ErrorCode::FileTooLarge
            | ErrorCode::NameTooLong
            | ErrorCode::Loop
            | ErrorCode::TooManyLinks
            | ErrorCode::CrossDevice
    )
}

impl types::Host for QuotaFs<'_> {
    fn convert_error_code(&mut self, err: FsError) -> wasmtime::Result<ErrorCode> {
        // Every filesystem error the guest receives passes here; the ones
        // that say "not allowed" are counted as refusals.
        let code = types::Host::convert_error_code(&mut self.inner, err)?;
        if is_denial(code) {
            self.refusals.note();
        }
        Ok(code)
    }

    fn filesystem_error_code(
        &mut self,
        err: Resource<wasmtime::Error>,
    ) -> wasmtime::Result<Option<ErrorCode>> {
        types::Host::filesystem_error_code(&mut self.inner, err)
    }
}

impl HostDescriptor for QuotaFs<'_> {
    async fn advise(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
        len: types::Filesize,
        advice: types::Advice,
    ) -> FsResult<()> {
        self.inner.advise(fd, offset, len, advice).await
    }

    async fn sync_data(&mut self, fd: Resource<types::Descriptor>) -> FsResult<()> {
        self.quota.charge_sync()?;
        self.inner.sync_data(fd).await
    }

    async fn get_flags(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<types::DescriptorFlags> {
        self.inner.get_flags(fd).await
    }

    async fn get_type(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<types::DescriptorType> {
        self.inner.get_type(fd).await
    }

    async fn set_size(
        &mut self,
        fd: Resource<types::Descriptor>,
        size: types::Filesize,
    ) -> FsResult<()> {
        if let Some(current) = self.file_size(&fd) {
            let grown = size.saturating_sub(current);
            self.quota.charge_bytes(grown)?;
            self.quota.charge_written(grown)?;
        }
        self.inner.set_size(fd, size).await
    }

    async fn set_times(
        &mut self,
        fd: Resource<types::Descriptor>,
        atim: types::NewTimestamp,
        mtim: types::NewTimestamp,
    ) -> FsResult<()> {
        self.quota.charge_metadata()?;
        // On a descriptor as by name (`set_times_beneath`): only what the
        // job made, and its `/out` (found by an attacker: any directory
        // opened in `/out` had its times set through its descriptor).
        let borrowed: Resource<types::Descriptor> = Resource::new_borrow(fd.rep());
        // (Where the preopen allows no writes at all, wasmtime-wasi says
        // `not-permitted` as ever.)
        match self.inner.table.get(&borrowed)? {
            wasmtime_wasi::filesystem::Descriptor::Dir(d) if !d.perms.write_not_permitted() => {
                self.quota.owned(&*d.dir)?;
            }
            wasmtime_wasi::filesystem::Descriptor::File(f) if !f.perms.write_not_permitted() => {
                self.quota.writable(&*f.file)?;
            }
            _ => {}
        }
        self.inner.set_times(fd, atim, mtim).await
    }

    async fn read(
        &mut self,
        fd: Resource<types::Descriptor>,
        len: types::Filesize,
        offset: types::Filesize,
    ) -> FsResult<(Vec<u8>, bool)> {
        self.inner.read(fd, len, offset).await
    }

    async fn write(
        &mut self,
        fd: Resource<types::Descriptor>,
        buf: Vec<u8>,
        offset: types::Filesize,
    ) -> FsResult<types::Filesize> {
        if let Some(current) = self.file_size(&fd) {
            self.quota.charge_write(current, offset, buf.len() as u64)?;
        }
        self.inner.write(fd, buf, offset).await
    }

    async fn read_directory(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<Resource<types::DirectoryEntryStream>> {
        // The listing is read in full here and its descriptor closed before
        // this returns: the stream holds memory, not a host descriptor, and
        // the job's listings together hold at most `MAX_LISTED` of it (found
        // by an attacker: 4,000 listings of 1,000 entries kept, 1.2 GB of a
        // worker's memory for a job allowed 32 MiB).
        let cost = {
            let borrowed: Resource<types::Descriptor> = Resource::new_borrow(fd.rep());
            match self.inner.table.get(&borrowed)? {
                types::Descriptor::Dir(d) => listing_cost(&d.dir)?,
                types::Descriptor::File(_) => return Err(ErrorCode::NotDirectory.into()),
            }
        };
        self.quota.charge_listing(cost)?;
        let listed = self.inner.read_directory(fd).await;
        self.quota
            .listing_is(cost, listed.as_ref().ok().map(Resource::rep));
        listed
    }

    async fn sync(&mut self, fd: Resource<types::Descriptor>) -> FsResult<()> {
        self.quota.charge_sync()?;
        self.inner.sync(fd).await
    }

    async fn create_directory_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<()> {
        path_ok(&path)?;
        self.quota.charge_metadata()?;
        self.quota.charge_entry()?;
        let (parent, name) = self.mkdir_within_depth(&fd, &path)?;
        let borrowed = Resource::new_borrow(fd.rep());
        self.inner
            .create_directory_at(borrowed, path.clone())
            .await?;
        if self.made_too_deep(&fd, &path) {
            // Taken back through the parent looked at and the name alone
            // (found by an attacker: taken back by the guest's path, a
            // trailing `/` made it a removal of `.`, which failed, and the
            // directory stayed). The guest cannot act between the two.
            let _ = rustix::fs::unlinkat(&parent, name, rustix::fs::AtFlags::REMOVEDIR);
            return Err(ErrorCode::NotPermitted.into());
        }
        self.own_made(&fd, &path);
        Ok(())
    }

    async fn stat(&mut self, fd: Resource<types::Descriptor>) -> FsResult<types::DescriptorStat> {
        self.inner.stat(fd).await
    }

    async fn stat_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
    ) -> FsResult<types::DescriptorStat> {
        path_ok(&path)?;
        self.inner.stat_at(fd, path_flags, path).await
    }

    async fn set_times_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        atim: types::NewTimestamp,
        mtim: types::NewTimestamp,
    ) -> FsResult<()> {
        path_ok(&path)?;
        self.quota.charge_metadata()?;
        self.set_times_beneath(&fd, path_flags, &path, atim, mtim)
    }

    async fn link_at(
        &mut self,
        _fd: Resource<types::Descriptor>,
        _old_path_flags: types::PathFlags,
        _old_path: String,
        _new_descriptor: Resource<types::Descriptor>,
        _new_path: String,
    ) -> FsResult<()> {
        Err(ErrorCode::NotPermitted.into())
    }

    async fn open_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
        oflags: types::OpenFlags,
        flags: types::DescriptorFlags,
    ) -> FsResult<Resource<types::Descriptor>> {
        path_ok(&path)?;
        if oflags.contains(types::OpenFlags::DIRECTORY)
            && oflags.intersects(
                types::OpenFlags::CREATE | types::OpenFlags::EXCLUSIVE | types::OpenFlags::TRUNCATE,
            )
        {
            return Err(ErrorCode::Invalid.into());
        }
        let mut oflags = oflags;
        let mut fresh = false;
        if oflags.contains(types::OpenFlags::CREATE)
            && !self.exists_at(&fd, path_flags, &path).await
        {
            // A dangling link: the open would make its target, a file
            // that could not be told from one someone else puts there
            // meanwhile. Refused before anything is made.
            if self.exists_at(&fd, types::PathFlags::empty(), &path).await {
                return Err(ErrorCode::Access.into());
            }
            self.quota.charge_entry()?;
            // Nothing at all at that name: the open must make a new file,
            // or fail — whatever someone else puts at the name meanwhile
            // is never taken for the job's own.
            oflags |= types::OpenFlags::EXCLUSIVE;
            fresh = true;
        }
        // An existing file is truncated only once it is known to be the
        // job's own (below): the open itself must not cut someone else's.
        let mut flags = flags;
        let truncate = !fresh && oflags.contains(types::OpenFlags::TRUNCATE);
        if truncate {
            oflags &= !types::OpenFlags::TRUNCATE;
            flags |= types::DescriptorFlags::WRITE;
        }
        self.quota.admit_open()?;
        let opened = if fresh {
            self.inner
                .open_at(fd, path_flags, path, oflags, flags)
                .await?
        } else {
            // What someone else may have put at the name (a FIFO, renamed
            // over it at any moment) is opened without blocking.
            self.open_existing(&fd, path_flags, &path, oflags, flags)?
        };
        self.hold(&opened);
        let borrowed: Resource<types::Descriptor> = Resource::new_borrow(opened.rep());
        let verdict = match self.inner.table.get(&borrowed) {
            Ok(types::Descriptor::File(f)) if fresh => {
                self.quota.record_created(&f.file);
                Ok(())
            }
            Ok(types::Descriptor::File(f)) if f.open_mode.contains(OpenMode::WRITE) => {
                self.quota.writable(&f.file).and_then(|()| {
                    if truncate {
                        f.file.set_len(0).map_err(ErrorCode::from)
                    } else {
                        Ok(())
                    }
                })
            }
            Ok(types::Descriptor::File(f)) => self.quota.readable(&f.file),
            _ => Ok(()),
        };
        match verdict {
            Ok(()) => Ok(opened),
            Err(e) => {
                HostDescriptor::drop(&mut self.inner, opened).map_err(FsError::trap)?;
                Err(e.into())
            }
        }
    }

    fn drop(&mut self, fd: Resource<types::Descriptor>) -> wasmtime::Result<()> {
        // Nothing to give back by hand: the host descriptor is released
        // when its last holder (this descriptor or a stream on it) drops it.
        HostDescriptor::drop(&mut self.inner, fd)
    }

    async fn readlink_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<String> {
        path_ok(&path)?;
        self.inner.readlink_at(fd, path).await
    }

    async fn remove_directory_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<()> {
        path_ok(&path)?;
        self.quota.charge_metadata()?;
        self.inner.remove_directory_at(fd, path).await
    }

    async fn rename_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        old_path: String,
        new_fd: Resource<types::Descriptor>,
        new_path: String,
    ) -> FsResult<()> {
        path_ok(&old_path)?;
        path_ok(&new_path)?;
        self.quota.charge_metadata()?;
        self.rename_within_depth(&fd, &old_path, &new_fd, &new_path)?;
        self.inner.rename_at(fd, old_path, new_fd, new_path).await
    }

    async fn symlink_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        src_path: String,
        dest_path: String,
    ) -> FsResult<()> {
        path_ok(&src_path)?;
        path_ok(&dest_path)?;
        self.quota.charge_metadata()?;
        self.quota.charge_entry()?;
        let borrowed = Resource::new_borrow(fd.rep());
        self.inner
            .symlink_at(borrowed, src_path, dest_path.clone())
            .await?;
        self.own_made(&fd, &dest_path);
        Ok(())
    }

    async fn unlink_file_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path: String,
    ) -> FsResult<()> {
        path_ok(&path)?;
        self.quota.charge_metadata()?;
        self.inner.unlink_file_at(fd, path).await
    }

    /// A stream read on the guest's thread, each read charged to its
    /// `cpu_time` ([`super::streams`]), not wasmtime-wasi's, which reads in
    /// the background.
    fn read_via_stream(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
    ) -> FsResult<Resource<DynInputStream>> {
        let file = match self.inner.table.get(&fd)? {
            types::Descriptor::File(f) => Arc::clone(&f.file),
            // A directory is is-directory, not bad-descriptor (POSIX EISDIR
            // on read), as wasmtime-wasi answers.
            types::Descriptor::Dir(_) => return Err(ErrorCode::IsDirectory.into()),
        };
        let stream: DynInputStream = Box::new(ThreadRead::new(file, offset));
        Ok(self.inner.table.push(stream)?)
    }

    /// A stream written on the guest's thread ([`super::streams`]), each
    /// write charged to the quota first ([`QuotaStream`]).
    fn write_via_stream(
        &mut self,
        fd: Resource<types::Descriptor>,
        offset: types::Filesize,
    ) -> FsResult<Resource<DynOutputStream>> {
        let size = self.file_size(&fd).unwrap_or(0);
        let file = self.writable_file(&fd)?;
        self.quota_stream(Box::new(ThreadWrite::at(file, offset)), offset, size)
    }

    fn append_via_stream(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<Resource<DynOutputStream>> {
        let size = self.file_size(&fd).unwrap_or(0);
        let file = self.writable_file(&fd)?;
        self.quota_stream(Box::new(ThreadWrite::append(file)), size, size)
    }

    async fn is_same_object(
        &mut self,
        a: Resource<types::Descriptor>,
        b: Resource<types::Descriptor>,
    ) -> wasmtime::Result<bool> {
        self.inner.is_same_object(a, b).await
    }

    async fn metadata_hash(
        &mut self,
        fd: Resource<types::Descriptor>,
    ) -> FsResult<types::MetadataHashValue> {
        self.inner.metadata_hash(fd).await
    }

    async fn metadata_hash_at(
        &mut self,
        fd: Resource<types::Descriptor>,
        path_flags: types::PathFlags,
        path: String,
    ) -> FsResult<types::MetadataHashValue> {
        path_ok(&path)?;
        self.inner.metadata_hash_at(fd, path_flags, path).await
    }
}

impl HostDirectoryEntryStream for QuotaFs<'_> {
    async fn read_directory_entry(
        &mut self,
        stream: Resource<types::DirectoryEntryStream>,
    ) -> FsResult<Option<types::DirectoryEntry>> {
        self.inner.read_directory_entry(stream).await
    }

    fn drop(&mut self, stream: Resource<types::DirectoryEntryStream>) -> wasmtime::Result<()> {
        self.quota.listing_dropped(stream.rep());
        HostDirectoryEntryStream::drop(&mut self.inner, stream)
    }
}

/// A file output stream that charges growth to the quota before each write.
///
/// `known_size` starts at the file's size when the stream was opened and
/// rises with every byte this stream writes past it. Writes by other
/// descriptors meanwhile can only make `known_size` too small, which makes
/// this stream over-charge, never under-charge.
struct QuotaStream {
    inner: DynOutputStream,
    position: u64,
    known_size: u64,
    quota: Arc<OutputQuota>,
}

#[async_trait::async_trait]
impl OutputStream for QuotaStream {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        let len = bytes.len() as u64;
        let charge = self.quota.charge_write(self.known_size, self.position, len);
        if charge.is_err() {
            // ENOSPC reaches the guest as `insufficient-space`, the closest
            // stream-level error to a quota.
            let err = std::io::Error::from_raw_os_error(libc::ENOSPC);
            return Err(StreamError::LastOperationFailed(wasmtime::Error::new(err)));
        }
        self.inner.write(bytes)?;
        self.position += len;
        self.known_size = self.known_size.max(self.position);
        Ok(())
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        self.inner.flush()
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        self.inner.check_write()
    }

    async fn cancel(&mut self) {
        self.inner.cancel().await
    }
}

#[async_trait::async_trait]
impl Pollable for QuotaStream {
    async fn ready(&mut self) {
        self.inner.ready().await
    }
}

/// The guest's stdout kept as the output file `/out/<name>` (the policy's
/// `[run] stdout`): created by the host before the guest starts (so no
/// link the guest could leave is followed), charged one entry, and every
/// chunk charged to the `/out` quota and the written-bytes meter exactly
/// as a write through a descriptor is. Over the quota a write fails with
/// `ENOSPC` and the `output` limit fires. Clones share the file. Its one
/// host descriptor is among the job's own (`JOB_OVERHEAD_DESCRIPTORS`),
/// not the guest's share: the guest cannot multiply it.
#[derive(Clone, Debug)]
pub struct StdoutFile {
    file: Arc<std::fs::File>,
    position: Arc<Mutex<u64>>,
    quota: Arc<OutputQuota>,
}

impl StdoutFile {
    /// Creates `<out_dir>/<name>` (it must not exist) and charges its entry.
    ///
    /// # Errors
    /// If the entry is over the quota or the file cannot be created.
    pub fn create(
        out_dir: &std::path::Path,
        name: &str,
        quota: &Arc<OutputQuota>,
    ) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        quota.charge_entry().map_err(|_| {
            std::io::Error::other(format!(
                "no entry left in `/out` for the stdout file `{name}`"
            ))
        })?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o644)
            .open(out_dir.join(name))?;
        quota.record_created(&file);
        Ok(Self {
            file: Arc::new(file),
            position: Arc::new(Mutex::new(0)),
            quota: Arc::clone(quota),
        })
    }

    /// Charges and appends `bytes` at the stream's position.
    fn append(&self, bytes: &[u8]) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        let mut position = self.position.lock().unwrap_or_else(|e| e.into_inner());
        let len = bytes.len() as u64;
        if self.quota.charge_write(*position, *position, len).is_err() {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.file.write_all_at(bytes, *position)?;
        *position += len;
        Ok(())
    }
}

#[async_trait::async_trait]
impl OutputStream for StdoutFile {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        self.append(&bytes)
            .map_err(|e| StreamError::LastOperationFailed(wasmtime::Error::new(e)))
    }

    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }

    fn check_write(&mut self) -> Result<usize, StreamError> {
        Ok(64 * 1024)
    }
}

#[async_trait::async_trait]
impl Pollable for StdoutFile {
    async fn ready(&mut self) {}
}

impl tokio::io::AsyncWrite for StdoutFile {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(self.append(buf).map(|()| buf.len()))
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

impl wasmtime_wasi::cli::IsTerminal for StdoutFile {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl wasmtime_wasi::cli::StdoutStream for StdoutFile {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn growth_counts_holes_and_ignores_overwrites() {
        assert_eq!(growth(100, 0, 50).unwrap(), 0);
        assert_eq!(growth(100, 90, 50).unwrap(), 40);
        assert_eq!(growth(0, 1 << 33, 1).unwrap(), (1 << 33) + 1);
        assert!(growth(0, u64::MAX, 2).is_err());
    }

    /// A real host file, open on a fresh descriptor.
    fn host_file() -> Arc<std::fs::File> {
        Arc::new(tempfile::tempfile().unwrap())
    }

    #[test]
    fn descriptors_are_counted_until_the_last_holder_closes_them() {
        let latch = LimitLatch::default();
        let q = OutputQuota::new(10, 1, 2, latch.clone());
        let a = host_file();
        q.admit_open().unwrap();
        q.hold(&a);
        // A second holder of the same file (a stream on it) outlives the
        // first: the descriptor is still open and still counted.
        let stream_clone = Arc::clone(&a);
        drop(a);
        let b = host_file();
        q.admit_open().unwrap();
        q.hold(&b);
        assert_eq!(q.open_descriptors(), 2);
        assert!(q.admit_open().is_err(), "at the bound");
        drop(stream_clone);
        assert_eq!(q.open_descriptors(), 1, "released by the last holder");
        q.admit_open().unwrap();
        assert_eq!(latch.fired(), None, "a refusal alone fires no limit");
    }

    #[test]
    fn persistent_refusals_fire_the_descriptors_limit() {
        let latch = LimitLatch::default();
        let q = OutputQuota::new(10, 1, 1, latch.clone());
        let held = host_file();
        q.hold(&held);
        for _ in 1..DESCRIPTOR_REFUSALS {
            let err = q.admit_open().unwrap_err();
            assert_eq!(err.downcast_ref(), Some(&ErrorCode::InsufficientMemory));
        }
        assert_eq!(latch.fired(), None);
        let err = q.admit_open().unwrap_err();
        assert_eq!(err.downcast_ref(), None, "a trap, not an error code");
        assert_eq!(latch.fired(), Some(LimitKind::Descriptors));
    }

    #[test]
    fn every_byte_written_is_charged_and_bounded() {
        let latch = LimitLatch::default();
        let q = OutputQuota::new(WRITTEN_FLOOR, 1, 1, latch.clone());
        // Rewriting the same bytes in place: no growth after the first
        // pass, but every pass is written.
        for _ in 0..WRITTEN_PER_OUTPUT {
            q.charge_write(WRITTEN_FLOOR, 0, WRITTEN_FLOOR).unwrap();
        }
        assert_eq!(q.bytes_written(), WRITTEN_FLOOR * WRITTEN_PER_OUTPUT);
        assert_eq!(q.charge_write(WRITTEN_FLOOR, 0, 1), Err(FULL));
        assert_eq!(latch.fired(), Some(LimitKind::Written));
        assert_eq!(q.bytes_charged(), 0, "overwrites never grew the file");
    }

    #[test]
    fn syncs_and_metadata_changes_are_charged_as_disk_traffic() {
        let latch = LimitLatch::default();
        // A 64 KiB output budget still gets the floor.
        let q = OutputQuota::new(64 * 1024, 1, 1, latch.clone());
        // One-byte writes, each followed by a sync: the disk sees a page
        // and a journal commit per pass, so the meter counts that.
        let mut passes = 0;
        while q.charge_write(1, 0, 1).is_ok() && q.charge_sync().is_ok() {
            passes += 1;
        }
        assert_eq!(passes, WRITTEN_FLOOR / (SYNC_COST + 1));
        assert_eq!(latch.fired(), Some(LimitKind::Written));
        let q = OutputQuota::new(64 * 1024, 1, 1, LimitLatch::default());
        let mut renames = 0;
        while q.charge_metadata().is_ok() {
            renames += 1;
        }
        assert_eq!(renames, WRITTEN_FLOOR / METADATA_COST);
    }

    #[test]
    fn paths_over_path_max_are_refused_before_any_host_work() {
        assert!(path_ok(&"a".repeat(MAX_PATH_BYTES)).is_ok());
        let err = path_ok(&"a".repeat(MAX_PATH_BYTES + 1)).unwrap_err();
        assert_eq!(err.downcast_ref(), Some(&ErrorCode::NameTooLong));
    }

    #[test]
    fn service_calls_share_the_descriptor_bound_until_their_bodies_drop() {
        let q = OutputQuota::new(10, 1, 3, LimitLatch::default());
        let file = host_file();
        q.hold(&file);
        let first = q.hold_call().expect("under the bound");
        let second = q.hold_call().expect("at the bound's last place");
        assert_eq!(q.open_descriptors(), 3);
        assert!(q.hold_call().is_none(), "a call past the bound is refused");
        assert!(q.admit_open().is_err(), "and so is a file");
        drop(first);
        let third = q.hold_call().expect("a dropped body gives its place back");
        drop((second, third, file));
        assert_eq!(q.open_descriptors(), 0);
    }

    #[test]
    fn only_answers_that_say_no_count_as_refusals() {
        for code in [
            ErrorCode::NotPermitted,
            ErrorCode::ReadOnly,
            ErrorCode::Quota,
            ErrorCode::Access,
        ] {
            assert!(is_denial(code), "{code:?}");
        }
        for code in [
            ErrorCode::NoEntry,
            ErrorCode::Exist,
            ErrorCode::NotEmpty,
            ErrorCode::IsDirectory,
        ] {
            assert!(!is_denial(code), "{code:?}");
        }
    }

    #[test]
    fn charges_stop_at_the_budget_and_name_the_limit() {
        let latch = LimitLatch::default();
        let q = OutputQuota::new(10, 1, 8, latch.clone());
        assert!(q.charge_bytes(10).is_ok());
        assert_eq!(q.charge_bytes(1), Err(ErrorCode::InsufficientSpace));
        assert_eq!(latch.fired(), Some(LimitKind::Output));
        assert_eq!(q.bytes_charged(), 10);
        assert!(q.charge_entry().is_ok());
        assert_eq!(q.charge_entry(), Err(ErrorCode::InsufficientSpace));
    }
}
