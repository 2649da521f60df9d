use bulkhead_verify::{MAX_LIFETIME, Verifier, VerifierConfig, VerifyError};
use serde_json::{Value, json};

use crate::support::*;

fn verdict(claims: &Value) -> Result<bulkhead_verify::CallClaims, VerifyError> {
    let key = TestKey::generate("k1");
    verifier(&[&key]).verify(&key.sign(&header("k1"), claims))
}

#[test]
fn a_wrong_issuer_is_refused() {
    for iss in ["evil", "Bulkhead", "bulkhead ", "bulkhead\0"] {
        assert_eq!(
            verdict(&with(claims(), "iss", iss.into())),
            Err(VerifyError::Issuer),
            "{iss:?}"
        );
    }
}

/// A token the host minted for palette, replayed by palette (or anyone who
/// stole it there) at payments.
#[test]
fn a_token_for_another_service_is_refused() {
    let key = TestKey::generate("k1");
    let token = key.sign(&header("k1"), &claims());
    assert!(verifier(&[&key]).verify(&token).is_ok());
    let payments = Verifier::new(VerifierConfig::new(ISSUER, "payments"), &jwks(&[&key])).unwrap();
    assert_eq!(payments.verify(&token), Err(VerifyError::Audience));
}

/// RFC 7519 allows an array of audiences; a call token is for exactly one
/// service, so an array is refused even when it names this one: otherwise
/// one token could be good at several services.
#[test]
fn an_audience_array_is_refused_even_if_it_names_this_service() {
    for aud in [
        json!([AUDIENCE, "payments"]),
        json!([AUDIENCE]),
        json!([]),
        json!(7),
        json!({"aud": AUDIENCE}),
        json!(""),
        json!("palette "),
    ] {
        assert_eq!(
            verdict(&with(claims(), "aud", aud.clone())),
            Err(VerifyError::Audience),
            "{aud}"
        );
    }
}

#[test]
fn each_required_claim_is_required() {
    for name in [
        "iss", "sub", "aud", "exp", "nbf", "iat", "jti", "tenant", "scopes", "job", "module",
    ] {
        assert_eq!(
            verdict(&without(claims(), name)),
            Err(VerifyError::MissingClaim(name)),
            "without {name}"
        );
        assert_eq!(
            verdict(&with(claims(), name, Value::Null)),
            Err(VerifyError::MissingClaim(name)),
            "{name} null"
        );
    }
}

#[test]
fn claims_of_the_wrong_type_or_empty_are_refused() {
    let now = now();
    let cases: Vec<(&str, Value)> = vec![
        ("iss", json!(1)),
        ("iss", json!("")),
        ("sub", json!("")),
        ("tenant", json!("")),
        ("tenant", json!({"id": "acme"})),
        ("job", json!(1)),
        ("module", json!(true)),
        ("jti", json!("")),
        ("scopes", json!("thumbnail:run")),
        ("scopes", json!([1])),
        ("exp", json!((now + 60).to_string())),
        ("exp", json!(now as f64 + 60.5)),
        ("nbf", json!(-1)),
        ("iat", json!("now")),
    ];
    for (name, value) in cases {
        assert_eq!(
            verdict(&with(claims_at(now), name, value.clone())),
            Err(VerifyError::InvalidClaim(name)),
            "{name}: {value}"
        );
    }
    // jsonwebtoken's own pass over `sub` stops at a non-string and leaves the
    // payload unparsed: refused, but as malformed.
    assert_eq!(
        verdict(&with(claims_at(now), "sub", json!(["alice"]))),
        Err(VerifyError::Malformed)
    );
}

#[test]
fn an_expired_token_is_refused() {
    let now = now();
    // exp ten seconds ago, beyond the five-second leeway.
    assert_eq!(verdict(&claims_at(now - 70)), Err(VerifyError::Expired));
    // Exactly at exp + leeway: RFC 7519 wants the present strictly before.
    let key = TestKey::generate("k1");
    let token = key.sign(&header("k1"), &claims_at(now - 60));
    let verifier = verifier(&[&key]);
    assert!(
        verifier
            .verify_at(&token, now + LEEWAY.as_secs() - 1)
            .is_ok()
    );
    assert_eq!(
        verifier.verify_at(&token, now + LEEWAY.as_secs()),
        Err(VerifyError::Expired)
    );
}

#[test]
fn a_token_not_valid_yet_is_refused() {
    let now = now();
    let key = TestKey::generate("k1");
    let verifier = verifier(&[&key]);
    let future_nbf = with(claims_at(now), "nbf", json!(now + 30));
    assert_eq!(
        verifier.verify_at(&key.sign(&header("k1"), &future_nbf), now),
        Err(VerifyError::NotYetValid)
    );
    // Issued in the future (beyond the leeway) is refused the same way.
    let future_iat = claims_at(now + 30);
    assert_eq!(
        verifier.verify_at(&key.sign(&header("k1"), &future_iat), now),
        Err(VerifyError::NotYetValid)
    );
}

#[test]
fn an_over_long_or_negative_lifetime_is_refused() {
    let now = now();
    let max = MAX_LIFETIME.as_secs();
    let longest = with(claims_at(now), "exp", json!(now + max));
    assert!(verdict(&longest).is_ok());
    let too_long = with(claims_at(now), "exp", json!(now + max + 1));
    assert_eq!(verdict(&too_long), Err(VerifyError::Lifetime));
    let forever = with(claims_at(now), "exp", json!(u64::MAX));
    assert_eq!(verdict(&forever), Err(VerifyError::Lifetime));
    let backwards = with(claims_at(now), "iat", json!(now + 61));
    assert_eq!(verdict(&backwards), Err(VerifyError::Lifetime));
}

#[test]
fn time_arithmetic_does_not_overflow() {
    let key = TestKey::generate("k1");
    let verifier = verifier(&[&key]);
    let far = u64::MAX - 10;
    let claims = with(
        with(with(claims(), "iat", json!(far)), "nbf", json!(far)),
        "exp",
        json!(u64::MAX),
    );
    let token = key.sign(&header("k1"), &claims);
    assert!(verifier.verify_at(&token, far).is_ok());
    assert_eq!(
        verifier.verify_at(&token, u64::MAX),
        Err(VerifyError::Expired)
    );
    assert_eq!(verifier.verify_at(&token, 0), Err(VerifyError::NotYetValid));
}
