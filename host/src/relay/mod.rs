//! The one way out of a compartment: `wasi:http` requests to internal
//! services the host declares and the module's policy names, sent by the
//! host with a token it mints for that one call.
//!
//! - [`gate`]: which declared service a request addresses, or why not
//!   (pure; every trick a guest may try is a [`gate::Refusal`]).
//! - [`keys`]: the Ed25519 signing keys, their rotation and the JWKS.
//! - [`send`]: the per-job [`CallGrant`], the job's
//!   [`Egress`](crate::job::egress::Egress): it runs the gate, strips the
//!   guest's credentials, mints the token and sends the request over the
//!   host's own HTTP client, with per-job bounds on calls, bytes and time.
//!   The sandbox's `wasi:http` hooks hand it each guest request; nothing
//!   here names wasmtime.
//!
//! wasmtime-wasi-http is built without its default outbound sender (the
//! `default-send-request` feature, banned in `deny.toml`), so a request can
//! leave only through [`send`].

pub mod gate;
pub mod headers;
pub mod keys;
pub mod leak;
pub mod send;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use http::Method;
use serde::{Deserialize, Serialize};

use crate::policy::{ByteSize, HumanDuration, ServiceName};

pub use crate::job::egress::{CallRecord, CallsReport};
pub use gate::Refusal;
pub use keys::{KeyError, KeyRing};
pub(crate) use send::declared_length;
pub use send::{CallGrant, Caller, RefusalSink};

/// One internal service as the operator declares it in the host config
/// (`[[services]]`).
///
/// | key | default | meaning |
/// |---|---|---|
/// | `name` | (required) | what guests write as the authority: `http://<name>/…` |
/// | `url` | (required) | where the host sends the calls (`http://host:port[/base]`) |
/// | `audience` | the name | `aud` of the tokens minted for it |
/// | `paths` | `["/"]` | allowed path prefixes (segment-wise) |
/// | `methods` | `["GET", "HEAD", "POST"]` | allowed methods |
/// | `max_request` | `1 MiB` | request body bound, per call |
/// | `max_response` | `4 MiB` | response body bound, per call |
/// | `max_calls` | `16` | calls per job |
/// | `timeout` | `5 s` | per call: the longest wait for the response headers (never past the job's deadline), and again for each frame of the response body |
/// | `forward_headers` | `[]` | request headers forwarded beyond [`headers::FORWARDED`]; never a credential, identity, routing, method-override, framing or trailer header ([`headers::never_forwarded`]) |
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(
    deny_unknown_fields,
    try_from = "RawServiceDecl",
    into = "RawServiceDecl"
)]
pub struct ServiceDecl {
    /// The name guests address.
    pub name: ServiceName,
    /// Base URL: scheme `http`, authority, optional base path (no trailing
    /// `/`).
    pub url: BaseUrl,
    /// `aud` of minted tokens.
    pub audience: String,
    /// Allowed path prefixes.
    pub paths: Vec<String>,
    /// Allowed methods.
    pub methods: Vec<Method>,
    /// Request body bound, per call.
    pub max_request: ByteSize,
    /// Response body bound, per call.
    pub max_response: ByteSize,
    /// Calls per job.
    pub max_calls: u32,
    /// Per-call time bound: the longest wait for the response headers, and
    /// again for each frame of the response body.
    pub timeout: HumanDuration,
    /// Request headers forwarded beyond [`headers::FORWARDED`].
    pub forward_headers: Vec<http::HeaderName>,
}

/// A service URL that [`BaseUrl::parse`] refuses, naming it.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    /// Not a URI.
    #[error("invalid url `{url}`: {error}")]
    Invalid {
        /// The URL given.
        url: String,
        /// Why it does not parse.
        error: http::uri::InvalidUri,
    },
    /// A scheme other than `http`.
    #[error(
        "url `{url}`: scheme `{scheme}` is not supported (only http; put TLS in front of the host's loopback or private network)"
    )]
    Scheme {
        /// The URL given.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// No scheme.
    #[error("url `{0}` needs a scheme (http://…)")]
    NoScheme(String),
    /// No host.
    #[error("url `{0}` has no host")]
    NoHost(String),
    /// User info before the host.
    #[error("url `{0}` must not carry user info")]
    UserInfo(String),
    /// A query.
    #[error("url `{0}` must not have a query")]
    Query(String),
}

/// A `[[services]]` entry that is refused: the service's name and why.
#[derive(Debug, thiserror::Error)]
#[error("service `{name}`: {fault}")]
pub struct ServiceDeclError {
    /// The service's name.
    pub name: ServiceName,
    /// What is wrong with it.
    pub fault: ServiceFault,
}

