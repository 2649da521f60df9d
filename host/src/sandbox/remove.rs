//! Removing a directory tree a guest or a worker built, whatever its shape.
//!
//! `std::fs::remove_dir_all` descends one stack frame and one descriptor
//! per level: a tree a few tens of thousands of directories deep (cheap to
//! make with `mkdirat`/`openat`, no path ever long) overflows the
//! remover's stack or its descriptor limit, which in the gateway is a
//! crash of the service, and at its next start a refusal to start.
//! [`remove_tree`] holds at most three descriptors and no recursion.
//!
//! Nor does it cross a mount: a directory mounted at or inside the tree (a
//! bind mount of another service's directory, made by someone with the
//! rights to) is another file system's, and emptying it would remove what
//! this service never made. Each directory is opened with
//! `RESOLVE_NO_XDEV`, and a mount met is an error, leaving the mount and
//! everything beneath it as it was.
//!
//! Nor does it remove, empty or move a directory in which another process
//! holds a lock file ([`DIR_LOCK`], [`CACHE_LOCK`]): a running service's
//! data, work or cache directory, put inside the tree by someone who
//! could (from a mount namespace of their own, where no check by path
//! sees it), is left as it was. The lock is asked of the file itself, by
//! descriptor, so no path or namespace hides it.

use std::ffi::CString;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use rustix::fs::{AtFlags, Dir, Mode, OFlags, RenameFlags};

use super::beneath::{Root, open_dir_in};
use rustix::io::Errno;

/// The lock file a running Bulkhead process holds exclusively in its data
/// and work directories.
pub const DIR_LOCK: &str = "bulkhead.lock";

/// The lock file every service using a module cache holds shared in it.
pub const CACHE_LOCK: &str = "bulkhead-cache.lock";

/// Most entries [`remove_tree`] moves or removes before giving up (a tree
/// still growing while it is removed).
const MAX_STEPS: u64 = 100_000_000;

/// Removes `path` and everything beneath it, never following a link: a
/// file or link at `path` is unlinked; a directory is emptied by moving the
/// contents of each subdirectory up into it (`renameat` with
/// `RENAME_NOREPLACE`, under fresh names), so the tree flattens as it goes,
/// then removed. Missing is not an error.
///
/// The path up to `path`'s parent is the caller's (a configured
/// directory, which may be reached through a link): [`remove_tree_in`]
/// with that parent as the root.
///
/// # Errors
/// What the file system says; a mount at `path` or inside it (nothing
/// across it is touched); a directory at or inside it holding a lock file
/// another process holds (it and what is in it are left); a `path` that
/// names no entry (`..`); or a tree that keeps growing past
/// [`MAX_STEPS`].
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let root = match Root::open(parent) {
        Ok(root) => root,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    match path.file_name() {
        Some(name) => remove_tree_in(&root, Path::new(name)),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no entry to remove", path.display()),
        )),
    }
}

/// Removes `rel` below `root`, as [`remove_tree`] does, reaching it from
/// `root`'s descriptor one name at a time: a link or a mount anywhere
/// below `root` on the way to it (a job's directory in `<data>/jobs`
/// replaced by one) is refused, and nothing through it is touched.
///
/// # Errors
/// As [`remove_tree`]; a link or a mount on the way.
pub fn remove_tree_in(root: &Root, rel: &Path) -> io::Result<()> {
    remove_tree_but(root, rel, &[])
}

