//! `bulkhead run` (one job of a module under its policy, exactly as the
//! service would) and `bulkhead check` (a policy, and what a module imports
//! against it).

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Args;

use bulkhead::policy::ByteSize;
use bulkhead::sandbox::{ImportVerdict, JobInput, JobReport, JobSpec, LoadError};

use crate::host::HostArgs;

#[derive(Debug, Args)]
pub(crate) struct RunArgs {
    /// The module: a `wasm32-wasip2` component, or a WASIp1 core module (`wasm32-wasip1`, adapted
    /// into a component at load) (`.wasm`).
    module: PathBuf,
    /// The module's policy (TOML).
    #[arg(long)]
    policy: PathBuf,
    /// An input file placed in `/in`: `NAME=PATH`, or `PATH` to keep its file name.
    #[arg(long = "input", value_name = "NAME=PATH")]
    inputs: Vec<String>,
    /// A job parameter, passed to the guest as `--K=V` (or where the policy's args template
    /// places it); the policy must list K.
    #[arg(long = "param", value_name = "K=V")]
    params: Vec<String>,
    /// A file whose bytes the guest reads on stdin (`-` for this process's stdin).
    #[arg(long, value_name = "PATH")]
    stdin: Option<PathBuf>,
    /// Copy the job's outputs (regular files only) into this directory.
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Print the report as JSON instead of a summary.
    #[arg(long)]
    json: bool,
    /// The tenant the job runs for: the identity its call tokens carry (`tenant`).
    #[arg(long, default_value = "local")]
    tenant: String,
    /// The subject within the tenant its call tokens carry (`sub`).
    #[arg(long, default_value = "bulkhead-run")]
    subject: String,
    #[command(flatten)]
    host: HostArgs,
}

#[derive(Debug, Args)]
pub(crate) struct CheckArgs {
    /// The policy to validate.
    #[arg(long)]
    policy: PathBuf,
    /// A module to check against the policy.
    module: Option<PathBuf>,
    #[command(flatten)]
    host: HostArgs,
}

