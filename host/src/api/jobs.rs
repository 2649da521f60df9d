//! `/v1` routes: modules, job submission, status, cancel, delete, outputs.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};

use super::{ApiError, AppState, Caller};
use crate::policy::HumanDuration;
use crate::sandbox::{FailureKind, JobInput, JobReport};
use crate::service::Submission;
use crate::store::{JobRecord, JobState};

pub(super) fn router(max_body: usize) -> Router<AppState> {
    Router::new()
        .route("/v1/modules", get(list_modules))
        .route(
            "/v1/modules/{module}/jobs",
            post(submit).layer(DefaultBodyLimit::max(max_body)),
        )
        .route("/v1/jobs", get(list_jobs))
        .route("/v1/jobs/{id}", get(get_job).delete(delete_job))
        .route("/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/v1/jobs/{id}/outputs/{*name}", get(get_output))
}

/// A module as its callers see it.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct ModuleView {
    name: String,
    zone: String,
    sha256: String,
    scopes: Vec<String>,
    params: Vec<String>,
    limits: BTreeMap<String, String>,
}

/// Modules the caller may submit jobs to, with their published limits.
#[utoipa::path(get, path = "/v1/modules", security(("bearer" = [])),
    responses((status = 200, body = [ModuleView]), (status = 401, body = super::ErrorBody)))]
pub(super) async fn list_modules(
    State(state): State<AppState>,
    Caller(who): Caller,
) -> Json<Vec<ModuleView>> {
    let views = state
        .service
        .modules_for(&who)
        .map(|p| {
            let l = &p.limits;
            let limits = [
                ("memory", l.memory.to_string()),
                ("table_elements", l.table_elements.to_string()),
                ("cpu_time", l.cpu_time.to_string()),
                ("wall_time", l.wall_time.to_string()),
                ("output", l.output.to_string()),
                ("output_files", l.output_files.to_string()),
                ("stdout", l.stdout.to_string()),
                ("stderr", l.stderr.to_string()),
                ("input", l.input.to_string()),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
            ModuleView {
                name: p.module.name.to_string(),
                zone: p.module.zone.to_string(),
                sha256: p.module.sha256.to_string(),
                scopes: p.access.scopes.iter().map(ToString::to_string).collect(),
                params: p.run.params.iter().map(ToString::to_string).collect(),
                limits,
            }
        })
        .collect();
    Json(views)
}

/// An output file with its download path.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct OutputLink {
    name: String,
    size: u64,
    sha256: String,
    url: String,
}

/// A job as its owner sees it.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct JobView {
    id: String,
    module: String,
    state: JobState,
    /// Unix milliseconds.
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    attempts: u32,
    /// The sandbox report once finished; trap details are redacted.
    report: Option<JobReport>,
    outputs: Vec<OutputLink>,
}

impl JobView {
    fn from(job: JobRecord) -> Self {
        let outputs = job
            .report
            .as_ref()
            .map(|r| {
                r.outputs
                    .iter()
                    .map(|o| OutputLink {
                        name: o.name.clone(),
                        size: o.size,
                        sha256: o.sha256.clone(),
                        url: format!("/v1/jobs/{}/outputs/{}", job.id, o.name),
                    })
                    .collect()
            })
            .unwrap_or_default();
        Self {
            id: job.id,
            module: job.module,
            state: job.state,
            created_at: job.created_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            attempts: job.attempts,
            report: job.report.map(redact),
            outputs,
        }
    }
}

/// Trap and instantiation messages describe the host's runtime; they are
/// logged and kept in the store, but clients get the class only.
fn redact(mut report: JobReport) -> JobReport {
    if let Some(f) = report.failure.as_mut() {
        match f.kind {
            FailureKind::Trap => f.message = "the guest trapped".into(),
            FailureKind::Instantiate => f.message = "the module could not be started".into(),
            FailureKind::Limit | FailureKind::Exit | FailureKind::Output => {}
        }
    }
    report
}

