//! Crash durability with the real binary: accept jobs, `kill -9` the service
//! while they are queued and running, restart it on the same data directory,
//! and every accepted job completes; none is lost or stuck `running`.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use bulkhead::api::{IssueRequest, new_token};
use bulkhead::store::{JobStore, SqliteStore};
use reqwest::StatusCode;
use serde_json::Value;

use crate::service::{json, png, poll_finished};

/// Writes a service config under `dir` serving `policies` (file name,
/// text), with `queue` as its `[queue]` table's body; returns the config's
/// path and the data directory.
pub fn write_config(
    dir: &Path,
    policies: &[(&str, String)],
    queue: &str,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = dir.join("data");
    let policies_dir = dir.join("policies");
    std::fs::create_dir_all(&policies_dir).unwrap();
    for (name, text) in policies {
        std::fs::write(policies_dir.join(name), text).unwrap();
    }
    let config = dir.join("bulkhead.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[storage]\ndata_dir = \"{}\"\ncache_dir = \"{}\"\n[modules]\npolicies_dir = \"{}\"\nmodules_dir = \"{}\"\n[queue]\n{queue}\n",
            data.display(),
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("service-cache").display(),
            policies_dir.display(),
            bulkhead_tests::GUESTS_DIR,
        ),
    )
    .unwrap();
    (config, data)
}

/// Stores a new token for `tenant` with `scopes` directly in the service's
/// store; returns its secret.
pub async fn token(data: &Path, tenant: &str, scopes: &[&str]) -> String {
    let (secret, record) = new_token(&IssueRequest {
        tenant: tenant.into(),
        subject: "ci".into(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        ttl: None,
    })
    .unwrap();
    SqliteStore::open(&data.join("bulkhead.sqlite"))
        .await
        .unwrap()
        .insert_token(&record)
        .await
        .unwrap();
    secret
}

/// A running `bulkhead serve`; dropping it kills it with SIGKILL (no
/// shutdown path runs), so a failing test leaves no service behind.
pub struct Served(Child);

impl Served {
    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `bulkhead serve` and returns it with its public base URL, read
/// from the first line it prints.
pub fn spawn(config: &Path) -> (Served, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bulkhead-under-test"))
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut reader = BufReader::new(stdout);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    // Keep draining: a closed pipe would fail the service's next print.
    std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    (Served(child), base)
}

#[tokio::test(flavor = "multi_thread")]
async fn accepted_jobs_survive_kill_dash_nine() {
    let dir = tempfile::tempdir().unwrap();
    let policy = crate::common::policy_text(
        bulkhead_tests::THUMBNAIL,
        "thumbnail",
        "[access]\nscopes = [\"thumbnail:run\"]\n[limits]\nmemory = \"256 MiB\"\ncpu_time = \"10 s\"\nwall_time = \"30 s\"\n[run]\nparams = [\"width\"]",
    );
    let (config, data) = write_config(dir.path(), &[("thumbnail.toml", policy)], "workers = 1");

    let (first, base) = spawn(&config);
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

    let (second, base) = spawn(&config);
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
    let policy = crate::common::policy_text(
        bulkhead_tests::THUMBNAIL,
        "thumbnail",
        "[access]\nscopes = [\"thumbnail:run\"]\n[limits]\nmemory = \"256 MiB\"\ncpu_time = \"10 s\"\nwall_time = \"30 s\"\n[run]\nparams = [\"width\"]",
    );
    let (config, data) = write_config(dir.path(), &[("thumbnail.toml", policy)], "workers = 1");
    let (first, base) = spawn(&config);
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

    let (second, base) = spawn(&config);
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
