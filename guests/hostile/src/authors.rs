//! Modes for what a plugin author relies on, not attacks: the exact argv a
//! policy's `args` template gives (`argv`), an exit code past 0/1
//! (`exit-code`), a trap with a backtrace to show (`trap`), and the error
//! codes a full `/out` gives through each WASIp2 write path (`full-out`).

use std::process::ExitCode;

use wasip2::filesystem::preopens::get_directories;
use wasip2::filesystem::types::{Descriptor, DescriptorFlags, OpenFlags, PathFlags};

use crate::Ctx;

/// `argv`: prints every argument, `argv[0]` included, one per line as
/// `arg <i> <escaped>`, so a test can check exactly what the guest got.
pub fn argv() -> ExitCode {
    for (i, arg) in std::env::args().enumerate() {
        println!("arg {i} {}", arg.escape_debug());
    }
    ExitCode::SUCCESS
}

/// `exit-code`: exits with `--code=N` (0-255) through
/// `wasi:cli/exit.exit-with-code`, the only way a WASIp2 component can
/// say more than success or failure.
pub fn exit_code(ctx: &Ctx) -> ExitCode {
    let code: u8 = ctx.param("code").and_then(|c| c.parse().ok()).unwrap_or(42);
    println!("exiting with {code}");
    wasip2::cli::exit::exit_with_code(code);
    ExitCode::from(2)
}

/// `trap`: traps (`unreachable`) two named calls deep.
pub fn trap() -> ExitCode {
    authors_trap_outer(std::hint::black_box(3));
    ExitCode::SUCCESS
}

#[inline(never)]
fn authors_trap_outer(n: u32) {
    if std::hint::black_box(n) > 0 {
        authors_trap_inner(n);
    }
}

#[inline(never)]
fn authors_trap_inner(n: u32) {
    if std::hint::black_box(n) > 0 {
        core::arch::wasm32::unreachable();
    }
}

/// `full-out`: fills `/out` past its quota three ways — a positioned
/// `descriptor.write`, an output stream (`write-via-stream`, its error
/// read with `filesystem-error-code`), and `set-size` — and prints the
/// error code each got: `full-out <way>: <code>`.
pub fn full_out() -> ExitCode {
    let Some(out) = get_directories()
        .into_iter()
        .find(|(_, n)| n == "/out")
        .map(|(d, _)| d)
    else {
        return ExitCode::from(2);
    };
    let open = |name: &str| -> Option<Descriptor> {
        out.open_at(
            PathFlags::empty(),
            name,
            OpenFlags::CREATE,
            DescriptorFlags::READ | DescriptorFlags::WRITE,
        )
        .ok()
    };
    let chunk = vec![0x5a_u8; 64 * 1024];
    if let Some(f) = open("by-write") {
        let mut at = 0u64;
        let code = loop {
            match f.write(&chunk, at) {
                Ok(n) => at += n,
                Err(e) => break format!("{e:?}"),
            }
        };
        println!("full-out write: {code}");
    }
    if let Some(f) = open("by-stream")
        && let Ok(stream) = f.write_via_stream(0)
    {
        let code = loop {
            // At most 4096 bytes per call (wasi:io/streams).
            match stream.blocking_write_and_flush(&chunk[..4096]) {
                Ok(()) => {}
                Err(wasip2::io::streams::StreamError::LastOperationFailed(e)) => {
                    break format!("{:?}", wasip2::filesystem::types::filesystem_error_code(&e));
                }
                Err(wasip2::io::streams::StreamError::Closed) => break "closed".to_owned(),
            }
        };
        println!("full-out stream: {code}");
    }
    if let Some(f) = open("by-set-size") {
        let code = match f.set_size(1 << 40) {
            Ok(()) => "ok".to_owned(),
            Err(e) => format!("{e:?}"),
        };
        println!("full-out set-size: {code}");
    }
    ExitCode::from(3)
}