/// A submission's query: `wait`, `input` (name of a raw body), and
/// `param.<name>=<value>` for each parameter.
struct SubmitQuery {
    wait: Option<Duration>,
    input: String,
    params: BTreeMap<String, String>,
}

fn parse_query(pairs: Vec<(String, String)>, max_wait: Duration) -> Result<SubmitQuery, ApiError> {
    let mut wait = None;
    let mut input = "input".to_owned();
    let mut params = BTreeMap::new();
    for (k, v) in pairs {
        if k == "wait" {
            let d: HumanDuration = v.parse().map_err(ApiError::BadRequest)?;
            wait = Some(d.get().min(max_wait));
        } else if k == "input" {
            input = v;
        } else if let Some(name) = k.strip_prefix("param.") {
            if params.insert(name.to_owned(), v).is_some() {
                return Err(ApiError::BadRequest(format!(
                    "parameter `{name}` given twice"
                )));
            }
        } else {
            return Err(ApiError::BadRequest(format!(
                "unknown query parameter `{k}`: use wait, input, or param.<name>"
            )));
        }
    }
    Ok(SubmitQuery {
        wait,
        input,
        params,
    })
}

/// Submit a job. The body is either one raw input (any content type but
/// JSON and forms; named by `?input=`, default `input`) or
/// `multipart/form-data` with one part per input file (named by its file
/// name), optional `stdin` and `param.<name>` parts. Parameters may also be
/// given as `?param.<name>=<value>`. With `?wait=<duration>` (at most the
/// server's `max_wait`) the call returns 200 with the finished job, or 202 if
/// it is still running when the wait ends.
#[utoipa::path(post, path = "/v1/modules/{module}/jobs", security(("bearer" = [])),
    params(("module" = String, Path, description = "module name"),
           ("wait" = Option<String>, Query, description = "wait for the result, e.g. `10s`"),
           ("input" = Option<String>, Query, description = "input name of a raw body"),
           ("Idempotency-Key" = Option<String>, Header, description = "1 to 255 visible ASCII characters; a retry with the same key returns the first job (409 if the request differs)")),
    responses(
        (status = 200, body = JobView, description = "finished within the wait"),
        (status = 202, body = JobView, description = "accepted"),
        (status = 400, body = super::ErrorBody), (status = 401, body = super::ErrorBody),
        (status = 403, body = super::ErrorBody), (status = 404, body = super::ErrorBody),
        (status = 409, body = super::ErrorBody),
        (status = 413, body = super::ErrorBody), (status = 415, body = super::ErrorBody),
        (status = 422, body = super::ErrorBody), (status = 429, body = super::ErrorBody),
        (status = 503, body = super::ErrorBody)))]
