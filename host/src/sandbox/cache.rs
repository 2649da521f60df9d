//! The on-disk cache of precompiled components, so a restart does not
//! recompile every module, and the checks that keep this host's private
//! directories (the cache, the work directory) private.
//!
//! Layout: `<cache dir>/<engine key>/<module sha256>.cwasm`, where the engine
//! key hashes wasmtime's own compatibility hash (compiler, settings, wasmtime
//! version): a different engine never finds, let alone loads, an artifact it
//! did not make.
//!
//! An artifact is native code, so it is never trusted for where it lies:
//! - the cache directory and every directory above it must pass
//!   [`ensure_private_dir`] (owned by root or this user, not writable by
//!   group or others, except a sticky directory above the cache such as
//!   `/tmp`), or the sandbox refuses to start;
//! - the cache directory and the engine's subdirectory are opened once and
//!   every later read and write goes through those handles, never following
//!   a link, so renaming a path afterwards changes nothing;
//! - an artifact is read whole into memory, authenticated there, and
//!   deserialized from that buffer (never mapped from a file someone could
//!   rewrite after the check). How it is authenticated depends on who else
//!   can write the directory ([`Trust`]):
//!   - this process's own cache (the gateway in-process, `bulkhead run
//!     --in-process`): each artifact carries an HMAC-SHA256 tag under a key
//!     only this host holds (`<cache dir>/cache.key`, 32 random bytes, mode
//!     0600, created on first use), computed over the engine key, the
//!     module's sha256 and the artifact bytes;
//!   - a zone's cache (a worker process): the gateway alone writes it,
//!     and each zone's workers only read it (Landlock). A worker that
//!     compiles a module writes the artifact into its own work directory
//!     and reports its sha256 and length; the gateway copies it into the
//!     zone's cache (`<engine key>/<artifact sha256>.cwasm`, checked as
//!     copied: [`take_handoff`]) and records it ([`ArtifactRecords`]),
//!     only when the worker had run no guest when it compiled it. An
//!     artifact is loaded only when its sha256 and length are the ones
//!     the gateway sent with the module ([`Artifact`]). No key file is
//!     made or read there.
//!
//!   An artifact that fails (planted, copied from another module's name,
//!   corrupted, rewritten) is never deserialized: the module is compiled
//!   from its verified `.wasm` and the entry overwritten, with a warning.

use std::hash::{Hash, Hasher};
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cap_fs_ext::{FollowSymlinks, OpenOptionsFollowExt};
use cap_std::ambient_authority;
use cap_std::fs::{Dir, MetadataExt as _, OpenOptions, OpenOptionsExt};
use hmac::{Hmac, Mac};
use sha2::Sha256;
use wasmtime::Engine;
use wasmtime::component::Component;

use crate::policy::Sha256Hex;

/// Name of the MAC key file inside the cache directory.
pub const KEY_FILE: &str = "cache.key";
/// Length of the key and of each artifact's tag.
const TAG_LEN: usize = 32;
/// Largest artifact read back from the cache.
const MAX_ARTIFACT: u64 = 1 << 30;

/// Why a directory (or the cache key) is not private enough to use.
#[derive(Debug, thiserror::Error)]
pub enum PrivateDirError {
    /// Owned by someone other than root or this user.
    #[error(
        "{path} is owned by uid {owner}, not by root or this user (uid {uid}); refusing to use it"
    )]
    Owner {
        /// The offending path.
        path: PathBuf,
        /// Its owner.
        owner: u32,
        /// This process's user.
        uid: u32,
    },
    /// Writable by group or others (and not a sticky directory above it).
    #[error(
        "{path} has mode {mode:04o}: other users may write to it; refusing to use it (remove group and other write permission, or choose another directory)"
    )]
    Writable {
        /// The offending path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// Not a directory (or, for the key, not a regular file).
    #[error("{path} is not a {expected}; refusing to use it")]
    NotA {
        /// The offending path.
        path: PathBuf,
        /// `directory` or `regular file`.
        expected: &'static str,
    },
    /// The cache key is readable by others or not 32 bytes.
    #[error(
        "{path} (the module cache key) has mode {mode:04o} and {len} bytes; it must be mode 0600 and 32 bytes"
    )]
    Key {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
        /// Its length.
        len: u64,
    },
    /// It could not be created, inspected or opened.
    #[error("{path}: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> PrivateDirError + '_ {
    move |source| PrivateDirError::Io {
        path: path.to_owned(),
        source,
    }
}

/// This process's user id.
fn current_uid() -> u32 {
    // SAFETY: `getuid` has no preconditions and cannot fail.
    unsafe { libc::getuid() }
}

/// Creates `path` (mode 0700, with any missing parents) if it does not exist,
/// then checks it and every directory above it, both as written and with
/// symlinks resolved: each must be owned by root or this user and not be
/// writable by group or others, except that a directory *above* `path` may
/// be a sticky one (`/tmp`, `/dev/shm`), where others cannot rename or
/// remove what is not theirs. `path` itself must be a directory.
///
/// # Errors
/// [`PrivateDirError`] naming the first offending path, its owner or mode.
pub fn ensure_private_dir(path: &Path) -> Result<(), PrivateDirError> {
    let absolute = if path.is_absolute() {
        path.to_owned()
    } else {
        std::env::current_dir().map_err(io_at(path))?.join(path)
    };
    super::job::create_private_dir_all(&absolute).map_err(io_at(&absolute))?;
    check_components(&absolute)?;
    let canonical = std::fs::canonicalize(&absolute).map_err(io_at(&absolute))?;
    if canonical != absolute {
        check_components(&canonical)?;
    }
    Ok(())
}

