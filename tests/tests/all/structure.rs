//! The module boundaries ARCHITECTURE.md states, checked in the source:
//! which modules may name wasmtime, which may speak HTTP, and who may open
//! the sandbox's deliberate hole; and that test modules take their
//! fixtures only from `common`.

use std::path::{Path, PathBuf};

fn host_src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../host/src")
}

/// Every `.rs` file under `dir`, with its path relative to `host/src`.
fn sources(dir: &Path, root: &Path, out: &mut Vec<(String, String)>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, root, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            out.push((rel, std::fs::read_to_string(&path).unwrap()));
        }
    }
}

/// The code of a file: lines that are not comments.
fn code(text: &str) -> impl Iterator<Item = (usize, &str)> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim_start().starts_with("//"))
        .map(|(i, l)| (i + 1, l))
}

/// Lines of the files under `modules` whose code names any of `words`.
fn naming(modules: &[&str], words: &[&str], except: &[&str]) -> Vec<String> {
    let root = host_src();
    let mut files = Vec::new();
    sources(&root, &root, &mut files);
    // The escape suite's crate, as `suite/...`.
    let suite = root.join("../../suite/src");
    let mut suite_files = Vec::new();
    sources(&suite, &suite, &mut suite_files);
    assert!(!suite_files.is_empty(), "suite/src was not found");
    files.extend(
        suite_files
            .into_iter()
            .map(|(rel, text)| (format!("suite/{rel}"), text)),
    );
    let mut found = Vec::new();
    for (rel, text) in &files {
        let in_scope = modules
            .iter()
            .any(|m| rel == m || rel.starts_with(&format!("{m}/")) || *m == "*");
        if !in_scope
            || except
                .iter()
                .any(|e| rel == e || rel.starts_with(&format!("{e}/")))
        {
            continue;
        }
        for (n, line) in code(text) {
            if words.iter().any(|w| line.contains(w)) {
                found.push(format!("{rel}:{n}: {}", line.trim()));
            }
        }
    }
    found
}

#[test]
fn module_boundaries_hold_in_the_source() {
    let files = {
        let root = host_src();
        let mut v = Vec::new();
        sources(&root, &root, &mut v);
        v
    };
    assert!(files.len() > 30, "host/src was not found");

    // Only `sandbox` names wasmtime types: the relay gets a guest's
    // requests through the `job::egress` seam, not wasmtime-wasi-http.
    let wasmtime = naming(&["*"], &["wasmtime"], &["sandbox"]);
    assert!(wasmtime.is_empty(), "{wasmtime:#?}");

    // The job's types are plain data: `job` names neither wasmtime nor the
    // relay, so a worker process can be handed a spec and hand back a
    // report without either.
    let job = naming(&["job"], &["wasmtime", "relay"], &[]);
    assert!(job.is_empty(), "{job:#?}");

    // The sandbox knows nothing of the relay or its keys: a job's way out
    // reaches it only as a `job::egress::Egress` (the service owns the
    // relay).
    let keys = naming(&["sandbox"], &["relay", "KeyRing"], &[]);
    assert!(keys.is_empty(), "{keys:#?}");

    // `store` takes the report from `job`, not from the sandbox.
    let store = naming(&["store"], &["use crate::sandbox"], &[]);
    assert!(store.is_empty(), "{store:#?}");

    // `service`, `store` and `policy` know nothing about HTTP.
    let http = naming(
        &["service", "store", "policy"],
        &["axum", "hyper", "http::", "tower"],
        &[],
    );
    assert!(http.is_empty(), "{http:#?}");

    // The sandbox's deliberate hole is opened only by the escape suite's
    // self-test; everything else leaves the default.
    let hole = naming(&["*"], &["unsafe_extra_preopen ="], &[]);
    assert_eq!(hole.len(), 1, "{hole:#?}");
    assert!(hole[0].starts_with("suite/local.rs:"), "{hole:#?}");
}

/// The `bulkhead` library is what an embedder links: no command line, no
/// escape suite, no HTTP client, no module generator and no nested guest
/// build come with it. Those live in `bulkhead-cli`, `bulkhead-suite` and
/// `bulkhead-artifacts`, so the compiler refuses any use of them in the
/// library.
#[test]
fn the_library_depends_on_no_command_line_suite_or_guest_build() {
    let host = Path::new(env!("CARGO_MANIFEST_DIR")).join("../host");
    let manifest: toml::Table = std::fs::read_to_string(host.join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let package = manifest["package"].as_table().unwrap();
    assert!(!package.contains_key("build"), "{package:#?}");
    assert!(!package.contains_key("links"), "{package:#?}");
    assert!(!host.join("build.rs").exists());
    assert!(manifest.get("bin").is_none(), "the library owns no binary");
    let deps = manifest["dependencies"].as_table().unwrap();
    let forbidden = [
        "clap",
        "anyhow",
        "tracing-subscriber",
        "reqwest",
        "wasm-encoder",
        "bulkhead-suite",
        "bulkhead-cli",
        "bulkhead-artifacts",
    ];
    let found: Vec<&str> = forbidden
        .into_iter()
        .filter(|d| deps.contains_key(*d))
        .collect();
    assert!(found.is_empty(), "the library depends on {found:?}");
}

/// Test modules take their fixtures from `common` only: a `crate::` path
/// to any other module of this binary is a fixture living in a test.
#[test]
fn test_modules_import_fixtures_only_from_common() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/all");
    let mut files = Vec::new();
    sources(&root, &root, &mut files);
    // Spelt in two, so this file does not find itself.
    let from_crate = concat!("crate", "::");
    let mut found = Vec::new();
    for (rel, text) in &files {
        if rel == "main.rs" {
            continue;
        }
        for (n, line) in code(text) {
            let mut rest = line;
            while let Some(at) = rest.find(from_crate) {
                rest = &rest[at + from_crate.len()..];
                if !rest.starts_with("common") {
                    found.push(format!("{rel}:{n}: {}", line.trim()));
                }
            }
        }
    }
    assert!(found.is_empty(), "{found:#?}");
}
