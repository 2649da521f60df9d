//! The layers that are a few system calls each, and their checks.

use std::io;
use std::os::fd::RawFd;

use super::{DEFAULT_RUN_AS, HardenError, Layer, LayerState};

fn errno() -> io::Error {
    io::Error::last_os_error()
}

fn fail(layer: Layer, what: &str) -> HardenError {
    HardenError::new(layer, format!("{what}: {}", errno()))
}

/// The calling process's threads, from `/proc/self/status`.
pub(super) fn thread_count() -> Option<u64> {
    status_field("Threads")?.parse().ok()
}

/// One field of `/proc/self/status`.
pub(super) fn status_field(name: &str) -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        (key == name).then(|| value.trim().to_owned())
    })
}

pub(super) fn getppid() -> libc::pid_t {
    // SAFETY: no preconditions.
    unsafe { libc::getppid() }
}

/// 0, 1 and 2 onto `/dev/null`; every other descriptor but `channel`
/// closed; then checked in `/proc/self/fd`.
pub(super) fn descriptors(
    channel: Option<RawFd>,
    also: &[RawFd],
) -> Result<LayerState, HardenError> {
    let layer = Layer::Descriptors;
    // SAFETY: a valid C string; the result is checked.
    let null = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if null < 0 {
        return Err(fail(layer, "opening /dev/null"));
    }
    for fd in 0..=2 {
        if fd != null {
            // SAFETY: both descriptors are valid; dup2 clears O_CLOEXEC.
            if unsafe { libc::dup2(null, fd) } < 0 {
                return Err(fail(
                    layer,
                    &format!("pointing descriptor {fd} to /dev/null"),
                ));
            }
        }
    }
    let mut keep: Vec<RawFd> = channel
        .into_iter()
        .chain(also.iter().copied())
        .filter(|&c| c > 2)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    // Close [3, u32::MAX] minus the kept descriptor.
    let mut from: u32 = 3;
    for &k in &keep {
        let k = k.unsigned_abs();
        if k > from {
            close_range(from, k - 1).map_err(|e| HardenError::new(layer, e))?;
        }
        from = k + 1;
    }
    close_range(from, u32::MAX).map_err(|e| HardenError::new(layer, e))?;

    let mut open = open_descriptors().map_err(|e| HardenError::new(layer, e))?;
    open.sort_unstable();
    let mut expected = vec![0, 1, 2];
    expected.extend(&keep);
    expected.sort_unstable();
    if open != expected {
        return Err(HardenError::new(
            layer,
            format!("descriptors {open:?} are open, expected only {expected:?}"),
        ));
    }
    Ok(LayerState::Active)
}

fn close_range(first: u32, last: u32) -> Result<(), String> {
    // SAFETY: close_range only closes descriptors; nothing in this process
    // relies on them past this point (the caller runs before any runtime).
    let rc = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
    if rc == 0 {
        return Ok(());
    }
    let err = errno();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(format!("close_range({first}, {last}): {err}"));
    }
    // Before Linux 5.9: close one by one up to the descriptor limit.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable `rlimit`.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) };
    let top = u32::try_from(lim.rlim_max.min(1 << 20)).unwrap_or(1 << 20);
    for fd in first..=last.min(top) {
        // SAFETY: as above.
        unsafe { libc::close(fd as RawFd) };
    }
    Ok(())
}

/// The descriptors open in this process, not counting the one used to
/// list them.
pub(super) fn open_descriptors() -> Result<Vec<RawFd>, String> {
    let entries =
        std::fs::read_dir("/proc/self/fd").map_err(|e| format!("listing /proc/self/fd: {e}"))?;
    let mut listed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| format!("listing /proc/self/fd: {e}"))?;
        if let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<RawFd>().ok())
        {
            listed.push(fd);
        }
    }
    // The directory was itself open while listed; it is closed by now.
    // SAFETY: F_GETFD only reads a descriptor's flags.
    let fds = listed
        .into_iter()
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
        .collect();
    Ok(fds)
}

