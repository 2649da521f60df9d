//! The Python and JavaScript examples (`examples/python-wordcount`,
//! `examples/js-csv2json`), built here from source with componentize-py and
//! componentize-js into `wasi:cli/command` components, their checked-in
//! policies re-pinned with `bulkhead pin`, and run with `bulkhead run` in a
//! worker; the output files are judged on the host.
//!
//! Building one takes tens of seconds and compiling the 13–18 MiB result
//! as long again, so both are kept across runs under
//! `CARGO_TARGET_TMPDIR/polyglot`: a build is reused while the example's
//! source and the toolchain's version are unchanged (its file name carries
//! their digest), and each language has its own compile cache directory.
//!
//! The toolchains come from `.ci/run` (pip `componentize-py`, npm
//! `@bytecodealliance/componentize-js` under `target/componentize-js`).
//! With `CI` set a missing toolchain fails the test; without it the test
//! prints why it skipped.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Kept across test runs: the builds and the compile caches.
fn scratch() -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("polyglot");
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A toolchain's `--version`, or `None` when it cannot be run.
fn version(tool: &Path) -> Option<String> {
    let out = Command::new(tool).arg("--version").output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The tool from `env` if set, else the first candidate that runs, with
/// its version; `None` (after failing under `CI`) when none does.
fn toolchain(
    test: &str,
    env: &str,
    candidates: &[PathBuf],
    install: &str,
) -> Option<(PathBuf, String)> {
    let tools: Vec<PathBuf> = match std::env::var_os(env) {
        Some(tool) => vec![tool.into()],
        None => candidates.to_vec(),
    };
    for tool in tools {
        if let Some(version) = version(&tool) {
            return Some((tool, version));
        }
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test}: no toolchain ({candidates:?}, or {env}) and CI is set: `.ci/run` installs it ({install})"
    );
    eprintln!("SKIPPED {test}: no toolchain ({candidates:?}, or {env}); {install}");
    None
}

/// Copies the example's files (not its policy) into `to`, returning a
/// digest of their paths and contents.
fn copy_source(from: &Path, to: &Path, digest: &mut Sha256) {
    let mut entries: Vec<_> = std::fs::read_dir(from)
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    entries.sort_by_key(|e| e.file_name());
    std::fs::create_dir_all(to).unwrap();
    for entry in entries {
        let name = entry.file_name();
        let (src, dst) = (entry.path(), to.join(&name));
        if entry.file_type().unwrap().is_dir() {
            copy_source(&src, &dst, digest);
        } else if !name.to_string_lossy().ends_with(".toml") {
            let bytes = std::fs::read(&src).unwrap();
            digest.update(dst.strip_prefix(to).unwrap().to_string_lossy().as_bytes());
            digest.update((bytes.len() as u64).to_le_bytes());
            digest.update(&bytes);
            std::fs::write(&dst, bytes).unwrap();
        }
    }
}

/// `examples/<name>` built with `build` (run in a copy of the example, with
/// the output path appended), or the build kept from an earlier run of the
/// same source and toolchain.
fn built(name: &str, version: &str, build: &mut Command) -> PathBuf {
    let copy = tempfile::tempdir().unwrap();
    let mut digest = Sha256::new();
    digest.update(version.as_bytes());
    copy_source(
        &repo().join("examples").join(name),
        copy.path(),
        &mut digest,
    );
    let key = hex::encode(digest.finalize());
    let wasm = scratch().join(format!("{name}-{}.wasm", &key[..16]));
    if wasm.is_file() {
        return wasm;
    }
    let partial = copy.path().join(format!("{name}.wasm"));
    let out = build
        .arg(&partial)
        .current_dir(copy.path())
        .output()
        .unwrap();
    assert!(
        out.status.success() && partial.is_file(),
        "building {name}: {:?}\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Earlier builds of other sources are not needed again.
    for entry in std::fs::read_dir(scratch()).unwrap() {
        let entry = entry.unwrap().path();
        let file = entry.file_name().unwrap().to_string_lossy();
        if file.starts_with(&format!("{name}-")) && file.ends_with(".wasm") {
            let _ = std::fs::remove_file(&entry);
        }
    }
    std::fs::rename(&partial, &wasm)
        .or_else(|_| std::fs::copy(&partial, &wasm).map(|_| ()))
        .unwrap();
    wasm
}

fn bulkhead(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bulkhead-under-test"))
        .args(args)
        .output()
        .unwrap()
}

/// Pins a copy of the example's policy to `wasm` with `bulkhead pin`;
/// returns its path.
fn pin(name: &str, wasm: &Path, tmp: &Path) -> PathBuf {
    let policy = tmp.join(format!("{name}.toml"));
    std::fs::copy(
        repo()
            .join("examples")
            .join(name)
            .join(format!("{name}.toml")),
        &policy,
    )
    .unwrap();
    let pinned = bulkhead(&[
        "pin",
        policy.to_str().unwrap(),
        "--module",
        wasm.to_str().unwrap(),
    ]);
    assert!(
        pinned.status.success(),
        "{}",
        String::from_utf8_lossy(&pinned.stderr)
    );
    let expected = hex::encode(Sha256::digest(std::fs::read(wasm).unwrap()));
    assert!(
        std::fs::read_to_string(&policy)
            .unwrap()
            .contains(&expected),
        "the policy is not pinned to {expected}"
    );
    policy
}

/// Runs `wasm` under `policy` with `bulkhead run` (in a worker, the
/// default), inputs written under `tmp`, outputs to `tmp/<out>`; returns
/// the exit code, the report and the `--out` directory.
fn run(
    wasm: &Path,
    policy: &Path,
    inputs: &[(&str, &str)],
    params: &[&str],
    tmp: &Path,
    out: &str,
) -> (Option<i32>, bulkhead::sandbox::JobReport, PathBuf) {
    let name = policy.file_stem().unwrap().to_str().unwrap();
    let out_dir = tmp.join(out);
    let (jobs, cache) = (tmp.join("jobs"), scratch().join(format!("cache-{name}")));
    let mut args: Vec<String> = vec!["run".into(), wasm.to_str().unwrap().into(), "--json".into()];
    for (flag, path) in [
        ("--policy", policy),
        ("--out", &out_dir),
        ("--work-dir", &jobs),
        ("--cache-dir", &cache),
    ] {
        args.extend([flag.into(), path.to_str().unwrap().into()]);
    }
    for (file, text) in inputs {
        let path = tmp.join(file);
        std::fs::write(&path, text).unwrap();
        args.extend(["--input".into(), path.to_str().unwrap().into()]);
    }
    for param in params {
        args.extend(["--param".into(), (*param).into()]);
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let output = bulkhead(&args);
    let report = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        )
    });
    assert!(
        jobs.is_dir() && cache.join("zones/untrusted").is_dir(),
        "not run in a worker"
    );
    (output.status.code(), report, out_dir)
}

