//! The HTTP API (axum): the public `/v1` routes, the admin routes, error
//! mapping, and caller authentication.
//!
//! Two routers, served on two listeners: [`app`] (public) and [`admin_app`]
//! (admin, loopback by default). Both are buildable without a socket, so most
//! tests drive them with `tower::ServiceExt::oneshot`.
//!
//! Every error leaves as one JSON shape, `{"error": {"code", "message"}}`,
//! with its status decided by [`ApiError::status_code`]. Internal details
//! (SQL errors, I/O errors, trap text) are logged and never sent. `api` never
//! names wasmtime types.

mod admin;
mod answers;
mod download;
mod extract;
mod jobs;
mod upload;

use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Router, extract::State};
use serde::Serialize;
use utoipa::OpenApi;

use crate::auth::{self, Identity};
use crate::service::{Service, ServiceError};
use crate::store::{AuditEntry, StoreError, now_ms};

pub use admin::{IssueRequest, Issued, TokenRequestError, admin_app, new_token};
pub use download::{content_disposition, output_url};
pub use extract::{MAX_URI, query_pairs};

/// Shared state of every handler.
#[derive(Clone, Debug)]
pub struct AppState {
    /// The service.
    pub service: Arc<Service>,
}

/// The one error type of the API. Each variant's doc says its status.
#[derive(Debug)]
pub enum ApiError {
    /// 400: malformed request, bad input name, internal header present.
    BadRequest(String),
    /// 401: no token, malformed token, unknown, expired or revoked token.
    Unauthorized,
    /// 403: authenticated, but without a scope the module requires.
    Forbidden(String),
    /// 404: does not exist, or belongs to someone else.
    NotFound(String),
    /// 405: the route exists, the method does not (produced by
    /// [`extract::error_shape`] from the router's own 405).
    MethodNotAllowed(String),
    /// 409: the job is in the wrong state.
    Conflict(String),
    /// 413: body or inputs too large.
    TooLarge(String),
    /// 414: the request target is over [`MAX_URI`].
    UriTooLong(String),
    /// 415: a body type the endpoint does not take.
    UnsupportedMediaType(String),
    /// 422: well-formed but unacceptable (unknown parameters).
    Unprocessable(String),
    /// 429: tenant or service at capacity; `Retry-After` in seconds.
    TooManyRequests { message: String, retry_after: u64 },
    /// 507: the job's report is longer than this service answers (a
    /// tenant's share of `max_buffered_answers`); repeating will not help.
    ReportTooLarge(String),
    /// 503: draining.
    Unavailable,
    /// 503: not ready for another reason, said.
    NotReady(String),
    /// 503 with `Retry-After`: the storage is full (`storage_full`) or
    /// failing (`storage_unavailable`); nothing was stored.
    Storage { full: bool },
    /// 500: logged in full, sent as a generic message.
    Internal(String),
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct ErrorDetail {
    /// Stable machine-readable code.
    code: &'static str,
    /// Human-readable explanation.
    message: String,
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status_code(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::UriTooLong(_) => StatusCode::URI_TOO_LONG,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::ReportTooLarge(_) => StatusCode::INSUFFICIENT_STORAGE,
            ApiError::Unavailable | ApiError::NotReady(_) | ApiError::Storage { .. } => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn code(&self) -> &'static str {
        match self {
            ApiError::BadRequest(_) => "bad_request",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
            ApiError::NotFound(_) => "not_found",
            ApiError::MethodNotAllowed(_) => "method_not_allowed",
            ApiError::UriTooLong(_) => "uri_too_long",
            ApiError::Conflict(_) => "conflict",
            ApiError::TooLarge(_) => "too_large",
            ApiError::UnsupportedMediaType(_) => "unsupported_media_type",
            ApiError::Unprocessable(_) => "unprocessable",
            ApiError::TooManyRequests { .. } => "too_many_requests",
            ApiError::ReportTooLarge(_) => "report_too_large",
            ApiError::Unavailable | ApiError::NotReady(_) => "unavailable",
            ApiError::Storage { full: true } => "storage_full",
            ApiError::Storage { full: false } => "storage_unavailable",
            ApiError::Internal(_) => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status_code();
        let code = self.code();
        let mut headers = HeaderMap::new();
        let message = match self {
            ApiError::Unauthorized => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                "a valid bearer token is required".to_owned()
            }
            ApiError::TooManyRequests {
                message,
                retry_after,
            } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(retry_after));
                message
            }
            ApiError::Unavailable => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(5u64));
                "the service is shutting down".to_owned()
            }
            ApiError::NotReady(why) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(5u64));
                why
            }
            ApiError::Storage { full } => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(STORAGE_RETRY_AFTER));
                if full {
                    "the service's storage is full; retry later".to_owned()
                } else {
                    "the service's storage is failing; retry later".to_owned()
                }
            }
            ApiError::Internal(detail) => {
                tracing::error!(error = %detail, "internal error");
                "internal error".to_owned()
            }
            ApiError::BadRequest(m)
            | ApiError::Forbidden(m)
            | ApiError::NotFound(m)
            | ApiError::MethodNotAllowed(m)
            | ApiError::UriTooLong(m)
            | ApiError::Conflict(m)
            | ApiError::TooLarge(m)
            | ApiError::ReportTooLarge(m)
            | ApiError::UnsupportedMediaType(m)
            | ApiError::Unprocessable(m) => m,
        };
        (
            status,
            headers,
            Json(ErrorBody {
                error: ErrorDetail { code, message },
            }),
        )
            .into_response()
    }
}

