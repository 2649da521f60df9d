//! The outbound decision, as a pure function of the request and the grant:
//! which declared service a guest request addresses, or why it is refused.
//!
//! A guest addresses a service by its declared name, nothing else:
//! `http://<name>/<path>`. The name is matched exactly (lowercase, no port,
//! no user info, no trailing dot); the host alone knows where the service
//! lives. Everything that is not such a name is refused, and the refusal
//! says which trick it looked like, for the audit log.

use std::net::{Ipv4Addr, Ipv6Addr};

use http::{HeaderMap, Method};

use super::ServiceDecl;
use crate::policy::ServiceName;

/// Why a request was refused. The `Display` text goes into the job report
/// and the audit log; it names the target as the guest wrote it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The scheme is not `http` (the host chooses the transport).
    #[error(
        "scheme `{0}` refused: address internal services as http://<name>/ (the host chooses the transport)"
    )]
    Scheme(String),
    /// No authority at all.
    #[error("no service named: the request has no authority")]
    NoAuthority,
    /// The authority is an IP address in some notation.
    #[error("raw IP address `{0}` refused: address a declared service by name")]
    RawIp(String),
    /// `user@host` forms.
    #[error("authority `{0}` carries user info: refused")]
    UserInfo(String),
    /// `name:port` forms.
    #[error("authority `{0}` names a port: refused (the host decides where a service lives)")]
    Port(String),
    /// Not a well-formed service name (case, dots, other characters).
    #[error("authority `{0}` is not a service name: refused")]
    Malformed(String),
    /// A well-formed name the host does not declare.
    #[error("no internal service named `{0}`: refused")]
    Undeclared(String),
    /// A declared service this module's policy does not list.
    #[error("service `{0}` is not granted to this module: refused")]
    NotGranted(String),
    /// A `Host` header that disagrees with the authority.
    #[error("`host` header `{header}` does not match the authority `{authority}`: refused")]
    HostMismatch {
        /// The header's value.
        header: String,
        /// The request's authority.
        authority: String,
    },
    /// A method the service does not allow.
    #[error("method {method} is not allowed for service `{service}`")]
    Method {
        /// The method.
        method: String,
        /// The service.
        service: String,
    },
    /// A path outside the service's prefixes, or one that tries to escape
    /// them (dot segments, encoded separators, empty segments).
    #[error("path `{path}` is not allowed for service `{service}`: {why}")]
    Path {
        /// The path as sent.
        path: String,
        /// The service.
        service: String,
        /// What is wrong with it.
        why: &'static str,
    },
    /// A redirect to anything but an allowed path of the same service.
    #[error("service `{service}` redirected to `{location}`: refused")]
    Redirect {
        /// The service that answered.
        service: String,
        /// Its `Location`.
        location: String,
    },
    /// A response in an encoding other than identity (compressed bytes
    /// could hide the token from the scan).
    #[error(
        "service `{service}` answered in encoding `{encoding}`: withheld (only identity is accepted)"
    )]
    Encoding {
        /// The service that answered.
        service: String,
        /// Its `Content-Encoding` or `Transfer-Encoding`.
        encoding: String,
    },
    /// A response that carried a form of the job's call token.
    #[error("service `{service}` echoed the call token in its response {place}: withheld")]
    Leak {
        /// The service that answered.
        service: String,
        /// Where: `headers` or `body`.
        place: &'static str,
    },
    /// A method override in the request body: a form field, a multipart
    /// part name, a top-level JSON key ([`body_override`]).
    #[error(
        "method-override field `{key}` in the request body refused (service `{service}`): the gate \
         checks the method the service will act on"
    )]
    BodyOverride {
        /// The field as sent (bounded).
        key: String,
        /// The service.
        service: String,
    },
    /// A response the gate cannot search for the call token (a compressed
    /// format it cannot inflate, too much inflated data).
    #[error("service `{service}`'s response withheld: {why}")]
    Unsearchable {
        /// The service that answered.
        service: String,
        /// Why it cannot be searched.
        why: String,
    },
    /// A per-job bound.
    #[error("{0}")]
    Limit(String),
    /// The job has no caller identity to relay (or it was revoked).
    #[error("no caller identity to relay: {0}")]
    Identity(String),
}

