//! Attacks on the token layer and object-level access, sent over HTTP to
//! the service's API: locally to a service this process starts on loopback
//! (with tokens of two tenants, a revoked one, an expired one and one
//! without the scope, straight into its store), remotely to `--server` with
//! the tester's one token (the attacks that need no second identity).
//!
//! Held means every request got the refusal the API documents (401, 403,
//! 404, 400, 413, 429), nothing of another tenant's was disclosed, and,
//! where the suite can read the audit log, the denial was recorded.

use std::sync::Arc;
use std::time::Instant;

use serde_json::Value;

use crate::harness::evidence;
use crate::model::{ApiAttack, Attack, AttackResult, Check, hello_wasm, hostile_wasm, ms};
use bulkhead::api::{IssueRequest, new_token};
use bulkhead::config::ServeConfig;
use bulkhead::service::Service;

/// Where the API attacks go, and with which identities.
#[derive(Debug, Clone)]
pub struct Target {
    /// Public API base URL.
    pub base: String,
    /// The main tenant's token (may run `module`).
    pub token: String,
    /// A module `token` may run, if known.
    pub module: Option<String>,
    /// Identities only a local service can provide.
    pub local: Option<LocalIds>,
    http: reqwest::Client,
}

/// Extra identities and access of the local service.
#[derive(Debug, Clone)]
pub struct LocalIds {
    admin: String,
    admin_token: String,
    other_tenant: String,
    no_scope: String,
    revoked: String,
    expired: String,
    /// A call token the service's key ring signed for the main tenant.
    call_token: String,
    /// The service's data directory, where finished jobs' outputs live.
    data_dir: std::path::PathBuf,
    /// Its bound on one tenant's concurrent downloads.
    max_downloads: usize,
}

