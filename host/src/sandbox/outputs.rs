//! Collecting a job's outputs from its `/out` directory.
//!
//! The directory was written by a guest assumed hostile, so this module never
//! follows a symlink (directories are opened with `O_NOFOLLOW`, files with
//! `O_NOFOLLOW | O_NONBLOCK`) and reads only regular files, checked with
//! `fstat` on the opened handle rather than a name lookup that could change in
//! between. Everything is done relative to directory handles, both the walk
//! of `/out` and the copy into the destination (`openat`-style, one name at a
//! time), so a tree whose paths exceed the host's `PATH_MAX` is walked like
//! any other; no host path built from guest names is ever handed to the
//! kernel.
//!
//! Names are checked as they are found ([`check_name`]): an entry is listed
//! as skipped, with why, and never opened when its name is not UTF-8, holds a
//! control or bidirectional-formatting character, a `"` or `\`, or when its
//! path under `/out` is longer than [`MAX_PATH_BYTES`] or deeper than
//! [`MAX_DEPTH`]. Symlinks, FIFOs, sockets and devices are skipped likewise.
//! A name that passes is safe to show in a terminal or a log line and to put
//! in a URL or `Content-Disposition` once encoded; `'`, `%`, `;`, spaces and
//! other printable characters are kept as they are.
//!
//! Nothing under `/out` makes [`collect`] fail: a bad entry is skipped, not an
//! error. It fails only when `/out` itself cannot be read, when the walk
//! meets more than [`MAX_ENTRIES`] entries, or when the destination cannot be
//! written; the sandbox turns any such failure into a failed job
//! ([`FailureKind::Output`](super::FailureKind::Output)), never a host error.

use std::io::{self, Read, Write};
use std::path::Path;

use cap_fs_ext::{FollowSymlinks, OpenOptionsFollowExt};
use cap_std::ambient_authority;
use cap_std::fs::{Dir, OpenOptions, OpenOptionsExt};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

pub use crate::job::{OutputFile, SkippedOutput};

/// How deep collection descends into `/out`.
pub const MAX_DEPTH: usize = 16;

/// Longest path of an output under `/out`, in bytes. Far below `PATH_MAX`
/// (4096) even once prefixed with a data directory, so every collected
/// output can be named by path again (downloads, `--out`).
pub const MAX_PATH_BYTES: usize = 1024;

/// Most entries one walk of `/out` visits before it gives up (the output
/// quota bounds a job's entries far below this).
pub const MAX_ENTRIES: usize = 65_536;

/// A file's identity on the host: its device, its inode, and what tells a
/// freed inode number given to a new file from the file it was: the
/// inode's birth time and the file system's handle for it, which carries
/// the inode's generation (each zero where the file system gives none).
/// Birth time alone is not enough: a file system may keep none, and one
/// that does may stamp two files made within a clock tick alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct FileId {
    /// `st_dev`.
    pub dev: u64,
    /// `st_ino`.
    pub ino: u64,
    /// Birth time: seconds and nanoseconds.
    pub born: (i64, u32),
    /// The file handle (`name_to_handle_at`), hashed.
    pub handle: u64,
}

impl FileId {
    /// The identity of the file `fd` holds open (a `statx` and a
    /// `name_to_handle_at`).
    ///
    /// # Errors
    /// What `statx` says.
    pub fn of(fd: impl std::os::fd::AsFd) -> io::Result<Self> {
        use rustix::fs::{AtFlags, StatxFlags};
        let fd = fd.as_fd();
        let st = rustix::fs::statx(
            fd,
            "",
            AtFlags::EMPTY_PATH,
            StatxFlags::INO | StatxFlags::BTIME,
        )?;
        let born = if st.stx_mask & StatxFlags::BTIME.bits() != 0 {
            (st.stx_btime.tv_sec, st.stx_btime.tv_nsec)
        } else {
            (0, 0)
        };
        Ok(Self {
            dev: rustix::fs::makedev(st.stx_dev_major, st.stx_dev_minor),
            ino: st.stx_ino,
            born,
            handle: handle_of(fd),
        })
    }

    /// Whether it tells this file from one a freed inode number is given
    /// to later: the file system gave a handle or a birth time.
    pub fn distinct(&self) -> bool {
        self.handle != 0 || self.born != (0, 0)
    }
}

/// Whether the file system of directory `dir` tells its files apart: a
/// probe file is made there and removed, then another at the same name,
/// and so on; each must be [`FileId::distinct`] and no two the same
/// (a file system that gives a freed inode number to the next file and
/// whose handles carry nothing more, such as one with a generation that is
/// always zero, fails here).
///
/// # Errors
/// A probe could not be made.
pub fn tells_files_apart(dir: &Path) -> io::Result<bool> {
    let probe = dir.join(format!(".identity-{}", uuid::Uuid::new_v4().simple()));
    let mut seen: Vec<FileId> = Vec::new();
    for _ in 0..4 {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&probe)?;
        let id = FileId::of(&file);
        drop(file);
        std::fs::remove_file(&probe)?;
        let id = id?;
        if !id.distinct() || seen.contains(&id) {
            return Ok(false);
        }
        seen.push(id);
    }
    Ok(true)
}

