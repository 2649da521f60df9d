//! No moment of hardening leaves a root-started worker open to the uid it
//! switches to: any process of that uid must never be able to open the
//! worker's memory, from its exec to its last layer.
//!
//! Judged at every system call the worker makes: the worker is traced from
//! its exec (`PTRACE_SYSCALL`), and at each stop, while it cannot move, a
//! process running as the worker's new uid tries to open
//! `/proc/<worker>/mem` read-write, which the kernel grants exactly when
//! that uid may attach. A moment that is only a few system calls long
//! (making the process dumpable to write its own user-namespace maps, say)
//! is caught every run, not by luck.

use std::collections::BTreeSet;
use std::ffi::CString;

use bulkhead::worker::harden::{Layer, LayerState};

use crate::support::{all_but, expect_applied, launch, read_report, scratch};

/// The uid a root worker switches to (the plan names none).
const NEW_UID: u32 = 65534;

/// A process of `NEW_UID` that, for each byte it reads, tries to open
/// `path` read-write and answers `1` (opened) or `0`.
struct Prober {
    pid: libc::pid_t,
    ask: libc::c_int,
    answer: libc::c_int,
}

impl Prober {
    fn start(path: &str) -> Prober {
        let path = CString::new(path).unwrap();
        let (mut ask, mut answer) = ([0; 2], [0; 2]);
        // SAFETY: valid arrays of two descriptors.
        unsafe {
            assert_eq!(libc::pipe2(ask.as_mut_ptr(), libc::O_CLOEXEC), 0);
            assert_eq!(libc::pipe2(answer.as_mut_ptr(), libc::O_CLOEXEC), 0);
        }
        // SAFETY: the child makes only async-signal-safe calls (this
        // process may have threads) and ends with `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            // SAFETY: async-signal-safe calls on valid arguments.
            unsafe {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                libc::close(ask[1]);
                libc::close(answer[0]);
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setresgid(NEW_UID, NEW_UID, NEW_UID) != 0
                    || libc::setresuid(NEW_UID, NEW_UID, NEW_UID) != 0
                {
                    libc::_exit(2);
                }
                let mut byte = 0u8;
                while libc::read(ask[0], (&raw mut byte).cast(), 1) == 1 {
                    let fd = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
                    let reply: u8 = if fd >= 0 {
                        libc::close(fd);
                        b'1'
                    } else {
                        b'0'
                    };
                    if libc::write(answer[1], (&raw const reply).cast(), 1) != 1 {
                        break;
                    }
                }
                libc::_exit(0);
            }
        }
        // SAFETY: our copies of the child's ends.
        unsafe {
            libc::close(ask[0]);
            libc::close(answer[1]);
        }
        Prober {
            pid,
            ask: ask[1],
            answer: answer[0],
        }
    }

    /// Whether the new uid can open the memory right now.
    fn opens(&self) -> bool {
        let (ask, mut reply) = (b'?', 0u8);
        // SAFETY: our own descriptors, one byte each way.
        unsafe {
            assert_eq!(libc::write(self.ask, (&raw const ask).cast(), 1), 1);
            assert_eq!(
                libc::read(self.answer, (&raw mut reply).cast(), 1),
                1,
                "the prober died (could it not become uid {NEW_UID}?)"
            );
        }
        reply == b'1'
    }
}

impl Drop for Prober {
    fn drop(&mut self) {
        // SAFETY: our own descriptors and child.
        unsafe {
            libc::close(self.ask);
            libc::close(self.answer);
            libc::waitpid(self.pid, std::ptr::null_mut(), 0);
        }
    }
}

