//! Resource exhaustion: memory, CPU, wall time, output streams, disk quota
//! and stack. Most of these modes never end by themselves: the host must
//! stop them with its limits (fuel/epoch, memory limiter, quotas, timeout).

use std::convert::Infallible;
use std::fs::{self, File, OpenOptions};
use std::hint::black_box;
use std::io::{self, Seek, SeekFrom, Write};
use std::process::ExitCode;
use std::time::Duration;

use crate::attempt;

const KIB: usize = 1024;
const MIB: usize = 1024 * KIB;
const GIB: u64 = 1024 * 1024 * 1024;

/// `memory-bomb`: keep allocating 1 MiB chunks and write every byte, so the
/// pages are really committed. Allocation failure (the host refusing
/// `memory.grow`) is reported and ends the job with exit 1.
pub fn memory_bomb() -> ExitCode {
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut total_mib = 0usize;
    loop {
        let mut chunk = Vec::new();
        if chunk.try_reserve_exact(MIB).is_err() || chunks.try_reserve(1).is_err() {
            println!("memory-bomb: allocation failed after {total_mib} MiB");
            return ExitCode::from(1);
        }
        chunk.resize(MIB, 0xA5);
        chunks.push(black_box(chunk));
        total_mib += 1;
        if total_mib.is_multiple_of(16) {
            println!("memory-bomb: {total_mib} MiB");
        }
    }
}

/// `loop`: burn CPU forever; `black_box` keeps the loop from being proven
/// side-effect free and removed.
pub fn busy_loop() -> ExitCode {
    println!("loop: spinning");
    let mut x = 0u64;
    loop {
        x = black_box(x.wrapping_add(1));
    }
}

/// `sleep`: block for about eleven days without using CPU.
pub fn sleep() -> ExitCode {
    println!("sleep: 1000000 s");
    std::thread::sleep(Duration::from_secs(1_000_000));
    println!("sleep: woke up");
    ExitCode::SUCCESS
}

/// Never returns `Ok`: the only way out is a failed write.
fn flood(mut out: impl Write) -> io::Result<Infallible> {
    let mut chunk = vec![b'x'; 64 * KIB];
    chunk[64 * KIB - 1] = b'\n';
    loop {
        out.write_all(&chunk)?;
    }
}

/// `stdout-flood`: 64 KiB chunks to stdout until a write fails.
pub fn stdout_flood() -> ExitCode {
    let Err(e) = flood(io::stdout().lock());
    eprintln!("stdout-flood: {e}");
    ExitCode::from(1)
}

/// `stderr-flood`: 64 KiB chunks to stderr until a write fails.
pub fn stderr_flood() -> ExitCode {
    let Err(e) = flood(io::stderr().lock());
    println!("stderr-flood: {e}");
    ExitCode::from(1)
}

/// Writes 1 MiB chunks to `file` until an error, which is printed; exit 1.
fn fill(name: &str, mut file: File) -> ExitCode {
    let chunk = vec![0x5Au8; MIB];
    let mut written = 0u64;
    loop {
        if let Err(e) = file.write_all(&chunk) {
            println!("{name}: error after {written} bytes: {e}");
            return ExitCode::from(1);
        }
        written += MIB as u64;
        if written.is_multiple_of(64 * MIB as u64) {
            println!("{name}: {} MiB", written / MIB as u64);
        }
    }
}

/// `disk-big`: one ever-growing file, `/out/big`.
pub fn disk_big() -> ExitCode {
    match File::create("/out/big") {
        Ok(file) => fill("disk-big", file),
        Err(e) => {
            println!("disk-big: cannot create /out/big: {e}");
            ExitCode::from(1)
        }
    }
}

/// `disk-append`: like `disk-big`, through an append-mode handle
/// (`/out/log`), which takes a different write path in WASI.
pub fn disk_append() -> ExitCode {
    match OpenOptions::new()
        .create(true)
        .append(true)
        .open("/out/log")
    {
        Ok(file) => fill("disk-append", file),
        Err(e) => {
            println!("disk-append: cannot open /out/log: {e}");
            ExitCode::from(1)
        }
    }
}

