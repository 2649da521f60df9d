//! Integration tests of the sandbox core, against real guests built from
//! `guests/` by this package's build script.

// Shared harness: one sandbox per process, policies pinned to built guests.
mod common;
// Containment: host files, inputs, network and environment stay out of reach.
mod containment;
// Each limit ends a hostile job with that limit named, and the host stays within it.
mod limits;
// Outputs are collected without following links.
mod outputs;
// The real processors do their job.
mod processors;
// Every kind of bad policy gets its own clear error (golden files).
mod policy_errors;
// One smoke test per guest, named after it (checked by `foreach_guest!`).
mod guests;
// The HTTP service end to end over loopback.
mod service;
// Outbound calls: the lateral-movement scenario with real internal services.
mod relay;
// Crash durability: kill -9 the real binary mid-work, restart, nothing lost.
mod durability;
// Backpressure: a flood gets 429s, others are served, memory stays bounded.
mod flood;
// The edge: connection timeouts and caps, bounded audit, bounded shutdown.
mod edge;
// The example policies in `policies/` pin the modules built from source.
mod examples;
// `bulkhead escape-suite --server` against a service (local runs: `tests/suite`).
mod suite;
// Planted cache artifacts are not run, shared cache and work dirs are refused,
// hostile output trees and names are skipped with why, never a host error.
mod artifacts;
// Meters on the real resource: host descriptors, host CPU, bytes written.
mod meters;
// Host failures on a job's path: idempotent retries, bounded attempts, a full disk.
mod lifecycle;
// The API contract: one JSON error shape, strict queries, any stored output name downloads.
mod contract;
// Downloads with the real binary: streamed to slow readers, bounded per tenant.
mod downloads;
// schemathesis against the served OpenAPI document of the real binary.
mod schema_fuzz;
// The module boundaries ARCHITECTURE.md states, checked in the source.
mod structure;

/// Adding a guest to `guests/` without a test named after it in
/// [`guests`] fails to compile.
macro_rules! assert_test_exists {
    ($name:ident) => {
        #[allow(unused_imports)]
        use self::guests::$name as _;
    };
}
bulkhead_tests::foreach_guest!(assert_test_exists);
// The second wall from the gateway's side: worker processes, their faults and replacements.
mod workers;
// Module intake: WASIp1 modules adapted at load, imports judged before compiling, `check` in a worker.
mod intake;
// A zone's compile cache: only artifacts the gateway recorded from a worker that ran no guest are loaded.
mod zone_cache;
// Signed modules: `signed_by` policies refuse unsigned or wrongly signed modules before compiling.
mod signed;
// Plugin authors: args templates, stdout as an output, exit codes, trap backtraces, `bulkhead pin`.
mod authors;
// `bulkhead run --config` relays calls with real tokens a service verifies (`bulkhead jwks`).
mod run_calls;
// The Python and JavaScript examples built from source (componentize-py, componentize-js) and run by `bulkhead run`.
mod polyglot;
// Three real nodes on one PostgreSQL: 2,000 jobs, one node killed, every acknowledged job finished once.
mod cluster;
// Several real nodes on one PostgreSQL: revocation, call-token keys, the registry, a lost database.
mod nodes;
// Shared blobs: two services on one PostgreSQL database run and serve each other's jobs.
mod blobs;
// Leases across nodes on one PostgreSQL database: a dead node's jobs re-run, a live node's left alone.
mod leases;
