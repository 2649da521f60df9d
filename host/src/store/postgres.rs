//! [`JobStore`] on PostgreSQL, through sqlx's pool (`[storage] url`).
//!
//! The schema is versioned migrations (`host/migrations/postgres/`, embedded
//! with `sqlx::migrate!`), applied when the store opens; sqlx takes an
//! advisory lock while it migrates, so nodes starting together apply each
//! version once. Every method is one statement, or one transaction where
//! the SQLite store's write is more than one statement, at PostgreSQL's
//! default `READ COMMITTED`: each guarded `UPDATE` re-checks its `WHERE`
//! (the job's state, the claim's attempt and start time) against the row's
//! newest version after waiting for its lock, so compare-and-set holds
//! between connections and nodes as it does behind SQLite's single writer.
//!
//! A claim takes the queued row with `FOR NO KEY UPDATE SKIP LOCKED`: a job
//! another transaction holds is "gone" for this claim, never waited for.
//! The only transactions that lock a queued job's row are another claim and
//! a cancel, both of which leave it not queued, so skipping is the right
//! answer. That is why idempotency keys live in their own table (see the
//! migration): taking over an expired key must not lock the job that held
//! it. (`NO KEY` so the key table's foreign-key checks, which share-lock
//! the job's key, never make a claim skip.)
//!
//! Leases are kept on the database's clock (`clock_timestamp()`, Unix
//! milliseconds), so nodes whose clocks disagree still agree on whose lease
//! ran out. [`JobStore::requeue_running`] at a node's start takes back only
//! running jobs whose lease ran out: the others belong to live nodes.
//!
//! The queue is the database's ([`JobStore::shared`]): a node takes the
//! next job with [`JobStore::claim_next`], which holds a transaction-scoped
//! advisory lock ([`CLAIM_LOCK`]) while it counts running jobs per tenant
//! and per module and claims the chosen row (`FOR NO KEY UPDATE SKIP
//! LOCKED`), so two nodes never both take the last slot of a cap, and
//! fairness (fewest running first, then oldest) is decided over all nodes.
//!
//! Wake-ups are `LISTEN/NOTIFY`: a trigger (migration 0003) announces each
//! job queued or ended on channel [`EVENTS`] at commit, and
//! [`JobStore::events`] listens on one connection of the pool.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::Row;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};

use super::{
    AuditEntry, AuditedJob, CancelOutcome, Caps, Claim, Claimed, DeleteOutcome, Expired,
    Idempotency, Inserted, JobFinished, JobRecord, JobState, JobStore, JobSummary, Lease,
    PendingJob, QueueBounds, QueueFull, ReportOf, StoreError,
};
use crate::auth::TokenRecord;

/// The schema's versions, applied in order at open.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// How long a statement waits for a pooled connection before the store
/// reports the database unreachable (a storage failure: 503 and readiness
/// off until the keeper's probe passes).
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// The channel jobs queued or ended are announced on (see migration 0003).
const EVENTS: &str = "bulkhead_jobs";

/// The advisory lock key [`JobStore::claim_next`] serializes claims on
/// (`pg_advisory_xact_lock`, released at commit): "bulkhead claims".
/// How long a session may sit idle inside a transaction before the
/// database ends it. Every transaction of this store runs its statements
/// back to back; one idle this long belongs to a node that stopped.
const IDLE_IN_TRANSACTION: &str = "5s";

/// The seed of the per-tenant advisory locks of
/// [`JobStore::insert_queued_within`] (`hashtextextended(tenant, seed)`).
const QUEUE_LOCK_SEED: i64 = 0x7175_6575;

pub(super) const CLAIM_LOCK: i64 = 0x6275_6c6b_636c_6169;

/// A job's columns, JSON ones as text, for `SELECT` and `RETURNING`.
macro_rules! job_cols {
    () => {
        "jobs.id, jobs.tenant, jobs.subject, jobs.token_id, jobs.module, jobs.module_sha256,
         jobs.policy_sha256, jobs.params::text AS params, jobs.inputs::text AS inputs,
         jobs.has_stdin, jobs.state, jobs.created_at, jobs.started_at, jobs.finished_at,
         jobs.attempts, jobs.report"
    };
}

/// The database's clock, Unix milliseconds: leases are read and written on
/// it, never on a node's.
macro_rules! db_now {
    () => {
        "(EXTRACT(EPOCH FROM clock_timestamp()) * 1000)::BIGINT"
    };
}

/// A token's columns, scopes as text.
macro_rules! token_cols {
    () => {
        "id, hash, tenant, subject, scopes::text AS scopes, created_at, expires_at, revoked"
    };
}

/// The PostgreSQL job store: a bounded pool of connections to one database.
pub struct PostgresStore {
    pub(super) pool: PgPool,
    /// `host:port/database`, for logs (never the password).
    target: String,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// The SQLSTATE of a database error, if `e` is one.
pub(super) fn sqlstate(e: &sqlx::Error) -> Option<String> {
    match e {
        sqlx::Error::Database(d) => d.code().map(|c| c.into_owned()),
        _ => None,
    }
}

/// Whether `e` is the database's or the network's failure rather than the
/// request's: unreachable, connection lost, out of resources (disk full,
/// too many connections), shutting down, read-only. Such a failure passes
/// when the database recovers, and is worth a retry.
pub(super) fn is_storage(e: &sqlx::Error) -> bool {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => true,
        sqlx::Error::Database(_) => sqlstate(e).is_some_and(|c| {
            // 08: connection exception; 53: insufficient resources; 58:
            // system error; 57P01-03: shutting down, cannot connect now;
            // 25006: read-only transaction (a standby).
            c.starts_with("08")
                || c.starts_with("53")
                || c.starts_with("58")
                || matches!(c.as_str(), "57P01" | "57P02" | "57P03" | "25006")
        }),
        _ => false,
    }
}

