//! The one middleware every request passes: bearer token → verdict → call
//! log → 401 or the route. The only place a token is read; it never reaches a
//! handler or a response.

use axum::Json;
use axum::extract::{Request, State};
use axum::http::header::{AUTHORIZATION, CACHE_CONTROL, WWW_AUTHENTICATE};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bulkhead_verify::VerifyError;
use serde_json::json;

use crate::ServiceState;
use crate::log::{Received, Verdict, bounded};

/// Verifies the request's bearer token, records the request, and lets it
/// through to routing only with a valid token, the claims in its extensions.
pub(crate) async fn authenticate(
    State(state): State<ServiceState>,
    mut request: Request,
    next: Next,
) -> Response {
    let token = bearer(request.headers());
    let verdict = match &token {
        None => Verdict::NoCredentials,
        Some(token) => match verify(&state, token).await {
            Ok(claims) => Verdict::Verified(claims),
            Err(error) => Verdict::Rejected(error),
        },
    };

    let claims = verdict.claims();
    tracing::info!(
        audience = %state.verifier().config().audience,
        method = %request.method(),
        path = ?request.uri().path(),
        verdict = verdict.code(),
        sub = ?claims.map(|c| &c.sub),
        tenant = ?claims.map(|c| &c.tenant),
        job = ?claims.map(|c| &c.job),
        module = ?claims.map(|c| &c.module),
        "call",
    );
    state.log().record(Received {
        method: request.method().to_string(),
        path: request.uri().path().to_owned(),
        query: request.uri().query().map(bounded),
        headers: request
            .headers()
            .iter()
            .map(|(name, value)| {
                (
                    name.to_string(),
                    bounded(&String::from_utf8_lossy(value.as_bytes())),
                )
            })
            .collect(),
        token: token.as_deref().map(bounded),
        verdict: verdict.clone(),
    });

    match verdict {
        Verdict::Verified(claims) => {
            request.extensions_mut().insert(claims);
            next.run(request).await
        }
        Verdict::Rejected(error) => unauthorized(error.code(), &error.to_string(), true),
        Verdict::NoCredentials => unauthorized("no_credentials", "bearer token required", false),
    }
}

/// Verifies `token`; if its key is unknown and the state has a refresher,
/// lets the refresher fetch the host's keys (rate-limited) and tries once
/// more.
async fn verify(
    state: &ServiceState,
    token: &str,
) -> Result<bulkhead_verify::CallClaims, VerifyError> {
    match state.verifier().verify(token) {
        Err(VerifyError::UnknownKey) => match &state.refresher {
            Some(refresher) => {
                refresher.refresh_if_due().await;
                state.verifier().verify(token)
            }
            None => Err(VerifyError::UnknownKey),
        },
        verdict => verdict,
    }
}

/// The token of the request's one `Authorization: Bearer` header. Several
/// `Authorization` headers, another scheme, or a value that is not ASCII
/// count as no credentials.
fn bearer(headers: &HeaderMap) -> Option<String> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let value = values.next()?;
    if values.next().is_some() {
        return None;
    }
    let (scheme, token) = value.to_str().ok()?.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

/// 401 with the repository's error shape, `{"error":{"code","message"}}`,
/// and an RFC 6750 challenge. Neither names anything from the token.
fn unauthorized(code: &str, message: &str, invalid_token: bool) -> Response {
    let challenge = if invalid_token {
        HeaderValue::from_static("Bearer error=\"invalid_token\"")
    } else {
        HeaderValue::from_static("Bearer")
    };
    let mut response = (
        StatusCode::UNAUTHORIZED,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response();
    response.headers_mut().insert(WWW_AUTHENTICATE, challenge);
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