impl Refusal {
    /// A short machine-readable class, for metrics and reports.
    pub fn class(&self) -> &'static str {
        match self {
            Self::Scheme(_) => "scheme",
            Self::NoAuthority | Self::Malformed(_) | Self::UserInfo(_) | Self::Port(_) => {
                "authority"
            }
            Self::RawIp(_) => "raw_ip",
            Self::Undeclared(_) => "undeclared",
            Self::NotGranted(_) => "not_granted",
            Self::HostMismatch { .. } => "host_mismatch",
            Self::Method { .. } => "method",
            Self::Path { .. } => "path",
            Self::Redirect { .. } => "redirect",
            Self::Encoding { .. } => "encoding",
            Self::Leak { .. } => "leak",
            Self::BodyOverride { .. } => "method_override",
            Self::Unsearchable { .. } => "unsearchable",
            Self::Limit(_) => "limit",
            Self::Identity(_) => "identity",
        }
    }
}

/// The services a job may call: the host's declarations, narrowed to the
/// names its policy lists.
pub trait Directory {
    /// The declaration of `name`, if the host declares it.
    fn declared(&self, name: &str) -> Option<&ServiceDecl>;
    /// Whether the job's policy lists `name`.
    fn granted(&self, name: &ServiceName) -> bool;
}

/// Decides which service `authority` names, for `scheme`.
///
/// # Errors
/// The [`Refusal`] describing the first thing wrong.
pub fn resolve<'d, D: Directory>(
    dir: &'d D,
    scheme: Option<&str>,
    authority: Option<&str>,
    headers: &HeaderMap,
) -> Result<&'d ServiceDecl, Refusal> {
    match scheme {
        Some("http") => {}
        Some(other) => return Err(Refusal::Scheme(other.to_owned())),
        None => return Err(Refusal::Scheme(String::new())),
    }
    let authority = match authority {
        None | Some("") => return Err(Refusal::NoAuthority),
        Some(a) => a,
    };
    if authority.contains('@') {
        return Err(Refusal::UserInfo(authority.to_owned()));
    }
    if looks_like_ip(authority) {
        return Err(Refusal::RawIp(authority.to_owned()));
    }
    if authority.contains(':') {
        return Err(Refusal::Port(authority.to_owned()));
    }
    let name = ServiceName::new(authority.to_owned())
        .map_err(|_| Refusal::Malformed(authority.to_owned()))?;
    for host in headers.get_all(http::header::HOST) {
        if host.as_bytes() != authority.as_bytes() {
            return Err(Refusal::HostMismatch {
                header: String::from_utf8_lossy(host.as_bytes()).into_owned(),
                authority: authority.to_owned(),
            });
        }
    }
    let Some(decl) = dir.declared(name.as_str()) else {
        return Err(Refusal::Undeclared(name.to_string()));
    };
    if !dir.granted(&name) {
        return Err(Refusal::NotGranted(name.to_string()));
    }
    Ok(decl)
}

/// Checks the method and path of a request to `decl`.
///
/// # Errors
/// [`Refusal::Method`] or [`Refusal::Path`].
pub fn check_route(
    decl: &ServiceDecl,
    method: &Method,
    path_and_query: &str,
) -> Result<(), Refusal> {
    if !decl.methods.iter().any(|m| m == method) {
        return Err(Refusal::Method {
            method: method.to_string(),
            service: decl.name.to_string(),
        });
    }
    let (path, query) = path_and_query
        .split_once('?')
        .map_or((path_and_query, None), |(p, q)| (p, Some(q)));
    let bad = |why| Refusal::Path {
        path: path_and_query.to_owned(),
        service: decl.name.to_string(),
        why,
    };
    if !path.starts_with('/') {
        return Err(bad("it must start with `/`"));
    }
    check_chars(path).map_err(bad)?;
    let segments: Vec<&str> = path[1..].split('/').collect();
    let last = segments.len() - 1;
    if segments
        .iter()
        .enumerate()
        .any(|(i, seg)| dot_like(seg) || (seg.is_empty() && i != last))
    {
        return Err(bad("dot segments and empty segments are refused"));
    }
    if let Some(query) = query {
        check_chars(query).map_err(bad)?;
        if query.split('&').any(|pair| {
            let key = pair.split('=').next().unwrap_or_default();
            METHOD_OVERRIDES.contains(&override_key(key).as_str())
        }) {
            return Err(bad("method-override query parameters are refused"));
        }
    }
    if !decl.paths.iter().any(|prefix| under_prefix(path, prefix)) {
        return Err(bad("outside the service's allowed prefixes"));
    }
    Ok(())
}

