//! The bundled API attacks.

use crate::model::{ApiAttack, Attack, AttackKind, Class};

fn api(id: &str, title: &str, a: ApiAttack) -> Attack {
    Attack {
        id: id.to_owned(),
        class: Class::Tokens,
        title: title.to_owned(),
        source: "bundled".to_owned(),
        kind: AttackKind::Api(a),
    }
}

/// The bundled API attacks.
pub fn catalog() -> Vec<Attack> {
    vec![
        api(
            "tokens.malformed",
            "no token, malformed, truncated, wrong scheme, token in the query string",
            ApiAttack::Malformed,
        ),
        api(
            "tokens.revoked",
            "replay a revoked token",
            ApiAttack::Revoked,
        ),
        api(
            "tokens.expired",
            "replay an expired token",
            ApiAttack::Expired,
        ),
        api(
            "tokens.cross-tenant",
            "read, download, cancel, delete and list another tenant's job",
            ApiAttack::CrossTenant,
        ),
        api(
            "tokens.admin-with-user-token",
            "reach the admin API (tokens, audit, metrics) with a user token",
            ApiAttack::AdminWithUserToken,
        ),
        api(
            "tokens.tenant-header",
            "claim another tenant with X-Bulkhead-Tenant and similar headers",
            ApiAttack::TenantHeader,
        ),
        api(
            "tokens.scope-missing",
            "run a module without its scope",
            ApiAttack::ScopeMissing,
        ),
        api(
            "tokens.path-tricks",
            "`..`, encoded slashes and absolute paths in module, job and output names",
            ApiAttack::PathTricks,
        ),
        api(
            "tokens.flood",
            "flood the queue from one tenant while another submits",
            ApiAttack::Flood,
        ),
        api(
            "tokens.huge-body",
            "send a body over the service's limit",
            ApiAttack::HugeBody,
        ),
        api(
            "tokens.call-token-at-api",
            "present a call token the host minted as a bearer to its own public API",
            ApiAttack::CallTokenAtApi,
        ),
        api(
            "tokens.download-flood",
            "open 24 downloads of a 16 MiB output and never read them",
            ApiAttack::DownloadFlood,
        ),
        api(
            "tokens.download-neighbour",
            "hold every download one tenant may while another tenant downloads",
            ApiAttack::DownloadNeighbour,
        ),
    ]
}
