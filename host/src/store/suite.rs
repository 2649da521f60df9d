//! The store's behavioural suite, run twice: against a SQLite file and
//! against a PostgreSQL database on a server the tests start themselves
//! (`pg_server`). Each test is written once, over `Arc<dyn JobStore>`;
//! `suite!` makes a `sqlite::<test>` and a `postgres::<test>` of it.
//! Tests of one store's own machinery (SQLite's WAL, its in-place schema
//! upgrades, its full disk) stay beside that store.

use std::sync::Arc;

use super::{
    AuditEntry, CancelOutcome, Caps, Claim, Claimed, DeleteOutcome, Idempotency, Inserted,
    JobRecord, JobState, JobStore, Lease, PostgresStore, ReportOf, SqliteStore, now_ms,
};
use crate::auth::TokenRecord;

/// One test's database, on one of the two stores.
enum Db {
    Sqlite(tempfile::TempDir),
    Postgres(String),
}

impl Db {
    async fn sqlite() -> Option<Self> {
        Some(Db::Sqlite(tempfile::tempdir().unwrap()))
    }

    async fn postgres() -> Option<Self> {
        super::pg_server::fresh_database().await.map(Db::Postgres)
    }

    /// Opens (again) this test's database.
    async fn open(&self) -> Arc<dyn JobStore> {
        match self {
            Db::Sqlite(dir) => Arc::new(
                SqliteStore::open(&dir.path().join("db.sqlite"))
                    .await
                    .unwrap(),
            ),
            // A long wait for a connection: the suite runs beside builds on
            // two shared cores, where forking a backend can take seconds.
            Db::Postgres(url) => Arc::new(
                PostgresStore::open_waiting(url, 4, std::time::Duration::from_secs(60))
                    .await
                    .unwrap(),
            ),
        }
    }
}

macro_rules! suite {
    ($($test:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    if let Some(db) = super::Db::sqlite().await {
                        super::$test(&db).await;
                    }
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    if let Some(db) = super::Db::postgres().await {
                        super::$test(&db).await;
                    }
                }
            )*
        }
    };
}

suite!(
    a_reports_stored_length_is_known_by_id_or_key_without_reading_it,
    jobs_are_bound_to_their_tenant_and_move_through_states,
    finishing_a_job_writes_its_audit_entry,
    the_finished_audit_row_says_what_the_typed_report_says,
    only_the_claim_that_holds_a_job_finishes_or_requeues_it,
    concurrent_writes_commit_and_one_failure_spares_the_rest,
    the_database_survives_reopening,
    a_job_started_max_attempts_times_is_finished_failed_not_rerun,
    a_requeue_after_a_storage_failure_gives_the_attempt_back,
    an_idempotency_key_names_one_job_per_tenant_until_it_expires,
    concurrent_submissions_with_one_key_store_one_job,
    concurrent_claims_of_one_job_run_it_once,
    a_cancelled_or_finished_job_is_never_claimed_and_a_cancel_beats_a_finish,
    tokens_are_found_by_hash_and_id_listed_and_revoked,
    finished_jobs_and_old_audit_rows_expire,
    recovery_sees_pending_jobs_oldest_first_with_their_claims,
    a_job_whose_lease_ran_out_is_requeued_with_its_attempt_counted,
    a_lease_that_ran_out_on_the_last_attempt_fails_the_job_with_the_reason,
    a_stale_node_can_neither_finish_nor_requeue_nor_renew_after_a_reclaim,
    a_renewed_lease_holds_and_a_cancelled_job_is_lost_to_its_node,
    at_start_only_leases_that_ran_out_are_taken_back_on_postgres,
    the_next_claim_goes_to_the_tenant_with_fewest_running_oldest_first_under_the_caps,
    concurrent_claims_of_two_nodes_never_exceed_the_caps,
    queued_counts_are_per_tenant_and_in_total,
);

/// `node`'s lease that has run out as soon as it is taken: the job it
/// claims is recovery's at once (as after a crash).
fn dead(node: &str) -> Lease {
    Lease {
        node: node.into(),
        millis: -1,
    }
}

/// `node`'s lease that holds for the whole test.
fn live(node: &str) -> Lease {
    Lease {
        node: node.into(),
        millis: 600_000,
    }
}

/// Claims acme's queued job `id`, which must run (as node `n1`, its lease
/// run out at once).
pub(super) async fn claim(store: &dyn JobStore, id: &str, now: i64) -> (JobRecord, Claimed) {
    match store.claim("acme", id, now, 3, &dead("n1")).await.unwrap() {
        Claim::Run(job, claim) => (*job, claim),
        other => panic!("{id} not claimed: {other:?}"),
    }
}

fn job(id: &str, tenant: &str) -> JobRecord {
    JobRecord {
        id: id.into(),
        tenant: tenant.into(),
        subject: "s".into(),
        token_id: "tok".into(),
        module: "hello".into(),
        module_sha256: "d".into(),
        policy_sha256: None,
        params: [("width".to_owned(), "5".to_owned())].into(),
        inputs: vec!["a.png".into()],
        has_stdin: false,
        state: JobState::Queued,
        created_at: now_ms(),
        started_at: None,
        finished_at: None,
        attempts: 0,
        report: None,
    }
}

async fn jobs_are_bound_to_their_tenant_and_move_through_states(db: &Db) {
    let store = db.open().await;
    let j1 = job("j1", "acme");
    store.insert_job(&j1, None).await.unwrap();
    assert!(store.get_job("other", "j1").await.unwrap().is_none());
    assert_eq!(store.get_job("acme", "j1").await.unwrap(), Some(j1));
    assert_eq!(
        store.delete_job("acme", "j1").await.unwrap(),
        DeleteOutcome::NotFinished(JobState::Queued)
    );
    assert_eq!(
        store.claim("other", "j1", 1, 3, &dead("n1")).await.unwrap(),
        Claim::Gone,
        "another tenant's job is not claimed"
    );
    let (claimed, _) = claim(&*store, "j1", 1).await;
    assert_eq!(
        (claimed.attempts, claimed.state, claimed.started_at),
        (1, JobState::Running, Some(1))
    );
    assert_eq!(
        store.claim("acme", "j1", 1, 3, &dead("n1")).await.unwrap(),
        Claim::Gone,
        "only from queued"
    );
    assert_eq!(store.requeue_running().await.unwrap(), 1);
    assert_eq!(store.queued_jobs().await.unwrap().len(), 1);
    assert_eq!(
        store.cancel_job("other", "j1", 2).await.unwrap(),
        CancelOutcome::NotFound
    );
    assert_eq!(
        store.cancel_job("acme", "j1", 2).await.unwrap(),
        CancelOutcome::Cancelled(JobState::Queued)
    );
    assert_eq!(
        store.cancel_job("acme", "j1", 3).await.unwrap(),
        CancelOutcome::AlreadyFinished(JobState::Cancelled)
    );
    assert_eq!(
        store.claim("acme", "j1", 3, 3, &dead("n1")).await.unwrap(),
        Claim::Gone,
        "a cancelled job never runs"
    );
    assert_eq!(
        store.delete_job("other", "j1").await.unwrap(),
        DeleteOutcome::NotFound
    );
    assert_eq!(
        store.delete_job("acme", "j1").await.unwrap(),
        DeleteOutcome::Deleted
    );
    assert!(!store.job_exists("j1").await.unwrap());
}

