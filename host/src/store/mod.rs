//! Durable state behind one trait: tokens, jobs, audit log.
//!
//! [`JobStore`] is all the service knows about persistence; [`SqliteStore`]
//! implements it on one SQLite file (WAL), the default, and [`PostgresStore`]
//! on a PostgreSQL database (`[storage] url`). Every method is one statement
//! or one transaction, state changes are compare-and-set on the job's state
//! (`queued → running` only from `queued`), and nothing relies on process
//! memory. **The store knows nothing of the scheduler**. On SQLite (one
//! node per file) fairness and the running caps are the scheduler's, in the
//! service's memory; on a shared store ([`JobStore::shared`], PostgreSQL)
//! the queue is the store's: [`JobStore::claim_next`] applies the caps and
//! fairness over all nodes.
//!
//! **Leases.** A claim records the node that took the job (`claimed_by`)
//! and a lease (`lease_until`) the node renews while it runs the job
//! ([`JobStore::renew_leases`]). A running job whose lease ran out is given
//! back to the queue by any node ([`JobStore::expire_leases`]), or finished
//! `failed` once it was started `max_attempts` times. Finishing, re-queueing
//! and renewing are compare-and-set on the state, the claiming node and the
//! attempt ([`Claimed`]): a node that lost its lease (a pause, a partition)
//! can never overwrite the result of the job's next run, so a job finishes
//! once. PostgreSQL reads leases on the database's clock (`now()`), so the
//! nodes' clocks need not agree; SQLite (one node per file) on the caller's.
//!
//! One behavioural suite (`suite`, tests only) runs against both stores: a
//! SQLite file and a PostgreSQL server the tests start themselves
//! (`pg_server`, public for the multi-node tests of other crates, not part
//! of the API).

pub mod keys;
mod named_vfs;
#[doc(hidden)]
pub mod pg_server;
mod postgres;
mod sqlite;
#[cfg(test)]
mod suite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::auth::TokenRecord;
use crate::job::{JobReport, LimitKind, ReportSummary};

pub use keys::{KeyDirectory, NodeRecord, PublishedKey};
pub use postgres::PostgresStore;
pub(crate) use postgres::session_options;
pub use sqlite::SqliteStore;

/// Where a job is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Accepted and durable, waiting for a worker.
    Queued,
    /// A worker is running it.
    Running,
    /// Finished; the guest succeeded.
    Succeeded,
    /// Finished; trap, non-zero exit or limit (see the report).
    Failed,
    /// Cancelled by its owner before it finished.
    Cancelled,
}

impl JobState {
    /// The state's name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => return None,
        })
    }

    /// Whether the job will not change any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

/// A stored job.
#[derive(Clone, Debug, PartialEq)]
pub struct JobRecord {
    /// Job id (UUID).
    pub id: String,
    /// Owning tenant; every lookup filters on it.
    pub tenant: String,
    /// Submitting subject.
    pub subject: String,
    /// Token used to submit (public id).
    pub token_id: String,
    /// Module name.
    pub module: String,
    /// Module digest at submission.
    pub module_sha256: String,
    /// Policy digest at submission.
    pub policy_sha256: Option<String>,
    /// Job parameters.
    pub params: BTreeMap<String, String>,
    /// Input file names (content lives in the job's directory).
    pub inputs: Vec<String>,
    /// Whether a stdin file was stored.
    pub has_stdin: bool,
    /// Current state.
    pub state: JobState,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub started_at: Option<i64>,
    /// Unix milliseconds.
    pub finished_at: Option<i64>,
    /// Times a worker started it (more than 1 after a crash).
    pub attempts: u32,
    /// The sandbox report once finished.
    pub report: Option<JobReport>,
}

