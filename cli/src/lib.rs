//! The `bulkhead` command line: `run` a module locally exactly as the service
//! runs it, `check` a policy (and what a module imports against it), `serve`,
//! `token`, and `escape-suite`.
//!
//! Exit status: 0 the job succeeded (or the check passed, or every attack
//! of the escape suite held), 1 the job failed (trap, non-zero exit, limit)
//! or an attack was not held, 2 usage, policy or module errors. This module
//! is the binary's edge: it may use `anyhow`; the library modules may not.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

use bulkhead::policy::{ByteSize, Policy};
use bulkhead::sandbox::{
    JobDir, JobInput, JobReport, JobSpec, Sandbox, SandboxConfig, import_verdict,
};

/// Run risky processing code as sandboxed WebAssembly jobs.
#[derive(Debug, Parser)]
#[command(name = "bulkhead", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run one job of a module under its policy, exactly as the service would.
    Run(RunArgs),
    /// Validate a policy; with a module, list its imports and what the policy grants.
    Check(CheckArgs),
    /// Run the HTTP service.
    Serve(ServeArgs),
    /// Manage client tokens directly on the service's store.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Run the escape-attempt suite: hostile guests against a policy (locally) or a service.
    EscapeSuite(SuiteArgs),
}

#[derive(Debug, Args)]
struct SuiteArgs {
    /// Run the attacks under this policy's limits and zone [default: the suite's tight limits].
    #[arg(long, value_name = "FILE", conflicts_with = "zone")]
    policy: Option<PathBuf>,
    /// Trust zone of the suite's policies (`untrusted`, `first-party`).
    #[arg(long, value_name = "NAME")]
    zone: Option<String>,
    /// Submit the attacks as jobs to this running service instead (see --export).
    #[arg(long, value_name = "URL", requires = "token")]
    server: Option<String>,
    /// Token for --server, with the `escape-suite:run` scope.
    #[arg(long, value_name = "T")]
    token: Option<String>,
    /// A folder of your own attacks: `<name>.wasm` plus a `<name>.toml` manifest each.
    #[arg(long, value_name = "DIR")]
    guests: Option<PathBuf>,
    /// Only attacks whose id or class contains PATTERN (e.g. `fs.`, `exhaustion`).
    #[arg(long, value_name = "PATTERN")]
    only: Option<String>,
    /// Also write the report as JSON.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// Also write the report as a self-contained HTML page.
    #[arg(long, value_name = "FILE")]
    html: Option<PathBuf>,
    /// List the attacks and exit.
    #[arg(long)]
    list: bool,
    /// Write the suite's policies and modules (DIR/policies, DIR/modules) for a service, and exit.
    #[arg(long, value_name = "DIR", conflicts_with = "server")]
    export: Option<PathBuf>,
    #[command(flatten)]
    host: HostArgs,
}

