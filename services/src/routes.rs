//! The two services' routes. Handlers see only verified claims (put in the
//! request's extensions by `auth`), never the request's headers or token.

use axum::extract::Extension;
use axum::http::StatusCode;
use axum::http::header::CACHE_CONTROL;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router, middleware};
use bulkhead_verify::CallClaims;
use serde_json::json;

use crate::ServiceState;
use crate::auth::authenticate;

/// The palette service: `GET /v1/palette` answers
/// `{"tenant","subject","frame":"#rrggbb","label"}` for the token's tenant and
/// subject.
///
/// Every request, matched or not, is verified and recorded first; without a
/// valid token the answer is 401, and a valid token on an unknown path gets
/// 404. Routes `.merge()`d into the returned router afterwards are neither
/// verified nor recorded.
pub fn palette_router(state: ServiceState) -> Router {
    protect(Router::new().route("/v1/palette", get(palette)), state)
}

/// The payments service: `GET /v1/balance` and `POST /v1/charge`, answering
/// the token's tenant and subject. No guest should ever reach it; its
/// [`crate::CallLog`] shows whether one did. Verification and recording as
/// for [`palette_router`].
pub fn payments_router(state: ServiceState) -> Router {
    protect(
        Router::new()
            .route("/v1/balance", get(balance))
            .route("/v1/charge", post(charge)),
        state,
    )
}

fn protect(routes: Router<ServiceState>, state: ServiceState) -> Router {
    routes
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

/// The frame colour for `tenant`, `#rrggbb`: a stable function of the tenant
/// name (64-bit FNV-1a, low 24 bits), so each tenant's thumbnails get the
/// same frame on every call and every build.
pub fn frame_colour(tenant: &str) -> String {
    format!("#{:06x}", fnv1a(tenant) & 0xff_ffff)
}

const LABELS: [&str; 8] = [
    "ember", "tide", "moss", "dusk", "sand", "slate", "coral", "fern",
];

fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

async fn palette(Extension(claims): Extension<CallClaims>) -> Response {
    let hash = fnv1a(&claims.tenant);
    // Bits 24 and up pick the label, independent of the colour's bits.
    let label = LABELS[((hash >> 24) % LABELS.len() as u64) as usize];
    no_store(json!({
        "tenant": claims.tenant,
        "subject": claims.sub,
        "frame": frame_colour(&claims.tenant),
        "label": label,
    }))
}

async fn balance(Extension(claims): Extension<CallClaims>) -> Response {
    no_store(json!({
        "tenant": claims.tenant,
        "subject": claims.sub,
        "balance_cents": fnv1a(&claims.tenant) % 100_000,
    }))
}

async fn charge(Extension(claims): Extension<CallClaims>) -> Response {
    no_store(json!({
        "tenant": claims.tenant,
        "subject": claims.sub,
        "job": claims.job,
        "charged": true,
    }))
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": {"code": "not_found", "message": "no such route"}})),
    )
        .into_response()
}

fn no_store(body: serde_json::Value) -> Response {
    ([(CACHE_CONTROL, "no-store")], Json(body)).into_response()
}
