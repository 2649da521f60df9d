//! Resource exhaustion: memory, CPU, wall time, output streams, disk quota
//! and stack. Most of these modes never end by themselves: the host must
//! stop them with its limits (fuel/epoch, memory limiter, quotas, timeout).

use std::convert::Infallible;
use std::fs::{self, File, OpenOptions};
use std::hint::black_box;
use std::io::{self, Seek, SeekFrom, Write};
use std::process::ExitCode;
use std::time::Duration;

use crate::{Ctx, attempt};

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

/// `memory-held`: take `mib` MiB (default 64) of linear memory, each page
/// touched, then hold it until the job is stopped.
pub fn memory_held(ctx: &Ctx) -> ExitCode {
    let mib: usize = ctx.param("mib").and_then(|v| v.parse().ok()).unwrap_or(64);
    let chunks: Vec<Vec<u8>> = (0..mib).map(|_| black_box(vec![0xA5; MIB])).collect();
    println!("memory-held: {} MiB", chunks.len());
    std::thread::sleep(Duration::from_secs(1_000_000));
    black_box(chunks);
    ExitCode::SUCCESS
}

/// `report-heavy`: 4 MiB of `0x01` to stdout and 4 MiB of `0xFF` to
/// stderr, the bytes whose report text and JSON are largest (six bytes of
/// JSON each, and three of text each).
pub fn report_heavy() -> ExitCode {
    let chunk = vec![0x01u8; MIB];
    let mut out = io::stdout().lock();
    for _ in 0..4 {
        let _ = out.write_all(&chunk);
    }
    let _ = out.flush();
    let chunk = vec![0xFFu8; MIB];
    let mut err = io::stderr().lock();
    for _ in 0..4 {
        let _ = err.write_all(&chunk);
    }
    let _ = err.flush();
    ExitCode::SUCCESS
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
/// (The sandbox refuses a create through a dangling link outright.)
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

// ---------------------------------------------------------------------------
// Meters on the real resource: host descriptors, host CPU, bytes written.
// These talk to WASI directly (the `wasip2` bindings) where std would hide
// the object the attack needs, such as a stream kept after its descriptor.

use wasip2::filesystem::preopens::get_directories;
use wasip2::filesystem::types::{Descriptor, DescriptorFlags, OpenFlags, PathFlags};

/// The preopened directory the guest sees as `name`.
pub fn preopen(name: &str) -> Option<Descriptor> {
    get_directories()
        .into_iter()
        .find(|(_, n)| n == name)
        .map(|(d, _)| d)
}

/// Anything that may hold a host descriptor, kept alive until the end.
type Held = Box<dyn std::any::Any>;

/// Obtains host descriptors with `next` until refused, reports how many it
/// got, holds them for `--hold-ms=` (default 500) so the host can count
/// them, then keeps asking (a job that persists at its bound must be
/// stopped with the `descriptors` limit). Exit 0 if never refused.
fn hold_descriptors(
    ctx: &Ctx,
    name: &str,
    mut next: impl FnMut(u32) -> Result<Vec<Held>, String>,
) -> ExitCode {
    let hold_ms: u64 = ctx
        .param("hold-ms")
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let mut held: Vec<Held> = Vec::new();
    let mut refused = 0u32;
    for n in 0u32..20_000 {
        match next(n) {
            Ok(objects) => held.extend(objects),
            Err(e) => {
                refused += 1;
                if refused == 1 {
                    println!("attempt {name}: err {e} after {n} rounds");
                    println!("{name}: holding {} objects", held.len());
                    std::thread::sleep(Duration::from_millis(hold_ms));
                }
                if refused > 1_000 {
                    break;
                }
            }
        }
    }
    println!("{name}: {refused} refusals, {} objects held", held.len());
    if refused == 0 {
        println!("attempt {name}: ok, never refused");
        std::thread::sleep(Duration::from_millis(hold_ms));
    }
    std::mem::forget(held);
    if refused == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn open_file(dir: &Descriptor, path: &str, write: bool) -> Result<Descriptor, String> {
    let (oflags, flags) = if write {
        (
            OpenFlags::CREATE,
            DescriptorFlags::READ | DescriptorFlags::WRITE,
        )
    } else {
        (OpenFlags::empty(), DescriptorFlags::READ)
    };
    dir.open_at(PathFlags::empty(), path, oflags, flags)
        .map_err(|e| format!("open {path}: {e:?}"))
}

/// `fd-streams`: open a file, take a stream on it, drop the descriptor and
/// keep the stream (which keeps the host file open), alternating reads of
/// `/in/<input>` and writes to `/out/s<n>`.
pub fn fd_streams(ctx: &Ctx) -> ExitCode {
    let (Some(input), Some(out)) = (preopen("/in"), preopen("/out")) else {
        println!("fd-streams: no preopens");
        return ExitCode::from(2);
    };
    let name = first_input(&input);
    hold_descriptors(ctx, "fd-streams", |n| {
        let stream: Held = if n % 2 == 0 && name.is_some() {
            let file = open_file(&input, name.as_deref().unwrap_or(""), false)?;
            Box::new(file.read_via_stream(0).map_err(|e| format!("{e:?}"))?)
        } else {
            let file = open_file(&out, &format!("s{}", n % 4), true)?;
            Box::new(file.write_via_stream(0).map_err(|e| format!("{e:?}"))?)
        };
        // The descriptor is dropped here; only the stream holds the file.
        Ok(vec![stream])
    })
}

/// The name of some file in `dir`.
pub fn first_input(dir: &Descriptor) -> Option<String> {
    let entries = dir.read_directory().ok()?;
    while let Ok(Some(entry)) = entries.read_directory_entry() {
        if entry.name != "." && entry.name != ".." {
            return Some(entry.name);
        }
    }
    None
}

/// `fd-preopens`: open files and, after each, fetch the preopens again and
/// drop them: handles a counter never saw must not give its count back.
pub fn fd_preopens(ctx: &Ctx) -> ExitCode {
    let Some(input) = preopen("/in") else {
        return ExitCode::from(2);
    };
    hold_descriptors(ctx, "fd-preopens", |_| {
        let dir = input
            .open_at(
                PathFlags::empty(),
                ".",
                OpenFlags::DIRECTORY,
                DescriptorFlags::READ,
            )
            .map_err(|e| format!("open /in: {e:?}"))?;
        for _ in 0..4 {
            drop(get_directories());
        }
        Ok(vec![Box::new(dir) as Held])
    })
}

/// `fd-dirs`: open `/in` and `/out` as directories and list each, keeping
/// the descriptors and the listing streams.
pub fn fd_dirs(ctx: &Ctx) -> ExitCode {
    let (Some(input), Some(out)) = (preopen("/in"), preopen("/out")) else {
        return ExitCode::from(2);
    };
    hold_descriptors(ctx, "fd-dirs", |n| {
        let parent = if n % 2 == 0 { &input } else { &out };
        let dir = parent
            .open_at(
                PathFlags::empty(),
                ".",
                OpenFlags::DIRECTORY,
                DescriptorFlags::READ,
            )
            .map_err(|e| format!("open dir: {e:?}"))?;
        let listing = dir.read_directory().map_err(|e| format!("list: {e:?}"))?;
        Ok(vec![Box::new(dir) as Held, Box::new(listing) as Held])
    })
}

/// Builds as deep a tree in `/out` as it is let: a chain of directories
/// made with short paths, each moved into the next (`c<i-1>` to `c<i>/d`),
/// then a descent made through descriptors (make `e`, open it, make `e` in
/// it, ...), then one by paths ending in `/` (`t/`, `t/t/`, ...).
/// `--levels=N` of each (default 40). Prints how far each got.
pub fn deep_tree(ctx: &Ctx) -> ExitCode {
    let levels: usize = ctx
        .param("levels")
        .and_then(|v| v.parse().ok())
        .unwrap_or(40);
    let Some(out) = preopen("/out") else {
        return ExitCode::from(2);
    };
    let mut chained = 0;
    let mut refused_moves = 0;
    for i in 0..levels {
        if out.create_directory_at(&format!("c{i}")).is_err() {
            break;
        }
        if i > 0 {
            match out.rename_at(&format!("c{}", i - 1), &out, &format!("c{i}/d")) {
                Ok(()) => chained += 1,
                Err(_) => refused_moves += 1,
            }
        }
    }
    let mut descended = 0;
    let mut dir = out;
    for _ in 0..levels {
        if dir.create_directory_at("e").is_err() {
            break;
        }
        match dir.open_at(
            PathFlags::empty(),
            "e",
            OpenFlags::DIRECTORY,
            DescriptorFlags::READ | DescriptorFlags::MUTATE_DIRECTORY,
        ) {
            Ok(next) => dir = next,
            Err(_) => break,
        }
        descended += 1;
    }
    // By path, each ending in `/`: `t/`, `t/t/`, ...
    let Some(out) = preopen("/out") else {
        return ExitCode::from(2);
    };
    let mut slashed = 0;
    for i in 1..=levels {
        if out.create_directory_at(&"t/".repeat(i)).is_err() {
            break;
        }
        slashed += 1;
    }
    println!(
        "attempt deep-tree: {chained} moves chained, {refused_moves} refused; {descended} levels descended; {slashed} levels by paths ending in /"
    );
    ExitCode::SUCCESS
}

/// Makes `new` in `/out/c/c/.../c` (24 levels, which the host made
/// before the job): below a directory deeper than the guest could have
/// made. Prints what it was told.
pub fn deep_mkdir() -> ExitCode {
    let Some(out) = preopen("/out") else {
        return ExitCode::from(2);
    };
    let path = format!("{}new", "c/".repeat(24));
    match out.create_directory_at(&path) {
        Ok(()) => println!("attempt deep-mkdir: made"),
        Err(e) => println!("attempt deep-mkdir: refused {e:?}"),
    }
    ExitCode::SUCCESS
}

/// `listings-held`: makes `--entries=` files (default 60) with 200-byte
/// names in `/out/d`, lists that directory `--passes=` times (default
/// 4,000) keeping every listing, then sleeps: each listing is read in full
/// into host memory, held while the guest keeps it.
pub fn listings_held(ctx: &Ctx) -> ExitCode {
    let param = |name: &str, default: usize| {
        ctx.param(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let (entries, passes) = (param("entries", 60), param("passes", 4_000));
    let Some(out) = preopen("/out") else {
        return ExitCode::from(2);
    };
    if let Err(e) = out.create_directory_at("d") {
        println!("listings-held: mkdir: {e:?}");
        return ExitCode::from(2);
    }
    let dir = match out.open_at(
        PathFlags::empty(),
        "d",
        OpenFlags::DIRECTORY,
        DescriptorFlags::READ | DescriptorFlags::MUTATE_DIRECTORY,
    ) {
        Ok(d) => d,
        Err(e) => {
            println!("listings-held: open d: {e:?}");
            return ExitCode::from(2);
        }
    };
    for n in 0..entries {
        let name = format!("{n:0>200}");
        if let Err(e) = open_file(&dir, &name, true) {
            println!("listings-held: {e}");
            return ExitCode::from(2);
        }
    }
    let mut kept = Vec::new();
    let mut refused = 0u64;
    for _ in 0..passes {
        match dir.read_directory() {
            Ok(listing) => kept.push(listing),
            Err(_) => refused += 1,
        }
    }
    println!(
        "attempt listings-held: {} listings of {entries} entries kept, {refused} refused",
        kept.len()
    );
    std::thread::sleep(Duration::from_secs(1_000_000));
    ExitCode::SUCCESS
}

/// `fd-every-way`: all of the above in turn, plus descriptors dropped and
/// opened again, in one job.
pub fn fd_every_way(ctx: &Ctx) -> ExitCode {
    let (Some(input), Some(out)) = (preopen("/in"), preopen("/out")) else {
        return ExitCode::from(2);
    };
    let name = first_input(&input);
    hold_descriptors(ctx, "fd-every-way", |n| {
        // Churn: open and drop at once, which must give back exactly what
        // it took.
        drop(open_file(&out, "churn", true));
        drop(get_directories());
        let held: Held = match n % 4 {
            0 => Box::new(
                open_file(&out, &format!("e{}", n % 8), true)?
                    .append_via_stream()
                    .map_err(|e| format!("{e:?}"))?,
            ),
            1 if name.is_some() => Box::new(
                open_file(&input, name.as_deref().unwrap_or(""), false)?
                    .read_via_stream(0)
                    .map_err(|e| format!("{e:?}"))?,
            ),
            2 => Box::new(
                out.open_at(
                    PathFlags::empty(),
                    ".",
                    OpenFlags::DIRECTORY,
                    DescriptorFlags::READ,
                )
                .map_err(|e| format!("{e:?}"))?,
            ),
            _ => Box::new(open_file(&out, &format!("e{}", n % 8), true)?),
        };
        Ok(vec![held])
    })
}

/// `cpu-huge-poll`: hand the host a poll list of `--entries=` (default
/// 1,000,000) copies of one ready pollable, over and over. Each call costs
/// the guest a few milliseconds and the host far more (lifting every
/// handle, grouping them, lowering the answer).
pub fn cpu_huge_poll(ctx: &Ctx) -> ExitCode {
    let entries: usize = ctx
        .param("entries")
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let ready = wasip2::clocks::monotonic_clock::subscribe_duration(0);
    let list: Vec<&wasip2::io::poll::Pollable> = vec![&ready; entries];
    println!("attempt cpu-huge-poll: polling {entries} entries per call");
    for n in 0u64.. {
        let got = black_box(wasip2::io::poll::poll(&list));
        if n.is_multiple_of(16) {
            println!("cpu-huge-poll: call {n}, {} ready", got.len());
        }
    }
    unreachable!("u64 counter exhausted")
}

/// `cpu-huge-path`: `stat` a `--mib=` (default 16) MiB path, over and over:
/// the host copies and checks the whole string before refusing it.
pub fn cpu_huge_path(ctx: &Ctx) -> ExitCode {
    let mib: usize = ctx.param("mib").and_then(|v| v.parse().ok()).unwrap_or(16);
    let Some(input) = preopen("/in") else {
        return ExitCode::from(2);
    };
    let path = "a".repeat(mib * MIB);
    println!("attempt cpu-huge-path: stat of a {mib} MiB path per call");
    for n in 0u64.. {
        let got = input.stat_at(PathFlags::empty(), black_box(&path));
        if n.is_multiple_of(64) {
            println!("cpu-huge-path: call {n}: {:?}", got.err());
        }
    }
    unreachable!("u64 counter exhausted")
}

/// `cpu-stream-reads`: `--entries=` read streams (default 64) on `/in`'s
/// first file; asks each for 64 KiB (`skip`), then waits on each, over and
/// over (a stream at the end is taken anew), until the job is stopped. A
/// host that reads for the streams in the background, off the guest's
/// thread, does that work uncharged while the guest waits.
pub fn cpu_stream_reads(ctx: &Ctx) -> ExitCode {
    let entries: usize = ctx
        .param("entries")
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    let Some(input) = preopen("/in") else {
        return ExitCode::from(2);
    };
    let Some(name) = first_input(&input) else {
        println!("cpu-stream-reads: no input");
        return ExitCode::from(2);
    };
    let file = match open_file(&input, &name, false) {
        Ok(f) => f,
        Err(e) => {
            println!("cpu-stream-reads: {e}");
            return ExitCode::from(2);
        }
    };
    let stream = || file.read_via_stream(0).expect("read-via-stream");
    let mut streams: Vec<_> = (0..entries).map(|_| stream()).collect();
    println!("attempt cpu-stream-reads: {entries} streams of {name}");
    for round in 0u64.. {
        for s in &mut streams {
            if s.skip(64 * KIB as u64).is_err() {
                *s = stream();
            }
        }
        for s in &streams {
            s.subscribe().block();
        }
        if round.is_multiple_of(1024) {
            println!("cpu-stream-reads: round {round}");
        }
    }
    unreachable!("u64 counter exhausted")
}

/// Rewrites `/out/<name>` in place, 256 KiB at offset 0 then `sync`, for
/// `--passes=` passes (default: until an error).
fn rewrite(ctx: &Ctx, name: &str, mut pass: impl FnMut(&[u8]) -> Result<(), String>) -> ExitCode {
    let passes: u64 = ctx
        .param("passes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX);
    let chunk = vec![0xC3u8; 256 * KIB];
    for n in 0..passes {
        if let Err(e) = pass(&chunk) {
            println!("attempt {name}: err {e} after {n} passes");
            return ExitCode::from(1);
        }
    }
    println!("attempt {name}: ok, {passes} passes");
    ExitCode::SUCCESS
}

/// `disk-rewrite`: seek to 0, write, fsync, forever, through std (a
/// stream at the offset): the file never grows.
pub fn disk_rewrite(ctx: &Ctx) -> ExitCode {
    let Some(mut file) = attempt("create /out/rewrite", File::create("/out/rewrite")) else {
        return ExitCode::from(1);
    };
    rewrite(ctx, "disk-rewrite", |chunk| {
        file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
        file.write_all(chunk).map_err(|e| e.to_string())?;
        file.sync_all().map_err(|e| e.to_string())
    })
}

/// `disk-rewrite-at`: the same with positioned writes (`write` at offset
/// 0 on the descriptor) and `sync`.
pub fn disk_rewrite_at(ctx: &Ctx) -> ExitCode {
    let Some(out) = preopen("/out") else {
        return ExitCode::from(2);
    };
    let file = match open_file(&out, "rewrite-at", true) {
        Ok(f) => f,
        Err(e) => {
            println!("attempt disk-rewrite-at: err {e}");
            return ExitCode::from(1);
        }
    };
    rewrite(ctx, "disk-rewrite-at", |chunk| {
        let mut done = 0;
        while done < chunk.len() {
            done += file
                .write(&chunk[done..], done as u64)
                .map_err(|e| format!("{e:?}"))? as usize;
        }
        file.sync().map_err(|e| format!("{e:?}"))
    })
}

/// `disk-truncate-regrow`: truncate to 0, write again, fsync, forever.
pub fn disk_truncate_regrow(ctx: &Ctx) -> ExitCode {
    let Some(mut file) = attempt("create /out/regrow", File::create("/out/regrow")) else {
        return ExitCode::from(1);
    };
    rewrite(ctx, "disk-truncate-regrow", |chunk| {
        file.set_len(0).map_err(|e| e.to_string())?;
        file.seek(SeekFrom::Start(0)).map_err(|e| e.to_string())?;
        file.write_all(chunk).map_err(|e| e.to_string())?;
        file.sync_all().map_err(|e| e.to_string())
    })
}
