//! The drill's side: native code run from inside the compartment, after
//! the worker's own hardening function, as if the guest had broken out of
//! wasmtime. Every attempt is a real system call; what it tried and how it
//! ended is written on the channel as it goes. Nothing here is trusted:
//! the suite judges from the host.
//!
//! Between `fork` and `_exit` (or `execve`) a child only makes raw system
//! calls (the drill is single-threaded, so this is sound).

use std::ffi::CString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::model::{DrillAttack, DrillLine, DrillOrder};
use bulkhead::worker::harden::{Applied, HardenError};

/// Exit status when the drill cannot even talk to the suite.
const NO_CHANNEL: u8 = 3;

struct Drill {
    channel: UnixStream,
    loot: u32,
    order: DrillOrder,
}

fn errno() -> String {
    std::io::Error::last_os_error().to_string()
}

/// `ok` for a non-negative return, else the error.
fn outcome(rc: i64) -> String {
    if rc < 0 { errno() } else { "ok".to_owned() }
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap_or_default()
}

impl Drill {
    fn send(&mut self, line: &DrillLine) {
        if let Ok(mut text) = serde_json::to_string(line) {
            text.push('\n');
            let _ = self.channel.write_all(text.as_bytes());
        }
    }

    /// [`Drill::attempt`] of a call through `std` that returns nothing
    /// to report: `ok` or its error.
    fn tried(&mut self, what: impl Into<String>, result: std::io::Result<()>) {
        self.tried_with(what, result, |()| "ok".into());
    }

    /// [`Drill::attempt`] of a call through `std`: what `said` makes of
    /// its value, or its error.
    fn tried_with<T>(
        &mut self,
        what: impl Into<String>,
        result: std::io::Result<T>,
        said: impl FnOnce(T) -> String,
    ) {
        self.attempt(what, result.map_or_else(|e| e.to_string(), said), None);
    }

    fn attempt(&mut self, what: impl Into<String>, outcome: String, data: Option<Vec<u8>>) {
        // What it got goes to the channel and into its work directory, so
        // the host can look for it in both.
        if let Some(bytes) = &data {
            self.loot += 1;
            let copy = self.order.work_dir.join(format!("loot-{}", self.loot));
            let _ = std::fs::write(copy, bytes);
        }
        self.send(&DrillLine::Attempt {
            what: what.into(),
            outcome,
            data: data.map(|d| String::from_utf8_lossy(&d).into_owned()),
        });
    }

    fn trying(&mut self, what: impl Into<String>) {
        self.send(&DrillLine::Trying(what.into()));
    }