/// [`remove_tree_in`], the lock files open in `own` (this process's
/// locks, hard-linked in the tree) not counted as another's.
///
/// # Errors
/// As [`remove_tree_in`].
pub fn remove_tree_but(root: &Root, rel: &Path, own: &[&std::fs::File]) -> io::Result<()> {
    let path = root.path().join(rel);
    let Some(name) = rel.file_name() else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} names no entry to remove", path.display()),
        ));
    };
    let above = match root.dir(rel.parent().unwrap_or(Path::new("")), false) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let top = match open_dir_in(&above, name) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(Errno::NOTDIR | Errno::LOOP) => {
            return match rustix::fs::unlinkat(&above, name, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => Ok(()),
                Err(e) => Err(e.into()),
            };
        }
        Err(Errno::XDEV) => return Err(mounted(&path, "is a mount point")),
        Err(e) => return Err(e.into()),
    };
    let path = path.as_path();
    if let Some(at) = held_within(&top, own)? {
        return Err(held_refusal(&if at.as_os_str().is_empty() {
            path.to_owned()
        } else {
            path.join(at)
        }));
    }
    let mut steps = 0u64;
    let mut hoisted = 0u64;
    loop {
        let entries = names(&top)?;
        if entries.is_empty() {
            break;
        }
        for name in entries {
            steps += 1;
            if steps > MAX_STEPS {
                return Err(io::Error::other(format!(
                    "{} keeps growing while it is removed",
                    path.display()
                )));
            }
            match rustix::fs::unlinkat(&top, &name, AtFlags::empty()) {
                Ok(()) | Err(Errno::NOENT) => continue,
                Err(Errno::ISDIR | Errno::PERM) => {}
                Err(e) => return Err(e.into()),
            }
            match rustix::fs::unlinkat(&top, &name, AtFlags::REMOVEDIR) {
                Ok(()) | Err(Errno::NOENT) => continue,
                Err(Errno::NOTEMPTY | Errno::EXIST) => {}
                Err(Errno::BUSY) => return Err(mounted(path, "holds a mount point")),
                Err(e) => return Err(e.into()),
            }
            let sub = match open_dir_in(&top, &name) {
                Ok(fd) => fd,
                Err(Errno::XDEV) => return Err(mounted(path, "holds a mount point")),
                Err(Errno::ACCESS) => {
                    // A directory its owner closed to itself (mode 000);
                    // reopened after, still without following a link or
                    // crossing a mount.
                    let Ok(fd) = rustix::fs::openat2(
                        &top,
                        &name,
                        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
                        super::beneath::RESOLVE,
                    ) else {
                        continue;
                    };
                    let proc_path =
                        format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&fd));
                    rustix::fs::chmod(proc_path.as_str(), Mode::from_raw_mode(0o700))?;
                    continue;
                }
                Err(Errno::NOENT | Errno::NOTDIR | Errno::LOOP) => continue,
                Err(e) => return Err(e.into()),
            };
            // Neither emptied nor moved: a directory another process holds
            // (all were looked for before; one put there since is met
            // here, before its entries move up).
            refuse_held(&sub, path, own)?;
            for inner in names(&sub)? {
                loop {
                    hoisted += 1;
                    let fresh = CString::new(format!(".removing-{hoisted}"))
                        .expect("no NUL in a formatted number");
                    match rustix::fs::renameat_with(
                        &sub,
                        &inner,
                        &top,
                        &fresh,
                        RenameFlags::NOREPLACE,
                    ) {
                        Ok(()) | Err(Errno::NOENT) => break,
                        Err(Errno::EXIST) => {}
                        // A mount point is never moved.
                        Err(Errno::BUSY) => return Err(mounted(path, "holds a mount point")),
                        Err(e) => return Err(e.into()),
                    }
                }
            }
            match rustix::fs::unlinkat(&top, &name, AtFlags::REMOVEDIR) {
                Ok(()) | Err(Errno::NOENT | Errno::NOTEMPTY) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    drop(top);
    match rustix::fs::unlinkat(&above, name, AtFlags::REMOVEDIR) {
        Ok(()) | Err(Errno::NOENT) => Ok(()),
        Err(Errno::BUSY) => Err(mounted(path, "is a mount point")),
        Err(e) => Err(e.into()),
    }
}

/// Refuses the removal of `path` when the directory `dir` holds a lock
/// file another open file holds (but those of `own`).
fn refuse_held(dir: &OwnedFd, path: &Path, own: &[&std::fs::File]) -> io::Result<()> {
    for lock in [DIR_LOCK, CACHE_LOCK] {
        if held_in(dir, lock, own)? {
            return Err(held_refusal(path));
        }
    }
    Ok(())
}

/// The refusal to remove a directory another process holds.
fn held_refusal(path: &Path) -> io::Error {
    io::Error::other(format!(
        "{} is held by another process (a lock file in it is, a running service's): it is not removed, nor what is around it",
        path.display()
    ))
}

