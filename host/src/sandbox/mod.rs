//! The sandbox: turns a [`Policy`] and a component into a compartment and
//! runs jobs in it.
//!
//! One [`Sandbox`] per process owns the one wasmtime `Engine` (pooling
//! allocator, epoch ticker) and the linker. [`Sandbox::load`] verifies a
//! module against its policy's pin, judges its imports (adapting a WASIp1
//! core module into a component: [`intake`]) and pre-instantiates it once;
//! [`Sandbox::run`] gives each job a fresh `Store`, a fresh job directory and
//! its limits, and always returns a [`JobReport`] for anything the guest
//! does. The interface is deliberately narrow (policy + bytes in, report out)
//! so execution can move into a worker process without redesign.
//!
//! Nothing outside this module names wasmtime types.

pub mod beneath;
mod cache;
mod cpu;
mod engine;
mod http;
pub mod intake;
mod job;
mod limits;
pub mod outputs;
mod pipe;
mod quota;
mod remove;
mod streams;
mod wasi;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::Component;
use wasmtime::{Engine, Store, UpdateDeadline};
use wasmtime_wasi::I32Exit;
use wasmtime_wasi::p2::bindings::CommandPre;

pub use cache::{
    Artifact, ArtifactRecords, KEY_FILE as CACHE_KEY_FILE, PrivateDirError, ensure_private_dir,
    take_handoff,
};
pub use engine::{
    DescriptorBudgetError, JOB_OVERHEAD_DESCRIPTORS, MAX_OPEN_PER_JOB, MIN_OPEN_PER_JOB,
    RESERVED_DESCRIPTORS, descriptor_budget, kept_resident_per_place, open_page_map,
};
pub use job::{JobDir, create_private_dir_all};
pub use limits::WRITTEN_PER_OUTPUT;
pub use pipe::MAX_CAPTURE;
pub use quota::{DESCRIPTOR_REFUSALS, MAX_DIR_DEPTH, MAX_LISTED};
pub(crate) use remove::names as entry_names;
pub use remove::{
    CACHE_LOCK, DIR_LOCK, held, held_within, held_within_but, remove_tree, remove_tree_but,
    remove_tree_in,
};
// The job's types are the `job` module's; re-exported for the sandbox's
// callers.
pub use crate::job::{
    Captured, Failure, FailureKind, JobInput, JobReport, JobSpec, LimitKind, MAX_INPUTS,
    Measurements, Outcome, OutputFile, SkippedOutput, validate_input_name,
};
pub use intake::{ImportVerdict, LoadInfo, Verdict};
pub use wasi::{
    FIELD_SIZE_LIMIT, FIELDS_HELD, HELD_PER_HANDLE, MAX_AUTHORITY, MAX_HANDLES,
    MAX_HANDLES_CALLING, MAX_PATH_WITH_QUERY, MAX_RANDOM_PER_CALL,
};

use crate::policy::{ByteSize, Policy, Sha256Hex};

/// Host-wide sandbox settings. Policies may ask for less, never more.
///
/// | field | default | guards against |
/// |---|---|---|
/// | `work_dir` | (required; [`default_work_dir`] suggests one) | — where job directories are created; must be private ([`ensure_private_dir`]) |
/// | `cache_dir` | `None` (no cache) | recompiling every module on restart; must be private, artifacts are authenticated (see `cache`) |
/// | `max_concurrent_jobs` | 16 | sizing of the pooling allocator's slots |
/// | `max_memory` | 1 GiB | a policy granting more memory than the host has |
/// | `max_wasm_stack` | 1 MiB | unbounded recursion (traps as the `stack` limit) |
/// | `max_module_size` | 64 MiB | oversized uploads and compile bombs by size |
/// | `epoch_tick` | 10 ms | how often a guest running wasm is checked against `cpu_time` |
/// | `unsafe_extra_preopen` | `None` | — a deliberate hole, see the field |
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    /// Parent of all job directories.
    pub work_dir: PathBuf,
    /// Precompiled-module cache, if any.
    pub cache_dir: Option<PathBuf>,
    /// Jobs that may run at once; the pool is sized for this many.
    pub max_concurrent_jobs: u32,
    /// Largest `limits.memory` any policy may grant.
    pub max_memory: ByteSize,
    /// Wasm stack per job, in bytes.
    pub max_wasm_stack: usize,
    /// Largest module accepted, in bytes.
    pub max_module_size: usize,
    /// Epoch tick: how often a guest running wasm checks its CPU time
    /// (which is measured on the thread's CPU clock, not in ticks).
    pub epoch_tick: Duration,
    /// A host directory preopened read-write into every job, at the guest
    /// path given: a deliberate hole in the compartment. It exists only so
    /// `bulkhead escape-suite` can prove its filesystem checks detect a
    /// breach (its weakened-configuration self-test). No policy, service
    /// config or API request can set it; the service never does.
    pub unsafe_extra_preopen: Option<(PathBuf, String)>,
    /// The work and cache directories were created and checked private by
    /// the gateway, which handed them to this worker process as
    /// descriptors (`/proc/self/fd/N`): they are used as they are, without
    /// the ancestor checks a path needs (which a worker running as another
    /// user could not even make).
    pub dirs_handed_over: bool,
}

