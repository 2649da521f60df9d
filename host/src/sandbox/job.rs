//! A job's request ([`JobSpec`]) and its compartment on disk ([`JobDir`]).
//!
//! A job directory holds `in/` (the inputs, preopened read-only as `/in`) and
//! `out/` (preopened writable as `/out`). It is created fresh for every job
//! under a root only the host uses, and removed when dropped.

use std::collections::BTreeMap;
use std::io;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;

/// Most input files one job may have.
pub const MAX_INPUTS: usize = 64;
/// Longest parameter value, in bytes.
pub const MAX_PARAM_VALUE: usize = 4096;

/// One named input file.
#[derive(Clone, Debug)]
pub struct JobInput {
    /// File name inside `/in`; see [`validate_input_name`].
    pub name: String,
    /// Content.
    pub data: Bytes,
}

/// Everything a job brings: inputs, parameters, stdin.
#[derive(Clone, Debug, Default)]
pub struct JobSpec {
    /// Identifier used in the report and logs.
    pub id: String,
    /// Files placed in `/in`.
    pub inputs: Vec<JobInput>,
    /// Parameters; each must be listed in the policy's `run.params`.
    pub params: BTreeMap<String, String>,
    /// Bytes readable on stdin.
    pub stdin: Bytes,
}

impl JobSpec {
    /// A spec with a fresh random id and nothing else.
    pub fn new() -> Self {
        Self {
            id: uuid::Uuid::new_v4().to_string(),
            ..Self::default()
        }
    }
}

/// Checks an input file name: 1 to 255 bytes of `A-Z a-z 0-9 . _ -`, not
/// starting with `.`. Names are a flat namespace; there are no
/// subdirectories in `/in`.
///
/// # Errors
/// A message naming the bad value.
pub fn validate_input_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if name.is_empty() || name.len() > 255 || name.starts_with('.') || !ok_chars {
        return Err(format!(
            "invalid input name `{}`: use 1 to 255 characters of A-Z a-z 0-9 . _ -, not starting with `.`",
            name.escape_debug()
        ));
    }
    Ok(())
}

/// A job's directory on the host. Removed, with everything the guest left
/// in it, on drop.
#[derive(Debug)]
pub struct JobDir {
    root: PathBuf,
}

impl JobDir {
    /// Creates `<parent>/<id>/{in,out}` with mode 0700. Fails if the job
    /// directory already exists: a job never inherits another's leftovers.
    ///
    /// # Errors
    /// Any I/O error creating the directories.
    pub fn create(parent: &Path, id: &str) -> io::Result<Self> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)?;
        let root = parent.join(id);
        let mut builder = std::fs::DirBuilder::new();
        builder.mode(0o700);
        builder.create(&root)?;
        let dir = Self { root };
        builder.create(dir.input_dir())?;
        builder.create(dir.output_dir())?;
        Ok(dir)
    }

    /// The directory preopened as `/in`.
    pub fn input_dir(&self) -> PathBuf {
        self.root.join("in")
    }

    /// The directory preopened as `/out`.
    pub fn output_dir(&self) -> PathBuf {
        self.root.join("out")
    }

    /// The job directory itself.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Writes the inputs into `in/` (read-only files, `create_new`).
    pub(crate) fn write_inputs(&self, inputs: &[JobInput]) -> io::Result<()> {
        use std::io::Write;
        let dir = self.input_dir();
        for input in inputs {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o400)
                .open(dir.join(&input.name))?;
            f.write_all(&input.data)?;
        }
        Ok(())
    }
}

impl Drop for JobDir {
    fn drop(&mut self) {
        // Fast path for the common empty case: three `rmdir`s instead of a
        // directory walk. Anything left inside makes one of them fail, and
        // `remove_dir_all` (which does not follow symlinks the guest left
        // behind) takes over.
        let empty = std::fs::remove_dir(self.input_dir()).is_ok()
            && std::fs::remove_dir(self.output_dir()).is_ok()
            && std::fs::remove_dir(&self.root).is_ok();
        if empty {
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.root) {
            tracing::warn!(dir = %self.root.display(), error = %e, "cannot remove job directory");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn input_names_are_flat_and_plain() {
        assert!(validate_input_name("photo.PNG").is_ok());
        for bad in ["", ".hidden", "../x", "a/b", "a\0b", "ünï"] {
            assert!(validate_input_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_job_dir_with_contents_and_links_is_removed_without_following_them() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside.txt");
        std::fs::write(&outside, b"keep me").unwrap();
        let dir = JobDir::create(&tmp.path().join("jobs"), "j2").unwrap();
        std::fs::write(dir.output_dir().join("a"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, dir.output_dir().join("link")).unwrap();
        std::fs::write(dir.input_dir().join("in"), b"y").unwrap();
        let path = dir.path().to_owned();
        drop(dir);
        assert!(!path.exists());
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep me");
    }

    #[test]
    fn job_dir_is_fresh_and_removed_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = JobDir::create(tmp.path(), "j1").unwrap();
        assert!(
            JobDir::create(tmp.path(), "j1").is_err(),
            "ids are never reused"
        );
        let path = dir.path().to_owned();
        assert!(dir.input_dir().is_dir() && dir.output_dir().is_dir());
        drop(dir);
        assert!(!path.exists());
    }
}
