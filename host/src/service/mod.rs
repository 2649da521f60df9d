//! The job service: accepts jobs durably, schedules them fairly, runs them in
//! the sandbox, keeps their reports and outputs, and recovers after a crash.
//!
//! A job is accepted only once its inputs are on disk (fsynced) and its row is
//! committed as `queued`; from then on it is finished, or re-run up to
//! `queue.max_attempts` starts and then finished `failed`, never lost: a crash
//! leaves it `queued` or `running`, and startup puts every `running` job back
//! in the queue. A failure of the host on a job's path (the store, the disk)
//! never drops the job from the queue: a storage failure gives the job back
//! to the queue without spending an attempt and marks the service not ready
//! until the storage writes again; any other host failure spends an attempt.
//! The keeper task re-reads the store's unfinished jobs after every such
//! failure and every half minute, so nothing waits for a restart. Every
//! lookup is by `(tenant, id)`, so one tenant's jobs do not exist for
//! another.
//!
//! This module knows nothing about HTTP; `api` maps its errors to statuses.

mod admit;
mod layout;
mod locks;
mod nodes;
mod run;
pub mod scheduler;

pub use admit::{Accepted, MAX_IDEMPOTENCY_KEY, Submission, check_idempotency_key};
pub use layout::ORPHAN_AGE;
pub use nodes::{HEARTBEAT, NodeInfo, STALE_AFTER};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, oneshot};

use crate::auth::Identity;
use crate::config::ServeConfig;
use crate::policy::Policy;
use crate::runner::{InProcess, Module, Runner, Workers};
use crate::sandbox::{Sandbox, SandboxConfig};
use crate::store::{AuditEntry, DeleteOutcome, JobRecord, JobStore, StoreError, now_ms};
use locks::{canonical_to_be, empty_work_dir, lock_data_dir};
pub use locks::{check_above, lock_work_dir, share_cache_dir};
use scheduler::{QueueLimits, QueuedJob, Rejection, Scheduler, Slot};

/// Why the service refused a request. `api` maps each to one status.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// No such module, or the caller may not see it (404).
    #[error("no module `{0}`")]
    UnknownModule(String),
    /// The caller lacks every scope the module's policy accepts (403).
    #[error("module `{module}` requires one of the scopes {scopes:?}")]
    ScopeMissing { module: String, scopes: Vec<String> },
    /// Bad inputs (400).
    #[error("{0}")]
    BadInput(String),
    /// Parameters the policy does not accept (422).
    #[error("{0}")]
    BadParams(String),
    /// Inputs above the module's input limit (413).
    #[error("{0}")]
    TooLarge(String),
    /// The tenant's share or the whole queue is full (429).
    #[error("{}", if *tenant { "too many queued jobs for this tenant" } else { "the service is at capacity" })]
    Busy { tenant: bool, retry_after: u64 },
    /// The service is shutting down (503).
    #[error("the service is shutting down")]
    Draining,
    /// An inline job had no room or place to run by the time only its
    /// wall time was left of its caller's wait: it is stored and queued
    /// instead (never answered as such; 503 should it reach the API).
    #[error("the job had no place to run in time")]
    NotPlaced,
    /// No such job for this tenant (404).
    #[error("no job `{0}`")]
    NoJob(String),
    /// No such output of this job (404).
    #[error("no output `{0}`")]
    NoOutput(String),
    /// The job is in the wrong state for the request (409).
    #[error("{0}")]
    Conflict(String),
    /// The store failed (500, details logged only; 503 when
    /// [`ServiceError::is_storage`]).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The disk failed (500, details logged only; 503 when
    /// [`ServiceError::is_storage`]).
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl ServiceError {
    /// Whether the storage under the service is full or failing (the store,
    /// or the disk under the data or work directory): a condition of the
    /// host that passes, answered 503 with `Retry-After`.
    pub fn is_storage(&self) -> bool {
        match self {
            ServiceError::Store(e) => e.is_storage(),
            ServiceError::Io(e) => matches!(
                os_error(e),
                Some(libc::ENOSPC | libc::EDQUOT | libc::EIO | libc::EROFS)
            ),
            _ => false,
        }
    }

    /// Whether it failed because a disk is full (`ENOSPC`, `EDQUOT`,
    /// `SQLITE_FULL`).
    pub fn is_full(&self) -> bool {
        match self {
            ServiceError::Store(e) => e.is_full(),
            ServiceError::Io(e) => matches!(os_error(e), Some(libc::ENOSPC | libc::EDQUOT)),
            _ => false,
        }
    }
}

