//! Build script of `bulkhead-tests`: the guests are built by the host
//! crate's build script (`host/build.rs`, which embeds the escape suite's
//! guests in the binary); this copies the table it generated (paths of every
//! `.wasm`, `foreach_guest!`) to `$OUT_DIR/guests.rs`. The path arrives
//! through the host package's `links` metadata, which also orders the host's
//! build script before this one.

use std::env;
use std::path::PathBuf;

fn main() {
    const VAR: &str = "DEP_BULKHEAD_GUESTS_GUESTS_RS";
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed={VAR}");
    let source = PathBuf::from(
        env::var_os(VAR).expect("bulkhead-host's build script did not report its guest table"),
    );
    println!("cargo:rerun-if-changed={}", source.display());
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    std::fs::copy(&source, out_dir.join("guests.rs"))
        .unwrap_or_else(|e| panic!("cannot copy {}: {e}", source.display()));
}
