//! Each exhaustion attack ends its job with the right limit named, as a clean
//! failure; the host's disk stays within the quota; and a well-behaved job
//! running at the same time still succeeds.

use bulkhead::sandbox::{FailureKind, LimitKind, Outcome};

use bulkhead::policy::{ByteSize, HumanDuration, Limits};
use bulkhead_suite::evidence::disk_usage;

use crate::common::{hostile, load_plain, run, spec};

/// Small limits so every attack hits its wall quickly.
fn tight(l: &mut Limits) {
    l.memory = ByteSize::mib(32);
    l.cpu_time = HumanDuration::millis(300);
    l.wall_time = HumanDuration::secs(2);
    l.output = ByteSize::mib(1);
    l.output_files = 8;
    l.stdout = ByteSize::kib(64);
    l.stderr = ByteSize::kib(16);
}
const OUTPUT_QUOTA: u64 = 1024 * 1024;
const ENTRY_QUOTA: u64 = 8;

/// Runs `mode` under [`tight`] limits while a `hello` job runs beside it, and
/// checks the limit, the failure, the disk, and the neighbour.
async fn assert_limit(mode: &str, expected: LimitKind) {
    let attacker = hostile(mode, tight);
    let neighbour = load_plain(bulkhead_tests::HELLO, "hello");
    let attack_job = spec(&[], &[]);
    let hello_job = spec(&[], &[]);
    let ((report, dir), (hello, _hello_dir)) =
        tokio::join!(run(&attacker, &attack_job), run(&neighbour, &hello_job));

    assert_eq!(report.outcome, Outcome::Failed, "{mode}: {report:#?}");
    assert_eq!(report.limit, Some(expected), "{mode}: {report:#?}");
    let failure = report.failure.as_ref().unwrap();
    assert_eq!(failure.kind, FailureKind::Limit);
    assert!(
        failure.message.starts_with(expected.as_str()),
        "{}",
        failure.message
    );

    let (bytes, entries) = disk_usage(&dir.output_dir());
    assert!(
        bytes <= OUTPUT_QUOTA,
        "{mode}: /out holds {bytes} bytes on the host"
    );
    assert!(
        entries <= ENTRY_QUOTA,
        "{mode}: /out holds {entries} entries on the host"
    );
    assert!(report.measurements.output_bytes <= OUTPUT_QUOTA);

    assert!(hello.succeeded(), "neighbour of {mode} failed: {hello:#?}");
    assert_eq!(hello.stdout.text, "hello from bulkhead\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn memory_bomb_hits_the_memory_limit() {
    assert_limit("memory-bomb", LimitKind::Memory).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn busy_loop_hits_the_cpu_limit() {
    assert_limit("loop", LimitKind::CpuTime).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn sleeping_forever_hits_the_wall_clock_limit() {
    assert_limit("sleep", LimitKind::WallTime).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stdout_flood_hits_the_stdout_limit() {
    assert_limit("stdout-flood", LimitKind::Stdout).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stderr_flood_hits_the_stderr_limit() {
    assert_limit("stderr-flood", LimitKind::Stderr).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn one_big_write_hits_the_output_quota() {
    assert_limit("disk-big", LimitKind::Output).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn appending_hits_the_output_quota() {
    assert_limit("disk-append", LimitKind::Output).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn growing_a_file_without_writing_hits_the_output_quota() {
    assert_limit("disk-setsize", LimitKind::Output).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn writing_past_the_end_hits_the_output_quota() {
    assert_limit("disk-seek-write", LimitKind::Output).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn many_small_files_hit_the_file_count_quota() {
    assert_limit("disk-many", LimitKind::OutputFiles).await;
}

/// A `create` through a dangling link is refused before its target is
/// made (that file could not be told from one someone else put there):
/// the guest's first one fails, and `/out` holds its link alone.
#[tokio::test(flavor = "multi_thread")]
async fn creating_files_through_dangling_links_is_refused_and_makes_nothing() {
    let attacker = hostile("disk-link-create", tight);
    let (report, dir) = run(&attacker, &spec(&[], &[])).await;
    assert_eq!(report.outcome, Outcome::Failed, "{report:#?}");
    assert_eq!(report.limit, None, "{report:#?}");
    let out = dir.output_dir();
    let names: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["l0"], "{report:#?}");
    assert!(
        std::fs::symlink_metadata(out.join("l0"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn deep_directory_trees_hit_the_file_count_quota() {
    assert_limit("deep-dirs", LimitKind::OutputFiles).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unbounded_recursion_hits_the_stack_limit() {
    assert_limit("recursion-native", LimitKind::Stack).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shadow_stack_overflow_is_a_clean_trap() {
    // Recursion through Rust's shadow stack in linear memory runs off the
    // bottom of memory: a trap inside the guest, reported as such.
    let module = hostile("recursion", tight);
    let (report, _dir) = run(&module, &spec(&[], &[])).await;
    assert_eq!(report.outcome, Outcome::Failed);
    let failure = report.failure.unwrap();
    assert!(
        failure.kind == FailureKind::Trap || report.limit == Some(LimitKind::Stack),
        "{failure:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn more_jobs_than_pool_slots_wait_instead_of_failing() {
    // The test sandbox has 32 slots; 40 jobs at once must all succeed.
    let module = load_plain(bulkhead_tests::HELLO, "hello");
    let jobs: Vec<_> = (0..40).map(|_| spec(&[], &[])).collect();
    let reports = futures::future::join_all(jobs.iter().map(|j| run(&module, j))).await;
    for (report, _dir) in &reports {
        assert!(report.succeeded(), "{report:#?}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn many_attacks_at_once_leave_a_normal_job_unharmed() {
    let modes = ["memory-bomb", "loop", "stdout-flood", "disk-big", "sleep"];
    let attackers: Vec<_> = modes.iter().map(|m| hostile(m, tight)).collect();
    let jobs: Vec<_> = modes.iter().map(|_| spec(&[], &[])).collect();
    let neighbour = load_plain(bulkhead_tests::HELLO, "hello");
    let hello_job = spec(&[], &[]);
    let attacks = futures::future::join_all(attackers.iter().zip(&jobs).map(|(m, j)| run(m, j)));
    let (reports, (hello, _d)) = tokio::join!(attacks, run(&neighbour, &hello_job));
    for (mode, (report, _dir)) in modes.iter().zip(&reports) {
        assert!(report.limit.is_some(), "{mode}: {report:#?}");
    }
    assert!(hello.succeeded(), "{hello:#?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_descriptor_flood_is_held_to_the_jobs_share() {
    // Each descriptor the guest holds is a host descriptor, counted from
    // /proc/self/fd: it gets at most its share, then errors, and a guest
    // that keeps asking is stopped with the `descriptors` limit.
    crate::common::assert_descriptors_bounded("fd-flood", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rewriting_in_place_hits_the_written_limit() {
    assert_limit("disk-rewrite", LimitKind::Written).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn positioned_rewrites_hit_the_written_limit() {
    assert_limit("disk-rewrite-at", LimitKind::Written).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn truncating_and_growing_again_hits_the_output_quota() {
    assert_limit("disk-truncate-regrow", LimitKind::Output).await;
}
