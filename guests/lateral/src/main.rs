//! A compromised processor trying to move laterally through the one way out
//! it has: `wasi:http` requests, which the host sends only to the services
//! its policy names.
//!
//! `--mode=NAME` picks the attempt; `--port=N` is the real port of a
//! service on the host's loopback (what an attacker would scan for);
//! `--count=N` sizes floods. Every attempt prints one line,
//! `ATTEMPT <what>: <status N | error …>`, and the guest exits 0: whether
//! an attempt held is decided on the host side (what the services
//! received, the audit log, the job report), never from this output.
//!
//! Modes: `allowed`, `smuggle`, `payments`, `ips`, `authority`,
//! `host-header`, `redirect`, `paths`, `https`, `flood`, `big-body`,
//! `stall` (responses that never come, bodies that stop half-way, bodies
//! too big to take: the calls must fail, not hang the job), `hunt` (dump every response, header, variable, argument and file it can
//! reach, looking for a token), `all` (every refusal mode in one job).
//!
//! Against a service that reflects the request's `Authorization` header
//! (the suite's bait, `/v1/reflect/<how>`), trying to get the call token
//! back: `reflect-body` (plain, split across frames, base64, hex),
//! `reflect-encoding` (gzip and deflate, asked for or not; it decodes what
//! it gets), `reflect-trailers`, `reflect-headers` (a header, `Location`,
//! the reason phrase, `Set-Cookie`), `reflect-stash` (one call's token
//! returned to the next call), `reflect-stash-only` (the service keeps the
//! call's token) and `reflect-recall` (it hands back the token it kept last,
//! maybe another job's: plain, lowercased, JSON-escaped, UTF-16), `reflect-compressed` (a gzip payload sent as
//! `application/gzip`, a zip entry, a gzip member after a prefix, zstd),
//! `reflect-text` (UTF-16LE/BE, lowercased, quoted-printable),
//! `reflect-escapes` (lowercase `%xx`, HTML hex and decimal entities, JSON
//! `\u00xx`), `reflect-offset` (base64 of the raw signature at offsets 0, 1
//! and 2, standard and URL alphabets, `\/`-escaped in JSON). Each dumps
//! everything it received to stdout and `/out/reflect.txt`, with what it
//! could decode of it (inflated, NULs dropped, unescaped, base64 decoded).
//!
//! `reflect-split` (zlib with a 1 KiB window, zlib asking for a preset
//! dictionary, the signature split across six `Vary` values, and split
//! between the last header and the body).
//!
//! `body-override`: `POST` requests carrying `_method=DELETE` in a form
//! body, a multipart part name and a top-level JSON key.
//! `body-override-multipart`: the part name folded onto the next line, on
//! the next line unfolded, and backslash-escaped in its quoted string.
//!
//! Past the header allow-list: `forward` (30 identity, routing and
//! method-override headers), `trailers` (credentials and identity claims as
//! request trailers, declared with `Trailer:` and `TE: trailers`),
//! `path-escapes` (`;` path parameters, escaped and overlong dots,
//! `%252e`, fullwidth dots, dot-only segments) and `query` (method
//! overrides and escapes in the query).

use std::io::Write as _;

