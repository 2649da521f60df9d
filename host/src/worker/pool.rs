//! A trust zone's pool of worker processes, from the gateway's side.
//!
//! The pool starts its workers ([`process::spawn`]), checks each one's
//! hardening against what the operator requires before it sends a guest
//! byte, hands jobs to the least busy worker, replaces a worker after its
//! allowance of jobs (`1`: a fresh process per job), and treats every way a
//! worker can fail — it exits, is killed, outgrows its memory ceiling,
//! stops answering, or breaks the protocol — as a fault: the worker is
//! killed, its running jobs end as failed with the fault named
//! ([`FailureKind::Worker`]), a fresh worker replaces it, and the fault is
//! reported to the pool's owner (audit and metrics). A worker that lets
//! one job overrun its wall time loses that job only ([`Pool::stop`]):
//! it is failed, the worker takes no more and goes once its other jobs
//! end, and the overrun is reported the same way. Other workers and zones
//! are not touched.
//!
//! Nothing a worker sends is trusted: reports are re-stamped with the
//! gateway's own identity of the job, bounded, and their outputs are
//! collected by the gateway itself without following links
//! ([`outputs::collect_beneath`](crate::sandbox::outputs::collect_beneath)).
//!
//! The zone's compile cache is the gateway's: its workers only read it
//! (Landlock), and the gateway keeps the authority over it: which artifact
//! is good for each module ([`ArtifactRecords`], in [`records_dir`], which
//! no worker can reach). Each `Load` carries that record, and a worker
//! loads a cached artifact only when its bytes are exactly the recorded
//! ones. A worker that compiles a module leaves the artifact in its own
//! directory; it is taken into the cache and recorded only while the
//! gateway has sent that worker no job ([`recordable`]): a worker that has
//! run a guest may be that guest's by now, and its word about native code
//! is not taken. So no worker can fill, or plant anything in, the cache.

use super::process::WorkerProcess;
use std::collections::{BTreeSet, HashMap};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::calls::GatewayCalls;
use super::harden::{Applied, Layer, LayerState};
use super::link::Link;
use super::proto::{self, Blob, Down, MAX_DOWN_FRAME, MAX_UP_FRAME, Up};
use super::{WorkerArgs, process};
use crate::job::egress::Egress;
use crate::job::{Failure, FailureKind, JobReport, JobSpec, Outcome};
use crate::policy::{Policy, Sha256Hex};
use crate::sandbox::beneath::Root;
use crate::sandbox::outputs::{CollectError, Collected};
use crate::sandbox::{Artifact, ArtifactRecords, LoadError, LoadInfo};

/// The subcommand a worker is started with.
pub const WORKER_SUBCOMMAND: &str = "__worker";

/// How long a new worker has to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(20);
/// How often workers are asked whether they are there.
const PING_EVERY: Duration = Duration::from_secs(2);
/// A worker that has not answered for this long is a fault.
const SILENT_FAULT: Duration = Duration::from_secs(15);
/// A worker not heard from for this long while its frames wait unread in
/// the gateway's end of the channel, or frames for it wait in the
/// gateway's queue, is not judged, as long as it has lately read more of
/// what was written to it ([`READ_LATELY`]): the gateway's reader or writer is
/// behind (its threads held, or busy with other workers' frames), not the
/// worker...
const UNREAD: Duration = Duration::from_secs(1);
/// ...where "lately" is this long: the worker has read some of what was
/// written to it within it. The supervisor's own thread writes a ping at
/// least every [`PING_EVERY`], and what waits for the link's drain
/// ([`Link::push`]), so a worker that hangs stops reading what it is sent.
/// What waits unread at the gateway may be what it said before it hung
/// (found by an attacker: a worker stopped while the gateway's threads were
/// held was excused by its own earlier answers until they were read, or
/// for 60 s); and a channel it had read dry while the rest of a large
/// frame waited for the held drain, pings behind it, stayed empty (found
/// by the next, when "lately" was "its end of the channel found empty").
const READ_LATELY: Duration = Duration::from_secs(5);
/// ...for at most this long: past it the worker is judged whatever waits.
const UNREAD_AT_MOST: Duration = Duration::from_secs(60);
/// How long what the gateway sends a worker may wait unread, in the
/// gateway or in the channel, before the worker is a fault, however fast
/// it reads the rest: an honest worker reads its channel after every
/// guest poll, a frame of the largest inputs in milliseconds.
const READ_WITHIN: Duration = Duration::from_secs(60);
/// How far past its wall time a job's report may arrive before its worker
/// is a fault.
const OVERRUN_GRACE: Duration = Duration::from_secs(5);
/// How long a worker may take to compile a module (its `Loaded`), and to
/// start a job it was sent (its `Running`, which may wait for that
/// compile and comes once the guest has run for 100 ms; a job that ends
/// sooner sends none), before it is a fault: these clocks are the
/// gateway's, not the worker's.
const START_ALLOWANCE: Duration = Duration::from_secs(300);
/// How long a worker that has said it compiled a job's module may take to
/// start the job (its `Running`, or its report): to read its `Run`, which
/// it must within [`READ_WITHIN`] anyway, and write its inputs. A worker
/// that reads what it is sent and starts nothing holds the jobs it is sent
/// this long, not [`START_ALLOWANCE`] (found by a tester: a worker that
/// read and dropped every `Run` held another tenant's job 300 s). A job
/// sent before its worker's `Loaded` for its module has this long from
/// that `Loaded` (found by a tester: such a job kept the 300 s).
const START_LOADED: Duration = READ_WITHIN.saturating_add(Duration::from_secs(15));

/// How often a module's zone-cache entry is compiled again at most
/// ([`Pool::rebuild`]).
const REBUILD_EVERY: Duration = Duration::from_secs(60);

/// The wait before a zone starts a worker again after its first failed
/// start in a row; each further failure doubles it, up to
/// [`START_BACKOFF_MOST`]. A start that cannot succeed (the binary gone,
/// a required layer missing, a full disk) is otherwise tried at every
/// round of the supervisor, four times a second, each try a process and
/// a line in the log (found by a tester: 784 MB of log in 13 s).
const START_BACKOFF_FIRST: Duration = Duration::from_millis(250);

/// What a worker may use of the CPU for each second one of its jobs
/// spends in it (from its `Run` to its report): a core while it runs, and
/// as much again for what it leaves, which goes once it has ended (its
/// directories, removed on the worker's blocking threads, took less to
/// remove than to make) ([`Pool::burns_beyond_its_jobs`]).
const JOB_CPU: f64 = 2.0;

/// What a worker may use of the CPU at length beside its jobs' time: its
/// ticks and pings take microseconds a second.
const REST_CPU: f64 = 0.05;

/// How long a worker's loading of modules counts as a job's time in its
/// CPU ledger: a load from the zone's cache takes milliseconds, and one
/// compiled (where its cache could not be read) seconds. A worker that
/// never says it loaded a module is charged from then on.
const LOAD_CPU_WITHIN: Duration = Duration::from_secs(30);

/// What a worker may use beyond what its jobs' time and its rest allow,
/// at once, before it is faulted.
const CPU_BEYOND_AT_MOST: Duration = Duration::from_secs(1);

/// What a worker may keep of what its jobs' time allowed and it did not
/// use: a worker whose jobs made many files removes them once they have
/// ended, and a compromised one can save no more than this.
const CPU_SAVED_AT_MOST: Duration = Duration::from_secs(10);

/// The longest wait between a zone's failed starts of a worker.
const START_BACKOFF_MOST: Duration = Duration::from_secs(8);

/// The wait before the next start after `failed` starts in a row failed.
fn start_backoff(failed: u32) -> Duration {
    match failed {
        0 => Duration::ZERO,
        n => START_BACKOFF_FIRST
            .saturating_mul(1 << (n - 1).min(16))
            .min(START_BACKOFF_MOST),
    }
}

/// A successor is sent the modules the zone has placed a job of within
/// this long ([`Pool::warm_successor`]); a module idle longer is loaded by
/// its next job. Sent every module the zone's workers held, each worker
/// loaded every module the zone had ever loaded, run or not, at each
/// replacement.
const WARM_WITHIN: Duration = Duration::from_secs(300);

/// The memory ceiling of a worker compiling a module alone in a zone
/// without one ([`Pool::load_alone`]), where the host offers cgroups:
/// a compile past it fails that module's load. Compiling takes memory in
/// proportion to the size of a module's largest functions, not to the
/// module's: an attacker's 600 KB module took a worker to 1.1 GB, and one
/// of the same kind near the size bound would take more than a host has.
pub const COMPILE_CEILING: u64 = 4 << 30;
/// What a worker's fault is while it is retired: it ran its allowance.
const RETIRED: &str = "retired";

/// Longest failure message kept from a worker's report.
const MAX_MESSAGE: usize = 1024;

/// Longest failure to start a job a worker may send (its own messages,
/// a module's load error among them, are cut to 16 KiB): a longer one is
/// a `protocol` fault.
const MAX_WORKER_ERROR: usize = 64 << 10;

/// One zone's pool settings.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// The zone.
    pub zone: String,
    /// The binary workers are started from (the gateway's own).
    pub program: PathBuf,
    /// Workers kept running.
    pub workers: u32,
    /// Jobs one worker runs before it is replaced; 0: no limit.
    pub jobs_per_worker: u32,
    /// Jobs one worker runs at once.
    pub max_concurrent_jobs: u32,
    /// A worker's memory ceiling, where the host offers cgroups.
    pub memory: Option<u64>,
    /// What the zone's workers' directories hold at once, all together
    /// ([`super::disk`]): each job is given room for its files out of it
    /// before it is sent, and each worker's directory is a file system of
    /// its own ([`super::scratch`]) as large as its jobs' rooms and its
    /// spare ([`super::disk::SPARE_IDLE`]), where the
    /// gateway may mount one. `None`: no bound, and plain directories in
    /// the zone's work directory.
    pub disk: Option<u64>,
    /// The zone's work directory (gateway-owned; each worker gets its own
    /// directory inside).
    pub work_dir: PathBuf,
    /// That directory already held open (reached from a held work
    /// directory, never through a link or a mount); `None`: made if
    /// missing and opened at [`PoolConfig::work_dir`].
    pub work_held: Option<Root>,
    /// The zone's compile cache, which the gateway writes and the zone's
    /// workers only read. The gateway keeps its record of which artifact
    /// in it is good for which module beside it, in [`records_dir`], where
    /// no worker reaches.
    pub cache_dir: PathBuf,
    /// A directory above [`PoolConfig::cache_dir`] already held open (the
    /// service's cache directory, locked): the zone's cache and its
    /// records are made and opened from it one name at a time, never
    /// through a link or a mount; `None`: from `cache_dir`'s parent,
    /// made if missing and opened by path.
    pub cache_held: Option<Root>,
    /// `(uid, gid)` workers switch to when the gateway runs as root.
    pub run_as: Option<(u32, u32)>,
    /// Host descriptors one worker may hold.
    pub max_open: u64,
    /// Threads one worker may run.
    pub max_threads: u64,
    /// Layers every worker must report active; a worker that does not is
    /// refused before it is sent anything.
    pub require: BTreeSet<Layer>,
    /// Layers left off (tests and the escape suite only).
    pub weaken: BTreeSet<Layer>,
}

/// Why a pool could not start.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A worker could not be started or did not say hello.
    #[error("zone `{zone}`: cannot start a worker: {reason}")]
    Start { zone: String, reason: String },
    /// A worker lacks a required layer.
    #[error(
        "zone `{zone}`: the worker lacks required hardening: {missing}; this host does not offer it (remove it from `[isolation] require` to run without it)"
    )]
    Missing { zone: String, missing: String },
}

/// A worker fault, for the pool's owner (audit, metrics).
#[derive(Clone, Debug)]
pub struct Fault {
    /// The zone.
    pub zone: String,
    /// The worker's process id.
    pub pid: u32,
    /// The fault's class: `exited`, `killed`, `memory`, `silent`, `disk`,
    /// `cpu` (it used the CPU beyond what its jobs' time allows: killed
    /// where it ran no job, retired otherwise),
    /// `protocol` (the worker was killed, its jobs failed), or `overrun`
    /// (one job ran past the gateway's clock for it: that job failed, and
    /// the worker was retired once its other jobs ended).
    pub class: &'static str,
    /// What happened, for people.
    pub reason: String,
    /// Jobs that were running on it.
    pub jobs: usize,
}

type FaultSink = Arc<dyn Fn(Fault) + Send + Sync>;

/// A module as the pool knows it: the gateway's own copy of its policy
/// and bytes, sent to each worker before its first job of it.
#[derive(Debug)]
struct Source {
    /// The module's name, as its policy gives it.
    name: String,
    /// The sha256 of `wasm`: what the zone's artifact record is keyed by.
    digest: Sha256Hex,
    policy_json: String,
    policy_sha256: Option<String>,
    wasm: Bytes,
}

/// A zone's workers.
pub struct Pool {
    config: PoolConfig,
    state: Mutex<State>,
    /// A worker took a job off, started, retired or failed: for jobs
    /// waiting for a place.
    changed: Arc<Notify>,
    /// Workers killed after running a job whose processes are not yet
    /// reaped: each holds a place until it is ([`Pool::put_down`]).
    dying: Arc<AtomicUsize>,
    /// The pool lost strength (a worker retiring or failed): for the
    /// supervisor, which a job's end alone does not wake.
    weakened: Arc<Notify>,
    ids: AtomicU64,
    closing: AtomicBool,
    faults: FaultSink,
    /// What the last worker to start reported.
    applied: Mutex<Applied>,
    /// Which artifact in the zone's cache is good for which module.
    records: Arc<ArtifactRecords>,
    /// The zone's cache, held open from the start.
    cache: Root,
    /// The runtime the pool was started on (the gateway's): what its
    /// owner is told (faults) and the calls its workers make run there.
    gateway: tokio::runtime::Handle,
    /// The zone's work directory, held open from the start: each worker's
    /// directory is made, handed over and removed from this descriptor,
    /// never through a link or a mount later put at its path.
    zone_dir: Root,
    /// The zone's disk, shared by its workers' directories.
    disk: Option<Arc<super::disk::ZoneDisk>>,
    /// What each worker's jobs may hold together, where the zone has a
    /// memory ceiling.
    memory: Option<super::memory::ZoneMemory>,
    /// Each worker's directory is a [`super::scratch`]: found possible at
    /// the start.
    mounts: bool,
    /// How many of its workers are not yet wholly ended ([`Live`]).
    live: Arc<watch::Sender<usize>>,
    /// Turns to compile a module in a worker of its own
    /// ([`Pool::load_alone`]): as many at once as the zone has workers.
    compiles: tokio::sync::Semaphore,
    /// Modules compiled again for the zone's cache ([`Pool::rebuild`]).
    rebuilds: AtomicU64,
    /// Starts of a worker that failed ([`Pool::replenish`]).
    start_failures: AtomicU64,
    /// Those since a worker last reported a job: a worker that says hello
    /// and dies before its first job is a failed start too, and its
    /// hello does not make the next start's wait short.
    failed_in_a_row: AtomicU32,
}

/// The runtime every pool's supervisor runs on, and where workers start,
/// threads of their own: nothing the gateway does on its threads (a large
/// response built, a slow request) delays pinging a worker or judging one,
/// so the supervisor's clocks are plain wall clocks. The workers' channels
/// are read and written on the gateway's runtime ([`Pool::spawn_worker`]).
fn channels() -> Result<&'static tokio::runtime::Handle, String> {
    static RUNTIME: std::sync::OnceLock<Result<tokio::runtime::Runtime, String>> =
        std::sync::OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .thread_name("bulkhead-channels")
                .enable_all()
                .build()
                .map_err(|e| format!("cannot start the workers' channel threads: {e}"))
        })
        .as_ref()
        .map(tokio::runtime::Runtime::handle)
        .map_err(Clone::clone)
}

