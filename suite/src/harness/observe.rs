//! One job run with the neighbour beside it and evidence around it, and
//! what it produced.

use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::checks::host_checks;
use super::evidence::{Peaks, Sampler};
use super::{Harness, Lane};
use crate::model::{Attack, AttackResult, ms};
use bulkhead::runner::{Finished, Module, Outputs};
use bulkhead::sandbox::{FailureKind, JobReport, JobSpec, Outcome};

/// One job, with the neighbour beside it and evidence around it.
pub(crate) struct Observed {
    /// Its report; in worker mode with the output lists the suite found,
    /// as the gateway lists them, never the worker's own.
    pub(crate) report: JobReport,
    /// Its outputs, where the runner left them (kept until dropped).
    pub(crate) outputs: Outputs,
    /// Where its outputs are read: its `/out` in this process's sandbox,
    /// or the gateway's bounded copy of what a worker left.
    pub(crate) out_dir: PathBuf,
    /// The directories its `/out` really was on the host (in worker mode:
    /// those that appeared in the workers' directories while it ran, the
    /// neighbour's empty one included), for disk usage and links left.
    pub(crate) raw_outs: Vec<PathBuf>,
    /// The directories its `/in` really was on the host.
    pub(crate) in_dirs: Vec<PathBuf>,
    pub(crate) neighbour: JobReport,
    pub(crate) peaks: Peaks,
    /// Host meters around the job (and its neighbour).
    pub(crate) meters: super::meters::Spent,
    pub(crate) inputs_before: std::collections::BTreeMap<String, String>,
    /// The gateway's copy, removed when dropped.
    copy: Option<PathBuf>,
}

impl Drop for Observed {
    fn drop(&mut self) {
        if let Some(copy) = self.copy.take() {
            let _ = std::fs::remove_dir_all(copy);
        }
    }
}

pub(crate) async fn observe(
    h: &Harness,
    lane: &Lane,
    module: &Module,
    job: &JobSpec,
) -> Result<Observed, String> {
    let hello = JobSpec::new();
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
    let dirs_before = lane.worker_job_dirs();
    let pids = lane.pids();
    let sampler = Sampler::start_with(Some(Arc::clone(&pids)));
    let meters = super::meters::Meters::start(&pids());
    let (finished, neighbour) =
        tokio::join!(lane.run(module, job), lane.run(&lane.neighbour, &hello));
    let meters = meters.stop(&pids());
    let peaks = sampler.stop();
    let finished = finished.map_err(|e| format!("the job was refused: {e}"))?;
    let neighbour = neighbour.map_err(|e| format!("the neighbour job was refused: {e}"))?;
    drop(neighbour.outputs);
    let Finished {
        mut report,
        outputs,
    } = finished;
    let (out_dir, raw_outs, in_dirs, copy) = match &outputs {
        Outputs::Local(dir, _) => (
            dir.output_dir(),
            vec![dir.output_dir()],
            vec![dir.input_dir()],
            None,
        ),
        _ => {
            // As the gateway does with what a worker left: copy it out
            // within the policy's limits and list what was copied.
            let copy = h.scratch.join(format!("gateway-{}", job.id));
            match outputs.collect(Some(&copy)) {
                Ok(collected) => report.list_collected(collected),
                Err(e) => report.fail_outputs(format!("cannot read the outputs: {e}")),
            }
            let new: Vec<PathBuf> = lane
                .worker_job_dirs()
                .difference(&dirs_before)
                .cloned()
                .collect();
            let (outs, ins): (Vec<PathBuf>, Vec<PathBuf>) = new
                .into_iter()
                .partition(|p| p.extension().is_some_and(|e| e == "out"));
            let ins = if job.inputs.is_empty() {
                lane.shared_inputs()
            } else {
                ins
            };
            (copy.clone(), outs, ins, Some(copy))
        }
    };
    Ok(Observed {
        report,
        outputs,
        out_dir,
        raw_outs,
        in_dirs,
        neighbour: neighbour.report,
        peaks,
        meters,
        inputs_before,
        copy,
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
    module: &Module,
    started: Instant,
) -> (AttackResult, Option<JobReport>) {
    let job = JobSpec::new();
    let secrets = h.secrets(&job, &[], "");
    match observe(h, lane, module, &job).await {
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