/// A per-user directory for job directories: `$XDG_RUNTIME_DIR/bulkhead-<name>`
/// when the session has a runtime directory (per-user, mode 0700, on
/// tmpfs), else `/dev/shm/bulkhead-<uid>-<name>` when `/dev/shm` is a
/// directory, else under the system temp dir. Job directories are ephemeral
/// (the service keeps outputs elsewhere), and creating and removing three
/// directories per job costs about ten times more on a journaling
/// filesystem than on tmpfs. `name` distinguishes instances. Under a shared
/// directory the name is predictable, so [`Sandbox::new`] refuses it if
/// another user made it first ([`ensure_private_dir`]).
pub fn default_work_dir(name: &str) -> PathBuf {
    if let Some(runtime) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from)
        && runtime.is_absolute()
        && runtime.is_dir()
    {
        return runtime.join(format!("bulkhead-{name}"));
    }
    // SAFETY: `getuid` has no preconditions and cannot fail.
    let uid = unsafe { libc::getuid() };
    let shm = std::path::Path::new("/dev/shm");
    let base = if shm.is_dir() {
        shm.to_owned()
    } else {
        std::env::temp_dir()
    };
    base.join(format!("bulkhead-{uid}-{name}"))
}

/// This user's private cache root: `$XDG_CACHE_HOME/bulkhead`, else
/// `$HOME/.cache/bulkhead`; `None` when neither is set (absolute).
pub fn default_cache_root() -> Option<PathBuf> {
    let absolute = |v: Option<std::ffi::OsString>| v.map(PathBuf::from).filter(|p| p.is_absolute());
    absolute(std::env::var_os("XDG_CACHE_HOME"))
        .or_else(|| absolute(std::env::var_os("HOME")).map(|h| h.join(".cache")))
        .map(|base| base.join("bulkhead"))
}

impl SandboxConfig {
    /// Defaults as documented on the type, with jobs under `work_dir`.
    pub fn new(work_dir: impl Into<PathBuf>) -> Self {
        Self {
            work_dir: work_dir.into(),
            cache_dir: None,
            max_concurrent_jobs: 16,
            max_memory: ByteSize::gib(1),
            max_wasm_stack: 1024 * 1024,
            max_module_size: 64 * 1024 * 1024,
            epoch_tick: Duration::from_millis(10),
            unsafe_extra_preopen: None,
            dirs_handed_over: false,
        }
    }
}

/// What one call from a guest into the host may carry in, in wasmtime's
/// "hostcall fuel" (about a byte each, and 24 more for each item of a
/// list): far more than a WASI call needs (a stream takes 64 KiB to 1 MiB a
/// write, a path a few KiB, a headers list 16 KiB); a call carrying more
/// traps.
pub const HOSTCALL_FUEL: usize = 4 << 20;

/// Characters that must not reach text shown to a person (a log line, an
/// audit row, a report, a file name): controls (C0, DEL, C1 including
/// U+0085) and the Unicode formatting characters that reorder, hide or
/// break text (bidi marks, embeddings, overrides and isolates, line and
/// paragraph separators, zero-width characters). One set for every place
/// that escapes or replaces them.
#[must_use]
pub fn unprintable(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2069}'
                | '\u{FEFF}'
        )
}

/// `text` cut to at most `max` bytes, at a character boundary, with
/// the characters of [`unprintable`] escaped: what a worker
/// says, as the gateway shows it in logs, the audit and answers. Only
/// what is kept is looked at (found by a tester: escaping a worker's
/// 16 MiB message whole, one character at a time, took half a second of
/// CPU; and its newlines wrote lines of the gateway's log).
pub fn shown_within(text: &str, max: usize) -> String {
    let head = &text[..text.floor_char_boundary(max)];
    if !head.chars().any(unprintable) {
        return head.to_owned();
    }
    let mut kept = String::with_capacity(max.min(head.len() * 2));
    for c in head.chars() {
        let width = if unprintable(c) {
            c.escape_unicode().len()
        } else {
            c.len_utf8()
        };
        if kept.len() + width > max {
            break;
        }
        if unprintable(c) {
            kept.extend(c.escape_unicode());
        } else {
            kept.push(c);
        }
    }
    kept
}

/// Why a module could not be loaded. Exit status 2 in the CLI.
#[derive(Clone, Debug, thiserror::Error, serde::Serialize, serde::Deserialize)]
pub enum LoadError {
    /// Larger than `max_module_size`.
    #[error("module `{module}` is {size} bytes, larger than the {max} bytes this host accepts")]
    TooLarge {
        module: String,
        size: usize,
        max: usize,
    },
    /// The digest does not match the policy's pin.
    #[error(
        "module `{module}` has sha256 {actual} but its policy pins {expected}; refusing to compile it"
    )]
    DigestMismatch {
        module: String,
        expected: String,
        actual: String,
    },
    /// Not a WebAssembly binary, or a kind this host does not run.
    #[error("module `{module}` is not accepted: {reason}")]
    Unsupported { module: String, reason: String },
    /// The policy asks for more than the host allows.
    #[error("policy `{module}` sets `limits.{key}` to {value}, above this host's maximum of {max}")]
    PolicyExceedsHost {
        module: String,
        key: String,
        value: String,
        max: String,
    },
    /// Its limits let one job's files take more than its zone's disk.
    #[error(
        "module `{module}`'s limits let one job's files take {need} bytes (`limits.input`, `limits.output`, a page for each input and output file), more than zone `{zone}`'s disk of {disk} bytes; raise `[zones.{zone}] disk` or lower the limits"
    )]
    ExceedsZoneDisk {
        module: String,
        zone: String,
        need: u64,
        disk: u64,
    },
    /// Its limits let one job take more of a worker's memory than the
    /// worker's ceiling leaves its jobs.
    #[error(
        "module `{module}`'s limits let one job take {need} bytes of a worker's memory (`limits.memory`, what a host call's arguments can take, its tables, captured stdout and stderr, directory listings, `limits.input`, the headers of its calls where it names services, and its files where a worker's directory is a tmpfs: `limits.output` and a page for each input and output file), more than a worker of zone `{zone}` leaves its jobs: {most} bytes, its memory ceiling less what it holds whatever it runs; raise `[zones.{zone}] memory` or lower the limits"
    )]
    ExceedsWorkerMemory {
        module: String,
        zone: String,
        need: u64,
        most: u64,
    },
    /// wasmtime could not compile it.
    #[error("module `{module}` does not compile: {message}")]
    Compile { module: String, message: String },
    /// It needs an import this sandbox does not provide.
    #[error("module `{module}` cannot be linked: {message}")]
    Link { module: String, message: String },
    /// A WASIp1 core module that cannot be adapted into a component: not a
    /// command (no `_start`), or refused by the preview1 adapter.
    #[error("module `{module}` is a WASIp1 core module that cannot be run: {reason}")]
    Adapt { module: String, reason: String },
    /// Imports its policy does not grant, judged from its bytes before
    /// compiling. `imports` holds every import's verdict; each denied one
    /// names the policy line that would grant it, or says that none does.
    #[error("module `{module}` imports what its policy does not grant: {}", denied_list(.imports))]
    DeniedImports {
        module: String,
        #[serde(deserialize_with = "intake::at_most::<_, _, { intake::MAX_IMPORTS }>")]
        imports: Vec<ImportVerdict>,
    },
}

