//! Shared support for the Bulkhead integration tests: the guest modules,
//! from the artifacts crate (paths of every `.wasm`, `GUESTS_DIR`,
//! `foreach_guest!`).

pub use bulkhead_artifacts::*;
