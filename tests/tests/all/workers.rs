//! The second wall from the gateway's side: guests run in worker
//! processes, and a worker that fails takes only its own jobs with it.

use std::time::Duration;

use serde_json::Value;

use bulkhead::policy::ByteSize;
use bulkhead::worker::disk::FLOOR;

use crate::common;
use crate::common::http::json;
use crate::common::policies::{TestPolicy, hello, sleeper};
use crate::common::service::{self, Server};
use crate::common::until;

/// The zone's live worker pids, as the service reports them.
fn workers(server: &Server) -> Vec<u32> {
    server
        .service
        .isolation()
        .workers
        .get("untrusted")
        .cloned()
        .unwrap_or_default()
}

async fn submit(server: &Server, token: &str, module: &str, wait: bool) -> Value {
    let wait = if wait { "?wait=20s" } else { "" };
    json(
        server
            .post(&format!("/v1/modules/{module}/jobs{wait}"), token)
            .body(Vec::new()),
    )
    .await
}

/// The process's state line from `/proc/<pid>/stat` (`R`, `S`, `Z`…), or
/// `None` once it is gone.
fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat.rsplit(')').next()?.trim_start().chars().next()
}

#[tokio::test(flavor = "multi_thread")]
async fn guests_run_in_worker_processes_not_in_the_gateway() {
    let server = service::start(|_| {}).await;
    let state = server.service.isolation();
    assert_eq!(state.mode, "process");
    let pids = workers(&server);
    // One worker for every two cores, by default.
    let cores = std::thread::available_parallelism().unwrap().get();
    let expected = (cores / 2).max(1);
    assert_eq!(pids.len(), expected, "{state:?}");
    for pid in &pids {
        assert_ne!(*pid, std::process::id());
        // A child of this process, started from the binary under test.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let ppid: u32 = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(ppid, std::process::id());
    }
    let token = server.token("acme", &["hello:run"]).await;
    let job = submit(&server, &token, "hello", true).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert_eq!(job["report"]["stdout"]["text"], "hello from bulkhead\n");
    let metrics = server.service.render_metrics();
    for gauge in [
        format!("bulkhead_workers{{zone=\"untrusted\"}} {expected}"),
        "bulkhead_worker_queued_bytes{zone=\"untrusted\"} 0".to_owned(),
        "bulkhead_worker_loads_held_bytes{zone=\"untrusted\"} 0".to_owned(),
        "bulkhead_worker_successors{zone=\"untrusted\"} 0".to_owned(),
    ] {
        assert!(metrics.contains(&gauge), "no {gauge} in {metrics}");
    }
}

/// A hardened worker restores a finished job's memory from its own page
/// map (`PAGEMAP_SCAN`), opened while it hardened, before Landlock closed
/// `/proc` to it: without it every job's resident memory is cleared byte by
/// byte. The descriptor is its own page map, and the only one.
#[tokio::test(flavor = "multi_thread")]
async fn a_hardened_worker_keeps_its_own_page_map_and_nothing_else_of_proc() {
    let server = service::start(|_| {}).await;
    let token = server.token("acme", &["hello:run"]).await;
    let job = submit(&server, &token, "hello", true).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    for pid in workers(&server) {
        let links: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
            .unwrap()
            .map(|e| {
                std::fs::read_link(e.unwrap().path())
                    .unwrap()
                    .display()
                    .to_string()
            })
            .collect();
        let proc: Vec<_> = links.iter().filter(|l| l.starts_with("/proc/")).collect();
        assert_eq!(
            proc,
            [&format!("/proc/{pid}/pagemap")],
            "worker {pid} holds {links:?}"
        );
    }
}

/// A worker's directory's size now: the tmpfs its working directory is.
fn dir_size(pid: u32) -> u64 {
    let st = rustix::fs::statfs(format!("/proc/{pid}/cwd").as_str()).unwrap();
    assert_eq!(st.f_type, libc::TMPFS_MAGIC, "worker {pid}");
    st.f_blocks * st.f_bsize as u64
}

/// Whether the service mounts its workers' directories (as root); said
/// when it does not.
fn mounts(server: &Server) -> bool {
    let mounted = workers(server).iter().all(|pid| {
        rustix::fs::statfs(format!("/proc/{pid}/cwd").as_str())
            .is_ok_and(|st| st.f_type == libc::TMPFS_MAGIC)
    });
    if !mounted {
        assert_ne!(
            rustix::process::geteuid().as_raw(),
            0,
            "the service runs as root and its workers' directories are not a tmpfs"
        );
        eprintln!("skipped: the service cannot mount a tmpfs without CAP_SYS_ADMIN");
    }
    mounted
}

/// The service with zone `untrusted` of `disk` (and `workers` workers),
/// running only `policies`, eight jobs at once.
async fn zone_with_disk(disk: ByteSize, workers: u32, policies: &[TestPolicy]) -> Server {
    service::start(|c| {
        c.queue.workers = 8;
        std::fs::remove_dir_all(&c.modules.policies_dir).unwrap();
        for p in policies {
            p.write_to(&c.modules.policies_dir);
        }
        c.zones.insert(
            "untrusted".into(),
            bulkhead::config::ZonePool {
                disk,
                workers,
                ..Default::default()
            },
        );
    })
    .await
}

/// `hello` with room for little: 64 KiB in, 64 KiB and 4 files out.
fn small_hello() -> TestPolicy {
    hello().limits(|l| {
        l.input = ByteSize::kib(64);
        l.output = ByteSize::kib(64);
        l.output_files = 4;
    })
}

/// Each worker's directory is a file system of its own, mounted nowhere,
/// as large as its jobs' rooms: an idle worker's is the floor's size, so
/// whatever runs in it (here the test, writing through the worker's
/// working directory as native code in it could) fills that much and no
/// more; nothing of it lands in the zone's work directory, and the next
/// job, given its room, still runs.
#[tokio::test(flavor = "multi_thread")]
async fn a_workers_directory_is_its_own_file_system_as_large_as_its_jobs_rooms() {
    use std::io::Write as _;
    let server = zone_with_disk(ByteSize::mib(8), 2, &[small_hello()]).await;
    if !mounts(&server) {
        return;
    }
    let state = server.service.isolation();
    assert_eq!(state.disk.get("untrusted"), Some(&Some(8 << 20)));
    assert_eq!(state.disk_given.get("untrusted"), Some(&0));
    let zone = server.service.work_dir().join("zones/untrusted");
    let pids = workers(&server);
    assert_eq!(pids.len(), 2);
    for pid in &pids {
        assert_eq!(dir_size(*pid), FLOOR, "worker {pid}");
        let dir = std::path::PathBuf::from(format!("/proc/{pid}/cwd"));
        let mut fill = std::fs::File::create_new(dir.join("fill")).unwrap();
        let chunk = vec![1u8; 16 * 1024];
        let mut written = 0u64;
        let err = loop {
            match fill.write_all(&chunk) {
                Ok(()) => written += chunk.len() as u64,
                Err(e) => break e,
            }
            assert!(
                written <= 64 * FLOOR,
                "worker {pid}: {written} bytes written"
            );
        };
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
        assert!(written <= FLOOR, "worker {pid}: {written} bytes written");
    }
    let in_zone: Vec<_> = std::fs::read_dir(&zone)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(in_zone.is_empty(), "{in_zone:?}");
    let token = server.token("acme", &["hello:run"]).await;
    let job = submit(&server, &token, "hello", true).await;
    assert_eq!(job["state"], "succeeded", "{job}");
}

/// Why a service whose only module is `hello` with `limits`, and whose
/// `untrusted` zone is `zone`, refuses to start.
async fn refused_start(
    limits: impl FnOnce(&mut bulkhead::policy::Limits),
    zone: bulkhead::config::ZonePool,
) -> String {
    let data = tempfile::tempdir().unwrap();
    let mut config = bulkhead::config::ServeConfig::default();
    config.storage.data_dir = data.path().join("data");
    config.storage.cache_dir = Some(data.path().join("cache"));
    config.modules.policies_dir = data.path().join("policies");
    config.modules.modules_dir = std::path::PathBuf::from(bulkhead_tests::GUESTS_DIR);
    config.isolation.program = Some(std::path::PathBuf::from(env!(
        "CARGO_BIN_EXE_bulkhead-under-test"
    )));
    hello()
        .limits(limits)
        .write_to(&config.modules.policies_dir);
    config.zones.insert("untrusted".into(), zone);
    let Err(err) = bulkhead::service::Service::start(config, None).await else {
        panic!("the service started");
    };
    err.to_string()
}

/// A module whose limits let one job's files take more than its zone's
/// disk is refused at the start, with a message naming both and the
/// setting to change.
#[tokio::test(flavor = "multi_thread")]
async fn a_module_whose_jobs_cannot_fit_its_zones_disk_is_refused() {
    let err = refused_start(
        |l| l.output = ByteSize::mib(8),
        bulkhead::config::ZonePool {
            disk: ByteSize::mib(8),
            ..Default::default()
        },
    )
    .await;
    for part in ["hello", "`untrusted`", "8388608", "[zones.untrusted] disk"] {
        assert!(err.contains(part), "{part}: {err}");
    }
}

/// A module whose limits let one job take more of a worker's memory than
/// its ceiling leaves the worker's jobs (its linear memory, what the host
/// holds for it, and its files, which are memory in a worker's tmpfs) is
/// refused at the start, naming what the ceiling leaves and the setting to
/// change; so is a zone whose ceiling leaves its workers' jobs nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_module_whose_jobs_cannot_fit_a_workers_memory_is_refused() {
    let places = bulkhead::config::ServeConfig::default().queue.workers;
    let ceiling = 512u64 << 20;
    let left = ceiling - bulkhead::worker::memory::ZoneMemory::base(places);
    let zone = || bulkhead::config::ZonePool {
        memory: Some(ByteSize::bytes(ceiling)),
        ..Default::default()
    };
    let err = refused_start(|l| l.memory = ByteSize::bytes(left), zone()).await;
    for part in [
        "hello",
        "`untrusted`",
        &left.to_string(),
        "[zones.untrusted] memory",
    ] {
        assert!(err.contains(part), "{part}: {err}");
    }
    let err = refused_start(
        |_| {},
        bulkhead::config::ZonePool {
            memory: Some(ByteSize::mib(64)),
            ..Default::default()
        },
    )
    .await;
    for part in ["`untrusted`", "leaves its jobs nothing", "queue.workers"] {
        assert!(err.contains(part), "{part}: {err}");
    }
}

