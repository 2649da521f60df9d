//! The local sandbox `run`, `check` and `escape-suite` use: the policy
//! checked against the declared services, private work and cache
//! directories.

use std::path::{Path, PathBuf};

use clap::Args;

use bulkhead::policy::Policy;
use std::sync::Arc;

use anyhow::Context;
use bulkhead::runner::{InProcess, Runner, Workers};
use bulkhead::sandbox::{Sandbox, SandboxConfig};
use bulkhead::worker::pool::{Pool, PoolConfig};

#[derive(Debug, Args)]
pub(crate) struct HostArgs {
    /// The service's config file, for the internal services it declares
    /// (a policy may name only those).
    #[arg(long, value_name = "FILE")]
    pub(crate) config: Option<PathBuf>,
    /// Where job directories are created; must be private: it and every directory above it owned by
    /// root or you and not writable by others [default: $XDG_RUNTIME_DIR/bulkhead-cli, else
    /// ~/.cache/bulkhead/jobs].
    #[arg(long, value_name = "DIR")]
    pub(crate) work_dir: Option<PathBuf>,
    /// Precompiled-module cache, checked private like --work-dir; each artifact is authenticated
    /// before it is loaded: in a worker's zone cache (zones/<zone>) by the digest recorded beside
    /// it (zones/<zone>.records), in-process by a key kept in it (cache.key)
    /// [default: $XDG_CACHE_HOME/bulkhead/modules, else ~/.cache/bulkhead/modules].
    #[arg(long, value_name = "DIR")]
    pub(crate) cache_dir: Option<PathBuf>,
    /// Compile every time; neither read nor write the cache.
    #[arg(long)]
    pub(crate) no_cache: bool,
    /// Run the guest inside this process instead of a hardened worker process (for debugging: a
    /// runtime escape then reaches everything this process can).
    #[arg(long)]
    pub(crate) in_process: bool,
    /// A minisign public key to trust for a policy's `signed_by`, as NAME=KEY (KEY as `minisign -G`
    /// prints it); repeatable, added to the config's [trust.keys].
    #[arg(long = "trust", value_name = "NAME=KEY")]
    pub(crate) trust: Vec<String>,
    /// The module's minisign signature [default: the module's path with .minisig appended].
    #[arg(long, value_name = "FILE")]
    pub(crate) signature: Option<PathBuf>,
}

impl HostArgs {
    /// The policy at `path`, checked against the declared services.
    pub(crate) fn policy(&self, path: &Path) -> anyhow::Result<Policy> {
        let declared = match &self.config {
            Some(c) => bulkhead::config::ServeConfig::load(c)?
                .services
                .into_iter()
                .map(|s| s.name)
                .collect(),
            None => Vec::new(),
        };
        Ok(Policy::load_with(path, &declared)?)
    }

    /// Checks `wasm` (read from `module`) against what `policy` requires
    /// of its signature, with the keys of the config's `[trust.keys]` and
    /// `--trust`, before anything compiles it.
    pub(crate) fn signature(
        &self,
        policy: &Policy,
        module: &Path,
        wasm: &[u8],
    ) -> anyhow::Result<Result<bulkhead::trust::Verdict, bulkhead::trust::SignatureError>> {
        let mut keys = match &self.config {
            Some(c) => bulkhead::config::ServeConfig::load(c)?.trust.keys,
            None => Default::default(),
        };
        for pair in &self.trust {
            let Some((name, key)) = pair.split_once('=') else {
                anyhow::bail!("--trust {pair:?}: expected NAME=KEY");
            };
            if keys.insert(name.to_owned(), key.to_owned()).is_some() {
                anyhow::bail!(
                    "--trust {name}=…: a key named {name:?} is already trusted (in the config or an earlier --trust); give each key its own name"
                );
            }
        }
        let trusted = bulkhead::trust::TrustedKeys::new(&keys)?;
        if policy.module.signed_by.is_empty() {
            return Ok(Ok(bulkhead::trust::Verdict::NotRequired));
        }
        let path = self
            .signature
            .clone()
            .unwrap_or_else(|| bulkhead::trust::signature_path(module));
        let text = bulkhead::trust::read_signature(&path)
            .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
        Ok(trusted.verify(policy, wasm, text.as_deref(), &path.display().to_string()))
    }

    /// The relay a job's calls go through, built exactly as the service
    /// builds it from `--config`: its `[[services]]`, `[tokens]` and key
    /// ring (`[tokens] signing_key`, else `<data_dir>/keys`). `None`
    /// without a config.
    pub(crate) fn relay(&self) -> anyhow::Result<Option<Arc<bulkhead::relay::Relay>>> {
        let Some(path) = &self.config else {
            return Ok(None);
        };
        let config = bulkhead::config::ServeConfig::load(path)?;
        let keys = config.key_ring()?;
        Ok(Some(Arc::new(bulkhead::relay::Relay::new(
            config.services.clone(),
            Arc::new(keys),
            &config.tokens,
        )?)))
    }

