//! A SQLite VFS that opens a database by exactly the name it was given.
//!
//! SQLite's unix VFS makes every database name a full path by resolving
//! each symbolic link in it (`unixFullPathname`), then opens the database,
//! its `-wal`, `-shm` and `-journal` by that string — again at every new
//! connection, and whenever a connection first opens its log. The service
//! opens its store as `/proc/self/fd/N/bulkhead.sqlite`, `N` the data
//! directory it holds open: resolved, that magic link becomes the
//! directory's *path*, which whoever can write the directory above can
//! point at another service's data directory meanwhile.
//!
//! This VFS is the unix VFS with that one step changed: an absolute name is
//! kept exactly as given (a relative one is put after the working
//! directory, again without resolving anything), so every open of every
//! file of the database goes through `/proc/self/fd/N` and the kernel
//! reaches the held directory itself. Everything else — opening, locking,
//! shared memory, sync — is the unix VFS's own code, reached through the
//! same function pointers; only the name step differs.

use std::ffi::{CStr, c_char, c_int};
use std::os::unix::ffi::OsStrExt;
use std::path::PathBuf;
use std::sync::OnceLock;

use rusqlite::ffi;

/// The name the VFS is registered under.
const NAME: &CStr = c"bulkhead-named";

/// Registers the VFS once per process and returns its name.
///
/// # Errors
/// If SQLite has no unix VFS or refuses the registration.
pub fn name() -> Result<&'static str, String> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            // SAFETY: `sqlite3_vfs_find` initialises SQLite if needed and
            // returns a pointer to a VFS object that lives as long as the
            // process (the built-in unix VFS) or null. The copy is leaked,
            // so it outlives every connection that may use it, as SQLite
            // requires of a registered VFS; its functions are the unix
            // VFS's, which read only `szOsFile`, `mxPathname` and
            // `pAppData` from the object they are called with, all copied.
            unsafe {
                let unix = ffi::sqlite3_vfs_find(c"unix".as_ptr());
                if unix.is_null() {
                    return Err("SQLite has no unix VFS".to_owned());
                }
                let mut vfs = std::ptr::read(unix);
                let Some(unix_open) = vfs.xOpen else {
                    return Err("SQLite's unix VFS has no xOpen".to_owned());
                };
                UNIX_OPEN
                    .set(unix_open)
                    .map_err(|_| "the VFS was registered twice".to_owned())?;
                vfs.pNext = std::ptr::null_mut();
                vfs.zName = NAME.as_ptr();
                vfs.xFullPathname = Some(full_pathname);
                vfs.xOpen = Some(open);
                let rc = ffi::sqlite3_vfs_register(Box::into_raw(Box::new(vfs)), 0);
                if rc != ffi::SQLITE_OK {
                    return Err(format!("SQLite refused the {NAME:?} VFS (code {rc})"));
                }
            }
            Ok(())
        })
        .clone()
        .map(|()| NAME.to_str().unwrap_or_default())
}

/// The unix VFS's `xOpen`, which [`open`] calls.
type XOpen = unsafe extern "C" fn(
    *mut ffi::sqlite3_vfs,
    ffi::sqlite3_filename,
    *mut ffi::sqlite3_file,
    c_int,
    *mut c_int,
) -> c_int;
static UNIX_OPEN: OnceLock<XOpen> = OnceLock::new();

/// Whether the file at `name` has another name (a hard link to another
/// database's file, say): not opened. A missing file is fine (SQLite
/// makes it).
fn has_second_name(name: &[u8]) -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(std::ffi::OsStr::from_bytes(name)).is_ok_and(|m| m.nlink() > 1)
}

/// `xOpen`: the unix VFS's, but a database, journal or log file with a
/// second name is refused (`SQLITE_CANTOPEN`), and so is a main
/// database whose `-shm` (opened apart from `xOpen`) has one. A hard link
/// put at `bulkhead.sqlite` would otherwise have the service use, and
/// write into, another's store.
unsafe extern "C" fn open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    if !name.is_null() {
        // SAFETY: SQLite passes a NUL-terminated name.
        let given = unsafe { CStr::from_ptr(name) }.to_bytes();
        let shm = [given, b"-shm"].concat();
        if has_second_name(given)
            || (flags & ffi::SQLITE_OPEN_MAIN_DB != 0 && has_second_name(&shm))
        {
            return ffi::SQLITE_CANTOPEN;
        }
    }
    let Some(unix_open) = UNIX_OPEN.get() else {
        return ffi::SQLITE_CANTOPEN;
    };
    // SAFETY: the unix VFS's own xOpen, with SQLite's arguments unchanged.
    unsafe { unix_open(vfs, name, file, flags, out_flags) }
}

