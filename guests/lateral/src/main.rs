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
        "stall" => stall(),
        "hunt" => hunt(),
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