/// Whether `path` is `prefix` or below it, on segment boundaries. A
/// prefix ending in `/` admits only what is below it.
fn under_prefix(path: &str, prefix: &str) -> bool {
    if prefix.ends_with('/') {
        return path.starts_with(prefix);
    }
    path == prefix
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The percent-escapes a path or query may carry: space, `+`, `,`, `:`,
/// `=` and `@`. Every other escape is refused, because some framework
/// decodes it into something that routes: `%2e` (a dot), `%2f` and `%5c`
/// (separators), `%25` (a second round of decoding: `%252e`), `%00`, `%3b`
/// (`;`), and any byte of 0x80 and above (overlong UTF-8 such as `%c0%ae`).
pub const ALLOWED_ESCAPES: [&str; 6] = ["%20", "%2B", "%2C", "%3A", "%3D", "%40"];

/// A query key as the most forgiving common parser names it: `+` and
/// `%20` are spaces, leading spaces dropped (PHP), `.`, spaces and `[` read
/// as `_` (PHP), case ignored.
fn override_key(key: &str) -> String {
    key.replace("%20", " ")
        .replace(['+'], " ")
        .trim()
        .to_ascii_lowercase()
        .replace(['.', ' ', '['], "_")
}

/// Query parameters that some frameworks read as the request's method
/// (`POST /x?_method=DELETE`): the gate checks the method it sees, so
/// these are refused.
const METHOD_OVERRIDES: [&str; 5] = [
    "_method",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "_httpmethod",
];

/// Whether a request body with these headers is read for parameters by
/// some framework, so it must be checked for method overrides
/// ([`body_override`]): no `Content-Type`, or any `Content-Type` value that
/// names a form, a multipart body or JSON (case, parameters, whitespace and
/// the exact subtype ignored: `application/x-www-form-urlencoded`,
/// `multipart/form-data`, `application/json`, `text/json`,
/// `application/vnd.x+json`...; Laravel reads any type containing `json`).
pub fn body_is_parsed(headers: &HeaderMap) -> bool {
    let mut types = headers
        .get_all(http::header::CONTENT_TYPE)
        .iter()
        .peekable();
    if types.peek().is_none() {
        return true;
    }
    types.any(|v| {
        let v = String::from_utf8_lossy(v.as_bytes()).to_ascii_lowercase();
        ["form", "multipart", "json"].iter().any(|k| v.contains(k))
    })
}

/// Most request body bytes read to check for method overrides; a body
/// [`body_is_parsed`] selects that is longer is refused.
pub const MAX_CHECKED_BODY: u64 = 1024 * 1024;

/// The first method-override field of a request body, read every way a
/// common framework would read it, whatever the `Content-Type` says: as
/// `application/x-www-form-urlencoded` pairs (split on `&` and `;`, keys
/// percent-decoded), as `multipart/form-data` (every `name` or `name*`
/// parameter of every `Content-Disposition` line, and any override key
/// anywhere in a part's header block as [`part_header_blocks`] reads it), and
/// as a JSON object
/// (its top-level keys, as Laravel reads `_method`). Keys are normalized as
/// [`override_key`] does, and a PHP array key (`_method[x]`) counts as its
/// name.
pub fn body_override(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    for pair in text.split(['&', ';']) {
        let key = pair.split('=').next().unwrap_or_default();
        if is_override(&percent_decode(key)) {
            return Some(bounded_key(key));
        }
    }
    for line in text.lines() {
        let line = line.trim_start();
        let lower = line.to_ascii_lowercase();
        let Some(rest) = lower.strip_prefix("content-disposition") else {
            continue;
        };
        for param in rest.split(';').skip(1) {
            let Some((name, value)) = param.split_once('=') else {
                continue;
            };
            let name = name.trim();
            if name != "name" && name != "name*" {
                continue;
            }
            let value = value.trim().trim_matches('"');
            // RFC 2231: `name*=utf-8''%5Fmethod`.
            let value = value.rsplit('\'').next().unwrap_or(value);
            if is_override(&percent_decode(value)) {
                return Some(bounded_key(value));
            }
        }
    }
    if let Some(block) = part_header_blocks(&text).find(|b| names_override(b)) {
        return Some(bounded_key(&block));
    }
    json_top_keys(body)
        .into_iter()
        .find(|k| is_override(k))
        .map(|k| bounded_key(&k))
}

/// The header block of every `multipart/form-data` part, as a lenient
/// parser reads it: from a line starting with `--` (any boundary) to the
/// next empty line, its lines joined (folded lines unfolded, a parameter on
/// the next line joined to its header), backslash escapes of quoted
/// strings removed, `%XX` decoded (RFC 2231 values), lowercased.
fn part_header_blocks(text: &str) -> impl Iterator<Item = String> + '_ {
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    std::iter::from_fn(move || {
        lines.by_ref().find(|l| l.starts_with("--"))?;
        let mut block = String::new();
        for line in lines.by_ref() {
            if line.is_empty() {
                break;
            }
            block.push_str(line);
        }
        let mut unescaped = String::with_capacity(block.len());
        let mut chars = block.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => unescaped.extend(chars.next()),
                c => unescaped.push(c),
            }
        }
        Some(percent_decode(&unescaped).to_ascii_lowercase())
    })
}