    /// Reads up to 64 KiB from `fd`.
    fn read_fd(fd: i32) -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; 64 * 1024];
        // SAFETY: `buf` is valid for its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            return Err(errno());
        }
        buf.truncate(usize::try_from(n).unwrap_or(0));
        Ok(buf)
    }

    fn read_file(&mut self, what: &str, path: &Path) {
        let c = cpath(path);
        // SAFETY: a valid C string.
        let fd = unsafe { libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
        if fd < 0 {
            self.attempt(format!("{what} {}", path.display()), errno(), None);
            return;
        }
        let read = Self::read_fd(fd);
        // SAFETY: `fd` is ours.
        unsafe { libc::close(fd) };
        match read {
            Ok(bytes) => self.attempt(
                format!("{what} {}", path.display()),
                "ok".into(),
                Some(bytes),
            ),
            Err(e) => self.attempt(format!("{what} {}", path.display()), e, None),
        }
    }

    fn secrets(&mut self) {
        let files = self.order.secret_files.clone();
        for (i, path) in files.iter().enumerate() {
            self.read_file("open and read", path);
            // Through the process's view of the root.
            let via_proc =
                Path::new("/proc/self/root").join(path.strip_prefix("/").unwrap_or(path));
            self.read_file("open and read", &via_proc);
            // A hard link and a symlink into its own work directory, then
            // read through them.
            let link = self.order.work_dir.join(format!("hardlink-{i}"));
            self.trying(format!("link({})", path.display()));
            let (a, b) = (cpath(path), cpath(&link));
            // SAFETY: valid C strings.
            let rc = unsafe { libc::link(a.as_ptr(), b.as_ptr()) };
            self.attempt(
                format!("hard link {} into the work dir", path.display()),
                outcome(rc.into()),
                None,
            );
            if rc == 0 {
                self.read_file("read through the hard link", &link);
            }
            let sym = self.order.work_dir.join(format!("symlink-{i}"));
            let _ = std::os::unix::fs::symlink(path, &sym);
            self.read_file("read through a symlink", &sym);
        }
    }

    fn inherited(&mut self) {
        for fd in 0..1024 {
            if fd == bulkhead::worker::CHANNEL_FD || same_file(fd, bulkhead::worker::CHANNEL_FD) {
                continue;
            }
            // SAFETY: fcntl on any number is sound.
            if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
                continue;
            }
            // SAFETY: as above; a non-blocking read cannot hang the drill.
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFL);
                libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
            }
            let msg = b"DRILL WAS HERE: the worker wrote on a descriptor it inherited\n";
            // SAFETY: `msg` is valid for its length.
            let rc = unsafe { libc::write(fd, msg.as_ptr().cast(), msg.len()) };
            self.attempt(
                format!("write on inherited descriptor {fd}"),
                outcome(rc as i64),
                None,
            );
            match Self::read_fd(fd) {
                Ok(bytes) if !bytes.is_empty() => {
                    self.attempt(
                        format!("read inherited descriptor {fd}"),
                        "ok".into(),
                        Some(bytes),
                    );
                }
                Ok(_) => self.attempt(
                    format!("read inherited descriptor {fd}"),
                    "end of file".into(),
                    None,
                ),
                Err(e) => self.attempt(format!("read inherited descriptor {fd}"), e, None),
            }
        }
    }

    fn neighbours(&mut self) {
        for path in self.order.neighbour_files.clone() {
            self.read_file("read", &path);
            let c = cpath(&path);
            // SAFETY: a valid C string.
            let fd = unsafe {
                libc::open(
                    c.as_ptr(),
                    libc::O_WRONLY | libc::O_APPEND | libc::O_CLOEXEC,
                )
            };
            if fd < 0 {
                self.attempt(
                    format!("open for writing {}", path.display()),
                    errno(),
                    None,
                );
            } else {
                let msg = b"tampered by the drill\n";
                // SAFETY: valid buffer; `fd` is ours.
                let rc = unsafe { libc::write(fd, msg.as_ptr().cast(), msg.len()) };
                unsafe { libc::close(fd) };
                self.attempt(
                    format!("append to {}", path.display()),
                    outcome(rc as i64),
                    None,
                );
            }
            let moved = path.with_extension("moved");
            let r = std::fs::rename(&path, &moved);
            self.tried(format!("rename {}", path.display()), r);
            let r = std::fs::remove_file(&path);
            self.tried(format!("unlink {}", path.display()), r);
        }
        for dir in self.order.neighbour_dirs.clone() {
            let r = std::fs::read_dir(&dir).map(|d| d.flatten().count());
            self.tried_with(format!("list {}", dir.display()), r, |n| {
                format!("ok: {n} entries")
            });
            let r = std::fs::write(dir.join("planted-by-drill"), b"planted");
            self.tried(format!("create a file in {}", dir.display()), r);
            let r = std::fs::create_dir(dir.join("planted-dir"));
            self.tried(format!("create a directory in {}", dir.display()), r);
        }
    }

    /// Everything a worker could do to its zone's cache to plant native
    /// code or fill the disk: write, truncate, rename, remove and chmod an
    /// artifact; create files, directories, FIFOs and links in it; link or
    /// rename a file of its own work directory into it.
    fn zone_cache(&mut self) {
        let own = self.order.work_dir.join("drill-artifact.cwasm");
        let made = std::fs::write(&own, b"native code of the drill's own");
        self.tried(format!("write {} (its own directory)", own.display()), made);
        for path in self.order.zone_cache_files.clone() {
            for (how, flags) in [
                ("append to", libc::O_WRONLY | libc::O_APPEND),
                ("truncate", libc::O_WRONLY | libc::O_TRUNC),
            ] {
                let c = cpath(&path);
                // SAFETY: a valid C string.
                let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
                if fd < 0 {
                    self.attempt(format!("{how} {}", path.display()), errno(), None);
                    continue;
                }
                let msg = b"planted by the drill";
                // SAFETY: valid buffer; `fd` is ours.
                let rc = unsafe { libc::write(fd, msg.as_ptr().cast(), msg.len()) };
                unsafe { libc::close(fd) };
                self.attempt(
                    format!("{how} {}", path.display()),
                    outcome(rc as i64),
                    None,
                );
            }
            let c = cpath(&path);
            // SAFETY: a valid C string.
            let rc = unsafe { libc::chmod(c.as_ptr(), 0o666) };
            self.attempt(
                format!("chmod {}", path.display()),
                outcome(rc.into()),
                None,
            );
            let r = std::fs::rename(&path, path.with_extension("moved"));
            self.tried(format!("rename {}", path.display()), r);
            let r = std::fs::copy(&own, &path);
            self.tried_with(
                format!("overwrite {} with its own file", path.display()),
                r,
                |n| format!("ok: {n} bytes"),
            );
            let r = std::fs::remove_file(&path);
            self.tried(format!("unlink {}", path.display()), r);
        }
        for dir in self.order.zone_cache_dirs.clone() {
            let r = std::fs::read_dir(&dir).map(|d| d.flatten().count());
            self.tried_with(format!("list {}", dir.display()), r, |n| {
                format!("ok: {n} entries")
            });
            let r = std::fs::write(dir.join("filler-by-drill"), vec![0u8; 1 << 20]);
            self.tried(format!("create a 1 MiB file in {}", dir.display()), r);
            let r = std::fs::create_dir(dir.join("dir-by-drill"));
            self.tried(format!("create a directory in {}", dir.display()), r);
            let r = std::os::unix::fs::symlink(&own, dir.join("link-by-drill"));
            self.tried(format!("create a symlink in {}", dir.display()), r);
            let r = std::fs::hard_link(&own, dir.join("hardlink-by-drill.cwasm"));
            self.tried(format!("hard-link its own file into {}", dir.display()), r);
            let r = std::fs::rename(&own, dir.join("renamed-by-drill.cwasm"));
            self.tried(format!("rename its own file into {}", dir.display()), r);
        }
        // Last: seccomp may end the drill here (`mknodat` is not allowed).
        for dir in self.order.zone_cache_dirs.clone() {
            let fifo = cpath(&dir.join("fifo-by-drill"));
            self.trying(format!("mkfifo in {}", dir.display()));
            // SAFETY: a valid C string.
            let rc = unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) };
            self.attempt(
                format!("mkfifo in {}", dir.display()),
                outcome(rc.into()),
                None,
            );
        }
    }

    fn connect(&mut self) {
        for port in self.order.tcp_ports.clone() {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            self.trying(format!("socket and connect to {addr}"));
            match std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2)) {
                Ok(mut s) => {
                    let r = s.write_all(b"GET /admin/tokens HTTP/1.1\r\nHost: gateway\r\n\r\n");
                    self.tried(format!("connect to {addr} and send a request"), r);
                }
                Err(e) => self.attempt(format!("connect to {addr}"), e.to_string(), None),
            }
            // By hand, as a raw socket call, in case std's path differs.
            // SAFETY: plain socket calls on a descriptor this owns.
            unsafe {
                let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
                if fd < 0 {
                    self.attempt("socket(AF_INET, SOCK_STREAM)", errno(), None);
                    continue;
                }
                let sa = sockaddr(port);
                let rc = libc::connect(fd, (&raw const sa).cast(), socklen());
                self.attempt(format!("raw connect to {addr}"), outcome(rc.into()), None);
                libc::close(fd);
            }
        }
        // SAFETY: a socket call; closed right away.
        unsafe {
            let fd = libc::socket(libc::AF_INET6, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
            self.attempt("socket(AF_INET6, SOCK_STREAM)", outcome(fd.into()), None);
            if fd >= 0 {
                libc::close(fd);
            }
            let fd = libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
            self.attempt("socket(AF_NETLINK)", outcome(fd.into()), None);
            if fd >= 0 {
                libc::close(fd);
            }
        }
    }

    fn udp_to(&mut self, ports: &[u16], payload: &[u8], what: &str) {
        for &port in ports {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            for bind in ["0.0.0.0:0", "127.0.0.1:0"] {
                self.trying(format!("UDP socket on {bind}, {what} to {addr}"));
                match std::net::UdpSocket::bind(bind) {
                    Ok(s) => {
                        let r = s.send_to(payload, addr);
                        self.tried_with(format!("{what} to {addr} from {bind}"), r, |n| {
                            format!("ok: {n} bytes")
                        });
                    }
                    Err(e) => {
                        self.attempt(format!("bind a UDP socket on {bind}"), e.to_string(), None)
                    }
                }
            }
        }
    }

    fn udp(&mut self) {
        let ports = self.order.udp_ports.clone();
        self.udp_to(&ports, b"drill datagram", "send a datagram");
    }

    fn resolve(&mut self) {
        // A DNS query for `gateway.bulkhead.internal`, type A, as a libc
        // resolver would send it (with no readable resolv.conf, to
        // 127.0.0.1:53).
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in ["gateway", "bulkhead", "internal"] {
            q.push(u8::try_from(label.len()).unwrap_or(0));
            q.extend_from_slice(label.as_bytes());
        }
        q.extend_from_slice(&[0, 0, 1, 0, 1]);
        let ports = self.order.dns_ports.clone();
        self.udp_to(&ports, &q, "send a DNS query");
        // And the system resolver, which reads files the wall hides.
        match std::fs::read("/etc/resolv.conf") {
            Ok(b) => self.attempt("read /etc/resolv.conf", "ok".into(), Some(b)),
            Err(e) => self.attempt("read /etc/resolv.conf", e.to_string(), None),
        }
    }

    fn exec(&mut self) {
        let marker = self.order.marker.display().to_string();
        let sh = CString::new("/bin/sh").unwrap_or_default();
        let dash_c = CString::new("-c").unwrap_or_default();
        let cmd = CString::new(format!("touch '{marker}'")).unwrap_or_default();
        let argv = [sh.as_ptr(), dash_c.as_ptr(), cmd.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null::<libc::c_char>()];
        // A script of its own in its work directory.
        let script = self.order.work_dir.join("run.sh");
        let _ = std::fs::write(&script, format!("#!/bin/sh\ntouch '{marker}'\n"));
        let _ =
            std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755));
        let script_c = cpath(&script);
        let script_argv = [script_c.as_ptr(), std::ptr::null()];
        for (what, path, args) in [
            (
                "fork, then execve /bin/sh -c touch",
                sh.as_ptr(),
                argv.as_ptr(),
            ),
            (
                "fork, then execve a script in the work dir",
                script_c.as_ptr(),
                script_argv.as_ptr(),
            ),
        ] {
            self.trying(format!("fork for: {what}"));
            // SAFETY: the child only calls execve and _exit.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                unsafe {
                    libc::execve(path, args, envp.as_ptr());
                    libc::_exit(127);
                }
            }
            if pid < 0 {
                self.attempt(what, format!("fork: {}", errno()), None);
                continue;
            }
            let mut status = 0;
            // SAFETY: waits for its own child.
            unsafe { libc::waitpid(pid, &raw mut status, 0) };
            let ended = if libc::WIFEXITED(status) {
                format!("child exited {}", libc::WEXITSTATUS(status))
            } else {
                format!("child killed by signal {}", libc::WTERMSIG(status))
            };
            self.attempt(what, ended, None);
        }
        // Last, in this very process: if it works, the shell inherits the
        // channel and the suite reads its end when the shell is done.
        self.trying("execve /bin/sh -c touch in the drill itself");
        // SAFETY: valid, null-terminated arrays of C strings.
        unsafe { libc::execve(sh.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
        self.attempt("execve /bin/sh -c touch in the drill itself", errno(), None);
    }

    fn gateway(&mut self) {
        let pid = i32::try_from(self.order.gateway_pid).unwrap_or(i32::MAX);
        // SAFETY: these calls only name another process; none touches this
        // one's memory but the buffers passed.
        unsafe {
            self.trying(format!("kill({pid}, SIGUSR2)"));
            let rc = libc::kill(pid, libc::SIGUSR2);
            self.attempt(format!("kill({pid}, SIGUSR2)"), outcome(rc.into()), None);
            let (addr, len) = self.order.gateway_secret;
            let len = usize::try_from(len).unwrap_or(0);
            let mut buf = vec![0u8; len];
            let local = libc::iovec {
                iov_base: buf.as_mut_ptr().cast(),
                iov_len: len,
            };
            let remote = libc::iovec {
                iov_base: addr as *mut libc::c_void,
                iov_len: len,
            };
            self.trying(format!("process_vm_readv({pid})"));
            let n = libc::process_vm_readv(pid, &raw const local, 1, &raw const remote, 1, 0);
            if n > 0 {
                buf.truncate(usize::try_from(n).unwrap_or(0));
                self.attempt(
                    "process_vm_readv of the gateway's secret",
                    "ok".into(),
                    Some(buf),
                );
            } else {
                self.attempt("process_vm_readv of the gateway's secret", errno(), None);
            }
        }
        let mem = format!("/proc/{pid}/mem");
        self.trying(format!("open {mem}"));
        match std::fs::File::open(&mem) {
            Ok(f) => {
                let mut buf = vec![0u8; usize::try_from(self.order.gateway_secret.1).unwrap_or(0)];
                let r =
                    std::os::unix::fs::FileExt::read_at(&f, &mut buf, self.order.gateway_secret.0);
                match r {
                    Ok(n) => {
                        buf.truncate(n);
                        self.attempt(format!("read {mem}"), "ok".into(), Some(buf));
                    }
                    Err(e) => self.attempt(format!("read {mem}"), e.to_string(), None),
                }
            }
            Err(e) => self.attempt(format!("open {mem}"), e.to_string(), None),
        }
        self.read_file("read", Path::new(&format!("/proc/{pid}/environ")));
        // Last: a seized gateway would stop on the signal above.
        // SAFETY: names another process only.
        self.trying(format!("ptrace(PTRACE_SEIZE, {pid})"));
        let rc = unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) };
        self.attempt(format!("ptrace(PTRACE_SEIZE, {pid})"), outcome(rc), None);
    }

    fn fork_bomb(&mut self) {
        let mut started = 0;
        let mut last = String::from("ok");
        self.trying(format!("fork {} times", self.order.forks));
        for _ in 0..self.order.forks {
            // SAFETY: the child only makes raw calls: it asks to die with
            // the drill, then sleeps until it does.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                unsafe {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    loop {
                        libc::pause();
                    }
                }
            }
            if pid < 0 {
                last = errno();
                break;
            }
            started += 1;
        }
        self.attempt(
            format!("fork {} times", self.order.forks),
            format!("{started} started; last: {last}"),
            None,
        );
        self.trying(format!("spawn {} threads", self.order.forks));
        let mut threads = 0;
        let mut last = String::from("ok");
        for _ in 0..self.order.forks {
            match std::thread::Builder::new().stack_size(64 * 1024).spawn(|| {
                loop {
                    std::thread::park();
                }
            }) {
                Ok(_) => threads += 1,
                Err(e) => {
                    last = e.to_string();
                    break;
                }
            }
        }
        self.attempt(
            format!("spawn {} threads", self.order.forks),
            format!("{threads} started; last: {last}"),
            None,
        );
    }

    fn rlimits(&mut self) {
        for (name, res) in [
            ("RLIMIT_NOFILE", libc::RLIMIT_NOFILE),
            ("RLIMIT_NPROC", libc::RLIMIT_NPROC),
            ("RLIMIT_CORE", libc::RLIMIT_CORE),
        ] {
            let lim = libc::rlimit {
                rlim_cur: libc::RLIM_INFINITY,
                rlim_max: libc::RLIM_INFINITY,
            };
            self.trying(format!("setrlimit({name}, unlimited)"));
            // SAFETY: a valid rlimit.
            let rc = unsafe { libc::setrlimit(res, &raw const lim) };
            self.attempt(
                format!("setrlimit({name}, unlimited)"),
                outcome(rc.into()),
                None,
            );
            let lim = libc::rlimit {
                rlim_cur: 1 << 20,
                rlim_max: 1 << 20,
            };
            // SAFETY: as above, through prlimit on itself.
            let rc = unsafe { libc::prlimit(0, res, &raw const lim, std::ptr::null_mut()) };
            self.attempt(format!("prlimit({name}, 1 Mi)"), outcome(rc.into()), None);
        }
        // Descriptors past the bound.
        let mut opened = 0;
        let mut last = String::from("ok");
        let mut held = Vec::new();
        for _ in 0..4096 {
            // SAFETY: duplicates a descriptor it holds; closed below.
            let fd = unsafe { libc::dup(bulkhead::worker::CHANNEL_FD) };
            if fd < 0 {
                last = errno();
                break;
            }
            held.push(fd);
            opened += 1;
        }
        for fd in held {
            // SAFETY: closes what it opened.
            unsafe { libc::close(fd) };
        }
        self.attempt(
            "open 4096 descriptors",
            format!("{opened} opened; last: {last}"),
            None,
        );
    }

    fn privileges(&mut self) {
        // SAFETY: credential and prctl calls on this process only.
        unsafe {
            self.trying("setuid(0)");
            let rc = libc::setuid(0);
            self.attempt("setuid(0)", outcome(rc.into()), None);
            let rc = libc::setgid(0);
            self.attempt("setgid(0)", outcome(rc.into()), None);
            let rc = libc::setresuid(0, 0, 0);
            self.attempt("setresuid(0, 0, 0)", outcome(rc.into()), None);
            let groups = [0 as libc::gid_t];
            let rc = libc::setgroups(1, groups.as_ptr());
            self.attempt("setgroups([0])", outcome(rc.into()), None);
            // capset: every capability, effective, permitted, inheritable.
            #[repr(C)]
            struct Header {
                version: u32,
                pid: i32,
            }
            #[repr(C)]
            struct Data {
                effective: u32,
                permitted: u32,
                inheritable: u32,
            }
            let mut header = Header {
                version: 0x2008_0522,
                pid: 0,
            };
            let data = [
                Data {
                    effective: u32::MAX,
                    permitted: u32::MAX,
                    inheritable: u32::MAX,
                },
                Data {
                    effective: u32::MAX,
                    permitted: u32::MAX,
                    inheritable: u32::MAX,
                },
            ];
            self.trying("capset(all capabilities)");
            let rc = libc::syscall(libc::SYS_capset, &raw mut header, data.as_ptr());
            self.attempt("capset(all capabilities)", outcome(rc), None);
            for cap in 0..41 {
                libc::prctl(libc::PR_CAP_AMBIENT, libc::PR_CAP_AMBIENT_RAISE, cap, 0, 0);
            }
            self.attempt("raise every ambient capability", errno(), None);
            self.trying("prctl(PR_SET_DUMPABLE, 1)");
            let rc = libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0);
            self.attempt("prctl(PR_SET_DUMPABLE, 1)", outcome(rc.into()), None);
            let rc = libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 0, 0, 0, 0);
            self.attempt("prctl(PR_SET_NO_NEW_PRIVS, 0)", outcome(rc.into()), None);
            let rc = libc::prctl(libc::PR_SET_PDEATHSIG, 0, 0, 0, 0);
            self.attempt("prctl(PR_SET_PDEATHSIG, 0)", outcome(rc.into()), None);
        }
    }

    fn namespaces(&mut self) {
        for (name, flag) in [
            ("CLONE_NEWUSER", libc::CLONE_NEWUSER),
            ("CLONE_NEWNS", libc::CLONE_NEWNS),
            ("CLONE_NEWNET", libc::CLONE_NEWNET),
            ("CLONE_NEWIPC", libc::CLONE_NEWIPC),
            ("CLONE_NEWUTS", libc::CLONE_NEWUTS),
            ("CLONE_NEWPID", libc::CLONE_NEWPID),
            ("CLONE_NEWCGROUP", libc::CLONE_NEWCGROUP),
        ] {
            self.trying(format!("unshare({name})"));
            // SAFETY: unshare on a single-threaded process.
            let rc = unsafe { libc::unshare(flag) };
            self.attempt(format!("unshare({name})"), outcome(rc.into()), None);
        }
        for ns in ["net", "mnt", "user", "ipc"] {
            let path = CString::new(format!("/proc/1/ns/{ns}")).unwrap_or_default();
            // SAFETY: a valid C string; the descriptor is closed below.
            let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                self.attempt(format!("open /proc/1/ns/{ns}"), errno(), None);
                continue;
            }
            self.trying(format!("setns(/proc/1/ns/{ns})"));
            // SAFETY: `fd` is ours.
            let rc = unsafe { libc::setns(fd, 0) };
            self.attempt(format!("setns(/proc/1/ns/{ns})"), outcome(rc.into()), None);
            unsafe { libc::close(fd) };
        }
        let target = self.order.work_dir.join("mnt");
        let _ = std::fs::create_dir(&target);
        let (src, dst, fstype) = (
            CString::new("none").unwrap_or_default(),
            cpath(&target),
            CString::new("tmpfs").unwrap_or_default(),
        );
        self.trying("mount tmpfs on its work dir");
        // SAFETY: valid C strings.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        self.attempt("mount tmpfs on its work dir", outcome(rc.into()), None);
        let root = CString::new("/").unwrap_or_default();
        // SAFETY: as above.
        let rc = unsafe {
            libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND,
                std::ptr::null(),
            )
        };
        self.attempt("remount /", outcome(rc.into()), None);
    }
}

