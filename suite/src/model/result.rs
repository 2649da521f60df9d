//! What the host concluded: classes, checks, verdicts and the rules that
//! turn checks into a verdict.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::Attack;

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
    /// From inside a hardened worker, as if the runtime were broken: reach
    /// the gateway's secrets, other zones, the network; exec, fork, regain
    /// privileges (the second wall).
    SecondWall,
}

impl Class {
    /// Every class, in report order.
    pub const ALL: [Class; 6] = [
        Class::Filesystem,
        Class::Exhaustion,
        Class::Lateral,
        Class::Tokens,
        Class::CrossJob,
        Class::SecondWall,
    ];

    /// The name used in manifests, tables and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Filesystem => "filesystem",
            Class::Exhaustion => "exhaustion",
            Class::Lateral => "lateral",
            Class::Tokens => "tokens",
            Class::CrossJob => "cross-job",
            Class::SecondWall => "second-wall",
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
            Class::SecondWall => {
                "from inside a hardened worker: secrets, other zones, network, exec, gateway, privileges"
            }
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
pub fn attempt_evidence(
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

/// Milliseconds since `started`, to 0.1 ms (what the reports show, and a
/// value that survives a JSON round trip unchanged).
pub fn ms(started: Instant) -> f64 {
    (started.elapsed().as_secs_f64() * 10_000.0).round() / 10.0
}
