//! Data-driven policy errors: each folder under `tests/policies/` holds a bad
//! `policy.toml` and the exact error it must produce in `expected.txt`. Run
//! with `BULKHEAD_BLESS=1` to rewrite the expected files after a deliberate
//! change to a message.

use std::path::{Path, PathBuf};

use bulkhead::policy::Policy;

#[test]
fn each_bad_policy_gets_its_own_clear_error() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("policies");
    let bless = std::env::var_os("BULKHEAD_BLESS").is_some();
    let mut cases: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(
        cases.len() >= 15,
        "expected the bad-policy cases under {}",
        root.display()
    );
    let mut seen = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    for case in &cases {
        let source = std::fs::read_to_string(case.join("policy.toml")).unwrap();
        let err = match Policy::parse(&source, Path::new("policy.toml")) {
            Ok(_) => {
                failures.push(format!("{}: parsed, but must be refused", case.display()));
                continue;
            }
            Err(e) => e.to_string(),
        };
        assert!(
            err.starts_with("policy.toml:"),
            "{err}: errors name the file, line and column"
        );
        assert!(seen.insert(err.clone()), "two cases share the error {err}");
        let expected_path = case.join("expected.txt");
        if bless {
            std::fs::write(&expected_path, format!("{err}\n")).unwrap();
            continue;
        }
        let expected = std::fs::read_to_string(&expected_path).unwrap_or_default();
        if expected.trim_end() != err {
            failures.push(format!(
                "{}:\n  expected: {}\n  actual:   {err}",
                case.display(),
                expected.trim_end()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
