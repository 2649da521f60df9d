//! The service's one TOML config. Every key is optional; with no file at all
//! the service runs on the defaults below: loopback only, SQLite under
//! `./data`, the repository's example policies and modules.
//!
//! ```toml
//! [server]
//! listen = "127.0.0.1:8080"        # public API
//! admin_listen = "127.0.0.1:8081"  # admin API and metrics; keep it on loopback
//! max_body = "64 MiB"              # request bodies (413 beyond)
//! max_wait = "60 s"                # longest `?wait=` a caller may ask for
//! shutdown_grace = "30 s"          # running jobs get this long on shutdown; open
//!                                  # connections then get 2 s more, and are closed
//! max_downloads_per_tenant = 16    # output downloads one tenant may have running (429 beyond)
//! max_uploads_per_tenant = 16      # submissions one tenant may have uploading (429 beyond)
//! max_buffered_uploads = "512 MiB" # bytes all uploads in flight may reserve; a tenant a quarter (429 beyond)
//! max_buffered_answers = "1 GiB"   # bytes answers of jobs with large reports may hold; a tenant a quarter (429 beyond); at least 16 MiB
//! # The edge (see `serve`): bounds that hold whatever a client sends, with or
//! # without a token. They apply to both listeners unless named `admin_`.
//! header_read_timeout = "10 s"     # from waiting for a request (after accept, or
//!                                  # after the previous response) to its last header
//! idle_timeout = "10 s"            # a kept-alive connection with no request
//! body_read_timeout = "15 s"       # between two frames of a request body
//! write_timeout = "30 s"           # a response write with no progress (a client that stopped reading)
//! max_header_size = "16 KiB"       # request line and headers (431 beyond); at least 8 KiB
//! max_connections = 1024           # open public connections
//! max_connections_per_client = 64  # open public connections per client address (IPv6: per /64)
//! health_reserve = 16              # beyond max_connections: connections that may only
//!                                  # ask /healthz or /readyz
//! admin_max_connections = 64       # the admin listener's own budget (a quarter per client address)
//! # When a listener's total is full, a new connection sheds the idle connection (no request
//! # in flight) that has waited longest, from the address holding the most connections.
//! min_body_rate = "1 KiB"          # per second: a request body's average from the first read on
//! min_write_rate = "1 KiB"         # per second of time a response waits on its client to read
//! min_rate_grace = "10 s"          # both rates are checked only after this long ("0 B" turns one off)
//!
//! [audit]
//! retention = "30 d"               # audit rows older than this are deleted
//! denials_per_client = 5           # denials written per client address (and, authenticated, per
//! denials_per_minute = 60          # tenant and action) per minute, and from all together; beyond,
//!                                  # counted in one `<action>.summary` row per key and minute
//!
//! [storage]
//! data_dir = "data"                # SQLite file, job inputs and outputs, admin token
//! retention = "24 h"               # finished jobs and outputs are kept this long
//! # cache_dir = "data/cache"       # precompiled modules (default: <data_dir>/cache)
//! # work_dir = "/dev/shm/bulkhead" # running jobs' directories (default: on /dev/shm)
//! # url = "postgres://bulkhead@db.internal/bulkhead"  # jobs, tokens and audit in PostgreSQL
//!                                  # instead of <data_dir>/bulkhead.sqlite, shared by every node
//!                                  # on it (README: "Several nodes on one PostgreSQL")
//! # pool_size = 16                 # PostgreSQL connections this node holds at most
//!
//! [modules]
//! policies_dir = "policies"        # one <name>.toml per module
//! modules_dir = "target/guests/wasm32-wasip2/release"  # <name>.wasm per policy
//!
//! [queue]
//! workers = 8                      # jobs running at once (besides those that waited for room)
//! max_queued = 1000                # queued jobs in total (429 beyond)
//! max_queued_per_tenant = 200      # queued jobs per tenant (429 beyond)
//! max_running_per_tenant = 4
//! max_running_per_module = 8
//! max_attempts = 3                 # starts of a job that never finished (crash, host error) before it is failed
//! idempotency_retention = "24 h"   # an `Idempotency-Key` names its first job this long
//! lease = "30 s"                   # a running job's claim, renewed every third of it; re-run elsewhere once it runs out
//!
//! [isolation]                      # where guests run (see ARCHITECTURE.md, "The second wall")
//! mode = "process"                 # hardened worker processes; "in-process" for debugging only
//! # require = ["landlock", "seccomp", …]  # layers workers must have (default: every layer; the
//!                                  # service refuses to start where one is missing)
//! # program = "/usr/bin/bulkhead"  # the binary workers start from (default: this one)
//! # run_as = [65534, 65534]        # uid and gid of workers when the service runs as root
//!
//! [zones.untrusted]                # one worker pool per trust zone (a policy's `module.zone`)
//! # workers = 1                    # worker processes (default: one for every two cores, at least one)
//! jobs_per_worker = 1000           # jobs before a worker is replaced (1: a fresh process per job)
//! # memory = "2 GiB"               # a worker's memory ceiling, where the host offers cgroups
//! disk = "2 GiB"                   # what the zone's workers' directories hold at once, all together: each job
//!                                  # is given room for its files (inputs, output limit) before it is sent, and
//!                                  # waits for it; each worker's directory is a tmpfs of its own as large as its
//!                                  # jobs' rooms, mounted nowhere, where the service may mount one (as root);
//!                                  # "0 B": no bound, plain directories
//!
//! [tokens]                         # call tokens minted for internal services
//! issuer = "bulkhead"              # `iss`
//! lifetime = "30 s"                # at most 300 s, and never past the job's deadline
//! key_grace = "10 min"             # a rotated-out key stays in the JWKS this long
//! # signing_key = "/etc/bulkhead/ed25519.pem"  # PKCS#8 PEM, mode 0600 (default: generated under <data_dir>/keys)
//!
//! [[services]]                     # internal services guests may call, by name
//! name = "palette"                 # guests call http://palette/…
//! url = "http://127.0.0.1:9101"    # where the host sends those calls
//! # audience = "palette"           # `aud` of its tokens (default: the name)
//! # paths = ["/v1/"]               # allowed path prefixes (default: all)
//! # methods = ["GET", "HEAD", "POST"]
//! # max_request = "1 MiB"          # request body, per call
//! # max_response = "4 MiB"         # response body, per call
//! # max_calls = 16                 # per job
//! # timeout = "5 s"                # per call: for the headers, then per body frame
//! # forward_headers = []          # request headers forwarded beyond the allow-list (never credential, identity, routing or trailer headers)
//!
//! [trust.keys]                     # minisign public keys a policy's `module.signed_by` may name
//! # release = "RWQ…"               # the key line `minisign -G` prints; modules are signed with
//!                                  # `minisign -S -m <name>.wasm` (<name>.wasm.minisig beside it)
//!
//! [node]
//! # name = "node-a"                # this node's name among nodes sharing one store (default: the
//!                                  # host name); each start adds a random suffix to make its id
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::policy::{ByteSize, HumanDuration};
use crate::relay::{ServiceDecl, TokenConfig};

