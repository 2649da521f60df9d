//! Build script of `bulkhead-tests`: builds the guest workspace (`guests/`)
//! for `wasm32-wasip2` with a nested cargo, and generates
//! `$OUT_DIR/guests.rs` with the paths of the resulting `.wasm` files.
//!
//! Policies pin each module's sha256, so the nested build must give the same
//! bytes from any checkout path and whatever the outer build's settings: it
//! gets a scrubbed environment and explicit, path-remapping rustflags.
//! Only std is used here, so the test crate needs no build-dependencies.

use std::collections::BTreeSet;
use std::env;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const TARGET: &str = "wasm32-wasip2";

/// Variables the outer cargo sets for this build script, or that configure
/// the outer build, and that must not leak into the nested one.
const SCRUB_EXACT: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_RUSTFLAGS",
    "CARGO_BUILD_TARGET",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
    "CARGO_INCREMENTAL",
    "DEBUG",
    "OPT_LEVEL",
    "PROFILE",
    "TARGET",
    "HOST",
    "OUT_DIR",
    "NUM_JOBS",
    "RUSTC",
    "RUSTDOC",
    "RUSTC_LINKER",
    "CARGO_PRIMARY_PACKAGE",
    "CARGO_MANIFEST_DIR",
    "CARGO_MANIFEST_PATH",
    "CARGO_MANIFEST_LINKS",
    "CARGO_CRATE_NAME",
    "LLVM_PROFILE_FILE",
];

/// Prefixes of variables to scrub, for the same reason.
const SCRUB_PREFIXES: &[&str] = &[
    "CARGO_PROFILE_",
    "CARGO_CFG_",
    "CARGO_FEATURE_",
    "CARGO_PKG_",
    "CARGO_LLVM_COV",
    "CARGO_TARGET_",
    "CARGO_BUILD_RUSTC",
    "CARGO_BUILD_TARGET",
    "CARGO_BUILD_RUSTDOC",
    "DEP_",
    "__CARGO_",
];

fn main() {
    let manifest_dir =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let repo = manifest_dir
        .parent()
        .expect("tests/ has a parent directory");
    let guests = repo.join("guests");
    let target_dir = repo.join("target").join("guests");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=CARGO_HOME");
    watch_guest_sources(&guests);

    build_guests(&guests, &target_dir);

    let wasm_dir = target_dir.join(TARGET).join("release");
    let bins = guest_binaries(&guests);
    for bin in &bins {
        let wasm = wasm_dir.join(format!("{bin}.wasm"));
        assert!(
            wasm.is_file(),
            "guest build succeeded but {} is missing",
            wasm.display()
        );
    }
    fs::write(out_dir.join("guests.rs"), generate(&wasm_dir, &bins)).expect("write guests.rs");
}

/// Reruns this script when any guest source changes. Cargo scans a
/// directory given to `rerun-if-changed` recursively, so the top level of
/// `guests/` is listed entry by entry, leaving out `guests/target/`: a
/// by-hand build there must not rebuild the tests (whose binaries depend on
/// this crate). Our own output goes to `target/guests/`, outside `guests/`,
/// for the same reason. (A brand-new top-level file is only noticed once
/// another watched file changes.)
fn watch_guest_sources(guests: &Path) {
    let entries =
        fs::read_dir(guests).unwrap_or_else(|e| panic!("cannot list {}: {e}", guests.display()));
    for entry in entries {
        let entry = entry.expect("read guests/ entry");
        if entry.file_name() != "target" {
            println!("cargo:rerun-if-changed={}", entry.path().display());
        }
    }
}

/// `cargo build --release` of the guest workspace, in a clean environment.
fn build_guests(guests: &Path, target_dir: &Path) {
    let cargo = env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--release")
        .arg("--locked")
        .arg("--manifest-path")
        .arg(guests.join("Cargo.toml"))
        .arg("--target")
        .arg(TARGET)
        .arg("--target-dir")
        .arg(target_dir)
        // Cargo looks for `.cargo/config.toml` from the working directory;
        // run from guests/ so a by-hand build and this one agree.
        .current_dir(guests);

    for (key, _) in env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if SCRUB_EXACT.contains(&key) || SCRUB_PREFIXES.iter().any(|p| key.starts_with(p)) {
            cmd.env_remove(key);
        }
    }
    cmd.env("CARGO_ENCODED_RUSTFLAGS", rustflags(guests, target_dir));

    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    if !output.status.success() {
        panic!(
            "building the guest modules failed ({}): {cmd:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
        );
    }
}

