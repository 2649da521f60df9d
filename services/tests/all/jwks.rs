use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::response::Redirect;
use axum::routing::get;
use bulkhead_services::jwks::MAX_JWKS_BYTES;
use bulkhead_services::{
    JwksError, JwksSource, KeyRefresher, ServiceState, fetch_jwks, palette_router,
};
use bulkhead_verify::{JwkSet, Verifier, VerifierConfig, VerifyError};

use crate::support::*;

/// A stand-in for the host's JWKS endpoint whose key set the test changes,
/// counting the fetches.
#[derive(Clone)]
struct FakeHost {
    jwks: Arc<Mutex<JwkSet>>,
    fetches: Arc<AtomicUsize>,
}

impl FakeHost {
    async fn start(keys: &[&TestKey]) -> (Self, String) {
        let host = Self {
            jwks: Arc::new(Mutex::new(jwks(keys))),
            fetches: Arc::new(AtomicUsize::new(0)),
        };
        let app = Router::new()
            .route("/.well-known/jwks.json", get(serve_jwks))
            .route("/big", get(|| async { " ".repeat(MAX_JWKS_BYTES + 1) }))
            .route(
                "/moved",
                get(|| async { Redirect::temporary("/.well-known/jwks.json") }),
            )
            .route("/not-jwks", get(|| async { "{\"keys\": 1}" }))
            .with_state(host.clone());
        let addr = serve(app).await;
        (host, format!("http://{addr}"))
    }