impl LoadError {
    /// The module it names.
    fn module_mut(&mut self) -> &mut String {
        match self {
            Self::TooLarge { module, .. }
            | Self::DigestMismatch { module, .. }
            | Self::Unsupported { module, .. }
            | Self::PolicyExceedsHost { module, .. }
            | Self::ExceedsZoneDisk { module, .. }
            | Self::ExceedsWorkerMemory { module, .. }
            | Self::Compile { module, .. }
            | Self::Link { module, .. }
            | Self::Adapt { module, .. }
            | Self::DeniedImports { module, .. } => module,
        }
    }

    /// The error naming `module`, whatever it named: a worker's names the
    /// module the gateway asked it to load, not one the worker chose
    /// (found by a tester: a worker's load error in one zone named another
    /// zone's module in the gateway's log).
    #[must_use]
    pub fn naming(mut self, module: &str) -> Self {
        module.clone_into(self.module_mut());
        self
    }

    /// A worker's load error as the gateway keeps it: each text cut to
    /// what an honest worker's takes and escaped ([`shown_within`]).
    #[must_use]
    pub fn from_worker(self) -> Self {
        const SHORT: usize = 1024;
        const LONG: usize = 16 << 10;
        let short = |t: String| shown_within(&t, SHORT);
        let long = |t: String| shown_within(&t, LONG);
        match self {
            Self::TooLarge { module, size, max } => Self::TooLarge {
                module: short(module),
                size,
                max,
            },
            Self::DigestMismatch {
                module,
                expected,
                actual,
            } => Self::DigestMismatch {
                module: short(module),
                expected: short(expected),
                actual: short(actual),
            },
            Self::Unsupported { module, reason } => Self::Unsupported {
                module: short(module),
                reason: long(reason),
            },
            Self::PolicyExceedsHost {
                module,
                key,
                value,
                max,
            } => Self::PolicyExceedsHost {
                module: short(module),
                key: short(key),
                value: short(value),
                max: short(max),
            },
            Self::ExceedsZoneDisk {
                module,
                zone,
                need,
                disk,
            } => Self::ExceedsZoneDisk {
                module: short(module),
                zone: short(zone),
                need,
                disk,
            },
            Self::ExceedsWorkerMemory {
                module,
                zone,
                need,
                most,
            } => Self::ExceedsWorkerMemory {
                module: short(module),
                zone: short(zone),
                need,
                most,
            },
            Self::Compile { module, message } => Self::Compile {
                module: short(module),
                message: long(message),
            },
            Self::Link { module, message } => Self::Link {
                module: short(module),
                message: long(message),
            },
            Self::Adapt { module, reason } => Self::Adapt {
                module: short(module),
                reason: long(reason),
            },
            Self::DeniedImports { module, imports } => Self::DeniedImports {
                module: short(module),
                imports: imports
                    .into_iter()
                    .map(|v| ImportVerdict {
                        name: short(v.name),
                        verdict: v.verdict,
                        why: short(v.why),
                    })
                    .collect(),
            },
        }
    }
}

/// The denied imports, for the message: at most 8, then how many more.
fn denied_list(imports: &[ImportVerdict]) -> String {
    const SHOWN: usize = 8;
    let denied: Vec<&ImportVerdict> = imports
        .iter()
        .filter(|v| v.verdict == Verdict::Denied)
        .collect();
    let mut text = denied
        .iter()
        .take(SHOWN)
        .map(|v| format!("`{}` ({})", v.name, v.why))
        .collect::<Vec<_>>()
        .join("; ");
    if denied.len() > SHOWN {
        text.push_str(&format!("; and {} more", denied.len() - SHOWN));
    }
    text
}

/// Why a job could not be started. Nothing ran; the report does not exist.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// Bad inputs (name, count).
    #[error("{0}")]
    Input(String),
    /// Inputs and stdin together above the module's `limits.input`.
    #[error("inputs total {total} bytes, above module `{module}`'s input limit of {limit}")]
    InputTooLarge {
        module: String,
        total: u64,
        limit: ByteSize,
    },
    /// A parameter the policy does not accept, or a bad value.
    #[error("{0}")]
    Param(String),
    /// The job directory could not be prepared.
    #[error("cannot prepare job directory: {0}")]
    Io(#[from] std::io::Error),
    /// The worker process refused or could not start the job.
    #[error("the worker could not start the job: {0}")]
    Worker(String),
    /// The job had no room or place in its zone by the time it was to
    /// start at the latest ([`crate::runner::Queued::place_by`]); nothing
    /// of it ran.
    #[error("the job had no place to run in time")]
    NotPlaced,
}

