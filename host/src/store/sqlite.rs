//! [`JobStore`] on one SQLite file, WAL mode, through rusqlite.
//!
//! `synchronous = NORMAL` with WAL: a committed transaction survives a
//! process crash (`kill -9`); only an operating-system crash or power loss
//! can lose the last commits. Lists (scopes, inputs) and maps (params) are
//! stored as JSON text; the report as JSON.
//!
//! Statements run on the calling thread: with WAL and `NORMAL` a commit does
//! not fsync, so each statement is a few microseconds of CPU, and running it
//! in place avoids the two thread hand-offs per statement that a
//! connection-per-thread driver costs (measured in BENCHMARKS.md). Writes go
//! through one connection behind a mutex, so writers queue instead of
//! colliding on SQLite's write lock; reads use a small pool of read-only
//! connections, which WAL lets run beside the writer. The one slow operation,
//! the WAL checkpoint (it fsyncs), is taken off the request path: automatic
//! checkpoints are off and a dedicated thread checkpoints four times a second
//! (see [`checkpoint`]: it also restarts the log so it cannot grow unbounded).

use std::path::Path;
use std::sync::Mutex;
use std::sync::mpsc;
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};

use super::{
    AuditEntry, AuditedJob, CancelOutcome, Caps, Claim, Claimed, DeleteOutcome, Expired,
    Idempotency, Inserted, JobFinished, JobRecord, JobState, JobStore, JobSummary, Lease,
    PendingJob, ReportOf, StoreError,
};
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
    summary       TEXT,
    report        TEXT
);
-- Only unfinished jobs are ever looked up by state (recovery at start), so
-- the index holds just those: claiming a job (queued -> running) leaves it
-- untouched, and a finished job leaves it once.
DROP INDEX IF EXISTS jobs_by_state;
CREATE INDEX IF NOT EXISTS jobs_pending ON jobs (created_at) WHERE state IN ('queued', 'running');
CREATE INDEX IF NOT EXISTS jobs_by_tenant ON jobs (tenant, created_at);
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
-- One row, rewritten to learn whether the store can write again after a
-- storage failure (readiness).
CREATE TABLE IF NOT EXISTS probe (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    at INTEGER NOT NULL
);
"#;

/// Adds the `client` column (the caller's address) to an `audit` table
/// created before it existed, and the index the retention sweep deletes by.
fn add_audit_client_column(conn: &Connection) -> rusqlite::Result<()> {
    let has: bool = conn.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('audit') WHERE name = 'client'",
        [],
        |r| r.get(0),
    )?;
    if !has {
        conn.execute_batch("ALTER TABLE audit ADD COLUMN client TEXT")?;
    }
    conn.execute_batch("CREATE INDEX IF NOT EXISTS audit_by_time ON audit (at)")
}

/// Drops the trigger that used to write the `job.finished` audit row by
/// reading fields out of the stored report's JSON: the store now writes
/// that row itself, from the typed report ([`JobFinished`]), in the
/// finishing transaction. Left in place, the trigger would write a second
/// row for every finished job. Run at every open, so a database an older
/// build opened again (and gave its trigger back) is set right too.
fn drop_audit_trigger(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch("DROP TRIGGER IF EXISTS audit_job_finished")
}

/// Adds the idempotency columns to a `jobs` table created before them, and
/// their index: one live key per tenant. The key is stored on the job's own
/// row, so it is committed in the same transaction as the job.
fn add_idempotency_columns(conn: &Connection) -> rusqlite::Result<()> {
    let has_key = conn
        .prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = 'idempotency_key'")?
        .exists([])?;
    if !has_key {
        conn.execute_batch(
            "ALTER TABLE jobs ADD COLUMN idempotency_key TEXT;
             ALTER TABLE jobs ADD COLUMN request_sha256 TEXT;",
        )?;
    }
    conn.execute_batch(
        "CREATE UNIQUE INDEX IF NOT EXISTS jobs_by_idempotency_key
         ON jobs (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;",
    )
}

/// Adds the lease columns to a `jobs` table created before them: the node
/// that claimed a running job, and until when (Unix milliseconds, the
/// caller's clock: one node per file) its lease holds.
fn add_lease_columns(conn: &Connection) -> rusqlite::Result<()> {
    let has = conn
        .prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = 'claimed_by'")?
        .exists([])?;
    if !has {
        conn.execute_batch(
            "ALTER TABLE jobs ADD COLUMN claimed_by TEXT;
             ALTER TABLE jobs ADD COLUMN lease_until INTEGER;",
        )?;
    }
    Ok(())
}

/// Adds the `summary` column (the report in a few words, what a listing
/// reads: [`JobSummary`]) to a `jobs` table created before it, and fills
/// it in for the jobs that finished before. A new table has it before
/// `report`, so that a listing reads no page of a large report.
fn add_summary_column(conn: &Connection) -> rusqlite::Result<()> {
    let has = conn
        .prepare("SELECT 1 FROM pragma_table_info('jobs') WHERE name = 'summary'")?
        .exists([])?;
    if !has {
        conn.execute_batch(
            "BEGIN;
             ALTER TABLE jobs ADD COLUMN summary TEXT;
             UPDATE jobs SET summary = json_object(
                 'outcome', json_extract(report, '$.outcome'),
                 'exit_code', json_extract(report, '$.exit_code'),
                 'limit', json_extract(report, '$.limit'),
                 'failure', json_extract(report, '$.failure.kind'),
                 'outputs', COALESCE(json_array_length(report, '$.outputs'), 0))
             WHERE report IS NOT NULL AND json_valid(report);
             COMMIT;",
        )?;
    }
    Ok(())
}

/// A queued write: runs on the writer connection inside the batch's
/// transaction (or not at all, given `None`, when the transaction could not
/// begin or has ended) and returns what to do once the batch has committed
/// (or failed to, with the reason), and, if its failure made SQLite roll
/// the whole transaction back, why.
type WriteOp = Box<dyn FnOnce(Option<&Connection>) -> (Option<BatchFailure>, Completion) + Send>;

/// What a write does once its batch has committed or failed.
type Completion = Box<dyn FnOnce(Option<BatchFailure>) + Send>;

/// Why a batch's transaction could not begin or commit, for each write in it.
#[derive(Clone, Debug)]
struct BatchFailure {
    full: bool,
    message: String,
}

impl BatchFailure {
    fn of(e: &rusqlite::Error) -> Self {
        Self {
            full: e.sqlite_error_code() == Some(rusqlite::ErrorCode::DiskFull),
            message: e.to_string(),
        }
    }
}

impl From<&StoreError> for BatchFailure {
    fn from(e: &StoreError) -> Self {
        Self {
            full: e.is_full(),
            message: e.to_string(),
        }
    }
}

impl From<BatchFailure> for StoreError {
    fn from(f: BatchFailure) -> Self {
        StoreError::Write {
            full: f.full,
            message: f.message,
        }
    }
}

/// Read-only connections kept open between reads: past this many, those a
/// burst of reads leaves close.
const MAX_IDLE_READERS: usize = 8;

/// Read-only connections open at once, at most (a few descriptors each,
/// within what the listeners' budget leaves the process); a read past
/// them waits for one to come back.
const MAX_READERS: usize = 16;

/// The pool of read-only connections.
#[derive(Default)]
struct Readers {
    idle: Vec<Connection>,
    /// Idle and in use.
    open: usize,
}

/// The SQLite job store.
pub struct SqliteStore {
    writer: Mutex<Connection>,
    pending: Mutex<Vec<WriteOp>>,
    readers: Mutex<Readers>,
    /// Signalled when a reader comes back or closes.
    reader_back: std::sync::Condvar,
    path: std::path::PathBuf,
    /// The directory [`SqliteStore::open_in`] holds open, which `path`
    /// names through `/proc/self/fd`.
    _dir: Option<crate::sandbox::beneath::Root>,
    // Dropping the sender stops the checkpoint thread.
    _checkpointer: mpsc::Sender<()>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Opens a connection to the database at `path`, by exactly that name
/// ([`super::named_vfs`]: a `/proc/self/fd/N/…` name reaches the held
/// directory at every open, never its path), never through a link at the
/// database's own name.
fn connect(path: &Path, flags: OpenFlags) -> Result<Connection, StoreError> {
    let vfs = super::named_vfs::name().map_err(StoreError::Open)?;
    Ok(Connection::open_with_flags_and_vfs(
        path,
        flags | OpenFlags::SQLITE_OPEN_NOFOLLOW,
        vfs,
    )?)
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_handler(Some(busy_wait))?;
    conn.pragma_update(None, "foreign_keys", true)?;
    conn.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
    Ok(())
}

/// Waits out a lock another connection holds (`attempt` counts from 0):
/// every 100 µs for the first 10 ms, then every millisecond, giving up after
/// about 10 s. SQLite's own busy timeout sleeps in steps growing to 100 ms
/// (1, 2, 5, 10, 15, 20, 25, 25, 25, 50, 50, 100 ms…), so a writer meeting a
/// log restart that holds the lock for one millisecond could sleep for
/// twenty, and requests queued behind it with it.
fn busy_wait(attempt: i32) -> bool {
    const FINE: i32 = 100;
    const GIVE_UP: i32 = FINE + 10_000;
    let pause = match attempt {
        a if a < FINE => Duration::from_micros(100),
        a if a < GIVE_UP => Duration::from_millis(1),
        _ => return false,
    };
    std::thread::sleep(pause);
    true
}

/// How often the checkpoint thread runs: often enough that each restart
/// has little to copy and blocks writers only briefly.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);

/// WAL frames (about 4 KiB each) beyond which the checkpointer waits for
/// readers so the log restarts from its beginning.
const RESTART_FRAMES: i64 = 1024;

/// Bytes of WAL file kept after a restart; anything beyond is truncated.
const WAL_SIZE_LIMIT: i64 = 32 * 1024 * 1024;

/// Copies the WAL into the database without blocking anyone (`PASSIVE`);
/// when the log has grown past [`RESTART_FRAMES`], also waits for readers
/// to leave it (`RESTART`), so the next write starts the log over.
///
/// Without the second step, a steady stream of short reads always holds
/// some read mark inside the log: every frame gets checkpointed, yet the
/// log is never reset and grows by every write (gigabytes in a minute of
/// load), each append also paying for fresh file blocks.
///
/// Returns the log's size in frames before the checkpoint.
fn checkpoint(conn: &Connection) -> rusqlite::Result<i64> {
    let log: i64 = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get(1))?;
    if log > RESTART_FRAMES {
        conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |_| Ok(()))?;
    }
    Ok(log)
}

