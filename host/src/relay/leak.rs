//! Keeping a job's call tokens away from it: the forms a token takes when a
//! service reflects a request header back ([`Needles`]), and a scanner over
//! the whole response stream that withholds it the moment one appears
//! ([`Scanner`]).
//!
//! The signature segment of a call token is its secret: anyone holding the
//! header and payload (which the guest could guess) and the signature holds
//! the token. So the needles are built from the signature, in the encodings
//! a service (or a framework's error page, or a logging endpoint) would
//! plausibly apply, and the response is searched in two views.
//!
//! Needles ([`forms`]), each [`WINDOW`] bytes long:
//!
//! - every window of the signature text starting at a multiple of
//!   [`STRIDE`] (and the last one): no 23 consecutive characters of the
//!   signature (138 bits) reach the guest, and the whole token is caught;
//! - the raw signature bytes, in windows the same way;
//! - windows (every [`WINDOW`] bytes, so any 31 consecutive characters hold
//!   one) of each encoding of the whole signature: the hex of its text and
//!   of its raw bytes, and base64 of its text and of its raw bytes at each of
//!   the three alignments a prefix such as `Bearer ` can give it (without
//!   the characters that depend on the neighbours).
//!
//! Needles and views are *folded*: ASCII letters lowercased, `-` read as
//! `+` and `_` as `/`. So every form is matched whatever its letter case
//! (upper- or lowercase hex and escapes, an upper- or lowercased token) and
//! the standard and URL base64 alphabets are one.
//!
//! Views of the response, both searched for every needle:
//!
//! 1. the bytes as they are (folded);
//! 2. the bytes *unescaped* (folded): runs of up to three NUL bytes
//!    dropped first (so UTF-16LE/BE and UTF-32 of any ASCII form read as
//!    that form), then one level of escapes decoded: `%41` and `%u0041`
//!    (URL, IIS), `=41` and quoted-printable soft line breaks, `\x41`,
//!    `\u0041` and `\/`-style escapes (JSON, C, JavaScript), HTML numeric
//!    entities (`&#x41;`, `&#65;`, with or without `;`, up to 8 digits
//!    after any number of leading zeros) and a few named ones (`&sol;`,
//!    `&plus;`, `&lowbar;`, ...), in any mix and any letter case, runs of
//!    up to three NULs they decode to dropped too (escaped UTF-16); and the
//!    same decoding once more over that (two levels of escaping: `%2541`,
//!    `&amp;#x41;`).
//!
//! Compressed payloads ([`Scanner`]): a gzip or zlib stream (any valid zlib
//! header, any window size) at the start of the body, a gzip member or a zip entry anywhere in it (found by magic,
//! whatever the `Content-Type`), is inflated as it streams and its bytes are
//! scanned the same way (nested, up to [`MAX_DEPTH`] levels); compressed
//! bytes are passed on only once everything they inflate to has been
//! searched. Past [`MAX_INFLATED`] inflated bytes per response, or on a
//! format with a recognisable magic that cannot be inflated here (zstd, xz,
//! bzip2, 7z, rar, lz4, a zip entry with another method or encrypted, zlib
//! asking for a preset dictionary), or on any inflate error (bad data: a
//! client might read more of it than the gate), the response is withheld
//! ([`Withheld::Opaque`]).
//!
//! Not recognised (documented in ARCHITECTURE.md): encodings of encodings
//! beyond the above (base64 of gzip, hex of UTF-16, three levels of
//! escaping), separators inside an encoding (hex with spaces, byte-array
//! dumps such as `[101, 121, ...]`), a zlib or raw deflate stream that does
//! not start the body, brotli (no magic), images of the token, and any
//! transformation the service invents (encryption, reversal, ROT13...).
//!
//! Each token's needles ([`TokenNeedles`]) are built when the token is
//! minted (their automaton only when a long haystack needs it); a call's response is searched for its own token and for
//! the job's earlier ones that may still be valid (a service may hand one
//! call's token back in a later answer). A stream holds back the bytes that
//! could still start a form: the last `WINDOW - 1` bytes of each view (more
//! raw bytes for an escaped view), an unfinished escape, and compressed bytes
//! whose inflated output is not yet searched.
//!
//! Every answer is also searched for the signature text of every token the
//! gateway issued to any other job, of any tenant, that a verifier may
//! still accept ([`Issued`]): a service may hand one caller's token to
//! another.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;

use aho_corasick::{AhoCorasick, AhoCorasickKind};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use bytes::{Bytes, BytesMut};

/// Length of every needle.
pub const WINDOW: usize = 16;
/// Distance between windows of the signature text and raw bytes.
const STRIDE: usize = 8;

/// Most tokens one call's needles cover (the job's newest).
pub const MAX_TOKENS: usize = 64;
/// Most inflated bytes searched per response (all compressed payloads
/// together); past it the response is withheld.
pub const MAX_INFLATED: u64 = 16 * 1024 * 1024;
/// Most levels of compressed payloads inside each other.
pub const MAX_DEPTH: usize = 3;
/// Most compressed payloads being inflated at once in one stream.
const MAX_DECODERS: usize = 8;
/// Consecutive NUL bytes dropped by the unescaped view (UTF-32 has three).
const MAX_NUL_RUN: usize = 3;
/// Compressed bytes fed to an inflater at once (the granularity at which
/// compressed bytes are released).
const PIECE: usize = 256;

/// The folding applied to needles and views.
static FOLD: [u8; 256] = fold_table();

const fn fold_table() -> [u8; 256] {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        #[allow(clippy::cast_possible_truncation)]
        let b = i as u8;
        t[i] = match b {
            b'A'..=b'Z' => b + 32,
            b'-' => b'+',
            b'_' => b'/',
            _ => b,
        };
        i += 1;
    }
    t
}

fn fold(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().map(|b| FOLD[usize::from(*b)]).collect()
}

/// The needles for `token`, folded: windows of its signature and of the
/// raw signature, and windows of each encoding of it.
pub fn forms(token: &str) -> Vec<Vec<u8>> {
    let signature = token.rsplit('.').next().unwrap_or(token).as_bytes();
    let mut out = Vec::new();
    windows(signature, STRIDE, &mut out);
    let mut encoded = vec![hex::encode(signature).into_bytes()];
    let mut sources = vec![signature.to_vec()];
    if let Ok(raw) = URL_SAFE_NO_PAD.decode(signature) {
        windows(&raw, STRIDE, &mut out);
        encoded.push(hex::encode(&raw).into_bytes());
        sources.push(raw);
    }
    for source in &sources {
        for align in 0..3 {
            let mut shifted = vec![0u8; align];
            shifted.extend_from_slice(source);
            let whole = shifted.len() / 3 * 3;
            // The standard alphabet; folding makes it the URL one too.
            let text = STANDARD_NO_PAD.encode(&shifted[..whole]);
            // The first group mixes in the bytes before the signature.
            let skip = if align == 0 { 0 } else { 4 };
            encoded.push(text.as_bytes()[skip.min(text.len())..].to_vec());
        }
    }
    for e in &encoded {
        windows(e, WINDOW, &mut out);
    }
    let mut out: Vec<Vec<u8>> = out
        .into_iter()
        .filter(|n| !n.is_empty())
        .map(|n| fold(&n))
        .collect();
    out.sort();
    out.dedup();
    out
}

fn windows(bytes: &[u8], stride: usize, out: &mut Vec<Vec<u8>>) {
    if bytes.len() <= WINDOW {
        out.push(bytes.to_vec());
        return;
    }
    let mut start = 0;
    while start + WINDOW <= bytes.len() {
        out.push(bytes[start..start + WINDOW].to_vec());
        start += stride;
    }
    // The last window, so the end is covered too.
    out.push(bytes[bytes.len() - WINDOW..].to_vec());
}

/// Every form of one token: built when the token is minted (a sorted list
/// of its needles, searched directly in short haystacks) and reused for
/// every later call of the job while the token may still be valid; its
/// Aho-Corasick automaton is built only when a haystack longer than
/// [`DIRECT_MAX`] needs it (most answers never do).
#[derive(Debug)]
pub struct TokenNeedles {
    /// `Some(None)` only if building failed: every non-empty input then
    /// counts as a leak (fail closed).
    automaton: OnceLock<Option<AhoCorasick>>,
    /// The needles, sorted.
    patterns: Vec<Vec<u8>>,
    /// The same, when every one is [`WINDOW`] bytes long (always, but for
    /// a signature shorter than that).
    fixed: Option<Vec<[u8; WINDOW]>>,
    /// One bit per pair of first two bytes of a fixed needle: a window
    /// whose first two bytes are not set here matches none, without a
    /// search.
    pairs: Box<[u64; 1024]>,
}

/// The bit of `pairs` for a window starting with `a`, `b`.
fn pair(a: u8, b: u8) -> (usize, u64) {
    let k = (usize::from(a) << 8) | usize::from(b);
    (k >> 6, 1 << (k & 63))
}

/// Longest haystack searched window by window in the sorted needles
/// rather than with the automaton.
const DIRECT_MAX: usize = 2048;

impl TokenNeedles {
    /// The needles of `token` ([`forms`]).
    pub fn new(token: &str) -> Self {
        let patterns = forms(token);
        let fixed = patterns
            .iter()
            .map(|p| <[u8; WINDOW]>::try_from(p.as_slice()).ok())
            .collect::<Option<Vec<_>>>();
        let mut pairs = Box::new([0u64; 1024]);
        for p in fixed.iter().flatten() {
            let (word, bit) = pair(p[0], p[1]);
            pairs[word] |= bit;
        }
        Self {
            automaton: OnceLock::new(),
            patterns,
            fixed,
            pairs,
        }
    }

    fn is_match(&self, folded: &[u8]) -> bool {
        if let Some(fixed) = &self.fixed
            && folded.len() <= DIRECT_MAX
        {
            return folded.windows(WINDOW).any(|w| {
                let (word, bit) = pair(w[0], w[1]);
                self.pairs[word] & bit != 0
                    && fixed.binary_search_by(|p| p.as_slice().cmp(w)).is_ok()
            });
        }
        // Building fails only past the automaton's size limits, which a
        // hundred short patterns are far from.
        match self.automaton.get_or_init(|| build(&self.patterns)) {
            Some(a) => a.is_match(folded),
            None => !folded.is_empty(),
        }
    }
}

fn build(patterns: &[Vec<u8>]) -> Option<AhoCorasick> {
    // The noncontiguous NFA builds fastest; the haystacks are small.
    AhoCorasick::builder()
        .kind(Some(AhoCorasickKind::NoncontiguousNFA))
        .build(patterns)
        .ok()
}

