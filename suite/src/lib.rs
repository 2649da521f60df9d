//! `bulkhead escape-suite`: hostile guests pointed at a policy (locally, in
//! this process's sandbox) or at a running service, each judged by the host
//! from evidence it gathers itself, never from what the guest says.
//!
//! - [`catalog`]: the bundled attacks, as data: id, class, what it tries,
//!   how to run it, what "held" means.
//! - [`custom`]: attacks a tester adds (`<name>.wasm` + `<name>.toml`).
//! - [`evidence`]: host-side observations (canary files under an inotify
//!   watch, descriptor, socket and memory sampling, bait sockets, disk
//!   usage) and the checks that turn them into a verdict.
//! - `egress`: lateral movement over HTTP, judged from what bait services
//!   declared to the suite's own relay received.
//! - `forge`: forged and replayed call tokens, judged by a verifier pinned
//!   to the host's published keys.
//! - `artifacts`: a planted module-cache artifact, cache and work
//!   directories others can write or own, judged from what the host
//!   loaded, ran and refused.
//! - `local`, `remote`, `api`, `bombs`: the runners.
//! - [`report`]: the table, JSON and the self-contained HTML page.
//!
//! The suite drives the sandbox only through its public interface
//! (`Sandbox`, `JobSpec`, `JobDir`, policies as text); the one thing it
//! cannot build that way, an extra preopen for the weakened-configuration
//! check, is [`SandboxConfig::unsafe_extra_preopen`](bulkhead::sandbox::SandboxConfig),
//! which no policy, config file or API request can set.

mod api;
mod artifacts;
mod bombs;
pub mod catalog;
pub mod custom;
pub mod egress;
pub mod evidence;
mod forge;
mod local;
mod meters;
mod remote;
pub mod report;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use catalog::{Attack, AttackKind, Expect};
pub use remote::export_modules;

/// The scope the suite's generated policies require: a service that
/// serves them (see [`export_modules`]) needs a token with it.
pub const SUITE_SCOPE: &str = "escape-suite:run";
pub use local::Weakening;

/// What the attacker wants, after the sections of the attack list.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Class {
    /// Reach the host filesystem.
    Filesystem,
    /// Exhaust the host: memory, CPU, disk, output, compile time.
    Exhaustion,
    /// Move laterally: sockets, names, secrets, ungranted imports, HTTP
    /// past the outbound gate.
    Lateral,
    /// Break the token layer and object-level access (against the API).
    Tokens,
    /// Leak data from one job to a later one.
    CrossJob,
}

impl Class {
    /// Every class, in report order.
    pub const ALL: [Class; 5] = [
        Class::Filesystem,
        Class::Exhaustion,
        Class::Lateral,
        Class::Tokens,
        Class::CrossJob,
    ];

    /// The name used in manifests, tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Filesystem => "filesystem",
            Class::Exhaustion => "exhaustion",
            Class::Lateral => "lateral",
            Class::Tokens => "tokens",
            Class::CrossJob => "cross-job",
        }
    }

    /// One line for the report's summary.
    pub fn description(self) -> &'static str {
        match self {
            Class::Filesystem => "reach host files, change inputs, trip output collection",
            Class::Exhaustion => "exhaust host memory, CPU, disk, output, compile time",
            Class::Lateral => {
                "open sockets, resolve names, harvest secrets, import more, call ungranted services"
            }
            Class::Tokens => "forge, replay or misuse tokens; reach other tenants' jobs",
            Class::CrossJob => "find a trace of an earlier job in a later one",
        }
    }
}

impl std::fmt::Display for Class {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Class {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Class::ALL
            .into_iter()
            .find(|c| c.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown attack class `{s}`: one of {}",
                    Class::ALL.map(Class::as_str).join(", ")
                )
            })
    }
}

/// What the host concluded about one attack.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Every host-side check passed: the compartment held.
    Held,
    /// At least one host-side check failed: the attacker got something.
    Breached,
    /// The attack could not be run or judged (not a pass).
    Error,
    /// Every check passed, but the host saw no evidence that the attack
    /// tried anything (no limit fired, no more host calls than a job that
    /// only prints a line): nothing was shown to hold (not a pass).
    Inconclusive,
}

