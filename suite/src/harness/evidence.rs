//! Host-side evidence. Nothing here believes the guest: each observation
//! comes from the host's own view of files, descriptors, sockets and memory.
//!
//! - [`Canary`]: secret files outside every job directory, under an
//!   inotify watch (any open, read, write, attribute change, creation or
//!   deletion in their directory is seen) and with their metadata and
//!   digest compared after every attack.
//! - [`Sampler`]: a thread that samples this process's open descriptors,
//!   sockets and resident memory while an attack runs.
//! - [`Bait`]: a TCP listener and a UDP socket on loopback whose port the
//!   network attacks are given; anything arriving there is a breach.
//! - [`disk_usage`] and [`find_secret`]: what `/out` holds on the host
//!   and whether a secret made it into anything the job produced.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sha2::{Digest, Sha256};

/// Canary files planted outside every job directory, and a watch on them.
#[derive(Debug)]
pub struct Canary {
    dir: PathBuf,
    files: Vec<(PathBuf, Vec<u8>, Stat)>,
    inotify: Option<OwnedFd>,
    /// The secret written in the canary file.
    pub secret: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Stat {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    mode: u32,
    nlink: u64,
}

fn stat(path: &Path) -> io::Result<Stat> {
    let m = std::fs::symlink_metadata(path)?;
    Ok(Stat {
        ino: m.ino(),
        size: m.size(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
        mode: m.mode(),
        nlink: m.nlink(),
    })
}

/// A fresh random string, for secrets and canaries.
pub fn random_token(prefix: &str) -> String {
    format!("{prefix}-{}", hex::encode(rand::random::<[u8; 12]>()))
}

impl Canary {
    /// Plants `secret.txt` (a secret) and `notes/keys.txt` in `dir` and
    /// starts watching both directories. Without inotify (not Linux, or no
    /// watches left) the metadata and digest comparisons still run.
    ///
    /// # Errors
    /// If the files cannot be written.
    pub fn plant(dir: &Path) -> io::Result<Self> {
        let secret = random_token("BULKHEAD-CANARY");
        bulkhead::sandbox::create_private_dir_all(&dir.join("notes"))?;
        let mut files = Vec::new();
        for (name, body) in [
            ("secret.txt", format!("{secret}\n")),
            ("notes/keys.txt", format!("api_key={secret}\n")),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, body.as_bytes())?;
            let st = stat(&path)?;
            files.push((path, body.into_bytes(), st));
        }
        let inotify = watch(&[dir.to_owned(), dir.join("notes")]).ok();
        Ok(Self {
            dir: dir.to_owned(),
            files,
            inotify,
            secret,
        })
    }

    /// The canary file's absolute path.
    pub fn file(&self) -> &Path {
        &self.files[0].0
    }

    /// The canary directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether an inotify watch is active.
    pub fn watched(&self) -> bool {
        self.inotify.is_some()
    }

    /// What happened to the canaries since the last call: inotify events
    /// (drained), and metadata changes. Empty means untouched. Reads no
    /// canary content, so it causes no event itself.
    pub fn touched(&self) -> Vec<String> {
        let mut seen = match &self.inotify {
            Some(fd) => drain(fd),
            None => Vec::new(),
        };
        for (path, _, before) in &self.files {
            match stat(path) {
                Ok(now) if &now == before => {}
                Ok(_) => seen.push(format!("{} changed (metadata)", path.display())),
                Err(e) => seen.push(format!("{}: {e}", path.display())),
            }
        }
        seen
    }

    /// Compares every canary's content with what was planted (after the
    /// last attack: reading them raises events of its own).
    pub fn content_changed(&self) -> Vec<String> {
        self.files
            .iter()
            .filter(|(path, body, _)| std::fs::read(path).ok().as_ref() != Some(body))
            .map(|(path, _, _)| format!("{} content changed", path.display()))
            .collect()
    }
}

const WATCH_MASK: u32 = libc::IN_ACCESS
    | libc::IN_MODIFY
    | libc::IN_ATTRIB
    | libc::IN_OPEN
    | libc::IN_CLOSE_WRITE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_CREATE
    | libc::IN_DELETE
    | libc::IN_DELETE_SELF
    | libc::IN_MOVE_SELF;

fn watch(dirs: &[PathBuf]) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor we own.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    for dir in dirs {
        let c = CString::new(dir.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
        // SAFETY: `c` is a valid NUL-terminated path for the call.
        if unsafe { libc::inotify_add_watch(owned.as_raw_fd(), c.as_ptr(), WATCH_MASK) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(owned)
}

fn drain(fd: &OwnedFd) -> Vec<String> {
    let mut events = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        // SAFETY: `buf` is valid for `buf.len()` bytes.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        let mut at = 0usize;
        let header = std::mem::size_of::<libc::inotify_event>();
        while at + header <= n as usize {
            // SAFETY: the kernel wrote a whole event header at `at`.
            let ev: libc::inotify_event =
                unsafe { std::ptr::read_unaligned(buf.as_ptr().add(at).cast()) };
            let name_bytes = &buf[at + header..at + header + ev.len as usize];
            let name = String::from_utf8_lossy(name_bytes)
                .trim_end_matches('\0')
                .to_owned();
            events.push(format!(
                "inotify {} on {}",
                event_names(ev.mask),
                if name.is_empty() {
                    "the canary directory"
                } else {
                    &name
                }
            ));
            at += header + ev.len as usize;
        }
    }
    events
}

fn event_names(mask: u32) -> String {
    let names = [
        (libc::IN_ACCESS, "read"),
        (libc::IN_MODIFY, "write"),
        (libc::IN_ATTRIB, "attrib"),
        (libc::IN_OPEN, "open"),
        (libc::IN_CLOSE_WRITE, "close-write"),
        (libc::IN_MOVED_FROM, "moved-from"),
        (libc::IN_MOVED_TO, "moved-to"),
        (libc::IN_CREATE, "create"),
        (libc::IN_DELETE, "delete"),
        (libc::IN_DELETE_SELF, "delete-self"),
        (libc::IN_MOVE_SELF, "move-self"),
        (libc::IN_ISDIR, "dir"),
    ];
    names
        .iter()
        .filter(|(bit, _)| mask & bit != 0)
        .map(|(_, n)| *n)
        .collect::<Vec<_>>()
        .join("+")
}

/// What [`Sampler`] saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Peaks {
    /// Open descriptors before the attack.
    pub fds_before: usize,
    /// Most open descriptors while it ran.
    pub fds_peak: usize,
    /// Open descriptors after it.
    pub fds_after: usize,
    /// Sockets held before.
    pub sockets_before: usize,
    /// Most sockets held while it ran.
    pub sockets_peak: usize,
    /// Resident memory before, in bytes.
    pub rss_before: u64,
    /// Most resident memory while it ran.
    pub rss_peak: u64,
    /// A worker process's descriptors or memory could not be read: the
    /// counts above miss it.
    pub blind: bool,
}

/// The worker processes whose descriptors and memory count as the host's
/// besides this process's (asked again at each sample: a faulted worker is
/// replaced).
pub type Pids = Arc<dyn Fn() -> Vec<u32> + Send + Sync>;

/// One sample of this process and `pids`: open descriptors, sockets,
/// resident memory, and whether a live worker could not be read.
pub fn sample(pids: &[u32]) -> (usize, usize, u64, bool) {
    let (mut fds, mut sockets) = open_fds();
    let mut resident = rss();
    let mut blind = false;
    for pid in pids {
        let gone = || !Path::new(&format!("/proc/{pid}")).exists();
        match (
            fds_of(&format!("/proc/{pid}/fd")),
            rss_of(&format!("/proc/{pid}/statm")),
        ) {
            (Some((f, s)), Some(r)) => {
                fds += f;
                sockets += s;
                resident += r;
            }
            _ => blind |= !gone(),
        }
    }
    (fds, sockets, resident, blind)
}

/// Samples this process's descriptors, sockets and resident memory (and
/// those of the worker processes it is given) on a thread of its own every
/// few milliseconds until stopped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<Peaks>>,
    pids: Option<Pids>,
}