pub(super) async fn submit(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(module): Path<String>,
    Query(query): Query<Vec<(String, String)>>,
    req: Request,
) -> Result<Response, ApiError> {
    let max_body = state.service.config().server.max_body.as_usize();
    if let Some(declared) = crate::relay::declared_length(req.headers())
        && declared > max_body as u64
    {
        discard_body(req).await;
        return Err(ApiError::TooLarge(format!(
            "request body of {declared} bytes is over the limit of {max_body} bytes"
        )));
    }
    let max_wait = state.service.config().server.max_wait.get();
    let SubmitQuery {
        wait,
        input: raw_name,
        mut params,
    } = parse_query(query, max_wait)?;
    let content_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut sub = Submission {
        idempotency_key: req
            .headers()
            .get("idempotency-key")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned()),
        ..Submission::default()
    };
    if content_type.starts_with("multipart/form-data") {
        let mut multipart = Multipart::from_request(req, &state)
            .await
            .map_err(|e| ApiError::BadRequest(e.body_text()))?;
        while let Some(field) = multipart.next_field().await.map_err(multipart_error)? {
            let field_name = field.name().unwrap_or("").to_owned();
            let file_name = field.file_name().map(str::to_owned);
            let data = field.bytes().await.map_err(multipart_error)?;
            if let Some(p) = field_name.strip_prefix("param.") {
                let value = String::from_utf8(data.to_vec())
                    .map_err(|_| ApiError::BadRequest(format!("parameter `{p}` is not UTF-8")))?;
                if params.insert(p.to_owned(), value).is_some() {
                    return Err(ApiError::BadRequest(format!("parameter `{p}` given twice")));
                }
            } else if field_name == "stdin" && file_name.is_none() {
                sub.stdin = Some(data);
            } else {
                let name = file_name.unwrap_or(field_name);
                sub.inputs.push(JobInput { name, data });
            }
        }
    } else {
        let body = bytes::Bytes::from_request(req, &state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge("request body too large".into())
            } else {
                ApiError::BadRequest(e.body_text())
            }
        })?;
        if !body.is_empty() {
            if content_type.is_empty()
                || content_type.starts_with("application/json")
                || content_type.starts_with("application/x-www-form-urlencoded")
            {
                return Err(ApiError::UnsupportedMediaType(format!(
                    "content type `{content_type}` is not accepted: send the input as its own type (for example image/png or application/octet-stream) or as multipart/form-data"
                )));
            }
            sub.inputs.push(JobInput {
                name: raw_name,
                data: body,
            });
        }
    }
    sub.params = params;

    let deadline = wait.map(|w| tokio::time::Instant::now() + w);
    let (record, receiver) = state.service.submit(&who, &module, sub, wait).await?;
    let location = format!("/v1/jobs/{}", record.id);
    let mut finished = None;
    if let (Some(deadline), Some(rx)) = (deadline, receiver)
        && let Ok(ended) = tokio::time::timeout_at(deadline, rx).await
    {
        // The worker hands over the finished record; a cancellation (or a
        // dropped sender) means reading the job's current state.
        finished = match ended.ok().flatten() {
            Some(job) => Some(job),
            None => Some(state.service.job(&who, &record.id).await?),
        };
    }
    let (status, job) = match finished {
        Some(job) if job.state.is_final() => (StatusCode::OK, job),
        Some(job) => (StatusCode::ACCEPTED, job),
        // A retry (same `Idempotency-Key`) of a job that has finished.
        None if record.state.is_final() => (StatusCode::OK, record),
        None => (StatusCode::ACCEPTED, record),
    };
    let mut response = (status, Json(JobView::from(job))).into_response();
    if let Ok(v) = HeaderValue::from_str(&location) {
        response.headers_mut().insert(header::LOCATION, v);
    }
    Ok(response)
}

/// How much of a refused body is read and thrown away, at most, and for how
/// long, before the 413 is sent (see [`discard_body`]).
const DISCARD_MAX: u64 = 64 << 20;
const DISCARD_TIME: Duration = Duration::from_secs(10);

/// Reads and throws away a refused request's body, so that its client,
/// still sending, reads the 413 instead of a connection reset: closing a
/// socket with unread data makes the kernel reset it, and the reset can
/// overtake the answer. Bounded by [`DISCARD_MAX`] bytes and
/// [`DISCARD_TIME`]; past either, the client may still see a reset. A
/// client that sent `Expect: 100-continue` has sent nothing yet and will
/// not, so nothing is read.
async fn discard_body(req: Request) {
    use http_body_util::BodyExt;
    let expects_continue = req
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        return;
    }
    let mut body = req.into_body();
    let _ = tokio::time::timeout(DISCARD_TIME, async {
        let mut read = 0u64;
        while read <= DISCARD_MAX {
            match body.frame().await {
                Some(Ok(frame)) => {
                    read += frame.data_ref().map_or(0, |d| d.len() as u64);
                }
                _ => return,
            }
        }
    })
    .await;
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge("request body too large".into())
    } else {
        ApiError::BadRequest(e.body_text())
    }
}

#[derive(Deserialize)]
pub(super) struct ListQuery {
    limit: Option<u32>,
}

