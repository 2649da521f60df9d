//! One job run with the neighbour beside it and evidence around it, and
//! what it produced.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Instant;

use super::checks::host_checks;
use super::evidence::{Peaks, Sampler};
use super::{Harness, Lane};
use crate::model::{Attack, AttackResult, ms};
use bulkhead::sandbox::{FailureKind, JobDir, JobReport, JobSpec, LoadedModule, Outcome};

/// One job, with the neighbour beside it and evidence around it.
pub(crate) struct Observed {
    pub(crate) report: JobReport,
    pub(crate) dir: JobDir,
    pub(crate) neighbour: JobReport,
    pub(crate) peaks: Peaks,
    /// Host meters around the job (and its neighbour).
    pub(crate) meters: super::meters::Spent,
    pub(crate) inputs_before: std::collections::BTreeMap<String, String>,
}

pub(crate) async fn observe(
    lane: &Lane,
    module: &LoadedModule,
    job: &JobSpec,
) -> Result<Observed, String> {
    let dir =
        JobDir::create(&lane.sandbox.config().work_dir, &job.id).map_err(|e| e.to_string())?;
    let hello = JobSpec::new();
    let hello_dir =
        JobDir::create(&lane.sandbox.config().work_dir, &hello.id).map_err(|e| e.to_string())?;
    let inputs_before: std::collections::BTreeMap<String, String> = job
        .inputs
        .iter()
        .map(|i| {
            (
                i.name.clone(),
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&i.data)),
            )
        })
        .collect();
    let sampler = Sampler::start();
    let meters = super::meters::Meters::start();
    let (report, neighbour) = tokio::join!(
        lane.run(module, job, &dir),
        lane.run(&lane.neighbour, &hello, &hello_dir)
    );
    let meters = meters.stop();
    let peaks = sampler.stop();
    let report = report.map_err(|e| format!("the job was refused: {e}"))?;
    let neighbour = neighbour.map_err(|e| format!("the neighbour job was refused: {e}"))?;
    Ok(Observed {
        report,
        dir,
        neighbour,
        peaks,
        meters,
        inputs_before,
    })
}

/// The limit or denial that ended `report`, for the table.
pub(crate) fn stopped_by(report: &JobReport) -> String {
    match (&report.limit, &report.failure) {
        (Some(limit), _) => format!("limit {limit}"),
        (None, Some(f)) if f.kind == FailureKind::Trap => format!("trap: {}", f.message),
        (None, Some(f)) if f.kind == FailureKind::Instantiate => {
            format!("refused at instantiation: {}", f.message)
        }
        (None, Some(f)) => f.message.clone(),
        (None, None) => "the job exited 0".to_owned(),
    }
}

/// Runs one job of an already loaded module with every host-side check
/// (no outcome expectation: the caller judges that from the report).
pub(crate) async fn run_loaded(
    h: &Harness,
    lane: &Lane,
    attack: &Attack,
    module: &LoadedModule,
    started: Instant,
) -> (AttackResult, Option<JobReport>) {
    let job = JobSpec::new();
    let secrets = h.secrets(&job, &[], "");
    match observe(lane, module, &job).await {
        Ok(obs) => {
            let checks = host_checks(h, &obs, &secrets, &[]);
            let stopped = stopped_by(&obs.report);
            let report = obs.report.clone();
            drop(obs);
            (
                AttackResult::judge(attack, checks, stopped, None, ms(started)),
                Some(report),
            )
        }
        Err(e) => (
            AttackResult::judge(attack, Vec::new(), String::new(), Some(e), ms(started)),
            None,
        ),
    }
}

pub(crate) fn describe_end(report: &JobReport) -> String {
    match (&report.outcome, &report.failure) {
        (Outcome::Succeeded, _) => "the job exited 0".to_owned(),
        (Outcome::Failed, Some(f)) => format!("the job failed: {}", f.message),
        (Outcome::Failed, None) => "the job failed".to_owned(),
    }
}

/// Reads a regular file of `/out` without following links, at most 16 MiB.
pub(crate) fn read_output(out_dir: &Path, name: &str) -> Vec<u8> {
    let mut data = Vec::new();
    // Every component must be a real directory: open each with O_NOFOLLOW
    // by walking, which `collect` already did; here the guest has ended, so
    // a final-component O_NOFOLLOW and an fstat suffice for regular files
    // the report listed.
    if let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(out_dir.join(name))
        && f.metadata().is_ok_and(|m| m.is_file())
    {
        let _ = f.take(16 * 1024 * 1024).read_to_end(&mut data);
    }
    data
}

/// Everything the job produced that a breach could leave evidence in.
pub(crate) fn produced(report: &JobReport, out_dir: &Path) -> Vec<u8> {
    let mut all = report.stdout.text.clone().into_bytes();
    all.extend(report.stderr.text.as_bytes());
    for o in &report.outputs {
        all.extend(read_output(out_dir, &o.name));
    }
    all
}