pub(crate) async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let policy = args.host.policy(&args.policy)?;
    let wasm = read_module(&args.module)?;
    args.host.signature(&policy, &args.module, &wasm)??;
    let mut job = JobSpec::new();
    job.inputs = parse_inputs(&args.inputs, policy.limits.input)?;
    job.params = parse_params(&args.params)?;
    if let Some(path) = &args.stdin {
        job.stdin = read_stdin(path, policy.limits.input)?.into();
    }
    if let Some(out) = &args.out {
        check_out_dir(out)?;
    }

    // Calls go out as the service sends them: through the relay the
    // config declares, with real call tokens from its key ring, as this
    // caller (with the policy's scopes, as a token allowed to submit).
    let egress = args.host.relay()?.and_then(|relay| {
        let caller = bulkhead::relay::Caller {
            tenant: args.tenant.clone(),
            subject: args.subject.clone(),
            scopes: policy
                .access
                .scopes
                .iter()
                .map(|s| s.as_str().to_owned())
                .collect(),
        };
        relay.grant(&policy, &job.id, Ok(caller), None)
    });

    let (runner, _work) = args.host.runner(&policy.module.zone.to_string()).await?;
    let (loaded, took) =
        with_progress(&args.module, wasm.len(), runner.load(policy, wasm.into())).await;
    let module = loaded?;
    loaded_note(module.info(), took);
    let finished = runner.run(&module, &job, egress).await?;
    let mut report = finished.report;
    // A worker's own lists are not shown: what is listed is what this
    // process found (and, with --out, copied).
    if args.out.is_some() || finished.outputs.from_worker() {
        match finished.outputs.collect(args.out.as_deref()) {
            Ok(collected) => report.list_collected(collected),
            Err(e) => {
                // The job ran and has a report: a copy that fails fails the
                // job (exit 1, with the report), it is not a usage error.
                let message = match &args.out {
                    Some(out) => format!("cannot copy outputs to {}: {e}", out.display()),
                    None => format!("cannot read the outputs: {e}"),
                };
                report.fail_outputs(message);
            }
        }
    }
    // Before the process exits, not on a blocking thread its exit could
    // cut short.
    finished.outputs.remove();
    runner.close();

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_summary(&report, args.out.as_deref());
    }
    Ok(if report.succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

pub(crate) async fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    let policy = args.host.policy(&args.policy)?;
    let l = &policy.limits;
    println!("policy {}: valid", args.policy.display());
    println!(
        "  module   {} (zone {})",
        policy.module.name, policy.module.zone
    );
    println!("  sha256   {}", policy.module.sha256);
    let scopes: Vec<_> = policy.access.scopes.iter().map(|s| s.as_str()).collect();
    println!("  scopes   {}", or_none(&scopes.join(", ")));
    let params: Vec<_> = policy.run.params.iter().map(|s| s.as_str()).collect();
    println!("  params   {}", or_none(&params.join(", ")));
    if !policy.run.args.is_empty() {
        let shown: Vec<String> = policy
            .run
            .args
            .iter()
            .map(|entry| match entry {
                bulkhead::policy::ArgEntry::One(a) => format!("{a:?}"),
                bulkhead::policy::ArgEntry::Group(g) => format!("{g:?}"),
            })
            .collect();
        println!(
            "  args     {} ({})",
            shown.join(" "),
            if policy.run.is_template() {
                "a template: parameters only where placed"
            } else {
                "then each parameter as --name=value"
            }
        );
    }
    if let Some(name) = &policy.run.stdout {
        println!("  stdout   kept as /out/{name}, under the output quota");
    }
    println!(
        "  limits   memory {}, cpu {}, wall {}, output {} in {} entries, stdout {}, stderr {}, input {}",
        l.memory, l.cpu_time, l.wall_time, l.output, l.output_files, l.stdout, l.stderr, l.input
    );
    let services: Vec<_> = policy.network.services.iter().map(|s| s.as_str()).collect();
    println!(
        "  network  {}",
        if services.is_empty() {
            "none: no way out".to_owned()
        } else {
            services.join(", ")
        }
    );

    let Some(module_path) = args.module else {
        return Ok(ExitCode::SUCCESS);
    };
    let wasm = read_module(&module_path)?;
    match args.host.signature(&policy, &module_path, &wasm)? {
        Ok(verdict) => println!("  signature {verdict}"),
        Err(e) => {
            println!(
                "module {}: refused before compiling: {e}",
                module_path.display()
            );
            return Ok(ExitCode::from(2));
        }
    }
    // Loaded exactly as `run` loads it: in a hardened worker of the
    // module's zone (this process only checks size, pin and header), so
    // what is said below about the module is the worker's word.
    let (runner, _work) = args.host.runner(&policy.module.zone.to_string()).await?;
    let (loaded, took) =
        with_progress(&module_path, wasm.len(), runner.load(policy, wasm.into())).await;
    if let Ok(module) = &loaded {
        loaded_note(module.info(), took);
    }
    runner.close();
    match loaded {
        Ok(module) => {
            let info = module.info();
            println!(
                "module {}: digest matches, {}compiles, links",
                module_path.display(),
                if info.adapted {
                    "adapted from a WASIp1 core module, "
                } else {
                    ""
                }
            );
            print_imports(&info.imports);
            Ok(ExitCode::SUCCESS)
        }
        Err(LoadError::DeniedImports { imports, .. }) => {
            println!(
                "module {}: refused before compiling: it imports what its policy does not grant",
                module_path.display()
            );
            print_imports(&imports);
            Ok(ExitCode::from(2))
        }
        Err(e) => Err(e.into()),
    }
}

