//! The host-side checks every local guest job gets.

use std::path::{Path, PathBuf};

use super::Harness;
use super::evidence;
use super::observe::{Observed, describe_end, produced, read_output};
use crate::model::Check;
use bulkhead::policy::ByteSize;
use bulkhead::runner::Outputs;
use bulkhead::sandbox::{FailureKind, JobReport};

/// Slack on resident memory growth during an attack: the job's own memory
/// is bounded by the policy; this covers the host's bookkeeping, the
/// neighbour job and allocator noise.
const RSS_SLACK: u64 = 128 * 1024 * 1024;

/// See the `outputs` check in [`host_checks`].
fn outputs_check(h: &Harness, r: &JobReport, outputs: &Outputs) -> Check {
    use bulkhead::sandbox::outputs;
    let bad_names: Vec<String> = r
        .outputs
        .iter()
        .filter(|o| {
            o.name.len() > outputs::MAX_PATH_BYTES
                || o.name.split('/').any(|c| outputs::check_name(c).is_err())
        })
        .map(|o| o.name.escape_debug().to_string())
        .collect();
    let copy_to = h.scratch.join(format!("copy-{}", r.job_id));
    // As the gateway (or `run --out`) copies them, by handle, within the
    // policy's limits when a worker left them.
    let copied = outputs.collect(Some(&copy_to));
    let _ = std::fs::remove_dir_all(&copy_to);
    let failed_with_reason = r
        .failure
        .as_ref()
        .is_some_and(|f| f.kind == FailureKind::Output);
    let mut reasons: Vec<&str> = r
        .skipped_outputs
        .iter()
        .map(|s| s.reason.as_str())
        .collect();
    reasons.sort_unstable();
    reasons.dedup();
    let copy_ok = copied.is_ok() || failed_with_reason;
    Check::new(
        "outputs",
        bad_names.is_empty() && copy_ok,
        match (&copied, bad_names.is_empty()) {
            (Ok(c), true) => format!(
                "{} outputs with clean names copied out by handle; {} skipped ({})",
                c.files.len(),
                r.skipped_outputs.len(),
                if reasons.is_empty() {
                    "none".to_owned()
                } else {
                    reasons.join(", ")
                }
            ),
            (Err(e), true) if failed_with_reason => {
                format!("the job failed with the reason `output`; a copy fails too: {e}")
            }
            (Err(e), true) => format!("the outputs the report lists cannot be copied out: {e}"),
            (_, false) => format!("collected names that are unsafe or too long: {bad_names:?}"),
        },
    )
}

