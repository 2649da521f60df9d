//! The second-wall drill: the first wall (WebAssembly) is assumed broken,
//! and native code attacks from inside a worker's compartment.
//!
//! The suite sets baits on the host (the gateway's keys, store, admin token
//! and config in a data directory; another job's and another zone's files;
//! listeners and datagram sockets on loopback; a secret in its own memory;
//! a signal counter), starts the drill with
//! [`bulkhead::worker::process::spawn_on_this_thread`], as the gateway
//! starts a worker but with the suite's thread as its parent, with [`WorkerArgs`] built as the gateway builds a zone's, and
//! the drill hardens itself with the worker's own function (`bulkhead
//! __second-wall-drill`, see [`inside`]). Then it attacks, and the suite
//! judges from what it sees on the host: bait bytes in the channel or the
//! work directory, bait files changed or read, listeners that accepted,
//! sockets that received, a marker a shell would have touched, its own
//! signal counter and tracer, and `/proc/<pid>` of the drill (namespaces,
//! credentials, flags, limits, descriptors, processes). What the drill
//! says is kept as a transcript, never as the verdict.
//!
//! The drill path is reached only by the escape suite: the subcommand is
//! hidden, takes a [`WorkerArgs`] and nothing else (no config file), and
//! the service never starts it. [`SuiteOptions::drill_weaken`], the only
//! way to leave a layer off, is set by the suite's self-test alone.

pub mod inside;
mod procfs;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime};

use crate::model::{
    Attack, AttackResult, Check, DrillAttack, DrillLine, DrillOrder, SuiteOptions, ms,
};
use bulkhead::worker::harden::{Applied, Layer, LayerState};
use bulkhead::worker::process::WorkerProcess;
use bulkhead::worker::{WorkerArgs, process};
use procfs::Snapshot;

/// The hidden subcommand the drill is started with (`bulkhead
/// __second-wall-drill <WorkerArgs as JSON>`).
pub const DRILL_SUBCOMMAND: &str = "__second-wall-drill";

/// The uid and gid a worker switches to when started as root.
const NOBODY: (u32, u32) = (65534, 65534);
/// The drill's bounds, as a zone's worker would have them.
const MAX_OPEN: u64 = 64;
const MAX_THREADS: u64 = 16;
/// How long the suite waits for a line of the drill.
const LINE_WAIT: Duration = Duration::from_secs(30);
/// How long a drill may outlive the thread that started it.
const OUTLIVE_WAIT: Duration = Duration::from_secs(5);

/// SIGUSR2 deliveries to this process (the gateway stand-in).
static SIGNALS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn count_signal(_: libc::c_int) {
    SIGNALS.fetch_add(1, Ordering::SeqCst);
}

fn install_signal_counter() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: the handler only touches an atomic; the struct is zeroed
        // and then filled as sigaction expects.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = count_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&raw mut sa.sa_mask);
            libc::sigaction(libc::SIGUSR2, &raw const sa, std::ptr::null_mut());
        }
    });
}

