//! `bulkhead escape-suite` run locally: the whole bundled suite holds with
//! its guests in hardened worker processes (and in this process with
//! `in_process`); a deliberately weakened configuration is reported
//! breached, in workers and (where the weakening cannot reach a worker) in
//! this process (so the suite can say "breached" at all); a tester's own
//! guests are counted and judged;
//! an attack that tries nothing is inconclusive; the JSON, HTML and table
//! agree; the binary's exit status follows the verdicts.
//!
//! A test binary of its own: the suite judges CPU, bytes written and
//! descriptors from this process's own accounting (`getrusage`,
//! `/proc/self/io`, `/proc/self/fd`) and its workers' (`/proc/<pid>/…`), as
//! `bulkhead escape-suite` does, so no other test may run beside it; its local runs take
//! [`LOCAL`] one at a time for the same reason.

use std::path::{Path, PathBuf};
use std::process::Command;

use bulkhead_suite::{self as suite, Class, SuiteOptions, SuiteReport, Verdict, Weakening, report};

mod second_wall;
mod support;

use support::{failed_checks, not_held, options};

/// One local suite run at a time: each judges from the whole process's
/// meters.
static LOCAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn run(options: &SuiteOptions) -> SuiteReport {
    let _one_at_a_time = LOCAL.lock().await;
    suite::run(options, &mut |_| {}).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_bundled_suite_holds_and_its_reports_agree() {
    let report = run(&options()).await;
    let not_held = not_held(&report);
    assert!(not_held.is_empty(), "{}", not_held.join("\n"));
    assert!(report.all_held());
    // Every verdict lists the host-side evidence it rests on.
    let without: Vec<_> = report
        .results
        .iter()
        .filter(|r| r.evidence.is_empty())
        .map(|r| r.id.as_str())
        .collect();
    assert!(without.is_empty(), "no evidence listed: {without:?}");
    assert!(
        report.summary.total >= 93,
        "{} attacks",
        report.summary.total
    );
    assert_eq!(report.summary.breached, 0);
    // Every class of the attack list, several variants each.
    for class in Class::ALL {
        let n = report.results.iter().filter(|r| r.class == class).count();
        assert!(n >= 3, "{n} attacks of class {class}");
    }
    // The outbound gate and the call-token layer are attacked too: lateral
    // movement over HTTP judged from what the bait services received,
    // forged tokens judged by a verifier pinned to the host's keys.
    let count = |prefix: &str| {
        report
            .results
            .iter()
            .filter(|r| r.id.starts_with(prefix))
            .count()
    };
    assert!(count("lateral.http-") >= 11, "{}", count("lateral.http-"));
    assert!(count("tokens.forge-") >= 10, "{}", count("tokens.forge-"));
    for id in ["tokens.replay-audience", "tokens.call-token-at-api"] {
        assert!(report.results.iter().any(|r| r.id == id), "{id} missing");
    }
    let ungranted = report
        .results
        .iter()
        .find(|r| r.id == "lateral.http-ungranted")
        .unwrap();
    for name in [
        "forbidden service",
        "allowed service",
        "refusals",
        "neighbour",
    ] {
        assert!(
            ungranted.checks.iter().any(|c| c.name == name && c.passed),
            "{name}: {:?}",
            ungranted.checks
        );
    }
    // Every attack was judged by host-side checks, not one line.
    for r in &report.results {
        assert!(r.checks.len() >= 2, "{}: {:?}", r.id, r.checks);
    }

    // JSON round-trips to the same report.
    let json = report::json::render(&report);
    assert_eq!(report::json::parse(&json).unwrap(), report);
    let value: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(value["summary"]["breached"], 0);
    assert_eq!(
        value["results"].as_array().unwrap().len(),
        report.summary.total
    );

    // The page is self-contained and names every attack.
    let html = report::html::render(&report);
    assert!(html.starts_with("<!DOCTYPE html>"));
    for external in [
        "http://", "https://", "src=", "<link", "<script", "@import", "url(",
    ] {
        assert!(
            !html.contains(external),
            "the page references `{external}`: {}",
            html.find(external)
                .map(|i| &html[i.saturating_sub(200)..(i + 60).min(html.len())])
                .unwrap_or_default()
        );
    }
    for r in &report.results {
        assert!(
            html.contains(&format!("id=\"{}\"", r.id)),
            "{} missing",
            r.id
        );
    }
    assert!(html.contains(&format!("All {} attacks held", report.summary.total)));

    // The table lists every attack and the counts.
    let table = report::table::render(&report);
    for r in &report.results {
        assert!(table.contains(&r.id), "{} missing from the table", r.id);
    }
    assert!(table.contains(&format!(
        "{0} attacks against local hardened workers (policy built-in): {0} held, 0 breached, 0 errors",
        report.summary.total
    )));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_guest_lanes_run_in_workers_unless_asked_to_run_in_process() {
    // By default the guests ran in hardened workers: the descriptors the
    // host is held to are the suite's and its workers'.
    let mut opts = options();
    opts.only = Some("fs.absolute".into());
    let report = run(&opts).await;
    assert_eq!(report.target, "local hardened workers");
    assert!(report.all_held(), "{}", not_held(&report).join("\n"));
    let descriptors = report.results[0]
        .checks
        .iter()
        .find(|c| c.name == "descriptors")
        .unwrap();
    assert!(
        descriptors.detail.contains("its workers'"),
        "{descriptors:?}"
    );
    // `--in-process` (for debugging) runs them in this process, and says so.
    opts.in_process = true;
    let report = run(&opts).await;
    assert_eq!(
        report.target,
        "local sandbox, in this process (--in-process)"
    );
    assert!(report.all_held(), "{}", not_held(&report).join("\n"));
}

/// Attacks the weakened configuration must turn into breaches (the first
/// two only where the canary directory is preopened: in-process).
const WEAKENED_SAMPLE: &[&str] = &[
    "fs.absolute",
    "fs.absolute-dir",
    "exhaust.memory-alloc",
    "exhaust.cpu-loop",
    "exhaust.sleep",
    "exhaust.stdout-flood",
    "exhaust.disk-big",
    "exhaust.disk-many",
    "lateral.http-ungranted",
];

#[tokio::test(flavor = "multi_thread")]
async fn a_weakened_configuration_is_reported_breached() {
    // Limits far above what the suite holds the attacks to, the canary
    // directory preopened into every job, and the forbidden bait service
    // granted to the attacks that call services: each sampled attack must
    // now be caught by a host-side check.
    let weak = |k: &str, v: &str| (k.to_owned(), toml::Value::String(v.to_owned()));
    let mut opts = options();
    opts.weakening = Some(Weakening {
        limits: vec![
            weak("memory", "256 MiB"),
            weak("cpu_time", "3500 ms"),
            weak("wall_time", "4 s"),
            weak("output", "16 MiB"),
            ("output_files".to_owned(), toml::Value::Integer(4096)),
            weak("stdout", "4 MiB"),
        ],
        preopen_canary: true,
        grant_services: vec!["payments".to_owned()],
    });
    let attacks: Vec<_> = suite::select(&opts)
        .unwrap()
        .into_iter()
        .filter(|a| WEAKENED_SAMPLE.contains(&a.id.as_str()))
        .collect();
    assert_eq!(attacks.len(), WEAKENED_SAMPLE.len());
    let report = {
        let _one_at_a_time = LOCAL.lock().await;
        suite::run_attacks(&opts, &attacks, &mut |_| {})
            .await
            .unwrap()
    };
    for r in &report.results {
        assert_eq!(r.verdict, Verdict::Breached, "{}", failed_checks(r));
    }
    assert_eq!(report.summary.breached, WEAKENED_SAMPLE.len());
    assert!(!report.all_held());
    // The breaches are named by the checks that saw them.
    let failed = |id: &str| -> Vec<String> {
        let r = report.results.iter().find(|r| r.id == id).unwrap();
        r.checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name.clone())
            .collect()
    };
    // The extra preopen is a sandbox setting no worker is given: this
    // self-check runs in this process, and the report says so.
    assert!(
        report.target.contains("in this process")
            && report
                .target
                .contains("extra preopen cannot reach a worker"),
        "{}",
        report.target
    );
    assert!(failed("fs.absolute").contains(&"canary".to_owned()));
    assert!(failed("fs.absolute").contains(&"secrets".to_owned()));
    assert!(failed("exhaust.memory-alloc").contains(&"memory".to_owned()));
    assert!(failed("exhaust.disk-big").contains(&"disk".to_owned()));
    assert!(failed("exhaust.sleep").contains(&"time".to_owned()));
    assert!(failed("exhaust.stdout-flood").contains(&"output streams".to_owned()));
    // `payments`, granted by the weakened policy, received the calls.
    assert!(failed("lateral.http-ungranted").contains(&"forbidden service".to_owned()));
    let html = report::html::render(&report);
    assert!(html.contains(&format!(
        "{0} of {0} attacks breached the compartment",
        WEAKENED_SAMPLE.len()
    )));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_weakened_configuration_is_reported_breached_in_workers() {
    // The same weakened limits and grant, without the extra preopen: the
    // guests run in hardened workers, and each sampled attack is still
    // caught by a host-side check that sees the workers (their disk, their
    // CPU), not only this process.
    let weak = |k: &str, v: &str| (k.to_owned(), toml::Value::String(v.to_owned()));
    let mut opts = options();
    opts.weakening = Some(Weakening {
        limits: vec![
            weak("memory", "256 MiB"),
            weak("cpu_time", "3500 ms"),
            weak("wall_time", "4 s"),
            weak("output", "16 MiB"),
            ("output_files".to_owned(), toml::Value::Integer(4096)),
            weak("stdout", "4 MiB"),
        ],
        preopen_canary: false,
        grant_services: vec!["payments".to_owned()],
    });
    let sample = &WEAKENED_SAMPLE[2..];
    let attacks: Vec<_> = suite::select(&opts)
        .unwrap()
        .into_iter()
        .filter(|a| sample.contains(&a.id.as_str()))
        .collect();
    assert_eq!(attacks.len(), sample.len());
    let report = {
        let _one_at_a_time = LOCAL.lock().await;
        suite::run_attacks(&opts, &attacks, &mut |_| {})
            .await
            .unwrap()
    };
    assert_eq!(report.target, "local hardened workers");
    for r in &report.results {
        assert_eq!(r.verdict, Verdict::Breached, "{}", failed_checks(r));
    }
    let failed = |id: &str| -> Vec<String> {
        let r = report.results.iter().find(|r| r.id == id).unwrap();
        r.checks
            .iter()
            .filter(|c| !c.passed)
            .map(|c| c.name.clone())
            .collect()
    };
    // What a worker left on the host's disk, found in its directory.
    assert!(failed("exhaust.disk-big").contains(&"disk".to_owned()));
    assert!(failed("exhaust.disk-many").contains(&"disk".to_owned()));
    // The CPU the worker spent, from its own accounting.
    assert!(failed("exhaust.cpu-loop").contains(&"host cpu".to_owned()));
    assert!(failed("exhaust.memory-alloc").contains(&"memory".to_owned()));
    assert!(failed("exhaust.sleep").contains(&"time".to_owned()));
    assert!(failed("exhaust.stdout-flood").contains(&"output streams".to_owned()));
    assert!(failed("lateral.http-ungranted").contains(&"forbidden service".to_owned()));
}

/// A folder with two of the tester's own guests (copies of the hostile
/// guest): one that stays contained, one that prints what its manifest
/// forbids.
fn custom_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let wasm = std::fs::read(bulkhead_tests::HOSTILE).unwrap();
    for name in ["quiet", "talker"] {
        std::fs::write(dir.path().join(format!("{name}.wasm")), &wasm).unwrap();
    }
    std::fs::write(
        dir.path().join("quiet.toml"),
        r#"class = "filesystem"
description = "climbs out of its preopens to the canary"
args = ["read-dotdot"]
[params]
target = "{canary_file}"
[held]
outcome = "contained"
forbidden = ["root:x:0:0"]
untouched = ["/etc/hostname"]
"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("talker.toml"),
        r#"class = "lateral"
description = "prints its environment, which its manifest forbids"
id = "custom.env-talker"
args = ["env"]
[held]
forbidden = ["policy literal"]
"#,
    )
    .unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn a_testers_own_guests_are_counted_and_judged() {
    let dir = custom_dir();
    let mut opts = options();
    opts.guests = Some(dir.path().to_owned());
    opts.only = Some("custom.".into());
    let report = run(&opts).await;
    assert_eq!(report.summary.total, 2);
    let quiet = report
        .results
        .iter()
        .find(|r| r.id == "custom.quiet")
        .unwrap();
    assert_eq!(quiet.verdict, Verdict::Held, "{}", failed_checks(quiet));
    assert_eq!(quiet.class, Class::Filesystem);
    assert!(quiet.source.ends_with("quiet.toml"), "{}", quiet.source);
    let talker = report
        .results
        .iter()
        .find(|r| r.id == "custom.env-talker")
        .unwrap();
    assert_eq!(
        talker.verdict,
        Verdict::Breached,
        "{}",
        failed_checks(talker)
    );
    let secrets = talker.checks.iter().find(|c| c.name == "secrets").unwrap();
    assert!(
        secrets.detail.contains("forbidden string `policy literal`"),
        "{secrets:?}"
    );
    assert_eq!((report.summary.held, report.summary.breached), (1, 1));

    // Counted with the bundled attacks when not filtered.
    opts.only = None;
    let all = suite::select(&opts).unwrap();
    assert_eq!(
        all.len(),
        suite::select(&options()).unwrap().len() + 2,
        "custom attacks are added to the bundled ones"
    );
}

#[test]
fn a_bad_manifest_is_refused_with_its_file_named() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("x.wasm"), b"\0asm").unwrap();
    std::fs::write(
        dir.path().join("x.toml"),
        "class = \"teleport\"\ndescription = \"d\"\n",
    )
    .unwrap();
    let err = suite::custom::load_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("x.toml"), "{err}");
    assert!(err.contains("unknown attack class `teleport`"), "{err}");
    std::fs::remove_file(dir.path().join("x.toml")).unwrap();
    let err = suite::custom::load_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("cannot read the manifest"), "{err}");
}