/// Bytes of a stream searched token by token; past them, one automaton of
/// every token's needles is built and searches the rest.
const COMBINE_AFTER: usize = 64 * 1024;

/// The needles an answer is searched for: the call's own token's, and
/// those of every token of its job that may be valid at the moment of
/// each search ([`Combined::minted`]), minted before the call or since (a
/// service stashing a later call's token into an earlier call's answer
/// still being read: found by an attacker, when a call's tokens were
/// fixed at its start). Short answers are searched with each token's own
/// automaton (nothing to build); a long one with a single automaton of
/// them all, shared with the job's other calls ([`Combined`]).
#[derive(Debug, Default)]
pub struct Needles {
    tokens: Vec<Arc<TokenNeedles>>,
    combined: Arc<Combined>,
    /// The gateway's other tokens, searched for too.
    issued: Option<Arc<Issued>>,
}

/// The tokens a job may still have valid, and one automaton of all their
/// needles shared by its calls: each call's long answer is searched with
/// the one built last, and with each token to search that it does not hold
/// on that token's own automaton while they are at most [`BESIDE`]; past
/// that, with one built anew. Built anew for every token it lacked, an
/// automaton of 64 tokens was rebuilt at nearly every read while tokens
/// rotated (found by an attacker: 11 s of the gateway's CPU to read 32 MB
/// of two answers in turn, against 1.4 s).
/// An automaton of 64 tokens takes about 3.5 MB; built per call, the calls
/// a job's guest left unread each held one (found by an attacker: a
/// tenant's 384 calls took the gateway to 1.08 GB). A call does not keep
/// it between searches, so one built since replaces it.
#[derive(Debug, Default)]
pub struct Combined {
    /// The job's tokens that may still be valid, as last told.
    minted: Mutex<Vec<Arc<TokenNeedles>>>,
    /// The automaton built last, and the tokens it holds.
    last: Mutex<Option<Built>>,
    /// How many were built (tests).
    built: std::sync::atomic::AtomicUsize,
}

/// An automaton of some tokens' needles (`None`: building failed, and any
/// input counts as a leak), and those tokens.
type Built = (Vec<Arc<TokenNeedles>>, Arc<Option<AhoCorasick>>);

/// Tokens searched one by one beside the shared automaton, at most, before
/// it is built anew to hold them.
const BESIDE: usize = 8;

impl Combined {
    /// The job's tokens that may still be valid are now `tokens`.
    pub fn minted(&self, tokens: Vec<Arc<TokenNeedles>>) {
        *self.minted.lock().unwrap_or_else(|e| e.into_inner()) = tokens;
    }

    /// An automaton, and the tokens of `tokens` it does not hold (at most
    /// [`BESIDE`]), which between them hold every needle of `tokens` (and
    /// maybe more of the job's: a form of any of its valid tokens is a
    /// leak).
    fn covering(
        &self,
        tokens: &[Arc<TokenNeedles>],
    ) -> (Arc<Option<AhoCorasick>>, Vec<Arc<TokenNeedles>>) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((held, automaton)) = &*last {
            let beside: Vec<_> = tokens
                .iter()
                .filter(|t| !held.iter().any(|h| Arc::ptr_eq(h, t)))
                .take(BESIDE + 1)
                .cloned()
                .collect();
            if beside.len() <= BESIDE {
                return (Arc::clone(automaton), beside);
            }
        }
        let mut all = self
            .minted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for t in tokens {
            if !all.iter().any(|h| Arc::ptr_eq(h, t)) {
                all.push(Arc::clone(t));
            }
        }
        let patterns: Vec<Vec<u8>> = all
            .iter()
            .flat_map(|t| t.patterns.iter().cloned())
            .collect();
        let automaton = Arc::new(build(&patterns));
        self.built
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        *last = Some((all, Arc::clone(&automaton)));
        (automaton, Vec::new())
    }
}

impl Needles {
    /// The needles of `current` and `earlier` (at most [`MAX_TOKENS`] of
    /// them, the last ones), built now.
    pub fn new<'a>(current: &str, earlier: impl IntoIterator<Item = &'a str>) -> Self {
        let earlier: Vec<&str> = earlier.into_iter().collect();
        let start = earlier.len().saturating_sub(MAX_TOKENS);
        Self::of(
            std::iter::once(current)
                .chain(earlier[start..].iter().copied())
                .map(|t| Arc::new(TokenNeedles::new(t)))
                .collect(),
        )
    }

    /// The needles of `tokens`, alone.
    pub fn of(tokens: Vec<Arc<TokenNeedles>>) -> Self {
        let combined = Arc::new(Combined::default());
        combined.minted(tokens.clone());
        Self::shared(tokens, combined)
    }

    /// The needles of `own` (a call's token) and of the tokens `combined`
    /// (its job's) holds at each search.
    pub fn shared(own: Vec<Arc<TokenNeedles>>, combined: Arc<Combined>) -> Self {
        Self {
            tokens: own,
            combined,
            issued: None,
        }
    }

    /// The same, and every token of `issued` (every job's) as well.
    #[must_use]
    pub fn and_issued(mut self, issued: Arc<Issued>) -> Self {
        self.issued = Some(issued);
        self
    }

    /// Every token to search for now: its own, and its job's.
    fn now(&self) -> Vec<Arc<TokenNeedles>> {
        let mut all = self
            .combined
            .minted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for t in &self.tokens {
            if !all.iter().any(|h| Arc::ptr_eq(h, t)) {
                all.push(Arc::clone(t));
            }
        }
        all
    }

    /// Whether `haystack` (a header value, a redirect target) contains any
    /// form of any token, in either view. Compressed payloads are not
    /// looked into here; response bodies go through a [`Scanner`].
    pub fn found(&self, haystack: &[u8]) -> bool {
        if self.now().is_empty() && self.issued.as_ref().is_none_or(|i| i.is_empty()) {
            return false;
        }
        self.is_match(&fold(haystack), 0) || UnescapedStream::default().feed(self, haystack, 0, 0)
    }

    /// Whether the folded `haystack` holds a needle, for a stream that has
    /// already had `scanned` bytes.
    fn is_match(&self, folded: &[u8], scanned: usize) -> bool {
        self.is_own_match(folded, scanned)
            || self.issued.as_ref().is_some_and(|i| i.is_match(folded))
    }

    /// Whether the folded `haystack` holds a needle of its own job's.
    fn is_own_match(&self, folded: &[u8], scanned: usize) -> bool {
        let tokens = self.now();
        if tokens.len() < 2 || scanned < COMBINE_AFTER {
            return tokens.iter().any(|t| t.is_match(folded));
        }
        let (automaton, beside) = self.combined.covering(&tokens);
        match &*automaton {
            Some(a) => a.is_match(folded) || beside.iter().any(|t| t.is_match(folded)),
            None => tokens.iter().any(|t| t.is_match(folded)),
        }
    }
}

/// Most tokens [`Issued`] holds (about 1.4 KB each: at most about 46 MB):
/// past it, the oldest of the tenant that holds the most leave it first.
pub const MAX_ISSUED: usize = 32_768;

/// Positions of a view at which [`Issued`] looks up a window: every
/// `ALIGN`th. With every window of each signature held, any
/// `WINDOW + ALIGN - 1` (23) consecutive characters of one hold a window
/// looked up, however the stream is cut: each search starts `WINDOW - 1`
/// bytes before the end of the last one.
const ALIGN: usize = 8;

/// The bytes of a folded signature text (base64url, folded).
static SIGNATURE_TEXT: [bool; 256] = signature_text();

const fn signature_text() -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        #[allow(clippy::cast_possible_truncation)]
        let b = i as u8;
        t[i] = b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'+' || b == b'/';
        i += 1;
    }
    t
}

/// Every call token the gateway issued, to any job of any tenant, that a
/// verifier may still accept: each answer is searched for their signature
/// text too, not only for its own job's tokens in every form
/// ([`Needles`]). A service that keeps one caller's `Authorization` and
/// hands it to another caller would otherwise give one job, or tenant,
/// another's live token (found by an attacker with a stashing service).
///
/// Every window of each signature's folded text is held, in one hash set
/// whatever the number of tokens; a view is looked up at every
/// [`ALIGN`]th position whose window is all signature characters, so a
/// search costs one lookup per 8 bytes of base64-like text and nothing
/// for other bytes. Both views are searched, so the text is found in any
/// letter case, escaped, or in UTF-16; not hex, base64 or raw bytes of
/// another job's signature (its own job's answers are searched for those
/// of its own tokens).
#[derive(Debug, Default)]
pub struct Issued {
    state: RwLock<IssuedState>,
}

/// Folded signatures, each with when it stops being searched for, in that
/// order.
type Expiring = VecDeque<(Instant, Box<[u8]>)>;

/// Every window held, as keys ([`key`]).
type Windows = HashSet<u128, std::hash::BuildHasherDefault<WindowHasher>>;

#[derive(Debug, Default)]
struct IssuedState {
    /// Every window of every held signature.
    windows: Windows,
    /// The held signatures (folded) of each tenant, in the order they
    /// expire.
    tenants: std::collections::HashMap<String, Expiring>,
    /// How many it holds.
    held: usize,
    /// Tokens let go at [`MAX_ISSUED`] before they expired.
    crowded_out: u64,
}

/// A window as a key.
fn key(window: &[u8]) -> Option<u128> {
    <[u8; WINDOW]>::try_from(window)
        .ok()
        .map(u128::from_le_bytes)
}

/// Hashes a window ([`key`]) with two multiplications: the windows held
/// are of signatures, which no guest or service chooses, so no lookup can
/// be made slow by crowding a bucket, and a keyed hash would only cost.
#[derive(Debug, Default)]
struct WindowHasher(u64);