/// SIGUSR2 deliveries since the counter read `before`, once none is
/// pending any more (a signal the drill sent is queued before it reports
/// the attempt, but its handler runs a moment later, on some thread).
fn signals_since(before: usize) -> usize {
    let pending = || {
        let mask = 1u64 << (libc::SIGUSR2 - 1);
        procfs::status("self")
            .get("ShdPnd")
            .and_then(|v| u64::from_str_radix(v, 16).ok())
            .is_some_and(|p| p & mask != 0)
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    while pending() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    // Dequeued but not yet counted: the handler's first instruction.
    std::thread::sleep(Duration::from_millis(20));
    SIGNALS.load(Ordering::SeqCst) - before
}

fn is_root() -> bool {
    // SAFETY: no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn token() -> String {
    format!("BAIT-{}", uuid::Uuid::new_v4().simple())
}

/// The baits of one drill run, in a fresh area of the system's temporary
/// directory (every directory on the way must be one the unprivileged uid
/// may cross, so only the wall keeps it out).
struct Area {
    _dir: tempfile::TempDir,
    work: PathBuf,
    cache: PathBuf,
    /// The gateway's files: path -> contents.
    secrets: Vec<(PathBuf, Vec<u8>)>,
    /// Another job's and another zone's files: path -> contents.
    neighbours: Vec<(PathBuf, Vec<u8>)>,
    /// Directories the drill may not touch: path -> entries.
    dirs: Vec<(PathBuf, BTreeSet<String>)>,
    /// The artifacts in its zone's cache: path -> contents.
    cache_files: Vec<(PathBuf, Vec<u8>)>,
    /// Everything in its zone's cache, with owner and mode.
    cache_tree: BTreeSet<String>,
    marker: PathBuf,
    /// Every bait string.
    tokens: Vec<String>,
    /// The access time every bait file was set to.
    atime: SystemTime,
}

fn entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

impl Area {
    fn new() -> std::io::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("bulkhead-drill-")
            .tempdir_in(std::env::temp_dir())?;
        let root = dir.path().to_owned();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755))?;
        let atime = SystemTime::now() - Duration::from_secs(2 * 24 * 3600);
        let mut tokens = Vec::new();
        let mut plant =
            |path: PathBuf, mode: u32, what: &str| -> std::io::Result<(PathBuf, Vec<u8>)> {
                if let Some(parent) = path.parent() {
                    std::fs::create_dir_all(parent)?;
                }
                let t = token();
                let body = format!("{what}: {t}\n").into_bytes();
                tokens.push(t);
                std::fs::write(&path, &body)?;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
                let f = std::fs::OpenOptions::new().write(true).open(&path)?;
                f.set_times(std::fs::FileTimes::new().set_accessed(atime))?;
                Ok((path, body))
            };
        // The gateway's data directory: readable by anyone, as such files
        // often are, so only the wall keeps the worker out.
        let data = root.join("data");
        let secrets = vec![
            plant(data.join("keys/signing-ed25519.pem"), 0o644, "signing key")?,
            plant(data.join("bulkhead.db"), 0o644, "store")?,
            plant(data.join("admin.token"), 0o644, "admin token")?,
            plant(root.join("etc/bulkhead.toml"), 0o644, "config")?,
        ];
        // The zone's directories: this worker's, another worker's job, and
        // another zone's work and cache, open to every uid.
        let zone = root.join("zones/untrusted");
        let work = zone.join("work/worker-drill");
        let cache = zone.join("cache");
        let other_job = zone.join("work/worker-other/job-7");
        let other_zone = root.join("zones/first-party");
        let neighbours = vec![
            plant(other_job.join("input.txt"), 0o666, "another job's input")?,
            plant(
                other_zone.join("work/worker-1/job-3/out/result.json"),
                0o666,
                "another zone's output",
            )?,
            plant(
                other_zone.join("cache/module.cwasm"),
                0o666,
                "another zone's compiled module",
            )?,
        ];
        for d in [
            &data,
            &data.join("keys"),
            &root.join("etc"),
            &root.join("zones"),
            &zone,
            &zone.join("work"),
        ] {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))?;
        }
        let open_dirs = [
            zone.join("work/worker-other"),
            other_job.clone(),
            other_zone.clone(),
            other_zone.join("work"),
            other_zone.join("work/worker-1"),
            other_zone.join("work/worker-1/job-3"),
            other_zone.join("work/worker-1/job-3/out"),
            other_zone.join("cache"),
        ];
        for d in &open_dirs {
            std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777))?;
        }
        std::fs::create_dir_all(&work)?;
        std::fs::set_permissions(&work, std::fs::Permissions::from_mode(0o700))?;
        if is_root() {
            std::os::unix::fs::chown(&work, Some(NOBODY.0), Some(NOBODY.1))?;
        }
        // The zone's cache as a pool keeps it: the gateway's, shared with
        // the workers' group for reading (the same uid where not root),
        // with a recorded artifact in an engine's directory.
        let artifact = cache
            .join("0123456789abcdef")
            .join(format!("{}.cwasm", "ab".repeat(32)));
        std::fs::create_dir_all(artifact.parent().unwrap())?;
        let body = b"the zone's recorded native code".to_vec();
        std::fs::write(&artifact, &body)?;
        let (dir_mode, file_mode) = if is_root() {
            (0o750, 0o640)
        } else {
            (0o700, 0o600)
        };
        for (p, mode) in [
            (&cache, dir_mode),
            (&artifact.parent().unwrap().to_owned(), dir_mode),
            (&artifact, file_mode),
        ] {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))?;
            if is_root() {
                std::os::unix::fs::chown(p, None, Some(NOBODY.1))?;
            }
        }
        let cache_files = vec![(artifact, body)];
        let cache_tree = tree(&cache);
        let mut dirs: Vec<(PathBuf, BTreeSet<String>)> = open_dirs
            .iter()
            .chain([&data, &data.join("keys"), &root.join("etc")])
            .map(|d| (d.clone(), entries(d)))
            .collect();
        dirs.sort();
        Ok(Self {
            marker: work.join("shell-was-here"),
            _dir: dir,
            work,
            cache,
            secrets,
            neighbours,
            dirs,
            cache_files,
            cache_tree,
            tokens,
            atime,
        })
    }

    /// The worker's start arguments, as the gateway builds a zone's.
    fn worker_args(&self, weaken: &BTreeSet<Layer>) -> WorkerArgs {
        WorkerArgs {
            zone: "untrusted".to_owned(),
            // As a pool hands them over: descriptors 4 and 5.
            work_dir: PathBuf::from(format!("/proc/self/fd/{}", bulkhead::worker::WORK_FD)),
            cache_dir: PathBuf::from(format!("/proc/self/fd/{}", bulkhead::worker::CACHE_FD)),
            run_as: is_root().then_some(NOBODY),
            max_concurrent_jobs: 1,
            max_open: MAX_OPEN,
            max_threads: MAX_THREADS,
            give_back: false,
            weaken: weaken.clone(),
        }
    }
}

/// Listeners and sockets on loopback that must see nothing.
struct Net {
    /// `public`, `admin`, `bait service`.
    listeners: Vec<(&'static str, TcpListener)>,
    udp: UdpSocket,
    /// Bait resolvers: 127.0.0.1:53 when it could be bound, and one on a
    /// free port.
    dns: Vec<UdpSocket>,
}

impl Net {
    fn new() -> std::io::Result<Self> {
        let mut listeners = Vec::new();
        for name in ["public listener", "admin listener", "bait service"] {
            let l = TcpListener::bind("127.0.0.1:0")?;
            l.set_nonblocking(true)?;
            listeners.push((name, l));
        }
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        udp.set_nonblocking(true)?;
        let mut dns = Vec::new();
        for addr in ["127.0.0.1:53", "127.0.0.1:0"] {
            if let Ok(s) = UdpSocket::bind(addr) {
                s.set_nonblocking(true)?;
                dns.push(s);
            }
        }
        Ok(Self {
            listeners,
            udp,
            dns,
        })
    }

