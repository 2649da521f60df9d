//! Caller identity: opaque reference tokens.
//!
//! A token is `bkh_` followed by 43 base64url characters (32 random bytes):
//! high entropy, and recognisable by its prefix when it leaks into a log or a
//! repository. The host stores only its SHA-256; the token's record carries
//! tenant, subject, scopes, expiry and a revoked flag, looked up on every
//! request so a revocation takes effect on the next one. Clients never hold
//! anything else: no JWT, no identity header, is ever trusted from them.

use base64::Engine as _;
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Prefix of every reference token.
pub const TOKEN_PREFIX: &str = "bkh_";
const TOKEN_BYTES: usize = 32;
/// Length of a well-formed token.
pub const TOKEN_LEN: usize = TOKEN_PREFIX.len() + 43;

/// A freshly minted token: the secret (shown once) and its hash (stored).
#[derive(Debug)]
pub struct NewToken {
    /// The token the client presents. Never stored.
    pub secret: String,
    /// Its SHA-256, hex; the store's key.
    pub hash: String,
    /// A short public identifier for listing and revoking.
    pub id: String,
}

/// Mints a new random token.
pub fn mint() -> NewToken {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    let secret = format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let hash = hash(&secret);
    // The id is derived from the hash, not the secret: listing ids reveals
    // nothing usable.
    let id = format!("tok_{}", &hash[..16]);
    NewToken { secret, hash, id }
}

/// The stored form of a presented token.
pub fn hash(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Whether `s` has the shape of a reference token. Anything else (a JWT, a
/// random string) is rejected without a store lookup.
pub fn well_formed(s: &str) -> bool {
    s.len() == TOKEN_LEN
        && s.starts_with(TOKEN_PREFIX)
        && s[TOKEN_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Who is calling: resolved from a token's record, never from the request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// Tenant every job and output is bound to.
    pub tenant: String,
    /// The person or service within the tenant.
    pub subject: String,
    /// Scopes granted to this token.
    pub scopes: Vec<String>,
    /// The token's public id (for audit).
    pub token_id: String,
    /// The address the request came from, when the edge knows it (for
    /// audit and its per-address limits); never stored with a job.
    #[serde(skip)]
    pub client: Option<std::net::IpAddr>,
}

impl Identity {
    /// Whether the caller holds any of `scopes`.
    pub fn has_any(&self, scopes: &[String]) -> bool {
        scopes.iter().any(|s| self.scopes.contains(s))
    }
}

/// A stored token.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public id.
    pub id: String,
    /// SHA-256 of the secret, hex.
    #[serde(skip_serializing)]
    pub hash: String,
    /// Tenant.
    pub tenant: String,
    /// Subject.
    pub subject: String,
    /// Scopes.
    pub scopes: Vec<String>,
    /// Creation time, Unix seconds.
    pub created_at: i64,
    /// Expiry, Unix seconds; `None` never expires.
    pub expires_at: Option<i64>,
    /// Revoked tokens fail authentication.
    pub revoked: bool,
}

impl TokenRecord {
    /// The identity this record grants at `now`, if it is usable.
    pub fn identity_at(&self, now: i64) -> Option<Identity> {
        let expired = self.expires_at.is_some_and(|e| e <= now);
        (!self.revoked && !expired).then(|| Identity {
            tenant: self.tenant.clone(),
            subject: self.subject.clone(),
            scopes: self.scopes.clone(),
            token_id: self.id.clone(),
            client: None,
        })
    }
}

/// A tenant or subject name that breaks the rule, naming it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid {kind} `{}`: use 1 to 64 characters of a-z A-Z 0-9 . _ - @",
    value.escape_debug()
)]
pub struct PrincipalError {
    /// `tenant` or `subject`.
    pub kind: &'static str,
    /// The value given.
    pub value: String,
}

/// Checks a tenant or subject name (`kind`): 1 to 64 of
/// `a-z A-Z 0-9 . _ - @`.
///
/// # Errors
/// A [`PrincipalError`] naming the bad value.
pub fn validate_principal(kind: &'static str, s: &str) -> Result<(), PrincipalError> {
    let ok = !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(PrincipalError {
            kind,
            value: s.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minted_tokens_are_prefixed_unique_and_well_formed() {
        let a = mint();
        let b = mint();
        assert!(a.secret.starts_with("bkh_"));
        assert_eq!(a.secret.len(), TOKEN_LEN);
        assert!(well_formed(&a.secret));
        assert_ne!(a.secret, b.secret);
        assert_eq!(a.hash, hash(&a.secret));
        assert!(
            !a.id.contains(&a.secret[4..12]),
            "the id must not leak the secret"
        );
    }

    #[test]
    fn jwts_and_junk_are_not_tokens() {
        for bad in [
            "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.",
            "bkh_short",
            "",
            "bkh_!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!",
        ] {
            assert!(!well_formed(bad), "{bad}");
        }
    }

    #[test]
    fn revoked_and_expired_records_grant_nothing() {
        let mut r = TokenRecord {
            id: "tok_1".into(),
            hash: "h".into(),
            tenant: "acme".into(),
            subject: "ci".into(),
            scopes: vec!["thumbnail:run".into()],
            created_at: 0,
            expires_at: Some(100),
            revoked: false,
        };
        assert!(r.identity_at(99).is_some());
        assert!(r.identity_at(100).is_none());
        r.expires_at = None;
        r.revoked = true;
        assert!(r.identity_at(0).is_none());
    }
}
