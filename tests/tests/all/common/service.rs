//! Services under test. In process: [`start`] runs a [`Service`] served by
//! the library's one `serve` on two loopback listeners ([`Server`]). As the
//! real binary: [`ConfigFile`] writes a config, [`Served`] runs
//! `bulkhead serve` on it and kills it with SIGKILL when dropped, and
//! [`token`] stores a token straight into its store. Several nodes on one
//! PostgreSQL database: [`Cluster`].

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bulkhead::api::{IssueRequest, new_token};
use bulkhead::config::ServeConfig;
use bulkhead::serve::{Listeners, Serving};
use bulkhead::service::Service;
use bulkhead::store::{JobStore, SqliteStore};
use serde_json::Value;

use super::http::json;
use super::policies::{TestPolicy, hello, sleeper, thumbnail};

/// The shared module cache of the services under test.
fn service_cache() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("service-cache")
}

/// A running service on loopback, with its own data directory; serving
/// stops when it is dropped.
pub struct Server {
    pub base: String,
    pub admin: String,
    pub admin_token: String,
    pub service: Arc<Service>,
    pub http: reqwest::Client,
    _serving: Serving,
    _data: tempfile::TempDir,
}

/// Starts a service with `tweak` applied to its config. It serves the
/// thumbnailer, hello, and a hostile guest that sleeps until its 1 s
/// wall-clock limit.
pub async fn start(tweak: impl FnOnce(&mut ServeConfig)) -> Server {
    let data = tempfile::tempdir().unwrap();
    let mut config = ServeConfig::default();
    config.storage.data_dir = data.path().join("data");
    config.storage.cache_dir = Some(service_cache());
    config.modules.policies_dir = data.path().join("policies");
    config.modules.modules_dir = PathBuf::from(bulkhead_tests::GUESTS_DIR);
    config.queue.workers = 4;
    // Guests run in worker processes started from the binary under test
    // (this test harness is not one).
    config.isolation.program = Some(PathBuf::from(env!("CARGO_BIN_EXE_bulkhead-under-test")));
    for p in [
        thumbnail(5, 20, &["width", "height"]),
        hello(),
        sleeper(1000),
    ] {
        p.write_to(&config.modules.policies_dir);
    }
    tweak(&mut config);
    let service = Service::start(config, None).await.unwrap();
    let admin_token = std::fs::read_to_string(data.path().join("data/admin.token")).unwrap();
    let listeners = Listeners::loopback().await.unwrap();
    let serving = bulkhead::serve::spawn(Arc::clone(&service), listeners).unwrap();
    Server {
        base: format!("http://{}", serving.public),
        admin: format!("http://{}", serving.admin),
        admin_token: admin_token.trim().to_owned(),
        service,
        http: reqwest::Client::new(),
        _serving: serving,
        _data: data,
    }
}

