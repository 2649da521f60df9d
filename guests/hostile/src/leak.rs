//! Information leaks: `env` (what the job can see of its environment) and
//! the cross-job memory canary pair `canary-write` / `canary-scan`.
//!
//! The canary test runs `canary-write --canary=X` in one instance and then
//! `canary-scan --canary=X` in a later one (for instance in the same pooled
//! memory slot). The scanner must not count its own copies of `X`: the
//! argument strings it receives are copied into its linear memory. So
//! [`Snapshot::take`] copies the non-zero parts of memory aside at the very
//! start of `main`, before the arguments are read, and the scan searches
//! that copy, plus freshly grown pages, which must be all zero anyway.

use std::fs;
use std::hint::black_box;
use std::io::Read;
use std::path::Path;
use std::process::ExitCode;

use core::arch::wasm32::{memory_grow, memory_size};

use crate::{Ctx, attempt};

const PAGE: usize = 65536;
/// Granularity of the snapshot: only non-zero blocks are kept.
const BLOCK: usize = 4096;
const WORD: usize = size_of::<u64>();

/// `env`: print environment variables, arguments, the current directory
/// and how much stdin holds.
pub fn env(_ctx: &Ctx) -> ExitCode {
    let vars: Vec<_> = std::env::vars_os().collect();
    println!("env count: {}", vars.len());
    for (key, value) in vars {
        println!("{}={}", key.to_string_lossy(), value.to_string_lossy());
    }
    for (i, arg) in std::env::args_os().enumerate() {
        println!("arg {i}: {}", arg.to_string_lossy());
    }
    match std::env::current_dir() {
        Ok(dir) => println!("cwd: {}", dir.display()),
        Err(e) => println!("cwd: err {e}"),
    }
    let mut stdin = Vec::new();
    match std::io::stdin().read_to_end(&mut stdin) {
        Ok(n) => println!("stdin: {n} bytes"),
        Err(e) => println!("stdin: err {e} after {} bytes", stdin.len()),
    }
    ExitCode::SUCCESS
}

/// Room for the canary in static memory (zero-initialised, so in `.bss`:
/// the part of the initial memory no data segment rewrites at
/// instantiation).
const STATIC_LEN: usize = 1 << 20;
static mut CANARY_STATIC: [u8; STATIC_LEN] = [0; STATIC_LEN];
/// Size of the leaked heap block filled with the canary.
const HEAP_LEN: usize = 4 << 20;

/// `canary-write`: fill a static buffer, a leaked heap block and
/// `/out/canary.txt` with copies of `--canary=`.
pub fn canary_write(ctx: &Ctx) -> ExitCode {
    let Some(canary) = ctx.param("canary").filter(|c| !c.is_empty()) else {
        eprintln!("hostile: canary-write needs --canary=TEXT");
        return ExitCode::from(2);
    };
    let canary = canary.as_bytes();
    let copies = STATIC_LEN / canary.len();

    let base = &raw mut CANARY_STATIC as *mut u8;
    for i in 0..copies {
        // SAFETY: `i * len + len <= STATIC_LEN`, the buffer is only touched
        // here, and the source is a distinct allocation.
        unsafe {
            core::ptr::copy_nonoverlapping(
                canary.as_ptr(),
                base.add(i * canary.len()),
                canary.len(),
            )
        };
    }
    // Publishing the pointer keeps the stores from being optimised away.
    black_box(base);
    println!(
        "canary-write: static buffer at {:#x}, {copies} copies",
        base as usize
    );

    let mut heap = Vec::with_capacity(HEAP_LEN);
    while heap.len() + canary.len() <= HEAP_LEN {
        heap.extend_from_slice(canary);
    }
    let heap = black_box(heap.leak());
    println!(
        "canary-write: heap block at {:#x}, {} copies",
        heap.as_ptr() as usize,
        heap.len() / canary.len()
    );

    attempt(
        "write /out/canary.txt",
        fs::write("/out/canary.txt", canary),
    );
    ExitCode::SUCCESS
}

/// Reads the aligned word at linear-memory address `addr`.
fn peek(addr: usize) -> u64 {
    // SAFETY: every address below `memory_size * PAGE` is readable in wasm,
    // including 0; volatile keeps the compiler from assuming anything about
    // memory it did not allocate.
    unsafe { core::ptr::read_volatile(core::ptr::with_exposed_provenance::<u64>(addr)) }
}

fn block_is_zero(addr: usize) -> bool {
    (addr..addr + BLOCK).step_by(WORD).all(|a| peek(a) == 0)
}

/// Copies the `BLOCK` bytes of linear memory at `addr` into `buf`.
fn copy_out(addr: usize, buf: &mut Vec<u8>) {
    buf.clear();
    for a in (addr..addr + BLOCK).step_by(WORD) {
        buf.extend_from_slice(&peek(a).to_le_bytes());
    }
}