/// A module verified against its policy and pre-instantiated.
pub struct LoadedModule {
    policy: Policy,
    sha256: Sha256Hex,
    pre: CommandPre<wasi::JobState>,
    from_cache: bool,
    /// In a zone's cache, the artifact under its name (see `cache`).
    artifact: Option<Artifact>,
    adapted: bool,
    imports: Vec<ImportVerdict>,
}

impl std::fmt::Debug for LoadedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoadedModule")
            .field("module", &self.policy.module.name)
            .field("sha256", &self.sha256)
            .finish_non_exhaustive()
    }
}

impl LoadedModule {
    /// The policy it runs under.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Its verified digest.
    pub fn sha256(&self) -> &Sha256Hex {
        &self.sha256
    }

    /// Whether the compiled code came from the on-disk cache.
    pub fn from_cache(&self) -> bool {
        self.from_cache
    }

    /// Whether it was adapted from a WASIp1 core module.
    pub fn adapted(&self) -> bool {
        self.adapted
    }

    /// The component's imports and what the sandbox does with each (none
    /// is denied: a denied import fails the load).
    pub fn imports(&self) -> &[ImportVerdict] {
        &self.imports
    }

    /// What the load found, as it crosses a worker's channel.
    pub fn info(&self) -> LoadInfo {
        LoadInfo {
            from_cache: self.from_cache,
            adapted: self.adapted,
            imports: self.imports.clone(),
            artifact: self.artifact.clone(),
        }
    }
}

/// The process's sandbox: engine, linker, cache, ticker.
pub struct Sandbox {
    engine: Engine,
    linker: wasmtime::component::Linker<wasi::JobState>,
    /// `linker` plus `wasi:http`, for modules whose policy names services.
    http_linker: wasmtime::component::Linker<wasi::JobState>,
    /// Host file descriptors one job may hold open: the process's share
    /// divided among the pool's slots ([`descriptor_budget`]), so jobs
    /// together can never exhaust the descriptors the listeners and the
    /// store need.
    max_open_per_job: u64,
    cache: Option<cache::ModuleCache>,
    config: SandboxConfig,
    /// One permit per pool slot: a job waits for a slot instead of failing
    /// to instantiate when `max_concurrent_jobs` jobs are already running.
    slots: tokio::sync::Semaphore,
    _ticker: engine::EpochTicker,
}

impl std::fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sandbox")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// Why the sandbox could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot start the sandbox: {0}")]
pub struct SandboxError(String);

impl Sandbox {
    /// Builds the engine, linker and epoch ticker, and raises the process's
    /// descriptor limit to give each pool slot its share.
    ///
    /// # Errors
    /// If wasmtime rejects the configuration, or the process's descriptor
    /// limit cannot give `max_concurrent_jobs` jobs their minimum while
    /// keeping the service's reserve ([`descriptor_budget`]).
    pub fn new(config: SandboxConfig) -> Result<Self, SandboxError> {
        let max_open_per_job = engine::max_open_per_job(config.max_concurrent_jobs)
            .map_err(|e| SandboxError(e.to_string()))?;
        let engine = engine::build(&config).map_err(|e| SandboxError(format!("{e:#}")))?;
        let linker = wasi::linker(&engine).map_err(|e| SandboxError(format!("{e:#}")))?;
        let http_linker = wasi::http_linker(&engine).map_err(|e| SandboxError(format!("{e:#}")))?;
        // Job directories and cached native code are only ever used from
        // directories no other user can write (see `cache`).
        if !config.dirs_handed_over {
            cache::ensure_private_dir(&config.work_dir)
                .map_err(|e| SandboxError(format!("work directory: {e}")))?;
        }
        // A guest reads and has collected only the files its job was given
        // or made, told from others by their identity: a file system that
        // cannot tell a new file from one whose freed inode number it was
        // given would let a job's earlier file stand for another's.
        match outputs::tells_files_apart(&config.work_dir) {
            Ok(true) => {}
            Ok(false) => {
                return Err(SandboxError(format!(
                    "work directory {}: its file system gives files neither birth times nor file handles, so a file put in a job's directory could not be told from one the job made; use a work directory on another file system (tmpfs, ext4, xfs, btrfs)",
                    config.work_dir.display()
                )));
            }
            Err(e) => return Err(SandboxError(format!("work directory: {e}"))),
        }
        let cache = match config
            .cache_dir
            .as_deref()
            .map(|dir| {
                if config.dirs_handed_over {
                    cache::ModuleCache::zone(dir, &config.work_dir, &engine)
                } else {
                    cache::ModuleCache::new(dir, &engine)
                }
            })
            .transpose()
        {
            Ok(cache) => cache,
            // A zone's cache that cannot be opened must not stop a worker
            // from starting: it compiles each module instead.
            Err(e) if config.dirs_handed_over => {
                tracing::warn!(error = %e, "the zone's module cache is unusable; compiling without it");
                None
            }
            Err(e) => return Err(SandboxError(format!("module cache: {e}"))),
        };
        let ticker = engine::EpochTicker::start(engine.clone(), config.epoch_tick);
        Ok(Self {
            engine,
            linker,
            http_linker,
            max_open_per_job,
            cache,
            slots: tokio::sync::Semaphore::new(config.max_concurrent_jobs.max(1) as usize),
            config,
            _ticker: ticker,
        })
    }

    /// The settings it was built with.
    pub fn config(&self) -> &SandboxConfig {
        &self.config
    }

    /// Host descriptors one job's guest may hold at once.
    pub fn max_open_per_job(&self) -> u64 {
        self.max_open_per_job
    }