/// The complete rustflags of the nested build (they replace those of
/// `guests/.cargo/config.toml`, so SIMD is repeated here). The remaps strip
/// every machine-specific path prefix that can end up in the binaries
/// (panic locations, `file!()`, build-script `OUT_DIR`s).
fn rustflags(guests: &Path, target_dir: &Path) -> String {
    let cargo_home = env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|home| PathBuf::from(home).join(".cargo")))
        .expect("neither CARGO_HOME nor HOME is set");
    let flags = [
        "-Ctarget-feature=+simd128".to_owned(),
        format!("--remap-path-prefix={}=/bulkhead/guests", guests.display()),
        format!("--remap-path-prefix={}=/cargo", cargo_home.display()),
        format!(
            "--remap-path-prefix={}=/bulkhead/target",
            target_dir.display()
        ),
    ];
    flags.join("\x1f")
}

/// The module names of the guest workspace members, in member order: each
/// member's `[[bin]] name`s, its `[lib] name` if the lib is a `cdylib`
/// (components exporting something other than `wasi:cli/run`, such as
/// `wasi:http/incoming-handler`), or its package name if it declares
/// neither. Plain line parsing is enough for these hand-written manifests.
fn guest_binaries(guests: &Path) -> Vec<String> {
    let manifest = read(&guests.join("Cargo.toml"));
    let members = quoted_list(&manifest, "members")
        .unwrap_or_else(|| panic!("no `members = [...]` in {}/Cargo.toml", guests.display()));
    let mut bins = Vec::new();
    for member in members {
        let manifest = read(&guests.join(&member).join("Cargo.toml"));
        let mut section = String::new();
        let mut package_name = None;
        let mut member_bins = Vec::new();
        let mut lib_name = None;
        let mut cdylib = false;
        for line in manifest.lines().map(str::trim) {
            if line.starts_with('[') {
                section = line.to_owned();
            } else if let Some(name) = key_string(line, "name") {
                match section.as_str() {
                    "[package]" => package_name = Some(name),
                    "[[bin]]" => member_bins.push(name),
                    "[lib]" => lib_name = Some(name),
                    _ => {}
                }
            } else if section == "[lib]"
                && line.starts_with("crate-type")
                && line.contains("\"cdylib\"")
            {
                cdylib = true;
            }
        }
        if cdylib {
            member_bins.push(
                lib_name.unwrap_or_else(|| panic!("cdylib guest {member} needs a [lib] name")),
            );
        }
        if member_bins.is_empty() {
            member_bins.push(
                package_name.unwrap_or_else(|| panic!("guest member {member} has no package name")),
            );
        }
        bins.extend(member_bins);
    }
    let unique: BTreeSet<_> = bins.iter().map(|b| ident(b)).collect();
    assert_eq!(
        unique.len(),
        bins.len(),
        "guest binary names collide: {bins:?}"
    );
    bins
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// `key = "value"` on one line.
fn key_string(line: &str, key: &str) -> Option<String> {
    let rest = line
        .strip_prefix(key)?
        .trim_start()
        .strip_prefix('=')?
        .trim();
    Some(rest.strip_prefix('"')?.split('"').next()?.to_owned())
}

/// The quoted strings of `key = [ ... ]`, which may span several lines.
fn quoted_list(manifest: &str, key: &str) -> Option<Vec<String>> {
    let start = manifest
        .lines()
        .position(|l| l.trim_start().starts_with(key) && l.contains('='))?;
    let mut text = String::new();
    for line in manifest.lines().skip(start) {
        // Drop comments; member names contain no `#`.
        text.push_str(line.split('#').next().unwrap_or(""));
        if line.contains(']') {
            break;
        }
    }
    let list = text.split_once('[')?.1.split(']').next()?;
    Some(
        list.split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect(),
    )
}

/// `sanitize-html` -> `sanitize_html`.
fn ident(bin: &str) -> String {
    bin.replace('-', "_")
}

fn generate(wasm_dir: &Path, bins: &[String]) -> String {
    let path_str = |p: &Path| {
        p.to_str()
            .unwrap_or_else(|| panic!("non-UTF-8 path {}", p.display()))
            .to_owned()
    };
    let mut out = String::from("// Generated by tests/build.rs; do not edit.\n\n");
    writeln!(out, "/// Directory holding the built guest modules.").unwrap();
    writeln!(
        out,
        "pub const GUESTS_DIR: &str = {:?};",
        path_str(wasm_dir)
    )
    .unwrap();
    for bin in bins {
        let path = path_str(&wasm_dir.join(format!("{bin}.wasm")));
        writeln!(out, "\n/// Absolute path of the `{bin}` guest module.").unwrap();
        writeln!(
            out,
            "pub const {}: &str = {path:?};",
            ident(bin).to_uppercase()
        )
        .unwrap();
    }
    let calls: String = bins
        .iter()
        .map(|b| format!(" $mac!({});", ident(b)))
        .collect();
    writeln!(
        out,
        "\n/// Invokes `$mac!(name)` once per guest module, with the name in snake case\n\
         /// (`hello`, `sanitize_html`, ...), e.g. to generate one test per guest.\n\
         #[macro_export]\n\
         macro_rules! foreach_guest {{\n    ($mac:ident) => {{{calls} }};\n}}"
    )
    .unwrap();
    out
}
