//! Running attacks locally, through the same `Sandbox` the service uses,
//! with the host-side evidence of [`super::evidence`] around each job.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::catalog::HttpAttack;
use super::catalog::{Attack, AttackKind, BUNDLED, Expect, GuestRun, Param};
use super::egress::{self, Egress};
use super::evidence::{self, Bait, Canary, Peaks, Sampler};
use super::{AttackResult, Check, Progress, SuiteError, SuiteOptions};
use bulkhead::policy::{ByteSize, Policy, Sha256Hex};
use bulkhead::sandbox::{
    FailureKind, JobDir, JobInput, JobReport, JobSpec, LoadedModule, Outcome, Sandbox,
    SandboxConfig,
};

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

/// Slack on resident memory growth during an attack: the job's own memory
/// is bounded by the policy; this covers the host's bookkeeping, the
/// neighbour job and allocator noise.
const RSS_SLACK: u64 = 128 * 1024 * 1024;

/// A deliberately weakened local configuration, for the suite's
/// self-test: the attacks run under it while the checks still hold them
/// to the limits they would have had.
#[derive(Clone, Debug, Default)]
pub struct Weakening {
    /// `[limits]` keys overridden in every policy, e.g. `output = "64 MiB"`.
    pub limits: Vec<(String, toml::Value)>,
    /// Preopen the canary directory read-write into every job, at its host
    /// path (the sandbox's `unsafe_extra_preopen`).
    pub preopen_canary: bool,
    /// Services granted, besides their own, to the policies of attacks
    /// that call services (e.g. the forbidden bait, `payments`).
    pub grant_services: Vec<String>,
}

