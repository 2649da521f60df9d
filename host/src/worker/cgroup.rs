//! A worker's memory ceiling and its share of the CPU, where the host
//! offers cgroups.
//!
//! [`MemoryCeiling::create`] makes a cgroup for one worker under the
//! gateway's own (as `/proc/self/cgroup` names it), with a memory limit:
//! cgroup v2 (`memory.max`, no swap, the whole group killed together)
//! where its memory controller is available, else v1's memory hierarchy
//! (`memory.limit_in_bytes`, and `memory.memsw.limit_in_bytes` where swap
//! is accounted). The worker is put in with [`MemoryCeiling::add`] (or by
//! writing its pid to [`MemoryCeiling::procs_file`] before it runs guest
//! code); [`MemoryCeiling::oom_killed`] says whether the kernel killed in
//! it, so the gateway can name the fault. The directory is removed on
//! drop, once the worker is gone.
//!
//! [`CpuShare::create`] makes a cgroup for one worker under the gateway's
//! own in the CPU controller's hierarchy (v2's `cpu.weight`, v1's
//! `cpu.shares`; on v2 the memory ceiling's own cgroup where the worker
//! has one): under contention the worker weighs what its guest threads
//! would as threads of the gateway, however many threads it runs. Without
//! it, native code in a worker could start threads up to its thread limit
//! and take that many times its share of every core from the gateway and
//! the other zones' workers.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Why a memory ceiling could not be set.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    /// The host offers no memory cgroup this process may use.
    #[error("no memory cgroup is offered: {0}")]
    NotOffered(String),
    /// The worker's name cannot name a directory.
    #[error("invalid cgroup name {0:?}")]
    Name(String),
    /// A cgroup file could not be written or read.
    #[error("cgroup file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// The cgroup version a ceiling uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// Unified hierarchy, memory controller.
    V2,
    /// The v1 memory hierarchy.
    V1,
}

/// A controller workers get cgroups of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Controller {
    Memory,
    Cpu,
}

impl Controller {
    fn name(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Cpu => "cpu",
        }
    }

    /// A file every cgroup of its v1 hierarchy has.
    fn v1_file(self) -> &'static str {
        match self {
            Self::Memory => "memory.limit_in_bytes",
            Self::Cpu => "cpu.shares",
        }
    }
}

/// Where new cgroups of a controller can be made: the gateway's own
/// cgroup.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Base {
    dir: PathBuf,
    version: Version,
}

/// Whether this host offers a memory cgroup under the gateway's own, and
/// if not, why.
pub fn offered() -> Result<(), String> {
    base(Controller::Memory).map(|_| ())
}

/// Whether this host offers a CPU cgroup under the gateway's own, and if
/// not, why.
pub fn cpu_offered() -> Result<(), String> {
    base(Controller::Cpu).map(|_| ())
}

/// Removes the cgroups named `<prefix><pid>` (of either controller)
/// beside this process's workers' whose process is gone: those a service ended before it
/// removed them (killed, or stopped while it started) left, one per
/// worker. One whose pid is alive is left alone (another service's, under
/// the same parent), and so is one still in use (`rmdir` refuses it).
/// How many it removed.
pub fn remove_left(prefix: &str) -> usize {
    let mut dirs: Vec<PathBuf> = [Controller::Memory, Controller::Cpu]
        .into_iter()
        .filter_map(|c| base(c).ok())
        .map(|b| b.dir)
        .collect();
    dirs.dedup();
    dirs.iter().map(|dir| remove_left_in(dir, prefix)).sum()
}