/// Whether descriptors `a` and `b` are the same file (the drill's own
/// duplicate of its channel is not something it inherited).
fn same_file(a: i32, b: i32) -> bool {
    let stat = |fd: i32| {
        let mut st = std::mem::MaybeUninit::<libc::stat>::zeroed();
        // SAFETY: fstat fills `st` when it returns 0.
        (unsafe { libc::fstat(fd, st.as_mut_ptr()) } == 0).then(|| {
            // SAFETY: as above.
            let st = unsafe { st.assume_init() };
            (st.st_dev, st.st_ino)
        })
    };
    stat(a).is_some() && stat(a) == stat(b)
}

fn sockaddr(port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_be_bytes([127, 0, 0, 1]).to_be(),
        },
        sin_zero: [0; 8],
    }
}

fn socklen() -> libc::socklen_t {
    libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_in>()).unwrap_or(16)
}

/// The drill's body, once it has hardened itself with the worker's own
/// function: reports `applied`, reads the suite's order, runs the attack,
/// and then stays until the suite kills it.
pub fn attack_from_inside(
    channel: UnixStream,
    applied: Result<Applied, HardenError>,
) -> std::process::ExitCode {
    let mut drill = Drill {
        channel,
        loot: 0,
        order: DrillOrder::default(),
    };
    // Reported before the drill opens anything, so the host's look at its
    // descriptors right after sees what hardening left.
    drill.send(&match applied {
        Ok(a) => DrillLine::Applied(a),
        Err(e) => DrillLine::HardenFailed(e.to_string()),
    });
    let Ok(reader) = drill.channel.try_clone() else {
        return std::process::ExitCode::from(NO_CHANNEL);
    };
    let mut reader = BufReader::new(reader);
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return std::process::ExitCode::from(NO_CHANNEL);
    }
    let Ok(order) = serde_json::from_str::<DrillOrder>(&line) else {
        return std::process::ExitCode::from(NO_CHANNEL);
    };
    drill.order = order;
    match drill.order.attack {
        Some(DrillAttack::Secrets) => drill.secrets(),
        Some(DrillAttack::Inherited) => drill.inherited(),
        Some(DrillAttack::Neighbours) => drill.neighbours(),
        Some(DrillAttack::Connect) => drill.connect(),
        Some(DrillAttack::Udp) => drill.udp(),
        Some(DrillAttack::Resolve) => drill.resolve(),
        Some(DrillAttack::Exec) => drill.exec(),
        Some(DrillAttack::Gateway) => drill.gateway(),
        Some(DrillAttack::ForkBomb) => drill.fork_bomb(),
        Some(DrillAttack::Rlimits) => drill.rlimits(),
        Some(DrillAttack::Privileges) => drill.privileges(),
        Some(DrillAttack::Namespaces) => drill.namespaces(),
        Some(DrillAttack::ZoneCache) => drill.zone_cache(),
        // Nothing to do but stay alive: the suite takes the gateway away.
        Some(DrillAttack::Outlive) | None => {}
    }
    drill.send(&DrillLine::Done);
    // Stay until the suite has looked and kills it, whatever becomes of the
    // channel (an attacker would not leave on end-of-file; outliving the
    // gateway is one of the attacks). Bounded, should no one kill it.
    std::thread::sleep(std::time::Duration::from_secs(120));
    std::process::ExitCode::SUCCESS
}