/// The operating system's error number behind `e`, looking through errors
/// that wrap another `io::Error` (output collection reports copy failures
/// as `ErrorKind::Other` around the original).
fn os_error(e: &std::io::Error) -> Option<i32> {
    let mut e = e;
    loop {
        if let Some(code) = e.raw_os_error() {
            return Some(code);
        }
        if matches!(
            e.kind(),
            std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
        ) {
            return Some(libc::ENOSPC);
        }
        e = e.get_ref()?.downcast_ref::<std::io::Error>()?;
    }
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A module or its policy is unusable.
    #[error("module `{module}`: {message}")]
    Module { module: String, message: String },
    /// The data directory or store is unusable.
    #[error("{0}")]
    Storage(String),
    /// The key ring signing call tokens cannot be opened or read.
    #[error("signing keys: {0}")]
    Keys(#[from] crate::relay::KeyError),
    /// The declared services or `[tokens]` are unusable.
    #[error(transparent)]
    Relay(#[from] crate::relay::RelayError),
    /// The store failed while recovering jobs.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Guests cannot run as `[isolation]` asks (a worker cannot start, or
    /// lacks a required layer).
    #[error("isolation: {0}")]
    Isolation(String),
}

/// The running service.
pub struct Service {
    /// Where jobs run: hardened worker processes, or this process.
    runner: Arc<dyn Runner>,
    /// Where jobs' outbound calls go, with the keys that sign them; the
    /// sandbox only ever sees a job's [`Egress`](crate::job::egress::Egress).
    relay: Option<Arc<crate::relay::Relay>>,
    store: Arc<dyn JobStore>,
    /// Where jobs' inputs and outputs are kept.
    blobs: Arc<dyn crate::blob::BlobStore>,
    modules: BTreeMap<String, Arc<Module>>,
    scheduler: Arc<Scheduler>,
    inline_inputs: Arc<std::sync::atomic::AtomicUsize>,
    inline_keys: admit::InlineKeys,
    config: ServeConfig,
    jobs_dir: crate::sandbox::beneath::Root,
    /// The work directory, held open from its lock on: shutdown empties
    /// what is in it, not what is at its path then.
    work_dir: crate::sandbox::beneath::Root,
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<Option<JobRecord>>>>>,
    cancels: Mutex<HashMap<String, Arc<Notify>>>,
    draining: AtomicBool,
    /// This process's hold on its data and work directories (their lock
    /// files), from before anything in them is touched until shutdown has
    /// returned (or the process ends: [`Self::take_locks`]).
    locks: Mutex<Vec<std::fs::File>>,
    /// The data directory, held open: its store and keys are reached
    /// through it (`/proc/self/fd/N`) for as long as the service lives.
    data_root: crate::sandbox::beneath::Root,
    /// Set when shutdown stops the runner's guests (its workers killed with
    /// the jobs they ran): what the runner says of a job from then on is no
    /// result, and the job is left to run again.
    guests_stopped: AtomicBool,
    /// False from a storage failure until the keeper finds the store and
    /// the data directory writable again (readiness).
    storage_ok: AtomicBool,
    /// A failure on some job's path: the keeper re-reads the store's
    /// unfinished jobs at its next tick.
    recover_wanted: AtomicBool,
    /// Jobs a worker of this process holds, from before its claim until
    /// after its finish: a `running` job not in here was left by a failure.
    held: Mutex<HashSet<String>>,
    /// The claims of the jobs this node's workers run, whose leases the
    /// leaser renews, with where each run is ([`run::ClaimState`]).
    claims: Mutex<HashMap<String, (crate::store::Claimed, run::ClaimState)>>,
    /// The store is shared by several nodes ([`JobStore::shared`]): the
    /// queue is the store's, taken by [`Service::puller`]s, and the
    /// scheduler only counts this node's running jobs.
    shared: bool,
    /// Wakes the pullers: a job was queued or a cap freed.
    work: Notify,
    admin_token_hash: String,
    /// This start of this node among the nodes sharing the store
    /// ([`crate::config::Node::id`]).
    node: String,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// The per-tenant and per-address limiter of authenticated denials.
    denials: crate::serve::denials::TenantDenials,
}

impl Service {
    /// This start of this node's id among the nodes sharing the store.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// The lease this node claims jobs with.
    pub(super) fn lease(&self) -> crate::store::Lease {
        crate::store::Lease::new(&self.node, self.config.queue.lease.get())
    }
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("modules", &self.modules.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// One Prometheus recorder per process, shared by every service in it.
fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> =
        std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = metrics_exporter_prometheus::PrometheusBuilder::new();
            match builder.install_recorder() {
                Ok(handle) => handle,
                Err(_) => metrics_exporter_prometheus::PrometheusBuilder::new()
                    .build_recorder()
                    .handle(),
            }
        })
        .clone()
}

impl Service {
    /// Opens the store, loads every module under the config's policies
    /// directory, re-queues jobs a crash left behind, and starts the workers
    /// and the retention sweeper.
    ///
    /// # Errors
    /// [`StartError`] naming the module or storage problem.
    pub async fn start(
        config: ServeConfig,
        store: Option<Arc<dyn JobStore>>,
    ) -> Result<Arc<Self>, StartError> {
        // Installed before anything is counted: what the start itself
        // counts (workers started, a zone cache's entry found rewritten
        // while its modules load) went to no recorder before it was.
        let metrics = metrics_handle();
        let data = &config.storage.data_dir;
        let storage = |e: &dyn std::fmt::Display| {
            StartError::Storage(format!("data directory {}: {e}", data.display()))
        };
        // Not inside another service's work or data directory, whose start
        // or shutdown would empty it: checked before it is created, and
        // again once it is held (two starts racing).
        canonical_to_be(data)
            .and_then(|dir| check_above(&dir, &[]))
            .map_err(|e| storage(&e))?;
        crate::sandbox::create_private_dir_all(data).map_err(|e| storage(&e))?;
        // Held open from here, its lock taken from that descriptor, and
        // checked as held: the store, keys, admin token and jobs are
        // reached through it (`/proc/self/fd/N`), whatever is put at its
        // path meanwhile.
        let canonical = std::fs::canonicalize(data).map_err(|e| storage(&e))?;
        let data_root = crate::sandbox::beneath::Root::open(&canonical).map_err(|e| storage(&e))?;
        let data_lock = lock_data_dir(&data_root).map_err(|e| storage(&e))?;
        locks::check_held_above(&data_root, &canonical, &[&data_lock]).map_err(|e| storage(&e))?;
        let held_data = crate::sandbox::beneath::fd_path(data_root.fd());
        // Nor around another's work or data directory: what it holds would
        // be this one's to sweep. Its jobs directory, which can hold far
        // more, is looked into entry by entry as the orphan sweep comes to
        // each (`Service::remove_orphans`).
        match crate::sandbox::held_within_but(data_root.fd(), &["jobs"], &[&data_lock]) {
            Ok(None) => {}
            Ok(Some(dir)) => {
                return Err(storage(&format!(
                    "holds {}, held by another bulkhead process",
                    canonical.join(dir).display()
                )));
            }
            Err(e) => return Err(storage(&e)),
        }
        let store: Arc<dyn JobStore> = match (store, &config.storage.url) {
            (Some(s), _) => s,
            (None, Some(url)) => Arc::new(
                crate::store::PostgresStore::open(url.expose(), config.storage.pool_size)
                    .await
                    .map_err(|e| StartError::Storage(format!("database {url}: {e}")))?,
            ),
            (None, None) => Arc::new(
                crate::store::SqliteStore::open(&held_data.join("bulkhead.sqlite"))
                    .await
                    .map_err(|e| storage(&e))?,
            ),
        };
        // Job directories of a previous process are leftovers of jobs that
        // will be re-run from their stored inputs. The default work dir is
        // named after the data directory so two services never share one.
        let work = match &config.storage.work_dir {
            Some(dir) => dir.clone(),
            None => {
                // The path found to name the held directory, not a new
                // lookup of the configured one.
                let digest =
                    crate::policy::Sha256Hex::digest(canonical.as_os_str().as_encoded_bytes());
                crate::sandbox::default_work_dir(&digest.as_str()[..12])
            }
        };
        // Held, like the data directory, before anything in it is touched:
        // its lock file is inside it and stays when it is emptied.
        let cache = config
            .storage
            .cache_dir
            .clone()
            .unwrap_or_else(|| canonical.join("cache"));
        // The module cache, which other services may share, is held shared:
        // no one's work directory (emptied at each start and shutdown) may
        // be at it or around it, nor it inside another's.
        let (cache_root, cache_lock) =
            locks::share_cache_dir(&cache, &[&data_lock]).map_err(|e| {
                StartError::Storage(format!("cache directory {}: {e}", cache.display()))
            })?;
        let (work_root, work_lock) = lock_work_dir(
            &work,
            &[("data", data), ("cache", &cache)],
            &[&data_lock, &cache_lock],
        )
        .map_err(|e| StartError::Storage(format!("work directory {}: {e}", work.display())))?;
        empty_work_dir(&work_root, &[&data_lock, &work_lock, &cache_lock])
            .map_err(|e| StartError::Storage(format!("work directory {}: {e}", work.display())))?;
        let locks = vec![data_lock, work_lock, cache_lock];
        // Its own directory, not a link to another's nor a mount of one
        // (the orphan sweep removes what in it no job row points to), held
        // open from here on: everything below it is reached from that
        // descriptor, whatever is later put at its path.
        let jobs_dir = data_root
            .dir(Path::new("jobs"), true)
            .and_then(|_| data_root.below(Path::new("jobs")))
            .map_err(|e| {
                storage(&format!(
                    "{} is not a directory of its own: {e}",
                    data.join("jobs").display()
                ))
            })?;
        let blobs = crate::blob::open(&config.storage, &jobs_dir).await?;

        let mut sandbox_config = SandboxConfig::new(work_root.path());
        sandbox_config.cache_dir = Some(cache);
        sandbox_config.max_concurrent_jobs = config.queue.workers;
        // The data directory's own key ring is reached from its descriptor,
        // never through a link or a mount at `keys` or at a file's name.
        let keys = match &config.tokens.signing_key {
            Some(_) => config.key_ring()?,
            None => crate::relay::KeyRing::open_in(&data_root, config.tokens.key_grace.get())?,
        };
        let relay =
            crate::relay::Relay::new(config.services.clone(), Arc::new(keys), &config.tokens)?;
        let relay = Some(Arc::new(relay));
        let sources = read_modules(relay.as_deref(), &config)?;
        let runner = start_runner(
            &config,
            sandbox_config,
            (&work_root, &cache_root),
            &sources,
            Arc::clone(&store),
        )
        .await?;
        let modules = load_modules(runner.as_ref(), sources).await?;
        let admin_token_hash = admin_token(&data_root).map_err(|e| storage(&e))?;

        let q = &config.queue;
        let scheduler = Scheduler::new(QueueLimits {
            slots: q.workers as usize,
            max_queued: q.max_queued,
            max_queued_per_tenant: q.max_queued_per_tenant,
            max_running_per_tenant: q.max_running_per_tenant,
            max_running_per_module: q.max_running_per_module,
        });
        record_given_back(store.as_ref(), &data_root).await?;
        let requeued = store.requeue_running().await?;
        let shared = store.shared();
        // A shared store's queue stays in the store.
        let pending = if shared {
            Vec::new()
        } else {
            store.queued_jobs().await?
        };
        tracing::info!(requeued, pending = pending.len(), shared, "recovered jobs");
        for job in pending {
            let _ = scheduler.push(
                QueuedJob {
                    id: job.id,
                    tenant: job.tenant,
                    module: job.module,
                },
                false,
            );
        }

        let service = Arc::new(Self {
            runner,
            relay,
            store,
            blobs,
            modules,
            scheduler,
            inline_inputs: Arc::default(),
            inline_keys: admit::InlineKeys::default(),
            jobs_dir,
            work_dir: work_root,
            waiters: Mutex::default(),
            cancels: Mutex::default(),
            draining: AtomicBool::new(false),
            locks: Mutex::new(locks),
            data_root,
            guests_stopped: AtomicBool::new(false),
            storage_ok: AtomicBool::new(true),
            recover_wanted: AtomicBool::new(false),
            held: Mutex::default(),
            claims: Mutex::default(),
            shared,
            work: Notify::new(),
            admin_token_hash,
            node: config.node.id(),
            metrics,
            denials: crate::serve::denials::TenantDenials::new(&config.audit),
            config,
        });
        tracing::info!(node = %service.node, "node id for this start");
        // Nothing runs yet: any job directory without a row is a leftover
        // (a submission or an inline job that failed half-way in a crash).
        let orphans = service.remove_orphans(Duration::ZERO).await;
        if orphans > 0 {
            tracing::info!(orphans, "removed job directories no job points to");
        }
        if service.shared {
            let events = service.store.events().await?;
            if let Some(events) = events {
                tokio::spawn(Arc::clone(&service).listener(events));
            }
        }
        // Each job runs in a task of its own, started once it has a slot:
        // a job waiting for room in its zone's disk lends its slot
        // (`Slot::set_aside`) to the next, which needs a task of its own.
        // On a shared store, `queue.workers` claim jobs at once.
        if service.shared {
            for _ in 0..service.config.queue.workers {
                tokio::spawn(Arc::clone(&service).puller());
            }
        } else {
            tokio::spawn(Arc::clone(&service).worker());
        }
        tokio::spawn(Arc::clone(&service).sweeper());
        tokio::spawn(Arc::clone(&service).keeper());
        tokio::spawn(Arc::clone(&service).leaser());
        service.update_gauges();
        Ok(service)
    }

    /// The config it runs with.
    pub fn config(&self) -> &ServeConfig {
        &self.config
    }

    /// Where running jobs' directories are.
    pub fn work_dir(&self) -> &Path {
        self.runner.work_dir()
    }

    /// The store.
    pub fn store(&self) -> &Arc<dyn JobStore> {
        &self.store
    }

    /// Modules the caller may submit to.
    pub fn modules_for<'a>(&'a self, who: &'a Identity) -> impl Iterator<Item = &'a Policy> + 'a {
        self.modules
            .values()
            .map(|m| m.policy())
            .filter(move |p| who.has_any(&scope_strings(p)))
    }

    /// Whether `hash` is the admin token's hash.
    pub fn is_admin(&self, hash: &str) -> bool {
        // Both are hex SHA-256 digests of equal length; compare without an
        // early exit.
        hash.len() == self.admin_token_hash.len()
            && hash
                .bytes()
                .zip(self.admin_token_hash.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    }

    /// Whether the service is draining (not ready).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Whether the store and the data directory can be written: false from
    /// a storage failure (or the data directory's free space falling under
    /// [`MIN_FREE`]) until the keeper's probe writes succeed again.
    pub fn storage_ok(&self) -> bool {
        self.storage_ok.load(Ordering::SeqCst)
    }

    /// Notes `e` if it is a storage failure (not ready until the storage
    /// writes again) and asks the keeper to look for jobs it left behind;
    /// returns it.
    fn noted(&self, e: ServiceError) -> ServiceError {
        if e.is_storage() {
            self.storage_failed(&e);
        }
        e
    }

    fn storage_failed(&self, e: &dyn std::fmt::Display) {
        self.recover_wanted.store(true, Ordering::SeqCst);
        if self.storage_ok.swap(false, Ordering::SeqCst) {
            tracing::error!(error = %e, "storage failed: not ready until it can be written again");
        }
    }

    /// Prometheus text exposition.
    pub fn render_metrics(&self) -> String {
        self.update_gauges();
        self.metrics.render()
    }

    fn update_gauges(&self) {
        let (queued, running) = self.scheduler.depth();
        // On a shared store the queue is the store's: the leaser sets this
        // gauge from it (all nodes' queued jobs).
        if !self.shared {
            metrics::gauge!("bulkhead_jobs_queued").set(queued as f64);
        }
        metrics::gauge!("bulkhead_jobs_running").set(running as f64);
        let isolation = self.runner.state();
        for (zone, pids) in &isolation.workers {
            metrics::gauge!("bulkhead_workers", "zone" => zone.clone()).set(pids.len() as f64);
        }
        for (zone, pids) in &isolation.successors {
            metrics::gauge!("bulkhead_worker_successors", "zone" => zone.clone())
                .set(pids.len() as f64);
        }
        for (zone, disk) in &isolation.disk {
            metrics::gauge!("bulkhead_zone_disk_bytes", "zone" => zone.clone())
                .set(disk.map_or(0.0, |d| d as f64));
        }
        for (zone, given) in &isolation.disk_given {
            metrics::gauge!("bulkhead_zone_disk_given_bytes", "zone" => zone.clone())
                .set(*given as f64);
        }
        for (zone, queued) in &isolation.queued {
            metrics::gauge!("bulkhead_worker_queued_bytes", "zone" => zone.clone())
                .set(*queued as f64);
        }
        for (zone, held) in &isolation.loads_held {
            metrics::gauge!("bulkhead_worker_loads_held_bytes", "zone" => zone.clone())
                .set(*held as f64);
        }
        for (zone, applied) in &isolation.zones {
            for (layer, state) in &applied.layers {
                let active = matches!(state, crate::worker::harden::LayerState::Active);
                metrics::gauge!("bulkhead_worker_layer_active", "zone" => zone.clone(), "layer" => layer_name(*layer))
                    .set(if active { 1.0 } else { 0.0 });
            }
        }
    }

    /// Whether guests can run: no zone is without a live worker because
    /// its starts fail (in-process: always); the first such zone
    /// otherwise. A zone between a worker's retirement and its
    /// replacement's start is ready: its jobs wait a moment (found by a
    /// tester: readiness failed for every such moment under load in a
    /// zone replacing its workers per job, and said the service was
    /// shutting down).
    pub fn runner_ready(&self) -> Result<(), String> {
        let isolation = self.runner.state();
        match isolation.failed_starts.iter().find(|(_, n)| **n > 0) {
            Some((zone, n)) => Err(format!(
                "zone `{zone}` has no worker: its last {n} starts of one failed"
            )),
            None => Ok(()),
        }
    }

    /// Records an audit entry; failures are logged, never surfaced.
    pub async fn audit(&self, entry: AuditEntry) {
        if let Err(e) = self.store.append_audit(&entry).await {
            tracing::error!(error = %e, action = %entry.action, "cannot write audit entry");
            self.noted(e.into());
        }
    }

    /// Records the denial `entry` of an authenticated caller through the
    /// per-tenant limiter: written now, or counted into a summary row.
    async fn audit_denial(&self, entry: AuditEntry) {
        if self.denials.admit(&entry) {
            self.audit(entry).await;
        }
    }

    /// Ends the authenticated-denial window: the summary rows of what it
    /// held back (written by the edge once a minute and at shutdown).
    pub fn roll_denials(&self) -> Vec<AuditEntry> {
        self.denials.roll()
    }

    /// The caller's job.
    ///
    /// # Errors
    /// [`ServiceError::NoJob`] if it does not exist for this tenant.
    pub async fn job(&self, who: &Identity, id: &str) -> Result<JobRecord, ServiceError> {
        self.store
            .get_job(&who.tenant, id)
            .await?
            .ok_or_else(|| ServiceError::NoJob(id.to_owned()))
    }

    /// How many bytes the stored report of the caller's job `id` takes
    /// (0: no such job, or no report yet), found without reading it.
    ///
    /// # Errors
    /// Store failures.
    pub async fn report_len(&self, who: &Identity, id: &str) -> Result<u64, ServiceError> {
        let of = crate::store::ReportOf::Id(id);
        Ok(self.store.report_len(&who.tenant, of).await?.unwrap_or(0))
    }

    /// The same of the caller's job that a submission with idempotency key
    /// `key` would be answered with (0: none, or no report yet).
    ///
    /// # Errors
    /// Store failures.
    pub async fn keyed_report_len(&self, who: &Identity, key: &str) -> Result<u64, ServiceError> {
        let retention = self.config.queue.idempotency_retention.get();
        let since = now_ms().saturating_sub(retention.as_millis() as i64);
        let of = crate::store::ReportOf::Key(key, since);
        Ok(self.store.report_len(&who.tenant, of).await?.unwrap_or(0))
    }

    /// The caller's most recent jobs, each with its report in a few words.
    ///
    /// # Errors
    /// Store failures.
    pub async fn jobs(
        &self,
        who: &Identity,
        limit: u32,
    ) -> Result<Vec<crate::store::JobSummary>, ServiceError> {
        Ok(self.store.list_jobs(&who.tenant, limit).await?)
    }

    /// Opens output `name` of the caller's job for download: only names the
    /// report lists, only regular files, never through a symlink.
    ///
    /// # Errors
    /// [`ServiceError::NoJob`] / [`ServiceError::NoOutput`].
    pub async fn output(
        &self,
        who: &Identity,
        id: &str,
        name: &str,
    ) -> Result<(crate::blob::OutputReader, u64), ServiceError> {
        let job = self.job(who, id).await?;
        let listed = job
            .report
            .as_ref()
            .is_some_and(|r| r.outputs.iter().any(|o| o.name == name));
        if !listed {
            return Err(ServiceError::NoOutput(name.to_owned()));
        }
        self.open_output(id, name).await
    }

    /// Deletes the caller's finished job and its files.
    ///
    /// # Errors
    /// 404 if unknown, 409 if not finished.
    pub async fn delete(&self, who: &Identity, id: &str) -> Result<(), ServiceError> {
        match self.store.delete_job(&who.tenant, id).await? {
            DeleteOutcome::NotFound => Err(ServiceError::NoJob(id.to_owned())),
            DeleteOutcome::NotFinished(state) => Err(ServiceError::Conflict(format!(
                "job `{id}` is {}; cancel it before deleting it",
                state.as_str()
            ))),
            DeleteOutcome::Deleted => {
                self.remove_job_files(id).await;
                Ok(())
            }
        }
    }

    /// Stops accepting jobs, lets running jobs finish for up to the grace
    /// period (their leases renewed meanwhile), stops the guests still
    /// running and gives their jobs back to the queue, attempt and all,
    /// then returns: the next start (or any node) runs them again. Queued
    /// jobs stay queued.
    pub async fn shutdown(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.scheduler.close();
        let deadline = tokio::time::Instant::now() + self.config.server.shutdown_grace.get();
        while self.scheduler.depth().1 > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Workers still running a job die with it; it is given back to the
        // queue: the failure the runner then reports is no result of the
        // job's, and is neither stored nor blamed on its worker
        // ([`Self::execute`]).
        self.guests_stopped.store(true, Ordering::SeqCst);
        self.runner.close();
        self.give_back_claims().await;
        // Requests waiting for a queued job (`?wait=`) are answered now,
        // with its state (queued again, or as it ended), rather than cut
        // when their connections close: dropping a waiter's sender makes
        // its request read the job.
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        // Their cgroups are removed as their processes go: a service that
        // exited first would leave them behind, one per worker.
        if tokio::time::timeout(WORKERS_ENDED_WITHIN, self.runner.ended())
            .await
            .is_err()
        {
            tracing::warn!("workers still ending at shutdown; their cgroups may be left behind");
        }
        // With nothing running, the job directories (tmpfs by default) are
        // leftovers; a start would empty them anyway, so give the memory
        // back now (the lock file stays, held until this process ends).
        if self.scheduler.depth().1 == 0 {
            let locks = self.take_locks();
            let own: Vec<&std::fs::File> = locks.iter().collect();
            if let Err(e) = empty_work_dir(&self.work_dir, &own) {
                tracing::warn!(dir = %self.work_dir.path().display(), error = %e, "cannot empty the work directory");
            }
            *self.locks.lock().unwrap_or_else(|e| e.into_inner()) = locks;
        }
        // Nothing of this process touches the data directory any more.
        drop(self.take_locks());
    }

    /// Gives every job this node still holds back to the queue, its
    /// attempt with it: shutdown is no failure of the job's. Each run whose
    /// guest was stopped does the same on its way out, but the process may
    /// end before it gets there (nothing else keeps it alive once the
    /// listeners close), or its guest may still be running (in-process
    /// jobs are not stopped): so shutdown writes it itself, before it
    /// returns. A claim is given back once (the store matches it), so the
    /// two never count twice. Bounded by [`GIVE_BACK`]: what the store
    /// does not take by then (locked by another writer, failing) is kept
    /// in [`GIVEN_BACK`] for the next start to record.
    async fn give_back_claims(&self) {
        let held: Vec<crate::store::Claimed> = self
            .claims_lock()
            .values()
            .map(|(claim, _)| claim.clone())
            .collect();
        let mut unrecorded: Vec<&crate::store::Claimed> = held.iter().collect();
        let give_back = async {
            while let Some(claim) = unrecorded.last() {
                if let Err(e) = self.store.requeue(claim, false).await {
                    tracing::warn!(job = %claim.id(), error = %e, "cannot give back a job stopped by shutdown; the next start does");
                    break;
                }
                unrecorded.pop();
            }
        };
        let timed_out = tokio::time::timeout(GIVE_BACK, give_back).await.is_err();
        if timed_out || !unrecorded.is_empty() {
            // The store did not take them (locked, failing): the next start
            // gives them back from this file before it re-runs anything.
            let path = self.data_root.path().join(GIVEN_BACK);
            match write_given_back(&self.data_root, &unrecorded) {
                Ok(()) => {
                    tracing::warn!(jobs = unrecorded.len(), file = %path.display(), "shutdown: jobs given back in a file, for the next start to record")
                }
                Err(e) => {
                    tracing::error!(jobs = unrecorded.len(), file = %path.display(), error = %e, "shutdown: cannot keep the jobs it gave back; the next start re-runs them with their attempt counted")
                }
            }
        }
        // Then let the runs end (their directories, their gauges).
        let ended = async {
            while self.scheduler.depth().1 > 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        if tokio::time::timeout(GIVE_BACK, ended).await.is_err() {
            tracing::warn!(
                jobs = self.scheduler.depth().1,
                "shutdown: runs still ending after the grace"
            );
        }
    }

    /// Takes the locks of the data and work directories out of the
    /// service, for a process to hold until it ends (by never closing
    /// them): [`Self::shutdown`] then leaves them held, so no second
    /// service starts on the directories while this process still writes
    /// its last entries.
    pub fn take_locks(&self) -> Vec<std::fs::File> {
        std::mem::take(&mut *self.locks.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Jobs this node is running now (its scheduler's taken slots): after
    /// [`Self::shutdown`], 0 once every run has ended.
    pub fn jobs_running(&self) -> usize {
        self.scheduler.depth().1
    }

    /// Where jobs run, and the hardening of its workers.
    pub fn isolation(&self) -> crate::runner::RunnerState {
        self.runner.state()
    }

    /// The signing keys of call tokens.
    pub fn keys(&self) -> Option<&Arc<crate::relay::KeyRing>> {
        self.relay.as_ref().map(|r| r.keys())
    }
}

/// A layer's name as config and metrics spell it (`user_namespace`).
fn layer_name(layer: crate::worker::harden::Layer) -> String {
    serde_json::to_value(layer)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn scope_strings(policy: &Policy) -> Vec<String> {
    policy
        .access
        .scopes
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// How long shutdown waits, after the grace, for its stopped workers'
/// processes to be reaped and their directories and cgroups removed
/// (milliseconds, unless the machine is very busy).
const WORKERS_ENDED_WITHIN: Duration = Duration::from_secs(1);

/// How long shutdown gives, after the grace, to give back the jobs it
/// stopped (a store write each), and then to let their runs end.
const GIVE_BACK: Duration = Duration::from_millis(500);

/// The file in the data directory holding the claims of jobs shutdown
/// gave back that the store did not record (locked or failing): the next
/// start records them before it takes back anything else.
const GIVEN_BACK: &str = "given-back.json";

/// Writes `claims` to `path` whole or not at all (a temporary file,
/// synced, renamed over it).
fn write_given_back(
    data: &crate::sandbox::beneath::Root,
    claims: &[&crate::store::Claimed],
) -> std::io::Result<()> {
    let json = serde_json::to_vec(claims).map_err(std::io::Error::other)?;
    let path = crate::sandbox::beneath::fd_path(data.fd()).join(GIVEN_BACK);
    let tmp = path.with_extension("json.tmp");
    // A new file (never whatever is at the name, a link included).
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)?;
    std::io::Write::write_all(&mut file, &json)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// At a start, before running jobs are taken back: gives back, attempt
/// and all, the jobs the last shutdown stopped but could not record
/// ([`GIVEN_BACK`]), then removes the file. A claim the store no longer
/// holds (its job finished, was cancelled, or another node took it back
/// once its lease ran out) is left as it is. Returns how many were given
/// back.
async fn record_given_back(
    store: &dyn JobStore,
    data: &crate::sandbox::beneath::Root,
) -> Result<usize, StartError> {
    let path = data.path().join(GIVEN_BACK);
    // Never through a link or a mount at its name.
    let read = crate::sandbox::beneath::open_file_in(data.fd(), GIVEN_BACK)
        .map_err(std::io::Error::from)
        .and_then(|fd| {
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut std::fs::File::from(fd), &mut bytes).map(|_| bytes)
        });
    let bytes = match read {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => {
            return Err(StartError::Storage(format!("{}: {e}", path.display())));
        }
    };
    let claims: Vec<crate::store::Claimed> = match serde_json::from_slice(&bytes) {
        Ok(claims) => claims,
        Err(e) => {
            // Written whole or not at all: not ours. Their jobs are
            // taken back as after a crash.
            tracing::warn!(file = %path.display(), error = %e, "ignoring an unreadable list of jobs given back");
            Vec::new()
        }
    };
    let mut given = 0;
    for claim in &claims {
        if store.requeue(claim, false).await? {
            given += 1;
        }
    }
    rustix::fs::unlinkat(data.fd(), GIVEN_BACK, rustix::fs::AtFlags::empty())
        .map_err(|e| StartError::Storage(format!("{}: {e}", path.display())))?;
    tracing::info!(
        given,
        of = claims.len(),
        "recorded the jobs the last shutdown gave back"
    );
    Ok(given)
}

/// Free bytes under the data directory below which the service reports
/// itself not ready (and the keeper's probe fails).
pub const MIN_FREE: u64 = 1 << 20;

/// An audit entry for a refused request.
pub fn denial(who: &Identity, action: &str, module: Option<&Module>, detail: &str) -> AuditEntry {
    AuditEntry {
        at: now_ms(),
        action: action.to_owned(),
        tenant: Some(who.tenant.clone()),
        subject: Some(who.subject.clone()),
        client: who.client.map(|c| c.to_string()),
        module: module.map(|m| m.policy().module.name.to_string()),
        module_sha256: module.map(|m| m.sha256().to_string()),
        policy_sha256: module
            .and_then(|m| m.policy().source_sha256.as_ref().map(ToString::to_string)),
        detail: detail.to_owned(),
        ..AuditEntry::default()
    }
}

/// Every policy under the config's policies directory, with its module's
/// bytes (read, not parsed: parsing happens where the runner runs guests).
fn read_modules(
    relay: Option<&crate::relay::Relay>,
    config: &ServeConfig,
) -> Result<Vec<(Policy, bytes::Bytes)>, StartError> {
    let dir = &config.modules.policies_dir;
    let entries = std::fs::read_dir(dir)
        .map_err(|e| StartError::Storage(format!("policies directory {}: {e}", dir.display())))?;
    let mut paths: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    let trusted =
        crate::trust::TrustedKeys::new(&config.trust.keys).map_err(|e| StartError::Module {
            module: "[trust.keys]".to_owned(),
            message: e.to_string(),
        })?;
    let mut modules = Vec::new();
    let mut seen: BTreeMap<String, PathBuf> = BTreeMap::new();
    for path in paths {
        let declared = relay.map(crate::relay::Relay::names).unwrap_or_default();
        let policy = Policy::load_with(&path, &declared).map_err(|e| StartError::Module {
            module: path.display().to_string(),
            message: e.to_string(),
        })?;
        let name = policy.module.name.to_string();
        let refused = |message: String| StartError::Module {
            module: name.clone(),
            message,
        };
        // Two policies for one module would leave which one governs it to
        // the order of file names (and one could drop what the other
        // requires, a signature, a scope).
        if let Some(other) = seen.insert(name.clone(), path.clone()) {
            return Err(refused(format!(
                "{} and {} both name it: one policy per module",
                other.display(),
                path.display()
            )));
        }
        trusted
            .check_policy(&policy)
            .map_err(|e| refused(e.to_string()))?;
        // `<name>.wasm`, else cargo's spelling of it (`foo-bar` builds
        // `foo_bar.wasm`): module names have no `_`, so the two never clash.
        let mut wasm_path = config.modules.modules_dir.join(format!("{name}.wasm"));
        let cargo_path = config
            .modules
            .modules_dir
            .join(format!("{}.wasm", name.replace('-', "_")));
        if !wasm_path.exists() && cargo_path.exists() {
            wasm_path = cargo_path;
        }
        let wasm = std::fs::read(&wasm_path)
            .map_err(|e| refused(format!("cannot read {}: {e}", wasm_path.display())))?;
        if !policy.module.signed_by.is_empty() {
            // Checked on the very bytes every runner is handed, before
            // anything parses them; the signature lies beside the module.
            let sig_path = crate::trust::signature_path(&wasm_path);
            let signature = crate::trust::read_signature(&sig_path)
                .map_err(|e| refused(format!("cannot read {}: {e}", sig_path.display())))?;
            let verdict = trusted
                .verify(
                    &policy,
                    &wasm,
                    signature.as_deref(),
                    &sig_path.display().to_string(),
                )
                .map_err(|e| refused(e.to_string()))?;
            tracing::info!(module = %name, signature = %verdict, "module signature checked");
        }
        modules.push((policy, wasm.into()));
    }
    Ok(modules)
}

/// The runner the config asks for: a worker pool for each zone the
/// modules name (`[isolation] mode = "process"`), or this process's
/// sandbox.
async fn start_runner(
    config: &ServeConfig,
    sandbox: SandboxConfig,
    (work, cache_held): (
        &crate::sandbox::beneath::Root,
        &crate::sandbox::beneath::Root,
    ),
    modules: &[(Policy, bytes::Bytes)],
    store: Arc<dyn JobStore>,
) -> Result<Arc<dyn Runner>, StartError> {
    use crate::config::IsolationMode;
    if config.isolation.mode == IsolationMode::InProcess {
        tracing::warn!(
            "guests run inside the service process (`isolation.mode = \"in-process\"`): a runtime escape reaches its keys and store"
        );
        let sandbox = Sandbox::new(sandbox).map_err(|e| StartError::Storage(e.to_string()))?;
        return Ok(Arc::new(InProcess::holding(sandbox, work.clone())));
    }
    let zones: std::collections::BTreeSet<String> = modules
        .iter()
        .map(|(p, _)| p.module.zone.to_string())
        .collect();
    let program = match &config.isolation.program {
        Some(p) => p.clone(),
        None => std::env::current_exe().map_err(|e| {
            StartError::Storage(format!("cannot find this binary for workers: {e}"))
        })?,
    };
    // The held cache directory's own (canonical) path: each zone's cache
    // and records are made and opened below its descriptor.
    let cache_root = cache_held.path();
    let mut pools = BTreeMap::new();
    for zone in zones {
        let settings = config.zones.get(&zone).cloned().unwrap_or_default();
        let pool_config = crate::worker::pool::PoolConfig {
            zone: zone.clone(),
            program: program.clone(),
            workers: settings.workers,
            jobs_per_worker: settings.jobs_per_worker,
            max_concurrent_jobs: config.queue.workers,
            memory: settings.memory.map(|m| m.as_u64()),
            disk: Some(settings.disk.as_u64()).filter(|&d| d > 0),
            work_dir: sandbox.work_dir.join("zones").join(&zone),
            work_held: Some(
                work.made_below(&Path::new("zones").join(&zone))
                    .map_err(|e| StartError::Storage(format!("zone `{zone}`: {e}")))?,
            ),
            cache_dir: cache_root.join("zones").join(&zone),
            cache_held: Some(cache_held.clone()),
            run_as: config.isolation.run_as,
            max_open: crate::worker::WORKER_MAX_OPEN,
            max_threads: crate::worker::WORKER_MAX_THREADS,
            require: config.isolation.require.clone(),
            weaken: std::collections::BTreeSet::new(),
        };
        let store = Arc::clone(&store);
        // Each fault is audited (the pool already logs it and counts it in
        // `bulkhead_worker_faults_total`).
        let audit = move |fault: crate::worker::pool::Fault| {
            let entry = AuditEntry {
                at: now_ms(),
                action: "worker.fault".into(),
                outcome: Some(fault.class.to_owned()),
                detail: format!(
                    "zone {} worker {} {}; {} running jobs failed; replaced",
                    fault.zone, fault.pid, fault.reason, fault.jobs
                ),
                ..AuditEntry::default()
            };
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                if let Err(e) = store.append_audit(&entry).await {
                    tracing::error!(error = %e, "cannot write audit entry");
                }
            });
        };
        let pool = crate::worker::pool::Pool::start(pool_config, audit)
            .await
            .map_err(|e| StartError::Isolation(e.to_string()))?;
        tracing::info!(zone = %zone, layers = ?pool.applied(), "worker pool started");
        pools.insert(zone, pool);
    }
    Ok(Arc::new(Workers::new(sandbox, pools)))
}

async fn load_modules(
    runner: &dyn Runner,
    sources: Vec<(Policy, bytes::Bytes)>,
) -> Result<BTreeMap<String, Arc<Module>>, StartError> {
    let mut modules = BTreeMap::new();
    for (policy, wasm) in sources {
        let name = policy.module.name.to_string();
        let loaded = runner
            .load(policy, wasm)
            .await
            .map_err(|e| StartError::Module {
                module: name.clone(),
                message: e.to_string(),
            })?;
        tracing::info!(module = %name, cached = loaded.from_cache(), "module loaded");
        modules.insert(name, loaded);
    }
    Ok(modules)
}

/// The admin token's hash: read from `<data>/admin.token`, created (mode
/// 0600) on first start. The secret itself stays in that file for the
/// operator; it is never a user token and never in the tokens table.
fn admin_token(data: &crate::sandbox::beneath::Root) -> std::io::Result<String> {
    let path = data.path().join("admin.token");
    // Never through a link or a mount at its name.
    let read = crate::sandbox::beneath::open_file_in(data.fd(), "admin.token")
        .map_err(|e| match e {
            rustix::io::Errno::LOOP | rustix::io::Errno::XDEV => std::io::Error::other(format!(
                "{} is a link or a mount point: not followed",
                path.display()
            )),
            e => e.into(),
        })
        .and_then(|fd| {
            let file = std::fs::File::from(fd);
            let meta = file.metadata()?;
            if !meta.is_file() || std::os::unix::fs::MetadataExt::nlink(&meta) > 1 {
                return Err(std::io::Error::other(format!(
                    "{} is not a regular file of one name (a hard link is not followed)",
                    path.display()
                )));
            }
            std::io::read_to_string(file)
        });
    match read {
        Ok(secret) if secret.trim().is_empty() => Err(std::io::Error::other(format!(
            "{} is empty: remove it for a new admin token, or put one in it",
            path.display()
        ))),
        Ok(secret) => Ok(crate::auth::hash(secret.trim())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = crate::auth::mint();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(crate::sandbox::beneath::fd_path(data.fd()).join("admin.token"))?;
            writeln!(f, "{}", token.secret)?;
            f.sync_all()?;
            Ok(token.hash)
        }
        Err(e) => Err(e),
    }
}
