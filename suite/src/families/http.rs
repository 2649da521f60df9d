//! Lateral movement over HTTP: one job of the `lateral` guest through the
//! suite's relay, judged from what the bait services received, the calls
//! report and the usual host-side checks.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bulkhead::relay::CallsReport;
use bulkhead_verify::{Verifier, VerifierConfig};

use crate::harness::Harness;
use crate::harness::checks::host_checks;
use crate::harness::egress::{
    ALLOWED, ALLOWED_PREFIX, CALLER_SUBJECT, CALLER_TENANT, Egress, FLOOD, FORBIDDEN, HOST_SET,
    MAX_CALLS, MAX_REQUEST, SMUGGLED, Seen, unverified_claims,
};
use crate::harness::evidence;
use crate::harness::observe::{describe_end, observe, produced, stopped_by};
use crate::model::{Attack, AttackResult, Check, HttpAttack, HttpHeld, module_name, ms};

/// A lateral HTTP attack: one job of the `lateral` guest through the
/// suite's relay, judged from what the bait services received, the calls
/// report and the usual host-side checks. The `network` check is replaced:
/// the relay opening sockets to the allowed bait is the point.
pub(crate) async fn http_attack(
    h: &Harness,
    attack: &Attack,
    http: &HttpAttack,
    started: Instant,
) -> AttackResult {
    let secret = evidence::random_token("BULKHEAD-SECRET");
    let fail =
        |e: String| AttackResult::judge(attack, Vec::new(), String::new(), Some(e), ms(started));
    let name = module_name(&attack.id);
    let module = match h.load(&name, &http.run).await {
        Ok(m) => m,
        Err(e) => return fail(format!("cannot load the attack's module: {e}")),
    };
    let job = h.spec(&http.run, &secret);
    let secrets = h.secrets(&job, &http.run.forbidden, &secret);
    let (allowed_from, forbidden_from) = (h.egress.allowed.len(), h.egress.forbidden.len());
    let obs = match observe(h, &h.main, &module, &job).await {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    h.egress.allowed.settle().await;
    h.egress.forbidden.settle().await;
    let calls = obs.report.calls.as_ref();
    let mut checks = Vec::new();
    let error = untried(
        &http.held,
        calls,
        h.egress.allowed.since(allowed_from).len(),
    );
    checks.push(Check::new("outcome", true, describe_end(&obs.report)));
    let produced = produced(&obs.report, &obs.out_dir);
    checks.extend(self::checks(
        &h.egress,
        &http.held,
        allowed_from,
        forbidden_from,
        calls,
        &produced,
        &job.id,
        &name,
    ));
    let mut host = host_checks(h, &obs, &secrets, &[]);
    for c in &mut host {
        if c.name == "network" {
            let touched = h.bait.touched();
            *c = Check::new(
                "network",
                touched.is_empty(),
                if touched.is_empty() {
                    format!(
                        "nothing reached the bait socket on port {}; the only connections were \
                         the relay's to the allowed service",
                        h.bait.port
                    )
                } else {
                    touched.join("; ")
                },
            );
        }
    }
    checks.extend(host);
    let stopped = match calls {
        Some(c) if c.refused > 0 => format!(
            "gate refused {} of {} requests",
            c.refused,
            c.records.len() + c.records_dropped as usize
        ),
        Some(c) => format!("gate: {} calls within the declaration", c.made),
        None => stopped_by(&obs.report),
    };
    drop(obs);
    AttackResult::judge(attack, checks, stopped, error, ms(started))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Whether `token` is one the host minted for the allowed bait, for this
/// job, carrying the suite's caller: verified against the host's keys as
/// of its own `iat` (tokens live about as long as the job, so the check
/// must not depend on how quickly the suite looks).
fn host_minted(verifier: &Verifier, token: &str, job: &str, module: &str) -> Result<(), String> {
    let iat = unverified_claims(token)
        .and_then(|c| c["iat"].as_u64())
        .unwrap_or_else(now);
    let claims = verifier
        .verify_at(token, iat)
        .map_err(|e| format!("a bearer token that does not verify ({})", e.code()))?;
    if claims.tenant != CALLER_TENANT || claims.sub != CALLER_SUBJECT {
        return Err(format!(
            "a token for {}/{} instead of the suite's caller",
            claims.tenant, claims.sub
        ));
    }
    if claims.job != job || claims.module != module {
        return Err(format!(
            "a token for job {} of {} instead of this one",
            claims.job, claims.module
        ));
    }
    Ok(())
}

/// The checks of one lateral HTTP attack, from what the baits received
/// since the job started (`allowed_from`, `forbidden_from`), the job's
/// calls report and everything it produced.
#[allow(clippy::too_many_arguments)]
pub fn checks(
    egress: &Egress,
    held: &HttpHeld,
    allowed_from: usize,
    forbidden_from: usize,
    calls: Option<&CallsReport>,
    produced: &[u8],
    job: &str,
    module: &str,
) -> Vec<Check> {
    let mut checks = Vec::new();
    let forbidden = egress.forbidden.since(forbidden_from);
    checks.push(Check::new(
        "forbidden service",
        forbidden.is_empty(),
        if forbidden.is_empty() {
            format!(
                "the `{FORBIDDEN}` bait (port {}) received nothing",
                egress.forbidden_port
            )
        } else {
            format!(
                "the `{FORBIDDEN}` bait received {} requests: {}",
                forbidden.len(),
                forbidden
                    .iter()
                    .take(4)
                    .map(|s| format!("{} {}", s.method, s.path))
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        },
    ));

    let seen = egress.allowed.since(allowed_from);
    let verifier = Verifier::new(
        VerifierConfig::new(egress.relay.issuer(), ALLOWED),
        &egress.jwks(),
    );
    let mut wrong = Vec::new();
    for s in &seen {
        let method_ok = s.method == "GET" || s.method == "POST";
        let path = s.path.split('?').next().unwrap_or_default();
        if !method_ok || !path.starts_with(ALLOWED_PREFIX) || path.contains("..") {
            wrong.push(format!("{} {} outside the declaration", s.method, s.path));
        }
        for (name, value) in &s.headers {
            if !HOST_SET.contains(&name.as_str())
                && !bulkhead::relay::headers::FORWARDED.contains(&name.as_str())
            {
                wrong.push(format!(
                    "the guest's `{name}` header reached it (not on the forwarded list)"
                ));
            }
            if name == "accept-encoding" && value != "identity" {
                wrong.push(format!("`accept-encoding: {value}` instead of identity"));
            }
            if SMUGGLED.iter().any(|v| value.contains(v)) {
                wrong.push(format!("a smuggled value reached it in `{name}`"));
            }
        }
        for (name, _) in &s.trailers {
            wrong.push(format!("a request trailer `{name}` reached it"));
        }
        match (s.bearers().as_slice(), &verifier) {
            ([token], Ok(v)) => {
                if let Err(e) = host_minted(v, token, job, module) {
                    wrong.push(format!("{} {}: {e}", s.method, s.path));
                }
            }
            (tokens, _) => wrong.push(format!(
                "{} {}: {} bearer tokens instead of the host's one",
                s.method,
                s.path,
                tokens.len()
            )),
        }
    }
    let calls_ok = seen.len() <= MAX_CALLS as usize;
    if !calls_ok {
        wrong.push(format!(
            "{} calls, over its max_calls of {MAX_CALLS}",
            seen.len()
        ));
    }
    let body_max = seen.iter().map(|s| s.body_bytes).max().unwrap_or(0);
    if body_max > MAX_REQUEST {
        wrong.push(format!(
            "a request body of {body_max} bytes, over its max_request of {MAX_REQUEST}"
        ));
    }
    wrong.dedup();
    checks.push(Check::new(
        "allowed service",
        wrong.is_empty(),
        if wrong.is_empty() {
            format!(
                "the `{ALLOWED}` bait received {} calls (at most {MAX_CALLS}), each inside its \
                 declaration, without the guest's credentials, with one host-minted token for \
                 the suite's caller; largest body {body_max} B",
                seen.len()
            )
        } else {
            wrong.join("; ")
        },
    ));

    let Some(calls) = calls else {
        checks.push(Check::new(
            "calls report",
            false,
            "the job report has no `calls` section: its policy's services were not granted",
        ));
        return checks;
    };
    let refused: Vec<_> = calls
        .records
        .iter()
        .filter(|r| r.refused.is_some())
        .collect();
    let count = |class: &str| {
        refused
            .iter()
            .filter(|r| r.class.as_deref() == Some(class))
            .count()
    };
    let mut classes: Vec<String> = Vec::new();
    for r in &refused {
        let c = r.class.clone().unwrap_or_default();
        if !classes.contains(&c) {
            classes.push(c);
        }
    }
    let summary = format!(
        "{} made, {} refused ({})",
        calls.made,
        calls.refused,
        if classes.is_empty() {
            "none".to_owned()
        } else {
            classes.join(", ")
        }
    );
    match held {
        HttpHeld::Refused(want) => {
            checks.push(refusals_check("refusals", want, &count, summary));
        }
        HttpHeld::Flood => {
            let over = FLOOD.saturating_sub(MAX_CALLS) as usize;
            let ok = count("limit") >= over && calls.made <= MAX_CALLS;
            checks.push(Check::new(
                "refusals",
                ok,
                format!("{summary}; {over} `limit` refusals expected"),
            ));
        }
        HttpHeld::BigBody => {
            checks.push(Check::new(
                "request bytes",
                calls.bytes_sent <= MAX_REQUEST,
                format!(
                    "{} request body bytes sent (bound {MAX_REQUEST}); {summary}",
                    calls.bytes_sent
                ),
            ));
        }
        HttpHeld::Smuggle => {
            let stripped: Vec<&str> = calls
                .records
                .iter()
                .flat_map(|r| r.stripped_headers.iter().map(String::as_str))
                .collect();
            checks.push(Check::new(
                "stripped",
                true,
                format!(
                    "{} calls reached the bait; the host stripped {}",
                    seen.len(),
                    if stripped.is_empty() {
                        "nothing".to_owned()
                    } else {
                        stripped.join(", ")
                    }
                ),
            ));
        }
        HttpHeld::Hunt => checks.push(hunt(&seen, produced)),
        HttpHeld::Reflect(want) => {
            checks.push(hunt(&seen, produced));
            checks.push(refusals_check("withheld", want, &count, summary));
        }
        HttpHeld::Common => {
            checks.push(Check::new("refusals", true, summary));
        }
    }
    checks
}

/// Whether any token the allowed bait received (so: that the host minted)
/// appears in `produced`, in a form a guest could use: whole, its
/// signature, either half of the signature, the hex of its text, or its
/// base64 at any alignment (the judge's own list, independent of the
/// relay's scanner).
fn hunt(seen: &[Seen], produced: &[u8]) -> Check {
    let minted: Vec<&str> = seen.iter().flat_map(Seen::bearers).collect();
    let mut found = Vec::new();
    for t in &minted {
        let signature = t.rsplit('.').next().unwrap_or(t);
        let half = signature.len() / 2;
        let mut forms = vec![
            t.as_bytes().to_vec(),
            signature.as_bytes().to_vec(),
            signature.as_bytes()[..half].to_vec(),
            signature.as_bytes()[half..].to_vec(),
            hex::encode(signature).into_bytes(),
        ];
        for pad in 0..3 {
            let text = format!("{}{signature}", "x".repeat(pad));
            let whole = text.len() / 3 * 3;
            let b64 = base64::engine::general_purpose::STANDARD.encode(&text.as_bytes()[..whole]);
            forms.push(b64.as_bytes()[4..].to_vec());
        }
        if forms.iter().any(|f| contains(produced, f)) {
            found.push(format!(
                "token …{}",
                &signature[signature.len().saturating_sub(8)..]
            ));
        }
    }
    Check::new(
        "tokens",
        found.is_empty(),
        if minted.is_empty() {
            "the host minted no token during the job: nothing to hunt".to_owned()
        } else if found.is_empty() {
            format!(
                "none of the {} tokens the host minted, nor their signatures (whole, halves, \
                 hex, base64), is in stdout, stderr or the outputs",
                minted.len()
            )
        } else {
            format!("the guest got hold of {}", found.join(", "))
        },
    )
}

/// Why the attack cannot be judged: the guest never reached the gate the
/// way the attack needs (host-side evidence: the calls report and what the
/// allowed bait received).
pub fn untried(
    held: &HttpHeld,
    calls: Option<&CallsReport>,
    allowed_seen: usize,
) -> Option<String> {
    let calls = calls?;
    // A call still in flight when the job ended is counted in `made` but
    // has no record yet.
    let attempts = (calls.records.len() + calls.records_dropped as usize)
        .max((calls.made + calls.refused) as usize);
    match held {
        HttpHeld::Common => None,
        HttpHeld::Smuggle | HttpHeld::Hunt | HttpHeld::Reflect(_) if allowed_seen == 0 => {
            Some("no call reached the allowed bait: nothing to judge".into())
        }
        _ if attempts == 0 => Some("the guest made no outbound request".into()),
        _ => None,
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}

/// Check `name`: at least `n` refusals of each `(class, n)` in `want`, as
/// `count` tells them; `summary` says what the job's calls did.
fn refusals_check(
    name: &str,
    want: &[(&'static str, usize)],
    count: &dyn Fn(&str) -> usize,
    summary: String,
) -> Check {
    let missing: Vec<String> = want
        .iter()
        .filter(|(class, n)| count(class) < *n)
        .map(|(class, n)| format!("{n} `{class}` refusals expected, {}", count(class)))
        .collect();
    let detail = if missing.is_empty() {
        summary
    } else {
        format!("{}: {summary}", missing.join("; "))
    };
    Check::new(name, missing.is_empty(), detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use bulkhead::relay::CallRecord;

    #[test]
    fn an_attack_without_a_request_cannot_be_judged() {
        let none = CallsReport::default();
        assert!(untried(&HttpHeld::Flood, Some(&none), 0).is_some());
        assert!(untried(&HttpHeld::Common, Some(&none), 0).is_none());
        // A call still in flight counts, though it has no record yet.
        let in_flight = CallsReport {
            made: 1,
            ..CallsReport::default()
        };
        assert!(untried(&HttpHeld::BigBody, Some(&in_flight), 1).is_none());
        let refused = CallsReport {
            refused: 1,
            records: vec![CallRecord::default()],
            ..CallsReport::default()
        };
        assert!(untried(&HttpHeld::Refused(vec![]), Some(&refused), 0).is_none());
        assert!(untried(&HttpHeld::Hunt, Some(&refused), 0).is_some());
    }
}