/// The whole config.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Listeners and request bounds.
    pub server: Server,
    /// Where state lives.
    pub storage: Storage,
    /// Which modules are served.
    pub modules: Modules,
    /// Queue capacity and concurrency.
    pub queue: Queue,
    /// Call tokens and their signing keys.
    pub tokens: TokenConfig,
    /// Internal services guests may call (`[[services]]`).
    pub services: Vec<ServiceDecl>,
    /// Audit retention and the bound on what anonymous callers make it write.
    pub audit: Audit,
    /// Where guests run: hardened worker processes (the default) or this
    /// process, and the hardening required of workers.
    pub isolation: Isolation,
    /// Worker pools per trust zone (`[zones.<name>]`); a zone not listed
    /// gets [`ZonePool::default`].
    pub zones: std::collections::BTreeMap<String, ZonePool>,
    /// Keys modules may be signed with (`[trust.keys]`).
    pub trust: Trust,
    /// This node's name among several sharing one store (`[node]`).
    pub node: Node,
}

/// `[node]`: how this node is named among the nodes sharing one store.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Node {
    /// A name for operators (default: the host name). Each start of the
    /// process adds its own random suffix to it ([`Node::id`]), so two
    /// nodes given the same name, or one restarted, never share an id.
    pub name: Option<String>,
}