/// Whether `lock` in the directory `dir` is a lock file another open file
/// holds ([`held`]), and not one of `own` (the same file, by device and
/// inode); opened without following a link or crossing a mount.
fn held_in(dir: &OwnedFd, lock: &str, own: &[&std::fs::File]) -> io::Result<bool> {
    match super::beneath::open_file_in(dir, lock) {
        Ok(file) => {
            let found = rustix::fs::fstat(&file)?;
            for mine in own {
                let mine = rustix::fs::fstat(mine)?;
                if (mine.st_dev, mine.st_ino) == (found.st_dev, found.st_ino) {
                    return Ok(false);
                }
            }
            held(&file, lock)
        }
        // Missing, a link, across a mount, closed to this process, or a
        // socket or device (no file to open): no lock.
        Err(
            Errno::NOENT
            | Errno::NOTDIR
            | Errno::LOOP
            | Errno::XDEV
            | Errno::ACCESS
            | Errno::NXIO
            | Errno::NODEV,
        ) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The first directory in the tree at `top` (`top` itself included)
/// with a lock file another process holds (not one of `own`), as a path
/// relative to `top`.
/// Walked with two descriptors whatever its depth (down by name, never
/// through a link or across a mount, back up by `..`); a lock file is
/// opened only where the listing names one.
///
/// # Errors
/// What the file system says; a tree past [`MAX_STEPS`] entries.
pub fn held_within(
    top: &OwnedFd,
    own: &[&std::fs::File],
) -> io::Result<Option<std::path::PathBuf>> {
    held_within_but(top, &[], own)
}

/// [`held_within`], not looking into the entries of `top` named in
/// `skip` (a data directory's `jobs`, looked into as the orphan sweep
/// comes to each).
///
/// # Errors
/// As [`held_within`].
pub fn held_within_but(
    top: &OwnedFd,
    skip: &[&str],
    own: &[&std::fs::File],
) -> io::Result<Option<std::path::PathBuf>> {
    let mut cur = rustix::io::fcntl_dupfd_cloexec(top, 0)?;
    let mut path = std::path::PathBuf::new();
    // Per level, from `top` to `cur`: the subdirectories not yet walked.
    let mut todo: Vec<Vec<CString>> = Vec::new();
    let mut steps = 0u64;
    loop {
        let mut subdirs = Vec::new();
        for entry in Dir::read_from(&cur)? {
            let entry = entry?;
            let name = entry.file_name();
            steps += 1;
            if steps > MAX_STEPS {
                return Err(io::Error::other("too many entries to look through"));
            }
            match entry.file_type() {
                rustix::fs::FileType::Directory | rustix::fs::FileType::Unknown
                    if name.to_bytes() != b"."
                        && name.to_bytes() != b".."
                        && !(todo.is_empty()
                            && skip.iter().any(|s| s.as_bytes() == name.to_bytes())) =>
                {
                    subdirs.push(name.to_owned());
                }
                _ => {}
            }
            for lock in [DIR_LOCK, CACHE_LOCK] {
                if name.to_bytes() == lock.as_bytes() && held_in(&cur, lock, own)? {
                    return Ok(Some(path));
                }
            }
        }
        todo.push(subdirs);
        // The next directory to look in: down into one not yet walked, or
        // up and on.
        loop {
            let Some(level) = todo.last_mut() else {
                return Ok(None);
            };
            if let Some(name) = level.pop() {
                match open_dir_in(&cur, &name) {
                    Ok(fd) => {
                        cur = fd;
                        path.push(std::ffi::OsStr::from_bytes(name.to_bytes()));
                        break;
                    }
                    Err(
                        Errno::NOENT | Errno::NOTDIR | Errno::LOOP | Errno::XDEV | Errno::ACCESS,
                    ) => {}
                    Err(e) => return Err(e.into()),
                }
            } else {
                todo.pop();
                if todo.is_empty() {
                    return Ok(None);
                }
                cur = rustix::fs::openat(&cur, "..", OPEN_UP, Mode::empty())?;
                path.pop();
            }
        }
    }
}

/// How [`held_within`] goes back up.
const OPEN_UP: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC);

/// Whether the lock file `file` (named `lock`, [`DIR_LOCK`] or
/// [`CACHE_LOCK`]) is held through another open file: asked without
/// waiting, by a hold that cannot be had beside the holder's (shared
/// beside an exclusive [`DIR_LOCK`], exclusive beside a shared
/// [`CACHE_LOCK`]), let go of at once. Not a regular file: not a lock.
///
/// # Errors
/// What the file system says.
pub fn held(file: &impl std::os::fd::AsFd, lock: &str) -> io::Result<bool> {
    if rustix::fs::FileType::from_raw_mode(rustix::fs::fstat(file)?.st_mode)
        != rustix::fs::FileType::RegularFile
    {
        return Ok(false);
    }
    let test = if lock == CACHE_LOCK {
        rustix::fs::FlockOperation::NonBlockingLockExclusive
    } else {
        rustix::fs::FlockOperation::NonBlockingLockShared
    };
    match rustix::fs::flock(file, test) {
        Ok(()) => {
            rustix::fs::flock(file, rustix::fs::FlockOperation::Unlock)?;
            Ok(false)
        }
        Err(Errno::WOULDBLOCK) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

/// The refusal to remove across a mount.
fn mounted(path: &Path, what: &str) -> io::Error {
    io::Error::other(format!(
        "{} {what}: not removed across it (a mount is another file system's)",
        path.display()
    ))
}

/// The names in the directory `fd`, but `.` and `..`.
pub(crate) fn names(fd: &OwnedFd) -> io::Result<Vec<CString>> {
    let mut out = Vec::new();
    for entry in Dir::read_from(fd)? {
        let entry = entry?;
        let name = entry.file_name();
        if name.to_bytes() != b"." && name.to_bytes() != b".." {
            out.push(name.to_owned());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::CWD;

    const OPEN_DIR: OFlags = OFlags::RDONLY
        .union(OFlags::DIRECTORY)
        .union(OFlags::NOFOLLOW)
        .union(OFlags::CLOEXEC);

    /// Deeper than any stack or descriptor limit a recursive remover has:
    /// made level by level relative to the last, as a guest or worker can.
    #[test]
    fn a_tree_deeper_than_any_recursion_is_removed() {
        let tmp = tempfile::tempdir().unwrap();
        let top = tmp.path().join("deep");
        std::fs::create_dir(&top).unwrap();
        let mut dir = rustix::fs::openat(CWD, &top, OPEN_DIR, Mode::empty()).unwrap();
        for i in 0..40_000 {
            rustix::fs::mkdirat(&dir, "d", Mode::from_raw_mode(0o700)).unwrap();
            if i % 1000 == 0 {
                std::fs::write(
                    format!("/proc/self/fd/{}/f", std::os::fd::AsRawFd::as_raw_fd(&dir)),
                    b"x",
                )
                .unwrap();
            }
            dir = rustix::fs::openat(&dir, "d", OPEN_DIR, Mode::empty()).unwrap();
        }
        drop(dir);
        // A link out of the tree: removed, never followed.
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("keep"), b"keep").unwrap();
        std::os::unix::fs::symlink(&outside, top.join("link")).unwrap();
        remove_tree(&top).unwrap();
        assert!(!top.exists());
        assert_eq!(std::fs::read(outside.join("keep")).unwrap(), b"keep");
        // Missing, or a file: fine.
        remove_tree(&top).unwrap();
        std::fs::write(&top, b"f").unwrap();
        remove_tree(&top).unwrap();
        assert!(!top.exists());
    }

    /// Where the child of [`a_mount_at_or_inside_the_tree_is_not_crossed`]
    /// finds its directories.
    const MOUNTED: &str = "BULKHEAD_TEST_REMOVE_MOUNTED";

    /// A directory bind-mounted at the tree's top, inside it, or on the way
    /// to it from its root, is left whole: the removal is refused. Made in a mount namespace of a child
    /// of this test binary (`unshare`), which runs the test again with the
    /// mounts in place; this side checks what the child left.
    #[test]
    fn a_mount_at_or_inside_the_tree_is_not_crossed() {
        if let Ok(dir) = std::env::var(MOUNTED) {
            let dir = Path::new(&dir);
            let at_top = remove_tree(&dir.join("top")).unwrap_err();
            assert!(at_top.to_string().contains("is a mount point"), "{at_top}");
            let inside = remove_tree(&dir.join("around")).unwrap_err();
            assert!(
                inside.to_string().contains("holds a mount point"),
                "{inside}"
            );
            // Below a mount on the way from the root (a job's directory
            // mounted over, its inputs removed): refused, and a start's
            // check of its jobs directory sees the mount too.
            let below =
                remove_tree_in(&Root::open(dir).unwrap(), Path::new("top/sub")).unwrap_err();
            assert!(
                below.to_string().contains("crosses a mount point"),
                "{below}"
            );
            let jobs = super::super::beneath::open_beneath(dir, Path::new("top"), false);
            assert!(jobs.is_err_and(|e| e.to_string().contains("crosses a mount point")));
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::create_dir_all(victim.join("sub")).unwrap();
        std::fs::write(victim.join("keep"), b"keep").unwrap();
        std::fs::write(victim.join("sub").join("keep"), b"keep").unwrap();
        for dir in ["top", "around/a/inner", "around/b"] {
            std::fs::create_dir_all(tmp.path().join(dir)).unwrap();
        }
        std::fs::write(tmp.path().join("around/b/mine"), b"mine").unwrap();
        crate::rerun_with_binds(
            "sandbox::remove::tests::a_mount_at_or_inside_the_tree_is_not_crossed",
            MOUNTED,
            tmp.path(),
            &[("victim", "top"), ("victim", "around/a/inner")],
        );
        // Host side: everything beneath the mounts is still there.
        assert_eq!(std::fs::read(victim.join("keep")).unwrap(), b"keep");
        assert_eq!(std::fs::read(victim.join("sub/keep")).unwrap(), b"keep");
    }

    /// A directory in which another process holds a lock file (a running
    /// service's data or cache directory) is neither emptied nor moved,
    /// at the tree's top or at any depth in it, nor is anything around it
    /// removed; a lock file no one holds is no obstacle, and once let go
    /// of, the tree goes.
    #[test]
    fn a_directory_another_process_holds_is_left_whole() {
        let tmp = tempfile::tempdir().unwrap();
        for (at, lock, exclusive) in [
            ("top", DIR_LOCK, true),
            ("a/held", DIR_LOCK, true),
            ("a/b/held", CACHE_LOCK, false),
            ("a/b/c/d/e/held", DIR_LOCK, true),
        ] {
            let top = tmp.path().join(at.replace('/', "-"));
            std::fs::create_dir_all(top.join("mine/sub")).unwrap();
            std::fs::write(top.join("mine/sub/file"), b"mine").unwrap();
            let held_dir = if at == "top" {
                top.clone()
            } else {
                top.join(at)
            };
            let held = crate::LockHolder::new(&held_dir, lock, exclusive);
            let err = remove_tree(&top).unwrap_err().to_string();
            assert!(err.contains("is held by another process"), "{at}: {err}");
            assert_eq!(
                std::fs::read(held_dir.join("store")).unwrap(),
                b"theirs",
                "{at}"
            );
            assert!(held_dir.join(lock).is_file(), "{at}");
            assert_eq!(
                std::fs::read(top.join("mine/sub/file")).unwrap(),
                b"mine",
                "{at}: nothing around it goes"
            );
            drop(held);
            remove_tree(&top).unwrap();
            assert!(!top.exists(), "{at}");
        }
        // A lock file no one holds.
        let top = tmp.path().join("free");
        std::fs::create_dir_all(top.join("a/b")).unwrap();
        std::fs::write(top.join("a/b").join(DIR_LOCK), b"").unwrap();
        std::fs::write(top.join("a").join(CACHE_LOCK), b"").unwrap();
        // Nor is what is no file: a socket, a FIFO, a directory, a link.
        std::fs::create_dir_all(top.join("s/f/d/l")).unwrap();
        let _socket = std::os::unix::net::UnixListener::bind(top.join("s").join(DIR_LOCK)).unwrap();
        rustix::fs::mknodat(
            CWD,
            top.join("s/f").join(DIR_LOCK),
            rustix::fs::FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        std::fs::create_dir(top.join("s/f/d").join(DIR_LOCK)).unwrap();
        std::os::unix::fs::symlink("/", top.join("s/f/d/l").join(CACHE_LOCK)).unwrap();
        remove_tree(&top).unwrap();
        assert!(!top.exists());
    }
}
