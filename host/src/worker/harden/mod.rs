//! The layers a worker applies to itself before it reads any guest byte.
//!
//! [`apply`] runs in a freshly started worker, while it is still
//! single-threaded, and checks each layer after applying it (reading the
//! kernel's view back, not trusting a return code). Afterwards the same
//! process builds a tokio runtime and a wasmtime sandbox, compiles and
//! runs components, and talks to the gateway over its channel; every layer
//! leaves exactly that working.
//!
//! What each layer stops, and what it does not:
//!
//! | Layer | Stops | Does not stop |
//! |---|---|---|
//! | `descriptors` | use of anything the gateway leaked by mistake (listeners, store files, keys) | the channel itself, which stays open |
//! | `dies_with_gateway` | a worker outliving a crashed gateway (`PR_SET_PDEATHSIG` SIGKILL, set after the last credential change, which would clear it) | a worker the gateway forgets to stop while alive |
//! | `unprivileged` | root's reach: as root the worker switches to `run_as` (default 65534:65534) with no supplementary groups; every capability is dropped (bounding set, permitted, effective, inheritable, ambient) | what that uid may still touch (Landlock and the namespaces cover it) |
//! | `user_namespace` | the uid meaning anything on the host beyond itself: a new user namespace mapping only the worker's own uid and gid, `setgroups` denied; capabilities are dropped in it too once the other namespaces exist. A worker started as root has the maps written by a child forked before its uid change (it is never dumpable under its new uid) | kernel bugs reachable from user namespaces (seccomp narrows the calls) |
//! | `network_namespace` | every network: a new namespace whose only interface, loopback, stays down (no TCP or UDP anywhere, not even 127.0.0.1, no abstract unix sockets of the host) | the channel (a socketpair made before) |
//! | `ipc_namespace` | System V IPC and POSIX message queues shared with the host | shared memory through files (Landlock) |
//! | `mount_namespace` | mount events propagating either way (made private, `MS_REC|MS_PRIVATE`) | reading the filesystem (Landlock does that) |
//! | `rlimits` | core files (`RLIMIT_CORE` 0), descriptor floods (`RLIMIT_NOFILE` = `max_open`), thread and fork floods (`RLIMIT_NPROC` = `max_threads`); soft = hard, so not raised again | memory (the cgroup and wasmtime's limits), CPU (the sandbox's meter) |
//! | `no_new_privs` | gaining privileges through set-uid binaries or file capabilities | nothing else (it is also set by `landlock` and `seccomp`, which need it) |
//! | `landlock` | the filesystem outside `writable` (no read, write, exec, ioctl on devices) and anything but reading beneath `readable` (the zone's module cache); TCP bind and connect (ABI ≥ 4); abstract unix sockets and signals to processes outside the worker's domain (ABI ≥ 6) | descriptors already open (the channel, `/dev/null`) |
//! | `not_dumpable` | other processes of the same uid attaching with ptrace or reading `/proc/<pid>/mem`; `/proc/<pid>` files become root's | root of the host |
//! | `seccomp` | every system call not on an allow-list (see `seccomp`): sockets, exec, ptrace, namespaces, mounts, bpf, keyrings, io_uring, new processes (clone is allowed for threads only), signals to other processes, credential and limit changes | the allowed calls' own kernel bugs |
//!
//! The layers are applied in this order (the order of [`Layer::ALL`] except
//! that dying with the gateway is set after the credentials last change):
//! descriptors, unprivileged, user, network, IPC and mount namespaces,
//! capabilities dropped, dies-with-gateway, rlimits, no-new-privs, Landlock,
//! not-dumpable, seccomp.
//!
//! `RLIMIT_NPROC` counts the tasks of a uid. In a user namespace of its own
//! (the `user_namespace` layer, created before the limit is set) the kernel
//! counts, against the worker's limit, only the tasks of its uid in that
//! namespace: the worker's own threads. Without that layer it counts every
//! task of the uid on the host, so workers sharing a `run_as` share the
//! budget.
//!
//! A layer in [`Plan::weaken`] is left off ([`LayerState::Off`]). A layer
//! this kernel does not offer is [`LayerState::Unavailable`]; a layer it
//! offers that fails is an error. x86-64 only for seccomp: elsewhere that
//! layer is unavailable.

