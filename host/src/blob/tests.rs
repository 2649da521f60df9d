//! One suite of blob behaviours, run against [`FsBlobs`] on a temporary
//! directory and [`PgBlobs`] on a throwaway PostgreSQL database (see
//! [`crate::store::pg_server`]; with `CI` set, a missing server fails).

use crate::sandbox::beneath::Root;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures_util::TryStreamExt as _;
use sha2::{Digest, Sha256};

use super::*;
use crate::job::OutputFile;

/// A blob store under test, with the data directory its outputs are
/// collected into.
struct Blobs {
    store: Box<dyn BlobStore>,
    jobs_dir: PathBuf,
    /// The database, for the PostgreSQL store.
    pool: Option<sqlx::PgPool>,
    url: Option<String>,
    _tmp: tempfile::TempDir,
}

impl Blobs {
    fn fs() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let jobs_dir = tmp.path().join("jobs");
        std::fs::create_dir_all(&jobs_dir).unwrap();
        Self {
            store: Box::new(FsBlobs::new(Root::open(&jobs_dir).unwrap())),
            jobs_dir,
            pool: None,
            url: None,
            _tmp: tmp,
        }
    }

    async fn postgres() -> Option<Self> {
        let url = crate::store::pg_server::fresh_database().await?;
        let tmp = tempfile::tempdir().unwrap();
        let jobs_dir = tmp.path().join("jobs");
        std::fs::create_dir_all(&jobs_dir).unwrap();
        let store = PgBlobs::open(&url, 4, &Root::open(&jobs_dir).unwrap())
            .await
            .unwrap();
        Some(Self {
            pool: Some(store.pool.clone()),
            url: Some(url),
            store: Box::new(store),
            jobs_dir,
            _tmp: tmp,
        })
    }

    /// Writes `files` where a run of `job` collects its outputs, and lists
    /// them as its report would.
    fn collect(&self, job: &str, files: &[(&str, &[u8])]) -> (PathBuf, Vec<OutputFile>) {
        let dir = self.jobs_dir.join(job).join("outputs");
        let _ = std::fs::remove_dir_all(&dir);
        let mut listed = Vec::new();
        for (name, data) in files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, data).unwrap();
            listed.push(OutputFile {
                name: (*name).to_owned(),
                size: data.len() as u64,
                sha256: hex::encode(Sha256::digest(data)),
            });
        }
        (dir, listed)
    }

    /// Makes `job`'s row say attempt `attempt` runs it (the PostgreSQL
    /// store keeps only that attempt's outputs).
    async fn running(&self, job: &str, attempt: u32) {
        let Some(pool) = &self.pool else {
            return;
        };
        sqlx::query(
            "INSERT INTO jobs (id, tenant, subject, token_id, module, module_sha256, params,
                               inputs, has_stdin, state, created_at, attempts)
             VALUES ($1, 'acme', 's', 't', 'm', 'x', '{}', '[]', false, 'running', 0, $2)
             ON CONFLICT (id) DO UPDATE SET state = 'running', attempts = $2",
        )
        .bind(job)
        .bind(i32::try_from(attempt).unwrap())
        .execute(pool)
        .await
        .unwrap();
    }

    async fn put_outputs(&self, job: &str, attempt: u32, files: &[(&str, &[u8])]) {
        self.running(job, attempt).await;
        let (dir, listed) = self.collect(job, files);
        self.store
            .put_outputs(job, attempt, &dir, &listed)
            .await
            .unwrap();
    }

    async fn read(&self, job: &str, name: &str) -> Option<Vec<u8>> {
        let (reader, len) = self.store.output(job, name).await.unwrap()?;
        let data = read_all(reader).await;
        assert_eq!(data.len() as u64, len, "{job}/{name}: its length as stored");
        Some(data)
    }

    /// Rows and chunks left in the database (`None` for the fs store).
    async fn rows(&self, job: &str) -> Option<(i64, i64)> {
        let pool = self.pool.as_ref()?;
        let blobs: i64 = sqlx::query_scalar("SELECT count(*) FROM blobs WHERE job_id = $1")
            .bind(job)
            .fetch_one(pool)
            .await
            .unwrap();
        let chunks: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM blob_chunks c JOIN blobs b ON b.id = c.blob_id WHERE b.job_id = $1",
        )
        .bind(job)
        .fetch_one(pool)
        .await
        .unwrap();
        Some((blobs, chunks))
    }
}

async fn read_all(reader: OutputReader) -> Vec<u8> {
    match reader {
        OutputReader::File(file) => {
            use std::io::Read as _;
            let mut data = Vec::new();
            let mut file = file;
            file.read_to_end(&mut data).unwrap();
            data
        }
        OutputReader::Chunks(chunks) => {
            let chunks: Vec<Bytes> = chunks.try_collect().await.unwrap();
            assert!(
                chunks.iter().all(|c| c.len() <= PG_CHUNK),
                "no chunk is larger than {PG_CHUNK}"
            );
            chunks.concat()
        }
    }
}

