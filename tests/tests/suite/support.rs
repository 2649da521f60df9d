//! What both escape-suite test binaries use: the suite's options with the
//! test cache, and the results that did not hold, each in one line.

use std::path::PathBuf;

use bulkhead_suite::{AttackResult, SuiteOptions, SuiteReport, Verdict};

/// The suite's defaults, with the module cache under the test target dir
/// and the second-wall drill started from the `bulkhead` binary built for
/// the tests (a test binary cannot be started as the drill).
pub fn options() -> SuiteOptions {
    SuiteOptions {
        cache_dir: Some(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("module-cache")),
        drill_program: Some(PathBuf::from(env!("CARGO_BIN_EXE_bulkhead-under-test"))),
        ..SuiteOptions::default()
    }
}

/// `verdict id: check: detail; …` for the checks `r` failed.
pub fn failed_checks(r: &AttackResult) -> String {
    let failed: Vec<_> = r
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| format!("{}: {}", c.name, c.detail))
        .collect();
    format!("{} {}: {}", r.verdict.as_str(), r.id, failed.join("; "))
}

/// [`failed_checks`] of every result in `report` that did not hold.
pub fn not_held(report: &SuiteReport) -> Vec<String> {
    report
        .results
        .iter()
        .filter(|r| r.verdict != Verdict::Held)
        .map(failed_checks)
        .collect()
}