    fn port(s: &UdpSocket) -> u16 {
        s.local_addr().map_or(0, |a| a.port())
    }
}

/// Descriptors the gateway "forgot" to close, planted only for the
/// inherited-descriptors attack: a key file and a connection to the admin
/// listener (whose accepted end the suite reads afterwards).
struct Planted {
    file: std::fs::File,
    client: TcpStream,
    server: TcpStream,
    _listener: TcpListener,
}

impl Planted {
    fn new(key: &Path) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let client = TcpStream::connect(listener.local_addr()?)?;
        let (server, _) = listener.accept()?;
        server.set_nonblocking(true)?;
        Ok(Self {
            file: std::fs::File::open(key)?,
            client,
            server,
            _listener: listener,
        })
    }

    /// Makes the planted descriptors inheritable (`true`) or not.
    fn inheritable(&self, on: bool) {
        for fd in [self.file.as_raw_fd(), self.client.as_raw_fd()] {
            // SAFETY: fcntl on descriptors this owns.
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFD);
                let flags = if on {
                    flags & !libc::FD_CLOEXEC
                } else {
                    flags | libc::FD_CLOEXEC
                };
                libc::fcntl(fd, libc::F_SETFD, flags);
            }
        }
    }
}

/// Everything the host saw of one drill run.
#[derive(Default)]
struct Seen {
    pid: u32,
    applied: Option<Applied>,
    harden_failed: Option<String>,
    transcript: Vec<u8>,
    attempts: Vec<(String, String)>,
    /// The last call it announced.
    trying: Option<String>,
    done: bool,
    after_harden: Snapshot,
    after_attack: Snapshot,
    tree: Vec<(u32, u64)>,
    gateway_tracer: String,
    signals: usize,
    ended: String,
    outlived: Option<bool>,
    admin_received: usize,
    host_mounts_before: String,
    host_mounts_after: String,
}

/// Reads one line of the drill, recording it: `None` at the end of the
/// channel (or when the drill stops talking), `Some(None)` for a line that
/// is not the drill's (what it wrote on a descriptor it found may be).
fn next_line(
    reader: &mut BufReader<std::os::unix::net::UnixStream>,
    seen: &mut Seen,
) -> Option<Option<DrillLine>> {
    let mut line = Vec::new();
    match reader.read_until(b'\n', &mut line) {
        Ok(0) | Err(_) => None,
        Ok(_) => {
            seen.transcript.extend_from_slice(&line);
            Some(serde_json::from_slice(&line).ok())
        }
    }
}

/// Kills `child` and every process it started (descendants first, while
/// their ids are still held by their unreaped parents).
fn kill_tree(child: &mut WorkerProcess) {
    let pid = child.id();
    for (p, _) in procfs::tree(pid).into_iter().rev() {
        if p != pid {
            // SAFETY: a signal to a process the drill started.
            unsafe { libc::kill(i32::try_from(p).unwrap_or(i32::MAX), libc::SIGKILL) };
        }
    }
    let _ = child.kill();
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited {c}"),
        (_, Some(libc::SIGKILL)) => "killed (SIGKILL)".to_owned(),
        (_, Some(libc::SIGSYS)) => "killed by seccomp (SIGSYS)".to_owned(),
        (_, Some(s)) => format!("killed by signal {s}"),
        _ => "ended".to_owned(),
    }
}

/// One drill run, on the calling thread (which the drill's parent-death
/// signal is tied to). Returns what was seen and, for the outlive attack,
/// the still-running drill.
fn session(
    program: &Path,
    kind: DrillAttack,
    area: &Area,
    net: &Net,
    weaken: &BTreeSet<Layer>,
    secret: &[u8],
) -> Result<(Seen, Option<WorkerProcess>), String> {
    let args = area.worker_args(weaken);
    let planted = if kind == DrillAttack::Inherited {
        Some(
            Planted::new(&area.secrets[0].0)
                .map_err(|e| format!("cannot plant descriptors: {e}"))?,
        )
    } else {
        None
    };
    let mut seen = Seen {
        host_mounts_before: std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default(),
        ..Seen::default()
    };
    let signals_before = SIGNALS.load(Ordering::SeqCst);
    if let Some(p) = &planted {
        p.inheritable(true);
    }
    let dirs = (
        std::fs::File::open(&area.work),
        std::fs::File::open(&area.cache),
    );
    let (Ok(work), Ok(cache)) = dirs else {
        return Err("cannot open the drill's work and cache directories".into());
    };
    // Started with this thread as its parent, so that the thread's end
    // plays the gateway's death (the gateway starts its workers from a
    // thread that lives as long as it does, `process::spawn`).
    let spawned = process::spawn_on_this_thread(program, DRILL_SUBCOMMAND, &args, &[&work, &cache]);
    if let Some(p) = &planted {
        p.inheritable(false);
    }
    let process::Spawned { mut child, channel } =
        spawned.map_err(|e| format!("cannot start {}: {e}", program.display()))?;
    seen.pid = child.id();
    let result = talk(kind, area, net, secret, &mut seen, channel);
    if !seen.done {
        // It stopped talking: killed (seccomp kills a forbidden call),
        // replaced by what it ran, or stuck. Collect it if it ended, so
        // what the host reads next is of a live process or of none.
        let deadline = Instant::now() + OUTLIVE_WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                seen.ended = describe_exit(status);
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    if seen.ended.is_empty() {
        seen.tree = procfs::tree(seen.pid);
        seen.after_attack = procfs::snapshot(seen.pid);
    }
    seen.gateway_tracer = procfs::status("self")
        .get("TracerPid")
        .cloned()
        .unwrap_or_default();
    seen.signals = signals_since(signals_before);
    seen.host_mounts_after = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    if let Some(p) = &planted {
        let mut buf = [0u8; 4096];
        let mut server = &p.server;
        while let Ok(n) = server.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.admin_received += n;
        }
    }
    if let Err(e) = result {
        kill_tree(&mut child);
        let _ = child.wait();
        return Err(e);
    }
    if kind == DrillAttack::Outlive {
        return Ok((seen, Some(child)));
    }
    if !seen.ended.is_empty() {
    } else if let Ok(Some(status)) = child.try_wait() {
        seen.ended = describe_exit(status);
    } else {
        kill_tree(&mut child);
        let _ = child.wait();
    }
    Ok((seen, None))
}

