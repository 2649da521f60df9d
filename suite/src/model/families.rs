//! The descriptors of the attack families the catalog names: which API
//! attack, generated module, forgery, lateral HTTP judgement or directory
//! attack. How each runs is in [`crate::families`].

/// One attack on the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApiAttack {
    /// Missing, malformed, truncated, wrong-scheme and query-string tokens.
    Malformed,
    /// A revoked token.
    Revoked,
    /// An expired token.
    Expired,
    /// Read, download, cancel, delete and list another tenant's job.
    CrossTenant,
    /// A user token against the admin API.
    AdminWithUserToken,
    /// Identity headers (`X-Bulkhead-Tenant`) instead of the token's.
    TenantHeader,
    /// A token without the module's scope.
    ScopeMissing,
    /// Path tricks in module names, job ids and output names.
    PathTricks,
    /// One tenant floods the queue; another must still be served.
    Flood,
    /// A body over the service's limit.
    HugeBody,
    /// A call token the service minted, presented to its own API.
    CallTokenAtApi,
    /// Slow readers of a large output, beyond the tenant's download bound.
    DownloadFlood,
    /// Another tenant downloads while one holds every download it may.
    DownloadNeighbour,
}

impl ApiAttack {
    /// Whether it needs only the tester's token (runs with `--server`).
    pub fn remote_ok(self) -> bool {
        matches!(
            self,
            ApiAttack::Malformed | ApiAttack::TenantHeader | ApiAttack::PathTricks
        )
    }
}

/// A generated module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bomb {
    /// One byte over the host's module size limit.
    Oversized,
    /// A core module (`wasip1`-style), not a component.
    CoreModule,
    /// A component whose section runs past the end of the file.
    Truncated,
    /// A start function that loops forever, run during instantiation.
    StartLoop,
    /// An initial memory of 1 GiB.
    HugeMemory,
    /// Eight memories in one core module.
    ManyMemories,
    /// A table of a million elements.
    HugeTable,
    /// A 32 MiB data segment into a one-page memory.
    DataSegment,
    /// Forty core instances in one component.
    ManyInstances,
    /// Ten thousand functions.
    ManyFunctions,
    /// One function of 20,000 nested blocks.
    DeepNesting,
    /// Functions with 50,000 locals each, all live.
    ManyLocals,
    /// A `br_table` with 60,000 targets.
    HugeBrTable,
    /// An import of an interface no policy grants.
    UngrantedImport,
    /// An import of a future, incompatible WASI version.
    FutureWasi,
}

/// One forgery.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forgery {
    /// `alg: none`, no signature.
    AlgNone,
    /// HS256 keyed with the host's public key bytes.
    Hs256KeyBytes,
    /// HS256 keyed with the JWK's `x` string (and the JWK as JSON).
    Hs256JwkX,
    /// Signed with the attacker's key under a `kid` the host never had.
    UnknownKid,
    /// `kid` values that look like paths or URLs.
    PathKid,
    /// The attacker's key embedded in the header (`jwk`, `jku`, `x5u`).
    EmbeddedKey,
    /// Host-signed, expired.
    Expired,
    /// Host-signed, `nbf` or `iat` in the future.
    NotYetValid,
    /// Host-signed, another issuer.
    WrongIssuer,
    /// A real minted token replayed at another service.
    ReplayAudience,
    /// Host-signed, one claim missing at a time.
    MissingClaims,
}

impl Forgery {
    /// Whether it needs no host key (runs with `--server`).
    pub fn remote_ok(self) -> bool {
        matches!(
            self,
            Forgery::AlgNone
                | Forgery::Hs256KeyBytes
                | Forgery::Hs256JwkX
                | Forgery::UnknownKid
                | Forgery::PathKid
                | Forgery::EmbeddedKey
        )
    }

    /// Whether it needs a token the host really minted.
    pub fn needs_minted(self) -> bool {
        self == Forgery::ReplayAudience
    }
}

/// What a lateral HTTP attack must leave behind to count as held, beyond
/// the checks every one gets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HttpHeld {
    /// Refusals in the job report: at least `n` of each class.
    Refused(Vec<(&'static str, usize)>),
    /// The guest's own credentials and identity claims: the allowed bait
    /// saw at least one call, and none of them.
    Smuggle,
    /// No token the host minted appears in anything the job produced.
    Hunt,
    /// As [`HttpHeld::Hunt`], against the reflecting bait, with at least
    /// `n` refusals (withheld answers) of each class.
    Reflect(Vec<(&'static str, usize)>),
    /// The bait saw at most [`MAX_CALLS`](super::services::MAX_CALLS); the rest are `limit` refusals.
    Flood,
    /// The bait saw at most [`MAX_REQUEST`](super::services::MAX_REQUEST) body bytes.
    BigBody,
    /// Nothing beyond the common checks (the request never reaches the
    /// gate).
    Common,
}

/// One attack on the host's directories.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirAttack {
    /// Another module's cached artifact (a valid one, tag and all) copied
    /// under the pinned module's name.
    PlantedCopy,
    /// Garbage with a made-up tag under the pinned module's name.
    PlantedGarbage,
    /// A symlink under the pinned module's name, to another module's
    /// artifact.
    PlantedLink,
    /// A cache directory anyone may write to (mode 0777).
    WritableCache,
    /// A cache directory inside a directory anyone may write to (0777, not
    /// sticky).
    WritableCacheParent,
    /// A cache directory reached through a symlink to a directory anyone
    /// may write to.
    LinkedCache,
    /// A cache directory owned by another user (needs root to set up).
    ForeignCache,
    /// A work directory anyone may write to.
    WritableWork,
    /// A work directory owned by another user (needs root to set up).
    ForeignWork,
}

impl DirAttack {
    /// Every variant, with its id and what it tries.
    pub const ALL: [(DirAttack, &'static str, &'static str); 9] = [
        (
            DirAttack::PlantedCopy,
            "fs.cache-planted-copy",
            "plant another module's cached artifact under the pinned module's name, then restart",
        ),
        (
            DirAttack::PlantedGarbage,
            "fs.cache-planted-garbage",
            "plant garbage with a made-up tag under the pinned module's cache name",
        ),
        (
            DirAttack::PlantedLink,
            "fs.cache-planted-link",
            "plant a symlink to another module's artifact under the pinned module's cache name",
        ),
        (
            DirAttack::WritableCache,
            "fs.cache-dir-writable",
            "hand the host a world-writable module cache directory",
        ),
        (
            DirAttack::WritableCacheParent,
            "fs.cache-parent-writable",
            "hand the host a cache directory inside a world-writable, non-sticky directory",
        ),
        (
            DirAttack::LinkedCache,
            "fs.cache-dir-linked",
            "hand the host a cache path that is a symlink to a world-writable directory",
        ),
        (
            DirAttack::ForeignCache,
            "fs.cache-dir-foreign",
            "hand the host a module cache directory another user owns",
        ),
        (
            DirAttack::WritableWork,
            "fs.work-dir-writable",
            "hand the host a world-writable work directory for its jobs",
        ),
        (
            DirAttack::ForeignWork,
            "fs.work-dir-foreign",
            "hand the host a work directory another user owns",
        ),
    ];
}
