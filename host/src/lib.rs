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

/// Runs the test `test` of this binary again, in a child in a user and
/// mount namespace of its own (`unshare --map-root-user --mount`), once
/// each `(source, target)` of `binds`, paths below `dir`, is bind-mounted;
/// the child finds `dir` in the environment variable `env`, and the test
/// asserts there. Panics unless the child succeeds.
#[cfg(test)]
pub(crate) fn rerun_with_binds(
    test: &str,
    env: &str,
    dir: &std::path::Path,
    binds: &[(&str, &str)],
) {
    let mut script = String::new();
    for (source, target) in binds {
        script.push_str(&format!("mount --bind \"$1/{source}\" \"$1/{target}\" && "));
    }
    script.push_str(&format!(
        "exec \"$0\" --exact --test-threads=1 --nocapture {test}"
    ));
    let status = std::process::Command::new("unshare")
        .args(["--map-root-user", "--mount", "sh", "-c", &script])
        .arg(std::env::current_exe().unwrap())
        .arg(dir)
        .env(env, dir)
        .status()
        .expect("unshare(1) runs");
    assert!(status.success(), "the child in a mount namespace: {status}");
}

/// A lock file in `dir` held by another process (`flock(1)`), as a
/// running service holds it: `exclusive` as a data or work
/// directory's, else shared as a cache's. Let go of when dropped.
#[cfg(test)]
pub(crate) struct LockHolder(std::process::Child);

#[cfg(test)]
impl LockHolder {
    pub(crate) fn new(dir: &std::path::Path, lock: &str, exclusive: bool) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("store"), b"theirs").unwrap();
        let file = dir.join(lock);
        std::fs::write(&file, b"").unwrap();
        // `--no-fork`: the process holding the lock is the one killed.
        let child = std::process::Command::new("flock")
            .arg("--no-fork")
            .arg(if exclusive { "--exclusive" } else { "--shared" })
            .arg(&file)
            .args(["sleep", "600"])
            .spawn()
            .expect("flock(1) runs");
        let holder = Self(child);
        let opened = std::fs::File::open(&file).unwrap();
        for _ in 0..500 {
            if crate::sandbox::held(&opened, lock).unwrap() {
                return holder;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("flock(1) never took {}", file.display());
    }
}

#[cfg(test)]
impl Drop for LockHolder {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
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
