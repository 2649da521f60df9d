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
//! - each artifact carries an HMAC-SHA256 tag under a key only this host
//!   holds (`<cache dir>/cache.key`, 32 random bytes, mode 0600, created on
//!   first use), computed over the engine key, the module's sha256 and the
//!   artifact bytes. An artifact whose tag is missing or wrong (planted,
//!   copied from another module's name, corrupted) is never deserialized:
//!   the module is compiled from its verified `.wasm` and the entry
//!   overwritten, with a warning.

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

/// Where one engine's artifacts live, with the key that authenticates them.
#[derive(Clone)]
pub struct ModuleCache {
    /// `<root>/<engine key>`, for messages.
    path: PathBuf,
    /// A handle on it: every read and write is relative to this.
    dir: Arc<Dir>,
    engine_key: String,
    key: Arc<[u8; TAG_LEN]>,
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
    ///
    /// With `handed_over`, `root` was created and checked by the gateway and
    /// reached here through an inherited descriptor (a worker process): it
    /// is used as it is, and only the engine's subdirectory is created.
    pub fn new(root: &Path, engine: &Engine, handed_over: bool) -> Result<Self, PrivateDirError> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let engine_key = format!("{:016x}", hasher.finish());
        let path = root.join(&engine_key);
        let open = |p: &Path| {
            if handed_over {
                super::job::create_private_dir_all(p).map_err(io_at(p))?;
                Dir::open_ambient_dir(p, ambient_authority()).map_err(io_at(p))
            } else {
                open_private_dir(p)
            }
        };
        let root_dir = open(root)?;
        let key = read_or_create_key(&root_dir, &root.join(KEY_FILE))?;
        let dir = open(&path)?;
        Ok(Self {
            path,
            dir: Arc::new(dir),
            engine_key,
            key: Arc::new(key),
        })
    }

    fn name(digest: &Sha256Hex) -> String {
        format!("{digest}.cwasm")
    }

    /// The tag of `artifact` as the cached form of the module `digest`.
    fn tag(&self, digest: &Sha256Hex, artifact: &[u8]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.key[..]).expect("HMAC takes keys of any length");
        mac.update(b"bulkhead module cache v1\0");
        for field in [self.engine_key.as_bytes(), digest.as_str().as_bytes()] {
            mac.update(&(field.len() as u64).to_le_bytes());
            mac.update(field);
        }
        mac.update(artifact);
        mac
    }

    /// Loads the component for `wasm` (whose digest is `digest`), from the
    /// cache when an authenticated artifact is present, else compiling it
    /// and storing the artifact with its tag. Returns the component and
    /// whether it came from the cache.
    ///
    /// # Errors
    /// If compilation fails. Cache read and write failures, and artifacts
    /// that fail authentication, are logged and fall back to compiling.
    pub fn load(
        &self,
        engine: &Engine,
        wasm: &[u8],
        digest: &Sha256Hex,
    ) -> wasmtime::Result<(Component, bool)> {
        let name = Self::name(digest);
        match self.read(&name) {
            Ok(Some(mut bytes)) => {
                let split = bytes.len().saturating_sub(TAG_LEN);
                let tag = bytes.split_off(split);
                let authentic =
                    tag.len() == TAG_LEN && self.tag(digest, &bytes).verify_slice(&tag).is_ok();
                if authentic {
                    // SAFETY: the bytes carry a valid tag under this host's
                    // private key, for this engine and this module's digest:
                    // this host wrote them, in `store` below, from `.wasm`
                    // bytes whose digest matched their policy. wasmtime also
                    // checks they come from a compatible engine.
                    match unsafe { Component::deserialize(engine, &bytes) } {
                        Ok(c) => return Ok((c, true)),
                        Err(e) => {
                            tracing::warn!(dir = %self.path.display(), file = %name, error = %e, "discarding unusable cached module");
                        }
                    }
                } else {
                    tracing::warn!(
                        dir = %self.path.display(),
                        file = %name,
                        "cached module failed authentication (planted, copied or corrupt); not loading it, recompiling"
                    );
                }
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(dir = %self.path.display(), file = %name, error = %e, "cannot read module cache; recompiling");
            }
        }
        let artifact = engine.precompile_component(wasm)?;
        if let Err(e) = self.store(&name, digest, &artifact) {
            tracing::warn!(dir = %self.path.display(), file = %name, error = %e, "cannot write module cache");
        }
        // SAFETY: `artifact` was produced just now by this engine.
        let component = unsafe { Component::deserialize(engine, &artifact)? };
        Ok((component, false))
    }

    /// The bytes of the entry `name`, if it is a regular file (never
    /// following a link, never blocking on a FIFO).
    fn read(&self, name: &str) -> io::Result<Option<Vec<u8>>> {
        let mut options = OpenOptions::new();
        options
            .read(true)
            .follow(FollowSymlinks::No)
            .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY);
        let mut file = match self.dir.open_with(name, &options) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let meta = file.metadata()?;
        if !meta.is_file() || meta.len() > MAX_ARTIFACT {
            return Ok(Some(Vec::new()));
        }
        let mut bytes = Vec::with_capacity(meta.len() as usize);
        file.read_to_end(&mut bytes)?;
        Ok(Some(bytes))
    }

    fn store(&self, name: &str, digest: &Sha256Hex, artifact: &[u8]) -> io::Result<()> {
        let tag = self.tag(digest, artifact).finalize().into_bytes();
        // Write to a fresh temporary file and rename, so a crash never
        // leaves a truncated artifact under the final name, and whatever
        // was there (a planted file, a link) is replaced, not written
        // through.
        let tmp = format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple());
        let mut options = OpenOptions::new();
        options
            .write(true)
            .create_new(true)
            .follow(FollowSymlinks::No)
            .mode(0o600);
        let result = (|| {
            let mut file = self.dir.open_with(&tmp, &options)?;
            file.write_all(artifact)?;
            file.write_all(&tag)?;
            file.sync_all()?;
            self.dir.rename(&tmp, &self.dir, name)
        })();
        if result.is_err() {
            let _ = self.dir.remove_file(&tmp);
        }
        result
    }
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

    #[test]
    fn a_readable_or_short_key_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let engine = Engine::default();
        ModuleCache::new(tmp.path(), &engine, false).unwrap();
        let key = tmp.path().join(KEY_FILE);
        assert_eq!(std::fs::metadata(&key).unwrap().mode() & 0o777, 0o600);
        chmod(&key, 0o644);
        let err = ModuleCache::new(tmp.path(), &engine, false).unwrap_err();
        assert!(err.to_string().contains("0644"), "{err}");
        chmod(&key, 0o600);
        std::fs::write(&key, b"short").unwrap();
        assert!(ModuleCache::new(tmp.path(), &engine, false).is_err());
    }
}