impl Drop for Pool {
    /// Its workers go with it: nothing on the channels' runtime keeps a
    /// pool, or its workers, alive.
    fn drop(&mut self) {
        self.close();
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("zone", &self.config.zone)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct State {
    workers: Vec<Arc<Worker>>,
    modules: HashMap<u64, Arc<Source>>,
    /// Modules whose zone-cache entry a worker found gone or not the
    /// recorded one, and which only a worker that had run a guest compiled
    /// since: compiled alone again at the supervisor's next round
    /// ([`Pool::rebuild`]).
    rebuild: std::collections::HashSet<u64>,
    /// When each module was last compiled again for the cache
    /// ([`Pool::rebuild`]): at most once in [`REBUILD_EVERY`].
    rebuilt: HashMap<u64, Instant>,
    /// Workers loading a module alone ([`Pool::load_alone`]), which
    /// [`Pool::close`] ends with the others.
    compilers: Vec<Arc<Worker>>,
    /// What loading each module took the worker that loaded it alone, at
    /// its peak ([`Pool::load_cost`]).
    load_costs: HashMap<u64, u64>,
    /// What each module, once loaded, kept of the memory of the worker
    /// that loaded it alone from the cache ([`Pool::code`]).
    load_kept: HashMap<u64, u64>,
    /// Workers being started.
    starting: u32,
    /// Workers started ahead of a worker's retirement, sent the modules
    /// the zone's workers hold, and given no job until one retires
    /// ([`Pool::round`]): at most as many as the zone keeps.
    successors: Vec<Arc<Worker>>,
    /// When a job of each module was last placed on a worker: a
    /// successor is sent those placed within [`WARM_WITHIN`].
    placed: HashMap<u64, Instant>,
    /// When the next start of a worker may begin, after a failed one
    /// ([`start_backoff`]).
    start_after: Option<Instant>,
}

/// What a job's run fails with when it had no room or place by its
/// [`crate::runner::Queued::place_by`].
pub const NOT_PLACED: &str = "no room or place for the job by its deadline";

/// Frames queued for one worker and not yet written, at most. Every frame
/// the gateway sends a worker either carries work (a load, a job, bounded
/// by config) or answers something the worker sent (a credit, a call's
/// response frames, bounded per call by its window); a worker that stops
/// reading its channel while it keeps the gateway answering would
/// otherwise grow the gateway's memory without end. Twice what the calls a
/// worker may have in flight can queue (each at most a head, an end, and
/// as many body frames and credits as its windows hold: 512; 128 calls),
/// so that calls alone never fault a worker whose reader keeps up.
pub const MAX_QUEUED_FRAMES: usize = 131_072;

/// The gateway's way down to one worker ([`Link`]): at most
/// [`MAX_QUEUED_FRAMES`] frames wait unwritten; past it a frame is dropped
/// and the link marked overflowed, and the supervisor faults the worker.
/// What it sends that the worker answers is counted
/// ([`super::asked::Asked`]).
struct Outbox(Arc<Link>, super::asked::Asked);

impl Outbox {
    /// Sends `frame` (written by this thread if the socket takes it),
    /// unless the worker has stopped taking frames; whether it went or
    /// waits. A failed socket is the reader's to find.
    fn send(&self, frame: Down) -> bool {
        self.send_ending(frame).is_some()
    }

    /// [`Outbox::send`], telling where the frame ends in what is written
    /// to the worker ([`Link::send_ending`]).
    fn send_ending(&self, frame: Down) -> Option<u64> {
        self.1.sending(&frame);
        let end = self.0.send_ending(frame, |_| None).ok().flatten();
        end.filter(|_| !self.0.overflowed())
    }

    fn overflowed(&self) -> bool {
        self.0.overflowed()
    }
}

struct Worker {
    pid: u32,
    /// Its directory, held open: read as [`Worker::dir`].
    dir_fd: std::os::fd::OwnedFd,
    /// Its name in the zone's held directory, which removes it; none for
    /// a scratch directory, which goes with its last descriptor.
    name: Option<String>,
    zone_dir: Root,
    /// Its part of the zone's disk, and the scratch mount its directory is
    /// the root of, held as long as the worker is.
    disk: Option<super::disk::WorkerDisk>,
    down: Outbox,
    calls: GatewayCalls,
    state: Mutex<WorkerState>,
    /// When it last spoke, as far as the gateway can tell: when what it
    /// said came, not when it was read.
    hearing: Mutex<super::heard::Hearing>,
    /// How many bytes of its channel the gateway has taken.
    taken: Arc<std::sync::atomic::AtomicU64>,
    /// Whether the supervisor's last round excused it, the gateway being
    /// behind with it.
    excused: std::sync::atomic::AtomicBool,
    /// When the supervisor last found that the worker had read more of
    /// what was written to it, and how much it had read then
    /// ([`READ_LATELY`]).
    read: Mutex<(Instant, u64)>,
    /// Since when what was written to it (or waits to be) has waited with
    /// none of it read ([`Pool::round`]): none while it owes nothing.
    owing: Mutex<Option<Instant>>,
    /// Where what had been sent to it ended at each round that found more
    /// sent, and when, oldest first, until it has read that far
    /// ([`READ_WITHIN`]).
    marks: Mutex<std::collections::VecDeque<(u64, Instant)>>,
    /// The gateway's end of the channel, a second descriptor of it: what
    /// waits in it unread ([`Worker::unread`]).
    channel: std::os::fd::OwnedFd,
    child: Mutex<Option<WorkerProcess>>,
    ceiling: Option<super::cgroup::MemoryCeiling>,
    /// Its share of the CPU, where the host offers cgroups.
    share: Option<super::cgroup::CpuShare>,
    /// Its place among its pool's workers not yet wholly ended.
    live: Option<Live>,
    /// Told once it has wholly ended (its process reaped, its directory
    /// and its cgroup removed), where someone waits for that.
    gone: Mutex<Option<oneshot::Sender<()>>>,
}

/// A worker's place among its pool's workers not yet wholly ended
/// ([`Pool::ended`]): left once its process is reaped and its directory
/// and cgroup are removed, on the thread [`Worker::drop`] starts.
/// Counted from its process's start, among this process's too
/// ([`all_ended`]).
struct Live(Arc<watch::Sender<usize>>);

impl Live {
    fn new(count: &Arc<watch::Sender<usize>>) -> Self {
        count.send_modify(|n| *n += 1);
        everywhere().send_modify(|n| *n += 1);
        Self(Arc::clone(count))
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
        everywhere().send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// How many workers of every pool of this process are not yet wholly
/// ended.
fn everywhere() -> &'static watch::Sender<usize> {
    static LIVE: std::sync::OnceLock<watch::Sender<usize>> = std::sync::OnceLock::new();
    LIVE.get_or_init(|| watch::Sender::new(0))
}

/// Once every worker this process started has wholly ended (its process
/// reaped, its directory and cgroup removed): what a process stopped while
/// its service was starting waits for (bounded) before it exits, its pools
/// gone with the start.
pub async fn all_ended() {
    let _ = everywhere().subscribe().wait_for(|n| *n == 0).await;
}

#[derive(Default)]
struct WorkerState {
    /// Modules sent to it, with the artifact record each was sent with.
    loaded: HashMap<u64, Option<Artifact>>,
    /// Modules of `loaded` it said it compiled (its `Loaded`): their jobs
    /// have no compile to wait for ([`START_LOADED`]).
    compiled: std::collections::HashSet<u64>,
    /// Modules it was asked to hand the compiled code of over (only a
    /// worker started to load one module alone is, [`Pool::load_alone`]),
    /// until its `Loaded`: the only artifacts taken from it.
    asked_to_hand_over: std::collections::HashSet<u64>,
    loads: HashMap<u64, Vec<oneshot::Sender<Result<LoadInfo, LoadError>>>>,
    jobs: HashMap<u64, Pending>,
    /// Places given to jobs whose specs are still being read
    /// ([`Pool::run_loaded`]): not sent yet, but counted as running.
    placed: usize,
    started: u32,
    retiring: bool,
    /// Why it failed, once it has.
    fault: Option<String>,
    /// What each job placed on it can take of its memory, and its tenant,
    /// until the job ends ([`super::memory`]).
    weighed: HashMap<u64, (u64, Arc<str>)>,
    /// What its cgroup found it holding beyond its base, its jobs' weights
    /// and its files when last looked ([`Pool::round`]): counted as held
    /// until it is looked at again.
    residue: u64,
    /// What the compiled code of the modules sent to it takes of its
    /// memory ([`super::memory::code`]).
    code: u64,
    /// Modules it is loading, or will load for a job placed on it, and
    /// what loading each takes ([`Pool::load_cost`]), with how many placed
    /// jobs that have not been sent yet count on it: held until the
    /// module's `Loaded` (or until no job that would send it is left).
    warming: HashMap<u64, (u64, usize)>,
    /// What it may use of the CPU for its jobs' time, against what it
    /// used ([`Pool::burns_beyond_its_jobs`]).
    cpu: CpuLedger,
    /// Where in what is written to it each `Run` of an ended job ends
    /// that had not left the gateway when the job ended (cancelled, or
    /// reported by a worker that never read it): such a job keeps its
    /// place until its `Run` is written ([`WorkerState::ended`]).
    unsent: Vec<u64>,
}

/// A worker's CPU, against what its jobs' time allows
/// ([`Pool::burns_beyond_its_jobs`]).
#[derive(Default)]
struct CpuLedger {
    /// When the supervisor last looked, and its processes' CPU time then.
    seen: Option<(Instant, Duration)>,
    /// Time its jobs that ended since then spent in it since then.
    ended: Duration,
    /// Since when (a round) it has been loading modules without a break.
    loading: Option<Instant>,
    /// What it may still use: what its jobs' time and its rest allowed
    /// and it did not use, at most [`CPU_SAVED_AT_MOST`].
    saved: Duration,
    /// What it used beyond that.
    owed: Duration,
}

impl CpuLedger {
    /// A job sent at `sent` ends now.
    fn ended(&mut self, sent: Instant) {
        let from = self.seen.map_or(sent, |(at, _)| sent.max(at));
        self.ended = self
            .ended
            .saturating_add(Instant::now().saturating_duration_since(from));
    }

    /// What a round of `elapsed` allows a worker: [`JOB_CPU`] for each
    /// second of its jobs' time in it (`jobs`: those that ended in the
    /// round and those still in it, each from the round's start) and of
    /// its `loading`, and [`REST_CPU`]. No more of its jobs' time counts
    /// than its guest threads can run: jobs waiting for one run nothing
    /// (found by a tester: each job credited for its whole time in the
    /// worker, a compromised one under a stream of concurrent jobs was
    /// allowed as many cores as jobs were waiting in it).
    fn allowed(jobs: Duration, loading: Duration, elapsed: Duration) -> Duration {
        jobs.min(elapsed.saturating_mul(super::GUEST_THREADS))
            .saturating_add(loading)
            .mul_f64(JOB_CPU)
            .saturating_add(elapsed.mul_f64(REST_CPU))
    }

    /// Takes `used` from what it was `allowed` and had saved; what it now
    /// owes.
    fn charge(&mut self, allowed: Duration, used: Duration) -> Duration {
        let has = self.saved.saturating_add(allowed);
        let takes = self.owed.saturating_add(used);
        (self.saved, self.owed) = if has >= takes {
            ((has - takes).min(CPU_SAVED_AT_MOST), Duration::ZERO)
        } else {
            (Duration::ZERO, takes - has)
        };
        self.owed
    }
}

struct Pending {
    reply: oneshot::Sender<Answer>,
    wall_time: Duration,
    /// When the gateway sent it.
    sent: Instant,
    /// Its module.
    module: u64,
    /// How long after `sent` the worker may take to start it: its module
    /// was compiled there when it was sent ([`START_LOADED`]), or not
    /// ([`START_ALLOWANCE`]), until the worker's `Loaded` for its module
    /// cuts that to [`START_LOADED`] from then (`compiled_since`).
    start_within: Duration,
    /// Whether `start_within` was cut so by a `Loaded` after it was sent.
    compiled_since: bool,
    running_since: Option<Instant>,
    /// Where its `Run` ends in what is written to the worker.
    run_end: Option<u64>,
}

/// How a job sent to a worker ends, short of its worker failing.
enum Answer {
    /// The worker's report (`Err`: it could not run the job), and the
    /// files its guest created in `/out`.
    Report(Result<String, String>, super::proto::CreatedFiles),
    /// The gateway stopped it: its own clock for the job ran out, the
    /// job's wall time (`true`) or the worker's time to start it; where
    /// the `Cancel` that told the worker ends in what is written to it.
    Stopped(String, bool, Option<u64>),
}

impl WorkerState {
    /// What its jobs can take of its memory together.
    fn weighed(&self) -> u64 {
        self.weighed
            .values()
            .fold(0, |total, (bytes, _)| total.saturating_add(*bytes))
    }

    /// What its worker is counted as holding beside its base: its jobs'
    /// weights, its modules' code, and `files` (its files in memory).
    fn counted(&self, files: u64) -> u64 {
        self.weighed()
            .saturating_add(self.code)
            .saturating_add(files)
            .saturating_add(
                self.warming
                    .values()
                    .fold(0, |total, (bytes, _)| total.saturating_add(*bytes)),
            )
    }

    fn running(&self) -> usize {
        self.jobs.len() + self.placed + self.unsent.len()
    }

    /// Job `job` ends here, `written` bytes having left the gateway for
    /// the worker: where its `Run` has not, its place stays held until it
    /// has. Cancelled or reported at once, a job gave its place back while
    /// its `Run` (up to 64 MiB of inputs) still waited in the gateway's
    /// queue, and the next job's queued behind it (found by an attacker: a
    /// worker that stopped reading, its tenant submitting and cancelling,
    /// took the gateway 60 MB a job to 2.3 GB).
    fn ended(&mut self, job: u64, written: u64) -> Option<Pending> {
        let pending = self.jobs.remove(&job)?;
        self.cpu.ended(pending.sent);
        if let Some(end) = pending.run_end.filter(|&end| end > written) {
            self.unsent.push(end);
        }
        Some(pending)
    }

    /// Gives back the places of ended jobs whose `Run` has now left the
    /// gateway, `written` bytes having; whether any was.
    fn sent_by(&mut self, written: u64) -> bool {
        let before = self.unsent.len();
        self.unsent.retain(|&end| end > written);
        self.unsent.len() < before
    }

    /// It runs no job, holds no place, and has not failed: a retiring
    /// worker can go.
    fn idle(&self) -> bool {
        self.jobs.is_empty() && self.placed == 0 && self.fault.is_none()
    }

    /// It has been sent no job: no guest has run in it.
    fn pristine(&self) -> bool {
        self.started == 0
    }
}

/// `<cache_dir>.records`: where the gateway keeps its record of a zone's
/// good artifacts, beside the zone's cache (under the gateway's own
/// directory) and outside every directory a worker is handed.
pub fn records_dir(cache_dir: &Path) -> PathBuf {
    let mut name = cache_dir
        .file_name()
        .map(std::ffi::OsStr::to_os_string)
        .unwrap_or_else(|| "zone".into());
    name.push(".records");
    cache_dir.with_file_name(name)
}

/// The artifact to take into the zone's cache and record for a module
/// from a worker's `Loaded`: the one it `reported` handing over, when it
/// `compiled` the module (rather than loading the recorded artifact, which
/// leaves nothing to take), and only when the worker was `pristine` (sent
/// no job yet, and asked to hand this module over: started to load it
/// alone) when the gateway read its answer. A worker that has run a
/// guest may be compromised, and could have written and reported native
/// code of its own; its word is not taken (it keeps using what it
/// compiled itself). Taking the very artifact recorded again mends an
/// entry that was rewritten or removed.
fn recordable(pristine: bool, compiled: bool, reported: Option<&Artifact>) -> Option<&Artifact> {
    reported.filter(|a| pristine && compiled && a.well_formed())
}

/// The most a worker's report of a job of `policy` takes as JSON: its
/// captures, each byte escaped at most six bytes long, and room for the
/// rest (a backtrace is under 4 KiB).
fn report_allowance(policy: &Policy) -> usize {
    let captures = policy
        .limits
        .stdout
        .as_u64()
        .saturating_add(policy.limits.stderr.as_u64());
    usize::try_from(captures.saturating_mul(6))
        .unwrap_or(usize::MAX)
        .saturating_add(64 << 10)
}

/// A worker's report of a job of `policy`, as the gateway reads it, and
/// the files it says the job's guest created: one that names more files
/// than the policy's `output_files`, or is longer than its captures
/// allow ([`report_allowance`]), is a breach of the protocol, told
/// before any of it is read (found by a tester: 2.3 million made-up
/// files, in one frame, took the gateway 0.75 s of CPU for every job).
/// So is one that does not decode, or that gives a failure only the
/// gateway gives (the host's, or the worker's own; found by an attacker:
/// a worker's `host` failure was stored as the host's, for operators and
/// the host's failure counts to see).
fn gateways_to_read(
    json: &str,
    created: &super::proto::CreatedFiles,
    policy: &Policy,
) -> Result<(JobReport, crate::sandbox::outputs::Created), String> {
    let allowed = policy.limits.output_files as usize;
    match created.count() {
        None => return Err("sent a list of created files that is not whole records".into()),
        Some(n) if n > allowed => {
            return Err(format!(
                "said its job created {n} files, more than the {allowed} entries its policy allows"
            ));
        }
        Some(_) => {}
    }
    let most = report_allowance(policy);
    if json.len() > most {
        return Err(format!(
            "sent a report of {} bytes, more than its job's captures allow ({most})",
            json.len()
        ));
    }
    let report = JobReport::decode(json).map_err(|e| {
        format!(
            "sent an unreadable report: {}",
            crate::sandbox::shown_within(&e.to_string(), MAX_MESSAGE)
        )
    })?;
    match report.failure.as_ref().map(|f| &f.kind) {
        Some(kind @ (crate::job::FailureKind::Host | crate::job::FailureKind::Worker)) => Err(
            format!("sent a report of a failure only the gateway gives ({kind:?})"),
        ),
        _ => Ok((report, created.unpack())),
    }
}

/// Bytes written to a socket that its peer has not read yet (`SIOCOUTQ`).
fn unread_by_peer(socket: &std::os::fd::OwnedFd) -> Option<u64> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ's number) writes one c_int through the
    // pointer, which points at `n`; the descriptor is open while borrowed.
    let r = unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    (r == 0).then(|| u64::try_from(n).unwrap_or(0))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a job asks of a worker before it is sent: its room in the
/// worker's directory ([`super::disk`]) and what it can take of the
/// worker's memory besides ([`super::memory`]).
#[derive(Clone, Copy, Debug)]
struct Wants {
    job: u64,
    /// Its module: loading it on a worker that has not yet takes memory
    /// too ([`Pool::load_cost`]).
    module: u64,
    room: u64,
    memory: u64,
}

impl Pool {
    /// Starts the zone's workers and waits until each has said hello with
    /// every required layer active.
    ///
    /// # Errors
    /// [`PoolError`] when a worker cannot be started or lacks a layer.
    pub async fn start(
        config: PoolConfig,
        faults: impl Fn(Fault) + Send + Sync + 'static,
    ) -> Result<Arc<Self>, PoolError> {
        let zone_dir = match &config.work_held {
            Some(held) => Ok(held.clone()),
            None => prepare_dir(&config.work_dir, None, 0o700)
                .and_then(|()| Root::open(&config.work_dir)),
        }
        .map_err(|e| PoolError::Start {
            zone: config.zone.clone(),
            reason: format!("work directory {}: {e}", config.work_dir.display()),
        })?;
        {
            let zone = &config.zone[..config.zone.floor_char_boundary(40)];
            let removed = super::cgroup::remove_left(&format!("{zone}-"));
            if removed > 0 {
                tracing::info!(zone = %config.zone, removed, "removed cgroups earlier workers left behind");
            }
        }
        let memory = match config.memory {
            Some(ceiling) => Some(
                super::memory::ZoneMemory::new(ceiling, config.max_concurrent_jobs).ok_or_else(
                    || PoolError::Start {
                        zone: config.zone.clone(),
                        reason: format!(
                            "a worker's memory ceiling of {ceiling} bytes leaves its jobs nothing: a worker holds {} bytes whatever it runs ({} for itself and {} for each of its {} places); raise `[zones.{}] memory` or lower `queue.workers`",
                            super::memory::ZoneMemory::base(config.max_concurrent_jobs),
                            super::memory::WORKER_BASE,
                            super::memory::per_place(),
                            config.max_concurrent_jobs.max(1),
                            config.zone,
                        ),
                    },
                )?,
            ),
            None => None,
        };
        let group = cache_group(config.run_as);
        let (cache, records_fd) =
            open_zone_cache(&config, group).map_err(|e| PoolError::Start {
                zone: config.zone.clone(),
                reason: format!("cache directory {}: {e}", config.cache_dir.display()),
            })?;
        let records = records_dir(&config.cache_dir);
        if records.starts_with(&config.cache_dir) || records.starts_with(&config.work_dir) {
            return Err(PoolError::Start {
                zone: config.zone.clone(),
                reason: format!(
                    "the artifact records {} would lie where workers reach",
                    records.display()
                ),
            });
        }
        let records =
            ArtifactRecords::held(records_fd, &records).map_err(|e| PoolError::Start {
                zone: config.zone.clone(),
                reason: format!("artifact records: {e}"),
            })?;
        // What an earlier version's workers, or an earlier run under
        // another user, left in the cache is cleared away: only the
        // recorded artifacts the gateway wrote stay.
        repair_cache(&cache, &records, group).map_err(|e| PoolError::Start {
            zone: config.zone.clone(),
            reason: format!("cache directory {}: {e}", config.cache_dir.display()),
        })?;
        let channels = channels().map_err(|reason| PoolError::Start {
            zone: config.zone.clone(),
            reason,
        })?;
        let mounts = config.disk.is_some_and(|size| {
            match super::scratch::make(super::disk::FLOOR, None) {
                Ok(_) => {
                    tracing::info!(zone = %config.zone, bytes = size, "each worker's directory is a file system of its own, as large as its jobs' rooms (an inode per page), all within the zone's disk");
                    true
                }
                Err(e) => {
                    tracing::warn!(zone = %config.zone, bytes = size, error = %e, "workers' directories are plain directories: a tmpfs of their own cannot be mounted (the gateway needs CAP_SYS_ADMIN); jobs are still given room within the zone's disk, which only their quotas hold them to");
                    false
                }
            }
        });
        let disk = config.disk.map(|size| {
            let mut disk = super::disk::ZoneDisk::new(size);
            if let Some(memory) = &memory {
                disk.per_worker = size.min(memory.budget);
            }
            Arc::new(disk)
        });
        let compiles = tokio::sync::Semaphore::new(config.workers.max(1) as usize);
        let pool = Arc::new(Self {
            config,
            state: Mutex::default(),
            changed: Arc::default(),
            dying: Arc::default(),
            weakened: Arc::default(),
            ids: AtomicU64::new(1),
            closing: AtomicBool::new(false),
            faults: Arc::new(faults),
            applied: Mutex::default(),
            records: Arc::new(records),
            cache,
            gateway: tokio::runtime::Handle::current(),
            zone_dir,
            disk,
            memory,
            mounts,
            live: Arc::new(watch::Sender::new(0)),
            compiles,
            rebuilds: AtomicU64::new(0),
            start_failures: AtomicU64::new(0),
            failed_in_a_row: AtomicU32::new(0),
        });
        for _ in 0..pool.config.workers.max(1) {
            // Started on the pools' runtime, as replacements are (its
            // channel is the gateway's runtime's to read and write).
            // A worker started is the pool's at once, there, so that it
            // goes with the pool however soon the start is given up; and
            // a start given up ends the task (found by an attacker: a stop
            // while the first workers said hello left one running and
            // unreaped at exit, with its cgroup).
            let starting = Arc::clone(&pool);
            let mut task = AbortOnDrop(channels.spawn(async move {
                let worker = starting.spawn_worker().await?;
                lock(&starting.state).workers.push(worker);
                Ok::<(), PoolError>(())
            }));
            (&mut task.0).await.map_err(|e| PoolError::Start {
                zone: pool.config.zone.clone(),
                reason: format!("starting a worker failed: {e}"),
            })??;
        }
        channels.spawn(Self::supervise(
            Arc::downgrade(&pool),
            Arc::clone(&pool.weakened),
        ));
        Ok(pool)
    }

    /// The zone.
    pub fn zone(&self) -> &str {
        &self.config.zone
    }

    /// The layers the zone's workers report.
    pub fn applied(&self) -> Applied {
        lock(&self.applied).clone()
    }

    /// The zone's disk, which its workers' directories, each a file
    /// system of its own ([`super::scratch`]), hold at most together;
    /// `None` where they are plain directories.
    pub fn disk(&self) -> Option<u64> {
        self.disk.as_ref().filter(|_| self.mounts).map(|d| d.size)
    }

    /// Bytes of the zone's disk given to its jobs' files now.
    pub fn disk_given(&self) -> u64 {
        self.disk.as_ref().map_or(0, |d| d.given())
    }

    /// Live workers' process ids.
    pub fn pids(&self) -> Vec<u32> {
        lock(&self.state).workers.iter().map(|w| w.pid).collect()
    }

    /// Successor workers' process ids: started ahead of a worker's retirement,
    /// running no job until one retires.
    pub fn successor_pids(&self) -> Vec<u32> {
        lock(&self.state).successors.iter().map(|w| w.pid).collect()
    }

    /// How many modules the zone's worker (or successor) `pid` has said it
    /// compiled, of those sent to it; `None` for no such worker.
    pub fn compiled_in(&self, pid: u32) -> Option<usize> {
        self.all_workers()
            .iter()
            .find(|w| w.pid == pid)
            .map(|w| lock(&w.state).compiled.len())
    }

    /// How many times a module has been compiled again for the zone's
    /// cache ([`Pool::rebuild`]).
    pub fn rebuilds(&self) -> u64 {
        self.rebuilds.load(Ordering::SeqCst)
    }

    /// Starts of a worker that failed in a row while the zone has no live
    /// worker: its jobs wait for a start that may never succeed (0 while
    /// it has one, or its last start succeeded).
    pub fn failing_starts(&self) -> u32 {
        if Self::live(&lock(&self.state)) > 0 {
            0
        } else {
            self.failed_in_a_row.load(Ordering::SeqCst)
        }
    }

    /// How many starts of a worker (to keep the zone's count, or a
    /// successor) have failed.
    pub fn start_failures(&self) -> u64 {
        self.start_failures.load(Ordering::SeqCst)
    }

    /// How many modules have been sent to the zone's worker (or
    /// successor) `pid`; `None` for no such worker.
    pub fn sent_to(&self, pid: u32) -> Option<usize> {
        self.all_workers()
            .iter()
            .find(|w| w.pid == pid)
            .map(|w| lock(&w.state).loaded.len())
    }

    /// The zone's workers, its successors among them.
    fn all_workers(&self) -> Vec<Arc<Worker>> {
        let st = lock(&self.state);
        st.workers.iter().chain(&st.successors).cloned().collect()
    }

    /// Jobs running on this pool's workers whose worker has said their
    /// guest started (its `Running`): the jobs the gateway's wall-time
    /// clock is running for.
    pub fn jobs_started(&self) -> usize {
        let workers = lock(&self.state).workers.clone();
        workers
            .iter()
            .map(|w| {
                lock(&w.state)
                    .jobs
                    .values()
                    .filter(|p| p.running_since.is_some())
                    .count()
            })
            .sum()
    }

    /// Bytes of frames the gateway holds for its workers that have not
    /// left it yet.
    pub fn queued_for_workers(&self) -> u64 {
        let workers = self.all_workers();
        workers.iter().map(|w| w.down.0.queued()).sum()
    }

    /// What the zone's workers are counted as holding for module loads
    /// sent to them (or to be sent by a job placed there) and not yet
    /// answered ([`WorkerState::warming`]).
    pub fn loads_held(&self) -> u64 {
        let workers = self.all_workers();
        workers
            .iter()
            .flat_map(|w| {
                lock(&w.state)
                    .warming
                    .values()
                    .map(|(bytes, _)| *bytes)
                    .collect::<Vec<_>>()
            })
            .fold(0, u64::saturating_add)
    }

    /// Stops every worker (at shutdown).
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let (workers, compilers, successors) = {
            let mut st = lock(&self.state);
            (
                std::mem::take(&mut st.workers),
                std::mem::take(&mut st.compilers),
                std::mem::take(&mut st.successors),
            )
        };
        for worker in workers.iter().chain(&compilers).chain(&successors) {
            worker.kill();
        }
    }

    /// Once every worker it started has wholly ended: its process reaped,
    /// its directory and its cgroup removed. After [`Pool::close`], what a
    /// stopping service waits for (bounded), so that it leaves no cgroup
    /// behind.
    pub async fn ended(&self) {
        let _ = self.live.subscribe().wait_for(|n| *n == 0).await;
    }

    fn next_id(&self) -> u64 {
        self.ids.fetch_add(1, Ordering::Relaxed)
    }

    /// Registers a module (already checked against its policy by the
    /// gateway: size, pin, kind, limits) and has it loaded once, which
    /// also fills the zone's cache for every worker. Returns its id.
    ///
    /// A module the zone's cache has no recorded artifact for is compiled
    /// by a worker started for that alone ([`Pool::load_alone`]); one
    /// whose artifact is recorded is loaded by a worker of the pool. A
    /// module whose compiled code the cache could not take is refused:
    /// every worker sent one of its jobs would compile it again beside
    /// other jobs, in memory nothing weighs (found by an attacker: a
    /// 1.4 MB module whose code was larger than its hand-over room took
    /// 850 MiB to compile in a worker running another tenant's jobs, past
    /// its ceiling, and they failed with it).
    ///
    /// # Errors
    /// The worker's [`LoadError`] (compile or link), or a fault.
    pub async fn load(
        self: &Arc<Self>,
        policy: &Policy,
        wasm: Bytes,
    ) -> Result<(u64, LoadInfo), LoadError> {
        let module = self.next_id();
        let source = Arc::new(Source {
            name: policy.module.name.to_string(),
            digest: Sha256Hex::digest(&wasm),
            policy_json: serde_json::to_string(policy).map_err(|e| LoadError::Compile {
                module: policy.module.name.to_string(),
                message: format!("unencodable policy: {e}"),
            })?,
            policy_sha256: policy.source_sha256.as_ref().map(ToString::to_string),
            wasm,
        });
        if let Some(disk) = &self.disk {
            let most = super::disk::most(policy);
            if most > disk.size {
                return Err(LoadError::ExceedsZoneDisk {
                    module: policy.module.name.to_string(),
                    zone: self.config.zone.clone(),
                    need: most,
                    disk: disk.size,
                });
            }
        }
        self.fits_in_memory(policy, &source, None)?;
        lock(&self.state)
            .modules
            .insert(module, Arc::clone(&source));
        let loaded = self
            .load_alone(module, &policy.module.name.to_string())
            .await
            .and_then(|info| {
                if self.records.get(&source.digest).is_some() {
                    return Ok(info);
                }
                Err(LoadError::Compile {
                    module: policy.module.name.to_string(),
                    message: format!(
                        "its compiled code could not be kept in zone `{}`'s cache: it is larger than the {} bytes a module of {} bytes may compile to, or the zone's disk had no room for it; a module is run only from code compiled apart from other jobs",
                        self.config.zone,
                        super::disk::hand_over_room(source.wasm.len() as u64),
                        source.wasm.len()
                    ),
                })
            });
        // What a worker of the zone takes to load it is measured where it
        // takes that, from the cache: a compile takes more, and only the
        // worker that loaded it alone compiles.
        let loaded = match loaded {
            Ok(info) if !info.from_cache => self
                .load_alone(module, &policy.module.name.to_string())
                .await
                .map(|_| info),
            other => other,
        };
        // With its compiled code's real size and its load's cost now
        // known, it is weighed again.
        let loaded = loaded.and_then(|info| {
            self.fits_in_memory(policy, &source, Some(module))
                .map(|()| info)
        });
        match loaded {
            Ok(info) => {
                self.warm(module).await;
                Ok((module, info))
            }
            Err(e) => {
                lock(&self.state).modules.remove(&module);
                Err(e)
            }
        }
    }

    /// Sends loaded `module` to each of the zone's workers that runs no
    /// job, where it fits beside what that worker holds, and waits for
    /// their loads: its jobs then find it loaded (as a service's first
    /// jobs do, its modules loaded at its start) instead of waiting for
    /// it. Until its `Loaded`, each such load is counted as held by its
    /// worker ([`WorkerState::warming`]), so no job placed meanwhile takes
    /// that memory.
    async fn warm(&self, module: u64) {
        let workers = self.all_workers();
        let mut loads = Vec::new();
        for worker in workers {
            if let Some(rx) = self.send_warm(&worker, module) {
                loads.push((worker, rx));
            }
        }
        // A worker that has not answered in the time a compile may take is
        // an overrun, as one compiling alone is: left alone it kept the
        // load counted as held for its life, and took no job it would not
        // fit beside (a zone's only worker, the zone's).
        let deadline = tokio::time::Instant::now() + START_ALLOWANCE;
        for (worker, load) in loads {
            if tokio::time::timeout_at(deadline, load).await.is_err() {
                let reason = format!("did not compile a module in {}s", START_ALLOWANCE.as_secs());
                self.fault(&worker, "overrun", reason);
            }
        }
    }

    /// Sends `module` to `worker` where it runs no job, has not been sent
    /// it, and it fits beside what the worker holds (counted as held until
    /// its `Loaded`): the answer to wait for.
    fn send_warm(
        &self,
        worker: &Worker,
        module: u64,
    ) -> Option<oneshot::Receiver<Result<LoadInfo, LoadError>>> {
        let cost = self.load_cost(&lock(&self.state), module);
        let (tx, rx) = oneshot::channel();
        {
            let mut ws = lock(&worker.state);
            let fits = self.memory.as_ref().is_none_or(|memory| {
                ws.counted(0)
                    .saturating_add(ws.residue)
                    .saturating_add(cost)
                    <= memory.budget
            });
            if !ws.idle() || ws.retiring || ws.loaded.contains_key(&module) || !fits {
                return None;
            }
            ws.warming.insert(module, (cost, 0));
            ws.loads.entry(module).or_default().push(tx);
        }
        // Nothing it compiles is taken into the zone's cache: a worker
        // sent several modules may have been broken into by compiling an
        // earlier one (only a worker started for one module compiles it
        // for the cache, `Pool::load_alone`). One that finds an entry gone
        // has it compiled again that way (`Pool::rebuild`).
        self.send_load(worker, module, false, false);
        Some(rx)
    }

    /// What loading `module` takes a worker of the zone, where it has a
    /// memory ceiling: the peak of the worker that loaded it alone (the
    /// wasm received, hashed, parsed, adapted, compiled or its artifact
    /// read in; more than a worker that loads it from the cache takes),
    /// else four times its bytes (found by an attacker: a 64 MiB module
    /// of one custom section, 28 KB of code once compiled, took each
    /// worker 180 MiB to load beside its jobs, counted as its code alone,
    /// and ten of them killed a worker with another tenant's job).
    fn load_cost(&self, st: &State, module: u64) -> u64 {
        st.load_costs.get(&module).copied().unwrap_or_else(|| {
            st.modules
                .get(&module)
                .map_or(0, |s| (s.wasm.len() as u64).saturating_mul(4))
        })
    }

    /// What `module` (`source`, sent with `artifact`) takes of a worker's
    /// memory once loaded, for as long as the worker keeps it: its code
    /// as [`super::memory::code`] counts it, or what it kept of the worker
    /// that loaded it alone from the cache, where that is more (the
    /// module's types, names and tables as the runtime holds them, which
    /// its artifact's length need not bound).
    fn code(st: &State, module: Option<u64>, source: &Source, artifact: Option<&Artifact>) -> u64 {
        let kept = module.and_then(|m| st.load_kept.get(&m).copied());
        super::memory::code(source.wasm.len() as u64, artifact).max(kept.unwrap_or(0))
    }

    /// Whether, where the zone has a memory ceiling, a worker holds what a
    /// job of `policy` may take beside the compiled code of every module of
    /// the zone, `source`'s among them (already registered as `module`, or
    /// not yet): a worker may be sent all of them.
    fn fits_in_memory(
        &self,
        policy: &Policy,
        source: &Source,
        module: Option<u64>,
    ) -> Result<(), LoadError> {
        let Some(memory) = &self.memory else {
            return Ok(());
        };
        let code = {
            let st = lock(&self.state);
            st.modules
                .iter()
                .filter(|(id, _)| Some(**id) != module)
                .map(|(id, s)| Self::code(&st, Some(*id), s, self.records.get(&s.digest).as_ref()))
                .fold(0u64, u64::saturating_add)
                .saturating_add(Self::code(
                    &st,
                    module,
                    source,
                    self.records.get(&source.digest).as_ref(),
                ))
        };
        // And, once it is loaded, what loading it takes a worker that has
        // not yet, beside one of its jobs.
        let load = module.map_or(0, |m| self.load_cost(&lock(&self.state), m));
        let need = super::memory::most(policy)
            .saturating_add(self.room_in_memory(policy))
            .saturating_add(code)
            .saturating_add(load);
        if need > memory.budget {
            return Err(LoadError::ExceedsWorkerMemory {
                module: policy.module.name.to_string(),
                zone: self.config.zone.clone(),
                need,
                most: memory.budget,
            });
        }
        Ok(())
    }

    /// Loads registered `module` (named `name` in errors) in a worker
    /// started for it and ended after it: it compiles the module and hands
    /// the artifact over for the zone's cache, or loads the artifact the
    /// cache records. No job is ever placed on that worker: what the load
    /// takes, up to the worker's memory ceiling and [`START_ALLOWANCE`],
    /// is no other job's to lose, and a load past the ceiling ends that
    /// worker alone (a fault with no jobs). Its cgroup's peak is what the
    /// module's load is then counted for in the zone's workers
    /// ([`Pool::load_cost`]). As many load at once as the zone has
    /// workers; a turn is waited for [`START_ALLOWANCE`] at most.
    async fn load_alone(self: &Arc<Self>, module: u64, name: &str) -> Result<LoadInfo, LoadError> {
        let fail = |message: String| LoadError::Compile {
            module: name.to_owned(),
            message,
        };
        let _turn = match tokio::time::timeout(START_ALLOWANCE, self.compiles.acquire()).await {
            Ok(Ok(turn)) => turn,
            Ok(Err(_)) => return Err(fail("the service is shutting down".into())),
            Err(_) => {
                return Err(fail(format!(
                    "zone `{}` had no turn to compile it for {}s: other modules were compiling",
                    self.config.zone,
                    START_ALLOWANCE.as_secs()
                )));
            }
        };
        if self.closing.load(Ordering::SeqCst) {
            return Err(fail("the service is shutting down".into()));
        }
        // Under the zone's ceiling; in a zone without one, under
        // `COMPILE_CEILING` all the same: a module of a few hundred KB can
        // make Cranelift take gigabytes, which nothing else bounds.
        let worker = self
            .spawn_worker_within(Some(self.config.memory.unwrap_or(COMPILE_CEILING)))
            .await
            .map_err(|e| fail(format!("no worker could be started to compile it: {e}")))?;
        {
            let mut st = lock(&self.state);
            if self.closing.load(Ordering::SeqCst) {
                drop(st);
                lock(&worker.state).fault = Some("the service is shutting down".into());
                worker.kill();
                return Err(fail("the service is shutting down".into()));
            }
            st.compilers.push(Arc::clone(&worker));
        }
        let (tx, rx) = oneshot::channel();
        lock(&worker.state)
            .loads
            .entry(module)
            .or_default()
            .push(tx);
        // What it holds before the load, its base: what it holds once
        // loaded, beyond that, is what the module keeps of a worker.
        let before = worker.ceiling.as_ref().and_then(|c| c.used());
        self.send_load(&worker, module, true, false);
        let result = match tokio::time::timeout(START_ALLOWANCE, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(fail(format!(
                "the worker compiling it failed: {}",
                worker.fault_reason()
            ))),
            Err(_) => {
                let reason = format!("did not compile in {}s", START_ALLOWANCE.as_secs());
                self.fault(&worker, "overrun", reason.clone());
                Err(fail(format!("the worker {reason}")))
            }
        };
        // What its cgroup took at most, its base among it: what loading
        // the module takes a worker, at most.
        let peak = worker.ceiling.as_ref().and_then(|c| c.peak());
        let kept = before
            .zip(worker.ceiling.as_ref().and_then(|c| c.used()))
            .map(|(before, after)| after.saturating_sub(before));
        // Its work is done: it goes, and its end is no fault.
        {
            let mut st = lock(&self.state);
            st.compilers.retain(|w| !Arc::ptr_eq(w, &worker));
            if result.is_ok() {
                if let Some(peak) = peak {
                    st.load_costs.insert(module, peak);
                }
                if let Some(kept) = kept {
                    st.load_kept.insert(module, kept);
                }
            }
        }
        lock(&worker.state)
            .fault
            .get_or_insert_with(|| "loaded its module and ended".into());
        let (gone, ended) = oneshot::channel();
        *lock(&worker.gone) = Some(gone);
        worker.kill();
        drop(worker);
        // Wholly ended before the load is answered: nothing of it (its
        // process, its directory, its cgroup) outlives the load.
        let _ = tokio::time::timeout(HELLO_TIMEOUT, ended).await;
        result
    }

    /// Sends `module` to `worker` unless it was sent before. With
    /// `hand_over` (a load the gateway waits for, not one before a job),
    /// where the worker has run no job: should it compile the module (no
    /// record, or the cache's entry not the recorded one), it hands the
    /// artifact over, in room the gateway gives it for that
    /// ([`super::disk::hand_over_room`]); otherwise it hands nothing over.
    /// With `placed` (a job placed on `worker` is about to be sent), that
    /// job no longer counts on the load ([`WorkerState::warming`]): sent,
    /// by it or before, the load is held until its `Loaded`, however soon
    /// the job ends; not sent (the module is gone from the pool), no
    /// `Loaded` will come, and nothing is held for it once no placed job
    /// counts on it.
    fn send_load(&self, worker: &Worker, module: u64, hand_over: bool, placed: bool) {
        let counted = |ws: &mut WorkerState, sent: bool| {
            if !placed {
                return;
            }
            if let Some((_, jobs)) = ws.warming.get_mut(&module) {
                *jobs = jobs.saturating_sub(1);
                if *jobs == 0 && !sent {
                    ws.warming.remove(&module);
                }
            }
        };
        {
            let mut ws = lock(&worker.state);
            if ws.loaded.contains_key(&module) {
                counted(&mut ws, true);
                return;
            }
        }
        let source = lock(&self.state).modules.get(&module).cloned();
        let Some(source) = source else {
            counted(&mut lock(&worker.state), false);
            return;
        };
        let artifact = self.records.get(&source.digest);
        let code = Self::code(&lock(&self.state), Some(module), &source, artifact.as_ref());
        // Marked sent and sent under one hold of the worker's state: a job
        // of the module sent by another task that finds it marked is sent
        // after it (found by an attacker: a run sent between the mark and
        // the load failed as "never loaded").
        let mut ws = lock(&worker.state);
        counted(&mut ws, true);
        match ws.loaded.entry(module) {
            // Sent meanwhile.
            std::collections::hash_map::Entry::Occupied(_) => return,
            std::collections::hash_map::Entry::Vacant(place) => {
                place.insert(artifact.clone());
                ws.code = ws.code.saturating_add(code);
            }
        }
        let hand_over = hand_over
            && ws.pristine()
            && worker.disk.as_ref().is_none_or(|disk| {
                let room = super::disk::hand_over_room(source.wasm.len() as u64);
                let given = disk.reserve(super::disk::LOAD_ROOM | module, room, None);
                if !matches!(given, Ok(true)) {
                    tracing::warn!(zone = %self.config.zone, module = %source.digest, bytes = room, "no room in the zone's disk to hand over a compiled module: workers compile it until one is");
                }
                matches!(given, Ok(true))
            });
        if hand_over {
            ws.asked_to_hand_over.insert(module);
        }
        let _ = worker.down.send(Down::Load {
            module,
            policy_json: source.policy_json.clone(),
            policy_sha256: source.policy_sha256.clone(),
            wasm: Blob(source.wasm.clone()),
            artifact,
            hand_over,
        });
        drop(ws);
    }

    /// A load `worker` answered with a failure is no longer marked as
    /// sent to it, nor its code counted: the next job of `module` placed
    /// there sends it again, counted with what loading it takes (left
    /// marked, the worker's later jobs of it failed without a load being
    /// tried, and were counted as needing none).
    fn forget_load(&self, worker: &Worker, module: u64) {
        let sent = {
            let mut ws = lock(&worker.state);
            ws.compiled.remove(&module);
            ws.loaded.remove(&module)
        };
        let Some(sent) = sent else {
            return;
        };
        // Worked out apart from the worker's state: the pool's is never
        // taken while a worker's is held.
        let code = {
            let st = lock(&self.state);
            // The module left the pool: its code stays counted, which
            // over-counts and never under-counts.
            st.modules.get(&module).map_or(0, |source| {
                Self::code(&st, Some(module), source, sent.as_ref())
            })
        };
        let mut ws = lock(&worker.state);
        ws.code = ws.code.saturating_sub(code);
    }

    /// Takes what a worker's `Loaded` says about the zone's cache: says so
    /// when the entry it was sent a record for did not match it, removes
    /// the artifact it handed over unless [`recordable`] takes it, and
    /// returns the taking (a copy into the cache, then the record) to be
    /// run off the async threads before the load is answered.
    fn take_artifact(
        &self,
        worker: &Worker,
        module: u64,
        info: &LoadInfo,
    ) -> Option<impl FnOnce() + Send + 'static> {
        let (pristine, sent, asked) = {
            let mut ws = lock(&worker.state);
            let asked = ws.asked_to_hand_over.remove(&module);
            match ws.loaded.get(&module) {
                Some(sent) => (ws.pristine(), sent.clone(), asked),
                // Never sent to it.
                None => return None,
            }
        };
        let source = lock(&self.state).modules.get(&module).cloned()?;
        if let Some(sent) = &sent
            && !info.from_cache
            && info
                .artifact
                .as_ref()
                .is_none_or(|a| a.engine == sent.engine)
        {
            tracing::warn!(
                zone = %self.config.zone,
                pid = worker.pid,
                module = %source.digest,
                "the zone cache's artifact did not match the gateway's record (rewritten or removed); the worker compiled the module again"
            );
            // Only a worker (or someone with the workers' access) rewrites
            // an entry: worth counting where it is watched.
            metrics::counter!("bulkhead_zone_cache_mismatches_total", "zone" => self.config.zone.clone())
                .increment(1);
            if !(pristine && asked) {
                // What it compiled is not taken (it has been sent a job, or
                // it was not asked to hand it over: a load to warm it): a
                // worker of its own compiles it for the cache
                // ([`Pool::rebuild`]).
                lock(&self.state).rebuild.insert(module);
            }
        }
        let reported = info.artifact.as_ref().filter(|a| a.well_formed())?;
        // Only from a worker asked to hand it over: a worker sent several
        // modules (warmed, a successor) may have been broken into by
        // compiling one, and said it compiled another with code of its own
        // (found by a tester: a successor's forged `Loaded` had another
        // module's code recorded for a module, and another tenant's jobs
        // ran it, across a restart).
        let Some(artifact) =
            recordable(pristine && asked, !info.from_cache, Some(reported)).cloned()
        else {
            // Not taken: what it left in its directory goes.
            let _ = rustix::fs::unlinkat(
                &worker.dir_fd,
                reported.handoff_name().as_str(),
                rustix::fs::AtFlags::empty(),
            );
            return None;
        };
        let from = match worker.dir_fd.try_clone() {
            Ok(fd) => fd,
            Err(e) => {
                tracing::warn!(zone = %self.config.zone, error = %e, "cannot take a compiled module into the zone's cache");
                return None;
            }
        };
        let (records, cache) = (Arc::clone(&self.records), self.cache.clone());
        let (zone, group, pid) = (
            self.config.zone.clone(),
            cache_group(self.config.run_as),
            worker.pid,
        );
        Some(
            move || match crate::sandbox::take_handoff(&from, cache.fd(), &artifact, group) {
                Ok(()) => {
                    if let Err(e) = records.put(&source.digest, &artifact) {
                        tracing::warn!(%zone, dir = %records.path().display(), error = %e, "cannot write a compiled-module record");
                    }
                }
                Err(e) => {
                    tracing::warn!(%zone, pid, module = %source.digest, error = %e, "a compiled module was not taken into the zone's cache; workers compile it until one is");
                }
            },
        )
    }

    /// The zone's places: the guests it runs at once, at most.
    fn places(&self) -> usize {
        self.config.workers.max(1) as usize * self.config.max_concurrent_jobs.max(1) as usize
    }

    /// A worker that can take a job now: alive, not retiring, with a free
    /// place (and the zone's guests fewer than its places), and with
    /// `room` (job, bytes) given to the job in its directory out of the
    /// zone's disk, in the job's turn; waits for one (a replacement, room
    /// released) otherwise. The least busy such worker is taken; not one
    /// whose directory holds files beyond its jobs' rooms (and its released
    /// jobs' while their directories are there), whose room it would count
    /// as the new job's. With `room`, the place is the job's from then
    /// (`WorkerState::placed`, given back by its [`Placed`]).
    ///
    /// The job's turn is `queued.tenant`'s; `queued.waiting` is told once
    /// the job waits (for room, or for a place), and again once it no
    /// longer does.
    async fn pick(
        &self,
        wants: Option<Wants>,
        queued: crate::runner::Queued<'_>,
    ) -> Result<Arc<Worker>, String> {
        let freed = self.disk.as_ref().map(|d| &d.freed);
        let turn = match (wants, &self.disk) {
            (Some(w), Some(disk)) => Some(disk.turn(w.room, queued.tenant)),
            _ => None,
        };
        // Its room is memory where it is a tmpfs's.
        let room_in_memory = |w: Wants| if self.mounts { w.room } else { 0 };
        let memory_turn = match (wants, &self.memory) {
            (Some(w), Some(memory)) => {
                Some(memory.turn(w.memory.saturating_add(room_in_memory(w)), queued.tenant))
            }
            _ => None,
        };
        let told = WaitTold {
            waiting: queued.waiting,
            told: std::cell::Cell::new(false),
        };
        loop {
            if self.closing.load(Ordering::SeqCst) {
                return Err("the service is shutting down".into());
            }
            let changed = self.changed.notified();
            let room_freed = freed.map(Notify::notified);
            {
                let st = lock(&self.state);
                // The zone's places bound its guests at once, the jobs of
                // retiring workers among them: each worker replaced per
                // job (`jobs_per_worker = 1`) retires at its first job,
                // and counting only the others let every room given start
                // a fresh process (found by an attacker: 32 guests in 29
                // processes with 2 places).
                let busy: usize = st
                    .workers
                    .iter()
                    .map(|w| {
                        let written = w.down.0.written();
                        let mut ws = lock(&w.state);
                        ws.sent_by(written);
                        if ws.fault.is_none() { ws.running() } else { 0 }
                    })
                    .sum::<usize>()
                    + self.dying.load(Ordering::SeqCst);
                let places = self.places();
                let mut free: Vec<(usize, &Arc<Worker>)> = st
                    .workers
                    .iter()
                    .filter_map(|w| {
                        let ws = lock(&w.state);
                        (busy < places
                            && ws.fault.is_none()
                            && !ws.retiring
                            && ws.running() < self.config.max_concurrent_jobs as usize)
                            .then(|| (ws.running(), w))
                    })
                    .collect();
                free.sort_by_key(|(running, _)| *running);
                for (_, worker) in free {
                    // What loading its module takes, beside the job, in a
                    // worker that has not been sent it: weighed with the
                    // job, and held by the worker until the load is done.
                    let mut load = 0;
                    if let (Some(w), Some(memory), Some(memory_turn)) =
                        (wants, &self.memory, &memory_turn)
                    {
                        let files = self.files_in_memory(worker);
                        let held = {
                            let ws = lock(&worker.state);
                            if !ws.loaded.contains_key(&w.module) {
                                load = self.load_cost(&st, w.module);
                            }
                            ws.counted(files).saturating_add(ws.residue)
                        };
                        let takes = w
                            .memory
                            .saturating_add(room_in_memory(w))
                            .saturating_add(load);
                        if !memory.fits(held, takes, memory_turn) {
                            continue;
                        }
                    }
                    let given = match (wants, &worker.disk) {
                        (
                            Some(Wants {
                                job, room: bytes, ..
                            }),
                            Some(disk),
                        ) => {
                            if disk.overfilled() {
                                // Its released files may be gone by now.
                                let _ = disk.settle(worker.down.0.written());
                                if disk.overfilled() {
                                    continue;
                                }
                            }
                            disk.reserve(job, bytes, turn.as_ref())
                        }
                        _ => Ok(true),
                    };
                    match given {
                        Ok(true) => {
                            // A job's place is held from now (its
                            // [`Placed`]), under the pool's lock that every
                            // pick takes.
                            // So is its count against the worker's
                            // allowance: a worker replaced per job takes
                            // no second one while the first's spec is read.
                            if let Some(w) = wants {
                                let mut ws = lock(&worker.state);
                                if let (Some(memory), Some(memory_turn)) =
                                    (&self.memory, &memory_turn)
                                {
                                    let tenant = Arc::clone(memory_turn.tenant());
                                    memory.hold(&tenant, w.memory, true);
                                    ws.weighed.insert(w.job, (w.memory, tenant));
                                    // Its module's load is the worker's
                                    // until its `Loaded`, however soon the
                                    // job ends (found by an attacker: held
                                    // with the job, a cancelled job's load
                                    // went on uncounted, and loads piled
                                    // up past the ceiling).
                                    if load > 0 {
                                        ws.warming.entry(w.module).or_insert((load, 0)).1 += 1;
                                    }
                                }
                                ws.placed += 1;
                                ws.started += 1;
                                if self.config.jobs_per_worker > 0
                                    && ws.started >= self.config.jobs_per_worker
                                {
                                    ws.retiring = true;
                                }
                                if !ws.retiring
                                    && self.config.jobs_per_worker.saturating_sub(ws.started)
                                        == self.lead()
                                {
                                    // Its successor starts now.
                                    self.weakened.notify_one();
                                }
                            }
                            return Ok(Arc::clone(worker));
                        }
                        Ok(false) => {}
                        Err(e) => return Err(format!("cannot grow a worker's directory: {e}")),
                    }
                }
                // Refused room: the spares the zone's workers keep are
                // given back first, and the job tries again at once if
                // that freed any.
                if self.disk.as_ref().is_some_and(|d| d.wanted()) {
                    let freed: u64 = st
                        .workers
                        .iter()
                        .filter_map(|w| w.disk.as_ref())
                        .map(super::disk::WorkerDisk::reclaim)
                        .sum();
                    if freed > 0 {
                        continue;
                    }
                }
                // Waiting, for room or for a place: the job's queue slot
                // is lent meanwhile. The places may be held by jobs that
                // waited for room and run without slots; a job waiting
                // behind them holding its slot kept the queue from every
                // zone's jobs (found by an attacker: two jobs picked while
                // such jobs held the zone's places held both slots for two
                // wall times).
                told.tell();
            }
            // A wait refused aside is told again within `RETELL` even when
            // nothing in this zone changes: the jobs aside that filled the
            // queue's room for them may be another zone's.
            let refused = !told.told.get();
            let retell = async move {
                if refused {
                    tokio::time::sleep(RETELL).await;
                } else {
                    std::future::pending::<()>().await;
                }
            };
            // A job that is to start by a deadline gives up there, before
            // it is given anything.
            let give_up = async {
                match queued.place_by {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending::<()>().await,
                }
            };
            let room_freed = async {
                match room_freed {
                    Some(room_freed) => room_freed.await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                () = changed => {}
                () = room_freed => {}
                () = retell => {}
                () = give_up => return Err(NOT_PLACED.into()),
            }
        }
    }

    /// Runs `spec` of module `module` (from [`Pool::load`]) on a worker,
    /// its outbound requests handed to `egress`. Dropping the future
    /// cancels the job on its worker.
    pub async fn run(
        self: &Arc<Self>,
        module: u64,
        policy: &Policy,
        spec: &JobSpec,
        egress: Option<Arc<dyn Egress>>,
        queued: crate::runner::Queued<'_>,
    ) -> Result<(JobReport, Option<WorkerOutputs>), String> {
        carried(spec)?;
        let need = super::disk::need(policy, spec);
        let inputs = spec
            .inputs
            .iter()
            .map(|i| i.data.len() as u64)
            .fold(spec.stdin.len() as u64, u64::saturating_add);
        let spec = async { Ok(std::borrow::Cow::Borrowed(spec)) };
        self.run_placed(module, policy, (need, inputs), spec, egress, queued)
            .await
    }

    /// [`Pool::run`] of a job whose spec is read (`load`) only once it has
    /// its room and its place, so that nothing of its inputs is held while
    /// it waits for them; `sizes`, the sizes of its inputs and stdin, give
    /// the room it needs meanwhile. A spec that needs more room than
    /// `sizes` said is refused.
    pub async fn run_loaded(
        self: &Arc<Self>,
        module: u64,
        policy: &Policy,
        sizes: &[u64],
        load: impl Future<Output = Result<JobSpec, String>>,
        egress: Option<Arc<dyn Egress>>,
        queued: crate::runner::Queued<'_>,
    ) -> Result<(JobReport, Option<WorkerOutputs>), String> {
        let total = sizes.iter().fold(0u64, |a, &b| a.saturating_add(b));
        if total > (MAX_DOWN_FRAME - (64 << 10)) as u64 {
            return Err(too_large(total));
        }
        let need = super::disk::need_for(policy, sizes.iter().copied());
        let spec = async {
            let spec = load.await?;
            carried(&spec)?;
            if super::disk::need(policy, &spec) > need {
                return Err(
                    "the job's stored inputs are larger than when its room was given".into(),
                );
            }
            Ok(std::borrow::Cow::Owned(spec))
        };
        self.run_placed(module, policy, (need, total), spec, egress, queued)
            .await
    }

    /// Runs the job of `spec` (awaited once its worker, its room of `need`
    /// bytes and its place are given) on a worker.
    async fn run_placed(
        self: &Arc<Self>,
        module: u64,
        policy: &Policy,
        (need, inputs): (u64, u64),
        spec: impl Future<Output = Result<std::borrow::Cow<'_, JobSpec>, String>>,
        egress: Option<Arc<dyn Egress>>,
        queued: crate::runner::Queued<'_>,
    ) -> Result<(JobReport, Option<WorkerOutputs>), String> {
        let job = self.next_id();
        if let Some(disk) = self.disk.as_ref().filter(|d| need > d.size) {
            return Err(format!(
                "the job's files may take {need} bytes (its inputs, its output limit, a page for each output file), more than zone `{}`'s disk of {} bytes",
                self.config.zone, disk.size
            ));
        }
        let memory = self
            .memory
            .as_ref()
            .map_or(0, |_| super::memory::weight(policy, inputs));
        let wants = Wants {
            job,
            module,
            room: need,
            memory,
        };
        let worker = self.pick(Some(wants), queued).await?;
        lock(&self.state).placed.insert(module, Instant::now());
        if lock(&worker.state).retiring {
            // Its replacement starts now, while this job runs.
            self.weakened.notify_one();
        }
        let placed = Placed {
            pool: self,
            worker: &worker,
            job,
            module,
        };
        let spec = spec.await?;
        // What is kept of the spec once its `Run` is built: its inputs go
        // with the frame, not held beside it while the job runs (found by
        // a tester: the gateway held each running job's inputs twice).
        let id = spec.id.clone();
        let wall_time = policy.limits.wall_time.get();
        let (tx, rx) = oneshot::channel();
        let sent_at = Instant::now();
        {
            let mut ws = lock(&worker.state);
            if let Some(reason) = &ws.fault {
                // It failed between being picked and now.
                let report = fault_report(&id, policy, reason);
                drop(ws);
                drop(placed);
                return Ok((report, None));
            }
            ws.placed -= 1;
            std::mem::forget(placed);
            let start_within = if ws.compiled.contains(&module) {
                START_LOADED
            } else {
                START_ALLOWANCE
            };
            ws.jobs.insert(
                job,
                Pending {
                    reply: tx,
                    wall_time,
                    sent: sent_at,
                    module,
                    start_within,
                    compiled_since: false,
                    running_since: None,
                    run_end: None,
                },
            );
        }
        if let Some(egress) = egress {
            worker.calls.register(job, egress, wall_time);
        }
        self.send_load(&worker, module, false, true);
        let run_end = worker.down.send_ending(Down::Run {
            job,
            module,
            spec: spec.into_owned(),
        });
        if run_end.is_some()
            && let Some(p) = lock(&worker.state).jobs.get_mut(&job)
        {
            p.run_end = run_end;
        }
        let guard = JobGuard {
            pool: self,
            worker: &worker,
            job,
            done: false,
        };
        let answer = rx.await;
        let mut guard = guard;
        guard.done = true;
        drop(guard);
        self.job_ended(&worker, job);
        // The job's room is released with its outputs (`WorkerOutputs`)
        // where it has some, here where it has none.
        let released = || worker.release(job);
        match answer {
            Ok(Answer::Report(Ok(json), created)) => {
                // A worker ran a job: starts work again.
                if self.failed_in_a_row.load(Ordering::Relaxed) != 0 {
                    self.failed_in_a_row.store(0, Ordering::SeqCst);
                }
                match gateways_to_read(&json, &created, policy) {
                    Ok((report, created)) => Ok((
                        bounded(report, policy, sent_at.elapsed()),
                        Some(WorkerOutputs {
                            // The worker removes an empty `/out` before it
                            // reports: nothing to copy, nothing to release.
                            // Looked up from its directory's descriptor, not
                            // through a path in `/proc`.
                            removed: rustix::fs::statat(
                                &worker.dir_fd,
                                format!("j{job}.out").as_str(),
                                rustix::fs::AtFlags::SYMLINK_NOFOLLOW,
                            )
                            .is_err(),
                            worker: Arc::clone(&worker),
                            name: format!("j{job}.out"),
                            job,
                            bounds: crate::sandbox::outputs::Bounds::of(&policy.limits),
                            created,
                        }),
                    )),
                    Err(reason) => {
                        released();
                        self.breach(&worker, reason.clone());
                        Ok((fault_report(&id, policy, &reason), None))
                    }
                }
            }
            Ok(Answer::Report(Err(message), _)) if message.len() > MAX_WORKER_ERROR => {
                released();
                let reason = format!(
                    "sent a failure to start a job of {} bytes, more than the {MAX_WORKER_ERROR} a worker's takes",
                    message.len()
                );
                self.breach(&worker, reason.clone());
                Ok((fault_report(&id, policy, &reason), None))
            }
            Ok(Answer::Report(Err(mut message), _)) => {
                released();
                truncate(&mut message, MAX_MESSAGE);
                Err(message)
            }
            Ok(Answer::Stopped(reason, wall_time, told_by)) => {
                worker.release_told(job, told_by);
                Ok((stopped_report(&id, policy, &reason, wall_time), None))
            }
            Err(_) => {
                released();
                Ok((fault_report(&id, policy, &worker.fault_reason()), None))
            }
        }
    }

    fn job_ended(&self, worker: &Arc<Worker>, job: u64) {
        worker.calls.unregister(job);
        let written = worker.down.0.written();
        let retire = {
            let mut ws = lock(&worker.state);
            ws.ended(job, written);
            self.unweigh(&mut ws, job);
            ws.retiring && ws.idle()
        };
        if retire {
            self.retire(worker);
        }
        self.changed.notify_waiters();
    }

    /// Where the zone has a ceiling, what `worker`'s cgroup finds it
    /// holding (anonymous memory and tmpfs pages) beyond its base, its
    /// jobs' weights and its files is its residue, counted as held when
    /// jobs are placed: memory its jobs took that no weight counts, or that
    /// its allocator kept, holds no later job's place. An idle worker with
    /// a residue is replaced (whether it was given back or not, the next
    /// job is sent to a process holding only its base). True when it was.
    fn weighed_by_its_cgroup(self: &Arc<Self>, worker: &Arc<Worker>) -> bool {
        let (Some(memory), Some(ceiling)) = (&self.memory, &worker.ceiling) else {
            return false;
        };
        let Some(used) = ceiling.used() else {
            return false;
        };
        let files = self.files_in_memory(worker);
        let mut ws = lock(&worker.state);
        let allowed = memory.base.saturating_add(ws.counted(files));
        ws.residue = used.saturating_sub(allowed);
        let idle = ws.idle() && ws.loads.is_empty() && !ws.retiring;
        if ws.residue == 0 || !idle {
            return false;
        }
        let residue = ws.residue;
        drop(ws);
        if !self.stop_placing(worker) {
            // A job was placed on it meanwhile: it goes when its jobs end.
            return false;
        }
        tracing::warn!(zone = %self.config.zone, pid = worker.pid, bytes = residue, "an idle worker holds memory beyond its base; it is replaced");
        self.retire(worker);
        self.weakened.notify_one();
        true
    }

    /// A worker uses the CPU for its jobs: at each round, what its
    /// processes used since the last is taken from its ledger, and what
    /// its jobs' time in it allows ([`JOB_CPU`]) and its rest
    /// ([`REST_CPU`]) is added. One that has used [`CPU_BEYOND_AT_MOST`]
    /// more than that is a `cpu` fault: killed at once where it runs no
    /// job, retired otherwise (its jobs end as they would, no new one is
    /// placed on it), so that no job of anyone's fails for it. Found by
    /// testers: a compromised worker reported its jobs and kept its
    /// threads busy between them until it was replaced, and, judged only
    /// while nothing was sent to it, kept a core busy under one trivial
    /// job every quarter of a second. Counted on its CPU cgroup where it
    /// has one (every process in it), on its process otherwise. Loading
    /// modules counts as a job's time for [`LOAD_CPU_WITHIN`] at most. Not
    /// judged: a worker that has run no guest (nothing could have
    /// compromised it), and one already retiring (it goes when its jobs
    /// end). True when it was faulted.
    fn burns_beyond_its_jobs(self: &Arc<Self>, worker: &Arc<Worker>, now: Instant) -> bool {
        if lock(&worker.state).pristine() {
            return false;
        }
        let cpu = match &worker.share {
            Some(share) => share.used(),
            None => super::process::cpu_time(worker.pid),
        };
        let Some(cpu) = cpu else { return false };
        let mut ws = lock(&worker.state);
        let ended = std::mem::take(&mut ws.cpu.ended);
        let Some((at, before)) = ws.cpu.seen.replace((now, cpu)) else {
            return false;
        };
        // Loading counts as a job's time for a while, and no longer: a
        // worker that held its `Loaded` back was left unjudged for as long
        // as it liked (found by a tester: 134 s of CPU in 102 s, in a zone
        // with a memory ceiling, where a placed job's load is held until
        // its `Loaded`).
        let loading = if ws.loads.is_empty() && ws.warming.is_empty() {
            ws.cpu.loading = None;
            Duration::ZERO
        } else {
            let since = *ws.cpu.loading.get_or_insert(at);
            (since + LOAD_CPU_WITHIN)
                .min(now)
                .saturating_duration_since(at)
        };
        let running = ws.jobs.values().fold(Duration::ZERO, |total, job| {
            total.saturating_add(now.saturating_duration_since(job.sent.max(at)))
        });
        let allowed = CpuLedger::allowed(
            ended.saturating_add(running),
            loading,
            now.saturating_duration_since(at),
        );
        let beyond = ws.cpu.charge(allowed, cpu.saturating_sub(before));
        // Charged whatever it does, judged only while it takes jobs: one
        // retiring goes when its jobs end.
        if beyond <= CPU_BEYOND_AT_MOST || ws.retiring || ws.fault.is_some() {
            return false;
        }
        drop(ws);
        let idle = self.stop_placing(worker);
        let reason = format!(
            "used {} ms of CPU beyond what its jobs' time allows",
            beyond.as_millis()
        );
        if idle {
            self.fault(worker, "cpu", reason);
            return true;
        }
        tracing::warn!(zone = %self.config.zone, pid = worker.pid, "a worker used the CPU beyond its jobs' time; it is retired");
        self.record(worker, "cpu", reason, 0);
        false
    }

    /// No job is placed on `worker` from now on (it is retiring); whether
    /// it runs none. A pick holds the pool's lock from finding a worker
    /// free to placing its job there, so this takes it too: under it, no
    /// job is on its way to the worker unseen (found by a tester, reading:
    /// the worker's own lock alone left a moment in which a job could be
    /// placed on a worker about to be killed as idle).
    fn stop_placing(&self, worker: &Worker) -> bool {
        let _placing = lock(&self.state);
        let mut ws = lock(&worker.state);
        ws.retiring = true;
        ws.idle()
    }

    /// What `worker`'s files take of its memory: what its directory keeps
    /// where it is a tmpfs.
    fn files_in_memory(&self, worker: &Worker) -> u64 {
        match &worker.disk {
            Some(disk) if self.mounts => disk.kept(),
            _ => 0,
        }
    }

    /// Job `job` holds none of `ws`'s worker's memory any more.
    fn unweigh(&self, ws: &mut WorkerState, job: u64) {
        if let (Some(memory), Some((bytes, tenant))) = (&self.memory, ws.weighed.remove(&job)) {
            memory.hold(&tenant, bytes, false);
        }
    }

    /// What the room of a job of `policy` may take of its worker's memory
    /// at most: none unless the worker's directory is a tmpfs.
    fn room_in_memory(&self, policy: &Policy) -> u64 {
        match &self.disk {
            Some(_) if self.mounts => super::disk::most(policy),
            _ => 0,
        }
    }

    /// Lets a worker that ran its allowance go: it is killed; its
    /// directory is removed once nothing refers to it (its last jobs'
    /// outputs copied).
    fn retire(&self, worker: &Arc<Worker>) {
        lock(&self.state)
            .workers
            .retain(|w| !Arc::ptr_eq(w, worker));
        lock(&worker.state).fault = Some(RETIRED.into());
        // At once: it runs nothing, and what it leaves in its directory
        // goes with the directory. Left to exit on its own, retired
        // workers lived on as fast as jobs retired them (found by an
        // attacker: 22–28 processes of a one-worker zone replaced per job).
        self.put_down(worker);
    }

    /// Kills `worker`, which has left the pool's list: one that ran a job
    /// holds a place of the zone until its process is reaped. A killed
    /// process takes a while to end (tens of milliseconds here, its
    /// memory still charged, its job's directories still there), and
    /// counted only until the kill, a zone replacing its workers per job
    /// had more live workers with a job's guest in them than places
    /// (found by an attacker: three in a two-place zone, under cancels).
    fn put_down(&self, worker: &Worker) {
        if lock(&worker.state).started == 0 {
            worker.kill();
            return;
        }
        self.dying.fetch_add(1, Ordering::SeqCst);
        let (dying, changed) = (Arc::clone(&self.dying), Arc::clone(&self.changed));
        worker.kill_then(move || {
            dying.fetch_sub(1, Ordering::SeqCst);
            changed.notify_waiters();
        });
    }

    /// A start of a worker failed, or a worker failed before it was given
    /// any job (which no guest could have caused: it had run none): the
    /// next start waits ([`start_backoff`]); returns how long.
    fn start_failed(&self) -> Duration {
        let failed = self.failed_in_a_row.fetch_add(1, Ordering::SeqCst);
        let wait = start_backoff(failed.saturating_add(1));
        lock(&self.state).start_after = Some(Instant::now() + wait);
        self.start_failures.fetch_add(1, Ordering::SeqCst);
        metrics::counter!(
            "bulkhead_worker_start_failures_total",
            "zone" => self.config.zone.clone()
        )
        .increment(1);
        wait
    }

    /// Kills `worker` for `reason`, fails its jobs, reports the fault.
    /// The reason is cut and escaped here, whatever made it: it may quote
    /// what the worker sent (found by a tester: a report's unknown
    /// `outcome` of 6 MB, quoted whole by the decoder, reached the log,
    /// the audit, the stored job and its answer, with forged log lines).
    fn fault(&self, worker: &Arc<Worker>, class: &'static str, reason: String) {
        let reason = crate::sandbox::shown_within(&reason, MAX_MESSAGE);
        let (jobs, given_none) = {
            let mut ws = lock(&worker.state);
            if ws.fault.is_some() {
                return;
            }
            ws.fault = Some(reason.clone());
            ws.loads.clear();
            let jobs = ws.jobs.len();
            // Dropping the replies wakes every waiting job with the fault.
            ws.jobs.clear();
            (jobs, ws.started == 0)
        };
        let kept = {
            let mut st = lock(&self.state);
            let kept = st
                .workers
                .iter()
                .chain(&st.successors)
                .any(|w| Arc::ptr_eq(w, worker));
            st.workers.retain(|w| !Arc::ptr_eq(w, worker));
            st.successors.retain(|w| !Arc::ptr_eq(w, worker));
            kept
        };
        self.put_down(worker);
        // One of the zone's workers that failed before any job failed as a
        // start does: its replacement waits (found by a tester: workers
        // that said hello and died were replaced 5 to 11 times a second,
        // the zone ready). Not a worker started to compile a module alone:
        // a compile that fails fails that load, nothing else.
        if given_none && kept && !self.closing.load(Ordering::SeqCst) {
            self.start_failed();
        }
        self.record(worker, class, reason, jobs);
    }

    /// A breach of the protocol in `worker`'s answer to a job: a fault,
    /// and recorded though the worker was retired (and put down) as that
    /// job, its last, ended (found by a tester: in a zone replacing its
    /// workers per job, no breach was logged, audited or counted).
    fn breach(&self, worker: &Arc<Worker>, reason: String) {
        let reason = crate::sandbox::shown_within(&reason, MAX_MESSAGE);
        let retired = {
            let mut ws = lock(&worker.state);
            let retired = ws.fault.as_deref() == Some(RETIRED);
            if retired {
                ws.fault = Some(reason.clone());
            }
            retired
        };
        if retired {
            self.record(worker, "protocol", reason, 0);
        } else {
            self.fault(worker, "protocol", reason);
        }
    }

    /// Logs, counts and tells `worker`'s fault, which failed `jobs` jobs.
    fn record(&self, worker: &Worker, class: &'static str, reason: String, jobs: usize) {
        if self.closing.load(Ordering::SeqCst) {
            // Stopped with the service, not a fault.
            return;
        }
        tracing::error!(zone = %self.config.zone, pid = worker.pid, class, %reason, jobs, "worker fault");
        metrics::counter!("bulkhead_worker_faults_total", "zone" => self.config.zone.clone(), "class" => class)
            .increment(1);
        self.tell(Fault {
            zone: self.config.zone.clone(),
            pid: worker.pid,
            class,
            reason,
            jobs,
        });
        self.weakened.notify_one();
        self.changed.notify_waiters();
    }

    /// Ends `job`, which ran past the gateway's clock for it, without
    /// waiting for `worker` any longer: the job fails with `reason`, the
    /// worker is told to cancel it and takes no new job, a replacement
    /// starts, and the worker goes once its other jobs have ended (each
    /// held to its own clock). Its co-tenants are not failed for one job
    /// that ran long: a guest whose host calls kept the worker busy would
    /// otherwise take every other tenant's job in it down with its own.
    /// Stops `job`, which overran `worker`'s clock for it: the job's wall
    /// time (`wall_time`), or the time it had to start.
    fn stop(&self, worker: &Arc<Worker>, job: u64, reason: String, wall_time: bool) {
        let written = worker.down.0.written();
        let (pending, idle) = {
            let mut ws = lock(&worker.state);
            let pending = ws.ended(job, written);
            ws.retiring = true;
            (pending, ws.idle())
        };
        let Some(pending) = pending else { return };
        worker.calls.unregister(job);
        let told_by = worker.down.send_ending(Down::Cancel { job });
        let _ = pending
            .reply
            .send(Answer::Stopped(reason.clone(), wall_time, told_by));
        if idle {
            self.retire(worker);
        }
        if self.closing.load(Ordering::SeqCst) {
            return;
        }
        tracing::error!(zone = %self.config.zone, pid = worker.pid, %reason, "worker overran a job: the job is stopped and the worker retired");
        metrics::counter!("bulkhead_worker_faults_total", "zone" => self.config.zone.clone(), "class" => "overrun")
            .increment(1);
        self.tell(Fault {
            zone: self.config.zone.clone(),
            pid: worker.pid,
            class: "overrun",
            reason,
            jobs: 1,
        });
        self.weakened.notify_one();
        self.changed.notify_waiters();
    }

    /// Tells the pool's owner of a fault, on the gateway's runtime (what
    /// it does with it, an audit entry say, runs there).
    fn tell(&self, fault: Fault) {
        let _gateway = self.gateway.enter();
        (self.faults)(fault);
    }

    /// Keeps the pool at strength and its workers honest: pings them,
    /// faults the silent and those whose job overran, starts replacements.
    ///
    /// It runs on threads of its own ([`channels`]), so the gateway being
    /// slow delays none of it and its clocks are wall clocks. The workers'
    /// channels are read and written on the gateway's threads: a worker
    /// whose frames wait unread, or frames for which wait unwritten, is not
    /// judged until they are read or written ([`UNREAD`]) while it keeps
    /// reading what it is sent ([`READ_LATELY`]), for a while at most
    /// ([`UNREAD_AT_MOST`]).
    ///
    /// It holds the pool only for a round: a pool its owner dropped is
    /// closed ([`Drop`]) and the supervisor ends.
    async fn supervise(pool: Weak<Self>, weakened: Arc<Notify>) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_ping = Instant::now();
        let mut seq = 0u64;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = weakened.notified() => {}
            }
            let Some(pool) = pool.upgrade() else { return };
            if pool.closing.load(Ordering::SeqCst) {
                return;
            }
            let ping = last_ping.elapsed() >= PING_EVERY;
            if ping {
                last_ping = Instant::now();
                seq += 1;
            }
            pool.round(ping.then_some(seq));
        }
    }

    /// One round of [`Pool::supervise`]; `ping`: the ping to send.
    fn round(self: &Arc<Self>, ping: Option<u64>) {
        let now = Instant::now();
        let since = |t: Instant| now.saturating_duration_since(t);
        let workers = self.all_workers();
        for worker in &workers {
            if worker.down.overflowed() {
                self.fault(
                    worker,
                    "protocol",
                    format!(
                        "stopped reading its channel: {MAX_QUEUED_FRAMES} frames queued for it"
                    ),
                );
                continue;
            }
            if let Some(seq) = ping {
                let _ = worker.down.send(Down::Ping { seq });
            }
            if self.weighed_by_its_cgroup(worker) || self.burns_beyond_its_jobs(worker, now) {
                continue;
            }
            // Its directory is judged from the gateway's side (its file
            // system's counts), whatever waits unread on its channel:
            // spares are given back and files past its rooms faulted even
            // while its reader is behind.
            if let Some(over) = worker
                .disk
                .as_ref()
                .and_then(|d| d.settle(worker.down.0.written()))
            {
                self.fault(worker, "disk", over.to_string());
                continue;
            }
            // What it has sent by now: what the gateway has taken, what
            // waits in the gateway's end, and what it has taken again.
            let taken = || worker.taken.load(std::sync::atomic::Ordering::Acquire);
            let before = taken();
            let waiting = rustix::io::ioctl_fionread(&worker.channel).unwrap_or(0);
            let after = taken();
            lock(&worker.hearing).look(now, before, waiting, after);
            let owing = {
                use std::os::fd::AsFd;
                // What waits for the drain goes now, pings among it.
                let _ = worker.down.0.push(worker.channel.as_fd());
                let written = worker.down.0.written();
                if lock(&worker.state).sent_by(written) {
                    self.changed.notify_waiters();
                }
                let sent = worker.down.0.sent();
                let unread = unread_by_peer(&worker.channel);
                let mut progressed = false;
                if let Some(unread) = unread {
                    let taken = written.saturating_sub(unread);
                    let mut read = lock(&worker.read);
                    if taken > read.1 {
                        *read = (now, taken);
                        progressed = true;
                    }
                    let mut marks = lock(&worker.marks);
                    if sent > marks.back().map_or(taken, |m| m.0) {
                        marks.push_back((sent, now));
                    }
                    while marks.front().is_some_and(|m| m.0 <= taken) {
                        marks.pop_front();
                    }
                }
                let owes = unread.unwrap_or(0) > 0 || worker.down.0.waiting() > 0;
                let mut owing = lock(&worker.owing);
                match *owing {
                    _ if !owes => *owing = None,
                    Some(_) if !progressed => {}
                    _ => *owing = Some(now),
                }
                owing.map(since)
            };
            // What it was sent is read in time, whatever else it does and
            // however fast it reads the rest (found by an attacker: a
            // worker reading 5 KB a second counted as reading, and held
            // its zone's places with cancelled jobs' inputs for hours).
            let oldest = lock(&worker.marks).front().map(|m| since(m.1));
            if oldest.is_some_and(|o| o > READ_WITHIN) {
                self.fault(
                    worker,
                    "protocol",
                    format!(
                        "left what it was sent unread for {}s",
                        READ_WITHIN.as_secs()
                    ),
                );
                continue;
            }
            // The worker reads what it is sent, and what it spoke (or what
            // is to be written to it) has waited for a while: the gateway's
            // reader (or writer) is behind, and to judge now would blame
            // the worker. Not while the reader keeps reading: a worker
            // that floods its channel is judged as ever. Nor once it has
            // left what it was sent unread: it hung.
            let silent = since(lock(&worker.hearing).last());
            let reads = since(lock(&worker.read).0) <= READ_LATELY;
            let behind = waiting > 0 || worker.down.0.waiting() > 0;
            let was_excused = worker
                .excused
                .swap(false, std::sync::atomic::Ordering::Relaxed);
            if silent > UNREAD && silent < UNREAD_AT_MOST && reads && behind {
                worker
                    .excused
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                continue;
            }
            // The gateway has just caught up with a worker it was behind
            // with: what the worker said since may still be on its way.
            // Judged from the next round.
            if was_excused && !behind {
                continue;
            }
            if silent > SILENT_FAULT {
                self.fault(
                    worker,
                    "silent",
                    format!("stopped answering for {}s", silent.as_secs()),
                );
                continue;
            }
            // However much it says: what it says does not read what it is
            // sent (found by an attacker: a worker that stopped reading
            // and vouched for itself once a second was never judged, while
            // the gateway queued for it).
            if owing.is_some_and(|o| o > SILENT_FAULT) {
                self.fault(
                    worker,
                    "protocol",
                    format!(
                        "stopped reading its channel: nothing it was sent read for {}s",
                        SILENT_FAULT.as_secs()
                    ),
                );
                continue;
            }
            // From the gateway's own clocks: a job the worker never
            // says it started is held to the start allowance, then to
            // its wall time from when it was sent.
            let overran: Vec<(u64, String, bool)> = lock(&worker.state)
                .jobs
                .iter()
                .filter_map(|(job, p)| {
                    let since_sent = since(p.sent);
                    let reason = match p.running_since {
                        Some(s) if since(s) > p.wall_time + OVERRUN_GRACE => format!(
                            "let job {job} run past its wall time of {:?} by {}s without a report",
                            p.wall_time,
                            OVERRUN_GRACE.as_secs()
                        ),
                        None if since_sent > p.start_within && p.compiled_since => format!(
                            "did not start job {job} within {}s of saying it had compiled its module",
                            START_LOADED.as_secs()
                        ),
                        None if since_sent > p.start_within => format!(
                            "did not start job {job} within {}s",
                            p.start_within.as_secs()
                        ),
                        _ if since_sent > p.start_within + p.wall_time + OVERRUN_GRACE => {
                            format!("did not finish job {job} in time")
                        }
                        _ => return None,
                    };
                    Some((*job, reason, p.running_since.is_some()))
                })
                .collect();
            for (job, reason, wall_time) in overran {
                self.stop(worker, job, reason, wall_time);
            }
        }
        self.rebuild();
        self.replenish();
    }

    /// How many jobs before its last a worker's successor is started: a tenth
    /// of its allowance, at least one (so that a worker replaced per job
    /// has its successor ready as it starts).
    fn lead(&self) -> u32 {
        (self.config.jobs_per_worker / 10).max(1)
    }

    /// Whether a worker is within [`Pool::lead`] of its last job.
    fn nearly_spent(&self, ws: &WorkerState) -> bool {
        self.config.jobs_per_worker > 0
            && self.config.jobs_per_worker.saturating_sub(ws.started) <= self.lead()
    }

    /// Keeps the zone's workers: a successor takes the place of each worker
    /// retiring or gone, and workers are started for the rest; and a successor
    /// is started for each worker near its last job, so that it is ready
    /// (its hello said, the zone's modules loaded) by the time that worker
    /// retires. A zone whose workers are replaced had no worker that could
    /// take a job from each retirement until its replacement had started
    /// and loaded its first job's module.
    ///
    /// Processes at once: the zone's `workers`, as many successors, retiring
    /// workers (each with a job running, bounded by the zone's places),
    /// and those starting (to keep the two counts). A successor is never
    /// passed a job while its worker is not retiring, so each worker
    /// reaches its last job as it would without one.
    fn replenish(self: &Arc<Self>) {
        let keep = self.config.workers.max(1) as usize;
        let mut st = lock(&self.state);
        let (mut live, near) = st.workers.iter().fold((0, 0), |(live, near), w| {
            let ws = lock(&w.state);
            if ws.retiring || ws.fault.is_some() {
                (live, near)
            } else {
                (live + 1, near + usize::from(self.nearly_spent(&ws)))
            }
        });
        let mut promoted = false;
        while live < keep {
            let Some(successor) = st.successors.pop() else {
                break;
            };
            st.workers.push(successor);
            live += 1;
            promoted = true;
        }
        let have = st.successors.len() + st.starting as usize;
        // After a failed start, none until its wait is over (the
        // supervisor's next rounds come back here).
        let wanted = if st.start_after.is_some_and(|at| Instant::now() < at) {
            have
        } else {
            (keep - live) + near.min(keep)
        };
        for _ in have..wanted {
            st.starting += 1;
            let pool = Arc::clone(self);
            tokio::spawn(async move {
                let started = pool.spawn_worker().await;
                let worker = match started {
                    Ok(w) => w,
                    Err(e) => {
                        lock(&pool.state).starting -= 1;
                        let wait = pool.start_failed();
                        tracing::error!(
                            error = %e,
                            retry_in_ms = wait.as_millis(),
                            "cannot start a replacement worker"
                        );
                        pool.changed.notify_waiters();
                        return;
                    }
                };
                // Taken at once where the zone is short of a worker;
                // otherwise a successor, sent the zone's modules (and taken
                // as it is, its loads still coming, if the zone is short
                // of a worker before they are done).
                let mut st = lock(&pool.state);
                st.starting -= 1;
                if pool.closing.load(Ordering::SeqCst) || lock(&worker.state).fault.is_some() {
                    drop(st);
                    worker.kill();
                } else if Self::live(&st) < keep {
                    st.workers.push(worker);
                } else if st.successors.len() < keep {
                    st.successors.push(Arc::clone(&worker));
                    drop(st);
                    let warming = Arc::clone(&pool);
                    tokio::spawn(async move { warming.warm_successor(&worker).await });
                } else {
                    drop(st);
                    worker.kill();
                }
                pool.changed.notify_waiters();
                // It may itself be near its last job (one job a worker).
                pool.weakened.notify_one();
            });
        }
        drop(st);
        if promoted {
            self.changed.notify_waiters();
            self.weakened.notify_one();
        }
    }

    /// The zone's workers that can take a job: neither retiring nor
    /// failed.
    fn live(st: &State) -> usize {
        st.workers
            .iter()
            .filter(|w| {
                let ws = lock(&w.state);
                !ws.retiring && ws.fault.is_none()
            })
            .count()
    }

    /// Sends `successor` the modules the zone's workers hold and the zone
    /// has placed a job of within [`WARM_WITHIN`], where each fits beside
    /// what it holds, and waits for its loads (faulting it as
    /// [`Pool::warm`] does where it does not answer): its first jobs then
    /// find their module loaded.
    async fn warm_successor(&self, successor: &Arc<Worker>) {
        let modules: std::collections::BTreeSet<u64> = {
            let mut st = lock(&self.state);
            let st = &mut *st;
            let modules = &st.modules;
            st.placed
                .retain(|m, at| modules.contains_key(m) && at.elapsed() < WARM_WITHIN);
            st.workers
                .iter()
                .flat_map(|w| lock(&w.state).loaded.keys().copied().collect::<Vec<_>>())
                .filter(|m| st.placed.contains_key(m))
                .collect()
        };
        let mut loads = Vec::new();
        for module in modules {
            if let Some(load) = self.send_warm(successor, module) {
                loads.push(load);
            }
        }
        let deadline = tokio::time::Instant::now() + START_ALLOWANCE;
        for load in loads {
            if tokio::time::timeout_at(deadline, load).await.is_err() {
                let reason = format!("did not compile a module in {}s", START_ALLOWANCE.as_secs());
                self.fault(successor, "overrun", reason);
                return;
            }
        }
    }

    /// Has each module whose zone cache entry was found gone or rewritten
    /// compiled again, by a worker of its own ([`Pool::load_alone`]),
    /// which puts the entry back: until then the workers it is sent to
    /// compile it themselves.
    ///
    /// A module is compiled again at most once in [`REBUILD_EVERY`]; one
    /// asked for sooner waits for it. The mismatch is a worker's word, and
    /// each took a compile worker (found by a tester: workers that said so
    /// of every load started 214 compile workers in 20 s).
    fn rebuild(self: &Arc<Self>) {
        let modules: Vec<(u64, Arc<Source>)> = {
            let mut st = lock(&self.state);
            let st = &mut *st;
            let now = Instant::now();
            let asked: Vec<u64> = st.rebuild.iter().copied().collect();
            let mut due = Vec::new();
            for m in asked {
                if st
                    .rebuilt
                    .get(&m)
                    .is_none_or(|at| now.saturating_duration_since(*at) >= REBUILD_EVERY)
                {
                    st.rebuild.remove(&m);
                    st.rebuilt.insert(m, now);
                    due.push(m);
                }
            }
            due.into_iter()
                .filter_map(|m| st.modules.get(&m).map(|s| (m, Arc::clone(s))))
                .collect()
        };
        for (module, source) in modules {
            let pool = Arc::clone(self);
            self.rebuilds.fetch_add(1, Ordering::SeqCst);
            metrics::counter!("bulkhead_zone_cache_rebuilds_total", "zone" => self.config.zone.clone())
                .increment(1);
            tracing::info!(zone = %self.config.zone, module = %source.digest, "a worker of its own compiles a module whose zone-cache entry was gone or rewritten, for the cache");
            self.gateway.spawn(async move {
                let name = source.digest.to_string();
                if let Err(e) = pool.load_alone(module, &name).await {
                    tracing::warn!(zone = %pool.config.zone, module = %source.digest, error = %e, "a module could not be compiled again for the zone's cache; workers compile it until it is");
                }
            });
        }
    }

    /// A fresh directory `name` in the zone's held directory (what was
    /// there removed), mode 0700, owned by `owner` when given: made and
    /// opened from the held descriptor, never through a link or a mount.
    fn worker_dir(&self, name: &str, owner: Option<(u32, u32)>) -> std::io::Result<std::fs::File> {
        crate::sandbox::remove_tree_in(&self.zone_dir, Path::new(name))?;
        let fd = self.zone_dir.dir(Path::new(name), true)?;
        rustix::fs::fchmod(&fd, rustix::fs::Mode::from_raw_mode(0o700))?;
        if let Some((uid, gid)) = owner {
            rustix::fs::fchown(
                &fd,
                Some(rustix::process::Uid::from_raw(uid)),
                Some(rustix::process::Gid::from_raw(gid)),
            )?;
        }
        Ok(fd.into())
    }

    /// Starts one worker of the pool, under the zone's memory ceiling, and
    /// waits for its hello.
    async fn spawn_worker(self: &Arc<Self>) -> Result<Arc<Worker>, PoolError> {
        self.spawn_worker_within(self.config.memory).await
    }

    /// Starts one worker under memory ceiling `memory` (where the host
    /// offers cgroups) and waits for its hello.
    async fn spawn_worker_within(
        self: &Arc<Self>,
        memory: Option<u64>,
    ) -> Result<Arc<Worker>, PoolError> {
        // Counted from before its process exists (a process stopping while
        // this one forked exited without it; found by its test), and
        // dropped after its cgroup on every way out.
        let live = Live::new(&self.live);
        let c = &self.config;
        let start_error = |reason: String| PoolError::Start {
            zone: c.zone.clone(),
            reason,
        };
        let id = self.next_id();
        let name = format!("w{id}");
        let (work_fd, scratch) = match self.mounts {
            true => {
                let scratch = super::scratch::make(super::disk::FLOOR, effective_owner(c.run_as))
                    .map_err(|e| start_error(format!("worker directory (tmpfs): {e}")))?;
                let fd = scratch
                    .dir
                    .try_clone()
                    .map_err(|e| start_error(format!("worker directory: {e}")))?;
                (std::fs::File::from(fd), Some(scratch))
            }
            false => (
                self.worker_dir(&name, effective_owner(c.run_as))
                    .map_err(|e| {
                        start_error(format!("{}: {e}", c.work_dir.join(&name).display()))
                    })?,
                None,
            ),
        };
        let name = scratch.is_none().then_some(name);
        let dir_fd = work_fd
            .try_clone()
            .map_err(|e| start_error(format!("worker directory: {e}")))?;
        let disk = match &self.disk {
            Some(zone) => Some(super::disk::WorkerDisk::new(
                Arc::clone(zone),
                scratch,
                Some(
                    dir_fd
                        .try_clone()
                        .map_err(|e| start_error(format!("worker directory: {e}")))?
                        .into(),
                ),
            )),
            None => None,
        };
        let cache_fd = rustix::io::fcntl_dupfd_cloexec(self.cache.fd(), 0)
            .map(std::fs::File::from)
            .map_err(|e| start_error(format!("{}: {e}", c.cache_dir.display())))?;
        let args = WorkerArgs {
            zone: c.zone.clone(),
            work_dir: PathBuf::from(format!("/proc/self/fd/{}", super::WORK_FD)),
            cache_dir: PathBuf::from(format!("/proc/self/fd/{}", super::CACHE_FD)),
            run_as: effective_owner(c.run_as),
            max_concurrent_jobs: c.max_concurrent_jobs,
            // A worker cannot raise what the gateway was given.
            max_open: c.max_open.min(hard_nofile()),
            max_threads: c.max_threads,
            give_back: c.memory.is_some(),
            weaken: c.weaken.clone(),
        };
        let spawned = process::spawn(&c.program, WORKER_SUBCOMMAND, &args, &[&work_fd, &cache_fd])
            .map_err(|e| start_error(format!("{}: {e}", c.program.display())))?;
        let pid = spawned.child.id();
        // Cgroup files are written off the async threads: moving a
        // process between cgroups waits for the kernel's readers (RCU),
        // milliseconds on a busy host.
        let groups = crate::blocking(|| {
            // Named by the worker's own pid, unique among live processes:
            // a pool's own count is not (two pools of one process, or two
            // services under one cgroup, named their first workers alike
            // and shared one cgroup, its ceiling and its kills).
            let zone = &c.zone[..c.zone.floor_char_boundary(40)];
            let group = format!("{zone}-{pid}");
            let ceiling = match memory {
                Some(bytes) => match super::cgroup::MemoryCeiling::create(&group, bytes) {
                    Ok(ceiling) => ceiling
                        .add(pid)
                        .map(|()| Some(ceiling))
                        .map_err(|e| format!("cannot put it under its memory ceiling: {e}")),
                    Err(super::cgroup::CgroupError::NotOffered(why)) => {
                        tracing::debug!(why, "no memory ceiling for workers");
                        Ok(None)
                    }
                    // Offered but not made: the worker does not run
                    // without it.
                    Err(e) => Err(format!("cannot make its memory ceiling: {e}")),
                },
                None => Ok(None),
            }?;
            // Its share of the CPU: what its guest threads would weigh as
            // the gateway's own, however many threads it runs (found by a
            // tester: a compromised worker's busy threads slowed another
            // zone's jobs twentyfold).
            let share = match super::cgroup::CpuShare::create(
                &group,
                super::GUEST_THREADS,
                ceiling.as_ref(),
            ) {
                Ok(share) => share
                    .add(pid)
                    .map(|()| Some(share))
                    .map_err(|e| format!("cannot put it under its CPU share: {e}")),
                Err(super::cgroup::CgroupError::NotOffered(why)) => {
                    tracing::debug!(why, "no CPU share for workers");
                    Ok(None)
                }
                Err(e) => Err(format!("cannot make its CPU share: {e}")),
            }?;
            Ok::<_, String>((ceiling, share))
        });
        let (ceiling, share) = match groups {
            Ok(groups) => groups,
            Err(e) => {
                let mut child = spawned.child;
                let _ = child.kill();
                let _ = child.wait();
                return Err(start_error(e));
            }
        };
        // Given up on every way out below, this start being cancelled
        // among them (found by an attacker: a stop while the pool's first
        // workers said hello left one, unreaped, and its cgroup).
        let mut starting = Starting {
            child: Some(spawned.child),
            ceiling,
            share,
            live: Some(live),
        };
        let stream = spawned
            .channel
            .set_nonblocking(true)
            .and_then(|()| spawned.channel.try_clone())
            .and_then(|second| {
                // Registered with the gateway's runtime, whose threads read
                // and write it: a job's frame down is written, and its
                // report read and handed to its waiting request, without
                // waking a thread of another runtime on either way.
                let _gateway = self.gateway.enter();
                let framed = proto::split_counted(spawned.channel, MAX_UP_FRAME, MAX_DOWN_FRAME)?;
                Ok((framed, std::os::fd::OwnedFd::from(second)))
            })
            .map_err(|e| start_error(format!("channel: {e}")));
        let ((mut reader, mut writer), channel) = match stream {
            Ok(s) => s,
            Err(e) => return Err(e),
        };
        let taken = Arc::clone(reader.get_ref().taken());
        let hello = tokio::time::timeout(HELLO_TIMEOUT, proto::recv::<Up>(&mut reader)).await;
        let applied = match hello {
            Ok(Ok(Up::Hello {
                version: proto::VERSION,
                mut applied,
                ..
            })) => {
                for state in applied.layers.values_mut() {
                    if let LayerState::Unavailable { reason } = state {
                        *reason = crate::sandbox::shown_within(reason, MAX_MESSAGE);
                    }
                }
                applied
            }
            other => {
                let reason = match other {
                    Err(_) => "it did not say hello in time".to_owned(),
                    // Worker text reaches the log: cut and escaped
                    // (found by a tester: 16 MB failures with forged log
                    // lines in them, 1.9 GB of log in a minute).
                    Ok(Ok(Up::StartFailed { error })) => {
                        crate::sandbox::shown_within(&error, MAX_MESSAGE)
                    }
                    Ok(Ok(Up::Hello { version, .. })) => {
                        format!(
                            "it speaks protocol version {version}, not {}",
                            proto::VERSION
                        )
                    }
                    Ok(Ok(_)) => "its first message was not hello".to_owned(),
                    Ok(Err(e)) => e.to_string(),
                };
                return Err(start_error(reason));
            }
        };
        let missing: Vec<String> = c
            .require
            .iter()
            .filter_map(|layer| match applied.layers.get(layer) {
                Some(LayerState::Active) => None,
                Some(LayerState::Unavailable { reason }) => Some(format!("{layer:?} ({reason})")),
                Some(LayerState::Off) => Some(format!("{layer:?} (switched off)")),
                None => Some(format!("{layer:?} (not reported)")),
            })
            .collect();
        if !missing.is_empty() {
            return Err(PoolError::Missing {
                zone: c.zone.clone(),
                missing: missing.join(", "),
            });
        }
        *lock(&self.applied) = applied;
        if proto::send(
            &mut writer,
            &Down::Hello {
                version: proto::VERSION,
            },
        )
        .await
        .is_err()
        {
            return Err(start_error("the channel closed after hello".into()));
        }
        let down = Arc::new(Link::bounded(
            writer.into_inner(),
            MAX_DOWN_FRAME,
            MAX_QUEUED_FRAMES,
        ));
        self.gateway.spawn(Link::drain(Arc::downgrade(&down)));
        let (call_tx, mut call_rx) = mpsc::unbounded_channel();
        let worker = Arc::new(Worker {
            pid,
            dir_fd: dir_fd.into(),
            name,
            zone_dir: self.zone_dir.clone(),
            disk,
            down: Outbox(down, super::asked::Asked::default()),
            calls: GatewayCalls::with_limits(
                call_tx,
                super::calls::CallLimits::for_places(self.config.max_concurrent_jobs),
            ),
            state: Mutex::default(),
            hearing: Mutex::new(super::heard::Hearing::new(Instant::now())),
            taken,
            excused: std::sync::atomic::AtomicBool::new(false),
            read: Mutex::new((Instant::now(), 0)),
            owing: Mutex::new(None),
            marks: Mutex::default(),
            channel,
            child: Mutex::new(starting.child.take()),
            ceiling: starting.ceiling.take(),
            share: starting.share.take(),
            live: starting.live.take(),
            gone: Mutex::default(),
        });
        // Calls' frames join the worker's one bounded queue; once it has
        // overflowed they are dropped here, as fast as they come.
        let forward = Arc::downgrade(&worker);
        self.gateway.spawn(async move {
            while let Some(call) = call_rx.recv().await {
                let Some(worker) = forward.upgrade() else {
                    return;
                };
                let _ = worker.down.send(Down::Call(call));
            }
        });
        let pool = Arc::downgrade(self);
        let reading = Arc::clone(&worker);
        self.gateway.spawn(async move {
            let (class, reason) = Self::read(&pool, &reading, &mut reader).await;
            if let Some(pool) = pool.upgrade() {
                pool.fault(&reading, class, reason);
            }
        });
        metrics::counter!("bulkhead_worker_starts_total", "zone" => self.config.zone.clone())
            .increment(1);
        Ok(worker)
    }

    /// Reads a worker's messages until it fails; returns why.
    async fn read(
        pool: &Weak<Self>,
        worker: &Arc<Worker>,
        reader: &mut proto::Reader<proto::Counted>,
    ) -> (&'static str, String) {
        let started = Instant::now();
        let mut answered = super::asked::Answered::new(started);
        let mut pace = super::asked::Pace::new(started);
        loop {
            let frame = match reader.next().await {
                Some(Ok(frame)) => frame,
                // A process killed with bytes unread resets its end.
                Some(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return worker.exit_reason();
                }
                Some(Err(e)) => return ("protocol", format!("broke the channel: {e}")),
                None => return worker.exit_reason(),
            };
            let read_at = Instant::now();
            lock(&worker.hearing).frame(proto::decoded(reader), read_at);
            if let Some(wait) = pace.take(read_at, frame.len()) {
                tokio::time::sleep(wait).await;
            }
            let Some(pool) = pool.upgrade() else {
                return ("closed", "its pool was closed".into());
            };
            let message = match proto::decode::<Up>(&frame) {
                Ok(m) => m,
                Err(e) => return ("protocol", e.to_string()),
            };
            if let Err(e) = answered.count(&message, &worker.down.1, read_at) {
                return ("protocol", e);
            }
            match message {
                Up::Loaded { module, result } => {
                    // Its texts reach logs and answers: cut and escaped.
                    let result = result
                        .map(|mut info| {
                            for v in &mut info.imports {
                                v.name = crate::sandbox::shown_within(&v.name, MAX_MESSAGE);
                                v.why = crate::sandbox::shown_within(&v.why, MAX_MESSAGE);
                            }
                            info
                        })
                        .map_err(|e| {
                            let e = e.from_worker();
                            match lock(&pool.state).modules.get(&module) {
                                Some(source) => e.naming(&source.name),
                                None => e,
                            }
                        });
                    // Code compiled and handed over that was not asked for
                    // (an honest worker hands over only on a load that
                    // asks it to, and reports what it found in the cache
                    // as from the cache): a lie about what is in its
                    // directory, never taken (found by a tester).
                    if let Ok(info) = &result
                        && !info.from_cache
                        && info.artifact.is_some()
                        && !lock(&worker.state).asked_to_hand_over.contains(&module)
                    {
                        return (
                            "protocol",
                            format!(
                                "said it handed over the compiled code of module {module}, which it was not asked for"
                            ),
                        );
                    }
                    if result.is_err() {
                        pool.forget_load(worker, module);
                    } else {
                        let mut ws = lock(&worker.state);
                        if ws.loaded.contains_key(&module) {
                            ws.compiled.insert(module);
                            // Its jobs sent before this have no compile
                            // left to wait for either.
                            for p in ws.jobs.values_mut() {
                                let cut = p.sent.elapsed().saturating_add(START_LOADED);
                                if p.module == module
                                    && p.running_since.is_none()
                                    && cut < p.start_within
                                {
                                    p.start_within = cut;
                                    p.compiled_since = true;
                                }
                            }
                        }
                    }
                    lock(&worker.state).warming.remove(&module);
                    let take = result
                        .as_ref()
                        .ok()
                        .and_then(|info| pool.take_artifact(worker, module, info));
                    let waiting = lock(&worker.state).loads.remove(&module);
                    let answer = move || {
                        for tx in waiting.unwrap_or_default() {
                            let _ = tx.send(result.clone());
                        }
                    };
                    match take {
                        // Off the async threads (a copy of native code
                        // takes a while), and answered once the artifact is
                        // in the cache and recorded, for the next worker.
                        Some(take) => {
                            let copying = pool.gateway.spawn_blocking(take);
                            let worker = Arc::clone(worker);
                            pool.gateway.spawn(async move {
                                let _ = copying.await;
                                worker.release(super::disk::LOAD_ROOM | module);
                                answer();
                            });
                        }
                        None => {
                            worker.release(super::disk::LOAD_ROOM | module);
                            answer();
                        }
                    }
                }
                Up::Released { .. } => {
                    // Its word is only a cue: the gateway looks for the
                    // released jobs' directories itself.
                    if let Some(disk) = &worker.disk {
                        disk.removed();
                    }
                }
                Up::Running { job } => {
                    if let Some(p) = lock(&worker.state).jobs.get_mut(&job) {
                        p.running_since.get_or_insert_with(Instant::now);
                    }
                }
                Up::Report {
                    job,
                    result,
                    created,
                } => {
                    let written = worker.down.0.written();
                    let pending = lock(&worker.state).ended(job, written);
                    if let Some(p) = pending {
                        let _ = p.reply.send(Answer::Report(result, created));
                    }
                }
                Up::Call(call) => {
                    // A call runs on the gateway's runtime (where this
                    // reader runs too).
                    let _gateway = pool.gateway.enter();
                    if let Err(v) = worker.calls.deliver(call) {
                        return ("protocol", format!("broke the calls protocol: {v}"));
                    }
                }
                Up::Pong { .. } => {}
                Up::Hello { .. } | Up::StartFailed { .. } => {
                    return ("protocol", "sent a second hello".into());
                }
            }
        }
    }
}