fn remove_left_in(dir: &Path, prefix: &str) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill(2) with signal 0 sends nothing: it asks whether
        // the process exists.
        let gone = unsafe { libc::kill(pid, 0) } != 0
            && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if gone && fs::remove_dir(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn base(controller: Controller) -> Result<Base, String> {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    let own =
        fs::read_to_string("/proc/self/cgroup").map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let mut why = Vec::new();
    match base_v2(&mountinfo, &own, controller) {
        Ok(b) => return Ok(b),
        Err(e) => why.push(format!("v2: {e}")),
    }
    match base_v1(&mountinfo, &own, controller) {
        Ok(b) => return Ok(b),
        Err(e) => why.push(format!("v1: {e}")),
    }
    Err(why.join("; "))
}

/// A mount from `/proc/self/mountinfo`: (root, mount point, fs type,
/// super options).
fn mounts(mountinfo: &str) -> impl Iterator<Item = (&str, &str, &str, &str)> {
    mountinfo.lines().filter_map(|line| {
        let (left, right) = line.split_once(" - ")?;
        let mut l = left.split(' ');
        let root = l.nth(3)?;
        let point = l.next()?;
        let mut r = right.split(' ');
        let fstype = r.next()?;
        let _source = r.next()?;
        let opts = r.next().unwrap_or("");
        Some((root, point, fstype, opts))
    })
}

/// The directory of cgroup `path` (as `/proc/self/cgroup` names it) in a
/// hierarchy mounted at `point` from `root`.
fn join(point: &str, root: &str, path: &str) -> Option<PathBuf> {
    let rel = if root == "/" {
        path
    } else {
        path.strip_prefix(root)?
    };
    let rel = rel.trim_start_matches('/');
    if rel.split('/').any(|c| c == "..") {
        return None;
    }
    Some(Path::new(point).join(rel))
}

fn base_v2(mountinfo: &str, own: &str, controller: Controller) -> Result<Base, String> {
    let (root, point, _, _) = mounts(mountinfo)
        .find(|m| m.2 == "cgroup2")
        .ok_or("not mounted")?;
    let path = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or("this process is in no v2 cgroup")?;
    let dir = join(point, root, path).ok_or("own cgroup outside the mount")?;
    let controllers = fs::read_to_string(dir.join("cgroup.controllers"))
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    let name = controller.name();
    if !controllers.split_whitespace().any(|c| c == name) {
        return Err(format!("no {name} controller in {}", dir.display()));
    }
    let subtree = dir.join("cgroup.subtree_control");
    let enabled = |s: &str| s.split_whitespace().any(|c| c == name);
    if !fs::read_to_string(&subtree).is_ok_and(|s| enabled(&s)) {
        fs::write(&subtree, format!("+{name}")).map_err(|e| {
            format!(
                "cannot enable {name} for children of {}: {e}",
                dir.display()
            )
        })?;
    }
    Ok(Base {
        dir,
        version: Version::V2,
    })
}

fn base_v1(mountinfo: &str, own: &str, controller: Controller) -> Result<Base, String> {
    let name = controller.name();
    let (root, point, _, _) = mounts(mountinfo)
        .find(|m| m.2 == "cgroup" && m.3.split(',').any(|o| o == name))
        .ok_or_else(|| format!("no {name} hierarchy mounted"))?;
    let path = own
        .lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            controllers.split(',').any(|c| c == name).then_some(path)
        })
        .ok_or_else(|| format!("this process is in no {name} cgroup"))?;
    let dir = join(point, root, path).ok_or("own cgroup outside the mount")?;
    let probe = dir.join(controller.v1_file());
    if !probe.exists() {
        return Err(format!("{} is missing", probe.display()));
    }
    Ok(Base {
        dir,
        version: Version::V1,
    })
}

/// One worker's memory cgroup. Removed on drop (retried briefly while
/// its last process exits).
#[derive(Debug)]
pub struct MemoryCeiling {
    dir: PathBuf,
    version: Version,
    limit: u64,
}

impl MemoryCeiling {
    /// Makes cgroup `name` (letters, digits, `-`, `_`) under the
    /// gateway's own, limited to `limit` bytes of memory (and no swap
    /// beyond it). A leftover cgroup of the same name is removed and made
    /// anew once its processes are gone (waiting up to a second for one
    /// just killed); one still in use is refused.
    pub fn create(name: &str, limit: u64) -> Result<Self, CgroupError> {
        check_name(name)?;
        let base = base(Controller::Memory).map_err(CgroupError::NotOffered)?;
        let dir = base.dir.join(name);
        make_anew(&dir)?;
        let ceiling = Self {
            dir,
            version: base.version,
            limit,
        };
        ceiling.configure()?;
        Ok(ceiling)
    }

    fn configure(&self) -> Result<(), CgroupError> {
        let limit = self.limit.to_string();
        match self.version {
            Version::V2 => {
                self.write("memory.max", &limit)?;
                self.write_if_present("memory.swap.max", "0")?;
                self.write_if_present("memory.oom.group", "1")?;
            }
            Version::V1 => {
                // memsw may not go below the memory limit: when lowering,
                // the memory limit first; when raising, memsw first.
                self.write_if_present("memory.memsw.limit_in_bytes", &limit)
                    .ok();
                self.write("memory.limit_in_bytes", &limit)?;
                self.write_if_present("memory.memsw.limit_in_bytes", &limit)?;
                self.write_if_present("memory.oom_control", "0")?;
            }
        }
        Ok(())
    }