/// Whether a handle of `kind` (`f` its bytes) is only an inode number: the
/// kernel's generic handles (`FILEID_INO32_GEN`, and `FILEID_INO64_GEN`,
/// which every file system without export operations gives for
/// `AT_HANDLE_FID`) with a generation of zero, which is what a file system
/// that keeps no generation puts there. Where the generation lies depends
/// on the layout, told by the handle's size: `{ ino: u32, gen: u32 }`,
/// `{ ino: u64, gen: u32 }`, and tmpfs's own `FILEID_INO32_GEN` of
/// `{ gen: u32, ino: u64 }`. Any other handle tells files apart.
fn only_inode_number(kind: libc::c_int, f: &[u8]) -> bool {
    const FILEID_INO32_GEN: libc::c_int = 1;
    const FILEID_INO64_GEN: libc::c_int = 0x81;
    let generation = match (kind, f.len()) {
        (FILEID_INO32_GEN, 8) => &f[4..8],
        (FILEID_INO32_GEN, 12) => &f[0..4],
        (FILEID_INO64_GEN, 12) => &f[8..12],
        _ => return false,
    };
    generation.iter().all(|&b| b == 0)
}

/// The file system's handle for the inode `fd` holds open, hashed; zero
/// where it gives none, or one that is only the inode number
/// ([`only_inode_number`]). The handle names the inode and its generation,
/// which a file system that reuses inode numbers (ext4, xfs, tmpfs) draws
/// anew for each file it makes.
fn handle_of(fd: std::os::fd::BorrowedFd<'_>) -> u64 {
    use std::os::fd::AsRawFd;
    #[repr(C)]
    struct Handle {
        bytes: libc::c_uint,
        kind: libc::c_int,
        f: [u8; libc::MAX_HANDLE_SZ as usize],
    }
    // An identifying handle first (any file system that can make one,
    // Linux 6.5 on), then an exportable one.
    for flags in [
        libc::AT_EMPTY_PATH | libc::AT_HANDLE_FID,
        libc::AT_EMPTY_PATH,
    ] {
        let mut handle = Handle {
            bytes: libc::MAX_HANDLE_SZ as libc::c_uint,
            kind: 0,
            f: [0; libc::MAX_HANDLE_SZ as usize],
        };
        let mut mount_id: libc::c_int = 0;
        // SAFETY: `handle` is a `file_handle` with room for the largest
        // handle, its size in `bytes`; the path is an empty C string.
        let done = unsafe {
            libc::name_to_handle_at(
                fd.as_raw_fd(),
                c"".as_ptr(),
                (&raw mut handle).cast(),
                &raw mut mount_id,
                flags,
            )
        };
        if done == 0 {
            let len = (handle.bytes as usize).min(handle.f.len());
            if only_inode_number(handle.kind, &handle.f[..len]) {
                return 0;
            }
            let mut hash = Sha256::new();
            hash.update(handle.kind.to_le_bytes());
            hash.update(&handle.f[..len]);
            let digest = hash.finalize();
            let mut first = [0u8; 8];
            first.copy_from_slice(&digest[..8]);
            return u64::from_le_bytes(first).max(1);
        }
        // EINVAL: a kernel that knows no AT_HANDLE_FID.
        if io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
            break;
        }
    }
    0
}

/// The regular files a job created in its `/out` (by the guest's own
/// opens, or the host's for its stdout file): only these are collected.
/// A file put there by anyone else — moved in, hard-linked in (even once
/// its other name is gone), or inside a directory moved in — is skipped as
/// `not-created`.
pub type Created = std::collections::HashSet<FileId>;

/// What collection found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Collected {
    /// Regular files, sorted by name.
    pub files: Vec<OutputFile>,
    /// Everything else.
    pub skipped: Vec<SkippedOutput>,
}

/// Why outputs could not be collected. Messages name no host path, so they
/// can go to clients as they are.
#[derive(Debug, thiserror::Error)]
pub enum CollectError {
    /// `/out` itself could not be opened or listed.
    #[error("cannot read the output directory: {0}")]
    Root(io::Error),
    /// The walk met more entries than [`MAX_ENTRIES`].
    #[error("the output directory holds more than {MAX_ENTRIES} entries")]
    TooManyEntries,
    /// Past the collection's [`Bounds`].
    #[error("the output directory holds {0}, above the module's limits")]
    OverLimit(String),
    /// The copy destination could not be created or written.
    #[error("cannot copy output `{name}`: {source}")]
    Copy {
        /// The output, relative to `/out`.
        name: String,
        /// What failed.
        source: io::Error,
    },
}

