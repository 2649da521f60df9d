//! Guests in the shared sandbox: one [`Sandbox`] for the whole test process
//! (with an on-disk module cache so each guest compiles once), guests
//! loaded under typed policies, and helpers that run a job and keep its
//! directory for host-side inspection.

use std::path::PathBuf;
use std::sync::{Arc, LazyLock};

use bulkhead::policy::Limits;
use bulkhead::sandbox::{
    JobDir, JobInput, JobReport, JobSpec, LoadedModule, Sandbox, SandboxConfig,
};

use super::policies::{TestPolicy, policy};

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

/// Loads the guest at `guest` into `sandbox` under `policy`.
pub fn load_in(sandbox: &Sandbox, guest: &str, policy: &TestPolicy) -> Arc<LoadedModule> {
    sandbox
        .load(policy.parse(), &wasm(guest))
        .unwrap_or_else(|e| panic!("{e}"))
}

/// Loads the guest at `guest` into the shared sandbox under `policy`.
pub fn load(guest: &str, policy: &TestPolicy) -> Arc<LoadedModule> {
    load_in(&SANDBOX, guest, policy)
}

/// Loads the guest at `guest` as module `name` under a policy with only
/// the defaults.
pub fn load_plain(guest: &str, name: &str) -> Arc<LoadedModule> {
    load(guest, &policy(guest, name))
}

/// The hostile guest running `mode` with its limits changed by `limits`
/// and every parameter it understands allowed.
pub fn hostile(mode: &str, limits: impl FnOnce(&mut Limits)) -> Arc<LoadedModule> {
    load(
        bulkhead_tests::HOSTILE,
        &policy(bulkhead_tests::HOSTILE, "hostile")
            .limits(limits)
            .args(&[mode])
            .params(&["target", "port", "canary"])
            .env(&[("GREETING", "hi")]),
    )
}

/// The hostile guest running `mode` with its limits changed by `limits`,
/// accepting the parameters `params`.
pub fn hostile_with(
    mode: &str,
    params: &[&str],
    limits: impl FnOnce(&mut Limits),
) -> Arc<LoadedModule> {
    load(
        bulkhead_tests::HOSTILE,
        &policy(bulkhead_tests::HOSTILE, "hostile")
            .limits(limits)
            .args(&[mode])
            .params(params),
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

/// Runs `job` in `sandbox` and returns the report with the job directory
/// still on disk.
pub async fn run_in(
    sandbox: &Sandbox,
    module: &LoadedModule,
    job: &JobSpec,
) -> (JobReport, JobDir) {
    let dir = JobDir::create(&sandbox.config().work_dir, &job.id).unwrap();
    let report = sandbox.run(module, job, &dir).await.unwrap();
    (report, dir)
}

/// Runs `job` in the shared sandbox; see [`run_in`].
pub async fn run(module: &LoadedModule, job: &JobSpec) -> (JobReport, JobDir) {
    run_in(&SANDBOX, module, job).await
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

/// A pool of one worker for the `untrusted` zone over `tmp`'s cache (a
/// restart of the service is a new pool over the same cache), each pool
/// with its own work directory.
pub async fn workers(
    tmp: &std::path::Path,
    name: &str,
    jobs_per_worker: u32,
) -> bulkhead::runner::Workers {
    workers_watched(tmp, name, jobs_per_worker, 2).await.0
}

/// The faults a pool reported, as its owner saw them.
pub type Faults = std::sync::Arc<std::sync::Mutex<Vec<bulkhead::worker::pool::Fault>>>;

/// [`workers`], running up to `max_concurrent_jobs` at once in its
/// worker, with the faults it reports.
pub async fn workers_watched(
    tmp: &std::path::Path,
    name: &str,
    jobs_per_worker: u32,
    max_concurrent_jobs: u32,
) -> (bulkhead::runner::Workers, Faults) {
    workers_within(tmp, name, jobs_per_worker, max_concurrent_jobs, None).await
}

/// [`workers_watched`], its worker under memory ceiling `memory`.
pub async fn workers_within(
    tmp: &std::path::Path,
    name: &str,
    jobs_per_worker: u32,
    max_concurrent_jobs: u32,
    memory: Option<u64>,
) -> (bulkhead::runner::Workers, Faults) {
    let program = env!("CARGO_BIN_EXE_bulkhead-under-test").into();
    workers_from(
        tmp,
        name,
        program,
        jobs_per_worker,
        max_concurrent_jobs,
        memory,
    )
    .await
}

/// A link to the `withholding-worker` test binary, `worker-<mode>` in
/// `dir`: started as a zone's workers ([`workers_from`]), the compromised
/// worker its name asks for (`-deaf`, `-slow`, `-discard`, `-blind`,
/// `-forge`, `-claim`; see that binary).
pub fn withholding(dir: &std::path::Path, mode: &str) -> std::path::PathBuf {
    let program = dir.join(format!("worker-{mode}"));
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_withholding-worker"), &program).unwrap();
    program
}

/// [`workers_within`], its workers started from `program`.
pub async fn workers_from(
    tmp: &std::path::Path,
    name: &str,
    program: std::path::PathBuf,
    jobs_per_worker: u32,
    max_concurrent_jobs: u32,
    memory: Option<u64>,
) -> (bulkhead::runner::Workers, Faults) {
    let work = tmp.join("work").join(name);
    let mut config = bulkhead::sandbox::SandboxConfig::new(&work);
    config.cache_dir = Some(tmp.join("cache"));
    let faults = Faults::default();
    let sink = std::sync::Arc::clone(&faults);
    let pool = bulkhead::worker::pool::Pool::start(
        bulkhead::worker::pool::PoolConfig {
            zone: "untrusted".into(),
            program,
            workers: 1,
            jobs_per_worker,
            max_concurrent_jobs,
            memory,
            disk: Some(bulkhead::config::ZonePool::default().disk.as_u64()),
            work_dir: work.join("zones/untrusted"),
            work_held: None,
            cache_dir: tmp.join("cache/zones/untrusted"),
            cache_held: None,
            run_as: None,
            max_open: bulkhead::worker::WORKER_MAX_OPEN,
            max_threads: bulkhead::worker::WORKER_MAX_THREADS,
            require: bulkhead::worker::harden::Layer::ALL.into_iter().collect(),
            weaken: Default::default(),
        },
        move |fault| sink.lock().unwrap().push(fault),
    )
    .await
    .unwrap();
    let runner = bulkhead::runner::Workers::new(
        config,
        std::iter::once(("untrusted".to_owned(), pool)).collect(),
    );
    (runner, faults)
}

/// `guest` loaded by `runner` under a test policy named `name`.
pub async fn load_in_workers(
    runner: &bulkhead::runner::Workers,
    guest: &str,
    name: &str,
) -> std::sync::Arc<bulkhead::runner::Module> {
    load_policy_in_workers(runner, guest, super::policy(guest, name)).await
}

/// `guest` loaded by `runner` under `policy`.
pub async fn load_policy_in_workers(
    runner: &bulkhead::runner::Workers,
    guest: &str,
    policy: TestPolicy,
) -> std::sync::Arc<bulkhead::runner::Module> {
    use bulkhead::runner::Runner;
    let name = policy.parse().module.name.to_string();
    runner
        .load(policy.parse(), bytes::Bytes::from(wasm(guest)))
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The memory cgroup file that holds process `pid`'s memory limit:
/// `memory.max` (v2) or `memory.limit_in_bytes` (v1).
pub fn memory_limit_file(pid: u32) -> std::path::PathBuf {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next().unwrap(), parts.next().unwrap());
        if controllers.split(',').any(|c| c == "memory") {
            return std::path::PathBuf::from(format!(
                "/sys/fs/cgroup/memory{path}/memory.limit_in_bytes"
            ));
        }
        if controllers.is_empty() {
            let v2 = std::path::PathBuf::from(format!("/sys/fs/cgroup{path}/memory.max"));
            if v2.exists() {
                return v2;
            }
        }
    }
    panic!("no memory cgroup for {pid}: {cgroups}");
}

/// The directory of the CPU cgroup that `/proc/<task>/cgroup` names
/// (`task`: a pid, or `<pid>/task/<tid>`): v1's `cpu` hierarchy, or v2's
/// one cgroup where it has `cpu.weight`. `None` when it names neither.
pub fn cpu_cgroup(task: &str) -> Option<std::path::PathBuf> {
    let cgroups = std::fs::read_to_string(format!("/proc/{task}/cgroup")).ok()?;
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next(), parts.next()?, parts.next()?);
        if controllers.split(',').any(|c| c == "cpu") {
            return Some(std::path::PathBuf::from(format!(
                "/sys/fs/cgroup/cpu{path}"
            )));
        }
        if controllers.is_empty() {
            let v2 = std::path::PathBuf::from(format!("/sys/fs/cgroup{path}"));
            if v2.join("cpu.weight").exists() {
                return Some(v2);
            }
        }
    }
    None
}

