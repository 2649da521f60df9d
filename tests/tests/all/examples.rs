//! The example policies in `policies/` and `examples/*/policies/` are valid
//! and pin exactly the modules this repository builds, so `bulkhead run`
//! and the README's walkthroughs work on them from a fresh clone.

use std::path::{Path, PathBuf};

use bulkhead::config::ServeConfig;
use bulkhead::policy::{Policy, ServiceName, Sha256Hex};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Checks every policy in `dir` against the built modules; returns how many.
fn check_policies(dir: &Path, declared: &[ServiceName]) -> usize {
    let mut checked = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let policy = Policy::load_with(&path, declared).unwrap_or_else(|e| panic!("{e}"));
        let wasm_path =
            PathBuf::from(bulkhead_tests::GUESTS_DIR).join(format!("{}.wasm", policy.module.name));
        let wasm =
            std::fs::read(&wasm_path).unwrap_or_else(|e| panic!("{}: {e}", wasm_path.display()));
        let actual = Sha256Hex::digest(&wasm);
        assert_eq!(
            policy.module.sha256,
            actual,
            "{} pins a different build of {}; if the guest changed on purpose, run scripts/pin-policies",
            path.display(),
            wasm_path.display()
        );
        if declared.is_empty() {
            crate::common::SANDBOX
                .load(policy, &wasm)
                .unwrap_or_else(|e| panic!("{e}"));
        }
        checked += 1;
    }
    checked
}

#[test]
fn example_policies_pin_the_modules_built_from_source() {
    let dir = repo().join("policies");
    assert!(
        check_policies(&dir, &[]) >= 2,
        "no example policies found in {}",
        dir.display()
    );
}

#[test]
fn the_lateral_walkthrough_config_and_policies_are_valid() {
    let config = ServeConfig::load(&repo().join("examples/lateral/bulkhead.toml")).unwrap();
    let declared: Vec<ServiceName> = config.services.iter().map(|s| s.name.clone()).collect();
    assert_eq!(declared.len(), 2);
    assert_eq!(
        config.modules.policies_dir,
        PathBuf::from("examples/lateral/policies")
    );
    assert_eq!(
        check_policies(&repo().join("examples/lateral/policies"), &declared),
        2
    );
}
