//! The locks that keep two Bulkhead processes off each other's
//! directories: a data or work directory is held by an exclusive `flock`
//! of `bulkhead.lock` inside it, taken before anything in it is touched
//! and kept until the process ends; a start refuses a directory with a
//! held lock above it, or (a work directory, which a start and a shutdown
//! empty) below it. A module cache, which services may share, is held by
//! a shared `flock` of `bulkhead-cache.lock` inside it: no one's data or
//! work directory may be at it or around it, and it may not be inside
//! another's.

use std::path::{Path, PathBuf};

/// Takes `data`'s lock file (`bulkhead.lock`, an exclusive `flock`, held
/// while the returned file is open): a second service on the same data
/// directory — a second `bulkhead serve` of the same config, say — stops
/// before it touches anything there, or the work directory named after it
/// (which a start empties under the first one's running jobs).
pub(super) fn lock_data_dir(data: &Root) -> std::io::Result<std::fs::File> {
    lock_file_in(data, LOCK_FILE)
}

/// The lock file of a data or work directory, inside it.
pub(super) use crate::sandbox::DIR_LOCK as LOCK_FILE;

/// The lock file of a module cache, inside it: held shared by every
/// service using the cache.
use crate::sandbox::CACHE_LOCK;

use crate::sandbox::beneath::Root;

/// Takes a shared hold of the module cache `cache` (created if missing):
/// services may share a cache, but a data or work directory at it or
/// around it — a work directory is emptied at each start and shutdown —
/// is refused while it is held ([`check_above`], [`check_held`]). Refused
/// itself when it is inside, at, or around a directory another process
/// holds.
///
/// # Errors
/// `InvalidInput` naming the holder; I/O errors.
pub fn share_cache_dir(
    cache: &Path,
    own: &[&std::fs::File],
) -> std::io::Result<(Root, std::fs::File)> {
    use rustix::fs::{Mode, OFlags};
    check_above(&canonical_to_be(cache)?, own)?;
    crate::sandbox::create_private_dir_all(cache)?;
    let cache = std::fs::canonicalize(cache)?;
    // Held open from here: what is made in it (each zone's cache) is
    // reached from this descriptor, whatever is later put at its path.
    let root = Root::open(&cache)?;
    let path = cache.join(CACHE_LOCK);
    let file = std::fs::File::from(rustix::fs::openat(
        root.fd(),
        CACHE_LOCK,
        OFlags::RDWR | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?);
    // Another process checking whether the cache is held takes it
    // exclusively for a moment: asked again for a little while.
    let mut tries = 0;
    while let Err(e) = rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockShared) {
        tries += 1;
        if e != rustix::io::Errno::WOULDBLOCK || tries == LOCK_TRIES {
            return Err(std::io::Error::other(format!("{}: {e}", path.display())));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let own: Vec<&std::fs::File> = own.iter().copied().chain([&file]).collect();
    check_held(&root, &cache, &own)?;
    Ok((root, file))
}

/// The checks of a directory just held, `root` (opened at `path`, its
/// canonical path): none above it or below it held by another process,
/// looked for from its descriptor (up by `..`, down one name at a time),
/// so a link or a directory swapped in at its path meanwhile is not what
/// is checked; above it also as its path's ancestors and their aliases
/// (a bind mount of a subdirectory hides the ancestors `..` reaches),
/// and as the held directory's own path now and its aliases.
/// Last, `path` must still name it, with no link on the way.
fn check_held(root: &Root, path: &Path, own: &[&std::fs::File]) -> std::io::Result<()> {
    check_held_above(root, path, own)?;
    if let Some(rel) = crate::sandbox::held_within(root.fd(), own)? {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "holds {}, held by another bulkhead process",
                path.join(rel).display()
            ),
        ));
    }
    Ok(())
}