/// A new token's secret and record, for `tenant` with `scopes`.
fn issue(tenant: &str, subject: &str, scopes: &[&str]) -> (String, bulkhead::auth::TokenRecord) {
    new_token(&IssueRequest {
        tenant: tenant.into(),
        subject: subject.into(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        ttl: None,
    })
    .unwrap()
}

impl Drop for Server {
    /// Removes the service's job directories (on tmpfs by default), as a
    /// shutdown does: tests drop their services without one.
    fn drop(&mut self) {
        let _ = bulkhead::sandbox::remove_tree(self.service.work_dir());
    }
}

impl Server {
    /// Every directory a job of this service may be made in: the work
    /// directory, and each worker's own directory (a file system of its
    /// own, mounted nowhere, reached as the worker's working directory,
    /// `/proc/<pid>/cwd`).
    pub fn job_roots(&self) -> Vec<PathBuf> {
        let mut roots = vec![self.service.work_dir().to_owned()];
        for pids in self.service.isolation().workers.values() {
            roots.extend(
                pids.iter()
                    .map(|pid| PathBuf::from(format!("/proc/{pid}/cwd"))),
            );
        }
        roots
    }

    /// Issues a token (subject `<tenant>-ci`) straight into the store.
    pub async fn token(&self, tenant: &str, scopes: &[&str]) -> String {
        let (secret, record) = issue(tenant, &format!("{tenant}-ci"), scopes);
        self.service.store().insert_token(&record).await.unwrap();
        secret
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// `GET path` on the public API as `token`.
    pub fn get(&self, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.http.get(self.url(path)).bearer_auth(token)
    }

    /// `POST path` on the public API as `token`.
    pub fn post(&self, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.http.post(self.url(path)).bearer_auth(token)
    }

    /// `DELETE path` on the public API as `token`.
    pub fn delete(&self, path: &str, token: &str) -> reqwest::RequestBuilder {
        self.http.delete(self.url(path)).bearer_auth(token)
    }

    /// The bytes of job `id`'s output `name`, downloaded as `token`.
    pub async fn output(&self, token: &str, id: &str, name: &str) -> bytes::Bytes {
        let url = self.url(&format!("/v1/jobs/{id}/outputs/{name}"));
        let resp = self.http.get(url).bearer_auth(token).send().await.unwrap();
        assert_eq!(
            resp.status(),
            reqwest::StatusCode::OK,
            "output {name} of {id}"
        );
        resp.bytes().await.unwrap()
    }

    /// Stores a job of `tenant`'s as finished, with a report of `module`'s
    /// whose captured stdout is `stdout` bytes of `x` (as a node with a
    /// larger answers' budget could have stored it); returns its id.
    pub async fn store_finished(&self, tenant: &str, module: &str, stdout: usize) -> String {
        let now = bulkhead::store::now_ms();
        let record = super::finished_record(&super::uuid_like(), tenant, now);
        let mut report =
            bulkhead::sandbox::JobReport::not_run(&record.id, module, "stored by the test");
        report.stdout.text = "x".repeat(stdout);
        self.service
            .store()
            .insert_finished_job(&record, &report, now, None)
            .await
            .unwrap();
        record.id
    }

    /// Polls a job until it reaches a final state (bounded: 30 s).
    pub async fn finished(&self, token: &str, id: &str) -> Value {
        super::http::poll_finished(&self.http, &self.base, token, id).await
    }

    /// The newest `limit` audit entries, read over the admin API.
    pub async fn audit(&self, limit: usize) -> Vec<Value> {
        json(
            self.http
                .get(format!("{}/admin/v1/audit?limit={limit}", self.admin))
                .bearer_auth(&self.admin_token),
        )
        .await
        .as_array()
        .unwrap()
        .clone()
    }
}

/// Stores a new token (subject `ci`) for `tenant` with `scopes` directly in
/// the store under the data directory `data`; returns its secret.
pub async fn token(data: &Path, tenant: &str, scopes: &[&str]) -> String {
    let (secret, record) = issue(tenant, "ci", scopes);
    SqliteStore::open(&data.join("bulkhead.sqlite"))
        .await
        .unwrap()
        .insert_token(&record)
        .await
        .unwrap();
    secret
}

/// The config file of a `bulkhead serve` under test: both listeners on
/// loopback ports the kernel picks, the shared module cache, the built
/// guests, and `policies`. `server`, `queue` and `audit` are the bodies of
/// those tables (TOML keys, one a line).
#[derive(Default)]
pub struct ConfigFile<'a> {
    pub policies: Vec<TestPolicy>,
    pub server: &'a str,
    pub queue: &'a str,
    pub audit: &'a str,
}

/// What a node sharing a store adds to a [`ConfigFile`]: bodies of the
/// `[storage]` (beyond the data and cache directories: `url = …`) and
/// `[node]` tables, and whole tables appended at the end (`[tokens]`,
/// `[[services]]`).
#[derive(Default)]
pub struct NodeConfig<'a> {
    pub storage: &'a str,
    pub node: &'a str,
    pub tables: &'a str,
}

impl ConfigFile<'_> {
    /// Writes the config and its policies under `dir`; returns the
    /// config's path and the data directory.
    pub fn write(&self, dir: &Path) -> (PathBuf, PathBuf) {
        self.write_with(dir, &NodeConfig::default())
    }

    /// [`ConfigFile::write`] with `node`'s additions.
    pub fn write_with(&self, dir: &Path, node: &NodeConfig) -> (PathBuf, PathBuf) {
        let data = dir.join("data");
        let policies = dir.join("policies");
        std::fs::create_dir_all(&policies).unwrap();
        for p in &self.policies {
            p.write_to(&policies);
        }
        let config = dir.join("bulkhead.toml");
        std::fs::write(
            &config,
            format!(
                "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{}\n[storage]\ndata_dir = \"{}\"\ncache_dir = \"{}\"\n{}\n[modules]\npolicies_dir = \"{}\"\nmodules_dir = \"{}\"\n[queue]\n{}\n[audit]\n{}\n[node]\n{}\n{}\n",
                self.server,
                data.display(),
                service_cache().display(),
                node.storage,
                policies.display(),
                bulkhead_tests::GUESTS_DIR,
                self.queue,
                self.audit,
                node.node,
                node.tables,
            ),
        )
        .unwrap();
        (config, data)
    }
}

/// A running `bulkhead serve`; dropping it kills it with SIGKILL (no
/// shutdown path runs), so a failing test leaves no service behind.
pub struct Served {
    child: Child,
    /// The public listener's address.
    pub public: SocketAddr,
    /// The admin listener's address.
    pub admin: SocketAddr,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Served {
    /// Starts `bulkhead serve --config <config>` and reads both addresses
    /// from the first line it prints.
    pub fn start(config: &Path) -> Self {
        Self::start_with(config, None)
    }

    /// [`Served::start`] under `RLIMIT_NOFILE` = `nofile`.
    pub fn start_with_nofile(config: &Path, nofile: u64) -> Self {
        Self::start_with(config, Some(nofile))
    }

    fn start_with(config: &Path, nofile: Option<u64>) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_bulkhead-under-test"));
        cmd.arg("serve")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(nofile) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: only `setrlimit`, async-signal-safe, between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    let lim = libc::rlimit {
                        rlim_cur: nofile,
                        rlim_max: nofile,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().unwrap();
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        // Keep draining: a closed pipe would fail the service's next print.
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        let mut addrs = line
            .split(|c: char| c.is_whitespace() || c == ',' || c == ')')
            .filter_map(|w| w.strip_prefix("http://"))
            .map(|a| a.parse::<SocketAddr>().unwrap());
        let (public, admin) = match (addrs.next(), addrs.next()) {
            (Some(public), Some(admin)) => (public, admin),
            _ => panic!("no addresses in {line:?}"),
        };
        Self {
            child,
            public,
            admin,
        }
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The public API's base URL.
    pub fn base(&self) -> String {
        format!("http://{}", self.public)
    }

    /// Sends it SIGTERM.
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends it `signal`.
    pub fn signal(&self, signal: i32) {
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(self.pid() as i32, signal) }, 0);
    }