    fn write(&self, file: &str, value: &str) -> Result<(), CgroupError> {
        let path = self.dir.join(file);
        fs::write(&path, value).map_err(|source| CgroupError::Io { path, source })
    }

    fn write_if_present(&self, file: &str, value: &str) -> Result<(), CgroupError> {
        if self.dir.join(file).exists() {
            self.write(file, value)?;
        }
        Ok(())
    }

    /// Puts process `pid` (and the threads it starts from now on) in the
    /// ceiling.
    pub fn add(&self, pid: u32) -> Result<(), CgroupError> {
        self.write("cgroup.procs", &pid.to_string())
    }

    /// The file a process writes its pid (or `0`, itself) to to enter.
    pub fn procs_file(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// The cgroup's directory.
    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// The version in use.
    pub fn version(&self) -> Version {
        self.version
    }

    /// The limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// What its processes hold that the kernel cannot reclaim without swap:
    /// their anonymous memory and their tmpfs pages (`memory.stat`'s
    /// `anon` and `shmem`; v1's `rss` and `shmem`), not the page cache of
    /// files they read, which it can. `None` when it cannot be read.
    pub fn used(&self) -> Option<u64> {
        let text = fs::read_to_string(self.dir.join("memory.stat")).ok()?;
        let anon = match self.version {
            Version::V2 => "anon",
            Version::V1 => "rss",
        };
        Some(counter(&text, anon)?.saturating_add(counter(&text, "shmem").unwrap_or(0)))
    }

    /// The most its processes have held together since it was made
    /// (`memory.peak`; v1's `memory.max_usage_in_bytes`, page cache
    /// included). `None` when the kernel does not say.
    pub fn peak(&self) -> Option<u64> {
        let file = match self.version {
            Version::V2 => "memory.peak",
            Version::V1 => "memory.max_usage_in_bytes",
        };
        fs::read_to_string(self.dir.join(file))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Whether the kernel killed a process of the ceiling for memory.
    pub fn oom_killed(&self) -> bool {
        let file = match self.version {
            Version::V2 => "memory.events",
            Version::V1 => "memory.oom_control",
        };
        let Ok(text) = fs::read_to_string(self.dir.join(file)) else {
            return false;
        };
        match counter(&text, "oom_kill") {
            Some(n) => n > 0,
            // Kernels before 4.13 count no kills in v1: a hit limit is
            // the best evidence left.
            None => fs::read_to_string(self.dir.join("memory.failcnt"))
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .is_some_and(|n| n > 0),
        }
    }
}

/// The value of `key` in a flat keyed cgroup file.
fn counter(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn check_name(name: &str) -> Result<(), CgroupError> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(CgroupError::Name(name.to_owned()));
    }
    Ok(())
}

/// Makes cgroup `dir`, never taking over one left by another process
/// under its name (a service stopped before it removed it, a pid used
/// again): its counters (v1 keeps `oom_kill`) would name every fault of
/// the new one a kill for memory, and its processes would share its
/// limits. An empty one goes; one still in use is refused.
fn make_anew(dir: &Path) -> Result<(), CgroupError> {
    let io = |source| CgroupError::Io {
        path: dir.to_owned(),
        source,
    };
    if let Err(e) = fs::create_dir(dir) {
        if e.kind() != io::ErrorKind::AlreadyExists {
            return Err(io(e));
        }
        remove_once_empty(dir).map_err(io)?;
        fs::create_dir(dir).map_err(io)?;
    }
    Ok(())
}

/// One worker's share of the CPU: the weight of `threads` threads of the
/// gateway's, whatever number of threads the worker runs. Removed on drop
/// (retried briefly while its last process exits).
#[derive(Debug)]
pub struct CpuShare {
    /// Its own cgroup; none where it is the memory ceiling's (v2), which
    /// the ceiling removes.
    dir: Option<PathBuf>,
    /// The cgroup its processes are in: its own, or the ceiling's.
    group: PathBuf,
    version: Version,
    /// `cpu.weight` (v2) or `cpu.shares` (v1).
    weight: u64,
}

impl CpuShare {
    /// v1's `cpu.shares` of one thread at nice 0, and v2's `cpu.weight`.
    const THREAD: (u64, u64) = (1024, 100);

