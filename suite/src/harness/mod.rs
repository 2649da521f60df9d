//! What every local attack runs against: the lanes (a runner, hardened
//! workers by default, with the well-behaved neighbour loaded in it), the
//! base policy and the bounds the checks hold attacks to, the canaries,
//! the bait socket and the bait services, set up once.
//!
//! - [`evidence`]: host-side observations (canary files under an inotify
//!   watch, descriptor, socket and memory sampling, bait sockets, disk
//!   usage).
//! - [`meters`]: the process's own CPU and write meters around a job.
//! - [`egress`]: the bait services and the relay the lateral attacks go
//!   through.
//! - [`observe`]: one job run with the neighbour beside it.
//! - [`checks`]: the host-side checks every local guest job gets.

pub mod checks;
pub mod egress;
pub mod evidence;
pub mod meters;
pub mod observe;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::model::{GuestRun, Param, SUITE_SCOPE, SuiteError, SuiteOptions, hello_wasm};
use bulkhead::policy::{Policy, Sha256Hex};
use bulkhead::runner::{Finished, InProcess, Module, Runner, Workers};
use bulkhead::sandbox::{JobInput, JobSpec, Sandbox, SandboxConfig};
use bulkhead::worker::pool::{Pool, PoolConfig};
use bytes::Bytes;
use egress::Egress;
use evidence::{Bait, Canary};

/// The suite's own limits: tight, so every exhaustion attack reaches its
/// wall quickly. A `--policy` replaces them.
pub const STANDARD_LIMITS: &str = r#"memory = "32 MiB"
cpu_time = "500 ms"
wall_time = "1 s"
output = "1 MiB"
output_files = 16
stdout = "64 KiB"
stderr = "16 KiB"
"#;

/// What the checks hold each attack to: the limits a policy promises.
#[derive(Clone, Debug)]
pub struct Bounds {
    pub(crate) memory: u64,
    pub(crate) cpu_ms: f64,
    pub(crate) wall_ms: f64,
    pub(crate) output: u64,
    pub(crate) output_files: u64,
    pub(crate) stdout: u64,
    pub(crate) stderr: u64,
}

impl Bounds {
    fn of(policy: &Policy) -> Self {
        let l = &policy.limits;
        Self {
            memory: l.memory.as_u64(),
            cpu_ms: l.cpu_time.get().as_secs_f64() * 1000.0,
            wall_ms: l.wall_time.get().as_secs_f64() * 1000.0,
            output: l.output.as_u64(),
            output_files: u64::from(l.output_files),
            stdout: l.stdout.as_u64(),
            stderr: l.stderr.as_u64(),
        }
    }
}

/// The `[limits]` table and zone every generated policy starts from.
#[derive(Clone, Debug)]
pub struct Base {
    /// `[limits]`.
    pub limits: toml::Table,
    /// `module.zone`.
    pub zone: String,
}

impl Base {
    /// From `--policy` (validated first) and `--zone`, or the suite's own.
    ///
    /// # Errors
    /// An unreadable or invalid policy.
    pub fn from_options(options: &SuiteOptions) -> Result<Self, SuiteError> {
        let mut base = match &options.policy {
            Some(path) => {
                let policy = Policy::load(path).map_err(|e| SuiteError::Setup(e.to_string()))?;
                let text = std::fs::read_to_string(path)?;
                let value: toml::Table =
                    toml::from_str(&text).map_err(|e| SuiteError::Setup(e.to_string()))?;
                Base {
                    limits: value
                        .get("limits")
                        .and_then(|l| l.as_table())
                        .cloned()
                        .unwrap_or_default(),
                    zone: policy.module.zone.to_string(),
                }
            }
            None => Base {
                limits: toml::from_str(STANDARD_LIMITS).expect("standard limits parse"),
                zone: "untrusted".to_owned(),
            },
        };
        if let Some(zone) = &options.zone {
            base.zone = zone.clone();
        }
        Ok(base)
    }

