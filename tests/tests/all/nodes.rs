//! Several real `bulkhead serve` nodes on one PostgreSQL database: a token
//! revoked through one node is refused by the others at once; a call token
//! minted on one node verifies against another node's JWKS, before and
//! after a rotation; admin and audit see every node; a node that loses
//! its database is not ready until the database returns.
//!
//! Verdicts come from the host side: the nodes' HTTP answers, what the
//! internal service received and how it judged it, the shared store's rows
//! as the admin API lists them.

use std::time::Duration;

use bulkhead::policy::HumanDuration;
use bulkhead::store::pg_server::PgServer;
use bulkhead_services::{CallLog, ServiceState, palette_router};
use bulkhead_verify::{JwkSet, Verifier, VerifierConfig};
use serde_json::Value;

use crate::common::{Cluster, ConfigFile, hello, json, policy};

/// Polls `check` every 100 ms until it returns `Some`, for at most
/// `within`; panics with `what` otherwise.
async fn eventually<T, F: std::future::Future<Output = Option<T>>>(
    within: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "never: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn jwks(base: &str) -> JwkSet {
    bulkhead_services::fetch_jwks(&format!("{base}/.well-known/jwks.json"))
        .await
        .unwrap()
}

fn kids(set: &JwkSet) -> Vec<String> {
    set.keys
        .iter()
        .filter_map(|k| k.common.key_id.clone())
        .collect()
}