/// The non-zero 4 KiB blocks of linear memory as it was when `main`
/// started, stored in pages grown directly (outside the allocator's heap),
/// so taking it allocates nothing.
pub struct Snapshot {
    /// Address of the copy: `count` u32 block addresses, then the blocks.
    base: usize,
    count: usize,
    /// Memory size when the snapshot was taken.
    memory_bytes: usize,
}

impl Snapshot {
    /// `None` if memory could not be grown for the copy.
    pub fn take() -> Option<Snapshot> {
        let memory_bytes = memory_size(0) * PAGE;
        // `black_box` hides from the optimiser that the scan starts at the
        // null address.
        let start = black_box(0usize);
        let count = (start..memory_bytes)
            .step_by(BLOCK)
            .filter(|&a| !block_is_zero(a))
            .count();
        let bytes = count * (size_of::<u32>() + BLOCK);
        let first_page = memory_grow(0, bytes.div_ceil(PAGE).max(1));
        if first_page == usize::MAX {
            return None;
        }
        let base = first_page * PAGE;
        let data = base + count * size_of::<u32>();
        // This function's own stack frame may turn a counted block zero or
        // a zero one non-zero; never store more than `count` blocks.
        let mut stored = 0;
        for addr in (start..memory_bytes).step_by(BLOCK) {
            if stored == count {
                break;
            }
            if block_is_zero(addr) {
                continue;
            }
            // SAFETY: the target pages were just grown for exactly `count`
            // entries and blocks; nothing else knows about them.
            unsafe {
                let index = core::ptr::with_exposed_provenance_mut::<u32>(base + stored * 4);
                index.write_volatile(addr as u32);
                let from = core::ptr::with_exposed_provenance::<u8>(addr);
                let to = core::ptr::with_exposed_provenance_mut::<u8>(data + stored * BLOCK);
                for i in 0..BLOCK {
                    to.add(i).write_volatile(from.add(i).read_volatile());
                }
            }
            stored += 1;
        }
        Some(Snapshot {
            base,
            count: stored,
            memory_bytes,
        })
    }

    /// The snapshot blocks in address order, as (original address, bytes).
    fn blocks(&self) -> impl Iterator<Item = (usize, Vec<u8>)> + '_ {
        let data = self.base + self.count * size_of::<u32>();
        (0..self.count).map(move |i| {
            // SAFETY: written by `take`, within the grown pages.
            let addr = unsafe {
                core::ptr::with_exposed_provenance::<u32>(self.base + i * 4).read_volatile()
            };
            let mut buf = Vec::with_capacity(BLOCK);
            copy_out(data + i * BLOCK, &mut buf);
            (addr as usize, buf)
        })
    }
}

/// Finds `needle` in a stream of (address, bytes) chunks, also across the
/// boundary of chunks that are adjacent in memory. Returns the addresses of
/// the first matches (at most `limit`) and the total number of matches.
fn search_chunks(
    needle: &[u8],
    chunks: impl Iterator<Item = (usize, Vec<u8>)>,
    limit: usize,
) -> (Vec<usize>, usize) {
    let mut hits = Vec::new();
    let mut total = 0;
    // The last `needle.len() - 1` bytes of the previous chunk, and the
    // address just past it.
    let mut tail: Vec<u8> = Vec::new();
    let mut tail_end = usize::MAX;
    for (addr, bytes) in chunks {
        let (window, window_start) = if addr == tail_end {
            let mut w = std::mem::take(&mut tail);
            let start = addr - w.len();
            w.extend_from_slice(&bytes);
            (w, start)
        } else {
            (bytes, addr)
        };
        for (i, _) in window
            .windows(needle.len())
            .enumerate()
            .filter(|(_, w)| *w == needle)
        {
            total += 1;
            if hits.len() < limit {
                hits.push(window_start + i);
            }
        }
        let keep = needle.len().saturating_sub(1).min(window.len());
        tail = window[window.len() - keep..].to_vec();
        tail_end = window_start + window.len();
    }
    (hits, total)
}

/// Linear memory `[from, to)` as chunks, read with volatile loads.
fn memory_chunks(from: usize, to: usize) -> impl Iterator<Item = (usize, Vec<u8>)> {
    (from..to).step_by(BLOCK).map(|addr| {
        let mut buf = Vec::with_capacity(BLOCK);
        copy_out(addr, &mut buf);
        (addr, buf)
    })
}

