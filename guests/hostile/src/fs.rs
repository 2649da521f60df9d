//! Filesystem escapes: `read-dotdot`, `read-abs`, `symlink-escape`,
//! `write-in` and `leave-links`; and traps for output collection:
//! `out-deep` (paths past `PATH_MAX`) and `out-names` (hostile names).
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

/// `read-dotdot`: climb out of the preopens with `..`, every variant below.
pub fn read_dotdot(ctx: &Ctx) -> ExitCode {
    dotdot_plain(ctx);
    dotdot_trailing(ctx);
    dotdot_target(ctx);
    dotdot_long(ctx);
    println!("done");
    ExitCode::SUCCESS
}

/// `read-dotdot-plain`: short `..` chains from each preopen.
pub fn read_dotdot_plain(ctx: &Ctx) -> ExitCode {
    dotdot_plain(ctx);
    println!("done");
    ExitCode::SUCCESS
}

/// `read-trailing`: `..` paths ending in `/` or `/.`, read and listed.
pub fn read_trailing(ctx: &Ctx) -> ExitCode {
    dotdot_trailing(ctx);
    println!("done");
    ExitCode::SUCCESS
}

/// `read-climb`: climb to `--target` (a host path) from every preopen with
/// 1 to 12 `../`.
pub fn read_climb(ctx: &Ctx) -> ExitCode {
    dotdot_target(ctx);
    println!("done");
    ExitCode::SUCCESS
}

/// `read-long`: paths longer than `PATH_MAX` that climb back out.
pub fn read_long(ctx: &Ctx) -> ExitCode {
    dotdot_long(ctx);
    println!("done");
    ExitCode::SUCCESS
}

fn dotdot_plain(ctx: &Ctx) {
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
}

fn dotdot_trailing(ctx: &Ctx) {
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
}

fn dotdot_target(ctx: &Ctx) {
    if let Some(target) = ctx.param("target") {
        let target = target.trim_start_matches('/');
        for base in ["", "/in/", "/out/"] {
            for n in 1..=12 {
                try_read(ctx, &format!("{base}{}{target}", "../".repeat(n)));
            }
        }
    }
}

