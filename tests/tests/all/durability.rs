//! Crash durability with the real binary: accept jobs, `kill -9` the service
//! while they are queued and running, restart it on the same data directory,
//! and every accepted job completes; none is lost or stuck `running`.

use bulkhead::store::{JobStore, SqliteStore};
use reqwest::StatusCode;
use serde_json::Value;

use crate::common::{ConfigFile, Served, json, png, poll_finished, thumbnail, token};

/// A service with one worker serving the thumbnailer (`width` only, room
/// for big images); returns its config's path and data directory.
fn thumbnail_service(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    ConfigFile {
        policies: vec![thumbnail(10, 30, &["width"])],
        queue: "workers = 1",
        ..ConfigFile::default()
    }
    .write(dir)
}

#[tokio::test(flavor = "multi_thread")]
async fn accepted_jobs_survive_kill_dash_nine() {
    let dir = tempfile::tempdir().unwrap();
    let (config, data) = thumbnail_service(dir.path());

    let first = Served::start(&config);
    let base = first.base();
    let secret = token(&data, "acme", &["thumbnail:run"]).await;

    // A big image keeps the single worker busy while the rest queue up.
    let http = reqwest::Client::new();
    let image = png(2048, 1536);
    let mut ids = Vec::new();
    for _ in 0..8 {
        let resp = http
            .post(format!("{base}/v1/modules/thumbnail/jobs?param.width=32"))
            .bearer_auth(&secret)
            .header("content-type", "image/png")
            .body(image.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let job: Value = resp.json().await.unwrap();
        ids.push(job["id"].as_str().unwrap().to_owned());
    }
    // The kill must land while work is pending, or it proves nothing.
    let mut unfinished = 0;
    for id in &ids {
        let job: Value = json(
            http.get(format!("{base}/v1/jobs/{id}"))
                .bearer_auth(&secret),
        )
        .await;
        if job["state"] == "queued" || job["state"] == "running" {
            unfinished += 1;
        }
    }
    assert!(unfinished > 0, "every job finished before the kill");
    // SIGKILL: no shutdown path runs.
    drop(first);

    let second = Served::start(&config);
    let base = second.base();
    for id in &ids {
        let last = poll_finished(&http, &base, &secret, id).await;
        assert_eq!(
            last["state"], "succeeded",
            "job {id} after restart: {last:#}"
        );
        let url = last["outputs"][0]["url"].as_str().unwrap();
        let out = http
            .get(format!("{base}{url}"))
            .bearer_auth(&secret)
            .send()
            .await
            .unwrap();
        assert_eq!(out.status(), StatusCode::OK);
    }
    drop(second);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_after_kill_dash_nine_with_the_same_idempotency_key_gets_the_same_job() {
    let dir = tempfile::tempdir().unwrap();
    let (config, data) = thumbnail_service(dir.path());
    let first = Served::start(&config);
    let base = first.base();
    let secret = token(&data, "acme", &["thumbnail:run"]).await;
    let http = reqwest::Client::new();
    let image = png(640, 480);
    let submit = |base: String| {
        http.post(format!("{base}/v1/modules/thumbnail/jobs?param.width=32"))
            .bearer_auth(&secret)
            .header("idempotency-key", "upload-7f3a")
            .header("content-type", "image/png")
            .body(image.clone())
            .send()
    };
    let resp = submit(base.clone()).await.unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let job: Value = resp.json().await.unwrap();
    let id = job["id"].as_str().unwrap().to_owned();
    // The 202 is "lost": the service dies at once, with no shutdown path.
    drop(first);

    // A job directory no row points to, as a crash between writing a
    // submission's inputs and its row leaves: start-up removes it.
    let orphan = data.join("jobs/0badc0de-0000-4000-8000-000000000000");
    std::fs::create_dir_all(orphan.join("inputs")).unwrap();
    std::fs::write(orphan.join("inputs/in-input"), b"left behind").unwrap();

    let second = Served::start(&config);
    let base = second.base();
    assert!(
        !orphan.exists(),
        "an orphan job directory survived start-up"
    );
    let resp = submit(base.clone()).await.unwrap();
    assert!(
        resp.status() == StatusCode::ACCEPTED || resp.status() == StatusCode::OK,
        "{}",
        resp.status()
    );
    let again: Value = resp.json().await.unwrap();
    assert_eq!(again["id"], id.as_str(), "the retry created another job");
    let done = poll_finished(&http, &base, &secret, &id).await;
    assert_eq!(done["state"], "succeeded", "{done:#}");
    // Host-side: one row, and its directory is still there (outputs).
    let store = SqliteStore::open(&data.join("bulkhead.sqlite"))
        .await
        .unwrap();
    let jobs = store.list_jobs("acme", 100).await.unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:#?}");
    assert!(data.join("jobs").join(&id).is_dir());
    drop(second);
}