/// A task aborted once its handle is dropped: one its awaiting caller gave
/// up on.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A worker being started, until it is the pool's: given up, it is killed
/// and reaped, and then its cgroup removed and its count dropped, off the
/// async threads.
struct Starting {
    child: Option<WorkerProcess>,
    ceiling: Option<super::cgroup::MemoryCeiling>,
    share: Option<super::cgroup::CpuShare>,
    live: Option<Live>,
}

impl Drop for Starting {
    fn drop(&mut self) {
        let (child, live) = (self.child.take(), self.live.take());
        let (ceiling, share) = (self.ceiling.take(), self.share.take());
        if child.is_none() && ceiling.is_none() && share.is_none() && live.is_none() {
            return;
        }
        std::thread::spawn(move || {
            if let Some(mut child) = child {
                let _ = child.kill();
                let _ = child.wait();
            }
            drop(share);
            drop(ceiling);
            drop(live);
        });
    }
}

impl Drop for Worker {
    /// Its directory goes once nothing refers to the worker any more: its
    /// reader, its jobs, and the outputs of its last jobs until the
    /// gateway has copied them.
    /// Removed once the process is gone: a lock a worker held in it (a
    /// removal leaves a directory with a held lock file) goes with it.
    fn drop(&mut self) {
        let mut child = lock(&self.child).take();
        let (zone_dir, name) = (self.zone_dir.clone(), self.name.take());
        let disk = self.disk.take();
        // Its cgroup is removed once its process has left it, here and not
        // on the dropping thread (a runtime's), which would wait for that.
        let (ceiling, share, live) = (self.ceiling.take(), self.share.take(), self.live.take());
        let gone = lock(&self.gone).take();
        std::thread::spawn(move || {
            if let Some(child) = child.as_mut() {
                let _ = child.kill();
                let _ = child.wait();
            }
            // Its room is the zone's again once nothing but the gateway
            // holds its directory.
            drop(disk);
            if let Some(name) = name
                && let Err(e) = crate::sandbox::remove_tree_in(&zone_dir, Path::new(&name))
            {
                tracing::warn!(dir = %zone_dir.path().join(&name).display(), error = %e, "cannot remove a worker's directory");
            }
            drop(share);
            drop(ceiling);
            drop(live);
            if let Some(gone) = gone {
                let _ = gone.send(());
            }
        });
    }
}