/// As root: no supplementary groups, `run_as` for every uid and gid, every
/// capability dropped. Not root: every capability dropped.
pub(super) fn unprivileged(run_as: Option<(u32, u32)>) -> Result<LayerState, HardenError> {
    let layer = Layer::Unprivileged;
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        let (uid, gid) = run_as.unwrap_or(DEFAULT_RUN_AS);
        if uid == 0 || gid == 0 {
            return Err(HardenError::new(
                layer,
                format!("run_as {uid}:{gid} is root, which is not unprivileged"),
            ));
        }
        // The kernel makes a process that changes its uid as dumpable as
        // `fs.suid_dumpable` says: at 1, the worker would be open to every
        // process of its new uid from the switch to the not-dumpable layer.
        if std::fs::read_to_string("/proc/sys/fs/suid_dumpable").is_ok_and(|v| v.trim() == "1") {
            return Err(HardenError::new(
                layer,
                format!(
                    "fs.suid_dumpable is 1: switched to uid {uid}, the worker would be dumpable (open to every process of that uid) until its not-dumpable layer; set it to 0 or 2"
                ),
            ));
        }
        drop_bounding_set(layer)?;
        // SAFETY: an empty list.
        if unsafe { libc::setgroups(0, std::ptr::null()) } != 0 {
            return Err(fail(layer, "setgroups([])"));
        }
        // SAFETY: plain ids.
        if unsafe { libc::setresgid(gid, gid, gid) } != 0 {
            return Err(fail(layer, &format!("setresgid({gid})")));
        }
        // SAFETY: plain ids.
        if unsafe { libc::setresuid(uid, uid, uid) } != 0 {
            return Err(fail(layer, &format!("setresuid({uid})")));
        }
        let (mut r, mut e, mut s) = (0, 0, 0);
        // SAFETY: valid out pointers.
        unsafe { libc::getresuid(&mut r, &mut e, &mut s) };
        if [r, e, s] != [uid; 3] {
            return Err(HardenError::new(
                layer,
                format!("uids are {r}/{e}/{s} after switching to {uid}"),
            ));
        }
        // SAFETY: valid out pointers.
        unsafe { libc::getresgid(&mut r, &mut e, &mut s) };
        // SAFETY: a zero-length query.
        let groups = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        if [r, e, s] != [gid; 3] || groups != 0 {
            return Err(HardenError::new(
                layer,
                format!("gids are {r}/{e}/{s} with {groups} groups after switching to {gid}"),
            ));
        }
    }
    drop_capabilities(layer)?;
    Ok(LayerState::Active)
}

/// Empties the bounding set where the process may (it needs CAP_SETPCAP).
fn drop_bounding_set(layer: Layer) -> Result<(), HardenError> {
    for cap in 0..64 {
        // SAFETY: PR_CAPBSET_READ reads one bit.
        let present = unsafe { libc::prctl(libc::PR_CAPBSET_READ, cap, 0, 0, 0) };
        if present < 0 {
            break; // past the last capability this kernel knows
        }
        // SAFETY: PR_CAPBSET_DROP drops one bit.
        if present == 1 && unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, 0, 0, 0) } != 0 {
            return Err(fail(
                layer,
                &format!("dropping capability {cap} from the bounding set"),
            ));
        }
    }
    Ok(())
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const CAP_V3: u32 = 0x2008_0522;
const CAP_SETPCAP: u32 = 8;
const CAP_SYS_ADMIN: u32 = 21;

/// Bounding set (when allowed), ambient, effective, permitted and
/// inheritable sets emptied, then checked in `/proc/self/status`.
pub(super) fn drop_capabilities(layer: Layer) -> Result<(), HardenError> {
    if has_cap(CAP_SETPCAP) {
        drop_bounding_set(layer)?;
    }
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointers.
    unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: a v3 header and two data structs, as capset expects.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(fail(layer, "capset(empty)"));
    }
    for set in ["CapInh", "CapPrm", "CapEff", "CapAmb"] {
        let value = status_field(set).unwrap_or_default();
        if !value.trim_start_matches('0').is_empty() {
            return Err(HardenError::new(
                layer,
                format!("{set} is {value} after dropping every capability"),
            ));
        }
    }
    Ok(())
}

