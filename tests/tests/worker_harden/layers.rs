//! One case per layer: on, the child cannot; off (the same other layers),
//! it can. Judged from the host's side.

use std::collections::BTreeSet;
use std::io::Read;
use std::net::TcpListener;
use std::path::Path;

use bulkhead::worker::harden::{Layer, LayerState};

use crate::support::{
    LEAKED_FD, MAX_OPEN, Reply, all_but, expect_applied, killed_by_seccomp, scratch, start,
    start_with, with,
};

fn state(worker: &crate::support::Worker, layer: Layer) -> LayerState {
    expect_applied(worker).layers[&layer].clone()
}

/// Starts a probe applying `base` plus `layer` (on) or `base` alone (off)
/// and checks the layer's reported state.
fn probe(base: &[Layer], layer: Layer, on: bool, writable: &Path) -> crate::support::Worker {
    let apply: BTreeSet<Layer> = if on {
        with(base, layer)
    } else {
        base.iter().copied().collect()
    };
    let worker = start("probe", &apply, &[writable.to_owned()]);
    let expected = if on {
        LayerState::Active
    } else {
        LayerState::Off
    };
    assert_eq!(state(&worker, layer), expected, "{layer:?}");
    worker
}

fn ns(pid: &str, kind: &str) -> std::path::PathBuf {
    std::fs::read_link(format!("/proc/{pid}/ns/{kind}")).unwrap()
}

pub fn descriptors() {
    let dir = scratch();
    for on in [true, false] {
        let w = probe(&[], Layer::Descriptors, on, dir.path());
        let fds: Vec<i32> = std::fs::read_dir(format!("/proc/{}/fd", w.pid()))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_str().unwrap().parse().unwrap())
            .collect();
        if on {
            let mut fds = fds.clone();
            fds.sort_unstable();
            assert_eq!(fds, [0, 1, 2, 3], "{fds:?}");
            for fd in 0..=2 {
                let target = std::fs::read_link(format!("/proc/{}/fd/{fd}", w.pid())).unwrap();
                assert_eq!(target, Path::new("/dev/null"));
            }
        } else {
            assert!(fds.contains(&LEAKED_FD), "{fds:?}");
        }
        w.finish();
    }
}

pub fn unprivileged() {
    let dir = scratch();
    for on in [true, false] {
        let mut w = probe(&[], Layer::Unprivileged, on, dir.path());
        let uid = w.status("Uid");
        let setuid = w.order("setuid0");
        if on {
            assert_eq!(uid.split_whitespace().collect::<Vec<_>>(), ["65534"; 4]);
            assert_eq!(
                w.status("Gid").split_whitespace().collect::<Vec<_>>(),
                ["65534"; 4]
            );
            assert_eq!(w.status("Groups"), "");
            for set in ["CapPrm", "CapEff", "CapBnd", "CapAmb", "CapInh"] {
                assert_eq!(w.status(set), "0000000000000000", "{set}");
            }
            assert!(!setuid.is_ok(), "{setuid:?}");
            assert_eq!(w.status("Uid").split_whitespace().next(), Some("65534"));
        } else {
            assert_eq!(uid.split_whitespace().next(), Some("0"));
            assert_ne!(w.status("CapEff"), "0000000000000000");
        }
        w.finish();
    }
}

pub fn user_namespace() {
    let dir = scratch();
    let me = ns("self", "user");
    for on in [true, false] {
        let w = probe(&[Layer::Unprivileged], Layer::UserNamespace, on, dir.path());
        let pid = w.pid().to_string();
        if on {
            assert_ne!(ns(&pid, "user"), me);
            let map: Vec<String> = w
                .proc("uid_map")
                .split_whitespace()
                .map(str::to_owned)
                .collect();
            assert_eq!(map, ["65534", "65534", "1"]);
            assert_eq!(w.proc("setgroups").trim(), "deny");
            // Its capabilities in the namespace were dropped too.
            assert_eq!(w.status("CapEff"), "0000000000000000");
            assert_eq!(w.status("CapBnd"), "0000000000000000");
        } else {
            assert_eq!(ns(&pid, "user"), me);
        }
        w.finish();
    }
}