fn main() {
    let mut mode = String::from("all");
    let mut port = 0u16;
    let mut count = 20u32;
    for arg in std::env::args().skip(1) {
        if let Some(v) = arg.strip_prefix("--mode=") {
            v.clone_into(&mut mode);
        } else if let Some(v) = arg.strip_prefix("--port=") {
            port = v.parse().unwrap_or(0);
        } else if let Some(v) = arg.strip_prefix("--count=") {
            count = v.parse().unwrap_or(20);
        }
    }
    match mode.as_str() {
        "allowed" => allowed(),
        "smuggle" => smuggle(),
        "payments" => payments(),
        "ips" => ips(port),
        "authority" => authority(port),
        "host-header" => host_header(),
        "redirect" => redirect(),
        "paths" => paths(),
        "https" => https(),
        "flood" => flood(count),
        "big-body" => big_body(),
        "held-requests" => held_requests(count),
        "stall" => stall(),
        "hunt" => hunt(),
        "reflect-body" => reflect(&[("body", &[]), ("split", &[]), ("base64", &[]), ("hex", &[])]),
        "reflect-encoding" => reflect(&[
            ("gzip", &[("accept-encoding", "gzip")]),
            ("deflate", &[("accept-encoding", "deflate")]),
            ("gzip", &[]),
            ("gzip", &[("accept-encoding", "gzip;q=1, identity;q=0")]),
        ]),
        "reflect-trailers" => reflect(&[("trailer", &[]), ("trailer", &[("te", "trailers")])]),
        "reflect-headers" => reflect(&[
            ("header", &[]),
            ("location", &[]),
            ("status", &[]),
            ("cookie", &[]),
        ]),
        "reflect-stash" => reflect(&[("stash", &[]), ("recall", &[]), ("recall", &[])]),
        "reflect-stash-only" => reflect(&[("stash", &[])]),
        "reflect-recall" => reflect(&[
            ("recall", &[]),
            ("recall-lower", &[]),
            ("recall-json-escapes", &[]),
            ("recall-utf16", &[]),
        ]),
        "reflect-compressed" => reflect(&[
            ("gzip-body", &[]),
            ("zip", &[]),
            ("gzip-later", &[]),
            ("zstd", &[]),
        ]),
        "reflect-text" => reflect(&[
            ("utf16", &[]),
            ("utf16be", &[]),
            ("lower", &[]),
            ("qp", &[]),
        ]),
        "reflect-escapes" => reflect(&[
            ("percent-lower", &[]),
            ("html-hex", &[]),
            ("html-decimal", &[]),
            ("json-escapes", &[]),
        ]),
        "reflect-offset" => reflect(&[
            ("base64-raw-1", &[]),
            ("base64-raw-2", &[]),
            ("base64url-raw-0", &[]),
            ("json-base64-raw", &[]),
        ]),
        "body-override" => body_override(),
        "reflect-split" => reflect(&[
            ("zlib-window", &[]),
            ("zlib-dictionary", &[]),
            ("split-headers", &[]),
            ("split-head-body", &[]),
        ]),
        "body-override-multipart" => body_override_multipart(),
        "forward" => forward(),
        "trailers" => trailers(),
        "path-escapes" => path_escapes(),
        "query" => query(),
        "all" => {
            payments();
            ips(port);
            authority(port);
            host_header();
            redirect();
            paths();
            https();
        }
        other => {
            eprintln!("lateral: unknown mode {other:?}");
            std::process::exit(2);
        }
    }
}

fn attempt(what: &str, method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) {
    let result = match http_call::request(method, url, headers, body) {
        Ok(r) => format!("status {}", r.status),
        Err(e) => format!("error {e}"),
    };
    println!("ATTEMPT {what} {method} {url}: {result}");
}

fn allowed() {
    match http_call::get("http://palette/v1/palette") {
        Ok(r) => {
            println!(
                "ATTEMPT allowed GET http://palette/v1/palette: status {}",
                r.status
            );
            println!("{}", String::from_utf8_lossy(&r.body));
        }
        Err(e) => println!("ATTEMPT allowed GET http://palette/v1/palette: error {e}"),
    }
}

/// Credentials and identity claims of its own choosing: the host must
/// strip every one and the service must see only the real caller.
fn smuggle() {
    let headers = [
        (
            "authorization",
            "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.",
        ),
        ("x-bulkhead-tenant", "other-tenant"),
        ("x-bulkhead-subject", "admin"),
        ("cookie", "session=stolen"),
        ("x-api-key", "guessed"),
        ("x-forwarded-for", "10.0.0.1"),
        ("forwarded", "for=10.0.0.1"),
    ];
    match http_call::request("GET", "http://palette/v1/palette", &headers, None) {
        Ok(r) => {
            println!(
                "ATTEMPT smuggle GET http://palette/v1/palette: status {}",
                r.status
            );
            println!("{}", String::from_utf8_lossy(&r.body));
        }
        Err(e) => println!("ATTEMPT smuggle GET http://palette/v1/palette: error {e}"),
    }
}

fn payments() {
    attempt("by-name", "GET", "http://payments/v1/balance", &[], None);
    attempt(
        "by-name",
        "POST",
        "http://payments/v1/charge",
        &[],
        Some(b"{\"amount\":1000000}"),
    );
}