fn dotdot_long(ctx: &Ctx) {
    // 4096 characters of `a/`: past PATH_MAX for many hosts, and a deep
    // climb back out from a directory that does not exist.
    let long = "a/".repeat(2048);
    try_read(ctx, &format!("/in/{long}"));
    try_read(ctx, &format!("/in/{long}{}etc/passwd", "../".repeat(2050)));
    try_read(ctx, &format!("/out/{long}{}etc/passwd", "../".repeat(2050)));
    // The same climb through directories that do exist.
    let mut real = String::from("/out");
    for _ in 0..8 {
        real.push_str("/d");
        attempt(format!("create dir {real}"), fs::create_dir(&real));
    }
    try_read(ctx, &format!("{real}/{}etc/passwd", "../".repeat(12)));
    if let Some(target) = ctx.param("target") {
        let target = target.trim_start_matches('/');
        try_read(ctx, &format!("{real}/{}{target}", "../".repeat(64)));
        try_read(ctx, &format!("/in/{long}{}{target}", "../".repeat(2100)));
    }
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
/// collection of outputs must not follow them. With `--target=`, links to
/// that host path too (absolute, and relative at several depths).
pub fn leave_links(ctx: &Ctx) -> ExitCode {
    if let Some(target) = ctx.param("target") {
        attempt(
            format!("symlink /out/target-abs -> {target}"),
            symlink_path(target, "/out/target-abs"),
        );
        for n in [2, 4, 8] {
            let rel = format!("{}{}", "../".repeat(n), target.trim_start_matches('/'));
            attempt(
                format!("symlink /out/target-up{n} -> {rel}"),
                symlink_path(&rel, &format!("/out/target-up{n}")),
            );
        }
    }
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

/// `symlink-loop`: leave links that loop (`a -> b -> a`, `self -> .`,
/// `up -> ..`) and a directory whose entry links back to its parent, so a
/// host that walks `/out` following links would never finish.
pub fn symlink_loop(_ctx: &Ctx) -> ExitCode {
    for (target, link) in [
        ("b", "/out/a"),
        ("a", "/out/b"),
        (".", "/out/self"),
        ("..", "/out/up"),
        ("/out", "/out/root"),
    ] {
        attempt(
            format!("symlink {link} -> {target}"),
            symlink_path(target, link),
        );
    }
    attempt("create dir /out/d", fs::create_dir("/out/d"));
    attempt(
        "symlink /out/d/back -> ..",
        symlink_path("..", "/out/d/back"),
    );
    // Following the loop from inside must fail too, not hang.
    attempt("read /out/a", fs::read("/out/a"));
    attempt(
        "list /out/self/self/self",
        fs::read_dir("/out/self/self/self"),
    );
    attempt("write /out/ok.txt", fs::write("/out/ok.txt", b"ok"));
    println!("done");
    ExitCode::SUCCESS
}

/// `rename-escape`: move files and directories across and out of the
/// preopens with `rename`.
pub fn rename_escape(_ctx: &Ctx) -> ExitCode {
    attempt("write /out/x", fs::write("/out/x", b"x"));
    attempt("create dir /out/dir", fs::create_dir("/out/dir"));
    for (from, to) in [
        ("/out/x", "/out/../x"),
        ("/out/x", "../x"),
        ("/out/x", "/in/x"),
        ("/out/x", "/out/../../tmp/x"),
        ("/out/dir", "/in/dir"),
        ("/out/dir", "/out/../dir"),
        ("/out", "/in/out"),
        ("/in", "/out/in"),
        ("/out/x", "/x"),
    ] {
        attempt(format!("rename {from} -> {to}"), fs::rename(from, to));
    }
    println!("done");
    ExitCode::SUCCESS
}

/// `hardlink`: hard-link inputs and outputs across preopens and out of
/// them (a hard link aliases an inode: writing it writes the original).
pub fn hardlink(_ctx: &Ctx) -> ExitCode {
    let mut inputs = Vec::new();
    if let Some(entries) = attempt("list /in", fs::read_dir("/in")) {
        inputs.extend(
            entries
                .flatten()
                .map(|e| format!("/in/{}", e.file_name().to_string_lossy())),
        );
    }
    attempt("write /out/own", fs::write("/out/own", b"own"));
    let mut pairs: Vec<(String, String)> = inputs
        .iter()
        .enumerate()
        .map(|(i, p)| (p.clone(), format!("/out/link-{i}")))
        .collect();
    pairs.push(("/out/own".into(), "/in/own".into()));
    pairs.push(("/out/own".into(), "/out/../own".into()));
    pairs.push(("/out/own".into(), "/out/own-2".into()));
    for (from, to) in &pairs {
        if attempt(format!("hard_link {from} -> {to}"), fs::hard_link(from, to)).is_some() {
            let write = OpenOptions::new()
                .append(true)
                .open(to)
                .and_then(|mut f| f.write_all(b"X"));
            attempt(format!("append through {to}"), write);
        }
    }
    println!("done");
    ExitCode::SUCCESS
}

/// `proc-dev`: the host's special filesystems and descriptor paths.
pub fn proc_dev(ctx: &Ctx) -> ExitCode {
    for path in [
        "/proc/self/environ",
        "/proc/self/cmdline",
        "/proc/self/mem",
        "/proc/self/fd/0",
        "/proc/self/fd/3",
        "/proc/self/root/etc/passwd",
        "/proc/1/environ",
        "/dev/mem",
        "/dev/shm",
        "/sys/kernel/hostname",
        "/in/../proc/self/environ",
        "/out/../../proc/self/cwd/Cargo.toml",
    ] {
        try_read(ctx, path);
    }
    for path in ["/proc/self/fd", "/dev", "/sys", "/dev/shm"] {
        try_list(ctx, path);
    }
    println!("done");
    ExitCode::SUCCESS
}

/// `harvest`: walk everything reachable from the root, `.`, `/in` and
/// `/out`, and loot every file that is not one of its own inputs.
pub fn harvest(ctx: &Ctx) -> ExitCode {
    let mut seen = 0;
    for root in ["/", ".", "/in", "/out", "/in/..", "/out/.."] {
        walk(ctx, root, 0, &mut seen);
    }
    println!("harvest: {seen} entries");
    println!("done");
    ExitCode::SUCCESS
}

fn walk(ctx: &Ctx, dir: &str, depth: usize, seen: &mut usize) {
    if depth > 6 || *seen > 2000 {
        return;
    }
    let Some(entries) = attempt(format!("list {dir}"), fs::read_dir(dir)) else {
        return;
    };
    for entry in entries.flatten() {
        *seen += 1;
        let path = format!(
            "{}/{}",
            dir.trim_end_matches('/'),
            entry.file_name().to_string_lossy()
        );
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.is_dir() {
            if !["in", "out"].contains(&entry.file_name().to_string_lossy().as_ref()) || depth > 0 {
                walk(ctx, &path, depth + 1, seen);
            }
        } else if meta.is_file() && !path.contains("/in/") && !path.contains("/out/") {
            // Anything readable outside the job's own directories is loot.
            try_read(ctx, &path);
        }
    }
}

/// A 255-byte name (the longest most filesystems allow) ending in `n`.
fn long_name(n: usize) -> String {
    format!("{n:_>255}")
}

/// `out-deep`: leave a tree in `/out` whose paths are too long for the host
/// to name by path, so a host copying outputs by path fails. Built
/// bottom-up with renames, so no path the guest uses is long. `--shape=`:
/// - `deep-long` (default): 15 directories of 255-byte names, a file of a
///   255-byte name at the bottom: 4095 bytes below `/out`;
/// - `files-each-level`: 7 such directories with a file at each level;
/// - `long-top`: one file of a 255-byte name at the top, and a 3-level
///   chain with a file at the bottom.
pub fn out_deep(ctx: &Ctx) -> ExitCode {
    let shape = ctx.param("shape").unwrap_or("deep-long");
    let (levels, file_each_level) = match shape {
        "deep-long" => (15, false),
        "files-each-level" => (7, true),
        "long-top" => {
            attempt(
                "write /out/<255-byte name>",
                fs::write(format!("/out/{}", long_name(0)), b"top"),
            );
            (3, false)
        }
        other => {
            println!("out-deep: unknown shape {other:?}");
            return ExitCode::from(2);
        }
    };
    if attempt("mkdir /out/t0", fs::create_dir("/out/t0")).is_none() {
        return ExitCode::from(1);
    }
    attempt(
        "write the bottom file",
        fs::write(format!("/out/t0/{}", long_name(999)), b"bottom"),
    );
    for i in 1..levels {
        attempt(
            format!("mkdir /out/t{i}"),
            fs::create_dir(format!("/out/t{i}")),
        );
        if file_each_level {
            attempt(
                format!("write a file at level {i}"),
                fs::write(format!("/out/t{i}/{}", long_name(500 + i)), b"level"),
            );
        }
        attempt(
            format!("rename /out/t{} into /out/t{i}", i - 1),
            fs::rename(
                format!("/out/t{}", i - 1),
                format!("/out/t{i}/{}", long_name(i)),
            ),
        );
    }
    attempt(
        "rename the chain's top to a 255-byte name",
        fs::rename(
            format!("/out/t{}", levels - 1),
            format!("/out/{}", long_name(levels)),
        ),
    );
    println!("done");
    ExitCode::SUCCESS
}

/// Output names with control characters: CR, LF, ESC, TAB, DEL, U+0085.
pub const CONTROL_NAMES: &[&str] = &[
    "cr\rname.txt",
    "lf\nname.txt",
    "esc\u{1b}[31mred.txt",
    "tab\tname.txt",
    "del\u{7f}name.txt",
    "nel\u{85}name.txt",
];

/// Output names with bidirectional and invisible controls (U+202E,
/// U+2066, U+200E, U+200F, U+FEFF), a quote and a backslash, and the
/// printable but special `%`, `;` and `'`.
pub const FORMAT_NAMES: &[&str] = &[
    "rlo\u{202e}txt.exe",
    "lri\u{2066}name.txt",
    "lrm\u{200e}name.txt",
    "rlm\u{200f}name.txt",
    "bom\u{feff}name.txt",
    "quote\"name.txt",
    "back\\slash.txt",
    "percent%2e%2e.txt",
    "semi;colon.txt",
    "apos'name.txt",
];

/// `out-wait`: write `/out/own.txt`, then wait (up to 120 s) until a
/// file named `go` appears in `/out` (put there from outside); then write
/// `/out/late.txt` as an ordinary result file is written (a create that
/// truncates whatever is at the name), read every other file in `/in` and
/// `/out` (one directory down) and print what it read, and exit 0.
pub fn out_wait() -> ExitCode {
    attempt("write /out/own.txt", fs::write("/out/own.txt", b"own"));
    for _ in 0..2400 {
        if fs::symlink_metadata("/out/go").is_ok() {
            attempt(
                "write /out/late.txt",
                fs::write("/out/late.txt", b"this job's late bytes"),
            );
            for path in ["/in", "/out"].iter().flat_map(|d| files_below(d, 1)) {
                if path.ends_with("/own.txt") || path.ends_with("/go") {
                    continue;
                }
                match fs::read(&path) {
                    Ok(bytes) => {
                        println!("out-wait read {path}: {}", String::from_utf8_lossy(&bytes))
                    }
                    Err(e) => println!("out-wait cannot read {path}: {:?}", e.kind()),
                }
            }
            println!("out-wait: go");
            return ExitCode::SUCCESS;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    println!("out-wait: no go");
    ExitCode::from(1)
}

/// `open-race`: write `/out/own.txt`, wait for `/out/go`, then open
/// `/out/x` to read, again and again, until `/out/stop` appears (while
/// someone else swaps a FIFO and a regular file at `x`). Prints how the
/// opens went. `--op=set-times`: set the times of `/out/x` (following
/// symlinks), by name and through a descriptor opened on it, instead of
/// opening it, after setting those of a directory it makes and of `/out`
/// itself. `--name=`: another name than `x`.
pub fn open_race(ctx: &Ctx) -> ExitCode {
    use wasip2::filesystem::types::{
        DescriptorFlags, ErrorCode, NewTimestamp, OpenFlags, PathFlags,
    };
    // Set the times of `at` (under `/out`) by name, then through a
    // descriptor opened on it: `Ok` if either did.
    let set_both = |out: &wasip2::filesystem::types::Descriptor, at: &str| {
        let by_name = out.set_times_at(
            PathFlags::SYMLINK_FOLLOW,
            at,
            NewTimestamp::NoChange,
            NewTimestamp::Now,
        );
        let by_descriptor = out
            .open_at(
                PathFlags::SYMLINK_FOLLOW,
                at,
                OpenFlags::empty(),
                DescriptorFlags::READ,
            )
            .and_then(|d| d.set_times(NewTimestamp::NoChange, NewTimestamp::Now));
        by_name.or(by_descriptor)
    };
    let set_times = match ctx.param("op").unwrap_or("open") {
        "open" => false,
        "set-times" => true,
        other => {
            println!("open-race: unknown op {other:?}");
            return ExitCode::from(2);
        }
    };
    let Some(out) = crate::exhaust::preopen("/out") else {
        println!("open-race: no /out");
        return ExitCode::from(1);
    };
    let name = ctx.param("name").unwrap_or("x");
    attempt("write /out/own.txt", fs::write("/out/own.txt", b"own"));
    if set_times {
        attempt("mkdir /out/own-dir", fs::create_dir("/out/own-dir"));
        for own in ["own-dir", "."] {
            let by_name = out.set_times_at(
                PathFlags::SYMLINK_FOLLOW,
                own,
                NewTimestamp::NoChange,
                NewTimestamp::Now,
            );
            println!("open-race: set-times {own}: {by_name:?}");
            let by_descriptor = out
                .open_at(
                    PathFlags::SYMLINK_FOLLOW,
                    own,
                    OpenFlags::empty(),
                    DescriptorFlags::READ,
                )
                .and_then(|d| d.set_times(NewTimestamp::NoChange, NewTimestamp::Now));
            println!("open-race: set-times on a descriptor of {own}: {by_descriptor:?}");
        }
    }
    while fs::symlink_metadata("/out/go").is_err() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let (mut opened, mut refused, mut other) = (0u64, 0u64, 0u64);
    for round in 0u64.. {
        if round % 64 == 0 && fs::symlink_metadata("/out/stop").is_ok() {
            break;
        }
        let outcome = if set_times {
            // Each metadata change is charged to the written bound.
            std::thread::sleep(std::time::Duration::from_millis(1));
            set_both(&out, name).map_err(|e| e == ErrorCode::Access)
        } else {
            fs::File::open(format!("/out/{name}"))
                .map(drop)
                .map_err(|e| e.kind() == io::ErrorKind::PermissionDenied)
        };
        match outcome {
            Ok(()) => opened += 1,
            Err(true) => refused += 1,
            Err(false) => other += 1,
        }
    }
    println!("open-race: opened {opened}, refused {refused}, other {other}");
    ExitCode::SUCCESS
}

/// `out-names`: leave files with hostile names in `/out`, plus `ok.txt`.
/// `--set=controls` (default): [`CONTROL_NAMES`], and a directory named
/// `dir<LF>name` with a file inside; `--set=format`: [`FORMAT_NAMES`].
/// `--linger=<ms>`: sleep that long before exiting.
pub fn out_names(ctx: &Ctx) -> ExitCode {
    let names = match ctx.param("set").unwrap_or("controls") {
        "controls" => CONTROL_NAMES,
        "format" => FORMAT_NAMES,
        other => {
            println!("out-names: unknown set {other:?}");
            return ExitCode::from(2);
        }
    };
    for name in names {
        attempt(
            format!("write /out/{}", name.escape_debug()),
            fs::write(format!("/out/{name}"), b"x"),
        );
    }
    if names == CONTROL_NAMES
        && attempt("mkdir /out/dir\\nname", fs::create_dir("/out/dir\nname")).is_some()
    {
        attempt(
            "write /out/dir\\nname/inner.txt",
            fs::write("/out/dir\nname/inner.txt", b"inner"),
        );
    }
    attempt("write /out/ok.txt", fs::write("/out/ok.txt", b"ok"));
    // `--linger=<ms>`: stay a while, so a test can act while the job runs.
    if let Some(ms) = ctx.param("linger").and_then(|v| v.parse().ok()) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
    println!("done");
    ExitCode::SUCCESS
}

/// The files under `dir`, and `depth` directories further down, by path.
fn files_below(dir: &str, depth: u32) -> Vec<String> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = format!("{dir}/{}", entry.file_name().to_string_lossy());
        match entry.file_type() {
            Ok(t) if t.is_dir() && depth > 0 => found.extend(files_below(&path, depth - 1)),
            Ok(t) if t.is_dir() => {}
            _ => found.push(path),
        }
    }
    found
}

/// `every-call`: every `wasi:filesystem` call on every kind of descriptor a
/// guest holds (`/in`, `/out`, a file and a directory it makes, an input
/// file when it has one), with every advice, and the streams, clocks,
/// randomness and terminal queries beside: each answered (an error is an
/// answer), none ending the process that runs the guest. Prints each call
/// and what it got.
pub fn every_call(_ctx: &Ctx) -> ExitCode {
    use wasip2::filesystem::types::{
        Advice, Descriptor, DescriptorFlags, NewTimestamp, OpenFlags, PathFlags,
    };
    let (Some(input), Some(out)) = (
        crate::exhaust::preopen("/in"),
        crate::exhaust::preopen("/out"),
    ) else {
        return ExitCode::from(2);
    };
    let say = |what: &str, got: String| println!("every-call: {what}: {got}");
    let file = out
        .open_at(
            PathFlags::empty(),
            "f",
            OpenFlags::CREATE,
            DescriptorFlags::READ | DescriptorFlags::WRITE,
        )
        .expect("/out/f opens");
    let _ = out.create_directory_at("d");
    let dir = out
        .open_at(
            PathFlags::empty(),
            "d",
            OpenFlags::DIRECTORY,
            DescriptorFlags::READ | DescriptorFlags::MUTATE_DIRECTORY,
        )
        .expect("/out/d opens");
    let input_file = crate::exhaust::first_input(&input).and_then(|name| {
        input
            .open_at(
                PathFlags::empty(),
                &name,
                OpenFlags::empty(),
                DescriptorFlags::READ,
            )
            .ok()
    });
    let mut every: Vec<(&str, &Descriptor)> = vec![
        ("/in", &input),
        ("/out", &out),
        ("/out/f", &file),
        ("/out/d", &dir),
    ];
    if let Some(f) = &input_file {
        every.push(("an input", f));
    }
    for (name, d) in &every {
        for advice in [
            Advice::Normal,
            Advice::Sequential,
            Advice::Random,
            Advice::WillNeed,
            Advice::DontNeed,
            Advice::NoReuse,
        ] {
            say(
                &format!("{name} advise {advice:?}"),
                format!("{:?}", d.advise(0, 0, advice)),
            );
        }
        say(&format!("{name} get-flags"), format!("{:?}", d.get_flags()));
        say(&format!("{name} get-type"), format!("{:?}", d.get_type()));
        say(
            &format!("{name} stat"),
            format!("{:?}", d.stat().map(|s| s.size)),
        );
        say(
            &format!("{name} metadata-hash"),
            format!("{:?}", d.metadata_hash()),
        );
        say(
            &format!("{name} is-same-object"),
            format!("{:?}", d.is_same_object(&out)),
        );
        say(&format!("{name} sync"), format!("{:?}", d.sync()));
        say(&format!("{name} sync-data"), format!("{:?}", d.sync_data()));
        say(
            &format!("{name} set-times"),
            format!(
                "{:?}",
                d.set_times(NewTimestamp::Now, NewTimestamp::NoChange)
            ),
        );
        say(&format!("{name} write"), format!("{:?}", d.write(b"x", 0)));
        say(
            &format!("{name} read"),
            format!("{:?}", d.read(16, 0).map(|(b, e)| (b.len(), e))),
        );
        say(&format!("{name} set-size"), format!("{:?}", d.set_size(1)));
        say(
            &format!("{name} read-directory"),
            format!(
                "{:?}",
                d.read_directory()
                    .map(|s| s.read_directory_entry().map(|e| e.is_some()))
            ),
        );
        if let Ok(stream) = d.read_via_stream(0) {
            say(
                &format!("{name} stream read"),
                format!("{:?}", stream.blocking_read(16).map(|b| b.len())),
            );
            say(
                &format!("{name} stream skip"),
                format!("{:?}", stream.skip(1)),
            );
        }
        for (how, stream) in [
            ("write", d.write_via_stream(0)),
            ("append", d.append_via_stream()),
        ] {
            if let Ok(stream) = stream {
                say(
                    &format!("{name} stream {how}"),
                    format!("{:?}", stream.blocking_write_and_flush(b"y")),
                );
                say(
                    &format!("{name} stream {how} zeroes"),
                    format!("{:?}", stream.blocking_write_zeroes_and_flush(2)),
                );
            }
        }
        say(
            &format!("{name} create-directory-at"),
            format!("{:?}", d.create_directory_at("x")),
        );
        say(
            &format!("{name} stat-at"),
            format!("{:?}", d.stat_at(PathFlags::empty(), "x").map(|s| s.type_)),
        );
        say(
            &format!("{name} metadata-hash-at"),
            format!("{:?}", d.metadata_hash_at(PathFlags::SYMLINK_FOLLOW, "x")),
        );
        say(
            &format!("{name} set-times-at"),
            format!(
                "{:?}",
                d.set_times_at(
                    PathFlags::empty(),
                    "x",
                    NewTimestamp::NoChange,
                    NewTimestamp::Now
                )
            ),
        );
        say(
            &format!("{name} symlink-at"),
            format!("{:?}", d.symlink_at("x", "s")),
        );
        say(
            &format!("{name} readlink-at"),
            format!("{:?}", d.readlink_at("s")),
        );
        say(
            &format!("{name} link-at"),
            format!("{:?}", d.link_at(PathFlags::empty(), "s", d, "l")),
        );
        say(
            &format!("{name} rename-at"),
            format!("{:?}", d.rename_at("l", d, "m")),
        );
        say(
            &format!("{name} unlink-file-at"),
            format!("{:?}", d.unlink_file_at("m")),
        );
        say(
            &format!("{name} unlink-file-at s"),
            format!("{:?}", d.unlink_file_at("s")),
        );
        say(
            &format!("{name} remove-directory-at"),
            format!("{:?}", d.remove_directory_at("x")),
        );
    }
    say(
        "wall clock",
        format!("{:?}", wasip2::clocks::wall_clock::now().seconds > 0),
    );
    say(
        "wall clock resolution",
        format!("{:?}", wasip2::clocks::wall_clock::resolution()),
    );
    say(
        "monotonic resolution",
        format!("{:?}", wasip2::clocks::monotonic_clock::resolution()),
    );
    wasip2::clocks::monotonic_clock::subscribe_duration(1_000_000).block();
    say(
        "random",
        format!("{:?}", wasip2::random::random::get_random_bytes(16).len()),
    );
    say(
        "insecure random",
        format!(
            "{:?}",
            wasip2::random::insecure::get_insecure_random_u64() > 0
        ),
    );
    say(
        "insecure seed",
        format!("{:?}", wasip2::random::insecure_seed::insecure_seed().0 > 0),
    );
    say(
        "stdin",
        format!(
            "{:?}",
            wasip2::cli::stdin::get_stdin()
                .blocking_read(16)
                .map(|b| b.len())
        ),
    );
    say(
        "terminal stdin",
        format!(
            "{:?}",
            wasip2::cli::terminal_stdin::get_terminal_stdin().is_some()
        ),
    );
    say(
        "terminal stdout",
        format!(
            "{:?}",
            wasip2::cli::terminal_stdout::get_terminal_stdout().is_some()
        ),
    );
    say(
        "environment",
        format!("{:?}", wasip2::cli::environment::get_environment().len()),
    );
    say(
        "initial cwd",
        format!("{:?}", wasip2::cli::environment::initial_cwd()),
    );
    println!("every-call: done");
    ExitCode::SUCCESS
}
