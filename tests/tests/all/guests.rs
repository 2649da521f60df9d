//! One smoke test per guest, named exactly after it: `main.rs` checks with
//! `foreach_guest!` that every guest built from `guests/` has one.

use bulkhead::policy::ByteSize;

use crate::common::{SANDBOX, hostile as hostile_module, load_plain, png, policy, run, spec, wasm};

#[tokio::test(flavor = "multi_thread")]
pub(crate) async fn hello() {
    let module = load_plain(bulkhead_tests::HELLO, "hello");
    let (report, _dir) = run(&module, &spec(&[], &[])).await;
    assert!(report.succeeded(), "{report:#?}");
    assert_eq!(report.stdout.text, "hello from bulkhead\n");
}

#[tokio::test(flavor = "multi_thread")]
pub(crate) async fn thumbnail() {
    // Without an input the processor explains itself and exits 2.
    let module = load_plain(bulkhead_tests::THUMBNAIL, "thumbnail");
    let (report, _dir) = run(&module, &spec(&[], &[])).await;
    assert_eq!(report.exit_code, Some(1), "{report:#?}");
    assert!(!report.stderr.text.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
pub(crate) async fn sanitize_html() {
    let module = load_plain(bulkhead_tests::SANITIZE_HTML, "sanitize-html");
    let (report, _dir) = run(&module, &spec(&[("a.html", b"<p>hi</p>")], &[])).await;
    assert!(report.succeeded(), "{report:#?}");
    assert_eq!(report.outputs[0].name, "a.html");
}

#[tokio::test(flavor = "multi_thread")]
pub(crate) async fn hostile() {
    // An unknown mode is a usage error of the guest, not a host problem.
    let module = hostile_module("no-such-mode", |_| {});
    let (report, _dir) = run(&module, &spec(&[], &[])).await;
    assert_eq!(report.exit_code, Some(1), "{report:#?}");
}

#[tokio::test(flavor = "multi_thread")]
pub(crate) async fn hello_http() {
    // A wasi:http proxy component: under a policy without services its
    // `wasi:http` imports are refused before compiling, naming the line
    // that would grant them (and it exports no `wasi:cli/run` either).
    let err = load_error(bulkhead_tests::HELLO_HTTP, "hello-http");
    assert!(
        err.starts_with("module `hello-http` imports what its policy does not grant:")
            && err.contains("network.services"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
pub(crate) async fn lateral() {
    // It imports wasi:http; under a policy that names no services, the
    // import is denied and the module refused before compiling, with the
    // policy line that would grant it.
    let err = load_error(bulkhead_tests::LATERAL, "lateral");
    assert!(
        err.starts_with("module `lateral` imports what its policy does not grant:")
            && err.contains("wasi:http")
            && err.contains("network.services"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
pub(crate) async fn framed() {
    // Granted `palette`, but its way out carries no caller identity (as
    // for a job whose token was revoked): the host has no identity to
    // relay, so it refuses the call, and the guest fails cleanly.
    use bulkhead::relay::{KeyRing, Relay, ServiceDecl, TokenConfig};
    let tmp = tempfile::tempdir().unwrap();
    let decl = ServiceDecl::example("palette", "http://127.0.0.1:9");
    let relay = std::sync::Arc::new(
        Relay::new(
            vec![decl.clone()],
            std::sync::Arc::new(KeyRing::ephemeral()),
            &TokenConfig::default(),
        )
        .unwrap(),
    );
    let sandbox = bulkhead::sandbox::Sandbox::new(bulkhead::sandbox::SandboxConfig::new(
        tmp.path().join("work"),
    ))
    .unwrap();
    let policy = policy(bulkhead_tests::FRAMED, "framed")
        .memory(ByteSize::mib(256))
        .services(&["palette"])
        .parse_with(&[decl.name]);
    let module = sandbox.load(policy, &wasm(bulkhead_tests::FRAMED)).unwrap();
    let png = png(64, 64);
    let job = spec(&[("in.png", &png)], &[]);
    let dir = bulkhead::sandbox::JobDir::create(&sandbox.config().work_dir, &job.id).unwrap();
    let egress = relay.grant(
        module.policy(),
        &job.id,
        Err("the job was not submitted by an authenticated caller".into()),
        None,
    );
    let report = sandbox.run_with(&module, &job, &dir, egress).await.unwrap();
    assert_eq!(report.exit_code, Some(1), "{report:#?}");
    let calls = report.calls.clone().expect("a calls section");
    assert_eq!((calls.made, calls.refused), (0, 1), "{calls:#?}");
    assert_eq!(calls.records[0].class.as_deref(), Some("identity"));
    assert!(
        report.stderr.text.contains("HttpRequestDenied"),
        "{report:#?}"
    );
}

/// Why the shared sandbox refuses to load the guest at `path` under an
/// empty policy.
fn load_error(path: &str, name: &str) -> String {
    SANDBOX
        .load(policy(path, name).parse(), &wasm(path))
        .unwrap_err()
        .to_string()
}

/// The same source as the WASIp1 intake's guest, built as a component: it
/// copies its inputs like its p1 build (`intake`).
#[tokio::test(flavor = "multi_thread")]
pub(crate) async fn p1_files() {
    let module = load_plain(bulkhead_tests::P1_FILES, "p1-files");
    let (report, dir) = run(&module, &spec(&[("a.txt", b"alpha")], &[])).await;
    assert!(report.succeeded(), "{report:#?}");
    assert_eq!(
        std::fs::read(dir.output_dir().join("a.txt")).unwrap(),
        b"alpha"
    );
}
