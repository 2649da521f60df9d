//! A zone's compile cache is the gateway's: its workers only read it.
//! A worker that compiles a module hands the artifact over in its own
//! directory, and the gateway copies it into the cache and records it only
//! when the worker had run no guest. A worker loads a cached artifact only
//! when its bytes are the ones the gateway recorded. Judged on the host:
//! what the next worker runs, the cache and record files, and whether a
//! restart compiles again.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bulkhead::policy::Sha256Hex;
use bulkhead::runner::{Module, Runner, Workers};
use bulkhead::sandbox::{JobReport, JobSpec};
use bulkhead::worker::pool::records_dir;
use sha2::{Digest, Sha256};

use crate::common::{
    load_in_workers as load, load_policy_in_workers, wasm, workers, workers_watched,
};

fn zone_cache(tmp: &Path) -> PathBuf {
    tmp.join("cache/zones/untrusted")
}

async fn run(runner: &Workers, module: &Module) -> JobReport {
    runner
        .run(module, &JobSpec::new(), None)
        .await
        .unwrap()
        .report
}

/// The gateway's record for `guest` in the zone, if it has one.
fn record(tmp: &Path, guest: &str) -> Option<serde_json::Value> {
    let path =
        records_dir(&zone_cache(tmp)).join(format!("{}.json", Sha256Hex::digest(&wasm(guest))));
    std::fs::read(path)
        .ok()
        .map(|b| serde_json::from_slice(&b).unwrap())
}

/// Where the artifact recorded for `guest` lies in the zone's cache.
fn recorded_entry(tmp: &Path, guest: &str) -> PathBuf {
    let record = record(tmp, guest).expect("a record");
    zone_cache(tmp)
        .join(record["engine"].as_str().unwrap())
        .join(format!("{}.cwasm", record["sha256"].as_str().unwrap()))
}

/// Every file under `dir`, by path.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        if entry.file_type().unwrap().is_dir() {
            out.extend(files(&entry.path()));
        } else {
            out.push(entry.path());
        }
    }
    out.sort();
    out
}

/// The hostile guest's genuine native code is written over hello's
/// recorded entry in the zone's cache. The next worker does not load it:
/// the job does what hello does, and the gateway puts hello's own artifact
/// back from the worker that compiled it, which a restart loads. The
/// cache is the gateway's, not the workers': nothing else is in it.
#[tokio::test(flavor = "multi_thread")]
async fn an_artifact_planted_in_a_zone_cache_is_not_loaded_by_the_next_worker() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let first = workers(tmp.path(), "first", 0).await;
        load(&first, bulkhead_tests::HOSTILE, "other").await;
        load(&first, bulkhead_tests::HELLO, "hello").await;
        first.close();
    }
    let zone = zone_cache(tmp.path());
    let hostile = recorded_entry(tmp.path(), bulkhead_tests::HOSTILE);
    let target = recorded_entry(tmp.path(), bulkhead_tests::HELLO);
    assert_eq!(files(&zone), {
        let mut both = vec![hostile.clone(), target.clone()];
        both.sort();
        both
    });
    // The gateway's, shared with the workers for reading only.
    // SAFETY: `geteuid` has no preconditions.
    let (uid, root) = unsafe { (libc::geteuid(), libc::geteuid() == 0) };
    for path in [&zone, target.parent().unwrap(), &target] {
        let meta = std::fs::metadata(path).unwrap();
        assert_eq!(meta.uid(), uid, "{}", path.display());
        let mode = meta.permissions().mode() & 0o777;
        let want = match (meta.is_dir(), root) {
            (true, true) => 0o750,
            (true, false) => 0o700,
            (false, true) => 0o640,
            (false, false) => 0o600,
        };
        assert_eq!(mode, want, "{}", path.display());
        if root {
            assert_eq!(meta.gid(), 65534, "{}", path.display());
        }
    }

    let planted = std::fs::read(&hostile).unwrap();
    std::fs::write(&target, &planted).unwrap();

    // A restart; hello's job runs in a fresh worker of the zone.
    let second = workers(tmp.path(), "second", 1).await;
    let module = load(&second, bulkhead_tests::HELLO, "hello").await;
    assert!(!module.from_cache(), "the planted artifact was loaded");
    let report = run(&second, &module).await;
    second.close();
    // The hostile guest without a mode exits 2; hello exits 0 and prints
    // its line: the worker ran the pinned module.
    assert!(report.succeeded(), "{report:#?}");
    assert_eq!(report.stdout.text, "hello from bulkhead\n");
    // The gateway put back what the pristine worker compiled and recorded
    // it: the entry's bytes are the record's.
    let now = std::fs::read(recorded_entry(tmp.path(), bulkhead_tests::HELLO)).unwrap();
    assert_ne!(now, planted, "the planted entry was not replaced");
    let record = record(tmp.path(), bulkhead_tests::HELLO).expect("hello's record");
    assert_eq!(record["sha256"], hex::encode(Sha256::digest(&now)));
    assert!(
        !zone.join("cache.key").exists(),
        "the zone's cache keeps a key"
    );
    // Beside the zone's cache, not in it: the gateway's own, private.
    let records = records_dir(&zone);
    assert!(!records.starts_with(&zone));
    let meta = std::fs::metadata(&records).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    assert_eq!(meta.uid(), uid);

    let third = workers(tmp.path(), "third", 0).await;
    let module = load(&third, bulkhead_tests::HELLO, "hello").await;
    assert!(module.from_cache(), "a restart compiled hello again");
    third.close();
}

