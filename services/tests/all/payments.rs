use bulkhead_services::{Verdict, VerifyError, palette_router, payments_router};
use serde_json::Value;

use crate::support::*;

#[tokio::test]
async fn payments_serves_its_own_audience() {
    let key = TestKey::generate("k1");
    let addr = serve(payments_router(state("payments", &[&key]))).await;
    let token = key.mint("payments", "alice", "acme");

    let balance = client()
        .get(format!("http://{addr}/v1/balance"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(balance.status(), 200);
    let headers = balance.headers().clone();
    let body = balance.text().await.unwrap();
    assert_not_echoed(&headers, &body, &token);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["tenant"], "acme");
    assert_eq!(body["subject"], "alice");

    // The host mints a token per request; the one just used is spent.
    let again = client()
        .post(format!("http://{addr}/v1/charge"))
        .bearer_auth(&token)
        .body("{\"amount_cents\": 100}")
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 401);
    let charge = client()
        .post(format!("http://{addr}/v1/charge"))
        .bearer_auth(key.mint("payments", "alice", "acme"))
        .body("{\"amount_cents\": 100}")
        .send()
        .await
        .unwrap();
    assert_eq!(charge.status(), 200);
    let body: Value = charge.json().await.unwrap();
    assert_eq!(body["charged"], true);
    assert_eq!(body["job"], "job-7");
}

/// What the host's end-to-end test does: take the token palette received
/// and replay it at payments.
#[tokio::test]
async fn a_token_palette_received_is_refused_at_payments() {
    let key = TestKey::generate("k1");
    let palette = state("palette", &[&key]);
    let palette_log = palette.log().clone();
    let payments = state("payments", &[&key]);
    let payments_log = payments.log().clone();
    let palette_addr = serve(palette_router(palette)).await;
    let payments_addr = serve(payments_router(payments)).await;
    assert!(payments_log.is_empty());

    let response = client()
        .get(format!("http://{palette_addr}/v1/palette"))
        .bearer_auth(key.mint("palette", "alice", "acme"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(payments_log.is_empty(), "payments received nothing");

    let stolen = palette_log.snapshot()[0]
        .token
        .clone()
        .expect("palette saw a token");
    for (method, path) in [("GET", "/v1/balance"), ("POST", "/v1/charge")] {
        let response = client()
            .request(
                method.parse().unwrap(),
                format!("http://{payments_addr}{path}"),
            )
            .bearer_auth(&stolen)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 401, "{method} {path}");
    }
    let received = payments_log.snapshot();
    assert_eq!(received.len(), 2);
    assert!(
        received
            .iter()
            .all(|r| r.verdict == Verdict::Rejected(VerifyError::Audience))
    );
    assert!(payments_log.verified().is_empty());
}
