//! Reaching a directory below a configured root by descriptors, one name
//! at a time, never through a link and never across a mount: what is
//! below `<data>/jobs` or a work directory is this service's, and someone
//! who can write there (a link or a bind mount at a job's directory) must
//! not make the service write, read or remove another's files through it.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use rustix::fs::{CWD, Mode, OFlags, ResolveFlags};
use rustix::io::Errno;

/// How every name below a root is resolved: never through a link, never
/// across a mount, never above where it starts.
pub const RESOLVE: ResolveFlags = ResolveFlags::NO_XDEV
    .union(ResolveFlags::NO_SYMLINKS)
    .union(ResolveFlags::NO_MAGICLINKS)
    .union(ResolveFlags::BENEATH);

const OPEN_DIR: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// A directory held open: everything below it is reached from this
/// descriptor, whatever is later put at its path (a link, a mount). Its
/// own path is for messages only. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Root(Arc<Held>);

#[derive(Debug)]
struct Held {
    fd: OwnedFd,
    path: PathBuf,
}

impl Root {
    /// Opens `path`, which is the caller's (a configured directory, which
    /// may be reached through a link or be a mount).
    ///
    /// # Errors
    /// What the file system says.
    pub fn open(path: &Path) -> io::Result<Self> {
        let fd = rustix::fs::openat(
            CWD,
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self(Arc::new(Held {
            fd,
            path: path.to_owned(),
        })))
    }

    /// The directory `rel` below this one, held as a root of its own:
    /// reached as [`Root::dir`] reaches it.
    ///
    /// # Errors
    /// As [`Root::dir`].
    pub fn below(&self, rel: &Path) -> io::Result<Self> {
        Ok(Self(Arc::new(Held {
            fd: self.dir(rel, false)?,
            path: self.0.path.join(rel),
        })))
    }

    /// [`Root::below`], each missing directory on the way made as
    /// [`Root::dir`] makes it.
    ///
    /// # Errors
    /// As [`Root::dir`].
    pub fn made_below(&self, rel: &Path) -> io::Result<Self> {
        Ok(Self(Arc::new(Held {
            fd: self.dir(rel, true)?,
            path: self.0.path.join(rel),
        })))
    }

    /// The directory `rel` below this one, opened from its descriptor one
    /// name at a time with [`RESOLVE`]; with `create`, each missing
    /// directory on the way is made (mode 0700). An empty `rel` is this
    /// directory.
    ///
    /// # Errors
    /// `NotFound` for a missing directory (without `create`); a link or a
    /// mount on the way, named; a `rel` that is not plain names; what the
    /// file system says.
    pub fn dir(&self, rel: &Path, create: bool) -> io::Result<OwnedFd> {
        let mut dir: Option<OwnedFd> = None;
        for component in rel.components() {
            let Component::Normal(name) = component else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} is not a plain path below {}",
                        rel.display(),
                        self.0.path.display()
                    ),
                ));
            };
            let base = dir.as_ref().unwrap_or(&self.0.fd);
            if create {
                match rustix::fs::mkdirat(base, name, Mode::from_raw_mode(0o700)) {
                    Ok(()) | Err(Errno::EXIST) => {}
                    Err(e) => return Err(self.refusal(rel, e)),
                }
            }
            dir = Some(open_dir_in(base, name).map_err(|e| self.refusal(rel, e))?);
        }
        match dir {
            Some(dir) => Ok(dir),
            None => Ok(rustix::io::fcntl_dupfd_cloexec(&self.0.fd, 0)?),
        }
    }

    /// The directory this one is in now (its `..`), held as a root of its
    /// own, and this one's name there (from its path).
    ///
    /// # Errors
    /// What the file system says; `InvalidInput` for a path with no name.
    pub fn parent(&self) -> io::Result<(Self, std::ffi::OsString)> {
        let name = self
            .0
            .path
            .file_name()
            .map(ToOwned::to_owned)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{} names no entry", self.0.path.display()),
                )
            })?;
        let fd = rustix::fs::openat(&self.0.fd, "..", OPEN_DIR, Mode::empty())?;
        let path = self.0.path.parent().unwrap_or(Path::new("/")).to_owned();
        Ok((Self(Arc::new(Held { fd, path })), name))
    }

    /// This directory's descriptor.
    pub fn fd(&self) -> &OwnedFd {
        &self.0.fd
    }

    /// The path it was opened by, or below which it was found: for
    /// messages.
    pub fn path(&self) -> &Path {
        &self.0.path
    }

    fn refusal(&self, rel: &Path, e: Errno) -> io::Error {
        let at = self.0.path.join(rel);
        match e {
            Errno::XDEV => io::Error::other(format!(
                "{} crosses a mount point: not followed (a mount is another file system's)",
                at.display()
            )),
            // A link opened as a directory without following it is "not a
            // directory".
            Errno::LOOP | Errno::NOTDIR => io::Error::other(format!(
                "{} is reached through a link or a file: not followed",
                at.display()
            )),
            e => io::Error::from(e),
        }
    }
}

/// The directory `rel` below `root`, [`Root::open`] then [`Root::dir`].
///
/// # Errors
/// As those.
pub fn open_beneath(root: &Path, rel: &Path, create: bool) -> io::Result<OwnedFd> {
    Root::open(root)?.dir(rel, create)
}

/// The directory `name` in `dir`, opened with [`RESOLVE`].
///
/// # Errors
/// `EXDEV` at a mount, `ELOOP` at a link, `ENOTDIR`, what else the file
/// system says.
pub fn open_dir_in<P: rustix::path::Arg>(
    dir: impl std::os::fd::AsFd,
    name: P,
) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat2(dir, name, OPEN_DIR, Mode::empty(), RESOLVE)
}

/// The file `name` in `dir` (`name` may hold directories), opened for
/// reading with [`RESOLVE`], without waiting (a FIFO put there).
///
/// # Errors
/// `EXDEV` at a mount, `ELOOP` at a link, what else the file system says.
pub fn open_file_in<P: rustix::path::Arg>(
    dir: impl std::os::fd::AsFd,
    name: P,
) -> rustix::io::Result<OwnedFd> {
    const OPEN_FILE: OFlags = OFlags::RDONLY
        .union(OFlags::NOFOLLOW)
        .union(OFlags::NONBLOCK)
        .union(OFlags::CLOEXEC);
    rustix::fs::openat2(dir, name, OPEN_FILE, Mode::empty(), RESOLVE)
}

/// A path naming the directory `fd` holds open, for code that takes
/// paths: every name below it is looked up from that very directory,
/// whatever has since been put in its place.
pub fn fd_path(fd: &OwnedFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_on_the_way_is_refused_and_plain_names_are_made() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("jobs");
        let made = open_beneath(tmp.path(), Path::new("jobs/a/outputs"), true).unwrap();
        std::fs::write(fd_path(&made).join("f"), b"f").unwrap();
        assert_eq!(std::fs::read(root.join("a/outputs/f")).unwrap(), b"f");
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, root.join("b")).unwrap();
        for (rel, refusal) in [
            ("b/outputs", "through a link"),
            ("../elsewhere", "not a plain path"),
        ] {
            let err = open_beneath(&root, Path::new(rel), true).unwrap_err();
            assert!(err.to_string().contains(refusal), "{rel}: {err}");
        }
        assert!(!elsewhere.join("outputs").exists());
        assert_eq!(
            open_beneath(&root, Path::new("c"), false)
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
    }
}
