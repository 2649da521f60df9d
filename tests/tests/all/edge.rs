//! The edge under hostile clients, against the real binary over loopback:
//! slow headers, idle sockets and stalled bodies are closed by the server;
//! a client over its connection cap is refused while other clients, health
//! probes and the admin API are served; oversized headers get 431 and a
//! flood of unfinished headers leaves memory bounded; anonymous denials
//! write a bounded number of audit rows, with the client's address, and
//! old rows are swept; SIGTERM ends the process within its bound whatever
//! the clients hold open. Client addresses other than 127.0.0.1 are other
//! loopback addresses (127.0.0.0/8 is all loopback on Linux).
//!
//! Durations here are test timeouts only, far above the configured ones:
//! no assertion is about speed.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bulkhead::store::{AuditEntry, JobStore, SqliteStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::common::{ConfigFile, Served, hello, memory_kib, token};

/// Far above every timeout the tests configure: only a bound on how long a
/// test waits for something that must happen.
const PATIENCE: Duration = Duration::from_secs(30);

/// Writes a config serving `hello` with `server` appended to `[server]` and
/// `audit` as the `[audit]` table's body; returns it and the data dir.
fn write_config(dir: &Path, server: &str, audit: &str) -> (PathBuf, PathBuf) {
    ConfigFile {
        policies: vec![hello()],
        server,
        queue: "workers = 2",
        audit,
    }
    .write(dir)
}

/// A connection to `to` from the loopback address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket
        .bind(SocketAddr::new(from.parse().unwrap(), 0))
        .unwrap();
    socket.connect(to).await.unwrap()
}