async fn a_reports_stored_length_is_known_by_id_or_key_without_reading_it(db: &Db) {
    let store = db.open().await;
    let mut report = crate::job::JobReport::not_run("big", "hello", "boom");
    report.stdout.text = "é\u{0}x".repeat(100_000);
    let key = Idempotency {
        key: "k1".into(),
        request_sha256: "h".into(),
        since: 0,
    };
    store
        .insert_finished_job(&job("big", "acme"), &report, 7, Some(&key))
        .await
        .unwrap();
    store
        .insert_job(&job("queued", "acme"), None)
        .await
        .unwrap();
    let stored = serde_json::to_string(&report).unwrap().len() as u64;
    assert_eq!(
        store.report_len("acme", ReportOf::Id("big")).await.unwrap(),
        Some(stored),
        "bytes, not characters"
    );
    assert_eq!(
        store
            .report_len("acme", ReportOf::Key("k1", 0))
            .await
            .unwrap(),
        Some(stored)
    );
    for (tenant, of) in [
        ("acme", ReportOf::Id("queued")),
        ("acme", ReportOf::Id("nope")),
        ("other", ReportOf::Id("big")),
        ("other", ReportOf::Key("k1", 0)),
        ("acme", ReportOf::Key("k1", now_ms() + 1)),
    ] {
        assert_eq!(
            store.report_len(tenant, of).await.unwrap(),
            None,
            "{tenant} {of:?}"
        );
    }
}

async fn finishing_a_job_writes_its_audit_entry(db: &Db) {
    let store = db.open().await;
    store.insert_job(&job("j1", "acme"), None).await.unwrap();
    let (_, claimed) = claim(&*store, "j1", 1).await;
    let mut report = crate::sandbox::JobReport::not_run("j1", "hello", "boom");
    report.limit = Some(crate::sandbox::LimitKind::Memory);
    assert!(store.finish_job(&claimed, &report, 7).await.unwrap());
    let audit = store.audit(10).await.unwrap();
    assert_eq!(audit.len(), 1);
    let e = &audit[0];
    assert_eq!(
        (
            e.action.as_str(),
            e.tenant.as_deref(),
            e.job_id.as_deref(),
            e.outcome.as_deref()
        ),
        ("job.finished", Some("acme"), Some("j1"), Some("failed"))
    );
    assert_eq!(
        (e.limit.as_deref(), e.detail.as_str(), e.at),
        (Some("memory"), "boom", 7)
    );
    assert!(
        !store.finish_job(&claimed, &report, 8).await.unwrap(),
        "only once"
    );
    assert_eq!(store.audit(10).await.unwrap().len(), 1);
    let stored = store.get_job("acme", "j1").await.unwrap().unwrap();
    assert_eq!(
        (stored.state, stored.finished_at, stored.report),
        (JobState::Failed, Some(7), Some(report.clone()))
    );
    // A listing shows it in a few words, written beside the report.
    let listed = store.list_jobs("acme", 10).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(
        (listed[0].state, listed[0].finished_at, &listed[0].report),
        (JobState::Failed, Some(7), &Some(report.summary()))
    );
}

async fn the_finished_audit_row_says_what_the_typed_report_says(db: &Db) {
    use crate::job::{JobReport, LimitKind, Outcome};
    let store = db.open().await;
    let mut succeeded = JobReport::not_run("ok", "hello", "");
    (succeeded.outcome, succeeded.failure) = (Outcome::Succeeded, None);
    let mut limited = Vec::new();
    for (i, kind) in [
        LimitKind::CpuTime,
        LimitKind::Tables,
        LimitKind::OutputFiles,
    ]
    .into_iter()
    .enumerate()
    {
        let mut report = JobReport::not_run(&format!("l{i}"), "hello", format!("hit {i}"));
        report.limit = Some(kind);
        limited.push(report);
    }
    for report in std::iter::once(&succeeded).chain(&limited) {
        store
            .insert_job(&job(&report.job_id, "acme"), None)
            .await
            .unwrap();
        let (_, claimed) = claim(&*store, &report.job_id, 1).await;
        assert!(store.finish_job(&claimed, report, 5).await.unwrap());
    }
    // The inline path writes the same entry.
    let mut inline = limited[0].clone();
    inline.job_id = "inline".into();
    store
        .insert_finished_job(&job("inline", "acme"), &inline, 6, None)
        .await
        .unwrap();
    let stored = store.get_job("acme", "inline").await.unwrap().unwrap();
    assert_eq!(
        (stored.state, stored.attempts, stored.finished_at),
        (JobState::Failed, 1, Some(6))
    );
    let audit = store.audit(10).await.unwrap();
    assert_eq!(audit.len(), 5, "one entry per finished job: {audit:#?}");
    for report in std::iter::once(&succeeded).chain(&limited).chain([&inline]) {
        let e = audit
            .iter()
            .find(|e| e.job_id.as_deref() == Some(report.job_id.as_str()))
            .unwrap();
        // The audit's names are the report's own, as clients read them.
        let json = serde_json::to_value(report).unwrap();
        assert_eq!(e.action, "job.finished");
        assert_eq!(e.outcome.as_deref(), json["outcome"].as_str(), "{e:?}");
        assert_eq!(e.limit.as_deref(), json["limit"].as_str(), "{e:?}");
        assert_eq!(
            e.detail.as_str(),
            json["failure"]["message"].as_str().unwrap_or(""),
            "{e:?}"
        );
        assert_eq!(
            (
                e.tenant.as_deref(),
                e.subject.as_deref(),
                e.module.as_deref()
            ),
            (Some("acme"), Some("s"), Some("hello"))
        );
        assert_eq!(e.module_sha256.as_deref(), Some("d"));
    }
    assert_eq!(audit[0].limit.as_deref(), Some("cpu_time"));
    assert_eq!(
        audit[4].outcome.as_deref(),
        Some("succeeded"),
        "{:?}",
        audit[4]
    );
}