async fn active_kid(cluster: &Cluster, i: usize) -> String {
    let keys = json(cluster.admin_get(i, "/admin/v1/keys")).await;
    keys.as_array()
        .unwrap()
        .iter()
        .find(|k| k["active"] == true && k.get("node").is_none())
        .unwrap()["kid"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_token_revoked_through_one_node_is_refused_by_another_at_once() {
    let Some(cluster) = Cluster::start(
        2,
        &ConfigFile {
            policies: vec![hello()],
            queue: "workers = 1",
            ..ConfigFile::default()
        },
        "",
    )
    .await
    else {
        return;
    };
    let (token, id) = cluster.token(0, "acme", &["hello:run"]).await;
    let (_, other) = cluster.token(1, "acme", &["hello:run"]).await;
    let modules = |i: usize| {
        cluster
            .http
            .get(format!("{}/v1/modules", cluster.base(i)))
            .bearer_auth(&token)
            .send()
    };
    assert_eq!(modules(1).await.unwrap().status(), 200);
    assert_eq!(modules(0).await.unwrap().status(), 200);

    let resp = cluster
        .admin_post(0, &format!("/admin/v1/tokens/{id}/revoke"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    // The very next request to the other node: no cache to wait out.
    assert_eq!(modules(1).await.unwrap().status(), 401);
    assert_eq!(modules(0).await.unwrap().status(), 401);

    // Both nodes list the token revoked, and the audit entries either node
    // wrote.
    for i in 0..2 {
        let tokens = json(cluster.admin_get(i, "/admin/v1/tokens")).await;
        let record = tokens
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["id"] == id.as_str())
            .unwrap()
            .clone();
        assert_eq!(record["revoked"], true, "node {i}");
        let audit = json(cluster.admin_get(i, "/admin/v1/audit?limit=1000")).await;
        let actions: Vec<&str> = audit
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["detail"].as_str().unwrap_or("").contains(id.as_str()))
            .filter_map(|e| e["action"].as_str())
            .collect();
        assert!(
            actions.contains(&"token.issued") && actions.contains(&"token.revoked"),
            "node {i}: {actions:?}"
        );
        // And the one the other node wrote.
        assert!(
            audit
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["action"] == "token.issued"
                    && e["detail"].as_str().unwrap_or("").contains(other.as_str())),
            "node {i}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_node_registry_lists_every_node_and_a_stopped_nodes_key_stays_published() {
    let Some(cluster) = Cluster::start(
        2,
        &ConfigFile {
            policies: vec![hello()],
            queue: "workers = 1",
            ..ConfigFile::default()
        },
        "",
    )
    .await
    else {
        return;
    };
    let listed = eventually(Duration::from_secs(30), "both nodes listed", || async {
        let nodes = json(cluster.admin_get(1, "/admin/v1/nodes")).await;
        let nodes = nodes.as_array().unwrap().clone();
        (nodes.iter().filter(|n| n["live"] == true).count() == 2).then_some(nodes)
    })
    .await;
    for (i, node) in cluster.nodes.iter().enumerate() {
        let row = listed
            .iter()
            .find(|n| n["name"] == format!("node-{i}"))
            .unwrap_or_else(|| panic!("node-{i} in {listed:#?}"));
        assert!(
            row["id"]
                .as_str()
                .unwrap()
                .starts_with(&format!("node-{i}-"))
        );
        let addresses: Vec<&str> = row["addresses"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            addresses,
            vec![node.public.to_string(), node.admin.to_string()]
        );
        assert_eq!(row["this"], i == 1, "{row}");
    }

    // Node 0 dies: node 1 lists it stale, and keeps serving its key (a
    // token it signed just before may still be in flight).
    let kid0 = active_kid(&cluster, 0).await;
    let mut cluster = cluster;
    drop(cluster.nodes.remove(0));
    let listed = eventually(Duration::from_secs(60), "node-0 listed stale", || async {
        let nodes = json(cluster.admin_get(0, "/admin/v1/nodes")).await;
        let nodes = nodes.as_array().unwrap().clone();
        nodes
            .iter()
            .any(|n| n["name"] == "node-0" && n["live"] == false)
            .then_some(nodes)
    })
    .await;
    assert!(
        listed
            .iter()
            .any(|n| n["name"] == "node-1" && n["live"] == true),
        "{listed:#?}"
    );
    assert!(kids(&jwks(&cluster.base(0)).await).contains(&kid0));
}

/// Palette on loopback, verifying call tokens against `keys`.
async fn palette(keys: &JwkSet) -> (String, CallLog, std::sync::Arc<Verifier>) {
    let verifier = std::sync::Arc::new(
        Verifier::new(VerifierConfig::new("bulkhead", "palette"), keys).unwrap(),
    );
    let state = ServiceState::new(std::sync::Arc::clone(&verifier));
    let log = state.log().clone();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(axum::serve(listener, palette_router(state)).into_future());
    (url, log, verifier)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_call_token_minted_on_one_node_verifies_against_another_nodes_keys_through_a_rotation() {
    // Palette must be declared before the nodes start, and pin node 1's
    // keys once they hold node 0's: it starts with a throwaway key, and
    // takes the real set below.
    let throwaway = bulkhead::relay::KeyRing::ephemeral().jwks();
    let (palette_url, log, verifier) = palette(&throwaway).await;
    let tables =
        format!("[[services]]\nname = \"palette\"\nurl = \"{palette_url}\"\npaths = [\"/v1/\"]\n");
    let Some(cluster) = Cluster::start(
        2,
        &ConfigFile {
            policies: vec![
                policy(bulkhead_tests::LATERAL, "lateral")
                    .scopes(&["lateral:run"])
                    .times(HumanDuration::secs(5), HumanDuration::secs(20))
                    .params(&["mode", "port", "count"])
                    .services(&["palette"]),
            ],
            queue: "workers = 1",
            ..ConfigFile::default()
        },
        &tables,
    )
    .await
    else {
        return;
    };
    let kid0 = active_kid(&cluster, 0).await;
    let kid1 = active_kid(&cluster, 1).await;
    assert_ne!(kid0, kid1, "each node has its own key");

    // Node 1 serves node 0's key (and its own) from the store.
    let set = eventually(
        Duration::from_secs(30),
        "node 1 serves node 0's key",
        || async {
            let set = jwks(&cluster.base(1)).await;
            kids(&set).contains(&kid0).then_some(set)
        },
    )
    .await;
    assert!(kids(&set).contains(&kid1));
    assert!(
        set.keys
            .iter()
            .all(|k| !serde_json::to_string(k).unwrap().contains("\"d\"")),
        "no private part is published"
    );
    verifier.update_keys(&set).unwrap();

    let (token, _) = cluster.token(0, "acme", &["lateral:run"]).await;
    let call = |n: usize| {
        let cluster = &cluster;
        let token = &token;
        async move {
            // Any node takes any job: the other node is stopped while this
            // one runs it, so the token is minted here.
            let other = cluster.nodes[1 - n].pid() as i32;
            // SAFETY: signalling our own child process.
            assert_eq!(unsafe { libc::kill(other, libc::SIGSTOP) }, 0);
            let resp = cluster
                .http
                .post(format!(
                    "{}/v1/modules/lateral/jobs?wait=30s&param.mode=allowed&param.port=1&param.count=1",
                    cluster.base(n)
                ))
                .bearer_auth(token)
                .send()
                .await
                .unwrap();
            // SAFETY: as above.
            assert_eq!(unsafe { libc::kill(other, libc::SIGCONT) }, 0);
            assert_eq!(resp.status(), 200);
            let job: Value = resp.json().await.unwrap();
            job["report"]["stdout"]["text"].as_str().unwrap().to_owned()
        }
    };
    // A job on node 0: palette, pinning node 1's JWKS, accepts its token.
    let out = call(0).await;
    assert!(out.contains("status 200"), "{out}");
    let received = log.snapshot().last().unwrap().clone();
    assert_eq!(received.verdict.code(), "ok", "{received:?}");
    let minted = received.token.unwrap();
    let header = jsonwebtoken::decode_header(&minted).unwrap();
    assert_eq!(header.kid.as_deref(), Some(kid0.as_str()));

    // Node 0 rotates: node 1 serves the new key and keeps the old one for
    // its grace, so the token minted before still verifies.
    let rotated = json(cluster.admin_post(0, "/admin/v1/keys/rotate")).await;
    let new0 = rotated["kid"].as_str().unwrap().to_owned();
    assert_ne!(new0, kid0);
    let set = eventually(
        Duration::from_secs(30),
        "node 1 serves node 0's new key",
        || async {
            let set = jwks(&cluster.base(1)).await;
            kids(&set).contains(&new0).then_some(set)
        },
    )
    .await;
    assert!(kids(&set).contains(&kid0), "{:?}", kids(&set));
    Verifier::new(VerifierConfig::new("bulkhead", "palette"), &set)
        .unwrap()
        .verify(&minted)
        .unwrap();
    verifier.update_keys(&set).unwrap();
    let out = call(0).await;
    assert!(out.contains("status 200"), "{out}");
    let received = log.snapshot().last().unwrap().clone();
    assert_eq!(received.verdict.code(), "ok", "{received:?}");
    let header = jsonwebtoken::decode_header(received.token.as_deref().unwrap()).unwrap();
    assert_eq!(header.kid.as_deref(), Some(new0.as_str()));

    // The rotation node 0 audited is in node 1's audit listing.
    let audit = json(cluster.admin_get(1, "/admin/v1/audit?limit=1000")).await;
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "key.rotated"
                && e["detail"].as_str().unwrap().contains(new0.as_str())),
        "{audit:#}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_node_that_loses_its_database_is_not_ready_until_it_returns() {
    let Some(mut server) = PgServer::start_own() else {
        return;
    };
    let url = server.fresh_database().await;
    let cluster = Cluster::start_on(
        url,
        1,
        &ConfigFile {
            policies: vec![hello()],
            queue: "workers = 1",
            ..ConfigFile::default()
        },
        "",
    );
    let (token, _) = cluster.token(0, "acme", &["hello:run"]).await;
    let ready = || async {
        cluster
            .http
            .get(format!("{}/readyz", cluster.base(0)))
            .send()
            .await
            .unwrap()
            .status()
    };
    let submit = || async {
        cluster
            .http
            .post(format!(
                "{}/v1/modules/hello/jobs?wait=30s",
                cluster.base(0)
            ))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
    };
    assert_eq!(ready().await, 200);
    let resp = submit().await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["state"], "succeeded");

    server.stop();
    // The heartbeat finds the database gone, with no request needed.
    eventually(
        Duration::from_secs(60),
        "not ready without the database",
        || async { (ready().await == 503).then_some(()) },
    )
    .await;
    // A request meanwhile is refused as unavailable, not failed.
    assert_eq!(submit().await.status(), 503);

    server.start();
    eventually(Duration::from_secs(60), "ready again", || async {
        (ready().await == 200).then_some(())
    })
    .await;
    let resp = submit().await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["state"], "succeeded");
    // Nothing is left half-claimed: every job of the tenant has finished.
    let jobs = json(
        cluster
            .http
            .get(format!("{}/v1/jobs", cluster.base(0)))
            .bearer_auth(&token),
    )
    .await;
    let states: Vec<&str> = jobs
        .as_array()
        .unwrap_or_else(|| panic!("{jobs:#}"))
        .iter()
        .filter_map(|j| j["state"].as_str())
        .collect();
    assert!(states.iter().all(|s| *s == "succeeded"), "{states:?}");
}
