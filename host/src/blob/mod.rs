//! Where jobs' inputs and outputs are kept: [`BlobStore`].
//!
//! A job's inputs (and stdin) are put durably before the job is accepted
//! and read back when it runs, on whichever node claims it; a finished
//! run's outputs are put before the job's row says it finished, so a reader
//! who sees `succeeded` can download them from any node; a job's blobs go
//! when it expires, is deleted, or turns out to be an orphan (no row).
//!
//! Two implementations:
//! - [`FsBlobs`], the default beside SQLite: files under
//!   `<data>/jobs/<id>/` (`inputs/in-<name>`, `inputs/stdin`, `outputs/`),
//!   fsynced, served with `O_NOFOLLOW` — one node's data directory.
//! - [`PgBlobs`], whenever `[storage] url` is set: objects in the same
//!   PostgreSQL database as the job rows, one `blobs` row per object
//!   (length, sha256, the attempt that wrote it) and its bytes in
//!   `blob_chunks` of at most [`PG_CHUNK`] bytes, written and read chunk by
//!   chunk. Every node sharing the database sees every job's blobs.
//!
//! Either way the sandbox only ever sees local files: inputs are read back
//! into the job's spec (the runner materialises them into the local job
//! directory, as it always has), and outputs are collected from the local
//! job directory into `<data>/jobs/<id>/outputs/` first; [`PgBlobs`] then
//! copies them into the database and removes the local copy.

mod fs;
mod postgres;
#[cfg(test)]
mod tests;

use std::path::Path;
use std::pin::Pin;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures_util::Stream;

pub use fs::{FsBlobs, remove_local, remove_local_if_empty};
pub use postgres::{PG_CHUNK, PgBlobs};

use crate::sandbox::JobInput;
use crate::store::{JobStore, StoreError};

/// Why a blob could not be put, read or removed.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The disk under the data directory failed.
    #[error("blobs: {0}")]
    Io(#[from] std::io::Error),
    /// The database failed, or could not be reached.
    #[error("blobs: {0}")]
    Db(#[from] sqlx::Error),
    /// A stored input of the job is missing or unreadable: the job cannot
    /// be run as submitted.
    #[error("job `{job}`: stored input `{name}` is missing")]
    MissingInput { job: String, name: String },
    /// A collected output is not what the report lists (its size or
    /// digest changed after it was collected).
    #[error("job `{job}`: output `{name}` changed after it was collected")]
    Changed { job: String, name: String },
    /// This attempt no longer runs the job (it was cancelled, re-queued or
    /// taken by a later attempt, which may have stored its outputs): its
    /// outputs are not kept.
    #[error(
        "job `{job}`: attempt {attempt} no longer runs it (cancelled, re-queued, or a later attempt's outputs are stored)"
    )]
    Stale { job: String, attempt: u32 },
}

impl From<BlobError> for crate::service::ServiceError {
    fn from(e: BlobError) -> Self {
        match e {
            BlobError::Io(e) => Self::Io(e),
            BlobError::Db(e) => Self::Store(StoreError::Postgres(e)),
            other => Self::Io(std::io::Error::other(other)),
        }
    }
}

/// A stream of an output's bytes, chunk by chunk.
pub type ChunkStream = Pin<Box<dyn Stream<Item = std::io::Result<Bytes>> + Send>>;

/// An output opened for download.
pub enum OutputReader {
    /// A regular file of the data directory, opened without following links.
    File(std::fs::File),
    /// Chunks read one at a time, as the client takes them.
    Chunks(ChunkStream),
}

impl std::fmt::Debug for OutputReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::File(file) => f.debug_tuple("File").field(file).finish(),
            Self::Chunks(_) => f.write_str("Chunks"),
        }
    }
}

