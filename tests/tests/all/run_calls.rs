//! `bulkhead run --config` relays a guest's calls exactly as the service
//! does: through the services the config declares, with a real call token
//! from the config's key ring, which an example service verifies against
//! the keys `bulkhead jwks` publishes.

use std::process::Command;

use bulkhead_services::{JwksSource, ServiceState, palette_router};
use bulkhead_verify::{Verifier, VerifierConfig};

fn bulkhead(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_bulkhead-under-test"))
        .args(args)
        .output()
        .unwrap()
}

fn text(o: &std::process::Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

#[tokio::test]
async fn bulkhead_run_relays_calls_with_tokens_a_service_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let config = tmp.path().join("bulkhead.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\ndata_dir = \"{}\"\n\n[tokens]\nissuer = \"bulkhead\"\n\n\
             [[services]]\nname = \"palette\"\nurl = \"http://127.0.0.1:{port}\"\n\
             paths = [\"/v1/\"]\nmethods = [\"GET\"]\n\n\
             [[services]]\nname = \"payments\"\nurl = \"http://127.0.0.1:9\"\n",
            tmp.path().join("data").display()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();

    // The service loads the keys from the file `bulkhead jwks` writes.
    let jwks_path = tmp.path().join("jwks.json");
    let out = bulkhead(&[
        "jwks",
        "--config",
        config,
        "--out",
        jwks_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", text(&out));
    let url = format!("file://{}", jwks_path.display());
    let jwks = JwksSource::new(&url).unwrap().fetch().await.unwrap();
    let verifier = std::sync::Arc::new(
        Verifier::new(VerifierConfig::new("bulkhead", "palette"), &jwks).unwrap(),
    );
    let palette = ServiceState::new(verifier);
    let log = palette.log().clone();
    tokio::spawn(async move {
        axum::serve(listener, palette_router(palette))
            .await
            .unwrap();
    });

    let policy = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/lateral/policies/lateral.toml"
    );
    let run = |mode: &str| {
        let (config, mode) = (config.to_owned(), format!("mode={mode}"));
        let work = tmp.path().to_owned();
        tokio::task::spawn_blocking(move || {
            bulkhead(&[
                "run",
                bulkhead_tests::LATERAL,
                "--policy",
                policy,
                "--config",
                &config,
                "--param",
                &mode,
                "--tenant",
                "acme",
                "--subject",
                "ada",
                "--work-dir",
                work.join("jobs").to_str().unwrap(),
                "--cache-dir",
                work.join("cache").to_str().unwrap(),
            ])
        })
    };
    let out = run("allowed").await.unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        text(&out).contains("GET http://palette/v1/palette -> 200"),
        "{}",
        text(&out)
    );
    let received = log.snapshot();
    assert_eq!(received.len(), 1, "{received:#?}");
    let claims = received[0]
        .verdict
        .claims()
        .unwrap_or_else(|| panic!("the token did not verify: {:?}", received[0].verdict));
    assert_eq!(
        (
            claims.tenant.as_str(),
            claims.sub.as_str(),
            claims.aud.as_str()
        ),
        ("acme", "ada", "palette")
    );
    assert_eq!(claims.module, "lateral");
    // The guest never sees the token: not in anything it printed.
    let token = received[0].token.clone().unwrap();
    assert!(!text(&out).contains(&token));

    // A service the policy does not grant is refused, and the report says so.
    let out = run("payments").await.unwrap();
    assert!(text(&out).contains("refused"), "{}", text(&out));
    assert_eq!(log.len(), 1, "payments was reached through palette's log?");
}