/// Checks each prefix of `path` (not resolving links) as
/// [`ensure_private_dir`] describes. A symlink on the way must itself be
/// owned by root or this user; where it leads is checked on the canonical
/// path.
fn check_components(path: &Path) -> Result<(), PrivateDirError> {
    let uid = current_uid();
    let mut prefix = PathBuf::new();
    let mut components = path.components().peekable();
    while let Some(c) = components.next() {
        prefix.push(c);
        let last = components.peek().is_none();
        let meta = std::fs::symlink_metadata(&prefix).map_err(io_at(&prefix))?;
        if meta.uid() != 0 && meta.uid() != uid {
            return Err(PrivateDirError::Owner {
                path: prefix,
                owner: meta.uid(),
                uid,
            });
        }
        if meta.file_type().is_symlink() {
            continue;
        }
        if !meta.is_dir() {
            return Err(PrivateDirError::NotA {
                path: prefix,
                expected: "directory",
            });
        }
        let mode = meta.mode() & 0o7777;
        let sticky = mode & 0o1000 != 0;
        if mode & 0o022 != 0 && (last || !sticky) {
            return Err(PrivateDirError::Writable { path: prefix, mode });
        }
    }
    Ok(())
}

/// Opens the private directory `path` (see [`ensure_private_dir`]) as a
/// handle.
fn open_private_dir(path: &Path) -> Result<Dir, PrivateDirError> {
    ensure_private_dir(path)?;
    Dir::open_ambient_dir(path, ambient_authority()).map_err(io_at(path))
}

/// What a cached artifact is trusted by.
#[derive(Clone)]
enum Trust {
    /// This process's own cache: a tag under this key, which only this
    /// host's user can read.
    Key(Arc<[u8; TAG_LEN]>),
    /// A zone's cache, which this worker only reads: only the digest the
    /// gateway sends with the module ([`Artifact`]). What this worker
    /// compiles goes into `handoff` (its own work directory), for the
    /// gateway to take.
    Recorded { handoff: Arc<Dir> },
}

/// One compiled artifact as the gateway records it for a module of a
/// zone: the engine that made it, and the sha256 and length of its bytes.
/// A worker loads a zone-cache entry only when the bytes it read are
/// exactly these.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Artifact {
    /// The engine key (the cache's subdirectory) it was compiled by.
    pub engine: String,
    /// The sha256 of the artifact's bytes.
    pub sha256: Sha256Hex,
    /// Their length.
    pub len: u64,
}

impl Artifact {
    /// Whether the fields are of the shape this host writes: an engine key
    /// of 16 lowercase hex characters and a length within the read bound.
    /// A record is only ever taken from a worker's word, so it is checked
    /// before it is kept.
    pub fn well_formed(&self) -> bool {
        self.engine.len() == 16
            && self
                .engine
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
            && self.len > 0
            && self.len <= MAX_ARTIFACT
    }

    /// The name a worker hands it over under, in its own work directory:
    /// `<sha256>.cwasm`.
    pub fn handoff_name(&self) -> String {
        format!("{}.cwasm", self.sha256)
    }

    /// Where it lies in a zone's cache: `<engine key>/<sha256>.cwasm`.
    fn entry(&self) -> String {
        format!("{}/{}", self.engine, self.handoff_name())
    }
}

/// What [`ModuleCache::load`] found.
pub struct Cached {
    /// The compiled component.
    pub component: Component,
    /// Whether it came from the cache.
    pub from_cache: bool,
    /// In a zone's cache, the artifact now under the module's name: the
    /// one loaded, or the one just compiled and written (`None` when it
    /// could not be written). `None` in this process's own cache.
    pub artifact: Option<Artifact>,
}

/// Where one engine's artifacts live, with what authenticates them.
#[derive(Clone)]
pub struct ModuleCache {
    /// `<root>/<engine key>`, for messages.
    path: PathBuf,
    /// A handle on it: every read and write is relative to this.
    dir: Arc<Dir>,
    engine_key: String,
    trust: Trust,
}

impl std::fmt::Debug for ModuleCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("ModuleCache")
            .field("path", &self.path)
            .field("engine_key", &self.engine_key)
            .finish_non_exhaustive()
    }
}

impl ModuleCache {
    /// The cache under `root` for `engine`: checks `root` is private
    /// (creating it, mode 0700, if missing), reads or creates its key and
    /// opens the engine's subdirectory.
    ///
    /// # Errors
    /// [`PrivateDirError`] if `root`, a directory above it, the engine's
    /// subdirectory or the key is not private, or cannot be created.
    pub fn new(root: &Path, engine: &Engine) -> Result<Self, PrivateDirError> {
        let engine_key = engine_key(engine);
        let path = root.join(&engine_key);
        let root_dir = open_private_dir(root)?;
        let key = read_or_create_key(&root_dir, &root.join(KEY_FILE))?;
        Ok(Self {
            dir: Arc::new(open_private_dir(&path)?),
            path,
            engine_key,
            trust: Trust::Key(Arc::new(key)),
        })
    }