/// Runs `f` with `CAP_SYS_ADMIN` out of the effective set, then puts the
/// effective set back. What `f` opens carries no privilege to reveal: a
/// page map opened so shows no physical frame numbers to whoever reads it
/// later (the kernel judges by the opener's credentials). The process is
/// never made dumpable for it.
pub(super) fn without_admin(f: fn()) -> Result<(), HardenError> {
    let layer = Layer::Unprivileged;
    let mut header = CapHeader {
        version: CAP_V3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: a v3 header and room for two data structs, as capget expects.
    if unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } != 0 {
        return Err(fail(layer, "capget"));
    }
    let saved = data;
    data[0].effective &= !(1 << CAP_SYS_ADMIN);
    // SAFETY: as above; the effective set only shrinks.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, data.as_ptr()) } != 0 {
        return Err(fail(layer, "capset(without CAP_SYS_ADMIN)"));
    }
    if has_cap(CAP_SYS_ADMIN) {
        return Err(HardenError::new(
            layer,
            "CAP_SYS_ADMIN is still effective after dropping it",
        ));
    }
    f();
    // SAFETY: as above; the effective set goes back within the permitted one.
    if unsafe { libc::syscall(libc::SYS_capset, &mut header, saved.as_ptr()) } != 0 {
        return Err(fail(layer, "capset(restore)"));
    }
    Ok(())
}

fn effective_caps() -> u64 {
    status_field("CapEff")
        .and_then(|v| u64::from_str_radix(&v, 16).ok())
        .unwrap_or(0)
}

fn has_cap(cap: u32) -> bool {
    effective_caps() & (1 << cap) != 0
}

pub(super) fn has_cap_sys_admin() -> bool {
    has_cap(CAP_SYS_ADMIN)
}

fn ns_id(kind: &str) -> Option<std::path::PathBuf> {
    std::fs::read_link(format!("/proc/self/ns/{kind}")).ok()
}

fn write_proc(path: &str, content: &str, layer: Layer) -> Result<(), HardenError> {
    std::fs::write(path, content)
        .map_err(|e| HardenError::new(layer, format!("writing {content:?} to {path}: {e}")))
}

/// Whether user namespaces can be created here at all.
pub(super) fn user_namespaces_offered() -> LayerState {
    match std::fs::read_to_string("/proc/sys/user/max_user_namespaces") {
        Ok(s) if s.trim() == "0" => LayerState::Unavailable {
            reason: "user namespaces are disabled (user.max_user_namespaces is 0)".into(),
        },
        Ok(_) => LayerState::Active,
        Err(_) if ns_id("user").is_none() => LayerState::Unavailable {
            reason: "this kernel has no user namespaces".into(),
        },
        Err(_) => LayerState::Active,
    }
}

/// Writes a worker's user-namespace maps from outside the namespace, for
/// a worker that starts as root and switches to an unprivileged uid.
///
/// A uid change leaves a process non-dumpable, which makes its `/proc`
/// files root's: it can no longer write its own maps. Making it dumpable
/// again for the writes would let any process of the new uid open its
/// memory or attach to it in that moment, and keep that access after every
/// later layer. So, as setuid helpers such as `newuidmap` do for
/// unprivileged users, the maps are written by another process: a child
/// forked before the uid change, still root with `CAP_SETUID` and
/// `CAP_SETGID` in the initial namespace. It waits until the worker has
/// entered its new namespace, writes the three files of
/// `/proc/<worker>/`, answers and exits. The worker is never dumpable
/// under its new uid.
pub(super) struct MapWriter {
    pid: libc::pid_t,
    go: Option<io::PipeWriter>,
    done: io::PipeReader,
}

