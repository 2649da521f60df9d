//! The admin API, served on its own listener (loopback by default): token
//! management, the audit log, signing keys, the nodes sharing the store,
//! Prometheus metrics.
//!
//! It accepts only the admin token from `<data>/admin.token`. A user token —
//! any token in the tokens table — is never the admin token, so it gets 401
//! here whatever its scopes.

use axum::extract::{FromRequestParts, State};
use axum::http::StatusCode;
use axum::http::request::Parts;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use super::extract::{ApiJson, ApiPath, StrictQuery, bounded_u32};
use super::{ApiError, AppState, bearer, not_found};
use crate::auth::{self, TokenRecord};
use crate::policy::HumanDuration;
use crate::store::{AuditEntry, now_ms};

/// The admin router.
pub fn admin_app(state: AppState) -> Router {
    Router::new()
        .route("/admin/v1/tokens", post(issue).get(list))
        .route("/admin/v1/tokens/{id}/revoke", post(revoke))
        .route("/admin/v1/audit", get(audit))
        .route("/admin/v1/keys", get(keys))
        .route("/admin/v1/keys/rotate", post(rotate_key))
        .route("/admin/v1/isolation", get(isolation))
        .route("/admin/v1/nodes", get(nodes))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(super::extract::error_shape))
        .with_state(state)
}

/// The caller holds the admin token.
struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match bearer(parts)? {
            Some(token) if state.service.is_admin(&auth::hash(token)) => Ok(Admin),
            _ => Err(ApiError::Unauthorized),
        }
    }
}

/// A token to issue.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssueRequest {
    /// Tenant.
    pub tenant: String,
    /// Subject.
    pub subject: String,
    /// Scopes.
    pub scopes: Vec<String>,
    /// Lifetime such as `30 d`; none = no expiry.
    pub ttl: Option<String>,
}

/// An issued token: the secret is shown only here, once.
#[derive(Debug, Serialize, Deserialize)]
pub struct Issued {
    /// The secret to give the client.
    pub token: String,
    /// Its record.
    pub record: TokenRecord,
}