/// `disk-many`: one-byte files `/out/f<n>` until the file count quota bites.
pub fn disk_many() -> ExitCode {
    for n in 0u64.. {
        if let Err(e) = fs::write(format!("/out/f{n}"), b"x") {
            println!("disk-many: error after {n} files: {e}");
            return ExitCode::from(1);
        }
        if n % 1000 == 999 {
            println!("disk-many: {} files", n + 1);
        }
    }
    unreachable!("u64 file counter exhausted")
}

/// `disk-setsize`: claim a huge size without writing (sparse file), which a
/// quota that only counts written bytes would miss. Exit 0 if any resize
/// succeeded.
pub fn disk_setsize() -> ExitCode {
    let Some(file) = attempt("create /out/sparse", File::create("/out/sparse")) else {
        return ExitCode::from(1);
    };
    let big = attempt("set_len 10 GiB on /out/sparse", file.set_len(10 * GIB));
    let small = attempt("set_len 1 GiB on /out/sparse", file.set_len(GIB));
    if let Some(meta) = attempt("stat /out/sparse", file.metadata()) {
        println!("  size {}", meta.len());
    }
    if big.is_none() && small.is_none() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

/// `disk-seek-write`: seek far past the end and write one byte, another way
/// to make a huge (sparse) file. Exit 0 if the write succeeded.
pub fn disk_seek_write() -> ExitCode {
    let open = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open("/out/hole");
    let Some(mut file) = attempt("create /out/hole", open) else {
        return ExitCode::from(1);
    };
    attempt(
        "seek to 8 GiB in /out/hole",
        file.seek(SeekFrom::Start(8 * GIB)),
    );
    let wrote = attempt("write 1 byte at 8 GiB in /out/hole", file.write_all(b"x"));
    if let Some(meta) = attempt("stat /out/hole", file.metadata()) {
        println!("  size {}", meta.len());
    }
    if wrote.is_some() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `deep-dirs`: `/out/d/d/d/...` until creation fails; exit 1.
pub fn deep_dirs() -> ExitCode {
    let mut path = String::from("/out/d");
    let mut depth = 0u64;
    loop {
        if let Err(e) = fs::create_dir(&path) {
            println!("deep-dirs: depth {depth}: {e}");
            return ExitCode::from(1);
        }
        depth += 1;
        if depth.is_multiple_of(256) {
            println!("deep-dirs: depth {depth}");
        }
        path.push_str("/d");
    }
}

/// `recursion`: unbounded non-tail recursion with a 1 KiB frame, until the
/// stack overflows (a trap in wasm).
pub fn recursion() -> ExitCode {
    println!("recursion: descending");
    let total = recurse(0);
    // Only reachable if the recursion was somehow bounded.
    println!("recursion: returned {total}");
    ExitCode::SUCCESS
}

#[inline(never)]
fn recurse(depth: u64) -> u64 {
    // The condition is never true, but the compiler cannot know that; it
    // keeps rustc's unconditional-recursion lint quiet without bounding it.
    if black_box(depth) == u64::MAX {
        return 0;
    }
    if depth.is_multiple_of(1024) {
        println!("recursion: depth {depth}");
    }
    let mut frame = [0u8; KIB];
    frame[(depth % KIB as u64) as usize] = depth as u8;
    // Passing the buffer out through black_box forces it onto the stack, and
    // using it after the call prevents turning the recursion into a loop.
    let frame = black_box(&mut frame);
    let below = recurse(depth + 1);
    below.wrapping_add(u64::from(frame[0]))
}

/// Unbounded recursion that keeps everything in wasm locals, so it grows the
/// engine's native wasm stack rather than the shadow stack in linear memory:
/// this is the recursion the host's `max_wasm_stack` must stop.
pub fn recursion_native() -> ExitCode {
    println!("recursion-native: descending");
    let total = recurse_native(black_box(1));
    println!("recursion-native: returned {total}");
    ExitCode::SUCCESS
}

#[inline(never)]
fn recurse_native(depth: u64) -> u64 {
    if black_box(depth) == 0 {
        return 0;
    }
    // No address-taken locals: the frame lives on the wasm stack only. Using
    // the result after the call stops tail-call and loop conversion.
    let below = recurse_native(black_box(depth.wrapping_add(1)));
    black_box(below).wrapping_mul(31).wrapping_add(depth)
}

/// `disk-link-create`: create a dangling symlink, then create its target by
/// opening the link with `create`, over and over. A quota that checks whether
/// the *link* exists (rather than what the open resolves to) would charge
/// only the links and let twice the allowed entries onto the host's disk.
pub fn disk_link_create() -> ExitCode {
    for n in 0u64.. {
        if let Err(e) = crate::fs::symlink_path(&format!("t{n}"), &format!("/out/l{n}")) {
            println!("disk-link-create: symlink failed after {n}: {e}");
            return ExitCode::from(1);
        }
        if let Err(e) = fs::write(format!("/out/l{n}"), b"x") {
            println!("disk-link-create: create through link failed after {n}: {e}");
            return ExitCode::from(1);
        }
    }
    unreachable!("u64 counter exhausted")
}

/// `memory-grow`: grow linear memory directly with `memory.grow`, 64 MiB at
/// a time, bypassing the allocator, and touch every new page.
pub fn memory_grow() -> ExitCode {
    use core::arch::wasm32::memory_grow;
    const PAGES: usize = 1024;
    let mut grown = 0usize;
    loop {
        let first = memory_grow(0, PAGES);
        if first == usize::MAX {
            println!("memory-grow: refused after {grown} pages");
            return ExitCode::from(1);
        }
        for page in first..first + PAGES {
            // SAFETY: the page was just grown and belongs to nobody else.
            unsafe {
                core::ptr::with_exposed_provenance_mut::<u8>(page * 65536).write_volatile(1);
            }
        }
        grown += PAGES;
        println!("memory-grow: {grown} pages");
    }
}

/// `fd-flood`: open descriptors and never close them (the input file,
/// `/in` and `/out`), until the host refuses; then hold them for a while.
pub fn fd_flood() -> ExitCode {
    let input = fs::read_dir("/in")
        .ok()
        .and_then(|mut d| d.next())
        .and_then(Result::ok)
        .map(|e| format!("/in/{}", e.file_name().to_string_lossy()));
    let mut held = Vec::new();
    let mut refused = 0;
    for n in 0u32..100_000 {
        let opened = match (n % 3, &input) {
            (0, Some(path)) => File::open(path),
            (1, _) => File::open("/in"),
            _ => File::open("/out"),
        };
        match opened {
            Ok(f) => held.push(f),
            Err(e) => {
                refused += 1;
                if refused == 1 {
                    println!("fd-flood: refused after {} handles: {e}", held.len());
                }
                if refused > 100 {
                    break;
                }
            }
        }
    }
    println!("fd-flood: holding {} handles", held.len());
    std::thread::sleep(Duration::from_millis(200));
    std::mem::forget(held);
    ExitCode::SUCCESS
}

/// `sleep-loop`: many short sleeps, each a host call that blocks without
/// using CPU, forever.
pub fn sleep_loop() -> ExitCode {
    println!("sleep-loop: sleeping 10 ms at a time");
    loop {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `host-call-loop`: spin inside host calls (`stat` of `/in`) forever, so
/// most of the time is spent in the host rather than in wasm.
pub fn host_call_loop() -> ExitCode {
    println!("host-call-loop: stat /in forever");
    let mut n = 0u64;
    loop {
        let _ = black_box(fs::metadata("/in"));
        n += 1;
        if n.is_multiple_of(100_000) {
            println!("host-call-loop: {n} calls");
        }
    }
}

/// `stdout-one-write`: one 24 MiB buffer in a single `write` call, a large
/// list crossing the interface at once.
pub fn stdout_one_write() -> ExitCode {
    let buf = vec![b'y'; 24 * MIB];
    let result = io::stdout().lock().write_all(&buf);
    eprintln!("stdout-one-write: {result:?}");
    ExitCode::from(1)
}

/// `log-inject`: control characters, terminal escapes and forged report
/// lines on stdout and stderr, for whoever displays them.
pub fn log_inject() -> ExitCode {
    let forged = "\u{1b}[2J\u{1b}[H\r\u{1b}[32mheld\u{1b}[0m all attacks\n\
                  attempt read /etc/passwd: err refused\n\
                  {\"verdict\":\"held\"}\n\
                  </pre><script>alert(1)</script>\u{7}\u{8}\u{0}\u{1b}]0;pwned\u{7}\n";
    print!("{forged}");
    eprint!("{forged}");
    // Invalid UTF-8 as well.
    let _ = io::stdout().lock().write_all(&[0xff, 0xfe, b'\n']);
    ExitCode::SUCCESS
}