impl Node {
    /// A new id for this start of the node: `<name>-<8 hex digits>`.
    pub fn id(&self) -> String {
        let name = match &self.name {
            Some(name) => name.clone(),
            None => std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "node".to_owned()),
        };
        let suffix: u32 = rand::random();
        format!("{name}-{suffix:08x}")
    }
}

/// `[trust]`: the minisign public keys a policy's `signed_by` may name.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Trust {
    /// Name → minisign public key (the base64 line `minisign -G` prints).
    pub keys: std::collections::BTreeMap<String, String>,
}

/// `[isolation]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Isolation {
    /// `process` (guests run in hardened worker processes) or `in-process`
    /// (in the gateway: for debugging only; a runtime escape then reaches
    /// the keys and the store).
    pub mode: IsolationMode,
    /// Hardening layers every worker must report active, or the service
    /// refuses to start (by their names: `descriptors`, `user_namespace`,
    /// `network_namespace`, `ipc_namespace`, `mount_namespace`,
    /// `unprivileged`, `no_new_privs`, `landlock`, `seccomp`, `rlimits`,
    /// `not_dumpable`, `dies_with_gateway`). Default: all of them.
    pub require: std::collections::BTreeSet<crate::worker::harden::Layer>,
    /// The binary workers are started from (default: this one).
    pub program: Option<PathBuf>,
    /// `[uid, gid]` workers switch to when the service runs as root
    /// (default `[65534, 65534]`, nobody).
    pub run_as: Option<(u32, u32)>,
}

/// Where guests run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum IsolationMode {
    /// Hardened worker processes.
    #[default]
    Process,
    /// The gateway's own process.
    InProcess,
}

impl Default for Isolation {
    fn default() -> Self {
        Self {
            mode: IsolationMode::Process,
            require: crate::worker::harden::Layer::ALL.into_iter().collect(),
            program: None,
            run_as: None,
        }
    }
}

/// `[zones.<name>]`: one trust zone's worker pool.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ZonePool {
    /// Worker processes kept running (default:
    /// [`ZonePool::default_workers`], one for every two cores).
    pub workers: u32,
    /// Jobs a worker runs before it is replaced; `1` is a fresh process
    /// per job, `0` no limit.
    pub jobs_per_worker: u32,
    /// A worker's memory ceiling, where the host offers cgroups (v2, or
    /// v1's memory controller). A job is sent only to a worker whose jobs,
    /// with it, can take no more than it leaves them
    /// ([`crate::worker::memory`]).
    pub memory: Option<ByteSize>,
    /// What the zone's workers' directories hold at once, all of them
    /// together: each job is given room for its files (its inputs, its
    /// output limit, a page per file) out of it before it is sent to a
    /// worker, and waits until it fits; a module whose jobs could never
    /// fit is refused at its load. Each worker's directory is a tmpfs of
    /// its own as large as its jobs' rooms (and, while it is busy, what
    /// its last jobs' rooms grew it by), mounted nowhere, where the
    /// service may mount one (as root); where it may not, a plain
    /// directory in the zone's work directory, which only the jobs'
    /// quotas hold to their rooms. 0: no bound and plain directories.
    pub disk: ByteSize,
}

impl ZonePool {
    /// Worker processes a zone keeps unless its config says: one for every
    /// two cores this process may use (each worker runs its guests on two
    /// threads), at least one. More workers than that cost each job more
    /// (each wake-up of a worker serves fewer of its frames) and run no
    /// more guests at once.
    #[must_use]
    pub fn default_workers() -> u32 {
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        u32::try_from(cores / 2).unwrap_or(u32::MAX).max(1)
    }
}

impl Default for ZonePool {
    fn default() -> Self {
        Self {
            workers: Self::default_workers(),
            jobs_per_worker: 1000,
            memory: None,
            disk: ByteSize::gib(2),
        }
    }
}

