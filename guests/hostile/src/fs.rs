//! Filesystem escapes: `read-dotdot`, `read-abs`, `symlink-escape`,
//! `write-in` and `leave-links`.
//!
//! The sandbox exposes exactly `/in` (read-only) and `/out` (writable);
//! anything else these modes manage to read is copied to `/out/loot-<n>`.

use std::ffi::{CString, c_char, c_int};
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::process::ExitCode;

use crate::{Ctx, attempt};

/// Directory entries a listing of the sandbox root may legitimately show.
const SANDBOX_ROOT: &[&str] = &["in", "out"];

unsafe extern "C" {
    /// wasi-libc's POSIX `symlink`, which resolves `linkpath` against the
    /// preopens and calls `symlink-at`. Declared by hand because
    /// `std::os::wasi::fs::symlink_path` is still unstable (`wasi_ext`).
    #[link_name = "symlink"]
    fn libc_symlink(target: *const c_char, linkpath: *const c_char) -> c_int;
}

/// Creates the symbolic link `link` with contents `target`.
pub(crate) fn symlink_path(target: &str, link: &str) -> io::Result<()> {
    let target = CString::new(target)?;
    let link = CString::new(link)?;
    // SAFETY: both are valid NUL-terminated strings for the whole call.
    if unsafe { libc_symlink(target.as_ptr(), link.as_ptr()) } == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Very long paths are shortened in reports to keep lines readable.
fn shown(path: &str) -> String {
    if path.len() <= 120 || !path.is_ascii() {
        return path.to_owned();
    }
    format!(
        "{}...{} ({} chars)",
        &path[..48],
        &path[path.len() - 24..],
        path.len()
    )
}

/// Reads `path` as a file; success means a breach, so the bytes are looted.
fn try_read(ctx: &Ctx, path: &str) {
    let name = shown(path);
    match fs::read(path) {
        Ok(bytes) => {
            println!("attempt read {name}: ok {} bytes", bytes.len());
            ctx.loot(&name, &bytes);
        }
        Err(e) => println!("attempt read {name}: err {e}"),
    }
}

/// Lists `path` and prints the entries. Seeing anything beyond `in` and
/// `out` means the guest reached a host directory: the listing is looted.
fn try_list(ctx: &Ctx, path: &str) {
    let Some(entries) = attempt(format!("list {path}"), fs::read_dir(path)) else {
        return;
    };
    let mut names = Vec::new();
    for entry in entries {
        match entry {
            Ok(entry) => names.push(entry.file_name().to_string_lossy().into_owned()),
            Err(e) => println!("  entry error: {e}"),
        }
    }
    names.sort();
    for name in &names {
        println!("  entry {name}");
    }
    if names.iter().any(|n| !SANDBOX_ROOT.contains(&n.as_str())) {
        ctx.loot(&format!("listing of {path}"), names.join("\n").as_bytes());
    }
}

/// `read-dotdot`: climb out of the preopens with `..`.
pub fn read_dotdot(ctx: &Ctx) -> ExitCode {
    for path in [
        "/in/../../etc/passwd",
        "../etc/passwd",
        "/out/../../etc/passwd",
        "/in/../../../../../../../etc/hostname",
        "/in/./../../etc/passwd",
        "/in//..//..//etc//passwd",
    ] {
        try_read(ctx, path);
    }
    // Trailing `/` and `/.` take other paths through path resolution.
    for path in [
        "/in/../../etc/passwd/",
        "/in/../../etc/passwd/.",
        "/in/../../etc/",
        "/in/../../etc/.",
        "/out/../../etc/.",
        "/in/..",
        "/in/../",
        "/in/../.",
        "/in/../..",
        "/out/../",
        "/..",
        "..",
        "../",
        "./..",
    ] {
        try_read(ctx, path);
        try_list(ctx, path);
    }

    if let Some(target) = ctx.param("target") {
        let target = target.trim_start_matches('/');
        for base in ["", "/in/", "/out/"] {
            for n in 1..=12 {
                try_read(ctx, &format!("{base}{}{target}", "../".repeat(n)));
            }
        }
    }

    // 4096 characters of `a/`: past PATH_MAX for many hosts, and a deep
    // climb back out from a directory that does not exist.
    let long = "a/".repeat(2048);
    try_read(ctx, &format!("/in/{long}"));
    try_read(ctx, &format!("/in/{long}{}etc/passwd", "../".repeat(2050)));
    try_read(ctx, &format!("/out/{long}{}etc/passwd", "../".repeat(2050)));
    println!("done");
    ExitCode::SUCCESS
}

/// `read-abs`: plain absolute host paths, which must simply not exist.
pub fn read_abs(ctx: &Ctx) -> ExitCode {
    for path in [
        "/etc/passwd",
        "/proc/self/environ",
        "/proc/self/maps",
        "/etc/hostname",
    ] {
        try_read(ctx, path);
    }
    for path in ["/root", "/", "/tmp", "/proc", "/etc"] {
        try_read(ctx, path);
        try_list(ctx, path);
    }
    if let Some(target) = ctx.param("target") {
        try_read(ctx, target);
        try_list(ctx, target);
    }
    println!("done");
    ExitCode::SUCCESS
}

/// `symlink-escape`: plant symlinks in `/out` that point outside, then
/// follow them.
pub fn symlink_escape(ctx: &Ctx) -> ExitCode {
    let mut links = vec![
        (
            "/out/link-rel".to_owned(),
            "../../../../etc/passwd".to_owned(),
        ),
        ("/out/link-abs".to_owned(), "/etc/passwd".to_owned()),
        ("/out/link-up".to_owned(), "..".to_owned()),
    ];
    if let Some(target) = ctx.param("target") {
        links.push(("/out/link-target".to_owned(), target.to_owned()));
        let up = format!("../../../{}", target.trim_start_matches('/'));
        links.push(("/out/link-target-up".to_owned(), up));
    }
    for (link, target) in &links {
        if attempt(
            format!("symlink {link} -> {target}"),
            symlink_path(target, link),
        )
        .is_some()
        {
            attempt(
                format!("readlink {link}"),
                fs::read_link(link).map(|t| t.display().to_string()),
            )
            .inspect(|t| println!("  points to {t}"));
        }
        try_read(ctx, link);
        try_list(ctx, link);
        // Writing through the link would modify a host file.
        let write = OpenOptions::new()
            .append(true)
            .open(link)
            .and_then(|mut f| f.write_all(b"#"));
        attempt(format!("append through {link}"), write);
    }

    // A link from /out to the sibling /in: reading inputs this way is not a
    // leak in itself (they are readable anyway), but it shows that links may
    // resolve outside the directory they live in.
    let link = "/out/link-in";
    if attempt(
        format!("symlink {link} -> ../in"),
        symlink_path("../in", link),
    )
    .is_some()
    {
        if let Some(entries) = attempt(format!("list {link}"), fs::read_dir(link)) {
            for entry in entries.flatten() {
                let path = format!("{link}/{}", entry.file_name().to_string_lossy());
                let read = fs::read(&path).map(|b| format!("{} bytes", b.len()));
                attempt(format!("read {path}"), read).inspect(|n| println!("  {n}"));
            }
        }
        let write = fs::write(format!("{link}/written-through-link"), b"x");
        attempt(format!("create {link}/written-through-link"), write);
    }
    println!("done");
    ExitCode::SUCCESS
}

/// `write-in`: try to modify the read-only inputs in every way std offers.
pub fn write_in(_ctx: &Ctx) -> ExitCode {
    let mut files = Vec::new();
    if let Some(entries) = attempt("list /in", fs::read_dir("/in")) {
        for entry in entries.flatten() {
            files.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    files.sort();
    for (i, name) in files.iter().enumerate() {
        let path = format!("/in/{name}");
        let open_write = OpenOptions::new().write(true).open(&path);
        if let Some(mut file) = attempt(format!("open {path} for write"), open_write) {
            attempt(format!("write a byte to {path}"), file.write_all(b"X"));
        }
        let open_append = OpenOptions::new().append(true).open(&path);
        if let Some(mut file) = attempt(format!("open {path} for append"), open_append) {
            attempt(format!("append a byte to {path}"), file.write_all(b"X"));
        }
        let open_trunc = OpenOptions::new().write(true).truncate(true).open(&path);
        attempt(format!("open {path} with truncate"), open_trunc);
        let set_len = OpenOptions::new()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_len(0));
        attempt(format!("set_len(0) on {path}"), set_len);
        // Also through a read-only handle: the rights must be on the
        // descriptor, not only checked at open.
        let ro_set_len = fs::File::open(&path).and_then(|f| f.set_len(0));
        attempt(
            format!("set_len(0) on read-only handle of {path}"),
            ro_set_len,
        );

        let link = format!("/out/hardlink-{i}");
        if attempt(
            format!("hard_link {path} -> {link}"),
            fs::hard_link(&path, &link),
        )
        .is_some()
        {
            // A hard link shares the inode: writing it would change the input.
            let write = OpenOptions::new()
                .append(true)
                .open(&link)
                .and_then(|mut f| f.write_all(b"X"));
            attempt(format!("append through {link}"), write);
        }
        attempt(
            format!("rename {path} -> /in/x"),
            fs::rename(&path, "/in/x"),
        );
        attempt(
            format!("rename {path} -> /out/x-{i}"),
            fs::rename(&path, format!("/out/x-{i}")),
        );
        attempt(format!("remove {path}"), fs::remove_file(&path));
    }
    attempt("create /in/new-file", fs::write("/in/new-file", b"new"));
    attempt("create dir /in/new-dir", fs::create_dir("/in/new-dir"));
    println!("done");
    ExitCode::SUCCESS
}

/// `leave-links`: exit leaving dangerous symlinks in `/out`, so the host's
/// collection of outputs must not follow them.
pub fn leave_links(_ctx: &Ctx) -> ExitCode {
    attempt(
        "symlink /out/escape -> ../../../../etc/passwd",
        symlink_path("../../../../etc/passwd", "/out/escape"),
    );
    attempt(
        "symlink /out/abs -> /etc/passwd",
        symlink_path("/etc/passwd", "/out/abs"),
    );
    attempt(
        "symlink /out/in-link -> /in",
        symlink_path("/in", "/out/in-link"),
    );
    attempt("write /out/ok.txt", fs::write("/out/ok.txt", b"ok"));
    println!("done");
    ExitCode::SUCCESS
}
