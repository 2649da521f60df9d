//! The seccomp layer: an allow-list of the system calls a worker makes
//! (x86-64), found by tracing a hardened worker that builds a sandbox,
//! compiles components and runs jobs. Anything else kills the process
//! (`SECCOMP_RET_KILL_PROCESS`), except `clone3`, which fails with `ENOSYS`
//! so the C library falls back to `clone`, whose flags can be checked.
//!
//! Calls allowed only with some arguments:
//! - `clone`: thread creation only (`CLONE_VM|CLONE_FS|CLONE_FILES|
//!   CLONE_SIGHAND|CLONE_THREAD`, no exit signal, no namespace, ptrace,
//!   vfork or parent flag): no new process.
//! - `tgkill`: to the worker's own threads (the runtime signals them).
//! - `prctl`: thread names and reading flags back.
//! - `prlimit64`: reading a limit of itself (no new limit).
//! - `process_madvise`: on the worker itself (`PIDFD_SELF`).
//! - `socketpair`: `AF_UNIX` only (tokio's signal driver makes one).
//! - `ioctl`: non-blocking and close-on-exec flags, terminal and readable
//!   byte queries, and `PAGEMAP_SCAN` (the allocator's scan of its own page
//!   map).
//! - `name_to_handle_at`: with the flags that ask for a descriptor's own
//!   file (`AT_EMPTY_PATH`, and `AT_HANDLE_FID`), the handle that tells a
//!   job's files from others given a freed inode number
//!   (`outputs::FileId`). A filter cannot read the path, so native code in
//!   the worker can have the handle of any file it can resolve: its inode
//!   number, generation and mount id, which open nothing
//!   (`open_by_handle_at` is not on the list).
//!
//! Not on the list, among others: `socket`, `connect`, `bind`, `listen`,
//! `accept`, `execve`, `execveat`, `fork`, `vfork`,
//! `ptrace`, `process_vm_readv`/`writev`, `kill`, `tkill`, `mount`,
//! `umount2`, `pivot_root`, `chroot`, `bpf`, `keyctl`, `add_key`,
//! `request_key`, `unshare`, `setns`, `set*id`, `capset`, `setrlimit`,
//! `personality`, `perf_event_open`, `userfaultfd`, `io_uring_*`,
//! `kexec_*`, `init_module`, `finit_module`, `reboot`, `swapon`,
//! `open_by_handle_at`, `seccomp`, `landlock_*`,
//! `mknod`, `chown`.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use super::{HardenError, Layer, LayerState};

