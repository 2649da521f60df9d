//! The API's contract over loopback: every refusal — axum's own rejections,
//! the fallback, 405, 414 — has the one JSON error shape; query strings are
//! decoded strictly; `limit` is bounded as documented; and outputs with any
//! stored name (controls, bidi overrides, spaces, quotes) are listed with
//! encoded URLs and downloaded with a safe `Content-Disposition`, never a
//! 500.

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::{Server, start, stored_outputs};

/// Sends `req` and checks the response is an error in the one shape;
/// returns its status, code and headers.
async fn refusal(req: reqwest::RequestBuilder) -> (StatusCode, String, reqwest::header::HeaderMap) {
    let resp = req.send().await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let text = resp.text().await.unwrap();
    assert!(
        status.is_client_error() || status.is_server_error(),
        "{status}: {text}"
    );
    assert_eq!(
        headers.get("content-type").map(|v| v.to_str().unwrap()),
        Some("application/json"),
        "{status}: {text}"
    );
    let body: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{status}: {e}: {text:?}"));
    let code = body["error"]["code"]
        .as_str()
        .unwrap_or_else(|| panic!("{text}"));
    let message = body["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("{text}"));
    assert!(!message.is_empty(), "{text}");
    assert_eq!(body.as_object().unwrap().len(), 1, "{text}");
    (status, code.to_owned(), headers)
}

#[tokio::test(flavor = "multi_thread")]
async fn every_refusal_has_the_one_json_shape() {
    let s = start(|_| {}).await;
    let t = s.token("acme", &["hello:run"]).await;
    let get = |path: &str| s.get(path, &t);
    let admin = |path: &str| {
        s.http
            .post(format!("{}{path}", s.admin))
            .bearer_auth(&s.admin_token)
    };
    let long = format!("/v1/jobs?x={}", "a".repeat(9 << 10));
    let cases: Vec<(&str, reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            "unknown route",
            get("/v2/nothing"),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "method not allowed",
            s.http.put(s.url("/v1/jobs")).bearer_auth(&t),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            "method not allowed without a token",
            s.http.patch(s.url("/healthz")),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            "query value not UTF-8",
            s.http
                .post(s.url("/v1/modules/hello/jobs?param.x=%FF"))
                .bearer_auth(&t),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "query name not UTF-8",
            get("/v1/jobs?%C3=1"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "limit over i32",
            get("/v1/jobs?limit=2147483648"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "limit zero",
            get("/v1/jobs?limit=0"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "limit 501",
            get("/v1/jobs?limit=501"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "limit text",
            get("/v1/jobs?limit=ten"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "wait with two units",
            s.http
                .post(s.url("/v1/modules/hello/jobs?wait=1h%2030m"))
                .bearer_auth(&t),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "path segment not UTF-8",
            get("/v1/jobs/%FF%FE"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "output name not UTF-8",
            get("/v1/jobs/x/outputs/a%FF"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "uri too long",
            get(&long),
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
        ),
        (
            "malformed multipart",
            s.post("/v1/modules/hello/jobs", &t)
                .header("content-type", "multipart/form-data")
                .body("--x\r\n"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "admin: unknown route",
            admin("/admin/v1/nothing"),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "admin: method not allowed",
            s.http
                .delete(format!("{}/admin/v1/audit", s.admin))
                .bearer_auth(&s.admin_token),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
        (
            "admin: JSON syntax",
            admin("/admin/v1/tokens")
                .header("content-type", "application/json")
                .body("{"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "admin: not JSON",
            admin("/admin/v1/tokens").body("tenant=a"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            "admin: wrong JSON shape",
            admin("/admin/v1/tokens")
                .header("content-type", "application/json")
                .body(r#"{"tenant": 1}"#),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unprocessable",
        ),
        (
            "admin: audit limit",
            s.http
                .get(format!("{}/admin/v1/audit?limit=-1", s.admin))
                .bearer_auth(&s.admin_token),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            "admin: revoke id not UTF-8",
            admin("/admin/v1/tokens/%FF/revoke"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
    ];
    for (what, req, status, code) in cases {
        let (got, got_code, headers) = refusal(req).await;
        assert_eq!((got, got_code.as_str()), (status, code), "{what}");
        if status == StatusCode::METHOD_NOT_ALLOWED {
            assert!(
                headers.contains_key("allow"),
                "{what}: the 405 keeps `Allow`"
            );
        }
    }

    // The bounds are inclusive, and a valid query still works.
    for ok in ["/v1/jobs?limit=1", "/v1/jobs?limit=500", "/v1/jobs?other=x"] {
        let resp = get(ok).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{ok}");
    }
    let resp = s
        .post("/v1/modules/hello/jobs?wait=5%20s", &t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK, "`5 s` is a valid wait");
}

/// Names a guest could leave in `/out` and a store may already hold.
const HOSTILE_NAMES: &[&str] = &[
    "carriage\rreturn.txt",
    "line\nfeed.txt",
    "escape\u{1b}[31mred.txt",
    "invoice\u{202E}fdp.exe",
    "next\u{85}line.txt",
    "dir/with space?and#hash%41.txt",
    "quote\"and\\backslash.txt",
    "r\u{e9}sum\u{e9}.pdf",
    "nul\u{7f}del",
];

/// Stores a finished job of `tenant` whose report lists `names`, each
/// written under the job's output directory with its own name as content.
async fn job_with_outputs(s: &Server, tenant: &str, names: &[&str]) -> String {
    let outputs: Vec<(&str, &[u8])> = names.iter().map(|n| (*n, n.as_bytes())).collect();
    let data_dir = &s.service.config().storage.data_dir;
    stored_outputs(s.service.store().as_ref(), data_dir, tenant, &outputs).await
}

#[tokio::test(flavor = "multi_thread")]
async fn any_stored_output_name_downloads_with_an_encoded_url_and_a_safe_disposition() {
    let s = start(|_| {}).await;
    let t = s.token("acme", &["hello:run"]).await;
    let id = job_with_outputs(&s, "acme", HOSTILE_NAMES).await;
    let resp = s.get(&format!("/v1/jobs/{id}"), &t).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let job: Value = resp.json().await.unwrap();
    let outputs = job["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), HOSTILE_NAMES.len(), "{job:#}");
    for output in outputs {
        let name = output["name"].as_str().unwrap();
        let url = output["url"].as_str().unwrap();
        assert!(
            url.bytes().all(|b| b.is_ascii_graphic()) && !url.contains(['?', '#', '"', '\\']),
            "{name:?}: url {url:?} is not percent-encoded"
        );
        let resp = s.get(url, &t).send().await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK, "{name:?} at {url}");
        let disposition = resp
            .headers()
            .get("content-disposition")
            .unwrap()
            .to_str()
            .unwrap_or_else(|_| panic!("{name:?}: disposition is not visible ASCII"))
            .to_owned();
        assert!(
            disposition.starts_with("attachment; filename=\"")
                && disposition.contains("; filename*=UTF-8''")
                && disposition.bytes().all(|b| (0x20..0x7f).contains(&b)),
            "{name:?}: {disposition:?}"
        );
        // No control or text-reordering character survives, even encoded.
        for bad in ["%0D", "%0A", "%1B", "%7F", "%C2%85", "%E2%80%AE"] {
            assert!(!disposition.contains(bad), "{name:?}: {disposition:?}");
        }
        assert_eq!(resp.bytes().await.unwrap(), name.as_bytes(), "{name:?}");
    }
}
