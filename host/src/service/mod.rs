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

pub mod scheduler;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{Notify, oneshot};

use crate::auth::Identity;
use crate::config::ServeConfig;
use crate::policy::Policy;
use crate::sandbox::{
    JobDir, JobError, JobInput, JobReport, JobSpec, LoadedModule, Sandbox, SandboxConfig,
};
use crate::store::{
    AuditEntry, CancelOutcome, Claim, DeleteOutcome, Idempotency, Inserted, JobRecord, JobState,
    JobStore, StoreError, now_ms,
};
use scheduler::{QueueLimits, QueuedJob, Rejection, Scheduler, Slot};

/// An accepted job, and with a wait, a receiver that fires when it ends
/// (see [`Service::submit`]).
pub type Accepted = (JobRecord, Option<oneshot::Receiver<Option<JobRecord>>>);

/// What a caller submits.
#[derive(Debug, Default)]
pub struct Submission {
    /// Input files.
    pub inputs: Vec<JobInput>,
    /// Parameters.
    pub params: BTreeMap<String, String>,
    /// Standard input.
    pub stdin: Option<Bytes>,
    /// The client's `Idempotency-Key`: a retry with the same key (same
    /// tenant, within `queue.idempotency_retention`) returns the first job.
    pub idempotency_key: Option<String>,
}

/// Keys are 1 to this many bytes of visible ASCII.
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

/// Checks an `Idempotency-Key`'s syntax: 1 to [`MAX_IDEMPOTENCY_KEY`] bytes,
/// each visible ASCII (`!` to `~`).
///
/// # Errors
/// [`ServiceError::BadInput`] saying what is wrong with it.
pub fn check_idempotency_key(key: &str) -> Result<(), ServiceError> {
    if key.is_empty() || key.len() > MAX_IDEMPOTENCY_KEY {
        return Err(ServiceError::BadInput(format!(
            "idempotency key of {} bytes: it must be 1 to {MAX_IDEMPOTENCY_KEY} bytes",
            key.len()
        )));
    }
    if let Some(c) = key.chars().find(|c| !c.is_ascii_graphic()) {
        return Err(ServiceError::BadInput(format!(
            "idempotency key holds {c:?}: only visible ASCII is accepted"
        )));
    }
    Ok(())
}

/// SHA-256 over everything a submission asks for: the module, parameters,
/// inputs and stdin, each length-prefixed so no two requests share an
/// encoding.
fn request_sha256(module: &str, sub: &Submission) -> String {
    use sha2::{Digest, Sha256};
    let mut hash = Sha256::new();
    let mut field = |bytes: &[u8]| {
        hash.update((bytes.len() as u64).to_le_bytes());
        hash.update(bytes);
    };
    field(module.as_bytes());
    for (name, value) in &sub.params {
        field(b"param");
        field(name.as_bytes());
        field(value.as_bytes());
    }
    for input in &sub.inputs {
        field(b"input");
        field(input.name.as_bytes());
        field(&input.data);
    }
    if let Some(stdin) = &sub.stdin {
        field(b"stdin");
        field(stdin);
    }
    hex::encode(hash.finalize())
}

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
    /// The store failed while recovering jobs.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The running service.
pub struct Service {
    sandbox: Sandbox,
    /// Where jobs' outbound calls go, with the keys that sign them; the
    /// sandbox only ever sees a job's [`Egress`](crate::job::egress::Egress).
    relay: Option<Arc<crate::relay::Relay>>,
    store: Arc<dyn JobStore>,
    modules: BTreeMap<String, Arc<LoadedModule>>,
    scheduler: Arc<Scheduler>,
    inline_inputs: Arc<std::sync::atomic::AtomicUsize>,
    config: ServeConfig,
    jobs_dir: PathBuf,
    waiters: Mutex<HashMap<String, Vec<oneshot::Sender<Option<JobRecord>>>>>,
    cancels: Mutex<HashMap<String, Arc<Notify>>>,
    draining: AtomicBool,
    /// False from a storage failure until the keeper finds the store and
    /// the data directory writable again (readiness).
    storage_ok: AtomicBool,
    /// A failure on some job's path: the keeper re-reads the store's
    /// unfinished jobs at its next tick.
    recover_wanted: AtomicBool,
    /// Jobs a worker of this process holds, from before its claim until
    /// after its finish: a `running` job not in here was left by a failure.
    held: Mutex<HashSet<String>>,
    admin_token_hash: String,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    /// The per-tenant and per-address limiter of authenticated denials.
    denials: crate::serve::denials::TenantDenials,
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
        let data = &config.storage.data_dir;
        let storage = |e: &dyn std::fmt::Display| {
            StartError::Storage(format!("data directory {}: {e}", data.display()))
        };
        crate::sandbox::create_private_dir_all(data).map_err(|e| storage(&e))?;
        let store: Arc<dyn JobStore> = match store {
            Some(s) => s,
            None => Arc::new(
                crate::store::SqliteStore::open(&data.join("bulkhead.sqlite"))
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
                let canonical = std::fs::canonicalize(data).map_err(|e| storage(&e))?;
                let digest =
                    crate::policy::Sha256Hex::digest(canonical.as_os_str().as_encoded_bytes());
                crate::sandbox::default_work_dir(&digest.as_str()[..12])
            }
        };
        if work.exists() {
            std::fs::remove_dir_all(&work).map_err(|e| storage(&e))?;
        }
        let jobs_dir = data.join("jobs");
        crate::sandbox::create_private_dir_all(&jobs_dir).map_err(|e| storage(&e))?;

        let mut sandbox_config = SandboxConfig::new(work);
        sandbox_config.cache_dir = Some(
            config
                .storage
                .cache_dir
                .clone()
                .unwrap_or_else(|| data.join("cache")),
        );
        sandbox_config.max_concurrent_jobs = config.queue.workers;
        let keys = match &config.tokens.signing_key {
            Some(path) => crate::relay::KeyRing::supplied(path),
            None => crate::relay::KeyRing::open(&data.join("keys"), config.tokens.key_grace.get()),
        }
        .map_err(|e| StartError::Storage(e.to_string()))?;
        let relay =
            crate::relay::Relay::new(config.services.clone(), Arc::new(keys), &config.tokens)
                .map_err(StartError::Storage)?;
        let relay = Some(Arc::new(relay));
        let sandbox = Sandbox::new(sandbox_config).map_err(|e| storage(&e))?;
        let modules = load_modules(&sandbox, relay.as_deref(), &config)?;
        let admin_token_hash = admin_token(data).map_err(|e| storage(&e))?;

