//! Bulkhead runs risky processing code as WebAssembly components, each job in
//! its own compartment.
//!
//! - [`policy`]: TOML policy → typed, validated [`policy::Policy`]; knows
//!   nothing about wasmtime.
//! - [`sandbox`]: engine, limits, the guest's WASI view, running a job; the
//!   only module that names wasmtime types.
//! - [`cli`]: the `bulkhead` command line.

pub mod cli;
pub mod policy;
pub mod sandbox;