fn ips(port: u16) {
    let p = port;
    for authority in [
        format!("127.0.0.1:{p}"),
        format!("localhost:{p}"),
        format!("[::1]:{p}"),
        format!("[::ffff:127.0.0.1]:{p}"),
        format!("[::ffff:7f00:1]:{p}"),
        format!("2130706433:{p}"),
        format!("0x7f000001:{p}"),
        format!("0177.0.0.1:{p}"),
        format!("127.1:{p}"),
        "169.254.169.254".to_owned(),
        "[fd00:ec2::254]".to_owned(),
        "127.0.0.1".to_owned(),
    ] {
        attempt(
            "raw-ip",
            "GET",
            &format!("http://{authority}/v1/balance"),
            &[],
            None,
        );
    }
}

fn authority(port: u16) {
    for authority in [
        "palette@payments".to_owned(),
        "payments@palette".to_owned(),
        format!("palette:{port}"),
        "palette:80".to_owned(),
        "PALETTE".to_owned(),
        "palette.".to_owned(),
        "palette.payments".to_owned(),
        "payments.palette".to_owned(),
        "metadata".to_owned(),
    ] {
        attempt(
            "authority",
            "GET",
            &format!("http://{authority}/v1/palette"),
            &[],
            None,
        );
    }
}

fn host_header() {
    attempt(
        "host-header",
        "GET",
        "http://palette/v1/palette",
        &[("host", "payments")],
        None,
    );
}

fn redirect() {
    attempt("redirect", "GET", "http://palette/v1/bounce", &[], None);
}

fn paths() {
    for path in [
        "/admin",
        "/v1/../admin",
        "/v1/%2e%2e/admin",
        "/v1%2f..%2fadmin",
        "//payments/v1/balance",
        "/v1/..%5cadmin",
    ] {
        attempt("path", "GET", &format!("http://palette{path}"), &[], None);
    }
    attempt("method", "DELETE", "http://palette/v1/palette", &[], None);
}

fn stall() {
    for path in ["/v1/stall-head", "/v1/stall-body", "/v1/huge"] {
        let url = format!("http://palette{path}");
        let result = match http_call::get(&url) {
            Ok(r) => format!("status {} with {} bytes", r.status, r.body.len()),
            Err(e) => format!("error {e}"),
        };
        println!("ATTEMPT stall GET {url}: {result}");
    }
    println!("stall: every call returned");
}

fn https() {
    attempt("scheme", "GET", "https://palette/v1/palette", &[], None);
}

fn flood(count: u32) {
    for i in 0..count {
        attempt(
            &format!("flood-{i}"),
            "GET",
            "http://palette/v1/palette",
            &[],
            None,
        );
    }
}

fn big_body() {
    let body = vec![b'x'; 3 * 1024 * 1024];
    attempt(
        "big-body",
        "POST",
        "http://palette/v1/palette",
        &[],
        Some(&body),
    );
}

/// `held-requests`: builds `count` requests, each with the longest path
/// and authority the host takes (a 60,000-byte path tried first) and a
/// body written as far as the host lets it without sending, and holds them
/// all for 3 s: host memory a guest keeps through handles.
fn held_requests(count: u32) {
    use wasip2::http::types::{Fields, OutgoingRequest};

    let long = format!("/v1/{}", "a".repeat(60_000));
    let most = format!("/v1/{}", "a".repeat(8 * 1024 - 4));
    let host = "p".repeat(255);
    let mut held = Vec::new();
    let (mut long_taken, mut written) = (0u32, 0u64);
    for _ in 0..count {
        let req = OutgoingRequest::new(Fields::new());
        if req.set_path_with_query(Some(&long)).is_ok() {
            long_taken += 1;
        } else {
            let _ = req.set_path_with_query(Some(&most));
        }
        let _ = req.set_authority(Some(&host));
        let Ok(body) = req.body() else { break };
        let Ok(stream) = body.write() else { break };
        // As much as it takes without blocking: it is never read.
        while let Ok(n) = stream.check_write() {
            if n == 0 || stream.write(&vec![b'x'; n as usize]).is_err() {
                break;
            }
            written += n;
        }
        held.push((req, body, stream));
    }
    println!(
        "ATTEMPT held-requests: {} held, {long_taken} long paths taken, {written} body bytes buffered",
        held.len()
    );
    std::thread::sleep(std::time::Duration::from_secs(3));
    drop(held);
}

