//! One smoke test per guest, named exactly after it: `main.rs` checks with
//! `foreach_guest!` that every guest built from `guests/` has one.

use crate::common::{hostile as hostile_module, load, run, spec};

#[tokio::test(flavor = "multi_thread")]
pub(crate) async fn hello() {
    let module = load(bulkhead_tests::HELLO, "hello", "");
    let (report, _dir) = run(&module, &spec(&[], &[])).await;
    assert!(report.succeeded(), "{report:#?}");
    assert_eq!(report.stdout.text, "hello from bulkhead\n");
}

#[tokio::test(flavor = "multi_thread")]
pub(crate) async fn thumbnail() {
    // Without an input the processor explains itself and exits 2.
    let module = load(bulkhead_tests::THUMBNAIL, "thumbnail", "");
    let (report, _dir) = run(&module, &spec(&[], &[])).await;
    assert_eq!(report.exit_code, Some(1), "{report:#?}");
    assert!(!report.stderr.text.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
pub(crate) async fn sanitize_html() {
    let module = load(bulkhead_tests::SANITIZE_HTML, "sanitize-html", "");
    let (report, _dir) = run(&module, &spec(&[("a.html", b"<p>hi</p>")], &[])).await;
    assert!(report.succeeded(), "{report:#?}");
    assert_eq!(report.outputs[0].name, "a.html");
}

#[tokio::test(flavor = "multi_thread")]
pub(crate) async fn hostile() {
    // An unknown mode is a usage error of the guest, not a host problem.
    let module = hostile_module("no-such-mode", "");
    let (report, _dir) = run(&module, &spec(&[], &[])).await;
    assert_eq!(report.exit_code, Some(1), "{report:#?}");
}

#[tokio::test(flavor = "multi_thread")]
pub(crate) async fn hello_http() {
    // A wasi:http proxy component exports no `wasi:cli/run`: the sandbox
    // refuses it when loading, before any job, with a clear reason.
    let wasm = crate::common::wasm(bulkhead_tests::HELLO_HTTP);
    let text = crate::common::policy_text(bulkhead_tests::HELLO_HTTP, "hello-http", "");
    let policy = bulkhead::policy::Policy::parse(&text, std::path::Path::new("p.toml")).unwrap();
    let err = crate::common::SANDBOX
        .load(policy, &wasm)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("module `hello-http` cannot be linked:"),
        "{err}"
    );
}
