//! [`VerifyError`], why a token was refused, and [`ConfigError`], why a
//! verifier could not be built. A `VerifyError` never carries anything taken
//! from the token, so it is safe to log and to send back to the caller.

use std::time::Duration;

use thiserror::Error;

use crate::{MAX_KEYS, MAX_LEEWAY, MAX_LIFETIME, MAX_TOKEN_BYTES, TOKEN_TYPE};

/// Why a token was refused.
///
/// Variants hold no token content: neither the token nor any of its values
/// (an attacker-chosen `kid`, `iss` or `aud`) appear in the message, so it
/// can go into logs and responses as is. [`VerifyError::code`] gives a
/// stable snake_case name for each variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum VerifyError {
    /// The token is longer than [`MAX_TOKEN_BYTES`]; nothing else was read.
    #[error("token is longer than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    /// Not three base64url parts, a header or payload that is not a JSON
    /// object, a duplicated member, or a part that does not decode.
    #[error("malformed token")]
    Malformed,
    /// The header's `alg` is not exactly `EdDSA` (`none`, `HS256`, `RS256`,
    /// missing…).
    #[error("token algorithm is not EdDSA")]
    Algorithm,
    /// The header's `typ` is missing or not exactly [`TOKEN_TYPE`].
    #[error("token type is not `{TOKEN_TYPE}`")]
    Type,
    /// The header has a `crit` parameter: no extension is understood, so
    /// per RFC 7515 the token must be refused.
    #[error("token has critical header parameters")]
    CriticalHeader,
    /// The header has no `kid`, or it is not a non-empty string.
    #[error("token has no key id")]
    MissingKeyId,
    /// The `kid` is not in the pinned key set (never fetched).
    #[error("token key id is not in the key set")]
    UnknownKey,
    /// The signature is missing or does not verify with the key named by
    /// `kid`.
    #[error("bad token signature")]
    Signature,
    /// A required claim is absent or `null`.
    #[error("token has no `{0}` claim")]
    MissingClaim(&'static str),
    /// A claim has the wrong type (a string where a number belongs, a
    /// fractional or negative time) or is an empty string.
    #[error("token claim `{0}` is empty or has the wrong type")]
    InvalidClaim(&'static str),
    /// `iss` is not the configured issuer.
    #[error("token issuer is not the expected issuer")]
    Issuer,
    /// `aud` is not exactly this service: another service's name, or an
    /// array (even one that names this service).
    #[error("token audience is not this service")]
    Audience,
    /// `exp` has passed, leeway included.
    #[error("token has expired")]
    Expired,
    /// `nbf` or `iat` is in the future, leeway included.
    #[error("token is not valid yet")]
    NotYetValid,
    /// `exp` is before `iat`, or more than [`MAX_LIFETIME`] after it.
    #[error("token lifetime is negative or longer than {} s", MAX_LIFETIME.as_secs())]
    Lifetime,
    /// A token this verifier already accepted (the same `jti`): each call
    /// token is good for one request, so one that reached anyone else is
    /// already spent.
    #[error("token was already used")]
    Replayed,
    /// [`MAX_SPENT`](crate::MAX_SPENT) tokens are still within
    /// their lifetime: no more can be remembered, so none is accepted.
    #[error("too many unexpired tokens to remember another")]
    ReplayWindowFull,
}

impl VerifyError {
    /// A stable snake_case name for the variant (`unknown_key`,
    /// `missing_claim`…), for metrics, logs and error bodies.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::Malformed => "malformed",
            Self::Algorithm => "algorithm",
            Self::Type => "type",
            Self::CriticalHeader => "critical_header",
            Self::MissingKeyId => "missing_key_id",
            Self::UnknownKey => "unknown_key",
            Self::Signature => "signature",
            Self::MissingClaim(_) => "missing_claim",
            Self::InvalidClaim(_) => "invalid_claim",
            Self::Issuer => "issuer",
            Self::Audience => "audience",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::Lifetime => "lifetime",
            Self::Replayed => "replayed",
            Self::ReplayWindowFull => "replay_window_full",
        }
    }
}

/// Why a [`crate::Verifier`] could not be built, or its key set replaced.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The leeway exceeds [`MAX_LEEWAY`]: a large leeway keeps expired
    /// tokens usable.
    #[error("leeway of {leeway:?} exceeds the maximum of {MAX_LEEWAY:?}")]
    Leeway {
        /// The leeway asked for.
        leeway: Duration,
    },
    /// The expected issuer is empty.
    #[error("issuer is empty")]
    EmptyIssuer,
    /// The expected audience is empty.
    #[error("audience is empty")]
    EmptyAudience,
    /// The key set has no keys: every token would be refused.
    #[error("key set has no keys")]
    NoKeys,
    /// The key set has more than [`MAX_KEYS`] keys.
    #[error("key set has {count} keys, more than the maximum of {MAX_KEYS}")]
    TooManyKeys {
        /// How many keys the set has.
        count: usize,
    },
    /// A key has no `kid`, or one that is empty, contains control
    /// characters or is longer than
    /// [`MAX_KEY_ID_BYTES`](crate::MAX_KEY_ID_BYTES).
    #[error("key {index} in the key set has no usable `kid`")]
    KeyId {
        /// The key's position in the set.
        index: usize,
    },
    /// Two keys share a `kid`, so a token's `kid` would not name one key.
    #[error("key id `{kid}` appears more than once in the key set")]
    DuplicateKeyId {
        /// The repeated key id.
        kid: String,
    },
    /// A key is not an Ed25519 signing key (`kty` other than `OKP`, `crv`
    /// other than `Ed25519`, `alg` other than `EdDSA`, `use` other than
    /// `sig`, `key_ops` without `verify`).
    #[error("key `{kid}` is not an Ed25519 signing key: {reason}")]
    UnsupportedKey {
        /// The key's id.
        kid: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A key's `x` is not the base64url (unpadded) encoding of a valid,
    /// non-weak Ed25519 public key.
    #[error("key `{kid}` is not a valid Ed25519 public key")]
    InvalidKey {
        /// The key's id.
        kid: String,
    },
}
