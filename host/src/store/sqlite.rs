//! [`JobStore`] on one SQLite file, WAL mode.
//!
//! `synchronous = NORMAL` with WAL: a committed transaction survives a
//! process crash (`kill -9`); only an operating-system crash or power loss
//! can lose the last commits. Lists (scopes, inputs) and maps (params) are
//! stored as JSON text; the report as JSON.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};

use super::{AuditEntry, CancelOutcome, DeleteOutcome, JobRecord, JobState, JobStore, StoreError};
use crate::auth::TokenRecord;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS tokens (
    id          TEXT PRIMARY KEY,
    hash        TEXT NOT NULL UNIQUE,
    tenant      TEXT NOT NULL,
    subject     TEXT NOT NULL,
    scopes      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER,
    revoked     INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS jobs (
    id            TEXT PRIMARY KEY,
    tenant        TEXT NOT NULL,
    subject       TEXT NOT NULL,
    token_id      TEXT NOT NULL,
    module        TEXT NOT NULL,
    module_sha256 TEXT NOT NULL,
    policy_sha256 TEXT,
    params        TEXT NOT NULL,
    inputs        TEXT NOT NULL,
    has_stdin     INTEGER NOT NULL,
    state         TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    started_at    INTEGER,
    finished_at   INTEGER,
    attempts      INTEGER NOT NULL DEFAULT 0,
    report        TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, created_at);
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, created_at);
-- The job.finished audit entry is written by a trigger on the statement
-- that finishes the job: one round trip, and the two can never disagree.
CREATE TABLE IF NOT EXISTS audit (
    seq           INTEGER PRIMARY KEY AUTOINCREMENT,
    at            INTEGER NOT NULL,
    action        TEXT NOT NULL,
    tenant        TEXT,
    subject       TEXT,
    job_id        TEXT,
    module        TEXT,
    module_sha256 TEXT,
    policy_sha256 TEXT,
    outcome       TEXT,
    limit_fired   TEXT,
    detail        TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_job_finished
AFTER UPDATE OF state ON jobs
WHEN OLD.state = 'running' AND NEW.state IN ('succeeded', 'failed')
BEGIN
    INSERT INTO audit (at, action, tenant, subject, job_id, module, module_sha256,
                       policy_sha256, outcome, limit_fired, detail)
    VALUES (NEW.finished_at, 'job.finished', NEW.tenant, NEW.subject, NEW.id, NEW.module,
            NEW.module_sha256, NEW.policy_sha256, NEW.state,
            json_extract(NEW.report, '$.limit'),
            COALESCE(json_extract(NEW.report, '$.failure.message'), ''));
END;
"#;

/// The SQLite job store.
///
/// Writes go through a pool of exactly one connection, so concurrent
/// writers queue in the pool instead of colliding on SQLite's write lock
/// (whose busy handler sleeps); reads use their own pool, which WAL lets run
/// beside the writer.
#[derive(Clone, Debug)]
pub struct SqliteStore {
    writer: SqlitePool,
    reader: SqlitePool,
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and its schema.
    ///
    /// # Errors
    /// If the file cannot be opened or the schema applied.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str("sqlite://")?
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        // An embedded database's connections do not go stale: skip sqlx's
        // ping before each acquire, which costs a thread round trip per
        // statement.
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .connect_with(options.clone())
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&writer).await?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .test_before_acquire(false)
            .connect_with(options.read_only(true))
            .await?;
        Ok(Self { writer, reader })
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serializes")
}

fn parse_json<T: serde::de::DeserializeOwned>(s: &str, what: &str) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

fn token_row(row: &SqliteRow) -> Result<TokenRecord, StoreError> {
    Ok(TokenRecord {
        id: row.try_get("id")?,
        hash: row.try_get("hash")?,
        tenant: row.try_get("tenant")?,
        subject: row.try_get("subject")?,
        scopes: parse_json(&row.try_get::<String, _>("scopes")?, "scopes")?,
        created_at: row.try_get("created_at")?,
        expires_at: row.try_get("expires_at")?,
        revoked: row.try_get::<i64, _>("revoked")? != 0,
    })
}

fn job_row(row: &SqliteRow) -> Result<JobRecord, StoreError> {
    let state: String = row.try_get("state")?;
    let report: Option<String> = row.try_get("report")?;
    Ok(JobRecord {
        id: row.try_get("id")?,
        tenant: row.try_get("tenant")?,
        subject: row.try_get("subject")?,
        token_id: row.try_get("token_id")?,
        module: row.try_get("module")?,
        module_sha256: row.try_get("module_sha256")?,
        policy_sha256: row.try_get("policy_sha256")?,
        params: parse_json(&row.try_get::<String, _>("params")?, "params")?,
        inputs: parse_json(&row.try_get::<String, _>("inputs")?, "inputs")?,
        has_stdin: row.try_get::<i64, _>("has_stdin")? != 0,
        state: JobState::parse(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("state `{state}`")))?,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        report: report.map(|r| parse_json(&r, "report")).transpose()?,
    })
}