impl From<CollectError> for io::Error {
    fn from(e: CollectError) -> Self {
        io::Error::other(e)
    }
}

/// Why `name` (one path component) is refused as an output name, if it is:
/// `control-char` (C0, DEL, C1 including U+0085, U+2028, U+2029),
/// `format-char` (bidirectional controls U+061C, U+200E, U+200F,
/// U+202A..U+202E, U+2066..U+2069, and invisible ones: U+200B..U+200D,
/// U+2060..U+2064, U+FEFF, U+FFF9..U+FFFB), `reserved-char` (`"`, `\`).
pub fn check_name(name: &str) -> Result<(), &'static str> {
    for c in name.chars() {
        let u = u32::from(c);
        if u < 0x20 || (0x7f..=0x9f).contains(&u) || matches!(u, 0x2028 | 0x2029) {
            return Err("control-char");
        }
        if matches!(
            u,
            0x061c
                | 0x200b..=0x200f
                | 0x202a..=0x202e
                | 0x2060..=0x2064
                | 0x2066..=0x2069
                | 0xfeff
                | 0xfff9..=0xfffb
        ) {
            return Err("format-char");
        }
        if matches!(c, '"' | '\\') {
            return Err("reserved-char");
        }
    }
    Ok(())
}

/// A name made safe to print: every character [`check_name`] refuses is
/// escaped (`\u{202e}`), and every byte that is not UTF-8 (`\xff`).
fn printable(raw: &std::ffi::OsStr) -> String {
    let bytes = raw.as_encoded_bytes();
    let mut out = String::new();
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            if check_name(c.encode_utf8(&mut [0; 4])).is_ok() {
                out.push(c);
            } else {
                out.extend(c.escape_unicode());
            }
        }
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

/// Hashes every regular file under `out_dir` and, when `copy_to` is given,
/// copies each into the same relative path there (created mode 0700, files
/// 0600, all by handle).
///
/// # Errors
/// [`CollectError`]: only if `out_dir` itself cannot be read, the walk meets
/// more than [`MAX_ENTRIES`] entries, or `copy_to` cannot be written; a bad
/// entry inside `out_dir` is skipped, not an error.
///
/// With `created`, only files whose identity is in it are taken; the rest
/// are skipped as `not-created`.
pub fn collect(
    out_dir: &Path,
    copy_to: Option<&Path>,
    bounds: Bounds,
    created: Option<&Created>,
) -> Result<Collected, CollectError> {
    let root = Dir::open_ambient_dir(out_dir, ambient_authority()).map_err(CollectError::Root)?;
    collect_in(&root, copy_to, bounds, created)
}

/// Collects the outputs under `parent`'s entry `name`, opened without
/// following a symlink at any step: for a `/out` a worker process wrote,
/// where `parent` is a directory the gateway made and the worker cannot
/// replace, and the worker may have made `name` a symlink.
///
/// # Errors
/// As for [`collect`].
///
/// Collection stops with [`CollectError::OverLimit`] past `bounds`: what a
/// worker leaves was not metered by a sandbox the gateway can trust (a
/// sparse file of any size costs it nothing).
pub fn collect_beneath(
    parent: &Path,
    name: &str,
    copy_to: Option<&Path>,
    bounds: Bounds,
    created: Option<&Created>,
) -> Result<Collected, CollectError> {
    let parent = Dir::open_ambient_dir(parent, ambient_authority()).map_err(CollectError::Root)?;
    let root = open_subdir(&parent, name).map_err(CollectError::Root)?;
    collect_in(&root, copy_to, bounds, created)
}

/// What collecting an empty `/out` yields: nothing, and with `copy_to`
/// that directory, made as a collection makes it.
///
/// # Errors
/// [`CollectError::Copy`] when `copy_to` cannot be made.
pub fn collect_nothing(copy_to: Option<&Path>) -> Result<Collected, CollectError> {
    if let Some(path) = copy_to {
        super::job::create_private_dir_all(path).map_err(|source| CollectError::Copy {
            name: String::new(),
            source,
        })?;
    }
    Ok(Collected::default())
}

/// Whether `parent`'s entry `name` is a directory (not a link to one) with
/// nothing in it; false when it cannot be read.
pub fn is_empty_beneath(parent: &Path, name: &str) -> bool {
    Dir::open_ambient_dir(parent, ambient_authority())
        .and_then(|p| open_subdir(&p, name))
        .and_then(|d| d.entries())
        .is_ok_and(|mut entries| entries.next().is_none())
}