/// The host-side checks every local guest job gets.
pub(crate) fn host_checks(
    h: &Harness,
    obs: &Observed,
    secrets: &[(String, Vec<u8>)],
    untouched: &[(PathBuf, String)],
) -> Vec<Check> {
    let r = &obs.report;
    let b = &h.bounds;
    let out_dir = &obs.out_dir;
    let mut checks = Vec::new();

    // Canary files outside the job: no event, no change.
    let mut touched = h.canary.touched();
    touched.extend(h.canary.content_changed());
    // Reading the canaries for the comparison raised events of its own.
    let _ = h.canary.touched();
    for (path, before) in untouched {
        let now = fingerprint(path);
        if &now != before {
            touched.push(format!("{} changed: {before} -> {now}", path.display()));
        }
    }
    checks.push(Check::new(
        "canary",
        touched.is_empty(),
        if touched.is_empty() {
            format!(
                "canary files outside the job untouched ({})",
                if h.canary.watched() {
                    "inotify watch and metadata"
                } else {
                    "metadata only: no inotify"
                }
            )
        } else {
            touched.join("; ")
        },
    ));

    // Secrets in anything the job produced; loot the guest collected.
    let all = produced(r, out_dir);
    let leaked = evidence::find_secret(&all, secrets);
    let loot: Vec<String> = r
        .outputs
        .iter()
        .filter(|o| o.name.starts_with("loot-"))
        .map(|o| {
            let data = read_output(out_dir, &o.name);
            let first = String::from_utf8_lossy(&data[..data.len().min(120)])
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
            format!("{} ({first})", o.name)
        })
        .collect();
    checks.push(Check::new(
        "secrets",
        leaked.is_empty() && loot.is_empty(),
        match (leaked.is_empty(), loot.is_empty()) {
            (true, true) => format!(
                "no host secret in stdout, stderr or {} outputs; nothing looted",
                r.outputs.len()
            ),
            _ => format!(
                "{}{}",
                if leaked.is_empty() {
                    String::new()
                } else {
                    format!("leaked: {}. ", leaked.join(", "))
                },
                if loot.is_empty() {
                    String::new()
                } else {
                    format!("looted: {}", loot.join(", "))
                }
            ),
        },
    ));

    // The inputs, and the shared empty input directory.
    let mut now = std::collections::BTreeMap::new();
    for dir in &obs.in_dirs {
        now.extend(evidence::tree_digest(dir));
    }
    let inputs_ok = now == obs.inputs_before;
    checks.push(Check::new(
        "inputs",
        inputs_ok,
        if inputs_ok {
            format!("{} input files unchanged, nothing added", now.len())
        } else {
            format!("/in now holds {now:?}, was {:?}", obs.inputs_before)
        },
    ));

    // Output collection never followed a link.
    let special: Vec<String> = obs
        .raw_outs
        .iter()
        .flat_map(|d| evidence::special_entries(d))
        .collect();
    let skipped: Vec<&str> = r.skipped_outputs.iter().map(|s| s.name.as_str()).collect();
    let followed: Vec<&String> = special
        .iter()
        .filter(|s| r.outputs.iter().any(|o| &o.name == *s) || !skipped.contains(&s.as_str()))
        .collect();
    checks.push(Check::new(
        "collection",
        followed.is_empty(),
        if followed.is_empty() {
            format!(
                "{} links or special files left in /out, none collected",
                special.len()
            )
        } else {
            format!("collected or unaccounted for: {followed:?}")
        },
    ));

    // Outputs: every collected name is one a person and a URL can carry,
    // and the outputs copy out (by handle, as `run --out` and the service
    // copy them), or the job failed saying collection failed. A host error
    // instead would have ended the attack before the checks.
    checks.push(outputs_check(h, r, &obs.outputs));

    // Disk.
    let (bytes, entries) = obs
        .raw_outs
        .iter()
        .map(|d| evidence::disk_usage(d))
        .fold((0, 0), |(b, e), (b2, e2)| (b + b2, e + e2));
    // tmpfs and most filesystems allocate whole pages: each entry may use
    // one more page than its bytes.
    let disk_bound = b.output + (b.output_files + 1) * 4096;
    checks.push(Check::new(
        "disk",
        bytes <= disk_bound && entries <= b.output_files,
        format!(
            "/out holds {} in {entries} entries on the host (bounds {} + page rounding, {} entries)",
            ByteSize::bytes(bytes),
            ByteSize::bytes(b.output),
            b.output_files
        ),
    ));

    // Memory: the job's, and the host process's.
    let p = &obs.peaks;
    let job_mem = r.measurements.peak_memory_bytes;
    let rss_growth = p.rss_peak.saturating_sub(p.rss_before);
    checks.push(Check::new(
        "memory",
        job_mem <= b.memory && rss_growth <= b.memory + RSS_SLACK,
        format!(
            "guest peak {} (bound {}); host resident memory grew {} at most",
            ByteSize::bytes(job_mem),
            ByteSize::bytes(b.memory),
            ByteSize::bytes(rss_growth)
        ),
    ));

    // Time and captured output.
    let wall = r.measurements.wall_time_ms;
    let wall_bound = b.wall_ms * 2.0 + 1000.0;
    checks.push(Check::new(
        "time",
        wall <= wall_bound,
        format!("wall {wall:.0} ms (policy {:.0} ms)", b.wall_ms),
    ));
    checks.push(Check::new(
        "output streams",
        r.stdout.bytes <= b.stdout && r.stderr.bytes <= b.stderr,
        format!(
            "captured stdout {} B, stderr {} B (bounds {} B, {} B)",
            r.stdout.bytes, r.stderr.bytes, b.stdout, b.stderr
        ),
    ));

    // The neighbour.
    let n = &obs.neighbour;
    let ok = n.succeeded() && n.stdout.text == "hello from bulkhead\n";
    checks.push(Check::new(
        "neighbour",
        ok,
        if ok {
            format!(
                "a concurrent hello job succeeded in {:.1} ms",
                n.measurements.wall_time_ms
            )
        } else {
            format!("the concurrent hello job failed: {}", describe_end(n))
        },
    ));

    // Descriptors and sockets.
    // A job may hold up to `max_open_per_job` host descriptors, whatever
    // object holds them; the process must still have room for other jobs
    // and its listeners below its own descriptor limit.
    let soft_limit = evidence::fd_soft_limit();
    let fd_peak_bound = super::meters::fd_peak_bound(h.main.max_open_per_job, p.fds_before)
        .min(soft_limit.saturating_sub(64));
    let whose = if h.main.in_workers() {
        "the suite's and its workers'"
    } else {
        "this process's"
    };
    checks.push(Check::new(
        "descriptors",
        !p.blind && p.fds_peak <= fd_peak_bound && p.fds_after <= p.fds_before + 8,
        if p.blind {
            "a worker's descriptors and memory could not be read from /proc: not judged".to_owned()
        } else {
            format!(
                "open descriptors ({whose}) {} before, {} at most, {} after (peak bound \
                 {fd_peak_bound}: the job's share of {} host descriptors and both jobs' own, and \
                 64 below this process's soft RLIMIT_NOFILE of {soft_limit})",
                p.fds_before, p.fds_peak, p.fds_after, h.main.max_open_per_job
            )
        },
    ));
    checks.extend(super::meters::checks(&obs.meters, b.cpu_ms, b.output));
    let mut net = h.bait.touched();
    if p.sockets_peak > p.sockets_before {
        net.push(format!(
            "the process held {} sockets during the job, {} before",
            p.sockets_peak, p.sockets_before
        ));
    }
    checks.push(Check::new(
        "network",
        net.is_empty(),
        if net.is_empty() {
            format!(
                "no new socket in the process; nothing reached the bait on port {}",
                h.bait.port
            )
        } else {
            net.join("; ")
        },
    ));
    checks
}

/// Size, modification and change times and digest of a host file.
pub(crate) fn fingerprint(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) => {
            let digest = if m.is_file() {
                std::fs::read(path)
                    .map(|d| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&d)))
                    .unwrap_or_default()
            } else {
                String::new()
            };
            format!(
                "size {} mtime {}.{} ctime {}.{} {digest}",
                m.size(),
                m.mtime(),
                m.mtime_nsec(),
                m.ctime(),
                m.ctime_nsec()
            )
        }
        Err(e) => format!("missing ({e})"),
    }
}
