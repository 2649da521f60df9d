//! Test keys, a verifier over them, and a hand-rolled token builder that can
//! produce the forgeries jsonwebtoken refuses to build.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bulkhead_verify::{
    CallClaims, JwkSet, TOKEN_TYPE, Verifier, VerifierConfig, call_header, ed25519_jwk,
};
use ed25519_dalek::pkcs8::EncodePrivateKey as _;
use ed25519_dalek::{Signer as _, SigningKey};
use jsonwebtoken::EncodingKey;
use rand::RngCore as _;
use serde_json::{Value, json};

pub const ISSUER: &str = "bulkhead";
pub const AUDIENCE: &str = "palette";
pub const LEEWAY: Duration = Duration::from_secs(5);

/// An Ed25519 key pair with its key id.
pub struct TestKey {
    pub kid: String,
    pub signing: SigningKey,
}

impl TestKey {
    pub fn generate(kid: &str) -> Self {
        let mut secret = [0u8; 32];
        rand::rng().fill_bytes(&mut secret);
        Self {
            kid: kid.to_owned(),
            signing: SigningKey::from_bytes(&secret),
        }
    }

    pub fn public(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    pub fn jwk(&self) -> bulkhead_verify::Jwk {
        ed25519_jwk(&self.kid, &self.public())
    }

    /// The JWK's `x`, as the host publishes it.
    pub fn x(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.public())
    }

    /// A compact JWS over exactly these header and claims JSON values.
    pub fn sign(&self, header: &Value, claims: &Value) -> String {
        let input = signing_input(header, claims);
        let signature = self.signing.sign(input.as_bytes());
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()))
    }

    /// A token minted the way the host mints one: jsonwebtoken's `encode`
    /// over [`CallClaims`] with [`call_header`].
    pub fn mint(&self, claims: &CallClaims) -> String {
        let der = self.signing.to_pkcs8_der().expect("pkcs8 encoding");
        let key = EncodingKey::from_ed_der(der.as_bytes());
        jsonwebtoken::encode(&call_header(&self.kid), claims, &key).expect("encode")
    }
}

pub fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(header).expect("header json")),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims json")),
    )
}

pub fn jwks(keys: &[&TestKey]) -> JwkSet {
    JwkSet {
        keys: keys.iter().map(|key| key.jwk()).collect(),
    }
}

pub fn config() -> VerifierConfig {
    VerifierConfig {
        issuer: ISSUER.to_owned(),
        audience: AUDIENCE.to_owned(),
        leeway: LEEWAY,
    }
}

/// A palette verifier pinned to `keys`.
pub fn verifier(keys: &[&TestKey]) -> Verifier {
    Verifier::new(config(), &jwks(keys)).expect("verifier")
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// The header the host mints, as JSON.
pub fn header(kid: &str) -> Value {
    json!({"alg": "EdDSA", "typ": TOKEN_TYPE, "kid": kid})
}

/// Valid claims for palette, issued at `iat` and living 60 s.
pub fn claims_at(iat: u64) -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "tenant": "acme",
        "scopes": ["thumbnail:run"],
        "job": "job-1",
        "module": "thumbnail",
        "iat": iat,
        "nbf": iat,
        "exp": iat + 60,
        "jti": "jti-1",
    })
}

/// Valid claims issued now.
pub fn claims() -> Value {
    claims_at(now())
}

/// `value` with `key` set to `to`.
pub fn with(mut value: Value, key: &str, to: Value) -> Value {
    value[key] = to;
    value
}

/// `value` without `key`.
pub fn without(mut value: Value, key: &str) -> Value {
    value.as_object_mut().expect("object").remove(key);
    value
}