/// The most a collection takes: bytes of regular files in all, regular
/// files, and entries of any kind met (directories and skipped entries
/// too: each is a directory created in the copy or a line in the report).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bounds {
    /// Bytes of all regular files together.
    pub bytes: u64,
    /// Regular files.
    pub files: u64,
    /// Entries of any kind.
    pub entries: u64,
}

impl Bounds {
    /// No bound beyond [`MAX_ENTRIES`] (for a `/out` whose writes the
    /// sandbox metered).
    pub const NONE: Bounds = Bounds {
        bytes: u64::MAX,
        files: u64::MAX,
        entries: u64::MAX,
    };

    /// What `limits` lets a guest leave in `/out`.
    pub fn of(limits: &crate::policy::Limits) -> Self {
        Self {
            bytes: limits.output.as_u64(),
            files: u64::from(limits.output_files),
            entries: u64::from(limits.output_files),
        }
    }
}

fn collect_in(
    root: &Dir,
    copy_to: Option<&Path>,
    bounds: Bounds,
    created: Option<&Created>,
) -> Result<Collected, CollectError> {
    let dest = match copy_to {
        Some(path) => {
            let copy = |source| CollectError::Copy {
                name: String::new(),
                source,
            };
            super::job::create_private_dir_all(path).map_err(copy)?;
            Some(Dir::open_ambient_dir(path, ambient_authority()).map_err(copy)?)
        }
        None => None,
    };
    let mut collected = Collected::default();
    let mut walk = Walk {
        out: &mut collected,
        visited: 0,
        bounds,
        bytes: 0,
        created,
    };
    let entries = root.entries().map_err(CollectError::Root)?;
    walk.dir(root, entries, "", 0, dest.as_ref())?;
    collected.files.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(collected)
}

struct Walk<'a> {
    out: &'a mut Collected,
    visited: usize,
    bounds: Bounds,
    /// Bytes of regular files taken so far.
    bytes: u64,
    /// The files the job created, when known: nothing else is taken.
    created: Option<&'a Created>,
}

impl Walk<'_> {
    fn skip(&mut self, prefix: &str, raw: &std::ffi::OsStr, reason: &str) {
        let name = printable(raw);
        self.out.skipped.push(SkippedOutput {
            name: if prefix.is_empty() {
                name
            } else {
                format!("{}/{name}", printable(prefix.as_ref()))
            },
            reason: reason.to_owned(),
        });
    }

    fn dir(
        &mut self,
        dir: &Dir,
        entries: cap_std::fs::ReadDir,
        prefix: &str,
        depth: usize,
        dest: Option<&Dir>,
    ) -> Result<(), CollectError> {
        for entry in entries {
            self.visited += 1;
            if self.visited > MAX_ENTRIES {
                return Err(CollectError::TooManyEntries);
            }
            if self.visited as u64 > self.bounds.entries {
                return Err(CollectError::OverLimit(format!(
                    "more than {} entries",
                    self.bounds.entries
                )));
            }
            let Ok(entry) = entry else {
                self.skip(prefix, "?".as_ref(), "unreadable");
                continue;
            };
            let raw_name = entry.file_name();
            let Some(name) = raw_name.to_str() else {
                self.skip(prefix, &raw_name, "not-utf8");
                continue;
            };
            if let Err(reason) = check_name(name) {
                self.skip(prefix, &raw_name, reason);
                continue;
            }
            let rel = if prefix.is_empty() {
                name.to_owned()
            } else {
                format!("{prefix}/{name}")
            };
            if rel.len() > MAX_PATH_BYTES {
                self.skip(prefix, &raw_name, "path-too-long");
                continue;
            }
            // `file_type` comes from the directory entry or `lstat`; it never
            // follows a link.
            let Ok(ty) = entry.file_type() else {
                self.skip(prefix, &raw_name, "unreadable");
                continue;
            };
            if ty.is_dir() {
                if depth + 1 >= MAX_DEPTH {
                    self.skip(prefix, &raw_name, "too-deep");
                    continue;
                }
                let Some((sub, sub_entries)) = open_subdir(dir, name)
                    .and_then(|d| d.entries().map(|e| (d, e)))
                    .ok()
                else {
                    self.skip(prefix, &raw_name, "unreadable");
                    continue;
                };
                let sub_dest = match dest.map(|d| make_dir(d, name)) {
                    Some(Ok(d)) => Some(d),
                    // The copy is new and written by this walk alone: a
                    // name already in it was listed twice (renamed while
                    // walked), not the host's failure.
                    Some(Err(e)) if e.kind() == io::ErrorKind::AlreadyExists => {
                        self.skip(prefix, &raw_name, "duplicate");
                        continue;
                    }
                    Some(Err(source)) => {
                        return Err(CollectError::Copy {
                            name: rel.clone(),
                            source,
                        });
                    }
                    None => None,
                };
                self.dir(&sub, sub_entries, &rel, depth + 1, sub_dest.as_ref())?;
            } else if ty.is_file() {
                if self.out.files.len() as u64 >= self.bounds.files {
                    return Err(CollectError::OverLimit(format!(
                        "more than {} output files",
                        self.bounds.files
                    )));
                }
                let left = self.bounds.bytes.saturating_sub(self.bytes);
                match read_regular(dir, name, dest, left, self.created) {
                    Ok(Some((size, sha256))) => {
                        self.bytes += size;
                        self.out.files.push(OutputFile {
                            name: rel,
                            size,
                            sha256,
                        });
                    }
                    Err(Failed::OverLimit) => {
                        return Err(CollectError::OverLimit(format!(
                            "outputs larger than {} bytes",
                            self.bounds.bytes
                        )));
                    }
                    Ok(None) => self.skip(prefix, &raw_name, "not-regular"),
                    Err(Failed::Copy(source)) if source.kind() == io::ErrorKind::AlreadyExists => {
                        self.skip(prefix, &raw_name, "duplicate");
                    }
                    Err(Failed::Copy(source)) => {
                        return Err(CollectError::Copy { name: rel, source });
                    }
                    Err(Failed::Source) => self.skip(prefix, &raw_name, "unreadable"),
                    Err(Failed::Linked) => self.skip(prefix, &raw_name, "hard-link"),
                    Err(Failed::NotCreated) => self.skip(prefix, &raw_name, "not-created"),
                }
            } else {
                self.skip(prefix, &raw_name, kind_of(&ty));
            }
        }
        Ok(())
    }
}