fn talk(
    kind: DrillAttack,
    area: &Area,
    net: &Net,
    secret: &[u8],
    seen: &mut Seen,
    channel: std::os::unix::net::UnixStream,
) -> Result<(), String> {
    let io = |e: std::io::Error| format!("the drill's channel: {e}");
    channel.set_read_timeout(Some(LINE_WAIT)).map_err(io)?;
    let mut writer = channel.try_clone().map_err(io)?;
    let mut reader = BufReader::new(channel);
    match next_line(&mut reader, seen).flatten() {
        Some(DrillLine::Applied(a)) => seen.applied = Some(a),
        Some(DrillLine::HardenFailed(e)) => seen.harden_failed = Some(e),
        other => {
            return Err(format!(
                "the drill did not report its hardening (got {other:?}); is `{DRILL_SUBCOMMAND}` \
                 dispatched by this binary?"
            ));
        }
    }
    seen.after_harden = procfs::snapshot(seen.pid);
    let order = DrillOrder {
        attack: Some(kind),
        work_dir: area.work.clone(),
        secret_files: area.secrets.iter().map(|(p, _)| p.clone()).collect(),
        neighbour_files: area.neighbours.iter().map(|(p, _)| p.clone()).collect(),
        neighbour_dirs: area.dirs.iter().map(|(p, _)| p.clone()).collect(),
        zone_cache_dirs: {
            let handed = PathBuf::from(format!("/proc/self/fd/{}", bulkhead::worker::CACHE_FD));
            let engine = area.cache_files[0].0.parent().unwrap().to_owned();
            let rel = engine.strip_prefix(&area.cache).unwrap().to_owned();
            vec![area.cache.clone(), engine, handed.clone(), handed.join(rel)]
        },
        zone_cache_files: {
            let handed = PathBuf::from(format!("/proc/self/fd/{}", bulkhead::worker::CACHE_FD));
            area.cache_files
                .iter()
                .flat_map(|(p, _)| [p.clone(), handed.join(p.strip_prefix(&area.cache).unwrap())])
                .collect()
        },
        tcp_ports: net
            .listeners
            .iter()
            .map(|(_, l)| l.local_addr().map_or(0, |a| a.port()))
            .collect(),
        udp_ports: vec![Net::port(&net.udp)],
        dns_ports: net.dns.iter().map(Net::port).collect(),
        marker: area.marker.clone(),
        gateway_pid: std::process::id(),
        gateway_secret: (secret.as_ptr() as u64, secret.len() as u64),
        forks: u32::try_from(MAX_THREADS * 4).unwrap_or(64),
    };
    let mut text = serde_json::to_string(&order).map_err(|e| e.to_string())?;
    text.push('\n');
    writer.write_all(text.as_bytes()).map_err(io)?;
    while let Some(line) = next_line(&mut reader, seen) {
        match line {
            None => {}
            Some(DrillLine::Attempt { what, outcome, .. }) => {
                seen.trying = None;
                seen.attempts.push((what, outcome));
            }
            Some(DrillLine::Trying(what)) => seen.trying = Some(what),
            Some(DrillLine::Done) => {
                seen.done = true;
                break;
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// Runs one drill attack and judges it.
pub async fn run_local(
    options: &SuiteOptions,
    attack: &Attack,
    kind: DrillAttack,
    started: Instant,
) -> AttackResult {
    let program = match options
        .drill_program
        .clone()
        .map_or_else(std::env::current_exe, Ok)
    {
        Ok(p) => p,
        Err(e) => {
            return AttackResult::judge(
                attack,
                Vec::new(),
                String::new(),
                Some(format!("cannot find this binary: {e}")),
                ms(started),
            );
        }
    };
    let weaken = options.drill_weaken.clone();
    let judged = tokio::task::spawn_blocking(move || drill(&program, kind, &weaken)).await;
    match judged {
        Ok(Ok(j)) => AttackResult::judge(attack, j.checks, j.stopped_by, None, ms(started))
            .with_evidence(j.evidence)
            .unless_attempted(j.attempted, "the drill made no attempt the host could see"),
        Ok(Err(e)) => AttackResult::judge(attack, Vec::new(), String::new(), Some(e), ms(started)),
        Err(e) => AttackResult::judge(
            attack,
            Vec::new(),
            String::new(),
            Some(format!("the drill's thread failed: {e}")),
            ms(started),
        ),
    }
}

struct Judged {
    checks: Vec<Check>,
    stopped_by: String,
    evidence: String,
    attempted: bool,
}

fn drill(program: &Path, kind: DrillAttack, weaken: &BTreeSet<Layer>) -> Result<Judged, String> {
    install_signal_counter();
    let area = Area::new().map_err(|e| format!("cannot set up the baits: {e}"))?;
    let net = Net::new().map_err(|e| format!("cannot open the bait sockets: {e}"))?;
    let gateway_token = token();
    let secret: Vec<u8> = format!("gateway memory: {gateway_token}").into_bytes();
    let mut tokens = area.tokens.clone();
    tokens.push(gateway_token);
    // The session runs on a thread of its own: when it ends, the drill's
    // parent is gone, as if the gateway had died.
    let (seen, lingering) = std::thread::scope(|s| {
        s.spawn(|| session(program, kind, &area, &net, weaken, &secret))
            .join()
            .unwrap_or_else(|_| Err("the drill's session panicked".to_owned()))
    })?;
    let mut seen = seen;
    if let Some(mut child) = lingering {
        let deadline = Instant::now() + OUTLIVE_WAIT;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                seen.ended = describe_exit(status);
                seen.outlived = Some(false);
                break;
            }
            if Instant::now() > deadline {
                seen.outlived = Some(true);
                kill_tree(&mut child);
                let _ = child.wait();
                seen.ended = "still running; killed by the suite".to_owned();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    std::hint::black_box(&secret);
    Ok(judge(kind, &area, &net, &tokens, &seen))
}

/// Whether `layer` was reported unavailable on this host (then the check
/// of its state is not a breach, and says so).
fn unavailable(seen: &Seen, layer: Layer) -> Option<String> {
    match seen.applied.as_ref()?.layers.get(&layer)? {
        LayerState::Unavailable { reason } => Some(reason.clone()),
        _ => None,
    }
}

/// Every regular file under `dir` (not following links).
fn files_under(dir: &Path, out: &mut Vec<PathBuf>) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if meta.is_dir() {
                files_under(&e.path(), out);
            } else if meta.is_file() {
                out.push(e.path());
            }
        }
    }
}

/// Every entry below `dir`: its path below it, type, owner and mode.
fn tree(dir: &Path) -> BTreeSet<String> {
    use std::os::unix::fs::MetadataExt;
    let mut out = BTreeSet::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(meta) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            let rel = e
                .path()
                .strip_prefix(dir)
                .map(Path::to_owned)
                .unwrap_or_default();
            let kind = if meta.is_dir() {
                "directory"
            } else if meta.is_symlink() {
                "link"
            } else if meta.is_file() {
                "file"
            } else {
                "special"
            };
            out.insert(format!(
                "{} ({kind}, {}:{}, {:o}, {} bytes)",
                rel.display(),
                meta.uid(),
                meta.gid(),
                meta.mode() & 0o7777,
                meta.len()
            ));
            if meta.is_dir() {
                todo.push(e.path());
            }
        }
    }
    out
}