/// Only a worker started to load one module alone hands its code over:
/// a worker sent modules to warm it (a successor, sent the zone's modules
/// ahead of a worker's retirement) that says it compiled one and handed
/// over code, another module's, is faulted, and nothing it handed over is
/// taken or recorded (found by a tester: such a forged `Loaded` had
/// another module's code recorded, and another tenant's jobs ran it,
/// across a restart).
#[tokio::test(flavor = "multi_thread")]
async fn code_a_warmed_worker_says_it_compiled_is_never_taken() {
    let tmp = tempfile::tempdir().unwrap();
    let program = crate::common::withholding(tmp.path(), "forge");
    // A tenth of ten: the successor starts once a worker has one job left.
    let (runner, faults) =
        crate::common::workers_from(tmp.path(), "forge", program.clone(), 10, 2, None).await;
    let hello = load(&runner, bulkhead_tests::HELLO, "hello").await;
    let hostile = load(&runner, bulkhead_tests::HOSTILE, "hostile").await;
    let recorded = record(tmp.path(), bulkhead_tests::HELLO).expect("hello's record");
    let others = record(tmp.path(), bulkhead_tests::HOSTILE).expect("hostile's record");
    assert_ne!(recorded["sha256"], others["sha256"]);
    // A job of each, so that the successor is sent both (only modules run
    // lately are); the hostile guest without a mode exits 2.
    assert!(!run(&runner, &hostile).await.succeeded());
    // The next worker started, the successor, forges its answers: for
    // hostile's load, hello's code (hostile's does not fit its directory).
    std::fs::write(program.with_file_name("worker-forge.arm"), b"").unwrap();
    for _ in 0..8 {
        assert!(run(&runner, &hello).await.succeeded());
    }
    crate::common::until(|| !faults.lock().unwrap().is_empty()).await;
    assert!(
        program.with_file_name("worker-forge.used").exists(),
        "the successor forged nothing"
    );
    let fault = faults.lock().unwrap()[0].clone();
    assert_eq!(fault.class, "protocol", "{fault:?}");
    assert!(
        fault.reason.contains("which it was not asked for"),
        "{fault:?}"
    );
    assert_eq!(record(tmp.path(), bulkhead_tests::HELLO), Some(recorded));
    assert_eq!(record(tmp.path(), bulkhead_tests::HOSTILE), Some(others));
    // The zone goes on, on honest workers, with hello's own code.
    for _ in 0..3 {
        let ran = run(&runner, &hello).await;
        assert!(ran.succeeded(), "{ran:?}");
        assert_eq!(ran.stdout.text, "hello from bulkhead\n");
    }
    runner.close();
}