impl std::fmt::Debug for Sampler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sampler").finish_non_exhaustive()
    }
}

/// Open descriptors of this process and how many are sockets.
pub fn open_fds() -> (usize, usize) {
    fds_of("/proc/self/fd").unwrap_or((0, 0))
}

/// Open descriptors and sockets listed in `dir` (a `/proc/<pid>/fd`).
fn fds_of(dir: &str) -> Option<(usize, usize)> {
    let entries = std::fs::read_dir(dir).ok()?;
    let mut fds = 0;
    let mut sockets = 0;
    for entry in entries.flatten() {
        fds += 1;
        if std::fs::read_link(entry.path())
            .is_ok_and(|t| t.as_os_str().as_encoded_bytes().starts_with(b"socket:"))
        {
            sockets += 1;
        }
    }
    Some((fds, sockets))
}

/// This process's soft limit on open descriptors.
pub fn fd_soft_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid out-pointer for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
    } else {
        usize::MAX
    }
}

/// Resident memory of this process, in bytes.
pub fn rss() -> u64 {
    rss_of("/proc/self/statm").unwrap_or(0)
}

/// Resident memory of the process whose `statm` is at `path`.
fn rss_of(path: &str) -> Option<u64> {
    let text = std::fs::read_to_string(path).ok()?;
    // SAFETY: `sysconf` has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as u64;
    text.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse::<u64>().ok())
        .map(|pages| pages * page)
}