/// `[server]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Server {
    /// Public API address.
    pub listen: SocketAddr,
    /// Admin API address. The admin API needs the admin token, which no
    /// user token can ever be.
    pub admin_listen: SocketAddr,
    /// Largest request body.
    pub max_body: ByteSize,
    /// Longest synchronous wait.
    pub max_wait: HumanDuration,
    /// Grace period for running jobs on shutdown.
    pub shutdown_grace: HumanDuration,
    /// Longest wait for a request's header block, counted from when the
    /// connection starts waiting for a request. Guards against slowloris
    /// clients trickling headers to hold a connection and its buffer.
    pub header_read_timeout: HumanDuration,
    /// Longest a kept-alive connection may sit without a request. Guards
    /// against idle sockets piling up to exhaust descriptors.
    pub idle_timeout: HumanDuration,
    /// Longest wait between two frames of a request body. Guards against a
    /// request that declares a body and never sends it.
    pub body_read_timeout: HumanDuration,
    /// Longest a response write may make no progress. Guards against a
    /// client that pipelines requests (or starts a download) and never
    /// reads: hyper reads nothing more while its write is blocked, so only
    /// this ends the connection and frees its kernel send buffer.
    pub write_timeout: HumanDuration,
    /// Largest request line plus headers (hyper's read buffer bound: it is
    /// also the most a connection buffers before a request is parsed).
    /// Guards against memory held by unfinished headers. At least 8 KiB.
    pub max_header_size: ByteSize,
    /// Open connections on the public listener; beyond, a connection is
    /// answered 503 and closed at once (or served from `health_reserve`).
    pub max_connections: usize,
    /// Open public connections per client address (an IPv6 client: per
    /// /64). Behind a proxy every client shares its address: raise this.
    pub max_connections_per_client: usize,
    /// Connections accepted beyond `max_connections` that may only ask
    /// `/healthz` or `/readyz` (one request each, short timeouts), so probes
    /// still answer while the listener is full.
    pub health_reserve: usize,
    /// Open connections on the admin listener, counted apart from the
    /// public ones so a flood of the public listener never locks out the
    /// admin API.
    pub admin_max_connections: usize,
    /// Least average rate, in bytes per second, at which a request body
    /// must arrive, counted from when its handler first reads it and
    /// checked after `min_rate_grace`; below it the handler sees an error
    /// (nothing is stored) and the connection is closed. Guards against a
    /// body trickled just inside `body_read_timeout`. `0 B` turns it off.
    pub min_body_rate: ByteSize,
    /// Least rate, in bytes per second, at which a client must take a
    /// response once one of its writes has been pending, over the time the
    /// server then spends blocked on that client, checked after
    /// `min_rate_grace`; below it the connection is closed. Guards against
    /// a reader at a trickle just inside `write_timeout`. `0 B` turns it off.
    pub min_write_rate: ByteSize,
    /// How long the minimum rates allow before they are checked.
    pub min_rate_grace: HumanDuration,
    /// Output downloads one tenant may have running at once; beyond it, 429
    /// with `Retry-After`. Each streams through a fixed-size buffer, so this
    /// bounds what slow readers can hold open, not memory per download.
    pub max_downloads_per_tenant: usize,
    /// Submissions one tenant may have uploading at once (their bodies are
    /// read into memory); beyond it, 429 with `Retry-After`.
    pub max_uploads_per_tenant: usize,
    /// Bytes all uploads in flight may hold: each reserves its declared
    /// length (`max_body` without one) before it is read; one tenant may
    /// reserve a quarter (at least one `max_body`). Beyond, 429.
    pub max_buffered_uploads: ByteSize,
    /// Bytes the answers of jobs with large reports (256 KiB or more) may
    /// hold at once, from the store's read until the client has taken the
    /// body (`GET /v1/jobs/{id}`, a repeated submission's job): each
    /// reserves four times its report's JSON; one tenant may reserve a
    /// quarter. Beyond, 429 with `Retry-After`. A job whose report would be
    /// longer than a sixteenth of it as JSON keeps no outputs and fails
    /// saying so (its captured text is cut if that is not enough).
    pub max_buffered_answers: ByteSize,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            max_body: ByteSize::mib(64),
            max_wait: HumanDuration::secs(60),
            shutdown_grace: HumanDuration::secs(30),
            header_read_timeout: HumanDuration::secs(10),
            idle_timeout: HumanDuration::secs(10),
            body_read_timeout: HumanDuration::secs(15),
            write_timeout: HumanDuration::secs(30),
            max_header_size: ByteSize::kib(16),
            max_connections: 1024,
            max_connections_per_client: 64,
            health_reserve: 16,
            admin_max_connections: 64,
            min_body_rate: ByteSize::kib(1),
            min_write_rate: ByteSize::kib(1),
            min_rate_grace: HumanDuration::secs(10),
            max_downloads_per_tenant: 16,
            max_uploads_per_tenant: 16,
            max_buffered_uploads: ByteSize::mib(512),
            max_buffered_answers: ByteSize::gib(1),
        }
    }
}