async fn only_the_claim_that_holds_a_job_finishes_or_requeues_it(db: &Db) {
    let store = db.open().await;
    store.insert_job(&job("j1", "acme"), None).await.unwrap();
    let (_, first) = claim(&*store, "j1", 1).await;
    // A failure leaves it running; recovery takes it over and gives it
    // back, and another start claims it.
    let pending = store.pending_jobs().await.unwrap();
    let recovered = pending[0].claim.clone().unwrap();
    assert_eq!(recovered, first);
    assert!(store.requeue(&recovered, true).await.unwrap());
    let (_, second) = claim(&*store, "j1", 2).await;
    let report = crate::sandbox::JobReport::not_run("j1", "hello", "late");
    assert!(
        !store.finish_job(&first, &report, 3).await.unwrap(),
        "the first start's claim no longer holds"
    );
    assert!(!store.requeue(&first, true).await.unwrap());
    assert!(store.audit(10).await.unwrap().is_empty());
    assert!(store.finish_job(&second, &report, 4).await.unwrap());
    assert_eq!(store.audit(10).await.unwrap().len(), 1);
}

async fn concurrent_writes_commit_and_one_failure_spares_the_rest(db: &Db) {
    let store = db.open().await;
    store.insert_job(&job("dup", "acme"), None).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..40 {
        let store = Arc::clone(&store);
        // Every tenth write collides with the existing primary key.
        let id = if i % 10 == 0 {
            "dup".to_owned()
        } else {
            format!("j{i}")
        };
        tasks.push(tokio::spawn(async move {
            (id.clone(), store.insert_job(&job(&id, "acme"), None).await)
        }));
    }
    let mut failed = 0;
    for t in tasks {
        let (id, result) = t.await.unwrap();
        match result {
            Ok(_) => assert!(
                store.get_job("acme", &id).await.unwrap().is_some(),
                "{id} reported but missing"
            ),
            Err(e) => {
                assert_eq!(id, "dup");
                assert!(!e.is_storage(), "a request's failure, not the store's: {e}");
                failed += 1;
            }
        }
    }
    assert_eq!(failed, 4);
    assert_eq!(store.list_jobs("acme", 100).await.unwrap().len(), 37);
    assert_eq!(store.list_jobs("acme", 5).await.unwrap().len(), 5);
}

async fn the_database_survives_reopening(db: &Db) {
    {
        let store = db.open().await;
        store.insert_job(&job("j1", "acme"), None).await.unwrap();
    }
    let store = db.open().await;
    assert!(store.get_job("acme", "j1").await.unwrap().is_some());
    // Opening applies nothing twice.
    let again = db.open().await;
    assert!(again.get_job("acme", "j1").await.unwrap().is_some());
}

async fn a_job_started_max_attempts_times_is_finished_failed_not_rerun(db: &Db) {
    let store = db.open().await;
    store.insert_job(&job("j1", "acme"), None).await.unwrap();
    // Three starts, each ended by a crash (recovery re-queues it).
    for attempt in 1..=3 {
        let (j, _) = claim(&*store, "j1", attempt).await;
        assert_eq!(j.attempts, attempt as u32);
        assert_eq!(store.requeue_running().await.unwrap(), 1);
    }
    let Claim::GaveUp(j) = store.claim("acme", "j1", 9, 3, &dead("n1")).await.unwrap() else {
        panic!("a fourth start")
    };
    assert_eq!((j.state, j.attempts), (JobState::Failed, 3));
    let stored = store.get_job("acme", "j1").await.unwrap().unwrap();
    assert_eq!(stored.state, JobState::Failed);
    let message = &stored.report.unwrap().failure.unwrap().message;
    assert!(message.contains("3 attempts"), "{message}");
    assert!(store.pending_jobs().await.unwrap().is_empty());
    let audit = store.audit(10).await.unwrap();
    assert_eq!(
        (audit[0].action.as_str(), audit[0].outcome.as_deref()),
        ("job.finished", Some("failed"))
    );
    assert_eq!(
        store.claim("acme", "j1", 10, 3, &dead("n1")).await.unwrap(),
        Claim::Gone
    );
}

async fn a_requeue_after_a_storage_failure_gives_the_attempt_back(db: &Db) {
    let store = db.open().await;
    store.insert_job(&job("j1", "acme"), None).await.unwrap();
    let (_, first) = claim(&*store, "j1", 1).await;
    assert!(store.requeue(&first, false).await.unwrap());
    assert!(!store.requeue(&first, false).await.unwrap(), "not running");
    let (j, second) = claim(&*store, "j1", 2).await;
    assert_eq!(j.attempts, 1);
    assert!(store.requeue(&second, true).await.unwrap());
    let (j, _) = claim(&*store, "j1", 3).await;
    assert_eq!(j.attempts, 2);
}