impl std::hash::Hasher for WindowHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3);
        }
    }

    #[allow(clippy::cast_possible_truncation)]
    fn write_u128(&mut self, k: u128) {
        let (lo, hi) = (k as u64, (k >> 64) as u64);
        let x = (lo ^ hi.rotate_left(29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        self.0 = x ^ (x >> 32);
    }
}

impl IssuedState {
    /// Lets go of `signature`'s windows.
    fn forget(windows: &mut Windows, signature: &[u8]) {
        for w in signature.windows(WINDOW).filter_map(key) {
            windows.remove(&w);
        }
    }

    /// Lets go of the tokens expired at `now`.
    fn expire(&mut self, now: Instant) {
        let Self {
            windows,
            tenants,
            held,
            ..
        } = self;
        tenants.retain(|_, tokens| {
            while tokens.front().is_some_and(|(at, _)| *at <= now) {
                if let Some((_, signature)) = tokens.pop_front() {
                    Self::forget(windows, &signature);
                    *held -= 1;
                }
            }
            !tokens.is_empty()
        });
    }

    /// Lets go of the oldest token of the tenant that holds the most.
    fn crowd_out(&mut self) {
        let Some(tenant) = self
            .tenants
            .iter()
            .max_by_key(|(_, tokens)| tokens.len())
            .map(|(tenant, _)| tenant.clone())
        else {
            return;
        };
        if let Some(tokens) = self.tenants.get_mut(&tenant) {
            if let Some((_, signature)) = tokens.pop_front() {
                Self::forget(&mut self.windows, &signature);
                self.held -= 1;
                self.crowded_out += 1;
            }
            if tokens.is_empty() {
                self.tenants.remove(&tenant);
            }
        }
    }
}

impl Issued {
    /// `token` was issued to a job of `tenant`; searched for until
    /// `expiry` (each tenant's tokens are told in the order they expire).
    /// Past [`MAX_ISSUED`], the tenant that holds the most tokens loses its
    /// oldest: one tenant's calls crowd out only its own.
    pub fn add(&self, tenant: &str, token: &str, expiry: Instant) {
        let signature = fold(token.rsplit('.').next().unwrap_or(token).as_bytes());
        let mut s = self.state.write().unwrap_or_else(|e| e.into_inner());
        s.expire(Instant::now());
        while s.held >= MAX_ISSUED {
            s.crowd_out();
            if s.crowded_out.is_power_of_two() {
                tracing::warn!(
                    crowded_out = s.crowded_out,
                    max = MAX_ISSUED,
                    "more call tokens live than are searched for across jobs: the oldest of the tenant holding the most are searched for only in their own job's answers"
                );
            }
        }
        for w in signature.windows(WINDOW).filter_map(key) {
            s.windows.insert(w);
        }
        s.tenants
            .entry(tenant.to_owned())
            .or_default()
            .push_back((expiry, signature.into_boxed_slice()));
        s.held += 1;
    }

    /// How many tokens it holds.
    pub fn len(&self) -> usize {
        self.state.read().unwrap_or_else(|e| e.into_inner()).held
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the folded `view` holds a window of a held signature at a
    /// position looked up ([`ALIGN`]).
    fn is_match(&self, view: &[u8]) -> bool {
        let s = self.state.read().unwrap_or_else(|e| e.into_inner());
        if s.windows.is_empty() {
            return false;
        }
        let mut at = 0;
        while let Some(w) = view.get(at..at + WINDOW) {
            // The last character not of a signature: no window looked up
            // before it can be one.
            match w.iter().rposition(|b| !SIGNATURE_TEXT[usize::from(*b)]) {
                Some(bad) => at += (bad + 1).div_ceil(ALIGN) * ALIGN,
                None => {
                    if key(w).is_some_and(|w| s.windows.contains(&w)) {
                        return true;
                    }
                    at += ALIGN;
                }
            }
        }
        false
    }
}

/// Why a response is withheld.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Withheld {
    /// A form of a token was found.
    #[error("response withheld: it contained a form of the job's call token")]
    Leak,
    /// Something the gate cannot search (fail closed).
    #[error("response withheld: {0}")]
    Opaque(String),
}

impl Withheld {
    /// The place or reason, for the refusal's record.
    pub fn reason(&self) -> &str {
        match self {
            Self::Leak => "it contained a form of the job's call token",
            Self::Opaque(why) => why,
        }
    }
}

/// The unescaped view: NUL runs dropped, one level of escapes decoded,
/// folded. Each output byte carries the offset of the first input byte it
/// came from (or an earlier one), so the stream knows what to hold back.
#[derive(Debug, Default)]
struct Unescaped {
    nul_run: usize,
    /// NULs escapes stood for, in a row, dropped like those of the input
    /// (an escaped UTF-16 text: `A%00B%00`).
    decoded_nuls: usize,
    /// The last byte out was a numeric reference's that ended without its
    /// `;`: an escaped `;` next is that `;` (`&#x55%3B`, found by an
    /// attacker: the stray `;` after every character hid the token).
    open_reference: bool,
    /// An escape being read, and where it started.
    escape: Vec<u8>,
    escape_at: u64,
}

/// What an escape read so far is.
enum Parse {
    /// Could still become one.
    More,
    /// Complete: the byte it stands for (`None`: nothing, as a soft line
    /// break), and how many of the bytes read it used (the rest are read
    /// again).
    Done(Option<u8>, usize),
    /// Not an escape: its first byte stands for itself, the rest are read
    /// again.
    Invalid,
}

impl Unescaped {
    fn push(&mut self, b: u8, at: u64, out: &mut Vec<u8>, offsets: &mut Vec<u64>) {
        if b == 0 {
            self.nul_run += 1;
            if self.nul_run <= MAX_NUL_RUN {
                return;
            }
        } else {
            self.nul_run = 0;
        }
        self.unescape(b, at, out, offsets);
    }

    fn unescape(&mut self, b: u8, at: u64, out: &mut Vec<u8>, offsets: &mut Vec<u64>) {
        if self.escape.is_empty() {
            if matches!(b, b'%' | b'=' | b'\\' | b'&') {
                self.escape.push(b);
                self.escape_at = at;
            } else {
                self.decoded_nuls = 0;
                self.open_reference = false;
                out.push(FOLD[usize::from(b)]);
                offsets.push(at);
            }
            return;
        }
        // A numeric reference's leading zeros, as many as they are, read
        // as one (found by an attacker: `&#x000000058;`, past the most
        // digits read, passed as text, and HTML decoders read it).
        if b == b'0' && leading_zeros(&self.escape) {
            return;
        }
        self.escape.push(b);
        match parse(&self.escape) {
            Parse::More => {}
            Parse::Done(value, used) => {
                let start = self.escape_at;
                let open = self.escape.starts_with(b"&#") && self.escape.last() != Some(&b';');
                match value {
                    Some(b';') if self.open_reference => {}
                    Some(0) if self.decoded_nuls < MAX_NUL_RUN => self.decoded_nuls += 1,
                    Some(v) => {
                        self.decoded_nuls = 0;
                        out.push(FOLD[usize::from(v)]);
                        offsets.push(start);
                    }
                    None => {}
                }
                self.open_reference = open;
                let rest = self.escape.split_off(used);
                self.escape.clear();
                for r in rest {
                    self.unescape(r, start, out, offsets);
                }
            }
            Parse::Invalid => {
                let start = self.escape_at;
                let escape = std::mem::take(&mut self.escape);
                self.decoded_nuls = 0;
                self.open_reference = false;
                out.push(FOLD[usize::from(escape[0])]);
                offsets.push(start);
                for r in &escape[1..] {
                    self.unescape(*r, start, out, offsets);
                }
            }
        }
    }

    /// Where an unfinished escape starts.
    fn pending(&self) -> Option<u64> {
        (!self.escape.is_empty()).then_some(self.escape_at)
    }
}

/// Whether `escape` is a numeric character reference's start and a zero
/// (`&#0`, `&#x0`): another zero adds nothing to it.
fn leading_zeros(escape: &[u8]) -> bool {
    matches!(escape, [b'&', b'#', b'0'] | [b'&', b'#', b'x' | b'X', b'0'])
}

fn parse(e: &[u8]) -> Parse {
    match (e[0], e.get(1).copied()) {
        (b'%', Some(b'u' | b'U')) | (b'\\', Some(b'u' | b'U')) => fixed_hex(e, 2, 4),
        (b'\\', Some(b'x' | b'X')) => fixed_hex(e, 2, 2),
        (b'%', _) => fixed_hex(e, 1, 2),
        (b'=', Some(b'\n')) => Parse::Done(None, 2),
        (b'=', Some(b'\r')) => match e.get(2) {
            None => Parse::More,
            Some(b'\n') => Parse::Done(None, 3),
            Some(_) => Parse::Invalid,
        },
        (b'=', _) => fixed_hex(e, 1, 2),
        (b'\\', Some(c)) if c.is_ascii_punctuation() => Parse::Done(Some(c), 2),
        (b'&', _) => entity(e),
        _ => Parse::Invalid,
    }
}

fn fixed_hex(e: &[u8], start: usize, n: usize) -> Parse {
    let digits = e.get(start..).unwrap_or_default();
    if !digits.iter().all(u8::is_ascii_hexdigit) {
        return Parse::Invalid;
    }
    if digits.len() < n {
        return Parse::More;
    }
    Parse::Done(Some(byte_of(number(digits, 16))), e.len())
}

fn number(digits: &[u8], radix: u32) -> u32 {
    digits.iter().fold(0u32, |acc, d| {
        acc.saturating_mul(radix)
            .saturating_add(char::from(*d).to_digit(radix).unwrap_or(0))
    })
}

/// A code point as one byte of the view: itself below 256, else a byte no
/// ASCII form holds.
fn byte_of(value: u32) -> u8 {
    u8::try_from(value).unwrap_or(0xff)
}

/// Named entities for the characters of the forms and their neighbours.
const ENTITIES: [(&[u8], u8); 12] = [
    (b"amp", b'&'),
    (b"sol", b'/'),
    (b"plus", b'+'),
    (b"equals", b'='),
    (b"lowbar", b'_'),
    (b"underbar", b'_'),
    (b"hyphen", b'-'),
    (b"dash", b'-'),
    (b"minus", b'-'),
    (b"percnt", b'%'),
    (b"quot", b'"'),
    (b"period", b'.'),
];

/// Named entities HTML decoders read without their `;`.
const LEGACY: [(&[u8], u8); 2] = [(b"amp", b'&'), (b"quot", b'"')];

/// Most digits or letters of an entity.
const ENTITY_MAX: usize = 8;

fn entity(e: &[u8]) -> Parse {
    let last = e[e.len() - 1];
    if e.get(1) == Some(&b'#') {
        let hex = matches!(e.get(2), Some(b'x' | b'X'));
        let from = if hex { 3 } else { 2 };
        let Some(digits) = e.get(from..) else {
            return Parse::More;
        };
        let is_digit = |b: &u8| {
            if hex {
                b.is_ascii_hexdigit()
            } else {
                b.is_ascii_digit()
            }
        };
        let run = digits.iter().take_while(|b| is_digit(b)).count();
        if run == digits.len() {
            return if run > ENTITY_MAX {
                Parse::Invalid
            } else {
                Parse::More
            };
        }
        if run == 0 {
            return Parse::Invalid;
        }
        let value = byte_of(number(&digits[..run], if hex { 16 } else { 10 }));
        // Terminated by `;` (used) or by anything else (read again).
        let used = if last == b';' { e.len() } else { e.len() - 1 };
        return Parse::Done(Some(value), used);
    }
    let name = &e[1..];
    let letters = name.iter().take_while(|b| b.is_ascii_alphabetic()).count();
    if letters == name.len() {
        return if letters > ENTITY_MAX {
            Parse::Invalid
        } else {
            Parse::More
        };
    }
    // `&amp` and `&quot` are read without their `;` too, as HTML
    // decoders read them (found by an attacker: `&amp#x58;`).
    if last != b';' && letters + 1 == name.len() {
        return LEGACY
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(&name[..letters]))
            .map_or(Parse::Invalid, |(_, v)| Parse::Done(Some(*v), e.len() - 1));
    }
    if last != b';' || letters + 1 != name.len() {
        return Parse::Invalid;
    }
    let name = &name[..letters];
    ENTITIES
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map_or(Parse::Invalid, |(_, v)| Parse::Done(Some(*v), e.len()))
}