    /// Policy text for `name` running `run` (pinned to its bytes), with
    /// `extra` limits over the base ones.
    pub fn policy_text(
        &self,
        name: &str,
        wasm: &[u8],
        run: Option<&GuestRun>,
        extra: &[(String, toml::Value)],
    ) -> String {
        let mut limits = self.limits.clone();
        if let Some(run) = run {
            for (k, v) in &run.limits {
                limits.insert(k.clone(), v.clone());
            }
        }
        for (k, v) in extra {
            limits.insert(k.clone(), v.clone());
        }
        let mut doc = toml::Table::new();
        doc.insert("version".into(), toml::Value::Integer(1));
        let mut module = toml::Table::new();
        module.insert("name".into(), name.into());
        module.insert("sha256".into(), Sha256Hex::digest(wasm).to_string().into());
        module.insert("zone".into(), self.zone.clone().into());
        doc.insert("module".into(), module.into());
        let mut access = toml::Table::new();
        access.insert(
            "scopes".into(),
            toml::Value::Array(vec![SUITE_SCOPE.into()]),
        );
        doc.insert("access".into(), access.into());
        doc.insert("limits".into(), limits.into());
        if let Some(run) = run {
            let mut r = toml::Table::new();
            let strings =
                |v: Vec<String>| toml::Value::Array(v.into_iter().map(Into::into).collect());
            r.insert("args".into(), strings(run.args.clone()));
            r.insert(
                "params".into(),
                strings(run.params.iter().map(|(k, _)| k.clone()).collect()),
            );
            let mut env = toml::Table::new();
            env.insert("BULKHEAD_SUITE".into(), "policy literal".into());
            r.insert("env".into(), env.into());
            doc.insert("run".into(), r.into());
            if !run.services.is_empty() {
                let mut network = toml::Table::new();
                network.insert(
                    "services".into(),
                    toml::Value::Array(run.services.iter().map(|s| s.as_str().into()).collect()),
                );
                doc.insert("network".into(), network.into());
            }
        }
        toml::to_string(&doc).expect("a policy table serializes")
    }
}

/// Where a lane runs its guests.
#[derive(Clone, Debug)]
pub(crate) enum Mode {
    /// Hardened worker processes of `program`, every layer required, as
    /// the service runs them.
    Workers { program: PathBuf },
    /// This process's sandbox (`--in-process`, or a weakening no worker
    /// can be given).
    InProcess,
}

/// A runner (hardened workers, or this process's sandbox) and the
/// well-behaved module run beside each attack in it.
pub(crate) struct Lane {
    pub runner: Arc<dyn Runner>,
    pub neighbour: Arc<Module>,
    /// Where the lane's jobs' outbound calls go, if anywhere.
    relay: Option<Arc<bulkhead::relay::Relay>>,
    /// Host descriptors one job may hold where it runs.
    pub max_open_per_job: u64,
    /// The largest module the lane loads.
    pub max_module_size: usize,
    /// Where job directories are on the host: the sandbox's work directory,
    /// or the zone's, holding one directory per worker.
    pub work_dir: PathBuf,
}

impl Lane {
    async fn new(
        config: SandboxConfig,
        base: &Base,
        relay: Option<Arc<bulkhead::relay::Relay>>,
        mode: &Mode,
    ) -> Result<Self, SuiteError> {
        let max_module_size = config.max_module_size;
        let (runner, max_open_per_job, work_dir) = start_runner(config, &base.zone, mode).await?;
        let setup = |e: String| SuiteError::Setup(e);
        let hello = hello_wasm();
        let text = base.policy_text("suite-neighbour", hello, None, &[]);
        let policy = parse(&text).map_err(SuiteError::Setup)?;
        let neighbour = runner
            .load(policy, Bytes::from_static(hello))
            .await
            .map_err(|e| setup(format!("cannot load the neighbour: {e}")))?;
        Ok(Self {
            runner,
            neighbour,
            relay,
            max_open_per_job,
            max_module_size,
            work_dir,
        })
    }

    /// Whether its guests run in worker processes.
    pub fn in_workers(&self) -> bool {
        self.runner.state().mode != "in-process"
    }

    /// Its workers' process ids, asked anew at each call (none
    /// in-process; a faulted worker is replaced).
    pub fn pids(&self) -> evidence::Pids {
        let runner = Arc::clone(&self.runner);
        Arc::new(move || runner.state().workers.into_values().flatten().collect())
    }

