//! The on-disk cache of precompiled components, so a restart does not
//! recompile every module.
//!
//! Layout: `<cache dir>/<engine key>/<module sha256>.cwasm`, where the engine
//! key hashes wasmtime's own compatibility hash (compiler, settings, wasmtime
//! version): a different engine never finds, let alone loads, an artifact it
//! did not make. Artifacts are only ever written here by this host, from
//! `.wasm` bytes whose digest matched their policy; uploaded bytes are never
//! deserialized. The directory is created with mode 0700.

use std::hash::{Hash, Hasher};
use std::io::Write;
use std::path::{Path, PathBuf};

use wasmtime::Engine;
use wasmtime::component::Component;

use crate::policy::Sha256Hex;

/// Where one engine's artifacts live.
#[derive(Clone, Debug)]
pub struct ModuleCache {
    dir: PathBuf,
}

impl ModuleCache {
    /// The cache under `root` for `engine`.
    pub fn new(root: &Path, engine: &Engine) -> Self {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        Self {
            dir: root.join(format!("{:016x}", hasher.finish())),
        }
    }

    fn path(&self, digest: &Sha256Hex) -> PathBuf {
        self.dir.join(format!("{digest}.cwasm"))
    }

    /// Loads the component for `wasm` (whose digest is `digest`), from the
    /// cache when present, else compiling it and storing the artifact.
    /// Returns the component and whether it came from the cache.
    ///
    /// # Errors
    /// If compilation fails. Cache read and write failures are logged and
    /// fall back to compiling.
    pub fn load(
        &self,
        engine: &Engine,
        wasm: &[u8],
        digest: &Sha256Hex,
    ) -> wasmtime::Result<(Component, bool)> {
        let path = self.path(digest);
        if path.is_file() {
            // SAFETY: the file is in this host's private cache directory and
            // was written by `store` below from verified `.wasm` bytes;
            // wasmtime additionally checks that it was produced by a
            // compatible engine.
            match unsafe { Component::deserialize_file(engine, &path) } {
                Ok(c) => return Ok((c, true)),
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "discarding unusable cached module");
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        let artifact = engine.precompile_component(wasm)?;
        if let Err(e) = self.store(&path, &artifact) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write module cache");
        }
        // SAFETY: `artifact` was produced just now by this engine.
        let component = unsafe { Component::deserialize(engine, &artifact)? };
        Ok((component, false))
    }

    fn store(&self, path: &Path, artifact: &[u8]) -> std::io::Result<()> {
        super::job::create_private_dir_all(&self.dir)?;
        // Write to a temporary file and rename, so a crash never leaves a
        // truncated artifact under the final name.
        let mut tmp = tempfile::NamedTempFile::new_in(&self.dir)?;
        tmp.write_all(artifact)?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}