impl Worker {
    /// Its directory as `/proc/self/fd/N` of its held descriptor: this
    /// one, whatever is later put at its path in the zone's directory.
    fn dir(&self) -> PathBuf {
        crate::sandbox::beneath::fd_path(&self.dir_fd)
    }

    /// Job `job`'s files are gone or going: its room is released.
    fn release(&self, job: u64) {
        self.release_told(job, None);
    }

    /// [`Worker::release`], the worker told to remove the job's files by a
    /// frame ending at `told_by` in what is written to it
    /// ([`super::disk::WorkerDisk::release`]).
    fn release_told(&self, job: u64, told_by: Option<u64>) {
        if let Some(disk) = &self.disk {
            disk.release(job, told_by);
        }
    }

    fn kill(&self) {
        self.kill_then(|| {});
    }

    /// [`Worker::kill`], then `reaped` once its process is reaped (at
    /// once where it was already).
    fn kill_then(&self, reaped: impl FnOnce() + Send + 'static) {
        // Its channel is shut both ways: a write waiting for room in it
        // fails, so nothing of the gateway's (the drain, the frames it
        // holds, the socket) waits on a process that is gone (found by an
        // attacker: a worker that stopped reading, then sent the gateway a
        // descriptor of its own end, kept its channel from ever draining,
        // and the gateway's drain held two descriptors and a 40 MiB frame
        // for each such worker until it exited).
        let _ = rustix::net::shutdown(&self.channel, rustix::net::Shutdown::Both);
        if let Some(mut child) = lock(&self.child).take() {
            let _ = child.kill();
            // Counted as not yet ended until it is reaped, which the
            // worker itself may not outlast (its own count goes with it):
            // a process stopping waits for this too (found by its test: a
            // pool closed at a stop let the process exit before the
            // worker it had killed was reaped).
            let reaping = self.live.as_ref().map(|live| Live::new(&live.0));
            // Reaped off the async threads.
            std::thread::spawn(move || {
                let _ = child.wait();
                drop(reaping);
                reaped();
            });
        } else {
            reaped();
        }
    }

