//! [`BlobStore`] in PostgreSQL: one `blobs` row per object (job, kind,
//! name, length, sha256, the attempt that wrote it) and its bytes in
//! `blob_chunks` of at most [`PG_CHUNK`] bytes (migration
//! `0004_blobs.sql`).
//!
//! Writes stream: an output is read from the local file one chunk at a
//! time and inserted chunk by chunk, inside one transaction per job's
//! outputs, so readers see all of an attempt's outputs or none, and a
//! re-run's outputs replace an earlier attempt's in the same commit. A
//! transaction-scoped advisory lock on the job orders two attempts that
//! race (a node presumed dead still finishing its run); the older attempt's
//! outputs are refused once a later one's are kept. Reads stream too: a
//! download fetches the next chunk only when the client has taken the
//! last, on a pooled connection held for that one query, so a slow reader
//! holds one chunk and no connection.
//!
//! Why PostgreSQL and not an S3-compatible store: it is the database every
//! node already shares, so there is no second service to run, secure and
//! back up; a job's outputs are committed in the same database as its row,
//! before the row says finished; and blob sizes are bounded by the
//! policies' input and output limits. An S3-compatible store behind this
//! same trait is the step beyond, for outputs larger than a database
//! should hold; it is not built.

use std::path::Path;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions};
use tokio::io::AsyncReadExt;

use super::{BlobError, BlobStore, OutputReader};
use crate::job::OutputFile;
use crate::sandbox::JobInput;
use crate::store::{JobStore, StoreError, now_ms};

/// Largest chunk of a blob, in bytes: what a write or a download holds of
/// one object at a time.
pub const PG_CHUNK: usize = 1 << 20;

/// The schema's versions (the job store applies the same set; sqlx's
/// advisory lock makes the second run a no-op).
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// How long a statement waits for a pooled connection.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// Blobs in one PostgreSQL database.
#[derive(Clone)]
pub struct PgBlobs {
    pub(super) pool: PgPool,
    chunk: usize,
    /// This node's `<data>/jobs`, where outputs are collected on their way
    /// in.
    jobs_dir: crate::sandbox::beneath::Root,
}

impl std::fmt::Debug for PgBlobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgBlobs")
            .field("chunk", &self.chunk)
            .finish_non_exhaustive()
    }
}

impl PgBlobs {
    /// Connects to `url` with a pool of at most `pool_size` connections and
    /// applies the migrations not yet applied.
    ///
    /// # Errors
    /// [`StoreError::Open`] if the URL is malformed, the database cannot be
    /// reached, or a migration fails.
    pub async fn open(
        url: &str,
        pool_size: u32,
        jobs_dir: &crate::sandbox::beneath::Root,
    ) -> Result<Self, StoreError> {
        // Bounded idle transactions, as the job store's: a node frozen
        // while it writes a job's outputs holds that job's lock for at most
        // that long.
        let options = crate::store::session_options(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(pool_size.max(1))
            .min_connections(0)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(|e| StoreError::Open(format!("cannot connect: {e}")))?;
        MIGRATOR
            .run(&pool)
            .await
            .map_err(|e| StoreError::Open(format!("migrating: {e}")))?;
        Ok(Self {
            pool,
            chunk: PG_CHUNK,
            jobs_dir: jobs_dir.clone(),
        })
    }

    /// Inserts one blob held in memory (an input), chunked.
    async fn insert_bytes(
        &self,
        tx: &mut sqlx::PgConnection,
        job: &str,
        kind: &str,
        name: &str,
        data: &[u8],
        now: i64,
    ) -> Result<(), sqlx::Error> {
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO blobs (job_id, kind, name, length, sha256, created_at)
             VALUES ($1, $2, $3, $4, $5, $6) RETURNING id",
        )
        .bind(job)
        .bind(kind)
        .bind(name)
        .bind(i64::try_from(data.len()).unwrap_or(i64::MAX))
        .bind(hex::encode(Sha256::digest(data)))
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        for (seq, chunk) in data.chunks(self.chunk).enumerate() {
            insert_chunk(tx, id, seq, chunk).await?;
        }
        Ok(())
    }

    /// Reads one whole blob (an input) into memory.
    async fn read_bytes(
        &self,
        job: &str,
        kind: &str,
        name: &str,
    ) -> Result<Option<Bytes>, sqlx::Error> {
        let Some(row) = sqlx::query(
            "SELECT id, length FROM blobs WHERE job_id = $1 AND kind = $2 AND name = $3",
        )
        .bind(job)
        .bind(kind)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let id: i64 = row.get("id");
        let length: i64 = row.get("length");
        let mut data = Vec::with_capacity(usize::try_from(length).unwrap_or(0));
        let mut chunks = sqlx::query_scalar::<_, Vec<u8>>(
            "SELECT data FROM blob_chunks WHERE blob_id = $1 ORDER BY seq",
        )
        .bind(id)
        .fetch(&self.pool);
        use futures_util::TryStreamExt as _;
        while let Some(chunk) = chunks.try_next().await? {
            data.extend_from_slice(&chunk);
        }
        if data.len() as u64 != u64::try_from(length).unwrap_or(u64::MAX) {
            return Ok(None);
        }
        Ok(Some(data.into()))
    }
}