/// Forks the [`MapWriter`] for maps of `uid` and `gid` onto themselves.
/// The process must be single-threaded ([`super::apply`] checks).
pub(super) fn map_writer(uid: u32, gid: u32) -> Result<MapWriter, HardenError> {
    let layer = Layer::UserNamespace;
    let pipe = || io::pipe().map_err(|e| HardenError::new(layer, format!("pipe: {e}")));
    let (go_r, go_w) = pipe()?;
    let (done_r, done_w) = pipe()?;
    // SAFETY: no preconditions.
    let worker = unsafe { libc::getpid() };
    // SAFETY: the process is single-threaded, so the child may allocate;
    // it only writes a few files and exits.
    match unsafe { libc::fork() } {
        -1 => Err(fail(layer, "fork of the map writer")),
        0 => {
            drop(go_w);
            drop(done_r);
            write_maps_for(worker, uid, gid, go_r, done_w);
            // SAFETY: ends the child without running the parent's exit
            // handlers.
            unsafe { libc::_exit(0) }
        }
        pid => Ok(MapWriter {
            pid,
            go: Some(go_w),
            done: done_r,
        }),
    }
}

/// The map writer's whole life: wait for the worker's word, write, answer
/// `ok` or what failed.
fn write_maps_for(
    worker: libc::pid_t,
    uid: u32,
    gid: u32,
    mut go: io::PipeReader,
    mut done: io::PipeWriter,
) {
    use std::io::{Read, Write};
    // SAFETY: plain integers; it dies with the worker.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) };
    let mut word = [0u8; 1];
    // The worker closing its end without a word (a layer failed, or user
    // namespaces are refused after all) or dying: nothing to write.
    if go.read_exact(&mut word).is_err() || getppid() != worker {
        return;
    }
    let writes = [
        ("setgroups", "deny".to_owned()),
        ("uid_map", format!("{uid} {uid} 1\n")),
        ("gid_map", format!("{gid} {gid} 1\n")),
    ];
    let mut answer = "ok".to_owned();
    for (file, content) in writes {
        let path = format!("/proc/{worker}/{file}");
        if let Err(e) = std::fs::write(&path, &content) {
            answer = format!("writing {content:?} to {path}: {e}");
            break;
        }
    }
    let _ = done.write_all(answer.as_bytes());
}

impl MapWriter {
    /// Has the maps written (the worker has just entered its namespace)
    /// and waits for the writer's answer.
    fn write(mut self) -> Result<(), HardenError> {
        use std::io::{Read, Write};
        let layer = Layer::UserNamespace;
        if let Some(mut go) = self.go.take() {
            go.write_all(b"g")
                .map_err(|e| HardenError::new(layer, format!("waking the map writer: {e}")))?;
        }
        let mut answer = String::new();
        self.done
            .read_to_string(&mut answer)
            .map_err(|e| HardenError::new(layer, format!("reading the map writer: {e}")))?;
        match answer.as_str() {
            "ok" => Ok(()),
            "" => Err(HardenError::new(
                layer,
                "the map writer ended without writing the maps",
            )),
            failed => Err(HardenError::new(layer, format!("map writer: {failed}"))),
        }
    }
}

impl Drop for MapWriter {
    fn drop(&mut self) {
        // Without its word the writer exits at once.
        self.go.take();
        loop {
            // SAFETY: our own child; no status wanted.
            let r = unsafe { libc::waitpid(self.pid, std::ptr::null_mut(), 0) };
            if r >= 0 || errno().raw_os_error() != Some(libc::EINTR) {
                break;
            }
        }
    }
}