    fn fault_reason(&self) -> String {
        lock(&self.state)
            .fault
            .clone()
            .unwrap_or_else(|| "the worker failed".into())
    }

    /// Why a worker whose channel closed is gone: how its process ended.
    fn exit_reason(&self) -> (&'static str, String) {
        let status = {
            let mut child = lock(&self.child);
            child.as_mut().and_then(|c| {
                // It closed its channel by exiting, or is about to.
                for _ in 0..50 {
                    if let Ok(Some(status)) = c.try_wait() {
                        return Some(status);
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                None
            })
        };
        if self.ceiling.as_ref().is_some_and(|c| c.oom_killed()) {
            return (
                "memory",
                "exceeded its memory ceiling and was killed".into(),
            );
        }
        match status {
            Some(s) if s.signal().is_some() => (
                "killed",
                format!("was killed by signal {}", s.signal().unwrap_or_default()),
            ),
            Some(s) => ("exited", format!("exited with {s}")),
            None => ("protocol", "closed its channel".into()),
        }
    }
}

/// How soon a wait refused aside is told again when nothing wakes it.
const RETELL: Duration = Duration::from_secs(1);

/// A job's waiting for room or a place, told once it starts (again at
/// each wake-up while the one told could not take it, so a slot refused
/// aside once is set aside as soon as it can be) and, on drop, once it
/// ends.
struct WaitTold<'a> {
    waiting: crate::runner::Waiting<'a>,
    told: std::cell::Cell<bool>,
}

impl WaitTold<'_> {
    fn tell(&self) {
        if !self.told.get() && (self.waiting)(true) {
            self.told.set(true);
        }
    }
}