    /// Makes cgroup `name` (letters, digits, `-`, `_`) under the
    /// gateway's own in the CPU controller's hierarchy, weighing `threads`
    /// threads; on v2, where the worker has a memory ceiling there,
    /// `ceiling`'s cgroup is weighed instead (a process is in one cgroup
    /// of v2). A leftover cgroup of the same name is removed and made
    /// anew once its processes are gone; one still in use is refused.
    pub fn create(
        name: &str,
        threads: u32,
        ceiling: Option<&MemoryCeiling>,
    ) -> Result<Self, CgroupError> {
        check_name(name)?;
        let base = base(Controller::Cpu).map_err(CgroupError::NotOffered)?;
        let threads = u64::from(threads.max(1));
        let weight = match base.version {
            Version::V2 => (threads * Self::THREAD.1).min(10_000),
            Version::V1 => threads * Self::THREAD.0,
        };
        let (dir, own) = match ceiling {
            Some(c) if base.version == Version::V2 && c.version() == Version::V2 => {
                (c.path().to_owned(), false)
            }
            _ => {
                let dir = base.dir.join(name);
                make_anew(&dir)?;
                (dir, true)
            }
        };
        let share = Self {
            dir: own.then(|| dir.clone()),
            group: dir.clone(),
            version: base.version,
            weight,
        };
        let file = match base.version {
            Version::V2 => "cpu.weight",
            Version::V1 => "cpu.shares",
        };
        let path = dir.join(file);
        fs::write(&path, weight.to_string()).map_err(|source| CgroupError::Io { path, source })?;
        Ok(share)
    }

    /// Puts process `pid`, all its threads, and those it starts from now
    /// on under the share (nothing to do where it is the memory
    /// ceiling's, which the process joins).
    pub fn add(&self, pid: u32) -> Result<(), CgroupError> {
        let Some(dir) = &self.dir else {
            return Ok(());
        };
        let path = dir.join("cgroup.procs");
        fs::write(&path, pid.to_string()).map_err(|source| CgroupError::Io { path, source })
    }

    /// The CPU time its processes have used since it was made, all their
    /// threads together: v2's `cpu.stat` `usage_usec`; on v1, whose `cpu`
    /// controller keeps no such count, the sum of what `/proc` says of
    /// each process in it (`cgroup.procs`; [`super::process::cpu_time`]),
    /// which a process cannot leave, nor start one outside. `None` when it
    /// cannot be read.
    pub fn used(&self) -> Option<Duration> {
        match self.version {
            Version::V2 => {
                let text = fs::read_to_string(self.group.join("cpu.stat")).ok()?;
                counter(&text, "usage_usec").map(Duration::from_micros)
            }
            Version::V1 => {
                let procs = fs::read_to_string(self.group.join("cgroup.procs")).ok()?;
                Some(
                    procs
                        .lines()
                        .filter_map(|pid| pid.trim().parse().ok())
                        .filter_map(super::process::cpu_time)
                        .sum(),
                )
            }
        }
    }

    /// Its own cgroup's directory; `None` where it is the memory
    /// ceiling's.
    pub fn path(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The version in use.
    pub fn version(&self) -> Version {
        self.version
    }

    /// Its weight (`cpu.weight` on v2, `cpu.shares` on v1).
    pub fn weight(&self) -> u64 {
        self.weight
    }
}

impl Drop for CpuShare {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir
            && let Err(e) = remove_once_empty(dir)
        {
            tracing::warn!(dir = %dir.display(), error = %e, "CPU cgroup left behind");
        }
    }
}

/// Removes cgroup `dir` (gone already counts), waiting up to a second
/// while it is busy: a killed process leaves its cgroup a moment after
/// it is reaped, longer on a loaded host. Still busy after that, it is
/// in use, and the error says so.
fn remove_once_empty(dir: &Path) -> io::Result<()> {
    let mut tries = 0;
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < 40 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(25));
            }
            Err(e) => return Err(e),
        }
    }
}

impl Drop for MemoryCeiling {
    fn drop(&mut self) {
        if let Err(e) = remove_once_empty(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), error = %e, "memory cgroup left behind");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::os::unix::process::CommandExt as _;
    use std::process::{Command, Stdio};

    use super::*;

