//! Host descriptors a job holds, counted from `/proc/self/fd` while it
//! runs in the shared sandbox, and the check that a descriptor attack is
//! held to the job's bound (used by `meters` and `limits`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bulkhead::policy::HumanDuration;
use bulkhead::sandbox::{
    FailureKind, JOB_OVERHEAD_DESCRIPTORS, JobDir, JobReport, LimitKind, Outcome,
};

use super::guests::{SANDBOX, hostile_with, spec};

/// Host descriptors of this process open on anything whose path starts
/// with `prefix` (`/proc/self/fd` links resolve to the file's path; a job's
/// directories are `<work>/<id>.in` and `<work>/<id>.out`).
fn fds_under(prefix: &str) -> usize {
    let Ok(entries) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with(prefix))
        .count()
}

/// Samples [`fds_under`] every few milliseconds until dropped; yields the
/// peak.
struct FdSampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<usize>,
}

impl FdSampler {
    fn start(prefix: String) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut peak = 0;
            while !flag.load(Ordering::Relaxed) {
                peak = peak.max(fds_under(&prefix));
                std::thread::sleep(Duration::from_millis(5));
            }
            peak.max(fds_under(&prefix))
        });
        Self { stop, thread }
    }

    fn peak(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap()
    }
}

/// Runs `mode` with an input, counting the host descriptors open on the
/// job's directories while it runs.
async fn run_counting_fds(mode: &str) -> (JobReport, usize) {
    let params = ["hold-ms", "entries", "mib", "passes"];
    let module = hostile_with(mode, &params, |l| {
        l.wall_time = HumanDuration::secs(20);
        l.cpu_time = HumanDuration::secs(10);
    });
    let job = spec(&[("input.txt", b"the job's input")], &[("hold-ms", "300")]);
    let dir = JobDir::create(&SANDBOX.config().work_dir, &job.id).unwrap();
    let prefix = SANDBOX.config().work_dir.join(&job.id);
    let sampler = FdSampler::start(prefix.to_string_lossy().into_owned());
    let report = SANDBOX.run(&module, &job, &dir).await.unwrap();
    (report, sampler.peak())
}

/// Runs `mode` and checks the host descriptors it held against the job's
/// bound and that it ended with the `descriptors` limit; `saw_peak`: the
/// mode holds what it got long enough for the sampler to see it.
pub async fn assert_descriptors_bounded(mode: &str, saw_peak: bool) {
    let (report, peak) = run_counting_fds(mode).await;
    let bound = SANDBOX.max_open_per_job() + JOB_OVERHEAD_DESCRIPTORS;
    assert!(
        peak as u64 <= bound,
        "{mode}: the job held {peak} host descriptors, bound {bound}: {}",
        report.stdout.text
    );
    // The guest really got up to its bound (the sampler saw it) before
    // being refused, and persisting past the refusals ended the job.
    assert!(
        !saw_peak || peak as u64 >= SANDBOX.max_open_per_job() / 2,
        "{mode}: only {peak} descriptors seen: {report:#?}"
    );
    assert_eq!(report.outcome, Outcome::Failed, "{mode}: {report:#?}");
    assert_eq!(
        report.limit,
        Some(LimitKind::Descriptors),
        "{mode}: {report:#?}"
    );
    let failure = report.failure.unwrap();
    assert_eq!(failure.kind, FailureKind::Limit);
    assert!(failure.message.starts_with("descriptors"), "{failure:?}");
}
