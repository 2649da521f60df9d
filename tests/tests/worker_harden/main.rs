//! The worker's hardening layers on the real kernel (`harness = false`:
//! a worker hardens itself while single-threaded, which a libtest test
//! thread never is).
//!
//! Each case starts this binary again as a child in a worker's role: the
//! child applies a plan, reports what [`harden::apply`] returned over its
//! channel (a socketpair on descriptor 3, as a worker's), then waits for
//! orders and tries what it is told. The parent judges from host-side
//! evidence: `/proc/<child>/...`, files it planted or finds, connections
//! its own listener received, how the child ended. Every layer is tried
//! on and off (in `weaken`), with the same other layers, so a missing
//! layer fails its case.

mod child;
mod layers;
#[path = "../all/common/policies.rs"]
mod policies;
mod race;
mod sandbox;
mod support;

fn main() {
    if std::env::var_os(support::ROLE).is_some() {
        child::main();
        return;
    }
    let cases: &[(&str, fn())] = &[
        ("descriptors_leave_only_the_channel", layers::descriptors),
        (
            "unprivileged_switches_to_nobody_without_capabilities",
            layers::unprivileged,
        ),
        (
            "user_namespace_maps_only_the_worker_uid",
            layers::user_namespace,
        ),
        (
            "network_namespace_reaches_no_listener",
            layers::network_namespace,
        ),
        (
            "ipc_namespace_keeps_shared_memory_off_the_host",
            layers::ipc_namespace,
        ),
        (
            "mount_namespace_is_new_and_private",
            layers::mount_namespace,
        ),
        ("rlimits_are_set_and_cannot_be_raised", layers::rlimits),
        ("threads_are_bounded_by_max_threads", layers::threads),
        ("no_new_privs_is_set", layers::no_new_privs),
        (
            "landlock_keeps_files_outside_writable_out_of_reach",
            layers::landlock,
        ),
        ("landlock_refuses_tcp", layers::landlock_tcp),
        ("not_dumpable_makes_proc_files_root_s", layers::not_dumpable),
        ("seccomp_kills_exec_and_sockets", layers::seccomp),
        (
            "seccomp_kills_forbidden_calls",
            layers::seccomp_forbidden_calls,
        ),
        ("seccomp_lets_threads_run", layers::seccomp_threads),
        ("dies_with_gateway", layers::dies_with_gateway),
        ("fully_hardened_shows_every_layer", layers::fully_hardened),
        (
            "prepare_runs_before_the_uid_change_without_cap_sys_admin",
            layers::prepare,
        ),
        (
            "no_moment_of_hardening_is_open_to_the_new_uid",
            race::never_open_to_its_new_uid,
        ),
        (
            "a_uid_change_with_suid_dumpable_1_is_refused",
            race::refused_where_a_uid_change_leaves_it_dumpable,
        ),
        ("apply_twice_or_a_bad_dir_is_a_clear_error", layers::errors),
        ("fully_hardened_worker_runs_jobs", sandbox::runs_jobs),
    ];
    support::run_cases(cases);
}

/// Why `case` cannot run here, if it cannot: most cases start as root
/// (they check the switch to 65534, and namespaces without a user
/// namespace need root), and each needs its layers offered.
fn unsupported(case: &str) -> Option<String> {
    use bulkhead::worker::harden::{Layer, LayerState, offered};
    let needs: &[Layer] = match case {
        "descriptors_leave_only_the_channel" => &[Layer::Descriptors],
        "no_new_privs_is_set" => &[Layer::NoNewPrivs],
        c if c.starts_with("landlock") => &[Layer::Landlock],
        c if c.starts_with("seccomp") => &[Layer::Seccomp],
        _ => &Layer::ALL,
    };
    // Fully hardened workers run the same as root or not (the uid they
    // end with is checked against the one they should have).
    let root_free = needs.len() == 1
        || matches!(
            case,
            "threads_are_bounded_by_max_threads"
                | "dies_with_gateway"
                | "fully_hardened_shows_every_layer"
                | "prepare_runs_before_the_uid_change_without_cap_sys_admin"
                | "apply_twice_or_a_bad_dir_is_a_clear_error"
                | "fully_hardened_worker_runs_jobs"
        );
    // SAFETY: no preconditions.
    if !root_free && unsafe { libc::geteuid() } != 0 {
        return Some("needs root".into());
    }
    let offered = offered();
    needs.iter().find_map(|l| match &offered[l] {
        LayerState::Unavailable { reason } => Some(format!("{l:?}: {reason}")),
        _ => None,
    })
}