        let q = &config.queue;
        let scheduler = Scheduler::new(QueueLimits {
            slots: q.workers as usize,
            max_queued: q.max_queued,
            max_queued_per_tenant: q.max_queued_per_tenant,
            max_running_per_tenant: q.max_running_per_tenant,
            max_running_per_module: q.max_running_per_module,
        });
        let requeued = store.requeue_running().await?;
        let pending = store.queued_jobs().await?;
        tracing::info!(requeued, pending = pending.len(), "recovered jobs");
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
            sandbox,
            relay,
            store,
            modules,
            scheduler,
            inline_inputs: Arc::default(),
            jobs_dir,
            waiters: Mutex::default(),
            cancels: Mutex::default(),
            draining: AtomicBool::new(false),
            storage_ok: AtomicBool::new(true),
            recover_wanted: AtomicBool::new(false),
            held: Mutex::default(),
            admin_token_hash,
            metrics: metrics_handle(),
            denials: crate::serve::denials::TenantDenials::new(&config.audit),
            config,
        });
        // Nothing runs yet: any job directory without a row is a leftover
        // (a submission or an inline job that failed half-way in a crash).
        let orphans = service.remove_orphans(Duration::ZERO).await;
        if orphans > 0 {
            tracing::info!(orphans, "removed job directories no job points to");
        }
        for _ in 0..service.config.queue.workers {
            tokio::spawn(Arc::clone(&service).worker());
        }
        tokio::spawn(Arc::clone(&service).sweeper());
        tokio::spawn(Arc::clone(&service).keeper());
        service.update_gauges();
        Ok(service)
    }

    /// The config it runs with.
    pub fn config(&self) -> &ServeConfig {
        &self.config
    }

    /// Where running jobs' directories are.
    pub fn work_dir(&self) -> &Path {
        &self.sandbox.config().work_dir
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
        metrics::gauge!("bulkhead_jobs_queued").set(queued as f64);
        metrics::gauge!("bulkhead_jobs_running").set(running as f64);
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

    /// Accepts a job: checks module, scope, inputs, parameters and capacity,
    /// stores the inputs and the job durably, then queues it. With `wait`,
    /// also returns a receiver that fires when the job finishes.
    ///
    /// # Errors
    /// [`ServiceError`] saying why the job was refused; nothing is stored.
    pub async fn submit(
        &self,
        who: &Identity,
        module_name: &str,
        mut sub: Submission,
        wait: Option<std::time::Duration>,
    ) -> Result<Accepted, ServiceError> {
        if self.is_draining() {
            return Err(ServiceError::Draining);
        }
        let Some(module) = self.modules.get(module_name) else {
            return Err(ServiceError::UnknownModule(module_name.to_owned()));
        };
        let policy = module.policy();
        let scopes = scope_strings(policy);
        if !who.has_any(&scopes) {
            self.audit_denial(denial(
                who,
                "scope.denied",
                Some(module),
                "submit without a required scope",
            ))
            .await;
            return Err(ServiceError::ScopeMissing {
                module: module_name.to_owned(),
                scopes,
            });
        }
        let key = match sub.idempotency_key.take() {
            Some(key) => {
                check_idempotency_key(&key)?;
                let retention = self.config.queue.idempotency_retention.get();
                Some(Idempotency {
                    request_sha256: request_sha256(module_name, &sub),
                    key,
                    since: now_ms().saturating_sub(retention.as_millis() as i64),
                })
            }
            None => None,
        };
        let spec = JobSpec {
            id: uuid::Uuid::new_v4().to_string(),
            inputs: sub.inputs,
            params: sub.params,
            stdin: sub.stdin.clone().unwrap_or_default(),
        };
        crate::sandbox::validate(policy, &spec).map_err(|e| match e {
            JobError::Param(m) => ServiceError::BadParams(m),
            JobError::Input(m) if m.contains("input limit") => ServiceError::TooLarge(m),
            other => ServiceError::BadInput(other.to_string()),
        })?;
        if let Some(key) = &key
            && let Some((job, hash)) = self
                .store
                .job_by_key(&who.tenant, &key.key, key.since)
                .await
                .map_err(|e| self.noted(e.into()))?
        {
            return self.replay(job, &hash, key, wait.is_some()).await;
        }
        if let Err(why) = self.scheduler.check(&who.tenant) {
            return Err(self.busy(who, module, why).await);
        }
        if let Some(wait) = wait
            && let Some(slack) = wait.checked_sub(policy.limits.wall_time.get())
            && !slack.is_zero()
            && let Some(held) = InlineInputs::hold(&self.inline_inputs, &spec)
        {
            let job = QueuedJob {
                id: spec.id.clone(),
                tenant: who.tenant.clone(),
                module: module_name.to_owned(),
            };
            let mut ticket = match self.scheduler.wait_turn(job) {
                Ok(ticket) => ticket,
                Err(why) => return Err(self.busy(who, module, why).await),
            };
            let slot = match tokio::time::timeout(slack, ticket.turn()).await {
                Ok(Some(slot)) => Some(slot),
                Ok(None) => return Err(ServiceError::Draining),
                Err(_) => ticket.leave(),
            };
            if let Some(slot) = slot {
                // The queue gauges are refreshed when metrics are read
                // (`render_metrics`), not on this path.
                let has_stdin = sub.stdin.is_some();
                let result = self
                    .run_now(who, module, spec, has_stdin, slot, key.as_ref())
                    .await;
                drop(held);
                return result;
            }
            // Its turn did not come in time to finish within the wait: it
            // is stored and queued like any job, and the caller gets 202
            // unless it ends within what is left of the wait.
        }

        self.store_inputs(&spec, sub.stdin.is_some())
            .map_err(|e| self.noted(e))?;
        let record = JobRecord {
            id: spec.id.clone(),
            tenant: who.tenant.clone(),
            subject: who.subject.clone(),
            token_id: who.token_id.clone(),
            module: module_name.to_owned(),
            module_sha256: module.sha256().to_string(),
            policy_sha256: policy.source_sha256.as_ref().map(ToString::to_string),
            params: spec.params.clone(),
            inputs: spec.inputs.iter().map(|i| i.name.clone()).collect(),
            has_stdin: sub.stdin.is_some(),
            state: JobState::Queued,
            created_at: now_ms(),
            started_at: None,
            finished_at: None,
            attempts: 0,
            report: None,
        };
        match (self.store.insert_job(&record, key.as_ref()).await, &key) {
            (Ok(Inserted::Existing(job, hash)), Some(key)) => {
                // A retry with the same key raced this one and won.
                self.remove_job_files(&record.id);
                return self.replay(*job, &hash, key, wait.is_some()).await;
            }
            (Ok(_), _) => {}
            (Err(e), _) => {
                self.remove_job_files(&record.id);
                return Err(self.noted(e.into()));
            }
        }
        let receiver = wait.is_some().then(|| self.subscribe(&record.id));
        let queued = QueuedJob {
            id: record.id.clone(),
            tenant: record.tenant.clone(),
            module: record.module.clone(),
        };
        if let Err(why) = self.scheduler.push(queued, true) {
            // Lost a race for the last queue slot: take the job back.
            let _ = self
                .store
                .cancel_job(&record.tenant, &record.id, now_ms())
                .await;
            let _ = self.store.delete_job(&record.tenant, &record.id).await;
            self.remove_job_files(&record.id);
            return Err(self.busy(who, module, why).await);
        }
        metrics::counter!("bulkhead_jobs_accepted_total", "module" => module_name.to_owned())
            .increment(1);
        self.update_gauges();
        Ok((record, receiver))
    }

    /// The answer to a submission whose idempotency key already names
    /// `job`: that job (and, with `wait`, a receiver for its end), or a
    /// conflict if the key came with another request.
    async fn replay(
        &self,
        job: JobRecord,
        hash: &str,
        key: &Idempotency,
        wait: bool,
    ) -> Result<Accepted, ServiceError> {
        if hash != key.request_sha256 {
            return Err(ServiceError::Conflict(format!(
                "idempotency key `{}` was already used for a different request (job `{}`)",
                key.key, job.id
            )));
        }
        if !wait || job.state.is_final() {
            return Ok((job, None));
        }
        let receiver = self.subscribe(&job.id);
        // It may have finished between the read and the subscription: then
        // no worker will wake the receiver, so wake it here.
        if let Some(now) = self.store.get_job(&job.tenant, &job.id).await?
            && now.state.is_final()
        {
            self.wake(&job.id, Some(&now));
        }
        Ok((job, Some(receiver)))
    }

    async fn busy(&self, who: &Identity, module: &LoadedModule, why: Rejection) -> ServiceError {
        let tenant = why == Rejection::TenantFull;
        metrics::counter!("bulkhead_jobs_rejected_total", "reason" => if tenant { "tenant_full" } else { "service_full" })
            .increment(1);
        self.audit_denial(denial(
            who,
            "quota.denied",
            Some(module),
            if tenant {
                "tenant queue full"
            } else {
                "service queue full"
            },
        ))
        .await;
        ServiceError::Busy {
            tenant,
            retry_after: 1,
        }
    }

    fn job_dir(&self, id: &str) -> PathBuf {
        self.jobs_dir.join(id)
    }

    /// Writes inputs (and stdin) under `jobs/<id>/inputs`, fsynced, so the
    /// job can be re-run after a crash. A job without inputs writes nothing.
    fn store_inputs(&self, spec: &JobSpec, has_stdin: bool) -> Result<(), ServiceError> {
        if spec.inputs.is_empty() && !has_stdin {
            return Ok(());
        }
        let dir = self.job_dir(&spec.id).join("inputs");
        crate::sandbox::create_private_dir_all(&dir)?;
        let write = |name: &str, data: &[u8]| -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dir.join(name))?;
            f.write_all(data)?;
            f.sync_all()
        };
        let result = spec
            .inputs
            .iter()
            .try_for_each(|i| write(&format!("in-{}", i.name), &i.data))
            .and_then(|()| {
                if has_stdin {
                    write("stdin", &spec.stdin)
                } else {
                    Ok(())
                }
            })
            .and_then(|()| std::fs::File::open(&dir)?.sync_all());
        if let Err(e) = result {
            self.remove_job_files(&spec.id);
            return Err(e.into());
        }
        Ok(())
    }

    fn remove_job_files(&self, id: &str) {
        let dir = self.job_dir(id);
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            tracing::warn!(job = id, error = %e, "cannot remove job files");
        }
    }

    /// A receiver that fires when the job ends: with the finished record
    /// when a worker finished it, `None` when it was cancelled.
    fn subscribe(&self, id: &str) -> oneshot::Receiver<Option<JobRecord>> {
        let (tx, rx) = oneshot::channel();
        self.waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_owned())
            .or_default()
            .push(tx);
        rx
    }

    fn wake(&self, id: &str, finished: Option<&JobRecord>) {
        let senders = self
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        for tx in senders.into_iter().flatten() {
            let _ = tx.send(finished.cloned());
        }
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

    /// The caller's most recent jobs.
    ///
    /// # Errors
    /// Store failures.
    pub async fn jobs(&self, who: &Identity, limit: u32) -> Result<Vec<JobRecord>, ServiceError> {
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
    ) -> Result<(std::fs::File, u64), ServiceError> {
        let job = self.job(who, id).await?;
        let listed = job
            .report
            .as_ref()
            .is_some_and(|r| r.outputs.iter().any(|o| o.name == name));
        if !listed {
            return Err(ServiceError::NoOutput(name.to_owned()));
        }
        let path = self.job_dir(id).join("outputs").join(name);
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
            .map_err(|_| ServiceError::NoOutput(name.to_owned()))?;
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(ServiceError::NoOutput(name.to_owned()));
        }
        Ok((file, meta.len()))
    }

    /// Cancels the caller's queued or running job.
    ///
    /// # Errors
    /// 404 if unknown, 409 if already finished.
    pub async fn cancel(&self, who: &Identity, id: &str) -> Result<JobState, ServiceError> {
        match self.store.cancel_job(&who.tenant, id, now_ms()).await? {
            CancelOutcome::NotFound => Err(ServiceError::NoJob(id.to_owned())),
            CancelOutcome::AlreadyFinished(state) => Err(ServiceError::Conflict(format!(
                "job `{id}` already {}",
                state.as_str()
            ))),
            CancelOutcome::Cancelled(before) => {
                if before == JobState::Queued {
                    self.scheduler.remove(id);
                    self.remove_job_files(id);
                    self.wake(id, None);
                } else if let Some(cancel) = self
                    .cancels
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(id)
                {
                    cancel.notify_one();
                }
                self.audit(AuditEntry {
                    at: now_ms(),
                    action: "job.cancelled".into(),
                    tenant: Some(who.tenant.clone()),
                    subject: Some(who.subject.clone()),
                    job_id: Some(id.to_owned()),
                    detail: format!("cancelled while {}", before.as_str()),
                    ..AuditEntry::default()
                })
                .await;
                self.update_gauges();
                Ok(JobState::Cancelled)
            }
        }
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
                self.remove_job_files(id);
                Ok(())
            }
        }
    }

    /// Stops accepting jobs, lets running jobs finish for up to the grace
    /// period, then returns. Jobs still running are left `running` in the
    /// store and re-run at the next start; queued jobs stay queued.
    pub async fn shutdown(&self) {
        self.draining.store(true, Ordering::SeqCst);
        self.scheduler.close();
        let deadline = tokio::time::Instant::now() + self.config.server.shutdown_grace.get();
        while self.scheduler.depth().1 > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // With nothing running, the job directories (tmpfs by default) are
        // leftovers; a start would empty them anyway, so give the memory
        // back now.
        if self.scheduler.depth().1 == 0 {
            let work = &self.sandbox.config().work_dir;
            if let Err(e) = std::fs::remove_dir_all(work)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(dir = %work.display(), error = %e, "cannot remove the work directory");
            }
        }
    }

    async fn worker(self: Arc<Self>) {
        while let Some(slot) = self.scheduler.next().await {
            let job = slot.job().clone();
            self.hold(&job.id, true);
            let ran = self.run_one(&job).await;
            self.hold(&job.id, false);
            drop(slot);
            match ran {
                Ran::Ended(finished) => self.wake(&job.id, finished.as_deref()),
                // Its next attempt may start at once; after a storage
                // failure the keeper re-queues it once the storage writes.
                Ran::Requeued { storage: false } => {
                    let _ = self.scheduler.push(job, false);
                }
                Ran::Requeued { storage: true } => {
                    self.recover_wanted.store(true, Ordering::SeqCst);
                }
            }
            self.update_gauges();
        }
    }

    /// Marks a job as held by a worker of this process, or no longer.
    fn hold(&self, id: &str, held: bool) {
        let mut set = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held {
            set.insert(id.to_owned());
        } else {
            set.remove(id);
        }
    }

    fn is_held(&self, id: &str) -> bool {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(id)
    }

    /// Claims, runs and finishes one job; returns its finished record, or
    /// `None` if it did not finish here: cancelled, or given back to the
    /// queue after a failure of the host (see [`Service::host_failed`]).
    /// A store failure never drops the job: it stays `queued` (the claim
    /// failed) or is given back, and the keeper re-queues it.
    async fn run_one(&self, queued: &QueuedJob) -> Ran {
        let max_attempts = self.config.queue.max_attempts;
        let record = match self.store.claim(&queued.id, now_ms(), max_attempts).await {
            Ok(Claim::Run(record)) => *record,
            Ok(Claim::Gone) => return Ran::Ended(None), // cancelled while queued
            Ok(Claim::GaveUp(record)) => {
                tracing::error!(job = %record.id, attempts = record.attempts, "job failed: started too many times without finishing");
                self.remove_inputs(&record);
                let (finished_at, report) = (record.finished_at, record.report.clone());
                let Some(report) = report else {
                    return Ran::Ended(None);
                };
                return Ran::Ended(Some(Box::new(
                    self.finished(*record, report, finished_at.unwrap_or_else(now_ms))
                        .await,
                )));
            }
            Err(e) => {
                // Still `queued` in the store: the claim rolled back.
                tracing::error!(job = %queued.id, error = %e, "cannot claim job; it stays queued");
                self.noted(e.into());
                return Ran::Requeued { storage: true };
            }
        };
        let result = match self.modules.get(&record.module) {
            Some(module) => self.execute(module, &record).await,
            None => Ok(Some(JobReport::not_run(
                &record.id,
                &record.module,
                "module is no longer served",
            ))),
        };
        match result {
            Ok(Some(report)) => Ran::Ended(self.finish(record, report).await.map(Box::new)),
            Ok(None) => Ran::Ended(None), // cancelled while running
            Err(e) => self.host_failed(record, e).await,
        }
    }

    /// The host failed on `record`'s path (its result could not be kept,
    /// its directory not made, its stored inputs not read…). A storage
    /// failure gives the job back to the queue without spending its attempt:
    /// it runs again once the storage writes. Any other failure spends it:
    /// the job is re-queued, or, at its last attempt, finished `failed` with
    /// the reason. Whatever is left of its outputs is removed.
    async fn host_failed(&self, record: JobRecord, e: ServiceError) -> Ran {
        self.remove_outputs(&record.id);
        let max_attempts = self.config.queue.max_attempts;
        // Some failures lose their error number on the way up (a message
        // only): a data directory out of space says what it was.
        let storage = e.is_storage() || self.free_space().is_ok_and(|free| free < MIN_FREE);
        if storage || record.attempts < max_attempts {
            if storage {
                tracing::error!(job = %record.id, error = %e, "storage failed on the job's path; it goes back to the queue");
                self.noted(e);
            } else {
                tracing::error!(job = %record.id, attempt = record.attempts, error = %e, "the host failed on the job's path; it goes back to the queue");
            }
            return match self.store.requeue(&record.id, !storage).await {
                Ok(_) => Ran::Requeued { storage },
                Err(e) => {
                    // Left `running` and not held: the keeper re-queues it.
                    tracing::error!(job = %record.id, error = %e, "cannot re-queue the job");
                    self.noted(e.into());
                    Ran::Requeued { storage: true }
                }
            };
        }
        tracing::error!(job = %record.id, attempts = record.attempts, error = %e, "job failed: the host could not finish it");
        let report = JobReport::not_run(
            &record.id,
            &record.module,
            format!(
                "the host could not finish the job in {} attempts (last: {e})",
                record.attempts
            ),
        );
        Ran::Ended(self.finish(record, report).await.map(Box::new))
    }

    /// Records `record`'s job finished with `report`. A store failure is
    /// retried, with backoff, until the store writes again or the service
    /// drains (the job is then left `running`, and re-run at the next
    /// start); the result is never dropped while the process lives.
    async fn finish(&self, record: JobRecord, report: JobReport) -> Option<JobRecord> {
        let mut pause = Duration::from_millis(100);
        loop {
            let finished_at = now_ms();
            match self
                .store
                .finish_job(&record.id, &report, finished_at)
                .await
            {
                Ok(true) => {
                    self.remove_inputs(&record);
                    return Some(self.finished(record, report, finished_at).await);
                }
                // Cancelled while running; its result is dropped.
                Ok(false) => return None,
                Err(e) => {
                    tracing::error!(job = %record.id, error = %e, retry_in = ?pause, "cannot record the finished job");
                    self.noted(e.into());
                    if self.is_draining() {
                        return None;
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(FINISH_RETRY_MAX);
                }
            }
        }
    }

    /// Removes a finished job's stored inputs: they are only needed to
    /// re-run it; the report and outputs remain.
    fn remove_inputs(&self, record: &JobRecord) {
        if !record.inputs.is_empty() || record.has_stdin {
            let _ = std::fs::remove_dir_all(self.job_dir(&record.id).join("inputs"));
        }
    }

    /// Removes what an unfinished attempt copied of a job's outputs.
    fn remove_outputs(&self, id: &str) {
        let outputs = self.job_dir(id).join("outputs");
        let removed = match outputs.symlink_metadata() {
            Ok(meta) if meta.is_dir() => std::fs::remove_dir_all(&outputs),
            Ok(_) => std::fs::remove_file(&outputs),
            Err(e) => Err(e),
        };
        if let Err(e) = removed
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(job = id, error = %e, "cannot remove a failed attempt's outputs");
        }
    }

    /// Metrics and call audit of a job the store has just recorded as
    /// finished; returns its final record.
    async fn finished(
        &self,
        mut record: JobRecord,
        report: JobReport,
        finished_at: i64,
    ) -> JobRecord {
        let outcome = if report.succeeded() {
            "succeeded"
        } else {
            "failed"
        };
        metrics::counter!("bulkhead_jobs_total", "module" => record.module.clone(), "outcome" => outcome).increment(1);
        if let Some(limit) = report.limit {
            metrics::counter!("bulkhead_limits_fired_total", "module" => record.module.clone(), "limit" => limit.as_str())
                .increment(1);
        }
        metrics::histogram!("bulkhead_job_wall_seconds", "module" => record.module.clone())
            .record(report.measurements.wall_time_ms / 1000.0);
        if let Some(calls) = &report.calls {
            self.audit_calls(&record, calls).await;
        }
        record.state = if report.succeeded() {
            JobState::Succeeded
        } else {
            JobState::Failed
        };
        record.finished_at = Some(finished_at);
        record.report = Some(report);
        record
    }

    /// The inline path: runs a waited-for job in the caller's task and
    /// stores it once, finished. Only for a job the caller waits for and
    /// whose wall-time limit ends before the wait does, once the scheduler
    /// has given it a slot in its fair turn ([`Scheduler::wait_turn`]):
    /// such a job is never acknowledged before it has finished and been
    /// stored, so it needs no durable queued state, and it skips the
    /// queue's store writes and thread hand-offs.
    async fn run_now(
        &self,
        who: &Identity,
        module: &LoadedModule,
        spec: JobSpec,
        has_stdin: bool,
        slot: Slot,
        key: Option<&Idempotency>,
    ) -> Result<Accepted, ServiceError> {
        let policy = module.policy();
        let now = now_ms();
        let record = JobRecord {
            id: spec.id.clone(),
            tenant: who.tenant.clone(),
            subject: who.subject.clone(),
            token_id: who.token_id.clone(),
            module: policy.module.name.to_string(),
            module_sha256: module.sha256().to_string(),
            policy_sha256: policy.source_sha256.as_ref().map(ToString::to_string),
            params: spec.params.clone(),
            inputs: spec.inputs.iter().map(|i| i.name.clone()).collect(),
            has_stdin,
            state: JobState::Running,
            created_at: now,
            started_at: Some(now),
            finished_at: None,
            attempts: 1,
            report: None,
        };
        let audits = AuditWrites::default();
        // The caller authenticated on this very request.
        let egress = self.egress(
            module,
            &record,
            Ok(crate::relay::Caller {
                tenant: who.tenant.clone(),
                subject: who.subject.clone(),
                scopes: who.scopes.clone(),
            }),
            &audits,
        );
        // A failure of the host on the way is a failed job with a reason
        // (never a 500), unless it is the storage's: then nothing can be
        // stored, and the caller is told to retry (503). Either way nothing
        // is left under the data directory without a row.
        let ran = match JobDir::create(self.sandbox.config().work_dir.as_path(), &record.id) {
            Ok(dir) => {
                let result = self.sandbox.run_with(module, &spec, &dir, egress).await;
                audits.settle().await;
                let report = match result {
                    Ok(report) => report,
                    Err(e) => JobReport::not_run(&record.id, &record.module, e.to_string()),
                };
                let kept = self.keep_outputs(&record, &report, &dir);
                drop(dir);
                kept.map(|()| report)
            }
            Err(e) => Err(e),
        };
        // The sandbox is done with it: the next job need not wait for the
        // store.
        drop(slot);
        let report = match ran {
            Ok(report) => report,
            Err(e) => {
                self.remove_job_files(&record.id);
                let e = ServiceError::from(e);
                if e.is_storage() {
                    return Err(self.noted(e));
                }
                if self.free_space().is_ok_and(|free| free < MIN_FREE) {
                    // The error number was lost on the way; the disk says
                    // what it was.
                    let full = std::io::Error::from_raw_os_error(libc::ENOSPC);
                    return Err(self.noted(full.into()));
                }
                tracing::error!(job = %record.id, error = %e, "job failed: the host could not finish it");
                JobReport::not_run(
                    &record.id,
                    &record.module,
                    format!("the host could not finish the job: {e}"),
                )
            }
        };
        let finished_at = now_ms();
        match (
            self.store
                .insert_finished_job(&record, &report, finished_at, key)
                .await,
            key,
        ) {
            (Ok(Inserted::Existing(job, hash)), Some(key)) => {
                // A retry with the same key ran beside this one and was
                // stored first: this run is dropped.
                self.remove_job_files(&record.id);
                return self.replay(*job, &hash, key, true).await;
            }
            (Ok(_), _) => {}
            (Err(e), _) => {
                self.remove_job_files(&record.id);
                return Err(self.noted(e.into()));
            }
        }
        metrics::counter!("bulkhead_jobs_accepted_total", "module" => record.module.clone())
            .increment(1);
        let record = self.finished(record, report, finished_at).await;
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Some(record.clone()));
        Ok((record, Some(rx)))
    }

    /// The way out of `record`'s job, for `caller`, when its policy names
    /// services and the host declares a relay; each refusal is audited
    /// ([`Service::refusal_sink`]).
    fn egress(
        &self,
        module: &LoadedModule,
        record: &JobRecord,
        caller: Result<crate::relay::Caller, String>,
        audits: &AuditWrites,
    ) -> Option<Arc<dyn crate::job::egress::Egress>> {
        if module.policy().network.services.is_empty() {
            return None;
        }
        let sink = self.refusal_sink(record, audits);
        self.relay
            .as_ref()?
            .grant(module.policy(), &record.id, caller, Some(sink))
    }

    /// Writes one `egress.denied` audit entry per refused outbound request
    /// of `record`'s job as it is refused; the writes are collected in
    /// `pending` for the job to await.
    fn refusal_sink(&self, record: &JobRecord, pending: &AuditWrites) -> crate::relay::RefusalSink {
        let pending = pending.clone();
        let store = Arc::clone(&self.store);
        let template = egress_denied(record, String::new());
        crate::relay::RefusalSink(Arc::new(move |r: &crate::relay::CallRecord| {
            let mut entry = template.clone();
            entry.at = now_ms();
            entry.detail = format!(
                "{} {}: {}",
                r.method,
                r.target,
                r.refused.as_deref().unwrap_or_default()
            );
            let store = Arc::clone(&store);
            let write = tokio::spawn(async move {
                if let Err(e) = store.append_audit(&entry).await {
                    tracing::error!(error = %e, "cannot write audit entry");
                }
            });
            pending
                .0
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(write);
        }))
    }

    /// The call metrics of a finished job, and one audit entry counting the
    /// refusals beyond the report's list (those listed were audited as they
    /// happened, see [`Service::refusal_sink`]).
    async fn audit_calls(&self, record: &JobRecord, calls: &crate::relay::CallsReport) {
        metrics::counter!("bulkhead_service_calls_total", "module" => record.module.clone())
            .increment(u64::from(calls.made));
        for r in &calls.records {
            if r.refused.is_none() {
                continue;
            }
            let class = r.class.clone().unwrap_or_default();
            metrics::counter!("bulkhead_service_calls_refused_total", "module" => record.module.clone(), "class" => class)
                .increment(1);
        }
        if calls.records_dropped > 0 {
            self.audit(egress_denied(
                record,
                format!(
                    "{} more outbound requests not listed in the job report (see `calls.refused` = {})",
                    calls.records_dropped, calls.refused
                ),
            ))
            .await;
        }
    }

    /// The signing keys of call tokens.
    pub fn keys(&self) -> Option<&Arc<crate::relay::KeyRing>> {
        self.relay.as_ref().map(|r| r.keys())
    }

    /// The identity a job's outbound calls carry: its submitting token's,
    /// read again now, so a token revoked or expired since submission
    /// relays nothing.
    async fn caller_of(
        &self,
        record: &JobRecord,
    ) -> Result<Result<crate::relay::Caller, String>, ServiceError> {
        let token = self.store.token_by_id(&record.token_id).await?;
        let now = now_ms() / 1000;
        Ok(match token.and_then(|t| t.identity_at(now)) {
            Some(who) if who.tenant == record.tenant => Ok(crate::relay::Caller {
                tenant: who.tenant,
                subject: who.subject,
                scopes: who.scopes,
            }),
            _ => Err("the submitting token has been revoked or has expired".into()),
        })
    }

    /// Runs the job in the sandbox and copies its outputs into the job's
    /// directory. `None` if it was cancelled meanwhile.
    async fn execute(
        &self,
        module: &LoadedModule,
        record: &JobRecord,
    ) -> Result<Option<JobReport>, ServiceError> {
        let inputs_dir = self.job_dir(&record.id).join("inputs");
        let mut spec = JobSpec {
            id: record.id.clone(),
            params: record.params.clone(),
            ..JobSpec::default()
        };
        for name in &record.inputs {
            match std::fs::read(inputs_dir.join(format!("in-{name}"))) {
                Ok(data) => spec.inputs.push(JobInput {
                    name: name.clone(),
                    data: data.into(),
                }),
                Err(e) => {
                    tracing::error!(job = %record.id, input = %name, error = %e, "stored input unreadable");
                    return Ok(Some(JobReport::not_run(
                        &record.id,
                        &record.module,
                        "stored input unreadable",
                    )));
                }
            }
        }
        if record.has_stdin {
            spec.stdin = std::fs::read(inputs_dir.join("stdin"))?.into();
        }
        let audits = AuditWrites::default();
        let egress = if module.policy().network.services.is_empty() {
            None
        } else {
            let caller = self.caller_of(record).await?;
            self.egress(module, record, caller, &audits)
        };

        let dir = JobDir::create(self.sandbox.config().work_dir.as_path(), &record.id)?;
        let cancel = Arc::new(Notify::new());
        self.cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(record.id.clone(), Arc::clone(&cancel));
        let result = tokio::select! {
            r = self.sandbox.run_with(module, &spec, &dir, egress) => Some(r),
            () = cancel.notified() => None,
        };
        audits.settle().await;
        self.cancels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&record.id);
        let report = match result {
            None => return Ok(None),
            Some(Ok(report)) => report,
            Some(Err(e)) => JobReport::not_run(&record.id, &record.module, e.to_string()),
        };
        self.keep_outputs(record, &report, &dir)?;
        Ok(Some(report))
    }

    /// Copies a finished job's outputs from its sandbox directory to its
    /// durable one.
    fn keep_outputs(
        &self,
        record: &JobRecord,
        report: &JobReport,
        dir: &JobDir,
    ) -> std::io::Result<()> {
        let outputs = self.job_dir(&record.id).join("outputs");
        // Only a re-run can find an earlier attempt's copy (one a crash
        // interrupted); a first attempt skips the lookup.
        if record.attempts > 1 && outputs.exists() {
            std::fs::remove_dir_all(&outputs)?;
        }
        if !report.outputs.is_empty() {
            crate::sandbox::outputs::collect(&dir.output_dir(), Some(&outputs))?;
        }
        Ok(())
    }

    /// Deletes finished jobs past retention, every minute.
    async fn sweeper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        loop {
            tick.tick().await;
            if self.is_draining() {
                return;
            }
            self.sweep().await;
        }
    }

    /// Deletes the rows and files of jobs that finished longer than the
    /// retention period ago, job directories no row points to that are
    /// older than [`ORPHAN_AGE`], and audit entries older than the audit
    /// retention. Returns how many jobs expired.
    pub async fn sweep(&self) -> usize {
        let audit_before = now_ms() - self.config.audit.retention.get().as_millis() as i64;
        if let Err(e) = self.store.expire_audit(audit_before).await {
            tracing::error!(error = %e, "audit retention sweep failed");
        }
        let before = now_ms() - self.config.storage.retention.get().as_millis() as i64;
        let expired = match self.store.expire_jobs(before).await {
            Ok(ids) => {
                ids.iter().for_each(|id| self.remove_job_files(id));
                ids.len()
            }
            Err(e) => {
                tracing::error!(error = %e, "retention sweep failed");
                self.noted(e.into());
                0
            }
        };
        let orphans = self.remove_orphans(ORPHAN_AGE).await;
        if orphans > 0 {
            tracing::warn!(orphans, "removed job directories no job points to");
        }
        expired
    }

    /// Removes entries of the jobs directory that no job row points to and
    /// that have not changed for `min_age` (a submission writes its inputs
    /// before its row; an inline job its outputs). Returns how many.
    pub async fn remove_orphans(&self, min_age: Duration) -> usize {
        let Ok(entries) = std::fs::read_dir(&self.jobs_dir) else {
            return 0;
        };
        let mut removed = 0;
        for entry in entries.filter_map(Result::ok) {
            let Ok(meta) = entry.path().symlink_metadata() else {
                continue;
            };
            let age = meta
                .modified()
                .ok()
                .and_then(|t| t.elapsed().ok())
                .unwrap_or_default();
            if age < min_age {
                continue;
            }
            let id = entry.file_name().to_string_lossy().into_owned();
            match self.store.job_exists(&id).await {
                Ok(true) => continue,
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(error = %e, "orphan sweep failed");
                    return removed;
                }
            }
            let gone = if meta.is_dir() {
                std::fs::remove_dir_all(entry.path())
            } else {
                std::fs::remove_file(entry.path())
            };
            match gone {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(entry = %entry.path().display(), error = %e, "cannot remove an orphan job directory")
                }
            }
        }
        removed
    }

    /// Watches the storage and recovers jobs, every second: while the
    /// storage has failed, probes it (a store write and a file written and
    /// fsynced under the data directory) until it writes again; checks the
    /// data directory's free space; and after a failure on a job's path,
    /// when the storage recovers, and at least every [`RECOVER_EVERY`]
    /// ticks, re-reads the store's unfinished jobs (see
    /// [`Service::recover`]).
    async fn keeper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u32;
        loop {
            tick.tick().await;
            if self.is_draining() {
                return;
            }
            let was_ok = self.storage_ok();
            let ok = if was_ok {
                match self.free_space() {
                    Ok(free) if free < MIN_FREE => {
                        self.storage_failed(&format!("{free} bytes free under the data directory"));
                        false
                    }
                    _ => true,
                }
            } else {
                match self.probe().await {
                    Ok(()) => {
                        self.storage_ok.store(true, Ordering::SeqCst);
                        tracing::warn!("storage writable again: ready");
                        true
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, "storage still failing");
                        false
                    }
                }
            };
            ticks += 1;
            let wanted = self.recover_wanted.swap(false, Ordering::SeqCst);
            if ok && (wanted || !was_ok || ticks >= RECOVER_EVERY) {
                ticks = 0;
                if let Err(e) = self.recover().await {
                    tracing::error!(error = %e, "cannot recover unfinished jobs");
                    self.recover_wanted.store(true, Ordering::SeqCst);
                    self.noted(e.into());
                }
            } else if wanted {
                self.recover_wanted.store(true, Ordering::SeqCst);
            }
        }
    }

    /// Bytes free for this process under the data directory.
    fn free_space(&self) -> std::io::Result<u64> {
        use std::os::unix::ffi::OsStrExt;
        let path = std::ffi::CString::new(self.config.storage.data_dir.as_os_str().as_bytes())
            .map_err(std::io::Error::other)?;
        let mut stat = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
        // SAFETY: `path` is a NUL-terminated string and `stat` points to
        // writable memory of the right size for the call to fill.
        if unsafe { libc::statvfs(path.as_ptr(), stat.as_mut_ptr()) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: statvfs returned 0, so it filled `stat`.
        let stat = unsafe { stat.assume_init() };
        Ok(stat.f_bavail.saturating_mul(stat.f_frsize))
    }

    /// Whether the storage writes again: the store takes a write, a small
    /// file is written and fsynced under the data directory, and the free
    /// space there is at least [`MIN_FREE`].
    async fn probe(&self) -> Result<(), ServiceError> {
        self.store.probe(now_ms()).await?;
        let path = self.config.storage.data_dir.join(".probe");
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(&[0; 4096])?;
                f.sync_all()
            });
        let _ = std::fs::remove_file(&path);
        written?;
        let free = self.free_space()?;
        if free < MIN_FREE {
            return Err(ServiceError::Io(std::io::Error::from_raw_os_error(
                libc::ENOSPC,
            )));
        }
        Ok(())
    }

    /// Puts every unfinished job of the store that no worker here holds
    /// back in the run queue: `queued` ones whose claim failed, `running`
    /// ones a failure left behind (re-queued first, their attempt spent).
    /// The scheduler ignores jobs it already has.
    ///
    /// # Errors
    /// Store failures.
    pub async fn recover(&self) -> Result<usize, StoreError> {
        let mut queued = 0;
        for job in self.store.pending_jobs().await? {
            if self.is_held(&job.id) {
                continue;
            }
            if job.state == JobState::Running && !self.store.requeue(&job.id, true).await? {
                continue;
            }
            let pushed = self.scheduler.push(
                QueuedJob {
                    id: job.id,
                    tenant: job.tenant,
                    module: job.module,
                },
                false,
            );
            queued += usize::from(pushed.is_ok());
        }
        Ok(queued)
    }
}

