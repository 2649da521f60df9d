//! `bulkhead pin`: writes a policy's `[module] sha256` from the module's
//! bytes, in place, keeping the file's comments and layout (`toml_edit`);
//! with `--new`, scaffolds a minimal deny-by-default policy for a module
//! that has none.
//!
//! Which module: `--module PATH`, else `<name>.wasm` beside the policy,
//! else cargo's spelling of it, `<name with - as _>.wasm` (cargo builds
//! package `foo-bar` as `foo_bar.wasm`; module names have no `_`, so the
//! two never clash). `--new` derives the name the other way: the file's
//! stem, lowercased, `_` as `-`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;
use toml_edit::{DocumentMut, Item, Value};

use bulkhead::policy::{ModuleName, Policy, ServiceName, Sha256Hex};

#[derive(Debug, Args)]
pub(crate) struct PinArgs {
    /// The policy to pin (with `--new`, the policy to create).
    policy: PathBuf,
    /// The module (`.wasm`); default `<name>.wasm` or `<name_with_underscores>.wasm`
    /// beside the policy.
    #[arg(long, value_name = "PATH")]
    module: Option<PathBuf>,
    /// Scaffold a new policy for `--module` (refused if the policy file exists).
    #[arg(long, requires = "module")]
    new: bool,
    /// With `--new`: the module's name (default: the module file's stem, `_` as `-`).
    #[arg(long, requires = "new")]
    name: Option<String>,
}

pub(crate) fn pin(args: PinArgs) -> anyhow::Result<ExitCode> {
    if args.new {
        let module = args.module.as_deref().context("--new needs --module")?;
        return scaffold(&args.policy, module, args.name.as_deref());
    }
    let text = std::fs::read_to_string(&args.policy)
        .with_context(|| format!("cannot read policy {}", args.policy.display()))?;
    let mut doc: DocumentMut = text
        .parse()
        .with_context(|| format!("{} is not TOML", args.policy.display()))?;
    let name = doc
        .get("module")
        .and_then(|m| m.get("name"))
        .and_then(Item::as_str)
        .map(str::to_owned)
        .with_context(|| format!("{} has no `[module] name`", args.policy.display()))?;
    let module = match &args.module {
        Some(m) => m.clone(),
        None => find_module(&args.policy, &name)?,
    };
    let digest = digest_of(&module)?;

    let table = doc
        .get_mut("module")
        .and_then(Item::as_table_like_mut)
        .with_context(|| format!("{}: `module` is not a table", args.policy.display()))?;
    let old = table
        .get("sha256")
        .and_then(Item::as_str)
        .map(str::to_owned);
    match table.get_mut("sha256").and_then(Item::as_value_mut) {
        // Keep the value's own decoration (a comment after it on its line).
        Some(value) => {
            let decor = value.decor().clone();
            *value = Value::from(digest.to_string());
            *value.decor_mut() = decor;
        }
        None => {
            table.insert("sha256", toml_edit::value(digest.to_string()));
        }
    }
    let new_text = doc.to_string();
    // The result must be a policy this host loads (services are checked
    // against the host config at load, not here).
    check(&new_text, &args.policy, &doc)?;
    if old.as_deref() == Some(digest.as_str()) {
        println!(
            "{}: already pinned to {} ({digest})",
            args.policy.display(),
            module.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    write_in_place(&args.policy, &new_text)?;
    println!(
        "{}: pinned to {} sha256 {digest}{}",
        args.policy.display(),
        module.display(),
        old.map(|o| format!(" (was {o})")).unwrap_or_default()
    );
    Ok(ExitCode::SUCCESS)
}

/// `<name>.wasm`, else `<name_with_underscores>.wasm`, beside the policy.
fn find_module(policy: &Path, name: &str) -> anyhow::Result<PathBuf> {
    let dir = policy
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tried = [
        dir.join(format!("{name}.wasm")),
        dir.join(format!("{}.wasm", name.replace('-', "_"))),
    ];
    tried
        .iter()
        .find(|p| p.is_file())
        .cloned()
        .with_context(|| {
            format!(
                "no module for `{name}`: tried {}; pass --module PATH",
                tried
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" and ")
            )
        })
}

fn digest_of(module: &Path) -> anyhow::Result<Sha256Hex> {
    let bytes = std::fs::read(module)
        .with_context(|| format!("cannot read module {}", module.display()))?;
    if !bytes.starts_with(b"\0asm") {
        bail!(
            "{} is not a WebAssembly binary (no `\\0asm` header)",
            module.display()
        );
    }
    Ok(Sha256Hex::digest(&bytes))
}

/// Validates `text` as a policy, taking the services it names as declared.
fn check(text: &str, path: &Path, doc: &DocumentMut) -> anyhow::Result<()> {
    let services: Vec<ServiceName> = doc
        .get("network")
        .and_then(|n| n.get("services"))
        .and_then(Item::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str())
                .filter_map(|s| ServiceName::new(s).ok())
                .collect()
        })
        .unwrap_or_default();
    Policy::parse_with(text, path, &services)?;
    Ok(())
}