impl Verdict {
    /// `held`, `breached`, `error` or `inconclusive`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Held => "held",
            Verdict::Breached => "breached",
            Verdict::Error => "error",
            Verdict::Inconclusive => "inconclusive",
        }
    }
}

/// One host-side check and what it saw.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Check {
    /// Short name: `canary`, `neighbour`, `disk`, ...
    pub name: String,
    /// Whether it found the compartment intact.
    pub passed: bool,
    /// What was observed, for people.
    pub detail: String,
}

impl Check {
    /// A check result.
    pub fn new(name: &str, passed: bool, detail: impl Into<String>) -> Self {
        Self {
            name: name.to_owned(),
            passed,
            detail: detail.into(),
        }
    }
}

/// The judged result of one attack.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AttackResult {
    /// Stable identifier, e.g. `fs.dotdot`.
    pub id: String,
    /// Its class.
    pub class: Class,
    /// What it attempts.
    pub title: String,
    /// `bundled`, or the manifest path of a tester's attack.
    pub source: String,
    /// The host's verdict.
    pub verdict: Verdict,
    /// The limit or denial that stopped it, e.g. `limit memory`,
    /// `refused at load: ...`, `denied: 401`.
    pub stopped_by: String,
    /// Every host-side check, passed or not.
    pub checks: Vec<Check>,
    /// What the host observed the attack do, in one line (for guest jobs:
    /// the host calls it made, against a job that only prints a line).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub evidence: String,
    /// Wall time of the attack, in milliseconds.
    pub time_ms: f64,
}

impl AttackResult {
    /// The verdict the checks add up to: any failed check is a breach,
    /// unless the attack could not be judged (`error` set).
    pub fn judge(
        attack: &Attack,
        checks: Vec<Check>,
        stopped_by: String,
        error: Option<String>,
        time_ms: f64,
    ) -> Self {
        let mut checks = checks;
        // What the host looked at, whatever the attack's kind; a guest job
        // adds what it saw the guest do (`with_evidence`).
        let evidence = if checks.is_empty() {
            String::new()
        } else {
            let names: Vec<&str> = checks.iter().map(|c| c.name.as_str()).collect();
            format!("host checked: {}", names.join(", "))
        };
        let verdict = if let Some(e) = error {
            checks.push(Check::new("run", false, e));
            Verdict::Error
        } else if checks.iter().all(|c| c.passed) {
            Verdict::Held
        } else {
            Verdict::Breached
        };
        Self {
            id: attack.id.clone(),
            class: attack.class,
            title: attack.title.clone(),
            source: attack.source.clone(),
            verdict,
            stopped_by,
            checks,
            evidence,
            time_ms,
        }
    }

    /// Records what the host observed the attack do, before what it
    /// checked.
    #[must_use]
    pub fn with_evidence(mut self, evidence: impl Into<String>) -> Self {
        let observed = evidence.into();
        self.evidence = if self.evidence.is_empty() {
            observed
        } else {
            format!("{observed}; {}", self.evidence)
        };
        self
    }

    /// Downgrades a `held` verdict to `inconclusive`: the host saw no
    /// attempt, so nothing was shown to hold. `why` is recorded as a
    /// failed `attempts` check. Other verdicts are kept.
    #[must_use]
    pub fn unless_attempted(mut self, attempted: bool, why: impl Into<String>) -> Self {
        if !attempted && self.verdict == Verdict::Held {
            self.verdict = Verdict::Inconclusive;
            self.checks.push(Check::new("attempts", false, why));
        }
        self
    }
}