impl PostgresStore {
    /// Connects to `url` with a pool of at most `pool_size` connections and
    /// applies the migrations this build has not yet applied.
    ///
    /// # Errors
    /// If the URL is malformed, the database cannot be reached, or a
    /// migration fails (or the database has one this build does not know).
    pub async fn open(url: &str, pool_size: u32) -> Result<Self, StoreError> {
        Self::open_waiting(url, pool_size, ACQUIRE_TIMEOUT).await
    }

    /// [`PostgresStore::open`], a statement waiting up to `acquire_timeout`
    /// for a connection (the tests' suite, on a loaded machine, waits longer
    /// than a node should before it reports the database unreachable).
    pub(crate) async fn open_waiting(
        url: &str,
        pool_size: u32,
        acquire_timeout: Duration,
    ) -> Result<Self, StoreError> {
        let options = session_options(url)?;
        let target = format!(
            "{}:{}/{}",
            options.get_host(),
            options.get_port(),
            options.get_database().unwrap_or("")
        );
        // sqlx pings a pooled connection before handing it out (its
        // default `test_before_acquire`): one more round trip per
        // statement, but a connection the database dropped (a restart) is
        // replaced instead of failing a request.
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(1))
            .min_connections(0)
            .acquire_timeout(acquire_timeout)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Open(format!("cannot connect to {target}: {e}")))?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StoreError::Open(format!("migrating {target}: {e}")))?;
        Ok(Self { pool, target })
    }
}

/// How every pool of a node connects to `url` (the job store's and the blob
/// store's). A session that sits inside a transaction for
/// `IDLE_IN_TRANSACTION` is ended by the database, and its locks with it: a
/// node frozen mid-transaction (a stopped process, a paused machine) cannot
/// hold the cluster-wide claim lock or a job's output lock for longer.
///
/// # Errors
/// [`StoreError::Open`] if the URL is malformed.
pub(crate) fn session_options(url: &str) -> Result<PgConnectOptions, StoreError> {
    Ok(PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::Open(format!("bad database url: {e}")))?
        .options([("idle_in_transaction_session_timeout", IDLE_IN_TRANSACTION)]))
}

/// Finishes `failed`, in `tx`, the job in `row` that was started the most
/// times it may be (the claim that found it marked it running for `lease`'s
/// node), and commits.
async fn give_up(
    mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
    row: &PgRow,
    lease: &Lease,
    now: i64,
) -> Result<JobRecord, StoreError> {
    let mut job = job_row(row)?;
    let report = crate::sandbox::JobReport::not_run(
        &job.id,
        &job.module,
        format!(
            "the host could not finish the job in {} attempts",
            job.attempts
        ),
    );
    finish(
        &mut tx,
        &Claimed::of(&job, Some(&lease.node)),
        &JobFinished::of(&report),
        now,
        &json(&report),
    )
    .await?;
    tx.commit().await?;
    job.state = JobState::Failed;
    job.finished_at = Some(now);
    job.report = Some(report);
    Ok(job)
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serializes")
}

/// A JSON text column decoded into `T`.
fn json_col<T: serde::de::DeserializeOwned>(row: &PgRow, col: &str) -> Result<T, StoreError> {
    let text: String = row.try_get(col)?;
    serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
}

fn parse_state(text: &str) -> Result<JobState, StoreError> {
    JobState::parse(text).ok_or_else(|| StoreError::Corrupt(format!("state `{text}`")))
}

fn token_row(row: &PgRow) -> Result<TokenRecord, StoreError> {
    Ok(TokenRecord {
        id: row.try_get("id")?,
        hash: row.try_get("hash")?,
        tenant: row.try_get("tenant")?,
        subject: row.try_get("subject")?,
        scopes: json_col(row, "scopes")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked: row.try_get("revoked")?,
    })
}

fn job_row(row: &PgRow) -> Result<JobRecord, StoreError> {
    let state: String = row.try_get("state")?;
    // Decoded from the row's own buffer: a report can be tens of MB, and
    // a copy of it would be held beside the decoded one.
    let report: Option<&str> = row.try_get("report")?;
    let report = report
        .map(crate::sandbox::JobReport::decode)
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("report: {e}")))?;
    Ok(JobRecord {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant")?,
        subject: row.try_get("subject")?,
        token_id: row.try_get("token_id")?,
        module: row.try_get("module")?,
        module_sha256: row.try_get("module_sha256")?,
        policy_sha256: row.try_get("policy_sha256")?,
        params: json_col(row, "params")?,
        inputs: json_col(row, "inputs")?,
        has_stdin: row.try_get("has_stdin")?,
        state: parse_state(&state)?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        attempts: attempts(row)?,
        report,
    })
}

fn summary_row(row: &PgRow) -> Result<JobSummary, StoreError> {
    let state: String = row.try_get("state")?;
    let summary: Option<String> = row.try_get("summary")?;
    Ok(JobSummary {
        id: row.try_get("id")?,
        module: row.try_get("module")?,
        state: parse_state(&state)?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        attempts: attempts(row)?,
        report: summary
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(|e| StoreError::Corrupt(format!("summary: {e}")))?,
    })
}

fn attempts(row: &PgRow) -> Result<u32, StoreError> {
    let n: i32 = row.try_get("attempts")?;
    u32::try_from(n).map_err(|_| StoreError::Corrupt(format!("attempts {n}")))
}