/// Traces a worker applying `apply` from its exec until its seccomp filter
/// is in place, probing at every system-call stop. Returns how many stops
/// there were and, for each stop where the new uid could open the memory,
/// the worker's `Uid:` line then.
fn trace(apply: &BTreeSet<Layer>) -> (u64, Vec<String>) {
    let dir = scratch();
    let (child, channel) = launch("probe", apply, &[dir.path().to_owned()], 64, &[], true);
    let pid = child.id() as libc::pid_t;
    let prober = Prober::start(&format!("/proc/{pid}/mem"));
    let status_of = |field: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_owned()))
            .unwrap_or_default()
    };
    let mut status = 0;
    // SAFETY: waiting for our own traced child, which stops at its exec.
    unsafe {
        assert_eq!(libc::waitpid(pid, &mut status, libc::__WALL), pid);
        assert!(libc::WIFSTOPPED(status), "status {status:#x}");
        let options = libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_EXITKILL;
        assert_eq!(
            libc::ptrace(libc::PTRACE_SETOPTIONS, pid, 0, options as libc::c_long),
            0
        );
    }
    let (mut stops, mut open) = (0u64, Vec::new());
    let mut signal = 0;
    loop {
        // SAFETY: our stopped tracee.
        unsafe {
            assert_eq!(
                libc::ptrace(libc::PTRACE_SYSCALL, pid, 0, signal as libc::c_long),
                0
            );
            assert_eq!(libc::waitpid(pid, &mut status, libc::__WALL), pid);
        }
        assert!(
            libc::WIFSTOPPED(status),
            "the worker ended while traced: {status:#x}"
        );
        let sig = libc::WSTOPSIG(status);
        signal = if sig == libc::SIGTRAP | 0x80 { 0 } else { sig };
        stops += 1;
        if prober.opens() {
            open.push(status_of("Uid:"));
        }
        if status_of("Seccomp:") == "2" {
            break;
        }
    }
    // SAFETY: our stopped tracee.
    unsafe { libc::ptrace(libc::PTRACE_DETACH, pid, 0, signal as libc::c_long) };
    let worker = read_report(child, channel);
    let applied = expect_applied(&worker);
    for layer in apply {
        assert_eq!(applied.layers[layer], LayerState::Active, "{layer:?}");
    }
    assert_eq!(
        worker.status("Uid").split_whitespace().next(),
        Some(NEW_UID.to_string().as_str())
    );
    // The worker, its hardening done, is not open either (or is, without
    // the not-dumpable layer: the prober's own check).
    if prober.opens() {
        open.push(format!("after hardening: {}", worker.status("Uid")));
    }
    drop(prober);
    worker.finish();
    (stops, open)
}

pub fn never_open_to_its_new_uid() {
    let (stops, open) = trace(&all_but(&[]));
    assert!(stops > 50, "only {stops} system-call stops were seen");
    assert!(
        open.is_empty(),
        "uid {NEW_UID} could open the worker's memory at {} of {stops} stops, with uids {open:?}",
        open.len()
    );
    // Without the not-dumpable layer the same prober gets in: it would
    // see a dumpable moment.
    let (_, open) = trace(&all_but(&[Layer::NotDumpable]));
    assert!(
        !open.is_empty(),
        "a worker left dumpable was never open to uid {NEW_UID}: the prober sees nothing"
    );
}

/// With `fs.suid_dumpable` at 1 the kernel would leave a worker dumpable
/// from its uid change to its not-dumpable layer: hardening refuses to
/// start it rather than open that window. (The sysctl is host-wide: set
/// for the one start, then put back, even on failure.)
pub fn refused_where_a_uid_change_leaves_it_dumpable() {
    const SYSCTL: &str = "/proc/sys/fs/suid_dumpable";
    struct Restore(String);
    impl Drop for Restore {
        fn drop(&mut self) {
            std::fs::write(SYSCTL, &self.0).unwrap();
        }
    }
    let before = std::fs::read_to_string(SYSCTL).unwrap();
    let restore = Restore(before.trim().to_owned());
    std::fs::write(SYSCTL, "1").unwrap();
    let dir = scratch();
    let (child, channel) = launch(
        "probe",
        &all_but(&[]),
        &[dir.path().to_owned()],
        64,
        &[],
        false,
    );
    let worker = read_report(child, channel);
    drop(restore);
    let err = worker.applied.as_ref().unwrap_err();
    assert!(err.contains("suid_dumpable"), "{err}");
    let _ = worker.finish();
}
