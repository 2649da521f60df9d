//! What every local attack runs against: the sandboxes (lanes) with the
//! well-behaved neighbour, the base policy and the bounds the checks hold
//! attacks to, the canaries, the bait socket and the bait services, set
//! up once.
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
use bulkhead::sandbox::{
    JobDir, JobInput, JobReport, JobSpec, LoadedModule, Sandbox, SandboxConfig,
};
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

/// A sandbox and the well-behaved module run beside each attack in it.
pub(crate) struct Lane {
    pub sandbox: Sandbox,
    pub neighbour: Arc<LoadedModule>,
    /// Where the lane's jobs' outbound calls go, if anywhere.
    relay: Option<Arc<bulkhead::relay::Relay>>,
}

impl Lane {
    fn new(
        config: SandboxConfig,
        base: &Base,
        relay: Option<Arc<bulkhead::relay::Relay>>,
    ) -> Result<Self, SuiteError> {
        let sandbox = Sandbox::new(config).map_err(|e| SuiteError::Setup(e.to_string()))?;
        let hello = hello_wasm();
        let text = base.policy_text("suite-neighbour", hello, None, &[]);
        let neighbour = load(&sandbox, &text, hello).map_err(SuiteError::Setup)?;
        Ok(Self {
            sandbox,
            neighbour,
            relay,
        })
    }

    /// Runs `job` of `module` in `dir`, its calls (if its policy names
    /// services) going through the lane's relay as the suite's caller.
    pub async fn run(
        &self,
        module: &LoadedModule,
        job: &JobSpec,
        dir: &JobDir,
    ) -> Result<JobReport, bulkhead::sandbox::JobError> {
        let egress = self
            .relay
            .as_ref()
            .and_then(|r| r.grant(module.policy(), &job.id, Ok(egress::caller()), None));
        self.sandbox.run_with(module, job, dir, egress).await
    }
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
        let main = Lane::new(config, &base, Some(Arc::clone(&egress.relay)))?;
        let fresh = Lane::new(fresh, &base, None)?;
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
            _temp: temp,
        })
    }

    /// Loads `run` under the base policy (plus any weakening) as `name`.
    pub fn load(&self, name: &str, run: &GuestRun) -> Result<Arc<LoadedModule>, String> {
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
        self.main
            .sandbox
            .load(policy, &run.wasm)
            .map_err(|e| e.to_string())
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

pub(crate) fn load(
    sandbox: &Sandbox,
    text: &str,
    wasm: &[u8],
) -> Result<Arc<LoadedModule>, String> {
    let policy = parse(text)?;
    sandbox.load(policy, wasm).map_err(|e| e.to_string())
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
