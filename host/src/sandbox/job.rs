//! A job's compartment on disk ([`JobDir`]).
//!
//! A job directory holds `in/` (the inputs, preopened read-only as `/in`) and
//! `out/` (preopened writable as `/out`). It is created fresh for every job
//! under a root only the host uses, and removed when dropped.

use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::job::JobInput;

/// Creates `path` and any missing parents with mode 0700: directories only
/// this host's user may enter (job directories, the module cache, the
/// service's data).
///
/// # Errors
/// Any I/O error creating them.
pub fn create_private_dir_all(path: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

/// A job's directories on the host: `<work>/<id>.out`, preopened writable
/// as `/out`, and — only when the job has inputs — `<work>/<id>.in`,
/// preopened read-only as `/in`. A job without inputs sees
/// `<work>/.empty-in` as `/in`: one directory shared by such jobs, created
/// empty with mode 0500 and preopened read-only, so no job can put anything
/// in it for another to find. Removed, with everything the guest left, on
/// drop: on the thread that drops it, or — after
/// [`JobDir::removed_on`] — on a runtime's blocking threads.
pub struct JobDir {
    out: PathBuf,
    own_input: PathBuf,
    shared_input: PathBuf,
    has_inputs: std::sync::atomic::AtomicBool,
    /// `/out` was found empty and removed ([`JobDir::remove_output_if_empty`]).
    out_removed: std::sync::atomic::AtomicBool,
    /// Where a tree left behind is removed ([`JobDir::removed_on`]).
    remover: Option<tokio::runtime::Handle>,
    /// Told once what was there is removed ([`JobDir::then_removed`]).
    on_removed: std::sync::Mutex<Option<Box<dyn FnOnce() + Send>>>,
    /// The files the job created in `/out`, once its guest has ended: the
    /// only ones collected.
    created: std::sync::Mutex<super::outputs::Created>,
    /// The input files written for the job: with the files it creates,
    /// the only ones its guest may read.
    inputs: std::sync::Mutex<super::outputs::Created>,
}

impl std::fmt::Debug for JobDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobDir")
            .field("out", &self.out)
            .field("own_input", &self.own_input)
            .finish_non_exhaustive()
    }
}

/// Name of the shared empty input directory inside a work directory.
const EMPTY_INPUT: &str = ".empty-in";

