//! The Landlock layer: the filesystem beneath the plan's directories and
//! nothing else; no TCP; no abstract unix sockets or signals outside.
//!
//! Nothing outside `writable` is granted, not even read-only: the worker
//! reads no file after hardening except beneath its own directories.
//! `std::thread::available_parallelism` (used by tokio and the compiler
//! pool) then cannot read the cgroup files it consults and falls back to
//! `sched_getaffinity`, which needs no file; `/proc/self` is not needed by
//! wasmtime or tokio once the process runs.

use std::path::PathBuf;

use landlock::{
    ABI, Access, AccessFs, AccessNet, BitFlags, CompatLevel, Compatible, PathBeneath, PathFd,
    Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus, Scope,
};

use super::{HardenError, Layer, LayerState};

/// The Landlock ABI this kernel offers (0 or less: none).
pub(super) fn kernel_abi() -> i64 {
    const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
    // SAFETY: the version query takes no attribute pointer.
    unsafe {
        libc::syscall(
            libc::SYS_landlock_create_ruleset,
            std::ptr::null::<libc::c_void>(),
            0usize,
            LANDLOCK_CREATE_RULESET_VERSION,
        )
    }
}

fn unavailable(abi: i64) -> LayerState {
    let err = std::io::Error::last_os_error();
    LayerState::Unavailable {
        reason: if abi == 0 || err.raw_os_error() == Some(libc::EOPNOTSUPP) {
            "landlock is built in but not enabled (add it to the lsm= boot parameter)".into()
        } else {
            format!("this kernel has no landlock ({err})")
        },
    }
}

pub(super) fn offered() -> LayerState {
    let abi = kernel_abi();
    if abi <= 0 {
        return unavailable(abi);
    }
    LayerState::Active
}

/// Rights granted beneath a writable directory: everything but executing
/// files and device ioctls.
fn writable_access(abi: ABI) -> BitFlags<AccessFs> {
    AccessFs::from_all(abi) & !(AccessFs::Execute | AccessFs::IoctlDev)
}

/// Rights granted beneath a read-only directory: reading files and
/// listing directories.
fn readable_access() -> BitFlags<AccessFs> {
    AccessFs::ReadFile | AccessFs::ReadDir
}

pub(super) fn apply(writable: &[PathBuf], readable: &[PathBuf]) -> Result<LayerState, HardenError> {
    let layer = Layer::Landlock;
    let version = kernel_abi();
    if version <= 0 {
        return Ok(unavailable(version));
    }
    let abi = ABI::from(i32::try_from(version).unwrap_or(i32::MAX));
    let err =
        |what: &str, e: &dyn std::fmt::Display| HardenError::new(layer, format!("{what}: {e}"));
    let mut ruleset = Ruleset::default()
        .set_compatibility(CompatLevel::HardRequirement)
        .handle_access(AccessFs::from_all(abi))
        .map_err(|e| err("handling filesystem rights", &e))?;
    if version >= 4 {
        ruleset = ruleset
            .handle_access(AccessNet::from_all(abi))
            .map_err(|e| err("handling network rights", &e))?;
    }
    if version >= 6 {
        ruleset = ruleset
            .scope(Scope::from_all(abi))
            .map_err(|e| err("scoping sockets and signals", &e))?;
    }
    let mut created = ruleset
        .create()
        .map_err(|e| err("creating the ruleset", &e))?;
    let rules = writable
        .iter()
        .map(|d| (d, writable_access(abi)))
        .chain(readable.iter().map(|d| (d, readable_access())));
    for (dir, access) in rules {
        let fd = PathFd::new(dir).map_err(|e| err(&format!("opening {}", dir.display()), &e))?;
        created = created
            .add_rule(PathBeneath::new(fd, access))
            .map_err(|e| err(&format!("allowing {}", dir.display()), &e))?;
    }
    let status = created
        .restrict_self()
        .map_err(|e| err("restricting this process", &e))?;
    if status.ruleset != RulesetStatus::FullyEnforced {
        return Err(HardenError::new(
            layer,
            format!("the ruleset is {:?}, not fully enforced", status.ruleset),
        ));
    }
    // Checked: a path outside every writable directory cannot be opened.
    if writable
        .iter()
        .chain(readable)
        .all(|d| !d.starts_with("/proc"))
        && std::fs::File::open("/proc/self/status").is_ok()
    {
        return Err(HardenError::new(
            layer,
            "/proc/self/status can still be read",
        ));
    }
    Ok(LayerState::Active)
}
