//! `/v1` routes: modules, job submission, status, cancel, delete, outputs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Extension, FromRequest, Multipart, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;

use super::answers::{AnswerPermit, Answers, ViewBody, light_body};
use super::download::{Downloads, FileBody, content_disposition};
use super::extract::{ApiPath, StrictQuery, bounded_u32};
use super::{ApiError, AppState, Caller};
use crate::job::ReportSummary;
use crate::sandbox::{FailureKind, JobInput, JobReport};
use crate::service::Submission;
use crate::store::{JobRecord, JobState, JobSummary};

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
    responses((status = 200, body = [ModuleView])))]
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

impl OutputLink {
    /// `file` of the job `job`, with its URL.
    pub(super) fn of(job: &str, file: &crate::job::OutputFile) -> Self {
        Self {
            name: file.name.clone(),
            size: file.size,
            sha256: file.sha256.clone(),
            url: super::output_url(job, &file.name),
        }
    }
}

/// A job as its owner sees it.
#[derive(utoipa::ToSchema)]
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
    /// The report's outputs with their download paths, written from the
    /// report as the view is encoded: a report can list tens of thousands,
    /// and a second list of them would be held beside the first.
    #[schema(value_type = Vec<OutputLink>)]
    outputs: OutputLinks,
}

/// Where [`JobView`] writes its outputs' links.
pub(super) struct OutputLinks;

impl JobView {
    fn from(job: JobRecord) -> Self {
        Self {
            id: job.id,
            module: job.module,
            state: job.state,
            created_at: job.created_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            attempts: job.attempts,
            report: job.report.map(redact),
            outputs: OutputLinks,
        }
    }
}

impl Serialize for JobView {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let Self {
            id,
            module,
            state,
            created_at,
            started_at,
            finished_at,
            attempts,
            report,
            outputs: OutputLinks,
        } = self;
        let files = report.as_ref().map_or(&[][..], |r| &r.outputs[..]);
        let mut view = serializer.serialize_struct("JobView", 9)?;
        view.serialize_field("id", id)?;
        view.serialize_field("module", module)?;
        view.serialize_field("state", state)?;
        view.serialize_field("created_at", created_at)?;
        view.serialize_field("started_at", started_at)?;
        view.serialize_field("finished_at", finished_at)?;
        view.serialize_field("attempts", attempts)?;
        view.serialize_field("report", report)?;
        view.serialize_field("outputs", &Links { job: id, files })?;
        view.end()
    }
}

/// A job's outputs as [`OutputLink`]s, each made as it is written.
struct Links<'a> {
    job: &'a str,
    files: &'a [crate::job::OutputFile],
}

impl Serialize for Links<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.files.iter().map(|o| OutputLink::of(self.job, o)))
    }
}

/// A job as its owner sees it, as a JSON response. A report can list
/// thousands of outputs and carry megabytes of captured output: one that
/// heavy is decoded into parts off the async threads ([`crate::blocking`]),
/// so that a client reading it again and again slows no other request,
/// and its body is written as the client reads ([`ViewBody`]). With
/// `held`, the body holds that reservation of the answers' budget
/// ([`Answers`]) until the connection has written it.
fn job_response(status: StatusCode, job: JobRecord, held: Option<AnswerPermit>) -> Response {
    let heavy = job
        .report
        .as_ref()
        .is_some_and(|r| r.json_bound() >= crate::job::HEAVY_REPORT as u64);
    let body = if heavy {
        crate::blocking(move || view_parts(job))
            .map(|(parts, files, id)| Body::new(ViewBody::new(parts, files, id, held)))
    } else {
        serde_json::to_vec(&JobView::from(job)).map(|json| match held {
            Some(held) => Body::from(light_body(json, held)),
            None => Body::from(json),
        })
    };
    match body {
        Ok(body) => (
            status,
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            body,
        )
            .into_response(),
        Err(e) => ApiError::Internal(format!("cannot encode a job: {e}")).into_response(),
    }
}