/// Creates `name` (mode 0700) under `parent` and opens it, never following
/// a link and never across a mount: one put on the new directory between
/// its creation and its opening would have the copy written into another
/// directory.
fn make_dir(parent: &Dir, name: &str) -> io::Result<Dir> {
    use cap_std::fs::DirBuilderExt;
    let mut builder = cap_std::fs::DirBuilder::new();
    builder.mode(0o700);
    parent.create_dir_with(name, &builder)?;
    let fd = super::beneath::open_dir_in(parent, name)?;
    Ok(Dir::from_std_file(std::fs::File::from(fd)))
}

/// The directory `name` in `parent`, never through a link and never
/// across a mount (one put on an output directory is another file
/// system's, whose files are not the job's).
fn open_subdir(parent: &Dir, name: &str) -> io::Result<Dir> {
    let fd = super::beneath::open_dir_in(parent, name)?;
    Ok(Dir::from_std_file(std::fs::File::from(fd)))
}

fn kind_of(ty: &cap_std::fs::FileType) -> &'static str {
    use cap_std::fs::FileTypeExt;
    if ty.is_symlink() {
        "symlink"
    } else if ty.is_fifo() {
        "fifo"
    } else if ty.is_socket() {
        "socket"
    } else if ty.is_block_device() || ty.is_char_device() {
        "device"
    } else {
        "unknown"
    }
}

/// Which side of a copy failed.
enum Failed {
    /// Reading the guest's file: the entry is skipped.
    Source,
    /// Writing the destination: collection fails.
    Copy(io::Error),
    /// More bytes than the collection's bounds leave.
    OverLimit,
    /// A file with a second name (a hard link put in `/out` to another
    /// file): the entry is skipped.
    Linked,
    /// A file the job did not create (moved or linked in from elsewhere):
    /// the entry is skipped.
    NotCreated,
}

/// Opens `name` without following links and without blocking (a FIFO swapped
/// in would otherwise block the open), then confirms on the handle that it
/// is a regular file. Returns size and digest, or `None` if it is not
/// regular. With `dest`, creates `name` there (`O_EXCL`, mode 0600, never
/// following a link) and copies the bytes.
fn read_regular(
    dir: &Dir,
    name: &str,
    dest: Option<&Dir>,
    left: u64,
    created: Option<&Created>,
) -> Result<Option<(u64, String)>, Failed> {
    // Never through a link, never across a mount (a file bind-mounted
    // over an output is another file system's).
    let mut file =
        std::fs::File::from(super::beneath::open_file_in(dir, name).map_err(|_| Failed::Source)?);
    let meta = file.metadata().map_err(|_| Failed::Source)?;
    if !meta.is_file() {
        return Ok(None);
    }
    // Another name of it anywhere (a hard link to a file the job never
    // wrote) makes its bytes no one's to vouch for: not collected, as a
    // download refuses one.
    if std::os::unix::fs::MetadataExt::nlink(&meta) > 1 {
        return Err(Failed::Linked);
    }
    // The very inode the job created, not one put in its place: a second
    // name can be gone by now (another job's inputs, removed when it
    // ended), and a file moved in never had one here.
    if let Some(created) = created
        && !FileId::of(&file).is_ok_and(|id| created.contains(&id))
    {
        return Err(Failed::NotCreated);
    }
    let mut sink = match dest {
        Some(dest) => {
            let mut options = OpenOptions::new();
            options
                .write(true)
                .create_new(true)
                .follow(FollowSymlinks::No)
                .mode(0o600);
            Some(dest.open_with(name, &options).map_err(Failed::Copy)?)
        }
        None => None,
    };
    let copied = copy_hashing(&mut file, sink.as_mut().map(|f| f as &mut dyn Write), left);
    match copied {
        Ok(done) => Ok(Some(done)),
        Err(e) => {
            // A skipped entry leaves no partial copy behind.
            if let Some(dest) = dest {
                let _ = dest.remove_file(name);
            }
            Err(match e {
                CopyFailed::Read(_) => Failed::Source,
                CopyFailed::OverLimit => Failed::OverLimit,
                CopyFailed::Write(e) => Failed::Copy(e),
            })
        }
    }
}

