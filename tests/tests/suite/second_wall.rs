//! The second-wall drill (`escape-suite --only second-wall`): native code
//! attacking from inside a worker hardened by the worker's own function.
//! With the full plan every attack holds; with each layer left off in turn
//! (`drill_weaken`, which only this self-test sets), the drill catches it:
//! the attacks named for that layer are judged breached from host-side
//! evidence.
//!
//! A layer the host reports unavailable (the drill's evidence says so) is
//! skipped: where the kernel does not offer it, leaving it off changes
//! nothing.

use std::collections::BTreeSet;

use bulkhead::worker::harden::Layer;
use bulkhead_suite::{Class, SuiteOptions, SuiteReport, Verdict};

use super::run;
use super::support::{failed_checks, not_held, options};

fn drill_options(weaken: &[Layer]) -> SuiteOptions {
    SuiteOptions {
        only: Some("second-wall".into()),
        drill_weaken: weaken.iter().copied().collect(),
        ..options()
    }
}

/// The attacks that must catch `layer` left off alone, and the check that
/// must see it. Where another layer stops the same attack too, the attack
/// named is one only this layer stops (see the catalog's `layers`).
fn catches(layer: Layer) -> &'static [(&'static str, &'static str)] {
    match layer {
        Layer::Descriptors => &[
            ("wall.inherited-fds", "descriptors"),
            ("wall.inherited-fds", "admin connection"),
        ],
        Layer::DiesWithGateway => &[("wall.outlive", "gateway")],
        Layer::Unprivileged => &[("wall.privileges", "uid")],
        Layer::UserNamespace
        | Layer::NetworkNamespace
        | Layer::IpcNamespace
        | Layer::MountNamespace => &[("wall.namespaces", "separate")],
        Layer::Rlimits => &[("wall.rlimits", "limits"), ("wall.fork-bomb", "limits")],
        Layer::NoNewPrivs => &[("wall.privileges", "no_new_privs")],
        Layer::Landlock => &[
            ("wall.secrets", "loot"),
            ("wall.secrets", "untouched"),
            ("wall.neighbours", "untouched"),
        ],
        Layer::NotDumpable => &[("wall.privileges", "dumpable")],
        Layer::Seccomp => &[
            ("wall.privileges", "seccomp"),
            ("wall.namespaces", "namespaces"),
        ],
    }
}

fn failed<'a>(report: &'a SuiteReport, id: &str) -> Vec<&'a str> {
    report
        .results
        .iter()
        .find(|r| r.id == id)
        .map(|r| {
            r.checks
                .iter()
                .filter(|c| !c.passed)
                .map(|c| c.name.as_str())
                .collect()
        })
        .unwrap_or_default()
}

/// Layers the drill's evidence reports unavailable on this host.
fn unavailable(report: &SuiteReport) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for layer in Layer::ALL {
        let said = format!("{layer:?} unavailable");
        if report.results.iter().any(|r| r.evidence.contains(&said)) {
            out.insert(format!("{layer:?}"));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn the_drill_holds_against_the_workers_own_hardening() {
    let report = run(&drill_options(&[])).await;
    let ids: Vec<&str> = report.results.iter().map(|r| r.id.as_str()).collect();
    assert!(report.results.len() >= 13, "{ids:?}");
    assert!(report.results.iter().all(|r| r.class == Class::SecondWall));
    let not_held = not_held(&report);
    assert!(not_held.is_empty(), "{}", not_held.join("\n"));
    for r in &report.results {
        // Judged by host-side checks, with what the host saw.
        assert!(r.checks.len() >= 2, "{}: {:?}", r.id, r.checks);
        assert!(r.evidence.contains("drill pid"), "{}: {}", r.id, r.evidence);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn each_layer_left_off_is_caught_by_the_drill() {
    let full = run(&drill_options(&[])).await;
    let unavailable = unavailable(&full);
    // SAFETY: no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    // Each layer alone, except `no_new_privs`: Landlock and seccomp set it
    // too (both need it), so leaving it off alone changes nothing the
    // kernel shows. It is checked with those two off as well.
    let mut cases: Vec<Vec<Layer>> = Layer::ALL
        .iter()
        .filter(|l| **l != Layer::NoNewPrivs)
        .map(|l| vec![*l])
        .collect();
    cases.push(vec![Layer::NoNewPrivs, Layer::Landlock, Layer::Seccomp]);
    let mut missed = Vec::new();
    let mut checked = 0;
    for case in cases {
        if let Some(l) = case
            .iter()
            .find(|l| unavailable.contains(&format!("{l:?}")))
        {
            eprintln!("{l:?}: unavailable on this host, not checked");
            continue;
        }
        if case == [Layer::Unprivileged] && !root {
            // Nothing to switch from: started unprivileged already.
            continue;
        }
        let report = run(&drill_options(&case)).await;
        checked += 1;
        let breached: Vec<&str> = report
            .results
            .iter()
            .filter(|r| r.verdict == Verdict::Breached)
            .map(|r| r.id.as_str())
            .collect();
        if breached.is_empty() {
            missed.push(format!("{case:?} off: every drill attack held"));
            continue;
        }
        // Defence in depth: with seccomp off, every call the drill makes
        // goes through, and the other layers still hold all but the
        // attacks only seccomp stops (nested namespaces, dumpable again).
        if case == [Layer::Seccomp] && root {
            let extra: Vec<&&str> = breached
                .iter()
                .filter(|id| !["wall.privileges", "wall.namespaces"].contains(id))
                .collect();
            if !extra.is_empty() {
                missed.push(format!("seccomp off: also breached {extra:?}"));
            }
        }
        let layer = case[0];
        for (id, check) in catches(layer) {
            if !failed(&report, id).contains(check) {
                let r = report.results.iter().find(|r| r.id == *id);
                missed.push(format!(
                    "{case:?} off: {id} did not fail `{check}` ({})",
                    r.map_or_else(|| "not run".to_owned(), failed_checks)
                ));
            }
        }
    }
    assert!(missed.is_empty(), "{}", missed.join("\n"));
    assert!(checked > 0, "no layer is available on this host");
}
