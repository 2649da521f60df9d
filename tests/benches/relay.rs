//! What the outbound gate costs per call (BENCHMARKS.md, "Outbound calls").
//!
//! - `mint_token`: signing one call token (Ed25519, jsonwebtoken).
//! - `verify_token`: what a service pays to check it (`bulkhead-verify`).
//! - `call_direct`: a GET to a trivial loopback service with the same
//!   pooled hyper client the host uses, no gate: the baseline.
//! - `call_through_gate`: the same GET as a guest would make it
//!   (`http://palette/v1/palette`), through the job's egress
//!   (`CallGrant`, as the sandbox's `wasi:http` hooks hand it over): resolve,
//!   route check, budget, header stripping, minting, sending, the guarded
//!   response body. The difference from `call_direct` is the gate's cost.
//!
//! Run with `cargo bench -p bulkhead-tests --bench relay`.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bulkhead::job::egress::Egress;
use bulkhead::relay::{CallGrant, Caller, KeyRing, Relay, ServiceDecl, TokenConfig};
use bulkhead_verify::{CallClaims, Verifier, VerifierConfig};
use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use http_body_util::{BodyExt, Empty};

fn claims() -> CallClaims {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    CallClaims {
        iss: "bulkhead".into(),
        aud: "palette".into(),
        sub: "alice".into(),
        tenant: "acme".into(),
        scopes: vec!["framed:run".into()],
        job: "7d1c6a52-3f0e-4a39-9d53-1c8f6c3b1e11".into(),
        module: "framed".into(),
        iat: now,
        nbf: now,
        exp: now + 30,
        jti: "0b8f5c0e-7a51-4a53-b2a4-2f6d1d3c9e77".into(),
    }
}

fn tokens(c: &mut Criterion) {
    let keys = KeyRing::ephemeral();
    let claims = claims();
    let mut group = c.benchmark_group("relay");
    group.bench_function("mint_token", |b| b.iter(|| keys.mint(&claims).unwrap()));
    let token = keys.mint(&claims).unwrap();
    let verifier = Verifier::new(VerifierConfig::new("bulkhead", "palette"), &keys.jwks()).unwrap();
    // Each token is accepted once: every iteration verifies a fresh one
    // (minted outside the timing), as a service does.
    drop(token);
    let mut n = 0u64;
    group.bench_function("verify_token", |b| {
        b.iter_batched(
            || {
                n += 1;
                let mut fresh = claims.clone();
                fresh.jti = format!("jti-{n}");
                keys.mint(&fresh).unwrap()
            },
            |token| verifier.verify(&token).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn calls(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let addr = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = axum::Router::new().route(
            "/v1/palette",
            axum::routing::get(|| async { r##"{"frame":"#3366cc"}"## }),
        );
        tokio::spawn(axum::serve(listener, app).into_future());
        addr
    });

    let mut decl = ServiceDecl::example("palette", &format!("http://{addr}"));
    decl.max_calls = u32::MAX;
    let relay = Arc::new(
        Relay::new(
            vec![decl.clone()],
            Arc::new(KeyRing::ephemeral()),
            &TokenConfig::default(),
        )
        .unwrap(),
    );
    // A job holds at most `leak::MAX_TOKENS` live tokens (each searched
    // for in every answer), so the calls are spread over fresh grants, as
    // over successive jobs.
    let fresh_gate = || {
        let grant = Arc::new(CallGrant::new(
            Arc::clone(&relay),
            vec![decl.name.clone()],
            Ok(Caller {
                tenant: "acme".into(),
                subject: "alice".into(),
                scopes: vec!["framed:run".into()],
            }),
            "7d1c6a52-3f0e-4a39-9d53-1c8f6c3b1e11",
            "framed",
        ));
        grant.start(Instant::now() + Duration::from_secs(3600));
        grant
    };
    let mut gate = fresh_gate();
    let mut calls_on_gate = 0usize;

    let mut group = c.benchmark_group("relay");
    // The same client settings as the host's (`relay::send::client`).
    let mut connector = hyper_util::client::legacy::connect::HttpConnector::new();
    connector.set_nodelay(true);
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build::<_, Empty<Bytes>>(connector);
    let direct = format!("http://{addr}/v1/palette");
    group.bench_function("call_direct", |b| {
        b.iter(|| {
            rt.block_on(async {
                let req = http::Request::get(&direct)
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let resp = client.request(req).await.unwrap();
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.unwrap().to_bytes()
            })
        })
    });
    group.bench_function("call_through_gate", |b| {
        b.iter(|| {
            calls_on_gate += 1;
            if calls_on_gate == 32 {
                calls_on_gate = 0;
                gate = fresh_gate();
            }
            let req = http::Request::get("http://palette/v1/palette")
                .body(
                    Empty::<Bytes>::new()
                        .map_err(|never| match never {})
                        .boxed_unsync(),
                )
                .unwrap();
            let fut = Arc::clone(&gate).send(req);
            rt.block_on(async {
                let resp = fut.await.unwrap();
                assert_eq!(resp.status(), 200);
                resp.into_body().collect().await.unwrap().to_bytes()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, tokens, calls);
criterion_main!(benches);