/// `job`'s view as [`ViewBody`] writes it: the JSON before the report's
/// outputs, between them and the links, after the links; the outputs; the
/// job's id. The view is encoded with both lists empty and cut at them:
/// the links are its last field, and the report's outputs the one
/// `,"outputs":[],"skipped_outputs":` in it (a `,"` is never inside a JSON
/// string, whose quotes are escaped).
fn view_parts(
    mut job: JobRecord,
) -> Result<([bytes::Bytes; 3], Vec<crate::job::OutputFile>, String), serde_json::Error> {
    use serde::ser::Error;
    const LINKS: &[u8] = b",\"outputs\":[]}";
    const FILES: &[u8] = b",\"outputs\":[],\"skipped_outputs\":";
    let files = job
        .report
        .as_mut()
        .map(|r| std::mem::take(&mut r.outputs))
        .unwrap_or_default();
    let id = job.id.clone();
    let has_report = job.report.is_some();
    let mut json = bytes::Bytes::from(serde_json::to_vec(&JobView::from(job))?);
    if !json.ends_with(LINKS) {
        return Err(serde_json::Error::custom(
            "the view does not end with its links",
        ));
    }
    let tail = json.split_off(json.len() - 2);
    let head = if has_report {
        let at = json
            .windows(FILES.len())
            .position(|w| w == FILES)
            .ok_or_else(|| serde_json::Error::custom("no outputs in the report"))?;
        json.split_to(at + b",\"outputs\":[".len())
    } else {
        bytes::Bytes::new()
    };
    Ok(([head, json, tail], files, id))
}

/// A job as its owner's listing shows it: how it ended in a few words. Its
/// whole report (captured output, the outputs list) is at `url`: a listing
/// of many jobs carries none, as each can be megabytes.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct JobListed {
    id: String,
    module: String,
    state: JobState,
    /// Unix milliseconds.
    created_at: i64,
    started_at: Option<i64>,
    finished_at: Option<i64>,
    attempts: u32,
    /// How it ended, once finished.
    report: Option<ReportSummary>,
    /// The job's own path (`GET` it for the whole report).
    url: String,
}

impl JobListed {
    fn from(job: JobSummary) -> Self {
        Self {
            url: format!("/v1/jobs/{}", job.id),
            id: job.id,
            module: job.module,
            state: job.state,
            created_at: job.created_at,
            started_at: job.started_at,
            finished_at: job.finished_at,
            attempts: job.attempts,
            report: job.report,
        }
    }
}