fn bulkhead(args: &[&str], dir: &Path) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead-under-test"))
        .args(args)
        .arg("--cache-dir")
        .arg(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("module-cache"))
        .current_dir(dir)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn the_command_writes_its_reports_and_exits_non_zero_on_a_breach() {
    let dir = tempfile::tempdir().unwrap();
    let (code, stdout) = bulkhead(
        &[
            "escape-suite",
            "--only",
            "fs.dotdot",
            "--json",
            "r.json",
            "--html",
            "r.html",
        ],
        dir.path(),
    );
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.contains("fs.dotdot"), "{stdout}");
    let json = std::fs::read_to_string(dir.path().join("r.json")).unwrap();
    assert_eq!(report::json::parse(&json).unwrap().summary.held, 1);
    assert!(
        std::fs::read_to_string(dir.path().join("r.html"))
            .unwrap()
            .contains("fs.dotdot")
    );

    let custom = custom_dir();
    let (code, stdout) = bulkhead(
        &[
            "escape-suite",
            "--only",
            "custom.env-talker",
            "--guests",
            custom.path().to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_eq!(code, 1, "{stdout}");
    assert!(stdout.contains("BREACHED custom.env-talker"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_attack_that_tries_nothing_is_inconclusive_not_held() {
    // A tester registers the `hello` guest as a filesystem attack: it prints
    // a line and exits 0. The host saw no attempt, so it must not say held.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(bulkhead_tests::HELLO, dir.path().join("idle.wasm")).unwrap();
    std::fs::write(
        dir.path().join("idle.toml"),
        "class = \"filesystem\"\ndescription = \"says hello and tries nothing\"\n",
    )
    .unwrap();
    let mut opts = options();
    opts.guests = Some(dir.path().to_owned());
    opts.only = Some("custom.idle".into());
    let report = run(&opts).await;
    let r = &report.results[0];
    assert_eq!(r.verdict, Verdict::Inconclusive, "{}", failed_checks(r));
    assert_ne!(r.stopped_by, "every attempt refused");
    assert!(r.evidence.contains("host calls"), "{}", r.evidence);
    let attempts = r.checks.iter().find(|c| c.name == "attempts").unwrap();
    assert!(!attempts.passed && attempts.detail.contains("no attempt"));
    assert!(!report.all_held());
    assert_eq!(
        (report.summary.held, report.summary.inconclusive),
        (0, 1),
        "{:?}",
        report.summary
    );
    // Every rendering says so, with the evidence.
    let table = report::table::render(&report);
    assert!(table.contains("INCONCLUSIVE custom.idle"), "{table}");
    assert!(table.contains("evidence:"), "{table}");
    let json = report::json::render(&report);
    let parsed = report::json::parse(&json).unwrap();
    assert_eq!(parsed.results[0].verdict, Verdict::Inconclusive);
    assert_eq!(parsed.results[0].evidence, r.evidence);
    let html = report::html::render(&report);
    assert!(html.contains("pill inconclusive") && html.contains("<b>evidence:</b>"));

    // A guest that really tries is judged on the same evidence: held.
    let real = custom_dir();
    opts.guests = Some(real.path().to_owned());
    opts.only = Some("custom.quiet".into());
    let report = run(&opts).await;
    let r = &report.results[0];
    assert_eq!(r.verdict, Verdict::Held, "{}", failed_checks(r));
    assert!(r.evidence.contains("host calls"), "{}", r.evidence);
    assert!(
        !r.evidence.contains(" 0 refused by the host"),
        "{}",
        r.evidence
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn busy_work_that_the_host_never_refuses_is_inconclusive() {
    // A real job that reads its input and writes its outputs makes far more
    // host calls than a `hello`, but asks for nothing it may not have: the
    // host refused nothing, so nothing was shown to hold. A guest trying a
    // socket, by contrast, is refused by the host and the refusal counts.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(bulkhead_tests::SANITIZE_HTML, dir.path().join("busy.wasm")).unwrap();
    std::fs::write(
        dir.path().join("busy.toml"),
        "class = \"filesystem\"\ndescription = \"converts its input and writes outputs\"\n\
         [inputs]\n\"page.md\" = \"# title\\n\\nsome *text*\\n\"\n",
    )
    .unwrap();
    std::fs::copy(bulkhead_tests::HOSTILE, dir.path().join("dialer.wasm")).unwrap();
    std::fs::write(
        dir.path().join("dialer.toml"),
        "class = \"lateral\"\ndescription = \"opens a TCP socket\"\nargs = [\"socket\"]\n",
    )
    .unwrap();
    let mut opts = options();
    opts.guests = Some(dir.path().to_owned());
    opts.only = Some("custom.busy".into());
    let report = run(&opts).await;
    let r = &report.results[0];
    assert_eq!(r.verdict, Verdict::Inconclusive, "{}", failed_checks(r));
    assert!(
        r.evidence.contains(" 0 refused by the host"),
        "{}",
        r.evidence
    );
    assert!(r.evidence.contains("1 outputs"), "{}", r.evidence);

    opts.only = Some("custom.dialer".into());
    let report = run(&opts).await;
    let r = &report.results[0];
    assert_eq!(r.verdict, Verdict::Held, "{}", failed_checks(r));
    assert!(
        !r.evidence.contains(" 0 refused by the host"),
        "{}",
        r.evidence
    );
}