async fn insert_audit(conn: &mut sqlx::SqliteConnection, e: &AuditEntry) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO audit (at, action, tenant, subject, job_id, module, module_sha256,
                            policy_sha256, outcome, limit_fired, detail)
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
    .execute(&mut *conn)
    .await?;
    Ok(())
}

#[async_trait]
impl JobStore for SqliteStore {
    async fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO tokens (id, hash, tenant, subject, scopes, created_at, expires_at, revoked)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&t.id)
        .bind(&t.hash)
        .bind(&t.tenant)
        .bind(&t.subject)
        .bind(json(&t.scopes))
        .bind(t.created_at)
        .bind(t.expires_at)
        .bind(i64::from(t.revoked))
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM tokens WHERE hash = ?")
            .bind(hash)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(token_row).transpose()
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM tokens ORDER BY created_at, id")
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(token_row).collect()
    }

    async fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        let done = sqlx::query("UPDATE tokens SET revoked = 1 WHERE id = ?")
            .bind(id)
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn insert_job(&self, j: &JobRecord) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO jobs (id, tenant, subject, token_id, module, module_sha256, policy_sha256,
                               params, inputs, has_stdin, state, created_at, attempts)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)",
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
        .bind(i64::from(j.has_stdin))
        .bind(j.state.as_str())
        .bind(j.created_at)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    async fn get_job(&self, tenant: &str, id: &str) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query("SELECT * FROM jobs WHERE id = ? AND tenant = ?")
            .bind(id)
            .bind(tenant)
            .fetch_optional(&self.reader)
            .await?;
        row.as_ref().map(job_row).transpose()
    }

    async fn list_jobs(&self, tenant: &str, limit: u32) -> Result<Vec<JobRecord>, StoreError> {
        let rows =
            sqlx::query("SELECT * FROM jobs WHERE tenant = ? ORDER BY created_at DESC LIMIT ?")
                .bind(tenant)
                .bind(i64::from(limit))
                .fetch_all(&self.reader)
                .await?;
        rows.iter().map(job_row).collect()
    }

    async fn claim(&self, id: &str, now: i64) -> Result<Option<JobRecord>, StoreError> {
        let row = sqlx::query(
            "UPDATE jobs SET state = 'running', started_at = ?, attempts = attempts + 1
             WHERE id = ? AND state = 'queued' RETURNING *",
        )
        .bind(now)
        .bind(id)
        .fetch_optional(&self.writer)
        .await?;
        row.as_ref().map(job_row).transpose()
    }

    async fn finish_job(
        &self,
        id: &str,
        report: &crate::sandbox::JobReport,
        now: i64,
    ) -> Result<bool, StoreError> {
        let state = if report.succeeded() {
            JobState::Succeeded
        } else {
            JobState::Failed
        };
        let done = sqlx::query(
            "UPDATE jobs SET state = ?, finished_at = ?, report = ? WHERE id = ? AND state = 'running'",
        )
        .bind(state.as_str())
        .bind(now)
        .bind(json(report))
        .bind(id)
        .execute(&self.writer)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn cancel_job(
        &self,
        tenant: &str,
        id: &str,
        now: i64,
    ) -> Result<CancelOutcome, StoreError> {
        let mut tx = self.writer.begin().await?;
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM jobs WHERE id = ? AND tenant = ?")
                .bind(id)
                .bind(tenant)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(state) = state else {
            return Ok(CancelOutcome::NotFound);
        };
        let state = JobState::parse(&state).ok_or_else(|| StoreError::Corrupt(state.clone()))?;
        if state.is_final() {
            return Ok(CancelOutcome::AlreadyFinished(state));
        }
        sqlx::query("UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE id = ?")
            .bind(now)
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(CancelOutcome::Cancelled(state))
    }

    async fn delete_job(&self, tenant: &str, id: &str) -> Result<DeleteOutcome, StoreError> {
        let mut tx = self.writer.begin().await?;
        let state: Option<String> =
            sqlx::query_scalar("SELECT state FROM jobs WHERE id = ? AND tenant = ?")
                .bind(id)
                .bind(tenant)
                .fetch_optional(&mut *tx)
                .await?;
        let Some(state) = state else {
            return Ok(DeleteOutcome::NotFound);
        };
        let state = JobState::parse(&state).ok_or_else(|| StoreError::Corrupt(state.clone()))?;
        if !state.is_final() {
            return Ok(DeleteOutcome::NotFinished(state));
        }
        sqlx::query("DELETE FROM jobs WHERE id = ?")
            .bind(id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(DeleteOutcome::Deleted)
    }

    async fn requeue_running(&self) -> Result<u64, StoreError> {
        let done = sqlx::query("UPDATE jobs SET state = 'queued' WHERE state = 'running'")
            .execute(&self.writer)
            .await?;
        Ok(done.rows_affected())
    }

    async fn queued_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        let rows = sqlx::query("SELECT * FROM jobs WHERE state = 'queued' ORDER BY created_at, id")
            .fetch_all(&self.reader)
            .await?;
        rows.iter().map(job_row).collect()
    }

    async fn expire_jobs(&self, before: i64) -> Result<Vec<String>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar(
            "DELETE FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at < ?
             RETURNING id",
        )
        .bind(before)
        .fetch_all(&self.writer)
        .await?;
        Ok(ids)
    }

    async fn append_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        let mut conn = self.writer.acquire().await?;
        insert_audit(&mut conn, e).await
    }

    async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        let rows = sqlx::query("SELECT * FROM audit ORDER BY seq DESC LIMIT ?")
            .bind(i64::from(limit))
            .fetch_all(&self.reader)
            .await?;
        rows.iter()
            .map(|r| {
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
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::now_ms;

    fn job(id: &str, tenant: &str) -> JobRecord {
        JobRecord {
            id: id.into(),
            tenant: tenant.into(),
            subject: "s".into(),
            token_id: "tok".into(),
            module: "hello".into(),
            module_sha256: "d".into(),
            policy_sha256: None,
            params: [("width".to_owned(), "5".to_owned())].into(),
            inputs: vec!["a.png".into()],
            has_stdin: false,
            state: JobState::Queued,
            created_at: now_ms(),
            started_at: None,
            finished_at: None,
            attempts: 0,
            report: None,
        }
    }

    #[tokio::test]
    async fn jobs_are_bound_to_their_tenant_and_move_through_states() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db.sqlite"))
            .await
            .unwrap();
        store.insert_job(&job("j1", "acme")).await.unwrap();
        assert!(store.get_job("other", "j1").await.unwrap().is_none());
        let got = store.get_job("acme", "j1").await.unwrap().unwrap();
        assert_eq!(got.params["width"], "5");
        assert_eq!(
            store.delete_job("acme", "j1").await.unwrap(),
            DeleteOutcome::NotFinished(JobState::Queued)
        );
        assert_eq!(store.claim("j1", 1).await.unwrap().unwrap().attempts, 1);
        assert!(
            store.claim("j1", 1).await.unwrap().is_none(),
            "only from queued"
        );
        assert_eq!(store.requeue_running().await.unwrap(), 1);
        assert_eq!(store.queued_jobs().await.unwrap().len(), 1);
        assert_eq!(
            store.cancel_job("other", "j1", 2).await.unwrap(),
            CancelOutcome::NotFound
        );
        assert_eq!(
            store.cancel_job("acme", "j1", 2).await.unwrap(),
            CancelOutcome::Cancelled(JobState::Queued)
        );
        assert!(
            store.claim("j1", 3).await.unwrap().is_none(),
            "a cancelled job never runs"
        );
        assert_eq!(
            store.delete_job("other", "j1").await.unwrap(),
            DeleteOutcome::NotFound
        );
        assert_eq!(
            store.delete_job("acme", "j1").await.unwrap(),
            DeleteOutcome::Deleted
        );
    }

    #[tokio::test]
    async fn finishing_a_job_writes_its_audit_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("db.sqlite"))
            .await
            .unwrap();
        store.insert_job(&job("j1", "acme")).await.unwrap();
        store.claim("j1", 1).await.unwrap();
        let mut report = crate::sandbox::JobReport::not_run("j1", "hello", "boom");
        report.limit = Some(crate::sandbox::LimitKind::Memory);
        assert!(store.finish_job("j1", &report, 7).await.unwrap());
        let audit = store.audit(10).await.unwrap();
        assert_eq!(audit.len(), 1);
        let e = &audit[0];
        assert_eq!(
            (
                e.action.as_str(),
                e.tenant.as_deref(),
                e.job_id.as_deref(),
                e.outcome.as_deref()
            ),
            ("job.finished", Some("acme"), Some("j1"), Some("failed"))
        );
        assert_eq!(
            (e.limit.as_deref(), e.detail.as_str(), e.at),
            (Some("memory"), "boom", 7)
        );
        assert!(
            !store.finish_job("j1", &report, 8).await.unwrap(),
            "only once"
        );
        assert_eq!(store.audit(10).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn the_database_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        {
            let store = SqliteStore::open(&path).await.unwrap();
            store.insert_job(&job("j1", "acme")).await.unwrap();
        }
        let store = SqliteStore::open(&path).await.unwrap();
        assert!(store.get_job("acme", "j1").await.unwrap().is_some());
    }
}