pub fn network_namespace() {
    let dir = scratch();
    let me = ns("self", "net");
    for on in [true, false] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut w = probe(&[], Layer::NetworkNamespace, on, dir.path());
        let pid = w.pid().to_string();
        let reply = w.order(&format!("connect {port}"));
        listener.set_nonblocking(true).unwrap();
        let received = listener.accept().map(|(mut s, _)| {
            let mut buf = Vec::new();
            s.set_nonblocking(false).unwrap();
            let _ = s.read_to_end(&mut buf);
            buf
        });
        if on {
            assert_ne!(ns(&pid, "net"), me);
            assert!(!reply.is_ok(), "{reply:?}");
            assert!(received.is_err(), "the listener received {received:?}");
            let dev = w.proc("net/dev");
            let ifaces: Vec<&str> = dev
                .lines()
                .skip(2)
                .filter_map(|l| l.split(':').next().map(str::trim))
                .collect();
            assert_eq!(ifaces, ["lo"]);
        } else {
            assert!(reply.is_ok(), "{reply:?}");
            w.finish();
            continue;
        }
        w.finish();
    }
}

pub fn ipc_namespace() {
    let dir = scratch();
    let me = ns("self", "ipc");
    for on in [true, false] {
        let key: i32 = 0x4242_0000 + i32::from(on);
        let mut w = probe(&[], Layer::IpcNamespace, on, dir.path());
        let pid = w.pid().to_string();
        let reply = w.order(&format!("shm {key}"));
        assert!(reply.is_ok(), "{reply:?}");
        let host = std::fs::read_to_string("/proc/sysvipc/shm").unwrap();
        let on_host = host
            .lines()
            .any(|l| l.split_whitespace().next() == Some(&key.to_string()));
        if on {
            assert_ne!(ns(&pid, "ipc"), me);
            assert!(!on_host, "the segment reached the host's IPC namespace");
        } else {
            assert!(on_host, "the unconfined segment is not visible: {host}");
            // SAFETY: plain integers; removes the test's own segment.
            unsafe {
                let id = libc::shmget(key, 0, 0);
                libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut());
            }
        }
        w.finish();
    }
}

pub fn mount_namespace() {
    let dir = scratch();
    let me = ns("self", "mnt");
    for on in [true, false] {
        let w = probe(&[], Layer::MountNamespace, on, dir.path());
        let pid = w.pid().to_string();
        if on {
            assert_ne!(ns(&pid, "mnt"), me);
            let info = w.proc("mountinfo");
            assert!(
                !info.contains(" shared:"),
                "a mount still propagates: {info}"
            );
        } else {
            assert_eq!(ns(&pid, "mnt"), me);
        }
        w.finish();
    }
}

fn limit(w: &crate::support::Worker, name: &str) -> (String, String) {
    let limits = w.proc("limits");
    let line = limits
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("{name} not in {limits}"));
    let fields: Vec<&str> = line[name.len()..].split_whitespace().collect();
    (fields[0].to_owned(), fields[1].to_owned())
}

pub fn rlimits() {
    let dir = scratch();
    for on in [true, false] {
        let mut w = probe(&[Layer::Unprivileged], Layer::Rlimits, on, dir.path());
        let raise = w.order("raise-nofile");
        let open = limit(&w, "Max open files");
        if on {
            let max = MAX_OPEN.to_string();
            assert_eq!(open, (max.clone(), max));
            assert_eq!(limit(&w, "Max core file size"), ("0".into(), "0".into()));
            assert_eq!(limit(&w, "Max processes"), ("64".into(), "64".into()));
            assert!(!raise.is_ok(), "{raise:?}");
        } else {
            assert_ne!(open.1, MAX_OPEN.to_string());
        }
        w.finish();
    }
}