/// A stored job as a listing shows it: its report in a few words
/// ([`ReportSummary`], written beside the report when the job finishes), so
/// that listing many jobs neither reads nor holds their reports, whose
/// captured text and outputs lists can be megabytes each.
#[derive(Clone, Debug, PartialEq)]
pub struct JobSummary {
    /// Job id (UUID).
    pub id: String,
    /// Module name.
    pub module: String,
    /// Current state.
    pub state: JobState,
    /// Unix milliseconds.
    pub created_at: i64,
    /// Unix milliseconds.
    pub started_at: Option<i64>,
    /// Unix milliseconds.
    pub finished_at: Option<i64>,
    /// Times a worker started it.
    pub attempts: u32,
    /// How it ended, once finished.
    pub report: Option<ReportSummary>,
}

/// One audit log entry: who did what to which module, and what happened.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AuditEntry {
    /// Unix milliseconds.
    pub at: i64,
    /// What happened: `job.finished`, `job.cancelled`, `auth.denied`,
    /// `scope.denied`, `access.denied`, `quota.denied`, `token.issued`,
    /// `token.revoked`.
    pub action: String,
    /// Tenant, when known.
    pub tenant: Option<String>,
    /// Subject, when known.
    pub subject: Option<String>,
    /// Job id, when there is one.
    pub job_id: Option<String>,
    /// Module name.
    pub module: Option<String>,
    /// Module digest.
    pub module_sha256: Option<String>,
    /// Policy digest.
    pub policy_sha256: Option<String>,
    /// Job outcome.
    pub outcome: Option<String>,
    /// Limit that fired.
    pub limit: Option<String>,
    /// Free text: the denied action, the reason.
    pub detail: String,
    /// The client's address, for requests that came over the network.
    #[serde(default)]
    pub client: Option<String>,
}

impl AuditEntry {
    /// The `job.finished` entry of `job`, finished at `at` with what
    /// `finished` took from its typed report.
    pub fn job_finished(job: &AuditedJob, finished: &JobFinished, at: i64) -> Self {
        Self {
            at,
            action: "job.finished".into(),
            tenant: Some(job.tenant.clone()),
            subject: Some(job.subject.clone()),
            job_id: Some(job.id.clone()),
            module: Some(job.module.clone()),
            module_sha256: Some(job.module_sha256.clone()),
            policy_sha256: job.policy_sha256.clone(),
            outcome: Some(finished.state.as_str().to_owned()),
            limit: finished.limit.and_then(report_name),
            detail: finished.detail.clone(),
            client: None,
        }
    }
}

/// `kind` as the report names it (`tables`, where the policy key is
/// `table_elements`): the audit says what the report says.
fn report_name(kind: LimitKind) -> Option<String> {
    match serde_json::to_value(kind) {
        Ok(serde_json::Value::String(name)) => Some(name),
        _ => None,
    }
}

/// Who ran what, as a job's row records it: the part of the `job.finished`
/// audit entry that comes from the store rather than the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditedJob {
    /// Job id.
    pub id: String,
    /// Owning tenant.
    pub tenant: String,
    /// Submitting subject.
    pub subject: String,
    /// Module name.
    pub module: String,
    /// Module digest at submission.
    pub module_sha256: String,
    /// Policy digest at submission.
    pub policy_sha256: Option<String>,
}

/// What the `job.finished` audit entry says about a run, taken from the
/// typed [`JobReport`] in Rust (not read back out of the stored JSON), so
/// renaming a report field cannot silently empty the audit log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobFinished {
    /// `succeeded` or `failed`, by the report's outcome.
    pub state: JobState,
    /// The limit that fired first, if any.
    pub limit: Option<LimitKind>,
    /// The failure's message, empty when the job succeeded.
    pub detail: String,
    /// The report in a few words, kept beside it for listings.
    pub summary: ReportSummary,
}

impl JobFinished {
    /// The audit's view of `report`.
    pub fn of(report: &JobReport) -> Self {
        Self {
            state: if report.succeeded() {
                JobState::Succeeded
            } else {
                JobState::Failed
            },
            limit: report.limit,
            detail: report
                .failure
                .as_ref()
                .map(|f| f.message.clone())
                .unwrap_or_default(),
            summary: report.summary(),
        }
    }
}

