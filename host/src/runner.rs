//! Where jobs run: the runner interface, with an in-process and a
//! worker-pool implementation.
//!
//! A [`Runner`] loads a module (verified against its policy) and runs jobs
//! of it; dropping a [`Runner::run`] future cancels the job. The service
//! and `bulkhead run` hold one and never know which kind it is:
//! - [`InProcess`]: the sandbox in this process. For debugging; a runtime
//!   escape here reaches everything the process holds.
//! - [`Workers`]: hardened worker processes, one [`Pool`] per trust zone
//!   (see [`crate::worker`]). The gateway only checks a module's size, pin
//!   and header; its bytes are parsed and compiled in the zone's workers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;

use crate::job::egress::Egress;
use crate::job::{JobReport, JobSpec};
use crate::policy::{Policy, Sha256Hex};
use crate::sandbox::outputs::{CollectError, Collected};
use crate::sandbox::{JobDir, JobError, LoadError, LoadInfo, LoadedModule, Sandbox, SandboxConfig};
use crate::worker::harden::Applied;
use crate::worker::pool::{Pool, WorkerOutputs};

/// A module ready to run.
#[derive(Debug)]
pub struct Module {
    policy: Policy,
    sha256: Sha256Hex,
    info: LoadInfo,
    place: Place,
}

#[derive(Debug)]
enum Place {
    Local(Arc<LoadedModule>),
    Pool(Arc<Pool>, u64),
}

impl Module {
    /// The policy it runs under.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Its verified digest.
    pub fn sha256(&self) -> &Sha256Hex {
        &self.sha256
    }

    /// Whether its compiled code came from a cache.
    pub fn from_cache(&self) -> bool {
        self.info.from_cache
    }

    /// What its load found (cache, WASIp1 adaptation, the imports'
    /// verdicts). In worker mode this is the worker's word: show it
    /// escaped, decide nothing on it.
    pub fn info(&self) -> &LoadInfo {
        &self.info
    }
}

/// A finished job's outputs, where the runner left them; removed when
/// dropped.
#[derive(Debug)]
pub enum Outputs {
    /// None to collect.
    None,
    /// In a job directory of this process's sandbox, and what its policy
    /// lets its guest leave there.
    Local(JobDir, crate::sandbox::outputs::Bounds),
    /// In a worker's directory.
    Worker(WorkerOutputs),
}

impl Outputs {
    /// Whether they were left by a worker process, whose own account of
    /// them (the report's lists) is not to be trusted.
    pub fn from_worker(&self) -> bool {
        matches!(self, Self::Worker(_))
    }

    /// Whether a worker's `/out` is empty, read without blocking on more
    /// than one small directory: most jobs leave nothing, and need no copy
    /// off the async threads. False when it cannot tell (collecting then
    /// says why) and for outputs not left by a worker.
    pub fn worker_left_nothing(&self) -> bool {
        match self {
            Self::Worker(w) => w.left_nothing(),
            Self::None | Self::Local(..) => false,
        }
    }

    /// Lets them go: a job directory of this process is removed now, on
    /// this thread ([`JobDir::remove`]); a worker's is released to it.
    pub fn remove(self) {
        match self {
            Self::Local(dir, _) => dir.remove(),
            Self::None | Self::Worker(_) => {}
        }
    }

    /// Collects (and with `copy_to`, copies) them, never following a link.
    ///
    /// # Errors
    /// [`CollectError`].
    pub fn collect(&self, copy_to: Option<&Path>) -> Result<Collected, CollectError> {
        match self {
            Self::None => Ok(Collected::default()),
            // The directory made, not what is at its path now.
            Self::Local(dir, bounds) => {
                let out = dir.open_output_to_collect().map_err(CollectError::Root)?;
                crate::sandbox::outputs::collect(
                    &crate::sandbox::beneath::fd_path(&out),
                    copy_to,
                    *bounds,
                    Some(&dir.created()),
                )
            }
            Self::Worker(w) => w.collect(copy_to),
        }
    }
}

/// A job's report and its outputs.
#[derive(Debug)]
pub struct Finished {
    /// What happened.
    pub report: JobReport,
    /// What it left in `/out`.
    pub outputs: Outputs,
}

