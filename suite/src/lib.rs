//! `bulkhead escape-suite`: hostile guests pointed at a policy (locally, in
//! hardened worker processes as the service runs them, or in this
//! process's sandbox with [`SuiteOptions::in_process`]) or at a running
//! service, each judged by the host from evidence it gathers itself, never
//! from what the guest says.
//!
//! The crate is layered; each layer names only those before it:
//!
//! - `model`: what an attack and a result are, as data ([`Attack`],
//!   [`AttackKind`], [`Class`], [`Check`], [`Verdict`], [`AttackResult`],
//!   each family's descriptor, [`SuiteOptions`], [`Progress`]).
//! - `harness`: what local attacks run against (runners, the base policy
//!   and bounds, canaries, baits); [`evidence`]: host-side observations;
//!   [`egress`]: the bait services and the suite's relay; the host-side
//!   checks every guest job gets.
//! - [`catalog`]: the bundled attacks, as data; `families`: how each kind
//!   of attack runs and is judged (guest jobs, sequences, lateral HTTP,
//!   forged tokens, the API, generated modules, host directories, and
//!   [`custom`] attacks a tester adds as `<name>.wasm` + `<name>.toml`;
//!   and the second-wall drill, native code attacking from inside a
//!   hardened worker's compartment, [`attack_from_inside`] being its body).
//! - `runners`: which attacks run ([`select`]), locally or against a
//!   service ([`export_modules`]).
//! - this root: [`run`] and the [`SuiteReport`]; [`report`]: the table,
//!   JSON and the self-contained HTML page.
//!
//! The suite drives guests only through public interfaces (the
//! `runner::Runner` seam, `Sandbox`, `JobSpec`, policies as text); the one
//! thing it cannot build that way, an extra preopen for the
//! weakened-configuration check (run in this process: no worker is given
//! it), is [`SandboxConfig::unsafe_extra_preopen`](bulkhead::sandbox::SandboxConfig),
//! which no policy, config file or API request can set.

// Layers, each depending only on those before it (enforced by the
// `suite_layers_only_point_down` test): the model; the harness; the
// catalog and the attack families; the runners; this root and the report.
mod model;

mod harness;

pub mod catalog;
mod families;

mod runners;

pub mod report;

use serde::{Deserialize, Serialize};

pub use families::custom;
pub use families::second_wall::{DRILL_SUBCOMMAND, inside::attack_from_inside};
pub use harness::{egress, evidence};
pub use model::{
    Attack, AttackKind, AttackResult, Check, Class, DrillAttack, Expect, NotRun, Progress,
    SUITE_SCOPE, SuiteError, SuiteOptions, Verdict, Weakening,
};
pub use runners::remote::export_modules;
pub use runners::select;
use runners::{local, remote, select_split};

/// Where the suite ran and against what.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SuiteReport {
    /// `bulkhead` version that ran the suite.
    pub bulkhead_version: String,
    /// Where local guests ran (`local hardened workers`, or `local
    /// sandbox, in this process` and why), or the service's URL.
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
        None => local::run(options, attacks, progress).await?,
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