fn input(name: &str, data: &[u8]) -> JobInput {
    JobInput {
        name: name.to_owned(),
        data: Bytes::copy_from_slice(data),
    }
}

/// Bytes that differ at every offset a chunk could start at.
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
        .collect()
}

macro_rules! blob_suite {
    ($($test:ident),* $(,)?) => {
        mod fs {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(&super::Blobs::fs()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    if let Some(blobs) = super::Blobs::postgres().await {
                        super::$test(&blobs).await;
                    }
                }
            )*
        }
    };
}

blob_suite!(
    inputs_and_outputs_round_trip,
    large_blobs_stream_in_chunks,
    missing_blobs_are_told_apart_from_failures,
    deleting_a_job_removes_all_its_blobs,
    a_rerun_replaces_an_earlier_attempts_outputs,
);

async fn inputs_and_outputs_round_trip(b: &Blobs) {
    let inputs = [input("a.txt", b"alpha"), input("empty", b"")];
    b.store
        .put_inputs("j1", &inputs, Some(b"from stdin"))
        .await
        .unwrap();
    b.store.put_inputs("j2", &[], None).await.unwrap();
    let names = vec!["empty".to_owned(), "a.txt".to_owned()];
    let (got, stdin) = b.store.inputs("j1", &names, true).await.unwrap();
    assert_eq!(got, vec![inputs[1].clone(), inputs[0].clone()]);
    assert_eq!(stdin, Bytes::from_static(b"from stdin"));
    let (_, stdin) = b.store.inputs("j1", &names, false).await.unwrap();
    assert!(stdin.is_empty(), "stdin only when asked");
    assert_eq!(
        b.store.input_sizes("j1", &names, true).await.unwrap(),
        [0, 5, 10]
    );
    assert_eq!(
        b.store.input_sizes("j1", &names, false).await.unwrap(),
        [0, 5, 0]
    );
    assert!(matches!(
        b.store.input_sizes("j1", &["gone".to_owned()], false).await,
        Err(BlobError::MissingInput { .. })
    ));
    assert!(b.store.input_sizes("j2", &[], true).await.is_err());

    b.put_outputs(
        "j1",
        1,
        &[("out.txt", b"result"), ("dir/deep.bin", b"\0\x01\x02")],
    )
    .await;
    assert_eq!(b.read("j1", "out.txt").await.unwrap(), b"result");
    assert_eq!(b.read("j1", "dir/deep.bin").await.unwrap(), b"\0\x01\x02");

    b.store.remove_inputs("j1").await.unwrap();
    assert!(matches!(
        b.store.inputs("j1", &names, false).await,
        Err(BlobError::MissingInput { .. })
    ));
    assert_eq!(
        b.read("j1", "out.txt").await.unwrap(),
        b"result",
        "outputs outlive the inputs"
    );
}

async fn large_blobs_stream_in_chunks(b: &Blobs) {
    let big_in = pattern(2 * PG_CHUNK + 17);
    b.store
        .put_inputs(
            "big",
            &[input("in", &big_in)],
            Some(&big_in[..PG_CHUNK + 1]),
        )
        .await
        .unwrap();
    let (got, stdin) = b.store.inputs("big", &["in".into()], true).await.unwrap();
    assert!(
        got[0].data[..] == big_in[..],
        "a large input comes back whole"
    );
    assert!(stdin[..] == big_in[..PG_CHUNK + 1]);

    let big_out = pattern(3 * PG_CHUNK + PG_CHUNK / 2);
    b.put_outputs(
        "big",
        1,
        &[("big.bin", &big_out), ("exact", &big_in[..PG_CHUNK])],
    )
    .await;
    let (reader, len) = b.store.output("big", "big.bin").await.unwrap().unwrap();
    assert_eq!(len, big_out.len() as u64);
    if let OutputReader::Chunks(mut chunks) = reader {
        // Streamed: each chunk is fetched as it is asked for.
        let mut seen = Vec::new();
        while let Some(chunk) = chunks.try_next().await.unwrap() {
            assert!(chunk.len() <= PG_CHUNK);
            seen.push(chunk.len());
        }
        assert_eq!(seen.len(), 4, "{seen:?}");
        assert_eq!(seen.iter().sum::<usize>(), big_out.len());
    }
    assert!(b.read("big", "big.bin").await.unwrap() == big_out);
    assert!(b.read("big", "exact").await.unwrap()[..] == big_in[..PG_CHUNK]);
    if let Some((blobs, chunks)) = b.rows("big").await {
        // in (3 chunks), stdin (2), big.bin (4), exact (1).
        assert_eq!((blobs, chunks), (4, 10));
        // The local copy was only the way in.
        assert!(!b.jobs_dir.join("big").join("outputs").exists());
    }
}

