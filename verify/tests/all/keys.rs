use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bulkhead_verify::{
    ConfigError, DEFAULT_LEEWAY, JwkSet, MAX_KEYS, MAX_LEEWAY, Verifier, VerifierConfig,
    VerifyError, ed25519_jwk,
};
use serde_json::json;

use crate::support::*;

fn parse(jwks: serde_json::Value) -> JwkSet {
    serde_json::from_value(jwks).expect("jwks json")
}

fn build(jwks: &JwkSet) -> Result<Verifier, ConfigError> {
    Verifier::new(config(), jwks)
}

#[test]
fn the_published_jwk_is_exactly_the_contract() {
    let key = TestKey::generate("k1");
    let jwk = serde_json::to_value(key.jwk()).unwrap();
    assert_eq!(
        jwk,
        json!({"kty": "OKP", "crv": "Ed25519", "x": key.x(), "kid": "k1", "alg": "EdDSA", "use": "sig"})
    );
}

#[test]
fn a_jwks_document_parses_and_verifies() {
    let key = TestKey::generate("k1");
    let document = json!({"keys": [
        {"kty": "OKP", "crv": "Ed25519", "x": key.x(), "kid": "k1", "alg": "EdDSA", "use": "sig"}
    ]});
    let verifier = build(&parse(document)).unwrap();
    assert_eq!(verifier.key_ids(), ["k1"]);
    assert!(verifier.verify(&key.sign(&header("k1"), &claims())).is_ok());
}

