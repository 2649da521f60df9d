//! What the host keeps on disk and what it collects from a job is never
//! trusted for where it lies or what it is named: a planted module-cache
//! artifact is not run, cache and work directories others can write or own
//! are refused, output trees past `PATH_MAX` and hostile output names are
//! skipped with why, and none of it is a host error.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use bulkhead::policy::Sha256Hex;
use bulkhead::sandbox::{
    FailureKind, JobDir, JobReport, JobSpec, LoadedModule, Sandbox, SandboxConfig, outputs,
};

use crate::common::{self, wasm};

fn sandbox(work: &Path, cache: Option<&Path>) -> Result<Sandbox, String> {
    let mut config = SandboxConfig::new(work);
    config.cache_dir = cache.map(Path::to_owned);
    config.max_concurrent_jobs = 1;
    Sandbox::new(config).map_err(|e| e.to_string())
}

fn load_in(sandbox: &Sandbox, path: &str, name: &str) -> std::sync::Arc<LoadedModule> {
    common::load_in(sandbox, path, &common::policy(path, name))
}

async fn run_in(sandbox: &Sandbox, module: &LoadedModule) -> JobReport {
    let job = JobSpec::new();
    let dir = JobDir::create(&sandbox.config().work_dir, &job.id).unwrap();
    sandbox.run(module, &job, &dir).await.unwrap()
}

/// The cache entry named `name` under `cache`, wherever the engine key put it.
fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        if entry.file_name() == name {
            return Some(entry.path());
        }
        if entry.file_type().ok()?.is_dir()
            && let Some(found) = find(&entry.path(), name)
        {
            return Some(found);
        }
    }
    None
}

#[tokio::test(flavor = "multi_thread")]
async fn a_planted_artifact_of_another_module_is_not_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (cache, work) = (tmp.path().join("cache"), tmp.path().join("jobs"));
    // The host compiles the hostile guest into its cache: a genuine
    // artifact of this engine.
    {
        let first = sandbox(&work, Some(&cache)).unwrap();
        load_in(&first, bulkhead_tests::HOSTILE, "other");
    }
    let hostile = format!(
        "{}.cwasm",
        Sha256Hex::digest(&wasm(bulkhead_tests::HOSTILE))
    );
    let hello = format!("{}.cwasm", Sha256Hex::digest(&wasm(bulkhead_tests::HELLO)));
    let other = find(&cache, &hostile).expect("the hostile guest's artifact");
    // Another user plants it under hello's name.
    let target = other.with_file_name(&hello);
    std::fs::copy(&other, &target).unwrap();
    let planted = std::fs::read(&target).unwrap();

    // A restart: hello is loaded from the same cache and run.
    let second = sandbox(&work, Some(&cache)).unwrap();
    let module = load_in(&second, bulkhead_tests::HELLO, "hello");
    assert!(!module.from_cache(), "the planted artifact was loaded");
    let report = run_in(&second, &module).await;
    // The hostile guest without a mode exits 2; hello exits 0 and prints
    // its line: the host ran the pinned module.
    assert!(report.succeeded(), "{report:#?}");
    assert_eq!(report.stdout.text, "hello from bulkhead\n");
    // The entry now holds the host's own artifact, which a third start loads.
    assert_ne!(std::fs::read(&target).unwrap(), planted);
    let third = sandbox(&work, Some(&cache)).unwrap();
    assert!(load_in(&third, bulkhead_tests::HELLO, "hello").from_cache());
}

#[test]
fn cache_and_work_dirs_others_can_write_or_own_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let ok_work = tmp.path().join("jobs");
    let open = tmp.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();

    let err = sandbox(&ok_work, Some(&open)).unwrap_err();
    assert!(
        err.contains(&open.display().to_string()) && err.contains("0777"),
        "{err}"
    );
    assert!(!open.join("cache.key").exists(), "nothing written into it");
    let err = sandbox(&open, None).unwrap_err();
    assert!(
        err.contains("work directory") && err.contains("0777"),
        "{err}"
    );
    // Inside a world-writable (not sticky) directory, and through a link.
    let err = sandbox(&ok_work, Some(&open.join("cache"))).unwrap_err();
    assert!(err.contains(&open.display().to_string()), "{err}");
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&open, &link).unwrap();
    assert!(sandbox(&ok_work, Some(&link)).is_err());

    // Another user's directory (root can make one here).
    // SAFETY: `geteuid` has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let foreign = tmp.path().join("foreign");
        std::fs::create_dir(&foreign).unwrap();
        std::os::unix::fs::chown(&foreign, Some(65534), Some(65534)).unwrap();
        let err = sandbox(&ok_work, Some(&foreign)).unwrap_err();
        assert!(err.contains("uid 65534"), "{err}");
        let err = sandbox(&foreign, None).unwrap_err();
        assert!(err.contains("uid 65534"), "{err}");
    }
    // A private one is accepted, and its key is private.
    let private = tmp.path().join("private");
    sandbox(&ok_work, Some(&private)).unwrap();
    let key = std::fs::metadata(private.join("cache.key")).unwrap();
    assert_eq!(key.permissions().mode() & 0o777, 0o600);
}