    /// A zone's cache, `root`, as a worker process reaches it (through an
    /// inherited descriptor; the gateway created and checked it, and alone
    /// writes it): used as it is, read only, with no key. An artifact is
    /// trusted only for the digest the gateway sends with its module
    /// ([`ModuleCache::load`]). What this worker compiles is written into
    /// `handoff`, its own work directory, for the gateway to take
    /// ([`take_handoff`]).
    ///
    /// # Errors
    /// [`PrivateDirError::Io`] if either cannot be opened.
    pub fn zone(root: &Path, handoff: &Path, engine: &Engine) -> Result<Self, PrivateDirError> {
        let open = |p: &Path| Dir::open_ambient_dir(p, ambient_authority()).map_err(io_at(p));
        Ok(Self {
            dir: Arc::new(open(root)?),
            path: root.to_owned(),
            engine_key: engine_key(engine),
            trust: Trust::Recorded {
                handoff: Arc::new(open(handoff)?),
            },
        })
    }

    fn name(digest: &Sha256Hex) -> String {
        format!("{digest}.cwasm")
    }

    /// The tag of `artifact` as the cached form of the module `digest`.
    fn tag(&self, key: &[u8; TAG_LEN], digest: &Sha256Hex, artifact: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&key[..]).expect("HMAC takes keys of any length");
        mac.update(b"bulkhead module cache v1\0");
        for field in [self.engine_key.as_bytes(), digest.as_str().as_bytes()] {
            mac.update(&(field.len() as u64).to_le_bytes());
            mac.update(field);
        }
        mac.update(artifact);
        mac
    }

    /// The artifact bytes of the entry for `digest` when they are
    /// authentic: under this process's key, or (in a zone's cache) exactly
    /// the `expected` ones. `None` (with a warning when something was
    /// there) otherwise.
    fn authentic(&self, digest: &Sha256Hex, expected: Option<&Artifact>) -> Option<Vec<u8>> {
        let (name, limit) = match (&self.trust, expected) {
            (Trust::Key(_), _) => (Self::name(digest), MAX_ARTIFACT),
            // Nothing recorded for this engine: whatever lies there is
            // no one's word, and is not even read.
            (Trust::Recorded { .. }, Some(e)) if e.engine == self.engine_key => (e.entry(), e.len),
            (Trust::Recorded { .. }, _) => return None,
        };
        let mut bytes = match self.read(&name, limit) {
            Ok(Some(bytes)) => bytes,
            Ok(None) => return None,
            Err(e) => {
                tracing::warn!(dir = %self.path.display(), file = %name, error = %e, "cannot read module cache; recompiling");
                return None;
            }
        };
        let authentic = match (&self.trust, expected) {
            (Trust::Key(key), _) => {
                let split = bytes.len().saturating_sub(TAG_LEN);
                let tag = bytes.split_off(split);
                tag.len() == TAG_LEN && self.tag(key, digest, &bytes).verify_slice(&tag).is_ok()
            }
            (Trust::Recorded { .. }, Some(e)) => {
                bytes.len() as u64 == e.len && Sha256Hex::digest(&bytes) == e.sha256
            }
            (Trust::Recorded { .. }, None) => false,
        };
        if authentic {
            Some(bytes)
        } else {
            tracing::warn!(
                dir = %self.path.display(),
                file = %name,
                "cached module failed authentication (planted, copied, rewritten or corrupt); not loading it, recompiling"
            );
            None
        }
    }

    /// Loads the component for `wasm` (whose digest is `digest`), from the
    /// cache when an authentic artifact is present, else compiling it and
    /// storing the artifact (with its tag, in this process's own cache).
    /// In a zone's cache an artifact is authentic only when it is exactly
    /// `expected` (the gateway's record, sent with the module); without
    /// one the entry is not read at all. What a zone's worker compiles is
    /// handed over only with `hand_over`.
    ///
    /// # Errors
    /// If compilation fails. Cache read and write failures, and artifacts
    /// that fail authentication, are logged and fall back to compiling.
    pub fn load(
        &self,
        engine: &Engine,
        wasm: &[u8],
        digest: &Sha256Hex,
        expected: Option<&Artifact>,
        hand_over: bool,
    ) -> wasmtime::Result<Cached> {
        let name = Self::name(digest);
        if let Some(bytes) = self.authentic(digest, expected) {
            // SAFETY: the bytes were read whole into this buffer and
            // authenticated there, and are deserialized from it: either
            // they carry a valid tag under this host's private key, for
            // this engine and this module's digest (this host wrote them,
            // in `store` below), or they are exactly the artifact the
            // gateway recorded for this module from a worker that had run
            // no guest when it compiled it from `.wasm` bytes whose digest
            // matched their policy. wasmtime also checks they come from a
            // compatible engine.
            match unsafe { Component::deserialize(engine, &bytes) } {
                Ok(component) => {
                    let artifact = matches!(self.trust, Trust::Recorded { .. }).then(|| {
                        expected
                            .cloned()
                            .expect("a zone's artifact is authentic only against a record")
                    });
                    return Ok(Cached {
                        component,
                        from_cache: true,
                        artifact,
                    });
                }
                Err(e) => {
                    tracing::warn!(dir = %self.path.display(), file = %name, error = %e, "discarding unusable cached module");
                }
            }
        }
        let artifact = engine.precompile_component(wasm)?;
        // A zone's worker hands over only what the gateway gave it room for
        // and may take.
        let stored = if !hand_over && matches!(self.trust, Trust::Recorded { .. }) {
            None
        } else {
            match self.store(&name, digest, &artifact) {
                Ok(stored) => stored,
                Err(e) => {
                    tracing::warn!(dir = %self.path.display(), file = %name, error = %e, "cannot write module cache");
                    None
                }
            }
        };
        // SAFETY: `artifact` was produced just now by this engine.
        let component = unsafe { Component::deserialize(engine, &artifact)? };
        Ok(Cached {
            component,
            from_cache: false,
            artifact: stored,
        })
    }

    /// The bytes of the entry `name`, if it is a regular file of at most
    /// `limit` bytes (never following a link, never blocking on a FIFO);
    /// an empty buffer for anything else that lies there.
    fn read(&self, name: &str, limit: u64) -> io::Result<Option<Vec<u8>>> {
        let mut options = OpenOptions::new();
        options
            .read(true)
            .follow(FollowSymlinks::No)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
        let file = match self.dir.open_with(name, &options) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            // A link where a file should be (`O_NOFOLLOW`).
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Ok(Some(Vec::new())),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        if !meta.is_file() || meta.len() > limit {
            return Ok(Some(Vec::new()));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        // Bounded again as it is read: the file may grow meanwhile.
        file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
        Ok(Some(bytes))
    }

    /// Writes `artifact`: tagged, as `name` in this process's own cache;
    /// in a zone's, into the handoff directory under its sha256, which is
    /// returned for the gateway to take.
    fn store(
        &self,
        name: &str,
        digest: &Sha256Hex,
        artifact: &[u8],
    ) -> io::Result<Option<Artifact>> {
        match &self.trust {
            Trust::Key(key) => {
                let tag = self.tag(key, digest, artifact).finalize().into_bytes();
                write_replacing(&self.dir, name, &[artifact, &tag[..]]).map(|()| None)
            }
            Trust::Recorded { handoff } => {
                let made = Artifact {
                    engine: self.engine_key.clone(),
                    sha256: Sha256Hex::digest(artifact),
                    len: artifact.len() as u64,
                };
                write_replacing(handoff, &made.handoff_name(), &[artifact]).map(|()| Some(made))
            }
        }
    }
}