/// [`check_held`] but for what is below the directory (a data directory's
/// jobs are looked into as the orphan sweep comes to each).
pub(super) fn check_held_above(
    root: &Root,
    path: &Path,
    own: &[&std::fs::File],
) -> std::io::Result<()> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
    check_above_held(root, own)?;
    // Also where the held directory really is now, and that place's
    // aliases: held through a bind mount of a subdirectory, `..` from it
    // reaches the mount point's parent, not the held ancestors the mount
    // hides.
    let real = std::fs::read_link(crate::sandbox::beneath::fd_path(root.fd()))
        .ok()
        .filter(|real| real != path);
    let mut dirs = vec![path];
    dirs.extend(real.as_deref());
    check_above_each(&dirs, own)?;
    // One lookup, refusing any link on the way (`path` is canonical), of
    // what the path names now: the held directory itself.
    let held = rustix::fs::fstat(root.fd())?;
    let same = rustix::fs::openat2(
        rustix::fs::CWD,
        path,
        rustix::fs::OFlags::PATH | rustix::fs::OFlags::DIRECTORY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
        rustix::fs::ResolveFlags::NO_SYMLINKS,
    )
    .and_then(|fd| rustix::fs::fstat(&fd))
    .is_ok_and(|c| (c.st_dev, c.st_ino) == (held.st_dev, held.st_ino));
    if !same {
        return Err(invalid(format!(
            "was replaced at {} while checked",
            path.display()
        )));
    }
    Ok(())
}

/// Refuses the directory `root` holds when a directory above it has a
/// lock file another process holds: walked up from its descriptor by
/// `..` to the root of this process's view, so what is put at its path
/// meanwhile changes nothing.
fn check_above_held(root: &Root, own: &[&std::fs::File]) -> std::io::Result<()> {
    use rustix::fs::{Mode, OFlags};
    let mut cur = rustix::io::fcntl_dupfd_cloexec(root.fd(), 0)?;
    for _ in 0..4096 {
        let parent = rustix::fs::openat(
            &cur,
            "..",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let (a, b) = (rustix::fs::fstat(&cur)?, rustix::fs::fstat(&parent)?);
        if (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) {
            return Ok(());
        }
        for name in [LOCK_FILE, CACHE_LOCK] {
            if let Some(holder) = held_by_another_at(&parent, name, own)? {
                let at = std::fs::read_link(crate::sandbox::beneath::fd_path(&parent))
                    .unwrap_or_default();
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "inside {}, held by another bulkhead process{holder}",
                        at.display()
                    ),
                ));
            }
        }
        cur = parent;
    }
    Err(std::io::Error::other("too many directories above it"))
}

/// Takes the work directory's lock (`bulkhead.lock` inside it, kept when
/// the directory is emptied) and returns the directory, held open (its
/// path the canonical one), with it: everything the service empties in it
/// is reached from that descriptor, whatever is later put at its path (a
/// link, a mount of another's directory). a start empties the directory, and a shutdown too, so no two
/// services may share one, nor hold one inside the other's. Checked on the
/// canonical path: the same directory spelled another way, a symlink to
/// it, a configured one naming another service's default one, all take
/// the same lock. A work directory inside a directory another service
/// holds (an ancestor has a held lock file: refused before it is even
/// created), or holding one (a held lock file below it), or holding this
/// service's data or cache directory, is refused before anything in it is
/// touched.
///
/// `keep` names directories (`("data", path)`) it must not hold; `own`,
/// lock files of this process's that are no one else's. Two starts racing
/// each take their lock before they look above and below again: of two
/// nested ones, one at least sees the other's.
pub fn lock_work_dir(
    work: &Path,
    keep: &[(&str, &Path)],
    own: &[&std::fs::File],
) -> std::io::Result<(Root, std::fs::File)> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, what);
    let target = canonical_to_be(work)?;
    for (what, dir) in keep {
        let dir = canonical_to_be(dir).unwrap_or_else(|_| dir.to_path_buf());
        if dir.starts_with(&target) {
            return Err(invalid(format!(
                "holds the {what} directory, which a start would empty"
            )));
        }
    }
    check_above(&target, own)?;
    crate::sandbox::ensure_private_dir(&target).map_err(std::io::Error::other)?;
    let work = std::fs::canonicalize(&target)?;
    if work != target {
        return Err(invalid(format!(
            "changed into {} while checked",
            work.display()
        )));
    }
    let root = Root::open(&work)?;
    let lock = lock_file_in(&root, LOCK_FILE)?;
    let own: Vec<&std::fs::File> = own.iter().copied().chain([&lock]).collect();
    check_held(&root, &work, &own)?;
    Ok((root, lock))
}