/// The hostile guest in `mode`, allowed the output-attack parameters.
fn output_attacker(mode: &str) -> std::sync::Arc<LoadedModule> {
    common::hostile_with(mode, &["shape", "set", "linger"], |l| l.output_files = 32)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_output_tree_past_path_max_is_skipped_and_copies_out_by_handle() {
    for shape in ["deep-long", "files-each-level", "long-top"] {
        let module = output_attacker("out-deep");
        let (report, dir) = common::run(&module, &common::spec(&[], &[("shape", shape)])).await;
        assert!(report.succeeded(), "{shape}: {report:#?}");
        assert!(
            report.stdout.text.contains("done"),
            "{shape}: {}",
            report.stdout.text
        );
        for o in &report.outputs {
            assert!(
                o.name.len() <= outputs::MAX_PATH_BYTES,
                "{shape}: {}",
                o.name
            );
        }
        if shape == "deep-long" {
            assert!(report.outputs.is_empty(), "{shape}: {:?}", report.outputs);
            assert!(
                report
                    .skipped_outputs
                    .iter()
                    .any(|s| s.reason == "path-too-long"),
                "{shape}: {:?}",
                report.skipped_outputs
            );
        }
        // Copying them out (as `run --out` and the service do) works.
        let dest = tempfile::tempdir().unwrap();
        let created = dir.created();
        let copied = outputs::collect(
            &dir.output_dir(),
            Some(&dest.path().join("o")),
            outputs::Bounds::NONE,
            Some(&created),
        )
        .unwrap_or_else(|e| panic!("{shape}: {e}"));
        assert_eq!(copied.files, report.outputs, "{shape}");
        for o in &report.outputs {
            let data = std::fs::read(dest.path().join("o").join(&o.name)).unwrap();
            assert_eq!(data.len() as u64, o.size);
        }
    }
}

#[test]
fn the_cli_reports_a_deep_output_tree_and_exits_by_the_job() {
    let tmp = tempfile::tempdir().unwrap();
    let policy = tmp.path().join("p.toml");
    std::fs::write(
        &policy,
        common::policy(bulkhead_tests::HOSTILE, "hostile")
            .limits(|l| l.output_files = 32)
            .args(&["out-deep"])
            .text(),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_bulkhead-under-test"))
        .args(["run", bulkhead_tests::HOSTILE, "--json", "--no-cache"])
        .arg("--policy")
        .arg(&policy)
        .arg("--work-dir")
        .arg(tmp.path().join("jobs"))
        .arg("--out")
        .arg(tmp.path().join("out"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: JobReport = serde_json::from_str(&stdout).unwrap();
    assert!(
        report
            .skipped_outputs
            .iter()
            .any(|s| s.reason == "path-too-long")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_output_names_are_skipped_with_why() {
    let module = output_attacker("out-names");
    let (report, dir) = common::run(&module, &common::spec(&[], &[("set", "controls")])).await;
    assert!(report.succeeded(), "{report:#?}");
    let names: Vec<_> = report.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["ok.txt"]);
    let mut skipped: Vec<_> = report
        .skipped_outputs
        .iter()
        .map(|s| (s.name.as_str(), s.reason.as_str()))
        .collect();
    skipped.sort_unstable();
    assert_eq!(
        skipped,
        [
            ("cr\\u{d}name.txt", "control-char"),
            ("del\\u{7f}name.txt", "control-char"),
            ("dir\\u{a}name", "control-char"),
            ("esc\\u{1b}[31mred.txt", "control-char"),
            ("lf\\u{a}name.txt", "control-char"),
            ("nel\\u{85}name.txt", "control-char"),
            ("tab\\u{9}name.txt", "control-char"),
        ]
    );
    // The names really are on the host's disk, as the guest wrote them.
    assert!(dir.output_dir().join("lf\nname.txt").is_file());

    let (report, _dir) = common::run(&module, &common::spec(&[], &[("set", "format")])).await;
    assert!(report.succeeded(), "{report:#?}");
    let names: Vec<_> = report.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "apos'name.txt",
            "ok.txt",
            "percent%2e%2e.txt",
            "semi;colon.txt"
        ]
    );
    let mut reasons: Vec<_> = report
        .skipped_outputs
        .iter()
        .map(|s| (s.name.as_str(), s.reason.as_str()))
        .collect();
    reasons.sort_unstable();
    assert_eq!(
        reasons,
        [
            ("back\\u{5c}slash.txt", "reserved-char"),
            ("bom\\u{feff}name.txt", "format-char"),
            ("lri\\u{2066}name.txt", "format-char"),
            ("lrm\\u{200e}name.txt", "format-char"),
            ("quote\\u{22}name.txt", "reserved-char"),
            ("rlm\\u{200f}name.txt", "format-char"),
            ("rlo\\u{202e}txt.exe", "format-char"),
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failure_to_collect_outputs_fails_the_job_not_the_host() {
    // The guest leaves outputs and lingers; meanwhile `/out` is replaced on
    // the host by a file (a stand-in for any failure while collecting). The
    // job fails with the reason `output`, and `run` still returns a report.
    let module = output_attacker("out-names");
    let job = common::spec(&[], &[("set", "format"), ("linger", "3000")]);
    let dir = JobDir::create(&common::SANDBOX.config().work_dir, &job.id).unwrap();
    let out = dir.output_dir();
    let moved = out.with_extension("moved");
    let swap = async {
        // The guest writes `ok.txt`, then lingers 3 s.
        for _ in 0..2000 {
            if out.join("ok.txt").exists() {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        assert!(out.join("ok.txt").exists(), "the guest wrote nothing");
        std::fs::rename(&out, &moved).unwrap();
        std::fs::write(&out, b"not a directory").unwrap();
    };
    let (report, ()) = tokio::join!(common::SANDBOX.run(&module, &job, &dir), swap);
    let report = report.expect("a report, not a host error");
    assert!(!report.succeeded());
    let failure = report.failure.as_ref().unwrap();
    assert_eq!(failure.kind, FailureKind::Output, "{failure:?}");
    assert!(
        !failure.message.contains(&*out.to_string_lossy()),
        "{failure:?}"
    );
    std::fs::remove_file(&out).unwrap();
    std::fs::remove_dir_all(&moved).unwrap();
}
