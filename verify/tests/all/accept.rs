use bulkhead_verify::CallClaims;

use crate::support::*;

#[test]
fn a_valid_token_passes_with_every_claim() {
    let key = TestKey::generate("k1");
    let token = key.sign(&header("k1"), &claims());
    let claims = verifier(&[&key]).verify(&token).expect("valid token");
    assert_eq!(claims.iss, ISSUER);
    assert_eq!(claims.aud, AUDIENCE);
    assert_eq!(claims.sub, "alice");
    assert_eq!(claims.tenant, "acme");
    assert_eq!(claims.scopes, ["thumbnail:run"]);
    assert_eq!(claims.job, "job-1");
    assert_eq!(claims.module, "thumbnail");
    assert_eq!(claims.jti, "jti-1");
    assert_eq!(claims.exp, claims.iat + 60);
}

#[test]
fn a_token_minted_the_hosts_way_round_trips() {
    let key = TestKey::generate("host-2026-11");
    let now = now();
    let minted = CallClaims {
        iss: ISSUER.into(),
        aud: AUDIENCE.into(),
        sub: "bob".into(),
        tenant: "globex".into(),
        scopes: vec![],
        job: "0193-job".into(),
        module: "thumbnail".into(),
        iat: now,
        nbf: now,
        exp: now + 30,
        jti: "0193-jti".into(),
    };
    let token = key.mint(&minted);
    assert_eq!(verifier(&[&key]).verify(&token), Ok(minted));
}

#[test]
fn the_minted_header_is_exactly_the_contract() {
    let header = serde_json::to_value(bulkhead_verify::call_header("k1")).unwrap();
    assert_eq!(
        header,
        serde_json::json!({"alg": "EdDSA", "typ": "bulkhead-call+jwt", "kid": "k1"})
    );
}

#[test]
fn unknown_claims_and_header_members_are_ignored() {
    let key = TestKey::generate("k1");
    let header = with(header("k1"), "cty", "json".into());
    let claims = with(claims(), "extra", serde_json::json!({"nested": [1, 2]}));
    assert!(
        verifier(&[&key])
            .verify(&key.sign(&header, &claims))
            .is_ok()
    );
}

#[test]
fn expired_within_the_leeway_passes() {
    let key = TestKey::generate("k1");
    let now = now();
    // exp two seconds ago; the leeway is five.
    let token = key.sign(&header("k1"), &claims_at(now - 62));
    assert!(verifier(&[&key]).verify_at(&token, now).is_ok());
}

#[test]
fn not_before_within_the_leeway_passes() {
    let key = TestKey::generate("k1");
    let now = now();
    let token = key.sign(&header("k1"), &claims_at(now + 4));
    assert!(verifier(&[&key]).verify_at(&token, now).is_ok());
}
