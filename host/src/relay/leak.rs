//! Keeping a job's call tokens away from it: the forms a token takes when a
//! service reflects a request header back ([`Needles`]), and a scanner over
//! the whole response stream that withholds it the moment one appears
//! ([`Scanner`]).
//!
//! The signature segment of a call token is its secret: anyone holding the
//! header and payload (which the guest could guess) and the signature holds
//! the token. So the needles are built from the signature, in the encodings
//! a service (or a framework's error page) would plausibly apply:
//!
//! - every 16-character window of the signature text starting at a
//!   multiple of 8 (and the last one): no 23 consecutive characters of the
//!   signature (138 bits) reach the guest, and the whole token is caught;
//!   URL- and HTML-escaping leave those characters as they are;
//! - the raw signature bytes, in windows the same way;
//! - the start ([`HEAD`] bytes) of each encoding of the signature: the hex
//!   of its text, the hex of its raw bytes (lower and upper case), base64
//!   of its raw bytes (standard alphabet), base64 of its text (standard and
//!   URL alphabets) at each of the three alignments a prefix such as
//!   `Bearer ` can give it (without the characters that depend on the
//!   neighbours), and its text with every byte percent-escaped. The start
//!   is enough: it comes first, so it is seen before any later byte of the
//!   encoding could be passed on.
//!
//! Each token's needles are one automaton ([`TokenNeedles`]), built when the
//! token is minted; a call's response is searched for its own token and for
//! the job's earlier ones that may still be valid (a service may hand one
//! call's token back in a later answer). Needles are at most [`HEAD`] bytes
//! long, so a stream holds back `HEAD - 1` bytes.
//!
//! Compression is not a form: the gate asks for, and accepts, only the
//! identity encoding (see `send`).

use aho_corasick::{AhoCorasick, AhoCorasickKind};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use bytes::{Bytes, BytesMut};

/// Length of the windows taken of the signature.
const WINDOW: usize = 16;
/// Distance between windows of the current token.
const STRIDE: usize = 8;
/// How much of each encoding of the signature is searched for.
pub const HEAD: usize = 24;

/// Most tokens one call's needles cover (the job's newest).
pub const MAX_TOKENS: usize = 64;

/// The needles for `token`: windows of its signature and of the raw
/// signature, and the start of each encoding of it.
pub fn forms(token: &str) -> Vec<Vec<u8>> {
    let signature = token.rsplit('.').next().unwrap_or(token).as_bytes();
    let mut out = Vec::new();
    windows(signature, STRIDE, &mut out);
    let mut encoded = vec![hex::encode(signature).into_bytes()];
    if let Ok(raw) = URL_SAFE_NO_PAD.decode(signature) {
        windows(&raw, STRIDE, &mut out);
        encoded.push(hex::encode(&raw).into_bytes());
        encoded.push(hex::encode_upper(&raw).into_bytes());
        encoded.push(STANDARD_NO_PAD.encode(&raw).into_bytes());
    }
    for align in 0..3 {
        let mut shifted = vec![0u8; align];
        shifted.extend_from_slice(signature);
        let whole = shifted.len() / 3 * 3;
        for engine in [STANDARD_NO_PAD, URL_SAFE_NO_PAD] {
            let text = engine.encode(&shifted[..whole]);
            // The first group mixes in the bytes before the signature.
            let skip = if align == 0 { 0 } else { 4 };
            encoded.push(text.as_bytes()[skip..].to_vec());
        }
    }
    let mut escaped = String::with_capacity(signature.len() * 3);
    for b in signature {
        escaped.push_str(&format!("%{b:02X}"));
    }
    encoded.push(escaped.into_bytes());
    out.extend(encoded.into_iter().map(|e| e[..e.len().min(HEAD)].to_vec()));
    out.retain(|n| !n.is_empty());
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
    // The last window, so the end of the signature is covered too.
    out.push(bytes[bytes.len() - WINDOW..].to_vec());
}

/// Every form of one token, as one automaton: built once, when the token
/// is minted, and reused for every later call of the job while the token
/// may still be valid.
#[derive(Debug)]
pub struct TokenNeedles {
    /// `None` only if building failed: every non-empty input then counts
    /// as a leak (fail closed).
    automaton: Option<AhoCorasick>,
    /// The needles, for an automaton of several tokens.
    patterns: Vec<Vec<u8>>,
}

