//! Lateral movement over HTTP: the `lateral` guest tries every way past
//! the outbound gate, and the host judges from what two loopback "bait"
//! services it stands up for the run actually received.
//!
//! - the allowed bait is declared as `palette` (paths `/v1/`, GET and
//!   POST, [`MAX_CALLS`] calls and [`MAX_REQUEST`] bytes per call) and
//!   granted to every attack's policy; it answers 200, except
//!   `/v1/bounce`, an open redirect to the forbidden bait's real address,
//!   and `/v1/reflect/<how>`, which hands the request's `Authorization`
//!   header (the call token) back in every way a careless service could:
//!   the body (plain, split into small frames, base64, hex, gzip or
//!   deflate compressed), a header, `Set-Cookie`, a trailer, the reason
//!   phrase, a `Location` inside the allowed paths, or the next call's
//!   body (`stash`, then `recall`);
//! - the forbidden bait is declared as `payments` and granted to nobody:
//!   anything it receives is a breach.
//!
//! Both record every request (method, path, headers, trailers, bearer
//! token, body bytes). The verdict of an attack (judged in
//! `families::http`) adds up: the forbidden bait received
//! nothing; the allowed bait received only calls inside its declaration,
//! within its bounds, each with no credential of the guest's and one token
//! the host minted, which verifies against the host's keys and carries the
//! suite's caller; the job report lists each refusal with the expected
//! class; and the usual host-side checks (canaries, neighbour, memory...).
//! What the guest prints is never part of it.
//!
//! This module owns the baits and the relay they are declared to (the
//! HTTP-specific checks are the `http` family's); it does not touch `relay`
//! internals, only its public interface.

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bulkhead_verify::JwkSet;
use http::{Method, StatusCode};
use http_body_util::BodyExt as _;

pub use crate::model::services::{
    ALLOWED, CALLER_SUBJECT, CALLER_TENANT, FLOOD, FORBIDDEN, MAX_CALLS, MAX_REQUEST,
};
use bulkhead::policy::{ByteSize, ServiceName};
use bulkhead::relay::{Caller, KeyRing, Relay, ServiceDecl, TokenConfig};

/// The allowed bait's only path prefix.
pub(crate) const ALLOWED_PREFIX: &str = "/v1/";

/// Header values the `lateral` guest's `smuggle` mode sets; none may reach
/// a service.
pub const SMUGGLED: &[&str] = &[
    "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.",
    "other-tenant",
    "session=stolen",
    "guessed",
    "10.0.0.1",
    "bulkhead-smuggled",
];

/// Headers the host itself puts on a call, beside the guest's allowed
/// ones ([`bulkhead::relay::headers::FORWARDED`]).
pub(crate) const HOST_SET: [&str; 4] = [
    "host",
    "authorization",
    "accept-encoding",
    "transfer-encoding",
];

/// The caller identity of the suite's jobs.
pub fn caller() -> Caller {
    Caller {
        tenant: CALLER_TENANT.to_owned(),
        subject: CALLER_SUBJECT.to_owned(),
        scopes: vec![crate::model::SUITE_SCOPE.to_owned()],
    }
}

/// One request a bait received.
#[derive(Clone, Debug)]
pub struct Seen {
    /// Method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Every header, lowercase name and lossy value.
    pub headers: Vec<(String, String)>,
    /// Body bytes received (so far, for a body still streaming).
    pub body_bytes: u64,
    /// Every trailer field, lowercase name and lossy value.
    pub trailers: Vec<(String, String)>,
}

impl Seen {
    /// The bearer tokens of its `authorization` headers.
    pub fn bearers(&self) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == "authorization")
            .filter_map(|(_, v)| v.strip_prefix("Bearer "))
            .collect()
    }
}

/// Everything one bait received, shared with its handler.
#[derive(Clone, Debug, Default)]
pub struct BaitLog {
    seen: Arc<Mutex<Vec<Seen>>>,
    in_flight: Arc<AtomicUsize>,
}

impl BaitLog {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Seen>> {
        self.seen.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How many requests it received.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether it received nothing.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// The requests received from the `from`-th on.
    pub fn since(&self, from: usize) -> Vec<Seen> {
        self.lock()
            .get(from..)
            .map(<[Seen]>::to_vec)
            .unwrap_or_default()
    }

