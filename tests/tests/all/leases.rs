//! Leases across nodes on one PostgreSQL database: a job whose node died
//! (its lease ran out) is re-run by a live node, its attempt counted, while
//! another live node's running job is never taken from it.

use std::time::Duration;

use bulkhead::policy::HumanDuration;
use bulkhead::store::{JobRecord, JobState, JobStore, Lease, now_ms};

use crate::common::service::{Server, start};

/// A node on the database at `url`, its leases `lease` long.
async fn node(url: &str, lease: Duration) -> Server {
    let url = url.to_owned();
    start(move |c| {
        c.storage.url = Some(url.try_into().unwrap());
        c.queue.lease = HumanDuration::millis(lease.as_millis() as u64);
        c.queue.workers = 1;
    })
    .await
}

/// A queued `hello` job of acme, as a submission stores it.
fn hello_job(id: &str) -> JobRecord {
    JobRecord {
        id: id.into(),
        tenant: "acme".into(),
        subject: "acme-ci".into(),
        token_id: "t".into(),
        module: "hello".into(),
        module_sha256: "d".into(),
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
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_nodes_job_is_rerun_once_its_lease_runs_out_and_a_live_nodes_is_left_alone() {
    let Some(url) = bulkhead::store::pg_server::fresh_database().await else {
        return;
    };
    // Before this node starts, two other nodes claimed a job each: one
    // died (its lease is not renewed), one lives (its lease holds for the
    // test).
    let store = bulkhead::store::PostgresStore::open(&url, 2).await.unwrap();
    let claim = |id: &'static str, lease: Lease| {
        let store = &store;
        async move {
            store.insert_job(&hello_job(id), None).await.unwrap();
            match store.claim("acme", id, now_ms(), 3, &lease).await.unwrap() {
                bulkhead::store::Claim::Run(_, claim) => claim,
                other => panic!("{id}: {other:?}"),
            }
        }
    };
    let stale = claim(
        "dead-nodes",
        Lease::new("dead-node", Duration::from_millis(300)),
    )
    .await;
    claim(
        "live-nodes",
        Lease::new("live-node", Duration::from_secs(600)),
    )
    .await;

    let s = node(&url, Duration::from_millis(300)).await;
    let token = s.token("acme", &["hello:run"]).await;
    let done = s.finished(&token, "dead-nodes").await;
    assert_eq!(done["state"], "succeeded", "{done:#}");
    let rerun = store.get_job("acme", "dead-nodes").await.unwrap().unwrap();
    assert_eq!(rerun.attempts, 2, "the dead node's start counts");
    // The dead node, back, cannot overwrite the re-run's result.
    let late = bulkhead::sandbox::JobReport::not_run("dead-nodes", "hello", "late");
    assert!(!store.finish_job(&stale, &late, now_ms()).await.unwrap());
    let finished = store
        .audit(50)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.action == "job.finished" && e.job_id.as_deref() == Some("dead-nodes"))
        .count();
    assert_eq!(finished, 1, "finished once");

    // Recovery here never takes another live node's running job.
    s.service.recover().await.unwrap();
    let theirs = store.get_job("acme", "live-nodes").await.unwrap().unwrap();
    assert_eq!((theirs.state, theirs.attempts), (JobState::Running, 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn two_nodes_hold_a_tenants_running_cap_together_and_finish_each_job_once() {
    let Some(url) = bulkhead::store::pg_server::fresh_database().await else {
        return;
    };
    let node = |url: String| {
        start(move |c| {
            c.storage.url = Some(url.try_into().unwrap());
            c.queue.workers = 2;
            c.queue.max_running_per_tenant = 1;
        })
    };
    let (a, b) = (node(url.clone()).await, node(url).await);
    let token = a.token("acme", &["hostile:run"]).await;
    // Sleepers (1 s each), submitted to both nodes in turn.
    let mut ids = Vec::new();
    for i in 0..4 {
        let s = if i % 2 == 0 { &a } else { &b };
        let job = crate::common::http::json(s.post("/v1/modules/hostile/jobs", &token)).await;
        ids.push(job["id"].as_str().unwrap().to_owned());
    }
    let store = a.service.store();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let mut most = 0;
    loop {
        let jobs = store.list_jobs("acme", 100).await.unwrap();
        let running = jobs.iter().filter(|j| j.state == JobState::Running).count();
        most = most.max(running);
        if jobs.iter().all(|j| j.state.is_final()) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{jobs:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(most, 1, "acme runs one job at a time on all nodes together");
    let audit = store.audit(100).await.unwrap();
    for id in &ids {
        let finished = audit
            .iter()
            .filter(|e| e.action == "job.finished" && e.job_id.as_deref() == Some(id))
            .count();
        assert_eq!(finished, 1, "{id} finished once");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wait_and_a_cancel_on_one_node_reach_the_job_another_node_runs() {
    let Some(url) = bulkhead::store::pg_server::fresh_database().await else {
        return;
    };
    // A runs every job, one at a time: a sleeper there runs 60 s, and its
    // lease (2 min) is not renewed within the test, so only a notification
    // can tell A of a cancel. B only takes submissions (it runs nothing:
    // a running cap of 0).
    let a = {
        let url = url.clone();
        start(move |c| {
            c.storage.url = Some(url.try_into().unwrap());
            c.queue.workers = 1;
            c.queue.lease = HumanDuration::secs(120);
            crate::common::policies::sleeper(60_000).write_to(&c.modules.policies_dir);
        })
        .await
    };
    let b = start(move |c| {
        c.storage.url = Some(url.try_into().unwrap());
        c.queue.max_running_per_tenant = 0;
    })
    .await;
    let token = a.token("acme", &["hello:run", "hostile:run"]).await;

    // A waited-for job submitted to B, run by A: B's waiter hears of its end.
    let resp = b
        .post("/v1/modules/hello/jobs?wait=20s", &token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let done: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(done["state"], "succeeded", "{done:#}");

    // A sleeper submitted to B runs on A; cancelled through B, A stops it,
    // and its one slot runs the next job.
    let sleeper = crate::common::http::json(b.post("/v1/modules/hostile/jobs", &token)).await;
    let id = sleeper["id"].as_str().unwrap().to_owned();
    let store = a.service.store();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while store.get_job("acme", &id).await.unwrap().unwrap().state != JobState::Running {
        assert!(tokio::time::Instant::now() < deadline, "never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let resp = b
        .post(&format!("/v1/jobs/{id}/cancel"), &token)
        .send()
        .await
        .unwrap();
    assert!(resp.status().is_success(), "{}", resp.status());
    let resp = b
        .post("/v1/modules/hello/jobs?wait=20s", &token)
        .send()
        .await
        .unwrap();
    let next: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(next["state"], "succeeded", "A's slot was freed: {next:#}");
    let cancelled = store.get_job("acme", &id).await.unwrap().unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_queued_gauge_counts_every_nodes_queued_jobs() {
    let Some(url) = bulkhead::store::pg_server::fresh_database().await else {
        return;
    };
    let s = node(&url, Duration::from_millis(300)).await;
    // Queued through other nodes, for a module only they serve: this node
    // never claims them, and its gauge still counts them.
    let store = bulkhead::store::PostgresStore::open(&url, 2).await.unwrap();
    for id in ["e1", "e2", "e3"] {
        let job = JobRecord {
            module: "elsewhere".into(),
            ..hello_job(id)
        };
        store.insert_job(&job, None).await.unwrap();
    }
    let mut metrics = String::new();
    for _ in 0..300 {
        metrics = s.service.render_metrics();
        if metrics.lines().any(|l| l == "bulkhead_jobs_queued 3") {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the gauge never counted the store's 3 queued jobs:\n{metrics}");
}