    /// Verifies `wasm` against `policy` (size, digest pin, kind, limits
    /// within the host's), judges its imports against the policy and
    /// adapts a WASIp1 core module into a component ([`intake`]), compiles
    /// it or loads it from the cache, and pre-instantiates it against the
    /// sandbox's linker. The digest is checked before anything parses the
    /// bytes; the imports before anything compiles them.
    ///
    /// # Errors
    /// [`LoadError`] naming the module and what is wrong.
    pub fn load(&self, policy: Policy, wasm: &[u8]) -> Result<Arc<LoadedModule>, LoadError> {
        self.load_expecting(policy, wasm, None, true)
    }

    /// [`Sandbox::load`], where the cache is a zone's (a worker process):
    /// its artifact is loaded only when it is exactly `expected`, the one
    /// the gateway recorded for this module (see `cache`); otherwise the
    /// module is compiled, and, with `hand_over`, written for the gateway
    /// to take, and [`LoadedModule::info`] names the artifact written.
    ///
    /// # Errors
    /// [`LoadError`] naming the module and what is wrong.
    pub fn load_expecting(
        &self,
        policy: Policy,
        wasm: &[u8],
        expected: Option<&Artifact>,
        hand_over: bool,
    ) -> Result<Arc<LoadedModule>, LoadError> {
        let actual = precheck(&self.config, &policy, wasm)?;
        let module = policy.module.name.to_string();
        // Parsed here, never in the gateway: the imports are judged against
        // the policy (and a WASIp1 module adapted) before compiling.
        let prepared = intake::prepare(&policy, wasm)?;
        // The cache is keyed by the digest of the bytes compiled: the
        // uploaded ones for a component; for an adapted module, the adapted
        // component's, so an adapted build (and each adapter version) has
        // an entry of its own.
        let compiled_digest = if prepared.adapted {
            Sha256Hex::digest(&prepared.component)
        } else {
            actual.clone()
        };
        let compiled = match &self.cache {
            Some(cache) => cache
                .load(
                    &self.engine,
                    &prepared.component,
                    &compiled_digest,
                    expected,
                    hand_over,
                )
                .map(|c| (c.component, c.from_cache, c.artifact)),
            None => Component::new(&self.engine, &prepared.component).map(|c| (c, false, None)),
        };
        let (component, from_cache, artifact) = compiled.map_err(|e| LoadError::Compile {
            module: module.clone(),
            message: first_line(&e),
        })?;
        // `wasi:http` is linked only for modules allowed a way out; for the
        // rest an import of it was refused above, before compiling.
        let linker = if policy.network.services.is_empty() {
            &self.linker
        } else {
            &self.http_linker
        };
        let pre = linker
            .instantiate_pre(&component)
            .and_then(CommandPre::new)
            .map_err(|e| LoadError::Link {
                module,
                message: first_line(&e),
            })?;
        Ok(Arc::new(LoadedModule {
            policy,
            sha256: actual,
            pre,
            from_cache,
            artifact,
            adapted: prepared.adapted,
            imports: prepared.imports,
        }))
    }

    /// Runs one job of `module` in the directory `dir` (see
    /// [`JobDir::create`]). Inputs are written into `dir` first; outputs stay
    /// in it for the caller to copy before dropping `dir`.
    ///
    /// Every way the guest can end — exit, trap, limit, deadline — yields a
    /// report; a limit never panics the host or touches another job.
    ///
    /// # Errors
    /// [`JobError`] when the job is refused before the guest starts.
    pub async fn run(
        &self,
        module: &LoadedModule,
        job: &JobSpec,
        dir: &JobDir,
    ) -> Result<JobReport, JobError> {
        self.run_with(module, job, dir, None).await
    }

