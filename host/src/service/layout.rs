//! The on-disk layout of jobs under `<data>/jobs/<id>/`: `inputs/`
//! (`in-<name>`, `stdin`; fsynced before a job is accepted, removed once it
//! finishes) and `outputs/` (copied from the sandbox's job directory), and
//! the removal of directories no job row points to.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Duration;

use super::*;
use crate::sandbox::{JobInput, JobReport, JobSpec};
use crate::store::JobRecord;

/// A job directory without a row is removed once it is this old: younger,
/// it may be a submission between writing its inputs and its row.
pub const ORPHAN_AGE: Duration = Duration::from_secs(600);

impl Service {
    /// The spec of `record`'s job, read back from its stored inputs; `None`
    /// when one of them is unreadable (the job then fails, it cannot be
    /// run as submitted).
    ///
    /// # Errors
    /// Its stored stdin cannot be read.
    pub(super) fn stored_spec(&self, record: &JobRecord) -> Result<Option<JobSpec>, ServiceError> {
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
                    return Ok(None);
                }
            }
        }
        if record.has_stdin {
            spec.stdin = std::fs::read(inputs_dir.join("stdin"))?.into();
        }
        Ok(Some(spec))
    }

    pub(super) fn job_dir(&self, id: &str) -> PathBuf {
        self.jobs_dir.join(id)
    }

    /// Writes inputs (and stdin) under `jobs/<id>/inputs`, fsynced, so the
    /// job can be re-run after a crash. A job without inputs writes nothing.
    pub(super) fn store_inputs(&self, spec: &JobSpec, has_stdin: bool) -> Result<(), ServiceError> {
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

    pub(super) fn remove_job_files(&self, id: &str) {
        let dir = self.job_dir(id);
        if dir.exists()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            tracing::warn!(job = id, error = %e, "cannot remove job files");
        }
    }

    /// Removes a finished job's stored inputs: they are only needed to
    /// re-run it; the report and outputs remain.
    pub(super) fn remove_inputs(&self, record: &JobRecord) {
        if !record.inputs.is_empty() || record.has_stdin {
            let _ = std::fs::remove_dir_all(self.job_dir(&record.id).join("inputs"));
        }
    }

    /// Removes what an unfinished attempt copied of a job's outputs.
    pub(super) fn remove_outputs(&self, id: &str) {
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

    /// Copies a finished job's outputs from its sandbox directory to its
    /// durable one.
    pub(super) fn keep_outputs(
        &self,
        record: &JobRecord,
        report: &mut JobReport,
        outputs: &crate::runner::Outputs,
    ) -> std::io::Result<()> {
        let kept = self.job_dir(&record.id).join("outputs");
        // Only a re-run can find an earlier attempt's copy (one a crash
        // interrupted); a first attempt skips the lookup.
        if record.attempts > 1 && kept.exists() {
            std::fs::remove_dir_all(&kept)?;
        }
        // What is listed is what this process copied, not what the runner
        // (perhaps a compromised worker) said it left.
        if outputs.worker_left_nothing() {
            // Whatever a worker claims, it left nothing.
            report.outputs.clear();
            report.skipped_outputs.clear();
        } else if !report.outputs.is_empty() || outputs.from_worker() {
            // A large copy runs off the async threads' turn.
            let copy = || outputs.collect(Some(&kept));
            let multi_thread = tokio::runtime::Handle::try_current()
                .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
            let collected = if multi_thread {
                tokio::task::block_in_place(copy)
            } else {
                copy()
            };
            match collected {
                Ok(collected) => report.list_collected(collected),
                // The host's side failed: the job is re-run.
                Err(e @ crate::sandbox::outputs::CollectError::Copy { .. }) => return Err(e.into()),
                // What the job left cannot be read, or is more than its
                // limits: its own failure, and nothing of it is kept.
                Err(e) => {
                    if kept.exists() {
                        std::fs::remove_dir_all(&kept)?;
                    }
                    report.fail_outputs(e.to_string());
                }
            }
        }
        Ok(())
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
}