/// The unescaped view of a stream: its decoder and the last bytes it
/// produced (which could still start a form), and the same again over that
/// view's output (a second level of escaping: `%2541`, `&amp;#65;`).
#[derive(Debug, Default)]
struct UnescapedStream {
    view: Unescaped,
    tail: Vec<u8>,
    tail_at: Vec<u64>,
    again: Unescaped,
    again_tail: Vec<u8>,
    again_tail_at: Vec<u64>,
}

impl UnescapedStream {
    /// Reads `chunk` (starting at offset `base`); whether either level now
    /// holds a needle.
    fn feed(&mut self, needles: &Needles, chunk: &[u8], base: u64, scanned: usize) -> bool {
        let mut out = std::mem::take(&mut self.tail);
        let mut at = std::mem::take(&mut self.tail_at);
        let kept = out.len();
        for (i, b) in chunk.iter().enumerate() {
            self.view.push(*b, base + i as u64, &mut out, &mut at);
        }
        let mut again = std::mem::take(&mut self.again_tail);
        let mut again_at = std::mem::take(&mut self.again_tail_at);
        let again_kept = again.len();
        for (b, offset) in out[kept..].iter().zip(&at[kept..]) {
            self.again.unescape(*b, *offset, &mut again, &mut again_at);
        }
        let found = (out.len() > kept && needles.is_match(&out, scanned))
            || (again.len() > again_kept && needles.is_match(&again, scanned));
        let keep = out.len().saturating_sub(WINDOW - 1);
        self.tail = out.split_off(keep);
        self.tail_at = at.split_off(keep);
        let keep = again.len().saturating_sub(WINDOW - 1);
        self.again_tail = again.split_off(keep);
        self.again_tail_at = again_at.split_off(keep);
        found
    }

    /// The first offset whose bytes could still be part of a form.
    fn safe(&self, total: u64) -> u64 {
        [
            self.tail_at.first().copied(),
            self.view.pending(),
            self.again_tail_at.first().copied(),
            self.again.pending(),
        ]
        .into_iter()
        .flatten()
        .fold(total, u64::min)
    }
}

/// Magic numbers searched for anywhere in a stream (with the format they
/// start): gzip members and zip entries are inflated, the others withheld.
const MAGICS: [(&[u8], Format); 7] = [
    (&[0x1f, 0x8b, 0x08], Format::Gzip),
    (b"PK\x03\x04", Format::Zip),
    (&[0x28, 0xb5, 0x2f, 0xfd], Format::Opaque("zstd")),
    (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], Format::Opaque("xz")),
    (&[b'7', b'z', 0xbc, 0xaf, 0x27, 0x1c], Format::Opaque("7z")),
    (b"Rar!\x1a\x07", Format::Opaque("rar")),
    (&[0x04, 0x22, 0x4d, 0x18], Format::Opaque("lz4")),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Gzip,
    Zlib,
    Zip,
    Opaque(&'static str),
}

fn magic_automaton() -> &'static AhoCorasick {
    static MAGIC: OnceLock<AhoCorasick> = OnceLock::new();
    MAGIC.get_or_init(|| {
        AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::Standard)
            .build(MAGICS.iter().map(|(m, _)| *m))
            .expect("a handful of fixed patterns")
    })
}

/// Longest magic, minus one: raw bytes kept to find a magic split across
/// chunks.
const MAGIC_TAIL: usize = 5;

/// The format a body starting with `head` (at least four bytes) is in,
/// for the magics only recognised at the start.
///
/// Every valid zlib header is one: method 8, any window up to 32 KiB
/// (`CINFO` 0 to 7: a first byte of 0x08, 0x18, ... 0x78) and the check
/// bits right. One asking for a preset dictionary cannot be searched.
fn leading_format(head: &[u8]) -> Option<Format> {
    match head {
        [cmf, flg, ..]
            if cmf & 0x0f == 8
                && cmf >> 4 <= 7
                && (u16::from(*cmf) * 256 + u16::from(*flg)).is_multiple_of(31) =>
        {
            if flg & 0x20 == 0 {
                Some(Format::Zlib)
            } else if looks_like_text(&head[2..]) {
                // Text that starts with two such characters (`80`, `Hj`):
                // a dictionary id and deflate data are binary.
                None
            } else {
                Some(Format::Opaque("zlib (with a preset dictionary)"))
            }
        }
        [b'B', b'Z', b'h', b'1'..=b'9', ..] => Some(Format::Opaque("bzip2")),
        _ => None,
    }
}

/// Whether the first bytes of `rest` (up to 64) are all printable ASCII or
/// whitespace, as no dictionary id followed by deflate data would be.
fn looks_like_text(rest: &[u8]) -> bool {
    rest.iter()
        .take(64)
        .all(|b| matches!(b, b'\t' | b'\n' | b'\r' | 0x20..=0x7e))
}

enum Inflater {
    Gzip(flate2::write::GzDecoder<Vec<u8>>),
    Zlib(flate2::write::ZlibDecoder<Vec<u8>>),
    Deflate(flate2::write::DeflateDecoder<Vec<u8>>),
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Gzip(_) => "gzip",
            Self::Zlib(_) => "zlib",
            Self::Deflate(_) => "deflate",
        })
    }
}

impl Inflater {
    /// Takes compressed bytes; how many it used and what it inflated them
    /// to, or `None` at the end of the stream.
    ///
    /// # Errors
    /// [`Withheld::Opaque`] on data it cannot inflate (bad data, a preset
    /// dictionary): a client might still read something from it.
    fn write(&mut self, input: &[u8]) -> Result<Option<(usize, Vec<u8>)>, Withheld> {
        fn step<W: std::io::Write>(w: &mut W, input: &[u8]) -> std::io::Result<usize> {
            let n = w.write(input)?;
            w.flush()?;
            Ok(n)
        }
        let name = format!("{self:?}");
        let stepped = match self {
            Self::Gzip(d) => step(d, input).map(|n| (n, std::mem::take(d.get_mut()))),
            Self::Zlib(d) => step(d, input).map(|n| (n, std::mem::take(d.get_mut()))),
            Self::Deflate(d) => step(d, input).map(|n| (n, std::mem::take(d.get_mut()))),
        };
        match stepped {
            Ok((0, out)) if out.is_empty() => Ok(None),
            Ok(done) => Ok(Some(done)),
            Err(e) => Err(Withheld::Opaque(format!(
                "it holds {name} data the gate cannot inflate ({e})"
            ))),
        }
    }
}

#[derive(Debug)]
enum Phase {
    /// A zip local header being read.
    ZipHeader(Vec<u8>),
    /// Bytes to pass over (a zip entry's name and extra field).
    Skip(u64),
    /// Inflating.
    Inflate(Box<Inflater>),
    /// Ended, or turned out not to be compressed data.
    Done,
}

/// One compressed payload of a stream being inflated and searched.
#[derive(Debug)]
struct Payload {
    /// Offset (in the outer stream) of its first byte.
    start: u64,
    phase: Phase,
    /// The search of what it inflates to.
    inner: Box<Scanner>,
    /// Inflated bytes so far.
    produced: u64,
    /// After how many outer bytes it had produced how many (oldest
    /// first): outer bytes are released only up to a point whose output
    /// has been searched.
    checkpoints: VecDeque<(u64, u64)>,
}

impl Payload {
    fn new(start: u64, format: Format, needles: &Arc<Needles>, depth: usize) -> Self {
        let phase = match format {
            Format::Gzip => Phase::Inflate(Box::new(Inflater::Gzip(
                flate2::write::GzDecoder::new(Vec::new()),
            ))),
            Format::Zlib => Phase::Inflate(Box::new(Inflater::Zlib(
                flate2::write::ZlibDecoder::new(Vec::new()),
            ))),
            Format::Zip | Format::Opaque(_) => Phase::ZipHeader(Vec::new()),
        };
        Self {
            start,
            phase,
            inner: Box::new(Scanner::inner(Arc::clone(needles), depth + 1)),
            produced: 0,
            checkpoints: VecDeque::new(),
        }
    }

    /// Takes the outer bytes `data`, the first at offset `at`.
    fn feed(&mut self, mut data: &[u8], mut at: u64, budget: &mut u64) -> Result<(), Withheld> {
        while !data.is_empty() {
            match &mut self.phase {
                Phase::Done => return Ok(()),
                Phase::ZipHeader(header) => {
                    let take = (30 - header.len()).min(data.len());
                    header.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    at += take as u64;
                    if header.len() == 30 {
                        self.phase = zip_entry(header)?;
                    }
                }
                Phase::Skip(n) => {
                    let take = usize::try_from(*n).unwrap_or(usize::MAX).min(data.len());
                    *n -= take as u64;
                    data = &data[take..];
                    at += take as u64;
                    if *n == 0 {
                        self.phase = Phase::Inflate(Box::new(Inflater::Deflate(
                            flate2::write::DeflateDecoder::new(Vec::new()),
                        )));
                    }
                }
                Phase::Inflate(inflater) => {
                    let piece = &data[..data.len().min(PIECE)];
                    let stepped = match inflater.write(piece) {
                        // Two leading bytes that only happen to form a zlib
                        // header (`80`, `x^`, `Hj`…) with no deflate data
                        // after them: plain bytes, searched as such.
                        Err(_) if self.produced == 0 && matches!(**inflater, Inflater::Zlib(_)) => {
                            self.phase = Phase::Done;
                            return Ok(());
                        }
                        other => other?,
                    };
                    let Some((used, out)) = stepped else {
                        self.phase = Phase::Done;
                        return Ok(());
                    };
                    data = &data[used..];
                    at += used as u64;
                    self.produced += out.len() as u64;
                    *budget = budget.checked_sub(out.len() as u64).ok_or_else(|| {
                        Withheld::Opaque(format!(
                            "compressed content inflates past {} MiB (the gate's bound per \
                             response)",
                            MAX_INFLATED / (1024 * 1024)
                        ))
                    })?;
                    self.inner.absorb(&out, budget)?;
                    self.checkpoints.push_back((at, self.produced));
                }
            }
        }
        Ok(())
    }