/// Whether the server closes `stream` (end of stream or reset) within
/// [`PATIENCE`]; whatever it sends first is read and dropped.
async fn closed_by_server(stream: &mut TcpStream) -> bool {
    let mut buf = vec![0u8; 64 << 10];
    tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Reads one response (status line, headers, `content-length` body) and
/// returns its status and body; `None` if the connection ended first.
async fn read_response(stream: &mut TcpStream) -> Option<(u16, String)> {
    let mut data = Vec::new();
    let mut buf = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => data.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_lowercase();
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .map_or(0, |v| v.trim().parse().unwrap());
    while data.len() < head_end + length {
        match tokio::time::timeout(PATIENCE, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => data.extend_from_slice(&buf[..n]),
            _ => return None,
        }
    }
    Some((
        status,
        String::from_utf8_lossy(&data[head_end..head_end + length]).into_owned(),
    ))
}

/// Sends `GET path` on `stream` (kept alive) and reads the answer.
async fn get(stream: &mut TcpStream, path: &str, extra: &str) -> Option<(u16, String)> {
    let req = format!("GET {path} HTTP/1.1\r\nhost: bulkhead\r\n{extra}\r\n");
    stream.write_all(req.as_bytes()).await.ok()?;
    read_response(stream).await
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_headers_idle_connections_and_stalled_bodies_are_closed_by_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let (config, data) = write_config(
        dir.path(),
        "header_read_timeout = \"1 s\"\nidle_timeout = \"1 s\"\nbody_read_timeout = \"1 s\"",
        "",
    );
    let served = Served::start(&config);
    let secret = token(&data, "acme", &["hello:run"]).await;
    let to = served.public;

    // Slowloris: a header block trickled a byte at a time, never finished.
    let slow_headers = tokio::spawn(async move {
        let mut s = connect_from("127.0.0.1", to).await;
        s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-slow: ")
            .await
            .unwrap();
        let mut trickle = tokio::time::interval(Duration::from_millis(200));
        let mut buf = [0u8; 1024];
        tokio::time::timeout(PATIENCE, async {
            loop {
                tokio::select! {
                    _ = trickle.tick() => {
                        if s.write_all(b"a").await.is_err() {
                            return;
                        }
                    }
                    r = s.read(&mut buf) => match r {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    },
                }
            }
        })
        .await
        .is_ok()
    });
    // A connection that never sends a byte.
    let silent = tokio::spawn(async move {
        let mut s = connect_from("127.0.0.1", to).await;
        closed_by_server(&mut s).await
    });
    // A kept-alive connection after one answered request.
    let kept_alive = tokio::spawn(async move {
        let mut s = connect_from("127.0.0.1", to).await;
        let (status, _) = get(&mut s, "/healthz", "").await.unwrap();
        assert_eq!(status, 200);
        closed_by_server(&mut s).await
    });
    // A submission that declares a body and stops sending it.
    let stalled_body = tokio::spawn(async move {
        let mut s = connect_from("127.0.0.1", to).await;
        let head = format!(
            "POST /v1/modules/hello/jobs HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {secret}\r\ncontent-type: application/octet-stream\r\ncontent-length: 100000\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(&[0u8; 1000]).await.unwrap();
        closed_by_server(&mut s).await
    });
    assert!(
        slow_headers.await.unwrap(),
        "a trickled header block is cut off"
    );
    assert!(silent.await.unwrap(), "a silent connection is closed");
    assert!(
        kept_alive.await.unwrap(),
        "an idle kept-alive connection is closed"
    );
    assert!(
        stalled_body.await.unwrap(),
        "a stalled body ends its connection"
    );

    // The service still answers.
    let mut s = connect_from("127.0.0.1", to).await;
    assert_eq!(get(&mut s, "/healthz", "").await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_are_closed_after_the_idle_timeout_not_the_header_allowance() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(
        dir.path(),
        "header_read_timeout = \"10 min\"\nidle_timeout = \"1 s\"",
        "",
    );
    let served = Served::start(&config);
    let mut silent = connect_from("127.0.0.1", served.public).await;
    let mut kept_alive = connect_from("127.0.0.1", served.public).await;
    assert_eq!(get(&mut kept_alive, "/healthz", "").await.unwrap().0, 200);
    assert!(
        closed_by_server(&mut silent).await,
        "a silent connection is closed"
    );
    assert!(
        closed_by_server(&mut kept_alive).await,
        "an idle kept-alive connection is closed"
    );
}

/// Whether the server's end of the connection from `client` to `server`
/// is still established, from the kernel's table (`/proc/net/tcp`).
fn server_end_established(server: SocketAddr, client: SocketAddr) -> bool {
    let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let local = format!(":{:04X}", server.port());
    let remote = format!(":{:04X}", client.port());
    tcp.lines().skip(1).any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        f.len() > 3 && f[1].ends_with(&local) && f[2].ends_with(&remote) && f[3] == "01"
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_pipelines_requests_and_never_reads_is_closed_after_the_write_timeout() {
    // Only the write timeout can end this connection: the header and idle
    // allowances are far longer than the test waits.
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(
        dir.path(),
        "header_read_timeout = \"10 min\"\nidle_timeout = \"10 min\"\nwrite_timeout = \"1 s\"",
        "",
    );
    let served = Served::start(&config);
    let stream = crate::common::small_window_client(served.public).await;
    let client = stream.local_addr().unwrap();
    // Many pipelined requests for a large answer, and never a byte read:
    // hyper stops reading while its answer is blocked on the full socket.
    let (_read_half, mut write_half) = stream.into_split();
    let writer = tokio::spawn(async move {
        let one = "GET /openapi.json HTTP/1.1\r\nhost: bulkhead\r\n\r\n";
        let _ = write_half.write_all(one.repeat(2000).as_bytes()).await;
        write_half
    });
    let mut established = true;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while established && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        established = server_end_established(served.public, client);
    }
    assert!(
        !established,
        "the server still holds a connection whose client stopped reading"
    );
    writer.abort();
    // The service still answers others.
    let mut other = connect_from("127.0.0.2", served.public).await;
    assert_eq!(get(&mut other, "/healthz", "").await.unwrap().0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn connection_caps_refuse_the_excess_while_others_probes_and_the_admin_api_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let (config, data) = write_config(
        dir.path(),
        "max_connections = 24\nmax_connections_per_client = 8\nhealth_reserve = 2\nadmin_max_connections = 4\nheader_read_timeout = \"60 s\"\nidle_timeout = \"60 s\"\nbody_read_timeout = \"60 s\"\nmin_body_rate = \"0 B\"\nmax_uploads_per_tenant = 64",
        "",
    );
    let served = Served::start(&config);
    let admin_token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let secret = token(&data, "acme", &["hello:run"]).await;
    let to = served.public;

    // Held connections, each with a request in flight (so none can be shed
    // for a newcomer).
    let mut held = Vec::new();
    for _ in 0..8 {
        held.push(submission_in_flight("127.0.0.2", to, &secret).await);
    }
    // One address over its share is answered 503 and closed…
    let mut over = connect_from("127.0.0.2", to).await;
    let refused = get(&mut over, "/healthz", "").await;
    assert!(
        matches!(refused, None | Some((503, _))),
        "a ninth connection from one address: {refused:?}"
    );
    assert!(closed_by_server(&mut over).await);
    // …while another address is served.
    let mut other = connect_from("127.0.0.3", to).await;
    assert_eq!(get(&mut other, "/v1/modules", "").await.unwrap().0, 401);
    drop(other);

    // Fill the listener from more addresses.
    for from in ["127.0.0.4", "127.0.0.5"] {
        for _ in 0..8 {
            held.push(submission_in_flight(from, to, &secret).await);
        }
    }
    // Full: the reserve answers probes, and only probes, once per connection.
    let mut probe = connect_from("127.0.0.6", to).await;
    assert_eq!(get(&mut probe, "/readyz", "").await.unwrap().0, 200);
    assert!(
        closed_by_server(&mut probe).await,
        "a reserve connection serves one request"
    );
    let mut probe = connect_from("127.0.0.6", to).await;
    let (status, body) = get(&mut probe, "/v1/modules", "").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"code\""), "{body}");
    // The admin listener has its own budget.
    let mut admin = connect_from("127.0.0.1", served.admin).await;
    let auth = format!("authorization: Bearer {}\r\n", admin_token.trim());
    assert_eq!(get(&mut admin, "/healthz", "").await.unwrap().0, 200);
    assert_eq!(get(&mut admin, "/metrics", &auth).await.unwrap().0, 200);

    // Once the held connections go, everyone is served again.
    drop(held);
    for _ in 0..50 {
        let mut s = connect_from("127.0.0.7", to).await;
        if get(&mut s, "/v1/modules", "").await.map(|r| r.0) == Some(401) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the listener never admitted full connections again");
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_headers_get_431_and_a_flood_of_unfinished_headers_holds_little_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(dir.path(), "header_read_timeout = \"60 s\"", "");
    let served = Served::start(&config);
    let to = served.public;

    // 32 KiB of headers: over the 16 KiB default.
    let mut s = connect_from("127.0.0.1", to).await;
    let big = format!("x-big: {}\r\n", "a".repeat(32 << 10));
    let answer = get(&mut s, "/healthz", &big).await;
    assert!(
        matches!(answer, Some((431, _))),
        "32 KiB of headers: {:?}",
        answer.map(|a| a.0)
    );

    // Warm up, then flood: 256 connections from 16 addresses (under every
    // cap), each sending 256 KiB of headers it never finishes.
    let mut s = connect_from("127.0.0.1", to).await;
    assert_eq!(get(&mut s, "/healthz", "").await.unwrap().0, 200);
    let baseline = memory_kib(served.pid(), "VmRSS:");
    let chunk = format!("x-pad: {}\r\n", "b".repeat(1 << 10));
    let mut flood = tokio::task::JoinSet::new();
    for i in 0..256u32 {
        let chunk = chunk.clone();
        flood.spawn(async move {
            let mut s = connect_from(&format!("127.0.1.{}", i % 16 + 1), to).await;
            let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n").await;
            for _ in 0..256 {
                if s.write_all(chunk.as_bytes()).await.is_err() {
                    break;
                }
            }
            s
        });
    }
    let mut open = Vec::new();
    while let Some(s) = flood.join_next().await {
        open.push(s.unwrap());
    }
    let peak = memory_kib(served.pid(), "VmHWM:");
    drop(open);
    // Without a bound, 256 x 256 KiB = 64 MiB of buffered headers.
    assert!(
        peak < baseline + (24 << 10),
        "peak resident set {peak} KiB against {baseline} KiB before the flood"
    );
    // Still answering.
    let mut s = connect_from("127.0.0.1", to).await;
    assert_eq!(get(&mut s, "/healthz", "").await.unwrap().0, 200);
    eprintln!("header flood: resident {baseline} KiB before, peak {peak} KiB");
}

/// Answers of jobs with large reports, flooded from four tenants, hold the
/// process to about `max_buffered_answers` above what it held before, and
/// give it back to the system once they are done: the bound is on the
/// resident set the kernel counts, not on the service's own tally (found
/// by an attacker: the allocator kept what answers freed, and a flood held
/// 1.5 times the budget, 0.6 GB of it while idle afterwards).
#[tokio::test(flavor = "multi_thread")]
async fn a_flood_of_large_answers_holds_about_their_budget_and_gives_it_back() {
    const BUDGET_MIB: u64 = 256;
    let dir = tempfile::tempdir().unwrap();
    let (config, data) = write_config(
        dir.path(),
        &format!("max_buffered_answers = \"{BUDGET_MIB} MiB\""),
        "",
    );
    let served = Served::start(&config);
    let base = served.base();
    let store = SqliteStore::open(&data.join("bulkhead.sqlite"))
        .await
        .unwrap();
    let now = bulkhead::store::now_ms();
    let tenants = ["t1", "t2", "t3", "t4"];
    let mut jobs = Vec::new();
    for tenant in tenants {
        // 100,000 outputs: about 15 MB of JSON, each a few small blocks
        // once decoded; an answer reserves four times the JSON (what it
        // holds), under a tenant's share of 64 MiB but not twice: each
        // tenant has one answer at a time, and all four about the budget.
        let id = crate::common::uuid_like();
        let mut report = bulkhead::sandbox::JobReport::not_run(&id, "hello", "stored by the test");
        report.outputs = (0..100_000)
            .map(|i| bulkhead::job::OutputFile {
                name: format!("pages/{i:06}/a-rendered-page-of-the-document-{i}.png"),
                size: i,
                sha256: format!("{i:064x}"),
            })
            .collect();
        store
            .insert_finished_job(
                &crate::common::finished_record(&id, tenant, now),
                &report,
                now,
                None,
            )
            .await
            .unwrap();
        jobs.push((tenant, id, token(&data, tenant, &["hello:run"]).await));
    }
    drop(store);

    let http = reqwest::Client::new();
    let get = |tenant: usize| {
        let (_, id, secret) = &jobs[tenant];
        http.get(format!("{base}/v1/jobs/{id}")).bearer_auth(secret)
    };
    // Warm up: each tenant's answer once.
    for t in 0..tenants.len() {
        let resp = get(t).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{:?}", resp.headers());
        resp.bytes().await.unwrap();
    }
    let baseline = memory_kib(served.pid(), "VmRSS:");

    // 16 clients, 4 a tenant, each until it has read its answer whole.
    let mut flood = tokio::task::JoinSet::new();
    for c in 0..16 {
        let request = get(c % tenants.len());
        flood.spawn(async move {
            let mut read = 0;
            while read < 1 {
                let resp = request.try_clone().unwrap().send().await.unwrap();
                match resp.status().as_u16() {
                    200 => {
                        resp.bytes().await.unwrap();
                        read += 1;
                    }
                    429 => tokio::time::sleep(Duration::from_millis(20)).await,
                    other => panic!("answered {other}"),
                }
            }
        });
    }
    while let Some(done) = flood.join_next().await {
        done.unwrap();
    }
    let peak = memory_kib(served.pid(), "VmHWM:");
    eprintln!("large answers: resident {baseline} KiB before, peak {peak} KiB");
    // The budget, and a tenth of it for what is not counted (the
    // connections, the runtime).
    let bound = baseline + BUDGET_MIB * 1024 * 11 / 10;
    assert!(
        peak <= bound,
        "peak resident set {peak} KiB against {baseline} KiB before the flood and a budget of {BUDGET_MIB} MiB"
    );
    // Given back once the answers are done (the trim runs after the last).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let idle = memory_kib(served.pid(), "VmRSS:");
        if idle <= baseline + 32 * 1024 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{idle} KiB held after the answers, against {baseline} KiB before"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every audit row in the service's store.
async fn audit_rows(data: &Path) -> Vec<AuditEntry> {
    SqliteStore::open(&data.join("bulkhead.sqlite"))
        .await
        .unwrap()
        .audit(1_000_000)
        .await
        .unwrap()
}

/// Bytes of the store's files (database and its log).
fn store_bytes(data: &Path) -> u64 {
    ["bulkhead.sqlite", "bulkhead.sqlite-wal"]
        .iter()
        .filter_map(|f| std::fs::metadata(data.join(f)).ok())
        .map(|m| m.len())
        .sum()
}

const ANONYMOUS: usize = 20_000;

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_denials_write_a_bounded_audit_with_client_addresses_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (config, data) = write_config(
        dir.path(),
        "",
        "denials_per_client = 5\ndenials_per_minute = 60",
    );
    let mut served = Served::start(&config);
    let base = format!("http://{}", served.public);
    // Warm the store up so its files have their working size.
    let http = reqwest::Client::new();
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let before = store_bytes(&data);

    // 20,000 requests with a well-formed but unknown token from 4 addresses.
    let mut flood = tokio::task::JoinSet::new();
    for worker in 0..16usize {
        let from: IpAddr = format!("127.0.2.{}", worker % 4 + 1).parse().unwrap();
        let http = reqwest::Client::builder()
            .local_address(from)
            .build()
            .unwrap();
        let url = format!("{base}/v1/modules");
        flood.spawn(async move {
            for i in 0..ANONYMOUS / 16 {
                let fake = format!("bkh_{:0>64}", format!("{worker:x}{i:x}"));
                let resp = http.get(&url).bearer_auth(&fake).send().await.unwrap();
                assert_eq!(resp.status(), 401);
            }
        });
    }
    while let Some(done) = flood.join_next().await {
        done.unwrap();
    }
    // SIGTERM: the held-back counts are written as summaries on the way out.
    served.terminate();
    assert!(served.exited_within(PATIENCE).await);
    let grown = store_bytes(&data).saturating_sub(before);
    let rows = audit_rows(&data).await;
    let denied: Vec<_> = rows.iter().filter(|r| r.action == "auth.denied").collect();
    let summaries: Vec<_> = rows
        .iter()
        .filter(|r| r.action == "auth.denied.summary")
        .collect();
    // At most the per-minute allowance for each minute the flood lasted.
    assert!(
        denied.len() <= 4 * 5 * 2,
        "{} rows written one by one",
        denied.len()
    );
    assert!(denied.iter().all(|r| {
        r.client
            .as_deref()
            .is_some_and(|c| c.starts_with("127.0.2."))
    }));
    let held_back: u64 = summaries
        .iter()
        .map(|r| {
            r.detail
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(
        denied.len() as u64 + held_back,
        ANONYMOUS as u64,
        "every denial is written or counted: {summaries:#?}"
    );
    // 20,000 rows of about 100 bytes each would be 2 MB. The log holds each
    // commit's pages (a few 4 KiB frames per row written) until the
    // checkpointer restarts it.
    assert!(grown < 1 << 20, "the store grew by {grown} bytes");
    eprintln!(
        "anonymous flood: {} rows, {} summaries, store +{grown} bytes",
        denied.len(),
        summaries.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_rows_past_retention_are_swept() {
    let dir = tempfile::tempdir().unwrap();
    let (config, data) = write_config(dir.path(), "", "retention = \"1 s\"");
    let served = Served::start(&config);
    let http = reqwest::Client::new();
    for _ in 0..3 {
        let resp = http
            .get(format!("http://{}/v1/modules", served.public))
            .bearer_auth(format!("bkh_{}", "0".repeat(64)))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 401);
    }
    let rows = audit_rows(&data).await;
    assert_eq!(rows.len(), 3, "{rows:#?}");
    assert_eq!(rows[0].client.as_deref(), Some("127.0.0.1"));
    drop(served);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    // The sweeper runs at start, then every minute.
    let _served = Served::start(&config);
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !audit_rows(&data).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "old audit rows are kept"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_exits_within_its_bound_whatever_clients_hold_open() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(
        dir.path(),
        "shutdown_grace = \"1 s\"\nheader_read_timeout = \"10 min\"\nidle_timeout = \"10 min\"\nbody_read_timeout = \"10 min\"",
        "",
    );
    let mut served = Served::start(&config);
    let to = served.public;

    // An unfinished request.
    let mut unfinished = connect_from("127.0.0.1", to).await;
    unfinished
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-half: ")
        .await
        .unwrap();
    // An idle kept-alive connection.
    let mut idle = connect_from("127.0.0.1", to).await;
    assert_eq!(get(&mut idle, "/healthz", "").await.unwrap().0, 200);
    // A slow download: many pipelined requests for the OpenAPI document on
    // a small receive buffer that is never read, so the server is stuck
    // writing.
    let mut download = crate::common::small_window_client(to).await;
    let pipelined = "GET /openapi.json HTTP/1.1\r\nhost: x\r\n\r\n".repeat(2000);
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        download.write_all(pipelined.as_bytes()),
    )
    .await;

    served.terminate();
    // shutdown_grace (1 s) + the close margin (2 s), with room to spare.
    assert!(
        served.exited_within(PATIENCE).await,
        "the process outlived its shutdown bound"
    );
    for (name, s) in [
        ("unfinished", &mut unfinished),
        ("idle", &mut idle),
        ("download", &mut download),
    ] {
        assert!(closed_by_server(s).await, "the {name} connection is closed");
    }
}

/// Every request to stop drains the same way — SIGTERM, SIGINT, SIGHUP
/// (a closed terminal) and SIGQUIT: the process exits 0, not killed by the
/// signal, and a job its grace cut is back in the queue with its attempt
/// given back, written before the process ends (nothing else keeps it
/// alive). The same data directory serves the next start, which runs the
/// job again, so four stops in a row cost it no attempt.
#[tokio::test(flavor = "multi_thread")]
async fn every_stop_signal_drains_and_gives_the_running_job_back_with_its_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let (config, data) = ConfigFile {
        policies: vec![crate::common::sleeper(600_000)],
        server: "shutdown_grace = \"200 ms\"",
        queue: "workers = 2",
        audit: "",
    }
    .write(dir.path());
    let http = reqwest::Client::new();
    let mut secret = None;
    let mut id = None;
    for (name, signal) in [
        ("SIGTERM", libc::SIGTERM),
        ("SIGINT", libc::SIGINT),
        ("SIGHUP", libc::SIGHUP),
        ("SIGQUIT", libc::SIGQUIT),
    ] {
        let mut served = Served::start(&config);
        let base = served.base();
        let secret = match &secret {
            Some(secret) => String::clone(secret),
            None => secret
                .insert(token(&data, "acme", &["hostile:run"]).await)
                .clone(),
        };
        let job = match &id {
            Some(id) => String::clone(id),
            None => {
                let resp = http
                    .post(format!("{base}/v1/modules/hostile/jobs"))
                    .bearer_auth(&secret)
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 202);
                let body: serde_json::Value = resp.json().await.unwrap();
                id.insert(body["id"].as_str().unwrap().to_owned()).clone()
            }
        };
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let body: serde_json::Value = http
                .get(format!("{base}/v1/jobs/{job}"))
                .bearer_auth(&secret)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if body["state"] == "running" {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: the job never ran: {body}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        served.signal(signal);
        assert!(
            served.exited_within(PATIENCE).await,
            "{name}: the process did not exit"
        );
        let status = served.exit_status().unwrap();
        assert!(status.success(), "{name}: the process ended {status}");
        let store = SqliteStore::open(&data.join("bulkhead.sqlite"))
            .await
            .unwrap();
        let left = store.get_job("acme", &job).await.unwrap().unwrap();
        assert_eq!(
            (left.state.as_str(), left.attempts, left.report.is_none()),
            ("queued", 0, true),
            "{name}: the job was not given back: {left:?}"
        );
    }
}

/// Jobs running under `bulkhead serve` at `served`, from its metrics.
async fn jobs_running(served: &Served, data: &Path) -> Option<f64> {
    let admin_token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let metrics = reqwest::Client::new()
        .get(format!("http://{}/metrics", served.admin))
        .bearer_auth(admin_token.trim())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    metrics
        .lines()
        .find(|l| l.starts_with("bulkhead_jobs_running "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
}

/// A job waited for (`?wait=`) when the grace cuts it: one on the inline
/// path (its wall time within the wait) is answered 503 and never stored —
/// its client holds the answer, and a stored copy would run again for no
/// one; a queued one is answered 202 with its state, back in the queue,
/// rather than left to the connections' close.
#[tokio::test(flavor = "multi_thread")]
async fn a_waited_for_job_cut_by_shutdown_is_answered_inline_503_queued_202() {
    for (wall_ms, status, stored) in [(20_000, 503, false), (600_000, 202, true)] {
        let dir = tempfile::tempdir().unwrap();
        let (config, data) = ConfigFile {
            policies: vec![crate::common::sleeper(wall_ms)],
            server: "shutdown_grace = \"300 ms\"",
            queue: "workers = 2",
            audit: "",
        }
        .write(dir.path());
        let mut served = Served::start(&config);
        let base = served.base();
        let secret = token(&data, "acme", &["hostile:run"]).await;
        let waiting = tokio::spawn(
            reqwest::Client::new()
                .post(format!("{base}/v1/modules/hostile/jobs?wait=60s"))
                .bearer_auth(&secret)
                .send(),
        );
        let deadline = tokio::time::Instant::now() + PATIENCE;
        while jobs_running(&served, &data).await != Some(1.0) {
            assert!(tokio::time::Instant::now() < deadline, "the job never ran");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        served.terminate();
        let answer = tokio::time::timeout(PATIENCE, waiting)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(answer.status(), status, "wall time {wall_ms} ms");
        let body = answer.text().await.unwrap();
        assert!(served.exited_within(PATIENCE).await);
        assert!(served.exit_status().unwrap().success());
        let store = SqliteStore::open(&data.join("bulkhead.sqlite"))
            .await
            .unwrap();
        let jobs = store.list_jobs("acme", 100).await.unwrap();
        if stored {
            let body: serde_json::Value = serde_json::from_str(&body).unwrap();
            assert_eq!(body["state"], "queued", "{body}");
            assert_eq!(jobs.len(), 1);
            assert_eq!((jobs[0].state.as_str(), jobs[0].attempts), ("queued", 0));
        } else {
            assert!(
                jobs.is_empty(),
                "an inline job cut by shutdown was stored: {jobs:?}"
            );
        }
    }
}

/// A connection from `from` with a submission in flight: its handler is
/// reading a body of 1,000 bytes, of which 10 were sent. hyper answers
/// `100 Continue` only once the handler asks for the body, so its arrival
/// shows the request reached the handler.
async fn submission_in_flight(from: &str, to: SocketAddr, secret: &str) -> TcpStream {
    let mut s = connect_from(from, to).await;
    let head = format!(
        "POST /v1/modules/hello/jobs HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {secret}\r\ncontent-type: application/octet-stream\r\ncontent-length: 1000\r\nexpect: 100-continue\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    assert_eq!(read_head(&mut s).await.unwrap().0, 100);
    s.write_all(&[b'a'; 10]).await.unwrap();
    s
}

/// Reads one response head on `stream`: its status and lowercased head.
async fn read_head(stream: &mut TcpStream) -> Option<(u16, String)> {
    let mut data = Vec::new();
    let mut byte = [0u8; 1];
    while !data.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout(PATIENCE, stream.read(&mut byte)).await {
            Ok(Ok(1)) => data.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&data).to_lowercase();
    Some((head.split_whitespace().nth(1)?.parse().ok()?, head))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_spread_flood_filling_the_total_is_shed_for_a_normal_client_but_a_request_in_flight_is_not()
 {
    let dir = tempfile::tempdir().unwrap();
    let (config, data) = write_config(
        dir.path(),
        "max_connections = 16\nmax_connections_per_client = 4\nhealth_reserve = 0\nheader_read_timeout = \"60 s\"\nidle_timeout = \"60 s\"\nbody_read_timeout = \"60 s\"\nmin_body_rate = \"0 B\"",
        "",
    );
    let served = Served::start(&config);
    let secret = token(&data, "acme", &["hello:run"]).await;
    let to = served.public;

    let mut in_flight = submission_in_flight("127.0.5.1", to, &secret).await;

    // The rest of the total: two more from the in-flight address, then one
    // each from 13 addresses, every one confirmed served, then left idle.
    let mut originals = Vec::new();
    for i in 0..15u32 {
        let from = if i < 2 {
            "127.0.5.1".to_owned()
        } else {
            format!("127.0.6.{i}")
        };
        let mut s = connect_from(&from, to).await;
        assert_eq!(get(&mut s, "/healthz", "").await.unwrap().0, 200);
        originals.push(s);
    }

    // Full, and every address under its cap: a normal client is served.
    let auth = format!("authorization: Bearer {secret}\r\n");
    let mut normal = connect_from("127.0.7.1", to).await;
    let answer = get(&mut normal, "/v1/modules", &auth).await;
    assert_eq!(
        answer.as_ref().map(|a| a.0),
        Some(200),
        "a normal client on a full listener: {answer:?}"
    );

    // A flood re-opening from fresh addresses sheds every idle connection
    // older than its own, but never the request in flight.
    let mut newcomers = Vec::new();
    for i in 1..=30u32 {
        let mut s = connect_from(&format!("127.0.8.{i}"), to).await;
        assert_eq!(get(&mut s, "/healthz", "").await.unwrap().0, 200);
        newcomers.push(s);
    }
    for (i, s) in originals.iter_mut().enumerate() {
        assert!(closed_by_server(s).await, "idle connection {i} was shed");
    }
    in_flight.write_all(&[b'a'; 990]).await.unwrap();
    let (status, body) = read_response(&mut in_flight)
        .await
        .expect("the request in flight is answered");
    assert_eq!(status, 202, "{body}");
}

/// Sends `request` as is on a new connection to `to`, then returns the
/// answer's status, head and body (read to the end of the connection).
async fn raw_answer(to: SocketAddr, prefix: &str, request: &[u8]) -> (u16, String, String) {
    let mut s = connect_from("127.0.0.1", to).await;
    if !prefix.is_empty() {
        assert_eq!(get(&mut s, prefix, "").await.unwrap().0, 200);
    }
    s.write_all(request).await.unwrap();
    let (status, head) = read_head(&mut s).await.expect("an answer");
    let mut body = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, s.read_to_end(&mut body)).await;
    (status, head, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_hyper_cannot_parse_get_the_json_error_shape_on_both_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(dir.path(), "", "");
    let served = Served::start(&config);
    let many_headers: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let cases: Vec<(&str, Vec<u8>, u16, &str)> = vec![
        (
            "oversized header",
            format!(
                "GET /healthz HTTP/1.1\r\nhost: x\r\nx-big: {}\r\n\r\n",
                "a".repeat(32 << 10)
            )
            .into_bytes(),
            431,
            "headers_too_large",
        ),
        (
            "too many headers",
            format!("GET /healthz HTTP/1.1\r\nhost: x\r\n{many_headers}\r\n").into_bytes(),
            431,
            "headers_too_large",
        ),
        (
            "malformed request line",
            b"GET /healthz NOT-HTTP\r\nhost: x\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
        (
            "bad header bytes",
            b"GET /healthz HTTP/1.1\r\nhost: x\r\nx-bad\x01name: v\r\n\r\n".to_vec(),
            400,
            "bad_request",
        ),
    ];
    for to in [served.public, served.admin] {
        for (name, request, want, code) in &cases {
            // On a fresh connection, and after a request was answered on it.
            for prefix in ["", "/healthz"] {
                let (status, head, body) = raw_answer(to, prefix, request).await;
                let what = format!("{name} (after `{prefix}`) on {to}: {head}{body}");
                assert_eq!(status, *want, "{what}");
                assert!(head.contains("content-type: application/json"), "{what}");
                let json: serde_json::Value = serde_json::from_str(&body).expect(&what);
                assert_eq!(json["error"]["code"], *code, "{what}");
                assert!(json["error"]["message"].is_string(), "{what}");
            }
        }
    }

    // hyper's own 414 (a target over 64 KiB) can only happen with a header
    // cap above it.
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(dir.path(), "max_header_size = \"128 KiB\"", "");
    let served = Served::start(&config);
    let long = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000));
    let (status, head, body) = raw_answer(served.public, "", long.as_bytes()).await;
    assert_eq!(status, 414, "{head}{body}");
    assert!(head.contains("content-type: application/json"), "{head}");
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["error"]["code"], "uri_too_long", "{body}");
}

/// A submission from `from` declaring `length` body bytes: the status of
/// its first answer (100 once the handler reads the body, or a refusal)
/// and the connection.
async fn declared_upload(
    from: &str,
    to: SocketAddr,
    secret: &str,
    length: u64,
) -> (u16, TcpStream) {
    let mut s = connect_from(from, to).await;
    let head = format!(
        "POST /v1/modules/hello/jobs HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {secret}\r\ncontent-type: application/octet-stream\r\ncontent-length: {length}\r\nexpect: 100-continue\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let status = read_head(&mut s).await.map_or(0, |(code, _)| code);
    (status, s)
}

#[tokio::test(flavor = "multi_thread")]
async fn uploads_in_flight_are_bounded_per_tenant_and_in_bytes_held() {
    // One token trickling many bodies from many addresses once held every
    // connection, and 48 bodies of 60 MB held 3 GB: uploads reserve their
    // declared length before a byte is read, within a count per tenant and
    // a total.
    let dir = tempfile::tempdir().unwrap();
    let (config, data) = write_config(
        dir.path(),
        "max_uploads_per_tenant = 4\nmax_buffered_uploads = \"64 MiB\"",
        "",
    );
    let served = Served::start(&config);
    let acme = token(&data, "acme", &["hello:run"]).await;
    let beta = token(&data, "beta", &["hello:run"]).await;
    let gamma = token(&data, "gamma", &["hello:run"]).await;
    let mut held = Vec::new();
    for i in 0..4 {
        let (status, s) =
            declared_upload(&format!("127.0.3.{}", i + 1), served.public, &acme, 1000).await;
        assert_eq!(status, 100, "upload {i} of acme is read");
        held.push(s);
    }
    let (status, mut refused) = declared_upload("127.0.3.9", served.public, &acme, 1000).await;
    assert_eq!(status, 429, "a fifth upload of acme, from another address");
    let (_, body) = read_response_rest(&mut refused).await;
    assert!(body.contains("\"too_many_requests\""), "{body}");
    // Another tenant is read, up to what the service may hold in all.
    let (status, s) = declared_upload("127.0.3.10", served.public, &beta, 60 << 20).await;
    assert_eq!(status, 100, "beta's 60 MiB upload fits the total");
    held.push(s);
    let (status, _) = declared_upload("127.0.3.11", served.public, &gamma, 8 << 20).await;
    assert_eq!(status, 429, "8 MiB more is over the 64 MiB held in all");
    drop(held);
    // Once they are gone, acme uploads again.
    let mut again = None;
    for _ in 0..50 {
        let (status, s) = declared_upload("127.0.3.12", served.public, &acme, 10).await;
        if status == 100 {
            again = Some(s);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(again.is_some(), "acme's reservations were given back");
}

/// The rest of a response whose head was read: its body as text (until
/// the server closes, or briefly waits).
async fn read_response_rest(stream: &mut TcpStream) -> (usize, String) {
    let mut body = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) =
        tokio::time::timeout(Duration::from_millis(500), stream.read(&mut buf)).await
    {
        if n == 0 {
            break;
        }
        body.extend_from_slice(&buf[..n]);
    }
    (body.len(), String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_trickled_below_the_minimum_rate_ends_its_connection_and_stores_nothing() {
    // Only the minimum rate can end this body: the gap between its frames
    // is far inside the body read timeout.
    let dir = tempfile::tempdir().unwrap();
    let (config, data) = write_config(
        dir.path(),
        "body_read_timeout = \"60 s\"\nmin_body_rate = \"1 KiB\"\nmin_rate_grace = \"1 s\"",
        "",
    );
    let served = Served::start(&config);
    let secret = token(&data, "acme", &["hello:run"]).await;
    let mut s = connect_from("127.0.0.1", served.public).await;
    let head = format!(
        "POST /v1/modules/hello/jobs HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {secret}\r\ncontent-type: application/octet-stream\r\ncontent-length: 100000\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(PATIENCE, async {
        let mut trickle = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = trickle.tick() => {
                    if s.write_all(&[b'a'; 10]).await.is_err() {
                        return;
                    }
                }
                r = s.read(&mut buf) => match r {
                    Ok(0) | Err(_) => return,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                },
            }
        }
    })
    .await
    .is_ok();
    assert!(closed, "a trickled body holds its connection");
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || !answer.starts_with("HTTP/1.1 2"),
        "{answer}"
    );
    // Nothing was stored.
    let http = reqwest::Client::new();
    let jobs: serde_json::Value = http
        .get(format!("http://{}/v1/jobs", served.public))
        .bearer_auth(&secret)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed = jobs
        .as_array()
        .or_else(|| jobs["jobs"].as_array())
        .expect("a job list");
    assert!(listed.is_empty(), "{jobs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_reading_below_the_minimum_rate_is_closed() {
    // The reader makes progress every 100 ms, far inside the write timeout:
    // only the minimum write rate can end it.
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(
        dir.path(),
        "header_read_timeout = \"10 min\"\nidle_timeout = \"10 min\"\nwrite_timeout = \"60 s\"\nmin_write_rate = \"1 KiB\"\nmin_rate_grace = \"1 s\"",
        "",
    );
    let served = Served::start(&config);
    let stream = crate::common::small_window_client(served.public).await;
    let client = stream.local_addr().unwrap();
    let (mut read_half, mut write_half) = stream.into_split();
    let writer = tokio::spawn(async move {
        let one = "GET /openapi.json HTTP/1.1\r\nhost: bulkhead\r\n\r\n";
        let _ = write_half.write_all(one.repeat(2000).as_bytes()).await;
        write_half
    });
    // 64 bytes every 100 ms: 640 bytes a second.
    let reader = tokio::spawn(async move {
        let mut buf = [0u8; 64];
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            match read_half.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    });
    let mut established = true;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while established && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        established = server_end_established(served.public, client);
    }
    assert!(
        !established,
        "the server still holds a connection whose client reads at a trickle"
    );
    writer.abort();
    reader.abort();
    let mut other = connect_from("127.0.0.2", served.public).await;
    assert_eq!(get(&mut other, "/healthz", "").await.unwrap().0, 200);
}

/// A client with a small window that reads all along is never taken for
/// one that stopped: a write waits only while the client takes nothing.
/// (By default the socket queued megabytes and said it could take more
/// only once half of them had gone; a reader at 60 KB/s was cut by the
/// write timeout at about 50 s, every time.)
#[tokio::test(flavor = "multi_thread")]
async fn a_client_reading_slowly_but_steadily_is_not_cut_by_the_write_timeout() {
    // Only the write timeout could end this connection: no minimum rate,
    // and the header and idle allowances are far longer than the test.
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(
        dir.path(),
        "header_read_timeout = \"10 min\"\nidle_timeout = \"10 min\"\nwrite_timeout = \"3 s\"\nmin_write_rate = \"0 B\"",
        "",
    );
    let served = Served::start(&config);
    let stream = crate::common::small_window_client(served.public).await;
    let client = stream.local_addr().unwrap();
    let (mut read_half, mut write_half) = stream.into_split();
    let writer = tokio::spawn(async move {
        let one = "GET /openapi.json HTTP/1.1\r\nhost: bulkhead\r\n\r\n";
        let _ = write_half.write_all(one.repeat(2000).as_bytes()).await;
        write_half
    });
    // 4 KiB every 20 ms, about 200 KB/s, for 12 s: several times what the
    // socket queued by default, and never a pause near the timeout.
    let mut buf = vec![0u8; 4096];
    let mut read = 0usize;
    let mut cut = None;
    for _ in 0..600 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        match read_half.read(&mut buf).await {
            Ok(0) => {
                cut = Some(format!("closed after {read} bytes"));
                break;
            }
            Ok(n) => read += n,
            Err(e) => {
                cut = Some(format!("{e} after {read} bytes"));
                break;
            }
        }
    }
    assert_eq!(cut, None, "the server cut a client reading steadily");
    assert!(server_end_established(served.public, client));
    assert!(read > 1 << 20, "{read} bytes read");
    writer.abort();
}

const SCOPE_DENIED: usize = 2_000;

#[tokio::test(flavor = "multi_thread")]
async fn authenticated_denials_write_a_bounded_audit_with_client_addresses_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let (config, data) = write_config(
        dir.path(),
        "",
        "denials_per_client = 5\ndenials_per_minute = 60",
    );
    let mut served = Served::start(&config);
    let base = format!("http://{}", served.public);
    let admin_token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    // A valid token of the tenant, without the module's scope.
    let secret = token(&data, "acme", &["other:run"]).await;
    let from: IpAddr = "127.0.6.1".parse().unwrap();
    let http = reqwest::Client::builder()
        .local_address(from)
        .build()
        .unwrap();
    assert_eq!(
        http.get(format!("{base}/healthz"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let before = store_bytes(&data);

    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..4 {
        let http = http.clone();
        let url = format!("{base}/v1/modules/hello/jobs");
        let secret = secret.clone();
        flood.spawn(async move {
            for _ in 0..SCOPE_DENIED / 4 {
                let resp = http
                    .post(&url)
                    .bearer_auth(&secret)
                    .header("content-type", "application/octet-stream")
                    .body("x")
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 403);
            }
        });
    }
    while let Some(done) = flood.join_next().await {
        done.unwrap();
    }
    // The rows written one by one carry the client's address.
    let listed: Vec<AuditEntry> = reqwest::Client::new()
        .get(format!(
            "http://{}/admin/v1/audit?limit=10000",
            served.admin
        ))
        .bearer_auth(admin_token.trim())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let listed: Vec<_> = listed
        .iter()
        .filter(|r| r.action == "scope.denied")
        .collect();
    assert!(!listed.is_empty());
    assert!(
        listed.iter().all(
            |r| r.client.as_deref() == Some("127.0.6.1") && r.tenant.as_deref() == Some("acme")
        ),
        "{listed:#?}"
    );
    // SIGTERM: the held-back count is written as a summary on the way out.
    served.terminate();
    assert!(served.exited_within(PATIENCE).await);
    let grown = store_bytes(&data).saturating_sub(before);
    let rows = audit_rows(&data).await;
    let denied: Vec<_> = rows.iter().filter(|r| r.action == "scope.denied").collect();
    let summaries: Vec<_> = rows
        .iter()
        .filter(|r| r.action == "scope.denied.summary")
        .collect();
    // At most the per-client allowance for each minute the flood lasted.
    assert!(
        denied.len() <= 5 * 2,
        "{} rows written one by one",
        denied.len()
    );
    assert!(summaries.iter().all(|r| {
        r.client.as_deref() == Some("127.0.6.1") && r.tenant.as_deref() == Some("acme")
    }));
    let held_back: u64 = summaries
        .iter()
        .map(|r| {
            r.detail
                .split_whitespace()
                .next()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(
        denied.len() as u64 + held_back,
        SCOPE_DENIED as u64,
        "every denial is written or counted: {summaries:#?}"
    );
    assert!(grown < 1 << 20, "the store grew by {grown} bytes");
    eprintln!(
        "scope-denied flood: {} rows, {} summaries, store +{grown} bytes",
        denied.len(),
        summaries.len()
    );
}
