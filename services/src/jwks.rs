//! Loading the host's JWKS (`GET /.well-known/jwks.json`) and keeping a
//! verifier's keys current as the host rotates them. The only network client
//! in this crate.
//!
//! Plain HTTP only (the build has no TLS): fetch from the host over loopback
//! or a trusted link, since whoever can answer this request chooses the keys.

use std::sync::Arc;
use std::time::Duration;

use bulkhead_verify::{ConfigError, JwkSet, Verifier};
use reqwest::Url;
use thiserror::Error;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};

/// Largest JWKS document accepted, in bytes. A set of [`bulkhead_verify::MAX_KEYS`]
/// Ed25519 keys is under 3 KiB.
pub const MAX_JWKS_BYTES: usize = 64 * 1024;

/// Timeout of one JWKS request, connection included.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the key set could not be loaded.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum JwksError {
    /// The URL does not parse or is not `http` or `file`.
    #[error("JWKS URL `{url}` is not an http or file URL")]
    Url {
        /// The URL given.
        url: String,
    },
    /// A `file:` JWKS cannot be read.
    #[error("reading the JWKS at `{url}` failed")]
    File {
        /// The JWKS URL.
        url: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The request failed (connection, timeout, body).
    #[error("fetching the JWKS from `{url}` failed")]
    Http {
        /// The JWKS URL.
        url: String,
        /// What failed.
        #[source]
        source: reqwest::Error,
    },
    /// The host answered something other than 200.
    #[error("fetching the JWKS from `{url}` answered status {status}")]
    Status {
        /// The JWKS URL.
        url: String,
        /// The status received (redirects are not followed).
        status: u16,
    },
    /// The document exceeds [`MAX_JWKS_BYTES`].
    #[error("JWKS from `{url}` exceeds {MAX_JWKS_BYTES} bytes")]
    TooLarge {
        /// The JWKS URL.
        url: String,
    },
    /// The document is not a JWKS.
    #[error("JWKS from `{url}` does not parse")]
    Json {
        /// The JWKS URL.
        url: String,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// The key set was refused by the verifier.
    #[error("JWKS from `{url}` was refused")]
    Keys {
        /// The JWKS URL.
        url: String,
        /// Why.
        #[source]
        source: ConfigError,
    },
}

/// Where a service gets the host's keys: a URL and an HTTP client that uses
/// no proxy, follows no redirect and gives up after [`FETCH_TIMEOUT`].
#[derive(Debug, Clone)]
pub struct JwksSource {
    url: Url,
    client: reqwest::Client,
}

impl JwksSource {
    /// A source for `url`, e.g. `http://127.0.0.1:8080/.well-known/jwks.json`,
    /// or a `file:` URL of a JWKS document (`bulkhead jwks` writes one).
    ///
    /// # Errors
    ///
    /// [`JwksError::Url`] if `url` is not an `http` URL;
    /// [`JwksError::Http`] if the client cannot be built.
    pub fn new(url: &str) -> Result<Self, JwksError> {
        let parsed = Url::parse(url)
            .ok()
            .filter(|parsed| matches!(parsed.scheme(), "http" | "file"))
            .ok_or_else(|| JwksError::Url {
                url: url.to_owned(),
            })?;
        let client = reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(FETCH_TIMEOUT)
            .build()
            .map_err(|source| JwksError::Http {
                url: parsed.to_string(),
                source,
            })?;
        Ok(Self {
            url: parsed,
            client,
        })
    }

    /// The JWKS URL.
    pub fn url(&self) -> &Url {
        &self.url
    }

    /// Fetches and parses the key set (not yet validated: that is
    /// [`Verifier::new`]'s and [`Verifier::update_keys`]'s job).
    ///
    /// # Errors
    ///
    /// [`JwksError`] if the request fails, answers other than 200, is larger
    /// than [`MAX_JWKS_BYTES`] or is not a JWKS.
    pub async fn fetch(&self) -> Result<JwkSet, JwksError> {
        if self.url.scheme() == "file" {
            return self.read_file().await;
        }
        let http = |source| JwksError::Http {
            url: self.url.to_string(),
            source,
        };
        let mut response = self
            .client
            .get(self.url.clone())
            .send()
            .await
            .map_err(http)?;
        if response.status() != reqwest::StatusCode::OK {
            return Err(JwksError::Status {
                url: self.url.to_string(),
                status: response.status().as_u16(),
            });
        }
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(http)? {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(JwksError::TooLarge {
                    url: self.url.to_string(),
                });
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body).map_err(|source| JwksError::Json {
            url: self.url.to_string(),
            source,
        })
    }
}

impl JwksSource {
    /// A `file:` JWKS (what `bulkhead jwks` writes for a host without a
    /// listener, such as `bulkhead run`), read again on every fetch.
    async fn read_file(&self) -> Result<JwkSet, JwksError> {
        use tokio::io::AsyncReadExt as _;
        let url = self.url.to_string();
        let path = self
            .url
            .to_file_path()
            .map_err(|()| JwksError::Url { url: url.clone() })?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|source| JwksError::File {
                url: url.clone(),
                source,
            })?;
        let mut body = Vec::new();
        file.take(MAX_JWKS_BYTES as u64 + 1)
            .read_to_end(&mut body)
            .await
            .map_err(|source| JwksError::File {
                url: url.clone(),
                source,
            })?;
        if body.len() > MAX_JWKS_BYTES {
            return Err(JwksError::TooLarge { url });
        }
        serde_json::from_slice(&body).map_err(|source| JwksError::Json { url, source })
    }
}