fn json_file(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}\n{text}", path.display()))
}

#[test]
fn the_python_example_builds_with_componentize_py_and_runs_under_bulkhead_run() {
    let Some((tool, version)) = toolchain(
        "the_python_example_builds_with_componentize_py_and_runs_under_bulkhead_run",
        "BULKHEAD_COMPONENTIZE_PY",
        &["componentize-py".into()],
        "pip install componentize-py",
    ) else {
        return;
    };
    let wasm = built(
        "python-wordcount",
        &version,
        Command::new(tool).args([
            "-q",
            "-d",
            "wit",
            "-w",
            "command",
            "componentize",
            "wordcount",
            "-o",
        ]),
    );
    let tmp = tempfile::tempdir().unwrap();
    let policy = pin("python-wordcount", &wasm, tmp.path());
    let inputs = [
        ("a.txt", "The cat and the hat.\nThe end\n"),
        ("b.txt", "don't stop the show, cat\n"),
    ];
    let (code, report, out) = run(&wasm, &policy, &inputs, &["top=3"], tmp.path(), "out");
    assert_eq!(code, Some(0), "{report:#?}");
    assert!(report.succeeded(), "{report:#?}");
    assert_eq!(
        json_file(&out.join("counts.json")),
        json!({
            "files": {
                "a.txt": {"bytes": 29, "lines": 2, "words": 7},
                "b.txt": {"bytes": 25, "lines": 1, "words": 5},
            },
            "total": {"words": 12, "distinct": 8},
            "top": [["the", 4], ["cat", 2], ["and", 1]],
        })
    );

    // A value the guest refuses: its exit code, its message, no output.
    let (code, report, out) = run(&wasm, &policy, &inputs, &["top=-1"], tmp.path(), "bad");
    assert_eq!(code, Some(1), "{report:#?}");
    assert_eq!(report.exit_code, Some(1), "{report:#?}");
    assert!(
        report.stderr.text.contains("--top=-1: expected 0 to 1000"),
        "{report:#?}"
    );
    assert!(!out.join("counts.json").exists());
}

#[test]
fn the_javascript_example_builds_with_componentize_js_and_runs_under_bulkhead_run() {
    let Some((tool, version)) = toolchain(
        "the_javascript_example_builds_with_componentize_js_and_runs_under_bulkhead_run",
        "BULKHEAD_COMPONENTIZE_JS",
        &[
            repo().join("target/componentize-js/node_modules/.bin/componentize-js"),
            "componentize-js".into(),
        ],
        "npm install --prefix target/componentize-js @bytecodealliance/componentize-js",
    ) else {
        return;
    };
    let wasm = built(
        "js-csv2json",
        &version,
        Command::new(tool).args([
            "csv2json.js",
            "--wit",
            "wit",
            "--world-name",
            "command",
            "--disable",
            "http",
            "fetch-event",
            "-o",
        ]),
    );
    let tmp = tempfile::tempdir().unwrap();
    let policy = pin("js-csv2json", &wasm, tmp.path());
    let inputs = [(
        "data.csv",
        "name,qty,note\nwidget,3,\"a, b\"\r\n\"gad\"\"get\",10.5,\n",
    )];
    let (code, report, out) = run(&wasm, &policy, &inputs, &["numbers=yes"], tmp.path(), "out");
    assert_eq!(code, Some(0), "{report:#?}");
    assert!(report.succeeded(), "{report:#?}");
    assert_eq!(
        json_file(&out.join("data.json")),
        json!([
            {"name": "widget", "qty": 3, "note": "a, b"},
            {"name": "gad\"get", "qty": 10.5, "note": ""},
        ])
    );
}