async fn an_idempotency_key_names_one_job_per_tenant_until_it_expires(db: &Db) {
    let store = db.open().await;
    let key = |since| Idempotency {
        key: "k-1".into(),
        request_sha256: "h1".into(),
        since,
    };
    let mut first = job("j1", "acme");
    first.created_at = 1_000;
    assert_eq!(
        store.insert_job(&first, Some(&key(0))).await.unwrap(),
        Inserted::New
    );
    let Inserted::Existing(found, hash) = store
        .insert_job(&job("j2", "acme"), Some(&key(0)))
        .await
        .unwrap()
    else {
        panic!("a second job with the same key")
    };
    assert_eq!((found.id.as_str(), hash.as_str()), ("j1", "h1"));
    assert!(store.get_job("acme", "j2").await.unwrap().is_none());
    // Another tenant's key is its own.
    assert_eq!(
        store
            .insert_job(&job("j3", "other"), Some(&key(0)))
            .await
            .unwrap(),
        Inserted::New
    );
    // The inline path honours it too.
    let report = crate::sandbox::JobReport::not_run("j4", "hello", "x");
    assert!(matches!(
        store
            .insert_finished_job(&job("j4", "acme"), &report, 5, Some(&key(0)))
            .await
            .unwrap(),
        Inserted::Existing(..)
    ));
    assert!(store.get_job("acme", "j4").await.unwrap().is_none());
    assert!(store.audit(10).await.unwrap().is_empty());
    assert_eq!(
        store
            .job_by_key("acme", "k-1", 0)
            .await
            .unwrap()
            .unwrap()
            .0
            .id,
        "j1"
    );
    // Past retention the key may name a new job.
    assert!(
        store
            .job_by_key("acme", "k-1", 2_000)
            .await
            .unwrap()
            .is_none()
    );
    assert_eq!(
        store
            .insert_job(&job("j5", "acme"), Some(&key(2_000)))
            .await
            .unwrap(),
        Inserted::New
    );
    assert_eq!(
        store
            .job_by_key("acme", "k-1", 0)
            .await
            .unwrap()
            .unwrap()
            .0
            .id,
        "j5"
    );
    // The job that held it before is still there, and deleting the job
    // that holds it frees the key.
    assert!(store.get_job("acme", "j1").await.unwrap().is_some());
    let (_, c) = claim(&*store, "j5", 3).await;
    assert!(store.finish_job(&c, &report, 4).await.unwrap());
    assert_eq!(
        store.delete_job("acme", "j5").await.unwrap(),
        DeleteOutcome::Deleted
    );
    assert!(store.job_by_key("acme", "k-1", 0).await.unwrap().is_none());
    assert_eq!(
        store
            .insert_job(&job("j6", "acme"), Some(&key(0)))
            .await
            .unwrap(),
        Inserted::New
    );
}

async fn concurrent_submissions_with_one_key_store_one_job(db: &Db) {
    let store = db.open().await;
    // Rounds of submissions that start together, each round with its own
    // key, so the check and the insert of one overlap another's.
    for round in 0..8 {
        let key = Idempotency {
            key: format!("race-{round}"),
            request_sha256: "h".into(),
            since: 0,
        };
        let start = Arc::new(tokio::sync::Barrier::new(8));
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let (store, key, start) = (Arc::clone(&store), key.clone(), Arc::clone(&start));
                tokio::spawn(async move {
                    start.wait().await;
                    store
                        .insert_job(&job(&format!("r{round}-{i}"), "acme"), Some(&key))
                        .await
                })
            })
            .collect();
        let mut new = Vec::new();
        let mut named = std::collections::BTreeSet::new();
        for (i, t) in tasks.into_iter().enumerate() {
            match t.await.unwrap() {
                Ok(Inserted::New) => new.push(format!("r{round}-{i}")),
                Ok(Inserted::Existing(job, _)) => {
                    named.insert(job.id);
                }
                Err(e) => panic!("round {round}: a submission failed: {e}"),
            }
        }
        assert_eq!(new.len(), 1, "round {round}: one submission stores the job");
        assert!(
            named.iter().all(|id| *id == new[0]),
            "round {round}: every other submission is told the stored job: {named:?} vs {new:?}"
        );
    }
    assert_eq!(store.list_jobs("acme", 100).await.unwrap().len(), 8);
}

async fn concurrent_claims_of_one_job_run_it_once(db: &Db) {
    let store = db.open().await;
    for i in 0..5 {
        store
            .insert_job(&job(&format!("c{i}"), "acme"), None)
            .await
            .unwrap();
    }
    let tasks: Vec<_> = (0..5)
        .flat_map(|i| std::iter::repeat_n(i, 6))
        .map(|i| {
            let store = Arc::clone(&store);
            tokio::spawn(async move {
                store
                    .claim("acme", &format!("c{i}"), 1, 3, &dead("n1"))
                    .await
            })
        })
        .collect();
    let mut runs = std::collections::BTreeMap::<String, u32>::new();
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Claim::Run(job, claim) => {
                assert_eq!(claim.attempt(), 1);
                *runs.entry(job.id).or_default() += 1;
            }
            Claim::Gone => {}
            Claim::GaveUp(job) => panic!("{} given up", job.id),
        }
    }
    assert_eq!(
        runs.into_iter().collect::<Vec<_>>(),
        (0..5).map(|i| (format!("c{i}"), 1)).collect::<Vec<_>>(),
        "each job claimed exactly once"
    );
}

async fn a_cancelled_or_finished_job_is_never_claimed_and_a_cancel_beats_a_finish(db: &Db) {
    let store = db.open().await;
    store.insert_job(&job("j1", "acme"), None).await.unwrap();
    let (_, running) = claim(&*store, "j1", 1).await;
    assert_eq!(
        store.cancel_job("acme", "j1", 2).await.unwrap(),
        CancelOutcome::Cancelled(JobState::Running)
    );
    let report = crate::sandbox::JobReport::not_run("j1", "hello", "late");
    assert!(!store.finish_job(&running, &report, 3).await.unwrap());
    assert!(!store.requeue(&running, true).await.unwrap());
    let stored = store.get_job("acme", "j1").await.unwrap().unwrap();
    assert_eq!(
        (stored.state, stored.finished_at, stored.report),
        (JobState::Cancelled, Some(2), None)
    );
    assert!(store.audit(10).await.unwrap().is_empty());
    assert_eq!(store.requeue_running().await.unwrap(), 0);
    let inline = crate::sandbox::JobReport::not_run("j2", "hello", "x");
    store
        .insert_finished_job(&job("j2", "acme"), &inline, 4, None)
        .await
        .unwrap();
    assert_eq!(
        store.claim("acme", "j2", 5, 3, &dead("n1")).await.unwrap(),
        Claim::Gone
    );
    assert_eq!(
        store.cancel_job("acme", "j2", 6).await.unwrap(),
        CancelOutcome::AlreadyFinished(JobState::Failed)
    );
}