    /// [`Sandbox::run`], with the job's way out: `egress`, which each of
    /// its outbound requests is handed to, when its policy names services
    /// (without one, every request is refused).
    ///
    /// # Errors
    /// [`JobError`] when the job is refused before the guest starts.
    pub async fn run_with(
        &self,
        module: &LoadedModule,
        job: &JobSpec,
        dir: &JobDir,
        egress: Option<Arc<dyn crate::job::egress::Egress>>,
    ) -> Result<JobReport, JobError> {
        let policy = &module.policy;
        let egress = egress.filter(|_| !policy.network.services.is_empty());
        check_inputs(policy, job)?;
        let args = wasi::guest_args(policy, job).map_err(JobError::Param)?;
        dir.write_inputs(&job.inputs)?;

        let cpu_budget_ns =
            u64::try_from(policy.limits.cpu_time.get().as_nanos()).unwrap_or(u64::MAX);
        let (state, captures) = wasi::job_state(
            policy,
            job,
            dir,
            &args,
            cpu_budget_ns,
            &wasi::HostSide {
                egress,
                extra_preopen: self.config.unsafe_extra_preopen.as_ref(),
                max_open: self.max_open_per_job,
            },
        )?;
        let egress = state.hooks.egress.clone();
        let latch = state.latch.clone();
        let cpu = Arc::clone(&state.cpu);

        // Waiting for a slot is not the job's time: the wall clock starts
        // once it has one. The semaphore is never closed.
        let _slot = self
            .slots
            .acquire()
            .await
            .expect("semaphore is never closed");
        let started = Instant::now();
        if let Some(egress) = &egress {
            egress.start(started + policy.limits.wall_time.get());
        }
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s.limiter());
        // What one call into the host may carry in: wasmtime copies a
        // string or list argument out of the guest's memory before any host
        // code sees it, and by default lets one call carry 128 MiB (found
        // by an attacker: a 128 MiB path took 253 MiB of its worker, and a
        // headers list of 5 million 1-byte values all naming one byte of
        // the guest's memory took 501 MiB for a job allowed 48 MiB).
        store.set_hostcall_fuel(HOSTCALL_FUEL);
        // Every call from the guest into the host, for the report: the
        // host's own evidence of what the guest tried.
        let host_calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let counter = Arc::clone(&host_calls);
        store.call_hook(move |_, hook| {
            if matches!(hook, wasmtime::CallHook::CallingHost) {
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            Ok(())
        });
        store.set_epoch_deadline(1);
        // Epoch ticks enter the host too (this callback); they are counted
        // so the report's host calls are the guest's own.
        let ticks = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let tick_counter = Arc::clone(&ticks);
        let deadline = started + policy.limits.wall_time.get();
        store.epoch_deadline_callback(move |ctx| {
            tick_counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            // The job's real CPU time, host calls included (`cpu::Metered`
            // below charges every poll of the job's future).
            if ctx.data().cpu.over_budget() {
                wasmtime::bail!("cpu_time limit exceeded");
            }
            // The wall clock, read here as well as by the timer below: a
            // guest whose host calls keep its executor's threads busy
            // stops at its deadline even when timers run late.
            if Instant::now() >= deadline {
                ctx.data().latch.fire(LimitKind::WallTime);
                wasmtime::bail!("wall_time limit exceeded");
            }
            // Yield every tick so a busy guest never starves other jobs on
            // the same executor thread, and the wall-clock timer can fire.
            Ok(UpdateDeadline::Yield(1))
        });

        let result = {
            let run = std::pin::pin!(async {
                let command = module
                    .pre
                    .instantiate_async(&mut store)
                    .await
                    .map_err(|e| (Stage::Instantiate, e))?;
                command
                    .wasi_cli_run()
                    .call_run(&mut store)
                    .await
                    .map_err(|e| (Stage::Run, e))
            });
            tokio::time::timeout(policy.limits.wall_time.get(), cpu::Metered::new(run, &cpu)).await
        };
        let wall = started.elapsed();

        let (exit_code, error) = match result {
            Err(_elapsed) => {
                latch.fire(LimitKind::WallTime);
                (None, None)
            }
            // Over its CPU budget (the meter fired the limit).
            Ok(None) => (None, None),
            Ok(Some(Ok(Ok(())))) => (Some(0), None),
            Ok(Some(Ok(Err(())))) => (Some(1), None),
            Ok(Some(Err((stage, e)))) => match e.downcast_ref::<I32Exit>() {
                Some(exit) => (Some(exit.0), None),
                None => {
                    if let Some(wasmtime::Trap::StackOverflow) = e.downcast_ref::<wasmtime::Trap>()
                    {
                        latch.fire(LimitKind::Stack);
                    }
                    (None, Some((stage, e)))
                }
            },
        };
        if let Some((stage, e)) = &error {
            tracing::debug!(job = %job.id, ?stage, error = ?e, "guest failed");
        }
        let backtrace = error.as_ref().and_then(|(_, e)| backtrace(e));
        let limit = latch.fired();
        let failure = if let Some(limit) = limit {
            Some(Failure {
                kind: FailureKind::Limit,
                message: limit_message(policy, limit, &self.config, self.max_open_per_job),
            })
        } else if let Some((stage, e)) = &error {
            Some(Failure {
                kind: match stage {
                    Stage::Instantiate => FailureKind::Instantiate,
                    Stage::Run => FailureKind::Trap,
                },
                message: trap_message(e),
            })
        } else {
            match exit_code {
                Some(0) => None,
                Some(code) => Some(Failure {
                    kind: FailureKind::Exit,
                    message: format!("guest exited with code {code}"),
                }),
                None => Some(Failure {
                    kind: FailureKind::Trap,
                    message: "guest ended without an exit code".into(),
                }),
            }
        };

        let state = store.data();
        tracing::debug!(
            job = %job.id,
            written = state.quota.bytes_written(),
            descriptors = state.quota.open_descriptors(),
            "job meters at its end"
        );
        let measurements = Measurements {
            wall_time_ms: wall.as_secs_f64() * 1000.0,
            cpu_time_ms: cpu.spent() as f64 / 1e6,
            peak_memory_bytes: state.limiter.peak_memory() as u64,
            output_bytes: state.quota.bytes_charged(),
            output_entries: state.quota.entries_charged(),
            // Each epoch tick enters the host once (the deadline callback);
            // those are the host's doing, not the guest's.
            host_calls: host_calls
                .load(std::sync::atomic::Ordering::Relaxed)
                .saturating_sub(ticks.load(std::sync::atomic::Ordering::Relaxed)),
            refused: state.refusals.count(),
        };
        dir.set_created(state.quota.created());
        drop(store);

        // Every entry in `/out` was charged to the quota, so no charge means
        // nothing to collect: skip the directory walk.
        let (collected, failure) = if measurements.output_entries == 0 {
            (outputs::Collected::default(), failure)
        } else {
            // The directory made, not what is at its path now.
            let out_dir = dir.open_output_to_collect();
            let created = dir.created();
            // Within the policy's bounds, which the quota held the guest
            // to: past them is what else wrote into `/out` (native code in
            // a worker, a sparse file of any size), not read to its end.
            let bounds = outputs::Bounds::of(&policy.limits);
            let walked = tokio::task::spawn_blocking(move || {
                let out_dir = out_dir.map_err(outputs::CollectError::Root)?;
                outputs::collect(&beneath::fd_path(&out_dir), None, bounds, Some(&created))
            })
            .await
            .map_err(|e| format!("output collection stopped: {e}"))
            .and_then(|r| r.map_err(|e| e.to_string()));
            // Nothing the guest leaves in `/out` is a host error: a failed
            // collection fails the job, with why (the first failure stays).
            match walked {
                Ok(c) => (c, failure),
                Err(message) => {
                    tracing::warn!(job = %job.id, error = %message, "cannot collect outputs");
                    let failure = failure.or(Some(Failure {
                        kind: FailureKind::Output,
                        message,
                    }));
                    (outputs::Collected::default(), failure)
                }
            }
        };

        Ok(JobReport {
            job_id: job.id.clone(),
            module: policy.module.name.to_string(),
            module_sha256: module.sha256.to_string(),
            policy_sha256: policy.source_sha256.as_ref().map(ToString::to_string),
            zone: policy.module.zone.to_string(),
            outcome: if failure.is_none() {
                Outcome::Succeeded
            } else {
                Outcome::Failed
            },
            exit_code,
            limit,
            failure,
            outputs: collected.files,
            skipped_outputs: collected.skipped,
            stdout: captured(&captures.stdout, limit == Some(LimitKind::Stdout)),
            stderr: captured(&captures.stderr, limit == Some(LimitKind::Stderr)),
            measurements,
            calls: egress.map(|e| e.report()),
            backtrace,
        })
    }
}

