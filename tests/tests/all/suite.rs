//! `bulkhead escape-suite --server`: the suite runs against a service over
//! HTTP, judging what it can from the outside and listing the rest as not
//! applicable. (The local runs have a test binary of their own,
//! `tests/suite`.)

use bulkhead_suite::{self as suite, Class, SuiteOptions, SuiteReport, report};

use crate::common::start;
use crate::common::suite_support::{not_held, options};

async fn run(options: &SuiteOptions) -> SuiteReport {
    suite::run(options, &mut |_| {}).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_suite_runs_against_a_service_over_http() {
    // The service serves the suite's exported modules; the token has the
    // suite's scope.
    let exported = tempfile::tempdir().unwrap();
    let n = suite::export_modules(&options(), exported.path()).unwrap();
    assert!(n >= 40, "{n} modules exported");
    let dir = exported.path().to_owned();
    let server = start(move |c| {
        c.modules.policies_dir = dir.join("policies");
        c.modules.modules_dir = dir.join("modules");
    })
    .await;
    let token = server.token("testers", &[suite::SUITE_SCOPE]).await;
    let mut opts = options();
    opts.server = Some(server.base.clone());
    opts.token = Some(token);
    let report = run(&opts).await;
    let not_held = not_held(&report);
    assert!(not_held.is_empty(), "{}", not_held.join("\n"));
    assert_eq!(report.target, server.base);
    assert!(report.summary.total >= 40, "{}", report.summary.total);
    assert!(report.results.iter().any(|r| r.class == Class::Tokens));
    // Forged tokens are judged against the keys the service publishes…
    let forged = report
        .results
        .iter()
        .find(|r| r.id == "tokens.forge-alg-none")
        .unwrap();
    assert!(
        forged
            .checks
            .iter()
            .any(|c| c.detail.contains("/.well-known/jwks.json")),
        "{:?}",
        forged.checks
    );
    // …and what needs the host itself is reported as not applicable,
    // with the reason, rather than silently dropped.
    let http = report
        .not_run
        .iter()
        .find(|n| n.id == "lateral.http-ungranted")
        .unwrap();
    assert!(http.reason.contains("[[services]]"), "{}", http.reason);
    assert!(
        report
            .not_run
            .iter()
            .any(|n| n.id == "tokens.forge-expired")
    );
    assert!(
        report::table::render(&report).contains("not applicable against"),
        "the table lists what did not run"
    );
    // Without the scope the suite refuses to start, and says why.
    let other = server.token("testers", &["hello:run"]).await;
    opts.token = Some(other);
    let err = suite::run(&opts, &mut |_| {})
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("escape-suite:run"), "{err}");
}
