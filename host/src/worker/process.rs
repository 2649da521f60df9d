//! Starting a worker process: the gateway's own binary, run with a
//! subcommand and its [`WorkerArgs`], its channel inherited as
//! [`CHANNEL_FD`], and nothing else of the gateway's: no environment, no
//! other descriptor, standard streams on `/dev/null`.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

use super::{CHANNEL_FD, WorkerArgs};

/// A started worker: its process and the gateway's end of its channel.
#[derive(Debug)]
pub struct Spawned {
    /// The process.
    pub child: WorkerProcess,
    /// The gateway's end of the channel (blocking; convert with
    /// `tokio::net::UnixStream::from_std` after `set_nonblocking(true)`).
    pub channel: UnixStream,
}

/// A worker process this process started, and reaps: its pid is never
/// signalled once reaped (it may be another process's by then).
#[derive(Debug)]
pub struct WorkerProcess {
    pid: libc::pid_t,
    status: Option<ExitStatus>,
}

impl WorkerProcess {
    /// Its process id.
    #[must_use]
    pub fn id(&self) -> u32 {
        self.pid.unsigned_abs()
    }

    /// Kills it (`SIGKILL`), unless it is reaped already.
    ///
    /// # Errors
    /// If the signal cannot be sent.
    pub fn kill(&mut self) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        // SAFETY: a signal to a child not yet reaped, so still this pid.
        if unsafe { libc::kill(self.pid, libc::SIGKILL) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits for it to end, and reaps it.
    ///
    /// # Errors
    /// If `waitpid` fails.
    pub fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.reap(0)? {
                return Ok(status);
            }
        }
    }

    /// Reaps it if it has ended.
    ///
    /// # Errors
    /// If `waitpid` fails.
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.reap(libc::WNOHANG)
    }

    fn reap(&mut self, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
        if let Some(status) = self.status {
            return Ok(Some(status));
        }
        let mut raw = 0;
        // SAFETY: waitpid writes the status to `raw`, a live c_int.
        match unsafe { libc::waitpid(self.pid, &raw mut raw, flags) } {
            0 => Ok(None),
            -1 => {
                let error = io::Error::last_os_error();
                if error.kind() == io::ErrorKind::Interrupted {
                    Ok(None)
                } else {
                    Err(error)
                }
            }
            _ => {
                let status = ExitStatus::from_raw(raw);
                self.status = Some(status);
                Ok(Some(status))
            }
        }
    }
}

/// The file actions and attributes of a [`spawn`], destroyed on drop.
struct SpawnSetup {
    actions: libc::posix_spawn_file_actions_t,
    attrs: libc::posix_spawnattr_t,
}

impl Drop for SpawnSetup {
    fn drop(&mut self) {
        // SAFETY: both were initialised by `SpawnSetup::new`.
        unsafe {
            libc::posix_spawn_file_actions_destroy(&raw mut self.actions);
            libc::posix_spawnattr_destroy(&raw mut self.attrs);
        }
    }
}

/// `posix_spawn`'s return: 0, or the error number.
fn spawn_result(code: libc::c_int) -> io::Result<()> {
    match code {
        0 => Ok(()),
        code => Err(io::Error::from_raw_os_error(code)),
    }
}

/// Starts `program subcommand <args as JSON>` with the worker's end of a
/// fresh socketpair as descriptor [`CHANNEL_FD`] and `dirs` (directories
/// the gateway opened for it) as the descriptors after it, in order
/// ([`WORK_FD`](super::WORK_FD), [`CACHE_FD`](super::CACHE_FD)). The
/// worker reaches its directories only through these, so no directory
/// above them needs to be open to its user. The environment is
/// empty (nothing of the gateway's, such as a token in a variable,
/// reaches a worker); the gateway's own descriptors are close-on-exec
/// (Rust opens everything so), and its signal mask and handlers are not
/// the worker's.
///
/// Started with `posix_spawn`, which shares the gateway's memory until
/// the exec (no copy of its page tables, and no copy-on-write faults on
/// its threads afterwards, as a `fork` of it costs; found in a profile of
/// workers replaced per job: a tenth of the gateway's time).
///
/// # Errors
/// If the socketpair or the process cannot be created.
pub fn spawn(
    program: &Path,
    subcommand: &str,
    args: &WorkerArgs,
    dirs: &[&std::fs::File],
) -> io::Result<Spawned> {
    let json = command_line(args, dirs)?;
    let (program, subcommand) = (program.to_owned(), subcommand.to_owned());
    let dirs = dirs
        .iter()
        .map(|d| d.try_clone())
        .collect::<io::Result<Vec<_>>>()?;
    on_spawner(move || {
        let dirs: Vec<&std::fs::File> = dirs.iter().collect();
        spawn_here(&program, &subcommand, &json, &dirs)
    })?
}

