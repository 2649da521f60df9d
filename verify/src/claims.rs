//! The token's contents: [`CallClaims`], the header the host mints, and the
//! strict reading of an untrusted payload into claims. Knows nothing about
//! keys or signatures.

use jsonwebtoken::{Algorithm, Header};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::VerifyError;

/// The `typ` header of every call token. A token of any other type (a plain
/// `JWT`, an ID token, an access token minted by some other system with the
/// same key) is refused, so tokens cannot be substituted across uses.
pub const TOKEN_TYPE: &str = "bulkhead-call+jwt";

/// The one accepted `alg` header value.
pub const ALGORITHM: &str = "EdDSA";

/// The claims of a call token: who the call is made for, by which job, for
/// which service, and when it is valid.
///
/// The host serializes this struct to mint a token, so field names are the
/// wire names. Every field is required when verifying.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallClaims {
    /// Issuer: the host that minted the token, e.g. `bulkhead`.
    pub iss: String,
    /// Audience: the one service the token is for, e.g. `palette`. Always a
    /// single string, never an array.
    pub aud: String,
    /// Subject: the user who submitted the job.
    pub sub: String,
    /// The submitting user's tenant.
    pub tenant: String,
    /// The submitting user's scopes.
    pub scopes: Vec<String>,
    /// The id of the job making the call.
    pub job: String,
    /// The name of the module the job runs.
    pub module: String,
    /// Issued at, seconds since the Unix epoch.
    pub iat: u64,
    /// Not before, seconds since the Unix epoch.
    pub nbf: u64,
    /// Expires at, seconds since the Unix epoch. The token is valid strictly
    /// before this instant (plus the verifier's leeway).
    pub exp: u64,
    /// Unique token id.
    pub jti: String,
}

/// The header the host puts on a call token signed with the key `kid`:
/// `{"alg":"EdDSA","typ":"bulkhead-call+jwt","kid":"<kid>"}`.
pub fn call_header(kid: &str) -> Header {
    let mut header = Header::new(Algorithm::EdDSA);
    header.typ = Some(TOKEN_TYPE.to_owned());
    header.kid = Some(kid.to_owned());
    header
}

/// The header parameters the verifier reads before it trusts anything.
///
/// A derived struct rather than a map: serde refuses a duplicated member
/// (`{"alg":"none","alg":"EdDSA"}`), so no two parsers can read the same
/// header differently. Other members are ignored, in particular `jku`,
/// `x5u` and `jwk`: keys only ever come from the pinned set.
#[derive(Deserialize)]
pub(crate) struct RawHeader {
    pub alg: Option<Value>,
    pub typ: Option<Value>,
    pub kid: Option<Value>,
    pub crit: Option<Value>,
}

/// The payload, each claim still untyped so that a missing claim and a claim
/// of the wrong type are reported by name. Duplicated members are refused.
#[derive(Deserialize)]
pub(crate) struct RawClaims {
    iss: Option<Value>,
    sub: Option<Value>,
    aud: Option<Value>,
    exp: Option<Value>,
    nbf: Option<Value>,
    iat: Option<Value>,
    jti: Option<Value>,
    tenant: Option<Value>,
    scopes: Option<Value>,
    job: Option<Value>,
    module: Option<Value>,
}

impl RawClaims {
    /// Types every claim, in a fixed order, failing on the first one missing
    /// (or `null`) or of the wrong type. A non-string `aud` (in particular an
    /// array, even one naming this service) is an [`VerifyError::Audience`]:
    /// a call token has exactly one audience.
    pub(crate) fn into_claims(self) -> Result<CallClaims, VerifyError> {
        let iss = string(self.iss, "iss")?;
        let sub = string(self.sub, "sub")?;
        let aud = match self.aud {
            None => return Err(VerifyError::MissingClaim("aud")),
            Some(Value::String(aud)) => aud,
            Some(_) => return Err(VerifyError::Audience),
        };
        let exp = seconds(self.exp, "exp")?;
        let nbf = seconds(self.nbf, "nbf")?;
        let iat = seconds(self.iat, "iat")?;
        let jti = string(self.jti, "jti")?;
        let tenant = string(self.tenant, "tenant")?;
        let scopes = match self.scopes {
            None => return Err(VerifyError::MissingClaim("scopes")),
            Some(Value::Array(items)) => items
                .into_iter()
                .map(|item| match item {
                    Value::String(scope) => Ok(scope),
                    _ => Err(VerifyError::InvalidClaim("scopes")),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(_) => return Err(VerifyError::InvalidClaim("scopes")),
        };
        let job = string(self.job, "job")?;
        let module = string(self.module, "module")?;
        Ok(CallClaims {
            iss,
            aud,
            sub,
            tenant,
            scopes,
            job,
            module,
            iat,
            nbf,
            exp,
            jti,
        })
    }
}

/// A required, non-empty string claim.
fn string(value: Option<Value>, name: &'static str) -> Result<String, VerifyError> {
    match value {
        None => Err(VerifyError::MissingClaim(name)),
        Some(Value::String(s)) if !s.is_empty() => Ok(s),
        Some(_) => Err(VerifyError::InvalidClaim(name)),
    }
}

/// A required NumericDate, as a non-negative integer: fractions, negative
/// numbers and numeric strings are refused rather than rounded.
fn seconds(value: Option<Value>, name: &'static str) -> Result<u64, VerifyError> {
    match value {
        None => Err(VerifyError::MissingClaim(name)),
        Some(Value::Number(n)) => n.as_u64().ok_or(VerifyError::InvalidClaim(name)),
        Some(_) => Err(VerifyError::InvalidClaim(name)),
    }
}