async fn insert_chunk(
    tx: &mut sqlx::PgConnection,
    blob: i64,
    seq: usize,
    data: &[u8],
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO blob_chunks (blob_id, seq, data) VALUES ($1, $2, $3)")
        .bind(blob)
        .bind(i32::try_from(seq).unwrap_or(i32::MAX))
        .bind(data)
        .execute(tx)
        .await?;
    Ok(())
}

/// Takes the job's transaction-scoped advisory lock (writers of one job's
/// outputs go one at a time).
pub(super) async fn lock_job(tx: &mut sqlx::PgConnection, job: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 15))")
        .bind(job)
        .execute(tx)
        .await?;
    Ok(())
}

#[async_trait]
impl BlobStore for PgBlobs {
    fn is_shared(&self) -> bool {
        true
    }

    async fn put_inputs(
        &self,
        job: &str,
        inputs: &[JobInput],
        stdin: Option<&[u8]>,
    ) -> Result<(), BlobError> {
        if inputs.is_empty() && stdin.is_none() {
            return Ok(());
        }
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        for input in inputs {
            self.insert_bytes(&mut tx, job, "input", &input.name, &input.data, now)
                .await?;
        }
        if let Some(data) = stdin {
            self.insert_bytes(&mut tx, job, "stdin", "", data, now)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn inputs(
        &self,
        job: &str,
        names: &[String],
        stdin: bool,
    ) -> Result<(Vec<JobInput>, Bytes), BlobError> {
        let missing = |name: &str| BlobError::MissingInput {
            job: job.to_owned(),
            name: name.to_owned(),
        };
        let mut inputs = Vec::with_capacity(names.len());
        for name in names {
            let data = self
                .read_bytes(job, "input", name)
                .await?
                .ok_or_else(|| missing(name))?;
            inputs.push(JobInput {
                name: name.clone(),
                data,
            });
        }
        let stdin = if stdin {
            self.read_bytes(job, "stdin", "")
                .await?
                .ok_or_else(|| missing("stdin"))?
        } else {
            Bytes::new()
        };
        Ok((inputs, stdin))
    }

    async fn input_sizes(
        &self,
        job: &str,
        names: &[String],
        stdin: bool,
    ) -> Result<Vec<u64>, BlobError> {
        let rows = sqlx::query(
            "SELECT kind, name, length FROM blobs WHERE job_id = $1 AND kind IN ('input', 'stdin')",
        )
        .bind(job)
        .fetch_all(&self.pool)
        .await?;
        let size = |kind: &str, name: &str| {
            rows.iter()
                .find(|r| r.get::<String, _>("kind") == kind && r.get::<String, _>("name") == name)
                .map(|r| u64::try_from(r.get::<i64, _>("length")).unwrap_or(u64::MAX))
                .ok_or_else(|| BlobError::MissingInput {
                    job: job.to_owned(),
                    name: if kind == "stdin" { "stdin" } else { name }.to_owned(),
                })
        };
        let mut sizes = Vec::with_capacity(names.len() + 1);
        for name in names {
            sizes.push(size("input", name)?);
        }
        sizes.push(if stdin { size("stdin", "")? } else { 0 });
        Ok(sizes)
    }

    async fn remove_inputs(&self, job: &str) -> Result<(), BlobError> {
        sqlx::query("DELETE FROM blobs WHERE job_id = $1 AND kind IN ('input', 'stdin')")
            .bind(job)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn put_outputs(
        &self,
        job: &str,
        attempt: u32,
        dir: &Path,
        files: &[OutputFile],
    ) -> Result<(), BlobError> {
        let attempt_i = i32::try_from(attempt).unwrap_or(i32::MAX);
        let now = now_ms();
        let mut tx = self.pool.begin().await?;
        lock_job(&mut tx, job).await?;
        // Only the attempt that still runs the job keeps outputs: not one
        // whose job was cancelled, re-queued or taken by another node
        // while it ran (its node was stopped past its lease).
        let runs: Option<(String, i32)> =
            sqlx::query_as("SELECT state, attempts FROM jobs WHERE id = $1")
                .bind(job)
                .fetch_optional(&mut *tx)
                .await?;
        if !matches!(&runs, Some((state, now)) if state == "running" && *now == attempt_i) {
            tx.rollback().await?;
            return Err(BlobError::Stale {
                job: job.to_owned(),
                attempt,
            });
        }
        let newest: Option<i32> = sqlx::query_scalar(
            "SELECT max(attempt) FROM blobs WHERE job_id = $1 AND kind = 'output'",
        )
        .bind(job)
        .fetch_one(&mut *tx)
        .await?;
        if newest.is_some_and(|n| n > attempt_i) {
            tx.rollback().await?;
            return Err(BlobError::Stale {
                job: job.to_owned(),
                attempt,
            });
        }
        sqlx::query("DELETE FROM blobs WHERE job_id = $1 AND kind = 'output'")
            .bind(job)
            .execute(&mut *tx)
            .await?;
        let mut buf = vec![0; self.chunk];
        for out in files {
            let changed = || BlobError::Changed {
                job: job.to_owned(),
                name: out.name.clone(),
            };
            let id: i64 = sqlx::query_scalar(
                "INSERT INTO blobs (job_id, kind, name, attempt, length, sha256, created_at)
                 VALUES ($1, 'output', $2, $3, $4, $5, $6) RETURNING id",
            )
            .bind(job)
            .bind(&out.name)
            .bind(attempt_i)
            .bind(i64::try_from(out.size).unwrap_or(i64::MAX))
            .bind(&out.sha256)
            .bind(now)
            .fetch_one(&mut *tx)
            .await?;
            let mut file = tokio::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(dir.join(&out.name))
                .await?;
            let (mut seq, mut total, mut digest) = (0, 0u64, Sha256::new());
            loop {
                // Fill a whole chunk (a read may return less).
                let mut filled = 0;
                while filled < buf.len() {
                    let n = file.read(&mut buf[filled..]).await?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                if filled == 0 {
                    break;
                }
                total += filled as u64;
                if total > out.size {
                    return Err(changed());
                }
                digest.update(&buf[..filled]);
                insert_chunk(&mut tx, id, seq, &buf[..filled]).await?;
                seq += 1;
                if filled < buf.len() {
                    break;
                }
            }
            if total != out.size || hex::encode(digest.finalize()) != out.sha256 {
                return Err(changed());
            }
        }
        tx.commit().await?;
        // The local copy was only the way in (and its job directory, now
        // empty, too): reached from the jobs directory, as it was made.
        super::fs::remove_local(&self.jobs_dir, Path::new(job).join("outputs")).await?;
        let _ = super::fs::remove_local_if_empty(&self.jobs_dir, job);
        Ok(())
    }

    async fn remove_outputs(&self, job: &str, attempt: u32) -> Result<(), BlobError> {
        // A stale attempt failing late must not remove a later one's.
        sqlx::query("DELETE FROM blobs WHERE job_id = $1 AND kind = 'output' AND attempt <= $2")
            .bind(job)
            .bind(i32::try_from(attempt).unwrap_or(i32::MAX))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn output(
        &self,
        job: &str,
        name: &str,
    ) -> Result<Option<(OutputReader, u64)>, BlobError> {
        let Some(row) = sqlx::query(
            "SELECT id, length FROM blobs WHERE job_id = $1 AND kind = 'output' AND name = $2",
        )
        .bind(job)
        .bind(name)
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        let id: i64 = row.get("id");
        let length = u64::try_from(row.get::<i64, _>("length")).unwrap_or(0);
        let pool = self.pool.clone();
        // One query per chunk, as the body is polled: nothing is read ahead
        // of the client, and no connection is held between chunks.
        let chunks = futures_util::stream::try_unfold(0i32, move |seq| {
            let pool = pool.clone();
            async move {
                let data: Option<Vec<u8>> = sqlx::query_scalar(
                    "SELECT data FROM blob_chunks WHERE blob_id = $1 AND seq = $2",
                )
                .bind(id)
                .bind(seq)
                .fetch_optional(&pool)
                .await
                .map_err(std::io::Error::other)?;
                Ok(data.map(|d| (Bytes::from(d), seq + 1)))
            }
        });
        Ok(Some((OutputReader::Chunks(Box::pin(chunks)), length)))
    }

    async fn remove_job(&self, job: &str) -> Result<(), BlobError> {
        sqlx::query("DELETE FROM blobs WHERE job_id = $1")
            .bind(job)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn remove_orphans(
        &self,
        _store: &dyn JobStore,
        min_age: Duration,
    ) -> Result<usize, BlobError> {
        // The job rows are in the same database.
        let before =
            now_ms().saturating_sub(i64::try_from(min_age.as_millis()).unwrap_or(i64::MAX));
        let jobs: i64 = sqlx::query_scalar(
            "WITH gone AS (
                 DELETE FROM blobs b WHERE b.created_at <= $1
                 AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = b.job_id)
                 RETURNING b.job_id)
             SELECT count(DISTINCT job_id) FROM gone",
        )
        .bind(before)
        .fetch_one(&self.pool)
        .await?;
        Ok(usize::try_from(jobs).unwrap_or(0))
    }
}
