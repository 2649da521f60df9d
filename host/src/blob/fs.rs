//! [`BlobStore`] on the local filesystem: today's layout of
//! `<data>/jobs/<id>/` (`inputs/in-<name>`, `inputs/stdin`, `outputs/`).

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use super::{BlobError, BlobStore, OutputReader};
use crate::job::OutputFile;
use crate::sandbox::JobInput;
use crate::sandbox::beneath::{Root, fd_path};
use crate::store::JobStore;

/// Blobs as files under one node's `<data>/jobs`.
#[derive(Debug)]
pub struct FsBlobs {
    jobs_dir: Root,
}

impl FsBlobs {
    /// Blobs under `jobs_dir` (`<data>/jobs`, held open).
    pub fn new(jobs_dir: Root) -> Self {
        Self { jobs_dir }
    }

    /// Job `id`'s directory `sub` (`inputs`, `outputs`), reached from the
    /// jobs directory without a link or a mount on the way; made when
    /// `create`.
    fn job_subdir(&self, id: &str, sub: &str, create: bool) -> std::io::Result<OwnedFd> {
        self.jobs_dir.dir(&Path::new(id).join(sub), create)
    }
}

/// Removes the directory `rel` below `root` if it is empty (reached as
/// [`remove_local`] reaches it).
///
/// # Errors
/// Not empty, or what else the file system says.
pub fn remove_local_if_empty(root: &Root, rel: &str) -> std::io::Result<()> {
    let rel = Path::new(rel);
    let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
        return Ok(());
    };
    let dir = root.dir(parent, false)?;
    Ok(rustix::fs::unlinkat(
        &dir,
        name,
        rustix::fs::AtFlags::REMOVEDIR,
    )?)
}

/// Opens the regular file `name` in `dir` for reading, never through a
/// link or across a mount (`name` may hold directories).
fn open_file_in(dir: &OwnedFd, name: &str) -> std::io::Result<std::fs::File> {
    let file = std::fs::File::from(crate::sandbox::beneath::open_file_in(dir, name)?);
    // Only a regular file is a stored blob: a FIFO or a device put in its
    // place would read as anything, or as nothing.
    if !file.metadata()?.is_file() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{name} is not a regular file"),
        ));
    }
    Ok(file)
}

/// Removes `rel` below `root` (a directory or anything else) on a
/// blocking thread; a missing one is fine. Reached from `root` without a
/// link or a mount on the way, and never across one below
/// ([`crate::sandbox::remove_tree_in`]): what is beneath one is not a
/// job's. A job's outputs can be a tree as large as its policy's
/// `output_files` (which has no ceiling), and removing it takes as long: no
/// async thread spends that while other requests and workers' channels
/// wait for it.
///
/// # Errors
/// What removing it failed with.
pub async fn remove_local(root: &Root, rel: impl Into<PathBuf>) -> std::io::Result<()> {
    let (root, rel) = (root.clone(), rel.into());
    tokio::task::spawn_blocking(move || crate::sandbox::remove_tree_in(&root, &rel))
        .await
        .map_err(std::io::Error::other)?
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
        let result = self.job_subdir(job, "inputs", true).and_then(|dir| {
            let path = fd_path(&dir);
            let write = |name: &str, data: &[u8]| -> std::io::Result<()> {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path.join(name))?;
                f.write_all(data)?;
                f.sync_all()
            };
            inputs
                .iter()
                .try_for_each(|i| write(&format!("in-{}", i.name), &i.data))
                .and_then(|()| stdin.map_or(Ok(()), |data| write("stdin", data)))
                .and_then(|()| std::fs::File::from(dir).sync_all())
        });
        if let Err(e) = result {
            let _ = remove_local(&self.jobs_dir, job).await;
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
        let dir = self.job_subdir(job, "inputs", false);
        let read = |name: &str| -> std::io::Result<Vec<u8>> {
            let dir = dir
                .as_ref()
                .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))?;
            let mut data = Vec::new();
            // No more than its size when opened: a file that grows while
            // it is read is not read without end.
            let file = open_file_in(dir, name)?;
            let size = file.metadata()?.len();
            file.take(size).read_to_end(&mut data)?;
            Ok(data)
        };
        let mut inputs = Vec::with_capacity(names.len());
        for name in names {
            match read(&format!("in-{name}")) {
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
            read("stdin")?.into()
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
        let dir = self.job_subdir(job, "inputs", false);
        let size = |name: &str| -> std::io::Result<u64> {
            let dir = dir
                .as_ref()
                .map_err(|e| std::io::Error::new(e.kind(), e.to_string()))?;
            Ok(open_file_in(dir, name)?.metadata()?.len())
        };
        let mut sizes = Vec::with_capacity(names.len() + 1);
        for name in names {
            sizes.push(
                size(&format!("in-{name}")).map_err(|_| BlobError::MissingInput {
                    job: job.to_owned(),
                    name: name.clone(),
                })?,
            );
        }
        // As `inputs` reads it: stdin that cannot be read is the host's
        // failure, retried, not a missing input.
        sizes.push(if stdin { size("stdin")? } else { 0 });
        Ok(sizes)
    }

    async fn remove_inputs(&self, job: &str) -> Result<(), BlobError> {
        Ok(remove_local(&self.jobs_dir, Path::new(job).join("inputs")).await?)
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
        Ok(remove_local(&self.jobs_dir, Path::new(job).join("outputs")).await?)
    }

    async fn output(
        &self,
        job: &str,
        name: &str,
    ) -> Result<Option<(OutputReader, u64)>, BlobError> {
        let Ok(file) = self
            .job_subdir(job, "outputs", false)
            .and_then(|dir| open_file_in(&dir, name))
        else {
            return Ok(None);
        };
        let meta = file.metadata()?;
        // A copy this service made has one name; a second is a hard link
        // someone put there to another file.
        if !meta.is_file() || std::os::unix::fs::MetadataExt::nlink(&meta) != 1 {
            return Ok(None);
        }
        Ok(Some((OutputReader::File(file), meta.len())))
    }

    async fn remove_job(&self, job: &str) -> Result<(), BlobError> {
        Ok(remove_local(&self.jobs_dir, job).await?)
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
