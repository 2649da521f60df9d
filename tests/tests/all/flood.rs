//! Backpressure with the real binary: one tenant floods the service with
//! concurrent jobs carrying inputs, both async and waited-for. It gets 429s
//! with `Retry-After`, another tenant is still served, and the service's
//! memory stays bounded: its peak resident set, read from `/proc`, stays
//! within a fixed margin of what it was before the flood, far below what the
//! flood sent.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use reqwest::StatusCode;
use serde_json::Value;

use crate::common::{ConfigFile, Served, hello, memory_kib, sleeper, token};

const CLIENTS: usize = 64;
const PER_CLIENT: usize = 40;
const BODY: usize = 256 << 10;
/// How far above its pre-flood resident set the service may peak: room for
/// every client's request in flight at once (its body, collected, and the
/// connection's read buffer: measured at about 50 MiB in all for 64 clients)
/// and the queue's share, with room to spare. The flood sends 640 MiB; a
/// service that kept refused or queued bodies in memory would pass it.
const MARGIN_KIB: u64 = 160 << 10;

#[tokio::test(flavor = "multi_thread")]
async fn a_flood_is_refused_with_429_another_tenant_is_served_and_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let (config, data) = ConfigFile {
        policies: vec![sleeper(200), hello()],
        // Both tenants connect from 127.0.0.1: the flooder's 64 connections
        // must leave the polite tenant room under the per-address cap.
        server: "max_connections_per_client = 256",
        queue: "workers = 3\nmax_queued = 64\nmax_queued_per_tenant = 8\nmax_running_per_tenant = 2",
        ..ConfigFile::default()
    }
    .write(dir.path());
    let served = Served::start(&config);
    let base = served.base();
    let pid = served.pid();
    let flooder = token(&data, "flooder", &["hostile:run"]).await;
    let polite = token(&data, "polite", &["hello:run"]).await;
    let http = reqwest::Client::new();
    let body = bytes::Bytes::from(vec![0x5a; BODY]);
    let submit = {
        let (http, base, flooder, body) =
            (http.clone(), base.clone(), flooder.clone(), body.clone());
        move |wait: bool| {
            http.post(format!(
                "{base}/v1/modules/hostile/jobs{}",
                if wait { "?wait=30s" } else { "" }
            ))
            .bearer_auth(&flooder)
            .header("content-type", "application/octet-stream")
            .body(body.clone())
            .send()
        }
    };
    let polite_job = || {
        http.post(format!("{base}/v1/modules/hello/jobs?wait=30s"))
            .bearer_auth(&polite)
            .send()
    };

    // Warm up every path the flood takes before reading the baseline.
    assert_eq!(polite_job().await.unwrap().status(), StatusCode::OK);
    assert_eq!(submit(false).await.unwrap().status(), StatusCode::ACCEPTED);
    assert_eq!(submit(true).await.unwrap().status(), StatusCode::OK);
    let baseline = memory_kib(pid, "VmRSS:");

    // [202 accepted, 200 finished while waited for, 429 refused]
    let counts = Arc::new([0, 1, 2].map(|_| AtomicUsize::new(0)));
    let mut flood = tokio::task::JoinSet::new();
    for client in 0..CLIENTS {
        let (submit, counts) = (submit.clone(), Arc::clone(&counts));
        flood.spawn(async move {
            for i in 0..PER_CLIENT {
                let resp = submit((client + i) % 2 == 0).await.unwrap();
                let slot = match resp.status() {
                    StatusCode::ACCEPTED => 0,
                    StatusCode::OK => 1,
                    StatusCode::TOO_MANY_REQUESTS => {
                        assert!(resp.headers().contains_key("retry-after"));
                        2
                    }
                    other => panic!("unexpected {other}: {}", resp.text().await.unwrap()),
                };
                counts[slot].fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    // While the flood runs, the other tenant is served.
    let resp = polite_job().await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let job: Value = resp.json().await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job:#}");
    while let Some(done) = flood.join_next().await {
        done.unwrap();
    }

    let [accepted, finished, refused] = [0, 1, 2].map(|i| counts[i].load(Ordering::Relaxed));
    let sent = CLIENTS * PER_CLIENT;
    assert_eq!(accepted + finished + refused, sent);
    assert!(
        refused > sent / 2,
        "the flood is mostly refused: {accepted} accepted, {finished} finished, {refused} refused"
    );
    let peak = memory_kib(pid, "VmHWM:");
    assert!(
        peak < baseline + MARGIN_KIB,
        "peak resident set {peak} KiB against {baseline} KiB before a flood of {} MiB",
        (sent * BODY) >> 20
    );
    eprintln!(
        "flood: {accepted} accepted, {finished} finished, {refused} refused; resident {baseline} KiB before, peak {peak} KiB"
    );
    drop(served);
}
