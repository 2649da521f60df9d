//! bulkhead-verify's integration tests: real Ed25519 keys generated per test,
//! real tokens, no outside resource.

// Test keys, a verifier over them, a raw token builder.
mod support;

// Well-formed tokens pass, minted by hand or the host's way.
mod accept;
// Algorithm confusion, header tricks, tampering, garbage.
mod forgery;
// Issuer, audience, time, lifetime, and each required claim.
mod claims;
// Key set validation, configuration bounds, rotation.
mod keys;