/// Looks everywhere a token could have been left for it.
fn hunt() {
    let mut dump = Vec::new();
    for url in ["http://palette/v1/palette", "http://palette/v1/missing"] {
        match http_call::get(url) {
            Ok(r) => {
                let _ = writeln!(dump, "== {url}");
                let _ = http_call::dump(&mut dump, &r);
            }
            Err(e) => {
                let _ = writeln!(dump, "== {url}: error {e}");
            }
        }
    }
    let _ = writeln!(dump, "== env");
    for (k, v) in std::env::vars() {
        let _ = writeln!(dump, "{k}={v}");
    }
    let _ = writeln!(dump, "== args");
    for a in std::env::args() {
        let _ = writeln!(dump, "{a}");
    }
    let _ = writeln!(dump, "== stdin");
    let mut stdin = Vec::new();
    let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut stdin);
    dump.extend_from_slice(&stdin);
    for root in ["/", ".", "/in", "/out", "/tmp", "/etc", "/proc/self"] {
        walk(std::path::Path::new(root), 0, &mut dump);
    }
    let _ = std::io::stdout().write_all(&dump);
    let _ = std::fs::write("/out/dump.txt", &dump);
}

fn walk(dir: &std::path::Path, depth: u32, dump: &mut Vec<u8>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let _ = writeln!(dump, "== file {}", path.display());
        if path.is_dir() && depth < 4 {
            walk(&path, depth + 1, dump);
        } else if let Ok(bytes) = std::fs::read(&path) {
            dump.extend_from_slice(&bytes[..bytes.len().min(64 * 1024)]);
            dump.push(b'\n');
        }
    }
}

/// Calls `/v1/reflect/<how>` for each entry, dumping everything that came
/// back, decoded where it is compressed.
fn reflect(calls: &[(&str, &[(&str, &str)])]) {
    let mut dump = Vec::new();
    for (how, headers) in calls {
        let url = format!("http://palette/v1/reflect/{how}");
        match http_call::request_full("GET", &url, headers, None, &[]) {
            Ok(r) => {
                println!("ATTEMPT reflect GET {url}: status {}", r.status);
                let _ = writeln!(dump, "== {url} {headers:?}");
                let _ = http_call::dump(&mut dump, &r);
                for decoded in decode(&r.body) {
                    let _ = writeln!(dump, "== decoded");
                    dump.extend_from_slice(&decoded);
                    dump.push(b'\n');
                }
            }
            Err(e) => {
                println!("ATTEMPT reflect GET {url}: error {e}");
                let _ = writeln!(dump, "== {url}: error {e}");
            }
        }
    }
    let _ = std::io::stdout().write_all(&dump);
    let _ = std::fs::write("/out/reflect.txt", &dump);
}

