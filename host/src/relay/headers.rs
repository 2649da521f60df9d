//! Which headers cross the gate, in each direction: allow-lists, not
//! deny-lists, so a header nobody thought of stays behind.
//!
//! - Requests: a guest's header reaches the service only if it is in
//!   [`FORWARDED`] or in the service's `forward_headers`; the host then sets
//!   `Host`, `Authorization` (the call token) and `Accept-Encoding: identity`
//!   itself. A service's `forward_headers` can never name a header of
//!   [`never_forwarded`]: credentials, identity claims an auth proxy would
//!   trust, routing and client-address headers, method overrides, framing
//!   and trailers.
//! - Responses: only [`RETURNED`] reach the guest (after the leak scan of
//!   [`super::leak`]); trailers never do.

use http::HeaderName;

/// Request headers every service receives from a guest, when the guest
/// sets them: content negotiation, conditional requests and the body's
/// type and length. Nothing here names a caller, a route or a credential.
pub const FORWARDED: [&str; 11] = [
    "accept",
    "accept-language",
    "cache-control",
    "content-language",
    "content-length",
    "content-type",
    "if-match",
    "if-modified-since",
    "if-none-match",
    "if-unmodified-since",
    "user-agent",
];

/// Response headers a guest receives: the body's type, length and
/// freshness, and `location` (already rewritten to the service's name).
/// The most the headers a guest is given of a response may take (names
/// and values): what a headers resource of its own may hold
/// ([`crate::sandbox::FIELD_SIZE_LIMIT`]). A response's head stays in the
/// guest's host memory for as long as it keeps the response, which may be
/// long after the call: a larger one is refused (found by an attacker: a
/// service's 390 KB of `etag` values, kept in 752 responses by a job
/// weighed 141 MiB, took its worker 290 MB, and a co-tenant's job was
/// killed with it).
pub const MAX_RETURNED_BYTES: usize = crate::sandbox::FIELD_SIZE_LIMIT;

/// The size of `headers` as [`MAX_RETURNED_BYTES`] counts it.
pub fn size(headers: &http::HeaderMap) -> usize {
    headers
        .iter()
        .map(|(name, value)| name.as_str().len() + value.len())
        .sum()
}

pub const RETURNED: [&str; 14] = [
    "accept-ranges",
    "age",
    "cache-control",
    "content-language",
    "content-length",
    "content-range",
    "content-type",
    "date",
    "etag",
    "expires",
    "last-modified",
    "location",
    "retry-after",
    "vary",
];

/// Words that mark a header as carrying a credential or an identity claim.
const IDENTITY_WORDS: [&str; 17] = [
    "token",
    "auth",
    "secret",
    "session",
    "credential",
    "api-key",
    "apikey",
    "signature",
    "jwt",
    "password",
    "impersonate",
    "tenant",
    "principal",
    "identity",
    "remote-",
    "-user",
    "x-user",
];