fn scope_strings(policy: &Policy) -> Vec<String> {
    policy
        .access
        .scopes
        .iter()
        .map(ToString::to_string)
        .collect()
}

/// How a worker's job ended.
#[derive(Debug)]
enum Ran {
    /// Finished (its record), or cancelled, or left for the next start
    /// (`None`).
    Ended(Option<Box<JobRecord>>),
    /// Given back to the queue after a failure of the host; after a storage
    /// failure (`storage`), the keeper re-queues it once the storage writes.
    Requeued { storage: bool },
}

/// Free bytes under the data directory below which the service reports
/// itself not ready (and the keeper's probe fails).
pub const MIN_FREE: u64 = 1 << 20;

/// Keeper ticks (seconds) between two unprompted recoveries.
const RECOVER_EVERY: u32 = 30;

/// Longest pause between two tries to record a finished job.
const FINISH_RETRY_MAX: Duration = Duration::from_secs(5);

/// A job directory without a row is removed once it is this old: younger,
/// it may be a submission between writing its inputs and its row.
pub const ORPHAN_AGE: Duration = Duration::from_secs(600);

/// Input bytes inline jobs may hold in memory at once, waiting for their
/// turn or running; beyond it a waited-for job is stored and queued like any
/// other, its inputs on disk.
const INLINE_INPUT_BUDGET: usize = 64 << 20;

