//! Clients' side of the API: requests and their JSON, polling a job to
//! its end, a test image to submit, and finished jobs with outputs stored
//! directly (as the service stores them) for download tests.

use std::path::Path;
use std::time::Duration;

use bulkhead::sandbox::{JobReport, OutputFile};
use bulkhead::store::{JobRecord, JobState, JobStore, now_ms};
use reqwest::StatusCode;
use serde_json::Value;

/// Sends `req` and decodes its JSON body.
pub async fn json(req: reqwest::RequestBuilder) -> Value {
    req.send().await.unwrap().json().await.unwrap()
}

/// The status of `resp` and its error code (empty if it has none).
pub async fn error_code(resp: reqwest::Response) -> (StatusCode, String) {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    (
        status,
        body["error"]["code"].as_str().unwrap_or("").to_owned(),
    )
}

/// Polls job `id` at `base` until it reaches a final state (bounded: 30 s).
pub async fn poll_finished(http: &reqwest::Client, base: &str, token: &str, id: &str) -> Value {
    let mut job = Value::Null;
    for _ in 0..600 {
        job = json(http.get(format!("{base}/v1/jobs/{id}")).bearer_auth(token)).await;
        if matches!(
            job["state"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            return job;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("job {id} did not finish: {job:#}");
}

/// A `width` × `height` PNG with a pattern in it.
pub fn png(width: u32, height: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([x as u8, y as u8, (x ^ y) as u8])
    });
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .unwrap();
    bytes
}

/// A fresh id in the UUID shape the service gives jobs.
pub fn uuid_like() -> String {
    let n: u128 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
        ^ (u128::from(std::process::id()) << 64);
    let h = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The row of a finished (failed) `hello` job of `tenant`, as the tests
/// that store outputs directly insert it.
pub fn finished_record(id: &str, tenant: &str, now: i64) -> JobRecord {
    JobRecord {
        id: id.to_owned(),
        tenant: tenant.into(),
        subject: "ci".into(),
        token_id: "t".into(),
        module: "hello".into(),
        module_sha256: String::new(),
        policy_sha256: None,
        params: Default::default(),
        inputs: Vec::new(),
        has_stdin: false,
        state: JobState::Failed,
        created_at: now,
        started_at: Some(now),
        finished_at: Some(now),
        attempts: 1,
        report: None,
    }
}

/// Stores a finished job of `tenant` in `store` whose report lists
/// `outputs` (name, bytes), each written under the job's output directory
/// in the data directory `data_dir`; returns its id.
pub async fn stored_outputs(
    store: &dyn JobStore,
    data_dir: &Path,
    tenant: &str,
    outputs: &[(&str, &[u8])],
) -> String {
    let id = uuid_like();
    let dir = data_dir.join("jobs").join(&id).join("outputs");
    let mut report = JobReport::not_run(&id, "hello", "stored by the test");
    for (name, data) in outputs {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, data).unwrap();
        report.outputs.push(OutputFile {
            name: (*name).to_owned(),
            size: data.len() as u64,
            sha256: String::new(),
        });
    }
    let now = now_ms();
    let job = finished_record(&id, tenant, now);
    store
        .insert_finished_job(&job, &report, now, None)
        .await
        .unwrap();
    id
}

/// A connection to `to` from 127.0.0.1 whose receive window is 4 KiB: a
/// client that takes an answer as slowly as it reads, and whose unread
/// answer stays in the server's process.
pub async fn small_window_client(to: std::net::SocketAddr) -> tokio::net::TcpStream {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket
        .bind(std::net::SocketAddr::new("127.0.0.1".parse().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}
