//! A compromised worker for the gateway's reading clocks: started by a pool
//! in place of the worker binary (`PoolConfig::program`), it starts the
//! real worker (`bulkhead-under-test`, beside it) on a channel of its own
//! and relays frames both ways until the gateway sends it a job. It leaves
//! that `Run` unread in its channel, vouches for itself once a second from
//! then on (as a worker whose guests hold its threads may), and:
//!
//! - named `…-deaf`, reads nothing more;
//! - named `…-slow`, reads 40 KiB every ten seconds: it reads all the
//!   while (the kernel frees what was sent whole pieces at a time, of at
//!   most 36 KiB), but a `Run` of hundreds of KiB waits minutes.
//!
//! Named `…-discard`, it reads and relays everything instead, but drops
//! every `Run` after the first: the real worker answers pings and never
//! hears of those jobs.
//!
//! Named `…-blind`, the first one started once `<path>.arm` exists (it
//! takes that file away) relays everything but the `Run`s, and leaves
//! `<path>.used` once it has dropped one: the real worker never hears of
//! any job.
//!
//! Named `…-forge`, the first one started once `<path>.arm` exists relays
//! everything, but answers each load it finds in the zone's cache with a
//! forged `Loaded`: that it compiled the module and handed over another
//! module's artifact from the cache, copied into its own directory under
//! that artifact's name (leaving `<path>.used`).
//!
//! Named `…-claim`, every one started relays everything, but answers each
//! load it found in the zone's cache with a `Loaded` saying it found the
//! entry not the recorded one and compiled the module itself (handing
//! nothing over): the word that has the gateway compile the module again
//! for the cache.
//!
//! Named `…-pad`, the first one started once `<path>.arm` exists relays
//! everything, but adds 100,000 made-up files to the files each report
//! says its job created (leaving `<path>.used`).
//!
//! Named `…-shout`, the first one started once `<path>.arm` exists relays
//! everything, but turns each report into a failure to start its job of
//! 100 KiB of control characters (leaving `<path>.used`).
//!
//! Named `…-refuse`, every one started while `<path>.arm` exists fails
//! its start: its first frame says so (`StartFailed`), and it exits.
//!
//! Named `…-vanish`, every one started while `<path>.arm` exists relays
//! the real worker's hello, then exits 0.3 s later, before it is sent
//! any job.
//!
//! Named `…-burn`, the first one started once `<path>.arm` exists relays
//! everything; once it has relayed its first job's report, it keeps two
//! threads of its own busy for ever (leaving `<path>.used`): a worker that
//! reports its jobs and burns the CPU between them.
//!
//! Named `…-hold`, the first one started once `<path>.arm` exists relays
//! everything until it has relayed a job's report; from then on it passes
//! on no `Loaded`, and once it has held one back it keeps two threads of
//! its own busy for ever (leaving `<path>.used`): a worker that says it
//! is still loading a module and burns the CPU meanwhile.
//!
//! Otherwise only the first one started from a path that is sent a job withholds
//! (it leaves `<path>.used`); later ones relay everything, so the zone's
//! next worker is honest. The name is that of the path the pool starts (a link to this
//! binary): the pool passes the worker nothing else of its own.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulkhead::worker::proto::{self, Up};
use bulkhead::worker::{CHANNEL_FD, WorkerArgs, process};

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Honest,
    Deaf,
    Slow,
    Discard,
    Blind,
    Forge,
    Claim,
    Pad,
    Shout,
    Refuse,
    Vanish,
    Burn,
    Hold,
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(path), Some(subcommand), Some(json)) = (args.first(), args.get(1), args.get(2))
    else {
        std::process::exit(2);
    };
    let mut mode = mode(path);
    let mut used = PathBuf::from(path).into_os_string();
    used.push(".used");
    if matches!(
        mode,
        Mode::Blind | Mode::Forge | Mode::Pad | Mode::Shout | Mode::Burn | Mode::Hold
    ) && std::fs::remove_file(format!("{path}.arm")).is_err()
    {
        mode = Mode::Honest;
    }
    let gateway = process::inherited_channel().expect("no channel inherited");
    if mode == Mode::Refuse && std::path::Path::new(&format!("{path}.arm")).exists() {
        let refusal = frame_of(&Up::StartFailed {
            error: "refused to start".into(),
        })
        .expect("a refusal frames");
        let _ = (&gateway).write_all(&refusal);
        std::process::exit(3);
    }
    // The directories the pool handed over, in order, after the channel.
    let dirs: Vec<std::fs::File> = (1..8)
        .map(|i| CHANNEL_FD + i)
        // SAFETY: fcntl(F_GETFD) on a descriptor number only reads its flags.
        .take_while(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0)
        // SAFETY: each is an open descriptor this process was handed and
        // owns from here on.
        .map(|fd| std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
        .collect();
    let worker_args: WorkerArgs = serde_json::from_str(json).expect("worker arguments");
    let real = std::env::current_exe()
        .expect("this binary's path")
        .with_file_name("bulkhead-under-test");
    let spawned = process::spawn(
        &real,
        subcommand,
        &worker_args,
        &dirs.iter().collect::<Vec<_>>(),
    )
    .expect("the real worker starts");
    // Its own directory and the zone's cache, as it was handed them.
    let (work, cache) = (fd_path(&dirs[0]), fd_path(&dirs[1]));
    let child = spawned.channel;
    let up = Arc::new(Mutex::new(gateway.try_clone().expect("channel")));

    // Up: what the real worker says, whole frames at a time.
    {
        let up = Arc::clone(&up);
        let mut from = child.try_clone().expect("channel");
        let forging = (mode == Mode::Forge).then(|| (work.clone(), cache.clone(), used.clone()));
        let used_up = used.clone();
        let vanish = mode == Mode::Vanish && std::path::Path::new(&format!("{path}.arm")).exists();
        std::thread::spawn(move || {
            let mut reported = false;
            while let Some(mut frame) = read_frame(&mut from) {
                if let Some((work, cache, used)) = &forging
                    && let Some(forged) = forged(&frame[4..], work, cache)
                {
                    first(used);
                    frame = forged;
                }
                if mode == Mode::Claim
                    && let Some(claimed) = claimed(&frame[4..])
                {
                    frame = claimed;
                }
                let rewritten = match mode {
                    Mode::Pad => padded(&frame[4..]),
                    Mode::Shout => shouted(&frame[4..]),
                    _ => None,
                };
                if let Some(padded) = rewritten {
                    first(&used_up);
                    frame = padded;
                }
                let decoded = matches!(mode, Mode::Burn | Mode::Hold)
                    .then(|| proto::decode::<Up>(&frame[4..]).ok())
                    .flatten();
                let report = matches!(decoded, Some(Up::Report { .. }));
                let loaded = matches!(decoded, Some(Up::Loaded { .. }));
                // Burning before the report goes up: its job is done.
                if mode == Mode::Burn && report && first(&used_up) {
                    burn();
                }
                if mode == Mode::Hold && loaded && reported {
                    if first(&used_up) {
                        burn();
                    }
                    continue;
                }
                reported = reported || report;
                if up.lock().unwrap().write_all(&frame).is_err() {
                    break;
                }
                if vanish {
                    // Once the gateway has taken it as one of the zone's
                    // workers.
                    std::thread::sleep(Duration::from_millis(300));
                    std::process::exit(0);
                }
            }
            std::process::exit(0);
        });
    }

    // Down: relayed until the first `Run`, which is left unread; or, for
    // `…-discard`, all of it but the `Run`s after the first.
    let mut from = gateway;
    let mut to = child;
    let mut runs = 0;
    let mut dropping = false;
    loop {
        let run = next_is_run(&from);
        if matches!(mode, Mode::Deaf | Mode::Slow) && run && first(&used) {
            break;
        }
        let Some(frame) = read_frame(&mut from) else {
            std::process::exit(0);
        };
        if mode == Mode::Blind && run {
            first(&used);
            continue;
        }
        if mode == Mode::Discard && run {
            runs += 1;
            dropping = dropping || (runs > 1 && first(&used));
            if dropping {
                continue;
            }
        }
        if to.write_all(&frame).is_err() {
            std::process::exit(0);
        }
    }
    std::thread::spawn(move || {
        let frame = frame_of(&Up::Pong { seq: 0 }).expect("a pong encodes");
        loop {
            std::thread::sleep(Duration::from_millis(1_100));
            let _ = up.lock().unwrap().write_all(&frame);
        }
    });
    let mut some = vec![0u8; 40 << 10];
    loop {
        std::thread::sleep(Duration::from_secs(10));
        if mode == Mode::Slow && from.read_exact(&mut some).is_err() {
            std::process::exit(0);
        }
    }
}

