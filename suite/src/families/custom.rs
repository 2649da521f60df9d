//! A tester's own attacks: a folder of `<name>.wasm` components, each with
//! a `<name>.toml` manifest saying what it attempts and what "held" means.
//!
//! ```toml
//! class = "filesystem"          # filesystem, exhaustion, lateral, tokens, cross-job
//! description = "reads the host's SSH keys through a crafted path"
//! id = "custom.ssh-keys"        # optional; default `custom.<name>`
//! args = ["--deep"]             # optional: the policy's run.args
//! [params]                      # optional: job parameters, passed as --name=value;
//! target = "{canary_file}"      #   {canary_file} {canary_dir} {bait_port} {secret}
//! [inputs]                      # optional: files in /in, name = content
//! "photo.png" = "not really a png"
//! [limits]                      # optional: over the suite's (or --policy's) limits
//! memory = "64 MiB"
//! [held]                        # what "held" means
//! outcome = "limit"             # contained (default), failed, limit, any, served
//! limits = ["memory"]           # with outcome = "limit": which may fire
//! forbidden = ["BEGIN PRIVATE KEY"]  # must not appear in stdout, stderr, outputs
//! untouched = ["/etc/hostname"] # host files that must stay unchanged
//! ```
//!
//! Every host-side check of a bundled attack (canaries, secrets,
//! neighbour, disk, memory, descriptors, network) applies as well.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::model::{Attack, AttackKind, Class, Expect, GuestRun, Param, SuiteError};
use bulkhead::sandbox::LimitKind;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    class: String,
    description: String,
    id: Option<String>,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    params: BTreeMap<String, String>,
    #[serde(default)]
    inputs: BTreeMap<String, String>,
    #[serde(default)]
    limits: toml::Table,
    #[serde(default)]
    held: Held,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Held {
    #[serde(default)]
    outcome: Option<String>,
    #[serde(default)]
    limits: Vec<String>,
    #[serde(default)]
    forbidden: Vec<String>,
    #[serde(default)]
    untouched: Vec<PathBuf>,
}

fn limit_kind(name: &str, manifest: &Path) -> Result<LimitKind, SuiteError> {
    LimitKind::ALL
        .into_iter()
        .find(|k| k.as_str() == name)
        .ok_or_else(|| {
            SuiteError::Setup(format!(
                "{}: unknown limit `{name}` in held.limits: one of {}",
                manifest.display(),
                LimitKind::ALL.map(LimitKind::as_str).join(", ")
            ))
        })
}

fn param(value: &str) -> Param {
    match value {
        "{canary_file}" => Param::CanaryFile,
        "{canary_dir}" => Param::CanaryDir,
        "{bait_port}" => Param::BaitPort,
        "{secret}" => Param::Secret,
        v => Param::Lit(v.to_owned()),
    }
}

/// Reads every `<name>.wasm` + `<name>.toml` pair in `dir`, sorted by name.
///
/// # Errors
/// [`SuiteError::Setup`] naming the file: a `.wasm` without a manifest, a
/// manifest that does not parse, an unknown class, limit or outcome.
pub fn load_dir(dir: &Path) -> Result<Vec<Attack>, SuiteError> {
    let entries = std::fs::read_dir(dir).map_err(|e| {
        SuiteError::Setup(format!(
            "cannot read the guests folder {}: {e}",
            dir.display()
        ))
    })?;
    let mut wasms: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "wasm"))
        .collect();
    wasms.sort();
    wasms.into_iter().map(|wasm| load_one(&wasm)).collect()
}

fn load_one(wasm_path: &Path) -> Result<Attack, SuiteError> {
    let manifest_path = wasm_path.with_extension("toml");
    let setup = |m: String| SuiteError::Setup(format!("{}: {m}", manifest_path.display()));
    let text = std::fs::read_to_string(&manifest_path).map_err(|e| {
        setup(format!(
            "cannot read the manifest of {}: {e}",
            wasm_path.display()
        ))
    })?;
    let m: Manifest = toml::from_str(&text).map_err(|e| setup(e.to_string().trim().to_owned()))?;
    let class: Class = m.class.parse().map_err(setup)?;
    let stem = wasm_path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let wasm = std::fs::read(wasm_path)
        .map_err(|e| setup(format!("cannot read {}: {e}", wasm_path.display())))?;
    let held = m.held;
    let expect = match held.outcome.as_deref().unwrap_or("contained") {
        "contained" => Expect::Any,
        "any" => Expect::Any,
        "failed" => Expect::Failed,
        "served" => Expect::Served,
        "limit" => {
            if held.limits.is_empty() {
                return Err(setup("held.outcome = \"limit\" needs held.limits".into()));
            }
            Expect::Limit(
                held.limits
                    .iter()
                    .map(|l| limit_kind(l, &manifest_path))
                    .collect::<Result<_, _>>()?,
            )
        }
        other => {
            return Err(setup(format!(
                "unknown held.outcome `{other}`: contained, failed, limit, any or served"
            )));
        }
    };
    let run = GuestRun {
        wasm: Arc::new(wasm),
        args: m.args,
        params: m
            .params
            .iter()
            .map(|(k, v)| (k.clone(), param(v)))
            .collect(),
        inputs: m
            .inputs
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()))
            .collect(),
        limits: m.limits.into_iter().collect(),
        expect,
        forbidden: held.forbidden,
        untouched: held.untouched,
        services: Vec::new(),
    };
    Ok(Attack {
        id: m.id.unwrap_or_else(|| format!("custom.{stem}")),
        class,
        title: m.description,
        source: manifest_path.display().to_string(),
        kind: AttackKind::Guest(run),
    })
}