/// `xFullPathname`: `name` unchanged if absolute, else after the working
/// directory; never a link resolved.
unsafe extern "C" fn full_pathname(
    _vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n_out: c_int,
    out: *mut c_char,
) -> c_int {
    if name.is_null() || out.is_null() {
        return ffi::SQLITE_CANTOPEN;
    }
    // SAFETY: SQLite passes a NUL-terminated name.
    let given = unsafe { CStr::from_ptr(name) }.to_bytes();
    let full = if given.first() == Some(&b'/') {
        given.to_vec()
    } else {
        let Ok(cwd) = std::env::current_dir() else {
            return ffi::SQLITE_CANTOPEN;
        };
        let joined: PathBuf = cwd.join(std::ffi::OsStr::from_bytes(given));
        joined.as_os_str().as_bytes().to_vec()
    };
    let Ok(room) = usize::try_from(n_out) else {
        return ffi::SQLITE_CANTOPEN;
    };
    if full.len() + 1 > room || full.contains(&0) {
        return ffi::SQLITE_CANTOPEN;
    }
    // SAFETY: `out` has room for `n_out` bytes (SQLite's contract), and
    // `full` and its terminator fit, checked above.
    unsafe {
        std::ptr::copy_nonoverlapping(full.as_ptr().cast::<c_char>(), out, full.len());
        *out.add(full.len()) = 0;
    }
    ffi::SQLITE_OK
}

#[cfg(test)]
mod tests {
    use super::*;
    use rusqlite::{Connection, OpenFlags};

    /// A database opened through `/proc/self/fd/N` stays the held
    /// directory's: its path moved away and another directory (with its own
    /// database) put at it, a new connection and the first connection's
    /// log still reach the held one, and nothing is created at the path.
    #[test]
    fn a_database_opened_through_a_held_directory_stays_there() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        let held = crate::sandbox::beneath::Root::open(&dir).unwrap();
        let db = crate::sandbox::beneath::fd_path(held.fd()).join("db.sqlite");
        let flags = OpenFlags::default() | OpenFlags::SQLITE_OPEN_NOFOLLOW;
        let vfs = name().unwrap();
        let first = Connection::open_with_flags_and_vfs(&db, flags, vfs).unwrap();
        first
            .execute_batch(
                "PRAGMA journal_mode=WAL; CREATE TABLE t(v); INSERT INTO t VALUES ('held');",
            )
            .unwrap();
        assert_eq!(
            first.path(),
            Some(db.to_str().unwrap()),
            "the name was changed"
        );

        // The path now names another directory with a database of its own.
        std::fs::rename(&dir, tmp.path().join("moved")).unwrap();
        let other = tmp.path().join("other");
        std::fs::create_dir(&other).unwrap();
        Connection::open(other.join("db.sqlite"))
            .unwrap()
            .execute_batch("CREATE TABLE t(v); INSERT INTO t VALUES ('other');")
            .unwrap();
        std::os::unix::fs::symlink(&other, &dir).unwrap();

        let later = Connection::open_with_flags_and_vfs(&db, flags, vfs).unwrap();
        let seen: String = later
            .query_row("SELECT v FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(seen, "held");
        first.execute("INSERT INTO t VALUES ('more')", []).unwrap();
        let n: i64 = later
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 2);
        let mut left: Vec<_> = std::fs::read_dir(&other)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(
            left,
            ["db.sqlite"],
            "a file of the held database was made at the path"
        );
        let moved: Vec<_> = std::fs::read_dir(tmp.path().join("moved"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(moved.iter().any(|n| n == "db.sqlite-wal"), "{moved:?}");
    }

    /// A hard link at the database's name, or at its `-wal` or `-shm`,
    /// to another database's file: the open is refused and the other
    /// database is untouched.
    #[test]
    fn a_database_file_with_a_second_name_is_not_opened() {
        let tmp = tempfile::tempdir().unwrap();
        let theirs = tmp.path().join("theirs.sqlite");
        {
            let c = Connection::open(&theirs).unwrap();
            c.execute_batch(
                "PRAGMA journal_mode=WAL; CREATE TABLE t(v); INSERT INTO t VALUES ('theirs');",
            )
            .unwrap();
            let before = std::fs::read(&theirs).unwrap();
            let flags = OpenFlags::default() | OpenFlags::SQLITE_OPEN_NOFOLLOW;
            for suffix in ["", "-wal", "-shm"] {
                let dir = tmp.path().join(format!("d{suffix}"));
                std::fs::create_dir(&dir).unwrap();
                if !suffix.is_empty() {
                    // A database of its own, in WAL mode, beside the link.
                    Connection::open(dir.join("db.sqlite"))
                        .unwrap()
                        .execute_batch("PRAGMA journal_mode=WAL; CREATE TABLE own(v);")
                        .unwrap();
                }
                std::fs::hard_link(
                    format!("{}{suffix}", theirs.display()),
                    dir.join(format!("db.sqlite{suffix}")),
                )
                .unwrap();
                let opened = Connection::open_with_flags_and_vfs(
                    dir.join("db.sqlite"),
                    flags,
                    name().unwrap(),
                )
                .and_then(|c| {
                    c.query_row("SELECT count(*) FROM sqlite_master", [], |r| {
                        r.get::<_, i64>(0)
                    })
                });
                assert!(opened.is_err(), "{suffix:?}: {opened:?}");
            }
            assert_eq!(std::fs::read(&theirs).unwrap(), before);
        }
    }

    /// With SQLite's own unix VFS, the same open follows the path (what
    /// the VFS above exists to prevent).
    #[test]
    fn the_unix_vfs_resolves_the_held_directory_to_its_path() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        let held = crate::sandbox::beneath::Root::open(&dir).unwrap();
        let db = crate::sandbox::beneath::fd_path(held.fd()).join("db.sqlite");
        let conn = Connection::open(&db).unwrap();
        assert_eq!(
            conn.path().map(PathBuf::from),
            Some(std::fs::canonicalize(&dir).unwrap().join("db.sqlite"))
        );
    }
}