/// The key of `engine`'s subdirectory: a hash of wasmtime's own
/// compatibility hash (compiler, settings, wasmtime version).
fn engine_key(engine: &Engine) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// Takes the artifact a worker reported writing (`artifact`, named by
/// [`Artifact::handoff_name`] in the worker's directory `from`) into the
/// zone's cache `cache` (the gateway's, which workers only read), as
/// `<engine key>/<sha256>.cwasm`: the file must be a regular file with one
/// name, reached without a link or a mount, of exactly the reported
/// length, and the bytes copied must hash to the reported sha256 (the
/// worker may rewrite it meanwhile: what is checked is what was copied).
/// It is copied to a temporary file, synced and renamed into place; the
/// engine's directory is made when missing. Directories are mode 0750 and
/// files 0640 with group `group` where one is given (the workers' group
/// when the gateway is root), else 0700 and 0600. The worker's file is
/// removed either way.
///
/// # Errors
/// What is wrong with the worker's file or its bytes, or what the file
/// system says; nothing is left under the entry's name then.
pub fn take_handoff(
    from: impl std::os::fd::AsFd,
    cache: impl std::os::fd::AsFd,
    artifact: &Artifact,
    group: Option<u32>,
) -> io::Result<()> {
    let name = artifact.handoff_name();
    let taken = copy_handoff(from.as_fd(), cache.as_fd(), artifact, group, &name);
    // What is in a worker's directory is its own; the copy (or refusal)
    // is done with it.
    let _ = rustix::fs::unlinkat(from.as_fd(), name.as_str(), rustix::fs::AtFlags::empty());
    taken
}

