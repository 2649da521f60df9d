//! Test keys, tokens minted the way the host mints them, and routers served
//! on loopback.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use bulkhead_services::ServiceState;
use bulkhead_verify::{CallClaims, JwkSet, Verifier, VerifierConfig, call_header, ed25519_jwk};
use ed25519_dalek::SigningKey;
use ed25519_dalek::pkcs8::EncodePrivateKey as _;
use jsonwebtoken::EncodingKey;
use rand::RngCore as _;

pub const ISSUER: &str = "bulkhead";

pub struct TestKey {
    pub kid: String,
    signing: SigningKey,
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

    pub fn jwk(&self) -> bulkhead_verify::Jwk {
        ed25519_jwk(&self.kid, &self.signing.verifying_key().to_bytes())
    }

    /// Signs `claims` under this key's kid with the contract's header.
    pub fn sign(&self, claims: &CallClaims) -> String {
        let der = self.signing.to_pkcs8_der().expect("pkcs8");
        let key = EncodingKey::from_ed_der(der.as_bytes());
        jsonwebtoken::encode(&call_header(&self.kid), claims, &key).expect("encode")
    }

    /// A token for `aud` on behalf of `sub` in `tenant`, valid for a minute.
    pub fn mint(&self, aud: &str, sub: &str, tenant: &str) -> String {
        self.sign(&claims(aud, sub, tenant))
    }
}

pub fn claims(aud: &str, sub: &str, tenant: &str) -> CallClaims {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    CallClaims {
        iss: ISSUER.into(),
        aud: aud.into(),
        sub: sub.into(),
        tenant: tenant.into(),
        scopes: vec!["thumbnail:run".into()],
        job: "job-7".into(),
        module: "thumbnail".into(),
        iat: now,
        nbf: now,
        exp: now + 60,
        jti: format!("jti-{}", rand::rng().next_u64()),
    }
}

pub fn jwks(keys: &[&TestKey]) -> JwkSet {
    JwkSet {
        keys: keys.iter().map(|key| key.jwk()).collect(),
    }
}

pub fn verifier(audience: &str, keys: &[&TestKey]) -> Arc<Verifier> {
    Arc::new(Verifier::new(VerifierConfig::new(ISSUER, audience), &jwks(keys)).expect("verifier"))
}

/// A state for the service `audience`, trusting `keys`.
pub fn state(audience: &str, keys: &[&TestKey]) -> ServiceState {
    ServiceState::new(verifier(audience, keys))
}

/// Serves `app` on 127.0.0.1 (any port) until the test's runtime ends.
pub async fn serve(app: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind loopback");
    let addr = listener.local_addr().expect("local addr");
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    addr
}

/// An HTTP client that talks to loopback directly and follows no redirect.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
}

/// Asserts that nothing in `response`'s headers or `body` contains `token`
/// or a recognisable piece of it (its signature part).
pub fn assert_not_echoed(headers: &reqwest::header::HeaderMap, body: &str, token: &str) {
    let signature = token.rsplit('.').next().expect("token parts");
    for (name, value) in headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        assert!(!value.contains(token), "header {name} echoes the token");
        assert!(
            !value.contains(signature),
            "header {name} echoes the signature"
        );
    }
    assert!(!body.contains(token), "body echoes the token: {body}");
    assert!(
        !body.contains(signature),
        "body echoes the signature: {body}"
    );
}