    #[test]
    fn finds_the_own_cgroup_of_either_version() {
        let mountinfo = "31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n\
            35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory\n\
            41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n";
        let own = "4:memory:/a/b\n1:cpu:/\n0::/\n";
        let v1 = base_v1(mountinfo, own, Controller::Memory).map(|b| b.dir);
        // The directory exists only on a host like the one described.
        if let Ok(dir) = v1 {
            assert_eq!(dir, Path::new("/sys/fs/cgroup/memory/a/b"));
        }
        // No CPU hierarchy mounted: none offered, and why.
        let cpu = base_v1(mountinfo, own, Controller::Cpu).unwrap_err();
        assert!(cpu.contains("no cpu hierarchy"), "{cpu}");
        let with_cpu = format!(
            "{mountinfo}32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu\n"
        );
        if let Ok(b) = base_v1(&with_cpu, own, Controller::Cpu) {
            assert_eq!(b.dir, Path::new("/sys/fs/cgroup/cpu"));
        }
        assert_eq!(
            join("/sys/fs/cgroup/memory", "/", "/a/b").unwrap(),
            Path::new("/sys/fs/cgroup/memory/a/b")
        );
        assert_eq!(
            join("/sys/fs/cgroup", "/x", "/x/y").unwrap(),
            Path::new("/sys/fs/cgroup/y")
        );
        assert_eq!(join("/sys/fs/cgroup", "/x", "/z"), None);
        assert_eq!(join("/sys/fs/cgroup", "/", "/a/../.."), None);
        assert_eq!(counter("oom 3\noom_kill 2\n", "oom_kill"), Some(2));
        assert_eq!(counter("under_oom 0\n", "oom_kill"), None);
    }

    #[test]
    fn names_are_plain() {
        for bad in ["", "../x", "a/b", "a b", &"x".repeat(65)] {
            assert!(matches!(
                MemoryCeiling::create(bad, 1 << 26),
                Err(CgroupError::Name(_))
            ));
        }
    }

    /// Runs `script` (after it is put in `ceiling`) and says whether it
    /// succeeded.
    fn run_in(ceiling: &MemoryCeiling, script: &str) -> bool {
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(format!("read _ && {script}"))
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("sh runs");
        ceiling.add(child.id()).expect("child enters the ceiling");
        child.stdin.take().unwrap().write_all(b"go\n").unwrap();
        child.wait().unwrap().success()
    }

    #[test]
    fn a_process_past_the_ceiling_is_killed_and_named() {
        if let Err(why) = offered() {
            eprintln!("no memory cgroup here ({why}): nothing to check");
            return;
        }
        let name = format!("bulkhead-test-{}-over", std::process::id());
        let ceiling = MemoryCeiling::create(&name, 64 << 20).expect("ceiling");
        let dir = ceiling.path().to_owned();
        assert!(dir.is_dir());
        // `tail -c` keeps the whole stream it is fed in memory.
        let ok = run_in(&ceiling, "head -c 300M /dev/zero | tail -c 300M >/dev/null");
        assert!(!ok, "300 MiB fitted under a 64 MiB ceiling");
        assert!(ceiling.oom_killed(), "the kill is not seen");
        drop(ceiling);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }

    /// A cgroup left under a worker's name (a service stopped before it
    /// removed it, the pid since used again) is not taken over with its
    /// kill count: it is made anew; one still in use is refused.
    #[test]
    fn a_leftover_of_the_same_name_is_made_anew_never_taken_over() {
        if let Err(why) = offered() {
            eprintln!("no memory cgroup here ({why}): nothing to check");
            return;
        }
        let name = format!("bulkhead-test-{}-again", std::process::id());
        let first = MemoryCeiling::create(&name, 32 << 20).expect("ceiling");
        let dir = first.path().to_owned();
        assert!(!run_in(
            &first,
            "head -c 100M /dev/zero | tail -c 100M >/dev/null"
        ));
        assert!(first.oom_killed());
        // Left behind: not removed on drop.
        std::mem::forget(first);
        let second = MemoryCeiling::create(&name, 32 << 20).expect("made anew");
        assert_eq!(second.path(), dir);
        assert!(!second.oom_killed(), "the leftover's kill is counted again");
        // In use: refused, and left to its process.
        let mut held = Command::new("sh")
            .args(["-c", "read _"])
            .stdin(Stdio::piped())
            .spawn()
            .expect("sh runs");
        second.add(held.id()).expect("enters");
        std::mem::forget(second);
        assert!(matches!(
            MemoryCeiling::create(&name, 32 << 20),
            Err(CgroupError::Io { .. })
        ));
        drop(held.stdin.take());
        held.wait().unwrap();
        drop(MemoryCeiling::create(&name, 32 << 20).expect("made anew once empty"));
        assert!(!dir.exists(), "{} left behind", dir.display());
    }