/// Trap, instantiation and host-failure messages describe the host's
/// runtime (and may name its paths); they are logged and kept in the
/// store, but clients get the class only.
fn redact(mut report: JobReport) -> JobReport {
    if let Some(f) = report.failure.as_mut() {
        match f.kind {
            FailureKind::Trap => f.message = "the guest trapped".into(),
            FailureKind::Instantiate => f.message = "the module could not be started".into(),
            FailureKind::Host => f.message = "the host could not run the job".into(),
            // A worker fault's message is the gateway's own (`worker::pool`).
            FailureKind::Limit | FailureKind::Exit | FailureKind::Output | FailureKind::Worker => {}
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
            wait = Some(parse_wait(&v)?.min(max_wait));
        } else if k == "input" {
            crate::sandbox::validate_input_name(&v).map_err(ApiError::BadRequest)?;
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

/// The grammar of `?wait=` (also in the OpenAPI document): a whole number
/// of milliseconds, seconds, minutes or hours, at most six digits, not
/// zero, with an optional space before the unit. The `#[utoipa::path]`
/// attribute of [`submit`] repeats it; a test holds the two together.
#[cfg(test)]
const WAIT_PATTERN: &str = "^[1-9][0-9]{0,5} ?(ms|s|min|h)$";

/// Parses `?wait=` (see [`WAIT_PATTERN`]).
fn parse_wait(v: &str) -> Result<Duration, ApiError> {
    let bad = || {
        ApiError::BadRequest(format!(
            "invalid wait `{}`: expected a whole number and a unit (ms, s, min, h), such as `10s`",
            v.chars().take(64).collect::<String>().escape_debug()
        ))
    };
    let digits = v.bytes().take_while(u8::is_ascii_digit).count();
    let (number, unit) = v.split_at(digits);
    let unit = unit.strip_prefix(' ').unwrap_or(unit);
    if !(1..=6).contains(&digits) || number.starts_with('0') {
        return Err(bad());
    }
    let n: u64 = number.parse().map_err(|_| bad())?;
    let millis = match unit {
        "ms" => n,
        "s" => n * 1000,
        "min" => n * 60_000,
        "h" => n * 3_600_000,
        _ => return Err(bad()),
    };
    Ok(Duration::from_millis(millis))
}

/// Submit a job. The body is either one raw input (any content type but
/// JSON and forms; named by `?input=`, default `input`) or
/// `multipart/form-data` with one part per input file (named by its file
/// name), optional `stdin` and `param.<name>` parts. Parameters may also be
/// given as `?param.<name>=<value>`. With `?wait=<duration>` (at most the
/// server's `max_wait`) the call returns 200 with the finished job, or 202 if
/// it is still running when the wait ends.
#[utoipa::path(post, path = "/v1/modules/{module}/jobs", security(("bearer" = [])),
    params(("module" = String, Path, pattern = "^[a-z][a-z0-9-]{0,62}$", description = "module name"),
           ("wait" = Option<String>, Query, pattern = "^[1-9][0-9]{0,5} ?(ms|s|min|h)$",
               description = "wait for the result, e.g. `10s` (capped at the server's `max_wait`)"),
           ("input" = Option<String>, Query, pattern = "^[A-Za-z0-9_-][A-Za-z0-9._-]{0,251}$",
               description = "input name of a raw body (default `input`)")),
    responses(
        (status = 200, body = JobView, description = "finished within the wait (or a retry of a finished job)"),
        (status = 202, body = JobView, description = "accepted (or still running when the wait ended)",
            headers(("location" = String, description = "the job's URL"))),
        (status = 303, body = JobView, description = "finished within the wait, but answering its report would pass the tenant's or the service's share of `max_buffered_answers`: the job without its report; GET the location (see `Retry-After`)",
            headers(("location" = String, description = "the job's URL"), ("retry-after" = u64, description = "seconds"))),
        (status = 400, body = super::ErrorBody, description = "bad query, input name, part or wait"),
        (status = 401, body = super::ErrorBody),
        (status = 403, body = super::ErrorBody, description = "the token lacks the module's scope"),
        (status = 404, body = super::ErrorBody, description = "no such module"),
        (status = 409, body = super::ErrorBody, description = "the Idempotency-Key names an earlier, different request"),
        (status = 413, body = super::ErrorBody, description = "body or inputs over the limits"),
        (status = 415, body = super::ErrorBody, description = "a JSON or form body, or a non-empty body without a content type"),
        (status = 422, body = super::ErrorBody, description = "a parameter the module does not take, or a bad value"),
        (status = 429, body = super::ErrorBody, description = "tenant or service at capacity; see `Retry-After`",
            headers(("retry-after" = u64, description = "seconds"))),
        (status = 503, body = super::ErrorBody, description = "the service is shutting down, or its storage is full or failing; see `Retry-After`",
            headers(("retry-after" = u64, description = "seconds"))),
        (status = 507, body = super::ErrorBody, description = "the job's report is longer than this service answers (stored under a larger `max_buffered_answers`)")))]
pub(super) async fn submit(
    State(state): State<AppState>,
    Extension(uploads): Extension<Arc<super::upload::Uploads>>,
    Extension(answers): Extension<Arc<Answers>>,
    Caller(who): Caller,
    ApiPath(module): ApiPath<String>,
    StrictQuery(query): StrictQuery,
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
    // Reserved before any byte of the body is read (see `upload`); a
    // refusal closes the connection with the body unread.
    // No length and no transfer coding is no body (RFC 9112 6.3); a chunked
    // body may be as long as `max_body`.
    let chunked = req.headers().contains_key(header::TRANSFER_ENCODING);
    let reserve = crate::relay::declared_length(req.headers()).unwrap_or(if chunked {
        max_body as u64
    } else {
        0
    });
    // A request without a body has nothing to upload.
    let mut upload = match (reserve > 0 || chunked)
        .then(|| uploads.acquire(&who.tenant, reserve))
        .transpose()
    {
        Ok(permit) => permit,
        Err(refused) => {
            metrics::counter!("bulkhead_uploads_refused_total").increment(1);
            // As for 413, a body is read and dropped so the client sees
            // its 429 rather than a reset, but briefly: a refused upload
            // must not hold its connection.
            discard_body_within(req, 1 << 20, Duration::from_secs(1)).await;
            return Err(refused);
        }
    };
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
    if let Some(upload) = upload.as_mut() {
        upload.received();
    }

    // A keyed submission may be repeated as often as a client likes, each
    // time answered with the same job: a heavy one counts against the
    // answers' budget from before its job is read, and a refusal (429) is
    // safe to retry with the key. An unkeyed one ran a job of its own: it
    // reserves for that job's report once it has one (below).
    let mut held = match &sub.idempotency_key {
        Some(key) => {
            let len = state.service.keyed_report_len(&who, key).await?;
            Some(answers.acquire(&who.tenant, Answers::cost_of_len(len))?)
        }
        None => None,
    };
    let deadline = wait.map(|w| tokio::time::Instant::now() + w);
    let (record, receiver) = state.service.submit(&who, &module, sub, wait).await?;
    // The body is stored: a waiting request holds no upload.
    drop(upload);
    let location = format!("/v1/jobs/{}", record.id);
    let mut finished = None;
    if let (Some(deadline), Some(rx)) = (deadline, receiver)
        && let Ok(ended) = tokio::time::timeout_at(deadline, rx).await
    {
        // The worker hands over the finished record; a cancellation, a
        // dropped sender, or a heavy report another waiter was handed
        // means reading the job's current state, within the answers'
        // budget (reserved from its stored length before it is read).
        finished = match ended.ok().flatten() {
            Some(job) => Some(job),
            None => {
                let len = state.service.report_len(&who, &record.id).await?;
                match held.as_mut() {
                    Some(permit) => permit.cover_len(len)?,
                    None => held = Some(answers.acquire(&who.tenant, Answers::cost_of_len(len))?),
                }
                Some(state.service.job(&who, &record.id).await?)
            }
        };
    }
    let (status, job) = match finished {
        Some(job) if job.state.is_final() => (StatusCode::OK, job),
        Some(job) => (StatusCode::ACCEPTED, job),
        // A retry (same `Idempotency-Key`) of a job that has finished.
        None if record.state.is_final() => (StatusCode::OK, record),
        None => (StatusCode::ACCEPTED, record),
    };
    if let Some(held) = held.as_mut() {
        held.cover(job.report.as_ref())?;
    } else if job.report.is_some() {
        // The job's own answer counts against the budget too. Past it, the
        // client is sent to the job (303 See Other, the view without its
        // report), which a GET then reads within the budget.
        let mut permit = answers.acquire(&who.tenant, 0)?;
        match permit.cover(job.report.as_ref()) {
            Ok(()) => held = Some(permit),
            Err(ApiError::TooManyRequests { .. } | ApiError::ReportTooLarge(_)) => {
                let mut job = job;
                job.report = None;
                let mut response = job_response(StatusCode::SEE_OTHER, job, None);
                let headers = response.headers_mut();
                if let Ok(v) = HeaderValue::from_str(&location) {
                    headers.insert(header::LOCATION, v);
                }
                headers.insert(header::RETRY_AFTER, HeaderValue::from(1u64));
                return Ok(response);
            }
            Err(e) => return Err(e),
        }
    }
    let mut response = job_response(status, job, held);
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
    discard_body_within(req, DISCARD_MAX, DISCARD_TIME).await;
}

/// [`discard_body`] within `max` bytes and `time`.
async fn discard_body_within(req: Request, max: u64, time: Duration) {
    use http_body_util::BodyExt;
    let expects_continue = req
        .headers()
        .get(header::EXPECT)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
    if expects_continue {
        return;
    }
    let mut body = req.into_body();
    let _ = tokio::time::timeout(time, async {
        let mut read = 0u64;
        while read <= max {
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

/// Bounds of `GET /v1/jobs?limit=`.
const LIST_DEFAULT: u32 = 50;
const LIST_MAX: u32 = 500;

/// The caller's most recent jobs, newest first: `limit` of them (1 to 500,
/// default 50), each with its report in a few words (the whole report is
/// `GET /v1/jobs/{id}`). Other query parameters are ignored.
#[utoipa::path(get, path = "/v1/jobs", security(("bearer" = [])),
    params(("limit" = Option<u32>, Query, minimum = 1, maximum = 500,
        description = "how many jobs, 1 to 500 (default 50); anything else is a 400")),
    responses((status = 200, body = [JobListed]),
        (status = 400, body = super::ErrorBody, description = "`limit` is not an integer from 1 to 500, or the query is not UTF-8")))]
pub(super) async fn list_jobs(
    State(state): State<AppState>,
    Caller(who): Caller,
    StrictQuery(query): StrictQuery,
) -> Result<Json<Vec<JobListed>>, ApiError> {
    let mut limit = LIST_DEFAULT;
    for (name, value) in query {
        if name == "limit" {
            limit = bounded_u32("limit", &value, 1, LIST_MAX)?;
        }
    }
    let jobs = state.service.jobs(&who, limit).await?;
    Ok(Json(jobs.into_iter().map(JobListed::from).collect()))
}

/// Status and report of one of the caller's jobs.
#[utoipa::path(get, path = "/v1/jobs/{id}", security(("bearer" = [])),
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = JobView), (status = 404, body = super::ErrorBody),
        (status = 429, body = super::ErrorBody, description = "answering the job's report would pass the tenant's or the service's share of `max_buffered_answers`; see `Retry-After`",
            headers(("retry-after" = u64, description = "seconds"))),
        (status = 507, body = super::ErrorBody, description = "the job's report is longer than this service answers (stored under a larger `max_buffered_answers`)")))]
