//! The `thumbnail` guest: the WASI command shell around
//! [`bulkhead_guest_thumbnail::make_thumbnail`].
//!
//! It reads one image from `/in`, and writes `/out/thumbnail.png`.
//! Parameters (all optional): `--width=N`, `--height=N` (1..=4096, default
//! 128) and `--input=NAME` (a file name in `/in`; required only when `/in`
//! holds more than one file). Exit codes: 0 success, 2 bad job (parameter,
//! input or image), 1 output could not be written (e.g. an `/out` quota).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use bulkhead_guest_thumbnail::{DEFAULT_SIZE, MAX_SIZE, make_thumbnail};

const IN_DIR: &str = "/in";
const OUT_FILE: &str = "/out/thumbnail.png";

/// A failed job: the message printed to stderr and the exit code.
struct Failure(u8, String);

impl Failure {
    fn bad_job(msg: impl Into<String>) -> Self {
        Self(2, msg.into())
    }
}

struct Params {
    width: u32,
    height: u32,
    input: Option<String>,
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, msg)) => {
            eprintln!("thumbnail: {msg}");
            ExitCode::from(code)
        }
    }
}

fn run() -> Result<(), Failure> {
    let params = parse_params(std::env::args().skip(1))?;
    let input = pick_input(params.input.as_deref())?;
    let bytes = std::fs::read(&input)
        .map_err(|e| Failure::bad_job(format!("cannot read {}: {e}", input.display())))?;
    let png = make_thumbnail(&bytes, params.width, params.height).map_err(Failure::bad_job)?;
    std::fs::write(OUT_FILE, png).map_err(|e| Failure(1, format!("cannot write {OUT_FILE}: {e}")))
}

/// Job parameters are `--name=value`. Arguments not starting with `--` are
/// left for the policy's own use and ignored; unknown `--` names are refused
/// so a typo does not silently produce a default-sized thumbnail.
fn parse_params(args: impl Iterator<Item = String>) -> Result<Params, Failure> {
    let mut params = Params {
        width: DEFAULT_SIZE,
        height: DEFAULT_SIZE,
        input: None,
    };
    for arg in args {
        let Some(param) = arg.strip_prefix("--") else {
            continue;
        };
        let (name, value) = param.split_once('=').ok_or_else(|| {
            Failure::bad_job(format!("parameter --{param} needs a value (--{param}=...)"))
        })?;
        match name {
            "width" => params.width = parse_size(name, value)?,
            "height" => params.height = parse_size(name, value)?,
            "input" => params.input = Some(value.to_owned()),
            _ => return Err(Failure::bad_job(format!("unknown parameter --{name}"))),
        }
    }
    Ok(params)
}

fn parse_size(name: &str, value: &str) -> Result<u32, Failure> {
    match value.parse::<u32>() {
        Ok(n) if (1..=MAX_SIZE).contains(&n) => Ok(n),
        _ => Err(Failure::bad_job(format!(
            "--{name} must be an integer between 1 and {MAX_SIZE}, got {value:?}"
        ))),
    }
}

/// The named input, or else the only regular file in `/in`.
fn pick_input(name: Option<&str>) -> Result<PathBuf, Failure> {
    if let Some(name) = name {
        // Only plain names: the parameter selects among the inputs, it is not
        // a path (the sandbox would refuse an escape anyway).
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
        return Ok(path);
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
    match files.len() {
        0 => Err(Failure::bad_job(format!("no input file in {IN_DIR}"))),
        1 => Ok(files.pop().expect("one file")),
        n => Err(Failure::bad_job(format!(
            "{n} files in {IN_DIR}; choose one with --input=NAME"
        ))),
    }
}