/// `[audit]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Audit {
    /// Audit rows older than this are deleted by the retention sweeper.
    pub retention: HumanDuration,
    /// Denials written row by row per minute: unauthenticated ones
    /// (`auth.denied`) per client address, authenticated ones
    /// (`scope.denied`, `quota.denied`) per tenant, address and action; the
    /// rest of that minute is counted in one `<action>.summary` row per key.
    /// Guards against any caller filling the disk through the audit log.
    pub denials_per_client: u32,
    /// The same, from all client addresses together.
    pub denials_per_minute: u32,
}

impl Default for Audit {
    fn default() -> Self {
        Self {
            retention: HumanDuration::secs(30 * 24 * 3600),
            denials_per_client: 5,
            denials_per_minute: 60,
        }
    }
}

/// `[storage]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Storage {
    /// Data directory.
    pub data_dir: PathBuf,
    /// How long finished jobs are kept.
    pub retention: HumanDuration,
    /// Precompiled-module cache [default: `<data_dir>/cache`].
    pub cache_dir: Option<PathBuf>,
    /// Job directories while jobs run; emptied at start, held by one
    /// service at a time (`bulkhead.lock` inside it). [default: a
    /// directory on `/dev/shm` named after the data directory].
    pub work_dir: Option<PathBuf>,
    /// A PostgreSQL database for jobs, tokens and audit instead of the
    /// SQLite file in the data directory [default: none, SQLite]. Inputs,
    /// outputs, keys and the admin token stay in the data directory.
    pub url: Option<DatabaseUrl>,
    /// Connections to `url` this node holds at most [default: 16].
    pub pool_size: u32,
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            retention: HumanDuration::secs(24 * 3600),
            cache_dir: None,
            work_dir: None,
            url: None,
            pool_size: 16,
        }
    }
}

impl Storage {
    /// Opens the store this config names: the PostgreSQL database at
    /// `url`, or else `<data_dir>/bulkhead.sqlite` (the directory must
    /// exist). What the service, `bulkhead token` and every other command
    /// that reaches the store open.
    ///
    /// # Errors
    /// The database cannot be reached or migrated, or the file opened.
    pub async fn open_store(
        &self,
    ) -> Result<std::sync::Arc<dyn crate::store::JobStore>, crate::store::StoreError> {
        Ok(match &self.url {
            Some(url) => std::sync::Arc::new(
                crate::store::PostgresStore::open(url.expose(), self.pool_size).await?,
            ),
            None => std::sync::Arc::new(crate::store::SqliteStore::open_in(&self.data_dir).await?),
        })
    }
}

/// `[storage] url`: a `postgres://` or `postgresql://` connection URL. Its
/// password never appears in `Debug` or `Display` output (the config is
/// logged and errors name the database), only in [`DatabaseUrl::expose`].
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "String")]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    /// The URL as given, password included: for the driver only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for DatabaseUrl {
    type Error = String;

    fn try_from(url: String) -> Result<Self, String> {
        let scheme = url.split_once("://").map_or("", |(s, _)| s);
        if !matches!(scheme, "postgres" | "postgresql") {
            let shown = DatabaseUrl(url).to_string();
            return Err(format!(
                "unsupported storage url `{shown}`: only postgres:// URLs are supported (SQLite is the default without one)"
            ));
        }
        Ok(Self(url))
    }
}

impl std::fmt::Display for DatabaseUrl {
    /// The URL with any password replaced by `***`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return f.write_str("***");
        };
        let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(authority_end);
        // The query may carry one too (`?password=`): it is left out whole.
        let tail = tail.split_once('?').map_or(tail, |(path, _)| path);
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
                let hidden = if userinfo.contains(':') { ":***" } else { "" };
                write!(f, "{scheme}://{user}{hidden}@{host}{tail}")
            }
            None => write!(f, "{scheme}://{authority}{tail}"),
        }
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DatabaseUrl({self})")
    }
}

