//! An attack as data: its id, class, what it tries, how it runs (a guest
//! job, a sequence, a generated module, requests) and what "held" means.

use std::sync::Arc;

use super::Class;
use super::drill::DrillAttack;
use super::families::{ApiAttack, Bomb, DirAttack, Forgery, HttpHeld};
use super::services::{ALLOWED, FLOOD};
use bulkhead::sandbox::LimitKind;
use bulkhead_artifacts::embedded;

/// The `hostile` guest, built from `guests/hostile` with this binary.
pub fn hostile_wasm() -> Arc<Vec<u8>> {
    static BYTES: std::sync::OnceLock<Arc<Vec<u8>>> = std::sync::OnceLock::new();
    BYTES
        .get_or_init(|| Arc::new(embedded::HOSTILE.to_vec()))
        .clone()
}

/// The `lateral` guest, built from `guests/lateral` with this binary: it
/// tries every way past the outbound gate.
pub fn lateral_wasm() -> Arc<Vec<u8>> {
    static BYTES: std::sync::OnceLock<Arc<Vec<u8>>> = std::sync::OnceLock::new();
    BYTES
        .get_or_init(|| Arc::new(embedded::LATERAL.to_vec()))
        .clone()
}

/// The well-behaved `hello` guest, run beside every attack.
pub fn hello_wasm() -> &'static [u8] {
    embedded::HELLO
}

/// One attack.
#[derive(Clone, Debug)]
pub struct Attack {
    /// Stable identifier, `<class prefix>.<name>`.
    pub id: String,
    /// Its class.
    pub class: Class,
    /// What it attempts, in one line.
    pub title: String,
    /// `bundled` or the tester's manifest path.
    pub source: String,
    /// How to run it.
    pub kind: AttackKind,
}

impl Attack {
    /// Whether it can run against a remote service: guest jobs only (the
    /// generated modules need loading on the host, sequences need the same
    /// pool slot, which a remote service does not promise).
    pub fn runs_remotely(&self) -> bool {
        self.local_only().is_none()
    }

    /// Why it runs only locally, or `None` if it also runs against a
    /// service.
    pub fn local_only(&self) -> Option<&'static str> {
        match &self.kind {
            AttackKind::Guest(_) => None,
            AttackKind::Api(a) if a.remote_ok() => None,
            AttackKind::Api(_) => Some("needs identities only a service the suite starts has"),
            AttackKind::Forge(f) if f.remote_ok() => None,
            AttackKind::Forge(_) => Some("needs tokens signed with the host's key"),
            AttackKind::Http(_) => Some(
                "needs the suite's bait services declared on the host ([[services]]), which it \
                 can only set up for a local run",
            ),
            AttackKind::Sequence { .. } => Some("needs the same pool slot for several jobs"),
            AttackKind::Bomb(_) => Some("needs the host to load a generated module"),
            AttackKind::Dirs(_) => Some("needs the host's own cache and work directories"),
            AttackKind::SecondWall(_) => {
                Some("runs native code in a hardened process beside the suite, on its host")
            }
        }
    }
}

/// How an attack runs.
#[derive(Clone, Debug)]
pub enum AttackKind {
    /// One job of a guest.
    Guest(GuestRun),
    /// A job that plants a secret, then jobs that look for it, all of the
    /// same module so they reuse its pool slots.
    Sequence {
        /// Plants the secret (`{secret}` parameters get it).
        writer: GuestRun,
        /// Looks for it; run `readers` times.
        reader: GuestRun,
        /// How many reader jobs.
        readers: usize,
    },
    /// A generated module that attacks compilation or instantiation.
    Bomb(Bomb),
    /// Requests to the service's API.
    Api(ApiAttack),
    /// A job of the `lateral` guest through the outbound gate, judged from
    /// what the suite's bait services received.
    Http(HttpAttack),
    /// A forged or replayed call token, judged by a verifier pinned to the
    /// host's keys.
    Forge(Forgery),
    /// A planted module-cache artifact, or a cache or work directory others
    /// can write or own (see [`crate::families::artifacts`]).
    Dirs(DirAttack),
    /// Native code from inside a hardened worker's compartment (the second
    /// wall), judged from the host (see `crate::families::second_wall`).
    SecondWall(DrillAttack),
}

/// A lateral-movement attack over HTTP.
#[derive(Clone, Debug)]
pub struct HttpAttack {
    /// The job (the `lateral` guest, its mode as a parameter).
    pub run: GuestRun,
    /// What must be true of the baits and the calls report.
    pub held: HttpHeld,
}

/// A value passed to a guest, filled in by the runner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Param {
    /// Literal.
    Lit(String),
    /// Absolute path of the canary file outside every job directory.
    CanaryFile,
    /// Absolute path of the canary directory.
    CanaryDir,
    /// Port of the bait TCP listener and UDP socket on loopback.
    BaitPort,
    /// A fresh secret for this attack (cross-job and exfiltration canaries).
    Secret,
    /// Real port of the forbidden bait service on loopback (what an
    /// attacker would scan for and try to reach by address).
    ServicePort,
}

/// One job of a guest.
#[derive(Clone, Debug)]
pub struct GuestRun {
    /// The module's bytes.
    pub wasm: Arc<Vec<u8>>,
    /// `run.args` of its policy (for `hostile`, the mode).
    pub args: Vec<String>,
    /// Job parameters.
    pub params: Vec<(String, Param)>,
    /// Input files.
    pub inputs: Vec<(String, Vec<u8>)>,
    /// Extra `[limits]` keys for this attack, over the suite's limits.
    pub limits: Vec<(String, toml::Value)>,
    /// How the job must end.
    pub expect: Expect,
    /// Strings that must not appear in stdout, stderr or outputs.
    pub forbidden: Vec<String>,
    /// Host files that must stay unread and unchanged, besides the canary.
    pub untouched: Vec<std::path::PathBuf>,
    /// `[network] services` of its policy.
    pub services: Vec<String>,
}

/// How the job must end for the attack to count as held.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Expect {
    /// However it likes, but the guest must have really run its attack
    /// (its stdout shows `attempt ` lines); containment is judged from the
    /// host-side checks alone.
    Contained,
    /// It must fail with one of these limits.
    Limit(Vec<LimitKind>),
    /// It must fail (trap, exit, limit), whatever the reason.
    Failed,
    /// Either; only the host-side checks count.
    Any,
    /// It must succeed: every call its guest makes is answered, and none
    /// ends the compartment that runs it (a worker killed for a system
    /// call off its list fails the job, and every job beside it).
    Served,
}

/// `source` of the attacks that ship with Bulkhead (a tester's own
/// attack names its manifest).
pub const BUNDLED: &str = "bundled";

/// The input every filesystem attack gets, so there is something to tamper with.
pub const INPUT: (&str, &[u8]) = ("input.txt", b"the job's own input\n");

/// A job of the `lateral` guest in `mode`, granted the allowed bait only.
pub fn lateral(mode: &str) -> GuestRun {
    GuestRun {
        wasm: lateral_wasm(),
        args: Vec::new(),
        params: vec![
            ("mode".to_owned(), Param::Lit(mode.to_owned())),
            ("port".to_owned(), Param::ServicePort),
            ("count".to_owned(), Param::Lit(FLOOD.to_string())),
        ],
        inputs: Vec::new(),
        limits: Vec::new(),
        expect: Expect::Any,
        forbidden: Vec::new(),
        untouched: Vec::new(),
        services: vec![ALLOWED.to_owned()],
    }
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
}
