//! Extractors whose rejection is [`ApiError`], and the layer that gives
//! every other non-success response the same JSON shape.
//!
//! axum's own extractors reject with `text/plain` bodies, and its method
//! router answers 405 with an empty one; [`error_shape`] wraps both routers
//! so nothing leaves without `{"error": {"code", "message"}}`. Query strings
//! are decoded here, strictly: a value that is not UTF-8 once
//! percent-decoded is a 400, never replaced by U+FFFD.
//!
//! What this layer cannot reach: hyper answers a request whose head
//! overflows its read buffer (431) or whose URI it cannot parse (414 or 400)
//! before any router runs, with an empty body, and closes the connection.
//! Below that ceiling, a URI longer than [`MAX_URI`] is refused here with a
//! JSON 414.

use std::borrow::Cow;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;

use super::{ApiError, ErrorBody, ErrorDetail};

/// The longest request target (path and query) the routers accept; longer
/// ones get a JSON 414. Well below hyper's own header buffer, so the empty
/// 414/431 hyper sends itself is reached only by heads far beyond any
/// legitimate request.
pub const MAX_URI: usize = 8 << 10;

/// How much of a non-JSON error body is read to become the JSON message.
const MAX_REJECTION_TEXT: usize = 1 << 10;

/// A path extractor whose rejection (including a segment that is not UTF-8
/// once percent-decoded) is a JSON 400.
#[derive(Debug)]
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(e) => Err(ApiError::BadRequest(lowercase_first(&e.body_text()))),
        }
    }
}

/// A JSON body extractor whose rejections keep their status (400 syntax,
/// 413 too large, 415 not JSON, 422 wrong shape) and take the JSON error
/// shape.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(e) => Err(json_rejection(&e)),
        }
    }
}

fn json_rejection(e: &JsonRejection) -> ApiError {
    let message = lowercase_first(&e.body_text());
    match e.status() {
        StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::UnsupportedMediaType(message),
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::TooLarge(message),
        StatusCode::UNPROCESSABLE_ENTITY => ApiError::Unprocessable(message),
        _ => ApiError::BadRequest(message),
    }
}

/// The query string as decoded `(name, value)` pairs, in order. `+` is a
/// space, as in HTML forms. A name or value that is not UTF-8 once
/// percent-decoded is a 400.
#[derive(Debug)]
pub struct StrictQuery(pub Vec<(String, String)>);

impl<S: Send + Sync> FromRequestParts<S> for StrictQuery {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, ApiError> {
        query_pairs(parts.uri.query()).map(StrictQuery)
    }
}

/// Decodes a query string strictly (see [`StrictQuery`]).
///
/// # Errors
/// [`ApiError::BadRequest`] naming the first component that is not UTF-8.
pub fn query_pairs(query: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let Some(query) = query else {
        return Ok(Vec::new());
    };
    query
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(name)?, decode(value)?))
        })
        .collect()
}

fn decode(raw: &str) -> Result<String, ApiError> {
    let spaced: Cow<'_, str> = if raw.contains('+') {
        Cow::Owned(raw.replace('+', " "))
    } else {
        Cow::Borrowed(raw)
    };
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(Cow::into_owned)
        .map_err(|_| {
            let shown: String = raw.chars().take(64).collect();
            ApiError::BadRequest(format!(
                "query component `{shown}` is not UTF-8 once percent-decoded"
            ))
        })
}

/// The value of one integer query parameter, within `min..=max`.
///
/// # Errors
/// [`ApiError::BadRequest`] naming the parameter and the bad value.
pub fn bounded_u32(name: &str, value: &str, min: u32, max: u32) -> Result<u32, ApiError> {
    match value.parse::<u32>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ApiError::BadRequest(format!(
            "`{name}` must be an integer from {min} to {max}, not `{}`",
            value.chars().take(64).collect::<String>()
        ))),
    }
}

/// Middleware on both routers: refuses over-long URIs, and rewrites any
/// non-success response that is not already JSON (axum's rejections, the
/// method router's 405) into the one error shape, keeping its status and
/// headers (`Allow`, `Retry-After`, `WWW-Authenticate`).
pub async fn error_shape(req: Request, next: Next) -> Response {
    let target_len = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target_len > MAX_URI {
        return ApiError::UriTooLong(format!(
            "request target of {target_len} bytes is over the limit of {MAX_URI} bytes"
        ))
        .into_response();
    }
    let method = req.method().clone();
    let path: String = req.uri().path().chars().take(256).collect();
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match http_body_util::Limited::new(body, MAX_REJECTION_TEXT)
        .collect()
        .await
    {
        Ok(collected) => String::from_utf8(collected.to_bytes().to_vec()).unwrap_or_default(),
        Err(_) => String::new(),
    };
    let message = if status == StatusCode::METHOD_NOT_ALLOWED {
        // The method router adds `Allow` outside this layer; it is kept.
        format!("method `{method}` is not allowed on `{path}` (see `Allow`)")
    } else if status.is_server_error() {
        tracing::error!(%status, detail = %text, "internal error");
        "internal error".to_owned()
    } else if text.trim().is_empty() {
        status
            .canonical_reason()
            .unwrap_or("request refused")
            .to_ascii_lowercase()
    } else {
        lowercase_first(text.trim())
    };
    let body = ErrorBody {
        error: ErrorDetail {
            code: code_for_status(status),
            message,
        },
    };
    let bytes = serde_json::to_vec(&body).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, Body::from(bytes))
}

/// The error code of a status that did not come from an [`ApiError`]
/// (the same codes [`ApiError`] uses for the statuses it has).
fn code_for_status(status: StatusCode) -> &'static str {
    match status {
        StatusCode::BAD_REQUEST => "bad_request",
        StatusCode::UNAUTHORIZED => "unauthorized",
        StatusCode::FORBIDDEN => "forbidden",
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::CONFLICT => "conflict",
        StatusCode::PAYLOAD_TOO_LARGE => "too_large",
        StatusCode::URI_TOO_LONG => "uri_too_long",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::UNPROCESSABLE_ENTITY => "unprocessable",
        StatusCode::TOO_MANY_REQUESTS => "too_many_requests",
        StatusCode::SERVICE_UNAVAILABLE => "unavailable",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    }
}

/// axum's messages start with a capital ("Failed to …"); ours do not.
fn lowercase_first(s: &str) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) => c.to_lowercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_is_decoded_strictly() {
        let pairs = query_pairs(Some("a=1&param.x=h%C3%A9+llo&&flag")).unwrap();
        assert_eq!(
            pairs,
            vec![
                ("a".into(), "1".into()),
                ("param.x".into(), "hé llo".into()),
                ("flag".into(), String::new()),
            ]
        );
        let err = query_pairs(Some("param.x=%FF")).unwrap_err();
        assert!(
            matches!(err, ApiError::BadRequest(ref m) if m.contains("%FF")),
            "{err:?}"
        );
        assert!(
            query_pairs(Some("%C3=1")).is_err(),
            "a truncated sequence in a name"
        );
    }

    #[test]
    fn bounded_integers_name_the_bad_value() {
        assert_eq!(bounded_u32("limit", "500", 1, 500).unwrap(), 500);
        for bad in ["0", "501", "2147483648", "-1", "1.5", "", "ten"] {
            let err = bounded_u32("limit", bad, 1, 500).unwrap_err();
            assert!(
                matches!(err, ApiError::BadRequest(ref m) if m.contains(&format!("`{bad}`"))),
                "{bad}: {err:?}"
            );
        }
    }
}
