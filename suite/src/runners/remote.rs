//! Running attacks against a running service (`--server URL --token T`).
//!
//! The service must serve the suite's modules: [`export_modules`] writes a
//! policy and a module per attack (`escape-<id>`, plus `escape-neighbour`,
//! all requiring the [`SUITE_SCOPE`](crate::SUITE_SCOPE)) for its
//! `policies_dir` and `modules_dir`. Each attack is submitted as a job with
//! `?wait=`, a well-behaved neighbour job beside it, and judged from the
//! job reports: the limit that fired, resource use against the policy's
//! bounds, anything looted into `/out`, secrets in the captured output.
//! Host-side evidence that needs the host itself (canaries, descriptors,
//! sockets) is not observable from here and is reported as such.

use std::path::Path;
use std::time::Instant;

use serde_json::Value;

use crate::families::api::{self, Target};
use crate::families::forge;
use crate::harness::{self, Base, evidence};
use crate::model::{
    Attack, AttackKind, AttackResult, BUNDLED, Check, Expect, GuestRun, Param, Progress,
    SUITE_SCOPE, SuiteError, SuiteOptions, attempt_evidence, hello_wasm, module_name, ms,
};
use bulkhead::policy::Policy;
use bulkhead::sandbox::{JobReport, Outcome};

/// The neighbour module's name on a service.
pub const NEIGHBOUR: &str = "escape-neighbour";

/// Writes `<dir>/policies/<module>.toml` and `<dir>/modules/<module>.wasm`
/// for every attack that runs remotely, plus the neighbour, under `options`'
/// limits; returns how many modules were written.
///
/// # Errors
/// A bad `--policy`, or a directory that cannot be written.
pub fn export_modules(options: &SuiteOptions, dir: &Path) -> Result<usize, SuiteError> {
    let base = Base::from_options(options)?;
    let policies = dir.join("policies");
    let modules = dir.join("modules");
    std::fs::create_dir_all(&policies)?;
    std::fs::create_dir_all(&modules)?;
    let mut n = 0;
    let mut write = |name: &str, wasm: &[u8], run: Option<&GuestRun>| -> Result<(), SuiteError> {
        let text = base.policy_text(name, wasm, run, &[]);
        harness::parse(&text).map_err(SuiteError::Setup)?;
        std::fs::write(policies.join(format!("{name}.toml")), text)?;
        std::fs::write(modules.join(format!("{name}.wasm")), wasm)?;
        n += 1;
        Ok(())
    };
    write(NEIGHBOUR, hello_wasm(), None)?;
    for attack in super::select(&SuiteOptions {
        server: Some(String::new()),
        ..options.clone()
    })? {
        if let AttackKind::Guest(run) = &attack.kind {
            write(&module_name(&attack.id), &run.wasm, Some(run))?;
        }
    }
    Ok(n)
}

/// Runs every attack against `options.server`.
pub async fn run(
    options: &SuiteOptions,
    attacks: &[Attack],
    progress: &mut dyn FnMut(Progress<'_>),
) -> Result<Vec<AttackResult>, SuiteError> {
    let url = options.server.as_deref().unwrap_or_default();
    let token = options
        .token
        .as_deref()
        .ok_or_else(|| SuiteError::Setup("--server needs --token".into()))?;
    let base = Base::from_options(options)?;
    let hello = hello_wasm();
    let bounds_policy = harness::parse(&base.policy_text("suite-bounds", hello, None, &[]))
        .map_err(SuiteError::Setup)?;
    let target = Target::remote(url, token, Some(NEIGHBOUR.to_owned()));
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(120))
        .build()
        .map_err(|e| SuiteError::Setup(e.to_string()))?;
    // The service must know the suite's modules and the token may run them.
    let modules = http
        .get(format!("{}/v1/modules", target.base))
        .bearer_auth(token)
        .send()
        .await
        .map_err(|e| SuiteError::Setup(format!("cannot reach {url}: {e}")))?;
    let status = modules.status();
    let listing = modules.text().await.unwrap_or_default();
    if !status.is_success() || !listing.contains(NEIGHBOUR) {
        return Err(SuiteError::Setup(format!(
            "{url} does not serve the suite's modules to this token ({status}); export them with \
             `bulkhead escape-suite --export DIR`, point the service's policies_dir and modules_dir \
             at DIR/policies and DIR/modules, and use a token with the `{}` scope",
            SUITE_SCOPE
        )));
    }
    let mut results = Vec::new();
    let mut jwks = None;
    for (index, attack) in attacks.iter().enumerate() {
        progress(Progress::Start {
            index,
            total: attacks.len(),
            id: &attack.id,
        });
        let started = Instant::now();
        let result = match &attack.kind {
            AttackKind::Guest(run) => {
                guest(&http, &target, &bounds_policy, attack, run, started).await
            }
            AttackKind::Api(a) => api::run(&target, attack, a, started).await,
            AttackKind::Forge(f) => {
                if jwks.is_none() {
                    jwks = Some(fetch_jwks(&http, &target.base).await);
                }
                match jwks.as_ref().expect("just set") {
                    Ok(set) => {
                        let t = forge::ForgeTarget {
                            jwks: set.clone(),
                            jwks_source: format!("{}/.well-known/jwks.json", target.base),
                            issuer: bulkhead::relay::TokenConfig::default().issuer,
                            host_key: None,
                            minted: None,
                        };
                        forge::run(&t, attack, *f, started)
                    }
                    Err(e) => AttackResult::judge(
                        attack,
                        Vec::new(),
                        String::new(),
                        Some(e.clone()),
                        ms(started),
                    ),
                }
            }
            _ => AttackResult::judge(
                attack,
                Vec::new(),
                String::new(),
                Some("runs only locally".into()),
                0.0,
            ),
        };
        progress(Progress::Done(&result));
        results.push(result);
    }
    Ok(results)
}

