//! End to end: a fully hardened worker builds the sandbox (pooling
//! allocator, parallel compilation, epoch ticker, module cache), compiles
//! guests and runs jobs; limits still end hostile jobs with their name.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;

use bulkhead::policy::{ByteSize, HumanDuration};
use bulkhead::sandbox::{JobDir, JobReport, JobSpec, LimitKind, Outcome, Sandbox, SandboxConfig};
use bulkhead::worker::harden::{self, Layer, LayerState};

use crate::child::{channel, plan, report};
use crate::policies::policy;
use crate::support::{all_but, expect_applied, give_to_nobody, scratch, start_with};

/// The jobs the worker runs: name, guest, hostile mode (if any).
const JOBS: &[(&str, &str)] = &[
    ("hello", ""),
    ("memory", "memory-bomb"),
    ("cpu", "loop"),
    ("wall", "sleep"),
    ("disk", "disk-big"),
    ("stdout", "stdout-flood"),
];

pub fn child() {
    let mut chan = channel();
    // Everything outside the writable directories is read before
    // hardening, as a real worker gets its modules over the channel.
    let plan = plan();
    let work_dir = plan.writable[0].join("jobs");
    let cache_dir = plan.writable[1].clone();
    let hello_wasm = std::fs::read(bulkhead_tests::HELLO).unwrap();
    let hostile_wasm = std::fs::read(bulkhead_tests::HOSTILE).unwrap();
    let hello = policy(bulkhead_tests::HELLO, "hello").parse();
    let hostile = |mode: &str| {
        policy(bulkhead_tests::HOSTILE, "hostile")
            .limits(|l| {
                l.memory = ByteSize::mib(32);
                l.cpu_time = HumanDuration::millis(300);
                l.wall_time = HumanDuration::secs(2);
                l.output = ByteSize::mib(1);
                l.stdout = ByteSize::kib(64);
            })
            .args(&[mode])
            .parse()
    };
    let policies: Vec<_> = JOBS
        .iter()
        .map(|(_, mode)| {
            if mode.is_empty() {
                (hello.clone(), &hello_wasm)
            } else {
                (hostile(mode), &hostile_wasm)
            }
        })
        .collect();

    let result = harden::apply(&plan).map_err(|e| e.to_string());
    report(&mut chan, &result);
    if result.is_err() {
        return;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let reply = runtime.block_on(async {
        let mut config = SandboxConfig::new(&work_dir);
        config.cache_dir = Some(cache_dir);
        config.max_concurrent_jobs = 4;
        let sandbox = Sandbox::new(config).map_err(|e| format!("sandbox: {e}"))?;
        let mut reports = Vec::new();
        for ((name, _), (policy, wasm)) in JOBS.iter().zip(policies) {
            let module = sandbox
                .load(policy, wasm)
                .map_err(|e| format!("loading {name}: {e}"))?;
            let job = JobSpec::new();
            let dir = JobDir::create(&work_dir, &job.id).map_err(|e| format!("{name}: {e}"))?;
            let report = sandbox
                .run(&module, &job, &dir)
                .await
                .map_err(|e| format!("running {name}: {e}"))?;
            reports.push(report);
        }
        Ok::<_, String>(reports)
    });
    let mut line = serde_json::to_string(&reply).unwrap();
    line.push('\n');
    chan.write_all(line.as_bytes()).unwrap();
    // Stays until told to go, so the parent can look at it.
    let mut order = String::new();
    let _ = BufReader::new(chan).read_line(&mut order);
}

pub fn runs_jobs() {
    let dir = scratch();
    let cache = scratch();
    let jobs = dir.path().join("jobs");
    std::fs::create_dir(&jobs).unwrap();
    give_to_nobody(&jobs);
    let writable: Vec<PathBuf> = vec![dir.path().to_owned(), cache.path().to_owned()];
    // The first worker compiles and fills the cache; the second loads the
    // cached native code.
    for round in ["compiling", "cached"] {
        let mut w = start_with("sandbox", &all_but(&[]), &writable, 256, &[]);
        let applied = expect_applied(&w);
        for layer in Layer::ALL {
            assert_eq!(applied.layers[&layer], LayerState::Active, "{layer:?}");
        }
        let mut line = String::new();
        let n = w.channel.read_line(&mut line).unwrap();
        if n == 0 {
            panic!("{round}: the worker died: {:?}", w.child.wait().unwrap());
        }
        let reports: Result<Vec<JobReport>, String> = serde_json::from_str(&line).unwrap();
        check_reports(&reports.unwrap());
        // It ran its jobs hardened.
        assert_eq!(w.status("Seccomp"), "2");
        assert_eq!(w.status("NoNewPrivs"), "1");
        let status = w.finish();
        assert!(status.success(), "{round}: {status:?}");
        // The module cache was written inside the writable directory.
        assert!(std::fs::read_dir(cache.path()).unwrap().count() > 0);
    }
}

/// hello succeeded; every hostile job ended with its own limit.
fn check_reports(reports: &[JobReport]) {
    assert_eq!(reports.len(), JOBS.len());
    assert!(reports[0].succeeded(), "{:#?}", reports[0]);
    assert_eq!(reports[0].stdout.text, "hello from bulkhead\n");
    let limits = [
        LimitKind::Memory,
        LimitKind::CpuTime,
        LimitKind::WallTime,
        LimitKind::Output,
        LimitKind::Stdout,
    ];
    for (report, limit) in reports[1..].iter().zip(limits) {
        assert_eq!(report.outcome, Outcome::Failed, "{report:#?}");
        assert_eq!(report.limit, Some(limit), "{report:#?}");
    }
}
