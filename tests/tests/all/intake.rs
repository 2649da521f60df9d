//! Module intake: WASIp1 core modules adapted into components at load and
//! run under the same policy, quota and limits as any component (in
//! process, through the service, through `bulkhead run`'s worker); imports
//! judged against the policy before compiling, with the policy line that
//! would grant a denied one; `bulkhead check` loading through a worker.
//!
//! The p1 guest is `guests/p1-files` built for `wasm32-wasip1`
//! (`P1_FILES_WASIP1`); the same source built for `wasm32-wasip2`
//! (`P1_FILES`) is the comparison.
//!
//! **A full `/out` is `ENOSPC` for a WASIp1 guest**, whatever its
//! toolchain: the host fails an over-quota write, and the preview1 adapter
//! hands the guest errno `nospc` (51 in WASIp1's numbering): Rust's std on
//! wasip1 reports raw OS error 51, kind `StorageFull`; wasi-libc's `errno`
//! is `ENOSPC` (measured here for both).

use std::path::{Path, PathBuf};
use std::process::Command;

use bulkhead::policy::{ByteSize, HumanDuration};
use bulkhead::sandbox::{LimitKind, LoadError, Verdict, precheck};
use reqwest::StatusCode;
use serde_json::Value;

use crate::common;

/// The errno WASIp1 numbers `nospc` with (wasi_snapshot_preview1's
/// `errno` enum): what a p1 guest sees for a full `/out`.
const WASIP1_ENOSPC: i32 = 51;

fn p1_policy(name: &str) -> common::TestPolicy {
    common::policy(bulkhead_tests::P1_FILES_WASIP1, name)
        .scopes(&["p1-files:run"])
        .params(&["mode"])
}