/// Replaces `path` by a file holding `text`, with the same permissions,
/// through a temporary file beside it and a rename.
fn write_in_place(path: &Path, text: &str) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)
        .with_context(|| format!("cannot write beside {}", path.display()))?;
    std::io::Write::write_all(&mut tmp, text.as_bytes())?;
    if let Ok(meta) = std::fs::metadata(path) {
        tmp.as_file().set_permissions(meta.permissions())?;
    }
    tmp.persist(path)
        .with_context(|| format!("cannot replace {}", path.display()))?;
    Ok(())
}

fn scaffold(policy: &Path, module: &Path, name: Option<&str>) -> anyhow::Result<ExitCode> {
    if policy.exists() {
        bail!(
            "{} exists; `bulkhead pin {}` updates its pin",
            policy.display(),
            policy.display()
        );
    }
    let digest = digest_of(module)?;
    let name = match name {
        Some(n) => n.to_owned(),
        None => module
            .file_stem()
            .and_then(|s| s.to_str())
            .map(|s| s.to_ascii_lowercase().replace('_', "-"))
            .with_context(|| format!("{} has no usable file name", module.display()))?,
    };
    let name = ModuleName::new(&name)
        .map_err(|e| anyhow::anyhow!("{e}; pass --name to choose the module's name"))?;
    let file = module
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    let text = format!(
        r#"# Policy for `{name}` ({file}), scaffolded by `bulkhead pin --new`.
# Deny by default: whatever this file does not grant, the guest does not get.
# Schema: policies/README.md.
version = 1

[module]
name = "{name}"
# The module's digest: bytes that differ are refused before compiling.
# After a rebuild, `bulkhead pin <this file>` updates it.
sha256 = "{digest}"
zone = "untrusted"

[access]
# A caller's token needs one of these scopes to submit jobs.
scopes = ["{name}:run"]

[limits]
# Small on purpose: raise only what the module needs.
memory = "64 MiB"
cpu_time = "2 s"
wall_time = "10 s"
output = "16 MiB"
output_files = 32

[run]
# Each entry is one argument; placeholders: {{param.NAME}}, {{input.NAME}},
# {{output.NAME}}, {{in}}, {{out}}; an array is a group dropped when a
# parameter it places is absent. Without placeholders, parameters are
# appended as --name=value. For example:
#   args = ["{{input.in.svg}}", "{{output.out.png}}", ["-w", "{{param.width}}"]]
#   params = ["width"]
# stdout = "result.txt"   # keep stdout as /out/result.txt
args = []
params = []

[network]
# Internal services (declared in the host config) it may call; none: no way out.
services = []
"#
    );
    Policy::parse(&text, policy)?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(policy)
        .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
        .with_context(|| format!("cannot create {}", policy.display()))?;
    println!(
        "{}: new policy for `{name}`, pinned to {} sha256 {digest}",
        policy.display(),
        module.display()
    );
    Ok(ExitCode::SUCCESS)
}
