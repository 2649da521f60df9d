//! The shared harness, the one place test modules take fixtures from (they
//! never import from each other): guests in the shared sandbox and the
//! descriptors they hold, typed policies, services in process and as the
//! real binary, and the client's side of the API.

#![allow(dead_code, unused_imports)]

pub mod descriptors;
pub mod guests;
pub mod http;
pub mod policies;
pub mod service;
// What both escape-suite test binaries use (the other is `tests/suite`).
#[path = "../../suite/support.rs"]
pub mod suite_support;

pub use descriptors::*;
pub use guests::*;
pub use http::*;
pub use policies::*;
pub use service::*;
