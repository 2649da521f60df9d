//! Three real `bulkhead serve` nodes on one PostgreSQL database (a server
//! the test starts itself), each with its own data directory: 2,000 jobs
//! submitted round-robin over the nodes and three tenants, one node killed
//! with SIGKILL while it runs jobs. Judged from the database and from every
//! surviving node's API, never from what a guest printed:
//! - every acknowledged job finishes exactly once (one `job.finished` audit
//!   row), succeeded, and a job the killed node held was run again
//!   elsewhere, its attempts counted;
//! - each job's output downloads, byte for byte, from every surviving node;
//! - the per-tenant running cap holds across the nodes together;
//! - no tenant sees another's jobs or outputs on any node.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::StatusCode;
use sqlx::Row as _;

use crate::common::{self, Cluster, ConfigFile, Served};

const TENANTS: [&str; 3] = ["acme", "globex", "initech"];
/// Jobs of one tenant running at once, on all nodes together.
const TENANT_CAP: i64 = 2;
const JOBS: usize = 2_000;

/// A token for `tenant` issued by `bulkhead token issue --config` of a node
/// (so through the database the config names).
fn issue(config: &Path, tenant: &str) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead-under-test"))
        .args(["token", "issue", "--config"])
        .arg(config)
        .args([
            "--tenant",
            tenant,
            "--subject",
            "load",
            "--scope",
            "p1-files:run",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let secret = String::from_utf8(out.stdout).unwrap().trim().to_owned();
    assert!(!secret.is_empty() && !secret.contains('\n'), "{secret:?}");
    secret
}

/// Submits job `i` of `tenant` to `base`; its id once acknowledged (202).
async fn submit(http: &reqwest::Client, base: &str, token: &str, body: Vec<u8>) -> Option<String> {
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(body).file_name("in.txt"),
    );
    let resp = http
        .post(format!("{base}/v1/modules/p1-files/jobs"))
        .bearer_auth(token)
        .multipart(form)
        .send()
        .await
        .ok()?;
    if resp.status() != StatusCode::ACCEPTED {
        eprintln!(
            "{base}: {} {}",
            resp.status(),
            resp.text().await.unwrap_or_default()
        );
        return None;
    }
    let v: serde_json::Value = resp.json().await.ok()?;
    Some(v["id"].as_str()?.to_owned())
}

/// The body job `i` of `tenant` is submitted with.
fn body(tenant: &str, i: usize) -> Vec<u8> {
    format!("{tenant} job {i}\n").into_bytes()
}

/// Submits jobs `range` round-robin over `nodes` and the tenants, 16 at a
/// time; returns (tenant, index, id) of every acknowledged one.
async fn submit_all(
    http: &reqwest::Client,
    nodes: &[String],
    tokens: &HashMap<&'static str, String>,
    range: std::ops::Range<usize>,
) -> Vec<(&'static str, usize, String)> {
    use futures::StreamExt as _;
    futures::stream::iter(range)
        .map(|i| {
            let tenant = TENANTS[i % TENANTS.len()];
            let base = nodes[i % nodes.len()].clone();
            let token = tokens[tenant].clone();
            let http = http.clone();
            async move {
                submit(&http, &base, &token, body(tenant, i))
                    .await
                    .map(|id| (tenant, i, id))
            }
        })
        .buffer_unordered(16)
        .filter_map(|x| async move { x })
        .collect()
        .await
}