async fn missing_blobs_are_told_apart_from_failures(b: &Blobs) {
    assert!(matches!(
        b.store.inputs("nope", &["x".into()], false).await,
        Err(BlobError::MissingInput { name, .. }) if name == "x"
    ));
    assert!(matches!(
        b.store.inputs("nope", &[], true).await,
        Err(BlobError::MissingInput { .. }) | Err(BlobError::Io(_))
    ));
    let (inputs, stdin) = b.store.inputs("nope", &[], false).await.unwrap();
    assert!(
        inputs.is_empty() && stdin.is_empty(),
        "a job without inputs"
    );
    b.put_outputs("j", 1, &[("a", b"a")]).await;
    assert!(b.read("j", "b").await.is_none(), "no such output");
    assert!(b.read("other", "a").await.is_none(), "another job's name");
    assert!(b.read("j", "../j/outputs/a").await.is_none() || b.pool.is_none());
    if b.pool.is_none() {
        // A second name for another file, put among a job's outputs, and
        // a link: neither is served.
        let victim = b.jobs_dir.parent().unwrap().join("victim");
        std::fs::write(&victim, b"not the job's").unwrap();
        let outputs = b.jobs_dir.join("j").join("outputs");
        std::fs::hard_link(&victim, outputs.join("hard")).unwrap();
        std::os::unix::fs::symlink(&victim, outputs.join("soft")).unwrap();
        assert!(b.read("j", "hard").await.is_none(), "a hard link is served");
        assert!(b.read("j", "soft").await.is_none(), "a link is served");
    }
}

async fn deleting_a_job_removes_all_its_blobs(b: &Blobs) {
    b.store
        .put_inputs("gone", &[input("in", b"x")], Some(b"s"))
        .await
        .unwrap();
    b.put_outputs("gone", 1, &[("out", &pattern(PG_CHUNK + 1))])
        .await;
    b.store
        .put_inputs("kept", &[input("in", b"y")], None)
        .await
        .unwrap();
    b.store.remove_job("gone").await.unwrap();
    b.store.remove_job("never-was").await.unwrap();
    assert!(b.read("gone", "out").await.is_none());
    assert!(b.store.inputs("gone", &["in".into()], false).await.is_err());
    assert!(!b.jobs_dir.join("gone").exists());
    if let Some(rows) = b.rows("gone").await {
        assert_eq!(rows, (0, 0), "no row or chunk is left");
    }
    let (kept, _) = b.store.inputs("kept", &["in".into()], false).await.unwrap();
    assert_eq!(kept[0].data, Bytes::from_static(b"y"), "another job's stay");
}