/// What a runner says about itself, for readiness, metrics and logs.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RunnerState {
    /// `process` or `in-process`.
    pub mode: &'static str,
    /// Per zone: the hardening its workers report.
    pub zones: BTreeMap<String, Applied>,
    /// Per zone: its live workers' process ids.
    pub workers: BTreeMap<String, Vec<u32>>,
    /// Per zone: its successor workers' process ids: each started ahead of a
    /// worker's retirement, sent the zone's modules, and given no job
    /// until a worker retires.
    pub successors: BTreeMap<String, Vec<u32>>,
    /// Per zone: its disk, which its workers' directories (each a file
    /// system of its own, as large as its jobs' rooms) hold at most
    /// together; `null` where they are plain directories in the zone's
    /// work directory (not bounded by the kernel).
    pub disk: BTreeMap<String, Option<u64>>,
    /// Per zone: the bytes of its disk its workers' directories are
    /// given now: its running and unreleased jobs' rooms, and the spares
    /// busy workers keep.
    pub disk_given: BTreeMap<String, u64>,
    /// Per zone: bytes of frames (jobs' `Run`s with their inputs, module
    /// loads) the gateway holds for its workers that have not left it
    /// yet, bounded by the workers' places.
    pub queued: BTreeMap<String, u64>,
    /// Per zone: the memory its workers are counted as holding for module
    /// loads not yet answered.
    pub loads_held: BTreeMap<String, u64>,
    /// Per zone: its starts of a worker that failed in a row, none of
    /// its workers live since (0: none failed, or a worker started
    /// after). Such a zone runs no job until a start succeeds.
    pub failed_starts: BTreeMap<String, u32>,
}

/// Told `true` when a job starts waiting for room in its zone's disk or
/// for a place in its zone's workers, and `false` once it stops (given
/// them, or its run ended): its caller may lend its running place
/// meanwhile
/// ([`Slot::set_aside`](crate::service::scheduler::Slot::set_aside)).
/// Answers `true` when it did, `false` when it could not: it is told
/// again while the job still waits, until it can, and told `false` only
/// after a `true`.
pub type Waiting<'a> = &'a (dyn Fn(bool) -> bool + Send + Sync);

/// What a service's queue tells a run of its job beyond the spec.
#[derive(Clone, Copy)]
pub struct Queued<'a> {
    /// Whose job it is: jobs waiting for room in a zone's disk hold back
    /// only tenants holding as much of it or more
    /// ([`crate::worker::disk`]).
    pub tenant: &'a str,
    /// Told when it starts and stops waiting for room or a place.
    pub waiting: Waiting<'a>,
    /// When it gives up waiting for room or a place, if ever: its run
    /// then ends with [`JobError::NotPlaced`], nothing of it run (an
    /// inline job, whose caller waits, is stored and queued instead).
    pub place_by: Option<tokio::time::Instant>,
}

impl std::fmt::Debug for Queued<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Queued")
            .field("tenant", &self.tenant)
            .finish_non_exhaustive()
    }
}

impl Queued<'_> {
    /// A job of no tenant in particular, whose waits nobody hears of.
    pub const ALONE: Queued<'static> = Queued {
        tenant: "",
        waiting: &|_| true,
        place_by: None,
    };
}

/// A pool's refusal of a job as the job's error: it had no place in time,
/// or its worker could not run it.
fn pool_error(message: String) -> JobError {
    if message == crate::worker::pool::NOT_PLACED {
        JobError::NotPlaced
    } else {
        JobError::Worker(message)
    }
}

/// A job's spec, read when its run asks for it ([`Runner::run_loaded`]).
pub type Load<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<JobSpec, JobError>> + Send + 'a>>;

/// Loads modules and runs jobs.
#[async_trait::async_trait]
pub trait Runner: Send + Sync + std::fmt::Debug {
    /// Verifies `wasm` against `policy` and makes it ready to run.
    ///
    /// # Errors
    /// [`LoadError`].
    async fn load(&self, policy: Policy, wasm: Bytes) -> Result<Arc<Module>, LoadError>;

    /// Runs one job; every way the guest ends yields a report. Dropping
    /// the future cancels the job.
    ///
    /// # Errors
    /// [`JobError`] when the job is refused before its guest starts.
    async fn run(
        &self,
        module: &Module,
        spec: &JobSpec,
        egress: Option<Arc<dyn Egress>>,
    ) -> Result<Finished, JobError> {
        self.run_queued(module, spec, egress, Queued::ALONE).await
    }

    /// [`Runner::run`] of a job of `queued.tenant`, telling
    /// `queued.waiting` when the job starts waiting for room in its zone's
    /// disk (`true`) and when it stops (`false`).
    ///
    /// # Errors
    /// [`JobError`] when the job is refused before its guest starts.
    async fn run_queued(
        &self,
        module: &Module,
        spec: &JobSpec,
        egress: Option<Arc<dyn Egress>>,
        queued: Queued<'_>,
    ) -> Result<Finished, JobError>;