/// What is wrong with a `[[services]]` entry ([`ServiceDeclError`]).
#[derive(Debug, thiserror::Error)]
pub enum ServiceFault {
    /// Its `url`.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// `paths = []`.
    #[error("`paths` must not be empty")]
    NoPaths,
    /// A path prefix that is not a plain absolute path.
    #[error(
        "path prefix `{}` must start with `/` and contain no `.`/`..` segments, `?`, `#`, `%` or `\\`",
        .0.escape_debug()
    )]
    PathPrefix(String),
    /// A method other than the standard ones.
    #[error(
        "method `{}` is not supported (GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS)",
        .0.escape_debug()
    )]
    Method(String),
    /// An empty, long, or control-bearing audience.
    #[error("audience must be 1 to 256 characters, no control characters")]
    Audience,
    /// `max_calls = 0`.
    #[error("max_calls must be at least 1 (leave the service out of a policy to forbid calls)")]
    MaxCalls,
    /// A `forward_headers` entry that is not a header name.
    #[error("`{}` in forward_headers is not a header name", .0.escape_debug())]
    NotHeader(String),
    /// A `forward_headers` entry no service may name.
    #[error("header `{header}` in forward_headers can never be forwarded: {why}")]
    NeverForwarded {
        /// The header as given.
        header: String,
        /// Why it is never forwarded.
        why: &'static str,
    },
}

/// Why a [`Relay`] cannot be built from the service declarations and
/// `[tokens]`.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// `tokens.lifetime` out of bounds.
    #[error(
        "tokens.lifetime `{lifetime}` must be between 1 s and {max_secs} s: minted tokens live seconds"
    )]
    Lifetime {
        /// The lifetime given.
        lifetime: HumanDuration,
        /// The longest allowed, in seconds.
        max_secs: u64,
    },
    /// `tokens.issuer` empty or with control characters.
    #[error("tokens.issuer must be non-empty, without control characters")]
    Issuer,
    /// Two services with one name.
    #[error("service `{0}` is declared twice")]
    Duplicate(String),
}

/// Where a service lives: an `http` authority and an optional base path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseUrl {
    /// `host:port` (as given).
    pub authority: http::uri::Authority,
    /// Base path without a trailing `/` (may be empty).
    pub base_path: String,
}

impl BaseUrl {
    /// Parses `http://authority[/base]`.
    ///
    /// # Errors
    /// A [`UrlError`] naming the URL and what is wrong.
    pub fn parse(url: &str) -> Result<Self, UrlError> {
        let uri: http::Uri = url.parse().map_err(|error| UrlError::Invalid {
            url: url.to_owned(),
            error,
        })?;
        match uri.scheme_str() {
            Some("http") => {}
            Some(s) => {
                return Err(UrlError::Scheme {
                    url: url.to_owned(),
                    scheme: s.to_owned(),
                });
            }
            None => return Err(UrlError::NoScheme(url.to_owned())),
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| UrlError::NoHost(url.to_owned()))?;
        if authority.as_str().contains('@') {
            return Err(UrlError::UserInfo(url.to_owned()));
        }
        if uri.query().is_some() {
            return Err(UrlError::Query(url.to_owned()));
        }
        Ok(Self {
            authority,
            base_path: uri.path().trim_end_matches('/').to_owned(),
        })
    }
}

impl std::fmt::Display for BaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "http://{}{}", self.authority, self.base_path)
    }
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct RawServiceDecl {
    name: ServiceName,
    url: String,
    #[serde(default)]
    audience: Option<String>,
    #[serde(default)]
    paths: Option<Vec<String>>,
    #[serde(default)]
    methods: Option<Vec<String>>,
    #[serde(default)]
    max_request: Option<ByteSize>,
    #[serde(default)]
    max_response: Option<ByteSize>,
    #[serde(default)]
    max_calls: Option<u32>,
    #[serde(default)]
    timeout: Option<HumanDuration>,
    #[serde(default)]
    forward_headers: Option<Vec<String>>,
}

impl TryFrom<RawServiceDecl> for ServiceDecl {
    type Error = ServiceDeclError;