impl Target {
    /// A remote target: the tester's service and token.
    pub fn remote(base: &str, token: &str, module: Option<String>) -> Self {
        Self {
            base: base.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            module,
            local: None,
            http: client(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("an HTTP client without TLS builds")
}

/// A service started in this process for the local API attacks.
pub struct LocalService {
    service: Arc<Service>,
    target: Target,
    stop: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for LocalService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalService")
            .field("base", &self.target.base)
            .finish_non_exhaustive()
    }
}

/// The module the local service serves: the `hello` guest.
const MODULE: &str = "suite-hello";
/// A module whose jobs sleep until their 3 s wall-clock limit: a flood of
/// them outlasts the burst that submits it, whatever the machine's speed.
const SLEEPER: &str = "suite-sleep";
const SCOPE: &str = "suite-hello:run";

impl LocalService {
    /// Starts a service on loopback under `scratch/service`, serving
    /// `suite-hello`, with a small queue so a flood is refused quickly.
    ///
    /// # Errors
    /// A message if the service cannot start.
    pub async fn start(
        scratch: &std::path::Path,
        program: Option<std::path::PathBuf>,
    ) -> Result<Self, String> {
        let root = scratch.join("service");
        let policies = root.join("policies");
        let modules = root.join("modules");
        for d in [&policies, &modules] {
            bulkhead::sandbox::create_private_dir_all(d).map_err(|e| e.to_string())?;
        }
        let hello = hello_wasm();
        std::fs::write(modules.join(format!("{MODULE}.wasm")), hello).map_err(|e| e.to_string())?;
        let policy = format!(
            "version = 1\n[module]\nname = \"{MODULE}\"\nsha256 = \"{}\"\n[access]\nscopes = [\"{SCOPE}\"]\n",
            bulkhead::policy::Sha256Hex::digest(hello)
        );
        std::fs::write(policies.join(format!("{MODULE}.toml")), policy)
            .map_err(|e| e.to_string())?;
        let hostile = hostile_wasm();
        std::fs::write(modules.join(format!("{SLEEPER}.wasm")), hostile.as_slice())
            .map_err(|e| e.to_string())?;
        let sleeper = format!(
            "version = 1\n[module]\nname = \"{SLEEPER}\"\nsha256 = \"{}\"\n[access]\nscopes = [\"{SCOPE}\"]\n[limits]\ncpu_time = \"1 s\"\nwall_time = \"3 s\"\n[run]\nargs = [\"sleep\"]\n",
            bulkhead::policy::Sha256Hex::digest(hostile.as_slice())
        );
        std::fs::write(policies.join(format!("{SLEEPER}.toml")), sleeper)
            .map_err(|e| e.to_string())?;
        let mut config = ServeConfig::default();
        config.storage.data_dir = root.join("data");
        config.storage.work_dir = Some(root.join("work"));
        config.modules.policies_dir = policies;
        config.modules.modules_dir = modules;
        config.queue.workers = 2;
        // Its guests run in worker processes of the `bulkhead` binary.
        config.isolation.program = program;
        config.queue.max_queued_per_tenant = 4;
        config.queue.max_running_per_tenant = 1;
        config.server.max_body = bulkhead::policy::ByteSize::mib(1);
        // Every token-layer attack checks that its denial was audited, all
        // from one address within a minute: the suite's service writes
        // each one rather than counting them into a summary.
        config.audit.denials_per_client = u32::MAX;
        config.audit.denials_per_minute = u32::MAX;
        let service = Service::start(config, None)
            .await
            .map_err(|e| e.to_string())?;
        let admin_token = std::fs::read_to_string(root.join("data/admin.token"))
            .map_err(|e| e.to_string())?
            .trim()
            .to_owned();

        let issue = |tenant: &str, scope: &str, ttl: Option<&str>| {
            new_token(&IssueRequest {
                tenant: tenant.into(),
                subject: format!("{tenant}-suite"),
                scopes: vec![scope.into()],
                ttl: ttl.map(Into::into),
            })
        };
        let mut secrets = Vec::new();
        for (tenant, scope, kind) in [
            ("suite-a", SCOPE, "main"),
            ("suite-b", SCOPE, "other"),
            ("suite-a", "nothing:run", "no-scope"),
            ("suite-a", SCOPE, "revoked"),
            ("suite-a", SCOPE, "expired"),
        ] {
            let (secret, mut record) = issue(tenant, scope, None).map_err(|e| e.to_string())?;
            if kind == "expired" {
                record.expires_at = Some(record.created_at - 60);
            }
            service
                .store()
                .insert_token(&record)
                .await
                .map_err(|e| e.to_string())?;
            if kind == "revoked" {
                service
                    .store()
                    .revoke_token(&record.id)
                    .await
                    .map_err(|e| e.to_string())?;
            }
            secrets.push(secret);
        }

        let listeners = bulkhead::serve::Listeners::loopback()
            .await
            .map_err(|e| e.to_string())?;
        let (public, admin) = listeners.local_addrs().map_err(|e| e.to_string())?;
        let (base, admin_base) = (format!("http://{public}"), format!("http://{admin}"));
        let (stop, rx) = tokio::sync::watch::channel(false);
        let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        tokio::spawn(bulkhead::serve::serve(
            Arc::clone(&service),
            listeners,
            wait(rx),
        ));
        // A call token as the host mints them for a job of the main tenant:
        // an Ed25519 JWS the service's key ring signs, never a client
        // credential.
        let keys = service
            .keys()
            .ok_or("the service has no key ring for call tokens")?;
        let t = bulkhead::store::now_ms() as u64 / 1000;
        let call_token = keys
            .mint(&bulkhead_verify::CallClaims {
                iss: service.config().tokens.issuer.clone(),
                aud: MODULE.to_owned(),
                sub: "suite-a-suite".to_owned(),
                tenant: "suite-a".to_owned(),
                scopes: vec![SCOPE.to_owned()],
                job: uuid::Uuid::new_v4().to_string(),
                module: MODULE.to_owned(),
                iat: t,
                nbf: t,
                exp: t + 30,
                jti: uuid::Uuid::new_v4().to_string(),
            })
            .map_err(|e| e.to_string())?;
        let mut s = secrets.into_iter();
        let mut next = || s.next().expect("five tokens issued");
        let target = Target {
            base,
            token: next(),
            module: Some(MODULE.to_owned()),
            local: Some(LocalIds {
                admin: admin_base,
                admin_token,
                other_tenant: next(),
                no_scope: next(),
                revoked: next(),
                expired: next(),
                call_token,
                data_dir: service.config().storage.data_dir.clone(),
                max_downloads: service.config().server.max_downloads_per_tenant,
            }),
            http: client(),
        };
        Ok(Self {
            service,
            target,
            stop,
        })
    }

    /// Where the attacks go.
    pub fn target(&self) -> Target {
        self.target.clone()
    }

    /// Drains and stops the service.
    pub async fn stop(self) {
        self.service.shutdown().await;
        let _ = self.stop.send(true);
    }
}

/// The status of a request (0 if it could not be sent).
async fn status(req: reqwest::RequestBuilder) -> (u16, String) {
    match req.send().await {
        Ok(r) => {
            let s = r.status().as_u16();
            (s, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

fn expect(name: &str, got: (u16, &str), want: &[u16]) -> Check {
    let ok = want.contains(&got.0);
    Check::new(
        name,
        ok,
        format!(
            "{} {}",
            got.0,
            if ok {
                format!(
                    "as expected ({})",
                    want.iter()
                        .map(u16::to_string)
                        .collect::<Vec<_>>()
                        .join(" or ")
                )
            } else {
                format!(
                    "expected {:?}: {}",
                    want,
                    got.1.chars().take(200).collect::<String>()
                )
            }
        ),
    )
}

/// Whether the audit log (local only) has an entry `action` newer than `since`.
async fn audited(t: &Target, action: &str, since: i64) -> Option<Check> {
    let ids = t.local.as_ref()?;
    let r = t
        .http
        .get(format!("{}/admin/v1/audit?limit=200", ids.admin))
        .bearer_auth(&ids.admin_token)
        .send()
        .await
        .ok()?;
    let v: Value = r.json().await.ok()?;
    let entries = v
        .as_array()
        .cloned()
        .or_else(|| v["entries"].as_array().cloned())
        .unwrap_or_default();
    let found = entries
        .iter()
        .any(|e| e["action"] == action && e["at"].as_i64().unwrap_or(0) >= since);
    Some(Check::new(
        "audit",
        found,
        if found {
            format!("an `{action}` entry is in the audit log")
        } else {
            format!("no `{action}` entry in the audit log")
        },
    ))
}

/// Submits a hello job as `token` and waits for it; returns its id.
async fn submit(t: &Target, token: &str) -> Result<String, String> {
    submit_via(&t.http, t, token).await
}

/// [`submit`] over `http`.
async fn submit_via(http: &reqwest::Client, t: &Target, token: &str) -> Result<String, String> {
    let module = t.module.as_deref().ok_or("no module to run")?;
    let r = http
        .post(t.url(&format!("/v1/modules/{module}/jobs?wait=10s")))
        .bearer_auth(token)
        .header("content-type", "application/octet-stream")
        .body("x")
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let code = r.status();
    let v: Value = r.json().await.map_err(|e| e.to_string())?;
    match v["id"].as_str() {
        Some(id) if code.is_success() => Ok(id.to_owned()),
        _ => Err(format!("submit returned {code}: {v}")),
    }
}

/// Runs one API attack against `t`.
pub async fn run(t: &Target, attack: &Attack, a: &ApiAttack, started: Instant) -> AttackResult {
    let since = bulkhead::store::now_ms() - 1000;
    let result = match a {
        ApiAttack::Malformed => malformed(t, since).await,
        ApiAttack::Revoked => with_local(t, |ids| ids.revoked.clone(), "revoked", since).await,
        ApiAttack::Expired => with_local(t, |ids| ids.expired.clone(), "expired", since).await,
        ApiAttack::CrossTenant => cross_tenant(t).await,
        ApiAttack::AdminWithUserToken => admin_with_user(t).await,
        ApiAttack::TenantHeader => tenant_header(t).await,
        ApiAttack::ScopeMissing => scope_missing(t, since).await,
        ApiAttack::PathTricks => path_tricks(t).await,
        ApiAttack::Flood => flood(t).await,
        ApiAttack::HugeBody => huge_body(t).await,
        ApiAttack::CallTokenAtApi => {
            with_local(t, |ids| ids.call_token.clone(), "call", since).await
        }
        ApiAttack::DownloadFlood => downloads(t, false).await,
        ApiAttack::DownloadNeighbour => downloads(t, true).await,
    };
    match result {
        Ok((checks, stopped)) => AttackResult::judge(attack, checks, stopped, None, ms(started)),
        Err(e) => AttackResult::judge(attack, Vec::new(), String::new(), Some(e), ms(started)),
    }
}

type Outcome = Result<(Vec<Check>, String), String>;

async fn malformed(t: &Target, since: i64) -> Outcome {
    let url = t.url("/v1/jobs");
    let mut checks = Vec::new();
    let cases: Vec<(&str, reqwest::RequestBuilder)> = vec![
        ("no token", t.http.get(&url)),
        (
            "empty bearer",
            t.http.get(&url).header("authorization", "Bearer "),
        ),
        ("garbage", t.http.get(&url).bearer_auth("not-a-token")),
        ("prefix only", t.http.get(&url).bearer_auth("bkh_")),
        (
            "truncated",
            t.http.get(&url).bearer_auth(&t.token[..t.token.len() / 2]),
        ),
        (
            "one character changed",
            t.http.get(&url).bearer_auth(flip_last(&t.token)),
        ),
        (
            "basic scheme",
            t.http.get(&url).basic_auth("suite", Some(&t.token)),
        ),
        (
            "query string",
            t.http.get(format!("{url}?access_token={}", t.token)),
        ),
        (
            "cookie",
            t.http
                .get(&url)
                .header("cookie", format!("token={}", t.token)),
        ),
        (
            "two headers",
            t.http
                .get(&url)
                .header("authorization", "Bearer x")
                .header("authorization", format!("Bearer {}", t.token)),
        ),
    ];
    for (name, req) in cases {
        let (code, body) = status(req).await;
        checks.push(expect(name, (code, &body), &[400, 401]));
    }
    if let Some(c) = audited(t, "auth.denied", since).await {
        checks.push(c);
    }
    Ok((checks, "denied: 401".into()))
}

fn flip_last(token: &str) -> String {
    let mut s = token.to_owned();
    let last = s.pop().unwrap_or('a');
    s.push(if last == 'a' { 'b' } else { 'a' });
    s
}

async fn with_local(
    t: &Target,
    pick: impl Fn(&LocalIds) -> String,
    what: &str,
    since: i64,
) -> Outcome {
    let ids = t.local.as_ref().ok_or("needs the local service")?;
    let token = pick(ids);
    let mut checks = Vec::new();
    for (name, req) in [
        (
            "list jobs",
            t.http.get(t.url("/v1/jobs")).bearer_auth(&token),
        ),
        (
            "list modules",
            t.http.get(t.url("/v1/modules")).bearer_auth(&token),
        ),
        (
            "submit",
            t.http
                .post(t.url(&format!("/v1/modules/{MODULE}/jobs")))
                .bearer_auth(&token)
                .header("content-type", "application/octet-stream")
                .body("x"),
        ),
    ] {
        let (code, body) = status(req).await;
        checks.push(expect(
            &format!("{what} token: {name}"),
            (code, &body),
            &[401],
        ));
    }
    if let Some(c) = audited(t, "auth.denied", since).await {
        checks.push(c);
    }
    Ok((checks, "denied: 401".into()))
}

async fn cross_tenant(t: &Target) -> Outcome {
    let ids = t.local.as_ref().ok_or("needs the local service")?;
    let id = submit(t, &t.token).await?;
    let other = &ids.other_tenant;
    let mut checks = Vec::new();
    for (name, req, want) in [
        (
            "read",
            t.http
                .get(t.url(&format!("/v1/jobs/{id}")))
                .bearer_auth(other),
            404,
        ),
        (
            "download",
            t.http
                .get(t.url(&format!("/v1/jobs/{id}/outputs/anything")))
                .bearer_auth(other),
            404,
        ),
        (
            "cancel",
            t.http
                .post(t.url(&format!("/v1/jobs/{id}/cancel")))
                .bearer_auth(other),
            404,
        ),
        (
            "delete",
            t.http
                .delete(t.url(&format!("/v1/jobs/{id}")))
                .bearer_auth(other),
            404,
        ),
    ] {
        let (code, body) = status(req).await;
        checks.push(expect(
            &format!("other tenant: {name}"),
            (code, &body),
            &[want],
        ));
    }
    let (_, listing) = status(t.http.get(t.url("/v1/jobs")).bearer_auth(other)).await;
    checks.push(Check::new(
        "other tenant: list",
        !listing.contains(&id),
        if listing.contains(&id) {
            "the other tenant's listing shows the job".to_owned()
        } else {
            "the job is absent from the other tenant's listing".to_owned()
        },
    ));
    let (code, body) = status(
        t.http
            .get(t.url(&format!("/v1/jobs/{id}")))
            .bearer_auth(&t.token),
    )
    .await;
    checks.push(expect(
        "owner still sees it (not deleted)",
        (code, &body),
        &[200],
    ));
    Ok((
        checks,
        "denied: 404 (does not exist for another tenant)".into(),
    ))
}

async fn admin_with_user(t: &Target) -> Outcome {
    let ids = t.local.as_ref().ok_or("needs the local service")?;
    let mut checks = Vec::new();
    for (name, req) in [
        ("list tokens", t.http.get(format!("{}/admin/v1/tokens", ids.admin)).bearer_auth(&t.token)),
        ("issue a token", t.http.post(format!("{}/admin/v1/tokens", ids.admin)).bearer_auth(&t.token).json(&serde_json::json!({"tenant":"suite-a","subject":"x","scopes":["suite-hello:run"]}))),
        ("read audit", t.http.get(format!("{}/admin/v1/audit", ids.admin)).bearer_auth(&t.token)),
        ("metrics", t.http.get(format!("{}/metrics", ids.admin)).bearer_auth(&t.token)),
        ("admin path on the public listener", t.http.get(t.url("/admin/v1/tokens")).bearer_auth(&ids.admin_token)),
    ] {
        let (code, body) = status(req).await;
        checks.push(expect(name, (code, &body), &[401, 403, 404]));
    }
    Ok((checks, "denied: 401/403".into()))
}

async fn tenant_header(t: &Target) -> Outcome {
    let mut checks = Vec::new();
    for header in [
        "x-bulkhead-tenant",
        "x-bulkhead-subject",
        "x-bulkhead-scopes",
    ] {
        let (code, body) = status(
            t.http
                .get(t.url("/v1/jobs"))
                .bearer_auth(&t.token)
                .header(header, "suite-b"),
        )
        .await;
        checks.push(expect(header, (code, &body), &[400, 401, 403]));
    }
    let (code, body) = status(
        t.http
            .get(t.url("/v1/jobs"))
            .header("x-bulkhead-tenant", "suite-b"),
    )
    .await;
    checks.push(expect("header without a token", (code, &body), &[400, 401]));
    Ok((checks, "refused: identity only from the token".into()))
}

async fn scope_missing(t: &Target, since: i64) -> Outcome {
    let ids = t.local.as_ref().ok_or("needs the local service")?;
    let (code, body) = status(
        t.http
            .post(t.url(&format!("/v1/modules/{MODULE}/jobs?wait=5s")))
            .bearer_auth(&ids.no_scope)
            .header("content-type", "application/octet-stream")
            .body("x"),
    )
    .await;
    let mut checks = vec![expect(
        "submit without the scope",
        (code, &body),
        &[403, 404],
    )];
    let (_, modules) = status(t.http.get(t.url("/v1/modules")).bearer_auth(&ids.no_scope)).await;
    checks.push(Check::new(
        "module list",
        !modules.contains(MODULE),
        if modules.contains(MODULE) {
            "the module is listed to a token without its scope".to_owned()
        } else {
            "the module is not listed to a token without its scope".to_owned()
        },
    ));
    if let Some(c) = audited(t, "scope.denied", since).await {
        checks.push(c);
    }
    Ok((checks, format!("denied: {code}")))
}

async fn path_tricks(t: &Target) -> Outcome {
    let mut checks = Vec::new();
    for path in [
        "/v1/modules/..%2F..%2Fadmin/jobs",
        "/v1/modules/../../admin/v1/tokens",
        "/v1/jobs/..%2F..%2Fadmin%2Fv1%2Ftokens",
        "/v1/jobs/%2e%2e/outputs/x",
        "/v1/jobs/00000000-0000-0000-0000-000000000000/outputs/..%2F..%2F..%2Fetc%2Fpasswd",
        "/v1/jobs/00000000-0000-0000-0000-000000000000/outputs//etc/passwd",
        "//admin/v1/tokens",
    ] {
        let (code, body) = status(t.http.get(t.url(path)).bearer_auth(&t.token)).await;
        let leaked = body.contains("root:") || body.contains("\"hash\"") || body.contains("bkh_");
        checks.push(Check::new(
            path,
            !leaked && matches!(code, 400 | 401 | 403 | 404 | 405 | 422),
            format!(
                "{code}{}",
                if leaked {
                    ": the body disclosed secrets"
                } else {
                    ""
                }
            ),
        ));
    }
    Ok((checks, "refused: 4xx".into()))
}

async fn flood(t: &Target) -> Outcome {
    let ids = t.local.as_ref().ok_or("needs the local service")?;
    // Jobs that sleep for seconds: the tenant's one running slot and four
    // queue places fill at once, and everything beyond must be refused.
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..48 {
        let req = t
            .http
            .post(t.url(&format!("/v1/modules/{SLEEPER}/jobs")))
            .bearer_auth(&t.token);
        set.spawn(async move {
            match req.send().await {
                Ok(r) => {
                    let code = r.status().as_u16();
                    let retry = r.headers().contains_key("retry-after");
                    let id = r
                        .json::<Value>()
                        .await
                        .ok()
                        .and_then(|v| v["id"].as_str().map(str::to_owned));
                    (code, retry, id)
                }
                Err(_) => (0, false, None),
            }
        });
    }
    let mut codes = Vec::new();
    let mut retry_after = false;
    let mut accepted = Vec::new();
    while let Some(Ok((code, retry, id))) = set.join_next().await {
        codes.push(code);
        retry_after |= retry;
        if code == 202 {
            accepted.extend(id);
        }
    }
    // Leave nothing sleeping for the attacks that follow.
    for id in &accepted {
        let _ = t
            .http
            .post(t.url(&format!("/v1/jobs/{id}/cancel")))
            .bearer_auth(&t.token)
            .send()
            .await;
    }
    let refused = codes.iter().filter(|c| **c == 429).count();
    let mut checks = vec![Check::new(
        "backpressure",
        refused > 0 && retry_after,
        format!(
            "{refused} of {} submissions refused with 429{}",
            codes.len(),
            if retry_after { " and Retry-After" } else { "" }
        ),
    )];
    let other = submit(t, &ids.other_tenant).await;
    checks.push(Check::new(
        "other tenant served",
        other.is_ok(),
        match &other {
            Ok(id) => format!("the other tenant's job {id} ran during the flood"),
            Err(e) => format!("the other tenant was not served: {e}"),
        },
    ));
    Ok((checks, "refused: 429".into()))
}

async fn huge_body(t: &Target) -> Outcome {
    t.local.as_ref().ok_or("needs the local service")?;
    let (code, body) = status(
        t.http
            .post(t.url(&format!("/v1/modules/{MODULE}/jobs")))
            .bearer_auth(&t.token)
            .header("content-type", "application/octet-stream")
            .body(vec![0u8; 3 * 1024 * 1024]),
    )
    .await;
    let mut checks = vec![expect(
        "3 MiB body over a 1 MiB limit",
        (code, &body),
        &[413],
    )];
    // A new connection: the server may close the one the oversized body
    // arrived on, which says nothing about whether it still serves.
    let after = submit_via(&client(), t, &t.token).await;
    checks.push(Check::new(
        "still serving",
        after.is_ok(),
        match &after {
            Ok(id) => format!("a normal job ({id}) ran right after"),
            Err(e) => format!("the service did not serve a normal job after: {e}"),
        },
    ));
    Ok((checks, format!("refused: {code}")))
}

/// Size of the output the download attacks hold open.
const DOWNLOAD_BYTES: usize = 16 << 20;

/// Downloads opened at once by the download attacks.
const DOWNLOADS: usize = 24;

/// Resident memory the held downloads may add. Each holds one chunk and
/// its connection's buffers; read whole into memory, 16 of them would
/// hold 256 MiB.
const DOWNLOAD_MEMORY: u64 = 96 << 20;

/// Stores a finished job of `tenant` with one output `out.bin` of `size`
/// bytes, as the service's store and job directory hold them.
async fn stored_output(
    data_dir: &std::path::Path,
    tenant: &str,
    size: usize,
) -> Result<String, String> {
    use bulkhead::sandbox::{JobReport, OutputFile};
    use bulkhead::store::{JobRecord, JobState, JobStore as _};
    let id = uuid::Uuid::new_v4().to_string();
    let dir = data_dir.join("jobs").join(&id).join("outputs");
    bulkhead::sandbox::create_private_dir_all(&dir).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("out.bin"), vec![b'x'; size]).map_err(|e| e.to_string())?;
    let mut report = JobReport::not_run(&id, MODULE, "stored by the escape suite");
    report.outputs.push(OutputFile {
        name: "out.bin".to_owned(),
        size: size as u64,
        sha256: String::new(),
    });
    let now = bulkhead::store::now_ms();
    let job = JobRecord {
        id: id.clone(),
        tenant: tenant.into(),
        subject: format!("{tenant}-suite"),
        token_id: "suite".into(),
        module: MODULE.into(),
        module_sha256: String::new(),
        policy_sha256: None,
        params: Default::default(),
        inputs: Vec::new(),
        has_stdin: false,
        state: JobState::Failed,
        created_at: now,
        started_at: Some(now),
        finished_at: Some(now),
        attempts: 1,
        report: None,
    };
    bulkhead::store::SqliteStore::open(&data_dir.join("bulkhead.sqlite"))
        .await
        .map_err(|e| e.to_string())?
        .insert_finished_job(&job, &report, now, None)
        .await
        .map_err(|e| e.to_string())?;
    Ok(id)
}

/// Opens a download of `path` and reads only the first bytes of the
/// answer: a reader that then holds still. Returns its status and socket.
async fn held_download(
    addr: &str,
    path: &str,
    token: &str,
) -> Result<(u16, tokio::net::TcpStream), String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut conn = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    conn.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Bearer {token}\r\n\r\n")
            .as_bytes(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let mut head = [0u8; 16];
    let n = tokio::time::timeout(std::time::Duration::from_secs(10), conn.read(&mut head))
        .await
        .map_err(|_| "no answer within 10 s".to_owned())?
        .map_err(|e| e.to_string())?;
    let code = std::str::from_utf8(&head[..n])
        .ok()
        .and_then(|h| h.strip_prefix("HTTP/1.1 "))
        .and_then(|h| h.get(..3))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok((code, conn))
}

/// Slow readers of a 16 MiB output, more than the tenant may hold: the
/// excess is refused with 429, the ones served hold a chunk each (the
/// process's resident memory), and with `neighbour` another tenant's
/// download is served while they are held.
async fn downloads(t: &Target, neighbour: bool) -> Outcome {
    let ids = t.local.as_ref().ok_or("needs the local service")?;
    let big = stored_output(&ids.data_dir, "suite-a", DOWNLOAD_BYTES).await?;
    let small = stored_output(&ids.data_dir, "suite-b", 4096).await?;
    let addr = t
        .base
        .strip_prefix("http://")
        .ok_or("the local service speaks plain HTTP")?
        .to_owned();
    let before = evidence::rss();
    let mut held = Vec::new();
    let mut codes = Vec::new();
    for _ in 0..DOWNLOADS {
        let (code, conn) =
            held_download(&addr, &format!("/v1/jobs/{big}/outputs/out.bin"), &t.token).await?;
        codes.push(code);
        held.push(conn);
    }
    // The served ones fill their sockets and stop, or would have read the
    // whole output by now.
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    let grown = evidence::rss().saturating_sub(before);
    let other = if neighbour {
        let (code, body) = status(
            t.http
                .get(t.url(&format!("/v1/jobs/{small}/outputs/out.bin")))
                .bearer_auth(&ids.other_tenant),
        )
        .await;
        Some((code, body.len()))
    } else {
        None
    };
    drop(held);
    let served = codes.iter().filter(|c| **c == 200).count();
    let refused = codes.iter().filter(|c| **c == 429).count();
    // The edge may refuse some first (503: this address's connections
    // from earlier attacks still count): refused all the same.
    let at_edge = codes.iter().filter(|c| **c == 503).count();
    let mut checks = vec![Check::new(
        "per-tenant bound",
        served <= ids.max_downloads
            && served + refused + at_edge == DOWNLOADS
            && refused + at_edge > 0,
        format!(
            "{served} of {DOWNLOADS} downloads served, {refused} refused with 429, {at_edge} with 503 (bound {}); answers {codes:?}",
            ids.max_downloads
        ),
    )];
    checks.push(Check::new(
        "memory",
        grown < DOWNLOAD_MEMORY,
        format!(
            "resident memory grew {} KiB while {served} readers held a 16 MiB output (bound {} KiB)",
            grown >> 10,
            DOWNLOAD_MEMORY >> 10
        ),
    ));
    if let Some((code, len)) = other {
        checks.push(Check::new(
            "other tenant served",
            code == 200 && len == 4096,
            format!("the other tenant's download answered {code} with {len} bytes"),
        ));
    }
    Ok((checks, format!("refused: {refused} with 429")))
}