/// `RLIMIT_NPROC` counts the worker's own threads (in its own user
/// namespace): a worker may run the threads it needs, not more.
pub fn threads() {
    let dir = scratch();
    let max_threads = 48;
    let mut w = start_with(
        "probe",
        &all_but(&[]),
        &[dir.path().to_owned()],
        max_threads,
        &[],
    );
    assert_eq!(state(&w, Layer::Rlimits), LayerState::Active);
    let reply = w.order("threads 200");
    let tasks = std::fs::read_dir(format!("/proc/{}/task", w.pid()))
        .unwrap()
        .count() as u64;
    assert!(reply.is_ok(), "{reply:?}");
    assert!(
        tasks <= max_threads,
        "{tasks} tasks with max_threads {max_threads}"
    );
    assert!(
        tasks >= 40,
        "only {tasks} tasks with max_threads {max_threads}"
    );
    w.finish();
    // Without the limit, the same worker runs more.
    let mut w = start_with(
        "probe",
        &all_but(&[Layer::Rlimits]),
        &[dir.path().to_owned()],
        max_threads,
        &[],
    );
    let reply = w.order("threads 100");
    let tasks = std::fs::read_dir(format!("/proc/{}/task", w.pid()))
        .unwrap()
        .count() as u64;
    assert!(reply.is_ok(), "{reply:?}");
    assert!(tasks > max_threads, "{tasks} tasks without the limit");
    w.finish();
}

pub fn no_new_privs() {
    let dir = scratch();
    for on in [true, false] {
        // Landlock and seccomp set it too (they need it), so they are off.
        let w = probe(&[], Layer::NoNewPrivs, on, dir.path());
        assert_eq!(w.status("NoNewPrivs"), if on { "1" } else { "0" });
        w.finish();
    }
}

pub fn landlock() {
    let dir = scratch();
    let outside = tempfile::tempdir().unwrap();
    let bait = outside.path().join("bait");
    std::fs::write(&bait, b"secret").unwrap();
    for on in [true, false] {
        let copy = dir.path().join(format!("copy-{on}"));
        let planted = outside.path().join(format!("planted-{on}"));
        let mut w = probe(&[], Layer::Landlock, on, dir.path());
        let copied = w.order(&format!("copy {} {}", bait.display(), copy.display()));
        let wrote = w.order(&format!("write {}", planted.display()));
        let etc = w.order(&format!(
            "copy /etc/passwd {}/passwd-{on}",
            dir.path().display()
        ));
        let inside = w.order(&format!("write {}/inside-{on}", dir.path().display()));
        assert!(inside.is_ok(), "{inside:?}");
        assert!(dir.path().join(format!("inside-{on}")).exists());
        if on {
            for reply in [&copied, &wrote, &etc] {
                assert!(
                    matches!(reply, Reply::Err(e) if e.contains("Permission denied")),
                    "{reply:?}"
                );
            }
            assert!(!copy.exists(), "the bait was copied");
            assert!(!planted.exists(), "a file was planted outside");
            assert!(!dir.path().join("passwd-true").exists());
        } else {
            assert!(copied.is_ok(), "{copied:?}");
            assert_eq!(std::fs::read(&copy).unwrap(), b"secret");
            assert!(planted.exists());
        }
        w.finish();
    }
}

pub fn landlock_tcp() {
    let dir = scratch();
    for on in [true, false] {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mut w = probe(&[], Layer::Landlock, on, dir.path());
        let reply = w.order(&format!("connect {port}"));
        listener.set_nonblocking(true).unwrap();
        let received = listener.accept().is_ok();
        assert_eq!(received, !on, "{reply:?}");
        w.finish();
    }
}

pub fn not_dumpable() {
    let dir = scratch();
    for on in [true, false] {
        use std::os::unix::fs::MetadataExt;
        let w = probe(
            &[Layer::Unprivileged, Layer::UserNamespace],
            Layer::NotDumpable,
            on,
            dir.path(),
        );
        let owner = std::fs::metadata(format!("/proc/{}/environ", w.pid()))
            .unwrap()
            .uid();
        assert_eq!(owner, if on { 0 } else { 65534 });
        w.finish();
    }
}