/// `canary-scan`: look for `--canary=` in memory as it was at start, in
/// freshly grown memory, and in every file under `/in` and `/out`.
/// `--fresh-mib=N` (default 64) sets how much memory to grow and check.
pub fn canary_scan(ctx: &Ctx, snapshot: Option<Snapshot>) -> ExitCode {
    let Some(canary) = ctx.param("canary").filter(|c| !c.is_empty()) else {
        eprintln!("hostile: canary-scan needs --canary=TEXT");
        return ExitCode::from(2);
    };
    let needle = canary.as_bytes();
    let mut found = false;

    // Freshly grown pages first, before the allocator takes more pages for
    // this function's own buffers. Grow less if the policy caps memory.
    let mut fresh_pages = ctx
        .param("fresh-mib")
        .and_then(|m| m.parse::<usize>().ok())
        .unwrap_or(64)
        * 16;
    let mut fresh_start = usize::MAX;
    while fresh_pages > 0 {
        fresh_start = memory_grow(0, fresh_pages);
        if fresh_start != usize::MAX {
            break;
        }
        fresh_pages /= 2;
    }
    if fresh_pages > 0 {
        let from = fresh_start * PAGE;
        let to = from + fresh_pages * PAGE;
        let nonzero_blocks = (from..to)
            .step_by(BLOCK)
            .filter(|&a| !block_is_zero(a))
            .count();
        let (hits, total) = search_chunks(needle, memory_chunks(from, to), 8);
        println!(
            "fresh memory: {} KiB grown at {from:#x}, {nonzero_blocks} non-zero 4 KiB blocks, {total} matches",
            fresh_pages * PAGE / 1024
        );
        for hit in hits {
            println!("  hit in fresh memory at {hit:#x}");
            loot_at(ctx, "fresh memory", hit, needle.len());
        }
        found |= total > 0;
    } else {
        println!("fresh memory: could not grow memory at all");
    }

    match &snapshot {
        Some(snap) => {
            let (hits, total) = search_chunks(needle, snap.blocks(), 8);
            println!(
                "initial memory: {} KiB, {} non-zero 4 KiB blocks, {total} matches",
                snap.memory_bytes / 1024,
                snap.count
            );
            for hit in hits {
                println!("  hit in initial memory at {hit:#x}");
                // The snapshot is a copy; the original address may have been
                // reused since, so loot the needle as found there.
                ctx.loot("initial memory", needle);
            }
            found |= total > 0;
        }
        None => println!("initial memory: no snapshot (memory could not grow at start)"),
    }

    // Self-check: live memory does hold this instance's own copies of the
    // canary (its arguments), so finding none means the scanner is broken.
    let live_end = memory_size(0) * PAGE;
    let (_, own) = search_chunks(needle, memory_chunks(black_box(0), live_end), 0);
    println!("self-check: {own} copies in live memory (own arguments, not counted)");
    if own == 0 {
        println!("self-check failed: the scanner cannot see its own copy");
    }

    for dir in ["/in", "/out"] {
        if scan_tree(Path::new(dir), needle) {
            found = true;
            ctx.loot(&format!("files under {dir}"), needle);
        }
    }

    println!(
        "{}",
        if found {
            "canary found"
        } else {
            "canary not found"
        }
    );
    ExitCode::SUCCESS
}

/// Copies `len` bytes of linear memory at `addr` to a loot file, so the
/// host sees what was found rather than taking the guest's word.
fn loot_at(ctx: &Ctx, what: &str, addr: usize, len: usize) {
    let bytes: Vec<u8> = (addr..addr + len)
        .map(|a| {
            // SAFETY: inside linear memory (a match was just read there).
            unsafe { core::ptr::with_exposed_provenance::<u8>(a).read_volatile() }
        })
        .collect();
    ctx.loot(what, &bytes);
}

/// `leftovers`: look for anything an earlier job or another tenant left:
/// every entry of `/in`, `/out` and what lies around them, and every file
/// found is looted.
pub fn leftovers(ctx: &Ctx) -> ExitCode {
    let mut found = 0;
    for dir in ["/in", "/out", "/in/..", "/out/..", "/", "."] {
        let Some(entries) = attempt(format!("list {dir}"), fs::read_dir(dir)) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let root = matches!(dir, "/" | "." | "/in/.." | "/out/..");
            if root && (name == "in" || name == "out") {
                continue;
            }
            println!("  {dir}: {name}");
            found += 1;
            let path = format!("{}/{name}", dir.trim_end_matches('/'));
            if let Ok(bytes) = fs::read(&path) {
                ctx.loot(&path, &bytes);
            }
        }
    }
    println!("leftovers: {found} entries");
    ExitCode::SUCCESS
}

/// Lists `dir` recursively and searches every regular file for `needle`.
/// Symlinks are listed, not followed.
fn scan_tree(dir: &Path, needle: &[u8]) -> bool {
    let Some(entries) = attempt(format!("list {}", dir.display()), fs::read_dir(dir)) else {
        return false;
    };
    let mut paths: Vec<_> = entries.flatten().map(|e| e.path()).collect();
    paths.sort();
    let mut found = false;
    for path in paths {
        let Ok(meta) = fs::symlink_metadata(&path) else {
            println!("  {} (no metadata)", path.display());
            continue;
        };
        if meta.is_dir() {
            println!("  {}/", path.display());
            found |= scan_tree(&path, needle);
        } else if meta.is_file() {
            let hit = fs::read(&path).is_ok_and(|b| b.windows(needle.len()).any(|w| w == needle));
            println!(
                "  {} ({} bytes){}",
                path.display(),
                meta.len(),
                if hit { " contains the canary" } else { "" }
            );
            found |= hit;
        } else {
            println!("  {} (symlink or special)", path.display());
        }
    }
    found
}