/// Allowed with any arguments.
#[cfg(target_arch = "x86_64")]
const ALLOWED: &[(i64, &str)] = &[
    (libc::SYS_read, "read"),
    (libc::SYS_write, "write"),
    (libc::SYS_readv, "readv"),
    (libc::SYS_writev, "writev"),
    (libc::SYS_pread64, "pread64"),
    (libc::SYS_pwrite64, "pwrite64"),
    (libc::SYS_preadv, "preadv"),
    (libc::SYS_pwritev, "pwritev"),
    (libc::SYS_preadv2, "preadv2"),
    (libc::SYS_pwritev2, "pwritev2"),
    (libc::SYS_close, "close"),
    (libc::SYS_fstat, "fstat"),
    (libc::SYS_newfstatat, "newfstatat"),
    (libc::SYS_statx, "statx"),
    (libc::SYS_lseek, "lseek"),
    (libc::SYS_openat, "openat"),
    (libc::SYS_openat2, "openat2"),
    (libc::SYS_mmap, "mmap"),
    (libc::SYS_mprotect, "mprotect"),
    (libc::SYS_munmap, "munmap"),
    (libc::SYS_mremap, "mremap"),
    (libc::SYS_madvise, "madvise"),
    (libc::SYS_brk, "brk"),
    (libc::SYS_msync, "msync"),
    (libc::SYS_membarrier, "membarrier"),
    (libc::SYS_memfd_create, "memfd_create"),
    (libc::SYS_rt_sigaction, "rt_sigaction"),
    (libc::SYS_rt_sigprocmask, "rt_sigprocmask"),
    (libc::SYS_rt_sigreturn, "rt_sigreturn"),
    (libc::SYS_sigaltstack, "sigaltstack"),
    (libc::SYS_futex, "futex"),
    (libc::SYS_set_robust_list, "set_robust_list"),
    (libc::SYS_rseq, "rseq"),
    (libc::SYS_set_tid_address, "set_tid_address"),
    (libc::SYS_sched_yield, "sched_yield"),
    (libc::SYS_sched_getaffinity, "sched_getaffinity"),
    (libc::SYS_getpid, "getpid"),
    (libc::SYS_gettid, "gettid"),
    (libc::SYS_getppid, "getppid"),
    (libc::SYS_getuid, "getuid"),
    (libc::SYS_geteuid, "geteuid"),
    (libc::SYS_getgid, "getgid"),
    (libc::SYS_getegid, "getegid"),
    (libc::SYS_getrlimit, "getrlimit"),
    (libc::SYS_getrusage, "getrusage"),
    (libc::SYS_uname, "uname"),
    (libc::SYS_clock_gettime, "clock_gettime"),
    (libc::SYS_clock_getres, "clock_getres"),
    (libc::SYS_clock_nanosleep, "clock_nanosleep"),
    (libc::SYS_nanosleep, "nanosleep"),
    (libc::SYS_gettimeofday, "gettimeofday"),
    (libc::SYS_getrandom, "getrandom"),
    (libc::SYS_epoll_create1, "epoll_create1"),
    (libc::SYS_epoll_ctl, "epoll_ctl"),
    (libc::SYS_epoll_wait, "epoll_wait"),
    (libc::SYS_epoll_pwait, "epoll_pwait"),
    (libc::SYS_epoll_pwait2, "epoll_pwait2"),
    (libc::SYS_eventfd2, "eventfd2"),
    (libc::SYS_poll, "poll"),
    (libc::SYS_ppoll, "ppoll"),
    (libc::SYS_pipe2, "pipe2"),
    (libc::SYS_fcntl, "fcntl"),
    (libc::SYS_dup, "dup"),
    (libc::SYS_dup3, "dup3"),
    (libc::SYS_ftruncate, "ftruncate"),
    (libc::SYS_fallocate, "fallocate"),
    (libc::SYS_fsync, "fsync"),
    (libc::SYS_fdatasync, "fdatasync"),
    // A guest's `advise` on a file it holds (wasmtime-wasi passes it on):
    // a hint about that file's pages, nothing else (found by a tester: off
    // the list, one call from a plain guest killed its worker and every
    // job in it, another tenant's among them).
    (libc::SYS_fadvise64, "fadvise64"),
    // Asked, without waiting, by a removal: a directory in which another
    // process holds a lock file is never removed (sandbox::remove).
    (libc::SYS_flock, "flock"),
    (libc::SYS_mkdirat, "mkdirat"),
    (libc::SYS_unlinkat, "unlinkat"),
    (libc::SYS_renameat, "renameat"),
    (libc::SYS_renameat2, "renameat2"),
    (libc::SYS_linkat, "linkat"),
    (libc::SYS_symlinkat, "symlinkat"),
    (libc::SYS_readlinkat, "readlinkat"),
    (libc::SYS_getdents64, "getdents64"),
    (libc::SYS_fchmod, "fchmod"),
    (libc::SYS_fchmodat, "fchmodat"),
    (libc::SYS_utimensat, "utimensat"),
    (libc::SYS_faccessat, "faccessat"),
    (libc::SYS_faccessat2, "faccessat2"),
    (libc::SYS_statfs, "statfs"),
    (libc::SYS_fstatfs, "fstatfs"),
    (libc::SYS_getcwd, "getcwd"),
    (libc::SYS_copy_file_range, "copy_file_range"),
    (libc::SYS_sendmsg, "sendmsg"),
    (libc::SYS_recvmsg, "recvmsg"),
    (libc::SYS_sendto, "sendto"),
    (libc::SYS_recvfrom, "recvfrom"),
    (libc::SYS_shutdown, "shutdown"),
    (libc::SYS_getsockopt, "getsockopt"),
    (libc::SYS_restart_syscall, "restart_syscall"),
    // The path calls' older forms, which the C library still makes.
    (libc::SYS_mkdir, "mkdir"),
    (libc::SYS_rmdir, "rmdir"),
    (libc::SYS_unlink, "unlink"),
    (libc::SYS_rename, "rename"),
    (libc::SYS_link, "link"),
    (libc::SYS_symlink, "symlink"),
    (libc::SYS_readlink, "readlink"),
    (libc::SYS_stat, "stat"),
    (libc::SYS_lstat, "lstat"),
    (libc::SYS_access, "access"),
    (libc::SYS_chmod, "chmod"),
    (libc::SYS_open, "open"),
    (libc::SYS_exit, "exit"),
    (libc::SYS_exit_group, "exit_group"),
];