/// Why `name` can never be forwarded, even if a service lists it; `None`
/// when it may be.
///
/// - credentials (`authorization`, `cookie`, anything naming a token,
///   session, key or signature): the host's call token is the only
///   credential a call carries;
/// - identity claims (`x-remote-user`, `x-forwarded-user`, `x-tenant`,
///   `impersonate-*`, `x-bulkhead-*`…): auth proxies and services trust
///   them; the caller's identity travels only in the signed token;
/// - routing and client address (`host`, `forwarded`, `x-forwarded-*`,
///   `x-real-ip`, `x-original-url`, `x-rewrite-url`, `via`…): frameworks
///   route or authorise on them, past the gate's path check;
/// - method overrides (`x-http-method-override`…): the gate checks the
///   method it sees;
/// - framing, hop-by-hop and trailers (`te`, `trailer`,
///   `transfer-encoding`, `connection`, `upgrade`, `expect`…): the host
///   frames the call, and trailers would bypass this list;
/// - `accept-encoding`: the host asks for `identity` so that every byte it
///   hands back can be scanned for the token.
pub fn never_forwarded(name: &HeaderName) -> Option<&'static str> {
    let n = name.as_str();
    if n == "user-agent" {
        return None;
    }
    if matches!(
        n,
        "authorization" | "proxy-authorization" | "cookie" | "cookie2"
    ) {
        return Some("it carries a credential; the host's call token is the only one");
    }
    if matches!(
        n,
        "host"
            | "forwarded"
            | "via"
            | "x-real-ip"
            | "x-client-ip"
            | "true-client-ip"
            | "cf-connecting-ip"
            | "x-cluster-client-ip"
            | "x-rewrite-url"
            | "x-host"
            | "x-proxyuser-ip"
    ) || n.starts_with("x-forwarded")
        || n.starts_with("x-original")
    {
        return Some("services route or authorise on it");
    }
    if n.contains("method") {
        return Some("it overrides the method the gate checked");
    }
    if matches!(
        n,
        "te" | "trailer"
            | "transfer-encoding"
            | "connection"
            | "keep-alive"
            | "upgrade"
            | "expect"
            | "http2-settings"
            | "content-encoding"
    ) || n.starts_with("proxy-")
    {
        return Some("the host frames the call (no trailers, no hop-by-hop headers)");
    }
    if n == "accept-encoding" {
        return Some("the host asks for identity encoding so it can scan every byte it returns");
    }
    if n.starts_with("x-bulkhead-") || IDENTITY_WORDS.iter().any(|w| n.contains(w)) {
        return Some("it carries a credential or an identity claim");
    }
    None
}

/// Whether a guest's request header `name` is forwarded to a service that
/// also forwards `extra`.
pub fn forwarded(name: &HeaderName, extra: &[HeaderName]) -> bool {
    (FORWARDED.contains(&name.as_str()) || extra.contains(name)) && never_forwarded(name).is_none()
}

/// Whether a service's response header `name` is passed to the guest.
pub fn returned(name: &HeaderName) -> bool {
    RETURNED.contains(&name.as_str())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(name: &str) -> HeaderName {
        HeaderName::from_bytes(name.as_bytes()).unwrap()
    }

    /// The identity and routing headers that reached an internal service
    /// when filtering was a deny-list.
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

    #[test]
    fn only_listed_request_headers_are_forwarded() {
        for name in FORWARDED {
            assert!(forwarded(&h(name), &[]), "{name}");
        }
        for name in IDENTITY_AND_ROUTING
            .iter()
            .chain(&[
                "authorization",
                "cookie",
                "te",
                "trailer",
                "accept-encoding",
            ])
            .chain(&["x-request-id", "x-anything", "origin", "referer", "range"])
        {
            assert!(!forwarded(&h(name), &[]), "{name}");
        }
        assert!(forwarded(&h("x-request-id"), &[h("x-request-id")]));
    }

    #[test]
    fn no_listing_forwards_an_identity_or_routing_header() {
        for name in IDENTITY_AND_ROUTING.iter().chain(&[
            "authorization",
            "proxy-authorization",
            "cookie",
            "host",
            "te",
            "trailer",
            "transfer-encoding",
            "connection",
            "accept-encoding",
            "content-encoding",
            "x-api-key",
            "x-amz-security-token",
        ]) {
            assert!(never_forwarded(&h(name)).is_some(), "{name}");
            assert!(!forwarded(&h(name), &[h(name)]), "{name}");
        }
        for name in FORWARDED.iter().chain(&["x-request-id", "range", "origin"]) {
            assert_eq!(never_forwarded(&h(name)), None, "{name}");
        }
    }

    #[test]
    fn only_listed_response_headers_are_returned() {
        assert!(returned(&h("content-type")));
        for name in [
            "set-cookie",
            "content-encoding",
            "transfer-encoding",
            "trailer",
            "x-echo",
            "www-authenticate",
            "authorization",
        ] {
            assert!(!returned(&h(name)), "{name}");
        }
    }
}