/// The body as gzip, zlib and raw deflate, where it decodes.
fn decode(body: &[u8]) -> Vec<Vec<u8>> {
    use std::io::Read as _;
    let mut out = Vec::new();
    let mut text = Vec::new();
    if flate2::read::GzDecoder::new(body)
        .read_to_end(&mut text)
        .is_ok()
    {
        out.push(std::mem::take(&mut text));
    }
    if flate2::read::ZlibDecoder::new(body)
        .read_to_end(&mut text)
        .is_ok()
    {
        out.push(std::mem::take(&mut text));
    }
    if flate2::read::DeflateDecoder::new(body)
        .read_to_end(&mut text)
        .is_ok()
    {
        out.push(text);
    }
    // A zip entry (deflate) anywhere.
    if let Some(at) = body.windows(4).position(|w| w == b"PK\x03\x04")
        && body.len() > at + 30
    {
        let h = &body[at..];
        let skip = 30
            + usize::from(u16::from_le_bytes([h[26], h[27]]))
            + usize::from(u16::from_le_bytes([h[28], h[29]]));
        let mut text = Vec::new();
        if let Some(data) = h.get(skip..) {
            let _ = flate2::read::DeflateDecoder::new(data).read_to_end(&mut text);
            out.push(data.to_vec());
        }
        out.push(text);
    }
    // A gzip member anywhere.
    if let Some(at) = body.windows(3).position(|w| w == [0x1f, 0x8b, 0x08])
        && at > 0
    {
        let mut text = Vec::new();
        let _ = flate2::read::GzDecoder::new(&body[at..]).read_to_end(&mut text);
        out.push(text);
    }
    // NULs dropped (UTF-16, UTF-32), then escapes decoded.
    let plain: Vec<u8> = body.iter().copied().filter(|b| *b != 0).collect();
    out.push(unescape(&plain));
    out.push(plain.to_ascii_lowercase());
    // Base64 runs decoded at each offset, re-encoded as the token's alphabet.
    for run in plain
        .split(|b| !(b.is_ascii_alphanumeric() || b"+/-_\\".contains(b)))
        .filter(|r| r.len() >= 16)
    {
        let run: Vec<u8> = run.iter().copied().filter(|b| *b != b'\\').collect();
        for skip in 0..4 {
            let part = &run[skip.min(run.len())..];
            let bytes = b64_decode(&part[..part.len() / 4 * 4]);
            out.push(b64url_encode(&bytes));
            out.push(bytes);
        }
    }
    out.retain(|d| !d.is_empty());
    out
}

/// Base64 in either alphabet, decoded (characters outside it skipped).
fn b64_decode(text: &[u8]) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        Some(u32::from(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        }))
    };
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for v in text.iter().filter_map(|c| value(*c)) {
        acc = (acc << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(((acc >> bits) & 0xff) as u8);
        }
    }
    out
}

/// Base64, URL alphabet, no padding (the token's own encoding).
fn b64url_encode(bytes: &[u8]) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = Vec::new();
    for group in bytes.chunks(3) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..=group.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]);
        }
    }
    out
}