/// Runs `f` on the one thread workers are started from, which lives as
/// long as the process, and returns what it returned.
///
/// A worker dies with its parent (`PR_SET_PDEATHSIG`, the
/// `dies_with_gateway` layer), and its parent, to the kernel, is the
/// *thread* that started it, not the gateway's process: started from a
/// runtime's thread, a worker was killed when that thread ended (found by
/// a test: a thread of the pools' runtime that had once blocked in place
/// was ended by the runtime ten seconds after it went idle, and the
/// worker it had started was killed with it).
fn on_spawner<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
    type Task = Box<dyn FnOnce() + Send>;
    static SPAWNER: std::sync::OnceLock<Result<std::sync::mpsc::Sender<Task>, String>> =
        std::sync::OnceLock::new();
    let spawner = SPAWNER
        .get_or_init(|| {
            let (tx, rx) = std::sync::mpsc::channel::<Task>();
            std::thread::Builder::new()
                .name("bulkhead-spawner".into())
                .spawn(move || {
                    for task in rx {
                        task();
                    }
                })
                .map(|_| tx)
                .map_err(|e| format!("cannot start the thread workers are started from: {e}"))
        })
        .as_ref()
        .map_err(|e| io::Error::other(e.clone()))?;
    let (done, result) = std::sync::mpsc::sync_channel(1);
    spawner
        .send(Box::new(move || {
            let _ = done.send(f());
        }))
        .map_err(|_| io::Error::other("the thread workers are started from is gone"))?;
    result
        .recv()
        .map_err(|_| io::Error::other("the thread workers are started from is gone"))
}

/// [`spawn`], with the calling thread as the worker's parent: a worker
/// that has hardened itself dies when this thread ends. For the escape
/// suite's drill, which plays the gateway's death by ending the thread
/// that started it; the gateway starts its workers with [`spawn`].
///
/// # Errors
/// As [`spawn`].
pub fn spawn_on_this_thread(
    program: &Path,
    subcommand: &str,
    args: &WorkerArgs,
    dirs: &[&std::fs::File],
) -> io::Result<Spawned> {
    let json = command_line(args, dirs)?;
    spawn_here(program, subcommand, &json, dirs)
}

/// A worker's arguments as its command line carries them, once its
/// directories are known to fit the descriptors after its channel.
fn command_line(args: &WorkerArgs, dirs: &[&std::fs::File]) -> io::Result<String> {
    if dirs.len() > 7 {
        return Err(io::Error::other(
            "at most 7 directories can be handed to a worker",
        ));
    }
    serde_json::to_string(args).map_err(io::Error::other)
}

