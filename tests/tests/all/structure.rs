//! The module boundaries ARCHITECTURE.md states, checked in the source:
//! which modules may name wasmtime, which may speak HTTP, and who may open
//! the sandbox's deliberate hole.

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