/// The names of the calls allowed with any arguments (for reports).
pub fn allowed_names() -> Vec<&'static str> {
    #[cfg(target_arch = "x86_64")]
    {
        ALLOWED.iter().map(|(_, n)| *n).collect()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        Vec::new()
    }
}

const THREAD_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD) as u64;
/// The clone flags checked: the thread flags (which must all be set) and
/// everything that makes a new process, namespace or tracee (unset).
const CLONE_CHECKED: u64 = THREAD_FLAGS
    | 0xff // exit signal (threads have none; also CLONE_NEWTIME)
    | (libc::CLONE_VFORK
        | libc::CLONE_PARENT
        | libc::CLONE_PTRACE
        | libc::CLONE_UNTRACED
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWCGROUP
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_IO) as u64;

const PR_SET_VMA: u64 = 0x5356_4d41;
/// `process_madvise`'s "this process".
const PIDFD_SELF: i32 = -10000;

pub(super) fn offered() -> LayerState {
    if !cfg!(target_arch = "x86_64") {
        return LayerState::Unavailable {
            reason: format!("no allow-list for {}", std::env::consts::ARCH),
        };
    }
    // SAFETY: PR_GET_SECCOMP takes no pointers.
    if unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) } < 0 {
        return LayerState::Unavailable {
            reason: format!(
                "this kernel has no seccomp ({})",
                std::io::Error::last_os_error()
            ),
        };
    }
    LayerState::Active
}

fn eq(arg: u8, value: u64) -> Result<SeccompCondition, seccompiler::BackendError> {
    SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value)
}

