//! The example policies in `policies/` are valid and pin exactly the modules
//! this repository builds, so `bulkhead run` works on them from a fresh clone.

use std::path::PathBuf;

use bulkhead::policy::{Policy, Sha256Hex};

#[test]
fn example_policies_pin_the_modules_built_from_source() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../policies");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let policy = Policy::load(&path).unwrap_or_else(|e| panic!("{e}"));
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
        crate::common::SANDBOX
            .load(policy, &wasm)
            .unwrap_or_else(|e| panic!("{e}"));
        checked += 1;
    }
    assert!(
        checked >= 2,
        "no example policies found in {}",
        dir.display()
    );
}