/// What the checks hold each attack to: the limits a policy promises.
#[derive(Clone, Debug)]
pub struct Bounds {
    memory: u64,
    cpu_ms: f64,
    wall_ms: f64,
    output: u64,
    output_files: u64,
    stdout: u64,
    stderr: u64,
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
            toml::Value::Array(vec![super::SUITE_SCOPE.into()]),
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
pub(super) struct Lane {
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
        let hello = super::catalog::hello_wasm();
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
pub(super) struct Harness {
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
    async fn new(options: &SuiteOptions) -> Result<Self, SuiteError> {
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
        let hello = super::catalog::hello_wasm();
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

    fn spec(&self, run: &GuestRun, secret: &str) -> JobSpec {
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
    fn secrets(&self, job: &JobSpec, forbidden: &[String], secret: &str) -> Vec<(String, Vec<u8>)> {
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

pub(super) fn parse(text: &str) -> Result<Policy, String> {
    Policy::parse(text, Path::new("escape-suite.toml")).map_err(|e| e.to_string())
}

pub(super) fn load(
    sandbox: &Sandbox,
    text: &str,
    wasm: &[u8],
) -> Result<Arc<LoadedModule>, String> {
    let policy = parse(text)?;
    sandbox.load(policy, wasm).map_err(|e| e.to_string())
}

/// Runs every attack locally.
pub async fn run(
    options: &SuiteOptions,
    attacks: &[Attack],
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Vec<AttackResult>, SuiteError> {
    let h = Harness::new(options).await?;
    let mut api = None;
    let mut results = Vec::new();
    for (index, attack) in attacks.iter().enumerate() {
        progress(Progress::Start {
            index,
            total: attacks.len(),
            id: &attack.id,
        });
        let started = Instant::now();
        let result = match &attack.kind {
            AttackKind::Guest(run) => guest_attack(&h, attack, run, started).await,
            AttackKind::Sequence {
                writer,
                reader,
                readers,
            } => sequence_attack(&h, attack, writer, reader, *readers, started).await,
            AttackKind::Bomb(bomb) => super::bombs::run_local(&h, attack, bomb, started).await,
            AttackKind::Http(http) => http_attack(&h, attack, http, started).await,
            AttackKind::Dirs(d) => super::artifacts::run_local(&h, attack, *d, started).await,
            AttackKind::Forge(f) => {
                let target = forge_target(&h, *f).await;
                super::forge::run(&target, attack, *f, started)
            }
            AttackKind::Api(a) => {
                if api.is_none() {
                    api = Some(super::api::LocalService::start(&h.scratch).await);
                }
                match api.as_ref().expect("just set") {
                    Ok(service) => super::api::run(&service.target(), attack, a, started).await,
                    Err(e) => AttackResult::judge(
                        attack,
                        Vec::new(),
                        String::new(),
                        Some(format!("cannot start the local service: {e}")),
                        0.0,
                    ),
                }
            }
        };
        progress(Progress::Done(&result));
        results.push(result);
    }
    if let Some(Ok(service)) = api {
        service.stop().await;
    }
    Ok(results)
}

/// One job, with the neighbour beside it and evidence around it.
struct Observed {
    report: JobReport,
    dir: JobDir,
    neighbour: JobReport,
    peaks: Peaks,
    /// Host meters around the job (and its neighbour).
    meters: super::meters::Spent,
    inputs_before: std::collections::BTreeMap<String, String>,
}

async fn observe(lane: &Lane, module: &LoadedModule, job: &JobSpec) -> Result<Observed, String> {
    let dir =
        JobDir::create(&lane.sandbox.config().work_dir, &job.id).map_err(|e| e.to_string())?;
    let hello = JobSpec::new();
    let hello_dir =
        JobDir::create(&lane.sandbox.config().work_dir, &hello.id).map_err(|e| e.to_string())?;
    let inputs_before: std::collections::BTreeMap<String, String> = job
        .inputs
        .iter()
        .map(|i| {
            (
                i.name.clone(),
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&i.data)),
            )
        })
        .collect();
    let sampler = Sampler::start();
    let meters = super::meters::Meters::start();
    let (report, neighbour) = tokio::join!(
        lane.run(module, job, &dir),
        lane.run(&lane.neighbour, &hello, &hello_dir)
    );
    let meters = meters.stop();
    let peaks = sampler.stop();
    let report = report.map_err(|e| format!("the job was refused: {e}"))?;
    let neighbour = neighbour.map_err(|e| format!("the neighbour job was refused: {e}"))?;
    Ok(Observed {
        report,
        dir,
        neighbour,
        peaks,
        meters,
        inputs_before,
    })
}

/// The limit or denial that ended `report`, for the table.
fn stopped_by(report: &JobReport) -> String {
    match (&report.limit, &report.failure) {
        (Some(limit), _) => format!("limit {limit}"),
        (None, Some(f)) if f.kind == FailureKind::Trap => format!("trap: {}", f.message),
        (None, Some(f)) if f.kind == FailureKind::Instantiate => {
            format!("refused at instantiation: {}", f.message)
        }
        (None, Some(f)) => f.message.clone(),
        (None, None) => "the job exited 0".to_owned(),
    }
}

async fn guest_attack(
    h: &Harness,
    attack: &Attack,
    run: &GuestRun,
    started: Instant,
) -> AttackResult {
    let secret = evidence::random_token("BULKHEAD-SECRET");
    let fail =
        |e: String| AttackResult::judge(attack, Vec::new(), String::new(), Some(e), ms(started));
    let module = match h.load(&module_name(&attack.id), run) {
        Ok(m) => m,
        Err(e) => return fail(format!("cannot load the attack's module: {e}")),
    };
    let job = h.spec(run, &secret);
    let secrets = h.secrets(&job, &run.forbidden, &secret);
    let untouched: Vec<(PathBuf, String)> = run
        .untouched
        .iter()
        .map(|p| (p.clone(), fingerprint(p)))
        .collect();
    let obs = match observe(&h.main, &module, &job).await {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let mut checks = Vec::new();
    let mut error = outcome_check(&run.expect, &obs.report, &mut checks);
    checks.extend(host_checks(h, &obs, &secrets, &untouched));
    if error.is_none()
        && obs
            .report
            .failure
            .as_ref()
            .is_some_and(|f| matches!(f.kind, FailureKind::Instantiate | FailureKind::Host))
    {
        error = Some("the guest did not start".into());
    }
    let stopped = stopped_by(&obs.report);
    let (attempted, evidence) =
        super::attempt_evidence(&obs.report, Some(&obs.neighbour), attack.source != BUNDLED);
    drop(obs);
    AttackResult::judge(attack, checks, stopped, error, ms(started))
        .with_evidence(evidence.clone())
        .unless_attempted(
            attempted,
            format!("no attempt observed by the host: {evidence}"),
        )
}

/// A lateral HTTP attack: one job of the `lateral` guest through the
/// suite's relay, judged from what the bait services received, the calls
/// report and the usual host-side checks. The `network` check is replaced:
/// the relay opening sockets to the allowed bait is the point.
async fn http_attack(
    h: &Harness,
    attack: &Attack,
    http: &HttpAttack,
    started: Instant,
) -> AttackResult {
    let secret = evidence::random_token("BULKHEAD-SECRET");
    let fail =
        |e: String| AttackResult::judge(attack, Vec::new(), String::new(), Some(e), ms(started));
    let name = module_name(&attack.id);
    let module = match h.load(&name, &http.run) {
        Ok(m) => m,
        Err(e) => return fail(format!("cannot load the attack's module: {e}")),
    };
    let job = h.spec(&http.run, &secret);
    let secrets = h.secrets(&job, &http.run.forbidden, &secret);
    let (allowed_from, forbidden_from) = (h.egress.allowed.len(), h.egress.forbidden.len());
    let obs = match observe(&h.main, &module, &job).await {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    h.egress.allowed.settle().await;
    h.egress.forbidden.settle().await;
    let calls = obs.report.calls.as_ref();
    let mut checks = Vec::new();
    let error = egress::untried(
        &http.held,
        calls,
        h.egress.allowed.since(allowed_from).len(),
    );
    checks.push(Check::new("outcome", true, describe_end(&obs.report)));
    let produced = produced(&obs.report, &obs.dir.output_dir());
    checks.extend(egress::checks(
        &h.egress,
        &http.held,
        allowed_from,
        forbidden_from,
        calls,
        &produced,
        &job.id,
        &name,
    ));
    let mut host = host_checks(h, &obs, &secrets, &[]);
    for c in &mut host {
        if c.name == "network" {
            let touched = h.bait.touched();
            *c = Check::new(
                "network",
                touched.is_empty(),
                if touched.is_empty() {
                    format!(
                        "nothing reached the bait socket on port {}; the only connections were \
                         the relay's to the allowed service",
                        h.bait.port
                    )
                } else {
                    touched.join("; ")
                },
            );
        }
    }
    checks.extend(host);
    let stopped = match calls {
        Some(c) if c.refused > 0 => format!(
            "gate refused {} of {} requests",
            c.refused,
            c.records.len() + c.records_dropped as usize
        ),
        Some(c) => format!("gate: {} calls within the declaration", c.made),
        None => stopped_by(&obs.report),
    };
    drop(obs);
    AttackResult::judge(attack, checks, stopped, error, ms(started))
}

/// What the forgeries are judged against locally: the relay's published
/// keys, its signing key, and (for a replay) a token it really minted.
async fn forge_target(h: &Harness, f: super::forge::Forgery) -> super::forge::ForgeTarget {
    use ed25519_dalek::pkcs8::DecodePrivateKey as _;
    let minted = if f.needs_minted() {
        Some(minted_token(h).await)
    } else {
        None
    };
    super::forge::ForgeTarget {
        jwks: h.egress.jwks(),
        jwks_source: "the suite relay's key ring".to_owned(),
        issuer: h.egress.relay.issuer().to_owned(),
        host_key: ed25519_dalek::SigningKey::from_pkcs8_pem(&h.egress.host_key_pem).ok(),
        minted,
    }
}

/// A token the host minted for the allowed bait: the newest in its log,
/// or one from a well-behaved `allowed` job run for the purpose.
pub(super) async fn minted_token(h: &Harness) -> Result<String, String> {
    if let Some(t) = h.egress.last_minted() {
        return Ok(t);
    }
    let run = super::catalog::lateral("allowed");
    let module = h.load("escape-suite-minter", &run)?;
    let job = h.spec(&run, "");
    let dir =
        JobDir::create(&h.main.sandbox.config().work_dir, &job.id).map_err(|e| e.to_string())?;
    h.main
        .run(&module, &job, &dir)
        .await
        .map_err(|e| e.to_string())?;
    h.egress
        .last_minted()
        .ok_or_else(|| "the allowed job made no call".to_owned())
}

/// Runs one job of an already loaded module with every host-side check
/// (no outcome expectation: the caller judges that from the report).
pub(super) async fn run_loaded(
    h: &Harness,
    lane: &Lane,
    attack: &Attack,
    module: &LoadedModule,
    started: Instant,
) -> (AttackResult, Option<JobReport>) {
    let job = JobSpec::new();
    let secrets = h.secrets(&job, &[], "");
    match observe(lane, module, &job).await {
        Ok(obs) => {
            let checks = host_checks(h, &obs, &secrets, &[]);
            let stopped = stopped_by(&obs.report);
            let report = obs.report.clone();
            drop(obs);
            (
                AttackResult::judge(attack, checks, stopped, None, ms(started)),
                Some(report),
            )
        }
        Err(e) => (
            AttackResult::judge(attack, Vec::new(), String::new(), Some(e), ms(started)),
            None,
        ),
    }
}

/// Checks the job ended as the attack expects. Returns an error when the
/// attack cannot be judged (the guest did not really try).
fn outcome_check(expect: &Expect, report: &JobReport, checks: &mut Vec<Check>) -> Option<String> {
    let ended = describe_end(report);
    match expect {
        Expect::Contained => {
            let tried = report
                .stdout
                .text
                .lines()
                .filter(|l| l.starts_with("attempt "))
                .count();
            if tried == 0 && report.limit.is_none() {
                return Some(format!("the guest made no attempt ({ended})"));
            }
            checks.push(Check::new(
                "outcome",
                true,
                format!("{tried} attempts; {ended}"),
            ));
        }
        Expect::Limit(kinds) => {
            let names: Vec<_> = kinds.iter().map(|k| k.as_str()).collect();
            let (passed, detail) = match report.limit {
                Some(l) if kinds.contains(&l) => (true, format!("limit {l} fired as expected")),
                Some(l) => (
                    true,
                    format!("limit {l} fired (expected {})", names.join(" or ")),
                ),
                None if report.outcome == Outcome::Failed => (
                    true,
                    format!("{ended} (expected limit {})", names.join(" or ")),
                ),
                None => (
                    false,
                    format!(
                        "ran to completion: no limit fired (expected {})",
                        names.join(" or ")
                    ),
                ),
            };
            checks.push(Check::new("outcome", passed, detail));
        }
        Expect::Failed => checks.push(Check::new(
            "outcome",
            report.outcome == Outcome::Failed,
            ended,
        )),
        Expect::Any => checks.push(Check::new("outcome", true, ended)),
    }
    None
}

fn describe_end(report: &JobReport) -> String {
    match (&report.outcome, &report.failure) {
        (Outcome::Succeeded, _) => "the job exited 0".to_owned(),
        (Outcome::Failed, Some(f)) => format!("the job failed: {}", f.message),
        (Outcome::Failed, None) => "the job failed".to_owned(),
    }
}

/// Reads a regular file of `/out` without following links, at most 16 MiB.
fn read_output(out_dir: &Path, name: &str) -> Vec<u8> {
    let mut data = Vec::new();
    // Every component must be a real directory: open each with O_NOFOLLOW
    // by walking, which `collect` already did; here the guest has ended, so
    // a final-component O_NOFOLLOW and an fstat suffice for regular files
    // the report listed.
    if let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(out_dir.join(name))
        && f.metadata().is_ok_and(|m| m.is_file())
    {
        let _ = f.take(16 * 1024 * 1024).read_to_end(&mut data);
    }
    data
}

/// Everything the job produced that a breach could leave evidence in.
fn produced(report: &JobReport, out_dir: &Path) -> Vec<u8> {
    let mut all = report.stdout.text.clone().into_bytes();
    all.extend(report.stderr.text.as_bytes());
    for o in &report.outputs {
        all.extend(read_output(out_dir, &o.name));
    }
    all
}

/// See the `outputs` check in [`host_checks`].
fn outputs_check(h: &Harness, r: &JobReport, out_dir: &Path) -> Check {
    use bulkhead::sandbox::outputs;
    let bad_names: Vec<String> = r
        .outputs
        .iter()
        .filter(|o| {
            o.name.len() > outputs::MAX_PATH_BYTES
                || o.name.split('/').any(|c| outputs::check_name(c).is_err())
        })
        .map(|o| o.name.escape_debug().to_string())
        .collect();
    let copy_to = h.scratch.join(format!("copy-{}", r.job_id));
    let copied = outputs::collect(out_dir, Some(&copy_to));
    let _ = std::fs::remove_dir_all(&copy_to);
    let failed_with_reason = r
        .failure
        .as_ref()
        .is_some_and(|f| f.kind == FailureKind::Output);
    let mut reasons: Vec<&str> = r
        .skipped_outputs
        .iter()
        .map(|s| s.reason.as_str())
        .collect();
    reasons.sort_unstable();
    reasons.dedup();
    let copy_ok = copied.is_ok() || failed_with_reason;
    Check::new(
        "outputs",
        bad_names.is_empty() && copy_ok,
        match (&copied, bad_names.is_empty()) {
            (Ok(c), true) => format!(
                "{} outputs with clean names copied out by handle; {} skipped ({})",
                c.files.len(),
                r.skipped_outputs.len(),
                if reasons.is_empty() {
                    "none".to_owned()
                } else {
                    reasons.join(", ")
                }
            ),
            (Err(e), true) if failed_with_reason => {
                format!("the job failed with the reason `output`; a copy fails too: {e}")
            }
            (Err(e), true) => format!("the outputs the report lists cannot be copied out: {e}"),
            (_, false) => format!("collected names that are unsafe or too long: {bad_names:?}"),
        },
    )
}

/// The host-side checks every local guest job gets.
fn host_checks(
    h: &Harness,
    obs: &Observed,
    secrets: &[(String, Vec<u8>)],
    untouched: &[(PathBuf, String)],
) -> Vec<Check> {
    let r = &obs.report;
    let b = &h.bounds;
    let out_dir = obs.dir.output_dir();
    let mut checks = Vec::new();

    // Canary files outside the job: no event, no change.
    let mut touched = h.canary.touched();
    touched.extend(h.canary.content_changed());
    // Reading the canaries for the comparison raised events of its own.
    let _ = h.canary.touched();
    for (path, before) in untouched {
        let now = fingerprint(path);
        if &now != before {
            touched.push(format!("{} changed: {before} -> {now}", path.display()));
        }
    }
    checks.push(Check::new(
        "canary",
        touched.is_empty(),
        if touched.is_empty() {
            format!(
                "canary files outside the job untouched ({})",
                if h.canary.watched() {
                    "inotify watch and metadata"
                } else {
                    "metadata only: no inotify"
                }
            )
        } else {
            touched.join("; ")
        },
    ));

    // Secrets in anything the job produced; loot the guest collected.
    let all = produced(r, &out_dir);
    let leaked = evidence::find_secret(&all, secrets);
    let loot: Vec<String> = r
        .outputs
        .iter()
        .filter(|o| o.name.starts_with("loot-"))
        .map(|o| {
            let data = read_output(&out_dir, &o.name);
            let first = String::from_utf8_lossy(&data[..data.len().min(120)])
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
            format!("{} ({first})", o.name)
        })
        .collect();
    checks.push(Check::new(
        "secrets",
        leaked.is_empty() && loot.is_empty(),
        match (leaked.is_empty(), loot.is_empty()) {
            (true, true) => format!(
                "no host secret in stdout, stderr or {} outputs; nothing looted",
                r.outputs.len()
            ),
            _ => format!(
                "{}{}",
                if leaked.is_empty() {
                    String::new()
                } else {
                    format!("leaked: {}. ", leaked.join(", "))
                },
                if loot.is_empty() {
                    String::new()
                } else {
                    format!("looted: {}", loot.join(", "))
                }
            ),
        },
    ));

    // The inputs, and the shared empty input directory.
    let in_dir = obs.dir.input_dir();
    let now = evidence::tree_digest(&in_dir);
    let inputs_ok = now == obs.inputs_before;
    checks.push(Check::new(
        "inputs",
        inputs_ok,
        if inputs_ok {
            format!("{} input files unchanged, nothing added", now.len())
        } else {
            format!("/in now holds {now:?}, was {:?}", obs.inputs_before)
        },
    ));

    // Output collection never followed a link.
    let special = evidence::special_entries(&out_dir);
    let skipped: Vec<&str> = r.skipped_outputs.iter().map(|s| s.name.as_str()).collect();
    let followed: Vec<&String> = special
        .iter()
        .filter(|s| r.outputs.iter().any(|o| &o.name == *s) || !skipped.contains(&s.as_str()))
        .collect();
    checks.push(Check::new(
        "collection",
        followed.is_empty(),
        if followed.is_empty() {
            format!(
                "{} links or special files left in /out, none collected",
                special.len()
            )
        } else {
            format!("collected or unaccounted for: {followed:?}")
        },
    ));

    // Outputs: every collected name is one a person and a URL can carry,
    // and the outputs copy out (by handle, as `run --out` and the service
    // copy them), or the job failed saying collection failed. A host error
    // instead would have ended the attack before the checks.
    checks.push(outputs_check(h, r, &out_dir));

    // Disk.
    let (bytes, entries) = evidence::disk_usage(&out_dir);
    // tmpfs and most filesystems allocate whole pages: each entry may use
    // one more page than its bytes.
    let disk_bound = b.output + (b.output_files + 1) * 4096;
    checks.push(Check::new(
        "disk",
        bytes <= disk_bound && entries <= b.output_files,
        format!(
            "/out holds {} in {entries} entries on the host (bounds {} + page rounding, {} entries)",
            ByteSize::bytes(bytes),
            ByteSize::bytes(b.output),
            b.output_files
        ),
    ));

    // Memory: the job's, and the host process's.
    let p = &obs.peaks;
    let job_mem = r.measurements.peak_memory_bytes;
    let rss_growth = p.rss_peak.saturating_sub(p.rss_before);
    checks.push(Check::new(
        "memory",
        job_mem <= b.memory && rss_growth <= b.memory + RSS_SLACK,
        format!(
            "guest peak {} (bound {}); host resident memory grew {} at most",
            ByteSize::bytes(job_mem),
            ByteSize::bytes(b.memory),
            ByteSize::bytes(rss_growth)
        ),
    ));

    // Time and captured output.
    let wall = r.measurements.wall_time_ms;
    let wall_bound = b.wall_ms * 2.0 + 1000.0;
    checks.push(Check::new(
        "time",
        wall <= wall_bound,
        format!("wall {wall:.0} ms (policy {:.0} ms)", b.wall_ms),
    ));
    checks.push(Check::new(
        "output streams",
        r.stdout.bytes <= b.stdout && r.stderr.bytes <= b.stderr,
        format!(
            "captured stdout {} B, stderr {} B (bounds {} B, {} B)",
            r.stdout.bytes, r.stderr.bytes, b.stdout, b.stderr
        ),
    ));

    // The neighbour.
    let n = &obs.neighbour;
    let ok = n.succeeded() && n.stdout.text == "hello from bulkhead\n";
    checks.push(Check::new(
        "neighbour",
        ok,
        if ok {
            format!(
                "a concurrent hello job succeeded in {:.1} ms",
                n.measurements.wall_time_ms
            )
        } else {
            format!("the concurrent hello job failed: {}", describe_end(n))
        },
    ));

    // Descriptors and sockets.
    // A job may hold up to `max_open_per_job` host descriptors, whatever
    // object holds them; the process must still have room for other jobs
    // and its listeners below its own descriptor limit.
    let soft_limit = evidence::fd_soft_limit();
    let fd_peak_bound =
        super::meters::fd_peak_bound(h.main.sandbox.max_open_per_job(), p.fds_before)
            .min(soft_limit.saturating_sub(64));
    checks.push(Check::new(
        "descriptors",
        p.fds_peak <= fd_peak_bound && p.fds_after <= p.fds_before + 8,
        format!(
            "open descriptors {} before, {} at most, {} after (peak bound {fd_peak_bound}: the \
             job's share of {} host descriptors and both jobs' own, and 64 below this \
             process's soft RLIMIT_NOFILE of {soft_limit})",
            p.fds_before,
            p.fds_peak,
            p.fds_after,
            h.main.sandbox.max_open_per_job()
        ),
    ));
    checks.extend(super::meters::checks(&obs.meters, b.cpu_ms, b.output));
    let mut net = h.bait.touched();
    if p.sockets_peak > p.sockets_before {
        net.push(format!(
            "the process held {} sockets during the job, {} before",
            p.sockets_peak, p.sockets_before
        ));
    }
    checks.push(Check::new(
        "network",
        net.is_empty(),
        if net.is_empty() {
            format!(
                "no new socket in the process; nothing reached the bait on port {}",
                h.bait.port
            )
        } else {
            net.join("; ")
        },
    ));
    checks
}

async fn sequence_attack(
    h: &Harness,
    attack: &Attack,
    writer: &GuestRun,
    reader: &GuestRun,
    readers: usize,
    started: Instant,
) -> AttackResult {
    let secret = evidence::random_token("BULKHEAD-XJOB");
    let fail =
        |e: String| AttackResult::judge(attack, Vec::new(), String::new(), Some(e), ms(started));
    // Writer and readers run as one module (one policy, the mode passed as
    // `--mode=`), so the pooling allocator hands the readers the slots the
    // writer used: the case where a slot that was not reset would leak.
    let mut both = writer.clone();
    both.args.clear();
    both.params = writer.params.clone();
    for p in &reader.params {
        if !both.params.iter().any(|(k, _)| k == &p.0) {
            both.params.push(p.clone());
        }
    }
    both.params.push(("mode".into(), Param::Lit(String::new())));
    let module = match h.load(&module_name(&attack.id), &both) {
        Ok(m) => m,
        Err(e) => return fail(format!("cannot load the attack's module: {e}")),
    };
    let job_for = |run: &GuestRun| {
        let mut job = h.spec(run, &secret);
        job.params
            .insert("mode".into(), run.args.first().cloned().unwrap_or_default());
        job
    };
    let wjob = job_for(writer);
    let wobs = match observe(&h.main, &module, &wjob).await {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let mut checks = Vec::new();
    let planted = produced(&wobs.report, &wobs.dir.output_dir());
    let writer_ok = wobs.report.succeeded() || !wobs.report.stdout.text.is_empty();
    if !writer_ok {
        return fail(format!(
            "the writer did not run: {}",
            describe_end(&wobs.report)
        ));
    }
    checks.push(Check::new(
        "planted",
        true,
        format!(
            "writer job {}; its outputs {} the secret",
            describe_end(&wobs.report),
            if planted
                .windows(secret.len())
                .any(|w| w == secret.as_bytes())
            {
                "hold"
            } else {
                "do not hold"
            }
        ),
    ));
    drop(wobs);
    // The shared empty `/in` must still be empty for the next job.
    let shared = h.main.sandbox.config().work_dir.join(".empty-in");
    let leftover: Vec<_> = std::fs::read_dir(&shared)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    checks.push(Check::new(
        "shared input",
        leftover.is_empty(),
        if leftover.is_empty() {
            "the shared empty /in is still empty".to_owned()
        } else {
            format!("left in the shared /in: {leftover:?}")
        },
    ));

    let secrets = vec![(
        "the earlier job's secret".to_owned(),
        secret.clone().into_bytes(),
    )];
    let mut error = None;
    let mut last_stop = String::new();
    for i in 0..readers {
        let rjob = job_for(reader);
        let robs = match observe(&h.main, &module, &rjob).await {
            Ok(o) => o,
            Err(e) => return fail(e),
        };
        let out = &robs.report.stdout.text;
        if out.contains("self-check failed") {
            error = Some("the reader's memory scanner could not see its own copy".to_owned());
        }
        // The reader was handed the secret to look for: drop it from what
        // it printed about its own arguments, and look everywhere else.
        let mut all = produced(&robs.report, &robs.dir.output_dir());
        if reader.params.iter().any(|(_, p)| *p == Param::Secret) {
            all = strip_own_args(&all, &rjob);
        }
        let leaked = evidence::find_secret(&all, &secrets);
        checks.push(Check::new(
            &format!("reader {}", i + 1),
            leaked.is_empty(),
            if leaked.is_empty() {
                format!(
                    "no trace of the earlier job in stdout, stderr or {} outputs ({})",
                    robs.report.outputs.len(),
                    describe_end(&robs.report)
                )
            } else {
                format!("found {}", leaked.join(", "))
            },
        ));
        let mut host = host_checks(h, &robs, &[], &[]);
        host.retain(|c| !c.passed || matches!(c.name.as_str(), "canary" | "neighbour"));
        checks.extend(host);
        last_stop = stopped_by(&robs.report);
    }
    AttackResult::judge(attack, checks, last_stop, error, ms(started))
}

/// Size, modification and change times and digest of a host file.
fn fingerprint(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) => {
            let digest = if m.is_file() {
                std::fs::read(path)
                    .map(|d| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&d)))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            format!(
                "size {} mtime {}.{} ctime {}.{} {digest}",
                m.size(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec()
            )
        }
        Err(e) => format!("missing ({e})"),
    }
}

/// `all` without the `--name=value` strings the job was given.
fn strip_own_args(all: &[u8], job: &JobSpec) -> Vec<u8> {
    let mut text = String::from_utf8_lossy(all).into_owned();
    for (k, v) in &job.params {
        text = text.replace(&format!("--{k}={v}"), "");
    }
    text.into_bytes()
}

/// A module name for attack `id` (`fs.dotdot` -> `escape-fs-dotdot`).
pub fn module_name(id: &str) -> String {
    let mut name: String = format!("escape-{id}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    name.truncate(63);
    name.trim_end_matches('-').to_owned()
}

/// Milliseconds since `started`, to 0.1 ms (what the reports show, and a
/// value that survives a JSON round trip unchanged).
pub(super) fn ms(started: Instant) -> f64 {
    (started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn module_names_are_valid_policy_names() {
        assert_eq!(module_name("fs.dotdot"), "escape-fs-dotdot");
        assert_eq!(module_name("custom.My_Attack"), "escape-custom-my-attack");
        let long = module_name(&"x".repeat(200));
        assert!(long.len() <= 63);
    }

    #[test]
    fn standard_limits_make_a_valid_policy() {
        let base = Base::from_options(&SuiteOptions::default()).unwrap();
        let text = base.policy_text("escape-x", b"\0asm", None, &[]);
        let policy = parse(&text).unwrap();
        assert_eq!(policy.limits.memory, ByteSize::mib(32));
        assert_eq!(policy.access.scopes[0].as_str(), super::super::SUITE_SCOPE);
    }
}