/// Refuses `dir` (canonical) when a directory above it is held by another
/// service: a held `bulkhead.lock` or `bulkhead-cache.lock` in one of its
/// ancestors (`own`: this process's locks, skipped).
///
/// # Errors
/// `InvalidInput` naming the holder; I/O errors reading a lock file.
pub fn check_above(dir: &Path, own: &[&std::fs::File]) -> std::io::Result<()> {
    check_above_each(&[dir], own)
}

/// [`check_above`] for each of `dirs`, the mount table read once.
fn check_above_each(dirs: &[&Path], own: &[&std::fs::File]) -> std::io::Result<()> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok();
    // Their ancestors as spelled, and as the file system holding each has
    // them where it is a bind mount of a subdirectory (whose own
    // ancestors the mount hides).
    let spellings = dirs.iter().flat_map(|dir| {
        std::iter::once(dir.to_path_buf()).chain(
            info.as_deref()
                .map_or_else(Vec::new, |info| aliases(dir, info)),
        )
    });
    for above in spellings.flat_map(|d| {
        d.ancestors()
            .skip(1)
            .map(Path::to_owned)
            .collect::<Vec<_>>()
    }) {
        let above = above.as_path();
        let held = match held_by_another(&above.join(LOCK_FILE), own)? {
            Some(holder) => Some(holder),
            None => held_by_another(&above.join(CACHE_LOCK), own)?,
        };
        if let Some(holder) = held {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "inside {}, held by another bulkhead process{holder}",
                    above.display()
                ),
            ));
        }
    }
    Ok(())
}

/// The other paths the directory at `dir` (canonical, existing or to
/// be) is reachable by in this mount namespace when it is inside a bind
/// mount of a subdirectory: a mount whose root is not its file system's
/// root hides that root's ancestors, where another service's lock may
/// be. Each is the same place below another mount of the same file
/// system whose root holds it (`info`, `/proc/self/mountinfo`).
fn aliases(dir: &Path, info: &str) -> Vec<PathBuf> {
    // (device, root in its file system, mount point), in mount order.
    let mounts: Vec<(String, PathBuf, PathBuf)> = info
        .lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            Some((
                (*fields.get(2)?).to_owned(),
                PathBuf::from(unescape(fields.get(3)?)),
                PathBuf::from(unescape(fields.get(4)?)),
            ))
        })
        .collect();
    // The mount `dir` is in: the deepest mount point above it, the last
    // mounted there.
    let Some((dev, root, point)) = mounts
        .iter()
        .filter(|(_, _, point)| dir.starts_with(point))
        .max_by_key(|(_, _, point)| point.components().count())
        .and_then(|(_, _, deepest)| mounts.iter().rev().find(|(_, _, p)| p == deepest))
    else {
        return Vec::new();
    };
    if root == Path::new("/") {
        return Vec::new();
    }
    let Ok(rest) = dir.strip_prefix(point) else {
        return Vec::new();
    };
    let in_fs = root.join(rest);
    mounts
        .iter()
        .filter(|(d, r, p)| d == dev && p != point && in_fs.starts_with(r))
        .filter_map(|(_, r, p)| Some(p.join(in_fs.strip_prefix(r).ok()?)))
        .collect()
}

/// A mountinfo path field, its `\ooo` escapes (space, tab, newline,
/// backslash) decoded.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && let Some(code) = bytes
                .get(i + 1..i + 4)
                .and_then(|o| std::str::from_utf8(o).ok())
                .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            out.push(code);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `path` made absolute with every symlink resolved, whether or not it
