//! The child's side: a process in a worker's role.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;

use bulkhead::worker::harden::{self, Applied, Layer, Plan};

use crate::support::{APPLY, MAX_OPEN, MAX_THREADS, ROLE, WRITABLE};

/// Set for a probe that must outlive its channel (its gateway exits).
const HOLD: &str = "BULKHEAD_HARDEN_HOLD";

/// The plan the parent asked for.
pub fn plan() -> Plan {
    let apply: BTreeSet<Layer> = std::env::var(APPLY)
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(|s| serde_json::from_value(serde_json::Value::String(s.to_owned())).unwrap())
        .collect();
    let writable = std::env::var(WRITABLE)
        .unwrap_or_default()
        .split(':')
        .filter(|s| !s.is_empty())
        .map(PathBuf::from)
        .collect();
    Plan {
        channel: Some(3),
        keep: Vec::new(),
        writable,
        readable: Vec::new(),
        run_as: None,
        max_open: MAX_OPEN,
        max_threads: std::env::var(MAX_THREADS).unwrap().parse().unwrap(),
        weaken: Layer::ALL
            .iter()
            .copied()
            .filter(|l| !apply.contains(l))
            .collect(),
        prepare: Some(record_prepare),
    }
}

/// What the process was while hardening's prepare step ran.
static PREPARED: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn record_prepare() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_owned())
            .unwrap_or_default()
    };
    // SAFETY: no preconditions; plain integers.
    let (euid, dumpable) = unsafe {
        (
            libc::geteuid(),
            libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0),
        )
    };
    *PREPARED.lock().unwrap() = Some(format!(
        "euid={euid} capeff={} dumpable={dumpable}",
        field("CapEff:")
    ));
}

/// The channel on descriptor 3.
pub fn channel() -> UnixStream {
    // SAFETY: the parent put a socketpair end on 3 and nothing else owns it.
    unsafe { UnixStream::from_raw_fd(3) }
}

/// Sends the result of hardening as one JSON line.
pub fn report(channel: &mut UnixStream, result: &Result<Applied, String>) {
    let mut line = serde_json::to_string(result).unwrap();
    line.push('\n');
    channel.write_all(line.as_bytes()).unwrap();
}

pub fn main() {
    match std::env::var(ROLE).unwrap().as_str() {
        "probe" => probe(),
        "gateway" => gateway(),
        "sandbox" => crate::sandbox::child(),
        other => panic!("unknown role {other}"),
    }
}

/// Hardens, reports, then obeys orders.
fn probe() {
    let mut channel = channel();
    let result = harden::apply(&plan()).map_err(|e| e.to_string());
    // A second call must be refused.
    let again = harden::apply(&plan()).map_err(|e| e.to_string());
    report(&mut channel, &result);
    // One descriptor for both ways (a clone would be a fifth).
    let mut reader = BufReader::new(&channel);
    let mut held = Vec::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            // A probe whose gateway goes away on purpose waits for what
            // the kernel does to it.
            while std::env::var_os(HOLD).is_some() {
                std::thread::park();
            }
            std::process::exit(0);
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let reply = match words.as_slice() {
            ["exit"] => std::process::exit(0),
            ["prepared"] => PREPARED
                .lock()
                .unwrap()
                .clone()
                .ok_or_else(|| "prepare never ran".to_owned()),
            ["again"] => match &again {
                Ok(_) => Err("a second apply succeeded".to_owned()),
                Err(e) => Ok(e.clone()),
            },
            ["copy", src, dst] => std::fs::read(src)
                .and_then(|data| std::fs::write(dst, data))
                .map(|()| String::new())
                .map_err(|e| e.to_string()),
            ["write", path] => std::fs::write(path, b"x")
                .map(|()| String::new())
                .map_err(|e| e.to_string()),
            ["connect", port] => std::net::TcpStream::connect(("127.0.0.1", port.parse().unwrap()))
                .and_then(|mut s| s.write_all(b"hi"))
                .map(|()| String::new())
                .map_err(|e| e.to_string()),
            ["exec", prog, arg] => std::process::Command::new(prog)
                .arg(arg)
                .status()
                .map(|s| s.to_string())
                .map_err(|e| e.to_string()),
            ["setuid0"] => {
                // SAFETY: plain ids.
                if unsafe { libc::setresuid(0, 0, 0) } == 0 {
                    Ok(String::new())
                } else {
                    Err(std::io::Error::last_os_error().to_string())
                }
            }
            ["raise-nofile"] => {
                let lim = libc::rlimit {
                    rlim_cur: 4096,
                    rlim_max: 4096,
                };
                // SAFETY: a valid rlimit.
                if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
                    Ok(String::new())
                } else {
                    Err(std::io::Error::last_os_error().to_string())
                }
            }
            ["shm", key] => {
                // SAFETY: plain integers.
                let id =
                    unsafe { libc::shmget(key.parse().unwrap(), 4096, libc::IPC_CREAT | 0o600) };
                if id >= 0 {
                    Ok(id.to_string())
                } else {
                    Err(std::io::Error::last_os_error().to_string())
                }
            }
            ["threads", n] => {
                let n: usize = n.parse().unwrap();
                let mut made = 0;
                for _ in 0..n {
                    match std::thread::Builder::new().stack_size(64 * 1024).spawn(|| {
                        loop {
                            std::thread::park();
                        }
                    }) {
                        Ok(h) => {
                            held.push(h);
                            made += 1;
                        }
                        Err(_) => break,
                    }
                }
                Ok(made.to_string())
            }
            ["raw", name] => raw(name),
            ["socket", "inet"] => socket(libc::AF_INET),
            ["socket", "unix"] => socket(libc::AF_UNIX),
            other => Err(format!("unknown order {other:?}")),
        };
        let line = match reply {
            Ok(s) => format!("ok {s}\n"),
            Err(e) => format!("err {e}\n"),
        };
        if (&channel).write_all(line.as_bytes()).is_err() {
            std::process::exit(0);
        }
    }
}