impl TokenNeedles {
    /// The needles of `token` ([`forms`]).
    pub fn new(token: &str) -> Self {
        // Building fails only past the automaton's size limits, which a few
        // dozen short patterns are far from.
        let patterns = forms(token);
        Self {
            automaton: build(&patterns),
            patterns,
        }
    }

    fn found(&self, haystack: &[u8]) -> bool {
        match &self.automaton {
            Some(a) => a.is_match(haystack),
            None => !haystack.is_empty(),
        }
    }
}

fn build(patterns: &[Vec<u8>]) -> Option<AhoCorasick> {
    AhoCorasick::builder()
        .kind(Some(AhoCorasickKind::ContiguousNFA))
        .build(patterns)
        .ok()
}

/// Bytes of a stream searched token by token; past them, one automaton of
/// every token's needles is built and searches the rest.
const COMBINE_AFTER: usize = 64 * 1024;

/// The needles of a set of tokens: the call's own and the job's earlier
/// ones that may still be valid. Short answers are searched with each
/// token's own automaton (nothing to build); a long one with a single
/// automaton of them all, built when it is first needed.
#[derive(Debug, Default)]
pub struct Needles {
    tokens: Vec<std::sync::Arc<TokenNeedles>>,
    combined: std::sync::OnceLock<Option<AhoCorasick>>,
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
                .map(|t| std::sync::Arc::new(TokenNeedles::new(t)))
                .collect(),
        )
    }

    /// The needles of tokens whose automata are already built.
    pub fn of(tokens: Vec<std::sync::Arc<TokenNeedles>>) -> Self {
        Self {
            tokens,
            combined: std::sync::OnceLock::new(),
        }
    }

    /// Whether `haystack` contains any form of any token.
    pub fn found(&self, haystack: &[u8]) -> bool {
        self.tokens.iter().any(|t| t.found(haystack))
    }

    /// [`Self::found`], for a stream that has already had `scanned` bytes.
    fn found_in_stream(&self, haystack: &[u8], scanned: usize) -> bool {
        if self.tokens.len() < 2 || scanned < COMBINE_AFTER {
            return self.found(haystack);
        }
        let combined = self.combined.get_or_init(|| {
            let all: Vec<Vec<u8>> = self
                .tokens
                .iter()
                .flat_map(|t| t.patterns.iter().cloned())
                .collect();
            build(&all)
        });
        match combined {
            Some(a) => a.is_match(haystack),
            None => self.found(haystack),
        }
    }

    /// How many bytes a stream must hold back so that a form split across
    /// frames is found before any of it is passed on.
    pub fn overlap(&self) -> usize {
        if self.tokens.is_empty() { 0 } else { HEAD - 1 }
    }
}

/// A token form was found: the response is withheld.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("response withheld: it contained a form of the job's call token")]
pub struct Leak;

/// Scans a byte stream as a whole. Each chunk is searched together with
/// the bytes held back from the ones before it, and the last
/// [`Needles::overlap`] bytes are held back until more arrive or the stream
/// ends, so no byte of a form is passed on before the whole form could
/// have been seen.
#[derive(Debug)]
pub struct Scanner {
    needles: std::sync::Arc<Needles>,
    held: BytesMut,
    scanned: usize,
}

impl Scanner {
    /// A scanner for `needles`.
    pub fn new(needles: std::sync::Arc<Needles>) -> Self {
        Self {
            needles,
            held: BytesMut::new(),
            scanned: 0,
        }
    }

