//! Breaking the token layer: forged and replayed call tokens, each judged
//! by a `bulkhead_verify::Verifier` pinned to the host's published keys
//! (locally the suite relay's key ring; remotely `<server>/.well-known/jwks.json`),
//! as an internal service would deploy it.
//!
//! Held means every forged token is rejected, and with the error the
//! verifier documents for that trick (`alg: none` is an `algorithm`
//! refusal, not merely a bad signature): a token rejected by the wrong
//! check means the check meant to catch it did not.
//!
//! Forgeries that need no host key (`alg`, HMAC confusion, `kid` tricks,
//! embedded keys) also run against a service. Those that test the claim
//! checks (time, issuer, audience, missing claims) need a valid signature
//! over chosen claims, so they run only locally, where the suite created
//! the host's key ring and can sign with its key; the audience replay uses
//! a token the host really minted, taken from the allowed bait's log.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bulkhead_verify::{JwkSet, TOKEN_TYPE, Verifier, VerifierConfig, VerifyError};
use ed25519_dalek::Signer as _;
use jsonwebtoken::jwk::AlgorithmParameters;
use serde_json::{Value, json};

use crate::harness::egress::{self, ALLOWED, FORBIDDEN};
use crate::harness::{Harness, evidence};
use crate::model::{Attack, AttackResult, Check, Forgery, SUITE_SCOPE, lateral, ms};

/// What the forgeries are judged against.
#[derive(Debug)]
pub struct ForgeTarget {
    /// The host's published keys.
    pub jwks: JwkSet,
    /// Where they came from, for the report.
    pub jwks_source: String,
    /// The issuer the verifier expects.
    pub issuer: String,
    /// The host's signing key, locally.
    pub host_key: Option<ed25519_dalek::SigningKey>,
    /// A token the host minted for [`ALLOWED`], or why there is none.
    pub minted: Option<Result<String, String>>,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A compact JWS of `header` and `claims` with `signature` over them.
fn jws(header: &Value, claims: &Value, sign: &dyn Fn(&[u8]) -> Vec<u8>) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let signature = sign(input.as_bytes());
    format!("{input}.{}", b64(&signature))
}

fn ed25519(key: &ed25519_dalek::SigningKey) -> impl Fn(&[u8]) -> Vec<u8> + '_ {
    move |m| key.sign(m).to_bytes().to_vec()
}

