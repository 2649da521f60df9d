//! Signed modules: a policy's `signed_by` makes the service refuse a module
//! without a valid minisign signature by one of the named host keys, at
//! start, before anything compiles it; a correctly signed module serves
//! jobs.

use std::path::{Path, PathBuf};

use bulkhead::config::ServeConfig;
use bulkhead::service::Service;

use crate::common::policies::hello;

struct Key {
    public: String,
    secret: minisign::SecretKey,
}

fn key() -> Key {
    let minisign::KeyPair { pk, sk } = minisign::KeyPair::generate_unencrypted_keypair().unwrap();
    Key {
        public: pk.to_base64(),
        secret: sk,
    }
}

impl Key {
    fn sign(&self, bytes: &[u8]) -> String {
        minisign::sign(None, &self.secret, bytes, Some("file:hello.wasm"), None)
            .unwrap()
            .to_string()
    }
}

/// A host trusting `release`, serving `hello` (signed by `accepted`) from a
/// modules directory of its own, with `signature` beside the module.
fn config(dir: &Path, release: &Key, accepted: &[&str], signature: Option<&str>) -> ServeConfig {
    let modules = dir.join("modules");
    std::fs::create_dir_all(&modules).unwrap();
    std::fs::copy(bulkhead_tests::HELLO, modules.join("hello.wasm")).unwrap();
    if let Some(sig) = signature {
        std::fs::write(modules.join("hello.wasm.minisig"), sig).unwrap();
    }
    let mut config = ServeConfig::default();
    config.storage.data_dir = dir.join("data");
    config.storage.cache_dir = Some(dir.join("cache"));
    config.modules.policies_dir = dir.join("policies");
    config.modules.modules_dir = modules;
    config.isolation.program = Some(PathBuf::from(env!("CARGO_BIN_EXE_bulkhead-under-test")));
    config
        .trust
        .keys
        .insert("release".to_owned(), release.public.clone());
    hello()
        .signed_by(accepted)
        .write_to(&config.modules.policies_dir);
    config
}

/// Files anything compiled would have left in the cache directory.
fn compiled(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.join("cache")];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "cwasm") {
                found.push(p);
            }
        }
    }
    found
}