/// `[modules]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Modules {
    /// Policies, one `<name>.toml` per module.
    pub policies_dir: PathBuf,
    /// Modules, `<name>.wasm` for each policy.
    pub modules_dir: PathBuf,
}

impl Default for Modules {
    fn default() -> Self {
        Self {
            policies_dir: PathBuf::from("policies"),
            modules_dir: PathBuf::from("target/guests/wasm32-wasip2/release"),
        }
    }
}

/// `[queue]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Queue {
    /// Jobs running at once, besides those that waited for room in their
    /// zone's disk, which run in their zone's places once given it (see
    /// [`crate::service::scheduler`]).
    pub workers: u32,
    /// Queued jobs in total.
    pub max_queued: usize,
    /// Queued jobs per tenant.
    pub max_queued_per_tenant: usize,
    /// Running jobs per tenant.
    pub max_running_per_tenant: usize,
    /// Running jobs per module.
    pub max_running_per_module: usize,
    /// Times a job may be started without finishing (the process crashed,
    /// or the host failed on its path) before it is finished `failed`
    /// instead of re-run: a job that kills or trips the host every time is
    /// not a poison job re-run for ever.
    pub max_attempts: u32,
    /// How long an `Idempotency-Key` keeps naming the job it created.
    pub idempotency_retention: HumanDuration,
    /// How long a claim holds a running job without being renewed: the
    /// node renews the leases of the jobs it runs every third of it; a job
    /// whose lease ran out (its node died, or lost the database) is re-run
    /// by any node, its attempt counted.
    pub lease: HumanDuration,
}

impl Default for Queue {
    fn default() -> Self {
        Self {
            workers: 8,
            max_queued: 1000,
            max_queued_per_tenant: 200,
            max_running_per_tenant: 4,
            max_running_per_module: 8,
            max_attempts: 3,
            idempotency_retention: HumanDuration::secs(24 * 3600),
            lease: HumanDuration::secs(30),
        }
    }
}

/// Why the config could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Unreadable file.
    #[error("cannot read config `{}`: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Bad content.
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

impl ServeConfig {
    /// The call-token key ring this config names: `[tokens] signing_key`,
    /// else the ring kept under `<data_dir>/keys` (created, and rotated,
    /// there). The service and `bulkhead run` open the same one.
    ///
    /// # Errors
    /// [`crate::relay::KeyError`] for an unreadable or unsafe key.
    pub fn key_ring(&self) -> Result<crate::relay::KeyRing, crate::relay::KeyError> {
        match &self.tokens.signing_key {
            Some(path) => crate::relay::KeyRing::supplied(path),
            None => crate::relay::KeyRing::open(
                &self.storage.data_dir.join("keys"),
                self.tokens.key_grace.get(),
            ),
        }
    }
}