fn contains(hay: &[u8], needle: &str) -> bool {
    hay.windows(needle.len()).any(|w| w == needle.as_bytes())
}

fn loot_check(area: &Area, tokens: &[String], seen: &Seen) -> Check {
    let mut found = Vec::new();
    for t in tokens {
        if contains(&seen.transcript, t) {
            found.push("the channel".to_owned());
            break;
        }
    }
    let mut files = Vec::new();
    files_under(&area.work, &mut files);
    files_under(&area.cache, &mut files);
    for f in &files {
        let bytes = std::fs::read(f).unwrap_or_default();
        if tokens.iter().any(|t| contains(&bytes, t)) {
            found.push(f.display().to_string());
        }
    }
    if found.is_empty() {
        Check::new(
            "loot",
            true,
            format!(
                "no bait byte on the channel ({} bytes) or in the {} files of its work and cache dirs",
                seen.transcript.len(),
                files.len()
            ),
        )
    } else {
        Check::new(
            "loot",
            false,
            format!("bait bytes reached {}", found.join(", ")),
        )
    }
}

fn untouched_check(area: &Area, files: &[(PathBuf, Vec<u8>)]) -> Check {
    let mut bad = Vec::new();
    // Access times first: reading the contents below moves them.
    for (path, _) in files {
        match std::fs::metadata(path).and_then(|m| m.accessed()) {
            Ok(t) if t == area.atime => {}
            Ok(_) => bad.push(format!("{} was read (access time moved)", path.display())),
            Err(e) => bad.push(format!("{}: {e}", path.display())),
        }
    }
    for (path, body) in files {
        if std::fs::read(path).is_ok_and(|now| now != *body) {
            bad.push(format!("{} was changed", path.display()));
        }
    }
    for (dir, before) in &area.dirs {
        let now = entries(dir);
        if now != *before {
            let added: Vec<_> = now.difference(before).collect();
            let gone: Vec<_> = before.difference(&now).collect();
            bad.push(format!(
                "{}: added {added:?}, removed {gone:?}",
                dir.display()
            ));
        }
    }
    if bad.is_empty() {
        Check::new(
            "untouched",
            true,
            format!(
                "{} bait files unread (access times unmoved) and unchanged; {} bait directories unchanged",
                files.len(),
                area.dirs.len()
            ),
        )
    } else {
        Check::new("untouched", false, bad.join("; "))
    }
}