/// One inline job's share of [`INLINE_INPUT_BUDGET`], given back on drop.
#[derive(Debug)]
struct InlineInputs {
    total: Arc<std::sync::atomic::AtomicUsize>,
    bytes: usize,
}

impl InlineInputs {
    /// Reserves the bytes of `spec`'s inputs and stdin; `None` if they do
    /// not fit in what is left of the budget.
    fn hold(total: &Arc<std::sync::atomic::AtomicUsize>, spec: &JobSpec) -> Option<Self> {
        let bytes = spec.inputs.iter().map(|i| i.data.len()).sum::<usize>() + spec.stdin.len();
        total
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes)
                    .filter(|&n| n <= INLINE_INPUT_BUDGET)
            })
            .ok()?;
        Some(Self {
            total: Arc::clone(total),
            bytes,
        })
    }
}

impl Drop for InlineInputs {
    fn drop(&mut self) {
        self.total.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

/// The audit writes a job's refused calls started (see
/// [`Service::refusal_sink`]).
#[derive(Clone, Debug, Default)]
struct AuditWrites(Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>);

impl AuditWrites {
    /// Waits for every write started so far, so a job's refusals are in the
    /// audit log before it is reported finished (or cancelled).
    async fn settle(&self) {
        let pending = std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()));
        for write in pending {
            let _ = write.await;
        }
    }
}

