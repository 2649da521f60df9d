//! bulkhead-services' integration tests: the services over real loopback
//! HTTP, with keys generated per test. No outside resource.

// Keys, token minting, starting a router on 127.0.0.1:0.
mod support;

// palette: identity from the token only, nothing echoed, 401s, the call log.
mod palette;
// payments: its own audience, replays of palette's tokens refused.
mod payments;
// Fetching the JWKS, and picking up rotated keys.
mod jwks;
