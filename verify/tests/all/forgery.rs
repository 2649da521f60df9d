use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bulkhead_verify::{MAX_TOKEN_BYTES, TOKEN_TYPE, VerifyError};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::support::*;

fn refused(key: &TestKey, token: &str) -> VerifyError {
    verifier(&[key])
        .verify(token)
        .expect_err("forgery accepted")
}

#[test]
fn alg_none_unsigned_is_refused() {
    let key = TestKey::generate("k1");
    let header = with(header("k1"), "alg", "none".into());
    let unsigned = format!("{}.", signing_input(&header, &claims()));
    assert_eq!(refused(&key, &unsigned), VerifyError::Algorithm);
    // Also with a signature part present, and with the other spellings.
    for alg in ["none", "None", "NONE", "eddsa", "Ed25519", ""] {
        let header = with(header.clone(), "alg", alg.into());
        let token = key.sign(&header, &claims());
        assert_eq!(refused(&key, &token), VerifyError::Algorithm, "alg {alg:?}");
    }
    let no_alg = without(header, "alg");
    assert_eq!(
        refused(&key, &key.sign(&no_alg, &claims())),
        VerifyError::Algorithm
    );
}

/// The classic confusion: an HMAC token whose secret is the verifier's
/// public key, which a verifier that trusts the header's `alg` would check
/// with that key as an HMAC secret.
#[test]
fn hs256_signed_with_the_public_key_is_refused() {
    let key = TestKey::generate("k1");
    let mut header = Header::new(Algorithm::HS256);
    header.typ = Some(TOKEN_TYPE.into());
    header.kid = Some("k1".into());
    let secrets: [Vec<u8>; 2] = [key.public().to_vec(), key.x().into_bytes()];
    for secret in secrets {
        let token =
            jsonwebtoken::encode(&header, &claims(), &EncodingKey::from_secret(&secret)).unwrap();
        assert_eq!(refused(&key, &token), VerifyError::Algorithm);
    }
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        header.alg = alg;
        let secret = EncodingKey::from_secret(&key.public());
        let token = jsonwebtoken::encode(&header, &claims(), &secret).unwrap();
        assert_eq!(refused(&key, &token), VerifyError::Algorithm);
    }
}

#[test]
fn rsa_and_ecdsa_headers_are_refused() {
    let key = TestKey::generate("k1");
    for alg in ["RS256", "PS256", "ES256", "ES384"] {
        let header = with(header("k1"), "alg", alg.into());
        // Signed with the Ed25519 key: the header is what must fail.
        let token = key.sign(&header, &claims());
        assert_eq!(refused(&key, &token), VerifyError::Algorithm, "alg {alg}");
    }
}

#[test]
fn an_unknown_kid_is_refused() {
    let key = TestKey::generate("k1");
    let other = TestKey::generate("k2");
    assert_eq!(
        refused(&key, &other.sign(&header("k2"), &claims())),
        VerifyError::UnknownKey
    );
}

#[test]
fn a_path_like_kid_is_only_a_map_key() {
    let key = TestKey::generate("k1");
    for kid in [
        "../../etc/passwd",
        "/etc/passwd",
        "file:///etc/passwd",
        "http://127.0.0.1/jwks.json",
        "k1/../k1",
        "k1 ",
        "K1",
    ] {
        let token = key.sign(&header(kid), &claims());
        assert_eq!(
            refused(&key, &token),
            VerifyError::UnknownKey,
            "kid {kid:?}"
        );
    }
}

#[test]
fn a_missing_or_non_string_kid_is_refused() {
    let key = TestKey::generate("k1");
    let cases = [
        without(header("k1"), "kid"),
        with(header("k1"), "kid", "".into()),
        with(header("k1"), "kid", json!(1)),
        with(header("k1"), "kid", json!(["k1"])),
        with(header("k1"), "kid", Value::Null),
    ];
    for header in cases {
        let token = key.sign(&header, &claims());
        assert_eq!(refused(&key, &token), VerifyError::MissingKeyId, "{header}");
    }
}

#[test]
fn a_wrong_or_missing_typ_is_refused() {
    let key = TestKey::generate("k1");
    let cases = [
        without(header("k1"), "typ"),
        with(header("k1"), "typ", "JWT".into()),
        with(header("k1"), "typ", "at+jwt".into()),
        with(header("k1"), "typ", "BULKHEAD-CALL+JWT".into()),
        with(header("k1"), "typ", json!([TOKEN_TYPE])),
    ];
    for header in cases {
        let token = key.sign(&header, &claims());
        assert_eq!(refused(&key, &token), VerifyError::Type, "{header}");
    }
}

#[test]
fn a_crit_header_is_refused() {
    let key = TestKey::generate("k1");
    let header = with(header("k1"), "crit", json!(["b64"]));
    let header = with(header, "b64", json!(false));
    assert_eq!(
        refused(&key, &key.sign(&header, &claims())),
        VerifyError::CriticalHeader
    );
}

#[test]
fn a_duplicated_header_member_is_refused() {
    let key = TestKey::generate("k1");
    // Two parsers could pick different `alg`s; neither is trusted.
    let header_json = format!(r#"{{"alg":"none","alg":"EdDSA","typ":"{TOKEN_TYPE}","kid":"k1"}}"#);
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header_json),
        URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims()).unwrap())
    );
    use ed25519_dalek::Signer as _;
    let signature = key.signing.sign(input.as_bytes());
    let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()));
    assert_eq!(refused(&key, &token), VerifyError::Malformed);
}

