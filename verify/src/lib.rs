//! Verification of Bulkhead call tokens, for internal services.
//!
//! When a guest makes an outgoing `wasi:http` request to an internal service
//! its policy names, Bulkhead's host strips whatever credential the guest put
//! on the request and attaches a token it mints for that one call: a JWS in
//! compact form, signed with Ed25519, naming the service as its only audience
//! and carrying the identity of the user who submitted the job. This crate is
//! what an internal service uses to check such a token, and what the host uses
//! for the shared types ([`CallClaims`], [`TOKEN_TYPE`], [`call_header`],
//! [`ed25519_jwk`]), so both sides agree on the format by construction.
//!
//! ```text
//! header  {"alg":"EdDSA","typ":"bulkhead-call+jwt","kid":"<kid>"}
//! claims  {"iss","aud","sub","tenant","scopes","job","module","iat","nbf","exp","jti"}
//! ```
//!
//! [`Verifier`] follows RFC 8725 (JWT best current practices): the algorithm
//! is pinned to EdDSA, keys come only from a pinned key set (a `kid` is only
//! ever a map key; `jku`, `x5u` and embedded `jwk` header parameters are
//! ignored), the token type is checked, issuer and audience must match
//! exactly, every claim is required, time checks use a bounded leeway, and a
//! token may not live longer than [`MAX_LIFETIME`].
//!
//! The crate does no I/O: fetching the host's JWKS and refreshing it is the
//! caller's business (`bulkhead-services` shows one way).
//!
//! # Crypto backend
//!
//! Signatures are checked by `jsonwebtoken` with its pure-Rust `rust_crypto`
//! backend. jsonwebtoken picks its backend process-wide from its crate
//! features: a build in which some other crate also enables its `aws_lc_rs`
//! feature panics at the first verification. Take `jsonwebtoken` from the
//! workspace's dependency table, which enables `rust_crypto` only.

#![deny(missing_docs)]

mod claims;
mod error;
mod keys;
mod verifier;

pub use claims::{ALGORITHM, CallClaims, TOKEN_TYPE, call_header};
pub use error::{ConfigError, VerifyError};
pub use jsonwebtoken::jwk::{Jwk, JwkSet};
pub use keys::{MAX_KEY_ID_BYTES, MAX_KEYS, ed25519_jwk};
pub use verifier::{
    DEFAULT_LEEWAY, MAX_LEEWAY, MAX_LIFETIME, MAX_SPENT, MAX_TOKEN_BYTES, Verifier, VerifierConfig,
};