/// Whether a guest job showed the host an attempt, and the evidence line
/// saying what the host saw.
///
/// The host's own observations count: a limit that fired, a request it
/// refused (`measurements.refused`: a filesystem call answered with an
/// error, a socket or name lookup), or a call to a service that went
/// through the gate (`calls`: refused, or made and its answer scanned).
/// A tester's own attack (`custom`) must show one of these: a guest that
/// only writes its own outputs, or prints that it tried, shows nothing.
/// A bundled attack is known to attempt what it is named for, and may
/// instead show more host calls than `baseline`, a job of the suite's
/// `hello` guest (which only prints a line) run beside it; without a
/// usable baseline it counts as attempted and the evidence says so.
pub(crate) fn attempt_evidence(
    report: &bulkhead::sandbox::JobReport,
    baseline: Option<&bulkhead::sandbox::JobReport>,
    custom: bool,
) -> (bool, String) {
    let m = &report.measurements;
    let (made, gated) = report
        .calls
        .as_ref()
        .map_or((0, 0), |c| (c.made, c.refused));
    let seen = format!(
        "{} host calls, {} refused by the host, {made} service calls made and {gated} refused by the gate; {} outputs, {} skipped",
        m.host_calls,
        m.refused,
        report.outputs.len(),
        report.skipped_outputs.len()
    );
    if let Some(limit) = report.limit {
        return (true, format!("limit {limit} fired; {seen}"));
    }
    let refused = m.refused > 0 || made > 0 || gated > 0;
    if custom {
        return (refused, seen);
    }
    match baseline.map(|b| b.measurements.host_calls) {
        Some(base) if base > 0 => (
            refused || m.host_calls > base,
            format!("{seen} (a job that only prints a line: {base} host calls)"),
        ),
        _ => (true, format!("{seen} (no baseline to compare with)")),
    }
}

/// Where the suite ran and against what.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SuiteReport {
    /// `bulkhead` version that ran the suite.
    pub bulkhead_version: String,
    /// `local sandbox` or the service's URL.
    pub target: String,
    /// The policy whose limits the attacks ran under (`built-in` if none).
    pub policy: String,
    /// Seconds since the Unix epoch when the suite started.
    pub started_at: u64,
    /// Counts.
    pub summary: Summary,
    /// One entry per attack, in run order.
    pub results: Vec<AttackResult>,
    /// Attacks selected but not applicable to this target (against a
    /// service: those that need the host itself), with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub not_run: Vec<NotRun>,
}

/// An attack left out because it cannot run against this target.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotRun {
    /// Its id.
    pub id: String,
    /// Its class.
    pub class: Class,
    /// Why it cannot run here.
    pub reason: String,
}

/// Verdict counts, overall and per class.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Attacks run.
    pub total: usize,
    /// Held.
    pub held: usize,
    /// Breached.
    pub breached: usize,
    /// Could not be run or judged.
    pub error: usize,
    /// No attempt observed: nothing shown to hold.
    #[serde(default)]
    pub inconclusive: usize,
    /// The same counts per class, in [`Class::ALL`] order (classes with no
    /// attack left out).
    pub by_class: Vec<ClassSummary>,
}

/// Verdict counts for one class.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassSummary {
    /// The class.
    pub class: String,
    /// Attacks run.
    pub total: usize,
    /// Held.
    pub held: usize,
    /// Breached.
    pub breached: usize,
    /// Errors.
    pub error: usize,
    /// Inconclusive.
    #[serde(default)]
    pub inconclusive: usize,
}

impl Summary {
    /// Counts `results`.
    pub fn of(results: &[AttackResult]) -> Self {
        let count = |rs: &mut dyn Iterator<Item = &AttackResult>| {
            let mut s = ClassSummary::default();
            for r in rs {
                s.total += 1;
                match r.verdict {
                    Verdict::Held => s.held += 1,
                    Verdict::Breached => s.breached += 1,
                    Verdict::Error => s.error += 1,
                    Verdict::Inconclusive => s.inconclusive += 1,
                }
            }
            s
        };
        let all = count(&mut results.iter());
        let by_class = Class::ALL
            .into_iter()
            .map(|c| ClassSummary {
                class: c.as_str().to_owned(),
                ..count(&mut results.iter().filter(|r| r.class == c))
            })
            .filter(|s| s.total > 0)
            .collect();
        Self {
            total: all.total,
            held: all.held,
            breached: all.breached,
            error: all.error,
            inconclusive: all.inconclusive,
            by_class,
        }
    }
}

impl SuiteReport {
    /// Whether every attack was held.
    pub fn all_held(&self) -> bool {
        self.summary.total > 0 && self.summary.total == self.summary.held
    }
}