    /// The first outer offset that may not be passed on yet, or `None`
    /// when nothing of this payload is held back.
    fn safe(&mut self) -> Option<u64> {
        match self.phase {
            Phase::Done => None,
            Phase::ZipHeader(_) | Phase::Skip(_) => Some(self.start),
            Phase::Inflate(_) => {
                let searched = self.inner.safe();
                while self.checkpoints.len() > 1 && self.checkpoints[1].1 <= searched {
                    self.checkpoints.pop_front();
                }
                Some(match self.checkpoints.front() {
                    Some((at, produced)) if *produced <= searched => *at,
                    _ => self.start,
                })
            }
        }
    }
}

/// What follows a zip local header: the entry's data inflated (deflate),
/// passed over (stored: its bytes are searched as they are), or a refusal.
fn zip_entry(h: &[u8]) -> Result<Phase, Withheld> {
    let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
    let (flags, method) = (u16_at(6), u16_at(8));
    let skip = u64::from(u16_at(26)) + u64::from(u16_at(28));
    if flags & 1 != 0 {
        return Err(Withheld::Opaque(
            "it holds an encrypted zip entry, which the gate cannot search".into(),
        ));
    }
    match method {
        0 => Ok(Phase::Done),
        8 if skip == 0 => Ok(Phase::Inflate(Box::new(Inflater::Deflate(
            flate2::write::DeflateDecoder::new(Vec::new()),
        )))),
        8 => Ok(Phase::Skip(skip)),
        other => Err(Withheld::Opaque(format!(
            "it holds a zip entry compressed with method {other}, which the gate cannot \
             search (only stored and deflate)"
        ))),
    }
}

fn opaque(format: &str) -> Withheld {
    Withheld::Opaque(format!(
        "it holds {format}-compressed data, which the gate cannot search"
    ))
}

/// Scans a byte stream as a whole, in both views, and inflates and scans
/// every compressed payload in it ([module docs](self)). Bytes are passed
/// on only once nothing that could still become a form includes them.
#[derive(Debug)]
pub struct Scanner {
    needles: Arc<Needles>,
    /// Bytes not yet passed on (`None` for a payload's inner scanner,
    /// which passes nothing on).
    held: Option<BytesMut>,
    /// Bytes taken so far.
    total: u64,
    /// The last bytes of the folded view that could start a form.
    plain_tail: Vec<u8>,
    unescaped: UnescapedStream,
    /// The last raw bytes, for a magic split across chunks.
    magic_tail: Vec<u8>,
    /// The start has been looked at for the magics recognised there.
    head_checked: bool,
    payloads: Vec<Payload>,
    depth: usize,
    /// Offset of the body's first byte: the length of the text the guest
    /// sees before it ([`Scanner::after`]).
    origin: u64,
    /// Inflated bytes this stream may still search (the outermost
    /// scanner's, shared with its payloads through `absorb`).
    budget: u64,
}

impl Scanner {
    /// A scanner for `needles`.
    pub fn new(needles: Arc<Needles>) -> Self {
        let mut s = Self::inner(needles, 0);
        s.held = Some(BytesMut::new());
        s
    }

    fn inner(needles: Arc<Needles>, depth: usize) -> Self {
        Self {
            needles,
            held: None,
            total: 0,
            plain_tail: Vec::new(),
            unescaped: UnescapedStream::default(),
            magic_tail: Vec::new(),
            head_checked: false,
            payloads: Vec::new(),
            depth,
            budget: MAX_INFLATED,
            origin: 0,
        }
    }

    /// A scanner for a body that the guest reads right after `prefix` (the
    /// response's header values): a form split between them is found.
    /// `prefix` itself is searched as text only (never passed on, never
    /// inflated).
    ///
    /// # Errors
    /// [`Withheld::Leak`] when `prefix` already holds a form of a token.
    pub fn after(needles: Arc<Needles>, prefix: &[u8]) -> Result<Self, Withheld> {
        let mut s = Self::new(needles);
        if prefix.is_empty() {
            return Ok(s);
        }
        s.text(prefix)?;
        s.origin = s.total;
        Ok(s)
    }