async fn refused(config: ServeConfig) -> String {
    match Service::start(config, None).await {
        Ok(_) => panic!("the service started"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn unsigned_wrongly_signed_or_foreign_key_modules_are_refused_before_compiling() {
    let (release, stranger) = (key(), key());
    let wasm = std::fs::read(bulkhead_tests::HELLO).unwrap();
    let cases: [(&str, &[&str], Option<String>, &str); 5] = [
        ("no signature", &["release"], None, "there is none"),
        (
            "signed by a key the host does not trust",
            &["release"],
            Some(stranger.sign(&wasm)),
            "not a valid signature",
        ),
        (
            "a signature of other bytes",
            &["release"],
            Some(release.sign(b"another module")),
            "not a valid signature",
        ),
        (
            "not a signature",
            &["release"],
            Some("untrusted comment: x\nnot base64\n".to_owned()),
            "not a minisign signature",
        ),
        (
            "a policy naming a key the host lacks",
            &["nightly"],
            Some(release.sign(&wasm)),
            "\"nightly\"",
        ),
    ];
    for (case, accepted, signature, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let err = refused(config(dir.path(), &release, accepted, signature.as_deref())).await;
        assert!(err.contains("hello"), "{case}: {err}");
        assert!(err.contains(expected), "{case}: {err}");
        assert_eq!(compiled(dir.path()), Vec::<PathBuf>::new(), "{case}");
    }
}

#[tokio::test]
async fn a_module_signed_by_a_trusted_key_serves_jobs() {
    let release = key();
    let wasm = std::fs::read(bulkhead_tests::HELLO).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        &release,
        &["release"],
        Some(&release.sign(&wasm)),
    );
    let service = Service::start(config, None).await.unwrap();
    let listeners = bulkhead::serve::Listeners::loopback().await.unwrap();
    let serving = bulkhead::serve::spawn(std::sync::Arc::clone(&service), listeners).unwrap();
    let (token, record) = bulkhead::api::new_token(&bulkhead::api::IssueRequest {
        tenant: "acme".into(),
        subject: "ci".into(),
        scopes: vec!["hello:run".to_owned()],
        ttl: None,
    })
    .unwrap();
    service.store().insert_token(&record).await.unwrap();
    let resp = reqwest::Client::new()
        .post(format!(
            "http://{}/v1/modules/hello/jobs?wait=30s",
            serving.public
        ))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let job: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(
        !compiled(dir.path()).is_empty(),
        "the signed module was compiled"
    );
}

/// `bulkhead check` and `run` with `--trust`: the verdict before compiling,
/// exit 2 on a refusal.
#[test]
fn check_and_run_show_the_signature_verdict_and_refuse_before_compiling() {
    let (release, stranger) = (key(), key());
    let tmp = tempfile::tempdir().unwrap();
    let module = tmp.path().join("hello.wasm");
    std::fs::copy(bulkhead_tests::HELLO, &module).unwrap();
    let wasm = std::fs::read(&module).unwrap();
    let policy = hello()
        .signed_by(&["release"])
        .write_to(&tmp.path().join("p"));
    let trust = format!("release={}", release.public);
    let bulkhead = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead-under-test"))
            .args(args)
            .arg("--policy")
            .arg(&policy)
            .arg("--trust")
            .arg(&trust)
            .arg("--work-dir")
            .arg(tmp.path().join("jobs"))
            .arg("--cache-dir")
            .arg(tmp.path().join("cache"))
            .output()
            .unwrap()
    };
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    let module_arg = module.to_str().unwrap();
    let sig = bulkhead::trust::signature_path(&module);

    // Unsigned, then signed by a stranger: refused, nothing compiled.
    for signature in [None, Some(stranger.sign(&wasm))] {
        if let Some(s) = &signature {
            std::fs::write(&sig, s).unwrap();
        }
        let out = bulkhead(&["check", module_arg]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(
            text(&out).contains("refused before compiling"),
            "{}",
            text(&out)
        );
        let out = bulkhead(&["run", module_arg]);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(text(&out).contains("hello"), "{}", text(&out));
        assert_eq!(compiled(tmp.path()), Vec::<PathBuf>::new());
    }

    std::fs::write(&sig, release.sign(&wasm)).unwrap();
    let out = bulkhead(&["check", module_arg]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("signature valid, signed by \"release\""),
        "{}",
        text(&out)
    );
    let out = bulkhead(&["run", module_arg]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(text(&out).contains("hello from bulkhead"), "{}", text(&out));
}

/// A second policy for the same module (unsigned, other scopes) does not
/// quietly replace the signed one: the service refuses to start. Nor does
/// a second `--trust` under a name already trusted replace that key.
#[tokio::test]
async fn a_second_policy_or_key_under_a_taken_name_is_refused() {
    let release = key();
    let wasm = std::fs::read(bulkhead_tests::HELLO).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = config(
        dir.path(),
        &release,
        &["release"],
        Some(&release.sign(&wasm)),
    );
    let unsigned = hello().scopes(&["other:run"]).text();
    std::fs::write(config.modules.policies_dir.join("zz-hello.toml"), unsigned).unwrap();
    let err = refused(config).await;
    assert!(err.contains("one policy per module"), "{err}");
    assert!(err.contains("zz-hello.toml"), "{err}");

    let other = key();
    let policy = hello()
        .signed_by(&["release"])
        .write_to(&dir.path().join("p"));
    let module = dir.path().join("modules/hello.wasm");
    std::fs::write(bulkhead::trust::signature_path(&module), other.sign(&wasm)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_bulkhead-under-test"))
        .args(["check", "--policy"])
        .arg(&policy)
        .arg(&module)
        .arg("--trust")
        .arg(format!("release={}", release.public))
        .arg("--trust")
        .arg(format!("release={}", other.public))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("already trusted"), "{text}");
}
