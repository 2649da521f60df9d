//! What a plugin author relies on: `[run] args` templates that place
//! parameters and paths where an unchanged CLI wants them (each entry one
//! argument, whatever the value holds), stdout kept as an output file
//! under the `/out` quota, the guest's own exit code and a bounded trap
//! backtrace in the report, one error (`insufficient-space`) for a full
//! `/out` on every WASIp2 write path, and `bulkhead pin`.
//!
//! The guest is `hostile` in its author-facing modes (`argv`, `exit-code`,
//! `trap`, `full-out`); `argv` prints each argument it got, escaped.

use std::path::Path;
use std::process::Command;

use bulkhead::policy::{ArgEntry, ByteSize, Policy};
use bulkhead::sandbox::{FailureKind, LimitKind};

use crate::common;

fn group(entries: &[&str]) -> ArgEntry {
    ArgEntry::Group(entries.iter().map(|e| (*e).to_owned()).collect())
}

/// The argv the `argv` mode printed, unescaped lines `arg <i> <value>`.
fn argv_printed(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("arg "))
        .map(|l| l.split_once(' ').map_or("", |(_, v)| v).to_owned())
        .collect()
}

/// The value that must stay one argument: spaces, `--`, `=`, braces and
/// what looks like a placeholder.
const AWKWARD: &str = "a b -- --c=d {param.v} }{ {{x}} = ";

fn template_policy() -> common::TestPolicy {
    common::policy(bulkhead_tests::HOSTILE, "hostile")
        .params(&["v", "width", "height"])
        .arg_entries(vec![
            "argv".into(),
            "{input.in.svg}".into(),
            "{output.out.png}".into(),
            "--".into(),
            "{param.v}".into(),
            group(&["-w", "{param.width}"]),
            group(&["-h", "{param.height}"]),
            "--size={param.width}x{param.width}".into(),
            "{{literal}}".into(),
        ])
}

#[tokio::test]
async fn an_args_template_gives_the_guest_exactly_the_argv_expected() {
    let module = common::load(bulkhead_tests::HOSTILE, &template_policy());
    let spec = common::spec(
        &[("in.svg", b"<svg/>")],
        &[("v", AWKWARD), ("width", "256")],
    );
    let (report, _dir) = common::run(&module, &spec).await;
    assert!(report.succeeded(), "{report:#?}");
    // The absent `height` dropped its group; nothing was appended.
    let expected = [
        "hostile",
        "argv",
        "/in/in.svg",
        "/out/out.png",
        "--",
        AWKWARD,
        "-w",
        "256",
        "--size=256x256",
        "{literal}",
    ];
    let got = argv_printed(&report.stdout.text);
    let expected: Vec<String> = expected
        .iter()
        .map(|e| e.escape_debug().to_string())
        .collect();
    assert_eq!(got, expected, "{}", report.stdout.text);
}

#[tokio::test]
async fn a_template_refuses_a_job_missing_what_it_requires_before_running() {
    let policy = template_policy().parse();
    // `v` is outside any group: required.
    let spec = common::spec(&[("in.svg", b"<svg/>")], &[("width", "1")]);
    let err = bulkhead::sandbox::validate(&policy, &spec).unwrap_err();
    assert_eq!(
        err.to_string(),
        "parameter `v` is required by module `hostile` (its args place it in `{param.v}`)"
    );
    let spec = common::spec(&[], &[("v", "x")]);
    let err = bulkhead::sandbox::validate(&policy, &spec).unwrap_err();
    assert!(
        err.to_string().starts_with("input `in.svg` is required"),
        "{err}"
    );
    // Values are checked by the parameter rules before any substitution.
    let spec = common::spec(&[("in.svg", b"")], &[("v", "a\nb")]);
    let err = bulkhead::sandbox::validate(&policy, &spec).unwrap_err();
    assert!(err.to_string().contains("no control characters"), "{err}");
}