pub fn seccomp() {
    let dir = scratch();
    for order in ["exec", "socket inet", "socket unix", "connect"] {
        for on in [true, false] {
            let marker = dir.path().join(format!("marker-{on}"));
            let _ = std::fs::remove_file(&marker);
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port();
            let full = match order {
                "exec" => format!("exec /usr/bin/touch {}", marker.display()),
                "connect" => format!("connect {port}"),
                other => other.to_owned(),
            };
            let mut w = probe(&[], Layer::Seccomp, on, dir.path());
            assert_eq!(w.status("Seccomp"), if on { "2" } else { "0" });
            let reply = w.order(&full);
            if on {
                match &reply {
                    Reply::Died(status) => {
                        assert!(killed_by_seccomp(status), "{order}: {status:?}")
                    }
                    other => panic!("{order} under seccomp got {other:?}"),
                }
                assert!(!marker.exists());
            } else {
                assert!(reply.is_ok(), "{order}: {reply:?}");
                if order == "exec" {
                    assert!(marker.exists());
                }
                w.finish();
            }
        }
    }
}

/// Calls the allow-list leaves out kill the worker; without the layer the
/// same calls return (whatever they return).
pub fn seccomp_forbidden_calls() {
    let dir = scratch();
    let calls = [
        "unshare",
        "ptrace",
        "kill-parent",
        "tgkill-parent",
        "setuid",
        "prlimit-set",
        "fork",
        "clone-newnet",
        "mount",
        "bpf",
        "keyctl",
        "io_uring_setup",
        "personality",
        "userfaultfd",
        "process_vm_readv",
        "execve",
    ];
    for call in calls {
        let mut w = probe(&[], Layer::Seccomp, true, dir.path());
        match w.order(&format!("raw {call}")) {
            Reply::Died(status) => assert!(killed_by_seccomp(&status), "{call}: {status:?}"),
            other => panic!("{call} under seccomp got {other:?}"),
        }
    }
    // clone3 is refused with ENOSYS (the C library then uses clone).
    let mut w = probe(&[], Layer::Seccomp, true, dir.path());
    let reply = w.order("raw clone3");
    assert!(
        matches!(&reply, Reply::Ok(r) if r.starts_with(&format!("-1 {}", std::io::Error::from_raw_os_error(libc::ENOSYS)))),
        "{reply:?}"
    );
    w.finish();
    // Off: the harmless ones return instead of killing.
    for call in ["kill-parent", "personality", "keyctl", "bpf"] {
        let mut w = probe(&[], Layer::Seccomp, false, dir.path());
        let reply = w.order(&format!("raw {call}"));
        assert!(reply.is_ok(), "{call}: {reply:?}");
        w.finish();
    }
}

pub fn seccomp_threads() {
    let dir = scratch();
    let mut w = probe(&[], Layer::Seccomp, true, dir.path());
    let reply = w.order("threads 8");
    assert!(matches!(&reply, Reply::Ok(n) if n == "8"), "{reply:?}");
    assert_eq!(
        std::fs::read_dir(format!("/proc/{}/task", w.pid()))
            .unwrap()
            .count(),
        9
    );
    w.finish();
}

