//! [`BlobStore`] on the local filesystem: today's layout of
//! `<data>/jobs/<id>/` (`inputs/in-<name>`, `inputs/stdin`, `outputs/`).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{BlobError, BlobStore, OutputReader};
use crate::job::OutputFile;
use crate::sandbox::JobInput;
use crate::store::JobStore;

/// Blobs as files under one node's `<data>/jobs`.
#[derive(Debug)]
pub struct FsBlobs {
    jobs_dir: PathBuf,
}

impl FsBlobs {
    /// Blobs under `jobs_dir` (`<data>/jobs`, which exists).
    pub fn new(jobs_dir: PathBuf) -> Self {
        Self { jobs_dir }
    }

    fn job_dir(&self, id: &str) -> PathBuf {
        self.jobs_dir.join(id)
    }
}

/// Removes `path` (a directory or anything else) on a blocking thread; a
/// missing one is fine. A job's outputs can be a tree as large as its
/// policy's `output_files` (which has no ceiling), and removing it takes as
/// long: no async thread spends that while other requests and workers'
/// channels wait for it.
///
/// # Errors
/// What removing it failed with.
pub async fn remove_local(path: &Path) -> std::io::Result<()> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || remove_local_now(&path))
        .await
        .map_err(std::io::Error::other)?
}

fn remove_local_now(path: &Path) -> std::io::Result<()> {
    // Never across a link or a mount: what is beneath one is not a job's.
    crate::sandbox::remove_tree(path)
}

#[async_trait]
impl BlobStore for FsBlobs {
    async fn put_inputs(
        &self,
        job: &str,
        inputs: &[JobInput],
        stdin: Option<&[u8]>,
    ) -> Result<(), BlobError> {
        if inputs.is_empty() && stdin.is_none() {
            return Ok(());
        }
        let dir = self.job_dir(job).join("inputs");
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
        let result = inputs
            .iter()
            .try_for_each(|i| write(&format!("in-{}", i.name), &i.data))
            .and_then(|()| stdin.map_or(Ok(()), |data| write("stdin", data)))
            .and_then(|()| std::fs::File::open(&dir)?.sync_all());
        if let Err(e) = result {
            let _ = remove_local(&self.job_dir(job)).await;
            return Err(e.into());
        }
        Ok(())
    }

    async fn inputs(
        &self,
        job: &str,
        names: &[String],
        stdin: bool,
    ) -> Result<(Vec<JobInput>, Bytes), BlobError> {
        let dir = self.job_dir(job).join("inputs");
        let mut inputs = Vec::with_capacity(names.len());
        for name in names {
            match std::fs::read(dir.join(format!("in-{name}"))) {
                Ok(data) => inputs.push(JobInput {
                    name: name.clone(),
                    data: data.into(),
                }),
                Err(e) => {
                    tracing::error!(job, input = %name, error = %e, "stored input unreadable");
                    return Err(BlobError::MissingInput {
                        job: job.to_owned(),
                        name: name.clone(),
                    });
                }
            }
        }
        let stdin = if stdin {
            std::fs::read(dir.join("stdin"))?.into()
        } else {
            Bytes::new()
        };
        Ok((inputs, stdin))
    }

    async fn remove_inputs(&self, job: &str) -> Result<(), BlobError> {
        Ok(remove_local(&self.job_dir(job).join("inputs")).await?)
    }

    async fn put_outputs(
        &self,
        _job: &str,
        _attempt: u32,
        _dir: &Path,
        _files: &[OutputFile],
    ) -> Result<(), BlobError> {
        // They were collected where they are kept (`dir`), replacing an
        // earlier attempt's copy.
        Ok(())
    }

    async fn remove_outputs(&self, job: &str, _attempt: u32) -> Result<(), BlobError> {
        // One node's attempts never overlap: the copy is this attempt's.
        Ok(remove_local(&self.job_dir(job).join("outputs")).await?)
    }

    async fn output(
        &self,
        job: &str,
        name: &str,
    ) -> Result<Option<(OutputReader, u64)>, BlobError> {
        let path = self.job_dir(job).join("outputs").join(name);
        let Ok(file) = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path)
        else {
            return Ok(None);
        };
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Ok(None);
        }
        Ok(Some((OutputReader::File(file), meta.len())))
    }

    async fn remove_job(&self, job: &str) -> Result<(), BlobError> {
        Ok(remove_local(&self.job_dir(job)).await?)
    }

    async fn remove_orphans(
        &self,
        _store: &dyn JobStore,
        _min_age: Duration,
    ) -> Result<usize, BlobError> {
        // Its blobs are the job directories the service sweeps.
        Ok(0)
    }
}
