//! Where jobs' files are: their inputs and outputs in the service's
//! [`BlobStore`](crate::blob::BlobStore) (files under `<data>/jobs/<id>/`
//! by default, the shared database with `[storage] url`), outputs collected
//! from the sandbox's job directory into `<data>/jobs/<id>/outputs/` first,
//! and the removal of job directories and blobs no job row points to.

use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::blob::{BlobError, OutputReader};
use crate::sandbox::{JobReport, JobSpec};
use crate::store::JobRecord;

/// A job directory without a row is removed once it is this old: younger,
/// it may be a submission between writing its inputs and its row.
pub const ORPHAN_AGE: Duration = Duration::from_secs(600);

impl Service {
    /// The spec of `record`'s job, read back from its stored inputs; `None`
    /// when one of them is missing (the job then fails, it cannot be
    /// run as submitted).
    ///
    /// # Errors
    /// The blob store failed.
    pub(super) async fn stored_spec(
        &self,
        record: &JobRecord,
    ) -> Result<Option<JobSpec>, ServiceError> {
        let mut spec = JobSpec {
            id: record.id.clone(),
            params: record.params.clone(),
            ..JobSpec::default()
        };
        if record.inputs.is_empty() && !record.has_stdin {
            return Ok(Some(spec));
        }
        match self
            .blobs
            .inputs(&record.id, &record.inputs, record.has_stdin)
            .await
        {
            Ok((inputs, stdin)) => {
                spec.inputs = inputs;
                spec.stdin = stdin;
                Ok(Some(spec))
            }
            Err(e @ BlobError::MissingInput { .. }) => {
                tracing::error!(job = %record.id, error = %e, "stored input unreadable");
                Ok(None)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Job `id`'s `outputs` directory, below the jobs directory.
    fn kept_outputs(id: &str) -> PathBuf {
        std::path::Path::new(id).join("outputs")
    }

    /// Puts inputs (and stdin) in the blob store, durably, so the job can
    /// be run (again) on any node sharing it. A job without inputs puts
    /// nothing.
    pub(super) async fn store_inputs(
        &self,
        spec: &JobSpec,
        has_stdin: bool,
    ) -> Result<(), ServiceError> {
        let stdin = has_stdin.then_some(&spec.stdin[..]);
        if let Err(e) = self.blobs.put_inputs(&spec.id, &spec.inputs, stdin).await {
            self.remove_job_files(&spec.id).await;
            return Err(e.into());
        }
        Ok(())
    }

    /// Removes every file and blob of job `id`.
    pub(super) async fn remove_job_files(&self, id: &str) {
        if let Err(e) = self.blobs.remove_job(id).await {
            tracing::warn!(job = id, error = %e, "cannot remove job blobs");
        }
        if let Err(e) = crate::blob::remove_local(&self.jobs_dir, id).await {
            tracing::warn!(job = id, error = %e, "cannot remove job files");
        }
    }

    /// Removes a finished job's stored inputs: they are only needed to
    /// re-run it; the report and outputs remain.
    pub(super) async fn remove_inputs(&self, record: &JobRecord) {
        if (!record.inputs.is_empty() || record.has_stdin)
            && let Err(e) = self.blobs.remove_inputs(&record.id).await
        {
            tracing::warn!(job = %record.id, error = %e, "cannot remove a finished job's inputs");
        }
    }

    /// Removes what `record`'s unfinished attempt kept of its outputs (not
    /// a later attempt's, run elsewhere).
    pub(super) async fn remove_outputs(&self, record: &JobRecord) {
        let id = &record.id;
        if let Err(e) = crate::blob::remove_local(&self.jobs_dir, Self::kept_outputs(id)).await {
            tracing::warn!(job = id, error = %e, "cannot remove a failed attempt's outputs");
        }
        if let Err(e) = self.blobs.remove_outputs(id, record.attempts).await {
            tracing::warn!(job = id, error = %e, "cannot remove a failed attempt's outputs");
        }
    }

    /// Copies a finished job's outputs from its sandbox directory to
    /// `<data>/jobs/<id>/outputs`, and keeps them in the blob store (which
    /// replaces an earlier attempt's), all before the job is recorded
    /// finished. That directory is reached from the jobs directory's
    /// descriptor, never through a link or across a mount, and the copy
    /// is made into the very directory so opened
    /// ([`crate::sandbox::beneath`]).
    pub(super) async fn keep_outputs(
        &self,
        record: &JobRecord,
        report: &mut JobReport,
        outputs: &crate::runner::Outputs,
    ) -> Result<(), ServiceError> {
        let rel = Self::kept_outputs(&record.id);
        // Only a re-run can find an earlier attempt's copy (one a crash
        // interrupted); a first attempt skips the lookup.
        if record.attempts > 1 {
            crate::blob::remove_local(&self.jobs_dir, &rel).await?;
        }
        // Where the outputs are copied, once made: the directory's own
        // descriptor, as a path.
        let mut kept_dir = None;
        // What is listed is what this process copied, not what the runner
        // (perhaps a compromised worker) said it left.
        if outputs.worker_left_nothing() {
            // Whatever a worker claims, it left nothing.
            report.outputs.clear();
            report.skipped_outputs.clear();
        } else if !report.outputs.is_empty() || outputs.from_worker() {
            // A large copy runs off the async threads' turn.
            let collected = crate::blocking(|| {
                let dir = self.jobs_dir.dir(&rel, true).map_err(|source| {
                    crate::sandbox::outputs::CollectError::Copy {
                        name: String::new(),
                        source,
                    }
                })?;
                let collected = outputs.collect(Some(&crate::sandbox::beneath::fd_path(&dir)));
                kept_dir = Some(dir);
                collected
            });
            match collected {
                Ok(collected) => report.list_collected(collected),
                // The host's side failed: the job is re-run.
                Err(e @ crate::sandbox::outputs::CollectError::Copy { .. }) => {
                    return Err(std::io::Error::from(e).into());
                }
                // What the job left cannot be read, or is more than its
                // limits: its own failure, and nothing of it is kept.
                Err(e) => {
                    kept_dir = None;
                    crate::blob::remove_local(&self.jobs_dir, &rel).await?;
                    report.fail_outputs(e.to_string());
                }
            }
        }
        // No report is stored that cannot be answered within a tenant's
        // share of the answers' memory: one that long keeps no outputs.
        let largest = crate::job::largest_report(self.config.server.max_buffered_answers.as_u64());
        let fitted = if report.json_bound() >= crate::job::HEAVY_REPORT as u64 {
            crate::blocking(|| report.fit(largest))
        } else {
            report.fit(largest)
        };
        if let Some(len) = fitted {
            tracing::warn!(job = %record.id, len, largest, "report too long to answer: outputs not kept");
            kept_dir = None;
            crate::blob::remove_local(&self.jobs_dir, &rel).await?;
        }
        // A first attempt that listed nothing has nothing to keep or
        // replace.
        if !report.outputs.is_empty() || record.attempts > 1 {
            // Read from the directory copied into; without one (nothing
            // listed), nothing is read.
            let kept = kept_dir.as_ref().map_or_else(
                || self.jobs_dir.path().join(&rel),
                crate::sandbox::beneath::fd_path,
            );
            self.blobs
                .put_outputs(&record.id, record.attempts, &kept, &report.outputs)
                .await?;
        }
        Ok(())
    }

    /// Opens output `name` of job `id` (one its report lists) for download.
    pub(super) async fn open_output(
        &self,
        id: &str,
        name: &str,
    ) -> Result<(OutputReader, u64), ServiceError> {
        self.blobs
            .output(id, name)
            .await
            .map_err(|e| self.noted(e.into()))?
            .ok_or_else(|| ServiceError::NoOutput(name.to_owned()))
    }

    /// Removes entries of the jobs directory that no job row points to (with
    /// a shared blob store: that no worker here holds) and that have not
    /// changed for `min_age` (a submission writes its inputs before its
    /// row; an inline job its outputs), and blobs in a shared store no row
    /// points to (never younger than [`ORPHAN_AGE`] there:
    /// another node may be between writing a job's inputs and its row).
    /// Returns how many.
    pub async fn remove_orphans(&self, min_age: Duration) -> usize {
        let mut removed = match self
            .blobs
            .remove_orphans(self.store.as_ref(), min_age.max(ORPHAN_AGE))
            .await
        {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "orphan blob sweep failed");
                0
            }
        };
        // Listed through the directory held open since the start, not by
        // its path: whatever is put at the path later is not this
        // service's.
        let listed = crate::sandbox::beneath::fd_path(self.jobs_dir.fd());
        let Ok(entries) = std::fs::read_dir(&listed) else {
            return removed;
        };
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
            // Only what a job could have made: a directory named by a job
            // id. Anything else is not this service's to remove.
            if uuid::Uuid::parse_str(&id).is_err() || !meta.is_dir() {
                continue;
            }
            if self.blobs.is_shared() {
                // Outputs on their way into the shared store: a job's row
                // says nothing of this node's copy (a crash may have left
                // it, and the job re-run elsewhere).
                if self.is_held(&id) {
                    continue;
                }
            } else {
                match self.store.job_exists(&id).await {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => {
                        tracing::error!(error = %e, "orphan sweep failed");
                        return removed;
                    }
                }
            }
            // A directory another process holds in it (a service's work
            // directory configured inside this one's jobs directory) is
            // left, with all around it: the removal refuses
            // (`sandbox::remove_tree_in`).
            match crate::blob::remove_local(&self.jobs_dir, &id).await {
                Ok(()) => removed += 1,
                Err(e) => {
                    tracing::warn!(entry = %entry.path().display(), error = %e, "cannot remove an orphan job directory")
                }
            }
        }
        removed
    }
}