impl JobDir {
    /// Creates `<parent>/<id>.out` (mode 0700), and the shared empty input
    /// directory if missing. Fails if the job's directory already exists: a
    /// job never inherits another's leftovers.
    ///
    /// # Errors
    /// Any I/O error creating the directories, or a shared input directory
    /// that is not empty.
    pub fn create(parent: &Path, id: &str) -> io::Result<Self> {
        let shared_input = parent.join(EMPTY_INPUT);
        // The common case is one `mkdir` per job: the parent and the shared
        // input directory exist after the first job.
        let out = parent.join(format!("{id}.out"));
        let mut builder = std::fs::DirBuilder::new();
        builder.mode(0o700);
        match builder.create(&out) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                create_private_dir_all(parent)?;
                builder.create(&out)?;
            }
            Err(e) => return Err(e),
        }
        let dir = Self {
            own_input: parent.join(format!("{id}.in")),
            out,
            shared_input,
            has_inputs: std::sync::atomic::AtomicBool::new(false),
            out_removed: std::sync::atomic::AtomicBool::new(false),
            remover: None,
            on_removed: std::sync::Mutex::default(),
            created: std::sync::Mutex::default(),
            inputs: std::sync::Mutex::default(),
        };
        dir.ensure_shared_input()?;
        Ok(dir)
    }

    /// Has whatever the job left behind removed on `runtime`'s blocking
    /// threads when this is dropped, never on the dropping thread. A guest
    /// can leave a tree as large as its `output_files` allow, and removing
    /// it takes as long as that: where the drop can happen on an async
    /// thread — a cancelled job's future dropped mid-run, a worker's
    /// channel letting a job go — it would stall every task that thread
    /// serves, other jobs' deadlines among them. An empty `/out` still goes
    /// at once (one `rmdir`).
    #[must_use]
    pub fn removed_on(mut self, runtime: tokio::runtime::Handle) -> Self {
        self.remover = Some(runtime);
        self
    }

    /// Calls `then` once it is removed, where there was anything to remove
    /// when it was dropped (not after [`JobDir::remove_output_if_empty`]
    /// of a job without inputs): a worker tells the gateway, which gives
    /// the job's room back only once its directories are gone.
    #[must_use]
    pub fn then_removed(mut self, then: impl FnOnce() + Send + 'static) -> Self {
        *self
            .on_removed
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Box::new(then));
        self
    }

    /// Removes it and whatever the job left now, on this thread (whatever
    /// [`JobDir::removed_on`] said): for a caller off the async threads
    /// that must not leave it behind, a process about to exit.
    pub fn remove(mut self) {
        self.remover = None;
    }

    /// Makes sure the shared input directory exists (mode 0500).
    fn ensure_shared_input(&self) -> io::Result<()> {
        match std::fs::DirBuilder::new()
            .mode(0o500)
            .create(&self.shared_input)
        {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// `dir`, an entry of the job's parent directory, opened from that
    /// directory never through a link nor across a mount: the directory
    /// made, not what was put at its path since.
    fn open_made(dir: &Path) -> io::Result<std::os::fd::OwnedFd> {
        let (Some(parent), Some(name)) = (dir.parent(), dir.file_name()) else {
            return Err(io::Error::other(format!(
                "{} names no entry",
                dir.display()
            )));
        };
        super::beneath::Root::open(parent)?.dir(Path::new(name), false)
    }

    /// The directory preopened as `/in`, opened as [`JobDir::open_made`]
    /// opens it: the job's own inputs, or the shared input directory,
    /// checked each time to be an empty directory no one may write.
    ///
    /// # Errors
    /// A link or a mount at its path; a shared input directory that is
    /// not empty and read-only; I/O errors.
    pub fn open_input(&self) -> io::Result<std::os::fd::OwnedFd> {
        if self.has_inputs() {
            return Self::open_made(&self.own_input);
        }
        let fd = Self::open_made(&self.shared_input)?;
        let mode = rustix::fs::fstat(&fd)?.st_mode;
        let empty = super::entry_names(&fd)?.is_empty();
        if mode & 0o222 != 0 || !empty {
            return Err(io::Error::other(format!(
                "{} must be an empty read-only directory",
                self.shared_input.display()
            )));
        }
        Ok(fd)
    }

    /// The directory preopened as `/out`, opened as [`JobDir::open_made`]
    /// opens it.
    ///
    /// # Errors
    /// A link or a mount at its path; I/O errors.
    pub fn open_output(&self) -> io::Result<std::os::fd::OwnedFd> {
        Self::open_made(&self.out)
    }

    /// [`JobDir::open_output`] for a collection whose failure the job's
    /// tenant reads: logged in full, and told without host paths.
    ///
    /// # Errors
    /// As [`JobDir::open_output`].
    pub fn open_output_to_collect(&self) -> io::Result<std::os::fd::OwnedFd> {
        self.open_output().map_err(|e| {
            tracing::warn!(error = %e, "cannot open a job's /out to collect it");
            io::Error::new(
                e.kind(),
                "it is not the directory made for the job (a link, a mount or a file put in its place is not followed)",
            )
        })
    }

    /// The directory preopened as `/in` (by path; see [`JobDir::open_input`]).
    pub fn input_dir(&self) -> PathBuf {
        if self.has_inputs.load(std::sync::atomic::Ordering::SeqCst) {
            self.own_input.clone()
        } else {
            self.shared_input.clone()
        }
    }

    /// Records the files the job created in `/out` (see
    /// [`super::outputs::Created`]), for its collection.
    pub fn set_created(&self, created: super::outputs::Created) {
        *self.created.lock().unwrap_or_else(|e| e.into_inner()) = created;
    }

    /// The input files written for the job ([`JobDir::write_inputs`]).
    pub fn inputs(&self) -> super::outputs::Created {
        self.inputs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The files the job created in `/out`, as recorded.
    pub fn created(&self) -> super::outputs::Created {
        self.created
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether the job has its own input directory.
    pub fn has_inputs(&self) -> bool {
        self.has_inputs.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The directory preopened as `/out`.
    pub fn output_dir(&self) -> PathBuf {
        self.out.clone()
    }

    /// Removes `/out` if the job left it empty (one `rmdir`, which fails
    /// on anything inside); whether it did. What else the job has (its
    /// own inputs) goes on drop.
    pub fn remove_output_if_empty(&self) -> bool {
        let removed = std::fs::remove_dir(&self.out).is_ok();
        if removed {
            self.out_removed
                .store(true, std::sync::atomic::Ordering::SeqCst);
        }
        removed
    }

    /// Writes the inputs into the job's own input directory (read-only
    /// files, `create_new`). Without inputs, nothing is created.
    pub(crate) fn write_inputs(&self, inputs: &[JobInput]) -> io::Result<()> {
        use std::io::Write;
        if inputs.is_empty() {
            return Ok(());
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&self.own_input)?;
        self.has_inputs
            .store(true, std::sync::atomic::Ordering::SeqCst);
        // Written into the directory made, whatever is put at its path.
        let dir = Self::open_made(&self.own_input)?;
        for input in inputs {
            let fd = rustix::fs::openat(
                &dir,
                input.name.as_str(),
                rustix::fs::OFlags::WRONLY
                    | rustix::fs::OFlags::CREATE
                    | rustix::fs::OFlags::EXCL
                    | rustix::fs::OFlags::NOFOLLOW
                    | rustix::fs::OFlags::CLOEXEC,
                rustix::fs::Mode::from_raw_mode(0o400),
            )?;
            let mut file = std::fs::File::from(fd);
            file.write_all(&input.data)?;
            let id = super::outputs::FileId::of(&file)?;
            self.inputs
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id);
        }
        Ok(())
    }
}

impl Drop for JobDir {
    fn drop(&mut self) {
        // Fast path: an empty `/out` goes with one `rmdir`. Anything left
        // inside makes it fail, and `remove_tree` (which does not follow
        // symlinks the guest left behind) takes over.
        let mut dirs = Vec::with_capacity(2);
        if !self.out_removed.load(std::sync::atomic::Ordering::SeqCst) {
            dirs.push(&self.out);
        }
        if self.has_inputs.load(std::sync::atomic::Ordering::SeqCst) {
            dirs.push(&self.own_input);
        }
        let then = self
            .on_removed
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take()
            .filter(|_| !dirs.is_empty());
        let trees: Vec<PathBuf> = dirs
            .into_iter()
            .filter(|dir| std::fs::remove_dir(dir).is_err())
            .cloned()
            .collect();
        if trees.is_empty() {
            if let Some(then) = then {
                then();
            }
            return;
        }
        let remove = move || {
            for dir in trees {
                if let Err(e) = super::remove_tree(&dir)
                    && e.kind() != io::ErrorKind::NotFound
                {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot remove job directory");
                }
            }
            if let Some(then) = then {
                then();
            }
        };
        match self.remover.take() {
            Some(runtime) => drop(runtime.spawn_blocking(remove)),
            None => remove(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_dir_with_contents_and_links_is_removed_without_following_them() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tmp.path().join("outside.txt");
        std::fs::write(&outside, b"keep me").unwrap();
        let dir = JobDir::create(&tmp.path().join("jobs"), "j2").unwrap();
        dir.write_inputs(&[JobInput {
            name: "in.txt".into(),
            data: bytes::Bytes::from_static(b"y"),
        }])
        .unwrap();
        std::fs::write(dir.output_dir().join("a"), b"x").unwrap();
        std::os::unix::fs::symlink(&outside, dir.output_dir().join("link")).unwrap();
        let (input, output) = (dir.input_dir(), dir.output_dir());
        assert!(input.ends_with("j2.in"));
        drop(dir);
        assert!(!input.exists() && !output.exists());
        assert_eq!(std::fs::read(&outside).unwrap(), b"keep me");
    }

    /// A tree left in a directory dropped on an async thread — a cancelled
    /// job's — is removed on the runtime's blocking threads, not by the
    /// drop: here the one blocking thread is held, so the tree is still
    /// there when the drop returns, and goes once the thread is free.
    #[test]
    fn a_tree_dropped_on_an_async_thread_is_removed_on_a_blocking_one() {
        let tmp = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(1)
            .build()
            .unwrap();
        let (release, held) = std::sync::mpsc::channel::<()>();
        let (started, holding) = std::sync::mpsc::channel::<()>();
        let holder = runtime.spawn_blocking(move || {
            started.send(()).unwrap();
            let _ = held.recv();
        });
        holding.recv().unwrap();
        let out = runtime.block_on(async {
            let dir = JobDir::create(tmp.path(), "j3")
                .unwrap()
                .removed_on(tokio::runtime::Handle::current());
            let out = dir.output_dir();
            std::fs::create_dir_all(out.join("a/b/c")).unwrap();
            std::fs::write(out.join("a/b/c/f"), b"x").unwrap();
            drop(dir);
            out
        });
        assert!(
            out.join("a/b/c/f").exists(),
            "the drop removed the tree on the async thread"
        );
        release.send(()).unwrap();
        runtime.block_on(async {
            holder.await.unwrap();
            // Queued behind the holder on the one blocking thread: a task
            // queued after it runs once it has.
            tokio::task::spawn_blocking(|| ()).await.unwrap();
        });
        assert!(!out.exists());
    }

    /// An empty `/out` goes at once, whatever thread drops it, and
    /// [`JobDir::remove`] removes a tree on the calling thread.
    #[test]
    fn an_empty_out_and_an_explicit_remove_go_at_once() {
        let tmp = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let handle = runtime.handle().clone();
        let empty = JobDir::create(tmp.path(), "e")
            .unwrap()
            .removed_on(handle.clone());
        let empty_out = empty.output_dir();
        drop(empty);
        assert!(!empty_out.exists());
        let full = JobDir::create(tmp.path(), "f").unwrap().removed_on(handle);
        let full_out = full.output_dir();
        std::fs::write(full_out.join("x"), b"x").unwrap();
        full.remove();
        assert!(!full_out.exists());
    }

    #[test]
    fn job_dir_is_fresh_and_removed_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = JobDir::create(tmp.path(), "j1").unwrap();
        assert!(
            JobDir::create(tmp.path(), "j1").is_err(),
            "ids are never reused"
        );
        let out = dir.output_dir();
        assert!(dir.input_dir().is_dir() && out.is_dir());
        drop(dir);
        assert!(!out.exists());
    }

    #[test]
    fn jobs_without_inputs_share_an_empty_read_only_input_dir() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let a = JobDir::create(tmp.path(), "a").unwrap();
        let b = JobDir::create(tmp.path(), "b").unwrap();
        assert_eq!(a.input_dir(), b.input_dir());
        let meta = std::fs::metadata(a.input_dir()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o500);
        assert!(std::fs::read_dir(a.input_dir()).unwrap().next().is_none());
        drop((a, b));
        assert!(tmp.path().join(EMPTY_INPUT).is_dir(), "shared, so it stays");
    }

    /// What a job is given as `/in` and `/out` is the directory made for
    /// it, checked each time: a shared input directory someone filled, or
    /// a link put in place of it or of `/out`, is refused, not followed.
    #[test]
    fn a_filled_or_replaced_job_directory_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir().unwrap();
        let shared = tmp.path().join(EMPTY_INPUT);
        let dir = JobDir::create(tmp.path(), "c").unwrap();
        dir.open_input().expect("empty and read-only");
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::write(shared.join("leftover"), b"x").unwrap();
        std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o500)).unwrap();
        let err = dir.open_input().unwrap_err().to_string();
        assert!(
            err.contains("must be an empty read-only directory"),
            "{err}"
        );
        // Links in place of the shared input directory and of `/out`.
        let other = tmp.path().join("other");
        std::fs::create_dir(&other).unwrap();
        std::fs::set_permissions(&other, std::fs::Permissions::from_mode(0o500)).unwrap();
        std::fs::rename(&shared, tmp.path().join("aside")).unwrap();
        std::os::unix::fs::symlink(&other, &shared).unwrap();
        let err = dir.open_input().unwrap_err().to_string();
        assert!(err.contains("through a link"), "{err}");
        std::fs::rename(dir.output_dir(), tmp.path().join("out-aside")).unwrap();
        std::os::unix::fs::symlink(&other, dir.output_dir()).unwrap();
        let err = dir.open_output().unwrap_err().to_string();
        assert!(err.contains("through a link"), "{err}");
        std::fs::remove_file(dir.output_dir()).unwrap();
        std::fs::rename(tmp.path().join("out-aside"), dir.output_dir()).unwrap();
    }
}
