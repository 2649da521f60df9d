//! Running cases, starting children, reading their reports.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};

use bulkhead::worker::harden::{Applied, Layer};

/// The environment variable naming a child's role.
pub const ROLE: &str = "BULKHEAD_HARDEN_ROLE";
/// The layers a child applies (comma-separated names), the rest weakened.
pub const APPLY: &str = "BULKHEAD_HARDEN_APPLY";
/// The writable directories (colon-separated).
pub const WRITABLE: &str = "BULKHEAD_HARDEN_WRITABLE";
/// `max_threads` for the child.
pub const MAX_THREADS: &str = "BULKHEAD_HARDEN_MAX_THREADS";
/// The descriptor the parent leaks into every child.
pub const LEAKED_FD: i32 = 7;
/// `max_open` for children.
pub const MAX_OPEN: u64 = 1024;

pub fn run_cases(cases: &[(&str, fn())]) {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.iter().any(|a| a == "--list") {
        for (name, _) in cases {
            println!("{name}: test");
        }
        return;
    }
    let exact = args.iter().any(|a| a == "--exact");
    let filters: Vec<&String> = args.iter().filter(|a| !a.starts_with("--")).collect();
    // Orphaned grandchildren come back to this process, to be reaped.
    // SAFETY: a plain flag.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    let chosen: Vec<_> = cases
        .iter()
        .filter(|(name, _)| {
            filters.is_empty()
                || filters.iter().any(|f| {
                    if exact {
                        name == f
                    } else {
                        name.contains(f.as_str())
                    }
                })
        })
        .collect();
    println!("\nrunning {} tests", chosen.len());
    let mut failed = Vec::new();
    for (name, case) in &chosen {
        if let Some(why) = crate::unsupported(name) {
            // Where the kernel or this process lacks what the case needs
            // (not root, a layer not offered), it cannot run here.
            println!("test {name} ... ok (not run: {why})");
            continue;
        }
        let result = std::panic::catch_unwind(case);
        println!(
            "test {name} ... {}",
            if result.is_ok() { "ok" } else { "FAILED" }
        );
        if result.is_err() {
            failed.push(*name);
        }
    }
    println!(
        "\ntest result: {}. {} passed; {} failed",
        if failed.is_empty() { "ok" } else { "FAILED" },
        chosen.len() - failed.len(),
        failed.len()
    );
    if !failed.is_empty() {
        println!("failures: {failed:?}");
        std::process::exit(1);
    }
}

/// Every layer but those in `weaken`.
pub fn all_but(weaken: &[Layer]) -> BTreeSet<Layer> {
    Layer::ALL
        .iter()
        .copied()
        .filter(|l| !weaken.contains(l))
        .collect()
}

/// `base` and `layer`.
pub fn with(base: &[Layer], layer: Layer) -> BTreeSet<Layer> {
    base.iter().copied().chain([layer]).collect()
}

/// A scratch directory a worker running as nobody may use.
pub fn scratch() -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix("bulkhead-harden-")
        .tempdir()
        .unwrap();
    give_to_nobody(dir.path());
    dir
}

/// Hands `path` to 65534 (when root), mode 0700.
pub fn give_to_nobody(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).unwrap();
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::chown(path, Some(65534), Some(65534)).unwrap();
    }
}

/// A running child in a worker's role.
pub struct Worker {
    pub child: Child,
    pub channel: BufReader<UnixStream>,
    pub applied: Result<Applied, String>,
}

/// What one order got.
#[derive(Debug)]
pub enum Reply {
    Ok(String),
    Err(String),
    /// The child ended instead of answering.
    Died(ExitStatus),
}

impl Reply {
    pub fn is_ok(&self) -> bool {
        matches!(self, Reply::Ok(_))
    }
}

/// Starts this binary in `role`, applying `apply` (the other layers
/// weakened) with `writable` as its directories, and reads its report.
pub fn start(role: &str, apply: &BTreeSet<Layer>, writable: &[PathBuf]) -> Worker {
    start_with(role, apply, writable, 64, &[])
}