/// How long a load may take before `run` and `check` say on stderr that
/// they are compiling (stdout stays the report alone).
const PROGRESS_AFTER: std::time::Duration = std::time::Duration::from_secs(1);
/// How often a long compile says it is still going.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Awaits `load`, saying on stderr what is being compiled once it has
/// taken [`PROGRESS_AFTER`], and every [`PROGRESS_EVERY`] after; returns
/// its result and how long it took.
async fn with_progress<T>(
    module: &Path,
    size: usize,
    load: impl std::future::Future<Output = T>,
) -> (T, std::time::Duration) {
    let started = std::time::Instant::now();
    let mut load = std::pin::pin!(load);
    let mut wait = PROGRESS_AFTER;
    loop {
        match tokio::time::timeout(wait, &mut load).await {
            Ok(result) => return (result, started.elapsed()),
            Err(_) if wait == PROGRESS_AFTER => eprintln!(
                "compiling {} ({:.1} MiB)…",
                module.display(),
                size as f64 / (1024.0 * 1024.0)
            ),
            Err(_) => eprintln!(
                "  still compiling {} ({:.0} s)…",
                module.display(),
                started.elapsed().as_secs_f64()
            ),
        }
        wait = PROGRESS_EVERY;
    }
}

/// Says on stderr how long a load took when it compiled for long enough to
/// have said it was compiling.
fn loaded_note(info: &bulkhead::sandbox::LoadInfo, took: std::time::Duration) {
    if took >= PROGRESS_AFTER {
        eprintln!(
            "{} in {:.1} s",
            if info.from_cache {
                "loaded from the cache"
            } else {
                "compiled"
            },
            took.as_secs_f64()
        );
    }
}

/// The verdict on each import, one a line. The names come from the
/// module's bytes (by way of a worker): anything that could steer a
/// terminal is escaped.
fn print_imports(imports: &[ImportVerdict]) {
    println!("  imports:");
    for v in imports {
        println!(
            "    {:<8} {}  ({})",
            v.verdict.to_string(),
            printable(&v.name),
            printable(&v.why)
        );
    }
}