/// A worker's word that a module's zone-cache entry was not the recorded
/// one has the module compiled again for the cache at most once a minute
/// (`REBUILD_EVERY`), however many workers say so (found by a tester:
/// workers that said so of every load started 214 compile workers in
/// 20 s). Every worker here says so of every load it finds in the cache,
/// and one is started for each job.
#[tokio::test(flavor = "multi_thread")]
async fn a_workers_word_that_an_entry_was_rewritten_rebuilds_it_at_most_once_a_minute() {
    let tmp = tempfile::tempdir().unwrap();
    let program = crate::common::withholding(tmp.path(), "claim");
    let (runner, _faults) =
        crate::common::workers_from(tmp.path(), "claim", program, 1, 2, None).await;
    let started = std::time::Instant::now();
    let hello = load(&runner, bulkhead_tests::HELLO, "hello").await;
    let recorded = record(tmp.path(), bulkhead_tests::HELLO).expect("hello's record");
    let pool = std::sync::Arc::clone(&runner.pools()["untrusted"]);
    for _ in 0..8 {
        let ran = run(&runner, &hello).await;
        assert!(ran.succeeded(), "{ran:?}");
    }
    // The first word is acted on at once.
    crate::common::until(|| pool.rebuilds() >= 1).await;
    let minutes = started.elapsed().as_secs() / 60;
    assert!(
        pool.rebuilds() <= 1 + minutes,
        "{} rebuilds in {:?}",
        pool.rebuilds(),
        started.elapsed()
    );
    // What was recorded stays.
    assert_eq!(record(tmp.path(), bulkhead_tests::HELLO), Some(recorded));
    runner.close();
}

