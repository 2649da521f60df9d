//! A job's life when the host fails: idempotent submission, a bounded number
//! of attempts for a job the host cannot finish, a clean failed job (never a
//! 500) on the inline path, and a full disk under the real binary: 503 with
//! `Retry-After`, not ready, and every accepted job finished once space
//! returns, without a restart.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::{
    ConfigFile, Served, Server, json, png, poll_finished, sleeper, start, thumbnail, token,
};

/// Posts a thumbnail job of `image` with `key` as its `Idempotency-Key`.
fn keyed(
    s: &Server,
    token: &str,
    path: &str,
    key: &str,
    image: Vec<u8>,
) -> reqwest::RequestBuilder {
    s.post(path, token)
        .header(
            "idempotency-key",
            reqwest::header::HeaderValue::from_bytes(key.as_bytes()).unwrap(),
        )
        .header("content-type", "image/png")
        .body(image)
}

async fn status_and_body(req: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let resp = req.send().await.unwrap();
    (resp.status(), resp.json().await.unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_with_the_same_idempotency_key_returns_the_first_job() {
    let s = start(|_| {}).await;
    let acme = s.token("acme", &["thumbnail:run"]).await;
    let other = s.token("other", &["thumbnail:run"]).await;
    let image = png(64, 48);
    let queued = "/v1/modules/thumbnail/jobs?param.width=16";

    // The queued path: the retry gets the first job, whatever its state.
    let (status, first) = status_and_body(keyed(&s, &acme, queued, "order-1", image.clone())).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{first:#}");
    let id = first["id"].as_str().unwrap().to_owned();
    let (status, again) = status_and_body(keyed(&s, &acme, queued, "order-1", image.clone())).await;
    assert!(
        status == StatusCode::ACCEPTED || status == StatusCode::OK,
        "{status}"
    );
    assert_eq!(again["id"], id.as_str());
    s.finished(&acme, &id).await;
    let (status, done) = status_and_body(keyed(&s, &acme, queued, "order-1", image.clone())).await;
    assert_eq!(
        (status, done["id"].as_str(), done["state"].as_str()),
        (StatusCode::OK, Some(id.as_str()), Some("succeeded"))
    );

    // The same key with another request is a conflict, not a new job.
    let (status, body) = status_and_body(keyed(&s, &acme, queued, "order-1", png(65, 48))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("conflict")),
        "{body:#}"
    );
    let (status, _) = status_and_body(keyed(
        &s,
        &acme,
        "/v1/modules/thumbnail/jobs?param.width=17",
        "order-1",
        image.clone(),
    ))
    .await;
    assert_eq!(status, StatusCode::CONFLICT);

    // Another tenant's key is its own.
    let (status, theirs) =
        status_and_body(keyed(&s, &other, queued, "order-1", image.clone())).await;
    assert_eq!(status, StatusCode::ACCEPTED);
    assert_ne!(theirs["id"], id.as_str());

    // The inline path (a wait longer than the job's wall time).
    let inline = "/v1/modules/thumbnail/jobs?param.width=16&wait=30s";
    let (status, ran) = status_and_body(keyed(&s, &acme, inline, "order-2", image.clone())).await;
    assert_eq!(
        (status, ran["state"].as_str()),
        (StatusCode::OK, Some("succeeded"))
    );
    let (status, replayed) =
        status_and_body(keyed(&s, &acme, inline, "order-2", image.clone())).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(replayed["id"], ran["id"]);

    // Malformed keys are refused before anything is stored.
    let long = "k".repeat(256);
    for bad in ["", "has space", "tab\there", long.as_str()] {
        let (status, body) = status_and_body(keyed(&s, &acme, queued, bad, image.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{bad:?}: {body:#}");
    }
    let (status, _) = status_and_body(keyed(&s, &acme, queued, "é", image.clone())).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "not ASCII");

    // Host-side: the store holds exactly one job per key and tenant.
    let jobs = s.service.store().list_jobs("acme", 100).await.unwrap();
    assert_eq!(jobs.len(), 2, "{jobs:#?}");
    assert_eq!(
        s.service
            .store()
            .list_jobs("other", 100)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_the_host_cannot_finish_is_failed_after_its_attempts_not_rerun_for_ever() {
    let s = start(|c| {
        c.queue.workers = 1;
        c.queue.max_attempts = 3;
    })
    .await;
    let token = s.token("acme", &["hello:run", "hostile:run"]).await;
    // A sleeper holds the only worker for a second, so the job behind it
    // is still queued when its stored stdin is broken below.
    let sleeper: Value = json(
        s.http
            .post(s.url("/v1/modules/hostile/jobs"))
            .bearer_auth(&token),
    )
    .await;
    let form = reqwest::multipart::Form::new().text("stdin", "some input");
    let resp = s
        .post("/v1/modules/hello/jobs", &token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let job: Value = resp.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    // The host fails on this job's path at every attempt: its stored stdin
    // is now a directory it cannot read.
    let stdin = s
        .service
        .config()
        .storage
        .data_dir
        .join("jobs")
        .join(&id)
        .join("inputs/stdin");
    std::fs::remove_file(&stdin).unwrap();
    std::fs::create_dir(&stdin).unwrap();
    let stored = s
        .service
        .store()
        .get_job("acme", &id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.state.as_str(), "queued", "the break landed too late");

    let done = s.finished(&token, &id).await;
    assert_eq!(done["state"], "failed", "{done:#}");
    assert_eq!(done["attempts"], 3, "{done:#}");
    // The client is told it was the host, in words that name nothing of it.
    assert_eq!(done["report"]["failure"]["kind"], "host", "{done:#}");
    assert_eq!(
        done["report"]["failure"]["message"], "the host could not run the job",
        "{done:#}"
    );
    let stored = s
        .service
        .store()
        .get_job("acme", &id)
        .await
        .unwrap()
        .unwrap();
    let reason = stored.report.unwrap().failure.unwrap().message;
    assert!(reason.contains("3 attempts"), "{reason}");
    // Audited as finished, and the worker moves on.
    let audit = s.service.store().audit(50).await.unwrap();
    assert!(
        audit.iter().any(|e| e.action == "job.finished"
            && e.job_id.as_deref() == Some(id.as_str())
            && e.outcome.as_deref() == Some("failed")),
        "{audit:#?}"
    );
    s.finished(&token, sleeper["id"].as_str().unwrap()).await;
    let next = json(
        s.http
            .post(s.url("/v1/modules/hello/jobs?wait=20s"))
            .bearer_auth(&token),
    )
    .await;
    assert_eq!(next["state"], "succeeded", "{next:#}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_inline_job_the_host_cannot_finish_is_a_failed_job_not_a_500() {
    let s = start(|_| {}).await;
    let token = s.token("acme", &["thumbnail:run"]).await;
    // Outputs cannot be kept: where the job directories go is a file.
    let jobs = s.service.config().storage.data_dir.join("jobs");
    std::fs::remove_dir_all(&jobs).unwrap();
    std::fs::write(&jobs, b"not a directory").unwrap();
    let resp = s
        .post("/v1/modules/thumbnail/jobs?param.width=16&wait=30s", &token)
        .header("content-type", "image/png")
        .body(png(64, 48))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let job: Value = resp.json().await.unwrap();
    assert_eq!(job["state"], "failed", "{job:#}");
    assert_eq!(job["outputs"].as_array().map(Vec::len), Some(0), "{job:#}");
    // Stored, finished, like any job; nothing was left behind.
    let stored = s
        .service
        .store()
        .get_job("acme", job["id"].as_str().unwrap())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(stored.state.as_str(), "failed");
    assert_eq!(std::fs::read(&jobs).unwrap(), b"not a directory");
}

/// A tmpfs of `size` mounted at `dir` (we run as root), unmounted on drop.
struct SmallDisk(PathBuf);

impl SmallDisk {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let status = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "mount a {size} tmpfs at {}",
            dir.display()
        );
        Self(dir.to_owned())
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem of `dir` with one file; returns its path.
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0xA5u8; 16 * 1024];
    loop {
        if let Err(e) = f.write_all(&chunk) {
            assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
            break;
        }
    }
    // Also the last few bytes.
    while f.write_all(&[0]).is_ok() {}
    path
}

async fn ready(http: &reqwest::Client, base: &str) -> StatusCode {
    http.get(format!("{base}/readyz"))
        .send()
        .await
        .unwrap()
        .status()
}

/// Polls `/readyz` until it answers `want` (bounded: 20 s).
async fn wait_ready(http: &reqwest::Client, base: &str, want: StatusCode) {
    for _ in 0..200 {
        if ready(http, base).await == want {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("/readyz never answered {want}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_answers_503_is_not_ready_and_loses_no_accepted_job() {
    let dir = tempfile::tempdir().unwrap();
    let disk = SmallDisk::mount(&dir.path().join("small"), "8m");
    let (config, data) = ConfigFile {
        policies: vec![thumbnail(10, 30, &["width"]), sleeper(1000)],
        queue: "workers = 1",
        ..ConfigFile::default()
    }
    .write(&disk.0);
    let served = Served::start(&config);
    let base = served.base();
    let secret = token(&data, "acme", &["thumbnail:run", "hostile:run"]).await;
    let http = reqwest::Client::new();
    let image = png(320, 200);
    let submit = || {
        http.post(format!("{base}/v1/modules/thumbnail/jobs?param.width=32"))
            .bearer_auth(&secret)
            .header("content-type", "image/png")
            .body(image.clone())
            .send()
    };
    assert_eq!(ready(&http, &base).await, StatusCode::OK);

    // Accepted jobs wait behind a sleeper while the disk fills up: the
    // worker meets the full disk on their path.
    let mut accepted = Vec::new();
    let first: Value = json(
        http.post(format!("{base}/v1/modules/hostile/jobs"))
            .bearer_auth(&secret),
    )
    .await;
    accepted.push(first["id"].as_str().unwrap().to_owned());
    for _ in 0..4 {
        let resp = submit().await.unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let job: Value = resp.json().await.unwrap();
        accepted.push(job["id"].as_str().unwrap().to_owned());
    }
    let filler = fill(&disk.0);

    // A submission now is refused with a clear, retryable error.
    let resp = submit().await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    let retry_after = resp.headers().get("retry-after").cloned();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "storage_full", "{body:#}");
    assert!(retry_after.is_some(), "no Retry-After");
    wait_ready(&http, &base, StatusCode::SERVICE_UNAVAILABLE).await;
    // Let the worker meet the full disk on the accepted jobs' path.
    tokio::time::sleep(Duration::from_secs(3)).await;

    // Space returns: ready again, and every accepted job finishes without
    // a restart.
    std::fs::remove_file(&filler).unwrap();
    wait_ready(&http, &base, StatusCode::OK).await;
    for id in &accepted {
        let job = poll_finished(&http, &base, &secret, id).await;
        let want = if id == &accepted[0] {
            "failed"
        } else {
            "succeeded"
        };
        assert_eq!(job["state"], want, "job {id}: {job:#}");
    }
    let resp = submit().await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    drop(served);
}

#[tokio::test(flavor = "multi_thread")]
async fn recovery_runs_stored_jobs_the_queue_lost_and_jobs_a_failure_left_running() {
    use bulkhead::store::{JobRecord, JobState, now_ms};
    let s = start(|c| c.queue.workers = 1).await;
    let token = s.token("acme", &["hello:run"]).await;
    let hello = s
        .service
        .modules_for(&bulkhead::auth::Identity {
            tenant: "acme".into(),
            subject: "acme-ci".into(),
            token_id: String::new(),
            scopes: vec!["hello:run".into()],
            client: None,
        })
        .find(|p| p.module.name.to_string() == "hello")
        .map(|p| p.module.sha256.to_string())
        .unwrap();
    let job = |id: &str| JobRecord {
        id: id.into(),
        tenant: "acme".into(),
        subject: "acme-ci".into(),
        token_id: "t".into(),
        module: "hello".into(),
        module_sha256: hello.clone(),
        policy_sha256: None,
        params: Default::default(),
        inputs: Vec::new(),
        has_stdin: false,
        state: JobState::Queued,
        created_at: now_ms(),
        started_at: None,
        finished_at: None,
        attempts: 0,
        report: None,
    };
    // Stored, but the run queue never heard of them: one queued (its push
    // was lost, as when a claim fails), one left `running` by a failure.
    let store = s.service.store();
    store.insert_job(&job("lost-queued"), None).await.unwrap();
    store.insert_job(&job("left-running"), None).await.unwrap();
    store
        .claim(
            "acme",
            "left-running",
            now_ms(),
            3,
            &bulkhead::store::Lease::new(s.service.node(), std::time::Duration::from_secs(60)),
        )
        .await
        .unwrap();
    assert_eq!(s.service.recover().await.unwrap(), 2);
    for id in ["lost-queued", "left-running"] {
        let done = s.finished(&token, id).await;
        assert_eq!(done["state"], "succeeded", "{id}: {done:#}");
    }
    let again = store
        .get_job("acme", "left-running")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.attempts, 2, "the interrupted start counts");
    assert_eq!(s.service.recover().await.unwrap(), 0, "nothing left");
}

/// A job cancelled while it runs never runs again, so its stored inputs
/// go at once, not with the retention sweep: a tenant submitting large
/// jobs and cancelling them as they start piles up no uploads.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_cancelled_while_it_runs_leaves_no_stored_inputs() {
    let s = start(|c| {
        crate::common::policies::sleeper(30_000).write_to(&c.modules.policies_dir);
    })
    .await;
    let token = s.token("acme", &["hostile:run"]).await;
    let job: Value = json(
        s.post("/v1/modules/hostile/jobs", &token)
            .header("content-type", "application/octet-stream")
            .body(vec![7u8; 1 << 20]),
    )
    .await;
    let id = job["id"].as_str().unwrap().to_owned();
    let inputs = s
        .service
        .config()
        .storage
        .data_dir
        .join("jobs")
        .join(&id)
        .join("inputs");
    let mut state = Value::Null;
    for _ in 0..200 {
        state = json(s.get(&format!("/v1/jobs/{id}"), &token)).await["state"].clone();
        if state == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(state, "running");
    assert!(inputs.exists(), "stored: {}", inputs.display());
    let cancelled: Value = json(s.post(&format!("/v1/jobs/{id}/cancel"), &token)).await;
    assert_eq!(cancelled["state"], "cancelled");
    for _ in 0..200 {
        if !inputs.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!inputs.exists(), "still stored: {}", inputs.display());
}

/// The jobs running in the service's workers now, each once (`N`): the
/// `j<N>.out` and `j<N>.in` directories in each worker's directory (its
/// working directory).
fn guests_running(s: &Server) -> std::collections::HashSet<String> {
    let mut jobs = std::collections::HashSet::new();
    let pids = s
        .service
        .isolation()
        .workers
        .get("untrusted")
        .cloned()
        .unwrap_or_default();
    for pid in pids {
        let Ok(entries) = std::fs::read_dir(format!("/proc/{pid}/cwd")) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(job) = name
                .strip_prefix('j')
                .and_then(|n| n.strip_suffix(".out").or_else(|| n.strip_suffix(".in")))
            {
                jobs.insert(job.to_owned());
            }
        }
    }
    jobs
}

/// An inline job holds its `Idempotency-Key` while it runs, before it is
/// stored: the same request again meanwhile gets that job once it has run
/// (not a second run of it, at once or after it: every job the workers ran
/// meanwhile is seen in their directories), and a
/// different request with the key is a conflict at once, while the first
/// is answered with its own job.
#[tokio::test(flavor = "multi_thread")]
async fn an_inline_job_holds_its_idempotency_key_while_it_runs() {
    let s = start(|c| {
        c.queue.workers = 4;
        sleeper(3_000).write_to(&c.modules.policies_dir);
    })
    .await;
    let acme = s.token("acme", &["hostile:run"]).await;
    let post = |stdin: &'static str| {
        s.post("/v1/modules/hostile/jobs?wait=20s", &acme)
            .header("idempotency-key", "order-9")
            .multipart(reqwest::multipart::Form::new().text("stdin", stdin))
    };
    let first = tokio::spawn(status_and_body(post("one")));
    for _ in 0..400 {
        if !guests_running(&s).is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut ran = guests_running(&s);
    assert_eq!(ran.len(), 1, "the first job never started");
    let again = tokio::spawn(status_and_body(post("one")));
    let (status, other) = status_and_body(post("two")).await;
    assert_eq!(
        (status, other["error"]["code"].as_str()),
        (StatusCode::CONFLICT, Some("conflict")),
        "{other:#}"
    );
    while !(first.is_finished() && again.is_finished()) {
        ran.extend(guests_running(&s));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(ran.len(), 1, "same-key requests ran jobs {ran:?}");
    let (status, first) = first.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{first:#}");
    let (status, again) = again.await.unwrap();
    assert_eq!(status, StatusCode::OK, "{again:#}");
    assert_eq!(again["id"], first["id"]);
    let jobs = s.service.store().list_jobs("acme", 10).await.unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:#?}");
}
