//! The `hello` guest: prints one line and exits 0.
//!
//! It does as little as a WASI command can, so timing it measures the host's
//! per-job overhead (instantiation, sandbox setup, output capture) alone.

fn main() {
    println!("hello from bulkhead");
}