impl SqliteStore {
    /// [`SqliteStore::open`] on `bulkhead.sqlite` in `dir`, which is opened
    /// once and held: every file of the database is then opened in that
    /// directory (`/proc/self/fd/N/…`), whatever is put at its path
    /// meanwhile — so one swap of the path cannot give the database of one
    /// directory and the log of another.
    ///
    /// # Errors
    /// As [`SqliteStore::open`]; `dir` cannot be opened.
    pub async fn open_in(dir: &Path) -> Result<Self, StoreError> {
        let held = crate::sandbox::beneath::Root::open(dir)
            .map_err(|e| StoreError::Open(format!("{}: {e}", dir.display())))?;
        let mut store =
            Self::open(&crate::sandbox::beneath::fd_path(held.fd()).join("bulkhead.sqlite"))
                .await?;
        store._dir = Some(held);
        Ok(store)
    }

    /// Opens (creating if needed) the database at `path` and its schema, and
    /// starts the checkpoint thread.
    ///
    /// # Errors
    /// If the file cannot be opened or the schema applied.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let writer = connect(path, OpenFlags::default())?;
        configure(&writer)?;
        let mode: String = writer.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(StoreError::Open(format!(
                "cannot switch {} to WAL (got {mode})",
                path.display()
            )));
        }
        writer.pragma_update(None, "synchronous", "NORMAL")?;
        writer.pragma_update(None, "wal_autocheckpoint", 0)?;
        writer.execute_batch(SCHEMA)?;
        writer.execute_batch(super::keys::SQLITE_SCHEMA)?;
        add_audit_client_column(&writer)?;
        add_idempotency_columns(&writer)?;
        add_lease_columns(&writer)?;
        add_summary_column(&writer)?;
        drop_audit_trigger(&writer)?;

        let (stop, stopped) = mpsc::channel::<()>();
        let checkpoint_conn = connect(path, OpenFlags::default())?;
        configure(&checkpoint_conn)?;
        std::thread::Builder::new()
            .name("bulkhead-checkpoint".into())
            .spawn(move || {
                // Runs until the store (and with it the sender) is dropped.
                while let Err(mpsc::RecvTimeoutError::Timeout) =
                    stopped.recv_timeout(CHECKPOINT_EVERY)
                {
                    if let Err(e) = checkpoint(&checkpoint_conn) {
                        tracing::warn!(error = %e, "wal checkpoint failed");
                    }
                }
            })
            .map_err(|e| StoreError::Open(format!("cannot start the checkpoint thread: {e}")))?;
        Ok(Self {
            writer: Mutex::new(writer),
            pending: Mutex::new(Vec::new()),
            readers: Mutex::default(),
            reader_back: std::sync::Condvar::new(),
            path: path.to_owned(),
            _dir: None,
            _checkpointer: stop,
        })
    }

    /// Runs `f` on the writer connection, in a transaction shared with
    /// whatever other writes are queued at the time (group commit), and
    /// returns its result once that transaction has committed.
    ///
    /// Each caller queues its write, then takes the writer connection; the
    /// holder runs every queued write in one transaction, each under its own
    /// savepoint so one write's failure rolls back only that write. A caller
    /// whose write an earlier holder already ran finds the queue empty and
    /// just waits for its result. Under concurrent load each dirty page is
    /// written to the WAL once per batch rather than once per write.
    pub(super) async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (tx, rx) = tokio::sync::oneshot::channel::<Result<T, StoreError>>();
        let op: WriteOp = Box::new(move |conn: Option<&Connection>| {
            let mut ended = None;
            let result = match conn.map(|c| (c, c.execute_batch("SAVEPOINT write_op"))) {
                // The batch failed to begin: its failure is reported below.
                None => Ok(None),
                Some((_, Err(e))) => Err(StoreError::from(e)),
                Some((conn, Ok(()))) => {
                    let r = f(conn);
                    if conn.is_autocommit() {
                        // SQLite rolled the whole transaction back (a full
                        // disk, an I/O error): there is nothing to release,
                        // and the batch's other writes are gone too.
                        let failure = match &r {
                            Err(e) => BatchFailure::from(e),
                            Ok(_) => BatchFailure {
                                full: false,
                                message: "the transaction ended early".into(),
                            },
                        };
                        ended = Some(failure);
                        r.map(Some)
                    } else {
                        let end = if r.is_ok() {
                            "RELEASE write_op"
                        } else {
                            "ROLLBACK TO write_op; RELEASE write_op"
                        };
                        match conn.execute_batch(end) {
                            Ok(()) => r.map(Some),
                            Err(e) => Err(StoreError::from(e)),
                        }
                    }
                }
            };
            let done: Completion = Box::new(move |failure: Option<BatchFailure>| {
                // A write's own error says more than its batch's.
                let _ = tx.send(match (result, failure) {
                    (Err(e), _) => Err(e),
                    (Ok(_), Some(f)) => Err(f.into()),
                    (Ok(Some(value)), None) => Ok(value),
                    (Ok(None), None) => Err(StoreError::Write {
                        full: false,
                        message: "the write never ran".into(),
                    }),
                });
            });
            (ended, done)
        });
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(op);
        self.drain();
        rx.await.unwrap_or_else(|_| {
            Err(StoreError::Write {
                full: false,
                message: "the write was dropped before it ran".into(),
            })
        })
    }

    /// Runs queued writes until none is left, unless another thread holds
    /// the writer: then that thread runs them, and this one returns at once
    /// instead of blocking (its caller awaits its result asynchronously).
    /// A holder looks at the queue again after letting go of the writer, so
    /// a write queued while it was finishing is never left behind.
    fn drain(&self) {
        let pending = || {
            !self
                .pending
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_empty()
        };
        while pending() {
            let conn = match self.writer.try_lock() {
                Ok(conn) => conn,
                Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
                Err(std::sync::TryLockError::WouldBlock) => return,
            };
            loop {
                let batch =
                    std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
                if batch.is_empty() {
                    break;
                }
                run_batch(&conn, batch);
            }
        }
    }

    /// Runs `f` on a pooled read-only connection.
    pub(super) fn read<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let lock = || self.readers.lock().unwrap_or_else(|e| e.into_inner());
        let mut readers = lock();
        let pooled = loop {
            if let Some(c) = readers.idle.pop() {
                break Some(c);
            }
            if readers.open < MAX_READERS {
                readers.open += 1;
                break None;
            }
            // Every connection is reading: one is back in a moment.
            readers = self
                .reader_back
                .wait(readers)
                .unwrap_or_else(|e| e.into_inner());
        };
        drop(readers);
        let conn = match pooled {
            Some(c) => c,
            None => {
                let opened = connect(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )
                .and_then(|c| configure(&c).map(|()| c).map_err(StoreError::from));
                match opened {
                    Ok(c) => c,
                    Err(e) => {
                        lock().open -= 1;
                        self.reader_back.notify_one();
                        return Err(e);
                    }
                }
            }
        };
        let result = f(&conn);
        let mut readers = lock();
        if readers.idle.len() < MAX_IDLE_READERS {
            readers.idle.push(conn);
            drop(readers);
        } else {
            // A burst's extra connections close.
            readers.open -= 1;
            drop(readers);
            drop(conn);
        }
        self.reader_back.notify_one();
        result
    }
}