/// Why [`copy_hashing`] stopped.
#[derive(Debug)]
pub(crate) enum CopyFailed {
    /// Reading the source failed.
    Read(io::Error),
    /// The source held more than the bytes allowed.
    OverLimit,
    /// Writing the copy failed.
    Write(io::Error),
}

/// Reads `from` to its end, at most `max` bytes, writing each chunk to
/// `to` if given; returns the length and the sha256 (hex) of what was read.
pub(crate) fn copy_hashing(
    from: &mut dyn Read,
    mut to: Option<&mut dyn Write>,
    max: u64,
) -> Result<(u64, String), CopyFailed> {
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = from.read(&mut buf).map_err(CopyFailed::Read)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        if size > max {
            return Err(CopyFailed::OverLimit);
        }
        hasher.update(&buf[..n]);
        if let Some(to) = to.as_mut() {
            to.write_all(&buf[..n]).map_err(CopyFailed::Write)?;
        }
    }
    Ok((size, hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name met twice in one walk (a guest's or a worker's rename while
    /// the walk lists `/out`) is skipped as a duplicate, not a failure of
    /// the host's copy, which would re-run the job. The copy is made to
    /// already hold both names here: what a second listing of them finds.
    #[test]
    fn a_name_met_twice_is_skipped_not_a_host_failure() {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(tmp.path().join("out/d")).unwrap();
        std::fs::write(tmp.path().join("out/a.txt"), b"a").unwrap();
        std::fs::write(tmp.path().join("out/b.txt"), b"b").unwrap();
        let dest = tmp.path().join("dest");
        std::fs::create_dir_all(dest.join("d")).unwrap();
        std::fs::write(dest.join("a.txt"), b"already").unwrap();
        let got = collect(&tmp.path().join("out"), Some(&dest), Bounds::NONE, None).unwrap();
        let names: Vec<_> = got.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["b.txt"]);
        let mut skipped: Vec<_> = got
            .skipped
            .iter()
            .map(|s| (s.name.as_str(), s.reason.as_str()))
            .collect();
        skipped.sort_unstable();
        assert_eq!(skipped, [("a.txt", "duplicate"), ("d", "duplicate")]);
    }

    /// Where the child of [`a_mount_in_out_is_not_collected`] finds its
    /// directories.
    const MOUNTED: &str = "BULKHEAD_TEST_OUTPUTS_MOUNTED";

    /// A directory or a file bind-mounted into `/out` (or over the worker's
    /// `/out` itself) is another file system's: not collected, not copied.
    /// Made in a mount namespace of a child of this test binary.
    #[test]
    fn a_mount_in_out_is_not_collected() {
        if let Ok(dir) = std::env::var(MOUNTED) {
            let dir = Path::new(&dir);
            let dest = dir.join("dest");
            let got = collect(&dir.join("out"), Some(&dest), Bounds::NONE, None).unwrap();
            let names: Vec<_> = got.files.iter().map(|f| f.name.as_str()).collect();
            assert_eq!(names, ["mine.txt"]);
            assert!(walk_has_no(&dest, b"host secret"));
            let err = collect_beneath(dir, "over", None, Bounds::NONE, None).unwrap_err();
            assert!(matches!(err, CollectError::Root(_)), "{err:?}");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        for d in ["out/s0", "victim/sub", "over"] {
            std::fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        std::fs::write(tmp.path().join("out/mine.txt"), b"mine").unwrap();
        std::fs::write(tmp.path().join("out/f.txt"), b"").unwrap();
        std::fs::write(tmp.path().join("victim/secret.txt"), b"host secret").unwrap();
        std::fs::write(tmp.path().join("victim/sub/deep.txt"), b"host secret").unwrap();
        crate::rerun_with_binds(
            "sandbox::outputs::tests::a_mount_in_out_is_not_collected",
            MOUNTED,
            tmp.path(),
            &[
                ("victim", "out/s0"),
                ("victim/secret.txt", "out/f.txt"),
                ("victim", "over"),
            ],
        );
    }

    /// Whether no file below `dir` holds `bytes`.
    fn walk_has_no(dir: &Path, bytes: &[u8]) -> bool {
        let mut todo = vec![dir.to_owned()];
        while let Some(d) = todo.pop() {
            for entry in std::fs::read_dir(&d).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    todo.push(path);
                } else if std::fs::read(&path).unwrap_or_default() == bytes {
                    return false;
                }
            }
        }
        true
    }

    #[test]
    fn collects_regular_files_and_skips_links_and_fifos() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let secret = tmp.path().join("secret");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(&secret, b"host secret").unwrap();
        std::fs::write(out.join("ok.txt"), b"ok").unwrap();
        std::os::unix::fs::symlink(&secret, out.join("abs-link")).unwrap();
        std::os::unix::fs::symlink("../secret", out.join("rel-link")).unwrap();
        std::fs::create_dir(out.join("sub")).unwrap();
        std::fs::write(out.join("sub/nested.txt"), b"n").unwrap();
        std::os::unix::fs::symlink(tmp.path(), out.join("dir-link")).unwrap();
        // A hard link to a file outside, and two names of one file inside.
        std::fs::hard_link(&secret, out.join("hard-link")).unwrap();
        std::fs::write(out.join("twice-a"), b"t").unwrap();
        std::fs::hard_link(out.join("twice-a"), out.join("twice-b")).unwrap();
        let fifo = out.join("pipe");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);

        let dest = tmp.path().join("dest");
        let got = collect(&out, Some(&dest), Bounds::NONE, None).unwrap();
        let names: Vec<_> = got.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["ok.txt", "sub/nested.txt"]);
        let mut skipped: Vec<_> = got
            .skipped
            .iter()
            .map(|s| (s.name.as_str(), s.reason.as_str()))
            .collect();
        skipped.sort();
        assert_eq!(
            skipped,
            [
                ("abs-link", "symlink"),
                ("dir-link", "symlink"),
                ("hard-link", "hard-link"),
                ("pipe", "fifo"),
                ("rel-link", "symlink"),
                ("twice-a", "hard-link"),
                ("twice-b", "hard-link")
            ]
        );
        assert_eq!(std::fs::read(dest.join("ok.txt")).unwrap(), b"ok");
        assert!(!dest.join("abs-link").exists());
        assert!(!dest.join("rel-link").exists());
        assert!(!dest.join("hard-link").exists());
    }
}