/// [`spawn`], on the calling thread: the worker's parent.
fn spawn_here(
    program: &Path,
    subcommand: &str,
    json: &str,
    dirs: &[&std::fs::File],
) -> io::Result<Spawned> {
    use std::os::fd::AsFd;
    let arg = |bytes: &[u8]| {
        CString::new(bytes).map_err(|_| io::Error::other("a worker's argument holds a NUL byte"))
    };
    let owned = [
        arg(program.as_os_str().as_bytes())?,
        arg(subcommand.as_bytes())?,
        arg(json.as_bytes())?,
    ];
    let mut argv: Vec<*mut libc::c_char> = owned.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv.push(std::ptr::null_mut());
    let envp: [*mut libc::c_char; 1] = [std::ptr::null_mut()];
    let (ours, theirs) = channel()?;
    let theirs: OwnedFd = theirs.into();
    // Each source is moved above every target first, so that no `dup2`
    // lands on a source still to be moved; the copies are close-on-exec,
    // and the targets, made by `dup2`, are not.
    let sources = std::iter::once(theirs.as_fd())
        .chain(dirs.iter().map(|d| d.as_fd()))
        .map(|fd| rustix::io::fcntl_dupfd_cloexec(fd, CHANNEL_FD + 8))
        .collect::<Result<Vec<OwnedFd>, _>>()?;
    let mut setup = SpawnSetup::new()?;
    let mut pid = 0;
    // SAFETY: every pointer handed over is to a live value of this
    // function (the actions and attributes initialised by
    // `SpawnSetup::new`, NUL-terminated strings in `owned`, and the
    // null-terminated `argv` and `envp`), and the descriptors named are
    // open until after `posix_spawn` returns.
    unsafe {
        let actions = &raw mut setup.actions;
        for (fd, flags) in [
            (0, libc::O_RDONLY),
            (1, libc::O_WRONLY),
            (2, libc::O_WRONLY),
        ] {
            spawn_result(libc::posix_spawn_file_actions_addopen(
                actions,
                fd,
                c"/dev/null".as_ptr(),
                flags,
                0,
            ))?;
        }
        for (i, fd) in (0..).zip(&sources) {
            spawn_result(libc::posix_spawn_file_actions_adddup2(
                actions,
                fd.as_raw_fd(),
                CHANNEL_FD + i,
            ))?;
        }
        // A descriptor the gateway itself inherited open across exec
        // reaches the worker too, which closes every descriptor but its
        // own as it hardens, before it reads a guest byte (the
        // `descriptors` layer, which the drill checks with such a
        // descriptor).
        // Every signal at its default, none blocked: what the gateway
        // ignores (`SIGPIPE`) or blocks is not the worker's. (glibc's
        // `posix_spawn` leaves its own two internal signals, 32 and 33,
        // ignored where the parent handles them: found by a tester.)
        let mut all = std::mem::zeroed::<libc::sigset_t>();
        libc::sigfillset(&raw mut all);
        let mut none = std::mem::zeroed::<libc::sigset_t>();
        libc::sigemptyset(&raw mut none);
        let attrs = &raw mut setup.attrs;
        spawn_result(libc::posix_spawnattr_setsigdefault(attrs, &raw const all))?;
        spawn_result(libc::posix_spawnattr_setsigmask(attrs, &raw const none))?;
        #[allow(clippy::cast_possible_truncation)]
        let flags = (libc::POSIX_SPAWN_SETSIGDEF | libc::POSIX_SPAWN_SETSIGMASK) as libc::c_short;
        spawn_result(libc::posix_spawnattr_setflags(attrs, flags))?;
        spawn_result(libc::posix_spawn(
            &raw mut pid,
            owned[0].as_ptr(),
            &raw const setup.actions,
            &raw const setup.attrs,
            argv.as_ptr(),
            envp.as_ptr(),
        ))?;
    }
    // The worker's end now lives only in the worker: when it dies, the
    // gateway's end reads end-of-file.
    drop(sources);
    drop(theirs);
    Ok(Spawned {
        child: WorkerProcess { pid, status: None },
        channel: ours,
    })
}

impl SpawnSetup {
    fn new() -> io::Result<Self> {
        // SAFETY: zeroed storage is what the init calls expect to fill.
        let mut setup: Self = unsafe { std::mem::zeroed() };
        // SAFETY: initialises the storage above; destroyed on drop (the
        // attributes only once they were initialised too).
        unsafe {
            spawn_result(libc::posix_spawn_file_actions_init(&raw mut setup.actions))?;
            if let Err(e) = spawn_result(libc::posix_spawnattr_init(&raw mut setup.attrs)) {
                libc::posix_spawn_file_actions_destroy(&raw mut setup.actions);
                std::mem::forget(setup);
                return Err(e);
            }
        }
        Ok(setup)
    }
}
/// `SO_PASSRIGHTS` (Linux 6.16 and later): off, a socket refuses
/// descriptors sent to it (`SCM_RIGHTS`), and the sender's `sendmsg` fails.
const SO_PASSRIGHTS: libc::c_int = 83;

