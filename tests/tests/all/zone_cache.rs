//! A zone's compile cache is every worker's to write, so a compromised
//! worker can put native code of its own in it: the gateway, not the
//! directory, says which artifact is good for which module. A worker
//! loads a cached artifact only when its bytes are the ones the gateway
//! recorded, and the gateway records only what a worker that has run no
//! guest reports. Judged on the host: what the next worker runs, the cache
//! and record files, and whether a restart compiles again.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use bulkhead::policy::Sha256Hex;
use bulkhead::runner::{Module, Runner, Workers};
use bulkhead::sandbox::{JobReport, JobSpec};
use bulkhead::worker::pool::records_dir;
use sha2::{Digest, Sha256};

use crate::common::{load_in_workers as load, wasm, workers};

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

fn entry(guest: &str) -> String {
    format!("{}.cwasm", Sha256Hex::digest(&wasm(guest)))
}

/// The cache entry named `name` under `dir`, wherever the engine key put it.
fn find(dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        if entry.file_name() == name {
            return Some(entry.path());
        }
        if entry.file_type().ok()?.is_dir()
            && let Some(found) = find(&entry.path(), name)
        {
            return Some(found);
        }
    }
    None
}

/// The gateway's record for `guest` in the zone, if it has one.
fn record(tmp: &Path, guest: &str) -> Option<serde_json::Value> {
    let path =
        records_dir(&zone_cache(tmp)).join(format!("{}.json", Sha256Hex::digest(&wasm(guest))));
    std::fs::read(path)
        .ok()
        .map(|b| serde_json::from_slice(&b).unwrap())
}

/// HMAC-SHA256 (RFC 2104), as the cache tagged artifacts with.
fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut block = [0u8; 64];
    block[..key.len()].copy_from_slice(key);
    let mut inner = Sha256::new();
    inner.update(block.map(|b| b ^ 0x36));
    for p in parts {
        inner.update(p);
    }
    let mut outer = Sha256::new();
    outer.update(block.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// A compromised worker writes the hostile guest's genuine native code
/// under hello's name in the zone's cache. Where the zone's cache had a key
/// (readable by its workers), it tags the plant with it, as the host
/// would; where it has none, it plants the bare artifact. The next
/// worker does not load it: the job does what hello does, and the entry is
/// replaced by hello's own, which the gateway records and a restart loads.
#[tokio::test(flavor = "multi_thread")]
async fn an_artifact_a_worker_planted_in_its_zone_cache_is_not_loaded_by_the_next() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let first = workers(tmp.path(), "first", 0).await;
        load(&first, bulkhead_tests::HOSTILE, "other").await;
        load(&first, bulkhead_tests::HELLO, "hello").await;
        first.close();
    }
    let zone = zone_cache(tmp.path());
    let hostile = find(&zone, &entry(bulkhead_tests::HOSTILE)).expect("hostile's artifact");
    let target = hostile.with_file_name(entry(bulkhead_tests::HELLO));
    assert!(target.is_file(), "hello was not cached");

    // The plant, with what a worker can read in its zone's cache.
    let key_file = zone.join("cache.key");
    let mut artifact = std::fs::read(&hostile).unwrap();
    let planted = match std::fs::read(&key_file) {
        Ok(key) => {
            // Entries carry a 32-byte tag: strip hostile's, tag for hello.
            artifact.truncate(artifact.len() - 32);
            let engine = hostile.parent().unwrap().file_name().unwrap();
            let engine = engine.to_str().unwrap().as_bytes();
            let digest = Sha256Hex::digest(&wasm(bulkhead_tests::HELLO)).to_string();
            let tag = hmac_sha256(
                &key,
                &[
                    b"bulkhead module cache v1\0",
                    &(engine.len() as u64).to_le_bytes(),
                    engine,
                    &(digest.len() as u64).to_le_bytes(),
                    digest.as_bytes(),
                    &artifact,
                ],
            );
            [artifact, tag.to_vec()].concat()
        }
        Err(_) => artifact,
    };
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
    let now = std::fs::read(&target).unwrap();
    assert_ne!(now, planted, "the planted entry was not replaced");
    // The gateway recorded the replacement, which it reads no worker's
    // directory to know: the record is what the pristine worker reported.
    let record = record(tmp.path(), bulkhead_tests::HELLO).expect("hello's record");
    assert_eq!(record["sha256"], hex::encode(Sha256::digest(&now)));
    assert!(!key_file.exists(), "the zone's cache keeps a key");
    // Beside the zone's cache, not in it: the gateway's own, private.
    let records = records_dir(&zone);
    assert!(!records.starts_with(&zone));
    let meta = std::fs::metadata(&records).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    // SAFETY: `geteuid` has no preconditions.
    assert_eq!(meta.uid(), unsafe { libc::geteuid() });

    let third = workers(tmp.path(), "third", 0).await;
    let module = load(&third, bulkhead_tests::HELLO, "hello").await;
    assert!(module.from_cache(), "a restart compiled hello again");
    third.close();
}

