//! The layers a worker applies to itself before it reads any guest byte
//! (interface only; the layers are not yet written).

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::RawFd;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One layer of the second wall.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    /// Every inherited descriptor but the channel is closed (0, 1 and 2
    /// point to `/dev/null`).
    Descriptors,
    /// A new user namespace, with no capabilities left in it.
    UserNamespace,
    /// A new network namespace: no interface at all, not even loopback.
    NetworkNamespace,
    /// A new IPC namespace.
    IpcNamespace,
    /// A new mount namespace.
    MountNamespace,
    /// An unprivileged uid and gid (switched to when started as root).
    Unprivileged,
    /// `no_new_privs`.
    NoNewPrivs,
    /// Landlock: only the plan's directories are reachable.
    Landlock,
    /// A seccomp allow-list.
    Seccomp,
    /// No core dumps; bounded descriptors and threads.
    Rlimits,
    /// Not dumpable (no ptrace, no `/proc/<pid>/mem` for its uid).
    NotDumpable,
    /// Killed when the gateway dies.
    DiesWithGateway,
}

impl Layer {
    /// Every layer, in the order they are applied.
    pub const ALL: [Layer; 12] = [
        Layer::Descriptors,
        Layer::DiesWithGateway,
        Layer::Unprivileged,
        Layer::UserNamespace,
        Layer::NetworkNamespace,
        Layer::IpcNamespace,
        Layer::MountNamespace,
        Layer::Rlimits,
        Layer::NoNewPrivs,
        Layer::Landlock,
        Layer::NotDumpable,
        Layer::Seccomp,
    ];
}

/// What became of one layer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerState {
    /// Applied and checked.
    Active,
    /// This kernel or process does not offer it.
    Unavailable { reason: String },
    /// Left off by [`Plan::weaken`].
    Off,
}

/// What [`apply`] did, layer by layer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Applied {
    /// Each layer's state.
    pub layers: BTreeMap<Layer, LayerState>,
}

/// What to harden the current process into.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// The one inherited descriptor kept open.
    pub channel: Option<RawFd>,
    /// Inherited directory descriptors kept open (the worker's work and
    /// cache directories, reached as `/proc/self/fd/N`).
    pub keep: Vec<RawFd>,
    /// Directories readable and writable; nothing else on the filesystem is.
    pub writable: Vec<PathBuf>,
    /// `(uid, gid)` to switch to when running as root.
    pub run_as: Option<(u32, u32)>,
    /// `RLIMIT_NOFILE`.
    pub max_open: u64,
    /// `RLIMIT_NPROC`.
    pub max_threads: u64,
    /// Layers not applied (tests and the escape suite's self-check only).
    pub weaken: BTreeSet<Layer>,
}

/// A layer failed where the kernel offers it.
#[derive(Debug, thiserror::Error)]
#[error("cannot apply the {layer:?} layer: {reason}")]
pub struct HardenError {
    /// Which.
    pub layer: Layer,
    /// Why.
    pub reason: String,
}

/// Hardens the calling process as `plan` says. Must be called while the
/// process is single-threaded. Not yet written: reports every layer
/// unavailable.
///
/// # Errors
/// [`HardenError`] when a layer the kernel offers fails.
pub fn apply(plan: &Plan) -> Result<Applied, HardenError> {
    let layers = Layer::ALL
        .iter()
        .map(|&l| {
            let state = if plan.weaken.contains(&l) {
                LayerState::Off
            } else {
                LayerState::Unavailable {
                    reason: "not yet written".into(),
                }
            };
            (l, state)
        })
        .collect();
    Ok(Applied { layers })
}