    fn try_from(raw: RawServiceDecl) -> Result<Self, ServiceDeclError> {
        let name = raw.name;
        let refused = |fault: ServiceFault| ServiceDeclError {
            name: name.clone(),
            fault,
        };
        let url = BaseUrl::parse(&raw.url).map_err(|e| refused(e.into()))?;
        let paths = raw.paths.unwrap_or_else(|| vec!["/".to_owned()]);
        if paths.is_empty() {
            return Err(refused(ServiceFault::NoPaths));
        }
        for p in &paths {
            let bad = !p.starts_with('/')
                || p.contains(['?', '#', '%', '\\'])
                || p.split('/').any(|s| s == "." || s == "..");
            if bad {
                return Err(refused(ServiceFault::PathPrefix(p.clone())));
            }
        }
        let methods = raw
            .methods
            .unwrap_or_else(|| vec!["GET".into(), "HEAD".into(), "POST".into()])
            .into_iter()
            .map(|m| {
                let upper = m.to_ascii_uppercase();
                match upper.as_str() {
                    "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS" => {
                        Ok(Method::from_bytes(upper.as_bytes()).expect("a standard method"))
                    }
                    _ => Err(refused(ServiceFault::Method(m))),
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let audience = raw.audience.unwrap_or_else(|| name.to_string());
        if audience.is_empty() || audience.len() > 256 || audience.chars().any(char::is_control) {
            return Err(refused(ServiceFault::Audience));
        }
        let max_calls = raw.max_calls.unwrap_or(16);
        if max_calls == 0 {
            return Err(refused(ServiceFault::MaxCalls));
        }
        let timeout = raw.timeout.unwrap_or(HumanDuration::secs(5));
        let mut forward_headers = Vec::new();
        for h in raw.forward_headers.unwrap_or_default() {
            let Ok(header) = http::HeaderName::from_bytes(h.as_bytes()) else {
                return Err(refused(ServiceFault::NotHeader(h)));
            };
            if let Some(why) = headers::never_forwarded(&header) {
                return Err(refused(ServiceFault::NeverForwarded { header: h, why }));
            }
            if !forward_headers.contains(&header) {
                forward_headers.push(header);
            }
        }
        Ok(Self {
            name,
            url,
            audience,
            paths,
            methods,
            max_request: raw.max_request.unwrap_or(ByteSize::mib(1)),
            max_response: raw.max_response.unwrap_or(ByteSize::mib(4)),
            max_calls,
            timeout,
            forward_headers,
        })
    }
}

impl From<ServiceDecl> for RawServiceDecl {
    fn from(d: ServiceDecl) -> Self {
        Self {
            name: d.name,
            url: d.url.to_string(),
            audience: Some(d.audience),
            paths: Some(d.paths),
            methods: Some(d.methods.iter().map(ToString::to_string).collect()),
            max_request: Some(d.max_request),
            max_response: Some(d.max_response),
            max_calls: Some(d.max_calls),
            timeout: Some(d.timeout),
            forward_headers: Some(
                d.forward_headers
                    .iter()
                    .map(|h| h.as_str().to_owned())
                    .collect(),
            ),
        }
    }
}

impl ServiceDecl {
    /// A declaration with the defaults, for tests and examples.
    ///
    /// # Panics
    /// If `name` or `url` is invalid.
    pub fn example(name: &str, url: &str) -> Self {
        RawServiceDecl {
            name: ServiceName::new(name.to_owned()).expect("valid service name"),
            url: url.to_owned(),
            audience: None,
            paths: None,
            methods: None,
            max_request: None,
            max_response: None,
            max_calls: None,
            timeout: None,
            forward_headers: None,
        }
        .try_into()
        .expect("valid declaration")
    }
}

/// Token settings (`[tokens]` in the host config).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenConfig {
    /// `iss` of minted tokens.
    pub issuer: String,
    /// Lifetime of a minted token (further bounded by the job's deadline).
    pub lifetime: HumanDuration,
    /// How long a retired signing key stays in the JWKS after a rotation.
    pub key_grace: HumanDuration,
    /// An operator-supplied Ed25519 key (PKCS#8 PEM). Without it the host
    /// generates one under `<data_dir>/keys` on first start.
    pub signing_key: Option<std::path::PathBuf>,
}

/// Longest token lifetime the config accepts.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            issuer: "bulkhead".to_owned(),
            lifetime: HumanDuration::secs(30),
            key_grace: HumanDuration::secs(600),
            signing_key: None,
        }
    }
}

/// The host side of outbound calls: the declared services, the key ring
/// and the HTTP client. One per process, shared by every job.
pub struct Relay {
    services: BTreeMap<String, ServiceDecl>,
    keys: Arc<KeyRing>,
    issuer: String,
    lifetime: Duration,
    client: send::Client,
    /// Every token it issued that a verifier may still accept.
    issued: Arc<leak::Issued>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("services", &self.services.keys().collect::<Vec<_>>())
            .field("issuer", &self.issuer)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay for `services`, minting with `keys`.
    ///
    /// # Errors
    /// A [`RelayError`] when two services share a name, or the token
    /// lifetime or issuer is out of bounds.
    pub fn new(
        services: Vec<ServiceDecl>,
        keys: Arc<KeyRing>,
        tokens: &TokenConfig,
    ) -> Result<Self, RelayError> {
        let lifetime = tokens.lifetime.get();
        if lifetime.is_zero() || lifetime > MAX_TOKEN_LIFETIME {
            return Err(RelayError::Lifetime {
                lifetime: tokens.lifetime,
                max_secs: MAX_TOKEN_LIFETIME.as_secs(),
            });
        }
        if tokens.issuer.is_empty() || tokens.issuer.chars().any(char::is_control) {
            return Err(RelayError::Issuer);
        }
        let mut map = BTreeMap::new();
        for s in services {
            let name = s.name.to_string();
            if map.insert(name.clone(), s).is_some() {
                return Err(RelayError::Duplicate(name));
            }
        }
        Ok(Self {
            services: map,
            keys,
            issuer: tokens.issuer.clone(),
            lifetime,
            client: send::client(),
            issued: Arc::default(),
        })
    }