#[test]
fn key_sets_with_other_key_types_are_refused_whole() {
    let key = TestKey::generate("k1");
    let good = json!({"kty": "OKP", "crv": "Ed25519", "x": key.x(), "kid": "k1"});
    let others = [
        json!({"kty": "oct", "k": key.x(), "kid": "hmac"}),
        json!({"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "rsa", "alg": "RS256"}),
        json!({"kty": "EC", "crv": "P-256", "x": key.x(), "y": key.x(), "kid": "ec"}),
        json!({"kty": "OKP", "crv": "Ed25519", "x": key.x(), "kid": "hs", "alg": "HS256"}),
        json!({"kty": "OKP", "crv": "Ed25519", "x": key.x(), "kid": "enc", "use": "enc"}),
        json!({"kty": "OKP", "crv": "Ed25519", "x": key.x(), "kid": "ops", "key_ops": ["sign"]}),
    ];
    for other in others {
        let jwks = parse(json!({"keys": [good.clone(), other.clone()]}));
        assert!(
            matches!(build(&jwks), Err(ConfigError::UnsupportedKey { .. })),
            "{other}"
        );
    }
}

#[test]
fn invalid_ed25519_keys_are_refused() {
    let key = TestKey::generate("k1");
    // The identity point has small order: any signature "verifies" for some
    // implementations.
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let xs = [
        URL_SAFE_NO_PAD.encode([0u8; 31]),
        URL_SAFE_NO_PAD.encode([0u8; 33]),
        URL_SAFE_NO_PAD.encode(identity),
        format!("{}=", key.x()),
        key.x().replace('-', "+").replace('_', "/") + "+/",
        "".to_owned(),
        "!!!".to_owned(),
    ];
    for x in xs {
        let jwks = parse(json!({"keys": [{"kty": "OKP", "crv": "Ed25519", "x": x, "kid": "k1"}]}));
        assert_eq!(
            build(&jwks).unwrap_err(),
            ConfigError::InvalidKey { kid: "k1".into() },
            "x {x:?}"
        );
    }
}

#[test]
fn key_ids_must_be_present_and_unique() {
    let a = TestKey::generate("k1");
    let b = TestKey::generate("k1");
    assert_eq!(
        build(&jwks(&[&a, &b])).unwrap_err(),
        ConfigError::DuplicateKeyId { kid: "k1".into() }
    );
    for kid in [None, Some(""), Some("k\n1")] {
        let mut jwk = a.jwk();
        jwk.common.key_id = kid.map(str::to_owned);
        let jwks = JwkSet { keys: vec![jwk] };
        assert_eq!(build(&jwks).unwrap_err(), ConfigError::KeyId { index: 0 });
    }
    let mut long = a.jwk();
    long.common.key_id = Some("k".repeat(257));
    assert_eq!(
        build(&JwkSet { keys: vec![long] }).unwrap_err(),
        ConfigError::KeyId { index: 0 }
    );
}

#[test]
fn empty_and_oversized_key_sets_are_refused() {
    assert_eq!(
        build(&JwkSet { keys: vec![] }).unwrap_err(),
        ConfigError::NoKeys
    );
    let keys: Vec<_> = (0..=MAX_KEYS)
        .map(|i| TestKey::generate(&format!("k{i}")))
        .collect();
    let refs: Vec<&TestKey> = keys.iter().collect();
    assert_eq!(
        build(&jwks(&refs)).unwrap_err(),
        ConfigError::TooManyKeys {
            count: MAX_KEYS + 1
        }
    );
    assert!(build(&jwks(&refs[..MAX_KEYS])).is_ok());
}

#[test]
fn the_leeway_is_bounded() {
    let key = TestKey::generate("k1");
    let mut config = config();
    config.leeway = MAX_LEEWAY;
    assert!(Verifier::new(config.clone(), &jwks(&[&key])).is_ok());
    config.leeway = MAX_LEEWAY + Duration::from_secs(1);
    assert_eq!(
        Verifier::new(config.clone(), &jwks(&[&key])).unwrap_err(),
        ConfigError::Leeway {
            leeway: config.leeway
        }
    );
    assert_eq!(VerifierConfig::new("i", "a").leeway, DEFAULT_LEEWAY);
}

#[test]
fn issuer_and_audience_must_be_set() {
    let key = TestKey::generate("k1");
    assert_eq!(
        Verifier::new(VerifierConfig::new("", "palette"), &jwks(&[&key])).unwrap_err(),
        ConfigError::EmptyIssuer
    );
    assert_eq!(
        Verifier::new(VerifierConfig::new("bulkhead", ""), &jwks(&[&key])).unwrap_err(),
        ConfigError::EmptyAudience
    );
}

/// The host publishes the new key beside the old one for a grace period,
/// then drops the old one.
#[test]
fn rotation_accepts_both_keys_then_only_the_new_one() {
    let old = TestKey::generate("2026-10");
    let new = TestKey::generate("2026-11");
    // A fresh token for each request, as the host mints them.
    let mut n = 0;
    let mut token = |key: &TestKey, kid: &str| {
        n += 1;
        let mut c = claims();
        c["jti"] = json!(format!("jti-{n}"));
        key.sign(&header(kid), &c)
    };

    let verifier = verifier(&[&old]);
    assert!(verifier.verify(&token(&old, "2026-10")).is_ok());
    assert_eq!(
        verifier.verify(&token(&new, "2026-11")),
        Err(VerifyError::UnknownKey)
    );

    verifier.update_keys(&jwks(&[&old, &new])).unwrap();
    assert_eq!(verifier.key_ids(), ["2026-10", "2026-11"]);
    assert!(verifier.verify(&token(&old, "2026-10")).is_ok());
    assert!(verifier.verify(&token(&new, "2026-11")).is_ok());

    verifier.update_keys(&jwks(&[&new])).unwrap();
    assert_eq!(
        verifier.verify(&token(&old, "2026-10")),
        Err(VerifyError::UnknownKey)
    );
    assert!(verifier.verify(&token(&new, "2026-11")).is_ok());
}

/// Each token is accepted once: a replay, even one the service's own
/// answer handed to someone, is refused until it expires, then forgotten.
#[test]
fn a_token_is_accepted_once() {
    let key = TestKey::generate("k1");
    let verifier = verifier(&[&key]);
    let t = now();
    let token = key.sign(&header("k1"), &claims_at(t));
    assert!(verifier.verify_at(&token, t).is_ok());
    assert_eq!(
        verifier.verify_at(&token, t + 1),
        Err(VerifyError::Replayed)
    );
    assert_eq!(VerifyError::Replayed.code(), "replayed");
    // Another token with the same `jti` is the same token spent.
    let mut same = claims_at(t);
    same["sub"] = json!("mallory");
    let other = key.sign(&header("k1"), &same);
    assert_eq!(
        verifier.verify_at(&other, t + 2),
        Err(VerifyError::Replayed)
    );
    // A different `jti` is a different request.
    let mut fresh = claims_at(t);
    fresh["jti"] = json!("jti-2");
    assert!(
        verifier
            .verify_at(&key.sign(&header("k1"), &fresh), t + 2)
            .is_ok()
    );
}

#[test]
fn a_refused_update_keeps_the_current_keys() {
    let key = TestKey::generate("k1");
    let verifier = verifier(&[&key]);
    let bad = parse(json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k1"}]}));
    assert!(verifier.update_keys(&bad).is_err());
    assert_eq!(verifier.key_ids(), ["k1"]);
    assert!(verifier.verify(&key.sign(&header("k1"), &claims())).is_ok());
}

#[test]
fn ed25519_jwk_round_trips_through_json() {
    let key = TestKey::generate("k1");
    let text = serde_json::to_string(&JwkSet {
        keys: vec![ed25519_jwk("k1", &key.public())],
    })
    .unwrap();
    let verifier = build(&serde_json::from_str(&text).unwrap()).unwrap();
    assert!(verifier.verify(&key.sign(&header("k1"), &claims())).is_ok());
}
