//! The guest modules of `guests/`, built for `wasm32-wasip2` by this crate's
//! build script (a nested cargo, reproducible from any checkout path), the
//! way wasmtime's `test-programs-artifacts` serves its test programs:
//!
//! - a constant per guest binary with the absolute path of its `.wasm`
//!   (`HELLO`, `THUMBNAIL`, `SANITIZE_HTML`, `HOSTILE`, ...), and
//!   [`GUESTS_DIR`];
//! - [`foreach_guest!`], which invokes a macro once per guest;
//! - [`embedded`]: the guests the escape suite ships inside the `bulkhead`
//!   binary, as bytes.
//!
//! Used by the escape suite, the tests and the benches; the `bulkhead`
//! library itself never depends on it.

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// The guests the escape suite embeds: `hostile`, `lateral` (the outbound
/// gate's attacks) and `hello` (the well-behaved neighbour).
pub mod embedded {
    include!(concat!(env!("OUT_DIR"), "/embedded.rs"));
}
