//! Durable state behind one trait: tokens, jobs, audit log.
//!
//! [`JobStore`] is all the service knows about persistence; [`SqliteStore`]
//! implements it on one SQLite file (WAL). The trait is shaped so a
//! PostgreSQL implementation can back several nodes later: every method is
//! one statement or one transaction, state changes are compare-and-set on the
//! job's state (`queued → running` only from `queued`), and nothing relies on
//! process memory.

mod sqlite;

use std::collections::BTreeMap;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::auth::TokenRecord;
use crate::sandbox::JobReport;

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

/// A store failure. Logged in full; clients see a generic 500.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("job store: {0}")]
    Db(#[from] rusqlite::Error),
    /// A stored value could not be decoded.
    #[error("job store: corrupt row: {0}")]
    Corrupt(String),
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
pub trait JobStore: Send + Sync + std::fmt::Debug {
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

    /// Stores a new queued job.
    async fn insert_job(&self, job: &JobRecord) -> Result<(), StoreError>;
    /// The tenant's job with this id.
    async fn get_job(&self, tenant: &str, id: &str) -> Result<Option<JobRecord>, StoreError>;
    /// The tenant's most recent jobs.
    async fn list_jobs(&self, tenant: &str, limit: u32) -> Result<Vec<JobRecord>, StoreError>;
    /// `queued → running`, returning the job; `None` if it is no longer
    /// queued (cancelled, or claimed by another worker).
    async fn claim(&self, id: &str, now: i64) -> Result<Option<JobRecord>, StoreError>;
    /// `running → succeeded | failed` with the report, appending the
    /// `job.finished` audit entry atomically with it; false (and no audit
    /// entry) if it is no longer running (cancelled meanwhile).
    async fn finish_job(&self, id: &str, report: &JobReport, now: i64) -> Result<bool, StoreError>;
    /// Stores a job that ran without being queued (a synchronous request's
    /// fast path) already finished with `report`, with its `job.finished`
    /// audit entry, atomically.
    async fn insert_finished_job(
        &self,
        job: &JobRecord,
        report: &JobReport,
        now: i64,
    ) -> Result<(), StoreError>;
    /// Cancels a queued or running job of the tenant.
    async fn cancel_job(
        &self,
        tenant: &str,
        id: &str,
        now: i64,
    ) -> Result<CancelOutcome, StoreError>;
    /// Deletes a finished job of the tenant.
    async fn delete_job(&self, tenant: &str, id: &str) -> Result<DeleteOutcome, StoreError>;
    /// Puts every `running` job back to `queued` (after a crash); returns
    /// how many.
    async fn requeue_running(&self) -> Result<u64, StoreError>;
    /// Every queued job, oldest first.
    async fn queued_jobs(&self) -> Result<Vec<JobRecord>, StoreError>;
    /// Deletes finished jobs that finished before `before`; returns their ids.
    async fn expire_jobs(&self, before: i64) -> Result<Vec<String>, StoreError>;

    /// Appends to the audit log.
    async fn append_audit(&self, entry: &AuditEntry) -> Result<(), StoreError>;
    /// The newest `limit` audit entries, newest first.
    async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError>;
    /// Deletes audit entries written before `before` (Unix milliseconds);
    /// returns how many.
    async fn expire_audit(&self, before: i64) -> Result<u64, StoreError>;
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