/// The errno a `fill` job printed (the guest's own account, for the
/// documentation of what p1 sees; the limit itself is judged host-side).
fn errno_printed(stdout: &str) -> Option<i32> {
    let rest = stdout.split("errno ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wasip1_module_is_adapted_and_reads_writes_and_prints() {
    let module = common::load(bulkhead_tests::P1_FILES_WASIP1, &p1_policy("p1-files"));
    assert!(module.adapted());
    assert!(
        module
            .imports()
            .iter()
            .all(|v| v.verdict != Verdict::Denied && v.name.starts_with("wasi:")),
        "{:?}",
        module.imports()
    );
    let mut job = common::spec(&[("a.txt", b"alpha"), ("b.bin", &[0, 1, 2, 3])], &[]);
    job.stdin = b"from stdin".to_vec().into();
    let (report, dir) = common::run(&module, &job).await;
    assert!(report.succeeded(), "{report:#?}");
    // The host's own view of /out: the files are on disk, byte for byte.
    let out = dir.output_dir();
    assert_eq!(std::fs::read(out.join("a.txt")).unwrap(), b"alpha");
    assert_eq!(std::fs::read(out.join("b.bin")).unwrap(), [0, 1, 2, 3]);
    assert_eq!(
        std::fs::read_to_string(out.join("summary.txt")).unwrap(),
        "a.txt 5\nb.bin 4\nstdin 10\n"
    );
    assert!(
        report
            .stdout
            .text
            .contains("p1-files copied a.txt (5 bytes)"),
        "{report:#?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wasip1_module_over_its_output_quota_is_stopped_and_sees_enospc() {
    let quota = 256 * 1024;
    let module = common::load(
        bulkhead_tests::P1_FILES_WASIP1,
        &p1_policy("p1-files").limits(|l| l.output = ByteSize::bytes(quota)),
    );
    let (report, dir) = common::run(&module, &common::spec(&[], &[("mode", "fill")])).await;
    assert_eq!(report.limit, Some(LimitKind::Output), "{report:#?}");
    let on_disk = std::fs::metadata(dir.output_dir().join("fill.bin"))
        .unwrap()
        .len();
    assert!(on_disk <= quota, "{on_disk} bytes in /out");
    assert_eq!(
        errno_printed(&report.stdout.text),
        Some(WASIP1_ENOSPC),
        "{}",
        report.stdout.text
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wasip1_module_hits_its_cpu_and_memory_limits() {
    let module = common::load(
        bulkhead_tests::P1_FILES_WASIP1,
        &p1_policy("p1-files")
            .times(HumanDuration::millis(200), HumanDuration::secs(20))
            .memory(ByteSize::mib(32)),
    );
    let (spun, _dir) = common::run(&module, &common::spec(&[], &[("mode", "spin")])).await;
    assert_eq!(spun.limit, Some(LimitKind::CpuTime), "{spun:#?}");
    let (grown, _dir) = common::run(&module, &common::spec(&[], &[("mode", "grow")])).await;
    assert_eq!(grown.limit, Some(LimitKind::Memory), "{grown:#?}");
    assert!(grown.measurements.peak_memory_bytes <= ByteSize::mib(32).as_u64());
}

/// The pin is on the bytes the author uploaded, not on the adapted
/// component; and the gateway's header check takes a core module while
/// still refusing what it refused before.
#[test]
fn the_pin_stays_on_the_uploaded_bytes_and_precheck_takes_a_core_header() {
    let wasm = common::wasm(bulkhead_tests::P1_FILES_WASIP1);
    let policy = p1_policy("p1-files").parse();
    let config = common::SANDBOX.config();
    assert_eq!(
        precheck(config, &policy, &wasm).unwrap(),
        bulkhead::policy::Sha256Hex::digest(&wasm)
    );
    let module = common::SANDBOX.load(policy.clone(), &wasm).unwrap();
    assert_eq!(module.sha256(), &policy.module.sha256);

    let mut tampered = wasm.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 1;
    assert!(matches!(
        common::SANDBOX.load(policy.clone(), &tampered),
        Err(LoadError::DigestMismatch { .. })
    ));
    for (bytes, why) in [
        (b"\0asm\x02\0\0\0".to_vec(), "not a WebAssembly binary"),
        (b"#!/bin/sh\necho hi\n".to_vec(), "not a WebAssembly binary"),
    ] {
        let mut p = policy.clone();
        p.module.sha256 = bulkhead::policy::Sha256Hex::digest(&bytes);
        match precheck(config, &p, &bytes) {
            Err(LoadError::Unsupported { reason, .. }) => assert!(reason.contains(why), "{reason}"),
            other => panic!("{other:?}"),
        }
    }
}

fn load_bytes(name: &str, wasm: &[u8]) -> Result<(), LoadError> {
    let mut policy = p1_policy(name).parse();
    policy.module.sha256 = bulkhead::policy::Sha256Hex::digest(wasm);
    common::SANDBOX.load(policy, wasm).map(|_| ())
}

#[test]
fn bad_wasip1_modules_get_a_clear_load_error() {
    // The smallest command loads: the shape below is right.
    load_bytes("tiny", &common::core_module("_start", &[], 1, &[])).unwrap();

    match load_bytes("reactor", &common::core_module("_initialize", &[], 1, &[])) {
        Err(LoadError::Adapt { reason, .. }) => {
            assert!(reason.contains("_start"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    let lacking = common::core_module(
        "_start",
        &[
            ("wasi_snapshot_preview1", "fd_write"),
            ("wasi_snapshot_preview1", "not_a_wasi_function"),
        ],
        1,
        &[],
    );
    match load_bytes("lacking", &lacking) {
        Err(e @ LoadError::DeniedImports { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("wasi_snapshot_preview1::not_a_wasi_function"),
                "{text}"
            );
            assert!(!text.contains("fd_write"), "{text}");
        }
        other => panic!("{other:?}"),
    }
    match load_bytes(
        "foreign",
        &common::core_module("_start", &[("env", "host_secret")], 1, &[]),
    ) {
        Err(e @ LoadError::DeniedImports { .. }) => {
            assert!(e.to_string().contains("env::host_secret"), "{e}")
        }
        other => panic!("{other:?}"),
    }
    // Garbage after a valid module: an error, not a panic.
    match load_bytes(
        "trailing",
        &common::core_module("_start", &[], 1, &[0xff, 0xff, 0xff]),
    ) {
        Err(LoadError::Adapt { .. }) => {}
        other => panic!("{other:?}"),
    }
    match load_bytes("header-only", b"\0asm\x01\0\0\0\x01\xff") {
        Err(LoadError::Adapt { .. }) => {}
        other => panic!("{other:?}"),
    }
}

/// A component importing `wasi:http` under a policy without services is
/// refused before compiling, naming the import and the line to add, not
/// with a linker error.
#[test]
fn a_denied_import_is_named_with_the_policy_line_before_compiling() {
    let policy = common::policy(bulkhead_tests::FRAMED, "framed").parse();
    match common::SANDBOX.load(policy, &common::wasm(bulkhead_tests::FRAMED)) {
        Err(e @ LoadError::DeniedImports { .. }) => {
            let text = e.to_string();
            assert!(text.contains("wasi:http/"), "{text}");
            assert!(text.contains("network.services"), "{text}");
            assert!(!text.contains("linker"), "{text}");
        }
        other => panic!("{other:?}"),
    }
}

/// A modules directory for a service: the usual guests plus the p1 build
/// of `p1-files`, as `p1-files.wasm`.
fn modules_dir(under: &Path) -> PathBuf {
    let dir = under.join("modules");
    std::fs::create_dir_all(&dir).unwrap();
    for guest in [
        bulkhead_tests::HELLO,
        bulkhead_tests::THUMBNAIL,
        bulkhead_tests::HOSTILE,
    ] {
        let name = Path::new(guest).file_name().unwrap();
        std::fs::copy(guest, dir.join(name)).unwrap();
    }
    std::fs::copy(bulkhead_tests::P1_FILES_WASIP1, dir.join("p1-files.wasm")).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_runs_a_wasip1_module_in_its_workers() {
    let s = common::start(|c| {
        let data = c.modules.policies_dir.parent().unwrap().to_owned();
        c.modules.modules_dir = modules_dir(&data);
        p1_policy("p1-files")
            .limits(|l| l.output = ByteSize::bytes(128 * 1024))
            .write_to(&c.modules.policies_dir);
    })
    .await;
    let token = s.token("acme", &["p1-files:run"]).await;

    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(b"plugin input".to_vec()).file_name("in.txt"),
    );
    let resp = s
        .post("/v1/modules/p1-files/jobs", &token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let accepted: Value = resp.json().await.unwrap();
    let id = accepted["id"].as_str().unwrap();
    let job = s.finished(&token, id).await;
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(
        &s.output(&token, id, "in.txt").await[..],
        b"plugin input".as_slice()
    );
    assert_eq!(
        &s.output(&token, id, "summary.txt").await[..],
        b"in.txt 12\nstdin 0\n".as_slice()
    );

    let form = reqwest::multipart::Form::new().text("param.mode", "fill");
    let resp = s
        .post("/v1/modules/p1-files/jobs", &token)
        .multipart(form)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let accepted: Value = resp.json().await.unwrap();
    let id = accepted["id"].as_str().unwrap();
    let job = s.finished(&token, id).await;
    assert_eq!(job["state"], "failed", "{job:#}");
    assert_eq!(job["report"]["limit"], "output", "{job:#}");
}

fn bulkhead(args: &[&str], policy: &Path, work: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bulkhead-under-test"))
        .args(args)
        .arg("--policy")
        .arg(policy)
        .arg("--work-dir")
        .arg(work.join("jobs"))
        .arg("--cache-dir")
        .arg(work.join("cache"))
        .output()
        .unwrap()
}

/// `run --out DIR` makes DIR even for a job that leaves nothing there.
#[test]
fn bulkhead_run_makes_its_out_dir_for_a_job_that_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = common::policy(bulkhead_tests::HELLO, "hello").write_to(tmp.path());
    let out_dir = tmp.path().join("out");
    let out = bulkhead(
        &[
            "run",
            bulkhead_tests::HELLO,
            "--out",
            out_dir.to_str().unwrap(),
        ],
        &policy,
        tmp.path(),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out_dir.is_dir(), "no {}", out_dir.display());
    assert_eq!(std::fs::read_dir(&out_dir).unwrap().count(), 0);
}

#[test]
fn bulkhead_run_runs_a_wasip1_module_in_a_worker() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = p1_policy("p1-files")
        .limits(|l| l.output = ByteSize::bytes(128 * 1024))
        .write_to(tmp.path());
    let input = tmp.path().join("note.txt");
    std::fs::write(&input, "plugin input").unwrap();
    let out_dir = tmp.path().join("out");
    let out = bulkhead(
        &[
            "run",
            bulkhead_tests::P1_FILES_WASIP1,
            "--json",
            "--input",
            input.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
        ],
        &policy,
        tmp.path(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(out_dir.join("note.txt")).unwrap(),
        b"plugin input"
    );
    // Compiled in the zone's worker: its cache is the zone's.
    assert!(
        tmp.path().join("cache/zones/untrusted").is_dir(),
        "no worker cache"
    );

    let out = bulkhead(
        &[
            "run",
            bulkhead_tests::P1_FILES_WASIP1,
            "--json",
            "--param",
            "mode=fill",
        ],
        &policy,
        tmp.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let report: bulkhead::sandbox::JobReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report.limit, Some(LimitKind::Output), "{report:#?}");
    assert_eq!(errno_printed(&report.stdout.text), Some(WASIP1_ENOSPC));
}

/// `bulkhead check` loads through the worker path, and prints its verdicts
/// instead of a linker error: for a component importing `wasi:http` under
/// a policy without services it names the import and the line to add.
#[test]
fn check_prints_verdicts_from_a_worker_never_a_linker_error() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = common::policy(bulkhead_tests::FRAMED, "framed").write_to(tmp.path());
    let out = bulkhead(&["check", bulkhead_tests::FRAMED], &policy, tmp.path());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    let denied: Vec<&str> = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("denied"))
        .collect();
    assert!(
        denied
            .iter()
            .any(|l| l.contains("wasi:http/") && l.contains("network.services")),
        "{stdout}"
    );
    assert!(
        stdout.contains("granted  wasi:cli/"),
        "every import is listed: {stdout}"
    );
    assert!(!stdout.contains("linker") && !stderr.contains("linker"));

    // A p1 module: adapted, its imports listed, compiled in the zone's
    // worker (the worker's cache is the zone's).
    let policy = p1_policy("p1-files").write_to(tmp.path());
    let out = bulkhead(
        &["check", bulkhead_tests::P1_FILES_WASIP1],
        &policy,
        tmp.path(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("adapted from a WASIp1 core module"),
        "{stdout}"
    );
    assert!(stdout.contains("granted  wasi:filesystem/"), "{stdout}");
    assert!(
        tmp.path().join("cache/zones/untrusted").is_dir(),
        "check did not compile in a worker"
    );
}

/// The C example (`examples/c-files`), built here with Debian's clang and
/// wasi-libc as a WASIp1 core module, runs unchanged under `bulkhead run`;
/// over its quota wasi-libc reports `ENOSPC` too.
#[test]
fn the_c_example_builds_with_wasi_libc_and_runs_under_bulkhead_run() {
    let tmp = tempfile::tempdir().unwrap();
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/c-files/files.c");
    let wasm = tmp.path().join("c-files.wasm");
    let built = Command::new("clang")
        .args(["--target=wasm32-wasi", "--sysroot=/usr", "-O2", "-o"])
        .arg(&wasm)
        .arg(&source)
        .output()
        .expect("clang (apt-get install clang lld wasi-libc libclang-rt-dev-wasm32)");
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let wasm = wasm.to_str().unwrap();
    let policy = common::policy(wasm, "c-files")
        .params(&["mode"])
        .limits(|l| l.output = ByteSize::bytes(128 * 1024))
        .write_to(tmp.path());
    let input = tmp.path().join("input.txt");
    std::fs::write(&input, "shout this").unwrap();
    let out_dir = tmp.path().join("out");
    let out = bulkhead(
        &[
            "run",
            wasm,
            "--json",
            "--input",
            input.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
        ],
        &policy,
        tmp.path(),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read(out_dir.join("upper.txt")).unwrap(),
        b"SHOUT THIS"
    );

    let out = bulkhead(
        &["run", wasm, "--json", "--param", "mode=fill"],
        &policy,
        tmp.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    let report: bulkhead::sandbox::JobReport = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report.limit, Some(LimitKind::Output), "{report:#?}");
    assert_eq!(
        errno_printed(&report.stdout.text),
        Some(WASIP1_ENOSPC),
        "{}",
        report.stdout.text
    );
}

/// The `.cwasm` files under `dir`, by name.
fn cached(dir: &Path) -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_dir() {
            names.extend(cached(&entry.path()));
        } else if let Some(name) = entry.file_name().to_str()
            && name.ends_with(".cwasm")
        {
            names.push(name.to_owned());
        }
    }
    names
}

/// An adapted build is cached under the digest of the component compiled
/// (the adapter's output), never under the uploaded module's: a core
/// module and a component can never share, or be served, each other's
/// native code.
#[test]
fn an_adapted_build_has_its_own_cache_entry() {
    use bulkhead::sandbox::{Sandbox, SandboxConfig};
    let tmp = tempfile::tempdir().unwrap();
    let sandbox = || {
        let mut config = SandboxConfig::new(tmp.path().join("jobs"));
        config.cache_dir = Some(tmp.path().join("cache"));
        config.max_concurrent_jobs = 2;
        Sandbox::new(config).unwrap()
    };
    let wasm = common::wasm(bulkhead_tests::P1_FILES_WASIP1);
    let upload = format!("{}.cwasm", bulkhead::policy::Sha256Hex::digest(&wasm));
    let first = sandbox()
        .load(p1_policy("p1-files").parse(), &wasm)
        .unwrap();
    assert!(!first.from_cache() && first.adapted());
    let entries = cached(&tmp.path().join("cache"));
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert_ne!(
        entries[0], upload,
        "cached under the uploaded bytes' digest"
    );
    // The adaptation is deterministic: a restart finds its entry.
    let again = sandbox()
        .load(p1_policy("p1-files").parse(), &wasm)
        .unwrap();
    assert!(again.from_cache());
    assert_eq!(cached(&tmp.path().join("cache")), entries);
}

/// The service refuses to start with a module whose import its policy
/// does not grant, and says which and what would grant it (judged in the
/// zone's worker), not a linker error.
#[tokio::test(flavor = "multi_thread")]
async fn the_service_names_a_denied_import_and_the_line_that_grants_it() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = bulkhead::config::ServeConfig::default();
    config.storage.data_dir = tmp.path().join("data");
    config.storage.cache_dir = Some(tmp.path().join("cache"));
    config.modules.policies_dir = tmp.path().join("policies");
    config.modules.modules_dir = PathBuf::from(bulkhead_tests::GUESTS_DIR);
    config.isolation.program = Some(PathBuf::from(env!("CARGO_BIN_EXE_bulkhead-under-test")));
    common::policy(bulkhead_tests::FRAMED, "framed").write_to(&config.modules.policies_dir);
    let error = match bulkhead::service::Service::start(config, None).await {
        Ok(_) => panic!("a module importing wasi:http without services was served"),
        Err(e) => e.to_string(),
    };
    assert!(error.contains("wasi:http/"), "{error}");
    assert!(error.contains("network.services"), "{error}");
    assert!(!error.contains("linker"), "{error}");
}