/// Shared storage of jobs' inputs and outputs (see the module docs).
#[async_trait]
pub trait BlobStore: Send + Sync + std::fmt::Debug {
    /// Puts `job`'s inputs and stdin durably (synced, or committed); a job
    /// without either puts nothing. On failure nothing of it is left.
    async fn put_inputs(
        &self,
        job: &str,
        inputs: &[JobInput],
        stdin: Option<&[u8]>,
    ) -> Result<(), BlobError>;

    /// `job`'s inputs named `names`, in that order, and its stdin when
    /// `stdin` (else empty).
    ///
    /// # Errors
    /// [`BlobError::MissingInput`] when one is not stored.
    async fn inputs(
        &self,
        job: &str,
        names: &[String],
        stdin: bool,
    ) -> Result<(Vec<JobInput>, Bytes), BlobError>;

    /// The sizes of `job`'s inputs named `names`, in that order, then its
    /// stdin's (zero unless `stdin`), read without reading the inputs: the
    /// room its run needs, asked for before they are read.
    ///
    /// # Errors
    /// [`BlobError::MissingInput`] when one is not stored.
    async fn input_sizes(
        &self,
        job: &str,
        names: &[String],
        stdin: bool,
    ) -> Result<Vec<u64>, BlobError>;

    /// Removes `job`'s inputs (once it finished: they are only needed to
    /// run it again).
    async fn remove_inputs(&self, job: &str) -> Result<(), BlobError>;

    /// Keeps the outputs `files` (name, size, sha256, as the report lists
    /// them) that attempt `attempt` of `job` collected under `dir`
    /// (`<data>/jobs/<job>/outputs`), replacing whatever an earlier attempt
    /// kept: never a mix of two attempts. Empty `files` removes an earlier
    /// attempt's.
    async fn put_outputs(
        &self,
        job: &str,
        attempt: u32,
        dir: &Path,
        files: &[crate::job::OutputFile],
    ) -> Result<(), BlobError>;

    /// Removes what attempt `attempt` (or an earlier one) kept of `job`'s
    /// outputs; a later attempt's stay.
    async fn remove_outputs(&self, job: &str, attempt: u32) -> Result<(), BlobError>;

    /// Output `name` of `job` and its length; `None` if not kept (or not a
    /// regular file).
    async fn output(&self, job: &str, name: &str)
    -> Result<Option<(OutputReader, u64)>, BlobError>;

    /// Removes every blob of `job`.
    async fn remove_job(&self, job: &str) -> Result<(), BlobError>;

    /// Whether every node sharing the job store sees these blobs (then a
    /// node's `<data>/jobs` holds only outputs on their way in, and any
    /// entry there no worker of the node holds, once old enough, is a
    /// leftover, whether or not its job has a row).
    fn is_shared(&self) -> bool {
        false
    }

    /// Removes blobs no job row of `store` points to that are at least
    /// `min_age` old (a submission puts its inputs before its row, an inline
    /// job its outputs); returns how many jobs' blobs went. The local
    /// directories are swept by the service either way.
    async fn remove_orphans(
        &self,
        store: &dyn JobStore,
        min_age: Duration,
    ) -> Result<usize, BlobError>;
}

/// The blob store `storage` selects: [`PgBlobs`] on `url` when set (a pool
/// of a quarter of `pool_size` connections, at least two), else
/// [`FsBlobs`] under `jobs_dir`.
///
/// # Errors
/// The database cannot be reached or migrated.
pub async fn open(
    storage: &crate::config::Storage,
    jobs_dir: &crate::sandbox::beneath::Root,
) -> Result<std::sync::Arc<dyn BlobStore>, crate::service::StartError> {
    Ok(match &storage.url {
        Some(url) => std::sync::Arc::new(
            PgBlobs::open(url.expose(), (storage.pool_size / 4).max(2), jobs_dir)
                .await
                .map_err(|e| crate::service::StartError::Storage(format!("blobs in {url}: {e}")))?,
        ),
        None => std::sync::Arc::new(FsBlobs::new(jobs_dir.clone())),
    })
}