    /// Where the guests of `zone` run: a hardened worker process started
    /// from this binary, exactly as the service runs them (with
    /// `--in-process`, this process's sandbox). The layers required are
    /// the config's `[isolation] require` (default: every layer).
    ///
    /// Its jobs' directories are this invocation's own ([`RunDir`]), kept
    /// until the returned guard is dropped.
    pub(crate) async fn runner(&self, zone: &str) -> anyhow::Result<(Arc<dyn Runner>, RunDir)> {
        let mut config = self.sandbox_config();
        let (root, lock) = bulkhead::service::lock_work_dir(
            &config.work_dir.join(format!("run-{}", std::process::id())),
            &[],
            &[],
        )
        .with_context(|| format!("work directory {}", config.work_dir.display()))?;
        let path = root.path().to_owned();
        config.work_dir.clone_from(&path);
        let (parent, name) = root
            .parent()
            .with_context(|| format!("work directory {}", path.display()))?;
        let mut run_dir = RunDir {
            parent,
            name,
            lock: Some(lock),
            cache_lock: None,
        };
        // A cache of its own is held shared, as a service holds one: no
        // running service's work directory (emptied at its shutdown) may
        // be at it or around it, and none may take one around it while
        // this runs.
        let cache_held = match &config.cache_dir {
            Some(dir) => {
                // One that exists is checked private before a lock is put
                // in it; one to be made, for others' held directories
                // before anything is made there.
                let existed = dir.exists();
                if existed {
                    bulkhead::sandbox::ensure_private_dir(dir)?;
                }
                let (held, lock) =
                    bulkhead::service::share_cache_dir(dir, &[run_dir_lock(&run_dir)])
                        .with_context(|| format!("cache directory {}", dir.display()))?;
                if !existed {
                    bulkhead::sandbox::ensure_private_dir(dir)?;
                }
                run_dir.cache_lock = Some(lock);
                Some(held)
            }
            None => None,
        };
        if self.in_process {
            return Ok((Arc::new(InProcess::new(Sandbox::new(config)?)), run_dir));
        }
        let work_dir = config.work_dir.join("zones").join(zone);
        // Held open, like the run directory: the zone's cache and records
        // are made and opened below it, never through a link or a mount.
        let (cache_held, cache_dir) = match cache_held {
            Some(held) => {
                let cache_dir = held.path().join("zones").join(zone);
                (held, cache_dir)
            }
            None => (root.clone(), work_dir.with_extension("cache")),
        };
        let (isolation, settings) = match &self.config {
            Some(c) => {
                let config = bulkhead::config::ServeConfig::load(c)?;
                let settings = config.zones.get(zone).cloned().unwrap_or_default();
                (config.isolation, settings)
            }
            None => Default::default(),
        };
        let pool = Pool::start(
            PoolConfig {
                zone: zone.to_owned(),
                program: std::env::current_exe().context("cannot find this binary")?,
                workers: 1,
                jobs_per_worker: 0,
                max_concurrent_jobs: 1,
                memory: None,
                disk: Some(settings.disk.as_u64()).filter(|&d| d > 0),
                work_held: Some(root.made_below(&Path::new("zones").join(zone))?),
                work_dir,
                cache_dir,
                cache_held: Some(cache_held),
                run_as: isolation.run_as,
                max_open: bulkhead::worker::WORKER_MAX_OPEN,
                max_threads: bulkhead::worker::WORKER_MAX_THREADS,
                require: isolation.require,
                weaken: Default::default(),
            },
            |_| {},
        )
        .await?;
        let pools = std::iter::once((zone.to_owned(), pool)).collect();
        Ok((Arc::new(Workers::new(config, pools)), run_dir))
    }

    /// The sandbox settings, with this user's private defaults: jobs under
    /// `$XDG_RUNTIME_DIR/bulkhead-cli`, else `<cache root>/jobs`; the module
    /// cache in `<cache root>/modules`, where the cache root is
    /// `$XDG_CACHE_HOME/bulkhead` or `~/.cache/bulkhead`. Every directory
    /// is checked to be private before use (see `sandbox::ensure_private_dir`).
    fn sandbox_config(&self) -> SandboxConfig {
        let root = bulkhead::sandbox::default_cache_root();
        let runtime = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .is_some_and(|p| p.is_absolute() && p.is_dir());
        let work_dir = match (&self.work_dir, &root) {
            (Some(dir), _) => dir.clone(),
            (None, Some(root)) if !runtime => root.join("jobs"),
            (None, _) => bulkhead::sandbox::default_work_dir("cli"),
        };
        let mut config = SandboxConfig::new(work_dir);
        config.cache_dir = match (&self.cache_dir, &root) {
            _ if self.no_cache => None,
            (Some(dir), _) => Some(dir.clone()),
            (None, Some(root)) => Some(root.join("modules")),
            (None, None) => {
                tracing::warn!(
                    "neither XDG_CACHE_HOME nor HOME is set: compiling without a module cache"
                );
                None
            }
        };
        config
    }
}

/// One invocation's work directory, `run-<pid>` under `--work-dir` (or its
/// default), locked and checked as a service's work directory is
/// ([`bulkhead::service::lock_work_dir`]): never inside one a service
/// holds, whose start or shutdown would empty it (and whose workers' own
/// directories a worker started here would replace), nor shared with
/// another `bulkhead run`. Removed when dropped, its lock let go of first
/// (a removal leaves a directory with a held lock file).
pub(crate) struct RunDir {
    /// The directory it was made in, held open: it is removed from there,
    /// whatever is put at the work directory's path meanwhile.
    parent: bulkhead::sandbox::beneath::Root,
    name: std::ffi::OsString,
    lock: Option<std::fs::File>,
    /// The shared hold of `--cache-dir`, when one is given.
    cache_lock: Option<std::fs::File>,
}

/// The run directory's own lock, which is no one else's.
fn run_dir_lock(run_dir: &RunDir) -> &std::fs::File {
    run_dir.lock.as_ref().expect("held until dropped")
}

impl Drop for RunDir {
    fn drop(&mut self) {
        // Removed while its lock is still held (its own, so no obstacle),
        // then let go of.
        let own: Vec<&std::fs::File> = self.lock.iter().collect();
        let _ = bulkhead::sandbox::remove_tree_but(&self.parent, Path::new(&self.name), &own);
        drop(self.lock.take());
    }
}