pub fn dies_with_gateway() {
    let dir = scratch();
    for on in [true, false] {
        let apply = if on {
            all_but(&[])
        } else {
            all_but(&[Layer::DiesWithGateway])
        };
        let mut gw = start_with("gateway", &apply, &[dir.path().to_owned()], 64, &[]);
        assert_eq!(
            state(&gw, Layer::DiesWithGateway),
            if on {
                LayerState::Active
            } else {
                LayerState::Off
            }
        );
        let mut line = String::new();
        std::io::BufRead::read_line(&mut gw.channel, &mut line).unwrap();
        let pid: libc::pid_t = line.trim().strip_prefix("ok ").unwrap().parse().unwrap();
        let status = gw.finish();
        assert!(status.success());
        // The worker is now this process's (a subreaper's) child.
        let mut wstatus = 0;
        if on {
            // SAFETY: waits for a child of this process.
            let got = unsafe { libc::waitpid(pid, &mut wstatus, 0) };
            assert_eq!(got, pid);
            assert!(libc::WIFSIGNALED(wstatus) && libc::WTERMSIG(wstatus) == libc::SIGKILL);
        } else {
            // SAFETY: a status query that does not block.
            let got = unsafe { libc::waitpid(pid, &mut wstatus, libc::WNOHANG) };
            assert_eq!(
                got, 0,
                "the worker ended without its gateway's death signal"
            );
            // SAFETY: kills and reaps the test's own worker.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut wstatus, 0);
            }
        }
    }
}

pub fn fully_hardened() {
    let dir = scratch();
    let w = start("probe", &all_but(&[]), &[dir.path().to_owned()]);
    let applied = expect_applied(&w);
    for layer in Layer::ALL {
        assert_eq!(applied.layers[&layer], LayerState::Active, "{layer:?}");
    }
    assert_eq!(w.status("NoNewPrivs"), "1");
    assert_eq!(w.status("Seccomp"), "2");
    assert_eq!(w.status("CapEff"), "0000000000000000");
    // SAFETY: no preconditions.
    let uid = match unsafe { libc::geteuid() } {
        0 => 65534,
        uid => uid,
    };
    assert_eq!(
        w.status("Uid").split_whitespace().next(),
        Some(uid.to_string().as_str())
    );
    let fds = std::fs::read_dir(format!("/proc/{}/fd", w.pid()));
    // SAFETY: no preconditions.
    if uid == 65534 && unsafe { libc::geteuid() } == 0 {
        assert_eq!(fds.unwrap().count(), 4);
        for kind in ["user", "net", "ipc", "mnt"] {
            assert_ne!(ns(&w.pid().to_string(), kind), ns("self", kind), "{kind}");
        }
    } else {
        // Started by its own uid: not dumpable, it keeps even that uid out.
        let err = fds.unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
    }
    w.finish();
}

/// The prepare step (the worker opens its page map there) runs before the
/// uid change, as the starting user, without `CAP_SYS_ADMIN`: no moment of
/// hardening leaves the process dumpable under the new uid, where any
/// process of that uid could attach to it.
pub fn prepare() {
    let dir = scratch();
    let mut w = start("probe", &all_but(&[]), &[dir.path().to_owned()]);
    expect_applied(&w);
    let Reply::Ok(seen) = w.order("prepared") else {
        panic!("the probe did not say how prepare ran");
    };
    let field = |name: &str| {
        seen.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name))
            .unwrap()
            .to_owned()
    };
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(field("euid="), euid.to_string(), "{seen}");
    let capeff = u64::from_str_radix(&field("capeff="), 16).unwrap();
    assert_eq!(capeff & (1 << 21), 0, "CAP_SYS_ADMIN effective: {seen}");
    let end_uid = if euid == 0 { 65534 } else { euid };
    assert_eq!(
        w.status("Uid").split_whitespace().next(),
        Some(end_uid.to_string().as_str())
    );
    w.finish();
}

pub fn errors() {
    let dir = scratch();
    let mut w = start("probe", &all_but(&[]), &[dir.path().to_owned()]);
    let again = w.order("again");
    match &again {
        Reply::Ok(e) => assert!(e.contains("already hardened"), "{e}"),
        other => panic!("{other:?}"),
    }
    w.finish();
    let missing = dir.path().join("missing");
    let w = start("probe", &all_but(&[]), std::slice::from_ref(&missing));
    let err = w.applied.as_ref().unwrap_err();
    assert!(
        err.contains("Landlock") && err.contains(&missing.display().to_string()),
        "{err}"
    );
}