    /// Loads `wasm` under `policy`.
    pub async fn load(&self, policy: Policy, wasm: &[u8]) -> Result<Arc<Module>, String> {
        self.runner
            .load(policy, Bytes::copy_from_slice(wasm))
            .await
            .map_err(|e| e.to_string())
    }

    /// Runs `job` of `module`, its calls (if its policy names services)
    /// going through the lane's relay as the suite's caller.
    pub async fn run(
        &self,
        module: &Module,
        job: &JobSpec,
    ) -> Result<Finished, bulkhead::sandbox::JobError> {
        let egress = self
            .relay
            .as_ref()
            .and_then(|r| r.grant(module.policy(), &job.id, Ok(egress::caller()), None));
        self.runner.run(module, job, egress).await
    }

    /// The empty input directories jobs without inputs share (one per
    /// worker).
    pub fn shared_inputs(&self) -> Vec<PathBuf> {
        if !self.in_workers() {
            return vec![self.work_dir.join(".empty-in")];
        }
        self.worker_dirs()
            .into_iter()
            .map(|w| w.join(".empty-in"))
            .filter(|p| p.exists())
            .collect()
    }

    /// The job directories (`<id>.out`, `<id>.in`) now in its workers'
    /// directories (none in-process, where a job's are known by its
    /// [`JobDir`](bulkhead::sandbox::JobDir)).
    pub fn worker_job_dirs(&self) -> std::collections::BTreeSet<PathBuf> {
        let mut all = std::collections::BTreeSet::new();
        if !self.in_workers() {
            return all;
        }
        for w in self.worker_dirs() {
            for entry in std::fs::read_dir(&w).into_iter().flatten().flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if !name.starts_with('.') && (name.ends_with(".out") || name.ends_with(".in")) {
                    all.insert(entry.path());
                }
            }
        }
        all
    }

    /// The workers' own directories: each a file system of its own,
    /// mounted nowhere, reached as the worker's working directory
    /// (`/proc/<pid>/cwd`); or, where the gateway cannot mount one, a
    /// directory in the zone's work directory.
    fn worker_dirs(&self) -> Vec<PathBuf> {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(&self.work_dir)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        dirs.extend(
            self.runner
                .state()
                .workers
                .into_values()
                .flatten()
                .map(|pid| PathBuf::from(format!("/proc/{pid}/cwd"))),
        );
        dirs
    }

    fn close(&self) {
        self.runner.close();
    }
}

/// A runner over `config` for `zone`, as `mode` says: this process's
/// sandbox, or a pool of one hardened worker built as `bulkhead run` and
/// the service build a zone's (its own work and cache directories inside
/// `config`'s, every layer required). Also the host descriptors one job
/// may hold there, and where its job directories are.
pub(crate) async fn start_runner(
    config: SandboxConfig,
    zone: &str,
    mode: &Mode,
) -> Result<(Arc<dyn Runner>, u64, PathBuf), SuiteError> {
    let setup = |e: String| SuiteError::Setup(e);
    Ok(match mode {
        Mode::InProcess => {
            let sandbox = Sandbox::new(config).map_err(|e| setup(e.to_string()))?;
            let max_open = sandbox.max_open_per_job();
            let work_dir = sandbox.config().work_dir.clone();
            (Arc::new(InProcess::new(sandbox)), max_open, work_dir)
        }
        Mode::Workers { program } => {
            // As `bulkhead run` and the service build a zone's pool:
            // the zone's own work and cache directories, every layer
            // required.
            bulkhead::sandbox::create_private_dir_all(&config.work_dir)?;
            let zone = zone.to_owned();
            let work_dir = config.work_dir.join("zones").join(&zone);
            let cache_dir = match &config.cache_dir {
                Some(dir) => {
                    bulkhead::sandbox::create_private_dir_all(dir)?;
                    dir.join("zones").join(&zone)
                }
                None => work_dir.with_extension("cache"),
            };
            let isolation = bulkhead::config::Isolation::default();
            let max_open = bulkhead::worker::WORKER_MAX_OPEN;
            let per_job =
                bulkhead::sandbox::descriptor_budget(max_open, config.max_concurrent_jobs)
                    .map_err(|e| setup(e.to_string()))?;
            let pool = Pool::start(
                PoolConfig {
                    zone: zone.clone(),
                    program: program.clone(),
                    workers: 1,
                    jobs_per_worker: 0,
                    max_concurrent_jobs: config.max_concurrent_jobs,
                    memory: None,
                    disk: Some(bulkhead::config::ZonePool::default().disk.as_u64()),
                    work_dir: work_dir.clone(),
                    work_held: None,
                    cache_dir,
                    cache_held: None,
                    run_as: isolation.run_as,
                    max_open,
                    max_threads: bulkhead::worker::WORKER_MAX_THREADS,
                    require: isolation.require,
                    weaken: std::collections::BTreeSet::new(),
                },
                |_| {},
            )
            .await
            .map_err(|e| setup(format!("cannot start the suite's workers: {e}")))?;
            let pools = std::iter::once((zone, pool)).collect();
            (Arc::new(Workers::new(config, pools)), per_job, work_dir)
        }
    })
}