mod landlock;
mod seccomp;
pub use seccomp::allowed_names as seccomp_allowed;
mod sys;

use std::collections::{BTreeMap, BTreeSet};
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

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
    /// Each layer's state (a worker's `Hello` is read with at most
    /// [`MAX_LAYERS`] entries: found by a tester, one of 4 million).
    #[serde(deserialize_with = "crate::sandbox::intake::at_most_map::<_, _, _, MAX_LAYERS>")]
    pub layers: BTreeMap<Layer, LayerState>,
}

/// Most layers an [`Applied`] is read with: far more than there are.
pub const MAX_LAYERS: usize = 64;

/// What to harden the current process into.
#[derive(Clone, Debug, Default)]
pub struct Plan {
    /// The one inherited descriptor kept open.
    pub channel: Option<RawFd>,
    /// Inherited directory descriptors kept open too (the worker's work
    /// and cache directories, reached as `/proc/self/fd/N`).
    pub keep: Vec<RawFd>,
    /// Directories readable and writable.
    pub writable: Vec<PathBuf>,
    /// Directories only readable (files read, directories listed);
    /// nothing else on the filesystem is reachable.
    pub readable: Vec<PathBuf>,
    /// `(uid, gid)` to switch to when running as root.
    pub run_as: Option<(u32, u32)>,
    /// `RLIMIT_NOFILE`.
    pub max_open: u64,
    /// `RLIMIT_NPROC`.
    pub max_threads: u64,
    /// Layers not applied (tests and the escape suite's self-check only).
    pub weaken: BTreeSet<Layer>,
    /// Runs right after the descriptors are closed, before the uid change
    /// and the rest: what must be opened by path while `/proc/self` is
    /// still the process's own (the allocator's page map,
    /// `/proc/self/pagemap`; after a uid change it is root's, and making
    /// the process dumpable to reach it would open it to every process of
    /// the new uid). It runs without `CAP_SYS_ADMIN` in the effective set,
    /// so what it opens carries no privilege to reveal.
    pub prepare: Option<fn()>,
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

impl HardenError {
    fn new(layer: Layer, reason: impl Into<String>) -> Self {
        Self {
            layer,
            reason: reason.into(),
        }
    }
}

/// The uid and gid a root worker switches to when the plan names none.
pub const DEFAULT_RUN_AS: (u32, u32) = (65534, 65534);

/// Smallest `max_open` accepted: the runtime's own descriptors (epoll,
/// eventfd, the channel, the module cache) need some room.
pub const MIN_MAX_OPEN: u64 = 32;

/// Smallest `max_threads` accepted: a runtime with a few workers, the
/// epoch ticker and compilation threads.
pub const MIN_MAX_THREADS: u64 = 8;

static APPLIED: AtomicBool = AtomicBool::new(false);

/// Hardens the calling process as `plan` says. Must be called while the
/// process is single-threaded, at most once per process.
///
/// # Errors
/// [`HardenError`] when a layer the kernel offers fails, when the plan is
/// invalid (checked before anything is applied: the writable directories
/// must be absolute paths to existing directories, the limits large
/// enough), when the process already has other threads, or when called a
/// second time.
pub fn apply(plan: &Plan) -> Result<Applied, HardenError> {
    if APPLIED.swap(true, Ordering::SeqCst) {
        return Err(HardenError::new(
            Layer::Descriptors,
            "this process is already hardened (apply runs once per process)",
        ));
    }
    check_plan(plan)?;
    let on = |l: Layer| !plan.weaken.contains(&l);
    let threads = sys::thread_count();
    if threads != Some(1) && (on(Layer::UserNamespace) || on(Layer::Landlock) || on(Layer::Seccomp))
    {
        return Err(HardenError::new(
            Layer::UserNamespace,
            format!(
                "the process must be single-threaded, it has {} threads",
                threads.map_or_else(|| "an unknown number of".to_owned(), |n| n.to_string())
            ),
        ));
    }

    let mut layers = BTreeMap::new();
    let mut record = |layer: Layer, f: &mut dyn FnMut() -> Result<LayerState, HardenError>| {
        let state = if on(layer) { f()? } else { LayerState::Off };
        layers.insert(layer, state);
        Ok::<(), HardenError>(())
    };
    let ppid = sys::getppid();

    record(Layer::Descriptors, &mut || {
        sys::descriptors(plan.channel, &plan.keep)
    })?;
    if let Some(prepare) = plan.prepare {
        sys::without_admin(prepare)?;
    }
    // A root worker that will change its uid and enter a user namespace
    // has its maps written by a child that stays root (see
    // `sys::MapWriter`), forked now, before the uid change: it is never
    // dumpable under its new uid.
    let mut map_writer = None;
    // SAFETY: no preconditions.
    if on(Layer::Unprivileged)
        && on(Layer::UserNamespace)
        && unsafe { libc::geteuid() } == 0
        && sys::user_namespaces_offered() == LayerState::Active
    {
        let (uid, gid) = plan.run_as.unwrap_or(DEFAULT_RUN_AS);
        map_writer = Some(sys::map_writer(uid, gid)?);
    }
    record(Layer::Unprivileged, &mut || sys::unprivileged(plan.run_as))?;
    record(Layer::UserNamespace, &mut || {
        sys::user_namespace(map_writer.take())
    })?;
    let privileged_ns = || sys::has_cap_sys_admin();
    record(Layer::NetworkNamespace, &mut || {
        sys::unshare_ns(Layer::NetworkNamespace, privileged_ns())
    })?;
    record(Layer::IpcNamespace, &mut || {
        sys::unshare_ns(Layer::IpcNamespace, privileged_ns())
    })?;
    record(Layer::MountNamespace, &mut || {
        sys::unshare_ns(Layer::MountNamespace, privileged_ns())
    })?;
    // Inside the new user namespace the worker holds every capability;
    // none of them outlive the namespaces' creation.
    if on(Layer::Unprivileged) || on(Layer::UserNamespace) {
        let layer = if on(Layer::UserNamespace) {
            Layer::UserNamespace
        } else {
            Layer::Unprivileged
        };
        sys::drop_capabilities(layer)?;
    }
    record(Layer::DiesWithGateway, &mut || sys::dies_with_gateway(ppid))?;
    record(Layer::Rlimits, &mut || {
        sys::rlimits(plan.max_open, plan.max_threads)
    })?;
    record(Layer::NoNewPrivs, &mut sys::no_new_privs)?;
    record(Layer::Landlock, &mut || {
        landlock::apply(&plan.writable, &plan.readable)
    })?;
    record(Layer::NotDumpable, &mut sys::not_dumpable)?;
    if !on(Layer::NotDumpable) {
        // Left off, the layer leaves the process as dumpable as a worker
        // that forgot it could be, so the drill can tell.
        sys::dumpable();
    }
    record(Layer::Seccomp, &mut seccomp::apply)?;
    Ok(Applied { layers })
}

fn check_plan(plan: &Plan) -> Result<(), HardenError> {
    let on = |l: Layer| !plan.weaken.contains(&l);
    if on(Layer::Descriptors)
        && let Some(fd) = plan.channel
        && fd <= 2
    {
        return Err(HardenError::new(
            Layer::Descriptors,
            format!("channel descriptor {fd} would be replaced by /dev/null (it must be above 2)"),
        ));
    }
    if on(Layer::Landlock) {
        for dir in plan.writable.iter().chain(&plan.readable) {
            check_dir(dir)?;
        }
    }
    if on(Layer::Rlimits) {
        if plan.max_open < MIN_MAX_OPEN {
            return Err(HardenError::new(
                Layer::Rlimits,
                format!(
                    "max_open {} is below the minimum {MIN_MAX_OPEN}",
                    plan.max_open
                ),
            ));
        }
        if plan.max_threads < MIN_MAX_THREADS {
            return Err(HardenError::new(
                Layer::Rlimits,
                format!(
                    "max_threads {} is below the minimum {MIN_MAX_THREADS}",
                    plan.max_threads
                ),
            ));
        }
    }
    Ok(())
}

fn check_dir(dir: &Path) -> Result<(), HardenError> {
    if !dir.is_absolute() {
        return Err(HardenError::new(
            Layer::Landlock,
            format!("directory {} is not absolute", dir.display()),
        ));
    }
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(HardenError::new(
            Layer::Landlock,
            format!("directory {} is not a directory", dir.display()),
        )),
        Err(e) => Err(HardenError::new(
            Layer::Landlock,
            format!("directory {}: {e}", dir.display()),
        )),
    }
}