#[derive(Debug, Args)]
struct ServeArgs {
    /// Config file (TOML); without it, the built-in defaults.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

#[derive(Debug, Args)]
struct StoreArgs {
    /// The service's config file, to find its data directory.
    #[arg(long, value_name = "FILE", conflicts_with = "data_dir")]
    config: Option<PathBuf>,
    /// The service's data directory [default: the config's, or ./data].
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
}

impl StoreArgs {
    async fn open(&self) -> anyhow::Result<bulkhead::store::SqliteStore> {
        let dir = match (&self.data_dir, &self.config) {
            (Some(d), _) => d.clone(),
            (None, Some(c)) => bulkhead::config::ServeConfig::load(c)?.storage.data_dir,
            (None, None) => bulkhead::config::ServeConfig::default().storage.data_dir,
        };
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(bulkhead::store::SqliteStore::open(&dir.join("bulkhead.sqlite")).await?)
    }
}

#[derive(Debug, Subcommand)]
enum TokenCommand {
    /// Issue a token; prints the secret once.
    Issue {
        /// Tenant the token's jobs belong to.
        #[arg(long)]
        tenant: String,
        /// Who holds it.
        #[arg(long)]
        subject: String,
        /// A scope (repeatable), e.g. `thumbnail:run`.
        #[arg(long = "scope", required = true)]
        scopes: Vec<String>,
        /// Lifetime, e.g. `30 d`; none = no expiry.
        #[arg(long)]
        ttl: Option<String>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List tokens (never their secrets).
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke a token by id; takes effect on its next request.
    Revoke {
        /// The token's id (`tok_…`).
        id: String,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Debug, Args)]
struct RunArgs {
    /// The module: a `wasm32-wasip2` component (`.wasm`).
    module: PathBuf,
    /// The module's policy (TOML).
    #[arg(long)]
    policy: PathBuf,
    /// An input file placed in `/in`: `NAME=PATH`, or `PATH` to keep its file name.
    #[arg(long = "input", value_name = "NAME=PATH")]
    inputs: Vec<String>,
    /// A job parameter, passed to the guest as `--K=V`; the policy must list K.
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
    #[command(flatten)]
    host: HostArgs,
}

#[derive(Debug, Args)]
struct CheckArgs {
    /// The policy to validate.
    #[arg(long)]
    policy: PathBuf,
    /// A module to check against the policy.
    module: Option<PathBuf>,
    #[command(flatten)]
    host: HostArgs,
}

#[derive(Debug, Args)]
struct HostArgs {
    /// The service's config file, for the internal services it declares
    /// (a policy may name only those).
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Where job directories are created; must be private: it and every directory above it owned by
    /// root or you and not writable by others [default: $XDG_RUNTIME_DIR/bulkhead-cli, else
    /// ~/.cache/bulkhead/jobs].
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Precompiled-module cache, checked private like --work-dir; each artifact is authenticated
    /// with a key kept in it (cache.key) before it is loaded [default: $XDG_CACHE_HOME/bulkhead/modules,
    /// else ~/.cache/bulkhead/modules].
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Compile every time; neither read nor write the cache.
    #[arg(long)]
    no_cache: bool,
}

impl HostArgs {
    /// The policy at `path`, checked against the declared services.
    fn policy(&self, path: &Path) -> anyhow::Result<Policy> {
        let declared = match &self.config {
            Some(c) => bulkhead::config::ServeConfig::load(c)?
                .services
                .into_iter()
                .map(|s| s.name)
                .collect(),
            None => Vec::new(),
        };
        Ok(Policy::load_with(path, &declared)?)
    }

    /// The sandbox, with this user's private defaults: jobs under
    /// `$XDG_RUNTIME_DIR/bulkhead-cli`, else `<cache root>/jobs`; the module
    /// cache in `<cache root>/modules`, where the cache root is
    /// `$XDG_CACHE_HOME/bulkhead` or `~/.cache/bulkhead`. Every directory
    /// is checked to be private before use (see `sandbox::ensure_private_dir`).
    fn sandbox(&self) -> anyhow::Result<Sandbox> {
        let root = bulkhead::sandbox::default_cache_root();
        let runtime = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .is_some_and(|p| p.is_absolute() && p.is_dir());
        let work_dir = match (&self.work_dir, &root) {
            (Some(dir), _) => dir.clone(),
            (None, Some(root)) if !runtime => root.join("jobs"),
            (None, _) => bulkhead::sandbox::default_work_dir("cli"),
        };
        let mut config = SandboxConfig::new(work_dir);
        config.cache_dir = match (&self.cache_dir, &root) {
            _ if self.no_cache => None,
            (Some(dir), _) => Some(dir.clone()),
            (None, Some(root)) => Some(root.join("modules")),
            (None, None) => {
                tracing::warn!(
                    "neither XDG_CACHE_HOME nor HOME is set: compiling without a module cache"
                );
                None
            }
        };
        Ok(Sandbox::new(config)?)
    }
}

/// Exit status for usage, policy and module errors.
const EXIT_USAGE: u8 = 2;

/// Parses arguments, runs the command, prints errors with their causes.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run(args).await,
            Command::Check(args) => check(args),
            Command::Serve(args) => serve(args).await,
            Command::Token(cmd) => token(cmd).await,
            Command::EscapeSuite(args) => escape_suite(args).await,
        }
    });
    // Dropping the runtime would wait for every blocking task; a job's
    // output copy or a stuck one must not hold the exit past the bound
    // `serve` promises.
    runtime.shutdown_timeout(std::time::Duration::from_millis(500));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

async fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let policy = args.host.policy(&args.policy)?;
    let wasm = read_module(&args.module)?;
    let mut job = JobSpec::new();
    job.inputs = parse_inputs(&args.inputs, policy.limits.input)?;
    job.params = parse_params(&args.params)?;
    if let Some(path) = &args.stdin {
        job.stdin = read_stdin(path, policy.limits.input)?.into();
    }
    if let Some(out) = &args.out {
        check_out_dir(out)?;
    }

    let sandbox = args.host.sandbox()?;
    let module = sandbox.load(policy, &wasm)?;
    let dir = JobDir::create(&sandbox.config().work_dir, &job.id).with_context(|| {
        format!(
            "cannot create a job directory under {}",
            sandbox.config().work_dir.display()
        )
    })?;
    let mut report = sandbox.run(&module, &job, &dir).await?;
    if let Some(out) = &args.out
        && let Err(e) = bulkhead::sandbox::outputs::collect(&dir.output_dir(), Some(out))
    {
        // The job ran and has a report: a copy that fails fails the job
        // (exit 1, with the report), it is not a usage error.
        report.outcome = bulkhead::sandbox::Outcome::Failed;
        report.failure.get_or_insert(bulkhead::sandbox::Failure {
            kind: bulkhead::sandbox::FailureKind::Output,
            message: format!("cannot copy outputs to {}: {e}", out.display()),
        });
    }
    drop(dir);

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

fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
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
    let sandbox = args.host.sandbox()?;
    let gated = !policy.network.services.is_empty();
    let loaded = sandbox.load(policy, &wasm)?;
    println!(
        "module {}: digest matches, compiles, links",
        module_path.display()
    );
    println!("  imports:");
    for name in loaded.imports(&sandbox) {
        let (verdict, why) = import_verdict(&name, gated);
        println!("    {verdict:<8} {name}  ({why})");
    }
    Ok(ExitCode::SUCCESS)
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