async fn tokens_are_found_by_hash_and_id_listed_and_revoked(db: &Db) {
    let store = db.open().await;
    let token = |id: &str, tenant: &str, created_at| TokenRecord {
        id: id.into(),
        hash: format!("hash-{id}"),
        tenant: tenant.into(),
        subject: "alice".into(),
        scopes: vec!["jobs:submit".into(), "jobs:read".into()],
        created_at,
        expires_at: (id == "t2").then_some(99),
        revoked: false,
    };
    for t in [
        token("t2", "acme", 5),
        token("t1", "other", 5),
        token("t0", "acme", 9),
    ] {
        store.insert_token(&t).await.unwrap();
    }
    assert_eq!(
        store.token_by_hash("hash-t2").await.unwrap(),
        Some(token("t2", "acme", 5))
    );
    assert_eq!(
        store.token_by_id("t1").await.unwrap(),
        Some(token("t1", "other", 5))
    );
    assert_eq!(store.token_by_hash("t1").await.unwrap(), None);
    assert_eq!(
        store
            .list_tokens()
            .await
            .unwrap()
            .iter()
            .map(|t| t.id.as_str())
            .collect::<Vec<_>>(),
        ["t1", "t2", "t0"],
        "oldest first, then by id"
    );
    assert!(store.insert_token(&token("t1", "acme", 1)).await.is_err());
    assert!(store.revoke_token("t2").await.unwrap());
    assert!(!store.revoke_token("nope").await.unwrap());
    assert!(
        store
            .token_by_hash("hash-t2")
            .await
            .unwrap()
            .unwrap()
            .revoked
    );
    assert!(!store.token_by_id("t1").await.unwrap().unwrap().revoked);
}

async fn finished_jobs_and_old_audit_rows_expire(db: &Db) {
    let store = db.open().await;
    let report = crate::sandbox::JobReport::not_run("x", "hello", "x");
    for (id, finished) in [("old", 10), ("new", 30)] {
        store
            .insert_finished_job(&job(id, "acme"), &report, finished, None)
            .await
            .unwrap();
    }
    store
        .insert_job(&job("queued", "acme"), None)
        .await
        .unwrap();
    store
        .insert_job(&job("cancelled", "acme"), None)
        .await
        .unwrap();
    store.cancel_job("acme", "cancelled", 5).await.unwrap();
    let mut gone = store.expire_jobs(20).await.unwrap();
    gone.sort();
    assert_eq!(gone, ["cancelled", "old"]);
    assert!(store.job_exists("new").await.unwrap());
    assert!(store.job_exists("queued").await.unwrap());
    assert!(!store.job_exists("old").await.unwrap());
    for at in [10, 20, 30] {
        store
            .append_audit(&AuditEntry {
                at,
                action: "auth.denied".into(),
                client: Some("127.0.0.9".into()),
                ..AuditEntry::default()
            })
            .await
            .unwrap();
    }
    // Two `job.finished` rows (at 10 and 30) and three denials.
    assert_eq!(store.expire_audit(20).await.unwrap(), 2);
    let rows = store.audit(10).await.unwrap();
    assert_eq!(rows.iter().map(|r| r.at).collect::<Vec<_>>(), [30, 20, 30]);
    assert_eq!(rows[0].client.as_deref(), Some("127.0.0.9"));
    assert_eq!(store.audit(1).await.unwrap().len(), 1);
}

async fn recovery_sees_pending_jobs_oldest_first_with_their_claims(db: &Db) {
    let store = db.open().await;
    for (id, created_at) in [("b", 2), ("a", 2), ("c", 1), ("d", 3)] {
        let mut j = job(id, if id == "d" { "other" } else { "acme" });
        j.created_at = created_at;
        store.insert_job(&j, None).await.unwrap();
    }
    let (_, running) = claim(&*store, "a", 7).await;
    let pending = store.pending_jobs().await.unwrap();
    assert_eq!(
        pending
            .iter()
            .map(|p| (p.id.as_str(), p.tenant.as_str(), p.module.as_str(), p.state))
            .collect::<Vec<_>>(),
        [
            ("c", "acme", "hello", JobState::Queued),
            ("a", "acme", "hello", JobState::Running),
            ("b", "acme", "hello", JobState::Queued),
            ("d", "other", "hello", JobState::Queued),
        ]
    );
    assert_eq!(pending[1].claim.as_ref(), Some(&running));
    assert!(pending.iter().all(|p| p.claim.is_none() || p.id == "a"));
    assert_eq!(
        store
            .queued_jobs()
            .await
            .unwrap()
            .iter()
            .map(|j| j.id.as_str())
            .collect::<Vec<_>>(),
        ["c", "b", "d"]
    );
    store.probe(1).await.unwrap();
    store.probe(2).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_given_a_storage_url_keeps_its_state_in_postgres() {
    let Some(url) = super::pg_server::fresh_database().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::config::ServeConfig::default();
    config.storage.data_dir = dir.path().join("data");
    config.modules.policies_dir = dir.path().join("policies");
    config.modules.modules_dir = dir.path().join("modules");
    std::fs::create_dir_all(&config.modules.policies_dir).unwrap();
    std::fs::create_dir_all(&config.modules.modules_dir).unwrap();
    config.storage.url = Some(url.clone().try_into().unwrap());
    config.storage.pool_size = 2;
    let service = crate::service::Service::start(config.clone(), None)
        .await
        .unwrap();
    assert!(
        format!("{:?}", service.store()).starts_with("PostgresStore"),
        "{:?}",
        service.store()
    );
    // Recent, or the service's retention sweep may take it first.
    let entry = AuditEntry {
        at: now_ms(),
        action: "token.issued".into(),
        detail: "through the service".into(),
        ..AuditEntry::default()
    };
    service.store().append_audit(&entry).await.unwrap();
    service.shutdown().await;
    assert!(!config.storage.data_dir.join("bulkhead.sqlite").exists());
    let direct = PostgresStore::open(&url, 1).await.unwrap();
    // (The service may have audited its own start, its workers, beside it.)
    let audit = direct.audit(100).await.unwrap();
    assert!(audit.contains(&entry), "{audit:#?}");

    // A database that cannot be reached stops the start, naming it without
    // its password.
    let port = url
        .rsplit_once(':')
        .unwrap()
        .1
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap().port();
    drop(closed);
    let wrong = url
        .replace(&port, &dead.to_string())
        .replace("postgres@", "postgres:s3cret@");
    config.storage.url = Some(wrong.try_into().unwrap());
    let err = crate::service::Service::start(config, None)
        .await
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains(&format!("127.0.0.1:{dead}")), "{err}");
    assert!(!err.contains("s3cret"), "{err}");
}