fn copy_handoff(
    from: std::os::fd::BorrowedFd<'_>,
    cache: std::os::fd::BorrowedFd<'_>,
    artifact: &Artifact,
    group: Option<u32>,
    name: &str,
) -> io::Result<()> {
    use rustix::fs::{AtFlags, Mode, OFlags};
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    if !artifact.well_formed() {
        return Err(bad(format!("a malformed artifact report: {artifact:?}")));
    }
    let source = std::fs::File::from(super::beneath::open_file_in(from, name)?);
    let meta = source.metadata()?;
    if !meta.is_file() || meta.nlink() != 1 || meta.len() != artifact.len {
        return Err(bad(format!(
            "the worker's {name} is not a regular file of one name and {} bytes",
            artifact.len
        )));
    }
    let (dir_mode, file_mode) = if group.is_some() {
        (0o750, 0o640)
    } else {
        (0o700, 0o600)
    };
    let gid = group.map(rustix::fs::Gid::from_raw);
    match rustix::fs::mkdirat(
        cache,
        artifact.engine.as_str(),
        Mode::from_raw_mode(dir_mode),
    ) {
        Ok(()) | Err(rustix::io::Errno::EXIST) => {}
        Err(e) => return Err(e.into()),
    }
    let engine_dir = super::beneath::open_dir_in(cache, artifact.engine.as_str())?;
    rustix::fs::fchown(&engine_dir, None, gid)?;
    rustix::fs::fchmod(&engine_dir, Mode::from_raw_mode(dir_mode))?;
    let tmp = format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple());
    let copied = (|| {
        let fd = rustix::fs::openat(
            &engine_dir,
            tmp.as_str(),
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::from_raw_mode(file_mode),
        )?;
        rustix::fs::fchown(&fd, None, gid)?;
        rustix::fs::fchmod(&fd, Mode::from_raw_mode(file_mode))?;
        let mut out = std::fs::File::from(fd);
        let (len, sha256) =
            super::outputs::copy_hashing(&mut &source, Some(&mut out), artifact.len).map_err(
                |e| match e {
                    super::outputs::CopyFailed::Read(e) | super::outputs::CopyFailed::Write(e) => e,
                    super::outputs::CopyFailed::OverLimit => {
                        bad(format!("the worker's {name} grew while it was copied"))
                    }
                },
            )?;
        if len != artifact.len || sha256 != artifact.sha256.as_str() {
            return Err(bad(format!(
                "the worker's {name} is not the artifact it reported (its length or sha256 differ)"
            )));
        }
        out.sync_all()?;
        rustix::fs::renameat(&engine_dir, tmp.as_str(), &engine_dir, name).map_err(io::Error::from)
    })();
    if copied.is_err() {
        let _ = rustix::fs::unlinkat(&engine_dir, tmp.as_str(), AtFlags::empty());
    }
    copied
}

/// Largest record file read back.
const MAX_RECORD: u64 = 4096;

/// The gateway's record of which artifact is good for each module of one
/// zone: `<dir>/<module sha256>.json`, one [`Artifact`] each. `dir` is the
/// gateway's own (private, mode 0700, beside the zone's cache and outside
/// every worker's Landlock rules): the record is the authority over which
/// native code a zone's workers load, so no worker can read or write it.
/// Records are read once and kept in memory; each change is written to a
/// temporary file and renamed into place.
#[derive(Debug)]
pub struct ArtifactRecords {
    path: PathBuf,
    dir: Dir,
    known: std::sync::Mutex<std::collections::HashMap<Sha256Hex, Option<Artifact>>>,
}

impl ArtifactRecords {
    /// Opens (creating it, mode 0700, if missing) the record directory
    /// `path`, which must be private ([`ensure_private_dir`]).
    ///
    /// # Errors
    /// [`PrivateDirError`] if it, or a directory above it, is not private.
    pub fn open(path: &Path) -> Result<Self, PrivateDirError> {
        Ok(Self {
            dir: open_private_dir(path)?,
            path: path.to_owned(),
            known: Default::default(),
        })
    }

    /// The record directory held open as `dir` (made and opened by the
    /// caller without following a link; `path` is for messages): it must
    /// be this user's, and is made mode 0700.
    ///
    /// # Errors
    /// [`PrivateDirError`] if another user owns it, or it cannot be read.
    pub fn held(dir: std::os::fd::OwnedFd, path: &Path) -> Result<Self, PrivateDirError> {
        let stat = rustix::fs::fstat(&dir).map_err(|e| io_at(path)(e.into()))?;
        let uid = current_uid();
        if stat.st_uid != uid {
            return Err(PrivateDirError::Owner {
                path: path.to_owned(),
                owner: stat.st_uid,
                uid,
            });
        }
        rustix::fs::fchmod(&dir, rustix::fs::Mode::from_raw_mode(0o700))
            .map_err(|e| io_at(path)(e.into()))?;
        Ok(Self {
            dir: Dir::from_std_file(std::fs::File::from(dir)),
            path: path.to_owned(),
            known: Default::default(),
        })
    }