fn audit_row(r: &PgRow) -> Result<AuditEntry, StoreError> {
    Ok(AuditEntry {
        at: r.try_get("at")?,
        action: r.try_get("action")?,
        tenant: r.try_get("tenant")?,
        subject: r.try_get("subject")?,
        job_id: r.try_get("job_id")?,
        module: r.try_get("module")?,
        module_sha256: r.try_get("module_sha256")?,
        policy_sha256: r.try_get("policy_sha256")?,
        outcome: r.try_get("outcome")?,
        limit: r.try_get("limit_fired")?,
        detail: r.try_get("detail")?,
        client: r.try_get("client")?,
    })
}

/// An attempt count as stored.
fn stored_attempts(n: u32) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

/// The tenant's job holding idempotency key `key` since `since`, with its
/// request's hash.
async fn by_key(
    c: &mut PgConnection,
    tenant: &str,
    key: &str,
    since: i64,
) -> Result<Option<(JobRecord, String)>, StoreError> {
    let row = sqlx::query(concat!(
        "SELECT ",
        job_cols!(),
        ", k.request_sha256 FROM idempotency k JOIN jobs ON jobs.id = k.job_id
         WHERE k.tenant = $1 AND k.key = $2 AND k.created_at >= $3 AND jobs.tenant = $1"
    ))
    .bind(tenant)
    .bind(key)
    .bind(since)
    .fetch_optional(&mut *c)
    .await?;
    row.map(|r| Ok((job_row(&r)?, r.try_get("request_sha256")?)))
        .transpose()
}

/// Inserts `j` as `state` (inside the caller's transaction), taking its
/// idempotency key first: if a job of the tenant took the key since
/// `key.since`, nothing is written and that job is returned.
///
/// The key's row is an upsert that takes over only an expired use, so two
/// submissions racing with one key serialize on its row: the second waits
/// for the first to commit, then finds its job.
async fn insert_job_row(
    c: &mut PgConnection,
    j: &JobRecord,
    key: Option<&Idempotency>,
    state: JobState,
    started_at: Option<i64>,
    attempts: u32,
) -> Result<Inserted, StoreError> {
    if let Some(k) = key {
        let took = sqlx::query(
            "INSERT INTO idempotency (tenant, key, job_id, request_sha256, created_at)
             VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (tenant, key) DO UPDATE
                 SET job_id = EXCLUDED.job_id, request_sha256 = EXCLUDED.request_sha256,
                     created_at = EXCLUDED.created_at
                 WHERE idempotency.created_at < $6",
        )
        .bind(&j.tenant)
        .bind(&k.key)
        .bind(&j.id)
        .bind(&k.request_sha256)
        .bind(j.created_at)
        .bind(k.since)
        .execute(&mut *c)
        .await?
        .rows_affected()
            == 1;
        if !took {
            return match by_key(c, &j.tenant, &k.key, k.since).await? {
                Some((job, hash)) => Ok(Inserted::Existing(Box::new(job), hash)),
                // The live key's job was deleted after this upsert found
                // the key: the submission is refused rather than guessed.
                None => Err(StoreError::Write {
                    full: false,
                    message: format!("idempotency key `{}` changed during the insert", k.key),
                }),
            };
        }
    }
    sqlx::query(
        "INSERT INTO jobs (id, tenant, subject, token_id, module, module_sha256, policy_sha256,
                           params, inputs, has_stdin, state, created_at, started_at, attempts)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9::jsonb, $10, $11, $12, $13, $14)",
    )
    .bind(&j.id)
    .bind(&j.tenant)
    .bind(&j.subject)
    .bind(&j.token_id)
    .bind(&j.module)
    .bind(&j.module_sha256)
    .bind(&j.policy_sha256)
    .bind(json(&j.params))
    .bind(json(&j.inputs))
    .bind(j.has_stdin)
    .bind(state.as_str())
    .bind(j.created_at)
    .bind(started_at)
    .bind(stored_attempts(attempts))
    .execute(&mut *c)
    .await?;
    Ok(Inserted::New)
}

/// Appends `e` to the audit log.
async fn insert_audit(c: &mut PgConnection, e: &AuditEntry) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit (at, action, tenant, subject, job_id, module, module_sha256,
                            policy_sha256, outcome, limit_fired, detail, client)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(e.at)
    .bind(&e.action)
    .bind(&e.tenant)
    .bind(&e.subject)
    .bind(&e.job_id)
    .bind(&e.module)
    .bind(&e.module_sha256)
    .bind(&e.policy_sha256)
    .bind(&e.outcome)
    .bind(&e.limit)
    .bind(&e.detail)
    .bind(&e.client)
    .execute(&mut *c)
    .await?;
    Ok(())
}

/// `running → succeeded | failed` with the report (JSON), if `claim` still
/// holds, and its `job.finished` audit entry (inside the caller's
/// transaction); false (and no entry) if the job no longer runs this
/// attempt.
async fn finish(
    c: &mut PgConnection,
    claim: &Claimed,
    finished: &JobFinished,
    now: i64,
    report: &str,
) -> Result<bool, StoreError> {
    let row = sqlx::query(
        "UPDATE jobs SET state = $1, finished_at = $2, report = $3, summary = $9
         WHERE id = $4 AND tenant = $5 AND state = 'running' AND attempts = $6
               AND started_at IS NOT DISTINCT FROM $7 AND claimed_by IS NOT DISTINCT FROM $8
         RETURNING id, tenant, subject, module, module_sha256, policy_sha256",
    )
    .bind(finished.state.as_str())
    .bind(now)
    .bind(report)
    .bind(&claim.id)
    .bind(&claim.tenant)
    .bind(stored_attempts(claim.attempt))
    .bind(claim.started_at)
    .bind(&claim.node)
    .bind(json(&finished.summary))
    .fetch_optional(&mut *c)
    .await?;
    let Some(r) = row else {
        return Ok(false);
    };
    let job = AuditedJob {
        id: r.try_get(0)?,
        tenant: r.try_get(1)?,
        subject: r.try_get(2)?,
        module: r.try_get(3)?,
        module_sha256: r.try_get(4)?,
        policy_sha256: r.try_get(5)?,
    };
    insert_audit(c, &AuditEntry::job_finished(&job, finished, now)).await?;
    Ok(true)
}