/// Where and how to run the suite.
#[derive(Clone, Debug, Default)]
pub struct SuiteOptions {
    /// Policy whose `[limits]` (and zone) every attack runs under; `None`
    /// for the suite's own tight limits.
    pub policy: Option<PathBuf>,
    /// Trust zone of the generated policies (`untrusted` by default).
    pub zone: Option<String>,
    /// Run against this service instead of locally.
    pub server: Option<String>,
    /// Token for `server`.
    pub token: Option<String>,
    /// A folder of the tester's own attacks.
    pub guests: Option<PathBuf>,
    /// Only attacks whose id or class contains this.
    pub only: Option<String>,
    /// Where job directories, canaries and the module cache go locally
    /// [default: a fresh temporary directory].
    pub scratch: Option<PathBuf>,
    /// Precompiled-module cache for local runs [default: none].
    pub cache_dir: Option<PathBuf>,
    /// Deliberately weaken the local sandbox (the suite's own self-test).
    pub weakening: Option<Weakening>,
}

/// Why the suite could not run at all (attacks that fail are results,
/// not errors).
#[derive(Debug, thiserror::Error)]
pub enum SuiteError {
    /// Bad options, policy or manifest.
    #[error("{0}")]
    Setup(String),
    /// The host could not provide what the suite needs.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Selects the attacks `options` ask for: the bundled catalog plus the
/// tester's, filtered by `only`.
///
/// # Errors
/// [`SuiteError::Setup`] for a bad custom manifest, or when nothing matches.
pub fn select(options: &SuiteOptions) -> Result<Vec<Attack>, SuiteError> {
    Ok(select_split(options)?.0)
}

/// As [`select`], also returning the attacks left out because they run
/// only locally (when `options.server` is set).
fn select_split(options: &SuiteOptions) -> Result<(Vec<Attack>, Vec<NotRun>), SuiteError> {
    let mut attacks = catalog::bundled();
    if let Some(dir) = &options.guests {
        attacks.extend(custom::load_dir(dir)?);
    }
    if let Some(only) = &options.only {
        attacks
            .retain(|a| a.id.contains(only.as_str()) || a.class.as_str().contains(only.as_str()));
    }
    let mut not_run = Vec::new();
    if options.server.is_some() {
        attacks.retain(|a| match a.local_only() {
            None => true,
            Some(reason) => {
                not_run.push(NotRun {
                    id: a.id.clone(),
                    class: a.class,
                    reason: format!("runs only locally: {reason}"),
                });
                false
            }
        });
    }
    if attacks.is_empty() {
        return Err(SuiteError::Setup(format!(
            "no attack matches `{}`",
            options.only.as_deref().unwrap_or("")
        )));
    }
    Ok((attacks, not_run))
}

/// Runs the selected attacks and judges each. `progress` is called before
/// each attack (index, total, id) and after it with its result.
///
/// # Errors
/// [`SuiteError`] when the suite cannot start (bad options, no sandbox,
/// unreachable server); a failing attack is a result, not an error.
pub async fn run(
    options: &SuiteOptions,
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<SuiteReport, SuiteError> {
    let (attacks, not_run) = select_split(options)?;
    let mut report = run_attacks(options, &attacks, progress).await?;
    report.not_run = not_run;
    Ok(report)
}

/// Runs `attacks` (for instance a hand-picked part of [`select`]'s) as
/// [`run`] does.
///
/// # Errors
/// As [`run`].
pub async fn run_attacks(
    options: &SuiteOptions,
    attacks: &[Attack],
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<SuiteReport, SuiteError> {
    let started_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (target, results) = match &options.server {
        Some(url) => (url.clone(), remote::run(options, attacks, progress).await?),
        None => (
            "local sandbox".to_owned(),
            local::run(options, attacks, progress).await?,
        ),
    };
    Ok(SuiteReport {
        bulkhead_version: env!("CARGO_PKG_VERSION").to_owned(),
        target,
        policy: options
            .policy
            .as_ref()
            .map_or_else(|| "built-in".to_owned(), |p| p.display().to_string()),
        started_at,
        summary: Summary::of(&results),
        results,
        not_run: Vec::new(),
    })
}

/// A progress event.
#[derive(Debug)]
pub enum Progress<'a> {
    /// Attack `index` of `total` is starting.
    Start {
        /// 0-based.
        index: usize,
        /// Attacks selected.
        total: usize,
        /// Its id.
        id: &'a str,
    },
    /// It finished.
    Done(&'a AttackResult),
}
