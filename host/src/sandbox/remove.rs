//! Removing a directory tree a guest or a worker built, whatever its shape.
//!
//! `std::fs::remove_dir_all` descends one stack frame and one descriptor
//! per level: a tree a few tens of thousands of directories deep (cheap to
//! make with `mkdirat`/`openat`, no path ever long) overflows the
//! remover's stack or its descriptor limit, which in the gateway is a
//! crash of the service, and at its next start a refusal to start.
//! [`remove_tree`] holds at most three descriptors and no recursion.

use std::ffi::CString;
use std::io;
use std::path::Path;

use rustix::fs::{AtFlags, CWD, Dir, Mode, OFlags, RenameFlags};
use rustix::io::Errno;

const OPEN_DIR: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::NOFOLLOW)
    .union(OFlags::CLOEXEC);

/// Most entries [`remove_tree`] moves or removes before giving up (a tree
/// still growing while it is removed).
const MAX_STEPS: u64 = 100_000_000;

/// Removes `path` and everything beneath it, never following a link: a
/// file or link at `path` is unlinked; a directory is emptied by moving the
/// contents of each subdirectory up into it (`renameat` with
/// `RENAME_NOREPLACE`, under fresh names), so the tree flattens as it goes,
/// then removed. Missing is not an error.
///
/// # Errors
/// What the file system says, or a tree that keeps growing past
/// [`MAX_STEPS`].
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let top = match rustix::fs::openat(CWD, path, OPEN_DIR, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::NOENT) => return Ok(()),
        Err(Errno::NOTDIR | Errno::LOOP) => return std::fs::remove_file(path),
        Err(e) => return Err(e.into()),
    };
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
                Err(e) => return Err(e.into()),
            }
            let sub = match rustix::fs::openat(&top, &name, OPEN_DIR, Mode::empty()) {
                Ok(fd) => fd,
                Err(Errno::ACCESS) => {
                    // A directory its owner closed to itself (mode 000);
                    // reopened after, still without following a link.
                    let Ok(fd) = rustix::fs::openat(
                        &top,
                        &name,
                        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                        Mode::empty(),
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
    match std::fs::remove_dir(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
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
}