/// A new user namespace mapping only this process's uid and gid onto
/// themselves, with `setgroups` denied. With a `writer` (a worker that
/// changed its uid), the maps are written by it; without, by the process
/// itself, which has not changed its uid and so is dumpable to no one new.
pub(super) fn user_namespace(writer: Option<MapWriter>) -> Result<LayerState, HardenError> {
    let layer = Layer::UserNamespace;
    // SAFETY: no preconditions.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    let before = ns_id("user");
    // SAFETY: no pointers.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER) } != 0 {
        let err = errno();
        return match err.raw_os_error() {
            Some(libc::EPERM | libc::ENOSPC | libc::EUSERS | libc::ENOSYS) => {
                Ok(LayerState::Unavailable {
                    reason: format!("unshare(CLONE_NEWUSER) refused: {err}"),
                })
            }
            _ => Err(HardenError::new(
                layer,
                format!("unshare(CLONE_NEWUSER): {err}"),
            )),
        };
    }
    if let Some(writer) = writer {
        writer.write()?;
    } else {
        write_proc("/proc/self/setgroups", "deny", layer)?;
        write_proc("/proc/self/uid_map", &format!("{uid} {uid} 1\n"), layer)?;
        write_proc("/proc/self/gid_map", &format!("{gid} {gid} 1\n"), layer)?;
    }
    if ns_id("user") == before {
        return Err(HardenError::new(
            layer,
            "still in the user namespace it started in",
        ));
    }
    let map = std::fs::read_to_string("/proc/self/uid_map").unwrap_or_default();
    let fields: Vec<&str> = map.split_whitespace().collect();
    if fields != [uid.to_string(), uid.to_string(), "1".to_owned()] {
        return Err(HardenError::new(layer, format!("uid map is {map:?}")));
    }
    Ok(LayerState::Active)
}

/// A new network, IPC or mount namespace. Without CAP_SYS_ADMIN (no user
/// namespace and not root) it is unavailable.
pub(super) fn unshare_ns(layer: Layer, privileged: bool) -> Result<LayerState, HardenError> {
    let (flag, kind) = match layer {
        Layer::NetworkNamespace => (libc::CLONE_NEWNET, "net"),
        Layer::IpcNamespace => (libc::CLONE_NEWIPC, "ipc"),
        _ => (libc::CLONE_NEWNS, "mnt"),
    };
    if !privileged {
        return Ok(LayerState::Unavailable {
            reason: format!(
                "a new {kind} namespace needs the user namespace layer or root, neither is here"
            ),
        });
    }
    let before = ns_id(kind);
    // SAFETY: no pointers.
    if unsafe { libc::unshare(flag) } != 0 {
        let err = errno();
        return match err.raw_os_error() {
            Some(libc::EINVAL | libc::ENOSPC | libc::EUSERS) => Ok(LayerState::Unavailable {
                reason: format!("unshare of a {kind} namespace refused: {err}"),
            }),
            _ => Err(HardenError::new(
                layer,
                format!("unshare of a {kind} namespace: {err}"),
            )),
        };
    }
    if ns_id(kind) == before {
        return Err(HardenError::new(
            layer,
            format!("still in the {kind} namespace it started in"),
        ));
    }
    match layer {
        Layer::NetworkNamespace => check_no_network(),
        Layer::MountNamespace => make_mounts_private(),
        _ => Ok(()),
    }?;
    Ok(LayerState::Active)
}

fn check_no_network() -> Result<(), HardenError> {
    let layer = Layer::NetworkNamespace;
    let dev = std::fs::read_to_string("/proc/self/net/dev")
        .map_err(|e| HardenError::new(layer, format!("reading /proc/self/net/dev: {e}")))?;
    let interfaces: Vec<&str> = dev
        .lines()
        .skip(2)
        .filter_map(|l| l.split(':').next().map(str::trim))
        .collect();
    if interfaces.iter().any(|i| *i != "lo") {
        return Err(HardenError::new(
            layer,
            format!("interfaces {interfaces:?} in the new namespace"),
        ));
    }
    // Loopback stays down: nothing reaches even 127.0.0.1.
    if loopback_up().map_err(|e| HardenError::new(layer, format!("reading lo's flags: {e}")))? {
        return Err(HardenError::new(
            layer,
            "loopback is up in the new namespace",
        ));
    }
    Ok(())
}

/// Whether `lo` is up in this network namespace.
pub(super) fn loopback_up() -> io::Result<bool> {
    // SAFETY: plain integers; the descriptor is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: an all-zero ifreq is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `req` is a valid ifreq naming an interface.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) };
    let err = errno();
    // SAFETY: our own descriptor.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return Err(err);
    }
    // SAFETY: SIOCGIFFLAGS filled the flags member.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    Ok(flags & libc::IFF_UP as libc::c_short != 0)
}

