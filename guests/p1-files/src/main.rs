//! The `p1-files` guest: an ordinary std program with nothing WASI-specific
//! in it, built both for `wasm32-wasip2` (a component) and for
//! `wasm32-wasip1` (a core module the host adapts at load), so the two
//! intakes can be compared on the same source.
//!
//! Modes (`--mode=...`):
//! - `copy` (default): copies every file of `/in` to `/out/<name>`, writes
//!   `/out/summary.txt` (one `name size` line per input, and stdin's
//!   length), and prints one line per input on stdout;
//! - `fill`: writes `/out/fill.bin` in 64 KiB chunks until a write fails,
//!   and prints the error's raw errno and kind (what a toolchain's guest
//!   sees for a full `/out`);
//! - `spin`: burns CPU for ever (the `cpu_time` limit);
//! - `grow`: allocates memory for ever (the `memory` limit).
//!
//! `--nap-ms=N` first sleeps N milliseconds, so a job stays running long
//! enough to be caught running (the multi-node tests).

use std::io::{Read, Write};

fn main() {
    let mode = std::env::args()
        .find_map(|a| a.strip_prefix("--mode=").map(str::to_owned))
        .unwrap_or_else(|| "copy".to_owned());
    if let Some(ms) = std::env::args().find_map(|a| {
        a.strip_prefix("--nap-ms=")
            .and_then(|ms| ms.parse::<u64>().ok())
    }) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    match mode.as_str() {
        "copy" => copy(),
        "fill" => fill(),
        "spin" => spin(),
        "grow" => grow(),
        other => {
            eprintln!("unknown mode {other}");
            std::process::exit(2);
        }
    }
}

fn copy() {
    let mut stdin = Vec::new();
    std::io::stdin()
        .read_to_end(&mut stdin)
        .expect("read stdin");
    let mut names: Vec<String> = std::fs::read_dir("/in")
        .expect("list /in")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    names.sort();
    let mut summary = String::new();
    for name in &names {
        let data = std::fs::read(format!("/in/{name}")).expect("read input");
        std::fs::write(format!("/out/{name}"), &data).expect("write output");
        summary.push_str(&format!("{name} {}\n", data.len()));
        println!("p1-files copied {name} ({} bytes)", data.len());
    }
    summary.push_str(&format!("stdin {}\n", stdin.len()));
    std::fs::write("/out/summary.txt", summary).expect("write summary");
}

fn fill() {
    let mut file = std::fs::File::create("/out/fill.bin").expect("create");
    let chunk = vec![0x5a_u8; 64 * 1024];
    let mut written: u64 = 0;
    loop {
        match file.write(&chunk) {
            Ok(n) => written += n as u64,
            Err(e) => {
                println!(
                    "fill stopped after {written} bytes: errno {} ({:?})",
                    e.raw_os_error().unwrap_or(-1),
                    e.kind()
                );
                std::process::exit(3);
            }
        }
    }
}

fn spin() {
    let mut x: u64 = 1;
    loop {
        x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
    }
}

fn grow() {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        let mut block = vec![0_u8; 1 << 20];
        block[0] = 1;
        hoard.push(std::hint::black_box(block));
    }
}