/// Whether a part's header block (as [`part_header_blocks`] gives it)
/// holds an override key anywhere, separators read as [`override_key`]
/// reads them and `-` as `_`, or with all whitespace dropped: whatever
/// parameter carries it, the part is refused (fail closed).
fn names_override(block: &str) -> bool {
    let spaced = block.replace(['.', ' ', '\t', '[', '-', '+'], "_");
    let joined = block
        .replace([' ', '\t'], "")
        .replace(['.', '[', '-', '+'], "_");
    METHOD_OVERRIDES.iter().any(|m| {
        let m = m.replace('-', "_");
        spaced.contains(&m) || joined.contains(&m)
    })
}

/// The keys of a JSON object body's top level, read lexically: no depth
/// limit, duplicates kept, escapes decoded, whatever follows. A parser
/// with other limits than this one's must not read a key this check
/// missed.
fn json_top_keys(body: &[u8]) -> Vec<String> {
    let mut keys = Vec::new();
    let first = body
        .iter()
        .position(|b| !b.is_ascii_whitespace() && !matches!(b, 0xef | 0xbb | 0xbf));
    if first.map(|i| body[i]) != Some(b'{') {
        return keys;
    }
    let mut depth = 0usize;
    let mut i = 0;
    while i < body.len() {
        match body[i] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => {
                let (text, end) = json_string(body, i + 1);
                i = end;
                let next = body[i..].iter().find(|b| !b.is_ascii_whitespace());
                if depth == 1 && next == Some(&b':') {
                    keys.push(text);
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    keys
}

/// A JSON string starting at `i` (after its quote), decoded, and where it
/// ends (after its closing quote).
fn json_string(body: &[u8], mut i: usize) -> (String, usize) {
    let mut out = String::new();
    let mut raw = Vec::new();
    while i < body.len() {
        match body[i] {
            b'"' => {
                out.push_str(&String::from_utf8_lossy(&raw));
                return (out, i + 1);
            }
            b'\\' => {
                out.push_str(&String::from_utf8_lossy(&std::mem::take(&mut raw)));
                let hex = body
                    .get(i + 2..i + 6)
                    .and_then(|h| std::str::from_utf8(h).ok())
                    .and_then(|h| u32::from_str_radix(h, 16).ok());
                match (body.get(i + 1), hex) {
                    (Some(b'u'), Some(v)) => {
                        out.push(char::from_u32(v).unwrap_or('\u{fffd}'));
                        i += 6;
                    }
                    (Some(c), _) => {
                        out.push(char::from(*c));
                        i += 2;
                    }
                    (None, _) => i += 1,
                }
                continue;
            }
            b => raw.push(b),
        }
        i += 1;
    }
    out.push_str(&String::from_utf8_lossy(&raw));
    (out, i)
}

fn is_override(key: &str) -> bool {
    let base = key.split('[').next().unwrap_or_default();
    [key, base].iter().any(|k| {
        let k = override_key(k).replace('-', "_");
        METHOD_OVERRIDES.iter().any(|m| m.replace('-', "_") == k)
    })
}

fn bounded_key(key: &str) -> String {
    key.chars()
        .take(64)
        .collect::<String>()
        .escape_debug()
        .to_string()
}

/// `s` with every `%XX` decoded and `+` read as a space (lossy UTF-8).
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks that `part` (a path or a query) holds only unreserved characters,
/// `/`, the sub-delimiters other than `;` (`!$&'()*+,=`), `:`, `@`, `?` in
/// a query, and percent-escapes from [`ALLOWED_ESCAPES`]. `;` is refused
/// everywhere: servlet containers and Spring strip `;…` path parameters
/// (`/v1/..;/admin` routes to `/admin`), and some query parsers split on it.
fn check_chars(part: &str) -> Result<(), &'static str> {
    let bytes = part.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b';' => return Err("`;` (path parameters) is refused"),
            b'\\' => return Err("backslashes are refused"),
            b'%' => {
                let escape = part.get(i..i + 3).unwrap_or_default();
                if !ALLOWED_ESCAPES
                    .iter()
                    .any(|e| e.eq_ignore_ascii_case(escape))
                {
                    return Err(
                        "percent-escapes other than %20 %2B %2C %3A %3D %40 are refused \
                         (encoded dots, separators, `%`, `;`, NUL, non-ASCII bytes)",
                    );
                }
                i += 3;
                continue;
            }
            b if b.is_ascii_alphanumeric() => {}
            b'-' | b'.' | b'_' | b'~' | b'/' | b'?' | b'!' | b'$' | b'&' | b'\'' | b'(' | b')'
            | b'*' | b'+' | b',' | b'=' | b':' | b'@' => {}
            _ => return Err("characters outside unreserved, `/`, `!$&'()*+,=:@?` are refused"),
        }
        i += 1;
    }
    Ok(())
}