/// Jobs of one tenant, each within its limits, never take a worker past its
/// memory ceiling together: five jobs that each hold 195 MiB of the
/// 200 MiB of linear memory their policy allows, in a one-worker zone
/// whose ceiling is 900 MiB and which runs eight jobs at once, run one
/// after another (each is counted its memory three times over, for the
/// copies a host call's argument can take), beside another tenant's small
/// job; the worker is never killed, the other tenant's job succeeds, and
/// each of the five ends at its wall time with its memory taken. (Found by an
/// attacker: three such jobs killed the worker, and a co-tenant's job with
/// it.)
#[tokio::test(flavor = "multi_thread")]
async fn jobs_within_their_limits_never_take_a_worker_past_its_ceiling_together() {
    use bulkhead::policy::HumanDuration;

    if bulkhead::worker::cgroup::offered().is_err() {
        eprintln!("no cgroup memory controller here: nothing to check");
        return;
    }
    let held = crate::common::policies::policy(bulkhead_tests::HOSTILE, "hostile")
        .scopes(&["hostile:run"])
        .memory(ByteSize::mib(200))
        .times(HumanDuration::secs(2), HumanDuration::secs(2))
        .limits(|l| {
            l.input = ByteSize::kib(64);
            l.output = ByteSize::mib(1);
        })
        .args(&["memory-held", "--mib=195"]);
    let server = service::start(|c| {
        c.queue.workers = 8;
        c.queue.max_running_per_tenant = 8;
        c.queue.max_running_per_module = 8;
        std::fs::remove_dir_all(&c.modules.policies_dir).unwrap();
        held.write_to(&c.modules.policies_dir);
        hello().write_to(&c.modules.policies_dir);
        c.zones.insert(
            "untrusted".into(),
            bulkhead::config::ZonePool {
                workers: 1,
                memory: Some(ByteSize::mib(900)),
                ..Default::default()
            },
        );
    })
    .await;
    let pid = workers(&server)[0];
    let acme = server.token("acme", &["hostile:run"]).await;
    let other = server.token("umbrella", &["hello:run"]).await;
    let jobs: Vec<String> = {
        let mut ids = Vec::new();
        for _ in 0..5 {
            let job = submit(&server, &acme, "hostile", false).await;
            ids.push(job["id"].as_str().unwrap().to_owned());
        }
        ids
    };
    let ok = submit(&server, &other, "hello", true).await;
    assert_eq!(ok["state"], "succeeded", "{ok}");
    for id in &jobs {
        let job = server.finished(&acme, id).await;
        assert_eq!(job["report"]["limit"], "wall_time", "{job}");
        let held: u64 = job["report"]["stdout"]["text"]
            .as_str()
            .and_then(|t| t.lines().find_map(|l| l.strip_prefix("memory-held: ")))
            .and_then(|t| t.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{job}"));
        assert!(held >= 195, "{job}");
    }
    assert_eq!(workers(&server), vec![pid], "the worker was replaced");
}

/// A zone's jobs are given room in its disk before they are sent, and wait
/// for it: eight jobs at once that each fill their 6 MiB `/out` to its
/// quota, of two tenants, on two workers sharing 20 MiB, all reach their
/// quota (none is cut short by another's files), a third tenant's job
/// succeeds, the workers' directories together never exceed the zone's
/// disk (and the floor of each), and all of it is given back.
#[tokio::test(flavor = "multi_thread")]
async fn jobs_wait_for_room_in_their_zones_disk_and_each_reaches_its_quota() {
    const OUTPUT: u64 = 6 << 20;
    const DISK: u64 = 20 << 20;
    let filler = common::policy(bulkhead_tests::P1_FILES, "p1-files")
        .scopes(&["p1-files:run"])
        .params(&["mode", "nap-ms"])
        .limits(|l| {
            l.input = ByteSize::kib(64);
            l.output = ByteSize::bytes(OUTPUT);
            l.output_files = 4;
        });
    let server = zone_with_disk(ByteSize::bytes(DISK), 2, &[filler]).await;
    if !mounts(&server) {
        return;
    }
    let pids = workers(&server);
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done, pids) = (peak.clone(), done.clone(), pids.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::SeqCst) {
                let total: u64 = pids.iter().map(|p| dir_size(*p)).sum();
                peak.fetch_max(total, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let mut ids = Vec::new();
    let mut tokens = Vec::new();
    for tenant in ["acme", "umbrella"] {
        let token = server.token(tenant, &["p1-files:run"]).await;
        for _ in 0..4 {
            let job = json(
                server
                    .post(
                        "/v1/modules/p1-files/jobs?param.mode=fill&param.nap-ms=300",
                        &token,
                    )
                    .body(Vec::new()),
            )
            .await;
            ids.push((job["id"].as_str().unwrap().to_owned(), token.clone()));
        }
        tokens.push(token);
    }
    let other = server.token("initech", &["p1-files:run"]).await;
    let copy = json(
        server
            .post("/v1/modules/p1-files/jobs?wait=60s", &other)
            .header("content-type", "application/octet-stream")
            .body(b"some input".to_vec()),
    )
    .await;
    assert_eq!(copy["state"], "succeeded", "{copy}");
    for (id, token) in &ids {
        let mut job = Value::Null;
        for _ in 0..1200 {
            job = json(server.get(&format!("/v1/jobs/{id}"), token)).await;
            if job["state"] != "queued" && job["state"] != "running" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(job["report"]["limit"], "output", "{job}");
        let said = format!("fill stopped after {OUTPUT} bytes");
        assert!(
            job["report"]["stdout"]["text"]
                .as_str()
                .is_some_and(|t| t.contains(&said)),
            "{job}"
        );
    }
    until(|| server.service.isolation().disk_given.get("untrusted") == Some(&0)).await;
    until(|| pids.iter().all(|p| dir_size(*p) == FLOOR)).await;
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    sampler.join().unwrap();
    let peak = peak.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        peak <= DISK + 2 * FLOOR,
        "the workers' directories took {peak} bytes together"
    );
    assert!(peak > 2 * OUTPUT, "{peak}");
    assert_eq!(workers(&server), pids, "a worker was replaced");
}

/// A job waiting for room is not passed for ever by later, smaller ones:
/// one tenant keeps four jobs of 12 MiB of room in flight in a zone of
/// 40 MiB (three fit), started 100 ms apart and each resubmitted as it
/// ends, so one is always waiting when another ends; another tenant's
/// job of 26 MiB, which fits only once two have ended together, still
/// runs while the first keeps submitting: later jobs wait their turn
/// behind it.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_job_is_not_passed_for_ever_by_smaller_later_ones() {
    let small = sleeper(600).limits(|l| {
        l.input = ByteSize::kib(64);
        l.output = ByteSize::mib(12);
        l.output_files = 4;
    });
    let large = common::policy(bulkhead_tests::P1_FILES, "p1-files")
        .scopes(&["p1-files:run"])
        .limits(|l| {
            l.input = ByteSize::kib(64);
            l.output = ByteSize::mib(26);
            l.output_files = 4;
        });
    let server = zone_with_disk(ByteSize::mib(40), 2, &[small, large]).await;
    let flooder = server.token("acme", &["hostile:run"]).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flood = {
        let (base, stop) = (server.base.clone(), stop.clone());
        let client = reqwest::Client::new();
        tokio::spawn(async move {
            let mut submitted = 0u32;
            let mut in_flight: Vec<String> = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let mut still = Vec::new();
                for id in in_flight {
                    let job: Value = json(
                        client
                            .get(format!("{base}/v1/jobs/{id}"))
                            .bearer_auth(&flooder),
                    )
                    .await;
                    if job["state"] == "queued" || job["state"] == "running" {
                        still.push(id);
                    }
                }
                in_flight = still;
                if in_flight.len() < 4 {
                    let job: Value = json(
                        client
                            .post(format!("{base}/v1/modules/hostile/jobs"))
                            .bearer_auth(&flooder)
                            .body(Vec::new()),
                    )
                    .await;
                    in_flight.push(job["id"].as_str().unwrap().to_owned());
                    submitted += 1;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            submitted
        })
    };
    // Three of its jobs have room (all that fit) before the large one comes.
    until(|| server.service.isolation().disk_given.get("untrusted") >= Some(&(36 << 20))).await;
    let other = server.token("initech", &["p1-files:run"]).await;
    let job = json(
        server
            .post("/v1/modules/p1-files/jobs?wait=60s", &other)
            .header("content-type", "application/octet-stream")
            .body(b"x".to_vec()),
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let submitted = flood.await.unwrap();
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(submitted >= 4, "{submitted}");
}

/// A tenant's job waiting for room holds back only tenants holding as
/// much of the zone's disk: while one tenant's large job runs and its next
/// waits for that room, another tenant's small job, which fits in what is
/// left, runs at once rather than after them.
#[tokio::test(flavor = "multi_thread")]
async fn a_waiting_job_does_not_hold_back_a_tenant_holding_less() {
    let big = sleeper(5_000).limits(|l| {
        l.input = ByteSize::kib(64);
        l.output = ByteSize::mib(12);
        l.output_files = 4;
    });
    let server = zone_with_disk(ByteSize::mib(16), 1, &[big, small_hello()]).await;
    let acme = server.token("acme", &["hostile:run"]).await;
    let mut big_jobs = Vec::new();
    for _ in 0..2 {
        let job = submit(&server, &acme, "hostile", false).await;
        big_jobs.push(job["id"].as_str().unwrap().to_owned());
    }
    // One has its room; the other waits for it.
    until(|| server.service.isolation().disk_given.get("untrusted") >= Some(&(12 << 20))).await;
    for id in &big_jobs {
        for _ in 0..400 {
            let job = json(server.get(&format!("/v1/jobs/{id}"), &acme)).await;
            if job["state"] == "running" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let other = server.token("initech", &["hello:run"]).await;
    let hello = submit(&server, &other, "hello", true).await;
    assert_eq!(hello["state"], "succeeded", "{hello}");
    let first = json(server.get(&format!("/v1/jobs/{}", big_jobs[0]), &acme)).await;
    assert_eq!(
        first["state"], "running",
        "the hello job waited behind the large ones: {first}"
    );
    for id in &big_jobs {
        for _ in 0..600 {
            let job = json(server.get(&format!("/v1/jobs/{id}"), &acme)).await;
            if job["state"] != "queued" && job["state"] != "running" {
                assert_eq!(job["report"]["limit"], "wall_time", "{job}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// What the worker holds resident of its own, in bytes: its anonymous
/// and shared memory. The pages of its binary's code it has run are not
/// counted: they come from the page cache, grow with every path of the
/// binary a job first takes (3 MiB over a worker's first jobs here), and are no job's host state.
fn resident(pid: u32) -> u64 {
    (common::memory_kib(pid, "RssAnon:") + common::memory_kib(pid, "RssShmem:")) << 10
}

/// A job's directory listings, each read in full into its worker's
/// memory and held for as long as the guest keeps it, hold no more of
/// that memory than `quota::MAX_LISTED` together: a guest keeping 4,000
/// listings of 60 entries (about 60 MB were they all read) grows its
/// worker by far less, its further listings refused (found by an
/// attacker: 1.2 GB held by one job allowed 32 MiB).
#[tokio::test(flavor = "multi_thread")]
async fn a_jobs_directory_listings_hold_a_bounded_share_of_its_workers_memory() {
    use bulkhead::policy::HumanDuration;
    let lister = common::policy(bulkhead_tests::HOSTILE, "hostile")
        .scopes(&["hostile:run"])
        .times(HumanDuration::millis(5_000), HumanDuration::millis(5_000))
        .args(&["listings-held"])
        .limits(|l| {
            l.memory = ByteSize::mib(16);
            l.input = ByteSize::kib(64);
            l.output = ByteSize::mib(1);
            l.output_files = 64;
        });
    let server = zone_with_disk(ByteSize::mib(64), 1, &[lister]).await;
    let pid = workers(&server)[0];
    let before = resident(pid);
    let token = server.token("acme", &["hostile:run"]).await;
    let job = submit(&server, &token, "hostile", false).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let mut peak = before;
    let mut last = Value::Null;
    for _ in 0..400 {
        peak = peak.max(resident(pid));
        last = json(server.get(&format!("/v1/jobs/{id}"), &token)).await;
        if last["state"] != "queued" && last["state"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(last["report"]["limit"], "wall_time", "{last}");
    let stdout = last["report"]["stdout"]["text"].as_str().unwrap_or("");
    assert!(stdout.contains("refused"), "{stdout}");
    let grown = peak.saturating_sub(before);
    assert!(
        grown < 40 << 20,
        "the worker grew by {} MiB while the job held its listings: {stdout}",
        grown >> 20
    );
}

/// In a zone with a memory ceiling, what a job's host state took of its
/// worker's memory is given back once the job has ended, before the
/// gateway counts it free: after jobs that each held 16 MiB of directory
/// listings, the idle worker is resident within 10 MiB of where it
/// started (found by an attacker: an idle worker kept 343 MiB its ended
/// jobs had freed, and the next job took it past its ceiling). The worker
/// has one place: the pool's slots are sharded by the thread that takes
/// one, so with more places jobs run on either guest thread could each
/// warm a slot of their own, and each slot keeps up to
/// `kept_resident_per_place` resident.
#[tokio::test(flavor = "multi_thread")]
async fn what_an_ended_jobs_host_state_took_is_given_back_before_the_next() {
    use bulkhead::policy::HumanDuration;
    let lister = common::policy(bulkhead_tests::HOSTILE, "hostile")
        .scopes(&["hostile:run"])
        .times(HumanDuration::millis(1_500), HumanDuration::millis(1_500))
        .args(&["listings-held", "--entries=2000", "--passes=200"])
        .limits(|l| {
            l.memory = ByteSize::mib(16);
            l.input = ByteSize::kib(64);
            l.output = ByteSize::mib(1);
            l.output_files = 2_100;
        });
    let server = service::start(|c| {
        std::fs::remove_dir_all(&c.modules.policies_dir).unwrap();
        lister.write_to(&c.modules.policies_dir);
        c.queue.workers = 1;
        c.zones.insert(
            "untrusted".into(),
            bulkhead::config::ZonePool {
                disk: ByteSize::mib(64),
                workers: 1,
                memory: Some(ByteSize::gib(1)),
                ..Default::default()
            },
        );
    })
    .await;
    let pid = workers(&server)[0];
    let before = resident(pid);
    let token = server.token("acme", &["hostile:run"]).await;
    for round in 0..4 {
        let job = submit(&server, &token, "hostile", true).await;
        assert_eq!(job["report"]["limit"], "wall_time", "{job}");
        let stdout = job["report"]["stdout"]["text"].as_str().unwrap_or("");
        assert!(stdout.contains("refused"), "{stdout}");
        // What a place keeps between jobs (its guest's memory, up to the
        // 4 MiB kept resident, and its stack) is the worker's from the
        // first job on; the listings' 16 MiB are not.
        let now = resident(pid);
        assert!(
            now < before + (10 << 20),
            "the idle worker holds {} MiB more after job {round} than before the first",
            now.saturating_sub(before) >> 20
        );
    }
}

/// Every thread of a worker, those it starts after it began among them,
/// is under its share of the CPU: a cgroup of its own, named by its zone
/// and pid, weighing as many of the gateway's threads as it runs guests
/// on, whatever number of threads it runs (found by a tester: a
/// compromised worker's busy threads slowed another zone's jobs
/// twentyfold). The cgroup goes with the worker.
#[tokio::test(flavor = "multi_thread")]
async fn every_thread_of_a_worker_is_under_its_share_of_the_cpu() {
    if let Err(why) = bulkhead::worker::cgroup::cpu_offered() {
        eprintln!("no CPU cgroup here ({why}): nothing to check");
        return;
    }
    let server = service::start(|_| {}).await;
    let token = server.token("acme", &["hello:run"]).await;
    // Its guest threads have run a job.
    let job = submit(&server, &token, "hello", true).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let pid = workers(&server)[0];
    let dir = common::cpu_cgroup(&pid.to_string()).expect("the worker is in a CPU cgroup");
    assert_eq!(
        dir.file_name().unwrap().to_str().unwrap(),
        format!("untrusted-{pid}"),
        "a worker's CPU cgroup is its own, named by its zone and pid"
    );
    let threads = u64::from(bulkhead::worker::GUEST_THREADS);
    let (file, weight) = if dir.join("cpu.shares").exists() {
        ("cpu.shares", 1024 * threads)
    } else {
        ("cpu.weight", 100 * threads)
    };
    assert_eq!(
        std::fs::read_to_string(dir.join(file)).unwrap().trim(),
        weight.to_string()
    );
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| t.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(tasks.len() > 1, "the worker runs threads: {tasks:?}");
    for tid in &tasks {
        assert_eq!(
            common::cpu_cgroup(&format!("{pid}/task/{tid}")).as_deref(),
            Some(dir.as_path()),
            "thread {tid} of worker {pid} is outside its share"
        );
    }
    // Killed, the worker leaves no cgroup behind.
    // SAFETY: kill(2) of a worker of this test's service.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    until(|| !dir.exists()).await;
    until(|| workers(&server).iter().any(|p| *p != pid)).await;
    let job = submit(&server, &token, "hello", true).await;
    assert_eq!(job["state"], "succeeded", "{job}");
}

/// An idle worker whose cgroup holds memory beyond its base, its jobs'
/// weights, its modules' code and its files (what a job's host state left
/// behind that no weight counted, or its allocator kept) is replaced, and
/// the zone runs its next job in the new one. Each worker's cgroup is
/// named by its pid, so no other worker (of this pool or another) shares
/// its ceiling. The memory is put in from outside: a process moved into
/// the worker's cgroup before it fills 192 MiB.
#[tokio::test(flavor = "multi_thread")]
async fn an_idle_worker_holding_memory_beyond_its_base_is_replaced() {
    use std::io::Write as _;
    use std::os::unix::process::CommandExt as _;
    if bulkhead::worker::cgroup::offered().is_err() {
        eprintln!("no cgroup memory controller here: nothing to check");
        return;
    }
    let server = service::start(|c| {
        c.zones.insert(
            "untrusted".into(),
            bulkhead::config::ZonePool {
                workers: 1,
                memory: Some(ByteSize::gib(1)),
                ..Default::default()
            },
        );
    })
    .await;
    let token = server.token("acme", &["hello:run"]).await;
    let job = submit(&server, &token, "hello", true).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    let pid = workers(&server)[0];
    let cgroup = common::memory_limit_file(pid).parent().unwrap().to_owned();
    assert_eq!(
        cgroup.file_name().unwrap().to_str().unwrap(),
        format!("untrusted-{pid}"),
        "a worker's cgroup is named by its zone and pid"
    );
    // Waits for a line on stdin (sent once it is in the cgroup), then
    // holds 192 MiB: `dd` fills its buffer and blocks writing it to a
    // reader that never reads.
    let mut holder = std::process::Command::new("sh")
        .args([
            "-c",
            "read _; dd if=/dev/zero bs=192M count=1 2>/dev/null | sleep 60",
        ])
        .stdin(std::process::Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap();
    let holder_group = holder.id();
    std::fs::write(cgroup.join("cgroup.procs"), holder_group.to_string()).unwrap();
    holder.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let replaced = {
        let mut replaced = false;
        for _ in 0..400 {
            if !workers(&server).contains(&pid) {
                replaced = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        replaced
    };
    // SAFETY: kill(2) of the holder's own process group.
    unsafe { libc::kill(-(holder_group as i32), libc::SIGKILL) };
    let _ = holder.wait();
    for _ in 0..100 {
        if std::fs::remove_dir(&cgroup).is_ok() || !cgroup.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        replaced,
        "the idle worker {pid} kept its place with 192 MiB in its cgroup beyond its base"
    );
    until(|| workers(&server).len() == 1).await;
    let job = submit(&server, &token, "hello", true).await;
    assert_eq!(job["state"], "succeeded", "{job}");
    assert!(!workers(&server).contains(&pid));
}

/// The service running only `policy`, two jobs at once, in a one-worker
/// zone whose memory ceiling is `ceiling`.
async fn two_places_beside_a_ceiling(policy: &TestPolicy, ceiling: ByteSize) -> Server {
    service::start(|c| {
        c.queue.workers = 2;
        std::fs::remove_dir_all(&c.modules.policies_dir).unwrap();
        policy.write_to(&c.modules.policies_dir);
        c.zones.insert(
            "untrusted".into(),
            bulkhead::config::ZonePool {
                workers: 1,
                memory: Some(ceiling),
                ..Default::default()
            },
        );
    })
    .await
}

/// A number a cgroup file holds.
fn read_cgroup(file: &std::path::Path) -> u64 {
    std::fs::read_to_string(file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A job takes no more of its worker's memory than it is counted for
/// (`worker::memory::weight`), its report among it: two jobs at once that
/// each write 4 MiB of `0x01` to stdout and of `0xFF` to stderr (six
/// bytes of report JSON a byte, and three of text) raise the worker's
/// cgroup peak by less than their two weights, and the idle worker is
/// back within 16 MiB of where it was before its first jobs (found by an
/// attacker: building such a report held 64 MiB for a job counted 31 MiB,
/// and the queue of reports going up kept 64 MiB for the worker's life;
/// later, 1 run in 3: the emptied queue kept a report's allocation, since
/// what it writes is advanced past, not freed).
#[tokio::test(flavor = "multi_thread")]
async fn a_jobs_report_is_within_what_it_is_counted_for() {
    if bulkhead::worker::cgroup::offered().is_err() {
        eprintln!("no cgroup memory controller here: nothing to check");
        return;
    }
    let heavy = common::policy(bulkhead_tests::HOSTILE, "hostile")
        .scopes(&["hostile:run"])
        .args(&["report-heavy"])
        .limits(|l| {
            l.memory = ByteSize::mib(16);
            l.stdout = ByteSize::mib(8);
            l.stderr = ByteSize::mib(8);
        });
    let weight = bulkhead::worker::memory::weight(&heavy.parse(), 0);
    let server = two_places_beside_a_ceiling(&heavy, ByteSize::gib(1)).await;
    let pid = workers(&server)[0];
    let usage = common::memory_file(pid, "memory.usage_in_bytes", "memory.current");
    let peak = common::memory_file(pid, "memory.max_usage_in_bytes", "memory.peak");
    let token = server.token("acme", &["hostile:run"]).await;
    let base = read_cgroup(&usage);
    // Two first jobs warm the worker's two places (their stacks, their
    // kept pages) and its guest threads' allocator arenas.
    let (a, b) = tokio::join!(
        submit(&server, &token, "hostile", true),
        submit(&server, &token, "hostile", true)
    );
    for job in [a, b] {
        assert_eq!(job["state"], "succeeded", "{job}");
    }
    let before = read_cgroup(&usage);
    if std::fs::write(&peak, "0").is_err() {
        eprintln!(
            "this kernel cannot reset {}: nothing to check",
            peak.display()
        );
        return;
    }
    let (a, b) = tokio::join!(
        submit(&server, &token, "hostile", true),
        submit(&server, &token, "hostile", true)
    );
    for job in [a, b] {
        assert_eq!(job["state"], "succeeded", "{job}");
        assert!(
            job["report"]["stdout"]["truncated"].as_bool().unwrap(),
            "{job}"
        );
    }
    let grown = read_cgroup(&peak).saturating_sub(before);
    assert!(
        grown < 2 * weight,
        "two jobs raised the worker's peak by {} MiB, counted {} MiB each",
        grown >> 20,
        weight >> 20
    );
    let after = read_cgroup(&usage);
    assert!(
        after < base + (16 << 20),
        "the idle worker holds {} MiB more than before its first jobs",
        after.saturating_sub(base) >> 20
    );
}

/// A host call's argument, copied out of the guest's memory before anything
/// checks it, is within what its job is counted for: a call may carry
/// `HOSTCALL_FUEL` in, and two jobs at once that each `stat` a 128 MiB path
/// trap there, raising their worker's cgroup peak by less than their two
/// weights (found by an attacker: a 128 MiB path took 253 MiB of its
/// worker, and two such jobs killed a co-tenant's).
#[tokio::test(flavor = "multi_thread")]
async fn a_host_calls_copied_argument_is_within_what_its_job_is_counted_for() {
    use bulkhead::policy::HumanDuration;
    if bulkhead::worker::cgroup::offered().is_err() {
        eprintln!("no cgroup memory controller here: nothing to check");
        return;
    }
    let pathy = common::policy(bulkhead_tests::HOSTILE, "hostile")
        .scopes(&["hostile:run"])
        .args(&["cpu-huge-path", "--mib=128"])
        .times(HumanDuration::millis(1_500), HumanDuration::millis(1_500))
        .limits(|l| {
            l.memory = ByteSize::mib(160);
            l.input = ByteSize::kib(64);
            l.output = ByteSize::mib(1);
        });
    let weight = bulkhead::worker::memory::weight(&pathy.parse(), 0);
    let server = two_places_beside_a_ceiling(&pathy, ByteSize::gib(2)).await;
    let pid = workers(&server)[0];
    let usage = common::memory_file(pid, "memory.usage_in_bytes", "memory.current");
    let peak = common::memory_file(pid, "memory.max_usage_in_bytes", "memory.peak");
    let before = read_cgroup(&usage);
    if std::fs::write(&peak, "0").is_err() {
        eprintln!(
            "this kernel cannot reset {}: nothing to check",
            peak.display()
        );
        return;
    }
    let token = server.token("acme", &["hostile:run"]).await;
    let (a, b) = tokio::join!(
        submit(&server, &token, "hostile", true),
        submit(&server, &token, "hostile", true)
    );
    for job in [a, b] {
        assert_eq!(job["report"]["failure"]["kind"], "trap", "{job}");
    }
    let grown = read_cgroup(&peak).saturating_sub(before);
    assert!(
        grown < 2 * weight,
        "two jobs raised the worker's peak by {} MiB, counted {} MiB each",
        grown >> 20,
        weight >> 20
    );
}

/// An inline job (`?wait=`) that has no room in its zone by the time only
/// its wall time is left of the wait is stored and queued like any job:
/// the caller gets 202 within its wait (not the job's end, after it), the
/// job is listed meanwhile, and it runs once room comes (found by an
/// attacker: an inline job waiting for room held its request 73 s past a
/// 35 s wait, unlisted and uncancellable).
#[tokio::test(flavor = "multi_thread")]
async fn an_inline_job_without_room_in_time_is_stored_and_queued() {
    let big = sleeper(4_000).limits(|l| {
        l.input = ByteSize::kib(64);
        l.output = ByteSize::mib(12);
        l.output_files = 4;
    });
    let server = zone_with_disk(ByteSize::mib(16), 1, &[big]).await;
    if !mounts(&server) {
        return;
    }
    let acme = server.token("acme", &["hostile:run"]).await;
    let first = submit(&server, &acme, "hostile", false).await;
    let first = first["id"].as_str().unwrap().to_owned();
    // It has its room: the next one cannot, until it ends.
    until(|| server.service.isolation().disk_given.get("untrusted") >= Some(&(12 << 20))).await;
    let other = server.token("initech", &["hostile:run"]).await;
    // One second of the wait beyond the job's wall time.
    let response = server
        .post("/v1/modules/hostile/jobs?wait=5s", &other)
        .body(Vec::new())
        .send()
        .await
        .unwrap();
    let status = response.status();
    let waited: Value = response.json().await.unwrap();
    assert_eq!(status, 202, "{waited}");
    let id = waited["id"].as_str().unwrap().to_owned();
    let listed = json(server.get("/v1/jobs", &other)).await;
    assert!(listed.to_string().contains(&id), "{listed}");
    for (token, id) in [(&acme, &first), (&other, &id)] {
        let mut last = Value::Null;
        for _ in 0..600 {
            last = json(server.get(&format!("/v1/jobs/{id}"), token)).await;
            if last["state"] != "queued" && last["state"] != "running" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(last["report"]["limit"], "wall_time", "{last}");
    }
}

/// Jobs waiting for room in their zone's disk lend the queue's running
/// places they took, however many more of them wait than there are
/// places: with two places, one job running and three waiting for the
/// room it holds, another tenant's job of another zone runs at once, not
/// once the first job ends.
#[tokio::test(flavor = "multi_thread")]
async fn jobs_waiting_for_room_do_not_hold_the_queues_running_places() {
    let big = sleeper(5_000).limits(|l| {
        l.input = ByteSize::kib(64);
        l.output = ByteSize::mib(12);
        l.output_files = 4;
    });
    let server = one_worker_zone_beside_hello(&big, ByteSize::mib(16)).await;
    let acme = server.token("acme", &["hostile:run"]).await;
    let mut big_jobs = Vec::new();
    for _ in 0..4 {
        let job = submit(&server, &acme, "hostile", false).await;
        big_jobs.push((acme.clone(), job["id"].as_str().unwrap().to_owned()));
    }
    hello_runs_while_the_first_runs(&server, &big_jobs).await;
}

/// A stored job waiting for room holds none of its inputs, so however
/// large they are, it lends its slot: six jobs of 33 MiB of inputs each,
/// a zone's disk with room for one. One runs, the other five wait for its
/// room, aside. With their inputs read before the wait, the jobs aside
/// past the number of slots were held to 64 MiB of inputs between them,
/// and the last two held both slots until rooms came free for them, one
/// wall time after another; another tenant's job of another zone then
/// waited as long (found by an attacker: 200–300 s with eight tenants).
/// Here it runs while the first large job still does.
#[tokio::test(flavor = "multi_thread")]
async fn stored_jobs_waiting_for_room_lend_their_slots_however_large_their_inputs() {
    let big = sleeper(8_000).limits(|l| {
        l.input = ByteSize::mib(34);
        l.output = ByteSize::kib(64);
        l.output_files = 4;
    });
    let server = one_worker_zone_beside_hello(&big, ByteSize::mib(40)).await;
    let body = vec![7u8; 33 << 20];
    let mut big_jobs = Vec::new();
    for tenant in ["acme", "globex"] {
        let token = server.token(tenant, &["hostile:run"]).await;
        for _ in 0..3 {
            let job = json(
                server
                    .post("/v1/modules/hostile/jobs", &token)
                    .header("content-type", "application/octet-stream")
                    .body(body.clone()),
            )
            .await;
            let id = job["id"].as_str().unwrap_or_else(|| panic!("{job}"));
            big_jobs.push((token.clone(), id.to_owned()));
        }
    }
    hello_runs_while_the_first_runs(&server, &big_jobs).await;
}

/// The service with two slots, `big` (module `hostile`) in zone
/// `untrusted` of one worker and `disk`, and `hello` in zone
/// `first-party`.
async fn one_worker_zone_beside_hello(big: &TestPolicy, disk: ByteSize) -> Server {
    service::start(|c| {
        c.queue.workers = 2;
        std::fs::remove_dir_all(&c.modules.policies_dir).unwrap();
        big.write_to(&c.modules.policies_dir);
        hello()
            .zone(bulkhead::policy::Zone::FirstParty)
            .write_to(&c.modules.policies_dir);
        c.zones.insert(
            "untrusted".into(),
            bulkhead::config::ZonePool {
                disk,
                workers: 1,
                ..Default::default()
            },
        );
    })
    .await
}

/// Once every one of `big_jobs` (token, id: the first given the zone's
/// room, the others waiting for it) is claimed, another tenant's `hello`
/// runs while the first still does; then each ends at its wall time.
async fn hello_runs_while_the_first_runs(server: &Server, big_jobs: &[(String, String)]) {
    for (token, id) in big_jobs {
        for _ in 0..400 {
            let job = json(server.get(&format!("/v1/jobs/{id}"), token)).await;
            if job["state"] == "running" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    let other = server.token("initech", &["hello:run"]).await;
    let hello = submit(server, &other, "hello", true).await;
    assert_eq!(hello["state"], "succeeded", "{hello}");
    let (token, id) = &big_jobs[0];
    let first = json(server.get(&format!("/v1/jobs/{id}"), token)).await;
    assert_eq!(
        first["state"], "running",
        "the hello job waited for the first large one to end: {first}"
    );
    for (token, id) in big_jobs {
        for _ in 0..1_200 {
            let job = json(server.get(&format!("/v1/jobs/{id}"), token)).await;
            if job["state"] != "queued" && job["state"] != "running" {
                assert_eq!(job["report"]["limit"], "wall_time", "{job}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Jobs that waited aside for room and were then given it run without
/// taking the queue's slots back. A large job fills the zone's disk; four
/// smaller ones wait aside for room; once the large job ends, two of them
/// get their rooms and run, in the zone's two places. Two more jobs of
/// another tenant, picked then, wait for a place, lending their slots.
/// Another tenant's job of another zone then runs at once, not once every
/// job that waited aside has run (each room comes free before its job's
/// slot, so a job given its room taking its slot back kept the queue full
/// as long as jobs aside were left; and jobs waiting for a place held
/// their slots).
#[tokio::test(flavor = "multi_thread")]
async fn jobs_given_their_room_after_waiting_aside_leave_the_queues_slots_free() {
    let modules = tempfile::tempdir().unwrap();
    let guests = std::path::Path::new(bulkhead_tests::GUESTS_DIR);
    for (from, to) in [
        ("hostile", "hostile"),
        ("hostile", "hog"),
        ("hello", "hello"),
    ] {
        std::fs::copy(
            guests.join(format!("{from}.wasm")),
            modules.path().join(format!("{to}.wasm")),
        )
        .unwrap();
    }
    let hog = common::policy(bulkhead_tests::HOSTILE, "hog")
        .scopes(&["hostile:run"])
        .times(
            bulkhead::policy::HumanDuration::millis(4_000),
            bulkhead::policy::HumanDuration::millis(4_000),
        )
        .args(&["sleep"])
        .limits(|l| {
            l.input = ByteSize::kib(64);
            l.output = ByteSize::mib(34);
            l.output_files = 4;
        });
    let small = sleeper(6_000).limits(|l| {
        l.input = ByteSize::kib(64);
        l.output = ByteSize::mib(12);
        l.output_files = 4;
    });
    let modules_dir = modules.path().to_owned();
    let server = service::start(|c| {
        c.queue.workers = 2;
        c.modules.modules_dir = modules_dir;
        std::fs::remove_dir_all(&c.modules.policies_dir).unwrap();
        hog.write_to(&c.modules.policies_dir);
        small.write_to(&c.modules.policies_dir);
        hello()
            .zone(bulkhead::policy::Zone::FirstParty)
            .write_to(&c.modules.policies_dir);
        c.zones.insert(
            "untrusted".into(),
            bulkhead::config::ZonePool {
                disk: ByteSize::mib(40),
                workers: 1,
                ..Default::default()
            },
        );
    })
    .await;
    let state = |token: String, id: String| {
        let server = &server;
        async move { json(server.get(&format!("/v1/jobs/{id}"), &token)).await }
    };
    let acme = server.token("acme", &["hostile:run"]).await;
    let globex = server.token("globex", &["hostile:run"]).await;
    let hog = submit(&server, &acme, "hog", false).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    for _ in 0..400 {
        if state(acme.clone(), hog.clone()).await["state"] == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let mut smalls = Vec::new();
    for token in [&acme, &acme, &globex, &globex] {
        let job = submit(&server, token, "hostile", false).await;
        smalls.push((token.clone(), job["id"].as_str().unwrap().to_owned()));
    }
    for (token, id) in &smalls {
        for _ in 0..400 {
            if state(token.clone(), id.clone()).await["state"] == "running" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
    // The large job ends; two of the four get their rooms.
    for _ in 0..400 {
        if state(acme.clone(), hog.clone()).await["state"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // Two small rooms given, the large one gone.
    until(|| {
        server
            .service
            .isolation()
            .disk_given
            .get("untrusted")
            .is_some_and(|&given| (24 << 20..34 << 20).contains(&given))
    })
    .await;
    // Two more jobs, picked while those two hold the zone's places: they
    // wait for a place, and lend their slots meanwhile too.
    let umbrella = server.token("umbrella", &["hostile:run"]).await;
    for _ in 0..2 {
        let job = submit(&server, &umbrella, "hostile", false).await;
        let id = job["id"].as_str().unwrap().to_owned();
        for _ in 0..400 {
            if state(umbrella.clone(), id.clone()).await["state"] == "running" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        smalls.push((umbrella.clone(), id));
    }
    let other = server.token("initech", &["hello:run"]).await;
    let hello = submit(&server, &other, "hello", true).await;
    assert_eq!(hello["state"], "succeeded", "{hello}");
    let mut unfinished = 0;
    for (token, id) in &smalls {
        let job = state(token.clone(), id.clone()).await;
        if job["state"] == "running" {
            unfinished += 1;
        }
    }
    assert!(
        unfinished >= 5,
        "the hello job waited for the jobs that had waited aside: {unfinished} of 6 left"
    );
    for (token, id) in &smalls {
        for _ in 0..800 {
            let job = state(token.clone(), id.clone()).await;
            if job["state"] != "queued" && job["state"] != "running" {
                assert_eq!(job["report"]["limit"], "wall_time", "{job}");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A worker whose directory keeps what its jobs released (native code in
/// it, here the test writing through its working directory while its job
/// runs) is stopped once it has kept it a while: its room goes back to the
/// zone with it, and a fresh worker takes its place.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_keeps_released_room_is_replaced_and_the_room_given_back() {
    let server = zone_with_disk(
        ByteSize::mib(16),
        1,
        &[sleeper(1_500).limits(|l| {
            l.input = ByteSize::kib(64);
            l.output = ByteSize::mib(4);
            l.output_files = 4;
        })],
    )
    .await;
    if !mounts(&server) {
        return;
    }
    let before = workers(&server);
    let token = server.token("acme", &["hostile:run"]).await;
    let job = submit(&server, &token, "hostile", false).await;
    let id = job["id"].as_str().unwrap().to_owned();
    until(|| dir_size(before[0]) > FLOOR).await;
    std::fs::write(format!("/proc/{}/cwd/kept", before[0]), vec![7u8; 2 << 20]).unwrap();
    for _ in 0..200 {
        let now = json(server.get(&format!("/v1/jobs/{id}"), &token)).await;
        if now["state"] != "queued" && now["state"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Stopped after its grace, and replaced.
    let mut replaced = false;
    for _ in 0..1200 {
        let now = workers(&server);
        if now.len() == 1 && now != before {
            replaced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        replaced,
        "worker {before:?} kept its room and was not replaced"
    );
    until(|| server.service.isolation().disk_given.get("untrusted") == Some(&0)).await;
    assert_eq!(dir_size(workers(&server)[0]), FLOOR);
    let job = submit(&server, &token, "hostile", true).await;
    assert_eq!(job["report"]["limit"], "wall_time", "{job}");
}

/// A worker that keeps a released job's directory (here the test makes
/// one its job never had while the job runs: a job without inputs has no
/// `/in` of its own to remove) keeps that job's room: the room is not
/// given back while the directory is there, whatever it holds, and the
/// worker is stopped once it has kept it a while and replaced, its room
/// the zone's again.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_keeps_a_released_jobs_directory_is_replaced() {
    let server = zone_with_disk(
        ByteSize::mib(16),
        1,
        &[sleeper(1_500).limits(|l| {
            l.input = ByteSize::kib(64);
            l.output = ByteSize::mib(4);
            l.output_files = 4;
        })],
    )
    .await;
    if !mounts(&server) {
        return;
    }
    let before = workers(&server);
    let token = server.token("acme", &["hostile:run"]).await;
    let job = submit(&server, &token, "hostile", false).await;
    let id = job["id"].as_str().unwrap().to_owned();
    let cwd = format!("/proc/{}/cwd", before[0]);
    let mut out = None;
    for _ in 0..400 {
        out = std::fs::read_dir(&cwd).unwrap().find_map(|e| {
            let name = e.unwrap().file_name().into_string().unwrap();
            name.strip_suffix(".out").map(str::to_owned)
        });
        if out.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let out = out.expect("the job's directory in its worker's");
    std::fs::create_dir(format!("{cwd}/{out}.in")).unwrap();
    let given = || server.service.isolation().disk_given["untrusted"];
    // The job's room: its output limit, a page per output file and one
    // more, and a page for its (empty) stdin and one for its inputs'
    // directory. What the worker's directory holds beyond it while the job
    // runs is its spare (the module's hand-over room among it).
    let room = (4 << 20) + 7 * 4096;
    assert!(given() >= room);
    for _ in 0..200 {
        let now = json(server.get(&format!("/v1/jobs/{id}"), &token)).await;
        if now["state"] != "queued" && now["state"] != "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Its spare goes back once the worker idles; the job's room stays.
    until(|| given() == room).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(given(), room, "given back with the directory still there");
    let mut replaced = false;
    for _ in 0..1200 {
        let now = workers(&server);
        if now.len() == 1 && now != before {
            replaced = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        replaced,
        "worker {before:?} kept a released job's directory and was not replaced"
    );
    until(|| given() == 0).await;
    let job = submit(&server, &token, "hostile", true).await;
    assert_eq!(job["report"]["limit"], "wall_time", "{job}");
}

/// With `disk = "0 B"` (as where the service cannot mount a tmpfs) a
/// worker's directory is a plain directory in the zone's work directory,
/// and `/admin/v1/isolation` says it is not bounded; jobs run as before.
#[tokio::test(flavor = "multi_thread")]
async fn with_no_disk_size_a_workers_directory_is_a_plain_directory() {
    let server = service::start(|c| {
        c.zones.insert(
            "untrusted".into(),
            bulkhead::config::ZonePool {
                disk: bulkhead::policy::ByteSize::mib(0),
                ..Default::default()
            },
        );
    })
    .await;
    let state = server.service.isolation();
    assert_eq!(state.disk.get("untrusted"), Some(&None), "{state:?}");
    let zone = server.service.work_dir().join("zones/untrusted");
    let mut in_zone: Vec<_> = std::fs::read_dir(&zone)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    in_zone.sort();
    // A directory for each worker.
    let expected = bulkhead::config::ZonePool::default_workers() as usize;
    assert_eq!(in_zone.len(), expected, "{in_zone:?}");
    for pid in workers(&server) {
        let cwd = std::fs::canonicalize(format!("/proc/{pid}/cwd")).unwrap();
        assert!(
            cwd.starts_with(std::fs::canonicalize(&zone).unwrap()),
            "{cwd:?}"
        );
    }
    let token = server.token("acme", &["hello:run"]).await;
    let job = submit(&server, &token, "hello", true).await;
    assert_eq!(job["state"], "succeeded", "{job}");
}

/// Requests to stop meant for the service — SIGTERM to its process group
/// or control group, Ctrl-C, a closed terminal — do not end its workers:
/// the job running in one ends on its own terms and the worker stays.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_outlives_stop_requests_meant_for_the_service() {
    let server = service::start(|c| {
        sleeper(1_500).write_to(&c.modules.policies_dir);
        c.zones.insert(
            "untrusted".into(),
            bulkhead::config::ZonePool {
                workers: 1,
                ..Default::default()
            },
        );
    })
    .await;
    let token = server.token("acme", &["hostile:run"]).await;
    let before = workers(&server);
    assert_eq!(before.len(), 1);
    let job = submit(&server, &token, "hostile", false).await;
    let id = job["id"].as_str().unwrap().to_owned();
    for _ in 0..200 {
        let now = json(server.get(&format!("/v1/jobs/{id}"), &token)).await;
        if now["state"] == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    for signal in bulkhead::worker::child::IGNORED_SIGNALS {
        // SAFETY: kill(2) with a pid and a signal number has no memory
        // effects.
        assert_eq!(unsafe { libc::kill(before[0] as i32, signal) }, 0);
    }
    let done = server.finished(&token, &id).await;
    // The sleeper ends at its wall-time limit, as it would have.
    assert_eq!(done["report"]["limit"], "wall_time", "{done}");
    assert_ne!(done["report"]["failure"]["kind"], "worker", "{done}");
    assert_eq!(workers(&server), before, "the worker was replaced");
    assert!(
        !server
            .audit(50)
            .await
            .iter()
            .any(|e| e["action"] == "worker.fault"),
        "a worker fault was recorded"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_killed_worker_fails_its_job_by_name_and_is_replaced() {
    let server = service::start(|c| {
        sleeper(30_000).write_to(&c.modules.policies_dir);
        c.zones.insert(
            "untrusted".into(),
            bulkhead::config::ZonePool {
                workers: 1,
                ..Default::default()
            },
        );
    })
    .await;
    let token = server.token("acme", &["hostile:run", "hello:run"]).await;
    let before = workers(&server);
    assert_eq!(before.len(), 1);
    let job = submit(&server, &token, "hostile", false).await;
    let id = job["id"].as_str().unwrap().to_owned();
    // Wait until it runs, then kill its worker from outside.
    for _ in 0..200 {
        let now = json(server.get(&format!("/v1/jobs/{id}"), &token)).await;
        if now["state"] == "running" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    assert_eq!(unsafe { libc::kill(before[0] as i32, libc::SIGKILL) }, 0);
    let done = server.finished(&token, &id).await;
    assert_eq!(done["state"], "failed", "{done}");
    let failure = &done["report"]["failure"];
    assert_eq!(failure["kind"], "worker", "{done}");
    assert!(
        failure["message"]
            .as_str()
            .unwrap()
            .contains("killed by signal 9"),
        "{done}"
    );
    // A fresh worker replaced it, and it runs jobs.
    until(|| {
        let now = workers(&server);
        now.len() == 1 && now != before
    })
    .await;
    let ok = submit(&server, &token, "hello", true).await;
    assert_eq!(ok["state"], "succeeded", "{ok}");
    // The fault is audited, with the worker and its class.
    let audit = server.audit(50).await;
    let fault = audit
        .iter()
        .find(|e| e["action"] == "worker.fault")
        .unwrap_or_else(|| panic!("{audit:?}"));
    assert_eq!(fault["outcome"], "killed");
    assert!(
        fault["detail"]
            .as_str()
            .unwrap()
            .contains(&before[0].to_string()),
        "{fault}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn one_job_per_worker_gives_every_job_a_fresh_process() {
    let server = service::start(|c| {
        c.zones.insert(
            "untrusted".into(),
            bulkhead::config::ZonePool {
                workers: 1,
                jobs_per_worker: 1,
                ..Default::default()
            },
        );
    })
    .await;
    let token = server.token("acme", &["hello:run"]).await;
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..3 {
        let before = workers(&server);
        assert_eq!(before.len(), 1);
        assert!(
            seen.insert(before[0]),
            "worker {} ran a second job",
            before[0]
        );
        let job = submit(&server, &token, "hello", true).await;
        assert_eq!(job["state"], "succeeded", "{job}");
        // The worker that ran it goes away; a fresh one takes its place.
        until(|| {
            process_state(before[0]).is_none_or(|s| s == 'Z')
                && workers(&server).len() == 1
                && workers(&server) != before
        })
        .await;
    }
    // A job's outputs outlive its retired worker: the gateway copies them
    // before the worker's directory goes.
    let token = server.token("acme", &["thumbnail:run"]).await;
    for _ in 0..3 {
        let job = json(
            server
                .post(
                    "/v1/modules/thumbnail/jobs?wait=20s&param.width=64&param.height=64",
                    &token,
                )
                .header("content-type", "image/png")
                .body(crate::common::http::png(320, 200)),
        )
        .await;
        assert_eq!(job["state"], "succeeded", "{job}");
        let url = job["outputs"][0]["url"].as_str().unwrap();
        let thumb = server
            .get(url, &token)
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        let thumb = image::load_from_memory(&thumb).unwrap();
        assert_eq!((thumb.width(), thumb.height()), (64, 40));
    }
    // Retired workers are not faults.
    let audit = server.audit(50).await;
    assert!(
        !audit.iter().any(|e| e["action"] == "worker.fault"),
        "{audit:?}"
    );
}

/// One worker with two places, replaced per job, and a sleeper loaded in
/// it (stopped at its wall time of 1.5 s).
async fn sleepers_replaced_per_job(
    tmp: &std::path::Path,
) -> (
    std::sync::Arc<bulkhead::runner::Workers>,
    std::sync::Arc<bulkhead::runner::Module>,
) {
    use bulkhead::policy::HumanDuration;
    let runner = std::sync::Arc::new(crate::common::workers(tmp, "w", 1).await);
    let sleeper = crate::common::load_policy_in_workers(
        &runner,
        bulkhead_tests::HOSTILE,
        crate::common::policy(bulkhead_tests::HOSTILE, "sleeper")
            .times(HumanDuration::millis(1_500), HumanDuration::millis(1_500))
            .args(&["sleep"]),
    )
    .await;
    (runner, sleeper)
}

/// Each of `jobs` ended at its wall time.
async fn each_stopped_at_its_wall_time(
    jobs: Vec<tokio::task::JoinHandle<bulkhead::sandbox::JobReport>>,
) {
    for job in jobs {
        let report = job.await.unwrap();
        assert_eq!(
            report.limit,
            Some(bulkhead::job::LimitKind::WallTime),
            "{report:?}"
        );
    }
}

/// A zone's guests at once are at most its places (workers ×
/// `max_concurrent_jobs`), however its workers are replaced: with a fresh
/// process per job each worker retires at its first job, and that job
/// still holds its place while its replacement starts. Six sleepers
/// handed to one worker with two places, all at once (as jobs given their
/// rooms after waiting aside are, without queue slots): never more than
/// two of them in the zone's workers at once, and never more processes
/// than the places and the one worker kept: a retired worker is gone at
/// once.
#[tokio::test(flavor = "multi_thread")]
async fn workers_replaced_per_job_run_no_more_guests_than_the_zones_places() {
    use bulkhead::runner::Runner;

    let tmp = tempfile::tempdir().unwrap();
    let (runner, sleeper) = sleepers_replaced_per_job(tmp.path()).await;
    let jobs: Vec<_> = (0..6)
        .map(|_| {
            let (runner, sleeper) = (
                std::sync::Arc::clone(&runner),
                std::sync::Arc::clone(&sleeper),
            );
            tokio::spawn(async move {
                runner
                    .run(&sleeper, &bulkhead::sandbox::JobSpec::new(), None)
                    .await
                    .unwrap()
                    .report
            })
        })
        .collect();
    let (mut most_guests, mut most_processes) = (0, 0);
    let mut seen = std::collections::BTreeSet::new();
    while !jobs.iter().all(tokio::task::JoinHandle::is_finished) {
        let guests: std::collections::BTreeSet<String> = job_dirs(&runner)
            .iter()
            .filter_map(|d| d.file_stem()?.to_str().map(ToOwned::to_owned))
            .collect();
        most_guests = most_guests.max(guests.len());
        // Every worker seen, alive until it is gone (a zombie is gone).
        seen.extend(runner.pools()["untrusted"].pids());
        let alive = seen
            .iter()
            .filter(|&&pid| process_state(pid).is_some_and(|s| s != 'Z'))
            .count();
        most_processes = most_processes.max(alive);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    each_stopped_at_its_wall_time(jobs).await;
    assert!(most_guests > 0);
    assert!(most_guests <= 2, "{most_guests} guests at once in 2 places");
    assert!(
        most_processes <= 3,
        "{most_processes} worker processes for 2 places and 1 worker"
    );
}

/// A worker killed with a job's guest in it holds that job's place until
/// its process is gone, not only until the kill: a killed process takes a
/// while to end, its guest's memory and its job's directories still there
/// (found by an attacker: under cancels, a two-place zone replacing its
/// workers per job had three live workers with a job's guest in them).
/// Two guests holding 256 MiB each fill a one-worker zone's two places
/// (its workers replaced per job), a third job waits; one of the two is
/// cancelled, five times over: never more than two live processes with a
/// job's directories in them.
#[tokio::test(flavor = "multi_thread")]
async fn workers_killed_with_a_guest_hold_its_place_until_they_are_gone() {
    use bulkhead::policy::{ByteSize, HumanDuration};
    use bulkhead::runner::Runner;

    let tmp = tempfile::tempdir().unwrap();
    let runner = std::sync::Arc::new(crate::common::workers(tmp.path(), "w", 1).await);
    let holder = std::sync::Arc::new(
        crate::common::load_policy_in_workers(
            &runner,
            bulkhead_tests::HOSTILE,
            crate::common::policy(bulkhead_tests::HOSTILE, "holder")
                .times(HumanDuration::secs(30), HumanDuration::secs(30))
                .limits(|l| l.memory = ByteSize::mib(320))
                .args(&["memory-held", "--mib=256"]),
        )
        .await,
    );
    let start = || {
        let (runner, holder) = (
            std::sync::Arc::clone(&runner),
            std::sync::Arc::clone(&holder),
        );
        tokio::spawn(async move {
            let _ = runner
                .run(&holder, &bulkhead::sandbox::JobSpec::new(), None)
                .await;
        })
    };
    // Live processes of the zone with a job's directories in them, as
    // seen through their own directories.
    let seen = std::sync::Mutex::new(std::collections::BTreeSet::new());
    let guests = || {
        let mut seen = seen.lock().unwrap();
        seen.extend(runner.pools()["untrusted"].pids());
        seen.iter()
            .filter(|&&pid| process_state(pid).is_some_and(|s| s != 'Z'))
            .filter(|&&pid| {
                std::fs::read_dir(format!("/proc/{pid}/cwd"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .any(|e| e.file_name().to_string_lossy().starts_with('j'))
            })
            .count()
    };
    let mut jobs = std::collections::VecDeque::from([start(), start()]);
    let mut most = 0;
    for _ in 0..5 {
        // Both places taken, their guests' memory held.
        tokio::time::sleep(Duration::from_millis(700)).await;
        jobs.push_back(start());
        tokio::time::sleep(Duration::from_millis(100)).await;
        jobs.pop_front().unwrap().abort();
        for _ in 0..300 {
            most = most.max(guests());
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    for job in jobs {
        job.abort();
    }
    assert!(
        most <= 2,
        "{most} live workers with a job's guest in them for 2 places"
    );
}

/// A job's place in a worker is its own from the moment it is given,
/// while its inputs are still being read (`Runner::run_loaded`): with a
/// fresh process per job, a second job picked meanwhile goes to another
/// worker, never beside the first in the same process.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_replaced_per_job_takes_no_second_job_while_the_firsts_inputs_are_read() {
    use bulkhead::runner::Runner;

    let tmp = tempfile::tempdir().unwrap();
    let (runner, sleeper) = sleepers_replaced_per_job(tmp.path()).await;
    let jobs: Vec<_> = (0..2)
        .map(|_| {
            let (runner, sleeper) = (
                std::sync::Arc::clone(&runner),
                std::sync::Arc::clone(&sleeper),
            );
            tokio::spawn(async move {
                let load = Box::pin(async {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    Ok(bulkhead::sandbox::JobSpec::new())
                });
                runner
                    .run_loaded(&sleeper, &[0], load, None, bulkhead::runner::Queued::ALONE)
                    .await
                    .unwrap()
                    .report
            })
        })
        .collect();
    let mut most_in_one = 0;
    while !jobs.iter().all(tokio::task::JoinHandle::is_finished) {
        for pid in runner.pools()["untrusted"].pids() {
            let jobs: std::collections::BTreeSet<String> =
                std::fs::read_dir(format!("/proc/{pid}/cwd"))
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        name.starts_with('j')
                            .then(|| name.split('.').next().unwrap_or_default().to_owned())
                    })
                    .collect();
            most_in_one = most_in_one.max(jobs.len());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    each_stopped_at_its_wall_time(jobs).await;
    assert_eq!(most_in_one, 1, "two jobs in one worker replaced per job");
}

/// A worker past its memory ceiling is a named fault. What its jobs can
/// take is counted against the ceiling before they are sent, so here the
/// ceiling is lowered on the host under a running worker: what a broken
/// runtime, or memory no limit counts, would do to it.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_over_its_memory_ceiling_is_a_named_fault() {
    let server = service::start(|c| {
        crate::common::policies::policy(bulkhead_tests::HOSTILE, "hostile")
            .scopes(&["hostile:run"])
            .memory(bulkhead::policy::ByteSize::mib(200))
            .args(&["memory-bomb"])
            .write_to(&c.modules.policies_dir);
        c.zones.insert(
            "untrusted".into(),
            bulkhead::config::ZonePool {
                workers: 1,
                memory: Some(bulkhead::policy::ByteSize::gib(2)),
                ..Default::default()
            },
        );
    })
    .await;
    if bulkhead::worker::cgroup::offered().is_err() {
        eprintln!("no cgroup memory controller here: nothing to check");
        return;
    }
    let pid = workers(&server)[0];
    std::fs::write(common::memory_limit_file(pid), (128u64 << 20).to_string()).unwrap();
    let token = server.token("acme", &["hostile:run", "hello:run"]).await;
    let job = submit(&server, &token, "hostile", true).await;
    let job = if job["state"] == "running" || job["state"] == "queued" {
        server.finished(&token, job["id"].as_str().unwrap()).await
    } else {
        job
    };
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["report"]["failure"]["kind"], "worker", "{job}");
    assert!(
        job["report"]["failure"]["message"]
            .as_str()
            .unwrap()
            .contains("memory ceiling"),
        "{job}"
    );
    let ok = submit(&server, &token, "hello", true).await;
    assert_eq!(ok["state"], "succeeded", "{ok}");
}

/// Every job directory left in the zone's workers' directories
/// (`j<N>.out` and `.in`): each worker's own file system, mounted nowhere,
/// reached as its working directory (`/proc/<pid>/cwd`), or, where the
/// gateway cannot mount one, `<work>/zones/<zone>/<worker>`.
fn job_dirs(runner: &bulkhead::runner::Workers) -> Vec<std::path::PathBuf> {
    let mut found = Vec::new();
    let zone = bulkhead::runner::Runner::work_dir(runner).join("zones/untrusted");
    let plain = std::fs::read_dir(&zone)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    let mounted = runner.pools()["untrusted"]
        .pids()
        .into_iter()
        .map(|pid| std::path::PathBuf::from(format!("/proc/{pid}/cwd")));
    for worker in plain.chain(mounted) {
        let Ok(entries) = std::fs::read_dir(&worker) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('j') && (name.ends_with(".out") || name.ends_with(".in")) {
                found.push(entry.path());
            }
        }
    }
    found
}

/// A job without inputs that leaves `/out` empty is gone from its worker's
/// directory by the time its report is back, while the gateway still holds
/// its outputs: the worker removed it before reporting, so there is nothing
/// to copy and nothing to release (and a copy to a directory still makes
/// that directory). A job that writes outputs keeps its directory until the
/// gateway lets go of them, and then it goes too.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_that_leaves_nothing_leaves_no_directory_in_its_worker() {
    use bulkhead::runner::Runner;

    let tmp = tempfile::tempdir().unwrap();
    let runner = crate::common::workers(tmp.path(), "w", 0).await;
    let hello = crate::common::load_in_workers(&runner, bulkhead_tests::HELLO, "hello").await;
    let finished = runner
        .run(&hello, &bulkhead::sandbox::JobSpec::new(), None)
        .await
        .unwrap();
    assert!(finished.report.succeeded(), "{:?}", finished.report);
    assert_eq!(job_dirs(&runner), Vec::<std::path::PathBuf>::new());
    assert!(finished.outputs.worker_left_nothing());
    let copy = tmp.path().join("copy");
    let collected = finished.outputs.collect(Some(&copy)).unwrap();
    assert!(collected.files.is_empty(), "{collected:?}");
    assert!(copy.is_dir());

    let files =
        crate::common::load_in_workers(&runner, bulkhead_tests::P1_FILES_WASIP1, "p1-files").await;
    let wrote = runner
        .run(&files, &bulkhead::sandbox::JobSpec::new(), None)
        .await
        .unwrap();
    assert!(wrote.report.succeeded(), "{:?}", wrote.report);
    let held = job_dirs(&runner);
    assert_eq!(held.len(), 1, "{held:?}");
    assert!(held[0].join("summary.txt").is_file(), "{held:?}");
    drop(wrote);
    until(|| job_dirs(&runner).is_empty()).await;
}

/// Jobs cancelled while their worker reads nothing keep their places
/// until their `Run` has left the gateway: however many are submitted and
/// cancelled, the gateway holds no more of them for the worker than its
/// places, and lets go of them with the worker (found by an attacker: a
/// worker that stopped reading, its tenant submitting and cancelling jobs
/// of 60 MB of inputs, took the gateway 60 MB a job to 2.3 GB).
#[tokio::test(flavor = "multi_thread")]
async fn jobs_cancelled_before_their_worker_reads_them_keep_their_places() {
    use bulkhead::runner::Runner;
    const INPUT: u64 = 8 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let (runner, faults) = crate::common::workers_watched(tmp.path(), "q", 0, 2).await;
    let runner = std::sync::Arc::new(runner);
    let module = crate::common::load_policy_in_workers(
        &runner,
        bulkhead_tests::HELLO,
        crate::common::policy(bulkhead_tests::HELLO, "hello").limits(|l| {
            l.input = ByteSize::mib(16);
        }),
    )
    .await;
    let pool = std::sync::Arc::clone(&runner.pools()["untrusted"]);
    let pid = pool.pids()[0];
    // From now on the worker reads nothing.
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
    let mut most = 0;
    for _ in 0..6 {
        let mut spec = bulkhead::sandbox::JobSpec::new();
        spec.inputs.push(bulkhead::job::JobInput {
            name: "in.bin".into(),
            data: vec![7u8; INPUT as usize].into(),
        });
        let before = pool.queued_for_workers();
        let job = {
            let (runner, module) = (
                std::sync::Arc::clone(&runner),
                std::sync::Arc::clone(&module),
            );
            tokio::spawn(async move { runner.run(&module, &spec, None).await.map(drop) })
        };
        // Cancelled once its `Run` waits for the worker, or after a while
        // (a job given no place waits for one).
        for _ in 0..20 {
            if pool.queued_for_workers() > before {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        job.abort();
        let _ = job.await;
        most = most.max(pool.queued_for_workers());
    }
    assert!(
        most <= 2 * (INPUT + (64 << 10)),
        "the gateway held {} MiB of jobs' frames for a worker of two places",
        most >> 20
    );
    // What the runner says of itself (`/admin/v1/isolation`, the
    // `bulkhead_worker_queued_bytes` gauge) shows it.
    let queued = runner.state().queued["untrusted"];
    assert!(queued >= INPUT, "{queued}");
    // The worker, silent, goes, and what was queued for it with it.
    until(|| !faults.lock().unwrap().is_empty()).await;
    let seen = faults.lock().unwrap().clone();
    assert_eq!(seen[0].class, "silent", "{seen:?}");
    until(|| pool.queued_for_workers() == 0).await;
    assert_eq!(runner.state().queued["untrusted"], 0);
}

/// A worker that vouches for itself once a second but reads nothing it
/// is sent after a job's `Run` is a `protocol` fault once it has read
/// none of what it owes for 15 s, however much it says (found by an
/// attacker: such a worker was never judged while the gateway queued for
/// it). Its job fails as the worker's, and the zone's next worker runs
/// the next job.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_reads_nothing_it_is_sent_is_a_fault_however_much_it_says() {
    let fault = withheld("deaf").await;
    assert!(
        fault.reason.contains("nothing it was sent read"),
        "{fault:?}"
    );
}

/// A worker that vouches for itself and reads 40 KiB of what it is sent
/// every ten seconds, a job's `Run` of 512 KiB first, is a `protocol`
/// fault once what it was sent has waited a minute unread, however
/// steadily it reads
/// (found by an attacker: a worker reading 5 KB a second held its zone's
/// places with cancelled jobs' inputs for hours).
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_that_never_catches_up_with_what_it_is_sent_is_a_fault() {
    let fault = withheld("slow").await;
    assert!(fault.reason.contains("unread for 60s"), "{fault:?}");
}

/// A job sent to a worker that has compiled its module, and that reads
/// all it is sent but never starts the job nor says it did, fails as its
/// worker's once the worker could have read and started it (75 s), not
/// after the 300 s a compile may take (found by a tester: a worker that
/// read and dropped every `Run` held another tenant's job 300 s); the
/// worker is retired, and the next job runs on its replacement.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_its_worker_never_starts_fails_once_it_could_have_started() {
    use bulkhead::job::FailureKind;
    use bulkhead::runner::Runner;
    let tmp = tempfile::tempdir().unwrap();
    let program = crate::common::withholding(tmp.path(), "discard");
    let (runner, faults) =
        crate::common::workers_from(tmp.path(), "discard", program.clone(), 0, 2, None).await;
    let module = crate::common::load_in_workers(&runner, bulkhead_tests::HELLO, "hello").await;
    let pool = std::sync::Arc::clone(&runner.pools()["untrusted"]);
    let first = pool.pids()[0];
    let spec = bulkhead::sandbox::JobSpec::new();
    let ran = runner.run(&module, &spec, None).await.unwrap().report;
    assert!(ran.succeeded(), "{ran:?}");
    let dropped = runner.run(&module, &spec, None).await.unwrap().report;
    let failure = dropped.failure.as_ref().expect("the job failed");
    assert_eq!(failure.kind, FailureKind::Worker, "{dropped:?}");
    // It never started: no limit of its own was reached.
    assert_eq!(dropped.limit, None, "{dropped:?}");
    assert!(
        program.with_file_name("worker-discard.used").exists(),
        "the worker dropped nothing"
    );
    until(|| !faults.lock().unwrap().is_empty()).await;
    let fault = faults.lock().unwrap()[0].clone();
    assert_eq!((fault.class, fault.pid), ("overrun", first), "{fault:?}");
    assert!(fault.reason.contains("within 75s"), "{fault:?}");
    let next = runner.run(&module, &spec, None).await.unwrap().report;
    assert!(next.succeeded(), "{next:?}");
    assert_ne!(pool.pids(), vec![first]);
}

/// A worker near its last job has its replacement started ahead, and sent
/// the zone's modules that run, but given no job while the worker has jobs
/// left: the worker runs all of its allowance, and the successor takes its
/// place, its module loaded, when it retires. A zone replacing its workers
/// had no worker able to take a job from each retirement until the
/// replacement had started and loaded its first job's module. A module
/// the zone holds but runs no job of is not sent to the successor: each
/// replacement loaded every module the zone had ever loaded.
#[tokio::test(flavor = "multi_thread")]
async fn a_workers_replacement_is_started_and_loaded_before_it_retires() {
    use bulkhead::runner::Runner;
    let tmp = tempfile::tempdir().unwrap();
    // A tenth of ten: the successor starts once a worker has one job left.
    let (runner, _faults) = crate::common::workers_watched(tmp.path(), "successor", 10, 2).await;
    let module = crate::common::load_in_workers(&runner, bulkhead_tests::HELLO, "hello").await;
    let _idle = crate::common::load_in_workers(&runner, bulkhead_tests::HELLO, "idle").await;
    let pool = std::sync::Arc::clone(&runner.pools()["untrusted"]);
    let first = pool.pids()[0];
    // The zone's worker holds both.
    until(|| pool.compiled_in(first) == Some(2)).await;
    let spec = bulkhead::sandbox::JobSpec::new();
    for _ in 0..8 {
        let ran = runner.run(&module, &spec, None).await.unwrap().report;
        assert!(ran.succeeded(), "{ran:?}");
    }
    assert!(
        pool.successor_pids().is_empty(),
        "a successor two jobs early"
    );
    let ran = runner.run(&module, &spec, None).await.unwrap().report;
    assert!(ran.succeeded(), "{ran:?}");
    until(|| pool.successor_pids().len() == 1).await;
    let successor = pool.successor_pids()[0];
    until(|| pool.compiled_in(successor).is_some_and(|n| n >= 1)).await;
    // Only the module that runs: the other was never sent.
    assert_eq!(pool.sent_to(successor), Some(1));
    // The worker, not its successor, takes its last job.
    assert_eq!(pool.pids(), vec![first]);
    let ran = runner.run(&module, &spec, None).await.unwrap().report;
    assert!(ran.succeeded(), "{ran:?}");
    until(|| pool.pids() == vec![successor]).await;
    // The retired worker is gone, not kept beside its successor.
    until(|| !std::path::Path::new(&format!("/proc/{first}")).exists()).await;
    let ran = runner.run(&module, &spec, None).await.unwrap().report;
    assert!(ran.succeeded(), "{ran:?}");
    assert_eq!(pool.pids(), vec![successor]);
}

/// A report naming more created files than its job's policy allows is a
/// protocol fault of its worker, refused before the list is read: the
/// job fails as the worker's, and the zone's next worker runs the next
/// (found by a tester: 2.3 million made-up files a report took the
/// gateway 0.75 s of CPU each, and slowed another zone's jobs from 25 ms
/// to 559 ms).
#[tokio::test(flavor = "multi_thread")]
async fn a_report_naming_more_files_than_its_policy_allows_is_a_fault() {
    let fault = refused_report("pad", 0).await;
    assert!(
        fault.reason.contains("said its job created 100000 files"),
        "{fault:?}"
    );
}

/// So is a failure to start a job longer than any a worker sends (found
/// by a tester: 16 MiB of control characters a job took the gateway half
/// a second of CPU each, and the job was shown as the host's failure).
#[tokio::test(flavor = "multi_thread")]
async fn a_failure_to_start_longer_than_a_workers_is_a_fault() {
    let fault = refused_report("shout", 0).await;
    assert!(
        fault
            .reason
            .contains("sent a failure to start a job of 102400 bytes"),
        "{fault:?}"
    );
}

/// A breach in a worker's answer to its last job is recorded, though the
/// worker was retired as that job ended (found by a tester: in a zone
/// replacing its workers per job, no breach was logged, audited or
/// counted).
#[tokio::test(flavor = "multi_thread")]
async fn a_breach_in_a_retired_workers_last_answer_is_recorded() {
    let fault = refused_report("pad", 1).await;
    assert!(
        fault.reason.contains("said its job created 100000 files"),
        "{fault:?}"
    );
    assert_eq!(fault.jobs, 0, "{fault:?}");
}

/// A worker that reports its jobs and keeps two threads busy beyond them
/// is faulted for its CPU and its process ended, though a trivial job is
/// sent to it every tenth of a second (each a moment in which it runs
/// one), and no job fails for it; the zone's next job runs on another
/// worker.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_burning_the_cpu_beyond_its_jobs_is_ended() {
    use bulkhead::runner::Runner;
    let tmp = tempfile::tempdir().unwrap();
    let program = crate::common::withholding(tmp.path(), "burn");
    std::fs::write(program.with_file_name("worker-burn.arm"), b"").unwrap();
    let (runner, faults) =
        crate::common::workers_from(tmp.path(), "burn", program.clone(), 0, 2, None).await;
    let module = crate::common::load_in_workers(&runner, bulkhead_tests::HELLO, "hello").await;
    let pool = std::sync::Arc::clone(&runner.pools()["untrusted"]);
    let burning = pool.pids()[0];
    let spec = bulkhead::sandbox::JobSpec::new();
    let mut jobs = 0;
    while faults.lock().unwrap().is_empty() && jobs < 300 {
        let ran = runner.run(&module, &spec, None).await.unwrap().report;
        assert!(ran.succeeded(), "job {jobs}: {ran:?}");
        assert!(
            program.with_file_name("worker-burn.used").exists(),
            "the worker did not start burning"
        );
        jobs += 1;
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let fault = faults
        .lock()
        .unwrap()
        .first()
        .cloned()
        .expect("no fault after 300 jobs");
    assert_eq!(
        (fault.class, fault.pid, fault.jobs),
        ("cpu", burning, 0),
        "{fault:?}"
    );
    assert!(
        fault.reason.contains("beyond what its jobs' time allows"),
        "{fault:?}"
    );
    // Host side: the burning process is gone, not merely set aside.
    until(|| !std::path::Path::new(&format!("/proc/{burning}")).exists()).await;
    let next = runner.run(&module, &spec, None).await.unwrap().report;
    assert!(next.succeeded(), "{next:?}");
    assert!(!pool.pids().contains(&burning));
}

/// A worker that has run a job, then holds back its `Loaded` for a module
/// sent to it and burns the CPU meanwhile, is charged once its loading has
/// counted as a job's time for 30 s: it is faulted for its CPU and its
/// process ended (found by a tester: a load awaited was left unjudged for
/// as long as it lasted).
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_burning_the_cpu_while_it_says_it_loads_is_ended() {
    use bulkhead::runner::Runner;
    let tmp = tempfile::tempdir().unwrap();
    let program = crate::common::withholding(tmp.path(), "hold");
    std::fs::write(program.with_file_name("worker-hold.arm"), b"").unwrap();
    let (runner, faults) =
        crate::common::workers_from(tmp.path(), "hold", program.clone(), 0, 2, None).await;
    let runner = std::sync::Arc::new(runner);
    let module = crate::common::load_in_workers(&runner, bulkhead_tests::HELLO, "hello").await;
    let pool = std::sync::Arc::clone(&runner.pools()["untrusted"]);
    let holding = pool.pids()[0];
    let spec = bulkhead::sandbox::JobSpec::new();
    let ran = runner.run(&module, &spec, None).await.unwrap().report;
    assert!(ran.succeeded(), "{ran:?}");
    // Sent to the zone's worker as it loads: its `Loaded` never comes.
    let _load = {
        let runner = std::sync::Arc::clone(&runner);
        tokio::spawn(async move {
            crate::common::load_in_workers(&runner, bulkhead_tests::HELLO, "again").await
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while faults.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    assert!(
        program.with_file_name("worker-hold.used").exists(),
        "no `Loaded` was held back"
    );
    let fault = faults
        .lock()
        .unwrap()
        .first()
        .cloned()
        .expect("no fault in 120 s");
    assert_eq!(
        (fault.class, fault.pid, fault.jobs),
        ("cpu", holding, 0),
        "{fault:?}"
    );
    until(|| !std::path::Path::new(&format!("/proc/{holding}")).exists()).await;
}

/// An honest worker whose job made 250,000 files, which it removes once
/// the job has ended (more than a second of CPU), is not taken for one
/// that burns the CPU: two seconds (eight of the supervisor's rounds)
/// after, it is the same process, and no fault was recorded (found by a
/// tester: such a worker was faulted when only its time at rest was
/// counted; so it is here when a job's time allows only the core it runs
/// on).
#[tokio::test(flavor = "multi_thread")]
async fn an_honest_worker_removing_its_jobs_files_is_kept() {
    use bulkhead::runner::Runner;
    let tmp = tempfile::tempdir().unwrap();
    let (runner, faults) = crate::common::workers_watched(tmp.path(), "rest", 0, 2).await;
    let module = crate::common::load_policy_in_workers(
        &runner,
        bulkhead_tests::HOSTILE,
        crate::common::policy(bulkhead_tests::HOSTILE, "many")
            .limits(|l| {
                l.output_files = 250_000;
                l.wall_time = bulkhead::policy::HumanDuration::secs(120);
                l.cpu_time = bulkhead::policy::HumanDuration::secs(120);
            })
            .args(&["disk-many"]),
    )
    .await;
    let pool = std::sync::Arc::clone(&runner.pools()["untrusted"]);
    let worker = pool.pids();
    let spec = bulkhead::sandbox::JobSpec::new();
    let ran = runner.run(&module, &spec, None).await.unwrap().report;
    assert_eq!(
        ran.limit,
        Some(bulkhead::job::LimitKind::OutputFiles),
        "{ran:?}"
    );
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    assert!(
        faults.lock().unwrap().is_empty(),
        "{:?}",
        faults.lock().unwrap()
    );
    assert_eq!(pool.pids(), worker);
}

/// The fault of the zone's first worker, started as `withholding-worker`'s
/// `mode`, which rewrites its first job's report: the job failed as the
/// worker's, and the next succeeds on another worker.
async fn refused_report(mode: &str, jobs_per_worker: u32) -> bulkhead::worker::pool::Fault {
    use bulkhead::job::FailureKind;
    use bulkhead::runner::Runner;
    let tmp = tempfile::tempdir().unwrap();
    let program = crate::common::withholding(tmp.path(), mode);
    std::fs::write(program.with_file_name(format!("worker-{mode}.arm")), b"").unwrap();
    let (runner, faults) =
        crate::common::workers_from(tmp.path(), mode, program.clone(), jobs_per_worker, 2, None)
            .await;
    let module = crate::common::load_in_workers(&runner, bulkhead_tests::HELLO, "hello").await;
    let pool = std::sync::Arc::clone(&runner.pools()["untrusted"]);
    let rewriting = pool.pids()[0];
    let spec = bulkhead::sandbox::JobSpec::new();
    let ran = runner.run(&module, &spec, None).await.unwrap().report;
    assert!(
        program
            .with_file_name(format!("worker-{mode}.used"))
            .exists(),
        "nothing was rewritten"
    );
    assert_eq!(
        ran.failure.as_ref().map(|f| f.kind),
        Some(FailureKind::Worker),
        "{ran:?}"
    );
    until(|| !faults.lock().unwrap().is_empty()).await;
    let fault = faults.lock().unwrap()[0].clone();
    assert_eq!(
        (fault.class, fault.pid),
        ("protocol", rewriting),
        "{fault:?}"
    );
    let next = runner.run(&module, &spec, None).await.unwrap().report;
    assert!(next.succeeded(), "{next:?}");
    assert_ne!(pool.pids(), vec![rewriting]);
    fault
}

/// A job sent to a worker before the worker said it loaded the job's
/// module, and never started there, fails as its worker's 75 s after that
/// `Loaded`, not after the 300 s a compile may take (found by a tester: a
/// worker that dropped every `Run` held a job placed just before its
/// `Loaded` 300 s). The zone's worker drops every `Run`; a module loaded
/// while it is busy with the first is sent to it only with its job's.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_sent_before_its_module_was_loaded_fails_once_it_could_have_started() {
    use bulkhead::job::FailureKind;
    use bulkhead::runner::Runner;
    let tmp = tempfile::tempdir().unwrap();
    let program = crate::common::withholding(tmp.path(), "blind");
    // The zone's first worker drops the jobs it is sent.
    std::fs::write(program.with_file_name("worker-blind.arm"), b"").unwrap();
    let (runner, faults) =
        crate::common::workers_from(tmp.path(), "blind", program.clone(), 0, 2, None).await;
    let runner = std::sync::Arc::new(runner);
    let first = crate::common::load_in_workers(&runner, bulkhead_tests::HELLO, "hello").await;
    let pool = std::sync::Arc::clone(&runner.pools()["untrusted"]);
    let blind = pool.pids()[0];
    let busy = {
        let runner = std::sync::Arc::clone(&runner);
        tokio::spawn(async move {
            let spec = bulkhead::sandbox::JobSpec::new();
            runner.run(&first, &spec, None).await.unwrap().report
        })
    };
    until(|| program.with_file_name("worker-blind.used").exists()).await;
    // Not sent to the busy worker now: with its job.
    let later = crate::common::load_in_workers(&runner, bulkhead_tests::HELLO, "again").await;
    let spec = bulkhead::sandbox::JobSpec::new();
    let dropped = runner.run(&later, &spec, None).await.unwrap().report;
    let failure = dropped.failure.as_ref().expect("the job failed");
    assert_eq!(failure.kind, FailureKind::Worker, "{dropped:?}");
    // It never started: no limit of its own was reached.
    assert_eq!(dropped.limit, None, "{dropped:?}");
    let busy = busy.await.unwrap();
    assert_eq!(busy.failure.map(|f| f.kind), Some(FailureKind::Worker));
    until(|| faults.lock().unwrap().len() == 2).await;
    let faults = faults.lock().unwrap().clone();
    assert!(
        faults
            .iter()
            .all(|f| (f.class, f.pid) == ("overrun", blind)),
        "{faults:?}"
    );
    assert!(
        faults.iter().any(|f| f
            .reason
            .contains("within 75s of saying it had compiled its module")),
        "{faults:?}"
    );
    let next = runner.run(&later, &spec, None).await.unwrap().report;
    assert!(next.succeeded(), "{next:?}");
}

/// Runs a job in a one-worker zone whose first worker, `withholding-worker`
/// linked as `…-{mode}`, keeps the job's `Run` from the real worker under
/// it and then reads nothing more of its channel (`deaf`) or too little
/// (`slow`); checks that the job fails as its worker's, that the worker is
/// the one `protocol` fault, and that the next job runs on the worker that
/// replaces it. The fault.
async fn withheld(mode: &str) -> bulkhead::worker::pool::Fault {
    use bulkhead::job::FailureKind;
    use bulkhead::runner::Runner;
    let tmp = tempfile::tempdir().unwrap();
    let program = crate::common::withholding(tmp.path(), mode);
    let (runner, faults) =
        crate::common::workers_from(tmp.path(), mode, program.clone(), 0, 2, None).await;
    let module = crate::common::load_policy_in_workers(
        &runner,
        bulkhead_tests::HELLO,
        crate::common::policy(bulkhead_tests::HELLO, "hello").limits(|l| {
            l.input = ByteSize::mib(1);
        }),
    )
    .await;
    let pool = std::sync::Arc::clone(&runner.pools()["untrusted"]);
    let first = pool.pids()[0];
    let mut spec = bulkhead::sandbox::JobSpec::new();
    spec.inputs.push(bulkhead::job::JobInput {
        name: "in.bin".into(),
        data: vec![7u8; 512 << 10].into(),
    });
    let withheld = runner.run(&module, &spec, None).await.unwrap().report;
    let failure = withheld.failure.as_ref().expect("the job failed");
    assert_eq!(failure.kind, FailureKind::Worker, "{withheld:?}");
    let used = program.with_file_name(format!("worker-{mode}.used"));
    assert!(used.exists(), "the worker withheld nothing");
    until(|| !faults.lock().unwrap().is_empty()).await;
    let fault = {
        let faults = faults.lock().unwrap();
        assert_eq!(faults.len(), 1, "{faults:?}");
        faults[0].clone()
    };
    assert_eq!((fault.class, fault.pid), ("protocol", first), "{fault:?}");
    let next = runner.run(&module, &spec, None).await.unwrap().report;
    assert!(next.succeeded(), "{next:?}");
    assert_ne!(pool.pids(), vec![first]);
    fault
}

/// A job its worker lets run past its wall time (here the worker is
/// stopped from outside, so none of its clocks move) fails alone: the
/// gateway's own clock ends it with the limit named, the worker takes no
/// new job and goes once its other job has ended, by itself, and the
/// overrun is reported once. Its co-tenant is not failed with it. (The
/// short job's wall time leaves seconds for both to start before the
/// worker is stopped: with one second, a start slowed by other tests could
/// let it end by itself first.)
#[tokio::test(flavor = "multi_thread")]
async fn a_job_its_worker_lets_overrun_fails_alone_and_the_worker_is_retired() {
    use bulkhead::job::{FailureKind, LimitKind};
    use bulkhead::policy::HumanDuration;
    use bulkhead::runner::Runner;

    let tmp = tempfile::tempdir().unwrap();
    let (runner, faults) = crate::common::workers_watched(tmp.path(), "w", 0, 2).await;
    let runner = std::sync::Arc::new(runner);
    let sleeping = |name: &str, wall: u64| {
        crate::common::policy(bulkhead_tests::HOSTILE, name)
            .times(HumanDuration::millis(wall), HumanDuration::millis(wall))
            .args(&["sleep"])
    };
    let short = crate::common::load_policy_in_workers(
        &runner,
        bulkhead_tests::HOSTILE,
        sleeping("short", 3_000),
    )
    .await;
    let long = crate::common::load_policy_in_workers(
        &runner,
        bulkhead_tests::HOSTILE,
        sleeping("long", 12_000),
    )
    .await;
    let pool = std::sync::Arc::clone(&runner.pools()["untrusted"]);
    let pid = pool.pids()[0];
    let spawn = |module: std::sync::Arc<bulkhead::runner::Module>| {
        let runner = std::sync::Arc::clone(&runner);
        tokio::spawn(async move {
            runner
                .run(&module, &bulkhead::sandbox::JobSpec::new(), None)
                .await
                .unwrap()
                .report
        })
    };
    let (short_job, long_job) = (spawn(short), spawn(long));
    until(|| job_dirs(&runner).len() == 2).await;
    // The gateway's clocks run for both: their worker said they started.
    until(|| pool.jobs_started() == 2).await;
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
    until(|| !faults.lock().unwrap().is_empty()).await;
    // SAFETY: as above. (It fails only if the worker is gone: killed.)
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };

    let (stopped, other) = (short_job.await.unwrap(), long_job.await.unwrap());
    // The co-tenant ran on to its own end, reported by its worker.
    let failure = other
        .failure
        .as_ref()
        .expect("it sleeps past its wall time");
    assert_eq!(failure.kind, FailureKind::Limit, "{other:?}");
    assert_eq!(other.limit, Some(LimitKind::WallTime), "{other:?}");
    let failure = stopped.failure.as_ref().expect("the overrun job failed");
    assert_eq!(failure.kind, FailureKind::Worker, "{stopped:?}");
    assert_eq!(stopped.limit, Some(LimitKind::WallTime), "{stopped:?}");
    assert!(failure.message.contains("wall time"), "{failure:?}");
    {
        let faults = faults.lock().unwrap();
        assert_eq!(faults.len(), 1, "{faults:?}");
        assert_eq!(
            (faults[0].class, faults[0].jobs, faults[0].pid),
            ("overrun", 1, pid)
        );
    }
    // Retired once idle, and replaced; the replacement runs jobs.
    until(|| process_state(pid).is_none_or(|s| s == 'Z') && pool.pids().len() == 1).await;
    assert_ne!(pool.pids(), vec![pid]);
    let hello = crate::common::load_in_workers(&runner, bulkhead_tests::HELLO, "hello").await;
    let ok = runner
        .run(&hello, &bulkhead::sandbox::JobSpec::new(), None)
        .await
        .unwrap();
    assert!(ok.report.succeeded(), "{:?}", ok.report);
}

/// Guests whose every host call costs milliseconds (a `stat` of a 3 MiB
/// path, within what a call may carry in, lifted whole before it is
/// refused), call after call, enough of them to keep both of their
/// worker's guest threads busy, stop at their own
/// wall time, reported by the worker; a sleeping co-tenant's clock still
/// runs, and jobs beside them still succeed: no fault, nobody else failed.
#[tokio::test(flavor = "multi_thread")]
async fn guests_holding_every_guest_thread_stop_on_time_and_spare_their_co_tenants() {
    use bulkhead::job::{FailureKind, LimitKind};
    use bulkhead::policy::{ByteSize, HumanDuration};
    use bulkhead::runner::Runner;

    let tmp = tempfile::tempdir().unwrap();
    let (runner, faults) = crate::common::workers_watched(tmp.path(), "w", 0, 6).await;
    let runner = std::sync::Arc::new(runner);
    let hog = crate::common::load_policy_in_workers(
        &runner,
        bulkhead_tests::HOSTILE,
        crate::common::policy(bulkhead_tests::HOSTILE, "hog")
            .times(HumanDuration::millis(3_000), HumanDuration::millis(3_000))
            .memory(ByteSize::mib(512))
            .args(&["cpu-huge-path"])
            .params(&["mib"]),
    )
    .await;
    let sleeper = crate::common::load_policy_in_workers(
        &runner,
        bulkhead_tests::HOSTILE,
        crate::common::policy(bulkhead_tests::HOSTILE, "sleeper")
            .times(HumanDuration::millis(2_000), HumanDuration::millis(2_000))
            .args(&["sleep"]),
    )
    .await;
    let hello = crate::common::load_in_workers(&runner, bulkhead_tests::HELLO, "hello").await;
    let spawn = |module: &std::sync::Arc<bulkhead::runner::Module>, spec| {
        let (runner, module) = (
            std::sync::Arc::clone(&runner),
            std::sync::Arc::clone(module),
        );
        tokio::spawn(async move { runner.run(&module, &spec, None).await.unwrap().report })
    };
    let huge = crate::common::spec(&[], &[("mib", "3")]);
    let hogs: Vec<_> = (0..4).map(|_| spawn(&hog, huge.clone())).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let sleeping = spawn(&sleeper, bulkhead::sandbox::JobSpec::new());
    for _ in 0..3 {
        let ok = runner
            .run(&hello, &bulkhead::sandbox::JobSpec::new(), None)
            .await
            .unwrap();
        assert!(ok.report.succeeded(), "{:?}", ok.report);
    }
    let sleeping = sleeping.await.unwrap();
    assert_eq!(sleeping.limit, Some(LimitKind::WallTime), "{sleeping:?}");
    let mut reports = vec![sleeping];
    for hog in hogs {
        reports.push(hog.await.unwrap());
    }
    for report in reports {
        // Stopped by its worker: its wall time (or its CPU time, which
        // may run out as soon with a thread to itself).
        let failure = report.failure.as_ref().expect("stopped by a limit");
        assert_eq!(failure.kind, FailureKind::Limit, "{report:?}");
        assert!(
            matches!(report.limit, Some(LimitKind::WallTime | LimitKind::CpuTime)),
            "{report:?}"
        );
    }
    assert!(
        faults.lock().unwrap().is_empty(),
        "{:?}",
        faults.lock().unwrap()
    );
}

/// A guest may write more than a worker's channel carries in one frame
/// (its policy's `stdout` has no ceiling): its report keeps 4 MiB and
/// says its output was truncated; the worker goes on, and a co-tenant
/// running beside it ends by its own limit, not as a worker failure.
#[tokio::test(flavor = "multi_thread")]
async fn a_report_larger_than_the_channel_carries_is_cut_and_fails_nobody_else() {
    use bulkhead::job::{FailureKind, LimitKind};
    use bulkhead::policy::{ByteSize, HumanDuration};
    use bulkhead::runner::Runner;

    let tmp = tempfile::tempdir().unwrap();
    let (runner, faults) = crate::common::workers_watched(tmp.path(), "w", 0, 2).await;
    let runner = std::sync::Arc::new(runner);
    let flood = crate::common::load_policy_in_workers(
        &runner,
        bulkhead_tests::HOSTILE,
        crate::common::policy(bulkhead_tests::HOSTILE, "flood")
            .memory(ByteSize::mib(128))
            .limits(|l| l.stdout = ByteSize::mib(40))
            .args(&["stdout-one-write"]),
    )
    .await;
    let sleeper = crate::common::load_policy_in_workers(
        &runner,
        bulkhead_tests::HOSTILE,
        crate::common::policy(bulkhead_tests::HOSTILE, "sleeper")
            .times(HumanDuration::millis(3_000), HumanDuration::millis(3_000))
            .args(&["sleep"]),
    )
    .await;
    let pid = runner.pools()["untrusted"].pids()[0];
    let beside = {
        let runner = std::sync::Arc::clone(&runner);
        tokio::spawn(async move {
            runner
                .run(&sleeper, &bulkhead::sandbox::JobSpec::new(), None)
                .await
                .unwrap()
                .report
        })
    };
    until(|| job_dirs(&runner).len() == 1).await;
    let flooded = runner
        .run(&flood, &bulkhead::sandbox::JobSpec::new(), None)
        .await
        .unwrap()
        .report;
    assert_eq!(flooded.exit_code, Some(1), "{:?}", flooded.failure);
    assert!(flooded.stdout.truncated, "{:?}", flooded.stdout.bytes);
    // All of it counted, the first 4 MiB kept.
    assert!(flooded.stdout.bytes >= 24 << 20, "{}", flooded.stdout.bytes);
    assert!(
        flooded.stdout.text.len() <= bulkhead::sandbox::MAX_CAPTURE,
        "{}",
        flooded.stdout.text.len()
    );
    let beside = beside.await.unwrap();
    let failure = beside
        .failure
        .as_ref()
        .expect("it sleeps past its wall time");
    assert_eq!(failure.kind, FailureKind::Limit, "{beside:?}");
    assert_eq!(beside.limit, Some(LimitKind::WallTime), "{beside:?}");
    assert!(
        faults.lock().unwrap().is_empty(),
        "{:?}",
        faults.lock().unwrap()
    );
    assert_eq!(runner.pools()["untrusted"].pids(), vec![pid]);
}

/// A policy may allow a vast stdout; the worker counts it against the
/// limit and keeps 4 MiB: its memory does not grow with what the guest
/// writes (its peak resident size, read from `/proc`), the report says how
/// much was written, and a co-tenant running beside it ends by its own
/// limit, not as overrun while the report is built.
#[tokio::test(flavor = "multi_thread")]
async fn a_vast_stdout_is_counted_not_kept_and_slows_nobody_else() {
    use bulkhead::job::{FailureKind, LimitKind};
    use bulkhead::policy::{ByteSize, HumanDuration};
    use bulkhead::runner::Runner;

    let tmp = tempfile::tempdir().unwrap();
    let (runner, faults) = crate::common::workers_watched(tmp.path(), "w", 0, 2).await;
    let runner = std::sync::Arc::new(runner);
    let flood = crate::common::load_policy_in_workers(
        &runner,
        bulkhead_tests::HOSTILE,
        crate::common::policy(bulkhead_tests::HOSTILE, "flood")
            .times(HumanDuration::millis(20_000), HumanDuration::millis(20_000))
            .limits(|l| l.stdout = ByteSize::mib(384))
            .args(&["stdout-flood"]),
    )
    .await;
    let sleeper = crate::common::load_policy_in_workers(
        &runner,
        bulkhead_tests::HOSTILE,
        crate::common::policy(bulkhead_tests::HOSTILE, "sleeper")
            .times(HumanDuration::millis(3_000), HumanDuration::millis(3_000))
            .args(&["sleep"]),
    )
    .await;
    let pid = runner.pools()["untrusted"].pids()[0];
    let beside = {
        let runner = std::sync::Arc::clone(&runner);
        tokio::spawn(async move {
            runner
                .run(&sleeper, &bulkhead::sandbox::JobSpec::new(), None)
                .await
                .unwrap()
                .report
        })
    };
    until(|| job_dirs(&runner).len() == 1).await;
    let flooded = runner
        .run(&flood, &bulkhead::sandbox::JobSpec::new(), None)
        .await
        .unwrap()
        .report;
    assert_eq!(flooded.limit, Some(LimitKind::Stdout), "{flooded:?}");
    assert_eq!(flooded.stdout.bytes, 384 << 20);
    assert!(flooded.stdout.truncated);
    assert!(flooded.stdout.text.len() <= bulkhead::sandbox::MAX_CAPTURE);
    let peak = peak_resident_kib(pid);
    assert!(
        peak < 256 << 10,
        "the worker's peak resident size: {peak} KiB"
    );
    let beside = beside.await.unwrap();
    let failure = beside
        .failure
        .as_ref()
        .expect("it sleeps past its wall time");
    assert_eq!(failure.kind, FailureKind::Limit, "{beside:?}");
    assert_eq!(beside.limit, Some(LimitKind::WallTime), "{beside:?}");
    assert!(
        faults.lock().unwrap().is_empty(),
        "{:?}",
        faults.lock().unwrap()
    );
    assert_eq!(runner.pools()["untrusted"].pids(), vec![pid]);
}

/// A process's peak resident size (`VmHWM`), in KiB.
fn peak_resident_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status")
}

/// The gateway's own threads held for longer than a worker may stay
/// silent (by work a request did on them, say) blame no worker: the
/// supervisor runs on threads of its own and pings the worker meanwhile,
/// and the worker's answers wait unread on the channel, which excuses it.
/// The worker is not faulted and serves the next job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_whose_threads_were_held_blames_no_worker() {
    use bulkhead::runner::Runner;

    let tmp = tempfile::tempdir().unwrap();
    let (runner, faults) = crate::common::workers_watched(tmp.path(), "w", 0, 2).await;
    let hello = crate::common::load_in_workers(&runner, bulkhead_tests::HELLO, "hello").await;
    let pid = runner.pools()["untrusted"].pids()[0];
    // Both of the runtime's threads, for longer than the 15 s a worker
    // may stay silent.
    let held: Vec<_> = (0..2)
        .map(|_| tokio::spawn(async { std::thread::sleep(Duration::from_secs(17)) }))
        .collect();
    for h in held {
        h.await.unwrap();
    }
    // A few rounds of the supervisor.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ok = runner
        .run(&hello, &bulkhead::sandbox::JobSpec::new(), None)
        .await
        .unwrap();
    assert!(ok.report.succeeded(), "{:?}", ok.report);
    assert!(
        faults.lock().unwrap().is_empty(),
        "{:?}",
        faults.lock().unwrap()
    );
    assert_eq!(runner.pools()["untrusted"].pids(), vec![pid]);
}

/// ...and do not shelter a worker that hung: one stopped while the
/// gateway's threads are held (by a client reading a huge report again and
/// again, say) is faulted as silent, and replaced, while they are still
/// held, though answers it gave before it hung wait unread. Both threads
/// stay held until the fault is seen, or for 45 s at most: less than the
/// 60 s a worker is excused while the gateway is behind with it, so the
/// fault must come from the pings the supervisor wrote itself (the worker
/// left them unread), not from the excuse running out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_hangs_while_the_gateway_is_held_is_faulted_meanwhile() {
    let tmp = tempfile::tempdir().unwrap();
    let (runner, faults) = crate::common::workers_watched(tmp.path(), "w", 0, 2).await;
    let pool = std::sync::Arc::clone(&runner.pools()["untrusted"]);
    let pid = pool.pids()[0];
    let held: Vec<_> = (0..2)
        .map(|_| {
            let faults = std::sync::Arc::clone(&faults);
            tokio::spawn(async move {
                let until = std::time::Instant::now() + Duration::from_secs(45);
                while faults.lock().unwrap().is_empty() && std::time::Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(50));
                }
                // Whether the fault came while this thread was held.
                !faults.lock().unwrap().is_empty()
            })
        })
        .collect();
    // It answers a ping or two first: answers the held gateway leaves
    // unread, which must not excuse it once it hangs.
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
    for h in held {
        assert!(
            h.await.unwrap(),
            "the hung worker was not faulted while the gateway was held"
        );
    }
    {
        let faults = faults.lock().unwrap();
        assert_eq!(faults.len(), 1, "{faults:?}");
        assert_eq!((faults[0].class, faults[0].pid), ("silent", pid));
    }
    until(|| process_state(pid).is_none_or(|s| s == 'Z') && pool.pids().len() == 1).await;
    assert_ne!(pool.pids(), vec![pid]);
}

/// ...nor once they are let go: what a worker said before it hung, read
/// when the gateway's threads are let go, is as old as it is. The threads
/// are held for 10 s, the worker stopped 3 s in, after answering a ping
/// the held gateway leaves unread; they are let go for half a second (the
/// old answer is read), then held again until the fault is seen, or until
/// 21.5 s after the first hold began: the worker last spoke before it
/// stopped, at most 3 s in, so it is silent for 15 s by 18.5 s in (and
/// the supervisor's rounds are a quarter of a second). Heard as of the
/// reading, it would be silent only at 25 s (found by an attacker: a hung
/// worker lived 25 to 27 s, and a job sent to it meanwhile failed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_hung_is_not_heard_by_its_old_answers_read_late() {
    let tmp = tempfile::tempdir().unwrap();
    let (runner, faults) = crate::common::workers_watched(tmp.path(), "w", 0, 2).await;
    let pool = std::sync::Arc::clone(&runner.pools()["untrusted"]);
    let pid = pool.pids()[0];
    let began = std::time::Instant::now();
    let hold = |until: std::time::Instant| {
        let faults = std::sync::Arc::clone(&faults);
        tokio::spawn(async move {
            while faults.lock().unwrap().is_empty() && std::time::Instant::now() < until {
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let first: Vec<_> = (0..2)
        .map(|_| hold(began + Duration::from_secs(10)))
        .collect();
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
    for h in first {
        h.await.unwrap();
    }
    assert!(
        faults.lock().unwrap().is_empty(),
        "faulted before it was silent for 15 s: {:?}",
        faults.lock().unwrap()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let second: Vec<_> = (0..2)
        .map(|_| hold(began + Duration::from_millis(21_500)))
        .collect();
    for h in second {
        h.await.unwrap();
    }
    {
        let faults = faults.lock().unwrap();
        assert_eq!(
            faults.len(),
            1,
            "the hung worker was not faulted 15 s after it last spoke: {faults:?}"
        );
        assert_eq!((faults[0].class, faults[0].pid), ("silent", pid));
    }
    until(|| process_state(pid).is_none_or(|s| s == 'Z') && pool.pids().len() == 1).await;
    assert_ne!(pool.pids(), vec![pid]);
}

/// The inode of the socket at the other end of the Unix socket `fd`, as
/// the kernel's socket diagnostics (`NETLINK_SOCK_DIAG`, what `ss -x`
/// reads) tell it.
fn unix_peer_inode(fd: impl std::os::fd::AsFd) -> u64 {
    use rustix::net::{AddressFamily, RecvFlags, SendFlags, SocketType, netlink};
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const UDIAG_SHOW_PEER: u32 = 4;
    const UNIX_DIAG_PEER: u16 = 2;
    let ino = u32::try_from(rustix::fs::fstat(&fd).unwrap().st_ino).unwrap();
    let diag = rustix::net::socket(
        AddressFamily::NETLINK,
        SocketType::DGRAM,
        Some(netlink::SOCK_DIAG),
    )
    .unwrap();
    // A `nlmsghdr`, then a `unix_diag_req` for that one socket (any
    // state, no cookie).
    let mut request = Vec::with_capacity(40);
    request.extend(40u32.to_ne_bytes());
    request.extend(SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request.extend((libc::NLM_F_REQUEST as u16).to_ne_bytes());
    request.extend(1u32.to_ne_bytes());
    request.extend(0u32.to_ne_bytes());
    request.extend([libc::AF_UNIX as u8, 0, 0, 0]);
    request.extend(u32::MAX.to_ne_bytes());
    request.extend(ino.to_ne_bytes());
    request.extend(UDIAG_SHOW_PEER.to_ne_bytes());
    request.extend(u32::MAX.to_ne_bytes());
    request.extend(u32::MAX.to_ne_bytes());
    rustix::net::send(&diag, &request, SendFlags::empty()).unwrap();
    let mut answer = vec![0u8; 8192];
    let (n, _) = rustix::net::recv(&diag, &mut answer[..], RecvFlags::empty()).unwrap();
    let answer = &answer[..n];
    let u16_at = |at: usize| u16::from_ne_bytes(answer[at..at + 2].try_into().unwrap());
    let u32_at = |at: usize| u32::from_ne_bytes(answer[at..at + 4].try_into().unwrap());
    assert_ne!(
        i32::from(u16_at(4)),
        libc::NLMSG_ERROR,
        "no diagnostics for socket {ino}: error {}",
        -(u32_at(16) as i32)
    );
    // The attributes follow the header (16 bytes) and the `unix_diag_msg`
    // (16 bytes), each four-byte aligned.
    let end = (u32_at(0) as usize).min(answer.len());
    let mut at = 32;
    while at + 4 <= end {
        let (len, kind) = (usize::from(u16_at(at)), u16_at(at + 2));
        if kind == UNIX_DIAG_PEER {
            return u64::from(u32_at(at + 4));
        }
        at += len.max(4).next_multiple_of(4);
    }
    panic!("socket {ino} has no peer");
}

/// How many of this process's descriptors are open on socket `inode`.
fn open_on_socket(inode: u64) -> usize {
    let name = std::ffi::OsString::from(format!("socket:[{inode}]"));
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(Result::ok)
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter(|target| target.as_os_str() == name)
        .count()
}

/// A worker let go has its channel shut both ways, so that nothing of the
/// gateway's waits on it: not the drain writing a frame the worker never
/// read, not that frame, not the gateway's descriptors of its end. Here a
/// worker stops reading while a job's `Run` of 40 MiB of input waits for
/// room in its channel, and its end of the channel is held elsewhere (by
/// this test, taken from the process with `pidfd_getfd`; a worker that
/// sent the gateway a descriptor of its own end held it so, found by an
/// attacker, and the gateway's end refuses descriptors only on kernels
/// that can), so the channel never drains of itself. The test then
/// breaks the protocol through that end: the worker is faulted, its job
/// fails by name, and every descriptor the gateway had of its end is
/// closed, while the other end is still held and still unread.
#[tokio::test(flavor = "multi_thread")]
async fn a_worker_let_go_with_its_end_held_elsewhere_keeps_nothing_of_the_gateways() {
    use bulkhead::job::FailureKind;
    use bulkhead::runner::Runner;

    const INPUT: usize = 40 << 20;
    let tmp = tempfile::tempdir().unwrap();
    let (runner, faults) = crate::common::workers_watched(tmp.path(), "w", 0, 2).await;
    let runner = std::sync::Arc::new(runner);
    let module = crate::common::load_policy_in_workers(
        &runner,
        bulkhead_tests::HELLO,
        crate::common::policy(bulkhead_tests::HELLO, "hello").limits(|l| {
            l.input = ByteSize::mib(48);
        }),
    )
    .await;
    let pid = runner.pools()["untrusted"].pids()[0];
    // The worker's end of its channel, held by this test from now on.
    let pidfd = rustix::process::pidfd_open(
        rustix::process::Pid::from_raw(pid as i32).unwrap(),
        rustix::process::PidfdFlags::empty(),
    )
    .unwrap();
    let held = rustix::process::pidfd_getfd(
        &pidfd,
        bulkhead::worker::CHANNEL_FD,
        rustix::process::PidfdGetfdFlags::empty(),
    )
    .unwrap();
    let gateways_end = unix_peer_inode(&held);
    let open = open_on_socket(gateways_end);
    assert!(
        open > 0,
        "the gateway holds no descriptor of the channel's other end"
    );
    // SAFETY: kill(2) with a pid and a signal number has no memory effects.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGSTOP) }, 0);
    until(|| process_state(pid) == Some('T')).await;
    let job = {
        let runner = std::sync::Arc::clone(&runner);
        let module = std::sync::Arc::clone(&module);
        tokio::spawn(async move {
            let spec = crate::common::spec(&[("input.bin", &vec![7u8; INPUT])], &[]);
            runner.run(&module, &spec, None).await.unwrap().report
        })
    };
    // The `Run` is on its way: the channel holds more than the pings the
    // stopped worker left unread, and far less than the frame (the rest
    // waits in the gateway, for its drain).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let unread = loop {
        let unread = rustix::io::ioctl_fionread(&held).unwrap();
        if unread >= 64 << 10 {
            break unread;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job's frame was not sent in 60 s ({unread} bytes unread)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(unread < INPUT as u64, "the whole frame was taken: {unread}");
    // A frame longer than the gateway reads from a worker: a protocol
    // fault.
    assert_eq!(
        rustix::io::write(&held, &u32::MAX.to_be_bytes()).unwrap(),
        4
    );
    let report = tokio::time::timeout(Duration::from_secs(60), job)
        .await
        .expect("the job did not end in 60 s")
        .unwrap();
    let failure = report.failure.as_ref().expect("the job failed");
    assert_eq!(failure.kind, FailureKind::Worker, "{report:?}");
    assert!(failure.message.contains("broke the channel"), "{report:?}");
    {
        let faults = faults.lock().unwrap();
        assert_eq!(faults.len(), 1, "{faults:?}");
        assert_eq!((faults[0].class, faults[0].pid), ("protocol", pid));
    }
    // Every descriptor the gateway had of its end goes, with the drain
    // and its frame, though the worker's end is still open and unread.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while open_on_socket(gateways_end) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the gateway still holds {} of the {open} descriptors of its end of a let-go worker's channel after 60 s",
            open_on_socket(gateways_end)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(rustix::io::ioctl_fionread(&held).unwrap() >= unread);
    drop(held);
    until(|| process_state(pid).is_none_or(|s| s == 'Z')).await;
}

/// A zone whose workers fail to start waits longer after each failure in
/// a row (a quarter of a second after the first, doubling), and starts
/// workers again once one succeeds (found by a tester: failed starts were
/// tried four times a second, each a process and a line of log). Each
/// start here fails while `worker-refuse.arm` exists.
#[tokio::test(flavor = "multi_thread")]
async fn failed_worker_starts_wait_longer_each_time_and_the_zone_recovers() {
    let faults = starts_back_off("refuse").await;
    assert_eq!(faults, 1, "only the kill was a fault");
}

/// A worker that says hello and dies before it is given a job failed as
/// a start does, and its hello does not shorten the next start's wait
/// (found by a tester: such workers were replaced 5 to 11 times a second).
#[tokio::test(flavor = "multi_thread")]
async fn workers_that_die_before_any_job_wait_longer_each_time() {
    let faults = starts_back_off("vanish").await;
    assert!(faults >= 2, "the kill and the workers that died: {faults}");
}

/// With `withholding-worker`'s `mode` failing every start while armed:
/// the zone's worker is killed, four starts fail with at least the
/// waits between them, and once disarmed the zone runs a job again.
/// The faults recorded.
async fn starts_back_off(mode: &str) -> usize {
    use bulkhead::runner::Runner;
    let tmp = tempfile::tempdir().unwrap();
    let program = crate::common::withholding(tmp.path(), mode);
    let arm = program.with_file_name(format!("worker-{mode}.arm"));
    let (runner, faults) = crate::common::workers_from(tmp.path(), mode, program, 0, 2, None).await;
    let module = crate::common::load_in_workers(&runner, bulkhead_tests::HELLO, "hello").await;
    let pool = std::sync::Arc::clone(&runner.pools()["untrusted"]);
    let spec = bulkhead::sandbox::JobSpec::new();
    let ran = runner.run(&module, &spec, None).await.unwrap().report;
    assert!(ran.succeeded(), "{ran:?}");
    std::fs::write(&arm, b"").unwrap();
    let pid = pool.pids()[0];
    // SAFETY: kill(2) of the zone's worker, a child of this process.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    until(|| pool.start_failures() >= 1).await;
    let first = std::time::Instant::now();
    until(|| pool.start_failures() >= 4).await;
    // Three waits at least lie between the first failure and the fourth:
    // 0.25 + 0.5 + 1 s. Tried at every round of the supervisor, four would
    // fail within about a second.
    assert!(
        first.elapsed() >= Duration::from_millis(1750),
        "4 failed starts within {:?}",
        first.elapsed()
    );
    std::fs::remove_file(&arm).unwrap();
    until(|| pool.pids().len() == 1).await;
    let ran = runner.run(&module, &spec, None).await.unwrap().report;
    assert!(ran.succeeded(), "{ran:?}");
    runner.close();
    faults.lock().unwrap().len()
}

/// `/readyz` fails, naming the zone, only while a zone has no worker
/// because its starts fail, and passes again once one starts; a zone
/// replacing its worker after every job stays ready meanwhile (found by
/// a tester: readiness failed, saying the service was shutting down,
/// whenever a zone had no live worker, which such a zone has for a moment
/// after each job).
#[tokio::test(flavor = "multi_thread")]
async fn readiness_fails_only_while_a_zones_workers_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    let program = crate::common::withholding(dir.path(), "refuse");
    let arm = program.with_file_name("worker-refuse.arm");
    let server = service::start(|c| {
        c.isolation.program = Some(program.clone());
        c.zones
            .entry("untrusted".into())
            .or_default()
            .jobs_per_worker = 1;
    })
    .await;
    let readyz = || async {
        let r = server.http.get(server.url("/readyz")).send().await.unwrap();
        (r.status(), r.text().await.unwrap())
    };
    let token = server.token("acme", &["hello:run"]).await;
    for _ in 0..6 {
        let resp = server
            .post("/v1/modules/hello/jobs?wait=10s", &token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), reqwest::StatusCode::OK);
        let (status, body) = readyz().await;
        assert_eq!(status, reqwest::StatusCode::OK, "{body}");
    }
    std::fs::write(&arm, b"").unwrap();
    // Every start from now fails; its workers go, those started ahead
    // (and any whose start began before) too.
    let failing = || server.service.isolation().failed_starts["untrusted"];
    for _ in 0..200 {
        if failing() > 0 {
            break;
        }
        let state = server.service.isolation();
        for pid in workers(&server)
            .into_iter()
            .chain(state.successors["untrusted"].clone())
        {
            // SAFETY: kill(2) of a worker, a child of this process.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(failing() > 0, "{:?}", server.service.isolation());
    let (status, body) = readyz().await;
    assert_eq!(status, reqwest::StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert!(body.contains("zone `untrusted` has no worker"), "{body}");
    std::fs::remove_file(&arm).unwrap();
    until(|| failing() == 0).await;
    let (status, body) = readyz().await;
    assert_eq!(status, reqwest::StatusCode::OK, "{body}");
}

/// Every call a plain guest can make of the WASI interfaces it is given
/// (each `wasi:filesystem` call on `/in`, `/out`, a file and a directory it
/// made and an input file, with every advice, and the streams, clocks,
/// randomness and terminal queries) is answered inside its worker, which
/// the hardening does not kill: the job succeeds, the worker that ran it is
/// the one still there, no fault is recorded, and a job of another module
/// in that worker at the same time ends as its own policy says (found by a
/// tester: `advise` on a file made a system call off the seccomp list, and
/// one call from any guest killed its worker and every job in it).
#[tokio::test(flavor = "multi_thread")]
async fn every_call_a_guest_can_make_is_answered_without_ending_its_worker() {
    use bulkhead::policy::HumanDuration;
    use bulkhead::runner::Runner;
    let tmp = tempfile::tempdir().unwrap();
    let (runner, faults) = crate::common::workers_watched(tmp.path(), "every", 0, 2).await;
    let runner = std::sync::Arc::new(runner);
    let every = crate::common::load_policy_in_workers(
        &runner,
        bulkhead_tests::HOSTILE,
        crate::common::policy(bulkhead_tests::HOSTILE, "every").args(&["every-call"]),
    )
    .await;
    let sleeper = crate::common::load_policy_in_workers(
        &runner,
        bulkhead_tests::HOSTILE,
        crate::common::policy(bulkhead_tests::HOSTILE, "sleeper")
            .times(HumanDuration::millis(2_000), HumanDuration::millis(2_000))
            .args(&["sleep"]),
    )
    .await;
    let pool = std::sync::Arc::clone(&runner.pools()["untrusted"]);
    let worker = pool.pids();
    let beside = {
        let runner = std::sync::Arc::clone(&runner);
        tokio::spawn(async move {
            runner
                .run(&sleeper, &bulkhead::sandbox::JobSpec::new(), None)
                .await
                .unwrap()
                .report
        })
    };
    let spec = crate::common::spec(&[("in.txt", b"every call\n")], &[]);
    let ran = runner.run(&every, &spec, None).await.unwrap().report;
    assert!(ran.succeeded(), "{ran:?}");
    assert!(
        ran.stdout.text.contains("every-call: an input advise")
            && ran.stdout.text.ends_with("every-call: done\n"),
        "{}",
        ran.stdout.text
    );
    let beside = beside.await.unwrap();
    assert_eq!(
        beside.limit,
        Some(bulkhead::job::LimitKind::WallTime),
        "{beside:?}"
    );
    assert!(
        faults.lock().unwrap().is_empty(),
        "{:?}",
        faults.lock().unwrap()
    );
    assert_eq!(pool.pids(), worker);
    for pid in worker {
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    }
}