    /// Takes `chunk`; returns the bytes that may be passed on now.
    ///
    /// # Errors
    /// [`Withheld`] when the stream so far contains a form of a token, or
    /// something the gate cannot search. Nothing more is passed on then.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Bytes, Withheld> {
        let mut budget = self.budget;
        let result = self.absorb(chunk, &mut budget);
        self.budget = budget;
        if let Err(e) = result {
            if let Some(held) = &mut self.held {
                held.clear();
            }
            return Err(e);
        }
        let safe = self.safe();
        let Some(held) = &mut self.held else {
            return Ok(Bytes::new());
        };
        held.extend_from_slice(chunk);
        let start = self.total - held.len() as u64;
        let pass = usize::try_from(safe.saturating_sub(start))
            .unwrap_or(usize::MAX)
            .min(held.len());
        Ok(held.split_to(pass).freeze())
    }

    /// Searches `chunk` (and what it inflates to).
    fn absorb(&mut self, chunk: &[u8], budget: &mut u64) -> Result<(), Withheld> {
        if chunk.is_empty() {
            return Ok(());
        }
        let base = self.total;
        self.text(chunk)?;

        // Compressed payloads already open take the new bytes.
        for p in &mut self.payloads {
            let from = usize::try_from(p.start.saturating_sub(base)).unwrap_or(usize::MAX);
            if from < chunk.len() {
                p.feed(&chunk[from..], base + from as u64, budget)?;
            }
        }
        self.payloads.retain(|p| !matches!(p.phase, Phase::Done));

        // New ones, found by magic.
        let mut raw = std::mem::take(&mut self.magic_tail);
        let raw_base = base - raw.len() as u64;
        raw.extend_from_slice(chunk);
        let mut found: Vec<(u64, Format)> = Vec::new();
        if !self.head_checked && raw_base == self.origin && raw.len() >= 4 {
            self.head_checked = true;
            if let Some(f) = leading_format(&raw) {
                found.push((self.origin, f));
            }
        }
        for m in magic_automaton().find_overlapping_iter(&raw) {
            let at = raw_base + m.start() as u64;
            // A magic wholly inside the kept tail was seen last time.
            if m.end() as u64 + raw_base > base {
                found.push((at, MAGICS[m.pattern().as_usize()].1));
            }
        }
        for (at, format) in found {
            if let Format::Opaque(name) = format {
                return Err(opaque(name));
            }
            if self.depth >= MAX_DEPTH {
                return Err(Withheld::Opaque(format!(
                    "it holds compressed data nested more than {MAX_DEPTH} deep"
                )));
            }
            if self.payloads.len() >= MAX_DECODERS {
                return Err(Withheld::Opaque(
                    "it holds too many compressed payloads at once".into(),
                ));
            }
            let mut p = Payload::new(at, format, &self.needles, self.depth);
            let from = usize::try_from(at - raw_base).unwrap_or(usize::MAX);
            p.feed(&raw[from..], at, budget)?;
            if !matches!(p.phase, Phase::Done) {
                self.payloads.push(p);
            }
        }
        let keep = raw.len().saturating_sub(MAGIC_TAIL);
        self.magic_tail = raw.split_off(keep);
        Ok(())
    }

    /// Searches `chunk` in the two text views.
    fn text(&mut self, chunk: &[u8]) -> Result<(), Withheld> {
        let base = self.total;
        let scanned = usize::try_from(base).unwrap_or(usize::MAX);
        self.total += chunk.len() as u64;

        // The folded bytes as they are.
        let mut plain = std::mem::take(&mut self.plain_tail);
        plain.extend(chunk.iter().map(|b| FOLD[usize::from(*b)]));
        let found = self.needles.is_match(&plain, scanned);
        let keep = plain.len().saturating_sub(WINDOW - 1);
        self.plain_tail = plain.split_off(keep);
        // Unescaped.
        let found = found || self.unescaped.feed(&self.needles, chunk, base, scanned);
        if found {
            return Err(Withheld::Leak);
        }
        Ok(())
    }

    /// The first offset that may not be passed on yet.
    fn safe(&mut self) -> u64 {
        let mut safe = self.total - self.plain_tail.len() as u64;
        safe = safe.min(self.unescaped.safe(self.total));
        if !self.head_checked {
            safe = 0;
        }
        for p in &mut self.payloads {
            if let Some(s) = p.safe() {
                safe = safe.min(s);
            }
        }
        safe
    }

    /// The bytes still held back, at the end of the stream.
    pub fn finish(&mut self) -> Bytes {
        self.held
            .as_mut()
            .map_or_else(Bytes::new, |h| h.split().freeze())
    }

    /// How many bytes are held back.
    pub fn held(&self) -> usize {
        self.held.as_ref().map_or(0, BytesMut::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE};
    use std::io::Write as _;

    const TOKEN: &str = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhIn0.\
        q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJCrze8SNFZ4kA";

    fn sig() -> &'static str {
        TOKEN.rsplit('.').next().unwrap()
    }

    /// A token minted after a call started is searched for in that call's
    /// answer too, short or long: a service may stash a later call's token
    /// into an earlier call's answer still being read (found by an
    /// attacker, when a call's tokens were fixed at its start).
    #[test]
    fn a_token_minted_after_a_call_started_is_searched_in_its_answer() {
        let combined = Arc::new(Combined::default());
        let first = Arc::new(TokenNeedles::new(TOKEN));
        combined.minted(vec![Arc::clone(&first)]);
        let call = Needles::shared(vec![first.clone()], Arc::clone(&combined));
        let raw: Vec<u8> = (0..64u32).map(|j| ((j * 7919 + 13) % 251) as u8).collect();
        let later = format!("h.p.{}", URL_SAFE_NO_PAD.encode(raw));
        let signature = later.rsplit('.').next().unwrap().as_bytes().to_vec();
        assert!(!call.is_match(&fold(&signature), 0));
        combined.minted(vec![first, Arc::new(TokenNeedles::new(&later))]);
        assert!(call.is_match(&fold(&signature), 0), "short answer");
        assert!(
            call.is_match(&fold(&signature), COMBINE_AFTER),
            "long answer"
        );
        assert!(call.found(&signature));
    }

    /// A job's calls made at once, each with the tokens minted up to its
    /// own, have their long answers searched with one automaton of the
    /// job's tokens, not one each (about 3.5 MB for 64 tokens: a tenant's
    /// calls left unread held 1.08 GB of the gateway); a token minted
    /// since has one built anew, which finds every token's forms.
    #[test]
    fn a_jobs_calls_share_one_automaton_of_its_tokens() {
        let tokens: Vec<String> = (0..40u32)
            .map(|i| {
                let raw: Vec<u8> = (0..64u32)
                    .map(|j| ((j * 7919 + i * 104_729) % 251) as u8)
                    .collect();
                format!("h.p.{}", URL_SAFE_NO_PAD.encode(raw))
            })
            .collect();
        let minted: Vec<Arc<TokenNeedles>> = tokens
            .iter()
            .map(|t| Arc::new(TokenNeedles::new(t)))
            .collect();
        let combined = Arc::new(Combined::default());
        combined.minted(minted.clone());
        let calls: Vec<Needles> = (1..=minted.len())
            .map(|k| Needles::shared(minted[..k].to_vec(), Arc::clone(&combined)))
            .collect();
        let clean = fold(&vec![b'x'; 4096]);
        for call in &calls {
            assert!(!call.is_match(&clean, COMBINE_AFTER));
        }
        assert_eq!(combined.built.load(std::sync::atomic::Ordering::Relaxed), 1);
        // Each call finds every token's forms, its own among them.
        for (k, call) in calls.iter().enumerate() {
            let own = tokens[k].rsplit('.').next().unwrap();
            assert!(
                call.is_match(&fold(own.as_bytes()), COMBINE_AFTER),
                "call {k}"
            );
        }
        // A token minted after the last automaton is searched beside it,
        // by every call, without building: its forms are found.
        let late = Arc::new(TokenNeedles::new(&format!("h.p.{}", sig())));
        let mut with_late = minted.clone();
        with_late.push(Arc::clone(&late));
        combined.minted(with_late.clone());
        let call = Needles::shared(with_late.clone(), Arc::clone(&combined));
        assert!(call.is_match(&fold(sig().as_bytes()), COMBINE_AFTER));
        assert!(calls[39].is_match(&fold(sig().as_bytes()), COMBINE_AFTER));
        assert_eq!(combined.built.load(std::sync::atomic::Ordering::Relaxed), 1);
        // So are calls' own tokens the job no longer lists (past their
        // search), read in turn: nothing is built however often.
        let gone: Vec<Needles> = (0..2u32)
            .map(|i| {
                let own = Arc::new(TokenNeedles::new(&format!("h.p.gone{i}")));
                Needles::shared(vec![own], Arc::clone(&combined))
            })
            .collect();
        for _ in 0..50 {
            for call in &gone {
                assert!(!call.is_match(&clean, COMBINE_AFTER));
            }
        }
        assert!(gone[1].is_match(&fold(b"gone1"), COMBINE_AFTER));
        assert_eq!(combined.built.load(std::sync::atomic::Ordering::Relaxed), 1);
        // Past `BESIDE` tokens the automaton lacks, it is built anew to
        // hold them all, once.
        let more: Vec<Arc<TokenNeedles>> = (0..BESIDE as u32)
            .map(|i| Arc::new(TokenNeedles::new(&format!("h.p.more{i}"))))
            .collect();
        let mut all = with_late;
        all.extend(more.iter().cloned());
        combined.minted(all.clone());
        let call = Needles::shared(all, Arc::clone(&combined));
        assert!(call.is_match(&fold(b"more7"), COMBINE_AFTER));
        assert!(call.is_match(&fold(sig().as_bytes()), COMBINE_AFTER));
        assert!(call.is_match(&fold(b"more0"), COMBINE_AFTER));
        assert_eq!(combined.built.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    fn raw() -> Vec<u8> {
        URL_SAFE_NO_PAD.decode(sig()).unwrap()
    }

    fn needles() -> Arc<Needles> {
        Arc::new(Needles::new(TOKEN, []))
    }

    /// Runs `body` through a scanner in `chunk`-byte pieces: the bytes
    /// passed on, and why it was withheld if it was.
    fn scan(body: &[u8], chunk: usize) -> (Vec<u8>, Option<Withheld>) {
        let mut s = Scanner::new(needles());
        let mut passed = Vec::new();
        for part in body.chunks(chunk.max(1)) {
            match s.feed(part) {
                Ok(out) => passed.extend_from_slice(&out),
                Err(e) => return (passed, Some(e)),
            }
        }
        passed.extend_from_slice(&s.finish());
        (passed, None)
    }

    fn utf16(text: &str, big: bool) -> Vec<u8> {
        text.encode_utf16()
            .flat_map(|u| {
                if big {
                    u.to_be_bytes()
                } else {
                    u.to_le_bytes()
                }
            })
            .collect()
    }

    fn each_byte(text: &str, f: impl Fn(u8) -> String) -> Vec<u8> {
        text.bytes().map(f).collect::<String>().into_bytes()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(data).unwrap();
        z.finish().unwrap()
    }

    fn zlib(data: &[u8]) -> Vec<u8> {
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(data).unwrap();
        z.finish().unwrap()
    }

    fn deflate(data: &[u8]) -> Vec<u8> {
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        z.write_all(data).unwrap();
        z.finish().unwrap()
    }

    /// A one-entry zip local header and data, `method` 0 (stored) or 8.
    fn zip(name: &str, data: &[u8], method: u16) -> Vec<u8> {
        let body = if method == 8 {
            deflate(data)
        } else {
            data.to_vec()
        };
        let mut z = b"PK\x03\x04".to_vec();
        z.extend_from_slice(&20u16.to_le_bytes());
        z.extend_from_slice(&0u16.to_le_bytes());
        z.extend_from_slice(&method.to_le_bytes());
        z.extend_from_slice(&[0; 8]);
        #[allow(clippy::cast_possible_truncation)]
        let (c, u, n) = (body.len() as u32, data.len() as u32, name.len() as u16);
        z.extend_from_slice(&c.to_le_bytes());
        z.extend_from_slice(&u.to_le_bytes());
        z.extend_from_slice(&n.to_le_bytes());
        z.extend_from_slice(&0u16.to_le_bytes());
        z.extend_from_slice(name.as_bytes());
        z.extend_from_slice(&body);
        z.extend_from_slice(b"PK\x01\x02 central directory follows");
        z
    }

    /// Every text form under test, for the echoed `Bearer <token>`.
    fn text_forms() -> Vec<(String, Vec<u8>)> {
        let bearer = format!("Bearer {TOKEN}");
        let mut forms: Vec<(String, Vec<u8>)> = vec![
            ("plain".into(), bearer.clone().into_bytes()),
            ("lowercase".into(), bearer.to_lowercase().into_bytes()),
            ("uppercase".into(), bearer.to_uppercase().into_bytes()),
            ("signature".into(), sig().as_bytes().to_vec()),
            ("window".into(), sig().as_bytes()[10..33].to_vec()),
            ("raw".into(), raw()),
            ("raw part".into(), raw()[5..30].to_vec()),
            ("hex raw".into(), hex::encode(raw()).into_bytes()),
            ("HEX raw".into(), hex::encode_upper(raw()).into_bytes()),
            ("hex text".into(), hex::encode(&bearer).into_bytes()),
            ("HEX text".into(), hex::encode_upper(&bearer).into_bytes()),
            ("utf-16le".into(), utf16(&bearer, false)),
            ("utf-16be".into(), utf16(&bearer, true)),
            (
                "utf-32le".into(),
                bearer
                    .chars()
                    .flat_map(|c| u32::from(c).to_le_bytes())
                    .collect(),
            ),
            ("%XX".into(), each_byte(&bearer, |b| format!("%{b:02X}"))),
            ("%xx".into(), each_byte(&bearer, |b| format!("%{b:02x}"))),
            (
                "%u00xx".into(),
                each_byte(&bearer, |b| format!("%u00{b:02x}")),
            ),
            (
                "&#xHH;".into(),
                each_byte(&bearer, |b| format!("&#x{b:X};")),
            ),
            (
                "&#x00hh;".into(),
                each_byte(&bearer, |b| format!("&#x00{b:x};")),
            ),
            ("&#DD;".into(), each_byte(&bearer, |b| format!("&#{b};"))),
            (
                "&#xhh%3B".into(),
                each_byte(&bearer, |b| format!("&#x{b:x}%3B")),
            ),
            (
                "&#DD\\u003b".into(),
                each_byte(&bearer, |b| format!("&#{b}\\u003b")),
            ),
            (
                "&amp#xhh;".into(),
                each_byte(&bearer, |b| format!("&amp#x{b:x};")),
            ),
            (
                "&#x0000000hh;".into(),
                each_byte(&bearer, |b| format!("&#x0000000{b:x};")),
            ),
            (
                "&#00000000DD; (a thousand zeros)".into(),
                each_byte(&bearer, |b| format!("&#{}{b};", "0".repeat(1000))),
            ),
            (
                "UTF-16LE, percent-escaped".into(),
                each_byte(&bearer, |b| format!("%{b:02X}%00")),
            ),
            (
                "UTF-16BE, JSON-escaped".into(),
                each_byte(&bearer, |b| format!("\\u0000\\u{b:04x}")),
            ),
            ("&#DD".into(), each_byte(&bearer, |b| format!("&#{b}"))),
            (
                "\\u00xx".into(),
                each_byte(&bearer, |b| format!("\\u{b:04x}")),
            ),
            (
                "\\u00XX".into(),
                each_byte(&bearer, |b| format!("\\u{b:04X}")),
            ),
            (
                "\\xhh".into(),
                each_byte(&bearer, |b| format!("\\x{b:02x}")),
            ),
            ("=HH".into(), each_byte(&bearer, |b| format!("={b:02X}"))),
            (
                "%25XX".into(),
                each_byte(&bearer, |b| format!("%25{b:02X}")),
            ),
            (
                "&amp;#xHH;".into(),
                each_byte(&bearer, |b| format!("&amp;#x{b:X};")),
            ),
            (
                "mixed escapes".into(),
                bearer
                    .bytes()
                    .enumerate()
                    .map(|(i, b)| match i % 5 {
                        0 => format!("%{b:02x}"),
                        1 => format!("&#{b};"),
                        2 => format!("\\u{b:04X}"),
                        3 => char::from(b).to_string(),
                        _ => format!("={b:02X}"),
                    })
                    .collect::<String>()
                    .into_bytes(),
            ),
            (
                "utf-16 of %xx".into(),
                utf16(
                    &String::from_utf8(each_byte(&bearer, |b| format!("%{b:02x}"))).unwrap(),
                    false,
                ),
            ),
        ];
        // Quoted-printable with soft line breaks every 20 characters.
        let mut qp = String::new();
        for (i, c) in bearer.chars().enumerate() {
            if i % 20 == 19 {
                qp.push_str("=\r\n");
            }
            qp.push(c);
        }
        forms.push(("quoted-printable".into(), qp.into_bytes()));
        for prefix in ["", "B", "Be", "Bearer ", "authorization: Bearer "] {
            let text = format!("{prefix}{TOKEN}");
            for (name, engine) in [
                ("std", STANDARD_NO_PAD),
                ("url", URL_SAFE_NO_PAD),
                ("std=", STANDARD),
                ("url=", URL_SAFE),
            ] {
                forms.push((
                    format!("base64 {name} of {prefix:?}+token"),
                    engine.encode(&text).into_bytes(),
                ));
            }
            forms.push((
                format!("base64 of {prefix:?}+token, lowercased"),
                STANDARD.encode(&text).to_lowercase().into_bytes(),
            ));
        }
        for pad in 0..3 {
            let mut bytes = vec![7u8; pad];
            bytes.extend_from_slice(&raw());
            for (name, engine) in [("std", STANDARD), ("url", URL_SAFE_NO_PAD)] {
                let b64 = engine.encode(&bytes);
                forms.push((
                    format!("base64 {name} of raw at {pad}"),
                    b64.clone().into_bytes(),
                ));
                // As PHP's json_encode writes it.
                forms.push((
                    format!("json base64 {name} of raw at {pad}"),
                    b64.replace('/', "\\/").into_bytes(),
                ));
            }
        }
        forms
    }

    #[test]
    fn every_form_of_the_token_is_found() {
        let n = needles();
        for (name, form) in text_forms() {
            assert!(n.found(&form), "{name}: {}", String::from_utf8_lossy(&form));
            let body = [b"{\"echo\":\"".as_slice(), &form, b"\"}"].concat();
            assert_eq!(scan(&body, 4096).1, Some(Withheld::Leak), "{name}");
        }
    }

    #[test]
    fn what_is_not_a_token_passes() {
        let n = needles();
        assert!(!n.found(b"eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhIn0."));
        assert!(!n.found(&sig().as_bytes()[1..16]));
        assert!(!n.found(b"{\"tenant\":\"acme\",\"frame\":\"#a1b2c3\"}"));
        assert!(!n.found(b"%41%42 &#65; &amp; \\u0041 =3D =\r\n \\x41 &bogus; &#xZZ"));
        let other = "Bearer eyJ0.eyJ0.ZZ93wFkSXfKDsaf9TOGa5lLwO8yJ1WojRZZ";
        assert!(!n.found(other.as_bytes()));
    }

    /// Every form, fed one byte at a time: found before any 16 characters
    /// of the signature (in that form) were passed on.
    #[test]
    fn a_form_split_across_chunks_is_found_before_it_passes() {
        let preamble = "x".repeat(100);
        for (name, form) in text_forms() {
            let body = [preamble.as_bytes(), &form, b"\"}"].concat();
            for chunk in [1, 3, 7, 64] {
                let (passed, why) = scan(&body, chunk);
                assert_eq!(why, Some(Withheld::Leak), "{name} by {chunk}");
                assert!(
                    !needles().found(&passed),
                    "{name} by {chunk}: {}",
                    String::from_utf8_lossy(&passed)
                );
            }
        }
        // The plain token: at most 15 of its bytes pass.
        let body = format!("{preamble}{{\"echo\":\"Bearer {TOKEN}\"}}").into_bytes();
        let (passed, _) = scan(&body, 1);
        assert!(!String::from_utf8_lossy(&passed).contains(&sig()[..WINDOW - 1]));
    }

    #[test]
    fn a_clean_stream_passes_whole_and_in_order() {
        let mut body: Vec<u8> = (0..10_000u32).flat_map(|i| i.to_le_bytes()).collect();
        body.extend_from_slice(b"%41%4 &#x41; &#65 \\u0041 \\x4 =4 =\r\n&amp;& % \\");
        body.extend(gzip(b"a clean compressed part"));
        body.extend(zip("a.txt", b"a clean zip entry", 8));
        for chunk in [1, 333, 100_000] {
            let mut s = Scanner::new(needles());
            let mut out = Vec::new();
            for c in body.chunks(chunk) {
                out.extend_from_slice(&s.feed(c).unwrap());
            }
            out.extend_from_slice(&s.finish());
            assert_eq!(out, body, "by {chunk}");
        }
    }

    /// Compressed payloads, whatever the headers say: gzip and zlib at the
    /// start, gzip and zip entries anywhere, nested.
    #[test]
    fn compressed_forms_are_inflated_and_searched() {
        let echo = format!("{{\"echo\":\"Bearer {TOKEN}\"}}").into_bytes();
        let utf = utf16(&format!("Bearer {TOKEN}"), false);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("gzip", gzip(&echo)),
            ("gzip of utf-16", gzip(&utf)),
            ("zlib", zlib(&echo)),
            (
                "gzip after a prefix",
                [b"log:".to_vec(), gzip(&echo)].concat(),
            ),
            ("gzip of gzip", gzip(&gzip(&echo))),
            ("zip deflate", zip("token.txt", &echo, 8)),
            ("zip stored", zip("token.txt", &echo, 0)),
            (
                "zip second entry",
                [zip("a.txt", b"nothing", 8), zip("b.txt", &echo, 8)].concat(),
            ),
            ("gzip in zip", zip("t.gz", &gzip(&echo), 8)),
        ];
        // Every window size a zlib header can name (256 bytes to 32 KiB).
        let small: Vec<(String, Vec<u8>)> = (0..=7)
            .map(|cinfo| {
                (
                    format!("zlib window {cinfo}"),
                    zlib_header(&zlib(&echo), cinfo, 0),
                )
            })
            .collect();
        let cases = cases
            .into_iter()
            .map(|(n, b)| (n.to_owned(), b))
            .chain(small);
        for (name, body) in cases {
            for chunk in [1, 50, 100_000] {
                let (passed, why) = scan(&body, chunk);
                assert_eq!(why, Some(Withheld::Leak), "{name} by {chunk}");
                // What was passed on inflates to nothing usable.
                for inflated in inflate_all(&passed) {
                    assert!(!needles().found(&inflated), "{name} by {chunk}");
                }
            }
        }
    }

    /// `stream` (zlib) with its header rewritten: window `cinfo`, `fdict`
    /// (0x20 or 0), the check bits fixed.
    fn zlib_header(stream: &[u8], cinfo: u8, fdict: u8) -> Vec<u8> {
        let cmf = (cinfo << 4) | 8;
        let mut flg = (stream[1] & 0xc0) | fdict;
        let rem = (u16::from(cmf) * 256 + u16::from(flg)) % 31;
        flg += u8::try_from((31 - rem) % 31).unwrap();
        [&[cmf, flg], &stream[2..]].concat()
    }

    fn inflate_all(data: &[u8]) -> Vec<Vec<u8>> {
        use std::io::Read as _;
        let mut out = Vec::new();
        for start in 0..data.len() {
            let mut text = Vec::new();
            let _ = flate2::read::GzDecoder::new(&data[start..]).read_to_end(&mut text);
            let _ = flate2::read::ZlibDecoder::new(&data[start..]).read_to_end(&mut text);
            let _ = flate2::read::DeflateDecoder::new(&data[start..]).read_to_end(&mut text);
            if !text.is_empty() {
                out.push(text);
            }
        }
        out
    }

    #[test]
    fn what_cannot_be_searched_is_withheld() {
        let bomb = gzip(&vec![b'a'; usize::try_from(MAX_INFLATED).unwrap() + 1024]);
        let nested = gzip(&gzip(&gzip(&gzip(b"deep"))));
        let mut zstd = vec![0x28, 0xb5, 0x2f, 0xfd];
        zstd.extend_from_slice(&[0; 40]);
        let mut encrypted = zip("a", b"secret", 8);
        encrypted[6] = 1;
        let cases: Vec<(&str, Vec<u8>, &str)> = vec![
            ("bomb", bomb, "inflates past"),
            ("nested", nested, "nested"),
            ("zstd", zstd.clone(), "zstd"),
            ("zstd later", [b"{}".to_vec(), zstd].concat(), "zstd"),
            ("xz", b"\xfd7zXZ\x00\x00\x04 data".to_vec(), "xz"),
            ("bzip2", b"BZh91AY&SY data data data".to_vec(), "bzip2"),
            ("zip bzip2", zip("a", b"x", 12), "method 12"),
            ("zip encrypted", encrypted, "encrypted"),
            (
                "zlib preset dictionary",
                [
                    zlib_header(&zlib(b"x"), 7, 0x20)[..2].to_vec(),
                    vec![0, 0, 0, 1],
                    deflate(b"x"),
                ]
                .concat(),
                "dictionary",
            ),
            (
                "zlib small window preset dictionary",
                [
                    zlib_header(&zlib(b"x"), 2, 0x20)[..2].to_vec(),
                    vec![0, 0, 0, 1],
                    deflate(b"x"),
                ]
                .concat(),
                "dictionary",
            ),
            (
                // A stored block of 300 bytes (more than one piece fed to
                // the inflater), then a block of the reserved type.
                "zlib bad data after some output",
                [
                    &[0x78, 0x01, 0x00, 0x2c, 0x01, 0xd3, 0xfe][..],
                    &[b'a'; 300],
                    &[0x07],
                    &[0xff; 40],
                ]
                .concat(),
                "cannot inflate",
            ),
            (
                "gzip bad data",
                [
                    &b"log:\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"[..],
                    &[0xff; 40],
                ]
                .concat(),
                "cannot inflate",
            ),
            (
                "zip bad data",
                [zip("a", b"x", 8)[..31].to_vec(), vec![0xff; 40]].concat(),
                "cannot inflate",
            ),
        ];
        for (name, body, why) in cases {
            let (passed, got) = scan(&body, 4096);
            match got {
                Some(Withheld::Opaque(reason)) => assert!(reason.contains(why), "{name}: {reason}"),
                other => panic!("{name}: {other:?}"),
            }
            assert!(passed.len() < body.len(), "{name}");
        }
    }

    #[test]
    fn plain_text_that_starts_like_a_zlib_header_passes_whole() {
        // `80`, `x^` and `Hj` are valid zlib headers; what follows does not
        // inflate at all, so it is plain text, searched as such.
        for body in [&b"8000 items in stock"[..], b"x^2 + y^2", b"Hjalmar"] {
            let (passed, got) = scan(body, 4096);
            assert!(
                got.is_none(),
                "{:?}: {got:?}",
                String::from_utf8_lossy(body)
            );
            assert_eq!(passed, body);
        }
        // And the token after such a start is still found.
        let leak = [&b"80 "[..], sig().as_bytes()].concat();
        assert!(scan(&leak, 4096).1.is_some());
    }

    #[test]
    fn a_form_split_between_the_headers_and_the_body_is_found() {
        // Less than a needle on each side.
        let (head, rest) = (&sig()[..10], &sig()[10..24]);
        // The whole form in the prefix.
        assert_eq!(
            Scanner::after(needles(), sig().as_bytes()).err(),
            Some(Withheld::Leak)
        );
        for chunk in [1, 7, 4096] {
            let mut s = Scanner::after(needles(), format!("text/plain{head}").as_bytes())
                .expect("half a form is not one");
            let mut passed = Vec::new();
            let mut why = None;
            for piece in rest.as_bytes().chunks(chunk) {
                match s.feed(piece) {
                    Ok(b) => passed.extend_from_slice(&b),
                    Err(e) => {
                        why = Some(e);
                        break;
                    }
                }
            }
            assert_eq!(why, Some(Withheld::Leak), "by {chunk}");
            assert!(
                !needles().found(format!("{head}{}", String::from_utf8_lossy(&passed)).as_bytes())
            );
        }
        // A clean body after clean headers passes whole; a compressed one
        // is still recognised at its start.
        let mut s = Scanner::after(needles(), b"text/plain123").unwrap();
        let mut passed = s.feed(b"hello, world").unwrap().to_vec();
        passed.extend_from_slice(&s.finish());
        assert_eq!(passed, b"hello, world");
        let mut s = Scanner::after(needles(), b"text/plain123").unwrap();
        assert_eq!(
            s.feed(&zlib_header(&zlib(sig().as_bytes()), 3, 0)).err(),
            Some(Withheld::Leak)
        );
    }

    #[test]
    fn a_long_stream_is_searched_for_every_token_too() {
        let other = TOKEN.replace("q83v", "Zm9v");
        let needles = Arc::new(Needles::new(TOKEN, [other.as_str()]));
        for (t, at) in [(TOKEN, 10usize), (other.as_str(), 200_000)] {
            let mut body = vec![b'x'; 300_000];
            body.splice(at..at + t.len(), t.bytes());
            let mut s = Scanner::new(Arc::clone(&needles));
            let leaked = body.chunks(4096).any(|c| s.feed(c).is_err());
            assert!(leaked, "token at {at}");
        }
    }

    #[test]
    fn earlier_tokens_of_the_job_are_found_too() {
        let other = TOKEN.replace("q83v", "Zm9v");
        let n = Needles::new(TOKEN, [other.as_str()]);
        assert!(n.found(other.as_bytes()));
        assert!(n.found(&other.as_bytes()[other.len() - 40..]));
        assert!(n.found(TOKEN.as_bytes()));
    }

    /// Another job's token: a signature of the same shape, none of its
    /// windows one of [`TOKEN`]'s.
    const OTHER: &str = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJiIn0.\
        Zm9vYmFyQmF6UXV4X19fLS0tenl4d3Z1dHNycXBvbm1sa2ppaGdmZWRjYmFaWVhXVlVUU1JRUE9OTU1MS0pJSEdGRUQ";

    /// A job's scanner that also searches for every token `issued` holds.
    fn scan_issued(issued: &Arc<Issued>, body: &[u8], chunk: usize) -> Option<Withheld> {
        let own = Needles::new(TOKEN, []).and_issued(Arc::clone(issued));
        let mut s = Scanner::new(Arc::new(own));
        for part in body.chunks(chunk.max(1)) {
            if let Err(e) = s.feed(part) {
                return Some(e);
            }
        }
        None
    }

    /// Another job's token, issued by the same gateway, is withheld from
    /// a job's answer: its signature, or any 23 characters of it, plain,
    /// in another letter case, escaped or in UTF-16, wherever it starts and
    /// however the stream is cut (found by an attacker: a service that
    /// stashed one tenant's `Authorization` handed it to another tenant's
    /// guest).
    #[test]
    fn another_jobs_token_is_withheld_in_either_view_however_the_stream_is_cut() {
        let issued = Arc::new(Issued::default());
        let sig = OTHER.rsplit('.').next().unwrap();
        assert!(
            forms(TOKEN)
                .iter()
                .all(|f| !sig.as_bytes().windows(WINDOW).any(|w| fold(w) == *f)),
            "the two signatures share no needle"
        );
        // Not issued yet: its answer passes.
        assert_eq!(scan_issued(&issued, OTHER.as_bytes(), 4096), None);
        issued.add(
            "b",
            OTHER,
            Instant::now() + std::time::Duration::from_secs(60),
        );
        let part = &sig[31..31 + 23];
        let forms: Vec<(&str, Vec<u8>)> = vec![
            ("whole", OTHER.as_bytes().to_vec()),
            ("signature", sig.as_bytes().to_vec()),
            ("23 characters", part.as_bytes().to_vec()),
            ("uppercased", part.to_ascii_uppercase().into_bytes()),
            ("JSON escapes", each_byte(part, |b| format!("\\u{b:04x}"))),
            (
                "HTML references, zeros before",
                each_byte(part, |b| format!("&#x000000{b:x};")),
            ),
            (
                "UTF-16, escaped",
                each_byte(part, |b| format!("%{b:02x}%00")),
            ),
            (
                "references, `;` escaped",
                each_byte(part, |b| format!("&#{b}%3b")),
            ),
            (
                "`&amp` without `;`",
                each_byte(part, |b| format!("&amp#{b};")),
            ),
            ("percent", each_byte(part, |b| format!("%{b:02X}"))),
            ("UTF-16", utf16(part, false)),
        ];
        for (name, form) in &forms {
            assert!(
                Needles::new(TOKEN, [])
                    .and_issued(Arc::clone(&issued))
                    .found(form),
                "{name}"
            );
            for before in 0..ALIGN {
                let body = [
                    " ".repeat(before).as_bytes(),
                    b"{\"earlier\":\"",
                    form,
                    b"\"}",
                ]
                .concat();
                for chunk in [1, 2, 3, 7, 8, 9, 15, 16, 17, 23, 64, 4096] {
                    assert_eq!(
                        scan_issued(&issued, &body, chunk),
                        Some(Withheld::Leak),
                        "{name}, {before} bytes before it, in {chunk}-byte chunks"
                    );
                }
            }
        }
    }

    /// Answers without an issued token pass whole, among many issued: text
    /// of signature characters only, cut anywhere.
    #[test]
    fn answers_without_an_issued_token_pass_among_many_issued() {
        let issued = Arc::new(Issued::default());
        let later = Instant::now() + std::time::Duration::from_secs(60);
        for i in 0..1000u32 {
            let token = format!("h.p.{}", URL_SAFE_NO_PAD.encode(i.to_be_bytes().repeat(16)));
            issued.add("b", &token, later);
        }
        assert_eq!(issued.len(), 1000);
        let text = URL_SAFE_NO_PAD.encode(
            (0..48_000u32)
                .flat_map(|i| (i * 7919).to_le_bytes())
                .collect::<Vec<_>>(),
        );
        for chunk in [1, 5, 4096] {
            assert_eq!(
                scan_issued(&issued, text.as_bytes(), chunk),
                None,
                "{chunk}"
            );
        }
    }

    /// A token is searched for across jobs until its expiry, and no longer
    /// held after it.
    #[test]
    fn an_issued_token_is_let_go_after_its_expiry() {
        let issued = Arc::new(Issued::default());
        let sig = OTHER.rsplit('.').next().unwrap();
        issued.add("b", OTHER, Instant::now());
        assert!(
            Needles::new(TOKEN, [])
                .and_issued(Arc::clone(&issued))
                .found(sig.as_bytes())
        );
        issued.add(
            "a",
            TOKEN,
            Instant::now() + std::time::Duration::from_secs(60),
        );
        assert_eq!(issued.len(), 1);
        let alone = Needles::default().and_issued(Arc::clone(&issued));
        assert!(!alone.found(sig.as_bytes()));
        assert!(alone.found(sig_of(TOKEN).as_bytes()));
    }

    /// Past [`MAX_ISSUED`] live tokens, the tenant holding the most loses
    /// its oldest: a tenant issuing tokens as fast as it can crowds out
    /// its own, never another tenant's.
    #[test]
    fn a_tenant_issuing_past_the_bound_crowds_out_only_its_own_tokens() {
        let issued = Arc::new(Issued::default());
        let later = Instant::now() + std::time::Duration::from_secs(600);
        issued.add("victim", OTHER, later);
        let flood = |i: u32| {
            format!(
                "h.p.{}",
                URL_SAFE_NO_PAD.encode([i.to_be_bytes(), i.to_le_bytes()].concat().repeat(8))
            )
        };
        for i in 0..u32::try_from(MAX_ISSUED).unwrap() {
            issued.add("flood", &flood(i), later);
        }
        assert_eq!(issued.len(), MAX_ISSUED);
        let search = Needles::default().and_issued(Arc::clone(&issued));
        assert!(
            search.found(sig_of(OTHER).as_bytes()),
            "the victim's token was crowded out"
        );
        assert!(!search.found(sig_of(&flood(0)).as_bytes()));
        assert!(search.found(sig_of(&flood(1)).as_bytes()));
        let last = flood(u32::try_from(MAX_ISSUED).unwrap() - 1);
        assert!(search.found(sig_of(&last).as_bytes()));
    }

    fn sig_of(token: &str) -> &str {
        token.rsplit('.').next().unwrap()
    }
}