/// Whether a segment is `.` or `..` as some server would see it: only dots
/// and (encoded) spaces, which Windows servers trim (`.. `, `.%20.`).
fn dot_like(segment: &str) -> bool {
    let s = segment.replace("%20", " ");
    s.contains('.') && s.chars().all(|c| c == '.' || c == ' ')
}

/// Whether an authority is an IP address in any notation a resolver or
/// `inet_aton` would accept: bracketed IPv6 (with zone or port), dotted
/// quads, and the one- to four-part decimal, octal and hex forms
/// (`2130706433`, `0x7f.1`, `0177.0.0.1`).
pub fn looks_like_ip(authority: &str) -> bool {
    if authority.starts_with('[') {
        return true;
    }
    // Strip one `:port` for the IPv4 forms; more than one colon is an
    // unbracketed IPv6 literal.
    if authority.matches(':').count() > 1 {
        let host = authority.split('%').next().unwrap_or(authority);
        return host.parse::<Ipv6Addr>().is_ok() || host.contains("::");
    }
    let host = authority.split(':').next().unwrap_or(authority);
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.parse::<Ipv4Addr>().is_ok() {
        return true;
    }
    let parts: Vec<&str> = host.split('.').collect();
    (1..=4).contains(&parts.len()) && parts.iter().all(|p| numeric_part(p))
}