#[tokio::test]
async fn a_policy_without_placeholders_keeps_appending_parameters() {
    let policy = common::policy(bulkhead_tests::HOSTILE, "hostile")
        .args(&["argv"])
        .params(&["v"]);
    let module = common::load(bulkhead_tests::HOSTILE, &policy);
    let (report, _dir) = common::run(&module, &common::spec(&[], &[("v", AWKWARD)])).await;
    let got = argv_printed(&report.stdout.text);
    assert_eq!(
        got,
        vec![
            "hostile".to_owned(),
            "argv".to_owned(),
            format!("--v={AWKWARD}").escape_debug().to_string()
        ]
    );
}

#[test]
fn template_errors_name_the_policy_file_and_the_entry() {
    let digest = "0".repeat(64);
    for (run, want) in [
        (
            "args = [\"{param.width\"]\nparams = [\"width\"]",
            "bad.toml:6:1: argument `{param.width` has an unclosed `{` at byte 0",
        ),
        (
            "args = [\"{env.HOME}\"]",
            "bad.toml:6:1: argument `{env.HOME}` has an unknown placeholder `{env.HOME}`",
        ),
        (
            "args = [\"-w\", \"{param.width}\"]",
            "bad.toml:6:1: argument `{param.width}` places parameter `width`, which `[run] params` does not list (it lists none)",
        ),
        (
            "args = [[\"-v\"]]",
            "bad.toml:6:1: group [\"-v\"] places no parameter or input",
        ),
        (
            "args = [\"{in}\"]\nparams = [\"width\"]",
            "bad.toml:6:1: parameter `width` is accepted but args never place it",
        ),
        (
            "stdout = \"../x\"",
            "bad.toml:6:1: stdout file: invalid output name `../x`",
        ),
        (
            "args = [1]",
            "bad.toml:6:9: invalid type: integer `1`, expected a string, or an array of strings (a group)",
        ),
    ] {
        let text = format!(
            "version = 1\n[module]\nname = \"demo\"\nsha256 = \"{digest}\"\n[run]\n{run}\n"
        );
        let err = Policy::parse(&text, Path::new("bad.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with(want), "{run}:\n  got  {err}\n  want {want}");
    }
}

#[tokio::test]
async fn stdout_kept_as_a_file_is_an_output_like_any_other() {
    let policy = common::policy(bulkhead_tests::HOSTILE, "hostile")
        .args(&["argv"])
        .stdout_file("argv.txt");
    let module = common::load(bulkhead_tests::HOSTILE, &policy);
    let (report, dir) = common::run(&module, &common::spec(&[], &[])).await;
    assert!(report.succeeded(), "{report:#?}");
    assert_eq!(report.stdout.bytes, 0, "stdout went to the file");
    let names: Vec<_> = report.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["argv.txt"]);
    let on_disk = std::fs::read_to_string(dir.output_dir().join("argv.txt")).unwrap();
    assert!(on_disk.contains("arg 1 argv\n"), "{on_disk}");
    assert_eq!(report.outputs[0].size, on_disk.len() as u64);
}

#[tokio::test]
async fn stdout_kept_as_a_file_is_bounded_by_the_output_quota() {
    let policy = common::policy(bulkhead_tests::HOSTILE, "hostile")
        .args(&["stdout-flood"])
        .stdout_file("flood.txt")
        .limits(|l| {
            l.output = ByteSize::kib(64);
            // Far above the quota: the capture limit is not what stops it.
            l.stdout = ByteSize::mib(64);
        });
    let module = common::load(bulkhead_tests::HOSTILE, &policy);
    let (report, dir) = common::run(&module, &common::spec(&[], &[])).await;
    assert_eq!(report.limit, Some(LimitKind::Output), "{report:#?}");
    let size = std::fs::metadata(dir.output_dir().join("flood.txt"))
        .unwrap()
        .len();
    assert!(
        size <= 64 * 1024,
        "{size} bytes on disk past a 64 KiB quota"
    );
}

#[tokio::test]
async fn the_report_carries_the_guests_exit_code_and_a_trap_backtrace() {
    let policy = common::policy(bulkhead_tests::HOSTILE, "hostile")
        .args(&["exit-code"])
        .params(&["code"]);
    let module = common::load(bulkhead_tests::HOSTILE, &policy);
    let (report, _dir) = common::run(&module, &common::spec(&[], &[("code", "7")])).await;
    assert_eq!(report.exit_code, Some(7), "{report:#?}");
    assert_eq!(report.failure.as_ref().unwrap().kind, FailureKind::Exit);
    assert!(report.backtrace.is_none());

    let module = common::load(
        bulkhead_tests::HOSTILE,
        &common::policy(bulkhead_tests::HOSTILE, "hostile").args(&["trap"]),
    );
    let (report, _dir) = common::run(&module, &common::spec(&[], &[])).await;
    assert_eq!(report.failure.as_ref().unwrap().kind, FailureKind::Trap);
    assert_eq!(report.exit_code, None);
    let bt = report.backtrace.as_ref().expect("a trap has a backtrace");
    let functions: Vec<_> = bt
        .frames
        .iter()
        .filter_map(|f| f.function.as_deref())
        .collect();
    assert!(
        functions[0].contains("authors_trap_inner"),
        "innermost first: {functions:?}"
    );
    assert!(bt.frames[0].module_offset.is_some());
    assert!(serde_json::to_string(bt).unwrap().len() <= 4 * 1024);
}

#[tokio::test]
async fn a_full_out_is_insufficient_space_on_every_wasip2_write_path() {
    let policy = common::policy(bulkhead_tests::HOSTILE, "hostile")
        .args(&["full-out"])
        .limits(|l| l.output = ByteSize::kib(128));
    let module = common::load(bulkhead_tests::HOSTILE, &policy);
    let (report, _dir) = common::run(&module, &common::spec(&[], &[])).await;
    assert_eq!(report.limit, Some(LimitKind::Output), "{report:#?}");
    let out = &report.stdout.text;
    for way in ["write", "stream", "set-size"] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("full-out {way}:")))
            .unwrap_or_else(|| panic!("no {way} line in {out}"));
        assert!(line.contains("\"insufficient-space\""), "{line}");
    }
}