/// The memory cgroup file `name` beside process `pid`'s limit (v1's
/// `memory.max_usage_in_bytes`, v2's `memory.peak`, ...).
pub fn memory_file(pid: u32, v1: &str, v2: &str) -> std::path::PathBuf {
    let limit = memory_limit_file(pid);
    let v1_layout = limit.ends_with("memory.limit_in_bytes");
    limit.with_file_name(if v1_layout { v1 } else { v2 })
}

/// A core module of one function `_start` (or `_initialize`), a memory of
/// `pages` pages, and the given function imports (all `() -> ()`); `tail`
/// (sections after the code) is appended.
pub fn core_module(start: &str, imports: &[(&str, &str)], pages: u64, tail: &[u8]) -> Vec<u8> {
    use wasm_encoder::{
        CodeSection, EntityType, ExportKind, ExportSection, Function, FunctionSection,
        ImportSection, Instruction, MemorySection, MemoryType, Module, TypeSection,
    };
    let mut module = Module::new();
    let mut types = TypeSection::new();
    types.ty().function([], []);
    module.section(&types);
    let mut section = ImportSection::new();
    for (m, n) in imports {
        section.import(m, n, EntityType::Function(0));
    }
    module.section(&section);
    let mut functions = FunctionSection::new();
    functions.function(0);
    module.section(&functions);
    let mut memories = MemorySection::new();
    memories.memory(MemoryType {
        minimum: pages,
        maximum: None,
        memory64: false,
        shared: false,
        page_size_log2: None,
    });
    module.section(&memories);
    let mut exports = ExportSection::new();
    exports.export(start, ExportKind::Func, imports.len() as u32);
    exports.export("memory", ExportKind::Memory, 0);
    module.section(&exports);
    let mut code = CodeSection::new();
    let mut body = Function::new([]);
    body.instruction(&Instruction::End);
    code.function(&body);
    module.section(&code);
    let mut bytes = module.finish();
    bytes.extend_from_slice(tail);
    bytes
}

/// Waits until `f` holds, looking every 50 ms; panics after 20 s.
pub async fn until(mut f: impl FnMut() -> bool) {
    for _ in 0..400 {
        if f() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("condition not reached in 20 s");
}
