//! Shared blobs: two services on one PostgreSQL database, each with its own
//! data directory. A job submitted on one runs on the other from the
//! inputs the first stored, and its outputs download from both; an inline
//! job's outputs download from the node that did not run it; a deletion
//! through one node removes the outputs for every node. Judged from the
//! store and the data directories: no job file is left on either node's
//! disk, so every download came from the database.

use std::path::Path;
use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::{png, start};

/// Entries under a node's `<data>/jobs` (its local copies of job files).
fn local_job_files(data: &Path) -> Vec<String> {
    std::fs::read_dir(data.join("jobs"))
        .map(|entries| {
            entries
                .filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_submitted_on_one_node_runs_on_another_and_downloads_from_both() {
    let Some(url) = bulkhead::store::pg_server::fresh_database().await else {
        return;
    };
    let url: bulkhead::config::DatabaseUrl = url.try_into().unwrap();
    // Node A accepts jobs but never runs one of its own (no tenant may run
    // anything there): whatever runs, runs on B.
    let a = start(|c| {
        c.storage.url = Some(url.clone());
        c.queue.max_running_per_tenant = 0;
    })
    .await;
    let token = a.token("acme", &["thumbnail:run"]).await;
    let resp = a
        .post(
            "/v1/modules/thumbnail/jobs?param.width=64&param.height=64",
            &token,
        )
        .header("content-type", "image/png")
        .body(png(320, 200))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let id = resp.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let a_data = a.service.config().storage.data_dir.clone();
    assert!(
        local_job_files(&a_data).is_empty(),
        "A keeps the job's input in the database, not on its disk"
    );

    // B starts on the same database, finds the queued job and runs it from
    // the input A stored.
    let b = start(|c| c.storage.url = Some(url.clone())).await;
    let b_data = b.service.config().storage.data_dir.clone();
    let job = a.finished(&token, &id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let name = job["outputs"][0]["name"].as_str().unwrap().to_owned();
    let from_a = a.output(&token, &id, &name).await;
    let from_b = b.output(&token, &id, &name).await;
    assert_eq!(from_a, from_b);
    let thumb = image::load_from_memory(&from_a).unwrap();
    assert_eq!((thumb.width(), thumb.height()), (64, 40));
    assert_eq!(
        job["outputs"][0]["size"].as_u64(),
        Some(from_a.len() as u64)
    );

    // An inline job on B: its outputs are stored before its row, and A
    // serves them.
    let resp = b
        .post(
            "/v1/modules/thumbnail/jobs?wait=20s&param.width=32&param.height=32",
            &token,
        )
        .header("content-type", "image/png")
        .body(png(100, 100))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let inline: Value = resp.json().await.unwrap();
    assert_eq!(inline["state"], "succeeded", "{inline:#}");
    let inline_id = inline["id"].as_str().unwrap();
    let url = inline["outputs"][0]["url"].as_str().unwrap();
    let download = a.get(url, &token).send().await.unwrap();
    assert_eq!(download.status(), StatusCode::OK);
    assert_eq!(download.headers()["content-type"], "image/png");
    let thumb = image::load_from_memory(&download.bytes().await.unwrap()).unwrap();
    assert_eq!((thumb.width(), thumb.height()), (32, 32));

    // No node holds a job file: every byte above came from the database.
    assert!(local_job_files(&a_data).is_empty(), "{a_data:?}");
    assert!(local_job_files(&b_data).is_empty(), "{b_data:?}");

    // A copy a crash left on its way into the database is a leftover
    // though its job has a row (it may have been re-run on another node);
    // the sweep removes it, and the shared outputs stay.
    let left = a_data.join("jobs").join(&id).join("outputs");
    std::fs::create_dir_all(&left).unwrap();
    std::fs::write(left.join(&name), b"half of an earlier attempt").unwrap();
    assert_eq!(a.service.remove_orphans(Duration::ZERO).await, 1);
    assert!(local_job_files(&a_data).is_empty(), "{a_data:?}");
    assert_eq!(b.output(&token, &id, &name).await, from_a);

    // Another tenant sees neither job's outputs on either node.
    let other = b.token("other", &["thumbnail:run"]).await;
    for node in [&a, &b] {
        let resp = node
            .get(&format!("/v1/jobs/{id}/outputs/{name}"), &other)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }

    // Deleted through A, gone for B.
    let deleted = a
        .delete(&format!("/v1/jobs/{inline_id}"), &token)
        .send()
        .await
        .unwrap();
    assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
    let resp = b.get(url, &token).send().await.unwrap();
    assert_eq!(resp.status(), StatusCode::NOT_FOUND);
}
