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

use std::ffi::CString;
use std::io;
use std::path::Path;

use rustix::fs::{AtFlags, Dir, Mode, OFlags, RenameFlags};

use super::beneath::{Root, open_dir_in};
use rustix::io::Errno;

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
/// across it is touched); a `path` that names no entry (`..`); or a tree
/// that keeps growing past [`MAX_STEPS`].
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

/// The refusal to remove across a mount.
fn mounted(path: &Path, what: &str) -> io::Error {
    io::Error::other(format!(
        "{} {what}: not removed across it (a mount is another file system's)",
        path.display()
    ))
}

/// The names in the directory `fd`, but `.` and `..`.
fn names(fd: &std::os::fd::OwnedFd) -> io::Result<Vec<CString>> {
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
        let script = "mount --bind \"$1/victim\" \"$1/top\" && \
            mount --bind \"$1/victim\" \"$1/around/a/inner\" && \
            exec \"$0\" --exact --test-threads=1 --nocapture \
            sandbox::remove::tests::a_mount_at_or_inside_the_tree_is_not_crossed";
        let status = std::process::Command::new("unshare")
            .args(["--map-root-user", "--mount", "sh", "-c", script])
            .arg(std::env::current_exe().unwrap())
            .arg(tmp.path())
            .env(MOUNTED, tmp.path())
            .status()
            .expect("unshare(1) runs");
        assert!(status.success(), "the child in a mount namespace: {status}");
        // Host side: everything beneath the mounts is still there.
        assert_eq!(std::fs::read(victim.join("keep")).unwrap(), b"keep");
        assert_eq!(std::fs::read(victim.join("sub/keep")).unwrap(), b"keep");
    }
}