/// Seconds a client is asked to wait after a storage failure.
const STORAGE_RETRY_AFTER: u64 = 10;

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let m = e.to_string();
        if e.is_storage() {
            tracing::error!(error = %m, "storage failure");
            return ApiError::Storage { full: e.is_full() };
        }
        match e {
            ServiceError::UnknownModule(_) | ServiceError::NoJob(_) | ServiceError::NoOutput(_) => {
                ApiError::NotFound(m)
            }
            ServiceError::ScopeMissing { .. } => ApiError::Forbidden(m),
            ServiceError::BadInput(_) => ApiError::BadRequest(m),
            ServiceError::BadParams(_) => ApiError::Unprocessable(m),
            ServiceError::TooLarge(_) => ApiError::TooLarge(m),
            ServiceError::Busy { retry_after, .. } => ApiError::TooManyRequests {
                message: m,
                retry_after,
            },
            ServiceError::Draining | ServiceError::NotPlaced => ApiError::Unavailable,
            ServiceError::Conflict(_) => ApiError::Conflict(m),
            ServiceError::Store(_) | ServiceError::Io(_) => ApiError::Internal(m),
        }
    }
}

/// A store failure: 503 with `Retry-After` when the storage under the
/// store is full or failing ([`StoreError::is_storage`]), as for any
/// request, else 500 (details logged only).
impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ServiceError::Store(e).into()
    }
}

/// The bearer token of a request, if it is well formed. Rejects requests
/// carrying internal identity headers: identity comes only from the token.
fn bearer(parts: &Parts) -> Result<Option<&str>, ApiError> {
    if let Some(name) = parts
        .headers
        .keys()
        .find(|k| k.as_str().starts_with("x-bulkhead-"))
    {
        return Err(ApiError::BadRequest(format!(
            "header `{name}` is internal to Bulkhead and not accepted from clients"
        )));
    }
    let Some(value) = parts.headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let token = value
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .filter(|t| auth::well_formed(t));
    Ok(token)
}

/// An authenticated caller of the public API.
#[derive(Clone, Debug)]
pub struct Caller(pub Identity);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Some(token) = bearer(parts)? else {
            if let Some(value) = parts.headers.get(header::AUTHORIZATION) {
                // A credential that is not a reference token at all. A JWT
                // here is most likely a call token taken from an internal
                // service: worth an audit entry of its own.
                let jwt = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .is_some_and(|t| t.trim().starts_with("eyJ") && t.matches('.').count() == 2);
                crate::serve::denials::record(
                    &state.service,
                    parts,
                    AuditEntry {
                        at: now_ms(),
                        action: "auth.denied".into(),
                        detail: if jwt {
                            "a JWT where a reference token is expected".into()
                        } else {
                            "malformed credential".into()
                        },
                        ..AuditEntry::default()
                    },
                )
                .await;
            }
            return Err(ApiError::Unauthorized);
        };
        let hash = auth::hash(token);
        let record = state.service.store().token_by_hash(&hash).await?;
        let now = now_ms() / 1000;
        match record.as_ref().and_then(|r| r.identity_at(now)) {
            Some(mut identity) => {
                identity.client = parts
                    .extensions
                    .get::<crate::serve::Client>()
                    .map(|c| c.addr.ip());
                Ok(Caller(identity))
            }
            None => {
                crate::serve::denials::record(
                    &state.service,
                    parts,
                    AuditEntry {
                        at: now_ms(),
                        action: "auth.denied".into(),
                        tenant: record.as_ref().map(|r| r.tenant.clone()),
                        subject: record.as_ref().map(|r| r.subject.clone()),
                        detail: match &record {
                            Some(r) if r.revoked => format!("revoked token {}", r.id),
                            Some(r) => format!("expired token {}", r.id),
                            None => "unknown token".into(),
                        },
                        ..AuditEntry::default()
                    },
                )
                .await;
                Err(ApiError::Unauthorized)
            }
        }
    }
}

