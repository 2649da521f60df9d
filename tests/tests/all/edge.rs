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

use std::io::{BufRead, BufReader};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use bulkhead::store::{AuditEntry, JobStore, SqliteStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::common::policy_text;
use crate::durability::token;

/// Far above every timeout the tests configure: only a bound on how long a
/// test waits for something that must happen.
const PATIENCE: Duration = Duration::from_secs(30);

/// Writes a config serving `hello` with `server` appended to `[server]` and
/// `audit` as the `[audit]` table's body; returns it and the data dir.
fn write_config(dir: &Path, server: &str, audit: &str) -> (PathBuf, PathBuf) {
    let data = dir.join("data");
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let hello = policy_text(
        bulkhead_tests::HELLO,
        "hello",
        "[access]\nscopes = [\"hello:run\"]",
    );
    std::fs::write(policies.join("hello.toml"), hello).unwrap();
    let config = dir.join("bulkhead.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{server}\n[storage]\ndata_dir = \"{}\"\ncache_dir = \"{}\"\n[modules]\npolicies_dir = \"{}\"\nmodules_dir = \"{}\"\n[queue]\nworkers = 2\n[audit]\n{audit}\n",
            data.display(),
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("service-cache").display(),
            policies.display(),
            bulkhead_tests::GUESTS_DIR,
        ),
    )
    .unwrap();
    (config, data)
}

/// A running `bulkhead serve`, killed with SIGKILL when dropped.
struct Running {
    child: Child,
    public: SocketAddr,
    admin: SocketAddr,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn start(config: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_bulkhead-under-test"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut reader = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        std::thread::spawn(move || std::io::copy(&mut reader, &mut std::io::sink()));
        let mut addrs = line
            .split(|c: char| c.is_whitespace() || c == ',' || c == ')')
            .filter_map(|w| w.strip_prefix("http://"))
            .map(|a| a.parse::<SocketAddr>().unwrap());
        let (public, admin) = (addrs.next().unwrap(), addrs.next().unwrap());
        Self {
            child,
            public,
            admin,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn terminate(&self) {
        // SAFETY: sending a signal to our own child process.
        assert_eq!(unsafe { libc::kill(self.pid() as i32, libc::SIGTERM) }, 0);
    }

    /// Waits for the process to exit, up to `within`; whether it did.
    async fn exited_within(&mut self, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while tokio::time::Instant::now() < deadline {
            if self.child.try_wait().unwrap().is_some() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
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
    let served = Running::start(&config);
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
    let served = Running::start(&config);
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
    let served = Running::start(&config);
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket
        .bind(SocketAddr::new("127.0.0.1".parse().unwrap(), 0))
        .unwrap();
    let stream = socket.connect(served.public).await.unwrap();
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
        "max_connections = 24\nmax_connections_per_client = 8\nhealth_reserve = 2\nadmin_max_connections = 4\nheader_read_timeout = \"60 s\"\nidle_timeout = \"60 s\"",
        "",
    );
    let served = Running::start(&config);
    let admin_token = std::fs::read_to_string(data.join("admin.token")).unwrap();
    let to = served.public;

    // Held connections, each confirmed served once, then kept alive idle.
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut s = connect_from("127.0.0.2", to).await;
        assert_eq!(get(&mut s, "/healthz", "").await.unwrap().0, 200);
        held.push(s);
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
            let mut s = connect_from(from, to).await;
            assert_eq!(get(&mut s, "/healthz", "").await.unwrap().0, 200);
            held.push(s);
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

/// A field of `/proc/<pid>/status` in KiB (`VmRSS:`, `VmHWM:`).
fn memory_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| {
            l.strip_prefix(field)?
                .trim()
                .strip_suffix("kB")?
                .trim()
                .parse()
                .ok()
        })
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn oversized_headers_get_431_and_a_flood_of_unfinished_headers_holds_little_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (config, _) = write_config(dir.path(), "header_read_timeout = \"60 s\"", "");
    let served = Running::start(&config);
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
    let mut served = Running::start(&config);
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
    let served = Running::start(&config);
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
    let _served = Running::start(&config);
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
    let mut served = Running::start(&config);
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
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut download = socket.connect(to).await.unwrap();
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