/// A store failure. Logged in full; clients see a generic 500, or a 503
/// with `Retry-After` when the storage under the store is exhausted or
/// failing ([`StoreError::is_storage`]).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("job store: {0}")]
    Db(#[from] rusqlite::Error),
    /// The PostgreSQL database failed, or could not be reached.
    #[error("job store: {0}")]
    Postgres(#[from] sqlx::Error),
    /// A transaction could not begin or commit (the disk is full, or the
    /// file cannot be written).
    #[error("job store: write failed: {message}")]
    Write {
        /// Whether it failed because the disk is full.
        full: bool,
        /// SQLite's message.
        message: String,
    },
    /// A stored value could not be decoded.
    #[error("job store: corrupt row: {0}")]
    Corrupt(String),
    /// The database could not be opened or set up.
    #[error("job store: cannot open: {0}")]
    Open(String),
}

impl StoreError {
    /// Whether it failed because the disk under the store is full
    /// (`SQLITE_FULL`).
    pub fn is_full(&self) -> bool {
        match self {
            StoreError::Db(e) => e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull),
            StoreError::Postgres(e) => postgres::sqlstate(e).is_some_and(|c| c == "53100"),
            StoreError::Write { full, .. } => *full,
            StoreError::Corrupt(_) | StoreError::Open(_) => false,
        }
    }

    /// Whether the storage under the store failed (full, I/O error, cannot
    /// open or write the file) rather than the request: such a failure is
    /// the host's, passes when the storage recovers, and is worth a retry.
    pub fn is_storage(&self) -> bool {
        use rusqlite::ErrorCode as C;
        match self {
            StoreError::Db(e) => matches!(
                e.sqlite_error_code(),
                Some(
                    C::DiskFull
                        | C::SystemIoFailure
                        | C::CannotOpen
                        | C::ReadOnly
                        | C::DatabaseBusy
                        | C::DatabaseLocked
                )
            ),
            StoreError::Postgres(e) => postgres::is_storage(e),
            StoreError::Write { .. } => true,
            StoreError::Corrupt(_) | StoreError::Open(_) => false,
        }
    }
}

/// An `Idempotency-Key` given with a submission: a second submission with
/// the same key (same tenant) returns the first job instead of creating one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Idempotency {
    /// The client's key (validated by the service).
    pub key: String,
    /// SHA-256 of the request it came with (module, parameters, inputs,
    /// stdin), so a reuse with another request is told apart.
    pub request_sha256: String,
    /// Unix milliseconds: a key first used before this has expired and may
    /// name a new job.
    pub since: i64,
}

/// Which job's report [`JobStore::report_len`] measures.
#[derive(Clone, Copy, Debug)]
pub enum ReportOf<'a> {
    /// The job with this id.
    Id(&'a str),
    /// The job created with this idempotency key since (Unix ms), as
    /// [`JobStore::job_by_key`] finds it.
    Key(&'a str, i64),
}

/// What inserting a job with an [`Idempotency`] key found.
#[derive(Clone, Debug, PartialEq)]
pub enum Inserted {
    /// The job was stored.
    New,
    /// A job with the same key (still within retention) exists; nothing was
    /// stored. Its request's hash is returned alongside.
    Existing(Box<JobRecord>, String),
}

/// The queue's bounds, for [`JobStore::insert_queued_within`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueBounds {
    /// Queued jobs of all tenants.
    pub total: u64,
    /// Queued jobs of the submitting tenant.
    pub per_tenant: u64,
}

/// Which bound refused a job.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueFull {
    /// The tenant's share of the queue.
    Tenant,
    /// The whole queue.
    Service,
}

/// A job this process claimed (`queued → running`), or that recovery took
/// over from a failure: the one thing [`JobStore::finish_job`] and
/// [`JobStore::requeue`] accept, so nothing but a claim can end or give
/// back a running job. Only the store makes one (its fields are private).
///
/// It names the tenant, and the attempt it holds (the count and the start
/// time): a claim whose job has since been given back and claimed again
/// finishes nothing.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Claimed {
    id: String,
    tenant: String,
    attempt: u32,
    started_at: Option<i64>,
    /// The node that claimed it (`None`: an inline job, stored finished).
    node: Option<String>,
}