    /// Takes `chunk`; returns the bytes that may be passed on now.
    ///
    /// # Errors
    /// [`Leak`] when the stream so far contains a form of a token.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Bytes, Leak> {
        self.held.extend_from_slice(chunk);
        let found = self.needles.found_in_stream(&self.held, self.scanned);
        self.scanned = self.scanned.saturating_add(chunk.len());
        if found {
            self.held.clear();
            return Err(Leak);
        }
        let keep = self.needles.overlap().min(self.held.len());
        let pass = self.held.len() - keep;
        Ok(self.held.split_to(pass).freeze())
    }

    /// The bytes still held back, at the end of the stream.
    pub fn finish(&mut self) -> Bytes {
        self.held.split().freeze()
    }

    /// How many bytes are held back.
    pub fn held(&self) -> usize {
        self.held.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const TOKEN: &str = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhIn0.\
        q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJCrze8SNFZ4kA";

    fn sig() -> &'static str {
        TOKEN.rsplit('.').next().unwrap()
    }

    fn needles() -> Needles {
        Needles::new(TOKEN, [])
    }

    #[test]
    fn every_form_of_the_token_is_found() {
        let n = needles();
        let raw = URL_SAFE_NO_PAD.decode(sig()).unwrap();
        let mut found = vec![
            format!("Bearer {TOKEN}").into_bytes(),
            sig().as_bytes().to_vec(),
            sig().as_bytes()[10..40].to_vec(),
            raw.clone(),
            raw[5..30].to_vec(),
            hex::encode(&raw).into_bytes(),
            hex::encode_upper(&raw).into_bytes(),
            hex::encode(format!("Bearer {TOKEN}")).into_bytes(),
            format!("{{\"auth\":\"{}\"}}", urlish(TOKEN)).into_bytes(),
        ];
        for prefix in ["", "B", "Be", "Bearer ", "authorization: Bearer "] {
            let text = format!("{prefix}{TOKEN}");
            found.push(STANDARD_NO_PAD.encode(&text).into_bytes());
            found.push(URL_SAFE_NO_PAD.encode(&text).into_bytes());
            found.push(
                base64::engine::general_purpose::STANDARD
                    .encode(&text)
                    .into_bytes(),
            );
        }
        let pct: String = sig().bytes().map(|b| format!("%{b:02X}")).collect();
        found.push(pct.into_bytes());
        for f in &found {
            assert!(n.found(f), "{}", String::from_utf8_lossy(f));
        }
        assert!(!n.found(b"eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJhIn0."));
        assert!(!n.found(&sig().as_bytes()[1..16]));
        assert!(!n.found(b"{\"tenant\":\"acme\",\"frame\":\"#a1b2c3\"}"));
    }

    fn urlish(s: &str) -> String {
        s.replace('.', "%2E")
    }

    #[test]
    fn a_token_split_across_chunks_is_found_before_any_of_it_passes() {
        let preamble = "x".repeat(1000);
        let body = format!("{preamble}{{\"echo\":\"Bearer {TOKEN}\"}}").into_bytes();
        let at = body.len() - sig().len() - 2;
        for cut in [
            1,
            500,
            at - 60,
            at,
            at + 1,
            at + 40,
            at + 85,
            body.len() - 1,
        ] {
            let mut s = Scanner::new(Arc::new(needles()));
            let mut passed = Vec::new();
            let mut leaked = false;
            for part in [&body[..cut], &body[cut..]] {
                match s.feed(part) {
                    Ok(out) => passed.extend_from_slice(&out),
                    Err(Leak) => {
                        leaked = true;
                        break;
                    }
                }
            }
            assert!(leaked, "cut at {cut}");
            // Nothing of the signature was passed on.
            assert!(
                !String::from_utf8_lossy(&passed).contains(&sig()[..4]),
                "cut at {cut}"
            );
        }
        // One byte at a time.
        let mut s = Scanner::new(Arc::new(needles()));
        let mut passed = Vec::new();
        let mut leaked = false;
        for b in &body {
            match s.feed(std::slice::from_ref(b)) {
                Ok(out) => passed.extend_from_slice(&out),
                Err(Leak) => {
                    leaked = true;
                    break;
                }
            }
        }
        assert!(leaked);
        assert!(!String::from_utf8_lossy(&passed).contains(&sig()[..4]));
    }

    #[test]
    fn a_clean_stream_passes_whole_and_in_order() {
        let body: Vec<u8> = (0..10_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let mut s = Scanner::new(Arc::new(needles()));
        let mut out = Vec::new();
        for chunk in body.chunks(333) {
            out.extend_from_slice(&s.feed(chunk).unwrap());
        }
        assert!(s.held() <= needles().overlap());
        out.extend_from_slice(&s.finish());
        assert_eq!(out, body);
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
}