    /// [`Runner::run_queued`] of a job whose spec is read (`load`) only
    /// once it can run: where it waits for room or a place first, nothing
    /// of its inputs is held while it waits. `sizes`: the sizes of its
    /// inputs and stdin, the room it needs. Read first by default.
    ///
    /// # Errors
    /// [`JobError`] when the job is refused before its guest starts, or
    /// what `load` failed with.
    async fn run_loaded(
        &self,
        module: &Module,
        sizes: &[u64],
        load: Load<'_>,
        egress: Option<Arc<dyn Egress>>,
        queued: Queued<'_>,
    ) -> Result<Finished, JobError> {
        let _ = sizes;
        let spec = load.await?;
        self.run_queued(module, &spec, egress, queued).await
    }

    /// Where this process keeps job directories.
    fn work_dir(&self) -> &Path;

    /// What it says about itself.
    fn state(&self) -> RunnerState;

    /// Stops its workers, if any (at shutdown).
    fn close(&self) {}

    /// Once the workers [`Runner::close`] stopped have wholly ended (their
    /// directories and cgroups removed).
    async fn ended(&self) {}
}

/// Jobs run in this process's sandbox.
#[derive(Debug)]
pub struct InProcess {
    sandbox: Sandbox,
    /// The work directory held open, and `/proc/self/fd/N` naming it:
    /// where job directories are made, whatever is later put at its path.
    held: Option<(crate::sandbox::beneath::Root, PathBuf)>,
}

impl InProcess {
    /// Over `sandbox`, its job directories made in its work directory by
    /// path.
    pub fn new(sandbox: Sandbox) -> Self {
        Self {
            sandbox,
            held: None,
        }
    }

    /// Over `sandbox`, its job directories made in `work` (its work
    /// directory, held open), reached through that descriptor.
    pub fn holding(sandbox: Sandbox, work: crate::sandbox::beneath::Root) -> Self {
        let at = crate::sandbox::beneath::fd_path(work.fd());
        Self {
            sandbox,
            held: Some((work, at)),
        }
    }

    /// The sandbox.
    pub fn sandbox(&self) -> &Sandbox {
        &self.sandbox
    }
}

#[async_trait::async_trait]
impl Runner for InProcess {
    async fn load(&self, policy: Policy, wasm: Bytes) -> Result<Arc<Module>, LoadError> {
        let loaded = self.sandbox.load(policy, &wasm)?;
        Ok(Arc::new(Module {
            policy: loaded.policy().clone(),
            sha256: loaded.sha256().clone(),
            info: loaded.info(),
            place: Place::Local(loaded),
        }))
    }

    async fn run_queued(
        &self,
        module: &Module,
        spec: &JobSpec,
        egress: Option<Arc<dyn Egress>>,
        _queued: Queued<'_>,
    ) -> Result<Finished, JobError> {
        let Place::Local(loaded) = &module.place else {
            return Err(JobError::Worker(
                "the module was loaded by another runner".into(),
            ));
        };
        // A cancelled job's future is dropped on an async thread, with
        // whatever tree its guest left in this.
        let parent = self
            .held
            .as_ref()
            .map_or(&self.sandbox.config().work_dir, |(_, at)| at);
        let dir = JobDir::create(parent, &spec.id)?.removed_on(tokio::runtime::Handle::current());
        let report = self.sandbox.run_with(loaded, spec, &dir, egress).await?;
        Ok(Finished {
            report,
            outputs: Outputs::Local(
                dir,
                crate::sandbox::outputs::Bounds::of(&loaded.policy().limits),
            ),
        })
    }

    fn work_dir(&self) -> &Path {
        &self.sandbox.config().work_dir
    }

    fn state(&self) -> RunnerState {
        RunnerState {
            mode: "in-process",
            zones: BTreeMap::new(),
            workers: BTreeMap::new(),
            successors: BTreeMap::new(),
            disk: BTreeMap::new(),
            disk_given: BTreeMap::new(),
            queued: BTreeMap::new(),
            loads_held: BTreeMap::new(),
            failed_starts: BTreeMap::new(),
        }
    }
}

/// Jobs run in worker processes, a pool per zone.
#[derive(Debug)]
pub struct Workers {
    /// The host's module and limit settings (checked in the gateway
    /// before a module goes to a worker).
    limits: SandboxConfig,
    pools: BTreeMap<String, Arc<Pool>>,
    work_dir: PathBuf,
}

impl Workers {
    /// Over started pools; `limits` bounds modules as a sandbox would.
    pub fn new(limits: SandboxConfig, pools: BTreeMap<String, Arc<Pool>>) -> Self {
        Self {
            work_dir: limits.work_dir.clone(),
            limits,
            pools,
        }
    }

    /// The pools, by zone.
    pub fn pools(&self) -> &BTreeMap<String, Arc<Pool>> {
        &self.pools
    }

    /// What `of` says of each zone's pool, by zone.
    fn per_zone<T>(&self, of: impl Fn(&Pool) -> T) -> BTreeMap<String, T> {
        self.pools
            .iter()
            .map(|(zone, pool)| (zone.clone(), of(pool)))
            .collect()
    }
}