/// The drill as the host last saw it alive: after its attempts, or, when
/// it did not survive them, right after hardening (a dead process holds no
/// privilege, limit or namespace any more).
fn live(seen: &Seen) -> (&Snapshot, String) {
    if seen.after_attack.status.is_empty() {
        (
            &seen.after_harden,
            format!("right after hardening (then it was {})", seen.ended),
        )
    } else {
        (&seen.after_attack, "after the attempts".to_owned())
    }
}

fn field<'a>(s: &'a Snapshot, name: &str) -> &'a str {
    s.status.get(name).map_or("?", String::as_str)
}

/// `/proc/<pid>/limits` hard limit `name` is at most `bound`.
fn limit_at_most(s: &Snapshot, name: &str, bound: u64) -> Result<String, String> {
    match s.limits.get(name) {
        Some((soft, hard)) => {
            let ok = |v: &str| v.parse::<u64>().is_ok_and(|v| v <= bound);
            if ok(soft) && ok(hard) {
                Ok(format!("{name} {soft}/{hard}"))
            } else {
                Err(format!("{name} {soft}/{hard} (bound {bound})"))
            }
        }
        None => Err(format!("{name}: not found in /proc/<pid>/limits")),
    }
}

fn limits_check(seen: &Seen) -> Check {
    let (s, when) = live(seen);
    let results = [
        limit_at_most(s, "Max core file size", 0),
        limit_at_most(s, "Max open files", MAX_OPEN),
        limit_at_most(s, "Max processes", MAX_THREADS),
    ];
    let bad: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let all: Vec<String> = results
        .iter()
        .map(|r| r.clone().unwrap_or_else(|e| e))
        .collect();
    Check::new(
        "limits",
        bad.is_empty(),
        format!("/proc/{}/limits {when}: {}", seen.pid, all.join(", ")),
    )
}

fn namespace_checks(seen: &Seen) -> Vec<Check> {
    let before = &seen.after_harden.ns;
    let after = &seen.after_attack.ns;
    let dead = after.is_empty() && !seen.ended.is_empty();
    let changed: Vec<String> = if dead {
        Vec::new()
    } else {
        before
            .iter()
            .filter(|(k, v)| after.get(*k) != Some(*v))
            .map(|(k, v)| format!("{k}: {v} -> {}", after.get(k).map_or("?", String::as_str)))
            .collect()
    };
    let unchanged = Check::new(
        "namespaces",
        changed.is_empty() && !before.is_empty(),
        if before.is_empty() {
            "could not read /proc/<pid>/ns".to_owned()
        } else if changed.is_empty() {
            format!(
                "the drill's {} namespace links are those it had right after hardening",
                before.len()
            )
        } else {
            format!("namespaces changed after hardening: {}", changed.join(", "))
        },
    );
    let gateway = procfs::ns_links("self");
    let hardened = &seen.after_harden.ns;
    let mut shared = Vec::new();
    let mut excused = Vec::new();
    for (name, layer) in [
        ("user", Layer::UserNamespace),
        ("net", Layer::NetworkNamespace),
        ("ipc", Layer::IpcNamespace),
        ("mnt", Layer::MountNamespace),
    ] {
        if hardened.get(name).is_some() && hardened.get(name) == gateway.get(name) {
            match unavailable(seen, layer) {
                Some(why) => excused.push(format!("{name} (not offered here: {why})")),
                None => shared.push(name),
            }
        }
    }
    let separate = Check::new(
        "separate",
        shared.is_empty(),
        if shared.is_empty() {
            format!(
                "its user, net, ipc and mnt namespaces are not the gateway's{}",
                if excused.is_empty() {
                    String::new()
                } else {
                    format!(", except {}", excused.join(", "))
                }
            )
        } else {
            format!("it shares the gateway's {} namespace(s)", shared.join(", "))
        },
    );
    let mounts_same = seen.host_mounts_before == seen.host_mounts_after
        && (dead || seen.after_harden.mounts == seen.after_attack.mounts);
    let mounts = Check::new(
        "mounts",
        mounts_same,
        if mounts_same {
            "the gateway's mount table and the drill's are as they were".to_owned()
        } else {
            "a mount table changed during the attack".to_owned()
        },
    );
    vec![unchanged, separate, mounts]
}