impl Sampler {
    /// Takes the "before" sample of this process and starts sampling.
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// As [`Sampler::start`], counting the worker processes `pids` names
    /// as part of the host.
    pub fn start_with(pids: Option<Pids>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let now = {
            let pids = pids.clone();
            move || sample(&pids.as_ref().map(|p| p()).unwrap_or_default())
        };
        let (fds, sockets, resident, blind) = now();
        let mut peaks = Peaks {
            fds_before: fds,
            fds_peak: fds,
            sockets_before: sockets,
            sockets_peak: sockets,
            rss_before: resident,
            rss_peak: resident,
            blind,
            ..Peaks::default()
        };
        let thread = std::thread::Builder::new()
            .name("bulkhead-suite-sampler".into())
            .spawn(move || {
                loop {
                    let (fds, sockets, resident, blind) = now();
                    peaks.fds_peak = peaks.fds_peak.max(fds);
                    peaks.sockets_peak = peaks.sockets_peak.max(sockets);
                    peaks.rss_peak = peaks.rss_peak.max(resident);
                    peaks.blind |= blind;
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(3));
                }
                peaks
            })
            .ok();
        Self { stop, thread, pids }
    }

    /// Stops sampling and takes the "after" sample.
    pub fn stop(mut self) -> Peaks {
        self.stop.store(true, Ordering::SeqCst);
        let mut peaks = self
            .thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        let (fds, _, _, blind) = sample(&self.pids.as_ref().map(|p| p()).unwrap_or_default());
        peaks.fds_after = fds;
        peaks.blind |= blind;
        peaks
    }
}

/// A TCP listener and UDP sockets on loopback that no guest may reach.
#[derive(Debug)]
pub struct Bait {
    tcp: std::net::TcpListener,
    udp: Vec<std::net::UdpSocket>,
    /// The port, the same for TCP and UDP where the host allows it.
    pub port: u16,
}

impl Bait {
    /// Opens the sockets (non-blocking).
    ///
    /// # Errors
    /// If loopback is unavailable.
    pub fn open() -> io::Result<Self> {
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")?;
        tcp.set_nonblocking(true)?;
        let port = tcp.local_addr()?.port();
        let mut udp = Vec::new();
        for addr in [format!("127.0.0.1:{port}"), format!("[::1]:{port}")] {
            if let Ok(s) = std::net::UdpSocket::bind(&addr) {
                s.set_nonblocking(true)?;
                udp.push(s);
            }
        }
        Ok(Self { tcp, udp, port })
    }

    /// Anything that arrived since the last call (and drains it).
    pub fn touched(&self) -> Vec<String> {
        let mut seen = Vec::new();
        while let Ok((_, from)) = self.tcp.accept() {
            seen.push(format!(
                "a TCP connection from {from} reached the bait listener"
            ));
        }
        let mut buf = [0u8; 512];
        for s in &self.udp {
            while let Ok((n, from)) = s.recv_from(&mut buf) {
                seen.push(format!(
                    "a {n}-byte UDP datagram from {from} reached the bait socket"
                ));
            }
        }
        seen
    }
}