/// Runs `batch` in one transaction and reports the commit's outcome to each
/// write.
fn run_batch(conn: &Connection, batch: Vec<WriteOp>) {
    if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
        tracing::error!(error = %e, writes = batch.len(), "cannot begin a write transaction");
        let failure = BatchFailure::of(&e);
        for op in batch {
            op(None).1(Some(failure.clone()));
        }
        return;
    }
    let mut completions = Vec::with_capacity(batch.len());
    let mut ended = None;
    for op in batch {
        // Once SQLite has rolled the transaction back, the rest would run
        // outside any transaction: they are failed without running.
        let (end, done) = op(ended.is_none().then_some(conn));
        ended = ended.or(end);
        completions.push(done);
    }
    let failure = match ended {
        Some(failure) => {
            tracing::error!(error = %failure.message, writes = completions.len(), "a write transaction was rolled back");
            Some(failure)
        }
        None => conn.execute_batch("COMMIT").err().map(|e| {
            tracing::error!(error = %e, writes = completions.len(), "cannot commit a write transaction");
            let _ = conn.execute_batch("ROLLBACK");
            BatchFailure::of(&e)
        }),
    };
    for done in completions {
        done(failure.clone());
    }
}

fn json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("plain data serializes")
}

/// A stored value that does not decode, as rusqlite's conversion error.
fn undecodable(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> rusqlite::Error {
    rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
}

/// A JSON text column decoded into `T`.
fn json_col<T: serde::de::DeserializeOwned>(row: &Row<'_>, col: &str) -> rusqlite::Result<T> {
    let text: String = row.get(col)?;
    serde_json::from_str(&text).map_err(undecodable)
}

fn token_row(row: &Row<'_>) -> rusqlite::Result<TokenRecord> {
    Ok(TokenRecord {
        id: row.get("id")?,
        hash: row.get("hash")?,
        tenant: row.get("tenant")?,
        subject: row.get("subject")?,
        scopes: json_col(row, "scopes")?,
        created_at: row.get("created_at")?,
        expires_at: row.get("expires_at")?,
        revoked: row.get::<_, i64>("revoked")? != 0,
    })
}

/// The state of the tenant's job `id`, if it exists.
fn state_in(conn: &Connection, tenant: &str, id: &str) -> Result<Option<JobState>, StoreError> {
    let state: Option<String> = conn
        .prepare_cached("SELECT state FROM jobs WHERE id = ?1 AND tenant = ?2")?
        .query_row([id, tenant], |r| r.get(0))
        .optional()?;
    state
        .map(|text| {
            JobState::parse(&text).ok_or_else(|| StoreError::Corrupt(format!("state `{text}`")))
        })
        .transpose()
}

fn job_row(row: &Row<'_>) -> rusqlite::Result<JobRecord> {
    let state: String = row.get("state")?;
    // Decoded from SQLite's own buffer: a report can be tens of MB, and a
    // copy of it would be held beside the decoded one.
    let report = row
        .get_ref("report")?
        .as_str_or_null()
        .map_err(undecodable)?
        .map(crate::sandbox::JobReport::decode)
        .transpose()
        .map_err(undecodable)?;
    Ok(JobRecord {
        id: row.get("id")?,
        tenant: row.get("tenant")?,
        subject: row.get("subject")?,
        token_id: row.get("token_id")?,
        module: row.get("module")?,
        module_sha256: row.get("module_sha256")?,
        policy_sha256: row.get("policy_sha256")?,
        params: json_col(row, "params")?,
        inputs: json_col(row, "inputs")?,
        has_stdin: row.get::<_, i64>("has_stdin")? != 0,
        state: JobState::parse(&state).ok_or_else(|| undecodable(format!("state `{state}`")))?,
        created_at: row.get("created_at")?,
        started_at: row.get("started_at")?,
        finished_at: row.get("finished_at")?,
        attempts: row.get::<_, i64>("attempts")? as u32,
        report,
    })
}

fn summary_row(row: &Row<'_>) -> rusqlite::Result<JobSummary> {
    let state: String = row.get("state")?;
    let summary: Option<String> = row.get("summary")?;
    Ok(JobSummary {
        id: row.get("id")?,
        module: row.get("module")?,
        state: JobState::parse(&state).ok_or_else(|| undecodable(format!("state `{state}`")))?,
        created_at: row.get("created_at")?,
        started_at: row.get("started_at")?,
        finished_at: row.get("finished_at")?,
        attempts: row.get::<_, i64>("attempts")? as u32,
        report: summary
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(undecodable)?,
    })
}

fn audit_row(r: &Row<'_>) -> rusqlite::Result<AuditEntry> {
    Ok(AuditEntry {
        at: r.get("at")?,
        action: r.get("action")?,
        tenant: r.get("tenant")?,
        subject: r.get("subject")?,
        job_id: r.get("job_id")?,
        module: r.get("module")?,
        module_sha256: r.get("module_sha256")?,
        policy_sha256: r.get("policy_sha256")?,
        outcome: r.get("outcome")?,
        limit: r.get("limit_fired")?,
        detail: r.get("detail")?,
        client: r.get("client")?,
    })
}

/// A new job's columns, owned so the write can run on the writer's thread.
struct JobRow {
    id: String,
    tenant: String,
    subject: String,
    token_id: String,
    module: String,
    module_sha256: String,
    policy_sha256: Option<String>,
    params: String,
    inputs: String,
    has_stdin: bool,
    created_at: i64,
    key: Option<Idempotency>,
}

impl JobRow {
    fn of(j: &JobRecord, key: Option<&Idempotency>) -> Self {
        Self {
            id: j.id.clone(),
            tenant: j.tenant.clone(),
            subject: j.subject.clone(),
            token_id: j.token_id.clone(),
            module: j.module.clone(),
            module_sha256: j.module_sha256.clone(),
            policy_sha256: j.policy_sha256.clone(),
            params: json(&j.params),
            inputs: json(&j.inputs),
            has_stdin: j.has_stdin,
            created_at: j.created_at,
            key: key.cloned(),
        }
    }

    fn insert(
        &self,
        c: &Connection,
        state: JobState,
        started_at: Option<i64>,
        attempts: u32,
    ) -> Result<Inserted, StoreError> {
        if let Some(k) = &self.key {
            // A use of the key older than its retention is forgotten.
            c.prepare_cached(
                "UPDATE jobs SET idempotency_key = NULL
                 WHERE tenant = ?1 AND idempotency_key = ?2 AND created_at < ?3",
            )?
            .execute(params![self.tenant, k.key, k.since])?;
            if let Some((job, hash)) = by_key(c, &self.tenant, &k.key, k.since)? {
                return Ok(Inserted::Existing(Box::new(job), hash));
            }
        }
        let (key, hash) = match &self.key {
            Some(k) => (Some(&k.key), Some(&k.request_sha256)),
            None => (None, None),
        };
        c.prepare_cached(
            "INSERT INTO jobs (id, tenant, subject, token_id, module, module_sha256, policy_sha256,
                               params, inputs, has_stdin, state, created_at, started_at, attempts,
                               idempotency_key, request_sha256)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        )?
        .execute(params![
            self.id,
            self.tenant,
            self.subject,
            self.token_id,
            self.module,
            self.module_sha256,
            self.policy_sha256,
            self.params,
            self.inputs,
            i64::from(self.has_stdin),
            state.as_str(),
            self.created_at,
            started_at,
            attempts,
            key,
            hash,
        ])?;
        Ok(Inserted::New)
    }
}

