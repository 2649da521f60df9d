//! Calling an internal service from a guest: plain `wasi:http` client code.
//!
//! A guest addresses a service by the name its operator declared, as
//! `http://<name>/<path>`; the host resolves the name, checks the policy,
//! and adds the credential. The guest never handles a token: there is none
//! to add, and any `Authorization` or cookie header it sets is removed.
//!
//! ```no_run
//! let palette = http_call::get("http://palette/v1/palette")?;
//! assert_eq!(palette.status, 200);
//! # Ok::<(), http_call::CallError>(())
//! ```
//!
//! The crate is used by the `framed` example guest and by the hostile
//! guests that try to misuse the same path.

use wasip2::http::outgoing_handler;
use wasip2::http::types::{
    ErrorCode, Fields, IncomingBody, IncomingResponse, Method, OutgoingBody, OutgoingRequest,
    Scheme,
};
use wasip2::io::streams::StreamError;

/// Largest response body read, in bytes (the host bounds it too).
pub const MAX_BODY: usize = 8 * 1024 * 1024;

/// A response: status, headers and the whole body.
#[derive(Debug)]
pub struct Response {
    /// Status code.
    pub status: u16,
    /// Header names and values, as received.
    pub headers: Vec<(String, Vec<u8>)>,
    /// Body.
    pub body: Vec<u8>,
    /// Trailer names and values, as received (the Bulkhead host drops
    /// them).
    pub trailers: Vec<(String, Vec<u8>)>,
    /// Why reading the body or the trailers stopped early, for
    /// [`request_full`] (the other functions fail instead).
    pub body_error: Option<String>,
}

/// Why a call failed.
#[derive(Debug)]
pub enum CallError {
    /// The URL could not be used (the guest-side setters refused a part).
    Url(String),
    /// A header the host forbids the guest to set (for example `host`).
    Header(String),
    /// The host or the network refused or failed the request; the host's
    /// gate answers `HTTP-request-denied` for anything the policy does not
    /// grant.
    Http(ErrorCode),
    /// The body could not be written or read.
    Body(String),
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Url(m) => write!(f, "bad url: {m}"),
            Self::Header(m) => write!(f, "header refused: {m}"),
            Self::Http(e) => write!(f, "http error: {e:?}"),
            Self::Body(m) => write!(f, "body: {m}"),
        }
    }
}

impl std::error::Error for CallError {}

/// `GET url`.
///
/// # Errors
/// [`CallError`].
pub fn get(url: &str) -> Result<Response, CallError> {
    request("GET", url, &[], None)
}

/// Sends one request. `url` is `scheme://authority/path?query`; the parts
/// are passed to `wasi:http` as they are, without normalisation.
///
/// # Errors
/// [`CallError`].
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<Response, CallError> {
    let response = request_full(method, url, headers, body, &[])?;
    match response.body_error {
        Some(e) => Err(CallError::Body(e)),
        None => Ok(response),
    }
}

/// [`request`] with request trailers, keeping whatever part of the body
/// and trailers arrived when reading them fails (`body_error`).
///
/// # Errors
/// [`CallError`] when the request cannot be sent or no response comes.
pub fn request_full(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    trailers: &[(&str, &str)],
) -> Result<Response, CallError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| CallError::Url(format!("{url}: no scheme")))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let fields = Fields::new();
    for (name, value) in headers {
        fields
            .append(name, value.as_bytes())
            .map_err(|e| CallError::Header(format!("{name}: {e:?}")))?;
    }
    let req = OutgoingRequest::new(fields);
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        "POST" => Method::Post,
        "PUT" => Method::Put,
        "DELETE" => Method::Delete,
        "PATCH" => Method::Patch,
        other => Method::Other(other.to_owned()),
    };
    req.set_method(&method)
        .map_err(|()| CallError::Url("method refused".into()))?;
    let scheme = match scheme {
        "http" => Scheme::Http,
        "https" => Scheme::Https,
        other => Scheme::Other(other.to_owned()),
    };
    req.set_scheme(Some(&scheme))
        .map_err(|()| CallError::Url("scheme refused".into()))?;
    req.set_authority(Some(authority))
        .map_err(|()| CallError::Url(format!("authority {authority:?} refused")))?;
    req.set_path_with_query(Some(path))
        .map_err(|()| CallError::Url(format!("path {path:?} refused")))?;
    let out_body = req
        .body()
        .map_err(|()| CallError::Body("no request body".into()))?;

    let future = outgoing_handler::handle(req, None).map_err(CallError::Http)?;
    {
        let stream = out_body
            .write()
            .map_err(|()| CallError::Body("no request stream".into()))?;
        if let Some(bytes) = body {
            for chunk in bytes.chunks(4096) {
                stream
                    .blocking_write_and_flush(chunk)
                    .map_err(|e| CallError::Body(format!("{e:?}")))?;
            }
        }
    }
    let trailer_fields = if trailers.is_empty() {
        None
    } else {
        let fields = Fields::new();
        for (name, value) in trailers {
            fields
                .append(name, value.as_bytes())
                .map_err(|e| CallError::Header(format!("trailer {name}: {e:?}")))?;
        }
        Some(fields)
    };
    OutgoingBody::finish(out_body, trailer_fields).map_err(CallError::Http)?;

    let response = loop {
        match future.get() {
            Some(result) => {
                break result
                    .map_err(|()| CallError::Body("response already taken".into()))?
                    .map_err(CallError::Http)?;
            }
            None => future.subscribe().block(),
        }
    };
    read_response(&response)
}

fn read_response(response: &IncomingResponse) -> Result<Response, CallError> {
    let status = response.status();
    let headers = response.headers().entries();
    let body = response
        .consume()
        .map_err(|()| CallError::Body("body already taken".into()))?;
    let mut bytes = Vec::new();
    let mut body_error = None;
    {
        let stream = body
            .stream()
            .map_err(|()| CallError::Body("no response stream".into()))?;
        loop {
            match stream.blocking_read(16 * 1024) {
                Ok(chunk) => {
                    if bytes.len() + chunk.len() > MAX_BODY {
                        body_error = Some("response body too large".to_owned());
                        break;
                    }
                    bytes.extend_from_slice(&chunk);
                }
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(e)) => {
                    body_error = Some(e.to_debug_string());
                    break;
                }
            }
        }
    }
    let mut trailers = Vec::new();
    if body_error.is_none() {
        let future = IncomingBody::finish(body);
        let got = loop {
            match future.get() {
                Some(got) => break got,
                None => future.subscribe().block(),
            }
        };
        match got {
            Ok(Ok(Some(fields))) => trailers = fields.entries(),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => body_error = Some(format!("trailers: {e:?}")),
            Err(()) => body_error = Some("trailers already taken".to_owned()),
        }
    }
    Ok(Response {
        status,
        headers,
        body: bytes,
        trailers,
        body_error,
    })
}

/// Writes `response` for people: status, headers and body as text.
///
/// # Errors
/// When `out` fails.
pub fn dump(out: &mut impl std::io::Write, response: &Response) -> std::io::Result<()> {
    writeln!(out, "status {}", response.status)?;
    for (name, value) in &response.headers {
        writeln!(out, "{name}: {}", String::from_utf8_lossy(value))?;
    }
    writeln!(out)?;
    out.write_all(&response.body)?;
    writeln!(out)?;
    for (name, value) in &response.trailers {
        writeln!(out, "trailer {name}: {}", String::from_utf8_lossy(value))?;
    }
    if let Some(e) = &response.body_error {
        writeln!(out, "body error: {e}")?;
    }
    Ok(())
}