impl Drop for WaitTold<'_> {
    fn drop(&mut self) {
        if self.told.get() {
            (self.waiting)(false);
        }
    }
}

/// A job's place and room in its worker, given by [`Pool::pick`] and held
/// while its spec is read; dropped before the job is sent, both are given
/// back (and a retiring worker left idle goes).
struct Placed<'a> {
    pool: &'a Arc<Pool>,
    worker: &'a Arc<Worker>,
    job: u64,
    module: u64,
}

impl Drop for Placed<'_> {
    fn drop(&mut self) {
        let retire = {
            let mut ws = lock(&self.worker.state);
            ws.placed = ws.placed.saturating_sub(1);
            self.pool.unweigh(&mut ws, self.job);
            // Never sent: the load counted for it will not happen, unless
            // another job placed here sends it.
            if !ws.loaded.contains_key(&self.module)
                && let Some((_, jobs)) = ws.warming.get_mut(&self.module)
            {
                *jobs = jobs.saturating_sub(1);
                if *jobs == 0 {
                    ws.warming.remove(&self.module);
                }
            }
            ws.retiring && ws.idle()
        };
        self.worker.release(self.job);
        if retire {
            self.pool.retire(self.worker);
        }
        self.pool.changed.notify_waiters();
    }
}

/// A frame the channel cannot carry is refused, for its job alone, before
/// the job is sent.
fn carried(spec: &JobSpec) -> Result<(), String> {
    let size = spec.stdin.len()
        + spec.id.len()
        + spec
            .inputs
            .iter()
            .map(|i| i.name.len() + i.data.len() + 16)
            .sum::<usize>()
        + spec
            .params
            .iter()
            .map(|(k, v)| k.len() + v.len() + 16)
            .sum::<usize>();
    if size > MAX_DOWN_FRAME - (64 << 10) {
        return Err(too_large(size as u64));
    }
    Ok(())
}