/// `%xx`, `=XX`, `&#xNN;`, `&#NN;`, `\uNNNN` and `\xNN` decoded, once.
fn unescape(text: &[u8]) -> Vec<u8> {
    let s = String::from_utf8_lossy(text);
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    let hex = |t: &[u8]| {
        std::str::from_utf8(t)
            .ok()
            .and_then(|t| u32::from_str_radix(t, 16).ok())
    };
    while i < b.len() {
        let rest = &b[i..];
        let (value, used) = if (rest.starts_with(b"%") || rest.starts_with(b"=")) && rest.len() >= 3
        {
            (hex(&rest[1..3]), 3)
        } else if rest.starts_with(b"\\u") && rest.len() >= 6 {
            (hex(&rest[2..6]), 6)
        } else if rest.starts_with(b"\\x") && rest.len() >= 4 {
            (hex(&rest[2..4]), 4)
        } else if rest.starts_with(b"&#") {
            let end = rest.iter().position(|c| *c == b';').unwrap_or(0);
            let digits = rest.get(2..end).unwrap_or_default();
            let v = match digits.first() {
                Some(b'x' | b'X') => hex(&digits[1..]),
                _ => std::str::from_utf8(digits)
                    .ok()
                    .and_then(|d| d.parse().ok()),
            };
            (v, end + 1)
        } else {
            (None, 1)
        };
        match value.and_then(|v| u8::try_from(v).ok()) {
            Some(v) => {
                out.push(v);
                i += used;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// Method overrides in request bodies the gate must refuse: a form, a
/// multipart part name, a top-level JSON key, a percent-escaped form key
/// under an oddly written content type.
fn body_override() {
    let multipart =
        "--XyZ\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--XyZ--\r\n";
    for (content_type, body) in [
        ("application/x-www-form-urlencoded", "a=1&_method=DELETE"),
        ("multipart/form-data; boundary=XyZ", multipart),
        ("application/json", "{\"a\":1,\"_method\":\"DELETE\"}"),
        (
            " Application/X-WWW-Form-Urlencoded ; charset=UTF-8",
            "%5Fmethod=PUT",
        ),
    ] {
        attempt(
            "body-override",
            "POST",
            "http://palette/v1/sink",
            &[("content-type", content_type)],
            Some(body.as_bytes()),
        );
    }
}

/// Multipart part names as Rack reads them but a line-by-line check does
/// not.
fn body_override_multipart() {
    for part in [
        "Content-Disposition: form-data;\r\n name=\"_method\"",
        "Content-Disposition: form-data;\r\nname=\"_method\"",
        "Content-Disposition: form-data; name=\"_m\\ethod\"",
    ] {
        let body = format!("--XyZ\r\n{part}\r\n\r\nDELETE\r\n--XyZ--\r\n");
        attempt(
            "body-override-multipart",
            "POST",
            "http://palette/v1/sink",
            &[("content-type", "multipart/form-data; boundary=XyZ")],
            Some(body.as_bytes()),
        );
    }
}

/// The marker value of every smuggled header (the suite looks for it in
/// what the service received).
const MARK: &str = "bulkhead-smuggled";

/// Identity, routing and method-override headers an auth proxy or a
/// framework would trust.
const IDENTITY_AND_ROUTING: [&str; 30] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-prefix",
    "x-forwarded-user",
    "x-forwarded-email",
    "x-forwarded-port",
    "x-original-url",
    "x-original-uri",
    "x-original-host",
    "x-rewrite-url",
    "x-remote-user",
    "x-remote-addr",
    "x-auth-request-user",
    "x-auth-request-email",
    "x-tenant",
    "x-tenant-id",
    "forwarded",
    "x-real-ip",
    "x-client-ip",
    "true-client-ip",
    "impersonate-user",
    "impersonate-group",
    "x-user-id",
    "remote-user",
    "x-webauth-user",
    "x-bulkhead-subject",
];

fn forward() {
    let headers: Vec<(&str, &str)> = IDENTITY_AND_ROUTING.iter().map(|h| (*h, MARK)).collect();
    attempt("forward", "GET", "http://palette/v1/sink", &headers, None);
    attempt(
        "forward",
        "POST",
        "http://palette/v1/sink",
        &[
            ("x-http-method-override", "DELETE"),
            ("x-original-url", "/admin"),
            ("accept-encoding", "gzip"),
            ("x-request-id", MARK),
        ],
        Some(b"{}"),
    );
}

fn trailers() {
    let trailers = [
        (
            "authorization",
            "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9.",
        ),
        ("x-forwarded-user", MARK),
        ("x-bulkhead-tenant", "other-tenant"),
        ("cookie", "session=stolen"),
    ];
    for headers in [
        &[
            (
                "trailer",
                "authorization, x-forwarded-user, x-bulkhead-tenant, cookie",
            ),
            ("te", "trailers"),
        ][..],
        &[][..],
    ] {
        let url = "http://palette/v1/sink";
        let result =
            match http_call::request_full("POST", url, headers, Some(b"{\"a\":1}"), &trailers) {
                Ok(r) => format!("status {}", r.status),
                Err(e) => format!("error {e}"),
            };
        println!("ATTEMPT trailers POST {url}: {result}");
    }
}

fn path_escapes() {
    for path in [
        "/v1/..;/admin",
        "/v1/palette;jsessionid=x",
        "/v1/...;/admin",
        "/v1/.%2e/admin",
        "/v1/%2e/admin",
        "/v1/%252e%252e/admin",
        "/v1/%c0%ae%c0%ae/admin",
        "/v1/%e0%80%ae%e0%80%ae/admin",
        "/v1/%ef%bc%8e%ef%bc%8e/admin",
        "/v1/%u002e%u002e/admin",
        "/v1/..%00/admin",
        "/v1/..%20/admin",
        "/v1/.../admin",
        "/v1/%2E%2E%2Fadmin",
        "/v1/..%5C..%5Cadmin",
    ] {
        attempt(
            "path-escape",
            "GET",
            &format!("http://palette{path}"),
            &[],
            None,
        );
    }
}

fn query() {
    for q in [
        "_method=DELETE",
        "X-HTTP-Method-Override=PUT",
        "x=%2e%2e%2fadmin",
        "a=1;b=2",
        "next=..%2f..%2fadmin",
        "u=%c0%ae",
    ] {
        attempt(
            "query",
            "POST",
            &format!("http://palette/v1/palette?{q}"),
            &[],
            Some(b"{}"),
        );
    }
}
