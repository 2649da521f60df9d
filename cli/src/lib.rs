//! The `bulkhead` command line: `run` a module locally exactly as the service
//! runs it, `check` a policy (and what a module imports against it), `serve`,
//! `token`, and `escape-suite`.
//!
//! Exit status: 0 the job succeeded (or the check passed, or every attack
//! of the escape suite held), 1 the job failed (trap, non-zero exit, limit)
//! or an attack was not held, 2 usage, policy or module errors. This crate
//! is the binary's edge: it may use `anyhow`; the library modules may not.

mod host;
mod jwks;
mod pin;
mod run;
mod serve;
mod suite;
mod token;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use run::{CheckArgs, RunArgs};
use serve::ServeArgs;
use suite::SuiteArgs;
use token::TokenCommand;

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
    /// Write a policy's module sha256 pin in place (or, with --new, scaffold a policy).
    Pin(pin::PinArgs),
    /// Print the call-token keys a config's key ring publishes (JWKS), for services verifying the
    /// tokens `run` mints.
    Jwks(jwks::JwksArgs),
    /// Run the HTTP service.
    Serve(ServeArgs),
    /// Manage client tokens directly on the service's store.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Run the escape-attempt suite: hostile guests against a policy (locally) or a service.
    EscapeSuite(SuiteArgs),
}

/// Exit status for usage, policy and module errors.
const EXIT_USAGE: u8 = 2;

/// Parses arguments, runs the command, prints errors with their causes.
pub fn main() -> ExitCode {
    // Processes the gateway starts harden themselves while they are still
    // single-threaded: before logging and the async runtime, and without
    // the public command line (these are not commands for people).
    let mut argv = std::env::args_os();
    if let (Some(_), Some(role)) = (argv.next(), argv.next()) {
        if role == bulkhead::worker::pool::WORKER_SUBCOMMAND {
            return bulkhead::worker::child::main(&argv.next().unwrap_or_default());
        }
        if role == suite::DRILL_SUBCOMMAND {
            return suite::drill_child(argv.collect());
        }
    }
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // Before the runtime starts its threads.
    bulkhead::serve::memory::tune();
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
            Command::Run(args) => run::run(args).await,
            Command::Check(args) => run::check(args).await,
            Command::Pin(args) => pin::pin(args),
            Command::Jwks(args) => jwks::jwks(args),
            Command::Serve(args) => serve::serve(args).await,
            Command::Token(cmd) => token::token(cmd).await,
            Command::EscapeSuite(args) => suite::escape_suite(args).await,
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