    /// Where the records are.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn file(module: &Sha256Hex) -> String {
        format!("{module}.json")
    }

    fn known(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<Sha256Hex, Option<Artifact>>> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The artifact recorded for `module` (the sha256 of its uploaded
    /// bytes), if any.
    pub fn get(&self, module: &Sha256Hex) -> Option<Artifact> {
        if let Some(known) = self.known().get(module) {
            return known.clone();
        }
        let read = self.read(module);
        self.known().entry(module.clone()).or_insert(read).clone()
    }

    fn read(&self, module: &Sha256Hex) -> Option<Artifact> {
        let name = Self::file(module);
        let mut options = OpenOptions::new();
        options
            .read(true)
            .follow(FollowSymlinks::No)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
        let file = match self.dir.open_with(&name, &options) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(dir = %self.path.display(), file = %name, error = %e, "cannot read a compiled-module record; the module will be recompiled");
                return None;
            }
        };
        let mut text = Vec::new();
        let read = file
            .metadata()
            .and_then(|m| {
                if m.is_file() {
                    Ok(())
                } else {
                    Err(io::Error::other("not a regular file"))
                }
            })
            .and_then(|()| file.take(MAX_RECORD).read_to_end(&mut text));
        match read
            .map_err(|e| e.to_string())
            .and_then(|_| serde_json::from_slice::<Artifact>(&text).map_err(|e| e.to_string()))
        {
            Ok(artifact) if artifact.well_formed() => Some(artifact),
            Ok(_) => {
                tracing::warn!(dir = %self.path.display(), file = %name, "ignoring a malformed compiled-module record");
                None
            }
            Err(error) => {
                tracing::warn!(dir = %self.path.display(), file = %name, %error, "ignoring an unreadable compiled-module record");
                None
            }
        }
    }

    /// Every artifact a record names, as `(engine key, sha256)`, read from
    /// the directory (each record file once; malformed ones are skipped).
    ///
    /// # Errors
    /// If the directory cannot be listed.
    pub fn all(&self) -> io::Result<std::collections::HashSet<(String, String)>> {
        let mut out = std::collections::HashSet::new();
        for entry in self.dir.entries()? {
            let name = entry?.file_name();
            let Some(module) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".json"))
                .and_then(|m| Sha256Hex::new(m.to_owned()).ok())
            else {
                continue;
            };
            if let Some(a) = self.get(&module) {
                out.insert((a.engine, a.sha256.to_string()));
            }
        }
        Ok(out)
    }

    /// Records `artifact` as the one good for `module`, replacing any
    /// earlier record, in memory and on disk.
    ///
    /// # Errors
    /// If it cannot be written (it is still kept in memory).
    pub fn put(&self, module: &Sha256Hex, artifact: &Artifact) -> io::Result<()> {
        self.known().insert(module.clone(), Some(artifact.clone()));
        let name = Self::file(module);
        let text = serde_json::to_vec(artifact).map_err(io::Error::other)?;
        write_replacing(&self.dir, &name, &[&text])
    }
}

/// Writes `parts` as `name` in `dir`: to a fresh temporary file, synced,
/// then renamed over `name`, so a crash never leaves a truncated file under
/// the final name, and whatever was there (a planted file, a link) is
/// replaced, not written through.
fn write_replacing(dir: &Dir, name: &str, parts: &[&[u8]]) -> io::Result<()> {
    let tmp = format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple());
    let mut options = OpenOptions::new();
    options
        .write(true)
        .create_new(true)
        .follow(FollowSymlinks::No)
        .mode(0o600);
    let result = (|| {
        let mut file = dir.open_with(&tmp, &options)?;
        for part in parts {
            file.write_all(part)?;
        }
        file.sync_all()?;
        dir.rename(&tmp, dir, name)
    })();
    if result.is_err() {
        let _ = dir.remove_file(&tmp);
    }
    result
}