/// A worker's channel: the gateway's end, then the worker's. The
/// gateway's end refuses descriptors where the kernel can (a worker that
/// sent one the gateway's reader never reached, its own end of the
/// channel, say, kept that end, and the frames waiting to be written to
/// it, alive after the worker was killed; found by an attacker). Where the
/// kernel cannot, a worker that is let go has its channel shut both ways,
/// which ends every write waiting on it.
///
/// # Errors
/// If the socketpair cannot be created, or the option is refused for
/// another reason than the kernel's not knowing it.
pub fn channel() -> io::Result<(UnixStream, UnixStream)> {
    let (ours, theirs) = UnixStream::pair()?;
    let off: libc::c_int = 0;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `&off`, a
    // live c_int, on a socket this function owns.
    let set = unsafe {
        libc::setsockopt(
            ours.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_PASSRIGHTS,
            std::ptr::from_ref(&off).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if set != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ENOPROTOOPT) {
            return Err(error);
        }
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            tracing::warn!("this kernel cannot make a worker's channel refuse descriptors (SO_PASSRIGHTS, Linux 6.16): a worker let go has its channel shut instead");
        });
    }
    Ok((ours, theirs))
}

/// The channel of a worker started by [`spawn`], taken over from
/// [`CHANNEL_FD`]; `None` when that descriptor is not a socket.
pub fn inherited_channel() -> Option<UnixStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: fstat on any descriptor number is sound; it fails on a
    // closed one.
    let mut stat = std::mem::MaybeUninit::<libc::stat>::zeroed();
    if unsafe { libc::fstat(CHANNEL_FD, stat.as_mut_ptr()) } != 0 {
        return None;
    }
    // SAFETY: fstat returned 0, so it filled `stat`.
    let stat = unsafe { stat.assume_init() };
    if stat.st_mode & libc::S_IFMT != libc::S_IFSOCK {
        return None;
    }
    // SAFETY: the descriptor is open and a socket, and nothing else in
    // this process owns it (it was inherited for this purpose).
    Some(unsafe { UnixStream::from_raw_fd(CHANNEL_FD) })
}

