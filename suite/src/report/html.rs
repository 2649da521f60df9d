//! The report as one self-contained HTML page: inline styles, no script,
//! no external resource. A summary per class up top, then every attack
//! with its verdict, what stopped it, and each host-side check it passed
//! or failed. Every piece of text is escaped ([`escape`]).

use std::fmt::Write as _;

use super::printable;
use crate::{Class, SuiteReport, Verdict};

/// `text` safe inside HTML element content and quoted attributes, with
/// control characters made visible.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in printable(text).chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = r#"
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d2430;background:#f6f7f9}
header{background:#1d2430;color:#fff;padding:24px 32px}
header h1{margin:0 0 4px;font-size:22px}
header p{margin:0;color:#c5cbd6}
main{padding:24px 32px;max-width:1200px}
.verdict{font-size:28px;font-weight:700;margin:0 0 16px}
.ok{color:#17753a}.bad{color:#b3261e}.err{color:#8a5a00}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-bottom:24px}
.card{background:#fff;border:1px solid #dde1e7;border-radius:8px;padding:12px 16px;min-width:200px;flex:1}
.card h3{margin:0 0 2px;font-size:15px;text-transform:capitalize}
.card .desc{color:#5b6473;font-size:13px;margin:0 0 8px}
.bar{display:flex;height:8px;border-radius:4px;overflow:hidden;background:#e6e9ee;margin:6px 0}
.bar .h{background:#2e9e5b}.bar .b{background:#d93025}.bar .e{background:#e5a100}
table{border-collapse:collapse;width:100%;background:#fff;border:1px solid #dde1e7}
th,td{text-align:left;padding:8px 10px;border-bottom:1px solid #eceff3;vertical-align:top}
th{background:#eef1f5;font-size:13px}
td.id{font-family:ui-monospace,Menlo,Consolas,monospace;white-space:nowrap}
.pill{display:inline-block;border-radius:10px;padding:1px 9px;font-size:12px;font-weight:700;color:#fff}
.pill.held{background:#2e9e5b}.pill.breached{background:#d93025}.pill.error{background:#e5a100}.pill.inconclusive{background:#7a7a7a}
details summary{cursor:pointer;color:#37589b}
ul.checks{margin:6px 0 0;padding-left:18px}
ul.checks li{margin:2px 0}
.pass::marker{content:"✓ ";color:#2e9e5b}.fail::marker{content:"✗ ";color:#d93025}
.fail{color:#b3261e}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:13px}
.meta{color:#5b6473;font-size:13px;margin-top:20px}
"#;

/// The page.
pub fn render(report: &SuiteReport) -> String {
    let s = &report.summary;
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width,initial-scale=1\">\
         <title>Bulkhead escape suite: {} of {} held</title><style>{STYLE}</style></head><body>\n",
        s.held, s.total
    );
    let _ = write!(
        out,
        "<header><h1>Bulkhead escape suite</h1><p>{} attacks against {} &middot; policy {} &middot; bulkhead {}</p></header>\n<main>\n",
        s.total,
        escape(&report.target),
        escape(&report.policy),
        escape(&report.bulkhead_version)
    );
    let (class, headline) = if s.breached > 0 {
        (
            "bad",
            format!(
                "{} of {} attacks breached the compartment",
                s.breached, s.total
            ),
        )
    } else if s.error + s.inconclusive > 0 {
        (
            "err",
            format!(
                "No breach, but {} of {} attacks could not be judged and {} showed no attempt",
                s.error, s.total, s.inconclusive
            ),
        )
    } else {
        ("ok", format!("All {} attacks held", s.total))
    };
    let _ = writeln!(
        out,
        "<p class=\"verdict {class}\">{}</p>",
        escape(&headline)
    );

    out.push_str("<section class=\"cards\">\n");
    for c in &s.by_class {
        let desc = c
            .class
            .parse::<Class>()
            .map(Class::description)
            .unwrap_or("");
        let pct = |n: usize| n as f64 * 100.0 / c.total.max(1) as f64;
        let _ = writeln!(
            out,
            "<div class=\"card\"><h3>{}</h3><p class=\"desc\">{}</p>\
             <div class=\"bar\"><span class=\"h\" style=\"width:{:.1}%\"></span><span class=\"b\" style=\"width:{:.1}%\"></span><span class=\"e\" style=\"width:{:.1}%\"></span></div>\
             <div>{} attacks: <b class=\"ok\">{} held</b>, <b class=\"bad\">{} breached</b>, <b class=\"err\">{} errors</b>, {} inconclusive</div></div>",
            escape(&c.class),
            escape(desc),
            pct(c.held),
            pct(c.breached),
            pct(c.error),
            c.total,
            c.held,
            c.breached,
            c.error,
            c.inconclusive
        );
    }
    out.push_str("</section>\n");

    out.push_str(
        "<table><thead><tr><th>attack</th><th>class</th><th>verdict</th><th>what it tried, what stopped it, and the evidence</th><th>time</th></tr></thead><tbody>\n",
    );
    for r in &report.results {
        let v = r.verdict.as_str();
        let failed = r.checks.iter().filter(|c| !c.passed).count();
        let _ = write!(
            out,
            "<tr id=\"{}\"><td class=\"id\">{}</td><td>{}</td><td><span class=\"pill {v}\">{v}</span></td><td>{}<br><b>stopped by:</b> {}{}{}\
             <details{}><summary>{} host-side checks{}</summary><ul class=\"checks\">",
            escape(&r.id),
            escape(&r.id),
            escape(r.class.as_str()),
            escape(&r.title),
            escape(if r.stopped_by.is_empty() {
                "-"
            } else {
                &r.stopped_by
            }),
            if r.evidence.is_empty() {
                String::new()
            } else {
                format!("<br><b>evidence:</b> {}", escape(&r.evidence))
            },
            if r.source == "bundled" {
                String::new()
            } else {
                format!("<br><b>source:</b> <code>{}</code>", escape(&r.source))
            },
            if r.verdict == Verdict::Held {
                ""
            } else {
                " open"
            },
            r.checks.len(),
            if failed > 0 {
                format!(", {failed} failed")
            } else {
                String::new()
            }
        );
        for c in &r.checks {
            let _ = write!(
                out,
                "<li class=\"{}\"><b>{}</b>: {}</li>",
                if c.passed { "pass" } else { "fail" },
                escape(&c.name),
                escape(&c.detail)
            );
        }
        let _ = writeln!(
            out,
            "</ul></details></td><td>{:.0}&nbsp;ms</td></tr>",
            r.time_ms
        );
    }
    out.push_str("</tbody></table>\n");
    let _ = writeln!(
        out,
        "<p class=\"meta\">Verdicts are the host's: each comes from evidence the host gathered itself \
         (canary files under an inotify watch, descriptors, sockets and memory sampled during the job, \
         a bait listener, disk usage of the job's output directory, a concurrent well-behaved job, \
         the job report's limits), never from what the guest printed. Started at Unix time {}.</p>",
        report.started_at
    );
    out.push_str("</main></body></html>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_text_is_escaped_and_control_characters_shown() {
        let hostile = "</td><script>alert('x')</script>\u{1b}[2J\r\"&";
        let out = escape(hostile);
        assert!(!out.contains('<') && !out.contains('>') && !out.contains('\u{1b}'));
        assert!(!out.contains('\r') && !out.contains('"') && !out.contains('\''));
        assert!(out.contains("&lt;script&gt;") && out.contains("\\u{1b}") && out.contains("&amp;"));
    }
}