/// Checks `wasm` against `policy` and the host's settings without parsing
/// it: its size, its digest against the policy's pin, its kind from its
/// header, and the policy's limits against the host's. Returns the digest.
/// The gateway calls this before it hands a module to a worker; the
/// sandbox again before it compiles.
///
/// # Errors
/// [`LoadError`] naming the module and what is wrong.
pub fn precheck(
    config: &SandboxConfig,
    policy: &Policy,
    wasm: &[u8],
) -> Result<Sha256Hex, LoadError> {
    let module = policy.module.name.to_string();
    if wasm.len() > config.max_module_size {
        return Err(LoadError::TooLarge {
            module,
            size: wasm.len(),
            max: config.max_module_size,
        });
    }
    let actual = Sha256Hex::digest(wasm);
    if actual != policy.module.sha256 {
        return Err(LoadError::DigestMismatch {
            module,
            expected: policy.module.sha256.to_string(),
            actual: actual.to_string(),
        });
    }
    if let Some(reason) = unsupported_kind(wasm) {
        return Err(LoadError::Unsupported { module, reason });
    }
    let l = &policy.limits;
    let exceeds = |key: &str, value: String, max: String| LoadError::PolicyExceedsHost {
        module: module.clone(),
        key: key.to_owned(),
        value,
        max,
    };
    if l.memory > config.max_memory {
        return Err(exceeds(
            "memory",
            l.memory.to_string(),
            config.max_memory.to_string(),
        ));
    }
    if l.table_elements as usize > engine::MAX_TABLE_ELEMENTS {
        return Err(exceeds(
            "table_elements",
            l.table_elements.to_string(),
            engine::MAX_TABLE_ELEMENTS.to_string(),
        ));
    }
    Ok(actual)
}

/// Checks a job against its module's policy without running it: input
/// names, count and total size, and parameters. The service calls this at
/// submission so a bad job is refused before it is accepted.
///
/// # Errors
/// [`JobError::Input`], [`JobError::InputTooLarge`] or [`JobError::Param`].
pub fn validate(policy: &Policy, job: &JobSpec) -> Result<(), JobError> {
    check_inputs(policy, job)?;
    wasi::guest_args(policy, job).map_err(JobError::Param)?;
    Ok(())
}

#[derive(Clone, Copy, Debug)]
enum Stage {
    Instantiate,
    Run,
}