/// The CPU time process `pid` has used, all its threads together (those
/// gone included), with that of the children it has waited for:
/// `/proc/<pid>/stat`'s `utime`, `stime`, `cutime` and `cstime`. `None`
/// when there is no such process or its line does not read.
pub fn cpu_time(pid: u32) -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name, in brackets, may hold spaces and brackets of its
    // own: the fields are counted from after its last bracket, where the
    // third (the state) is.
    let (_, fields) = stat.rsplit_once(')')?;
    let ticks = fields
        .split_ascii_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse::<u64>().ok())
        .try_fold(0u64, |total, f| Some(total.saturating_add(f?)))?;
    let per_second = rustix::param::clock_ticks_per_second().max(1);
    Some(
        std::time::Duration::from_secs(ticks / per_second)
            + std::time::Duration::from_nanos((ticks % per_second) * 1_000_000_000 / per_second),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::mem::MaybeUninit;
    use std::os::fd::AsFd;

    /// A process's CPU time counts every thread of it: what a busy thread
    /// used shows in it as in `getrusage`'s count for the process.
    #[test]
    fn a_processs_cpu_time_counts_all_its_threads() {
        let before = cpu_time(std::process::id()).expect("this process's CPU time reads");
        std::thread::spawn(|| {
            let start = rusage_self();
            while rusage_self().saturating_sub(start) < std::time::Duration::from_millis(300) {
                std::hint::spin_loop();
            }
        })
        .join()
        .unwrap();
        let (after, rusage) = (cpu_time(std::process::id()).unwrap(), rusage_self());
        assert!(
            after.saturating_sub(before) >= std::time::Duration::from_millis(250),
            "a thread's 300 ms of CPU counted as {:?}",
            after - before
        );
        // Within a few of `/proc`'s ticks of the kernel's own count.
        let apart = rusage.abs_diff(after);
        assert!(
            apart < std::time::Duration::from_millis(100),
            "{after:?} against getrusage's {rusage:?}"
        );
    }

    /// This process's CPU time by `getrusage`, user and system, with that
    /// of the children it has waited for (other tests start some).
    fn rusage_self() -> std::time::Duration {
        let of = |who| {
            let mut usage = MaybeUninit::<libc::rusage>::zeroed();
            // SAFETY: getrusage(2) fills the `rusage` it is given.
            assert_eq!(unsafe { libc::getrusage(who, usage.as_mut_ptr()) }, 0);
            // SAFETY: it returned 0, so it filled `usage`.
            let usage = unsafe { usage.assume_init() };
            let time = |t: libc::timeval| {
                std::time::Duration::from_secs(t.tv_sec.unsigned_abs())
                    + std::time::Duration::from_micros(t.tv_usec.unsigned_abs())
            };
            time(usage.ru_utime) + time(usage.ru_stime)
        };
        of(libc::RUSAGE_SELF) + of(libc::RUSAGE_CHILDREN)
    }

    /// A worker that dies with its parent (`PR_SET_PDEATHSIG`, set here by
    /// `setpriv` as the worker's hardening sets it) outlives the thread
    /// that asked for it: its parent is the thread workers are started
    /// from, which lives as long as the process.
    #[test]
    fn a_worker_outlives_the_thread_that_asked_for_it() {
        use std::os::unix::fs::PermissionsExt as _;
        let tmp = tempfile::tempdir().unwrap();
        let ready = tmp.path().join("ready");
        let program = tmp.path().join("worker");
        std::fs::write(
            &program,
            format!(
                "#!/bin/sh\nexec setpriv --pdeathsig KILL sh -c 'touch {}; exec sleep 60'\n",
                ready.display()
            ),
        )
        .unwrap();
        std::fs::set_permissions(&program, std::fs::Permissions::from_mode(0o755)).unwrap();
        let args = WorkerArgs {
            zone: "z".into(),
            work_dir: "/".into(),
            cache_dir: "/".into(),
            run_as: None,
            max_concurrent_jobs: 1,
            max_open: 64,
            max_threads: 64,
            give_back: false,
            weaken: std::collections::BTreeSet::new(),
        };
        let seen = ready.clone();
        // Ends once the worker is past its prctl.
        let asker = std::thread::spawn(move || {
            let spawned = spawn(&program, "worker", &args, &[]).unwrap();
            for _ in 0..2000 {
                if seen.exists() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            // SAFETY: gettid has no arguments and cannot fail.
            (spawned, unsafe { libc::gettid() })
        });
        let (mut spawned, tid) = asker.join().unwrap();
        assert!(ready.exists(), "the worker never started");
        // The asking thread wholly gone.
        let task = format!("/proc/self/task/{tid}");
        for _ in 0..2000 {
            if !Path::new(&task).exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(!Path::new(&task).exists(), "the asking thread lives on");
        // A parent-death signal would have come as the thread ended.
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(
            spawned.child.try_wait().unwrap(),
            None,
            "the worker died with the thread that asked for it"
        );
        spawned.child.kill().unwrap();
        spawned.child.wait().unwrap();
    }

    #[test]
    fn the_gateways_end_of_a_channel_refuses_descriptors() {
        let (mut ours, mut theirs) = channel().unwrap();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
        let fds = [theirs.as_fd()];
        assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)));
        let sent = rustix::net::sendmsg(
            &theirs,
            &[io::IoSlice::new(b"x")],
            &mut control,
            rustix::net::SendFlags::empty(),
        );
        assert_eq!(sent, Err(rustix::io::Errno::PERM), "a descriptor was taken");
        // Bytes alone go as ever.
        theirs.write_all(b"frame").unwrap();
        let mut got = [0; 5];
        ours.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"frame");
    }
}