fn privilege_checks(seen: &Seen) -> Vec<Check> {
    let (s, when) = live(seen);
    let mut checks = Vec::new();
    let uid = field(s, "Uid");
    let gid = field(s, "Gid");
    let root_start = is_root();
    let nonzero =
        |v: &str| v.split_whitespace().count() == 4 && v.split_whitespace().all(|u| u != "0");
    if root_start {
        let ok = nonzero(uid) && nonzero(gid);
        checks.push(Check::new(
            "uid",
            ok || unavailable(seen, Layer::Unprivileged).is_some(),
            format!("started as root; {when}: Uid {uid}, Gid {gid} (as the host sees them)"),
        ));
    } else {
        checks.push(Check::new(
            "uid",
            true,
            format!("started unprivileged; Uid {uid}, Gid {gid}"),
        ));
    }
    let caps: Vec<String> = ["CapEff", "CapPrm", "CapAmb"]
        .iter()
        .map(|c| format!("{c} {}", field(s, c)))
        .collect();
    let no_caps = ["CapEff", "CapPrm", "CapAmb"]
        .iter()
        .all(|c| field(s, c).chars().all(|ch| ch == '0'));
    checks.push(Check::new(
        "capabilities",
        no_caps,
        format!("{when}: {}", caps.join(", ")),
    ));
    let nnp = field(s, "NoNewPrivs");
    checks.push(Check::new(
        "no_new_privs",
        nnp == "1" || unavailable(seen, Layer::NoNewPrivs).is_some(),
        format!("{when}: NoNewPrivs {nnp}"),
    ));
    let sc = field(s, "Seccomp");
    checks.push(Check::new(
        "seccomp",
        sc == "2" || unavailable(seen, Layer::Seccomp).is_some(),
        format!("{when}: Seccomp {sc} (2: a filter is on)"),
    ));
    // Not dumpable: /proc/<pid>/mem then belongs to root, whatever its uid.
    let euid = uid.split_whitespace().nth(1).unwrap_or("?");
    let (ok, detail) = match s.owner {
        Some(0) if euid != "0" => (
            true,
            format!(
                "/proc/{}/mem is owned by root while it runs as uid {euid}: not dumpable",
                seen.pid
            ),
        ),
        Some(o) if euid != "0" => (
            unavailable(seen, Layer::NotDumpable).is_some(),
            format!(
                "{when}: /proc/{}/mem is owned by uid {o}, its own: dumpable",
                seen.pid
            ),
        ),
        Some(_) => (
            false,
            "it runs as root: cannot tell (and it should not)".to_owned(),
        ),
        None => (false, "could not stat /proc/<pid>".to_owned()),
    };
    checks.push(Check::new("dumpable", ok, detail));
    checks
}