#[async_trait::async_trait]
impl Runner for Workers {
    async fn load(&self, policy: Policy, wasm: Bytes) -> Result<Arc<Module>, LoadError> {
        let sha256 = crate::sandbox::precheck(&self.limits, &policy, &wasm)?;
        let zone = policy.module.zone.to_string();
        let Some(pool) = self.pools.get(&zone) else {
            return Err(LoadError::Unsupported {
                module: policy.module.name.to_string(),
                reason: format!("no worker pool serves zone `{zone}`"),
            });
        };
        let (id, info) = pool.load(&policy, wasm).await?;
        Ok(Arc::new(Module {
            policy,
            sha256,
            info,
            place: Place::Pool(Arc::clone(pool), id),
        }))
    }

    async fn run_queued(
        &self,
        module: &Module,
        spec: &JobSpec,
        egress: Option<Arc<dyn Egress>>,
        queued: Queued<'_>,
    ) -> Result<Finished, JobError> {
        let Place::Pool(pool, id) = &module.place else {
            return Err(JobError::Worker(
                "the module was loaded by another runner".into(),
            ));
        };
        crate::sandbox::validate(&module.policy, spec)?;
        let policy = &module.policy;
        let egress = egress.filter(|_| !policy.network.services.is_empty());
        let ran = pool
            .run(*id, policy, spec, egress.clone(), queued)
            .await
            .map_err(pool_error)?;
        Ok(Self::finished(module, &spec.id, ran, egress))
    }

    async fn run_loaded(
        &self,
        module: &Module,
        sizes: &[u64],
        load: Load<'_>,
        egress: Option<Arc<dyn Egress>>,
        queued: Queued<'_>,
    ) -> Result<Finished, JobError> {
        let Place::Pool(pool, id) = &module.place else {
            return Err(JobError::Worker(
                "the module was loaded by another runner".into(),
            ));
        };
        let policy = &module.policy;
        let egress = egress.filter(|_| !policy.network.services.is_empty());
        // What `load` failed with, and the job's id once it is read.
        let failed = std::sync::Mutex::new(None);
        let job_id = std::sync::Mutex::new(String::new());
        let load = async {
            let spec = load
                .await
                .and_then(|spec| crate::sandbox::validate(policy, &spec).map(|()| spec));
            match spec {
                Ok(spec) => {
                    spec.id
                        .clone_into(&mut job_id.lock().unwrap_or_else(|e| e.into_inner()));
                    Ok(spec)
                }
                Err(e) => {
                    let message = e.to_string();
                    *failed.lock().unwrap_or_else(|e| e.into_inner()) = Some(e);
                    Err(message)
                }
            }
        };
        let ran = pool
            .run_loaded(*id, policy, sizes, load, egress.clone(), queued)
            .await
            .map_err(|message| {
                failed
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take()
                    .unwrap_or_else(|| pool_error(message))
            })?;
        let job_id = job_id.into_inner().unwrap_or_else(|e| e.into_inner());
        Ok(Self::finished(module, &job_id, ran, egress))
    }

    fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    fn state(&self) -> RunnerState {
        RunnerState {
            mode: "process",
            zones: self.per_zone(|pool| pool.applied()),
            workers: self.per_zone(|pool| pool.pids()),
            successors: self.per_zone(|pool| pool.successor_pids()),
            disk: self.per_zone(|pool| pool.disk()),
            disk_given: self.per_zone(|pool| pool.disk_given()),
            queued: self.per_zone(|pool| pool.queued_for_workers()),
            loads_held: self.per_zone(|pool| pool.loads_held()),
            failed_starts: self.per_zone(|pool| pool.failing_starts()),
        }
    }

    fn close(&self) {
        for pool in self.pools.values() {
            pool.close();
        }
    }

    async fn ended(&self) {
        futures_util::future::join_all(self.pools.values().map(|pool| pool.ended())).await;
    }
}

impl Workers {
    /// A job's run on a worker as the gateway reports it.
    fn finished(
        module: &Module,
        job_id: &str,
        (mut report, outputs): (JobReport, Option<crate::worker::pool::WorkerOutputs>),
        egress: Option<Arc<dyn Egress>>,
    ) -> Finished {
        let policy = &module.policy;
        // The gateway's own identity of the job, whatever the worker said.
        report.job_id = job_id.to_owned();
        report.module = policy.module.name.to_string();
        report.module_sha256 = module.sha256.to_string();
        report.policy_sha256 = policy.source_sha256.as_ref().map(ToString::to_string);
        report.zone = policy.module.zone.to_string();
        report.calls = egress.map(|e| e.report());
        Finished {
            report,
            outputs: outputs.map_or(Outputs::None, Outputs::Worker),
        }
    }
}