fn too_large(size: u64) -> String {
    format!(
        "the job's inputs ({size} bytes) are more than a worker's channel carries ({MAX_DOWN_FRAME} bytes); lower `[server] max_body` or the module's `limits.input`"
    )
}

/// Cancels a job whose run future is dropped before its report arrived.
struct JobGuard<'a> {
    pool: &'a Arc<Pool>,
    worker: &'a Arc<Worker>,
    job: u64,
    done: bool,
}

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        if !self.done {
            let told_by = self.worker.down.send_ending(Down::Cancel { job: self.job });
            self.pool.job_ended(self.worker, self.job);
            self.worker.release_told(self.job, told_by);
        }
    }
}

/// A finished job's outputs, in its worker's directory until dropped.
#[derive(Debug)]
pub struct WorkerOutputs {
    /// The job's `/out` was gone when its report came: the worker removed
    /// it empty (or lost what it held, which it always could).
    removed: bool,
    worker: Arc<Worker>,
    name: String,
    job: u64,
    /// The policy's output limits, enforced on what is copied.
    bounds: crate::sandbox::outputs::Bounds,
    /// The files the worker says its guest created: nothing else is
    /// collected (a worker controls its own `/out` anyway; this keeps out
    /// what someone else moves or links into it).
    created: crate::sandbox::outputs::Created,
}

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("pid", &self.pid)
            .finish_non_exhaustive()
    }
}

impl WorkerOutputs {
    /// Collects (and with `copy_to`, copies) the outputs, never following
    /// a link the worker may have left.
    ///
    /// # Errors
    /// [`CollectError`].
    pub fn collect(&self, copy_to: Option<&Path>) -> Result<Collected, CollectError> {
        if self.removed {
            return crate::sandbox::outputs::collect_nothing(copy_to);
        }
        crate::sandbox::outputs::collect_beneath(
            &self.worker.dir(),
            &self.name,
            copy_to,
            self.bounds,
            Some(&self.created),
        )
    }

    /// Whether the job's `/out` is empty or gone (false when it cannot be
    /// read).
    pub fn left_nothing(&self) -> bool {
        self.removed || crate::sandbox::outputs::is_empty_beneath(&self.worker.dir(), &self.name)
    }
}

impl Drop for WorkerOutputs {
    fn drop(&mut self) {
        let told_by = if self.removed {
            None
        } else {
            self.worker
                .down
                .send_ending(Down::Release { job: self.job })
        };
        self.worker.release_told(self.job, told_by);
    }
}

/// A report from a worker, cut to what its policy allows: the worker may
/// be compromised, and the report is stored and shown to clients.
fn bounded(mut report: JobReport, policy: &Policy, took: Duration) -> JobReport {
    let kept = |limit: crate::policy::ByteSize| {
        usize::try_from(limit.as_u64())
            .unwrap_or(usize::MAX)
            .min(crate::sandbox::MAX_CAPTURE)
    };
    for (captured, limit) in [
        (&mut report.stdout, policy.limits.stdout),
        (&mut report.stderr, policy.limits.stderr),
    ] {
        captured.cut_to(kept(limit));
        // What it says the guest wrote is within the limit (an attacker's
        // worker said 10^15 bytes), and text shorter than that is cut.
        captured.bytes = captured.bytes.min(limit.as_u64());
        captured.truncated |= (captured.text.len() as u64) < captured.bytes;
    }
    if let Some(f) = &mut report.failure {
        truncate(&mut f.message, MAX_MESSAGE);
    }
    report.outputs.truncate(policy.limits.output_files as usize);
    report.skipped_outputs.truncate(64);
    // Its numbers reach every module's metrics (`bulkhead_job_wall_seconds`):
    // within what the job could have taken, never negative, infinite or
    // NaN (found by a tester: a worker's wall time of -1e305 ms, and sums
    // of its jobs' that read `inf`). No job outlives its wall time and the
    // gateway's grace, nor holds more than its limits; nor does it take
    // longer than the gateway's own clock saw, from its `Run` sent to its
    // report read (`took`), so a worker cannot stretch its jobs' times to
    // that bound either.
    let most_ms = policy
        .limits
        .wall_time
        .get()
        .saturating_add(OVERRUN_GRACE)
        .min(took)
        .as_secs_f64()
        * 1000.0;
    let within = |ms: f64| {
        if ms.is_finite() {
            ms.clamp(0.0, most_ms)
        } else {
            0.0
        }
    };
    let m = &mut report.measurements;
    m.wall_time_ms = within(m.wall_time_ms);
    m.cpu_time_ms = within(m.cpu_time_ms);
    m.peak_memory_bytes = m.peak_memory_bytes.min(policy.limits.memory.as_u64());
    m.output_bytes = m.output_bytes.min(policy.limits.output.as_u64());
    m.output_entries = m.output_entries.min(u64::from(policy.limits.output_files));
    // No more host calls than its wall time holds at one every 10 ns (a
    // call into the host takes the guest longer than that; found by a
    // tester: 2^64 - 1 calls stored), and every refusal is a host call.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let most_calls = (m.wall_time_ms * 100_000.0) as u64;
    m.host_calls = m.host_calls.min(most_calls);
    m.refused = m.refused.min(m.host_calls);
    // As the sandbox builds a report: failed exactly when it gives a
    // failure, a limit only beside a failure of kind `limit`, an exit
    // code only as `wasi:cli/exit` carries one (found by a tester: a
    // limit counted for a job stored as succeeded, an exit code of
    // -2147483648).
    report.outcome = if report.failure.is_some() {
        Outcome::Failed
    } else {
        Outcome::Succeeded
    };
    if report.failure.as_ref().map(|f| f.kind) != Some(FailureKind::Limit) {
        report.limit = None;
    }
    report.exit_code = report.exit_code.filter(|code| (0..=255).contains(code));
    report
}

/// `text` cut to at most `max` bytes with control and
/// bidirectional-formatting characters escaped ([`crate::sandbox::shown_within`]).
fn truncate(text: &mut String, max: usize) {
    *text = crate::sandbox::shown_within(text, max);
}

/// The report of a job whose worker failed under it.
/// The report of a job the gateway stopped: its worker `reason` (ran it
/// past its wall time, say); the `wall_time` limit is what ended it.
/// The report of a job its worker overran: one that never started ran
/// into no limit of its own.
fn stopped_report(id: &str, policy: &Policy, reason: &str, wall_time: bool) -> JobReport {
    let mut report = fault_report(id, policy, reason);
    report.limit = wall_time.then_some(crate::job::LimitKind::WallTime);
    report
}

fn fault_report(id: &str, policy: &Policy, reason: &str) -> JobReport {
    let reason = crate::sandbox::shown_within(reason, MAX_MESSAGE);
    let mut report = JobReport::not_run(
        id,
        policy.module.name.as_str(),
        format!("the worker running it {reason}"),
    );
    report.outcome = Outcome::Failed;
    report.failure = Some(Failure {
        kind: FailureKind::Worker,
        message: format!("the worker running it {reason}"),
    });
    report
}

/// The owner a worker's directories get: `run_as` when the gateway is
/// root (the worker switches to it), else the gateway's own user.
fn effective_owner(run_as: Option<(u32, u32)>) -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    (unsafe { libc::geteuid() } == 0).then(|| run_as.unwrap_or((65534, 65534)))
}

/// This process's hard descriptor limit.
fn hard_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable `rlimit`.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return u64::MAX;
    }
    lim.rlim_max
}

/// Makes a zone cache fit for its workers at start, never following a
/// link: what is not a recorded artifact the gateway wrote is removed —
/// whatever an earlier version's workers (which could write the cache)
/// or an earlier run under another user left, and artifacts no record
/// names any more. Kept: `<engine key>/<sha256>.cwasm` regular files of
/// this user with one name that a record names, in directories of this
/// user; those directories and files are given the workers' `group`
/// (mode 0750 and 0640), or made 0700 and 0600 without one.
fn repair_cache(
    cache: &Root,
    records: &ArtifactRecords,
    group: Option<u32>,
) -> std::io::Result<()> {
    use rustix::fs::{AtFlags, FileType, Mode};
    let recorded = records.all()?;
    let uid = rustix::process::geteuid().as_raw();
    let gid = group.map(rustix::fs::Gid::from_raw);
    let (dir_mode, file_mode) = if group.is_some() {
        (0o750, 0o640)
    } else {
        (0o700, 0o600)
    };
    let hex = |name: &str, len: usize| {
        name.len() == len
            && name
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let remove = |at: &Root, name: &std::ffi::OsStr, kind: FileType| {
        let removed = if kind == FileType::Directory {
            crate::sandbox::remove_tree_in(at, Path::new(name))
        } else {
            rustix::fs::unlinkat(at.fd(), name, AtFlags::empty()).map_err(Into::into)
        };
        // What cannot be removed stays; it is never loaded (nothing records
        // it) and workers compile where it is in the way.
        if let Err(e) = &removed
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(cache = %at.path().display(), entry = ?name, error = %e, "cannot clear a zone cache entry");
        }
    };
    for (name, kind, owner) in listing(cache.fd())? {
        let engine = name.to_str().filter(|n| hex(n, 16)).map(str::to_owned);
        let engine_dir = match engine {
            Some(_) if kind == FileType::Directory && owner == uid => {
                cache.below(Path::new(&name)).ok()
            }
            _ => None,
        };
        let (Some(engine), Some(engine_dir)) = (engine, engine_dir) else {
            remove(cache, &name, kind);
            continue;
        };
        rustix::fs::fchown(engine_dir.fd(), None, gid)?;
        rustix::fs::fchmod(engine_dir.fd(), Mode::from_raw_mode(dir_mode))?;
        for (file, kind, owner) in listing(engine_dir.fd())? {
            let kept = kind == FileType::RegularFile
                && owner == uid
                && file
                    .to_str()
                    .and_then(|f| f.strip_suffix(".cwasm"))
                    .is_some_and(|sha| {
                        hex(sha, 64) && recorded.contains(&(engine.clone(), sha.to_owned()))
                    });
            let fd = kept
                .then(|| {
                    crate::sandbox::beneath::open_file_in(engine_dir.fd(), file.as_os_str()).ok()
                })
                .flatten()
                .filter(|fd| rustix::fs::fstat(fd).is_ok_and(|st| st.st_nlink == 1));
            match fd {
                Some(fd) => {
                    rustix::fs::fchown(&fd, None, gid)?;
                    rustix::fs::fchmod(&fd, Mode::from_raw_mode(file_mode))?;
                }
                None => remove(&engine_dir, &file, kind),
            }
        }
    }
    Ok(())
}