fn judge(kind: DrillAttack, area: &Area, net: &Net, tokens: &[String], seen: &Seen) -> Judged {
    let mut checks = Vec::new();
    match kind {
        DrillAttack::Secrets => checks.push(untouched_check(area, &area.secrets)),
        DrillAttack::Neighbours => checks.push(untouched_check(area, &area.neighbours)),
        DrillAttack::ZoneCache => {
            let now = tree(&area.cache);
            let added: Vec<_> = now.difference(&area.cache_tree).collect();
            let gone: Vec<_> = area.cache_tree.difference(&now).collect();
            checks.push(Check::new(
                "cache unchanged",
                added.is_empty() && gone.is_empty(),
                if added.is_empty() && gone.is_empty() {
                    format!(
                        "{}: the same {} entries, owners and modes",
                        area.cache.display(),
                        now.len()
                    )
                } else {
                    format!("{}: now {added:?}; before {gone:?}", area.cache.display())
                },
            ));
            let changed: Vec<String> = area
                .cache_files
                .iter()
                .filter(|(p, body)| std::fs::read(p).ok().as_ref() != Some(body))
                .map(|(p, _)| p.display().to_string())
                .collect();
            checks.push(Check::new(
                "artifacts intact",
                changed.is_empty(),
                if changed.is_empty() {
                    format!("{} artifacts hold their bytes", area.cache_files.len())
                } else {
                    format!("changed or gone: {}", changed.join(", "))
                },
            ));
        }
        DrillAttack::Inherited => {
            // Standard streams on /dev/null, the channel, the worker's own
            // work and cache directories as a pool hands them over, its own
            // page map (opened by hardening's prepare step, without
            // privilege), and nothing else (a duplicate of the channel is
            // the drill's own).
            let fds = &seen.after_harden.fds;
            let own_page_map = format!("/proc/{}/pagemap", seen.pid);
            let channel = fds.get(&bulkhead::worker::CHANNEL_FD);
            let own_dir = |n: i32, t: &String| {
                (n == bulkhead::worker::WORK_FD && std::path::Path::new(t) == area.work)
                    || (n == bulkhead::worker::CACHE_FD && std::path::Path::new(t) == area.cache)
            };
            let expected = channel.is_some_and(|t| t.starts_with("socket:"))
                && (0..3).all(|n| fds.get(&n).is_some_and(|t| t == "/dev/null"))
                && fds.iter().all(|(n, t)| {
                    *n < 3 || Some(t) == channel || own_dir(*n, t) || *t == own_page_map
                });
            let listing: Vec<String> = fds.iter().map(|(n, t)| format!("{n} -> {t}")).collect();
            checks.push(Check::new(
                "descriptors",
                expected,
                format!(
                    "after hardening, /proc/{}/fd: {}",
                    seen.pid,
                    listing.join(", ")
                ),
            ));
            checks.push(Check::new(
                "admin connection",
                seen.admin_received == 0,
                format!(
                    "the admin listener's end of the planted connection received {} bytes",
                    seen.admin_received
                ),
            ));
        }
        DrillAttack::Connect => {
            let mut accepted = Vec::new();
            for (name, l) in &net.listeners {
                let mut n = 0;
                while l.accept().is_ok() {
                    n += 1;
                }
                if n > 0 {
                    accepted.push(format!("{name}: {n}"));
                }
            }
            checks.push(Check::new(
                "listeners",
                accepted.is_empty(),
                if accepted.is_empty() {
                    format!(
                        "none of the {} loopback listeners accepted a connection",
                        net.listeners.len()
                    )
                } else {
                    format!("connections accepted: {}", accepted.join(", "))
                },
            ));
        }
        DrillAttack::Udp | DrillAttack::Resolve => {
            let sockets: Vec<&UdpSocket> = if kind == DrillAttack::Udp {
                vec![&net.udp]
            } else {
                net.dns.iter().collect()
            };
            let mut got = 0;
            let mut buf = [0u8; 2048];
            for s in &sockets {
                while s.recv_from(&mut buf).is_ok() {
                    got += 1;
                }
            }
            let ports: Vec<String> = sockets.iter().map(|s| Net::port(s).to_string()).collect();
            checks.push(Check::new(
                if kind == DrillAttack::Udp {
                    "bait socket"
                } else {
                    "resolver"
                },
                got == 0,
                format!("{got} datagrams reached 127.0.0.1:{}", ports.join(", :")),
            ));
        }
        DrillAttack::Exec => {
            let there = area.marker.exists();
            checks.push(Check::new(
                "marker",
                !there,
                if there {
                    format!("{} appeared: a shell ran", area.marker.display())
                } else {
                    format!("{} never appeared", area.marker.display())
                },
            ));
        }
        DrillAttack::Gateway => {
            checks.push(Check::new(
                "signals",
                seen.signals == 0,
                format!("the gateway's SIGUSR2 counter moved by {}", seen.signals),
            ));
            checks.push(Check::new(
                "tracer",
                seen.gateway_tracer == "0",
                format!("the gateway's TracerPid: {}", seen.gateway_tracer),
            ));
        }
        DrillAttack::ForkBomb => {
            let total: u64 = seen.tree.iter().map(|(_, t)| t).sum();
            checks.push(Check::new(
                "processes",
                total <= MAX_THREADS,
                if seen.ended.is_empty() {
                    format!(
                        "the drill and what it started: {} processes, {total} threads (bound {MAX_THREADS})",
                        seen.tree.len()
                    )
                } else {
                    format!("the drill did not survive its attempts ({}); nothing of it is left", seen.ended)
                },
            ));
            checks.push(limits_check(seen));
        }
        DrillAttack::Rlimits => checks.push(limits_check(seen)),
        DrillAttack::Privileges => checks.extend(privilege_checks(seen)),
        DrillAttack::Namespaces => checks.extend(namespace_checks(seen)),
        DrillAttack::Outlive => {
            let outlived = seen.outlived.unwrap_or(true);
            checks.push(Check::new(
                "gateway",
                !outlived,
                if outlived {
                    format!(
                        "still running {}s after the thread that started it ended",
                        OUTLIVE_WAIT.as_secs()
                    )
                } else {
                    format!(
                        "gone once the thread that started it ended ({})",
                        seen.ended
                    )
                },
            ));
        }
    }
    checks.push(loot_check(area, tokens, seen));

    let layers = seen.applied.as_ref().map(|a| {
        let active = a
            .layers
            .values()
            .filter(|s| **s == LayerState::Active)
            .count();
        let off: Vec<String> = a
            .layers
            .iter()
            .filter(|(_, s)| **s != LayerState::Active)
            .map(|(l, s)| {
                format!(
                    "{l:?} {}",
                    match s {
                        LayerState::Off => "off".to_owned(),
                        LayerState::Unavailable { reason } => format!("unavailable ({reason})"),
                        LayerState::Active => String::new(),
                    }
                )
            })
            .collect();
        (active, a.layers.len(), off)
    });
    let stopped_by = match &layers {
        Some((active, total, _)) => {
            format!("{} ({active} of {total} layers active)", kind.layers())
        }
        None => format!(
            "{} (hardening failed: {})",
            kind.layers(),
            seen.harden_failed.as_deref().unwrap_or("?")
        ),
    };
    let refused = seen
        .attempts
        .iter()
        .filter(|(_, o)| o != "ok" && !o.starts_with("ok:"))
        .count();
    let sample: Vec<String> = seen
        .attempts
        .iter()
        .take(4)
        .map(|(w, o)| format!("{w}: {o}"))
        .collect();
    let not_active = layers.as_ref().map_or(String::new(), |(_, _, off)| {
        if off.is_empty() {
            String::new()
        } else {
            format!("; not active: {}", off.join(", "))
        }
    });
    let evidence = format!(
        "drill pid {} as uid {}{not_active}; it reported {} attempts ({refused} refused), e.g. {}; {}{}",
        seen.pid,
        field(&seen.after_harden, "Uid")
            .split_whitespace()
            .next()
            .unwrap_or("?"),
        seen.attempts.len(),
        if sample.is_empty() {
            "none".to_owned()
        } else {
            sample.join("; ")
        },
        if seen.done {
            "it finished"
        } else {
            "it never finished"
        },
        if seen.ended.is_empty() {
            String::new()
        } else {
            format!(", {}", seen.ended)
        },
    ) + &seen
        .trying
        .as_ref()
        .filter(|_| !seen.done)
        .map_or(String::new(), |t| format!(" while trying {t}"));
    // It tried something: an attempt reported, or one announced and then
    // cut short (seccomp kills the forbidden calls).
    let attempted = !seen.attempts.is_empty()
        || kind == DrillAttack::Outlive
        || (seen.trying.is_some() && !seen.ended.is_empty());
    Judged {
        checks,
        stopped_by,
        evidence,
        attempted,
    }
}