    /// How it exited, once it has (`None` while it runs).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().unwrap()
    }

    /// Waits for the process to exit, up to `within`; whether it did.
    pub async fn exited_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS:`, `VmHWM:`).
pub fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Several `bulkhead serve` nodes on one PostgreSQL database, each with its
/// own data directory and the same admin token and policies. Dropping it
/// kills every node (SIGKILL).
pub struct Cluster {
    /// The nodes, in the order they started (named `node-0`, `node-1`, …).
    pub nodes: Vec<Served>,
    /// The database they share.
    pub url: String,
    /// The admin token every node accepts.
    pub admin_token: String,
    pub http: reqwest::Client,
    configs: Vec<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts `n` nodes on a fresh database of the shared test server, or
    /// `None` where there is no PostgreSQL to test against (outside CI).
    pub async fn start(n: usize, file: &ConfigFile<'_>, tables: &str) -> Option<Self> {
        let url = bulkhead::store::pg_server::fresh_database().await?;
        Some(Self::start_on(url, n, file, tables))
    }

    /// Starts `n` nodes on the database at `url`; `tables` are appended to
    /// every node's config.
    pub fn start_on(url: String, n: usize, file: &ConfigFile<'_>, tables: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let admin_token = bulkhead::auth::mint().secret;
        let mut configs = Vec::new();
        let mut nodes = Vec::new();
        for i in 0..n {
            let node_dir = dir.path().join(format!("node-{i}"));
            let storage = format!("url = \"{url}\"\npool_size = 8");
            let name = format!("name = \"node-{i}\"");
            let (config, data) = file.write_with(
                &node_dir,
                &NodeConfig {
                    storage: &storage,
                    node: &name,
                    tables,
                },
            );
            write_admin_token(&data, &admin_token);
            // One at a time: each applies the migrations it finds missing.
            nodes.push(Served::start(&config));
            configs.push(config);
        }
        Self {
            nodes,
            url,
            admin_token,
            http: reqwest::Client::new(),
            configs,
            _dir: dir,
        }
    }

    /// Node `i`'s config file.
    pub fn config(&self, i: usize) -> &Path {
        &self.configs[i]
    }

    /// Node `i`'s public API base URL.
    pub fn base(&self, i: usize) -> String {
        self.nodes[i].base()
    }

    /// `GET path` on node `i`'s admin API.
    pub fn admin_get(&self, i: usize, path: &str) -> reqwest::RequestBuilder {
        self.http
            .get(format!("http://{}{path}", self.nodes[i].admin))
            .bearer_auth(&self.admin_token)
    }

    /// `POST path` on node `i`'s admin API.
    pub fn admin_post(&self, i: usize, path: &str) -> reqwest::RequestBuilder {
        self.http
            .post(format!("http://{}{path}", self.nodes[i].admin))
            .bearer_auth(&self.admin_token)
    }

    /// Issues a token through node `i`'s admin API; returns its secret and
    /// id.
    pub async fn token(&self, i: usize, tenant: &str, scopes: &[&str]) -> (String, String) {
        let issued = json(
            self.admin_post(i, "/admin/v1/tokens")
                .json(&serde_json::json!({
                    "tenant": tenant,
                    "subject": format!("{tenant}-ci"),
                    "scopes": scopes,
                })),
        )
        .await;
        (
            issued["token"].as_str().unwrap().to_owned(),
            issued["record"]["id"].as_str().unwrap().to_owned(),
        )
    }

    /// Kills node `i` (SIGKILL) and starts it again on the same config and
    /// data directory.
    pub fn restart(&mut self, i: usize) {
        // Dropping it kills it.
        drop(self.nodes.remove(i));
        self.nodes.insert(i, Served::start(&self.configs[i]));
    }
}

/// Writes the admin token a node accepts into its data directory (mode
/// 0600), before its first start.
fn write_admin_token(data: &Path, secret: &str) {
    use std::os::unix::fs::OpenOptionsExt as _;
    std::fs::create_dir_all(data).unwrap();
    std::fs::set_permissions(data, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(data.join("admin.token"))
        .unwrap();
    std::io::Write::write_all(&mut f, format!("{secret}\n").as_bytes()).unwrap();
}