/// Everything an attack runs against, set up once.
pub(crate) struct Harness {
    /// Guests, with the module cache (the hostile guest compiles once).
    pub main: Lane,
    /// Generated modules, without a cache, so compiling them is measured.
    pub fresh: Lane,
    pub base: Base,
    pub weak_limits: Vec<(String, toml::Value)>,
    pub bounds: Bounds,
    pub canary: Canary,
    pub bait: Bait,
    /// The bait services and the relay the lateral HTTP attacks go through.
    pub egress: Egress,
    pub weak_services: Vec<String>,
    pub host_secrets: Vec<(String, Vec<u8>)>,
    pub scratch: PathBuf,
    /// Where the lanes run guests.
    pub mode: Mode,
    /// Where the guests ran, for the report: hardened workers, or this
    /// process (and why).
    pub target: String,
    _temp: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for Harness {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("scratch", &self.scratch)
            .finish_non_exhaustive()
    }
}

impl Harness {
    pub(crate) async fn new(options: &SuiteOptions) -> Result<Self, SuiteError> {
        let (temp, scratch) = match &options.scratch {
            Some(dir) => {
                bulkhead::sandbox::create_private_dir_all(dir)?;
                (None, dir.clone())
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("bulkhead-suite-")
                    .tempdir()?;
                let p = t.path().to_owned();
                (Some(t), p)
            }
        };
        let canary = Canary::plant(&scratch.join("canary"))?;
        let bait = Bait::open()?;
        let egress = Egress::start(&scratch.join("keys"))
            .await
            .map_err(|e| SuiteError::Setup(format!("cannot start the bait services: {e}")))?;
        let base = Base::from_options(options)?;
        let weakening = options.weakening.clone().unwrap_or_default();

        let mut config = SandboxConfig::new(scratch.join("jobs"));
        config.cache_dir = options.cache_dir.clone();
        config.max_concurrent_jobs = 4;
        if weakening.preopen_canary {
            let dir = canary.dir().to_owned();
            let guest = dir.to_string_lossy().into_owned();
            config.unsafe_extra_preopen = Some((dir, guest));
        }
        let mut fresh = config.clone();
        fresh.cache_dir = None;
        fresh.work_dir = scratch.join("fresh-jobs");
        fresh.max_concurrent_jobs = 2;
        // Guests run in hardened workers unless asked otherwise, or unless
        // the weakening is one no worker can be given (the extra preopen
        // is a `SandboxConfig` field the worker's start arguments do not
        // carry).
        let (mode, target) = if options.in_process {
            (
                Mode::InProcess,
                "local sandbox, in this process (--in-process)".to_owned(),
            )
        } else if weakening.preopen_canary {
            (
                Mode::InProcess,
                "local sandbox, in this process (the weakened configuration's extra preopen \
                 cannot reach a worker)"
                    .to_owned(),
            )
        } else {
            let program = options
                .drill_program
                .clone()
                .map_or_else(std::env::current_exe, Ok)
                .map_err(|e| SuiteError::Setup(format!("cannot find this binary: {e}")))?;
            (
                Mode::Workers { program },
                "local hardened workers".to_owned(),
            )
        };
        let main = Lane::new(config, &base, Some(Arc::clone(&egress.relay)), &mode).await?;
        let fresh = Lane::new(fresh, &base, None, &mode).await?;
        let hello = hello_wasm();
        // The bounds are those of the policy the attacks were meant to
        // run under, without the weakening.
        let bounds_text = base.policy_text("suite-bounds", hello, None, &[]);
        let bounds = Bounds::of(&parse(&bounds_text).map_err(SuiteError::Setup)?);
        Ok(Self {
            main,
            fresh,
            base,
            weak_limits: weakening.limits,
            bounds,
            canary,
            bait,
            egress,
            weak_services: weakening.grant_services,
            host_secrets: evidence::host_secrets(),
            scratch,
            mode,
            target,
            _temp: temp,
        })
    }