fn bulkhead(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bulkhead-under-test"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn pin_updates_the_digest_in_place_and_keeps_the_file_as_it_was() {
    let tmp = tempfile::tempdir().unwrap();
    // Cargo's spelling of `my-tool`, found beside the policy.
    let wasm = tmp.path().join("my_tool.wasm");
    std::fs::copy(bulkhead_tests::HELLO, &wasm).unwrap();
    let policy = tmp.path().join("my-tool.toml");
    let before = format!(
        "# my tool's policy\nversion = 1\n\n[module]\nname = \"my-tool\"   # keep\nsha256 = \"{}\"  # rebuilt often\n\n[limits]\nmemory = \"16 MiB\" # small\n",
        "0".repeat(64)
    );
    std::fs::write(&policy, &before).unwrap();
    let out = bulkhead(&["pin", policy.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let digest = bulkhead::policy::Sha256Hex::digest(&std::fs::read(&wasm).unwrap());
    let after = std::fs::read_to_string(&policy).unwrap();
    assert_eq!(
        after,
        before.replace(&"0".repeat(64), digest.as_str()),
        "only the digest changed"
    );
    assert!(Policy::load(&policy).is_ok());
    // Pinned already: nothing to do, and said so.
    let out = bulkhead(&["pin", policy.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("already pinned"));

    // No module to be found: the paths tried are named.
    let lonely = tmp.path().join("other.toml");
    std::fs::write(&lonely, before.replace("my-tool", "other")).unwrap();
    let out = bulkhead(&["pin", lonely.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("other.wasm") && err.contains("pass --module"),
        "{err}"
    );
}

#[test]
fn pin_new_scaffolds_a_policy_that_runs_its_module() {
    let tmp = tempfile::tempdir().unwrap();
    let wasm = tmp.path().join("hello_world.wasm");
    std::fs::copy(bulkhead_tests::HELLO, &wasm).unwrap();
    let policy = tmp.path().join("hello-world.toml");
    let out = bulkhead(&[
        "pin",
        "--new",
        policy.to_str().unwrap(),
        "--module",
        wasm.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let loaded = Policy::load(&policy).unwrap();
    assert_eq!(loaded.module.name.as_str(), "hello-world");
    assert!(loaded.network.services.is_empty());
    // A second --new does not overwrite it.
    let again = bulkhead(&[
        "pin",
        "--new",
        policy.to_str().unwrap(),
        "--module",
        wasm.to_str().unwrap(),
    ]);
    assert_eq!(again.status.code(), Some(2));

    let out = bulkhead(&[
        "run",
        wasm.to_str().unwrap(),
        "--policy",
        policy.to_str().unwrap(),
        "--work-dir",
        tmp.path().join("jobs").to_str().unwrap(),
        "--cache-dir",
        tmp.path().join("cache").to_str().unwrap(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn bulkhead_run_reports_the_trap_backtrace() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = common::policy(bulkhead_tests::HOSTILE, "hostile")
        .args(&["trap"])
        .write_to(tmp.path());
    let run = |json: bool| {
        let mut args = vec![
            "run",
            bulkhead_tests::HOSTILE,
            "--policy",
            policy.to_str().unwrap(),
        ];
        if json {
            args.push("--json");
        }
        let work = tmp.path().join("jobs");
        let cache = tmp.path().join("cache");
        Command::new(env!("CARGO_BIN_EXE_bulkhead-under-test"))
            .args(&args)
            .arg("--work-dir")
            .arg(work)
            .arg("--cache-dir")
            .arg(cache)
            .output()
            .unwrap()
    };
    let out = run(true);
    assert_eq!(out.status.code(), Some(1));
    let report: bulkhead::sandbox::JobReport = serde_json::from_slice(&out.stdout).unwrap();
    let bt = report.backtrace.expect("backtrace in the JSON report");
    assert!(
        bt.frames.iter().any(|f| f
            .function
            .as_deref()
            .is_some_and(|n| n.contains("authors_trap_inner"))),
        "{bt:?}"
    );
    let out = run(false);
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("backtrace (innermost first):"),
        "{summary}"
    );
    assert!(summary.contains("authors_trap_inner"), "{summary}");
}

/// Through the service: a module file in cargo's spelling is served under
/// its policy's name, its args template and stdout file work as under
/// `bulkhead run`, and the job view carries the trap backtrace (the trap's
/// message itself stays redacted).
#[tokio::test(flavor = "multi_thread")]
async fn the_service_serves_cargo_named_modules_templates_stdout_files_and_backtraces() {
    let modules = tempfile::tempdir().unwrap();
    let policies = tempfile::tempdir().unwrap();
    for (file, policy) in [
        (
            "trap_guest.wasm",
            common::policy(bulkhead_tests::HOSTILE, "trap-guest")
                .scopes(&["authors:run"])
                .args(&["trap"]),
        ),
        (
            "stdout_argv.wasm",
            common::policy(bulkhead_tests::HOSTILE, "stdout-argv")
                .scopes(&["authors:run"])
                .params(&["v"])
                .arg_entries(vec!["argv".into(), "{param.v}".into()])
                .stdout_file("argv.txt"),
        ),
    ] {
        std::fs::copy(bulkhead_tests::HOSTILE, modules.path().join(file)).unwrap();
        policy.write_to(policies.path());
    }
    let (m, p) = (modules.path().to_owned(), policies.path().to_owned());
    let s = common::start(move |c| {
        c.modules.modules_dir = m;
        c.modules.policies_dir = p;
    })
    .await;
    let token = s.token("acme", &["authors:run"]).await;

    let job: serde_json::Value = s
        .post("/v1/modules/trap-guest/jobs", &token)
        .query(&[("wait", "20s")])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let report = &job["report"];
    assert_eq!(report["failure"]["kind"], "trap", "{job:#}");
    assert_eq!(report["failure"]["message"], "the guest trapped");
    let frames = report["backtrace"]["frames"].as_array().expect("frames");
    assert!(
        frames[0]["function"]
            .as_str()
            .is_some_and(|f| f.contains("authors_trap_inner")),
        "{job:#}"
    );

    let job: serde_json::Value = s
        .post("/v1/modules/stdout-argv/jobs", &token)
        .query(&[("wait", "20s"), ("param.v", AWKWARD)])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["outputs"][0]["name"], "argv.txt", "{job:#}");
    let id = job["id"].as_str().unwrap();
    let text = String::from_utf8(s.output(&token, id, "argv.txt").await.to_vec()).unwrap();
    assert_eq!(
        argv_printed(&text),
        vec![
            "stdout-argv".to_owned(),
            "argv".to_owned(),
            AWKWARD.escape_debug().to_string()
        ]
    );
}

/// What the host receives is what the report says, and the common
/// toolchains send only success or failure: wasi-libc's WASIp2 `exit` and
/// the preview1 adapter (48.0.8) both call `wasi:cli/exit.exit(err)` for
/// any non-zero code, so `exit(3)` arrives as 1 from a p1 module and from
/// the same source built for `wasm32-wasip2` (measured here). A code past
/// 1 reaches the report only through `exit-with-code` (see
/// `the_report_carries_the_guests_exit_code_and_a_trap_backtrace`).
///
/// The same runs measure what std's `write` sees for a full `/out`: the
/// p1 build `ENOSPC` (WASIp1 errno 51, through the adapter, which asks
/// `filesystem-error-code`); the p2 build `EIO` (wasi-libc errno 29):
/// wasi-libc's WASIp2 `write()` drops a stream's error without asking
/// what it was, so no host answer reaches it (`full-out` above shows the
/// host answers `insufficient-space` on every path).
#[tokio::test]
async fn std_exit_codes_arrive_as_failure_from_both_toolchains() {
    for (guest, errno) in [
        (bulkhead_tests::P1_FILES_WASIP1, 51),
        (bulkhead_tests::P1_FILES, 29),
    ] {
        let policy = common::policy(guest, "p1-files")
            .params(&["mode"])
            .limits(|l| l.output = ByteSize::kib(128));
        let module = common::load(guest, &policy);
        let (report, _dir) = common::run(&module, &common::spec(&[], &[("mode", "fill")])).await;
        assert!(
            report.stdout.text.contains(&format!("errno {errno} ")),
            "{guest}: {}",
            report.stdout.text
        );
        assert_eq!(report.exit_code, Some(1), "{guest}: {report:#?}");
    }
}

/// `bulkhead run` in a worker: the template and the stdout file as the
/// service has them, the file copied out with `--out`; `check` shows both.
#[test]
fn bulkhead_run_copies_the_stdout_file_and_check_shows_the_template() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = common::policy(bulkhead_tests::HOSTILE, "hostile")
        .params(&["v"])
        .arg_entries(vec!["argv".into(), group(&["-v", "{param.v}"])])
        .stdout_file("argv.txt")
        .write_to(tmp.path());
    let out_dir = tmp.path().join("out");
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead-under-test"))
        .args([
            "run",
            bulkhead_tests::HOSTILE,
            "--param",
            &format!("v={AWKWARD}"),
        ])
        .arg("--policy")
        .arg(&policy)
        .arg("--out")
        .arg(&out_dir)
        .arg("--work-dir")
        .arg(tmp.path().join("jobs"))
        .arg("--cache-dir")
        .arg(tmp.path().join("cache"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(out_dir.join("argv.txt")).unwrap();
    assert_eq!(
        argv_printed(&text),
        vec![
            "hostile".to_owned(),
            "argv".to_owned(),
            "-v".to_owned(),
            AWKWARD.escape_debug().to_string()
        ]
    );
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead-under-test"))
        .arg("check")
        .arg("--policy")
        .arg(&policy)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(
        shown.contains(r#"args     "argv" ["-v", "{param.v}"] (a template"#),
        "{shown}"
    );
    assert!(shown.contains("stdout   kept as /out/argv.txt"), "{shown}");
}