    #[test]
    fn a_process_under_the_ceiling_runs() {
        if let Err(why) = offered() {
            eprintln!("no memory cgroup here ({why}): nothing to check");
            return;
        }
        let name = format!("bulkhead-test-{}-under", std::process::id());
        let ceiling = MemoryCeiling::create(&name, 64 << 20).expect("ceiling");
        let dir = ceiling.path().to_owned();
        let ok = run_in(&ceiling, "head -c 8M /dev/zero | tail -c 8M >/dev/null");
        assert!(ok, "8 MiB did not fit under a 64 MiB ceiling");
        assert!(!ceiling.oom_killed());
        // Its peak outlives what was held: the 8 MiB `tail` kept.
        if let Some(peak) = ceiling.peak() {
            assert!(peak >= 8 << 20, "peak {peak}");
        }
        let limit = match ceiling.version() {
            Version::V2 => "memory.max",
            Version::V1 => "memory.limit_in_bytes",
        };
        assert_eq!(
            fs::read_to_string(dir.join(limit)).unwrap().trim(),
            (64u64 << 20).to_string()
        );
        drop(ceiling);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }

    /// Field `i` of `/proc/<pid>/stat`, counted from the one after the
    /// command's name (the state is 0, the process group 2).
    fn stat_field(pid: u32, i: usize) -> Option<u64> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let (_, after) = stat.rsplit_once(')')?;
        after.split_whitespace().nth(i)?.parse().ok()
    }

    /// CPU time (user and system, in clock ticks) of process `pid`.
    fn cpu_ticks(pid: u32) -> u64 {
        stat_field(pid, 11).unwrap_or(0) + stat_field(pid, 12).unwrap_or(0)
    }

    /// A process of many busy threads under a share of one thread gets no
    /// more of the CPU than one busy process beside it in the gateway's own
    /// cgroup; without the share it would get about eight times as much.
    #[test]
    fn a_share_weighs_as_its_threads_however_many_it_runs() {
        if let Err(why) = cpu_offered() {
            eprintln!("no CPU cgroup here ({why}): nothing to check");
            return;
        }
        let name = format!("bulkhead-test-{}-share", std::process::id());
        let share = CpuShare::create(&name, 1, None).expect("share");
        let dir = share.path().expect("a cgroup of its own").to_owned();
        let weight = match share.version() {
            Version::V2 => ("cpu.weight", "100"),
            Version::V1 => ("cpu.shares", "1024"),
        };
        assert_eq!(
            fs::read_to_string(dir.join(weight.0)).unwrap().trim(),
            weight.1
        );
        // Eight busy processes, all started once the first is in.
        let mut burner = Command::new("sh")
            .arg("-c")
            .arg("read _ && for i in 1 2 3 4 5 6 7 8; do (while :; do :; done) & done; wait")
            .stdin(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("sh runs");
        share.add(burner.id()).expect("enters the share");
        let mut beside = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .spawn()
            .expect("sh runs");
        burner.stdin.take().unwrap().write_all(b"go\n").unwrap();
        // The burners counted by their process group, not by what the
        // cgroup lists: every process they started.
        let group = burner.id();
        let burned = || -> u64 {
            fs::read_dir("/proc")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                .filter(|pid| stat_field(*pid, 2) == Some(u64::from(group)))
                .map(cpu_ticks)
                .sum()
        };
        // SAFETY: sysconf reads a constant of the system.
        let tick = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).unwrap_or(100);
        // A window long enough for the scheduler's shares to show: until
        // the burners together have had two seconds of CPU.
        let start = (burned(), cpu_ticks(beside.id()));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while burned() - start.0 < 2 * tick && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(100));
        }
        let (inside, outside) = (burned() - start.0, cpu_ticks(beside.id()) - start.1);
        // What the share counts of its processes' CPU takes in every one
        // of them, not only the one put in: at least what they had in the
        // window.
        let used = share.used().expect("the share's CPU time reads");
        let group = i32::try_from(group).expect("a pid");
        // SAFETY: kill(2) of the burner's own process group, which it
        // leads (`process_group(0)`), and which holds only its shells.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        let _ = beside.kill();
        burner.wait().unwrap();
        beside.wait().unwrap();
        assert!(
            outside * 3 >= inside,
            "eight busy processes under a share of one thread took {inside} ticks, one beside them {outside}"
        );
        assert!(
            used >= Duration::from_millis(inside * 1000 / tick),
            "the share counted {used:?} of its processes' CPU, they had {inside} ticks"
        );
        drop(share);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}
