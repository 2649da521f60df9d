//! The job service end to end, over real HTTP on loopback: submit → wait →
//! download, async submit → poll → download, every error status, tenant
//! isolation, revocation, the admin boundary, backpressure, and the audit
//! log.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::{error_code, json, png, start};

#[tokio::test(flavor = "multi_thread")]
async fn submit_wait_and_download_a_thumbnail() {
    let s = start(|_| {}).await;
    let token = s.token("acme", &["thumbnail:run"]).await;
    let resp = s
        .post(
            "/v1/modules/thumbnail/jobs?wait=20s&param.width=64&param.height=64",
            &token,
        )
        .header("content-type", "image/png")
        .body(png(320, 200))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let job: Value = resp.json().await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let url = job["outputs"][0]["url"].as_str().unwrap();
    let download = s.get(url, &token).send().await.unwrap();
    assert_eq!(download.status(), StatusCode::OK);
    assert_eq!(download.headers()["content-type"], "image/png");
    assert_eq!(download.headers()["x-content-type-options"], "nosniff");
    let thumb = image::load_from_memory(&download.bytes().await.unwrap()).unwrap();
    assert_eq!((thumb.width(), thumb.height()), (64, 40));

    // A listing shows the job in a few words, not its report (captured
    // output, outputs list), which is at its own path.
    let listed = json(s.get("/v1/jobs", &token)).await;
    let listed = &listed.as_array().unwrap()[..];
    assert_eq!(listed.len(), 1, "{listed:#?}");
    let id = job["id"].as_str().unwrap();
    assert_eq!(listed[0]["id"], id);
    assert_eq!(listed[0]["state"], "succeeded");
    assert_eq!(listed[0]["url"], format!("/v1/jobs/{id}"));
    assert_eq!(
        listed[0]["report"],
        serde_json::json!({
            "outcome": "succeeded", "exit_code": 0, "limit": null, "failure": null, "outputs": 1
        })
    );
    assert!(listed[0].get("outputs").is_none(), "{:#}", listed[0]);
    let whole = json(s.get(listed[0]["url"].as_str().unwrap(), &token)).await;
    assert_eq!(whole["outputs"], job["outputs"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn async_multipart_submit_then_poll_then_download() {
    let s = start(|_| {}).await;
    let token = s.token("acme", &["thumbnail:run"]).await;
    let form = reqwest::multipart::Form::new()
        .part(
            "file",
            reqwest::multipart::Part::bytes(png(100, 300)).file_name("tall.png"),
        )
        .text("param.height", "30");
    let resp = s
        .post("/v1/modules/thumbnail/jobs", &token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let location = resp.headers()["location"].to_str().unwrap().to_owned();
    let accepted: Value = resp.json().await.unwrap();
    let id = accepted["id"].as_str().unwrap();
    assert_eq!(location, format!("/v1/jobs/{id}"));
    let job = s.finished(&token, id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let png_bytes = s
        .get(job["outputs"][0]["url"].as_str().unwrap(), &token)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    let thumb = image::load_from_memory(&png_bytes).unwrap();
    assert_eq!((thumb.width(), thumb.height()), (10, 30));
}

#[tokio::test(flavor = "multi_thread")]
async fn each_refusal_has_its_status_and_one_error_shape() {
    // A body just over the 1 MiB limit: the server has read nearly all of it
    // when it answers 413, so the client is not still writing into a closed
    // connection (which it would see as a reset instead of the response).
    let s = start(|c| c.server.max_body = bulkhead::policy::ByteSize::mib(1)).await;
    let thumb = s.token("acme", &["thumbnail:run"]).await;
    let hello_only = s.token("acme", &["hello:run"]).await;
    let submit = |token: Option<&str>, path: &str| {
        let mut req = s
            .http
            .post(s.url(path))
            .header("content-type", "image/png")
            .body(png(8, 8));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req
    };

    let cases: Vec<(reqwest::RequestBuilder, StatusCode, &str)> = vec![
        (
            submit(None, "/v1/modules/thumbnail/jobs"),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            submit(Some("bkh_not-a-real-token"), "/v1/modules/thumbnail/jobs"),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            submit(
                Some("eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9."),
                "/v1/modules/thumbnail/jobs",
            ),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            submit(
                Some("bkh_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"),
                "/v1/modules/thumbnail/jobs",
            ),
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        ),
        (
            submit(Some(&thumb), "/v1/modules/thumbnail/jobs").header("x-bulkhead-tenant", "other"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            submit(Some(&hello_only), "/v1/modules/thumbnail/jobs"),
            StatusCode::FORBIDDEN,
            "forbidden",
        ),
        (
            submit(Some(&thumb), "/v1/modules/nope/jobs"),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            s.http
                .get(s.url("/v1/jobs/00000000-0000-0000-0000-000000000000"))
                .bearer_auth(&thumb),
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            submit(Some(&thumb), "/v1/modules/thumbnail/jobs").body(vec![0u8; 1024 * 1024 + 1024]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
        ),
        (
            s.post("/v1/modules/thumbnail/jobs", &thumb)
                .header("content-type", "application/json")
                .body("{}"),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            submit(Some(&thumb), "/v1/modules/thumbnail/jobs?param.evil=1"),
            StatusCode::UNPROCESSABLE_ENTITY,
            "unprocessable",
        ),
        (
            submit(
                Some(&thumb),
                "/v1/modules/thumbnail/jobs?input=../../etc/passwd",
            ),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
    ];
    for (i, (req, status, code)) in cases.into_iter().enumerate() {
        let (got_status, got_code) = error_code(req.send().await.unwrap()).await;
        assert_eq!((got_status, got_code.as_str()), (status, code), "case {i}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn another_tenant_cannot_see_touch_or_download_a_job() {
    let s = start(|_| {}).await;
    let a = s.token("tenant-a", &["thumbnail:run"]).await;
    let b = s.token("tenant-b", &["thumbnail:run"]).await;
    let job: Value = json(
        s.post("/v1/modules/thumbnail/jobs?wait=20s", &a)
            .header("content-type", "image/png")
            .body(png(50, 50)),
    )
    .await;
    let id = job["id"].as_str().unwrap();
    let output = job["outputs"][0]["url"].as_str().unwrap();
    let attempts = [
        s.get(&format!("/v1/jobs/{id}"), &b),
        s.http
            .post(s.url(&format!("/v1/jobs/{id}/cancel")))
            .bearer_auth(&b),
        s.http
            .delete(s.url(&format!("/v1/jobs/{id}")))
            .bearer_auth(&b),
        s.get(output, &b),
    ];
    for req in attempts {
        assert_eq!(req.send().await.unwrap().status(), StatusCode::NOT_FOUND);
    }
    let listed: Value = json(s.get("/v1/jobs", &b)).await;
    assert_eq!(listed.as_array().unwrap().len(), 0);
    // The owner still has it, untouched.
    let own = s.get(output, &a).send().await.unwrap();
    assert_eq!(own.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_revoked_token_fails_on_its_next_request_and_user_tokens_never_reach_admin() {
    let s = start(|_| {}).await;
    let user = s.token("acme", &["hello:run"]).await;
    let modules = s.get("/v1/modules", &user).send().await.unwrap();
    assert_eq!(modules.status(), StatusCode::OK);

    // A user token, whatever its scopes, is not the admin token.
    let admin_with_user = s
        .http
        .get(format!("{}/admin/v1/tokens", s.admin))
        .bearer_auth(&user)
        .send()
        .await
        .unwrap();
    assert_eq!(admin_with_user.status(), StatusCode::UNAUTHORIZED);
    let metrics_with_user = s
        .http
        .get(format!("{}/metrics", s.admin))
        .bearer_auth(&user)
        .send()
        .await
        .unwrap();
    assert_eq!(metrics_with_user.status(), StatusCode::UNAUTHORIZED);

    let tokens: Value = json(
        s.http
            .get(format!("{}/admin/v1/tokens", s.admin))
            .bearer_auth(&s.admin_token),
    )
    .await;
    let id = tokens[0]["id"].as_str().unwrap();
    assert!(
        tokens[0].get("hash").is_none(),
        "token hashes are never listed"
    );
    let revoked = s
        .http
        .post(format!("{}/admin/v1/tokens/{id}/revoke", s.admin))
        .bearer_auth(&s.admin_token)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::NO_CONTENT);
    let after = s.get("/v1/modules", &user).send().await.unwrap();
    assert_eq!(after.status(), StatusCode::UNAUTHORIZED);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_flooding_tenant_gets_429_while_another_tenant_is_served() {
    let s = start(|c| {
        c.queue.workers = 2;
        c.queue.max_running_per_tenant = 1;
        c.queue.max_queued_per_tenant = 3;
    })
    .await;
    let flooder = s.token("flooder", &["hostile:run"]).await;
    let polite = s.token("polite", &["hello:run"]).await;
    let mut accepted = 0;
    let mut refused = 0;
    for _ in 0..12 {
        let resp = s
            .post("/v1/modules/hostile/jobs", &flooder)
            .send()
            .await
            .unwrap();
        match resp.status() {
            StatusCode::ACCEPTED => accepted += 1,
            StatusCode::TOO_MANY_REQUESTS => {
                assert!(resp.headers().contains_key("retry-after"));
                refused += 1;
            }
            other => panic!("unexpected {other}"),
        }
    }
    // One may already be running, three queued: the rest are refused.
    assert!(accepted <= 4, "accepted {accepted}");
    assert!(refused >= 8, "refused {refused}");
    assert!(
        s.service
            .render_metrics()
            .contains("bulkhead_jobs_rejected_total")
    );

    let resp = s
        .post("/v1/modules/hello/jobs?wait=20s", &polite)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let job: Value = resp.json().await.unwrap();
    assert_eq!(job["state"], "succeeded");
    assert_eq!(job["report"]["stdout"]["text"], "hello from bulkhead\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_then_delete_and_the_audit_log_records_it() {
    let s = start(|c| c.queue.workers = 1).await;
    let token = s.token("acme", &["hostile:run"]).await;
    let job: Value = json(
        s.http
            .post(s.url("/v1/modules/hostile/jobs"))
            .bearer_auth(&token),
    )
    .await;
    let id = job["id"].as_str().unwrap();
    let busy = s
        .delete(&format!("/v1/jobs/{id}"), &token)
        .send()
        .await
        .unwrap();
    let (status, _) = error_code(busy).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "an unfinished job cannot be deleted"
    );
    let cancelled: Value = json(
        s.http
            .post(s.url(&format!("/v1/jobs/{id}/cancel")))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(cancelled["state"], "cancelled");
    let again = s
        .post(&format!("/v1/jobs/{id}/cancel"), &token)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT);
    let deleted = s
        .delete(&format!("/v1/jobs/{id}"), &token)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let gone = s
        .get(&format!("/v1/jobs/{id}"), &token)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);

    // A scope denial is audited with the module it was for.
    let denied = s
        .post("/v1/modules/thumbnail/jobs", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    let audit: Value = json(
        s.http
            .get(format!("{}/admin/v1/audit", s.admin))
            .bearer_auth(&s.admin_token),
    )
    .await;
    let entries = audit.as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["action"] == "job.cancelled" && e["job_id"] == id)
    );
    assert!(entries.iter().any(|e| e["action"] == "scope.denied"
        && e["module"] == "thumbnail"
        && e["tenant"] == "acme"));
}

#[tokio::test(flavor = "multi_thread")]
async fn limits_fired_are_reported_and_counted_in_metrics() {
    let s = start(|_| {}).await;
    let token = s.token("acme", &["hostile:run"]).await;
    let job: Value = json(
        s.http
            .post(s.url("/v1/modules/hostile/jobs?wait=20s"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(job["state"], "failed");
    assert_eq!(job["report"]["limit"], "wall_time");
    let metrics = s
        .http
        .get(format!("{}/metrics", s.admin))
        .bearer_auth(&s.admin_token)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("bulkhead_limits_fired_total"), "{metrics}");
    assert!(metrics.contains("bulkhead_jobs_total"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_describes_the_api() {
    let s = start(|_| {}).await;
    let doc: Value = json(s.http.get(s.url("/openapi.json"))).await;
    for path in [
        "/v1/modules",
        "/v1/modules/{module}/jobs",
        "/v1/jobs/{id}",
        "/v1/jobs/{id}/outputs/{name}",
    ] {
        assert!(doc["paths"].get(path).is_some(), "{path} missing");
    }
    let ready = s.http.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn finished_jobs_expire_after_retention_with_their_files() {
    let s = start(|c| c.storage.retention = "1 ms".parse().unwrap()).await;
    let token = s.token("acme", &["thumbnail:run"]).await;
    let job: Value = json(
        s.post("/v1/modules/thumbnail/jobs?wait=20s", &token)
            .header("content-type", "image/png")
            .body(png(40, 40)),
    )
    .await;
    assert_eq!(job["state"], "succeeded");
    let id = job["id"].as_str().unwrap();
    let files = s.service.config().storage.data_dir.join("jobs").join(id);
    assert!(files.join("outputs/thumbnail.png").is_file());
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert_eq!(s.service.sweep().await, 1);
    assert!(!files.exists(), "outputs outlived retention");
    let gone = s
        .get(&format!("/v1/jobs/{id}"), &token)
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_draining_service_refuses_new_jobs_with_503_and_is_not_ready() {
    let s = start(|c| c.server.shutdown_grace = "2 s".parse().unwrap()).await;
    let token = s.token("acme", &["hello:run"]).await;
    let done = json(
        s.http
            .post(s.url("/v1/modules/hello/jobs?wait=20s"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(done["state"], "succeeded");
    let work = s.service.work_dir().to_owned();
    assert!(work.is_dir());
    s.service.shutdown().await;
    // All but the lock file, held until the process ends.
    let left: Vec<_> = std::fs::read_dir(&work)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        ["bulkhead.lock"],
        "an idle shutdown gives the job directories back"
    );
    let resp = s
        .post("/v1/modules/hello/jobs", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(resp.headers().contains_key("retry-after"));
    let ready = s.http.get(s.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
}

/// A shutdown kills the workers still running jobs when its grace ends:
/// such a job goes back to the queue with its attempt given back, neither
/// stored `failed` nor blamed on its worker, and the next start runs it.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_running_when_shutdown_stops_its_worker_is_left_to_run_again() {
    let s = start(|c| {
        c.server.shutdown_grace = "200 ms".parse().unwrap();
        crate::common::sleeper(60_000).write_to(&c.modules.policies_dir);
    })
    .await;
    let id = submit_until_running(&s).await;
    let store = std::sync::Arc::clone(s.service.store());
    let state = || async { store.get_job("acme", &id).await.unwrap().unwrap() };
    // A second service on the same data directory stops before it touches
    // anything: the running job's directories are still there.
    let entries = || {
        s.job_roots()
            .iter()
            .flat_map(|r| walk(r))
            .collect::<Vec<_>>()
    };
    // Its worker has made the job's directories: its `/out`, then (the
    // job has no inputs) the shared empty `/in` of the worker's first
    // job, made just after it (an earlier version compared before that,
    // and saw the worker's own `mkdir` as the second start's).
    let made = || {
        let entries = entries();
        entries
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "out"))
            && entries.iter().any(|p| p.ends_with(".empty-in"))
    };
    for _ in 0..300 {
        if made() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(made(), "{:?}", entries());
    let before = entries();
    let err = bulkhead::service::Service::start(s.service.config().clone(), None)
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("in use by another bulkhead process"), "{err}");
    assert_eq!(
        entries(),
        before,
        "the second start touched the work directory"
    );
    assert_eq!(state().await.state.as_str(), "running");
    s.service.shutdown().await;
    // Its run ends once its worker is gone: whatever it was going to
    // store, it has by then.
    for _ in 0..300 {
        if s.service.jobs_running() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(s.service.jobs_running(), 0, "the run did not end");
    let left = state().await;
    assert_eq!(
        left.state.as_str(),
        "queued",
        "a job stopped by shutdown was not given back: {:?}",
        left.report.map(|r| r.failure)
    );
    assert!(left.report.is_none() && left.finished_at.is_none());
    assert_eq!(left.attempts, 0, "shutdown spent its attempt");
    let audit = store.audit(100).await.unwrap();
    assert!(
        !audit.iter().any(|e| e.action == "worker.fault"),
        "a worker stopped by shutdown was blamed: {audit:#?}"
    );

    // The next start runs it again (here to its new, short wall time).
    let mut config = s.service.config().clone();
    crate::common::sleeper(300).write_to(&config.modules.policies_dir);
    config.server.shutdown_grace = "1 s".parse().unwrap();
    let again = bulkhead::service::Service::start(config, None)
        .await
        .unwrap();
    let mut rerun = state().await;
    for _ in 0..300 {
        if rerun.finished_at.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        rerun = state().await;
    }
    assert_eq!(rerun.attempts, 1, "{rerun:?}");
    let report = rerun.report.expect("finished by the next start");
    assert_eq!(
        report.limit,
        Some(bulkhead::sandbox::LimitKind::WallTime),
        "{report:?}"
    );
    again.shutdown().await;
}

/// A job shutdown stops keeps its attempt even when the store does not take
/// the give-back (another connection holds SQLite's write lock through the
/// whole shutdown): the claim is kept in the data directory, and the next
/// start records it before it takes back the jobs left running.
#[tokio::test(flavor = "multi_thread")]
async fn a_give_back_the_store_does_not_take_at_shutdown_is_recorded_by_the_next_start() {
    let s = start(|c| {
        c.server.shutdown_grace = "200 ms".parse().unwrap();
        crate::common::sleeper(60_000).write_to(&c.modules.policies_dir);
    })
    .await;
    let id = submit_until_running(&s).await;
    let store = std::sync::Arc::clone(s.service.store());
    let state = || async { store.get_job("acme", &id).await.unwrap().unwrap() };
    let data = s.service.config().storage.data_dir.clone();
    let writer = rusqlite::Connection::open(data.join("bulkhead.sqlite")).unwrap();
    writer.execute_batch("BEGIN EXCLUSIVE").unwrap();
    s.service.shutdown().await;
    for _ in 0..300 {
        if s.service.jobs_running() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let kept = data.join("given-back.json");
    assert!(kept.exists(), "the give-back was not kept");
    writer.execute_batch("COMMIT").unwrap();
    drop(writer);
    let left = state().await;
    assert_eq!(
        (left.state.as_str(), left.attempts),
        ("running", 1),
        "the store took the give-back after all: the lock did not hold"
    );

    let mut config = s.service.config().clone();
    crate::common::sleeper(300).write_to(&config.modules.policies_dir);
    config.server.shutdown_grace = "1 s".parse().unwrap();
    let again = bulkhead::service::Service::start(config, None)
        .await
        .unwrap();
    assert!(!kept.exists(), "the start left the give-back file");
    let mut rerun = state().await;
    for _ in 0..300 {
        if rerun.finished_at.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        rerun = state().await;
    }
    assert_eq!(
        rerun.attempts, 1,
        "the stopped attempt was counted: {rerun:?}"
    );
    assert!(rerun.report.is_some(), "{rerun:?}");
    let config = again.config().clone();
    again.shutdown().await;
    // A file that is not such a list (not this process's writing) is
    // ignored and removed; the start goes on.
    std::fs::write(&kept, b"{\"not\": \"a list\"").unwrap();
    let third = bulkhead::service::Service::start(config, None)
        .await
        .unwrap();
    assert!(!kept.exists());
    assert_eq!(state().await.attempts, 1);
    third.shutdown().await;
}

/// Links in a data directory, at the key ring's directory, the admin
/// token, the store and the list of jobs given back, each to another's
/// file or directory, and hard links at the admin token and the store to
/// another's: the start is refused, and the other's files are neither
/// read into service nor written.
#[tokio::test(flavor = "multi_thread")]
async fn links_in_the_data_directory_are_never_followed() {
    let s = start(|_| {}).await;
    // Another service's data directory: its keys, admin token and store.
    let theirs = s.service.config().storage.data_dir.clone();
    let before = |name: &str| std::fs::read(theirs.join(name)).unwrap();
    let keyring = before("keys/keyring.json");
    let token = before("admin.token");
    let other = tempfile::tempdir().unwrap();
    let mut config = s.service.config().clone();
    config.storage.work_dir = None;
    for (name, target, refusal, hard) in [
        ("keys", theirs.join("keys"), "not followed", false),
        (
            "admin.token",
            theirs.join("admin.token"),
            "not followed",
            false,
        ),
        ("bulkhead.sqlite", theirs.join("bulkhead.sqlite"), "", false),
        ("given-back.json", theirs.join("admin.token"), "", false),
        ("admin.token", theirs.join("admin.token"), "one name", true),
        ("bulkhead.sqlite", theirs.join("bulkhead.sqlite"), "", true),
    ] {
        let data = other
            .path()
            .join(format!("{}-{hard}", name.replace('.', "-")));
        std::fs::create_dir(&data).unwrap();
        if hard {
            std::fs::hard_link(&target, data.join(name)).unwrap();
        } else {
            std::os::unix::fs::symlink(&target, data.join(name)).unwrap();
        }
        config.storage.data_dir = data.clone();
        config.storage.cache_dir = Some(other.path().join("cache"));
        let err = bulkhead::service::Service::start(config.clone(), None)
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains(refusal), "{name}: {err}");
        assert!(
            hard || std::fs::symlink_metadata(data.join(name))
                .unwrap()
                .file_type()
                .is_symlink(),
            "{name}: the link was replaced"
        );
    }
    assert_eq!(before("keys/keyring.json"), keyring);
    assert_eq!(before("admin.token"), token);
    // Their service still serves, on its own store.
    let secret = s.token("acme", &["thumbnail:run"]).await;
    let resp = s.get("/v1/jobs", &secret).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    s.service.shutdown().await;
}

/// A running job's directory replaced by a link to another directory:
/// what the service then reads, writes and removes of the job (its
/// inputs, its outputs) is reached from the jobs directory's descriptor,
/// never through the link, and the other directory is left whole.
#[tokio::test(flavor = "multi_thread")]
async fn a_link_in_place_of_a_running_jobs_directory_is_never_followed() {
    let s = start(|c| {
        crate::common::sleeper(1_500).write_to(&c.modules.policies_dir);
    })
    .await;
    let id = submit_with_stdin_until_running(&s, "its stdin").await;
    let token = s.token("acme", &["hostile:run"]).await;
    let store = std::sync::Arc::clone(s.service.store());
    let state = || async { store.get_job("acme", &id).await.unwrap().unwrap().state };
    let jobs = s.service.config().storage.data_dir.join("jobs");
    assert!(jobs.join(&id).join("inputs").exists());
    let other = tempfile::tempdir().unwrap();
    let victim = other.path().join("victim");
    for dir in ["inputs/sub", "outputs"] {
        std::fs::create_dir_all(victim.join(dir)).unwrap();
    }
    for file in ["inputs/stdin", "inputs/sub/keep", "outputs/keep"] {
        std::fs::write(victim.join(file), b"not the service's").unwrap();
    }
    let before = walk(&victim);
    std::fs::rename(jobs.join(&id), other.path().join("moved")).unwrap();
    std::os::unix::fs::symlink(&victim, jobs.join(&id)).unwrap();
    // The job ends (its run, any re-run, its inputs' removal).
    for _ in 0..300 {
        if state().await.is_final() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(state().await.is_final(), "{:?}", state().await);
    assert_eq!(walk(&victim), before, "the other directory was changed");
    for file in ["inputs/stdin", "inputs/sub/keep", "outputs/keep"] {
        assert_eq!(
            std::fs::read(victim.join(file)).unwrap(),
            b"not the service's"
        );
    }
    std::fs::remove_file(jobs.join(&id)).unwrap();

    // The whole jobs directory replaced by a link once the service runs:
    // it goes on with the directory it opened at its start.
    let elsewhere = other.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    let real = other.path().join("jobs-real");
    std::fs::rename(&jobs, &real).unwrap();
    std::os::unix::fs::symlink(&elsewhere, &jobs).unwrap();
    let resp = s
        .post("/v1/modules/hostile/jobs", &token)
        .header("content-type", "application/octet-stream")
        .body("its stdin")
        .send()
        .await
        .unwrap();
    let second = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let done = s.finished(&token, &second).await;
    assert!(
        done["state"] == "succeeded" || done["state"] == "failed",
        "{done:#}"
    );
    assert_eq!(walk(&elsewhere), Vec::<std::path::PathBuf>::new());
    std::fs::remove_file(&jobs).unwrap();
    std::fs::rename(&real, &jobs).unwrap();
}

/// The work directory and a zone's directory in it, each replaced by a
/// link once the service runs, and another process's held directory put
/// in the work directory: the workers' directories are made and removed
/// in the zone directory the service opened, its shutdown empties the
/// work directory it locked, and a directory with a lock another process
/// holds (a running service's data directory) is left whole.
#[tokio::test(flavor = "multi_thread")]
async fn links_in_the_work_directory_are_never_followed_and_held_directories_are_left() {
    let s = start(|c| {
        c.zones
            .entry("untrusted".into())
            .or_default()
            .jobs_per_worker = 1;
    })
    .await;
    let token = s.token("acme", &["hello:run"]).await;
    let work = s.service.work_dir().to_owned();
    let zone = work.join("zones").join("untrusted");
    assert!(zone.is_dir());
    let other = tempfile::tempdir().unwrap();
    // What the links lead to: made to look like a zone's directory, its
    // workers' directories included.
    let victim = other.path().join("victim");
    for name in ["w1", "w2", "w3", "w4", "w5", "w6", "w7", "w8"] {
        std::fs::create_dir_all(victim.join(name)).unwrap();
        std::fs::write(victim.join(name).join("keep"), b"not the service's").unwrap();
    }
    let before = walk(&victim);
    // Another process's held directory, in the work directory and in the
    // zone's.
    let held = [
        HeldElsewhere::new(&work.join("data")),
        HeldElsewhere::new(&zone.join("nested/deeper/data")),
    ];
    std::fs::rename(&zone, work.join("zones").join("real")).unwrap();
    std::os::unix::fs::symlink(&victim, &zone).unwrap();
    // Fresh workers for each job: their directories made, the last ones
    // removed.
    for _ in 0..3 {
        let done = json(
            s.http
                .post(s.url("/v1/modules/hello/jobs?wait=20s"))
                .bearer_auth(&token),
        )
        .await;
        assert_eq!(done["state"], "succeeded", "{done:#}");
    }
    assert_eq!(
        walk(&victim),
        before,
        "a worker's directory went through the link"
    );
    std::fs::remove_file(&zone).unwrap();
    // Beside it (the work directory may be on another file system).
    let moved = work.with_extension("moved");
    std::fs::rename(&work, &moved).unwrap();
    std::os::unix::fs::symlink(&victim, &work).unwrap();
    s.service.shutdown().await;
    assert_eq!(
        walk(&victim),
        before,
        "shutdown emptied what the link leads to"
    );
    for data in ["data", "zones/real/nested/deeper/data"] {
        assert_eq!(
            std::fs::read(moved.join(data).join("keys/signing")).unwrap(),
            b"a key",
            "{data}"
        );
    }
    std::fs::remove_file(&work).unwrap();
    drop(held);
    // (Its lock may still be held a moment by a worker another test's
    // service is forking: not removed through `remove_tree`.)
    std::fs::remove_dir_all(&moved).unwrap();
}

/// Guests in the service's own process make their job directories in
/// the work directory it locked, not in what a link later put at its
/// path leads to.
#[tokio::test(flavor = "multi_thread")]
async fn in_process_jobs_are_made_in_the_work_directory_held_not_at_its_path() {
    let s = start(|c| c.isolation.mode = bulkhead::config::IsolationMode::InProcess).await;
    let token = s.token("acme", &["hello:run"]).await;
    let work = s.service.work_dir().to_owned();
    let victim = tempfile::tempdir().unwrap();
    let moved = work.with_extension("moved");
    std::fs::rename(&work, &moved).unwrap();
    std::os::unix::fs::symlink(victim.path(), &work).unwrap();
    let done = json(
        s.http
            .post(s.url("/v1/modules/hello/jobs?wait=20s"))
            .bearer_auth(&token)
            .header("content-type", "application/octet-stream")
            .body("its stdin"),
    )
    .await;
    assert_eq!(done["state"], "succeeded", "{done:#}");
    assert_eq!(walk(victim.path()), Vec::<std::path::PathBuf>::new());
    std::fs::remove_file(&work).unwrap();
    std::fs::rename(&moved, &work).unwrap();

    // The shared empty input directory replaced by a link to a directory
    // that looks like one: the next job without inputs is refused `/in`,
    // not given the other directory.
    let shared = work.join(".empty-in");
    assert!(shared.is_dir());
    let looks_like = victim.path().join("looks-like");
    std::fs::create_dir(&looks_like).unwrap();
    std::fs::set_permissions(
        &looks_like,
        std::os::unix::fs::PermissionsExt::from_mode(0o500),
    )
    .unwrap();
    std::fs::rename(&shared, work.with_extension("empty-in")).unwrap();
    std::os::unix::fs::symlink(&looks_like, &shared).unwrap();
    let done = json(
        s.http
            .post(s.url("/v1/modules/hello/jobs?wait=20s"))
            .bearer_auth(&token),
    )
    .await;
    // (What was in the way is the operator's to read, in the log.)
    assert_eq!(done["state"], "failed", "{done:#}");
    assert_eq!(done["report"]["failure"]["kind"], "host", "{done:#}");
    std::fs::remove_file(&shared).unwrap();
    std::fs::rename(work.with_extension("empty-in"), &shared).unwrap();
}

/// A service whose jobs directory holds another service's work directory
/// (configured there by mistake) leaves it be: its orphan sweep does not
/// remove a directory another process holds, and that service still runs
/// jobs.
#[tokio::test(flavor = "multi_thread")]
async fn the_orphan_sweep_leaves_a_directory_another_service_holds() {
    let shared = tempfile::tempdir().unwrap();
    let data = shared.path().join("data");
    let job_like = data
        .join("jobs")
        .join("0badc0de-0000-4000-8000-00000000000a");
    let work = job_like.join("work");
    // Nor is anything not named as a job names its directory.
    let stranger = data.join("jobs").join("not-a-job");
    std::fs::create_dir_all(stranger.join("inside")).unwrap();
    let s = start(|c| c.storage.work_dir = Some(work.clone())).await;
    let mut config = s.service.config().clone();
    config.storage.data_dir = data.clone();
    config.storage.work_dir = None;
    let other = bulkhead::service::Service::start(config, None)
        .await
        .unwrap();
    assert_eq!(other.remove_orphans(Duration::ZERO).await, 0);
    assert!(
        work.join("bulkhead.lock").exists(),
        "the work directory was removed"
    );
    // A data directory around another's (elsewhere than in its jobs
    // directory) is refused before it sweeps anything.
    let mut around = other.config().clone();
    around.storage.data_dir = shared.path().to_owned();
    around.storage.work_dir = Some(shared.path().join("elsewhere"));
    let err = bulkhead::service::Service::start(around, None)
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("held by another bulkhead process"), "{err}");
    assert!(data.join("bulkhead.sqlite").exists());
    // Nor one whose jobs directory is a link to another's directory.
    let linked = shared.path().join("linked");
    std::fs::create_dir(&linked).unwrap();
    std::os::unix::fs::symlink(&data, linked.join("jobs")).unwrap();
    let mut around = other.config().clone();
    around.storage.data_dir = linked;
    around.storage.work_dir = Some(shared.path().join("elsewhere"));
    let err = bulkhead::service::Service::start(around, None)
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a directory of its own"), "{err}");
    assert!(data.join("bulkhead.sqlite").exists());
    let token = s.token("acme", &["hello:run"]).await;
    let job = json(s.post("/v1/modules/hello/jobs?wait=20s", &token)).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    other.shutdown().await;
    // A directory no one holds is an orphan as ever.
    s.service.shutdown().await;
    let again = {
        let mut config = other.config().clone();
        config.storage.work_dir = None;
        bulkhead::service::Service::start(config, None)
            .await
            .unwrap()
    };
    assert!(!job_like.exists());
    assert!(stranger.join("inside").exists());
    again.shutdown().await;
}

/// A configured work directory is held like the data directory: a service
/// of another data directory naming the same one stops before it empties
/// it under the first one's running job, and one holding the data or cache
/// directory (which a start would empty) is refused.
#[tokio::test(flavor = "multi_thread")]
async fn a_work_directory_in_use_or_holding_the_data_is_refused_before_it_is_touched() {
    let shared = tempfile::tempdir().unwrap();
    let work = shared.path().join("work");
    let s = start(|c| {
        c.storage.work_dir = Some(work.clone());
        c.server.shutdown_grace = "200 ms".parse().unwrap();
        crate::common::sleeper(60_000).write_to(&c.modules.policies_dir);
    })
    .await;
    let id = submit_until_running(&s).await;
    let entries = || {
        s.job_roots()
            .iter()
            .flat_map(|r| walk(r))
            .collect::<Vec<_>>()
    };
    let store = std::sync::Arc::clone(s.service.store());
    let state = || async { store.get_job("acme", &id).await.unwrap().unwrap() };
    // Its worker has made the job's directories.
    let made = || {
        entries()
            .iter()
            .any(|p| p.extension().is_some_and(|e| e == "out"))
    };
    for _ in 0..300 {
        if made() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(made(), "{:?}", entries());
    let before = entries();

    let other = tempfile::tempdir().unwrap();
    let mut config = s.service.config().clone();
    config.storage.data_dir = other.path().join("data");
    // The same directory, spelled otherwise or through a symlink; its
    // parent (whose emptying would take it); a directory inside it (which
    // its emptying would take).
    let link = other.path().join("link");
    std::os::unix::fs::symlink(&work, &link).unwrap();
    for (dir, refusal) in [
        (work.clone(), "in use by another bulkhead process"),
        (work.join("zones/.."), "in use by another bulkhead process"),
        (link, "in use by another bulkhead process"),
        (shared.path().to_owned(), "held by another bulkhead process"),
        (work.join("inner"), "held by another bulkhead process"),
    ] {
        config.storage.work_dir = Some(dir.clone());
        let err = bulkhead::service::Service::start(config.clone(), None)
            .await
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains(refusal), "{}: {err}", dir.display());
        assert_eq!(
            entries(),
            before,
            "a second start on {} touched the work directory",
            dir.display()
        );
    }
    assert_eq!(state().await.state.as_str(), "running");
    // A data directory inside the work directory, which its service's
    // shutdown would empty: refused before it is created.
    let mut inside = config.clone();
    inside.storage.data_dir = work.join("data");
    inside.storage.work_dir = Some(other.path().join("work"));
    let err = bulkhead::service::Service::start(inside, None)
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("held by another bulkhead process"), "{err}");
    assert_eq!(entries(), before, "the data directory was made");

    // A work directory that holds the data directory, or the cache.
    config.storage.work_dir = Some(other.path().to_owned());
    let err = bulkhead::service::Service::start(config.clone(), None)
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("holds the data directory"), "{err}");
    let third = tempfile::tempdir().unwrap();
    config.storage.data_dir = third.path().join("data");
    config.storage.cache_dir = Some(other.path().join("cache"));
    let err = bulkhead::service::Service::start(config, None)
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("holds the cache directory"), "{err}");
    s.service.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sync_job_on_the_fast_path_is_stored_finished_and_audited() {
    // hello's wall-time limit (10 s) ends before the 20 s wait and the
    // service is idle: the job runs in the request's task and is written
    // once, finished.
    let s = start(|_| {}).await;
    let token = s.token("acme", &["hello:run"]).await;
    let resp = s
        .post("/v1/modules/hello/jobs?wait=20s", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let job: Value = resp.json().await.unwrap();
    let id = job["id"].as_str().unwrap();
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["attempts"], 1, "{job:#}");

    // Durable: the store has it, finished, for a later GET and the list.
    let stored = s
        .service
        .store()
        .get_job("acme", id)
        .await
        .unwrap()
        .expect("stored");
    assert_eq!(stored.state.as_str(), "succeeded");
    assert!(stored.report.is_some() && stored.finished_at.is_some());
    let list: Value = json(s.get("/v1/jobs", &token)).await;
    assert!(list.to_string().contains(id), "{list:#}");
    // Audited once, like a queued job.
    let audit = s.service.store().audit(50).await.unwrap();
    let finished: Vec<_> = audit
        .iter()
        .filter(|e| e.action == "job.finished" && e.job_id.as_deref() == Some(id))
        .collect();
    assert_eq!(finished.len(), 1, "{audit:#?}");
    assert_eq!(finished[0].outcome.as_deref(), Some("succeeded"));
    assert_eq!(finished[0].tenant.as_deref(), Some("acme"));

    // A wait shorter than the job's wall-time limit takes the queued path
    // and still answers 200.
    let resp = s
        .post("/v1/modules/hello/jobs?wait=5s", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_waited_for_job_takes_its_turn_and_a_request_that_goes_away_frees_its_slot() {
    // One slot. A queued sleeper takes it; a waited-for job behind it waits
    // its turn in memory and still answers 200 once it has run.
    let s = start(|c| c.queue.workers = 1).await;
    let token = s.token("acme", &["hello:run", "hostile:run"]).await;
    let sleeper = json(
        s.http
            .post(s.url("/v1/modules/hostile/jobs"))
            .bearer_auth(&token),
    )
    .await;
    let sleeper_id = sleeper["id"].as_str().unwrap().to_owned();
    let sync_hello = || s.post("/v1/modules/hello/jobs?wait=20s", &token).send();
    let resp = sync_hello().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let hello: Value = resp.json().await.unwrap();
    assert_eq!(hello["state"], "succeeded", "{hello:#}");
    let sleeper = s
        .service
        .store()
        .get_job("acme", &sleeper_id)
        .await
        .unwrap()
        .unwrap();
    let stored_hello = s
        .service
        .store()
        .get_job("acme", hello["id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert!(
        stored_hello.started_at >= sleeper.finished_at,
        "the waited-for job ran after the queued one it was behind: {sleeper:?} {stored_hello:?}"
    );

    // A waited-for sleeper runs at once in the free slot; its client gives
    // up while it runs. The slot must come back: with it lost, the next
    // job could never start and would answer 202 after its wait.
    let gave_up = s
        .post("/v1/modules/hostile/jobs?wait=20s", &token)
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gave_up.unwrap_err().is_timeout());
    let resp = sync_hello().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let hello: Value = resp.json().await.unwrap();
    assert_eq!(hello["state"], "succeeded", "{hello:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_far_over_the_limit_gets_its_413_answer_not_a_reset() {
    let s = start(|c| c.server.max_body = "1 MiB".parse().unwrap()).await;
    let token = s.token("acme", &["thumbnail:run"]).await;
    for (what, body) in [
        ("32 times the limit", vec![7u8; 32 << 20]),
        ("just over it", vec![7u8; (1 << 20) + 1]),
    ] {
        let resp = s
            .post("/v1/modules/thumbnail/jobs", &token)
            .header("content-type", "image/png")
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("{what}: no answer: {e:?}"));
        assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE, "{what}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["code"], "too_large", "{what}: {body:#}");
    }
    // Nothing was accepted.
    let list: Value = json(s.get("/v1/jobs", &token)).await;
    assert_eq!(list.as_array().map(Vec::len), Some(0), "{list:#}");
}

/// Answers of jobs with large reports hold memory until their clients have
/// read them: each tenant may hold a quarter of `max_buffered_answers`, and
/// one past its share is refused (429, `Retry-After`) until an answer it
/// holds is read, while other tenants and light jobs are answered.
#[tokio::test(flavor = "multi_thread")]
async fn large_reports_being_answered_hold_at_most_a_tenants_share_of_memory() {
    // A tenant's share is 64 MiB: the longest report answered is 16 MiB.
    let s = start(|c| c.server.max_buffered_answers = "256 MiB".parse().unwrap()).await;
    let store = s.service.store();
    let now = bulkhead::store::now_ms();
    // A report of 15 MiB: more than loopback's socket buffers take, so an
    // answer is held while its client does not read.
    let heavy = |tenant: &str| {
        let id = crate::common::uuid_like();
        let mut report = bulkhead::sandbox::JobReport::not_run(&id, "hello", "stored by the test");
        report.stdout.text = "x".repeat(15 << 20);
        (crate::common::finished_record(&id, tenant, now), report)
    };
    let mut ids = Vec::new();
    for (i, tenant) in ["acme", "acme", "other"].into_iter().enumerate() {
        let (record, mut report) = heavy(tenant);
        // The second also has an output, and was submitted with a key.
        let key = (i == 1).then(|| bulkhead::store::Idempotency {
            key: "k1".into(),
            request_sha256: "another request".into(),
            since: 0,
        });
        if i == 1 {
            let out = s
                .service
                .config()
                .storage
                .data_dir
                .join("jobs")
                .join(&record.id)
                .join("outputs");
            std::fs::create_dir_all(&out).unwrap();
            std::fs::write(out.join("a.txt"), b"a").unwrap();
            report.outputs.push(bulkhead::job::OutputFile {
                name: "a.txt".into(),
                size: 1,
                sha256: String::new(),
            });
        }
        store
            .insert_finished_job(&record, &report, now, key.as_ref())
            .await
            .unwrap();
        ids.push(record.id);
    }
    let light = crate::common::finished_record(&crate::common::uuid_like(), "acme", now);
    let light_report = bulkhead::sandbox::JobReport::not_run(&light.id, "hello", "light");
    store
        .insert_finished_job(&light, &light_report, now, None)
        .await
        .unwrap();
    let acme = s.token("acme", &["hello:run"]).await;
    let other = s.token("other", &["hello:run"]).await;

    // Headers come back; the body is left unread.
    let held = s
        .get(&format!("/v1/jobs/{}", ids[0]), &acme)
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), StatusCode::OK);
    // Its job again, another, an output of another, a submission whose
    // key names another: each is refused before the report is read.
    let keyed = || {
        s.post("/v1/modules/hello/jobs", &acme)
            .header("idempotency-key", "k1")
    };
    for request in [
        s.get(&format!("/v1/jobs/{}", ids[0]), &acme),
        s.get(&format!("/v1/jobs/{}", ids[1]), &acme),
        s.get(&format!("/v1/jobs/{}/outputs/a.txt", ids[1]), &acme),
        keyed(),
    ] {
        let refused = request.send().await.unwrap();
        assert!(refused.headers().contains_key("retry-after"));
        assert_eq!(
            error_code(refused).await,
            (
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_requests".to_owned()
            )
        );
    }
    let light_answer = s
        .get(&format!("/v1/jobs/{}", light.id), &acme)
        .send()
        .await
        .unwrap();
    assert_eq!(
        light_answer.status(),
        StatusCode::OK,
        "a light answer fits what is left of the share"
    );
    let others = json(s.get(&format!("/v1/jobs/{}", ids[2]), &other)).await;
    assert_eq!(
        others["report"]["stdout"]["text"].as_str().unwrap().len(),
        15 << 20
    );

    // Once the held answer is read, the tenant's share is free again.
    let body = held.bytes().await.unwrap();
    assert!(body.len() > 15 << 20);
    let mut answered = None;
    for _ in 0..100 {
        let resp = s
            .get(&format!("/v1/jobs/{}", ids[1]), &acme)
            .send()
            .await
            .unwrap();
        let status = resp.status();
        // Read whole: the answer's reservation is back before its last
        // bytes arrive.
        resp.bytes().await.unwrap();
        if status != StatusCode::TOO_MANY_REQUESTS {
            answered = Some(status);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(answered, Some(StatusCode::OK));
    assert_eq!(s.output(&acme, &ids[1], "a.txt").await.as_ref(), b"a");
    // Past the budget, the key is checked: it names another request.
    assert_eq!(
        error_code(keyed().send().await.unwrap()).await.0,
        StatusCode::CONFLICT
    );
}

/// The hostile guest writing `outputs` small files (`disk-many`), under a
/// policy that keeps them all.
fn many_outputs(outputs: u32) -> crate::common::TestPolicy {
    crate::common::policy(bulkhead_tests::HOSTILE, "hostile")
        .scopes(&["hostile:run"])
        .args(&["disk-many"])
        .limits(|l| l.output_files = outputs)
}

/// A light answer (a report under 256 KiB, encoded whole) counts against
/// the budget too: with its tenant's share nearly held by a heavy answer
/// its client does not read, a light one that would pass it is refused,
/// another tenant's is answered, and it is answered once the share is free.
#[tokio::test(flavor = "multi_thread")]
async fn a_light_answer_counts_against_its_tenants_share() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A share of 4 MiB, the longest report 1 MiB. The heavy report below
    // reserves all but about 110 KB of it; the light one (40 KB, its bound
    // of six bytes a byte of text under 256 KiB) would reserve 160 KB.
    let s = start(|c| c.server.max_buffered_answers = "16 MiB".parse().unwrap()).await;
    let mut ids = Vec::new();
    for (tenant, len) in [("acme", 1_020_000), ("acme", 40_000), ("other", 40_000)] {
        ids.push(s.store_finished(tenant, "hello", len).await);
    }
    let acme = s.token("acme", &["hello:run"]).await;
    let other = s.token("other", &["hello:run"]).await;
    // The heavy answer's client takes its status line through a 4 KiB
    // window, then reads nothing more: the body stays in the process.
    let addr: std::net::SocketAddr = s.base.trim_start_matches("http://").parse().unwrap();
    let mut stalled = crate::common::small_window_client(addr).await;
    let request = format!(
        "GET /v1/jobs/{} HTTP/1.1\r\nhost: bulkhead\r\nauthorization: Bearer {acme}\r\n\r\n",
        ids[0]
    );
    stalled.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    stalled.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");

    let light = || s.get(&format!("/v1/jobs/{}", ids[1]), &acme);
    let refused = light().send().await.unwrap();
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(
        error_code(refused).await,
        (
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_requests".to_owned()
        ),
        "a light answer past the share"
    );
    let others = s
        .get(&format!("/v1/jobs/{}", ids[2]), &other)
        .send()
        .await
        .unwrap();
    assert_eq!(
        others.status(),
        StatusCode::OK,
        "another tenant is answered"
    );
    drop(stalled);
    let mut answered = None;
    for _ in 0..100 {
        let resp = light().send().await.unwrap();
        if resp.status() != StatusCode::TOO_MANY_REQUESTS {
            answered = Some(resp.status());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(answered, Some(StatusCode::OK), "the share is free again");
}

/// A submission's own answer counts against the answers' budget too: an
/// unkeyed `?wait=` whose job ends with a large report while its tenant's
/// share is held is sent to the job (303, the job without its report),
/// which a GET reads once the share is free.
#[tokio::test(flavor = "multi_thread")]
async fn a_waited_for_job_with_a_large_report_past_the_share_is_sent_to_its_url() {
    // A share of 16 MiB: the held answer below reserves 14 MiB of it.
    // Its client reads nothing while the job runs, which may take longer
    // than the minimum write rate's grace on a busy machine: that rate,
    // which would close the held connection and free the share, is off.
    let s = start(|c| {
        c.server.max_buffered_answers = "64 MiB".parse().unwrap();
        c.server.min_write_rate = "0 B".parse().unwrap();
        many_outputs(20_000).write_to(&c.modules.policies_dir);
    })
    .await;
    let id = s.store_finished("acme", "hostile", 3_500_000).await;
    let token = s.token("acme", &["hostile:run"]).await;
    // Headers come back; the body is left unread.
    let held = s
        .get(&format!("/v1/jobs/{id}"), &token)
        .send()
        .await
        .unwrap();
    assert_eq!(held.status(), StatusCode::OK);

    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let sent = http
        .post(s.url("/v1/modules/hostile/jobs?wait=60s"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(sent.status(), StatusCode::SEE_OTHER);
    let location = sent.headers()["location"].to_str().unwrap().to_owned();
    assert!(sent.headers().contains_key("retry-after"));
    let view: Value = sent.json().await.unwrap();
    assert_eq!(
        location,
        format!("/v1/jobs/{}", view["id"].as_str().unwrap())
    );
    assert!(view["report"].is_null(), "{view:#}");
    assert_eq!(view["state"], "failed", "{view:#}");

    // Once the held answer is read, the job is.
    held.bytes().await.unwrap();
    let mut answered = None;
    for _ in 0..100 {
        let resp = s.get(&location, &token).send().await.unwrap();
        if resp.status() != StatusCode::TOO_MANY_REQUESTS {
            answered = Some(resp.json::<Value>().await.unwrap());
            break;
        }
        resp.bytes().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let job = answered.expect("the job was never answered");
    assert_eq!(
        job["report"]["outputs"].as_array().map(Vec::len),
        Some(20_000)
    );
}

/// No report is stored that could not be answered within a tenant's share
/// of `max_buffered_answers`: a job whose outputs would list more keeps
/// none of them (its job directory holds no copy) and says why; a report
/// stored longer all the same (under a larger budget) is refused for good,
/// 507, and takes none of the budget.
#[tokio::test(flavor = "multi_thread")]
async fn a_report_longer_than_a_share_can_answer_is_never_stored_nor_answered() {
    // A share of 4 MiB: the longest report answered is 1 MiB, half of
    // what 20,000 listed outputs take.
    let s = start(|c| {
        c.server.max_buffered_answers = "16 MiB".parse().unwrap();
        many_outputs(20_000).write_to(&c.modules.policies_dir);
    })
    .await;
    let token = s.token("acme", &["hostile:run"]).await;
    let resp = s
        .post("/v1/modules/hostile/jobs", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let job = s.finished(&token, &id).await;
    assert_eq!(job["state"], "failed", "{job:#}");
    let report = &job["report"];
    assert_eq!(report["outputs"].as_array().map(Vec::len), Some(0));
    let message = report["failure"]["message"].as_str().unwrap();
    assert!(
        message.contains("more than this service answers") && message.contains("not kept"),
        "{message}"
    );
    let len = s
        .service
        .store()
        .report_len("acme", bulkhead::store::ReportOf::Id(&id))
        .await
        .unwrap()
        .unwrap();
    assert!(len <= 1 << 20, "stored {len} bytes");
    let kept = s
        .service
        .config()
        .storage
        .data_dir
        .join("jobs")
        .join(&id)
        .join("outputs");
    assert!(!kept.exists(), "{} was kept", kept.display());
    let output = s
        .get(&format!("/v1/jobs/{id}/outputs/f0"), &token)
        .send()
        .await
        .unwrap();
    assert_eq!(output.status(), StatusCode::NOT_FOUND);

    // One stored longer (by a node with a larger budget) is refused, and
    // the tenant's next heavy answer still has its whole share.
    let mut ids = Vec::new();
    for bytes in [1100 << 10, 1000 << 10] {
        ids.push(s.store_finished("acme", "hostile", bytes).await);
    }
    for _ in 0..3 {
        let refused = s
            .get(&format!("/v1/jobs/{}", ids[0]), &token)
            .send()
            .await
            .unwrap();
        assert!(!refused.headers().contains_key("retry-after"));
        let (status, code) = error_code(refused).await;
        assert_eq!((status.as_u16(), code.as_str()), (507, "report_too_large"));
    }
    let answered = json(s.get(&format!("/v1/jobs/{}", ids[1]), &token)).await;
    assert_eq!(
        answered["report"]["stdout"]["text"].as_str().map(str::len),
        Some(1000 << 10)
    );
}

/// Submits a `hostile` job for `acme` and waits until the store shows it
/// running; its id.
async fn submit_until_running(s: &crate::common::Server) -> String {
    submit_with_stdin_until_running(s, "").await
}

/// [`submit_until_running`], with `stdin` as the job's standard input
/// (none when empty).
async fn submit_with_stdin_until_running(s: &crate::common::Server, stdin: &'static str) -> String {
    let token = s.token("acme", &["hostile:run"]).await;
    let mut post = s.post("/v1/modules/hostile/jobs", &token);
    if !stdin.is_empty() {
        post = post
            .header("content-type", "application/octet-stream")
            .body(stdin);
    }
    let resp = post.send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let store = s.service.store();
    for _ in 0..300 {
        if store
            .get_job("acme", &id)
            .await
            .unwrap()
            .unwrap()
            .state
            .as_str()
            == "running"
        {
            return id;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("job {id} never ran");
}

/// A directory made to look like a running service's data directory: a
/// signing key in it, and its `bulkhead.lock` held by another process
/// (`flock(1)`, killed when this is dropped).
struct HeldElsewhere(std::process::Child);

impl HeldElsewhere {
    fn new(dir: &std::path::Path) -> Self {
        std::fs::create_dir_all(dir.join("keys")).unwrap();
        std::fs::write(dir.join("keys").join("signing"), b"a key").unwrap();
        let lock = dir.join("bulkhead.lock");
        std::fs::write(&lock, b"").unwrap();
        let holder = Self(
            std::process::Command::new("flock")
                .args(["--no-fork", "--exclusive"])
                .arg(&lock)
                .args(["sleep", "600"])
                .spawn()
                .expect("flock(1) runs"),
        );
        let opened = std::fs::File::open(&lock).unwrap();
        for _ in 0..500 {
            if bulkhead::sandbox::held(&opened, "bulkhead.lock").unwrap() {
                return holder;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("flock(1) never took {}", lock.display());
    }
}

impl Drop for HeldElsewhere {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every path beneath `dir`, sorted.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_owned()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(path.clone());
            }
            found.push(path);
        }
    }
    found.sort();
    found
}

/// What else grows a job's own file in `/out` past the policy's bound
/// while the guest runs (native code in a worker; here the test, making
/// the guest's file a sparse petabyte) is not read to its end: the
/// collection stops at the bound and the job fails on its output, at once,
/// not at its wall time; nothing of it is stored.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_file_grown_past_the_bound_by_something_else_is_not_read_to_its_end() {
    for in_process in [false, true] {
        let s = start(|c| {
            if in_process {
                c.isolation.mode = bulkhead::config::IsolationMode::InProcess;
            }
            crate::common::policy(bulkhead_tests::HOSTILE, "hostile")
                .scopes(&["hostile:run"])
                .times(
                    bulkhead::policy::HumanDuration::millis(120_000),
                    bulkhead::policy::HumanDuration::millis(120_000),
                )
                .args(&["out-wait"])
                .write_to(&c.modules.policies_dir);
        })
        .await;
        let id = submit_until_running(&s).await;
        let mut own = None;
        for _ in 0..300 {
            own = s
                .job_roots()
                .iter()
                .flat_map(|r| walk(r))
                .find(|p| p.ends_with("own.txt"));
            if own.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let own = own.expect("the guest never wrote /out/own.txt");
        std::fs::OpenOptions::new()
            .write(true)
            .open(&own)
            .unwrap()
            .set_len(1 << 50)
            .unwrap();
        std::fs::write(own.parent().unwrap().join("go"), b"").unwrap();
        let token = s.token("acme", &["hostile:run"]).await;
        let mut job = Value::Null;
        for _ in 0..600 {
            job = json(s.get(&format!("/v1/jobs/{id}"), &token)).await;
            if job["state"] != "running" && job["state"] != "queued" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mode = if in_process { "in-process" } else { "workers" };
        assert_eq!(job["state"], "failed", "{mode}: {job:#}");
        assert_eq!(
            job["report"]["failure"]["kind"], "output",
            "{mode}: {job:#}"
        );
        assert_eq!(job["outputs"], serde_json::json!([]), "{mode}: {job:#}");
    }
}

/// Only files a job created are its outputs. While its guest runs, someone
/// who can write the work directory moves a file into its `/out`, hard
/// links another file in and removes that file's other name (as the end of
/// another job removes its inputs), moves in a directory with a file, and
/// moves a file to the name the guest writes next. None of them is stored
/// or served: each is skipped as `not-created`, in worker processes and
/// in-process alike; the guest's own file is the job's one output. The
/// guest's write to the name another's file took is refused, and that
/// file keeps its bytes (else a file another job created, moved in and back
/// out, would carry this job's bytes to that job's outputs). Nor can the
/// guest read any of them: its reads are held to its inputs and the files
/// it created.
#[tokio::test(flavor = "multi_thread")]
async fn only_files_a_job_created_are_stored_and_served() {
    for in_process in [false, true] {
        let s = start(|c| {
            if in_process {
                c.isolation.mode = bulkhead::config::IsolationMode::InProcess;
            }
            crate::common::policy(bulkhead_tests::HOSTILE, "hostile")
                .scopes(&["hostile:run"])
                .times(
                    bulkhead::policy::HumanDuration::millis(60_000),
                    bulkhead::policy::HumanDuration::millis(60_000),
                )
                .args(&["out-wait"])
                .write_to(&c.modules.policies_dir);
        })
        .await;
        let id = submit_until_running(&s).await;
        // The job's `/out`, once its guest has written its own file.
        let mut out = None;
        for _ in 0..300 {
            out = s
                .job_roots()
                .iter()
                .flat_map(|r| walk(r))
                .find(|p| p.ends_with("own.txt"))
                .and_then(|p| p.parent().map(ToOwned::to_owned));
            if out.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let out = out.expect("the guest never wrote /out/own.txt");
        // Beside the job's directories: the same file system.
        let work = out.parent().unwrap().to_owned();
        let secret = b"another tenant's bytes";
        let linked_from = work.join("other-input");
        std::fs::write(&linked_from, secret).unwrap();
        std::fs::hard_link(&linked_from, out.join("linked")).unwrap();
        std::fs::remove_file(&linked_from).unwrap();
        std::fs::write(work.join("moved-in"), secret).unwrap();
        std::fs::rename(work.join("moved-in"), out.join("moved")).unwrap();
        std::fs::create_dir(work.join("dir-in")).unwrap();
        std::fs::write(work.join("dir-in/f"), secret).unwrap();
        std::fs::rename(work.join("dir-in"), out.join("movedir")).unwrap();
        // Someone else's file (another job's own, say) at the name the guest
        // writes next: the guest's write must neither change it nor take it.
        let theirs = b"another job's own file";
        std::fs::write(work.join("theirs"), theirs).unwrap();
        let planted = std::fs::File::open(work.join("theirs")).unwrap();
        std::fs::rename(work.join("theirs"), out.join("late.txt")).unwrap();
        // A FIFO: its open would block the guest's thread until a writer
        // came, past the job's clocks.
        let fifo =
            std::ffi::CString::new(out.join("pipe").into_os_string().into_encoded_bytes()).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        std::fs::write(out.join("go"), b"").unwrap();

        let token = s.token("acme", &["hostile:run"]).await;
        let mut job = Value::Null;
        for _ in 0..300 {
            job = json(s.get(&format!("/v1/jobs/{id}"), &token)).await;
            if job["state"] != "running" && job["state"] != "queued" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mode = if in_process { "in-process" } else { "workers" };
        assert_eq!(job["state"], "succeeded", "{mode}: {job:#}");
        let names: Vec<&str> = job["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["own.txt"], "{mode}: {job:#}");
        // Nor could the guest read what was put there: not one byte of it
        // reached its stdout, which its tenant is served.
        let stdout = job["report"]["stdout"]["text"].as_str().unwrap_or_default();
        for bytes in [&secret[..], &theirs[..]] {
            let text = std::str::from_utf8(bytes).unwrap();
            assert!(!stdout.contains(text), "{mode}: {stdout}");
        }
        for name in ["linked", "moved", "movedir/f", "late.txt", "pipe"] {
            let refused = format!("out-wait cannot read /out/{name}: PermissionDenied");
            assert!(stdout.contains(&refused), "{mode}: {stdout}");
        }
        let mut skipped: Vec<(&str, &str)> = job["report"]["skipped_outputs"]
            .as_array()
            .unwrap_or_else(|| panic!("{mode}: {job:#}"))
            .iter()
            .map(|o| (o["name"].as_str().unwrap(), o["reason"].as_str().unwrap()))
            .collect();
        skipped.sort();
        assert_eq!(
            skipped,
            [
                ("go", "not-created"),
                ("late.txt", "not-created"),
                ("linked", "not-created"),
                ("moved", "not-created"),
                ("movedir/f", "not-created"),
                ("pipe", "fifo"),
            ],
            "{mode}"
        );
        for name in ["linked", "moved", "movedir/f"] {
            let resp = s
                .get(&format!("/v1/jobs/{id}/outputs/{name}"), &token)
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::NOT_FOUND, "{mode}: {name}");
        }
        // The guest's create of `late.txt` found a file the job did not
        // create there and was refused: not a byte of it changed.
        assert_eq!(
            std::io::Read::bytes(&planted)
                .collect::<Result<Vec<u8>, _>>()
                .unwrap(),
            theirs,
            "{mode}: the guest wrote into a file it did not create"
        );
        // Nothing of theirs was stored either.
        let stored = s.service.config().storage.data_dir.join("jobs").join(&id);
        for path in walk(&stored) {
            if path.is_file() {
                let stored = std::fs::read(&path).unwrap();
                assert!(
                    stored != secret && stored != theirs,
                    "{mode}: {}",
                    path.display()
                );
            }
        }
        s.service.shutdown().await;
    }
}

/// An open never waits on a FIFO, however it gets to the name: while the
/// guest opens `/out/x` again and again, someone who can write the work
/// directory renames a regular file and a FIFO over `x` in turn, so a look
/// at the name before the open is always a step behind. An open that met
/// the FIFO would wait for a writer that cannot come (the FIFO has no
/// name left once the next rename takes it), past every clock of the
/// job's. The job ends on its own, in worker processes and in-process,
/// and nothing at `x` is an output.
#[tokio::test(flavor = "multi_thread")]
async fn a_fifo_renamed_over_a_name_the_guest_opens_never_blocks_it() {
    fifo_race("open").await;
}

/// Setting the times of a name never opens what is there: the same race
/// as above, with the guest setting the times of `/out/x` (following
/// symlinks) instead of opening it. Neither the FIFO nor the regular file
/// someone else put at `x` is the job's, so the times of neither change.
#[tokio::test(flavor = "multi_thread")]
async fn a_fifo_renamed_over_a_name_the_guest_sets_times_of_never_blocks_it() {
    fifo_race("set-times").await;
}

/// The service (in worker processes, or in-process) running `hostile
/// open-race` with `args`, a job of it running, and its `/out` once the
/// guest wrote `own.txt` there.
async fn open_race_job(
    in_process: bool,
    args: &[&str],
) -> (crate::common::Server, String, std::path::PathBuf) {
    let s = start(|c| {
        if in_process {
            c.isolation.mode = bulkhead::config::IsolationMode::InProcess;
        }
        let mut all = vec!["open-race"];
        all.extend_from_slice(args);
        crate::common::policy(bulkhead_tests::HOSTILE, "hostile")
            .scopes(&["hostile:run"])
            .times(
                bulkhead::policy::HumanDuration::millis(120_000),
                bulkhead::policy::HumanDuration::millis(120_000),
            )
            .args(&all)
            .write_to(&c.modules.policies_dir);
    })
    .await;
    let id = submit_until_running(&s).await;
    for _ in 0..300 {
        let out = s
            .job_roots()
            .iter()
            .flat_map(|r| walk(r))
            .find(|p| p.ends_with("own.txt"))
            .and_then(|p| p.parent().map(ToOwned::to_owned));
        if let Some(out) = out {
            return (s, id, out);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the guest never wrote /out/own.txt");
}

/// A guest sets the times of its own directories and of its `/out`, and
/// of nothing else: a directory someone else put in its `/out` keeps its
/// times however often the guest tries, by name or through a descriptor
/// opened on it (found by attackers: any directory or symlink was let
/// through, and then any directory through its descriptor).
#[tokio::test(flavor = "multi_thread")]
async fn a_guest_sets_the_times_of_its_own_directories_only() {
    let long_ago = std::time::UNIX_EPOCH + Duration::from_secs(1_000_000);
    for in_process in [false, true] {
        let mode = if in_process { "in-process" } else { "workers" };
        let (s, id, out) = open_race_job(in_process, &["--op=set-times", "--name=theirs"]).await;
        let theirs = out.join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        // Owned as the guest's own files are, so only the sandbox says no.
        use std::os::unix::fs::MetadataExt as _;
        let owner = std::fs::metadata(&out).unwrap();
        std::os::unix::fs::chown(&theirs, Some(owner.uid()), Some(owner.gid())).unwrap();
        std::fs::File::open(&theirs)
            .unwrap()
            .set_modified(long_ago)
            .unwrap();
        std::fs::write(out.join("go"), b"").unwrap();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let kept = std::fs::metadata(&theirs).unwrap().modified().unwrap();
        std::fs::write(out.join("stop"), b"").unwrap();
        assert_eq!(
            kept, long_ago,
            "{mode}: the guest set a foreign directory's times"
        );
        let token = s.token("acme", &["hostile:run"]).await;
        let mut job = Value::Null;
        for _ in 0..600 {
            job = json(s.get(&format!("/v1/jobs/{id}"), &token)).await;
            if job["state"] != "running" && job["state"] != "queued" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(job["state"], "succeeded", "{mode}: {job:#}");
        let stdout = job["report"]["stdout"]["text"].as_str().unwrap_or_default();
        for expected in [
            "open-race: set-times own-dir: Ok(())",
            "open-race: set-times .: Ok(())",
            "open-race: set-times on a descriptor of own-dir: Ok(())",
            "open-race: set-times on a descriptor of .: Ok(())",
            "open-race: opened 0,",
        ] {
            assert!(stdout.contains(expected), "{mode}: {stdout}");
        }
        s.service.shutdown().await;
    }
}

/// [`a_fifo_renamed_over_a_name_the_guest_opens_never_blocks_it`] with the
/// guest doing `op` (`open-race --op=`) to `/out/x`.
async fn fifo_race(op: &str) {
    // The times of every regular file someone else puts at `x`.
    fn long_ago() -> std::time::SystemTime {
        std::time::UNIX_EPOCH + Duration::from_secs(1_000_000)
    }
    for in_process in [false, true] {
        let mode = if in_process { "in-process" } else { "workers" };
        let (s, id, out) = open_race_job(in_process, &[&format!("--op={op}")]).await;
        let work = out.parent().unwrap().to_owned();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let racer = {
            let (stop, work, out) = (stop.clone(), work.clone(), out.clone());
            std::thread::spawn(move || {
                let fifo = std::ffi::CString::new(
                    work.join("fifo-in").into_os_string().into_encoded_bytes(),
                )
                .unwrap();
                let (mut swaps, mut touched) = (0u64, 0u64);
                // Until told to stop, or until the job's directories are
                // gone.
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let swapped = std::fs::write(work.join("file-in"), b"not the job's")
                        .and_then(|()| {
                            std::fs::File::options()
                                .write(true)
                                .open(work.join("file-in"))?
                                .set_modified(long_ago())
                        })
                        .and_then(|()| std::fs::rename(work.join("file-in"), out.join("x")))
                        .and_then(|()| {
                            // Its times, just before the FIFO takes its name.
                            let theirs = std::fs::symlink_metadata(out.join("x"))?;
                            if theirs.is_file() && theirs.modified()? != long_ago() {
                                touched += 1;
                            }
                            // SAFETY: a NUL-terminated path.
                            if unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) } != 0 {
                                return Err(std::io::Error::last_os_error());
                            }
                            std::fs::rename(work.join("fifo-in"), out.join("x"))
                        });
                    if swapped.is_err() {
                        break;
                    }
                    swaps += 1;
                }
                (swaps, touched)
            })
        };
        std::fs::write(out.join("go"), b"").unwrap();
        tokio::time::sleep(Duration::from_secs(3)).await;
        std::fs::write(out.join("stop"), b"").unwrap();
        let token = s.token("acme", &["hostile:run"]).await;
        let mut job = Value::Null;
        for _ in 0..600 {
            job = json(s.get(&format!("/v1/jobs/{id}"), &token)).await;
            if job["state"] != "running" && job["state"] != "queued" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (swaps, touched) = racer.join().unwrap();
        assert!(swaps > 0, "{mode}");
        assert_eq!(
            touched, 0,
            "{mode}: the times of a file not the job's changed"
        );
        assert_eq!(job["state"], "succeeded", "{mode}: {job:#}");
        let stdout = job["report"]["stdout"]["text"].as_str().unwrap_or_default();
        assert!(stdout.contains("open-race: opened"), "{mode}: {stdout}");
        if op == "set-times" {
            assert!(stdout.contains("open-race: opened 0,"), "{mode}: {stdout}");
        }
        let names: Vec<&str> = job["outputs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["own.txt"], "{mode}: {job:#}");
        s.service.shutdown().await;
    }
}

/// The real `bulkhead serve` with `config`, its output discarded.
fn spawn_serve(config: &std::path::Path) -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead-under-test"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// A port free on loopback a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A config for the real `bulkhead serve` in `tmp`, on loopback ports
/// `api` and `admin`, serving the repository's `hello`, with `more`
/// appended: its path, and its data directory's.
fn serve_config(
    tmp: &std::path::Path,
    api: u16,
    admin: u16,
    more: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let policies = tmp.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::copy(
        repo.join("policies/hello.toml"),
        policies.join("hello.toml"),
    )
    .unwrap();
    let data = tmp.join("data");
    let config = tmp.join("bulkhead.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:{api}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n\
             [storage]\ndata_dir = \"{}\"\n\
             [modules]\npolicies_dir = \"{}\"\nmodules_dir = \"{}\"\n{more}",
            data.display(),
            policies.display(),
            bulkhead_tests::GUESTS_DIR
        ),
    )
    .unwrap();
    (config, data)
}

/// A start refused for its listeners (the admin address taken) takes the
/// workers it started down with it: once `bulkhead serve` has exited, none
/// of the processes it started is left, not even unreaped, and none of
/// their memory cgroups (found by an attacker: both workers of the zone
/// were left as zombies, their cgroups still charged, until the next
/// start).
#[tokio::test(flavor = "multi_thread")]
async fn serve_refused_for_a_taken_address_leaves_no_worker() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let admin = taken.local_addr().unwrap().port();
    let status = serve_leaves_no_worker(admin, false).await;
    drop(taken);
    assert!(
        !status.success(),
        "serve started with its admin address taken"
    );
}

/// A stop while the pool's first workers are starting (before they have
/// said hello) leaves none of them behind (found by an attacker: SIGTERM
/// 20–90 ms into a start left a worker unreaped and its cgroup, 6 runs of
/// 12).
#[tokio::test(flavor = "multi_thread")]
async fn serve_stopped_while_its_workers_start_leaves_no_worker() {
    let status = serve_leaves_no_worker(free_port(), true).await;
    assert!(status.success(), "{status}");
}

/// Runs the real `bulkhead serve` with `admin` as its admin port and a
/// zone with a memory ceiling (where cgroups are offered), sending it
/// SIGTERM as its first child appears where `stop` says so, until it
/// exits; then checks that none of the children seen while it ran is
/// left, not even unreaped, nor its memory or CPU cgroup. Its exit
/// status.
async fn serve_leaves_no_worker(admin: u16, stop: bool) -> std::process::ExitStatus {
    let tmp = tempfile::tempdir().unwrap();
    let cgroups = bulkhead::worker::cgroup::offered().is_ok();
    let zone = if cgroups {
        "[zones.untrusted]\nmemory = \"1 GiB\"\n"
    } else {
        ""
    };
    let (config, _) = serve_config(tmp.path(), free_port(), admin, zone);
    let mut serve = spawn_serve(&config);
    // Its children, as seen while it runs.
    let mut started = std::collections::BTreeSet::new();
    let mut stopped = !stop;
    let deadline = std::time::Instant::now() + Duration::from_secs(300);
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break status;
        }
        assert!(std::time::Instant::now() < deadline, "serve never exited");
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{}/task", serve.id())) {
            for task in tasks.flatten() {
                let children =
                    std::fs::read_to_string(task.path().join("children")).unwrap_or_default();
                started.extend(children.split_whitespace().map(str::to_owned));
            }
        }
        if !stopped && !started.is_empty() {
            // SAFETY: kill(2) on the pid of a child this test spawned and
            // has not reaped.
            unsafe { libc::kill(serve.id() as i32, libc::SIGTERM) };
            stopped = true;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    assert!(!started.is_empty(), "no worker was seen starting");
    let own = cgroups.then(|| {
        crate::common::memory_limit_file(std::process::id())
            .parent()
            .unwrap()
            .to_owned()
    });
    let own_cpu = bulkhead::worker::cgroup::cpu_offered()
        .is_ok()
        .then(|| crate::common::cpu_cgroup(&std::process::id().to_string()))
        .flatten();
    for pid in &started {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty(),
            "worker {pid} outlived its service ({status}): {stat}"
        );
        if let Some(own) = &own {
            let cgroup = own.join(format!("untrusted-{pid}"));
            assert!(!cgroup.exists(), "{} was left", cgroup.display());
        }
        if let Some(own) = &own_cpu {
            let cgroup = own.join(format!("untrusted-{pid}"));
            assert!(!cgroup.exists(), "{} was left", cgroup.display());
        }
    }
    status
}

/// `bulkhead serve` counts what its own start does: the metrics recorder
/// is there before the first worker starts, so the zone's workers (and the
/// one that compiles its module) are in `bulkhead_worker_starts_total`
/// from the first scrape (found by an attacker: a zone cache entry found
/// rewritten while the modules loaded was logged, but never counted).
#[tokio::test(flavor = "multi_thread")]
async fn serve_counts_the_workers_its_start_started() {
    let tmp = tempfile::tempdir().unwrap();
    let (api, admin) = (free_port(), free_port());
    let (config, data) = serve_config(tmp.path(), api, admin, "");
    let mut serve = spawn_serve(&config);
    let http = reqwest::Client::new();
    let mut ready = false;
    for _ in 0..1200 {
        if let Ok(r) = http
            .get(format!("http://127.0.0.1:{api}/readyz"))
            .send()
            .await
            && r.status() == StatusCode::OK
        {
            ready = true;
            break;
        }
        if let Ok(Some(status)) = serve.try_wait() {
            panic!("serve exited: {status}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = async {
        let token = std::fs::read_to_string(data.join("admin.token")).unwrap();
        http.get(format!("http://127.0.0.1:{admin}/metrics"))
            .bearer_auth(token.trim())
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let text = if ready { metrics.await } else { String::new() };
    let _ = serve.kill();
    let _ = serve.wait();
    assert!(ready, "serve was not ready");
    let started: f64 = text
        .lines()
        .filter(|l| l.starts_with("bulkhead_worker_starts_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    // The zone's two workers and the one that compiled hello.
    assert!(started >= 3.0, "{text}");
}