/// The cache key under `root` (a handle on the cache directory; `path` is
/// for messages): read if present (it must be a regular file of this user,
/// mode 0600 or stricter, 32 bytes), else created with 32 random bytes.
fn read_or_create_key(root: &Dir, path: &Path) -> Result<[u8; TAG_LEN], PrivateDirError> {
    // Written whole under a temporary name, then linked into place: a
    // concurrent start either links first or reads a complete key.
    let tmp = format!(".{KEY_FILE}.{}.tmp", uuid::Uuid::new_v4().simple());
    let mut create = OpenOptions::new();
    create
        .write(true)
        .create_new(true)
        .follow(FollowSymlinks::No)
        .mode(0o600);
    if !root.exists(KEY_FILE) {
        let key: [u8; TAG_LEN] = rand::random();
        let linked = root.open_with(&tmp, &create).and_then(|mut file| {
            file.write_all(&key)?;
            file.sync_all()?;
            root.hard_link(&tmp, root, KEY_FILE)
        });
        let _ = root.remove_file(&tmp);
        match linked {
            Ok(()) => return Ok(key),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(io_at(path)(e)),
        }
    }
    let mut read = OpenOptions::new();
    read.read(true)
        .follow(FollowSymlinks::No)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
    let mut file = root.open_with(KEY_FILE, &read).map_err(io_at(path))?;
    let meta = file.metadata().map_err(io_at(path))?;
    if !meta.is_file() {
        return Err(PrivateDirError::NotA {
            path: path.to_owned(),
            expected: "regular file",
        });
    }
    let uid = current_uid();
    if meta.uid() != uid {
        return Err(PrivateDirError::Owner {
            path: path.to_owned(),
            owner: meta.uid(),
            uid,
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o077 != 0 || meta.len() != TAG_LEN as u64 {
        return Err(PrivateDirError::Key {
            path: path.to_owned(),
            mode,
            len: meta.len(),
        });
    }
    let mut key = [0u8; TAG_LEN];
    file.read_exact(&mut key).map_err(io_at(path))?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_fresh_private_dir_is_created_0700_and_accepted() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        ensure_private_dir(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn group_or_world_writable_dirs_are_refused_naming_path_and_mode() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("cache");
        std::fs::create_dir(&dir).unwrap();
        for mode in [0o777, 0o770, 0o1777, 0o702] {
            chmod(&dir, mode);
            let err = ensure_private_dir(&dir).unwrap_err().to_string();
            assert!(err.contains(&dir.display().to_string()), "{err}");
            assert!(err.contains(&format!("{mode:04o}")), "{err}");
        }
        // A writable directory above it is refused too, unless sticky.
        chmod(&dir, 0o700);
        chmod(tmp.path(), 0o777);
        let err = ensure_private_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("0777"), "{err}");
        chmod(tmp.path(), 0o1777);
        ensure_private_dir(&dir).unwrap();
        chmod(tmp.path(), 0o700);
    }

    #[test]
    fn a_link_to_a_writable_dir_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let open = tmp.path().join("open");
        std::fs::create_dir(&open).unwrap();
        chmod(&open, 0o777);
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&open, &link).unwrap();
        let err = ensure_private_dir(&link).unwrap_err().to_string();
        assert!(err.contains("0777"), "{err}");
    }

    /// An empty component: enough for the engine to compile.
    const EMPTY_COMPONENT: &[u8] = b"\0asm\x0d\0\x01\0";

    /// A zone's cache trusts nothing in its directory: without the
    /// gateway's record an entry is not loaded, with one it is loaded only
    /// while its bytes are exactly the recorded ones, and no key is made.
    /// What the worker compiles goes to its own directory, never into the
    /// zone's cache: the gateway takes it from there.
    #[test]
    fn a_zone_cache_loads_only_the_recorded_artifact() {
        let tmp = tempfile::tempdir().unwrap();
        let (zone, own) = (tmp.path().join("zone"), tmp.path().join("w1"));
        std::fs::create_dir(&zone).unwrap();
        std::fs::create_dir(&own).unwrap();
        let engine = Engine::default();
        let cache = ModuleCache::zone(&zone, &own, &engine).unwrap();
        assert!(!zone.join(KEY_FILE).exists(), "a zone cache made a key");
        let digest = Sha256Hex::digest(EMPTY_COMPONENT);
        let load = |expected: Option<&Artifact>| {
            cache
                .load(&engine, EMPTY_COMPONENT, &digest, expected, true)
                .unwrap()
        };
        let first = load(None);
        assert!(!first.from_cache);
        let artifact = first.artifact.expect("the artifact written");
        assert!(artifact.well_formed(), "{artifact:?}");
        // Handed over in the worker's own directory; the zone's cache is
        // untouched.
        let handed = own.join(artifact.handoff_name());
        let bytes = std::fs::read(&handed).unwrap();
        assert_eq!(Sha256Hex::digest(&bytes), artifact.sha256);
        assert_eq!(bytes.len() as u64, artifact.len);
        assert_eq!(std::fs::read_dir(&zone).unwrap().count(), 0);
        // The gateway takes it.
        let dir = |p: &Path| std::fs::File::open(p).unwrap();
        take_handoff(dir(&own), dir(&zone), &artifact, None).unwrap();
        assert!(!handed.exists(), "the handed-over file was left");
        let file = zone.join(&artifact.engine).join(artifact.handoff_name());
        assert_eq!(std::fs::read(&file).unwrap(), bytes);

        // Not on the directory's word.
        assert!(!load(None).from_cache);
        // On the record's.
        let hit = load(Some(&artifact));
        assert!(hit.from_cache);
        assert_eq!(hit.artifact.as_ref(), Some(&artifact));
        // Not for another engine's record, nor once rewritten (one byte
        // more, or the same length with a byte changed): compiled again,
        // handed over again, and the entry left for the gateway.
        let other = Artifact {
            engine: "0123456789abcdef".into(),
            ..artifact.clone()
        };
        assert!(!load(Some(&other)).from_cache);
        for planted in [[&bytes[..], b"x"].concat(), {
            let mut b = bytes.clone();
            b[0] ^= 1;
            b
        }] {
            std::fs::write(&file, &planted).unwrap();
            let again = load(Some(&artifact));
            assert!(!again.from_cache, "a rewritten entry was loaded");
            assert_eq!(again.artifact.as_ref(), Some(&artifact));
            assert_eq!(std::fs::read(&handed).unwrap(), bytes);
            assert_eq!(std::fs::read(&file).unwrap(), planted);
        }
        // A link to the right bytes is not followed.
        let elsewhere = tmp.path().join("elsewhere.cwasm");
        std::fs::write(&elsewhere, &bytes).unwrap();
        std::fs::remove_file(&file).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &file).unwrap();
        assert!(!load(Some(&artifact)).from_cache);
    }

    /// The gateway takes into a zone's cache only a regular file of one
    /// name in the worker's own directory whose bytes, as copied, are the
    /// ones reported; whatever it finds, the worker's file is removed and
    /// nothing is left under the entry's name unless it was taken.
    #[test]
    fn a_handed_over_artifact_is_taken_only_as_reported() {
        let tmp = tempfile::tempdir().unwrap();
        let (zone, own) = (tmp.path().join("zone"), tmp.path().join("w1"));
        std::fs::create_dir(&zone).unwrap();
        std::fs::create_dir(&own).unwrap();
        let bytes = b"native code".repeat(10_000);
        let artifact = Artifact {
            engine: "0123456789abcdef".into(),
            sha256: Sha256Hex::digest(&bytes),
            len: bytes.len() as u64,
        };
        let name = artifact.handoff_name();
        let handed = own.join(&name);
        let entry = zone.join(&artifact.engine).join(&name);
        let dir = |p: &Path| std::fs::File::open(p).unwrap();
        let take = |a: &Artifact| take_handoff(dir(&own), dir(&zone), a, Some(4242));
        let outside = tmp.path().join("outside");
        std::fs::write(&outside, &bytes).unwrap();
        type Plant<'a> = Box<dyn Fn() + 'a>;
        let cases: Vec<(&str, Plant, Artifact)> = vec![
            ("missing", Box::new(|| {}), artifact.clone()),
            (
                "other bytes of the same length",
                Box::new(|| {
                    let mut b = bytes.clone();
                    b[5] ^= 1;
                    std::fs::write(&handed, b).unwrap();
                }),
                artifact.clone(),
            ),
            (
                "longer",
                Box::new(|| std::fs::write(&handed, [&bytes[..], b"x"].concat()).unwrap()),
                artifact.clone(),
            ),
            (
                "a link",
                Box::new(|| std::os::unix::fs::symlink(&outside, &handed).unwrap()),
                artifact.clone(),
            ),
            (
                "a hard link",
                Box::new(|| std::fs::hard_link(&outside, &handed).unwrap()),
                artifact.clone(),
            ),
            (
                "a FIFO",
                Box::new(|| {
                    rustix::fs::mknodat(
                        rustix::fs::CWD,
                        &handed,
                        rustix::fs::FileType::Fifo,
                        rustix::fs::Mode::from_raw_mode(0o600),
                        0,
                    )
                    .unwrap()
                }),
                artifact.clone(),
            ),
            (
                "a malformed report",
                Box::new(|| std::fs::write(&handed, &bytes).unwrap()),
                Artifact {
                    engine: "../outside".into(),
                    ..artifact.clone()
                },
            ),
        ];
        for (what, plant, reported) in cases {
            plant();
            assert!(take(&reported).is_err(), "{what} was taken");
            assert!(!entry.exists(), "{what}: an entry was made");
            assert!(
                std::fs::symlink_metadata(&handed).is_err(),
                "{what}: the worker's file was left"
            );
            assert_eq!(std::fs::read(&outside).unwrap(), bytes, "{what}");
        }
        // No temporary file is left behind either.
        let engine_dir = zone.join(&artifact.engine);
        assert_eq!(std::fs::read_dir(&engine_dir).unwrap().count(), 0);

        std::fs::write(&handed, &bytes).unwrap();
        take(&artifact).unwrap();
        assert_eq!(std::fs::read(&entry).unwrap(), bytes);
        let (d, f) = (
            std::fs::metadata(&engine_dir).unwrap(),
            std::fs::metadata(&entry).unwrap(),
        );
        assert_eq!((d.mode() & 0o777, f.mode() & 0o777), (0o750, 0o640));
        // Where this process may give files away (root): the workers' group.
        if current_uid() == 0 {
            assert_eq!((d.gid(), f.gid()), (4242, 4242));
        }
    }

    /// An old key left in a zone's cache is not read: a tag under it
    /// authenticates nothing there.
    #[test]
    fn a_key_left_in_a_zone_cache_is_not_used() {
        let tmp = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        // An earlier layout: the same directory used with a key.
        let keyed = ModuleCache::new(tmp.path(), &engine).unwrap();
        let digest = Sha256Hex::digest(EMPTY_COMPONENT);
        keyed
            .load(&engine, EMPTY_COMPONENT, &digest, None, true)
            .unwrap();
        assert!(tmp.path().join(KEY_FILE).exists());
        let zone = ModuleCache::zone(tmp.path(), tmp.path(), &engine).unwrap();
        assert!(
            !zone
                .load(&engine, EMPTY_COMPONENT, &digest, None, true)
                .unwrap()
                .from_cache
        );
    }

    #[test]
    fn records_persist_and_refuse_malformed_entries() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("zone.records");
        let module = Sha256Hex::digest(b"module");
        let artifact = Artifact {
            engine: "0123456789abcdef".into(),
            sha256: Sha256Hex::digest(b"artifact"),
            len: 8,
        };
        {
            let records = ArtifactRecords::open(&dir).unwrap();
            assert_eq!(records.get(&module), None);
            records.put(&module, &artifact).unwrap();
            assert_eq!(records.get(&module), Some(artifact.clone()));
        }
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        let reopened = ArtifactRecords::open(&dir).unwrap();
        assert_eq!(reopened.get(&module), Some(artifact.clone()));
        // A malformed one is ignored.
        let other = Sha256Hex::digest(b"other");
        let bad = Artifact {
            engine: "../../x".into(),
            ..artifact
        };
        std::fs::write(
            dir.join(format!("{other}.json")),
            serde_json::to_vec(&bad).unwrap(),
        )
        .unwrap();
        assert_eq!(reopened.get(&other), None);
    }

    #[test]
    fn a_readable_or_short_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        ModuleCache::new(tmp.path(), &engine).unwrap();
        let key = tmp.path().join(KEY_FILE);
        assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
        chmod(&key, 0o644);
        let err = ModuleCache::new(tmp.path(), &engine).unwrap_err();
        assert!(err.to_string().contains("0644"), "{err}");
        chmod(&key, 0o600);
        std::fs::write(&key, b"short").unwrap();
        assert!(ModuleCache::new(tmp.path(), &engine).is_err());
    }
}
