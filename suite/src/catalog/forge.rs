//! The bundled forgeries.

use crate::model::{Attack, AttackKind, Class, Forgery};

fn forge(id: &str, title: &str, f: Forgery) -> Attack {
    Attack {
        id: id.to_owned(),
        class: Class::Tokens,
        title: title.to_owned(),
        source: "bundled".to_owned(),
        kind: AttackKind::Forge(f),
    }
}

/// The bundled forgeries.
pub fn catalog() -> Vec<Attack> {
    use Forgery as F;
    vec![
        forge(
            "tokens.forge-alg-none",
            "a call token with `alg: none` and no signature",
            F::AlgNone,
        ),
        forge(
            "tokens.forge-hs256-key-bytes",
            "HS256 keyed with the host's Ed25519 public key bytes (algorithm confusion)",
            F::Hs256KeyBytes,
        ),
        forge(
            "tokens.forge-hs256-jwk-x",
            "HS256 keyed with the JWK's `x` string and with the JWK itself",
            F::Hs256JwkX,
        ),
        forge(
            "tokens.forge-unknown-kid",
            "signed with the attacker's own key under a key id the host never published",
            F::UnknownKid,
        ),
        forge(
            "tokens.forge-path-kid",
            "key ids that are paths or URLs (`../keys/<kid>.pem`, `/dev/null`, `file://`)",
            F::PathKid,
        ),
        forge(
            "tokens.forge-embedded-key",
            "the attacker's key embedded in the header (`jwk`, `jku`, `x5u`)",
            F::EmbeddedKey,
        ),
        forge(
            "tokens.forge-expired",
            "a host-signed call token past its `exp`",
            F::Expired,
        ),
        forge(
            "tokens.forge-not-yet-valid",
            "a host-signed call token with `nbf` or `iat` in the future",
            F::NotYetValid,
        ),
        forge(
            "tokens.forge-wrong-issuer",
            "a host-signed call token from another issuer",
            F::WrongIssuer,
        ),
        forge(
            "tokens.replay-audience",
            "replay a token the host minted for one service at another",
            F::ReplayAudience,
        ),
        forge(
            "tokens.forge-missing-claims",
            "host-signed call tokens each missing one claim",
            F::MissingClaims,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgeries_that_need_the_host_key_run_only_locally() {
        for a in catalog() {
            let AttackKind::Forge(f) = a.kind else {
                unreachable!()
            };
            let needs_key = matches!(
                f,
                Forgery::Expired
                    | Forgery::NotYetValid
                    | Forgery::WrongIssuer
                    | Forgery::ReplayAudience
                    | Forgery::MissingClaims
            );
            assert_eq!(f.remote_ok(), !needs_key, "{}", a.id);
        }
    }
}