/// The public API router.
pub fn app(state: AppState) -> Router {
    let server = &state.service.config().server;
    let max_body = server.max_body.as_usize();
    let downloads = download::Downloads::new(server.max_downloads_per_tenant);
    let answers = answers::Answers::new(server.max_buffered_answers.as_u64());
    let uploads = upload::Uploads::new(
        server.max_uploads_per_tenant,
        server.max_buffered_uploads.as_u64(),
        server.max_body.as_u64(),
    );
    Router::new()
        .merge(jobs::router(max_body))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        .route("/.well-known/jwks.json", get(jwks))
        .fallback(not_found)
        .layer(axum::Extension(downloads))
        .layer(axum::Extension(answers))
        .layer(axum::Extension(uploads))
        .layer(axum::middleware::from_fn(extract::error_shape))
        .with_state(state)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::NotFound(format!(
        "no route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz",
    responses((status = 200, description = "alive", content_type = "text/plain", body = String)))]
async fn healthz() -> &'static str {
    "ok\n"
}

/// Readiness: not draining, the storage can be written, and no zone is
/// without a worker because its starts fail.
#[utoipa::path(get, path = "/readyz",
    responses((status = 200, description = "ready", content_type = "text/plain", body = String),
        (status = 503, description = "draining, the storage full or failing, or a zone's workers failing to start", body = ErrorBody,
            headers(("retry-after" = u64, description = "seconds")))))]
async fn readyz(State(state): State<AppState>) -> Result<&'static str, ApiError> {
    if state.service.is_draining() {
        Err(ApiError::Unavailable)
    } else if !state.service.storage_ok() {
        Err(ApiError::Storage { full: false })
    } else if let Err(why) = state.service.runner_ready() {
        Err(ApiError::NotReady(why))
    } else {
        Ok("ready\n")
    }
}

/// The public keys that verify call tokens (RFC 7517). Internal services
/// pin this set; during a rotation it holds the new key and the retired one.
/// Nodes sharing a store serve every node's live keys, as of this node's
/// last heartbeat (`service::HEARTBEAT`).
#[utoipa::path(get, path = "/.well-known/jwks.json",
    responses((status = 200, description = "a JWK set", content_type = "application/json", body = Object),
        (status = 404, body = ErrorBody, description = "this host signs no call tokens")))]
async fn jwks(
    State(state): State<AppState>,
) -> Result<impl axum::response::IntoResponse, ApiError> {
    let keys = state
        .service
        .keys()
        .ok_or_else(|| ApiError::NotFound("this host signs no call tokens".into()))?;
    Ok((
        [(axum::http::header::CACHE_CONTROL, "public, max-age=60")],
        Json(keys.jwks()),
    ))
}

/// This document.
#[utoipa::path(get, path = "/openapi.json",
    responses((status = 200, description = "the OpenAPI document", content_type = "application/json", body = Object)))]
async fn openapi() -> impl IntoResponse {
    // Built and serialized once: the document never changes while the
    // process runs, and anyone may ask for it, as often as they like.
    static DOCUMENT: std::sync::OnceLock<bytes::Bytes> = std::sync::OnceLock::new();
    let body = DOCUMENT.get_or_init(|| {
        serde_json::to_vec(&ApiDoc::openapi())
            .map(bytes::Bytes::from)
            .unwrap_or_default()
    });
    (
        [(
            axum::http::header::CONTENT_TYPE,
            axum::http::HeaderValue::from_static("application/json"),
        )],
        body.clone(),
    )
}

/// The OpenAPI document of the public API.
#[derive(Debug, OpenApi)]
#[openapi(
    info(title = "Bulkhead", description = "Run risky processing code as sandboxed WebAssembly jobs."),
    paths(
        jobs::list_modules,
        jobs::submit,
        jobs::list_jobs,
        jobs::get_job,
        jobs::cancel_job,
        jobs::delete_job,
        jobs::get_output,
        healthz,
        readyz,
        jwks,
        openapi
    ),
    components(schemas(ErrorBody, ErrorDetail)),
    modifiers(&BearerAuth, &Contract)
)]
pub struct ApiDoc;

struct BearerAuth;

/// What the `#[utoipa::path]` attributes cannot say: the submission body
/// (raw bytes of any type, or multipart), the `param.<name>` query
/// parameters, and the responses every route shares (the 400 and 401 of
/// every authenticated route, the 414 of every route).
struct Contract;