pub(super) async fn get_job(
    State(state): State<AppState>,
    Extension(answers): Extension<Arc<Answers>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    let len = state.service.report_len(&who, &id).await?;
    let mut held = answers.acquire(&who.tenant, Answers::cost_of_len(len))?;
    let job = state.service.job(&who, &id).await?;
    held.cover(job.report.as_ref())?;
    Ok(job_response(StatusCode::OK, job, Some(held)))
}

/// Cancel one of the caller's queued or running jobs.
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", security(("bearer" = [])),
    params(("id" = String, Path, description = "job id")),
    responses((status = 200, body = JobView), (status = 404, body = super::ErrorBody),
        (status = 409, body = super::ErrorBody, description = "the job has already finished")))]
pub(super) async fn cancel_job(
    State(state): State<AppState>,
    Extension(answers): Extension<Arc<Answers>>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Response, ApiError> {
    state.service.cancel(&who, &id).await?;
    // Cancelled now, its report is a short one, if any; answered within
    // the budget all the same, as every report is.
    let mut held = answers.acquire(&who.tenant, 0)?;
    let job = state.service.job(&who, &id).await?;
    held.cover(job.report.as_ref())?;
    Ok(job_response(StatusCode::OK, job, Some(held)))
}

/// Delete one of the caller's finished jobs and its outputs.
#[utoipa::path(delete, path = "/v1/jobs/{id}", security(("bearer" = [])),
    params(("id" = String, Path, description = "job id")),
    responses((status = 204, description = "deleted: the job is gone, and its files with it, or, where something is in the way (a mount, a directory another process holds), left to the orphan sweep, which logs what it cannot remove"), (status = 404, body = super::ErrorBody),
        (status = 409, body = super::ErrorBody, description = "the job is still queued or running")))]