/// Why a token cannot be issued as requested (422), naming the bad value.
#[derive(Debug, thiserror::Error)]
pub enum TokenRequestError {
    /// A tenant or subject that breaks the rule.
    #[error(transparent)]
    Principal(#[from] auth::PrincipalError),
    /// No scope given.
    #[error("at least one scope is required")]
    NoScopes,
    /// A scope that is not a valid scope name.
    #[error(transparent)]
    Scope(#[from] crate::policy::NameError),
    /// A ttl that is not a duration.
    #[error(transparent)]
    Ttl(#[from] crate::policy::UnitError),
}

/// Validates a request and builds the token and its record. Shared with the
/// CLI, which writes to the store directly.
///
/// # Errors
/// A [`TokenRequestError`] naming the bad tenant, subject, scope or ttl.
pub fn new_token(req: &IssueRequest) -> Result<(String, TokenRecord), TokenRequestError> {
    auth::validate_principal("tenant", &req.tenant)?;
    auth::validate_principal("subject", &req.subject)?;
    if req.scopes.is_empty() {
        return Err(TokenRequestError::NoScopes);
    }
    for s in &req.scopes {
        crate::policy::Scope::new(s.clone())?;
    }
    let now = now_ms() / 1000;
    let expires_at = match &req.ttl {
        Some(ttl) => {
            let d: HumanDuration = ttl.parse()?;
            Some(now + d.get().as_secs() as i64)
        }
        None => None,
    };
    let minted = auth::mint();
    let record = TokenRecord {
        id: minted.id,
        hash: minted.hash,
        tenant: req.tenant.clone(),
        subject: req.subject.clone(),
        scopes: req.scopes.clone(),
        created_at: now,
        expires_at,
        revoked: false,
    };
    Ok((minted.secret, record))
}

async fn issue(
    State(state): State<AppState>,
    _: Admin,
    ApiJson(req): ApiJson<IssueRequest>,
) -> Result<(StatusCode, Json<Issued>), ApiError> {
    let (token, record) = new_token(&req).map_err(|e| ApiError::Unprocessable(e.to_string()))?;
    let store = state.service.store();
    store.insert_token(&record).await?;
    state
        .service
        .audit(AuditEntry {
            at: now_ms(),
            action: "token.issued".into(),
            tenant: Some(record.tenant.clone()),
            subject: Some(record.subject.clone()),
            detail: format!("{} scopes {:?}", record.id, record.scopes),
            ..AuditEntry::default()
        })
        .await;
    Ok((StatusCode::CREATED, Json(Issued { token, record })))
}

async fn list(State(state): State<AppState>, _: Admin) -> Result<Json<Vec<TokenRecord>>, ApiError> {
    let tokens = state.service.store().list_tokens().await?;
    Ok(Json(tokens))
}

async fn revoke(
    State(state): State<AppState>,
    _: Admin,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    let found = state.service.store().revoke_token(&id).await?;
    if !found {
        return Err(ApiError::NotFound(format!("no token `{id}`")));
    }
    state
        .service
        .audit(AuditEntry {
            at: now_ms(),
            action: "token.revoked".into(),
            detail: id,
            ..AuditEntry::default()
        })
        .await;
    Ok(StatusCode::NO_CONTENT)
}

/// `?limit=` of the audit log: 1 to 10,000, default 100.
async fn audit(
    State(state): State<AppState>,
    _: Admin,
    StrictQuery(query): StrictQuery,
) -> Result<Json<Vec<AuditEntry>>, ApiError> {
    let mut limit = 100;
    for (name, value) in query {
        if name == "limit" {
            limit = bounded_u32("limit", &value, 1, 10_000)?;
        }
    }
    let entries = state.service.store().audit(limit).await?;
    Ok(Json(entries))
}

async fn keys(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<Vec<crate::relay::keys::KeyInfo>>, ApiError> {
    let keys = state
        .service
        .keys()
        .ok_or_else(|| ApiError::NotFound("this host signs no call tokens".into()))?;
    Ok(Json(keys.list()))
}

async fn rotate_key(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<crate::relay::keys::KeyInfo>, ApiError> {
    let keys = state
        .service
        .keys()
        .ok_or_else(|| ApiError::NotFound("this host signs no call tokens".into()))?;
    let info = keys
        .rotate()
        .map_err(|e| ApiError::Conflict(e.to_string()))?;
    // The other nodes serve the new key from their next heartbeat; one
    // that fails here is published at this node's next heartbeat.
    if let Err(e) = state.service.publish_keys().await {
        tracing::warn!(error = %e, "cannot publish the new signing key yet");
    }
    state
        .service
        .audit(AuditEntry {
            at: now_ms(),
            action: "key.rotated".into(),
            detail: format!("new call-token signing key {}", info.kid),
            ..AuditEntry::default()
        })
        .await;
    Ok(Json(info))
}

/// The nodes sharing the store, live (a heartbeat within
/// `service::STALE_AFTER`) or stale, newest start first.
async fn nodes(
    State(state): State<AppState>,
    _: Admin,
) -> Result<Json<Vec<crate::service::NodeInfo>>, ApiError> {
    Ok(Json(state.service.nodes().await?))
}

/// Where guests run, and per zone the hardening its workers applied and
/// their process ids.
async fn isolation(State(state): State<AppState>, _: Admin) -> Json<crate::runner::RunnerState> {
    Json(state.service.isolation())
}

async fn metrics(State(state): State<AppState>, _: Admin) -> String {
    state.service.render_metrics()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(tenant: &str, scopes: &[&str], ttl: Option<&str>) -> IssueRequest {
        IssueRequest {
            tenant: tenant.into(),
            subject: "ci".into(),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            ttl: ttl.map(Into::into),
        }
    }

    #[test]
    fn a_refused_token_request_says_which_value_is_bad_and_why() {
        let cases = [
            (
                request("acme corp", &["thumbnail:run"], None),
                "invalid tenant `acme corp`: use 1 to 64 characters of a-z A-Z 0-9 . _ - @",
            ),
            (request("acme", &[], None), "at least one scope is required"),
            (
                request("acme", &["Thumbnail:run"], None),
                "invalid scope `Thumbnail:run`: must start with a lowercase letter",
            ),
            (
                request("acme", &["thumbnail:run"], Some("soon")),
                "invalid duration `soon`: expected a number and a unit such as ms, s, min",
            ),
        ];
        let mut kinds = Vec::new();
        for (req, message) in cases {
            let err = new_token(&req).unwrap_err();
            assert_eq!(err.to_string(), message);
            kinds.push(match err {
                TokenRequestError::Principal(e) => e.kind,
                TokenRequestError::NoScopes => "no scopes",
                TokenRequestError::Scope(e) => e.what,
                TokenRequestError::Ttl(_) => "ttl",
            });
        }
        assert_eq!(kinds, ["tenant", "no scopes", "scope", "ttl"]);
        assert!(new_token(&request("acme", &["thumbnail:run"], Some("30 d"))).is_ok());
    }
}
