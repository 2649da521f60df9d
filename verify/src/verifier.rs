//! [`Verifier`]: one service's view of call tokens (the issuer it trusts,
//! its own audience, the pinned keys) and the checks, in order. The only
//! place that decides whether a token is accepted.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde_json::Value;

use crate::claims::{RawClaims, RawHeader};
use crate::keys::KeySet;
use crate::{ALGORITHM, CallClaims, ConfigError, JwkSet, TOKEN_TYPE, VerifyError};

/// Longest token accepted, in bytes. A call token is a few hundred bytes;
/// anything much longer is refused before it is decoded or parsed.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Largest leeway a verifier accepts for clock skew on `exp`, `nbf` and
/// `iat`. Tokens live seconds; a leeway of minutes would make them live
/// minutes.
pub const MAX_LEEWAY: Duration = Duration::from_secs(60);

/// The leeway of [`VerifierConfig::new`].
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(5);

/// Longest accepted token lifetime (`exp - iat`). The host mints a token per
/// call, bounded by the job's deadline; a token that claims to live longer
/// was not minted by a well-behaved host, and would be worth more to steal.
pub const MAX_LIFETIME: Duration = Duration::from_secs(10 * 60);

/// Most accepted tokens a verifier remembers while they are unexpired
/// (one `u64` digest of each `jti` and its expiry): a service accepting
/// more than this within one token lifetime refuses the excess with
/// [`VerifyError::ReplayWindowFull`] rather than forget one.
pub const MAX_SPENT: usize = 1 << 20;