async fn escape_suite(args: SuiteArgs) -> anyhow::Result<ExitCode> {
    use std::io::{IsTerminal, Write};

    use bulkhead_suite::{self as suite, Progress, report};

    let options = suite::SuiteOptions {
        policy: args.policy,
        zone: args.zone,
        server: args.server,
        token: args.token,
        guests: args.guests,
        only: args.only,
        scratch: args.host.work_dir.clone(),
        // The same private cache as `run`; none if there is no home.
        cache_dir: if args.host.no_cache {
            None
        } else {
            args.host.cache_dir.clone().or_else(|| {
                bulkhead::sandbox::default_cache_root().map(|root| root.join("modules"))
            })
        },
        weakening: None,
    };
    if args.list {
        for a in suite::select(&options)? {
            println!("{:<34} {:<11} {}", a.id, a.class.as_str(), a.title);
        }
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(dir) = &args.export {
        let n = suite::export_modules(&options, dir)?;
        println!(
            "wrote {n} policies to {0}/policies and modules to {0}/modules; serve them with \
             [modules] policies_dir and modules_dir pointing there, and issue a token with \
             --scope {1}",
            dir.display(),
            suite::SUITE_SCOPE
        );
        return Ok(ExitCode::SUCCESS);
    }

    let tty = std::io::stderr().is_terminal();
    let mut progress = |p: Progress<'_>| {
        let mut err = std::io::stderr().lock();
        match p {
            Progress::Start { index, total, id } => {
                let line = report::table::progress_start(index, total, id);
                let _ = if tty {
                    write!(err, "\r\x1b[2K{line}")
                } else {
                    write!(err, "{line}")
                };
            }
            Progress::Done(r) => {
                let done = report::table::progress_done(r);
                let _ = if tty && r.verdict == suite::Verdict::Held {
                    write!(err, "{done}")
                } else {
                    writeln!(err, "{done}")
                };
            }
        }
        let _ = err.flush();
    };
    let result = suite::run(&options, &mut progress).await?;
    if tty {
        eprintln!();
    }
    print!("{}", report::table::render(&result));
    if let Some(path) = &args.json {
        std::fs::write(path, report::json::render(&result))
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("JSON report: {}", path.display());
    }
    if let Some(path) = &args.html {
        std::fs::write(path, report::html::render(&result))
            .with_context(|| format!("cannot write {}", path.display()))?;
        println!("HTML report: {}", path.display());
    }
    Ok(if result.all_held() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = match &args.config {
        Some(path) => bulkhead::config::ServeConfig::load(path)?,
        None => bulkhead::config::ServeConfig::default(),
    };
    let public_addr = config.server.listen;
    let admin_addr = config.server.admin_listen;
    let data_dir = config.storage.data_dir.clone();
    let service = bulkhead::service::Service::start(config, None).await?;
    let listeners = bulkhead::serve::Listeners::bind(public_addr, admin_addr).await?;
    // Print the bound addresses: a config may ask for port 0.
    let (public_addr, admin_addr) = listeners.local_addrs()?;
    println!(
        "bulkhead serving http://{public_addr} (admin http://{admin_addr}, data {})",
        data_dir.display()
    );
    println!(
        "get a token:  ./target/debug/bulkhead token issue --tenant demo --subject me --scope thumbnail:run"
    );
    println!(
        "submit a job: curl -H \"Authorization: Bearer $TOKEN\" -H 'Content-Type: image/png' \\\n    --data-binary @examples/sunset.png 'http://{public_addr}/v1/modules/thumbnail/jobs?wait=10s&param.width=160'"
    );

    // On SIGTERM or Ctrl-C: readiness turns 503 and running jobs get
    // `shutdown_grace`; then the listeners close and open connections get
    // `serve::CLOSE_MARGIN` before they are dropped. Nothing else is waited
    // for: the runtime is shut down without waiting (see `main`).
    let draining = async {
        shutdown_signal().await;
        eprintln!("shutting down: draining running jobs");
        service.shutdown().await;
    };
    bulkhead::serve::serve(std::sync::Arc::clone(&service), listeners, draining).await?;
    Ok(ExitCode::SUCCESS)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = ctrl_c.await;
            return;
        }
    };
    tokio::select! {
        _ = ctrl_c => {}
        _ = term.recv() => {}
    }
}

async fn token(cmd: TokenCommand) -> anyhow::Result<ExitCode> {
    use bulkhead::store::JobStore;
    match cmd {
        TokenCommand::Issue {
            tenant,
            subject,
            scopes,
            ttl,
            store,
        } => {
            let store = store.open().await?;
            let request = bulkhead::api::IssueRequest {
                tenant,
                subject,
                scopes,
                ttl,
            };
            let (secret, record) =
                bulkhead::api::new_token(&request).map_err(anyhow::Error::msg)?;
            store.insert_token(&record).await?;
            eprintln!(
                "issued {} for tenant {} ({})",
                record.id,
                record.tenant,
                record.scopes.join(", ")
            );
            println!("{secret}");
        }
        TokenCommand::List { store } => {
            let store = store.open().await?;
            for t in store.list_tokens().await? {
                println!(
                    "{}  tenant={}  subject={}  scopes={}  expires={}  {}",
                    t.id,
                    t.tenant,
                    t.subject,
                    t.scopes.join(","),
                    t.expires_at.map_or("never".to_owned(), |e| e.to_string()),
                    if t.revoked { "REVOKED" } else { "active" }
                );
            }
        }
        TokenCommand::Revoke { id, store } => {
            let store = store.open().await?;
            if !store.revoke_token(&id).await? {
                bail!("no token `{id}`");
            }
            eprintln!("revoked {id}");
        }
    }
    Ok(ExitCode::SUCCESS)
}