impl ServeConfig {
    /// Reads and validates `path`.
    ///
    /// # Errors
    /// [`ConfigError`] naming the file and, for content, line and column.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let config: Self = toml::from_str(&text).map_err(|e| {
            let at = e.span().map(|s| {
                let before = &text[..s.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.rsplit('\n').next().map_or(0, str::len) + 1;
                format!("{line}:{col}: ")
            });
            ConfigError::Invalid {
                path: path.to_owned(),
                message: format!("{}{}", at.unwrap_or_default(), e.message().trim_end()),
            }
        })?;
        if config.server.max_header_size.as_u64() < 8192 {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                message: format!(
                    "server.max_header_size must be at least 8 KiB (got {})",
                    config.server.max_header_size
                ),
            });
        }
        if config.server.max_buffered_answers.as_u64() < 16 << 20 {
            // Below it a job's report may not even hold its fixed fields
            // (a sixteenth of it: 1 MiB).
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                message: format!(
                    "server.max_buffered_answers must be at least 16 MiB (got {})",
                    config.server.max_buffered_answers
                ),
            });
        }
        if config.server.max_connections == 0 || config.server.admin_max_connections == 0 {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                message:
                    "server.max_connections and server.admin_max_connections must be at least 1"
                        .into(),
            });
        }
        if config.queue.workers == 0 {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                message: "queue.workers must be at least 1".into(),
            });
        }
        if let Some((zone, _)) = config.zones.iter().find(|(_, z)| z.workers == 0) {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                message: format!("zones.{zone}.workers must be at least 1"),
            });
        }
        if config.storage.url.is_some() && config.storage.pool_size == 0 {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                message: "storage.pool_size must be at least 1".into(),
            });
        }
        if config.queue.max_attempts == 0 {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                message: "queue.max_attempts must be at least 1".into(),
            });
        }
        if config.queue.lease.get() < std::time::Duration::from_millis(30) {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                message: format!(
                    "queue.lease must be at least 30 ms (got {:?})",
                    config.queue.lease.get()
                ),
            });
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_edge_and_audit_defaults_are_the_documented_ones() {
        let c = ServeConfig::default();
        let s = &c.server;
        assert_eq!(s.header_read_timeout, HumanDuration::secs(10));
        assert_eq!(s.idle_timeout, HumanDuration::secs(10));
        assert_eq!(s.body_read_timeout, HumanDuration::secs(15));
        assert_eq!(s.max_header_size, ByteSize::kib(16));
        assert_eq!(
            (
                s.max_connections,
                s.max_connections_per_client,
                s.health_reserve
            ),
            (1024, 64, 16)
        );
        assert_eq!(s.admin_max_connections, 64);
        assert_eq!(
            (s.min_body_rate, s.min_write_rate, s.min_rate_grace),
            (ByteSize::kib(1), ByteSize::kib(1), HumanDuration::secs(10))
        );
        assert_eq!(c.audit.retention, HumanDuration::secs(30 * 24 * 3600));
        assert_eq!(
            (c.audit.denials_per_client, c.audit.denials_per_minute),
            (5, 60)
        );
    }

    #[test]
    fn edge_keys_parse_and_a_header_cap_under_8_kib_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[server]\nidle_timeout = \"3 s\"\nmax_header_size = \"32 KiB\"\n[audit]\nretention = \"7 d\"\n",
        )
        .unwrap();
        let c = ServeConfig::load(&path).unwrap();
        assert_eq!(c.server.idle_timeout, HumanDuration::secs(3));
        assert_eq!(c.audit.retention, HumanDuration::secs(7 * 24 * 3600));
        std::fs::write(&path, "[server]\nmax_header_size = \"4 KiB\"\n").unwrap();
        let e = ServeConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("max_header_size"), "{e}");
        std::fs::write(&path, "[server]\nmax_buffered_answers = \"8 KiB\"\n").unwrap();
        let e = ServeConfig::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("max_buffered_answers must be at least 16 MiB"),
            "{e}"
        );
    }

    #[test]
    fn a_storage_url_selects_postgres_and_never_shows_its_password() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        let c = ServeConfig::load(&{
            std::fs::write(&path, "").unwrap();
            path.clone()
        })
        .unwrap();
        assert_eq!((c.storage.url, c.storage.pool_size), (None, 16));
        std::fs::write(
            &path,
            "[storage]\nurl = \"postgres://bulkhead:s3cret@db:5432/jobs?sslmode=require&password=s3cret\"\npool_size = 4\n",
        )
        .unwrap();
        let c = ServeConfig::load(&path).unwrap();
        let url = c.storage.url.clone().unwrap();
        assert_eq!(c.storage.pool_size, 4);
        assert!(url.expose().contains("s3cret"));
        assert_eq!(url.to_string(), "postgres://bulkhead:***@db:5432/jobs");
        assert!(!format!("{c:?}").contains("s3cret"));
        std::fs::write(&path, "[storage]\nurl = \"mysql://u:s3cret@db/x\"\n").unwrap();
        let e = ServeConfig::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("unsupported storage url `mysql://u:***@db/x`"),
            "{e}"
        );
        assert!(!e.contains("s3cret"), "{e}");
        std::fs::write(
            &path,
            "[storage]\nurl = \"postgres://db/x\"\npool_size = 0\n",
        )
        .unwrap();
        let e = ServeConfig::load(&path).unwrap_err().to_string();
        assert!(e.contains("storage.pool_size"), "{e}");
    }
}