/// The tenant's job holding idempotency key `key` since `since`, with its
/// request's hash.
fn by_key(
    c: &Connection,
    tenant: &str,
    key: &str,
    since: i64,
) -> rusqlite::Result<Option<(JobRecord, String)>> {
    c.prepare_cached(
        "SELECT * FROM jobs WHERE tenant = ?1 AND idempotency_key = ?2 AND created_at >= ?3",
    )?
    .query_row(params![tenant, key, since], |r| {
        Ok((
            job_row(r)?,
            r.get::<_, Option<String>>("request_sha256")?
                .unwrap_or_default(),
        ))
    })
    .optional()
}

/// Appends `e` to the audit log.
fn insert_audit(c: &Connection, e: &AuditEntry) -> rusqlite::Result<()> {
    c.prepare_cached(
        "INSERT INTO audit (at, action, tenant, subject, job_id, module, module_sha256,
                            policy_sha256, outcome, limit_fired, detail, client)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        e.at,
        e.action,
        e.tenant,
        e.subject,
        e.job_id,
        e.module,
        e.module_sha256,
        e.policy_sha256,
        e.outcome,
        e.limit,
        e.detail,
        e.client
    ])?;
    Ok(())
}

/// `running → succeeded | failed` with the report (JSON), if `claim` still
/// holds, and its `job.finished` audit entry, written here from `finished`
/// and the job's row; false (and no entry) if the job is no longer running
/// this attempt.
fn finish(
    c: &Connection,
    claim: &Claimed,
    finished: &JobFinished,
    now: i64,
    report: &str,
) -> rusqlite::Result<bool> {
    let job = c
        .prepare_cached(
            "UPDATE jobs SET state = ?1, finished_at = ?2, report = ?3, summary = ?9
             WHERE id = ?4 AND tenant = ?5 AND state = 'running' AND attempts = ?6
                   AND started_at IS ?7 AND claimed_by IS ?8
             RETURNING id, tenant, subject, module, module_sha256, policy_sha256",
        )?
        .query_row(
            params![
                finished.state.as_str(),
                now,
                report,
                claim.id,
                claim.tenant,
                claim.attempt,
                claim.started_at,
                claim.node,
                json(&finished.summary)
            ],
            |r| {
                Ok(AuditedJob {
                    id: r.get(0)?,
                    tenant: r.get(1)?,
                    subject: r.get(2)?,
                    module: r.get(3)?,
                    module_sha256: r.get(4)?,
                    policy_sha256: r.get(5)?,
                })
            },
        )
        .optional()?;
    let Some(job) = job else {
        return Ok(false);
    };
    insert_audit(c, &AuditEntry::job_finished(&job, finished, now))?;
    Ok(true)
}

/// The tenant's job `id`, `queued → running` for `lease`'s node (see
/// [`JobStore::claim`]), on the writer connection.
fn claim_in(
    c: &Connection,
    tenant: &str,
    id: &str,
    now: i64,
    max_attempts: u32,
    lease: &Lease,
) -> Result<Claim, StoreError> {
    let claimed = c
        .prepare_cached(
            "UPDATE jobs SET state = 'running', started_at = ?1, attempts = attempts + 1,
                                     claimed_by = ?5, lease_until = ?1 + ?6
                     WHERE id = ?2 AND tenant = ?3 AND state = 'queued' AND attempts < ?4
                     RETURNING *",
        )?
        .query_row(
            params![now, id, tenant, max_attempts, lease.node, lease.millis],
            job_row,
        )
        .optional()?;
    if let Some(job) = claimed {
        let claim = Claimed::of(&job, Some(&lease.node));
        return Ok(Claim::Run(Box::new(job), claim));
    }
    // Still queued, but every attempt it was allowed began and none
    // finished (crashes, or host errors): finish it failed, through
    // `running` like any finished job.
    let exhausted = c
        .prepare_cached(
            "UPDATE jobs SET state = 'running', claimed_by = ?3
                     WHERE id = ?1 AND tenant = ?2 AND state = 'queued' RETURNING *",
        )?
        .query_row(params![id, tenant, lease.node], job_row)
        .optional()?;
    let Some(mut job) = exhausted else {
        return Ok(Claim::Gone);
    };
    let report = crate::sandbox::JobReport::not_run(
        &job.id,
        &job.module,
        format!(
            "the host could not finish the job in {} attempts",
            job.attempts
        ),
    );
    finish(
        c,
        &Claimed::of(&job, Some(&lease.node)),
        &JobFinished::of(&report),
        now,
        &json(&report),
    )?;
    job.state = JobState::Failed;
    job.finished_at = Some(now);
    job.report = Some(report);
    Ok(Claim::GaveUp(Box::new(job)))
}

