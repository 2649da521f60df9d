//! The shared harness: one [`Sandbox`] for the whole test process (with an
//! on-disk module cache so each guest compiles once), policies written for a
//! guest with its real digest, and helpers that run a job and keep its
//! directory for host-side inspection.

use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock};

use bulkhead::policy::{Policy, Sha256Hex};
use bulkhead::sandbox::{
    JobDir, JobInput, JobReport, JobSpec, LoadedModule, Sandbox, SandboxConfig,
};

/// Scratch space for job directories and the module cache of this process.
pub static SCRATCH: LazyLock<tempfile::TempDir> = LazyLock::new(|| {
    tempfile::Builder::new()
        .prefix("bulkhead-it-")
        .tempdir()
        .unwrap()
});

/// The process-wide sandbox.
pub static SANDBOX: LazyLock<Sandbox> = LazyLock::new(|| {
    let mut config = SandboxConfig::new(SCRATCH.path().join("jobs"));
    // The cache lives in cargo's target tmp dir so repeated test runs reuse
    // compiled guests; it is keyed by engine and module digest.
    config.cache_dir = Some(PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("module-cache"));
    config.max_concurrent_jobs = 32;
    Sandbox::new(config).expect("sandbox")
});

/// The bytes of a built guest.
pub fn wasm(path: &str) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading guest {path}: {e}"))
}

/// Policy text for `name` pinned to the guest at `path`, with `body` appended
/// (tables and keys after `[module]`).
pub fn policy_text(path: &str, name: &str, body: &str) -> String {
    let digest = Sha256Hex::digest(&wasm(path));
    format!("version = 1\n[module]\nname = \"{name}\"\nsha256 = \"{digest}\"\n{body}\n")
}

/// Loads the guest at `path` under a policy built by [`policy_text`].
pub fn load(path: &str, name: &str, body: &str) -> Arc<LoadedModule> {
    let text = policy_text(path, name, body);
    let policy =
        Policy::parse(&text, Path::new("test.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"));
    SANDBOX
        .load(policy, &wasm(path))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The hostile guest running `mode`, with `limits` as the `[limits]` body
/// and every parameter it understands allowed.
pub fn hostile(mode: &str, limits: &str) -> Arc<LoadedModule> {
    load(
        bulkhead_tests::HOSTILE,
        "hostile",
        &format!(
            "[limits]\n{limits}\n[run]\nargs = [\"{mode}\"]\nparams = [\"target\", \"port\", \"canary\"]\nenv = {{ GREETING = \"hi\" }}\n"
        ),
    )
}

/// A spec with the given inputs and parameters.
pub fn spec(inputs: &[(&str, &[u8])], params: &[(&str, &str)]) -> JobSpec {
    let mut job = JobSpec::new();
    job.inputs = inputs
        .iter()
        .map(|(n, d)| JobInput {
            name: (*n).to_owned(),
            data: d.to_vec().into(),
        })
        .collect();
    job.params = params
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    job
}

/// Runs `job` and returns the report with the job directory still on disk.
pub async fn run(module: &LoadedModule, job: &JobSpec) -> (JobReport, JobDir) {
    let dir = JobDir::create(&SANDBOX.config().work_dir, &job.id).unwrap();
    let report = SANDBOX.run(module, job, &dir).await.unwrap();
    (report, dir)
}

/// File bytes and entries under `dir`, counted with `lstat` (never
/// following links), as the host's disk sees them.
pub fn disk_usage(dir: &Path) -> (u64, u64) {
    let mut bytes = 0;
    let mut entries = 0;
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let e = e.unwrap();
            let meta = std::fs::symlink_metadata(e.path()).unwrap();
            entries += 1;
            if meta.is_dir() {
                stack.push(e.path());
            } else {
                // Apparent size or allocated blocks, whichever is larger: a
                // sparse file counts at its full length.
                let allocated = std::os::unix::fs::MetadataExt::blocks(&meta) * 512;
                bytes += meta.len().max(allocated);
            }
        }
    }
    (bytes, entries)
}

/// Every byte the job produced that a breach could leave evidence in: its
/// stdout, stderr and collected outputs.
pub fn all_evidence(report: &JobReport, dir: &JobDir) -> Vec<u8> {
    let mut all = report.stdout.text.clone().into_bytes();
    all.extend(report.stderr.text.as_bytes());
    for o in &report.outputs {
        all.extend(std::fs::read(dir.output_dir().join(&o.name)).unwrap());
    }
    all
}

/// Whether `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
