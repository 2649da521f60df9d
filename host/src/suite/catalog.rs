//! The bundled attacks, as data. Each names a class from the attack list,
//! says what it tries, how to run it (a mode of the embedded `hostile`
//! guest, a generated module, a sequence of jobs, or requests to the API)
//! and what the host expects to see when the compartment holds.
//!
//! Adding an attack is adding an entry here; the runners and the checks
//! in [`super::evidence`] do the rest.

use std::sync::Arc;

use super::Class;
use super::api::ApiAttack;
use super::bombs::Bomb;
use crate::sandbox::LimitKind;

/// The `hostile` guest, built from `guests/hostile` with this binary.
pub fn hostile_wasm() -> Arc<Vec<u8>> {
    static BYTES: std::sync::OnceLock<Arc<Vec<u8>>> = std::sync::OnceLock::new();
    BYTES
        .get_or_init(|| Arc::new(embedded::HOSTILE.to_vec()))
        .clone()
}

/// The well-behaved `hello` guest, run beside every attack.
pub fn hello_wasm() -> &'static [u8] {
    embedded::HELLO
}

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded.rs"));
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
        match &self.kind {
            AttackKind::Guest(_) => true,
            AttackKind::Api(a) => a.remote_ok(),
            AttackKind::Sequence { .. } | AttackKind::Bomb(_) => false,
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
}

/// The input every filesystem attack gets, so there is something to tamper with.
pub const INPUT: (&str, &[u8]) = ("input.txt", b"the job's own input\n");

fn hostile(mode: &str) -> GuestRun {
    GuestRun {
        wasm: hostile_wasm(),
        args: vec![mode.to_owned()],
        params: Vec::new(),
        inputs: Vec::new(),
        limits: Vec::new(),
        expect: Expect::Contained,
        forbidden: Vec::new(),
        untouched: Vec::new(),
    }
}

impl GuestRun {
    fn param(mut self, name: &str, value: Param) -> Self {
        self.params.push((name.to_owned(), value));
        self
    }

    fn input(mut self) -> Self {
        self.inputs.push((INPUT.0.to_owned(), INPUT.1.to_vec()));
        self
    }

    fn expect(mut self, expect: Expect) -> Self {
        self.expect = expect;
        self
    }

    fn limit(self, kinds: &[LimitKind]) -> Self {
        self.expect(Expect::Limit(kinds.to_vec()))
    }
}

fn attack(id: &str, class: Class, title: &str, kind: AttackKind) -> Attack {
    Attack {
        id: id.to_owned(),
        class,
        title: title.to_owned(),
        source: "bundled".to_owned(),
        kind,
    }
}

fn guest(id: &str, class: Class, title: &str, run: GuestRun) -> Attack {
    attack(id, class, title, AttackKind::Guest(run))
}

