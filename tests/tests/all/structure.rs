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
    assert!(hole[0].starts_with("suite/harness/mod.rs:"), "{hole:#?}");
}

/// The escape suite's layers (ARCHITECTURE.md): every `crate::` and
/// `super::` path in `suite/src` points to its own layer or one below; the
/// model depends on nothing in the crate, the catalog on the model only,
/// and no attack family on another.
#[test]
fn suite_layers_only_point_down() {
    // Top-level module (or `root`: lib.rs and the report) -> rank. The
    // catalog and the families share a rank but may not name each other.
    const LAYERS: [(&str, u8); 6] = [
        ("model", 0),
        ("harness", 1),
        ("catalog", 2),
        ("families", 2),
        ("runners", 3),
        ("root", 4),
    ];
    fn files(dir: &Path, root: &Path, out: &mut Vec<(Vec<String>, String)>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files(&path, root, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                // The module path of the file: `families/http.rs` is
                // families::http, `harness/mod.rs` harness, lib.rs the root.
                let rel = path.strip_prefix(root).unwrap().with_extension("");
                let mut module: Vec<String> = rel
                    .components()
                    .map(|c| c.as_os_str().to_string_lossy().into_owned())
                    .collect();
                if module.last().is_some_and(|l| l == "mod" || l == "lib") {
                    module.pop();
                }
                out.push((module, std::fs::read_to_string(&path).unwrap()));
            }
        }
    }
    fn group(module: &[String]) -> &str {
        match module.first().map(String::as_str) {
            None | Some("report") => "root",
            Some(m) => m,
        }
    }
    let rank = |g: &str| LAYERS.iter().find(|(n, _)| *n == g).map(|(_, r)| *r);
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../suite/src");
    let mut all = Vec::new();
    files(&src, &src, &mut all);
    let top: Vec<String> = all.iter().filter_map(|(m, _)| m.first().cloned()).collect();
    let mut bad = Vec::new();
    for (module, text) in &all {
        let from = group(module);
        let Some(from_rank) = rank(from) else {
            bad.push(format!("{}: not in a layer", module.join("::")));
            continue;
        };
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            // Comments, and a test module's glob of its own file.
            if code.starts_with("//") || (code == "use super::*;" && line.starts_with(' ')) {
                continue;
            }
            let mut rest = code;
            while let Some(at) = rest.find(['c', 's']) {
                let tail = &rest[at..];
                let word_start = at == 0
                    || !rest[..at]
                        .chars()
                        .next_back()
                        .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':');
                let (mut target, mut after) = if word_start && tail.starts_with("crate::") {
                    (Vec::new(), &tail[7..])
                } else if word_start && tail.starts_with("super::") {
                    (module.clone(), tail)
                } else {
                    rest = &tail[1..];
                    continue;
                };
                while let Some(next) = after.strip_prefix("super::") {
                    target.pop();
                    after = next;
                }
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    target.push(name.clone());
                    if let Some(sub) = after[name.len()..].strip_prefix("::") {
                        let sub: String = sub
                            .chars()
                            .take_while(|c| c.is_alphanumeric() || *c == '_')
                            .collect();
                        if !sub.is_empty() {
                            target.push(sub);
                        }
                    }
                }
                // An item of the root (`crate::Check`) belongs to the root.
                if target.first().is_some_and(|t| !top.contains(t)) {
                    target.clear();
                }
                let to = group(&target);
                let ok = match rank(to) {
                    None => false,
                    Some(r) if r < from_rank => true,
                    Some(r) if r == from_rank && to == from => {
                        // Within the families, only a family's own files.
                        from != "families"
                            || target.len() < 2
                            || module.len() < 2
                            || target[1] == module[1]
                    }
                    Some(_) => false,
                };
                if !ok {
                    bad.push(format!(
                        "suite/src {} (line {}): {from} -> {to} ({})",
                        module.join("::"),
                        n + 1,
                        code
                    ));
                }
                rest = &tail[1..];
            }
        }
    }
    assert!(
        bad.is_empty(),
        "edges that do not point down:\n{}",
        bad.join("\n")
    );
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
        // `main.rs` declares the modules; this file reads `crate::` paths
        // of other crates' sources as text.
        if rel == "main.rs" || rel == "structure.rs" {
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