/// What a service expects of its tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifierConfig {
    /// The exact `iss` accepted: the host's issuer name, e.g. `bulkhead`.
    pub issuer: String,
    /// The exact `aud` accepted: this service's name, e.g. `palette`. A token
    /// minted for another service is refused, so a service cannot replay the
    /// tokens it receives against its peers.
    pub audience: String,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`; at most
    /// [`MAX_LEEWAY`].
    pub leeway: Duration,
}

impl VerifierConfig {
    /// A configuration for `issuer` and `audience` with the
    /// [`DEFAULT_LEEWAY`] of 5 seconds.
    pub fn new(issuer: impl Into<String>, audience: impl Into<String>) -> Self {
        Self {
            issuer: issuer.into(),
            audience: audience.into(),
            leeway: DEFAULT_LEEWAY,
        }
    }
}

/// Verifies call tokens for one service against a pinned key set.
///
/// Checks, in order, each failing with its own [`VerifyError`]:
///
/// 1. size: at most [`MAX_TOKEN_BYTES`];
/// 2. shape: three base64url parts, a header that is a JSON object without
///    duplicated members;
/// 3. `alg` exactly `EdDSA`: `none`, HMAC and RSA tokens are refused before
///    any key is touched, so no key is ever used with another algorithm;
/// 4. `typ` exactly [`TOKEN_TYPE`]; no `crit`;
/// 5. `kid` present and in the pinned set. It is never fetched, never used
///    as a path; `jku`, `x5u` and embedded `jwk` parameters are ignored;
/// 6. the Ed25519 signature, with that key only;
/// 7. every claim present and well typed ([`CallClaims`]);
/// 8. `iss` and `aud` exactly equal to the configuration (an `aud` array is
///    refused even if it names this service);
/// 9. lifetime: `iat <= exp <= iat +` [`MAX_LIFETIME`];
/// 10. time: `nbf` and `iat` not in the future and `exp` not passed, each
///     with the leeway;
/// 11. once: a `jti` this verifier accepted before is refused
///     ([`VerifyError::Replayed`]), remembered until its token expires. The
///     host mints a token per request, so a token that reached anyone but
///     the service (a guest it was reflected to, a log) is already spent.
///
/// The key set can be replaced at any time ([`Verifier::update_keys`]) for
/// rotation; a verification in flight keeps the set it started with.
#[derive(Debug)]
pub struct Verifier {
    config: VerifierConfig,
    keys: RwLock<Arc<KeySet>>,
    validation: Validation,
    /// Digests of the accepted tokens' `jti`, with when each can be
    /// forgotten (its `exp` plus the leeway).
    spent: Mutex<Spent>,
}

#[derive(Debug, Default)]
struct Spent {
    until: HashMap<u64, u64>,
    /// When `until` is next swept of expired entries: once it doubles.
    sweep_at: usize,
    hasher: std::hash::RandomState,
}

impl Spent {
    /// Records `jti` as used until `forget_at`; `Err` if it already was.
    fn spend(&mut self, jti: &str, forget_at: u64, now: u64) -> Result<(), VerifyError> {
        use std::hash::BuildHasher as _;
        let digest = self.hasher.hash_one(jti);
        if self.until.get(&digest).is_some_and(|t| *t > now) {
            return Err(VerifyError::Replayed);
        }
        if self.until.len() >= self.sweep_at.max(1024) {
            self.until.retain(|_, t| *t > now);
            self.sweep_at = self.until.len() * 2;
        }
        if self.until.len() >= MAX_SPENT {
            return Err(VerifyError::ReplayWindowFull);
        }
        self.until.insert(digest, forget_at);
        Ok(())
    }
}

impl Verifier {
    /// A verifier for `config` pinned to the keys of `jwks`.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if the leeway exceeds [`MAX_LEEWAY`], the issuer or
    /// audience is empty, or the key set is empty, too large, or holds a key
    /// that is not an Ed25519 verification key with a unique `kid` (the whole
    /// set is refused, not the key skipped).
    pub fn new(config: VerifierConfig, jwks: &JwkSet) -> Result<Self, ConfigError> {
        if config.leeway > MAX_LEEWAY {
            return Err(ConfigError::Leeway {
                leeway: config.leeway,
            });
        }
        if config.issuer.is_empty() {
            return Err(ConfigError::EmptyIssuer);
        }
        if config.audience.is_empty() {
            return Err(ConfigError::EmptyAudience);
        }
        let keys = KeySet::new(jwks)?;

        // jsonwebtoken checks the algorithm and the signature only; the
        // claims are checked below, where each failure has its own error and
        // `aud` must be a single string.
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;

        Ok(Self {
            config,
            keys: RwLock::new(Arc::new(keys)),
            validation,
            spent: Mutex::default(),
        })
    }

    /// The configuration this verifier checks against.
    pub fn config(&self) -> &VerifierConfig {
        &self.config
    }

    /// Replaces the pinned key set, e.g. after re-fetching the host's JWKS:
    /// tokens signed with a key no longer in the set are refused with
    /// [`VerifyError::UnknownKey`] from then on.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] if the new set is refused, as in [`Verifier::new`];
    /// the current set is then kept.
    pub fn update_keys(&self, jwks: &JwkSet) -> Result<(), ConfigError> {
        let keys = Arc::new(KeySet::new(jwks)?);
        // Nothing panics while the lock is held, so a poisoned lock still
        // guards a whole key set.
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = keys;
        Ok(())
    }

    /// The `kid`s of the pinned keys, sorted.
    pub fn key_ids(&self) -> Vec<String> {
        self.current_keys().ids()
    }

    /// Verifies `token` (the compact JWS, without `Bearer `) now.
    ///
    /// # Errors
    ///
    /// The [`VerifyError`] of the first check that fails (see [`Verifier`]).
    pub fn verify(&self, token: &str) -> Result<CallClaims, VerifyError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        self.verify_at(token, now)
    }

    /// Verifies `token` as of `now`, in seconds since the Unix epoch.
    ///
    /// # Errors
    ///
    /// The [`VerifyError`] of the first check that fails (see [`Verifier`]).
    pub fn verify_at(&self, token: &str, now: u64) -> Result<CallClaims, VerifyError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(VerifyError::TooLarge);
        }
        let mut parts = token.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(VerifyError::Malformed);
        };
        if header.is_empty() || payload.is_empty() {
            return Err(VerifyError::Malformed);
        }

        let header: RawHeader = URL_SAFE_NO_PAD
            .decode(header)
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .ok_or(VerifyError::Malformed)?;
        if !is_string(header.alg.as_ref(), ALGORITHM) {
            return Err(VerifyError::Algorithm);
        }
        if !is_string(header.typ.as_ref(), TOKEN_TYPE) {
            return Err(VerifyError::Type);
        }
        if header.crit.is_some() {
            return Err(VerifyError::CriticalHeader);
        }
        let kid = match &header.kid {
            Some(Value::String(kid)) if !kid.is_empty() => kid,
            _ => return Err(VerifyError::MissingKeyId),
        };
        if signature.is_empty() {
            return Err(VerifyError::Signature);
        }

        let keys = self.current_keys();
        let key = keys.get(kid).ok_or(VerifyError::UnknownKey)?;
        let claims = jsonwebtoken::decode::<RawClaims>(token, key, &self.validation)
            .map_err(|error| match error.kind() {
                ErrorKind::InvalidSignature => VerifyError::Signature,
                ErrorKind::InvalidAlgorithm => VerifyError::Algorithm,
                _ => VerifyError::Malformed,
            })?
            .claims
            .into_claims()?;

        if claims.iss != self.config.issuer {
            return Err(VerifyError::Issuer);
        }
        if claims.aud != self.config.audience {
            return Err(VerifyError::Audience);
        }
        if claims.exp < claims.iat || claims.exp - claims.iat > MAX_LIFETIME.as_secs() {
            return Err(VerifyError::Lifetime);
        }
        let leeway = self.config.leeway.as_secs();
        if claims.nbf > now.saturating_add(leeway) || claims.iat > now.saturating_add(leeway) {
            return Err(VerifyError::NotYetValid);
        }
        // RFC 7519: the token is valid strictly before `exp`.
        if now >= claims.exp.saturating_add(leeway) {
            return Err(VerifyError::Expired);
        }
        self.spent
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .spend(&claims.jti, claims.exp.saturating_add(leeway), now)?;
        Ok(claims)
    }

    fn current_keys(&self) -> Arc<KeySet> {
        Arc::clone(&self.keys.read().unwrap_or_else(PoisonError::into_inner))
    }
}

fn is_string(value: Option<&Value>, expected: &str) -> bool {
    matches!(value, Some(Value::String(s)) if s == expected)
}