#[cfg(test)]
mod bounds_tests {
    use super::*;

    /// What a worker leaves is bounded when it is copied: a sparse file
    /// costs the worker nothing and the gateway its disk.
    #[test]
    fn a_worker_written_out_is_copied_only_within_its_bounds() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("j1.out");
        std::fs::create_dir(&out).unwrap();
        std::fs::File::create(out.join("sparse.bin"))
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let dest = tmp.path().join("kept");
        let bounds = Bounds {
            bytes: 1 << 20,
            files: 4,
            entries: 8,
        };
        let err = collect_beneath(tmp.path(), "j1.out", Some(&dest), bounds, None).unwrap_err();
        assert!(matches!(err, CollectError::OverLimit(_)), "{err}");
        // Nothing partial is left behind.
        assert!(!dest.join("sparse.bin").exists());

        std::fs::remove_file(out.join("sparse.bin")).unwrap();
        for i in 0..5 {
            std::fs::write(out.join(format!("f{i}")), b"x").unwrap();
        }
        let err = collect_beneath(tmp.path(), "j1.out", None, bounds, None).unwrap_err();
        assert!(matches!(err, CollectError::OverLimit(_)), "{err}");
        std::fs::remove_file(out.join("f4")).unwrap();
        let ok = collect_beneath(tmp.path(), "j1.out", None, bounds, None).unwrap();
        assert_eq!(ok.files.len(), 4);
        // Empty directories and entries that are skipped count too.
        for i in 0..3 {
            std::fs::create_dir(out.join(format!("d{i}"))).unwrap();
        }
        std::os::unix::fs::symlink("/etc/passwd", out.join("link")).unwrap();
        assert!(collect_beneath(tmp.path(), "j1.out", None, bounds, None).is_ok());
        std::os::unix::fs::symlink("/etc/passwd", out.join("link2")).unwrap();
        let err = collect_beneath(tmp.path(), "j1.out", Some(&dest), bounds, None).unwrap_err();
        assert!(matches!(err, CollectError::OverLimit(_)), "{err}");
    }
}