/// A TCP relay to the test server that can cut every connection and refuse
/// new ones, as a network loss or a database restart does, and come back.
struct Cable {
    port: u16,
    up: Arc<std::sync::atomic::AtomicBool>,
    live: Arc<std::sync::Mutex<tokio::task::JoinSet<()>>>,
    _accept: tokio::task::JoinHandle<()>,
}

impl Cable {
    async fn to(upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let live = Arc::new(std::sync::Mutex::new(tokio::task::JoinSet::new()));
        let accept = tokio::spawn({
            let (up, live) = (Arc::clone(&up), Arc::clone(&live));
            async move {
                while let Ok((mut client, _)) = listener.accept().await {
                    if !up.load(std::sync::atomic::Ordering::SeqCst) {
                        continue;
                    }
                    live.lock().unwrap().spawn(async move {
                        if let Ok(mut server) =
                            tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                }
            }
        });
        Self {
            port,
            up,
            live,
            _accept: accept,
        }
    }

    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        self.live.lock().unwrap().abort_all();
    }

    fn mend(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_database_is_a_storage_failure_and_the_store_recovers_when_it_returns() {
    let Some(url) = super::pg_server::fresh_database().await else {
        return;
    };
    let (head, db) = url.rsplit_once('/').unwrap();
    let upstream: u16 = head.rsplit_once(':').unwrap().1.parse().unwrap();
    let cable = Cable::to(upstream).await;
    let via = format!("postgres://postgres@127.0.0.1:{}/{db}", cable.port);
    let store = PostgresStore::open(&via, 2).await.unwrap();
    store.insert_job(&job("j1", "acme"), None).await.unwrap();
    store.probe(1).await.unwrap();

    cable.cut();
    let err = store.get_job("acme", "j1").await.unwrap_err();
    assert!(err.is_storage() && !err.is_full(), "{err}");
    let err = store.probe(2).await.unwrap_err();
    assert!(err.is_storage(), "{err}");
    let err = store
        .insert_job(&job("j2", "acme"), None)
        .await
        .unwrap_err();
    assert!(err.is_storage(), "{err}");

    cable.mend();
    store.probe(3).await.unwrap();
    assert!(store.get_job("acme", "j1").await.unwrap().is_some());
    assert!(store.get_job("acme", "j2").await.unwrap().is_none());
    let (_, c) = match store.claim("acme", "j1", 4, 3, &dead("n1")).await.unwrap() {
        Claim::Run(job, claim) => (job, claim),
        other => panic!("{other:?}"),
    };
    let report = crate::sandbox::JobReport::not_run("j1", "hello", "x");
    assert!(store.finish_job(&c, &report, 5).await.unwrap());
}

/// A node frozen in the middle of a claim (a stopped process, a paused
/// machine) holds the cluster-wide claim lock only until the database ends
/// its idle transaction: the other nodes' claims go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_frozen_inside_a_claim_does_not_stop_the_other_nodes_claims() {
    let Some(url) = super::pg_server::fresh_database().await else {
        return;
    };
    let store = PostgresStore::open(&url, 2).await.unwrap();
    store.insert_job(&job("j1", "acme"), None).await.unwrap();
    // The frozen node: a session of a store opened as every node opens
    // one, inside a claim's transaction holding the lock, silent from then on.
    let frozen = PostgresStore::open(&url, 1).await.unwrap();
    let mut tx = frozen.pool.begin().await.unwrap();
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(super::postgres::CLAIM_LOCK)
        .execute(&mut *tx)
        .await
        .unwrap();
    // Not a timing: a guard against waiting for ever, which is what a
    // claim does behind a lock nobody releases.
    let claimed = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        store.claim_next(now_ms(), 3, &live("n2"), &caps(4, 4)),
    )
    .await
    .expect("the claim waited for ever behind the frozen node's lock")
    .unwrap();
    assert!(
        matches!(&claimed, Some(Claim::Run(job, _)) if job.id == "j1"),
        "{claimed:?}"
    );
    drop(tx);
}

/// The queue's bound per tenant holds however many submissions of that
/// tenant arrive at once through however many nodes: the count and the
/// insert are one transaction under the tenant's lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_submissions_through_two_nodes_never_pass_a_tenants_queue_bound() {
    let Some(url) = super::pg_server::fresh_database().await else {
        return;
    };
    let (one, two) = (
        Arc::new(PostgresStore::open(&url, 4).await.unwrap()),
        Arc::new(PostgresStore::open(&url, 4).await.unwrap()),
    );
    let bounds = super::QueueBounds {
        total: 1000,
        per_tenant: 5,
    };
    let tasks: Vec<_> = (0..40)
        .map(|i| {
            let store = Arc::clone(if i % 2 == 0 { &one } else { &two });
            tokio::spawn(async move {
                store
                    .insert_queued_within(&job(&format!("q{i}"), "acme"), None, &bounds)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let (mut taken, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(Inserted::New) => taken += 1,
            Err(super::QueueFull::Tenant) => refused += 1,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!((taken, refused), (5, 35));
    let (mine, _) = one.queued_counts("acme").await.unwrap();
    assert_eq!(mine, 5);
    // Another tenant is not held back by acme's bound; the total is.
    assert!(matches!(
        two.insert_queued_within(&job("b1", "beta"), None, &bounds)
            .await
            .unwrap(),
        Ok(Inserted::New)
    ));
    let full = super::QueueBounds {
        total: 6,
        per_tenant: 5,
    };
    assert!(matches!(
        two.insert_queued_within(&job("b2", "beta"), None, &full)
            .await
            .unwrap(),
        Err(super::QueueFull::Service)
    ));
}

/// Claims acme's queued job `id` at `now` under `lease`, which must run.
async fn claim_as(store: &dyn JobStore, id: &str, now: i64, lease: &Lease) -> (JobRecord, Claimed) {
    match store.claim("acme", id, now, 3, lease).await.unwrap() {
        Claim::Run(job, claim) => (*job, claim),
        other => panic!("{id} not claimed: {other:?}"),
    }
}

async fn a_job_whose_lease_ran_out_is_requeued_with_its_attempt_counted(db: &Db) {
    let store = db.open().await;
    store.insert_job(&job("j1", "acme"), None).await.unwrap();
    store.insert_job(&job("j2", "acme"), None).await.unwrap();
    let now = now_ms();
    let (_, gone) = claim_as(&*store, "j1", now, &dead("n1")).await;
    let (_, held) = claim_as(&*store, "j2", now, &live("n1")).await;
    assert_eq!(gone.node(), Some("n1"));
    let expired = store.expire_leases(now_ms(), 3).await.unwrap();
    assert!(expired.failed.is_empty());
    assert_eq!(
        expired
            .requeued
            .iter()
            .map(|j| j.id.as_str())
            .collect::<Vec<_>>(),
        ["j1"],
        "only the lease that ran out"
    );
    let j1 = store.get_job("acme", "j1").await.unwrap().unwrap();
    assert_eq!((j1.state, j1.attempts), (JobState::Queued, 1));
    let j2 = store.get_job("acme", "j2").await.unwrap().unwrap();
    assert_eq!(j2.state, JobState::Running);
    // Another node runs it again: its second attempt.
    let (j1, _) = claim_as(&*store, "j1", now_ms(), &live("n2")).await;
    assert_eq!(j1.attempts, 2);
    assert!(store.expire_leases(now_ms(), 3).await.unwrap() == Default::default());
    let report = crate::sandbox::JobReport::not_run("j2", "hello", "x");
    assert!(store.finish_job(&held, &report, now_ms()).await.unwrap());
}

async fn a_lease_that_ran_out_on_the_last_attempt_fails_the_job_with_the_reason(db: &Db) {
    let store = db.open().await;
    store.insert_job(&job("j1", "acme"), None).await.unwrap();
    for attempt in 1..=2 {
        let (j, _) = claim_as(&*store, "j1", now_ms(), &dead(&format!("n{attempt}"))).await;
        assert_eq!(j.attempts, attempt);
        let expired = store.expire_leases(now_ms(), 3).await.unwrap();
        assert_eq!(expired.requeued.len(), 1, "attempt {attempt}");
    }
    claim_as(&*store, "j1", now_ms(), &dead("n3")).await;
    let expired = store.expire_leases(now_ms(), 3).await.unwrap();
    assert!(expired.requeued.is_empty());
    assert_eq!(expired.failed.len(), 1);
    let stored = store.get_job("acme", "j1").await.unwrap().unwrap();
    assert_eq!((stored.state, stored.attempts), (JobState::Failed, 3));
    assert_eq!(expired.failed[0], stored);
    let message = &stored.report.unwrap().failure.unwrap().message;
    assert!(
        message.contains("lease expired") && message.contains("3 times"),
        "{message}"
    );
    let audit = store.audit(10).await.unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    assert_eq!(
        (
            audit[0].action.as_str(),
            audit[0].outcome.as_deref(),
            audit[0].job_id.as_deref()
        ),
        ("job.finished", Some("failed"), Some("j1"))
    );
    assert!(store.pending_jobs().await.unwrap().is_empty());
    assert!(store.expire_leases(now_ms(), 3).await.unwrap() == Default::default());
}

async fn a_stale_node_can_neither_finish_nor_requeue_nor_renew_after_a_reclaim(db: &Db) {
    let store = db.open().await;
    let report = |id: &str| crate::sandbox::JobReport::not_run(id, "hello", "x");
    // n1's lease runs out (it was partitioned); n2 runs the job again.
    store.insert_job(&job("j1", "acme"), None).await.unwrap();
    let (_, stale) = claim_as(&*store, "j1", now_ms(), &dead("n1")).await;
    assert_eq!(
        store
            .expire_leases(now_ms(), 3)
            .await
            .unwrap()
            .requeued
            .len(),
        1
    );
    assert!(
        !store
            .finish_job(&stale, &report("j1"), now_ms())
            .await
            .unwrap(),
        "given back, not yet claimed again"
    );
    let (_, fresh) = claim_as(&*store, "j1", now_ms(), &live("n2")).await;
    assert!(
        !store
            .finish_job(&stale, &report("j1"), now_ms())
            .await
            .unwrap()
    );
    assert!(!store.requeue(&stale, true).await.unwrap());
    assert_eq!(
        store
            .renew_leases(&live("n1"), std::slice::from_ref(&stale), now_ms())
            .await
            .unwrap(),
        std::slice::from_ref(&stale)
    );
    assert!(
        store
            .renew_leases(&live("n2"), std::slice::from_ref(&fresh), now_ms())
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        store
            .finish_job(&fresh, &report("j1"), now_ms())
            .await
            .unwrap()
    );
    assert!(
        !store
            .finish_job(&stale, &report("j1"), now_ms())
            .await
            .unwrap()
    );
    let audit = store.audit(10).await.unwrap();
    assert_eq!(audit.len(), 1, "finished once: {audit:?}");

    // The same attempt and start, another node: only the node tells the
    // claims apart, and it does.
    store.insert_job(&job("j2", "acme"), None).await.unwrap();
    let at = now_ms();
    let (_, stale) = claim_as(&*store, "j2", at, &live("n1")).await;
    assert!(store.requeue(&stale, false).await.unwrap());
    let (_, fresh) = claim_as(&*store, "j2", at, &live("n2")).await;
    assert_eq!((stale.attempt(), fresh.attempt()), (1, 1));
    assert!(!store.finish_job(&stale, &report("j2"), at).await.unwrap());
    assert!(!store.requeue(&stale, true).await.unwrap());
    assert_eq!(
        store
            .renew_leases(&live("n1"), std::slice::from_ref(&stale), at)
            .await
            .unwrap(),
        std::slice::from_ref(&stale)
    );
    assert!(store.finish_job(&fresh, &report("j2"), at).await.unwrap());
    let j2 = store.get_job("acme", "j2").await.unwrap().unwrap();
    assert_eq!(j2.state, JobState::Failed);
}

async fn a_renewed_lease_holds_and_a_cancelled_job_is_lost_to_its_node(db: &Db) {
    let store = db.open().await;
    store.insert_job(&job("j1", "acme"), None).await.unwrap();
    store.insert_job(&job("j2", "acme"), None).await.unwrap();
    let now = now_ms();
    let (_, c1) = claim_as(&*store, "j1", now, &dead("n1")).await;
    let (_, c2) = claim_as(&*store, "j2", now, &dead("n1")).await;
    let both = [c1.clone(), c2.clone()];
    // Another node cannot renew n1's leases.
    assert_eq!(
        store.renew_leases(&live("n2"), &both, now).await.unwrap(),
        both.to_vec()
    );
    // n1 renews both in one call: neither runs out.
    assert!(
        store
            .renew_leases(&live("n1"), &both, now)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(store.expire_leases(now + 1, 3).await.unwrap() == Default::default());
    // Cancelled (through any node): n1's next renewal finds it lost.
    store.cancel_job("acme", "j1", now).await.unwrap();
    assert_eq!(
        store.renew_leases(&live("n1"), &both, now).await.unwrap(),
        [c1]
    );
    let j2 = store.get_job("acme", "j2").await.unwrap().unwrap();
    assert_eq!(j2.state, JobState::Running);
}

async fn at_start_only_leases_that_ran_out_are_taken_back_on_postgres(db: &Db) {
    let store = db.open().await;
    store.insert_job(&job("j1", "acme"), None).await.unwrap();
    store.insert_job(&job("j2", "acme"), None).await.unwrap();
    let now = now_ms();
    claim_as(&*store, "j1", now, &live("n1")).await;
    claim_as(&*store, "j2", now, &dead("n1")).await;
    let taken = store.requeue_running().await.unwrap();
    match db {
        // Another live node's job stays its own.
        Db::Postgres(_) => assert_eq!(taken, 1),
        // One node per file: whatever runs was the previous process's.
        Db::Sqlite(_) => assert_eq!(taken, 2),
    }
    let j2 = store.get_job("acme", "j2").await.unwrap().unwrap();
    assert_eq!((j2.state, j2.attempts), (JobState::Queued, 1));
}

/// Caps of `per_tenant` and `per_module` running jobs, for a node serving
/// `hello` and `other`.
fn caps(per_tenant: u32, per_module: u32) -> Caps {
    Caps {
        per_tenant,
        per_module,
        modules: vec!["hello".into(), "other".into()],
    }
}

/// The id of the job `claim_next` started, if any.
async fn next_id(store: &dyn JobStore, node: &str, caps: &Caps) -> Option<String> {
    match store
        .claim_next(now_ms(), 3, &live(node), caps)
        .await
        .unwrap()
    {
        Some(Claim::Run(job, _)) => Some(job.id),
        None => None,
        other => panic!("{other:?}"),
    }
}

async fn the_next_claim_goes_to_the_tenant_with_fewest_running_oldest_first_under_the_caps(
    db: &Db,
) {
    let store = db.open().await;
    let at = |id: &str, tenant: &str, module: &str, created_at| JobRecord {
        module: module.into(),
        created_at,
        ..job(id, tenant)
    };
    // acme floods first; beta and gamma come later.
    for (i, id) in ["a1", "a2", "a3", "a4"].iter().enumerate() {
        store
            .insert_job(&at(id, "acme", "hello", 10 + i as i64), None)
            .await
            .unwrap();
    }
    store
        .insert_job(&at("b1", "beta", "hello", 20), None)
        .await
        .unwrap();
    store
        .insert_job(&at("b2", "beta", "hello", 21), None)
        .await
        .unwrap();
    store
        .insert_job(&at("g1", "gamma", "other", 30), None)
        .await
        .unwrap();
    store
        .insert_job(&at("x1", "gamma", "unserved", 1), None)
        .await
        .unwrap();
    let caps = caps(2, 3);
    let mut order = Vec::new();
    for node in ["n1", "n2", "n1", "n2", "n1"] {
        order.extend(next_id(&*store, node, &caps).await);
    }
    // Oldest first among the tenants with nothing running, then the tenant
    // with fewest running; `hello` stops at 3 running (a1, b1, a2), acme at
    // 2; the unserved module is never taken.
    assert_eq!(order, ["a1", "b1", "g1", "a2"]);
    // A finish frees acme's slot and hello's: acme's next job runs.
    let running = store.get_job("acme", "a1").await.unwrap().unwrap();
    let report = crate::sandbox::JobReport::not_run("a1", "hello", "x");
    let claim = Claimed::of(&running, Some("n1"));
    assert!(store.finish_job(&claim, &report, now_ms()).await.unwrap());
    // acme and beta both run one now: the older job goes first.
    assert_eq!(next_id(&*store, "n2", &caps).await.as_deref(), Some("a3"));
    assert_eq!(
        next_id(&*store, "n2", &caps).await,
        None,
        "hello is at its cap"
    );
}

async fn concurrent_claims_of_two_nodes_never_exceed_the_caps(db: &Db) {
    let (one, two) = (db.open().await, db.open().await);
    for i in 0..12 {
        let tenant = ["acme", "beta"][i % 2];
        let module = ["hello", "other"][i / 6];
        let j = JobRecord {
            module: module.into(),
            ..job(&format!("c{i}"), tenant)
        };
        one.insert_job(&j, None).await.unwrap();
    }
    // At most 2 running per tenant and per module, whichever node claims.
    let caps = caps(2, 2);
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let store = Arc::clone(if i % 2 == 0 { &one } else { &two });
            let caps = caps.clone();
            let node = format!("n{}", i % 2);
            tokio::spawn(async move {
                store
                    .claim_next(now_ms(), 3, &live(&node), &caps)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut per_tenant = std::collections::BTreeMap::<String, u32>::new();
    let mut per_module = std::collections::BTreeMap::<String, u32>::new();
    for t in tasks {
        if let Some(Claim::Run(job, _)) = t.await.unwrap() {
            *per_tenant.entry(job.tenant).or_default() += 1;
            *per_module.entry(job.module).or_default() += 1;
        }
    }
    assert!(per_tenant.values().all(|n| *n <= 2), "{per_tenant:?}");
    assert!(per_module.values().all(|n| *n <= 2), "{per_module:?}");
    assert_eq!(per_tenant.values().sum::<u32>(), 4, "{per_tenant:?}");
    let running = one
        .pending_jobs()
        .await
        .unwrap()
        .into_iter()
        .filter(|j| j.state == JobState::Running)
        .count();
    assert_eq!(running, 4);
}

async fn queued_counts_are_per_tenant_and_in_total(db: &Db) {
    let store = db.open().await;
    for (id, tenant) in [
        ("q1", "acme"),
        ("q2", "acme"),
        ("q3", "beta"),
        ("q4", "acme"),
    ] {
        store.insert_job(&job(id, tenant), None).await.unwrap();
    }
    claim(&*store, "q4", 1).await;
    assert_eq!(store.queued_counts("acme").await.unwrap(), (2, 3));
    assert_eq!(store.queued_counts("nobody").await.unwrap(), (0, 3));
}