#[test]
fn a_tampered_payload_is_refused() {
    let key = TestKey::generate("k1");
    let token = key.sign(&header("k1"), &claims());
    let signature = token.rsplit('.').next().unwrap();
    let forged_claims = with(claims(), "tenant", "victim".into());
    let forged = format!(
        "{}.{signature}",
        signing_input(&header("k1"), &forged_claims)
    );
    assert_eq!(refused(&key, &forged), VerifyError::Signature);

    // A flipped bit in the signature, and a truncated one.
    let (input, signature) = token.rsplit_once('.').unwrap();
    let mut bytes = URL_SAFE_NO_PAD.decode(signature).unwrap();
    bytes[10] ^= 1;
    let flipped = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&bytes));
    assert_eq!(refused(&key, &flipped), VerifyError::Signature);
    let truncated = format!("{input}.{}", URL_SAFE_NO_PAD.encode(&bytes[..32]));
    assert_eq!(refused(&key, &truncated), VerifyError::Signature);
    let stripped = format!("{input}.");
    assert_eq!(refused(&key, &stripped), VerifyError::Signature);
}

#[test]
fn a_signature_from_another_key_with_the_same_kid_is_refused() {
    let key = TestKey::generate("k1");
    let impostor = TestKey::generate("k1");
    assert_eq!(
        refused(&key, &impostor.sign(&header("k1"), &claims())),
        VerifyError::Signature
    );
}

/// RFC 8725 §3.10: keys named by the token itself (`jwk`, `jku`, `x5u`)
/// are never used. With the attacker's `kid` the key is unknown; with the
/// pinned `kid` the attacker's signature does not verify.
#[test]
fn embedded_jwk_and_jku_headers_are_ignored() {
    let key = TestKey::generate("k1");
    let attacker = TestKey::generate("evil");
    let embedded = serde_json::to_value(attacker.jwk()).unwrap();
    let header_for = |kid: &str| {
        let header = with(header(kid), "jwk", embedded.clone());
        let header = with(header, "jku", "http://127.0.0.1:1/jwks.json".into());
        with(header, "x5u", "http://127.0.0.1:1/cert.pem".into())
    };
    assert_eq!(
        refused(&key, &attacker.sign(&header_for("evil"), &claims())),
        VerifyError::UnknownKey
    );
    assert_eq!(
        refused(&key, &attacker.sign(&header_for("k1"), &claims())),
        VerifyError::Signature
    );
}

#[test]
fn garbage_is_malformed() {
    let key = TestKey::generate("k1");
    let valid = key.sign(&header("k1"), &claims());
    let (head, rest) = valid.split_once('.').unwrap();
    let cases = [
        "".to_owned(),
        ".".to_owned(),
        "..".to_owned(),
        "...".to_owned(),
        "not a token".to_owned(),
        "Bearer x.y.z".to_owned(),
        "a.b.c".to_owned(),
        format!("{valid}.extra"),
        format!(".{rest}"),
        format!("{head}..sig"),
        // Padding, standard-alphabet and whitespace variants of the header.
        format!("{head}=.{rest}"),
        format!(" {valid}"),
        format!("{}.{rest}", head.replace('-', "+").replace('_', "/") + "+"),
        // A header that is JSON but not an object.
        format!("{}.{rest}", URL_SAFE_NO_PAD.encode("[1,2]")),
        format!("{}.{rest}", URL_SAFE_NO_PAD.encode("\"EdDSA\"")),
        "\u{0}\u{0}.\u{0}.\u{0}".to_owned(),
        "é.é.é".to_owned(),
    ];
    for token in cases {
        assert_eq!(refused(&key, &token), VerifyError::Malformed, "{token:?}");
    }
}

#[test]
fn a_payload_that_is_not_a_claims_object_is_malformed() {
    let key = TestKey::generate("k1");
    for payload in [json!([1]), json!("claims"), json!(null)] {
        let token = key.sign(&header("k1"), &payload);
        assert_eq!(refused(&key, &token), VerifyError::Malformed, "{payload}");
    }
    // A duplicated claim: `aud` twice.
    let header_part = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header("k1")).unwrap());
    let mut claims_json = serde_json::to_string(&claims()).unwrap();
    claims_json.insert_str(1, r#""aud":"payments","#);
    let input = format!("{header_part}.{}", URL_SAFE_NO_PAD.encode(claims_json));
    use ed25519_dalek::Signer as _;
    let signature = key.signing.sign(input.as_bytes());
    let token = format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.to_bytes()));
    assert_eq!(refused(&key, &token), VerifyError::Malformed);
}

#[test]
fn an_over_long_token_is_refused_before_parsing() {
    let key = TestKey::generate("k1");
    let big = with(claims(), "padding", "x".repeat(MAX_TOKEN_BYTES).into());
    let token = key.sign(&header("k1"), &big);
    assert!(token.len() > MAX_TOKEN_BYTES);
    assert_eq!(refused(&key, &token), VerifyError::TooLarge);
    assert_eq!(
        refused(&key, &"a".repeat(MAX_TOKEN_BYTES + 1)),
        VerifyError::TooLarge
    );
    assert_eq!(refused(&key, &".".repeat(1_000_000)), VerifyError::TooLarge);
}

#[test]
fn errors_never_contain_token_content() {
    let key = TestKey::generate("k1");
    let marker = "SECRET-MARKER";
    let cases = [
        key.sign(&header(marker), &claims()),
        key.sign(&header("k1"), &with(claims(), "iss", marker.into())),
        key.sign(&header("k1"), &with(claims(), "aud", marker.into())),
        key.sign(&with(header("k1"), "typ", marker.into()), &claims()),
        key.sign(&with(header("k1"), "alg", marker.into()), &claims()),
        format!("{marker}.{marker}.{marker}"),
    ];
    for token in cases {
        let error = refused(&key, &token);
        let shown = format!("{error} {error:?} {}", error.code());
        assert!(!shown.contains(marker), "{shown}");
        assert!(!shown.contains(&token), "{shown}");
    }
}