#[cfg(test)]
mod identity_tests {
    use super::*;

    /// A file system made for the test and mounted, unmounted on drop.
    struct Mounted {
        dir: tempfile::TempDir,
    }

    impl Drop for Mounted {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg(self.dir.path().join("m"))
                .status();
        }
    }

    /// An ext4 with 128-byte inodes, which keep no birth time, mounted from
    /// a file; `None` where the test cannot make one (not root, no
    /// `mkfs.ext4`), which fails under CI.
    fn ext4_without_birth_times() -> Option<Mounted> {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("fs.img");
        std::fs::File::create(&image)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        let run = |program: &str, args: &[&std::ffi::OsStr]| {
            std::process::Command::new(program)
                .args(args)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let mount = dir.path().join("m");
        std::fs::create_dir(&mount).unwrap();
        let made = run(
            "mkfs.ext4",
            &[
                "-q".as_ref(),
                "-I".as_ref(),
                "128".as_ref(),
                "-F".as_ref(),
                image.as_os_str(),
            ],
        ) && run(
            "mount",
            &[
                "-o".as_ref(),
                "loop".as_ref(),
                image.as_os_str(),
                mount.as_os_str(),
            ],
        );
        if !made {
            assert!(
                std::env::var_os("CI").is_none(),
                "cannot make and mount an ext4 (mkfs.ext4, a loop device, root)"
            );
            eprintln!("skipped: cannot make and mount an ext4 here");
            return None;
        }
        Some(Mounted { dir })
    }

    /// On a file system that keeps no birth time and gives a freed inode
    /// number to the next file it makes, the new file is told from the
    /// one that had the number: a job that made and removed a file does
    /// not thereby hold the identity of whatever file is made next there
    /// (found by an attacker: another job's input moved into such a job's
    /// `/out` was read and collected as its own).
    #[test]
    fn a_file_given_a_freed_inode_number_is_another_file() {
        let Some(fs) = ext4_without_birth_times() else {
            return;
        };
        let root = fs.dir.path().join("m");
        let first = std::fs::File::create(root.join("made")).unwrap();
        let made = FileId::of(&first).unwrap();
        drop(first);
        assert_eq!(made.born, (0, 0), "this ext4 keeps birth times");
        std::fs::remove_file(root.join("made")).unwrap();
        let next = std::fs::File::create(root.join("next")).unwrap();
        let next = FileId::of(&next).unwrap();
        assert_eq!(next.ino, made.ino, "the inode number was not reused");
        assert!(made.distinct() && next.distinct());
        assert_ne!(next, made);
    }

    /// A file system whose handles carry only the inode number (ramfs: no
    /// export operations, so the kernel's generic handle, with a
    /// generation that is always zero) and which keeps no birth time is
    /// not taken to tell files apart (found by an attacker: any handle at
    /// all was taken as proof).
    #[test]
    fn handles_that_are_only_inode_numbers_tell_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("m");
        std::fs::create_dir(&mount).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "ramfs", "ramfs"])
            .arg(&mount)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !mounted {
            assert!(
                std::env::var_os("CI").is_none(),
                "cannot mount a ramfs (root)"
            );
            eprintln!("skipped: cannot mount a ramfs here");
            return;
        }
        let fs = Mounted { dir };
        let root = fs.dir.path().join("m");
        let file = std::fs::File::create(root.join("f")).unwrap();
        let id = FileId::of(&file).unwrap();
        assert_eq!(id.handle, 0, "{id:?}");
        assert!(!id.distinct(), "{id:?}");
        assert!(!tells_files_apart(&root).unwrap());
    }

    /// The generation is read where each layout keeps it: tmpfs's
    /// `FILEID_INO32_GEN` puts it first, before a 64-bit inode number, so
    /// an inode number whose low half is zero is not taken for a missing
    /// generation, nor a real zero generation missed.
    #[test]
    fn a_handles_generation_is_read_where_its_layout_keeps_it() {
        let words = |w: &[u32]| w.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        // Generic 32-bit: { ino, gen }.
        assert!(only_inode_number(1, &words(&[7, 0])));
        assert!(!only_inode_number(1, &words(&[0, 9])));
        // tmpfs: { gen, ino (low), ino (high) }.
        assert!(!only_inode_number(1, &words(&[9, 0, 1])));
        assert!(only_inode_number(1, &words(&[0, 7, 0])));
        // Generic 64-bit: { ino (low), ino (high), gen }.
        assert!(only_inode_number(0x81, &words(&[7, 1, 0])));
        assert!(!only_inode_number(0x81, &words(&[0, 0, 9])));
        // Any other handle tells files apart.
        assert!(!only_inode_number(1, &words(&[0])));
        assert!(!only_inode_number(0x4d, &words(&[0, 0])));
    }
}