fn printable(text: &str) -> String {
    text.chars()
        .take(512)
        .map(|c| {
            if c.is_control()
                || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
            {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn or_none(s: &str) -> &str {
    if s.is_empty() { "none" } else { s }
}

fn read_module(path: &Path) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read module {}", path.display()))
}

fn parse_inputs(specs: &[String], limit: ByteSize) -> anyhow::Result<Vec<JobInput>> {
    let mut inputs = Vec::new();
    for spec in specs {
        let (name, path) = match spec.split_once('=') {
            Some((name, path)) => (name.to_owned(), PathBuf::from(path)),
            None => {
                let path = PathBuf::from(spec);
                let name = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .with_context(|| {
                        format!("input `{spec}` has no usable file name; use NAME=PATH")
                    })?
                    .to_owned();
                (name, path)
            }
        };
        let data = read_bounded(&path, limit)?;
        inputs.push(JobInput {
            name,
            data: data.into(),
        });
    }
    Ok(inputs)
}

fn read_bounded(path: &Path, limit: ByteSize) -> anyhow::Result<Vec<u8>> {
    let file = std::fs::File::open(path)
        .with_context(|| format!("cannot read input {}", path.display()))?;
    let mut data = Vec::new();
    file.take(limit.as_u64() + 1)
        .read_to_end(&mut data)
        .with_context(|| format!("cannot read input {}", path.display()))?;
    if data.len() as u64 > limit.as_u64() {
        bail!(
            "input {} is larger than the module's input limit of {limit}",
            path.display()
        );
    }
    Ok(data)
}

fn read_stdin(path: &Path, limit: ByteSize) -> anyhow::Result<Vec<u8>> {
    if path.as_os_str() == "-" {
        let mut data = Vec::new();
        std::io::stdin()
            .take(limit.as_u64() + 1)
            .read_to_end(&mut data)
            .context("cannot read stdin")?;
        if data.len() as u64 > limit.as_u64() {
            bail!("stdin is larger than the module's input limit of {limit}");
        }
        Ok(data)
    } else {
        read_bounded(path, limit)
    }
}

fn parse_params(specs: &[String]) -> anyhow::Result<BTreeMap<String, String>> {
    let mut params = BTreeMap::new();
    for spec in specs {
        let Some((k, v)) = spec.split_once('=') else {
            bail!("parameter `{spec}` is not of the form K=V");
        };
        if params.insert(k.to_owned(), v.to_owned()).is_some() {
            bail!("parameter `{k}` given twice");
        }
    }
    Ok(params)
}

fn check_out_dir(out: &Path) -> anyhow::Result<()> {
    if out.exists() && std::fs::read_dir(out)?.next().is_some() {
        bail!("output directory {} is not empty", out.display());
    }
    Ok(())
}

fn print_summary(report: &JobReport, out: Option<&Path>) {
    let m = &report.measurements;
    let status = if report.succeeded() {
        "succeeded"
    } else {
        "FAILED"
    };
    println!(
        "{} {status}  exit {}  wall {:.1} ms  cpu {:.0} ms  peak memory {}",
        report.module,
        report.exit_code.map_or("-".to_owned(), |c| c.to_string()),
        m.wall_time_ms,
        m.cpu_time_ms,
        ByteSize::bytes(m.peak_memory_bytes),
    );
    if let Some(f) = &report.failure {
        println!("  reason: {}", f.message);
    }
    if let Some(bt) = &report.backtrace {
        println!("  backtrace (innermost first):");
        for (i, f) in bt.frames.iter().enumerate() {
            println!(
                "    {i:>2}: {}{}  (function {}{})",
                f.module
                    .as_deref()
                    .map(|m| format!("{m}!"))
                    .unwrap_or_default(),
                f.function.as_deref().unwrap_or("<unnamed>"),
                f.func_index,
                f.module_offset
                    .map(|o| format!(", offset {o:#x}"))
                    .unwrap_or_default()
            );
        }
        if bt.truncated {
            println!("    …");
        }
    }
    if let Some(calls) = &report.calls {
        println!(
            "  calls: {} made, {} refused, {} sent, {} received",
            calls.made,
            calls.refused,
            ByteSize::bytes(calls.bytes_sent),
            ByteSize::bytes(calls.bytes_received)
        );
        for c in &calls.records {
            // A refusal first: a response withheld after its status came
            // (a reflected token, say) is refused, not a success.
            let verdict = match (&c.refused, &c.error, &c.status) {
                (Some(refused), _, _) => format!("refused: {refused}"),
                (_, Some(error), _) => format!("failed: {error}"),
                (_, _, Some(status)) => format!("-> {status}"),
                _ => "-".to_owned(),
            };
            println!(
                "    {} {} {}",
                printable(&c.method),
                printable(&c.target),
                verdict
            );
        }
    }
    if report.outputs.is_empty() {
        println!("  outputs: none");
    } else {
        println!(
            "  outputs{}:",
            out.map(|o| format!(" (copied to {})", o.display()))
                .unwrap_or_default()
        );
        for o in &report.outputs {
            println!("    {}  {} bytes  sha256 {}", o.name, o.size, o.sha256);
        }
    }
    for s in &report.skipped_outputs {
        println!("  not collected: {} ({})", s.name, s.reason);
    }
    for (name, c) in [("stdout", &report.stdout), ("stderr", &report.stderr)] {
        if c.bytes > 0 {
            let shown: String = c.text.chars().take(2000).collect();
            let shown = shown.replace(|ch: char| ch.is_control() && ch != '\n', "?");
            println!(
                "  {name} ({} bytes{}):",
                c.bytes,
                if c.truncated { ", truncated" } else { "" }
            );
            for line in shown.lines().take(20) {
                println!("    | {line}");
            }
        }
    }
}
