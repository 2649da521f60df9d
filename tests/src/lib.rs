//! Shared support for the Bulkhead integration tests: where the guest
//! modules are.
//!
//! The host crate's `build.rs` builds the `guests/` workspace for
//! `wasm32-wasip2` and generates (this package's `build.rs` copies it), for
//! each guest binary, a constant with the absolute path of its
//! `.wasm` (`HELLO`, `THUMBNAIL`, `SANITIZE_HTML`, `HOSTILE`), `GUESTS_DIR`,
//! and the `foreach_guest!` macro that invokes a macro once per guest.

include!(concat!(env!("OUT_DIR"), "/guests.rs"));
