//! A throwaway PostgreSQL server for tests (the store's, and the
//! multi-node tests that start real nodes): Debian's
//! `postgresql` binaries, `initdb` into a temporary directory, the server on
//! a free port of 127.0.0.1 (and a Unix socket inside that directory),
//! `fsync` off. One server per test binary, started by the first test that
//! asks, stopped at process exit (and killed by the kernel if the process
//! dies first); one fresh database per test, so tests stay independent.
//!
//! Run as root, `initdb` and the server run as the `postgres` system user
//! (both refuse root), which then owns the temporary directory.
//!
//! A test that takes the database away starts a server of its own
//! ([`PgServer::start_own`]), which it can stop and start again.
//!
//! Without the binaries the PostgreSQL half of the suite is skipped with a
//! message, except where `CI` is set: there a missing server is a failure.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The running server, taken and dropped (stopped) at process exit.
static SERVER: Mutex<Option<Server>> = Mutex::new(None);

/// What tests need of the server, or why there is none.
static STARTED: OnceLock<Result<Endpoint, String>> = OnceLock::new();

/// How to reach the shared server.
#[derive(Clone, Debug)]
struct Endpoint {
    port: u16,
}

struct Server {
    postmaster: Child,
    // Removed after the server has stopped (fields drop after `drop`).
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        stop(&mut self.postmaster);
    }
}

extern "C" fn stop_at_exit() {
    let server = SERVER.lock().unwrap_or_else(|e| e.into_inner()).take();
    drop(server);
}

/// The directory holding `initdb`, `postgres` and `pg_isready`:
/// `BULKHEAD_PG_BIN` if set, else the newest `/usr/lib/postgresql/*/bin`
/// (Debian's layout), else `pg_config --bindir`, else wherever `initdb` is
/// on `PATH`.
fn find_bin() -> Result<PathBuf, String> {
    let has = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = std::env::var_os("BULKHEAD_PG_BIN") {
        let dir = PathBuf::from(dir);
        return if has(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "BULKHEAD_PG_BIN={} holds no initdb and postgres",
                dir.display()
            ))
        };
    }
    let mut debian: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_str()?.parse().ok()?;
            Some((version, e.path().join("bin")))
        })
        .filter(|(_, bin)| has(bin))
        .collect();
    debian.sort();
    if let Some((_, bin)) = debian.pop() {
        return Ok(bin);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if out.status.success() && has(&dir) {
            return Ok(dir);
        }
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|dir| has(dir))
        .ok_or_else(|| {
            "no PostgreSQL server binaries (initdb, postgres): install Debian's `postgresql` \
             package or set BULKHEAD_PG_BIN"
                .to_owned()
        })
}

/// The uid and gid of the `postgres` system user, from `/etc/passwd`.
fn postgres_user() -> Result<(u32, u32), String> {
    let passwd = std::fs::read_to_string("/etc/passwd").map_err(|e| format!("/etc/passwd: {e}"))?;
    passwd
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            (fields.next() == Some("postgres")).then_some(())?;
            let mut ids = fields.skip(1).map(str::parse::<u32>);
            Some((ids.next()?.ok()?, ids.next()?.ok()?))
        })
        .ok_or_else(|| {
            "running as root, and there is no `postgres` user to run initdb and the server as"
                .to_owned()
        })
}

