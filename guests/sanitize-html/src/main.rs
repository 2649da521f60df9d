//! The `sanitize-html` guest: turns untrusted Markdown and HTML from `/in`
//! into safe HTML in `/out`.
//!
//! Every regular file in `/in` (or only `--input=NAME`) is processed:
//! `.md`/`.markdown` are rendered to HTML with pulldown-cmark and then
//! sanitized, `.html`/`.htm` are sanitized; the result goes to
//! `/out/<stem>.html`. Sanitizing uses ammonia's defaults (a whitelist of
//! tags and attributes, no scripts, `rel="noopener noreferrer"` on links).
//! Exit codes: 0 success, 2 bad job (parameter, unsupported or non-UTF-8
//! input, two inputs mapping to the same output), 1 output not writable.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use pulldown_cmark::{Options, Parser};

const IN_DIR: &str = "/in";
const OUT_DIR: &str = "/out";

/// A failed job: the message printed to stderr and the exit code.
struct Failure(u8, String);

impl Failure {
    fn bad_job(msg: impl Into<String>) -> Self {
        Self(2, msg.into())
    }
}

#[derive(Clone, Copy)]
enum Kind {
    Markdown,
    Html,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, msg)) => {
            eprintln!("sanitize-html: {msg}");
            ExitCode::from(code)
        }
    }
}

fn run() -> Result<(), Failure> {
    let only = parse_params(std::env::args().skip(1))?;
    let inputs = list_inputs(only.as_deref())?;

    // Classify everything before writing anything, so a bad file fails the
    // job without leaving half of the outputs behind.
    let mut jobs: BTreeMap<String, (PathBuf, Kind)> = BTreeMap::new();
    for path in inputs {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        let kind = match ext.as_deref() {
            Some("md" | "markdown") => Kind::Markdown,
            Some("html" | "htm") => Kind::Html,
            _ => {
                return Err(Failure::bad_job(format!(
                    "unsupported input {name:?}: expected .md, .markdown, .html or .htm"
                )));
            }
        };
        let stem = path
            .file_stem()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let out_name = format!("{stem}.html");
        if let Some((other, _)) = jobs.insert(out_name.clone(), (path.clone(), kind)) {
            return Err(Failure::bad_job(format!(
                "inputs {:?} and {name:?} would both write {OUT_DIR}/{out_name}",
                other.file_name().unwrap_or_default()
            )));
        }
    }

    for (out_name, (path, kind)) in jobs {
        let bytes = std::fs::read(&path)
            .map_err(|e| Failure::bad_job(format!("cannot read {}: {e}", path.display())))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| Failure::bad_job(format!("{} is not valid utf-8", path.display())))?;
        let html = match kind {
            Kind::Markdown => render_markdown(&text),
            Kind::Html => text,
        };
        let clean = ammonia::clean(&html);
        let out = Path::new(OUT_DIR).join(&out_name);
        std::fs::write(&out, clean)
            .map_err(|e| Failure(1, format!("cannot write {}: {e}", out.display())))?;
    }
    Ok(())
}

/// Renders CommonMark plus the common GitHub extensions. Raw HTML in the
/// Markdown passes through here and is cleaned by the sanitizer afterwards.
fn render_markdown(text: &str) -> String {
    let options = Options::ENABLE_TABLES
        | Options::ENABLE_FOOTNOTES
        | Options::ENABLE_STRIKETHROUGH
        | Options::ENABLE_TASKLISTS;
    let mut html = String::with_capacity(text.len() * 3 / 2);
    pulldown_cmark::html::push_html(&mut html, Parser::new_ext(text, options));
    html
}

/// The only job parameter is `--input=NAME`. Arguments not starting with
/// `--` are left for the policy and ignored; unknown `--` names are refused.
fn parse_params(args: impl Iterator<Item = String>) -> Result<Option<String>, Failure> {
    let mut only = None;
    for arg in args {
        let Some(param) = arg.strip_prefix("--") else {
            continue;
        };
        match param.split_once('=') {
            Some(("input", value)) => only = Some(value.to_owned()),
            Some((name, _)) => return Err(Failure::bad_job(format!("unknown parameter --{name}"))),
            None => return Err(Failure::bad_job(format!("unknown parameter --{param}"))),
        }
    }
    Ok(only)
}

/// The regular files to process, in name order.
fn list_inputs(only: Option<&str>) -> Result<Vec<PathBuf>, Failure> {
    if let Some(name) = only {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(Failure::bad_job(format!(
                "--input must be a file name in {IN_DIR}, got {name:?}"
            )));
        }
        let path = Path::new(IN_DIR).join(name);
        if !path.is_file() {
            return Err(Failure::bad_job(format!(
                "no input file {name:?} in {IN_DIR}"
            )));
        }
        return Ok(vec![path]);
    }
    let entries = std::fs::read_dir(IN_DIR)
        .map_err(|e| Failure::bad_job(format!("cannot list {IN_DIR}: {e}")))?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Failure::bad_job(format!("cannot list {IN_DIR}: {e}")))?;
        if entry.path().is_file() {
            files.push(entry.path());
        }
    }
    if files.is_empty() {
        return Err(Failure::bad_job(format!("no input file in {IN_DIR}")));
    }
    files.sort();
    Ok(files)
}