async fn a_rerun_replaces_an_earlier_attempts_outputs(b: &Blobs) {
    b.put_outputs("r", 1, &[("a", b"first a"), ("b", b"first b")])
        .await;
    // A second attempt (after a crash of the node running the first)
    // collects into the same place; it replaces, never mixes.
    std::fs::remove_dir_all(b.jobs_dir.join("r").join("outputs")).ok();
    b.put_outputs("r", 2, &[("a", b"second a"), ("c", b"second c")])
        .await;
    assert_eq!(b.read("r", "a").await.unwrap(), b"second a");
    assert_eq!(b.read("r", "c").await.unwrap(), b"second c");
    if b.pool.is_some() {
        assert!(
            b.read("r", "b").await.is_none(),
            "the first attempt's b is gone"
        );
        // The first attempt, finishing late, keeps nothing of its run.
        let (dir, listed) = b.collect("r", &[("b", b"late b")]);
        assert!(matches!(
            b.store.put_outputs("r", 1, &dir, &listed).await,
            Err(BlobError::Stale { attempt: 1, .. })
        ));
        assert!(b.read("r", "b").await.is_none());
        // Nor does its failure remove the later attempt's.
        b.store.remove_outputs("r", 1).await.unwrap();
        assert_eq!(b.read("r", "a").await.unwrap(), b"second a");
        // A third attempt that left nothing removes the second's.
        b.running("r", 3).await;
        b.store
            .put_outputs("r", 3, &b.jobs_dir.join("r/outputs"), &[])
            .await
            .unwrap();
        assert!(b.read("r", "a").await.is_none());
    }
    b.store.remove_outputs("r", 3).await.unwrap();
    assert!(b.read("r", "a").await.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_output_changed_after_collection_is_refused_and_nothing_of_it_kept() {
    let Some(b) = Blobs::postgres().await else {
        return;
    };
    b.put_outputs("c", 1, &[("a", b"kept")]).await;
    let (dir, mut listed) = b.collect("c", &[("a", b"new"), ("b", b"bbb")]);
    listed[1].size = 2;
    b.running("c", 2).await;
    assert!(matches!(
        b.store.put_outputs("c", 2, &dir, &listed).await,
        Err(BlobError::Changed { name, .. }) if name == "b"
    ));
    assert_eq!(
        b.read("c", "a").await.unwrap(),
        b"kept",
        "rolled back whole"
    );
    assert_eq!(b.rows("c").await, Some((1, 1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_blobs_no_job_row_points_to_are_swept_by_age() {
    let Some(b) = Blobs::postgres().await else {
        return;
    };
    let pool = b.pool.as_ref().unwrap();
    b.store
        .put_inputs("orphan", &[input("in", b"x")], None)
        .await
        .unwrap();
    b.store
        .put_inputs("owned", &[input("in", b"y")], None)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO jobs (id, tenant, subject, token_id, module, module_sha256, params, inputs,
                           has_stdin, state, created_at)
         VALUES ('owned', 't', 's', 'tok', 'm', 'h', '{}', '[\"in\"]', false, 'queued', 0)",
    )
    .execute(pool)
    .await
    .unwrap();
    let sqlite = crate::store::SqliteStore::open(&b.jobs_dir.join("unused.sqlite"))
        .await
        .unwrap();
    assert_eq!(
        b.store
            .remove_orphans(&sqlite, Duration::from_secs(600))
            .await
            .unwrap(),
        0,
        "young blobs may be a submission between its inputs and its row"
    );
    assert_eq!(
        b.store
            .remove_orphans(&sqlite, Duration::ZERO)
            .await
            .unwrap(),
        1
    );
    assert_eq!(b.rows("orphan").await, Some((0, 0)));
    assert_eq!(b.rows("owned").await, Some((1, 1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_that_no_longer_runs_its_job_keeps_no_outputs() {
    let Some(b) = Blobs::postgres().await else {
        return;
    };
    let pool = b.pool.clone().unwrap();
    // Cancelled through another node while this attempt ran, then
    // re-queued (its lease ran out) before this attempt finished.
    for state in ["cancelled", "queued"] {
        b.running("x", 1).await;
        sqlx::query("UPDATE jobs SET state = $1 WHERE id = 'x'")
            .bind(state)
            .execute(&pool)
            .await
            .unwrap();
        let (dir, listed) = b.collect("x", &[("late", b"late")]);
        assert!(
            matches!(
                b.store.put_outputs("x", 1, &dir, &listed).await,
                Err(BlobError::Stale { attempt: 1, .. })
            ),
            "{state}"
        );
        assert_eq!(b.rows("x").await, Some((0, 0)), "{state}");
    }
}

/// A node frozen while it writes a job's outputs (a stopped process, a
/// paused machine) holds the job's lock only until the database ends its
/// idle transaction: the attempt that re-runs the job on another node keeps
/// its outputs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_frozen_while_writing_outputs_does_not_stop_the_rerun_keeping_its_own() {
    let Some(b) = Blobs::postgres().await else {
        return;
    };
    // The frozen node's blob store, opened as every node opens it.
    let frozen = PgBlobs::open(
        b.url.as_deref().unwrap(),
        1,
        &Root::open(&b.jobs_dir).unwrap(),
    )
    .await
    .unwrap();
    let mut tx = frozen.pool.begin().await.unwrap();
    super::postgres::lock_job(&mut tx, "f").await.unwrap();
    b.running("f", 2).await;
    let (dir, listed) = b.collect("f", &[("out", b"attempt 2")]);
    // Not a timing: a guard against waiting for ever, which is what the
    // write does behind a lock nobody releases.
    tokio::time::timeout(
        Duration::from_secs(120),
        b.store.put_outputs("f", 2, &dir, &listed),
    )
    .await
    .expect("the re-run waited for ever behind the frozen node's lock")
    .unwrap();
    assert_eq!(b.read("f", "out").await.unwrap(), b"attempt 2");
    drop(tx);
}

/// Only a regular file is a stored input: a FIFO put in an input's place
/// is a missing input, for its size and its bytes, and never read as
/// empty (nor waited on).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_input_that_is_not_a_regular_file_is_missing() {
    let b = Blobs::fs();
    b.store
        .put_inputs("f", &[input("a", b"alpha")], None)
        .await
        .unwrap();
    let stored = b.jobs_dir.join("f/inputs/in-a");
    std::fs::remove_file(&stored).unwrap();
    let path = std::ffi::CString::new(stored.into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let names = ["a".to_owned()];
    assert!(matches!(
        b.store.input_sizes("f", &names, false).await,
        Err(BlobError::MissingInput { .. })
    ));
    assert!(matches!(
        b.store.inputs("f", &names, false).await,
        Err(BlobError::MissingInput { .. })
    ));
}