fn rules(pid: u64) -> Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::BackendError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    #[cfg(target_arch = "x86_64")]
    for (nr, _) in ALLOWED {
        rules.insert(*nr, Vec::new());
    }
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(CLONE_CHECKED),
            THREAD_FLAGS,
        )?])?],
    );
    // wasmtime decommits a pool slot's pages in one call, on itself only
    // (PIDFD_SELF).
    rules.insert(
        libc::SYS_process_madvise,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            u64::from(PIDFD_SELF.cast_unsigned()),
        )?])?],
    );
    // The runtime's signal driver makes a socketpair; no other socket.
    rules.insert(
        libc::SYS_socketpair,
        vec![SeccompRule::new(vec![eq(0, libc::AF_UNIX as u64)?])?],
    );
    rules.insert(libc::SYS_tgkill, vec![SeccompRule::new(vec![eq(0, pid)?])?]);
    rules.insert(
        libc::SYS_name_to_handle_at,
        [
            libc::AT_EMPTY_PATH,
            libc::AT_EMPTY_PATH | libc::AT_HANDLE_FID,
        ]
        .iter()
        .map(|&flags| {
            SeccompRule::new(vec![SeccompCondition::new(
                4,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                flags.cast_unsigned().into(),
            )?])
        })
        .collect::<Result<_, _>>()?,
    );
    let prctl_ops = [
        libc::PR_SET_NAME,
        libc::PR_GET_NAME,
        libc::PR_GET_SECCOMP,
        libc::PR_GET_DUMPABLE,
        libc::PR_GET_NO_NEW_PRIVS,
    ];
    let mut prctl: Vec<SeccompRule> = prctl_ops
        .iter()
        .map(|&op| SeccompRule::new(vec![eq(0, op as u64)?]))
        .collect::<Result<_, _>>()?;
    prctl.push(SeccompRule::new(vec![eq(0, PR_SET_VMA)?])?);
    rules.insert(libc::SYS_prctl, prctl);
    rules.insert(
        libc::SYS_prlimit64,
        vec![
            SeccompRule::new(vec![eq(0, 0)?, eq(2, 0)?])?,
            SeccompRule::new(vec![eq(0, pid)?, eq(2, 0)?])?,
        ],
    );
    let ioctls = [
        libc::FIONBIO,
        libc::FIOCLEX,
        libc::FIONCLEX,
        libc::FIONREAD,
        libc::TCGETS,
        // The allocator's scan of its own page map (`_IOWR('f', 16, struct
        // pm_scan_arg)`): which pages a finished job dirtied. It reads only
        // this process's page table; on any other descriptor it is ENOTTY.
        PAGEMAP_SCAN,
    ];
    rules.insert(
        libc::SYS_ioctl,
        ioctls
            .iter()
            .map(|&op| {
                SeccompRule::new(vec![SeccompCondition::new(
                    1,
                    SeccompCmpArgLen::Dword,
                    SeccompCmpOp::Eq,
                    op,
                )?])
            })
            .collect::<Result<_, _>>()?,
    );
    Ok(rules)
}

/// `PAGEMAP_SCAN` (linux/fs.h): `_IOWR('f', 16, struct pm_scan_arg)`, the
/// argument 96 bytes.
const PAGEMAP_SCAN: libc::Ioctl = 0xc060_6610;

/// The small filter that turns `clone3` into `ENOSYS` (and allows the
/// rest, which the allow-list filter then judges).
fn clone3_program() -> Result<BpfProgram, String> {
    let mut rules = BTreeMap::new();
    rules.insert(libc::SYS_clone3, Vec::new());
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )
    .map_err(|e| e.to_string())?;
    BpfProgram::try_from(filter).map_err(|e| e.to_string())
}

pub(super) fn apply() -> Result<LayerState, HardenError> {
    let layer = Layer::Seccomp;
    if let LayerState::Unavailable { reason } = offered() {
        return Ok(LayerState::Unavailable { reason });
    }
    let err = |e: String| HardenError::new(layer, e);
    let allow = allow_list().map_err(err)?;
    let clone3 = clone3_program().map_err(err)?;
    // With several filters the kernel takes the most restrictive verdict,
    // and KILL_PROCESS outranks ERRNO: so the allow-list admits clone3 and
    // the second filter answers ENOSYS for it.
    // The clone3 filter goes first: installing a filter (and the
    // no_new_privs prctl before it) is not on the allow-list.
    seccompiler::apply_filter(&clone3).map_err(|e| err(e.to_string()))?;
    seccompiler::apply_filter(&allow).map_err(|e| err(e.to_string()))?;
    // SAFETY: PR_GET_SECCOMP takes no pointers (and is on the list).
    let mode = unsafe { libc::prctl(libc::PR_GET_SECCOMP, 0, 0, 0, 0) };
    if mode != 2 {
        return Err(HardenError::new(
            layer,
            format!("seccomp mode reads back as {mode}, not filter (2)"),
        ));
    }
    Ok(LayerState::Active)
}

/// The allow-list, with `clone3` admitted (the second filter refuses it).
fn allow_list() -> Result<BpfProgram, String> {
    // SAFETY: no preconditions.
    let pid = u64::try_from(unsafe { libc::getpid() }).unwrap_or(0);
    let mut rules = rules(pid).map_err(|e| e.to_string())?;
    rules.insert(libc::SYS_clone3, Vec::new());
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|e| e.to_string())?;
    BpfProgram::try_from(filter).map_err(|e| e.to_string())
}
