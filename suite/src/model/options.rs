//! Where and how to run the suite, what it reports as it goes, and why it
//! cannot run at all.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{AttackResult, Class};

/// The scope the suite's generated policies require: a service that
/// serves them (see [`export_modules`]) needs a token with it.
pub const SUITE_SCOPE: &str = "escape-suite:run";

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
    /// Run the local guest lanes' jobs in this process's sandbox instead of
    /// hardened worker processes (for debugging).
    pub in_process: bool,
    /// The `bulkhead` binary the second-wall drill, the local guest lanes'
    /// workers and the local service's workers are started from [default:
    /// this process's own executable].
    pub drill_program: Option<PathBuf>,
    /// Hardening layers the second-wall drill leaves off (the suite's
    /// self-test only: no command-line option, config, policy or request
    /// sets it).
    pub drill_weaken: std::collections::BTreeSet<bulkhead::worker::harden::Layer>,
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