/// An `egress.denied` audit entry for `record`'s job.
fn egress_denied(record: &JobRecord, detail: String) -> AuditEntry {
    AuditEntry {
        at: now_ms(),
        action: "egress.denied".into(),
        tenant: Some(record.tenant.clone()),
        subject: Some(record.subject.clone()),
        job_id: Some(record.id.clone()),
        module: Some(record.module.clone()),
        module_sha256: Some(record.module_sha256.clone()),
        policy_sha256: record.policy_sha256.clone(),
        detail,
        ..AuditEntry::default()
    }
}

/// An audit entry for a refused request.
pub fn denial(
    who: &Identity,
    action: &str,
    module: Option<&LoadedModule>,
    detail: &str,
) -> AuditEntry {
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

fn load_modules(
    sandbox: &Sandbox,
    relay: Option<&crate::relay::Relay>,
    config: &ServeConfig,
) -> Result<BTreeMap<String, Arc<LoadedModule>>, StartError> {
    let dir = &config.modules.policies_dir;
    let entries = std::fs::read_dir(dir)
        .map_err(|e| StartError::Storage(format!("policies directory {}: {e}", dir.display())))?;
    let mut paths: Vec<_> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    let mut modules = BTreeMap::new();
    for path in paths {
        let declared = relay.map(crate::relay::Relay::names).unwrap_or_default();
        let policy = Policy::load_with(&path, &declared).map_err(|e| StartError::Module {
            module: path.display().to_string(),
            message: e.to_string(),
        })?;
        let name = policy.module.name.to_string();
        let wasm_path = config.modules.modules_dir.join(format!("{name}.wasm"));
        let wasm = std::fs::read(&wasm_path).map_err(|e| StartError::Module {
            module: name.clone(),
            message: format!("cannot read {}: {e}", wasm_path.display()),
        })?;
        let loaded = sandbox
            .load(policy, &wasm)
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
fn admin_token(data: &Path) -> std::io::Result<String> {
    let path = data.join("admin.token");
    match std::fs::read_to_string(&path) {
        Ok(secret) => Ok(crate::auth::hash(secret.trim())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let token = crate::auth::mint();
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            writeln!(f, "{}", token.secret)?;
            f.sync_all()?;
            Ok(token.hash)
        }
        Err(e) => Err(e),
    }
}
