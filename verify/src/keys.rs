//! Key sets: the JWK the host publishes for an Ed25519 key
//! ([`ed25519_jwk`]), and the validated, pinned map from `kid` to key that a
//! verifier checks signatures with. A `kid` is only ever a key in that map.

use std::collections::HashMap;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ed25519_dalek::VerifyingKey;
use jsonwebtoken::DecodingKey;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, KeyOperations,
    OctetKeyPairParameters, OctetKeyPairType, PublicKeyUse,
};

use crate::ConfigError;

/// Most keys a key set may hold. A rotating host publishes its current key
/// and the previous one; a few more leave room for an unusual rotation, and
/// the bound keeps a hostile or broken JWKS from growing without limit.
pub const MAX_KEYS: usize = 16;

/// Longest accepted `kid`, in bytes.
pub const MAX_KEY_ID_BYTES: usize = 256;

/// The JWK for an Ed25519 public key, as the host publishes it:
/// `{"kty":"OKP","crv":"Ed25519","x":"<base64url>","kid":"<kid>","alg":"EdDSA","use":"sig"}`.
pub fn ed25519_jwk(kid: &str, public_key: &[u8; 32]) -> Jwk {
    Jwk {
        common: CommonParameters {
            public_key_use: Some(PublicKeyUse::Signature),
            key_algorithm: Some(KeyAlgorithm::EdDSA),
            key_id: Some(kid.to_owned()),
            ..CommonParameters::default()
        },
        algorithm: AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
            key_type: OctetKeyPairType::OctetKeyPair,
            curve: EllipticCurve::Ed25519,
            x: URL_SAFE_NO_PAD.encode(public_key),
        }),
    }
}

/// A validated key set: every key an Ed25519 verification key with a unique
/// `kid`.
pub(crate) struct KeySet {
    keys: HashMap<String, DecodingKey>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet").field("ids", &self.ids()).finish()
    }
}

impl KeySet {
    /// Validates every key of `jwks`. The whole set is refused if any key is
    /// unusable rather than that key skipped: the host publishes only
    /// Ed25519 keys, so anything else means a misconfiguration or tampering,
    /// and a silently shrunken set would show up later as unexplained
    /// `UnknownKey` refusals.
    pub(crate) fn new(jwks: &JwkSet) -> Result<Self, ConfigError> {
        if jwks.keys.is_empty() {
            return Err(ConfigError::NoKeys);
        }
        if jwks.keys.len() > MAX_KEYS {
            return Err(ConfigError::TooManyKeys {
                count: jwks.keys.len(),
            });
        }
        let mut keys = HashMap::with_capacity(jwks.keys.len());
        for (index, jwk) in jwks.keys.iter().enumerate() {
            let kid = match &jwk.common.key_id {
                Some(kid) if usable_key_id(kid) => kid.clone(),
                _ => return Err(ConfigError::KeyId { index }),
            };
            let key = decoding_key(&kid, jwk)?;
            if keys.contains_key(&kid) {
                return Err(ConfigError::DuplicateKeyId { kid });
            }
            keys.insert(kid, key);
        }
        Ok(Self { keys })
    }

    /// The key named `kid`, if the set has it.
    pub(crate) fn get(&self, kid: &str) -> Option<&DecodingKey> {
        self.keys.get(kid)
    }

    /// The set's key ids, sorted.
    pub(crate) fn ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.keys.keys().cloned().collect();
        ids.sort();
        ids
    }
}

fn usable_key_id(kid: &str) -> bool {
    !kid.is_empty() && kid.len() <= MAX_KEY_ID_BYTES && !kid.chars().any(char::is_control)
}

/// Checks that `jwk` is an Ed25519 verification key and decodes it.
fn decoding_key(kid: &str, jwk: &Jwk) -> Result<DecodingKey, ConfigError> {
    let unsupported = |reason| ConfigError::UnsupportedKey {
        kid: kid.to_owned(),
        reason,
    };
    let params = match &jwk.algorithm {
        AlgorithmParameters::OctetKeyPair(params) => params,
        _ => return Err(unsupported("key type is not `OKP`")),
    };
    if params.curve != EllipticCurve::Ed25519 {
        return Err(unsupported("curve is not `Ed25519`"));
    }
    if jwk
        .common
        .key_algorithm
        .is_some_and(|alg| alg != KeyAlgorithm::EdDSA)
    {
        return Err(unsupported("`alg` is not `EdDSA`"));
    }
    if jwk
        .common
        .public_key_use
        .as_ref()
        .is_some_and(|usage| *usage != PublicKeyUse::Signature)
    {
        return Err(unsupported("`use` is not `sig`"));
    }
    if jwk
        .common
        .key_operations
        .as_ref()
        .is_some_and(|ops| !ops.contains(&KeyOperations::Verify))
    {
        return Err(unsupported("`key_ops` does not include `verify`"));
    }

    // jsonwebtoken's EdDSA verifier slices the first 32 bytes of the key
    // without checking its length; only a key proven here to be 32 bytes, a
    // valid curve point, and not of small order reaches it.
    let invalid = || ConfigError::InvalidKey {
        kid: kid.to_owned(),
    };
    let bytes: [u8; 32] = URL_SAFE_NO_PAD
        .decode(&params.x)
        .map_err(|_| invalid())?
        .try_into()
        .map_err(|_| invalid())?;
    let point = VerifyingKey::from_bytes(&bytes).map_err(|_| invalid())?;
    if point.is_weak() {
        return Err(invalid());
    }
    DecodingKey::from_ed_components(&params.x).map_err(|_| invalid())
}