/// Samples the database's running jobs per tenant until `stop`; the most
/// seen at once for any tenant.
async fn watch_running(db: sqlx::PgPool, stop: Arc<AtomicBool>) -> i64 {
    let mut most = 0;
    while !stop.load(Ordering::SeqCst) {
        let rows = sqlx::query(
            "SELECT tenant, count(*) AS n FROM jobs WHERE state = 'running' GROUP BY tenant",
        )
        .fetch_all(&db)
        .await
        .unwrap();
        for row in rows {
            most = most.max(row.get::<i64, _>("n"));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    most
}

/// Jobs the database shows running on the node named `name`.
async fn running_on(db: &sqlx::PgPool, name: &str) -> Vec<String> {
    sqlx::query("SELECT id FROM jobs WHERE state = 'running' AND claimed_by LIKE $1")
        .bind(format!("{name}-%"))
        .fetch_all(db)
        .await
        .unwrap()
        .into_iter()
        .map(|r| r.get("id"))
        .collect()
}

fn signal(node: &Served, sig: i32) {
    // SAFETY: signalling our own child process.
    assert_eq!(unsafe { libc::kill(node.pid() as i32, sig) }, 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn three_nodes_run_every_acknowledged_job_once_when_one_is_killed() {
    let queue = format!(
        "workers = 4\nmax_queued = 10000\nmax_queued_per_tenant = 10000\n\
         max_running_per_tenant = {TENANT_CAP}\nmax_attempts = 3\nlease = \"2 s\""
    );
    let file = ConfigFile {
        policies: vec![
            common::policy(bulkhead_tests::P1_FILES, "p1-files")
                .scopes(&["p1-files:run"])
                .args(&["--nap-ms=30"]),
        ],
        queue: &queue,
        ..ConfigFile::default()
    };
    let Some(mut cluster) = Cluster::start(3, &file, "").await else {
        return;
    };
    let url = cluster.url.clone();
    let bases: Vec<String> = (0..3).map(|i| cluster.base(i)).collect();
    let tokens: HashMap<&'static str, String> = TENANTS
        .iter()
        .enumerate()
        .map(|(i, t)| (*t, issue(cluster.config(i), t)))
        .collect();
    let db = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .unwrap();
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn(watch_running(db.clone(), Arc::clone(&stop)));

    // First half over all three nodes.
    let mut acked = submit_all(&http, &bases, &tokens, 0..JOBS / 2).await;
    assert_eq!(
        acked.len(),
        JOBS / 2,
        "every submission to a live node is acknowledged"
    );

    // Node 2 is frozen while it holds running jobs (so none of them can
    // finish between looking and killing), then killed.
    let mut held = Vec::new();
    for _ in 0..200 {
        signal(&cluster.nodes[2], libc::SIGSTOP);
        held = running_on(&db, "node-2").await;
        if !held.is_empty() {
            break;
        }
        signal(&cluster.nodes[2], libc::SIGCONT);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!held.is_empty(), "node 2 never held a running job");
    signal(&cluster.nodes[2], libc::SIGKILL);
    drop(cluster.nodes.pop());

    // Second half over the survivors.
    acked.extend(submit_all(&http, &bases[..2], &tokens, JOBS / 2..JOBS).await);
    assert_eq!(acked.len(), JOBS);

    // Every job in the database reaches a final state (bounded wait).
    let mut pending = i64::MAX;
    for _ in 0..1_200 {
        pending = sqlx::query("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")
            .fetch_one(&db)
            .await
            .unwrap()
            .get(0);
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(pending, 0, "jobs left unfinished");
    stop.store(true, Ordering::SeqCst);
    let most_running = watcher.await.unwrap();
    assert!(
        most_running <= TENANT_CAP,
        "{most_running} jobs of one tenant ran at once across the nodes (cap {TENANT_CAP})"
    );

    // Exactly once: every acknowledged job succeeded and has one
    // `job.finished` audit row; the jobs node 2 held were started again.
    let rows = sqlx::query("SELECT id, tenant, state, attempts FROM jobs")
        .fetch_all(&db)
        .await
        .unwrap();
    let jobs: HashMap<String, (String, String, i32)> = rows
        .into_iter()
        .map(|r| {
            (
                r.get("id"),
                (r.get("tenant"), r.get("state"), r.get("attempts")),
            )
        })
        .collect();
    let finished: HashMap<String, i64> = sqlx::query(
        "SELECT job_id, count(*) AS n FROM audit WHERE action = 'job.finished' GROUP BY job_id",
    )
    .fetch_all(&db)
    .await
    .unwrap()
    .into_iter()
    .map(|r| (r.get("job_id"), r.get("n")))
    .collect();
    for (tenant, _, id) in &acked {
        let (owner, state, _) = &jobs[id];
        assert_eq!(
            (owner.as_str(), state.as_str()),
            (*tenant, "succeeded"),
            "job {id}"
        );
        assert_eq!(finished.get(id), Some(&1), "job.finished rows of job {id}");
    }
    for id in &held {
        let (_, state, attempts) = &jobs[id];
        assert_eq!(state, "succeeded", "job {id} held by the killed node");
        assert!(
            *attempts >= 2,
            "job {id} held by the killed node: {attempts} attempts"
        );
    }
    let ids: HashSet<&String> = acked.iter().map(|(_, _, id)| id).collect();
    assert_eq!(ids.len(), JOBS, "ids are unique");

    // Outputs from every surviving node, and tenants isolated on each.
    for (n, (tenant, i, id)) in acked.iter().enumerate() {
        for base in &bases[..2] {
            let resp = http
                .get(format!("{base}/v1/jobs/{id}/outputs/in.txt"))
                .bearer_auth(&tokens[tenant])
                .send()
                .await
                .unwrap();
            assert_eq!(resp.status(), StatusCode::OK, "job {id} output from {base}");
            assert_eq!(
                resp.bytes().await.unwrap(),
                body(tenant, *i),
                "job {id} from {base}"
            );
            if n % 40 == 0 {
                let mine = TENANTS.iter().position(|t| t == tenant).unwrap();
                let other = &tokens[TENANTS[(mine + 1 + (n / 40) % 2) % 3]];
                for path in [
                    format!("/v1/jobs/{id}"),
                    format!("/v1/jobs/{id}/outputs/in.txt"),
                ] {
                    let resp = http
                        .get(format!("{base}{path}"))
                        .bearer_auth(other)
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(
                        resp.status(),
                        StatusCode::NOT_FOUND,
                        "{path} as another tenant on {base}"
                    );
                }
            }
        }
    }
}
