//! `bulkhead escape-suite`: hostile guests against a policy (locally) or a
//! service.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use crate::host::HostArgs;

#[derive(Debug, Args)]
pub(crate) struct SuiteArgs {
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

/// The hidden subcommand a second-wall drill process is started with. Only
/// the escape suite starts it; the service never does, and it reads no
/// config file: its one argument is a worker's start arguments.
pub(crate) const DRILL_SUBCOMMAND: &str = bulkhead_suite::DRILL_SUBCOMMAND;

/// The second-wall drill's process, started by the escape suite exactly as
/// the gateway starts a worker (`bulkhead::worker::process`): parses
/// the [`WorkerArgs`](bulkhead::worker::WorkerArgs) it was given, hardens
/// itself with the worker's own plan and function
/// ([`WorkerArgs::plan`](bulkhead::worker::WorkerArgs::plan),
/// [`harden::apply`](bulkhead::worker::harden::apply)), and only then runs
/// native attacks from inside, reporting each attempt on its channel. The
/// suite judges from the host; nothing the drill says is the verdict.
///
/// Runs before logging and the async runtime start: the process is
/// single-threaded, as hardening requires.
pub(crate) fn drill_child(args: Vec<std::ffi::OsString>) -> ExitCode {
    use bulkhead::worker::{CHANNEL_FD, WorkerArgs, harden, process};

    let [json] = args.as_slice() else {
        return ExitCode::from(crate::EXIT_USAGE);
    };
    let Some(worker) = json
        .to_str()
        .and_then(|j| serde_json::from_str::<WorkerArgs>(j).ok())
    else {
        return ExitCode::from(crate::EXIT_USAGE);
    };
    let plan = worker.plan(CHANNEL_FD);
    let applied = harden::apply(&plan);
    let Some(channel) = process::inherited_channel() else {
        return ExitCode::from(crate::EXIT_USAGE);
    };
    bulkhead_suite::attack_from_inside(channel, applied)
}

pub(crate) async fn escape_suite(args: SuiteArgs) -> anyhow::Result<ExitCode> {
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
        in_process: args.host.in_process,
        drill_program: None,
        drill_weaken: std::collections::BTreeSet::new(),
    };
    if args.list {
        for a in suite::select(&options)? {
            println!("{:<34} {:<12} {}", a.id, a.class.as_str(), a.title);
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
