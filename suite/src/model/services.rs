//! The bait services the lateral attacks are declared and judged against.

/// The service name the allowed bait is declared under.
pub const ALLOWED: &str = "palette";
/// The service name the forbidden bait is declared under.
pub const FORBIDDEN: &str = "payments";
/// Calls per job the allowed bait is declared with.
pub const MAX_CALLS: u32 = 4;
/// Request body bound of the allowed bait, in bytes.
pub const MAX_REQUEST: u64 = 256 * 1024;
/// Calls the flood attack makes (more than [`MAX_CALLS`]).
pub const FLOOD: u32 = 12;
/// The identity the suite's jobs are submitted as.
pub const CALLER_TENANT: &str = "escape-suite";
/// The subject the suite's jobs are submitted as.
pub const CALLER_SUBJECT: &str = "escape-suite-tester";
