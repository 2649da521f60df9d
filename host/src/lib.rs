//! Bulkhead runs risky processing code as WebAssembly components, each job in
//! its own compartment.
//!
//! - [`policy`]: TOML policy → typed, validated [`policy::Policy`]; knows
//!   nothing about wasmtime.
//! - [`job`]: what a job is and yields ([`job::JobSpec`],
//!   [`job::JobReport`]) as plain data, and the egress seam; names neither
//!   wasmtime nor the relay.
//! - [`sandbox`]: engine, limits, the guest's WASI view, running a job; the
//!   only module that names wasmtime types.
//! - [`relay`]: the outbound gate: guest `wasi:http` requests to declared
//!   internal services, with host-minted call tokens and their keys.
//! - [`auth`]: reference tokens and caller identity.
//! - [`store`]: tokens, jobs and audit behind the `JobStore` trait (SQLite).
//! - [`service`]: accepting, scheduling, running and recovering jobs.
//! - [`api`]: the axum HTTP API (public and admin); never names wasmtime types.
//! - [`serve`]: the edge: listeners, connection timeouts and budgets,
//!   bounded shutdown, the bound on audit entries anonymous callers cause.
//! - [`config`]: the service's TOML config.
//!
//! The escape suite (`bulkhead-suite`), the command line (`bulkhead-cli`)
//! and the built guests (`bulkhead-artifacts`) are crates of their own: this
//! library depends on none of them.

pub mod api;
pub mod auth;
pub mod blob;
pub mod config;
pub mod job;
pub mod policy;
pub mod relay;
pub mod runner;
pub mod sandbox;
pub mod serve;
pub mod service;
pub mod store;
pub mod trust;
pub mod worker;

/// Runs `f`, which may block for long (a large copy, a walk of many rows),
/// without holding up the other tasks of the async thread it is called
/// on: on a multi-threaded tokio runtime the thread hands them over first
/// (`block_in_place`); elsewhere `f` just runs.
pub(crate) fn blocking<T>(f: impl FnOnce() -> T) -> T {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(f)
    } else {
        f()
    }
}

/// Whether a task waiting for its turn ran while `work` held the only
/// worker thread of a runtime, never yielding: it can only if `work`
/// moved off that thread's turn ([`blocking`]). `work` is repeated, never
/// yielding, until the task ran, 20 times at most.
#[cfg(test)]
pub(crate) fn another_task_runs_meanwhile(work: impl Fn() + Send + 'static) -> bool {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::spawn(async move {
            let ran = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
            let other = std::sync::Arc::clone(&ran);
            tokio::spawn(async move { other.store(true, std::sync::atomic::Ordering::SeqCst) });
            for _ in 0..20 {
                work();
                if ran.load(std::sync::atomic::Ordering::SeqCst) {
                    return true;
                }
            }
            false
        })
        .await
        .unwrap()
    })
}
