//! Sandbox benchmarks; figures and how to read them are in BENCHMARKS.md.
//!
//! - `job_overhead`: a hello-world component per job, side by side: a bare
//!   wasmtime loop (pooling allocator + `InstancePre`, a default WASI
//!   context, nothing else), the same with Bulkhead's pool reset tuning,
//!   Bulkhead's full job (policy-built WASI context,
//!   every limit, fresh job directory, `/out` quota, output collection), and —
//!   when a `wasmtime` CLI is on `PATH` — spawning `wasmtime run` per job as a
//!   naive runner would.
//! - `thumbnail`: the same Rust thumbnail code natively and in the sandbox, on
//!   a 2048×1536 PNG.
//!
//! Run: `cargo bench -p bulkhead-tests --bench sandbox`.

use std::io::Cursor;
use std::path::Path;

use bulkhead::runner::Runner;

use bulkhead::policy::{ByteSize, HumanDuration};
use bulkhead::sandbox::{JobDir, JobInput, JobSpec, Sandbox, SandboxConfig};
use criterion::{Criterion, criterion_group, criterion_main};
use wasmtime::component::{Component, Linker, ResourceTable};
use wasmtime::{Config, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::p2::bindings::CommandPre;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

// The tests' typed policies.
#[path = "../tests/all/common/policies.rs"]
mod policies;

use policies::policy;

struct Bare {
    ctx: WasiCtx,
    table: ResourceTable,
}

impl WasiView for Bare {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

/// A bare engine with `pool`, and `wasm` pre-instantiated against wasmtime's
/// own WASI linker.
fn bare(pool: PoolingAllocationConfig, wasm: &[u8]) -> (Engine, CommandPre<Bare>) {
    let mut config = Config::new();
    config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    let engine = Engine::new(&config).unwrap();
    let mut linker = Linker::<Bare>::new(&engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker).unwrap();
    let component = Component::new(&engine, wasm).unwrap();
    let pre = CommandPre::new(linker.instantiate_pre(&component).unwrap()).unwrap();
    (engine, pre)
}

/// One hello job under a bare engine: a default WASI context with stdout
/// captured, instantiate, run.
async fn run_bare_hello(engine: &Engine, pre: &CommandPre<Bare>) {
    let ctx = WasiCtxBuilder::new()
        .stdout(MemoryOutputPipe::new(4096))
        .build();
    let table = ResourceTable::new();
    let mut store = Store::new(engine, Bare { ctx, table });
    let cmd = pre.instantiate_async(&mut store).await.unwrap();
    cmd.wasi_cli_run()
        .call_run(&mut store)
        .await
        .unwrap()
        .unwrap();
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn sandbox(tmp: &Path) -> Sandbox {
    // Job directories where the service puts them by default (tmpfs when
    // the machine has one); the module cache in a scratch directory.
    let mut config = SandboxConfig::new(bulkhead::sandbox::default_work_dir("bench"));
    config.cache_dir = Some(tmp.join("cache"));
    Sandbox::new(config).unwrap()
}

/// A worker pool of one fully hardened worker for the `untrusted` zone,
/// started from the binary under test.
async fn worker_runner(tmp: &Path) -> bulkhead::runner::Workers {
    use bulkhead::worker::pool::{Pool, PoolConfig};
    let mut config = SandboxConfig::new(tmp.join("work"));
    config.cache_dir = Some(tmp.join("cache"));
    let pool = Pool::start(
        PoolConfig {
            zone: "untrusted".into(),
            program: env!("CARGO_BIN_EXE_bulkhead-under-test").into(),
            workers: 1,
            jobs_per_worker: 0,
            max_concurrent_jobs: 4,
            memory: None,
            disk: Some(bulkhead::config::ZonePool::default().disk.as_u64()),
            work_dir: tmp.join("work/zones/untrusted"),
            work_held: None,
            cache_dir: tmp.join("cache/zones/untrusted"),
            cache_held: None,
            run_as: None,
            max_open: bulkhead::worker::WORKER_MAX_OPEN,
            max_threads: bulkhead::worker::WORKER_MAX_THREADS,
            require: bulkhead::worker::harden::Layer::ALL.into_iter().collect(),
            weaken: Default::default(),
        },
        |_| {},
    )
    .await
    .unwrap();
    bulkhead::runner::Workers::new(
        config,
        std::iter::once(("untrusted".to_owned(), pool)).collect(),
    )
}

fn job_overhead(c: &mut Criterion) {
    let rt = runtime();
    let wasm = std::fs::read(bulkhead_tests::HELLO).unwrap();
    let mut group = c.benchmark_group("job_overhead");

    // The bare loop: what wasmtime itself costs per instantiate + run.
    let (engine, pre) = bare(PoolingAllocationConfig::new(), &wasm);
    group.bench_function("bare_wasmtime", |b| {
        b.iter(|| rt.block_on(run_bare_hello(&engine, &pre)))
    });

    // The same bare loop with the pool reset tuning Bulkhead's engine uses
    // (memory reset in place with PAGEMAP_SCAN instead of madvise), so the
    // ratio to it isolates the sandbox's own per-job work.
    let mut pool = PoolingAllocationConfig::new();
    pool.linear_memory_keep_resident(16 * 1024 * 1024)
        .table_keep_resident(64 * 1024)
        .pagemap_scan(wasmtime::Enabled::Auto)
        .decommit_batch_size(8);
    let (tuned_engine, tuned_pre) = bare(pool, &wasm);
    group.bench_function("bare_wasmtime_tuned_pool", |b| {
        b.iter(|| rt.block_on(run_bare_hello(&tuned_engine, &tuned_pre)))
    });

    // Bulkhead's full per-job path.
    let tmp = tempfile::tempdir().unwrap();
    let sandbox = sandbox(tmp.path());
    let module = sandbox
        .load(policy(bulkhead_tests::HELLO, "hello").parse(), &wasm)
        .unwrap();
    group.bench_function("bulkhead_job", |b| {
        b.iter(|| {
            rt.block_on(async {
                let job = JobSpec::new();
                let dir = JobDir::create(&sandbox.config().work_dir, &job.id).unwrap();
                let report = sandbox.run(&module, &job, &dir).await.unwrap();
                assert!(report.succeeded());
            })
        })
    });

    // The same job through the worker path the service uses by default:
    // the gateway's side, the channel, a fully hardened worker process.
    let worker_tmp = tempfile::tempdir().unwrap();
    let runner = rt.block_on(worker_runner(worker_tmp.path()));
    let worker_module = rt
        .block_on(runner.load(
            policy(bulkhead_tests::HELLO, "hello").parse(),
            wasm.clone().into(),
        ))
        .unwrap();
    group.bench_function("bulkhead_job_worker", |b| {
        b.iter(|| {
            rt.block_on(async {
                let job = JobSpec::new();
                let finished = runner.run(&worker_module, &job, None).await.unwrap();
                assert!(finished.report.succeeded());
            })
        })
    });
    // What one idle worker holds after its jobs: resident memory.
    for (zone, pids) in runner.state().workers {
        for pid in pids {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let rss = status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .unwrap_or("VmRSS: ?");
            eprintln!("job_overhead/bulkhead_job_worker: worker {pid} of zone {zone}: {rss}");
        }
    }
    runner.close();

    // Starting a worker: exec, hardening, the sandbox, the hello exchange.
    group.sample_size(10);
    group.bench_function("worker_start", |b| {
        b.iter(|| {
            let tmp = tempfile::tempdir().unwrap();
            let runner = rt.block_on(worker_runner(tmp.path()));
            runner.close();
        })
    });
    group.sample_size(100);

    // A naive runner: one `wasmtime run` process per job.
    if std::process::Command::new("wasmtime")
        .arg("--version")
        .output()
        .is_ok()
    {
        group.sample_size(20);
        group.bench_function("wasmtime_cli_per_job", |b| {
            b.iter(|| {
                let out = std::process::Command::new("wasmtime")
                    .arg("run")
                    .arg(bulkhead_tests::HELLO)
                    .output()
                    .unwrap();
                assert!(out.status.success());
            })
        });
    } else {
        eprintln!("job_overhead/wasmtime_cli_per_job: skipped, no `wasmtime` on PATH");
    }
    group.finish();
}

fn big_png() -> Vec<u8> {
    // A photo-like 2048x1536 image: gradients plus pseudo-random noise, so
    // the PNG codec does real work.
    let mut seed = 0x2545_f491_u32;
    let img = image::RgbImage::from_fn(2048, 1536, |x, y| {
        seed ^= seed << 13;
        seed ^= seed >> 17;
        seed ^= seed << 5;
        let n = (seed & 0x1f) as u8;
        image::Rgb([(x / 8) as u8 ^ n, (y / 6) as u8 ^ n, ((x + y) / 14) as u8])
    });
    let mut bytes = Vec::new();
    img.write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
        .unwrap();
    bytes
}

fn thumbnail(c: &mut Criterion) {
    let rt = runtime();
    let png = big_png();
    let mut group = c.benchmark_group("thumbnail_2048x1536");
    group.sample_size(20);
    group.bench_function("native", |b| {
        b.iter(|| bulkhead_guest_thumbnail::make_thumbnail(&png, 256, 256).unwrap())
    });

    // The same guest under a bare wasmtime loop (default pooling engine, a
    // fixed preopened /in and /out, no limits): separates wasmtime's own
    // cost from the sandbox's.
    let wasm = std::fs::read(bulkhead_tests::THUMBNAIL).unwrap();
    let bare_dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(bare_dir.path().join("in")).unwrap();
    std::fs::create_dir_all(bare_dir.path().join("out")).unwrap();
    std::fs::write(bare_dir.path().join("in/big.png"), &png).unwrap();
    let (engine, pre) = bare(PoolingAllocationConfig::new(), &wasm);
    group.bench_function("bare_wasmtime", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut builder = WasiCtxBuilder::new();
                builder
                    .allow_blocking_current_thread(true)
                    .args(&["thumbnail", "--width=256", "--height=256"])
                    .preopened_dir(
                        bare_dir.path().join("in"),
                        "/in",
                        wasmtime_wasi::FsPerms::ReadOnly,
                    )
                    .unwrap()
                    .preopened_dir(
                        bare_dir.path().join("out"),
                        "/out",
                        wasmtime_wasi::FsPerms::ReadWrite,
                    )
                    .unwrap();
                let ctx = builder.build();
                let mut store = Store::new(
                    &engine,
                    Bare {
                        ctx,
                        table: ResourceTable::new(),
                    },
                );
                let cmd = pre.instantiate_async(&mut store).await.unwrap();
                cmd.wasi_cli_run()
                    .call_run(&mut store)
                    .await
                    .unwrap()
                    .unwrap();
            })
        })
    });

    let tmp = tempfile::tempdir().unwrap();
    let sandbox = sandbox(tmp.path());
    let policy = policy(bulkhead_tests::THUMBNAIL, "thumbnail")
        .memory(ByteSize::mib(256))
        .times(HumanDuration::secs(10), HumanDuration::secs(30))
        .params(&["width", "height"])
        .parse();
    let module = sandbox.load(policy, &wasm).unwrap();
    let png = bytes::Bytes::from(png);
    group.bench_function("sandboxed", |b| {
        b.iter(|| {
            rt.block_on(async {
                let mut job = JobSpec::new();
                job.inputs = vec![JobInput {
                    name: "big.png".into(),
                    data: png.clone(),
                }];
                job.params = [("width", "256"), ("height", "256")]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect();
                let dir = JobDir::create(&sandbox.config().work_dir, &job.id).unwrap();
                let report = sandbox.run(&module, &job, &dir).await.unwrap();
                assert!(report.succeeded(), "{report:?}");
            })
        })
    });
    group.finish();
}

criterion_group!(benches, job_overhead, thumbnail);
criterion_main!(benches);