/// The entries of the directory `dir`: name, type and owner, each looked
/// at without following a link.
fn listing(
    dir: &std::os::fd::OwnedFd,
) -> std::io::Result<Vec<(std::ffi::OsString, rustix::fs::FileType, u32)>> {
    use std::os::unix::ffi::OsStrExt;
    let mut out = Vec::new();
    for name in crate::sandbox::entry_names(dir)? {
        let name = std::ffi::OsStr::from_bytes(name.to_bytes()).to_owned();
        // Gone meanwhile: nothing to keep or clear.
        if let Ok(st) =
            rustix::fs::statat(dir, name.as_os_str(), rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
        {
            out.push((
                name,
                rustix::fs::FileType::from_raw_mode(st.st_mode),
                st.st_uid,
            ));
        }
    }
    Ok(out)
}

/// The zone's cache (`config.cache_dir`) and its records' directory
/// ([`records_dir`]), each made (mode 0700) and opened from the held
/// directory above them one name at a time, never through a link or a
/// mount ([`Root::dir`]); the cache is then made the gateway's, shared
/// with the workers' `group` for reading (0750), or 0700 without one.
fn open_zone_cache(
    config: &PoolConfig,
    group: Option<u32>,
) -> std::io::Result<(Root, std::os::fd::OwnedFd)> {
    let records = records_dir(&config.cache_dir);
    let root = match &config.cache_held {
        Some(held) => held.clone(),
        None => {
            let top = config.cache_dir.parent().unwrap_or(Path::new("/"));
            crate::sandbox::create_private_dir_all(top)?;
            Root::open(top)?
        }
    };
    let below = |path: &Path| {
        path.strip_prefix(root.path())
            .map(Path::to_owned)
            .map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{} is not below {}", path.display(), root.path().display()),
                )
            })
    };
    let cache = root.made_below(&below(&config.cache_dir)?)?;
    let uid = rustix::process::geteuid();
    // As root, made the gateway's (an earlier version gave it to the
    // workers' uid); otherwise it must already be this user's.
    rustix::fs::fchown(
        cache.fd(),
        uid.is_root().then_some(uid),
        group.map(rustix::fs::Gid::from_raw),
    )?;
    rustix::fs::fchmod(
        cache.fd(),
        rustix::fs::Mode::from_raw_mode(if group.is_some() { 0o750 } else { 0o700 }),
    )?;
    let records = root.dir(&below(&records)?, true)?;
    Ok((cache, records))
}

/// The group the zone's cache is shared with its workers by: theirs, where
/// the gateway is root and they run as another user (mode 0750 and 0640);
/// `None` where they share the gateway's uid (0700 and 0600).
fn cache_group(run_as: Option<(u32, u32)>) -> Option<u32> {
    effective_owner(run_as).map(|(_, gid)| gid)
}

/// Creates `dir` (and parents) with `mode`, owned by `owner` when given.
fn prepare_dir(dir: &Path, owner: Option<(u32, u32)>, mode: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(mode)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// None before the first failure, a quarter of a second after it,
    /// doubling with each failure in a row up to eight seconds.
    #[test]
    fn a_failed_start_waits_longer_each_time_in_a_row() {
        let ms = |n| start_backoff(n).as_millis();
        assert_eq!(
            (0..8).map(ms).collect::<Vec<_>>(),
            [0, 250, 500, 1000, 2000, 4000, 8000, 8000]
        );
        assert_eq!(ms(u32::MAX), 8000);
    }

    /// A round allows two seconds of CPU for each second of its jobs'
    /// time, no more of it than the worker's guest threads can run: sixteen
    /// jobs in a worker for a second allow what two would, not eight times
    /// as much.
    #[test]
    fn a_worker_is_allowed_its_jobs_time_only_as_far_as_its_threads_run_them() {
        let second = Duration::from_secs(1);
        let rest = second.mul_f64(REST_CPU);
        assert_eq!(
            CpuLedger::allowed(second, Duration::ZERO, second),
            second * 2 + rest
        );
        assert_eq!(
            CpuLedger::allowed(second * 16, Duration::ZERO, second),
            second * 2 * super::super::GUEST_THREADS + rest
        );
        // Loading is counted beside its jobs.
        assert_eq!(
            CpuLedger::allowed(second * 16, second, second),
            second * 2 * (super::super::GUEST_THREADS + 1) + rest
        );
        assert_eq!(
            CpuLedger::allowed(Duration::ZERO, Duration::ZERO, second),
            rest
        );
    }

    /// What a worker does not use it keeps, up to ten seconds; what it
    /// uses beyond that it owes until a later allowance pays it.
    #[test]
    fn a_ledger_keeps_ten_seconds_at_most_and_owes_the_rest() {
        let s = Duration::from_secs;
        let mut ledger = CpuLedger::default();
        assert_eq!(ledger.charge(s(30), s(1)), Duration::ZERO);
        assert_eq!(ledger.saved, CPU_SAVED_AT_MOST);
        assert_eq!(ledger.charge(Duration::ZERO, s(12)), s(2));
        assert_eq!(ledger.saved, Duration::ZERO);
        assert_eq!(ledger.charge(s(1), s(1)), s(2));
        assert_eq!(ledger.charge(s(3), Duration::ZERO), Duration::ZERO);
        assert_eq!(ledger.saved, s(1));
    }

    /// A report is read as the worker's own account of its guest: a
    /// failure only the gateway gives (the host's, the worker's) is a
    /// breach, whatever else the report says; the guest's own failures
    /// are read as they come.
    #[test]
    fn a_report_of_a_failure_only_the_gateway_gives_is_a_breach() {
        let with = |kind: FailureKind| {
            let mut report = JobReport::not_run("j", "m", "why");
            report.outcome = Outcome::Failed;
            report.failure = Some(Failure {
                kind,
                message: "why".into(),
            });
            serde_json::to_string(&report).unwrap()
        };
        let policy = demo_policy("");
        let none = super::super::proto::CreatedFiles::default();
        for kind in [FailureKind::Host, FailureKind::Worker] {
            let read = gateways_to_read(&with(kind), &none, &policy);
            assert!(read.is_err(), "{kind:?} was taken from a worker");
        }
        for kind in [
            FailureKind::Limit,
            FailureKind::Trap,
            FailureKind::Exit,
            FailureKind::Instantiate,
            FailureKind::Output,
        ] {
            let (read, _) = gateways_to_read(&with(kind), &none, &policy).unwrap();
            assert_eq!(read.failure.unwrap().kind, kind);
        }
        assert!(gateways_to_read("{", &none, &policy).is_err());
    }

    /// A worker's message is cut to its bound, control and bidirectional
    /// characters escaped, and only what is kept is escaped.
    #[test]
    fn a_workers_message_is_cut_then_escaped() {
        let mut shouted = "\u{1}".repeat(16 << 20);
        truncate(&mut shouted, 1024);
        assert_eq!(shouted, "\\u{1}".repeat(1024 / 5));
        // The escape that would cross the bound is left out whole.
        let mut mixed = format!("é{}a\u{202e}b", "x".repeat(1019));
        truncate(&mut mixed, 1024);
        assert_eq!(mixed, format!("é{}a", "x".repeat(1019)));
        let mut plain = "é".repeat(600);
        truncate(&mut plain, 1023);
        assert_eq!(plain, "é".repeat(511));
        let mut short = "ok\u{7}".to_owned();
        truncate(&mut short, 1024);
        assert_eq!(short, "ok\\u{7}");
    }

    /// `demo`'s policy, with `limits` (TOML lines) in its `[limits]`.
    fn demo_policy(limits: &str) -> Policy {
        let text = format!(
            "version = 1\n[module]\nname = \"demo\"\nsha256 = \"{}\"\n[limits]\n{limits}",
            "0".repeat(64)
        );
        Policy::parse(&text, std::path::Path::new("demo.toml")).unwrap()
    }

    const HOUR: Duration = Duration::from_secs(3600);

    /// A report's numbers are kept within what its job could have taken,
    /// and a limit only beside a failure of kind `limit`.
    #[test]
    fn a_reports_numbers_are_kept_within_what_its_job_could_take() {
        let policy = demo_policy("memory = \"64 MiB\"\nwall_time = \"10s\"\noutput = \"1 MiB\"\n");
        let mut report = JobReport::not_run("j", "demo", "why");
        report.failure = Some(Failure {
            kind: FailureKind::Exit,
            message: "exited 1".into(),
        });
        report.limit = Some(crate::job::LimitKind::Memory);
        let m = &mut report.measurements;
        m.wall_time_ms = -1e305;
        m.cpu_time_ms = f64::NAN;
        m.peak_memory_bytes = u64::MAX;
        m.output_bytes = u64::MAX;
        let kept = bounded(report.clone(), &policy, HOUR);
        let m = &kept.measurements;
        assert_eq!((m.wall_time_ms, m.cpu_time_ms), (0.0, 0.0));
        assert_eq!(m.peak_memory_bytes, 64 << 20);
        assert_eq!(m.output_bytes, 1 << 20);
        assert_eq!(kept.limit, None, "a limit said beside an exit");
        report.measurements.wall_time_ms = f64::INFINITY;
        report.measurements.cpu_time_ms = 1e300;
        report.failure.as_mut().unwrap().kind = FailureKind::Limit;
        let kept = bounded(report, &policy, HOUR);
        assert_eq!(kept.measurements.wall_time_ms, 0.0);
        assert_eq!(
            kept.measurements.cpu_time_ms, 15_000.0,
            "10 s and the grace"
        );
        assert_eq!(kept.limit, Some(crate::job::LimitKind::Memory));
        // Said to have succeeded beside a failure, with an exit code no
        // guest can give, more entries than its policy allows and more
        // refusals than calls.
        let mut report = JobReport::not_run("j", "demo", "why");
        report.outcome = Outcome::Succeeded;
        report.exit_code = Some(i32::MIN);
        report.measurements.output_entries = u64::MAX;
        report.measurements.wall_time_ms = 1.0;
        report.measurements.host_calls = 7;
        report.measurements.refused = u64::MAX;
        let kept = bounded(report, &policy, HOUR);
        assert_eq!(kept.outcome, Outcome::Failed);
        assert_eq!(kept.exit_code, None);
        assert_eq!(
            kept.measurements.output_entries,
            u64::from(policy.limits.output_files)
        );
        assert_eq!(kept.measurements.refused, 7);
        // No more host calls than its wall time holds.
        let mut calls = JobReport::not_run("j", "demo", "why");
        calls.measurements.wall_time_ms = 2.0;
        calls.measurements.host_calls = u64::MAX;
        calls.measurements.refused = u64::MAX;
        let kept = bounded(calls, &policy, HOUR);
        assert_eq!(kept.measurements.host_calls, 200_000);
        assert_eq!(kept.measurements.refused, 200_000);
        // Nor longer than the gateway saw it take.
        let mut slow = JobReport::not_run("j", "demo", "why");
        slow.measurements.wall_time_ms = 9_000.0;
        let kept = bounded(slow, &policy, Duration::from_secs(2));
        assert_eq!(kept.measurements.wall_time_ms, 2_000.0);
        let mut honest = JobReport::not_run("j", "demo", "why");
        honest.outcome = Outcome::Succeeded;
        honest.failure = None;
        honest.exit_code = Some(0);
        let kept = bounded(honest.clone(), &policy, HOUR);
        assert_eq!(
            (kept.outcome, kept.exit_code),
            (Outcome::Succeeded, Some(0))
        );
    }

    /// A report the gateway cannot read is a breach whose reason quotes
    /// at most a little of it, escaped: the decoder's error quotes the
    /// unknown value whole.
    #[test]
    fn an_unreadable_reports_quote_is_cut_and_escaped() {
        let policy = demo_policy("stdout = \"1 MiB\"\n");
        let mut report = serde_json::to_value(JobReport::not_run("j", "demo", "why")).unwrap();
        report["outcome"] = format!(
            "x\n2026-01-01 INFO forged\u{1b}[0m{}",
            "y".repeat(100 << 10)
        )
        .into();
        let json = serde_json::to_string(&report).unwrap();
        let created = postcard::from_bytes(
            &postcard::to_allocvec(&super::super::proto::Blob(Vec::new().into())).unwrap(),
        )
        .unwrap();
        let reason = gateways_to_read(&json, &created, &policy).unwrap_err();
        assert!(reason.starts_with("sent an unreadable report"), "{reason}");
        assert!(reason.len() < 2 * MAX_MESSAGE, "{}", reason.len());
        assert!(!reason.chars().any(char::is_control), "{reason}");
    }

    /// A report naming more created files than its policy's
    /// `output_files`, or longer than its captures allow, is refused
    /// before any of it is read; one within both is read whole (found by
    /// a tester: a report naming 2.3 million made-up files took the
    /// gateway 0.75 s of CPU, every job).
    #[test]
    fn a_report_past_what_its_policy_allows_is_refused_unread() {
        use super::super::proto::CreatedFiles;
        use crate::sandbox::outputs::FileId;
        let policy = demo_policy("output_files = 3\nstdout = \"1 KiB\"\nstderr = \"1 KiB\"\n");
        let ran = || {
            let mut report = JobReport::not_run("j", "demo", "why");
            report.outcome = Outcome::Succeeded;
            report.failure = None;
            report
        };
        let json = serde_json::to_string(&ran()).unwrap();
        let files = |n: u64| {
            CreatedFiles::pack((0..n).map(|i| FileId {
                dev: 1,
                ino: i,
                born: (-1, 2),
                handle: u64::MAX - i,
            }))
        };
        let (_, created) = gateways_to_read(&json, &files(3), &policy).unwrap();
        assert_eq!(created, files(3).unpack());
        assert!(created.contains(&FileId {
            dev: 1,
            ino: 2,
            born: (-1, 2),
            handle: u64::MAX - 2
        }));
        let over = gateways_to_read(&json, &files(4), &policy).unwrap_err();
        assert!(over.contains("created 4 files"), "{over}");
        // Not whole records.
        let ragged: CreatedFiles = postcard::from_bytes(
            &postcard::to_allocvec(&super::super::proto::Blob(vec![0u8; 37].into())).unwrap(),
        )
        .unwrap();
        assert!(gateways_to_read(&json, &ragged, &policy).is_err());
        // 12 KiB of captures and 64 KiB beside them.
        let mut long = ran();
        long.stdout.text = "x".repeat(80 << 10);
        let long = serde_json::to_string(&long).unwrap();
        let refused = gateways_to_read(&long, &files(0), &policy).unwrap_err();
        assert!(
            refused.contains("more than its job's captures allow"),
            "{refused}"
        );
    }

    /// What a report says its guest wrote is kept within the policy's
    /// limits, its text marked cut where it is shorter (found by an
    /// attacker: a worker said its guest wrote 10^15 bytes, and it was
    /// stored so).
    #[test]
    fn a_reports_counts_of_what_its_guest_wrote_are_within_the_limits() {
        let policy = demo_policy("stdout = \"1 KiB\"\n");
        let mut report = JobReport::not_run("j", "demo", "why");
        report.stdout.text = "hi".into();
        report.stdout.bytes = 1_000_000_000_000_000;
        report.stderr.text = "ok".into();
        report.stderr.bytes = 2;
        let report = bounded(report, &policy, HOUR);
        assert_eq!(report.stdout.bytes, 1024);
        assert!(report.stdout.truncated);
        assert_eq!(report.stderr.bytes, 2);
        assert!(!report.stderr.truncated);
    }

    /// A wait whose slot could not be set aside the first time it was told
    /// is told again at the next wake-up, and told its end only once it
    /// was set aside (found by an attacker: one refusal, at a moment when
    /// `max_queued` jobs were aside, held the job's slot for its whole
    /// wait, 210 s, while the jobs aside drained).
    #[test]
    fn a_wait_refused_aside_is_told_again_until_it_is_taken() {
        let calls = Mutex::new(Vec::new());
        let answers = Mutex::new(vec![true, false]);
        let waiting = |w: bool| {
            lock(&calls).push(w);
            !w || lock(&answers).pop().unwrap_or(true)
        };
        {
            let told = WaitTold {
                waiting: &waiting,
                told: std::cell::Cell::new(false),
            };
            told.tell();
            assert_eq!(*lock(&calls), [true], "told once");
            told.tell();
            assert_eq!(*lock(&calls), [true, true], "refused, so told again");
            told.tell();
            assert_eq!(*lock(&calls), [true, true], "taken: not told again");
        }
        assert_eq!(*lock(&calls), [true, true, false], "its end told once");
        lock(&calls).clear();
        let never = |w: bool| {
            lock(&calls).push(w);
            false
        };
        {
            let told = WaitTold {
                waiting: &never,
                told: std::cell::Cell::new(false),
            };
            told.tell();
        }
        assert_eq!(*lock(&calls), [true], "a refused wait's end is not told");
    }

    /// A worker that stops reading while the gateway keeps answering it
    /// (credits for a refused call's body, say) fills its channel, then
    /// the frames waiting unwritten to the bound, no further: the rest is
    /// dropped and the link says so, and stays so as the worker reads.
    #[tokio::test]
    async fn a_worker_that_stops_reading_fills_its_queue_to_the_bound_only() {
        let (gateway, worker) = std::os::unix::net::UnixStream::pair().unwrap();
        let (_, write) = proto::halves(gateway).unwrap();
        let link = Arc::new(Link::bounded(write, MAX_DOWN_FRAME, MAX_QUEUED_FRAMES));
        tokio::spawn(Link::drain(Arc::downgrade(&link)));
        let outbox = Outbox(Arc::clone(&link), crate::worker::asked::Asked::default());
        let mut sent = 0u64;
        while link.waiting() < MAX_QUEUED_FRAMES {
            assert!(outbox.send(Down::Ping { seq: sent }));
            sent += 1;
            assert!(
                sent < 2 * MAX_QUEUED_FRAMES as u64,
                "the socket never filled"
            );
        }
        assert!(!outbox.overflowed());
        assert!(!outbox.send(Down::Ping { seq: 0 }));
        assert!(outbox.overflowed());
        assert_eq!(link.waiting(), MAX_QUEUED_FRAMES);
        // Once overflowed it stays so, even as the worker reads: it is
        // faulted, not forgiven.
        let (mut reader, _) = proto::split(worker, MAX_DOWN_FRAME, MAX_UP_FRAME).unwrap();
        for _ in 0..1_000 {
            proto::recv::<Down>(&mut reader).await.unwrap();
        }
        until_fewer(&link).await;
        assert!(!outbox.send(Down::Ping { seq: 1 }));
        assert!(outbox.overflowed());
    }

    /// Until some of what waited is written.
    async fn until_fewer(link: &Link) {
        for _ in 0..1_000 {
            if link.waiting() < MAX_QUEUED_FRAMES {
                return;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("nothing waiting was written");
    }

    fn artifact(byte: u8) -> Artifact {
        Artifact {
            engine: "0123456789abcdef".into(),
            sha256: Sha256Hex::digest(&[byte]),
            len: 1,
        }
    }

    /// Only a worker sent no job is taken at its word, and only for a
    /// well-formed artifact it compiled.
    #[test]
    fn a_record_is_taken_only_from_a_worker_that_ran_no_guest() {
        let a = artifact(1);
        assert_eq!(recordable(true, true, Some(&a)), Some(&a));
        assert_eq!(recordable(false, true, Some(&a)), None);
        assert_eq!(recordable(true, false, Some(&a)), None);
        assert_eq!(recordable(true, true, None), None);
        let odd = Artifact {
            engine: "not-an-engine".into(),
            ..a
        };
        assert_eq!(recordable(true, true, Some(&odd)), None);
        let mut ws = WorkerState::default();
        assert!(ws.pristine());
        ws.started = 1;
        assert!(!ws.pristine());
    }

    #[test]
    fn the_records_lie_beside_the_zone_cache_not_in_it() {
        let cache = Path::new("/data/cache/zones/untrusted");
        let records = records_dir(cache);
        assert_eq!(records, Path::new("/data/cache/zones/untrusted.records"));
        assert!(!records.starts_with(cache));
    }
}