/// Fetches the key set at `url` once (see [`JwksSource::fetch`]).
///
/// # Errors
///
/// As [`JwksSource::new`] and [`JwksSource::fetch`].
pub async fn fetch_jwks(url: &str) -> Result<JwkSet, JwksError> {
    JwksSource::new(url)?.fetch().await
}

/// Keeps a verifier's keys in step with the host's JWKS: periodically
/// ([`KeyRefresher::spawn_periodic`]) and on demand when a token names an
/// unknown key ([`KeyRefresher::refresh_if_due`]), the latter at most once
/// per `min_interval` so that tokens with made-up `kid`s cannot turn the
/// service into a JWKS request flood. A failed refresh keeps the current
/// keys.
#[derive(Debug)]
pub struct KeyRefresher {
    source: JwksSource,
    verifier: Arc<Verifier>,
    min_interval: Duration,
    last: Mutex<Option<Instant>>,
}

impl KeyRefresher {
    /// A refresher loading `source` into `verifier`, fetching on demand at
    /// most once per `min_interval`.
    pub fn new(source: JwksSource, verifier: Arc<Verifier>, min_interval: Duration) -> Self {
        Self {
            source,
            verifier,
            min_interval,
            last: Mutex::new(None),
        }
    }

    /// Fetches the key set now and installs it.
    ///
    /// # Errors
    ///
    /// [`JwksError`] if the fetch fails or the verifier refuses the set;
    /// the current keys are kept.
    pub async fn refresh(&self) -> Result<(), JwksError> {
        let mut last = self.last.lock().await;
        *last = Some(Instant::now());
        self.fetch_and_install().await
    }

    /// Refreshes unless a refresh started less than `min_interval` ago;
    /// concurrent callers wait for the one refresh in flight. Returns whether
    /// this call refreshed the keys successfully; failures are logged.
    pub async fn refresh_if_due(&self) -> bool {
        let mut last = self.last.lock().await;
        if last.is_some_and(|at| at.elapsed() < self.min_interval) {
            return false;
        }
        // Stamped before fetching, so a failing host is also asked at most
        // once per interval.
        *last = Some(Instant::now());
        match self.fetch_and_install().await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(error = %ErrorChain(&error), "key refresh failed");
                false
            }
        }
    }

    /// Refreshes every `every` (the first time after one period) until the
    /// task is aborted; failures are logged and the current keys kept.
    pub fn spawn_periodic(self: &Arc<Self>, every: Duration) -> JoinHandle<()> {
        let refresher = Arc::clone(self);
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval_at(Instant::now() + every, every);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                if let Err(error) = refresher.refresh().await {
                    tracing::warn!(error = %ErrorChain(&error), "periodic key refresh failed");
                }
            }
        })
    }

    async fn fetch_and_install(&self) -> Result<(), JwksError> {
        let jwks = self.source.fetch().await?;
        self.verifier
            .update_keys(&jwks)
            .map_err(|source| JwksError::Keys {
                url: self.source.url.to_string(),
                source,
            })?;
        tracing::info!(keys = ?self.verifier.key_ids(), "key set refreshed");
        Ok(())
    }
}

/// Displays an error with its sources, `a: b: c`.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(error) = source {
            write!(f, ": {error}")?;
            source = error.source();
        }
        Ok(())
    }
}
