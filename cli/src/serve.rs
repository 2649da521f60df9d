//! `bulkhead serve`: the HTTP service on its two listeners until a signal
//! drains it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Config file (TOML); without it, the built-in defaults.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
}

pub(crate) async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let config = match &args.config {
        Some(path) => bulkhead::config::ServeConfig::load(path)?,
        None => bulkhead::config::ServeConfig::default(),
    };
    let public_addr = config.server.listen;
    let admin_addr = config.server.admin_listen;
    let data_dir = config.storage.data_dir.clone();
    // Requests to stop are taken from now on: one arriving while the
    // service starts ends the start (nothing runs yet: jobs it claimed are
    // taken back by the next start), one arriving later drains it.
    let stop = stop_signals();
    // The start is dropped before anything is waited for: a select! keeps
    // its futures until its arms have run, and a start kept alive while
    // its workers were waited for kept them (found by an attacker: a stop
    // while the first workers said hello left one unreaped, with its
    // cgroup, 6 runs of 12).
    let started = tokio::select! {
        started = bulkhead::service::Service::start(config, None) => Some(started),
        () = stop.notified() => None,
    };
    let service = match started {
        Some(Ok(service)) => service,
        Some(Err(e)) => {
            // A start refused (a module, the storage) took the workers
            // it had started down with it: they are gone, and their
            // cgroups removed, before the process is (found by an
            // attacker: a start refused for a module left them).
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(3),
                bulkhead::worker::pool::all_ended(),
            )
            .await;
            return Err(e.into());
        }
        None => {
            eprintln!("stopped while starting");
            // The workers started so far go with the start: their cgroups
            // are removed as their processes are reaped.
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(3),
                bulkhead::worker::pool::all_ended(),
            )
            .await;
            return Ok(ExitCode::SUCCESS);
        }
    };
    let bound = async {
        let listeners = bulkhead::serve::Listeners::bind(public_addr, admin_addr).await?;
        // Print the bound addresses: a config may ask for port 0.
        let addrs = listeners.local_addrs()?;
        anyhow::Ok((listeners, addrs))
    };
    let (listeners, (public_addr, admin_addr)) = match bound.await {
        Ok(bound) => bound,
        Err(e) => {
            // A start refused for its listeners (an address taken) takes
            // the workers it started down with it, as a refused module
            // does: they are gone, and their cgroups removed, before the
            // process is (found by an attacker: an admin port taken left
            // both workers of the zone, their cgroups charged, until the
            // next start).
            service.shutdown().await;
            return Err(e);
        }
    };
    // The data directory stays locked until the process is gone, past the
    // drain and the last audit entries: the kernel closes it at exit.
    std::mem::forget(service.take_locks());
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

    // On SIGTERM, SIGINT, SIGHUP or SIGQUIT: readiness turns 503 and running jobs get
    // `shutdown_grace`; then the listeners close and open connections get
    // `serve::CLOSE_MARGIN` before they are dropped. Nothing else is waited
    // for: the runtime is shut down without waiting (see `main`).
    let grace = service.config().server.shutdown_grace.get();
    let draining = async {
        stop.notified().await;
        eprintln!("shutting down: draining running jobs");
        exit_by(grace + bulkhead::serve::CLOSE_MARGIN + LAST_STEPS);
        service.shutdown().await;
    };
    bulkhead::serve::serve(std::sync::Arc::clone(&service), listeners, draining).await?;
    Ok(ExitCode::SUCCESS)
}

/// What the exit allows after the connections' margin: dropped
/// connections' tasks, the last audit summaries and the runtime are
/// budgeted 2.5 s; the process is ended 1.5 s after the margin, leaving
/// 1 s for the kernel to take it down (giving back gigabytes of memory
/// took 0.8 s), so time lost to a busy machine (late timers, a large store
/// closing) still ends within the bound the README states
/// (`shutdown_grace` + 4.5 s).
const LAST_STEPS: std::time::Duration = std::time::Duration::from_millis(1500);

/// Ends the process `after` from now, whatever is still running then: a
/// thread of its own, so neither a busy runtime nor a stuck destructor
/// holds it. Every job's result is in the store by then, or never will be
/// (it is re-run at the next start).
fn exit_by(after: std::time::Duration) {
    let spawned = std::thread::Builder::new()
        .name("bulkhead-exit".into())
        .spawn(move || {
            std::thread::sleep(after);
            eprintln!(
                "shutting down: still running {} s after the signal; exiting now",
                after.as_secs_f64()
            );
            // SAFETY: _exit(2) ends the process without running destructors
            // or atexit handlers, which may be what holds it.
            unsafe { libc::_exit(0) }
        });
    if let Err(e) = spawned {
        eprintln!("shutting down: no exit watchdog ({e}); exiting when drained");
    }
}

/// Takes requests to stop: SIGTERM, SIGINT (Ctrl-C), SIGHUP (its terminal
/// or session gone) and SIGQUIT, each notifying the returned `Notify`
/// (a permit kept until it is awaited). Each drains the same way; left to
/// their default, the last two would end the process at once, cutting every
/// running job and open request. The handlers are in place when this
/// returns. Should one not install, that signal keeps its default and the
/// others still drain.
fn stop_signals() -> std::sync::Arc<tokio::sync::Notify> {
    use tokio::signal::unix::{SignalKind, signal};
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    for kind in [
        SignalKind::terminate(),
        SignalKind::interrupt(),
        SignalKind::hangup(),
        SignalKind::quit(),
    ] {
        match signal(kind) {
            Ok(mut stream) => {
                let stop = std::sync::Arc::clone(&stop);
                tokio::spawn(async move {
                    stream.recv().await;
                    stop.notify_one();
                });
            }
            Err(e) => eprintln!("cannot handle signal {}: {e}", kind.as_raw_value()),
        }
    }
    stop
}