/// `program` from `bin`, as the user the server runs as (`owner` when the
/// tests run as root), in `dir` (the tests' own working directory may not
/// be readable by that user).
fn command(bin: &Path, program: &str, owner: Option<(u32, u32)>, dir: &Path) -> Command {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = Command::new(bin.join(program));
    cmd.current_dir(dir).env("LC_ALL", "C").env("TZ", "UTC");
    if let Some((uid, gid)) = owner {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

/// The uid and gid the server runs as, when the tests run as root.
type Owner = Option<(u32, u32)>;

/// A new cluster in a temporary directory: the binaries, the user the
/// server runs as, and the directory (`data/`, `sock/`).
fn init() -> Result<(PathBuf, Owner, tempfile::TempDir), String> {
    let bin = find_bin()?;
    let owner = rustix::process::getuid()
        .is_root()
        .then(postgres_user)
        .transpose()?;
    let dir = tempfile::Builder::new()
        .prefix("bulkhead-pg-")
        .tempdir()
        .map_err(|e| format!("temporary directory: {e}"))?;
    let data = dir.path().join("data");
    let sockets = dir.path().join("sock");
    std::fs::create_dir(&sockets).map_err(|e| e.to_string())?;
    if let Some((uid, gid)) = owner {
        for path in [dir.path(), &sockets] {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", path.display()))?;
        }
    }
    let out = command(&bin, "initdb", owner, dir.path())
        .args(["--auth=trust", "--username=postgres", "--encoding=UTF8"])
        .args(["--no-locale", "--no-sync", "-D"])
        .arg(&data)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.join("initdb").display()))?;
    if !out.status.success() {
        return Err(format!(
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok((bin, owner, dir))
}

/// Starts the server of the cluster in `dir` on `port` and waits until it
/// accepts connections.
fn launch(bin: &Path, owner: Option<(u32, u32)>, dir: &Path, port: u16) -> Result<Child, String> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .map_err(|e| e.to_string())?;
    let log_err = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = command(bin, "postgres", owner, dir);
    cmd.arg("-D")
        .arg(dir.join("data"))
        .args(["-p", &port.to_string(), "-k"])
        .arg(dir.join("sock"))
        .args(["-c", "listen_addresses=127.0.0.1"])
        .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
        .args(["-c", "full_page_writes=off", "-c", "max_connections=300"])
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err);
    // The server dies with the test process, even one killed outright.
    // The signal is tied to the thread that forks, so a thread that lives
    // until the process exits spawns it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("bulkhead-pg-server".into())
        .spawn(move || {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: prctl is async-signal-safe; it runs in the child
            // after the uid change (which would clear it), before exec.
            unsafe {
                cmd.pre_exec(|| {
                    rustix::process::set_parent_process_death_signal(Some(
                        rustix::process::Signal::QUIT,
                    ))
                    .map_err(std::io::Error::from)
                });
            }
            let _ = tx.send(cmd.spawn());
            loop {
                std::thread::park();
            }
        })
        .map_err(|e| e.to_string())?;
    let mut postmaster = rx
        .recv()
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot start postgres: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = command(bin, "pg_isready", owner, dir)
            .args(["-q", "-h", "127.0.0.1", "-p", &port.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        if ready {
            return Ok(postmaster);
        }
        let log = || std::fs::read_to_string(dir.join("server.log"));
        if let Ok(Some(status)) = postmaster.try_wait() {
            return Err(format!(
                "postgres exited ({status}): {}",
                log().unwrap_or_default()
            ));
        }
        if Instant::now() > deadline {
            stop(&mut postmaster);
            return Err(format!(
                "postgres not ready after 60 s: {}",
                log().unwrap_or_default()
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Stops a server at once (SIGQUIT: immediate shutdown, nothing worth
/// keeping), killing it if it lingers.
fn stop(postmaster: &mut Child) {
    if let Some(pid) = rustix::process::Pid::from_raw(postmaster.id() as i32) {
        let _ = rustix::process::kill_process(pid, rustix::process::Signal::QUIT);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while matches!(postmaster.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = postmaster.kill();
    let _ = postmaster.wait();
}

fn start() -> Result<Endpoint, String> {
    let (bin, owner, dir) = init()?;
    let port = free_port()?;
    let postmaster = launch(&bin, owner, dir.path(), port)?;
    *SERVER.lock().unwrap_or_else(|e| e.into_inner()) = Some(Server {
        postmaster,
        _dir: dir,
    });
    // SAFETY: registers a plain function with no arguments.
    unsafe {
        libc::atexit(stop_at_exit);
    }
    Ok(Endpoint { port })
}

/// Whether there is no PostgreSQL to test against and that is allowed
/// (outside CI): said once on stderr.
fn skip(why: &str) -> bool {
    if why.starts_with("no PostgreSQL") && std::env::var_os("CI").is_none() {
        // Once, and past the harness's capture of passing tests'
        // output, so a developer sees what was not tested.
        static SAID: std::sync::Once = std::sync::Once::new();
        SAID.call_once(|| {
            use std::io::Write as _;
            let _ = writeln!(
                std::io::stderr(),
                "warning: the PostgreSQL store tests pass without running: {why} (with CI set, this fails)"
            );
        });
        true
    } else {
        false
    }
}

/// Creates a new database on the server on `port`; returns its URL.
async fn create_database(port: u16) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let name = format!("t{}", NEXT.fetch_add(1, Ordering::SeqCst));
    let admin = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    use sqlx::Connection as _;
    let mut conn = sqlx::PgConnection::connect(&admin)
        .await
        .unwrap_or_else(|e| panic!("connect to the test server: {e}"));
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("create database {name}: {e}"));
    let _ = conn.close().await;
    format!("postgres://postgres@127.0.0.1:{port}/{name}")
}

/// A PostgreSQL server of one test's own (not the shared one), for tests
/// that take the database away: [`PgServer::stop`] and [`PgServer::start`]
/// stop it at once and start it again on the same port and data. Stopped
/// and removed when dropped (and killed by the kernel if the test process
/// dies first).
pub struct PgServer {
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    port: u16,
    postmaster: Option<Child>,
    // Removed after the server has stopped (fields drop after `drop`).
    dir: tempfile::TempDir,
}

impl std::fmt::Debug for PgServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgServer")
            .field("port", &self.port)
            .field("running", &self.postmaster.is_some())
            .finish_non_exhaustive()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut postmaster) = self.postmaster.take() {
            stop(&mut postmaster);
        }
    }
}

impl PgServer {
    /// A new server of its own, running; `None` when there is no
    /// PostgreSQL to test against outside CI (as [`fresh_database`]).
    ///
    /// # Panics
    /// If the server cannot be started where it should.
    pub fn start_own() -> Option<Self> {
        let started = init().and_then(|(bin, owner, dir)| {
            let port = free_port()?;
            let postmaster = launch(&bin, owner, dir.path(), port)?;
            Ok(Self {
                bin,
                owner,
                port,
                postmaster: Some(postmaster),
                dir,
            })
        });
        match started {
            Ok(server) => Some(server),
            Err(why) if skip(&why) => None,
            Err(why) => panic!("cannot start a PostgreSQL server for the tests: {why}"),
        }
    }

    /// The URL of a new, empty database on it.
    ///
    /// # Panics
    /// If the server is stopped or refuses.
    pub async fn fresh_database(&self) -> String {
        create_database(self.port).await
    }

    /// Stops it at once (as a crash would: connections drop, nothing is
    /// flushed).
    pub fn stop(&mut self) {
        if let Some(mut postmaster) = self.postmaster.take() {
            stop(&mut postmaster);
        }
    }

    /// Starts it again on the same port and data, and waits until it
    /// accepts connections.
    ///
    /// # Panics
    /// If it cannot.
    pub fn start(&mut self) {
        if self.postmaster.is_none() {
            let postmaster = launch(&self.bin, self.owner, self.dir.path(), self.port)
                .unwrap_or_else(|e| panic!("cannot restart the PostgreSQL server: {e}"));
            self.postmaster = Some(postmaster);
        }
    }
}

/// The URL of a new, empty database on the shared server (started by the
/// first caller), or `None` when there is no PostgreSQL to test against
/// outside CI (said on stderr).
///
/// # Panics
/// If the server cannot be started where it should: binaries present, or
/// `CI` set.
pub async fn fresh_database() -> Option<String> {
    let endpoint = match STARTED.get_or_init(start) {
        Ok(endpoint) => endpoint.clone(),
        Err(why) if skip(why) => return None,
        Err(why) => panic!("cannot start a PostgreSQL server for the tests: {why}"),
    };
    Some(create_database(endpoint.port).await)
}