impl Claimed {
    /// The claim a running job's row holds, taken by `node`.
    fn of(job: &JobRecord, node: Option<&str>) -> Self {
        Self {
            id: job.id.clone(),
            tenant: job.tenant.clone(),
            attempt: job.attempts,
            started_at: job.started_at,
            node: node.map(str::to_owned),
        }
    }

    /// The node holding the claim.
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    /// The job's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The job's tenant.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// Which start of the job this claim holds (1 for the first).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
}

/// Who claims a job, and for how long its lease runs from each claim or
/// renewal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Lease {
    /// The claiming node's id (this start of it: [`crate::config::Node::id`]).
    pub node: String,
    /// How long a claim or a renewal holds the job, in milliseconds.
    pub millis: i64,
}

impl Lease {
    /// A lease of `node` for `duration`.
    pub fn new(node: &str, duration: std::time::Duration) -> Self {
        Self {
            node: node.to_owned(),
            millis: i64::try_from(duration.as_millis()).unwrap_or(i64::MAX / 4),
        }
    }
}

/// The running caps a claim from the shared queue respects, across every
/// node of the store ([`JobStore::claim_next`]), and the modules the
/// claiming node serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caps {
    /// Running jobs per tenant, all nodes together.
    pub per_tenant: u32,
    /// Running jobs per module, all nodes together.
    pub per_module: u32,
    /// Modules the claiming node can run; jobs of others are left to the
    /// nodes that serve them.
    pub modules: Vec<String>,
}

/// A job queued or ended on some node sharing the store, heard through it
/// ([`JobStore::events`]).
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
pub struct JobEvent {
    /// Its new state: `queued`, or a final one.
    pub state: JobState,
    /// Owning tenant.
    pub tenant: String,
    /// Job id.
    pub id: String,
}

/// What [`JobStore::expire_leases`] did with the running jobs whose lease
/// ran out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Expired {
    /// Given back to the queue (their attempt stays counted), oldest first.
    pub requeued: Vec<PendingJob>,
    /// Started `max_attempts` times: finished `failed`, with a report
    /// naming the reason.
    pub failed: Vec<JobRecord>,
}

/// Result of claiming a queued job.
#[derive(Clone, Debug, PartialEq)]
pub enum Claim {
    /// It is now `running`, its attempt counted; the claim finishes or
    /// re-queues it.
    Run(Box<JobRecord>, Claimed),
    /// It is no longer queued (cancelled, or claimed by another worker).
    Gone,
    /// It had already been started the maximum number of times without
    /// finishing: it is now `failed`, with a report saying so.
    GaveUp(Box<JobRecord>),
}

/// An unfinished job, as recovery needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingJob {
    /// Job id.
    pub id: String,
    /// Owning tenant.
    pub tenant: String,
    /// Module name.
    pub module: String,
    /// `queued` or `running`.
    pub state: JobState,
    /// For a `running` job, the claim a crash or failure left on it, for
    /// recovery to give the job back to the queue.
    pub claim: Option<Claimed>,
}

/// Result of a cancel request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CancelOutcome {
    /// No such job for this tenant.
    NotFound,
    /// It had already finished.
    AlreadyFinished(JobState),
    /// It was queued or running and is now cancelled.
    Cancelled(JobState),
}

/// Result of a delete request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// No such job for this tenant.
    NotFound,
    /// It is still queued or running; cancel it first.
    NotFinished(JobState),
    /// Gone.
    Deleted,
}