/// The service's published call-token keys.
async fn fetch_jwks(http: &reqwest::Client, base: &str) -> Result<bulkhead_verify::JwkSet, String> {
    let url = format!("{base}/.well-known/jwks.json");
    let r = http
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("cannot fetch {url}: {e}"))?;
    if !r.status().is_success() {
        return Err(format!("{url} answered {}", r.status()));
    }
    r.json()
        .await
        .map_err(|e| format!("{url} is not a JWK set: {e}"))
}

async fn submit(
    http: &reqwest::Client,
    t: &Target,
    module: &str,
    run: Option<(&GuestRun, &str)>,
) -> Result<JobReport, String> {
    let mut url = format!("{}/v1/modules/{module}/jobs?wait=60s", t.base);
    let mut body = Vec::new();
    if let Some((run, secret)) = run {
        for (k, p) in &run.params {
            let v = match p {
                Param::Lit(s) => s.clone(),
                // The host's own files: the suite cannot plant a canary on a
                // remote host, so it aims at files every host has.
                Param::CanaryFile => "/etc/passwd".into(),
                Param::CanaryDir => "/etc".into(),
                Param::BaitPort => t
                    .base
                    .rsplit(':')
                    .next()
                    .unwrap_or("80")
                    .trim_end_matches('/')
                    .to_owned(),
                Param::Secret => secret.to_owned(),
                // The suite's bait services exist only in a local run.
                Param::ServicePort => "0".into(),
            };
            url.push_str(&format!("&param.{k}={}", urlencode(&v)));
        }
        if let Some((name, data)) = run.inputs.first() {
            url.push_str(&format!("&input={name}"));
            body = data.clone();
        }
    }
    let r = http
        .post(url)
        .bearer_auth(&t.token)
        .header("content-type", "application/octet-stream")
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let code = r.status();
    let v: Value = r.json().await.map_err(|e| e.to_string())?;
    if !code.is_success() {
        return Err(format!("submission refused with {code}: {v}"));
    }
    serde_json::from_value(v["report"].clone())
        .map_err(|e| format!("no report in the job ({e}): {v}"))
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect()
}

async fn guest(
    http: &reqwest::Client,
    t: &Target,
    bounds: &Policy,
    attack: &Attack,
    run: &GuestRun,
    started: Instant,
) -> AttackResult {
    let secret = evidence::random_token("BULKHEAD-SECRET");
    let module = module_name(&attack.id);
    let (report, neighbour) = tokio::join!(
        submit(http, t, &module, Some((run, &secret))),
        submit(http, t, NEIGHBOUR, None)
    );
    let report = match report {
        Ok(r) => r,
        Err(e) => {
            return AttackResult::judge(attack, Vec::new(), String::new(), Some(e), ms(started));
        }
    };
    let l = &bounds.limits;
    let m = &report.measurements;
    let mut checks = Vec::new();
    let ok = match &run.expect {
        Expect::Limit(_) | Expect::Failed => report.outcome == Outcome::Failed,
        Expect::Contained | Expect::Any => true,
        Expect::Served => report.outcome == Outcome::Succeeded,
    };
    checks.push(Check::new(
        "outcome",
        ok,
        match &report.failure {
            Some(f) => f.message.clone(),
            None => "the job exited 0".into(),
        },
    ));
    let loot: Vec<_> = report
        .outputs
        .iter()
        .filter(|o| o.name.starts_with("loot-"))
        .map(|o| o.name.clone())
        .collect();
    let text = format!("{}{}", report.stdout.text, report.stderr.text);
    let leaked = text.contains("root:x:0:0")
        || (!run.params.iter().any(|(_, p)| *p == Param::Secret) && text.contains(&secret));
    checks.push(Check::new(
        "secrets",
        loot.is_empty() && !leaked,
        if loot.is_empty() && !leaked {
            "nothing looted, no host file content in the output".to_owned()
        } else {
            format!(
                "looted {loot:?}{}",
                if leaked {
                    ", host content in stdout"
                } else {
                    ""
                }
            )
        },
    ));
    checks.push(Check::new(
        "resources",
        m.peak_memory_bytes <= l.memory.as_u64()
            && m.output_bytes <= l.output.as_u64()
            && report.stdout.bytes <= l.stdout.as_u64(),
        format!(
            "peak memory {} B, /out {} B, stdout {} B (report)",
            m.peak_memory_bytes, m.output_bytes, report.stdout.bytes
        ),
    ));
    checks.push(Check::new(
        "neighbour",
        neighbour.as_ref().is_ok_and(JobReport::succeeded),
        match &neighbour {
            Ok(r) if r.succeeded() => "a concurrent job succeeded".to_owned(),
            Ok(r) => format!("the concurrent job failed: {:?}", r.failure),
            Err(e) => format!("the concurrent job was not served: {e}"),
        },
    ));
    checks.push(Check::new(
        "host side",
        true,
        "canaries, descriptors and sockets are not observable remotely; run the suite on the host for them",
    ));
    let stopped = match (&report.limit, &report.failure) {
        (Some(l), _) => format!("limit {l}"),
        (None, Some(f)) => f.message.clone(),
        (None, None) => "the job exited 0".into(),
    };
    let (attempted, evidence) =
        attempt_evidence(&report, neighbour.as_ref().ok(), attack.source != BUNDLED);
    AttackResult::judge(attack, checks, stopped, None, ms(started))
        .with_evidence(evidence.clone())
        .unless_attempted(
            attempted,
            format!("no attempt observed by the host: {evidence}"),
        )
}
