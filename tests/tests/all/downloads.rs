//! Downloads with the real binary: 48 slow readers of a 16 MiB output hold
//! the service's resident memory within a small margin (the body is
//! streamed as each client reads it, not read into memory first), one more
//! download by the same tenant gets 429 with `Retry-After` while another
//! tenant is served, and the slots come back when the readers go away.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use bulkhead::store::SqliteStore;
use reqwest::StatusCode;

use crate::common::{ConfigFile, Served, hello, memory_kib, stored_outputs, token};

const OUTPUT: usize = 16 << 20;
const READERS: usize = 48;
/// How far above its resident set before the readers the service may peak
/// with all of them connected: a chunk and a connection's buffers each,
/// with room to spare. Reading each output into memory, as downloads once
/// did, costs 48 × 16 MiB = 768 MiB.
const MARGIN_KIB: u64 = 96 << 10;

/// Stores a finished job of `tenant` with one output `name` of `data`, in
/// the store and job directory of the service under `data_dir`.
async fn stored_output(data_dir: &Path, tenant: &str, name: &str, data: &[u8]) -> String {
    let store = SqliteStore::open(&data_dir.join("bulkhead.sqlite"))
        .await
        .unwrap();
    stored_outputs(&store, data_dir, tenant, &[(name, data)]).await
}

/// Opens a download and reads only its head and first bytes, then stops
/// reading: a slow reader holding the download open.
fn slow_reader(addr: &str, path: &str, token: &str) -> TcpStream {
    let mut conn = TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 4096];
    let n = conn.read(&mut head).unwrap();
    let text = String::from_utf8_lossy(&head[..n]);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    conn
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_downloads_are_streamed_and_bounded_per_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let (config, data) = ConfigFile {
        policies: vec![hello()],
        // The readers hold still for the whole test: no minimum write
        // rate may close them on a slow machine.
        server: &format!("max_downloads_per_tenant = {READERS}\nmin_write_rate = \"0 B\""),
        queue: "workers = 1",
        ..ConfigFile::default()
    }
    .write(dir.path());
    let served = Served::start(&config);
    let base = served.base();
    let pid = served.pid();
    let reader = token(&data, "reader", &["hello:run"]).await;
    let other = token(&data, "other", &["hello:run"]).await;
    let content: Vec<u8> = (0..OUTPUT).map(|i| (i % 251) as u8).collect();
    let id = stored_output(&data, "reader", "big.bin", &content).await;
    let other_id = stored_output(&data, "other", "small.txt", b"small").await;
    let path = format!("/v1/jobs/{id}/outputs/big.bin");
    let http = reqwest::Client::new();

    // A whole download is exact, and warms every path the readers take.
    let resp = http
        .get(format!("{base}{path}"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.content_length(), Some(OUTPUT as u64));
    assert!(
        resp.bytes().await.unwrap() == content,
        "the download is exact"
    );
    let baseline = memory_kib(pid, "VmRSS:");

    let addr = base.trim_start_matches("http://").to_owned();
    let readers: Vec<TcpStream> = {
        let (addr, path, reader) = (addr.clone(), path.clone(), reader.clone());
        tokio::task::spawn_blocking(move || {
            (0..READERS)
                .map(|_| slow_reader(&addr, &path, &reader))
                .collect()
        })
        .await
        .unwrap()
    };
    // Give the service time to fill whatever it buffers per connection.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let peak = memory_kib(pid, "VmHWM:");
    eprintln!(
        "downloads: {READERS} slow readers of {} MiB; resident {baseline} KiB before, peak {peak} KiB",
        OUTPUT >> 20
    );
    assert!(
        peak < baseline + MARGIN_KIB,
        "peak resident set {peak} KiB against {baseline} KiB before {READERS} slow downloads of {} MiB",
        OUTPUT >> 20
    );

    // The tenant is at its bound; another tenant is not.
    let resp = http
        .get(format!("{base}{path}"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(resp.headers().contains_key("retry-after"));
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "too_many_requests");
    let resp = http
        .get(format!("{base}/v1/jobs/{other_id}/outputs/small.txt"))
        .bearer_auth(&other)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(&resp.bytes().await.unwrap()[..], b"small");

    // The readers go away; their slots come back (bounded wait).
    drop(readers);
    let mut status = StatusCode::TOO_MANY_REQUESTS;
    for _ in 0..100 {
        let resp = http
            .get(format!("{base}{path}"))
            .bearer_auth(&reader)
            .send()
            .await
            .unwrap();
        status = resp.status();
        if status == StatusCode::OK {
            assert_eq!(resp.bytes().await.unwrap().len(), OUTPUT);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, StatusCode::OK, "slots are freed when readers close");
    drop(served);
}