    fn publish(&self, keys: &[&TestKey]) {
        *self.jwks.lock().unwrap() = jwks(keys);
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

async fn serve_jwks(State(host): State<FakeHost>) -> axum::Json<JwkSet> {
    host.fetches.fetch_add(1, Ordering::SeqCst);
    axum::Json(host.jwks.lock().unwrap().clone())
}

#[tokio::test]
async fn fetch_jwks_loads_a_key_set_a_verifier_accepts() {
    let key = TestKey::generate("k1");
    let (_host, base) = FakeHost::start(&[&key]).await;
    let jwks = fetch_jwks(&format!("{base}/.well-known/jwks.json"))
        .await
        .unwrap();
    let verifier = Verifier::new(VerifierConfig::new(ISSUER, "palette"), &jwks).unwrap();
    assert_eq!(verifier.key_ids(), ["k1"]);
    assert!(
        verifier
            .verify(&key.mint("palette", "alice", "acme"))
            .is_ok()
    );
}

#[tokio::test]
async fn fetch_jwks_refuses_bad_answers() {
    let key = TestKey::generate("k1");
    let (_host, base) = FakeHost::start(&[&key]).await;
    assert!(matches!(
        fetch_jwks(&format!("{base}/missing")).await,
        Err(JwksError::Status { status: 404, .. })
    ));
    assert!(matches!(
        fetch_jwks(&format!("{base}/moved")).await,
        Err(JwksError::Status { status: 307, .. })
    ));
    assert!(matches!(
        fetch_jwks(&format!("{base}/big")).await,
        Err(JwksError::TooLarge { .. })
    ));
    assert!(matches!(
        fetch_jwks(&format!("{base}/not-jwks")).await,
        Err(JwksError::Json { .. })
    ));
    for url in ["ftp://127.0.0.1/jwks", "not a url", "file://host/jwks.json"] {
        assert!(
            matches!(fetch_jwks(url).await, Err(JwksError::Url { .. })),
            "{url}"
        );
    }
    // A `file:` JWKS (what `bulkhead jwks` writes) is read, bounded, and
    // must be a JWKS like any other.
    assert!(matches!(
        fetch_jwks("file:///etc/passwd").await,
        Err(JwksError::Json { .. })
    ));
    assert!(matches!(
        fetch_jwks("file:///nonexistent/jwks.json").await,
        Err(JwksError::File { .. })
    ));
    let big = std::env::temp_dir().join(format!("bulkhead-big-jwks-{}", std::process::id()));
    std::fs::write(&big, vec![b' '; 64 * 1024 + 1]).unwrap();
    let too_large = fetch_jwks(&format!("file://{}", big.display())).await;
    std::fs::remove_file(&big).unwrap();
    assert!(matches!(too_large, Err(JwksError::TooLarge { .. })));
}

/// The host rotates: it publishes a new key and mints with it. The first
/// token with the new `kid` makes palette fetch the JWKS again, once.
#[tokio::test]
async fn an_unknown_kid_refreshes_the_keys_once_per_interval() {
    let old = TestKey::generate("2026-10");
    let new = TestKey::generate("2026-11");
    let (host, base) = FakeHost::start(&[&old]).await;
    let source = JwksSource::new(&format!("{base}/.well-known/jwks.json")).unwrap();
    let verifier = Arc::new(
        Verifier::new(
            VerifierConfig::new(ISSUER, "palette"),
            &source.fetch().await.unwrap(),
        )
        .unwrap(),
    );
    let refresher = Arc::new(KeyRefresher::new(
        source,
        Arc::clone(&verifier),
        Duration::from_secs(3600),
    ));
    let state = ServiceState::new(verifier).with_refresher(refresher);
    let log = state.log().clone();
    let addr = serve(palette_router(state)).await;
    let url = format!("http://{addr}/v1/palette");
    assert_eq!(host.fetches(), 1);

    host.publish(&[&old, &new]);
    let response = client()
        .get(&url)
        .bearer_auth(new.mint("palette", "alice", "acme"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(host.fetches(), 2);

    // Made-up kids do not make it fetch again within the interval.
    for i in 0..5 {
        let stranger = TestKey::generate(&format!("made-up-{i}"));
        let response = client()
            .get(&url)
            .bearer_auth(stranger.mint("palette", "alice", "acme"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401);
    }
    assert_eq!(host.fetches(), 2);
    let verdicts: Vec<_> = log
        .snapshot()
        .into_iter()
        .map(|r| r.verdict.code())
        .collect();
    assert_eq!(verdicts[0], "ok");
    assert!(verdicts[1..].iter().all(|code| *code == "unknown_key"));
}

/// After the grace period the host drops the old key; the periodic refresh
/// picks that up and tokens signed with it stop working.
#[tokio::test]
async fn the_periodic_refresh_drops_a_retired_key() {
    let old = TestKey::generate("2026-10");
    let new = TestKey::generate("2026-11");
    let (host, base) = FakeHost::start(&[&old, &new]).await;
    let source = JwksSource::new(&format!("{base}/.well-known/jwks.json")).unwrap();
    let verifier = Arc::new(
        Verifier::new(
            VerifierConfig::new(ISSUER, "palette"),
            &source.fetch().await.unwrap(),
        )
        .unwrap(),
    );
    let refresher = Arc::new(KeyRefresher::new(
        source,
        Arc::clone(&verifier),
        Duration::from_secs(3600),
    ));
    let old_token = old.mint("palette", "alice", "acme");
    assert!(verifier.verify(&old_token).is_ok());

    host.publish(&[&new]);
    let task = refresher.spawn_periodic(Duration::from_millis(20));
    // Bounded wait for the refresh to land; no timing is asserted.
    for _ in 0..500 {
        if verifier.key_ids() == ["2026-11"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    task.abort();
    assert_eq!(verifier.key_ids(), ["2026-11"]);
    assert_eq!(verifier.verify(&old_token), Err(VerifyError::UnknownKey));
    assert!(
        verifier
            .verify(&new.mint("palette", "alice", "acme"))
            .is_ok()
    );
}

#[tokio::test]
async fn a_refused_key_set_keeps_the_current_keys() {
    let key = TestKey::generate("k1");
    let (host, base) = FakeHost::start(&[&key]).await;
    let source = JwksSource::new(&format!("{base}/.well-known/jwks.json")).unwrap();
    let verifier = Arc::new(
        Verifier::new(
            VerifierConfig::new(ISSUER, "palette"),
            &source.fetch().await.unwrap(),
        )
        .unwrap(),
    );
    let refresher = KeyRefresher::new(source, Arc::clone(&verifier), Duration::ZERO);
    host.publish(&[]);
    assert!(matches!(
        refresher.refresh().await,
        Err(JwksError::Keys { .. })
    ));
    assert!(!refresher.refresh_if_due().await);
    assert_eq!(verifier.key_ids(), ["k1"]);
}