/// An input name (`sandbox::validate_input_name`).
const INPUT_PATTERN: &str = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,251}$";

/// `param.<name>` as a query parameter name.
const PARAM_PATTERN: &str = "^param\\.[a-z][a-z0-9_-]{0,63}$";

impl utoipa::Modify for Contract {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::path::{ParameterBuilder, ParameterIn, ParameterStyle};
        use utoipa::openapi::request_body::RequestBodyBuilder;
        use utoipa::openapi::{
            Content, KnownFormat, ObjectBuilder, Ref, Required, ResponseBuilder, SchemaFormat, Type,
        };

        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    Content::new(Some(Ref::from_schema_name("ErrorBody"))),
                )
                .build()
        };
        let binary = || {
            ObjectBuilder::new()
                .schema_type(Type::String)
                .format(Some(SchemaFormat::KnownFormat(KnownFormat::Binary)))
        };
        for item in openapi.paths.paths.values_mut() {
            for op in [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.delete,
                &mut item.patch,
            ]
            .into_iter()
            .flatten()
            {
                let responses = &mut op.responses.responses;
                if op.security.is_some() {
                    responses.entry("400".into()).or_insert_with(|| {
                        error("malformed request: a path segment or query that is not UTF-8 once percent-decoded, or an internal `x-bulkhead-*` header").into()
                    });
                    responses.entry("401".into()).or_insert_with(|| {
                        error("no bearer token, or an unknown, expired or revoked one").into()
                    });
                }
                responses.entry("414".into()).or_insert_with(|| {
                    error(&format!("request target over {MAX_URI} bytes")).into()
                });
            }
        }

        if let Some(download) = openapi
            .paths
            .paths
            .get_mut("/v1/jobs/{id}/outputs/{name}")
            .and_then(|item| item.get.as_mut())
            .and_then(|op| op.responses.responses.get_mut("200"))
            && let utoipa::openapi::RefOr::T(ok) = download
        {
            ok.content
                .insert("*/*".into(), Content::new(Some(binary())));
        }

        let Some(submit) = openapi
            .paths
            .paths
            .get_mut("/v1/modules/{module}/jobs")
            .and_then(|item| item.post.as_mut())
        else {
            return;
        };
        let params = ObjectBuilder::new()
            .schema_type(Type::Object)
            .property_names(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(PARAM_PATTERN)),
            ))
            .additional_properties(Some(ObjectBuilder::new().schema_type(Type::String)));
        submit.parameters.get_or_insert_with(Vec::new).push(
            ParameterBuilder::new()
                .name("params")
                .parameter_in(ParameterIn::Query)
                .required(Required::False)
                .style(Some(ParameterStyle::Form))
                .explode(Some(true))
                .description(Some(
                    "job parameters, each as `param.<name>=<value>` (a name the module's policy lists; others are a 422)",
                ))
                .schema(Some(params))
                .build(),
        );
        // Parts are named like inputs (a part with a file name takes that
        // name instead). `param.<name>` parts, whose values must be UTF-8,
        // are described rather than schematized: the query form is the
        // schematized one.
        let form = ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some(
                "one part per input, named by its file name or else its part name; an optional `stdin` part without a file name; `param.<name>` parts with UTF-8 values, as the query's `param.<name>`",
            ))
            .property_names(Some(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(INPUT_PATTERN)),
            ))
            .property("stdin", binary())
            .additional_properties(Some(binary()));
        submit.request_body = Some(
            RequestBodyBuilder::new()
                .description(Some(
                    "one raw input, named by `?input=`, of any media type but JSON and forms (application/octet-stream, image/* and text/* are examples: any other type is taken the same way); or multipart/form-data; an empty body is a job without inputs",
                ))
                .required(Some(Required::False))
                .content("application/octet-stream", Content::new(Some(binary())))
                .content("image/*", Content::new(Some(binary())))
                .content("text/*", Content::new(Some(binary())))
                .content("multipart/form-data", Content::new(Some(form)))
                .build(),
        );
    }
}

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_failure_of_the_storage_is_a_503_not_a_500() {
        let full = ApiError::from(StoreError::Write {
            full: true,
            message: "database or disk is full".into(),
        });
        assert_eq!(
            (full.status_code(), full.code()),
            (StatusCode::SERVICE_UNAVAILABLE, "storage_full")
        );
        let corrupt = ApiError::from(StoreError::Corrupt("state `x`".into()));
        assert_eq!(
            (corrupt.status_code(), corrupt.code()),
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        );
    }
}
