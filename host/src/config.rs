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
//! shutdown_grace = "30 s"          # running jobs get this long on shutdown
//! max_downloads_per_tenant = 16    # output downloads one tenant may have running (429 beyond)
//!
//! [storage]
//! data_dir = "data"                # SQLite file, job inputs and outputs, admin token
//! retention = "24 h"               # finished jobs and outputs are kept this long
//! # cache_dir = "data/cache"       # precompiled modules (default: <data_dir>/cache)
//! # work_dir = "/dev/shm/bulkhead" # running jobs' directories (default: on /dev/shm)
//!
//! [modules]
//! policies_dir = "policies"        # one <name>.toml per module
//! modules_dir = "target/guests/wasm32-wasip2/release"  # <name>.wasm per policy
//!
//! [queue]
//! workers = 8                      # jobs running at once
//! max_queued = 1000                # queued jobs in total (429 beyond)
//! max_queued_per_tenant = 200      # queued jobs per tenant (429 beyond)
//! max_running_per_tenant = 4
//! max_running_per_module = 8
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
    /// Output downloads one tenant may have running at once; beyond it, 429
    /// with `Retry-After`. Each streams through a fixed-size buffer, so this
    /// bounds what slow readers can hold open, not memory per download.
    pub max_downloads_per_tenant: usize,
}

impl Default for Server {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 8081)),
            max_body: ByteSize::mib(64),
            max_wait: HumanDuration::secs(60),
            shutdown_grace: HumanDuration::secs(30),
            max_downloads_per_tenant: 16,
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
    /// Job directories while jobs run; emptied at start. [default: a
    /// directory on `/dev/shm` named after the data directory].
    pub work_dir: Option<PathBuf>,
}

impl Default for Storage {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("data"),
            retention: HumanDuration::secs(24 * 3600),
            cache_dir: None,
            work_dir: None,
        }
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
    /// Jobs running at once.
    pub workers: u32,
    /// Queued jobs in total.
    pub max_queued: usize,
    /// Queued jobs per tenant.
    pub max_queued_per_tenant: usize,
    /// Running jobs per tenant.
    pub max_running_per_tenant: usize,
    /// Running jobs per module.
    pub max_running_per_module: usize,
}

impl Default for Queue {
    fn default() -> Self {
        Self {
            workers: 8,
            max_queued: 1000,
            max_queued_per_tenant: 200,
            max_running_per_tenant: 4,
            max_running_per_module: 8,
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
        if config.queue.workers == 0 {
            return Err(ConfigError::Invalid {
                path: path.to_owned(),
                message: "queue.workers must be at least 1".into(),
            });
        }
        Ok(config)
    }
}