/// An entry removed from a zone's cache while the zone runs is put back
/// without a restart: a worker that finds it gone compiles the module
/// itself, and what it compiles is not taken (it has been sent a job, or
/// other modules: a successor warmed); a worker of its own compiles it
/// for the cache, at the next round.
#[tokio::test(flavor = "multi_thread")]
async fn an_entry_removed_from_a_zone_cache_is_put_back_while_the_zone_runs() {
    let tmp = tempfile::tempdir().unwrap();
    // A fresh worker for each job.
    let runner = workers(tmp.path(), "only", 1).await;
    let hello = load(&runner, bulkhead_tests::HELLO, "hello").await;
    let entry = recorded_entry(tmp.path(), bulkhead_tests::HELLO);
    let recorded = std::fs::read(&entry).unwrap();
    // The worker that loaded it runs a job and is replaced.
    assert!(run(&runner, &hello).await.succeeded());
    std::fs::remove_file(&entry).unwrap();
    // Workers that had loaded hello before (a successor sent the zone's
    // modules ahead) run its jobs without a look at the cache; the next
    // that loads it finds the entry gone.
    'jobs: for _ in 0..4 {
        assert!(run(&runner, &hello).await.succeeded());
        for _ in 0..100 {
            if entry.exists() {
                break 'jobs;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    let now = std::fs::read(&entry).expect("the entry was not put back");
    let record = record(tmp.path(), bulkhead_tests::HELLO).expect("hello's record");
    assert_eq!(record["sha256"], hex::encode(Sha256::digest(&now)));
    assert_eq!(now.len(), recorded.len());
    runner.close();
}

/// A module is compiled by a worker started for that alone, never by one
/// of the zone's workers, which run jobs (found by an attacker: a module
/// compiled beside another tenant's jobs took their worker past its memory
/// ceiling, and they failed with it). Loaded while a job holds the zone's
/// only place in its only worker, it loads without waiting for that
/// place; what was compiled is recorded (the gateway records only what a
/// worker that ran no guest compiled); the zone's worker is the same
/// process; and a restart loads both modules from the cache.
#[tokio::test(flavor = "multi_thread")]
async fn a_module_is_compiled_apart_from_the_zones_workers_and_their_jobs() {
    use bulkhead::policy::HumanDuration;

    let tmp = tempfile::tempdir().unwrap();
    {
        let (first, _) = workers_watched(tmp.path(), "first", 0, 1).await;
        let sleeper = load_policy_in_workers(
            &first,
            bulkhead_tests::HOSTILE,
            crate::common::policy(bulkhead_tests::HOSTILE, "sleeper")
                .args(&["sleep"])
                .times(HumanDuration::secs(60), HumanDuration::secs(60)),
        )
        .await;
        assert!(record(tmp.path(), bulkhead_tests::HOSTILE).is_some());
        let pool = &first.pools()["untrusted"];
        let pids = pool.pids();
        assert_eq!(pids.len(), 1);
        let spec = JobSpec::new();
        let held = first.run(&sleeper, &spec, None);
        let load_beside = async {
            while pool.jobs_started() == 0 {
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
            let hello = load(&first, bulkhead_tests::HELLO, "hello").await;
            assert!(!hello.from_cache());
            assert!(
                record(tmp.path(), bulkhead_tests::HELLO).is_some(),
                "what was compiled while the zone's worker ran a guest was not recorded"
            );
            assert_eq!(pool.pids(), pids, "the zone's worker was replaced");
            assert_eq!(pool.jobs_started(), 1, "the job holding the place ended");
        };
        tokio::select! {
            ended = held => panic!("the load waited for the job's place: {:?}", ended.map(|r| r.report.succeeded())),
            () = load_beside => {}
        }
        first.close();
    }
    let second = workers(tmp.path(), "second", 0).await;
    for (guest, name) in [
        (bulkhead_tests::HELLO, "hello"),
        (bulkhead_tests::HOSTILE, "other"),
    ] {
        let module = load(&second, guest, name).await;
        assert!(module.from_cache(), "a restart compiled {name} again");
    }
    second.close();
}

/// What an earlier version's workers could leave in their zone's cache —
/// a file where an engine's directory belongs, a tree deeper than any path
/// the host can name, an artifact no record names — must not stop the
/// zone: replacement workers still start and run jobs (compiling without
/// the cache), and so does a restart, which clears everything but the
/// recorded artifacts.
#[tokio::test]
async fn what_is_left_in_a_zone_cache_does_not_stop_the_zone_and_is_cleared() {
    let tmp = tempfile::tempdir().unwrap();
    let runner = workers(tmp.path(), "first", 1).await;
    let hello = load(&runner, bulkhead_tests::HELLO, "hello").await;
    assert!(run(&runner, &hello).await.succeeded());

    // Its engine directory replaced by a file, a deep tree of the
    // workers' user, and an unrecorded artifact beside the recorded one.
    let cache = zone_cache(tmp.path());
    let entry = recorded_entry(tmp.path(), bulkhead_tests::HELLO);
    let engine = entry.parent().unwrap().to_owned();
    let stray = engine.join(format!("{}.cwasm", "0".repeat(64)));
    std::fs::write(&stray, b"not recorded").unwrap();
    std::fs::rename(&engine, cache.join("moved-away")).unwrap();
    std::fs::write(&engine, b"not a directory").unwrap();
    deep_tree(&cache.join("deep"), 20);

    // The next worker (one job per worker) starts anyway and runs the job.
    let report = tokio::time::timeout(std::time::Duration::from_secs(120), run(&runner, &hello))
        .await
        .expect("a replacement worker never ran the job");
    assert!(report.succeeded(), "{report:?}");
    runner.close();

    // A restart over the same cache starts, runs, and has cleared all of
    // it; what it compiled again is all the cache holds.
    let runner = workers(tmp.path(), "second", 1).await;
    let hello = load(&runner, bulkhead_tests::HELLO, "hello").await;
    assert!(run(&runner, &hello).await.succeeded());
    runner.close();
    assert_eq!(files(&cache), vec![entry.clone()]);
    assert!(!cache.join("deep").exists() && !cache.join("moved-away").exists());

    // An artifact no record names, put beside the recorded one, goes at
    // the next start; the recorded one stays and is loaded.
    std::fs::write(&stray, b"not recorded").unwrap();
    let runner = workers(tmp.path(), "third", 1).await;
    let hello = load(&runner, bulkhead_tests::HELLO, "hello").await;
    assert!(hello.from_cache(), "the recorded artifact was not kept");
    runner.close();
    assert_eq!(files(&cache), vec![entry]);
}

/// `levels` nested directories of 250-byte names under `top`, made
/// relative to each other (the whole path is longer than `PATH_MAX`).
fn deep_tree(top: &Path, levels: usize) {
    use rustix::fs::{Mode, OFlags};
    std::fs::create_dir(top).unwrap();
    let open = |at: &std::os::fd::OwnedFd, name: &str| {
        rustix::fs::openat(at, name, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap()
    };
    let mut dir = rustix::fs::open(top, OFlags::RDONLY | OFlags::DIRECTORY, Mode::empty()).unwrap();
    let name = "d".repeat(250);
    for _ in 0..levels {
        rustix::fs::mkdirat(&dir, name.as_str(), Mode::from_raw_mode(0o700)).unwrap();
        dir = open(&dir, &name);
    }
    // SAFETY: no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        std::os::unix::fs::chown(top, Some(65534), Some(65534)).unwrap();
    }
}

/// A link put at the cache's `zones` (or at the zone's own cache) to
/// another directory — another service's held data directory here — is
/// never followed: the pool refuses to start, naming the link, and the
/// other directory keeps its files, owner and mode.
#[tokio::test]
async fn a_link_in_place_of_the_zone_cache_is_never_followed() {
    use bulkhead::sandbox::beneath::Root;
    let tmp = tempfile::tempdir().unwrap();
    let victim = tmp.path().join("victim");
    std::fs::create_dir(&victim).unwrap();
    for name in ["bulkhead.lock", "bulkhead.sqlite", "admin.token"] {
        std::fs::write(victim.join(name), name).unwrap();
    }
    std::fs::create_dir(victim.join("untrusted")).unwrap();
    std::fs::write(victim.join("untrusted/keep"), b"keep").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o755)).unwrap();
    let before = |dir: &Path| {
        let meta = std::fs::metadata(dir).unwrap();
        (files(dir), meta.uid(), meta.permissions().mode() & 0o777)
    };
    let victim_before = before(&victim);
    let cache = tmp.path().join("cache");
    std::fs::create_dir(&cache).unwrap();
    for (link, target) in [
        (cache.join("zones"), victim.clone()),
        (cache.join("zones/untrusted"), victim.join("untrusted")),
    ] {
        let _ = std::fs::remove_file(cache.join("zones"));
        if link.parent() != Some(&cache) {
            std::fs::create_dir_all(link.parent().unwrap()).unwrap();
        }
        std::os::unix::fs::symlink(&target, &link).unwrap();
        let work = tmp.path().join("work");
        let started = bulkhead::worker::pool::Pool::start(
            bulkhead::worker::pool::PoolConfig {
                zone: "untrusted".into(),
                program: env!("CARGO_BIN_EXE_bulkhead-under-test").into(),
                workers: 1,
                jobs_per_worker: 0,
                max_concurrent_jobs: 1,
                memory: None,
                disk: Some(bulkhead::config::ZonePool::default().disk.as_u64()),
                work_dir: work.join("zones/untrusted"),
                work_held: None,
                cache_dir: cache.join("zones/untrusted"),
                cache_held: Some(Root::open(&cache).unwrap()),
                run_as: None,
                max_open: bulkhead::worker::WORKER_MAX_OPEN,
                max_threads: bulkhead::worker::WORKER_MAX_THREADS,
                require: Default::default(),
                weaken: Default::default(),
            },
            |_| {},
        )
        .await;
        let err = match started {
            Ok(pool) => {
                pool.close();
                panic!("a pool started through the link at {}", link.display());
            }
            Err(e) => e.to_string(),
        };
        assert!(err.contains("link"), "{err}");
        assert_eq!(before(&victim), victim_before, "{}", link.display());
        let inner = std::fs::metadata(victim.join("untrusted")).unwrap();
        assert_eq!(inner.permissions().mode() & 0o777, 0o755);
        std::fs::remove_file(&link).unwrap();
        if link.parent() != Some(&cache) {
            std::fs::remove_dir(link.parent().unwrap()).unwrap();
        }
    }
}

/// `guest` with a custom section of `bytes` bytes appended: as small once
/// compiled, as large to receive, hash and adapt.
/// A policy named `name` for `wasm`, run with `args`, with `wall` seconds
/// of CPU and of wall time.
fn policy_for(name: &str, wasm: &[u8], args: &[&str], wall: u64) -> bulkhead::policy::Policy {
    use bulkhead::policy::HumanDuration;
    let mut p = crate::common::policy(bulkhead_tests::HOSTILE, name)
        .args(args)
        .times(HumanDuration::secs(wall), HumanDuration::secs(wall))
        .parse();
    p.module.sha256 = Sha256Hex::digest(wasm);
    p
}

/// `sleeper`'s job on the pool's one worker, once its guest has started:
/// the worker is then busy, so no module is loaded there ahead of its jobs,
/// and it is not replaced for what it holds while idle.
async fn started<'a>(
    runner: &'a Workers,
    sleeper: &'a Module,
    spec: &'a JobSpec,
) -> std::pin::Pin<Box<impl std::future::Future<Output = impl std::fmt::Debug> + 'a>> {
    let pool = &runner.pools()["untrusted"];
    let mut busy = Box::pin(runner.run(sleeper, spec, None));
    let started = async {
        while pool.jobs_started() == 0 {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    };
    tokio::select! {
        _ = &mut busy => panic!("the sleeper ended"),
        () = started => {}
    }
    busy
}