fn hs256(secret: &[u8], kid: &str, claims: &Value) -> Result<String, String> {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.typ = Some(TOKEN_TYPE.to_owned());
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(
        &header,
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .map_err(|e| format!("cannot sign with HS256: {e}"))
}

/// Claims the host would mint for the allowed service now.
fn claims(issuer: &str, aud: &str) -> Value {
    let t = now();
    json!({
        "iss": issuer,
        "aud": aud,
        "sub": egress::CALLER_SUBJECT,
        "tenant": egress::CALLER_TENANT,
        "scopes": [SUITE_SCOPE],
        "job": "escape-suite-forged",
        "module": "escape-suite",
        "iat": t,
        "nbf": t,
        "exp": t + 30,
        "jti": evidence::random_token("forged"),
    })
}

fn with(mut v: Value, edits: &[(&str, Value)]) -> Value {
    for (k, x) in edits {
        v[*k] = x.clone();
    }
    v
}

/// One forged token and the refusal it must meet.
struct Case {
    name: String,
    token: String,
    expect: VerifyError,
    /// `None`: the allowed service's verifier; else the audience of
    /// another service's.
    audience: Option<&'static str>,
}

fn case(name: impl Into<String>, token: String, expect: VerifyError) -> Case {
    Case {
        name: name.into(),
        token,
        expect,
        audience: None,
    }
}

/// Runs one forgery against `t`.
pub fn run(t: &ForgeTarget, attack: &Attack, f: Forgery, started: Instant) -> AttackResult {
    match judge(t, f) {
        Ok((checks, stopped)) => AttackResult::judge(attack, checks, stopped, None, ms(started)),
        Err(e) => AttackResult::judge(attack, Vec::new(), String::new(), Some(e), ms(started)),
    }
}

fn judge(t: &ForgeTarget, f: Forgery) -> Result<(Vec<Check>, String), String> {
    let verifier_for = |aud: &str| {
        Verifier::new(VerifierConfig::new(t.issuer.clone(), aud), &t.jwks)
            .map_err(|e| format!("the host's key set is refused by the verifier: {e}"))
    };
    let verifier = verifier_for(ALLOWED)?;
    let first = t.jwks.keys.first().ok_or("the host publishes no key")?;
    let host_kid = first.common.key_id.clone().unwrap_or_default();
    let x = match &first.algorithm {
        AlgorithmParameters::OctetKeyPair(p) => p.x.clone(),
        _ => return Err("the host's first key is not an Ed25519 key".into()),
    };
    let mut checks = vec![Check::new(
        "keys",
        true,
        format!(
            "verifier for `{ALLOWED}` pinned to {} published keys ({})",
            t.jwks.keys.len(),
            t.jwks_source
        ),
    )];
    let base = claims(&t.issuer, ALLOWED);
    let header = |kid: &str| json!({"alg": "EdDSA", "typ": TOKEN_TYPE, "kid": kid});
    let attacker = ed25519_dalek::SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    let attacker_kid = bulkhead::relay::keys::thumbprint(&attacker.verifying_key().to_bytes());
    let attacker_jwk = json!({
        "kty": "OKP", "crv": "Ed25519", "alg": "EdDSA", "use": "sig",
        "kid": attacker_kid, "x": b64(&attacker.verifying_key().to_bytes()),
    });
    let by_attacker = |h: &Value, c: &Value| jws(h, c, &ed25519(&attacker));
    // Host-signed tokens: a valid signature over chosen claims, so each
    // claim check is what stands in the way.
    let host_signed = |h: &Value, c: &Value| -> Result<String, String> {
        let key = t
            .host_key
            .as_ref()
            .ok_or("needs the host's signing key (local runs only)")?;
        Ok(jws(h, c, &ed25519(key)))
    };
    if t.host_key.is_some() {
        let control = host_signed(&header(&host_kid), &base)?;
        if let Err(e) = verifier.verify(&control) {
            return Err(format!(
                "the verifier refuses even a valid host-signed token ({}): cannot judge",
                e.code()
            ));
        }
        checks.push(Check::new(
            "control",
            true,
            "a valid host-signed token with the same claims verifies",
        ));
    }

    let t0 = now();
    let cases: Vec<Case> = match f {
        Forgery::AlgNone => vec![
            case(
                "alg none, empty signature",
                jws(
                    &json!({"alg": "none", "typ": TOKEN_TYPE, "kid": host_kid}),
                    &base,
                    &|_| Vec::new(),
                ),
                VerifyError::Algorithm,
            ),
            case(
                "alg NONE, junk signature",
                jws(
                    &json!({"alg": "NONE", "typ": TOKEN_TYPE, "kid": host_kid}),
                    &base,
                    &|_| b"x".to_vec(),
                ),
                VerifyError::Algorithm,
            ),
            case(
                "no alg at all",
                by_attacker(&json!({"typ": TOKEN_TYPE, "kid": host_kid}), &base),
                VerifyError::Algorithm,
            ),
        ],
        Forgery::Hs256KeyBytes => {
            let raw = URL_SAFE_NO_PAD
                .decode(&x)
                .map_err(|_| "the host's key is not base64url")?;
            vec![case(
                "HS256 keyed with the 32 public key bytes",
                hs256(&raw, &host_kid, &base)?,
                VerifyError::Algorithm,
            )]
        }
        Forgery::Hs256JwkX => {
            let jwk = serde_json::to_string(first).map_err(|e| e.to_string())?;
            vec![
                case(
                    "HS256 keyed with the JWK's `x`",
                    hs256(x.as_bytes(), &host_kid, &base)?,
                    VerifyError::Algorithm,
                ),
                case(
                    "HS256 keyed with the JWK as JSON",
                    hs256(jwk.as_bytes(), &host_kid, &base)?,
                    VerifyError::Algorithm,
                ),
            ]
        }
        Forgery::UnknownKid => vec![
            case(
                "the attacker's key under its own thumbprint",
                by_attacker(&header(&attacker_kid), &base),
                VerifyError::UnknownKey,
            ),
            case(
                "the attacker's key under the host's kid",
                by_attacker(&header(&host_kid), &base),
                VerifyError::Signature,
            ),
        ],
        Forgery::PathKid => [
            ("the key file's path", format!("../keys/{host_kid}.pem")),
            (
                "the host's kid through `..`",
                format!("{host_kid}/../{host_kid}"),
            ),
            ("/dev/null", "/dev/null".to_owned()),
            (
                "/etc/passwd through `..`",
                "../../../../../../etc/passwd".to_owned(),
            ),
            ("a file URL", "file:///dev/null".to_owned()),
            ("a JWKS URL", "http://127.0.0.1:9/jwks.json".to_owned()),
            ("the host's kid and a newline", format!("{host_kid}\n")),
        ]
        .into_iter()
        .map(|(what, kid)| {
            case(
                format!("kid: {what}"),
                by_attacker(&header(&kid), &base),
                VerifyError::UnknownKey,
            )
        })
        .collect(),
        Forgery::EmbeddedKey => vec![
            case(
                "embedded jwk and jku, the attacker's kid",
                by_attacker(
                    &json!({"alg": "EdDSA", "typ": TOKEN_TYPE, "kid": attacker_kid,
                            "jwk": attacker_jwk, "jku": "http://127.0.0.1:9/jwks.json"}),
                    &base,
                ),
                VerifyError::UnknownKey,
            ),
            case(
                "embedded jwk, the host's kid",
                by_attacker(
                    &json!({"alg": "EdDSA", "typ": TOKEN_TYPE, "kid": host_kid,
                            "jwk": attacker_jwk}),
                    &base,
                ),
                VerifyError::Signature,
            ),
            case(
                "x5u, the host's kid",
                by_attacker(
                    &json!({"alg": "EdDSA", "typ": TOKEN_TYPE, "kid": host_kid,
                            "x5u": "http://127.0.0.1:9/cert.pem"}),
                    &base,
                ),
                VerifyError::Signature,
            ),
        ],
        Forgery::Expired => vec![
            case(
                "expired a minute ago",
                host_signed(
                    &header(&host_kid),
                    &with(
                        base.clone(),
                        &[
                            ("iat", json!(t0 - 120)),
                            ("nbf", json!(t0 - 120)),
                            ("exp", json!(t0 - 60)),
                        ],
                    ),
                )?,
                VerifyError::Expired,
            ),
            case(
                "expired just past the leeway",
                host_signed(
                    &header(&host_kid),
                    &with(
                        base.clone(),
                        &[
                            ("iat", json!(t0 - 40)),
                            ("nbf", json!(t0 - 40)),
                            ("exp", json!(t0 - 10)),
                        ],
                    ),
                )?,
                VerifyError::Expired,
            ),
        ],
        Forgery::NotYetValid => vec![
            case(
                "nbf in five minutes",
                host_signed(
                    &header(&host_kid),
                    &with(
                        base.clone(),
                        &[("nbf", json!(t0 + 300)), ("exp", json!(t0 + 330))],
                    ),
                )?,
                VerifyError::NotYetValid,
            ),
            case(
                "iat in five minutes",
                host_signed(
                    &header(&host_kid),
                    &with(
                        base.clone(),
                        &[
                            ("iat", json!(t0 + 300)),
                            ("nbf", json!(t0 + 300)),
                            ("exp", json!(t0 + 330)),
                        ],
                    ),
                )?,
                VerifyError::NotYetValid,
            ),
        ],
        Forgery::WrongIssuer => ["bulkhead-evil", "Bulkhead", "urn:bulkhead", "bulkhead "]
            .into_iter()
            .map(|iss| {
                Ok(case(
                    format!("iss {iss:?}"),
                    host_signed(
                        &header(&host_kid),
                        &with(base.clone(), &[("iss", json!(iss))]),
                    )?,
                    VerifyError::Issuer,
                ))
            })
            .collect::<Result<_, String>>()?,
        Forgery::ReplayAudience => {
            let minted = match &t.minted {
                Some(Ok(token)) => token.clone(),
                Some(Err(e)) => return Err(format!("no minted token to replay: {e}")),
                None => return Err("no minted token to replay".into()),
            };
            // It is a real token for the allowed service (as of its `iat`:
            // minted tokens live seconds).
            let iat = egress::unverified_claims(&minted)
                .and_then(|c| c["iat"].as_u64())
                .unwrap_or(t0);
            let real = verifier.verify_at(&minted, iat).map_err(|e| {
                format!(
                    "the minted token does not verify at `{ALLOWED}` ({})",
                    e.code()
                )
            })?;
            checks.push(Check::new(
                "minted",
                true,
                format!(
                    "a token the host minted for `{}` (job {}), taken from the allowed bait's log",
                    real.aud, real.job
                ),
            ));
            vec![
                Case {
                    name: format!("the minted `{ALLOWED}` token at `{FORBIDDEN}`"),
                    token: minted,
                    expect: VerifyError::Audience,
                    audience: Some(FORBIDDEN),
                },
                Case {
                    name: format!("host-signed, aud [`{FORBIDDEN}`, `{ALLOWED}`] at `{FORBIDDEN}`"),
                    token: host_signed(
                        &header(&host_kid),
                        &with(base.clone(), &[("aud", json!([FORBIDDEN, ALLOWED]))]),
                    )?,
                    expect: VerifyError::Audience,
                    audience: Some(FORBIDDEN),
                },
            ]
        }
        Forgery::MissingClaims => [
            "iss", "sub", "aud", "exp", "nbf", "iat", "jti", "tenant", "scopes", "job", "module",
        ]
        .into_iter()
        .map(|claim| {
            let mut c = base.clone();
            c.as_object_mut().expect("an object").remove(claim);
            Ok(case(
                format!("without `{claim}`"),
                host_signed(&header(&host_kid), &c)?,
                VerifyError::MissingClaim(claim),
            ))
        })
        .collect::<Result<_, String>>()?,
    };

    let mut codes = Vec::new();
    for c in cases {
        let v;
        let verifier = match c.audience {
            None => &verifier,
            Some(aud) => {
                v = verifier_for(aud)?;
                &v
            }
        };
        let (passed, detail) = match verifier.verify(&c.token) {
            Ok(claims) => (
                false,
                format!(
                    "ACCEPTED: the verifier took it as {}/{} for `{}`",
                    claims.tenant, claims.sub, claims.aud
                ),
            ),
            Err(e) if e == c.expect => {
                if !codes.contains(&e.code()) {
                    codes.push(e.code());
                }
                (true, format!("rejected: {e}"))
            }
            Err(e) => (
                false,
                format!(
                    "rejected by the wrong check: `{}` instead of `{}` ({e})",
                    e.code(),
                    c.expect.code()
                ),
            ),
        };
        checks.push(Check::new(&c.name, passed, detail));
    }
    Ok((checks, format!("rejected: {}", codes.join(", "))))
}

/// What the forgeries are judged against locally: the relay's published
/// keys, its signing key, and (for a replay) a token it really minted.
pub(crate) async fn forge_target(h: &Harness, f: Forgery) -> ForgeTarget {
    use ed25519_dalek::pkcs8::DecodePrivateKey as _;
    let minted = if f.needs_minted() {
        Some(minted_token(h).await)
    } else {
        None
    };
    ForgeTarget {
        jwks: h.egress.jwks(),
        jwks_source: "the suite relay's key ring".to_owned(),
        issuer: h.egress.relay.issuer().to_owned(),
        host_key: ed25519_dalek::SigningKey::from_pkcs8_pem(&h.egress.host_key_pem).ok(),
        minted,
    }
}

/// A token the host minted for the allowed bait: the newest in its log,
/// or one from a well-behaved `allowed` job run for the purpose.
pub(crate) async fn minted_token(h: &Harness) -> Result<String, String> {
    if let Some(t) = h.egress.last_minted() {
        return Ok(t);
    }
    let run = lateral("allowed");
    let module = h.load("escape-suite-minter", &run).await?;
    let job = h.spec(&run, "");
    h.main.run(&module, &job).await.map_err(|e| e.to_string())?;
    h.egress
        .last_minted()
        .ok_or_else(|| "the allowed job made no call".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_the_host_key_a_claim_forgery_is_an_error_not_a_pass() {
        let keys = bulkhead::relay::KeyRing::ephemeral();
        let t = ForgeTarget {
            jwks: keys.jwks(),
            jwks_source: "test".into(),
            issuer: "bulkhead".into(),
            host_key: None,
            minted: None,
        };
        assert!(judge(&t, Forgery::Expired).is_err());
        let (checks, _) = judge(&t, Forgery::AlgNone).unwrap();
        assert!(checks.iter().all(|c| c.passed), "{checks:?}");
    }
}