    /// Loads `run` under the base policy (plus any weakening) as `name`.
    pub async fn load(&self, name: &str, run: &GuestRun) -> Result<Arc<Module>, String> {
        let mut run = run.clone();
        if !run.services.is_empty() {
            for s in &self.weak_services {
                if !run.services.contains(s) {
                    run.services.push(s.clone());
                }
            }
        }
        let text = self
            .base
            .policy_text(name, &run.wasm, Some(&run), &self.weak_limits);
        let policy = Policy::parse_with(
            &text,
            Path::new("escape-suite.toml"),
            &self.egress.declared(),
        )
        .map_err(|e| e.to_string())?;
        self.main.load(policy, &run.wasm).await
    }

    /// Stops the lanes' workers.
    pub(crate) fn close(&self) {
        self.main.close();
        self.fresh.close();
    }

    fn value(&self, p: &Param, secret: &str) -> String {
        match p {
            Param::Lit(s) => s.clone(),
            Param::CanaryFile => self.canary.file().to_string_lossy().into_owned(),
            Param::CanaryDir => self.canary.dir().to_string_lossy().into_owned(),
            Param::BaitPort => self.bait.port.to_string(),
            Param::Secret => secret.to_owned(),
            Param::ServicePort => self.egress.forbidden_port.to_string(),
        }
    }

    pub(crate) fn spec(&self, run: &GuestRun, secret: &str) -> JobSpec {
        let mut job = JobSpec::new();
        job.inputs = run
            .inputs
            .iter()
            .map(|(name, data)| JobInput {
                name: name.clone(),
                data: data.clone().into(),
            })
            .collect();
        job.params = run
            .params
            .iter()
            .map(|(k, v)| (k.clone(), self.value(v, secret)))
            .collect();
        job
    }

    /// Secrets that must not show up in anything `job` produces: the
    /// canary, the host's, the attack's own, minus any the job was handed
    /// as a parameter (a guest may print its own arguments).
    pub(crate) fn secrets(
        &self,
        job: &JobSpec,
        forbidden: &[String],
        secret: &str,
    ) -> Vec<(String, Vec<u8>)> {
        let given: String = job.params.values().cloned().collect::<Vec<_>>().join("\n");
        let mut all = self.host_secrets.clone();
        all.push((
            "the canary file".into(),
            self.canary.secret.clone().into_bytes(),
        ));
        if !given.contains(secret) {
            all.push(("the attack's secret".into(), secret.as_bytes().to_vec()));
        }
        all.retain(|(_, s)| !given.contains(&*String::from_utf8_lossy(s)));
        // The tester's forbidden strings count wherever they appear.
        for f in forbidden {
            all.push((format!("forbidden string `{f}`"), f.as_bytes().to_vec()));
        }
        all
    }
}

pub(crate) fn parse(text: &str) -> Result<Policy, String> {
    Policy::parse(text, Path::new("escape-suite.toml")).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead::policy::ByteSize;

    #[test]
    fn standard_limits_make_a_valid_policy() {
        let base = Base::from_options(&SuiteOptions::default()).unwrap();
        let text = base.policy_text("escape-x", b"\0asm", None, &[]);
        let policy = parse(&text).unwrap();
        assert_eq!(policy.limits.memory, ByteSize::mib(32));
        assert_eq!(policy.access.scopes[0].as_str(), SUITE_SCOPE);
    }
}
