//! Links a guest leaves in `/out` are listed as skipped and never followed,
//! neither when outputs are hashed nor when they are copied out.

use crate::common::{hostile, run, spec};

#[tokio::test(flavor = "multi_thread")]
async fn links_left_in_out_are_not_followed_when_collecting() {
    let module = hostile("leave-links", |_| {});
    let (report, dir) = run(&module, &spec(&[], &[])).await;
    assert!(report.succeeded(), "{report:#?}");
    let names: Vec<_> = report.outputs.iter().map(|o| o.name.as_str()).collect();
    assert_eq!(names, ["ok.txt"]);
    assert!(
        report
            .skipped_outputs
            .iter()
            .any(|s| s.name == "escape" && s.reason == "symlink"),
        "{:?}",
        report.skipped_outputs
    );
    // The link really is on the host's disk, pointing out of the job.
    let link = std::fs::read_link(dir.output_dir().join("escape")).unwrap();
    assert!(link.to_str().unwrap().contains(".."));

    // Copying outputs out copies only the regular file.
    let dest = tempfile::tempdir().unwrap();
    let copied = bulkhead::sandbox::outputs::collect(
        &dir.output_dir(),
        Some(&dest.path().join("o")),
        bulkhead::sandbox::outputs::Bounds::NONE,
        Some(&dir.created()),
    )
    .unwrap();
    assert_eq!(copied.files.len(), 1);
    let mut present: Vec<_> = std::fs::read_dir(dest.path().join("o"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    present.sort();
    assert_eq!(present, ["ok.txt"]);
}

#[test]
fn fifos_and_host_made_links_in_out_are_skipped_without_blocking() {
    // A guest cannot make a FIFO through WASI, but a runtime bug or a second
    // process could; collection must neither block on it nor read it.
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(tmp.path().join("secret"), b"host secret").unwrap();
    std::os::unix::fs::symlink(tmp.path().join("secret"), out.join("link")).unwrap();
    let fifo =
        std::ffi::CString::new(out.join("fifo").into_os_string().into_encoded_bytes()).unwrap();
    // SAFETY: a valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    std::fs::write(out.join("real.txt"), b"real").unwrap();
    let got = bulkhead::sandbox::outputs::collect(
        &out,
        None,
        bulkhead::sandbox::outputs::Bounds::NONE,
        None,
    )
    .unwrap();
    assert_eq!(got.files.len(), 1);
    assert_eq!(got.files[0].name, "real.txt");
    let mut reasons: Vec<_> = got
        .skipped
        .iter()
        .map(|s| (s.name.as_str(), s.reason.as_str()))
        .collect();
    reasons.sort();
    assert_eq!(reasons, [("fifo", "fifo"), ("link", "symlink")]);
}

/// The deepest directory below `dir`, in levels (`dir` itself is 0),
/// walked without following a link.
fn deepest(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_type().unwrap().is_dir())
        .map(|e| 1 + deepest(&e.path()))
        .max()
        .unwrap_or(0)
}

/// A guest's tree in `/out` is at most `MAX_DIR_DEPTH` directories deep,
/// however it is built: made level by level through descriptors or by
/// paths ending in `/`, or chained with short paths by moving each
/// directory into the next. Past
/// it, the guest's `mkdir` or `rename` is refused and the job goes on.
/// Checked on the host's own `/out` after the job (found by an attacker:
/// a chain of 15,000 directories made in 0.3 s of a guest's CPU took its
/// worker more than 10 s to remove under Landlock, and the gateway failed
/// the worker, with the other tenants' jobs on it).
#[tokio::test(flavor = "multi_thread")]
async fn a_guests_tree_in_out_is_no_deeper_than_the_bound() {
    use bulkhead::sandbox::MAX_DIR_DEPTH;
    let module = hostile("deep-tree", |l| l.output_files = 1_000);
    let (report, dir) = run(&module, &spec(&[], &[])).await;
    assert!(report.succeeded(), "{report:#?}");
    let said = &report.stdout.text;
    assert!(
        said.contains(&format!("{MAX_DIR_DEPTH} levels descended")),
        "{said}"
    );
    assert!(
        said.contains(&format!("{MAX_DIR_DEPTH} levels by paths ending in /")),
        "{said}"
    );
    assert!(!said.contains(", 0 refused"), "{said}");
    assert_eq!(deepest(&dir.output_dir()), MAX_DIR_DEPTH, "{said}");
}

/// Below a directory deeper than the bound (made here by the host, as a
/// check passed once by a race would have left it), nothing more is made:
/// a depth that is not shown to be within the bound is refused, not taken
/// for a directory elsewhere (found by an attacker: one race won, every
/// later `mkdir` below it went unchecked).
#[tokio::test(flavor = "multi_thread")]
async fn below_a_directory_too_deep_nothing_more_is_made() {
    use crate::common::SANDBOX;
    let module = hostile("deep-mkdir", |_| {});
    let job = spec(&[], &[]);
    let dir = bulkhead::sandbox::JobDir::create(&SANDBOX.config().work_dir, &job.id).unwrap();
    let deep = dir.output_dir().join("c/".repeat(24));
    std::fs::create_dir_all(&deep).unwrap();
    let report = SANDBOX.run(&module, &job, &dir).await.unwrap();
    assert!(report.succeeded(), "{report:#?}");
    assert!(
        report.stdout.text.contains("deep-mkdir: refused"),
        "{}",
        report.stdout.text
    );
    assert!(!deep.join("new").exists());
}
