//! One job of a guest, judged by how it ended and the host-side checks.

use std::path::PathBuf;
use std::time::Instant;

use crate::harness::Harness;
use crate::harness::checks::{fingerprint, host_checks};
use crate::harness::evidence;
use crate::harness::observe::{describe_end, observe, stopped_by};
use crate::model::{
    Attack, AttackResult, BUNDLED, Check, Expect, GuestRun, attempt_evidence, module_name, ms,
};
use bulkhead::sandbox::{FailureKind, JobReport, Outcome};

pub(crate) async fn guest_attack(
    h: &Harness,
    attack: &Attack,
    run: &GuestRun,
    started: Instant,
) -> AttackResult {
    let secret = evidence::random_token("BULKHEAD-SECRET");
    let fail =
        |e: String| AttackResult::judge(attack, Vec::new(), String::new(), Some(e), ms(started));
    let module = match h.load(&module_name(&attack.id), run).await {
        Ok(m) => m,
        Err(e) => return fail(format!("cannot load the attack's module: {e}")),
    };
    let job = h.spec(run, &secret);
    let secrets = h.secrets(&job, &run.forbidden, &secret);
    let untouched: Vec<(PathBuf, String)> = run
        .untouched
        .iter()
        .map(|p| (p.clone(), fingerprint(p)))
        .collect();
    let obs = match observe(h, &h.main, &module, &job).await {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let mut checks = Vec::new();
    let mut error = outcome_check(&run.expect, &obs.report, &mut checks);
    checks.extend(host_checks(h, &obs, &secrets, &untouched));
    if error.is_none()
        && obs
            .report
            .failure
            .as_ref()
            .is_some_and(|f| matches!(f.kind, FailureKind::Instantiate | FailureKind::Host))
    {
        error = Some("the guest did not start".into());
    }
    let stopped = stopped_by(&obs.report);
    let (attempted, evidence) =
        attempt_evidence(&obs.report, Some(&obs.neighbour), attack.source != BUNDLED);
    drop(obs);
    AttackResult::judge(attack, checks, stopped, error, ms(started))
        .with_evidence(evidence.clone())
        .unless_attempted(
            attempted,
            format!("no attempt observed by the host: {evidence}"),
        )
}

/// Checks the job ended as the attack expects. Returns an error when the
/// attack cannot be judged (the guest did not really try).
fn outcome_check(expect: &Expect, report: &JobReport, checks: &mut Vec<Check>) -> Option<String> {
    let ended = describe_end(report);
    match expect {
        Expect::Contained => {
            let tried = report
                .stdout
                .text
                .lines()
                .filter(|l| l.starts_with("attempt "))
                .count();
            if tried == 0 && report.limit.is_none() {
                return Some(format!("the guest made no attempt ({ended})"));
            }
            checks.push(Check::new(
                "outcome",
                true,
                format!("{tried} attempts; {ended}"),
            ));
        }
        Expect::Limit(kinds) => {
            let names: Vec<_> = kinds.iter().map(|k| k.as_str()).collect();
            let (passed, detail) = match report.limit {
                Some(l) if kinds.contains(&l) => (true, format!("limit {l} fired as expected")),
                Some(l) => (
                    true,
                    format!("limit {l} fired (expected {})", names.join(" or ")),
                ),
                None if report.outcome == Outcome::Failed => (
                    true,
                    format!("{ended} (expected limit {})", names.join(" or ")),
                ),
                None => (
                    false,
                    format!(
                        "ran to completion: no limit fired (expected {})",
                        names.join(" or ")
                    ),
                ),
            };
            checks.push(Check::new("outcome", passed, detail));
        }
        Expect::Failed => checks.push(Check::new(
            "outcome",
            report.outcome == Outcome::Failed,
            ended,
        )),
        Expect::Any => checks.push(Check::new("outcome", true, ended)),
        Expect::Served => checks.push(Check::new(
            "outcome",
            report.outcome == Outcome::Succeeded,
            ended,
        )),
    }
    None
}