fn padded(guest: &str, bytes: usize) -> Vec<u8> {
    let mut wasm = wasm(guest);
    // Section 0 (custom): its size, then its name's and its data.
    wasm.push(0);
    let mut size = 4 + bytes;
    loop {
        let low = (size & 0x7f) as u8;
        size >>= 7;
        if size == 0 {
            wasm.push(low);
            break;
        }
        wasm.push(low | 0x80);
    }
    wasm.extend_from_slice(&[3, b'p', b'a', b'd']);
    wasm.resize(wasm.len() + bytes, 0);
    wasm
}

/// What loading a module takes a worker is weighed with the first of its
/// jobs a worker is sent, not only its compiled code (found by an
/// attacker: 64 MiB modules of one custom section, 28 KB of code once
/// compiled, each took a worker 180 MiB to receive, hash and adapt beside
/// another tenant's job, and ten of them killed it). Four such modules,
/// 24 MiB each, loaded while the one worker runs another job (so none is
/// loaded there ahead of its jobs), whose jobs fit beside that job by
/// their weights but not with their loads: one job of each at once never
/// has all four running, none fails, and the worker is never killed.
#[tokio::test(flavor = "multi_thread")]
async fn what_loading_a_module_takes_a_worker_is_weighed_with_its_first_job() {
    use bulkhead::runner::Runner as _;

    if bulkhead::worker::cgroup::offered().is_err() {
        eprintln!("no memory cgroup here: nothing to check");
        return;
    }
    const PAD: usize = 24 << 20;
    let policy = |name: &str, wasm: &[u8], wall: u64| policy_for(name, wasm, &["sleep"], wall);
    // A budget that takes five jobs by their weights and 100 MiB more:
    // less than the two frames alone (the wasm received, then decoded)
    // that loading each of two of them takes.
    let weight = bulkhead::worker::memory::weight(&policy("w", b"", 2), 0);
    let base = bulkhead::worker::memory::ZoneMemory::base(5);
    let ceiling = base + 5 * weight + (100 << 20);
    let tmp = tempfile::tempdir().unwrap();
    let (runner, faults) =
        crate::common::workers_within(tmp.path(), "loads", 0, 5, Some(ceiling)).await;
    let pool = &runner.pools()["untrusted"];
    let hostile = wasm(bulkhead_tests::HOSTILE);
    let sleeper = runner
        .load(policy("sleeper", &hostile, 60), bytes::Bytes::from(hostile))
        .await
        .unwrap();
    let spec = JobSpec::new();
    let mut busy = started(&runner, &sleeper, &spec).await;
    let mut modules = Vec::new();
    for i in 0..4 {
        let wasm = padded(bulkhead_tests::HOSTILE, PAD + i);
        let module = runner
            .load(
                policy(&format!("pad{i}"), &wasm, 2),
                bytes::Bytes::from(wasm),
            )
            .await
            .unwrap_or_else(|e| panic!("pad{i}: {e}"));
        modules.push(module);
    }
    let jobs = futures::future::join_all(modules.iter().map(|m| runner.run(m, &spec, None)));
    let most = std::sync::atomic::AtomicUsize::new(0);
    let watch = async {
        loop {
            most.fetch_max(pool.jobs_started(), std::sync::atomic::Ordering::SeqCst);
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    };
    let reports = tokio::select! {
        reports = jobs => reports,
        () = watch => unreachable!(),
        _ = &mut busy => panic!("the sleeper ended"),
    };
    for report in reports {
        let report = report.expect("the job ran").report;
        assert_eq!(
            report.limit.map(|l| l.as_str()),
            Some("wall_time"),
            "{report:?}"
        );
    }
    let most = most.into_inner();
    // The sleeper among them.
    assert!(most >= 2, "no job was seen running beside the sleeper");
    assert!(
        most < 5,
        "all four ran at once beside the sleeper, each loading its module beside the others"
    );
    assert!(
        faults.lock().unwrap().is_empty(),
        "{:?}",
        faults.lock().unwrap()
    );
    runner.close();
}

/// A job's module load is held by its worker until the worker's `Loaded`,
/// however soon the job ends (found by an attacker: held with the job, a
/// job cancelled during its module's load gave the load's weight back
/// while the worker went on loading, and cancelled first-load jobs piled
/// loads up past the ceiling and killed another tenant's job). A padded
/// module's first job, on a worker busy with another job (so nothing is
/// loaded there ahead of it), is cancelled once its load is sent: the load
/// stays held, and goes once the worker has answered it.
#[tokio::test(flavor = "multi_thread")]
async fn a_load_is_held_by_its_worker_until_answered_when_its_job_is_cancelled() {
    use std::time::{Duration, Instant};

    if bulkhead::worker::cgroup::offered().is_err() {
        eprintln!("no memory cgroup here: nothing to check");
        return;
    }
    let policy = |name: &str, wasm: &[u8], wall: u64| policy_for(name, wasm, &["sleep"], wall);
    let tmp = tempfile::tempdir().unwrap();
    let (runner, faults) =
        crate::common::workers_within(tmp.path(), "held", 0, 4, Some(2 << 30)).await;
    let pool = &runner.pools()["untrusted"];
    let hostile = wasm(bulkhead_tests::HOSTILE);
    let sleeper = runner
        .load(policy("sleeper", &hostile, 60), bytes::Bytes::from(hostile))
        .await
        .unwrap();
    let spec = JobSpec::new();
    let mut busy = started(&runner, &sleeper, &spec).await;
    let wasm = padded(bulkhead_tests::HOSTILE, 40 << 20);
    let module = runner
        .load(policy("pad", &wasm, 2), bytes::Bytes::from(wasm))
        .await
        .unwrap();
    assert_eq!(pool.loads_held(), 0, "a load held with no job of it placed");
    // Polled here, so between two looks it waits for its report: its
    // `Load` and `Run` are sent.
    let mut job = Box::pin(runner.run(&module, &spec, None));
    let deadline = Instant::now() + Duration::from_secs(60);
    let held = loop {
        tokio::select! {
            _ = &mut job => panic!("the job ended before its load was seen held"),
            _ = &mut busy => panic!("the sleeper ended"),
            () = tokio::time::sleep(Duration::from_millis(1)) => {}
        }
        let held = pool.loads_held();
        if held > 0 {
            break held;
        }
        assert!(Instant::now() < deadline, "no load was ever held");
    };
    drop(job);
    assert_eq!(
        pool.loads_held(),
        held,
        "the load was given back with its cancelled job while the worker loaded it"
    );
    // And it is given back once the worker has answered it.
    while pool.loads_held() > 0 {
        assert!(
            Instant::now() < deadline,
            "the load is still held long after its worker answered"
        );
        tokio::select! {
            _ = &mut busy => panic!("the sleeper ended"),
            () = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
    }
    assert!(
        faults.lock().unwrap().is_empty(),
        "{:?}",
        faults.lock().unwrap()
    );
    runner.close();
}

/// A core module (a WASIp1 command) whose `_start` returns at once, with a
/// memory holding `data` bytes of `0x5A` from a data segment, made distinct
/// by `variant` (a custom section).
fn data_module(data: usize, variant: u32) -> Vec<u8> {
    use wasm_encoder::{ConstExpr, CustomSection, DataSection, Section};
    let mut segments = DataSection::new();
    segments.active(0, &ConstExpr::i32_const(0), vec![0x5A; data]);
    let variant = variant.to_le_bytes();
    let custom = CustomSection {
        name: "variant".into(),
        data: variant.as_slice().into(),
    };
    let mut tail = Vec::new();
    for section in [&segments as &dyn Section, &custom] {
        tail.push(section.id());
        section.encode(&mut tail);
    }
    crate::common::core_module("_start", &[], data.div_ceil(1 << 16) as u64, &tail)
}

/// What a module's data takes a worker is its jobs' alone: nothing of it
/// stays in the worker once they end (found by an attacker: wasmtime kept
/// a copy-on-write image of each module's data, made the first time the
/// module ran in the worker, for as long as the worker kept the module,
/// counted nowhere; 16 modules of a 48 MiB data segment left 768 MiB in a
/// worker behind a large job's weight, which then took it past its
/// ceiling and another tenant's job with it). Four such modules of 24 MiB
/// are loaded into an idle worker, which then runs a sleeper (so it is
/// not replaced for what it holds); one job of each runs after the other,
/// and the worker's cgroup holds less than one module's data more than
/// before them.
#[tokio::test(flavor = "multi_thread")]
async fn a_modules_data_is_left_in_no_worker_once_its_jobs_end() {
    const DATA: usize = 24 << 20;
    let modules = (0..4).map(|i| (data_module(DATA, i), &[][..]));
    let Some((grown, _)) = grown_by_one_job_each(modules.collect(), true).await else {
        return;
    };
    assert!(
        grown < DATA as u64,
        "the worker holds {} MiB more after the four jobs than before them",
        grown >> 20
    );
}

/// What a worker keeps once its jobs' modules have run and trapped is
/// within what each of its places is counted as keeping resident between
/// jobs (`kept_resident_per_place`: the pool's memory slots keep up to
/// 4 MiB of what a job dirtied, for the next job of the same module): six
/// distinct modules (the hostile guest, each with a custom section of its
/// own) that each trap once, on a stack overflow, in a worker with two
/// places, leave it holding no more than those two places keep (an
/// attacker found about 1 MiB kept per distinct trapping module, which a
/// later one traced to those slots).
#[tokio::test(flavor = "multi_thread")]
async fn what_trapped_modules_leave_in_a_worker_is_what_its_places_keep() {
    let modules: Vec<_> = (0..6)
        .map(|i| (padded(bulkhead_tests::HOSTILE, 16 + i), &["recursion"][..]))
        .collect();
    let Some((grown, _)) = grown_by_one_job_each(modules, false).await else {
        return;
    };
    let kept = 2 * bulkhead::sandbox::kept_resident_per_place();
    assert!(
        grown <= kept,
        "six first traps left {grown} bytes in the worker; its two places keep {kept}"
    );
}

/// How much more the cgroup of a one-worker zone's worker holds once one
/// job of each of `modules` (wasm, and the args its jobs run with) has run
/// after the other, beside a sleeper's job (so the worker is not replaced
/// for what it holds): each succeeding, or failing where not `succeed`;
/// and the length of the artifacts the zone recorded for them. None where
/// no memory cgroup is offered.
async fn grown_by_one_job_each(
    modules: Vec<(Vec<u8>, &[&str])>,
    succeed: bool,
) -> Option<(u64, u64)> {
    use bulkhead::policy::ByteSize;

    if bulkhead::worker::cgroup::offered().is_err() {
        eprintln!("no memory cgroup here: nothing to check");
        return None;
    }
    let policy = |name: &str, wasm: &[u8], args: &[&str], wall: u64| {
        let mut p = policy_for(name, wasm, args, wall);
        p.limits.memory = ByteSize::mib(32);
        p
    };
    let tmp = tempfile::tempdir().unwrap();
    let (runner, faults) =
        crate::common::workers_within(tmp.path(), "grown", 0, 2, Some(2 << 30)).await;
    let pool = &runner.pools()["untrusted"];
    let mut loaded = Vec::new();
    let mut code = 0;
    for (i, (wasm, args)) in modules.into_iter().enumerate() {
        let digest = Sha256Hex::digest(&wasm);
        let module = runner
            .load(
                policy(&format!("m{i}"), &wasm, args, 30),
                bytes::Bytes::from(wasm),
            )
            .await
            .unwrap_or_else(|e| panic!("m{i}: {e}"));
        let record = records_dir(&zone_cache(tmp.path())).join(format!("{digest}.json"));
        let record: serde_json::Value =
            serde_json::from_slice(&std::fs::read(record).unwrap()).unwrap();
        code += record["len"].as_u64().unwrap();
        loaded.push(module);
    }
    let hostile = wasm(bulkhead_tests::HOSTILE);
    let sleeper = runner
        .load(
            policy("sleeper", &hostile, &["sleep"], 60),
            bytes::Bytes::from(hostile),
        )
        .await
        .unwrap();
    let spec = JobSpec::new();
    let mut busy = started(&runner, &sleeper, &spec).await;
    let pids = pool.pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    let usage = crate::common::memory_file(pids[0], "memory.usage_in_bytes", "memory.current");
    let used = || -> u64 {
        std::fs::read_to_string(&usage)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let before = used();
    for (i, module) in loaded.iter().enumerate() {
        let report = tokio::select! {
            report = runner.run(module, &spec, None) => report,
            _ = &mut busy => panic!("the sleeper ended"),
        };
        let report = report.unwrap_or_else(|e| panic!("m{i}: {e}")).report;
        assert_eq!(
            matches!(report.outcome, bulkhead::job::Outcome::Succeeded),
            succeed,
            "m{i}: {report:?}"
        );
    }
    let after = used();
    assert_eq!(pool.pids(), pids, "the worker was replaced");
    assert!(
        faults.lock().unwrap().is_empty(),
        "{:?}",
        faults.lock().unwrap()
    );
    runner.close();
    Some((after.saturating_sub(before), code))
}