fn check_inputs(policy: &Policy, job: &JobSpec) -> Result<(), JobError> {
    if job.inputs.len() > MAX_INPUTS {
        return Err(JobError::Input(format!(
            "{} inputs given, at most {MAX_INPUTS} allowed",
            job.inputs.len()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut total = job.stdin.len() as u64;
    for input in &job.inputs {
        validate_input_name(&input.name).map_err(JobError::Input)?;
        if !seen.insert(input.name.as_str()) {
            return Err(JobError::Input(format!(
                "input `{}` given twice",
                input.name
            )));
        }
        total += input.data.len() as u64;
    }
    if total > policy.limits.input.as_u64() {
        return Err(JobError::InputTooLarge {
            module: policy.module.name.to_string(),
            total,
            limit: policy.limits.input,
        });
    }
    Ok(())
}

fn limit_message(
    policy: &Policy,
    limit: LimitKind,
    config: &SandboxConfig,
    max_open: u64,
) -> String {
    let l = &policy.limits;
    let value = match limit {
        LimitKind::Memory => l.memory.to_string(),
        LimitKind::Tables => format!("{} elements", l.table_elements),
        LimitKind::CpuTime => l.cpu_time.to_string(),
        LimitKind::WallTime => l.wall_time.to_string(),
        LimitKind::Stack => ByteSize::bytes(config.max_wasm_stack as u64).to_string(),
        LimitKind::Stdout => l.stdout.to_string(),
        LimitKind::Stderr => l.stderr.to_string(),
        LimitKind::Output => l.output.to_string(),
        LimitKind::OutputFiles => format!("{} entries", l.output_files),
        LimitKind::Instances => "the per-job instance limit".to_owned(),
        LimitKind::Descriptors => format!("{max_open} host descriptors"),
        LimitKind::Written => {
            ByteSize::bytes(l.output.as_u64().saturating_mul(limits::WRITTEN_PER_OUTPUT))
                .to_string()
        }
    };
    format!("{limit} limit of {value} exceeded")
}

fn trap_message(e: &wasmtime::Error) -> String {
    match e.downcast_ref::<wasmtime::Trap>() {
        Some(trap) => trap.to_string(),
        None => first_line(e),
    }
}

/// The wasm backtrace wasmtime attached to a trap, bounded, with names
/// demangled.
fn backtrace(e: &wasmtime::Error) -> Option<crate::job::Backtrace> {
    let bt = e.downcast_ref::<wasmtime::WasmBacktrace>()?;
    let frames: Vec<_> = bt
        .frames()
        .iter()
        .take(crate::job::MAX_BACKTRACE_FRAMES + 1)
        .map(|f| crate::job::BacktraceFrame {
            function: f
                .func_name()
                .map(|n| format!("{:#}", rustc_demangle::demangle(n))),
            func_index: f.func_index(),
            module_offset: f.module_offset().map(|o| o as u64),
            module: f.module().name().map(str::to_owned),
        })
        .collect();
    (!frames.is_empty()).then(|| crate::job::Backtrace::new(frames, false))
}

fn first_line(e: &wasmtime::Error) -> String {
    let text = format!("{e:#}");
    text.lines().next().unwrap_or("").to_owned()
}

/// The report's view of a capture, taken out of its pipe: its text at most
/// [`MAX_CAPTURE`] bytes, invalid sequences replaced. Built a piece at a
/// time, so the host holds no more than the capture and its text (a
/// replacement character takes three bytes where the byte it replaces
/// took one: a whole lossy copy of 4 MiB of `0xFF` took 12 MiB).
fn captured(pipe: &pipe::CappedPipe, over_limit: bool) -> Captured {
    let (kept, written) = pipe.take();
    let kept_len = kept.len();
    let kept = Vec::from(kept);
    let (text, cut) = match String::from_utf8(kept) {
        Ok(text) => (text, false),
        Err(e) => {
            let kept = e.into_bytes();
            let mut text = String::with_capacity(kept.len().min(MAX_CAPTURE));
            let mut cut = false;
            for chunk in kept.utf8_chunks() {
                let valid = chunk.valid();
                let room = MAX_CAPTURE - text.len();
                if valid.len() > room {
                    text.push_str(&valid[..valid.floor_char_boundary(room)]);
                    cut = true;
                    break;
                }
                text.push_str(valid);
                if !chunk.invalid().is_empty() {
                    if MAX_CAPTURE - text.len() < char::REPLACEMENT_CHARACTER.len_utf8() {
                        cut = true;
                        break;
                    }
                    text.push(char::REPLACEMENT_CHARACTER);
                }
            }
            (text, cut)
        }
    };
    Captured {
        truncated: over_limit || cut || written > kept_len,
        text,
        bytes: written as u64,
    }
}

/// Why `wasm` cannot be run, judged from its header alone.
fn unsupported_kind(wasm: &[u8]) -> Option<String> {
    if Engine::detect_precompiled(wasm).is_some() {
        return Some("it is a precompiled artifact; only `.wasm` components are accepted".into());
    }
    // A component, or a core module (adapted in `Sandbox::load`, where
    // its bytes are parsed).
    intake::kind(wasm).err()
}

#[cfg(test)]
mod tests {

    /// What a worker says reaches logs and answers cut to its bound with
    /// its control characters escaped: no line of its own in the log.
    #[test]
    fn a_workers_load_error_names_the_module_it_was_asked_to_load() {
        let said = LoadError::Compile {
            module: "hello".into(),
            message: "no".into(),
        }
        .from_worker()
        .naming("spin");
        assert!(matches!(&said, LoadError::Compile { module, .. } if module == "spin"));
        assert!(said.to_string().contains("`spin`"), "{said}");
    }

    #[test]
    fn a_workers_texts_are_cut_and_escaped() {
        let forged = format!(
            "no\n2026-01-01T00:00:00Z INFO forged\u{1b}[0m{}",
            "x".repeat(16 << 20)
        );
        let shown = shown_within(&forged, 1024);
        assert!(shown.len() <= 1024, "{}", shown.len());
        assert!(shown.starts_with("no\\u{a}2026"), "{shown}");
        assert!(!shown.chars().any(char::is_control), "{shown}");
        // What breaks or reorders a line without being a control is
        // escaped too: line and paragraph separators, bidi and zero-width
        // marks.
        for c in [
            '\u{2028}', '\u{2029}', '\u{061c}', '\u{200b}', '\u{202e}', '\u{2066}', '\u{2060}',
            '\u{feff}',
        ] {
            let shown = shown_within(&format!("a{c}b"), 64);
            assert_eq!(shown, format!("a{}b", c.escape_unicode()));
        }
        let error = LoadError::Compile {
            module: forged.clone(),
            message: forged.clone(),
        }
        .from_worker();
        let LoadError::Compile { module, message } = &error else {
            panic!("{error:?}");
        };
        assert!(module.len() <= 1024 && message.len() <= 16 << 10);
        assert!(!error.to_string().contains('\n'));
        let denied = LoadError::DeniedImports {
            module: "m".into(),
            imports: vec![ImportVerdict {
                name: forged.clone(),
                verdict: intake::Verdict::Denied,
                why: forged,
            }],
        }
        .from_worker();
        let LoadError::DeniedImports { imports, .. } = &denied else {
            panic!("{denied:?}");
        };
        assert!(imports[0].name.len() <= 1024 && imports[0].why.len() <= 1024);
        assert!(!denied.to_string().contains('\n'));
    }

    use super::*;

    /// The service answers 413 for inputs over the module's limit and 400
    /// for other bad inputs: it tells them apart by the error's variant.
    #[test]
    fn inputs_over_the_limit_are_their_own_error() {
        let text = format!(
            "version = 1\n[module]\nname = \"demo\"\nsha256 = \"{}\"\n[limits]\ninput = \"1 KiB\"\n",
            "0".repeat(64)
        );
        let policy = Policy::parse(&text, std::path::Path::new("demo.toml")).unwrap();
        let mut job = JobSpec::new();
        job.inputs.push(JobInput {
            name: "big.bin".into(),
            data: vec![0; 1025].into(),
        });
        match validate(&policy, &job) {
            Err(JobError::InputTooLarge { total, limit, .. }) => {
                assert_eq!((total, limit.as_u64()), (1025, 1024));
            }
            other => panic!("{other:?}"),
        }
        job.inputs[0].name = ".hidden".into();
        assert!(matches!(validate(&policy, &job), Err(JobError::Input(_))));
    }
}