#[async_trait]
impl JobStore for SqliteStore {
    async fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        let t = t.clone();
        self.write(move |c| {
            c.prepare_cached(
                "INSERT INTO tokens (id, hash, tenant, subject, scopes, created_at, expires_at, revoked)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?
            .execute(params![
                t.id,
                t.hash,
                t.tenant,
                t.subject,
                json(&t.scopes),
                t.created_at,
                t.expires_at,
                i64::from(t.revoked)
            ])?;
            Ok(())
        })
        .await
    }

    async fn token_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached("SELECT * FROM tokens WHERE hash = ?1")?
                .query_row([hash], token_row)
                .optional()?)
        })
    }

    async fn token_by_id(&self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached("SELECT * FROM tokens WHERE id = ?1")?
                .query_row([id], token_row)
                .optional()?)
        })
    }

    async fn list_tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached("SELECT * FROM tokens ORDER BY created_at, id")?;
            let rows = stmt.query_map([], token_row)?.collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    async fn revoke_token(&self, id: &str) -> Result<bool, StoreError> {
        let id = id.to_owned();
        self.write(move |c| {
            Ok(
                c.prepare_cached("UPDATE tokens SET revoked = 1 WHERE id = ?1")?
                    .execute([id])?
                    == 1,
            )
        })
        .await
    }

    async fn insert_job(
        &self,
        j: &JobRecord,
        key: Option<&Idempotency>,
    ) -> Result<Inserted, StoreError> {
        let row = JobRow::of(j, key);
        let state = j.state;
        self.write(move |c| row.insert(c, state, None, 0)).await
    }

    async fn job_by_key(
        &self,
        tenant: &str,
        key: &str,
        since: i64,
    ) -> Result<Option<(JobRecord, String)>, StoreError> {
        crate::blocking(|| self.read(|c| Ok(by_key(c, tenant, key, since)?)))
    }

    async fn get_job(&self, tenant: &str, id: &str) -> Result<Option<JobRecord>, StoreError> {
        // A row with a report of megabytes: read off the async thread's turn.
        crate::blocking(|| {
            self.read(|c| {
                Ok(
                    c.prepare_cached("SELECT * FROM jobs WHERE id = ?1 AND tenant = ?2")?
                        .query_row([id, tenant], job_row)
                        .optional()?,
                )
            })
        })
    }

    async fn report_len(&self, tenant: &str, of: ReportOf<'_>) -> Result<Option<u64>, StoreError> {
        // `octet_length` of a column is read from the row's header: the
        // report's pages are not.
        let len: Option<Option<i64>> = self.read(|c| {
            Ok(match of {
                ReportOf::Id(id) => c
                    .prepare_cached(
                        "SELECT octet_length(report) FROM jobs WHERE id = ?1 AND tenant = ?2",
                    )?
                    .query_row(params![id, tenant], |r| r.get(0))
                    .optional()?,
                ReportOf::Key(key, since) => c
                    .prepare_cached(
                        "SELECT octet_length(report) FROM jobs
                          WHERE tenant = ?1 AND idempotency_key = ?2 AND created_at >= ?3",
                    )?
                    .query_row(params![tenant, key, since], |r| r.get(0))
                    .optional()?,
            })
        })?;
        Ok(len.flatten().map(|n| n.max(0) as u64))
    }

    async fn list_jobs(&self, tenant: &str, limit: u32) -> Result<Vec<JobSummary>, StoreError> {
        // Many rows: read off the async thread's turn.
        crate::blocking(|| {
            self.read(|c| {
                let mut stmt = c.prepare_cached(
                    "SELECT id, module, state, created_at, started_at, finished_at, attempts,
                            summary
                     FROM jobs WHERE tenant = ?1 ORDER BY created_at DESC LIMIT ?2",
                )?;
                let rows = stmt
                    .query_map(params![tenant, i64::from(limit)], summary_row)?
                    .collect::<Result<_, _>>()?;
                Ok(rows)
            })
        })
    }

    async fn claim(
        &self,
        tenant: &str,
        id: &str,
        now: i64,
        max_attempts: u32,
        lease: &Lease,
    ) -> Result<Claim, StoreError> {
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        let max_attempts = max_attempts.max(1);
        let lease = lease.clone();
        self.write(move |c| claim_in(c, &tenant, &id, now, max_attempts, &lease))
            .await
    }

    async fn claim_next(
        &self,
        now: i64,
        max_attempts: u32,
        lease: &Lease,
        caps: &Caps,
    ) -> Result<Option<Claim>, StoreError> {
        let (lease, caps) = (lease.clone(), caps.clone());
        let max_attempts = max_attempts.max(1);
        let modules = json(&caps.modules);
        self.write(move |c| {
            // The single writer serializes claims: the counts read here
            // hold until the claim below commits.
            let next: Option<(String, String)> = c
                .prepare_cached(
                    "WITH running AS (SELECT tenant, module FROM jobs
                                      WHERE state IN ('queued', 'running') AND state = 'running'),
                          per_tenant AS (SELECT tenant, COUNT(*) AS n FROM running GROUP BY tenant),
                          per_module AS (SELECT module, COUNT(*) AS n FROM running GROUP BY module)
                     SELECT jobs.id, jobs.tenant FROM jobs
                     LEFT JOIN per_tenant t ON t.tenant = jobs.tenant
                     LEFT JOIN per_module m ON m.module = jobs.module
                     WHERE jobs.state IN ('queued', 'running') AND jobs.state = 'queued'
                           AND jobs.module IN (SELECT value FROM json_each(?1))
                           AND COALESCE(t.n, 0) < ?2 AND COALESCE(m.n, 0) < ?3
                     ORDER BY COALESCE(t.n, 0), jobs.created_at, jobs.id
                     LIMIT 1",
                )?
                .query_row(params![modules, caps.per_tenant, caps.per_module], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?;
            let Some((id, tenant)) = next else {
                return Ok(None);
            };
            claim_in(c, &tenant, &id, now, max_attempts, &lease).map(Some)
        })
        .await
    }

    async fn queued_counts(&self, tenant: &str) -> Result<(u64, u64), StoreError> {
        let tenant = tenant.to_owned();
        self.read(move |c| {
            Ok(c.prepare_cached(
                "SELECT COALESCE(SUM(tenant = ?1), 0), COUNT(*) FROM jobs
                 WHERE state IN ('queued', 'running') AND state = 'queued'",
            )?
            .query_row([tenant], |r| {
                Ok((r.get::<_, i64>(0)? as u64, r.get::<_, i64>(1)? as u64))
            })?)
        })
    }

    async fn requeue(&self, claim: &Claimed, count: bool) -> Result<bool, StoreError> {
        let claim = claim.clone();
        let give_back = i64::from(!count);
        self.write(move |c| {
            Ok(c.prepare_cached(
                "UPDATE jobs SET state = 'queued', attempts = MAX(attempts - ?5, 0),
                                 claimed_by = NULL, lease_until = NULL
                 WHERE id = ?1 AND tenant = ?2 AND state = 'running' AND attempts = ?3
                       AND started_at IS ?4 AND claimed_by IS ?6",
            )?
            .execute(params![
                claim.id,
                claim.tenant,
                claim.attempt,
                claim.started_at,
                give_back,
                claim.node
            ])? == 1)
        })
        .await
    }

    async fn finish_job(
        &self,
        claim: &Claimed,
        report: &crate::sandbox::JobReport,
        now: i64,
    ) -> Result<bool, StoreError> {
        let (finished, report) = (JobFinished::of(report), report.encode());
        let claim = claim.clone();
        self.write(move |c| Ok(finish(c, &claim, &finished, now, &report)?))
            .await
    }

    async fn insert_finished_job(
        &self,
        j: &JobRecord,
        report: &crate::sandbox::JobReport,
        now: i64,
        key: Option<&Idempotency>,
    ) -> Result<Inserted, StoreError> {
        let row = JobRow::of(j, key);
        let (finished, report) = (JobFinished::of(report), report.encode());
        self.write(move |c| {
            // Inserted `running`, then finished as a claimed job is, with
            // the same audit entry.
            let inserted = row.insert(c, JobState::Running, Some(row.created_at), 1)?;
            if inserted == Inserted::New {
                let claim = Claimed {
                    id: row.id.clone(),
                    tenant: row.tenant.clone(),
                    attempt: 1,
                    started_at: Some(row.created_at),
                    node: None,
                };
                finish(c, &claim, &finished, now, &report)?;
            }
            Ok(inserted)
        })
        .await
    }

    async fn cancel_job(
        &self,
        tenant: &str,
        id: &str,
        now: i64,
    ) -> Result<CancelOutcome, StoreError> {
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        // Atomic through the write's savepoint.
        self.write(move |c| {
            let Some(state) = state_in(c, &tenant, &id)? else {
                return Ok(CancelOutcome::NotFound);
            };
            if state.is_final() {
                return Ok(CancelOutcome::AlreadyFinished(state));
            }
            c.prepare_cached(
                "UPDATE jobs SET state = 'cancelled', finished_at = ?1 WHERE id = ?2 AND tenant = ?3",
            )?
            .execute(params![now, id, tenant])?;
            Ok(CancelOutcome::Cancelled(state))
        })
        .await
    }

    async fn delete_job(&self, tenant: &str, id: &str) -> Result<DeleteOutcome, StoreError> {
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        self.write(move |c| {
            let Some(state) = state_in(c, &tenant, &id)? else {
                return Ok(DeleteOutcome::NotFound);
            };
            if !state.is_final() {
                return Ok(DeleteOutcome::NotFinished(state));
            }
            c.prepare_cached("DELETE FROM jobs WHERE id = ?1 AND tenant = ?2")?
                .execute([id, tenant])?;
            Ok(DeleteOutcome::Deleted)
        })
        .await
    }

    async fn renew_leases(
        &self,
        lease: &Lease,
        claims: &[Claimed],
        now: i64,
    ) -> Result<Vec<Claimed>, StoreError> {
        if claims.is_empty() {
            return Ok(Vec::new());
        }
        let ids = json(&claims.iter().map(Claimed::id).collect::<Vec<_>>());
        let lease = lease.clone();
        let held: Vec<(String, u32, Option<i64>)> = self
            .write(move |c| {
                let mut stmt = c.prepare_cached(
                    "UPDATE jobs SET lease_until = ?1 + ?2
                     WHERE id IN (SELECT value FROM json_each(?3))
                           AND state = 'running' AND claimed_by = ?4
                     RETURNING id, attempts, started_at",
                )?;
                let rows = stmt
                    .query_map(params![now, lease.millis, ids, lease.node], |r| {
                        Ok((r.get(0)?, r.get::<_, i64>(1)? as u32, r.get(2)?))
                    })?
                    .collect::<Result<_, _>>()?;
                Ok(rows)
            })
            .await?;
        Ok(super::lost_claims(claims, &held))
    }

    async fn expire_leases(&self, now: i64, max_attempts: u32) -> Result<Expired, StoreError> {
        let max_attempts = max_attempts.max(1);
        self.write(move |c| {
            // The IN term lets SQLite use the partial index.
            let mut requeued = c
                .prepare_cached(
                    "UPDATE jobs SET state = 'queued', claimed_by = NULL, lease_until = NULL
                     WHERE state IN ('queued', 'running') AND state = 'running'
                           AND COALESCE(lease_until, 0) < ?1 AND attempts < ?2
                     RETURNING id, tenant, module, created_at",
                )?
                .query_map(params![now, max_attempts], |r| {
                    Ok((
                        r.get::<_, i64>(3)?,
                        PendingJob {
                            id: r.get(0)?,
                            tenant: r.get(1)?,
                            module: r.get(2)?,
                            state: JobState::Queued,
                            claim: None,
                        },
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            requeued.sort_by(|a, b| (a.0, &a.1.id).cmp(&(b.0, &b.1.id)));
            // What is still running with its lease run out was started
            // `max_attempts` times.
            let exhausted = c
                .prepare_cached(
                    "SELECT * FROM jobs
                     WHERE state IN ('queued', 'running') AND state = 'running'
                           AND COALESCE(lease_until, 0) < ?1
                     ORDER BY created_at, id",
                )?
                .query_map([now], |r| {
                    Ok((job_row(r)?, r.get::<_, Option<String>>("claimed_by")?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            let mut failed = Vec::with_capacity(exhausted.len());
            for (mut job, node) in exhausted {
                let report = super::lease_expired_report(&job);
                if finish(
                    c,
                    &Claimed::of(&job, node.as_deref()),
                    &JobFinished::of(&report),
                    now,
                    &json(&report),
                )? {
                    job.state = JobState::Failed;
                    job.finished_at = Some(now);
                    job.report = Some(report);
                    failed.push(job);
                }
            }
            Ok(Expired {
                requeued: requeued.into_iter().map(|(_, j)| j).collect(),
                failed,
            })
        })
        .await
    }

    async fn requeue_running(&self) -> Result<u64, StoreError> {
        self.write(|c| {
            // The IN term lets SQLite use the partial index.
            Ok(c.execute(
                "UPDATE jobs SET state = 'queued', claimed_by = NULL, lease_until = NULL
                 WHERE state IN ('queued', 'running') AND state = 'running'",
                [],
            )? as u64)
        })
        .await
    }

    async fn queued_jobs(&self) -> Result<Vec<JobRecord>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT * FROM jobs WHERE state IN ('queued', 'running') AND state = 'queued' ORDER BY created_at, id",
            )?;
            let rows = stmt.query_map([], job_row)?.collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    async fn pending_jobs(&self) -> Result<Vec<PendingJob>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, tenant, module, state, attempts, started_at, claimed_by FROM jobs
                 WHERE state IN ('queued', 'running') ORDER BY created_at, id",
            )?;
            let rows = stmt
                .query_map([], |r| {
                    let state: String = r.get(3)?;
                    let state = JobState::parse(&state)
                        .ok_or_else(|| undecodable(format!("state `{state}`")))?;
                    let (id, tenant): (String, String) = (r.get(0)?, r.get(1)?);
                    let (attempt, started_at): (i64, Option<i64>) = (r.get(4)?, r.get(5)?);
                    let claim = (state == JobState::Running).then(|| Claimed {
                        id: id.clone(),
                        tenant: tenant.clone(),
                        attempt: attempt as u32,
                        started_at,
                        node: r.get(6).ok().flatten(),
                    });
                    Ok(PendingJob {
                        id,
                        tenant,
                        module: r.get(2)?,
                        state,
                        claim,
                    })
                })?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    async fn job_exists(&self, id: &str) -> Result<bool, StoreError> {
        self.read(|c| {
            Ok(c.prepare_cached("SELECT 1 FROM jobs WHERE id = ?1")?
                .exists([id])?)
        })
    }

    async fn probe(&self, now: i64) -> Result<(), StoreError> {
        self.write(move |c| {
            c.prepare_cached("INSERT OR REPLACE INTO probe (id, at) VALUES (1, ?1)")?
                .execute([now])?;
            Ok(())
        })
        .await
    }

    async fn expire_jobs(&self, before: i64) -> Result<Vec<String>, StoreError> {
        self.write(move |c| {
            let mut stmt = c.prepare_cached(
                "DELETE FROM jobs WHERE state IN ('succeeded', 'failed', 'cancelled') AND finished_at < ?1
                 RETURNING id",
            )?;
            let ids = stmt.query_map([before], |r| r.get(0))?.collect::<Result<_, _>>()?;
            Ok(ids)
        })
        .await
    }

    async fn append_audit(&self, e: &AuditEntry) -> Result<(), StoreError> {
        let e = e.clone();
        self.write(move |c| Ok(insert_audit(c, &e)?)).await
    }

    async fn audit(&self, limit: u32) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(|c| {
            let mut stmt = c.prepare_cached("SELECT * FROM audit ORDER BY seq DESC LIMIT ?1")?;
            let rows = stmt
                .query_map([i64::from(limit)], audit_row)?
                .collect::<Result<_, _>>()?;
            Ok(rows)
        })
    }

    async fn expire_audit(&self, before: i64) -> Result<u64, StoreError> {
        // In batches, so other writers are never held up behind a large
        // first sweep.
        const BATCH: usize = 5000;
        let mut total = 0;
        loop {
            let n = self
                .write(move |c| {
                    Ok(c.prepare_cached(
                        "DELETE FROM audit WHERE seq IN
                             (SELECT seq FROM audit WHERE at < ?1 ORDER BY at LIMIT ?2)",
                    )?
                    .execute(params![before, BATCH as i64])?)
                })
                .await?;
            total += n as u64;
            if n < BATCH {
                return Ok(total);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_writer_waits_out_another_connections_lock_and_gives_up_eventually() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("busy.sqlite");
        let holder = Connection::open(&path).unwrap();
        configure(&holder).unwrap();
        holder
            .query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
            .unwrap();
        holder.execute_batch("CREATE TABLE t (v INTEGER)").unwrap();
        let writer = Connection::open(&path).unwrap();
        configure(&writer).unwrap();
        // Another connection holds the write lock, as a log restart does,
        // and lets go a little later: the write waits instead of failing
        // with SQLITE_BUSY.
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let release = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            holder.execute_batch("COMMIT").unwrap();
        });
        writer.execute("INSERT INTO t VALUES (1)", []).unwrap();
        release.join().unwrap();
        // The wait is bounded.
        assert!(busy_wait(0));
        assert!(!busy_wait(20_000));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_reads_leaves_a_bounded_pool_of_connections_open() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(SqliteStore::open(&db_path(&dir)).await.unwrap());
        let burst = MAX_READERS;
        let together = std::sync::Arc::new(std::sync::Barrier::new(burst));
        let threads: Vec<_> = (0..burst)
            .map(|_| {
                let (store, together) = (
                    std::sync::Arc::clone(&store),
                    std::sync::Arc::clone(&together),
                );
                std::thread::spawn(move || {
                    // Every read holds its connection until all have one.
                    store
                        .read(|c| {
                            together.wait();
                            Ok(c.query_row("SELECT count(*) FROM jobs", [], |r| {
                                r.get::<_, i64>(0)
                            })?)
                        })
                        .unwrap()
                })
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 0);
        }
        let readers = store.readers.lock().unwrap();
        assert_eq!(
            (readers.idle.len(), readers.open),
            (MAX_IDLE_READERS, MAX_IDLE_READERS),
            "the burst's extra connections stayed open"
        );
        drop(readers);

        // Past MAX_READERS reads at once, a read waits for a connection:
        // no more are ever open.
        let most = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = (0..3 * MAX_READERS)
            .map(|_| {
                let (store, most) = (std::sync::Arc::clone(&store), std::sync::Arc::clone(&most));
                std::thread::spawn(move || {
                    store
                        .read(|_| {
                            let open = store.readers.lock().unwrap().open;
                            most.fetch_max(open, std::sync::atomic::Ordering::SeqCst);
                            std::thread::sleep(std::time::Duration::from_millis(20));
                            Ok(())
                        })
                        .unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let most = most.load(std::sync::atomic::Ordering::SeqCst);
        assert!(most <= MAX_READERS, "{most} connections open at once");
    }

    #[test]
    fn a_long_log_is_restarted_while_readers_come_and_go() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("wal.sqlite");
        let writer = Connection::open(&path).unwrap();
        configure(&writer).unwrap();
        writer
            .query_row("PRAGMA journal_mode = WAL", [], |_| Ok(()))
            .unwrap();
        writer.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        writer.execute_batch("CREATE TABLE t (v BLOB)").unwrap();
        // A reader that keeps starting short read transactions, as the
        // service's reader pool does under load.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let (path, stop) = (path.clone(), std::sync::Arc::clone(&stop));
            std::thread::spawn(move || {
                let c = Connection::open(&path).unwrap();
                configure(&c).unwrap();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let _: i64 = c
                        .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
                        .unwrap();
                }
            })
        };
        let checkpointer = Connection::open(&path).unwrap();
        configure(&checkpointer).unwrap();
        let mut rounds = Vec::new();
        for round in 0..3 {
            for _ in 0..1500 {
                writer
                    .execute("INSERT INTO t VALUES (zeroblob(3000))", [])
                    .unwrap();
            }
            let frames = checkpoint(&checkpointer).unwrap();
            assert!(frames > RESTART_FRAMES, "round {round}: {frames} frames");
            rounds.push(frames);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        reader.join().unwrap();
        // Each round's log held only that round's writes: it was restarted
        // every time, not appended to for ever.
        assert!(
            rounds[2] < rounds[0] * 3 / 2,
            "the log kept growing: {rounds:?} frames"
        );
    }
    use crate::store::now_ms;

    /// Where a test's database lives in `dir`.
    fn db_path(dir: &tempfile::TempDir) -> std::path::PathBuf {
        dir.path().join("db.sqlite")
    }

    /// A fresh store in a temporary directory (kept while the test holds it).
    async fn open_store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&db_path(&dir)).await.unwrap();
        (dir, store)
    }

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
    async fn a_database_from_before_summaries_lists_its_finished_jobs_in_a_few_words() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        let mut report = crate::sandbox::JobReport::not_run("old", "hello", "boom");
        report.limit = Some(crate::sandbox::LimitKind::Memory);
        report.exit_code = Some(3);
        report.outputs = vec![
            crate::job::OutputFile {
                name: "a".into(),
                size: 1,
                sha256: "0".repeat(64),
            };
            2
        ];
        {
            let store = SqliteStore::open(&path).await.unwrap();
            drop(store);
            // The table as it was before the `summary` column, with a job
            // finished then.
            let old = Connection::open(&path).unwrap();
            old.execute_batch("ALTER TABLE jobs DROP COLUMN summary")
                .unwrap();
            old.execute(
                "INSERT INTO jobs (id, tenant, subject, token_id, module, module_sha256, params,
                                   inputs, has_stdin, state, created_at, started_at,
                                   finished_at, attempts, report)
                 VALUES ('old', 'acme', 's', 'tok', 'hello', 'd', '{}', '[]', 0, 'failed',
                         1, 2, 3, 1, ?1)",
                [json(&report)],
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).await.unwrap();
        let listed = store.list_jobs("acme", 10).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].report, Some(report.summary()));
        assert_eq!(listed[0].report.as_ref().unwrap().outputs, 2);
    }

    #[tokio::test]
    async fn a_database_with_the_old_audit_trigger_is_migrated_and_audits_each_job_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        {
            // The schema as it was when a trigger read the audit fields out
            // of the report's JSON, before the idempotency and client
            // columns, with a job running.
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "CREATE TABLE jobs (id TEXT PRIMARY KEY, tenant TEXT NOT NULL,
                 subject TEXT NOT NULL, token_id TEXT NOT NULL, module TEXT NOT NULL,
                 module_sha256 TEXT NOT NULL, policy_sha256 TEXT, params TEXT NOT NULL,
                 inputs TEXT NOT NULL, has_stdin INTEGER NOT NULL, state TEXT NOT NULL,
                 created_at INTEGER NOT NULL, started_at INTEGER, finished_at INTEGER,
                 attempts INTEGER NOT NULL DEFAULT 0, report TEXT);
                 CREATE TABLE audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL,
                 action TEXT NOT NULL, tenant TEXT, subject TEXT, job_id TEXT, module TEXT,
                 module_sha256 TEXT, policy_sha256 TEXT, outcome TEXT, limit_fired TEXT,
                 detail TEXT NOT NULL);
                 CREATE TRIGGER audit_job_finished
                 AFTER UPDATE OF state ON jobs
                 WHEN OLD.state = 'running' AND NEW.state IN ('succeeded', 'failed')
                 BEGIN
                     INSERT INTO audit (at, action, tenant, subject, job_id, module, module_sha256,
                                        policy_sha256, outcome, limit_fired, detail)
                     VALUES (NEW.finished_at, 'job.finished', NEW.tenant, NEW.subject, NEW.id,
                             NEW.module, NEW.module_sha256, NEW.policy_sha256, NEW.state,
                             json_extract(NEW.report, '$.limit'),
                             COALESCE(json_extract(NEW.report, '$.failure.message'), ''));
                 END;
                 INSERT INTO jobs (id, tenant, subject, token_id, module, module_sha256, params,
                                   inputs, has_stdin, state, created_at, started_at, attempts)
                 VALUES ('old', 'acme', 's', 'tok', 'hello', 'd', '{}', '[]', 0, 'running',
                         1, 2, 1);",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).await.unwrap();
        // The job a crash left running is recovered with its claim, and
        // finishes; so does a new one.
        let pending = store.pending_jobs().await.unwrap();
        let claimed = pending[0].claim.clone().expect("a running job's claim");
        assert_eq!(
            (claimed.id(), claimed.tenant(), claimed.attempt()),
            ("old", "acme", 1)
        );
        let mut report = crate::sandbox::JobReport::not_run("old", "hello", "boom");
        report.limit = Some(crate::sandbox::LimitKind::Memory);
        assert!(store.finish_job(&claimed, &report, 7).await.unwrap());
        store.insert_job(&job("new", "acme"), None).await.unwrap();
        let (_, claimed) = super::super::suite::claim(&store, "new", 8).await;
        assert!(store.finish_job(&claimed, &report, 9).await.unwrap());
        let audit = store.audit(10).await.unwrap();
        assert_eq!(
            audit
                .iter()
                .map(|e| (e.job_id.as_deref(), e.limit.as_deref(), e.detail.as_str()))
                .collect::<Vec<_>>(),
            [
                (Some("new"), Some("memory"), "boom"),
                (Some("old"), Some("memory"), "boom")
            ],
            "one entry per job, written by the store"
        );
        let triggers: i64 = store
            .writer
            .lock()
            .unwrap()
            .query_row(
                "SELECT COUNT(*) FROM sqlite_master WHERE type = 'trigger'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(triggers, 0);
    }

    #[tokio::test]
    async fn an_audit_table_without_the_client_column_gains_it_and_old_rows_expire() {
        let dir = tempfile::tempdir().unwrap();
        let path = db_path(&dir);
        {
            // The audit table as it was before the column existed.
            let old = Connection::open(&path).unwrap();
            old.execute_batch(
                "CREATE TABLE audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, at INTEGER NOT NULL,
                 action TEXT NOT NULL, tenant TEXT, subject TEXT, job_id TEXT, module TEXT,
                 module_sha256 TEXT, policy_sha256 TEXT, outcome TEXT, limit_fired TEXT,
                 detail TEXT NOT NULL);
                 INSERT INTO audit (at, action, detail) VALUES (5, 'auth.denied', 'old');",
            )
            .unwrap();
        }
        let store = SqliteStore::open(&path).await.unwrap();
        for at in [10, 20] {
            store
                .append_audit(&AuditEntry {
                    at,
                    action: "auth.denied".into(),
                    client: Some("127.0.0.9".into()),
                    ..AuditEntry::default()
                })
                .await
                .unwrap();
        }
        let rows = store.audit(10).await.unwrap();
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].client.as_deref(), Some("127.0.0.9"));
        assert_eq!(rows[2].client, None);
        assert_eq!(store.expire_audit(20).await.unwrap(), 2);
        let rows = store.audit(10).await.unwrap();
        assert_eq!(rows.iter().map(|r| r.at).collect::<Vec<_>>(), [20]);
    }

    #[tokio::test]
    async fn a_full_database_is_named_full_and_writes_again_once_it_has_room() {
        let (_dir, store) = open_store().await;
        store.probe(1).await.unwrap();
        let pages: i64 = {
            let w = store.writer.lock().unwrap();
            let pages = w.query_row("PRAGMA page_count", [], |r| r.get(0)).unwrap();
            w.pragma_update(None, "max_page_count", pages).unwrap();
            pages
        };
        let mut big = job("j1", "acme");
        big.params = [("blob".to_owned(), "x".repeat(64 * 1024))].into();
        let err = store.insert_job(&big, None).await.unwrap_err();
        assert!(err.is_full() && err.is_storage(), "{err}");
        assert!(!err.to_string().contains("corrupt"), "{err}");
        {
            let w = store.writer.lock().unwrap();
            w.pragma_update(None, "max_page_count", pages * 100)
                .unwrap();
        }
        store.insert_job(&big, None).await.unwrap();
        store.probe(2).await.unwrap();
    }
}