/// The caller's most recent jobs (at most `limit`, default 50, max 500).
#[utoipa::path(get, path = "/v1/jobs", security(("bearer" = [])),
    params(("limit" = Option<u32>, Query, description = "how many")),
    responses((status = 200, body = [JobView]), (status = 401, body = super::ErrorBody)))]
pub(super) async fn list_jobs(
    State(state): State<AppState>,
    Caller(who): Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<Vec<JobView>>, ApiError> {
    let jobs = state
        .service
        .jobs(&who, q.limit.unwrap_or(50).min(500))
        .await?;
    Ok(Json(jobs.into_iter().map(JobView::from).collect()))
}

/// Status and report of one of the caller's jobs.
#[utoipa::path(get, path = "/v1/jobs/{id}", security(("bearer" = [])),
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = JobView), (status = 401, body = super::ErrorBody), (status = 404, body = super::ErrorBody)))]
pub(super) async fn get_job(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(JobView::from(state.service.job(&who, &id).await?)))
}

/// Cancel one of the caller's queued or running jobs.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", security(("bearer" = [])),
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = JobView), (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody)))]
pub(super) async fn cancel_job(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    state.service.cancel(&who, &id).await?;
    Ok(Json(JobView::from(state.service.job(&who, &id).await?)))
}

/// Delete one of the caller's finished jobs and its outputs.
#[utoipa::path(delete, path = "/v1/jobs/{id}", security(("bearer" = [])),
    params(("id" = String, Path, description = "job id")),
    responses((status = 204), (status = 404, body = super::ErrorBody), (status = 409, body = super::ErrorBody)))]
pub(super) async fn delete_job(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.service.delete(&who, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Download an output file of one of the caller's jobs. Served as an
/// attachment with `nosniff` and a sandboxing CSP: outputs are produced by
/// untrusted code and must never run in a browser on this origin.
#[utoipa::path(get, path = "/v1/jobs/{id}/outputs/{name}", security(("bearer" = [])),
    params(("id" = String, Path, description = "job id"), ("name" = String, Path, description = "output name")),
    responses((status = 200, description = "the file"), (status = 404, body = super::ErrorBody)))]
pub(super) async fn get_output(
    State(state): State<AppState>,
    Caller(who): Caller,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let (file, len) = state.service.output(&who, &id, &name).await?;
    let data = tokio::task::spawn_blocking(move || {
        let mut data = Vec::with_capacity(len as usize);
        let mut file = file;
        file.read_to_end(&mut data).map(|_| data)
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))?
    .map_err(|e| ApiError::Internal(e.to_string()))?;
    let file_name = name
        .rsplit('/')
        .next()
        .unwrap_or(&name)
        .replace(['"', '\\'], "_");
    let headers = [
        (header::CONTENT_TYPE, content_type(&name).to_owned()),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff".to_owned()),
        (
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{file_name}\""),
        ),
        (header::CONTENT_SECURITY_POLICY, "sandbox".to_owned()),
    ];
    Ok((headers, Body::from(data)).into_response())
}

fn content_type(name: &str) -> &'static str {
    let ext = name.rsplit('.').next().unwrap_or("").to_ascii_lowercase();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        "html" | "htm" => "text/html; charset=utf-8",
        "txt" | "md" => "text/plain; charset=utf-8",
        "json" => "application/json",
        "pdf" => "application/pdf",
        "svg" => "image/svg+xml",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_splits_wait_input_and_params() {
        let q = vec![
            ("wait".to_owned(), "5 s".to_owned()),
            ("param.width".to_owned(), "64".to_owned()),
            ("input".to_owned(), "a.png".to_owned()),
        ];
        let q = parse_query(q, Duration::from_secs(2)).unwrap();
        assert_eq!(q.wait, Some(Duration::from_secs(2)), "capped at max_wait");
        assert_eq!(q.input, "a.png");
        assert_eq!(q.params["width"], "64");
        assert!(parse_query(vec![("x".into(), "1".into())], Duration::from_secs(1)).is_err());
    }
}
