//! Meters bound the real resource, judged host-side: the host descriptors a
//! job holds (read from `/proc/self/fd`, whatever object holds them), the
//! host CPU a job costs (the running thread's CPU clock, host calls
//! included), the bytes it writes (overwrites included), and, through the
//! real service, a neighbour tenant served while a guest tries to exhaust
//! the process's descriptors.

use std::sync::Arc;
use std::time::Duration;

use bulkhead::sandbox::{
    FailureKind, JOB_OVERHEAD_DESCRIPTORS, JobDir, JobReport, LimitKind, LoadedModule, Outcome,
    descriptor_budget,
};

use bulkhead::policy::{ByteSize, HumanDuration, Limits};

use crate::common::{
    ConfigFile, SANDBOX, Served, assert_descriptors_bounded, hello, hostile_with, policy, spec,
    token,
};

/// The hostile guest in `mode` with `limits`, accepting the parameters the
/// meter attacks take.
fn attacker(mode: &str, limits: impl FnOnce(&mut Limits)) -> Arc<LoadedModule> {
    hostile_with(mode, &["hold-ms", "entries", "mib", "passes"], limits)
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_kept_after_their_descriptor_count_as_host_descriptors() {
    assert_descriptors_bounded("fd-streams", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dropping_fetched_preopens_gives_back_no_descriptors() {
    assert_descriptors_bounded("fd-preopens", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn directories_and_their_listings_are_bounded() {
    assert_descriptors_bounded("fd-dirs", true).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn every_way_of_holding_descriptors_at_once_is_bounded() {
    assert_descriptors_bounded("fd-every-way", true).await;
}

/// Runs `module` with `params` on a thread of its own (a current-thread
/// runtime) and returns the report and the CPU time that thread used:
/// everything the host did for the job, in wasm and in host calls.
fn run_on_own_thread(
    module: Arc<LoadedModule>,
    params: &'static [(&'static str, &'static str)],
) -> (JobReport, Duration) {
    run_on_own_runtime(module, vec![("input.txt", b"x".to_vec())], params)
}

/// [`run_on_own_thread`] with `inputs`, counting the CPU of the runtime's
/// blocking threads too: whatever the host did for the job off its thread.
fn run_on_own_runtime(
    module: Arc<LoadedModule>,
    inputs: Vec<(&'static str, Vec<u8>)>,
    params: &'static [(&'static str, &'static str)],
) -> (JobReport, Duration) {
    use std::sync::atomic::{AtomicU64, Ordering};
    std::thread::spawn(move || {
        let pool = Arc::new(AtomicU64::new(0));
        let stopped = Arc::clone(&pool);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_stop(move || {
                let spent = u64::try_from(thread_cpu().as_nanos()).unwrap_or(u64::MAX);
                stopped.fetch_add(spent, Ordering::SeqCst);
            })
            .build()
            .unwrap();
        let inputs: Vec<(&str, &[u8])> = inputs.iter().map(|(n, d)| (*n, &d[..])).collect();
        let job = spec(&inputs, params);
        let dir = JobDir::create(&SANDBOX.config().work_dir, &job.id).unwrap();
        let before = thread_cpu();
        let report = rt.block_on(SANDBOX.run(&module, &job, &dir)).unwrap();
        let own = thread_cpu() - before;
        // Its blocking threads end here, each adding what it used.
        drop(rt);
        (
            report,
            own + Duration::from_nanos(pool.load(Ordering::SeqCst)),
        )
    })
    .join()
    .unwrap()
}

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) },
        0
    );
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// The CPU budget of the host-CPU tests, and how far past it the host may
/// go: one host call's worth (the meter stops the job as the call returns)
/// plus instantiation.
const CPU_BUDGET: Duration = Duration::from_millis(300);
const CPU_SLACK: Duration = Duration::from_millis(400);
fn cpu_limits(l: &mut Limits) {
    l.memory = ByteSize::mib(512);
    l.cpu_time = HumanDuration::millis(300);
    l.wall_time = HumanDuration::secs(60);
}

#[tokio::test(flavor = "multi_thread")]
async fn host_cpu_spent_on_huge_paths_is_charged_to_the_job() {
    // Each `stat` is handed a path as long as a call may carry in (4 MiB,
    // `HOSTCALL_FUEL`): the host copies and checks it before refusing it,
    // call after call. (A longer one traps as it is lifted.)
    let module = attacker("cpu-huge-path", cpu_limits);
    let (report, used) =
        tokio::task::spawn_blocking(move || run_on_own_thread(module, &[("mib", "3")]))
            .await
            .unwrap();
    assert_eq!(report.limit, Some(LimitKind::CpuTime), "{report:#?}");
    assert!(
        used <= CPU_BUDGET + CPU_SLACK,
        "the host spent {used:?} of CPU on a job allowed {CPU_BUDGET:?}: {}",
        report.stdout.text
    );
    assert!(
        report.measurements.cpu_time_ms >= CPU_BUDGET.as_secs_f64() * 1000.0,
        "{report:#?}"
    );
}

/// Reads a guest asks of its file streams are done, and charged, on its
/// own thread: 256 streams asked for 64 KiB each and then waited on, over
/// and over, cost the host no more CPU than the job's `cpu_time` (found by
/// an attacker: read in the background, they cost several times as much).
#[tokio::test(flavor = "multi_thread")]
async fn host_cpu_spent_reading_streams_is_charged_to_the_job() {
    const BUDGET: Duration = Duration::from_secs(1);
    let module = attacker("cpu-stream-reads", |l| {
        cpu_limits(l);
        l.cpu_time = HumanDuration::millis(1_000);
    });
    let input = vec![7u8; 8 << 20];
    let (report, used) = tokio::task::spawn_blocking(move || {
        run_on_own_runtime(module, vec![("big.bin", input)], &[("entries", "256")])
    })
    .await
    .unwrap();
    assert_eq!(report.limit, Some(LimitKind::CpuTime), "{report:#?}");
    assert!(
        used <= BUDGET + CPU_SLACK,
        "the host spent {used:?} of CPU on a job allowed {BUDGET:?}: {}",
        report.stdout.text
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_poll_list_longer_than_any_guest_can_hold_is_refused_before_lifting() {
    // 20,000 copies of one pollable: more than the 4,096 handles a guest may
    // hold, fewer than wasmtime itself refuses to lift (about 200,000 trap
    // there already).
    let module = attacker("cpu-huge-poll", cpu_limits);
    let (report, used) =
        tokio::task::spawn_blocking(move || run_on_own_thread(module, &[("entries", "20000")]))
            .await
            .unwrap();
    assert_eq!(report.outcome, Outcome::Failed, "{report:#?}");
    let failure = report.failure.as_ref().unwrap();
    assert_eq!(failure.kind, FailureKind::Trap, "{report:#?}");
    assert_eq!(
        report.limit, None,
        "refused at once, not metered: {report:#?}"
    );
    // Refused before any work: far less than one call of lifting would be.
    assert!(used < CPU_BUDGET, "the host spent {used:?}");
}

#[test]
fn the_service_keeps_a_descriptor_reserve_no_job_can_take() {
    // The budget the service's sandbox uses at the process limit the
    // neighbour test runs it with.
    let per_job = descriptor_budget(SERVICE_NOFILE, SERVICE_WORKERS).unwrap();
    let all_jobs = u64::from(SERVICE_WORKERS) * (per_job + JOB_OVERHEAD_DESCRIPTORS);
    assert!(all_jobs + bulkhead::sandbox::RESERVED_DESCRIPTORS <= SERVICE_NOFILE);
    // And a configuration that cannot keep the reserve is refused at start.
    assert!(descriptor_budget(SERVICE_NOFILE, 64).is_err());
}

/// The process limit and worker count of the service in the neighbour test.
const SERVICE_NOFILE: u64 = 1024;
const SERVICE_WORKERS: u32 = 4;

/// A `hello` job of the neighbour tenant, waited for: it must be answered
/// and succeed.
async fn neighbour_served(http: &reqwest::Client, base: &str, token: &str) {
    let resp = http
        .post(format!("{base}/v1/modules/hello/jobs?wait=30s"))
        .bearer_auth(token)
        .send()
        .await
        .expect("the neighbour's request got an answer");
    assert_eq!(resp.status(), reqwest::StatusCode::OK);
    let job: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job:#}");
}

fn process_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The descriptors held by `pid`'s children: the service's worker
/// processes, where its guests run.
fn children_fds(pid: u32) -> usize {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    procs
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit(')')
                        .next()?
                        .split_whitespace()
                        .nth(1)?
                        .parse::<u32>()
                        .ok()
                })
                == Some(pid)
        })
        .map(process_fds)
        .sum()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_guest_exhausting_descriptors_leaves_the_service_and_a_neighbour_served() {
    use reqwest::StatusCode;
    use serde_json::Value;

    let dir = tempfile::tempdir().unwrap();
    let hostile = policy(bulkhead_tests::HOSTILE, "hostile")
        .scopes(&["hostile:run"])
        .times(HumanDuration::secs(10), HumanDuration::secs(20))
        .args(&["fd-every-way", "--hold-ms=2000"]);
    let (config, data) = ConfigFile {
        policies: vec![hostile, hello()],
        queue: &format!("workers = {SERVICE_WORKERS}\nmax_running_per_tenant = 3"),
        ..ConfigFile::default()
    }
    .write(dir.path());
    let served = Served::start_with_nofile(&config, SERVICE_NOFILE);
    let base = served.base();
    let pid = served.pid();
    let mallory = token(&data, "mallory", &["hostile:run"]).await;
    let polite = token(&data, "polite", &["hello:run"]).await;
    let http = reqwest::Client::new();
    neighbour_served(&http, &base, &polite).await;
    let baseline = process_fds(pid);
    let workers_baseline = children_fds(pid);

    // Three attackers at once (the tenant's running cap), more queued.
    let mut ids = Vec::new();
    for _ in 0..6 {
        let resp = http
            .post(format!("{base}/v1/modules/hostile/jobs"))
            .bearer_auth(&mallory)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::ACCEPTED);
        let job: Value = resp.json().await.unwrap();
        ids.push(job["id"].as_str().unwrap().to_owned());
    }

    // While they hold what they can, the neighbour and health checks are
    // answered; the service's descriptors are counted from /proc.
    let mut peak = baseline;
    let mut workers_peak = workers_baseline;
    let mut finished = Vec::new();
    for round in 0..400 {
        peak = peak.max(process_fds(pid));
        workers_peak = workers_peak.max(children_fds(pid));
        if round % 10 == 0 {
            neighbour_served(&http, &base, &polite).await;
            let health = http.get(format!("{base}/healthz")).send().await.unwrap();
            assert_eq!(health.status(), StatusCode::OK);
        }
        finished.clear();
        for id in &ids {
            let job: Value = http
                .get(format!("{base}/v1/jobs/{id}"))
                .bearer_auth(&mallory)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if matches!(job["state"].as_str(), Some("succeeded" | "failed")) {
                finished.push(job);
            }
        }
        if finished.len() == ids.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(finished.len(), ids.len(), "the attacks did not all finish");
    for job in &finished {
        assert_eq!(job["state"], "failed", "{job:#}");
        assert_eq!(job["report"]["limit"], "descriptors", "{job:#}");
    }
    // The guests run in worker processes (started with at most the
    // service's own descriptor limit): their descriptors are held there,
    // each job within its share, and the service holds none of them.
    let per_job = descriptor_budget(SERVICE_NOFILE, SERVICE_WORKERS).unwrap();
    let bound = workers_baseline as u64 + 3 * (per_job + JOB_OVERHEAD_DESCRIPTORS) + 32;
    assert!(
        (workers_peak as u64) <= bound,
        "the workers held {workers_peak} descriptors ({workers_baseline} before; bound {bound})"
    );
    assert!(
        (workers_peak as u64) >= workers_baseline as u64 + per_job,
        "the attack never held descriptors: workers' peak {workers_peak}, baseline {workers_baseline}"
    );
    // A few connections of this test's client at most.
    assert!(
        (peak as u64) <= baseline as u64 + 32,
        "the service itself held {peak} descriptors ({baseline} before)"
    );
    eprintln!(
        "descriptors: service {baseline} before, peak {peak}; workers {workers_baseline} before, peak {workers_peak} (bound {bound}, limit {SERVICE_NOFILE})"
    );
    neighbour_served(&http, &base, &polite).await;
    drop(served);
}
