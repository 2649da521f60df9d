//! A job that plants a secret, then jobs of the same module that look for
//! it in the pool slots it used.

use std::time::Instant;

use crate::harness::Harness;
use crate::harness::checks::host_checks;
use crate::harness::evidence;
use crate::harness::observe::{describe_end, observe, produced, stopped_by};
use crate::model::{Attack, AttackResult, Check, GuestRun, Param, module_name, ms};
use bulkhead::sandbox::JobSpec;

pub(crate) async fn sequence_attack(
    h: &Harness,
    attack: &Attack,
    writer: &GuestRun,
    reader: &GuestRun,
    readers: usize,
    started: Instant,
) -> AttackResult {
    let secret = evidence::random_token("BULKHEAD-XJOB");
    let fail =
        |e: String| AttackResult::judge(attack, Vec::new(), String::new(), Some(e), ms(started));
    // Writer and readers run as one module (one policy, the mode passed as
    // `--mode=`), so the pooling allocator hands the readers the slots the
    // writer used: the case where a slot that was not reset would leak.
    let mut both = writer.clone();
    both.args.clear();
    both.params = writer.params.clone();
    for p in &reader.params {
        if !both.params.iter().any(|(k, _)| k == &p.0) {
            both.params.push(p.clone());
        }
    }
    both.params.push(("mode".into(), Param::Lit(String::new())));
    let module = match h.load(&module_name(&attack.id), &both).await {
        Ok(m) => m,
        Err(e) => return fail(format!("cannot load the attack's module: {e}")),
    };
    let job_for = |run: &GuestRun| {
        let mut job = h.spec(run, &secret);
        job.params
            .insert("mode".into(), run.args.first().cloned().unwrap_or_default());
        job
    };
    let wjob = job_for(writer);
    let wobs = match observe(h, &h.main, &module, &wjob).await {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    let mut checks = Vec::new();
    let planted = produced(&wobs.report, &wobs.out_dir);
    let writer_ok = wobs.report.succeeded() || !wobs.report.stdout.text.is_empty();
    if !writer_ok {
        return fail(format!(
            "the writer did not run: {}",
            describe_end(&wobs.report)
        ));
    }
    checks.push(Check::new(
        "planted",
        true,
        format!(
            "writer job {}; its outputs {} the secret",
            describe_end(&wobs.report),
            if planted
                .windows(secret.len())
                .any(|w| w == secret.as_bytes())
            {
                "hold"
            } else {
                "do not hold"
            }
        ),
    ));
    drop(wobs);
    // The shared empty `/in` (one per worker) must still be empty for the
    // next job.
    let leftover: Vec<_> = h
        .main
        .shared_inputs()
        .iter()
        .flat_map(|shared| {
            std::fs::read_dir(shared)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
        })
        .collect();
    checks.push(Check::new(
        "shared input",
        leftover.is_empty(),
        if leftover.is_empty() {
            "the shared empty /in is still empty".to_owned()
        } else {
            format!("left in the shared /in: {leftover:?}")
        },
    ));

    let secrets = vec![(
        "the earlier job's secret".to_owned(),
        secret.clone().into_bytes(),
    )];
    let mut error = None;
    let mut last_stop = String::new();
    for i in 0..readers {
        let rjob = job_for(reader);
        let robs = match observe(h, &h.main, &module, &rjob).await {
            Ok(o) => o,
            Err(e) => return fail(e),
        };
        let out = &robs.report.stdout.text;
        if out.contains("self-check failed") {
            error = Some("the reader's memory scanner could not see its own copy".to_owned());
        }
        // The reader was handed the secret to look for: drop it from what
        // it printed about its own arguments, and look everywhere else.
        let mut all = produced(&robs.report, &robs.out_dir);
        if reader.params.iter().any(|(_, p)| *p == Param::Secret) {
            all = strip_own_args(&all, &rjob);
        }
        let leaked = evidence::find_secret(&all, &secrets);
        checks.push(Check::new(
            &format!("reader {}", i + 1),
            leaked.is_empty(),
            if leaked.is_empty() {
                format!(
                    "no trace of the earlier job in stdout, stderr or {} outputs ({})",
                    robs.report.outputs.len(),
                    describe_end(&robs.report)
                )
            } else {
                format!("found {}", leaked.join(", "))
            },
        ));
        let mut host = host_checks(h, &robs, &[], &[]);
        host.retain(|c| !c.passed || matches!(c.name.as_str(), "canary" | "neighbour"));
        checks.extend(host);
        last_stop = stopped_by(&robs.report);
    }
    AttackResult::judge(attack, checks, last_stop, error, ms(started))
}

/// `all` without the `--name=value` strings the job was given.
fn strip_own_args(all: &[u8], job: &JobSpec) -> Vec<u8> {
    let mut text = String::from_utf8_lossy(all).into_owned();
    for (k, v) in &job.params {
        text = text.replace(&format!("--{k}={v}"), "");
    }
    text.into_bytes()
}