/// exists yet: its longest existing prefix canonicalized, the rest joined.
pub(super) fn canonical_to_be(path: &Path) -> std::io::Result<PathBuf> {
    let absolute = std::path::absolute(path)?;
    let mut rest = Vec::new();
    let mut existing = absolute.as_path();
    loop {
        match std::fs::canonicalize(existing) {
            Ok(mut canonical) => {
                for name in rest.iter().rev() {
                    canonical.push(name);
                }
                return Ok(canonical);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let (Some(parent), Some(name)) = (existing.parent(), existing.file_name()) else {
                    return Err(e);
                };
                rest.push(name.to_owned());
                existing = parent;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Whether the lock file at `path` (not followed if a symlink) is held by
/// a process other than through `own`: then ` (pid N)` as its file says,
/// or an empty string. A data or work directory's is held exclusively; a
/// cache's, shared, by every process using it.
fn held_by_another(path: &Path, own: &[&std::fs::File]) -> std::io::Result<Option<String>> {
    held_by_another_at(rustix::fs::CWD, path, own)
}

/// [`held_by_another`] of `name` in the directory `dir` (or of the path
/// `name` from the working directory, with `CWD`): never through a link
/// at its last step; a socket, a device or a FIFO is no lock.
fn held_by_another_at(
    dir: impl std::os::fd::AsFd,
    name: impl AsRef<Path>,
    own: &[&std::fs::File],
) -> std::io::Result<Option<String>> {
    use rustix::fs::{Mode, OFlags};
    use std::os::unix::fs::MetadataExt;
    let path = name.as_ref();
    let mut file = match rustix::fs::openat(
        dir,
        path,
        OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    ) {
        Ok(fd) => std::fs::File::from(fd),
        Err(
            rustix::io::Errno::NOENT
            | rustix::io::Errno::LOOP
            | rustix::io::Errno::NXIO
            | rustix::io::Errno::NOTDIR,
        ) => {
            return Ok(None);
        }
        Err(e) => return Err(e.into()),
    };
    let meta = file.metadata()?;
    for held in own {
        let mine = held.metadata()?;
        if (mine.dev(), mine.ino()) == (meta.dev(), meta.ino()) {
            return Ok(None);
        }
    }
    let lock = if path.file_name().is_some_and(|n| n == CACHE_LOCK) {
        CACHE_LOCK
    } else {
        LOCK_FILE
    };
    Ok(crate::sandbox::held(&file, lock)?.then(|| holder(&mut file)))
}

/// Removes everything in the work directory `work` but its lock file
/// (and this process's other locks, `own`, hard-linked in it: no one
/// else's),
/// reached from its held descriptor: what is at its path now (a link, a
/// mount) is not looked at. A directory in it with a lock file another
/// process holds (a running service's data directory put there, from a
/// mount namespace where this one's lock cannot be seen) is left whole,
/// where it is: the directories on the way to it are emptied of the rest,
/// not moved; it is named in the error. Every other entry is removed.
///
/// # Errors
/// The first entry that could not be removed, or was left, and why.
pub(super) fn empty_work_dir(work: &Root, own: &[&std::fs::File]) -> std::io::Result<()> {
    empty_but_held(work, Path::new(""), own)
}

/// [`empty_work_dir`] of the directory `rel` below `work`.
fn empty_but_held(work: &Root, rel: &Path, own: &[&std::fs::File]) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let dir = work.dir(rel, false)?;
    let mut first = None;
    for name in crate::sandbox::entry_names(&dir)? {
        let name = std::ffi::OsStr::from_bytes(name.to_bytes());
        if rel.as_os_str().is_empty() && name == LOCK_FILE {
            continue;
        }
        let entry = rel.join(name);
        // Looked at physically, from the held descriptor.
        let held = match work.dir(&entry, false) {
            Ok(fd) => crate::sandbox::held_within(&fd, own),
            Err(_) => Ok(None), // not a directory (nor one reached through a link)
        };
        let done = match held {
            Ok(None) => crate::sandbox::remove_tree_but(work, &entry, own),
            Ok(Some(at)) if at.as_os_str().is_empty() => Err(std::io::Error::other(format!(
                "{} is held by another process (a running service's): left as it is",
                work.path().join(&entry).display()
            ))),
            Ok(Some(_)) => empty_but_held(work, &entry, own),
            Err(e) => Err(std::io::Error::new(
                e.kind(),
                format!("{}: {e}", work.path().join(&entry).display()),
            )),
        };
        if let Err(e) = done {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// The lock of `name` in the held directory `dir`, opened from its
/// descriptor (not followed if a link).
fn lock_file_in(dir: &Root, name: &str) -> std::io::Result<std::fs::File> {
    let path = dir.path().join(name);
    let (file, made) = open_lock(dir.fd(), Path::new(name), &path)?;
    lock_opened(file, &path, made)
}

/// The lock file `name` in `dir`,
/// created if missing, and whether this open made it: never through a
/// link (refused, named).
fn open_lock(
    dir: impl std::os::fd::AsFd,
    name: &Path,
    path: &Path,
) -> std::io::Result<(std::fs::File, bool)> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::RDWR | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let mode = Mode::from_raw_mode(0o600);
    let link = |e: rustix::io::Errno| match e {
        rustix::io::Errno::LOOP => std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!(
                "{} is a link: a lock file must be a file of its own (remove the link)",
                path.display()
            ),
        ),
        e => e.into(),
    };
    match rustix::fs::openat(&dir, name, flags | OFlags::CREATE | OFlags::EXCL, mode) {
        Ok(fd) => Ok((fd.into(), true)),
        Err(rustix::io::Errno::EXIST) => {
            let file: std::fs::File = rustix::fs::openat(&dir, name, flags, mode)
                .map_err(link)?
                .into();
            let own = of_its_own(&file, dir.as_fd(), name);
            Ok((file, own))
        }
        Err(e) => Err(link(e)),
    }
}

/// Whether `file`, found at `name` in `dir`, is a file of its own:
/// regular, one name, on the directory's own mount (not a bind mount of
/// someone's file put there).
fn of_its_own(file: &std::fs::File, dir: std::os::fd::BorrowedFd<'_>, name: &Path) -> bool {
    use rustix::fs::{AtFlags, FileType, StatxFlags};
    let what = StatxFlags::MNT_ID | StatxFlags::NLINK;
    let parent = name.parent().unwrap_or(Path::new(""));
    match (
        rustix::fs::statx(file, "", AtFlags::EMPTY_PATH, what),
        rustix::fs::statx(dir, parent, AtFlags::EMPTY_PATH, what),
    ) {
        (Ok(f), Ok(d)) => {
            f.stx_nlink == 1
                && FileType::from_raw_mode(f.stx_mode.into()) == FileType::RegularFile
                && f.stx_mnt_id == d.stx_mnt_id
        }
        _ => false,
    }
}

/// An exclusive `flock` of the file opened (created if missing), held
/// while the returned file is open, with this process's id written in it
/// where it is a file of its own; taken by another process, an error
/// naming that one. A link at the lock's name is refused, not followed
/// ([`open_lock`]): every check of whether a directory is held asks its
/// lock file without following a link, so a lock taken through one would
/// protect nothing.
///
/// The lock of the file opened at `path`; `made`: this process just
/// created it, or it is a file of its own (one name, on its directory's
/// mount), which may be written.
fn lock_opened(mut file: std::fs::File, path: &Path, made: bool) -> std::io::Result<std::fs::File> {
    use std::io::{Seek, Write};
    // A lock this process has just let go of can stay held a moment by a
    // child it was forking meanwhile (its descriptors go at the child's
    // exec): a held lock is asked again for a little while.
    let mut tries = 0;
    while let Err(e) =
        rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive)
    {
        if e != rustix::io::Errno::WOULDBLOCK {
            return Err(e.into());
        }
        tries += 1;
        if tries == LOCK_TRIES {
            return Err(std::io::Error::other(format!(
                "in use by another bulkhead process{} ({} is locked)",
                holder(&mut file),
                path.display()
            )));
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    // Its pid is written for others to name it only into a file of its
    // own: one with a second name or on another mount may be someone's (a
    // hard link or a bind mount of another's key or token put at the
    // lock's name), and is locked, never written.
    if made {
        file.set_len(0)?;
        file.rewind()?;
        writeln!(file, "{}", std::process::id())?;
    }
    Ok(file)
}

/// How often a lock asks for a held lock, 10 ms apart.
const LOCK_TRIES: u32 = 30;

/// Who holds a lock file, as its file says: ` (pid N)`, or an empty
/// string.
fn holder(file: &mut std::fs::File) -> String {
    use std::io::Read;
    let mut pid = String::new();
    let _ = file.read_to_string(&mut pid);
    match pid.trim() {
        "" => String::new(),
        pid => format!(" (pid {pid})"),
    }
}

#[cfg(test)]
mod tests {

    /// A lock file that is a hard link to someone's file (a key, a token)
    /// is locked but never written: the file keeps its bytes.
    #[test]
    fn a_lock_file_with_a_second_name_is_never_written() {
        let tmp = tempfile::tempdir().unwrap();
        let data = tmp.path().join("data");
        std::fs::create_dir(&data).unwrap();
        let key = tmp.path().join("keyring.json");
        std::fs::write(&key, b"{\"keys\":[]}").unwrap();
        std::fs::hard_link(&key, data.join(LOCK_FILE)).unwrap();
        let held = lock_data_dir(&Root::open(&data).unwrap()).unwrap();
        assert_eq!(std::fs::read(&key).unwrap(), b"{\"keys\":[]}");
        drop(held);
        // A link is refused outright.
        std::fs::remove_file(data.join(LOCK_FILE)).unwrap();
        std::os::unix::fs::symlink(&key, data.join(LOCK_FILE)).unwrap();
        let err = lock_data_dir(&Root::open(&data).unwrap())
            .unwrap_err()
            .to_string();
        assert!(err.contains("is a link"), "{err}");
        assert_eq!(std::fs::read(&key).unwrap(), b"{\"keys\":[]}");
    }

    use super::*;

    /// A `flock` is held per open file: a second opening in this process
    /// stands for another process.
    #[test]
    fn a_shared_cache_is_never_a_work_directory_nor_inside_or_around_one() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("caches").join("modules");
        let (_, held) = share_cache_dir(&cache, &[]).unwrap();
        std::fs::create_dir_all(cache.join("zones/untrusted")).unwrap();
        std::fs::write(cache.join("zones/untrusted/artifact"), b"compiled").unwrap();
        // Services may share one.
        let (_, also) = share_cache_dir(&cache, &[]).expect("a cache is shared");
        // But no one's work directory is it, around it, or in it.
        for (work, refusal) in [
            (cache.clone(), "held by another bulkhead process"),
            (
                tmp.path().join("caches"),
                "held by another bulkhead process",
            ),
            (cache.join("zones"), "inside"),
        ] {
            let err = lock_work_dir(&work, &[], &[]).unwrap_err().to_string();
            assert!(err.contains(refusal), "{}: {err}", work.display());
        }
        assert_eq!(
            std::fs::read(cache.join("zones/untrusted/artifact")).unwrap(),
            b"compiled"
        );
        // Nor is a cache inside or around a directory another holds.
        let work = tmp.path().join("work");
        let (_, work_lock) = lock_work_dir(&work, &[], &[]).unwrap();
        for dir in [work.join("cache"), tmp.path().to_owned()] {
            let err = share_cache_dir(&dir, &[]).unwrap_err().to_string();
            assert!(
                err.contains("held by another bulkhead process"),
                "{}: {err}",
                dir.display()
            );
        }
        drop((held, also, work_lock));
        // Let go, the directory is free.
        lock_work_dir(&tmp.path().join("caches"), &[], &[]).expect("no longer held");
    }

    /// Where the child of
    /// [`a_directory_reached_through_a_bind_mount_of_a_held_ones_subdirectory_is_refused`]
    /// finds its directories.
    const MOUNTED: &str = "BULKHEAD_TEST_LOCKS_MOUNTED";

    /// A bind mount of a subdirectory hides that subdirectory's
    /// ancestors, and with them the lock of the directory another process
    /// holds around it: a work directory, a data directory's check or a
    /// cache reached through such a mount is refused all the same. Made in
    /// a mount namespace of a child of this test binary (`unshare`).
    #[test]
    fn a_directory_reached_through_a_bind_mount_of_a_held_ones_subdirectory_is_refused() {
        if let Ok(dir) = std::env::var(MOUNTED) {
            let dir = Path::new(&dir);
            // The mount is made below a held work directory and a shared
            // cache before they are held: the locks are this process's,
            // each opened anew by the checks.
            let (_, work) = lock_work_dir(&dir.join("work"), &[], &[]).unwrap();
            let (_, cache) = share_cache_dir(&dir.join("cache"), &[]).unwrap();
            for (path, what) in [
                (dir.join("through-work/inner"), "a work directory"),
                (dir.join("through-cache"), "a work directory"),
            ] {
                let err = lock_work_dir(&path, &[], &[]).unwrap_err().to_string();
                assert!(
                    err.contains("held by another"),
                    "{what} {}: {err}",
                    path.display()
                );
            }
            let err = check_above(&dir.join("through-work/data"), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains("held by another"), "{err}");
            let err = share_cache_dir(&dir.join("through-work/cache"), &[])
                .unwrap_err()
                .to_string();
            assert!(err.contains("held by another"), "{err}");
            drop((work, cache));
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        for sub in ["work/zones", "cache/zones", "through-work", "through-cache"] {
            std::fs::create_dir_all(tmp.path().join(sub)).unwrap();
        }
        crate::rerun_with_binds(
            "service::locks::tests::a_directory_reached_through_a_bind_mount_of_a_held_ones_subdirectory_is_refused",
            MOUNTED,
            tmp.path(),
            &[
                ("work/zones", "through-work"),
                ("cache/zones", "through-cache"),
            ],
        );
    }

    /// The work directory is emptied through the descriptor its lock was
    /// taken by: a link put at its path later leads nowhere, and a
    /// directory in it that another process holds (at any depth) is left
    /// whole and in place while the rest goes.
    #[test]
    fn a_work_directory_is_emptied_as_held_and_around_what_others_hold() {
        let tmp = tempfile::tempdir().unwrap();
        let work = tmp.path().join("work");
        let (root, lock) = lock_work_dir(&work, &[], &[]).unwrap();
        std::fs::create_dir_all(work.join("zones/untrusted/w1/j1")).unwrap();
        std::fs::write(work.join("zones/untrusted/w1/j1/out"), b"mine").unwrap();
        let theirs = [
            work.join("data"),
            work.join("zones/untrusted/w1/deeper/data"),
        ];
        let held: Vec<crate::LockHolder> = theirs
            .iter()
            .map(|dir| {
                std::fs::create_dir_all(dir.join("keys")).unwrap();
                std::fs::write(dir.join("keys/signing"), b"theirs").unwrap();
                crate::LockHolder::new(dir, LOCK_FILE, true)
            })
            .collect();
        let victim = tmp.path().join("victim");
        std::fs::create_dir_all(victim.join("zones")).unwrap();
        std::fs::write(victim.join("zones/keep"), b"not the service's").unwrap();
        let moved = tmp.path().join("moved");
        std::fs::rename(&work, &moved).unwrap();
        std::os::unix::fs::symlink(&victim, &work).unwrap();

        // This process's own lock, hard-linked in it, is no one else's.
        std::fs::hard_link(moved.join(LOCK_FILE), moved.join("zones/own.lock")).unwrap();
        std::fs::hard_link(
            moved.join(LOCK_FILE),
            moved.join("zones/untrusted").join(LOCK_FILE),
        )
        .unwrap();
        let err = empty_work_dir(&root, &[&lock]).unwrap_err().to_string();
        assert!(err.contains("held by another process"), "{err}");
        assert_eq!(
            std::fs::read(victim.join("zones/keep")).unwrap(),
            b"not the service's"
        );
        for dir in &theirs {
            let now = moved.join(dir.strip_prefix(&work).unwrap());
            assert_eq!(std::fs::read(now.join("keys/signing")).unwrap(), b"theirs");
        }
        assert!(!moved.join("zones/untrusted/w1/j1").exists());
        assert!(moved.join(LOCK_FILE).is_file());
        drop(held);
        empty_work_dir(&root, &[&lock]).unwrap();
        let left: Vec<_> = std::fs::read_dir(&moved)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, [LOCK_FILE]);
        drop(lock);
    }
}
