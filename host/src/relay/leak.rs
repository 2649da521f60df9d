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
//! The job's earlier tokens (a service may hand one call's token back in a
//! later answer) are searched for in their plain form only: windows of the
//! signature every 16 characters (no 31 consecutive characters pass), which
//! keeps building the automaton for a call cheap. Needles are at most
//! [`HEAD`] bytes long, so a stream holds back at most `HEAD - 1` bytes.
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
/// Distance between windows of earlier tokens.
const EARLIER_STRIDE: usize = 16;
/// How much of each encoding of the signature is searched for.
pub const HEAD: usize = 24;

/// Most earlier tokens one call's needles cover (the job's newest).
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

/// The plain form of an earlier `token`: windows of its signature.
pub fn plain_forms(token: &str) -> Vec<Vec<u8>> {
    let signature = token.rsplit('.').next().unwrap_or(token).as_bytes();
    let mut out = Vec::new();
    windows(signature, EARLIER_STRIDE, &mut out);
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

/// Every form of a set of tokens, searched at once.
#[derive(Debug)]
pub struct Needles {
    automaton: Option<AhoCorasick>,
    longest: usize,
}

impl Needles {
    /// Every form of `current`, and the plain forms of `earlier` (at most
    /// [`MAX_TOKENS`], the last ones).
    pub fn new<'a>(current: &str, earlier: impl IntoIterator<Item = &'a str>) -> Self {
        let earlier: Vec<&str> = earlier.into_iter().collect();
        let start = earlier.len().saturating_sub(MAX_TOKENS);
        let mut patterns = forms(current);
        patterns.extend(earlier[start..].iter().flat_map(|t| plain_forms(t)));
        let longest = patterns.iter().map(Vec::len).max().unwrap_or(0);
        // Building fails only past the automaton's size limits, which a
        // few thousand short patterns are far from; without an automaton
        // every non-empty input counts as a leak (fail closed).
        let automaton = if patterns.is_empty() {
            None
        } else {
            AhoCorasick::builder()
                .kind(Some(AhoCorasickKind::ContiguousNFA))
                .build(&patterns)
                .ok()
        };
        let failed = automaton.is_none() && !patterns.is_empty();
        Self {
            automaton,
            longest: if failed { usize::MAX } else { longest },
        }
    }

    /// Whether `haystack` contains any form of any token.
    pub fn found(&self, haystack: &[u8]) -> bool {
        match &self.automaton {
            Some(a) => a.is_match(haystack),
            None => self.longest == usize::MAX && !haystack.is_empty(),
        }
    }

    /// How many bytes a stream must hold back so that a form split across
    /// frames is found before any of it is passed on.
    pub fn overlap(&self) -> usize {
        self.longest.saturating_sub(1).min(64 * 1024)
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
}

impl Scanner {
    /// A scanner for `needles`.
    pub fn new(needles: std::sync::Arc<Needles>) -> Self {
        Self {
            needles,
            held: BytesMut::new(),
        }
    }

    /// Takes `chunk`; returns the bytes that may be passed on now.
    ///
    /// # Errors
    /// [`Leak`] when the stream so far contains a form of a token.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Bytes, Leak> {
        self.held.extend_from_slice(chunk);
        if self.needles.found(&self.held) {
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
    fn earlier_tokens_of_the_job_are_found_too() {
        let other = TOKEN.replace("q83v", "Zm9v");
        let n = Needles::new(TOKEN, [other.as_str()]);
        assert!(n.found(other.as_bytes()));
        assert!(n.found(&other.as_bytes()[other.len() - 40..]));
        assert!(n.found(TOKEN.as_bytes()));
    }
}