/// A worker that has been sent a job may be its guest's by now: what it
/// says it compiled is not recorded, so a restart does not load it; a
/// worker that has run nothing is taken at its word, and a restart after
/// that loads the artifact without compiling.
#[tokio::test(flavor = "multi_thread")]
async fn what_a_worker_that_ran_a_guest_compiled_is_not_recorded() {
    let tmp = tempfile::tempdir().unwrap();
    {
        let first = workers(tmp.path(), "first", 0).await;
        let hello = load(&first, bulkhead_tests::HELLO, "hello").await;
        assert!(!hello.from_cache());
        assert!(run(&first, &hello).await.succeeded());
        // The same worker (the only one) compiles another module now.
        let other = load(&first, bulkhead_tests::HOSTILE, "other").await;
        assert!(!other.from_cache());
        first.close();
    }
    assert!(
        record(tmp.path(), bulkhead_tests::HELLO).is_some(),
        "what a pristine worker compiled was not recorded"
    );
    assert_eq!(
        record(tmp.path(), bulkhead_tests::HOSTILE),
        None,
        "what a worker that ran a guest compiled was recorded"
    );
    let zone = zone_cache(tmp.path());
    assert!(find(&zone, &entry(bulkhead_tests::HOSTILE)).is_some());

    {
        let second = workers(tmp.path(), "second", 0).await;
        let hello = load(&second, bulkhead_tests::HELLO, "hello").await;
        assert!(hello.from_cache(), "a restart compiled hello again");
        let other = load(&second, bulkhead_tests::HOSTILE, "other").await;
        assert!(
            !other.from_cache(),
            "a restart loaded what a worker that ran a guest wrote"
        );
        second.close();
    }
    assert!(record(tmp.path(), bulkhead_tests::HOSTILE).is_some());
    let third = workers(tmp.path(), "third", 0).await;
    let other = load(&third, bulkhead_tests::HOSTILE, "other").await;
    assert!(other.from_cache(), "a restart compiled it again");
    third.close();
}

/// What a worker can leave in its zone's cache — a file where an engine's
/// directory belongs, a tree deeper than any path the host can name — must
/// not stop the zone: replacement workers still start and run jobs
/// (compiling without the cache), and so does a restart, which clears what
/// is in the way without walking the workers' trees.
#[tokio::test]
async fn a_zone_cache_a_worker_broke_does_not_stop_the_zone() {
    let tmp = tempfile::tempdir().unwrap();
    let runner = workers(tmp.path(), "first", 1).await;
    let hello = load(&runner, bulkhead_tests::HELLO, "hello").await;
    assert!(run(&runner, &hello).await.succeeded());

    // What a worker (uid 65534 when the tests run as root) could do: its
    // engine directory replaced by a file, and a deep tree of its own.
    let cache = zone_cache(tmp.path());
    let engine = std::fs::read_dir(&cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.is_dir())
        .expect("an engine directory");
    std::fs::rename(&engine, cache.join("moved-away")).unwrap();
    std::fs::write(&engine, b"not a directory").unwrap();
    deep_tree(&cache.join("deep"), 20);

    // The next worker (one job per worker) starts anyway and runs the job.
    let report = tokio::time::timeout(std::time::Duration::from_secs(120), run(&runner, &hello))
        .await
        .expect("a replacement worker never ran the job");
    assert!(report.succeeded(), "{report:?}");
    runner.close();

    // A restart over the same cache starts, runs, and has cleared the file.
    let runner = workers(tmp.path(), "second", 1).await;
    let hello = load(&runner, bulkhead_tests::HELLO, "hello").await;
    assert!(run(&runner, &hello).await.succeeded());
    assert!(
        !engine.is_file(),
        "the file in the engine's place is still there"
    );
    runner.close();
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