/// What the name of `path` asks for.
fn mode(path: &str) -> Mode {
    match path {
        p if p.ends_with("-deaf") => Mode::Deaf,
        p if p.ends_with("-slow") => Mode::Slow,
        p if p.ends_with("-discard") => Mode::Discard,
        p if p.ends_with("-blind") => Mode::Blind,
        p if p.ends_with("-forge") => Mode::Forge,
        p if p.ends_with("-claim") => Mode::Claim,
        p if p.ends_with("-pad") => Mode::Pad,
        p if p.ends_with("-shout") => Mode::Shout,
        p if p.ends_with("-refuse") => Mode::Refuse,
        p if p.ends_with("-vanish") => Mode::Vanish,
        p if p.ends_with("-burn") => Mode::Burn,
        p if p.ends_with("-hold") => Mode::Hold,
        _ => Mode::Honest,
    }
}

/// Keeps two threads of this process busy for ever.
fn burn() {
    for _ in 0..2 {
        std::thread::spawn(|| {
            loop {
                std::hint::spin_loop();
            }
        });
    }
}

/// `/proc/self/fd/N` of `dir`, a directory this process holds.
fn fd_path(dir: &std::fs::File) -> PathBuf {
    use std::os::fd::AsRawFd;
    PathBuf::from(format!("/proc/self/fd/{}", dir.as_raw_fd()))
}