    /// The declared service names.
    pub fn names(&self) -> Vec<ServiceName> {
        self.services.values().map(|s| s.name.clone()).collect()
    }

    /// The declaration of `name`.
    pub fn service(&self, name: &str) -> Option<&ServiceDecl> {
        self.services.get(name)
    }

    /// The key ring.
    pub fn keys(&self) -> &Arc<KeyRing> {
        &self.keys
    }

    /// `iss` of minted tokens.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refused_urls_services_and_relays_name_the_bad_value() {
        assert!(matches!(
            BaseUrl::parse("https://palette.internal"),
            Err(UrlError::Scheme { ref scheme, .. }) if scheme == "https"
        ));
        assert_eq!(
            BaseUrl::parse("/palette").unwrap_err().to_string(),
            "url `/palette` needs a scheme (http://…)"
        );
        assert_eq!(
            BaseUrl::parse("http://u@palette").unwrap_err().to_string(),
            "url `http://u@palette` must not carry user info"
        );
        let e = parse("max_calls = 0").unwrap_err();
        assert!(matches!(e.fault, ServiceFault::MaxCalls), "{e}");
        assert!(
            e.to_string().contains(
                "service `palette`: max_calls must be at least 1 (leave the service out of a policy to forbid calls)"
            ),
            "{e}"
        );
        let e = parse("paths = [\"/a/../b\"]").unwrap_err();
        assert!(
            e.to_string().contains(
                "service `palette`: path prefix `/a/../b` must start with `/` and contain no `.`/`..` segments, `?`, `#`, `%` or `\\`"
            ),
            "{e}"
        );
        let decl = ServiceDecl::example("palette", "http://127.0.0.1:9");
        let keys = Arc::new(KeyRing::ephemeral());
        let twice = Relay::new(
            vec![decl.clone(), decl],
            Arc::clone(&keys),
            &TokenConfig::default(),
        )
        .unwrap_err();
        assert!(matches!(twice, RelayError::Duplicate(ref n) if n == "palette"));
        assert_eq!(twice.to_string(), "service `palette` is declared twice");
        let long = TokenConfig {
            lifetime: HumanDuration::secs(3600),
            ..TokenConfig::default()
        };
        let e = Relay::new(Vec::new(), keys, &long).unwrap_err();
        assert!(matches!(e, RelayError::Lifetime { .. }), "{e}");
        assert!(
            e.to_string()
                .starts_with("tokens.lifetime `60 min` must be between 1 s and 300 s"),
            "{e}"
        );
    }

    /// The `palette` declaration with `extra` keys, checked as
    /// deserializing checks it.
    fn parse(extra: &str) -> Result<ServiceDecl, ServiceDeclError> {
        let raw: RawServiceDecl = toml::from_str(&format!(
            "name = \"palette\"\nurl = \"http://127.0.0.1:9\"\n{extra}"
        ))
        .unwrap();
        ServiceDecl::try_from(raw)
    }

    #[test]
    fn a_service_forwards_the_headers_it_lists_and_never_an_identity_header() {
        let d = parse("forward_headers = [\"X-Request-Id\", \"range\", \"x-request-id\"]").unwrap();
        assert_eq!(d.forward_headers, ["x-request-id", "range"]);
        assert!(parse("").unwrap().forward_headers.is_empty());
        for h in [
            "authorization",
            "Cookie",
            "host",
            "x-forwarded-user",
            "x-remote-user",
            "impersonate-user",
            "x-http-method-override",
            "te",
            "trailer",
            "accept-encoding",
            "x-bulkhead-tenant",
        ] {
            let e = parse(&format!("forward_headers = [\"{h}\"]")).unwrap_err();
            assert!(
                matches!(e.fault, ServiceFault::NeverForwarded { ref header, .. } if header == h),
                "{h}: {e}"
            );
            assert!(e.to_string().contains("can never be forwarded"), "{h}: {e}");
        }
        let e = parse("forward_headers = [\"bad header\"]").unwrap_err();
        assert!(matches!(e.fault, ServiceFault::NotHeader(_)), "{e}");
        assert!(e.to_string().contains("not a header name"), "{e}");
    }
}