/// Calls `visit(relative name, metadata)` for every entry under `dir`,
/// walking by directory handle (`openat`, never following a link), so a
/// tree whose paths are longer than `PATH_MAX` is seen whole.
fn walk_by_handle(dir: &Path, visit: &mut dyn FnMut(&str, &cap_std::fs::Metadata)) {
    use cap_fs_ext::DirExt;
    fn walk(
        dir: &cap_std::fs::Dir,
        prefix: &str,
        visit: &mut dyn FnMut(&str, &cap_std::fs::Metadata),
    ) {
        let Ok(list) = dir.entries() else {
            return;
        };
        for e in list.flatten() {
            let name = format!("{prefix}{}", e.file_name().to_string_lossy());
            let Ok(meta) = e.metadata() else {
                continue;
            };
            visit(&name, &meta);
            if meta.is_dir()
                && let Ok(sub) = dir.open_dir_nofollow(e.file_name())
            {
                walk(&sub, &format!("{name}/"), visit);
            }
        }
    }
    if let Ok(root) = cap_std::fs::Dir::open_ambient_dir(dir, cap_std::ambient_authority()) {
        walk(&root, "", visit);
    }
}

/// File bytes and entries under `dir`, counted with `lstat` (never
/// following links); a sparse file counts at its full length.
pub fn disk_usage(dir: &Path) -> (u64, u64) {
    use cap_std::fs::MetadataExt as _;
    let mut bytes = 0;
    let mut entries = 0;
    walk_by_handle(dir, &mut |_, meta| {
        entries += 1;
        if !meta.is_dir() {
            bytes += meta.len().max(meta.blocks() * 512);
        }
    });
    (bytes, entries)
}

/// Symlinks and other non-regular entries under `dir`, by relative path,
/// seen with `lstat`.
pub fn special_entries(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    walk_by_handle(dir, &mut |name, meta| {
        if !meta.is_dir() && !meta.is_file() {
            found.push(name.to_owned());
        }
    });
    found.sort();
    found
}

/// SHA-256 of every file under `dir`, by relative name (regular files only).
pub fn tree_digest(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Ok(list) = std::fs::read_dir(dir) {
        for e in list.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let digest = std::fs::symlink_metadata(e.path())
                .ok()
                .filter(|m| m.is_file())
                .and_then(|_| std::fs::File::open(e.path()).ok())
                .and_then(|mut f| {
                    let mut data = Vec::new();
                    f.read_to_end(&mut data).ok()?;
                    Some(hex::encode(Sha256::digest(&data)))
                })
                .unwrap_or_else(|| "not a regular file".to_owned());
            out.insert(name, digest);
        }
    }
    out
}

/// Which of `secrets` occur in `hay`, by their labels.
pub fn find_secret<'a>(hay: &[u8], secrets: &'a [(String, Vec<u8>)]) -> Vec<&'a str> {
    secrets
        .iter()
        .filter(|(_, s)| !s.is_empty() && hay.windows(s.len()).any(|w| w == s.as_slice()))
        .map(|(label, _)| label.as_str())
        .collect()
}

/// Host secrets a guest must never see: the values of this process's
/// environment (those long enough to be meaningful) and the first line of
/// `/etc/passwd`, which every `..` escape reaches for.
pub fn host_secrets() -> Vec<(String, Vec<u8>)> {
    let mut secrets = Vec::new();
    for (key, value) in std::env::vars_os() {
        let value = value.as_encoded_bytes();
        // Short or common values ("1", "C", paths like "/bin") would match
        // by accident; a secret is long and specific.
        if value.len() >= 12 {
            secrets.push((
                format!("host environment variable {}", key.to_string_lossy()),
                value.to_vec(),
            ));
        }
    }
    if let Ok(passwd) = std::fs::read_to_string("/etc/passwd")
        && let Some(first) = passwd.lines().next()
        && first.len() >= 8
    {
        secrets.push(("/etc/passwd".to_owned(), first.as_bytes().to_vec()));
    }
    secrets
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workers_descriptors_and_memory_count_as_the_hosts() {
        // A child process holding descriptors of its own: sampled with its
        // pid, they are counted; a pid that is gone is not a blind spot.
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let pid = child.id();
        let (alone, _, rss_alone, _) = sample(&[]);
        let (with, _, rss_with, blind) = sample(&[pid]);
        assert!(!blind);
        assert!(with >= alone + 2, "{alone} alone, {with} with the child");
        assert!(rss_with > rss_alone);
        child.kill().unwrap();
        child.wait().unwrap();
        let (_, _, _, blind) = sample(&[pid]);
        assert!(!blind, "a reaped worker is no blind spot");
    }
}