fn make_mounts_private() -> Result<(), HardenError> {
    let layer = Layer::MountNamespace;
    // SAFETY: valid C strings and null pointers where mount(2) allows them.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(fail(layer, "making every mount private"));
    }
    let info = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| HardenError::new(layer, format!("reading /proc/self/mountinfo: {e}")))?;
    if let Some(line) = info
        .lines()
        .find(|l| l.contains(" shared:") || l.contains(" master:"))
    {
        return Err(HardenError::new(
            layer,
            format!("a mount still propagates: {line}"),
        ));
    }
    Ok(())
}

/// SIGKILL when the parent dies; exits at once if it already has.
pub(super) fn dies_with_gateway(ppid: libc::pid_t) -> Result<LayerState, HardenError> {
    let layer = Layer::DiesWithGateway;
    // SAFETY: plain integers.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) } != 0 {
        return Err(fail(layer, "PR_SET_PDEATHSIG"));
    }
    let mut sig: libc::c_int = 0;
    // SAFETY: a valid out pointer.
    unsafe {
        libc::prctl(
            libc::PR_GET_PDEATHSIG,
            &mut sig as *mut libc::c_int,
            0,
            0,
            0,
        )
    };
    if sig != libc::SIGKILL {
        return Err(HardenError::new(
            layer,
            format!("parent-death signal reads back as {sig}"),
        ));
    }
    // The gateway may have died before the signal was set.
    let now = getppid();
    if now != ppid || now == 1 {
        // SAFETY: ends the process, as the gateway is gone.
        unsafe { libc::_exit(1) };
    }
    Ok(LayerState::Active)
}

fn set_limit(
    resource: libc::__rlimit_resource_t,
    name: &str,
    value: u64,
) -> Result<(), HardenError> {
    let layer = Layer::Rlimits;
    let lim = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: a valid `rlimit`.
    if unsafe { libc::setrlimit(resource, &lim) } != 0 {
        return Err(fail(layer, &format!("setting {name} to {value}")));
    }
    let mut got = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: a valid, writable `rlimit`.
    unsafe { libc::getrlimit(resource, &mut got) };
    if (got.rlim_cur, got.rlim_max) != (value, value) {
        return Err(HardenError::new(
            layer,
            format!(
                "{name} reads back as {}/{} instead of {value}",
                got.rlim_cur, got.rlim_max
            ),
        ));
    }
    Ok(())
}

/// No core files; `max_open` descriptors and `max_threads` tasks, soft and
/// hard (lowered hard limits cannot be raised without CAP_SYS_RESOURCE in
/// the host's namespace, which the worker no longer has).
pub(super) fn rlimits(max_open: u64, max_threads: u64) -> Result<LayerState, HardenError> {
    set_limit(libc::RLIMIT_CORE, "RLIMIT_CORE", 0)?;
    set_limit(libc::RLIMIT_NOFILE, "RLIMIT_NOFILE", max_open)?;
    set_limit(libc::RLIMIT_NPROC, "RLIMIT_NPROC", max_threads)?;
    Ok(LayerState::Active)
}

pub(super) fn no_new_privs() -> Result<LayerState, HardenError> {
    let layer = Layer::NoNewPrivs;
    // SAFETY: plain integers.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(fail(layer, "PR_SET_NO_NEW_PRIVS"));
    }
    // SAFETY: plain integers.
    if unsafe { libc::prctl(libc::PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0) } != 1
        || status_field("NoNewPrivs").as_deref() != Some("1")
    {
        return Err(HardenError::new(layer, "no_new_privs reads back unset"));
    }
    Ok(LayerState::Active)
}

/// Makes the process dumpable: what a worker without the not-dumpable
/// layer may be (tests and the escape suite's self-check only).
pub(super) fn dumpable() {
    // SAFETY: a plain flag.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0) };
}

pub(super) fn not_dumpable() -> Result<LayerState, HardenError> {
    let layer = Layer::NotDumpable;
    // SAFETY: plain integers.
    if unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(fail(layer, "PR_SET_DUMPABLE 0"));
    }
    // SAFETY: plain integers.
    if unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) } != 0 {
        return Err(HardenError::new(layer, "dumpable reads back set"));
    }
    Ok(LayerState::Active)
}
