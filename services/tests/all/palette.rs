use axum::Router;
use axum::response::Redirect;
use axum::routing::get;
use bulkhead_services::{Verdict, VerifyError, frame_colour, palette_router};
use serde_json::{Value, json};

use crate::support::*;

#[tokio::test]
async fn a_valid_token_gets_the_tenants_palette_and_is_logged() {
    let key = TestKey::generate("k1");
    let state = state("palette", &[&key]);
    let log = state.log().clone();
    let addr = serve(palette_router(state)).await;
    let token = key.mint("palette", "alice", "acme");

    let response = client()
        .get(format!("http://{addr}/v1/palette"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let headers = response.headers().clone();
    let body = response.text().await.unwrap();
    assert_not_echoed(&headers, &body, &token);
    let body: Value = serde_json::from_str(&body).unwrap();
    let frame = frame_colour("acme");
    assert_eq!(
        body,
        json!({"tenant": "acme", "subject": "alice", "frame": frame, "label": body["label"]})
    );
    assert!(body["label"].is_string());
    assert_eq!(frame.len(), 7);
    assert!(frame.starts_with('#') && frame[1..].chars().all(|c| c.is_ascii_hexdigit()));

    let received = log.snapshot();
    assert_eq!(received.len(), 1);
    let call = &received[0];
    assert_eq!(
        (call.method.as_str(), call.path.as_str()),
        ("GET", "/v1/palette")
    );
    assert_eq!(call.token.as_deref(), Some(token.as_str()));
    let claims = call.verdict.claims().expect("verified");
    assert_eq!(
        (
            claims.sub.as_str(),
            claims.tenant.as_str(),
            claims.aud.as_str()
        ),
        ("alice", "acme", "palette")
    );
    assert_eq!(log.verified().len(), 1);
}

#[tokio::test]
async fn identity_comes_only_from_the_token() {
    let key = TestKey::generate("k1");
    let addr = serve(palette_router(state("palette", &[&key]))).await;
    let response = client()
        .get(format!("http://{addr}/v1/palette?tenant=victim"))
        .bearer_auth(key.mint("palette", "alice", "acme"))
        .header("X-Bulkhead-Tenant", "victim")
        .header("X-Forwarded-User", "root")
        .send()
        .await
        .unwrap();
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["tenant"], "acme");
    assert_eq!(body["subject"], "alice");
    assert_eq!(body["frame"], frame_colour("acme"));
}

#[tokio::test]
async fn frames_are_stable_per_tenant_and_differ_between_tenants() {
    assert_eq!(frame_colour("acme"), frame_colour("acme"));
    assert_ne!(frame_colour("acme"), frame_colour("globex"));
    // Pinned: the frame must not change between builds.
    assert_eq!(frame_colour(""), "#222325");
}

async fn refused(token: Option<&str>, expected_code: &str, expected: Verdict) {
    let key = TestKey::generate("k1");
    let state = state("palette", &[&key]);
    let log = state.log().clone();
    let addr = serve(palette_router(state)).await;
    let mut request = client().get(format!("http://{addr}/v1/palette"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.unwrap();
    assert_eq!(response.status(), 401);
    assert!(
        response.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer")
    );
    let headers = response.headers().clone();
    let body = response.text().await.unwrap();
    if let Some(token) = token {
        assert_not_echoed(&headers, &body, token);
    }
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"]["code"], expected_code);
    assert!(body["error"]["message"].is_string());

    let received = log.snapshot();
    assert_eq!(received.len(), 1);
    assert_eq!(received[0].verdict, expected);
    assert_eq!(received[0].token.as_deref(), token);
    assert!(log.verified().is_empty());
}

#[tokio::test]
async fn no_token_is_401() {
    refused(None, "no_credentials", Verdict::NoCredentials).await;
}

#[tokio::test]
async fn a_forged_token_is_401() {
    let impostor = TestKey::generate("k1");
    let token = impostor.mint("palette", "alice", "acme");
    refused(
        Some(&token),
        "signature",
        Verdict::Rejected(VerifyError::Signature),
    )
    .await;
    refused(
        Some("x.y.z"),
        "malformed",
        Verdict::Rejected(VerifyError::Malformed),
    )
    .await;
}

#[tokio::test]
async fn a_token_for_another_service_is_401() {
    let key = TestKey::generate("k1");
    let state = state("palette", &[&key]);
    let log = state.log().clone();
    let addr = serve(palette_router(state)).await;
    let response = client()
        .get(format!("http://{addr}/v1/palette"))
        .bearer_auth(key.mint("payments", "alice", "acme"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "audience");
    assert_eq!(
        log.snapshot()[0].verdict,
        Verdict::Rejected(VerifyError::Audience)
    );
}

#[tokio::test]
async fn other_schemes_and_repeated_headers_are_no_credentials() {
    let key = TestKey::generate("k1");
    let state = state("palette", &[&key]);
    let log = state.log().clone();
    let addr = serve(palette_router(state)).await;
    let token = key.mint("palette", "alice", "acme");
    let url = format!("http://{addr}/v1/palette");

    let basic = client()
        .get(&url)
        .basic_auth("alice", Some("pw"))
        .send()
        .await
        .unwrap();
    assert_eq!(basic.status(), 401);
    let bare = client()
        .get(&url)
        .header("Authorization", token.as_str())
        .send()
        .await
        .unwrap();
    assert_eq!(bare.status(), 401);
    let twice = client()
        .get(&url)
        .header("Authorization", format!("Bearer {token}"))
        .header("Authorization", format!("Bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(twice.status(), 401);
    // The scheme is case-insensitive.
    let lower = client()
        .get(&url)
        .header("Authorization", format!("bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(lower.status(), 200);

    let verdicts: Vec<_> = log
        .snapshot()
        .into_iter()
        .map(|r| r.verdict.code())
        .collect();
    assert_eq!(
        verdicts,
        ["no_credentials", "no_credentials", "no_credentials", "ok"]
    );
}

#[tokio::test]
async fn unknown_paths_need_a_token_too() {
    let key = TestKey::generate("k1");
    let state = state("palette", &[&key]);
    let log = state.log().clone();
    let addr = serve(palette_router(state)).await;
    let url = format!("http://{addr}/admin");
    let anonymous = client().get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let known = client()
        .get(&url)
        .bearer_auth(key.mint("palette", "alice", "acme"))
        .send()
        .await
        .unwrap();
    assert_eq!(known.status(), 404);
    let wrong_method = client()
        .post(format!("http://{addr}/v1/palette"))
        .bearer_auth(key.mint("palette", "alice", "acme"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), 405);
    assert_eq!(log.len(), 3);
}

/// The host's tests add routes of their own (an open redirect to payments,
/// say) to the router palette serves.
#[tokio::test]
async fn extra_routes_can_be_merged() {
    let key = TestKey::generate("k1");
    let app = palette_router(state("palette", &[&key])).merge(Router::new().route(
        "/redirect",
        get(|| async { Redirect::temporary("http://127.0.0.1:1/v1/charge") }),
    ));
    let addr = serve(app).await;
    let response = client()
        .get(format!("http://{addr}/redirect"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 307);
    let still_protected = client()
        .get(format!("http://{addr}/v1/palette"))
        .send()
        .await
        .unwrap();
    assert_eq!(still_protected.status(), 401);
}

#[tokio::test]
async fn the_log_keeps_the_last_entries() {
    let key = TestKey::generate("k1");
    let log = bulkhead_services::CallLog::new(2);
    let state = state("palette", &[&key]).with_log(log.clone());
    let addr = serve(palette_router(state)).await;
    for path in ["/a", "/b", "/c"] {
        client()
            .get(format!("http://{addr}{path}"))
            .send()
            .await
            .unwrap();
    }
    let paths: Vec<_> = log.snapshot().into_iter().map(|r| r.path).collect();
    assert_eq!(paths, ["/b", "/c"]);
}
