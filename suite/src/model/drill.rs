//! The second-wall drill as data: which attack the drill runs from inside
//! a hardened worker's compartment, what the suite tells it (the baits it
//! goes for), and what it writes back on its channel.
//!
//! The drill's lines are a transcript, never a verdict: the suite judges
//! from what it sees on the host (see `crate::families::second_wall`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use bulkhead::worker::harden::Applied;

/// One attack the drill runs from inside the compartment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DrillAttack {
    /// Read the signing keys, the store, the admin token and the config.
    Secrets,
    /// Use descriptors the gateway left open: a key file and a connection
    /// to the admin listener.
    Inherited,
    /// Read, change, create and delete another job's and another zone's
    /// files.
    Neighbours,
    /// Connect to the public and admin listeners and a bait service on
    /// loopback.
    Connect,
    /// Send UDP datagrams to a bait socket on loopback.
    Udp,
    /// Resolve a name: DNS queries to a bait resolver on loopback.
    Resolve,
    /// Run a shell that touches a marker file.
    Exec,
    /// Trace, signal and read the memory of the gateway.
    Gateway,
    /// Fork and spawn threads without end.
    ForkBomb,
    /// Raise its resource limits.
    Rlimits,
    /// Regain privileges: uid 0, capabilities, dumpable.
    Privileges,
    /// Create or enter namespaces, and mount.
    Namespaces,
    /// Outlive the gateway.
    Outlive,
    /// Write, replace or fill its zone's compiled-module cache.
    ZoneCache,
}

impl DrillAttack {
    /// Every drill attack: itself, its id, what it tries, and the layers
    /// expected to stop it.
    pub const ALL: [(DrillAttack, &'static str, &'static str, &'static str); 14] = [
        (
            DrillAttack::Secrets,
            "wall.secrets",
            "read the signing keys, store, admin token and config; copy them out",
            "landlock",
        ),
        (
            DrillAttack::Inherited,
            "wall.inherited-fds",
            "use descriptors the gateway left open (a key file, an admin connection)",
            "descriptors",
        ),
        (
            DrillAttack::Neighbours,
            "wall.neighbours",
            "read, change, create, delete another job's and another zone's files",
            "landlock",
        ),
        (
            DrillAttack::Connect,
            "wall.connect",
            "connect to the public and admin listeners and a bait service on loopback",
            "network namespace, seccomp",
        ),
        (
            DrillAttack::Udp,
            "wall.udp",
            "send UDP datagrams to a bait socket on loopback",
            "network namespace, seccomp",
        ),
        (
            DrillAttack::Resolve,
            "wall.resolve",
            "resolve a name: DNS queries to a bait resolver on loopback",
            "network namespace, seccomp",
        ),
        (
            DrillAttack::Exec,
            "wall.exec",
            "execve `/bin/sh -c 'touch <marker>'`, directly, forked, and as a script",
            "seccomp, landlock",
        ),
        (
            DrillAttack::Gateway,
            "wall.gateway",
            "ptrace, signal and read the memory of the gateway",
            "unprivileged, user namespace, seccomp, landlock",
        ),
        (
            DrillAttack::ForkBomb,
            "wall.fork-bomb",
            "fork and spawn threads past the worker's bound",
            "rlimits, seccomp",
        ),
        (
            DrillAttack::Rlimits,
            "wall.rlimits",
            "raise its limits on descriptors, processes and core dumps",
            "rlimits, unprivileged",
        ),
        (
            DrillAttack::Privileges,
            "wall.privileges",
            "setuid(0), raise capabilities, become dumpable again",
            "unprivileged, user namespace, no_new_privs, not dumpable, seccomp",
        ),
        (
            DrillAttack::Namespaces,
            "wall.namespaces",
            "create or enter namespaces, mount over its directories",
            "namespaces, seccomp",
        ),
        (
            DrillAttack::Outlive,
            "wall.outlive",
            "keep running after the gateway that started it is gone",
            "dies with gateway",
        ),
        (
            DrillAttack::ZoneCache,
            "wall.zone-cache",
            "write, replace, link into or fill its zone's compiled-module cache",
            "landlock, ownership",
        ),
    ];

    /// Its id, e.g. `wall.secrets`.
    pub fn id(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(a, ..)| *a == self)
            .map_or("wall.unknown", |(_, id, ..)| id)
    }

    /// The layers expected to stop it.
    pub fn layers(self) -> &'static str {
        Self::ALL
            .iter()
            .find(|(a, ..)| *a == self)
            .map_or("", |(.., layers)| layers)
    }
}

/// What the suite tells the drill once it has hardened itself: the attack
/// and where the baits are (an attacker is assumed to know all of it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrillOrder {
    /// The attack (`None` only in a default value).
    pub attack: Option<DrillAttack>,
    /// Its own work directory (where it copies what it loots).
    pub work_dir: PathBuf,
    /// The gateway's secrets: keys, store, admin token, config.
    pub secret_files: Vec<PathBuf>,
    /// Another job's and another zone's files.
    pub neighbour_files: Vec<PathBuf>,
    /// Another job's and another zone's directories.
    pub neighbour_dirs: Vec<PathBuf>,
    /// TCP listeners on 127.0.0.1 (public, admin, a bait service).
    pub tcp_ports: Vec<u16>,
    /// UDP bait sockets on 127.0.0.1.
    pub udp_ports: Vec<u16>,
    /// Bait resolvers on 127.0.0.1 (port 53 when the suite could bind it).
    pub dns_ports: Vec<u16>,
    /// The file a shell would touch.
    pub marker: PathBuf,
    /// The gateway's pid.
    pub gateway_pid: u32,
    /// Address and length of a secret in the gateway's memory.
    pub gateway_secret: (u64, u64),
    /// How many processes the fork bomb tries to start.
    pub forks: u32,
    /// Its zone's compiled-module cache, which it may only read: the
    /// directories (by path and as handed over, `/proc/self/fd/N`).
    #[serde(default)]
    pub zone_cache_dirs: Vec<PathBuf>,
    /// The artifacts in it.
    #[serde(default)]
    pub zone_cache_files: Vec<PathBuf>,
}

/// One line the drill writes on its channel (JSON, one per line).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DrillLine {
    /// What the hardening function reported, before any attack.
    Applied(Applied),
    /// The hardening function failed; the drill attacks anyway.
    HardenFailed(String),
    /// What it is about to try (a call the wall may answer by killing it).
    Trying(String),
    /// One attempt: what it tried, how it ended, what it got (if any).
    Attempt {
        /// What it tried.
        what: String,
        /// `ok` or the error.
        outcome: String,
        /// What it read, if anything.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        data: Option<String>,
    },
    /// Every attempt made; the drill now waits to be killed.
    Done,
}