/// One forbidden system call, made directly: the reply says what it
/// returned, when the process survives it.
fn raw(name: &str) -> Result<String, String> {
    // SAFETY: each call is made with arguments that touch no memory of
    // this process, or with null pointers the kernel checks.
    let rc = unsafe {
        let ppid = libc::getppid();
        match name {
            "unshare" => libc::syscall(libc::SYS_unshare, libc::CLONE_NEWUSER),
            "ptrace" => libc::syscall(libc::SYS_ptrace, libc::PTRACE_ATTACH, ppid, 0, 0),
            "kill-parent" => libc::syscall(libc::SYS_kill, ppid, 0),
            "tgkill-parent" => libc::syscall(libc::SYS_tgkill, ppid, ppid, 0),
            "setuid" => libc::syscall(libc::SYS_setuid, 0),
            "prlimit-set" => {
                let lim = libc::rlimit {
                    rlim_cur: 16,
                    rlim_max: 16,
                };
                libc::syscall(
                    libc::SYS_prlimit64,
                    0,
                    libc::RLIMIT_NOFILE,
                    &lim as *const libc::rlimit,
                    std::ptr::null_mut::<libc::rlimit>(),
                )
            }
            "fork" => libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0),
            "clone-newnet" => libc::syscall(
                libc::SYS_clone,
                libc::CLONE_VM
                    | libc::CLONE_FS
                    | libc::CLONE_FILES
                    | libc::CLONE_SIGHAND
                    | libc::CLONE_THREAD
                    | libc::CLONE_NEWNET,
                0,
                0,
                0,
                0,
            ),
            "mount" => libc::syscall(
                libc::SYS_mount,
                std::ptr::null::<libc::c_char>(),
                c"/".as_ptr(),
                std::ptr::null::<libc::c_char>(),
                libc::MS_REMOUNT,
                std::ptr::null::<libc::c_void>(),
            ),
            "bpf" => libc::syscall(libc::SYS_bpf, 0, 0, 0),
            "keyctl" => libc::syscall(libc::SYS_keyctl, 0, 0, 0),
            "io_uring_setup" => libc::syscall(libc::SYS_io_uring_setup, 1, 0),
            "personality" => libc::syscall(libc::SYS_personality, 0xffff_ffffu64),
            "userfaultfd" => libc::syscall(libc::SYS_userfaultfd, 0),
            "process_vm_readv" => libc::syscall(libc::SYS_process_vm_readv, ppid, 0, 0, 0, 0, 0),
            "execve" => libc::syscall(
                libc::SYS_execve,
                c"/bin/true".as_ptr(),
                std::ptr::null::<*const libc::c_char>(),
                std::ptr::null::<*const libc::c_char>(),
            ),
            "clone3" => libc::syscall(libc::SYS_clone3, 0, 0),
            other => return Err(format!("unknown call {other}")),
        }
    };
    Ok(format!("{rc} {}", std::io::Error::last_os_error()))
}

fn socket(domain: libc::c_int) -> Result<String, String> {
    // SAFETY: plain integers.
    let fd = unsafe { libc::socket(domain, libc::SOCK_STREAM, 0) };
    if fd >= 0 {
        Ok(fd.to_string())
    } else {
        Err(std::io::Error::last_os_error().to_string())
    }
}

/// Starts a probe worker (hardened as the environment says) and reports
/// its pid, then exits when told: the probe's gateway.
fn gateway() {
    let mut channel = channel();
    // The probe gets its own channel; its report is relayed.
    let apply: BTreeSet<Layer> = Layer::ALL
        .iter()
        .copied()
        .filter(|l| !plan().weaken.contains(l))
        .collect();
    let writable = plan().writable;
    let worker =
        crate::support::start_with("probe", &apply, &writable, 64, &[(HOLD, "1".to_owned())]);
    let line = format!("ok {}\n", worker.pid());
    report(&mut channel, &worker.applied);
    channel.write_all(line.as_bytes()).unwrap();
    let mut reader = BufReader::new(channel);
    let mut order = String::new();
    let _ = reader.read_line(&mut order);
    // Exits without waiting for or stopping the worker.
    std::mem::forget(worker);
    std::process::exit(0);
}