pub(super) async fn delete_job(
    State(state): State<AppState>,
    Caller(who): Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<StatusCode, ApiError> {
    state.service.delete(&who, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Download an output file of one of the caller's jobs. Served as an
/// attachment with `nosniff` and a sandboxing CSP: outputs are produced by
/// untrusted code and must never run in a browser on this origin. The file
/// is streamed as the client reads it (see [`super::download`]); each tenant
/// may have `max_downloads_per_tenant` downloads running.
#[utoipa::path(get, path = "/v1/jobs/{id}/outputs/{name}", security(("bearer" = [])),
    params(("id" = String, Path, description = "job id"),
           ("name" = String, Path, description = "output name, as in the job's `outputs` (its `url` is this path, percent-encoded)")),
    responses(
        (status = 200, description = "the file, as an attachment; its type from its extension",
            headers(("content-disposition" = String, description = "RFC 6266: an ASCII `filename` and a UTF-8 `filename*`"))),
        (status = 404, body = super::ErrorBody, description = "no such job or output"),
        (status = 429, body = super::ErrorBody, description = "the tenant has `max_downloads_per_tenant` downloads running, or reading the job's report would pass the tenant's or the service's share of `max_buffered_answers`; see `Retry-After`",
            headers(("retry-after" = u64, description = "seconds"))),
        (status = 507, body = super::ErrorBody, description = "the job's report is longer than this service answers (stored under a larger `max_buffered_answers`)")))]
pub(super) async fn get_output(
    State(state): State<AppState>,
    Extension(downloads): Extension<Arc<Downloads>>,
    Extension(answers): Extension<Arc<Answers>>,
    Caller(who): Caller,
    ApiPath((id, name)): ApiPath<(String, String)>,
) -> Result<Response, ApiError> {
    let permit = downloads.acquire(&who.tenant)?;
    // The output is looked up in the job's report, read whole: a heavy
    // one is read within the answers' budget, which the file's stream
    // then no longer holds.
    let reading = answers.acquire(
        &who.tenant,
        Answers::cost_of_len(state.service.report_len(&who, &id).await?),
    )?;
    let (file, len) = state.service.output(&who, &id, &name).await?;
    drop(reading);
    let headers = [
        (
            header::CONTENT_TYPE,
            HeaderValue::from_static(content_type(&name)),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            header::CONTENT_DISPOSITION,
            HeaderValue::from_str(&content_disposition(&name))
                .unwrap_or_else(|_| HeaderValue::from_static("attachment")),
        ),
        (
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("sandbox"),
        ),
    ];
    Ok((headers, Body::new(FileBody::new(file, len, permit))).into_response())
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

    /// A failed job `id` with `report`.
    fn record(id: &str, report: Option<JobReport>) -> JobRecord {
        JobRecord {
            id: id.into(),
            tenant: "t".into(),
            subject: "s".into(),
            token_id: "k".into(),
            module: "m".into(),
            module_sha256: "0".repeat(64),
            policy_sha256: None,
            params: BTreeMap::new(),
            inputs: Vec::new(),
            has_stdin: false,
            state: JobState::Failed,
            created_at: 0,
            started_at: None,
            finished_at: None,
            attempts: 1,
            report,
        }
    }

    /// A job with a heavy report is turned into a response off the async
    /// threads: the gateway's other tasks run meanwhile. A light one is not
    /// moved.
    #[test]
    fn a_heavy_job_is_answered_off_the_async_threads() {
        let job = |outputs: u64| {
            let mut report = JobReport::not_run("j", "m", "failed");
            report.outputs = (0..outputs)
                .map(|i| crate::sandbox::OutputFile {
                    name: format!("out-{i}.bin"),
                    size: i,
                    sha256: "0".repeat(64),
                })
                .collect();
            record("j", Some(report))
        };
        let heavy = job(60_000);
        assert!(crate::another_task_runs_meanwhile(move || {
            let response = job_response(StatusCode::OK, heavy.clone(), None);
            assert_eq!(response.status(), StatusCode::OK);
        }));
        let light = job(1);
        assert!(!crate::another_task_runs_meanwhile(move || {
            job_response(StatusCode::OK, light.clone(), None);
        }));
    }

    /// A heavy job's body, written from its parts as the client reads, is
    /// the very JSON of its view encoded whole: with outputs whose names
    /// need escaping and percent-encoding, a captured output that spells
    /// the cut's marker, no outputs at all, and no report.
    #[test]
    fn a_heavy_view_written_as_read_is_the_view_encoded_whole() {
        use http_body_util::BodyExt;
        let mut many =
            JobReport::not_run("j-1", "m", "a trap: \",\"outputs\":[],\"skipped_outputs\":");
        many.stdout.text = ",\"outputs\":[],\"skipped_outputs\":[] \u{1} é %".repeat(20_000);
        many.outputs = (0..30_000)
            .map(|i| crate::sandbox::OutputFile {
                name: format!("dir {i}/%\"q\u{7}ü-{i}.bin"),
                size: i,
                sha256: format!("{i:064x}"),
            })
            .collect();
        let mut none = many.clone();
        none.outputs.clear();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for job in [
            record("j-1", Some(many)),
            record("j-1", Some(none)),
            record("j-1", None),
        ] {
            let whole = serde_json::to_vec(&JobView::from(job.clone())).unwrap();
            let (parts, files, id) = view_parts(job).unwrap();
            let mut body = ViewBody::new(parts, files, id, None);
            let mut written = Vec::new();
            let mut frames = 0;
            rt.block_on(async {
                while let Some(frame) = body.frame().await {
                    let data = frame.unwrap().into_data().unwrap();
                    assert!(data.len() <= 80 << 10, "a frame of {}", data.len());
                    written.extend_from_slice(&data);
                    frames += 1;
                }
            });
            assert!(written == whole, "{frames} frames differ from the view");
        }
    }

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
        let bad_input = vec![("input".to_owned(), "../x".to_owned())];
        assert!(parse_query(bad_input, Duration::from_secs(1)).is_err());
    }

    #[test]
    fn wait_follows_its_documented_grammar() {
        for (ok, ms) in [
            ("1s", 1000),
            ("5 s", 5000),
            ("250ms", 250),
            ("2min", 120_000),
            ("1h", 3_600_000),
            ("999999ms", 999_999),
        ] {
            assert_eq!(parse_wait(ok).unwrap(), Duration::from_millis(ms), "{ok}");
        }
        for bad in [
            "",
            "0s",
            "01s",
            "1",
            "s",
            "1h30m",
            "1h 30min",
            "1  s",
            "1000000ms",
            "-1s",
            "1.5s",
            " 1s",
            "1s ",
            "1 S",
            "1m",
        ] {
            assert!(parse_wait(bad).is_err(), "{bad:?}");
        }
    }

    /// The served document says what the handlers do: the same `wait`
    /// grammar, `limit` bounds, the submission body and parameters, and the
    /// responses every route shares.
    #[test]
    fn the_openapi_document_matches_the_handlers() {
        use utoipa::OpenApi;
        let doc = serde_json::to_value(super::super::ApiDoc::openapi()).unwrap();
        let submit = &doc["paths"]["/v1/modules/{module}/jobs"]["post"];
        let param = |op: &serde_json::Value, name: &str| {
            op["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["name"] == name)
                .unwrap_or_else(|| panic!("no parameter {name}"))
                .clone()
        };
        assert_eq!(param(submit, "wait")["schema"]["pattern"], WAIT_PATTERN);
        let params = param(submit, "params");
        assert_eq!(params["style"], "form");
        assert_eq!(params["explode"], true);
        assert_eq!(
            params["schema"]["propertyNames"]["pattern"],
            "^param\\.[a-z][a-z0-9_-]{0,63}$"
        );
        let body = submit["requestBody"]["content"].as_object().unwrap();
        for ty in ["application/octet-stream", "image/*", "multipart/form-data"] {
            assert!(body.contains_key(ty), "{ty}");
        }
        let limit = param(&doc["paths"]["/v1/jobs"]["get"], "limit");
        assert_eq!(limit["schema"]["minimum"], 1);
        assert_eq!(limit["schema"]["maximum"], LIST_MAX);
        assert_eq!(limit["schema"]["format"], "int32");
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let responses = op["responses"].as_object().unwrap();
                assert!(responses.contains_key("414"), "{method} {path}");
                if op.get("security").is_some() {
                    for status in ["400", "401"] {
                        assert!(responses.contains_key(status), "{method} {path} {status}");
                    }
                }
            }
        }
    }
}