/// The state of the tenant's job `id`, if it exists, locking its row until
/// the transaction ends.
async fn lock_state(
    c: &mut PgConnection,
    tenant: &str,
    id: &str,
) -> Result<Option<JobState>, StoreError> {
    let state: Option<String> =
        sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1 AND tenant = $2 FOR UPDATE")
            .bind(id)
            .bind(tenant)
            .fetch_optional(&mut *c)
            .await?;
    state.as_deref().map(parse_state).transpose()
}

#[async_trait]
impl JobStore for PostgresStore {
    async fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tokens (id, hash, tenant, subject, scopes, created_at, expires_at, revoked)
             VALUES ($1, $2, $3, $4, $5::jsonb, $6, $7, $8)",
        )
        .bind(&t.id)
        .bind(&t.hash)
        .bind(&t.tenant)
        .bind(&t.subject)
        .bind(json(&t.scopes))
        .bind(t.created_at)
        .bind(t.expires_at)
        .bind(t.revoked)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            token_cols!(),
            " FROM tokens WHERE hash = $1"
        ))
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(token_row)
        .transpose()
    }

    async fn token_by_id(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            token_cols!(),
            " FROM tokens WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(token_row)
        .transpose()
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            token_cols!(),
            " FROM tokens ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(token_row)
        .collect()
    }

    async fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        Ok(
            sqlx::query("UPDATE tokens SET revoked = TRUE WHERE id = $1")
                .bind(id)
                .execute(&self.pool)
                .await?
                .rows_affected()
                == 1,
        )
    }

    async fn insert_queued_within(
        &self,
        j: &JobRecord,
        key: Option<&Idempotency>,
        bounds: &QueueBounds,
    ) -> Result<Result<Inserted, QueueFull>, StoreError> {
        let mut tx = self.pool.begin().await?;
        // One submission of a tenant at a time counts and inserts, on every
        // node: the tenant's bound is never passed.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, $2))")
            .bind(&j.tenant)
            .bind(QUEUE_LOCK_SEED)
            .execute(&mut *tx)
            .await?;
        let (mine, all): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*) FILTER (WHERE tenant = $1), COUNT(*) FROM jobs WHERE state = 'queued'",
        )
        .bind(&j.tenant)
        .fetch_one(&mut *tx)
        .await?;
        let count = |n: i64| n.max(0) as u64;
        if count(all) >= bounds.total {
            tx.rollback().await?;
            return Ok(Err(QueueFull::Service));
        }
        if count(mine) >= bounds.per_tenant {
            tx.rollback().await?;
            return Ok(Err(QueueFull::Tenant));
        }
        let inserted = insert_job_row(&mut tx, j, key, j.state, None, 0).await?;
        tx.commit().await?;
        Ok(Ok(inserted))
    }

    async fn insert_job(
        &self,
        j: &JobRecord,
        key: Option<&Idempotency>,
    ) -> Result<Inserted, StoreError> {
        if key.is_none() {
            // One statement: no transaction to begin and commit.
            let mut c = self.pool.acquire().await?;
            return insert_job_row(&mut c, j, None, j.state, None, 0).await;
        }
        let mut tx = self.pool.begin().await?;
        let inserted = insert_job_row(&mut tx, j, key, j.state, None, 0).await?;
        tx.commit().await?;
        Ok(inserted)
    }

    async fn job_by_key(
        &self,
        tenant: &str,
        key: &str,
        since: i64,
    ) -> Result<Option<(JobRecord, String)>, StoreError> {
        let mut c = self.pool.acquire().await?;
        by_key(&mut c, tenant, key, since).await
    }

    async fn get_job(&self, tenant: &str, id: &str) -> Result<Option<JobRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            job_cols!(),
            " FROM jobs WHERE id = $1 AND tenant = $2"
        ))
        .bind(id)
        .bind(tenant)
        .fetch_optional(&self.pool)
        .await?
        .as_ref()
        .map(job_row)
        .transpose()
    }

    async fn report_len(&self, tenant: &str, of: ReportOf<'_>) -> Result<Option<u64>, StoreError> {
        // `octet_length` of a stored (TOASTed) text reads its size, not
        // its value.
        let len: Option<Option<i64>> =
            match of {
                ReportOf::Id(id) => sqlx::query_scalar(
                    "SELECT octet_length(report)::BIGINT FROM jobs WHERE id = $1 AND tenant = $2",
                )
                .bind(id)
                .bind(tenant)
                .fetch_optional(&self.pool)
                .await?,
                ReportOf::Key(key, since) => {
                    sqlx::query_scalar(
                        "SELECT octet_length(jobs.report)::BIGINT
                       FROM idempotency k JOIN jobs ON jobs.id = k.job_id
                      WHERE k.tenant = $1 AND k.key = $2 AND k.created_at >= $3
                        AND jobs.tenant = $1",
                    )
                    .bind(tenant)
                    .bind(key)
                    .bind(since)
                    .fetch_optional(&self.pool)
                    .await?
                }
            };
        Ok(len.flatten().map(|n| n.max(0) as u64))
    }

    async fn list_jobs(&self, tenant: &str, limit: u32) -> Result<Vec<JobSummary>, StoreError> {
        sqlx::query(
            "SELECT id, module, state, created_at, started_at, finished_at, attempts, summary
             FROM jobs WHERE tenant = $1 ORDER BY created_at DESC LIMIT $2",
        )
        .bind(tenant)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(summary_row)
        .collect()
    }

    async fn claim(
        &self,
        tenant: &str,
        id: &str,
        now: i64,
        max_attempts: u32,
        lease: &Lease,
    ) -> Result<Claim, StoreError> {
        let max_attempts = stored_attempts(max_attempts.max(1));
        // The common case is one statement, outside any transaction.
        let claimed = sqlx::query(concat!(
            "UPDATE jobs SET state = 'running', started_at = $1, attempts = attempts + 1,
                             claimed_by = $5, lease_until = ",
            db_now!(),
            " + $6
             WHERE id = (SELECT id FROM jobs
                         WHERE id = $2 AND tenant = $3 AND state = 'queued' AND attempts < $4
                         FOR NO KEY UPDATE SKIP LOCKED)
             RETURNING ",
            job_cols!()
        ))
        .bind(now)
        .bind(id)
        .bind(tenant)
        .bind(max_attempts)
        .bind(&lease.node)
        .bind(lease.millis)
        .fetch_optional(&self.pool)
        .await?;
        if let Some(row) = claimed {
            let job = job_row(&row)?;
            let claim = Claimed::of(&job, Some(&lease.node));
            return Ok(Claim::Run(Box::new(job), claim));
        }
        // Still queued, but every attempt it was allowed began and none
        // finished (crashes, or host errors): finish it failed, through
        // `running` like any finished job, in one transaction.
        let mut tx = self.pool.begin().await?;
        let exhausted = sqlx::query(concat!(
            "UPDATE jobs SET state = 'running', claimed_by = $4
             WHERE id = (SELECT id FROM jobs
                         WHERE id = $1 AND tenant = $2 AND state = 'queued' AND attempts >= $3
                         FOR NO KEY UPDATE SKIP LOCKED)
             RETURNING ",
            job_cols!()
        ))
        .bind(id)
        .bind(tenant)
        .bind(max_attempts)
        .bind(&lease.node)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = exhausted else {
            tx.rollback().await?;
            return Ok(Claim::Gone);
        };
        Ok(Claim::GaveUp(Box::new(
            give_up(tx, &row, lease, now).await?,
        )))
    }

    async fn claim_next(
        &self,
        now: i64,
        max_attempts: u32,
        lease: &Lease,
        caps: &Caps,
    ) -> Result<Option<Claim>, StoreError> {
        let max_attempts = stored_attempts(max_attempts.max(1));
        let cap = |n: u32| i64::from(n);
        let mut tx = self.pool.begin().await?;
        // Every node's claim waits here for the one before it to commit,
        // so the running counts read below are the truth until this claim
        // commits: no two nodes take the last slot of a cap.
        sqlx::query("SELECT pg_advisory_xact_lock($1)")
            .bind(CLAIM_LOCK)
            .execute(&mut *tx)
            .await?;
        // Each tenant with queued jobs (a skip scan of the queued index),
        // under its cap, offers its oldest job of a served module under
        // that module's cap; the tenant with fewest running jobs wins, then
        // the oldest job. The cost grows with the tenants waiting, not with
        // the jobs queued (BENCHMARKS.md has the plan).
        let next: Option<(String, String)> = sqlx::query_as(
            "WITH RECURSIVE tenants (tenant) AS (
                     (SELECT tenant FROM jobs WHERE state = 'queued' ORDER BY tenant LIMIT 1)
                     UNION ALL
                     SELECT (SELECT q.tenant FROM jobs q
                             WHERE q.state = 'queued' AND q.tenant > t.tenant
                             ORDER BY q.tenant LIMIT 1)
                     FROM tenants t WHERE t.tenant IS NOT NULL),
                  running AS (SELECT tenant, module FROM jobs WHERE state = 'running'),
                  per_tenant AS (SELECT tenant, COUNT(*) AS n FROM running GROUP BY tenant),
                  per_module AS (SELECT module, COUNT(*) AS n FROM running GROUP BY module),
                  candidates AS (
                     SELECT c.id, COALESCE(pt.n, 0) AS n, c.created_at
                     FROM tenants t
                     LEFT JOIN per_tenant pt ON pt.tenant = t.tenant
                     CROSS JOIN LATERAL (
                         SELECT q.id, q.created_at FROM jobs q
                         WHERE q.state = 'queued' AND q.tenant = t.tenant AND q.module = ANY($1)
                               AND COALESCE((SELECT m.n FROM per_module m WHERE m.module = q.module), 0) < $3
                         ORDER BY q.created_at, q.id
                         LIMIT 1) c
                     WHERE t.tenant IS NOT NULL AND COALESCE(pt.n, 0) < $2)
             SELECT jobs.id, jobs.tenant FROM candidates c JOIN jobs ON jobs.id = c.id
             WHERE jobs.state = 'queued'
             ORDER BY c.n, c.created_at, c.id
             LIMIT 1
             FOR NO KEY UPDATE OF jobs SKIP LOCKED",
        )
        .bind(&caps.modules)
        .bind(cap(caps.per_tenant))
        .bind(cap(caps.per_module))
        .fetch_optional(&mut *tx)
        .await?;
        let Some((id, _tenant)) = next else {
            tx.rollback().await?;
            return Ok(None);
        };
        let claimed = sqlx::query(concat!(
            "UPDATE jobs SET state = 'running', started_at = $1, attempts = attempts + 1,
                             claimed_by = $4, lease_until = ",
            db_now!(),
            " + $5
             WHERE id = $2 AND state = 'queued' AND attempts < $3
             RETURNING ",
            job_cols!()
        ))
        .bind(now)
        .bind(&id)
        .bind(max_attempts)
        .bind(&lease.node)
        .bind(lease.millis)
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(row) = claimed {
            tx.commit().await?;
            let job = job_row(&row)?;
            let claim = Claimed::of(&job, Some(&lease.node));
            return Ok(Some(Claim::Run(Box::new(job), claim)));
        }
        // Started `max_attempts` times without finishing: failed instead.
        let row = sqlx::query(concat!(
            "UPDATE jobs SET state = 'running', claimed_by = $2 WHERE id = $1 RETURNING ",
            job_cols!()
        ))
        .bind(&id)
        .bind(&lease.node)
        .fetch_one(&mut *tx)
        .await?;
        Ok(Some(Claim::GaveUp(Box::new(
            give_up(tx, &row, lease, now).await?,
        ))))
    }

    async fn queued_counts(&self, tenant: &str) -> Result<(u64, u64), StoreError> {
        let (mine, all): (i64, i64) = sqlx::query_as(
            "SELECT COUNT(*) FILTER (WHERE tenant = $1), COUNT(*) FROM jobs WHERE state = 'queued'",
        )
        .bind(tenant)
        .fetch_one(&self.pool)
        .await?;
        Ok((mine.max(0) as u64, all.max(0) as u64))
    }

    fn shared(&self) -> bool {
        true
    }

    async fn events(
        &self,
    ) -> Result<Option<tokio::sync::mpsc::Receiver<super::JobEvent>>, StoreError> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(EVENTS).await?;
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        let target = self.target.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = listener.try_recv() => next,
                    () = tx.closed() => return,
                };
                match next {
                    Ok(Some(n)) => match serde_json::from_str(n.payload()) {
                        // A full channel drops the event: the listener's
                        // poll finds the job.
                        Ok(event) => {
                            if let Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) =
                                tx.try_send(event)
                            {
                                return;
                            }
                        }
                        Err(e) => tracing::warn!(error = %e, "undecodable job event"),
                    },
                    Ok(None) => {
                        tracing::warn!(database = %target, "job events: connection lost, listening again");
                    }
                    Err(e) => {
                        tracing::warn!(database = %target, error = %e, "job events: cannot listen; retrying");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
            }
        });
        Ok(Some(rx))
    }

    async fn requeue(&self, claim: &Claimed, count: bool) -> Result<bool, StoreError> {
        Ok(sqlx::query(
            "UPDATE jobs SET state = 'queued', attempts = GREATEST(attempts - $5, 0),
                             claimed_by = NULL, lease_until = NULL
             WHERE id = $1 AND tenant = $2 AND state = 'running' AND attempts = $3
                   AND started_at IS NOT DISTINCT FROM $4 AND claimed_by IS NOT DISTINCT FROM $6",
        )
        .bind(&claim.id)
        .bind(&claim.tenant)
        .bind(stored_attempts(claim.attempt))
        .bind(claim.started_at)
        .bind(i32::from(!count))
        .bind(&claim.node)
        .execute(&self.pool)
        .await?
        .rows_affected()
            == 1)
    }

    async fn finish_job(
        &self,
        claim: &Claimed,
        report: &crate::sandbox::JobReport,
        now: i64,
    ) -> Result<bool, StoreError> {
        let mut tx = self.pool.begin().await?;
        let done = finish(
            &mut tx,
            claim,
            &JobFinished::of(report),
            now,
            &report.encode(),
        )
        .await?;
        tx.commit().await?;
        Ok(done)
    }

    async fn insert_finished_job(
        &self,
        j: &JobRecord,
        report: &crate::sandbox::JobReport,
        now: i64,
        key: Option<&Idempotency>,
    ) -> Result<Inserted, StoreError> {
        let mut tx = self.pool.begin().await?;
        // Inserted `running`, then finished as a claimed job is, with the
        // same audit entry.
        let inserted =
            insert_job_row(&mut tx, j, key, JobState::Running, Some(j.created_at), 1).await?;
        if inserted == Inserted::New {
            let claim = Claimed {
                id: j.id.clone(),
                tenant: j.tenant.clone(),
                attempt: 1,
                started_at: Some(j.created_at),
                node: None,
            };
            finish(
                &mut tx,
                &claim,
                &JobFinished::of(report),
                now,
                &report.encode(),
            )
            .await?;
        }
        tx.commit().await?;
        Ok(inserted)
    }

    async fn cancel_job(
        &self,
        tenant: &str,
        id: &str,
        now: i64,
    ) -> Result<CancelOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let Some(state) = lock_state(&mut tx, tenant, id).await? else {
            tx.rollback().await?;
            return Ok(CancelOutcome::NotFound);
        };
        if state.is_final() {
            tx.rollback().await?;
            return Ok(CancelOutcome::AlreadyFinished(state));
        }
        sqlx::query(
            "UPDATE jobs SET state = 'cancelled', finished_at = $1 WHERE id = $2 AND tenant = $3",
        )
        .bind(now)
        .bind(id)
        .bind(tenant)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(CancelOutcome::Cancelled(state))
    }

    async fn delete_job(&self, tenant: &str, id: &str) -> Result<DeleteOutcome, StoreError> {
        let mut tx = self.pool.begin().await?;
        let Some(state) = lock_state(&mut tx, tenant, id).await? else {
            tx.rollback().await?;
            return Ok(DeleteOutcome::NotFound);
        };
        if !state.is_final() {
            tx.rollback().await?;
            return Ok(DeleteOutcome::NotFinished(state));
        }
        sqlx::query("DELETE FROM jobs WHERE id = $1 AND tenant = $2")
            .bind(id)
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(DeleteOutcome::Deleted)
    }

    async fn renew_leases(
        &self,
        lease: &Lease,
        claims: &[Claimed],
        _now: i64,
    ) -> Result<Vec<Claimed>, StoreError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<String> = claims.iter().map(|c| c.id.clone()).collect();
        let held = sqlx::query(concat!(
            "UPDATE jobs SET lease_until = ",
            db_now!(),
            " + $1
             WHERE id = ANY($2) AND state = 'running' AND claimed_by = $3
             RETURNING id, attempts, started_at"
        ))
        .bind(lease.millis)
        .bind(&ids)
        .bind(&lease.node)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| Ok((r.try_get("id")?, attempts(r)?, r.try_get("started_at")?)))
        .collect::<Result<Vec<_>, StoreError>>()?;
        Ok(super::lost_claims(claims, &held))
    }

    async fn expire_leases(&self, now: i64, max_attempts: u32) -> Result<Expired, StoreError> {
        let max_attempts = stored_attempts(max_attempts.max(1));
        let mut tx = self.pool.begin().await?;
        // A job another node is finishing or renewing right now is locked:
        // skipped, never waited for (its lease is being looked after).
        let requeued = sqlx::query(concat!(
            "UPDATE jobs SET state = 'queued', claimed_by = NULL, lease_until = NULL
             WHERE id IN (SELECT id FROM jobs
                          WHERE state = 'running' AND COALESCE(lease_until, 0) < ",
            db_now!(),
            "                   AND attempts < $1
                          FOR NO KEY UPDATE SKIP LOCKED)
             RETURNING id, tenant, module, created_at"
        ))
        .bind(max_attempts)
        .fetch_all(&mut *tx)
        .await?;
        let mut requeued = requeued
            .iter()
            .map(|r| {
                Ok((
                    r.try_get::<i64, _>("created_at")?,
                    PendingJob {
                        id: r.try_get("id")?,
                        tenant: r.try_get("tenant")?,
                        module: r.try_get("module")?,
                        state: JobState::Queued,
                        claim: None,
                    },
                ))
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        requeued.sort_by(|a, b| (a.0, &a.1.id).cmp(&(b.0, &b.1.id)));
        let exhausted = sqlx::query(concat!(
            "SELECT ",
            job_cols!(),
            ", jobs.claimed_by FROM jobs
             WHERE state = 'running' AND COALESCE(lease_until, 0) < ",
            db_now!(),
            "      AND attempts >= $1
             ORDER BY created_at, id
             FOR NO KEY UPDATE SKIP LOCKED"
        ))
        .bind(max_attempts)
        .fetch_all(&mut *tx)
        .await?;
        let mut failed = Vec::with_capacity(exhausted.len());
        for row in &exhausted {
            let mut job = job_row(row)?;
            let node: Option<String> = row.try_get("claimed_by")?;
            let report = super::lease_expired_report(&job);
            if finish(
                &mut tx,
                &Claimed::of(&job, node.as_deref()),
                &JobFinished::of(&report),
                now,
                &json(&report),
            )
            .await?
            {
                job.state = JobState::Failed;
                job.finished_at = Some(now);
                job.report = Some(report);
                failed.push(job);
            }
        }
        tx.commit().await?;
        Ok(Expired {
            requeued: requeued.into_iter().map(|(_, j)| j).collect(),
            failed,
        })
    }

    async fn requeue_running(&self) -> Result<u64, StoreError> {
        // Only jobs whose lease ran out: the others are live nodes' runs.
        Ok(sqlx::query(concat!(
            "UPDATE jobs SET state = 'queued', claimed_by = NULL, lease_until = NULL
             WHERE state = 'running' AND COALESCE(lease_until, 0) < ",
            db_now!()
        ))
        .execute(&self.pool)
        .await?
        .rows_affected())
    }

    async fn queued_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        sqlx::query(concat!(
            "SELECT ",
            job_cols!(),
            " FROM jobs WHERE state = 'queued' ORDER BY created_at, id"
        ))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(job_row)
        .collect()
    }

    async fn pending_jobs(&self) -> Result<Vec<PendingJob>, StoreError> {
        sqlx::query(
            "SELECT id, tenant, module, state, attempts, started_at, claimed_by FROM jobs
             WHERE state IN ('queued', 'running') ORDER BY created_at, id",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|r| {
            let state = parse_state(r.try_get("state")?)?;
            let (id, tenant): (String, String) = (r.try_get("id")?, r.try_get("tenant")?);
            let claim = if state == JobState::Running {
                Some(Claimed {
                    id: id.clone(),
                    tenant: tenant.clone(),
                    attempt: attempts(r)?,
                    started_at: r.try_get("started_at")?,
                    node: r.try_get("claimed_by")?,
                })
            } else {
                None
            };
            Ok(PendingJob {
                id,
                tenant,
                module: r.try_get("module")?,
                state,
                claim,
            })
        })
        .collect()
    }

    async fn job_exists(&self, id: &str) -> Result<bool, StoreError> {
        Ok(sqlx::query("SELECT 1 FROM jobs WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .is_some())
    }

    async fn expire_jobs(&self, before: i64) -> Result<Vec<String>, StoreError> {
        Ok(sqlx::query_scalar(
            "DELETE FROM jobs
             WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at < $1
             RETURNING id",
        )
        .bind(before)
        .fetch_all(&self.pool)
        .await?)
    }

    async fn probe(&self, now: i64) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO probe (id, at) VALUES (1, $1) ON CONFLICT (id) DO UPDATE SET at = EXCLUDED.at",
        )
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn append_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        let mut c = self.pool.acquire().await?;
        insert_audit(&mut c, e).await
    }

    async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        sqlx::query(
            "SELECT at, action, tenant, subject, job_id, module, module_sha256, policy_sha256,
                    outcome, limit_fired, detail, client
             FROM audit ORDER BY seq DESC LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(audit_row)
        .collect()
    }

    async fn expire_audit(&self, before: i64) -> Result<u64, StoreError> {
        // In batches, so a large first sweep never holds many rows' locks
        // in one long transaction.
        const BATCH: i64 = 5000;
        let mut total = 0;
        loop {
            let n = sqlx::query(
                "DELETE FROM audit WHERE seq IN
                     (SELECT seq FROM audit WHERE at < $1 ORDER BY at LIMIT $2)",
            )
            .bind(before)
            .bind(BATCH)
            .execute(&self.pool)
            .await?
            .rows_affected();
            total += n;
            if n < BATCH as u64 {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::job::{JobReport, LimitKind, OutputFile, ReportSummary};

    /// A database migrated as it was before job summaries (every migration
    /// but the last), holding jobs that finished then, gets their summaries
    /// from their reports when a store of this version opens it — a NUL in
    /// a report's captured text included, which PostgreSQL's JSON
    /// functions refuse.
    #[tokio::test]
    async fn a_database_from_before_summaries_lists_its_finished_jobs_in_a_few_words() {
        let Some(url) = crate::store::pg_server::fresh_database().await else {
            return;
        };
        let all = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations/postgres");
        let before = tempfile::tempdir().unwrap();
        let mut copied = 0;
        for entry in std::fs::read_dir(&all).unwrap() {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_str().unwrap().to_owned();
            if name.ends_with(".sql") && !name.starts_with("0007_") {
                std::fs::copy(&path, before.path().join(&name)).unwrap();
                copied += 1;
            }
        }
        assert_eq!(copied, 6, "the migrations before summaries");
        {
            let pool = PgPoolOptions::new()
                .max_connections(1)
                .connect(&url)
                .await
                .unwrap();
            sqlx::migrate::Migrator::new(before.path())
                .await
                .unwrap()
                .run(&pool)
                .await
                .unwrap();
            let has_summary: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM information_schema.columns
                                 WHERE table_name = 'jobs' AND column_name = 'summary')",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            assert!(!has_summary, "the old schema has no summary column");
            let insert = "INSERT INTO jobs (id, tenant, subject, token_id, module, module_sha256,
                                            params, inputs, has_stdin, state, created_at,
                                            started_at, finished_at, attempts, report)
                          VALUES ($1, 'acme', 's', 'tok', 'hello', 'd', '{}', '[]', FALSE, $2,
                                  $3, 2, 3, 1, $4)";
            for (id, state, at, report) in old_jobs() {
                sqlx::query(insert)
                    .bind(id)
                    .bind(state)
                    .bind(at)
                    .bind(report.as_ref().map(json))
                    .execute(&pool)
                    .await
                    .unwrap();
            }
            pool.close().await;
        }
        let store = PostgresStore::open(&url, 1).await.unwrap();
        let listed = store.list_jobs("acme", 10).await.unwrap();
        let got: Vec<(&str, Option<&ReportSummary>)> = listed
            .iter()
            .map(|j| (j.id.as_str(), j.report.as_ref()))
            .collect();
        let expected: Vec<(&str, Option<ReportSummary>)> = old_jobs()
            .into_iter()
            .rev()
            .map(|(id, _, _, report)| (id, report.map(|r| r.summary())))
            .collect();
        let expected: Vec<(&str, Option<&ReportSummary>)> =
            expected.iter().map(|(id, s)| (*id, s.as_ref())).collect();
        assert_eq!(got, expected);
        assert_eq!(listed[2].id, "old");
        assert_eq!(listed[2].report.as_ref().unwrap().outputs, 2);
        // The reports themselves are untouched, the NUL included.
        let nul = store.get_job("acme", "nul").await.unwrap().unwrap();
        assert_eq!(nul.report.unwrap().stdout.text, "a\0b");
    }

    /// Jobs as a database from before summaries holds them: a failed one
    /// with outputs, limit and exit code; one whose captured stdout holds a
    /// NUL; one still queued, with no report.
    fn old_jobs() -> Vec<(&'static str, &'static str, i64, Option<JobReport>)> {
        let mut failed = JobReport::not_run("old", "hello", "boom");
        failed.limit = Some(LimitKind::Memory);
        failed.exit_code = Some(3);
        failed.outputs = vec![
            OutputFile {
                name: "a".into(),
                size: 1,
                sha256: "0".repeat(64),
            };
            2
        ];
        let mut nul = JobReport::not_run("nul", "hello", "boom");
        nul.stdout.text = "a\0b".into();
        nul.exit_code = Some(0);
        vec![
            ("old", "failed", 1, Some(failed)),
            ("nul", "failed", 2, Some(nul)),
            ("new", "queued", 3, None),
        ]
    }
}