/// For a `Loaded` of a module found in the zone's cache (`payload`): the
/// frame of a forged one, saying the module was compiled and its code
/// handed over, that code being another artifact of the cache, copied
/// into `work` under its name. `None` for any other message.
fn forged(payload: &[u8], work: &std::path::Path, cache: &std::path::Path) -> Option<Vec<u8>> {
    let Ok(Up::Loaded {
        module,
        result: Ok(mut info),
    }) = proto::decode::<Up>(payload)
    else {
        return None;
    };
    let own = info.artifact.clone().filter(|_| info.from_cache)?;
    let other = std::fs::read_dir(cache.join(&own.engine))
        .ok()?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| *n != *own.handoff_name()))?;
    let bytes = std::fs::read(&other).ok()?;
    let name = other.file_name()?.to_str()?.to_owned();
    // Its directory holds 256 KiB before any job is given room in it: a
    // larger artifact does not fit, and is not forged.
    if std::fs::write(work.join(&name), &bytes).is_err() {
        let _ = std::fs::remove_file(work.join(&name));
        return None;
    }
    info.from_cache = false;
    info.artifact = Some(bulkhead::sandbox::Artifact {
        engine: own.engine,
        sha256: bulkhead::policy::Sha256Hex::digest(&bytes),
        len: bytes.len() as u64,
    });
    frame_of(&Up::Loaded {
        module,
        result: Ok(info),
    })
}

/// For a `Loaded` of a module found in the zone's cache (`payload`): the
/// frame of one saying the module was compiled, nothing handed over.
/// `None` for any other message.
fn claimed(payload: &[u8]) -> Option<Vec<u8>> {
    let Ok(Up::Loaded {
        module,
        result: Ok(mut info),
    }) = proto::decode::<Up>(payload)
    else {
        return None;
    };
    if !info.from_cache {
        return None;
    }
    info.from_cache = false;
    info.artifact = None;
    frame_of(&Up::Loaded {
        module,
        result: Ok(info),
    })
}

/// For a job's report (`payload`): the frame of one whose list of created
/// files has 100,000 made-up ones added. `None` for any other message.
fn padded(payload: &[u8]) -> Option<Vec<u8>> {
    let Ok(Up::Report {
        job,
        result,
        created,
    }) = proto::decode::<Up>(payload)
    else {
        return None;
    };
    let made_up = (0..100_000).map(|ino| bulkhead::sandbox::outputs::FileId {
        dev: 0,
        ino,
        born: (0, 0),
        handle: ino,
    });
    frame_of(&Up::Report {
        job,
        result,
        created: proto::CreatedFiles::pack(created.unpack().into_iter().chain(made_up)),
    })
}

/// For a job's report (`payload`): the frame of a failure to start that
/// job, 100 KiB of control characters long. `None` for any other message.
fn shouted(payload: &[u8]) -> Option<Vec<u8>> {
    let Ok(Up::Report { job, created, .. }) = proto::decode::<Up>(payload) else {
        return None;
    };
    frame_of(&Up::Report {
        job,
        result: Err("\u{1}".repeat(100 << 10)),
        created,
    })
}

/// `message` as a frame: its 4-byte length, then it.
fn frame_of(message: &Up) -> Option<Vec<u8>> {
    let payload = proto::encode(message).ok()?;
    let mut frame = u32::try_from(payload.len()).ok()?.to_be_bytes().to_vec();
    frame.extend_from_slice(&payload);
    Some(frame)
}

/// Whether this is the first worker started from the path to be sent a
/// job: it leaves `used` for the next.
fn first(used: &std::ffi::OsStr) -> bool {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(used)
        .is_ok()
}

/// Whether the next frame from the gateway is a `Run`, looked at without
/// reading it: postcard writes a variant's index first, and `Down::Run` is
/// the third. (Were it not, no `Run` would be withheld, and the tests
/// that use this say so.)
fn next_is_run(from: &UnixStream) -> bool {
    use std::os::fd::AsRawFd;
    const RUN: u8 = 2;
    let mut head = [0u8; 5];
    loop {
        // SAFETY: recv(2) writes at most `head.len()` bytes into `head`.
        let n = unsafe {
            libc::recv(
                from.as_raw_fd(),
                head.as_mut_ptr().cast(),
                head.len(),
                libc::MSG_PEEK,
            )
        };
        match n {
            5 => return head[4] == RUN,
            // Its end: the frame's read says so.
            ..=0 => return false,
            _ => std::thread::sleep(Duration::from_millis(1)),
        }
    }
}

/// One frame, its 4-byte length included; none at the channel's end.
fn read_frame(from: &mut UnixStream) -> Option<Vec<u8>> {
    let mut head = [0u8; 4];
    from.read_exact(&mut head).ok()?;
    let mut frame = head.to_vec();
    frame.resize(4 + u32::from_be_bytes(head) as usize, 0);
    from.read_exact(&mut frame[4..]).ok()?;
    Some(frame)
}
