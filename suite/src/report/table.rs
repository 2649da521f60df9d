//! The terminal view: one progress line per attack while the suite runs,
//! then an aligned table and the summary counts.

use std::fmt::Write as _;

use super::printable;
use crate::{AttackResult, SuiteReport, Verdict};

/// The progress line printed when attack `index` of `total` starts.
pub fn progress_start(index: usize, total: usize, id: &str) -> String {
    format!("[{:>3}/{total}] {id} ...", index + 1)
}

/// The progress line printed when an attack finishes.
pub fn progress_done(r: &AttackResult) -> String {
    format!(" {} ({:.0} ms)", r.verdict.as_str(), r.time_ms)
}

fn cut(text: &str, width: usize) -> String {
    let text = printable(text);
    if text.chars().count() <= width {
        text
    } else {
        let mut t: String = text.chars().take(width.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// The table, the failed checks of every attack not held, and the summary.
pub fn render(report: &SuiteReport) -> String {
    let mut out = String::new();
    let id_w = report
        .results
        .iter()
        .map(|r| r.id.len())
        .max()
        .unwrap_or(6)
        .max(6);
    let class_w = 10;
    let _ = writeln!(
        out,
        "{:<id_w$}  {:<class_w$}  {:<8}  {:<48}  {:<40}  {:>9}",
        "attack", "class", "verdict", "stopped by", "evidence", "time"
    );
    let _ = writeln!(out, "{}", "-".repeat(id_w + class_w + 8 + 48 + 40 + 9 + 10));
    for r in &report.results {
        let verdict = match r.verdict {
            Verdict::Held => "held",
            Verdict::Breached => "BREACHED",
            Verdict::Error => "ERROR",
            Verdict::Inconclusive => "INCONCL.",
        };
        let _ = writeln!(
            out,
            "{:<id_w$}  {:<class_w$}  {:<8}  {:<48}  {:<40}  {:>6.0} ms",
            r.id,
            r.class.as_str(),
            verdict,
            cut(&r.stopped_by, 48),
            cut(&r.evidence, 40),
            r.time_ms
        );
    }
    for r in report.results.iter().filter(|r| r.verdict != Verdict::Held) {
        let _ = writeln!(
            out,
            "\n{} {}: {}",
            r.verdict.as_str().to_uppercase(),
            r.id,
            printable(&r.title)
        );
        if !r.evidence.is_empty() {
            let _ = writeln!(out, "  evidence: {}", cut(&r.evidence, 300));
        }
        for c in r.checks.iter().filter(|c| !c.passed) {
            let _ = writeln!(out, "  {}: {}", c.name, cut(&c.detail, 300));
        }
    }
    if !report.not_run.is_empty() {
        let _ = writeln!(
            out,
            "\nnot applicable against {} ({} attacks):",
            report.target,
            report.not_run.len()
        );
        for n in &report.not_run {
            let _ = writeln!(out, "  {}: {}", n.id, printable(&n.reason));
        }
    }
    let s = &report.summary;
    let _ = writeln!(
        out,
        "\n{} attacks against {} (policy {}): {} held, {} breached, {} errors, {} inconclusive",
        s.total, report.target, report.policy, s.held, s.breached, s.error, s.inconclusive
    );
    for c in &s.by_class {
        let _ = writeln!(
            out,
            "  {:<class_w$}  {:>3} attacks  {:>3} held  {:>3} breached  {:>3} errors  {:>3} inconclusive",
            c.class, c.total, c.held, c.breached, c.error, c.inconclusive
        );
    }
    out
}