/// Persistence for the service.
#[async_trait]
pub trait JobStore: KeyDirectory + Send + Sync + std::fmt::Debug {
    /// Stores a new token.
    async fn insert_token(&self, token: &TokenRecord) -> Result<(), StoreError>;
    /// Finds a token by the hash of its secret.
    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Finds a token by its public id.
    async fn token_by_id(&self, id: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Lists tokens (all tenants).
    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// Revokes a token by id; false if unknown.
    async fn revoke_token(&self, id: &str) -> Result<bool, StoreError>;

    /// [`JobStore::insert_job`] of a queued job only while the queue holds
    /// fewer queued jobs than `bounds` allows, the tenant's and in all. On a
    /// shared store the count and the insert are one transaction under a
    /// lock per tenant, so concurrent submissions through any nodes never
    /// pass the tenant's bound; the total may be passed by the submissions
    /// of other tenants committing at the same moment. A store of one node
    /// leaves the bounds to the scheduler and just inserts.
    async fn insert_queued_within(
        &self,
        job: &JobRecord,
        key: Option<&Idempotency>,
        bounds: &QueueBounds,
    ) -> Result<Result<Inserted, QueueFull>, StoreError> {
        let _ = bounds;
        self.insert_job(job, key).await.map(Ok)
    }

    /// Stores a new queued job. With `key`, stores it only if no job of
    /// the tenant with that key was created since `key.since` (an older use
    /// of the key is forgotten), in the same transaction as the check.
    async fn insert_job(
        &self,
        job: &JobRecord,
        key: Option<&Idempotency>,
    ) -> Result<Inserted, StoreError>;
    /// The tenant's job created with idempotency key `key` since `since`,
    /// with its request's hash.
    async fn job_by_key(
        &self,
        tenant: &str,
        key: &str,
        since: i64,
    ) -> Result<Option<(JobRecord, String)>, StoreError>;
    /// The tenant's job with this id.
    async fn get_job(&self, tenant: &str, id: &str) -> Result<Option<JobRecord>, StoreError>;
    /// How many bytes the stored report of the tenant's job `of` takes,
    /// found without reading the report (`octet_length`): what reading
    /// the job will cost, known before it is read. `None`: no such job, or
    /// no report yet.
    async fn report_len(&self, tenant: &str, of: ReportOf<'_>) -> Result<Option<u64>, StoreError>;
    /// The tenant's most recent jobs.
    async fn list_jobs(&self, tenant: &str, limit: u32) -> Result<Vec<JobSummary>, StoreError>;
    /// The tenant's job `id`, `queued → running`, counting the attempt,
    /// held by `lease`'s node until the lease runs out; a job already
    /// started `max_attempts` times is finished `failed` instead (see
    /// [`Claim`]).
    async fn claim(
        &self,
        tenant: &str,
        id: &str,
        now: i64,
        max_attempts: u32,
        lease: &Lease,
    ) -> Result<Claim, StoreError>;
    /// Claims the next queued job from the shared queue, atomically against
    /// every node: of the tenants under their running cap, the one with the
    /// fewest running jobs, its oldest job whose module is under its cap
    /// and served by the node (`caps`). `None` when nothing may start.
    /// Otherwise as [`JobStore::claim`] (a job started `max_attempts` times
    /// is finished `failed` instead).
    async fn claim_next(
        &self,
        now: i64,
        max_attempts: u32,
        lease: &Lease,
        caps: &Caps,
    ) -> Result<Option<Claim>, StoreError>;
    /// Queued jobs of `tenant`, and of every tenant: the queue's bounds
    /// when the queue is the store's ([`JobStore::shared`]).
    async fn queued_counts(&self, tenant: &str) -> Result<(u64, u64), StoreError>;
    /// The jobs queued or ended by any node sharing the store, as their
    /// transactions commit; `None` where the store is not shared. Best
    /// effort: what is announced while the connection is lost is not
    /// heard, so whoever listens keeps a slow poll beside it.
    async fn events(&self) -> Result<Option<tokio::sync::mpsc::Receiver<JobEvent>>, StoreError> {
        Ok(None)
    }
    /// Whether several nodes may share this store: then the queue is the
    /// store's (nodes take jobs with [`JobStore::claim_next`]), not each
    /// node's memory.
    fn shared(&self) -> bool {
        false
    }
    /// Renews, in one statement, the leases of `claims` (all held by
    /// `lease`'s node) for another `lease.millis` from `now`; returns the
    /// claims that no longer hold (the job was cancelled, or its lease ran
    /// out and it was given back or claimed again): their runs must stop.
    async fn renew_leases(
        &self,
        lease: &Lease,
        claims: &[Claimed],
        now: i64,
    ) -> Result<Vec<Claimed>, StoreError>;
    /// Gives back to the queue every running job whose lease ran out
    /// before `now` (whichever node held it), its attempt counted; one
    /// already started `max_attempts` times is finished `failed` instead,
    /// with its `job.finished` audit entry.
    async fn expire_leases(&self, now: i64, max_attempts: u32) -> Result<Expired, StoreError>;
    /// `running → queued` for a claimed job this process could not finish;
    /// with `count` false the attempt it used is given back (the failure
    /// was the storage's, not the job's). False if the claim no longer
    /// holds (the job is not running, or runs another attempt).
    async fn requeue(&self, claim: &Claimed, count: bool) -> Result<bool, StoreError>;
    /// `running → succeeded | failed` with the report, appending the
    /// `job.finished` audit entry ([`JobFinished`]) atomically with it;
    /// false (and no audit entry) if the claim no longer holds (cancelled
    /// meanwhile).
    async fn finish_job(
        &self,
        claim: &Claimed,
        report: &JobReport,
        now: i64,
    ) -> Result<bool, StoreError>;
    /// Stores a job that ran without being queued (a synchronous request's
    /// inline path) already finished with `report`, with its `job.finished`
    /// audit entry, atomically; with `key`, only if no live job holds the
    /// key (as [`JobStore::insert_job`]).
    async fn insert_finished_job(
        &self,
        job: &JobRecord,
        report: &JobReport,
        now: i64,
        key: Option<&Idempotency>,
    ) -> Result<Inserted, StoreError>;
    /// Cancels a queued or running job of the tenant.
    async fn cancel_job(
        &self,
        tenant: &str,
        id: &str,
        now: i64,
    ) -> Result<CancelOutcome, StoreError>;
    /// Deletes a finished job of the tenant.
    async fn delete_job(&self, tenant: &str, id: &str) -> Result<DeleteOutcome, StoreError>;
    /// At a node's start: puts `running` jobs back to `queued`, their
    /// attempt counted; returns how many. SQLite (one node per file) takes
    /// back every running job, left by the previous process; PostgreSQL
    /// only those whose lease ran out (other nodes' live jobs stay theirs;
    /// see [`JobStore::expire_leases`]).
    async fn requeue_running(&self) -> Result<u64, StoreError>;
    /// Every queued job, oldest first.
    async fn queued_jobs(&self) -> Result<Vec<JobRecord>, StoreError>;
    /// Every queued or running job (all tenants: recovery), oldest first,
    /// each running one with its claim.
    async fn pending_jobs(&self) -> Result<Vec<PendingJob>, StoreError>;
    /// Whether a job with this id exists (any tenant: the orphan sweep).
    async fn job_exists(&self, id: &str) -> Result<bool, StoreError>;
    /// Deletes finished jobs that finished before `before`; returns their ids.
    async fn expire_jobs(&self, before: i64) -> Result<Vec<String>, StoreError>;
    /// A small write, to learn whether the store can write again.
    async fn probe(&self, now: i64) -> Result<(), StoreError>;

    /// Appends to the audit log.
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError>;
    /// The newest `limit` audit entries, newest first.
    async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError>;
    /// Deletes audit entries written before `before` (Unix milliseconds);
    /// returns how many.
    async fn expire_audit(&self, before: i64) -> Result<u64, StoreError>;
}

/// The claims among `claims` that `held` (id, attempt and start of each
/// job a renewal found still running for its node) no longer names.
fn lost_claims(claims: &[Claimed], held: &[(String, u32, Option<i64>)]) -> Vec<Claimed> {
    claims
        .iter()
        .filter(|c| {
            !held.iter().any(|(id, attempt, started)| {
                *id == c.id && *attempt == c.attempt && *started == c.started_at
            })
        })
        .cloned()
        .collect()
}

/// The report of a job finished `failed` because its lease ran out on its
/// last allowed attempt.
fn lease_expired_report(job: &JobRecord) -> JobReport {
    JobReport::not_run(
        &job.id,
        &job.module,
        format!(
            "lease expired: the node running the job stopped renewing its lease, and the job \
             was started {} times without finishing",
            job.attempts
        ),
    )
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
