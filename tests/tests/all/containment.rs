//! A compromised guest cannot reach host files, change its inputs, open
//! sockets or see the host's environment. Each test checks the host side:
//! canary files, the input directory, a listening socket, not only what the
//! guest prints.

use bulkhead::policy::ByteSize;
use bulkhead_suite::evidence::random_token;

use crate::common::{SANDBOX, all_evidence, contains, hostile, run, spec};

/// A file outside every job directory holding a secret.
fn canary() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let dir = tempfile::tempdir().unwrap();
    let secret = random_token("CANARY").into_bytes();
    let path = dir.path().join("canary.txt");
    std::fs::write(&path, &secret).unwrap();
    (dir, path, secret)
}

/// Runs a filesystem-escape mode against a fresh canary and asserts the
/// canary's content and `/etc/passwd`'s never reach any job output, no loot
/// file was collected, and the canary is unchanged on the host.
async fn assert_no_escape(mode: &str) {
    let (_keep, path, secret) = canary();
    let target = path.to_str().unwrap();
    let module = hostile(mode, |_| {});
    let job = spec(&[("input.txt", b"input bytes")], &[("target", target)]);
    let (report, dir) = run(&module, &job).await;
    assert!(report.succeeded(), "{mode}: {report:#?}");
    let evidence = all_evidence(&report, &dir);
    assert!(
        !contains(&evidence, &secret),
        "{mode} leaked the canary: {report:#?}"
    );
    assert!(
        !contains(&evidence, b"root:x:0:0"),
        "{mode} leaked /etc/passwd"
    );
    assert!(
        report.outputs.iter().all(|o| !o.name.starts_with("loot")),
        "{mode} collected loot: {:?}",
        report.outputs
    );
    assert_eq!(std::fs::read(&path).unwrap(), secret, "canary changed");
    // The guest really tried: every attempt line is there.
    assert!(
        report.stdout.text.contains("attempt "),
        "{}",
        report.stdout.text
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dot_dot_paths_do_not_leave_the_preopens() {
    assert_no_escape("read-dotdot").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn absolute_host_paths_do_not_exist_for_the_guest() {
    assert_no_escape("read-abs").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn guest_made_symlinks_do_not_lead_out() {
    assert_no_escape("symlink-escape").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn inputs_are_read_only() {
    let module = hostile("write-in", |_| {});
    let original: &[u8] = b"the original input";
    let job = spec(&[("input.txt", original)], &[]);
    let (report, dir) = run(&module, &job).await;
    assert!(report.succeeded(), "{report:#?}");
    // Host side: the input file is intact and alone in `in/`.
    let in_dir = dir.input_dir();
    let names: Vec<_> = std::fs::read_dir(&in_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["input.txt"]);
    assert_eq!(std::fs::read(in_dir.join("input.txt")).unwrap(), original);
    // Nothing from `/in` was linked or moved into `/out`.
    assert!(report.outputs.is_empty(), "{:?}", report.outputs);
    for line in report
        .stdout
        .text
        .lines()
        .filter(|l| l.starts_with("attempt "))
    {
        let allowed = line.starts_with("attempt list /in");
        assert!(
            allowed || line.contains(": err "),
            "write to /in succeeded: {line}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_socket_can_be_opened_and_no_name_resolved() {
    // A real listener on loopback: if the guest could connect, it would
    // show up here as a pending connection.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    udp.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port().to_string();
    let module = hostile("socket", |_| {});
    let (report, _dir) = run(&module, &spec(&[], &[("port", &port)])).await;
    assert!(report.succeeded(), "{report:#?}");
    let err = listener
        .accept()
        .expect_err("the guest connected to the host");
    assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    let mut buf = [0u8; 64];
    assert!(
        udp.recv_from(&mut buf).is_err(),
        "the guest sent a datagram"
    );
    for line in report
        .stdout
        .text
        .lines()
        .filter(|l| l.starts_with("attempt "))
    {
        assert!(!line.ends_with(": ok"), "network attempt succeeded: {line}");
    }
    assert!(
        report
            .stdout
            .text
            .contains("attempt resolve localhost: err")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_guest_sees_only_its_policy_env_and_args() {
    let module = hostile("env", |_| {});
    let mut job = spec(&[], &[("port", "7")]);
    job.stdin = bytes::Bytes::from_static(b"stdin!");
    let (report, _dir) = run(&module, &job).await;
    assert!(report.succeeded(), "{report:#?}");
    let out = &report.stdout.text;
    assert!(out.contains("env count: 1\nGREETING=hi\n"), "{out}");
    for (key, value) in std::env::vars() {
        if value.len() >= 4 {
            assert!(!out.contains(&value), "host env {key} visible to the guest");
        }
    }
    assert!(
        out.contains("arg 0: hostile\narg 1: env\narg 2: --port=7\n"),
        "{out}"
    );
    assert!(out.contains("stdin: 6 bytes"), "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_later_job_finds_no_trace_of_an_earlier_one() {
    let canary = random_token("LEAK");
    let writer = hostile("canary-write", |_| {});
    let (report, _dir) = run(&writer, &spec(&[], &[("canary", &canary)])).await;
    assert!(report.succeeded(), "{report:#?}");
    drop(_dir);
    // Same module, same pool: the next instance likely reuses the slot.
    let scanner = hostile("canary-scan", |l| l.memory = ByteSize::mib(256));
    for _ in 0..3 {
        let (report, _dir) = run(&scanner, &spec(&[], &[("canary", &canary)])).await;
        assert!(report.succeeded(), "{report:#?}");
        assert!(
            report.stdout.text.contains("canary not found"),
            "{}",
            report.stdout.text
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn unknown_parameters_are_refused_before_the_guest_runs() {
    let module = hostile("env", |_| {});
    let job = spec(&[], &[("secret", "x")]);
    let dir = bulkhead::sandbox::JobDir::create(&SANDBOX.config().work_dir, &job.id).unwrap();
    let err = SANDBOX.run(&module, &job, &dir).await.unwrap_err();
    assert_eq!(
        err.to_string(),
        "unknown parameter `secret` for module `hostile` (it accepts target, port, canary)"
    );
}