    /// Waits (up to two seconds) until no request is still being read, so
    /// body counts are final. Not a timing assertion: the checks run
    /// either way.
    pub async fn settle(&self) {
        for _ in 0..200 {
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[derive(Clone)]
struct BaitState {
    log: BaitLog,
    /// Where `/v1/bounce` redirects, for the allowed bait.
    bounce: Option<String>,
    /// The `Authorization` header `/v1/reflect/stash` kept.
    stash: Arc<Mutex<String>>,
}

fn lossy(fields: &http::HeaderMap) -> Vec<(String, String)> {
    fields
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_owned(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

async fn record(State(state): State<BaitState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let index = {
        let mut seen = state.log.lock();
        seen.push(Seen {
            method: parts.method.to_string(),
            path: parts
                .uri
                .path_and_query()
                .map_or_else(|| parts.uri.path().to_owned(), |p| p.as_str().to_owned()),
            headers: lossy(&parts.headers),
            body_bytes: 0,
            trailers: Vec::new(),
        });
        seen.len() - 1
    };
    state.log.in_flight.fetch_add(1, Ordering::SeqCst);
    let mut body: Body = body;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(data) = frame.data_ref() {
            state.log.lock()[index].body_bytes += data.len() as u64;
        }
        if let Some(trailers) = frame.trailers_ref() {
            state.log.lock()[index].trailers.extend(lossy(trailers));
        }
    }
    state.log.in_flight.fetch_sub(1, Ordering::SeqCst);
    if state.bounce.is_some()
        && let Some(how) = parts.uri.path().strip_prefix("/v1/reflect/")
    {
        let auth = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default();
        return reflect(how, &auth, &state.stash);
    }
    match &state.bounce {
        Some(to) if parts.uri.path() == "/v1/bounce" => (
            StatusCode::TEMPORARY_REDIRECT,
            [(http::header::LOCATION, to.clone())],
        )
            .into_response(),
        _ => (
            [(http::header::CONTENT_TYPE, "application/json")],
            "{\"bait\":\"ok\"}",
        )
            .into_response(),
    }
}

/// The allowed bait's careless answers: `auth` (the request's
/// `Authorization` header) handed back as `how` says (`body`, `split`,
/// `base64`, `hex`, `gzip`, `deflate`, `trailer`, `header`, `cookie`,
/// `location`, `status`; `stash` keeps it in `stash`, `recall` answers what
/// was kept). Public so that tests can stand up the same careless service.
pub fn reflect(how: &str, auth: &str, stash: &Mutex<String>) -> Response {
    use http::header::{CONTENT_ENCODING, CONTENT_TYPE, ETAG, LOCATION, SET_COOKIE};
    let token = auth.strip_prefix("Bearer ").unwrap_or(auth);
    let signature = token.rsplit('.').next().unwrap_or(token);
    let echo = format!("{{\"echo\":\"{auth}\"}}");
    let compress = |zlib: bool| {
        use std::io::Write as _;
        let out = if zlib {
            let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::best());
            let _ = z.write_all(echo.as_bytes());
            z.finish()
        } else {
            let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            let _ = z.write_all(echo.as_bytes());
            z.finish()
        };
        out.unwrap_or_default()
    };
    let json = (CONTENT_TYPE, "application/json");
    match how {
        "body" => ([json], echo).into_response(),
        "split" => {
            let frames = echo
                .as_bytes()
                .chunks(5)
                .map(|c| http_body::Frame::data(bytes::Bytes::copy_from_slice(c)))
                .collect();
            ([json], Body::new(Frames(frames))).into_response()
        }
        "base64" => base64::engine::general_purpose::STANDARD
            .encode(&echo)
            .into_response(),
        "hex" => hex::encode(auth).into_response(),
        "gzip" => ([json, (CONTENT_ENCODING, "gzip")], compress(false)).into_response(),
        "deflate" => ([json, (CONTENT_ENCODING, "deflate")], compress(true)).into_response(),
        "trailer" => {
            let mut trailers = http::HeaderMap::new();
            if let Ok(v) = http::HeaderValue::from_str(auth) {
                trailers.insert("x-echo", v.clone());
                trailers.insert(ETAG, v);
            }
            let frames = [
                http_body::Frame::data(bytes::Bytes::from_static(
                    b"{\"echo\":\"in the trailers\"}",
                )),
                http_body::Frame::trailers(trailers),
            ]
            .into();
            ([json], Body::new(Frames(frames))).into_response()
        }
        "header" => (
            [
                ("x-echo", auth.to_owned()),
                (ETAG.as_str(), format!("\"{signature}\"")),
            ],
            "{}",
        )
            .into_response(),
        "cookie" => ([(SET_COOKIE, format!("session={token}"))], "{}").into_response(),
        "location" => (
            StatusCode::FOUND,
            [(LOCATION, format!("/v1/next?t={token}"))],
        )
            .into_response(),
        "status" => {
            let mut r = "{}".into_response();
            if let Ok(reason) = hyper::ext::ReasonPhrase::try_from(auth.to_owned()) {
                r.extensions_mut().insert(reason);
            }
            r
        }
        "stash" => {
            *stash.lock().unwrap_or_else(|e| e.into_inner()) = auth.to_owned();
            "{}".into_response()
        }
        "recall" => {
            let kept = stash.lock().unwrap_or_else(|e| e.into_inner()).clone();
            ([json], format!("{{\"earlier\":\"{kept}\"}}")).into_response()
        }
        // The stashed header in one of the forms of [`reflect_more`].
        recall if recall.starts_with("recall-") => {
            let kept = stash.lock().unwrap_or_else(|e| e.into_inner()).clone();
            reflect_more(&recall["recall-".len()..], &kept)
                .unwrap_or_else(|| StatusCode::NOT_FOUND.into_response())
        }
        _ => reflect_more(how, auth).unwrap_or_else(|| StatusCode::NOT_FOUND.into_response()),
    }
}

/// More careless answers, each a form some framework, logging or debug
/// endpoint could give the header: `gzip-body` (a gzip payload sent as
/// `application/gzip`, identity encoding), `zip` (a deflated zip entry),
/// `gzip-later` (a gzip member after a log line), `zstd` (a payload with
/// zstd's magic), `utf16`, `utf16be`, `lower`, `qp` (quoted-printable with
/// soft line breaks), `percent-lower`, `html-hex`, `html-decimal`,
/// `json-escapes` (`\u00xx`), `base64-raw-1`, `base64-raw-2`,
/// `base64url-raw-0` (the raw signature bytes after 1, 2 or 0 other bytes)
/// and `json-base64-raw` (standard base64 with `\/` as PHP writes it).
fn reflect_more(how: &str, auth: &str) -> Option<Response> {
    use base64::engine::general_purpose::STANDARD;
    use http::header::CONTENT_TYPE;
    use std::io::Write as _;
    let token = auth.strip_prefix("Bearer ").unwrap_or(auth);
    let signature = token.rsplit('.').next().unwrap_or(token);
    let raw = URL_SAFE_NO_PAD.decode(signature).unwrap_or_default();
    let echo = format!("{{\"echo\":\"{auth}\"}}");
    let gzip = |data: &[u8]| {
        let mut z = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let _ = z.write_all(data);
        z.finish().unwrap_or_default()
    };
    let each = |f: &dyn Fn(u8) -> String| auth.bytes().map(f).collect::<String>();
    let text = |body: String| ([(CONTENT_TYPE, "text/plain")], body).into_response();
    let offset = |pad: usize, engine: base64::engine::GeneralPurpose| {
        let mut bytes = vec![b'!'; pad];
        bytes.extend_from_slice(&raw);
        engine.encode(bytes)
    };
    Some(match how {
        "gzip-body" => {
            ([(CONTENT_TYPE, "application/gzip")], gzip(echo.as_bytes())).into_response()
        }
        "zip" => {
            let mut data =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
            let _ = data.write_all(echo.as_bytes());
            let data = data.finish().unwrap_or_default();
            let mut z = b"PK\x03\x04\x14\x00\x00\x00\x08\x00".to_vec();
            z.extend_from_slice(&[0; 8]);
            z.extend_from_slice(&u32::try_from(data.len()).unwrap_or(0).to_le_bytes());
            z.extend_from_slice(&u32::try_from(echo.len()).unwrap_or(0).to_le_bytes());
            z.extend_from_slice(&8u16.to_le_bytes());
            z.extend_from_slice(&0u16.to_le_bytes());
            z.extend_from_slice(b"echo.txt");
            z.extend_from_slice(&data);
            ([(CONTENT_TYPE, "application/zip")], z).into_response()
        }
        "gzip-later" => {
            let mut body = b"2026-12-01 request log follows\n".to_vec();
            body.extend(gzip(echo.as_bytes()));
            ([(CONTENT_TYPE, "application/octet-stream")], body).into_response()
        }
        "zstd" => {
            // Stands for a real frame: nothing the gate could read.
            let mut body = vec![0x28, 0xb5, 0x2f, 0xfd, 0x04, 0x58];
            body.extend(echo.bytes().rev());
            ([(CONTENT_TYPE, "application/zstd")], body).into_response()
        }
        "utf16" | "utf16be" => {
            let big = how == "utf16be";
            let body: Vec<u8> = echo
                .encode_utf16()
                .flat_map(|u| {
                    if big {
                        u.to_be_bytes()
                    } else {
                        u.to_le_bytes()
                    }
                })
                .collect();
            ([(CONTENT_TYPE, "text/plain; charset=utf-16")], body).into_response()
        }
        "lower" => text(echo.to_lowercase()),
        "qp" => {
            let mut qp = String::new();
            for (i, c) in echo.chars().enumerate() {
                if i % 19 == 18 {
                    qp.push_str("=\r\n");
                }
                qp.push(c);
            }
            text(qp)
        }
        "percent-lower" => text(each(&|b| format!("%{b:02x}"))),
        "html-hex" => text(each(&|b| format!("&#x{b:x};"))),
        "html-decimal" => text(each(&|b| format!("&#{b};"))),
        "json-escapes" => text(each(&|b| format!("\\u{b:04x}"))),
        "base64-raw-1" => text(offset(1, STANDARD)),
        "base64-raw-2" => text(offset(2, STANDARD)),
        "base64url-raw-0" => text(offset(0, URL_SAFE_NO_PAD)),
        "json-base64-raw" => text(format!(
            "{{\"sig\":\"{}\"}}",
            offset(0, STANDARD).replace('/', "\\/")
        )),
        _ => return reflect_split(how, auth),
    })
}

/// Answers that get past a scan looking at one piece at a time:
/// `zlib-window` (zlib with a 1 KiB window, first byte 0x28),
/// `zlib-dictionary` (zlib asking for a preset dictionary; its deflate
/// data needs none), `split-headers` (the signature in 15-character pieces
/// across six `Vary` values) and `split-head-body` (12 characters in the
/// last header, `Date`, the next 12 starting the body).
fn reflect_split(how: &str, auth: &str) -> Option<Response> {
    use http::header::{CONTENT_TYPE, DATE, VARY};
    use std::io::Write as _;
    let token = auth.strip_prefix("Bearer ").unwrap_or(auth);
    let signature = token.rsplit('.').next().unwrap_or(token);
    let echo = format!("{{\"echo\":\"{auth}\"}}");
    let binary = (CONTENT_TYPE, "application/octet-stream");
    let deflate = || {
        let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
        let _ = z.write_all(echo.as_bytes());
        z.finish().unwrap_or_default()
    };
    // A zlib header: window 2^(cinfo + 8), the dictionary bit, check bits.
    let header = |cinfo: u8, fdict: u8| {
        let cmf = (cinfo << 4) | 8;
        let flg = 0x80 | fdict;
        let rem = (u16::from(cmf) * 256 + u16::from(flg)) % 31;
        [cmf, flg + u8::try_from((31 - rem) % 31).unwrap_or(0)]
    };
    Some(match how {
        "zlib-window" => {
            let mut body = header(2, 0).to_vec();
            body.extend_from_slice(&deflate());
            let adler = adler32(echo.as_bytes());
            body.extend_from_slice(&adler.to_be_bytes());
            ([binary], body).into_response()
        }
        "zlib-dictionary" => {
            let mut body = header(7, 0x20).to_vec();
            body.extend_from_slice(&adler32(b"dictionary").to_be_bytes());
            body.extend_from_slice(&deflate());
            body.extend_from_slice(&adler32(echo.as_bytes()).to_be_bytes());
            ([binary], body).into_response()
        }
        "split-headers" => {
            let mut headers = http::HeaderMap::new();
            for piece in signature.as_bytes().chunks(15) {
                if let Ok(v) = http::HeaderValue::from_bytes(piece) {
                    headers.append(VARY, v);
                }
            }
            (headers, "{}").into_response()
        }
        "split-head-body" => {
            let head = signature.get(..12).unwrap_or_default().to_owned();
            let rest = signature.get(12..24).unwrap_or_default().to_owned();
            let frames = [http_body::Frame::data(bytes::Bytes::from(rest))].into();
            (
                [(CONTENT_TYPE, "text/plain".to_owned()), (DATE, head)],
                Body::new(Frames(frames)),
            )
                .into_response()
        }
        _ => return None,
    })
}

/// Adler-32 of `data` (zlib's trailer and dictionary id).
fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for byte in data {
        a = (a + u32::from(*byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    (b << 16) | a
}

/// A response body of given frames, sent one at a time.
struct Frames(std::collections::VecDeque<http_body::Frame<bytes::Bytes>>);

impl http_body::Body for Frames {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        std::task::Poll::Ready(self.0.pop_front().map(Ok))
    }
}

async fn serve(bounce: Option<String>) -> std::io::Result<(BaitLog, u16)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let log = BaitLog::default();
    let app = axum::Router::new().fallback(record).with_state(BaitState {
        log: log.clone(),
        bounce,
        stash: Arc::default(),
    });
    tokio::spawn(axum::serve(listener, app).into_future());
    Ok((log, port))
}

/// The two baits, the relay they are declared to, and the host's key.
pub struct Egress {
    /// The allowed bait (`palette`).
    pub allowed: BaitLog,
    /// The forbidden bait (`payments`).
    pub forbidden: BaitLog,
    /// The forbidden bait's real port, which the guest is told.
    pub forbidden_port: u16,
    /// The relay every local guest job goes through.
    pub relay: Arc<Relay>,
    /// The host's signing key (PKCS#8 PEM), read back from the key ring
    /// the suite created, for crafting host-signed tokens.
    pub host_key_pem: String,
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Egress")
            .field("forbidden_port", &self.forbidden_port)
            .finish_non_exhaustive()
    }
}

impl Egress {
    /// Starts the baits on loopback and declares them to a relay whose
    /// key ring lives under `keys_dir`.
    ///
    /// # Errors
    /// A message if a bait cannot listen or the relay cannot be built.
    pub async fn start(keys_dir: &Path) -> Result<Self, String> {
        let (forbidden, forbidden_port) = serve(None).await.map_err(|e| e.to_string())?;
        let forbidden_url = format!("http://127.0.0.1:{forbidden_port}");
        let (allowed, allowed_port) = serve(Some(format!("{forbidden_url}/v1/balance")))
            .await
            .map_err(|e| e.to_string())?;
        let mut palette =
            ServiceDecl::example(ALLOWED, &format!("http://127.0.0.1:{allowed_port}"));
        palette.paths = vec![ALLOWED_PREFIX.to_owned()];
        palette.methods = vec![Method::GET, Method::POST];
        palette.max_calls = MAX_CALLS;
        palette.max_request = ByteSize::bytes(MAX_REQUEST);
        let payments = ServiceDecl::example(FORBIDDEN, &forbidden_url);
        let keys = KeyRing::open(keys_dir, Duration::ZERO).map_err(|e| e.to_string())?;
        let pem_path = keys_dir.join(format!("{}.pem", keys.active_kid()));
        let host_key_pem = std::fs::read_to_string(&pem_path)
            .map_err(|e| format!("{}: {e}", pem_path.display()))?;
        let relay = Relay::new(
            vec![palette, payments],
            Arc::new(keys),
            &TokenConfig::default(),
        )
        .map_err(|e| e.to_string())?;
        Ok(Self {
            allowed,
            forbidden,
            forbidden_port,
            relay: Arc::new(relay),
            host_key_pem,
        })
    }

    /// The declared service names.
    pub fn declared(&self) -> Vec<ServiceName> {
        self.relay.names()
    }

    /// The host's published keys.
    pub fn jwks(&self) -> JwkSet {
        self.relay.keys().jwks()
    }

    /// The newest token the host minted for the allowed bait, if any.
    pub fn last_minted(&self) -> Option<String> {
        self.allowed
            .since(0)
            .iter()
            .rev()
            .find_map(|s| s.bearers().first().map(|t| (*t).to_owned()))
    }
}

/// The payload of a compact JWS, without verifying anything.
pub fn unverified_claims(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_read_without_trusting_them() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"iat":7}"#);
        let token = format!("e30.{payload}.sig");
        assert_eq!(unverified_claims(&token).unwrap()["iat"], 7);
        assert!(unverified_claims("not-a-token").is_none());
    }
}