fn numeric_part(p: &str) -> bool {
    if p.is_empty() {
        return false;
    }
    if let Some(hex) = p.strip_prefix("0x").or_else(|| p.strip_prefix("0X")) {
        return hex.chars().all(|c| c.is_ascii_hexdigit());
    }
    p.chars().all(|c| c.is_ascii_digit())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::relay::ServiceDecl;

    struct Dir(Vec<ServiceDecl>, Vec<ServiceName>);

    impl Directory for Dir {
        fn declared(&self, name: &str) -> Option<&ServiceDecl> {
            self.0.iter().find(|d| d.name.as_str() == name)
        }
        fn granted(&self, name: &ServiceName) -> bool {
            self.1.contains(name)
        }
    }

    fn decl(name: &str, paths: &[&str]) -> ServiceDecl {
        let mut d = ServiceDecl::example(name, "http://127.0.0.1:1");
        d.paths = paths.iter().map(|p| (*p).to_owned()).collect();
        d
    }

    fn dir() -> Dir {
        Dir(
            vec![decl("palette", &["/v1"]), decl("payments", &["/"])],
            vec![ServiceName::new("palette").unwrap()],
        )
    }

    fn resolve_str(authority: &str) -> Result<String, Refusal> {
        let d = dir();
        resolve(&d, Some("http"), Some(authority), &HeaderMap::new()).map(|d| d.name.to_string())
    }

    #[test]
    fn the_granted_name_resolves() {
        assert_eq!(resolve_str("palette").unwrap(), "palette");
    }

    #[test]
    fn a_declared_but_ungranted_service_is_refused() {
        assert_eq!(
            resolve_str("payments"),
            Err(Refusal::NotGranted("payments".into()))
        );
        assert_eq!(
            resolve_str("ledger"),
            Err(Refusal::Undeclared("ledger".into()))
        );
    }

    #[test]
    fn every_ip_notation_is_refused_as_an_ip() {
        for a in [
            "127.0.0.1",
            "127.0.0.1:9101",
            "2130706433",
            "0x7f000001",
            "0x7f.0.0.1",
            "0177.0.0.1",
            "127.1",
            "127.0.0.1.",
            "[::1]",
            "[::1]:80",
            "[::ffff:127.0.0.1]",
            "[::ffff:7f00:1]",
            "[fe80::1%25eth0]",
            "::1",
            "169.254.169.254",
            "[fd00:ec2::254]",
            "0",
        ] {
            assert!(
                matches!(resolve_str(a), Err(Refusal::RawIp(_))),
                "{a}: {:?}",
                resolve_str(a)
            );
        }
    }

    #[test]
    fn authority_tricks_are_refused() {
        for (a, class) in [
            ("palette@payments", "authority"),
            ("payments@palette", "authority"),
            ("palette:80", "authority"),
            ("palette:", "authority"),
            ("PALETTE", "authority"),
            ("Palette", "authority"),
            ("palette.", "authority"),
            ("palette.payments", "authority"),
            ("palette.internal", "authority"),
            ("palette%00", "authority"),
            ("localhost", "undeclared"),
            ("metadata", "undeclared"),
        ] {
            let r = resolve_str(a).expect_err(a);
            assert_eq!(r.class(), class, "{a}: {r}");
        }
    }

    #[test]
    fn https_and_missing_authority_are_refused() {
        let d = dir();
        let h = HeaderMap::new();
        assert!(matches!(
            resolve(&d, Some("https"), Some("palette"), &h),
            Err(Refusal::Scheme(_))
        ));
        assert_eq!(
            resolve(&d, Some("http"), None, &h).unwrap_err(),
            Refusal::NoAuthority
        );
    }

    #[test]
    fn a_host_header_must_match_the_authority() {
        let d = dir();
        let mut h = HeaderMap::new();
        h.insert(http::header::HOST, "payments".parse().unwrap());
        assert!(matches!(
            resolve(&d, Some("http"), Some("palette"), &h),
            Err(Refusal::HostMismatch { .. })
        ));
        h.insert(http::header::HOST, "palette".parse().unwrap());
        assert!(resolve(&d, Some("http"), Some("palette"), &h).is_ok());
    }

    #[test]
    fn paths_stay_under_the_prefixes() {
        let d = decl("palette", &["/v1", "/static/"]);
        for ok in [
            "/v1",
            "/v1/",
            "/v1/palette",
            "/v1/palette?x=1",
            "/static/a.css",
        ] {
            check_route(&d, &Method::GET, ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for bad in [
            "/",
            "/v10",
            "/v2/palette",
            "/v1/../admin",
            "/v1/./x",
            "/v1/%2e%2e/admin",
            "/v1/%2E%2E/admin",
            "/v1%2fadmin",
            "/v1/..%5cadmin",
            "/v1\\..\\admin",
            "//payments/v1",
            "/v1//x",
            "/static",
            "/v1/%252e%252e/admin",
        ] {
            assert!(
                matches!(
                    check_route(&d, &Method::GET, bad),
                    Err(Refusal::Path { .. })
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            check_route(&d, &Method::DELETE, "/v1/x"),
            Err(Refusal::Method { .. })
        ));
    }

    /// What servlet containers, Spring, IIS, double-decoding proxies and
    /// lenient UTF-8 decoders would route outside `/v1`.
    #[test]
    fn framework_escapes_are_refused() {
        let d = decl("palette", &["/v1"]);
        for bad in [
            "/v1/..;/admin",
            "/v1;/../admin",
            "/v1/palette;jsessionid=x",
            "/v1/...;/admin",
            "/v1/.%2e/admin",
            "/v1/%2e/admin",
            "/v1/%252e%252e/admin",
            "/v1/%c0%ae%c0%ae/admin",
            "/v1/%e0%80%ae/admin",
            "/v1/%ef%bc%8e%ef%bc%8e/admin",
            "/v1/%u002e%u002e/admin",
            "/v1/..%00/admin",
            "/v1/..%20/admin",
            "/v1/.%20./admin",
            "/v1/.../admin",
            "/v1/%2E%2E%2Fadmin",
            "/v1/..%5C..%5Cadmin",
            "/v1/%3b/x",
            "/v1/x%23/../../admin",
            "/v1/\u{ff0e}\u{ff0e}/admin",
            "/v1/a b",
            "/v1/a\"b",
            "/v1/a<b>",
            "/v1/x%",
            "/v1/x%2",
            "/v1/x%zz",
        ] {
            assert!(
                matches!(
                    check_route(&d, &Method::GET, bad),
                    Err(Refusal::Path { .. })
                ),
                "{bad}"
            );
        }
        for ok in [
            "/v1/a%20b",
            "/v1/a%2Bb",
            "/v1/user@example:1",
            "/v1/x.json",
            "/v1/a..b",
            "/v1/.well-known",
            "/v1/x?a=1&b=two+three&c=%20",
        ] {
            check_route(&d, &Method::GET, ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn the_query_smuggles_nothing() {
        let d = decl("palette", &["/v1"]);
        for bad in [
            "/v1/x?_method=DELETE",
            "/v1/x?a=1&_METHOD=PUT",
            "/v1/x?X-HTTP-Method-Override=PUT",
            "/v1/x?x-method-override=PATCH",
            "/v1/x?+_method=DELETE",
            "/v1/x?%20_method=DELETE",
            "/v1/x?.method=DELETE",
            "/v1/x?a=1;b=2",
            "/v1/x?next=..%2f..%2fadmin",
            "/v1/x?u=%c0%ae",
            "/v1/x?a=%00",
            "/v1/x?a=\\",
            "/v1/x?a=1#frag",
        ] {
            assert!(
                matches!(
                    check_route(&d, &Method::POST, bad),
                    Err(Refusal::Path { .. })
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn method_overrides_in_bodies_are_found_every_way_a_framework_reads_them() {
        for body in [
            "_method=DELETE",
            "a=1&_method=DELETE",
            "a=1;_METHOD=put",
            "%5Fmethod=DELETE",
            "%5fMETHOD=DELETE",
            "+_method=DELETE",
            "_method%5B%5D=DELETE",
            "_method[]=DELETE",
            ".method=PATCH",
            "X-HTTP-Method-Override=PUT",
            "x_http_method_override=PUT",
            "--b\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--b--",
            "--b\r\ncontent-disposition:form-data;name=_method\r\n\r\nDELETE",
            "--b\r\nCONTENT-DISPOSITION: form-data; name*=utf-8''%5Fmethod\r\n\r\nPUT",
            "--b\r\nContent-Disposition: form-data; filename=\"a\"; NAME = \"_Method\"\r\n\r\nX",
            "{\"_method\":\"DELETE\"}",
            "{\"a\":1, \"_METHOD\" : \"DELETE\"}",
            "{\"\\u005fmethod\":\"DELETE\"}",
            "{\"x-http-method-override\":\"PUT\"}",
            "\u{feff}{\"_method\":\"DELETE\"}",
            "{\"_method\":\"DELETE\",}",
            "{\"_method\":\"GET\",\"_method\":\"DELETE\"}",
            // Rack reads a folded line, a parameter on the next line and
            // backslash escapes in quoted strings.
            "--b\r\nContent-Disposition: form-data;\r\n name=\"_method\"\r\n\r\nDELETE\r\n--b--",
            "--b\r\nContent-Disposition: form-data;\r\nname=\"_method\"\r\n\r\nDELETE\r\n--b--",
            "--b\r\nContent-Disposition: form-data;\r\n\tname=\"_METHOD\"\r\n\r\nDELETE",
            "--b\r\nContent-Disposition: form-data; name=\"_m\\ethod\"\r\n\r\nDELETE",
            "--b\r\nContent-Disposition: form-data; name=\"\\_\\m\\e\\t\\h\\o\\d\"\r\n\r\nDELETE",
            "--b\nContent-Disposition: form-data;\n name=\"x-http-\\method-override\"\n\nPUT",
            "--b\r\nContent-Type: text/plain\r\nContent-Disposition:\r\n form-data;\r\n name=\"_me\r\n thod\"\r\n\r\nX",
        ] {
            assert!(body_override(body.as_bytes()).is_some(), "{body}");
        }
        // Deeper than serde_json's recursion limit, shallower than PHP's.
        let deep = format!(
            "{{\"deep\":{}1{}, \"_method\":\"DELETE\"}}",
            "[".repeat(300),
            "]".repeat(300)
        );
        assert!(body_override(deep.as_bytes()).is_some());
        for body in [
            "a=1&method=DELETE",
            "a=1&b=_method",
            "{\"a\":{\"_method\":\"DELETE\"}}",
            "[{\"_method\":\"DELETE\"}]",
            "{\"comment\":\"send _method=DELETE\"}",
            "--b\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\n_method",
            "--b\r\nContent-Disposition: form-data;\r\n name=\"method\"\r\n\r\n_method\r\n--b--",
            "",
        ] {
            assert_eq!(body_override(body.as_bytes()), None, "{body}");
        }
    }

    #[test]
    fn bodies_a_framework_parses_are_recognised_by_content_type() {
        let with = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(http::header::CONTENT_TYPE, v.parse().unwrap());
            }
            body_is_parsed(&h)
        };
        assert!(with(&[]));
        for ct in [
            "application/x-www-form-urlencoded",
            " Application/X-WWW-Form-Urlencoded ; charset=UTF-8",
            "multipart/form-data; boundary=x",
            "MULTIPART/FORM-DATA;boundary=x",
            "application/json",
            "text/json",
            "application/vnd.api+json; charset=utf-8",
            "text/plain; x=/json",
        ] {
            assert!(with(&[ct]), "{ct}");
        }
        assert!(with(&["image/png", "application/json"]));
        for ct in ["image/png", "application/octet-stream", "text/plain"] {
            assert!(!with(&[ct]), "{ct}");
        }
    }
}