/// Every bundled attack, in run order.
pub fn bundled() -> Vec<Attack> {
    use Class::{CrossJob, Exhaustion, Filesystem, Lateral};
    use LimitKind as L;
    use Param::{BaitPort, CanaryDir, CanaryFile, Secret};
    let mut all = vec![
        // Reach the host filesystem.
        guest(
            "fs.dotdot",
            Filesystem,
            "climb out of /in and /out with `..` chains",
            hostile("read-dotdot-plain").input(),
        ),
        guest(
            "fs.trailing-slash",
            Filesystem,
            "`..` paths ending in `/` or `/.`, read and listed",
            hostile("read-trailing").input(),
        ),
        guest(
            "fs.climb-to-canary",
            Filesystem,
            "climb to the host canary's path with 1-12 `../` from each preopen",
            hostile("read-climb").input().param("target", CanaryFile),
        ),
        guest(
            "fs.long-paths",
            Filesystem,
            "paths past PATH_MAX, and deep real trees, climbing back out",
            hostile("read-long").param("target", CanaryFile),
        ),
        guest(
            "fs.absolute",
            Filesystem,
            "open host files by absolute path, the canary's included",
            hostile("read-abs").param("target", CanaryFile),
        ),
        guest(
            "fs.absolute-dir",
            Filesystem,
            "list host directories by absolute path, the canary's included",
            hostile("read-abs").param("target", CanaryDir),
        ),
        guest(
            "fs.symlink-file",
            Filesystem,
            "create symlinks to host files (relative, absolute) and follow them",
            hostile("symlink-escape")
                .input()
                .param("target", CanaryFile),
        ),
        guest(
            "fs.symlink-dir",
            Filesystem,
            "create symlinks to host directories and list, read, write through them",
            hostile("symlink-escape").param("target", CanaryDir),
        ),
        guest(
            "fs.write-inputs",
            Filesystem,
            "write, append, truncate, rename, delete the read-only inputs",
            hostile("write-in").input(),
        ),
        guest(
            "fs.hardlink",
            Filesystem,
            "hard-link inputs into /out and outputs out of it, then write",
            hostile("hardlink").input(),
        ),
        guest(
            "fs.rename",
            Filesystem,
            "rename files and the preopens themselves out of the compartment",
            hostile("rename-escape").input(),
        ),
        guest(
            "fs.leave-links",
            Filesystem,
            "leave symlinks to the canary and /etc/passwd in /out for output collection",
            hostile("leave-links").param("target", CanaryFile),
        ),
        guest(
            "fs.symlink-loop",
            Filesystem,
            "leave symlink loops in /out so a following walker never ends",
            hostile("symlink-loop"),
        ),
        guest(
            "fs.proc-dev",
            Filesystem,
            "read /proc/self, /dev and /sys, directly and via `..`",
            hostile("proc-dev"),
        ),
        // Exhaust the host.
        guest(
            "exhaust.memory-alloc",
            Exhaustion,
            "allocate and touch 1 MiB chunks forever",
            hostile("memory-bomb").limit(&[L::Memory]),
        ),
        guest(
            "exhaust.memory-grow",
            Exhaustion,
            "`memory.grow` 64 MiB at a time, bypassing the allocator",
            hostile("memory-grow").limit(&[L::Memory]),
        ),
        guest(
            "exhaust.cpu-loop",
            Exhaustion,
            "spin in a loop forever",
            hostile("loop").limit(&[L::CpuTime]),
        ),
        guest(
            "exhaust.sleep",
            Exhaustion,
            "sleep for eleven days inside a host call",
            hostile("sleep").limit(&[L::WallTime]),
        ),
        guest(
            "exhaust.sleep-loop",
            Exhaustion,
            "sleep 10 ms at a time, forever",
            hostile("sleep-loop").limit(&[L::WallTime, L::CpuTime]),
        ),
        guest(
            "exhaust.host-call-loop",
            Exhaustion,
            "spin inside host calls (`stat`) rather than in wasm",
            hostile("host-call-loop").limit(&[L::CpuTime, L::WallTime]),
        ),
        guest(
            "exhaust.stack-native",
            Exhaustion,
            "unbounded recursion on the wasm stack",
            hostile("recursion-native").limit(&[L::Stack]),
        ),
        guest(
            "exhaust.stack-shadow",
            Exhaustion,
            "unbounded recursion on the shadow stack in linear memory",
            hostile("recursion").expect(Expect::Failed),
        ),
        guest(
            "exhaust.stdout-flood",
            Exhaustion,
            "flood stdout",
            hostile("stdout-flood").limit(&[L::Stdout]),
        ),
        guest(
            "exhaust.stderr-flood",
            Exhaustion,
            "flood stderr",
            hostile("stderr-flood").limit(&[L::Stderr]),
        ),
        guest(
            "exhaust.stdout-one-write",
            Exhaustion,
            "hand the host a 24 MiB buffer in one write call",
            hostile("stdout-one-write").limit(&[L::Stdout, L::Memory]),
        ),
        guest(
            "exhaust.disk-big",
            Exhaustion,
            "one ever-growing file in /out",
            hostile("disk-big").limit(&[L::Output]),
        ),
        guest(
            "exhaust.disk-append",
            Exhaustion,
            "an ever-growing file through an append handle",
            hostile("disk-append").limit(&[L::Output]),
        ),
        guest(
            "exhaust.disk-setsize",
            Exhaustion,
            "grow a file without writing (set-size to 10 GiB)",
            hostile("disk-setsize").limit(&[L::Output]),
        ),
        guest(
            "exhaust.disk-seek-write",
            Exhaustion,
            "write one byte 8 GiB past the end (sparse file)",
            hostile("disk-seek-write").limit(&[L::Output]),
        ),
        guest(
            "exhaust.disk-many",
            Exhaustion,
            "one-byte files until the disk gives up",
            hostile("disk-many").limit(&[L::OutputFiles]),
        ),
        guest(
            "exhaust.disk-link-create",
            Exhaustion,
            "create files through dangling symlinks to dodge the entry count",
            hostile("disk-link-create").limit(&[L::OutputFiles]),
        ),
        guest(
            "exhaust.deep-dirs",
            Exhaustion,
            "an unbounded chain of nested directories",
            hostile("deep-dirs").limit(&[L::OutputFiles]),
        ),
        guest(
            "exhaust.fd-flood",
            Exhaustion,
            "open descriptors and never close them",
            hostile("fd-flood").input().expect(Expect::Any),
        ),
        guest(
            "exhaust.log-inject",
            Exhaustion,
            "terminal escapes, NULs, forged report lines and HTML on stdout/stderr",
            hostile("log-inject").expect(Expect::Any),
        ),
        // Move laterally.
        guest(
            "lateral.tcp-loopback",
            Lateral,
            "TCP to a host listener: IPv4, IPv6, mapped, 0.0.0.0, decimal",
            hostile("tcp-connect").param("port", BaitPort),
        ),
        guest(
            "lateral.tcp-metadata",
            Lateral,
            "TCP to the cloud metadata address and IPv6 link-local",
            hostile("tcp-linklocal"),
        ),
        guest(
            "lateral.udp",
            Lateral,
            "UDP datagrams to a host socket, IPv4 and IPv6",
            hostile("udp-send").param("port", BaitPort),
        ),
        guest(
            "lateral.listen",
            Lateral,
            "open listening sockets to be reached from outside",
            hostile("tcp-listen"),
        ),
        guest(
            "lateral.dns",
            Lateral,
            "resolve names, one carrying a secret (DNS exfiltration)",
            hostile("dns").param("canary", Secret),
        ),
        guest(
            "lateral.all-sockets",
            Lateral,
            "every socket kind std offers, in one job",
            hostile("socket").param("port", BaitPort),
        ),
        guest(
            "lateral.env",
            Lateral,
            "read environment, arguments, working directory and stdin for host secrets",
            hostile("env").expect(Expect::Any),
        ),
        guest(
            "lateral.harvest",
            Lateral,
            "walk everything reachable and read every file outside /in and /out",
            hostile("harvest").input(),
        ),
        // Leak across jobs.
        attack(
            "cross-job.memory",
            CrossJob,
            "plant a secret in memory and /out; later jobs in the same pool slot scan memory and files for it",
            AttackKind::Sequence {
                writer: hostile("canary-write").param("canary", Secret),
                reader: hostile("canary-scan")
                    .param("canary", Secret)
                    .param("fresh-mib", Param::Lit("8".into())),
                readers: 2,
            },
        ),
        attack(
            "cross-job.files",
            CrossJob,
            "leave a file in /out; a later job lists everything around it",
            AttackKind::Sequence {
                writer: hostile("canary-write").param("canary", Secret),
                reader: hostile("leftovers"),
                readers: 1,
            },
        ),
        attack(
            "cross-job.shared-input",
            CrossJob,
            "write into the shared empty /in of input-less jobs; a later job looks",
            AttackKind::Sequence {
                writer: hostile("write-in"),
                reader: hostile("leftovers"),
                readers: 1,
            },
        ),
    ];
    all.extend(super::bombs::catalog());
    all.extend(super::api::catalog());
    all
}