pub fn start_with(
    role: &str,
    apply: &BTreeSet<Layer>,
    writable: &[PathBuf],
    max_threads: u64,
    env: &[(&str, String)],
) -> Worker {
    let (child, channel) = launch(role, apply, writable, max_threads, env, false);
    read_report(child, channel)
}

/// Starts this binary in `role` without reading its report. `traced`: the
/// child asks to be traced by this process (`PTRACE_TRACEME`), so it
/// stops at its exec until this process lets it go.
pub fn launch(
    role: &str,
    apply: &BTreeSet<Layer>,
    writable: &[PathBuf],
    max_threads: u64,
    env: &[(&str, String)],
    traced: bool,
) -> (Child, UnixStream) {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let leak = std::fs::File::open("/etc/hostname")
        .or_else(|_| std::fs::File::open("/etc/passwd"))
        .unwrap();
    let theirs_fd = theirs.as_raw_fd();
    let leak_fd = leak.as_raw_fd();
    let names: Vec<String> = apply
        .iter()
        .map(|l| {
            serde_json::to_value(l)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    let writable: Vec<String> = writable.iter().map(|p| p.display().to_string()).collect();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.env(ROLE, role)
        .env(APPLY, names.join(","))
        .env(WRITABLE, writable.join(":"))
        .env(MAX_THREADS, max_threads.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    // SAFETY: only dup2 and ptrace (async-signal-safe) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(theirs_fd, 3) < 0 || libc::dup2(leak_fd, LEAKED_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            if traced && libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().unwrap();
    drop(theirs);
    drop(leak);
    (child, ours)
}

/// Reads a launched child's report.
pub fn read_report(child: Child, channel: UnixStream) -> Worker {
    let mut channel = BufReader::new(channel);
    let mut line = String::new();
    channel.read_line(&mut line).unwrap();
    let applied = serde_json::from_str::<Result<Applied, String>>(&line)
        .unwrap_or_else(|e| panic!("child report {line:?}: {e}"));
    Worker {
        child,
        channel,
        applied,
    }
}

impl Worker {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The child's `/proc/<pid>/<name>`.
    pub fn proc(&self, name: &str) -> String {
        std::fs::read_to_string(format!("/proc/{}/{name}", self.pid()))
            .unwrap_or_else(|e| panic!("/proc/{}/{name}: {e}", self.pid()))
    }

    /// One field of the child's `/proc/<pid>/status`.
    pub fn status(&self, field: &str) -> String {
        self.proc("status")
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k == field).then(|| v.trim().to_owned())
            })
            .unwrap_or_default()
    }

    /// Sends one order and reads its reply.
    pub fn order(&mut self, order: &str) -> Reply {
        let stream = self.channel.get_mut();
        if writeln!(stream, "{order}").is_err() {
            return Reply::Died(self.child.wait().unwrap());
        }
        let mut line = String::new();
        match self.channel.read_line(&mut line) {
            Ok(n) if n > 0 => match line.trim_end().split_once(' ') {
                Some(("ok", rest)) => Reply::Ok(rest.to_owned()),
                Some((_, rest)) => Reply::Err(rest.to_owned()),
                None if line.trim_end() == "ok" => Reply::Ok(String::new()),
                None => Reply::Err(line),
            },
            _ => Reply::Died(self.child.wait().unwrap()),
        }
    }

    /// Ends the child and waits for it.
    pub fn finish(mut self) -> ExitStatus {
        let _ = writeln!(self.channel.get_mut(), "exit");
        self.child.wait().unwrap()
    }
}

/// Whether `status` is death by SIGSYS (a seccomp kill).
pub fn killed_by_seccomp(status: &ExitStatus) -> bool {
    status.signal() == Some(libc::SIGSYS)
}

/// The applied layers' states, for assertions.
pub fn expect_applied(worker: &Worker) -> &Applied {
    worker
        .applied
        .as_ref()
        .unwrap_or_else(|e| panic!("hardening failed: {e}"))
}