/// What this kernel and process would offer, probed without applying
/// anything (cheap: a few reads under `/proc` and one Landlock query).
///
/// It can tell that a layer is not offered at all: Landlock missing or
/// disabled, user namespaces disabled (`max_user_namespaces` 0), seccomp
/// not built in, an architecture without an allow-list. It cannot tell
/// that a layer reported [`LayerState::Active`] here will succeed: a
/// seccomp or LSM policy around this process may still refuse
/// `unshare`, which only [`apply`] finds out.
pub fn offered() -> BTreeMap<Layer, LayerState> {
    Layer::ALL
        .iter()
        .map(|&l| {
            let state = match l {
                Layer::Landlock => landlock::offered(),
                Layer::Seccomp => seccomp::offered(),
                Layer::UserNamespace => sys::user_namespaces_offered(),
                Layer::NetworkNamespace | Layer::IpcNamespace | Layer::MountNamespace => {
                    match sys::user_namespaces_offered() {
                        LayerState::Active => LayerState::Active,
                        _ if sys::has_cap_sys_admin() => LayerState::Active,
                        LayerState::Unavailable { reason } => LayerState::Unavailable {
                            reason: format!("needs the user namespace ({reason}) or root"),
                        },
                        LayerState::Off => LayerState::Off,
                    }
                }
                _ => LayerState::Active,
            };
            (l, state)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_names_are_the_config_values() {
        let names: Vec<String> = Layer::ALL
            .iter()
            .map(|l| serde_json::to_string(l).unwrap())
            .collect();
        assert!(names.contains(&"\"no_new_privs\"".to_owned()));
        assert!(names.contains(&"\"dies_with_gateway\"".to_owned()));
    }

    #[test]
    fn a_relative_writable_dir_is_refused_before_anything_applies() {
        let plan = Plan {
            writable: vec![PathBuf::from("relative/dir")],
            max_open: 64,
            max_threads: 64,
            ..Plan::default()
        };
        let err = check_plan(&plan).unwrap_err();
        assert_eq!(err.layer, Layer::Landlock);
        assert!(err.to_string().contains("relative/dir"), "{err}");
        let plan = Plan {
            writable: vec![PathBuf::from("/nonexistent/bulkhead-harden")],
            max_open: 64,
            max_threads: 64,
            ..Plan::default()
        };
        let err = check_plan(&plan).unwrap_err();
        assert!(
            err.to_string().contains("/nonexistent/bulkhead-harden"),
            "{err}"
        );
    }

    #[test]
    fn tiny_limits_and_a_low_channel_are_refused() {
        let plan = Plan {
            max_open: 3,
            max_threads: 64,
            ..Plan::default()
        };
        assert_eq!(check_plan(&plan).unwrap_err().layer, Layer::Rlimits);
        let plan = Plan {
            channel: Some(1),
            max_open: 64,
            max_threads: 64,
            ..Plan::default()
        };
        assert_eq!(check_plan(&plan).unwrap_err().layer, Layer::Descriptors);
    }

    #[test]
    fn the_probe_names_every_layer() {
        let offered = offered();
        assert_eq!(offered.len(), Layer::ALL.len());
    }
}
